//! Done-when 3: every qcow2 vmdisk writes passes `qemu-img check` (exit 0, no leaks) and
//! holds exactly what was written, as `qemu-img compare` sees it.
//!
//! - `vmdisk create` with each option, judged against `qemu-img create` with the same options
//!   (`qemu-img info` fields, `qemu-img check`), then written by qemu-io;
//! - `vmdisk convert` raw/qcow2 -> qcow2 with and without `-c` (zlib, zstd);
//! - random workloads through the library (vmdisk_image::open read-write) on a plain image,
//!   an overlay (whose backing file must not change) and an image carrying internal
//!   snapshots, mirrored in an in-memory model;
//! - internal snapshots made by one tool and listed/applied/deleted by the other.

use std::fs;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tests::*;
use vmdisk_block::BlockDevice;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

// ---------------------------------------------------------------------------------------------
// vmdisk create
// ---------------------------------------------------------------------------------------------

/// The `qemu-img info` fields that say what an image was created with.
fn created_fields(info: &Value) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    for k in [
        "format",
        "virtual-size",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
    ] {
        out.push((k.to_string(), info[k].clone()));
    }
    for k in [
        "compat",
        "compression-type",
        "lazy-refcounts",
        "refcount-bits",
        "extended-l2",
        "corrupt",
    ] {
        out.push((
            format!("format-specific.data.{k}"),
            info["format-specific"]["data"][k].clone(),
        ));
    }
    out
}

/// Create `name` with vmdisk and `qemu-<name>` with qemu-img, same args, in `dir`; compare
/// what qemu-img info and check say about both; then let qemu-io write into the vmdisk image.
fn create_like_qemu(dir: &Path, label: &str, args: &[&str], size: Option<&str>) -> Vec<String> {
    let mut errs = Vec::new();
    let vm_name = "vm.qcow2";
    let q_name = "qemu.qcow2";
    for n in [vm_name, q_name] {
        fs::remove_file(dir.join(n)).ok();
    }
    let mut vargs = vec!["create"];
    vargs.extend_from_slice(args);
    vargs.push(vm_name);
    let mut qargs = vec!["create", "-q"];
    qargs.extend_from_slice(args);
    qargs.push(q_name);
    if let Some(sz) = size {
        vargs.push(sz);
        qargs.push(sz);
    }
    qemu_img_in(dir, &qargs).ok();
    let r = vmdisk_in(dir, &vargs);
    if !r.success() {
        errs.push(format!("{label}: vmdisk create failed:\n{r}"));
        return errs;
    }
    let vm_img = dir.join(vm_name);
    let (code, v, c) = qemu_check(&vm_img);
    if code != 0 || v["leaks"].as_u64().unwrap_or(0) != 0 {
        errs.push(format!(
            "{label}: qemu-img check of the fresh vmdisk image is not clean:\n{c}"
        ));
    }
    let vi = qemu_info(dir, vm_name);
    let qi = qemu_info(dir, q_name);
    for ((k, a), (_, b)) in created_fields(&vi).into_iter().zip(created_fields(&qi)) {
        if a != b {
            errs.push(format!(
                "{label}: qemu-img info field {k}: vmdisk's image has {a}, qemu-img's has {b}\n  \
                 vmdisk create: {r}"
            ));
        }
    }
    // same metadata preallocation as qemu (allocated clusters), when asked for
    if args.iter().any(|a| a.contains("preallocation=metadata")) {
        let (_, qv, _) = qemu_check(&dir.join(q_name));
        if v["allocated-clusters"] != qv["allocated-clusters"] {
            errs.push(format!(
                "{label}: preallocation=metadata allocated {} clusters, qemu-img allocates {}",
                v["allocated-clusters"], qv["allocated-clusters"]
            ));
        }
    }
    // guest contents: zeros, or the backing file's
    let cmp = qemu_img_in(dir, &["compare", vm_name, q_name]);
    if cmp.code() != 0 {
        errs.push(format!(
            "{label}: fresh vmdisk image does not read like qemu-img's:\n{cmp}"
        ));
    }
    // qemu can use it: write across clusters, then check again and compare to a raw copy
    let vsize = vi["virtual-size"].as_u64().unwrap_or(0);
    if errs.is_empty() && vsize >= 4 * MIB {
        let rnd = dir.join("rnd.bin");
        make_rnd_file(&rnd, 3);
        let cs = vi["cluster-size"].as_u64().unwrap_or(65536);
        qemu_io(&vm_img, &qemu_io_ops(label.len() as u64, vsize, cs, &rnd));
        qemu_io(
            &dir.join(q_name),
            &qemu_io_ops(label.len() as u64, vsize, cs, &rnd),
        );
        let (code, _, c) = qemu_check(&vm_img);
        if code != 0 {
            errs.push(format!(
                "{label}: after qemu-io writes, qemu-img check is not clean:\n{c}"
            ));
        }
        let cmp = qemu_img_in(dir, &["compare", vm_name, q_name]);
        if cmp.code() != 0 {
            errs.push(format!(
                "{label}: after the same qemu-io writes, vmdisk's and qemu-img's images differ:\n{cmp}"
            ));
        }
    }
    errs
}

