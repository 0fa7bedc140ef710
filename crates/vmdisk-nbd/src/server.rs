//! One connection: the async driver of the negotiation state machine (`negotiate.rs`), the
//! switch to TLS, the wait for a transmission slot, then the transmission phase
//! (`transmit.rs`).
//!
//! The connection is generic over any async byte stream so tests can drive it over
//! `tokio::io::duplex` as well as sockets, and so the same code runs over a plaintext socket
//! or, after NBD_OPT_STARTTLS, over the TLS stream wrapped around it. Negotiation (TLS
//! handshake included) must end within [`HANDSHAKE_TIMEOUT`]; it holds no `--shared` slot.
//! A client that has negotiated then waits, untimed, for a slot (`Shared::slots`) before it
//! gets its final reply, so clients beyond the limit queue instead of being dropped, and an
//! idle or half-negotiated client never keeps another out.

use std::io;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use crate::limits::{HANDSHAKE_TIMEOUT, MAX_IN_FLIGHT};
use crate::negotiate::{Event, Handshake, Negotiated, Next, Step};
use crate::shared::{stopped, Shared};
use crate::transmit::transmission;

/// How negotiation ended.
enum Established<S> {
    /// Enter transmission on the plaintext stream (no TLS configured) once `final_reply`
    /// (the GO replies or the EXPORT_NAME export data) is sent.
    Plain(S, Negotiated, Vec<u8>),
    /// The same, inside TLS.
    Tls(Box<TlsStream<S>>, Negotiated, Vec<u8>),
    /// The connection is over (already shut down where that was polite).
    Closed,
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
    let est = match est {
        Ok(Ok(e)) => e,
        // IO error (truncated handshake, peer gone) or timeout: just close.
        Ok(Err(_)) | Err(_) => {
            sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            return;
        }
    };
    if matches!(est, Established::Closed) {
        return;
    }
    // Negotiated: wait (untimed) for a transmission slot; a stopping server ends the wait.
    let slot = tokio::select! {
        s = sh.slots.clone().acquire_owned() => s,
        _ = stopped(&mut stop) => return,
    };
    // The semaphore is never closed while connections run.
    let Ok(_slot) = slot else { return };
    match est {
        Established::Plain(mut s, neg, reply) => {
            if send_final(&mut s, &reply).await {
                transmission(sh.clone(), s, neg, stop, own_thread).await;
            }
        }
        Established::Tls(mut s, neg, reply) => {
            if send_final(&mut *s, &reply).await {
                transmission(sh.clone(), *s, neg, stop, own_thread).await;
            }
        }
        Established::Closed => {}
    }
}

/// Send the reply that lets a negotiated client in; false if the client is gone (or does not
/// read it within the handshake limit).
async fn send_final<S: AsyncWrite + Unpin>(io: &mut S, reply: &[u8]) -> bool {
    let sent = async {
        io.write_all(reply).await?;
        io.flush().await
    };
    matches!(
        tokio::time::timeout(HANDSHAKE_TIMEOUT, sent).await,
        Ok(Ok(()))
    )
}

/// Write a step's reply bytes and flush (TLS buffers them).
async fn send<S: AsyncWrite + Unpin>(io: &mut S, reply: &[u8]) -> io::Result<()> {
    if !reply.is_empty() {
        io.write_all(reply).await?;
        io.flush().await?;
    }
    Ok(())
}

/// What driving the state machine on one stream came to.
enum Drive {
    /// The client asked for TLS and got the ACK.
    StartTls,
    Transmit(Negotiated, Vec<u8>),
    Closed,
}

