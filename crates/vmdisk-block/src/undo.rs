//! [`UndoFile`]: an in-place edit of a host file as a transaction.
//!
//! ```text
//!   writer (qcow2 engine, ext4 editor, commit ...) ──▶ UndoFile ──▶ RawFile (the user's image)
//!                                                        │ before the first write to a range
//!                                                        │ of the original file: its old bytes
//!                                                        ▼ (or "was a hole") go to
//!                                                      undo log: an unlinked file beside it
//!   commit():   flush the image, forget the log
//!   rollback(): (or drop without commit) put every saved range back, newest first, punch the
//!               holes again, restore the original length, flush — the file is byte-identical
//! ```
//!
//! The log is saved *before* the write it protects, so running out of space (ENOSPC) while
//! saving stops the edit before it touched the range, and the rollback needs no new space.
//! The log is anonymous: a SIGKILL drops it, and what protects the image then is the writer's
//! own ordering (the qcow2 engine's and the ext4 editor's crash safety) — the undo log is for
//! the failures a process survives: errors, interrupts, a full disk.
//!
//! Only bytes of the *original* file are saved: what lies beyond the original end is simply
//! cut off by the rollback, so an edit that appends (new qcow2 clusters) costs no extra IO.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use crate::{BlockDevice, Error, Extent, ExtentKind, RawFile, Result};

/// Bytes copied into the log per read (bounds the buffer).
const SAVE_CHUNK: u64 = 1 << 20;

#[derive(Debug, Clone, Copy)]
enum Saved {
    /// `len` bytes at `off` were data; their old bytes are at `log_off` in the log.
    Data { off: u64, len: u64, log_off: u64 },
    /// `len` bytes at `off` were a hole.
    Hole { off: u64, len: u64 },
}

#[derive(Debug)]
struct State {
    /// The file's length when the transaction began.
    orig_len: u64,
    /// Ranges of the original file already saved: start -> end, disjoint, merged.
    saved: BTreeMap<u64, u64>,
    /// What was saved, in order.
    entries: Vec<Saved>,
    /// The log (created on the first save).
    log: Option<File>,
    log_len: u64,
    /// Committed or rolled back: writes pass straight through.
    finished: bool,
    /// On the process's list of open edits from the first change until finished, so a second
    /// Ctrl-C waits for the rollback instead of exiting half-way (see `crate::cancel`).
    registered: Option<crate::cancel::RegisteredEdit>,
}

/// A host file whose changes can be undone until [`UndoFile::commit`] (see the module docs).
#[derive(Debug)]
pub struct UndoFile {
    inner: Arc<RawFile>,
    state: Mutex<State>,
}

impl UndoFile {
    /// Begin a transaction on `inner` (opened read-write).
    pub fn new(inner: Arc<RawFile>) -> Self {
        let orig_len = inner.len();
        UndoFile {
            inner,
            state: Mutex::new(State {
                orig_len,
                saved: BTreeMap::new(),
                entries: Vec::new(),
                log: None,
                log_len: 0,
                finished: false,
                registered: None,
            }),
        }
    }

