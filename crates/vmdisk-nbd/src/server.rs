//! One connection: fixed-newstyle negotiation, then the transmission phase.
//!
//! The connection is generic over any async byte stream so tests can drive it over
//! `tokio::io::duplex` as well as sockets, and so the same code runs over a plaintext socket
//! or, after NBD_OPT_STARTTLS, over the TLS stream wrapped around it. Device calls run on
//! tokio's blocking pool (`spawn_blocking`), bounded by the server-wide `io_slots` semaphore;
//! request buffers are paid for from the server-wide `mem_budget` semaphore (bytes) before
//! they are allocated, and each connection has at most [`MAX_IN_FLIGHT`] requests outstanding.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Mutex, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use vmdisk_block::{BlockDevice, ExtentKind};

use crate::proto::*;
use crate::{ServerConfig, MAX_REQUEST_LEN};

/// Requests one connection may have in flight; the reader stops reading when it is reached.
pub const MAX_IN_FLIGHT: usize = 16;
/// Option data longer than this is answered with NBD_REP_ERR_TOO_BIG and the connection is
/// closed (the longest legal option is a few 4 KiB strings).
pub const MAX_OPTION_LEN: usize = 64 * 1024;
/// Options one client may send before it must pick an export (stops endless haggling).
pub const MAX_OPTIONS: usize = 256;
/// Time a client has to finish negotiation (slots are not held by idle handshakes).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// Bytes one BLOCK_STATUS reply describes at most (bounds the device query; the protocol
/// lets a reply cover less than was asked).
pub const MAX_BLOCK_STATUS_LEN: u64 = 1 << 30;
/// Descriptors in one BLOCK_STATUS reply at most.
pub const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 1 << 14;
/// Preferred block size advertised with NBD_INFO_BLOCK_SIZE.
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;

/// Counters shared by all connections.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub tls_failures: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub panics: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// What every connection shares.
pub(crate) struct Shared {
    pub dev: Arc<dyn BlockDevice>,
    pub cfg: ServerConfig,
    pub read_only: bool,
    pub size: u64,
    /// Bytes of request/reply buffers that may exist at once, server-wide.
    pub mem_budget: Arc<Semaphore>,
    /// Device calls that may run at once, server-wide.
    pub io_slots: Arc<Semaphore>,
    pub counters: Counters,
}

