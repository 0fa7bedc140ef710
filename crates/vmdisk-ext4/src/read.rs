//! The read side: ext4-view behind an adapter over any [`BlockDevice`].

use crate::ondisk::{
    feature_names, Superblock, COMPAT_HAS_JOURNAL, COMPAT_NAMES, INCOMPAT_NAMES, INCOMPAT_RECOVER,
    RO_COMPAT_NAMES, SB_LEN, SB_OFF, STATE_ERROR, STATE_ORPHANS, STATE_VALID,
};
use crate::{Error, Result};
use ext4_view::{Ext4Error, FileType, Metadata};
use serde::Serialize;
use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use vmdisk_block::BlockDevice;

/// Most entries one [`Ext4::walk`] returns (a hostile directory hard-linked into itself
/// would otherwise never end).
pub const MAX_WALK_ENTRIES: u64 = 10_000_000;
/// Deepest directory nesting [`Ext4::walk`] and [`Ext4::copy_out`] follow.
pub const MAX_WALK_DEPTH: usize = 256;
/// Largest file [`Ext4::read_file`] loads into memory (use [`Ext4::copy_file_to`] beyond).
pub const MAX_READ_FILE: u64 = 1 << 30;
/// Copy buffer for streaming file data out.
const COPY_CHUNK: usize = 1 << 20;

/// Adapter: ext4-view reads through our block contract.
struct DevReader(Arc<dyn BlockDevice>);

impl ext4_view::Ext4Read for DevReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> std::result::Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.0
            .read_exact_at(dst, start_byte)
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    }
}

/// What kind of inode an entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    BlockDev,
    CharDev,
    Fifo,
    Socket,
}

impl FileKind {
    fn from_view(t: FileType) -> FileKind {
        if t.is_dir() {
            FileKind::Dir
        } else if t.is_symlink() {
            FileKind::Symlink
        } else if t.is_block_dev() {
            FileKind::BlockDev
        } else if t.is_char_dev() {
            FileKind::CharDev
        } else if t.is_fifo() {
            FileKind::Fifo
        } else if t.is_socket() {
            FileKind::Socket
        } else {
            FileKind::File
        }
    }

    /// The `S_IFMT` bits.
    pub fn mode_bits(self) -> u32 {
        match self {
            FileKind::File => 0o100000,
            FileKind::Dir => 0o040000,
            FileKind::Symlink => 0o120000,
            FileKind::BlockDev => 0o060000,
            FileKind::CharDev => 0o020000,
            FileKind::Fifo => 0o010000,
            FileKind::Socket => 0o140000,
        }
    }
}

/// One file as `ls -l` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Absolute path inside the filesystem (lossy UTF-8).
    pub path: String,
    /// Last component ("/" for the root).
    pub name: String,
    pub kind: FileKind,
    /// Full `st_mode`: type bits and permissions.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    pub mtime_nsec: u32,
    /// Target of a symbolic link.
    pub symlink_target: Option<String>,
}

/// Health of the filesystem as its superblock records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsState {
    /// Cleanly unmounted, no recorded errors.
    Clean,
    /// The journal holds transactions to replay (crash or still mounted).
    NeedsRecovery,
    /// The kernel recorded errors: run e2fsck.
    Errors,
    /// Not marked clean (mounted, or crashed without a journal).
    NotClean,
}

/// The ext4 part of `inspect`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FsInfo {
    pub label: String,
    pub uuid: String,
    pub block_size: u64,
    pub blocks_count: u64,
    pub free_blocks: u64,
    pub inodes_count: u64,
    pub free_inodes: u64,
    pub features: Vec<String>,
    pub has_journal: bool,
    pub state: FsState,
    /// False when metadata_csum is on and the superblock checksum does not match.
    pub superblock_checksum_ok: bool,
}

