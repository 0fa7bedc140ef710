//! Hostile images: mutated superblock, descriptors, inodes, extent headers and directory
//! entries never panic the reader or the editor, and a refused edit writes nothing.

mod common;
use common::*;
use std::sync::Arc;
use vmdisk_block::{BlockDevice, MemDisk};
use vmdisk_ext4::{replace_file, Ext4};

/// "located at block B, offset 0xO" from `debugfs -R 'imap PATH'`.
fn inode_offset(img: &std::path::Path, path: &str, bs: u64) -> u64 {
    let out = String::from_utf8(debugfs(img, &format!("imap {path}"))).expect("utf8");
    let blk: u64 = out
        .split("located at block ")
        .nth(1)
        .and_then(|s| s.split(',').next())
        .and_then(|s| s.trim().parse().ok())
        .expect("imap block");
    let off = out.split("offset 0x").nth(1).expect("imap offset").trim();
    blk * bs + u64::from_str_radix(off, 16).expect("hex")
}

/// First data block of `path` from `debugfs -R 'blocks PATH'`.
fn first_block(img: &std::path::Path, path: &str) -> u64 {
    let out = String::from_utf8(debugfs(img, &format!("blocks {path}"))).expect("utf8");
    out.split_whitespace()
        .next()
        .expect("block")
        .parse()
        .expect("number")
}

/// The line the editor is asked to write in every round.
const NEW_SHADOW: &[u8] = b"root:$6$a$b:1:0:99999:7:::\n";

/// Whether `e2fsck -fn` finds nothing to fix in `bytes` (written to a file in `dir`).
fn fsck_clean(dir: &std::path::Path, bytes: &[u8]) -> bool {
    let img = dir.join("fsck.img");
    std::fs::write(&img, bytes).expect("write image for e2fsck");
    let ok = std::process::Command::new("e2fsck")
        .arg("-fn")
        .arg(&img)
        .output()
        .expect("run e2fsck")
        .status
        .success();
    std::fs::remove_file(&img).expect("remove image");
    ok
}

/// Reader and editor over one mutated image `bytes`: no panic, a refused edit writes
/// nothing, and an accepted edit did what was asked without damaging anything e2fsck could
/// vouch for before (`dir` holds the scratch copies e2fsck reads).
fn exercise(bytes: &[u8], what: &str, dir: &std::path::Path) {
    let dev = Arc::new(MemDisk::from_vec(bytes.to_vec()));
    // Reader: any result, no panic.
    if let Ok(fs) = Ext4::open(dev.clone() as Arc<dyn BlockDevice>) {
        let _ = fs.fs_info();
        if let Ok(all) = fs.walk("/") {
            for e in all.iter().take(50) {
                let _ = fs.read_file(&e.path);
            }
        }
        let _ = fs.read_file("/etc/shadow");
    }
    // Editor: an error must leave every byte as it was.
    match replace_file(dev.as_ref(), "/etc/shadow", NEW_SHADOW) {
        Ok(_) => {
            let after = dev.to_vec();
            let back = Ext4::open(dev.clone() as Arc<dyn BlockDevice>)
                .and_then(|fs| fs.read_file("/etc/shadow"));
            assert!(
                matches!(&back, Ok(b) if b == NEW_SHADOW),
                "{what}: accepted edit does not read back: {back:?}"
            );
            // A mutation e2fsck does not mind (an unused byte, a field it ignores) must not
            // become damage through the edit; on an image e2fsck already finds damaged the
            // editor may only have kept the damage (the refusal cases are the other arm).
            if fsck_clean(dir, bytes) {
                assert!(
                    fsck_clean(dir, &after),
                    "{what}: the edit damaged an image e2fsck found clean"
                );
            }
        }
        Err(e) => {
            assert!(
                dev.to_vec() == bytes,
                "{what}: refused edit ({e}) changed the image"
            );
        }
    }
}

#[test]
fn mutations_never_panic_and_refusals_never_write() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    let img = mkfs(tmp.path(), "h.img", &src, 8, &["-b", "1024", "-N", "512"]);
    // A fragmented file with a depth-1 extent tree, made by our own editor.
    let base = {
        let dev = MemDisk::from_vec(std::fs::read(&img).expect("read"));
        for i in (0..150).step_by(2) {
            replace_file(&dev, &format!("/many/small{i:03}"), b"").expect("punch");
        }
        let rep = replace_file(&dev, "/etc/shadow", &vec![b'x'; 200_000]).expect("fragment");
        assert_eq!(rep.extent_depth, 1, "{rep:?}");
        dev.to_vec()
    };
    std::fs::write(&img, &base).expect("write");
    assert_fsck_clean(&img, "hostile base");
    let bs = 1024u64;
    let shadow_inode = inode_offset(&img, "/etc/shadow", bs);
    let etc_dir = first_block(&img, "/etc") * bs;
    let leaf = first_block(&img, "/etc/shadow"); // data block; find the leaf via the inode
    let _ = leaf;
    let idx_leaf = {
        let i = shadow_inode as usize + 0x28 + 12;
        u64::from(u32::from_le_bytes([
            base[i + 4],
            base[i + 5],
            base[i + 6],
            base[i + 7],
        ])) * bs
    };
    let regions: &[(&str, u64, u64)] = &[
        ("superblock", 1024, 1024),
        ("group descriptors", 2048, 64),
        ("shadow inode", shadow_inode, 256),
        ("extent root", shadow_inode + 0x28, 60),
        ("extent leaf block", idx_leaf, 64),
        ("/etc directory block", etc_dir, 256),
    ];
    let mut rng = Rng(7);
    for &(what, off, len) in regions {
        for round in 0..60 {
            let mut b = base.clone();
            let n = 1 + rng.below(3);
            for _ in 0..n {
                let at = (off + rng.below(len)) as usize;
                b[at] = match rng.below(4) {
                    0 => 0,
                    1 => 0xff,
                    _ => rng.next() as u8,
                };
            }
            exercise(&b, &format!("{what} round {round}"), tmp.path());
        }
    }
    // Truncated device.
    exercise(&base[..base.len() / 2], "truncated device", tmp.path());
    exercise(&base[..1500], "tiny device", tmp.path());
}
