//! A small synchronous QMP client: greeting, `qmp_capabilities`, commands with ids, events.
//!
//! Every message in both directions is logged with a timestamp. Asynchronous events that
//! arrive while a command waits for its return are recorded, not mistaken for the answer
//! (FACTS.md: `SHUTDOWN` can arrive before the `quit` return). Every read runs against a
//! deadline, so a wedged qemu cannot hang the harness.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

/// How often [`Qmp::connect`] retries while qemu has not created the socket yet.
const CONNECT_POLL: Duration = Duration::from_millis(5);
/// Default deadline for one command's return.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// A QMP message longer than this is not something qemu sends; stop instead of buffering.
const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// When it arrived, measured from the connection.
    pub at: Duration,
    /// e.g. "SHUTDOWN", "STOP", "BLOCK_IO_ERROR".
    pub name: String,
    /// The event's `data` member (Null when absent).
    pub data: Value,
}

/// What one read from the socket produced.
enum Incoming {
    Message(Value),
    Eof,
}

/// A connected QMP monitor in command mode.
pub struct Qmp {
    stream: UnixStream,
    buf: Vec<u8>,
    log: Option<File>,
    connected: Instant,
    greeting: Value,
    events: Vec<QmpEvent>,
    next_id: u64,
    timeout: Duration,
}

