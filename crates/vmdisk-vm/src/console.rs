//! The guest's serial console: attach to qemu's unix socket, keep every line with the time it
//! arrived (in memory and in a log file), and wait for lines without busy-looping.
//!
//! qemu creates the socket with `server=on,wait=on`, so the guest does not start until
//! [`Console::connect`] is attached and no early output is lost. A reader thread splits the
//! byte stream into lines, drops `\r`, ANSI escape sequences and other control characters, and
//! wakes waiters through a condition variable. End of stream means qemu (or the guest) ended.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// How often [`Console::connect`] retries while qemu has not created the socket yet.
const CONNECT_POLL: Duration = Duration::from_millis(5);
/// Read size of the reader thread.
const READ_CHUNK: usize = 4096;
/// A line longer than this is split: a guest printing without newlines must not grow memory
/// without bound.
const MAX_LINE_BYTES: usize = 64 * 1024;

/// One console line, cleaned of control characters.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// When its first byte arrived, measured from the `start` given to [`Console::connect`].
    pub at: Duration,
    pub text: String,
}

/// Why [`Console::wait_for`] returned without a matching line.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum WaitError {
    #[error("no {what} on the serial console within {:.1}s", waited.as_secs_f64())]
    Timeout { what: String, waited: Duration },
    #[error("the serial console closed (qemu or the guest ended) before {what}")]
    Closed { what: String },
}

