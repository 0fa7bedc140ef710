//! vmdisk's FAT geometry against mkfs.fat itself (dosfstools): for a spread of sizes, with
//! and without `-F`, the boot sector mkfs.fat writes must have the FAT variant, cluster size,
//! reserved sectors, FAT length, root entries and total sectors `FatGeometry` computes.

use std::fs;
use std::process::Command;

use vmdisk_layout::FatGeometry;

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}

fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]))
}

#[test]
fn geometry_matches_mkfs_fat() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    const MIB: u64 = 1 << 20;
    // Not the floppy sizes (360, 720, 1200, 1440, 2880 KiB): on a plain file mkfs.fat gives
    // those floppy geometries, on a partition (what disko formats) it does not.
    let mut sizes: Vec<u64> = vec![
        MIB,
        2 * MIB,
        3 * MIB + 512,
        4 * MIB,
        5 * MIB,
        16 * MIB,
        32 * MIB,
        33 * MIB + 3 * 512,
        64 * MIB,
        99 * MIB,
        100 * MIB,
        127 * MIB,
        200 * MIB,
        256 * MIB,
        260 * MIB,
        261 * MIB,
        499 * MIB,
        511 * MIB + 511 * 1024,
        512 * MIB,
        512 * MIB + 512,
        1024 * MIB,
        8 * 1024 * MIB + MIB,
    ];
    sizes.extend((1..40).map(|i| i * 7 * MIB + i * 4096));
    let mut checked = 0;
    for &size in &sizes {
        for bits in [None, Some(12u8), Some(16), Some(32)] {
            let _ = fs::remove_file(&img);
            let f = fs::File::create(&img).unwrap();
            f.set_len(size).unwrap();
            drop(f);
            let mut cmd = Command::new("mkfs.fat");
            if let Some(b) = bits {
                cmd.arg("-F").arg(b.to_string());
            }
            let out = cmd
                .arg(&img)
                .output()
                .expect("mkfs.fat (dosfstools) must be installed");
            let ours = FatGeometry::mkfs(size, 0, bits);
            if !out.status.success() {
                assert!(
                    ours.is_err(),
                    "{size} bytes -F {bits:?}: mkfs.fat refused ({}) but vmdisk plans {ours:?}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                continue;
            }
            let g = ours.unwrap_or_else(|e| {
                panic!("{size} bytes -F {bits:?}: mkfs.fat made it, vmdisk: {e}")
            });
            let b = fs::read(&img).unwrap();
            let fat32 = le16(&b, 22) == 0;
            let want_bits = if fat32 {
                32
            } else {
                match &b[54..59] {
                    b"FAT12" => 12,
                    _ => 16,
                }
            };
            let total = if le16(&b, 19) != 0 {
                le16(&b, 19)
            } else {
                le32(&b, 32)
            };
            let fat_len = if fat32 { le32(&b, 36) } else { le16(&b, 22) };
            let want = (
                want_bits,
                u64::from(b[13]),
                le16(&b, 14),
                fat_len,
                le16(&b, 17),
                total,
            );
            let got = (
                g.bits,
                g.sectors_per_cluster,
                g.reserved_sectors,
                g.fat_sectors,
                g.root_entries,
                g.total_sectors,
            );
            assert_eq!(
                got, want,
                "{size} bytes -F {bits:?}: (bits, sectors/cluster, reserved, FAT sectors, root \
                 entries, total sectors)"
            );
            checked += 1;
        }
    }
    assert!(checked > 100, "only {checked} geometries compared");
}
