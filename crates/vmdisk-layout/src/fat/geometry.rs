//! FAT geometry exactly as mkfs.fat (dosfstools 4.2) chooses it for a filesystem size:
//! FAT12 or FAT16 below 512 MiB, FAT32 from there (or what `-F` asks), the cluster size, the
//! reserved sectors, the FAT length and the root directory, with mkfs.fat's alignment of
//! every structure to the cluster size. `tests/fat_mkfs.rs` compares it with mkfs.fat.

use super::{MAX_SECTORS, NUM_FATS, SECTOR};

/// mkfs.fat's limits (dosfstools 4.2 mkfs.fat.c).
const MAX_CLUST_12: u64 = (1 << 12) - 16;
const MAX_CLUST_16: u64 = (1 << 16) - 16;
/// FAT32 with fewer clusters than this is refused unless asked for with `-F 32`.
pub const MIN_CLUSTERS_32: u64 = 65529;
const MAX_CLUST_32: u64 = (1 << 28) - 16;
/// Fewer clusters than this is FAT12 by definition.
const FAT12_THRESHOLD: u64 = 4085;
/// Below this size mkfs.fat picks FAT12 or FAT16; from it on FAT32.
const FAT32_FROM: u64 = 512 << 20;
/// Filesystems this small (4 MiB) get no alignment of their structures.
const NO_ALIGN_SECTORS: u64 = 8192;
/// Root directory entries of a FAT12/16 hard disk filesystem.
const ROOT_ENTRIES: u64 = 512;

/// Layout of a FAT filesystem of a given size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// 12, 16 or 32.
    pub bits: u8,
    pub total_sectors: u64,
    pub sectors_per_cluster: u64,
    pub reserved_sectors: u64,
    pub fat_sectors: u64,
    /// Root directory entries (FAT12/16); 0 on FAT32, whose root is a cluster chain.
    pub root_entries: u64,
    pub clusters: u64,
    /// Sectors before the filesystem on the disk (BPB "hidden sectors").
    pub hidden_sectors: u64,
    pub sectors_per_track: u16,
    pub heads: u16,
}

fn align(v: u64, to: u64, on: bool) -> u64 {
    if on {
        v.div_ceil(to) * to
    } else {
        v
    }
}

/// The sectors per track and heads mkfs.fat gives a filesystem of `bytes` when the device
/// reports no geometry (as measured from mkfs.fat 4.2 on plain files): the total is a whole
/// number of tracks of this size.
fn chs_geometry(bytes: u64) -> (u64, u16) {
    const MIB: u64 = 1 << 20;
    match bytes {
        b if b <= 2 * MIB => (16, 2),
        b if b <= 16 * MIB => (32, 2),
        b if b <= 32 * MIB => (32, 4),
        b if b <= 128 * MIB => (32, 8),
        b if b <= 256 * MIB => (32, 16),
        b if b <= 504 * MIB => (63, 16),
        b if b <= 1008 * MIB => (63, 32),
        b if b <= 2016 * MIB => (63, 64),
        b if b <= 4032 * MIB => (63, 128),
        _ => (63, 255),
    }
}

impl Geometry {
    /// What plain `mkfs.fat` makes of `bytes`.
    pub fn for_size(bytes: u64, hidden_sectors: u64) -> std::result::Result<Geometry, String> {
        Self::mkfs(bytes, hidden_sectors, None)
    }

