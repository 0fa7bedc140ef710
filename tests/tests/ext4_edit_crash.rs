//! Crash safety of the ext4 editor: a large batch edit (in a workload process,
//! `tests/src/bin/ext4-edit-workload.rs`) is SIGKILLed at 20 points spread over its commit
//! (just before its k-th device write). Every stopped image must be either
//! `e2fsck -fn` clean with the old tree, or need nothing but a journal replay (by e2fsck's
//! `-E journal_only`, or by vmdisk's own replay) to be clean with the new tree.

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use tests::ext4edit::{assert_same_tree, debugfs, debugfs_tree, e2fsck, mkfs, Model};
use vmdisk_block::{BlockDevice, RawFile};

/// Run the batch in the workload process, SIGKILLed before its `kill_after`-th write
/// (0: never); returns the device writes of a complete run.
fn batch(exe: &Path, img: &Path, kill_after: u64) -> u64 {
    let out = Command::new(exe)
        .arg(img)
        .arg(kill_after.to_string())
        .output()
        .expect("run the workload");
    if kill_after == 0 {
        assert!(
            out.status.success(),
            "workload: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("write count");
    }
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGKILL),
        "the workload was not killed at write {kill_after}: {:?} {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    0
}

fn same_as(got: &Model, want: &Model) -> bool {
    std::panic::catch_unwind(|| assert_same_tree(got, want, "")).is_ok()
}

fn crash_points(name: &str, args: &[&str]) {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    for d in ["old/x/y", "keep/a", "keep/b"] {
        std::fs::create_dir_all(src.join(d)).expect("mkdir");
    }
    for i in 0..50 {
        std::fs::write(src.join(format!("old/x/y/o{i}")), vec![b'o'; 3000]).expect("write");
        std::fs::write(src.join(format!("keep/b/k{i}")), b"keep").expect("write");
    }
    std::fs::write(src.join("keep/a/replaced"), vec![b'r'; 50_000]).expect("write");
    let orig = tmp.path().join("orig.img");
    mkfs(&orig, 32, args, Some(&src));
    let before = debugfs_tree(&orig);
    let full = tmp.path().join("full.img");
    std::fs::copy(&orig, &full).expect("copy");
    let exe = tests::cargo_build_bin("tests", "ext4-edit-workload");
    let w = batch(&exe, &full, 0);
    let (code, out) = e2fsck(&full);
    assert_eq!(code, 0, "{name}: full batch not clean: {out}");
    let after = debugfs_tree(&full);
    assert!(
        after.contains_key("new/f149")
            && !after.contains_key("old")
            && before.contains_key("old/x/y/o49"),
        "{name}: the batch did not do its work"
    );
    assert!(w >= 40, "{name}: only {w} device writes");
    let (mut old_seen, mut new_seen, mut replayed) = (0, 0, 0);
    // 14 points spread over the whole commit, and the last 6 writes (journal superblock,
    // checkpoint, journal emptied, needs_recovery cleared) one by one.
    let points: Vec<u64> = (0..14u64)
        .map(|p| p * (w - 6) / 14)
        .chain(w - 6..w)
        .collect();
    assert_eq!(points.len(), 20);
    for (p, &k) in points.iter().enumerate() {
        let img = tmp.path().join(format!("crash{k}.img"));
        std::fs::copy(&orig, &img).expect("copy");
        // Killed just before write k + 1: k writes reached the image.
        batch(&exe, &img, k + 1);
        let (code, out) = e2fsck(&img);
        if code == 0 && !debugfs(&img, "stats").stdout.contains("needs_recovery") {
            let t = debugfs_tree(&img);
            assert!(
                same_as(&t, &before) || same_as(&t, &after),
                "{name}: stopped after {k} writes: clean but neither the old nor the new tree"
            );
            if same_as(&t, &before) {
                old_seen += 1
            } else {
                new_seen += 1
            }
            std::fs::remove_file(&img).expect("remove");
            continue;
        }
        let stats = debugfs(&img, "stats").stdout;
        assert!(
            stats.contains("needs_recovery"),
            "{name}: stopped after {k} of {w} writes: not clean and no journal to replay:\n{out}"
        );
        // Half the points are replayed by e2fsck, half by vmdisk itself.
        if p % 2 == 0 {
            let r = tests::run(
                Command::new("e2fsck")
                    .args(["-E", "journal_only", "-y"])
                    .arg(&img),
            );
            assert!(
                r.code() <= 1,
                "{name}: e2fsck journal replay: {}{}",
                r.stdout,
                r.stderr
            );
        } else {
            let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, false).expect("open"));
            vmdisk_ext4::replay_journal(dev).expect("vmdisk journal replay");
        }
        let (code, out) = e2fsck(&img);
        assert_eq!(
            code, 0,
            "{name}: stopped after {k} of {w} writes, replayed: not clean:\n{out}"
        );
        let t = debugfs_tree(&img);
        assert!(
            same_as(&t, &after) || same_as(&t, &before),
            "{name}: stopped after {k} writes, replayed: neither the old nor the new tree"
        );
        if same_as(&t, &after) {
            new_seen += 1;
        }
        replayed += 1;
        std::fs::remove_file(&img).expect("remove");
    }
    eprintln!("{name}: {w} device writes; of 20 kill points {old_seen} left the old tree clean, {replayed} needed a journal replay, {new_seen} ended with the new tree");
    assert!(
        replayed > 0 && old_seen > 0 && new_seen > 0,
        "{name}: points: {old_seen} old, {new_seen} new, {replayed} replayed"
    );
}

#[test]
fn ext4_metadata_csum_survives_20_kill_points() {
    crash_points("ext4", &["-t", "ext4"]);
}

#[test]
fn ext3_survives_20_kill_points() {
    crash_points("ext3-1k", &["-t", "ext3", "-b", "1024"]);
}
