//! `serve_blocking` stops on SIGTERM and flushes (alone in its binary: it signals itself).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmdisk_block::{BlockDevice, Extent, MemDisk, Result};
use vmdisk_nbd::client::{Client, ConnectOptions};
use vmdisk_nbd::{Listen, ServerConfig};

struct Counting(MemDisk, AtomicU64);

impl BlockDevice for Counting {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_exact_at(&self, b: &mut [u8], off: u64) -> Result<()> {
        self.0.read_exact_at(b, off)
    }
    fn write_all_at(&self, b: &[u8], off: u64) -> Result<()> {
        self.0.write_all_at(b, off)
    }
    fn flush(&self) -> Result<()> {
        self.1.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.0.block_status(off, len)
    }
}

#[test]
fn sigterm_stops_serve_blocking_and_flushes() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("s");
    let dev = Arc::new(Counting(MemDisk::new(1 << 20), AtomicU64::new(0)));
    let (d2, s2) = (dev.clone(), sock.clone());
    let cfg = ServerConfig {
        persistent: true,
        ..ServerConfig::default()
    };
    let t = std::thread::spawn(move || vmdisk_nbd::serve_blocking(d2, Listen::Unix(s2), cfg));
    let t0 = Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed() < Duration::from_secs(30) && !t.is_finished());
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut c = Client::connect_unix(&sock, &ConnectOptions::default()).unwrap();
    c.write(0, &[1; 4096], false).unwrap();
    c.disconnect().unwrap();
    let before = dev.1.load(Ordering::SeqCst);
    // SAFETY: kill/getpid have no memory-safety preconditions; tokio handles the signal.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGTERM) }, 0);
    let stats = t.join().unwrap().unwrap();
    assert_eq!(stats.connections, 1);
    assert!(
        dev.1.load(Ordering::SeqCst) > before,
        "no flush at shutdown"
    );
    assert!(!sock.exists(), "socket left behind");
}
