//! `vmdisk serve`: export an image (or one partition of it) over NBD, optionally TLS-only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::Args;
use vmdisk_block::BlockDevice;
use vmdisk_image::{Format, OpenOptions};
use vmdisk_nbd::tls::TlsFiles;
use vmdisk_nbd::{Listen, ServerConfig};

use crate::{part, FormatArg};

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The image to export (raw or qcow2, with its backing chain).
    pub image: PathBuf,
    /// Listen on this unix socket (mode 0600). Default: $XDG_RUNTIME_DIR/vmdisk/NAME.sock,
    /// else /tmp/vmdisk-UID/NAME.sock.
    #[arg(long, value_name = "PATH", conflicts_with = "tcp")]
    pub socket: Option<PathBuf>,
    /// Listen on TCP instead (loopback unless --insecure-remote).
    #[arg(long, value_name = "HOST:PORT")]
    pub tcp: Option<SocketAddr>,
    /// Allow a TCP address other than loopback. Without --tls-cert anyone on that network can
    /// read and write the disk.
    #[arg(long, requires = "tcp")]
    pub insecure_remote: bool,
    /// Require TLS, with this PEM certificate chain (the server's certificate first). Clients
    /// must use nbds:// or nbds+unix:// (libnbd: tls-certificates=DIR, DIR holding the CA as
    /// ca-cert.pem); plaintext clients are refused. Needs --tls-key.
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The PEM private key of --tls-cert (PKCS#8, PKCS#1 or SEC1, not encrypted).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// Also require a client certificate signed by a CA in this PEM file (libnbd clients put
    /// theirs in DIR as client-cert.pem and client-key.pem).
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    pub tls_client_ca: Option<PathBuf>,
    /// Not supported: rustls has no external PSK (TLS-PSK, libnbd tls-psk-file=), so this
    /// always fails; use a certificate (--tls-cert/--tls-key).
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// Export read-only: clients' writes fail with EPERM.
    #[arg(short = 'r', long = "read-only")]
    pub read_only: bool,
    /// Send writes to a throwaway qcow2 overlay; the image is never written.
    #[arg(long, conflicts_with = "read_only")]
    pub snapshot: bool,
    /// Export one partition: number, GPT name (disk-main-root) or filesystem label (nixos).
    #[arg(short = 'P', long = "partition", value_name = "PART")]
    pub partition: Option<String>,
    /// Keep serving after the last client disconnects.
    #[arg(long)]
    pub persistent: bool,
    /// Number of connections served at once (at least 1); more wait their turn, and clients
    /// still negotiating do not count. A multi-conn client (nbdcopy opens 4) needs that many:
    /// size N for all clients' connections.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub shared: usize,
    /// The export name clients ask for.
    #[arg(long, value_name = "NAME", default_value = "")]
    pub export_name: String,
    /// Only these uids may connect to the unix socket (checked with SO_PEERCRED).
    #[arg(long, value_name = "UID")]
    pub allow_uid: Vec<u32>,
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
}

fn default_socket(image: &std::path::Path) -> PathBuf {
    let name = image
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "disk".to_string());
    let dir = match std::env::var_os("XDG_RUNTIME_DIR") {
        Some(d) if !d.is_empty() => PathBuf::from(d).join("vmdisk"),
        _ => {
            // SAFETY: getuid cannot fail and touches no memory.
            let uid = unsafe { libc::getuid() };
            PathBuf::from(format!("/tmp/vmdisk-{uid}"))
        }
    };
    dir.join(format!("{name}.sock"))
}

/// The TLS configuration the flags ask for (checked before the image is opened).
fn tls_config(a: &ServeArgs) -> Result<Option<Arc<vmdisk_nbd::rustls::ServerConfig>>> {
    if a.tls_psk.is_some() {
        bail!(
            "--tls-psk is not supported: rustls has no external PSK; use a certificate \
             (--tls-cert FILE --tls-key FILE)"
        );
    }
    let (Some(cert), Some(key)) = (&a.tls_cert, &a.tls_key) else {
        return Ok(None);
    };
    let files = TlsFiles {
        cert_chain: cert.clone(),
        key: key.clone(),
        client_ca: a.tls_client_ca.clone(),
    };
    let cfg = vmdisk_nbd::tls::server_config(&files).context("setting up TLS")?;
    Ok(Some(cfg))
}

