//! Interop with real NBD clients: libnbd's nbdinfo/nbdcopy and qemu-img/qemu-io.
//! Missing tools fail loudly with the Debian package to install.

mod common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, persistent, TestServer};
use vmdisk_block::{BlockDevice, RawFile};
use vmdisk_nbd::ServerConfig;

const MIB: u64 = 1 << 20;
/// Longest any external tool may run.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);

fn need(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is missing: install it with `apt-get update; apt-get install -y {package}`"
    );
}

/// Run to completion within TOOL_TIMEOUT (killed otherwise).
fn run(cmd: &mut Command) -> Output {
    let shown = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {shown}: {e}"));
    let t0 = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if t0.elapsed() > TOOL_TIMEOUT {
            let _ = child.kill();
            panic!("{shown} timed out");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().unwrap()
}

fn run_ok(cmd: &mut Command) -> String {
    let shown = format!("{cmd:?}");
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{shown} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An 8 MiB sparse raw file with data in three places; returns its path.
fn sample_raw(dir: &Path) -> std::path::PathBuf {
    let p = dir.join("disk.raw");
    let f = RawFile::create(&p, 8 * MIB).unwrap();
    f.write_all_at(&pattern(256 * 1024, 1), 0).unwrap();
    f.write_all_at(&pattern(64 * 1024, 2), MIB).unwrap();
    f.write_all_at(&pattern(4096, 3), 5 * MIB).unwrap();
    f.flush().unwrap();
    p
}

fn raw_export(p: &Path, read_only: bool) -> Arc<dyn BlockDevice> {
    Arc::new(RawFile::open(p, read_only).unwrap())
}

/// Merge (start, len, data, zero) runs.
fn merged(v: Vec<(u64, u64, bool, bool)>) -> Vec<(u64, u64, bool, bool)> {
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in v {
        match out.last_mut() {
            Some(l) if l.0 + l.1 == e.0 && l.2 == e.2 && l.3 == e.3 => l.1 += e.1,
            _ => out.push(e),
        }
    }
    out
}

fn json_field<'a>(obj: &'a str, key: &str) -> &'a str {
    let k = format!("\"{key}\":");
    let at = obj.find(&k).unwrap_or_else(|| panic!("no {key} in {obj}")) + k.len();
    let rest = obj[at..].trim_start();
    let end = rest.find([',', '}']).unwrap_or(rest.len());
    rest[..end].trim()
}

/// `qemu-img map --output=json` as (start, len, data, zero).
fn qemu_map(p: &Path) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok(
        Command::new("qemu-img")
            .args(["map", "--output=json", "-f", "raw"])
            .arg(p),
    );
    let v = out
        .split('{')
        .skip(1)
        .map(|o| {
            (
                json_field(o, "start").parse().unwrap(),
                json_field(o, "length").parse().unwrap(),
                json_field(o, "data") == "true",
                json_field(o, "zero") == "true",
            )
        })
        .collect();
    merged(v)
}

/// `nbdinfo --map` (base:allocation) as (start, len, data, zero).
fn nbd_map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let out = run_ok(Command::new("nbdinfo").args(["--map", uri]));
    let v = out
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let flags: u32 = f[2].parse().unwrap();
            (
                f[0].parse().unwrap(),
                f[1].parse().unwrap(),
                flags & 1 == 0,
                flags & 2 != 0,
            )
        })
        .collect();
    merged(v)
}

#[test]
fn nbdinfo_list_and_json() {
    need("nbdinfo", "libnbd-bin");
    let cfg = ServerConfig {
        export_name: "disk0".into(),
        description: Some("vmdisk test export".into()),
        ..persistent(4)
    };
    let srv = TestServer::start(Arc::new(vmdisk_block::MemDisk::new(3 * MIB)), cfg);
    let uri = format!("nbd+unix:///?socket={}", srv.sock.display());
    let list = run_ok(Command::new("nbdinfo").args(["--list", &uri]));
    assert!(list.contains("disk0"), "{list}");
    assert!(list.contains("vmdisk test export"), "{list}");
    let uri0 = format!("nbd+unix:///disk0?socket={}", srv.sock.display());
    let info = run_ok(Command::new("nbdinfo").args(["--json", &uri0]));
    for want in [
        "\"export-size\": 3145728",
        "\"can_multi_conn\": true",
        "\"can_flush\": true",
        "\"can_fua\": true",
        "\"can_trim\": true",
        "\"can_zero\": true",
        "\"is_read_only\": false",
        "base:allocation",
    ] {
        assert!(info.contains(want), "missing {want} in {info}");
    }
    // `--can` exits 0 when the server can do it.
    run_ok(Command::new("nbdinfo").args(["--can", "structured-reply", &uri0]));
    srv.stop();
}