#[test]
fn create_options_match_qemu() {
    let dir = tmp();
    let d = dir.path();
    let cases: &[(&str, &[&str], Option<&str>)] = &[
        ("qcow2 defaults", &["-f", "qcow2"], Some("64M")),
        ("1G virtual", &["-f", "qcow2"], Some("1G")),
        ("odd size", &["-f", "qcow2"], Some("12345678")),
        (
            "cluster_size=512",
            &["-f", "qcow2", "-o", "cluster_size=512"],
            Some("16M"),
        ),
        (
            "cluster_size=4096",
            &["-f", "qcow2", "-o", "cluster_size=4096"],
            Some("32M"),
        ),
        (
            "cluster_size=65536",
            &["-f", "qcow2", "-o", "cluster_size=65536"],
            Some("32M"),
        ),
        (
            "cluster_size=2M",
            &["-f", "qcow2", "-o", "cluster_size=2M"],
            Some("64M"),
        ),
        (
            "compat=0.10",
            &["-f", "qcow2", "-o", "compat=0.10"],
            Some("32M"),
        ),
        (
            "compat=1.1",
            &["-f", "qcow2", "-o", "compat=1.1"],
            Some("32M"),
        ),
        (
            "refcount_bits=1",
            &["-f", "qcow2", "-o", "refcount_bits=1"],
            Some("32M"),
        ),
        (
            "refcount_bits=2",
            &["-f", "qcow2", "-o", "refcount_bits=2"],
            Some("32M"),
        ),
        (
            "refcount_bits=4",
            &["-f", "qcow2", "-o", "refcount_bits=4"],
            Some("32M"),
        ),
        (
            "refcount_bits=8",
            &["-f", "qcow2", "-o", "refcount_bits=8"],
            Some("32M"),
        ),
        (
            "refcount_bits=16",
            &["-f", "qcow2", "-o", "refcount_bits=16"],
            Some("32M"),
        ),
        (
            "refcount_bits=32",
            &["-f", "qcow2", "-o", "refcount_bits=32"],
            Some("32M"),
        ),
        (
            "refcount_bits=64",
            &["-f", "qcow2", "-o", "refcount_bits=64"],
            Some("32M"),
        ),
        (
            "compression_type=zlib",
            &["-f", "qcow2", "-o", "compression_type=zlib"],
            Some("32M"),
        ),
        (
            "compression_type=zstd",
            &["-f", "qcow2", "-o", "compression_type=zstd"],
            Some("32M"),
        ),
        (
            "lazy_refcounts=on",
            &["-f", "qcow2", "-o", "lazy_refcounts=on"],
            Some("32M"),
        ),
        (
            "preallocation=metadata",
            &["-f", "qcow2", "-o", "preallocation=metadata"],
            Some("32M"),
        ),
        (
            "preallocation=metadata,cluster_size=4096",
            &[
                "-f",
                "qcow2",
                "-o",
                "preallocation=metadata,cluster_size=4096",
            ],
            Some("8M"),
        ),
        (
            "everything at once",
            &[
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096,refcount_bits=64,compression_type=zstd,lazy_refcounts=on",
            ],
            Some("32M"),
        ),
    ];
    let mut errs = Vec::new();
    for (label, args, size) in cases {
        errs.extend(create_like_qemu(d, label, args, *size));
    }
    assert!(
        errs.is_empty(),
        "{} failure(s):\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );
}

#[test]
fn create_with_backing_files() {
    let dir = tmp();
    let root = dir.path();
    let base_dir = root.join("base");
    let top_dir = root.join("top");
    fs::create_dir_all(&base_dir).unwrap();
    fs::create_dir_all(&top_dir).unwrap();
    let src = base_dir.join("src.raw");
    make_sparse_raw(&src, 24 * MIB, 61, 16, 700 * KIB);
    qemu_img(&[
        "convert",
        "-O",
        "qcow2",
        s(&src),
        s(&base_dir.join("base.qcow2")),
    ])
    .ok();
    fs::rename(&src, base_dir.join("base.raw")).unwrap();

    let mut errs = Vec::new();
    let cases: &[(&str, &[&str], Option<&str>)] = &[
        (
            "-b qcow2 -F qcow2, size from backing",
            &["-f", "qcow2", "-b", "../base/base.qcow2", "-F", "qcow2"],
            None,
        ),
        (
            "-b raw -F raw, size from backing",
            &["-f", "qcow2", "-b", "../base/base.raw", "-F", "raw"],
            None,
        ),
        (
            "-b qcow2 -F qcow2, larger size",
            &["-f", "qcow2", "-b", "../base/base.qcow2", "-F", "qcow2"],
            Some("40M"),
        ),
        (
            "-b qcow2 -F qcow2 -o cluster_size=4096",
            &[
                "-f",
                "qcow2",
                "-o",
                "cluster_size=4096",
                "-b",
                "../base/base.qcow2",
                "-F",
                "qcow2",
            ],
            None,
        ),
        (
            "-b qcow2 -F qcow2 compat=0.10",
            &[
                "-f",
                "qcow2",
                "-o",
                "compat=0.10",
                "-b",
                "../base/base.qcow2",
                "-F",
                "qcow2",
            ],
            None,
        ),
    ];
    let before = (
        sha256(&base_dir.join("base.qcow2")),
        sha256(&base_dir.join("base.raw")),
    );
    for (label, args, size) in cases {
        errs.extend(create_like_qemu(&top_dir, label, args, *size));
    }
    // created from a different working directory: the backing name stays as given
    let r = vmdisk_in(
        root,
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "../base/base.qcow2",
            "-F",
            "qcow2",
            "top/other.qcow2",
        ],
    );
    if !r.success() {
        errs.push(format!("create from another cwd failed:\n{r}"));
    } else {
        assert_qemu_compare_identical(
            root,
            "top/other.qcow2",
            "base/base.qcow2",
            "overlay made from another cwd",
        );
        let info = qemu_info(root, "top/other.qcow2");
        if info["backing-filename"] != "../base/base.qcow2" {
            errs.push(format!(
                "backing-filename stored as {} instead of ../base/base.qcow2",
                info["backing-filename"]
            ));
        }
        assert_qemu_check_clean(
            &top_dir.join("other.qcow2"),
            "overlay made from another cwd",
        );
    }
    let after = (
        sha256(&base_dir.join("base.qcow2")),
        sha256(&base_dir.join("base.raw")),
    );
    if before != after {
        errs.push("creating overlays changed a backing file (STYLE rule 18)".into());
    }
    assert!(
        errs.is_empty(),
        "{} failure(s):\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );
}

#[test]
fn create_raw() {
    let dir = tmp();
    let f = dir.path().join("r.raw");
    vmdisk(&["create", "-f", "raw", s(&f), "16M"]).ok();
    let info = qemu_info(dir.path(), "r.raw");
    assert_eq!(info["format"], "raw", "{info:#}");
    assert_eq!(info["virtual-size"], 16 * MIB, "{info:#}");
    assert_eq!(fs::metadata(&f).unwrap().len(), 16 * MIB);
    assert!(
        fs::read(&f).unwrap().iter().all(|&b| b == 0),
        "a fresh raw image is not all zeros"
    );
}

// ---------------------------------------------------------------------------------------------
// vmdisk convert -> qcow2
// ---------------------------------------------------------------------------------------------

#[test]
fn convert_to_qcow2() {
    let dir = tmp();
    let d = dir.path();
    let src = d.join("src.raw");
    make_sparse_raw(&src, 32 * MIB, 71, 30, 900 * KIB);
    // a qemu-made chain as a second source: convert must flatten it
    qemu_img_in(
        d,
        &[
            "convert",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "src.raw",
            "chain-base.qcow2",
        ],
    )
    .ok();
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "chain-base.qcow2",
            "-F",
            "qcow2",
            "chain-top.qcow2",
        ],
    )
    .ok();
    let rnd = d.join("rnd.bin");
    make_rnd_file(&rnd, 9);
    qemu_io(
        &d.join("chain-top.qcow2"),
        &qemu_io_ops(72, 32 * MIB, 65536, &rnd),
    );

    struct Case {
        label: &'static str,
        src: &'static str,
        args: &'static [&'static str],
        compressed: bool,
        ctype: &'static str,
        cluster: u64,
    }
    let cases = [
        Case {
            label: "raw -> qcow2",
            src: "src.raw",
            args: &[],
            compressed: false,
            ctype: "zlib",
            cluster: 65536,
        },
        Case {
            label: "raw -> qcow2 -p",
            src: "src.raw",
            args: &["-p"],
            compressed: false,
            ctype: "zlib",
            cluster: 65536,
        },
        Case {
            label: "raw -> qcow2 -c",
            src: "src.raw",
            args: &["-c"],
            compressed: true,
            ctype: "zlib",
            cluster: 65536,
        },
        Case {
            label: "raw -> qcow2 -c zlib explicit",
            src: "src.raw",
            args: &["-c", "-o", "compression_type=zlib"],
            compressed: true,
            ctype: "zlib",
            cluster: 65536,
        },
        Case {
            label: "raw -> qcow2 -c zstd",
            src: "src.raw",
            args: &["-c", "-o", "compression_type=zstd"],
            compressed: true,
            ctype: "zstd",
            cluster: 65536,
        },
        Case {
            label: "raw -> qcow2 -c zstd 4K clusters",
            src: "src.raw",
            args: &["-c", "-o", "compression_type=zstd,cluster_size=4096"],
            compressed: true,
            ctype: "zstd",
            cluster: 4096,
        },
        Case {
            label: "raw -> qcow2 4K clusters",
            src: "src.raw",
            args: &["-o", "cluster_size=4096"],
            compressed: false,
            ctype: "zlib",
            cluster: 4096,
        },
        Case {
            label: "raw -> qcow2 compat=0.10",
            src: "src.raw",
            args: &["-o", "compat=0.10"],
            compressed: false,
            ctype: "zlib",
            cluster: 65536,
        },
        Case {
            label: "qcow2 chain -> qcow2",
            src: "chain-top.qcow2",
            args: &[],
            compressed: false,
            ctype: "zlib",
            cluster: 65536,
        },
        Case {
            label: "qcow2 chain -> qcow2 -c",
            src: "chain-top.qcow2",
            args: &["-c"],
            compressed: true,
            ctype: "zlib",
            cluster: 65536,
        },
    ];
    let base_sha = sha256(&d.join("chain-base.qcow2"));
    let mut errs = Vec::new();
    for (i, c) in cases.iter().enumerate() {
        let dst = format!("out{i}.qcow2");
        let mut args = vec!["convert", "-O", "qcow2"];
        args.extend_from_slice(c.args);
        args.extend([c.src, dst.as_str()]);
        let r = vmdisk_in(d, &args);
        if !r.success() {
            errs.push(format!("{}: vmdisk convert failed:\n{r}", c.label));
            continue;
        }
        let (code, v, chk) = qemu_check(&d.join(&dst));
        if code != 0 {
            errs.push(format!(
                "{}: qemu-img check is not clean:\n{chk}\nconvert was:\n{r}",
                c.label
            ));
        }
        let cmp = qemu_img_in(d, &["compare", c.src, &dst]);
        if cmp.code() != 0 {
            errs.push(format!(
                "{}: qemu-img compare with the source says different:\n{cmp}\nconvert was:\n{r}",
                c.label
            ));
        }
        let ncomp = v["compressed-clusters"].as_u64().unwrap_or(0);
        if c.compressed && ncomp == 0 {
            errs.push(format!(
                "{}: -c wrote no compressed cluster (qemu-img check):\n{chk}",
                c.label
            ));
        }
        if !c.compressed && ncomp != 0 {
            errs.push(format!(
                "{}: {ncomp} compressed clusters without -c:\n{chk}",
                c.label
            ));
        }
        let info = qemu_info(d, &dst);
        if info["format-specific"]["data"]["compression-type"] != c.ctype {
            errs.push(format!(
                "{}: compression-type is {}, expected {}",
                c.label, info["format-specific"]["data"]["compression-type"], c.ctype
            ));
        }
        if info["cluster-size"] != c.cluster {
            errs.push(format!(
                "{}: cluster-size is {}, expected {}",
                c.label, info["cluster-size"], c.cluster
            ));
        }
        if info["backing-filename"] != Value::Null {
            errs.push(format!(
                "{}: converted image still has a backing file {}",
                c.label, info["backing-filename"]
            ));
        }
    }
    if sha256(&d.join("chain-base.qcow2")) != base_sha {
        errs.push("converting from an overlay changed its backing file".into());
    }
    assert!(
        errs.is_empty(),
        "{} failure(s):\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Random workloads through the library, mirrored in a model
// ---------------------------------------------------------------------------------------------

struct Workload<'a> {
    label: &'a str,
    seed: u64,
    cluster: u64,
    done: usize,
    rng: Rng,
}

