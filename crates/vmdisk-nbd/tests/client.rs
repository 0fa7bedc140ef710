//! The crate's own client against MemDisk exports: every command and every error path.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{pattern, persistent, TestServer};
use vmdisk_block::{BlockDevice, Extent, MemDisk, Result as BlockResult};
use vmdisk_nbd::client::{self, Client, ConnectOptions};
use vmdisk_nbd::proto::*;
use vmdisk_nbd::{Listen, Listener, ServerConfig};

const MIB: u64 = 1 << 20;

fn errno(r: client::Result<impl std::fmt::Debug>) -> u32 {
    match r {
        Err(client::Error::Server { errno, .. }) => errno,
        other => panic!("expected a server error, got {other:?}"),
    }
}

#[test]
fn all_commands_roundtrip_structured() {
    let disk = Arc::new(MemDisk::new(4 * MIB));
    let srv = TestServer::start(disk.clone(), persistent(2));
    let mut c = srv.connect();
    assert!(c.structured_replies());
    assert_eq!(c.base_allocation_id(), Some(META_BASE_ALLOCATION_ID));
    assert_eq!(c.size(), 4 * MIB);
    let f = c.transmission_flags();
    for want in [
        TFLAG_HAS_FLAGS,
        TFLAG_SEND_FLUSH,
        TFLAG_SEND_FUA,
        TFLAG_SEND_TRIM,
        TFLAG_SEND_WRITE_ZEROES,
        TFLAG_CAN_MULTI_CONN,
        TFLAG_SEND_DF,
    ] {
        assert_ne!(f & want, 0, "flag {want:#x} missing from {f:#x}");
    }
    assert_eq!(f & TFLAG_READ_ONLY, 0);

    let data = pattern(128 * 1024, 7);
    c.write(MIB, &data, false).unwrap();
    c.write(3 * MIB, &data[..4096], true).unwrap(); // FUA
    let mut back = vec![0u8; data.len()];
    c.read(MIB, &mut back).unwrap();
    assert_eq!(back, data);
    assert_eq!(
        &disk.to_vec()[MIB as usize..MIB as usize + data.len()],
        &data[..]
    );
    c.flush().unwrap();

    // Block status: zero (hole|zero) up to 1 MiB, then data.
    let ext = c.block_status(0, 2 * MIB, false).unwrap();
    assert_eq!(ext[0], (MIB as u32, STATE_HOLE | STATE_ZERO));
    assert_eq!(ext[1], (128 * 1024, 0));
    assert_eq!(ext.iter().map(|e| e.0 as u64).sum::<u64>(), 2 * MIB);
    let one = c.block_status(0, 2 * MIB, true).unwrap();
    assert_eq!(one.len(), 1);

    // Write zeroes (may punch, and NO_HOLE) and trim read back as zeros.
    c.write_zeroes(MIB, 4096, false, false).unwrap();
    c.write_zeroes(MIB + 4096, 4096, true, true).unwrap();
    c.trim(MIB + 8192, 4096, false).unwrap();
    let mut z = vec![1u8; 3 * 4096];
    c.read(MIB, &mut z).unwrap();
    assert!(z.iter().all(|&b| b == 0));
    let mut rest = vec![0u8; 4096];
    c.read(MIB + 3 * 4096, &mut rest).unwrap();
    assert_eq!(rest, data[3 * 4096..4 * 4096]);

    // Zero-length read and write are no-ops.
    c.read(4 * MIB, &mut []).unwrap();
    c.write(0, &[], false).unwrap();
    c.disconnect().unwrap();
    let stats = srv.stop();
    assert_eq!(stats.connections, 1);
    assert!(stats.bytes_written >= data.len() as u64);
}

