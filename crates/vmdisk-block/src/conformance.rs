//! One suite for the block contract, run against every implementation.
//!
//! `make(len)` must return a fresh, zero-filled, writable device of exactly `len` bytes.
//! Failures panic with the name of the broken rule (this is test code).

use crate::{BlockDevice, Error, ExtentKind};

/// Size used by the suite: not a power of two, so alignment assumptions show.
pub const SUITE_LEN: u64 = 3 * 1024 * 1024 + 512 * 3;

/// Run every check.
pub fn run_all<D: BlockDevice>(make: impl Fn(u64) -> D) {
    len_is_exact(&make(SUITE_LEN));
    fresh_device_reads_zero(&make(SUITE_LEN));
    empty_buffers(&make(SUITE_LEN));
    writes_read_back(&make(SUITE_LEN));
    out_of_range_touches_nothing(&make(SUITE_LEN));
    block_status_covers_range(&make(SUITE_LEN));
    write_zeroes_and_discard(&make(SUITE_LEN));
    concurrent_disjoint_writes(&make(SUITE_LEN));
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

pub fn len_is_exact<D: BlockDevice>(d: &D) {
    assert_eq!(d.len(), SUITE_LEN, "len() must equal the created size");
}

pub fn fresh_device_reads_zero<D: BlockDevice>(d: &D) {
    let mut buf = vec![1u8; 65536];
    d.read_exact_at(&mut buf, SUITE_LEN - 65536).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a fresh device reads zeros");
}

pub fn empty_buffers<D: BlockDevice>(d: &D) {
    d.read_exact_at(&mut [], 0).unwrap();
    d.read_exact_at(&mut [], SUITE_LEN).unwrap();
    d.write_all_at(&[], SUITE_LEN).unwrap();
    assert!(
        d.read_exact_at(&mut [], SUITE_LEN + 1).is_err(),
        "an empty read past the end is out of range"
    );
}

pub fn writes_read_back<D: BlockDevice>(d: &D) {
    let cases: &[(u64, usize)] = &[
        (0, 512),
        (1, 7),
        (4095, 2),
        (65535, 65538),
        (1 << 20, 4096),
        (SUITE_LEN - 3, 3),
    ];
    for (i, &(off, len)) in cases.iter().enumerate() {
        let data = pattern(i as u64 + 1, len);
        d.write_all_at(&data, off).unwrap();
        let mut back = vec![0u8; len];
        d.read_exact_at(&mut back, off).unwrap();
        assert!(back == data, "write at {off}+{len} reads back");
    }
    d.flush().unwrap();
    // The first write is still intact after overlapping neighbours.
    let mut back = vec![0u8; 512];
    d.read_exact_at(&mut back, 0).unwrap();
    let mut expect = pattern(1, 512);
    expect[1..8].copy_from_slice(&pattern(2, 7));
    assert!(back == expect, "overlapping writes compose");
}

pub fn out_of_range_touches_nothing<D: BlockDevice>(d: &D) {
    let data = pattern(9, 100);
    d.write_all_at(&data, SUITE_LEN - 100).unwrap();
    let err = d.write_all_at(&[0xAA; 200], SUITE_LEN - 100);
    assert!(
        matches!(err, Err(Error::OutOfRange { .. })),
        "a write crossing the end fails with OutOfRange, got {err:?}"
    );
    let mut back = vec![0u8; 100];
    d.read_exact_at(&mut back, SUITE_LEN - 100).unwrap();
    assert!(back == data, "a refused write changes nothing");
    let mut big = vec![0u8; 200];
    assert!(
        matches!(
            d.read_exact_at(&mut big, SUITE_LEN - 100),
            Err(Error::OutOfRange { .. })
        ),
        "a read crossing the end fails, never short"
    );
    assert!(
        d.read_exact_at(&mut big, u64::MAX - 10).is_err(),
        "offset overflow"
    );
    assert!(
        d.write_all_at(&big, u64::MAX - 10).is_err(),
        "offset overflow"
    );
    assert!(d.block_status(SUITE_LEN, 1).is_err(), "status past the end");
    assert!(
        d.write_zeroes(SUITE_LEN - 1, 2, false).is_err(),
        "zeroes past the end"
    );
    assert!(d.discard(u64::MAX, 2).is_err(), "discard overflow");
    assert_eq!(
        d.len(),
        SUITE_LEN,
        "a refused request never grows the device"
    );
}

pub fn block_status_covers_range<D: BlockDevice>(d: &D) {
    d.write_all_at(&pattern(3, 8192), 1 << 20).unwrap();
    for &(off, len) in &[(0, SUITE_LEN), (12345, 1 << 20), ((1 << 20) + 1, 10)] {
        let ext = d.block_status(off, len).unwrap();
        assert!(!ext.is_empty(), "status of a non-empty range is not empty");
        assert_eq!(ext[0].off, off, "extents start at the requested offset");
        let mut pos = off;
        for e in &ext {
            assert_eq!(e.off, pos, "extents are contiguous");
            assert!(e.len > 0, "no empty extents");
            pos = e.end();
        }
        assert_eq!(pos, off + len, "extents cover the requested range exactly");
        for e in ext.iter().filter(|e| e.reads_as_zero()) {
            let n = e.len.min(1 << 20) as usize;
            let mut buf = vec![1u8; n];
            d.read_exact_at(&mut buf, e.off).unwrap();
            assert!(buf.iter().all(|&b| b == 0), "a zero extent reads as zeros");
        }
    }
    let ext = d.block_status((1 << 20) + 100, 100).unwrap();
    assert!(
        ext.iter().all(|e| e.kind == ExtentKind::Data),
        "written bytes are reported as data"
    );
}

pub fn write_zeroes_and_discard<D: BlockDevice>(d: &D) {
    d.write_all_at(&pattern(4, 3 * 65536), 65536).unwrap();
    d.write_zeroes(65536 + 100, 65536, false).unwrap();
    d.write_zeroes(2 * 65536 + 100, 65536, true).unwrap();
    let mut buf = vec![1u8; 2 * 65536];
    d.read_exact_at(&mut buf, 65536 + 100).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "write_zeroes makes zeros");
    let mut edge = [0u8; 100];
    d.read_exact_at(&mut edge, 65536).unwrap();
    assert!(
        edge[..] == pattern(4, 100)[..],
        "write_zeroes keeps bytes before the range"
    );
    d.discard(0, 65536).unwrap();
    d.write_zeroes(0, 0, true).unwrap();
}

pub fn concurrent_disjoint_writes<D: BlockDevice>(d: &D) {
    const CHUNK: usize = 64 * 1024;
    std::thread::scope(|s| {
        for t in 0..4u64 {
            s.spawn(move || {
                for i in 0..8u64 {
                    let off = (i * 4 + t) * CHUNK as u64;
                    d.write_all_at(&pattern(100 + off, CHUNK), off).unwrap();
                }
            });
        }
    });
    for k in 0..32u64 {
        let off = k * CHUNK as u64;
        let mut back = vec![0u8; CHUNK];
        d.read_exact_at(&mut back, off).unwrap();
        assert!(
            back == pattern(100 + off, CHUNK),
            "concurrent write {k} landed intact"
        );
    }
}
