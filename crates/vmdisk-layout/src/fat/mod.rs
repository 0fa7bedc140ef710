//! A small deterministic FAT32 filesystem, planned purely here (geometry, names, placement,
//! every metadata byte) and written by the `fatwrite` module: format plus copy-in of a directory
//! tree, with 8.3 and long-name (LFN) entries, `.`/`..` as fsck.vfat expects, fixed
//! timestamps.
//!
//! ```text
//! sector 0        boot sector (BPB, FAT32 EBPB, 0x55AA)
//! sector 1        FSInfo (free count, next free)
//! sector 6, 7     backup boot sector, backup FSInfo
//! 32 ..           FAT #1, FAT #2 (28-bit entries; 0/1 reserved, root dir at cluster 2)
//! data            clusters 2.. : root dir, then each directory before its children, files
//!                 contiguous in name order
//! ```

mod geometry;
pub mod names;
mod place;

pub use geometry::Geometry;
pub use place::{check_tree, min_size, FatLayout, Placed};

/// Bytes per sector of the filesystems we write.
pub(crate) const SECTOR: u64 = 512;
/// Reserved sectors before the first FAT (what mkfs.fat uses for FAT32).
pub(crate) const RESERVED_SECTORS: u64 = 32;
pub(crate) const NUM_FATS: u64 = 2;
/// Largest cluster number FAT32 can address (0x0FFFFFF6 and up are reserved).
pub(crate) const MAX_CLUSTERS: u64 = 0x0FFF_FFF5 - 2;
/// FAT32 counts sectors in 32 bits.
pub(crate) const MAX_SECTORS: u64 = u32::MAX as u64;
/// FAT32 files are at most 4 GiB - 1.
pub(crate) const MAX_FILE: u64 = u32::MAX as u64;
/// A directory holds at most 65536 32-byte entries.
pub(crate) const MAX_DIR_ENTRIES: usize = 65536;
/// 1980-01-01 00:00:00, the FAT epoch: every timestamp we write.
pub(crate) const FAT_DATE: u16 = (1 << 5) | 1;
pub(crate) const FAT_TIME: u16 = 0;
pub(crate) const EOC: u32 = 0x0FFF_FFFF;

pub(crate) const ATTR_DIR: u8 = 0x10;
pub(crate) const ATTR_ARCHIVE: u8 = 0x20;
pub(crate) const ATTR_VOLUME_ID: u8 = 0x08;
pub(crate) const ATTR_LFN: u8 = 0x0F;

#[cfg(test)]
mod tests {
    use super::geometry::{min_bytes_for, MIN_CLUSTERS};
    use super::names::*;
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
