//! qemu-img muscle memory, side by side with qemu-img on the same inputs: `info`,
//! `snapshot -l/-c/-a/-d`, `-o help`, `--output=json`, convert's qemu-img flags, `measure`,
//! `amend`, `dd`, and the refusal of flags vmdisk does not take. Outputs are compared with
//! `qemu-img compare`, JSON fields by name.

use std::fs;
use std::path::Path;

use serde_json::Value;
use tests::*;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

/// A `fmt` image with a seeded qemu-io workload.
fn image(d: &Path, name: &str, fmt: &str, opts: &str, size: u64, seed: u64) {
    let size_s = size.to_string();
    let mut c = vec!["create", "-q", "-f", fmt];
    if !opts.is_empty() {
        c.extend(["-o", opts]);
    }
    c.extend([name, size_s.as_str()]);
    qemu_img_in(d, &c).ok();
    let rnd = d.join(format!("rnd-{seed}.bin"));
    make_rnd_file(&rnd, seed);
    qemu_io_fmt(
        &d.join(name),
        fmt,
        &qemu_io_ops(seed, size, 64 * KIB, &rnd)
            .into_iter()
            .filter(|op| fmt != "raw" || !op.starts_with("discard"))
            .collect::<Vec<_>>(),
    );
}

fn info(d: &Path, img: &str) -> Value {
    qemu_info(d, img)
}

#[test]
fn info_is_inspect_and_output_json_is_accepted() {
    let dir = tmp();
    let d = dir.path();
    image(d, "a.qcow2", "qcow2", "cluster_size=16k", 8 * MIB, 1);
    let v = vmdisk_in(d, &["info", "--output=json", "a.qcow2"])
        .ok()
        .json();
    let q = info(d, "a.qcow2");
    for k in ["virtual-size", "format", "cluster-size", "filename"] {
        assert_eq!(v[k], q[k], "field {k}: vmdisk {} vs qemu {}", v[k], q[k]);
    }
    let h = vmdisk_in(d, &["info", "a.qcow2"]).ok();
    assert!(h.stdout.contains("virtual size"), "{h}");
    // --output=json on the other commands that print data.
    for args in [
        vec!["check", "--output=json", "a.qcow2"],
        vec!["map", "--output=json", "a.qcow2"],
        vec!["measure", "-O", "qcow2", "--output=json", "a.qcow2"],
        vec!["compare", "--output=json", "a.qcow2", "a.qcow2"],
        vec!["snapshot", "-l", "--output=json", "a.qcow2"],
    ] {
        let r = vmdisk_in(d, &args).ok();
        serde_json::from_str::<Value>(&r.stdout)
            .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}):\n{r}"));
    }
}

#[test]
fn snapshot_flags_match_qemu_img() {
    let dir = tmp();
    let d = dir.path();
    image(d, "s.qcow2", "qcow2", "", 16 * MIB, 2);
    fs::copy(d.join("s.qcow2"), d.join("q.qcow2")).unwrap();
    vmdisk_in(d, &["snapshot", "-c", "one", "s.qcow2"]).ok();
    qemu_img_in(d, &["snapshot", "-c", "one", "q.qcow2"]).ok();
    qemu_io(&d.join("s.qcow2"), &["write -P 7 0 1M".to_string()]);
    qemu_io(&d.join("q.qcow2"), &["write -P 7 0 1M".to_string()]);
    // qemu-img lists what vmdisk made, and vmdisk lists it the same way.
    let ql = qemu_img_in(d, &["snapshot", "-l", "s.qcow2"]).ok();
    let vl = vmdisk_in(d, &["snapshot", "-l", "s.qcow2"]).ok();
    assert!(
        ql.stdout.contains("one") && vl.stdout.contains("one"),
        "{ql}\n{vl}"
    );
    let names = |v: &Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap().to_string())
            .collect()
    };
    let vj = vmdisk_in(d, &["snapshot", "-l", "--json", "s.qcow2"])
        .ok()
        .json();
    assert_eq!(names(&vj), names(&info(d, "s.qcow2")["snapshots"]));
    vmdisk_in(d, &["snapshot", "-a", "one", "s.qcow2"]).ok();
    qemu_img_in(d, &["snapshot", "-a", "one", "q.qcow2"]).ok();
    assert_qemu_check_clean(&d.join("s.qcow2"), "after -a");
    assert_qemu_compare_identical(d, "s.qcow2", "q.qcow2", "after snapshot -a");
    vmdisk_in(d, &["snapshot", "-d", "one", "s.qcow2"]).ok();
    assert_qemu_check_clean(&d.join("s.qcow2"), "after -d");
    assert!(info(d, "s.qcow2")["snapshots"].is_null(), "deleted");
    // The subcommands still work, and a flag with a subcommand is a usage error.
    vmdisk_in(d, &["snapshot", "create", "s.qcow2", "two"]).ok();
    vmdisk_in(d, &["snapshot", "list", "s.qcow2"]).ok();
    let lj = vmdisk_in(d, &["snapshot", "list", "--output=json", "s.qcow2"])
        .ok()
        .json();
    assert_eq!(names(&lj), names(&info(d, "s.qcow2")["snapshots"]));
    vmdisk_in(d, &["snapshot", "-l", "list", "s.qcow2"]).expect_code(1);
}

