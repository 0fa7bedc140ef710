//! Linux: fallocate, sync_file_range, OFD locks, /proc/self/fd.

use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::io::AsRawFd;

pub use libc::{F_OFD_GETLK, F_OFD_SETLK};

/// qemu's probe (`qemu_probe_lock_ops`): F_OFD_GETLK on /dev/null works.
pub fn ofd_locks_work() -> bool {
    let Ok(f) = File::open("/dev/null") else {
        return false;
    };
    super::get_lock(&f, super::LockKind::Ofd, 0).is_ok()
}

pub fn reopen(f: &File) -> io::Result<File> {
    File::open(format!("/proc/self/fd/{}", f.as_raw_fd()))
}

fn fallocate(f: &File, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: fallocate on a valid fd owned by `f`; no memory is touched.
        let r =
            unsafe { libc::fallocate(f.as_raw_fd(), mode, off as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<Range<u64>> {
    fallocate(
        f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )?;
    Ok(off..off + len)
}

pub fn zero_range(f: &File, off: u64, len: u64) -> io::Result<()> {
    fallocate(
        f,
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
        off,
        len,
    )
}

pub fn grow_allocated(f: &File, old_len: u64, new_len: u64) -> io::Result<()> {
    f.set_len(new_len)?;
    zero_range(f, old_len, new_len - old_len)
}

pub fn start_writeback(f: &File) {
    // SAFETY: a plain syscall on an fd we own; failure only loses the hint.
    unsafe {
        libc::sync_file_range(f.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
    }
}
