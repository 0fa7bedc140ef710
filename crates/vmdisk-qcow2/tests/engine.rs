//! Engine tests: block conformance on in-memory hosts, a model-based property test, and
//! interop against qemu-img / qemu-io (which must be installed: these tests fail, not skip,
//! without them).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use proptest::prelude::*;
use vmdisk_block::{BlockDevice, MemDisk, RawFile};
use vmdisk_qcow2::{
    compress_cluster, create, read_header, snapshot, CompressionType, CreateOptions, Preallocation,
    Qcow2Image,
};

fn mem_image(opts: &CreateOptions, backing: Option<Arc<dyn BlockDevice>>) -> Qcow2Image {
    let host = Arc::new(MemDisk::new(0));
    create(&*host, opts).unwrap();
    Qcow2Image::open(host, backing, false).unwrap()
}

#[test]
fn conformance_memdisk() {
    for (cs, rb) in [(65536, 16), (512, 1), (4096, 64), (2 << 20, 8)] {
        vmdisk_block::conformance::run_all(|len| {
            mem_image(
                &CreateOptions {
                    size: len,
                    cluster_size: cs,
                    refcount_bits: rb,
                    ..Default::default()
                },
                None,
            )
        });
    }
}

#[test]
fn conformance_with_backing_and_v2() {
    vmdisk_block::conformance::run_all(|len| {
        let b: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(len / 2));
        mem_image(
            &CreateOptions {
                size: len,
                ..Default::default()
            },
            Some(b),
        )
    });
    vmdisk_block::conformance::run_all(|len| {
        let b: Arc<dyn BlockDevice> = Arc::new(MemDisk::new(len));
        mem_image(
            &CreateOptions {
                size: len,
                version: 2,
                cluster_size: 4096,
                ..Default::default()
            },
            Some(b),
        )
    });
}

#[derive(Debug, Clone)]
enum Op {
    Write(u64, usize, u8),
    Zero(u64, u64),
    Discard(u64, u64),
    Compressed(u64, u8),
    Snapshot,
    Reopen,
}

fn op_strategy(size: u64) -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..size, 1usize..20000, any::<u8>()).prop_map(move |(o, l, b)| {
            let l = (l as u64).min(size - o) as usize;
            Op::Write(o, l.max(1).min((size - o) as usize), b)
        }),
        2 => (0..size, 1u64..40000).prop_map(move |(o, l)| Op::Zero(o, l.min(size - o))),
        2 => (0..size, 1u64..40000).prop_map(move |(o, l)| Op::Discard(o, l.min(size - o))),
        1 => (0..size, any::<u8>()).prop_map(|(o, b)| Op::Compressed(o, b)),
        1 => Just(Op::Snapshot),
        1 => Just(Op::Reopen),
    ]
}

