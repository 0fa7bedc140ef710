//! `check` judged against `qemu-img check` (qemu-img 10 is the oracle), on images qemu made with
//! many option combinations, and on images with leaks and corruptions injected by hand.
//!
//! These tests shell out to `qemu-img` and `qemu-io`; when either is missing they fail loudly
//! (CI installs them), they never skip.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmdisk_block::{Error, MemDisk, RawFile};
use vmdisk_qcow2::check::{check, CheckReport, Repair};
use vmdisk_qcow2::meta::{self, Header};

fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/local/bin", "/bin"] {
        let p = Path::new(dir).join(name);
        if p.exists() {
            return p;
        }
    }
    panic!(
        "`{name}` is required by these interop tests and was not found; install qemu-utils \
         (cargo xtask test does)"
    );
}

/// Run a tool, require success, return stdout.
fn run(name: &str, args: &[&str]) -> String {
    let out = Command::new(tool(name))
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {name}: {e}"));
    assert!(
        out.status.success(),
        "{name} {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn qemu_img(args: &[&str]) -> String {
    run("qemu-img", args)
}

fn qemu_io(img: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", "qcow2"];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    let p = img.to_str().unwrap();
    args.push(p);
    run("qemu-io", &args);
}

/// What `qemu-img check --output=json` said, plus its exit status.
#[derive(Debug, Default, PartialEq, Eq)]
struct QemuCheck {
    exit: i32,
    corruptions: u64,
    leaks: u64,
    check_errors: u64,
    image_end_offset: u64,
    total_clusters: u64,
    allocated_clusters: u64,
    fragmented_clusters: u64,
    compressed_clusters: u64,
    raw: String,
}

/// A number field of a flat JSON object (absent fields are 0, as qemu omits them then).
fn json_u64(json: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let Some(at) = json.find(&pat) else { return 0 };
    json[at + pat.len()..]
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit())
        .collect::<String>()
        .parse()
        .unwrap_or(0)
}

fn qemu_check(img: &Path, repair: Option<&str>) -> QemuCheck {
    let mut cmd = Command::new(tool("qemu-img"));
    cmd.args(["check", "-f", "qcow2", "--output=json"]);
    if let Some(r) = repair {
        cmd.args(["-r", r]);
    }
    let out = cmd.arg(img).output().expect("running qemu-img check");
    let json = String::from_utf8_lossy(&out.stdout).into_owned();
    QemuCheck {
        exit: out.status.code().unwrap_or(-1),
        corruptions: json_u64(&json, "corruptions"),
        leaks: json_u64(&json, "leaks"),
        check_errors: json_u64(&json, "check-errors"),
        image_end_offset: json_u64(&json, "image-end-offset"),
        total_clusters: json_u64(&json, "total-clusters"),
        allocated_clusters: json_u64(&json, "allocated-clusters"),
        fragmented_clusters: json_u64(&json, "fragmented-clusters"),
        compressed_clusters: json_u64(&json, "compressed-clusters"),
        raw: format!("{json}\n{}", String::from_utf8_lossy(&out.stderr)),
    }
}

fn our_check(img: &Path, repair: Repair) -> CheckReport {
    let host = RawFile::open(img, repair == Repair::None).expect("open host file");
    check(&host, repair).unwrap_or_else(|e| panic!("check {} failed: {e}", img.display()))
}