    /// The file underneath.
    pub fn raw(&self) -> &Arc<RawFile> {
        &self.inner
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes of old content kept so far (what a rollback would write back).
    pub fn saved_bytes(&self) -> u64 {
        self.lock().log_len
    }

    /// Make the changes final: flush the file and drop the log.
    pub fn commit(&self) -> Result<()> {
        let mut st = self.lock();
        if st.finished {
            return Ok(());
        }
        self.inner.flush()?;
        st.finished = true;
        st.log = None;
        st.entries.clear();
        st.registered = None;
        Ok(())
    }

    /// Undo every change since the transaction began (see the module docs). Idempotent; after
    /// it, writes pass straight through.
    pub fn rollback(&self) -> Result<()> {
        let mut st = self.lock();
        if st.finished {
            return Ok(());
        }
        let mut first_err = None;
        let mut buf = Vec::new();
        for e in st.entries.iter().rev() {
            let r = match *e {
                Saved::Data { off, len, log_off } => {
                    restore_data(&self.inner, st.log.as_ref(), off, len, log_off, &mut buf)
                }
                Saved::Hole { off, len } => {
                    // The file may have been cut shorter meanwhile: grow it back first.
                    grow_to(&self.inner, off + len)
                        .and_then(|()| self.inner.write_zeroes(off, len, true))
                }
            };
            if let Err(e) = r {
                first_err.get_or_insert(e);
            }
        }
        if self.inner.len() != st.orig_len {
            if let Err(e) = self.inner.resize(st.orig_len) {
                first_err.get_or_insert(e);
            }
        }
        if let Err(e) = self.inner.flush() {
            first_err.get_or_insert(e);
        }
        st.finished = true;
        st.log = None;
        st.entries.clear();
        st.registered = None;
        match first_err {
            None => Ok(()),
            Some(e) => Err(e),
        }
    }

    /// Save the old content of `[off, off+len)` (clipped to the original file) that is not
    /// saved yet.
    fn save(&self, st: &mut State, off: u64, len: u64) -> Result<()> {
        if st.finished {
            return Ok(());
        }
        if st.registered.is_none() {
            st.registered = Some(crate::cancel::register_edit(self.inner.path()));
        }
        let end = off
            .saturating_add(len)
            .min(st.orig_len)
            .min(self.inner.len());
        let mut pos = off;
        while pos < end {
            // Inside an interval saved before: skip to its end.
            if let Some((_, &e)) = st.saved.range(..=pos).next_back() {
                if e > pos {
                    pos = e;
                    continue;
                }
            }
            let gap_end = st
                .saved
                .range(pos..)
                .next()
                .map(|(&s, _)| s.min(end))
                .unwrap_or(end);
            self.save_gap(st, pos, gap_end)?;
            insert_interval(&mut st.saved, pos, gap_end);
            pos = gap_end;
        }
        Ok(())
    }

    fn save_gap(&self, st: &mut State, off: u64, end: u64) -> Result<()> {
        for ext in self.inner.block_status(off, end - off)? {
            match ext.kind {
                ExtentKind::Data => {
                    let mut pos = ext.off;
                    while pos < ext.end() {
                        let n = SAVE_CHUNK.min(ext.end() - pos);
                        let mut buf = vec![0u8; n as usize];
                        self.inner.read_exact_at(&mut buf, pos)?;
                        let log_off = st.log_len;
                        let log = match &st.log {
                            Some(l) => l,
                            None => st.log.insert(new_log(self.inner.path())?),
                        };
                        log.write_all_at(&buf, log_off)
                            .map_err(|e| Error::io("saving the undo copy of", pos, e))?;
                        st.log_len += n;
                        st.entries.push(Saved::Data {
                            off: pos,
                            len: n,
                            log_off,
                        });
                        pos += n;
                    }
                }
                _ => st.entries.push(Saved::Hole {
                    off: ext.off,
                    len: ext.len,
                }),
            }
        }
        Ok(())
    }
}

impl Drop for UndoFile {
    fn drop(&mut self) {
        // Nobody committed: an error, a panic or an interrupt ended the edit.
        let _ = self.rollback();
    }
}

fn new_log(image: &Path) -> Result<File> {
    let dir = match image.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => std::path::PathBuf::from("."),
    };
    // Beside the image (same filesystem, so saving cannot fill another one), unlinked at once.
    tempfile::tempfile_in(&dir).map_err(|source| Error::File {
        op: "create the undo log in",
        path: dir,
        source,
    })
}

fn restore_data(
    f: &RawFile,
    log: Option<&File>,
    off: u64,
    len: u64,
    log_off: u64,
    buf: &mut Vec<u8>,
) -> Result<()> {
    let log = log.ok_or_else(|| Error::corrupt("undo log missing", off))?;
    buf.resize(len as usize, 0);
    log.read_exact_at(buf, log_off)
        .map_err(|e| Error::io("reading the undo log for", off, e))?;
    grow_to(f, off + len)?;
    f.write_all_at(buf, off)
}

fn grow_to(f: &RawFile, end: u64) -> Result<()> {
    if f.len() < end {
        f.resize(end)?;
    }
    Ok(())
}

fn insert_interval(map: &mut BTreeMap<u64, u64>, mut start: u64, mut end: u64) {
    if let Some((&s, &e)) = map.range(..=start).next_back() {
        if e >= start {
            start = s;
            end = end.max(e);
            map.remove(&s);
        }
    }
    while let Some((&s, &e)) = map.range(start..).next() {
        if s > end {
            break;
        }
        end = end.max(e);
        map.remove(&s);
    }
    map.insert(start, end);
}

impl BlockDevice for UndoFile {
    fn len(&self) -> u64 {
        self.inner.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        self.inner.read_exact_at(buf, off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        crate::check_range(self.len(), off, buf.len() as u64)?;
        let mut st = self.lock();
        self.save(&mut st, off, buf.len() as u64)?;
        self.inner.write_all_at(buf, off)
    }

    fn flush(&self) -> Result<()> {
        self.inner.flush()
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        self.inner.block_status(off, len)
    }

    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        crate::check_range(self.len(), off, len)?;
        let mut st = self.lock();
        self.save(&mut st, off, len)?;
        self.inner.write_zeroes(off, len, may_unmap)
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        crate::check_range(self.len(), off, len)?;
        let mut st = self.lock();
        self.save(&mut st, off, len)?;
        self.inner.discard(off, len)
    }

