//! The read side: paths, entries, files and walks over our own [`Volume`].

use crate::ondisk::{
    feature_names, Superblock, COMPAT_HAS_JOURNAL, COMPAT_NAMES, FL_ENCRYPT, INCOMPAT_NAMES,
    INCOMPAT_RECOVER, RO_COMPAT_NAMES, STATE_ERROR, STATE_ORPHANS, STATE_VALID, S_IFDIR, S_IFLNK,
    S_IFMT, S_IFREG,
};
use crate::volume::{Inode, JournalReport, Run, Volume};
use crate::{Error, Result};
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
    /// The inode could not be read (see the entry's error).
    Unknown,
}

impl FileKind {
    fn from_mode(mode: u16) -> FileKind {
        match mode & S_IFMT {
            S_IFDIR => FileKind::Dir,
            S_IFLNK => FileKind::Symlink,
            0x6000 => FileKind::BlockDev,
            0x2000 => FileKind::CharDev,
            0x1000 => FileKind::Fifo,
            0xc000 => FileKind::Socket,
            S_IFREG => FileKind::File,
            _ => FileKind::Unknown,
        }
    }

    fn from_dirent(t: u8) -> FileKind {
        match t {
            1 => FileKind::File,
            2 => FileKind::Dir,
            3 => FileKind::CharDev,
            4 => FileKind::BlockDev,
            5 => FileKind::Fifo,
            6 => FileKind::Socket,
            7 => FileKind::Symlink,
            _ => FileKind::Unknown,
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
            FileKind::Unknown => 0,
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
    /// Access time, seconds since the epoch.
    pub atime: i64,
    pub atime_nsec: u32,
    /// Inode number.
    pub ino: u32,
    /// Target of a symbolic link.
    pub symlink_target: Option<String>,
    /// Why this entry (or, for a directory, its listing) could not be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The path as stored (names are bytes in ext4).
    #[serde(skip)]
    pub path_bytes: Vec<u8>,
    /// The symlink target as stored.
    #[serde(skip)]
    pub target_bytes: Option<Vec<u8>>,
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
    /// What the in-memory journal replay did (all zero when none was needed).
    pub journal: JournalReport,
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

/// A read-only ext2/3/4 filesystem on a block device. `Send + Sync`.
pub struct Ext4 {
    vol: Volume,
    /// The superblock as on disk, before any journal replay (its state is what `inspect` and
    /// the editors' checks report).
    disk_sb: Superblock,
}

/// An open regular file: its inode and block map.
#[derive(Debug, Clone)]
pub struct File {
    inode: Inode,
    runs: Vec<Run>,
}

impl File {
    pub fn size(&self) -> u64 {
        self.inode.size
    }
    pub fn ino(&self) -> u32 {
        self.inode.ino
    }
    /// Byte ranges `(off, len)` that may hold data, in order; everything else reads as zeros
    /// (holes and unwritten extents).
    pub fn data_segments(&self, bs: u64) -> Vec<(u64, u64)> {
        if self.runs.is_empty() && self.inode.flags & crate::ondisk::FL_INLINE_DATA != 0 {
            return if self.inode.size > 0 {
                vec![(0, self.inode.size)]
            } else {
                Vec::new()
            };
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        for r in &self.runs {
            if r.unwritten || r.pblk == 0 {
                continue;
            }
            let s = r.lblk * bs;
            if s >= self.inode.size {
                break;
            }
            let e = ((r.lblk + r.len) * bs).min(self.inode.size);
            match out.last_mut() {
                Some(l) if l.0 + l.1 == s => l.1 += e - s,
                _ => out.push((s, e - s)),
            }
        }
        out
    }
}

pub(crate) fn fmt_uuid(u: &[u8; 16]) -> String {
    let hex =
        |r: std::ops::Range<usize>| u[r].iter().map(|b| format!("{b:02x}")).collect::<String>();
    format!(
        "{}-{}-{}-{}-{}",
        hex(0..4),
        hex(4..6),
        hex(6..8),
        hex(8..10),
        hex(10..16)
    )
}

fn to_system_time(secs: i64, nsec: u32) -> SystemTime {
    let ns = Duration::from_nanos(u64::from(nsec.min(999_999_999)));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs()) + ns
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + ns
    }
}

fn join_bytes(dir: &[u8], name: &[u8]) -> Vec<u8> {
    let mut p = dir.to_vec();
    if !p.ends_with(b"/") {
        p.push(b'/');
    }
    p.extend_from_slice(name);
    p
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

impl Ext4 {
    /// Open the filesystem on `dev` (a whole disk holding ext4, or a [`vmdisk_block::Slice`]).
    ///
    /// The journal is replayed in memory when the superblock asks for recovery; the device
    /// is never written.
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Ext4> {
        Self::open_with_journal(dev, None)
    }

    /// As [`Ext4::open`], with the external journal device for a filesystem that has one.
    pub fn open_with_journal(
        dev: Arc<dyn BlockDevice>,
        journal: Option<Arc<dyn BlockDevice>>,
    ) -> Result<Ext4> {
        let mut raw = vec![0u8; crate::ondisk::SB_LEN];
        if dev.len() < crate::ondisk::SB_OFF + raw.len() as u64 {
            return Err(Error::NotExt4);
        }
        dev.read_exact_at(&mut raw, crate::ondisk::SB_OFF)?;
        let disk_sb = Superblock::parse(&raw)?;
        let vol = Volume::open(dev, journal)?;
        Ok(Ext4 { vol, disk_sb })
    }

    /// The reader core, for callers that need inodes and block maps.
    pub fn volume(&self) -> &Volume {
        &self.vol
    }

    /// Label, UUID, features and state.
    pub fn fs_info(&self) -> FsInfo {
        let sb = &self.vol.sb;
        let mut features = feature_names(sb.compat, COMPAT_NAMES, "COMPAT_");
        features.extend(feature_names(sb.incompat, INCOMPAT_NAMES, "INCOMPAT_"));
        features.extend(feature_names(sb.ro_compat, RO_COMPAT_NAMES, "RO_COMPAT_"));
        let d = &self.disk_sb;
        let state = if d.incompat & INCOMPAT_RECOVER != 0 {
            FsState::NeedsRecovery
        } else if d.state & STATE_ERROR != 0 {
            FsState::Errors
        } else if d.state & STATE_VALID == 0 || d.state & STATE_ORPHANS != 0 {
            FsState::NotClean
        } else {
            FsState::Clean
        };
        FsInfo {
            label: lossy(&sb.label),
            uuid: fmt_uuid(&sb.uuid),
            block_size: sb.block_size,
            blocks_count: sb.blocks_count,
            free_blocks: sb.free_blocks,
            inodes_count: sb.inodes_count,
            free_inodes: sb.free_inodes,
            features,
            has_journal: sb.compat & COMPAT_HAS_JOURNAL != 0,
            state,
            superblock_checksum_ok: d.checksum_ok,
            journal: self.vol.journal.clone(),
        }
    }

    fn entry_from(&self, path: Vec<u8>, name: &[u8], ino: &Inode) -> Entry {
        let kind = FileKind::from_mode(ino.mode);
        let (target_bytes, error) = if kind == FileKind::Symlink {
            match self.vol.symlink_target(ino) {
                Ok(t) => (Some(t), None),
                Err(e) => (None, Some(e.to_string())),
            }
        } else {
            (None, None)
        };
        Entry {
            path: lossy(&path),
            name: if name.is_empty() {
                "/".into()
            } else {
                lossy(name)
            },
            kind,
            mode: u32::from(ino.mode),
            uid: ino.uid,
            gid: ino.gid,
            size: ino.size,
            mtime: ino.mtime.0,
            mtime_nsec: ino.mtime.1,
            atime: ino.atime.0,
            atime_nsec: ino.atime.1,
            ino: ino.ino,
            symlink_target: target_bytes.as_deref().map(lossy),
            error,
            path_bytes: path,
            target_bytes,
        }
    }

    fn bad_entry(path: Vec<u8>, name: &[u8], ino: u32, ftype: u8, e: &Error) -> Entry {
        Entry {
            path: lossy(&path),
            name: lossy(name),
            kind: FileKind::from_dirent(ftype),
            mode: 0,
            uid: 0,
            gid: 0,
            size: 0,
            mtime: 0,
            mtime_nsec: 0,
            atime: 0,
            atime_nsec: 0,
            ino,
            symlink_target: None,
            error: Some(e.to_string()),
            path_bytes: path,
            target_bytes: None,
        }
    }

    /// `lstat`: the entry itself, symbolic links not followed.
    pub fn stat(&self, path: &str) -> Result<Entry> {
        let ino = self.vol.resolve(path, false)?;
        let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        let mut e = self.entry_from(path.as_bytes().to_vec(), name.as_bytes(), &ino);
        if let Some(err) = e.error.take() {
            return Err(Error::Corrupt {
                what: format!("{path}: {err}"),
                off: 0,
            });
        }
        Ok(e)
    }

    /// `stat`: symbolic links followed.
    pub fn metadata(&self, path: &str) -> Result<Entry> {
        let ino = self.vol.resolve(path, true)?;
        let name = path.trim_end_matches('/').rsplit('/').next().unwrap_or("");
        Ok(self.entry_from(path.as_bytes().to_vec(), name.as_bytes(), &ino))
    }

    /// Does `path` exist (following symbolic links)?
    pub fn exists(&self, path: &str) -> Result<bool> {
        match self.vol.resolve(path, true) {
            Ok(_) => Ok(true),
            Err(Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn list(&self, dir_path: &[u8], dir: &Inode) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        for de in self.vol.dir_entries(dir)? {
            if de.name == b"." || de.name == b".." {
                continue;
            }
            let child = join_bytes(dir_path, &de.name);
            if de.name.is_empty() || de.name.contains(&b'/') || de.name.contains(&0) {
                let e = Error::UnsafeName {
                    dir: lossy(dir_path),
                    name: lossy(&de.name),
                };
                out.push(Self::bad_entry(child, &de.name, de.ino, de.file_type, &e));
                continue;
            }
            match self.vol.inode(de.ino) {
                Ok(ino) => out.push(self.entry_from(child, &de.name, &ino)),
                Err(e) => out.push(Self::bad_entry(child, &de.name, de.ino, de.file_type, &e)),
            }
        }
        out.sort_by(|a, b| a.path_bytes.cmp(&b.path_bytes));
        Ok(out)
    }

    /// Entries of a directory, sorted by name, without `.` and `..`. Entries whose inode
    /// cannot be read carry the error.
    pub fn read_dir(&self, path: &str) -> Result<Vec<Entry>> {
        let dir = self.vol.resolve(path, true)?;
        if !dir.is_dir() {
            return Err(Error::NotADirectory {
                path: path.to_string(),
            });
        }
        self.list(path.as_bytes(), &dir)
    }

    /// Every entry below `path` (pre-order, sorted per directory), for `ls -R`; the first
    /// unreadable entry is an error (see [`Ext4::walk_lossy`] to go on).
    pub fn walk(&self, path: &str) -> Result<Vec<Entry>> {
        let all = self.walk_lossy(path)?;
        if let Some(bad) = all.iter().find(|e| e.error.is_some()) {
            return Err(Error::Corrupt {
                what: format!("{}: {}", bad.path, bad.error.clone().unwrap_or_default()),
                off: 0,
            });
        }
        Ok(all)
    }

    /// Every entry below `path`, going on past damage: an unreadable inode, or a directory
    /// whose listing fails, is returned with its `error` set.
    pub fn walk_lossy(&self, path: &str) -> Result<Vec<Entry>> {
        let dir = self.vol.resolve(path, true)?;
        if !dir.is_dir() {
            return Err(Error::NotADirectory {
                path: path.to_string(),
            });
        }
        let mut out = Vec::new();
        let base = path.as_bytes().to_vec();
        let listing = self.list(&base, &dir)?;
        self.walk_into(listing, 0, &mut out)?;
        Ok(out)
    }

    fn walk_into(&self, listing: Vec<Entry>, depth: usize, out: &mut Vec<Entry>) -> Result<()> {
        if depth >= MAX_WALK_DEPTH {
            return Err(Error::Limit {
                what: "directory nesting",
                needed: depth as u64 + 1,
                limit: MAX_WALK_DEPTH as u64,
            });
        }
        for mut e in listing {
            if out.len() as u64 >= MAX_WALK_ENTRIES {
                return Err(Error::Limit {
                    what: "entries in one walk",
                    needed: MAX_WALK_ENTRIES + 1,
                    limit: MAX_WALK_ENTRIES,
                });
            }
            if e.kind == FileKind::Dir && e.error.is_none() {
                let sub = self
                    .vol
                    .inode(e.ino)
                    .and_then(|ino| self.list(&e.path_bytes, &ino));
                match sub {
                    Ok(sub) => {
                        out.push(e);
                        self.walk_into(sub, depth + 1, out)?;
                    }
                    Err(err) => {
                        e.error = Some(format!("reading directory: {err}"));
                        out.push(e);
                    }
                }
            } else {
                out.push(e);
            }
        }
        Ok(())
    }

    /// Target of a symbolic link (lossy UTF-8).
    pub fn read_link(&self, path: &str) -> Result<String> {
        let ino = self.vol.resolve(path, false)?;
        if ino.file_type() != S_IFLNK {
            return Err(Error::NotASymlink {
                path: path.to_string(),
            });
        }
        Ok(lossy(&self.vol.symlink_target(&ino)?))
    }

    fn file_of(&self, path: &str, ino: Inode) -> Result<File> {
        match ino.file_type() {
            S_IFREG => {}
            S_IFDIR => {
                return Err(Error::IsADirectory {
                    path: path.to_string(),
                })
            }
            _ => {
                return Err(Error::NotARegularFile {
                    path: path.to_string(),
                })
            }
        }
        if ino.flags & FL_ENCRYPT != 0 {
            return Err(Error::unsupported(format!(
                "encrypt: {path} is encrypted (its content needs the key)"
            )));
        }
        let blocks = ino.size.div_ceil(self.vol.bs);
        let runs = self.vol.runs(&ino, Some(blocks))?;
        Ok(File { inode: ino, runs })
    }

    /// Open a regular file (symbolic links followed).
    pub fn open_file(&self, path: &str) -> Result<File> {
        let ino = self.vol.resolve(path, true)?;
        self.file_of(path, ino)
    }

    /// Open a regular file by inode number (for walks that already have it).
    pub fn open_inode(&self, ino: u32) -> Result<File> {
        let i = self.vol.inode(ino)?;
        self.file_of(&format!("<inode {ino}>"), i)
    }

    /// Read part of an open file; `buf` must end at or before the file's size.
    pub fn read_at(&self, f: &File, off: u64, buf: &mut [u8]) -> Result<()> {
        self.vol.read_file_at(&f.inode, &f.runs, off, buf)
    }

    /// Whole content of a regular file (symbolic links followed), up to [`MAX_READ_FILE`].
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let f = self.open_file(path)?;
        if f.size() > MAX_READ_FILE {
            return Err(Error::Limit {
                what: "file size read into memory",
                needed: f.size(),
                limit: MAX_READ_FILE,
            });
        }
        let mut buf = vec![0u8; f.size() as usize];
        self.read_at(&f, 0, &mut buf)?;
        Ok(buf)
    }

    /// Stream a regular file to `out`; returns the bytes copied.
    pub fn copy_file_to(&self, path: &str, out: &mut dyn Write) -> Result<u64> {
        let f = self.open_file(path)?;
        self.copy_open_file(&f, out)
    }

    /// Stream an open file to `out`.
    pub fn copy_open_file(&self, f: &File, out: &mut dyn Write) -> Result<u64> {
        let mut buf = vec![0u8; COPY_CHUNK.min(f.size() as usize)];
        let mut off = 0u64;
        while off < f.size() {
            let n = (f.size() - off).min(COPY_CHUNK as u64) as usize;
            self.read_at(f, off, &mut buf[..n])?;
            out.write_all(&buf[..n]).map_err(|source| Error::Output {
                op: "write",
                path: std::path::PathBuf::from("<output>"),
                source,
            })?;
            off += n as u64;
        }
        Ok(off)
    }

    /// `cp-out`: copy a file, symlink or whole tree from `src` to the host path `dest`
    /// (which must not exist), keeping permission bits and modification times.
    /// (The CLI's atomic, hole-keeping copy is `vmdisk_guest::copy_out`.)
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
        if let Some(err) = &e.error {
            return Err(Error::Corrupt {
                what: format!("{}: {err}", e.path),
                off: 0,
            });
        }
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
                let file = self.open_inode(e.ino)?;
                rep.bytes += self.copy_open_file(&file, &mut f)?;
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
                use std::os::unix::ffi::OsStrExt;
                let target = e.target_bytes.clone().unwrap_or_default();
                std::os::unix::fs::symlink(std::ffi::OsStr::from_bytes(&target), dest)
                    .map_err(out_err("create symlink"))?;
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
