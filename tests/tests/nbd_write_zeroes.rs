//! NBD_CMD_WRITE_ZEROES on a qcow2 export, judged by outside clients and qemu-img: with
//! NBD_CMD_FLAG_NO_HOLE the range MUST stay provisioned (proto.md; qemu-io sets the flag on
//! every plain `write -z`, and libnbd's `h.zero(..., flags=CMD_FLAG_NO_HOLE)`), so its clusters
//! keep their storage (`qemu-img map` shows an offset); without it the server may punch, and
//! vmdisk does. Both ways the range reads back as zeros, through NBD and in the image.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tests::nbdsh::{map_range, nbdsh, qemu_map, MapEntry};
use tests::*;

const EXIT: Duration = Duration::from_secs(20);

/// Each 1 MiB range of the first 8 MiB and what the test does to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zeroed {
    /// Left as written (0x5a).
    No,
    /// Zeroed with NO_HOLE: must stay allocated.
    Keep,
    /// Zeroed without NO_HOLE: may be deallocated.
    MayPunch,
}

/// 0-1M data, 1-2M qemu-io `write -z` (NO_HOLE), 2-3M data, 3-4M qemu-io `write -z -u`,
/// 4-5M data, 5-6M nbdsh zero with NO_HOLE, 6-7M data, 7-8M nbdsh zero without flags.
const PLAN: [Zeroed; 8] = [
    Zeroed::No,
    Zeroed::Keep,
    Zeroed::No,
    Zeroed::MayPunch,
    Zeroed::No,
    Zeroed::Keep,
    Zeroed::No,
    Zeroed::MayPunch,
];

/// A 16 MiB qcow2 (`-o OPTS`) whose first 8 MiB hold 0x5a, written by qemu.
fn image(dir: &Path, name: &str, opts: &str) -> std::path::PathBuf {
    let img = dir.join(name);
    qemu_img(&["create", "-q", "-f", "qcow2", "-o", opts, s(&img), "16M"]).ok();
    qemu_io(&img, &["write -P 0x5a 0 8M".into()]);
    img
}

/// qemu-io with `cmds` against the export; panics unless every command worked.
fn qemu_io_nbd(uri: &str, cmds: &[&str]) {
    let mut cmd = Command::new(require_tool("qemu-io"));
    cmd.args(["-f", "raw"]);
    for c in cmds {
        cmd.args(["-c", c]);
    }
    let r = run(cmd.arg(uri));
    assert!(
        r.success() && !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "qemu-io over NBD:\n{r}"
    );
}

/// Zero the plan's ranges through the export with qemu-io and nbdsh, and read them back
/// through NBD.
fn zero_through_nbd(uri: &str) {
    qemu_io_nbd(uri, &["write -z 1M 1M", "write -z -u 3M 1M"]);
    let script = "\
M = 1 << 20
h.zero(M, 5 * M, flags=nbd.CMD_FLAG_NO_HOLE)
h.zero(M, 7 * M)
# An unaligned NO_HOLE zero over unallocated clusters, and one over data.
h.zero(300000, 9 * M + 12345, flags=nbd.CMD_FLAG_NO_HOLE)
h.zero(5000, 6 * M + 100, flags=nbd.CMD_FLAG_NO_HOLE)
h.flush()
for off in (M, 3 * M, 5 * M, 7 * M):
    assert h.pread(M, off) == bytes(M), 'not zero at %d' % off
assert h.pread(300000, 9 * M + 12345) == bytes(300000)
assert h.pread(5000, 6 * M + 100) == bytes(5000)
assert h.pread(100, 6 * M) == b'\\x5a' * 100
assert h.pread(M - 5100, 6 * M + 5100) == b'\\x5a' * (M - 5100)
";
    let r = nbdsh(uri, script);
    assert!(r.success(), "nbdsh over NBD:\n{r}");
    qemu_io_nbd(
        uri,
        &[
            "read -P 0x5a 0 1M",
            "read -P 0 1M 1M",
            "read -P 0x5a 2M 1M",
            "read -P 0 3M 1M",
            "read -P 0x5a 4M 1M",
            "read -P 0 5M 1M",
            "read -P 0 7M 1M",
            "read -P 0 8M 8M",
        ],
    );
}

/// Serve `img`, zero through NBD, stop the server cleanly; returns qemu-img's map after.
fn serve_and_zero(img: &Path, dir: &Path) -> Vec<MapEntry> {
    let mut srv = Serve::start(img, &["--persistent"], dir);
    zero_through_nbd(&srv.uri());
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM after zeroing");
    assert_qemu_check_clean(img, "after WRITE_ZEROES over NBD");
    // The image itself (read by qemu, not through vmdisk) holds what NBD read back.
    let mut cmds: Vec<String> = PLAN
        .iter()
        .enumerate()
        .filter(|(_, z)| **z != Zeroed::No)
        .map(|(i, _)| format!("read -P 0 {i}M 1M"))
        .collect();
    cmds.extend(["read -P 0x5a 0 1M".into(), "read -P 0 8M 8M".into()]);
    qemu_io(img, &cmds);
    qemu_map(img)
}

#[test]
fn no_hole_zeroes_keep_qcow2_clusters_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = image(d, "v3.qcow2", "compat=1.1,cluster_size=65536");
    let map = serve_and_zero(&img, d);
    for (i, z) in PLAN.iter().enumerate() {
        let off = i as u64 * MIB;
        let part = map_range(&map, off, MIB);
        match z {
            Zeroed::No => assert!(
                part.iter().all(|e| e.data && e.offset.is_some()),
                "{i}M: data range changed: {part:?}"
            ),
            Zeroed::Keep => assert!(
                part.iter().all(|e| e.zero && e.offset.is_some()),
                "{i}M: zeroed with NO_HOLE, so it must read as zero and stay allocated \
                 (an offset in qemu-img map): {part:?}"
            ),
            // Punching is allowed there, and vmdisk does it (as qemu-nbd does).
            Zeroed::MayPunch => assert!(
                part.iter().all(|e| e.zero && e.offset.is_none()),
                "{i}M: zeroed without NO_HOLE: {part:?}"
            ),
        }
    }
}

#[test]
fn no_hole_zeroes_on_a_v2_image_write_zeros_in_place() {
    // compat=0.10 has no zero flag: NO_HOLE must write zeros, punching is still allowed.
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = image(d, "v2.qcow2", "compat=0.10,cluster_size=65536");
    let map = serve_and_zero(&img, d);
    for (i, z) in PLAN.iter().enumerate() {
        let part = map_range(&map, i as u64 * MIB, MIB);
        if *z == Zeroed::Keep {
            assert!(
                part.iter().all(|e| e.offset.is_some()),
                "{i}M: zeroed with NO_HOLE on a v2 image must stay allocated: {part:?}"
            );
        }
    }
}
