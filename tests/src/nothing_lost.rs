//! Helpers for the "nothing lost" tests (issue #12): fingerprints of a directory (every file's
//! sha256, so "the original is as it was and nothing was left behind" is one assertion), a
//! small tmpfs for running out of space, `vmdisk` started in the background so it can be
//! signalled at a known point, and qemu-nbd holding an image the way a running VM does.
//!
//! Readiness is always observed (a file appearing or growing, a line on stderr), never
//! slept for: [`wait_for`] polls with a deadline. A process is paused with SIGSTOP while the
//! test changes the world under it (fills the disk, queues a signal), so the moment it is
//! interrupted does not depend on how loaded the machine is.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{cmdline, require_guest_tool, require_tool, s, sha256, Run};

/// The names vmdisk gives its temporaries: new outputs (`.NAME.vmdisk-tmp-PID`) and the
/// scratch directory of a layout build (`.vmdisk-layout-XXXX`).
pub const TEMP_MARKERS: &[&str] = &[".vmdisk-tmp-", ".vmdisk-layout-"];

/// Generous deadline for anything a test waits for on a loaded 2-core machine.
pub const DEADLINE: Duration = Duration::from_secs(120);

/// What a directory holds: every entry (recursively, by relative path) with the sha256 of a
/// file, the target of a symlink, or "dir".
pub type DirState = BTreeMap<String, String>;

/// Fingerprint `dir` (see [`DirState`]).
pub fn dir_state(dir: &Path) -> DirState {
    fn walk(root: &Path, dir: &Path, out: &mut DirState) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("read_dir {}: {e}", dir.display()))
            .map(|e| e.expect("dir entry").path())
            .collect();
        entries.sort();
        for p in entries {
            let rel = p
                .strip_prefix(root)
                .expect("inside root")
                .display()
                .to_string();
            let m = std::fs::symlink_metadata(&p)
                .unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
            if m.file_type().is_symlink() {
                let t = std::fs::read_link(&p).expect("readlink");
                out.insert(rel, format!("symlink -> {}", t.display()));
            } else if m.is_dir() {
                out.insert(rel, "dir".into());
                walk(root, &p, out);
            } else {
                out.insert(rel, format!("{} bytes, sha256 {}", m.len(), sha256(&p)));
            }
        }
    }
    let mut out = DirState::new();
    walk(dir, dir, &mut out);
    out
}

/// Entries of `dir` (recursively) whose names are vmdisk temporaries.
pub fn leftovers(dir: &Path) -> Vec<String> {
    dir_state(dir)
        .into_keys()
        .filter(|k| TEMP_MARKERS.iter().any(|m| k.contains(m)))
        .collect()
}

/// The differences between two fingerprints, one line each (empty when equal).
pub fn state_diff(before: &DirState, after: &DirState) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in before {
        match after.get(k) {
            None => out.push(format!("{k}: removed (was {v})")),
            Some(w) if w != v => out.push(format!("{k}: changed: {v} -> {w}")),
            _ => {}
        }
    }
    for (k, v) in after {
        if !before.contains_key(k) {
            out.push(format!("{k}: appeared ({v})"));
        }
    }
    out
}

/// Panic unless `dir` is exactly as `before` said: every file sha256-identical, nothing
/// removed, nothing (no temporary) added. `what` and `run` go into the message.
#[track_caller]
pub fn assert_unchanged(dir: &Path, before: &DirState, what: &str, run: &dyn std::fmt::Display) {
    let diff = state_diff(before, &dir_state(dir));
    assert!(
        diff.is_empty(),
        "{what}: the directory is not as it was:\n  {}\nthe command:\n{run}",
        diff.join("\n  ")
    );
}

/// Panic unless `dir` holds no vmdisk temporary.
#[track_caller]
pub fn assert_no_leftovers(dir: &Path, what: &str, run: &dyn std::fmt::Display) {
    let left = leftovers(dir);
    assert!(
        left.is_empty(),
        "{what}: temporaries were left behind: {left:?}\nthe command:\n{run}"
    );
}