/// What [`Ext4::copy_out`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct CopyReport {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub bytes: u64,
    /// Device nodes, fifos and sockets (not recreated).
    pub skipped: Vec<String>,
}

/// A read-only ext4 filesystem on a block device (not `Send`: ext4-view is single-threaded).
pub struct Ext4 {
    fs: ext4_view::Ext4,
    sb: Superblock,
}

fn map_view_err(path: &str, e: Ext4Error) -> Error {
    let path = path.to_string();
    match e {
        Ext4Error::NotFound => Error::NotFound { path },
        Ext4Error::NotADirectory => Error::NotADirectory { path },
        Ext4Error::IsADirectory => Error::IsADirectory { path },
        Ext4Error::NotASymlink => Error::NotASymlink { path },
        Ext4Error::IsASpecialFile => Error::NotARegularFile { path },
        Ext4Error::TooManySymlinks => Error::TooManySymlinks { path },
        Ext4Error::NotAbsolute | Ext4Error::MalformedPath | Ext4Error::PathTooLong => {
            Error::BadPath { path }
        }
        source => Error::Read { path, source },
    }
}

fn view_path<'a>(path: &'a str) -> Result<ext4_view::Path<'a>> {
    ext4_view::Path::try_from(path).map_err(|_| Error::BadPath {
        path: path.to_string(),
    })
}

