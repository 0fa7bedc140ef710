//! Issue #12, "nothing lost": every user mistake the issue reproduced gets a refusal that
//! names the file and says what to do, exits with the documented status (`vmdisk --help`,
//! "Exit status"), leaves every file sha256-identical and no temporary behind.
//!
//! The oracles are qemu-img (what it refuses, its `check` contract and output), qemu-nbd
//! holding an image as a running VM does, and the files' own bytes (sha256sum).
//!
//! Interrupts, ENOSPC and SIGKILL are in `nothing_lost_signals.rs` and `crash.rs`.

use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Stdio};

use tests::nothing_lost::*;
use tests::*;

/// A qcow2 with some data, made by qemu-img (so the refusals protect real images).
fn qcow2_with_data(d: &Path, name: &str, seed: u64) {
    let raw = d.join(format!(".{name}.src"));
    make_sparse_raw(&raw, 16 * MIB, seed, 8, 256 * KIB);
    qemu_img_in(d, &["convert", "-O", "qcow2", s(&raw), name]).ok();
    std::fs::remove_file(&raw).unwrap();
}

/// Run `vmdisk ARGS` in `d`; assert the refusal: exit `code`, every file in `d` as it was,
/// nothing left behind, and the output naming each of `names` (and none of `forbidden`).
#[track_caller]
fn refused(d: &Path, args: &[&str], code: i32, names: &[&str], forbidden: &[&str]) -> Run {
    let before = dir_state(d);
    let r = run_with_timeout(
        Command::new(vmdisk_bin()).current_dir(d).args(args),
        std::time::Duration::from_secs(120),
    );
    assert_eq!(r.code(), code, "expected exit {code}:\n{r}");
    let out = r.all_output_lower();
    for n in names {
        assert!(
            out.contains(&n.to_lowercase()),
            "the message does not name {n:?}:\n{r}"
        );
    }
    // A temporary is an implementation detail: a message names the file the user gave.
    for f in forbidden.iter().chain(&["vmdisk-tmp"]) {
        assert!(
            !out.contains(&f.to_lowercase()),
            "the message says {f:?}, which is wrong here:\n{r}"
        );
    }
    assert!(
        !r.stderr.contains("panicked"),
        "vmdisk panicked instead of refusing:\n{r}"
    );
    assert_unchanged(d, &before, "after a refusal", &r);
    r
}

/// What a refusal must never claim: damage, or a repair to run.
const NOT_CORRUPT: &[&str] = &["corrupt", "check -r"];

// ---------------------------------------------------------------------------------------------
// create
// ---------------------------------------------------------------------------------------------

#[test]
fn create_refuses_an_image_that_would_back_itself() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data(d, "x.qcow2", 1);
    // qemu-img refuses it too (the oracle for "this is a mistake, not a feature").
    let q = qemu_img_in(
        d,
        &[
            "create", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "x.qcow2",
        ],
    );
    assert!(
        !q.success(),
        "qemu-img accepted an image backed by itself:\n{q}"
    );

    refused(
        d,
        &["create", "-f", "qcow2", "-b", "x.qcow2", "x.qcow2"],
        1,
        &["x.qcow2", "backing", "itself"],
        NOT_CORRUPT,
    );
    refused(
        d,
        &[
            "create", "-f", "qcow2", "-b", "x.qcow2", "-F", "qcow2", "x.qcow2",
        ],
        1,
        &["x.qcow2", "itself"],
        NOT_CORRUPT,
    );
    // The same file by another name: a symlink, a hard link, a path through "..".
    symlink("x.qcow2", d.join("link.qcow2")).unwrap();
    std::fs::hard_link(d.join("x.qcow2"), d.join("hard.qcow2")).unwrap();
    std::fs::create_dir(d.join("sub")).unwrap();
    for b in ["link.qcow2", "hard.qcow2", "sub/../x.qcow2"] {
        refused(
            d,
            &["create", "-f", "qcow2", "-b", b, "x.qcow2"],
            1,
            &["x.qcow2", "itself"],
            NOT_CORRUPT,
        );
    }
    // A relative backing name is relative to the new image's directory.
    refused(
        d,
        &["create", "-f", "qcow2", "-b", "x.qcow2", "sub/../x.qcow2"],
        1,
        &["x.qcow2", "itself"],
        NOT_CORRUPT,
    );
}

