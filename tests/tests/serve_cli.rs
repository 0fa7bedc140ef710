//! `vmdisk serve` as a child process on a unix socket, judged by libnbd (`nbdinfo --map`,
//! `nbdcopy`), qemu (`qemu-img compare/map/check`, `qemu-io` over `nbd+unix://`) and
//! e2fsprogs (a `-P` partition export).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::*;

const EXIT: Duration = Duration::from_secs(20);
/// How long the server may take to close a connection its client has left.
const SERVER_IDLE: Duration = Duration::from_secs(20);

/// Sockets process `pid` has open (its listener, its runtime's wakeup pair, one per client).
fn socket_fds(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| {
            d.filter_map(|e| fs::read_link(e.ok()?.path()).ok())
                .filter(|t| t.to_string_lossy().starts_with("socket:"))
                .count()
        })
        .unwrap_or(0)
}

/// A 64 MiB qcow2 over a qcow2 backing file, both made by qemu: data in each layer, zero
/// clusters, a discard, unaligned writes. Returns (base, top).
fn backed_qcow2(dir: &Path) -> (PathBuf, PathBuf) {
    let base = dir.join("base.qcow2");
    let top = dir.join("top.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]).ok();
    qemu_io(
        &base,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 10M 3M".into(),
            "write -z 20M 1M".into(),
            "write -P 0x23 33M 5000".into(),
            "write -P 0x24 60M 4M".into(),
        ],
    );
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&top),
    ])
    .ok();
    qemu_io(
        &top,
        &[
            "write -P 0x33 512k 1M".into(),
            "write -z 11M 64k".into(),
            "discard 30M 1M".into(),
            "write -P 0x44 40M 100k".into(),
            "write -P 0x45 61M 7777".into(),
        ],
    );
    (base, top)
}

/// Merge (start, len, data, zero) runs with equal flags.
fn merge(runs: Vec<(u64, u64, bool, bool)>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for r in runs {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == r.0 && l.2 == r.2 && l.3 == r.3 => l.1 += r.1,
            _ => out.push(r),
        }
    }
    out
}

#[test]
fn nbdinfo_map_matches_qemu_img_map() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (base, top) = backed_qcow2(d);
    let (sha_base, sha_top) = (sha256(&base), sha256(&top));

    let qmap = qemu_img(&["map", "--output=json", s(&top)]).ok().json();
    let want = merge(
        qmap.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["start"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    e["data"].as_bool().unwrap(),
                    e["zero"].as_bool().unwrap(),
                )
            })
            .collect(),
    );

    let mut srv = Serve::start(&top, &["-r"], d);
    let r = guest_tool("nbdinfo", &["--map", "--json", &srv.uri()]);
    assert!(
        r.success(),
        "nbdinfo --map failed:\n{r}\n{}",
        srv.describe()
    );
    let got = merge(
        r.json()
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let t = e["type"].as_u64().unwrap();
                (
                    e["offset"].as_u64().unwrap(),
                    e["length"].as_u64().unwrap(),
                    t & 1 == 0, // NBD_STATE_HOLE clear => data
                    t & 2 != 0, // NBD_STATE_ZERO
                )
            })
            .collect(),
    );
    assert_eq!(
        got, want,
        "nbdinfo --map (offset, len, data, zero) differs from qemu-img map:\nnbdinfo: {}\nqemu-img: {qmap}",
        r.stdout
    );
    srv.assert_exits_ok(EXIT, "one-shot after nbdinfo");
    assert_eq!(sha256(&base), sha_base, "serving changed the backing file");
    assert_eq!(
        sha256(&top),
        sha_top,
        "a read-only export changed the image"
    );
}

#[test]
fn nbdcopy_and_qemu_compare_equal_qemu_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (base, top) = backed_qcow2(d);
    let sha_base = sha256(&base);
    let reference = d.join("reference.raw");
    qemu_img(&["convert", "-O", "raw", s(&top), s(&reference)]).ok();

    let mut srv = Serve::start(&top, &["--persistent"], d);
    let copy = d.join("copy.raw");
    let r = guest_tool("nbdcopy", &[srv.uri(), s(&copy).to_string()]);
    assert!(r.success(), "nbdcopy failed:\n{r}\n{}", srv.describe());
    assert_eq!(
        sha256(&copy),
        sha256(&reference),
        "nbdcopy of the export != qemu-img convert"
    );
    let r = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "raw",
        s(&reference),
        &srv.uri(),
    ]);
    assert_eq!(
        r.code(),
        0,
        "qemu-img compare vs the export:\n{r}\n{}",
        srv.describe()
    );
    assert!(
        srv.bg.alive(),
        "--persistent server exited:\n{}",
        srv.describe()
    );
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
    assert_qemu_check_clean(&top, "after serving");
    assert_eq!(sha256(&base), sha_base, "serving changed the backing file");
}

