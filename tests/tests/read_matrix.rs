//! Done-when 2: vmdisk reads every kind of image qemu makes bit-identically to qemu-img.
//!
//! Each case builds an image with qemu-img / qemu-io only, then checks that
//! `vmdisk convert -O raw` produces the same bytes as `qemu-img convert -O raw` (byte for byte; sha256s in the failure) and
//! that `vmdisk compare` returns the exit code `qemu-img compare` returns, for the identical
//! pair and for deliberately different pairs (a changed data byte, a byte set inside a
//! zero/unallocated range), in both argument orders.
//!
//! Variants of one feature run in one test and every failure is collected, so one run shows
//! the whole picture.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use tests::*;

/// Everything that went wrong in one test, reported together.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn extend(&mut self, v: Vec<String>) {
        self.0.extend(v);
    }

    #[track_caller]
    fn assert_none(self, test: &str) {
        if !self.0.is_empty() {
            panic!(
                "{test}: {} failure(s)\n\n{}",
                self.0.len(),
                self.0.join("\n\n----------\n\n")
            );
        }
    }
}

fn label_seed(label: &str) -> u64 {
    label.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Run `compare A B` with both tools from `cwd`; the expected code is what qemu-img must say
/// (a test bug otherwise), vmdisk must say the same.
fn compare_agrees(
    cwd: &Path,
    a: &str,
    b: &str,
    strict: bool,
    expect: Option<i32>,
    label: &str,
) -> Vec<String> {
    let mut args = vec!["compare"];
    if strict {
        args.push("-s");
    }
    args.extend([a, b]);
    let q = qemu_img_in(cwd, &args);
    let v = vmdisk_in(cwd, &args);
    let mut errs = Vec::new();
    if let Some(e) = expect {
        if q.code() != e {
            errs.push(format!(
                "{label}: TEST BUG: qemu-img compare exited {} where the test expected {e}:\n{q}",
                q.code()
            ));
            return errs;
        }
    }
    if v.code() != q.code() {
        errs.push(format!(
            "{label}: vmdisk compare disagrees with qemu-img compare (vmdisk {}, qemu-img {}):\n\
             vmdisk:\n{v}\nqemu-img:\n{q}",
            v.code(),
            q.code()
        ));
    }
    errs
}

/// Find a byte at or after a seeded position (wrapping) for which `pred` holds.
fn pick(data: &[u8], rng: &mut Rng, pred: impl Fn(u8) -> bool) -> Option<usize> {
    let start = rng.range(0, data.len() as u64) as usize;
    (start..data.len()).chain(0..start).find(|&i| pred(data[i]))
}

/// The core check for one image `img` (path as given on the command line, from `cwd`).
/// `fmt` is passed as `-f` to both converts when set.
fn reads_like_qemu(cwd: &Path, img: &str, fmt: Option<&str>, label: &str) -> Vec<String> {
    let scratch = tempfile::tempdir().expect("tempdir");
    let ref_raw = scratch.path().join("qemu.raw");
    let vm_raw = scratch.path().join("vmdisk.raw");
    let mut errs = Vec::new();

    let mut qargs: Vec<&str> = vec!["convert"];
    if let Some(f) = fmt {
        qargs.extend(["-f", f]);
    }
    qargs.extend(["-O", "raw", img]);
    let mut q = qargs.clone();
    q.push(s(&ref_raw));
    qemu_img_in(cwd, &q).ok();
    let mut v = qargs.clone();
    v.push(s(&vm_raw));
    let r = vmdisk_in(cwd, &v);
    if !r.success() {
        errs.push(format!("{label}: vmdisk convert -O raw failed:\n{r}"));
    } else {
        let a = fs::read(&ref_raw).expect("read qemu output");
        let b = fs::read(&vm_raw).expect("read vmdisk output");
        if a != b {
            errs.push(format!(
                "{label}: vmdisk convert -O raw differs from qemu-img convert -O raw\n  \
                 qemu-img sha256 {}\n  vmdisk   sha256 {}\n  {} (qemu-img vs vmdisk)\n{r}",
                sha256(&ref_raw),
                sha256(&vm_raw),
                first_difference(&a, &b).unwrap_or_else(|| "no byte differs?".into())
            ));
        }
    }

    // compare: only without -f (the compare contract has no format flags)
    if fmt.is_some() {
        return errs;
    }
    let refp = s(&ref_raw);
    errs.extend(compare_agrees(
        cwd,
        img,
        refp,
        false,
        Some(0),
        &format!("{label} [compare vs its own raw]"),
    ));
    errs.extend(compare_agrees(
        cwd,
        refp,
        img,
        false,
        Some(0),
        &format!("{label} [compare raw vs image]"),
    ));

    let data = fs::read(&ref_raw).expect("read reference");
    let mut rng = Rng::new(label_seed(label));
    let cases: [(&str, Option<usize>); 2] = [
        ("a changed data byte", pick(&data, &mut rng, |b| b != 0)),
        (
            "a byte set inside a zero range",
            pick(&data, &mut rng, |b| b == 0),
        ),
    ];
    for (i, (what, pos)) in cases.into_iter().enumerate() {
        let Some(pos) = pos else {
            errs.push(format!("{label}: TEST BUG: no position for {what}"));
            continue;
        };
        let diff = scratch.path().join(format!("diff{i}.raw"));
        fs::copy(&ref_raw, &diff).expect("copy reference");
        let f = fs::OpenOptions::new()
            .write(true)
            .open(&diff)
            .expect("open diff");
        f.write_all_at(&[data[pos] ^ 0x5a], pos as u64)
            .expect("write diff byte");
        drop(f);
        let d = s(&diff);
        let l = format!("{label} [{what} at {pos:#x}]");
        // one order each: the data change with the image first, the zero-range one second
        if i == 0 {
            errs.extend(compare_agrees(cwd, img, d, false, Some(1), &l));
        } else {
            errs.extend(compare_agrees(cwd, d, img, false, Some(1), &l));
        }
    }
    errs
}

/// A temp dir plus the sizes used to build one fixture.
struct Fixture {
    dir: tempfile::TempDir,
    rnd: PathBuf,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().expect("tempdir");
        let rnd = dir.path().join("rnd.bin");
        make_rnd_file(&rnd, 1);
        Fixture { dir, rnd }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// qcow2 converted by qemu-img from a sparse mixed-data raw, with `-o opts` (and `-c`).
    fn qcow2_from_raw(
        &self,
        name: &str,
        size: u64,
        seed: u64,
        opts: &str,
        compress: bool,
    ) -> PathBuf {
        let src = self.path(&format!("{name}.src.raw"));
        make_sparse_raw(&src, size, seed, 24, 700 * KIB);
        let img = self.path(name);
        let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
        if compress {
            args.push("-c");
        }
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([s(&src), s(&img)]);
        qemu_img(&args).ok();
        fs::remove_file(&src).ok();
        img
    }

    /// Apply the standard seeded qemu-io mix to `img`.
    fn scribble(&self, img: &Path, seed: u64, size: u64, cluster: u64) {
        qemu_io(img, &qemu_io_ops(seed, size, cluster, &self.rnd));
    }
}

fn check_file(fx: &Fixture, img: &Path, label: &str) -> Vec<String> {
    let name = img.file_name().unwrap().to_str().unwrap();
    reads_like_qemu(fx.dir.path(), name, None, label)
}

#[test]
fn cluster_sizes() {
    let mut fails = Failures::default();
    for (cs, size) in [
        (512, 8 * MIB),
        (4096, 16 * MIB),
        (65536, 16 * MIB),
        (2 * MIB, 32 * MIB),
    ] {
        let fx = Fixture::new();
        let img = fx.qcow2_from_raw("img.qcow2", size, cs, &format!("cluster_size={cs}"), false);
        fx.scribble(&img, cs, size, cs);
        fails.extend(check_file(&fx, &img, &format!("cluster_size={cs}")));
    }
    fails.assert_none("cluster_sizes");
}

#[test]
fn compat_levels() {
    let mut fails = Failures::default();
    for compat in ["0.10", "1.1"] {
        let fx = Fixture::new();
        let size = 16 * MIB;
        let img = fx.qcow2_from_raw("img.qcow2", size, 7, &format!("compat={compat}"), false);
        fx.scribble(&img, 7, size, 65536);
        fails.extend(check_file(&fx, &img, &format!("compat={compat}")));
    }
    fails.assert_none("compat_levels");
}

#[test]
fn refcount_widths() {
    let mut fails = Failures::default();
    for bits in [1, 2, 4, 8, 16, 32, 64] {
        let fx = Fixture::new();
        let size = 16 * MIB;
        let opts = format!("refcount_bits={bits},cluster_size=4096");
        let img = fx.qcow2_from_raw("img.qcow2", size, bits, &opts, false);
        fx.scribble(&img, bits, size, 4096);
        fails.extend(check_file(&fx, &img, &opts));
    }
    fails.assert_none("refcount_widths");
}

#[test]
fn extended_l2_subclusters() {
    let mut fails = Failures::default();
    for cs in [32 * KIB, 64 * KIB, 2 * MIB] {
        let fx = Fixture::new();
        let size = 16 * MIB;
        let opts = format!("extended_l2=on,cluster_size={cs}");
        let img = fx.qcow2_from_raw("img.qcow2", size, cs + 1, &opts, false);
        fx.scribble(&img, cs, size, cs);
        // subcluster-sized pokes: cs/32 per subcluster
        let sub = cs / 32;
        qemu_io(
            &img,
            &[
                format!("write -P 0x77 {} {}", 5 * sub, sub),
                format!("write -z {} {}", 9 * sub, 3 * sub),
                format!("discard {} {}", cs + 2 * sub, 4 * sub),
                format!("write -P 0x78 {} 100", 3 * cs + 17),
            ],
        );
        fails.extend(check_file(&fx, &img, &opts));
    }
    // subclusters over a backing file: unallocated subclusters read from the backing file
    {
        let fx = Fixture::new();
        let size = 16 * MIB;
        let base = fx.path("base.raw");
        make_sparse_raw(&base, size, 99, 30, 900 * KIB);
        let top = fx.path("top.qcow2");
        qemu_img(&[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "extended_l2=on,cluster_size=65536",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&top),
        ])
        .ok();
        let sub = 2048;
        qemu_io(
            &top,
            &[
                format!("write -P 0x31 {} {}", 3 * sub, sub),
                format!("write -P 0x32 {} {}", 65536 + 31 * sub, 2 * sub),
                format!("write -z {} {}", 5 * 65536 + sub, 7 * sub),
                format!("discard {} {}", 7 * 65536, 65536),
                format!("write -P 0x33 {} 999", 9 * 65536 + 3333),
            ],
        );
        fx.scribble(&top, 5, size, 65536);
        fails.extend(check_file(
            &fx,
            &top,
            "extended_l2 overlay over raw backing",
        ));
    }
    fails.assert_none("extended_l2_subclusters");
}

