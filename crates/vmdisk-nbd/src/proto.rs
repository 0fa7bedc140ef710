//! NBD wire constants and pure encoders/decoders (no IO): every message the server and the
//! client exchange is built or parsed here from plain byte slices, so the layouts are unit
//! tested without sockets. All integers are big-endian.

/// "NBDMAGIC": first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle marker after [`NBD_MAGIC`], and prefix of every client option.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Prefix of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Prefix of every transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Prefix of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Prefix of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

// Handshake flags (server, 16 bits) and client flags (32 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
/// The option needs TLS first (a server requiring TLS, before NBD_OPT_STARTTLS).
pub const REP_ERR_TLS_REQD: u32 = (1 << 31) + 5;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;
pub const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;

// NBD_INFO_* types inside NBD_REP_INFO.
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags (16 bits).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_SEND_DF: u16 = 1 << 7;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;

// Structured reply flags and chunk types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

// base:allocation status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// The one metadata context we serve.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context id we hand out for `base:allocation` on SET_META_CONTEXT.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

// Errors (errno values fixed by the protocol, not by the host).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

/// Size of the server's greeting: NBDMAGIC, IHAVEOPT, handshake flags.
pub const GREETING_LEN: usize = 18;
/// Size of an option header: IHAVEOPT, option, length.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of an option reply header: magic, option, type, length.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;
/// Size of a request header: magic, flags, type, cookie, offset, length.
pub const REQUEST_LEN: usize = 28;
/// Size of a simple reply header: magic, error, cookie.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header: magic, flags, type, cookie, length.
pub const CHUNK_HEADER_LEN: usize = 20;
/// Longest string (export name, query, message) the protocol allows.
pub use crate::limits::MAX_STRING_LEN;

fn be16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn be64(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
}

/// The greeting the server sends first.
pub fn encode_greeting(handshake_flags: u16) -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[16..18].copy_from_slice(&handshake_flags.to_be_bytes());
    b
}

/// Handshake flags from a greeting, or `None` when the magic is wrong.
pub fn decode_greeting(b: &[u8; GREETING_LEN]) -> Option<u16> {
    if be64(b, 0)? != NBD_MAGIC || be64(b, 8)? != IHAVEOPT {
        return None;
    }
    be16(b, 16)
}

/// A client option header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

pub fn encode_option_header(h: OptionHeader) -> [u8; OPTION_HEADER_LEN] {
    let mut b = [0u8; OPTION_HEADER_LEN];
    b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
    b[8..12].copy_from_slice(&h.option.to_be_bytes());
    b[12..16].copy_from_slice(&h.len.to_be_bytes());
    b
}

/// `None` when the magic is not IHAVEOPT.
pub fn decode_option_header(b: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
    if be64(b, 0)? != IHAVEOPT {
        return None;
    }
    Some(OptionHeader {
        option: be32(b, 8)?,
        len: be32(b, 12)?,
    })
}

/// An option reply header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionReplyHeader {
    pub option: u32,
    pub reply: u32,
    pub len: u32,
}

/// One whole option reply: header and data.
pub fn encode_option_reply(option: u32, reply: u32, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(OPTION_REPLY_HEADER_LEN + data.len());
    b.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b.extend_from_slice(&option.to_be_bytes());
    b.extend_from_slice(&reply.to_be_bytes());
    // Option reply data is built by this crate from bounded strings and fixed records.
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    b
}

pub fn decode_option_reply_header(b: &[u8; OPTION_REPLY_HEADER_LEN]) -> Option<OptionReplyHeader> {
    if be64(b, 0)? != OPT_REPLY_MAGIC {
        return None;
    }
    Some(OptionReplyHeader {
        option: be32(b, 8)?,
        reply: be32(b, 12)?,
        len: be32(b, 16)?,
    })
}

/// Data of NBD_INFO_EXPORT: type, size, transmission flags.
pub fn encode_info_export(size: u64, tflags: u16) -> Vec<u8> {
    let mut b = Vec::with_capacity(12);
    b.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&tflags.to_be_bytes());
    b
}

