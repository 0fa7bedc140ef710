//! The read side on every layout older and newer guests have, each made by mke2fs and judged
//! by debugfs: ext2 without `filetype`, ext3 indirect block maps (files and directories),
//! inline_data, 128-byte inodes with metadata_csum, meta_bg, bigalloc, and htree directories
//! of every hash (legacy, half_md4, tea; signed and unsigned) with names holding bytes >= 0x80.
//! Plus hostile mutations of the older layouts: never a panic or a hang.

mod common;
use common::*;
use std::process::Command;
use std::sync::Arc;
use vmdisk_block::{BlockDevice, MemDisk, RawFile};
use vmdisk_ext4::{Ext4, FileKind};

/// (name, mke2fs options)
const LAYOUTS: &[(&str, &[&str])] = &[
    (
        "ext2-no-filetype",
        &["-t", "ext2", "-b", "1024", "-O", "^filetype"],
    ),
    ("ext2", &["-t", "ext2", "-b", "4096"]),
    ("ext3-1k", &["-t", "ext3", "-b", "1024"]),
    ("ext3-4k", &["-t", "ext3", "-b", "4096"]),
    ("inline-data", &["-b", "4096", "-O", "inline_data"]),
    ("inode-128-csum", &["-b", "1024", "-I", "128"]),
    ("meta-bg", &["-b", "1024", "-O", "meta_bg,^resize_inode"]),
    ("bigalloc", &["-b", "1024", "-O", "bigalloc", "-C", "16384"]),
];

/// Switch the directory hash (and, with `unsigned`, unsigned-char hashing) and have e2fsck
/// rebuild every directory index with it.
fn rehash(img: &std::path::Path, alg: &str, unsigned: bool) {
    let mut req = format!("ssv def_hash_version {alg}");
    if unsigned {
        // EXT2_FLAGS_UNSIGNED_HASH
        req.push_str("\nssv flags 2");
    }
    let script = img.with_extension("debugfs");
    std::fs::write(&script, req).expect("write");
    let st = Command::new("debugfs")
        .arg("-w")
        .arg("-f")
        .arg(&script)
        .arg(img)
        .output()
        .expect("debugfs");
    assert!(st.status.success());
    let st = Command::new("e2fsck")
        .args(["-fyD"])
        .arg(img)
        .output()
        .expect("e2fsck");
    assert!(st.status.code().is_some_and(|c| c <= 1), "e2fsck -fyD");
    assert_fsck_clean(img, alg);
    let sb = String::from_utf8(debugfs(img, "stats")).expect("utf8");
    assert!(
        sb.contains(&format!("Default directory hash:   {alg}")),
        "{sb}"
    );
}

fn populate_names(root: &std::path::Path) {
    populate(root, SHADOW_OK);
    // A directory big enough for an htree, names with bytes >= 0x80 among them.
    let d = root.join("names");
    std::fs::create_dir_all(&d).expect("mkdir");
    for i in 0..400 {
        let name = match i % 4 {
            0 => format!("plain-{i:04}-{}", "n".repeat(40)),
            1 => format!("été-{i:04}-ünïcødé-{}", "é".repeat(20)),
            2 => format!("日本語-{i:04}"),
            _ => format!("\u{80}\u{ff}-{i:04}"),
        };
        std::fs::write(d.join(name), format!("file {i}\n")).expect("write");
    }
}

