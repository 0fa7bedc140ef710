//! One connection: fixed-newstyle negotiation, then the transmission phase (`transmit.rs`).
//!
//! The connection is generic over any async byte stream so tests can drive it over
//! `tokio::io::duplex` as well as sockets, and so the same code runs over a plaintext socket
//! or, after NBD_OPT_STARTTLS, over the TLS stream wrapped around it. Device calls run on
//! tokio's blocking pool (`spawn_blocking`), bounded by the server-wide `io_slots` semaphore;
//! request buffers are paid for from the server-wide `mem_budget` semaphore (bytes) before
//! they are allocated, and each connection has at most [`MAX_IN_FLIGHT`] requests outstanding.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{watch, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use vmdisk_block::BlockDevice;

use crate::proto::*;
use crate::transmit::transmission;
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
pub(crate) struct Negotiated {
    pub structured: bool,
    pub base_allocation: bool,
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

/// An accepted client, detached from the accepting runtime.
pub(crate) enum ClientStream {
    Unix(std::os::unix::net::UnixStream),
    Tcp(std::net::TcpStream),
}

/// Serve one client on a thread of its own, running its own current-thread runtime; resolves
/// when the client is done (or `abort` fired).
///
/// A connection's protocol work then never waits behind another's on a shared worker, no
/// multi-threaded scheduler stands between a request and its device call, and a connection
/// with nothing else to do may call the device inline (see `transmit.rs`) without holding up
/// any other client. When no runtime can be built (out of file descriptors: each costs two),
/// the client is served on the caller's runtime instead, every device call on the blocking
/// pool.
pub(crate) async fn serve_client(
    sh: Arc<Shared>,
    stream: ClientStream,
    stop: watch::Receiver<bool>,
    abort: watch::Receiver<bool>,
) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(MAX_IN_FLIGHT)
        .build();
    let Ok(rt) = rt else {
        return serve_stream(sh, stream, stop, abort, false).await;
    };
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new()
        .name("nbd-conn".into())
        .spawn(move || {
            // Dropped when the thread ends, however it ends: that resolves `done_rx`.
            let _done = done_tx;
            let sh2 = sh.clone();
            let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                rt.block_on(serve_stream(sh2, stream, stop, abort, true))
            }));
            if served.is_err() {
                sh.counters.panics.fetch_add(1, Ordering::Relaxed);
            }
            // Device calls of an aborted connection may still be running: do not wait.
            rt.shutdown_background();
        });
    // Without a thread the client is dropped, like one refused by a full accept queue.
    if spawned.is_ok() {
        let _ = done_rx.await;
    }
}

/// Register `stream` with the current runtime and serve it until done or aborted.
async fn serve_stream(
    sh: Arc<Shared>,
    stream: ClientStream,
    stop: watch::Receiver<bool>,
    mut abort: watch::Receiver<bool>,
    own_thread: bool,
) {
    let conn = async move {
        match stream {
            ClientStream::Unix(s) => {
                if let Ok(s) = tokio::net::UnixStream::from_std(s) {
                    handle_connection(sh, s, stop, own_thread).await
                }
            }
            ClientStream::Tcp(s) => {
                if let Ok(s) = tokio::net::TcpStream::from_std(s) {
                    handle_connection(sh, s, stop, own_thread).await
                }
            }
        }
    };
    tokio::select! {
        _ = conn => {}
        _ = stopped(&mut abort) => {}
    }
}

/// Serve one client until it disconnects, misbehaves beyond repair, or the server stops.
/// `own_thread`: nothing else runs on this thread, so an idle connection may call the device
/// inline.
pub(crate) async fn handle_connection<S>(
    sh: Arc<Shared>,
    stream: S,
    mut stop: watch::Receiver<bool>,
    own_thread: bool,
) where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let est = tokio::select! {
        r = tokio::time::timeout(HANDSHAKE_TIMEOUT, establish(&sh, stream)) => r,
        _ = stopped(&mut stop) => return,
    };
    match est {
        Ok(Ok(Established::Plain(s, neg))) => transmission(sh, s, neg, stop, own_thread).await,
        Ok(Ok(Established::Tls(s, neg))) => transmission(sh, *s, neg, stop, own_thread).await,
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