/// Data of NBD_INFO_BLOCK_SIZE: type, minimum, preferred, maximum.
pub fn encode_info_block_size(min: u32, preferred: u32, max: u32) -> Vec<u8> {
    let mut b = Vec::with_capacity(14);
    b.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b.extend_from_slice(&min.to_be_bytes());
    b.extend_from_slice(&preferred.to_be_bytes());
    b.extend_from_slice(&max.to_be_bytes());
    b
}

/// Data of NBD_INFO_NAME / NBD_INFO_DESCRIPTION: type then the string.
pub fn encode_info_string(info: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Data of NBD_REP_SERVER: name length, name, description.
pub fn encode_rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// Data of NBD_REP_META_CONTEXT: context id, name.
pub fn encode_rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

/// Why an option's data could not be parsed (answered with NBD_REP_ERR_INVALID).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadOption(pub &'static str);

/// Take a length-prefixed (u32) UTF-8 string from `b` at `*at`.
fn take_string32(b: &[u8], at: &mut usize) -> Result<String, BadOption> {
    let n = be32(b, *at).ok_or(BadOption("truncated string length"))? as usize;
    *at += 4;
    if n > MAX_STRING_LEN {
        return Err(BadOption("string longer than 4096 bytes"));
    }
    let s = b
        .get(*at..*at + n)
        .ok_or(BadOption("string runs past the option data"))?;
    *at += n;
    String::from_utf8(s.to_vec()).map_err(|_| BadOption("string is not UTF-8"))
}

/// NBD_OPT_INFO / NBD_OPT_GO data: export name and requested NBD_INFO_* types.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub infos: Vec<u16>,
}

pub fn encode_info_request(r: &InfoRequest) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(r.name.len() as u32).to_be_bytes());
    b.extend_from_slice(r.name.as_bytes());
    b.extend_from_slice(&(r.infos.len() as u16).to_be_bytes());
    for i in &r.infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

pub fn decode_info_request(b: &[u8]) -> Result<InfoRequest, BadOption> {
    let mut at = 0;
    let name = take_string32(b, &mut at)?;
    let n = be16(b, at).ok_or(BadOption("truncated info count"))? as usize;
    at += 2;
    if b.len() != at + 2 * n {
        return Err(BadOption("info request count does not match the length"));
    }
    let infos = (0..n).filter_map(|i| be16(b, at + 2 * i)).collect();
    Ok(InfoRequest { name, infos })
}

/// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data: export name and queries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub name: String,
    pub queries: Vec<String>,
}

pub fn encode_meta_context_request(r: &MetaContextRequest) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(r.name.len() as u32).to_be_bytes());
    b.extend_from_slice(r.name.as_bytes());
    b.extend_from_slice(&(r.queries.len() as u32).to_be_bytes());
    for q in &r.queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

pub fn decode_meta_context_request(b: &[u8]) -> Result<MetaContextRequest, BadOption> {
    let mut at = 0;
    let name = take_string32(b, &mut at)?;
    let n = be32(b, at).ok_or(BadOption("truncated query count"))? as usize;
    at += 4;
    // Each query needs at least its 4-byte length: bound the count before allocating.
    if n > (b.len() - at) / 4 {
        return Err(BadOption("query count larger than the option data"));
    }
    let mut queries = Vec::with_capacity(n);
    for _ in 0..n {
        queries.push(take_string32(b, &mut at)?);
    }
    if at != b.len() {
        return Err(BadOption("trailing bytes after the queries"));
    }
    Ok(MetaContextRequest { name, queries })
}

/// A transmission request header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub cmd: u16,
    pub cookie: u64,
    pub off: u64,
    pub len: u32,
}

pub fn encode_request(r: &Request) -> [u8; REQUEST_LEN] {
    let mut b = [0u8; REQUEST_LEN];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&r.flags.to_be_bytes());
    b[6..8].copy_from_slice(&r.cmd.to_be_bytes());
    b[8..16].copy_from_slice(&r.cookie.to_be_bytes());
    b[16..24].copy_from_slice(&r.off.to_be_bytes());
    b[24..28].copy_from_slice(&r.len.to_be_bytes());
    b
}