fn to_system_time(secs: i64, nsec: u32) -> SystemTime {
    let ns = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + ns
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + ns
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Ext4 {
    /// Open the filesystem on `dev` (a whole disk holding ext4, or a [`vmdisk_block::Slice`]).
    ///
    /// The journal is replayed in memory by ext4-view when needed; the device is never written.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Ext4> {
        let mut raw = vec![0u8; SB_LEN];
        if dev.len() < SB_OFF + SB_LEN as u64 {
            return Err(Error::NotExt4);
        }
        dev.read_exact_at(&mut raw, SB_OFF)?;
        let sb = Superblock::parse(&raw)?;
        let fs = match ext4_view::Ext4::load(Box::new(DevReader(dev))) {
            Ok(fs) => fs,
            // ext4-view replays the journal in memory when it can; when it cannot (journal
            // features it lacks), the useful answer is that the journal needs replaying.
            Err(_) if sb.incompat & INCOMPAT_RECOVER != 0 => return Err(Error::NeedsRecovery),
            Err(e) => return Err(map_view_err("/", e)),
        };
        Ok(Ext4 { fs, sb })
    }

    /// The underlying ext4-view handle, for callers that need more.
    pub fn view(&self) -> &ext4_view::Ext4 {
        &self.fs
    }

    /// Label, UUID, features and state.
    pub fn fs_info(&self) -> FsInfo {
        let sb = &self.sb;
        let mut features = feature_names(sb.compat, COMPAT_NAMES, "COMPAT_");
        features.extend(feature_names(sb.incompat, INCOMPAT_NAMES, "INCOMPAT_"));
        features.extend(feature_names(sb.ro_compat, RO_COMPAT_NAMES, "RO_COMPAT_"));
        let state = if sb.incompat & INCOMPAT_RECOVER != 0 {
            FsState::NeedsRecovery
        } else if sb.state & STATE_ERROR != 0 {
            FsState::Errors
        } else if sb.state & STATE_VALID == 0 || sb.state & STATE_ORPHANS != 0 {
            FsState::NotClean
        } else {
            FsState::Clean
        };
        let u = sb.uuid;
        let hex =
            |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
        FsInfo {
            label: String::from_utf8_lossy(&sb.label).into_owned(),
            uuid: format!(
                "{}-{}-{}-{}-{}",
                hex(0..4),
                hex(4..6),
                hex(6..8),
                hex(8..10),
                hex(10..16)
            ),
            block_size: sb.block_size,
            blocks_count: sb.blocks_count,
            free_blocks: sb.free_blocks,
            inodes_count: sb.inodes_count,
            free_inodes: sb.free_inodes,
            features,
            has_journal: sb.compat & COMPAT_HAS_JOURNAL != 0,
            state,
            superblock_checksum_ok: sb.checksum_ok,
        }
    }

    fn entry(&self, path: &str, name: &str, md: &Metadata) -> Result<Entry> {
        let kind = FileKind::from_view(md.file_type());
        let symlink_target = if kind == FileKind::Symlink {
            Some(self.read_link(path)?)
        } else {
            None
        };
        let m = md.modified();
        Ok(Entry {
            path: path.to_string(),
            name: name.to_string(),
            kind,
            mode: kind.mode_bits() | u32::from(md.mode()),
            uid: md.uid(),
            gid: md.gid(),
            size: md.len(),
            mtime: m.seconds(),
            mtime_nsec: m.nanoseconds(),
            symlink_target,
        })
    }

    /// `lstat`: the entry itself, symbolic links not followed.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let md = self
            .fs
            .symlink_metadata(view_path(path)?)
            .map_err(|e| map_view_err(path, e))?;
        let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        let name = if name.is_empty() { "/" } else { name };
        self.entry(path, name, &md)
    }

    /// Does `path` exist (following symbolic links)?
    pub fn exists(&self, path: &str) -> Result<bool> {
        self.fs
            .exists(view_path(path)?)
            .map_err(|e| map_view_err(path, e))
    }

    /// Entries of a directory, sorted by name, without `.` and `..`.
    pub fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let iter = self
            .fs
            .read_dir(view_path(path)?)
            .map_err(|e| map_view_err(path, e))?;
        let mut out = Vec::new();
        for de in iter {
            let de = de.map_err(|e| map_view_err(path, e))?;
            let name_bytes = de.file_name();
            let name_bytes = name_bytes.as_ref();
            if name_bytes == b"." || name_bytes == b".." {
                continue;
            }
            let name = String::from_utf8_lossy(name_bytes).into_owned();
            if name.contains('/') || name.contains('\0') || name.is_empty() {
                return Err(Error::UnsafeName {
                    dir: path.to_string(),
                    name,
                });
            }
            let child = join(path, &name);
            let md = de.metadata().map_err(|e| map_view_err(&child, e))?;
            out.push(self.entry(&child, &name, &md)?);
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Every entry below `path` (pre-order, sorted per directory), for `ls -R`.
    pub fn walk(&self, path: &str) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        self.walk_into(path, 0, &mut out)?;
        Ok(out)
    }

    fn walk_into(&self, path: &str, depth: usize, out: &mut Vec<Entry>) -> Result<()> {
        if depth >= MAX_WALK_DEPTH {
            return Err(Error::Limit {
                what: "directory nesting",
                needed: depth as u64 + 1,
                limit: MAX_WALK_DEPTH as u64,
            });
        }
        for e in self.read_dir(path)? {
            if out.len() as u64 >= MAX_WALK_ENTRIES {
                return Err(Error::Limit {
                    what: "entries in one walk",
                    needed: MAX_WALK_ENTRIES + 1,
                    limit: MAX_WALK_ENTRIES,
                });
            }
            let dir = (e.kind == FileKind::Dir).then(|| e.path.clone());
            out.push(e);
            if let Some(d) = dir {
                self.walk_into(&d, depth + 1, out)?;
            }
        }
        Ok(())
    }

    /// Target of a symbolic link (lossy UTF-8).
    pub fn read_link(&self, path: &str) -> Result<String> {
        let t = self
            .fs
            .read_link(view_path(path)?)
            .map_err(|e| map_view_err(path, e))?;
        Ok(String::from_utf8_lossy(t.as_ref()).into_owned())
    }

    /// Whole content of a regular file (symbolic links followed), up to [`MAX_READ_FILE`].
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let md = self
            .fs
            .metadata(view_path(path)?)
            .map_err(|e| map_view_err(path, e))?;
        if md.is_dir() {
            return Err(Error::IsADirectory {
                path: path.to_string(),
            });
        }
        if md.len() > MAX_READ_FILE {
            return Err(Error::Limit {
                what: "file size read into memory",
                needed: md.len(),
                limit: MAX_READ_FILE,
            });
        }
        self.fs
            .read(view_path(path)?)
            .map_err(|e| map_view_err(path, e))
    }

    /// Stream a regular file to `out`; returns the bytes copied.
    pub fn copy_file_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let mut f = self
            .fs
            .open(view_path(path)?)
            .map_err(|e| map_view_err(path, e))?;
        let mut buf = vec![0u8; COPY_CHUNK];
        let mut total = 0u64;
        loop {
            let n = f.read_bytes(&mut buf).map_err(|e| map_view_err(path, e))?;
            if n == 0 {
                return Ok(total);
            }
            out.write_all(&buf[..n]).map_err(|source| Error::Output {
                op: "write",
                path: std::path::PathBuf::from("<output>"),
                source,
            })?;
            total += n as u64;
        }
    }

    /// `cp-out`: copy a file, symlink or whole tree from `src` to the host path `dest`
    /// (which must not exist), keeping permission bits and modification times.
    pub fn copy_out(&self, src: &str, dest: &std::path::Path) -> Result<CopyReport> {
        let mut rep = CopyReport::default();
        let e = self.stat(src)?;
        self.copy_entry(&e, dest, 0, &mut rep)?;
        Ok(rep)
    }

    fn copy_entry(
        &self,
        e: &Entry,
        dest: &std::path::Path,
        depth: usize,
        rep: &mut CopyReport,
    ) -> Result<()> {
        use std::os::unix::fs::PermissionsExt;
        let out_err = |op: &'static str| {
            let path = dest.to_path_buf();
            move |source| Error::Output { op, path, source }
        };
        let perms = std::fs::Permissions::from_mode(e.mode & 0o7777);
        let mtime = to_system_time(e.mtime, e.mtime_nsec);
        match e.kind {
            FileKind::Dir => {
                if depth >= MAX_WALK_DEPTH {
                    return Err(Error::Limit {
                        what: "directory nesting",
                        needed: depth as u64 + 1,
                        limit: MAX_WALK_DEPTH as u64,
                    });
                }
                std::fs::create_dir(dest).map_err(out_err("create directory"))?;
                rep.dirs += 1;
                for child in self.read_dir(&e.path)? {
                    self.copy_entry(&child, &dest.join(&child.name), depth + 1, rep)?;
                }
                // Permissions and times last, so a read-only directory can still be filled.
                std::fs::set_permissions(dest, perms).map_err(out_err("set permissions of"))?;
                let d = std::fs::File::open(dest).map_err(out_err("open"))?;
                d.set_times(
                    std::fs::FileTimes::new()
                        .set_modified(mtime)
                        .set_accessed(mtime),
                )
                .map_err(out_err("set times of"))?;
            }
            FileKind::File => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(dest)
                    .map_err(out_err("create"))?;
                rep.bytes += self.copy_file_to(&e.path, &mut f)?;
                rep.files += 1;
                f.set_times(
                    std::fs::FileTimes::new()
                        .set_modified(mtime)
                        .set_accessed(mtime),
                )
                .map_err(out_err("set times of"))?;
                f.set_permissions(perms)
                    .map_err(out_err("set permissions of"))?;
            }
            FileKind::Symlink => {
                let target = e.symlink_target.clone().unwrap_or_default();
                std::os::unix::fs::symlink(target, dest).map_err(out_err("create symlink"))?;
                rep.symlinks += 1;
            }
            _ => rep.skipped.push(e.path.clone()),
        }
        Ok(())
    }
}

impl std::fmt::Debug for Ext4 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ext4")
            .field("info", &self.fs_info())
            .finish()
    }
}