/// Our report must agree with qemu-img's on every counter.
fn assert_agrees(img: &Path) -> (CheckReport, QemuCheck) {
    let q = qemu_check(img, None);
    let ours = our_check(img, Repair::None);
    let ctx = format!("{}\nqemu: {}\nours: {:#?}", img.display(), q.raw, ours);
    assert_eq!(ours.exit_code(), q.exit, "exit code\n{ctx}");
    assert_eq!(ours.corruptions, q.corruptions, "corruptions\n{ctx}");
    assert_eq!(ours.leaks, q.leaks, "leaks\n{ctx}");
    assert_eq!(ours.check_errors, q.check_errors, "check errors\n{ctx}");
    if q.exit == 0 || q.exit == 2 || q.exit == 3 {
        assert_eq!(
            ours.image_end_offset, q.image_end_offset,
            "image end\n{ctx}"
        );
        assert_eq!(ours.total_clusters, q.total_clusters, "total\n{ctx}");
        assert_eq!(
            ours.allocated_clusters, q.allocated_clusters,
            "allocated\n{ctx}"
        );
        assert_eq!(
            ours.fragmented_clusters, q.fragmented_clusters,
            "fragmented\n{ctx}"
        );
        assert_eq!(
            ours.compressed_clusters, q.compressed_clusters,
            "compressed\n{ctx}"
        );
    }
    (ours, q)
}

/// A guest workload with writes, zero writes, discards and rewrites across the disk.
const WORKLOAD: &[&str] = &[
    "write -P 0x11 0 192k",
    "write -P 0x22 1M 64k",
    "write -P 0x33 3M 4k",
    "write -z 2M 128k",
    "write -P 0x44 5000k 300k",
    "discard 1M 64k",
    "write -P 0x55 7M 1k",
    "write -P 0x66 100k 8k",
];

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().unwrap();
    if opts.is_empty() {
        qemu_img(&["create", "-q", "-f", "qcow2", ps, size]);
    } else {
        qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, ps, size]);
    }
    p
}

// ---------------------------------------------------------------------------------------------
// Clean images made by qemu: we must agree they are clean, counter for counter.

#[test]
fn qemu_images_with_many_options_are_clean() {
    let d = tmp();
    let cases: &[(&str, &str)] = &[
        ("default", ""),
        ("c512", "cluster_size=512"),
        ("c512_rc1", "cluster_size=512,refcount_bits=1"),
        ("c2m", "cluster_size=2M"),
        ("rc1", "refcount_bits=1"),
        ("rc2", "refcount_bits=2"),
        ("rc4", "refcount_bits=4"),
        ("rc8", "refcount_bits=8"),
        ("rc32", "refcount_bits=32"),
        ("rc64", "refcount_bits=64"),
        ("c2m_rc64", "cluster_size=2M,refcount_bits=64"),
        ("v2", "compat=0.10"),
        ("v2_c4k", "compat=0.10,cluster_size=4k"),
        ("lazy", "lazy_refcounts=on"),
        ("extl2", "extended_l2=on"),
        ("extl2_c2m", "extended_l2=on,cluster_size=2M"),
        ("prealloc", "preallocation=metadata"),
        ("zstd", "compression_type=zstd"),
    ];
    for (name, opts) in cases {
        let img = create(d.path(), &format!("{name}.qcow2"), opts, "8M");
        let (ours, _) = assert_agrees(&img);
        assert!(ours.is_clean(), "{name}: {ours:#?}");
        qemu_io(&img, WORKLOAD);
        let (ours, _) = assert_agrees(&img);
        assert!(ours.is_clean(), "{name} after workload: {ours:#?}");
        assert!(ours.allocated_clusters > 0, "{name}: {ours:#?}");
    }
}

