//! Fixed-newstyle negotiation as a pure state machine: bytes from the client in, reply bytes
//! and a decision out. No IO, no clock, no async: `server.rs` drives it over a socket (or a
//! TLS stream), and the tests here drive it from byte slices.
//!
//! ```text
//!   Handshake::new ──▶ greeting, Read(4)
//!   input(client flags)            ──▶ Read(16) | Close
//!   input(option header)           ──▶ Read(len) (len <= MAX_OPTION_LEN) | Close
//!   input(option data)             ──▶ Read(16) | StartTls | Transmit | Close
//!   tls_started() after STARTTLS   ──▶ Read(16) (negotiation starts afresh inside TLS)
//! ```
//!
//! Every [`Step`] carries the bytes to send before acting on [`Next`]. For
//! [`Next::Transmit`] the bytes are the final reply (the GO replies ending in REP_ACK, or the
//! EXPORT_NAME export data): the driver sends them only once the connection holds a
//! transmission slot, so a client that has negotiated waits for its turn without being told
//! it is in.
//!
//! With TLS required (FORCEDTLS) every option but STARTTLS and ABORT is answered with
//! NBD_REP_ERR_TLS_REQD before TLS runs, and a plaintext EXPORT_NAME closes the connection
//! (it has no error reply).

use crate::limits::{MAX_OPTIONS, MAX_OPTION_LEN, MAX_REQUEST_LEN, PREFERRED_BLOCK_SIZE};
use crate::proto::*;

/// The export as a negotiating client sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ExportInfo {
    pub name: String,
    pub description: Option<String>,
    pub size: u64,
    pub read_only: bool,
    /// More than one client may be in transmission at once: advertise CAN_MULTI_CONN.
    pub multi_conn: bool,
    /// TLS is configured and therefore required (FORCEDTLS).
    pub tls_required: bool,
}

impl ExportInfo {
    /// Transmission flags; DF only with structured replies.
    pub fn tflags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        if self.multi_conn {
            f |= TFLAG_CAN_MULTI_CONN;
        }
        if self.read_only {
            f |= TFLAG_READ_ONLY;
        } else {
            f |= TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES;
        }
        if structured {
            f |= TFLAG_SEND_DF;
        }
        f
    }
}

/// What negotiation settled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Negotiated {
    pub structured: bool,
    pub base_allocation: bool,
}

/// What the driver does once the step's reply bytes are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Next {
    /// Read exactly this many bytes and hand them to [`Handshake::input`].
    Read(usize),
    /// Run the TLS handshake (server side), then call [`Handshake::tls_started`].
    StartTls,
    /// Negotiation is over: take a transmission slot, then send the reply and transmit.
    Transmit(Negotiated),
    /// Send the reply (if any; failures do not matter) and close the connection.
    Close,
}

/// What the driver counts for a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Event {
    /// Malformed input: bad magic, unknown client flags, undecodable or oversized option
    /// data, too many options.
    ProtocolError,
    /// A client refused by policy (EXPORT_NAME before STARTTLS on a TLS-only server).
    Refused,
}

/// One transition: bytes to send, then what to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Step {
    pub reply: Vec<u8>,
    pub next: Next,
    pub event: Option<Event>,
}

/// Where the machine is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    ClientFlags,
    OptionHeader,
    OptionData {
        option: u32,
        len: usize,
    },
    /// STARTTLS was acknowledged; waiting for the driver's TLS handshake.
    Tls,
    /// Transmit or Close was decided; nothing more is accepted.
    Done,
}

/// The server side of one client's negotiation.
#[derive(Debug)]
pub(crate) struct Handshake {
    export: ExportInfo,
    phase: Phase,
    no_zeroes: bool,
    /// Options the client may still send (over both sides of STARTTLS together).
    options_left: usize,
    tls_active: bool,
    neg: Negotiated,
}

impl Handshake {
    /// A fresh negotiation and its first step: the greeting, then read the client flags.
    pub fn new(export: ExportInfo) -> (Handshake, Step) {
        let hs = Handshake {
            export,
            phase: Phase::ClientFlags,
            no_zeroes: false,
            options_left: MAX_OPTIONS,
            tls_active: false,
            neg: Negotiated::default(),
        };
        let step = Step {
            reply: encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_vec(),
            next: Next::Read(4),
            event: None,
        };
        (hs, step)
    }

