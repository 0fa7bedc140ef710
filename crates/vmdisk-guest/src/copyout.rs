//! `cp-out`: copy a file or a tree out of a guest filesystem onto the host, safely.
//!
//! - DEST an existing directory means DEST/basename(SRC), as `cp`.
//! - Nothing is written under DEST's name until the copy is complete: a file is built as
//!   `.NAME.vmdisk-tmp-PID` beside it, a tree in a temporary directory of that name, and
//!   renamed into place at the end (a tree never replaces anything; a file replaces an existing
//!   regular file, as `cp` does). The temporary is registered with
//!   [`vmdisk_block::register_temp`] and removed on any error, on [`Cancel`], and on ENOSPC.
//! - Free space is checked (statvfs) against the data to be written before the first byte.
//! - Holes stay holes: only the data segments of each file are read and written, and all-zero
//!   chunks inside them are skipped, so a 2 GiB file holding 4 KiB takes 4 KiB on the host.
//! - Mode bits, modification and access times, symbolic links (not followed), and — when
//!   running as root — owner and group are kept.
//! - A tree survives damage: an unreadable entry is reported in [`CopyOutReport::errors`] and
//!   the rest is copied (the caller exits non-zero, like `cp -r`).

use std::fs::{File, FileTimes};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vmdisk_block::Cancel;
use vmdisk_ext4::{Entry, FileKind};

use crate::fs::{FsError, GuestFile, GuestFs};

/// Read/write chunk of file data.
const CHUNK: usize = 1 << 20;
/// Space we assume each created inode costs on the host, on top of its data.
const PER_ENTRY_OVERHEAD: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum CopyOutError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error("interrupted; the partial output was removed and {dest} is as it was")]
    Interrupted { dest: PathBuf },
    #[error(
        "not enough space in {}: the copy needs {needed} bytes, {available} are free; \
         nothing was written",
        dir.display()
    )]
    NoSpace {
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("the host ran out of space writing {}; the partial output was removed", path.display())]
    NoSpaceWhileWriting { path: PathBuf },
    #[error("{} already exists (cp-out never merges into or replaces a directory)", path.display())]
    DestinationExists { path: PathBuf },
    #[error("{src}: {what}")]
    Source { src: String, what: String },
    #[error("cannot {op} {}", path.display())]
    Output {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// How to copy.
#[derive(Debug, Clone, Default)]
pub struct CopyOutOptions {
    pub cancel: Cancel,
    /// Keep owner and group (only takes effect when running as root).
    pub owner: bool,
}

/// What [`copy_out`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CopyOutReport {
    /// Where the copy is now.
    pub dest: PathBuf,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Logical bytes (file sizes).
    pub bytes: u64,
    /// Bytes actually written (data, holes excluded).
    pub data_bytes: u64,
    /// Device nodes, fifos and sockets (not recreated).
    pub skipped: Vec<String>,
    /// Entries that could not be read, with why; everything else was copied.
    pub errors: Vec<(String, String)>,
}

fn out_err<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(std::io::Error) -> CopyOutError + 'a {
    move |source| {
        if source.raw_os_error() == Some(rustix::io::Errno::NOSPC.raw_os_error()) {
            CopyOutError::NoSpaceWhileWriting {
                path: path.to_path_buf(),
            }
        } else {
            CopyOutError::Output {
                op,
                path: path.to_path_buf(),
                source,
            }
        }
    }
}

fn to_time(secs: i64, nsec: u32) -> SystemTime {
    let ns = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + ns
    } else {
        UNIX_EPOCH
            .checked_sub(Duration::from_secs(secs.unsigned_abs()))
            .unwrap_or(UNIX_EPOCH)
            + ns
    }
}

fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

/// Removes the temporary output unless committed.
struct Temp {
    path: PathBuf,
    committed: bool,
    _reg: vmdisk_block::RegisteredTemp,
}

impl Drop for Temp {
    fn drop(&mut self) {
        if !self.committed {
            match std::fs::symlink_metadata(&self.path) {
                Ok(m) if m.is_dir() => {
                    // Make read-only copied directories removable first.
                    for e in walkdir_dirs(&self.path) {
                        let _ =
                            std::fs::set_permissions(&e, std::fs::Permissions::from_mode(0o700));
                    }
                    let _ = std::fs::remove_dir_all(&self.path);
                }
                Ok(_) => {
                    let _ = std::fs::remove_file(&self.path);
                }
                Err(_) => {}
            }
        }
    }
}

