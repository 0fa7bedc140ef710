//! Growing an ext4 filesystem offline into the space after it (`vmdisk resize --grow-fs`).
//!
//! ```text
//!  parse (Editor::open: clean, journal empty, features the editor keeps right)
//!    └ plan_grow(fs, device bytes) ── GrowPlan: new block/group/descriptor-block counts,
//!        refusals (bigalloc, meta_bg, sparse_super2, no reserved GDT blocks left, 2^32 limits)
//!  apply (grow): on the device already grown
//!    1. old last group: its padding bits cleared for the blocks that now exist
//!    2. new groups g = old_groups .. new_groups, each self-contained (valid with or without
//!       flex_bg):  [sb backup | GDT | reserved GDT]? | block bitmap | inode bitmap | inode table
//!       lazily initialised: INODE_UNINIT, BLOCK_UNINIT (not the last group), ITABLE_ZEROED
//!       (the inode table is made to read as zeros: skipped where the device already does)
//!    3. descriptor blocks beyond the old ones are taken from the front of the reserved GDT
//!       blocks (primary and backups); the resize inode (7) forgets them and lists the
//!       reserved blocks' backups in the new sparse_super groups; s_reserved_gdt_blocks drops
//!    4. superblock: block/inode counts, reserved blocks (same share), free counts, overhead;
//!       backups (superblock + whole GDT) in every sparse_super group
//!    5. commit as the editor does: blocks past the old end in place, the changed old blocks
//!       as one jbd2 transaction, then home
//! ```
//!
//! Nothing is copied: the new groups' inode tables are only zeroed where the device does not
//! already read zeros there, which for a freshly grown qcow2 or sparse raw file is nowhere.

use std::sync::Arc;

use vmdisk_block::{BlockDevice, ExtentKind};

use crate::ondisk::*;
use crate::write::Editor;

/// Smallest new last group worth adding beyond its own metadata (resize2fs drops a shorter
/// tail group rather than make a group that is nearly all overhead).
const MIN_TAIL_FREE_BLOCKS: u64 = 50;
/// Bytes read at a time when checking that an inode table already reads as zeros.
const ZERO_CHECK_CHUNK: u64 = 1 << 20;
/// Inode number of the resize inode (owner of the reserved GDT blocks).
const RESIZE_INO: u32 = 7;
/// Index of the double-indirect pointer in i_block.
const DIND_SLOT: usize = 13;
const COMPAT_RESIZE_INODE: u32 = 0x10;
const COMPAT_SPARSE_SUPER2: u32 = 0x200;
const INCOMPAT_META_BG: u32 = 0x10;
const BG_ITABLE_ZEROED: u16 = 0x4;

/// What went wrong, by step. Everything up to [`GrowError::Applying`] happens before the
/// first write.
#[derive(Debug, thiserror::Error)]
pub enum GrowError {
    /// Reading and validating the filesystem (not ext4, not clean, unsupported feature...).
    #[error("reading the ext4 filesystem")]
    Opening(#[source] crate::Error),
    /// The growth asked for cannot be done offline by vmdisk; `reason` says why.
    #[error("cannot grow this ext4 filesystem offline: {reason}")]
    Refused { reason: String },
    /// The resize inode does not look as mke2fs/resize2fs leave it.
    #[error("the resize inode (inode 7) is not as expected: {what}; run e2fsck on it")]
    ResizeInode { what: String },
    /// Writing the new groups or committing the change.
    #[error("writing the grown filesystem")]
    Applying(#[source] crate::Error),
}

type GResult<T> = std::result::Result<T, GrowError>;

fn refused(reason: impl Into<String>) -> GrowError {
    GrowError::Refused {
        reason: reason.into(),
    }
}

/// The geometry of a planned growth.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GrowPlan {
    pub block_size: u64,
    pub old_blocks: u64,
    pub new_blocks: u64,
    pub old_groups: u64,
    pub new_groups: u64,
    pub old_desc_blocks: u64,
    pub new_desc_blocks: u64,
    pub old_reserved_gdt_blocks: u64,
    pub new_reserved_gdt_blocks: u64,
    pub new_inodes: u64,
}

impl GrowPlan {
    /// True when there is nothing to do (the space is too small for even one block).
    pub fn is_noop(&self) -> bool {
        self.new_blocks == self.old_blocks
    }
}

/// What a growth did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GrowReport {
    #[serde(flatten)]
    pub plan: GrowPlan,
    /// Inode-table bytes that had to be written as zeros (0 on a freshly grown image).
    pub itable_bytes_zeroed: u64,
    /// Blocks past the old end written in place, and old blocks changed through the journal.
    pub new_blocks_written: u64,
    pub metadata_blocks: u64,
    pub journaled: bool,
}