impl<'a> Workload<'a> {
    fn new(label: &'a str, seed: u64, cluster: u64) -> Self {
        Workload {
            label,
            seed,
            cluster,
            done: 0,
            rng: Rng::new(seed),
        }
    }

    /// Apply `n` random ops to `dev` and `model`; panics with the op, its index and the seed.
    fn run(&mut self, dev: &dyn BlockDevice, model: &mut [u8], n: usize) {
        let size = model.len() as u64;
        for _ in 0..n {
            let op = Op::random(&mut self.rng, size, self.cluster);
            let i = self.done;
            self.done += 1;
            let ctx = || {
                format!(
                    "{}: op #{i} {op:?} (workload seed {})",
                    self.label, self.seed
                )
            };
            match &op {
                Op::Write { off, len, seed } => {
                    let data = Op::write_data(*len, *seed);
                    dev.write_all_at(&data, *off)
                        .unwrap_or_else(|e| panic!("{} failed: {}", ctx(), error_chain(&e)));
                    model[*off as usize..(*off + *len) as usize].copy_from_slice(&data);
                }
                Op::Zero {
                    off,
                    len,
                    may_unmap,
                } => {
                    dev.write_zeroes(*off, *len, *may_unmap)
                        .unwrap_or_else(|e| panic!("{} failed: {}", ctx(), error_chain(&e)));
                    model[*off as usize..(*off + *len) as usize].fill(0);
                }
                Op::Discard { off, len } => {
                    dev.discard(*off, *len)
                        .unwrap_or_else(|e| panic!("{} failed: {}", ctx(), error_chain(&e)));
                    // contents are unspecified, but only "unchanged" or "zero" is acceptable
                    // (never stale backing data): adopt what the device now says
                    let mut now = vec![0u8; *len as usize];
                    dev.read_exact_at(&mut now, *off).unwrap_or_else(|e| {
                        panic!("{} read-back failed: {}", ctx(), error_chain(&e))
                    });
                    let old = &mut model[*off as usize..(*off + *len) as usize];
                    if let Some(p) = now
                        .iter()
                        .zip(old.iter())
                        .position(|(n, o)| *n != 0 && n != o)
                    {
                        panic!(
                            "{}: after discard byte {:#x} reads {:#04x}: neither its old value {:#04x} nor zero",
                            ctx(),
                            off + p as u64,
                            now[p],
                            old[p]
                        );
                    }
                    old.copy_from_slice(&now);
                }
                Op::Flush => dev
                    .flush()
                    .unwrap_or_else(|e| panic!("{} failed: {}", ctx(), error_chain(&e))),
                Op::Verify { off, len } => {
                    let mut now = vec![0u8; *len as usize];
                    dev.read_exact_at(&mut now, *off)
                        .unwrap_or_else(|e| panic!("{} failed: {}", ctx(), error_chain(&e)));
                    let want = &model[*off as usize..(*off + *len) as usize];
                    if let Some(d) = first_difference(&now, want) {
                        panic!(
                            "{}: read-back differs from the model ({d}, device vs model)",
                            ctx()
                        );
                    }
                }
            }
        }
    }
}

