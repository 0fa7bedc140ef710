//! Cooperative cancellation and the process's list of temporary outputs.
//!
//! Long operations (convert, copy, commit, rebase, layouts, cp-out) take a [`Cancel`] and call
//! [`Cancel::check`] between steps; a raised flag turns into [`Error::Interrupted`], and the
//! operation unwinds normally, so every temporary output is removed by its owner's `Drop` and
//! every in-place edit stops at a safe point.
//!
//! [`register_temp`] records a temporary output's path for the one case unwinding cannot
//! cover: a second interrupt while the first is still being honoured, after which the CLI
//! removes every registered path and exits at once ([`remove_registered_temps`]) — unless an
//! in-place edit is still open ([`register_edit`], [`pending_edits`]): exiting then would
//! leave the edited file half-changed, so the CLI waits for its rollback instead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Error, Result};

/// A cancellation flag shared by the code that raises it and the operations that poll it.
/// `Cancel::default()` (or [`Cancel::never`]) can never be raised.
#[derive(Debug, Clone, Default)]
pub struct Cancel(Option<Arc<AtomicBool>>);

impl Cancel {
    /// A flag that can be raised with [`Cancel::cancel`].
    pub fn new() -> Self {
        Cancel(Some(Arc::new(AtomicBool::new(false))))
    }

    /// A flag that is never raised.
    pub fn never() -> Self {
        Cancel(None)
    }

    /// Raise the flag (idempotent). A no-op on [`Cancel::never`].
    pub fn cancel(&self) {
        if let Some(f) = &self.0 {
            f.store(true, Ordering::SeqCst);
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.as_ref().is_some_and(|f| f.load(Ordering::Relaxed))
    }

    /// `Err(Error::Interrupted)` once the flag is raised.
    pub fn check(&self) -> Result<()> {
        if self.is_cancelled() {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static TEMPS: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());

fn temps() -> std::sync::MutexGuard<'static, Vec<(u64, PathBuf)>> {
    TEMPS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps a temporary output's path on the process's list until dropped. Dropping it does not
/// remove the file: the owner does that (or renames it into place) first.
#[derive(Debug)]
pub struct RegisteredTemp(u64);

/// Put `path` (a file or a directory tree) on the list [`remove_registered_temps`] empties.
pub fn register_temp(path: &Path) -> RegisteredTemp {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    temps().push((id, path.to_owned()));
    RegisteredTemp(id)
}

impl Drop for RegisteredTemp {
    fn drop(&mut self) {
        temps().retain(|(id, _)| *id != self.0);
    }
}

static EDITS: Mutex<Vec<(u64, PathBuf)>> = Mutex::new(Vec::new());

fn edits() -> std::sync::MutexGuard<'static, Vec<(u64, PathBuf)>> {
    EDITS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Keeps an in-place edit on the process's list of edits that are neither committed nor
/// rolled back yet (see [`pending_edits`]) until dropped.
#[derive(Debug)]
pub struct RegisteredEdit(u64);

/// Put the file being edited in place at `path` on the list [`pending_edits`] reports.
pub fn register_edit(path: &Path) -> RegisteredEdit {
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    edits().push((id, path.to_owned()));
    RegisteredEdit(id)
}

impl Drop for RegisteredEdit {
    fn drop(&mut self) {
        edits().retain(|(id, _)| *id != self.0);
    }
}

/// The files being edited in place whose edit is still open: exiting now (instead of letting
/// the edit roll back) would leave them half-changed.
pub fn pending_edits() -> Vec<PathBuf> {
    edits().iter().map(|(_, p)| p.clone()).collect()
}

/// Remove every registered temporary output (best effort); returns the paths removed.
pub fn remove_registered_temps() -> Vec<PathBuf> {
    let list = std::mem::take(&mut *temps());
    let mut removed = Vec::new();
    for (_, p) in list {
        let gone = match std::fs::symlink_metadata(&p) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&p).is_ok(),
            Ok(_) => std::fs::remove_file(&p).is_ok(),
            Err(_) => false,
        };
        if gone {
            removed.push(p);
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn never_is_never_raised_and_new_is_shared() {
        let n = Cancel::never();
        n.cancel();
        assert!(n.check().is_ok());
        let c = Cancel::new();
        let c2 = c.clone();
        assert!(c.check().is_ok());
        c2.cancel();
        assert!(matches!(c.check(), Err(Error::Interrupted)));
    }

    #[test]
    fn registered_temps_are_removed_until_their_guard_drops() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let b = dir.path().join("b");
        std::fs::write(&a, b"x").unwrap();
        std::fs::create_dir_all(b.join("sub")).unwrap();
        let ga = register_temp(&a);
        let gb = register_temp(&b);
        drop(gb); // b's owner finished: it must survive
        let removed = remove_registered_temps();
        assert!(removed.contains(&a), "{removed:?}");
        assert!(!a.exists());
        assert!(b.exists());
        drop(ga);
    }

    #[test]
    fn edits_are_pending_until_their_guard_drops() {
        let p = Path::new("/some/image.qcow2");
        let g = register_edit(p);
        assert!(pending_edits().iter().any(|e| e == p));
        drop(g);
        assert!(!pending_edits().iter().any(|e| e == p));
    }
}
