//! TLS-required serving (the protocol's FORCEDTLS mode), driven byte by byte: options before
//! NBD_OPT_STARTTLS are refused with NBD_REP_ERR_TLS_REQD, a plaintext NBD_OPT_EXPORT_NAME
//! closes the connection, negotiation continues inside TLS after the ACK, and a failed
//! handshake (garbage, an untrusted server, a missing client certificate) ends only that
//! connection. Certificates are made in-process with rcgen; the client side is rustls.

mod common;

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{pattern, TestServer};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use vmdisk_block::{BlockDevice, MemDisk};
use vmdisk_nbd::proto::*;
use vmdisk_nbd::tls::{server_config, TlsError, TlsFiles};
use vmdisk_nbd::ServerConfig;

const MIB: u64 = 1 << 20;
/// Longest the server may take to answer or close.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
const C_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

// ---------------------------------------------------------------------------------------------
// Certificates
// ---------------------------------------------------------------------------------------------

/// A CA, a server certificate it signed (localhost, 127.0.0.1), a client certificate it
/// signed, and an unrelated CA; PEM files of the server side in `dir`.
struct Pki {
    dir: tempfile::TempDir,
    ca: CertificateDer<'static>,
    other_ca: CertificateDer<'static>,
    client_chain: Vec<CertificateDer<'static>>,
    client_key: PrivatePkcs8KeyDer<'static>,
}

fn ca_params(name: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, name);
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let ca_p = ca_params("vmdisk test CA");
        let ca = ca_p.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca_p, ca_key);
        let other_key = KeyPair::generate().unwrap();
        let other_ca = ca_params("someone else's CA")
            .self_signed(&other_key)
            .unwrap();

        let srv_key = KeyPair::generate().unwrap();
        let mut srv_p =
            CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
        srv_p
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        srv_p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let srv = srv_p.signed_by(&srv_key, &issuer).unwrap();

        let cli_key = KeyPair::generate().unwrap();
        let mut cli_p = CertificateParams::default();
        cli_p.distinguished_name.push(DnType::CommonName, "client");
        cli_p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let cli = cli_p.signed_by(&cli_key, &issuer).unwrap();

        let d = dir.path();
        std::fs::write(d.join("server-cert.pem"), srv.pem() + &ca.pem()).unwrap();
        std::fs::write(d.join("server-key.pem"), srv_key.serialize_pem()).unwrap();
        std::fs::write(d.join("ca-cert.pem"), ca.pem()).unwrap();
        Pki {
            dir,
            ca: ca.der().clone(),
            other_ca: other_ca.der().clone(),
            client_chain: vec![cli.der().clone()],
            client_key: PrivatePkcs8KeyDer::from(cli_key.serialize_der()),
        }
    }

    fn files(&self, client_ca: bool) -> TlsFiles {
        let d = self.dir.path();
        TlsFiles {
            cert_chain: d.join("server-cert.pem"),
            key: d.join("server-key.pem"),
            client_ca: client_ca.then(|| d.join("ca-cert.pem")),
        }
    }

    fn server(&self, dev: Arc<dyn BlockDevice>, client_ca: bool) -> TestServer {
        let cfg = ServerConfig {
            persistent: true,
            max_connections: 4,
            tls: Some(server_config(&self.files(client_ca)).expect("server TLS config")),
            ..ServerConfig::default()
        };
        TestServer::start(dev, cfg)
    }

    /// A client trusting `ca`, presenting the client certificate when `with_cert`.
    fn client(&self, ca: &CertificateDer<'static>, with_cert: bool) -> Arc<ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = RootCertStore::empty();
        roots.add(ca.clone()).unwrap();
        let b = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = if with_cert {
            let key = PrivateKeyDer::Pkcs8(self.client_key.clone_key());
            b.with_client_auth_cert(self.client_chain.clone(), key)
                .unwrap()
        } else {
            b.with_no_client_auth()
        };
        Arc::new(cfg)
    }
}

// ---------------------------------------------------------------------------------------------
// A raw client, plaintext or TLS
// ---------------------------------------------------------------------------------------------

struct Raw<S> {
    s: S,
}

type TlsRaw = Raw<StreamOwned<ClientConnection, UnixStream>>;

impl Raw<UnixStream> {
    /// Connect, read the greeting, send the client flags.
    fn hello(sock: &Path) -> Raw<UnixStream> {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        assert_eq!(
            decode_greeting(&g),
            Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        );
        s.write_all(&C_FLAGS.to_be_bytes()).unwrap();
        Raw { s }
    }