/// Read the whole device and compare with the model.
fn verify_all(dev: &dyn BlockDevice, model: &[u8], label: &str) {
    let mut buf = vec![0u8; model.len()];
    for (i, chunk) in buf.chunks_mut(4 * MIB as usize).enumerate() {
        dev.read_exact_at(chunk, i as u64 * 4 * MIB)
            .unwrap_or_else(|e| panic!("{label}: full read failed: {}", error_chain(&e)));
    }
    if let Some(d) = first_difference(&buf, model) {
        panic!("{label}: device differs from the model before close ({d}, device vs model)");
    }
}

/// The oracle verdict on a closed image: check clean, and it equals `model` (and the raw
/// file written from the model).
fn judge(dir: &Path, img: &Path, model: &[u8], label: &str) {
    assert_qemu_check_clean(img, label);
    let model_raw = dir.join(format!("model-{}.raw", label.replace([' ', '/'], "_")));
    write_sparse_file(&model_raw, model);
    let cmp = qemu_img(&["compare", s(img), s(&model_raw)]);
    assert_eq!(
        cmp.code(),
        0,
        "{label}: qemu-img compare of the image with the model:\n{cmp}"
    );
}

fn open_rw(img: &Path) -> vmdisk_image::Image {
    vmdisk_image::open(
        img,
        &vmdisk_image::OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "vmdisk_image::open({}) read-write: {}",
            img.display(),
            error_chain(&e)
        )
    })
}

