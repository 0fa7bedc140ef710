//! Persistent dirty bitmaps and snapshot names, judged by qemu (issue 12, item 6).
//!
//! Every image starts as qemu made it (`qemu-img create`, `qemu-img bitmap --add`, writes by
//! `qemu-io`); vmdisk then writes or snapshots it; qemu judges the result: `qemu-img check`
//! must stay clean (no leaks, no corruption), `qemu-img info` must still list the bitmaps
//! with the same flags (no "in-use"), and the bits qemu reads back (`qemu-nbd -B` +
//! `nbdinfo --map=qemu:dirty-bitmap:NAME`) must cover every byte vmdisk changed.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use tests::{
    assert_qemu_check_clean, qemu_img, qemu_info, qemu_io, require_tool, run, s, vmdisk,
    wait_until, Background,
};
use vmdisk_block::{BlockDevice, RawFile};
use vmdisk_qcow2::Qcow2Image;

const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// How long qemu-nbd may take to start listening.
const NBD_START: Duration = Duration::from_secs(30);

/// A 64 MiB qcow2 made by qemu with an enabled bitmap "b1" (64 KiB granularity) and a
/// disabled "b2" (512 KiB), then 1 MiB written by qemu at 0 (recorded in b1 only).
fn qemu_image(dir: &Path, name: &str) -> PathBuf {
    let p = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", s(&p), "64M"]).ok();
    qemu_img(&["bitmap", "--add", s(&p), "b1"]).ok();
    qemu_img(&["bitmap", "--add", "-g", "512K", "--disable", s(&p), "b2"]).ok();
    qemu_io(&p, &["write -P 0x11 0 1M".to_string()]);
    p
}

/// `format-specific.data.bitmaps` of `qemu-img info --output=json`.
fn qemu_bitmaps(img: &Path) -> serde_json::Value {
    let v = qemu_info(img.parent().unwrap(), s(img));
    v["format-specific"]["data"]["bitmaps"].clone()
}

/// Dirty extents `(offset, length)` of bitmap `name` as qemu reads them back.
fn qemu_dirty(img: &Path, name: &str) -> Vec<(u64, u64)> {
    let dir = img.parent().unwrap();
    let sock = dir.join(format!("{name}.sock"));
    let _ = std::fs::remove_file(&sock);
    let mut nbd = Background::spawn(
        Command::new(require_tool("qemu-nbd"))
            .args(["-r", "-f", "qcow2", "-B", name, "-k"])
            .arg(&sock)
            .arg(img),
        dir,
        &format!("qemu-nbd-{name}"),
    );
    assert!(
        wait_until(NBD_START, || sock.exists() || !nbd.alive()),
        "qemu-nbd did not start: {}",
        nbd.cmdline
    );
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    let r = run(Command::new(require_tool("nbdinfo"))
        .arg(format!("--map=qemu:dirty-bitmap:{name}"))
        .arg(&uri))
    .ok();
    nbd.kill();
    let mut out = Vec::new();
    for line in r.stdout.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() >= 3 && f[2] == "1" {
            out.push((f[0].parse().unwrap(), f[1].parse().unwrap()));
        }
    }
    out
}