/// Option names of a `-o help` listing (`  name=<type> - text`).
fn option_names(text: &str) -> Vec<String> {
    text.lines()
        .filter_map(|l| l.trim_start().split_once('='))
        .map(|(k, _)| k.to_string())
        .filter(|k| !k.contains(' '))
        .collect()
}

#[test]
fn option_help_lists_options_qemu_img_knows() {
    let dir = tmp();
    let d = dir.path();
    for fmt in ["qcow2", "raw"] {
        let q = qemu_img_in(d, &["create", "-f", fmt, "-o", "help"]).ok();
        let mut qn = option_names(&q.stdout);
        if fmt == "raw" {
            // qemu lists the file protocol's options only with a file name.
            qn.push("preallocation".into());
        }
        for args in [
            vec!["create", "-f", fmt, "-o", "help"],
            vec!["convert", "-O", fmt, "-o", "help"],
            vec!["measure", "-O", fmt, "-o", "help"],
        ] {
            let v = vmdisk_in(d, &args).ok();
            let vn = option_names(&v.stdout);
            assert!(vn.len() >= 2, "{args:?}: no options listed:\n{v}");
            for n in &vn {
                assert!(
                    qn.contains(n),
                    "{args:?}: {n} is not a qemu-img {fmt} option"
                );
            }
            assert!(
                v.stdout.starts_with(&format!("Supported {fmt} options:")),
                "{v}"
            );
        }
    }
    let q = qemu_img_in(d, &["amend", "-f", "qcow2", "-o", "help", "x"]);
    let v = vmdisk_in(d, &["amend", "-o", "help"]).ok();
    let qn = option_names(&q.stdout);
    let vn = option_names(&v.stdout);
    assert_eq!(vn, ["compat", "lazy_refcounts"], "{v}");
    for n in vn {
        assert!(qn.contains(&n), "amend: {n} not in qemu's list:\n{q}");
    }
}

/// `vmdisk convert ARGS` and `qemu-img convert ARGS` into `v-OUT` / `q-OUT`, then compare.
#[track_caller]
fn convert_both(d: &Path, args: &[&str], src: &str, out: &str) {
    let (vo, qo) = (format!("v-{out}"), format!("q-{out}"));
    let mut q = vec!["convert"];
    q.extend_from_slice(args);
    q.extend([src, qo.as_str()]);
    qemu_img_in(d, &q).ok();
    let mut v = vec!["convert"];
    v.extend_from_slice(args);
    v.extend([src, vo.as_str()]);
    vmdisk_in(d, &v).ok();
    let what = format!("convert {args:?} {src}");
    let (vi, qi) = (info(d, &vo), info(d, &qo));
    assert_eq!(vi["format"], qi["format"], "{what}: output formats differ");
    assert_eq!(
        vi["virtual-size"], qi["virtual-size"],
        "{what}: sizes differ"
    );
    if qi["format"] == "qcow2" {
        assert_qemu_check_clean(&d.join(&vo), &what);
    }
    assert_qemu_compare_identical(d, &vo, &qo, &what);
}

