//! The in-place editor: replace an existing regular file's content.
//!
//! Everything the edit touches is read and validated first (superblock, descriptors, the inode,
//! every extent tree block, every bitmap it allocates from or frees into); any failure returns
//! before the first write. The writes are then ordered so a crash at any point leaves at worst
//! leaked blocks, never a file pointing at free blocks:
//!
//! 1. mark the new blocks used (bitmaps, descriptors, superblock), flush;
//! 2. write the data and any new extent leaf blocks, flush;
//! 3. write the inode (size, blocks, extents, times, checksum), flush;
//! 4. free the old blocks (bitmaps, descriptors, superblock), flush.
//!
//! New blocks always come from blocks free *before* the edit, so the old content stays intact
//! until step 3 switches the inode over.

use crate::ondisk::*;
use crate::{Error, Result};
use std::collections::BTreeMap;
use vmdisk_block::BlockDevice;

/// Largest group descriptor table we read (64 MiB).
const MAX_GDT_BYTES: u64 = 64 << 20;
/// Most symbolic links followed while resolving a path (as Linux).
const MAX_SYMLINKS: usize = 40;
/// Longest path or symlink target we accept.
const MAX_PATH_LEN: usize = 4096;
/// Largest directory we scan during a lookup (1 GiB; bigger is not a real /etc).
const MAX_DIR_BYTES: u64 = 1 << 30;

/// What [`replace_file`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct EditReport {
    pub inode: u32,
    pub old_size: u64,
    pub new_size: u64,
    pub blocks_freed: u64,
    pub blocks_allocated: u64,
    /// Depth of the new extent tree (0: extents in the inode, 1: one level of leaf blocks).
    pub extent_depth: u16,
}

/// Replace the content of the existing regular file at `path` with `content`.
///
/// Owner, mode, links and extended attributes stay; size, blocks, extents, mtime and ctime
/// change. Refuses (writing nothing) a journal that needs recovery, an unclean filesystem,
/// features the editor does not handle, and anything that fails validation.
pub fn replace_file(dev: &dyn BlockDevice, path: &str, content: &[u8]) -> Result<EditReport> {
    let mut fs = EditFs::load(dev)?;
    let ino = fs.resolve(path)?;
    fs.replace(ino, path, content)
}

/// Per-group allocation state.
struct GroupState {
    /// Bitmap as read (or as initialised for a BLOCK_UNINIT group).
    orig: Vec<u8>,
    /// Bits newly allocated by this edit.
    alloc: Vec<u8>,
    /// Bits freed by this edit.
    freed: Vec<u8>,
    was_uninit: bool,
    n_alloc: u64,
    n_freed: u64,
}

fn bit(b: &[u8], i: u64) -> bool {
    b[(i / 8) as usize] & (1 << (i % 8)) != 0
}
fn set_bit(b: &mut [u8], i: u64) {
    b[(i / 8) as usize] |= 1 << (i % 8);
}

struct EditFs<'a> {
    dev: &'a dyn BlockDevice,
    sb: Superblock,
    gds: Vec<GroupDesc>,
    bs: u64,
    /// Sorted (start, len) ranges of filesystem metadata blocks never to be freed.
    meta: Vec<(u64, u64)>,
    groups: BTreeMap<u64, GroupState>,
}

