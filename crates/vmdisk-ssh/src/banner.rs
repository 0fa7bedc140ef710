//! The SSH identification line: connect, read until a line starting with `SSH-` (RFC 4253 4.2
//! allows other lines before it), within timeouts.
//!
//! A port can accept a connection without an SSH server behind it: qemu's user network
//! (slirp) accepts forwarded connections before the guest listens, then closes them. Reading
//! the banner is what tells a live sshd from an open port.

use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// An SSH identification line is at most 255 bytes (RFC 4253 4.2); lines before it also are.
/// More than this without one is not an SSH server.
pub const MAX_BANNER_BYTES: usize = 8 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BannerError {
    #[error("connecting to {addr}")]
    Connecting {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{addr} accepted the connection but sent no SSH banner within {:.1}s", waited.as_secs_f64())]
    NoBanner { addr: SocketAddr, waited: Duration },
    #[error("{addr} closed the connection before sending an SSH banner (nothing is serving SSH behind the port yet)")]
    Closed { addr: SocketAddr },
    #[error("{addr} sent {MAX_BANNER_BYTES} bytes without an SSH identification line: not an SSH server")]
    TooLong { addr: SocketAddr },
    #[error("reading from {addr}")]
    Reading {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Connect to `addr` (giving up after `connect_timeout`) and return the first line that starts
/// with `SSH-`, trimmed, waiting at most `read_timeout` for it after connecting.
pub fn read_banner(
    addr: SocketAddr,
    connect_timeout: Duration,
    read_timeout: Duration,
) -> Result<String, BannerError> {
    let connect = connect_timeout.max(Duration::from_millis(1));
    let mut s = TcpStream::connect_timeout(&addr, connect)
        .map_err(|source| BannerError::Connecting { addr, source })?;
    let t0 = Instant::now();
    let read_until = t0 + read_timeout;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 512];
    loop {
        while let Some(nl) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            let text = String::from_utf8_lossy(&line).trim_end().to_string();
            if text.starts_with("SSH-") {
                return Ok(text);
            }
        }
        if buf.len() > MAX_BANNER_BYTES {
            return Err(BannerError::TooLong { addr });
        }
        let now = Instant::now();
        if now >= read_until {
            return Err(BannerError::NoBanner {
                addr,
                waited: t0.elapsed(),
            });
        }
        s.set_read_timeout(Some(read_until - now))
            .map_err(|source| BannerError::Reading { addr, source })?;
        match s.read(&mut chunk) {
            Ok(0) => return Err(BannerError::Closed { addr }),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(BannerError::NoBanner {
                    addr,
                    waited: t0.elapsed(),
                })
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                return Err(BannerError::Closed { addr })
            }
            Err(source) => return Err(BannerError::Reading { addr, source }),
        }
    }
}

/// Whether an identification line announces a protocol OpenSSH speaks (2.0, or 1.99 = 2.0
/// compatible).
pub fn is_ssh2(line: &str) -> bool {
    line.starts_with("SSH-2.0-") || line.starts_with("SSH-1.99-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{Ipv4Addr, TcpListener};

    fn listener() -> (TcpListener, SocketAddr) {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let a = l.local_addr().unwrap();
        (l, a)
    }

    #[test]
    fn lines_before_the_banner_are_skipped() {
        let (l, addr) = listener();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hello\r\nSSH-2.0-OpenSSH_9.2p1 Debian\r\n")
                .unwrap();
        });
        let b = read_banner(addr, Duration::from_secs(5), Duration::from_secs(5)).unwrap();
        assert_eq!(b, "SSH-2.0-OpenSSH_9.2p1 Debian");
        assert!(is_ssh2(&b));
        t.join().unwrap();
    }

    #[test]
    fn a_silent_or_closing_port_is_told_apart() {
        let (l, addr) = listener();
        // Silent: the backlog accepts, nobody speaks.
        let t0 = Instant::now();
        let e = read_banner(addr, Duration::from_secs(5), Duration::from_millis(200)).unwrap_err();
        assert!(matches!(e, BannerError::NoBanner { .. }), "{e}");
        assert!(t0.elapsed() < Duration::from_secs(3));
        let t = std::thread::spawn(move || {
            // Like slirp before the guest listens: accept and close (after the first
            // connection from the silent case above, still in the backlog).
            for _ in 0..2 {
                drop(l.accept().unwrap());
            }
        });
        let e = read_banner(addr, Duration::from_secs(5), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, BannerError::Closed { .. }), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn a_closed_port_fails_to_connect() {
        let (l, addr) = listener();
        drop(l);
        let e = read_banner(addr, Duration::from_secs(5), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, BannerError::Connecting { .. }), "{e}");
    }

    #[test]
    fn endless_garbage_is_not_an_ssh_server() {
        let (l, addr) = listener();
        let t = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let junk = vec![b'x'; 2 * MAX_BANNER_BYTES];
            let _ = s.write_all(&junk);
        });
        let e = read_banner(addr, Duration::from_secs(5), Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, BannerError::TooLong { .. }), "{e}");
        t.join().unwrap();
    }
}