    /// The bytes the last step asked for (exactly that many).
    pub fn input(&mut self, bytes: &[u8]) -> Step {
        match self.phase {
            Phase::ClientFlags => self.client_flags(bytes),
            Phase::OptionHeader => self.option_header(bytes),
            Phase::OptionData { option, len } if bytes.len() == len => self.option(option, bytes),
            // Input nobody asked for: a driver bug, never a client's doing. Close.
            _ => self.close(Vec::new(), Some(Event::ProtocolError)),
        }
    }

    /// The TLS handshake after STARTTLS succeeded: negotiation starts afresh inside TLS
    /// (the protocol says everything negotiated before is forgotten).
    pub fn tls_started(&mut self) -> Step {
        if self.phase != Phase::Tls {
            return self.close(Vec::new(), Some(Event::ProtocolError));
        }
        self.tls_active = true;
        self.neg = Negotiated::default();
        self.read_next_option(Vec::new(), None)
    }

    fn close(&mut self, reply: Vec<u8>, event: Option<Event>) -> Step {
        self.phase = Phase::Done;
        Step {
            reply,
            next: Next::Close,
            event,
        }
    }

    /// Ask for the next option header, unless the client has used up its options.
    fn read_next_option(&mut self, reply: Vec<u8>, event: Option<Event>) -> Step {
        if self.options_left == 0 {
            return self.close(reply, Some(Event::ProtocolError));
        }
        self.phase = Phase::OptionHeader;
        Step {
            reply,
            next: Next::Read(OPTION_HEADER_LEN),
            event,
        }
    }