fn walkdir_dirs(root: &Path) -> Vec<PathBuf> {
    let mut out = vec![root.to_path_buf()];
    let mut i = 0;
    while i < out.len() {
        let d = out[i].clone();
        let _ = std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o700));
        if let Ok(rd) = std::fs::read_dir(&d) {
            for e in rd.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push(e.path());
                }
            }
        }
        i += 1;
    }
    out
}

/// Where `cp-out SRC DEST` puts its copy: DEST, or DEST/basename(SRC) when DEST is an existing
/// directory.
pub fn resolve_dest(src: &str, dest: &Path) -> Result<PathBuf, CopyOutError> {
    if dest.is_dir() {
        let base = src.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        if base.is_empty() || base == "." || base == ".." {
            return Err(CopyOutError::DestinationExists {
                path: dest.to_path_buf(),
            });
        }
        return Ok(dest.join(base));
    }
    Ok(dest.to_path_buf())
}

fn data_bytes(fs: &GuestFs, f: &GuestFile) -> u64 {
    fs.data_segments(f).iter().map(|s| s.1).sum()
}

/// Copy `src` of `fs` to `dest` on the host (see the module docs).
pub fn copy_out(
    fs: &GuestFs,
    src: &str,
    dest: &Path,
    opts: &CopyOutOptions,
) -> Result<CopyOutReport, CopyOutError> {
    let top = fs.stat(src)?;
    if let Some(e) = &top.error {
        return Err(CopyOutError::Source {
            src: src.to_string(),
            what: e.clone(),
        });
    }
    let final_dest = resolve_dest(src, dest)?;
    let parent = match final_dest.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let existing = std::fs::symlink_metadata(&final_dest).ok();
    match (&existing, top.kind) {
        (None, _) => {}
        (Some(m), FileKind::File) if m.is_file() => {}
        (Some(_), _) => {
            return Err(CopyOutError::DestinationExists { path: final_dest });
        }
    }
    // Plan: what will be written, and does it fit?
    let entries = if top.kind == FileKind::Dir {
        fs.walk_lossy(src)?
    } else {
        Vec::new()
    };
    let mut needed = PER_ENTRY_OVERHEAD;
    let mut top_file = None;
    if top.kind == FileKind::File {
        let f = fs.open_entry(&top)?;
        needed += data_bytes(fs, &f);
        top_file = Some(f);
    }
    // Every file is opened once here (block maps read): the data it will write is known
    // exactly, holes excluded, and the copy loop reuses the open file.
    let mut opened: Vec<Option<Result<GuestFile, FsError>>> = Vec::with_capacity(entries.len());
    for e in &entries {
        needed += PER_ENTRY_OVERHEAD;
        if e.kind == FileKind::File && e.error.is_none() {
            let f = fs.open_entry(e);
            if let Ok(f) = &f {
                needed += data_bytes(fs, f);
            }
            opened.push(Some(f));
        } else {
            opened.push(None);
        }
    }
    let st = rustix::fs::statvfs(&parent).map_err(|e| CopyOutError::Output {
        op: "check free space in",
        path: parent.clone(),
        source: e.into(),
    })?;
    let available = st.f_bavail.saturating_mul(st.f_frsize);
    if needed > available {
        return Err(CopyOutError::NoSpace {
            dir: parent,
            needed,
            available,
        });
    }
    let name = final_dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "out".into());
    let tmp_path = parent.join(format!(".{name}.vmdisk-tmp-{}", std::process::id()));
    let mut tmp = Temp {
        _reg: vmdisk_block::register_temp(&tmp_path),
        path: tmp_path.clone(),
        committed: false,
    };
    let mut rep = CopyOutReport {
        dest: final_dest.clone(),
        ..CopyOutReport::default()
    };
    let owner = opts.owner && is_root();
    let cancelled = |_| CopyOutError::Interrupted {
        dest: final_dest.clone(),
    };
    match top.kind {
        FileKind::File => {
            let f = top_file.take().ok_or_else(|| CopyOutError::Source {
                src: src.into(),
                what: "not a file".into(),
            })?;
            let file = write_file(fs, &top, &f, &tmp_path, owner, &opts.cancel, &mut rep).map_err(
                |e| match e {
                    CopyOutError::Interrupted { .. } => cancelled(()),
                    e => e,
                },
            )?;
            file.sync_all().map_err(out_err("fsync", &tmp_path))?;
            std::fs::rename(&tmp_path, &final_dest).map_err(out_err("rename into", &final_dest))?;
            tmp.committed = true;
            rep.files = 1;
        }
        FileKind::Symlink => {
            make_symlink(&top, &tmp_path, owner)?;
            rename_noreplace(&tmp_path, &final_dest)?;
            tmp.committed = true;
            rep.symlinks = 1;
        }
        FileKind::Dir => {
            std::fs::create_dir(&tmp_path).map_err(out_err("create directory", &tmp_path))?;
            rep.dirs += 1;
            let base = top.path_bytes.clone();
            let mut dirs: Vec<(PathBuf, Entry)> = vec![(tmp_path.clone(), top.clone())];
            // Directories, symlinks and the list of files first (in order); then the files'
            // data, several at a time.
            let mut jobs: Vec<(&Entry, GuestFile, PathBuf)> = Vec::new();
            for (e, f) in entries.iter().zip(opened) {
                opts.cancel.check().map_err(|_| cancelled(()))?;
                let rel = e
                    .path_bytes
                    .strip_prefix(base.as_slice())
                    .unwrap_or(&e.path_bytes);
                let rel = rel.strip_prefix(b"/").unwrap_or(rel);
                let out = tmp_path.join(std::ffi::OsStr::from_bytes(rel));
                if let Some(err) = &e.error {
                    rep.errors.push((e.path.clone(), err.clone()));
                    if e.kind != FileKind::Dir || e.mode == 0 {
                        continue;
                    }
                }
                match e.kind {
                    FileKind::Dir => {
                        std::fs::create_dir(&out).map_err(out_err("create directory", &out))?;
                        rep.dirs += 1;
                        dirs.push((out, e.clone()));
                    }
                    FileKind::File => match f.unwrap_or_else(|| fs.open_entry(e)) {
                        Ok(f) => jobs.push((e, f, out)),
                        Err(err) => rep.errors.push((e.path.clone(), err.to_string())),
                    },
                    FileKind::Symlink => {
                        make_symlink(e, &out, owner)?;
                        rep.symlinks += 1;
                    }
                    _ => rep.skipped.push(e.path.clone()),
                }
            }
            write_files(fs, jobs, owner, &opts.cancel, &mut rep).map_err(|e| match e {
                CopyOutError::Interrupted { .. } => cancelled(()),
                e => e,
            })?;
            // Directory modes and times last, deepest first, so read-only ones could be filled.
            for (p, e) in dirs.iter().rev() {
                finish_meta_path(p, e, owner)?;
            }
            rename_noreplace(&tmp_path, &final_dest)?;
            tmp.committed = true;
        }
        _ => {
            return Err(CopyOutError::Source {
                src: src.into(),
                what: "is a device node, fifo or socket; cp-out copies files, directories and \
                       symbolic links"
                    .into(),
            })
        }
    }
    Ok(rep)
}