/// Poll `cond` every 5 ms until it holds; panic naming `what` (and `context()`, e.g. the
/// process's stderr) when [`DEADLINE`] passes first.
#[track_caller]
pub fn wait_for(what: &str, mut cond: impl FnMut() -> bool, context: impl Fn() -> String) {
    let deadline = Instant::now() + DEADLINE;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {} s waiting for {what}\n{}",
            DEADLINE.as_secs(),
            context()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Bytes allocated to `path` on its filesystem (0 when it does not exist).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}

/// The first entry of `dir` (not recursive) whose name contains `marker`.
pub fn find_entry(dir: &Path, marker: &str) -> Option<PathBuf> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().contains(marker))
        })
}

/// Bytes free for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(s(dir)).expect("no NUL in test paths");
    // SAFETY: statvfs fills the zeroed struct it is given; `c` is NUL-terminated and lives
    // for the call.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        assert_eq!(
            libc::statvfs(c.as_ptr(), &mut st),
            0,
            "statvfs {}: {}",
            dir.display(),
            std::io::Error::last_os_error()
        );
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

#[track_caller]
pub fn require_root(what: &str) {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "{what} needs root (it mounts a small tmpfs to run out of space); CI runs these tests \
         as root: run them as root (sudo -E cargo test -p tests --test ...)"
    );
}

/// A tmpfs of a fixed size mounted on a fresh temp dir; unmounted (lazily if busy) and
/// removed on drop, so a failing test leaves no mount behind.
pub struct Tmpfs {
    pub dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    /// Mount a tmpfs of `size` (tmpfs syntax: `16M`) — needs root.
    #[track_caller]
    pub fn mount(size: &str) -> Tmpfs {
        require_root("running out of space");
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("small");
        std::fs::create_dir(&dir).expect("mkdir");
        let r = crate::run(
            Command::new(require_guest_tool("mount"))
                .args(["-t", "tmpfs", "-o"])
                .arg(format!("size={size},mode=0755"))
                .arg("tmpfs")
                .arg(&dir),
        );
        assert!(r.success(), "mounting a {size} tmpfs failed:\n{r}");
        Tmpfs {
            dir,
            _parent: parent,
        }
    }

    /// Fill the filesystem to the last byte with a file named `name`; returns its path.
    pub fn fill(&self, name: &str) -> PathBuf {
        fill_dir(&self.dir, name)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let umount = require_guest_tool("umount");
        let ok = Command::new(&umount)
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|st| st.success());
        if !ok {
            let _ = Command::new(&umount).arg("-l").arg(&self.dir).status();
        }
    }
}

/// Write `dir/name` until the filesystem is full (ENOSPC); returns its path.
pub fn fill_dir(dir: &Path, name: &str) -> PathBuf {
    use std::io::Write as _;
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).unwrap_or_else(|e| panic!("create {}: {e}", p.display()));
    let block = vec![0x5au8; 64 * 1024];
    let mut small = false;
    loop {
        let buf = if small { &block[..4096] } else { &block[..] };
        match f.write(buf) {
            Ok(0) => break,
            Ok(_) => {}
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && !small => small = true,
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", p.display()),
        }
    }
    let _ = f.sync_all();
    p
}

/// A `vmdisk` process started in the background with its output in files, so it can be
/// signalled at a point the test chose; killed and reaped on drop.
pub struct Spawned {
    pub child: std::process::Child,
    pub cmdline: String,
    pub cwd: PathBuf,
    out: PathBuf,
    err: PathBuf,
    _logs: tempfile::TempDir,
    /// Directories that must live as long as the process (e.g. a socket's).
    dirs: Vec<tempfile::TempDir>,
}

