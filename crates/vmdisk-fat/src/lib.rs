//! Read FAT12, FAT16 and FAT32 filesystems — EFI system partitions (`/boot` of systemd-boot:
//! loader entries, kernels) — on any [`BlockDevice`], long file names included. Read-only.
//!
//! ```text
//!  sector 0: boot sector / BPB: bytes per sector, sectors per cluster, reserved sectors,
//!            number of FATs, root entries (12/16), total sectors, sectors per FAT, (32: root
//!            cluster, ext flags)
//!  reserved │ FAT #0 │ FAT #1 … │ root directory (FAT12/16 only) │ data: clusters 2, 3, …
//!  FAT entry n: next cluster of n (12, 16 or 28 bits), >= 0xff8-style values end a chain
//!  directory entry (32 bytes): 8.3 name, attributes, case flags, times, first cluster, size;
//!  long names precede it as entries with attribute 0x0f: 13 UTF-16 units each, last first,
//!  carrying the checksum of the 8.3 name.
//! ```
//!
//! The type is decided by the cluster count, as the specification says (below 4085 FAT12,
//! below 65525 FAT16, else FAT32). Every size read from the image is checked against the
//! geometry; cluster chains are bounded by the cluster count (a loop is an error).
//!
//! Errors ([`Error`]): not FAT at all, corrupt structures (with the byte offset), lookups,
//! named limits, block-device IO.

use std::sync::Arc;
use vmdisk_block::BlockDevice;

