//! `vmdisk serve` and clients that stall in the handshake, judged by qemu-io and libnbd's
//! nbdsh: with the default `--shared 1`, idle or half-negotiated connections must not keep a
//! new client out (before: about 30 s; qemu-nbd: its 10 s handshake limit), the server drops
//! them after a bounded time, and `--shared 0` is refused instead of serving nobody.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::nbdsh::nbdsh;
use tests::*;
use vmdisk_nbd::proto::*;

const EXIT: Duration = Duration::from_secs(20);
/// How long a new client may take to be served while others sit idle in the handshake. They
/// hold no slot, so it is served at once; the bound leaves room for a loaded 2-core machine
/// starting qemu-io or Python, and is half of qemu-nbd's 10 s handshake limit (the time an
/// idle client would have held the only slot).
const SERVED_WHILE_OTHERS_IDLE: Duration = Duration::from_secs(5);
/// Longest the server may keep a silent client: its handshake limit (10 s) plus slack.
const SILENT_CLIENT_DROPPED: Duration = Duration::from_secs(20);

/// Stalled clients of every kind: connected and silent, greeted and silent, flags sent and
/// silent, half-way through an option's data.
fn stalled_clients(sock: &Path) -> Vec<UnixStream> {
    let mut v = vec![UnixStream::connect(sock).unwrap()];
    for stage in 0..3 {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(SILENT_CLIENT_DROPPED)).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g)
            .expect("a stalled client is still greeted");
        assert_eq!(
            decode_greeting(&g),
            Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        );
        if stage >= 1 {
            let flags = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
            s.write_all(&flags.to_be_bytes()).unwrap();
        }
        if stage == 2 {
            let h = encode_option_header(OptionHeader {
                option: OPT_GO,
                len: 100,
            });
            s.write_all(&h).unwrap();
            s.write_all(&[0u8; 30]).unwrap();
        }
        v.push(s);
    }
    v
}

fn raw_image(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("disk.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&img), "8M"]).ok();
    qemu_io_fmt(&img, "raw", &["write -P 0x3c 0 1M".into()]);
    img
}

#[test]
fn stalled_handshakes_do_not_keep_new_clients_out() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = raw_image(d);
    // The default --shared 1.
    let mut srv = Serve::start(&img, &["--persistent", "-f", "raw"], d);
    let uri = srv.uri();
    let mut stalled = stalled_clients(&srv.socket);

    let t0 = Instant::now();
    let r = run(Command::new(require_tool("qemu-io"))
        .args(["-r", "-f", "raw", "-c", "read -P 0x3c 0 64k"])
        .arg(&uri));
    let qemu_took = t0.elapsed();
    assert!(
        r.success() && !r.stdout.contains("failed") && !r.stderr.contains("failed"),
        "qemu-io while others stall:\n{r}"
    );
    let t0 = Instant::now();
    let r = nbdsh(&uri, "assert h.pread(4096, 0) == b'\\x3c' * 4096");
    let nbdsh_took = t0.elapsed();
    assert!(r.success(), "nbdsh while others stall:\n{r}");
    eprintln!("served while 4 clients stall: qemu-io {qemu_took:?}, nbdsh {nbdsh_took:?}");
    for (who, took) in [("qemu-io", qemu_took), ("nbdsh", nbdsh_took)] {
        assert!(
            took < SERVED_WHILE_OTHERS_IDLE,
            "{who} took {took:?} to be served while 4 clients stalled in the handshake \
             (bound {SERVED_WHILE_OTHERS_IDLE:?})\n{}",
            srv.describe()
        );
    }

    // The stalled ones are dropped after the handshake limit, not kept for ever.
    let t0 = Instant::now();
    for s in &mut stalled {
        let mut buf = [0u8; 64];
        let left = SILENT_CLIENT_DROPPED.saturating_sub(t0.elapsed());
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            // The first one never read its greeting: it is still there to read.
            Ok(n) if n == GREETING_LEN => match s.read(&mut buf) {
                Ok(0) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
                other => panic!("a silent client was not dropped: {other:?}"),
            },
            other => panic!(
                "a stalled client was not dropped within {SILENT_CLIENT_DROPPED:?}: {other:?}"
            ),
        }
    }
    let dropped_after = t0.elapsed();
    eprintln!("stalled clients dropped {dropped_after:?} after the first good client");
    assert!(srv.bg.alive(), "the server exited:\n{}", srv.describe());
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
}

#[test]
fn shared_zero_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let img = raw_image(d);
    let sock = d.join("never.sock");
    let r = run_with_timeout(
        Command::new(vmdisk_bin()).args(["serve", s(&img), "--socket", s(&sock), "--shared", "0"]),
        EXIT,
    );
    assert_eq!(r.code(), 1, "--shared 0 must fail with exit 1:\n{r}");
    assert!(
        r.stderr.contains("--shared") && r.stderr.contains(">= 1"),
        "the error must name --shared and the way out:\n{r}"
    );
    assert!(!sock.exists(), "--shared 0 created its socket");
}