#[test]
fn create_refuses_a_loop_through_a_longer_chain() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // c.qcow2 <- b.qcow2 <- a.qcow2 (a's backing is b, b's is c)
    qcow2_with_data(d, "c.qcow2", 2);
    qemu_img_in(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "c.qcow2", "-F", "qcow2", "b.qcow2",
        ],
    )
    .ok();
    qemu_img_in(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    )
    .ok();
    // Re-creating b (or c) on top of a would make b part of its own chain.
    for (dst, chain) in [("b.qcow2", "a.qcow2"), ("c.qcow2", "b.qcow2")] {
        refused(
            d,
            &["create", "-f", "qcow2", "-b", "a.qcow2", dst],
            1,
            &[dst, chain, "itself"],
            NOT_CORRUPT,
        );
    }
    // A chain that does not lead back is fine (the refusal is not over-eager).
    vmdisk_in(
        d,
        &["create", "-q", "-f", "qcow2", "-b", "a.qcow2", "top.qcow2"],
    )
    .ok();
    assert_eq!(qemu_info(d, "top.qcow2")["backing-filename"], "a.qcow2");
}

#[test]
fn create_with_a_bad_size_touches_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data(d, "precious.qcow2", 3);
    std::fs::write(d.join("precious.raw"), mixed_data(3, 1 << 20)).unwrap();
    // 1e is 1 EiB: more than qcow2 can describe (a raw file that big is the host
    // filesystem's business, so raw gets only sizes that do not parse).
    for (fmt, file, sizes) in [
        (
            "qcow2",
            "precious.qcow2",
            &["1e", "12Q", "99999999999E", "", "1.5.5G"][..],
        ),
        (
            "raw",
            "precious.raw",
            &["12Q", "99999999999E", "", "1.5.5G"],
        ),
    ] {
        for size in sizes {
            refused(
                d,
                &["create", "-f", fmt, file, size],
                1,
                &[file, "size"],
                NOT_CORRUPT,
            );
        }
    }
    // Larger than qcow2 can describe with these clusters: refused before any file exists.
    refused(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            "precious.qcow2",
            "8E",
        ],
        1,
        &["size"],
        NOT_CORRUPT,
    );
    // Bad options, likewise.
    refused(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=3k",
            "precious.qcow2",
            "1G",
        ],
        1,
        &["cluster_size"],
        NOT_CORRUPT,
    );
}

// ---------------------------------------------------------------------------------------------
// Destinations that are inputs, or held by qemu
// ---------------------------------------------------------------------------------------------

#[test]
fn convert_refuses_its_own_source_by_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data(d, "base.qcow2", 4);
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    )
    .ok();
    qemu_io(&d.join("ov.qcow2"), &["write -P 0x33 1M 64k".into()]);
    std::fs::write(d.join("a.raw"), mixed_data(4, 1 << 20)).unwrap();
    symlink("a.raw", d.join("a-link.raw")).unwrap();
    std::fs::hard_link(d.join("a.raw"), d.join("a-hard.raw")).unwrap();
    for (src, dst) in [
        ("a.raw", "a.raw"),
        ("a.raw", "a-link.raw"),
        ("a-link.raw", "a.raw"),
        ("a.raw", "a-hard.raw"),
        ("a.raw", "./a.raw"),
    ] {
        for fmt in ["raw", "qcow2"] {
            refused(
                d,
                &["convert", "-O", fmt, src, dst],
                1,
                &[dst, "source"],
                &["lock", "corrupt"],
            );
        }
    }
    // The destination is a backing file of the source.
    refused(
        d,
        &["convert", "-O", "qcow2", "ov.qcow2", "base.qcow2"],
        1,
        &["base.qcow2", "backing"],
        &["lock", "corrupt"],
    );
    refused(
        d,
        &["convert", "-O", "raw", "ov.qcow2", "ov.qcow2"],
        1,
        &["ov.qcow2", "source"],
        &["lock", "corrupt"],
    );
    // copy: the same file, by name and through links.
    for dst in ["a.raw", "a-link.raw", "a-hard.raw"] {
        refused(
            d,
            &["copy", "--reflink=never", "--force", "a.raw", dst],
            1,
            &["a.raw", dst, "same file"],
            &["lock", "corrupt"],
        );
    }
}