    /// Send NBD_OPT_STARTTLS, expect the ACK, and run the TLS handshake.
    fn start_tls(mut self, cfg: Arc<ClientConfig>) -> io::Result<TlsRaw> {
        self.opt(OPT_STARTTLS, &[]);
        let (opt, rep, data) = self.reply();
        assert_eq!(
            (opt, rep, data),
            (OPT_STARTTLS, REP_ACK, vec![]),
            "STARTTLS"
        );
        self.handshake(cfg)
    }

    /// Run the TLS handshake on this socket (STARTTLS already acknowledged).
    fn handshake(self, cfg: Arc<ClientConfig>) -> io::Result<TlsRaw> {
        let name = ServerName::try_from("localhost").unwrap();
        let mut conn = ClientConnection::new(cfg, name).map_err(io::Error::other)?;
        let mut sock = self.s;
        while conn.is_handshaking() {
            conn.complete_io(&mut sock)?;
        }
        Ok(Raw {
            s: StreamOwned::new(conn, sock),
        })
    }
}

impl<S: Read + Write> Raw<S> {
    fn opt(&mut self, option: u32, data: &[u8]) {
        let h = encode_option_header(OptionHeader {
            option,
            len: data.len() as u32,
        });
        self.s.write_all(&h).unwrap();
        self.s.write_all(data).unwrap();
        self.s.flush().unwrap();
    }

    fn try_reply(&mut self) -> io::Result<(u32, u32, Vec<u8>)> {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h)?;
        let h = decode_option_reply_header(&h).expect("option reply magic");
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d)?;
        Ok((h.option, h.reply, d))
    }

    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        self.try_reply().expect("option reply")
    }

    /// NBD_OPT_GO for the default export; returns the export size.
    fn go(&mut self) -> u64 {
        self.opt(OPT_GO, &go_data(""));
        let mut size = None;
        loop {
            let (opt, rep, d) = self.reply();
            assert_eq!(opt, OPT_GO);
            match rep {
                REP_INFO if d[..2] == INFO_EXPORT.to_be_bytes() => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                }
                REP_INFO => {}
                REP_ACK => return size.expect("NBD_INFO_EXPORT before the ACK"),
                other => panic!("GO answered {other:#x}: {}", String::from_utf8_lossy(&d)),
            }
        }
    }

    /// A simple-reply READ (no structured replies negotiated).
    fn read_at(&mut self, off: u64, len: u32) -> Vec<u8> {
        let r = Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: off ^ 0x5a5a,
            off,
            len,
        };
        self.s.write_all(&encode_request(&r)).unwrap();
        self.s.flush().unwrap();
        let mut h = [0u8; SIMPLE_REPLY_LEN];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(
            decode_reply_start(&h),
            Some(ReplyHeader::Simple {
                error: 0,
                cookie: r.cookie
            })
        );
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).unwrap();
        d
    }

    fn disconnect(&mut self) {
        let r = Request {
            flags: 0,
            cmd: CMD_DISC,
            cookie: 0,
            off: 0,
            len: 0,
        };
        let _ = self.s.write_all(&encode_request(&r));
        let _ = self.s.flush();
    }

    /// True when the server ends the connection (EOF, reset, or a TLS alert) in time.
    fn closed(&mut self) -> bool {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return false
                }
                // Reset, EOF without close_notify, or an alert from the server.
                Err(_) => return true,
            }
            if t0.elapsed() > IO_TIMEOUT {
                return false;
            }
        }
    }
}

fn go_data(name: &str) -> Vec<u8> {
    encode_info_request(&InfoRequest {
        name: name.into(),
        infos: vec![],
    })
}

fn disk() -> (Arc<dyn BlockDevice>, Vec<u8>) {
    let data = pattern(MIB as usize, 7);
    (Arc::new(MemDisk::from_vec(data.clone())), data)
}