fn run_model(cs: u64, rb: u32, version: u32, with_backing: bool, ops: Vec<Op>) {
    let size = 200 * 1024;
    let mut model = vec![0u8; size as usize];
    let backing: Option<Arc<dyn BlockDevice>> = if with_backing {
        let v: Vec<u8> = (0..size / 2).map(|i| (i % 251) as u8 + 1).collect();
        model[..v.len()].copy_from_slice(&v);
        Some(Arc::new(MemDisk::from_vec(v)))
    } else {
        None
    };
    let host = Arc::new(MemDisk::new(0));
    create(
        &*host,
        &CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits: rb,
            version,
            ..Default::default()
        },
    )
    .unwrap();
    let mut img = Some(Qcow2Image::open(host.clone(), backing.clone(), false).unwrap());
    let mut discarded = vec![false; size as usize];
    for op in ops {
        let d = img.as_ref().unwrap();
        match op {
            Op::Write(o, l, b) => {
                let data: Vec<u8> = (0..l).map(|i| b.wrapping_add(i as u8)).collect();
                d.write_all_at(&data, o).unwrap();
                model[o as usize..o as usize + l].copy_from_slice(&data);
                discarded[o as usize..o as usize + l].fill(false);
            }
            Op::Zero(o, l) => {
                d.write_zeroes(o, l, true).unwrap();
                model[o as usize..(o + l) as usize].fill(0);
                discarded[o as usize..(o + l) as usize].fill(false);
            }
            Op::Discard(o, l) => {
                d.discard(o, l).unwrap();
                // Whole clusters become unspecified (zeros or backing, depending on version).
                let first = o.div_ceil(cs);
                let last = if o + l == size {
                    (o + l).div_ceil(cs)
                } else {
                    (o + l) / cs
                };
                for c in first..last {
                    let a = (c * cs) as usize;
                    let e = ((c + 1) * cs).min(size) as usize;
                    discarded[a..e].fill(true);
                }
            }
            Op::Compressed(o, b) => {
                let g = o / cs * cs;
                if g + cs <= size
                    && d.block_status(g, cs)
                        .unwrap()
                        .iter()
                        .all(|e| e.kind == vmdisk_block::ExtentKind::Unallocated || e.depth > 0)
                {
                    let data: Vec<u8> = (0..cs).map(|i| if i % 64 < 8 { b } else { 0 }).collect();
                    if let Some(c) = compress_cluster(CompressionType::Zlib, cs, &data).unwrap() {
                        d.write_compressed(g, &c).unwrap();
                        model[g as usize..(g + cs) as usize].copy_from_slice(&data);
                        discarded[g as usize..(g + cs) as usize].fill(false);
                    }
                }
            }
            Op::Snapshot => {
                if rb > 1 {
                    match snapshot::create(d, &format!("s{}", d.info().snapshots.len())) {
                        Ok(_) | Err(vmdisk_block::Error::Limit { .. }) => {}
                        Err(e) => panic!("snapshot: {e}"),
                    }
                }
            }
            Op::Reopen => {
                img.take().unwrap().close().unwrap();
                img = Some(Qcow2Image::open(host.clone(), backing.clone(), false).unwrap());
            }
        }
        let mut back = vec![0u8; size as usize];
        img.as_ref().unwrap().read_exact_at(&mut back, 0).unwrap();
        for i in 0..size as usize {
            if discarded[i] {
                // A discard may read as zeros or as the backing; adopt what we see.
                model[i] = back[i];
            }
        }
        assert!(back == model, "image differs from model");
    }
    img.take().unwrap().close().unwrap();
    // Reopen read-only and check once more.
    let ro = Qcow2Image::open(host, backing, true).unwrap();
    let mut back = vec![0u8; size as usize];
    ro.read_exact_at(&mut back, 0).unwrap();
    assert!(back == model, "image differs from model after close");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
    #[test]
    fn model_64k(ops in prop::collection::vec(op_strategy(200 * 1024), 1..30), backing in any::<bool>()) {
        run_model(65536, 16, 3, backing, ops);
    }
    #[test]
    fn model_small_clusters(ops in prop::collection::vec(op_strategy(200 * 1024), 1..30), backing in any::<bool>(), rb in prop::sample::select(vec![1u32, 2, 4, 8, 32, 64])) {
        run_model(512, rb, 3, backing, ops);
    }
    #[test]
    fn model_v2(ops in prop::collection::vec(op_strategy(200 * 1024), 1..30), backing in any::<bool>()) {
        run_model(4096, 16, 2, backing, ops);
    }
}

// ------------------------------------------------------------------ qemu interop

fn qemu_img() -> &'static str {
    let ok = Command::new("qemu-img")
        .arg("--version")
        .output()
        .map(|o| o.status.success());
    assert!(
        matches!(ok, Ok(true)),
        "qemu-img is required for interop tests (install qemu-utils)"
    );
    "qemu-img"
}

fn run(cmd: &mut Command) -> std::process::Output {
    let out = cmd.output().expect("spawn");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_io(path: &Path, script: &[String]) {
    let mut c = Command::new("qemu-io");
    c.arg("-f").arg("qcow2");
    for s in script {
        c.arg("-c").arg(s);
    }
    c.arg(path);
    run(&mut c);
}

fn check_clean(path: &Path) {
    let out = Command::new(qemu_img())
        .args(["check", "--output=json"])
        .arg(path)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "qemu-img check {}: {text}",
        path.display()
    );
    assert!(
        !text.contains("\"leaks\""),
        "leaks in {}: {text}",
        path.display()
    );
}

fn read_all(dev: &dyn BlockDevice) -> Vec<u8> {
    let mut v = vec![0u8; dev.len() as usize];
    dev.read_exact_at(&mut v, 0).unwrap();
    v
}

fn raw_of(path: &Path, dir: &Path) -> Vec<u8> {
    let out = dir.join("out.raw");
    run(Command::new(qemu_img())
        .args(["convert", "-O", "raw"])
        .arg(path)
        .arg(&out));
    std::fs::read(out).unwrap()
}