#[test]
fn qemu_images_with_snapshots_are_clean() {
    let d = tmp();
    for opts in [
        "",
        "compat=0.10",
        "cluster_size=512",
        "refcount_bits=64",
        "extended_l2=on",
    ] {
        let img = create(d.path(), "snap.qcow2", opts, "8M");
        let p = img.to_str().unwrap();
        qemu_io(&img, &WORKLOAD[..4]);
        qemu_img(&["snapshot", "-c", "first", p]);
        qemu_io(&img, &WORKLOAD[3..]);
        qemu_img(&["snapshot", "-c", "second", p]);
        qemu_io(&img, &["write -P 0x77 0 64k", "write -P 0x78 6M 1M"]);
        let (ours, _) = assert_agrees(&img);
        assert!(ours.is_clean(), "{opts}: {ours:#?}");
        qemu_img(&["snapshot", "-d", "first", p]);
        let (ours, _) = assert_agrees(&img);
        assert!(ours.is_clean(), "{opts} after delete: {ours:#?}");
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn compressed_images_are_clean() {
    let d = tmp();
    // A raw source with compressible, incompressible and zero regions.
    let raw = d.path().join("src.raw");
    let mut data = vec![0u8; 6 << 20];
    let mut x = 0x1234_5678u32;
    for (i, b) in data.iter_mut().enumerate() {
        if (1 << 20..2 << 20).contains(&i) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        } else if i < (1 << 20) || (3 << 20..4 << 20).contains(&i) {
            *b = (i / 100) as u8;
        }
    }
    std::fs::write(&raw, &data).unwrap();
    let rs = raw.to_str().unwrap();
    for opts in [
        "",
        "cluster_size=512",
        "cluster_size=2M",
        "compression_type=zstd",
        "compat=0.10",
        "extended_l2=on",
    ] {
        let img = d.path().join("c.qcow2");
        let is = img.to_str().unwrap();
        let mut args = vec!["convert", "-c", "-f", "raw", "-O", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", opts]);
        }
        args.extend([rs, is]);
        qemu_img(&args);
        let (ours, _) = assert_agrees(&img);
        assert!(ours.is_clean(), "{opts}: {ours:#?}");
        assert!(ours.compressed_clusters > 0, "{opts}: {ours:#?}");
        // Overwrite part of a compressed area: the old compressed clusters are freed.
        qemu_io(&img, &["write -P 0x99 0 100k", "write -P 0x98 3M 64k"]);
        let (ours, _) = assert_agrees(&img);
        assert!(ours.is_clean(), "{opts} rewritten: {ours:#?}");
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn overlay_and_bitmap_images_are_clean() {
    let d = tmp();
    let base = create(d.path(), "base.qcow2", "", "8M");
    qemu_io(&base, WORKLOAD);
    let ov = d.path().join("overlay.qcow2");
    let os = ov.to_str().unwrap();
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        base.to_str().unwrap(),
        "-F",
        "qcow2",
        os,
    ]);
    qemu_io(&ov, &["write -P 0x12 64k 64k", "write -P 0x13 4M 4k"]);
    assert!(assert_agrees(&ov).0.is_clean());

    let bm = create(d.path(), "bitmap.qcow2", "", "8M");
    let bs = bm.to_str().unwrap();
    qemu_img(&["bitmap", "--add", bs, "b0"]);
    qemu_img(&["bitmap", "--add", "-g", "512", bs, "b1"]);
    qemu_io(&bm, WORKLOAD);
    qemu_img(&["bitmap", "--add", bs, "b2"]);
    let (ours, _) = assert_agrees(&bm);
    assert!(ours.is_clean(), "{ours:#?}");
}

// ---------------------------------------------------------------------------------------------
// Injected damage.

fn host_header(img: &Path) -> Header {
    let bytes = std::fs::read(img).unwrap();
    Header::parse(&bytes[..bytes.len().min(2 << 20)]).unwrap()
}

/// Host offset of the refcount block covering `cluster` (which must exist).
fn refblock_of(img: &Path, h: &Header, cluster: u64) -> u64 {
    let f = std::fs::File::open(img).unwrap();
    let idx = cluster / h.refcount_block_entries();
    let mut e = [0u8; 8];
    f.read_exact_at(&mut e, h.refcount_table_offset + idx * 8)
        .unwrap();
    let off = u64::from_be_bytes(e) & meta::REFT_OFFSET_MASK;
    assert_ne!(off, 0, "no refcount block for cluster {cluster}");
    off
}

fn get_refcount(img: &Path, cluster: u64) -> u64 {
    let h = host_header(img);
    let rb = refblock_of(img, &h, cluster);
    let f = std::fs::File::open(img).unwrap();
    let mut block = vec![0u8; h.cluster_size() as usize];
    f.read_exact_at(&mut block, rb).unwrap();
    meta::refcount_get(
        &block,
        cluster % h.refcount_block_entries(),
        h.refcount_order,
    )
}

fn set_refcount(img: &Path, cluster: u64, value: u64) {
    let h = host_header(img);
    let rb = refblock_of(img, &h, cluster);
    let f = OpenOptions::new().read(true).write(true).open(img).unwrap();
    let mut block = vec![0u8; h.cluster_size() as usize];
    f.read_exact_at(&mut block, rb).unwrap();
    meta::refcount_set(
        &mut block,
        cluster % h.refcount_block_entries(),
        h.refcount_order,
        value,
    )
    .unwrap();
    f.write_all_at(&block, rb).unwrap();
}

/// Host cluster index of the first data cluster mapped by the active L1/L2 tables.
fn first_data_cluster(img: &Path) -> u64 {
    let h = host_header(img);
    let f = std::fs::File::open(img).unwrap();
    let mut e = [0u8; 8];
    for i in 0..u64::from(h.l1_size) {
        f.read_exact_at(&mut e, h.l1_table_offset + i * 8).unwrap();
        let l2 = u64::from_be_bytes(e) & meta::L1E_OFFSET_MASK;
        if l2 == 0 {
            continue;
        }
        for j in 0..h.l2_entries() {
            f.read_exact_at(&mut e, l2 + j * h.l2_entry_bytes())
                .unwrap();
            let v = u64::from_be_bytes(e);
            let off = v & meta::L2E_OFFSET_MASK;
            if v & meta::OFLAG_COMPRESSED == 0 && off != 0 {
                return off >> h.cluster_bits;
            }
        }
    }
    panic!("no data cluster in {}", img.display());
}

fn grow_by_clusters(img: &Path, n: u64) -> u64 {
    let h = host_header(img);
    let f = OpenOptions::new().write(true).open(img).unwrap();
    let len = f
        .metadata()
        .unwrap()
        .len()
        .next_multiple_of(h.cluster_size());
    f.set_len(len + n * h.cluster_size()).unwrap();
    len >> h.cluster_bits
}

#[test]
fn injected_leaks_are_counted_and_repaired() {
    let d = tmp();
    for opts in [
        "",
        "cluster_size=512,refcount_bits=1",
        "refcount_bits=64",
        "compat=0.10",
    ] {
        let img = create(d.path(), "leak.qcow2", opts, "8M");
        qemu_io(&img, WORKLOAD);
        // Header cluster 1 -> 2 (except with 1-bit refcounts), and three clusters past the end.
        let first_new = grow_by_clusters(&img, 3);
        for k in first_new..first_new + 3 {
            set_refcount(&img, k, 1);
        }
        let expected_leaks = if opts.contains("refcount_bits=1") {
            3
        } else {
            set_refcount(&img, 0, 2);
            4
        };
        let (ours, q) = assert_agrees(&img);
        assert_eq!(q.leaks, expected_leaks, "{opts}: {}", q.raw);
        assert_eq!(ours.exit_code(), 3);
        assert!(
            ours.messages
                .iter()
                .any(|m| m == &format!("Leaked cluster {first_new} refcount=1 reference=0")),
            "{:#?}",
            ours.messages
        );

        let fixed = our_check(&img, Repair::Leaks);
        assert_eq!(fixed.leaks_fixed, expected_leaks, "{fixed:#?}");
        assert!(fixed.is_clean(), "{fixed:#?}");
        let q = qemu_check(&img, None);
        assert_eq!(q.exit, 0, "qemu after our repair: {}", q.raw);
        assert_eq!(get_refcount(&img, first_new), 0);
        std::fs::remove_file(&img).unwrap();
    }
}

#[test]
fn injected_corruption_is_reported_like_qemu() {
    let d = tmp();
    let img = create(d.path(), "corrupt.qcow2", "", "8M");
    qemu_io(&img, WORKLOAD);
    let data = first_data_cluster(&img);
    set_refcount(&img, data, 0);
    let (ours, q) = assert_agrees(&img);
    assert_eq!(q.exit, 2);
    assert!(ours.corruptions > 0 && ours.exit_code() == 2, "{ours:#?}");
    let want = format!("ERROR cluster {data} refcount=0 reference=1");
    assert!(ours.messages.contains(&want), "{:#?}", ours.messages);

    // -r leaks cannot fix a zero refcount: qemu says the structure needs rebuilding (exit 1),
    // and so do we, without writing anything.
    let before = std::fs::read(&img).unwrap();
    let q = qemu_check(&img, Some("leaks"));
    assert_eq!(q.exit, 1, "{}", q.raw);
    std::fs::write(&img, &before).unwrap();
    let r = our_check(&img, Repair::Leaks);
    assert_eq!(r.exit_code(), 1, "{r:#?}");
    assert_eq!(
        std::fs::read(&img).unwrap(),
        before,
        "-r leaks must not write here"
    );

    // -r all: the refcount block exists and is sound, so we fix the entry in place.
    let r = our_check(&img, Repair::All);
    assert!(r.is_clean(), "{r:#?}");
    assert!(r.corruptions_fixed >= 1, "{r:#?}");
    let q = qemu_check(&img, None);
    assert_eq!(q.exit, 0, "{}", q.raw);
}

#[test]
fn too_high_and_too_low_refcounts_with_copied_flags() {
    let d = tmp();
    let img = create(d.path(), "copied.qcow2", "", "8M");
    qemu_io(&img, WORKLOAD);
    let data = first_data_cluster(&img);
    // refcount 2 on a cluster with COPIED set: a leak and a COPIED error.
    set_refcount(&img, data, 2);
    let (ours, q) = assert_agrees(&img);
    assert_eq!((q.leaks, q.corruptions), (1, 1), "{}", q.raw);
    assert!(ours
        .messages
        .iter()
        .any(|m| m.starts_with("ERROR OFLAG_COPIED data cluster")));
    let r = our_check(&img, Repair::Leaks);
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!(qemu_check(&img, None).exit, 0);

    // A snapshot makes refcounts 2; raising one to 3 and repairing with -r all.
    let p = img.to_str().unwrap();
    qemu_img(&["snapshot", "-c", "s", p]);
    set_refcount(&img, data, 3);
    let (_, q) = assert_agrees(&img);
    assert_eq!(q.leaks, 1, "{}", q.raw);
    let r = our_check(&img, Repair::All);
    assert!(r.is_clean() && r.leaks_fixed == 1, "{r:#?}");
    assert_eq!(qemu_check(&img, None).exit, 0);
}

#[test]
fn dirty_lazy_refcount_image_after_abort() {
    let d = tmp();
    let img = create(d.path(), "lazy.qcow2", "lazy_refcounts=on", "8M");
    qemu_io(&img, &["write -P 0x1 0 64k"]);
    // abort: the process dies with refcount updates still cached, leaving the dirty bit set.
    let out = Command::new(tool("qemu-io"))
        .args([
            "-f",
            "qcow2",
            "-c",
            "write -P 0x2 1M 256k",
            "-c",
            "write -P 0x3 5M 64k",
        ])
        .args(["-c", "abort"])
        .arg(&img)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        host_header(&img).dirty(),
        "qemu-io abort should leave the image dirty"
    );
    let (ours, q) = assert_agrees(&img);
    assert!(q.exit == 2 || q.exit == 3, "{}", q.raw);
    assert!(!ours.is_clean());

    let r = our_check(&img, Repair::All);
    assert!(r.is_clean(), "{r:#?}");
    assert!(
        !host_header(&img).dirty(),
        "repair must clear the dirty bit"
    );
    let q = qemu_check(&img, None);
    assert_eq!(q.exit, 0, "{}", q.raw);
    // The data written before the abort is still there.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "read -P 0x2 1M 256k",
            img.to_str().unwrap(),
        ],
    );
}