/// Writes, zero writes (with and without unmap) below 56 MiB and discards in [56, 64) MiB,
/// which hold data before; discarded ranges are compared only as "no error" (NBD TRIM is
/// advisory). Returns (qemu-io commands, discarded ranges).
fn nbd_write_ops(d: &Path) -> (Vec<String>, Vec<(u64, u64)>) {
    let rnd = d.join("rnd.bin");
    make_rnd_file(&rnd, 5);
    let mut ops: Vec<String> = qemu_io_ops(5, 56 * MIB, 64 * KIB, &rnd)
        .into_iter()
        .filter(|o| !o.starts_with("discard"))
        .collect();
    let discards = vec![(56 * MIB + 4096, 300 * KIB), (60 * MIB, 2 * MIB + 12345)];
    for (off, len) in &discards {
        ops.push(format!("discard {off} {len}"));
    }
    (ops, discards)
}

fn read_masked(img: &Path, fmt: &str, d: &Path, mask: &[(u64, u64)]) -> Vec<u8> {
    let raw = d.join("masked.raw");
    fs::remove_file(&raw).ok();
    qemu_img(&["convert", "-f", fmt, "-O", "raw", s(img), s(&raw)]).ok();
    let mut v = fs::read(&raw).unwrap();
    for (off, len) in mask {
        v[*off as usize..(*off + *len) as usize].fill(0);
    }
    fs::remove_file(&raw).ok();
    v
}

#[test]
fn qemu_io_writes_through_nbd_land_in_the_image() {
    for fmt in ["qcow2", "raw"] {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        let img = d.join(format!("img.{fmt}"));
        qemu_img(&["create", "-q", "-f", fmt, s(&img), "64M"]).ok();
        qemu_io_fmt(&img, fmt, &["write -P 0x5a 0 64M".into()]);
        let reference = d.join(format!("ref.{fmt}"));
        fs::copy(&img, &reference).unwrap();
        let (ops, discards) = nbd_write_ops(d);

        let mut srv = Serve::start(&img, &[], d);
        let uri = srv.uri();
        let r = run(Command::new(require_tool("qemu-io"))
            .args(["-f", "raw"])
            .args(ops.iter().flat_map(|o| ["-c", o.as_str()]))
            .arg(&uri));
        assert!(
            r.success() && !r.stderr.contains("failed") && !r.stdout.contains("failed"),
            "{fmt}: qemu-io over NBD failed:\n{r}\n{}",
            srv.describe()
        );
        srv.assert_exits_ok(EXIT, "one-shot after qemu-io");
        if fmt == "qcow2" {
            assert_qemu_check_clean(&img, "after NBD writes");
        }
        qemu_io_fmt(&reference, fmt, &ops);
        let a = read_masked(&img, fmt, d, &discards);
        let b = read_masked(&reference, fmt, d, &discards);
        assert!(
            a == b,
            "{fmt}: NBD writes differ from the same qemu-io ops on the image: {:?}",
            first_difference(&a, &b)
        );
    }
}

#[test]
fn snapshot_mode_never_writes_the_image() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (base, top) = backed_qcow2(d);
    let (sha_base, sha_top) = (sha256(&base), sha256(&top));
    let before: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();

    let mut srv = Serve::start(&top, &["--snapshot"], d);
    let r = run(Command::new(require_tool("qemu-io"))
        .args(["-f", "raw"])
        .args(["-c", "write -P 0x99 0 2M"])
        .args(["-c", "write -z 10M 1M"])
        .args(["-c", "discard 40M 64k"])
        .args(["-c", "read -P 0x99 0 2M"])
        .args(["-c", "read -P 0 10M 1M"])
        .arg(srv.uri()));
    assert!(
        r.success() && !r.stderr.contains("failed") && !r.stdout.contains("failed"),
        "qemu-io over a --snapshot export failed:\n{r}\n{}",
        srv.describe()
    );
    srv.assert_exits_ok(EXIT, "one-shot after qemu-io");
    assert_eq!(sha256(&top), sha_top, "--snapshot wrote the image");
    assert_eq!(sha256(&base), sha_base, "--snapshot wrote the backing file");
    let after: Vec<_> = fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| !n.to_string_lossy().starts_with("serve"))
        .collect();
    assert_eq!(
        after.len(),
        before.len(),
        "--snapshot left files behind: {after:?}"
    );
}

