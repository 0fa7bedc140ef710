//! The editor against e2fsck -fn, debugfs and ext4-view, on every fixture variant.

mod common;
use common::*;
use std::sync::Arc;
use vmdisk_block::{BlockDevice, RawFile};
use vmdisk_ext4::{replace_file, Error, Ext4};

fn open_rw(img: &std::path::Path) -> RawFile {
    RawFile::open(img, false).expect("open image rw")
}

fn read_back(img: &std::path::Path, path: &str) -> Vec<u8> {
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(img, true).expect("open"));
    Ext4::open(dev)
        .expect("open ext4")
        .read_file(path)
        .expect("read")
}

#[test]
fn random_replacements_stay_fsck_clean() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    let mut depth1 = 0;
    let mut crossed_groups = 0;
    for (vi, (name, opts, mb)) in VARIANTS.iter().enumerate() {
        let img = mkfs(tmp.path(), &format!("{name}.img"), &src, *mb, opts);
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ vi as u64);
        let mut files: Vec<String> = vec![
            "/etc/shadow".into(),
            "/etc/passwd".into(),
            "/data/deep/deeper/f0".into(),
            "/data/deep/deeper/f6".into(),
            "/data/deep/deeper/f7".into(),
        ];
        // Punch holes: empty every other small file so later allocations fragment.
        {
            let dev = open_rw(&img);
            for i in (0..150).step_by(2) {
                replace_file(&dev, &format!("/many/small{i:03}"), b"").expect("empty");
            }
        }
        assert_fsck_clean(&img, &format!("{name}: after punching holes"));
        files.extend((1..150).step_by(2).map(|i| format!("/many/small{i:03}")));
        for batch in 0..4 {
            let dev = open_rw(&img);
            let mut expect = Vec::new();
            for _ in 0..4 {
                let path = files[rng.below(files.len() as u64) as usize].clone();
                let size = match rng.below(4) {
                    0 => rng.below(5000),
                    1 => rng.below(200_000),
                    _ => rng.below(3 << 20),
                } as usize;
                let content = rng.bytes(size);
                let before = dev.file().metadata().expect("md").len();
                match replace_file(&dev, &path, &content) {
                    Ok(rep) => {
                        if rep.extent_depth == 1 {
                            depth1 += 1;
                        }
                        if size > 1 << 20 {
                            crossed_groups += 1;
                        }
                        expect.retain(|(p, _)| p != &path);
                        expect.push((path, content));
                    }
                    Err(Error::NoSpace { .. }) | Err(Error::Unsupported { .. }) => {
                        // Refusals write nothing; the image keeps its size and stays clean.
                        assert_eq!(before, dev.file().metadata().expect("md").len());
                    }
                    Err(e) => panic!("{name}: replace {path} with {size} bytes: {e}"),
                }
            }
            drop(dev);
            assert_fsck_clean(&img, &format!("{name}: batch {batch}"));
            for (p, c) in &expect {
                assert!(
                    read_back(&img, p) == *c,
                    "{name}: ext4-view read-back of {p}"
                );
                assert!(
                    debugfs(&img, &format!("cat {p}")) == *c,
                    "{name}: debugfs cat {p}"
                );
            }
        }
        // Owner and mode stay.
        let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, true).expect("open"));
        let e = Ext4::open(dev)
            .expect("open")
            .stat("/etc/shadow")
            .expect("stat");
        assert_eq!(e.mode & 0o7777, 0o640, "{name}");
    }
    assert!(depth1 > 0, "no replacement needed a depth-1 extent tree");
    assert!(crossed_groups > 0);
}

#[test]
fn refuses_journal_recovery_unclean_and_unsupported_features() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    let img = mkfs(tmp.path(), "r.img", &src, 32, &["-b", "1024"]);
    let bytes = std::fs::read(&img).expect("read");
    let sb_fix = |b: &mut Vec<u8>| {
        // Recompute the superblock checksum (metadata_csum): crc32c over 0x400..0x7fc.
        let c = crc32c(&b[1024..1024 + 0x3fc]);
        b[1024 + 0x3fc..1024 + 0x400].copy_from_slice(&c.to_le_bytes());
    };
    // needs_recovery
    let mut b = bytes.clone();
    b[1024 + 0x60] |= 0x4;
    sb_fix(&mut b);
    let dev = vmdisk_block::MemDisk::from_vec(b.clone());
    let err = replace_file(&dev, "/etc/shadow", b"x").expect_err("must refuse");
    assert!(matches!(err, Error::NeedsRecovery), "{err}");
    // The message says how to get the journal replayed.
    let msg = err.to_string();
    assert!(
        msg.contains("boot the VM once") && msg.contains("e2fsck"),
        "{msg}"
    );
    assert!(dev.to_vec() == b);
    // not cleanly unmounted
    let mut b = bytes.clone();
    b[1024 + 0x3a] &= !1;
    sb_fix(&mut b);
    let dev = vmdisk_block::MemDisk::from_vec(b.clone());
    assert!(matches!(
        replace_file(&dev, "/etc/shadow", b"x"),
        Err(Error::NotClean { .. })
    ));
    assert!(dev.to_vec() == b);
    // inline_data, casefold, bigalloc, quota: refused by name
    for (feat, word) in [
        ("inline_data", "inline_data"),
        ("bigalloc", "bigalloc"),
        ("quota", "quota"),
        ("casefold", "casefold"),
    ] {
        let opts: &[&str] = if feat == "bigalloc" {
            &["-b", "1024", "-O", "bigalloc", "-C", "4096"]
        } else {
            &["-b", "1024", "-O", feat]
        };
        let img = mkfs(tmp.path(), &format!("{feat}.img"), &src, 32, opts);
        let before = std::fs::read(&img).expect("read");
        let dev = open_rw(&img);
        let err = replace_file(&dev, "/etc/shadow", b"x").expect_err(feat);
        assert!(err.to_string().contains(word), "{feat}: {err}");
        drop(dev);
        assert!(
            std::fs::read(&img).expect("read") == before,
            "{feat}: image changed"
        );
    }
    // Not a regular file / missing.
    let dev = vmdisk_block::MemDisk::from_vec(bytes.clone());
    assert!(matches!(
        replace_file(&dev, "/etc", b"x"),
        Err(Error::IsADirectory { .. })
    ));
    assert!(matches!(
        replace_file(&dev, "/etc/nope", b"x"),
        Err(Error::NotFound { .. })
    ));
    // Through a symlink: edits the target.
    replace_file(&dev, "/etc/passwd.link", b"root:x:0:0::/root:/bin/sh\n").expect("via link");
    assert!(dev.to_vec() != bytes);
}

fn crc32c(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0x82f6_3b78
            } else {
                crc >> 1
            };
        }
    }
    crc
}