#[test]
fn damaged_structures_are_reported_like_qemu() {
    let d = tmp();
    let base = create(d.path(), "base.qcow2", "", "8M");
    qemu_io(&base, WORKLOAD);
    let h = host_header(&base);
    let pristine = std::fs::read(&base).unwrap();
    let put = |bytes: &mut Vec<u8>, at: u64, v: u64| {
        bytes[at as usize..at as usize + 8].copy_from_slice(&v.to_be_bytes());
    };
    let l1e = u64::from_be_bytes(
        pristine[h.l1_table_offset as usize..h.l1_table_offset as usize + 8]
            .try_into()
            .unwrap(),
    );
    let l2 = l1e & meta::L1E_OFFSET_MASK;
    let l2e = u64::from_be_bytes(pristine[l2 as usize..l2 as usize + 8].try_into().unwrap());
    let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
    // L2 entry pointing past the end of the file.
    let mut b = pristine.clone();
    put(&mut b, l2, (l2e & !meta::L2E_OFFSET_MASK) | (1 << 40));
    cases.push(("l2 entry past eof", b));
    // L2 entry pointing at the L1 table (metadata).
    let mut b = pristine.clone();
    put(&mut b, l2, meta::OFLAG_COPIED | h.l1_table_offset);
    cases.push(("l2 entry into metadata", b));
    // Misaligned data cluster.
    let mut b = pristine.clone();
    put(&mut b, l2, l2e + 512);
    cases.push(("misaligned data", b));
    // COPIED flag cleared on an L1 entry.
    let mut b = pristine.clone();
    put(&mut b, h.l1_table_offset, l1e & !meta::OFLAG_COPIED);
    cases.push(("l1 copied cleared", b));
    // Compressed entry with COPIED.
    let mut b = pristine.clone();
    put(
        &mut b,
        l2 + 8,
        meta::OFLAG_COPIED | meta::OFLAG_COMPRESSED | (l2e & meta::L2E_OFFSET_MASK),
    );
    cases.push(("compressed with copied", b));
    for (name, bytes) in cases {
        let img = d.path().join(format!("{}.qcow2", name.replace(' ', "_")));
        std::fs::write(&img, &bytes).unwrap();
        let (ours, q) = assert_agrees(&img);
        assert_ne!(q.exit, 0, "{name}: {}", q.raw);
        assert!(!ours.is_clean(), "{name}");
    }
}