fn compression(ctype: &str) {
    let mut fails = Failures::default();
    for cs in [4096, 65536] {
        let fx = Fixture::new();
        let size = 16 * MIB;
        let opts = format!("compression_type={ctype},cluster_size={cs}");
        let img = fx.qcow2_from_raw("img.qcow2", size, cs + 3, &opts, true);
        let (code, v, r) = qemu_check(&img);
        if code != 0 || v["compressed-clusters"].as_u64().unwrap_or(0) == 0 {
            fails.0.push(format!(
                "{opts}: TEST BUG: qemu made no compressed clusters:\n{r}"
            ));
        }
        fails.extend(check_file(&fx, &img, &format!("{opts} (as converted)")));
        // partial overwrites of compressed clusters, zeroing and discarding them, and
        // compressed writes by qemu-io itself
        fx.scribble(&img, cs, size, cs);
        qemu_io(
            &img,
            &[
                format!("write -c -P 0x44 {} {cs}", 100 * cs),
                format!("write -c -s {} {} {cs}", fx.rnd.display(), 101 * cs),
            ],
        );
        fails.extend(check_file(&fx, &img, &format!("{opts} (after qemu-io)")));
    }
    fails.assert_none(&format!("compression {ctype}"));
}

#[test]
fn compressed_zlib() {
    compression("zlib");
}