/// A full TLS session: STARTTLS, handshake, GO, READ, DISC.
fn assert_serves(pki: &Pki, sock: &Path, data: &[u8], with_cert: bool) {
    let mut t = Raw::hello(sock)
        .start_tls(pki.client(&pki.ca, with_cert))
        .expect("TLS handshake");
    assert_eq!(t.go(), data.len() as u64, "export size inside TLS");
    assert_eq!(t.read_at(4096, 8192), &data[4096..4096 + 8192]);
    t.disconnect();
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[test]
fn options_before_starttls_get_tls_reqd_then_tls_serves() {
    let pki = Pki::new();
    let (dev, data) = disk();
    let srv = pki.server(dev, false);

    let mut r = Raw::hello(&srv.sock);
    for (opt, payload) in [
        (OPT_LIST, vec![]),
        (OPT_STRUCTURED_REPLY, vec![]),
        (OPT_INFO, go_data("")),
        (OPT_GO, go_data("")),
        (OPT_SET_META_CONTEXT, vec![0; 8]),
        (4242, b"whatever".to_vec()),
    ] {
        r.opt(opt, &payload);
        let (o, rep, _) = r.reply();
        assert_eq!((o, rep), (opt, REP_ERR_TLS_REQD), "option {opt} before TLS");
    }
    // STARTTLS with data is malformed, not a reason to stop.
    r.opt(OPT_STARTTLS, b"x");
    assert_eq!(r.reply().1, REP_ERR_INVALID);
    let mut t = r.start_tls(pki.client(&pki.ca, false)).expect("handshake");
    // Inside TLS: a second STARTTLS is invalid; negotiation goes on as usual.
    t.opt(OPT_STARTTLS, &[]);
    assert_eq!(t.reply().1, REP_ERR_INVALID);
    t.opt(OPT_LIST, &[]);
    assert_eq!(t.reply().1, REP_SERVER);
    assert_eq!(t.reply().1, REP_ACK);
    assert_eq!(t.go(), MIB);
    assert_eq!(t.read_at(0, 4096), &data[..4096]);
    assert_eq!(t.read_at(MIB - 512, 512), &data[(MIB - 512) as usize..]);
    t.disconnect();
    assert!(t.closed(), "server did not close after DISC");

    let stats = srv.stop();
    assert_eq!(stats.tls_failures, 0, "{stats:?}");
    assert_eq!(stats.bytes_read, 4096 + 512, "{stats:?}");
}

#[test]
fn export_name_before_tls_closes_and_abort_is_acknowledged() {
    let pki = Pki::new();
    let (dev, data) = disk();
    let srv = pki.server(dev, false);

    let mut r = Raw::hello(&srv.sock);
    r.opt(OPT_EXPORT_NAME, b"");
    assert!(
        r.closed(),
        "EXPORT_NAME before TLS must close the connection"
    );

    let mut r = Raw::hello(&srv.sock);
    r.opt(OPT_GO, &go_data(""));
    assert_eq!(r.reply().1, REP_ERR_TLS_REQD);
    r.opt(OPT_EXPORT_NAME, b"");
    assert!(r.closed(), "EXPORT_NAME after a refusal must close too");

    let mut r = Raw::hello(&srv.sock);
    r.opt(OPT_ABORT, &[]);
    assert_eq!(r.reply().1, REP_ACK);
    assert!(r.closed());

    // EXPORT_NAME inside TLS is the legacy way in, and works.
    let mut t = Raw::hello(&srv.sock)
        .start_tls(pki.client(&pki.ca, false))
        .unwrap();
    t.opt(OPT_EXPORT_NAME, b"");
    let mut b = [0u8; 10];
    t.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), MIB);
    assert_eq!(t.read_at(512, 512), &data[512..1024]);
    t.disconnect();

    let stats = srv.stop();
    assert_eq!(stats.refused, 2, "{stats:?}");
}

#[test]
fn garbage_after_starttls_ack_ends_only_that_connection() {
    let pki = Pki::new();
    let (dev, data) = disk();
    let srv = pki.server(dev, false);

    // A TLS session is open while the garbage arrives on another connection.
    let mut during = Raw::hello(&srv.sock)
        .start_tls(pki.client(&pki.ca, false))
        .unwrap();
    for garbage in [
        vec![0u8; 64],
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
        // A TLS record header claiming a huge handshake message, then nothing.
        vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00, 0xff, 0xfb],
        IHAVEOPT.to_be_bytes().to_vec(),
    ] {
        let mut r = Raw::hello(&srv.sock);
        r.opt(OPT_STARTTLS, &[]);
        assert_eq!(r.reply().1, REP_ACK);
        r.s.write_all(&garbage).unwrap();
        // The last two are incomplete, so close our side to make the server see the end.
        r.s.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(r.closed(), "server kept a connection with garbage for TLS");
    }
    assert_eq!(during.go(), MIB);
    assert_eq!(during.read_at(0, 512), &data[..512]);
    during.disconnect();
    assert_serves(&pki, &srv.sock, &data, false);

    let stats = srv.stop();
    assert_eq!(stats.tls_failures, 4, "{stats:?}");
}

