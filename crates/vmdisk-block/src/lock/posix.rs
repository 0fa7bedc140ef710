//! Image locks with process-associated POSIX locks: the process's table (see the parent
//! module's docs for why it exists).
//!
//! ```text
//!  TABLE: (dev, ino) ──▶ Entry { fd      the descriptor every F_SETLK/F_GETLK goes through,
//!                                holders (ticket id, held bits, unshared bits) per ImageLock,
//!                                parked  descriptors of the file not closed yet }
//!  acquire: in-process conflicts vs holders ─▶ add holder ─▶ F_SETLK the union ─▶ F_GETLK
//!           the opposite bytes (others' locks only: the kernel never reports our own)
//!  release: drop holder ─▶ F_UNLCK what no holder needs, F_SETLK the rest again; last
//!           holder gone: close fd and parked (nothing of ours is left to lose)
//! ```

use std::collections::btree_map::Entry as Slot;
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use super::{bytes_of, conflict, open_for_locking, set_and_check, Source};
use crate::sys::{self, LockKind};
use crate::{Error, Result};

/// Descriptors of one locked file kept open at most. Each `RawFile` dropped while its file
/// is locked adds one; past this many the oldest is closed and the locks are set again, so a
/// process that reopens a locked image in a loop holds a bounded number of descriptors.
const MAX_PARKED_FDS: usize = 64;

type Key = (u64, u64);

#[derive(Debug)]
struct Holder {
    id: u64,
    held: u8,
    unshared: u8,
}

#[derive(Debug)]
struct Entry {
    fd: File,
    holders: Vec<Holder>,
    parked: Vec<File>,
}

impl Entry {
    /// Every byte some holder needs.
    fn union(&self) -> (u8, u8) {
        self.holders
            .iter()
            .fold((0, 0), |(h, u), x| (h | x.held, u | x.unshared))
    }

    /// Set the bytes the holders need again and release the others (best effort: a failure
    /// here can only be a lost lock the next acquire reports).
    fn reassert(&self) {
        let (held, unshared) = self.union();
        let wanted: Vec<u64> = bytes_of(held, unshared).collect();
        for byte in bytes_of(0x0f, 0x0f) {
            let _ = sys::set_lock(&self.fd, LockKind::Posix, byte, wanted.contains(&byte));
        }
    }
}

static TABLE: Mutex<BTreeMap<Key, Entry>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn table() -> MutexGuard<'static, BTreeMap<Key, Entry>> {
    TABLE.lock().unwrap_or_else(|e| e.into_inner())
}

fn key_of(f: &File, path: &Path) -> Result<Key> {
    let m = f.metadata().map_err(|source| Error::File {
        op: "stat for locking",
        path: path.to_owned(),
        source,
    })?;
    Ok((m.dev(), m.ino()))
}

/// One `ImageLock`'s place in the table; dropping it releases what only it needed.
#[derive(Debug)]
pub(crate) struct Ticket {
    key: Key,
    id: u64,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let mut t = table();
        let Some(e) = t.get_mut(&self.key) else {
            return;
        };
        e.holders.retain(|h| h.id != self.id);
        if e.holders.is_empty() {
            // Closing the descriptors drops whatever of ours is left on the file.
            t.remove(&self.key);
        } else {
            e.reassert();
        }
    }
}

/// Take `held` / `unshared` on the file of `src` (see the module docs).
pub(super) fn acquire(src: Source<'_>, path: &Path, held: u8, unshared: u8) -> Result<Ticket> {
    // With a path, our own descriptor: it goes into the table (as its fd or parked), never
    // closed while the file is locked. (Should fstat fail on it, it closes with nothing to
    // go into: fstat of an open descriptor fails only on a dead NFS mount.)
    let (key, opened) = match src {
        Source::File(f) => (key_of(f, path)?, None),
        Source::Path => {
            let f = open_for_locking(src, path)?;
            (key_of(&f, path)?, Some(f))
        }
    };
    let mut t = table();
    let e = match t.entry(key) {
        Slot::Occupied(o) => {
            let e = o.into_mut();
            if let Some(f) = opened {
                park_in(e, f);
            }
            e
        }
        Slot::Vacant(v) => {
            let fd = match opened {
                Some(f) => f,
                None => open_for_locking(src, path)?,
            };
            v.insert(Entry {
                fd,
                holders: Vec::new(),
                parked: Vec::new(),
            })
        }
    };

    // Inside the process: the conflicts OFD locks would have shown. (A conflict needs a
    // holder, so the entry stays.)
    let in_process = e.holders.iter().find_map(|h| {
        (0..4usize).find_map(|bit| {
            if held & h.unshared & (1 << bit) != 0 {
                Some(conflict(path, bit, true, None))
            } else if unshared & h.held & (1 << bit) != 0 {
                Some(conflict(path, bit, false, None))
            } else {
                None
            }
        })
    });
    if let Some(err) = in_process {
        return Err(err);
    }
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    e.holders.push(Holder { id, held, unshared });
    let (all_held, all_unshared) = e.union();
    // Every byte again, the earlier holders' too: a descriptor closed elsewhere in the
    // process may have dropped them.
    let r = set_and_check(
        &e.fd,
        LockKind::Posix,
        path,
        bytes_of(all_held, all_unshared),
        held,
        unshared,
    );
    drop(t);
    let ticket = Ticket { key, id };
    // On an error the ticket's drop releases what only this holder wanted.
    r.map(|()| ticket)
}

