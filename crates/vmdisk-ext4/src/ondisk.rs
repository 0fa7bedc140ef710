//! On-disk ext4 structures: parsed from bytes, validated, and serialised back. No IO here.
//!
//! Every field read from an image goes through one of the `parse` functions below, which check
//! it against the geometry and the named limits before anything else uses it.

use crate::crc::{crc16, crc32c_raw};
use crate::{Error, Result};

/// Byte offset of the primary superblock.
pub const SB_OFF: u64 = 1024;
/// Size of the superblock record.
pub const SB_LEN: usize = 1024;
/// ext4 magic number at superblock offset 0x38.
pub const EXT4_MAGIC: u16 = 0xef53;
/// Largest `s_log_block_size`: 64 KiB blocks (1024 << 6).
pub const MAX_LOG_BLOCK_SIZE: u32 = 6;
/// Most block groups whose descriptors we hold in memory (64 MiB of 64-byte descriptors,
/// 128 TiB of 4 KiB blocks): more is a corrupt superblock for a VM disk.
pub const MAX_GROUPS: u64 = 1 << 20;
/// Deepest extent tree we follow (the kernel's own bound is 5).
pub const MAX_EXTENT_DEPTH: u16 = 5;
/// Most extent leaves we collect for one file (bounds memory on hostile trees).
pub const MAX_EXTENTS_PER_FILE: usize = 1 << 20;
/// Longest initialised extent in blocks.
pub const MAX_INIT_EXTENT_LEN: u32 = 32768;
/// Inode number of the root directory.
pub const ROOT_INO: u32 = 2;

// Superblock state bits.
pub const STATE_VALID: u16 = 0x1;
pub const STATE_ERROR: u16 = 0x2;
pub const STATE_ORPHANS: u16 = 0x4;

// Feature bits (compat / incompat / ro_compat).
pub const COMPAT_HAS_JOURNAL: u32 = 0x4;
pub const INCOMPAT_RECOVER: u32 = 0x4;
pub const INCOMPAT_64BIT: u32 = 0x80;
pub const INCOMPAT_CSUM_SEED: u32 = 0x2000;
pub const RO_COMPAT_HUGE_FILE: u32 = 0x8;
pub const RO_COMPAT_GDT_CSUM: u32 = 0x10;
pub const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
pub const RO_COMPAT_BIGALLOC: u32 = 0x200;
/// Largest bigalloc cluster, as a power of two in blocks (the kernel allows up to 2^16).
pub const MAX_CLUSTER_SHIFT: u32 = 16;
pub const RO_COMPAT_ORPHAN_PRESENT: u32 = 0x10000;

/// (bit, name) as `dumpe2fs` prints them.
pub const COMPAT_NAMES: &[(u32, &str)] = &[
    (0x1, "dir_prealloc"),
    (0x2, "imagic_inodes"),
    (0x4, "has_journal"),
    (0x8, "ext_attr"),
    (0x10, "resize_inode"),
    (0x20, "dir_index"),
    (0x40, "lazy_bg"),
    (0x80, "snapshot_bitmap"),
    (0x100, "exclude_bitmap"),
    (0x200, "sparse_super2"),
    (0x400, "fast_commit"),
    (0x800, "stable_inodes"),
    (0x1000, "orphan_file"),
];
pub const INCOMPAT_NAMES: &[(u32, &str)] = &[
    (0x1, "compression"),
    (0x2, "filetype"),
    (0x4, "needs_recovery"),
    (0x8, "journal_dev"),
    (0x10, "meta_bg"),
    (0x40, "extent"),
    (0x80, "64bit"),
    (0x100, "mmp"),
    (0x200, "flex_bg"),
    (0x400, "ea_inode"),
    (0x1000, "dirdata"),
    (0x2000, "metadata_csum_seed"),
    (0x4000, "large_dir"),
    (0x8000, "inline_data"),
    (0x10000, "encrypt"),
    (0x20000, "casefold"),
];
pub const RO_COMPAT_NAMES: &[(u32, &str)] = &[
    (0x1, "sparse_super"),
    (0x2, "large_file"),
    (0x4, "btree_dir"),
    (0x8, "huge_file"),
    (0x10, "uninit_bg"),
    (0x20, "dir_nlink"),
    (0x40, "extra_isize"),
    (0x80, "snapshot"),
    (0x100, "quota"),
    (0x200, "bigalloc"),
    (0x400, "metadata_csum"),
    (0x800, "replica"),
    (0x1000, "read-only"),
    (0x2000, "project"),
    (0x4000, "shared_blocks"),
    (0x8000, "verity"),
    (0x10000, "orphan_present"),
];

