//! `vmdisk commit` and `vmdisk rebase`, judged by qemu-img: the same operation done by
//! `qemu-img commit` / `qemu-img rebase` on a twin copy must give the same guest contents, every
//! image must pass `qemu-img check`, and the guest view of the overlay must never change
//! except where the operation says so — also when vmdisk is SIGKILLed half-way.

use std::fs;
use std::path::Path;
use std::time::Duration;

use serde_json::Value;
use tests::*;

/// qemu's lock byte for "write" permission (see tests/tests/locks.rs).
const QEMU_PERM_WRITE: i64 = 101;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A base image (`fmt`, with `opts`) holding a seeded workload, and a qcow2 overlay on it
/// (with `ov_opts`) holding another, in `dir`. Names are relative, as users make them.
fn chain(dir: &Path, fmt: &str, opts: &str, ov_opts: &str, size: u64, seed: u64) {
    let rnd = dir.join("rnd.bin");
    make_rnd_file(&rnd, seed);
    let mut create = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        create.extend(["-o", opts]);
    }
    let size_s = size.to_string();
    create.extend(["base.img", size_s.as_str()]);
    qemu_img_in(dir, &create).ok();
    qemu_io_fmt(
        &dir.join("base.img"),
        fmt,
        &qemu_io_ops(seed, size, 64 * KIB, &rnd)
            .into_iter()
            // discards on a raw file are best-effort; keep the base's contents deterministic
            .filter(|op| fmt != "raw" || !op.starts_with("discard"))
            .collect::<Vec<_>>(),
    );
    let mut ov = vec!["create", "-q", "-f", "qcow2", "-b", "base.img", "-F", fmt];
    if !ov_opts.is_empty() {
        ov.extend(["-o", ov_opts]);
    }
    ov.push("ov.qcow2");
    qemu_img_in(dir, &ov).ok();
    qemu_io(
        &dir.join("ov.qcow2"),
        &qemu_io_ops(seed + 1000, size, 64 * KIB, &rnd),
    );
}

/// A third layer, `top.qcow2` on `ov.qcow2`, holding one qemu-io write.
fn top_on_ov(dir: &Path, write: &str) {
    qemu_img_in(
        dir,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "ov.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    )
    .ok();
    qemu_io(&dir.join("top.qcow2"), &[write.to_string()]);
}

/// Copy every file of `from` into `to` (a twin for the qemu-img side).
fn twin(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            fs::copy(e.path(), to.join(e.file_name())).unwrap();
        }
    }
}

/// `qemu-img map --output=json` entries of the overlay's own layer that hold something.
fn own_entries(dir: &Path, img: &str) -> Vec<Value> {
    let r = qemu_img_in(dir, &["map", "--output=json", img]).ok();
    let v: Value = serde_json::from_str(&r.stdout).expect("map json");
    v.as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .cloned()
        .collect()
}

#[test]
fn commit_matches_qemu_img_commit() {
    let cases = [
        ("qcow2", "", "", 1),
        ("qcow2", "compat=0.10,cluster_size=4096", "compat=0.10", 2),
        ("qcow2", "refcount_bits=1", "cluster_size=4096", 3),
        ("raw", "", "cluster_size=2M", 4),
    ];
    for (fmt, opts, ov_opts, seed) in cases {
        let what = format!("commit into {fmt} ({opts}) from overlay ({ov_opts})");
        let d = tmp();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::create_dir(&a).unwrap();
        chain(&a, fmt, opts, ov_opts, 24 * MIB, seed);
        let view = qemu_raw_sha(&a, "ov.qcow2", &d.path().join("view.raw"));
        twin(&a, &b);

        let r = vmdisk_in(&a, &["commit", "ov.qcow2"]).ok();
        assert!(r.stdout.contains("Committed"), "{what}: {r}");
        qemu_img_in(&b, &["commit", "-q", "ov.qcow2"]).ok();

        assert_eq!(
            qemu_raw_sha(&a, "ov.qcow2", &d.path().join("after.raw")),
            view,
            "{what}: the overlay's guest view changed"
        );
        let fmt_args = ["compare", "-f", fmt, "-F", fmt, "base.img", "../b/base.img"];
        let r = qemu_img_in(&a, &fmt_args);
        assert_eq!(
            r.code(),
            0,
            "{what}: base differs from qemu-img commit's:\n{r}"
        );
        assert_eq!(
            qemu_raw_sha(&a, "base.img", &d.path().join("base.raw")),
            view,
            "{what}: the base does not hold the overlay's view"
        );
        let own = own_entries(&a, "ov.qcow2");
        assert!(own.is_empty(), "{what}: overlay not emptied: {own:?}");
        assert_qemu_check_clean(&a.join("ov.qcow2"), &what);
        if fmt == "qcow2" {
            assert_qemu_check_clean(&a.join("base.img"), &what);
        }
    }
}

