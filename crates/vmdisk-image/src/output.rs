//! New output files, built so that nothing is ever lost: under a temporary name beside the
//! destination, renamed into place only when complete.
//!
//! ```text
//!   validate: the destination is not an input (same inode, through symlinks and hard links,
//!             or any file of an input's backing chain), no qemu holds it, the space is there
//!   DIR/.NAME.vmdisk-tmp-PID      created O_EXCL, registered for the second-Ctrl-C cleanup
//!    │  ... the command writes it ...
//!    ▼ [fsync] rename (RENAME_NOREPLACE unless replacing) [fsync DIR]
//!   DIR/NAME                      an existing file is replaced only here, never earlier
//! ```
//!
//! Dropping a [`PendingFile`] that was not committed removes the temporary, so an error, an
//! interrupt (through `vmdisk_block::Cancel`) or ENOSPC leaves the destination as it was.

use std::fs::File;
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use vmdisk_block::lock::{ImageLock, LockMode};
use vmdisk_block::RegisteredTemp;

use crate::{Error, Image, Result};

pub(crate) fn file_err(op: &'static str, path: &Path, source: io::Error) -> Error {
    Error::File {
        op,
        path: path.to_owned(),
        source,
    }
}

/// A file's identity on the host: two paths name one file when these agree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileId {
    dev: u64,
    ino: u64,
}

impl FileId {
    /// The identity of the file `path` names (symlinks followed), if it exists.
    pub fn of(path: &Path) -> Option<FileId> {
        std::fs::metadata(path).ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }

    pub fn of_file(f: &File) -> Option<FileId> {
        f.metadata().ok().map(|m| FileId {
            dev: m.dev(),
            ino: m.ino(),
        })
    }
}

/// Refuse a destination that is one of the files `img` reads: the image itself or any file of
/// its backing chain (compared by inode, so symlinks and hard links are seen through).
/// `what` names the input in the message ("the source", "the image being edited").
pub fn refuse_output_onto_input(dst: &Path, img: &Image, what: &'static str) -> Result<()> {
    let Some(d) = FileId::of(dst) else {
        return Ok(());
    };
    for (depth, layer) in img.chain().iter().enumerate() {
        if FileId::of(&layer.path) == Some(d) {
            return Err(Error::OutputIsInput {
                dst: dst.to_owned(),
                input: layer.path.clone(),
                role: if depth == 0 {
                    what.to_string()
                } else {
                    format!("a backing file of {what} (layer {depth} of its chain)")
                },
            });
        }
    }
    Ok(())
}

/// Bytes available to an unprivileged writer on the filesystem holding `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs fills the zeroed struct it is given; `c` is NUL-terminated and outlives
    // the call.
    let st = unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return Err(io::Error::last_os_error());
        }
        st
    };
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// Fail before writing when the filesystem that will hold `dst` has less than `needed` bytes
/// free. An unknown amount (statvfs failing) is no reason to refuse.
pub fn ensure_space(dst: &Path, needed: u64) -> Result<()> {
    let dir = dir_of(dst);
    match free_space(&dir) {
        Ok(available) if available < needed => Err(Error::NoSpace {
            path: dst.to_owned(),
            dir,
            needed,
            available,
        }),
        _ => Ok(()),
    }
}

/// A new file being written under a temporary name beside its destination
/// (`DIR/.NAME.vmdisk-tmp-PID`), moved into place by [`PendingFile::commit`] and removed on
/// drop otherwise — so a crash, an error or an interrupt never leaves a half-written file
/// under the destination's name, and a destination being replaced stays intact until the
/// rename.
#[derive(Debug)]
pub struct PendingFile {
    tmp: PathBuf,
    dst: PathBuf,
    overwrite: bool,
    file: File,
    committed: bool,
    _registered: RegisteredTemp,
    // qemu's write lock on the destination being replaced, held until it is replaced, so no
    // qemu starts using it meanwhile.
    _replaced_lock: Option<ImageLock>,
}

