//! Where everything of a FAT filesystem goes, and every metadata byte: pure, from a [`Tree`]
//! value. The IO (reading file data, writing the device) is the `fatwrite` module.

use crate::error::{Error, JsonPath, Result};
use crate::tree::{Kind, Node, Tree};

use super::geometry::{min_bytes, Geometry};
use super::names::{
    check_label, check_long_name, exact_short, generated_short, lfn_entries, short_entry,
    short_to_string, slots_for,
};
use super::{
    ATTR_ARCHIVE, ATTR_DIR, ATTR_VOLUME_ID, EOC, MAX_DIR_ENTRIES, MAX_FILE, MAX_SECTORS, NUM_FATS,
    SECTOR,
};

/// Entries (files + directories) copied into one FAT filesystem; bounds memory.
pub const MAX_ENTRIES: usize = 1_000_000;

/// Check that `tree` can be copied onto FAT: UTF-8 names valid as long FAT names and unique
/// ignoring case, only regular files (at most 4 GiB - 1) and directories.
pub fn check_tree(tree: &Tree, jp: &JsonPath) -> Result<()> {
    let too_large = |detail: String| Error::ContentTooLarge {
        path: jp.clone(),
        detail,
    };
    if tree.entries > MAX_ENTRIES {
        return Err(too_large(format!("more than {MAX_ENTRIES} files")));
    }
    fn check_dir(
        dir: &std::path::Path,
        nodes: &[Node],
        too_large: &dyn Fn(String) -> Error,
    ) -> Result<()> {
        let mut lower: Vec<(String, &str)> = Vec::with_capacity(nodes.len());
        for n in nodes {
            let name = n.name.to_str().ok_or_else(|| {
                too_large(format!(
                    "{}: file name {:?} is not UTF-8",
                    dir.display(),
                    n.name
                ))
            })?;
            check_long_name(name)
                .map_err(|rule| too_large(format!("{}: {rule}", n.src.display())))?;
            match &n.kind {
                Kind::Dir(c) => check_dir(&n.src, c, too_large)?,
                Kind::File if n.meta.len > MAX_FILE => {
                    return Err(too_large(format!(
                        "{} is larger than FAT's 4 GiB file limit",
                        n.src.display()
                    )))
                }
                Kind::File => {}
                _ => {
                    return Err(too_large(format!(
                        "{} is not a regular file or directory",
                        n.src.display()
                    )))
                }
            }
            let l = name.to_lowercase();
            if let Some((_, prev)) = lower.iter().find(|(p, _)| *p == l) {
                return Err(too_large(format!(
                    "{}: {prev:?} and {name:?} are the same name on FAT (case-insensitive)",
                    dir.display()
                )));
            }
            lower.push((l, name));
        }
        Ok(())
    }
    check_dir(&tree.dir, &tree.root, &too_large)
}

/// The name of a node already checked by [`check_tree`].
fn name(n: &Node) -> String {
    n.name.to_string_lossy().into_owned()
}

/// Allocation of the tree: each directory's and file's first cluster and cluster count.
struct Runs {
    /// (first cluster, clusters) per allocated object, in allocation order (ascending).
    runs: Vec<(u32, u32)>,
    next_free: u32,
}

/// A directory or file with its clusters.
pub struct Placed<'a> {
    pub node: Option<&'a Node>,
    pub first: u32,
    pub clusters: u32,
    pub children: Vec<Placed<'a>>,
}

fn dir_slots(children: &[Node], is_root: bool, has_label: bool) -> usize {
    let own = if is_root { usize::from(has_label) } else { 2 };
    own + children.iter().map(|c| slots_for(&name(c))).sum::<usize>()
}

