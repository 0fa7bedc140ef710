//! A scripted fake qemu on a unix socket, for the client's and the live copy's tests.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::thread::JoinHandle;

use serde_json::Value;

/// qemu 7.2's greeting.
pub const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 18, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
/// A reply line that makes the fake close the connection.
pub const CLOSE: &str = "CLOSE";
/// An empty successful return (`ID` is replaced by the command's id).
pub const OK: &str = r#"{"return": {}, "id": ID}"#;

/// A fake qemu: for each command it reads, `reply` gets the whole message and returns the
/// lines to send, as they are ([`CLOSE`] closes the connection). The handle returns the
/// commands it received.
pub fn fake_with(
    mut reply: impl FnMut(&Value) -> Vec<String> + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<Vec<Value>>) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qmp");
    let l = UnixListener::bind(&sock).unwrap();
    let h = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut w = s.try_clone().unwrap();
        write!(w, "{GREETING}\r\n").unwrap();
        let mut got = Vec::new();
        for line in BufReader::new(s).lines() {
            let Ok(line) = line else { break };
            let v: Value = serde_json::from_str(&line).unwrap();
            let lines = reply(&v);
            got.push(v);
            for l in lines {
                if l == CLOSE {
                    return got;
                }
                // The client may have hung up already (it gave up on an answer).
                if write!(w, "{l}\r\n").is_err() {
                    return got;
                }
            }
        }
        got
    });
    (dir, sock, h)
}

/// [`fake_with`] for replies that depend on the command name only; `ID` in a reply line is
/// replaced by the command's id.
pub fn fake(
    reply: impl Fn(&str) -> Vec<&'static str> + Send + 'static,
) -> (tempfile::TempDir, PathBuf, JoinHandle<Vec<Value>>) {
    fake_with(move |v| {
        let cmd = v["execute"].as_str().unwrap_or_default();
        let id = v["id"].to_string();
        reply(cmd)
            .into_iter()
            .map(|l| l.replace("ID", &id))
            .collect()
    })
}
