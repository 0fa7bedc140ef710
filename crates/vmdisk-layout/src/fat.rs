//! A small deterministic FAT32 writer: format plus copy-in of a directory tree, with 8.3 and
//! long-name (LFN) entries, `.`/`..` as fsck.vfat expects, fixed timestamps.
//!
//! ```text
//! sector 0        boot sector (BPB, FAT32 EBPB, 0x55AA)
//! sector 1        FSInfo (free count, next free)
//! sector 6, 7     backup boot sector, backup FSInfo
//! 32 ..           FAT #1, FAT #2 (28-bit entries; 0/1 reserved, root dir at cluster 2)
//! data            clusters 2.. : root dir, then each directory before its children, files
//!                 contiguous in name order
//! ```

use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use vmdisk_block::BlockDevice;

use crate::error::{Error, JsonPath, Result};

/// Bytes per sector of the filesystems we write.
const SECTOR: u64 = 512;
/// Reserved sectors before the first FAT (what mkfs.fat uses for FAT32).
const RESERVED_SECTORS: u64 = 32;
const NUM_FATS: u64 = 2;
/// FAT32 needs at least this many clusters (fewer would make it FAT16 by definition).
pub const MIN_CLUSTERS: u64 = 65525;
/// Largest cluster number FAT32 can address (0x0FFFFFF6 and up are reserved).
const MAX_CLUSTERS: u64 = 0x0FFF_FFF5 - 2;
/// FAT32 counts sectors in 32 bits.
const MAX_SECTORS: u64 = u32::MAX as u64;
/// Entries (files + directories) copied into one FAT filesystem; bounds memory.
pub const MAX_ENTRIES: usize = 1_000_000;
/// Directory nesting depth followed when scanning (also stops symlink loops).
pub const MAX_DEPTH: usize = 64;
/// FAT32 files are at most 4 GiB - 1.
const MAX_FILE: u64 = u32::MAX as u64;
/// A directory holds at most 65536 32-byte entries.
const MAX_DIR_ENTRIES: usize = 65536;
/// Chunk size for writing FATs and copying file data.
const CHUNK: usize = 1 << 20;
/// 1980-01-01 00:00:00, the FAT epoch: every timestamp we write.
const FAT_DATE: u16 = (1 << 5) | 1;
const FAT_TIME: u16 = 0;
const EOC: u32 = 0x0FFF_FFFF;

const ATTR_DIR: u8 = 0x10;
const ATTR_ARCHIVE: u8 = 0x20;
const ATTR_VOLUME_ID: u8 = 0x08;
const ATTR_LFN: u8 = 0x0F;

/// Layout of a FAT32 filesystem of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    pub total_sectors: u64,
    pub sectors_per_cluster: u64,
    pub fat_sectors: u64,
    pub clusters: u64,
    /// Sectors before the filesystem on the disk (BPB "hidden sectors").
    pub hidden_sectors: u64,
}

impl Geometry {
    /// Geometry for `bytes` (whole sectors used), cluster size by Microsoft's FAT32 table.
    pub fn for_size(bytes: u64, hidden_sectors: u64) -> std::result::Result<Geometry, String> {
        let total = (bytes / SECTOR).min(MAX_SECTORS);
        let spc = match total * SECTOR {
            b if b <= 260 << 20 => 1,
            b if b <= 8 << 30 => 8,
            b if b <= 16 << 30 => 16,
            b if b <= 32 << 30 => 32,
            _ => 64,
        };
        Self::with_cluster(total, spc, hidden_sectors)
    }

    fn with_cluster(total: u64, spc: u64, hidden: u64) -> std::result::Result<Geometry, String> {
        let min = min_bytes_for(spc);
        if total <= RESERVED_SECTORS + 2 {
            return Err(format!("too small for FAT32 (needs at least {min} bytes)"));
        }
        let avail = total - RESERVED_SECTORS;
        // Upper bound on clusters gives a FAT that is large enough (maybe by a sector).
        let fat_sectors = (avail / spc + 2).saturating_mul(4).div_ceil(SECTOR);
        let data = avail.saturating_sub(NUM_FATS * fat_sectors);
        let clusters = (data / spc).min(MAX_CLUSTERS);
        if clusters < MIN_CLUSTERS {
            return Err(format!("too small for FAT32 (needs at least {min} bytes)"));
        }
        Ok(Geometry {
            total_sectors: total,
            sectors_per_cluster: spc,
            fat_sectors,
            clusters,
            hidden_sectors: hidden,
        })
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.sectors_per_cluster * SECTOR
    }