#[test]
fn a_destination_qemu_holds_is_refused_as_locked() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data(d, "held.qcow2", 5);
    std::fs::write(d.join("src.raw"), mixed_data(5, 2 << 20)).unwrap();
    let holder = qemu_holds(&d.join("held.qcow2"), "qcow2");
    let held = d.join("held.qcow2");
    let before_holder = sha256(&held);
    // qemu-nbd's socket is not in `d`; only the held image and the source are.
    for args in [
        &["convert", "-O", "qcow2", "src.raw", "held.qcow2"][..],
        &["convert", "-O", "raw", "src.raw", "held.qcow2"],
        &["create", "-f", "qcow2", "held.qcow2", "16M"],
        &["create", "-f", "raw", "held.qcow2", "16M"],
        &[
            "copy",
            "--reflink=never",
            "--force",
            "src.raw",
            "held.qcow2",
        ],
    ] {
        refused(d, args, 1, &["held.qcow2", "lock"], &["corrupt"]);
    }
    // The destination is the source itself, and qemu holds it: the message says "source"
    // (the real mistake), not that another process holds the lock.
    refused(
        d,
        &["convert", "-U", "-O", "raw", "held.qcow2", "held.qcow2"],
        1,
        &["held.qcow2", "source"],
        &["locked by", "corrupt"],
    );
    drop(holder);
    assert_eq!(sha256(&held), before_holder);
    // Without qemu, the same destination is accepted (the refusal was the lock).
    vmdisk_in(d, &["convert", "-O", "qcow2", "src.raw", "held.qcow2"]).ok();
    assert_qemu_check_clean(&held, "converted after qemu let go");
}

#[test]
fn the_source_itself_is_not_reported_as_locked() {
    // vmdisk holds the source's read lock while it writes: a destination that is the source
    // must be refused as the source, never as "locked by another process".
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data(d, "x.qcow2", 6);
    for args in [
        &["convert", "-O", "qcow2", "x.qcow2", "x.qcow2"][..],
        &["create", "-f", "qcow2", "-b", "x.qcow2", "x.qcow2"],
        &["rebase", "-b", "x.qcow2", "x.qcow2"],
        &["rebase", "-u", "-b", "x.qcow2", "x.qcow2"],
    ] {
        refused(
            d,
            args,
            1,
            &["x.qcow2"],
            &["locked by", "another process", "corrupt"],
        );
    }
}

// ---------------------------------------------------------------------------------------------
// passwd -o
// ---------------------------------------------------------------------------------------------

fn as_strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

