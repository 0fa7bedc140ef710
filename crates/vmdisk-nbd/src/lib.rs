//! NBD server (tokio) over a synchronous [`BlockDevice`], and a small synchronous client.
//!
//! The server speaks the fixed-newstyle NBD protocol well enough for qemu, libnbd (nbdinfo,
//! nbdcopy), nbd-client and the Linux kernel. Async exists only here, at the edge. Each client
//! is served on a thread of its own running a current-thread runtime (falling back to the
//! caller's runtime when no runtime can be built); its device calls run on tokio's blocking
//! pool, or inline on that thread when the connection has nothing else to do (one request,
//! nothing queued or unwritten), which saves two thread hand-offs per request at queue depth 1
//! and holds up no other client. With structured replies, READs of ranges the device reports
//! as zero are answered with hole chunks instead of data (unless the client set DF), as
//! qemu-nbd does. [`serve`] binds a Unix socket (mode 0600,
//! optional peer-uid allow-list checked with the peer's credentials: `SO_PEERCRED` on Linux,
//! `getpeereid` on macOS, both through tokio's `peer_cred`) or a TCP port (loopback unless
//! [`ServerConfig::allow_remote`]), serves until the shutdown future resolves (or, one-shot,
//! until the last client leaves) and flushes the device before returning.
//!
//! With [`ServerConfig::tls`] set, TLS is mandatory (the protocol's FORCEDTLS mode, on Unix
//! sockets and TCP alike): before `NBD_OPT_STARTTLS` every option but ABORT is answered with
//! NBD_REP_ERR_TLS_REQD and a plaintext NBD_OPT_EXPORT_NAME closes the connection; after the
//! ACK the TLS handshake runs on the same socket and negotiation continues inside it.
//! [`tls::server_config`] builds the rustls configuration from PEM files.
//!
//! # Wire layouts (all integers big-endian)
//!
//! ```text
//! Handshake
//!   S: "NBDMAGIC" u64 | "IHAVEOPT" u64 | handshake flags u16 (FIXED_NEWSTYLE|NO_ZEROES)
//!   C: client flags u32 (C_FIXED_NEWSTYLE|C_NO_ZEROES; unknown bits => close)
//! Option (repeat)
//!   C: "IHAVEOPT" u64 | option u32 | length u32 | data[length]      (length <= 64 KiB)
//!   S: 0x3e889045565a9 u64 | option u32 | reply type u32 | length u32 | data[length]
//!   GO/INFO data:   name_len u32 | name | n u16 | info type u16 * n
//!     replies: REP_INFO(EXPORT: type u16, size u64, tflags u16), [INFO_NAME],
//!              [INFO_DESCRIPTION], INFO_BLOCK_SIZE(min 1, pref 4096, max 32 MiB), REP_ACK
//!   LIST: REP_SERVER(name_len u32 | name | description) then REP_ACK
//!   LIST/SET_META_CONTEXT data: name_len u32 | name | nq u32 | (len u32 | query) * nq
//!     replies: REP_META_CONTEXT(id u32 | "base:allocation") then REP_ACK
//!   EXPORT_NAME (legacy): S: size u64 | tflags u16 | 124 zero bytes unless NO_ZEROES
//!   STARTTLS (no data): S: REP_ACK, then a TLS handshake; everything after is TLS records
//!     (with TLS configured, any other option first gets ERR_TLS_REQD)
//!   errors: bit 31 set (UNSUP, INVALID, UNKNOWN, TOO_BIG, ...) with a message as data
//! Transmission
//!   C: 0x25609513 u32 | flags u16 | type u16 | cookie u64 | offset u64 | length u32
//!      [| data[length] for WRITE]
//!   S simple:     0x67446698 u32 | error u32 | cookie u64 [| data for a successful READ]
//!   S structured: 0x668e33ef u32 | flags u16 (DONE=1) | type u16 | cookie u64 | length u32
//!      NONE(0) | OFFSET_DATA(1): offset u64, data | OFFSET_HOLE(2): offset u64, length u32
//!      | BLOCK_STATUS(5): ctx id u32, (length u32, flags u32)* with flags HOLE=1 ZERO=2
//!      | ERROR(0x8001): errno u32, msg_len u16, msg
//!      A READ gets OFFSET_DATA and OFFSET_HOLE chunks in offset order covering the request,
//!      DONE on the last; with CMD_FLAG_DF exactly one OFFSET_DATA chunk.
//! ```
//!
//! # Limits and hostile clients
//!
//! Every limit is a named constant in [`limits`], with its reason. A request larger than
//! [`MAX_REQUEST_LEN`] gets EINVAL (a WRITE that large is answered and the connection closed,
//! since its payload cannot be skipped cheaply). Each connection has at most
//! [`limits::MAX_IN_FLIGHT`] requests outstanding; all request buffers together stay below
//! [`MAX_BUFFERED_BYTES`] (besides that, a connection keeps a 128 KiB input buffer and at most
//! 4 MiB of idle buffers for reuse); at most [`MAX_IO_JOBS`] device calls run at once, inline
//! ones included. Negotiation must finish (TLS handshake included) within
//! [`limits::HANDSHAKE_TIMEOUT`], and a negotiating client holds no slot:
//! [`ServerConfig::max_connections`] counts clients in the transmission phase only. A client
//! that has negotiated while every slot is taken waits for one (its GO is answered, or its
//! EXPORT_NAME export data sent, only then), so clients beyond the limit queue rather than
//! being dropped (as with qemu-nbd `--shared`; libnbd's multi-conn clients rely on it), and
//! an idle or half-negotiated client keeps nobody out (qemu-nbd counts those too, until its
//! 10 s handshake limit). At most [`limits::MAX_PENDING_CLIENTS`] clients beyond the limit
//! are accepted at once; further ones wait in the listen backlog. A bad magic number ends the
//! connection (there is nothing left to resynchronise on); every other malformed request gets
//! the protocol's error reply. Out-of-range requests of every kind get EINVAL (as qemu-nbd
//! does; the protocol would also allow ENOSPC for writes) and touch nothing.
//!
//! # Modules
//!
//! `negotiate` is option negotiation as a pure state machine (bytes in, replies and a decision
//! out); `server` drives it over a stream, switches to TLS and waits for a slot; `transmit`
//! is the transmission phase; `shared` holds what all connections share; [`limits`] every
//! limit.
//! Imports point one way: lib -> server -> {transmit, negotiate, shared} -> {limits, proto}.
//!
//! # Errors
//!
//! [`Error`] separates what a caller must tell apart: binding the listener, a refused remote
//! address, the runtime, and the final flush of the device. Device errors inside a request are
//! mapped to NBD errno values (`OutOfRange` => EINVAL, `ReadOnly` => EPERM, ENOSPC, else EIO)
//! and never end the server; neither does a failed TLS handshake (counted in
//! [`ServeStats::tls_failures`]). Building the TLS configuration has its own
//! [`tls::TlsError`], the client its own [`client::Error`].