impl Shared {
    fn tflags(&self, structured: bool) -> u16 {
        let mut f = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA;
        // Every connection shares one device and FLUSH is device-wide, so multi-conn is
        // safe; advertise it only when more than one connection will actually be accepted.
        if self.cfg.max_connections > 1 {
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
#[derive(Debug, Clone, Copy, Default)]
struct Negotiated {
    structured: bool,
    base_allocation: bool,
}

/// Resolve when `stop` turns true (never, if the sender is gone without saying so).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}

/// How negotiation ended.
enum Established<S> {
    /// Enter transmission on the plaintext stream (no TLS configured).
    Plain(S, Negotiated),
    /// Enter transmission inside TLS.
    Tls(Box<TlsStream<S>>, Negotiated),
    /// The connection is over (already shut down where that was polite).
    Closed,
}

/// What one round of option haggling decided.
enum Next {
    Transmit(Negotiated),
    /// The client's NBD_OPT_STARTTLS was acknowledged: the TLS handshake comes next.
    StartTls,
    Close,
}

/// Negotiation state that survives the switch to TLS.
struct Haggle {
    no_zeroes: bool,
    /// Options the client may still send (over both phases together).
    options_left: usize,
    /// TLS is running on this connection.
    tls_active: bool,
}

/// Serve one client until it disconnects, misbehaves beyond repair, or the server stops.
pub(crate) async fn handle_connection<S>(
    sh: Arc<Shared>,
    stream: S,
    mut stop: watch::Receiver<bool>,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let est = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, establish(&sh, stream)) => r,
        _ = stopped(&mut stop) => return,
    };
    match est {
        Ok(Ok(Established::Plain(s, neg))) => {
            let (rd, wr) = tokio::io::split(s);
            transmission(sh, rd, wr, neg, stop).await
        }
        Ok(Ok(Established::Tls(s, neg))) => {
            let (rd, wr) = tokio::io::split(*s);
            transmission(sh, rd, wr, neg, stop).await
        }
        Ok(Ok(Established::Closed)) => {}
        // IO error (truncated handshake, peer gone) or timeout: just close.
        Ok(Err(_)) | Err(_) => {
            sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Greeting, option haggling and, when the server requires it, the switch to TLS.
async fn establish<S>(sh: &Shared, mut io: S) -> io::Result<Established<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Some(no_zeroes) = greet(sh, &mut io).await? else {
        return Ok(Established::Closed);
    };
    let mut hg = Haggle {
        no_zeroes,
        options_left: MAX_OPTIONS,
        tls_active: false,
    };
    match haggle(sh, &mut io, &mut hg).await? {
        Next::Transmit(neg) => return Ok(Established::Plain(io, neg)),
        Next::Close => {
            let _ = io.shutdown().await;
            return Ok(Established::Closed);
        }
        Next::StartTls => {}
    }
    // haggle() acknowledges STARTTLS only when a configuration exists.
    let Some(cfg) = sh.cfg.tls.clone() else {
        return Ok(Established::Closed);
    };
    let mut tls = match TlsAcceptor::from(cfg).accept(io).await {
        Ok(t) => t,
        Err(_) => {
            // Untrusted or missing client certificate, or not TLS at all. The ACK is out,
            // so the protocol leaves nothing to do but close.
            sh.counters.tls_failures.fetch_add(1, Ordering::Relaxed);
            return Ok(Established::Closed);
        }
    };
    hg.tls_active = true;
    match haggle(sh, &mut tls, &mut hg).await? {
        Next::Transmit(neg) => Ok(Established::Tls(Box::new(tls), neg)),
        Next::Close | Next::StartTls => {
            let _ = tls.shutdown().await;
            Ok(Established::Closed)
        }
    }
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply: u32,
    data: &[u8],
) -> io::Result<()> {
    wr.write_all(&encode_option_reply(option, reply, data))
        .await
}

/// Send the greeting and read the client flags: `Some(no_zeroes)`, or `None` to close.
async fn greet<S>(sh: &Shared, io: &mut S) -> io::Result<Option<bool>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    io.write_all(&encode_greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES))
        .await?;
    io.flush().await?;
    let cflags = io.read_u32().await?;
    if cflags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        // The protocol says to close on client flags we do not know.
        sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
        return Ok(None);
    }
    Ok(Some(cflags & FLAG_C_NO_ZEROES != 0))
}