/// Threads writing file data in a tree copy (reads are positioned, so they overlap well;
/// more than a few only contend on the page cache).
const COPY_THREADS: usize = 4;

/// Write the files of a tree copy on [`COPY_THREADS`] threads. A file that cannot be read is
/// an entry error; a host-side failure or an interrupt stops every thread and is returned.
fn write_files(
    fs: &GuestFs,
    jobs: Vec<(&Entry, GuestFile, PathBuf)>,
    owner: bool,
    cancel: &Cancel,
    rep: &mut CopyOutReport,
) -> Result<(), CopyOutError> {
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::Mutex;
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let fatal: Mutex<Option<CopyOutError>> = Mutex::new(None);
    let parts: Mutex<Vec<CopyOutReport>> = Mutex::new(Vec::new());
    let threads = COPY_THREADS.min(jobs.len()).max(1);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut part = CopyOutReport::default();
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some((e, f, out)) = jobs.get(i) else {
                        break;
                    };
                    match write_file(fs, e, f, out, owner, cancel, &mut part) {
                        Ok(_) => part.files += 1,
                        Err(CopyOutError::Fs(err)) => {
                            let _ = std::fs::remove_file(out);
                            part.errors.push((e.path.clone(), err.to_string()));
                        }
                        Err(other) => {
                            stop.store(true, Ordering::Relaxed);
                            let mut g = fatal.lock().unwrap_or_else(|p| p.into_inner());
                            g.get_or_insert(other);
                        }
                    }
                }
                parts.lock().unwrap_or_else(|p| p.into_inner()).push(part);
            });
        }
    });
    if let Some(e) = fatal.into_inner().unwrap_or_else(|p| p.into_inner()) {
        return Err(e);
    }
    for p in parts.into_inner().unwrap_or_else(|p| p.into_inner()) {
        rep.files += p.files;
        rep.bytes += p.bytes;
        rep.data_bytes += p.data_bytes;
        rep.errors.extend(p.errors);
    }
    rep.errors.sort();
    Ok(())
}