    fn data_start(&self) -> u64 {
        (RESERVED_SECTORS + NUM_FATS * self.fat_sectors) * SECTOR
    }

    fn cluster_off(&self, c: u32) -> u64 {
        self.data_start() + (u64::from(c) - 2) * self.cluster_bytes()
    }
}

/// Smallest filesystem with `spc` sectors per cluster that is still FAT32.
fn min_bytes_for(spc: u64) -> u64 {
    let fat = (MIN_CLUSTERS + 2) * 4;
    (RESERVED_SECTORS * SECTOR
        + NUM_FATS * fat.div_ceil(SECTOR) * SECTOR
        + MIN_CLUSTERS * spc * SECTOR)
        .div_ceil(1 << 20)
        * (1 << 20)
}

/// Check a volume label the way mkfs.fat would accept it.
pub fn check_label(l: &str) -> std::result::Result<(), String> {
    if l.is_empty() || l.len() > 11 {
        return Err("a FAT label has 1 to 11 characters".into());
    }
    if !l
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && !b"\"*+,./:;<=>?[\\]|".contains(&b))
    {
        return Err(format!("FAT label {l:?} has characters FAT does not allow"));
    }
    Ok(())
}

/// A directory tree to copy in, scanned up front so every error comes before a write.
#[derive(Debug, Clone)]
pub struct Tree {
    root: Vec<Node>,
}

#[derive(Debug, Clone)]
struct Node {
    name: String,
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    File { src: PathBuf, size: u64 },
    Dir(Vec<Node>),
}

impl Tree {
    /// Scan `dir` (symlinks followed; names must be valid long FAT names, unique ignoring case).
    pub fn scan(dir: &Path, json_path: &JsonPath) -> Result<Tree> {
        let mut count = 0;
        let root = scan_dir(dir, json_path, 0, &mut count)?;
        Ok(Tree { root })
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::ReadingSource {
        path: path.to_owned(),
        source,
    }
}

fn scan_dir(dir: &Path, jp: &JsonPath, depth: usize, count: &mut usize) -> Result<Vec<Node>> {
    let too_large = |detail: String| Error::ContentTooLarge {
        path: jp.clone(),
        detail,
    };
    if depth > MAX_DEPTH {
        return Err(too_large(format!(
            "{} is nested deeper than {MAX_DEPTH} directories (a symlink loop?)",
            dir.display()
        )));
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir))? {
        let entry = entry.map_err(io_err(dir))?;
        let path = entry.path();
        let name = entry
            .file_name()
            .into_string()
            .map_err(|n| too_large(format!("{}: file name {n:?} is not UTF-8", dir.display())))?;
        check_long_name(&name).map_err(|rule| too_large(format!("{}: {rule}", path.display())))?;
        let meta = fs::metadata(&path).map_err(io_err(&path))?;
        *count += 1;
        if *count > MAX_ENTRIES {
            return Err(too_large(format!("more than {MAX_ENTRIES} files")));
        }
        let kind = if meta.is_dir() {
            Kind::Dir(scan_dir(&path, jp, depth + 1, count)?)
        } else if meta.is_file() {
            if meta.len() > MAX_FILE {
                return Err(too_large(format!(
                    "{} is larger than FAT's 4 GiB file limit",
                    path.display()
                )));
            }
            Kind::File {
                src: path.clone(),
                size: meta.len(),
            }
        } else {
            return Err(too_large(format!(
                "{} is not a regular file or directory",
                path.display()
            )));
        };
        out.push(Node { name, kind });
    }
    out.sort_by(|a, b| a.name.as_bytes().cmp(b.name.as_bytes()));
    for (i, n) in out.iter().enumerate() {
        if let Some(prev) = out[..i]
            .iter()
            .find(|p| p.name.to_lowercase() == n.name.to_lowercase())
        {
            return Err(too_large(format!(
                "{}: {:?} and {:?} are the same name on FAT (case-insensitive)",
                dir.display(),
                prev.name,
                n.name
            )));
        }
    }
    Ok(out)
}

