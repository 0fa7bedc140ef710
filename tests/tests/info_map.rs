//! Done-when 4: `vmdisk inspect --json` and `vmdisk map --json` say what `qemu-img info
//! --output=json` and `qemu-img map --output=json` say.
//!
//! inspect: virtual-size, format, cluster-size, backing-filename, backing-filename-format,
//! dirty-flag, format-specific.data.{compression-type, compat, lazy-refcounts, refcount-bits,
//! extended-l2, corrupt}, filename, and the snapshot list.
//!
//! map: entries are normalised (adjacent entries with the same key merged) and compared on
//! start/length/data/zero; a second test compares (data, zero, present, depth).

use std::fs;
use std::path::Path;

use serde_json::Value;
use tests::*;

/// One image to look at: a temp dir and the image's path relative to it.
struct Img {
    dir: tempfile::TempDir,
    name: &'static str,
    label: &'static str,
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn rnd(d: &Path) -> std::path::PathBuf {
    let p = d.join("rnd.bin");
    make_rnd_file(&p, 5);
    p
}

/// The images every test here looks at, all made by qemu tools.
fn fixtures() -> Vec<Img> {
    let mut v = Vec::new();

    // raw, sparse
    let dir = tmp();
    make_sparse_raw(&dir.path().join("disk.raw"), 16 * MIB, 1, 12, 500 * KIB);
    v.push(Img {
        dir,
        name: "disk.raw",
        label: "raw",
    });

    // qcow2 v2 and v3 with data, zeros and discards
    for (name, compat, label) in [
        ("v2.qcow2", "0.10", "qcow2 v2"),
        ("v3.qcow2", "1.1", "qcow2 v3"),
    ] {
        let dir = tmp();
        let d = dir.path();
        make_sparse_raw(&d.join("src.raw"), 16 * MIB, 2, 16, 600 * KIB);
        qemu_img_in(
            d,
            &[
                "convert",
                "-O",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                "src.raw",
                name,
            ],
        )
        .ok();
        fs::remove_file(d.join("src.raw")).unwrap();
        qemu_io(&d.join(name), &qemu_io_ops(3, 16 * MIB, 65536, &rnd(d)));
        v.push(Img { dir, name, label });
    }

    // zstd, compressed clusters
    let dir = tmp();
    let d = dir.path();
    make_sparse_raw(&d.join("src.raw"), 16 * MIB, 4, 16, 600 * KIB);
    qemu_img_in(
        d,
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            "-o",
            "compression_type=zstd",
            "src.raw",
            "zstd.qcow2",
        ],
    )
    .ok();
    fs::remove_file(d.join("src.raw")).unwrap();
    v.push(Img {
        dir,
        name: "zstd.qcow2",
        label: "zstd compressed",
    });