#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;
use vmdisk_block::BlockDevice;

pub mod client;
mod config;
pub mod limits;
mod negotiate;
pub mod proto;
mod server;
mod shared;
pub mod tls;
mod transmit;

pub use config::ServerConfig;
pub use limits::{MAX_BUFFERED_BYTES, MAX_IO_JOBS, MAX_REQUEST_LEN, SHUTDOWN_GRACE};
/// The TLS library the server's configuration type comes from ([`ServerConfig::tls`]).
pub use rustls;

use limits::{ACCEPT_BACKOFF, MAX_PENDING_CLIENTS};

/// Where to listen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(PathBuf),
    Tcp(SocketAddr),
}

/// What a finished server did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Connections served.
    pub connections: u64,
    /// Connections refused: a uid not on the allow-list, or (TLS required) a client that
    /// asked for the export with NBD_OPT_EXPORT_NAME before starting TLS.
    pub refused: u64,
    /// TLS handshakes that failed (certificate not trusted, no client certificate when one is
    /// required, not TLS at all after the STARTTLS ACK).
    pub tls_failures: u64,
    /// Requests received in the transmission phase.
    pub requests: u64,
    /// Requests answered with an error.
    pub request_errors: u64,
    /// Broken handshakes, bad magic numbers, over-long options.
    pub protocol_errors: u64,
    /// Panics caught in connection tasks or device calls (always 0 unless there is a bug).
    pub panics: u64,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