#[test]
fn compressed_zstd() {
    compression("zstd");
}

/// bottom.raw <- base.qcow2 <- mid.qcow2 <- top.qcow2, each backing path relative to the
/// overlay's own directory, in three different directories; vmdisk runs from elsewhere.
#[test]
fn backing_chain_relative_paths() {
    let fx = Fixture::new();
    let root = fx.dir.path();
    for d in ["imgs/a", "imgs/b", "imgs/c", "elsewhere"] {
        fs::create_dir_all(root.join(d)).unwrap();
    }
    let bottom = root.join("imgs/a/bottom.raw");
    make_sparse_raw(&bottom, 16 * MIB, 11, 20, 800 * KIB);
    let a = root.join("imgs/a");
    qemu_img_in(
        &a,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "bottom.raw",
            "-F",
            "raw",
            "base.qcow2",
            "24M",
        ],
    )
    .ok();
    fx.scribble(&a.join("base.qcow2"), 12, 24 * MIB, 65536);
    let b = root.join("imgs/b");
    qemu_img_in(
        &b,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            "-b",
            "../a/base.qcow2",
            "-F",
            "qcow2",
            "mid.qcow2",
            "32M",
        ],
    )
    .ok();
    fx.scribble(&b.join("mid.qcow2"), 13, 32 * MIB, 4096);
    let c = root.join("imgs/c");
    qemu_img_in(
        &c,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "../b/mid.qcow2",
            "-F",
            "qcow2",
            "top.qcow2",
            "40M",
        ],
    )
    .ok();
    fx.scribble(&c.join("top.qcow2"), 14, 40 * MIB, 65536);

    let info = qemu_info(root, "imgs/c/top.qcow2");
    assert_eq!(
        info["backing-filename"], "../b/mid.qcow2",
        "TEST BUG: backing path not relative"
    );

    let mut fails = Failures::default();
    fails.extend(reads_like_qemu(
        root,
        "imgs/c/top.qcow2",
        None,
        "top of chain, from the tree root",
    ));
    fails.extend(reads_like_qemu(
        &root.join("elsewhere"),
        "../imgs/c/top.qcow2",
        None,
        "top of chain, from a sibling dir",
    ));
    fails.extend(reads_like_qemu(
        root,
        "imgs/b/mid.qcow2",
        None,
        "middle of chain",
    ));
    let abs = root.join("imgs/c/top.qcow2");
    fails.extend(reads_like_qemu(
        Path::new("/"),
        s(&abs),
        None,
        "top of chain, absolute path from /",
    ));
    fails.assert_none("backing_chain_relative_paths");
}

