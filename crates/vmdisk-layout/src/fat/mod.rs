//! A small deterministic FAT32 filesystem, planned purely here (geometry, names, placement,
//! every metadata byte) and written by the `fatwrite` module: format plus copy-in of a directory
//! tree, with 8.3 and long-name (LFN) entries, `.`/`..` as fsck.vfat expects, fixed
//! timestamps.
//!
//! The geometry (FAT12, FAT16 or FAT32, cluster size, reserved sectors, FAT length, root
//! directory size) is the one mkfs.fat 4.2 picks, so a disko layout gets the FAT variant
//! disko's `mkfs.vfat` would make (FAT16 below 512 MiB).
//!
//! ```text
//! sector 0        boot sector (BPB; FAT12/16 EBPB at 36, FAT32 EBPB at 64; 0x55AA)
//! FAT32: 1, 6, 7  FSInfo (free count, next free), backup boot sector, backup FSInfo
//! reserved ..     FAT #1, FAT #2 (12/16/28-bit entries; 0/1 reserved)
//! FAT12/16        the fixed root directory (512 entries)
//! data            clusters 2.. : (FAT32: the root dir first) each directory before its
//!                 children, files contiguous in name order
//! ```

mod geometry;
pub mod names;
mod place;

pub use geometry::{Geometry, MIN_CLUSTERS_32};
pub use place::{check_tree, min_size, FatLayout, Placed};

/// Bytes per sector of the filesystems we write.
pub(crate) const SECTOR: u64 = 512;
pub(crate) const NUM_FATS: u64 = 2;
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
    use super::names::*;
    use super::*;

    #[test]
    fn geometry_picks_the_variant_mkfs_fat_does() {
        assert_eq!(Geometry::for_size(32 << 20, 0).unwrap().bits, 16);
        assert_eq!(Geometry::for_size(2 << 20, 0).unwrap().bits, 12);
        assert_eq!(Geometry::for_size(500 << 20, 0).unwrap().bits, 16);
        let g = Geometry::for_size(512 << 20, 2048).unwrap();
        assert_eq!(
            (g.bits, g.sectors_per_cluster, g.reserved_sectors),
            (32, 8, 32)
        );
        assert!(g.clusters >= MIN_CLUSTERS_32);
        assert!((g.clusters + 2) * 4 <= g.fat_sectors * 512);
        let g = Geometry::mkfs(64 << 20, 0, Some(32)).unwrap();
        assert_eq!((g.bits, g.sectors_per_cluster), (32, 1));
        assert!(Geometry::for_size(16 << 10, 0).is_err());
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