impl Qmp {
    /// Connect to qemu's QMP socket (retrying until qemu creates it, for up to `timeout`),
    /// read the greeting and enter command mode. Messages are appended to `log_path`.
    pub fn connect(socket: &Path, log_path: &Path, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) if Instant::now() >= deadline => {
                    bail!(
                        "qemu did not open its QMP socket {} within {:.1}s (last error: {e}); \
                         check qemu's stderr",
                        socket.display(),
                        timeout.as_secs_f64()
                    )
                }
                Err(_) => std::thread::sleep(CONNECT_POLL),
            }
        };
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening the QMP log {}", log_path.display()))?;
        let mut q = Qmp {
            stream,
            buf: Vec::new(),
            log: Some(log),
            connected: Instant::now(),
            greeting: Value::Null,
            events: Vec::new(),
            next_id: 1,
            timeout: DEFAULT_COMMAND_TIMEOUT,
        };
        q.log_note(&format!("connected to {}", socket.display()));
        // qemu greets at once; the connect deadline may be nearly spent, so this gets its own.
        let greeting_deadline = Instant::now() + DEFAULT_COMMAND_TIMEOUT;
        match q.read_message(greeting_deadline)? {
            Incoming::Eof => bail!(
                "qemu closed the QMP socket {} before its greeting; check qemu's stderr",
                socket.display()
            ),
            Incoming::Message(v) if v.get("QMP").is_some() => q.greeting = v,
            Incoming::Message(v) => bail!(
                "expected the QMP greeting on {}, got {v}; is this a QMP socket (not the \
                 human monitor)?",
                socket.display()
            ),
        }
        q.execute("qmp_capabilities", None)
            .context("entering QMP command mode")?;
        Ok(q)
    }

    /// The deadline for each later command's return (default [`DEFAULT_COMMAND_TIMEOUT`]).
    pub fn set_timeout(&mut self, timeout: Duration) {
        self.timeout = timeout;
    }

    /// The greeting, `{"QMP": {"version": ..., "capabilities": [...]}}`.
    pub fn greeting(&self) -> &Value {
        &self.greeting
    }

    /// qemu's version from the greeting, e.g. "7.2.18".
    pub fn qemu_version(&self) -> Option<String> {
        let v = self.greeting.get("QMP")?.get("version")?.get("qemu")?;
        Some(format!(
            "{}.{}.{}",
            v.get("major")?,
            v.get("minor")?,
            v.get("micro")?
        ))
    }

    /// Events received so far, in order.
    pub fn events(&self) -> &[QmpEvent] {
        &self.events
    }

    /// Run `cmd` with `args` and return its `return` value. Events arriving meanwhile are
    /// recorded; a QMP error becomes an error naming the command, class and description.
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let id = self.send(cmd, args)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_message(deadline)? {
                Incoming::Eof => {
                    bail!("qemu closed QMP while `{cmd}` was waiting for its answer (qemu exited?)")
                }
                Incoming::Message(v) => {
                    if let Some(r) = self.answer_to(id, cmd, v)? {
                        return Ok(r);
                    }
                }
            }
        }
    }

    /// Ask qemu to exit. Succeeds when qemu answers, or when it closes the connection first
    /// (it often does, or sends `SHUTDOWN` before the return), or is already gone.
    pub fn quit(&mut self) -> Result<()> {
        let id = match self.send("quit", None) {
            Ok(id) => id,
            Err(e) if is_gone(&e) => return Ok(()),
            Err(e) => return Err(e),
        };
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_message(deadline) {
                Ok(Incoming::Eof) => return Ok(()),
                Ok(Incoming::Message(v)) => {
                    if self.answer_to(id, "quit", v)?.is_some() {
                        return Ok(());
                    }
                }
                // A reset after SHUTDOWN is qemu exiting, which is what we asked for.
                Err(e) if is_gone(&e) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
    }

    /// Wait for an event named `name` (one already received counts), for up to `timeout`.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> Result<QmpEvent> {
        if let Some(e) = self.events.iter().find(|e| e.name == name) {
            return Ok(e.clone());
        }
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_message(deadline)? {
                Incoming::Eof => bail!("qemu closed QMP before the {name} event"),
                Incoming::Message(v) => {
                    if self.record_event(&v) == Some(name) {
                        if let Some(e) = self.events.last() {
                            return Ok(e.clone());
                        }
                    }
                }
            }
        }
    }

    /// Send one command; returns its id.
    fn send(&mut self, cmd: &str, args: Option<Value>) -> Result<u64> {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({ "execute": cmd, "id": id });
        if let Some(a) = args {
            msg["arguments"] = a;
        }
        let text = msg.to_string();
        self.log_message("->", &text);
        self.stream
            .write_all(format!("{text}\n").as_bytes())
            .with_context(|| format!("sending `{cmd}` over QMP"))?;
        Ok(id)
    }

    /// Sort one incoming message: an event is recorded (None), a reply to an older command is
    /// skipped (None), the reply to `id` is returned or turned into an error.
    fn answer_to(&mut self, id: u64, cmd: &str, v: Value) -> Result<Option<Value>> {
        if self.record_event(&v).is_some() {
            return Ok(None);
        }
        if v.get("id").and_then(Value::as_u64) != Some(id) {
            // The late answer to a command that timed out earlier.
            return Ok(None);
        }
        if let Some(r) = v.get("return") {
            return Ok(Some(r.clone()));
        }
        if let Some(e) = v.get("error") {
            let class = e.get("class").and_then(Value::as_str).unwrap_or("?");
            let desc = e.get("desc").and_then(Value::as_str).unwrap_or("?");
            bail!("QMP `{cmd}` failed: {class}: {desc}");
        }
        bail!("QMP `{cmd}` got a reply with neither return nor error: {v}")
    }

    /// Record `v` if it is an event and return its name.
    fn record_event(&mut self, v: &Value) -> Option<&str> {
        let name = v.get("event")?.as_str()?.to_string();
        self.events.push(QmpEvent {
            at: self.connected.elapsed(),
            name,
            data: v.get("data").cloned().unwrap_or(Value::Null),
        });
        self.events.last().map(|e| e.name.as_str())
    }

    /// Read until one complete message (a line of JSON) is buffered, or EOF, or `deadline`.
    fn read_message(&mut self, deadline: Instant) -> Result<Incoming> {
        loop {
            if let Some(nl) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=nl).collect();
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                self.log_message("<-", text);
                let v: Value = serde_json::from_str(text)
                    .with_context(|| format!("qemu sent QMP text that is not JSON: {text}"))?;
                return Ok(Incoming::Message(v));
            }
            if self.buf.len() > MAX_MESSAGE_BYTES {
                bail!("a QMP message exceeded {MAX_MESSAGE_BYTES} bytes; the peer is not qemu");
            }
            let now = Instant::now();
            if now >= deadline {
                bail!(
                    "qemu did not answer on QMP in time (waited until the deadline; {} bytes of \
                     a partial message buffered) — qemu may be wedged",
                    self.buf.len()
                );
            }
            self.stream
                .set_read_timeout(Some(deadline - now))
                .context("setting the QMP read timeout")?;
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.log_note("EOF");
                    return Ok(Incoming::Eof);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(anyhow!(e).context("reading from QMP")),
            }
        }
    }

    fn log_message(&mut self, dir: &str, text: &str) {
        let at = self.connected.elapsed().as_secs_f64();
        if let Some(f) = self.log.as_mut() {
            if writeln!(f, "[{at:7.3}] {dir} {text}").is_err() {
                self.log = None;
            }
        }
    }

    fn log_note(&mut self, text: &str) {
        self.log_message("--", text);
    }
}