// ---------------------------------------------------------------------------------------------
// API edges.

#[test]
fn check_refuses_what_it_cannot_check() {
    // Not a qcow2.
    let junk = MemDisk::from_vec(vec![0u8; 4096]);
    assert!(matches!(
        check(&junk, Repair::None),
        Err(Error::Corrupt { .. })
    ));
    // Too short.
    let tiny = MemDisk::from_vec(b"QFI\xfb".to_vec());
    assert!(check(&tiny, Repair::None).is_err());
    // Repair on a read-only host.
    let d = tmp();
    let img = create(d.path(), "ro.qcow2", "", "1M");
    let ro = MemDisk::from_vec(std::fs::read(&img).unwrap()).read_only();
    assert!(matches!(check(&ro, Repair::Leaks), Err(Error::ReadOnly)));
    let r = check(&ro, Repair::None).unwrap();
    assert!(r.is_clean(), "{r:#?}");
    assert_eq!(r.total_clusters, 16);
}

#[test]
fn exit_codes() {
    let mut r = CheckReport::default();
    assert_eq!(r.exit_code(), 0);
    r.leaks = 1;
    assert_eq!(r.exit_code(), 3);
    r.corruptions = 1;
    assert_eq!(r.exit_code(), 2);
    r.check_errors = 1;
    assert_eq!(r.exit_code(), 1);
}

