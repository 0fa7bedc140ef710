//! What a directory tree needs on ext2/3/4, for `measure` and `create ... auto`: pure, from
//! the scanned [`Tree`] value.

use crate::tree::{Kind, Node, Tree};

/// Block size the estimate rounds to (the larger of mke2fs's choices: conservative).
const BLOCK: u64 = 4096;

/// What a directory tree needs on ext4.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of data blocks (4 KiB rounding, directories and long symlinks included).
    pub data_bytes: u64,
    pub inodes: u64,
}

impl Usage {
    /// The usage of `tree` (scanned without following symlinks).
    pub fn of(tree: &Tree) -> Usage {
        let mut u = Usage::default();
        u.dir(&tree.root);
        u
    }

    fn dir(&mut self, nodes: &[Node]) {
        let mut dir_bytes = 24u64; // "." and ".."
        for n in nodes {
            dir_bytes += 8 + (n.name.len() as u64).div_ceil(4) * 4;
            self.inodes += 1;
            match &n.kind {
                Kind::Dir(c) => self.dir(c),
                Kind::File => {
                    // Sparse files still cost their allocated blocks at most; count apparent
                    // size unless it is larger than what is allocated (holes stay holes).
                    let m = n.meta;
                    let bytes = m.len.min(m.allocated.max(m.len.min(BLOCK)));
                    let blocks = bytes.div_ceil(BLOCK);
                    // Extent tree blocks for big, fragmented files: one per 128 MiB is generous.
                    self.data_bytes += (blocks + blocks / 32768) * BLOCK;
                }
                Kind::Symlink(_) if n.meta.len >= 60 => self.data_bytes += BLOCK,
                _ => {}
            }
        }
        self.data_bytes += dir_bytes.div_ceil(BLOCK) * BLOCK + BLOCK;
        self.inodes += 1;
    }
    /// Smallest filesystem (whole MiB) mke2fs can fill with this content, leaving `margin`.
    pub fn min_fs_bytes(&self, margin: u64) -> u64 {
        const MIB: u64 = 1 << 20;
        let payload = self
            .data_bytes
            .saturating_add(margin)
            .saturating_add(4 * MIB);
        // Inode tables (up to 1/16 with mke2fs's "small" type), 5 % reserved blocks, bitmaps
        // and group descriptors: divide by 0.85 to be safe.
        let mut size = payload.saturating_mul(100) / 85;
        // Enough inodes at the densest ratio mke2fs picks for larger filesystems (16 KiB).
        size = size.max(self.inodes.saturating_add(64).saturating_mul(16384));
        size = size.saturating_add(journal_bytes(size));
        size.div_ceil(MIB).saturating_mul(MIB)
    }
}

/// mke2fs's default journal size for a filesystem of `fs` bytes (4 KiB blocks).
fn journal_bytes(fs: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    match fs {
        f if f < 128 * MIB => 4 * MIB,
        f if f < 1024 * MIB => 16 * MIB,
        f if f < 2048 * MIB => 32 * MIB,
        f if f < 16384 * MIB => 64 * MIB,
        f if f < 32768 * MIB => 128 * MIB,
        f if f < 65536 * MIB => 256 * MIB,
        f if f < 131072 * MIB => 512 * MIB,
        _ => 1024 * MIB,
    }
}