/// Incompatible features the editor can live with (everything else is refused).
pub const EDIT_INCOMPAT_OK: u32 = 0x2 | 0x40 | 0x80 | 0x200 | 0x400 | 0x2000 | 0x4000;
/// Read-only-compatible features the editor keeps consistent.
pub const EDIT_RO_COMPAT_OK: u32 = 0x1 | 0x2 | 0x4 | 0x8 | 0x10 | 0x20 | 0x40 | 0x400 | 0x8000;

pub fn le16(b: &[u8], off: usize) -> u16 {
    u16::from_le_bytes([b[off], b[off + 1]])
}
pub fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}
pub fn put16(b: &mut [u8], off: usize, v: u16) {
    b[off..off + 2].copy_from_slice(&v.to_le_bytes());
}
pub fn put32(b: &mut [u8], off: usize, v: u32) {
    b[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

/// Names of the set bits, unknown bits as `FEATURE_<kind>_<bit>`.
pub fn feature_names(bits: u32, table: &[(u32, &str)], kind: &str) -> Vec<String> {
    let mut out = Vec::new();
    for i in 0..32 {
        let bit = 1u32 << i;
        if bits & bit == 0 {
            continue;
        }
        match table.iter().find(|(b, _)| *b == bit) {
            Some((_, n)) => out.push((*n).to_string()),
            None => out.push(format!("FEATURE_{kind}{i}")),
        }
    }
    out
}

/// The validated superblock (geometry and the fields the editor maintains).
#[derive(Debug, Clone)]
pub struct Superblock {
    /// The 1024 raw bytes, kept to write back with updated counters and checksum.
    pub raw: Vec<u8>,
    pub block_size: u64,
    pub blocks_count: u64,
    pub free_blocks: u64,
    pub first_data_block: u64,
    pub blocks_per_group: u64,
    pub inodes_per_group: u64,
    pub inodes_count: u64,
    pub free_inodes: u64,
    pub inode_size: u64,
    pub desc_size: u64,
    pub group_count: u64,
    pub compat: u32,
    pub incompat: u32,
    pub ro_compat: u32,
    pub state: u16,
    pub uuid: [u8; 16],
    pub label: Vec<u8>,
    /// crc32c seed for metadata checksums, when metadata_csum is on.
    pub csum_seed: Option<u32>,
    /// Stored superblock checksum matched (always true without metadata_csum).
    pub checksum_ok: bool,
}

fn corrupt(what: impl Into<String>, off: u64) -> Error {
    Error::Corrupt {
        what: what.into(),
        off,
    }
}

impl Superblock {
    /// Parse and validate the 1024 bytes at [`SB_OFF`].
    pub fn parse(raw: &[u8]) -> Result<Superblock> {
        if raw.len() != SB_LEN {
            return Err(corrupt("short superblock", SB_OFF));
        }
        let at = |o: usize| SB_OFF + o as u64;
        if le16(raw, 0x38) != EXT4_MAGIC {
            return Err(Error::NotExt4);
        }
        let log_bs = le32(raw, 0x18);
        if log_bs > MAX_LOG_BLOCK_SIZE {
            return Err(corrupt(
                format!("s_log_block_size {log_bs} is above {MAX_LOG_BLOCK_SIZE}"),
                at(0x18),
            ));
        }
        let block_size = 1024u64 << log_bs;
        let compat = le32(raw, 0x5c);
        let incompat = le32(raw, 0x60);
        let ro_compat = le32(raw, 0x64);
        let is64 = incompat & INCOMPAT_64BIT != 0;
        let mut blocks_count = u64::from(le32(raw, 0x4));
        let mut free_blocks = u64::from(le32(raw, 0xc));
        if is64 {
            blocks_count |= u64::from(le32(raw, 0x150)) << 32;
            free_blocks |= u64::from(le32(raw, 0x158)) << 32;
        }
        let first_data_block = u64::from(le32(raw, 0x14));
        let blocks_per_group = u64::from(le32(raw, 0x20));
        let inodes_per_group = u64::from(le32(raw, 0x28));
        let inodes_count = u64::from(le32(raw, 0x0));
        let free_inodes = u64::from(le32(raw, 0x10));
        // bigalloc: one bitmap bit per cluster, so a group spans up to 2^k times more blocks.
        let cluster_shift = if ro_compat & RO_COMPAT_BIGALLOC != 0 {
            let log_cluster = le32(raw, 0x1c);
            if log_cluster < log_bs || log_cluster > log_bs + MAX_CLUSTER_SHIFT {
                return Err(corrupt(
                    format!("s_log_cluster_size {log_cluster} with block size {block_size}"),
                    at(0x1c),
                ));
            }
            log_cluster - log_bs
        } else {
            0
        };
        if blocks_per_group == 0
            || blocks_per_group > (8 * block_size) << cluster_shift
            || blocks_per_group & 7 != 0
        {
            return Err(corrupt(
                format!("s_blocks_per_group {blocks_per_group} does not fit one bitmap block"),
                at(0x20),
            ));
        }
        if inodes_per_group == 0 || inodes_per_group > 8 * block_size || inodes_per_group & 7 != 0 {
            return Err(corrupt(
                format!("s_inodes_per_group {inodes_per_group} does not fit one bitmap block"),
                at(0x28),
            ));
        }
        if first_data_block > 1 || first_data_block >= blocks_count {
            return Err(corrupt(
                format!("s_first_data_block {first_data_block} / s_blocks_count {blocks_count}"),
                at(0x14),
            ));
        }
        let group_count = (blocks_count - first_data_block).div_ceil(blocks_per_group);
        if group_count > MAX_GROUPS {
            return Err(Error::Limit {
                what: "ext4 block groups",
                needed: group_count,
                limit: MAX_GROUPS,
            });
        }
        // Free counters are only hints for a reader; the editor checks them (check_counters).
        if inodes_count != group_count * inodes_per_group {
            return Err(corrupt(
                format!(
                    "s_inodes_count {inodes_count} != {group_count} groups * {inodes_per_group}"
                ),
                at(0x0),
            ));
        }
        let rev = le32(raw, 0x4c);
        let inode_size = if rev == 0 {
            128
        } else {
            u64::from(le16(raw, 0x58))
        };
        if inode_size < 128 || !inode_size.is_power_of_two() || inode_size > block_size {
            return Err(corrupt(format!("s_inode_size {inode_size}"), at(0x58)));
        }
        let desc_size = if is64 {
            let d = u64::from(le16(raw, 0xfe));
            if !(64..=1024).contains(&d) || !d.is_power_of_two() {
                return Err(corrupt(format!("s_desc_size {d} with 64bit"), at(0xfe)));
            }
            d
        } else {
            32
        };
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&raw[0x68..0x78]);
        let label_raw = &raw[0x78..0x88];
        let label_len = label_raw.iter().position(|&b| b == 0).unwrap_or(16);
        let label = label_raw[..label_len].to_vec();
        let (csum_seed, checksum_ok) = if ro_compat & RO_COMPAT_METADATA_CSUM != 0 {
            if raw[0x175] != 1 {
                return Err(corrupt(
                    format!("s_checksum_type {} is not crc32c", raw[0x175]),
                    at(0x175),
                ));
            }
            let seed = if incompat & INCOMPAT_CSUM_SEED != 0 {
                le32(raw, 0x270)
            } else {
                crc32c_raw(!0, &uuid)
            };
            (Some(seed), le32(raw, 0x3fc) == sb_checksum(raw))
        } else {
            (None, true)
        };
        Ok(Superblock {
            raw: raw.to_vec(),
            block_size,
            blocks_count,
            free_blocks,
            first_data_block,
            blocks_per_group,
            inodes_per_group,
            inodes_count,
            free_inodes,
            inode_size,
            desc_size,
            group_count,
            compat,
            incompat,
            ro_compat,
            state: le16(raw, 0x3a),
            uuid,
            label,
            csum_seed,
            checksum_ok,
        })
    }

    /// The free counters fit the totals (the editor relies on them; a reader does not).
    pub fn check_counters(&self) -> Result<()> {
        if self.free_blocks > self.blocks_count {
            return Err(corrupt(
                format!(
                    "free blocks {} exceed the block count {}",
                    self.free_blocks, self.blocks_count
                ),
                SB_OFF + 0xc,
            ));
        }
        if self.free_inodes > self.inodes_count {
            return Err(corrupt(
                format!(
                    "free inodes {} exceed the inode count {}",
                    self.free_inodes, self.inodes_count
                ),
                SB_OFF + 0x10,
            ));
        }
        Ok(())
    }

    pub fn metadata_csum(&self) -> bool {
        self.csum_seed.is_some()
    }

    /// gdt_csum or metadata_csum: group descriptors carry a checksum and UNINIT flags count.
    pub fn has_group_desc_csum(&self) -> bool {
        self.ro_compat & (RO_COMPAT_GDT_CSUM | RO_COMPAT_METADATA_CSUM) != 0
    }

    /// Byte offset of the primary group descriptor table.
    pub fn gdt_off(&self) -> u64 {
        (self.first_data_block + 1 + self.group_zero_adjust()) * self.block_size
    }

    /// 1 KiB blocks with block 0 as the first data block (bigalloc): the superblock fills
    /// block 1, so the descriptors start one block later (libext2fs' `group_zero_adjust`).
    pub fn group_zero_adjust(&self) -> u64 {
        u64::from(self.block_size == 1024 && self.first_data_block == 0)
    }

    /// First block of `group`.
    pub fn group_first_block(&self, group: u64) -> u64 {
        self.first_data_block + group * self.blocks_per_group
    }

    /// Number of blocks in `group` (the last one may be short).
    pub fn group_len(&self, group: u64) -> u64 {
        let first = self.group_first_block(group);
        self.blocks_per_group.min(self.blocks_count - first)
    }

    /// Set the free-block counter and recompute the checksum.
    pub fn set_free_blocks(&mut self, free: u64) {
        self.free_blocks = free;
        put32(&mut self.raw, 0xc, free as u32);
        if self.incompat & INCOMPAT_64BIT != 0 {
            put32(&mut self.raw, 0x158, (free >> 32) as u32);
        }
        if self.metadata_csum() {
            let c = sb_checksum(&self.raw);
            put32(&mut self.raw, 0x3fc, c);
        }
    }
}

/// crc32c of the superblock up to its checksum field.
pub fn sb_checksum(raw: &[u8]) -> u32 {
    crc32c_raw(!0, &raw[..0x3fc])
}

// Group descriptor flags.
pub const BG_INODE_UNINIT: u16 = 0x1;
pub const BG_BLOCK_UNINIT: u16 = 0x2;

/// One validated group descriptor plus its raw record.
#[derive(Debug, Clone)]
pub struct GroupDesc {
    pub raw: Vec<u8>,
    pub block_bitmap: u64,
    pub inode_bitmap: u64,
    pub inode_table: u64,
    pub free_blocks: u64,
    pub flags: u16,
}

impl GroupDesc {
    /// Parse descriptor `group` from its `desc_size` bytes and check it against `sb`.
    pub fn parse(sb: &Superblock, group: u64, raw: &[u8]) -> Result<GroupDesc> {
        let off = sb.gdt_off() + group * sb.desc_size;
        let wide = sb.desc_size >= 64;
        let hi32 = |o: usize| {
            if wide {
                u64::from(le32(raw, o)) << 32
            } else {
                0
            }
        };
        let hi16 = |o: usize| {
            if wide {
                u64::from(le16(raw, o)) << 16
            } else {
                0
            }
        };
        let gd = GroupDesc {
            raw: raw.to_vec(),
            block_bitmap: u64::from(le32(raw, 0x0)) | hi32(0x20),
            inode_bitmap: u64::from(le32(raw, 0x4)) | hi32(0x24),
            inode_table: u64::from(le32(raw, 0x8)) | hi32(0x28),
            free_blocks: u64::from(le16(raw, 0xc)) | hi16(0x2c),
            flags: le16(raw, 0x12),
        };
        if sb.has_group_desc_csum() {
            let want = gd_checksum(sb, group, raw);
            if le16(raw, 0x1e) != want {
                return Err(corrupt(
                    format!(
                        "group {group} descriptor checksum {:#06x}, computed {want:#06x}",
                        le16(raw, 0x1e)
                    ),
                    off,
                ));
            }
        }
        let itable_blocks = (sb.inodes_per_group * sb.inode_size).div_ceil(sb.block_size);
        let ok = |b: u64, n: u64| {
            b >= sb.first_data_block && b.checked_add(n).is_some_and(|e| e <= sb.blocks_count)
        };
        if !ok(gd.block_bitmap, 1) || !ok(gd.inode_bitmap, 1) || !ok(gd.inode_table, itable_blocks)
        {
            return Err(corrupt(
                format!(
                    "group {group} descriptor points outside the filesystem \
                     (bitmaps {} / {}, inode table {})",
                    gd.block_bitmap, gd.inode_bitmap, gd.inode_table
                ),
                off,
            ));
        }
        if gd.free_blocks > sb.group_len(group) {
            return Err(corrupt(
                format!("group {group} claims {} free blocks", gd.free_blocks),
                off,
            ));
        }
        Ok(gd)
    }

    pub fn set_free_blocks(&mut self, v: u64) {
        self.free_blocks = v;
        put16(&mut self.raw, 0xc, v as u16);
        if self.raw.len() >= 64 {
            put16(&mut self.raw, 0x2c, (v >> 16) as u16);
        }
    }

    pub fn set_flags(&mut self, f: u16) {
        self.flags = f;
        put16(&mut self.raw, 0x12, f);
    }

    pub fn block_bitmap_csum(&self) -> u32 {
        let mut c = u32::from(le16(&self.raw, 0x18));
        if self.raw.len() >= 64 {
            c |= u32::from(le16(&self.raw, 0x38)) << 16;
        }
        c
    }

    pub fn set_block_bitmap_csum(&mut self, c: u32) {
        put16(&mut self.raw, 0x18, c as u16);
        if self.raw.len() >= 64 {
            put16(&mut self.raw, 0x38, (c >> 16) as u16);
        }
    }

    /// Recompute the descriptor checksum (no-op without gdt_csum/metadata_csum).
    pub fn reseal(&mut self, sb: &Superblock, group: u64) {
        if sb.has_group_desc_csum() {
            let c = gd_checksum(sb, group, &self.raw);
            put16(&mut self.raw, 0x1e, c);
        }
    }
}

/// Group descriptor checksum: crc32c low 16 bits (metadata_csum) or crc16 (gdt_csum).
pub fn gd_checksum(sb: &Superblock, group: u64, raw: &[u8]) -> u16 {
    let g = (group as u32).to_le_bytes();
    if let Some(seed) = sb.csum_seed {
        let mut c = crc32c_raw(seed, &g);
        c = crc32c_raw(c, &raw[..0x1e]);
        c = crc32c_raw(c, &[0, 0]);
        c = crc32c_raw(c, &raw[0x20..]);
        (c & 0xffff) as u16
    } else {
        let mut c = crc16(!0, &sb.uuid);
        c = crc16(c, &g);
        c = crc16(c, &raw[..0x1e]);
        if raw.len() > 0x20 {
            c = crc16(c, &raw[0x20..]);
        }
        c
    }
}

/// crc32c of a block bitmap (metadata_csum): over blocks_per_group bits.
pub fn block_bitmap_checksum(sb: &Superblock, seed: u32, bitmap: &[u8]) -> u32 {
    let n = (sb.blocks_per_group / 8) as usize;
    crc32c_raw(seed, &bitmap[..n.min(bitmap.len())])
}

// Inode fields and flags.
pub const S_IFMT: u16 = 0xf000;
pub const S_IFREG: u16 = 0x8000;
pub const S_IFDIR: u16 = 0x4000;
pub const S_IFLNK: u16 = 0xa000;
pub const FL_IMMUTABLE: u32 = 0x10;
pub const FL_APPEND: u32 = 0x20;
pub const FL_ENCRYPT: u32 = 0x800;
pub const FL_HUGE_FILE: u32 = 0x40000;
pub const FL_EXTENTS: u32 = 0x80000;
pub const FL_VERITY: u32 = 0x100000;
pub const FL_EA_INODE: u32 = 0x200000;
pub const FL_EOFBLOCKS: u32 = 0x400000;
pub const FL_INLINE_DATA: u32 = 0x1000_0000;

/// Per-inode checksum seed: crc32c(fs seed, inode number, generation).
pub fn inode_seed(fs_seed: u32, ino: u32, generation: u32) -> u32 {
    let c = crc32c_raw(fs_seed, &ino.to_le_bytes());
    crc32c_raw(c, &generation.to_le_bytes())
}

/// True when the inode's extra space holds `i_checksum_hi`.
fn inode_has_csum_hi(raw: &[u8]) -> bool {
    raw.len() > 128 && 128 + usize::from(le16(raw, 0x80)) >= 0x84
}

/// Full 32-bit inode checksum over the `inode_size` record with both halves zeroed.
pub fn inode_checksum(fs_seed: u32, ino: u32, raw: &[u8]) -> u32 {
    let seed = inode_seed(fs_seed, ino, le32(raw, 0x64));
    let mut c = crc32c_raw(seed, &raw[..0x7c]);
    c = crc32c_raw(c, &[0, 0]);
    c = crc32c_raw(c, &raw[0x7e..128.min(raw.len())]);
    if raw.len() > 128 {
        c = crc32c_raw(c, &raw[128..0x82]);
        if inode_has_csum_hi(raw) {
            c = crc32c_raw(c, &[0, 0]);
            c = crc32c_raw(c, &raw[0x84..]);
        } else {
            c = crc32c_raw(c, &raw[0x82..]);
        }
    }
    c
}

/// Does the stored inode checksum match?
pub fn inode_checksum_ok(fs_seed: u32, ino: u32, raw: &[u8]) -> bool {
    let c = inode_checksum(fs_seed, ino, raw);
    if le16(raw, 0x7c) != (c & 0xffff) as u16 {
        return false;
    }
    !inode_has_csum_hi(raw) || le16(raw, 0x82) == (c >> 16) as u16
}

/// Store the inode checksum.
pub fn inode_set_checksum(fs_seed: u32, ino: u32, raw: &mut [u8]) {
    let c = inode_checksum(fs_seed, ino, raw);
    put16(raw, 0x7c, c as u16);
    if inode_has_csum_hi(raw) {
        put16(raw, 0x82, (c >> 16) as u16);
    }
}

/// Extent tree magic.
pub const EXTENT_MAGIC: u16 = 0xf30a;

/// A validated extent node header.
#[derive(Debug, Clone, Copy)]
pub struct ExtentHeader {
    pub entries: u16,
    pub max: u16,
    pub depth: u16,
}

/// Parse the header at the start of `node` (60-byte i_block or a tree block).
pub fn parse_extent_header(node: &[u8], off: u64) -> Result<ExtentHeader> {
    if le16(node, 0) != EXTENT_MAGIC {
        return Err(corrupt(
            format!("extent header magic {:#06x}", le16(node, 0)),
            off,
        ));
    }
    let h = ExtentHeader {
        entries: le16(node, 2),
        max: le16(node, 4),
        depth: le16(node, 6),
    };
    let room = (node.len() - 12) / 12;
    if h.entries > h.max || usize::from(h.max) > room || h.depth > MAX_EXTENT_DEPTH {
        return Err(corrupt(
            format!(
                "extent header entries {} max {} depth {} (room for {room})",
                h.entries, h.max, h.depth
            ),
            off,
        ));
    }
    Ok(h)
}

/// One leaf extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    pub lblk: u32,
    pub len: u32,
    pub pblk: u64,
    pub uninit: bool,
}

