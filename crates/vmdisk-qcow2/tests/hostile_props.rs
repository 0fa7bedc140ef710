//! Hostile images: start from valid images qemu-img made, mutate one structure at a time, and
//! require that parsing, opening (read-only), reading every cluster, `block_status` over the
//! whole disk and `check` (with and without repair) each return `Ok` or an `Err` of the right
//! class: never panic, never hang (a watchdog bounds every case), and never make a single
//! allocation above [`MAX_SINGLE_ALLOC`] (a counting global allocator watches).
//!
//! The base images are built once with `qemu-img`/`qemu-io` (missing tools fail the tests);
//! every mutated case then runs on an in-memory `MemDisk`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use proptest::prelude::*;
use vmdisk_block::{BlockDevice, Error, MemDisk};
use vmdisk_qcow2::check::{check, Repair};
use vmdisk_qcow2::meta::{self, Header};
use vmdisk_qcow2::{read_header, Qcow2Image};

// ---------------------------------------------------------------------------------------------
// Allocation watch.

/// No single allocation may exceed this while a hostile image is being handled.
const MAX_SINGLE_ALLOC: usize = 64 << 20;

struct CountingAlloc;

static BIGGEST_ALLOC: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call unchanged to the system allocator; only records sizes.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        BIGGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        BIGGEST_ALLOC.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        BIGGEST_ALLOC.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: same contract as our caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------------------------
// Base images.

fn tool(name: &str) -> String {
    let p = format!("/usr/bin/{name}");
    assert!(
        Path::new(&p).exists(),
        "`{name}` is required to build the base images and was not found; install qemu-utils"
    );
    p
}