#[test]
fn read_only_export_refuses_writes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let (_, top) = backed_qcow2(d);
    let sha = sha256(&top);
    let mut srv = Serve::start(&top, &["-r", "--persistent"], d);

    let r = run(Command::new(require_tool("qemu-io"))
        .args(["-f", "raw", "-c", "write -P 0x1 0 64k"])
        .arg(srv.uri()));
    let text = format!("{}\n{}", r.stdout, r.stderr);
    assert!(
        !text.contains("wrote ")
            && (text.contains("Operation not permitted") || text.contains("Permission denied")),
        "qemu-io writing to a -r export must fail with EPERM:\n{r}"
    );

    // A client that ignores the read-only flag gets EPERM from the server itself.
    use vmdisk_nbd::client::{Client, ConnectOptions, Error};
    let mut c = Client::connect_unix(&srv.socket, &ConnectOptions::default()).unwrap();
    assert!(
        c.is_read_only(),
        "-r export does not advertise NBD_FLAG_READ_ONLY"
    );
    let eperm = |res: Result<(), Error>, what: &str| match res {
        Err(Error::Server { errno: 1, .. }) => {}
        other => panic!("{what} on a -r export: expected EPERM, got {other:?}"),
    };
    eperm(c.write(0, &[7u8; 4096], false), "WRITE");
    eperm(c.write_zeroes(0, 65536, false, false), "WRITE_ZEROES");
    eperm(c.trim(0, 65536, false), "TRIM");
    let mut buf = vec![0u8; 4096];
    c.read(0, &mut buf).unwrap();
    assert_eq!(buf, vec![0x11u8; 4096], "read after refused writes");
    c.disconnect().unwrap();

    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
    assert_eq!(sha256(&top), sha, "a -r export changed the image");
}

/// A layout-built qcow2 (ESP + ext4 root with content).
fn layout_disk(d: &Path) -> PathBuf {
    let tree = d.join("rootfs");
    fs::create_dir_all(tree.join("etc")).unwrap();
    write_file(&tree.join("etc/hostname"), b"served\n");
    write_file(&tree.join("blob"), &mixed_data(9, 2 * MIB as usize));
    let img = d.join("disk.qcow2");
    let layout = workspace_root().join("crates/vmdisk-layout/tests/fixtures/esp-root.json");
    vmdisk(&[
        "create",
        "-f",
        "qcow2",
        "--layout",
        s(&layout),
        "--copy-in",
        &format!("root={}", s(&tree)),
        s(&img),
        "256M",
    ])
    .ok();
    img
}

#[test]
fn partition_export_serves_exactly_that_partition() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = layout_disk(d);
    let whole = d.join("whole.raw");
    qemu_img(&["convert", "-O", "raw", s(&img), s(&whole)]).ok();
    let parts = inspect_partitions(&img);

    for (sel, number) in [("2", 2), ("1", 1), ("disk-main-root", 2), ("nixos", 2)] {
        let p = parts.iter().find(|p| p["number"] == number).unwrap();
        let (off, len) = (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap());
        let want = d.join("want.raw");
        fs::remove_file(&want).ok();
        extract_range(&whole, &want, off, len);

        let mut srv = Serve::start(&img, &["-P", sel, "-r"], d);
        let got = d.join("got.raw");
        fs::remove_file(&got).ok();
        let r = guest_tool("nbdcopy", &[srv.uri(), s(&got).to_string()]);
        assert!(
            r.success(),
            "-P {sel}: nbdcopy failed:\n{r}\n{}",
            srv.describe()
        );
        srv.assert_exits_ok(EXIT, &format!("-P {sel}: one-shot"));
        assert_eq!(
            fs::metadata(&got).unwrap().len(),
            len,
            "-P {sel}: export size"
        );
        assert_eq!(
            sha256(&got),
            sha256(&want),
            "-P {sel}: bytes differ from the partition"
        );
        if number == 2 {
            assert_e2fsck_clean(&got, &format!("-P {sel} copy"));
        } else {
            let r = guest_tool("fsck.vfat", &["-n", s(&got)]);
            assert_eq!(r.code(), 0, "-P {sel}: fsck.vfat -n on the copy:\n{r}");
        }
    }
    assert_qemu_check_clean(&img, "after partition exports");
}

