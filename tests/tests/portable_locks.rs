//! Issue #20: image locks in the fallback mode macOS runs where the kernel has no OFD locks
//! (process-associated POSIX `F_SETLK`, as qemu's util/osdep.c falls back to), forced here
//! with `VMDISK_FORCE_PORTABLE=1` / `vmdisk_block::sys::force_portable`, judged by qemu-img,
//! qemu-io and qemu-nbd. qemu on Linux takes OFD locks; Linux keeps both kinds in one lock
//! table per file, as macOS does, so each side must see the other's.
//!
//! Every test also checks that the locks really are the POSIX kind (a process-associated
//! F_GETLK names the holder's pid; OFD locks have none), so a regression to OFD locks in
//! portable mode fails here instead of passing silently.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::portable::{portable_cmd, posix_lock_holder, vmdisk_portable};
use tests::*;

/// qemu's "write" permission byte and its "I do not share write" byte.
const QEMU_PERM_WRITE: i64 = 101;
const QEMU_SHARED_WRITE: i64 = 201;
/// qemu's "consistent read" permission byte.
const QEMU_PERM_READ: i64 = 100;
const WAIT: Duration = Duration::from_secs(20);

/// A 16 MiB qcow2 with data written by qemu, plus a raw source for convert.
fn fixture(d: &Path) -> (PathBuf, PathBuf) {
    let src = d.join("src.raw");
    make_sparse_raw(&src, 16 * MIB, 11, 12, 500 * KIB);
    let img = d.join("held.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&img)]).ok();
    (img, src)
}

/// `vmdisk serve IMG ARGS` in portable mode, once it holds POSIX locks on `bytes`.
fn portable_serve(d: &Path, img: &Path, args: &[&str], bytes: &[i64]) -> (Background, PathBuf) {
    let sock = d.join("serve.sock");
    let mut cmd = portable_cmd(&["serve"]);
    cmd.arg(img).arg("--socket").arg(&sock).args(args);
    let mut bg = Background::spawn(&mut cmd, d, "serve");
    let pid = bg.child.id() as i32;
    let held = wait_until(WAIT, || {
        bytes
            .iter()
            .all(|&b| posix_lock_holder(img, b) == Some(pid))
    });
    if !held {
        let alive = bg.alive();
        let got: Vec<_> = bytes.iter().map(|&b| posix_lock_holder(img, b)).collect();
        panic!(
            "portable vmdisk serve (pid {pid}) did not hold POSIX locks on {bytes:?} within \
             {} s (holders seen: {got:?}; -1 would be an OFD lock; alive: {alive}):\n  $ {}\n  \
             stderr: {}",
            WAIT.as_secs(),
            bg.cmdline,
            std::fs::read_to_string(d.join("serve.stderr")).unwrap_or_default()
        );
    }
    (bg, sock)
}

/// qemu-io write of 512 bytes at 0: must fail on qemu's lock.
fn qemu_io_write_refused(img: &Path, fmt: &str) -> Option<String> {
    let io = run(Command::new(require_tool("qemu-io"))
        .args(["-f", fmt, "-c", "write 0 512"])
        .arg(img));
    (!io.stderr.contains("lock") || io.stdout.contains("wrote"))
        .then(|| format!("qemu-io write should fail on qemu's lock:\n{io}"))
}

/// Does anyone (this process included) hold a lock on `byte` of `path` that conflicts with
/// an exclusive one? The probe's descriptor goes into `keep`.
fn held_in_process(path: &Path, byte: i64, keep: &mut Vec<std::fs::File>) -> bool {
    let f = std::fs::File::open(path).unwrap();
    let held = vmdisk_block::sys::get_lock(&f, vmdisk_block::sys::LockKind::Ofd, byte as u64)
        .unwrap()
        .is_some();
    keep.push(f);
    held
}

fn all_ok(errs: Vec<String>) {
    assert!(
        errs.is_empty(),
        "{} failure(s):\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );
}

#[test]
fn a_portable_vmdisk_writer_blocks_qemu_and_keeps_its_locks_while_serving() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Raw, so NBD zero requests reach RawFile::write_zeroes: the no-punch-hole fallback.
    let img = d.join("held.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&img), "8M"]).ok();
    qemu_io_fmt(&img, "raw", &["write -P 0x5a 0 8M".into()]);
    let (mut srv, sock) = portable_serve(
        d,
        &img,
        &["--persistent", "-f", "raw"],
        &[QEMU_PERM_WRITE, QEMU_SHARED_WRITE],
    );
    let pid = srv.child.id() as i32;
    let mut errs = Vec::new();
    // (Only writers: qemu's raw driver lets readers share a written image; qcow2 readers are
    // refused, see the reader test below and tests/tests/locks.rs.)
    errs.extend(qemu_io_write_refused(&img, "raw"));

    // Clients come and go and write, zero (unaligned, with and without unmap) and discard:
    // whatever descriptors the server opens and closes meanwhile, its locks must stay.
    let uri = format!("nbd+unix:///?socket={}", sock.display());
    for round in 0..3u64 {
        let base = round * 2 * MIB;
        let r = run(Command::new(require_tool("qemu-io"))
            .args(["-f", "raw"])
            .args([
                "-c",
                &format!("write -P 0x{:x} {} 4096", 0x61 + round, base + 100),
            ])
            .args([
                "-c",
                &format!("write -z -u {} {}", base + MIB + 100, 300 * KIB),
            ])
            .args([
                "-c",
                &format!("write -z {} {}", base + MIB + 400 * KIB + 7, 200 * KIB),
            ])
            .args([
                "-c",
                &format!("discard {} {}", base + MIB + 700 * KIB, 128 * KIB),
            ])
            .arg(&uri));
        if !r.success() || r.stdout.contains("failed") || r.stderr.contains("failed") {
            errs.push(format!("qemu-io over NBD, round {round}:\n{r}"));
        }
        for b in [QEMU_PERM_WRITE, QEMU_SHARED_WRITE] {
            let h = posix_lock_holder(&img, b);
            if h != Some(pid) {
                errs.push(format!(
                    "after client round {round}, byte {b} is held by {h:?}, not the server {pid}"
                ));
            }
        }
    }
    errs.extend(qemu_io_write_refused(&img, "raw"));
    all_ok(errs);
    srv.kill();

    // Released (the process is gone): qemu works, and reads what the clients wrote.
    assert!(
        wait_until(WAIT, || posix_lock_holder(&img, QEMU_PERM_WRITE).is_none()),
        "byte 101 still held after the server was killed"
    );
    qemu_img(&["info", "-f", "raw", s(&img)]).ok();
    let mut checks = Vec::new();
    for round in 0..3u64 {
        let base = round * 2 * MIB;
        checks.push(format!("read -P 0x{:x} {} 4096", 0x61 + round, base + 100));
        checks.push(format!("read -P 0x5a {} {}", base + MIB, 100));
        checks.push(format!("read -P 0 {} {}", base + MIB + 100, 300 * KIB));
        checks.push(format!(
            "read -P 0x5a {} {}",
            base + MIB + 300 * KIB + 100,
            100 * KIB - 93
        ));
        checks.push(format!(
            "read -P 0 {} {}",
            base + MIB + 400 * KIB + 7,
            200 * KIB
        ));
    }
    let r = qemu_io_fmt(&img, "raw", &checks);
    assert!(
        !r.stdout.contains("Pattern verification failed"),
        "the image does not hold what the clients wrote:\n{r}"
    );
    // The portable path writes zeros, it never punches: qemu-img map sees no hole.
    let map = qemu_img(&["map", "--output=json", "-f", "raw", s(&img)]).ok();
    let holes: Vec<_> = map
        .json()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == false)
        .cloned()
        .collect();
    assert!(
        holes.is_empty(),
        "the portable path punched holes (it has no hole punching): {holes:?}"
    );
}

#[test]
fn a_portable_vmdisk_reader_shares_with_qemu_readers_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = fixture(d);
    let (srv, _sock) = portable_serve(
        d,
        &img,
        &["-r", "--persistent"],
        &[QEMU_PERM_READ, QEMU_SHARED_WRITE],
    );
    let pid = srv.child.id() as i32;
    let mut errs = Vec::new();
    let h = posix_lock_holder(&img, QEMU_PERM_WRITE);
    if h.is_some() {
        errs.push(format!(
            "a read-only server holds the write byte 101 ({h:?})"
        ));
    }
    let info = qemu_img(&["info", s(&img)]);
    if !info.success() {
        errs.push(format!(
            "qemu-img info should share an image vmdisk only reads:\n{info}"
        ));
    }
    errs.extend(qemu_io_write_refused(&img, "qcow2"));
    // qemu's own reader came and went; the server's locks are untouched by it.
    if posix_lock_holder(&img, QEMU_SHARED_WRITE) != Some(pid) {
        errs.push("the server lost its lock on byte 201".into());
    }
    all_ok(errs);
    drop(srv);
    assert!(wait_until(WAIT, || posix_lock_holder(
        &img,
        QEMU_SHARED_WRITE
    )
    .is_none()));
    qemu_io(&img, &["write -P 0x42 0 512".into()]);
}