#[test]
fn commit_keep_leaves_the_overlay_and_grows_a_raw_base() {
    let d = tmp();
    let dir = d.path();
    chain(dir, "raw", "", "", 8 * MIB, 11);
    // The overlay is larger than its base: commit grows the base, as qemu-img does.
    qemu_img_in(dir, &["resize", "-q", "ov.qcow2", "12M"]).ok();
    qemu_io(
        &dir.join("ov.qcow2"),
        &["write -P 0x5a 10M 64k".to_string()],
    );
    let view = qemu_raw_sha(dir, "ov.qcow2", &dir.join("view.raw"));
    let before = own_entries(dir, "ov.qcow2");
    let r = vmdisk_in(dir, &["commit", "--keep", "--json", "ov.qcow2"]).ok();
    let v = r.json();
    assert_eq!(v["emptied"], false, "{r}");
    assert_eq!(v["grew"], true, "{r}");
    assert!(v["data_bytes"].as_u64().unwrap() > 0, "{r}");
    assert_eq!(fs::metadata(dir.join("base.img")).unwrap().len(), 12 * MIB);
    assert_eq!(qemu_raw_sha(dir, "base.img", &dir.join("b.raw")), view);
    assert_eq!(
        own_entries(dir, "ov.qcow2"),
        before,
        "--keep changed the overlay"
    );
    assert_qemu_check_clean(&dir.join("ov.qcow2"), "commit --keep");
}

#[test]
fn commit_into_a_middle_layer_leaves_the_bottom_alone() {
    let d = tmp();
    let dir = d.path();
    chain(dir, "qcow2", "", "", 16 * MIB, 21);
    top_on_ov(dir, "write -P 0x77 3M 200k");
    let base_sha = sha256(&dir.join("base.img"));
    let view = qemu_raw_sha(dir, "top.qcow2", &dir.join("view.raw"));
    vmdisk_in(dir, &["commit", "top.qcow2"]).ok();
    assert_eq!(
        sha256(&dir.join("base.img")),
        base_sha,
        "the bottom image was written"
    );
    assert_eq!(qemu_raw_sha(dir, "ov.qcow2", &dir.join("mid.raw")), view);
    assert_eq!(qemu_raw_sha(dir, "top.qcow2", &dir.join("top.raw")), view);
    assert_qemu_check_clean(&dir.join("ov.qcow2"), "middle layer");
}

#[test]
fn commit_keeps_internal_snapshots_of_the_overlay() {
    let d = tmp();
    let dir = d.path();
    chain(dir, "qcow2", "", "", 16 * MIB, 31);
    vmdisk_in(dir, &["snapshot", "create", "ov.qcow2", "before"]).ok();
    qemu_io(&dir.join("ov.qcow2"), &["write -P 0x99 5M 1M".to_string()]);
    let view = qemu_raw_sha(dir, "ov.qcow2", &dir.join("view.raw"));
    // The oracle: a twin of the chain (the backing path is relative) committed by qemu-img.
    let twin_dir = dir.join("twin");
    twin(dir, &twin_dir);
    let twin = twin_dir;
    vmdisk_in(dir, &["commit", "ov.qcow2"]).ok();
    qemu_img_in(&twin, &["commit", "-q", "ov.qcow2"]).ok();
    assert_qemu_check_clean(
        &dir.join("ov.qcow2"),
        "overlay with a snapshot after commit",
    );
    assert_eq!(qemu_raw_sha(dir, "ov.qcow2", &dir.join("a.raw")), view);
    let r = qemu_img_in(dir, &["compare", "base.img", "twin/base.img"]);
    assert_eq!(
        r.code(),
        0,
        "the committed base differs from qemu-img commit's:\n{r}"
    );
    // The snapshot still holds the overlay as it was; read through the (now newer) base it
    // shows its own clusters over the committed base, exactly as after qemu-img commit.
    let own = own_entries(dir, "ov.qcow2");
    assert!(
        own.is_empty(),
        "commit left clusters in the active layer: {own:?}"
    );
    for d in [dir, twin.as_path()] {
        qemu_img_in(d, &["snapshot", "-a", "before", "ov.qcow2"]).ok();
        assert_qemu_check_clean(&d.join("ov.qcow2"), "after applying the snapshot");
    }
    assert!(
        !own_entries(dir, "ov.qcow2").is_empty(),
        "the snapshot's clusters are gone"
    );
    assert_eq!(
        qemu_raw_sha(dir, "ov.qcow2", &dir.join("s.raw")),
        qemu_raw_sha(&twin, "ov.qcow2", &twin.join("s.raw")),
        "the snapshot reads differently than after qemu-img commit"
    );
}

