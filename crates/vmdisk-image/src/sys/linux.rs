//! Linux: FICLONE, copy_file_range, renameat2.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::Cloned;

pub const REFLINK_OP: &str = "reflink (FICLONE) into";
pub const REFLINK_UNSUPPORTED: &str =
    "the filesystem cannot share extents (reflinks need e.g. btrfs, XFS with reflink=1 or bcachefs); --reflink=auto falls back to a sparse copy";
pub const DIR_FSYNC_UNSUPPORTED: &[i32] = &[libc::EINVAL];

pub fn reflink(src: &File, dst: &File, _dst_path: &Path) -> io::Result<Cloned> {
    // SAFETY: FICLONE takes the source fd as its integer argument; both fds are valid and
    // owned by the `File`s borrowed for the duration of the call.
    let r = unsafe { libc::ioctl(dst.as_raw_fd(), libc::FICLONE, src.as_raw_fd()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(Cloned::Into)
}

pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<u64> {
    loop {
        let mut off_in = off as libc::loff_t;
        let mut off_out = off as libc::loff_t;
        // SAFETY: both fds are valid for the call; the offset pointers point at live locals,
        // which the kernel reads and updates.
        let r = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len as usize,
                0,
            )
        };
        if r >= 0 {
            return Ok(r as u64);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

pub fn rename_noreplace(tmp: &Path, dst: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
    };
    let (a, b) = (c(tmp)?, c(dst)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    let r = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            a.as_ptr(),
            libc::AT_FDCWD,
            b.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOSYS) => Err(vmdisk_block::sys::unsupported(
            "renameat2(RENAME_NOREPLACE)",
        )),
        _ => Err(e),
    }
}