/// qemu-nbd serving `img` read-write: it holds qemu's (OFD) write lock until dropped.
fn qemu_holds(d: &Path, img: &Path) -> Background {
    let sock = d.join("nbd.sock");
    let bg = Background::spawn(
        Command::new(require_tool("qemu-nbd"))
            .arg("--socket")
            .arg(&sock)
            .args(["-f", "qcow2"])
            .arg(img),
        d,
        "qemu-nbd",
    );
    assert!(
        wait_until(WAIT, || lock_byte_held(img, QEMU_PERM_WRITE)
            && lock_byte_held(img, QEMU_SHARED_WRITE)),
        "TEST BUG: qemu-nbd did not take the write lock within {} s:\n  $ {}",
        WAIT.as_secs(),
        bg.cmdline
    );
    bg
}

#[test]
fn qemu_writer_blocks_every_portable_vmdisk_write_until_it_lets_go() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, src) = fixture(d);
    let i = s(&img);
    let writes: Vec<Vec<&str>> = vec![
        vec!["create", "-f", "qcow2", i, "16M"],
        vec!["convert", "-O", "qcow2", s(&src), i],
        vec!["snapshot", "create", i, "s1"],
        vec!["resize", i, "32M"],
    ];
    let mut holder = qemu_holds(d, &img);
    let sha = sha256(&img);
    let mut errs = Vec::new();
    for args in &writes {
        let r = vmdisk_portable(args);
        if r.success() || !r.all_output_lower().contains("lock") {
            errs.push(format!(
                "expected a refusal naming the lock while qemu-nbd holds the image:\n{r}"
            ));
        }
    }
    if sha256(&img) != sha {
        errs.push("the image changed while qemu held it".into());
    }
    all_ok(errs);
    holder.kill();
    assert!(wait_until(WAIT, || !lock_byte_held(&img, QEMU_PERM_WRITE)));
    // The refusals were the lock: the same commands work now.
    for args in &writes {
        vmdisk_portable(args).ok();
    }
    assert_qemu_check_clean(&img, "after the portable vmdisk writes");
}