/// `ranges` widened to whole granules of `g` bytes and merged.
fn granules(ranges: &[(u64, u64)], g: u64) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = ranges
        .iter()
        .map(|&(o, l)| (o / g * g, (o + l).div_ceil(g) * g))
        .collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (a, b) in v {
        match out.last_mut() {
            Some(last) if last.1 >= a => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out.into_iter().map(|(a, b)| (a, b - a)).collect()
}

fn open_rw(img: &Path) -> Qcow2Image {
    let host: Arc<dyn BlockDevice> = Arc::new(RawFile::open(img, false).unwrap());
    Qcow2Image::open(host, None, false).unwrap()
}

#[test]
fn vmdisk_writes_are_recorded_in_enabled_bitmaps_only() {
    let d = tempfile::tempdir().unwrap();
    let img = qemu_image(d.path(), "w.qcow2");
    let b2_before = qemu_dirty(&img, "b2");
    assert_eq!(qemu_dirty(&img, "b1"), vec![(0, MIB)], "qemu's own write");

    // Every write path of the engine: data, zeroes, discard, compressed, unallocate.
    let changes = [
        (10 * MIB + 100, 5000),
        (20 * MIB, 3 * MIB),
        (33 * MIB + 4 * KIB, 192 * KIB),
        (40 * MIB, 64 * KIB),
        (50 * MIB, 128 * KIB),
        (63 * MIB + 10, MIB - 10),
    ];
    let q = open_rw(&img);
    q.write_all_at(&vec![0x22; 5000], changes[0].0).unwrap();
    q.write_zeroes(changes[1].0, changes[1].1, false).unwrap();
    q.discard(changes[2].0, changes[2].1).unwrap();
    let c = vmdisk_qcow2::compress_cluster(
        vmdisk_qcow2::CompressionType::Zlib,
        65536,
        &vec![0x33; 65536],
    )
    .unwrap()
    .unwrap();
    q.write_compressed(changes[3].0, &c).unwrap();
    q.unallocate(changes[4].0, changes[4].1).unwrap();
    q.write_all_at(&vec![0x44; (MIB - 10) as usize], changes[5].0)
        .unwrap();
    q.close().unwrap();

    assert_qemu_check_clean(&img, "after vmdisk writes");
    assert_eq!(
        qemu_bitmaps(&img),
        serde_json::json!([
            {"flags": ["auto"], "name": "b1", "granularity": 65536},
            {"flags": [], "name": "b2", "granularity": 524288}
        ]),
        "bitmaps still valid and not in use"
    );
    let mut want = changes.to_vec();
    want.push((0, MIB));
    assert_eq!(qemu_dirty(&img, "b1"), granules(&want, 64 * KIB));
    assert_eq!(
        qemu_dirty(&img, "b2"),
        b2_before,
        "a disabled bitmap is left alone"
    );
    // qemu can still use the bitmap: it merges and removes it without complaint.
    qemu_img(&["bitmap", "--remove", s(&img), "b1"]).ok();
    assert_qemu_check_clean(&img, "after qemu removed b1");
}

#[test]
fn a_write_that_never_closes_leaves_the_bitmap_in_use() {
    // A crash (here: the image is never closed) must not leave a bitmap that claims to be
    // complete: qemu has to see it as inconsistent.
    let d = tempfile::tempdir().unwrap();
    let img = qemu_image(d.path(), "crash.qcow2");
    let q = open_rw(&img);
    q.write_all_at(&[1u8; 4096], 5 * MIB).unwrap();
    q.flush().unwrap();
    std::mem::forget(q);
    let b = qemu_bitmaps(&img);
    assert_eq!(b[0]["name"], "b1");
    assert_eq!(b[0]["flags"], serde_json::json!(["in-use", "auto"]), "{b}");
    assert_eq!(b[1]["flags"], serde_json::json!([]), "{b}");
    // Still no leaks or corruption: only the bitmap's contents are in doubt.
    assert_qemu_check_clean(&img, "after an unclosed write");
}

#[test]
fn snapshot_create_and_delete_keep_bitmaps_valid() {
    let d = tempfile::tempdir().unwrap();
    let img = qemu_image(d.path(), "s.qcow2");
    let before = (qemu_bitmaps(&img), qemu_dirty(&img, "b1"));
    vmdisk(&["snapshot", "create", s(&img), "first"]).ok();
    assert_qemu_check_clean(&img, "after vmdisk snapshot create");
    assert_eq!((qemu_bitmaps(&img), qemu_dirty(&img, "b1")), before);
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok();
    assert!(l.stdout.contains("first"), "{l}");
    // qemu writes on after our snapshot; the bitmap keeps tracking, the check stays clean.
    qemu_io(&img, &["write -P 0x55 8M 64K".to_string()]);
    assert_eq!(qemu_dirty(&img, "b1"), vec![(0, MIB), (8 * MIB, 64 * KIB)]);
    vmdisk(&["snapshot", "delete", s(&img), "first"]).ok();
    assert_qemu_check_clean(&img, "after vmdisk snapshot delete");
    assert_eq!(qemu_bitmaps(&img), before.0);
    assert_eq!(qemu_dirty(&img, "b1"), vec![(0, MIB), (8 * MIB, 64 * KIB)]);
}

#[test]
fn snapshot_apply_is_refused_with_bitmaps_as_qemu_refuses_it() {
    let d = tempfile::tempdir().unwrap();
    let img = qemu_image(d.path(), "a.qcow2");
    qemu_img(&["snapshot", "-c", "s1", s(&img)]).ok();
    let theirs = qemu_img(&["snapshot", "-a", "s1", s(&img)]);
    assert!(
        !theirs.success() && theirs.stderr.contains("dirty bitmaps"),
        "qemu-img is the oracle here: {theirs}"
    );
    let sum = tests::sha256(&img);
    let ours = vmdisk(&["snapshot", "apply", s(&img), "s1"]);
    let text = ours.all_output_lower();
    assert!(!ours.success(), "{ours}");
    assert!(
        text.contains("bitmap") && text.contains("b1") && text.contains("qemu-img bitmap --remove"),
        "{ours}"
    );
    assert!(
        text.contains(&s(&img).to_lowercase()),
        "names the file: {ours}"
    );
    assert_eq!(tests::sha256(&img), sum, "a refused apply changes nothing");
    // The way out the message gives works.
    qemu_img(&["bitmap", "--remove", s(&img), "b1"]).ok();
    qemu_img(&["bitmap", "--remove", s(&img), "b2"]).ok();
    vmdisk(&["snapshot", "apply", s(&img), "s1"]).ok();
    assert_qemu_check_clean(&img, "after apply without bitmaps");
}

#[test]
fn inspect_shows_bitmaps_like_qemu_img_info() {
    let d = tempfile::tempdir().unwrap();
    let img = qemu_image(d.path(), "i.qcow2");
    // An in-use bitmap too (the flag qemu shows first).
    let q = open_rw(&img);
    q.write_all_at(&[1u8; 512], 0).unwrap();
    std::mem::forget(q);
    let theirs = qemu_bitmaps(&img);
    assert_eq!(theirs.as_array().map(Vec::len), Some(2), "{theirs}");
    let ours = vmdisk(&["inspect", "--json", s(&img)]).ok().json();
    assert_eq!(ours["format-specific"]["data"]["bitmaps"], theirs);

    // Human text: the bitmaps block is line for line qemu's.
    let block = |t: &str| -> Vec<String> {
        let mut out = Vec::new();
        let mut inside = false;
        for l in t.lines() {
            if l == "    bitmaps:" {
                inside = true;
            } else if inside && !l.starts_with("        ") {
                break;
            }
            if inside {
                out.push(l.to_string());
            }
        }
        out
    };
    let theirs = qemu_img(&["info", s(&img)]).ok().stdout;
    let ours = vmdisk(&["inspect", s(&img)]).ok().stdout;
    assert!(!block(&theirs).is_empty(), "{theirs}");
    assert_eq!(
        block(&ours),
        block(&theirs),
        "ours:\n{ours}\ntheirs:\n{theirs}"
    );

    // No bitmaps: qemu omits the key, so do we.
    let plain = d.path().join("plain.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&plain), "1M"]).ok();
    assert!(qemu_bitmaps(&plain).is_null());
    let ours = vmdisk(&["inspect", "--json", s(&plain)]).ok().json();
    assert!(
        ours["format-specific"]["data"]["bitmaps"].is_null(),
        "{ours}"
    );
}

#[test]
fn snapshot_names_longer_than_qemu_keeps_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let img = d.path().join("n.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "1M"]).ok();
    // qemu keeps 255 bytes of a name and cuts the rest silently.
    let long = "n".repeat(256);
    let q = qemu_img(&["snapshot", "-c", &long, s(&img)]).ok();
    let _ = q;
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert!(l.contains(&"n".repeat(255)) && !l.contains(&long), "{l}");
    qemu_img(&["snapshot", "-d", &"n".repeat(255), s(&img)]).ok();

    let sum = tests::sha256(&img);
    let r = vmdisk(&["snapshot", "create", s(&img), &long]);
    assert!(!r.success(), "{r}");
    let text = r.all_output_lower();
    assert!(text.contains("255") && text.contains("256"), "{r}");
    assert_eq!(tests::sha256(&img), sum, "a refused create changes nothing");

    let max = "m".repeat(255);
    vmdisk(&["snapshot", "create", s(&img), &max]).ok();
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok().stdout;
    assert!(l.contains(&max), "{l}");
    assert_qemu_check_clean(&img, "after a 255-byte snapshot name");
}
