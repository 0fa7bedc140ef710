//! `vmdisk serve --tls-cert/--tls-key` (TLS required), judged by libnbd (`nbdinfo`, `nbdcopy`
//! with `nbds://` URIs and a `tls-certificates=DIR` holding ca-cert.pem, client-cert.pem,
//! client-key.pem) and qemu: the right certificates connect, a plaintext client, a client
//! trusting another CA and (with `--tls-client-ca`) a client without a certificate are
//! refused. Certificates are made per test with the `openssl` CLI.

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::*;

const EXIT: Duration = Duration::from_secs(20);

// ---------------------------------------------------------------------------------------------
// Certificates (openssl CLI)
// ---------------------------------------------------------------------------------------------

/// A CA, a server certificate it signed (localhost and 127.0.0.1), a client certificate it
/// signed, and an unrelated CA, laid out as the server flags and libnbd's
/// `tls-certificates=DIR` expect.
struct Pki {
    server_cert: PathBuf,
    server_key: PathBuf,
    /// The CA certificate alone (for `--tls-client-ca`).
    ca_cert: PathBuf,
    /// Client dir: ca-cert.pem, client-cert.pem, client-key.pem.
    with_client_cert: PathBuf,
    /// Client dir: ca-cert.pem only.
    ca_only: PathBuf,
    /// Client dir: another CA's ca-cert.pem only.
    other_ca: PathBuf,
    /// Client dir: the right ca-cert.pem, but a client certificate from the other CA.
    foreign_client_cert: PathBuf,
}

fn openssl(cwd: &Path, args: &[&str]) {
    run(Command::new(require_guest_tool("openssl"))
        .current_dir(cwd)
        .args(args))
    .ok();
}

/// EC P-256 keys: quick to make, understood by rustls and GnuTLS alike.
const NEWKEY: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