#[test]
fn untrusted_server_and_missing_client_certificate_are_refused() {
    let pki = Pki::new();
    let (dev, data) = disk();

    // A client trusting another CA rejects the server's certificate.
    let srv = pki.server(dev.clone(), false);
    let bad = Raw::hello(&srv.sock).start_tls(pki.client(&pki.other_ca, false));
    let err = bad
        .err()
        .expect("handshake against an untrusted server succeeded");
    assert!(
        err.to_string().to_lowercase().contains("certificate"),
        "unexpected error: {err}"
    );
    assert_serves(&pki, &srv.sock, &data, false);
    let stats = srv.stop();
    assert_eq!(stats.tls_failures, 1, "{stats:?}");

    // Client certificates required: none => no service; the right one => served.
    let srv = pki.server(dev, true);
    let refused = match Raw::hello(&srv.sock).start_tls(pki.client(&pki.ca, false)) {
        // TLS 1.3: the client finishes its side before the server has judged it, so the
        // refusal shows on the first read.
        Ok(mut t) => {
            t.opt(OPT_GO, &go_data(""));
            t.try_reply().is_err()
        }
        Err(_) => true,
    };
    assert!(refused, "a client without a certificate was served");
    assert_serves(&pki, &srv.sock, &data, true);
    let stats = srv.stop();
    assert_eq!(stats.tls_failures, 1, "{stats:?}");
}

#[test]
fn any_options_before_starttls_are_refused_then_tls_works() {
    let pki = Pki::new();
    let (dev, data) = disk();
    let srv = pki.server(dev, false);
    let client = pki.client(&pki.ca, false);
    let refusable = any::<u32>().prop_filter("not STARTTLS, ABORT or EXPORT_NAME", |o| {
        !matches!(*o, OPT_STARTTLS | OPT_ABORT | OPT_EXPORT_NAME)
    });
    let options =
        prop::collection::vec((refusable, prop::collection::vec(any::<u8>(), 0..64)), 0..8);
    let mut runner = TestRunner::new(Config {
        cases: 24,
        ..Config::default()
    });
    runner
        .run(&options, |opts| {
            let mut r = Raw::hello(&srv.sock);
            for (opt, payload) in &opts {
                r.opt(*opt, payload);
                let (o, rep, _) = r.reply();
                prop_assert_eq!((o, rep), (*opt, REP_ERR_TLS_REQD));
            }
            let mut t = r.start_tls(client.clone()).expect("handshake");
            prop_assert_eq!(t.go(), MIB);
            prop_assert_eq!(t.read_at(8192, 512), &data[8192..8192 + 512]);
            t.disconnect();
            Ok(())
        })
        .unwrap();
    let stats = srv.stop();
    assert_eq!(stats.tls_failures, 0, "{stats:?}");
    assert_eq!(stats.protocol_errors, 0, "{stats:?}");
}

#[test]
fn bad_pem_files_are_named_errors() {
    let pki = Pki::new();
    let d = pki.dir.path();
    std::fs::write(d.join("empty.pem"), "").unwrap();
    let mut f = pki.files(false);
    f.cert_chain = d.join("empty.pem");
    assert!(matches!(
        server_config(&f),
        Err(TlsError::NoCertificate { .. })
    ));
    let mut f = pki.files(false);
    f.key = d.join("empty.pem");
    assert!(matches!(
        server_config(&f),
        Err(TlsError::ReadingKey { .. })
    ));
    let mut f = pki.files(false);
    f.key = d.join("missing.pem");
    assert!(matches!(
        server_config(&f),
        Err(TlsError::ReadingKey { .. })
    ));
    let mut f = pki.files(false);
    f.client_ca = Some(d.join("empty.pem"));
    assert!(matches!(
        server_config(&f),
        Err(TlsError::NoClientCa { .. })
    ));
    // The CA's certificate with the server's key: they do not belong together.
    let mut f = pki.files(false);
    f.cert_chain = d.join("ca-cert.pem");
    let e = server_config(&f).expect_err("mismatched certificate and key accepted");
    assert!(matches!(e, TlsError::Identity { .. }), "{e:?}");
}