struct State {
    lines: Vec<Line>,
    /// Bytes of the line being received, and when its first byte came.
    partial: Vec<u8>,
    partial_at: Option<Duration>,
    closed: bool,
    /// A read error that ended the stream (EOF leaves this empty).
    error: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic in another holder cannot leave `State` inconsistent (every update is a
        // single push or assignment), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// An attached serial console.
pub struct Console {
    shared: Arc<Shared>,
    stream: Mutex<UnixStream>,
    reader: Option<JoinHandle<()>>,
    log_path: PathBuf,
}

impl Console {
    /// Attach to qemu's serial socket, retrying every few milliseconds for up to `timeout`
    /// while qemu has not created it, and giving up at once when `is_alive` says qemu exited.
    /// Lines are appended to `log_path` as `[  1.234] text`, times measured from `start`.
    pub fn connect(
        socket: &Path,
        log_path: &Path,
        start: Instant,
        timeout: Duration,
        is_alive: &mut dyn FnMut() -> bool,
    ) -> Result<Console> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            let err = match UnixStream::connect(socket) {
                Ok(s) => break s,
                Err(e) => e,
            };
            if !is_alive() {
                bail!(
                    "qemu exited before its serial socket {} accepted a connection (last \
                     error: {err}); its stderr says why",
                    socket.display()
                );
            }
            if Instant::now() >= deadline {
                bail!(
                    "qemu did not open its serial socket {} within {:.1}s (last error: {err}); \
                     check that qemu starts at all (its stderr) or raise the qemu_start timeout",
                    socket.display(),
                    timeout.as_secs_f64()
                );
            }
            std::thread::sleep(CONNECT_POLL);
        };
        let mut log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_path)
            .with_context(|| format!("opening the serial log {}", log_path.display()))?;
        writeln!(
            log,
            "--- serial console {} attached {:.3}s after start",
            socket.display(),
            start.elapsed().as_secs_f64()
        )
        .with_context(|| format!("writing the serial log {}", log_path.display()))?;

        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                lines: Vec::new(),
                partial: Vec::new(),
                partial_at: None,
                closed: false,
                error: None,
            }),
            changed: Condvar::new(),
        });
        let read_half = stream
            .try_clone()
            .context("duplicating the serial socket for the reader thread")?;
        let reader = {
            let shared = Arc::clone(&shared);
            std::thread::Builder::new()
                .name("vmdisk-console".into())
                .spawn(move || read_loop(read_half, log, start, &shared))
                .context("starting the console reader thread")?
        };
        Ok(Console {
            shared,
            stream: Mutex::new(stream),
            reader: Some(reader),
            log_path: log_path.to_path_buf(),
        })
    }

    /// Wait until a line (received so far or later) satisfies `pred`; `what` names it in errors.
    pub fn wait_for(
        &self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&Line) -> bool,
    ) -> Result<Line, WaitError> {
        self.wait_for_from(what, 0, timeout, pred)
    }

    /// Like [`Console::wait_for`], looking only at lines with index `from` or later (take
    /// `from` from [`Console::line_count`] before writing a command, to skip older output).
    pub fn wait_for_from(
        &self,
        what: &str,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&Line) -> bool,
    ) -> Result<Line, WaitError> {
        let began = Instant::now();
        let deadline = began + timeout;
        let mut next = from;
        let mut st = self.shared.lock();
        loop {
            if let Some(l) = st
                .lines
                .get(next..)
                .and_then(|ls| ls.iter().find(|l| pred(l)))
            {
                return Ok(l.clone());
            }
            next = next.max(st.lines.len());
            if st.closed {
                return Err(WaitError::Closed { what: what.into() });
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(WaitError::Timeout {
                    what: what.into(),
                    waited: now - began,
                });
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// All complete lines so far.
    pub fn lines(&self) -> Vec<Line> {
        self.shared.lock().lines.clone()
    }

    /// The complete lines from index `from` on (empty when there are none yet).
    pub fn lines_since(&self, from: usize) -> Vec<Line> {
        self.shared
            .lock()
            .lines
            .get(from..)
            .map(<[Line]>::to_vec)
            .unwrap_or_default()
    }

    /// How many complete lines arrived so far.
    pub fn line_count(&self) -> usize {
        self.shared.lock().lines.len()
    }

    /// The text so far, one line each, plus the unterminated last line if any (a prompt).
    pub fn text(&self) -> String {
        let st = self.shared.lock();
        let mut s = String::new();
        for l in &st.lines {
            s.push_str(&l.text);
            s.push('\n');
        }
        s.push_str(&clean(&st.partial));
        s
    }

    /// The unterminated line being received (e.g. a shell prompt), cleaned.
    pub fn pending(&self) -> String {
        clean(&self.shared.lock().partial)
    }

    /// Whether the stream ended (qemu exited or closed the socket).
    pub fn closed(&self) -> bool {
        self.shared.lock().closed
    }

    /// The read error that ended the stream, if it did not end with a clean EOF.
    pub fn read_error(&self) -> Option<String> {
        self.shared.lock().error.clone()
    }

    /// The log file lines go to.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Type into the console (the guest's serial input).
    pub fn write(&self, bytes: &[u8]) -> Result<()> {
        let mut s = self.stream.lock().unwrap_or_else(|p| p.into_inner());
        s.write_all(bytes)
            .and_then(|()| s.flush())
            .context("writing to the serial console (has qemu exited?)")
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(s) = self.stream.lock() {
            let _ = s.shutdown(Shutdown::Both);
        }
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
    }
}

fn read_loop(mut stream: UnixStream, mut log: File, start: Instant, shared: &Shared) {
    let mut buf = [0u8; READ_CHUNK];
    let mut log_ok = true;
    let mut log_line = |log: &mut File, l: &Line| {
        if log_ok {
            log_ok = writeln!(log, "[{:7.3}] {}", l.at.as_secs_f64(), l.text).is_ok();
        }
    };
    loop {
        let r = stream.read(&mut buf);
        let now = start.elapsed();
        let mut st = shared.lock();
        match r {
            Ok(0) | Err(_) => {
                if let Err(e) = &r {
                    st.error = Some(e.to_string());
                }
                if !st.partial.is_empty() {
                    let l = finish_line(&mut st, now);
                    log_line(&mut log, &l);
                }
                st.closed = true;
                drop(st);
                shared.changed.notify_all();
                return;
            }
            Ok(n) => {
                for &b in &buf[..n] {
                    if b == b'\n' {
                        let l = finish_line(&mut st, now);
                        log_line(&mut log, &l);
                        continue;
                    }
                    if st.partial.is_empty() {
                        st.partial_at = Some(now);
                    }
                    st.partial.push(b);
                    if st.partial.len() >= MAX_LINE_BYTES {
                        let l = finish_line(&mut st, now);
                        log_line(&mut log, &l);
                    }
                }
                drop(st);
                shared.changed.notify_all();
            }
        }
    }
}

/// Move the partial line into `lines` and return a copy.
fn finish_line(st: &mut State, now: Duration) -> Line {
    let l = Line {
        at: st.partial_at.take().unwrap_or(now),
        text: clean(&st.partial),
    };
    st.partial.clear();
    st.lines.push(l.clone());
    l
}

/// Remove terminal noise from one line: ANSI CSI (`ESC [ ... final`) and OSC
/// (`ESC ] ... BEL|ESC \`) sequences, two-byte escapes, `\r` and other control characters
/// except tab. Invalid UTF-8 becomes U+FFFD.
pub fn clean(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        if b == 0x1b {
            i += 1;
            match bytes.get(i) {
                Some(b'[') => {
                    // Parameters and intermediates 0x20..=0x3f, final byte 0x40..=0x7e.
                    i += 1;
                    while i < bytes.len() && (0x20..=0x3f).contains(&bytes[i]) {
                        i += 1;
                    }
                    if i < bytes.len() && (0x40..=0x7e).contains(&bytes[i]) {
                        i += 1;
                    }
                }
                Some(b']') => {
                    i += 1;
                    while i < bytes.len() {
                        if bytes[i] == 0x07 {
                            i += 1;
                            break;
                        }
                        if bytes[i] == 0x1b && bytes.get(i + 1) == Some(&b'\\') {
                            i += 2;
                            break;
                        }
                        i += 1;
                    }
                }
                Some(b'(' | b')' | b'*' | b'+' | b'#' | b'%') => i += 2,
                Some(_) => i += 1,
                None => {}
            }
            continue;
        }
        if b == b'\t' || b >= 0x20 && b != 0x7f {
            out.push(b);
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    fn pair() -> (tempfile::TempDir, PathBuf, UnixListener) {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("serial");
        let l = UnixListener::bind(&sock).unwrap();
        (dir, sock, l)
    }

    #[test]
    fn clean_strips_escapes_and_control_characters() {
        assert_eq!(clean(b"\x1b[0;32mOK\x1b[0m done\r"), "OK done");
        assert_eq!(clean(b"\x1bc\x1b[2J\x1b[?25lBoot"), "Boot");
        assert_eq!(clean(b"\x1b]0;title\x07x\x1b]2;t\x1b\\y"), "xy");
        assert_eq!(clean(b"a\tb\x00\x08c\x7f"), "a\tbc");
        assert_eq!(clean(b"\x1b(Bz"), "z");
        assert_eq!(clean(b"caf\xc3\xa9 \xff"), "caf\u{e9} \u{fffd}");
        assert_eq!(clean(b"tail\x1b"), "tail");
    }

    #[test]
    fn lines_markers_partial_lines_and_log() {
        let (dir, sock, listener) = pair();
        let log = dir.path().join("serial.log");
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"\x1b[1mSeaBIOS\x1b[0m\r\n@@stage1 st")
                .unwrap();
            s.flush().unwrap();
            // The rest of the line comes in a separate write.
            let mut typed = [0u8; 3];
            s.read_exact(&mut typed).unwrap();
            assert_eq!(&typed, b"ls\n");
            s.write_all(b"art\r\nprompt # ").unwrap();
            s
        });
        let start = Instant::now();
        let c = Console::connect(&sock, &log, start, Duration::from_secs(5), &mut || true).unwrap();
        let l = c
            .wait_for("banner", Duration::from_secs(5), |l| l.text == "SeaBIOS")
            .unwrap();
        assert!(l.at < Duration::from_secs(5));
        c.write(b"ls\n").unwrap();
        let l = c
            .wait_for("stage1", Duration::from_secs(5), |l| {
                l.text.contains("@@stage1")
            })
            .unwrap();
        assert_eq!(l.text, "@@stage1 start");
        let s = server.join().unwrap();
        drop(s);
        let e = c
            .wait_for("never", Duration::from_secs(5), |l| l.text == "never")
            .unwrap_err();
        assert_eq!(
            e,
            WaitError::Closed {
                what: "never".into()
            }
        );
        assert!(c.closed());
        let texts: Vec<String> = c.lines().into_iter().map(|l| l.text).collect();
        assert_eq!(texts, ["SeaBIOS", "@@stage1 start", "prompt # "]);
        assert_eq!(c.text(), "SeaBIOS\n@@stage1 start\nprompt # \n");
        drop(c);
        let logged = std::fs::read_to_string(&log).unwrap();
        let body: Vec<&str> = logged.lines().skip(1).collect();
        assert_eq!(body.len(), 3, "{logged}");
        assert!(body[1].starts_with('[') && body[1].ends_with("] @@stage1 start"));
        assert_eq!(body[0].find(']'), Some(8), "fixed-width stamp: {logged}");
    }

    #[test]
    fn wait_for_times_out_and_names_what() {
        let (dir, sock, listener) = pair();
        let server = std::thread::spawn(move || listener.accept().unwrap().0);
        let c = Console::connect(
            &sock,
            &dir.path().join("log"),
            Instant::now(),
            Duration::from_secs(5),
            &mut || true,
        )
        .unwrap();
        let _s = server.join().unwrap();
        let e = c
            .wait_for("login prompt", Duration::from_millis(50), |_| true)
            .unwrap_err();
        match &e {
            WaitError::Timeout { what, waited } => {
                assert_eq!(what, "login prompt");
                assert!(*waited >= Duration::from_millis(50));
            }
            other => panic!("{other:?}"),
        }
        assert!(e.to_string().contains("login prompt"));
        assert!(!c.closed());
    }

    #[test]
    fn wait_for_from_skips_older_lines() {
        let (dir, sock, listener) = pair();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"# \nold\n").unwrap();
            let mut b = [0u8; 1];
            s.read_exact(&mut b).unwrap();
            s.write_all(b"new\n# \n").unwrap();
            s
        });
        let c = Console::connect(
            &sock,
            &dir.path().join("log"),
            Instant::now(),
            Duration::from_secs(5),
            &mut || true,
        )
        .unwrap();
        c.wait_for("old", Duration::from_secs(5), |l| l.text == "old")
            .unwrap();
        let from = c.line_count();
        c.write(b"x").unwrap();
        let l = c
            .wait_for_from("prompt", from, Duration::from_secs(5), |l| l.text == "# ")
            .unwrap();
        assert_eq!(c.lines()[from].text, "new");
        assert!(l.at >= c.lines()[from].at);
        drop(server.join().unwrap());
    }

    #[test]
    fn connect_retries_until_the_socket_appears() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("late");
        let s2 = sock.clone();
        let (tx, rx) = std::sync::mpsc::channel::<()>();
        let server = std::thread::spawn(move || {
            // Bind only after the client has started trying.
            rx.recv().unwrap();
            let l = UnixListener::bind(&s2).unwrap();
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"hello\n").unwrap();
            s
        });
        let mut tries = 0;
        let c = Console::connect(
            &sock,
            &dir.path().join("log"),
            Instant::now(),
            Duration::from_secs(5),
            &mut || {
                tries += 1;
                if tries == 2 {
                    tx.send(()).unwrap();
                }
                true
            },
        )
        .unwrap();
        c.wait_for("hello", Duration::from_secs(5), |l| l.text == "hello")
            .unwrap();
        drop(server.join().unwrap());
    }

    #[test]
    fn connect_gives_up_when_qemu_died_or_time_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("never");
        let log = dir.path().join("log");
        let e = Console::connect(
            &sock,
            &log,
            Instant::now(),
            Duration::from_secs(60),
            &mut || false,
        )
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("qemu exited"), "{e:#}");
        let t = Instant::now();
        let e = Console::connect(
            &sock,
            &log,
            Instant::now(),
            Duration::from_millis(30),
            &mut || true,
        )
        .err()
        .unwrap();
        assert!(t.elapsed() < Duration::from_secs(5));
        assert!(
            format!("{e:#}").contains("did not open its serial socket"),
            "{e:#}"
        );
    }

    #[test]
    fn overlong_lines_are_split() {
        let (dir, sock, listener) = pair();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(&vec![b'x'; MAX_LINE_BYTES + 10]).unwrap();
            s.write_all(b"\n").unwrap();
        });
        let c = Console::connect(
            &sock,
            &dir.path().join("log"),
            Instant::now(),
            Duration::from_secs(5),
            &mut || true,
        )
        .unwrap();
        server.join().unwrap();
        let _ = c.wait_for("end", Duration::from_secs(5), |_| false);
        let lens: Vec<usize> = c.lines().iter().map(|l| l.text.len()).collect();
        assert_eq!(lens, [MAX_LINE_BYTES, 10]);
    }
}