/// Whether `e` says the peer is gone (qemu exited), which `quit` counts as success.
fn is_gone(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::os::unix::net::UnixListener;

    const GREETING: &str = r#"{"QMP": {"version": {"qemu": {"micro": 18, "minor": 2, "major": 7}, "package": "Debian"}, "capabilities": ["oob"]}}"#;
    const SHUTDOWN: &str = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#;
    /// A reply line that makes the fake close the connection.
    const CLOSE: &str = "CLOSE";

    /// A scripted fake qemu: for each command it reads, `reply` returns the lines to send
    /// (`ID` replaced by the command's id; [`CLOSE`] closes the connection). Returns the
    /// commands it received.
    fn fake(
        reply: impl Fn(&str) -> Vec<&'static str> + Send + 'static,
    ) -> (
        tempfile::TempDir,
        std::path::PathBuf,
        std::thread::JoinHandle<Vec<Value>>,
    ) {
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
                let cmd = v["execute"].as_str().unwrap().to_string();
                let id = v["id"].to_string();
                got.push(v);
                for l in reply(&cmd) {
                    if l == CLOSE {
                        return got;
                    }
                    write!(w, "{}\r\n", l.replace("ID", &id)).unwrap();
                }
            }
            got
        });
        (dir, sock, h)
    }

    const OK: &str = r#"{"return": {}, "id": ID}"#;

    #[test]
    fn handshake_command_errors_events_and_log() {
        let (dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            "query-status" => vec![
                r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "RESUME"}"#,
                r#"{"return": {"status": "running", "running": true}, "id": ID}"#,
            ],
            "nope" => vec![
                r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}, "id": ID}"#,
            ],
            _ => vec![CLOSE],
        });
        let log = dir.path().join("qmp.log");
        let mut q = Qmp::connect(&sock, &log, Duration::from_secs(5)).unwrap();
        assert_eq!(q.qemu_version().as_deref(), Some("7.2.18"));
        let r = q.execute("query-status", None).unwrap();
        assert_eq!(r["status"], "running");
        assert_eq!(q.events().len(), 1);
        assert_eq!(q.events()[0].name, "RESUME");
        let e = q.execute("nope", Some(json!({"x": 1}))).unwrap_err();
        let msg = format!("{e:#}");
        assert!(msg.contains("`nope` failed: CommandNotFound"), "{msg}");
        drop(q);
        let sent = h.join().unwrap();
        assert_eq!(sent[0]["execute"], "qmp_capabilities");
        assert!(sent[1].get("arguments").is_none());
        assert_eq!(sent[2]["arguments"], json!({"x": 1}));
        let logged = std::fs::read_to_string(&log).unwrap();
        assert!(
            logged.contains("] -> {\"execute\":\"query-status\""),
            "{logged}"
        );
        assert!(logged.contains("] <- {\"timestamp\""), "{logged}");
        assert!(logged.contains("] <- {\"QMP\""), "{logged}");
    }

    #[test]
    fn replies_to_other_ids_are_skipped() {
        let (dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![
                r#"{"return": "stale", "id": 999}"#,
                r#"{"return": "mine", "id": ID}"#,
            ],
        });
        let mut q = Qmp::connect(&sock, &dir.path().join("log"), Duration::from_secs(5)).unwrap();
        assert_eq!(q.execute("query-name", None).unwrap(), "mine");
        drop(q);
        h.join().unwrap();
    }

    #[test]
    fn quit_tolerates_shutdown_then_eof() {
        let (dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![SHUTDOWN, CLOSE],
        });
        let mut q = Qmp::connect(&sock, &dir.path().join("log"), Duration::from_secs(5)).unwrap();
        q.quit().unwrap();
        assert_eq!(q.events()[0].name, "SHUTDOWN");
        assert_eq!(q.events()[0].data["reason"], "host-qmp-quit");
        h.join().unwrap();
    }

    #[test]
    fn quit_tolerates_shutdown_before_return() {
        let (dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![SHUTDOWN, OK],
        });
        let mut q = Qmp::connect(&sock, &dir.path().join("log"), Duration::from_secs(5)).unwrap();
        q.quit().unwrap();
        assert_eq!(
            q.wait_event("SHUTDOWN", Duration::ZERO).unwrap().name,
            "SHUTDOWN"
        );
        drop(q);
        h.join().unwrap();
    }

    #[test]
    fn quit_succeeds_when_qemu_is_already_gone() {
        let (dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK, CLOSE],
            _ => vec![CLOSE],
        });
        let mut q = Qmp::connect(&sock, &dir.path().join("log"), Duration::from_secs(5)).unwrap();
        h.join().unwrap();
        q.quit().unwrap();
        // A second quit hits a broken pipe or EOF: still fine.
        q.quit().unwrap();
    }

    #[test]
    fn a_silent_qemu_times_out_instead_of_hanging() {
        let (dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![],
        });
        let mut q = Qmp::connect(&sock, &dir.path().join("log"), Duration::from_secs(5)).unwrap();
        q.set_timeout(Duration::from_millis(50));
        let t = Instant::now();
        let e = q.execute("query-status", None).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(format!("{e:#}").contains("did not answer"), "{e:#}");
        drop(q);
        h.join().unwrap();
    }

    #[test]
    fn eof_during_a_command_is_an_error() {
        let (dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![CLOSE],
        });
        let mut q = Qmp::connect(&sock, &dir.path().join("log"), Duration::from_secs(5)).unwrap();
        let e = q.execute("query-status", None).unwrap_err();
        assert!(format!("{e:#}").contains("closed QMP"), "{e:#}");
        h.join().unwrap();
    }

    #[test]
    fn connect_rejects_a_socket_that_is_not_qmp_and_times_out_on_none() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("hmp");
        let l = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"{\"hello\": 1}\n").unwrap();
            s
        });
        let e = Qmp::connect(&sock, &dir.path().join("log"), Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("expected the QMP greeting"),
            "{e:#}"
        );
        drop(h.join().unwrap());

        let e = Qmp::connect(
            &dir.path().join("absent"),
            &dir.path().join("log"),
            Duration::from_millis(20),
        )
        .err()
        .unwrap();
        assert!(
            format!("{e:#}").contains("did not open its QMP socket"),
            "{e:#}"
        );
    }
}