pub fn parse_leaf(e: &[u8]) -> Leaf {
    let raw_len = u32::from(le16(e, 4));
    let (len, uninit) = if raw_len > MAX_INIT_EXTENT_LEN {
        (raw_len - MAX_INIT_EXTENT_LEN, true)
    } else {
        (raw_len, false)
    };
    Leaf {
        lblk: le32(e, 0),
        len,
        pblk: (u64::from(le16(e, 6)) << 32) | u64::from(le32(e, 8)),
        uninit,
    }
}

pub fn write_leaf(e: &mut [u8], l: &Leaf) {
    put32(e, 0, l.lblk);
    put16(e, 4, l.len as u16);
    put16(e, 6, (l.pblk >> 32) as u16);
    put32(e, 8, l.pblk as u32);
}

/// (first logical block, child block) of an index entry.
pub fn parse_index(e: &[u8]) -> (u32, u64) {
    (
        le32(e, 0),
        (u64::from(le16(e, 8)) << 32) | u64::from(le32(e, 4)),
    )
}

pub fn write_index(e: &mut [u8], lblk: u32, child: u64) {
    put32(e, 0, lblk);
    put32(e, 4, child as u32);
    put16(e, 8, (child >> 32) as u16);
    put16(e, 10, 0);
}

pub fn write_extent_header(node: &mut [u8], h: ExtentHeader) {
    put16(node, 0, EXTENT_MAGIC);
    put16(node, 2, h.entries);
    put16(node, 4, h.max);
    put16(node, 6, h.depth);
    put32(node, 8, 0);
}