/// qemu-io commands that only zero and discard, aligned and not.
fn zero_ops(seed: u64, size: u64, cluster: u64) -> Vec<String> {
    let mut rng = Rng::new(seed);
    let mut ops = Vec::new();
    for i in 0..24 {
        let aligned = i % 2 == 0;
        let (off, len) = if aligned {
            let n = rng.range(1, 5);
            (rng.range(0, size / cluster - n) * cluster, n * cluster)
        } else {
            let len = rng.range(1, 3 * cluster);
            (rng.range(0, size - len), len)
        };
        ops.push(match i % 3 {
            0 => format!("write -z {off} {len}"),
            1 => format!("write -z -u {off} {len}"),
            _ => format!("discard {off} {len}"),
        });
    }
    ops
}

#[test]
fn zero_clusters_and_discards() {
    let mut fails = Failures::default();
    for compat in ["1.1", "0.10"] {
        // plain image full of data
        let fx = Fixture::new();
        let size = 16 * MIB;
        let img = fx.qcow2_from_raw("img.qcow2", size, 21, &format!("compat={compat}"), false);
        qemu_io(&img, &[format!("write -P 0x5e 0 {}", 6 * MIB)]);
        qemu_io(&img, &zero_ops(22, size, 65536));
        fails.extend(check_file(
            &fx,
            &img,
            &format!("zero/discard, compat={compat}"),
        ));

        // overlay: zeroing and discarding must hide the backing data, not expose it
        let fx = Fixture::new();
        let base = fx.qcow2_from_raw("base.qcow2", size, 23, &format!("compat={compat}"), false);
        qemu_io(&base, &[format!("write -P 0x6f 0 {}", 12 * MIB)]);
        let top = fx.path("top.qcow2");
        qemu_img_in(
            fx.dir.path(),
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                &format!("compat={compat}"),
                "-b",
                "base.qcow2",
                "-F",
                "qcow2",
                "top.qcow2",
            ],
        )
        .ok();
        let _ = base;
        qemu_io(
            &top,
            &[format!("write -P 0x70 {} {}", 4 * MIB + 123, 2 * MIB)],
        );
        qemu_io(&top, &zero_ops(24, size, 65536));
        fails.extend(check_file(
            &fx,
            &top,
            &format!("zero/discard over backing, compat={compat}"),
        ));
    }
    fails.assert_none("zero_clusters_and_discards");
}