impl Spawned {
    /// Start `vmdisk ARGS` in `cwd`.
    pub fn vmdisk<S: AsRef<OsStr>>(cwd: &Path, args: &[S]) -> Spawned {
        let mut cmd = Command::new(crate::vmdisk_bin());
        cmd.current_dir(cwd).args(args);
        Spawned::start(cmd)
    }

    /// Start `cmd` (its cwd recorded for messages).
    pub fn start(mut cmd: Command) -> Spawned {
        let logs = tempfile::tempdir().expect("tempdir");
        let out = logs.path().join("stdout");
        let err = logs.path().join("stderr");
        let line = cmdline(&cmd);
        let cwd = cmd
            .get_current_dir()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).expect("log"))
            .stderr(std::fs::File::create(&err).expect("log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        Spawned {
            child,
            cmdline: line,
            cwd,
            out,
            err,
            _logs: logs,
            dirs: Vec::new(),
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Send `sig` (the process has not been reaped, so its pid is still ours).
    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill(2) on our own child, which is reaped only by `wait`/drop.
        unsafe { libc::kill(self.pid(), sig) };
    }

    /// Still running (or stopped)?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// Command line, state and output so far, for messages.
    pub fn describe(&mut self) -> String {
        let state = match self.child.try_wait() {
            Ok(Some(st)) => format!("exited: {st}"),
            Ok(None) => "still running".into(),
            Err(e) => format!("unknown: {e}"),
        };
        format!(
            "  $ {}\n    (in {})\n  state: {state}\n  stdout: {}\n  stderr: {}",
            self.cmdline,
            self.cwd.display(),
            self.stdout().trim_end(),
            self.stderr().trim_end()
        )
    }

    /// Pause it (SIGSTOP) and wait until the kernel says it is stopped, so nothing it does
    /// races with what the test does next.
    #[track_caller]
    pub fn pause(&mut self) {
        self.signal(libc::SIGSTOP);
        let pid = self.pid();
        let stat = format!("/proc/{pid}/stat");
        let stopped = || {
            std::fs::read_to_string(&stat).map_or(true, |st| {
                // "pid (comm) S ...": the state follows the last ')'.
                st.rsplit_once(')')
                    .and_then(|(_, rest)| rest.split_whitespace().next())
                    .is_some_and(|state| state == "T" || state == "Z" || state == "X")
            })
        };
        let deadline = Instant::now() + DEADLINE;
        while !stopped() {
            assert!(Instant::now() < deadline, "SIGSTOP did not stop {pid}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// Wait for it to exit (at most [`DEADLINE`], then SIGKILL and panic as hung); returns
    /// the record.
    #[track_caller]
    pub fn wait(mut self) -> Run {
        let deadline = Instant::now() + DEADLINE;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(st)) => break st,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                _ => {
                    self.resume();
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    panic!(
                        "HUNG: still running after {} s, killed:\n{}",
                        DEADLINE.as_secs(),
                        self.describe()
                    );
                }
            }
        };
        Run {
            cmdline: self.cmdline.clone(),
            cwd: Some(self.cwd.clone()),
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// qemu's "write" permission byte and its "I do not share write" byte (see tests/locks.rs).
const QEMU_PERM_WRITE: i64 = 101;
const QEMU_SHARED_WRITE: i64 = 201;

/// qemu-nbd serving `img` (format `fmt`) read-write, as a running VM holds its disk: qemu's
/// write lock is held until the returned process is dropped.
#[track_caller]
pub fn qemu_holds(img: &Path, fmt: &str) -> Spawned {
    let sock_dir = tempfile::tempdir().expect("tempdir");
    let sock = sock_dir.path().join("nbd.sock");
    let mut cmd = Command::new(require_tool("qemu-nbd"));
    cmd.arg("--socket").arg(&sock).args(["-f", fmt]).arg(img);
    let mut p = Spawned::start(cmd);
    p.dirs.push(sock_dir);
    let mut alive = true;
    wait_for(
        "qemu-nbd to take the write lock",
        || {
            alive = p.alive();
            !alive
                || (crate::lock_byte_held(img, QEMU_PERM_WRITE)
                    && crate::lock_byte_held(img, QEMU_SHARED_WRITE))
        },
        String::new,
    );
    assert!(alive, "TEST BUG: qemu-nbd exited:\n{}", p.describe());
    p
}

/// Incompressible bytes (seeded): what a disk full of compressed or encrypted data holds.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    crate::Rng::new(seed).bytes(len)
}

/// A sparse raw image of `size` bytes with `data` bytes of incompressible data written in
/// 1 MiB pieces spread evenly across it (seeded).
pub fn make_big_raw(path: &Path, size: u64, data: u64, seed: u64) {
    use std::os::unix::fs::FileExt;
    let f =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
    let piece = crate::MIB;
    let n = data / piece;
    let stride = (size / n.max(1)) / piece * piece;
    let mut rng = crate::Rng::new(seed);
    let mut buf = vec![0u8; piece as usize];
    for i in 0..n {
        rng.fill(&mut buf);
        f.write_all_at(&buf, i * stride).expect("write");
    }
}

/// `umount` on drop is done by [`Tmpfs`]; this checks a mount really is a tmpfs (so a test
/// that means to run out of space is not filling the host's disk).
#[track_caller]
pub fn assert_is_tmpfs(dir: &Path) {
    let c = std::ffi::CString::new(s(dir)).expect("no NUL");
    // SAFETY: statfs fills the zeroed struct it is given; `c` lives for the call.
    let ty = unsafe {
        let mut st: libc::statfs = std::mem::zeroed();
        assert_eq!(libc::statfs(c.as_ptr(), &mut st), 0, "statfs");
        st.f_type
    };
    assert_eq!(ty, libc::TMPFS_MAGIC, "{} is not a tmpfs", dir.display());
}

/// The disko layout of the guest tests: a 128 MiB ESP and an ext4 root (LABEL=nixos) filling
/// the rest.
pub fn esp_root_layout() -> PathBuf {
    let p = crate::workspace_root().join("crates/vmdisk-layout/tests/fixtures/esp-root.json");
    assert!(p.is_file(), "fixture {} is missing", p.display());
    p
}

/// `/etc/passwd` and `/etc/shadow` of the small guest [`make_guest`] builds.
pub const GUEST_PASSWD: &str =
    "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:1000::/home/alice:/bin/sh\n";
pub const GUEST_SHADOW: &str = "root:!:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n";

/// A ready-made sha512-crypt hash for `passwd --hash` (`openssl passwd -6 -salt nothinglost
/// vmdisk`).
pub const HASH: &str = "$6$nothinglost$2jWZ7LwKX2TUZxPOHLGL1eGCX9YsKxaamzGj6QKIjNhSyfwkcDrNMXfQOTQcuwYxlSJpmNJeg9d1TBBPAMI00/";

/// Build a guest disk (GPT: ESP + ext4 root holding `/etc/passwd`, `/etc/shadow` and the
/// files of `extra`, relative path -> content) of format `fmt` at `img`, 256 MiB.
#[track_caller]
pub fn make_guest(img: &Path, fmt: &str, extra: &[(&str, Vec<u8>)]) {
    let tree = tempfile::tempdir().expect("tempdir");
    let put = |rel: &str, data: &[u8]| {
        let p = tree.path().join(rel);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, data).expect("write");
    };
    put("etc/passwd", GUEST_PASSWD.as_bytes());
    put("etc/shadow", GUEST_SHADOW.as_bytes());
    for (rel, data) in extra {
        put(rel, data);
    }
    crate::vmdisk(&[
        "create",
        "-q",
        "-f",
        fmt,
        "--layout",
        s(&esp_root_layout()),
        "--copy-in",
        &format!("root={}", s(tree.path())),
        "--seed",
        "12",
        s(img),
        "256M",
    ])
    .ok();
}