fn place<'a>(
    g: &Geometry,
    nodes: &'a [Node],
    node: Option<&'a Node>,
    is_root: bool,
    has_label: bool,
    lay: &mut Runs,
) -> std::result::Result<Placed<'a>, String> {
    let cb = g.cluster_bytes();
    let alloc = |bytes: u64, lay: &mut Runs| -> std::result::Result<(u32, u32), String> {
        let n = bytes.div_ceil(cb);
        if n == 0 {
            return Ok((0, 0));
        }
        let first = u64::from(lay.next_free);
        if first - 2 + n > g.clusters {
            return Err(format!(
                "needs more than the {} clusters of {cb} bytes it has",
                g.clusters
            ));
        }
        // first + n <= clusters + 2 <= MAX_CLUSTERS + 2 < u32::MAX.
        lay.next_free = (first + n) as u32;
        lay.runs.push((first as u32, n as u32));
        Ok((first as u32, n as u32))
    };
    let slots = dir_slots(nodes, is_root, has_label);
    if slots > MAX_DIR_ENTRIES {
        return Err("a directory has too many entries for FAT".into());
    }
    let fixed_root = is_root && g.bits != 32;
    if fixed_root && slots as u64 > g.root_entries {
        return Err(format!(
            "the root directory needs {slots} entries; FAT{} has room for {}",
            g.bits, g.root_entries
        ));
    }
    let (first, clusters) = if fixed_root {
        (0, 0)
    } else {
        alloc((slots as u64 * 32).max(1), lay)?
    };
    let mut children = Vec::with_capacity(nodes.len());
    for c in nodes {
        match &c.kind {
            Kind::Dir(sub) => children.push(place(g, sub, Some(c), false, false, lay)?),
            _ => {
                let (f, n) = alloc(c.meta.len, lay)?;
                children.push(Placed {
                    node: Some(c),
                    first: f,
                    clusters: n,
                    children: Vec::new(),
                });
            }
        }
    }
    Ok(Placed {
        node,
        first,
        clusters,
        children,
    })
}

/// Smallest filesystem (whole MiB) that holds `tree` plus `margin` free bytes.
pub fn min_size(tree: Option<&Tree>, margin: u64, bits: Option<u8>) -> u64 {
    let nodes: &[Node] = tree.map(|t| t.root.as_slice()).unwrap_or(&[]);
    let mut size = min_bytes();
    for _ in 0..256 {
        if let Ok(g) = Geometry::mkfs(size, 0, bits) {
            let mut lay = Runs {
                runs: Vec::new(),
                next_free: 2,
            };
            if place(&g, nodes, None, true, true, &mut lay).is_ok() {
                let used = u64::from(lay.next_free - 2);
                let free = (g.clusters - used) * g.cluster_bytes();
                if free >= margin {
                    return size;
                }
                size += (margin - free).div_ceil(1 << 20) << 20;
                continue;
            }
        }
        size += (size / 8).max(1).div_ceil(1 << 20) << 20;
    }
    size
}

/// One FAT12/16/32 filesystem, fully planned: geometry, label, volume id and where every directory
/// and file goes. Checked before any write.
pub struct FatLayout<'a> {
    pub geometry: Geometry,
    label: Option<[u8; 11]>,
    volume_id: u32,
    pub root: Placed<'a>,
    lay: Runs,
}