/// A self-signed CA in `dir` (ca-key.pem, ca-cert.pem).
fn make_ca(dir: &Path, cn: &str) {
    let subj = format!("/CN={cn}");
    let mut args = vec!["req", "-x509"];
    args.extend_from_slice(NEWKEY);
    args.extend_from_slice(&[
        "-nodes",
        "-keyout",
        "ca-key.pem",
        "-out",
        "ca-cert.pem",
        "-days",
        "2",
        "-subj",
        &subj,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &args);
}

/// A key and a certificate for `name` signed by the CA in `ca_dir`, with extensions `ext`.
fn make_leaf(ca_dir: &Path, out: &Path, name: &str, cn: &str, serial: &str, ext: &str) {
    let key = out.join(format!("{name}-key.pem"));
    let csr = out.join(format!("{name}.csr"));
    let cert = out.join(format!("{name}-cert.pem"));
    let extfile = out.join(format!("{name}.ext"));
    write_file(&extfile, ext.as_bytes());
    let subj = format!("/CN={cn}");
    let mut args = vec!["req", "-new"];
    args.extend_from_slice(NEWKEY);
    args.extend_from_slice(&[
        "-nodes",
        "-keyout",
        s(&key),
        "-out",
        s(&csr),
        "-subj",
        &subj,
    ]);
    openssl(ca_dir, &args);
    openssl(
        ca_dir,
        &[
            "x509",
            "-req",
            "-in",
            s(&csr),
            "-CA",
            "ca-cert.pem",
            "-CAkey",
            "ca-key.pem",
            "-set_serial",
            serial,
            "-days",
            "2",
            "-extfile",
            s(&extfile),
            "-out",
            s(&cert),
        ],
    );
}

const SERVER_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                          extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n";
const CLIENT_EXT: &str = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
                          extendedKeyUsage=clientAuth\n";

impl Pki {
    fn new(d: &Path) -> Pki {
        let ca = d.join("ca");
        let other = d.join("other-ca");
        let good = d.join("client-good");
        let ca_only = d.join("client-ca-only");
        let other_dir = d.join("client-other-ca");
        let foreign = d.join("client-foreign-cert");
        for p in [&ca, &other, &good, &ca_only, &other_dir, &foreign] {
            fs::create_dir_all(p).unwrap();
        }
        make_ca(&ca, "vmdisk test CA");
        make_ca(&other, "someone else's CA");
        make_leaf(&ca, &ca, "server", "localhost", "1", SERVER_EXT);
        make_leaf(&ca, &good, "client", "vmdisk test client", "2", CLIENT_EXT);
        make_leaf(&other, &foreign, "client", "other client", "3", CLIENT_EXT);
        for dir in [&good, &ca_only, &foreign] {
            fs::copy(ca.join("ca-cert.pem"), dir.join("ca-cert.pem")).unwrap();
        }
        fs::copy(other.join("ca-cert.pem"), other_dir.join("ca-cert.pem")).unwrap();
        Pki {
            server_cert: ca.join("server-cert.pem"),
            server_key: ca.join("server-key.pem"),
            ca_cert: ca.join("ca-cert.pem"),
            with_client_cert: good,
            ca_only,
            other_ca: other_dir,
            foreign_client_cert: foreign,
        }
    }

    /// `--tls-cert C --tls-key K`.
    fn flags(&self) -> Vec<String> {
        vec![
            "--tls-cert".into(),
            s(&self.server_cert).into(),
            "--tls-key".into(),
            s(&self.server_key).into(),
        ]
    }
}

fn unix_uri(srv: &Serve, certs: &Path) -> String {
    format!(
        "nbds+unix:///?socket={}&tls-certificates={}",
        srv.socket.display(),
        certs.display()
    )
}

/// A 64 MiB qcow2 with data, zeros and holes, made by qemu.
fn image(d: &Path) -> PathBuf {
    let img = d.join("img.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&img), "64M"]).ok();
    qemu_io(
        &img,
        &[
            "write -P 0x11 0 1M".into(),
            "write -P 0x22 10M 3M".into(),
            "write -z 20M 1M".into(),
            "write -P 0x23 33M 5000".into(),
            "write -P 0x24 60M 4M".into(),
        ],
    );
    img
}

fn start(img: &Path, pki: &Pki, extra: &[&str], d: &Path) -> Serve {
    let mut args: Vec<String> = pki.flags();
    args.extend(extra.iter().map(|a| a.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Serve::start(img, &args, d)
}

fn server_log(d: &Path, stream: &str) -> String {
    // Serve names its logs serveN.{stdout,stderr}; gather them all for messages.
    let mut out = String::new();
    for e in fs::read_dir(d).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with("serve") && name.ends_with(stream) {
            out.push_str(&fs::read_to_string(e.path()).unwrap_or_default());
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn tls_unix_export_reads_like_qemu_img_convert() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(d);
    let img = image(d);
    let reference = d.join("reference.raw");
    let want = qemu_raw_sha(d, s(&img), &reference);

    // --shared 4 advertises multi-conn, so nbdcopy opens 4 TLS connections at once.
    let mut srv = start(&img, &pki, &["--persistent", "--shared", "4"], d);
    let uri = unix_uri(&srv, &pki.ca_only);
    let r = guest_tool("nbdinfo", &["--json", &uri]);
    assert!(
        r.success(),
        "nbdinfo over TLS failed:\n{r}\n{}",
        srv.describe()
    );
    let v = r.json();
    assert_eq!(v["TLS"], true, "nbdinfo did not negotiate TLS: {v:#}");
    assert_eq!(
        v["exports"][0]["export-size"].as_u64(),
        Some(64 * MIB),
        "export size over TLS: {v:#}"
    );

    let copy = d.join("copy.raw");
    let r = guest_tool("nbdcopy", &[uri.as_str(), s(&copy)]);
    assert!(
        r.success(),
        "nbdcopy over TLS failed:\n{r}\n{}",
        srv.describe()
    );
    assert_eq!(sha256(&copy), want, "nbdcopy over TLS != qemu-img convert");

    // The server announced the TLS URI scheme.
    assert!(
        server_log(d, "stderr").contains("at nbds+unix:///?socket="),
        "vmdisk serve did not print an nbds+unix:// URI:\n{}",
        srv.describe()
    );
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
    assert_qemu_check_clean(&img, "after serving over TLS");
}

#[test]
fn plaintext_clients_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(d);
    let img = image(d);
    let mut srv = start(&img, &pki, &["--persistent"], d);
    let plain = srv.uri();

    // libnbd prints the server's refusal text in its debug output.
    let r = run(Command::new(require_guest_tool("nbdinfo"))
        .env("LIBNBD_DEBUG", "1")
        .arg(&plain));
    assert!(
        !r.success(),
        "plaintext nbdinfo was served by a TLS-only server:\n{r}"
    );
    assert!(
        r.stderr.contains("TLS is required"),
        "the refusal does not say TLS is required:\n{r}"
    );
    // qemu names the protocol error itself.
    let r = qemu_img(&["info", &plain]);
    assert!(!r.success(), "plaintext qemu-img was served:\n{r}");
    assert!(
        r.stderr.contains("TLS"),
        "qemu-img's refusal does not mention TLS:\n{r}"
    );
    // nbdcopy fails too, and writes nothing.
    let out = d.join("plain.raw");
    let r = guest_tool("nbdcopy", &[plain.as_str(), s(&out)]);
    assert!(!r.success(), "plaintext nbdcopy was served:\n{r}");

    assert!(
        srv.bg.alive(),
        "a refused client stopped the server:\n{}",
        srv.describe()
    );
    let r = guest_tool("nbdinfo", &[unix_uri(&srv, &pki.ca_only)]);
    assert!(
        r.success(),
        "TLS client after refusals:\n{r}\n{}",
        srv.describe()
    );
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
}

/// `qemu-img info` of the unix-socket export through qemu's TLS client, trusting the CA in
/// `certs` and expecting the server to be `hostname`.
fn qemu_tls_info(srv: &Serve, certs: &Path, hostname: &str) -> Run {
    qemu_img(&[
        "info",
        "--object",
        &format!(
            "tls-creds-x509,id=tls0,endpoint=client,dir={}",
            certs.display()
        ),
        "--image-opts",
        &format!(
            "driver=nbd,path={},tls-creds=tls0,tls-hostname={hostname}",
            srv.socket.display()
        ),
    ])
}

/// libnbd verifies the server's certificate only over TCP (its documented default: over a
/// unix socket it encrypts but does not check the peer), so the unix-socket half of this
/// test uses qemu's client, which always verifies.
#[test]
fn a_client_trusting_another_ca_fails_verification() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(d);
    let img = image(d);

    // Unix socket, judged by qemu.
    let mut srv = start(&img, &pki, &["--persistent"], d);
    let r = qemu_tls_info(&srv, &pki.other_ca, "localhost");
    assert!(!r.success(), "qemu trusting another CA connected:\n{r}");
    assert!(
        r.all_output_lower().contains("issuer"),
        "qemu's failure does not point at the certificate's issuer:\n{r}"
    );
    let r = qemu_tls_info(&srv, &pki.ca_only, "not-this-server.example");
    assert!(
        !r.success(),
        "a certificate for another host name was accepted:\n{r}"
    );
    let r = qemu_tls_info(&srv, &pki.ca_only, "localhost");
    assert!(
        r.success(),
        "qemu with the right CA:\n{r}\n{}",
        srv.describe()
    );
    assert!(
        r.stdout.contains("67108864"),
        "qemu-img info size over TLS:\n{r}"
    );
    assert!(
        srv.bg.alive(),
        "a failed handshake stopped the server:\n{}",
        srv.describe()
    );
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");

    // TCP, judged by libnbd (which, unlike qemu, rejects the certificate inside the
    // handshake, so the server sees the handshake fail rather than a client leaving).
    let mut args = pki.flags();
    args.push("--persistent".into());
    let mut tcp = TcpServe::start(&img, &args, d);
    let r = guest_tool("nbdinfo", &[tcp.uri(&pki.other_ca)]);
    assert!(!r.success(), "nbdinfo trusting another CA connected:\n{r}");
    assert!(
        r.all_output_lower().contains("certificate"),
        "nbdinfo's failure does not point at the certificate:\n{r}"
    );
    let r = guest_tool("nbdinfo", &[tcp.uri(&pki.ca_only)]);
    assert!(
        r.success(),
        "nbdinfo with the right CA:\n{r}\n{}",
        tcp.describe()
    );
    tcp.stop();
    assert!(
        tcp.describe().contains("1 TLS handshake(s) failed"),
        "the exit summary does not count the failed handshake:\n{}",
        tcp.describe()
    );
}

#[test]
fn client_certificates_required_with_tls_client_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(d);
    let img = image(d);
    let reference = d.join("reference.raw");
    let want = qemu_raw_sha(d, s(&img), &reference);
    let mut srv = start(
        &img,
        &pki,
        &["--tls-client-ca", s(&pki.ca_cert), "--persistent", "-r"],
        d,
    );

    let r = guest_tool("nbdinfo", &[unix_uri(&srv, &pki.ca_only)]);
    assert!(
        !r.success(),
        "a client without a certificate connected:\n{r}"
    );
    let r = guest_tool("nbdinfo", &[unix_uri(&srv, &pki.foreign_client_cert)]);
    assert!(
        !r.success(),
        "a client with another CA's certificate connected:\n{r}"
    );

    let uri = unix_uri(&srv, &pki.with_client_cert);
    let r = guest_tool("nbdinfo", &["--json", &uri]);
    assert!(
        r.success(),
        "client with its certificate:\n{r}\n{}",
        srv.describe()
    );
    assert_eq!(
        r.json()["exports"][0]["export-size"].as_u64(),
        Some(64 * MIB)
    );
    let copy = d.join("copy.raw");
    let r = guest_tool("nbdcopy", &[uri.as_str(), s(&copy)]);
    assert!(
        r.success(),
        "nbdcopy with a client certificate:\n{r}\n{}",
        srv.describe()
    );
    assert_eq!(
        sha256(&copy),
        want,
        "nbdcopy over mutual TLS != qemu-img convert"
    );
    srv.sigterm();
    srv.assert_exits_ok(EXIT, "SIGTERM");
}

/// A `vmdisk serve --tcp` child (the `Serve` helper is unix-socket only).
struct TcpServe {
    bg: Background,
    addr: SocketAddr,
    log: PathBuf,
}

impl TcpServe {
    fn start(img: &Path, args: &[String], d: &Path) -> TcpServe {
        // A port the kernel just handed out; freed again for the server to take.
        let port = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut cmd = Command::new(vmdisk_bin());
        cmd.arg("serve")
            .arg(img)
            .arg("--tcp")
            .arg(addr.to_string())
            .args(args);
        let mut bg = Background::spawn(&mut cmd, d, "tcpserve");
        // --persistent: the probe connection does not end the server.
        let up = wait_until(Duration::from_secs(30), || {
            TcpStream::connect(addr).is_ok() || !bg.alive()
        });
        let log = d.join("tcpserve.stderr");
        assert!(
            up && bg.alive(),
            "vmdisk serve --tcp {addr} did not come up:\n{}",
            fs::read_to_string(&log).unwrap_or_default()
        );
        TcpServe { bg, addr, log }
    }

    fn uri(&self, certs: &Path) -> String {
        format!("nbds://{}/?tls-certificates={}", self.addr, certs.display())
    }

    fn describe(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGTERM, then panic unless the server exits 0 in time.
    #[track_caller]
    fn stop(&mut self) {
        assert!(self.bg.alive(), "server died:\n{}", self.describe());
        // SAFETY: kill(2) on our own child, which alive() just found not yet reaped, so its
        // pid cannot have been reused.
        unsafe { libc::kill(self.bg.child.id() as libc::pid_t, libc::SIGTERM) };
        let mut status = None;
        wait_until(EXIT, || {
            status = self.bg.child.try_wait().ok().flatten();
            status.is_some()
        });
        assert!(
            status.is_some_and(|s| s.success()),
            "vmdisk serve --tcp did not exit 0 on SIGTERM:\n{}",
            self.describe()
        );
    }
}

#[test]
fn tls_over_tcp_on_loopback() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(d);
    let img = image(d);
    let reference = d.join("reference.raw");
    let want = qemu_raw_sha(d, s(&img), &reference);
    let mut args = pki.flags();
    args.push("--persistent".into());
    let mut srv = TcpServe::start(&img, &args, d);

    let uri = srv.uri(&pki.ca_only);
    let r = guest_tool("nbdinfo", &["--json", &uri]);
    assert!(
        r.success(),
        "nbdinfo over TLS/TCP:\n{r}\n{}",
        srv.describe()
    );
    assert_eq!(r.json()["TLS"], true);
    let copy = d.join("copy.raw");
    let r = guest_tool("nbdcopy", &[uri.as_str(), s(&copy)]);
    assert!(
        r.success(),
        "nbdcopy over TLS/TCP:\n{r}\n{}",
        srv.describe()
    );
    assert_eq!(
        sha256(&copy),
        want,
        "nbdcopy over TLS/TCP != qemu-img convert"
    );

    let plain = format!("nbd://{}/", srv.addr);
    let r = run(Command::new(require_guest_tool("nbdinfo"))
        .env("LIBNBD_DEBUG", "1")
        .arg(&plain));
    assert!(
        !r.success() && r.stderr.contains("TLS is required"),
        "plaintext TCP client was served, or not told why:\n{r}"
    );

    assert!(
        srv.describe().contains(&format!("at nbds://{}/", srv.addr)),
        "vmdisk serve did not print an nbds:// URI:\n{}",
        srv.describe()
    );
    srv.stop();
}

#[test]
fn tls_flag_misuse_is_refused_with_a_reason() {
    let tmp = tempfile::tempdir().unwrap();
    let d = tmp.path();
    let pki = Pki::new(d);
    let img = d.join("img.raw");
    qemu_img(&["create", "-q", "-f", "raw", s(&img), "1M"]).ok();
    let sock = d.join("never.sock");
    let serve = |extra: &[&str]| {
        let mut args = vec!["serve", s(&img), "--socket", s(&sock)];
        args.extend_from_slice(extra);
        vmdisk(&args)
    };

    let psk = d.join("keys.psk");
    write_file(&psk, b"alice:0123456789abcdef\n");
    let r = serve(&["--tls-psk", s(&psk)]);
    assert!(
        !r.success()
            && r.stderr
                .contains("not supported: rustls has no external PSK"),
        "--tls-psk must fail and say why:\n{r}"
    );
    let r = serve(&["--tls-cert", s(&pki.server_cert)]);
    assert!(
        !r.success() && r.stderr.contains("--tls-key"),
        "--tls-cert without --tls-key:\n{r}"
    );
    let r = serve(&["--tls-client-ca", s(&pki.ca_cert)]);
    assert!(!r.success(), "--tls-client-ca without a certificate:\n{r}");
    // A key that is not the certificate's.
    let wrong_key = pki.with_client_cert.join("client-key.pem");
    let r = serve(&[
        "--tls-cert",
        s(&pki.server_cert),
        "--tls-key",
        s(&wrong_key),
    ]);
    assert!(
        !r.success() && r.stderr.contains("server-cert.pem"),
        "a mismatched key must be refused, naming the files:\n{r}"
    );
    // Not PEM at all.
    let r = serve(&["--tls-cert", s(&img), "--tls-key", s(&pki.server_key)]);
    assert!(
        !r.success() && r.all_output_lower().contains("certificate"),
        "a certificate file without a certificate:\n{r}"
    );
    assert!(!sock.exists(), "a refused serve left a socket behind");
}