/// The `data` flags of `qemu-img map` over the whole image, merged.
fn data_map(d: &Path, img: &str) -> Vec<(u64, u64, bool)> {
    let m = qemu_img_in(d, &["map", "--output=json", img]).ok().json();
    let mut out: Vec<(u64, u64, bool)> = Vec::new();
    for e in m.as_array().unwrap() {
        let (s, l, data) = (
            e["start"].as_u64().unwrap(),
            e["length"].as_u64().unwrap(),
            e["data"].as_bool().unwrap(),
        );
        match out.last_mut() {
            Some(last) if last.2 == data && last.0 + last.1 == s => last.1 += l,
            _ => out.push((s, l, data)),
        }
    }
    out
}

#[test]
fn convert_flags_match_qemu_img() {
    let dir = tmp();
    let d = dir.path();
    image(d, "src.qcow2", "qcow2", "", 24 * MIB, 3);
    image(d, "src.raw", "raw", "", 20 * MIB + 4096, 4);
    // -O defaults to raw.
    convert_both(d, &[], "src.qcow2", "a.img");
    assert_eq!(info(d, "v-a.img")["format"], "raw");
    // -S: 0 allocates everything, as qemu-img does; other sizes stay identical.
    convert_both(d, &["-S", "0"], "src.qcow2", "full.raw");
    assert_eq!(
        data_map(d, "v-full.raw"),
        data_map(d, "q-full.raw"),
        "-S 0 raw"
    );
    convert_both(d, &["-O", "qcow2", "-S", "0"], "src.raw", "full.qcow2");
    assert_eq!(
        data_map(d, "v-full.qcow2"),
        [(0, 20 * MIB + 4096, true)],
        "-S 0 qcow2"
    );
    convert_both(d, &["-S", "64k"], "src.qcow2", "s64.raw");
    convert_both(d, &["-O", "qcow2", "-S", "1M"], "src.raw", "s1m.qcow2");
    // Accepted flags with the same meaning: -W, -m, -t, -T.
    convert_both(
        d,
        &["-O", "qcow2", "-W", "-m", "4", "-t", "none", "-T", "none"],
        "src.raw",
        "w.qcow2",
    );
    for bad in [vec!["-S", "100"], vec!["-m", "17"], vec!["-t", "bogus"]] {
        let mut a = vec!["convert"];
        a.extend(bad.iter().copied());
        a.extend(["src.raw", "bad.raw"]);
        vmdisk_in(d, &a).expect_code(1);
        assert!(!d.join("bad.raw").exists(), "{bad:?} left an output");
    }
}

#[test]
fn convert_into_an_existing_target() {
    let dir = tmp();
    let d = dir.path();
    image(d, "src.qcow2", "qcow2", "", 16 * MIB, 5);
    for (fmt, name) in [("qcow2", "t.qcow2"), ("raw", "t.raw")] {
        // A target full of other data: -n must overwrite all of it, zeros included.
        image(d, name, fmt, "", 16 * MIB, 6);
        let (v, q) = (format!("v-{name}"), format!("q-{name}"));
        fs::copy(d.join(name), d.join(&v)).unwrap();
        fs::copy(d.join(name), d.join(&q)).unwrap();
        qemu_img_in(d, &["convert", "-n", "-O", fmt, "src.qcow2", &q]).ok();
        vmdisk_in(d, &["convert", "-n", "-O", fmt, "src.qcow2", &v]).ok();
        if fmt == "qcow2" {
            assert_qemu_check_clean(&d.join(&v), "-n");
        }
        assert_qemu_compare_identical(d, &v, &q, "convert -n");
        assert_qemu_compare_identical(d, &v, "src.qcow2", "convert -n vs source");
        // --target-is-zero on a fresh target.
        let z = format!("z-{name}");
        qemu_img_in(d, &["create", "-q", "-f", fmt, &z, "16M"]).ok();
        vmdisk_in(
            d,
            &[
                "convert",
                "-n",
                "--target-is-zero",
                "-O",
                fmt,
                "src.qcow2",
                &z,
            ],
        )
        .ok();
        assert_qemu_compare_identical(d, &z, "src.qcow2", "--target-is-zero");
    }
    // -n never touches a target that is too small, and -f raw on a qcow2 target is refused.
    qemu_img_in(d, &["create", "-q", "-f", "raw", "small.raw", "1M"]).ok();
    let before = sha256(&d.join("small.raw"));
    vmdisk_in(d, &["convert", "-n", "src.qcow2", "small.raw"]).expect_code(1);
    assert_eq!(sha256(&d.join("small.raw")), before);
    let before = sha256(&d.join("t.qcow2"));
    vmdisk_in(d, &["convert", "-n", "src.qcow2", "t.qcow2"]).expect_code(1);
    assert_eq!(
        sha256(&d.join("t.qcow2")),
        before,
        "raw view of a qcow2 refused"
    );
    vmdisk_in(d, &["convert", "--target-is-zero", "src.qcow2", "new.raw"]).expect_code(1);
}