    fn resize(&self, new_len: u64) -> Result<()> {
        let mut st = self.lock();
        let cur = self.inner.len();
        // A file that only grows needs a rollback too (it is cut back): `save` registers it.
        self.save(&mut st, new_len.min(cur), cur.saturating_sub(new_len))?;
        self.inner.resize(new_len)
    }

    fn is_read_only(&self) -> bool {
        self.inner.is_read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(dir: &Path, name: &str, content: &[(u64, &[u8])], len: u64) -> Arc<RawFile> {
        let p = dir.join(name);
        let f = RawFile::create(&p, len).unwrap();
        for (off, b) in content {
            f.write_all_at(b, *off).unwrap();
        }
        Arc::new(f)
    }

    fn bytes(f: &RawFile) -> Vec<u8> {
        let mut b = vec![0u8; f.len() as usize];
        f.read_exact_at(&mut b, 0).unwrap();
        b
    }

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        crate::conformance::run_all(|len| {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let raw = RawFile::create(dir.path().join(format!("d{i}")), len).unwrap();
            UndoFile::new(Arc::new(raw))
        });
    }

    #[test]
    fn rollback_restores_every_byte_and_the_length() {
        let dir = tempfile::tempdir().unwrap();
        let raw = file_with(
            dir.path(),
            "img",
            &[(0, &[1u8; 5000]), (1 << 20, &[2u8; 4096])],
            4 << 20,
        );
        let before = bytes(&raw);
        let u = UndoFile::new(raw.clone());
        u.write_all_at(&[9u8; 10000], 100).unwrap(); // over data and a hole
        u.write_all_at(&[8u8; 10], 200).unwrap(); // again: saved once
        u.write_zeroes(1 << 20, 4096, true).unwrap();
        u.resize(8 << 20).unwrap(); // grow
        u.write_all_at(&[7u8; 4096], 6 << 20).unwrap(); // beyond the old end: not saved
        u.resize(3 << 20).unwrap(); // shrink below the old end: the tail is saved
        assert!(u.saved_bytes() > 0);
        u.rollback().unwrap();
        assert_eq!(raw.len(), 4 << 20);
        assert_eq!(bytes(&raw), before);
        // Holes stay holes.
        let st = raw.block_status(2 << 20, 1 << 20).unwrap();
        assert!(st.iter().all(|e| e.kind == ExtentKind::Zero), "{st:?}");
    }

    #[test]
    fn drop_without_commit_rolls_back_and_commit_keeps() {
        let dir = tempfile::tempdir().unwrap();
        let raw = file_with(dir.path(), "img", &[(0, &[1u8; 4096])], 1 << 20);
        let before = bytes(&raw);
        {
            let u = UndoFile::new(raw.clone());
            u.write_all_at(&[5u8; 4096], 0).unwrap();
        }
        assert_eq!(bytes(&raw), before);
        let u = UndoFile::new(raw.clone());
        u.write_all_at(&[5u8; 4096], 0).unwrap();
        u.commit().unwrap();
        drop(u);
        assert_eq!(&bytes(&raw)[..4096], &[5u8; 4096][..]);
    }

    #[test]
    fn an_open_edit_is_pending_until_it_is_finished() {
        let dir = tempfile::tempdir().unwrap();
        let raw = file_with(dir.path(), "pending", &[(0, &[1u8; 4096])], 1 << 20);
        let pending = || {
            crate::cancel::pending_edits()
                .iter()
                .any(|p| p == raw.path())
        };
        let u = UndoFile::new(raw.clone());
        assert!(!pending(), "nothing written yet: nothing to put back");
        u.resize(2 << 20).unwrap();
        assert!(pending(), "a file that grew must be cut back");
        u.rollback().unwrap();
        assert!(!pending());
        let u = UndoFile::new(raw.clone());
        u.write_all_at(&[2u8; 10], 0).unwrap();
        assert!(pending());
        u.commit().unwrap();
        assert!(!pending());
    }

    #[test]
    fn intervals_merge() {
        let mut m = BTreeMap::new();
        insert_interval(&mut m, 10, 20);
        insert_interval(&mut m, 30, 40);
        insert_interval(&mut m, 20, 30);
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(10, 40)]);
        let mut m = BTreeMap::new();
        insert_interval(&mut m, 10, 20);
        insert_interval(&mut m, 5, 50);
        assert_eq!(m.into_iter().collect::<Vec<_>>(), vec![(5, 50)]);
    }
}
