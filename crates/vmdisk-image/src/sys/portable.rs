//! What any Unix can do; on Linux and macOS the fallbacks the callers reach when the
//! platform's call is unsupported or the portable paths are forced.

use std::io;
use std::path::Path;

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
pub use self::other::*;

/// link(2) then unlink: never replaces `dst` (link fails with EEXIST) and leaves one name.
/// `Unsupported` where the filesystem has no hard links.
pub fn link_noreplace(tmp: &Path, dst: &Path) -> io::Result<()> {
    match std::fs::hard_link(tmp, dst) {
        Ok(()) => std::fs::remove_file(tmp),
        Err(e)
            if e.raw_os_error().is_some_and(|c| {
                [
                    libc::EPERM,
                    libc::EOPNOTSUPP,
                    libc::ENOTSUP,
                    libc::EMLINK,
                    libc::ENOSYS,
                ]
                .contains(&c)
            }) =>
        {
            Err(vmdisk_block::sys::unsupported("hard links"))
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
mod other {
    use std::fs::File;
    use std::io;
    use std::path::Path;

    use vmdisk_block::sys::unsupported;

    use super::super::Cloned;

    pub const REFLINK_OP: &str = "reflink into";
    pub const REFLINK_UNSUPPORTED: &str =
        "vmdisk cannot share extents on this system; --reflink=auto falls back to a sparse copy";
    pub const DIR_FSYNC_UNSUPPORTED: &[i32] = &[libc::EINVAL];

    pub fn reflink(_src: &File, _dst: &File, _dst_path: &Path) -> io::Result<Cloned> {
        Err(unsupported("sharing extents"))
    }

    pub fn copy_range(_src: &File, _dst: &File, _off: u64, _len: u64) -> io::Result<u64> {
        Err(unsupported("copy_file_range"))
    }

    pub fn rename_noreplace(_tmp: &Path, _dst: &Path) -> io::Result<()> {
        Err(unsupported("an atomic no-replace rename"))
    }
}