fn run(name: &str, args: &[&str]) {
    let out = Command::new(tool(name)).args(args).output().expect(name);
    assert!(
        out.status.success(),
        "{name} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    /// Host byte ranges of metadata: (what, offset, len).
    regions: Vec<(&'static str, u64, u64)>,
    /// Host offsets of L2 entries that describe compressed clusters.
    compressed_entries: Vec<u64>,
}

fn be64(b: &[u8], at: u64) -> u64 {
    let at = at as usize;
    match b.get(at..at + 8) {
        Some(s) => u64::from_be_bytes(s.try_into().unwrap()),
        None => 0,
    }
}

/// Find the metadata of a valid image (test code: trusts its input).
fn describe(name: &'static str, bytes: Vec<u8>) -> Base {
    let h = Header::parse(&bytes[..bytes.len().min(2 << 20)]).unwrap();
    let cs = h.cluster_size();
    let mut regions = vec![("header", 0, cs.min(bytes.len() as u64))];
    regions.push(("l1", h.l1_table_offset, u64::from(h.l1_size) * 8));
    let rt_len = u64::from(h.refcount_table_clusters) * cs;
    regions.push(("reftable", h.refcount_table_offset, rt_len));
    for i in 0..rt_len / 8 {
        let rb = be64(&bytes, h.refcount_table_offset + i * 8) & meta::REFT_OFFSET_MASK;
        if rb != 0 {
            regions.push(("refblock", rb, cs));
        }
    }
    let mut l1s = vec![(h.l1_table_offset, h.l1_size)];
    if h.nb_snapshots > 0 {
        let tail = &bytes[h.snapshots_offset as usize..];
        let snaps =
            meta::SnapshotHeader::parse_table(tail, h.nb_snapshots, h.snapshots_offset).unwrap();
        let serialized = meta::SnapshotHeader::serialize_table(&snaps).len() as u64;
        regions.push((
            "snapshots",
            h.snapshots_offset,
            serialized.min(tail.len() as u64),
        ));
        for s in &snaps {
            regions.push(("snapshot l1", s.l1_table_offset, u64::from(s.l1_size) * 8));
            l1s.push((s.l1_table_offset, s.l1_size));
        }
    }
    let mut compressed_entries = Vec::new();
    for (l1_off, l1_size) in l1s {
        for i in 0..u64::from(l1_size) {
            let l2 = be64(&bytes, l1_off + i * 8) & meta::L1E_OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            regions.push(("l2", l2, cs));
            for j in 0..h.l2_entries() {
                let at = l2 + j * h.l2_entry_bytes();
                let e = be64(&bytes, at);
                if e & meta::OFLAG_COMPRESSED != 0 {
                    compressed_entries.push(at);
                    if let Ok(meta::L2Entry::Compressed { host_off, len }) =
                        meta::L2Entry::decode(e, h.cluster_bits, h.extended_l2(), at)
                    {
                        regions.push(("compressed data", host_off, len));
                    }
                }
            }
        }
    }
    regions.retain(|&(_, off, len)| len > 0 && off + len <= bytes.len() as u64);
    Base {
        name,
        bytes,
        regions,
        compressed_entries,
    }
}

fn bases() -> &'static [Base] {
    static BASES: OnceLock<Vec<Base>> = OnceLock::new();
    BASES.get_or_init(|| {
        let d = tempfile::tempdir().unwrap();
        let path = |n: &str| d.path().join(n).to_str().unwrap().to_string();
        let io = |img: &str, cmds: &[&str]| {
            let mut a = vec!["-f", "qcow2"];
            for c in cmds {
                a.extend(["-c", c]);
            }
            a.push(img);
            run("qemu-io", &a);
        };
        let mut out = Vec::new();

        // v3, 64 KiB clusters, a snapshot, data before and after it.
        let p = path("snap.qcow2");
        run("qemu-img", &["create", "-q", "-f", "qcow2", &p, "4M"]);
        io(&p, &["write -P 0x11 0 64k", "write -P 0x22 1M 4k"]);
        run("qemu-img", &["snapshot", "-c", "first", &p]);
        io(&p, &["write -P 0x33 0 4k", "write -z 2M 64k"]);
        out.push(describe("v3 snapshot", std::fs::read(&p).unwrap()));

        // v2, 512-byte clusters.
        let p = path("v2.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "compat=0.10,cluster_size=512",
                &p,
                "1M",
            ],
        );
        io(&p, &["write -P 0x44 0 8k", "write -P 0x55 300k 2k"]);
        out.push(describe("v2 c512", std::fs::read(&p).unwrap()));

        // Compressed (zlib, 4 KiB clusters) and zstd.
        let raw = path("src.raw");
        let mut data = vec![0u8; 256 << 10];
        for (i, b) in data.iter_mut().enumerate() {
            *b = if i < 128 << 10 {
                (i / 7) as u8
            } else {
                (i * 31 % 251) as u8
            };
        }
        std::fs::write(&raw, &data).unwrap();
        for (name, opts) in [
            ("zlib c4k", "cluster_size=4k"),
            ("zstd c4k", "cluster_size=4k,compression_type=zstd"),
        ] {
            let p = path("c.qcow2");
            run(
                "qemu-img",
                &[
                    "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, &raw, &p,
                ],
            );
            out.push(describe(name, std::fs::read(&p).unwrap()));
        }

        // Extended L2 (subclusters), 1-bit refcounts, with a backing file name.
        let p = path("ext.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=16k,refcount_bits=1",
                "-b",
                &raw,
                "-F",
                "raw",
                &p,
            ],
        );
        io(
            &p,
            &[
                "write -P 0x66 0 1k",
                "write -P 0x77 20k 3k",
                "write -z 64k 16k",
            ],
        );
        out.push(describe("extl2 rc1 backing", std::fs::read(&p).unwrap()));

        // Bitmaps extension, 64-bit refcounts.
        let p = path("bm.qcow2");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "refcount_bits=64",
                &p,
                "2M",
            ],
        );
        run("qemu-img", &["bitmap", "--add", &p, "b0"]);
        io(&p, &["write -P 0x12 0 8k"]);
        out.push(describe("bitmap rc64", std::fs::read(&p).unwrap()));
        out
    })
}

// ---------------------------------------------------------------------------------------------
// Mutations.