impl<'a> EditFs<'a> {
    fn load(dev: &'a dyn BlockDevice) -> Result<Self> {
        if dev.len() < SB_OFF + SB_LEN as u64 {
            return Err(Error::NotExt4);
        }
        let mut raw = vec![0u8; SB_LEN];
        dev.read_exact_at(&mut raw, SB_OFF)?;
        let sb = Superblock::parse(&raw)?;
        crate::write::check_editable(&sb)?;
        let bs = sb.block_size;
        match sb.blocks_count.checked_mul(bs) {
            Some(end) if end <= dev.len() => {}
            _ => {
                return Err(Error::corrupt(
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
        for (g, raw) in gdt.chunks_exact(sb.desc_size as usize).enumerate() {
            gds.push(GroupDesc::parse(&sb, g as u64, raw)?);
        }
        let mut fs = EditFs {
            dev,
            sb,
            gds,
            bs,
            meta: Vec::new(),
            groups: BTreeMap::new(),
        };
        fs.meta = fs.metadata_ranges();
        Ok(fs)
    }

    fn gdt_blocks(&self) -> u64 {
        (self.sb.group_count * self.sb.desc_size).div_ceil(self.bs)
    }

    fn itable_blocks(&self) -> u64 {
        (self.sb.inodes_per_group * self.sb.inode_size).div_ceil(self.bs)
    }

    /// Superblock/GDT copies, bitmaps and inode tables, as sorted block ranges.
    fn metadata_ranges(&self) -> Vec<(u64, u64)> {
        let reserved_gdt = u64::from(le16(&self.sb.raw, 0xce));
        let mut v = Vec::new();
        for g in 0..self.sb.group_count {
            if group_has_super(&self.sb, g) {
                v.push((
                    self.sb.group_first_block(g),
                    1 + self.gdt_blocks() + reserved_gdt,
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
        // Ranges do not overlap on a valid filesystem; the few that start at or before `b`
        // nearest to it are the only candidates.
        let i = self.meta.partition_point(|&(s, _)| s <= b);
        self.meta[..i].iter().rev().take(8).any(|&(s, n)| b < s + n)
    }

    fn read_block(&self, blk: u64) -> Result<Vec<u8>> {
        if blk >= self.sb.blocks_count {
            return Err(Error::corrupt(
                format!("block {blk} is beyond the filesystem"),
                blk.saturating_mul(self.bs),
            ));
        }
        let mut b = vec![0u8; self.bs as usize];
        self.dev.read_exact_at(&mut b, blk * self.bs)?;
        Ok(b)
    }

    fn inode_off(&self, ino: u32) -> Result<u64> {
        let ino64 = u64::from(ino);
        if ino == 0 || ino64 > self.sb.inodes_count {
            return Err(Error::corrupt(
                format!("inode number {ino} out of range"),
                SB_OFF,
            ));
        }
        let g = (ino64 - 1) / self.sb.inodes_per_group;
        let idx = (ino64 - 1) % self.sb.inodes_per_group;
        let gd = &self.gds[g as usize];
        if self.sb.has_group_desc_csum() && gd.flags & BG_INODE_UNINIT != 0 {
            return Err(Error::corrupt(
                format!("inode {ino} is in group {g} whose inode table is uninitialised"),
                self.sb.gdt_off() + g * self.sb.desc_size,
            ));
        }
        Ok(gd.inode_table * self.bs + idx * self.sb.inode_size)
    }

    fn read_inode(&self, ino: u32) -> Result<(Vec<u8>, u64)> {
        let off = self.inode_off(ino)?;
        let mut raw = vec![0u8; self.sb.inode_size as usize];
        self.dev.read_exact_at(&mut raw, off)?;
        if raw.len() > 128 && 128 + u64::from(le16(&raw, 0x80)) > self.sb.inode_size {
            return Err(Error::corrupt(
                format!("inode {ino} i_extra_isize {}", le16(&raw, 0x80)),
                off + 0x80,
            ));
        }
        if let Some(seed) = self.sb.csum_seed {
            if !inode_checksum_ok(seed, ino, &raw) {
                return Err(Error::corrupt(
                    format!("inode {ino} checksum mismatch"),
                    off,
                ));
            }
        }
        Ok((raw, off))
    }

    /// All leaves (validated, sorted) and tree blocks of an extent-mapped inode.
    fn extents(&self, ino: u32, raw: &[u8], ioff: u64) -> Result<(Vec<Leaf>, Vec<u64>)> {
        let flags = le32(raw, 0x20);
        if flags & FL_EXTENTS == 0 {
            return Err(Error::unsupported(format!(
                "inode {ino} uses indirect block maps (ext2/ext3 style); only extent-mapped \
                 files are handled"
            )));
        }
        let root = &raw[0x28..0x28 + 60];
        let h = parse_extent_header(root, ioff + 0x28)?;
        let mut leaves = Vec::new();
        let mut tree = Vec::new();
        let seed = self
            .sb
            .csum_seed
            .map(|s| inode_seed(s, ino, le32(raw, 0x64)));
        self.walk_node(root, h, ioff + 0x28, seed, &mut leaves, &mut tree)?;
        // Validate the leaves as a whole: ordered, non-overlapping, inside the filesystem.
        let mut next_lblk = 0u64;
        for l in &leaves {
            let lstart = u64::from(l.lblk);
            if l.len == 0 || lstart < next_lblk {
                return Err(Error::corrupt(
                    format!(
                        "inode {ino}: extent at logical block {} (len {}) overlaps or is empty",
                        l.lblk, l.len
                    ),
                    ioff,
                ));
            }
            next_lblk = lstart + u64::from(l.len);
            if next_lblk > 1 << 32
                || l.pblk < self.sb.first_data_block
                || l.pblk + u64::from(l.len) > self.sb.blocks_count
            {
                return Err(Error::corrupt(
                    format!(
                        "inode {ino}: extent {}+{} -> block {} is outside the filesystem",
                        l.lblk, l.len, l.pblk
                    ),
                    ioff,
                ));
            }
        }
        Ok((leaves, tree))
    }

    fn walk_node(
        &self,
        node: &[u8],
        h: ExtentHeader,
        off: u64,
        seed: Option<u32>,
        leaves: &mut Vec<Leaf>,
        tree: &mut Vec<u64>,
    ) -> Result<()> {
        for i in 0..usize::from(h.entries) {
            let e = &node[12 + 12 * i..24 + 12 * i];
            if h.depth == 0 {
                if leaves.len() >= MAX_EXTENTS_PER_FILE {
                    return Err(Error::Limit {
                        what: "extents in one file",
                        needed: leaves.len() as u64 + 1,
                        limit: MAX_EXTENTS_PER_FILE as u64,
                    });
                }
                leaves.push(parse_leaf(e));
                continue;
            }
            let (_, child) = parse_index(e);
            if child < self.sb.first_data_block
                || child >= self.sb.blocks_count
                || tree.contains(&child)
                || tree.len() >= MAX_EXTENTS_PER_FILE
            {
                return Err(Error::corrupt(
                    format!("extent index points at block {child}"),
                    off,
                ));
            }
            tree.push(child);
            let blk = self.read_block(child)?;
            let coff = child * self.bs;
            let ch = parse_extent_header(&blk, coff)?;
            if ch.depth + 1 != h.depth {
                return Err(Error::corrupt(
                    format!("extent block depth {} under depth {}", ch.depth, h.depth),
                    coff,
                ));
            }
            if let Some(s) = seed {
                let t = extent_tail_off(ch);
                if t + 4 > blk.len() || crate::crc::crc32c_raw(s, &blk[..t]) != le32(&blk, t) {
                    return Err(Error::corrupt("extent block checksum mismatch", coff));
                }
            }
            self.walk_node(&blk, ch, coff, seed, leaves, tree)?;
        }
        Ok(())
    }

    fn file_size(raw: &[u8]) -> u64 {
        u64::from(le32(raw, 0x4)) | (u64::from(le32(raw, 0x6c)) << 32)
    }

    /// Find `name` in directory `dir` (linear scan; htree interior blocks look empty).
    fn dir_lookup(&self, dir: u32, path: &str, name: &[u8]) -> Result<Option<u32>> {
        let (raw, ioff) = self.read_inode(dir)?;
        if le16(&raw, 0) & S_IFMT != S_IFDIR {
            return Err(Error::NotADirectory {
                path: path.to_string(),
            });
        }
        let size = Self::file_size(&raw);
        if size > MAX_DIR_BYTES {
            return Err(Error::Limit {
                what: "directory size",
                needed: size,
                limit: MAX_DIR_BYTES,
            });
        }
        if le32(&raw, 0x20) & FL_INLINE_DATA != 0 {
            return Err(Error::unsupported("directories with inline_data"));
        }
        let (leaves, _) = self.extents(dir, &raw, ioff)?;
        for l in leaves.iter().filter(|l| !l.uninit) {
            for k in 0..u64::from(l.len) {
                if (u64::from(l.lblk) + k) * self.bs >= size {
                    break;
                }
                let b = l.pblk + k;
                let blk = self.read_block(b)?;
                let boff = b * self.bs;
                // A directory block whose checksum fails is damage the reader refuses too:
                // an edit found through it could not be read back.
                if let Some(seed) = self.sb.csum_seed {
                    let seed = inode_seed(seed, dir, le32(&raw, 0x64));
                    if !crate::volume::dir_block_csum_ok(seed, &blk, self.bs) {
                        return Err(Error::DirChecksum {
                            ino: dir,
                            off: boff,
                        });
                    }
                }
                let mut pos = 0usize;
                while pos + 8 <= blk.len() {
                    let inode = le32(&blk, pos);
                    let rec_len = usize::from(le16(&blk, pos + 4));
                    let name_len = usize::from(blk[pos + 6]);
                    if rec_len < 8
                        || rec_len & 3 != 0
                        || pos + rec_len > blk.len()
                        || 8 + name_len > rec_len
                    {
                        return Err(Error::corrupt(
                            format!("directory entry in inode {dir}: rec_len {rec_len}, name_len {name_len}"),
                            boff + pos as u64,
                        ));
                    }
                    if inode != 0 && &blk[pos + 8..pos + 8 + name_len] == name {
                        if u64::from(inode) > self.sb.inodes_count {
                            return Err(Error::corrupt(
                                format!("directory entry points at inode {inode}"),
                                boff + pos as u64,
                            ));
                        }
                        return Ok(Some(inode));
                    }
                    pos += rec_len;
                }
            }
        }
        Ok(None)
    }

    /// Target of a symlink inode.
    fn symlink_target(&self, ino: u32, raw: &[u8], ioff: u64) -> Result<Vec<u8>> {
        let size = Self::file_size(raw);
        if size as usize > MAX_PATH_LEN || size == 0 {
            return Err(Error::corrupt(
                format!("symlink inode {ino} size {size}"),
                ioff,
            ));
        }
        if size < 60 && le32(raw, 0x20) & FL_EXTENTS == 0 {
            return Ok(raw[0x28..0x28 + size as usize].to_vec());
        }
        let (leaves, _) = self.extents(ino, raw, ioff)?;
        let first = leaves
            .first()
            .filter(|l| l.lblk == 0 && !l.uninit)
            .ok_or_else(|| Error::corrupt(format!("symlink inode {ino} has no data"), ioff))?;
        let blk = self.read_block(first.pblk)?;
        Ok(blk[..(size as usize).min(blk.len())].to_vec())
    }

    /// Path to inode number, following symbolic links.
    fn resolve(&self, path: &str) -> Result<u32> {
        if !path.starts_with('/') || path.len() > MAX_PATH_LEN || path.contains('\0') {
            return Err(Error::BadPath {
                path: path.to_string(),
            });
        }
        let mut todo: std::collections::VecDeque<Vec<u8>> =
            path.split('/').map(|c| c.as_bytes().to_vec()).collect();
        let mut stack = vec![ROOT_INO];
        let mut links = 0usize;
        while let Some(c) = todo.pop_front() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let cur = *stack.last().unwrap_or(&ROOT_INO);
            let child = self
                .dir_lookup(cur, path, &c)?
                .ok_or_else(|| Error::NotFound {
                    path: path.to_string(),
                })?;
            let (raw, ioff) = self.read_inode(child)?;
            if le16(&raw, 0) & S_IFMT == S_IFLNK {
                links += 1;
                if links > MAX_SYMLINKS {
                    return Err(Error::TooManySymlinks {
                        path: path.to_string(),
                    });
                }
                let target = self.symlink_target(child, &raw, ioff)?;
                if target.first() == Some(&b'/') {
                    stack.truncate(1);
                }
                for comp in target.split(|&b| b == b'/').rev() {
                    todo.push_front(comp.to_vec());
                }
                continue;
            }
            stack.push(child);
        }
        Ok(*stack.last().unwrap_or(&ROOT_INO))
    }

    /// Bitmap of a BLOCK_UNINIT group, as the kernel would initialise it.
    fn init_bitmap(&self, g: u64) -> Vec<u8> {
        let mut bm = vec![0u8; self.bs as usize];
        let first = self.sb.group_first_block(g);
        let len = self.sb.group_len(g);
        for i in len..self.bs * 8 {
            set_bit(&mut bm, i);
        }
        for &(s, n) in &self.meta {
            let (lo, hi) = (s.max(first), (s + n).min(first + len));
            for b in lo..hi.max(lo) {
                set_bit(&mut bm, b - first);
            }
        }
        bm
    }

    /// Load (once) and validate the bitmap of group `g`; `None` when the group cannot be
    /// used for allocation (initialisation would not match its descriptor).
    fn group(&mut self, g: u64) -> Result<Option<&mut GroupState>> {
        if !self.groups.contains_key(&g) {
            let gd = &self.gds[g as usize];
            let gd_off = self.sb.gdt_off() + g * self.sb.desc_size;
            let uninit = self.sb.has_group_desc_csum() && gd.flags & BG_BLOCK_UNINIT != 0;
            let orig = if uninit {
                self.init_bitmap(g)
            } else {
                let bm = self.read_block(gd.block_bitmap)?;
                if let Some(seed) = self.sb.csum_seed {
                    let mut c = block_bitmap_checksum(&self.sb, seed, &bm);
                    if self.sb.desc_size < 64 {
                        c &= 0xffff;
                    }
                    if c != gd.block_bitmap_csum() {
                        return Err(Error::corrupt(
                            format!("block bitmap of group {g}: checksum mismatch"),
                            gd.block_bitmap * self.bs,
                        ));
                    }
                }
                bm
            };
            let len = self.sb.group_len(g);
            let free = (0..len).filter(|&i| !bit(&orig, i)).count() as u64;
            if free != gd.free_blocks {
                if uninit {
                    return Ok(None);
                }
                return Err(Error::corrupt(
                    format!(
                        "group {g}: descriptor says {} free blocks, bitmap has {free}",
                        gd.free_blocks
                    ),
                    gd_off,
                ));
            }
            let n = orig.len();
            self.groups.insert(
                g,
                GroupState {
                    orig,
                    alloc: vec![0; n],
                    freed: vec![0; n],
                    was_uninit: uninit,
                    n_alloc: 0,
                    n_freed: 0,
                },
            );
        }
        Ok(self.groups.get_mut(&g))
    }

    fn group_of(&self, b: u64) -> (u64, u64) {
        let rel = b - self.sb.first_data_block;
        (
            rel / self.sb.blocks_per_group,
            rel % self.sb.blocks_per_group,
        )
    }

    /// Mark block `b` to be freed, checking it is in use and not metadata.
    fn free_block(&mut self, b: u64) -> Result<()> {
        if b < self.sb.first_data_block || b >= self.sb.blocks_count || self.is_metadata(b) {
            return Err(Error::corrupt(
                format!("file claims block {b}, which is filesystem metadata or outside it"),
                b.saturating_mul(self.bs),
            ));
        }
        let (g, i) = self.group_of(b);
        let bs = self.bs;
        let st = self.group(g)?.ok_or_else(|| {
            Error::corrupt(format!("block {b} is in an uninitialised group"), b * bs)
        })?;
        if st.was_uninit || !bit(&st.orig, i) || bit(&st.freed, i) {
            return Err(Error::corrupt(
                format!("file block {b} is marked free in the bitmap, or used twice"),
                b * bs,
            ));
        }
        set_bit(&mut st.freed, i);
        st.n_freed += 1;
        Ok(())
    }

    /// Allocate `n` blocks from blocks free before the edit, near `goal_group`; runs in order.
    fn allocate(&mut self, n: u64, goal_group: u64) -> Result<Vec<(u64, u64)>> {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut left = n;
        let gc = self.sb.group_count;
        for k in 0..gc {
            if left == 0 {
                break;
            }
            let g = (goal_group + k) % gc;
            if self.gds[g as usize].free_blocks == 0 {
                continue;
            }
            let first = self.sb.group_first_block(g);
            let len = self.sb.group_len(g);
            let Some(st) = self.group(g)? else { continue };
            let mut i = 0;
            while i < len && left > 0 {
                if bit(&st.orig, i) || bit(&st.alloc, i) {
                    i += 1;
                    continue;
                }
                set_bit(&mut st.alloc, i);
                st.n_alloc += 1;
                left -= 1;
                let b = first + i;
                match runs.last_mut() {
                    Some((s, l)) if *s + *l == b => *l += 1,
                    _ => runs.push((b, 1)),
                }
                i += 1;
            }
        }
        if left > 0 {
            return Err(Error::NoSpace {
                needed: n,
                free: n - left,
            });
        }
        Ok(runs)
    }

    fn replace(&mut self, ino: u32, path: &str, content: &[u8]) -> Result<EditReport> {
        let first_ino = if le32(&self.sb.raw, 0x4c) == 0 {
            11
        } else {
            le32(&self.sb.raw, 0x54)
        };
        if ino < first_ino && ino != ROOT_INO {
            return Err(Error::unsupported(format!(
                "{path} is reserved inode {ino}; refusing to edit it"
            )));
        }
        let (mut raw, ioff) = self.read_inode(ino)?;
        let mode = le16(&raw, 0);
        if mode & S_IFMT != S_IFREG {
            return Err(if mode & S_IFMT == S_IFDIR {
                Error::IsADirectory {
                    path: path.to_string(),
                }
            } else {
                Error::NotARegularFile {
                    path: path.to_string(),
                }
            });
        }
        if le16(&raw, 0x1a) == 0 {
            return Err(Error::corrupt(format!("inode {ino} has no links"), ioff));
        }
        let flags = le32(&raw, 0x20);
        for (fl, what) in [
            (FL_INLINE_DATA, "inline_data files"),
            (FL_ENCRYPT, "encrypted files"),
            (FL_VERITY, "fs-verity files"),
            (FL_HUGE_FILE, "huge_file inodes counted in blocks"),
            (FL_IMMUTABLE, "immutable files (chattr -i first)"),
            (FL_APPEND, "append-only files (chattr -a first)"),
            (FL_EA_INODE, "extended-attribute inodes"),
        ] {
            if flags & fl != 0 {
                return Err(Error::unsupported(format!("{path}: editing {what}")));
            }
        }
        let bs = self.bs;
        let new_size = content.len() as u64;
        let n_data = new_size.div_ceil(bs);
        if n_data > u64::from(u32::MAX) || (new_size >= 1 << 31 && self.sb.ro_compat & 0x2 == 0) {
            return Err(Error::Limit {
                what: "new file size in bytes",
                needed: new_size,
                limit: if self.sb.ro_compat & 0x2 == 0 {
                    (1 << 31) - 1
                } else {
                    u64::from(u32::MAX) * bs
                },
            });
        }
        let (old_leaves, old_tree) = self.extents(ino, &raw, ioff)?;
        let old_size = Self::file_size(&raw);

        // Free list (validated against the bitmaps; nothing written yet).
        let mut old_blocks = 0u64;
        for l in &old_leaves {
            for k in 0..u64::from(l.len) {
                self.free_block(l.pblk + k)?;
            }
            old_blocks += u64::from(l.len);
        }
        for &t in &old_tree {
            self.free_block(t)?;
        }
        old_blocks += old_tree.len() as u64;

        // New layout.
        let goal = (u64::from(ino) - 1) / self.sb.inodes_per_group;
        let runs = self.allocate(n_data, goal)?;
        let mut extents: Vec<Leaf> = Vec::new();
        let mut lblk = 0u64;
        for &(start, len) in &runs {
            let mut done = 0;
            while done < len {
                let n = (len - done).min(u64::from(MAX_INIT_EXTENT_LEN));
                extents.push(Leaf {
                    lblk: lblk as u32,
                    len: n as u32,
                    pblk: start + done,
                    uninit: false,
                });
                lblk += n;
                done += n;
            }
        }
        let per_block = (bs as usize - 12) / 12;
        let mut root = vec![0u8; 60];
        let mut leaf_blocks: Vec<(u64, Vec<u8>)> = Vec::new();
        let depth: u16;
        if extents.len() <= 4 {
            depth = 0;
            write_extent_header(
                &mut root,
                ExtentHeader {
                    entries: extents.len() as u16,
                    max: 4,
                    depth: 0,
                },
            );
            for (i, e) in extents.iter().enumerate() {
                write_leaf(&mut root[12 + 12 * i..24 + 12 * i], e);
            }
        } else {
            let n_leaf = extents.len().div_ceil(per_block);
            if n_leaf > 4 {
                return Err(Error::unsupported(format!(
                    "the new content would need {} extents ({n_leaf} leaf blocks): free space \
                     is too fragmented for a depth-1 extent tree",
                    extents.len()
                )));
            }
            depth = 1;
            let lruns = self.allocate(n_leaf as u64, goal)?;
            let lblocks: Vec<u64> = lruns
                .iter()
                .flat_map(|&(s, n)| (s..s + n).collect::<Vec<_>>())
                .collect();
            write_extent_header(
                &mut root,
                ExtentHeader {
                    entries: n_leaf as u16,
                    max: 4,
                    depth: 1,
                },
            );
            let seed = self
                .sb
                .csum_seed
                .map(|s| inode_seed(s, ino, le32(&raw, 0x64)));
            for (i, (chunk, &pb)) in extents.chunks(per_block).zip(&lblocks).enumerate() {
                write_index(&mut root[12 + 12 * i..24 + 12 * i], chunk[0].lblk, pb);
                let mut blk = vec![0u8; bs as usize];
                let h = ExtentHeader {
                    entries: chunk.len() as u16,
                    max: per_block as u16,
                    depth: 0,
                };
                write_extent_header(&mut blk, h);
                for (j, e) in chunk.iter().enumerate() {
                    write_leaf(&mut blk[12 + 12 * j..24 + 12 * j], e);
                }
                if let Some(s) = seed {
                    let t = extent_tail_off(h);
                    let c = crate::crc::crc32c_raw(s, &blk[..t]);
                    put32(&mut blk, t, c);
                }
                leaf_blocks.push((pb, blk));
            }
        }
        let new_blocks = n_data + leaf_blocks.len() as u64;

        // i_blocks (512-byte units; huge_file keeps 16 more bits in osd2).
        let spb = bs / 512;
        let huge = self.sb.ro_compat & RO_COMPAT_HUGE_FILE != 0;
        let old_iblocks = u64::from(le32(&raw, 0x1c))
            | if huge {
                u64::from(le16(&raw, 0x74)) << 32
            } else {
                0
            };
        let rest = old_iblocks.checked_sub(old_blocks * spb).ok_or_else(|| {
            Error::corrupt(
                format!("inode {ino}: i_blocks {old_iblocks} below its {old_blocks} blocks"),
                ioff + 0x1c,
            )
        })?;
        let new_iblocks = rest + new_blocks * spb;
        let iblocks_limit = if huge {
            (1u64 << 48) - 1
        } else {
            u64::from(u32::MAX)
        };
        if new_iblocks > iblocks_limit {
            return Err(Error::Limit {
                what: "i_blocks",
                needed: new_iblocks,
                limit: iblocks_limit,
            });
        }

        // The new inode.
        put32(&mut raw, 0x4, new_size as u32);
        put32(&mut raw, 0x6c, (new_size >> 32) as u32);
        put32(&mut raw, 0x1c, new_iblocks as u32);
        if huge {
            put16(&mut raw, 0x74, (new_iblocks >> 32) as u16);
        }
        put32(&mut raw, 0x20, (flags | FL_EXTENTS) & !FL_EOFBLOCKS);
        raw[0x28..0x28 + 60].copy_from_slice(&root);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let secs = now.as_secs() as i64;
        let lo = secs as i32;
        let epoch = (((secs - i64::from(lo)) >> 32) & 3) as u32;
        let extra = (now.subsec_nanos() << 2) | epoch;
        put32(&mut raw, 0xc, lo as u32); // ctime
        put32(&mut raw, 0x10, lo as u32); // mtime
        let extra_end = 128 + usize::from(if raw.len() > 128 { le16(&raw, 0x80) } else { 0 });
        if raw.len() > 128 && extra_end >= 0x88 {
            put32(&mut raw, 0x84, extra);
        }
        if raw.len() > 128 && extra_end >= 0x8c {
            put32(&mut raw, 0x88, extra);
        }
        if let Some(seed) = self.sb.csum_seed {
            inode_set_checksum(seed, ino, &mut raw);
        }

        // ---- Everything validated and planned; now the ordered writes. ----
        let (n_alloc, n_freed) = self
            .groups
            .values()
            .fold((0, 0), |(a, f), s| (a + s.n_alloc, f + s.n_freed));
        if n_alloc != new_blocks || n_freed != old_blocks {
            return Err(Error::corrupt(
                "internal accounting mismatch; nothing written",
                ioff,
            ));
        }
        let free_after_alloc =
            self.sb.free_blocks.checked_sub(n_alloc).ok_or_else(|| {
                Error::corrupt("superblock free block count too low", SB_OFF + 0xc)
            })?;

        // 1. allocate
        self.write_groups(true)?;
        self.sb.set_free_blocks(free_after_alloc);
        self.dev.write_all_at(&self.sb.raw, SB_OFF)?;
        self.dev.flush()?;
        // 2. data and leaf blocks
        let mut lb = 0u64;
        for &(start, len) in &runs {
            let from = (lb * bs) as usize;
            let to = (((lb + len) * bs) as usize).min(content.len());
            let mut buf = content[from..to].to_vec();
            buf.resize((len * bs) as usize, 0);
            self.dev.write_all_at(&buf, start * bs)?;
            lb += len;
        }
        for (pb, blk) in &leaf_blocks {
            self.dev.write_all_at(blk, pb * bs)?;
        }
        self.dev.flush()?;
        // 3. switch the inode
        self.dev.write_all_at(&raw, ioff)?;
        self.dev.flush()?;
        // 4. free the old blocks
        self.write_groups(false)?;
        self.sb.set_free_blocks(free_after_alloc + n_freed);
        self.dev.write_all_at(&self.sb.raw, SB_OFF)?;
        self.dev.flush()?;
        Ok(EditReport {
            inode: ino,
            old_size,
            new_size,
            blocks_freed: n_freed,
            blocks_allocated: n_alloc,
            extent_depth: depth,
        })
    }

    /// Write bitmaps and descriptors of touched groups: allocation phase (`alloc`) or the
    /// freeing phase that follows it.
    fn write_groups(&mut self, alloc: bool) -> Result<()> {
        let groups: Vec<u64> = self.groups.keys().copied().collect();
        for g in groups {
            let st = &self.groups[&g];
            if (alloc && st.n_alloc == 0) || (!alloc && st.n_freed == 0) {
                continue;
            }
            // Bitmap after this phase: orig | alloc, then minus freed.
            let mut bm: Vec<u8> = st.orig.iter().zip(&st.alloc).map(|(a, b)| a | b).collect();
            if !alloc {
                for (x, f) in bm.iter_mut().zip(&st.freed) {
                    *x &= !f;
                }
            }
            let gd = &mut self.gds[g as usize];
            let free = if alloc {
                gd.free_blocks - st.n_alloc
            } else {
                gd.free_blocks + st.n_freed
            };
            gd.set_free_blocks(free);
            if st.was_uninit {
                gd.set_flags(gd.flags & !BG_BLOCK_UNINIT);
            }
            if let Some(seed) = self.sb.csum_seed {
                let c = block_bitmap_checksum(&self.sb, seed, &bm);
                gd.set_block_bitmap_csum(c);
            }
            gd.reseal(&self.sb, g);
            self.dev.write_all_at(&bm, gd.block_bitmap * self.bs)?;
            self.dev
                .write_all_at(&gd.raw, self.sb.gdt_off() + g * self.sb.desc_size)?;
        }
        Ok(())
    }
}
