//! Shared test fixture: an in-process server on a background thread.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmdisk_block::BlockDevice;
use vmdisk_nbd::{client, Listen, ServeStats, ServerConfig};

/// How long a test waits for the server to come up or go down.
pub const SERVER_TIMEOUT: Duration = Duration::from_secs(30);

pub struct TestServer {
    pub dir: tempfile::TempDir,
    pub sock: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<vmdisk_nbd::Result<ServeStats>>>,
}

impl TestServer {
    pub fn start(dev: Arc<dyn BlockDevice>, cfg: ServerConfig) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let sock = dir.path().join("nbd.sock");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let listen = Listen::Unix(sock.clone());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(vmdisk_nbd::serve(dev, listen, cfg, async move {
                let _ = rx.await;
            }))
        });
        let t0 = Instant::now();
        while !sock.exists() {
            assert!(
                !thread.is_finished(),
                "server thread ended before listening"
            );
            assert!(t0.elapsed() < SERVER_TIMEOUT, "server did not start");
            std::thread::sleep(Duration::from_millis(5));
        }
        TestServer {
            dir,
            sock,
            stop: Some(tx),
            thread: Some(thread),
        }
    }

    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.sock.display())
    }

    pub fn connect(&self) -> client::Client {
        client::Client::connect_unix(&self.sock, &client::ConnectOptions::default())
            .expect("connect")
    }

    pub fn connect_with(&self, opts: &client::ConnectOptions) -> client::Result<client::Client> {
        client::Client::connect_unix(&self.sock, opts)
    }

    /// True when the server has returned on its own (one-shot).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }

    /// Wait for the server to end on its own (one-shot) within the timeout.
    pub fn wait(mut self) -> ServeStats {
        let t0 = Instant::now();
        while !self.is_finished() {
            assert!(
                t0.elapsed() < SERVER_TIMEOUT,
                "one-shot server did not exit"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        self.join()
    }

    /// Ask the server to stop and return its statistics.
    pub fn stop(mut self) -> ServeStats {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        self.join()
    }

    fn join(&mut self) -> ServeStats {
        let t = self.thread.take().expect("joined once");
        let stats = t
            .join()
            .expect("server thread panicked")
            .expect("serve failed");
        assert_eq!(stats.panics, 0, "panics inside the server: {stats:?}");
        assert!(!self.sock.exists(), "socket not removed at exit");
        stats
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn persistent(shared: usize) -> ServerConfig {
    ServerConfig {
        persistent: true,
        max_connections: shared,
        ..ServerConfig::default()
    }
}

/// A deterministic pattern for offset `off`.
pub fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}