fn check(img: &std::path::Path, what: &str) {
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(img, true).expect("open image"));
    let fs = Ext4::open(dev).unwrap_or_else(|e| panic!("{what}: open: {e}"));
    let all = fs.walk("/").unwrap_or_else(|e| panic!("{what}: walk: {e}"));
    let files: Vec<_> = all.iter().filter(|e| e.kind == FileKind::File).collect();
    assert!(files.len() > 500, "{what}: {} files", files.len());
    for e in &files {
        // By path: every lookup goes through the directory, whatever its hash.
        let ours = fs
            .read_file(&e.path)
            .unwrap_or_else(|err| panic!("{what}: cat {}: {err}", e.path));
        if let Some(name) = e.path.strip_prefix("/names/") {
            // Content is "file N\n", N the 4-digit field of the name (debugfs per file would
            // be 400 processes per layout).
            let n: u32 = name
                .split('-')
                .find(|p| p.len() == 4 && p.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|p| p.parse().ok())
                .unwrap_or_else(|| panic!("{what}: name {name}"));
            assert_eq!(
                ours,
                format!("file {n}\n").into_bytes(),
                "{what}: {}",
                e.path
            );
            continue;
        }
        let mut theirs = debugfs(img, &format!("cat \"{}\"", e.path));
        // debugfs dumps an inline-data file's whole inline area, past i_size (the kernel reads
        // i_size bytes, as we do).
        if what.contains("inline") && theirs.len() > ours.len() {
            assert!(
                theirs[ours.len()..].iter().all(|&b| b == 0),
                "{what}: {}",
                e.path
            );
            theirs.truncate(ours.len());
        }
        assert_eq!(ours, theirs, "{what}: cat {}", e.path);
    }
    // The listing of the big directory equals debugfs's.
    let out = Command::new("debugfs")
        .args(["-R", "ls -p /names"])
        .arg(img)
        .output()
        .expect("debugfs");
    let mut theirs: Vec<Vec<u8>> = out
        .stdout
        .split(|&b| b == b'\n')
        .filter_map(|l| {
            // /ino/mode/uid/gid/name/size/
            let parts: Vec<&[u8]> = l.split(|&b| b == b'/').collect();
            (parts.len() >= 7).then(|| parts[5].to_vec())
        })
        .filter(|n| n != b"." && n != b"..")
        .collect();
    theirs.sort();
    let mut ours: Vec<Vec<u8>> = fs
        .read_dir("/names")
        .expect("read_dir")
        .into_iter()
        .map(|e| e.path_bytes[7..].to_vec())
        .collect();
    ours.sort();
    assert_eq!(ours.len(), 400, "{what}");
    assert_eq!(ours, theirs, "{what}: ls /names");
}

#[test]
fn every_layout_reads_like_debugfs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate_names(&src);
    for (name, opts) in LAYOUTS {
        let img = mkfs(tmp.path(), &format!("{name}.img"), &src, 48, opts);
        check(&img, name);
    }
}

#[test]
fn every_htree_hash_reads_like_debugfs() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate_names(&src);
    for alg in ["legacy", "half_md4", "tea"] {
        for unsigned in [false, true] {
            let name = format!("{alg}-{}", if unsigned { "unsigned" } else { "signed" });
            let img = mkfs(
                tmp.path(),
                &format!("{name}.img"),
                &src,
                48,
                &["-b", "1024"],
            );
            rehash(&img, alg, unsigned);
            check(&img, &name);
        }
    }
}

#[test]
fn hostile_old_layouts_never_panic() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    let mut rng = Rng(99);
    for (name, opts) in [
        ("ext3", &["-t", "ext3", "-b", "1024", "-N", "512"][..]),
        (
            "inline",
            &["-b", "1024", "-O", "inline_data", "-N", "512"][..],
        ),
    ] {
        let img = mkfs(tmp.path(), &format!("{name}.img"), &src, 8, opts);
        let base = std::fs::read(&img).expect("read");
        // Metadata lives in the first 300 KiB of these small images.
        for round in 0..300 {
            let mut b = base.clone();
            for _ in 0..1 + rng.below(8) {
                let at = (1024 + rng.below(300 << 10)) as usize;
                b[at] = rng.next() as u8;
            }
            // Claim recovery now and then, so the journal path runs on garbage too.
            if round % 3 == 0 {
                b[1024 + 0x60] |= 0x4;
            }
            let dev: Arc<dyn BlockDevice> = Arc::new(MemDisk::from_vec(b));
            if let Ok(fs) = Ext4::open(dev) {
                if let Ok(all) = fs.walk_lossy("/") {
                    for e in all.iter().take(300) {
                        let _ = fs.read_file(&e.path);
                        let _ = fs.read_link(&e.path);
                    }
                }
            }
        }
    }
}
