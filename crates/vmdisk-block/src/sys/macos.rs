//! macOS: F_PUNCHHOLE, F_PREALLOCATE, OFD locks where the kernel has them, F_GETPATH.
//!
//! Not in Linux's list: there is no way to zero a range and keep it allocated (no
//! `FALLOC_FL_ZERO_RANGE`), and no `sync_file_range`; `File::sync_data` is already
//! `F_FULLFSYNC` in Rust's std on Apple systems, so `flush` reaches the disk's media.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;

use super::unsupported;

pub use libc::{F_OFD_GETLK, F_OFD_SETLK};

/// Longest path F_GETPATH writes (MAXPATHLEN, NUL included).
const MAX_PATH: usize = 1024;

/// qemu's probe: F_OFD_GETLK on /dev/null works (the command is public in the SDKs since
/// macOS 13; a kernel without it answers EINVAL).
pub fn ofd_locks_work() -> bool {
    let Ok(f) = File::open("/dev/null") else {
        return false;
    };
    super::get_lock(&f, super::LockKind::Ofd, 0).is_ok()
}

/// Open the file `f` is open on by its current path (F_GETPATH follows renames).
pub fn reopen(f: &File) -> io::Result<File> {
    let mut buf = [0u8; MAX_PATH];
    // SAFETY: F_GETPATH writes at most MAXPATHLEN bytes (NUL-terminated) into the buffer,
    // which is that long and lives for the call.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETPATH, buf.as_mut_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    let n = buf.iter().position(|&b| b == 0).unwrap_or(MAX_PATH);
    File::open(OsStr::from_bytes(&buf[..n]))
}

/// The filesystem's block size: F_PUNCHHOLE wants holes aligned to it.
fn block_size(f: &File) -> io::Result<u64> {
    // SAFETY: statfs is plain old data; all-zero is valid and fstatfs fills it in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid fd and a valid out-pointer that lives for the call.
    let r = unsafe { libc::fstatfs(f.as_raw_fd(), &mut st) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(st.f_bsize))
}

fn fcntl_retry<T>(f: &File, cmd: libc::c_int, arg: &mut T) -> io::Result<()> {
    loop {
        // SAFETY: `cmd` is F_PUNCHHOLE or F_PREALLOCATE, whose argument is the struct `arg`
        // points at (fpunchhole_t / fstore_t), valid and owned for the call.
        let r = unsafe { libc::fcntl(f.as_raw_fd(), cmd, arg as *mut T) };
        if r != -1 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<Range<u64>> {
    let mid = super::aligned_middle(off, len, block_size(f)?);
    if mid.is_empty() {
        return Err(unsupported("punching a hole smaller than a block"));
    }
    let mut arg = libc::fpunchhole_t {
        fp_flags: 0,
        reserved: 0,
        fp_offset: mid.start as libc::off_t,
        fp_length: (mid.end - mid.start) as libc::off_t,
    };
    fcntl_retry(f, libc::F_PUNCHHOLE, &mut arg)?;
    Ok(mid)
}

pub fn zero_range(_f: &File, _off: u64, _len: u64) -> io::Result<()> {
    Err(unsupported(
        "zeroing a range without writing (macOS has no ZERO_RANGE)",
    ))
}

/// F_PREALLOCATE reserves blocks past the physical end of the file (contiguous if it can,
/// else anywhere), then ftruncate makes them the file's new, zero-reading bytes.
pub fn grow_allocated(f: &File, old_len: u64, new_len: u64) -> io::Result<()> {
    let mut store = libc::fstore_t {
        fst_flags: libc::F_ALLOCATECONTIG | libc::F_ALLOCATEALL,
        fst_posmode: libc::F_PEOFPOSMODE,
        fst_offset: 0,
        fst_length: (new_len - old_len) as libc::off_t,
        fst_bytesalloc: 0,
    };
    if fcntl_retry(f, libc::F_PREALLOCATE, &mut store).is_err() {
        store.fst_flags = libc::F_ALLOCATEALL;
        fcntl_retry(f, libc::F_PREALLOCATE, &mut store)?;
    }
    f.set_len(new_len)
}

pub fn start_writeback(_f: &File) {}