fn open_file(path: &Path, backing: Option<PathBuf>, ro: bool) -> Qcow2Image {
    let host: Arc<dyn BlockDevice> = Arc::new(RawFile::open(path, ro).unwrap());
    let b = backing.map(|p| -> Arc<dyn BlockDevice> {
        if read_header(&RawFile::open(&p, true).unwrap()).is_ok() {
            Arc::new(open_file(&p, None, true))
        } else {
            Arc::new(RawFile::open(&p, true).unwrap())
        }
    });
    Qcow2Image::open(host, b, ro).unwrap()
}

fn qemu_script(cs: u64) -> Vec<String> {
    vec![
        "write -P 0x11 0 100k".into(),
        format!("write -P 0x22 {} 3k", cs * 3 + 512),
        "write -z 40k 300k".into(),
        "write -P 0x33 1M 2M".into(),
        "discard 1536k 256k".into(),
        "write -c -P 0x44 8M 2M".into(),
        "write -P 0x55 9M 4k".into(),
        "write -P 0x66 15M 1M".into(),
    ]
}

#[test]
fn reads_qemu_images_like_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(
        &base,
        (0..16u32 << 20)
            .map(|i| (i % 253) as u8)
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let combos: &[&str] = &[
        "compat=0.10",
        "compat=1.1",
        "cluster_size=512",
        "cluster_size=2M",
        "cluster_size=4096,refcount_bits=1",
        "refcount_bits=64",
        "compression_type=zstd",
        "lazy_refcounts=on",
        "extended_l2=on",
        "extended_l2=on,cluster_size=128k",
        "preallocation=metadata",
        "compat=0.10,cluster_size=8192",
    ];
    for (i, o) in combos.iter().enumerate() {
        for with_backing in [false, true] {
            if with_backing && o.contains("preallocation") {
                continue; // qemu refuses backing + preallocation without extended_l2
            }
            let p = dir.path().join(format!("q{i}{with_backing}.qcow2"));
            let mut c = Command::new(qemu_img());
            c.args(["create", "-f", "qcow2", "-o", o]);
            if with_backing {
                c.arg("-b").arg(&base).args(["-F", "raw"]);
            }
            run(c.arg(&p).arg("16M"));
            let cs = read_header(&RawFile::open(&p, true).unwrap())
                .unwrap()
                .cluster_size;
            let mut script = qemu_script(cs);
            if o.contains("preallocation") {
                // qemu cannot write compressed clusters over preallocated ones.
                script.retain(|s| !s.contains("-c"));
            }
            qemu_io(&p, &script);
            let expect = raw_of(&p, dir.path());
            let img = open_file(&p, with_backing.then(|| base.clone()), true);
            let got = read_all(&img);
            assert!(
                got == expect,
                "{o} backing={with_backing}: read differs from qemu-img convert"
            );
            // block_status covers and zero extents read as zero.
            let ext = img.block_status(0, img.len()).unwrap();
            assert_eq!(ext.iter().map(|e| e.len).sum::<u64>(), img.len());
            for e in ext
                .iter()
                .filter(|e| e.kind != vmdisk_block::ExtentKind::Data)
            {
                if e.depth == 0 {
                    assert!(
                        got[e.off as usize..e.end() as usize]
                            .iter()
                            .all(|&b| b == 0),
                        "{o}: zero extent at {}",
                        e.off
                    );
                }
            }
        }
    }
}

