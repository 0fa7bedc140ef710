//! Helpers for the portable-path tests (`tests/tests/portable_*.rs`): vmdisk run with the
//! code paths macOS uses (`VMDISK_FORCE_PORTABLE=1`, see `vmdisk_block::sys`), and a probe
//! that tells process-associated POSIX locks from OFD locks.

use std::ffi::OsStr;
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::process::Command;

use crate::{run, vmdisk_bin, Run};

/// `vmdisk ARGS` with the portable code paths forced.
pub fn portable_cmd<S: AsRef<OsStr>>(args: &[S]) -> Command {
    let mut cmd = Command::new(vmdisk_bin());
    cmd.env(vmdisk_block::sys::PORTABLE_ENV, "1").args(args);
    cmd
}

/// Run `vmdisk ARGS` with the portable code paths forced.
pub fn vmdisk_portable<S: AsRef<OsStr>>(args: &[S]) -> Run {
    run(&mut portable_cmd(args))
}

/// Who holds a lock on `byte` of `path` that an exclusive lock would conflict with, as a
/// process-associated `F_GETLK` reports it: `Some(pid)` for another process's POSIX lock,
/// `Some(-1)` for an OFD lock (Linux reports no owner for those), `None` when unlocked.
/// (This process holds no lock on `path`, or the kernel would hide its own.)
pub fn posix_lock_holder(path: &Path, byte: i64) -> Option<i32> {
    let f = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: flock is plain old data; all-zero is valid and is filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: F_GETLK reads and writes the valid flock struct we own; the fd is open.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETLK, &mut fl) };
    assert!(
        r == 0,
        "F_GETLK failed: {}",
        std::io::Error::last_os_error()
    );
    (fl.l_type != libc::F_UNLCK as libc::c_short).then_some(fl.l_pid)
}