/// Header fields: (offset, width in bytes).
const HEADER_FIELDS: &[(u64, u64)] = &[
    (0, 4),   // magic
    (4, 4),   // version
    (8, 8),   // backing_file_offset
    (16, 4),  // backing_file_size
    (20, 4),  // cluster_bits
    (24, 8),  // size
    (32, 4),  // crypt_method
    (36, 4),  // l1_size
    (40, 8),  // l1_table_offset
    (48, 8),  // refcount_table_offset
    (56, 4),  // refcount_table_clusters
    (60, 4),  // nb_snapshots
    (64, 8),  // snapshots_offset
    (72, 8),  // incompatible_features
    (80, 8),  // compatible_features
    (88, 8),  // autoclear_features
    (96, 4),  // refcount_order
    (100, 4), // header_length
    (104, 1), // compression_type
];

/// Snapshot table entry fields: (offset in entry, width).
const SNAPSHOT_FIELDS: &[(u64, u64)] = &[
    (0, 8),  // l1_table_offset
    (8, 4),  // l1_size
    (12, 2), // id_str_size
    (14, 2), // name_size
    (32, 4), // vm_state_size
    (36, 4), // extra_data_size
    (40, 8), // extra: vm_state_size_large
    (48, 8), // extra: disk_size
];

#[derive(Debug, Clone)]
enum Mutation {
    /// Set a header field.
    Header { field: usize, value: u64 },
    /// Set the length (or type) word of the n-th header extension.
    ExtLen {
        ext: usize,
        value: u32,
        type_word: bool,
    },
    /// Set the 8-byte word `word` of metadata region `region` (L1/L2 entries, reftable, ...).
    Word {
        region: usize,
        word: usize,
        value: u64,
    },
    /// XOR bytes of a region.
    Flip { region: usize, pos: usize, xor: u8 },
    /// Set a field of the first snapshot table entry.
    Snapshot { field: usize, value: u64 },
    /// Rewrite a compressed L2 entry's sector count (huge lengths) or its offset.
    Compressed {
        entry: usize,
        sectors_all_ones: bool,
        offset_delta: i64,
    },
    /// Overwrite part of a compressed stream with random bytes.
    CompressedBytes {
        region: usize,
        pos: usize,
        bytes: Vec<u8>,
    },
    /// Cut the host short.
    Truncate { keep_per_mille: u16 },
}

fn interesting_u64() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(1),
        Just(u64::MAX),
        Just(1 << 63),
        Just(1 << 62),
        Just(0x00ff_ffff_ffff_fe00),
        (0u32..64).prop_map(|b| 1u64 << b),
        (0u64..4096).prop_map(|x| x * 512),
        (0u64..64).prop_map(|x| (x << 16) | (1 << 63)),
        any::<u64>(),
        any::<u32>().prop_map(u64::from),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        3 => (0..HEADER_FIELDS.len(), interesting_u64())
            .prop_map(|(field, value)| Mutation::Header { field, value }),
        1 => (0usize..4, any::<u32>(), any::<bool>())
            .prop_map(|(ext, value, type_word)| Mutation::ExtLen { ext, value, type_word }),
        4 => (any::<usize>(), any::<usize>(), interesting_u64())
            .prop_map(|(region, word, value)| Mutation::Word { region, word, value }),
        2 => (any::<usize>(), any::<usize>(), 1u8..=255)
            .prop_map(|(region, pos, xor)| Mutation::Flip { region, pos, xor }),
        2 => (0..SNAPSHOT_FIELDS.len(), interesting_u64())
            .prop_map(|(field, value)| Mutation::Snapshot { field, value }),
        2 => (any::<usize>(), any::<bool>(), -4096i64..4096)
            .prop_map(|(entry, sectors_all_ones, offset_delta)| Mutation::Compressed {
                entry, sectors_all_ones, offset_delta
            }),
        2 => (any::<usize>(), any::<usize>(), proptest::collection::vec(any::<u8>(), 1..64))
            .prop_map(|(region, pos, bytes)| Mutation::CompressedBytes { region, pos, bytes }),
        1 => (0u16..1000).prop_map(|keep_per_mille| Mutation::Truncate { keep_per_mille }),
    ]
}

