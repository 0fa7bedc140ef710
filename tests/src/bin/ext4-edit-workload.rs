//! Crash-test workload for the ext4 editor: run `tests::ext4edit::crash_batch` on IMAGE and,
//! when KILL_AFTER > 0, SIGKILL this process just before its KILL_AFTER-th device write (a
//! real kill: no unwinding, no flush). With KILL_AFTER = 0 it finishes and prints the number
//! of device writes the commit made.
//!
//! usage: ext4-edit-workload IMAGE KILL_AFTER

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vmdisk_block::{BlockDevice, Extent, RawFile};

struct KillAfter {
    inner: RawFile,
    writes: AtomicU64,
    kill_after: u64,
}

impl BlockDevice for KillAfter {
    fn len(&self) -> u64 {
        self.inner.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> vmdisk_block::Result<()> {
        self.inner.read_exact_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> vmdisk_block::Result<()> {
        let n = self.writes.fetch_add(1, Ordering::SeqCst) + 1;
        if self.kill_after > 0 && n == self.kill_after {
            // SAFETY: kill(2) with our own pid and a valid signal number has no memory-safety
            // preconditions.
            unsafe {
                libc::kill(libc::getpid(), libc::SIGKILL);
            }
        }
        self.inner.write_all_at(buf, off)
    }
    fn flush(&self) -> vmdisk_block::Result<()> {
        self.inner.flush()
    }
    fn block_status(&self, off: u64, len: u64) -> vmdisk_block::Result<Vec<Extent>> {
        self.inner.block_status(off, len)
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: ext4-edit-workload IMAGE KILL_AFTER");
        std::process::exit(2);
    }
    let kill_after: u64 = args[2].parse().expect("KILL_AFTER is a number");
    let inner = RawFile::open(&args[1], false).expect("open image");
    let dev = Arc::new(KillAfter {
        inner,
        writes: AtomicU64::new(0),
        kill_after,
    });
    match tests::ext4edit::crash_batch(dev) {
        Ok(r) => println!("{}", r.device_writes),
        Err(e) => {
            eprintln!("edit failed: {e}");
            std::process::exit(1);
        }
    }
}