#[test]
fn convert_onto_a_backing_file_keeps_only_the_difference() {
    let dir = tmp();
    let d = dir.path();
    image(d, "base.qcow2", "qcow2", "", 16 * MIB, 7);
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
    qemu_io(
        &d.join("ov.qcow2"),
        &[
            "write -P 0x42 1M 256k".to_string(),
            "write -z 4M 128k".to_string(),
        ],
    );
    // A full copy of the overlay's view, then the overlay rebuilt from it with -B.
    qemu_img_in(d, &["convert", "-O", "raw", "ov.qcow2", "flat.raw"]).ok();
    let args = ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"];
    convert_both(d, &args, "flat.raw", "ov2.qcow2");
    assert_qemu_compare_identical(d, "v-ov2.qcow2", "ov.qcow2", "-B vs the original overlay");
    let vi = info(d, "v-ov2.qcow2");
    assert_eq!(vi["backing-filename"], "base.qcow2");
    // Only what differs from base is stored: about the 256k written plus the zeroed 128k.
    let data: u64 = data_map(d, "v-ov2.qcow2")
        .iter()
        .filter(|e| e.2)
        .map(|e| e.1)
        .sum();
    let total = qemu_img_in(d, &["map", "--output=json", "v-ov2.qcow2"])
        .ok()
        .json();
    let depth0: u64 = total
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["depth"] == 0 && e["present"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        depth0 <= 512 * KIB,
        "the overlay holds {depth0} bytes ({data} data)"
    );
    // From an overlay source too, as qemu-img does it.
    convert_both(d, &args, "ov.qcow2", "ov3.qcow2");
}

#[test]
fn convert_a_snapshot() {
    let dir = tmp();
    let d = dir.path();
    image(d, "s.qcow2", "qcow2", "", 16 * MIB, 8);
    qemu_img_in(d, &["snapshot", "-c", "first", "s.qcow2"]).ok();
    qemu_io(&d.join("s.qcow2"), &["write -P 9 0 2M".to_string()]);
    qemu_img_in(d, &["snapshot", "-c", "second", "s.qcow2"]).ok();
    qemu_io(&d.join("s.qcow2"), &["write -P 3 3M 1M".to_string()]);
    convert_both(d, &["-l", "snapshot.name=first"], "s.qcow2", "first.raw");
    convert_both(d, &["-l", "snapshot.id=2"], "s.qcow2", "second.raw");
    convert_both(d, &["-O", "qcow2", "-l", "first"], "s.qcow2", "first.qcow2");
    // qemu-img 10 dropped -s; vmdisk keeps it as the old spelling of -l ID_OR_NAME.
    qemu_img_in(d, &["convert", "-l", "second", "s.qcow2", "q-s2.raw"]).ok();
    vmdisk_in(d, &["convert", "-s", "second", "s.qcow2", "v-s2.raw"]).ok();
    assert_qemu_compare_identical(d, "v-s2.raw", "q-s2.raw", "-s second");
    let r = qemu_img_in(d, &["compare", "v-first.raw", "v-second.raw"]);
    assert_eq!(r.code(), 1, "the two snapshots differ:\n{r}");
    vmdisk_in(
        d,
        &["convert", "-l", "snapshot.name=nope", "s.qcow2", "x.raw"],
    )
    .expect_code(1);
    assert!(!d.join("x.raw").exists());
}

