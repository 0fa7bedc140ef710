//! The general offline editor: create, replace and remove files, directories and symbolic
//! links, change modes, owners and times — on ext2, ext3 and ext4, extent- or block-mapped.
//!
//! ```text
//!  Editor::open ── validate superblock/descriptors ── stage every change in a Cache
//!     │                (reads see the staged blocks over the device; the device is untouched)
//!     ├─ write_file / mkdir / symlink / remove / chmod / chown / set_times ... (any number)
//!     └─ commit:  1. blocks that were free before the edit (new data, directory, extent and
//!                    indirect blocks) are written in place, flush
//!                 2. journaled filesystems: every other changed block (bitmaps, descriptors,
//!                    inode tables, existing directory blocks, superblock) is written into
//!                    the jbd2 journal as ONE transaction (descriptor blocks, copies, flush,
//!                    commit block), flush; needs_recovery set in the superblock, flush; the
//!                    journal superblock pointed at the transaction, flush
//!                 3. the same blocks are written home (checkpoint), flush
//!                 4. the journal is marked empty and needs_recovery cleared, flush
//!                 ext2 (no journal): step 1, then the metadata in place, then flush.
//! ```
//!
//! A SIGKILL before step 2's flag write leaves only unreferenced free blocks written (e2fsck
//! clean); after it, the journal holds the complete transaction and a journal replay (e2fsck,
//! the kernel at mount, or `vmdisk` itself) makes the filesystem consistent. Blocks freed by an
//! edit are never reused in the same edit, so step 1 never overwrites a live block.
//!
//! Directories: entries are added to linear directories (first fit, splitting a record's slack,
//! growing the directory by a block when no block has room) and removed by merging into the
//! previous record. An htree (indexed) directory gets its INDEX flag cleared and its index
//! blocks rewritten as empty linear blocks: it stays correct as a linear directory (e2fsck
//! accepts it; `e2fsck -fD` re-indexes it).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use vmdisk_block::BlockDevice;

use crate::cache::Cache;
use crate::crc::crc32c_raw;
use crate::ondisk::*;
use crate::volume::{Inode, Volume};
use crate::{Error, Result};

/// Largest group descriptor table we handle (64 MiB).
const MAX_GDT_BYTES: u64 = 64 << 20;
/// Longest file name ext4 stores.
const MAX_NAME_LEN: usize = 255;
/// Most directories `rm -r` descends (guards against loops in a corrupt tree).
const MAX_RM_DEPTH: usize = 256;
/// Largest file the editor writes in one piece (1 GiB: content is held in memory).
pub const MAX_WRITE_BYTES: u64 = 1 << 30;
/// The link count ext4 stops counting at (dir_nlink then keeps 1).
const EXT4_LINK_MAX: u16 = 65000;
/// Longest symlink target (PATH_MAX).
const MAX_SYMLINK_TARGET: usize = 4095;

const FL_INDEX: u32 = 0x1000;
const FL_CASEFOLD: u32 = 0x4000_0000;
const INCOMPAT_EXTENTS: u32 = 0x40;
const INCOMPAT_FILETYPE: u32 = 0x2;
const RO_COMPAT_LARGE_FILE: u32 = 0x2;
const RO_COMPAT_DIR_NLINK: u32 = 0x20;
const FT_REG: u8 = 1;
const FT_DIR: u8 = 2;
const FT_SYMLINK: u8 = 7;

/// Attributes for a new (or replaced) file; `None` keeps the existing value, or the default
/// (0644 / 0755, root) for a new one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Attrs {
    pub mode: Option<u16>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

/// What a stat of a guest path gives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stat {
    pub ino: u32,
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub links: u16,
}

/// What a commit wrote.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CommitReport {
    /// Blocks written in place because they were free before the edit.
    pub new_blocks: u64,
    /// Metadata blocks changed (journaled first on a journaled filesystem).
    pub metadata_blocks: u64,
    pub journaled: bool,
    pub journal_sequence: Option<u32>,
    /// Device writes the commit made (crash tests pick their kill points from it).
    pub device_writes: u64,
}

fn corrupt(what: impl Into<String>, off: u64) -> Error {
    Error::corrupt(what, off)
}

fn bit(b: &[u8], i: u64) -> bool {
    b[(i / 8) as usize] & (1 << (i % 8)) != 0
}
fn set_bit(b: &mut [u8], i: u64, v: bool) {
    if v {
        b[(i / 8) as usize] |= 1 << (i % 8);
    } else {
        b[(i / 8) as usize] &= !(1 << (i % 8));
    }
}
fn put_be32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}

fn rec_len_of(name_len: usize) -> usize {
    (8 + name_len).div_ceil(4) * 4
}

fn check_name(name: &[u8], path: &str) -> Result<()> {
    if name.is_empty()
        || name == b"."
        || name == b".."
        || name.len() > MAX_NAME_LEN
        || name.contains(&b'/')
        || name.contains(&0)
    {
        return Err(Error::BadPath {
            path: path.to_string(),
        });
    }
    Ok(())
}

/// Split an absolute path into its parent and last component.
fn split_path(path: &str) -> Result<(String, Vec<u8>)> {
    let bad = || Error::BadPath {
        path: path.to_string(),
    };
    if !path.starts_with('/') || path.contains('\0') || path.len() > 4096 {
        return Err(bad());
    }
    let t = path.trim_end_matches('/');
    let i = t.rfind('/').ok_or_else(bad)?;
    let (p, n) = (&t[..i], &t[i + 1..]);
    let parent = if p.is_empty() { "/" } else { p };
    check_name(n.as_bytes(), path)?;
    Ok((parent.to_string(), n.as_bytes().to_vec()))
}

/// Refuse what the editors (this one and `replace_file`) do not handle, before anything is
/// staged.
pub(crate) fn check_editable(sb: &Superblock) -> Result<()> {
    sb.check_counters()?;
    if sb.incompat & INCOMPAT_RECOVER != 0 {
        return Err(Error::NeedsRecovery);
    }
    if sb.ro_compat & RO_COMPAT_ORPHAN_PRESENT != 0
        || sb.state & STATE_ORPHANS != 0
        || le32(&sb.raw, 0xe8) != 0
    {
        return Err(Error::NotClean {
            state: "holding orphan inodes (run e2fsck -fy on it first)".into(),
        });
    }
    if sb.state & STATE_ERROR != 0 {
        return Err(Error::NotClean {
            state: "marked as having errors (run e2fsck -fy on it first)".into(),
        });
    }
    if sb.state & STATE_VALID == 0 {
        return Err(Error::NotClean {
            state: "not marked clean (still mounted, or not unmounted cleanly)".into(),
        });
    }
    let bad_in = sb.incompat & !EDIT_INCOMPAT_OK;
    let bad_ro = sb.ro_compat & !EDIT_RO_COMPAT_OK;
    if bad_in != 0 || bad_ro != 0 {
        let mut names = feature_names(bad_in, INCOMPAT_NAMES, "INCOMPAT_");
        names.extend(feature_names(bad_ro, RO_COMPAT_NAMES, "RO_COMPAT_"));
        return Err(Error::unsupported(format!(
            "editing an ext4 filesystem with {}",
            names.join(", ")
        )));
    }
    if !sb.checksum_ok {
        return Err(corrupt("superblock checksum mismatch", SB_OFF));
    }
    Ok(())
}

/// The staged edit of one filesystem.
pub struct Editor {
    pub(crate) base: Arc<dyn BlockDevice>,
    pub(crate) cache: Arc<Cache>,
    pub(crate) vol: Volume,
    pub(crate) sb: Superblock,
    pub(crate) gds: Vec<GroupDesc>,
    pub(crate) bs: u64,
    pub(crate) meta: Vec<(u64, u64)>,
    /// Blocks free before the edit and allocated by it (written in place at commit).
    pub(crate) fresh: HashSet<u64>,
    /// Blocks freed by the edit: never reused by it.
    pub(crate) freed: HashSet<u64>,
    pub(crate) freed_inodes: HashSet<u32>,
    /// Groups whose descriptor changed.
    pub(crate) touched: std::collections::BTreeSet<u64>,
    pub(crate) now: (u32, u32),
    pub(crate) generation: u32,
    pub(crate) first_ino: u32,
}