#[test]
fn passwd_overlay_never_destroys_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_guest(&d.join("p.qcow2"), "qcow2", &[]);
    // An undo snapshot (what an earlier passwd left) must survive every refusal too.
    vmdisk_in(d, &["snapshot", "create", "p.qcow2", "earlier"]).ok();
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "p.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
        ],
    )
    .ok();
    qcow2_with_data(d, "unrelated.qcow2", 7);
    symlink("p.qcow2", d.join("p-link.qcow2")).unwrap();
    std::fs::hard_link(d.join("p.qcow2"), d.join("p-hard.qcow2")).unwrap();
    let pw = |img: &str, ov: &str| -> Vec<String> {
        ["passwd", "-o", ov, img, "root", "--hash", HASH]
            .iter()
            .map(|x| x.to_string())
            .collect()
    };
    // -o names the image itself, or a file of its chain, by any name.
    for (img, ov) in [
        ("p.qcow2", "p.qcow2"),
        ("p.qcow2", "p-link.qcow2"),
        ("p.qcow2", "p-hard.qcow2"),
        ("p-link.qcow2", "p.qcow2"),
        ("top.qcow2", "p.qcow2"),
        ("top.qcow2", "top.qcow2"),
    ] {
        let mut a = pw(img, ov);
        a.push("--force".into());
        refused(d, &as_strs(&pw(img, ov)), 1, &[ov], NOT_CORRUPT);
        refused(d, &as_strs(&a), 1, &[ov], NOT_CORRUPT);
    }
    // An existing, unrelated file is refused without --force ...
    refused(
        d,
        &as_strs(&pw("p.qcow2", "unrelated.qcow2")),
        1,
        &["unrelated.qcow2", "--force"],
        NOT_CORRUPT,
    );
    // ... and with --force it is replaced only at the end: an edit that is refused (no such
    // user) leaves it as it was.
    let unrelated = pw("p.qcow2", "unrelated.qcow2");
    let mut a = as_strs(&unrelated);
    a[4] = "nobody-here";
    a.push("--force");
    refused(d, &a, 1, &["nobody-here"], NOT_CORRUPT);
    // A real edit with --force replaces it with an overlay of p.qcow2, and p.qcow2 (with its
    // snapshots) stays as it was.
    let p_sha = sha256(&d.join("p.qcow2"));
    let mut a = as_strs(&unrelated);
    a.push("--force");
    let r = vmdisk_in(d, &a).ok();
    assert_eq!(sha256(&d.join("p.qcow2")), p_sha, "p.qcow2 changed:\n{r}");
    let info = qemu_info(d, "unrelated.qcow2");
    assert!(
        info["backing-filename"]
            .as_str()
            .is_some_and(|b| b.ends_with("/p.qcow2")),
        "unrelated.qcow2 is not an overlay of p.qcow2 now: {info:#}"
    );
    assert_qemu_check_clean(&d.join("unrelated.qcow2"), "the new overlay");
    assert_no_leftovers(d, "passwd -o --force", &r);
    let shadow = vmdisk_in(d, &["cat", "unrelated.qcow2", "/etc/shadow"]).ok();
    assert!(
        shadow.stdout.contains(HASH),
        "the overlay lacks the edit:\n{shadow}"
    );
    let snaps = qemu_img_in(d, &["snapshot", "-l", "p.qcow2"]).ok();
    assert!(
        snaps.stdout.contains("earlier"),
        "p.qcow2 lost its snapshot:\n{snaps}"
    );
}

// ---------------------------------------------------------------------------------------------
// create --layout whose content does not fit
// ---------------------------------------------------------------------------------------------

#[test]
fn a_layout_that_does_not_fit_leaves_the_old_disk() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // ~100 MB of incompressible files for a root partition of ~70 MB.
    let tree = d.join("rootfs");
    std::fs::create_dir_all(tree.join("data")).unwrap();
    for i in 0..10 {
        std::fs::write(
            tree.join(format!("data/blob{i}")),
            random_bytes(100 + i, 10 << 20),
        )
        .unwrap();
    }
    make_guest(&d.join("disk.raw"), "raw", &[]);
    make_guest(&d.join("disk.qcow2"), "qcow2", &[]);
    let layout = esp_root_layout();
    let copy_in = format!("root={}", s(&tree));
    for (fmt, file, size) in [
        ("raw", "disk.raw", "200M"),
        ("qcow2", "disk.qcow2", "200M"),
        ("raw", "disk.raw", "130M"),
    ] {
        refused(
            d,
            &[
                "create",
                "-f",
                fmt,
                "--layout",
                s(&layout),
                "--copy-in",
                &copy_in,
                file,
                size,
            ],
            1,
            &[file, "nothing was written"],
            NOT_CORRUPT,
        );
    }
    // A size the host cannot hold (100T, sparse or not): refused before writing, or built;
    // never the old disk destroyed half-way.
    for (fmt, file) in [("raw", "disk.raw"), ("qcow2", "disk.qcow2")] {
        let before = dir_state(d);
        let r = run_with_timeout(
            Command::new(vmdisk_bin()).current_dir(d).args([
                "create",
                "-f",
                fmt,
                "--layout",
                s(&layout),
                "--copy-in",
                &copy_in,
                file,
                "100T",
            ]),
            std::time::Duration::from_secs(120),
        );
        assert_no_leftovers(d, "create --layout 100T", &r);
        if r.success() {
            assert_qemu_check_ok(&d.join(file), fmt, "a 100T layout disk");
        } else {
            assert_eq!(r.code(), 1, "{r}");
            assert_unchanged(d, &before, "a refused 100T layout", &r);
            assert!(r.stderr.contains(file) || r.stderr.contains("100"), "{r}");
        }
    }
}

/// qemu-img check (qcow2) or info (raw) accepts the image.
#[track_caller]
fn assert_qemu_check_ok(img: &Path, fmt: &str, what: &str) {
    if fmt == "qcow2" {
        assert_qemu_check_clean(img, what);
    } else {
        qemu_img(&["info", "-f", "raw", s(img)]).ok();
    }
}