fn close(img: vmdisk_image::Image, label: &str) {
    img.close()
        .unwrap_or_else(|e| panic!("{label}: close failed: {}", error_chain(&e)));
}

const SIZE: u64 = 32 * MIB;

fn workload_plain(label: &str, create_opts: &str, cluster: u64, ops: usize, seed: u64) {
    let dir = tmp();
    let img = dir.path().join("plain.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        create_opts,
        s(&img),
        &SIZE.to_string(),
    ])
    .ok();
    let mut model = vec![0u8; SIZE as usize];
    let image = open_rw(&img);
    let dev = image.dev();
    let mut w = Workload::new(label, seed, cluster);
    w.run(&*dev, &mut model, ops);
    verify_all(&*dev, &model, label);
    drop(dev);
    close(image, label);
    judge(dir.path(), &img, &model, label);
}

#[test]
fn workload_plain_64k() {
    workload_plain(
        "plain 64K clusters",
        "cluster_size=65536",
        65536,
        2000,
        0x1001,
    );
}

#[test]
fn workload_plain_4k_refcount64() {
    workload_plain(
        "plain 4K clusters refcount_bits=64",
        "cluster_size=4096,refcount_bits=64",
        4096,
        1500,
        0x1002,
    );
}

#[test]
fn workload_plain_v2_refcount16() {
    workload_plain(
        "plain compat=0.10",
        "compat=0.10,cluster_size=16384",
        16384,
        1500,
        0x1003,
    );
}