#[test]
fn measure_matches_qemu_img_field_by_field() {
    let dir = tmp();
    let d = dir.path();
    image(d, "m.qcow2", "qcow2", "", 32 * MIB, 9);
    image(d, "m.raw", "raw", "", 20 * MIB, 10);
    let cases: &[&[&str]] = &[
        &["-O", "qcow2", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "cluster_size=2M,refcount_bits=1",
            "--size",
            "100T",
        ],
        &["-O", "qcow2", "-o", "preallocation=full", "--size", "1G"],
        &[
            "-O",
            "qcow2",
            "-o",
            "preallocation=metadata",
            "--size",
            "5G",
        ],
        &["-O", "raw", "--size", "1G"],
        &["-O", "qcow2", "m.qcow2"],
        &["-O", "qcow2", "-o", "cluster_size=4k", "m.raw"],
        &["-O", "raw", "m.qcow2"],
        &["-O", "qcow2", "-o", "extended_l2=on", "m.raw"],
        &["m.raw"],
    ];
    for args in cases {
        let mut q = vec!["measure", "--output=json"];
        q.extend_from_slice(args);
        let mut v = vec!["measure", "--output=json"];
        v.extend_from_slice(args);
        let qj = qemu_img_in(d, &q).ok().json();
        let vj = vmdisk_in(d, &v).ok().json();
        for k in ["required", "fully-allocated"] {
            assert_eq!(
                vj[k], qj[k],
                "measure {args:?}: {k}: vmdisk {} vs qemu {}",
                vj[k], qj[k]
            );
        }
        // The human form carries the same numbers.
        let mut h = vec!["measure"];
        h.extend_from_slice(args);
        let ht = vmdisk_in(d, &h).ok();
        assert!(
            ht.stdout
                .contains(&format!("required size: {}", qj["required"])),
            "{ht}"
        );
    }
    // --layout keeps working beside -O (it conflicts with it).
    vmdisk_in(
        d,
        &["measure", "-O", "qcow2", "--layout", "x.json", "m.raw"],
    )
    .expect_code(1);
}

#[test]
fn amend_matches_qemu_img() {
    let dir = tmp();
    let d = dir.path();
    let fields = |d: &Path, img: &str| {
        let v = info(d, img)["format-specific"]["data"].clone();
        (v["compat"].clone(), v["lazy-refcounts"].clone())
    };
    let cases: &[(&str, &str)] = &[
        ("", "compat=0.10"),
        ("compat=0.10", "compat=1.1"),
        ("", "lazy_refcounts=on"),
        ("lazy_refcounts=on", "lazy_refcounts=off"),
        ("lazy_refcounts=on", "compat=0.10"),
        ("compat=0.10", "compat=1.1,lazy_refcounts=on"),
    ];
    for (i, (create, amend)) in cases.iter().enumerate() {
        let name = format!("a{i}.qcow2");
        image(d, &name, "qcow2", create, 8 * MIB, 20 + i as u64);
        // A snapshot whose zero clusters must be expanded too.
        qemu_img_in(d, &["snapshot", "-c", "s", &name]).ok();
        qemu_io(&d.join(&name), &["write -z 2M 192k".to_string()]);
        let t = format!("q-{name}");
        fs::copy(d.join(&name), d.join(&t)).unwrap();
        // The snapshot's view before the amend, by qemu-img.
        let snap = format!("snap-{i}.raw");
        qemu_img_in(d, &["convert", "-l", "s", &name, &snap]).ok();
        qemu_img_in(d, &["amend", "-o", amend, &t]).ok();
        vmdisk_in(d, &["amend", "-o", amend, &name]).ok();
        let what = format!("amend -o {amend} of {create:?}");
        assert_eq!(fields(d, &name), fields(d, &t), "{what}");
        assert_qemu_check_clean(&d.join(&name), &what);
        assert_qemu_compare_identical(d, &name, &t, &what);
        // The snapshot keeps its contents. (Not compared with qemu-img's result: qemu-img
        // 10 downgrading this image writes zeros into clusters the snapshot shares, and
        // its own check then reports OFLAG_COPIED errors.)
        vmdisk_in(d, &["snapshot", "-a", "s", &name]).ok();
        assert_qemu_check_clean(&d.join(&name), &format!("{what}, snapshot applied"));
        assert_qemu_compare_identical(d, &name, &snap, &format!("{what}, snapshot applied"));
    }
    // Refusals qemu-img makes too.
    image(d, "r.qcow2", "qcow2", "compat=0.10", 8 * MIB, 40);
    let before = sha256(&d.join("r.qcow2"));
    let q = qemu_img_in(d, &["amend", "-o", "lazy_refcounts=on", "r.qcow2"]);
    assert!(!q.success());
    vmdisk_in(d, &["amend", "-o", "lazy_refcounts=on", "r.qcow2"]).expect_code(1);
    image(d, "r16.qcow2", "qcow2", "refcount_bits=8", 8 * MIB, 41);
    let q = qemu_img_in(d, &["amend", "-o", "compat=0.10", "q-r16.qcow2"]);
    let _ = q;
    vmdisk_in(d, &["amend", "-o", "compat=0.10", "r16.qcow2"]).expect_code(1);
    assert_eq!(sha256(&d.join("r.qcow2")), before, "refused: untouched");
    qemu_img_in(d, &["create", "-q", "-f", "raw", "x.raw", "1M"]).ok();
    vmdisk_in(d, &["amend", "-o", "compat=1.1", "x.raw"]).expect_code(1);
}

