//! A small synchronous NBD client (std sockets) for tests and the harness: fixed newstyle,
//! NBD_OPT_GO, structured replies, `base:allocation`, one request in flight at a time.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::limits::MAX_REPLY_LEN;
use crate::proto::*;

/// What went wrong on the client side.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("connection failed")]
    Io(#[from] io::Error),
    #[error("server broke the protocol: {0}")]
    Protocol(String),
    #[error("server refused option {option} with reply {reply:#x}: {message}")]
    OptionRefused {
        option: u32,
        reply: u32,
        message: String,
    },
    #[error("server answered errno {errno}: {message}")]
    Server { errno: u32, message: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn protocol(msg: impl Into<String>) -> Error {
    Error::Protocol(msg.into())
}

/// What to negotiate.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub export_name: String,
    /// Ask for NBD_OPT_STRUCTURED_REPLY.
    pub structured_replies: bool,
    /// Ask for the `base:allocation` context (needs structured replies).
    pub base_allocation: bool,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            export_name: String::new(),
            structured_replies: true,
            base_allocation: true,
        }
    }
}

/// One export as NBD_OPT_LIST reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportEntry {
    pub name: String,
    pub description: String,
}

/// The result of one request, error included (see [`Client::request`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reply {
    /// 0 on success, else the NBD errno.
    pub errno: u32,
    pub message: String,
    /// READ data (holes filled with zeros).
    pub data: Vec<u8>,
    /// BLOCK_STATUS descriptors (length, flags).
    pub extents: Vec<(u32, u32)>,
    /// True when the reply came as structured chunks.
    pub structured: bool,
}

trait Stream: Read + Write + Send {}
impl<T: Read + Write + Send> Stream for T {}

/// A negotiated connection in the transmission phase.
pub struct Client {
    s: Box<dyn Stream>,
    size: u64,
    tflags: u16,
    structured: bool,
    base_allocation: Option<u32>,
    cookie: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("size", &self.size)
            .field("tflags", &self.tflags)
            .field("structured", &self.structured)
            .finish()
    }
}

fn read_array<const N: usize>(s: &mut dyn Stream) -> io::Result<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b)?;
    Ok(b)
}

fn read_vec(s: &mut dyn Stream, len: usize) -> Result<Vec<u8>> {
    if len > MAX_REPLY_LEN {
        return Err(protocol(format!("reply of {len} bytes is too long")));
    }
    let mut b = vec![0u8; len];
    s.read_exact(&mut b)?;
    Ok(b)
}

/// Greeting and client flags; returns the server's handshake flags.
fn hello(s: &mut dyn Stream) -> Result<u16> {
    let g = read_array::<GREETING_LEN>(s)?;
    let hflags = decode_greeting(&g).ok_or_else(|| protocol("bad greeting magic"))?;
    if hflags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err(protocol("server is not fixed-newstyle"));
    }
    let mut cflags = FLAG_C_FIXED_NEWSTYLE;
    if hflags & FLAG_NO_ZEROES != 0 {
        cflags |= FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes())?;
    Ok(hflags)
}

fn send_option(s: &mut dyn Stream, option: u32, data: &[u8]) -> Result<()> {
    let len = u32::try_from(data.len()).map_err(|_| protocol("option data too long"))?;
    s.write_all(&encode_option_header(OptionHeader { option, len }))?;
    s.write_all(data)?;
    s.flush()?;
    Ok(())
}

/// One option reply: (reply type, data). Error replies become [`Error::OptionRefused`].
fn option_reply(s: &mut dyn Stream, option: u32) -> Result<(u32, Vec<u8>)> {
    let h = read_array::<OPTION_REPLY_HEADER_LEN>(s)?;
    let h = decode_option_reply_header(&h).ok_or_else(|| protocol("bad option reply magic"))?;
    let data = read_vec(s, h.len as usize)?;
    if h.option != option {
        return Err(protocol("option reply for another option"));
    }
    if h.reply & (1 << 31) != 0 {
        return Err(Error::OptionRefused {
            option,
            reply: h.reply,
            message: String::from_utf8_lossy(&data).into_owned(),
        });
    }
    Ok((h.reply, data))
}

