//! `GuestFs`: the read side of a guest filesystem, ext2/3/4 or vfat (an ESP), behind one
//! interface for `ls`, `cat` and `cp-out`.
//!
//! Entries are [`vmdisk_ext4::Entry`] for both: a FAT entry becomes a file or directory with
//! mode 0755/0644, owner 0:0 and its write time (FAT keeps no owner or permissions).

use std::sync::Arc;

use vmdisk_block::BlockDevice;
use vmdisk_ext4::{Entry, Ext4, FileKind};
use vmdisk_fat::{Fat, FatEntry};

/// Why a guest filesystem could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error(transparent)]
    Ext4(#[from] vmdisk_ext4::Error),
    #[error(transparent)]
    Fat(#[from] vmdisk_fat::Error),
    #[error(transparent)]
    Block(#[from] vmdisk_block::Error),
    #[error("no ext2/3/4 or FAT filesystem here ({what})")]
    Unknown { what: String },
}

/// A readable guest filesystem.
pub enum GuestFs {
    /// Boxed: the ext4 reader's state is several times a FAT volume's.
    Ext4(Box<Ext4>),
    Fat(Fat),
}

/// An open regular file.
pub enum GuestFile {
    Ext4(vmdisk_ext4::File),
    Fat(vmdisk_fat::FatFile),
}

impl GuestFile {
    pub fn size(&self) -> u64 {
        match self {
            GuestFile::Ext4(f) => f.size(),
            GuestFile::Fat(f) => f.size,
        }
    }
}

fn fat_entry(e: FatEntry) -> Entry {
    let kind = if e.is_dir {
        FileKind::Dir
    } else {
        FileKind::File
    };
    let perm = if e.is_dir || e.attr & 0x01 == 0 {
        if e.is_dir {
            0o755
        } else {
            0o644
        }
    } else {
        0o444
    };
    Entry {
        path_bytes: e.path.as_bytes().to_vec(),
        path: e.path,
        name: e.name,
        kind,
        mode: kind.mode_bits() | perm,
        uid: 0,
        gid: 0,
        size: if e.is_dir { 0 } else { e.size },
        mtime: e.mtime,
        mtime_nsec: 0,
        atime: e.atime,
        atime_nsec: 0,
        ino: e.first_cluster,
        symlink_target: None,
        error: e.error,
        target_bytes: None,
    }
}

impl GuestFs {
    /// Open the filesystem on `dev`: ext2/3/4 by its superblock magic, else FAT by its boot
    /// sector. `ext_journal` is an ext4 external journal device, if any.
    pub fn open(
        dev: Arc<dyn BlockDevice>,
        ext_journal: Option<Arc<dyn BlockDevice>>,
    ) -> Result<GuestFs, FsError> {
        let mut magic = [0u8; 2];
        if dev.len() >= 1082 {
            dev.read_exact_at(&mut magic, 1080)?;
        }
        if u16::from_le_bytes(magic) == 0xef53 {
            return Ok(GuestFs::Ext4(Box::new(Ext4::open_with_journal(
                dev,
                ext_journal,
            )?)));
        }
        match Fat::open(dev) {
            Ok(f) => Ok(GuestFs::Fat(f)),
            Err(vmdisk_fat::Error::NotFat { why }) => Err(FsError::Unknown { what: why }),
            Err(e) => Err(e.into()),
        }
    }

    /// "ext4" or "vfat".
    pub fn kind(&self) -> &'static str {
        match self {
            GuestFs::Ext4(_) => "ext4",
            GuestFs::Fat(_) => "vfat",
        }
    }

    /// `lstat`.
    pub fn stat(&self, path: &str) -> Result<Entry, FsError> {
        Ok(match self {
            GuestFs::Ext4(f) => f.stat(path)?,
            GuestFs::Fat(f) => fat_entry(f.stat(path)?),
        })
    }

    /// A directory's entries, sorted, unreadable ones carrying their error.
    pub fn read_dir(&self, path: &str) -> Result<Vec<Entry>, FsError> {
        Ok(match self {
            GuestFs::Ext4(f) => f.read_dir(path)?,
            GuestFs::Fat(f) => f.read_dir(path)?.into_iter().map(fat_entry).collect(),
        })
    }

    /// Every entry below a directory, going on past damage.
    pub fn walk_lossy(&self, path: &str) -> Result<Vec<Entry>, FsError> {
        Ok(match self {
            GuestFs::Ext4(f) => f.walk_lossy(path)?,
            GuestFs::Fat(f) => f.walk_lossy(path)?.into_iter().map(fat_entry).collect(),
        })
    }

    /// Open a regular file by path (ext4 symlinks followed).
    pub fn open_file(&self, path: &str) -> Result<GuestFile, FsError> {
        Ok(match self {
            GuestFs::Ext4(f) => GuestFile::Ext4(f.open_file(path)?),
            GuestFs::Fat(f) => GuestFile::Fat(f.open_file(path)?),
        })
    }

    /// Open the regular file an entry (from a walk or listing) names, without a lookup.
    pub fn open_entry(&self, e: &Entry) -> Result<GuestFile, FsError> {
        Ok(match self {
            GuestFs::Ext4(f) => GuestFile::Ext4(f.open_inode(e.ino)?),
            GuestFs::Fat(f) => GuestFile::Fat(f.open_file(&e.path)?),
        })
    }

    /// Byte ranges that may hold data; the rest of the file reads as zeros.
    pub fn data_segments(&self, f: &GuestFile) -> Vec<(u64, u64)> {
        match (self, f) {
            (GuestFs::Ext4(fs), GuestFile::Ext4(f)) => f.data_segments(fs.volume().bs),
            (_, f) if f.size() > 0 => vec![(0, f.size())],
            _ => Vec::new(),
        }
    }

    /// Read `buf.len()` bytes at `off` of an open file.
    pub fn read_at(&self, f: &GuestFile, off: u64, buf: &mut [u8]) -> Result<(), FsError> {
        match (self, f) {
            (GuestFs::Ext4(fs), GuestFile::Ext4(f)) => Ok(fs.read_at(f, off, buf)?),
            (GuestFs::Fat(fs), GuestFile::Fat(f)) => Ok(fs.read_at(f, off, buf)?),
            _ => Err(FsError::Unknown {
                what: "a file of another filesystem".into(),
            }),
        }
    }
}