fn put(b: &mut [u8], at: u64, width: u64, value: u64) {
    let be = value.to_be_bytes();
    let at = at as usize;
    let w = width as usize;
    if let Some(dst) = b.get_mut(at..at + w) {
        dst.copy_from_slice(&be[8 - w..]);
    }
}

fn apply(base: &Base, muts: &[Mutation]) -> Vec<u8> {
    let mut b = base.bytes.clone();
    let h = Header::parse(&base.bytes[..base.bytes.len().min(2 << 20)]).unwrap();
    let cs = h.cluster_size();
    for m in muts {
        match m {
            Mutation::Header { field, value } => {
                let (at, w) = HEADER_FIELDS[*field];
                put(&mut b, at, w, *value);
            }
            Mutation::ExtLen {
                ext,
                value,
                type_word,
            } => {
                let mut pos = u64::from(h.header_length);
                for _ in 0..*ext {
                    let len = u64::from(be64(&b, pos) as u32);
                    if be64(&b, pos) >> 32 == 0 {
                        break;
                    }
                    pos += 8 + len.next_multiple_of(8);
                }
                let at = if *type_word { pos } else { pos + 4 };
                put(&mut b, at, 4, u64::from(*value));
            }
            Mutation::Word {
                region,
                word,
                value,
            } => {
                let (_, off, len) = base.regions[region % base.regions.len()];
                let words = (len / 8).max(1);
                put(&mut b, off + (*word as u64 % words) * 8, 8, *value);
            }
            Mutation::Flip { region, pos, xor } => {
                let (_, off, len) = base.regions[region % base.regions.len()];
                let at = (off + *pos as u64 % len) as usize;
                if let Some(x) = b.get_mut(at) {
                    *x ^= xor;
                }
            }
            Mutation::Snapshot { field, value } => {
                if h.nb_snapshots > 0 {
                    let (at, w) = SNAPSHOT_FIELDS[*field];
                    put(&mut b, h.snapshots_offset + at, w, *value);
                }
            }
            Mutation::Compressed {
                entry,
                sectors_all_ones,
                offset_delta,
            } => {
                if base.compressed_entries.is_empty() {
                    continue;
                }
                let at = base.compressed_entries[entry % base.compressed_entries.len()];
                let e = be64(&b, at);
                let x = 62 - (h.cluster_bits - 8);
                let off_mask = (1u64 << x) - 1;
                let mut e2 = e;
                if *sectors_all_ones {
                    e2 |= ((1u64 << (h.cluster_bits - 8)) - 1) << x;
                }
                let off = (e & off_mask).wrapping_add_signed(*offset_delta) & off_mask;
                e2 = (e2 & !off_mask) | off;
                put(&mut b, at, 8, e2);
            }
            Mutation::CompressedBytes { region, pos, bytes } => {
                let comp: Vec<_> = base
                    .regions
                    .iter()
                    .filter(|r| r.0 == "compressed data")
                    .collect();
                if comp.is_empty() {
                    continue;
                }
                let (_, off, len) = *comp[region % comp.len()];
                let at = (off + *pos as u64 % len) as usize;
                for (i, v) in bytes.iter().enumerate() {
                    if let Some(x) = b.get_mut(at + i) {
                        *x = *v;
                    }
                }
            }
            Mutation::Truncate { keep_per_mille } => {
                let keep = (b.len() as u64 * u64::from(*keep_per_mille) / 1000) as usize;
                b.truncate(keep.max(cs.min(512) as usize / 8));
            }
        }
    }
    b
}

// ---------------------------------------------------------------------------------------------
// The operations every hostile image goes through.