/// `None` when the magic is wrong (the stream cannot be resynchronised).
pub fn decode_request(b: &[u8; REQUEST_LEN]) -> Option<Request> {
    if be32(b, 0)? != REQUEST_MAGIC {
        return None;
    }
    Some(Request {
        flags: be16(b, 4)?,
        cmd: be16(b, 6)?,
        cookie: be64(b, 8)?,
        off: be64(b, 16)?,
        len: be32(b, 24)?,
    })
}

pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// A structured reply chunk header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub flags: u16,
    pub kind: u16,
    pub cookie: u64,
    pub len: u32,
}

pub fn encode_chunk_header(h: &ChunkHeader) -> [u8; CHUNK_HEADER_LEN] {
    let mut b = [0u8; CHUNK_HEADER_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&h.flags.to_be_bytes());
    b[6..8].copy_from_slice(&h.kind.to_be_bytes());
    b[8..16].copy_from_slice(&h.cookie.to_be_bytes());
    b[16..20].copy_from_slice(&h.len.to_be_bytes());
    b
}

/// A reply header as the client sees it: simple or the header of one structured chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    /// Magic + error + cookie (16 bytes).
    Simple { error: u32, cookie: u64 },
    /// A structured chunk; the remaining 4 bytes of its header hold the payload length.
    Chunk { flags: u16, kind: u16, cookie: u64 },
}

/// Decode the first 16 bytes of any reply; `None` on a bad magic.
pub fn decode_reply_start(b: &[u8; 16]) -> Option<ReplyHeader> {
    match be32(b, 0)? {
        SIMPLE_REPLY_MAGIC => Some(ReplyHeader::Simple {
            error: be32(b, 4)?,
            cookie: be64(b, 8)?,
        }),
        STRUCTURED_REPLY_MAGIC => Some(ReplyHeader::Chunk {
            flags: be16(b, 4)?,
            kind: be16(b, 6)?,
            cookie: be64(b, 8)?,
        }),
        _ => None,
    }
}

/// A whole structured error chunk (NBD_REPLY_TYPE_ERROR) with the DONE flag.
pub fn encode_error_chunk(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING_LEN)];
    let len = 4 + 2 + msg.len();
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    b.extend_from_slice(&encode_chunk_header(&ChunkHeader {
        flags: REPLY_FLAG_DONE,
        kind: REPLY_TYPE_ERROR,
        cookie,
        len: len as u32,
    }));
    b.extend_from_slice(&error.to_be_bytes());
    b.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    b.extend_from_slice(msg);
    b
}

/// Header + offset of an NBD_REPLY_TYPE_OFFSET_DATA chunk carrying `data_len` bytes; the
/// data follows. `data_len` is at most the request length, a u32, so +8 may need u64: the
/// caller bounds it by `MAX_REQUEST_LEN` first.
pub fn encode_offset_data_start(
    cookie: u64,
    flags: u16,
    off: u64,
    data_len: u32,
) -> [u8; CHUNK_HEADER_LEN + 8] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 8];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&encode_chunk_header(&ChunkHeader {
        flags,
        kind: REPLY_TYPE_OFFSET_DATA,
        cookie,
        len: data_len.saturating_add(8),
    }));
    b[CHUNK_HEADER_LEN..].copy_from_slice(&off.to_be_bytes());
    b
}

/// A whole NBD_REPLY_TYPE_OFFSET_HOLE chunk: `hole_len` (non-zero) bytes from `off` read as
/// zeros.
pub fn encode_offset_hole_chunk(
    cookie: u64,
    flags: u16,
    off: u64,
    hole_len: u32,
) -> [u8; CHUNK_HEADER_LEN + 12] {
    let mut b = [0u8; CHUNK_HEADER_LEN + 12];
    b[..CHUNK_HEADER_LEN].copy_from_slice(&encode_chunk_header(&ChunkHeader {
        flags,
        kind: REPLY_TYPE_OFFSET_HOLE,
        cookie,
        len: 12,
    }));
    b[CHUNK_HEADER_LEN..CHUNK_HEADER_LEN + 8].copy_from_slice(&off.to_be_bytes());
    b[CHUNK_HEADER_LEN + 8..].copy_from_slice(&hole_len.to_be_bytes());
    b
}