/// Descriptor blocks for `groups` groups.
fn desc_blocks(sb: &Superblock, groups: u64) -> u64 {
    (groups * sb.desc_size).div_ceil(sb.block_size)
}

/// Plan growing the filesystem of `ed` to fill `dev_len` bytes. Refusals are errors.
fn plan(ed: &Editor, dev_len: u64) -> GResult<GrowPlan> {
    let sb = &ed.sb;
    let bs = sb.block_size;
    if sb.compat & COMPAT_SPARSE_SUPER2 != 0 {
        return Err(refused(
            "it uses sparse_super2 (backups in two chosen groups only), which vmdisk does not \
             grow",
        ));
    }
    if sb.incompat & INCOMPAT_META_BG != 0 {
        return Err(refused("it uses meta_bg, which vmdisk does not grow"));
    }
    if sb.ro_compat & RO_COMPAT_BIGALLOC != 0 {
        return Err(refused("it uses bigalloc, which vmdisk does not grow"));
    }
    let is64 = sb.incompat & INCOMPAT_64BIT != 0;
    // Without 64bit, block numbers are 32 bits wide.
    let max_blocks = if is64 {
        1u64 << 48
    } else {
        u64::from(u32::MAX)
    };
    let mut new_blocks = (dev_len / bs).min(max_blocks);
    let old_blocks = sb.blocks_count;
    let old_groups = sb.group_count;
    let old_desc = desc_blocks(sb, old_groups);
    let reserved = u64::from(le16(&sb.raw, 0xce));
    let resize_inode = sb.compat & COMPAT_RESIZE_INODE != 0;
    let itb = ed.itable_blocks();
    let base = |grp: u64, desc: u64, res: u64| -> u64 {
        if group_has_super(sb, grp) {
            1 + desc + res
        } else {
            0
        }
    };
    if new_blocks <= old_blocks {
        return Ok(GrowPlan {
            block_size: bs,
            old_blocks,
            new_blocks: old_blocks,
            old_groups,
            new_groups: old_groups,
            old_desc_blocks: old_desc,
            new_desc_blocks: old_desc,
            old_reserved_gdt_blocks: reserved,
            new_reserved_gdt_blocks: reserved,
            new_inodes: sb.inodes_count,
        });
    }
    // Settle the group count: a short new tail group must hold its metadata and some room.
    let (new_groups, new_desc) = loop {
        let groups = (new_blocks - sb.first_data_block).div_ceil(sb.blocks_per_group);
        let desc = desc_blocks(sb, groups).max(old_desc);
        let res = reserved.saturating_sub(desc - old_desc);
        let rem = (new_blocks - sb.first_data_block) % sb.blocks_per_group;
        let last = groups - 1;
        if groups > old_groups
            && rem != 0
            && rem < base(last, desc, res) + 2 + itb + MIN_TAIL_FREE_BLOCKS
        {
            new_blocks -= rem;
            continue;
        }
        break (groups, desc);
    };
    if new_blocks <= old_blocks {
        return plan(ed, old_blocks * bs);
    }
    if new_groups > MAX_GROUPS {
        return Err(refused(format!(
            "{new_groups} block groups would exceed vmdisk's limit of {MAX_GROUPS}"
        )));
    }
    let new_inodes = new_groups * sb.inodes_per_group;
    if new_inodes > u64::from(u32::MAX) {
        return Err(refused(format!(
            "{new_groups} groups of {} inodes exceed ext4's 2^32 inodes",
            sb.inodes_per_group
        )));
    }
    let add = new_desc - old_desc;
    if add > 0 && (!resize_inode || add > reserved) {
        let why = if resize_inode {
            format!("{reserved} are reserved")
        } else {
            "it has no reserved GDT blocks (made without resize_inode)".to_string()
        };
        let most = (old_desc + if resize_inode { reserved } else { 0 }) * bs / sb.desc_size;
        return Err(refused(format!(
            "{new_groups} block groups need {add} more group descriptor block(s) but {why} \
             (vmdisk can grow it to at most {most} groups, {} bytes, without moving data; \
             resize2fs can do more by moving blocks or switching to meta_bg)",
            sb.first_data_block * bs + most * sb.blocks_per_group * bs
        )));
    }
    let backups = (1..new_groups).filter(|&g| group_has_super(sb, g)).count() as u64;
    if resize_inode && reserved > add && backups > bs / 4 {
        return Err(refused(format!(
            "{backups} superblock backups do not fit one resize-inode block"
        )));
    }
    Ok(GrowPlan {
        block_size: bs,
        old_blocks,
        new_blocks,
        old_groups,
        new_groups,
        old_desc_blocks: old_desc,
        new_desc_blocks: new_desc,
        old_reserved_gdt_blocks: reserved,
        new_reserved_gdt_blocks: reserved - add,
        new_inodes,
    })
}

