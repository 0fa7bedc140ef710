//! qemu-compatible image locks.
//!
//! qemu marks what it does with an image with fcntl byte-range locks, all shared
//! (`F_RDLCK`): byte `100 + bit` for each permission it holds and byte `200 + bit` for each
//! permission it refuses to share with others. Before trusting its locks it probes the
//! opposite bytes with GETLK/`F_WRLCK`: a lock there held by someone else is a conflict.
//! vmdisk takes exactly the same locks, so qemu refuses an image vmdisk is writing and vmdisk
//! refuses one a running qemu is writing.
//!
//! ```text
//!  byte 100 101   102             103    | 200 201   202             203
//!       read write write-unchanged resize |  (same bits: "I do not share this")
//! ```
//!
//! Which fcntl locks, as qemu (util/osdep.c `qemu_has_ofd_lock`, block/file-posix.c): open
//! file description (OFD) locks where the system has them — Linux, and macOS kernels that
//! answer `F_OFD_GETLK` — else process-associated POSIX locks ([`crate::sys::lock_kind`];
//! the portable switch forces POSIX). The two kinds live in one lock table per file on Linux
//! and on macOS, so either kind conflicts with the other: vmdisk with POSIX locks and a qemu
//! with OFD locks (or `locking=on` POSIX locks) still exclude each other. (A qemu built
//! without OFD support and left at `locking=auto` takes no locks at all: nothing can see it.)
//!
//! - OFD: each [`ImageLock`] has its own open file description; it conflicts with every other
//!   description, in this process or another, and its locks go when it is dropped.
//! - POSIX ([`posix`]): locks belong to the process, never conflict with the process's own,
//!   and all vanish when the process closes *any* descriptor of the file. So the process
//!   keeps one table: per file (device, inode) one descriptor the locks are set through, the
//!   permissions of every live `ImageLock` on it (checked against each other, which restores
//!   the OFD behaviour inside the process), and the descriptors of that file that
//!   [`crate::RawFile`]s and failed lock attempts would have closed, parked until the last
//!   `ImageLock` on the file goes. Every acquire and release sets the union of the holders'
//!   bytes again. What stays a hazard is a plain `std::fs::File` on a locked image opened and
//!   closed elsewhere in the process: image files are opened through `RawFile` and
//!   [`ImageLock::acquire_path`] for that reason.

mod posix;

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::sys::{self, LockKind};
use crate::{Error, Result};

pub(crate) use posix::park;

const PERM_BASE: u64 = 100;
const SHARED_BASE: u64 = 200;

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

/// The bytes a holder of (`held`, `unshared`) locks.
fn bytes_of(held: u8, unshared: u8) -> impl Iterator<Item = u64> {
    (0..4u64)
        .filter(move |b| held & (1 << b) != 0)
        .map(|b| PERM_BASE + b)
        .chain(
            (0..4u64)
                .filter(move |b| unshared & (1 << b) != 0)
                .map(|b| SHARED_BASE + b),
        )
}

/// A conflict, as the user reads it: `bit` of someone's permissions, or of their refusals.
fn conflict(path: &Path, bit: usize, refused: bool, pid: Option<i32>) -> Error {
    let name = PERM_NAMES[bit];
    Error::Locked {
        path: path.to_owned(),
        what: if refused {
            format!("{name} (not shared)")
        } else {
            name.to_string()
        },
        pid,
    }
}

/// Where the descriptor to lock through comes from.
#[derive(Clone, Copy)]
enum Source<'a> {
    /// The caller's open file (it keeps it).
    File(&'a File),
    /// Open the path ourselves.
    Path,
}

#[derive(Debug)]
enum Held {
    /// The locks live on this open file description (closed on drop).
    Ofd { _fd: File },
    /// The locks are the process's; the table knows this holder (released on drop).
    Posix { _ticket: posix::Ticket },
}

/// Held qemu-style locks on one image; released on drop.
#[derive(Debug)]
pub struct ImageLock {
    held: Held,
    path: PathBuf,
    mode: LockMode,
}

impl ImageLock {
    /// Take the locks for `mode` on the file `file` is open on. With OFD locks a fresh open
    /// file description is made from it; with POSIX locks the caller must not close `file`
    /// while the lock lives (a `RawFile` parks it when dropped; see the module docs).
    pub fn acquire(file: &File, path: &Path, mode: LockMode) -> Result<Self> {
        Self::take(sys::lock_kind(), Source::File(file), path, mode)
    }

    /// Open `path` and take the locks for `mode` on it, for callers that need the lock and
    /// no descriptor of their own (which, closed, would drop the process's POSIX locks).
    pub fn acquire_path(path: &Path, mode: LockMode) -> Result<Self> {
        Self::take(sys::lock_kind(), Source::Path, path, mode)
    }

    pub fn mode(&self) -> LockMode {
        self.mode
    }

    /// The image the locks are on.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The kind of fcntl locks this lock was taken with.
    pub fn kind(&self) -> LockKind {
        match self.held {
            Held::Ofd { .. } => LockKind::Ofd,
            Held::Posix { .. } => LockKind::Posix,
        }
    }