// ---------------------------------------------------------------------------------------------
// Wrong -f, non-qcow2 for qcow2-only commands
// ---------------------------------------------------------------------------------------------

#[test]
fn a_wrong_format_says_what_the_file_looks_like() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_guest(&d.join("g.raw"), "raw", &[]);
    qcow2_with_data(d, "q.qcow2", 8);
    // a qcow2 declared raw, for a command that writes
    refused(
        d,
        &["check", "-r", "all", "-f", "raw", "q.qcow2"],
        1,
        &["q.qcow2", "looks like a qcow2", "-f qcow2"],
        NOT_CORRUPT,
    );
    refused(
        d,
        &[
            "passwd",
            "-f",
            "raw",
            "--in-place",
            "q.qcow2",
            "root",
            "--hash",
            HASH,
        ],
        1,
        &["q.qcow2", "qcow2", "-f qcow2"],
        NOT_CORRUPT,
    );
    // a raw disk declared qcow2, for reads and writes
    for args in [
        &["inspect", "-f", "qcow2", "g.raw"][..],
        &["map", "-f", "qcow2", "g.raw"],
        &["convert", "-f", "qcow2", "-O", "raw", "g.raw", "out.raw"],
        &["check", "-f", "qcow2", "g.raw"],
        &["passwd", "-f", "qcow2", "g.raw", "root", "--hash", HASH],
    ] {
        refused(
            d,
            args,
            1,
            &[
                "g.raw",
                "looks like a raw disk with a gpt partition table",
                "-f raw",
            ],
            NOT_CORRUPT,
        );
    }
    // qcow2-only commands given a raw file
    for args in [
        &["commit", "g.raw"][..],
        &["rebase", "-b", "q.qcow2", "g.raw"],
        &["rebase", "-u", "-b", "q.qcow2", "g.raw"],
        &["snapshot", "create", "g.raw", "s"],
    ] {
        refused(
            d,
            args,
            1,
            &[
                "g.raw",
                "not a qcow2",
                "looks like a raw disk with a gpt partition table",
            ],
            NOT_CORRUPT,
        );
    }
    // A VMDK (made by qemu-img) is named as one.
    qemu_img_in(d, &["create", "-q", "-f", "vmdk", "v.vmdk", "16M"]).ok();
    refused(
        d,
        &["commit", "v.vmdk"],
        1,
        &["v.vmdk", "vmdk"],
        NOT_CORRUPT,
    );
}

// ---------------------------------------------------------------------------------------------
// Missing and looping backing files
// ---------------------------------------------------------------------------------------------

#[test]
fn a_missing_backing_file_is_named_with_the_rebase_hint() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data(d, "base.qcow2", 9);
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    )
    .ok();
    std::fs::rename(d.join("base.qcow2"), d.join("moved.qcow2")).unwrap();
    // qemu-img agrees the chain is broken.
    let q = qemu_img_in(d, &["check", "ov.qcow2"]);
    assert_eq!(q.code(), 1, "{q}");
    for args in [
        &["inspect", "--backing-chain", "ov.qcow2"][..],
        &["check", "ov.qcow2"],
        &["convert", "-O", "raw", "ov.qcow2", "out.raw"],
        &["map", "ov.qcow2"],
        &["commit", "ov.qcow2"],
        &[
            "rebase",
            "-b",
            "moved.qcow2",
            "-F",
            "qcow2",
            "-p",
            "ov.qcow2",
        ],
    ] {
        let r = refused(
            d,
            args,
            1,
            &["backing file of ov.qcow2", "base.qcow2", "rebase -u"],
            NOT_CORRUPT,
        );
        assert!(!r.stderr.contains("(os error"), "a raw OS error:\n{r}");
    }
    // The hint works: rebase -u onto the moved file, then the chain reads again.
    vmdisk_in(d, &["rebase", "-u", "-b", "moved.qcow2", "ov.qcow2"]).ok();
    vmdisk_in(d, &["check", "ov.qcow2"]).ok();
}