fn connect_stream(s: impl Read + Write + Send + 'static) -> Box<dyn Stream> {
    Box::new(s)
}

/// NBD_OPT_LIST over a Unix socket: the server's exports.
pub fn list_exports_unix(path: impl AsRef<Path>) -> Result<Vec<ExportEntry>> {
    let mut s = connect_stream(UnixStream::connect(path)?);
    let s = &mut *s;
    hello(s)?;
    send_option(s, OPT_LIST, &[])?;
    let mut out = Vec::new();
    loop {
        let (rep, data) = option_reply(s, OPT_LIST)?;
        match rep {
            REP_ACK => break,
            REP_SERVER => {
                let n = get_u32(&data, 0).ok_or_else(|| protocol("short REP_SERVER"))? as usize;
                let name = data
                    .get(4..4 + n)
                    .ok_or_else(|| protocol("REP_SERVER name runs past its data"))?;
                out.push(ExportEntry {
                    name: String::from_utf8_lossy(name).into_owned(),
                    description: String::from_utf8_lossy(&data[4 + n..]).into_owned(),
                });
            }
            _ => return Err(protocol("unexpected reply to LIST")),
        }
    }
    let _ = send_option(s, OPT_ABORT, &[]);
    Ok(out)
}

impl Client {
    pub fn connect_unix(path: impl AsRef<Path>, opts: &ConnectOptions) -> Result<Client> {
        Client::handshake(connect_stream(UnixStream::connect(path)?), opts)
    }