impl Editor {
    /// Open `dev` for editing. The journal must be empty (see [`replay_journal`]).
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Editor> {
        if dev.len() < SB_OFF + SB_LEN as u64 {
            return Err(Error::NotExt4);
        }
        let mut raw = vec![0u8; SB_LEN];
        dev.read_exact_at(&mut raw, SB_OFF)?;
        let sb = Superblock::parse(&raw)?;
        check_editable(&sb)?;
        let bs = sb.block_size;
        match sb.blocks_count.checked_mul(bs) {
            Some(end) if end <= dev.len() => {}
            _ => {
                return Err(corrupt(
                    format!(
                    "filesystem of {} blocks of {bs} bytes is larger than the device ({} bytes)",
                    sb.blocks_count,
                    dev.len()
                ),
                    SB_OFF + 4,
                ))
            }
        }
        let gdt_len = sb.group_count * sb.desc_size;
        if gdt_len > MAX_GDT_BYTES {
            return Err(Error::Limit {
                what: "group descriptor table bytes",
                needed: gdt_len,
                limit: MAX_GDT_BYTES,
            });
        }
        let mut gdt = vec![0u8; gdt_len as usize];
        dev.read_exact_at(&mut gdt, sb.gdt_off())?;
        let mut gds = Vec::with_capacity(sb.group_count as usize);
        for (g, r) in gdt.chunks_exact(sb.desc_size as usize).enumerate() {
            gds.push(GroupDesc::parse(&sb, g as u64, r)?);
        }
        let cache = Arc::new(Cache::new(dev.clone(), bs));
        let vol = Volume::open(cache.clone(), None)?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let first_ino = if le32(&sb.raw, 0x4c) == 0 {
            11
        } else {
            le32(&sb.raw, 0x54)
        };
        let mut ed = Editor {
            base: dev,
            cache,
            vol,
            gds,
            bs,
            meta: Vec::new(),
            fresh: HashSet::new(),
            freed: HashSet::new(),
            freed_inodes: HashSet::new(),
            touched: Default::default(),
            now: (now.as_secs() as u32, now.subsec_nanos()),
            generation: crc32c_raw(now.subsec_nanos(), &now.as_secs().to_le_bytes()),
            first_ino,
            sb,
        };
        ed.meta = ed.metadata_ranges();
        Ok(ed)
    }

    /// Open for planning only: a journal that needs recovery is replayed into a staging cache
    /// first, so the edit can be tried on the filesystem as it will be. Its
    /// [`Editor::commit`] writes nowhere useful; use [`Editor::open`] on a replayed device.
    pub fn open_staged(dev: Arc<dyn BlockDevice>) -> Result<Editor> {
        let mut raw = vec![0u8; SB_LEN];
        dev.read_exact_at(&mut raw, SB_OFF)?;
        let sb = Superblock::parse(&raw)?;
        let cache: Arc<dyn BlockDevice> = Arc::new(Cache::new(dev, sb.block_size));
        replay_journal(cache.clone())?;
        Editor::open(cache)
    }

    /// Fix the clock used for new timestamps (tests, reproducible images).
    pub fn set_now(&mut self, secs: u32, nsec: u32) {
        self.now = (secs, nsec);
    }

    pub(crate) fn itable_blocks(&self) -> u64 {
        (self.sb.inodes_per_group * self.sb.inode_size).div_ceil(self.bs)
    }

    fn metadata_ranges(&self) -> Vec<(u64, u64)> {
        let reserved_gdt = u64::from(le16(&self.sb.raw, 0xce));
        let gdt_blocks = (self.sb.group_count * self.sb.desc_size).div_ceil(self.bs);
        let mut v = Vec::new();
        for g in 0..self.sb.group_count {
            if group_has_super(&self.sb, g) {
                v.push((
                    self.sb.group_first_block(g),
                    1 + gdt_blocks + reserved_gdt + self.sb.group_zero_adjust(),
                ));
            }
        }
        for gd in &self.gds {
            v.push((gd.block_bitmap, 1));
            v.push((gd.inode_bitmap, 1));
            v.push((gd.inode_table, self.itable_blocks()));
        }
        v.sort_unstable();
        v
    }

    fn is_metadata(&self, b: u64) -> bool {
        let i = self.meta.partition_point(|&(s, _)| s <= b);
        self.meta[..i].iter().rev().take(8).any(|&(s, n)| b < s + n)
    }

    // ---------------------------------------------------------------- raw block access

    fn read_block(&self, blk: u64) -> Result<Vec<u8>> {
        if blk >= self.sb.blocks_count {
            return Err(corrupt(
                format!("block {blk} is beyond the filesystem"),
                blk.saturating_mul(self.bs),
            ));
        }
        let mut b = vec![0u8; self.bs as usize];
        self.cache.read_exact_at(&mut b, blk * self.bs)?;
        Ok(b)
    }

    fn write_block(&self, blk: u64, data: &[u8]) -> Result<()> {
        debug_assert_eq!(data.len() as u64, self.bs);
        self.cache.write_all_at(data, blk * self.bs)?;
        Ok(())
    }

    pub(crate) fn inode(&self, ino: u32) -> Result<Inode> {
        self.vol.inode(ino)
    }

    fn inode_off(&self, ino: u32) -> u64 {
        let i = u64::from(ino) - 1;
        let g = i / self.sb.inodes_per_group;
        let idx = i % self.sb.inodes_per_group;
        self.gds[g as usize].inode_table * self.bs + idx * self.sb.inode_size
    }

    pub(crate) fn write_inode(&self, ino: u32, raw: &mut [u8]) -> Result<()> {
        if let Some(seed) = self.sb.csum_seed {
            inode_set_checksum(seed, ino, raw);
        }
        self.cache.write_all_at(raw, self.inode_off(ino))?;
        Ok(())
    }

    pub(crate) fn stamp(&self, raw: &mut [u8], which: &[usize]) {
        let (secs, nsec) = self.now;
        let extra = nsec << 2;
        let extra_end = if raw.len() > 128 {
            128 + usize::from(le16(raw, 0x80))
        } else {
            128
        };
        for &base in which {
            if base >= 128 && extra_end < base + 4 {
                continue;
            }
            put32(raw, base, secs);
            let x = match base {
                0x8 => 0x8c,
                0xc => 0x84,
                0x10 => 0x88,
                _ => 0x94,
            };
            if extra_end >= x + 4 {
                put32(raw, x, extra);
            }
        }
    }

    // ---------------------------------------------------------------- descriptors

    fn gd_u32(&self, g: u64, lo: usize, hi: usize) -> u64 {
        let r = &self.gds[g as usize].raw;
        u64::from(le16(r, lo))
            | if r.len() >= 64 {
                u64::from(le16(r, hi)) << 16
            } else {
                0
            }
    }
    fn gd_set_u32(&mut self, g: u64, lo: usize, hi: usize, v: u64) {
        let r = &mut self.gds[g as usize].raw;
        put16(r, lo, v as u16);
        if r.len() >= 64 {
            put16(r, hi, (v >> 16) as u16);
        }
        self.touched.insert(g);
    }
    fn gd_free_inodes(&self, g: u64) -> u64 {
        self.gd_u32(g, 0xe, 0x2e)
    }
    fn gd_used_dirs(&self, g: u64) -> u64 {
        self.gd_u32(g, 0x10, 0x30)
    }
    fn gd_itable_unused(&self, g: u64) -> u64 {
        self.gd_u32(g, 0x1c, 0x32)
    }

    /// Block bitmap of group `g`, initialised (and the group marked initialised) when it was
    /// BLOCK_UNINIT.
    pub(crate) fn block_bitmap(&mut self, g: u64) -> Result<Vec<u8>> {
        let gd = &self.gds[g as usize];
        let uninit = self.sb.has_group_desc_csum() && gd.flags & BG_BLOCK_UNINIT != 0;
        if !uninit {
            return self.read_block(gd.block_bitmap);
        }
        let mut bm = vec![0u8; self.bs as usize];
        let first = self.sb.group_first_block(g);
        let len = self.sb.group_len(g);
        for i in len..self.bs * 8 {
            set_bit(&mut bm, i, true);
        }
        // The kernel's ext4_init_block_bitmap: this group's superblock backup and GDT, and the
        // bitmaps and inode tables (of any group, with flex_bg) that lie inside it.
        for &(s, n) in &self.meta {
            let (lo, hi) = (s.max(first), (s + n).min(first + len));
            for b in lo..hi.max(lo) {
                set_bit(&mut bm, b - first, true);
            }
        }
        let free = (0..len).filter(|&i| !bit(&bm, i)).count() as u64;
        if free != self.gds[g as usize].free_blocks {
            return Err(corrupt(
                format!(
                    "group {g} is BLOCK_UNINIT but its descriptor counts {} free blocks where \
                     {free} are free",
                    self.gds[g as usize].free_blocks
                ),
                self.sb.gdt_off() + g * self.sb.desc_size,
            ));
        }
        let gd = &mut self.gds[g as usize];
        gd.set_flags(gd.flags & !BG_BLOCK_UNINIT);
        self.touched.insert(g);
        Ok(bm)
    }

    pub(crate) fn store_block_bitmap(&mut self, g: u64, bm: &[u8]) -> Result<()> {
        if let Some(seed) = self.sb.csum_seed {
            let c = block_bitmap_checksum(&self.sb, seed, bm);
            self.gds[g as usize].set_block_bitmap_csum(c);
        }
        self.touched.insert(g);
        self.write_block(self.gds[g as usize].block_bitmap, bm)
    }