#[test]
fn check_of_a_looping_chain_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img_in(d, &["create", "-q", "-f", "qcow2", "b.qcow2", "16M"]).ok();
    qemu_img_in(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    )
    .ok();
    // qemu-img check of a loop does not terminate: the loop is made with qemu-img's -u
    // rebase, which does not follow the chain, and qemu-img check is never run on it.
    qemu_img_in(
        d,
        &["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"],
    )
    .ok();
    for (img, json) in [("a.qcow2", false), ("b.qcow2", true)] {
        let mut args = vec!["check"];
        if json {
            args.push("--json");
        }
        args.push(img);
        let r = refused(d, &args, 1, &[img, "loop"], NOT_CORRUPT);
        if json {
            let v = r.json();
            assert!(
                v["error"].as_str().is_some_and(|e| e.contains("loop")),
                "{r}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// check's exit contract (qemu-img's)
// ---------------------------------------------------------------------------------------------

/// Give `img` `n` leaked clusters the way a killed writer does: refcounts of 1 for clusters
/// nothing references (appended past the end). Cluster size 64 KiB, refcount_bits 16.
fn leak_clusters(img: &Path, n: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(img)
        .unwrap();
    let mut hdr = [0u8; 104];
    f.read_exact_at(&mut hdr, 0).unwrap();
    let be64 = |o: usize| u64::from_be_bytes(hdr[o..o + 8].try_into().unwrap());
    assert_eq!(
        1u64 << u32::from_be_bytes(hdr[20..24].try_into().unwrap()),
        65536
    );
    let rt = be64(48);
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, rt).unwrap();
    let rb = u64::from_be_bytes(e);
    assert!(rb != 0, "TEST BUG: no refcount block");
    let len = f.metadata().unwrap().len();
    let first = len.div_ceil(65536);
    assert!(first + n < 32768, "TEST BUG: past the first refcount block");
    for c in first..first + n {
        f.write_all_at(&1u16.to_be_bytes(), rb + 2 * c).unwrap();
    }
    f.set_len((first + n) * 65536).unwrap();
}

#[test]
fn check_follows_qemu_img_exit_statuses_and_output() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qcow2_with_data(d, "clean.qcow2", 10);
    std::fs::write(d.join("r.raw"), mixed_data(10, 1 << 20)).unwrap();

    // Usage errors exit 1 (check's 2 means "corruptions").
    for args in [
        &["check"][..],
        &["check", "-r", "bogus", "clean.qcow2"],
        &["check", "--no-such-flag", "clean.qcow2"],
        &["check", "-r", "all", "-U", "clean.qcow2"],
    ] {
        let q = qemu_img_in(d, args);
        assert_eq!(
            q.code(),
            1,
            "qemu-img's usage errors exit 1 (TEST BUG?):\n{q}"
        );
        refused(d, args, 1, &[], &[]);
    }
    // A raw image: exit 63 and qemu-img's message, with --json too (JSON on stdout).
    let q = qemu_img_in(d, &["check", "-f", "raw", "r.raw"]);
    assert_eq!(q.code(), 63, "{q}");
    assert!(
        q.stderr
            .contains("This image format does not support checks"),
        "{q}"
    );
    let r = refused(
        d,
        &["check", "r.raw"],
        63,
        &["This image format does not support checks"],
        &[],
    );
    assert!(
        r.stdout.trim().is_empty(),
        "human check of raw printed on stdout:\n{r}"
    );
    let r = refused(d, &["check", "--json", "r.raw"], 63, &["r.raw"], &[]);
    let v = r.json();
    assert_eq!(v["filename"], "r.raw", "{r}");
    // --json prints JSON even when the file does not exist.
    let r = refused(
        d,
        &["check", "--json", "missing.qcow2"],
        1,
        &["missing.qcow2"],
        &[],
    );
    let v = r.json();
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("missing.qcow2")),
        "{r}"
    );
    // -q: nothing on stdout for a clean image (qemu-img -q neither).
    let q = qemu_img_in(d, &["check", "-q", "clean.qcow2"]).ok();
    assert!(q.stdout.is_empty(), "{q}");
    let r = vmdisk_in(d, &["check", "-q", "clean.qcow2"]).ok();
    assert!(
        r.stdout.is_empty() && r.stderr.is_empty(),
        "check -q is not quiet:\n{r}"
    );

    // Leaks: exit 3, and -r leaks / -r all print the repair summary once, like qemu-img.
    for mode in ["leaks", "all"] {
        let (q_img, v_img) = (format!("q-{mode}.qcow2"), format!("v-{mode}.qcow2"));
        for f in [&q_img, &v_img] {
            std::fs::copy(d.join("clean.qcow2"), d.join(f)).unwrap();
            leak_clusters(&d.join(f), 3);
        }
        assert_eq!(qemu_img_in(d, &["check", &q_img]).code(), 3);
        assert_eq!(vmdisk_in(d, &["check", &v_img]).code(), 3);
        let q = qemu_img_in(d, &["check", "-r", mode, &q_img]);
        let v = vmdisk_in(d, &["check", "-r", mode, &v_img]);
        assert_eq!(
            v.code(),
            q.code(),
            "exit status differs from qemu-img's\nvmdisk:\n{v}\nqemu-img:\n{q}"
        );
        for line in [
            "The following inconsistencies were found and repaired:",
            "Double checking the fixed image now...",
            "No errors were found on the image.",
            "3 leaked clusters",
        ] {
            let (nq, nv) = (
                q.stdout.matches(line).count(),
                v.stdout.matches(line).count(),
            );
            assert_eq!(
                nv, nq,
                "{line:?} appears {nv} times in vmdisk's output, {nq} in qemu-img's\nvmdisk:\n{v}\nqemu-img:\n{q}"
            );
        }
        assert_eq!(
            v.stdout.replace(&v_img, "IMG"),
            q.stdout.replace(&q_img, "IMG"),
            "check -r {mode} output differs from qemu-img's"
        );
        assert_qemu_check_clean(&d.join(&v_img), "after vmdisk check -r");
        assert_no_leftovers(d, "check -r", &v);
    }
}