    // lazy refcounts, cleanly closed
    let dir = tmp();
    let d = dir.path();
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on,cluster_size=4096",
            "lazy.qcow2",
            "16M",
        ],
    )
    .ok();
    qemu_io(
        &d.join("lazy.qcow2"),
        &qemu_io_ops(5, 16 * MIB, 4096, &rnd(d)),
    );
    v.push(Img {
        dir,
        name: "lazy.qcow2",
        label: "lazy_refcounts",
    });

    // dirty: lazy refcounts and qemu-io aborted after a write
    let dir = tmp();
    let d = dir.path();
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "lazy_refcounts=on",
            "dirty.qcow2",
            "16M",
        ],
    )
    .ok();
    let r = run(std::process::Command::new(require_tool("qemu-io"))
        .current_dir(d)
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 65536 200000",
            "-c",
            "abort",
            "dirty.qcow2",
        ]));
    assert!(!r.success(), "TEST BUG: qemu-io abort did not abort:\n{r}");
    assert_eq!(
        qemu_info(d, "dirty.qcow2")["dirty-flag"],
        true,
        "TEST BUG: image not dirty"
    );
    v.push(Img {
        dir,
        name: "dirty.qcow2",
        label: "dirty",
    });

    // backing with -F, two levels, writes at each level, extra size at the top
    let dir = tmp();
    let d = dir.path();
    make_sparse_raw(&d.join("base.raw"), 8 * MIB, 6, 10, 400 * KIB);
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "mid.qcow2",
            "12M",
        ],
    )
    .ok();
    qemu_io(
        &d.join("mid.qcow2"),
        &qemu_io_ops(7, 12 * MIB, 65536, &rnd(d)),
    );
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "16M",
        ],
    )
    .ok();
    qemu_io(
        &d.join("top.qcow2"),
        &qemu_io_ops(8, 16 * MIB, 65536, &rnd(d)),
    );
    v.push(Img {
        dir,
        name: "top.qcow2",
        label: "backing chain with -F",
    });

    // backing without a recorded format (the header extension stripped)
    let dir = tmp();
    let d = dir.path();
    make_sparse_raw(&d.join("src.raw"), 16 * MIB, 9, 10, 400 * KIB);
    qemu_img_in(d, &["convert", "-O", "qcow2", "src.raw", "base.qcow2"]).ok();
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
            "nofmt.qcow2",
        ],
    )
    .ok();
    qemu_io(
        &d.join("nofmt.qcow2"),
        &qemu_io_ops(10, 16 * MIB, 65536, &rnd(d)),
    );
    strip_backing_format(&d.join("nofmt.qcow2"));
    let i = qemu_info(d, "nofmt.qcow2");
    assert!(
        i.get("backing-filename-format").is_none(),
        "TEST BUG: format not stripped: {i:#}"
    );
    assert_qemu_check_clean(&d.join("nofmt.qcow2"), "TEST BUG: stripped image");
    v.push(Img {
        dir,
        name: "nofmt.qcow2",
        label: "backing without -F",
    });

    // extended L2 over a backing file
    let dir = tmp();
    let d = dir.path();
    make_sparse_raw(&d.join("base.raw"), 8 * MIB, 11, 10, 400 * KIB);
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on",
            "-b",
            "base.raw",
            "-F",
            "raw",
            "ext.qcow2",
        ],
    )
    .ok();
    qemu_io(
        &d.join("ext.qcow2"),
        &qemu_io_ops(12, 8 * MIB, 65536, &rnd(d)),
    );
    v.push(Img {
        dir,
        name: "ext.qcow2",
        label: "extended_l2 overlay",
    });

    // internal snapshots
    let dir = tmp();
    let d = dir.path();
    qemu_img_in(d, &["create", "-q", "-f", "qcow2", "snaps.qcow2", "16M"]).ok();
    qemu_io(
        &d.join("snaps.qcow2"),
        &qemu_io_ops(13, 16 * MIB, 65536, &rnd(d)),
    );
    qemu_img_in(d, &["snapshot", "-c", "first", "snaps.qcow2"]).ok();
    qemu_io(
        &d.join("snaps.qcow2"),
        &qemu_io_ops(14, 16 * MIB, 65536, &rnd(d)),
    );
    qemu_img_in(d, &["snapshot", "-c", "second", "snaps.qcow2"]).ok();
    v.push(Img {
        dir,
        name: "snaps.qcow2",
        label: "internal snapshots",
    });

    v
}

fn get<'a>(v: &'a Value, path: &str) -> &'a Value {
    path.split('.').fold(v, |v, k| &v[k])
}

const INFO_FIELDS: &[&str] = &[
    "virtual-size",
    "format",
    "filename",
    "cluster-size",
    "backing-filename",
    "backing-filename-format",
    "dirty-flag",
    "format-specific.type",
    "format-specific.data.compression-type",
    "format-specific.data.compat",
    "format-specific.data.lazy-refcounts",
    "format-specific.data.refcount-bits",
    "format-specific.data.extended-l2",
    "format-specific.data.corrupt",
];

