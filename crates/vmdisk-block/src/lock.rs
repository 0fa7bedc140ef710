//! qemu-compatible image locks.
//!
//! qemu marks what it does with an image with fcntl OFD byte-range locks, all shared
//! (`F_RDLCK`): byte `100 + bit` for each permission it holds and byte `200 + bit` for each
//! permission it refuses to share with others. Before trusting its locks it probes the
//! opposite bytes with `F_OFD_GETLK`/`F_WRLCK`: a lock there held by another open file
//! description is a conflict. vmdisk takes exactly the same locks, so qemu refuses an image
//! vmdisk is writing and vmdisk refuses one a running qemu is writing.
//!
//! ```text
//!  byte 100 101   102             103    | 200 201   202             203
//!       read write write-unchanged resize |  (same bits: "I do not share this")
//! ```
//!
//! The locks live as long as the [`ImageLock`] (its own open file description).

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;

/// qemu's permission bits, in its order.
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];
const CONSISTENT_READ: u8 = 1 << 0;
const WRITE: u8 = 1 << 1;
const RESIZE: u8 = 1 << 3;

/// What the holder will do with the image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Read with a consistent view: refuses concurrent writers, allows other readers.
    Read,
    /// Write (and grow): refuses other writers and resizers, allows readers that accept that.
    Write,
}

impl LockMode {
    /// (permissions held, permissions not shared)
    fn perms(self) -> (u8, u8) {
        match self {
            LockMode::Read => (CONSISTENT_READ, WRITE | RESIZE),
            LockMode::Write => (CONSISTENT_READ | WRITE | RESIZE, WRITE | RESIZE),
        }
    }
}

/// Held qemu-style locks on one image; released on drop.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
    path: PathBuf,
    mode: LockMode,
}

impl ImageLock {
    /// Take the locks for `mode` on `file` (a fresh open file description is made from it).
    pub fn acquire(file: &File, path: &Path, mode: LockMode) -> Result<Self> {
        let file = reopen(file, path)?;
        let lock = ImageLock {
            file,
            path: path.to_owned(),
            mode,
        };
        let (held, unshared) = mode.perms();
        for bit in 0..4 {
            if held & (1 << bit) != 0 {
                lock.set(PERM_BASE + bit)?;
            }
            if unshared & (1 << bit) != 0 {
                lock.set(SHARED_BASE + bit)?;
            }
        }
        for bit in 0..4u8 {
            if held & (1 << bit) != 0 && lock.conflicts(SHARED_BASE + bit as i64)? {
                return Err(lock.locked(format!(
                    "{}\" (it refuses to share it",
                    PERM_NAMES[bit as usize]
                )));
            }
            if unshared & (1 << bit) != 0 && lock.conflicts(PERM_BASE + bit as i64)? {
                return Err(lock.locked(PERM_NAMES[bit as usize].to_string()));
            }
        }
        Ok(lock)
    }

    pub fn mode(&self) -> LockMode {
        self.mode
    }

    fn locked(&self, what: String) -> Error {
        Error::Locked {
            path: self.path.clone(),
            what: what.replace("\" (it refuses to share it", " (not shared)"),
            pid: None,
        }
    }

    fn set(&self, byte: i64) -> Result<()> {
        let mut fl = flock(libc::F_RDLCK, byte);
        // SAFETY: fcntl with F_OFD_SETLK reads the valid, initialised flock struct.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_SETLK, &mut fl) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
                return Err(self.locked(format!("byte {byte}")));
            }
            return Err(Error::File {
                op: "lock",
                path: self.path.clone(),
                source: e,
            });
        }
        Ok(())
    }

    /// Would an exclusive lock on `byte` conflict with someone else's lock?
    fn conflicts(&self, byte: i64) -> Result<bool> {
        let mut fl = flock(libc::F_WRLCK, byte);
        // SAFETY: fcntl with F_OFD_GETLK writes into the valid flock struct we own.
        let r = unsafe { libc::fcntl(self.file.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
        if r < 0 {
            return Err(Error::File {
                op: "probe the locks of",
                path: self.path.clone(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
    }
}

fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value that we then fill in.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    fl.l_pid = 0;
    fl
}

/// A new open file description for the same file (OFD locks belong to the description,
/// and a caller may hold several images on one path).
fn reopen(file: &File, path: &Path) -> Result<File> {
    let fd_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    std::fs::OpenOptions::new()
        .read(true)
        .open(&fd_path)
        .or_else(|_| std::fs::File::open(path))
        .map_err(|source| Error::File {
            op: "open for locking",
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path) -> (File, PathBuf) {
        let p = dir.join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        (File::open(&p).unwrap(), p)
    }

    #[test]
    fn readers_share() {
        let dir = tempfile::tempdir().unwrap();
        let (f, p) = file(dir.path());
        let _a = ImageLock::acquire(&f, &p, LockMode::Read).unwrap();
        let _b = ImageLock::acquire(&f, &p, LockMode::Read).unwrap();
    }

    #[test]
    fn writer_excludes_writer_and_reader() {
        let dir = tempfile::tempdir().unwrap();
        let (f, p) = file(dir.path());
        let w = ImageLock::acquire(&f, &p, LockMode::Write).unwrap();
        let e = ImageLock::acquire(&f, &p, LockMode::Write).unwrap_err();
        assert!(e.to_string().contains("write"), "{e}");
        assert!(ImageLock::acquire(&f, &p, LockMode::Read).is_err());
        drop(w);
        ImageLock::acquire(&f, &p, LockMode::Write).unwrap();
    }

    #[test]
    fn reader_excludes_writer() {
        let dir = tempfile::tempdir().unwrap();
        let (f, p) = file(dir.path());
        let _r = ImageLock::acquire(&f, &p, LockMode::Read).unwrap();
        let e = ImageLock::acquire(&f, &p, LockMode::Write).unwrap_err();
        assert!(matches!(e, Error::Locked { .. }), "{e}");
    }
}