#[test]
fn internal_snapshots() {
    let fx = Fixture::new();
    let size = 16 * MIB;
    let img = fx.qcow2_from_raw("img.qcow2", size, 31, "", false);
    let p = s(&img);
    qemu_img(&["snapshot", "-c", "s1", p]).ok();
    fx.scribble(&img, 32, size, 65536);
    qemu_img(&["snapshot", "-c", "s2", p]).ok();
    fx.scribble(&img, 33, size, 65536);
    qemu_img(&["snapshot", "-c", "s3", p]).ok();
    qemu_img(&["snapshot", "-d", "s1", p]).ok();
    fx.scribble(&img, 34, size, 65536);
    let mut fails = Failures::default();
    fails.extend(check_file(
        &fx,
        &img,
        "image carrying internal snapshots, changed after them",
    ));
    fails.assert_none("internal_snapshots");
}

#[test]
fn raw_images_and_declared_raw() {
    let mut fails = Failures::default();
    let fx = Fixture::new();
    let raw = fx.path("disk.raw");
    make_sparse_raw(&raw, 24 * MIB + 512, 41, 20, 600 * KIB);
    fails.extend(check_file(&fx, &raw, "sparse raw image"));
    fails.extend(reads_like_qemu(
        fx.dir.path(),
        "disk.raw",
        Some("raw"),
        "sparse raw image, -f raw",
    ));
    // a qcow2 declared raw must be read as the file's bytes, never interpreted
    let img = fx.qcow2_from_raw("img.qcow2", 16 * MIB, 42, "", false);
    fails.extend(reads_like_qemu(
        fx.dir.path(),
        "img.qcow2",
        Some("raw"),
        "qcow2 file declared -f raw",
    ));
    let vm_raw = fx.path("declared.raw");
    let r = vmdisk_in(
        fx.dir.path(),
        &["convert", "-f", "raw", "-O", "raw", "img.qcow2", s(&vm_raw)],
    );
    if r.success() && sha256(&vm_raw) != sha256(&img) {
        fails.0.push(format!(
            "-f raw on a qcow2 did not copy the file's own bytes:\n{r}"
        ));
    }
    fails.assert_none("raw_images_and_declared_raw");
}