    fn take(kind: LockKind, src: Source<'_>, path: &Path, mode: LockMode) -> Result<Self> {
        let (held, unshared) = mode.perms();
        let held = match kind {
            LockKind::Ofd => Held::Ofd {
                _fd: take_ofd(src, path, held, unshared)?,
            },
            LockKind::Posix => Held::Posix {
                _ticket: posix::acquire(src, path, held, unshared)?,
            },
        };
        Ok(ImageLock {
            held,
            path: path.to_owned(),
            mode,
        })
    }
}

fn open_for_locking(src: Source<'_>, path: &Path) -> Result<File> {
    match src {
        Source::File(f) => sys::reopen(f, path),
        Source::Path => File::open(path),
    }
    .map_err(|source| Error::File {
        op: "open for locking",
        path: path.to_owned(),
        source,
    })
}

fn lock_err(path: &Path, byte: u64, e: std::io::Error) -> Error {
    if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) {
        return Error::Locked {
            path: path.to_owned(),
            what: format!("byte {byte}"),
            pid: None,
        };
    }
    Error::File {
        op: "lock",
        path: path.to_owned(),
        source: e,
    }
}

/// Would an exclusive lock on `byte` conflict with someone else's lock? Their pid if known.
fn probe(f: &File, kind: LockKind, path: &Path, byte: u64) -> Result<Option<Option<i32>>> {
    sys::get_lock(f, kind, byte)
        .map(|h| h.map(|h| h.pid))
        .map_err(|source| Error::File {
            op: "probe the locks of",
            path: path.to_owned(),
            source,
        })
}

/// Set our bytes, then look for others' conflicting ones (qemu's order: a racing peer sees
/// ours before we look for theirs). Someone else's conflict is found on the opposite byte.
fn set_and_check(
    f: &File,
    kind: LockKind,
    path: &Path,
    set: impl Iterator<Item = u64>,
    held: u8,
    unshared: u8,
) -> Result<()> {
    for byte in set {
        sys::set_lock(f, kind, byte, true).map_err(|e| lock_err(path, byte, e))?;
    }
    for bit in 0..4usize {
        if held & (1 << bit) != 0 {
            if let Some(pid) = probe(f, kind, path, SHARED_BASE + bit as u64)? {
                return Err(conflict(path, bit, true, pid));
            }
        }
        if unshared & (1 << bit) != 0 {
            if let Some(pid) = probe(f, kind, path, PERM_BASE + bit as u64)? {
                return Err(conflict(path, bit, false, pid));
            }
        }
    }
    Ok(())
}

fn take_ofd(src: Source<'_>, path: &Path, held: u8, unshared: u8) -> Result<File> {
    let f = open_for_locking(src, path)?;
    set_and_check(
        &f,
        LockKind::Ofd,
        path,
        bytes_of(held, unshared),
        held,
        unshared,
    )?;
    Ok(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(dir: &Path) -> (File, PathBuf) {
        let p = dir.join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        (File::open(&p).unwrap(), p)
    }

    fn take(kind: LockKind, f: &File, p: &Path, mode: LockMode) -> Result<ImageLock> {
        ImageLock::take(kind, Source::File(f), p, mode)
    }

    const KINDS: [LockKind; 2] = [LockKind::Ofd, LockKind::Posix];

    #[test]
    fn readers_share() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            let (f, p) = file(dir.path());
            let a = take(kind, &f, &p, LockMode::Read).unwrap();
            let _b = take(kind, &f, &p, LockMode::Read).unwrap();
            assert_eq!(a.kind(), kind);
        }
    }

    #[test]
    fn writer_excludes_writer_and_reader() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            let (f, p) = file(dir.path());
            let w = take(kind, &f, &p, LockMode::Write).unwrap();
            let e = take(kind, &f, &p, LockMode::Write).unwrap_err();
            assert!(e.to_string().contains("write"), "{kind:?}: {e}");
            assert!(take(kind, &f, &p, LockMode::Read).is_err(), "{kind:?}");
            drop(w);
            take(kind, &f, &p, LockMode::Write).unwrap();
        }
    }

    #[test]
    fn reader_excludes_writer() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            let (f, p) = file(dir.path());
            let _r = take(kind, &f, &p, LockMode::Read).unwrap();
            let e = take(kind, &f, &p, LockMode::Write).unwrap_err();
            assert!(matches!(e, Error::Locked { .. }), "{kind:?}: {e}");
        }
    }

    #[test]
    fn acquire_path_locks_like_acquire() {
        for kind in KINDS {
            let dir = tempfile::tempdir().unwrap();
            let (f, p) = file(dir.path());
            let w = ImageLock::take(kind, Source::Path, &p, LockMode::Write).unwrap();
            assert!(take(kind, &f, &p, LockMode::Read).is_err(), "{kind:?}");
            drop(w);
            let _r = take(kind, &f, &p, LockMode::Read).unwrap();
        }
    }

    #[test]
    fn a_missing_path_is_a_file_error() {
        let dir = tempfile::tempdir().unwrap();
        for kind in KINDS {
            let e = ImageLock::take(kind, Source::Path, &dir.path().join("nope"), LockMode::Read)
                .unwrap_err();
            assert!(matches!(e, Error::File { .. }), "{kind:?}: {e}");
        }
    }
}