#[test]
fn simple_replies_without_structured() {
    let disk = Arc::new(MemDisk::from_vec(pattern(MIB as usize, 3)));
    let srv = TestServer::start(disk, persistent(1));
    let opts = ConnectOptions {
        structured_replies: false,
        base_allocation: false,
        ..ConnectOptions::default()
    };
    let mut c = srv.connect_with(&opts).unwrap();
    assert!(!c.structured_replies());
    assert_eq!(c.transmission_flags() & TFLAG_SEND_DF, 0);
    assert_eq!(c.transmission_flags() & TFLAG_CAN_MULTI_CONN, 0, "shared 1");
    let mut b = vec![0u8; 8192];
    c.read(4096, &mut b).unwrap();
    assert_eq!(b, pattern(MIB as usize, 3)[4096..4096 + 8192]);
    let r = c.request(CMD_READ, 0, 0, 512, &[]).unwrap();
    assert!(!r.structured);
    // No context negotiated: block status is invalid.
    assert_eq!(errno(c.block_status(0, 4096, false)), EINVAL);
    // Errors still arrive as simple replies.
    assert_eq!(errno(c.read(MIB, &mut [0u8; 1])), EINVAL);
    c.write(0, &[9; 512], true).unwrap();
    c.disconnect().unwrap();
    srv.stop();
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    for (dev, cfg_ro) in [
        (MemDisk::new(MIB), true),
        (MemDisk::new(MIB).read_only(), false),
    ] {
        let cfg = ServerConfig {
            read_only: cfg_ro,
            ..persistent(1)
        };
        let srv = TestServer::start(Arc::new(dev), cfg);
        let mut c = srv.connect();
        assert!(c.is_read_only());
        let f = c.transmission_flags();
        assert_eq!(f & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
        assert_eq!(errno(c.write(0, &[1; 4096], false)), EPERM);
        assert_eq!(errno(c.trim(0, 4096, false)), EPERM);
        assert_eq!(errno(c.write_zeroes(0, 4096, false, false)), EPERM);
        // The connection survives and still reads.
        let mut b = [1u8; 4096];
        c.read(0, &mut b).unwrap();
        assert_eq!(b, [0u8; 4096]);
        c.flush().unwrap();
        c.disconnect().unwrap();
        srv.stop();
    }
}

#[test]
fn out_of_range_unknown_and_bad_flags_get_einval() {
    let disk = Arc::new(MemDisk::new(MIB));
    let srv = TestServer::start(disk.clone(), persistent(1));
    let mut c = srv.connect();
    assert_eq!(errno(c.read(MIB - 1, &mut [0u8; 2])), EINVAL);
    assert_eq!(errno(c.read(u64::MAX, &mut [0u8; 2])), EINVAL);
    assert_eq!(errno(c.write(MIB, &[1; 512], false)), EINVAL);
    assert_eq!(errno(c.write(u64::MAX - 10, &[1; 512], true)), EINVAL);
    assert_eq!(errno(c.trim(MIB - 4096, 8192, false)), EINVAL);
    assert_eq!(errno(c.write_zeroes(2 * MIB, 1, false, false)), EINVAL);
    assert_eq!(errno(c.block_status(MIB, 1, false)), EINVAL);
    assert_eq!(errno(c.block_status(0, 0, false)), EINVAL);
    // Unknown commands and flags.
    for cmd in [5u16, 8, 9, 99, u16::MAX] {
        let r = c.request(cmd, 0, 0, 4096, &[]).unwrap();
        assert_eq!(r.errno, EINVAL, "command {cmd}");
        assert!(r.structured);
    }
    for flags in [1u16 << 7, CMD_FLAG_NO_HOLE, CMD_FLAG_REQ_ONE, 1 << 15] {
        assert_eq!(
            c.request(CMD_READ, flags, 0, 512, &[]).unwrap().errno,
            EINVAL
        );
    }
    // A rejected write's payload is consumed: the stream stays in sync.
    let r = c.request(CMD_WRITE, 1 << 9, 0, 512, &[0xee; 512]).unwrap();
    assert_eq!(r.errno, EINVAL);
    // A read longer than the maximum block size is refused without allocating.
    let r = c.request(CMD_READ, 0, 0, u32::MAX, &[]).unwrap();
    assert_eq!(r.errno, EINVAL);
    assert!(
        disk.to_vec().iter().all(|&b| b == 0),
        "a refused request wrote"
    );
    // FUA is accepted on any command (clients are known to set it).
    c.request(CMD_FLUSH, CMD_FLAG_FUA, 0, 0, &[]).unwrap();
    let mut b = [0u8; 16];
    c.read(0, &mut b).unwrap();
    // A write header claiming 4 GiB is answered, then the connection is closed.
    let r = c.request(CMD_WRITE, 0, 0, u32::MAX, &[]).unwrap();
    assert_eq!(r.errno, EINVAL);
    assert!(c.read(0, &mut b).is_err(), "connection should be closed");
    let stats = srv.stop();
    assert!(stats.request_errors >= 15, "{stats:?}");
}

#[test]
fn list_and_export_names() {
    let cfg = ServerConfig {
        export_name: "disk0".into(),
        description: Some("a test disk".into()),
        ..persistent(2)
    };
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), cfg);
    let list = client::list_exports_unix(&srv.sock).unwrap();
    assert_eq!(
        list,
        vec![client::ExportEntry {
            name: "disk0".into(),
            description: "a test disk".into()
        }]
    );
    match srv.connect_with(&ConnectOptions::default()) {
        Err(client::Error::OptionRefused { reply, .. }) => assert_eq!(reply, REP_ERR_UNKNOWN),
        other => panic!("wrong export accepted: {other:?}"),
    }
    let opts = ConnectOptions {
        export_name: "disk0".into(),
        ..ConnectOptions::default()
    };
    srv.connect_with(&opts).unwrap().disconnect().unwrap();
    srv.stop();
}

