//! Offline growth (`grow`) on every fixture variant, judged by e2fsck -fn and dumpe2fs, with
//! the files read back unchanged.

mod common;
use common::*;
use std::path::Path;
use std::sync::Arc;
use vmdisk_block::{BlockDevice, RawFile};
use vmdisk_ext4::{grow, plan_grow, Ext4, GrowError};

fn dev(img: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(RawFile::open(img, false).expect("open image rw"))
}

fn set_len(img: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open")
        .set_len(len)
        .expect("set_len");
}

fn dumpe2fs_field(img: &Path, key: &str) -> u64 {
    let out = std::process::Command::new("dumpe2fs")
        .arg("-h")
        .arg(img)
        .output()
        .expect("dumpe2fs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
        .unwrap_or_else(|| panic!("no {key} in dumpe2fs -h:\n{text}"))
        .trim()
        .parse()
        .expect("a number")
}

fn files(img: &Path) -> Vec<(String, Vec<u8>)> {
    let fs = Ext4::open(dev(img)).expect("open ext4");
    [
        "/etc/shadow",
        "/etc/passwd",
        "/data/deep/deeper/f0",
        "/data/deep/deeper/f6",
    ]
    .iter()
    .map(|p| (p.to_string(), fs.read_file(p).expect("read")))
    .collect()
}

#[test]
fn every_variant_grows_fsck_clean_with_files_unchanged() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    for (name, opts, mb) in VARIANTS {
        // 4x, then 40x the original: the second crosses descriptor-block boundaries on the
        // 1 KiB variants (32 or 16 descriptors per block).
        for factor in [4u64, 40] {
            let img = mkfs(tmp.path(), &format!("{name}-{factor}.img"), &src, *mb, opts);
            let before = files(&img);
            let reserved = dumpe2fs_field(&img, "Reserved GDT blocks");
            let new_len = (*mb << 20) * factor;
            set_len(&img, new_len);
            let r = grow(dev(&img), new_len).unwrap_or_else(|e| panic!("{name} x{factor}: {e:?}"));
            let ctx = format!("{name} grown x{factor}");
            assert_fsck_clean(&img, &ctx);
            let bs = r.plan.block_size;
            assert_eq!(
                dumpe2fs_field(&img, "Block count"),
                r.plan.new_blocks,
                "{ctx}"
            );
            assert!(
                r.plan.new_blocks * bs > new_len - (new_len / 64),
                "{ctx}: {r:?}"
            );
            // The descriptor blocks added came out of the reserved ones.
            let added = r.plan.new_desc_blocks - r.plan.old_desc_blocks;
            if factor == 40 && name.contains("1k") {
                assert!(
                    added > 0,
                    "{ctx}: meant to cross a descriptor-block boundary"
                );
            }
            assert_eq!(
                dumpe2fs_field(&img, "Reserved GDT blocks") + added,
                reserved,
                "{ctx}"
            );
            assert_eq!(
                r.itable_bytes_zeroed, 0,
                "{ctx}: the sparse tail reads as zeros"
            );
            assert_eq!(files(&img), before, "{ctx}: files changed");
        }
    }
}

#[test]
fn ext2_ext3_2k_blocks_and_128_byte_inodes_grow_too() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    for (name, opts) in [
        ("ext2", &["-t", "ext2"][..]),
        ("ext3", &["-t", "ext3"]),
        ("2k", &["-b", "2048"]),
        ("i128", &["-I", "128"]),
        ("nojournal", &["-O", "^has_journal"]),
    ] {
        let img = mkfs(tmp.path(), &format!("{name}.img"), &src, 48, opts);
        let before = files(&img);
        set_len(&img, 600 << 20);
        let r = grow(dev(&img), 600 << 20).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_fsck_clean(&img, name);
        assert_eq!(
            dumpe2fs_field(&img, "Block count"),
            r.plan.new_blocks,
            "{name}"
        );
        assert_eq!(files(&img), before, "{name}: files changed");
    }
}

#[test]
fn garbage_where_new_inode_tables_go_is_zeroed() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    let img = mkfs(tmp.path(), "garbage.img", &src, 32, &["-b", "1024"]);
    let old = 32u64 << 20;
    let new_len = old * 3;
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&img)
            .expect("open");
        f.write_all(&vec![0xa5u8; (new_len - old) as usize])
            .expect("fill");
    }
    let r = grow(dev(&img), new_len).expect("grow");
    assert!(r.itable_bytes_zeroed > 0, "{r:?}");
    assert_fsck_clean(&img, "grown over garbage");
}

#[test]
fn no_reserved_gdt_blocks_and_a_new_descriptor_block_is_refused_untouched() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    // 1 KiB blocks, 64bit: 16 descriptors per block; 32 MiB = 4 groups.
    let img = mkfs(
        tmp.path(),
        "nores.img",
        &src,
        32,
        &["-b", "1024", "-O", "^resize_inode"],
    );
    let before = std::fs::read(&img).expect("read");
    let e = plan_grow(dev(&img), 256 << 20).expect_err("needs a descriptor block");
    assert!(
        matches!(&e, GrowError::Refused { reason } if reason.contains("no reserved GDT blocks")),
        "{e}"
    );
    // 4 KiB more: no group worth adding (resize2fs's rule), only the last one completes.
    let p = plan_grow(dev(&img), 32 << 20 | 4096).expect("plan");
    assert_eq!((p.old_groups, p.new_groups), (4, 4), "{p:?}");
    assert_eq!(std::fs::read(&img).expect("read"), before, "untouched");
    // Within the descriptor block it has, it grows.
    set_len(&img, 64 << 20);
    grow(dev(&img), 64 << 20).expect("grow within one descriptor block");
    assert_fsck_clean(&img, "no resize_inode, grown");
}