/// Wall-clock bound of one case (debug build, 2 slow cores).
const CASE_TIMEOUT: Duration = Duration::from_secs(20);
/// Guest reads per case at most (every cluster of small disks, a spread sample of large ones).
const MAX_READS: u64 = 2048;

/// An error class that a hostile image may legitimately produce.
fn acceptable(e: &Error) -> bool {
    matches!(
        e,
        Error::Corrupt { .. }
            | Error::Unsupported { .. }
            | Error::Limit { .. }
            | Error::OutOfRange { .. }
            | Error::Io { .. }
    )
}

fn exercise(bytes: Vec<u8>) -> std::result::Result<(), String> {
    let _ = Header::parse(&bytes[..bytes.len().min(2 << 20)]);
    let host: Arc<dyn BlockDevice> = Arc::new(MemDisk::from_vec(bytes.clone()).read_only());
    if let Err(e) = read_header(&*host) {
        if !acceptable(&e) {
            return Err(format!("read_header: unexpected error class {e:?}"));
        }
    }
    match Qcow2Image::open(host.clone(), None, true) {
        Ok(img) => {
            let len = img.len();
            let cs = img.cluster_size().max(512);
            let clusters = len.div_ceil(cs);
            let step = clusters.div_ceil(MAX_READS).max(1);
            let mut buf = vec![0u8; cs as usize];
            let mut k = 0;
            while k < clusters {
                let off = k * cs;
                let n = cs.min(len - off) as usize;
                if let Err(e) = img.read_exact_at(&mut buf[..n], off) {
                    if !acceptable(&e) {
                        return Err(format!("read at {off}: unexpected error class {e:?}"));
                    }
                }
                k += step;
            }
            if len > 0 {
                match img.block_status(0, len) {
                    Ok(ext) => {
                        let mut pos = 0;
                        for e in &ext {
                            if e.off != pos || e.len == 0 {
                                return Err(format!("block_status extents do not tile: {ext:?}"));
                            }
                            pos += e.len;
                        }
                        if pos != len {
                            return Err(format!("block_status covers {pos} of {len}"));
                        }
                    }
                    Err(e) if !acceptable(&e) => {
                        return Err(format!("block_status: unexpected error class {e:?}"))
                    }
                    Err(_) => {}
                }
            }
        }
        Err(e) if !acceptable(&e) => return Err(format!("open: unexpected error class {e:?}")),
        Err(_) => {}
    }
    match check(&*host, Repair::None) {
        Ok(r) => {
            if r.leaks_fixed + r.corruptions_fixed != 0 {
                return Err("read-only check fixed something".into());
            }
        }
        Err(e) if !acceptable(&e) => return Err(format!("check: unexpected error class {e:?}")),
        Err(_) => {}
    }
    // Repair on a writable copy must not panic either, and must leave something checkable.
    let rw = MemDisk::from_vec(bytes);
    if let Ok(r) = check(&rw, Repair::All) {
        let again = check(&rw, Repair::None);
        if let Ok(a) = &again {
            if r.corruptions == 0 && r.check_errors == 0 && a.corruptions != 0 {
                return Err(format!("repair claimed success but recheck found {a:#?}"));
            }
        }
    }
    Ok(())
}