fn open(dev: Arc<dyn BlockDevice>) -> GResult<Editor> {
    let ed = Editor::open(dev).map_err(GrowError::Opening)?;
    // An external journal cannot be written: find out now, before anything is.
    if ed.sb.compat & COMPAT_HAS_JOURNAL != 0 {
        ed.journal_ctx().map_err(GrowError::Opening)?;
    }
    Ok(ed)
}

/// Check that the filesystem on `dev` can be grown to `new_len` bytes (the device may still
/// be smaller: this is the check made before anything changes) and return the plan.
pub fn plan_grow(dev: Arc<dyn BlockDevice>, new_len: u64) -> GResult<GrowPlan> {
    let ed = open(dev)?;
    let p = plan(&ed, new_len)?;
    if !p.is_noop() {
        check_resize_inode(&ed, &p)?;
    }
    Ok(p)
}

fn block_of(b: &[u8], i: usize) -> u32 {
    le32(b, i * 4)
}

/// The resize inode must be as mke2fs makes it: one double-indirect block whose entries name
/// the reserved GDT blocks, each listing its backups.
fn check_resize_inode(ed: &Editor, p: &GrowPlan) -> GResult<()> {
    let sb = &ed.sb;
    if sb.compat & COMPAT_RESIZE_INODE == 0 || p.old_reserved_gdt_blocks == 0 {
        return Ok(());
    }
    let bad = |what: String| GrowError::ResizeInode { what };
    let ino = ed.inode(RESIZE_INO).map_err(GrowError::Opening)?;
    let dind = u64::from(le32(&ino.raw, 0x28 + 4 * DIND_SLOT));
    if dind < sb.first_data_block || dind >= sb.blocks_count {
        return Err(bad(format!("double-indirect block {dind}")));
    }
    let buf = read_block(ed, dind).map_err(GrowError::Opening)?;
    let apb = (sb.block_size / 4) as usize;
    for j in 0..p.old_reserved_gdt_blocks {
        let pblk = sb.first_data_block + 1 + p.old_desc_blocks + j;
        let slot = ((p.old_desc_blocks + j) % apb as u64) as usize;
        if u64::from(block_of(&buf, slot)) != pblk {
            return Err(bad(format!(
                "entry {slot} of block {dind} is {}, not reserved GDT block {pblk}",
                block_of(&buf, slot)
            )));
        }
    }
    Ok(())
}

fn read_block(ed: &Editor, blk: u64) -> crate::Result<Vec<u8>> {
    let mut b = vec![0u8; ed.bs as usize];
    ed.cache.read_exact_at(&mut b, blk * ed.bs)?;
    Ok(b)
}

fn set_bit(b: &mut [u8], i: u64, v: bool) {
    let (byte, bit) = ((i / 8) as usize, i % 8);
    if v {
        b[byte] |= 1 << bit;
    } else {
        b[byte] &= !(1 << bit);
    }
}

fn put_lohi32(r: &mut [u8], lo: usize, hi: usize, v: u64) {
    put32(r, lo, v as u32);
    if r.len() >= 64 {
        put32(r, hi, (v >> 32) as u32);
    }
}

fn put_lohi16(r: &mut [u8], lo: usize, hi: usize, v: u64) {
    put16(r, lo, v as u16);
    if r.len() >= 64 {
        put16(r, hi, (v >> 16) as u16);
    }
}

/// Make `len` bytes at `off` read as zeros, writing only where they do not already.
fn ensure_zeroed(dev: &dyn BlockDevice, off: u64, len: u64) -> crate::Result<u64> {
    let mut written = 0;
    for e in dev.block_status(off, len)? {
        if e.kind != ExtentKind::Data {
            continue;
        }
        let mut pos = e.off;
        while pos < e.end() {
            let n = ZERO_CHECK_CHUNK.min(e.end() - pos);
            let mut buf = vec![0u8; n as usize];
            dev.read_exact_at(&mut buf, pos)?;
            if !vmdisk_block::is_zero(&buf) {
                dev.write_zeroes(pos, n, false)?;
                written += n;
            }
            pos += n;
        }
    }
    Ok(written)
}