    pub fn connect_tcp(addr: SocketAddr, opts: &ConnectOptions) -> Result<Client> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Client::handshake(connect_stream(s), opts)
    }

    /// Negotiate over any connected byte stream.
    pub fn from_stream(
        s: impl Read + Write + Send + 'static,
        opts: &ConnectOptions,
    ) -> Result<Client> {
        Client::handshake(connect_stream(s), opts)
    }

    fn handshake(mut s: Box<dyn Stream>, opts: &ConnectOptions) -> Result<Client> {
        let st = &mut *s;
        hello(st)?;
        let mut structured = false;
        let mut base_allocation = None;
        if opts.structured_replies {
            send_option(st, OPT_STRUCTURED_REPLY, &[])?;
            match option_reply(st, OPT_STRUCTURED_REPLY) {
                Ok((REP_ACK, _)) => structured = true,
                Ok(_) => return Err(protocol("unexpected reply to STRUCTURED_REPLY")),
                Err(Error::OptionRefused { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        if structured && opts.base_allocation {
            let req = MetaContextRequest {
                name: opts.export_name.clone(),
                queries: vec![META_BASE_ALLOCATION.into()],
            };
            send_option(st, OPT_SET_META_CONTEXT, &encode_meta_context_request(&req))?;
            loop {
                let (rep, data) = option_reply(st, OPT_SET_META_CONTEXT)?;
                match rep {
                    REP_ACK => break,
                    REP_META_CONTEXT => {
                        let id = get_u32(&data, 0).ok_or_else(|| protocol("short context"))?;
                        if &data[4..] == META_BASE_ALLOCATION.as_bytes() {
                            base_allocation = Some(id);
                        }
                    }
                    _ => return Err(protocol("unexpected reply to SET_META_CONTEXT")),
                }
            }
        }
        let req = InfoRequest {
            name: opts.export_name.clone(),
            infos: vec![INFO_BLOCK_SIZE],
        };
        send_option(st, OPT_GO, &encode_info_request(&req))?;
        let mut export = None;
        loop {
            let (rep, data) = option_reply(st, OPT_GO)?;
            match rep {
                REP_ACK => break,
                REP_INFO => {
                    if get_u16(&data, 0) == Some(INFO_EXPORT) {
                        let size = get_u64(&data, 2).ok_or_else(|| protocol("short INFO"))?;
                        let fl = get_u16(&data, 10).ok_or_else(|| protocol("short INFO"))?;
                        export = Some((size, fl));
                    }
                }
                _ => return Err(protocol("unexpected reply to GO")),
            }
        }
        let (size, tflags) = export.ok_or_else(|| protocol("GO without NBD_INFO_EXPORT"))?;
        Ok(Client {
            s,
            size,
            tflags,
            structured,
            base_allocation,
            cookie: 0,
        })
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags the server sent.
    pub fn transmission_flags(&self) -> u16 {
        self.tflags
    }

    pub fn is_read_only(&self) -> bool {
        self.tflags & TFLAG_READ_ONLY != 0
    }

    pub fn structured_replies(&self) -> bool {
        self.structured
    }

    /// Context id of `base:allocation`, when negotiated.
    pub fn base_allocation_id(&self) -> Option<u32> {
        self.base_allocation
    }

    /// Send any request (even one the server will reject) and collect its whole reply.
    /// `len` is sent as is; `payload` follows the header verbatim.
    pub fn request(
        &mut self,
        cmd: u16,
        flags: u16,
        off: u64,
        len: u32,
        payload: &[u8],
    ) -> Result<Reply> {
        self.cookie += 1;
        let cookie = self.cookie;
        let req = Request {
            flags,
            cmd,
            cookie,
            off,
            len,
        };
        let mut msg = encode_request(&req).to_vec();
        msg.extend_from_slice(payload);
        self.s.write_all(&msg)?;
        self.s.flush()?;
        self.read_reply(cookie, cmd, off, len)
    }

    fn read_reply(&mut self, cookie: u64, cmd: u16, off: u64, len: u32) -> Result<Reply> {
        let s = &mut *self.s;
        let mut reply = Reply::default();
        loop {
            let start = read_array::<16>(s)?;
            match decode_reply_start(&start).ok_or_else(|| protocol("bad reply magic"))? {
                ReplyHeader::Simple { error, cookie: c } => {
                    if c != cookie {
                        return Err(protocol("reply for another cookie"));
                    }
                    reply.errno = error;
                    if error == 0 && cmd == CMD_READ {
                        reply.data = read_vec(s, len as usize)?;
                    }
                    return Ok(reply);
                }
                ReplyHeader::Chunk {
                    flags,
                    kind,
                    cookie: c,
                } => {
                    reply.structured = true;
                    if c != cookie {
                        return Err(protocol("chunk for another cookie"));
                    }
                    let n = u32::from_be_bytes(read_array::<4>(s)?) as usize;
                    let p = read_vec(s, n)?;
                    match kind {
                        REPLY_TYPE_NONE => {}
                        REPLY_TYPE_OFFSET_DATA | REPLY_TYPE_OFFSET_HOLE => {
                            if reply.data.len() != len as usize {
                                reply.data = vec![0; read_len(len)?];
                            }
                            let at = get_u64(&p, 0).ok_or_else(|| protocol("short chunk"))?;
                            let rel = at
                                .checked_sub(off)
                                .ok_or_else(|| protocol("chunk before the request"))?;
                            let n = if kind == REPLY_TYPE_OFFSET_DATA {
                                p.len() - 8
                            } else {
                                get_u32(&p, 8).ok_or_else(|| protocol("short hole"))? as usize
                            };
                            let end = rel
                                .checked_add(n as u64)
                                .filter(|&e| e <= len as u64)
                                .ok_or_else(|| protocol("chunk beyond the request"))?;
                            if kind == REPLY_TYPE_OFFSET_DATA {
                                reply.data[rel as usize..end as usize].copy_from_slice(&p[8..]);
                            }
                        }
                        REPLY_TYPE_BLOCK_STATUS => {
                            let (_ctx, d) = decode_block_status_payload(&p)
                                .ok_or_else(|| protocol("bad block status chunk"))?;
                            reply.extents = d;
                        }
                        k if k & (1 << 15) != 0 => {
                            let (e, m) = decode_error_payload(&p)
                                .ok_or_else(|| protocol("bad error chunk"))?;
                            reply.errno = e;
                            reply.message = m;
                        }
                        _ => return Err(protocol(format!("unknown chunk type {kind}"))),
                    }
                    if flags & REPLY_FLAG_DONE != 0 {
                        if reply.errno == 0 && cmd == CMD_READ && reply.data.len() != len as usize {
                            reply.data = vec![0; read_len(len)?];
                        }
                        if reply.errno != 0 {
                            reply.data.clear();
                        }
                        return Ok(reply);
                    }
                }
            }
        }
    }

    fn ok(&mut self, cmd: u16, flags: u16, off: u64, len: u32, payload: &[u8]) -> Result<Reply> {
        let r = self.request(cmd, flags, off, len, payload)?;
        if r.errno != 0 {
            return Err(Error::Server {
                errno: r.errno,
                message: r.message,
            });
        }
        Ok(r)
    }

    fn len32(n: u64) -> Result<u32> {
        u32::try_from(n).map_err(|_| protocol("request longer than 4 GiB"))
    }

    /// Fill `buf` from `off`.
    pub fn read(&mut self, off: u64, buf: &mut [u8]) -> Result<()> {
        let len = Client::len32(buf.len() as u64)?;
        let r = self.ok(CMD_READ, 0, off, len, &[])?;
        buf.copy_from_slice(&r.data);
        Ok(())
    }

    pub fn write(&mut self, off: u64, data: &[u8], fua: bool) -> Result<()> {
        let len = Client::len32(data.len() as u64)?;
        let f = if fua { CMD_FLAG_FUA } else { 0 };
        self.ok(CMD_WRITE, f, off, len, data).map(|_| ())
    }

    pub fn flush(&mut self) -> Result<()> {
        self.ok(CMD_FLUSH, 0, 0, 0, &[]).map(|_| ())
    }

    pub fn trim(&mut self, off: u64, len: u64, fua: bool) -> Result<()> {
        let f = if fua { CMD_FLAG_FUA } else { 0 };
        self.ok(CMD_TRIM, f, off, Client::len32(len)?, &[])
            .map(|_| ())
    }

    pub fn write_zeroes(&mut self, off: u64, len: u64, no_hole: bool, fua: bool) -> Result<()> {
        let mut f = if fua { CMD_FLAG_FUA } else { 0 };
        if no_hole {
            f |= CMD_FLAG_NO_HOLE;
        }
        self.ok(CMD_WRITE_ZEROES, f, off, Client::len32(len)?, &[])
            .map(|_| ())
    }

    /// `base:allocation` descriptors (length, flags) from `off`; may cover less than `len`.
    pub fn block_status(&mut self, off: u64, len: u64, req_one: bool) -> Result<Vec<(u32, u32)>> {
        let f = if req_one { CMD_FLAG_REQ_ONE } else { 0 };
        Ok(self
            .ok(CMD_BLOCK_STATUS, f, off, Client::len32(len)?, &[])?
            .extents)
    }

    /// NBD_CMD_DISC, then close.
    pub fn disconnect(mut self) -> Result<()> {
        self.cookie += 1;
        let req = Request {
            flags: 0,
            cmd: CMD_DISC,
            cookie: self.cookie,
            off: 0,
            len: 0,
        };
        self.s.write_all(&encode_request(&req))?;
        self.s.flush()?;
        // Wait for the server to close its side, so its work (flush) is done.
        let mut sink = [0u8; 64];
        while matches!(self.s.read(&mut sink), Ok(n) if n > 0) {}
        Ok(())
    }
}

fn read_len(len: u32) -> Result<usize> {
    if len as usize > MAX_REPLY_LEN {
        return Err(protocol("read longer than the client accepts"));
    }
    Ok(len as usize)
}