/// A whole NBD_REPLY_TYPE_BLOCK_STATUS chunk: context id then (length, flags) descriptors.
pub fn encode_block_status_chunk(
    cookie: u64,
    flags: u16,
    context: u32,
    descriptors: &[(u32, u32)],
) -> Vec<u8> {
    let len = 4 + 8 * descriptors.len();
    let mut b = Vec::with_capacity(CHUNK_HEADER_LEN + len);
    b.extend_from_slice(&encode_chunk_header(&ChunkHeader {
        flags,
        kind: REPLY_TYPE_BLOCK_STATUS,
        cookie,
        len: len as u32,
    }));
    b.extend_from_slice(&context.to_be_bytes());
    for (l, f) in descriptors {
        b.extend_from_slice(&l.to_be_bytes());
        b.extend_from_slice(&f.to_be_bytes());
    }
    b
}

/// Parse a BLOCK_STATUS payload into (context id, descriptors).
pub fn decode_block_status_payload(b: &[u8]) -> Option<(u32, Vec<(u32, u32)>)> {
    if b.len() < 12 || !(b.len() - 4).is_multiple_of(8) {
        return None;
    }
    let ctx = be32(b, 0)?;
    let descs = b[4..]
        .chunks_exact(8)
        .filter_map(|c| Some((be32(c, 0)?, be32(c, 4)?)))
        .collect();
    Some((ctx, descs))
}

/// Parse an error chunk payload into (errno, message).
pub fn decode_error_payload(b: &[u8]) -> Option<(u32, String)> {
    let err = be32(b, 0)?;
    let n = be16(b, 4)? as usize;
    let msg = b.get(6..6 + n)?;
    Some((err, String::from_utf8_lossy(msg).into_owned()))
}