/// Run `exercise` on a worker thread with a watchdog; the allocation watch is checked after.
fn guarded(bytes: Vec<u8>, what: &str) -> std::result::Result<(), String> {
    static SERIAL: Mutex<()> = Mutex::new(());
    let _one_at_a_time = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    BIGGEST_ALLOC.store(0, Ordering::Relaxed);
    let (tx, rx) = mpsc::channel();
    let worker = std::thread::spawn(move || {
        let r = exercise(bytes);
        let _ = tx.send(r);
    });
    let r = match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(r) => {
            let _ = worker.join();
            r
        }
        Err(mpsc::RecvTimeoutError::Timeout) => Err(format!("hang (> {CASE_TIMEOUT:?}) on {what}")),
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            let msg = match worker.join() {
                Err(p) => p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default(),
                Ok(()) => String::new(),
            };
            Err(format!("panic on {what}: {msg}"))
        }
    };
    let biggest = BIGGEST_ALLOC.load(Ordering::Relaxed);
    r?;
    if biggest > MAX_SINGLE_ALLOC {
        return Err(format!("a single allocation of {biggest} bytes on {what}"));
    }
    Ok(())
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn hostile_mutations_never_panic_hang_or_overallocate(
        base in 0usize..6,
        muts in proptest::collection::vec(mutation(), 1..4),
    ) {
        let bases = bases();
        let base = &bases[base % bases.len()];
        let bytes = apply(base, &muts);
        let what = format!("{} with {muts:?}", base.name);
        if let Err(e) = guarded(bytes, &what) {
            prop_assert!(false, "{}", e);
        }
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// Pure parser on arbitrary bytes behind a valid magic.
    #[test]
    fn header_parse_on_random_bytes(tail in proptest::collection::vec(any::<u8>(), 0..1024)) {
        let mut b = meta::MAGIC.to_be_bytes().to_vec();
        b.extend_from_slice(&tail);
        let what = format!("random header {b:02x?}");
        if let Err(e) = guarded(b, &what) {
            prop_assert!(false, "{}", e);
        }
    }
}

#[test]
fn unmodified_bases_are_clean_and_open() {
    for base in bases() {
        guarded(base.bytes.clone(), base.name).unwrap();
        let host = MemDisk::from_vec(base.bytes.clone());
        let r = check(&host, Repair::None).unwrap();
        assert!(r.is_clean(), "{}: {r:#?}", base.name);
    }
}

// ---------------------------------------------------------------------------------------------
// Named regressions and error classes.

fn base_named(name: &str) -> &'static Base {
    bases().iter().find(|b| b.name == name).unwrap()
}

fn with(name: &str, at: u64, width: u64, value: u64) -> Vec<u8> {
    let mut b = base_named(name).bytes.clone();
    put(&mut b, at, width, value);
    b
}

fn all_errors(bytes: Vec<u8>) -> Vec<(&'static str, Result<(), Error>)> {
    let host: Arc<dyn BlockDevice> = Arc::new(MemDisk::from_vec(bytes.clone()).read_only());
    vec![
        (
            "parse",
            // meta speaks the engine's own error; this is its mapping at the crate edge.
            Header::parse(&bytes[..bytes.len().min(2 << 20)])
                .map(|_| ())
                .map_err(Error::from),
        ),
        ("read_header", read_header(&*host).map(|_| ())),
        (
            "open",
            Qcow2Image::open(host.clone(), None, true).map(|_| ()),
        ),
        ("check", check(&*host, Repair::None).map(|_| ())),
    ]
}

#[test]
fn encrypted_image_is_refused_as_unsupported() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("luks.qcow2");
    let ps = p.to_str().unwrap();
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            ps,
            "1M",
        ],
    );
    for (step, r) in all_errors(std::fs::read(&p).unwrap()) {
        match r {
            Err(Error::Unsupported { what }) => {
                assert!(what.contains("encrypt"), "{step}: {what}")
            }
            other => panic!("{step}: expected Unsupported(encryption), got {other:?}"),
        }
    }
    // Legacy AES (crypt_method 1) is refused the same way.
    for (step, r) in all_errors(with("v3 snapshot", 32, 4, 1)) {
        assert!(
            matches!(&r, Err(Error::Unsupported { what }) if what.contains("encrypt")),
            "{step}: {r:?}"
        );
    }
}

#[test]
fn unknown_incompatible_feature_is_unsupported() {
    for (step, r) in all_errors(with("v3 snapshot", 72, 8, 1 << 40)) {
        assert!(matches!(r, Err(Error::Unsupported { .. })), "{step}: {r:?}");
    }
}

#[test]
fn bad_versions_are_unsupported() {
    for v in [1, 4, u64::from(u32::MAX)] {
        for (step, r) in all_errors(with("v3 snapshot", 4, 4, v)) {
            assert!(
                matches!(r, Err(Error::Unsupported { .. })),
                "v{v} {step}: {r:?}"
            );
        }
    }
}

