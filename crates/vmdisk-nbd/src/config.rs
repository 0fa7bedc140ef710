//! What the caller asks the server to do. Plain data; depends on nothing else in the crate.

use std::sync::Arc;

/// What to export and how.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Name clients must ask for (qemu's default is the empty name).
    pub export_name: String,
    /// Refuse writes (also implied by a read-only device).
    pub read_only: bool,
    /// Keep serving after the last client leaves (qemu-nbd `--persistent`).
    pub persistent: bool,
    /// Clients in the transmission phase at once (qemu-nbd `--shared`); 0 counts as 1. Clients
    /// still negotiating do not count; one that has negotiated while all are taken waits for a
    /// slot.
    pub max_connections: usize,
    /// Unix sockets only: peer uids allowed to connect (`SO_PEERCRED` on Linux, `getpeereid`
    /// on macOS); `None` allows any
    /// peer that can open the 0600 socket.
    pub allow_uids: Option<Vec<u32>>,
    /// Human description sent with LIST and INFO.
    pub description: Option<String>,
    /// Allow TCP addresses other than loopback.
    pub allow_remote: bool,
    /// Require TLS with this configuration (see `tls::server_config`). There is no
    /// plaintext fallback: a client must send NBD_OPT_STARTTLS before anything else.
    pub tls: Option<Arc<rustls::ServerConfig>>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            export_name: String::new(),
            read_only: false,
            persistent: false,
            max_connections: 1,
            allow_uids: None,
            description: None,
            allow_remote: false,
            tls: None,
        }
    }
}