// ---------------------------------------------------------------------------------------------
// Broken pipes
// ---------------------------------------------------------------------------------------------

/// Run `vmdisk ARGS` with stdout into a pipe the test closes after `keep` bytes (`| head -c`);
/// the command must end quietly: nothing on stderr, no panic, no error status of its own.
#[track_caller]
fn ends_quietly_on_a_closed_pipe(d: &Path, args: &[&str], keep: usize) {
    use std::io::Read as _;
    let line = format!("vmdisk {} | head -c {keep}", args.join(" "));
    let mut child = Command::new(vmdisk_bin())
        .current_dir(d)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got = vec![0u8; keep];
    out.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("{line}: reading: {e}"));
    drop(out);
    let mut err = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let st = child.wait().unwrap();
    use std::os::unix::process::ExitStatusExt;
    let sigpipe = st.signal() == Some(libc::SIGPIPE);
    assert!(
        err.is_empty() && (sigpipe || st.success()),
        "{line}: expected a silent end (killed by SIGPIPE, as cat is), got {st}, stderr:\n{err}"
    );
}

#[test]
fn read_commands_end_silently_on_a_closed_pipe() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let mut files: Vec<(String, Vec<u8>)> = (0..600)
        .map(|i| (format!("many/dir{}/file{i}", i % 20), vec![b'x'; 10]))
        .collect();
    files.push(("big.bin".into(), random_bytes(11, 8 << 20)));
    let extra: Vec<(&str, Vec<u8>)> = files.iter().map(|(p, b)| (p.as_str(), b.clone())).collect();
    make_guest(&d.join("g.qcow2"), "qcow2", &extra);
    // A map with thousands of entries: every other 64 KiB cluster allocated.
    qemu_img_in(d, &["create", "-q", "-f", "qcow2", "m.qcow2", "1G"]).ok();
    let cmds: Vec<String> = (0..2000)
        .map(|i| format!("write -P 1 {}k 4k", i * 128))
        .collect();
    qemu_io(&d.join("m.qcow2"), &cmds);
    ends_quietly_on_a_closed_pipe(d, &["cat", "g.qcow2", "/big.bin"], 10);
    ends_quietly_on_a_closed_pipe(d, &["map", "--json", "m.qcow2"], 10);
    ends_quietly_on_a_closed_pipe(d, &["map", "m.qcow2"], 10);
    ends_quietly_on_a_closed_pipe(d, &["ls", "-R", "g.qcow2", "/"], 10);
    ends_quietly_on_a_closed_pipe(d, &["ls", "-R", "--json", "g.qcow2", "/"], 10);
}