/// Run the state machine on `io` until it wants TLS, transmission or the end. Option data
/// is read into a buffer of the length the machine asked for, which it bounds by
/// MAX_OPTION_LEN.
async fn drive<S>(sh: &Shared, hs: &mut Handshake, io: &mut S, first: Step) -> io::Result<Drive>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut step = first;
    let mut buf = Vec::new();
    loop {
        match step.event {
            Some(Event::ProtocolError) => {
                sh.counters.protocol_errors.fetch_add(1, Ordering::Relaxed);
            }
            Some(Event::Refused) => {
                sh.counters.refused.fetch_add(1, Ordering::Relaxed);
            }
            None => {}
        }
        match step.next {
            Next::Read(n) => {
                send(io, &step.reply).await?;
                buf.resize(n, 0);
                io.read_exact(&mut buf).await?;
                step = hs.input(&buf);
            }
            Next::StartTls => {
                send(io, &step.reply).await?;
                return Ok(Drive::StartTls);
            }
            Next::Transmit(neg) => return Ok(Drive::Transmit(neg, step.reply)),
            Next::Close => {
                // Best effort: the connection closes either way.
                let _ = send(io, &step.reply).await;
                let _ = io.shutdown().await;
                return Ok(Drive::Closed);
            }
        }
    }
}

/// Greeting, option haggling and, when the server requires it, the switch to TLS.
async fn establish<S>(sh: &Shared, mut io: S) -> io::Result<Established<S>>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let (mut hs, first) = Handshake::new(sh.export_info());
    match drive(sh, &mut hs, &mut io, first).await? {
        Drive::Transmit(neg, reply) => return Ok(Established::Plain(io, neg, reply)),
        Drive::Closed => return Ok(Established::Closed),
        Drive::StartTls => {}
    }
    // The machine acknowledges STARTTLS only when TLS is required, i.e. configured.
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
    let next = hs.tls_started();
    match drive(sh, &mut hs, &mut tls, next).await? {
        Drive::Transmit(neg, reply) => Ok(Established::Tls(Box::new(tls), neg, reply)),
        // `drive` has shut the session down. (A second STARTTLS is refused by the machine,
        // so StartTls cannot come back from inside TLS.)
        Drive::Closed | Drive::StartTls => Ok(Established::Closed),
    }
}

#[cfg(test)]
mod tests {
    //! The driver over an in-memory duplex stream, on tokio's paused clock: timeouts are
    //! checked without waiting for them.
    use std::time::Duration;

    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio::sync::Semaphore;
    use tokio::time::Instant;
    use vmdisk_block::MemDisk;

    use super::*;
    use crate::config::ServerConfig;
    use crate::limits::{MAX_BUFFERED_BYTES, MAX_IO_JOBS};
    use crate::proto::*;
    use crate::shared::Counters;

    fn shared(max_connections: usize) -> Arc<Shared> {
        Arc::new(Shared {
            dev: Arc::new(MemDisk::new(1 << 20)),
            cfg: ServerConfig {
                max_connections,
                ..ServerConfig::default()
            },
            read_only: false,
            size: 1 << 20,
            mem_budget: Arc::new(Semaphore::new(MAX_BUFFERED_BYTES)),
            io_slots: Arc::new(Semaphore::new(MAX_IO_JOBS)),
            slots: Arc::new(Semaphore::new(max_connections)),
            counters: Counters::default(),
        })
    }

    /// Read the greeting, send the client flags and a GO for the default export.
    async fn send_go(c: &mut DuplexStream) {
        let mut g = [0u8; GREETING_LEN];
        c.read_exact(&mut g).await.unwrap();
        assert_eq!(
            decode_greeting(&g),
            Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        );
        c.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .await
            .unwrap();
        let data = encode_info_request(&InfoRequest {
            name: String::new(),
            infos: vec![],
        });
        let h = encode_option_header(OptionHeader {
            option: OPT_GO,
            len: data.len() as u32,
        });
        c.write_all(&h).await.unwrap();
        c.write_all(&data).await.unwrap();
    }