#[test]
fn encrypted_image_is_refused_by_check() {
    let d = tmp();
    let img = d.path().join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        img.to_str().unwrap(),
        "1M",
    ]);
    let host = MemDisk::from_vec(std::fs::read(&img).unwrap());
    match check(&host, Repair::None) {
        Err(Error::Unsupported { what }) => assert!(what.contains("encrypt"), "{what}"),
        other => panic!("expected Unsupported, got {other:?}"),
    }
}

#[test]
fn leaks_beyond_the_first_refblock_on_large_hosts() {
    // 512-byte clusters with 1-bit refcounts: one refcount block covers 4096 clusters (2 MiB),
    // so this image has several refcount blocks and the comparison crosses block boundaries.
    let d = tmp();
    let img = create(
        d.path(),
        "many.qcow2",
        "cluster_size=512,refcount_bits=1",
        "16M",
    );
    qemu_io(&img, &["write -P 0x5 0 5M", "write -P 0x6 9M 1M"]);
    let (ours, _) = assert_agrees(&img);
    assert!(ours.is_clean(), "{ours:#?}");
    let h = host_header(&img);
    let len = std::fs::metadata(&img).unwrap().len();
    assert!(len >> h.cluster_bits > 2 * h.refcount_block_entries());
    // Discarding leaves freed clusters inside the file; mark two of them used.
    run(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-d",
            "unmap",
            "-c",
            "discard 9M 1M",
            img.to_str().unwrap(),
        ],
    );
    let mut injected = Vec::new();
    for k in 0..(len >> h.cluster_bits) {
        if injected.len() == 2 {
            break;
        }
        if k > h.refcount_block_entries() && get_refcount(&img, k) == 0 {
            set_refcount(&img, k, 1);
            injected.push(k);
        }
    }
    assert_eq!(injected.len(), 2);
    let (ours, q) = assert_agrees(&img);
    assert_eq!(q.leaks, 2);
    assert_eq!(ours.leaks, 2);
    let r = our_check(&img, Repair::Leaks);
    assert!(r.is_clean() && r.leaks_fixed == 2, "{r:#?}");
    assert_eq!(qemu_check(&img, None).exit, 0);
}

