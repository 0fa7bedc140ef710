//! Issue #20: the file-level fallbacks macOS runs (no copy_file_range; no FICLONE, so
//! nothing to share outside APFS), forced on Linux with `VMDISK_FORCE_PORTABLE=1` and
//! judged by qemu-img. The no-punch-hole fallback is checked through an NBD export in
//! `portable_locks.rs` and against the block contract in `crates/vmdisk-block/tests`.

use std::os::unix::fs::MetadataExt;

use tests::portable::vmdisk_portable;
use tests::*;

#[test]
fn the_portable_copy_reads_and_writes_and_keeps_holes() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("sparse.raw");
    make_sparse_raw(&src, 64 * MIB, 42, 12, 500 * KIB);
    // A qcow2 too: its copy must still be an image qemu accepts.
    let q = d.join("disk.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&q)]).ok();
    for (from, name) in [(&src, "copy.raw"), (&q, "copy.qcow2")] {
        let dst = d.join(name);
        // auto: natively this filesystem would take copy_file_range (or a reflink); the
        // portable path has neither.
        let r = vmdisk_portable(&["copy", "--json", s(from), s(&dst)]).ok();
        let v = r.json();
        assert_eq!(v["method"], "read_write", "{r}");
        assert_eq!(sha256(&dst), sha256(from), "{name}: content differs");
        let r = qemu_img(&["compare", s(from), s(&dst)]);
        assert_eq!(r.code(), 0, "{name}:\n{r}");
        let (sb, db) = (
            std::fs::metadata(from).unwrap().blocks() * 512,
            std::fs::metadata(&dst).unwrap().blocks() * 512,
        );
        assert!(
            db <= sb + sb / 10 + 64 * KIB,
            "{name}: the source allocates {sb} bytes, the copy {db}: holes were filled"
        );
    }
    assert_qemu_check_clean(&d.join("copy.qcow2"), "portable copy");
    // The qemu-img map of the raw copy has the source's data extents.
    let map = |p: &std::path::Path| {
        let v = qemu_img(&["map", "--output=json", "-f", "raw", s(p)])
            .ok()
            .json();
        v.as_array()
            .unwrap()
            .iter()
            .filter(|e| e["data"] == true)
            .map(|e| (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect::<Vec<_>>()
    };
    assert_eq!(map(&d.join("copy.raw")), map(&src), "data extents differ");
}

#[test]
fn reflink_always_fails_cleanly_without_clones() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let src = d.join("src.raw");
    make_sparse_raw(&src, 8 * MIB, 3, 4, 200 * KIB);
    let dst = d.join("dst.raw");
    let r = vmdisk_portable(&["copy", "--reflink=always", s(&src), s(&dst)]).expect_code(1);
    assert!(
        r.all_output_lower().contains("reflink") || r.all_output_lower().contains("share"),
        "the refusal should say the extents cannot be shared:\n{r}"
    );
    assert!(
        !dst.exists(),
        "a failed --reflink=always left {}",
        dst.display()
    );
    let left: Vec<_> = std::fs::read_dir(d)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "src.raw")
        .collect();
    assert!(left.is_empty(), "files left behind: {left:?}");
}