    /// Read GO replies up to and including the ACK.
    async fn read_go_replies(c: &mut DuplexStream) {
        loop {
            let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
            c.read_exact(&mut h).await.unwrap();
            let h = decode_option_reply_header(&h).unwrap();
            let mut d = vec![0u8; h.len as usize];
            c.read_exact(&mut d).await.unwrap();
            if h.reply == REP_ACK {
                return;
            }
            assert_eq!(h.reply, REP_INFO);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_silent_client_is_dropped_at_the_handshake_limit() {
        let sh = shared(1);
        let (_client, server) = duplex(1 << 16);
        let (_stop_tx, stop) = watch::channel(false);
        let t0 = Instant::now();
        handle_connection(sh.clone(), server, stop, false).await;
        let took = t0.elapsed();
        assert!(
            took >= HANDSHAKE_TIMEOUT && took < HANDSHAKE_TIMEOUT + Duration::from_secs(1),
            "{took:?}"
        );
        assert_eq!(sh.counters.protocol_errors.load(Ordering::Relaxed), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_client_half_way_through_an_option_is_dropped_at_the_limit() {
        let sh = shared(1);
        let (mut client, server) = duplex(1 << 16);
        let (_stop_tx, stop) = watch::channel(false);
        let conn = tokio::spawn(handle_connection(sh.clone(), server, stop, false));
        let mut g = [0u8; GREETING_LEN];
        client.read_exact(&mut g).await.unwrap();
        client
            .write_all(&FLAG_C_FIXED_NEWSTYLE.to_be_bytes())
            .await
            .unwrap();
        let h = encode_option_header(OptionHeader {
            option: OPT_GO,
            len: 100,
        });
        client.write_all(&h).await.unwrap();
        client.write_all(&[0u8; 40]).await.unwrap();
        let t0 = Instant::now();
        conn.await.unwrap();
        assert!(t0.elapsed() <= HANDSHAKE_TIMEOUT, "{:?}", t0.elapsed());
        // The server's end is gone: EOF.
        assert_eq!(client.read(&mut [0u8; 16]).await.unwrap(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_negotiated_client_waits_for_a_slot_without_a_deadline() {
        let sh = shared(1);
        let held = sh.slots.clone().try_acquire_owned().unwrap();
        let (mut client, server) = duplex(1 << 16);
        let (_stop_tx, stop) = watch::channel(false);
        let conn = tokio::spawn(handle_connection(sh.clone(), server, stop, false));
        send_go(&mut client).await;
        // No reply while the only slot is taken, long past the handshake limit.
        let mut b = [0u8; 1];
        let waited = tokio::time::timeout(3 * HANDSHAKE_TIMEOUT, client.read(&mut b)).await;
        assert!(waited.is_err(), "a reply came without a slot: {waited:?}");
        assert_eq!(sh.counters.protocol_errors.load(Ordering::Relaxed), 0);
        drop(held);
        read_go_replies(&mut client).await;
        // Transmission works, then ends on DISC.
        let req = Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: 7,
            off: 0,
            len: 512,
        };
        client.write_all(&encode_request(&req)).await.unwrap();
        let mut r = [0u8; SIMPLE_REPLY_LEN + 512];
        client.read_exact(&mut r).await.unwrap();
        assert_eq!(&r[..SIMPLE_REPLY_LEN], &encode_simple_reply(0, 7));
        let disc = Request {
            cmd: CMD_DISC,
            len: 0,
            ..req
        };
        client.write_all(&encode_request(&disc)).await.unwrap();
        conn.await.unwrap();
        // The slot is free again.
        assert_eq!(sh.slots.available_permits(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_server_ends_the_wait_for_a_slot() {
        let sh = shared(1);
        let _held = sh.slots.clone().try_acquire_owned().unwrap();
        let (mut client, server) = duplex(1 << 16);
        let (stop_tx, stop) = watch::channel(false);
        let conn = tokio::spawn(handle_connection(sh.clone(), server, stop, false));
        send_go(&mut client).await;
        // The paused clock moves only once every task is idle: the GO has been taken in and
        // the connection sits in the slot wait when this times out.
        let mut b = [0u8; 1];
        let waited = tokio::time::timeout(2 * HANDSHAKE_TIMEOUT, client.read(&mut b)).await;
        assert!(waited.is_err(), "a reply came without a slot: {waited:?}");
        stop_tx.send(true).unwrap();
        conn.await.unwrap();
        assert_eq!(client.read(&mut [0u8; 16]).await.unwrap(), 0);
    }
}