/// Large, sparse virtual sizes: an L1 table spanning many clusters (512-byte clusters,
/// 1 GiB) and an 8 GiB image with data near the 4 GiB boundary and the end. The outputs are
/// compared with `qemu-img compare` (hole-aware) rather than byte by byte, and vmdisk's raw
/// output must stay sparse.
#[test]
fn large_sparse_images() {
    let mut fails = Failures::default();
    for (label, opts, size) in [
        (
            "1 GiB, 512-byte clusters (L1 of 256 KiB)",
            "cluster_size=512",
            1u64 << 30,
        ),
        ("8 GiB, 64 KiB clusters", "cluster_size=65536", 8u64 << 30),
    ] {
        let fx = Fixture::new();
        let d = fx.dir.path();
        qemu_img_in(
            d,
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                "big.qcow2",
                &size.to_string(),
            ],
        )
        .ok();
        let g = 1u64 << 30;
        let mut ops = vec![
            "write -P 0x01 0 70000".to_string(),
            format!("write -P 0x02 {} 1000", size / 4 - 500),
            format!("write -P 0x03 {} 131072", size / 2 - 4096),
            format!("write -s {} {} 300000", fx.rnd.display(), size / 3 + 77),
            format!("write -z {} 4096", size / 2),
            format!("write -P 0x04 {} 65536", size - 65536),
            format!("write -P 0x05 {} 1", size - 1),
        ];
        if size > 4 * g {
            ops.push(format!("write -P 0x06 {} 8192", 4 * g - 4096));
        }
        qemu_io(&d.join("big.qcow2"), &ops);
        let q_raw = fx.path("qemu.raw");
        let v_raw = fx.path("vmdisk.raw");
        qemu_img_in(d, &["convert", "-O", "raw", "big.qcow2", s(&q_raw)]).ok();
        let r = vmdisk_in(d, &["convert", "-O", "raw", "big.qcow2", s(&v_raw)]);
        if !r.success() {
            fails
                .0
                .push(format!("{label}: vmdisk convert -O raw failed:\n{r}"));
            continue;
        }
        let len = fs::metadata(&v_raw).unwrap().len();
        if len != size {
            fails.0.push(format!(
                "{label}: vmdisk's raw output is {len} bytes, not {size}"
            ));
        }
        let cmp = qemu_img_in(
            d,
            &["compare", "-f", "raw", "-F", "raw", s(&q_raw), s(&v_raw)],
        );
        if cmp.code() != 0 {
            fails.0.push(format!(
                "{label}: vmdisk's raw output differs from qemu-img's:\n{cmp}"
            ));
        }
        use std::os::unix::fs::MetadataExt;
        let (qb, vb) = (
            fs::metadata(&q_raw).unwrap().blocks() * 512,
            fs::metadata(&v_raw).unwrap().blocks() * 512,
        );
        if vb > 2 * qb + 4 * MIB {
            fails.0.push(format!(
                "{label}: vmdisk's raw output is not sparse: {vb} bytes allocated, qemu-img's {qb}"
            ));
        }
        fails.extend(compare_agrees(
            d,
            "big.qcow2",
            s(&q_raw),
            false,
            Some(0),
            &format!("{label} [vs raw]"),
        ));
        fs::copy(fx.path("big.qcow2"), fx.path("big2.qcow2")).unwrap();
        qemu_io(
            &fx.path("big2.qcow2"),
            &[format!("write -P 0x07 {} 1", size - 4 * MIB)],
        );
        fails.extend(compare_agrees(
            d,
            "big.qcow2",
            "big2.qcow2",
            false,
            Some(1),
            &format!("{label} [one byte set near the end]"),
        ));
    }
    fails.assert_none("large_sparse_images");
}

/// Sizes that differ (extra zeros vs extra data) and strict mode.
#[test]
fn compare_sizes_and_strict() {
    let fx = Fixture::new();
    let size = 16 * MIB;
    let img = fx.qcow2_from_raw("img.qcow2", size, 51, "", false);
    fx.scribble(&img, 52, size, 65536);
    let cwd = fx.dir.path();
    let longer = fx.path("longer.raw");
    qemu_img_in(cwd, &["convert", "-O", "raw", "img.qcow2", s(&longer)]).ok();
    fs::OpenOptions::new()
        .write(true)
        .open(&longer)
        .unwrap()
        .set_len(size + 4 * MIB)
        .unwrap();
    let longer_dirty = fx.path("longer-dirty.raw");
    fs::copy(&longer, &longer_dirty).unwrap();
    fs::OpenOptions::new()
        .write(true)
        .open(&longer_dirty)
        .unwrap()
        .write_all_at(b"x", size + MIB + 7)
        .unwrap();
    let copy = fx.path("copy.qcow2");
    fs::copy(&img, &copy).unwrap();

    let mut fails = Failures::default();
    let l = s(&longer);
    let ld = s(&longer_dirty);
    fails.extend(compare_agrees(
        cwd,
        "img.qcow2",
        l,
        false,
        Some(0),
        "longer image, extra is zeros",
    ));
    fails.extend(compare_agrees(
        cwd,
        l,
        "img.qcow2",
        false,
        Some(0),
        "longer image first, extra is zeros",
    ));
    fails.extend(compare_agrees(
        cwd,
        "img.qcow2",
        ld,
        false,
        Some(1),
        "longer image, extra holds data",
    ));
    fails.extend(compare_agrees(
        cwd,
        "img.qcow2",
        "copy.qcow2",
        true,
        Some(0),
        "-s, byte copy of the image",
    ));
    // strict: a raw file is allocated everywhere, the qcow2 is not: whatever qemu says
    fails.extend(compare_agrees(
        cwd,
        "img.qcow2",
        l,
        true,
        None,
        "-s, qcow2 vs sized raw",
    ));
    fails.assert_none("compare_sizes_and_strict");
}