fn check_long_name(name: &str) -> std::result::Result<(), String> {
    if name.encode_utf16().count() > 255 {
        return Err("name longer than 255 UTF-16 units".into());
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err("FAT names cannot end with '.' or ' '".into());
    }
    if name
        .chars()
        .any(|c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c))
    {
        return Err("name has characters FAT does not allow".into());
    }
    Ok(())
}

/// Valid characters of a short (8.3) name besides A-Z and 0-9.
const SHORT_SPECIAL: &[u8] = b"!#$%&'()-@^_`{}~";

fn short_char_ok(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || SHORT_SPECIAL.contains(&b)
}

/// The 8.3 form of `name` when it is exactly representable after upper-casing.
fn exact_short(name: &str) -> Option<[u8; 11]> {
    let upper = name.to_ascii_uppercase();
    if !upper.is_ascii() || upper.starts_with('.') {
        return None;
    }
    let (base, ext) = match upper.rfind('.') {
        Some(i) => (&upper[..i], &upper[i + 1..]),
        None => (upper.as_str(), ""),
    };
    if base.is_empty() || base.len() > 8 || ext.len() > 3 {
        return None;
    }
    if !base.bytes().chain(ext.bytes()).all(short_char_ok) {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// Generate the `BASE~N.EXT` short name for `name`, unique among `taken`.
fn generated_short(name: &str, taken: &[[u8; 11]]) -> Option<[u8; 11]> {
    let clean = |s: &str| -> Vec<u8> {
        s.chars()
            .filter(|&c| c != ' ' && c != '.')
            .map(|c| {
                let u = c.to_ascii_uppercase();
                if u.is_ascii() && short_char_ok(u as u8) {
                    u as u8
                } else {
                    b'_'
                }
            })
            .collect()
    };
    let trimmed = name.trim_start_matches('.');
    let (base, ext) = match trimmed.rfind('.') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (trimmed, ""),
    };
    let mut base = clean(base);
    if base.is_empty() {
        base.push(b'_');
    }
    let ext: Vec<u8> = clean(ext).into_iter().take(3).collect();
    for n in 1..1_000_000u32 {
        let tail = format!("~{n}");
        let keep = (8 - tail.len()).min(base.len());
        let mut out = [b' '; 11];
        out[..keep].copy_from_slice(&base[..keep]);
        out[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
        out[8..8 + ext.len()].copy_from_slice(&ext);
        if !taken.contains(&out) {
            return Some(out);
        }
    }
    None
}

fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &b| {
        (sum >> 1).wrapping_add(sum << 7).wrapping_add(b)
    })
}

fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    e[14..16].copy_from_slice(&FAT_TIME.to_le_bytes());
    e[16..18].copy_from_slice(&FAT_DATE.to_le_bytes());
    e[18..20].copy_from_slice(&FAT_DATE.to_le_bytes());
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&FAT_TIME.to_le_bytes());
    e[24..26].copy_from_slice(&FAT_DATE.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// LFN slots for `name`, in on-disk order (last slot first).
fn lfn_entries(name: &str, short: &[u8; 11]) -> Vec<[u8; 32]> {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    if units.len() % 13 != 0 {
        units.push(0);
        while units.len() % 13 != 0 {
            units.push(0xFFFF);
        }
    }
    let sum = lfn_checksum(short);
    let n = units.len() / 13;
    let mut out = Vec::with_capacity(n);
    for i in (0..n).rev() {
        let chunk = &units[i * 13..i * 13 + 13];
        let mut e = [0u8; 32];
        e[0] = (i as u8 + 1) | if i == n - 1 { 0x40 } else { 0 };
        e[11] = ATTR_LFN;
        e[13] = sum;
        let offs = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        for (u, &o) in chunk.iter().zip(offs.iter()) {
            e[o..o + 2].copy_from_slice(&u.to_le_bytes());
        }
        out.push(e);
    }
    out
}

/// Entry slots a child takes (LFN slots + 1), upper bound used before names are assigned.
fn slots_for(name: &str) -> usize {
    if exact_short(name).is_some_and(|s| short_to_string(&s) == name) {
        1
    } else {
        name.encode_utf16().count().div_ceil(13) + 1
    }
}

fn short_to_string(s: &[u8; 11]) -> String {
    let base = String::from_utf8_lossy(&s[..8]).trim_end().to_string();
    let ext = String::from_utf8_lossy(&s[8..]).trim_end().to_string();
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}

/// Allocation of the tree: each directory's and file's first cluster and cluster count.
struct Layout {
    /// (first cluster, clusters) per allocated object, in allocation order (ascending).
    runs: Vec<(u32, u32)>,
    next_free: u32,
}

struct Placed<'a> {
    node: Option<&'a Node>,
    first: u32,
    clusters: u32,
    children: Vec<Placed<'a>>,
}