/// Grow the filesystem on `dev` to fill its first `new_len` bytes (the device must already be
/// that large). See the module docs for what is written, and in which order.
pub fn grow(dev: Arc<dyn BlockDevice>, new_len: u64) -> GResult<GrowReport> {
    let mut ed = open(dev.clone())?;
    if dev.len() < new_len {
        return Err(refused(format!(
            "the device is {} bytes, smaller than the {new_len} asked for",
            dev.len()
        )));
    }
    let p = plan(&ed, new_len)?;
    let mut report = GrowReport {
        plan: p.clone(),
        itable_bytes_zeroed: 0,
        new_blocks_written: 0,
        metadata_blocks: 0,
        journaled: ed.sb.compat & COMPAT_HAS_JOURNAL != 0,
    };
    if p.is_noop() {
        return Ok(report);
    }
    check_resize_inode(&ed, &p)?;
    let zeroed = apply(&mut ed, &p, dev.as_ref()).map_err(GrowError::Applying)?;
    report.itable_bytes_zeroed = zeroed;
    let c = ed.commit().map_err(GrowError::Applying)?;
    report.new_blocks_written = c.new_blocks;
    report.metadata_blocks = c.metadata_blocks;
    Ok(report)
}

fn apply(ed: &mut Editor, p: &GrowPlan, dev: &dyn BlockDevice) -> crate::Result<u64> {
    let bs = ed.bs;
    let csum = ed.sb.has_group_desc_csum();
    let itb = ed.itable_blocks();
    let ipg = ed.sb.inodes_per_group;
    let old_end = p.old_blocks;
    let last_old = p.old_groups - 1;

    // 1. The old last group: the blocks that now exist become free. Its bitmap is read (or
    //    built, if BLOCK_UNINIT) with the old geometry.
    let old_len = ed.sb.group_len(last_old);
    let new_len = ed
        .sb
        .blocks_per_group
        .min(p.new_blocks - ed.sb.group_first_block(last_old));
    let gained = new_len - old_len;
    // Read (or build) it only when it changes: building clears BLOCK_UNINIT.
    let mut bm = if gained > 0 {
        Some(ed.block_bitmap(last_old)?)
    } else {
        None
    };

    // The new geometry.
    let sbr = &mut ed.sb.raw;
    put32(sbr, 0x0, p.new_inodes as u32);
    put_lohi32_sb(sbr, 0x4, 0x150, p.new_blocks);
    let r_old = u64::from(le32(sbr, 0x8)) | (u64::from(le32(sbr, 0x154)) << 32);
    // Keep the reserved share: r_new = r_old * new / old (u128: no overflow).
    let r_new = (u128::from(r_old) * u128::from(p.new_blocks) / u128::from(p.old_blocks)) as u64;
    put_lohi32_sb(sbr, 0x8, 0x154, r_new);
    put16(sbr, 0xce, p.new_reserved_gdt_blocks as u16);
    let is64 = ed.sb.incompat & INCOMPAT_64BIT != 0;
    if !is64 {
        put32(&mut ed.sb.raw, 0x150, 0);
        put32(&mut ed.sb.raw, 0x154, 0);
    }
    ed.sb.blocks_count = p.new_blocks;
    ed.sb.inodes_count = p.new_inodes;
    ed.sb.group_count = p.new_groups;

    if let Some(bm) = bm.as_mut() {
        for i in old_len..new_len {
            set_bit(bm, i, false);
        }
        let gd = &mut ed.gds[last_old as usize];
        let f = gd.free_blocks + gained;
        gd.set_free_blocks(f);
        ed.store_block_bitmap(last_old, bm)?;
    }

    // 2. The new groups.
    let mut zeroed = 0u64;
    let desc_size = ed.sb.desc_size as usize;
    for g in p.old_groups..p.new_groups {
        let first = ed.sb.group_first_block(g);
        let len = ed.sb.group_len(g);
        let base = if group_has_super(&ed.sb, g) {
            1 + p.new_desc_blocks + p.new_reserved_gdt_blocks
        } else {
            0
        };
        let bb = first + base;
        let ib = bb + 1;
        let it = bb + 2;
        let used = base + 2 + itb;
        let last = g == p.new_groups - 1;
        zeroed += ensure_zeroed(dev, it * bs, itb * bs)?;
        let mut flags = 0u16;
        if csum {
            flags |= BG_INODE_UNINIT | BG_ITABLE_ZEROED;
            if !last {
                flags |= BG_BLOCK_UNINIT;
            }
        }
        let mut raw = vec![0u8; desc_size];
        put_lohi32(&mut raw, 0x0, 0x20, bb);
        put_lohi32(&mut raw, 0x4, 0x24, ib);
        put_lohi32(&mut raw, 0x8, 0x28, it);
        put_lohi16(&mut raw, 0xc, 0x2c, len - used);
        put_lohi16(&mut raw, 0xe, 0x2e, ipg);
        put16(&mut raw, 0x12, flags);
        if csum {
            put_lohi16(&mut raw, 0x1c, 0x32, ipg);
        }
        let gd = GroupDesc {
            raw,
            block_bitmap: bb,
            inode_bitmap: ib,
            inode_table: it,
            free_blocks: len - used,
            flags,
        };
        ed.gds.push(gd);
        ed.touched.insert(g);
        if flags & BG_BLOCK_UNINIT == 0 {
            let mut bm = vec![0u8; bs as usize];
            for i in (0..used).chain(len..bs * 8) {
                set_bit(&mut bm, i, true);
            }
            ed.fresh.insert(bb);
            ed.store_block_bitmap(g, &bm)?;
        }
        if flags & BG_INODE_UNINIT == 0 {
            let mut bm = vec![0u8; bs as usize];
            for i in ipg..bs * 8 {
                set_bit(&mut bm, i, true);
            }
            if let Some(seed) = ed.sb.csum_seed {
                let c = crate::crc::crc32c_raw(seed, &bm[..(ipg / 8) as usize]);
                put_lohi16(&mut ed.gds[g as usize].raw, 0x1a, 0x3a, u64::from(c));
            }
            ed.fresh.insert(ib);
            stage(ed, ib, &bm)?;
        }
    }

    // 3. The resize inode gives up the reserved blocks that became descriptor blocks and
    //    lists the reserved blocks' backups in the new groups.
    if ed.sb.compat & COMPAT_RESIZE_INODE != 0 && p.old_reserved_gdt_blocks > 0 {
        update_resize_inode(ed, p)?;
    }

    // 4. Counters, then the descriptor table and superblock everywhere they live.
    // s_overhead_clusters: cleared, as resize2fs does; the kernel counts it again at mount.
    put32(&mut ed.sb.raw, 0x248, 0);
    for g in 0..p.new_groups {
        if ed.touched.contains(&g) {
            let gd = &mut ed.gds[g as usize];
            gd.reseal(&ed.sb, g);
        }
    }
    let free_blocks: u64 = ed.gds.iter().map(|g| g.free_blocks).sum();
    let free_inodes: u64 = ed
        .gds
        .iter()
        .map(|g| {
            u64::from(le16(&g.raw, 0xe))
                | if g.raw.len() >= 64 {
                    u64::from(le16(&g.raw, 0x2e)) << 16
                } else {
                    0
                }
        })
        .sum();
    ed.sb.set_free_blocks(free_blocks);
    put32(&mut ed.sb.raw, 0x10, free_inodes as u32);
    let mut gdt = vec![0u8; (p.new_desc_blocks * bs) as usize];
    for (g, gd) in ed.gds.iter().enumerate() {
        gdt[g * desc_size..(g + 1) * desc_size].copy_from_slice(&gd.raw);
    }
    for g in 0..p.new_groups {
        if !group_has_super(&ed.sb, g) {
            continue;
        }
        let first = ed.sb.group_first_block(g);
        let gdt_first = first + 1 + ed.sb.group_zero_adjust();
        for (k, chunk) in gdt.chunks_exact(bs as usize).enumerate() {
            let blk = gdt_first + k as u64;
            if blk >= old_end {
                ed.fresh.insert(blk);
            }
            stage(ed, blk, chunk)?;
        }
        if g > 0 {
            let mut copy = ed.sb.raw.clone();
            put16(&mut copy, 0x5a, g as u16);
            if ed.sb.metadata_csum() {
                let c = sb_checksum(&copy);
                put32(&mut copy, 0x3fc, c);
            }
            let mut blk = vec![0u8; bs as usize];
            if first < old_end {
                blk = read_block(ed, first)?;
            } else {
                ed.fresh.insert(first);
            }
            blk[..SB_LEN].copy_from_slice(&copy);
            stage(ed, first, &blk)?;
        }
    }
    Ok(zeroed)
}