// ---------------------------------------------------------------------------------------------
// Messages: the path and the operation, never a bare OS error or a probe offset
// ---------------------------------------------------------------------------------------------

#[test]
fn host_errors_name_the_path_and_the_operation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::write(d.join("a.raw"), mixed_data(12, 1 << 20)).unwrap();
    std::fs::create_dir(d.join("adir")).unwrap();
    let ad = s(&d.join("adir")).to_string();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["inspect".into(), ad.clone()], "adir"),
        (vec!["inspect".into(), "/tmp".into()], "/tmp"),
        (vec!["map".into(), ad.clone()], "adir"),
        (vec!["check".into(), ad.clone()], "adir"),
        (
            vec![
                "convert".into(),
                "-O".into(),
                "raw".into(),
                ad.clone(),
                "out.raw".into(),
            ],
            "adir",
        ),
        (
            vec![
                "convert".into(),
                "-O".into(),
                "raw".into(),
                "/tmp".into(),
                "out.raw".into(),
            ],
            "/tmp",
        ),
        (
            vec![
                "convert".into(),
                "-O".into(),
                "raw".into(),
                "a.raw".into(),
                ad.clone(),
            ],
            "adir",
        ),
        (
            vec![
                "create".into(),
                "-f".into(),
                "raw".into(),
                ad.clone(),
                "1M".into(),
            ],
            "adir",
        ),
        (vec!["commit".into(), ad.clone()], "adir"),
        (
            vec!["snapshot".into(), "create".into(), ad.clone(), "s".into()],
            "adir",
        ),
        (
            vec!["inspect".into(), "no/such/dir/x.qcow2".into()],
            "no/such/dir/x.qcow2",
        ),
        (
            vec![
                "convert".into(),
                "-O".into(),
                "raw".into(),
                "a.raw".into(),
                "no/such/dir/out".into(),
            ],
            "no/such/dir",
        ),
        (
            vec![
                "create".into(),
                "-f".into(),
                "qcow2".into(),
                "no/such/dir/x.qcow2".into(),
                "1M".into(),
            ],
            "no/such/dir",
        ),
        (
            vec!["copy".into(), "a.raw".into(), "no/such/dir/out".into()],
            "no/such/dir",
        ),
    ];
    for (args, name) in &cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let r = refused(d, &a, 1, &[name], &["at offset", "panicked"]);
        for l in r.stderr.lines().filter(|l| l.contains("os error")) {
            assert!(
                l.contains(name),
                "an OS error without the path it happened to:\n  {l}\n{r}"
            );
        }
        if std::path::Path::new(name).is_dir() || name.contains("adir") {
            assert!(
                r.stderr.contains("directory"),
                "does not say it is a directory:\n{r}"
            );
        }
    }
}

#[test]
fn passwd_is_not_refused_for_an_undo_snapshot_name_taken_already() {
    // Two passwd runs in one second (or one after a run killed after its snapshot) used to
    // fail: "a snapshot named 'vmdisk-before-passwd-...' already exists". Take the names of
    // the next seconds first, so the clash is certain.
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_guest(&d.join("g.qcow2"), "qcow2", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    for t in now..now + 20 {
        let name = format!("vmdisk-before-passwd-{}", vmdisk_guest_stamp(t));
        qemu_img_in(d, &["snapshot", "-c", &name, "g.qcow2"]).ok();
    }
    let r = vmdisk_in(d, &["passwd", "g.qcow2", "root", "--hash", HASH]).ok();
    assert!(r.stderr.contains("undo with"), "{r}");
    let shadow = vmdisk_in(d, &["cat", "g.qcow2", "/etc/shadow"]).ok();
    assert!(shadow.stdout.contains(HASH), "{shadow}");
    assert_qemu_check_clean(&d.join("g.qcow2"), "after passwd");
}

/// `YYYYMMDDTHHMMSSZ` for `secs` (what passwd puts in its undo snapshot's name), by date(1).
fn vmdisk_guest_stamp(secs: i64) -> String {
    let r =
        run(Command::new("date").args(["-u", "-d", &format!("@{secs}"), "+%Y%m%dT%H%M%SZ"])).ok();
    r.stdout.trim().to_string()
}