fn rename_noreplace(tmp: &Path, dst: &Path) -> Result<(), CopyOutError> {
    match rustix::fs::renameat_with(
        rustix::fs::CWD,
        tmp,
        rustix::fs::CWD,
        dst,
        rustix::fs::RenameFlags::NOREPLACE,
    ) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::EXIST => Err(CopyOutError::DestinationExists {
            path: dst.to_path_buf(),
        }),
        Err(e) if e == rustix::io::Errno::INVAL || e == rustix::io::Errno::NOSYS => {
            if std::fs::symlink_metadata(dst).is_ok() {
                return Err(CopyOutError::DestinationExists {
                    path: dst.to_path_buf(),
                });
            }
            std::fs::rename(tmp, dst).map_err(out_err("rename into", dst))
        }
        Err(e) => Err(CopyOutError::Output {
            op: "rename into",
            path: dst.to_path_buf(),
            source: e.into(),
        }),
    }
}

fn make_symlink(e: &Entry, out: &Path, owner: bool) -> Result<(), CopyOutError> {
    let t = e.target_bytes.clone().unwrap_or_default();
    std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&t), out)
        .map_err(out_err("create symlink", out))?;
    if owner {
        std::os::unix::fs::lchown(out, Some(e.uid), Some(e.gid))
            .map_err(out_err("set the owner of", out))?;
    }
    Ok(())
}

fn finish_meta(f: &File, path: &Path, e: &Entry, owner: bool) -> Result<(), CopyOutError> {
    if owner {
        std::os::unix::fs::fchown(f, Some(e.uid), Some(e.gid))
            .map_err(out_err("set the owner of", path))?;
    }
    f.set_permissions(std::fs::Permissions::from_mode(e.mode & 0o7777))
        .map_err(out_err("set permissions of", path))?;
    f.set_times(
        FileTimes::new()
            .set_modified(to_time(e.mtime, e.mtime_nsec))
            .set_accessed(to_time(e.atime, e.atime_nsec)),
    )
    .map_err(out_err("set times of", path))
}

fn finish_meta_path(p: &Path, e: &Entry, owner: bool) -> Result<(), CopyOutError> {
    let f = File::open(p).map_err(out_err("open", p))?;
    finish_meta(&f, p, e, owner)
}

/// Write one file at `out` keeping its holes; returns the open file.
fn write_file(
    fs: &GuestFs,
    e: &Entry,
    f: &GuestFile,
    out: &Path,
    owner: bool,
    cancel: &Cancel,
    rep: &mut CopyOutReport,
) -> Result<File, CopyOutError> {
    let file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(out)
        .map_err(out_err("create", out))?;
    let size = f.size();
    file.set_len(size).map_err(out_err("size", out))?;
    let mut buf = vec![0u8; CHUNK.min(size as usize)];
    for (off, len) in fs.data_segments(f) {
        let mut pos = off;
        while pos < off + len {
            cancel.check().map_err(|_| CopyOutError::Interrupted {
                dest: out.to_path_buf(),
            })?;
            let n = (off + len - pos).min(CHUNK as u64) as usize;
            fs.read_at(f, pos, &mut buf[..n])?;
            // All-zero chunks stay holes (the file was sized with set_len).
            if buf[..n].iter().any(|&b| b != 0) {
                file.write_all_at(&buf[..n], pos)
                    .map_err(out_err("write", out))?;
                rep.data_bytes += n as u64;
            }
            pos += n as u64;
        }
    }
    rep.bytes += size;
    finish_meta(&file, out, e, owner)?;
    Ok(file)
}