fn dir_slots(children: &[Node], is_root: bool, has_label: bool) -> usize {
    let own = if is_root { usize::from(has_label) } else { 2 };
    own + children.iter().map(|c| slots_for(&c.name)).sum::<usize>()
}

fn place<'a>(
    g: &Geometry,
    nodes: &'a [Node],
    node: Option<&'a Node>,
    is_root: bool,
    has_label: bool,
    lay: &mut Layout,
) -> std::result::Result<Placed<'a>, String> {
    let cb = g.cluster_bytes();
    let alloc = |bytes: u64, lay: &mut Layout| -> std::result::Result<(u32, u32), String> {
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
    let (first, clusters) = alloc((slots as u64 * 32).max(1), lay)?;
    let mut children = Vec::with_capacity(nodes.len());
    for c in nodes {
        match &c.kind {
            Kind::File { size, .. } => {
                let (f, n) = alloc(*size, lay)?;
                children.push(Placed {
                    node: Some(c),
                    first: f,
                    clusters: n,
                    children: Vec::new(),
                });
            }
            Kind::Dir(sub) => children.push(place(g, sub, Some(c), false, false, lay)?),
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
pub fn min_size(tree: Option<&Tree>, margin: u64) -> u64 {
    let empty = Vec::new();
    let nodes = tree.map(|t| &t.root).unwrap_or(&empty);
    let mut size = min_bytes_for(1);
    for _ in 0..256 {
        if let Ok(g) = Geometry::for_size(size, 0) {
            let mut lay = Layout {
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
        size += (size / 8).div_ceil(1 << 20) << 20;
    }
    size
}

/// Everything needed to write one FAT32 filesystem, checked before any write.
pub struct FatImage<'a> {
    g: Geometry,
    label: Option<[u8; 11]>,
    volume_id: u32,
    root: Placed<'a>,
    lay: Layout,
}

impl<'a> FatImage<'a> {
    /// Plan a filesystem of `bytes` at disk sector `hidden_sectors` holding `tree`.
    pub fn new(
        bytes: u64,
        hidden_sectors: u64,
        label: Option<&str>,
        volume_id: u32,
        tree: Option<&'a Tree>,
        jp: &JsonPath,
    ) -> Result<FatImage<'a>> {
        let g =
            Geometry::for_size(bytes, hidden_sectors).map_err(|rule| Error::invalid(jp, rule))?;
        let label = match label {
            Some(l) => {
                check_label(l).map_err(|rule| Error::invalid(jp, rule))?;
                let mut b = [b' '; 11];
                b[..l.len()].copy_from_slice(l.as_bytes());
                Some(b)
            }
            None => None,
        };
        static EMPTY: Vec<Node> = Vec::new();
        let nodes = tree.map(|t| &t.root).unwrap_or(&EMPTY);
        let mut lay = Layout {
            runs: Vec::new(),
            next_free: 2,
        };
        let root = place(&g, nodes, None, true, label.is_some(), &mut lay).map_err(|detail| {
            Error::ContentTooLarge {
                path: jp.clone(),
                detail,
            }
        })?;
        Ok(FatImage {
            g,
            label,
            volume_id,
            root,
            lay,
        })
    }

    fn boot_sector(&self) -> [u8; 512] {
        let g = &self.g;
        let mut b = [0u8; 512];
        b[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
        b[3..11].copy_from_slice(b"VMDISK  ");
        b[11..13].copy_from_slice(&(SECTOR as u16).to_le_bytes());
        b[13] = g.sectors_per_cluster as u8;
        b[14..16].copy_from_slice(&(RESERVED_SECTORS as u16).to_le_bytes());
        b[16] = NUM_FATS as u8;
        b[21] = 0xF8;
        b[24..26].copy_from_slice(&63u16.to_le_bytes());
        b[26..28].copy_from_slice(&255u16.to_le_bytes());
        b[28..32].copy_from_slice(&(g.hidden_sectors.min(MAX_SECTORS) as u32).to_le_bytes());
        b[32..36].copy_from_slice(&(g.total_sectors as u32).to_le_bytes());
        b[36..40].copy_from_slice(&(g.fat_sectors as u32).to_le_bytes());
        b[44..48].copy_from_slice(&2u32.to_le_bytes());
        b[48..50].copy_from_slice(&1u16.to_le_bytes());
        b[50..52].copy_from_slice(&6u16.to_le_bytes());
        b[64] = 0x80;
        b[66] = 0x29;
        b[67..71].copy_from_slice(&self.volume_id.to_le_bytes());
        b[71..82].copy_from_slice(self.label.as_ref().unwrap_or(b"NO NAME    "));
        b[82..90].copy_from_slice(b"FAT32   ");
        // Boot code: halt forever (this volume is not a legacy boot volume).
        b[90..93].copy_from_slice(&[0xF4, 0xEB, 0xFD]);
        b[510] = 0x55;
        b[511] = 0xAA;
        b
    }

    fn fsinfo(&self) -> [u8; 512] {
        let mut s = [0u8; 512];
        let used = u64::from(self.lay.next_free - 2);
        s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
        s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
        s[488..492].copy_from_slice(&((self.g.clusters - used) as u32).to_le_bytes());
        s[492..496].copy_from_slice(&self.lay.next_free.to_le_bytes());
        s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
        s
    }

    /// FAT entry for cluster `c`.
    fn fat_entry(&self, c: u64) -> u32 {
        match c {
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
                // 2 <= c < next_free, so the root directory's run exists and runs is not
                // empty; partition_point - 1 picks the run starting at or before c.
                let (f, n) = self.lay.runs[i];
                if c + 1 == u64::from(f) + u64::from(n) {
                    EOC
                } else {
                    (c + 1) as u32
                }
            }
        }
    }

    /// Write the filesystem to `dev` (the partition), reading file data from the tree.
    pub fn write(&self, dev: &dyn BlockDevice) -> Result<()> {
        let mut reserved = vec![0u8; (RESERVED_SECTORS * SECTOR) as usize];
        let boot = self.boot_sector();
        let info = self.fsinfo();
        reserved[..512].copy_from_slice(&boot);
        reserved[512..1024].copy_from_slice(&info);
        reserved[6 * 512..7 * 512].copy_from_slice(&boot);
        reserved[7 * 512..8 * 512].copy_from_slice(&info);
        dev.write_all_at(&reserved, 0)?;
        // FATs, generated chunk by chunk.
        let fat_bytes = self.g.fat_sectors * SECTOR;
        let mut buf = vec![0u8; CHUNK];
        let mut off = 0u64;
        while off < fat_bytes {
            let n = (fat_bytes - off).min(CHUNK as u64) as usize;
            let first_entry = off / 4;
            let mut any = false;
            for (i, e) in buf[..n].chunks_exact_mut(4).enumerate() {
                let v = self.fat_entry(first_entry + i as u64);
                any |= v != 0;
                e.copy_from_slice(&v.to_le_bytes());
            }
            for copy in 0..NUM_FATS {
                let at = RESERVED_SECTORS * SECTOR + copy * fat_bytes + off;
                if any {
                    dev.write_all_at(&buf[..n], at)?;
                } else {
                    crate::apply::zero_range(dev, at, n as u64)?;
                }
            }
            off += n as u64;
        }
        self.write_dir(dev, &self.root, true, 0)?;
        Ok(())
    }

    fn write_dir(
        &self,
        dev: &dyn BlockDevice,
        d: &Placed,
        is_root: bool,
        parent: u32,
    ) -> Result<()> {
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
            .map(|c| c.node.and_then(|n| exact_short(&n.name)))
            .collect();
        taken.extend(exact.iter().flatten());
        for (c, ex) in d.children.iter().zip(&exact) {
            let Some(node) = c.node else { continue };
            let short = match ex {
                Some(s) => *s,
                None => {
                    generated_short(&node.name, &taken).ok_or_else(|| Error::ContentTooLarge {
                        path: JsonPath::root(),
                        detail: format!("no free short name for {:?}", node.name),
                    })?
                }
            };
            if ex.is_none() {
                taken.push(short);
            }
            if short_to_string(&short) != node.name {
                entries.extend(lfn_entries(&node.name, &short));
            }
            let (attr, size) = match &node.kind {
                Kind::Dir(_) => (ATTR_DIR, 0),
                // size <= MAX_FILE (checked when scanning).
                Kind::File { size, .. } => (ATTR_ARCHIVE, *size as u32),
            };
            entries.push(short_entry(&short, attr, c.first, size));
        }
        let cb = self.g.cluster_bytes() as usize;
        let mut bytes = vec![0u8; d.clusters as usize * cb];
        for (i, e) in entries.iter().enumerate() {
            bytes[i * 32..i * 32 + 32].copy_from_slice(e);
        }
        dev.write_all_at(&bytes, self.g.cluster_off(d.first))?;
        let me = if is_root { 0 } else { d.first };
        for c in &d.children {
            let Some(node) = c.node else { continue };
            match &node.kind {
                Kind::Dir(_) => self.write_dir(dev, c, false, me)?,
                Kind::File { src, size } => self.write_file(dev, c, src, *size)?,
            }
        }
        Ok(())
    }

    fn write_file(&self, dev: &dyn BlockDevice, c: &Placed, src: &Path, size: u64) -> Result<()> {
        if c.clusters == 0 {
            return Ok(());
        }
        let mut f = fs::File::open(src).map_err(io_err(src))?;
        let mut off = self.g.cluster_off(c.first);
        let alloc = u64::from(c.clusters) * self.g.cluster_bytes();
        let mut left = alloc;
        let mut data_left = size;
        let mut buf = vec![0u8; CHUNK];
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            let d = data_left.min(n as u64) as usize;
            f.read_exact(&mut buf[..d]).map_err(io_err(src))?;
            buf[d..n].fill(0);
            dev.write_all_at(&buf[..n], off)?;
            off += n as u64;
            left -= n as u64;
            data_left -= d as u64;
        }
        // The file must not have grown since it was scanned.
        let mut probe = [0u8; 1];
        if f.read(&mut probe).map_err(io_err(src))? != 0 {
            return Err(Error::ReadingSource {
                path: src.to_owned(),
                source: std::io::Error::other("file changed while being copied"),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_limits() {
        assert!(Geometry::for_size(16 << 20, 0).is_err());
        let g = Geometry::for_size(512 << 20, 2048).unwrap();
        assert_eq!(g.sectors_per_cluster, 8);
        assert!(g.clusters >= MIN_CLUSTERS);
        assert!((g.clusters + 2) * 4 <= g.fat_sectors * SECTOR);
        let m = min_bytes_for(1);
        assert!(Geometry::for_size(m, 0).is_ok(), "{m}");
    }

    #[test]
    fn short_names() {
        assert_eq!(&exact_short("EFI").unwrap(), b"EFI        ");
        assert_eq!(&exact_short("bootx64.efi").unwrap(), b"BOOTX64 EFI");
        assert!(exact_short("loader.conf.d").is_none());
        assert!(exact_short("verylongname").is_none());
        let g = generated_short("verylongname.conf", &[]).unwrap();
        assert_eq!(&g, b"VERYLO~1CON");
        let g2 = generated_short("verylongname.conf", &[g]).unwrap();
        assert_eq!(&g2, b"VERYLO~2CON");
        assert_eq!(&generated_short(".hidden", &[]).unwrap(), b"HIDDEN~1   ");
        assert_eq!(&generated_short("ünï côde", &[]).unwrap(), b"_N_C_D~1   ");
    }

    #[test]
    fn lfn_layout() {
        let short = *b"VERYLO~1CON";
        let e = lfn_entries("verylongname.conf", &short);
        assert_eq!(e.len(), 2);
        assert_eq!(e[0][0], 0x42);
        assert_eq!(e[1][0], 0x01);
        assert_eq!(e[1][1], b'v');
        assert!(e
            .iter()
            .all(|x| x[11] == ATTR_LFN && x[13] == lfn_checksum(&short)));
    }

    #[test]
    fn labels() {
        assert!(check_label("ESP").is_ok());
        assert!(check_label("").is_err());
        assert!(check_label("TWELVE_CHARS").is_err());
        assert!(check_label("A/B").is_err());
    }
}
