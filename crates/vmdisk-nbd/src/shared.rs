//! State every connection of one server shares: the device, the configuration, the server-wide
//! budgets and the counters behind `ServeStats`. No IO here.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use tokio::sync::{watch, Semaphore};
use vmdisk_block::BlockDevice;

use crate::config::ServerConfig;
use crate::negotiate::ExportInfo;

/// Counters shared by all connections.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub connections: AtomicU64,
    pub refused: AtomicU64,
    pub tls_failures: AtomicU64,
    pub requests: AtomicU64,
    pub request_errors: AtomicU64,
    pub protocol_errors: AtomicU64,
    pub panics: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
}

/// What every connection shares.
pub(crate) struct Shared {
    pub dev: Arc<dyn BlockDevice>,
    pub cfg: ServerConfig,
    pub read_only: bool,
    pub size: u64,
    /// Bytes of request/reply buffers that may exist at once, server-wide.
    pub mem_budget: Arc<Semaphore>,
    /// Device calls that may run at once, server-wide.
    pub io_slots: Arc<Semaphore>,
    /// Connections in the transmission phase at once (`max_connections` permits): taken when
    /// negotiation has finished, before the final reply, held until the connection ends.
    pub slots: Arc<Semaphore>,
    pub counters: Counters,
}

impl Shared {
    /// The export as a negotiating client sees it.
    pub fn export_info(&self) -> ExportInfo {
        ExportInfo {
            name: self.cfg.export_name.clone(),
            description: self.cfg.description.clone(),
            size: self.size,
            read_only: self.read_only,
            // Every connection shares one device and FLUSH is device-wide, so multi-conn is
            // safe; advertise it only when more than one connection will actually be served.
            multi_conn: self.cfg.max_connections > 1,
            tls_required: self.cfg.tls.is_some(),
        }
    }
}

/// Resolve when `stop` turns true (never, if the sender is gone without saying so).
pub(crate) async fn stopped(stop: &mut watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        if stop.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }
}