    fn inode_bitmap(&mut self, g: u64) -> Result<Vec<u8>> {
        let gd = &self.gds[g as usize];
        if self.sb.has_group_desc_csum() && gd.flags & BG_INODE_UNINIT != 0 {
            let mut bm = vec![0u8; self.bs as usize];
            for i in self.sb.inodes_per_group..self.bs * 8 {
                set_bit(&mut bm, i, true);
            }
            let gd = &mut self.gds[g as usize];
            gd.set_flags(gd.flags & !BG_INODE_UNINIT);
            self.touched.insert(g);
            return Ok(bm);
        }
        self.read_block(gd.inode_bitmap)
    }

    fn store_inode_bitmap(&mut self, g: u64, bm: &[u8]) -> Result<()> {
        if let Some(seed) = self.sb.csum_seed {
            let n = (self.sb.inodes_per_group / 8) as usize;
            let c = crc32c_raw(seed, &bm[..n.min(bm.len())]);
            let r = &mut self.gds[g as usize].raw;
            put16(r, 0x1a, c as u16);
            if r.len() >= 64 {
                put16(r, 0x3a, (c >> 16) as u16);
            }
        }
        self.touched.insert(g);
        self.write_block(self.gds[g as usize].inode_bitmap, bm)
    }

    // ---------------------------------------------------------------- allocation

