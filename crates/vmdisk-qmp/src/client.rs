//! The QMP client: greeting, `qmp_capabilities`, commands with ids, events.
//!
//! Every message in both directions can be logged with a timestamp. Asynchronous events that
//! arrive while a command waits for its return are recorded, not mistaken for the answer
//! (FACTS.md: `SHUTDOWN` can arrive before the `quit` return). Every read runs against a
//! deadline, so a wedged qemu cannot hang the caller.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How often [`Qmp::connect`] retries while qemu has not created the socket yet.
const CONNECT_POLL: Duration = Duration::from_millis(5);
/// Default deadline for one command's return.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
/// A QMP message longer than this is not something qemu sends; stop instead of buffering.
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024 * 1024;
/// Bytes read from the socket at a time.
const READ_CHUNK: usize = 64 * 1024;
/// Longest excerpt of an unexpected message kept in an error.
const MAX_QUOTED: usize = 512;

/// What went wrong talking to qemu. Variants are named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Nothing accepted a connection on the socket before the deadline.
    #[error(
        "qemu did not open its QMP socket {} within {:.1}s; check qemu's stderr",
        socket.display(),
        waited.as_secs_f64()
    )]
    Connecting {
        socket: PathBuf,
        waited: Duration,
        #[source]
        source: io::Error,
    },
    /// The message log could not be opened.
    #[error("opening the QMP log {}", path.display())]
    OpeningLog {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The peer hung up before greeting.
    #[error("qemu closed the QMP socket {} before its greeting; check qemu's stderr", socket.display())]
    ClosedBeforeGreeting { socket: PathBuf },
    /// The first message was not a QMP greeting.
    #[error(
        "expected the QMP greeting on {}, got {got}; is this a QMP socket (not the human monitor)?",
        socket.display()
    )]
    NotAGreeting { socket: PathBuf, got: String },
    /// `qmp_capabilities` failed.
    #[error("entering QMP command mode")]
    EnteringCommandMode(#[source] Box<Error>),
    /// Writing a command to the socket failed.
    #[error("sending `{cmd}` over QMP")]
    Sending {
        cmd: String,
        #[source]
        source: io::Error,
    },
    /// Reading from the socket failed.
    #[error("reading from QMP")]
    Reading(#[source] io::Error),
    /// qemu closed the connection while a command waited for its answer.
    #[error("qemu closed QMP while `{cmd}` was waiting for its answer (qemu exited?)")]
    ClosedDuringCommand { cmd: String },
    /// qemu closed the connection while we waited for an event.
    #[error("qemu closed QMP before the {event} event")]
    ClosedBeforeEvent { event: String },
    /// No complete message arrived before the deadline.
    #[error(
        "qemu did not answer on QMP in time ({buffered} bytes of a partial message buffered); \
         qemu may be wedged"
    )]
    TimedOut { buffered: usize },
    /// A line that is not JSON.
    #[error("qemu sent QMP text that is not JSON: {text}")]
    NotJson {
        text: String,
        #[source]
        source: serde_json::Error,
    },
    /// A line longer than [`MAX_MESSAGE_BYTES`].
    #[error("a QMP message exceeded {MAX_MESSAGE_BYTES} bytes; the peer is not qemu")]
    MessageTooLong,
    /// qemu answered a command with an error.
    #[error("QMP `{cmd}` failed: {class}: {desc}")]
    CommandFailed {
        cmd: String,
        class: String,
        desc: String,
    },
    /// The answer to a command had neither `return` nor `error`.
    #[error("QMP `{cmd}` got a reply with neither return nor error: {reply}")]
    MalformedReply { cmd: String, reply: String },
}

impl Error {
    /// Whether the connection to qemu is gone (closed, or the socket failed), so further
    /// commands cannot succeed.
    pub fn is_disconnected(&self) -> bool {
        matches!(
            self,
            Error::ClosedDuringCommand { .. }
                | Error::ClosedBeforeEvent { .. }
                | Error::Sending { .. }
                | Error::Reading(_)
        )
    }

    /// Whether qemu does not know the command (its class `CommandNotFound`).
    pub fn is_command_not_found(&self) -> bool {
        matches!(self, Error::CommandFailed { class, .. } if class == "CommandNotFound")
    }

