//! FAT32 geometry: sectors, clusters and FAT size for a filesystem size.

use super::{MAX_CLUSTERS, MAX_SECTORS, NUM_FATS, RESERVED_SECTORS, SECTOR};

/// FAT32 needs at least this many clusters (fewer would make it FAT16 by definition).
pub const MIN_CLUSTERS: u64 = 65525;

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

    pub(crate) fn data_start(&self) -> u64 {
        (RESERVED_SECTORS + NUM_FATS * self.fat_sectors) * SECTOR
    }

    pub(crate) fn cluster_off(&self, c: u32) -> u64 {
        self.data_start() + (u64::from(c) - 2) * self.cluster_bytes()
    }
}

/// Smallest filesystem with `spc` sectors per cluster that is still FAT32.
pub(crate) fn min_bytes_for(spc: u64) -> u64 {
    let fat = (MIN_CLUSTERS + 2) * 4;
    (RESERVED_SECTORS * SECTOR
        + NUM_FATS * fat.div_ceil(SECTOR) * SECTOR
        + MIN_CLUSTERS * spc * SECTOR)
        .div_ceil(1 << 20)
        * (1 << 20)
}