#[test]
fn an_image_open_in_process_keeps_its_posix_locks_across_backing_and_probe_opens() {
    // This test binary runs the portable paths for its whole process (every test in this
    // file wants them). Opening an overlay opens, probes and closes several descriptors of
    // the files: none of those closes may drop the process's locks.
    vmdisk_block::sys::force_portable(true);
    assert_eq!(
        vmdisk_block::sys::lock_kind(),
        vmdisk_block::sys::LockKind::Posix
    );
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (base, _) = fixture(d);
    let ov = d.join("ov.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "qcow2",
        s(&ov),
    ])
    .ok();
    let image = vmdisk_image::open(
        &ov,
        &vmdisk_image::OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open read-write: {}", error_chain(&e)));
    // More descriptors of both files come and go in this process, as vmdisk's own code
    // opens them.
    for p in [&ov, &base] {
        drop(vmdisk_block::RawFile::open(p, true).unwrap());
    }
    let mut errs = Vec::new();
    // An OFD probe is another lock owner, so it sees this process's POSIX locks. Its
    // descriptor stays open until the image is closed: closing it would drop them.
    let mut probes = Vec::new();
    for (p, b) in [
        (&ov, QEMU_PERM_WRITE),
        (&ov, QEMU_SHARED_WRITE),
        (&base, QEMU_PERM_READ),
    ] {
        if !held_in_process(p, b, &mut probes) {
            errs.push(format!("byte {b} of {} is not held", p.display()));
        }
    }
    let info = qemu_img(&["info", s(&ov)]);
    if info.success() || !info.stderr.contains("lock") {
        errs.push(format!(
            "qemu-img info of the overlay should fail on the lock:\n{info}"
        ));
    }
    errs.extend(qemu_io_write_refused(&ov, "qcow2"));
    errs.extend(qemu_io_write_refused(&base, "qcow2"));
    image
        .close()
        .unwrap_or_else(|e| panic!("close: {}", error_chain(&e)));
    drop(probes);
    all_ok(errs);
    assert!(
        wait_until(WAIT, || !lock_byte_held(&ov, QEMU_PERM_WRITE)
            && !lock_byte_held(&base, QEMU_PERM_READ)),
        "locks still held after close"
    );
    qemu_io(&ov, &["write -P 0x42 0 512".into()]);
    qemu_io(&base, &["write -P 0x43 0 512".into()]);
}