#[test]
fn one_shot_server_exits_after_last_client() {
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), ServerConfig::default());
    let mut c = srv.connect();
    c.write(0, &[5; 512], false).unwrap();
    assert!(!srv.is_finished());
    c.disconnect().unwrap();
    let stats = srv.wait();
    assert_eq!(stats.connections, 1);
    assert_eq!(stats.bytes_written, 512);
}

#[test]
fn shared_limit_queues_extra_connections() {
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), persistent(2));
    let a = srv.connect();
    let b = srv.connect();
    // A third client waits in the backlog (like qemu-nbd --shared) instead of being dropped.
    let (tx, rx) = std::sync::mpsc::channel();
    let sock = srv.sock.clone();
    let waiter = std::thread::spawn(move || {
        let r = vmdisk_nbd::client::Client::connect_unix(&sock, &ConnectOptions::default());
        tx.send(r.is_ok()).unwrap();
        r
    });
    assert!(
        rx.recv_timeout(std::time::Duration::from_millis(300))
            .is_err(),
        "a client over the limit must wait, not be served or refused"
    );
    a.disconnect().unwrap();
    assert_eq!(
        rx.recv_timeout(common::SERVER_TIMEOUT),
        Ok(true),
        "the queued client is served once a slot frees"
    );
    let c = waiter.join().unwrap().unwrap();
    b.disconnect().unwrap();
    c.disconnect().unwrap();
    let stats = srv.stop();
    assert_eq!(stats.refused, 0);
    assert_eq!(stats.connections, 3);
}

#[test]
fn unix_socket_mode_and_peer_uid_allow_list() {
    use std::os::unix::fs::PermissionsExt;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    let cfg = ServerConfig {
        allow_uids: Some(vec![me]),
        ..persistent(4)
    };
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), cfg);
    let mode = std::fs::metadata(&srv.sock).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    srv.connect().disconnect().unwrap();
    srv.stop();

    let cfg = ServerConfig {
        allow_uids: Some(vec![me.wrapping_add(4242)]),
        ..persistent(4)
    };
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), cfg);
    assert!(srv.connect_with(&ConnectOptions::default()).is_err());
    let stats = srv.stop();
    assert_eq!(stats.refused, 1);
    assert_eq!(stats.connections, 0);
}