pub fn run(a: ServeArgs, quiet: bool) -> Result<u8> {
    if a.shared == 0 {
        bail!(
            "--shared 0 would serve no client at all: pass --shared N with N >= 1, the number \
             of connections served at once (default 1)"
        );
    }
    let tls = tls_config(&a)?;
    // --snapshot: a private overlay in a temp dir, backed by the image (opened read-only).
    let tmp;
    let (path, format, read_only) = if a.snapshot {
        tmp = tempfile::Builder::new()
            .prefix("vmdisk-serve-")
            .tempdir()
            .context("creating a directory for the --snapshot overlay")?;
        let overlay = tmp.path().join("overlay.qcow2");
        vmdisk_image::create_overlay(&overlay, &a.image, a.format.map(Into::into))
            .context("creating the --snapshot overlay")?;
        (overlay, Some(Format::Qcow2), false)
    } else {
        (a.image.clone(), a.format.map(Into::into), a.read_only)
    };
    let img = vmdisk_image::open(
        &path,
        &OpenOptions {
            format,
            read_only,
            force_share: false,
            no_backing: false,
            ..Default::default()
        },
    )?;
    let whole = img.dev();
    let dev: Arc<dyn BlockDevice> = match &a.partition {
        Some(sel) => {
            let p = part::select(&whole, Some(sel))?;
            Arc::new(vmdisk_block::Slice::new(whole.clone(), p.off, p.len)?)
        }
        None => whole,
    };
    let listen = match (a.tcp, &a.socket) {
        (Some(addr), _) => {
            if !addr.ip().is_loopback() && !a.insecure_remote {
                if tls.is_some() {
                    bail!(
                        "{addr} is not a loopback address: pass --insecure-remote to export \
                         the disk beyond this host (clients will still need TLS)"
                    );
                }
                bail!(
                    "{addr} is not a loopback address: anyone on that network could read and \
                     write the disk. Bind 127.0.0.1, or pass --insecure-remote if you mean it \
                     (with --tls-cert/--tls-key to require TLS)"
                );
            }
            Listen::Tcp(addr)
        }
        (None, Some(p)) => Listen::Unix(p.clone()),
        (None, None) => {
            let p = default_socket(&a.image);
            if let Some(dir) = p.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
            Listen::Unix(p)
        }
    };
    if !quiet {
        let s = if tls.is_some() { "s" } else { "" };
        let uri = match &listen {
            Listen::Unix(p) => format!("nbd{s}+unix:///{}?socket={}", a.export_name, p.display()),
            Listen::Tcp(addr) => format!("nbd{s}://{addr}/{}", a.export_name),
        };
        eprintln!(
            "vmdisk: serving {} ({} bytes{}{}) at {uri}",
            a.image.display(),
            dev.len(),
            if a.snapshot {
                ", writes go to a throwaway overlay"
            } else if read_only {
                ", read-only"
            } else {
                ""
            },
            if a.persistent {
                ""
            } else {
                "; exits after the last client"
            }
        );
        if tls.is_some() {
            let who = if a.tls_client_ca.is_some() {
                " and a client certificate"
            } else {
                ""
            };
            eprintln!("vmdisk: TLS is required{who}; plaintext clients are refused");
        }
    }
    let cfg = ServerConfig {
        export_name: a.export_name.clone(),
        read_only,
        persistent: a.persistent,
        max_connections: a.shared,
        allow_uids: (!a.allow_uid.is_empty()).then(|| a.allow_uid.clone()),
        description: Some(format!("vmdisk export of {}", a.image.display())),
        allow_remote: a.insecure_remote,
        tls,
    };
    let stats = vmdisk_nbd::serve_blocking(dev, listen, cfg)?;
    img.close()?;
    if !quiet {
        eprintln!(
            "vmdisk: served {} connection(s), {} requests, {} bytes read, {} bytes written",
            stats.connections, stats.requests, stats.bytes_read, stats.bytes_written
        );
        if stats.tls_failures > 0 {
            eprintln!(
                "vmdisk: {} TLS handshake(s) failed (untrusted or missing certificates?)",
                stats.tls_failures
            );
        }
    }
    Ok(0)
}