fn snapshots_of(v: &Value) -> Vec<(Value, Value, Value)> {
    v["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|s| {
                    (
                        s["id"].clone(),
                        s["name"].clone(),
                        s["vm-state-size"].clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn inspect_json_matches_qemu_info() {
    let mut errs = Vec::new();
    for img in fixtures() {
        let d = img.dir.path();
        let q = qemu_img_in(d, &["info", "--output=json", "-U", img.name]).ok();
        let v = vmdisk_in(d, &["inspect", "--json", img.name]);
        if !v.success() {
            errs.push(format!("{}: vmdisk inspect --json failed:\n{v}", img.label));
            continue;
        }
        let vj: Value = match serde_json::from_str(&v.stdout) {
            Ok(j) => j,
            Err(e) => {
                errs.push(format!(
                    "{}: vmdisk inspect --json printed no JSON ({e}):\n{v}",
                    img.label
                ));
                continue;
            }
        };
        let qj = q.json();
        for f in INFO_FIELDS {
            let (a, b) = (get(&vj, f), get(&qj, f));
            if a != b {
                errs.push(format!(
                    "{}: field {f}: vmdisk {a}, qemu-img {b}",
                    img.label
                ));
            }
        }
        if snapshots_of(&vj) != snapshots_of(&qj) {
            errs.push(format!(
                "{}: snapshots (id, name, vm-state-size): vmdisk {:?}, qemu-img {:?}",
                img.label,
                snapshots_of(&vj),
                snapshots_of(&qj)
            ));
        }
    }
    assert!(
        errs.is_empty(),
        "{} difference(s) from qemu-img info:\n{}",
        errs.len(),
        errs.join("\n")
    );
}

#[test]
fn inspect_backing_chain_matches_qemu_info() {
    let mut errs = Vec::new();
    for img in fixtures()
        .into_iter()
        .filter(|i| i.label.contains("backing"))
    {
        let d = img.dir.path();
        let q = qemu_img_in(d, &["info", "--output=json", "--backing-chain", img.name]).ok();
        let v = vmdisk_in(d, &["inspect", "--json", "--backing-chain", img.name]);
        if !v.success() {
            errs.push(format!(
                "{}: vmdisk inspect --json --backing-chain failed:\n{v}",
                img.label
            ));
            continue;
        }
        let vj: Value = serde_json::from_str(&v.stdout).unwrap_or(Value::Null);
        let qj = q.json();
        let (Some(va), Some(qa)) = (vj.as_array(), qj.as_array()) else {
            errs.push(format!(
                "{}: --backing-chain output is not a JSON array like qemu-img's:\n{v}",
                img.label
            ));
            continue;
        };
        if va.len() != qa.len() {
            errs.push(format!(
                "{}: chain of {} images, qemu-img says {}",
                img.label,
                va.len(),
                qa.len()
            ));
            continue;
        }
        for (i, (a, b)) in va.iter().zip(qa).enumerate() {
            for f in [
                "virtual-size",
                "format",
                "filename",
                "backing-filename",
                "backing-filename-format",
            ] {
                if get(a, f) != get(b, f) {
                    errs.push(format!(
                        "{} [{i}]: field {f}: vmdisk {}, qemu-img {}",
                        img.label,
                        get(a, f),
                        get(b, f)
                    ));
                }
            }
        }
    }
    assert!(
        errs.is_empty(),
        "{} difference(s):\n{}",
        errs.len(),
        errs.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// map
// ---------------------------------------------------------------------------------------------

/// (start, length, key) runs with adjacent equal keys merged.
fn normalise(v: &Value, key: impl Fn(&Value) -> String) -> Result<Vec<(u64, u64, String)>, String> {
    let arr = v.as_array().ok_or("map output is not a JSON array")?;
    let mut out: Vec<(u64, u64, String)> = Vec::new();
    let mut expect_start = 0;
    for e in arr {
        let start = e["start"]
            .as_u64()
            .ok_or_else(|| format!("entry without start: {e}"))?;
        let len = e["length"]
            .as_u64()
            .ok_or_else(|| format!("entry without length: {e}"))?;
        if start != expect_start {
            return Err(format!(
                "entries do not tile the image: expected start {expect_start}, got {e}"
            ));
        }
        expect_start = start + len;
        let k = key(e);
        match out.last_mut() {
            Some(last) if last.2 == k => last.1 += len,
            _ => out.push((start, len, k)),
        }
    }
    Ok(out)
}

fn render(runs: &[(u64, u64, String)]) -> String {
    runs.iter()
        .map(|(s, l, k)| format!("    {s:>10} +{l:<10} {k}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn compare_maps(key: &dyn Fn(&Value) -> String, what: &str) {
    let mut errs = Vec::new();
    for img in fixtures() {
        let d = img.dir.path();
        let q = qemu_img_in(d, &["map", "--output=json", "-U", img.name]).ok();
        let v = vmdisk_in(d, &["map", "--json", img.name]);
        if !v.success() {
            errs.push(format!("{}: vmdisk map --json failed:\n{v}", img.label));
            continue;
        }
        let vj: Value = match serde_json::from_str(&v.stdout) {
            Ok(j) => j,
            Err(e) => {
                errs.push(format!(
                    "{}: vmdisk map --json printed no JSON ({e}):\n{v}",
                    img.label
                ));
                continue;
            }
        };
        let qn = normalise(&q.json(), key).expect("qemu-img map output");
        match normalise(&vj, key) {
            Err(e) => errs.push(format!("{}: vmdisk map: {e}", img.label)),
            Ok(vn) if vn != qn => {
                let first = vn
                    .iter()
                    .zip(&qn)
                    .position(|(a, b)| a != b)
                    .unwrap_or(vn.len().min(qn.len()));
                errs.push(format!(
                    "{}: map runs of ({what}) differ, first at run #{first}\n  vmdisk:\n{}\n  qemu-img:\n{}",
                    img.label,
                    render(&vn[first.saturating_sub(2)..vn.len().min(first + 6)]),
                    render(&qn[first.saturating_sub(2)..qn.len().min(first + 6)]),
                ));
            }
            Ok(_) => {}
        }
    }
    assert!(
        errs.is_empty(),
        "{} image(s) map differently from qemu-img:\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );
}

#[test]
fn map_data_zero_matches_qemu() {
    compare_maps(
        &|e| format!("data={} zero={}", e["data"], e["zero"]),
        "data, zero",
    );
}

#[test]
fn map_present_depth_matches_qemu() {
    compare_maps(
        &|e| {
            format!(
                "data={} zero={} present={} depth={}",
                e["data"], e["zero"], e["present"], e["depth"]
            )
        },
        "data, zero, present, depth",
    );
}

// ---------------------------------------------------------------------------------------------
// check
// ---------------------------------------------------------------------------------------------

const CHECK_FIELDS: &[&str] = &[
    "corruptions",
    "leaks",
    "check-errors",
    "image-end-offset",
    "total-clusters",
    "allocated-clusters",
    "fragmented-clusters",
    "compressed-clusters",
];

/// `vmdisk check --json` reports what `qemu-img check --output=json` reports, with the same
/// exit code (0 clean, 2 corruptions, 3 leaks only). A field qemu-img omits counts as 0.
#[test]
fn check_json_matches_qemu_check() {
    let mut errs = Vec::new();
    for img in fixtures()
        .into_iter()
        .filter(|i| i.name.ends_with(".qcow2"))
    {
        let d = img.dir.path();
        let q = qemu_img_in(d, &["check", "--output=json", img.name]);
        let v = vmdisk_in(d, &["check", "--json", img.name]);
        if v.code() != q.code() {
            errs.push(format!(
                "{}: exit code: vmdisk {}, qemu-img {}\nvmdisk:\n{v}\nqemu-img:\n{q}",
                img.label,
                v.code(),
                q.code()
            ));
            continue;
        }
        let vj: Value = match serde_json::from_str(&v.stdout) {
            Ok(j) => j,
            Err(e) => {
                errs.push(format!(
                    "{}: vmdisk check --json printed no JSON ({e}):\n{v}",
                    img.label
                ));
                continue;
            }
        };
        let qj = q.json();
        for f in CHECK_FIELDS {
            let (a, b) = (vj[f].as_u64().unwrap_or(0), qj[f].as_u64().unwrap_or(0));
            if a != b {
                errs.push(format!(
                    "{}: check field {f}: vmdisk {a}, qemu-img {b}",
                    img.label
                ));
            }
        }
    }
    assert!(
        errs.is_empty(),
        "{} difference(s) from qemu-img check:\n{}",
        errs.len(),
        errs.join("\n")
    );
}

/// A dirty lazy-refcounts image has stale refcounts (qemu-img check: corruptions);
/// `vmdisk check -r all` must leave it clean for qemu-img with the guest data untouched.
#[test]
fn check_repair_all_fixes_dirty_image() {
    let img = fixtures().into_iter().find(|i| i.label == "dirty").unwrap();
    let d = img.dir.path();
    let before = d.join("before.raw");
    qemu_img_in(d, &["convert", "-O", "raw", img.name, s(&before)]).ok();
    let (code, _, q) = qemu_check(&d.join(img.name));
    assert_eq!(
        code, 2,
        "TEST BUG: expected qemu-img check to see corruptions:\n{q}"
    );
    let r = vmdisk_in(d, &["check", "-r", "all", img.name]);
    assert_eq!(r.code(), 0, "vmdisk check -r all did not end clean:\n{r}");
    assert_qemu_check_clean(&d.join(img.name), "after vmdisk check -r all");
    let c = qemu_img_in(d, &["compare", img.name, s(&before)]);
    assert_eq!(
        c.code(),
        0,
        "vmdisk check -r all changed the guest data:\n{c}"
    );
    assert_eq!(
        qemu_info(d, img.name)["dirty-flag"],
        false,
        "still dirty after repair"
    );
}