#[test]
fn workload_plain_zstd_lazy() {
    workload_plain(
        "plain zstd lazy_refcounts",
        "compression_type=zstd,lazy_refcounts=on",
        65536,
        1000,
        0x1004,
    );
}

#[test]
fn workload_overlay_keeps_backing() {
    let label = "overlay over qcow2 backing";
    let dir = tmp();
    let d = dir.path();
    let src = d.join("src.raw");
    let base_content = make_sparse_raw(&src, SIZE, 81, 40, 900 * KIB);
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
            "top.qcow2",
        ],
    )
    .ok();
    let base_sha = sha256(&d.join("base.qcow2"));
    let img = d.join("top.qcow2");
    let mut model = base_content;
    let image = open_rw(&img);
    let dev = image.dev();
    verify_all(&*dev, &model, "overlay before writing");
    let mut w = Workload::new(label, 0x2001, 65536);
    w.run(&*dev, &mut model, 2000);
    verify_all(&*dev, &model, label);
    drop(dev);
    close(image, label);
    assert_eq!(
        sha256(&d.join("base.qcow2")),
        base_sha,
        "{label}: writing the overlay changed the backing file"
    );
    judge(d, &img, &model, label);
    assert_qemu_check_clean(
        &d.join("base.qcow2"),
        "backing file after the overlay workload",
    );
}