// ---------------------------------------------------------------------------------------------
// Images the engine wrote: our check and qemu's must both find them clean.

#[test]
fn engine_written_images_are_clean() {
    use std::sync::Arc;
    use vmdisk_block::BlockDevice;
    use vmdisk_qcow2::{compress_cluster, create, CreateOptions, Qcow2Image};

    let d = tmp();
    let combos = [
        CreateOptions {
            size: 8 << 20,
            ..Default::default()
        },
        CreateOptions {
            size: 8 << 20,
            cluster_size: 512,
            refcount_bits: 1,
            ..Default::default()
        },
        CreateOptions {
            size: 8 << 20,
            version: 2,
            cluster_size: 4096,
            ..Default::default()
        },
        CreateOptions {
            size: 8 << 20,
            cluster_size: 2 << 20,
            refcount_bits: 64,
            lazy_refcounts: true,
            ..Default::default()
        },
    ];
    for (n, opts) in combos.iter().enumerate() {
        let img = d.path().join(format!("engine{n}.qcow2"));
        {
            let host = RawFile::create(&img, 0).unwrap();
            create(&host, opts).unwrap();
        }
        let host: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, false).unwrap());
        let q = Qcow2Image::open(host, None, false).unwrap();
        let cs = q.cluster_size();
        q.write_all_at(&vec![0x5a; 200 << 10], 0).unwrap();
        q.write_all_at(&vec![0x6b; 4096], 3 << 20).unwrap();
        q.write_all_at(&vec![0x7c; 70 << 10], 100 << 10).unwrap();
        q.write_zeroes(1 << 20, 128 << 10, true).unwrap();
        q.discard(0, cs.max(64 << 10)).unwrap();
        let pattern: Vec<u8> = (0..cs).map(|i| (i / 64) as u8).collect();
        if opts.version == 3 && opts.cluster_size <= 65536 {
            if let Some(c) = compress_cluster(opts.compression, cs, &pattern).unwrap() {
                q.write_compressed(5 << 20, &c).unwrap();
            }
        }
        q.close().unwrap();
        let (ours, qemu) = assert_agrees(&img);
        assert!(ours.is_clean(), "engine image {opts:?}: {ours:#?}");
        assert_eq!(qemu.exit, 0, "{opts:?}: {}", qemu.raw);
    }
}