#[test]
fn images_we_create_pass_qemu_check() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.raw");
    std::fs::write(&base, vec![0x5au8; 8 << 20]).unwrap();
    let mut combos = Vec::new();
    for version in [2u32, 3] {
        for cs in [512u64, 4096, 65536, 2 << 20] {
            for rb in [1u32, 2, 4, 8, 16, 32, 64] {
                if version == 2 && rb != 16 {
                    continue;
                }
                combos.push(CreateOptions {
                    size: 24 << 20,
                    cluster_size: cs,
                    version,
                    refcount_bits: rb,
                    ..Default::default()
                });
            }
        }
    }
    combos.push(CreateOptions {
        size: 24 << 20,
        compression: CompressionType::Zstd,
        ..Default::default()
    });
    combos.push(CreateOptions {
        size: 24 << 20,
        lazy_refcounts: true,
        ..Default::default()
    });
    combos.push(CreateOptions {
        size: 24 << 20,
        preallocation: Preallocation::Metadata,
        ..Default::default()
    });
    combos.push(CreateOptions {
        size: 24 << 20,
        extended_l2: true,
        ..Default::default()
    });
    combos.push(CreateOptions {
        size: 24 << 20,
        backing_file: Some(base.display().to_string()),
        backing_format: Some("raw".into()),
        ..Default::default()
    });
    combos.push(CreateOptions {
        size: 24 << 20,
        version: 2,
        backing_file: Some(base.display().to_string()),
        ..Default::default()
    });
    for (i, o) in combos.iter().enumerate() {
        let p = dir.path().join(format!("ours{i}.qcow2"));
        let raw = dir.path().join(format!("ours{i}.raw"));
        {
            let host = RawFile::create(&p, 0).unwrap();
            create(&host, o).unwrap();
        }
        check_clean(&p);
        let info = run(Command::new(qemu_img())
            .args(["info", "--output=json"])
            .arg(&p));
        let info = String::from_utf8_lossy(&info.stdout).to_string();
        assert!(
            info.contains(&format!("\"cluster-size\": {}", o.cluster_size)),
            "{info}"
        );
        assert!(
            info.contains(&format!("\"virtual-size\": {}", o.size)),
            "{info}"
        );
        if o.version == 3 {
            assert!(
                info.contains(&format!("\"refcount-bits\": {}", o.refcount_bits)),
                "{info}"
            );
            assert!(
                info.contains(&format!(
                    "\"compression-type\": \"{}\"",
                    o.compression.as_str()
                )),
                "{info}"
            );
            assert!(
                info.contains(&format!("\"lazy-refcounts\": {}", o.lazy_refcounts)),
                "{info}"
            );
            assert!(
                info.contains(&format!("\"extended-l2\": {}", o.extended_l2)),
                "{info}"
            );
        } else {
            assert!(info.contains("\"compat\": \"0.10\""), "{info}");
        }
        if o.extended_l2 {
            continue;
        }
        // Write a pattern through the engine and mirror it in a raw file.
        let backing = o.backing_file.as_ref().map(PathBuf::from);
        let mut model = match &backing {
            Some(b) => {
                let mut v = std::fs::read(b).unwrap();
                v.resize(o.size as usize, 0);
                v
            }
            None => vec![0u8; o.size as usize],
        };
        let img = open_file(&p, backing.clone(), false);
        let cs = o.cluster_size;
        let mut seed = i as u64 + 7;
        for k in 0..40u64 {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = (seed >> 20) % (o.size - 300_000);
            let len = ((seed >> 8) % 300_000) as usize + 1;
            match k % 5 {
                0..=2 => {
                    let data: Vec<u8> = (0..len).map(|j| (j as u64 ^ seed) as u8).collect();
                    img.write_all_at(&data, off).unwrap();
                    model[off as usize..off as usize + len].copy_from_slice(&data);
                }
                3 => {
                    img.write_zeroes(off, len as u64, true).unwrap();
                    model[off as usize..off as usize + len].fill(0);
                }
                _ => {
                    let g = off / cs * cs;
                    if img
                        .block_status(g, cs)
                        .unwrap()
                        .iter()
                        .all(|e| e.kind == vmdisk_block::ExtentKind::Unallocated || e.depth > 0)
                    {
                        let data = vec![(seed & 0xff) as u8; cs as usize];
                        if let Some(c) = compress_cluster(o.compression, cs, &data).unwrap() {
                            img.write_compressed(g, &c).unwrap();
                            model[g as usize..(g + cs) as usize].copy_from_slice(&data);
                        }
                    }
                }
            }
            if k == 20 && o.refcount_bits > 1 {
                snapshot::create(&img, "mid").unwrap();
            }
        }
        // Large sequential write like convert does.
        let big: Vec<u8> = (0..(4u32 << 20)).map(|j| (j / 4096) as u8).collect();
        img.write_all_at(&big, 16 << 20).unwrap();
        model[16 << 20..20 << 20].copy_from_slice(&big);
        img.close().unwrap();
        std::fs::write(&raw, &model).unwrap();
        check_clean(&p);
        run(Command::new(qemu_img())
            .args(["compare", "-f", "qcow2", "-F", "raw"])
            .arg(&p)
            .arg(&raw));
    }
}