/// Fixed-newstyle option haggling on `io` (plaintext, or inside TLS once `hg.tls_active`).
/// Everything negotiated before STARTTLS is forgotten: TLS starts a fresh negotiation.
async fn haggle<S>(sh: &Shared, io: &mut S, hg: &mut Haggle) -> io::Result<Next>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let export = sh.cfg.export_name.as_str();
    // FORCEDTLS: with a configuration, nothing but STARTTLS and ABORT is served in plaintext.
    let tls_pending = sh.cfg.tls.is_some() && !hg.tls_active;
    let mut st = Negotiated::default();
    while hg.options_left > 0 {
        hg.options_left -= 1;
        io.flush().await?;
        let mut hb = [0u8; OPTION_HEADER_LEN];
        io.read_exact(&mut hb).await?;
        let Some(h) = decode_option_header(&hb) else {
            sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            return Ok(Next::Close);
        };
        if h.len as usize > MAX_OPTION_LEN {
            sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            opt_reply(io, h.option, REP_ERR_TOO_BIG, b"option data too long").await?;
            io.flush().await?;
            return Ok(Next::Close);
        }
        let mut data = vec![0u8; h.len as usize];
        io.read_exact(&mut data).await?;
        if tls_pending {
            match h.option {
                OPT_STARTTLS if !data.is_empty() => {
                    opt_reply(io, h.option, REP_ERR_INVALID, b"STARTTLS takes no data").await?;
                    continue;
                }
                OPT_STARTTLS => {
                    opt_reply(io, h.option, REP_ACK, &[]).await?;
                    io.flush().await?;
                    return Ok(Next::StartTls);
                }
                OPT_EXPORT_NAME => {
                    // It cannot be answered with an error: the protocol says close.
                    sh.counters.refused.fetch_add(1, Ordering::Relaxed);
                    return Ok(Next::Close);
                }
                OPT_ABORT => {}
                _ => {
                    let m = b"TLS is required: send NBD_OPT_STARTTLS first";
                    opt_reply(io, h.option, REP_ERR_TLS_REQD, m).await?;
                    continue;
                }
            }
        }
        match h.option {
            OPT_EXPORT_NAME => {
                if data != export.as_bytes() {
                    // No error reply exists for this option: the protocol says close.
                    return Ok(Next::Close);
                }
                io.write_all(&sh.size.to_be_bytes()).await?;
                io.write_all(&sh.tflags(false).to_be_bytes()).await?;
                if !hg.no_zeroes {
                    io.write_all(&[0u8; 124]).await?;
                }
                io.flush().await?;
                // Structured replies stay off: EXPORT_NAME clients did not ask via GO.
                return Ok(Next::Transmit(st));
            }
            OPT_ABORT => {
                let _ = opt_reply(io, h.option, REP_ACK, &[]).await;
                let _ = io.flush().await;
                return Ok(Next::Close);
            }
            OPT_LIST => {
                if !data.is_empty() {
                    opt_reply(io, h.option, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                let desc = sh.cfg.description.as_deref().unwrap_or("");
                opt_reply(io, h.option, REP_SERVER, &encode_rep_server(export, desc)).await?;
                opt_reply(io, h.option, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                let req = match decode_info_request(&data) {
                    Ok(r) => r,
                    Err(BadOption(why)) => {
                        sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        opt_reply(io, h.option, REP_ERR_INVALID, why.as_bytes()).await?;
                        continue;
                    }
                };
                if req.name != export {
                    opt_reply(io, h.option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let info = encode_info_export(sh.size, sh.tflags(st.structured));
                opt_reply(io, h.option, REP_INFO, &info).await?;
                if req.infos.contains(&INFO_NAME) {
                    let d = encode_info_string(INFO_NAME, export);
                    opt_reply(io, h.option, REP_INFO, &d).await?;
                }
                if let Some(desc) = sh.cfg.description.as_deref() {
                    if req.infos.contains(&INFO_DESCRIPTION) {
                        let d = encode_info_string(INFO_DESCRIPTION, desc);
                        opt_reply(io, h.option, REP_INFO, &d).await?;
                    }
                }
                let bs = encode_info_block_size(1, PREFERRED_BLOCK_SIZE, MAX_REQUEST_LEN as u32);
                opt_reply(io, h.option, REP_INFO, &bs).await?;
                opt_reply(io, h.option, REP_ACK, &[]).await?;
                if h.option == OPT_GO {
                    io.flush().await?;
                    return Ok(Next::Transmit(st));
                }
            }
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    opt_reply(io, h.option, REP_ERR_INVALID, b"takes no data").await?;
                } else if st.structured {
                    opt_reply(io, h.option, REP_ERR_INVALID, b"already negotiated").await?;
                } else {
                    st.structured = true;
                    opt_reply(io, h.option, REP_ACK, &[]).await?;
                }
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                let set = h.option == OPT_SET_META_CONTEXT;
                if !st.structured {
                    let m = b"negotiate structured replies first";
                    opt_reply(io, h.option, REP_ERR_INVALID, m).await?;
                    continue;
                }
                let req = match decode_meta_context_request(&data) {
                    Ok(r) => r,
                    Err(BadOption(why)) => {
                        sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
                        opt_reply(io, h.option, REP_ERR_INVALID, why.as_bytes()).await?;
                        continue;
                    }
                };
                if req.name != export {
                    opt_reply(io, h.option, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let wanted = (!set && req.queries.is_empty())
                    || req
                        .queries
                        .iter()
                        .any(|q| q == "base:" || q == META_BASE_ALLOCATION);
                if set {
                    st.base_allocation = wanted;
                }
                if wanted {
                    let id = if set { META_BASE_ALLOCATION_ID } else { 0 };
                    let d = encode_rep_meta_context(id, META_BASE_ALLOCATION);
                    opt_reply(io, h.option, REP_META_CONTEXT, &d).await?;
                }
                opt_reply(io, h.option, REP_ACK, &[]).await?;
            }
            OPT_STARTTLS if hg.tls_active => {
                opt_reply(io, h.option, REP_ERR_INVALID, b"TLS is already running").await?;
            }
            OPT_STARTTLS => {
                opt_reply(io, h.option, REP_ERR_UNSUP, b"TLS is not configured").await?;
            }
            _ => {
                opt_reply(io, h.option, REP_ERR_UNSUP, b"unknown option").await?;
            }
        }
    }
    sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
    Ok(Next::Close)
}

/// The result of one request, before it is encoded.
enum Outcome {
    Done,
    Data(Vec<u8>),
    Status(Vec<(u32, u32)>),
    Fail(u32, String),
}

/// Per-connection state the request tasks share.
struct Conn<W> {
    wr: Mutex<W>,
    structured: bool,
    wrote: AtomicBool,
    /// Set when writing a reply failed: the reader stops.
    broken: AtomicBool,
}

impl<W: AsyncWrite + Unpin> Conn<W> {
    /// Send the whole reply for `cookie` in one go (replies may interleave between requests,
    /// never within one).
    async fn reply(&self, cookie: u64, off: u64, out: Outcome) {
        let mut wr = self.wr.lock().await;
        let r = self.encode_and_send(&mut *wr, cookie, off, out).await;
        let r = match r {
            Ok(()) => wr.flush().await,
            Err(e) => Err(e),
        };
        if r.is_err() {
            self.broken.store(true, Ordering::Release);
        }
    }

    async fn encode_and_send(
        &self,
        wr: &mut W,
        cookie: u64,
        off: u64,
        out: Outcome,
    ) -> io::Result<()> {
        if !self.structured {
            return match out {
                Outcome::Done | Outcome::Status(_) => {
                    wr.write_all(&encode_simple_reply(0, cookie)).await
                }
                Outcome::Data(d) => {
                    wr.write_all(&encode_simple_reply(0, cookie)).await?;
                    wr.write_all(&d).await
                }
                Outcome::Fail(e, _) => wr.write_all(&encode_simple_reply(e, cookie)).await,
            };
        }
        match out {
            Outcome::Data(d) if !d.is_empty() => {
                // `d.len()` is at most MAX_REQUEST_LEN, far below u32::MAX.
                let start = encode_offset_data_start(cookie, REPLY_FLAG_DONE, off, d.len() as u32);
                wr.write_all(&start).await?;
                wr.write_all(&d).await
            }
            Outcome::Done | Outcome::Data(_) => {
                let h = ChunkHeader {
                    flags: REPLY_FLAG_DONE,
                    kind: REPLY_TYPE_NONE,
                    cookie,
                    len: 0,
                };
                wr.write_all(&encode_chunk_header(&h)).await
            }
            Outcome::Status(descs) => {
                let b = encode_block_status_chunk(
                    cookie,
                    REPLY_FLAG_DONE,
                    META_BASE_ALLOCATION_ID,
                    &descs,
                );
                wr.write_all(&b).await
            }
            Outcome::Fail(e, msg) => wr.write_all(&encode_error_chunk(cookie, e, &msg)).await,
        }
    }
}

/// Map a device error onto the protocol's errno values.
pub(crate) fn errno_of(e: &vmdisk_block::Error) -> u32 {
    use vmdisk_block::Error as E;
    match e {
        E::OutOfRange { .. } => EINVAL,
        E::ReadOnly => EPERM,
        E::Unsupported { .. } => ENOTSUP,
        E::Limit { .. } => ENOMEM,
        E::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => ENOSPC,
        _ => EIO,
    }
}

/// Flags each command accepts (FUA on every command: clients are known to set it).
fn allowed_flags(cmd: u16, neg: &Negotiated) -> u16 {
    match cmd {
        CMD_READ if neg.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

/// Check a request that has no payload to read (or whose payload will be drained), returning
/// the error reply it deserves.
fn validate(sh: &Shared, neg: &Negotiated, r: &Request) -> Option<(u32, &'static str)> {
    let writes = matches!(r.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let known = matches!(
        r.cmd,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if !known {
        return Some((EINVAL, "unknown command"));
    }
    if r.flags & !allowed_flags(r.cmd, neg) != 0 {
        return Some((EINVAL, "flag not valid for this command"));
    }
    if writes && sh.read_only {
        return Some((EPERM, "the export is read-only"));
    }
    if matches!(r.cmd, CMD_READ | CMD_WRITE) && r.len as usize > MAX_REQUEST_LEN {
        return Some((EINVAL, "request longer than the maximum block size"));
    }
    if r.cmd == CMD_BLOCK_STATUS {
        if !neg.structured || !neg.base_allocation {
            return Some((EINVAL, "no metadata context was negotiated"));
        }
        if r.len == 0 {
            return Some((EINVAL, "zero-length block status"));
        }
    }
    if r.cmd != CMD_FLUSH && r.off.checked_add(r.len as u64).is_none_or(|e| e > sh.size) {
        return Some((EINVAL, "request beyond the end of the export"));
    }
    None
}

/// Read and throw away `len` payload bytes with a small buffer (bounded memory).
async fn drain<R: AsyncRead + Unpin>(rd: &mut R, mut len: u64) -> io::Result<()> {
    let mut buf = [0u8; 8192];
    while len > 0 {
        let n = (len as usize).min(buf.len());
        rd.read_exact(&mut buf[..n]).await?;
        len -= n as u64;
    }
    Ok(())
}

/// Run `f` on the blocking pool under an io slot, turning a panic into EIO.
async fn run_blocking<F>(sh: &Arc<Shared>, f: F) -> Outcome
where
    F: FnOnce(&dyn BlockDevice) -> Outcome + Send + 'static,
{
    let Ok(_slot) = sh.io_slots.clone().acquire_owned().await else {
        return Outcome::Fail(ESHUTDOWN, "server is shutting down".into());
    };
    let dev = sh.dev.clone();
    match tokio::task::spawn_blocking(move || f(&*dev)).await {
        Ok(o) => o,
        Err(e) => {
            if e.is_panic() {
                sh.counters.panics.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Fail(EIO, "internal error".into())
        }
    }
}

fn fail(e: vmdisk_block::Error) -> Outcome {
    Outcome::Fail(errno_of(&e), e.to_string())
}

/// base:allocation flags of one extent kind.
fn state_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
    }
}

fn block_status(dev: &dyn BlockDevice, off: u64, len: u64, req_one: bool) -> Outcome {
    let len = len.min(MAX_BLOCK_STATUS_LEN);
    let extents = match dev.block_status(off, len) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let mut descs: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        // Clip to the request: extents must lie within it, and each length fits a u32
        // because `len` is at most MAX_BLOCK_STATUS_LEN (< 4 GiB).
        let start = e.off.max(off + covered);
        let end = e.end().min(off + len);
        if end <= start {
            continue;
        }
        let l = (end - start) as u32;
        let f = state_flags(e.kind);
        covered += l as u64;
        match descs.last_mut() {
            Some(last) if last.1 == f => last.0 += l,
            _ => {
                if descs.len() == MAX_BLOCK_STATUS_DESCRIPTORS {
                    break;
                }
                descs.push((l, f));
            }
        }
    }
    if descs.is_empty() {
        return Outcome::Fail(EIO, "device reported no extents".into());
    }
    if req_one {
        descs.truncate(1);
    }
    Outcome::Status(descs)
}

async fn transmission<R, W>(
    sh: Arc<Shared>,
    mut rd: R,
    wr: W,
    neg: Negotiated,
    mut stop: watch::Receiver<bool>,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = Arc::new(Conn {
        wr: Mutex::new(wr),
        structured: neg.structured,
        wrote: AtomicBool::new(false),
        broken: AtomicBool::new(false),
    });
    let inflight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        if conn.broken.load(Ordering::Acquire) {
            break;
        }
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        let mut hb = [0u8; REQUEST_LEN];
        let got = tokio::select! {
            r = rd.read_exact(&mut hb) => r,
            _ = stopped(&mut stop) => break,
        };
        if got.is_err() {
            // Truncated request or the peer went away.
            break;
        }
        let Some(req) = decode_request(&hb) else {
            // A bad magic cannot be answered (there is no cookie to trust) or resynchronised.
            sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            break;
        };
        sh.counters.requests.fetch_add(1, Ordering::Relaxed);
        if req.cmd == CMD_DISC {
            break;
        }
        if let Some((errno, why)) = validate(&sh, &neg, &req) {
            sh.counters.request_errors.fetch_add(1, Ordering::Relaxed);
            if req.cmd == CMD_WRITE {
                if req.len as usize > MAX_REQUEST_LEN {
                    // Too big to drain politely: answer, then close.
                    conn.reply(req.cookie, req.off, Outcome::Fail(errno, why.into()))
                        .await;
                    break;
                }
                if drain(&mut rd, req.len as u64).await.is_err() {
                    break;
                }
            }
            conn.reply(req.cookie, req.off, Outcome::Fail(errno, why.into()))
                .await;
            continue;
        }
        // Pay for the buffer before allocating it.
        let need = if matches!(req.cmd, CMD_READ | CMD_WRITE) {
            req.len
        } else {
            0
        };
        let Ok(mem) = sh.mem_budget.clone().acquire_many_owned(need).await else {
            break;
        };
        let mut payload = Vec::new();
        if req.cmd == CMD_WRITE {
            payload = vec![0u8; req.len as usize];
            if rd.read_exact(&mut payload).await.is_err() {
                break;
            }
        }
        let sh2 = sh.clone();
        let conn2 = conn.clone();
        tokio::spawn(async move {
            let fua = req.flags & CMD_FLAG_FUA != 0;
            let (off, len) = (req.off, req.len);
            let out = match req.cmd {
                CMD_READ => {
                    run_blocking(&sh2, move |d| {
                        let mut buf = vec![0u8; len as usize];
                        match d.read_exact_at(&mut buf, off) {
                            Ok(()) => Outcome::Data(buf),
                            Err(e) => fail(e),
                        }
                    })
                    .await
                }
                CMD_WRITE => {
                    conn2.wrote.store(true, Ordering::Relaxed);
                    run_blocking(&sh2, move |d| {
                        match d.write_all_at(&payload, off).and_then(|_| {
                            if fua {
                                d.flush()
                            } else {
                                Ok(())
                            }
                        }) {
                            Ok(()) => Outcome::Done,
                            Err(e) => fail(e),
                        }
                    })
                    .await
                }
                CMD_FLUSH => {
                    run_blocking(&sh2, |d| match d.flush() {
                        Ok(()) => Outcome::Done,
                        Err(e) => fail(e),
                    })
                    .await
                }
                CMD_TRIM | CMD_WRITE_ZEROES => {
                    conn2.wrote.store(true, Ordering::Relaxed);
                    let trim = req.cmd == CMD_TRIM;
                    let may_unmap = req.flags & CMD_FLAG_NO_HOLE == 0;
                    run_blocking(&sh2, move |d| {
                        let r = if len == 0 {
                            Ok(())
                        } else if trim {
                            d.discard(off, len as u64)
                        } else {
                            d.write_zeroes(off, len as u64, may_unmap)
                        };
                        match r.and_then(|_| if fua { d.flush() } else { Ok(()) }) {
                            Ok(()) => Outcome::Done,
                            Err(e) => fail(e),
                        }
                    })
                    .await
                }
                CMD_BLOCK_STATUS => {
                    let one = req.flags & CMD_FLAG_REQ_ONE != 0;
                    run_blocking(&sh2, move |d| block_status(d, off, len as u64, one)).await
                }
                // validate() only lets the commands above through.
                _ => Outcome::Fail(EINVAL, "unknown command".into()),
            };
            match &out {
                Outcome::Data(d) => {
                    sh2.counters
                        .bytes_read
                        .fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Outcome::Fail(..) => {
                    sh2.counters.request_errors.fetch_add(1, Ordering::Relaxed);
                }
                _ if req.cmd == CMD_WRITE => {
                    sh2.counters
                        .bytes_written
                        .fetch_add(len as u64, Ordering::Relaxed);
                }
                _ => {}
            }
            conn2.reply(req.cookie, off, out).await;
            drop(mem);
            drop(permit);
        });
    }
    // Let every request in flight finish and answer before closing.
    let _ = inflight.acquire_many(MAX_IN_FLIGHT as u32).await;
    if conn.wrote.load(Ordering::Relaxed) {
        let _ = run_blocking(&sh, |d| match d.flush() {
            Ok(()) => Outcome::Done,
            Err(e) => fail(e),
        })
        .await;
    }
    let _ = conn.wr.lock().await.shutdown().await;
}