#[test]
fn commit_refusals_touch_nothing() {
    let d = tmp();
    let dir = d.path();
    chain(dir, "qcow2", "", "", 8 * MIB, 41);
    let (ov_sha, base_sha) = (sha256(&dir.join("ov.qcow2")), sha256(&dir.join("base.img")));

    // No backing file.
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "lone.qcow2", "1M"]).ok();
    let r = vmdisk_in(dir, &["commit", "lone.qcow2"]);
    assert_eq!(r.code(), 1, "{r}");
    assert!(r.stderr.contains("no backing file"), "{r}");

    // The backing file held read-write by qemu: the lock is named, nothing changes.
    let sock = dir.join("nbd.sock");
    let mut bg = Background::spawn(
        std::process::Command::new(require_tool("qemu-nbd"))
            .arg("--socket")
            .arg(&sock)
            .args(["-f", "qcow2"])
            .arg(dir.join("base.img")),
        dir,
        "qemu-nbd",
    );
    assert!(
        wait_until(Duration::from_secs(20), || lock_byte_held(
            &dir.join("base.img"),
            QEMU_PERM_WRITE
        )),
        "TEST BUG: qemu-nbd did not lock the base"
    );
    let r = vmdisk_in(dir, &["commit", "ov.qcow2"]);
    bg.kill();
    assert_eq!(r.code(), 1, "{r}");
    assert!(
        r.stderr.contains("lock"),
        "the error does not name the lock: {r}"
    );
    assert_eq!(
        sha256(&dir.join("ov.qcow2")),
        ov_sha,
        "refused commit changed the overlay"
    );
    assert_eq!(
        sha256(&dir.join("base.img")),
        base_sha,
        "refused commit changed the base"
    );
}

#[test]
fn rebase_keeps_the_guest_view_like_qemu_img_rebase() {
    for (ov_opts, seed) in [("", 51), ("compat=0.10", 52), ("cluster_size=4096", 53)] {
        let what = format!("rebase of overlay ({ov_opts})");
        let d = tmp();
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        fs::create_dir(&a).unwrap();
        chain(&a, "qcow2", "", ov_opts, 16 * MIB, seed);
        // The new backing: different contents, partly equal to the old.
        qemu_img_in(&a, &["convert", "-O", "qcow2", "base.img", "new.qcow2"]).ok();
        qemu_io(
            &a.join("new.qcow2"),
            &qemu_io_ops(seed + 7, 16 * MIB, 64 * KIB, &a.join("rnd.bin")),
        );
        let view = qemu_raw_sha(&a, "ov.qcow2", &d.path().join("view.raw"));
        twin(&a, &b);

        let r = vmdisk_in(&a, &["rebase", "-b", "new.qcow2", "--json", "ov.qcow2"]).ok();
        let stats = r.json();
        assert!(stats["copied_bytes"].as_u64().unwrap() > 0, "{what}: {r}");
        qemu_img_in(
            &b,
            &["rebase", "-q", "-b", "new.qcow2", "-F", "qcow2", "ov.qcow2"],
        )
        .ok();

        let info = qemu_info(&a, "ov.qcow2");
        assert_eq!(info["backing-filename"], "new.qcow2", "{what}");
        assert_eq!(info["backing-filename-format"], "qcow2", "{what}");
        assert_eq!(
            qemu_raw_sha(&a, "ov.qcow2", &d.path().join("a.raw")),
            view,
            "{what}: the guest view changed"
        );
        assert_eq!(qemu_raw_sha(&b, "ov.qcow2", &d.path().join("b.raw")), view);
        assert_qemu_check_clean(&a.join("ov.qcow2"), &what);
        // No more than qemu-img copies (allocation within 10%).
        let (sa, sb) = (
            fs::metadata(a.join("ov.qcow2")).unwrap().len(),
            fs::metadata(b.join("ov.qcow2")).unwrap().len(),
        );
        assert!(sa <= sb + sb / 10, "{what}: {sa} bytes vs qemu-img's {sb}");
    }
}

