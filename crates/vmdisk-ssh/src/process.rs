//! Run a program to completion within a deadline, its output captured.
//!
//! The child gets its own process group, so on timeout the whole group dies (ssh and a
//! `ProxyCommand`, a shell and its grandchildren); a grandchild that keeps the pipes open cannot
//! make us wait past the deadline plus [`DRAIN_GRACE`].

use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long to wait for the output pipes to drain after the process ended or was killed.
pub const DRAIN_GRACE: Duration = Duration::from_secs(2);
/// Bytes kept of each of stdout and stderr; the rest is read and dropped, so a runaway remote
/// command cannot exhaust memory (the largest capture anyone needs is a guest-built binary of a
/// few KiB, or a page of ssh diagnostics).
pub const MAX_CAPTURE_BYTES: usize = 64 << 20;
/// How often spawning is retried on ETXTBSY (see [`run_bounded`]).
const SPAWN_BUSY_RETRIES: u32 = 50;

/// What a finished program produced.
#[derive(Clone, Debug)]
pub struct Output {
    /// Exit code; None when a signal ended it.
    pub status: Option<i32>,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub elapsed: Duration,
}

impl Output {
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("starting {program}")]
    Spawning {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for {program}")]
    Waiting {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{program} did not finish within {:.1}s and was killed; its stderr so far: {}",
        timeout.as_secs_f64(),
        stderr.trim()
    )]
    TimedOut {
        program: String,
        timeout: Duration,
        stderr: String,
    },
}

impl RunError {
    pub fn is_timeout(&self) -> bool {
        matches!(self, RunError::TimedOut { .. })
    }
}

/// Run `cmd` to completion, feeding `stdin` (or /dev/null) and collecting its output; after
/// `timeout` kill its whole process group and fail. Never waits longer than `timeout` plus
/// [`DRAIN_GRACE`].
pub fn run_bounded(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<Output, RunError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let t0 = Instant::now();
    let mut child = spawn_retrying_busy(cmd).map_err(|source| RunError::Spawning {
        program: program.clone(),
        source,
    })?;
    let pid = child.id();

    let writer = match (stdin, child.stdin.take()) {
        (Some(data), Some(mut pipe)) => {
            let data = data.to_vec();
            // A write error means the command stopped reading; its exit status says why.
            Some(std::thread::spawn(move || {
                let _ = pipe.write_all(&data);
            }))
        }
        _ => None,
    };
    let drain = |p: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut kept = Vec::new();
            if let Some(mut p) = p {
                let mut chunk = [0u8; 16 * 1024];
                loop {
                    match p.read(&mut chunk) {
                        Ok(0) => break,
                        Ok(n) => {
                            let room = MAX_CAPTURE_BYTES.saturating_sub(kept.len());
                            kept.extend_from_slice(&chunk[..n.min(room)]);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => break,
                    }
                }
            }
            kept
        })
    };
    let out = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let err = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );

    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait());
    });
    let (status, timed_out) = match rx.recv_timeout(timeout) {
        Ok(s) => (s, false),
        Err(_) => {
            // SAFETY: signals the process group we created for this child (process_group(0)
            // made its pgid equal to its pid); the child is not reaped yet, so the id is ours.
            unsafe {
                libc::kill(-(pid as libc::pid_t), libc::SIGKILL);
            }
            let s = rx
                .recv_timeout(DRAIN_GRACE)
                .unwrap_or_else(|_| Err(std::io::Error::other("not reaped after SIGKILL")));
            (s, true)
        }
    };
    let elapsed = t0.elapsed();
    let grace = Instant::now() + DRAIN_GRACE;
    let join = |h: std::thread::JoinHandle<Vec<u8>>| {
        while !h.is_finished() && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(2));
        }
        if h.is_finished() {
            h.join().unwrap_or_default()
        } else {
            Vec::new()
        }
    };
    let stdout = join(out);
    let stderr = join(err);
    drop(writer);
    if timed_out {
        return Err(RunError::TimedOut {
            program,
            timeout,
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
        });
    }
    let status = status.map_err(|source| RunError::Waiting {
        program: program.clone(),
        source,
    })?;
    Ok(Output {
        status: status.code(),
        stdout,
        stderr,
        elapsed,
    })
}

/// Spawn, retrying briefly on ETXTBSY: a script written a moment ago can still be open for
/// writing in a child another thread is forking.
fn spawn_retrying_busy(cmd: &mut Command) -> std::io::Result<std::process::Child> {
    let mut tries = 0;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < SPAWN_BUSY_RETRIES => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(2));
            }
            r => return r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feeds_stdin_collects_output_and_exit_status() {
        let mut c = Command::new("sh");
        c.args(["-c", "cat; echo err >&2; exit 3"]);
        let out = run_bounded(&mut c, Some(b"hello"), Duration::from_secs(10)).unwrap();
        assert_eq!(out.status, Some(3));
        assert_eq!(out.stdout, b"hello");
        assert_eq!(out.stderr, b"err\n");
    }

    #[test]
    fn kills_the_process_group_on_timeout() {
        // A grandchild holding the pipes open dies with the process group.
        let mut c = Command::new("sh");
        c.args(["-c", "echo started >&2; sleep 30 & sleep 30"]);
        let t = Instant::now();
        let e = run_bounded(&mut c, None, Duration::from_millis(300)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(e.is_timeout());
        let msg = e.to_string();
        assert!(
            msg.contains("was killed") && msg.contains("started"),
            "{msg}"
        );
    }

    #[test]
    fn a_missing_program_is_a_spawn_error() {
        let mut c = Command::new("/nonexistent/vmdisk-no-such-program");
        let e = run_bounded(&mut c, None, Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, RunError::Spawning { .. }), "{e:?}");
    }
}