/// Offset of the checksum tail in an extent tree block.
pub fn extent_tail_off(h: ExtentHeader) -> usize {
    12 + 12 * usize::from(h.max)
}

/// Has this superblock got a backup in `group` (sparse_super: 0, 1 and powers of 3, 5, 7)?
pub fn group_has_super(sb: &Superblock, group: u64) -> bool {
    if group <= 1 || sb.ro_compat & 0x1 == 0 {
        return true;
    }
    if group & 1 == 0 {
        return false;
    }
    [3u64, 5, 7].iter().any(|&b| {
        let mut p = b;
        while p < group {
            p *= b;
        }
        p == group
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sparse_super_groups() {
        let mut raw = vec![0u8; SB_LEN];
        put16(&mut raw, 0x38, EXT4_MAGIC);
        put32(&mut raw, 0x4, 8192 * 30 + 1);
        put32(&mut raw, 0x14, 1);
        put32(&mut raw, 0x20, 8192);
        put32(&mut raw, 0x28, 2048);
        put32(&mut raw, 0x0, 2048 * 30);
        put32(&mut raw, 0x64, 1);
        let sb = Superblock::parse(&raw).expect("valid test superblock");
        let with: Vec<u64> = (0..30).filter(|&g| group_has_super(&sb, g)).collect();
        assert_eq!(with, vec![0, 1, 3, 5, 7, 9, 25, 27]);
    }

    #[test]
    fn hostile_superblock_fields_are_errors() {
        let mut raw = vec![0u8; SB_LEN];
        put16(&mut raw, 0x38, EXT4_MAGIC);
        put32(&mut raw, 0x18, 40);
        assert!(Superblock::parse(&raw).is_err());
        put32(&mut raw, 0x18, 0);
        put32(&mut raw, 0x20, 0);
        assert!(Superblock::parse(&raw).is_err());
    }
}