/// Most clusters a FAT32 may have (28-bit entries less the reserved values).
pub const MAX_CLUSTERS: u64 = 0x0fff_fff5;
/// Largest FAT we read into memory (a FAT32 of 2 TiB with 4 KiB clusters is 2 GiB; an ESP's
/// FAT is a few MiB).
pub const MAX_FAT_BYTES: u64 = 256 << 20;
/// Largest directory we read (bytes).
pub const MAX_DIR_BYTES: u64 = 64 << 20;
/// Deepest directory nesting a walk follows.
pub const MAX_DEPTH: usize = 64;
/// Most entries a walk returns.
pub const MAX_WALK_ENTRIES: usize = 1_000_000;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Block(#[from] vmdisk_block::Error),
    #[error("not a FAT filesystem: {why}")]
    NotFat { why: String },
    #[error("corrupt FAT filesystem: {what} (at byte {off:#x}); run fsck.vfat on it")]
    Corrupt { what: String, off: u64 },
    #[error("{path}: no such file or directory")]
    NotFound { path: String },
    #[error("{path}: not a directory")]
    NotADirectory { path: String },
    #[error("{path}: is a directory")]
    IsADirectory { path: String },
    #[error("{path}: invalid path (paths are absolute)")]
    BadPath { path: String },
    #[error("limit exceeded: {what} needs {needed}, limit is {limit}")]
    Limit {
        what: &'static str,
        needed: u64,
        limit: u64,
    },
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FatType {
    Fat12,
    Fat16,
    Fat32,
}

/// The validated boot sector.
#[derive(Debug, Clone)]
pub struct Bpb {
    pub fat_type: FatType,
    pub bytes_per_sector: u64,
    pub sectors_per_cluster: u64,
    pub reserved_sectors: u64,
    pub num_fats: u64,
    pub root_entries: u64,
    pub total_sectors: u64,
    pub fat_sectors: u64,
    pub root_cluster: u32,
    pub active_fat: u64,
    pub clusters: u64,
    pub label: String,
    pub serial: u32,
}

impl Bpb {
    /// Parse the first 512 bytes of the volume.
    pub fn parse(b: &[u8], dev_len: u64) -> Result<Bpb> {
        let not = |why: &str| Error::NotFat { why: why.into() };
        if b.len() < 512 {
            return Err(not("shorter than one sector"));
        }
        if b[510] != 0x55 || b[511] != 0xaa {
            return Err(not("no boot sector signature 55aa"));
        }
        let bps = u64::from(le16(b, 11));
        if !(512..=4096).contains(&bps) || !bps.is_power_of_two() {
            return Err(not("bytes per sector is not 512..4096"));
        }
        let spc = u64::from(b[13]);
        if spc == 0 || !spc.is_power_of_two() {
            return Err(not("sectors per cluster is not a power of two"));
        }
        let reserved = u64::from(le16(b, 14));
        let num_fats = u64::from(b[16]);
        if reserved == 0 || num_fats == 0 || num_fats > 4 {
            return Err(not("no reserved sectors or FATs"));
        }
        let root_entries = u64::from(le16(b, 17));
        let total16 = u64::from(le16(b, 19));
        let fat16 = u64::from(le16(b, 22));
        let total = if total16 != 0 {
            total16
        } else {
            u64::from(le32(b, 32))
        };
        let fat_sectors = if fat16 != 0 {
            fat16
        } else {
            u64::from(le32(b, 36))
        };
        if total == 0 || fat_sectors == 0 {
            return Err(not("zero total or FAT sectors"));
        }
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let data_start = reserved + num_fats * fat_sectors + root_sectors;
        if data_start >= total {
            return Err(Error::Corrupt {
                what: format!("metadata ({data_start} sectors) fills the volume ({total})"),
                off: 0,
            });
        }
        if total * bps > dev_len {
            return Err(Error::Corrupt {
                what: format!(
                    "volume of {} bytes is larger than the device ({dev_len})",
                    total * bps
                ),
                off: 19,
            });
        }
        let clusters = (total - data_start) / spc;
        let fat_type = if clusters < 4085 {
            FatType::Fat12
        } else if clusters < 65525 {
            FatType::Fat16
        } else {
            FatType::Fat32
        };
        if clusters > MAX_CLUSTERS {
            return Err(Error::Limit {
                what: "FAT clusters",
                needed: clusters,
                limit: MAX_CLUSTERS,
            });
        }
        // The FAT must hold an entry for every cluster.
        let need_bits = (clusters + 2)
            * match fat_type {
                FatType::Fat12 => 12,
                FatType::Fat16 => 16,
                FatType::Fat32 => 32,
            };
        if fat_sectors * bps * 8 < need_bits {
            return Err(Error::Corrupt {
                what: format!("FAT of {fat_sectors} sectors is too small for {clusters} clusters"),
                off: 22,
            });
        }
        let (root_cluster, active_fat, label_off, serial_off) = if fat_type == FatType::Fat32 {
            if root_entries != 0 {
                return Err(Error::Corrupt {
                    what: "FAT32 with a fixed root directory".into(),
                    off: 17,
                });
            }
            let ext = le16(b, 40);
            let active = if ext & 0x80 != 0 {
                u64::from(ext & 0xf)
            } else {
                0
            };
            (le32(b, 44) & 0x0fff_ffff, active, 71, 67)
        } else {
            (0, 0, 43, 39)
        };
        if active_fat >= num_fats {
            return Err(Error::Corrupt {
                what: format!("active FAT {active_fat} of {num_fats}"),
                off: 40,
            });
        }
        let sig = if fat_type == FatType::Fat32 {
            b[66]
        } else {
            b[38]
        };
        let (label, serial) = if sig == 0x29 {
            let l = String::from_utf8_lossy(&b[label_off..label_off + 11])
                .trim_end()
                .to_string();
            (l, le32(b, serial_off))
        } else {
            (String::new(), 0)
        };
        Ok(Bpb {
            fat_type,
            bytes_per_sector: bps,
            sectors_per_cluster: spc,
            reserved_sectors: reserved,
            num_fats,
            root_entries,
            total_sectors: total,
            fat_sectors,
            root_cluster,
            active_fat,
            clusters,
            label,
            serial,
        })
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.bytes_per_sector * self.sectors_per_cluster
    }
    fn root_dir_off(&self) -> u64 {
        (self.reserved_sectors + self.num_fats * self.fat_sectors) * self.bytes_per_sector
    }
    /// Byte offset of cluster `c` (2-based).
    pub fn cluster_off(&self, c: u32) -> u64 {
        let root_sectors = (self.root_entries * 32).div_ceil(self.bytes_per_sector);
        (self.reserved_sectors + self.num_fats * self.fat_sectors + root_sectors)
            * self.bytes_per_sector
            + u64::from(c - 2) * self.cluster_bytes()
    }
}

/// One file or directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FatEntry {
    /// Absolute path ("/" for the root).
    pub path: String,
    pub name: String,
    /// The 8.3 name (e.g. `VMLINUZ.EFI`), which lookups match too.
    pub short_name: String,
    pub is_dir: bool,
    pub size: u64,
    pub attr: u8,
    pub first_cluster: u32,
    /// Last write, seconds since the epoch (FAT keeps local time; read as UTC).
    pub mtime: i64,
    /// Last access date, seconds since the epoch.
    pub atime: i64,
    /// Why this entry (or a directory's listing) could not be read.
    pub error: Option<String>,
}