    /// Whether the socket reports the peer gone (qemu exited), which `quit` counts as success.
    fn peer_gone(&self) -> bool {
        let io = match self {
            Error::Sending { source, .. } | Error::Reading(source) => source,
            _ => return false,
        };
        matches!(
            io.kind(),
            ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::NotConnected
        )
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// An asynchronous QMP event.
#[derive(Clone, Debug, PartialEq)]
pub struct QmpEvent {
    /// When it arrived, measured from the connection.
    pub at: Duration,
    /// e.g. "SHUTDOWN", "STOP", "BLOCK_JOB_COMPLETED".
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
    socket: PathBuf,
    buf: Vec<u8>,
    /// `buf[..scanned]` holds no newline (so each byte is searched once).
    scanned: usize,
    log: Option<File>,
    connected: Instant,
    greeting: Value,
    events: Vec<QmpEvent>,
    next_id: u64,
    timeout: Duration,
}

fn quote(v: &str) -> String {
    if v.len() <= MAX_QUOTED {
        return v.to_string();
    }
    let mut end = MAX_QUOTED;
    while !v.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &v[..end])
}

impl Qmp {
    /// Connect to qemu's QMP socket (retrying until qemu creates it, for up to `timeout`),
    /// read the greeting and enter command mode. With `log`, every message is appended there.
    pub fn connect(socket: &Path, log: Option<&Path>, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(source) if Instant::now() >= deadline => {
                    return Err(Error::Connecting {
                        socket: socket.to_path_buf(),
                        waited: timeout,
                        source,
                    })
                }
                Err(_) => std::thread::sleep(CONNECT_POLL),
            }
        };
        let log = match log {
            Some(path) => Some(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .map_err(|source| Error::OpeningLog {
                        path: path.to_path_buf(),
                        source,
                    })?,
            ),
            None => None,
        };
        let mut q = Qmp {
            stream,
            socket: socket.to_path_buf(),
            buf: Vec::new(),
            scanned: 0,
            log,
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
            Incoming::Eof => {
                return Err(Error::ClosedBeforeGreeting {
                    socket: socket.to_path_buf(),
                })
            }
            Incoming::Message(v) if v.get("QMP").is_some() => q.greeting = v,
            Incoming::Message(v) => {
                return Err(Error::NotAGreeting {
                    socket: socket.to_path_buf(),
                    got: quote(&v.to_string()),
                })
            }
        }
        q.execute("qmp_capabilities", None)
            .map_err(|e| Error::EnteringCommandMode(Box::new(e)))?;
        Ok(q)
    }

    /// The socket this client is connected to.
    pub fn socket(&self) -> &Path {
        &self.socket
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
    /// recorded; a QMP error becomes [`Error::CommandFailed`].
    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let id = self.send(cmd, args)?;
        let deadline = Instant::now() + self.timeout;
        loop {
            match self.read_message(deadline)? {
                Incoming::Eof => return Err(Error::ClosedDuringCommand { cmd: cmd.into() }),
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
            Err(e) if e.peer_gone() => return Ok(()),
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
                Err(e) if e.peer_gone() => return Ok(()),
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
                Incoming::Eof => return Err(Error::ClosedBeforeEvent { event: name.into() }),
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
            .map_err(|source| Error::Sending {
                cmd: cmd.into(),
                source,
            })?;
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
            let field = |k: &str| e.get(k).and_then(Value::as_str).unwrap_or("?").to_string();
            return Err(Error::CommandFailed {
                cmd: cmd.into(),
                class: field("class"),
                desc: field("desc"),
            });
        }
        Err(Error::MalformedReply {
            cmd: cmd.into(),
            reply: quote(&v.to_string()),
        })
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
            if let Some(i) = self.buf[self.scanned..].iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=self.scanned + i).collect();
                self.scanned = 0;
                let text = String::from_utf8_lossy(&line);
                let text = text.trim();
                if text.is_empty() {
                    continue;
                }
                self.log_message("<-", text);
                let v: Value = serde_json::from_str(text).map_err(|source| Error::NotJson {
                    text: quote(text),
                    source,
                })?;
                return Ok(Incoming::Message(v));
            }
            self.scanned = self.buf.len();
            if self.buf.len() > MAX_MESSAGE_BYTES {
                return Err(Error::MessageTooLong);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::TimedOut {
                    buffered: self.buf.len(),
                });
            }
            self.stream
                .set_read_timeout(Some(deadline - now))
                .map_err(Error::Reading)?;
            let mut chunk = [0u8; READ_CHUNK];
            match self.stream.read(&mut chunk) {
                Ok(0) => {
                    self.log_note("EOF");
                    return Ok(Incoming::Eof);
                }
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Error::Reading(e)),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{fake, CLOSE, OK};
    use std::os::unix::net::UnixListener;

    const SHUTDOWN: &str = r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "SHUTDOWN", "data": {"guest": false, "reason": "host-qmp-quit"}}"#;

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
        let mut q = Qmp::connect(&sock, Some(&log), Duration::from_secs(5)).unwrap();
        assert_eq!(q.qemu_version().as_deref(), Some("7.2.18"));
        assert_eq!(q.socket(), sock);
        let r = q.execute("query-status", None).unwrap();
        assert_eq!(r["status"], "running");
        assert_eq!(q.events().len(), 1);
        assert_eq!(q.events()[0].name, "RESUME");
        let e = q.execute("nope", Some(json!({"x": 1}))).unwrap_err();
        assert!(e.is_command_not_found(), "{e:?}");
        assert!(!e.is_disconnected(), "{e:?}");
        let msg = e.to_string();
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
        let (_dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![
                r#"{"return": "stale", "id": 999}"#,
                r#"{"return": "mine", "id": ID}"#,
            ],
        });
        let mut q = Qmp::connect(&sock, None, Duration::from_secs(5)).unwrap();
        assert_eq!(q.execute("query-name", None).unwrap(), "mine");
        drop(q);
        h.join().unwrap();
    }

    #[test]
    fn quit_tolerates_shutdown_then_eof() {
        let (_dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![SHUTDOWN, CLOSE],
        });
        let mut q = Qmp::connect(&sock, None, Duration::from_secs(5)).unwrap();
        q.quit().unwrap();
        assert_eq!(q.events()[0].name, "SHUTDOWN");
        assert_eq!(q.events()[0].data["reason"], "host-qmp-quit");
        h.join().unwrap();
    }

    #[test]
    fn quit_tolerates_shutdown_before_return() {
        let (_dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![SHUTDOWN, OK],
        });
        let mut q = Qmp::connect(&sock, None, Duration::from_secs(5)).unwrap();
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
        let (_dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK, CLOSE],
            _ => vec![CLOSE],
        });
        let mut q = Qmp::connect(&sock, None, Duration::from_secs(5)).unwrap();
        h.join().unwrap();
        q.quit().unwrap();
        // A second quit hits a broken pipe or EOF: still fine.
        q.quit().unwrap();
    }

    #[test]
    fn a_silent_qemu_times_out_instead_of_hanging() {
        let (_dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![],
        });
        let mut q = Qmp::connect(&sock, None, Duration::from_secs(5)).unwrap();
        q.set_timeout(Duration::from_millis(50));
        let t = Instant::now();
        let e = q.execute("query-status", None).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(matches!(e, Error::TimedOut { .. }), "{e:?}");
        drop(q);
        h.join().unwrap();
    }

    #[test]
    fn eof_during_a_command_is_an_error() {
        let (_dir, sock, h) = fake(|cmd| match cmd {
            "qmp_capabilities" => vec![OK],
            _ => vec![CLOSE],
        });
        let mut q = Qmp::connect(&sock, None, Duration::from_secs(5)).unwrap();
        let e = q.execute("query-status", None).unwrap_err();
        assert!(matches!(&e, Error::ClosedDuringCommand { cmd } if cmd == "query-status"));
        assert!(e.is_disconnected());
        assert!(e.to_string().contains("closed QMP"), "{e}");
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
        let e = Qmp::connect(&sock, None, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(matches!(e, Error::NotAGreeting { .. }), "{e:?}");
        assert!(e.to_string().contains("expected the QMP greeting"), "{e}");
        drop(h.join().unwrap());

        let e = Qmp::connect(&dir.path().join("absent"), None, Duration::from_millis(20))
            .err()
            .unwrap();
        assert!(matches!(e, Error::Connecting { .. }), "{e:?}");
        assert!(e.to_string().contains("did not open its QMP socket"), "{e}");
    }

    #[test]
    fn a_peer_that_sends_no_newline_is_stopped_at_the_message_limit() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("qmp");
        let l = UnixListener::bind(&sock).unwrap();
        let h = std::thread::spawn(move || {
            let (mut s, _) = l.accept().unwrap();
            let junk = vec![b'x'; 1 << 20];
            // Stops when the client hangs up.
            while s.write_all(&junk).is_ok() {}
        });
        let e = Qmp::connect(&sock, None, Duration::from_secs(5))
            .err()
            .unwrap();
        assert!(matches!(e, Error::MessageTooLong), "{e:?}");
        h.join().unwrap();
    }
}
