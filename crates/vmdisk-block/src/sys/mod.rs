//! Platform code of vmdisk-block: every call that differs between Linux and macOS, each
//! concern in one function, so the rest of the crate holds no `cfg(target_os)`.
//!
//! ```text
//!  concern             Linux (linux.rs)                macOS (macos.rs)               portable (portable.rs)
//!  image lock commands OFD: F_OFD_SETLK / F_OFD_GETLK  OFD when F_OFD_GETLK works     process-associated
//!                      (probed once, as qemu does)     (as qemu), else portable       F_SETLK / F_GETLK
//!  punch a hole        fallocate(PUNCH_HOLE|KEEP_SIZE) F_PUNCHHOLE on the block-      unsupported: the caller
//!                                                      aligned middle of the range    writes zeros
//!  zero a range,       fallocate(ZERO_RANGE|KEEP_SIZE) unsupported: zeros written     unsupported: zeros written
//!   keep it allocated
//!  grow allocated      ftruncate + ZERO_RANGE          F_PREALLOCATE + ftruncate      ftruncate + zeros written
//!  writeback hint      sync_file_range(WRITE)          none                           none
//!  second descriptor   open /proc/self/fd/N            open PATH                      open PATH
//!   for locking        (same inode checked on all three)
//! ```
//!
//! The portable column runs on other Unixes and, on Linux and macOS too, once
//! [`force_portable`] was called or `VMDISK_FORCE_PORTABLE=1` is in the environment
//! ([`PORTABLE_ENV`]). That switch exists for the tests: it runs macOS's fallbacks (POSIX
//! locks against a real qemu, zeros written instead of holes punched, the read/write copy of
//! `vmdisk-image`) on the Linux machines CI has. It is read by every call, so a process can
//! flip it; locks taken before keep the kind they were taken with.
//!
//! Errors are plain `io::Error`s: this module only makes the calls, the callers decide what a
//! failure means. "Not supported here" is always `io::ErrorKind::Unsupported` (see
//! [`unsupported`]), so a caller can fall back without knowing the platform's errno.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as native;

#[cfg(target_vendor = "apple")]
mod macos;
#[cfg(target_vendor = "apple")]
use macos as native;

mod portable;
#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
use portable as native;

/// The environment variable that forces the portable code paths when it is `1`.
pub const PORTABLE_ENV: &str = "VMDISK_FORCE_PORTABLE";

static FORCED: AtomicBool = AtomicBool::new(false);

/// Use the portable code paths from now on (`true`) or the platform's own again (`false`,
/// unless [`PORTABLE_ENV`] is set). For tests: see the module docs.
pub fn force_portable(on: bool) {
    FORCED.store(on, Ordering::SeqCst);
}

/// Whether the portable code paths are in force (see the module docs).
pub fn portable() -> bool {
    static FROM_ENV: OnceLock<bool> = OnceLock::new();
    FORCED.load(Ordering::SeqCst)
        || *FROM_ENV.get_or_init(|| std::env::var_os(PORTABLE_ENV).is_some_and(|v| v == "1"))
}

/// The error every "this platform (or this filesystem) cannot do that" comes back as.
pub fn unsupported(what: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::Unsupported, what)
}

/// Which fcntl byte-range locks image locks are taken with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockKind {
    /// Open file description locks: owned by one open file, gone when it closes.
    Ofd,
    /// Process-associated POSIX locks: owned by the process, gone when *any* of its
    /// descriptors of the file closes (lock.rs keeps that from happening).
    Posix,
}

/// The lock kind for new image locks: OFD where the system has them (probed once per
/// process, as qemu's `qemu_has_ofd_lock` does), else POSIX; POSIX when portable.
pub fn lock_kind() -> LockKind {
    static PROBED: OnceLock<LockKind> = OnceLock::new();
    if portable() {
        return LockKind::Posix;
    }
    *PROBED.get_or_init(|| {
        if native::ofd_locks_work() {
            LockKind::Ofd
        } else {
            LockKind::Posix
        }
    })
}

/// What [`get_lock`] found on a byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Holder {
    /// The holder's pid, when the kernel says (POSIX locks of another process); OFD locks
    /// report none.
    pub pid: Option<i32>,
}