#[test]
fn dd_matches_qemu_img() {
    let dir = tmp();
    let d = dir.path();
    image(d, "in.qcow2", "qcow2", "", 8 * MIB, 50);
    let cases: &[&[&str]] = &[
        &[],
        &["bs=4k", "count=100"],
        &["bs=64k", "skip=3"],
        &["bs=1M", "count=5", "skip=2"],
        &["bs=1000", "count=3"],
        &["-O", "qcow2", "bs=4k", "skip=10", "count=700"],
    ];
    for (i, extra) in cases.iter().enumerate() {
        let (v, q) = (format!("v{i}.img"), format!("q{i}.img"));
        let mut qa = vec!["dd".to_string()];
        let mut va = vec!["dd".to_string()];
        for a in extra.iter() {
            qa.push(a.to_string());
            va.push(a.to_string());
        }
        qa.extend(["if=in.qcow2".to_string(), format!("of={q}")]);
        va.extend(["if=in.qcow2".to_string(), format!("of={v}")]);
        qemu_img_in(d, &qa).ok();
        vmdisk_in(d, &va).ok();
        let what = format!("dd {extra:?}");
        assert_eq!(
            info(d, &v)["virtual-size"],
            info(d, &q)["virtual-size"],
            "{what}: sizes"
        );
        assert_qemu_compare_identical(d, &v, &q, &what);
    }
    // Where qemu-img prints "cannot skip" (and still creates an empty file), vmdisk refuses.
    vmdisk_in(
        d,
        &[
            "dd",
            "bs=4k",
            "skip=10",
            "count=5",
            "if=in.qcow2",
            "of=none.raw",
        ],
    )
    .expect_code(1);
    assert!(!d.join("none.raw").exists());
    vmdisk_in(d, &["dd", "if=in.qcow2"]).expect_code(1);
    vmdisk_in(d, &["dd", "bs=0", "if=in.qcow2", "of=x"]).expect_code(1);
}

#[test]
fn qemu_img_flags_vmdisk_lacks_are_named() {
    let dir = tmp();
    let d = dir.path();
    qemu_img_in(d, &["create", "-q", "-f", "raw", "a.raw", "1M"]).ok();
    for args in [
        vec!["convert", "-C", "a.raw", "b.raw"],
        vec!["convert", "-r", "10M", "a.raw", "b.raw"],
        vec!["convert", "--salvage", "a.raw", "b.raw"],
        vec!["map", "--start-offset", "0", "a.raw"],
        vec!["check", "-T", "none", "a.raw"],
        vec!["resize", "--object", "secret,id=x", "a.raw", "+1M"],
        vec!["bitmap", "--add", "a.raw", "b"],
    ] {
        let r = vmdisk_in(d, &args);
        assert_eq!(r.code(), 1, "{args:?}:\n{r}");
        assert!(
            r.stderr.contains("vmdisk does not support") && r.stderr.contains("yet"),
            "{args:?}: no 'does not support ... yet':\n{r}"
        );
        assert!(
            !r.stderr.contains("use '--"),
            "{args:?}: clap's '--' advice:\n{r}"
        );
        assert!(!d.join("b.raw").exists());
    }
    // --grow-fs exists now (issue #18): on a disk with neither a GPT nor an ext4 it is
    // refused with the reason and the way out, and the image keeps its size.
    let r = vmdisk_in(d, &["resize", "--grow-fs", "a.raw", "+1M"]);
    assert_eq!(r.code(), 1, "{r}");
    assert!(
        r.stderr.contains("no GPT and no ext4") && r.stderr.contains("vmdisk rescue"),
        "--grow-fs names the reason and the way out:\n{r}"
    );
    assert_eq!(
        fs::metadata(d.join("a.raw")).unwrap().len(),
        MIB,
        "not resized"
    );
}