    /// Allocate `n` blocks that were free before the edit, near group `goal`; sorted runs.
    fn alloc_blocks(&mut self, n: u64, goal: u64) -> Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut left = n;
        let gc = self.sb.group_count;
        for k in 0..gc {
            if left == 0 {
                break;
            }
            let g = (goal + k) % gc;
            if self.gds[g as usize].free_blocks == 0 {
                continue;
            }
            let first = self.sb.group_first_block(g);
            let len = self.sb.group_len(g);
            let mut bm = self.block_bitmap(g)?;
            let mut got = 0u64;
            let mut i = 0u64;
            while i < len && left > 0 {
                if i.is_multiple_of(8) && i + 8 <= len && bm[(i / 8) as usize] == 0xff {
                    i += 8;
                    continue;
                }
                let b = first + i;
                if bit(&bm, i) || self.freed.contains(&b) || self.is_metadata(b) {
                    i += 1;
                    continue;
                }
                set_bit(&mut bm, i, true);
                self.fresh.insert(b);
                got += 1;
                left -= 1;
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == b => *l += 1,
                    _ => runs.push((b, 1)),
                }
                i += 1;
            }
            if got > 0 {
                let f = self.gds[g as usize].free_blocks - got;
                self.gds[g as usize].set_free_blocks(f);
                self.store_block_bitmap(g, &bm)?;
            }
        }
        if left > 0 {
            // Nothing reaches the device: the caller's error drops the staged edit.
            return Err(Error::NoSpace {
                needed: n,
                free: n - left,
            });
        }
        Ok(runs)
    }

    fn alloc_block(&mut self, goal: u64) -> Result<u64> {
        Ok(self.alloc_blocks(1, goal)?[0].0)
    }

    fn free_blocks(&mut self, blocks: &[u64]) -> Result<()> {
        let mut by_group: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
        for &b in blocks {
            if b < self.sb.first_data_block || b >= self.sb.blocks_count || self.is_metadata(b) {
                return Err(corrupt(
                    format!("a file claims block {b}, which is filesystem metadata or outside it"),
                    b.saturating_mul(self.bs),
                ));
            }
            let rel = b - self.sb.first_data_block;
            by_group
                .entry(rel / self.sb.blocks_per_group)
                .or_default()
                .push(rel % self.sb.blocks_per_group);
        }
        for (g, idx) in by_group {
            let mut bm = self.block_bitmap(g)?;
            for &i in &idx {
                let b = self.sb.group_first_block(g) + i;
                if !bit(&bm, i) || self.freed.contains(&b) {
                    return Err(corrupt(
                        format!("block {b} is freed twice (marked free in the bitmap)"),
                        b * self.bs,
                    ));
                }
                set_bit(&mut bm, i, false);
                self.freed.insert(b);
            }
            let f = self.gds[g as usize].free_blocks + idx.len() as u64;
            self.gds[g as usize].set_free_blocks(f);
            self.store_block_bitmap(g, &bm)?;
        }
        Ok(())
    }

    /// Allocate an inode near `goal` group; returns its number.
    fn alloc_inode(&mut self, goal: u64, dir: bool) -> Result<u32> {
        let gc = self.sb.group_count;
        let ipg = self.sb.inodes_per_group;
        for k in 0..gc {
            let g = (goal + k) % gc;
            if self.gd_free_inodes(g) == 0 {
                continue;
            }
            let mut bm = self.inode_bitmap(g)?;
            for i in 0..ipg {
                let ino = (g * ipg + i + 1) as u32;
                // Reserved inodes (below s_first_ino) are never handed out.
                if bit(&bm, i) || ino < self.first_ino || self.freed_inodes.contains(&ino) {
                    continue;
                }
                set_bit(&mut bm, i, true);
                self.store_inode_bitmap(g, &bm)?;
                let fi = self.gd_free_inodes(g) - 1;
                self.gd_set_u32(g, 0xe, 0x2e, fi);
                if dir {
                    let d = self.gd_used_dirs(g) + 1;
                    self.gd_set_u32(g, 0x10, 0x30, d);
                }
                if self.sb.has_group_desc_csum() {
                    let unused = self.gd_itable_unused(g);
                    if i >= ipg - unused {
                        self.gd_set_u32(g, 0x1c, 0x32, ipg - i - 1);
                    }
                }
                return Ok(ino);
            }
        }
        Err(Error::NoSpace { needed: 1, free: 0 })
    }

    fn free_inode(&mut self, ino: u32, dir: bool) -> Result<()> {
        let i = u64::from(ino) - 1;
        let g = i / self.sb.inodes_per_group;
        let idx = i % self.sb.inodes_per_group;
        let mut bm = self.inode_bitmap(g)?;
        if !bit(&bm, idx) {
            return Err(corrupt(
                format!("inode {ino} is in use but free in the inode bitmap"),
                self.gds[g as usize].inode_bitmap * self.bs,
            ));
        }
        set_bit(&mut bm, idx, false);
        self.store_inode_bitmap(g, &bm)?;
        let fi = self.gd_free_inodes(g) + 1;
        self.gd_set_u32(g, 0xe, 0x2e, fi);
        if dir {
            let d = self.gd_used_dirs(g).saturating_sub(1);
            self.gd_set_u32(g, 0x10, 0x30, d);
        }
        self.freed_inodes.insert(ino);
        Ok(())
    }

    fn group_of_ino(&self, ino: u32) -> u64 {
        (u64::from(ino) - 1) / self.sb.inodes_per_group
    }

    // ---------------------------------------------------------------- block mapping

    /// Tree blocks (extent index/leaf blocks, indirect blocks) of an inode.
    fn tree_blocks(&self, ino: &Inode) -> Result<Vec<u64>> {
        let mut out = Vec::new();
        if ino.flags & FL_INLINE_DATA != 0 {
            return Ok(out);
        }
        if ino.flags & FL_EXTENTS != 0 {
            let root = ino.i_block();
            let h = parse_extent_header(root, 0)?;
            self.extent_tree_blocks(root, h, &mut out, 0)?;
        } else {
            let ft = ino.file_type();
            if ft == S_IFLNK && ino.size < 60 && le32(&ino.raw, 0x1c) == 0 {
                return Ok(out);
            }
            if ft != S_IFREG && ft != S_IFDIR && ft != S_IFLNK {
                return Ok(out);
            }
            let ib = ino.i_block();
            for level in 0..3u32 {
                let b = u64::from(le32(ib, 48 + 4 * level as usize));
                if b != 0 {
                    self.indirect_blocks(b, level, &mut out)?;
                }
            }
        }
        Ok(out)
    }

    fn extent_tree_blocks(
        &self,
        node: &[u8],
        h: ExtentHeader,
        out: &mut Vec<u64>,
        guard: usize,
    ) -> Result<()> {
        if h.depth == 0 || guard > usize::from(MAX_EXTENT_DEPTH) {
            return Ok(());
        }
        for i in 0..usize::from(h.entries) {
            let (_, child) = parse_index(&node[12 + 12 * i..24 + 12 * i]);
            if out.len() >= MAX_EXTENTS_PER_FILE {
                return Err(Error::Limit {
                    what: "extent tree blocks of one file",
                    needed: out.len() as u64 + 1,
                    limit: MAX_EXTENTS_PER_FILE as u64,
                });
            }
            out.push(child);
            let b = self.read_block(child)?;
            let ch = parse_extent_header(&b, child * self.bs)?;
            self.extent_tree_blocks(&b, ch, out, guard + 1)?;
        }
        Ok(())
    }

    fn indirect_blocks(&self, blk: u64, level: u32, out: &mut Vec<u64>) -> Result<()> {
        if out.len() >= MAX_EXTENTS_PER_FILE {
            return Err(Error::Limit {
                what: "indirect blocks of one file",
                needed: out.len() as u64 + 1,
                limit: MAX_EXTENTS_PER_FILE as u64,
            });
        }
        out.push(blk);
        if level == 0 {
            return Ok(());
        }
        let b = self.read_block(blk)?;
        for i in 0..(self.bs / 4) as usize {
            let c = u64::from(le32(&b, 4 * i));
            if c != 0 {
                self.indirect_blocks(c, level - 1, out)?;
            }
        }
        Ok(())
    }

    /// Data blocks of an inode as (logical, physical) runs.
    fn data_runs(&self, ino: &Inode) -> Result<Vec<crate::volume::Run>> {
        if ino.file_type() == S_IFLNK && ino.flags & FL_EXTENTS == 0 && ino.size < 60 {
            // Fast symlink (target in i_block), unless it really has a block (i_blocks).
            if le32(&ino.raw, 0x1c) == 0 {
                return Ok(Vec::new());
            }
        }
        self.vol.runs(ino, None)
    }

    /// Give `raw` (inode `ino`) a new mapping of `runs` (logical, physical, len), replacing
    /// its old tree blocks (freed). Updates i_block, flags and i_blocks; `data_blocks` is the
    /// number of data blocks mapped, `old_counted` the blocks the old i_blocks counted for
    /// data and tree (the rest, e.g. an xattr block, stays counted).
    fn set_mapping(
        &mut self,
        ino: u32,
        raw: &mut [u8],
        runs: &[(u64, u64, u64)],
        old_tree: &[u64],
        old_counted: u64,
    ) -> Result<()> {
        let goal = self.group_of_ino(ino);
        let data_blocks: u64 = runs.iter().map(|r| r.2).sum();
        self.free_blocks(old_tree)?;
        let (root, tree) = if self.sb.incompat & INCOMPAT_EXTENTS != 0 {
            let gen = le32(raw, 0x64);
            let r = self.build_extents(ino, gen, runs, goal)?;
            put32(raw, 0x20, (le32(raw, 0x20) | FL_EXTENTS) & !FL_EOFBLOCKS);
            r
        } else {
            put32(raw, 0x20, le32(raw, 0x20) & !FL_EXTENTS);
            self.build_block_map(runs, goal)?
        };
        raw[0x28..0x28 + 60].copy_from_slice(&root);
        let spb = self.bs / 512;
        let huge = self.sb.ro_compat & RO_COMPAT_HUGE_FILE != 0;
        let old_iblocks = u64::from(le32(raw, 0x1c))
            | if huge {
                u64::from(le16(raw, 0x74)) << 32
            } else {
                0
            };
        let rest = old_iblocks.saturating_sub(old_counted * spb);
        let new = rest + (data_blocks + tree) * spb;
        let limit = if huge {
            (1u64 << 48) - 1
        } else {
            u64::from(u32::MAX)
        };
        if new > limit {
            return Err(Error::Limit {
                what: "i_blocks",
                needed: new,
                limit,
            });
        }
        put32(raw, 0x1c, new as u32);
        if huge {
            put16(raw, 0x74, (new >> 32) as u16);
        }
        Ok(())
    }

    /// Build an extent tree of any depth for `runs`; returns (i_block, tree blocks used).
    fn build_extents(
        &mut self,
        ino: u32,
        gen: u32,
        runs: &[(u64, u64, u64)],
        goal: u64,
    ) -> Result<([u8; 60], u64)> {
        let mut leaves: Vec<[u8; 12]> = Vec::new();
        let mut firsts: Vec<u32> = Vec::new();
        for &(lblk, pblk, len) in runs {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(u64::from(MAX_INIT_EXTENT_LEN));
                if lblk + done + n > 1 << 32 {
                    return Err(Error::Limit {
                        what: "logical blocks of one file",
                        needed: lblk + done + n,
                        limit: 1 << 32,
                    });
                }
                let mut e = [0u8; 12];
                write_leaf(
                    &mut e,
                    &Leaf {
                        lblk: (lblk + done) as u32,
                        len: n as u32,
                        pblk: pblk + done,
                        uninit: false,
                    },
                );
                leaves.push(e);
                firsts.push((lblk + done) as u32);
                done += n;
            }
        }
        let per_block = ((self.bs as usize) - 12 - 4) / 12;
        let seed = self.sb.csum_seed.map(|s| inode_seed(s, ino, gen));
        let mut depth = 0u16;
        let mut nodes = leaves;
        let mut tree = 0u64;
        while nodes.len() > 4 {
            if depth >= MAX_EXTENT_DEPTH {
                return Err(Error::Limit {
                    what: "extent tree depth",
                    needed: u64::from(depth) + 1,
                    limit: u64::from(MAX_EXTENT_DEPTH),
                });
            }
            let nblk = nodes.len().div_ceil(per_block);
            let blocks: Vec<u64> = self
                .alloc_blocks(nblk as u64, goal)?
                .iter()
                .flat_map(|&(s, n)| s..s + n)
                .collect();
            tree += nblk as u64;
            let mut up = Vec::with_capacity(nblk);
            let mut upf = Vec::with_capacity(nblk);
            for (i, (chunk, &pb)) in nodes.chunks(per_block).zip(&blocks).enumerate() {
                let mut blk = vec![0u8; self.bs as usize];
                let h = ExtentHeader {
                    entries: chunk.len() as u16,
                    max: ((self.bs as usize - 12) / 12) as u16,
                    depth,
                };
                write_extent_header(&mut blk, h);
                for (j, e) in chunk.iter().enumerate() {
                    blk[12 + 12 * j..24 + 12 * j].copy_from_slice(e);
                }
                if let Some(s) = seed {
                    let t = extent_tail_off(h);
                    let c = crc32c_raw(s, &blk[..t]);
                    put32(&mut blk, t, c);
                }
                self.write_block(pb, &blk)?;
                let mut e = [0u8; 12];
                let f = firsts[i * per_block];
                write_index(&mut e, f, pb);
                up.push(e);
                upf.push(f);
            }
            nodes = up;
            firsts = upf;
            depth += 1;
        }
        let mut root = [0u8; 60];
        write_extent_header(
            &mut root,
            ExtentHeader {
                entries: nodes.len() as u16,
                max: 4,
                depth,
            },
        );
        for (i, e) in nodes.iter().enumerate() {
            root[12 + 12 * i..24 + 12 * i].copy_from_slice(e);
        }
        Ok((root, tree))
    }

    /// Build an ext2/3 block map (direct, single, double, triple indirect) for `runs`.
    fn build_block_map(&mut self, runs: &[(u64, u64, u64)], goal: u64) -> Result<([u8; 60], u64)> {
        let p = self.bs / 4;
        let max = 12 + p + p * p + p * p * p;
        let mut map: BTreeMap<u64, u64> = BTreeMap::new();
        for &(l, pb, n) in runs {
            if l + n > max || pb + n > 1 << 32 {
                return Err(Error::Limit {
                    what: "blocks of a block-mapped file",
                    needed: l + n,
                    limit: max,
                });
            }
            for k in 0..n {
                map.insert(l + k, pb + k);
            }
        }
        let mut root = [0u8; 60];
        for (&l, &pb) in map.range(0..12) {
            put32(&mut root, 4 * l as usize, pb as u32);
        }
        let mut tree = 0u64;
        let mut base = 12u64;
        for level in 0..3u32 {
            let span = p.pow(level + 1);
            if let Some(b) = self.build_indirect(&map, base, level, goal, &mut tree)? {
                put32(&mut root, 48 + 4 * level as usize, b as u32);
            }
            base += span;
        }
        Ok((root, tree))
    }

    fn build_indirect(
        &mut self,
        map: &BTreeMap<u64, u64>,
        base: u64,
        level: u32,
        goal: u64,
        tree: &mut u64,
    ) -> Result<Option<u64>> {
        let p = self.bs / 4;
        let span = p.pow(level);
        if map.range(base..base + span * p).next().is_none() {
            return Ok(None);
        }
        let blk = self.alloc_block(goal)?;
        *tree += 1;
        let mut b = vec![0u8; self.bs as usize];
        for i in 0..p {
            let lb = base + i * span;
            let child = if level == 0 {
                map.get(&lb).copied()
            } else {
                self.build_indirect(map, lb, level - 1, goal, tree)?
            };
            if let Some(c) = child {
                put32(&mut b, (4 * i) as usize, c as u32);
            }
        }
        self.write_block(blk, &b)?;
        Ok(Some(blk))
    }

    // ---------------------------------------------------------------- lookups

    fn resolve(&self, path: &str, follow: bool) -> Result<Inode> {
        self.vol.resolve(path, follow)
    }

    /// Look a path up (not following a final symlink); `None` when it does not exist.
    pub fn lstat(&self, path: &str) -> Result<Option<Stat>> {
        match self.resolve(path, false) {
            Ok(i) => Ok(Some(Stat {
                ino: i.ino,
                mode: i.mode,
                uid: i.uid,
                gid: i.gid,
                size: i.size,
                links: i.links,
            })),
            Err(Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Read a whole regular file as the edit has it so far.
    pub fn read_file(&self, path: &str) -> Result<Vec<u8>> {
        let i = self.resolve(path, true)?;
        if i.file_type() != S_IFREG {
            return Err(Error::NotARegularFile {
                path: path.to_string(),
            });
        }
        if i.size > MAX_WRITE_BYTES {
            return Err(Error::Limit {
                what: "file size to read",
                needed: i.size,
                limit: MAX_WRITE_BYTES,
            });
        }
        let runs = self.vol.runs(&i, Some(i.size.div_ceil(self.bs)))?;
        let mut buf = vec![0u8; i.size as usize];
        self.vol.read_file_at(&i, &runs, 0, &mut buf)?;
        Ok(buf)
    }

    /// Names (other than . and ..) of a directory.
    pub fn list_dir(&self, path: &str) -> Result<Vec<(Vec<u8>, u32)>> {
        let d = self.resolve(path, true)?;
        if !d.is_dir() {
            return Err(Error::NotADirectory {
                path: path.to_string(),
            });
        }
        Ok(self
            .vol
            .dir_entries(&d)?
            .into_iter()
            .filter(|e| e.name != b"." && e.name != b"..")
            .map(|e| (e.name, e.ino))
            .collect())
    }

    fn parent_dir(&self, path: &str) -> Result<(Inode, Vec<u8>)> {
        let (parent, name) = split_path(path)?;
        let d = self.resolve(&parent, true)?;
        if !d.is_dir() {
            return Err(Error::NotADirectory { path: parent });
        }
        self.check_dir_editable(&d, &parent)?;
        Ok((d, name))
    }

    fn check_dir_editable(&self, d: &Inode, path: &str) -> Result<()> {
        for (fl, what) in [
            (
                FL_ENCRYPT,
                "encrypted directories (their names need the key)",
            ),
            (FL_CASEFOLD, "casefolded directories"),
            (FL_INLINE_DATA, "directories with inline_data"),
            (FL_IMMUTABLE, "immutable directories (chattr -i first)"),
            (FL_APPEND, "append-only directories (chattr -a first)"),
        ] {
            if d.flags & fl != 0 {
                return Err(Error::unsupported(format!("{path}: editing {what}")));
            }
        }
        Ok(())
    }

    fn check_inode_editable(&self, i: &Inode, path: &str) -> Result<()> {
        if i.ino < self.first_ino && i.ino != ROOT_INO {
            return Err(Error::unsupported(format!(
                "{path} is reserved inode {}; refusing to edit it",
                i.ino
            )));
        }
        for (fl, what) in [
            (FL_INLINE_DATA, "inline_data files"),
            (FL_ENCRYPT, "encrypted files"),
            (FL_VERITY, "fs-verity files"),
            (FL_HUGE_FILE, "huge_file inodes counted in blocks"),
            (FL_IMMUTABLE, "immutable files (chattr -i first)"),
            (FL_APPEND, "append-only files (chattr -a first)"),
            (FL_EA_INODE, "extended-attribute inodes"),
        ] {
            if i.flags & fl != 0 {
                return Err(Error::unsupported(format!("{path}: editing {what}")));
            }
        }
        Ok(())
    }

    // ---------------------------------------------------------------- directories

    fn dir_csum(&self) -> bool {
        self.sb.csum_seed.is_some()
    }

    fn seal_dir_block(&self, dir: &Inode, b: &mut [u8]) {
        if let Some(seed) = self.sb.csum_seed {
            let n = b.len();
            let t = n - 12;
            put32(b, t, 0);
            put16(b, t + 4, 12);
            b[t + 6] = 0;
            b[t + 7] = 0xde;
            let c = crc32c_raw(inode_seed(seed, dir.ino, dir.generation), &b[..t]);
            put32(b, t + 8, c);
        }
    }

    /// Turn an htree directory into a linear one (see the module doc).
    fn unindex_dir(&mut self, dir: &mut Inode) -> Result<()> {
        if dir.flags & FL_INDEX == 0 {
            return Ok(());
        }
        let runs = self.data_runs(dir)?;
        let bs = self.bs as usize;
        let top = if self.dir_csum() { bs - 12 } else { bs };
        for r in &runs {
            for k in 0..r.len {
                let pb = r.pblk + k;
                let lb = r.lblk + k;
                let mut b = self.read_block(pb)?;
                if lb == 0 {
                    // dx root: "." (12 bytes) then ".." spanning the block; cut ".." to end
                    // where the tail begins.
                    let rl0 = usize::from(le16(&b, 4));
                    if rl0 != 12 {
                        return Err(corrupt(
                            format!("htree directory {}: root block has no '.' entry", dir.ino),
                            pb * self.bs,
                        ));
                    }
                    put16(&mut b, 12 + 4, (top - 12) as u16);
                    b[top..].fill(0);
                } else if le32(&b, 0) == 0 && usize::from(le16(&b, 4)) == bs {
                    // dx interior node: an empty entry spanning the block.
                    b.fill(0);
                    put16(&mut b, 4, top as u16);
                } else {
                    continue;
                }
                self.seal_dir_block(dir, &mut b);
                self.write_block(pb, &b)?;
            }
        }
        let mut raw = dir.raw.clone();
        put32(&mut raw, 0x20, dir.flags & !FL_INDEX);
        self.write_inode(dir.ino, &mut raw)?;
        *dir = self.inode(dir.ino)?;
        Ok(())
    }

    /// Add `name` -> `child` to directory `dir`.
    fn dir_add(&mut self, dir_ino: u32, name: &[u8], child: u32, ft: u8) -> Result<()> {
        let mut dir = self.inode(dir_ino)?;
        self.unindex_dir(&mut dir)?;
        let need = rec_len_of(name.len());
        let bs = self.bs as usize;
        let top = if self.dir_csum() { bs - 12 } else { bs };
        let ftype = if self.sb.incompat & INCOMPAT_FILETYPE != 0 {
            ft
        } else {
            0
        };
        let runs = self.data_runs(&dir)?;
        let nblocks = dir.size / self.bs;
        for r in &runs {
            for k in 0..r.len {
                if r.lblk + k >= nblocks {
                    break;
                }
                let pb = r.pblk + k;
                let mut b = self.read_block(pb)?;
                let mut off = 0usize;
                while off < top {
                    let ino = le32(&b, off);
                    let rl = usize::from(le16(&b, off + 4));
                    if rl < 8 || off + rl > bs {
                        return Err(corrupt(
                            format!("directory {dir_ino}: bad rec_len {rl}"),
                            pb * self.bs + off as u64,
                        ));
                    }
                    let used = if ino == 0 {
                        0
                    } else {
                        rec_len_of(usize::from(b[off + 6]))
                    };
                    let end = (off + rl).min(top);
                    if end - off >= used + need {
                        let at = if ino == 0 {
                            off
                        } else {
                            put16(&mut b, off + 4, used as u16);
                            off + used
                        };
                        let new_rl = off + rl - at;
                        put32(&mut b, at, child);
                        put16(&mut b, at + 4, new_rl as u16);
                        b[at + 6] = name.len() as u8;
                        b[at + 7] = ftype;
                        b[at + 8..at + 8 + name.len()].copy_from_slice(name);
                        self.seal_dir_block(&dir, &mut b);
                        self.write_block(pb, &b)?;
                        let mut raw = dir.raw.clone();
                        self.stamp(&mut raw, &[0xc, 0x10]);
                        return self.write_inode(dir_ino, &mut raw);
                    }
                    off += rl;
                }
            }
        }
        // No room: grow the directory by one block.
        let goal = self.group_of_ino(dir_ino);
        let nb = self.alloc_block(goal)?;
        let mut b = vec![0u8; bs];
        put32(&mut b, 0, child);
        put16(&mut b, 4, top as u16);
        b[6] = name.len() as u8;
        b[7] = ftype;
        b[8..8 + name.len()].copy_from_slice(name);
        self.seal_dir_block(&dir, &mut b);
        self.write_block(nb, &b)?;
        let mut mapping: Vec<(u64, u64, u64)> =
            runs.iter().map(|r| (r.lblk, r.pblk, r.len)).collect();
        let new_l = nblocks;
        mapping.push((new_l, nb, 1));
        let old_tree = self.tree_blocks(&dir)?;
        let old_counted: u64 = runs.iter().map(|r| r.len).sum::<u64>() + old_tree.len() as u64;
        let mut raw = dir.raw.clone();
        self.set_mapping(dir_ino, &mut raw, &mapping, &old_tree, old_counted)?;
        let size = (nblocks + 1) * self.bs;
        put32(&mut raw, 0x4, size as u32);
        put32(&mut raw, 0x6c, (size >> 32) as u32);
        self.stamp(&mut raw, &[0xc, 0x10]);
        self.write_inode(dir_ino, &mut raw)
    }

    /// Remove the entry `name` from `dir`; returns the inode it named.
    fn dir_remove(&mut self, dir_ino: u32, name: &[u8]) -> Result<u32> {
        let mut dir = self.inode(dir_ino)?;
        self.unindex_dir(&mut dir)?;
        let bs = self.bs as usize;
        let top = if self.dir_csum() { bs - 12 } else { bs };
        let runs = self.data_runs(&dir)?;
        for r in &runs {
            for k in 0..r.len {
                let pb = r.pblk + k;
                let mut b = self.read_block(pb)?;
                let mut off = 0usize;
                let mut prev: Option<usize> = None;
                while off < top {
                    let ino = le32(&b, off);
                    let rl = usize::from(le16(&b, off + 4));
                    let nl = usize::from(b[off + 6]);
                    if rl < 8 || off + rl > bs || 8 + nl > rl {
                        return Err(corrupt(
                            format!("directory {dir_ino}: bad entry"),
                            pb * self.bs + off as u64,
                        ));
                    }
                    if ino != 0 && &b[off + 8..off + 8 + nl] == name {
                        match prev {
                            Some(p) => {
                                let prl = usize::from(le16(&b, p + 4));
                                put16(&mut b, p + 4, (prl + rl) as u16);
                                b[off..off + rl].fill(0);
                            }
                            None => {
                                put32(&mut b, off, 0);
                                b[off + 6] = 0;
                                b[off + 7] = 0;
                                b[off + 8..off + rl].fill(0);
                            }
                        }
                        self.seal_dir_block(&dir, &mut b);
                        self.write_block(pb, &b)?;
                        let mut raw = dir.raw.clone();
                        self.stamp(&mut raw, &[0xc, 0x10]);
                        self.write_inode(dir_ino, &mut raw)?;
                        return Ok(ino);
                    }
                    prev = Some(off);
                    off += rl;
                }
            }
        }
        Err(Error::NotFound {
            path: String::from_utf8_lossy(name).into_owned(),
        })
    }

    fn new_inode_raw(&self, mode: u16, uid: u32, gid: u32, links: u16) -> Vec<u8> {
        let mut raw = vec![0u8; self.sb.inode_size as usize];
        put16(&mut raw, 0, mode);
        put16(&mut raw, 0x2, uid as u16);
        put16(&mut raw, 0x78, (uid >> 16) as u16);
        put16(&mut raw, 0x18, gid as u16);
        put16(&mut raw, 0x7a, (gid >> 16) as u16);
        put16(&mut raw, 0x1a, links);
        put32(&mut raw, 0x64, self.generation);
        if raw.len() > 128 {
            let want = le16(&self.sb.raw, 0x15c).max(32);
            let extra = want.min((raw.len() - 128) as u16) & !3;
            put16(&mut raw, 0x80, extra);
        }
        self.stamp(&mut raw, &[0x8, 0xc, 0x10, 0x90]);
        raw
    }

    fn adjust_links(&mut self, ino: u32, delta: i32) -> Result<()> {
        let i = self.inode(ino)?;
        let mut raw = i.raw.clone();
        let l = i32::from(i.links) + delta;
        let nl = if i.is_dir()
            && self.sb.ro_compat & RO_COMPAT_DIR_NLINK != 0
            && (i.links == 1 || l >= i32::from(EXT4_LINK_MAX))
        {
            1
        } else if l >= i32::from(EXT4_LINK_MAX) {
            return Err(Error::Limit {
                what: "links to one inode",
                needed: l as u64,
                limit: u64::from(EXT4_LINK_MAX),
            });
        } else {
            l.max(0) as u16
        };
        put16(&mut raw, 0x1a, nl);
        self.stamp(&mut raw, &[0xc]);
        self.write_inode(ino, &mut raw)
    }

    // ---------------------------------------------------------------- operations

    /// Create or replace the regular file at `path` with `content`. Returns its inode.
    pub fn write_file(&mut self, path: &str, content: &[u8], attrs: Attrs) -> Result<u32> {
        if content.len() as u64 > MAX_WRITE_BYTES {
            return Err(Error::Limit {
                what: "file size to write",
                needed: content.len() as u64,
                limit: MAX_WRITE_BYTES,
            });
        }
        if content.len() as u64 >= 1 << 31 && self.sb.ro_compat & RO_COMPAT_LARGE_FILE == 0 {
            return Err(Error::Limit {
                what: "file size without large_file",
                needed: content.len() as u64,
                limit: (1 << 31) - 1,
            });
        }
        let (dir, name) = self.parent_dir(path)?;
        let existing = self.vol.lookup(&dir, &name)?;
        let (ino, mut raw, old_runs, old_tree) = match existing {
            Some(ino) => {
                let i = self.inode(ino)?;
                match i.file_type() {
                    S_IFREG => {}
                    S_IFDIR => {
                        return Err(Error::IsADirectory {
                            path: path.to_string(),
                        })
                    }
                    S_IFLNK => {
                        return Err(Error::unsupported(format!(
                            "{path} is a symbolic link; writing through it could change a \
                             file elsewhere (e.g. the Nix store): rm it first"
                        )))
                    }
                    _ => {
                        return Err(Error::NotARegularFile {
                            path: path.to_string(),
                        })
                    }
                }
                self.check_inode_editable(&i, path)?;
                let runs = self.data_runs(&i)?;
                let tree = self.tree_blocks(&i)?;
                (ino, i.raw.clone(), runs, tree)
            }
            None => {
                let goal = self.group_of_ino(dir.ino);
                let ino = self.alloc_inode(goal, false)?;
                let mode = S_IFREG | (attrs.mode.unwrap_or(0o644) & 0o7777);
                let raw =
                    self.new_inode_raw(mode, attrs.uid.unwrap_or(0), attrs.gid.unwrap_or(0), 1);
                (ino, raw, Vec::new(), Vec::new())
            }
        };
        // Data first into fresh blocks, then the new mapping, then the old data freed.
        let n = (content.len() as u64).div_ceil(self.bs);
        let goal = self.group_of_ino(ino);
        let runs = self.alloc_blocks(n, goal)?;
        let mut lb = 0u64;
        let bs = self.bs as usize;
        let mut mapping = Vec::with_capacity(runs.len());
        for &(start, len) in &runs {
            for k in 0..len {
                let from = ((lb + k) as usize) * bs;
                let to = (from + bs).min(content.len());
                let mut blk = vec![0u8; bs];
                blk[..to - from].copy_from_slice(&content[from..to]);
                self.write_block(start + k, &blk)?;
            }
            mapping.push((lb, start, len));
            lb += len;
        }
        let old_data: Vec<u64> = old_runs
            .iter()
            .filter(|r| r.pblk != 0)
            .flat_map(|r| r.pblk..r.pblk + r.len)
            .collect();
        let old_counted = old_data.len() as u64 + old_tree.len() as u64;
        self.set_mapping(ino, &mut raw, &mapping, &old_tree, old_counted)?;
        self.free_blocks(&old_data)?;
        let size = content.len() as u64;
        put32(&mut raw, 0x4, size as u32);
        put32(&mut raw, 0x6c, (size >> 32) as u32);
        if existing.is_some() {
            if let Some(m) = attrs.mode {
                put16(&mut raw, 0, S_IFREG | (m & 0o7777));
            }
            if let Some(u) = attrs.uid {
                put16(&mut raw, 0x2, u as u16);
                put16(&mut raw, 0x78, (u >> 16) as u16);
            }
            if let Some(g) = attrs.gid {
                put16(&mut raw, 0x18, g as u16);
                put16(&mut raw, 0x7a, (g >> 16) as u16);
            }
        }
        self.stamp(&mut raw, &[0xc, 0x10]);
        self.write_inode(ino, &mut raw)?;
        if existing.is_none() {
            // Link last: the inode and its data are complete before any name points at it.
            self.dir_add(dir.ino, &name, ino, FT_REG)?;
        }
        Ok(ino)
    }

    /// Make a directory (with `parents`, also the missing ones above it, 0755 root; an
    /// existing directory is then no error).
    pub fn mkdir(&mut self, path: &str, attrs: Attrs, parents: bool) -> Result<u32> {
        if parents {
            let (parent, _) = split_path(path)?;
            if parent != "/" && self.lstat(&parent)?.is_none() {
                // As mkdir -p: the parents get the defaults, only the last one `attrs`.
                self.mkdir(&parent, Attrs::default(), true)?;
            }
            if let Some(st) = self.lstat(path)? {
                if st.mode & S_IFMT == S_IFDIR {
                    return Ok(st.ino);
                }
            }
        }
        let (dir, name) = self.parent_dir(path)?;
        if self.vol.lookup(&dir, &name)?.is_some() {
            return Err(Error::unsupported(format!("{path}: already exists")));
        }
        let goal = self.group_of_ino(dir.ino);
        let ino = self.alloc_inode(goal, true)?;
        let mode = S_IFDIR | (attrs.mode.unwrap_or(0o755) & 0o7777);
        let mut raw = self.new_inode_raw(mode, attrs.uid.unwrap_or(0), attrs.gid.unwrap_or(0), 2);
        let blk = self.alloc_block(self.group_of_ino(ino))?;
        let bs = self.bs as usize;
        let top = if self.dir_csum() { bs - 12 } else { bs };
        let ftype = |t: u8| {
            if self.sb.incompat & INCOMPAT_FILETYPE != 0 {
                t
            } else {
                0
            }
        };
        let mut b = vec![0u8; bs];
        put32(&mut b, 0, ino);
        put16(&mut b, 4, 12);
        b[6] = 1;
        b[7] = ftype(FT_DIR);
        b[8] = b'.';
        put32(&mut b, 12, dir.ino);
        put16(&mut b, 16, (top - 12) as u16);
        b[18] = 2;
        b[19] = ftype(FT_DIR);
        b[20] = b'.';
        b[21] = b'.';
        let tmp = Inode::parse(ino, raw.clone());
        self.seal_dir_block(&tmp, &mut b);
        self.write_block(blk, &b)?;
        self.set_mapping(ino, &mut raw, &[(0, blk, 1)], &[], 0)?;
        put32(&mut raw, 0x4, self.bs as u32);
        self.write_inode(ino, &mut raw)?;
        self.adjust_links(dir.ino, 1)?;
        self.dir_add(dir.ino, &name, ino, FT_DIR)?;
        Ok(ino)
    }

    /// Make a symbolic link at `path` pointing at `target` (fast when it fits in the inode).
    pub fn symlink(&mut self, target: &str, path: &str, attrs: Attrs) -> Result<u32> {
        let t = target.as_bytes();
        if t.is_empty() || t.len() > MAX_SYMLINK_TARGET || t.contains(&0) {
            return Err(Error::BadPath {
                path: target.to_string(),
            });
        }
        let (dir, name) = self.parent_dir(path)?;
        if self.vol.lookup(&dir, &name)?.is_some() {
            return Err(Error::unsupported(format!("{path}: already exists")));
        }
        let goal = self.group_of_ino(dir.ino);
        let ino = self.alloc_inode(goal, false)?;
        let mut raw = self.new_inode_raw(
            S_IFLNK | 0o777,
            attrs.uid.unwrap_or(0),
            attrs.gid.unwrap_or(0),
            1,
        );
        if t.len() < 60 {
            raw[0x28..0x28 + t.len()].copy_from_slice(t);
        } else {
            let blk = self.alloc_block(self.group_of_ino(ino))?;
            let mut b = vec![0u8; self.bs as usize];
            b[..t.len()].copy_from_slice(t);
            self.write_block(blk, &b)?;
            self.set_mapping(ino, &mut raw, &[(0, blk, 1)], &[], 0)?;
        }
        put32(&mut raw, 0x4, t.len() as u32);
        self.write_inode(ino, &mut raw)?;
        self.dir_add(dir.ino, &name, ino, FT_SYMLINK)?;
        Ok(ino)
    }

    /// Drop one link to inode `ino`; free it (blocks, xattr block, inode) at the last one.
    fn release(&mut self, ino: u32, path: &str) -> Result<()> {
        let i = self.inode(ino)?;
        self.check_inode_editable(&i, path)?;
        if !i.is_dir() && i.links > 1 {
            return self.adjust_links(ino, -1);
        }
        let runs = self.data_runs(&i)?;
        let mut blocks: Vec<u64> = runs
            .iter()
            .filter(|r| r.pblk != 0)
            .flat_map(|r| r.pblk..r.pblk + r.len)
            .collect();
        blocks.extend(self.tree_blocks(&i)?);
        let acl = i.file_acl();
        if acl != 0 {
            let mut xb = self.read_block(acl)?;
            let refs = le32(&xb, 4);
            if refs <= 1 {
                blocks.push(acl);
            } else {
                put32(&mut xb, 4, refs - 1);
                if let Some(seed) = self.sb.csum_seed {
                    put32(&mut xb, 0x10, 0);
                    let c = crc32c_raw(seed, &acl.to_le_bytes());
                    let c = crc32c_raw(c, &xb);
                    put32(&mut xb, 0x10, c);
                }
                self.write_block(acl, &xb)?;
            }
        }
        let mut raw = i.raw.clone();
        put16(&mut raw, 0x1a, 0);
        put32(&mut raw, 0x14, self.now.0); // dtime
        self.stamp(&mut raw, &[0xc]);
        self.write_inode(ino, &mut raw)?;
        self.free_blocks(&blocks)?;
        self.free_inode(ino, i.is_dir())
    }

    /// Remove `path` (a directory only when empty, or with `recursive`).
    pub fn remove(&mut self, path: &str, recursive: bool) -> Result<()> {
        self.remove_at(path, recursive, 0)
    }

    fn remove_at(&mut self, path: &str, recursive: bool, depth: usize) -> Result<()> {
        if depth > MAX_RM_DEPTH {
            return Err(Error::Limit {
                what: "directory depth for rm -r",
                needed: depth as u64,
                limit: MAX_RM_DEPTH as u64,
            });
        }
        let (dir, name) = self.parent_dir(path)?;
        let Some(ino) = self.vol.lookup(&dir, &name)? else {
            return Err(Error::NotFound {
                path: path.to_string(),
            });
        };
        let i = self.inode(ino)?;
        self.check_inode_editable(&i, path)?;
        if i.is_dir() {
            self.check_dir_editable(&i, path)?;
            let kids: Vec<Vec<u8>> = self
                .vol
                .dir_entries(&i)?
                .into_iter()
                .filter(|e| e.name != b"." && e.name != b"..")
                .map(|e| e.name)
                .collect();
            if !kids.is_empty() && !recursive {
                return Err(Error::unsupported(format!(
                    "{path}: directory not empty (use -r)"
                )));
            }
            let base = path.trim_end_matches('/');
            for k in kids {
                let child = format!("{base}/{}", String::from_utf8_lossy(&k));
                if std::str::from_utf8(&k).is_err() {
                    return Err(Error::unsupported(format!(
                        "{path}: removing an entry whose name is not UTF-8"
                    )));
                }
                self.remove_at(&child, true, depth + 1)?;
            }
            // Unlink first, then free: a name never points at a freed inode.
            self.dir_remove(dir.ino, &name)?;
            self.adjust_links(dir.ino, -1)?;
            self.release(ino, path)
        } else {
            self.dir_remove(dir.ino, &name)?;
            self.release(ino, path)
        }
    }

    fn update_inode(&mut self, path: &str, f: &mut dyn FnMut(&mut [u8])) -> Result<()> {
        let i = self.resolve(path, true)?;
        self.check_inode_editable(&i, path)?;
        let mut raw = i.raw.clone();
        f(&mut raw);
        self.stamp(&mut raw, &[0xc]);
        self.write_inode(i.ino, &mut raw)
    }

    fn walk_paths(&self, path: &str, recursive: bool, out: &mut Vec<String>) -> Result<()> {
        out.push(path.to_string());
        if !recursive {
            return Ok(());
        }
        let i = self.resolve(path, false)?;
        if i.is_dir() {
            let base = path.trim_end_matches('/');
            for (n, _) in self.list_dir(path)? {
                let Ok(s) = String::from_utf8(n) else {
                    continue;
                };
                let child = format!("{base}/{s}");
                let ci = self.resolve(&child, false)?;
                if ci.file_type() == S_IFLNK {
                    continue;
                }
                if out.len() > crate::read::MAX_WALK_ENTRIES as usize {
                    return Err(Error::Limit {
                        what: "paths in a recursive change",
                        needed: out.len() as u64,
                        limit: crate::read::MAX_WALK_ENTRIES,
                    });
                }
                self.walk_paths(&child, true, out)?;
            }
        }
        Ok(())
    }

    /// chmod (the permission bits; the file type stays).
    pub fn chmod(&mut self, path: &str, mode: u16, recursive: bool) -> Result<()> {
        let mut v = Vec::new();
        self.walk_paths(path, recursive, &mut v)?;
        for p in v {
            self.update_inode(&p, &mut |raw| {
                let m = le16(raw, 0);
                put16(raw, 0, (m & S_IFMT) | (mode & 0o7777));
            })?;
        }
        Ok(())
    }

    /// chown (`None` keeps that id).
    pub fn chown(
        &mut self,
        path: &str,
        uid: Option<u32>,
        gid: Option<u32>,
        recursive: bool,
    ) -> Result<()> {
        let mut v = Vec::new();
        self.walk_paths(path, recursive, &mut v)?;
        for p in v {
            self.update_inode(&p, &mut |raw| {
                if let Some(u) = uid {
                    put16(raw, 0x2, u as u16);
                    put16(raw, 0x78, (u >> 16) as u16);
                }
                if let Some(g) = gid {
                    put16(raw, 0x18, g as u16);
                    put16(raw, 0x7a, (g >> 16) as u16);
                }
            })?;
        }
        Ok(())
    }

    /// Set access and modification times (seconds since the epoch).
    pub fn set_times(&mut self, path: &str, atime: u32, mtime: u32) -> Result<()> {
        self.update_inode(path, &mut |raw| {
            put32(raw, 0x8, atime);
            put32(raw, 0x10, mtime);
            if raw.len() > 128 {
                let end = 128 + usize::from(le16(raw, 0x80));
                if end >= 0x8c + 4 {
                    put32(raw, 0x8c, 0);
                }
                if end >= 0x88 + 4 {
                    put32(raw, 0x88, 0);
                }
            }
        })
    }

    // ---------------------------------------------------------------- commit

    /// Stage the descriptors and the superblock (counts summed from the descriptors).
    fn stage_counters(&mut self, recover: bool) -> Result<()> {
        for &g in &self.touched.clone() {
            let gd = &mut self.gds[g as usize];
            gd.reseal(&self.sb, g);
            let off = self.sb.gdt_off() + g * self.sb.desc_size;
            self.cache.write_all_at(&self.gds[g as usize].raw, off)?;
        }
        let free_blocks: u64 = self.gds.iter().map(|g| g.free_blocks).sum();
        let free_inodes: u64 = (0..self.sb.group_count)
            .map(|g| self.gd_free_inodes(g))
            .sum();
        self.sb.set_free_blocks(free_blocks);
        put32(&mut self.sb.raw, 0x10, free_inodes as u32);
        if recover {
            let v = le32(&self.sb.raw, 0x60) | INCOMPAT_RECOVER;
            put32(&mut self.sb.raw, 0x60, v);
        } else {
            let v = le32(&self.sb.raw, 0x60) & !INCOMPAT_RECOVER;
            put32(&mut self.sb.raw, 0x60, v);
        }
        put32(&mut self.sb.raw, 0x30, self.now.0); // s_wtime
        if self.sb.metadata_csum() {
            let c = sb_checksum(&self.sb.raw);
            put32(&mut self.sb.raw, 0x3fc, c);
        }
        self.cache.write_all_at(&self.sb.raw, SB_OFF)?;
        Ok(())
    }

    /// Write the edit to the device (see the module doc for the order). Nothing changed:
    /// nothing written.
    pub fn commit(mut self) -> Result<CommitReport> {
        if self.cache.staged_count() == 0 {
            return Ok(CommitReport::default());
        }
        let journaled = self.sb.compat & COMPAT_HAS_JOURNAL != 0;
        let mut jctx = if journaled {
            Some(self.journal_ctx()?)
        } else {
            None
        };
        self.stage_counters(journaled)?;
        let staged = self.cache.staged();
        let (fresh, meta): (Vec<_>, Vec<_>) = staged
            .into_iter()
            .partition(|(b, _)| self.fresh.contains(b));
        let mut report = CommitReport {
            new_blocks: fresh.len() as u64,
            metadata_blocks: meta.len() as u64,
            journaled,
            journal_sequence: None,
            device_writes: 0,
        };
        let dev = self.base.clone();
        let bs = self.bs;
        let writes = std::cell::Cell::new(0u64);
        let mut w = |buf: &[u8], off: u64| -> Result<()> {
            writes.set(writes.get() + 1);
            dev.write_all_at(buf, off)?;
            Ok(())
        };
        write_runs(&fresh, bs, &mut w)?;
        self.base.flush()?;
        if let Some(j) = jctx.as_mut() {
            let seq = j.write_transaction(&meta, &mut w, &self.base)?;
            report.journal_sequence = Some(seq);
            // needs_recovery on disk as soon as the journal holds the transaction (the staged
            // superblock carries it), so e2fsck and the kernel replay it after a crash.
            w(&self.sb.raw, SB_OFF)?;
            self.base.flush()?;
            j.mark_started(&mut w)?;
            self.base.flush()?;
        }
        write_runs(&meta, bs, &mut w)?;
        self.base.flush()?;
        if let Some(j) = jctx.as_mut() {
            j.mark_empty(&mut w)?;
            self.base.flush()?;
            // The final superblock: needs_recovery cleared.
            let v = le32(&self.sb.raw, 0x60) & !INCOMPAT_RECOVER;
            put32(&mut self.sb.raw, 0x60, v);
            if self.sb.metadata_csum() {
                let c = sb_checksum(&self.sb.raw);
                put32(&mut self.sb.raw, 0x3fc, c);
            }
            w(&self.sb.raw, SB_OFF)?;
            self.base.flush()?;
        }
        report.device_writes = writes.get();
        Ok(report)
    }

    pub(crate) fn journal_ctx(&self) -> Result<crate::jwrite::JournalWriter> {
        let jino = le32(&self.sb.raw, 0xe0);
        if jino == 0 {
            return Err(Error::unsupported(
                "editing a filesystem whose journal is on another device",
            ));
        }
        let ji = self.inode(jino)?;
        let nblocks = ji.size / self.bs;
        let runs = self.vol.runs(&ji, Some(nblocks))?;
        crate::jwrite::JournalWriter::open(self.base.as_ref(), self.bs, runs, nblocks, self.now)
    }
}

/// Most bytes one coalesced write carries (1 MiB).
const MAX_WRITE_RUN: usize = 1 << 20;

/// Write sorted (block, content) pairs, consecutive blocks coalesced into one write each.
fn write_runs(
    blocks: &[(u64, Vec<u8>)],
    bs: u64,
    w: &mut dyn FnMut(&[u8], u64) -> Result<()>,
) -> Result<()> {
    let mut i = 0;
    while i < blocks.len() {
        let start = blocks[i].0;
        let mut buf = blocks[i].1.clone();
        let mut j = i + 1;
        while j < blocks.len() && blocks[j].0 == start + (j - i) as u64 && buf.len() < MAX_WRITE_RUN
        {
            buf.extend_from_slice(&blocks[j].1);
            j += 1;
        }
        w(&buf, start * bs)?;
        i = j;
    }
    Ok(())
}

/// Replay a journal that needs recovery onto the device itself (what e2fsck does first), and
/// mark the filesystem clean. Returns the number of blocks written; 0 when there was nothing
/// to replay.
pub fn replay_journal(dev: Arc<dyn BlockDevice>) -> Result<u64> {
    let mut raw = vec![0u8; SB_LEN];
    dev.read_exact_at(&mut raw, SB_OFF)?;
    let sb = Superblock::parse(&raw)?;
    if sb.incompat & INCOMPAT_RECOVER == 0 || sb.compat & COMPAT_HAS_JOURNAL == 0 {
        return Ok(0);
    }
    let vol = Volume::open(dev.clone(), None)?;
    let bs = vol.bs;
    let blocks = vol.replayed_blocks();
    for &b in &blocks {
        let data = vol.read_block(b)?;
        dev.write_all_at(&data, b * bs)?;
    }
    dev.flush()?;
    // Mark the journal empty.
    let jino = le32(&vol.sb.raw, 0xe0);
    let ji = vol.inode(jino)?;
    let nblocks = ji.size / bs;
    let runs = vol.runs(&ji, Some(nblocks))?;
    let j0 = runs
        .first()
        .filter(|r| r.lblk == 0)
        .ok_or_else(|| corrupt("the journal inode does not map block 0", 0))?
        .pblk;
    let mut jsb = vec![0u8; bs as usize];
    dev.read_exact_at(&mut jsb, j0 * bs)?;
    let end = vol.journal_end_transaction();
    put_be32(&mut jsb, 0x1c, 0);
    put_be32(&mut jsb, 0x18, end);
    crate::jwrite::seal_jsb(&mut jsb);
    dev.write_all_at(&jsb, j0 * bs)?;
    dev.flush()?;
    // The superblock as replayed, with recovery done and the counters summed from the
    // (replayed) descriptors: the kernel does not keep the superblock's counters on disk.
    dev.read_exact_at(&mut raw, SB_OFF)?;
    let mut sb = Superblock::parse(&raw)?;
    let v = le32(&sb.raw, 0x60) & !INCOMPAT_RECOVER;
    put32(&mut sb.raw, 0x60, v);
    let mut gdt = vec![0u8; (sb.group_count * sb.desc_size) as usize];
    dev.read_exact_at(&mut gdt, sb.gdt_off())?;
    let mut fb = 0u64;
    let mut fi = 0u64;
    for r in gdt.chunks_exact(sb.desc_size as usize) {
        let wide = r.len() >= 64;
        fb += u64::from(le16(r, 0xc))
            | if wide {
                u64::from(le16(r, 0x2c)) << 16
            } else {
                0
            };
        fi += u64::from(le16(r, 0xe))
            | if wide {
                u64::from(le16(r, 0x2e)) << 16
            } else {
                0
            };
    }
    put32(&mut sb.raw, 0x10, fi as u32);
    sb.set_free_blocks(fb);
    if sb.metadata_csum() {
        let c = sb_checksum(&sb.raw);
        put32(&mut sb.raw, 0x3fc, c);
    }
    dev.write_all_at(&sb.raw, SB_OFF)?;
    dev.flush()?;
    Ok(blocks.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_split() {
        assert_eq!(
            split_path("/etc/shadow").expect("split"),
            ("/etc".to_string(), b"shadow".to_vec())
        );
        assert_eq!(
            split_path("/x/").expect("split"),
            ("/".to_string(), b"x".to_vec())
        );
        assert!(split_path("/").is_err());
        assert!(split_path("rel").is_err());
        assert!(split_path("/a/..").is_err());
        assert_eq!(rec_len_of(1), 12);
        assert_eq!(rec_len_of(4), 12);
        assert_eq!(rec_len_of(5), 16);
    }
}