impl<'a> FatLayout<'a> {
    /// Plan a filesystem of `bytes` at disk sector `hidden_sectors` holding `tree` (checked
    /// with [`check_tree`] first).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        bytes: u64,
        hidden_sectors: u64,
        bits: Option<u8>,
        label: Option<&str>,
        volume_id: u32,
        tree: Option<&'a Tree>,
        jp: &JsonPath,
    ) -> Result<FatLayout<'a>> {
        let g =
            Geometry::mkfs(bytes, hidden_sectors, bits).map_err(|rule| Error::invalid(jp, rule))?;
        let label = match label {
            Some(l) => {
                check_label(l).map_err(|rule| Error::invalid(jp, rule))?;
                let mut b = [b' '; 11];
                b[..l.len()].copy_from_slice(l.as_bytes());
                Some(b)
            }
            None => None,
        };
        if let Some(t) = tree {
            check_tree(t, jp)?;
        }
        let nodes: &[Node] = tree.map(|t| t.root.as_slice()).unwrap_or(&[]);
        let mut lay = Runs {
            runs: Vec::new(),
            next_free: 2,
        };
        let root = place(&g, nodes, None, true, label.is_some(), &mut lay).map_err(|detail| {
            Error::ContentTooLarge {
                path: jp.clone(),
                detail,
            }
        })?;
        Ok(FatLayout {
            geometry: g,
            label,
            volume_id,
            root,
            lay,
        })
    }

    /// The reserved sectors: boot sector (and on FAT32 FSInfo and their backups).
    pub fn reserved_sectors(&self) -> Vec<u8> {
        let g = &self.geometry;
        let mut reserved = vec![0u8; (g.reserved_sectors * SECTOR) as usize];
        let boot = self.boot_sector();
        reserved[..512].copy_from_slice(&boot);
        if g.bits == 32 {
            let info = self.fsinfo();
            reserved[512..1024].copy_from_slice(&info);
            reserved[6 * 512..7 * 512].copy_from_slice(&boot);
            reserved[7 * 512..8 * 512].copy_from_slice(&info);
        }
        reserved
    }

    /// Byte offset of FAT copy `copy` (0 or 1) and the length of one FAT.
    pub fn fat_at(&self, copy: u64) -> (u64, u64) {
        let g = &self.geometry;
        let fat_bytes = g.fat_sectors * SECTOR;
        (g.reserved_sectors * SECTOR + copy * fat_bytes, fat_bytes)
    }

    pub fn fat_copies(&self) -> u64 {
        NUM_FATS
    }

    fn boot_sector(&self) -> [u8; 512] {
        let g = &self.geometry;
        let mut b = [0u8; 512];
        let jump = if g.bits == 32 { 0x58 } else { 0x3C };
        b[0..3].copy_from_slice(&[0xEB, jump, 0x90]);
        b[3..11].copy_from_slice(b"mkfs.fat");
        b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
        b[13] = g.sectors_per_cluster as u8;
        b[14..16].copy_from_slice(&(g.reserved_sectors as u16).to_le_bytes());
        b[16] = NUM_FATS as u8;
        // root_entries <= 65535 and fat_sectors < 65536 on FAT12/16 (mkfs.fat's limits).
        b[17..19].copy_from_slice(&(g.root_entries as u16).to_le_bytes());
        if g.total_sectors < 65536 {
            b[19..21].copy_from_slice(&(g.total_sectors as u16).to_le_bytes());
        } else {
            b[32..36].copy_from_slice(&(g.total_sectors as u32).to_le_bytes());
        }
        b[21] = 0xF8;
        if g.bits != 32 {
            b[22..24].copy_from_slice(&(g.fat_sectors as u16).to_le_bytes());
        }
        b[24..26].copy_from_slice(&g.sectors_per_track.to_le_bytes());
        b[26..28].copy_from_slice(&g.heads.to_le_bytes());
        b[28..32].copy_from_slice(&(g.hidden_sectors.min(MAX_SECTORS) as u32).to_le_bytes());
        let label = self.label.as_ref().unwrap_or(b"NO NAME    ");
        let vi = if g.bits == 32 {
            b[36..40].copy_from_slice(&(g.fat_sectors as u32).to_le_bytes());
            b[44..48].copy_from_slice(&2u32.to_le_bytes());
            b[48..50].copy_from_slice(&1u16.to_le_bytes());
            b[50..52].copy_from_slice(&6u16.to_le_bytes());
            64
        } else {
            36
        };
        b[vi] = 0x80;
        b[vi + 2] = 0x29;
        b[vi + 3..vi + 7].copy_from_slice(&self.volume_id.to_le_bytes());
        b[vi + 7..vi + 18].copy_from_slice(label);
        let name: &[u8; 8] = match g.bits {
            12 => b"FAT12   ",
            16 => b"FAT16   ",
            _ => b"FAT32   ",
        };
        b[vi + 18..vi + 26].copy_from_slice(name);
        // Boot code: halt forever (this volume is not a legacy boot volume).
        b[vi + 26..vi + 29].copy_from_slice(&[0xF4, 0xEB, 0xFD]);
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn fsinfo(&self) -> [u8; 512] {
        let mut s = [0u8; 512];
        let used = u64::from(self.lay.next_free - 2);
        s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
        s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
        s[488..492].copy_from_slice(&((self.geometry.clusters - used) as u32).to_le_bytes());
        s[492..496].copy_from_slice(&self.lay.next_free.to_le_bytes());
        s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
        s
    }

    /// FAT entry for cluster `c` (masked to the FAT's width).
    pub fn fat_entry(&self, c: u64) -> u32 {
        let mask = match self.geometry.bits {
            12 => 0xFFF,
            16 => 0xFFFF,
            _ => 0x0FFF_FFFF,
        };
        let v = match c {
            0 => 0x0FFF_FFF8,
            1 => EOC,
            _ => {
                if c >= u64::from(self.lay.next_free) {
                    return 0;
                }
                // runs are ascending and cover 2..next_free without gaps.
                let i = self
                    .lay
                    .runs
                    .partition_point(|&(f, _)| u64::from(f) <= c)
                    .saturating_sub(1);
                // 2 <= c < next_free, so at least one run exists; partition_point - 1 picks
                // the run starting at or before c.
                let (f, n) = self.lay.runs[i];
                if c + 1 == u64::from(f) + u64::from(n) {
                    EOC
                } else {
                    (c + 1) as u32
                }
            }
        };
        v & mask
    }

    /// Bytes of the FAT from byte `off` into `buf`; false when they are all zero. For FAT12
    /// `off` must be 0 and `buf` the whole FAT (at most 6 KiB).
    pub fn fat_bytes(&self, off: u64, buf: &mut [u8]) -> bool {
        let mut any = false;
        match self.geometry.bits {
            12 => {
                buf.fill(0);
                let entries = (buf.len() as u64 * 2 / 3).min(self.geometry.clusters + 2);
                for c in 0..entries {
                    let v = self.fat_entry(c) as u16;
                    any |= v != 0;
                    let at = (c * 3 / 2) as usize;
                    if c % 2 == 0 {
                        buf[at] = v as u8;
                        buf[at + 1] = (buf[at + 1] & 0xF0) | ((v >> 8) as u8 & 0x0F);
                    } else {
                        buf[at] = (buf[at] & 0x0F) | ((v << 4) as u8);
                        buf[at + 1] = (v >> 4) as u8;
                    }
                }
            }
            16 => {
                for (i, e) in buf.chunks_exact_mut(2).enumerate() {
                    let v = self.fat_entry(off / 2 + i as u64) as u16;
                    any |= v != 0;
                    e.copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                for (i, e) in buf.chunks_exact_mut(4).enumerate() {
                    let v = self.fat_entry(off / 4 + i as u64);
                    any |= v != 0;
                    e.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
        any
    }

    /// The clusters of directory `d` (its entries, zero padded) and where they go.
    pub fn dir_bytes(&self, d: &Placed, is_root: bool, parent: u32) -> Result<(u64, Vec<u8>)> {
        let mut entries: Vec<[u8; 32]> = Vec::new();
        if is_root {
            if let Some(l) = &self.label {
                entries.push(short_entry(l, ATTR_VOLUME_ID, 0, 0));
            }
        } else {
            let mut dot = [b' '; 11];
            dot[0] = b'.';
            entries.push(short_entry(&dot, ATTR_DIR, d.first, 0));
            dot[1] = b'.';
            entries.push(short_entry(&dot, ATTR_DIR, parent, 0));
        }
        let mut taken: Vec<[u8; 11]> = Vec::new();
        // Exact 8.3 names first claim their short names, then generated ones avoid them.
        let exact: Vec<Option<[u8; 11]>> = d
            .children
            .iter()
            .map(|c| c.node.and_then(|n| exact_short(&name(n))))
            .collect();
        taken.extend(exact.iter().flatten());
        for (c, ex) in d.children.iter().zip(&exact) {
            let Some(node) = c.node else { continue };
            let long = name(node);
            let short = match ex {
                Some(s) => *s,
                None => generated_short(&long, &taken).ok_or_else(|| Error::ContentTooLarge {
                    path: JsonPath::root(),
                    detail: format!("no free short name for {long:?}"),
                })?,
            };
            if ex.is_none() {
                taken.push(short);
            }
            if short_to_string(&short) != long {
                entries.extend(lfn_entries(&long, &short));
            }
            let (attr, size) = match &node.kind {
                Kind::Dir(_) => (ATTR_DIR, 0),
                // len <= MAX_FILE (check_tree).
                _ => (ATTR_ARCHIVE, node.meta.len as u32),
            };
            entries.push(short_entry(&short, attr, c.first, size));
        }
        let g = &self.geometry;
        let (at, len) = if is_root && g.bits != 32 {
            (g.root_dir_off(), g.root_dir_sectors() * SECTOR)
        } else {
            (
                g.cluster_off(d.first),
                u64::from(d.clusters) * g.cluster_bytes(),
            )
        };
        // len is a directory's clusters or the fixed root: bounded by MAX_DIR_ENTRIES * 32.
        let mut bytes = vec![0u8; len as usize];
        for (i, e) in entries.iter().enumerate() {
            bytes[i * 32..i * 32 + 32].copy_from_slice(e);
        }
        Ok((at, bytes))
    }

    /// Where file data of `c` goes and how many bytes are allocated for it.
    pub fn file_at(&self, c: &Placed) -> (u64, u64) {
        (
            self.geometry.cluster_off(c.first),
            u64::from(c.clusters) * self.geometry.cluster_bytes(),
        )
    }
}