#[test]
fn rebase_flatten_drop_a_layer_and_header_only() {
    let d = tmp();
    let dir = d.path();
    chain(dir, "qcow2", "", "", 16 * MIB, 61);
    top_on_ov(dir, "write -P 0x42 2M 100k");
    let view = qemu_raw_sha(dir, "top.qcow2", &dir.join("view.raw"));

    // Drop the middle layer: top now sits on base directly, same view.
    vmdisk_in(
        dir,
        &["rebase", "-b", "base.img", "-F", "qcow2", "top.qcow2"],
    )
    .ok();
    assert_eq!(qemu_info(dir, "top.qcow2")["backing-filename"], "base.img");
    assert_eq!(qemu_raw_sha(dir, "top.qcow2", &dir.join("1.raw")), view);
    assert_qemu_check_clean(&dir.join("top.qcow2"), "dropped layer");

    // Header only: move the base, point at its new name.
    let top_before = own_entries(dir, "top.qcow2");
    fs::create_dir(dir.join("sub")).unwrap();
    fs::rename(dir.join("base.img"), dir.join("sub/base.img")).unwrap();
    vmdisk_in(dir, &["rebase", "-u", "-b", "sub/base.img", "top.qcow2"]).ok();
    let info = qemu_info(dir, "top.qcow2");
    assert_eq!(info["backing-filename"], "sub/base.img");
    assert_eq!(
        info["backing-filename-format"], "qcow2",
        "probed format not written"
    );
    assert_eq!(
        own_entries(dir, "top.qcow2"),
        top_before,
        "-u touched the data"
    );
    assert_eq!(qemu_raw_sha(dir, "top.qcow2", &dir.join("2.raw")), view);

    // Flatten: no backing file, same view, standalone.
    vmdisk_in(dir, &["rebase", "-b", "", "top.qcow2"]).ok();
    let info = qemu_info(dir, "top.qcow2");
    assert!(info.get("backing-filename").is_none(), "{info}");
    fs::remove_file(dir.join("sub/base.img")).unwrap();
    assert_eq!(qemu_raw_sha(dir, "top.qcow2", &dir.join("3.raw")), view);
    assert_qemu_check_clean(&dir.join("top.qcow2"), "flattened");
}

/// SIGKILL `vmdisk commit` / `rebase` at moments spread over their run: every image stays
/// free of corruption and the overlay's guest view never changes (running the command again
/// then finishes the job).
#[test]
fn sigkill_during_commit_or_rebase_changes_no_view() {
    let d = tmp();
    let dir = d.path();
    // Big enough that the commands take a while, written with large extents.
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "base.img", "256M"]).ok();
    qemu_io(&dir.join("base.img"), &["write -P 0x11 0 96M".to_string()]);
    qemu_img_in(dir, &["create", "-q", "-f", "qcow2", "new.qcow2", "256M"]).ok();
    qemu_io(
        &dir.join("new.qcow2"),
        &["write -P 0x22 32M 96M".to_string()],
    );
    qemu_img_in(
        dir,
        &[
            "create", "-q", "-f", "qcow2", "-b", "base.img", "-F", "qcow2", "ov.qcow2",
        ],
    )
    .ok();
    qemu_io(
        &dir.join("ov.qcow2"),
        &[
            "write -P 0x33 64M 96M".to_string(),
            "write -z 8M 8M".to_string(),
        ],
    );
    let pristine = dir.join("pristine");
    twin(dir, &pristine);
    let view = qemu_raw_sha(dir, "ov.qcow2", &dir.join("view.raw"));

    let restore = || {
        for f in ["base.img", "new.qcow2", "ov.qcow2"] {
            fs::copy(pristine.join(f), dir.join(f)).unwrap();
        }
    };
    let commands: [&[&str]; 2] = [
        &["commit", "ov.qcow2"],
        &["rebase", "-b", "new.qcow2", "ov.qcow2"],
    ];
    // How long each takes uninterrupted: the kills are spread over that.
    let mut took = Vec::new();
    for args in commands {
        restore();
        let t = std::time::Instant::now();
        vmdisk_in(dir, args).ok();
        took.push(t.elapsed().as_millis() as u64);
    }

    let mut rng = Rng::new(77);
    for round in 0..12 {
        restore();
        let args = commands[round % 2];
        let at = rng.range(0, took[round % 2].max(2));
        let mut bg = Background::spawn(
            std::process::Command::new(vmdisk_bin())
                .current_dir(dir)
                .args(args),
            dir,
            "vmdisk",
        );
        std::thread::sleep(Duration::from_millis(at));
        bg.kill();
        let what = format!("round {round}: {args:?} killed after {at} ms");
        for f in ["base.img", "new.qcow2", "ov.qcow2"] {
            let (code, v, r) = qemu_check(&dir.join(f));
            let corrupt = v["corruptions"].as_u64().unwrap_or(0);
            assert!(
                corrupt == 0 && (code == 0 || code == 3),
                "{what}: {f} is corrupt:\n{r}"
            );
        }
        assert_eq!(
            qemu_raw_sha(dir, "ov.qcow2", &dir.join("after.raw")),
            view,
            "{what}: the overlay's guest view changed"
        );
        // Running it again completes the job.
        vmdisk_in(dir, args).ok();
        assert_eq!(
            qemu_raw_sha(dir, "ov.qcow2", &dir.join("again.raw")),
            view,
            "{what}"
        );
    }
}