impl PendingFile {
    /// Check that `dst` may be created (or, with `overwrite`, replaced: it must be a regular
    /// file no one holds qemu's locks on; a symlink is followed) and create the empty
    /// temporary file beside it with permissions `mode` (less the umask).
    pub fn create(dst: &Path, overwrite: bool, mode: u32) -> Result<PendingFile> {
        let mut dst = dst.to_owned();
        let mut replaced_lock = None;
        match std::fs::symlink_metadata(&dst) {
            Ok(_) if !overwrite => return Err(Error::DestinationExists { path: dst }),
            Ok(m) => {
                if m.file_type().is_symlink() {
                    dst = std::fs::canonicalize(&dst)
                        .map_err(|source| file_err("follow the symlink", &dst, source))?;
                }
                let m = std::fs::metadata(&dst).map_err(|source| file_err("stat", &dst, source))?;
                if m.is_dir() {
                    return Err(Error::IsADirectory { path: dst });
                }
                if !m.is_file() {
                    return Err(Error::NotRegularFile { path: dst });
                }
                // By path: a descriptor of our own, closed here, would drop this process's
                // POSIX locks on the file (macOS without OFD locks).
                replaced_lock = Some(
                    ImageLock::acquire_path(&dst, LockMode::Write)
                        .map_err(Error::image("locking", &dst))?,
                );
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(source) => return Err(file_err("stat", &dst, source)),
        }
        let name = dst
            .file_name()
            .ok_or_else(|| Error::NotRegularFile { path: dst.clone() })?;
        let dir = dir_of(&dst);
        if !dir.is_dir() {
            return Err(file_err(
                "create a file in",
                &dir,
                io::Error::from_raw_os_error(libc::ENOENT),
            ));
        }
        let tmp = dir.join(format!(
            ".{}.vmdisk-tmp-{}",
            name.to_string_lossy(),
            std::process::id()
        ));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(|source| file_err("create", &tmp, source))?;
        let registered = vmdisk_block::register_temp(&tmp);
        Ok(PendingFile {
            tmp,
            dst,
            overwrite,
            file,
            committed: false,
            _registered: registered,
            _replaced_lock: replaced_lock,
        })
    }

    /// The temporary file's path.
    pub fn tmp_path(&self) -> &Path {
        &self.tmp
    }

    /// Where [`commit`](Self::commit) puts it.
    pub fn dst(&self) -> &Path {
        &self.dst
    }

    /// The open temporary file.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Open the temporary path again: another file was renamed onto it (macOS clones only
    /// into new names, `crate::sys::reflink`).
    pub(crate) fn reopen(&mut self) -> Result<()> {
        self.file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&self.tmp)
            .map_err(|source| file_err("reopen", &self.tmp, source))?;
        Ok(())
    }

    /// fsync the file, rename it to the destination (without replacing a file that appeared
    /// meanwhile, unless overwriting was asked for), fsync the directory.
    pub fn commit(self) -> Result<()> {
        self.finish(true)
    }

    /// Rename into place without waiting for the data to reach the disk (qemu-img convert's
    /// default cache mode): an interrupt or SIGKILL never leaves a partial destination, a
    /// power cut right after may lose the new file's data.
    pub fn commit_unsynced(self) -> Result<()> {
        self.finish(false)
    }

    fn finish(mut self, sync: bool) -> Result<()> {
        if sync {
            self.file
                .sync_all()
                .map_err(|source| file_err("fsync", &self.tmp, source))?;
        }
        rename(&self.tmp, &self.dst, self.overwrite)?;
        self.committed = true;
        if !sync {
            return Ok(());
        }
        let dir = dir_of(&self.dst);
        match File::open(&dir).and_then(|d| d.sync_all()) {
            Ok(()) => Ok(()),
            // Some filesystems cannot fsync a directory; the rename is done either way.
            Err(e) if crate::sys::dir_fsync_unsupported(&e) => Ok(()),
            Err(source) => Err(file_err("fsync the directory", &dir, source)),
        }
    }
}

impl Drop for PendingFile {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

pub(crate) fn dir_of(p: &Path) -> PathBuf {
    match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// rename(2), or a rename that never replaces when `dst` must not be replaced
/// (`crate::sys::rename_noreplace`: renameat2 / renamex_np / a hard link), falling back to a
/// check and a rename where the filesystem has none of them.
fn rename(tmp: &Path, dst: &Path, overwrite: bool) -> Result<()> {
    if !overwrite {
        match crate::sys::rename_noreplace(tmp, dst) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(Error::DestinationExists {
                    path: dst.to_owned(),
                })
            }
            Err(e) if e.kind() == io::ErrorKind::Unsupported => {}
            Err(e) => return Err(file_err("rename into place", dst, e)),
        }
        if std::fs::symlink_metadata(dst).is_ok() {
            return Err(Error::DestinationExists {
                path: dst.to_owned(),
            });
        }
    }
    std::fs::rename(tmp, dst).map_err(|source| file_err("rename into place", dst, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pending_files_vanish_unless_committed() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("x");
        let p = PendingFile::create(&dst, false, 0o644).unwrap();
        let tmp = p.tmp_path().to_owned();
        assert!(tmp.exists());
        assert!(tmp
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with(".x.vmdisk-tmp-"));
        drop(p);
        assert!(!tmp.exists() && !dst.exists());
        let p = PendingFile::create(&dst, false, 0o644).unwrap();
        p.commit_unsynced().unwrap();
        assert!(dst.exists());
    }

    #[test]
    fn a_replaced_destination_is_intact_until_the_rename() {
        let dir = tempfile::tempdir().unwrap();
        let dst = dir.path().join("old");
        std::fs::write(&dst, b"precious").unwrap();
        let p = PendingFile::create(&dst, true, 0o644).unwrap();
        std::io::Write::write_all(&mut p.file(), b"new").unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
        drop(p);
        assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
        let p = PendingFile::create(&dst, true, 0o644).unwrap();
        std::io::Write::write_all(&mut p.file(), b"new").unwrap();
        p.commit().unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), b"new");
    }

    #[test]
    fn a_directory_is_not_a_destination() {
        let dir = tempfile::tempdir().unwrap();
        let e = PendingFile::create(dir.path(), true, 0o644).unwrap_err();
        assert!(matches!(e, Error::IsADirectory { .. }), "{e}");
    }

    #[test]
    fn free_space_is_known_for_a_real_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(free_space(dir.path()).unwrap() > 0);
        let e = ensure_space(&dir.path().join("f"), u64::MAX).unwrap_err();
        assert!(matches!(e, Error::NoSpace { .. }), "{e}");
    }
}
