//! ext4 for vmdisk: read any ext2/3/4 filesystem on a [`BlockDevice`] and edit files in place.
//!
//! Reading is our own ([`Ext4`] over [`volume::Volume`]): superblock, group descriptors (meta_bg
//! too), the jbd2 journal replayed in memory ([`jbd2`]: v1/v2, 32/64-bit, csum v1/v2/v3,
//! revoke, async commit, external journals), inodes of any size, extents (unwritten ones read as
//! zeros) and ext2/3 indirect block maps, inline data, and directories read linearly (so every
//! htree hash variant works). It backs `ls`, `cat`, `cp-out` and the ext4 part of `inspect`.
//! Writing is our own small, careful editor ([`replace_file`]): it replaces an existing regular
//! file's content and keeps every counter and checksum right. [`passwd`] holds the pure logic
//! that repairs `/etc/shadow`.
//!
//! ```text
//!  byte 0      1024        (first_data_block+1) * block_size
//!  ┌──────────┬───────────┬──────────────────────┬─────────────┬────────┬───────────────┬──────
//!  │ boot     │ superblock│ group descriptor     │ reserved    │ block  │ inode  │ inode │ data
//!  │ (1 KiB)  │ (1 KiB)   │ table: 32 B each, or │ GDT blocks  │ bitmap │ bitmap │ table │ blocks
//!  │          │ magic ef53│ s_desc_size (64bit)  │ (resize)    │        │        │       │
//!  └──────────┴───────────┴──────────────────────┴─────────────┴────────┴────────┴───────┴──────
//!  group 0 ─────────────────────────────────────────────────────────────────▶ group 1 ... n-1
//!  (flex_bg packs the bitmaps and inode tables of 2^k groups together in the first group;
//!   sparse_super keeps superblock/GDT backups only in groups 0, 1 and powers of 3, 5, 7)
//!
//!  inode (s_inode_size bytes, in the inode table of group (ino-1) / inodes_per_group)
//!  ┌ i_mode ┬ uid ┬ i_size_lo ┬ a/c/mtime ┬ … ┬ i_blocks ┬ i_flags ┬ i_block[60] ┬ … ┬ csum_lo ┐
//!  └ i_extra_isize ┬ i_checksum_hi ┬ c/m/atime_extra ┬ crtime … ──────────────────────────────┘
//!  i_block = extent header (magic f30a, entries, max, depth) + 4 entries:
//!      depth 0: leaves   { logical block, len (>32768 = unwritten), physical block 48 bit }
//!      depth>0: indexes  { logical block, child tree block } → block: header + entries + crc32c tail
//!
//!  checksums: metadata_csum = crc32c seeded with crc32c(uuid) (or s_checksum_seed):
//!      superblock, group descriptors (low 16 bits), block/inode bitmaps (in the descriptor),
//!      inodes (seed + inode number + generation), extent blocks, directory blocks.
//!  gdt_csum (uninit_bg) = crc16(uuid, group number, descriptor).
//! ```
//!
//! Errors ([`Error`]) keep apart: not ext4 at all, corrupt structures ([`Error::Corrupt`] with
//! the byte offset), features we do not handle ([`Error::Unsupported`]), a filesystem that is not
//! clean ([`Error::NeedsRecovery`], [`Error::NotClean`]), lookups (`NotFound`, ...), named limits,
//! and block-device IO ([`Error::Block`]). The editor validates everything it will touch before
//! the first write, so an error means nothing was written.
//!
//! Per-inode damage (a bad inode checksum, a corrupt directory block, an encrypted directory)
//! is an error for that inode only: [`Ext4::walk_lossy`] reports it on the entry and goes on.

#![forbid(unsafe_code)]

mod cache;
mod crc;
mod edit;
pub mod grow;
pub mod jbd2;
mod jwrite;
mod ondisk;
pub mod passwd;
mod read;
pub mod volume;
pub mod write;