/// Take (`shared`) or release (`!shared`) a one-byte read lock at `byte`, without waiting.
/// A conflict is `EAGAIN` or `EACCES`, as fcntl reports it.
pub fn set_lock(f: &File, kind: LockKind, byte: u64, shared: bool) -> io::Result<()> {
    let ty = if shared { libc::F_RDLCK } else { libc::F_UNLCK };
    let mut fl = flock(ty as libc::c_int, byte);
    let cmd = match kind {
        LockKind::Ofd => native::F_OFD_SETLK,
        LockKind::Posix => libc::F_SETLK,
    };
    loop {
        // SAFETY: fcntl reads the valid, initialised flock struct we own; the fd is open.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Who, if anyone other than this lock owner, holds a lock on `byte` that an exclusive lock
/// would conflict with (qemu's probe: GETLK with F_WRLCK). With [`LockKind::Posix`] the
/// calling process's own locks are never reported (the kernel's rule, on Linux and macOS).
pub fn get_lock(f: &File, kind: LockKind, byte: u64) -> io::Result<Option<Holder>> {
    let mut fl = flock(libc::F_WRLCK as libc::c_int, byte);
    let cmd = match kind {
        LockKind::Ofd => native::F_OFD_GETLK,
        LockKind::Posix => libc::F_GETLK,
    };
    // SAFETY: fcntl writes into the valid flock struct we own; the fd is open.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, &mut fl) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    if fl.l_type as libc::c_int == libc::F_UNLCK as libc::c_int {
        return Ok(None);
    }
    Ok(Some(Holder {
        pid: (fl.l_pid > 0).then_some(fl.l_pid),
    }))
}

fn flock(ty: libc::c_int, byte: u64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value that we then fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    // The field types differ (c_short on both, but F_* are c_int on Linux, c_short on macOS).
    fl.l_type = ty as _;
    fl.l_whence = libc::SEEK_SET as _;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl
}

/// A new open file description of the file `f` is open on (read-only), checked to be the
/// same inode: a path may have been renamed or replaced since `f` was opened.
pub fn reopen(f: &File, path: &Path) -> io::Result<File> {
    let want = f.metadata()?;
    let g = native::reopen(f).or_else(|_| File::open(path))?;
    let got = g.metadata()?;
    if (got.dev(), got.ino()) != (want.dev(), want.ino()) {
        return Err(io::Error::other(
            "the path now names another file than the one opened",
        ));
    }
    Ok(g)
}

/// Deallocate `[off, off+len)` so it reads as zeros. Returns the part actually punched
/// (within the range); the caller writes zeros over the rest. `Unsupported` or any other
/// error: nothing was punched.
pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<Range<u64>> {
    if portable() {
        return portable::punch_hole(f, off, len);
    }
    native::punch_hole(f, off, len)
}

/// Make `[off, off+len)` read as zeros and keep it allocated. Errors as [`punch_hole`]
/// (nothing done: the caller writes zeros).
pub fn zero_range(f: &File, off: u64, len: u64) -> io::Result<()> {
    if portable() {
        return portable::zero_range(f, off, len);
    }
    native::zero_range(f, off, len)
}

/// Grow the file from `old_len` to `new_len` bytes with the new bytes allocated on disk and
/// reading as zeros. On an error the length may or may not have changed, and the caller
/// sets it and writes zeros.
pub fn grow_allocated(f: &File, old_len: u64, new_len: u64) -> io::Result<()> {
    if portable() {
        return portable::grow_allocated(f, old_len, new_len);
    }
    native::grow_allocated(f, old_len, new_len)
}

/// Ask the kernel to start writing `f`'s dirty pages back, without waiting (a hint).
pub fn start_writeback(f: &File) {
    if !portable() {
        native::start_writeback(f);
    }
}

/// The block-aligned middle of `[off, off+len)` for `block`-sized blocks (a power of two or
/// not; 0 counts as 1); empty (`start == end`) when no whole block fits.
pub fn aligned_middle(off: u64, len: u64, block: u64) -> Range<u64> {
    let block = block.max(1);
    let end = off.saturating_add(len);
    let start = off.div_ceil(block).saturating_mul(block).min(end);
    let stop = (end / block * block).max(start);
    start..stop
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn aligned_middles() {
        assert_eq!(aligned_middle(0, 8192, 4096), 0..8192);
        assert_eq!(aligned_middle(100, 8192, 4096), 4096..8192);
        assert_eq!(aligned_middle(100, 100, 4096), 200..200);
        assert_eq!(aligned_middle(4095, 4098, 4096), 4096..8192);
        assert_eq!(aligned_middle(4096, 4095, 4096), 4096..4096);
        assert_eq!(aligned_middle(5, 10, 0), 5..15);
        // No block boundary above the offset fits in u64: nothing to punch.
        assert!(aligned_middle(u64::MAX - 10, 100, 4096).is_empty());
        for (off, len) in [(0u64, 1u64), (1, 4096), (3, 12_000), (8191, 1)] {
            let m = aligned_middle(off, len, 4096);
            assert!(m.start >= off && m.end <= off + len && m.start <= m.end);
            assert_eq!(m.start % 4096, 0);
            assert_eq!(m.end % 4096, 0);
        }
    }

    #[test]
    fn reopen_is_the_same_inode_and_refuses_a_replaced_path() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("f");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(b"one")
            .unwrap();
        let f = File::open(&p).unwrap();
        let g = reopen(&f, &p).unwrap();
        assert_eq!(f.metadata().unwrap().ino(), g.metadata().unwrap().ino());
        // The path now names another file, and the descriptor's own file is gone from it.
        std::fs::remove_file(&p).unwrap();
        std::fs::write(&p, b"two").unwrap();
        if !cfg!(target_os = "linux") {
            // (/proc/self/fd still reaches the unlinked file on Linux.)
            assert!(reopen(&f, &p).is_err());
        }
    }

    #[test]
    fn portable_punch_and_zero_are_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let f = File::create(dir.path().join("f")).unwrap();
        f.set_len(1 << 20).unwrap();
        let e = portable::punch_hole(&f, 0, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
        let e = portable::zero_range(&f, 0, 1 << 20).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::Unsupported);
    }
}
