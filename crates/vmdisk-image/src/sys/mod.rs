//! Platform code of vmdisk-image (the file copy and new output files), one function per
//! concern; `copy.rs` and `output.rs` hold no `cfg(target_os)`.
//!
//! ```text
//!  concern              Linux (linux.rs)             macOS (macos.rs)                 portable
//!  share all extents    ioctl FICLONE into DST       fclonefileat to DST.clone, then  unsupported
//!   (reflink)                                         rename over DST (APFS; cp -c)
//!  copy a range in      copy_file_range              unsupported                      unsupported
//!   the kernel
//!  rename, never        renameat2(RENAME_NOREPLACE)  renamex_np(RENAME_EXCL)          link + unlink
//!   replacing
//!  "cannot fsync a      EINVAL                       EINVAL, ENOTSUP, ENOTTY          EINVAL
//!   directory"
//! ```
//!
//! "Unsupported" comes back as `io::ErrorKind::Unsupported` (`vmdisk_block::sys::unsupported`)
//! and the callers fall back: the pread/pwrite copy, a hard link, a checked rename. The
//! portable column runs when `vmdisk_block::sys::portable()` says so (the tests' switch, see
//! there) and on other Unixes.

use std::fs::File;
use std::io;
use std::path::Path;

use vmdisk_block::sys::{portable, unsupported};

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

/// What [`reflink`] did to the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
// Each platform makes one of them: `Into` Linux (FICLONE), `Replaced` macOS (and the tests'
// emulation of it on Linux).
#[cfg_attr(not(test), allow(dead_code))]
pub enum Cloned {
    /// The open destination file now shares the source's extents.
    Into,
    /// The destination *path* now names a new file, the clone (macOS clones only into new
    /// names): the open destination file is stale, reopen the path.
    Replaced,
}

/// The failed step when cloning fails for another reason than "cannot" (names the call).
pub const REFLINK_OP: &str = native::REFLINK_OP;

/// Why a filesystem could not clone, and the way out (names the filesystems that can).
pub const REFLINK_UNSUPPORTED: &str = native::REFLINK_UNSUPPORTED;

/// Make the file at `dst_path` (open as `dst`, empty) share every extent of `src`.
pub fn reflink(src: &File, dst: &File, dst_path: &Path) -> io::Result<Cloned> {
    #[cfg(test)]
    if tests::EMULATE_CLONE_BY_RENAME.get() {
        return tests::copy_by_rename(src, dst_path);
    }
    if portable() {
        return Err(unsupported("sharing extents"));
    }
    native::reflink(src, dst, dst_path)
}

/// A clone for systems that clone only into a new name: `make` creates the clone at
/// `DST.clone` (registered for the second-Ctrl-C cleanup), which is then renamed over
/// `dst_path` in one step; on any failure the sibling is removed.
#[cfg_attr(not(any(test, target_vendor = "apple")), allow(dead_code))]
fn clone_by_rename(
    dst_path: &Path,
    make: impl FnOnce(&std::ffi::CStr) -> io::Result<()>,
) -> io::Result<Cloned> {
    use std::os::unix::ffi::OsStrExt;
    let mut name = dst_path.as_os_str().to_owned();
    name.push(".clone");
    let sibling = std::path::PathBuf::from(name);
    let c = std::ffi::CString::new(sibling.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let _registered = vmdisk_block::register_temp(&sibling);
    let done = make(&c).and_then(|()| std::fs::rename(&sibling, dst_path));
    if let Err(e) = done {
        let _ = std::fs::remove_file(&sibling);
        return Err(e);
    }
    Ok(Cloned::Replaced)
}

/// Copy up to `len` bytes at `off` (the same offset in both files) inside the kernel;
/// returns the bytes copied (0: the source ended).
pub fn copy_range(src: &File, dst: &File, off: u64, len: u64) -> io::Result<u64> {
    if portable() {
        return Err(unsupported("copy_file_range"));
    }
    native::copy_range(src, dst, off, len)
}

/// Rename `tmp` to `dst` unless `dst` exists (`io::ErrorKind::AlreadyExists` then).
/// `Unsupported` when neither the atomic rename nor a hard link works on this filesystem.
pub fn rename_noreplace(tmp: &Path, dst: &Path) -> io::Result<()> {
    if !portable() {
        match native::rename_noreplace(tmp, dst) {
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            done => return done,
        }
    }
    portable::link_noreplace(tmp, dst)
}

/// Whether fsync of a directory failed only because this filesystem cannot do it.
pub fn dir_fsync_unsupported(e: &io::Error) -> bool {
    e.raw_os_error()
        .is_some_and(|code| native::DIR_FSYNC_UNSUPPORTED.contains(&code))
}

/// Whether `e` from [`reflink`] means "this filesystem (pair) cannot share extents", as
/// coreutils' cp reads it (ENOTSUP is not EOPNOTSUPP on macOS).
pub fn reflink_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || e.raw_os_error().is_some_and(|code| {
            [
                libc::EOPNOTSUPP,
                libc::ENOTSUP,
                libc::EXDEV,
                libc::EINVAL,
                libc::ENOTTY,
                libc::ENOSYS,
                libc::EBADF,
                libc::ETXTBSY,
            ]
            .contains(&code)
        })
}

/// Whether `e` from [`copy_range`] means "use pread/pwrite instead".
pub fn copy_range_unsupported(e: &io::Error) -> bool {
    e.kind() == io::ErrorKind::Unsupported
        || e.raw_os_error().is_some_and(|code| {
            [libc::EXDEV, libc::ENOSYS, libc::EOPNOTSUPP, libc::EINVAL].contains(&code)
        })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;
    use std::os::unix::ffi::OsStrExt;

    thread_local! {
        /// Makes [`reflink`] behave as on macOS (a new file renamed over the destination),
        /// with a plain copy standing in for fclonefileat: the copy's handling of a replaced
        /// temporary runs on Linux.
        pub(crate) static EMULATE_CLONE_BY_RENAME: Cell<bool> = const { Cell::new(false) };
    }

    pub(crate) fn copy_by_rename(src: &File, dst_path: &Path) -> io::Result<Cloned> {
        clone_by_rename(dst_path, |c| {
            let path = Path::new(std::ffi::OsStr::from_bytes(c.to_bytes()));
            let mut out = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(path)?;
            let mut input = src.try_clone()?;
            std::io::Seek::rewind(&mut input)?;
            std::io::copy(&mut input, &mut out)?;
            Ok(())
        })
    }

    #[test]
    fn link_noreplace_never_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::write(&a, b"new").unwrap();
        std::fs::write(&b, b"old").unwrap();
        let e = portable::link_noreplace(&a, &b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&b).unwrap(), b"old");
        assert!(a.exists());
        std::fs::remove_file(&b).unwrap();
        portable::link_noreplace(&a, &b).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), b"new");
        assert!(!a.exists(), "the temporary name is gone after the link");
    }

    #[test]
    fn unsupported_is_recognised_for_every_fallback() {
        let e = unsupported("x");
        assert!(reflink_unsupported(&e) && copy_range_unsupported(&e));
        let enotsup = io::Error::from_raw_os_error(libc::ENOTSUP);
        assert!(reflink_unsupported(&enotsup));
        let enospc = io::Error::from_raw_os_error(libc::ENOSPC);
        assert!(!reflink_unsupported(&enospc) && !copy_range_unsupported(&enospc));
    }
}
