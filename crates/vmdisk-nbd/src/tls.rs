//! TLS for the NBD server: a rustls server configuration built from PEM files.
//!
//! The server runs in the protocol's FORCEDTLS mode whenever [`crate::config::ServerConfig::tls`] is
//! set: every option before `NBD_OPT_STARTTLS` is refused, so nothing about the export leaks
//! in plaintext and a client cannot fall back to an unencrypted session.
//!
//! Crypto comes from rustls' `ring` provider (no cmake/nasm at build time); TLS 1.2 and 1.3
//! are offered, as the NBD protocol requires 1.2. Only X.509 certificates are supported:
//! rustls implements no external pre-shared keys (TLS-PSK), so a PSK setup (qemu-nbd
//! `--tls-creds` of type `tls-creds-psk`, libnbd `tls-psk-file=`) cannot be served.
//!
//! # Errors
//!
//! [`TlsError`] names the file and the step that failed: reading the certificate chain, the
//! private key or the client CA bundle, a file holding none of what it should, or rustls
//! refusing the combination (a key that does not match the certificate, an unsupported key
//! type, an unusable CA).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::{self, PemObject};
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::RootCertStore;

/// Where the server's TLS identity comes from (all PEM).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// Certificate chain, the server's own certificate first.
    pub cert_chain: PathBuf,
    /// Private key of the first certificate (PKCS#8, PKCS#1 or SEC1; not encrypted).
    pub key: PathBuf,
    /// When set, clients must present a certificate that chains to one of these CAs.
    pub client_ca: Option<PathBuf>,
}

/// Why a TLS configuration could not be built.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the certificate chain {}", path.display())]
    ReadingCertChain {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} holds no PEM certificate", path.display())]
    NoCertificate { path: PathBuf },
    #[error(
        "cannot read a private key from {} (an unencrypted PEM key is needed)",
        path.display()
    )]
    ReadingKey {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("cannot read the client CA certificates {}", path.display())]
    ReadingClientCa {
        path: PathBuf,
        #[source]
        source: pem::Error,
    },
    #[error("{} holds no PEM certificate to trust for client certificates", path.display())]
    NoClientCa { path: PathBuf },
    #[error("a client CA certificate in {} is not usable", path.display())]
    InvalidClientCa {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("cannot verify client certificates against {}", path.display())]
    ClientVerifier {
        path: PathBuf,
        #[source]
        source: rustls::server::VerifierBuilderError,
    },
    #[error(
        "the certificate {} and key {} do not make a usable TLS identity",
        cert.display(),
        key.display()
    )]
    Identity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
}

/// The crypto provider every configuration uses (explicit, so no process-wide default has
/// to be installed and no second provider can be picked by accident).
fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, pem::Error> {
    CertificateDer::pem_file_iter(path)?.collect()
}

/// Build the server configuration from `files`: the certificate chain and key, and, with
/// `client_ca`, mandatory client certificates verified against that bundle.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let chain = read_certs(&files.cert_chain).map_err(|source| TlsError::ReadingCertChain {
        path: files.cert_chain.clone(),
        source,
    })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: files.cert_chain.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::ReadingKey {
        path: files.key.clone(),
        source,
    })?;
    let identity = |source| TlsError::Identity {
        cert: files.cert_chain.clone(),
        key: files.key.clone(),
        source,
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(identity)?;
    let builder = match &files.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let cas = read_certs(path).map_err(|source| TlsError::ReadingClientCa {
                path: path.clone(),
                source,
            })?;
            if cas.is_empty() {
                return Err(TlsError::NoClientCa { path: path.clone() });
            }
            let mut roots = RootCertStore::empty();
            for ca in cas {
                roots.add(ca).map_err(|source| TlsError::InvalidClientCa {
                    path: path.clone(),
                    source,
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                .build()
                .map_err(|source| TlsError::ClientVerifier {
                    path: path.clone(),
                    source,
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let cfg = builder.with_single_cert(chain, key).map_err(identity)?;
    Ok(Arc::new(cfg))
}