    /// What `mkfs.fat [-F bits]` makes of `bytes` (512-byte sectors, 2 FATs).
    pub fn mkfs(
        bytes: u64,
        hidden_sectors: u64,
        bits: Option<u8>,
    ) -> std::result::Result<Geometry, String> {
        let by_user = bits.is_some();
        let mut size_fat = bits.unwrap_or(0);
        if size_fat == 0 && bytes >= FAT32_FROM {
            size_fat = 32;
        }
        let (spt, heads) = chs_geometry(bytes);
        // mkfs.fat counts 1 KiB blocks (an odd last sector is left out) and uses a whole
        // number of tracks.
        let total = (bytes / 1024 * 2).min(MAX_SECTORS);
        let total = if total > spt {
            total / spt * spt
        } else {
            total
        };
        let mut cs: u64 = if size_fat == 32 {
            let mb = bytes >> 20;
            match mb {
                m if m > 32 * 1024 => 64,
                m if m > 16 * 1024 => 32,
                m if m > 8 * 1024 => 16,
                m if m > 260 => 8,
                _ => 1,
            }
        } else {
            4
        };
        let reserved0: u64 = if size_fat == 32 { 32 } else { 1 };
        let root_entries0 = if size_fat == 32 { 0 } else { ROOT_ENTRIES };
        let root_dir_sectors = (root_entries0 * 32).div_ceil(SECTOR);
        let on = total > NO_ALIGN_SECTORS;
        let nf = NUM_FATS;
        let (mut c12, mut f12, mut c16, mut f16, mut c32, mut f32);
        loop {
            let fatdata32 = total.saturating_sub(align(reserved0, cs, on));
            let fatdata1216 = fatdata32.saturating_sub(align(root_dir_sectors, cs, on));
            c12 = 2 * (fatdata1216 * SECTOR + nf * 3) / (2 * cs * SECTOR + nf * 3);
            f12 = align((((c12 + 2) * 3 + 1) >> 1).div_ceil(SECTOR), cs, on);
            c12 = fatdata1216.saturating_sub(nf * f12) / cs;
            let max12 = (f12 * 2 * SECTOR / 3).min(MAX_CLUST_12);
            if c12 > max12.saturating_sub(2) {
                c12 = 0;
            }
            c16 = (fatdata1216 * SECTOR + nf * 4) / (cs * SECTOR + nf * 2);
            f16 = align(((c16 + 2) * 2).div_ceil(SECTOR), cs, on);
            c16 = fatdata1216.saturating_sub(nf * f16) / cs;
            let max16 = (f16 * SECTOR / 2).min(MAX_CLUST_16);
            if c16 > max16.saturating_sub(2) {
                c16 = 0;
            }
            if c16 < FAT12_THRESHOLD && !(by_user && size_fat == 16) {
                c16 = 0;
            }
            c32 = (fatdata32 * SECTOR + nf * 8) / (cs * SECTOR + nf * 4);
            f32 = align(((c32 + 2) * 4).div_ceil(SECTOR), cs, on);
            c32 = fatdata32.saturating_sub(nf * f32) / cs;
            let max32 = (f32 * SECTOR / 4).min(MAX_CLUST_32);
            if c32 != 0 && c32 < MIN_CLUSTERS_32 && !(by_user && size_fat == 32) {
                c32 = 0;
            }
            if c32 > max32 {
                c32 = 0;
            }
            if (c12 != 0 && matches!(size_fat, 0 | 12))
                || (c16 != 0 && matches!(size_fat, 0 | 16))
                || (c32 != 0 && size_fat == 32)
            {
                break;
            }
            cs <<= 1;
            if cs > 128 {
                return Err(format!(
                    "{bytes} bytes is too small for FAT{}",
                    if size_fat == 0 { 12 } else { size_fat }
                ));
            }
        }
        if size_fat == 0 {
            size_fat = if c16 > c12 { 16 } else { 12 };
        }
        let (clusters, fat_sectors) = match size_fat {
            12 => (c12, f12),
            16 => (c16, f16),
            _ => (c32, f32),
        };
        if size_fat == 16 && clusters < FAT12_THRESHOLD {
            return Err(format!(
                "{bytes} bytes is an unfortunate size for FAT (too many clusters for FAT12, \
                 too few for FAT16; mkfs.fat refuses it too)"
            ));
        }
        if clusters == 0 {
            return Err(format!("{bytes} bytes is too small for FAT{size_fat}"));
        }
        let root_entries = if size_fat == 32 {
            0
        } else {
            align(root_dir_sectors, cs, on) * (SECTOR / 32)
        };
        Ok(Geometry {
            bits: size_fat,
            total_sectors: total,
            sectors_per_cluster: cs,
            reserved_sectors: align(reserved0, cs, on),
            fat_sectors,
            root_entries,
            clusters,
            hidden_sectors,
            sectors_per_track: spt as u16,
            heads,
        })
    }

    pub fn cluster_bytes(&self) -> u64 {
        self.sectors_per_cluster * SECTOR
    }

    /// Sectors of the fixed root directory (FAT12/16).
    pub fn root_dir_sectors(&self) -> u64 {
        (self.root_entries * 32).div_ceil(SECTOR)
    }

    /// Byte offset of the fixed root directory (FAT12/16).
    pub(crate) fn root_dir_off(&self) -> u64 {
        (self.reserved_sectors + NUM_FATS * self.fat_sectors) * SECTOR
    }

    pub(crate) fn data_start(&self) -> u64 {
        (self.reserved_sectors + NUM_FATS * self.fat_sectors + self.root_dir_sectors()) * SECTOR
    }

    pub(crate) fn cluster_off(&self, c: u32) -> u64 {
        self.data_start() + (u64::from(c) - 2) * self.cluster_bytes()
    }
}

/// Smallest size mkfs.fat formats: a FAT12 of a few hundred KiB (whole MiB returned).
pub(crate) fn min_bytes() -> u64 {
    1 << 20
}