#[test]
fn workload_with_internal_snapshots() {
    let label = "image with internal snapshots";
    let dir = tmp();
    let d = dir.path();
    let src = d.join("src.raw");
    let content = make_sparse_raw(&src, SIZE, 91, 40, 900 * KIB);
    qemu_img_in(d, &["convert", "-O", "qcow2", "src.raw", "snap.qcow2"]).ok();
    let img = d.join("snap.qcow2");
    // a snapshot qemu made: every cluster starts shared (refcount 2)
    qemu_img(&["snapshot", "-c", "before", s(&img)]).ok();
    let at_before = content.clone();
    let mut model = content;

    let image = open_rw(&img);
    let dev = image.dev();
    let mut w = Workload::new(label, 0x3001, 65536);
    w.run(&*dev, &mut model, 800);
    let q = image
        .qcow2()
        .unwrap_or_else(|| panic!("{label}: vmdisk_image::open did not give a qcow2 engine"));
    vmdisk_qcow2::snapshot::create(q, "mid")
        .unwrap_or_else(|e| panic!("{label}: snapshot::create failed: {}", error_chain(&e)));
    let at_mid = model.clone();
    w.run(&*dev, &mut model, 1200);
    verify_all(&*dev, &model, label);
    drop(dev);
    close(image, label);

    judge(d, &img, &model, label);
    for (name, want) in [("before", &at_before), ("mid", &at_mid)] {
        let out = d.join(format!("{name}.raw"));
        qemu_img(&[
            "convert",
            "-l",
            &format!("snapshot.name={name}"),
            "-O",
            "raw",
            s(&img),
            s(&out),
        ])
        .ok();
        let got = fs::read(&out).unwrap();
        if let Some(diff) = first_difference(&got, want) {
            panic!("{label}: snapshot '{name}' no longer holds its content ({diff}, qemu-img vs model)");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots across tools
// ---------------------------------------------------------------------------------------------

fn snapshot_names(dir: &Path, img: &str) -> Vec<String> {
    qemu_info(dir, img)["snapshots"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s["name"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// A qcow2 with data plus its raw content (by qemu-img).
fn snapshot_fixture(d: &Path, seed: u64) -> (PathBuf, PathBuf) {
    let src = d.join("src.raw");
    make_sparse_raw(&src, 16 * MIB, seed, 20, 700 * KIB);
    let img = d.join("s.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&img)]).ok();
    let rnd = d.join("rnd.bin");
    make_rnd_file(&rnd, seed);
    (img, rnd)
}

#[test]
fn snapshot_made_by_vmdisk_used_by_qemu() {
    let dir = tmp();
    let d = dir.path();
    let (img, rnd) = snapshot_fixture(d, 101);
    let at_snap = qemu_raw_sha(d, "s.qcow2", &d.join("at-snap.raw"));
    vmdisk(&["snapshot", "create", s(&img), "vm1"]).ok();
    assert_qemu_check_clean(&img, "after vmdisk snapshot create");
    let names = snapshot_names(d, "s.qcow2");
    assert!(
        names.contains(&"vm1".to_string()),
        "qemu-img does not list vmdisk's snapshot vm1: {names:?}"
    );
    let l = qemu_img(&["snapshot", "-l", s(&img)]).ok();
    assert!(
        l.stdout.contains("vm1"),
        "qemu-img snapshot -l does not show vm1:\n{l}"
    );
    // the guest carries on
    qemu_io(&img, &qemu_io_ops(102, 16 * MIB, 65536, &rnd));
    let changed = qemu_raw_sha(d, "s.qcow2", &d.join("changed.raw"));
    assert_ne!(
        changed, at_snap,
        "TEST BUG: the writes after the snapshot changed nothing"
    );
    assert_qemu_check_clean(&img, "qemu-io writes after vmdisk snapshot create");
    // qemu goes back to it
    qemu_img(&["snapshot", "-a", "vm1", s(&img)]).ok();
    assert_eq!(
        qemu_raw_sha(d, "s.qcow2", &d.join("applied.raw")),
        at_snap,
        "qemu-img snapshot -a vm1 does not restore the content at snapshot time"
    );
    assert_qemu_check_clean(&img, "after qemu-img snapshot -a of vmdisk's snapshot");
    // and vmdisk deletes it
    vmdisk(&["snapshot", "delete", s(&img), "vm1"]).ok();
    assert_qemu_check_clean(&img, "after vmdisk snapshot delete");
    assert!(
        snapshot_names(d, "s.qcow2").is_empty(),
        "vm1 still listed after vmdisk snapshot delete"
    );
    assert_eq!(
        qemu_raw_sha(d, "s.qcow2", &d.join("final.raw")),
        at_snap,
        "delete changed the active content"
    );
}

#[test]
fn snapshot_made_by_qemu_used_by_vmdisk() {
    let dir = tmp();
    let d = dir.path();
    let (img, rnd) = snapshot_fixture(d, 111);
    let at_q1 = qemu_raw_sha(d, "s.qcow2", &d.join("at-q1.raw"));
    qemu_img(&["snapshot", "-c", "q1", s(&img)]).ok();
    qemu_io(&img, &qemu_io_ops(112, 16 * MIB, 65536, &rnd));
    let at_q2 = qemu_raw_sha(d, "s.qcow2", &d.join("at-q2.raw"));
    assert_ne!(
        at_q1, at_q2,
        "TEST BUG: the writes after q1 changed nothing"
    );
    qemu_img(&["snapshot", "-c", "q2", s(&img)]).ok();
    qemu_io(&img, &qemu_io_ops(113, 16 * MIB, 65536, &rnd));

    let list = vmdisk(&["snapshot", "list", s(&img)]).ok();
    for n in ["q1", "q2"] {
        assert!(
            list.stdout.contains(n),
            "vmdisk snapshot list does not show {n}:\n{list}"
        );
    }
    vmdisk(&["snapshot", "apply", s(&img), "q1"]).ok();
    assert_qemu_check_clean(&img, "after vmdisk snapshot apply q1");
    assert_eq!(
        qemu_raw_sha(d, "s.qcow2", &d.join("applied-q1.raw")),
        at_q1,
        "vmdisk snapshot apply q1 does not restore q1's content"
    );
    vmdisk(&["snapshot", "apply", s(&img), "q2"]).ok();
    assert_qemu_check_clean(&img, "after vmdisk snapshot apply q2");
    assert_eq!(
        qemu_raw_sha(d, "s.qcow2", &d.join("applied-q2.raw")),
        at_q2,
        "vmdisk snapshot apply q2 does not restore q2's content"
    );
    vmdisk(&["snapshot", "delete", s(&img), "q1"]).ok();
    assert_qemu_check_clean(&img, "after vmdisk snapshot delete q1");
    assert_eq!(
        snapshot_names(d, "s.qcow2"),
        vec!["q2".to_string()],
        "snapshots after deleting q1"
    );
    // q2 is still intact after q1's clusters were freed
    qemu_img(&["snapshot", "-a", "q2", s(&img)]).ok();
    assert_eq!(
        qemu_raw_sha(d, "s.qcow2", &d.join("reapplied-q2.raw")),
        at_q2,
        "q2 damaged by deleting q1"
    );
    vmdisk(&["snapshot", "delete", s(&img), "q2"]).ok();
    assert_qemu_check_clean(&img, "after deleting every snapshot");
    assert!(snapshot_names(d, "s.qcow2").is_empty());
}

#[test]
fn snapshot_round_trip_in_vmdisk() {
    let dir = tmp();
    let d = dir.path();
    let (img, rnd) = snapshot_fixture(d, 121);
    let at_a = qemu_raw_sha(d, "s.qcow2", &d.join("a.raw"));
    vmdisk(&["snapshot", "create", s(&img), "a"]).ok();
    qemu_io(&img, &qemu_io_ops(122, 16 * MIB, 65536, &rnd));
    vmdisk(&["snapshot", "create", s(&img), "b"]).ok();
    let at_b = qemu_raw_sha(d, "s.qcow2", &d.join("b.raw"));
    qemu_io(&img, &qemu_io_ops(123, 16 * MIB, 65536, &rnd));
    assert_qemu_check_clean(&img, "two vmdisk snapshots and writes");
    vmdisk(&["snapshot", "apply", s(&img), "a"]).ok();
    assert_eq!(
        qemu_raw_sha(d, "s.qcow2", &d.join("a2.raw")),
        at_a,
        "apply a"
    );
    vmdisk(&["snapshot", "delete", s(&img), "a"]).ok();
    vmdisk(&["snapshot", "apply", s(&img), "b"]).ok();
    assert_eq!(
        qemu_raw_sha(d, "s.qcow2", &d.join("b2.raw")),
        at_b,
        "apply b after deleting a"
    );
    vmdisk(&["snapshot", "delete", s(&img), "b"]).ok();
    assert_qemu_check_clean(&img, "after the vmdisk snapshot round trip");
}

/// The device is Send + Sync and shared by worker threads (convert uses rayon): four
/// threads write disjoint, cluster-aligned quarters at once, so L2 tables and refcount
/// blocks are allocated concurrently.
#[test]
fn workload_concurrent_threads() {
    let label = "4 threads, disjoint quarters";
    let dir = tmp();
    let img = dir.path().join("mt.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=4096",
        s(&img),
        &SIZE.to_string(),
    ])
    .ok();
    let image = open_rw(&img);
    let dev = image.dev();
    let quarter = SIZE / 4;
    let models: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let handles: Vec<_> = (0..4u64)
            .map(|t| {
                let dev = dev.clone();
                sc.spawn(move || {
                    let window = vmdisk_block::Slice::new(dev, t * quarter, quarter)
                        .unwrap_or_else(|e| panic!("slice: {}", error_chain(&e)));
                    let mut model = vec![0u8; quarter as usize];
                    let l = format!("{label}, thread {t}");
                    let mut w = Workload::new(&l, 0x4000 + t, 4096);
                    w.run(&window, &mut model, 500);
                    model
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("worker thread panicked"))
            .collect()
    });
    let model: Vec<u8> = models.concat();
    verify_all(&*dev, &model, label);
    drop(dev);
    close(image, label);
    judge(dir.path(), &img, &model, label);
}