#[test]
fn nbdinfo_map_matches_qemu_img_map() {
    need("nbdinfo", "libnbd-bin");
    need("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let p = sample_raw(dir.path());
    let srv = TestServer::start(raw_export(&p, true), persistent(1));
    let nbd = nbd_map(&srv.uri());
    let qemu = qemu_map(&p);
    assert_eq!(nbd, qemu, "nbdinfo --map differs from qemu-img map");
    assert!(nbd.iter().any(|e| e.2) && nbd.iter().any(|e| !e.2));
    srv.stop();
}

#[test]
fn nbdcopy_one_shot_copies_the_file() {
    need("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let p = sample_raw(dir.path());
    let srv = TestServer::start(raw_export(&p, true), ServerConfig::default());
    let out = dir.path().join("out.raw");
    run_ok(Command::new("nbdcopy").arg(srv.uri()).arg(&out));
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&p).unwrap());
    // One-shot: the server leaves after its only client.
    let stats = srv.wait();
    assert_eq!(stats.connections, 1);
}

#[test]
fn qemu_img_compare_says_identical() {
    need("qemu-img", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let p = sample_raw(dir.path());
    let srv = TestServer::start(raw_export(&p, true), persistent(1));
    let out = run_ok(
        Command::new("qemu-img")
            .args(["compare", "-f", "raw", "-F", "raw"])
            .arg(&p)
            .arg(srv.uri()),
    );
    assert!(out.contains("Images are identical"), "{out}");
    srv.stop();
}

#[test]
fn qemu_io_writes_land_in_the_export() {
    need("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let p = sample_raw(dir.path());
    {
        let f = RawFile::open(&p, false).unwrap();
        f.write_all_at(&[0xaa; 64 * 1024], MIB).unwrap();
        f.write_all_at(&[0xbb; 64 * 1024], 2 * MIB).unwrap();
    }
    let srv = TestServer::start(raw_export(&p, false), ServerConfig::default());
    let out = run_ok(
        Command::new("qemu-io")
            .args(["-f", "raw", &srv.uri()])
            .args(["-c", "write -P 1 0 64k"])
            .args(["-c", "write -z 1M 64k"])
            .args(["-c", "discard 2M 64k"]),
    );
    assert!(!out.contains("failed"), "{out}");
    let stats = srv.wait();
    assert!(stats.bytes_written >= 64 * 1024, "{stats:?}");
    let data = std::fs::read(&p).unwrap();
    let k64 = 64 * 1024;
    assert!(data[..k64].iter().all(|&b| b == 1));
    let m = MIB as usize;
    assert!(data[m..m + k64].iter().all(|&b| b == 0), "write -z missing");
    assert!(
        data[2 * m..2 * m + k64].iter().all(|&b| b == 0),
        "discard missing"
    );
    // Untouched data stays.
    assert_eq!(&data[k64..256 * 1024], &pattern(256 * 1024, 1)[k64..]);
}

#[test]
fn read_only_export_refuses_qemu_io_writes() {
    need("qemu-io", "qemu-utils");
    let dir = tempfile::tempdir().unwrap();
    let p = sample_raw(dir.path());
    let before = std::fs::read(&p).unwrap();
    let cfg = ServerConfig {
        read_only: true,
        ..persistent(1)
    };
    let srv = TestServer::start(raw_export(&p, false), cfg);
    let out = run(Command::new("qemu-io")
        .args(["-f", "raw", &srv.uri()])
        .args(["-c", "write -P 1 0 64k"]));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success() || text.contains("failed") || text.contains("read-only"),
        "qemu-io write to a read-only export looked successful: {text}"
    );
    // With -r it reads fine.
    let ok = run_ok(
        Command::new("qemu-io")
            .args(["-r", "-f", "raw", &srv.uri()])
            .args(["-c", "read -P 0 7M 64k"]),
    );
    assert!(!ok.contains("failed"), "{ok}");
    srv.stop();
    assert_eq!(
        std::fs::read(&p).unwrap(),
        before,
        "read-only export changed"
    );
}

#[test]
fn parallel_nbdcopy_with_shared_4() {
    need("nbdcopy", "libnbd-bin");
    let dir = tempfile::tempdir().unwrap();
    let p = sample_raw(dir.path());
    let want = std::fs::read(&p).unwrap();
    let srv = TestServer::start(raw_export(&p, true), persistent(4));
    // One nbdcopy using 4 connections (the server advertises multi-conn).
    let out = dir.path().join("multi.raw");
    run_ok(
        Command::new("nbdcopy")
            .arg("--connections=4")
            .arg(srv.uri())
            .arg(&out),
    );
    assert_eq!(std::fs::read(&out).unwrap(), want);
    // Four nbdcopy processes at once, one connection each.
    let children: Vec<_> = (0..4)
        .map(|i| {
            let out = dir.path().join(format!("par{i}.raw"));
            let child = Command::new("nbdcopy")
                .arg("--connections=1")
                .arg(srv.uri())
                .arg(&out)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn nbdcopy");
            (out, child)
        })
        .collect();
    for (out, child) in children {
        let o = child.wait_with_output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(std::fs::read(&out).unwrap(), want);
    }
    let stats = srv.stop();
    assert!(stats.connections >= 5, "{stats:?}");
    assert_eq!(stats.refused, 0, "{stats:?}");
}