fn put_lohi32_sb(r: &mut [u8], lo: usize, hi: usize, v: u64) {
    put32(r, lo, v as u32);
    put32(r, hi, (v >> 32) as u32);
}

/// Stage `data` as block `blk` unless the block already holds it.
fn stage(ed: &Editor, blk: u64, data: &[u8]) -> crate::Result<()> {
    if !ed.fresh.contains(&blk) && read_block(ed, blk)? == data {
        return Ok(());
    }
    ed.cache.write_all_at(data, blk * ed.bs)?;
    Ok(())
}

fn update_resize_inode(ed: &mut Editor, p: &GrowPlan) -> crate::Result<()> {
    let sb = &ed.sb;
    let bs = sb.block_size;
    let apb = bs / 4;
    let ino = ed.inode(RESIZE_INO)?;
    let mut raw = ino.raw.clone();
    let dind = u64::from(le32(&raw, 0x28 + 4 * DIND_SLOT));
    let mut dbuf = read_block(ed, dind)?;
    let add = p.new_desc_blocks - p.old_desc_blocks;
    for k in 0..add {
        let slot = ((p.old_desc_blocks + k) % apb) as usize;
        put32(&mut dbuf, slot * 4, 0);
    }
    let backups: Vec<u64> = (1..p.new_groups)
        .filter(|&g| group_has_super(sb, g))
        .collect();
    let mut blocks = Vec::new();
    for j in 0..p.new_reserved_gdt_blocks {
        let pblk = sb.first_data_block + 1 + p.new_desc_blocks + j;
        let mut ind = vec![0u8; bs as usize];
        for (i, &g) in backups.iter().enumerate() {
            put32(&mut ind, i * 4, (pblk + g * sb.blocks_per_group) as u32);
        }
        blocks.push((pblk, ind));
    }
    for (b, d) in blocks {
        stage(ed, b, &d)?;
    }
    stage(ed, dind, &dbuf)?;
    // i_blocks in 512-byte units: the double-indirect block, the reserved blocks, and one
    // backup of each per backup group.
    let n = 1 + p.new_reserved_gdt_blocks * (1 + backups.len() as u64);
    let sectors = n * (bs / 512);
    put32(&mut raw, 0x1c, sectors as u32);
    put16(&mut raw, 0x74, (sectors >> 32) as u16);
    ed.stamp(&mut raw, &[0xc, 0x10]);
    ed.write_inode(RESIZE_INO, &mut raw)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ensure_zeroed_writes_only_where_the_device_does_not_read_zeros() {
        let d = vmdisk_block::MemDisk::new(4 << 20);
        assert_eq!(ensure_zeroed(&d, 0, 4 << 20).unwrap(), 0, "all holes");
        d.write_all_at(&[0u8; 4096], 8192).unwrap();
        assert_eq!(
            ensure_zeroed(&d, 0, 4 << 20).unwrap(),
            0,
            "data that is zeros"
        );
        d.write_all_at(&[7u8; 10], 3 << 20).unwrap();
        let n = ensure_zeroed(&d, 0, 4 << 20).unwrap();
        assert!(n > 0 && n <= ZERO_CHECK_CHUNK, "{n}");
        let mut b = vec![1u8; 10];
        d.read_exact_at(&mut b, 3 << 20).unwrap();
        assert_eq!(b, [0u8; 10]);
        assert_eq!(ensure_zeroed(&d, 0, 4 << 20).unwrap(), 0, "now zeros");
    }

    #[test]
    fn bits_and_fields() {
        let mut b = vec![0u8; 4];
        set_bit(&mut b, 9, true);
        assert_eq!(b, [0, 2, 0, 0]);
        set_bit(&mut b, 9, false);
        assert_eq!(b, [0; 4]);
        let mut r = vec![0u8; 64];
        put_lohi32(&mut r, 0, 0x20, 0x1_0000_0002);
        assert_eq!((le32(&r, 0), le32(&r, 0x20)), (2, 1));
        let mut r32 = vec![0u8; 32];
        put_lohi16(&mut r32, 0xc, 0x2c, 0x1_0005);
        assert_eq!(le16(&r32, 0xc), 5);
    }
}