#[test]
fn cluster_bits_out_of_range_is_corrupt() {
    // The spec allows 9..=21 (qemu: "Cluster size must be a power of two between 512 and 2M");
    // anything else is an invalid header, not a feature we lack.
    for bits in [0, 8, 22, 40, 63, 64, u64::from(u32::MAX)] {
        for (step, r) in all_errors(with("v3 snapshot", 20, 4, bits)) {
            assert!(
                matches!(r, Err(Error::Corrupt { .. })),
                "bits {bits} {step}: {r:?}"
            );
        }
    }
}

#[test]
fn bad_magic_is_corrupt() {
    for (step, r) in all_errors(with("v2 c512", 0, 4, 0x5146_49fa)) {
        assert!(matches!(r, Err(Error::Corrupt { .. })), "{step}: {r:?}");
    }
}

#[test]
fn truncated_hosts() {
    let full = base_named("v3 snapshot").bytes.clone();
    // Inside the fixed header: nothing can be parsed.
    for keep in [0usize, 3, 4, 50, 71, 100] {
        for (step, r) in all_errors(full[..keep].to_vec()) {
            assert!(
                matches!(r, Err(Error::Corrupt { .. } | Error::OutOfRange { .. })),
                "keep {keep} {step}: {r:?}"
            );
        }
    }
    // Header intact, tables gone: open refuses as corrupt (or the snapshot table read runs
    // out of range); check reports, without failing, that the image is damaged.
    let h = Header::parse(&full).unwrap();
    let cut = full[..h.cluster_size() as usize].to_vec();
    let host: Arc<dyn BlockDevice> = Arc::new(MemDisk::from_vec(cut).read_only());
    let r = Qcow2Image::open(host.clone(), None, true).map(|_| ());
    assert!(
        matches!(r, Err(Error::Corrupt { .. } | Error::OutOfRange { .. })),
        "{r:?}"
    );
    let rep = check(&*host, Repair::None).unwrap();
    assert!(!rep.is_clean(), "{rep:#?}");
}

#[test]
fn huge_tables_hit_named_limits() {
    // l1_size of 2^32-1 entries: far above the 32 MiB L1 limit.
    for (step, r) in all_errors(with("v3 snapshot", 36, 4, u64::from(u32::MAX))) {
        assert!(matches!(r, Err(Error::Limit { .. })), "{step}: {r:?}");
    }
    // refcount table of 2^32-1 clusters.
    for (step, r) in all_errors(with("v3 snapshot", 56, 4, u64::from(u32::MAX))) {
        assert!(matches!(r, Err(Error::Limit { .. })), "{step}: {r:?}");
    }
}

#[test]
fn backing_file_offset_near_u64_max_does_not_panic() {
    let b = with("extl2 rc1 backing", 8, 8, u64::MAX - 3);
    guarded(b, "backing_file_offset = 2^64-4").unwrap();
}

#[test]
fn huge_compressed_lengths_do_not_panic() {
    let base = base_named("zlib c4k");
    for entry in 0..base.compressed_entries.len().min(8) {
        let b = apply(
            base,
            &[Mutation::Compressed {
                entry,
                sectors_all_ones: true,
                offset_delta: 0,
            }],
        );
        guarded(b, "compressed sectors all ones").unwrap();
    }
}

#[test]
fn refcount_block_offset_near_u64_max_does_not_panic() {
    // With 512-byte clusters, 2^64-512 is an aligned refcount block offset.
    let base = base_named("v2 c512");
    let h = Header::parse(&base.bytes).unwrap();
    let b = with("v2 c512", h.refcount_table_offset, 8, u64::MAX);
    guarded(b.clone(), "reftable[0] = 2^64-1").unwrap();
    let r = check(&MemDisk::from_vec(b), Repair::None).unwrap();
    assert_eq!(r.exit_code(), 2, "{r:#?}");
}
