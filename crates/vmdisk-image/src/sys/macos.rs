//! macOS: fclonefileat (APFS clones, what `cp -c` makes), renamex_np. There is no
//! copy_file_range: the sparse copy reads and writes.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use vmdisk_block::sys::unsupported;

use super::Cloned;

pub const REFLINK_OP: &str = "reflink (fclonefileat) into";
pub const REFLINK_UNSUPPORTED: &str =
    "the filesystem cannot share extents (clones need APFS); --reflink=auto falls back to a sparse copy";
pub const DIR_FSYNC_UNSUPPORTED: &[i32] = &[libc::EINVAL, libc::ENOTSUP, libc::ENOTTY];

/// sys/clonefile.h: do not copy the source's owner (the clone is ours, as a new file is).
const CLONE_NOOWNERCOPY: u32 = 0x0002;

fn c_path(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// fclonefileat creates its destination and refuses an existing one: the clone is made
/// under a sibling name and renamed over the (empty) destination (`clone_by_rename`).
pub fn reflink(src: &File, _dst: &File, dst_path: &Path) -> io::Result<Cloned> {
    super::clone_by_rename(dst_path, |c| {
        // SAFETY: the source fd is valid for the call, `c` is a NUL-terminated path that
        // outlives it; AT_FDCWD resolves a relative path as open(2) does.
        let r = unsafe {
            libc::fclonefileat(
                src.as_raw_fd(),
                libc::AT_FDCWD,
                c.as_ptr(),
                CLONE_NOOWNERCOPY,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    })
}

pub fn copy_range(_src: &File, _dst: &File, _off: u64, _len: u64) -> io::Result<u64> {
    Err(unsupported("copy_file_range (macOS has none)"))
}

pub fn rename_noreplace(tmp: &Path, dst: &Path) -> io::Result<()> {
    let (a, b) = (c_path(tmp)?, c_path(dst)?);
    // SAFETY: both pointers are NUL-terminated strings that outlive the call.
    let r = unsafe { libc::renamex_np(a.as_ptr(), b.as_ptr(), libc::RENAME_EXCL) };
    if r == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EINVAL | libc::ENOTSUP | libc::ENOSYS) => {
            Err(unsupported("renamex_np(RENAME_EXCL)"))
        }
        _ => Err(e),
    }
}