/// Run `nbdcopy ARGS... URI DEST` for each DEST at once; panics unless all succeed.
fn parallel_nbdcopy(uri: &str, dests: &[PathBuf], args: &[&str]) -> Vec<Run> {
    let handles: Vec<_> = dests
        .iter()
        .map(|dst| {
            let (uri, dst) = (uri.to_string(), dst.clone());
            let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
            std::thread::spawn(move || {
                run(Command::new(require_guest_tool("nbdcopy"))
                    .args(&args)
                    .arg(&uri)
                    .arg(&dst))
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).collect()
}

#[test]
fn shared_persistent_serves_parallel_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = layout_disk(d);
    let reference = d.join("reference.raw");
    let want = qemu_raw_sha(d, s(&img), &reference);
    let mut srv = Serve::start(&img, &["--shared", "4", "--persistent"], d);
    let dests: Vec<PathBuf> = (0..4).map(|i| d.join(format!("par{i}.raw"))).collect();
    for r in parallel_nbdcopy(&srv.uri(), &dests, &["--connections=1"]) {
        assert!(
            r.success(),
            "parallel nbdcopy failed:\n{r}\n{}",
            srv.describe()
        );
    }
    for p in &dests {
        assert_eq!(
            sha256(p),
            want,
            "{}: differs from qemu-img convert",
            p.display()
        );
    }
    assert!(
        srv.bg.alive(),
        "--persistent server exited:\n{}",
        srv.describe()
    );
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
    assert_qemu_check_clean(&img, "after shared serving");
}

/// nbdcopy opens 4 connections when the server advertises multi-conn (as --shared N > 1
/// does). A client beyond the limit must wait its turn, as with qemu-nbd --shared, not be
/// dropped mid-handshake: here a multi-conn nbdcopy (4 connections) and a single-connection
/// one share 4 slots, so one of them has to queue. (Several multi-conn clients whose
/// connections together exceed --shared can starve each other with any strict limit,
/// qemu-nbd's included; that case is documented, not tested.)
#[test]
fn shared_limit_queues_multi_conn_clients() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = layout_disk(d);
    let reference = d.join("reference.raw");
    let want = qemu_raw_sha(d, s(&img), &reference);
    let mut srv = Serve::start(&img, &["--shared", "4", "--persistent", "-r"], d);
    let multi = d.join("multi.raw");
    let single = d.join("single.raw");
    let uri = srv.uri();
    let m = {
        let (uri, dst) = (uri.clone(), multi.clone());
        std::thread::spawn(move || {
            run(Command::new(require_guest_tool("nbdcopy"))
                .arg(&uri)
                .arg(&dst))
        })
    };
    let r = parallel_nbdcopy(&uri, std::slice::from_ref(&single), &["--connections=1"]);
    let rm = m.join().unwrap();
    for r in r.iter().chain(std::iter::once(&rm)) {
        assert!(
            r.success(),
            "nbdcopy against --shared 4 failed:\n{r}\n{}",
            srv.describe()
        );
    }
    for p in [&multi, &single] {
        assert_eq!(
            sha256(p),
            want,
            "{}: differs from qemu-img convert",
            p.display()
        );
    }
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
}

#[test]
fn sigterm_when_idle_exits_zero_and_flushes() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = d.join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]).ok();

    // Never connected to. Serve::start returns once the socket exists, and vmdisk serve
    // creates it only after its SIGINT/SIGTERM handlers are in place: that is the readiness
    // this needs (a probe connection would make the one-shot server exit by itself).
    let mut srv = Serve::start(&img, &[], d);
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM before any client");
    assert!(!srv.socket.exists(), "the socket was left behind");
    assert_qemu_check_clean(&img, "after SIGTERM (no client)");

    // Written to, then idle.
    let mut srv = Serve::start(&img, &["--persistent"], d);
    let pid = srv.bg.child.id();
    let idle_fds = socket_fds(pid);
    let r = run(Command::new(require_tool("qemu-io"))
        .args([
            "-f",
            "raw",
            "-c",
            "write -P 0x77 1M 3M",
            "-c",
            "write -z 2M 64k",
        ])
        .arg(srv.uri()));
    assert!(r.success() && !r.stderr.contains("failed"), "qemu-io:\n{r}");
    // Readiness: the server has closed its end of qemu-io's connection (a one-shot server
    // would exit right there); then it must still be up and serve the next client.
    let closed = wait_until(SERVER_IDLE, || socket_fds(pid) <= idle_fds);
    assert!(
        closed,
        "the server still holds {} sockets (idle: {idle_fds}) {} s after qemu-io left:\n{}",
        socket_fds(pid),
        SERVER_IDLE.as_secs(),
        srv.describe()
    );
    assert!(
        srv.bg.alive(),
        "--persistent server exited after its client left:\n{}",
        srv.describe()
    );
    {
        use vmdisk_nbd::client::{Client, ConnectOptions};
        let mut c = Client::connect_unix(&srv.socket, &ConnectOptions::default())
            .unwrap_or_else(|e| panic!("--persistent server refused a second client: {e}"));
        let mut buf = vec![0u8; 4096];
        c.read(1 << 20, &mut buf).unwrap();
        assert_eq!(
            buf,
            vec![0x77u8; 4096],
            "second client reads the first one's write"
        );
        c.disconnect().unwrap();
    }
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM when idle");
    assert_qemu_check_clean(&img, "after SIGTERM (idle)");
    let info = qemu_info(d, s(&img));
    assert_eq!(info["dirty-flag"], false, "dirty after SIGTERM: {info:#}");
    qemu_io(
        &img,
        &[
            "read -P 0x77 1M 1M".into(),
            "read -P 0 2M 64k".into(),
            "read -P 0x77 2162688 1982464".into(),
        ],
    );
}
