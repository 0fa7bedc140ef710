//! The portable code paths (what macOS and other Unixes run) on this machine: this test
//! binary switches them on for its whole process (`sys::force_portable`), so the block
//! contract, the undo log and the POSIX image locks are checked the way they run there.
//! The lock interplay with a real qemu is in `tests/tests/portable.rs`.

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use vmdisk_block::lock::{ImageLock, LockMode};
use vmdisk_block::sys::{self, LockKind};
use vmdisk_block::{BlockDevice, ExtentKind, RawFile, UndoFile};

fn portable() {
    sys::force_portable(true);
    assert!(sys::portable());
    assert_eq!(sys::lock_kind(), LockKind::Posix);
}

#[test]
fn raw_files_keep_the_block_contract() {
    portable();
    let dir = tempfile::tempdir().unwrap();
    let n = AtomicUsize::new(0);
    vmdisk_block::conformance::run_all(|len| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        RawFile::create(dir.path().join(format!("d{i}")), len).unwrap()
    });
    vmdisk_block::conformance::run_all(|len| {
        let i = n.fetch_add(1, Ordering::Relaxed);
        let raw = RawFile::create(dir.path().join(format!("u{i}")), len).unwrap();
        UndoFile::new(Arc::new(raw))
    });
}

#[test]
fn zeroing_writes_zeros_instead_of_punching() {
    portable();
    let dir = tempfile::tempdir().unwrap();
    let d = RawFile::create(dir.path().join("z"), 4 << 20).unwrap();
    d.write_all_at(&vec![0x5au8; 2 << 20], 1 << 20).unwrap();
    // Unaligned on purpose: the platform path would punch the aligned middle.
    d.write_zeroes((1 << 20) + 100, (1 << 20) - 200, true)
        .unwrap();
    d.discard((2 << 20) + 7, 4096).unwrap();
    let mut buf = vec![0u8; 2 << 20];
    d.read_exact_at(&mut buf, 1 << 20).unwrap();
    assert!(buf[..100].iter().all(|&b| b == 0x5a));
    assert!(buf[100..(1 << 20) - 100].iter().all(|&b| b == 0));
    assert!(buf[(1 << 20) - 100..(1 << 20) + 7]
        .iter()
        .all(|&b| b == 0x5a));
    assert!(buf[(1 << 20) + 7..(1 << 20) + 7 + 4096]
        .iter()
        .all(|&b| b == 0));
    // No hole was punched: the whole written range is still data.
    let st = d.block_status(1 << 20, 2 << 20).unwrap();
    assert!(
        st.iter().all(|e| e.kind == ExtentKind::Data),
        "a hole appears although the portable path punches none: {st:?}"
    );
}

#[test]
fn allocate_writes_the_zeros() {
    portable();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("a");
    let d = RawFile::create(&p, 0).unwrap();
    d.allocate(3 << 20).unwrap();
    assert_eq!(d.len(), 3 << 20);
    let mut buf = vec![1u8; 3 << 20];
    d.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf.iter().all(|&b| b == 0));
    d.flush().unwrap();
    let allocated = std::fs::metadata(&p).unwrap().blocks() * 512;
    assert!(
        allocated >= 3 << 20,
        "only {allocated} bytes allocated after allocate(3 MiB)"
    );
}

#[test]
fn posix_locks_survive_other_descriptors_closing() {
    portable();
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("img");
    std::fs::write(&p, [0u8; 4096]).unwrap();
    let raw = RawFile::open(&p, false).unwrap();
    let lock = ImageLock::acquire(raw.file(), &p, LockMode::Write).unwrap();
    assert_eq!(lock.kind(), LockKind::Posix);
    // More descriptors of the file come and go through vmdisk's own ways of opening it.
    for _ in 0..3 {
        drop(RawFile::open(&p, true).unwrap());
        assert!(ImageLock::acquire_path(&p, LockMode::Read).is_err());
    }
    // An OFD probe from a new description sees the process's POSIX locks (another owner);
    // it stays open until the locks are gone, since its close would drop them.
    let probe = File::open(&p).unwrap();
    let held = sys::get_lock(&probe, LockKind::Ofd, 101).unwrap();
    assert!(held.is_some(), "the write byte 101 was dropped");
    drop(lock);
    drop(raw);
    let held = sys::get_lock(&probe, LockKind::Ofd, 101).unwrap();
    assert!(held.is_none(), "byte 101 still held after the lock went");
}