/// Read a big-endian u16/u32/u64 at `at` (for the client's reply parsing).
pub(crate) fn get_u16(b: &[u8], at: usize) -> Option<u16> {
    be16(b, at)
}
pub(crate) fn get_u32(b: &[u8], at: usize) -> Option<u32> {
    be32(b, at)
}
pub(crate) fn get_u64(b: &[u8], at: usize) -> Option<u64> {
    be64(b, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(&g[16..], &[0, 3]);
        assert_eq!(decode_greeting(&g), Some(3));
        let mut bad = g;
        bad[0] = b'X';
        assert_eq!(decode_greeting(&bad), None);
    }

    #[test]
    fn option_header_roundtrip_and_bad_magic() {
        let h = OptionHeader {
            option: OPT_GO,
            len: 77,
        };
        let b = encode_option_header(h);
        assert_eq!(&b[..8], b"IHAVEOPT");
        assert_eq!(decode_option_header(&b), Some(h));
        let mut bad = b;
        bad[7] ^= 1;
        assert_eq!(decode_option_header(&bad), None);
    }

    #[test]
    fn option_reply_layout() {
        let r = encode_option_reply(OPT_LIST, REP_SERVER, &encode_rep_server("ex", "d"));
        assert_eq!(r.len(), 20 + 4 + 2 + 1);
        let h = decode_option_reply_header(r[..20].try_into().unwrap()).unwrap();
        assert_eq!(
            h,
            OptionReplyHeader {
                option: OPT_LIST,
                reply: REP_SERVER,
                len: 7
            }
        );
        assert_eq!(&r[20..], &[0, 0, 0, 2, b'e', b'x', b'd']);
    }

    #[test]
    fn info_request_roundtrip_and_malformed() {
        let r = InfoRequest {
            name: "disk".into(),
            infos: vec![INFO_NAME, INFO_BLOCK_SIZE],
        };
        let b = encode_info_request(&r);
        assert_eq!(decode_info_request(&b), Ok(r));
        // Truncated anywhere: never a panic, always an error.
        for n in 0..b.len() {
            assert!(decode_info_request(&b[..n]).is_err(), "prefix {n}");
        }
        // Name length claiming 4 GiB.
        let mut huge = b.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_info_request(&huge).is_err());
        // Extra trailing byte.
        let mut extra = b;
        extra.push(0);
        assert!(decode_info_request(&extra).is_err());
    }

    #[test]
    fn meta_context_request_roundtrip_and_malformed() {
        let r = MetaContextRequest {
            name: String::new(),
            queries: vec!["base:allocation".into(), "qemu:dirty".into()],
        };
        let b = encode_meta_context_request(&r);
        assert_eq!(decode_meta_context_request(&b), Ok(r));
        for n in 0..b.len() {
            assert!(decode_meta_context_request(&b[..n]).is_err(), "prefix {n}");
        }
        // A query count of 4 billion with no data must not allocate.
        let mut huge = vec![0, 0, 0, 0];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(decode_meta_context_request(&huge).is_err());
        // Invalid UTF-8 query.
        let bad = [0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 1, 0xff];
        assert!(decode_meta_context_request(&bad).is_err());
    }

    #[test]
    fn request_layout() {
        let r = Request {
            flags: CMD_FLAG_FUA,
            cmd: CMD_WRITE,
            cookie: 0x0102030405060708,
            off: 4096,
            len: 512,
        };
        let b = encode_request(&r);
        assert_eq!(&b[..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 1, 0, 1]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_request(&b), Some(r));
        let mut bad = b;
        bad[0] = 0;
        assert_eq!(decode_request(&bad), None);
    }

    #[test]
    fn replies_layout() {
        let s = encode_simple_reply(EPERM, 9);
        assert_eq!(
            decode_reply_start(&s),
            Some(ReplyHeader::Simple {
                error: EPERM,
                cookie: 9
            })
        );
        let e = encode_error_chunk(7, EINVAL, "bad");
        assert_eq!(e.len(), 20 + 6 + 3);
        assert_eq!(
            decode_reply_start(e[..16].try_into().unwrap()),
            Some(ReplyHeader::Chunk {
                flags: REPLY_FLAG_DONE,
                kind: REPLY_TYPE_ERROR,
                cookie: 7
            })
        );
        assert_eq!(get_u32(&e, 16), Some(9));
        assert_eq!(decode_error_payload(&e[20..]), Some((EINVAL, "bad".into())));
        let bs = encode_block_status_chunk(3, REPLY_FLAG_DONE, 1, &[(4096, 0), (8192, 3)]);
        assert_eq!(get_u32(&bs, 16), Some(4 + 16));
        assert_eq!(
            decode_block_status_payload(&bs[20..]),
            Some((1, vec![(4096, 0), (8192, 3)]))
        );
        assert_eq!(decode_block_status_payload(&bs[20..27]), None);
        let d = encode_offset_data_start(5, REPLY_FLAG_DONE, 1 << 40, 100);
        assert_eq!(get_u32(&d, 16), Some(108));
        assert_eq!(get_u64(&d, 20), Some(1 << 40));
        assert_eq!(get_u16(&d, 6), Some(REPLY_TYPE_OFFSET_DATA));
        assert_eq!(decode_reply_start(&[0u8; 16]), None);
        let h = encode_offset_hole_chunk(6, 0, 1 << 20, 65536);
        assert_eq!(
            decode_reply_start(h[..16].try_into().unwrap()),
            Some(ReplyHeader::Chunk {
                flags: 0,
                kind: REPLY_TYPE_OFFSET_HOLE,
                cookie: 6
            })
        );
        assert_eq!(get_u32(&h, 16), Some(12));
        assert_eq!(get_u64(&h, 20), Some(1 << 20));
        assert_eq!(get_u32(&h, 28), Some(65536));
    }

    #[test]
    fn info_records_layout() {
        assert_eq!(
            encode_info_export(0x100, TFLAG_HAS_FLAGS),
            [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 1]
        );
        assert_eq!(encode_info_block_size(1, 4096, 1 << 25).len(), 14);
        assert_eq!(encode_info_string(INFO_NAME, "x"), [0, 1, b'x']);
        assert_eq!(encode_rep_meta_context(1, "base:allocation").len(), 4 + 15);
    }
}