pub use edit::{replace_file, EditReport};
pub use grow::{grow, plan_grow, GrowError, GrowPlan, GrowReport};
pub use jbd2::JournalError;
pub use read::{CopyReport, Entry, Ext4, File, FileKind, FsInfo, FsState};
pub use vmdisk_block::BlockDevice;
pub use volume::JournalReport;
pub use write::{replay_journal, Attrs, CommitReport, Editor, Stat};

/// Result of every ext4 operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The underlying device failed (or the request was out of range).
    #[error(transparent)]
    Block(#[from] vmdisk_block::Error),
    /// No ext4 superblock magic at offset 1024.
    #[error("not an ext2/3/4 filesystem (no superblock magic 0xef53 at byte 1080)")]
    NotExt4,
    /// A structure failed validation; `off` is its byte offset in the filesystem.
    #[error("corrupt ext4 filesystem: {what} (at byte {off:#x}); run e2fsck on it")]
    Corrupt { what: String, off: u64 },
    /// Something the reader or editor does not handle.
    #[error("unsupported: {what}")]
    Unsupported { what: String },
    /// The journal holds transactions that were never replayed.
    #[error(
        "the ext4 journal needs recovery (the VM was not shut down cleanly): boot the VM once \
         and shut it down cleanly, or replay it with `e2fsck -fy` on the partition (exported \
         with `vmdisk serve -P PART`, or in a rescue VM), then retry; nothing was written"
    )]
    NeedsRecovery,
    /// The superblock says the filesystem is mounted, unclean or has recorded errors.
    #[error(
        "the filesystem is {state}: shut the VM down cleanly (or run e2fsck on the partition) \
         before editing it"
    )]
    NotClean { state: String },
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: not a directory")]
    NotADirectory { path: String },
    #[error("{path}: is a directory")]
    IsADirectory { path: String },
    #[error("{path}: not a regular file")]
    NotARegularFile { path: String },
    #[error("{path}: not a symbolic link")]
    NotASymlink { path: String },
    #[error("{path}: invalid path (paths are absolute, without NUL bytes)")]
    BadPath { path: String },
    #[error("{path}: too many levels of symbolic links")]
    TooManySymlinks { path: String },
    /// The journal needs replaying and cannot be replayed as e2fsck would; says why.
    #[error("cannot replay the ext4 journal in memory: {source}; replay it with `e2fsck -E journal_only` on a copy of the partition, or boot the VM once and shut it down cleanly")]
    Journal {
        #[source]
        source: jbd2::JournalError,
    },
    /// The filesystem keeps its journal on another device, which must be recovered.
    #[error("the filesystem needs recovery from its external journal (UUID {uuid}), which is on another device; give that device too, or replay it with e2fsck")]
    ExternalJournalNeeded { uuid: String },
    #[error("inode {ino}: checksum mismatch (at byte {off:#x}); run e2fsck on it")]
    InodeChecksum { ino: u32, off: u64 },
    #[error(
        "inode {ino}: extent tree block checksum mismatch (at byte {off:#x}); run e2fsck on it"
    )]
    ExtentChecksum { ino: u32, off: u64 },
    #[error("directory inode {ino}: block checksum mismatch (at byte {off:#x}); run e2fsck on it")]
    DirChecksum { ino: u32, off: u64 },
    /// A named safety limit would be exceeded.
    #[error("limit exceeded: {what} needs {needed}, limit is {limit}")]
    Limit {
        what: &'static str,
        needed: u64,
        limit: u64,
    },
    /// Not enough free blocks for the new content (old blocks are freed only afterwards).
    #[error("not enough free space: the new content needs {needed} blocks, {free} are free")]
    NoSpace { needed: u64, free: u64 },
    /// Writing a copied-out file or directory on the host failed.
    #[error("cannot {op} {}", path.display())]
    Output {
        op: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A directory entry name cannot be used on the host (contains '/', is '.' or '..').
    #[error("refusing unsafe file name {name:?} in {dir}")]
    UnsafeName { dir: String, name: String },
}

impl Error {
    pub(crate) fn corrupt(what: impl Into<String>, off: u64) -> Self {
        Error::Corrupt {
            what: what.into(),
            off,
        }
    }
    pub(crate) fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }
}