/// An open file: its size and cluster chain.
#[derive(Debug, Clone)]
pub struct FatFile {
    pub size: u64,
    chain: Vec<u32>,
}

/// A read-only FAT filesystem.
pub struct Fat {
    dev: Arc<dyn BlockDevice>,
    pub bpb: Bpb,
    fat: Vec<u8>,
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn fat_time(date: u16, time: u16) -> i64 {
    if date == 0 {
        return 0;
    }
    let y = 1980 + i64::from(date >> 9);
    let m = i64::from((date >> 5) & 0xf).clamp(1, 12);
    let d = i64::from(date & 0x1f).clamp(1, 31);
    let secs = i64::from(time >> 11) * 3600
        + i64::from((time >> 5) & 0x3f) * 60
        + i64::from(time & 0x1f) * 2;
    days_from_civil(y, m, d) * 86400 + secs
}

/// The checksum of an 8.3 name that its long-name entries carry.
pub fn lfn_checksum(short: &[u8]) -> u8 {
    short
        .iter()
        .fold(0u8, |s, &c| (s >> 1 | (s & 1) << 7).wrapping_add(c))
}

fn short_name(e: &[u8]) -> String {
    let mut base: Vec<u8> = e[0..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xe5;
    }
    let mut ext: Vec<u8> = e[8..11].to_vec();
    let flags = e[12];
    if flags & 0x08 != 0 {
        base.make_ascii_lowercase();
    }
    if flags & 0x10 != 0 {
        ext.make_ascii_lowercase();
    }
    let trim = |v: &[u8]| {
        let n = v.iter().rposition(|&c| c != b' ').map_or(0, |i| i + 1);
        // Code page 437 upper half: kept as Latin-1 code points, good enough for ESPs.
        v[..n].iter().map(|&c| c as char).collect::<String>()
    };
    let (b, x) = (trim(&base), trim(&ext));
    if x.is_empty() {
        b
    } else {
        format!("{b}.{x}")
    }
}

/// Parse the 32-byte entries of a directory (paths left empty for the caller).
pub fn parse_dir(data: &[u8], fat32: bool) -> Vec<FatEntry> {
    let mut out = Vec::new();
    let mut lfn: Vec<(u8, [u16; 13])> = Vec::new();
    let mut lfn_sum: Option<u8> = None;
    for e in data.chunks_exact(32) {
        if e[0] == 0 {
            break;
        }
        if e[0] == 0xe5 {
            lfn.clear();
            continue;
        }
        let attr = e[11];
        if attr & 0x3f == 0x0f {
            let ord = e[0];
            let mut units = [0u16; 13];
            for (i, o) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                .iter()
                .enumerate()
            {
                units[i] = le16(e, *o);
            }
            if ord & 0x40 != 0 {
                lfn.clear();
                lfn_sum = Some(e[13]);
            } else if lfn_sum != Some(e[13]) {
                lfn.clear();
                lfn_sum = None;
                continue;
            }
            lfn.push((ord & 0x3f, units));
            continue;
        }
        if attr & 0x08 != 0 {
            // Volume label.
            lfn.clear();
            continue;
        }
        let short = short_name(e);
        let sum = lfn_checksum(&e[0..11]);
        // Long name valid when its pieces count down to 1 and carry this entry's checksum.
        let long = (!lfn.is_empty()
            && lfn_sum == Some(sum)
            && lfn
                .iter()
                .enumerate()
                .all(|(i, (o, _))| usize::from(*o) == lfn.len() - i))
        .then(|| {
            let mut u: Vec<u16> = Vec::new();
            for (_, part) in lfn.iter().rev() {
                u.extend_from_slice(part);
            }
            let n = u.iter().position(|&c| c == 0).unwrap_or(u.len());
            String::from_utf16_lossy(&u[..n])
        });
        lfn.clear();
        lfn_sum = None;
        let name = long
            .filter(|l| !l.is_empty())
            .unwrap_or_else(|| short.clone());
        // The high cluster word exists only on FAT32 (FAT12/16 keep other data there).
        let hi = if fat32 {
            u32::from(le16(e, 20)) << 16
        } else {
            0
        };
        out.push(FatEntry {
            path: String::new(),
            name,
            short_name: short.clone(),
            is_dir: attr & 0x10 != 0,
            size: u64::from(le32(e, 28)),
            attr,
            first_cluster: hi | u32::from(le16(e, 26)),
            mtime: fat_time(le16(e, 24), le16(e, 22)),
            atime: fat_time(le16(e, 18), 0),
            error: None,
        });
    }
    out
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

impl Fat {
    /// Open the FAT filesystem on `dev` (a partition slice or a whole disk).
    pub fn open(dev: Arc<dyn BlockDevice>) -> Result<Fat> {
        let mut b = vec![0u8; 512];
        if dev.len() < 512 {
            return Err(Error::NotFat {
                why: "device shorter than one sector".into(),
            });
        }
        dev.read_exact_at(&mut b, 0)?;
        let bpb = Bpb::parse(&b, dev.len())?;
        let fat_bytes = bpb.fat_sectors * bpb.bytes_per_sector;
        if fat_bytes > MAX_FAT_BYTES {
            return Err(Error::Limit {
                what: "FAT bytes",
                needed: fat_bytes,
                limit: MAX_FAT_BYTES,
            });
        }
        let mut fat = vec![0u8; fat_bytes as usize];
        dev.read_exact_at(
            &mut fat,
            (bpb.reserved_sectors + bpb.active_fat * bpb.fat_sectors) * bpb.bytes_per_sector,
        )?;
        Ok(Fat { dev, bpb, fat })
    }

    /// FAT entry of cluster `c` (next cluster, or an end/bad marker normalised to 0x0fffffff).
    fn next(&self, c: u32) -> u32 {
        let c = c as usize;
        match self.bpb.fat_type {
            FatType::Fat12 => {
                let o = c + c / 2;
                if o + 1 >= self.fat.len() {
                    return 0x0fff_ffff;
                }
                let v = le16(&self.fat, o);
                let v = if c & 1 == 1 { v >> 4 } else { v & 0xfff };
                if v >= 0xff7 {
                    0x0fff_ffff
                } else {
                    u32::from(v)
                }
            }
            FatType::Fat16 => {
                if 2 * c + 1 >= self.fat.len() {
                    return 0x0fff_ffff;
                }
                let v = le16(&self.fat, 2 * c);
                if v >= 0xfff7 {
                    0x0fff_ffff
                } else {
                    u32::from(v)
                }
            }
            FatType::Fat32 => {
                if 4 * c + 3 >= self.fat.len() {
                    return 0x0fff_ffff;
                }
                let v = le32(&self.fat, 4 * c) & 0x0fff_ffff;
                if v >= 0x0fff_fff7 {
                    0x0fff_ffff
                } else {
                    v
                }
            }
        }
    }

    /// The cluster chain from `first`: exactly `want` clusters for a file, the whole chain for
    /// a directory. A loop, a free or out-of-range cluster, or a short chain is corruption.
    fn chain(&self, first: u32, want: Option<u64>) -> Result<Vec<u32>> {
        let mut v = Vec::new();
        let mut c = first;
        let corrupt = |what: String| Error::Corrupt { what, off: 0 };
        loop {
            if want == Some(v.len() as u64) {
                return Ok(v);
            }
            if c == 0x0fff_ffff {
                return match want {
                    None => Ok(v),
                    Some(n) => Err(corrupt(format!(
                        "cluster chain from {first} ends after {} of {n} clusters",
                        v.len()
                    ))),
                };
            }
            if c < 2 || u64::from(c) >= self.bpb.clusters + 2 {
                return Err(corrupt(format!(
                    "cluster chain from {first} reaches invalid cluster {c}"
                )));
            }
            if v.len() as u64 >= self.bpb.clusters {
                return Err(corrupt(format!("cluster chain from {first} loops")));
            }
            v.push(c);
            c = self.next(c);
        }
    }

    fn read_dir_bytes(&self, first_cluster: u32, is_root: bool) -> Result<Vec<u8>> {
        if is_root && self.bpb.fat_type != FatType::Fat32 {
            let mut b = vec![0u8; (self.bpb.root_entries * 32) as usize];
            self.dev.read_exact_at(&mut b, self.bpb.root_dir_off())?;
            return Ok(b);
        }
        let first = if is_root {
            self.bpb.root_cluster
        } else {
            first_cluster
        };
        let cb = self.bpb.cluster_bytes();
        let max = MAX_DIR_BYTES / cb;
        let chain = self.chain(first, None)?;
        if chain.len() as u64 > max {
            return Err(Error::Limit {
                what: "directory bytes",
                needed: chain.len() as u64 * cb,
                limit: MAX_DIR_BYTES,
            });
        }
        let mut out = vec![0u8; chain.len() * cb as usize];
        for (i, &c) in chain.iter().enumerate() {
            let at = i * cb as usize;
            self.dev
                .read_exact_at(&mut out[at..at + cb as usize], self.bpb.cluster_off(c))?;
        }
        Ok(out)
    }

    fn root(&self) -> FatEntry {
        FatEntry {
            path: "/".into(),
            name: "/".into(),
            short_name: String::new(),
            is_dir: true,
            size: 0,
            attr: 0x10,
            first_cluster: self.bpb.root_cluster,
            mtime: 0,
            atime: 0,
            error: None,
        }
    }

    fn list(&self, dir: &FatEntry) -> Result<Vec<FatEntry>> {
        let data = self.read_dir_bytes(dir.first_cluster, dir.path == "/")?;
        let mut v: Vec<FatEntry> = parse_dir(&data, self.bpb.fat_type == FatType::Fat32)
            .into_iter()
            .filter(|e| e.name != "." && e.name != "..")
            .map(|mut e| {
                e.path = join(&dir.path, &e.name);
                if e.name.contains('/') || e.name.contains('\0') {
                    e.error = Some(format!("unsafe file name {:?}", e.name));
                }
                e
            })
            .collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(v)
    }

    /// The entry at `path` (FAT names match case-insensitively, long or short).
    pub fn stat(&self, path: &str) -> Result<FatEntry> {
        if !path.starts_with('/') {
            return Err(Error::BadPath { path: path.into() });
        }
        let mut cur = self.root();
        for comp in path.split('/').filter(|c| !c.is_empty() && *c != ".") {
            if !cur.is_dir {
                return Err(Error::NotADirectory { path: path.into() });
            }
            let want = comp.to_lowercase();
            let found = self
                .list(&cur)?
                .into_iter()
                .find(|e| e.name.to_lowercase() == want || e.short_name.to_lowercase() == want);
            cur = found.ok_or_else(|| Error::NotFound { path: path.into() })?;
        }
        Ok(cur)
    }

    /// Entries of a directory, sorted by name, without `.` and `..`.
    pub fn read_dir(&self, path: &str) -> Result<Vec<FatEntry>> {
        let d = self.stat(path)?;
        if !d.is_dir {
            return Err(Error::NotADirectory { path: path.into() });
        }
        self.list(&d)
    }

    /// Every entry below `path`, pre-order; a directory whose listing fails carries the error.
    pub fn walk_lossy(&self, path: &str) -> Result<Vec<FatEntry>> {
        let d = self.stat(path)?;
        if !d.is_dir {
            return Err(Error::NotADirectory { path: path.into() });
        }
        let mut out = Vec::new();
        let first = self.list(&d)?;
        self.walk_into(first, 0, &mut out)?;
        Ok(out)
    }

    fn walk_into(
        &self,
        entries: Vec<FatEntry>,
        depth: usize,
        out: &mut Vec<FatEntry>,
    ) -> Result<()> {
        if depth >= MAX_DEPTH {
            return Err(Error::Limit {
                what: "directory nesting",
                needed: depth as u64 + 1,
                limit: MAX_DEPTH as u64,
            });
        }
        for mut e in entries {
            if out.len() >= MAX_WALK_ENTRIES {
                return Err(Error::Limit {
                    what: "entries in one walk",
                    needed: out.len() as u64 + 1,
                    limit: MAX_WALK_ENTRIES as u64,
                });
            }
            if e.is_dir && e.error.is_none() {
                match self.list(&e) {
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

    /// Open a file by its entry.
    pub fn open_entry(&self, e: &FatEntry) -> Result<FatFile> {
        if e.is_dir {
            return Err(Error::IsADirectory {
                path: e.path.clone(),
            });
        }
        let cb = self.bpb.cluster_bytes();
        let need = e.size.div_ceil(cb);
        if need > self.bpb.clusters {
            return Err(Error::Corrupt {
                what: format!("{}: size {} exceeds the volume", e.path, e.size),
                off: 0,
            });
        }
        let chain = self.chain(e.first_cluster, Some(need))?;
        Ok(FatFile {
            size: e.size,
            chain,
        })
    }

    /// Open a file by path.
    pub fn open_file(&self, path: &str) -> Result<FatFile> {
        let e = self.stat(path)?;
        self.open_entry(&e)
    }

    /// Read `buf.len()` bytes at `off` (must end within the file).
    pub fn read_at(&self, f: &FatFile, off: u64, buf: &mut [u8]) -> Result<()> {
        let end = off + buf.len() as u64;
        if end > f.size {
            return Err(Error::Corrupt {
                what: "read past the end of a file".into(),
                off,
            });
        }
        let cb = self.bpb.cluster_bytes();
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let ci = (pos / cb) as usize;
            let within = pos % cb;
            // Coalesce physically consecutive clusters into one read.
            let mut n_clusters = 1;
            while ci + n_clusters < f.chain.len()
                && f.chain[ci + n_clusters] == f.chain[ci] + n_clusters as u32
                && (n_clusters as u64 * cb - within) < (buf.len() - done) as u64
            {
                n_clusters += 1;
            }
            let n = ((n_clusters as u64 * cb - within) as usize).min(buf.len() - done);
            self.dev.read_exact_at(
                &mut buf[done..done + n],
                self.bpb.cluster_off(f.chain[ci]) + within,
            )?;
            done += n;
        }
        Ok(())
    }

    /// Whole content of a file, up to `limit` bytes.
    pub fn read_file(&self, path: &str, limit: u64) -> Result<Vec<u8>> {
        let f = self.open_file(path)?;
        if f.size > limit {
            return Err(Error::Limit {
                what: "file size read into memory",
                needed: f.size,
                limit,
            });
        }
        let mut v = vec![0u8; f.size as usize];
        self.read_at(&f, 0, &mut v)?;
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdisk_block::MemDisk;

    #[test]
    fn lfn_checksum_of_a_known_name() {
        // "README  TXT" -> 0x73 (checksum as computed by the specification's algorithm).
        let s = lfn_checksum(b"README  TXT");
        let again = b"README  TXT"
            .iter()
            .fold(0u8, |a, &c| a.rotate_right(1).wrapping_add(c));
        assert_eq!(s, again);
    }

    #[test]
    fn short_names_and_case_flags() {
        let mut e = [0u8; 32];
        e[..11].copy_from_slice(b"VMLINUZ EFI");
        assert_eq!(short_name(&e), "VMLINUZ.EFI");
        e[12] = 0x18;
        assert_eq!(short_name(&e), "vmlinuz.efi");
    }

    /// Regression (found by the vfat interop test): a lookup compared against the stored 8.3
    /// name re-parsed it as a 32-byte entry and indexed past its 11 bytes.
    #[test]
    fn lookup_by_short_name_does_not_index_past_the_name() {
        let mut d = vec![0u8; 64];
        d[..11].copy_from_slice(b"BOOTX64 EFI");
        d[11] = 0x20;
        let v = parse_dir(&d, true);
        assert_eq!(v[0].short_name, "BOOTX64.EFI");
        assert_eq!(v[0].short_name.to_lowercase(), "bootx64.efi");
    }

    #[test]
    fn fat_dates() {
        // 2024-01-02 03:04:06
        let date = ((2024 - 1980) << 9) | (1 << 5) | 2;
        let time = (3 << 11) | (4 << 5) | 3;
        assert_eq!(fat_time(date, time), 1_704_164_646);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]
        #[test]
        fn hostile_volumes_never_panic(
            boot in proptest::collection::vec(0u8..=255, 512),
            rest in proptest::collection::vec(0u8..=255, 0..8192),
            picks in proptest::collection::vec((0usize..64, 0u8..=255), 0..16))
        {
            let mut img = boot;
            img[510] = 0x55;
            img[511] = 0xaa;
            img[11] = 0; img[12] = 2; // 512-byte sectors
            for (o, v) in picks { img[11 + o % 40] = v; }
            img.extend_from_slice(&rest);
            img.resize(64 << 10, 0);
            let dev: Arc<dyn BlockDevice> = Arc::new(MemDisk::from_vec(img));
            if let Ok(fs) = Fat::open(dev) {
                if let Ok(all) = fs.walk_lossy("/") {
                    for e in all.iter().filter(|e| !e.is_dir) {
                        if let Ok(f) = fs.open_entry(e) {
                            let n = f.size.min(4096) as usize;
                            let mut b = vec![0u8; n];
                            let _ = fs.read_at(&f, 0, &mut b);
                        }
                    }
                }
            }
        }
        #[test]
        fn dir_parse_never_panics(d in proptest::collection::vec(0u8..=255, 0..2048)) {
            let _ = parse_dir(&d, true);
        }
    }
}