fn park_in(e: &mut Entry, f: File) {
    if e.parked.len() >= MAX_PARKED_FDS {
        drop(e.parked.remove(0));
        e.reassert();
    }
    e.parked.push(f);
}

/// Close `f` — unless its file is locked with POSIX locks by this process, whose locks the
/// close would drop: then keep it open until the last lock on the file goes.
pub(crate) fn park(f: File) {
    let mut t = table();
    if t.is_empty() {
        return;
    }
    let Ok(m) = f.metadata() else {
        return;
    };
    if let Some(e) = t.get_mut(&(m.dev(), m.ino())) {
        park_in(e, f);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::{LockMode, PERM_BASE, SHARED_BASE};

    fn entry_state(p: &Path) -> Option<(usize, usize)> {
        let m = std::fs::metadata(p).unwrap();
        table()
            .get(&(m.dev(), m.ino()))
            .map(|e| (e.holders.len(), e.parked.len()))
    }

    /// Does this process hold a POSIX lock on `byte`? An OFD probe from a new description
    /// sees the process's POSIX locks (a different owner), which a POSIX probe would not.
    fn we_hold(p: &Path, byte: u64) -> bool {
        let f = File::open(p).unwrap();
        let held = sys::get_lock(&f, LockKind::Ofd, byte).unwrap().is_some();
        // Closing this descriptor would drop the locks: keep it, like RawFile does.
        park(f);
        held
    }

    #[test]
    fn closing_other_descriptors_keeps_the_locks() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let w = super::super::ImageLock::take(LockKind::Posix, Source::Path, &p, LockMode::Write)
            .unwrap();
        assert!(we_hold(&p, PERM_BASE + 1) && we_hold(&p, SHARED_BASE + 1));
        // A RawFile opened and dropped: its descriptor is parked, the locks stay.
        drop(crate::RawFile::open(&p, true).unwrap());
        assert!(
            we_hold(&p, PERM_BASE + 1),
            "a RawFile's close dropped the locks"
        );
        // A second lock that fails (in-process conflict) leaves the first intact.
        let f = File::open(&p).unwrap();
        assert!(super::super::ImageLock::take(
            LockKind::Posix,
            Source::File(&f),
            &p,
            LockMode::Read
        )
        .is_err());
        park(f);
        assert!(we_hold(&p, SHARED_BASE + 1));
        // A path lock that fails parks its descriptor too.
        assert!(
            super::super::ImageLock::take(LockKind::Posix, Source::Path, &p, LockMode::Read)
                .is_err()
        );
        assert!(we_hold(&p, PERM_BASE + 1));
        assert_eq!(entry_state(&p).map(|s| s.0), Some(1));
        drop(w);
        assert_eq!(
            entry_state(&p),
            None,
            "the last holder's drop empties the entry"
        );
        assert!(!we_hold(&p, PERM_BASE + 1) && !we_hold(&p, SHARED_BASE + 1));
    }

    #[test]
    fn a_release_keeps_what_other_holders_need() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let take = |m| super::super::ImageLock::take(LockKind::Posix, Source::Path, &p, m);
        let a = take(LockMode::Read).unwrap();
        let b = take(LockMode::Read).unwrap();
        drop(a);
        assert!(
            we_hold(&p, PERM_BASE),
            "b's consistent-read byte went with a"
        );
        assert!(we_hold(&p, SHARED_BASE + 1));
        drop(b);
        assert!(!we_hold(&p, PERM_BASE));
    }

    #[test]
    fn parked_descriptors_are_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("img");
        std::fs::write(&p, [0u8; 4096]).unwrap();
        let _w = super::super::ImageLock::take(LockKind::Posix, Source::Path, &p, LockMode::Write)
            .unwrap();
        for _ in 0..(MAX_PARKED_FDS * 2) {
            park(File::open(&p).unwrap());
        }
        assert_eq!(entry_state(&p).map(|s| s.1), Some(MAX_PARKED_FDS));
        // The closes past the bound were followed by setting the locks again.
        assert!(we_hold(&p, PERM_BASE + 1) && we_hold(&p, SHARED_BASE + 3));
    }
}