    fn client_flags(&mut self, bytes: &[u8]) -> Step {
        let Ok(b) = <[u8; 4]>::try_from(bytes) else {
            return self.close(Vec::new(), Some(Event::ProtocolError));
        };
        let cflags = u32::from_be_bytes(b);
        if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            // The protocol says to close on client flags we do not know.
            return self.close(Vec::new(), Some(Event::ProtocolError));
        }
        self.no_zeroes = cflags & FLAG_C_NO_ZEROES != 0;
        self.read_next_option(Vec::new(), None)
    }

    fn option_header(&mut self, bytes: &[u8]) -> Step {
        let h = <&[u8; OPTION_HEADER_LEN]>::try_from(bytes)
            .ok()
            .and_then(decode_option_header);
        let Some(h) = h else {
            // Not IHAVEOPT: nothing to resynchronise on.
            return self.close(Vec::new(), Some(Event::ProtocolError));
        };
        // read_next_option only asks for a header while options are left.
        self.options_left = self.options_left.saturating_sub(1);
        let len = h.len as usize;
        if len > MAX_OPTION_LEN {
            let r = encode_option_reply(h.option, REP_ERR_TOO_BIG, b"option data too long");
            return self.close(r, Some(Event::ProtocolError));
        }
        if len == 0 {
            return self.option(h.option, &[]);
        }
        self.phase = Phase::OptionData {
            option: h.option,
            len,
        };
        Step {
            reply: Vec::new(),
            next: Next::Read(len),
            event: None,
        }
    }

    /// One whole option: answer it and decide what comes next.
    fn option(&mut self, option: u32, data: &[u8]) -> Step {
        let mut r = Vec::new();
        let mut reply = |reply: u32, d: &[u8]| r.extend(encode_option_reply(option, reply, d));
        if self.export.tls_required && !self.tls_active {
            match option {
                OPT_STARTTLS if !data.is_empty() => {
                    reply(REP_ERR_INVALID, b"STARTTLS takes no data");
                    return self.read_next_option(r, None);
                }
                OPT_STARTTLS => {
                    reply(REP_ACK, &[]);
                    self.phase = Phase::Tls;
                    return Step {
                        reply: r,
                        next: Next::StartTls,
                        event: None,
                    };
                }
                // It cannot be answered with an error: the protocol says close.
                OPT_EXPORT_NAME => return self.close(r, Some(Event::Refused)),
                OPT_ABORT => {}
                _ => {
                    reply(
                        REP_ERR_TLS_REQD,
                        b"TLS is required: send NBD_OPT_STARTTLS first",
                    );
                    return self.read_next_option(r, None);
                }
            }
        }
        let export = self.export.name.as_str();
        let mut event = None;
        match option {
            OPT_EXPORT_NAME => {
                if data != export.as_bytes() {
                    // No error reply exists for this option: the protocol says close.
                    return self.close(r, None);
                }
                r.extend_from_slice(&self.export.size.to_be_bytes());
                // DF is not advertised here: the client never saw the GO flags. Structured
                // replies negotiated before stay on, as the protocol requires.
                r.extend_from_slice(&self.export.tflags(false).to_be_bytes());
                if !self.no_zeroes {
                    r.extend_from_slice(&[0u8; 124]);
                }
                return self.transmit(r);
            }
            OPT_ABORT => {
                reply(REP_ACK, &[]);
                return self.close(r, None);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    reply(REP_ERR_INVALID, b"LIST takes no data");
                } else {
                    let desc = self.export.description.as_deref().unwrap_or("");
                    reply(REP_SERVER, &encode_rep_server(export, desc));
                    reply(REP_ACK, &[]);
                }
            }
            OPT_INFO | OPT_GO => match decode_info_request(data) {
                Err(BadOption(why)) => {
                    event = Some(Event::ProtocolError);
                    reply(REP_ERR_INVALID, why.as_bytes());
                }
                Ok(req) if req.name != export => reply(REP_ERR_UNKNOWN, b"no such export"),
                Ok(req) => {
                    let tflags = self.export.tflags(self.neg.structured);
                    reply(REP_INFO, &encode_info_export(self.export.size, tflags));
                    if req.infos.contains(&INFO_NAME) {
                        reply(REP_INFO, &encode_info_string(INFO_NAME, export));
                    }
                    if let Some(desc) = self.export.description.as_deref() {
                        if req.infos.contains(&INFO_DESCRIPTION) {
                            reply(REP_INFO, &encode_info_string(INFO_DESCRIPTION, desc));
                        }
                    }
                    let max = MAX_REQUEST_LEN as u32;
                    let bs = encode_info_block_size(1, PREFERRED_BLOCK_SIZE, max);
                    reply(REP_INFO, &bs);
                    reply(REP_ACK, &[]);
                    if option == OPT_GO {
                        return self.transmit(r);
                    }
                }
            },
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    reply(REP_ERR_INVALID, b"takes no data");
                } else if self.neg.structured {
                    reply(REP_ERR_INVALID, b"already negotiated");
                } else {
                    self.neg.structured = true;
                    reply(REP_ACK, &[]);
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = option == OPT_SET_META_CONTEXT;
                if !self.neg.structured {
                    reply(REP_ERR_INVALID, b"negotiate structured replies first");
                } else {
                    match decode_meta_context_request(data) {
                        Err(BadOption(why)) => {
                            event = Some(Event::ProtocolError);
                            reply(REP_ERR_INVALID, why.as_bytes());
                        }
                        Ok(req) if req.name != export => reply(REP_ERR_UNKNOWN, b"no such export"),
                        Ok(req) => {
                            let wanted = (!set && req.queries.is_empty())
                                || req
                                    .queries
                                    .iter()
                                    .any(|q| q == "base:" || q == META_BASE_ALLOCATION);
                            if set {
                                self.neg.base_allocation = wanted;
                            }
                            if wanted {
                                let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                                let d = encode_rep_meta_context(id, META_BASE_ALLOCATION);
                                reply(REP_META_CONTEXT, &d);
                            }
                            reply(REP_ACK, &[]);
                        }
                    }
                }
            }
            OPT_STARTTLS if self.tls_active => reply(REP_ERR_INVALID, b"TLS is already running"),
            OPT_STARTTLS => reply(REP_ERR_UNSUP, b"TLS is not configured"),
            _ => reply(REP_ERR_UNSUP, b"unknown option"),
        }
        self.read_next_option(r, event)
    }

    fn transmit(&mut self, reply: Vec<u8>) -> Step {
        self.phase = Phase::Done;
        Step {
            reply,
            next: Next::Transmit(self.neg),
            event: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn export() -> ExportInfo {
        ExportInfo {
            name: "disk".into(),
            description: Some("a test disk".into()),
            size: 1 << 20,
            read_only: false,
            multi_conn: false,
            tls_required: false,
        }
    }

    fn tls_export() -> ExportInfo {
        ExportInfo {
            tls_required: true,
            ..export()
        }
    }

    /// A decoded option reply.
    #[derive(Debug, PartialEq, Eq)]
    struct Rep {
        option: u32,
        reply: u32,
        data: Vec<u8>,
    }

    /// Split reply bytes into option replies; panics on anything else.
    fn replies(mut b: &[u8]) -> Vec<Rep> {
        let mut out = Vec::new();
        while !b.is_empty() {
            let h: &[u8; OPTION_REPLY_HEADER_LEN] =
                b[..OPTION_REPLY_HEADER_LEN].try_into().unwrap();
            let h = decode_option_reply_header(h).expect("option reply magic");
            let end = OPTION_REPLY_HEADER_LEN + h.len as usize;
            out.push(Rep {
                option: h.option,
                reply: h.reply,
                data: b[OPTION_REPLY_HEADER_LEN..end].to_vec(),
            });
            b = &b[end..];
        }
        out
    }

    fn types(b: &[u8]) -> Vec<u32> {
        replies(b).iter().map(|r| r.reply).collect()
    }

    /// A machine past the greeting and client flags (`cflags`).
    fn started_with(e: ExportInfo, cflags: u32) -> Handshake {
        let (mut hs, step) = Handshake::new(e);
        assert_eq!(step.reply, encode_greeting(3));
        assert_eq!(step.next, Next::Read(4));
        let s = hs.input(&cflags.to_be_bytes());
        assert_eq!(
            s,
            Step {
                reply: vec![],
                next: Next::Read(16),
                event: None
            }
        );
        hs
    }

    fn started(e: ExportInfo) -> Handshake {
        started_with(e, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)
    }

    /// Feed one whole option (header, then data if any) and return the last step.
    fn send(hs: &mut Handshake, option: u32, data: &[u8]) -> Step {
        let h = encode_option_header(OptionHeader {
            option,
            len: data.len() as u32,
        });
        let s = hs.input(&h);
        if data.is_empty() {
            return s;
        }
        assert_eq!(
            s,
            Step {
                reply: vec![],
                next: Next::Read(data.len()),
                event: None
            }
        );
        hs.input(data)
    }

    fn info_req(name: &str, infos: &[u16]) -> Vec<u8> {
        encode_info_request(&InfoRequest {
            name: name.into(),
            infos: infos.to_vec(),
        })
    }

    fn meta_req(name: &str, queries: &[&str]) -> Vec<u8> {
        encode_meta_context_request(&MetaContextRequest {
            name: name.into(),
            queries: queries.iter().map(|q| q.to_string()).collect(),
        })
    }

    const READ_OPTION: Next = Next::Read(OPTION_HEADER_LEN);

    #[test]
    fn unknown_client_flags_close_without_a_reply() {
        let (mut hs, _) = Handshake::new(export());
        let s = hs.input(&(1u32 << 7).to_be_bytes());
        assert_eq!(s.next, Next::Close);
        assert_eq!(s.event, Some(Event::ProtocolError));
        assert!(s.reply.is_empty());
        // Nothing more is accepted.
        assert_eq!(hs.input(&[0; 16]).next, Next::Close);
    }

    #[test]
    fn export_name_with_and_without_zero_padding() {
        for (cflags, pad) in [
            (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0),
            (FLAG_C_FIXED_NEWSTYLE, 124),
        ] {
            let mut hs = started_with(export(), cflags);
            let s = send(&mut hs, OPT_EXPORT_NAME, b"disk");
            assert_eq!(s.next, Next::Transmit(Negotiated::default()));
            assert_eq!(s.reply.len(), 8 + 2 + pad);
            assert_eq!(&s.reply[..8], &(1u64 << 20).to_be_bytes());
            let tflags = u16::from_be_bytes([s.reply[8], s.reply[9]]);
            assert_eq!(tflags, export().tflags(false));
            assert!(s.reply[10..].iter().all(|&b| b == 0));
        }
    }

    #[test]
    fn export_name_for_another_export_closes_silently() {
        let mut hs = started(export());
        let s = send(&mut hs, OPT_EXPORT_NAME, b"other");
        assert_eq!((s.next, s.event, s.reply.len()), (Next::Close, None, 0));
    }

    #[test]
    fn export_name_keeps_structured_replies_but_not_df() {
        let mut hs = started(export());
        assert_eq!(
            types(&send(&mut hs, OPT_STRUCTURED_REPLY, &[]).reply),
            [REP_ACK]
        );
        let s = send(&mut hs, OPT_EXPORT_NAME, b"disk");
        assert_eq!(
            s.next,
            Next::Transmit(Negotiated {
                structured: true,
                base_allocation: false
            })
        );
        let tflags = u16::from_be_bytes([s.reply[8], s.reply[9]]);
        assert_eq!(tflags & TFLAG_SEND_DF, 0);
    }

    #[test]
    fn go_answers_info_then_ack_and_transmits() {
        let mut hs = started(export());
        let s = send(
            &mut hs,
            OPT_GO,
            &info_req("disk", &[INFO_NAME, INFO_DESCRIPTION]),
        );
        assert_eq!(s.next, Next::Transmit(Negotiated::default()));
        let r = replies(&s.reply);
        assert!(r.iter().all(|x| x.option == OPT_GO));
        assert_eq!(
            r.iter().map(|x| x.reply).collect::<Vec<_>>(),
            [REP_INFO, REP_INFO, REP_INFO, REP_INFO, REP_ACK]
        );
        assert_eq!(
            r[0].data,
            encode_info_export(1 << 20, export().tflags(false))
        );
        assert_eq!(r[1].data, encode_info_string(INFO_NAME, "disk"));
        assert_eq!(
            r[2].data,
            encode_info_string(INFO_DESCRIPTION, "a test disk")
        );
        assert_eq!(
            r[3].data,
            encode_info_block_size(1, PREFERRED_BLOCK_SIZE, MAX_REQUEST_LEN as u32)
        );
        assert!(r[4].data.is_empty());
    }

    #[test]
    fn go_without_requested_infos_sends_export_and_block_size() {
        let mut hs = started(export());
        let s = send(&mut hs, OPT_GO, &info_req("disk", &[]));
        assert_eq!(types(&s.reply), [REP_INFO, REP_INFO, REP_ACK]);
    }

    #[test]
    fn info_answers_like_go_but_stays_in_negotiation() {
        let mut hs = started(export());
        let s = send(&mut hs, OPT_INFO, &info_req("disk", &[INFO_NAME]));
        assert_eq!(s.next, READ_OPTION);
        let r = replies(&s.reply);
        assert!(r.iter().all(|x| x.option == OPT_INFO));
        assert_eq!(
            r.iter().map(|x| x.reply).collect::<Vec<_>>(),
            [REP_INFO, REP_INFO, REP_INFO, REP_ACK]
        );
        // GO still works afterwards.
        assert!(matches!(
            send(&mut hs, OPT_GO, &info_req("disk", &[])).next,
            Next::Transmit(_)
        ));
    }

    #[test]
    fn info_and_go_for_an_unknown_export_get_err_unknown() {
        for opt in [OPT_INFO, OPT_GO] {
            let mut hs = started(export());
            let s = send(&mut hs, opt, &info_req("nope", &[]));
            assert_eq!((s.next, s.event), (READ_OPTION, None));
            assert_eq!(types(&s.reply), [REP_ERR_UNKNOWN]);
        }
    }

    #[test]
    fn malformed_info_and_go_data_get_err_invalid() {
        let good = info_req("disk", &[INFO_NAME]);
        for opt in [OPT_INFO, OPT_GO] {
            let mut bad = vec![good[..good.len() - 1].to_vec(), good[..3].to_vec()];
            let mut extra = good.clone();
            extra.push(0);
            bad.push(extra);
            let mut huge = good.clone();
            huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
            bad.push(huge);
            bad.push(Vec::new());
            for data in bad {
                let mut hs = started(export());
                let s = send(&mut hs, opt, &data);
                assert_eq!(s.next, READ_OPTION, "{data:02x?}");
                assert_eq!(s.event, Some(Event::ProtocolError));
                assert_eq!(types(&s.reply), [REP_ERR_INVALID]);
            }
        }
    }

    #[test]
    fn go_flags_follow_the_export_and_structured_replies() {
        let ro = ExportInfo {
            read_only: true,
            multi_conn: true,
            ..export()
        };
        let mut hs = started(ro.clone());
        send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
        let s = send(&mut hs, OPT_GO, &info_req("disk", &[]));
        let r = replies(&s.reply);
        let tflags = u16::from_be_bytes([r[0].data[10], r[0].data[11]]);
        assert_eq!(
            tflags,
            TFLAG_HAS_FLAGS
                | TFLAG_SEND_FLUSH
                | TFLAG_SEND_FUA
                | TFLAG_READ_ONLY
                | TFLAG_CAN_MULTI_CONN
                | TFLAG_SEND_DF
        );
        assert_eq!(tflags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
    }

    #[test]
    fn list_names_the_export_and_refuses_data() {
        let mut hs = started(export());
        let s = send(&mut hs, OPT_LIST, &[]);
        assert_eq!(s.next, READ_OPTION);
        let r = replies(&s.reply);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].reply, REP_SERVER);
        assert_eq!(r[0].data, encode_rep_server("disk", "a test disk"));
        assert_eq!(r[1].reply, REP_ACK);
        let s = send(&mut hs, OPT_LIST, b"x");
        assert_eq!(
            (types(&s.reply), s.next),
            (vec![REP_ERR_INVALID], READ_OPTION)
        );
    }

    #[test]
    fn abort_is_acknowledged_then_closes() {
        let mut hs = started(export());
        let s = send(&mut hs, OPT_ABORT, &[]);
        assert_eq!((s.next, s.event), (Next::Close, None));
        assert_eq!(types(&s.reply), [REP_ACK]);
        // Also with TLS required and not started.
        let mut hs = started(tls_export());
        let s = send(&mut hs, OPT_ABORT, &[]);
        assert_eq!((s.next, types(&s.reply)), (Next::Close, vec![REP_ACK]));
    }

    #[test]
    fn structured_reply_once_and_without_data() {
        let mut hs = started(export());
        assert_eq!(
            types(&send(&mut hs, OPT_STRUCTURED_REPLY, b"x").reply),
            [REP_ERR_INVALID]
        );
        assert_eq!(
            types(&send(&mut hs, OPT_STRUCTURED_REPLY, &[]).reply),
            [REP_ACK]
        );
        assert_eq!(
            types(&send(&mut hs, OPT_STRUCTURED_REPLY, &[]).reply),
            [REP_ERR_INVALID]
        );
        let s = send(&mut hs, OPT_GO, &info_req("disk", &[]));
        assert_eq!(
            s.next,
            Next::Transmit(Negotiated {
                structured: true,
                base_allocation: false
            })
        );
        // With structured replies the GO flags offer DF.
        let r = replies(&s.reply);
        let tflags = u16::from_be_bytes([r[0].data[10], r[0].data[11]]);
        assert_ne!(tflags & TFLAG_SEND_DF, 0);
    }

    #[test]
    fn meta_contexts_need_structured_replies() {
        for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            let mut hs = started(export());
            let s = send(&mut hs, opt, &meta_req("disk", &["base:allocation"]));
            assert_eq!(
                (types(&s.reply), s.next),
                (vec![REP_ERR_INVALID], READ_OPTION)
            );
        }
    }

    #[test]
    fn list_meta_context_offers_base_allocation() {
        let mut hs = started(export());
        send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
        for queries in [
            &[][..],
            &["base:"][..],
            &["base:allocation", "qemu:dirty"][..],
        ] {
            let s = send(&mut hs, OPT_LIST_META_CONTEXT, &meta_req("disk", queries));
            let r = replies(&s.reply);
            assert_eq!(r.len(), 2, "{queries:?}");
            assert_eq!(r[0].reply, REP_META_CONTEXT);
            // LIST hands out id 0 (reserved).
            assert_eq!(r[0].data, encode_rep_meta_context(0, META_BASE_ALLOCATION));
            assert_eq!(r[1].reply, REP_ACK);
        }
        // Unknown namespaces are ignored: just the ACK.
        let s = send(
            &mut hs,
            OPT_LIST_META_CONTEXT,
            &meta_req("disk", &["qemu:dirty"]),
        );
        assert_eq!(types(&s.reply), [REP_ACK]);
        let s = send(&mut hs, OPT_LIST_META_CONTEXT, &meta_req("other", &[]));
        assert_eq!(types(&s.reply), [REP_ERR_UNKNOWN]);
        // LIST selects nothing.
        let s = send(&mut hs, OPT_GO, &info_req("disk", &[]));
        assert_eq!(
            s.next,
            Next::Transmit(Negotiated {
                structured: true,
                base_allocation: false
            })
        );
    }

    #[test]
    fn set_meta_context_selects_and_the_last_one_wins() {
        let mut hs = started(export());
        send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
        let s = send(
            &mut hs,
            OPT_SET_META_CONTEXT,
            &meta_req("disk", &["base:allocation"]),
        );
        let r = replies(&s.reply);
        assert_eq!(r[0].reply, REP_META_CONTEXT);
        assert_eq!(
            r[0].data,
            encode_rep_meta_context(META_BASE_ALLOCATION_ID, META_BASE_ALLOCATION)
        );
        assert_eq!(r[1].reply, REP_ACK);
        // An empty SET selects nothing, replacing the earlier choice.
        let s = send(&mut hs, OPT_SET_META_CONTEXT, &meta_req("disk", &[]));
        assert_eq!(types(&s.reply), [REP_ACK]);
        let s = send(
            &mut hs,
            OPT_SET_META_CONTEXT,
            &meta_req("disk", &["base:allocation"]),
        );
        assert_eq!(types(&s.reply), [REP_META_CONTEXT, REP_ACK]);
        let s = send(&mut hs, OPT_GO, &info_req("disk", &[]));
        assert_eq!(
            s.next,
            Next::Transmit(Negotiated {
                structured: true,
                base_allocation: true
            })
        );
    }

    #[test]
    fn malformed_meta_context_data_get_err_invalid() {
        let good = meta_req("disk", &["base:allocation"]);
        let mut huge_count = vec![0, 0, 0, 4, b'd', b'i', b's', b'k'];
        huge_count.extend_from_slice(&u32::MAX.to_be_bytes());
        let bad_utf8 = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0xff];
        let mut trailing = good.clone();
        trailing.push(7);
        for opt in [OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT] {
            for data in [
                good[..good.len() - 1].to_vec(),
                good[..6].to_vec(),
                huge_count.clone(),
                bad_utf8.clone(),
                trailing.clone(),
            ] {
                let mut hs = started(export());
                send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
                let s = send(&mut hs, opt, &data);
                assert_eq!(s.event, Some(Event::ProtocolError), "{data:02x?}");
                assert_eq!(
                    (types(&s.reply), s.next),
                    (vec![REP_ERR_INVALID], READ_OPTION)
                );
            }
        }
    }

    #[test]
    fn starttls_without_tls_configured_is_unsupported() {
        let mut hs = started(export());
        let s = send(&mut hs, OPT_STARTTLS, &[]);
        assert_eq!(
            (types(&s.reply), s.next),
            (vec![REP_ERR_UNSUP], READ_OPTION)
        );
    }

    #[test]
    fn unknown_options_are_unsupported_and_skipped() {
        let mut hs = started(export());
        for (opt, data) in [
            (4u32, &b""[..]),
            (11, b"some data"),
            (0xdead_beef, &[0u8; 300][..]),
        ] {
            let s = send(&mut hs, opt, data);
            let r = replies(&s.reply);
            assert_eq!(r.len(), 1);
            assert_eq!((r[0].option, r[0].reply), (opt, REP_ERR_UNSUP));
            assert_eq!((s.next, s.event), (READ_OPTION, None));
        }
        assert!(matches!(
            send(&mut hs, OPT_GO, &info_req("disk", &[])).next,
            Next::Transmit(_)
        ));
    }

    #[test]
    fn a_bad_option_magic_closes() {
        let mut hs = started(export());
        let mut h = encode_option_header(OptionHeader {
            option: OPT_GO,
            len: 0,
        });
        h[0] ^= 0xff;
        let s = hs.input(&h);
        assert_eq!((s.next, s.event), (Next::Close, Some(Event::ProtocolError)));
        assert!(s.reply.is_empty());
    }

    #[test]
    fn oversized_option_lengths_are_refused_before_reading() {
        for len in [MAX_OPTION_LEN as u32 + 1, u32::MAX] {
            let mut hs = started(export());
            let h = encode_option_header(OptionHeader {
                option: OPT_GO,
                len,
            });
            let s = hs.input(&h);
            assert_eq!((s.next, s.event), (Next::Close, Some(Event::ProtocolError)));
            let r = replies(&s.reply);
            assert_eq!((r[0].option, r[0].reply), (OPT_GO, REP_ERR_TOO_BIG));
        }
        // The largest allowed length is read.
        let mut hs = started(export());
        let h = encode_option_header(OptionHeader {
            option: 99,
            len: MAX_OPTION_LEN as u32,
        });
        assert_eq!(hs.input(&h).next, Next::Read(MAX_OPTION_LEN));
    }

    #[test]
    fn input_of_the_wrong_length_closes() {
        let (mut hs, _) = Handshake::new(export());
        assert_eq!(hs.input(&[0, 0, 0]).next, Next::Close);
        let mut hs = started(export());
        assert_eq!(hs.input(&[0; 15]).next, Next::Close);
        let mut hs = started(export());
        let h = encode_option_header(OptionHeader {
            option: OPT_LIST,
            len: 8,
        });
        assert_eq!(hs.input(&h).next, Next::Read(8));
        assert_eq!(hs.input(&[0; 7]).next, Next::Close);
    }

    #[test]
    fn options_are_limited() {
        let mut hs = started(export());
        for i in 0..MAX_OPTIONS - 1 {
            let s = send(&mut hs, OPT_LIST, &[]);
            assert_eq!(s.next, READ_OPTION, "option {i}");
        }
        // The last allowed option is still answered, then the connection closes.
        let s = send(&mut hs, OPT_LIST, &[]);
        assert_eq!(types(&s.reply), [REP_SERVER, REP_ACK]);
        assert_eq!((s.next, s.event), (Next::Close, Some(Event::ProtocolError)));
    }

    #[test]
    fn tls_required_refuses_everything_but_starttls_and_abort() {
        let mut hs = started(tls_export());
        for (opt, data) in [
            (OPT_LIST, Vec::new()),
            (OPT_INFO, info_req("disk", &[])),
            (OPT_GO, info_req("disk", &[])),
            (OPT_STRUCTURED_REPLY, Vec::new()),
            (OPT_SET_META_CONTEXT, meta_req("disk", &[])),
            (77, Vec::new()),
        ] {
            let s = send(&mut hs, opt, &data);
            assert_eq!(
                (types(&s.reply), s.next),
                (vec![REP_ERR_TLS_REQD], READ_OPTION),
                "{opt}"
            );
        }
        let s = send(&mut hs, OPT_STARTTLS, b"x");
        assert_eq!(
            (types(&s.reply), s.next),
            (vec![REP_ERR_INVALID], READ_OPTION)
        );
        // EXPORT_NAME in plaintext: refused by closing.
        let mut hs2 = started(tls_export());
        let s = send(&mut hs2, OPT_EXPORT_NAME, b"disk");
        assert_eq!(
            (s.next, s.event, s.reply.len()),
            (Next::Close, Some(Event::Refused), 0)
        );
    }

    #[test]
    fn starttls_restarts_negotiation_inside_tls() {
        let mut hs = started(tls_export());
        let s = send(&mut hs, OPT_STARTTLS, &[]);
        assert_eq!((types(&s.reply), s.next), (vec![REP_ACK], Next::StartTls));
        // Nothing is read until the driver reports the TLS handshake.
        assert_eq!(hs.input(&[0; 16]).next, Next::Close);

        let mut hs = started(tls_export());
        send(&mut hs, OPT_STARTTLS, &[]);
        assert_eq!(hs.tls_started().next, READ_OPTION);
        let s = send(&mut hs, OPT_STARTTLS, &[]);
        assert_eq!(types(&s.reply), [REP_ERR_INVALID], "TLS already running");
        send(&mut hs, OPT_STRUCTURED_REPLY, &[]);
        let s = send(&mut hs, OPT_GO, &info_req("disk", &[]));
        assert!(matches!(
            s.next,
            Next::Transmit(Negotiated {
                structured: true,
                ..
            })
        ));
    }

    #[test]
    fn nothing_negotiated_before_starttls_survives_it() {
        // A plaintext STRUCTURED_REPLY is refused under FORCEDTLS anyway; the reset still
        // matters for the option budget and must not carry state across.
        let mut hs = started(tls_export());
        send(&mut hs, OPT_STARTTLS, &[]);
        hs.tls_started();
        let s = send(&mut hs, OPT_GO, &info_req("disk", &[]));
        assert_eq!(s.next, Next::Transmit(Negotiated::default()));
        // tls_started out of turn is a driver bug: close.
        let mut hs = started(tls_export());
        assert_eq!(hs.tls_started().next, Next::Close);
    }

    #[test]
    fn the_option_budget_spans_both_sides_of_starttls() {
        let mut hs = started(tls_export());
        for _ in 0..MAX_OPTIONS - 1 {
            send(&mut hs, OPT_LIST, &[]);
        }
        let s = send(&mut hs, OPT_STARTTLS, &[]);
        assert_eq!(s.next, Next::StartTls);
        let s = hs.tls_started();
        assert_eq!((s.next, s.event), (Next::Close, Some(Event::ProtocolError)));
    }

    #[test]
    fn after_transmit_or_close_no_input_is_taken() {
        let mut hs = started(export());
        assert!(matches!(
            send(&mut hs, OPT_GO, &info_req("disk", &[])).next,
            Next::Transmit(_)
        ));
        assert_eq!(hs.input(&[0; 16]).next, Next::Close);
    }
}