/// Why serving failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot bind {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{addr} is not a loopback address; exporting a disk to the network needs allow_remote"
    )]
    RemoteRefused { addr: SocketAddr },
    #[error("{} exists and is not a stale socket", path.display())]
    SocketPathInUse { path: PathBuf },
    #[error("cannot start the async runtime")]
    Runtime(#[source] std::io::Error),
    #[error("flushing the device at shutdown failed")]
    Flush(#[source] vmdisk_block::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A bound listener; [`Listener::bind`] then [`serve_listener`] lets the caller learn the
/// address (TCP port 0) before serving.
pub struct Listener {
    inner: ListenerKind,
    /// Removes the Unix socket when the listener is dropped.
    _guard: Option<SocketGuard>,
}

enum ListenerKind {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// Removes the socket file at exit, if it is still the one we created.
struct SocketGuard {
    path: PathBuf,
    ino: u64,
}

impl Drop for SocketGuard {
    fn drop(&mut self) {
        if std::fs::symlink_metadata(&self.path).is_ok_and(|m| m.ino() == self.ino) {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

fn bind_err(addr: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> Error {
    let addr = addr.to_string();
    move |source| Error::Bind { addr, source }
}

impl Listener {
    /// Bind `listen`: a Unix socket is created with mode 0600 (bound in a private 0700
    /// directory, then renamed into place, so it is never reachable with looser modes); a
    /// stale socket at the path is replaced. TCP refuses non-loopback addresses unless
    /// `cfg.allow_remote`. Must be called inside a tokio runtime.
    pub fn bind(listen: &Listen, cfg: &ServerConfig) -> Result<Listener> {
        match listen {
            Listen::Tcp(addr) => {
                if !addr.ip().is_loopback() && !cfg.allow_remote {
                    return Err(Error::RemoteRefused { addr: *addr });
                }
                let std_l = std::net::TcpListener::bind(addr).map_err(bind_err(addr))?;
                std_l.set_nonblocking(true).map_err(bind_err(addr))?;
                let l = TcpListener::from_std(std_l).map_err(bind_err(addr))?;
                Ok(Listener {
                    inner: ListenerKind::Tcp(l),
                    _guard: None,
                })
            }
            Listen::Unix(path) => bind_unix(path),
        }
    }

    /// The TCP address bound, if this is a TCP listener.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        match &self.inner {
            ListenerKind::Tcp(l) => l.local_addr().ok(),
            ListenerKind::Unix(_) => None,
        }
    }
}

fn bind_unix(path: &Path) -> Result<Listener> {
    let shown = path.display();
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        let stale = m.file_type().is_socket()
            && matches!(std::os::unix::net::UnixStream::connect(path),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused);
        if !stale {
            return Err(Error::SocketPathInUse { path: path.into() });
        }
        std::fs::remove_file(path).map_err(bind_err(&shown))?;
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0)
        ^ std::process::id();
    let dir = parent.join(format!(".nbd{nonce:08x}"));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(bind_err(dir.display()))?;
    let tmp = dir.join("s");
    let bound = (|| {
        let l = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        let ino = std::fs::symlink_metadata(path)?.ino();
        l.set_nonblocking(true)?;
        Ok::<_, std::io::Error>((l, ino))
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    let (l, ino) = bound.map_err(bind_err(&shown))?;
    let guard = SocketGuard {
        path: path.to_path_buf(),
        ino,
    };
    let l = UnixListener::from_std(l).map_err(bind_err(&shown))?;
    Ok(Listener {
        inner: ListenerKind::Unix(l),
        _guard: Some(guard),
    })
}

/// Bind `listen` and serve `dev` until `shutdown` resolves (or, without `persistent`, until
/// the last client has gone). Flushes the device and removes the Unix socket before returning.
pub async fn serve(
    dev: Arc<dyn BlockDevice>,
    listen: Listen,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeStats> {
    let listener = Listener::bind(&listen, &cfg)?;
    serve_listener(dev, listener, cfg, shutdown).await
}

/// Serve on an already bound listener (see [`serve`]).
pub async fn serve_listener(
    dev: Arc<dyn BlockDevice>,
    listener: Listener,
    cfg: ServerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<ServeStats> {
    let max_conns = cfg.max_connections.max(1);
    let sh = Arc::new(shared::Shared {
        read_only: cfg.read_only || dev.is_read_only(),
        size: dev.len(),
        dev,
        cfg,
        mem_budget: Arc::new(Semaphore::new(MAX_BUFFERED_BYTES)),
        io_slots: Arc::new(Semaphore::new(MAX_IO_JOBS)),
        slots: Arc::new(Semaphore::new(max_conns)),
        counters: shared::Counters::default(),
    });
    let (stop_tx, stop_rx) = watch::channel(false);
    // Ends connections still running when the grace period is over.
    let (abort_tx, abort_rx) = watch::channel(false);
    let mut conns: JoinSet<()> = JoinSet::new();
    let mut served_any = false;
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            Some(done) = conns.join_next(), if !conns.is_empty() => {
                if done.as_ref().is_err_and(|e| e.is_panic()) {
                    sh.counters.panics.fetch_add(1, Ordering::Relaxed);
                }
                if !sh.cfg.persistent && served_any && conns.is_empty() {
                    break;
                }
            }
            // Negotiating clients hold no slot, so accept beyond the limit; past
            // MAX_PENDING_CLIENTS more, new clients queue in the kernel's backlog.
            accepted = accept(&listener), if conns.len() < max_conns + MAX_PENDING_CLIENTS => {
                let Some(conn) = accepted else {
                    // EMFILE and friends: back off instead of spinning.
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                };
                if !peer_allowed(&conn, &sh.cfg) {
                    sh.counters.refused.fetch_add(1, Ordering::Relaxed);
                    drop(conn);
                    continue;
                }
                served_any = true;
                sh.counters.connections.fetch_add(1, Ordering::Relaxed);
                let detached = match conn {
                    Accepted::Unix(s) => s.into_std().map(server::ClientStream::Unix),
                    Accepted::Tcp(s) => s.into_std().map(server::ClientStream::Tcp),
                };
                // Failing to detach the socket from this runtime drops the client.
                if let Ok(s) = detached {
                    let (sh2, stop, abort) = (sh.clone(), stop_rx.clone(), abort_rx.clone());
                    conns.spawn(server::serve_client(sh2, s, stop, abort));
                }
            }
        }
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + SHUTDOWN_GRACE;
    while !conns.is_empty() {
        match tokio::time::timeout_at(deadline, conns.join_next()).await {
            Ok(Some(Err(e))) if e.is_panic() => {
                sh.counters.panics.fetch_add(1, Ordering::Relaxed);
            }
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
    }
    let _ = abort_tx.send(true);
    conns.shutdown().await;
    let dev = sh.dev.clone();
    let flushed = tokio::task::spawn_blocking(move || dev.flush()).await;
    let c = &sh.counters;
    let stats = ServeStats {
        connections: c.connections.load(Ordering::Relaxed),
        refused: c.refused.load(Ordering::Relaxed),
        tls_failures: c.tls_failures.load(Ordering::Relaxed),
        requests: c.requests.load(Ordering::Relaxed),
        request_errors: c.request_errors.load(Ordering::Relaxed),
        protocol_errors: c.protocol_errors.load(Ordering::Relaxed),
        panics: c.panics.load(Ordering::Relaxed) + u64::from(flushed.is_err()),
        bytes_read: c.bytes_read.load(Ordering::Relaxed),
        bytes_written: c.bytes_written.load(Ordering::Relaxed),
    };
    match flushed {
        Ok(r) => r.map_err(Error::Flush)?,
        Err(_) => {
            return Err(Error::Flush(vmdisk_block::Error::unsupported(
                "the flush task panicked",
            )))
        }
    }
    Ok(stats)
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

async fn accept(l: &Listener) -> Option<Accepted> {
    match &l.inner {
        ListenerKind::Unix(l) => l.accept().await.ok().map(|(s, _)| Accepted::Unix(s)),
        ListenerKind::Tcp(l) => l.accept().await.ok().map(|(s, _)| {
            let _ = s.set_nodelay(true);
            Accepted::Tcp(s)
        }),
    }
}

fn peer_allowed(conn: &Accepted, cfg: &ServerConfig) -> bool {
    match (conn, &cfg.allow_uids) {
        (_, None) => true,
        // tokio's peer_cred: SO_PEERCRED on Linux, getpeereid (+ LOCAL_PEEREPID) on macOS;
        // the uid is the peer's effective uid either way.
        (Accepted::Unix(s), Some(uids)) => s.peer_cred().is_ok_and(|c| uids.contains(&c.uid())),
        // No credentials on TCP: an allow-list cannot be honoured, so refuse.
        (Accepted::Tcp(_), Some(_)) => false,
    }
}

/// Serve from a fresh multi-threaded runtime until SIGINT/SIGTERM (or, one-shot, until the
/// last client leaves); the device is flushed before returning. The signal handlers are in
/// place before the listener is bound, so once the socket exists (or the port accepts) a
/// SIGTERM stops the server cleanly: the socket is the readiness signal.
pub fn serve_blocking(
    dev: Arc<dyn BlockDevice>,
    listen: Listen,
    cfg: ServerConfig,
) -> Result<ServeStats> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_IO_JOBS + 8)
        .build()
        .map_err(Error::Runtime)?;
    rt.block_on(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).map_err(Error::Runtime)?;
        let mut int = signal(SignalKind::interrupt()).map_err(Error::Runtime)?;
        let stop = async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        };
        serve(dev, listen, cfg, stop).await
    })
}

#[cfg(test)]
mod tests {
    /// Each module's source, by module name ("lib" is the crate root).
    const SOURCES: &[(&str, &str)] = &[
        ("lib", include_str!("lib.rs")),
        ("client", include_str!("client.rs")),
        ("config", include_str!("config.rs")),
        ("limits", include_str!("limits.rs")),
        ("negotiate", include_str!("negotiate.rs")),
        ("proto", include_str!("proto.rs")),
        ("server", include_str!("server.rs")),
        ("shared", include_str!("shared.rs")),
        ("tls", include_str!("tls.rs")),
        ("transmit", include_str!("transmit.rs")),
    ];

    /// The modules `src` names through `crate::` paths (in `use` lines, code or doc links);
    /// an item of the root itself (`crate::Error`) counts as "lib".
    fn deps(src: &str) -> Vec<&'static str> {
        let mut out = Vec::new();
        for (at, _) in src.match_indices("crate::") {
            let rest = &src[at + "crate::".len()..];
            let name: String = rest
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            let module = SOURCES
                .iter()
                .map(|(m, _)| *m)
                .find(|m| *m == name && *m != "lib")
                .unwrap_or("lib");
            if !out.contains(&module) {
                out.push(module);
            }
        }
        out
    }

    #[test]
    fn module_imports_form_no_cycle() {
        // lib.rs declares every module; only the other direction would be an import.
        let graph: Vec<(&str, Vec<&str>)> = SOURCES
            .iter()
            .map(|(m, src)| {
                let mut d = deps(src);
                if *m == "lib" {
                    d.clear();
                    for (other, _) in SOURCES.iter().filter(|(o, _)| *o != "lib") {
                        d.push(other);
                    }
                }
                d.retain(|x| x != m);
                (*m, d)
            })
            .collect();
        // Depth-first search for a back edge.
        fn visit<'a>(
            m: &'a str,
            graph: &[(&'a str, Vec<&'a str>)],
            path: &mut Vec<&'a str>,
            done: &mut Vec<&'a str>,
        ) {
            if done.contains(&m) {
                return;
            }
            assert!(
                !path.contains(&m),
                "import cycle: {} -> {m}",
                path.join(" -> ")
            );
            path.push(m);
            let edges = graph.iter().find(|(n, _)| *n == m).map(|(_, d)| d.clone());
            for d in edges.unwrap_or_default() {
                visit(d, graph, path, done);
            }
            path.pop();
            done.push(m);
        }
        let mut done = Vec::new();
        visit("lib", &graph, &mut Vec::new(), &mut done);
        assert_eq!(done.len(), SOURCES.len());
        // And the layering the docs promise: the state machine does no IO and needs only
        // the wire format and the limits.
        let neg = graph.iter().find(|(m, _)| *m == "negotiate").unwrap();
        let mut d = neg.1.clone();
        d.sort();
        assert_eq!(d, ["limits", "proto"]);
        assert!(
            !SOURCES[4].1.contains("tokio"),
            "negotiate.rs must not touch tokio"
        );
    }
}