#[test]
fn stale_socket_is_replaced_and_live_one_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s");
    drop(std::os::unix::net::UnixListener::bind(&p).unwrap()); // stale
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let cfg = ServerConfig::default();
        let l = Listener::bind(&Listen::Unix(p.clone()), &cfg).unwrap();
        match Listener::bind(&Listen::Unix(p.clone()), &cfg) {
            Err(vmdisk_nbd::Error::SocketPathInUse { .. }) => {}
            Err(e) => panic!("wrong error {e}"),
            Ok(_) => panic!("bound over a live socket"),
        }
        drop(l);
        assert!(!p.exists());
        std::fs::write(&p, b"not a socket").unwrap();
        assert!(Listener::bind(&Listen::Unix(p.clone()), &cfg).is_err());
    });
}

#[test]
fn tcp_loopback_only_unless_allowed() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let cfg = ServerConfig::default();
    let any: std::net::SocketAddr = "0.0.0.0:0".parse().unwrap();
    rt.block_on(async {
        match Listener::bind(&Listen::Tcp(any), &cfg) {
            Err(vmdisk_nbd::Error::RemoteRefused { .. }) => {}
            other => panic!("non-loopback bind allowed: {:?}", other.err()),
        }
    });
    let l = rt
        .block_on(async { Listener::bind(&Listen::Tcp("127.0.0.1:0".parse().unwrap()), &cfg) })
        .unwrap();
    let addr = l.local_addr().unwrap();
    let disk: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(MIB));
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let server = rt.spawn(vmdisk_nbd::serve_listener(
        disk,
        l,
        persistent(1),
        async move {
            let _ = rx.await;
        },
    ));
    let mut c = Client::connect_tcp(addr, &ConnectOptions::default()).unwrap();
    c.write(4096, &[3; 4096], true).unwrap();
    let mut b = [0u8; 4096];
    c.read(4096, &mut b).unwrap();
    assert_eq!(b, [3; 4096]);
    c.disconnect().unwrap();
    let _ = tx.send(());
    let stats = rt.block_on(server).unwrap().unwrap();
    assert_eq!(stats.connections, 1);
}

/// A MemDisk that counts flushes.
struct CountingDisk {
    inner: MemDisk,
    flushes: AtomicU64,
}

impl BlockDevice for CountingDisk {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> BlockResult<()> {
        self.inner.read_exact_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> BlockResult<()> {
        self.inner.write_all_at(buf, off)
    }
    fn flush(&self) -> BlockResult<()> {
        self.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn block_status(&self, off: u64, len: u64) -> BlockResult<Vec<Extent>> {
        self.inner.block_status(off, len)
    }
}

#[test]
fn fua_and_shutdown_flush_the_device() {
    let disk = Arc::new(CountingDisk {
        inner: MemDisk::new(MIB),
        flushes: AtomicU64::new(0),
    });
    let srv = TestServer::start(disk.clone(), persistent(1));
    let mut c = srv.connect();
    c.write(0, &[1; 512], false).unwrap();
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 0);
    c.write(0, &[1; 512], true).unwrap();
    assert_eq!(
        disk.flushes.load(Ordering::SeqCst),
        1,
        "FUA write did not flush"
    );
    c.write_zeroes(0, 512, false, true).unwrap();
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 2);
    c.flush().unwrap();
    assert_eq!(disk.flushes.load(Ordering::SeqCst), 3);
    // Stop the server with the client still connected and a write not flushed.
    c.write(4096, &[2; 512], false).unwrap();
    let before = disk.flushes.load(Ordering::SeqCst);
    srv.stop();
    assert!(
        disk.flushes.load(Ordering::SeqCst) > before,
        "no flush at shutdown"
    );
    drop(c);
}