#[test]
fn snapshots_interop() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("s.qcow2");
    run(Command::new(qemu_img())
        .args(["create", "-f", "qcow2"])
        .arg(&p)
        .arg("8M"));
    qemu_io(&p, &["write -P 0x11 0 1M".into()]);
    run(Command::new(qemu_img())
        .args(["snapshot", "-c", "qemu1"])
        .arg(&p));
    qemu_io(&p, &["write -P 0x22 512k 1M".into()]);
    let after_q: Vec<u8>;
    {
        let img = open_file(&p, None, false);
        let names: Vec<String> = snapshot::list(&img).into_iter().map(|s| s.name).collect();
        assert_eq!(names, vec!["qemu1".to_string()]);
        after_q = read_all(&img);
        snapshot::create(&img, "ours").unwrap();
        img.write_all_at(&[0x33; 100_000], 4 << 20).unwrap();
        img.close().unwrap();
    }
    check_clean(&p);
    let l = run(Command::new(qemu_img()).args(["snapshot", "-l"]).arg(&p));
    let l = String::from_utf8_lossy(&l.stdout).to_string();
    assert!(l.contains("qemu1") && l.contains("ours"), "{l}");
    // qemu applies ours; we compare.
    run(Command::new(qemu_img())
        .args(["snapshot", "-a", "ours"])
        .arg(&p));
    check_clean(&p);
    {
        let img = open_file(&p, None, true);
        assert!(read_all(&img) == after_q, "qemu applied our snapshot");
    }
    {
        let img = open_file(&p, None, false);
        snapshot::apply(&img, "qemu1").unwrap();
        let v = read_all(&img);
        assert!(v[..1 << 20].iter().all(|&b| b == 0x11) && v[1 << 20..].iter().all(|&b| b == 0));
        img.close().unwrap();
    }
    check_clean(&p);
    {
        let img = open_file(&p, None, false);
        snapshot::delete(&img, "qemu1").unwrap();
        snapshot::delete(&img, "ours").unwrap();
        img.write_all_at(&[0x44; 70_000], 100).unwrap();
        img.close().unwrap();
    }
    check_clean(&p);
    let l = run(Command::new(qemu_img()).args(["snapshot", "-l"]).arg(&p));
    assert!(!String::from_utf8_lossy(&l.stdout).contains("ours"));
}

/// Regression (issue 13): a data cluster past the end of the file used to be `Corrupt` on a
/// plain read but `OutOfRange` (the host's error) on the copy-on-write read a partial write
/// makes. Both now go through one read path and fail the same way.
#[test]
fn damaged_data_cluster_fails_alike_on_read_and_copy_on_write() {
    use vmdisk_qcow2::meta::{Header, L1E_OFFSET_MASK};
    let host = Arc::new(MemDisk::new(0));
    create(
        &*host,
        &CreateOptions {
            size: 1 << 20,
            ..Default::default()
        },
    )
    .unwrap();
    let img = Qcow2Image::open(host.clone(), None, false).unwrap();
    img.write_all_at(&[7u8; 65536], 0).unwrap();
    img.close().unwrap();
    // Point guest cluster 0 at a cluster far past the end, without COPIED (so a partial write
    // must read the old cluster first).
    let mut head = vec![0u8; 65536];
    host.read_exact_at(&mut head, 0).unwrap();
    let h = Header::parse(&head).unwrap();
    let mut e = [0u8; 8];
    host.read_exact_at(&mut e, h.l1_table_offset).unwrap();
    let l2 = u64::from_be_bytes(e) & L1E_OFFSET_MASK;
    let beyond = (host.len() / 65536 + 16) * 65536;
    host.write_all_at(&beyond.to_be_bytes(), l2).unwrap();

    let img = Qcow2Image::open(host.clone(), None, false).unwrap();
    let mut buf = vec![0u8; 4096];
    let read = img.read_exact_at(&mut buf, 0).unwrap_err();
    let cow = img.write_all_at(&[1u8; 512], 512).unwrap_err();
    assert!(
        matches!(read, vmdisk_block::Error::Corrupt { off, .. } if off == beyond),
        "plain read: {read:?}"
    );
    assert!(
        matches!(cow, vmdisk_block::Error::Corrupt { off, .. } if off == beyond),
        "copy-on-write read: {cow:?}"
    );
    assert_eq!(read.to_string(), cow.to_string());
}
