//! Shared helpers for the interop tests in `tests/tests/*.rs`.
//!
//! The oracles are tools no one here wrote: `qemu-img`, `qemu-io`, `qemu-nbd`. The helpers
//! find (and build once) the `vmdisk` binary, run commands and capture everything a failure
//! message needs, make deterministic data, and build qemu-made fixtures in temp dirs.
//!
//! Rules the helpers enforce: a missing tool is a panic naming the Debian package to install
//! (tests never skip); every command's failure message shows the command line, its exit
//! status, stdout and stderr.

use std::fmt;
use std::fs;
use std::io::Write as _;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use tempfile;

pub mod doctor;
pub mod ext4edit;
pub mod mount;
pub mod nbdsh;
pub mod nothing_lost;
pub mod portable;
pub mod sshd;
pub mod testvm;

/// KiB / MiB in bytes.
pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

// ---------------------------------------------------------------------------------------------
// Tools
// ---------------------------------------------------------------------------------------------

/// Debian package providing each external tool the tests use.
const TOOL_PACKAGES: &[(&str, &str)] = &[
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    ("sha256sum", "coreutils"),
    ("nix-instantiate", "nix-bin"),
];

fn find_in_path(tool: &str) -> Option<PathBuf> {
    let paths = std::env::var_os("PATH")?;
    std::env::split_paths(&paths)
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Path of an external tool; panics with the package to install when it is missing.
pub fn require_tool(tool: &str) -> PathBuf {
    match find_in_path(tool) {
        Some(p) => p,
        None => {
            let pkg = TOOL_PACKAGES
                .iter()
                .find(|(t, _)| *t == tool)
                .map(|(_, p)| *p)
                .unwrap_or(tool);
            panic!(
                "required tool `{tool}` is not installed; these interop tests never skip.\n\
                 install it with:  sudo apt-get install -y {pkg}   (or: cargo xtask deps)"
            )
        }
    }
}

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests crate lives inside the workspace")
        .to_path_buf()
}

/// The `vmdisk` binary, built once per test process with `cargo build -p vmdisk`
/// (test profile).
///
/// `VMDISK_BIN` overrides it (to run the suite against an installed binary).
pub fn vmdisk_bin() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("VMDISK_BIN") {
            return PathBuf::from(p);
        }
        cargo_build_bin("vmdisk", "vmdisk")
    })
}

/// Build `bin` of package `pkg` with cargo and return the executable's path (taken from
/// cargo's own JSON messages, so any target dir layout works).
pub fn cargo_build_bin(pkg: &str, bin: &str) -> PathBuf {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // The test profile: the libraries are already built that way for this test binary, so
    // only the binary itself is left to compile (and it runs at the test opt-level).
    cmd.current_dir(workspace_root()).args([
        "build",
        "-q",
        "--profile",
        "test",
        "-p",
        pkg,
        "--bin",
        bin,
        "--message-format=json-render-diagnostics",
    ]);
    let out = run(&mut cmd);
    assert!(
        out.status.success(),
        "building `{bin}` failed (a product build error, not a test failure):\n  $ {}\n{}",
        out.cmdline,
        out.stderr
    );
    let exe = out
        .stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["reason"] == "compiler-artifact" && v["target"]["name"] == bin)
        .find_map(|v| v["executable"].as_str().map(PathBuf::from))
        .unwrap_or_else(|| panic!("cargo did not report an executable for `{bin}`:\n{out}"));
    assert!(
        exe.is_file(),
        "{} does not exist after the build",
        exe.display()
    );
    exe
}

// ---------------------------------------------------------------------------------------------
// Running commands
// ---------------------------------------------------------------------------------------------

/// A finished command with everything a failure message needs.
pub struct Run {
    pub cmdline: String,
    pub cwd: Option<PathBuf>,
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Exit code; a death by signal is reported as `-signal`.
    pub fn code(&self) -> i32 {
        use std::os::unix::process::ExitStatusExt;
        self.status
            .code()
            .unwrap_or_else(|| -self.status.signal().unwrap_or(0))
    }

    pub fn success(&self) -> bool {
        self.status.success()
    }

    /// Panic with the full record unless the command exited 0.
    #[track_caller]
    pub fn ok(self) -> Self {
        assert!(self.success(), "command failed:\n{self}");
        self
    }

    /// Panic with the full record unless the command exited with `code`.
    #[track_caller]
    pub fn expect_code(self, code: i32) -> Self {
        assert_eq!(self.code(), code, "unexpected exit code:\n{self}");
        self
    }

    /// stdout parsed as JSON (panics with the record when it is not JSON).
    #[track_caller]
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }

    /// stdout and stderr together, lower-cased (for "the message names X" checks).
    pub fn all_output_lower(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr).to_lowercase()
    }
}

impl fmt::Display for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "  $ {}", self.cmdline)?;
        if let Some(cwd) = &self.cwd {
            writeln!(f, "    (in {})", cwd.display())?;
        }
        writeln!(f, "  exit: {}", self.code())?;
        writeln!(f, "  stdout: {}", clip(&self.stdout))?;
        write!(f, "  stderr: {}", clip(&self.stderr))
    }
}

impl fmt::Debug for Run {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn clip(s: &str) -> String {
    const MAX: usize = 6000;
    let s = s.trim_end();
    if s.is_empty() {
        return "(empty)".into();
    }
    if s.len() <= MAX {
        return format!("\n{s}");
    }
    let mut cut = MAX;
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("\n{}\n  ... ({} more bytes)", &s[..cut], s.len() - cut)
}

/// Shell-ish rendering of a command for messages.
pub fn cmdline(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.is_empty() || a.contains(|c: char| c.is_whitespace() || "'\"$;&|".contains(c)) {
            s.push_str(&format!(" '{}'", a.replace('\'', "'\\''")));
        } else {
            s.push(' ');
            s.push_str(&a);
        }
    }
    s
}

/// Longest any single command may take before it is killed and reported as hung.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);

/// Run `cmd` to completion (stdin closed), capturing stdout and stderr; a command still
/// running after [`COMMAND_TIMEOUT`] is killed (SIGKILL) and its record says so.
pub fn run(cmd: &mut Command) -> Run {
    run_with_timeout(cmd, COMMAND_TIMEOUT)
}

/// [`run`] with an explicit timeout.
pub fn run_with_timeout(cmd: &mut Command, timeout: Duration) -> Run {
    run_core(cmd, None, timeout).0
}

fn to_args<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Vec<std::ffi::OsString> {
    args.iter().map(|a| a.as_ref().to_owned()).collect()
}

/// Run `vmdisk ARGS...` in the current directory.
pub fn vmdisk<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run(Command::new(vmdisk_bin()).args(to_args(args)))
}

/// Run `vmdisk ARGS...` in `cwd` (relative paths resolve from there).
pub fn vmdisk_in<S: AsRef<std::ffi::OsStr>>(cwd: &Path, args: &[S]) -> Run {
    run(Command::new(vmdisk_bin())
        .current_dir(cwd)
        .args(to_args(args)))
}

/// Run `qemu-img ARGS...`.
pub fn qemu_img<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run(Command::new(require_tool("qemu-img")).args(to_args(args)))
}

/// Run `qemu-img ARGS...` in `cwd`.
pub fn qemu_img_in<S: AsRef<std::ffi::OsStr>>(cwd: &Path, args: &[S]) -> Run {
    run(Command::new(require_tool("qemu-img"))
        .current_dir(cwd)
        .args(to_args(args)))
}

/// Run qemu-io on a qcow2 image with one `-c` per command; panics unless it succeeds and
/// printed no error (qemu-io exits 0 even when a command fails).
#[track_caller]
pub fn qemu_io(img: &Path, cmds: &[String]) -> Run {
    qemu_io_fmt(img, "qcow2", cmds)
}

/// [`qemu_io`] for an image of format `fmt`.
#[track_caller]
pub fn qemu_io_fmt(img: &Path, fmt: &str, cmds: &[String]) -> Run {
    let mut cmd = Command::new(require_tool("qemu-io"));
    cmd.arg("-f").arg(fmt);
    for c in cmds {
        cmd.arg("-c").arg(c);
    }
    cmd.arg(img);
    let r = run(&mut cmd);
    let failed = !r.success()
        || r.stderr.contains("failed")
        || r.stdout.contains("failed:")
        || r.stderr.contains("qemu-io:");
    assert!(!failed, "qemu-io failed:\n{r}");
    r
}

/// sha256 of a file (hex), computed by `sha256sum`.
pub fn sha256(path: &Path) -> String {
    let r = run(Command::new(require_tool("sha256sum")).arg(path)).ok();
    r.stdout
        .split_whitespace()
        .next()
        .unwrap_or_else(|| panic!("no sha256sum output:\n{r}"))
        .to_string()
}

/// `path` as a str (panics on non-UTF-8, which tests never create).
pub fn s(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

// ---------------------------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------------------------

/// A small, fast, seeded PRNG (xorshift64*), so failures reproduce from the printed seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `[lo, hi)`; `hi > lo`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        assert!(hi > lo, "empty range {lo}..{hi}");
        lo + self.next_u64() % (hi - lo)
    }

    /// True with probability `num/den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.range(0, den) < num
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }

    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.fill(&mut v);
        v
    }
}

/// `len` bytes of mixed content: per 4 KiB block random (incompressible), text-like
/// (compressible), a repeated byte, or zeros. Deterministic in `seed`.
pub fn mixed_data(seed: u64, len: usize) -> Vec<u8> {
    const WORDS: &[&str] = &[
        "qcow2 ",
        "cluster ",
        "refcount ",
        "backing ",
        "snapshot ",
        "nixos ",
        "vmdisk ",
        "L2 ",
        "\n",
    ];
    let mut rng = Rng::new(seed);
    let mut out = vec![0u8; len];
    for block in out.chunks_mut(4096) {
        match rng.range(0, 8) {
            0..=2 => rng.fill(block),
            3..=5 => {
                let mut pos = 0;
                while pos < block.len() {
                    let w = WORDS[rng.range(0, WORDS.len() as u64) as usize].as_bytes();
                    let n = w.len().min(block.len() - pos);
                    block[pos..pos + n].copy_from_slice(&w[..n]);
                    pos += n;
                }
            }
            6 => block.fill(rng.range(1, 256) as u8),
            _ => {} // zeros
        }
    }
    out
}

/// Write a sparse raw file of `size` bytes with `regions` runs of mixed data at seeded,
/// mostly unaligned offsets (holes between them). Returns the file content.
pub fn make_sparse_raw(path: &Path, size: u64, seed: u64, regions: usize, max_len: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed ^ 0x5eed);
    let mut content = vec![0u8; size as usize];
    let f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).expect("set_len");
    use std::os::unix::fs::FileExt;
    for i in 0..regions {
        let len = rng.range(1, max_len.min(size));
        let off = if rng.chance(1, 3) {
            // cluster-aligned start, to make whole allocated clusters too
            rng.range(0, (size - len) / 65536 + 1) * 65536
        } else {
            rng.range(0, size - len)
        };
        let data = mixed_data(seed.wrapping_add(i as u64 * 7919), len as usize);
        f.write_all_at(&data, off).expect("write region");
        content[off as usize..(off + len) as usize].copy_from_slice(&data);
    }
    f.sync_all().ok();
    content
}

/// Write `data` to a new file at `path`.
pub fn write_file(path: &Path, data: &[u8]) {
    let mut f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.write_all(data).expect("write file");
}

/// Write `data` as a sparse raw file (all-zero 4 KiB blocks become holes).
pub fn write_sparse_file(path: &Path, data: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(data.len() as u64).expect("set_len");
    for (i, block) in data.chunks(4096).enumerate() {
        if block.iter().any(|&b| b != 0) {
            f.write_all_at(block, i as u64 * 4096).expect("write block");
        }
    }
}

/// The first offset where `a` and `b` differ, with a short hex window, for messages.
pub fn first_difference(a: &[u8], b: &[u8]) -> Option<String> {
    if a.len() != b.len() {
        return Some(format!("lengths differ: {} vs {}", a.len(), b.len()));
    }
    let pos = a.iter().zip(b).position(|(x, y)| x != y)?;
    let end = (pos + 16).min(a.len());
    Some(format!(
        "first difference at byte {pos:#x}: {:02x?} vs {:02x?}",
        &a[pos..end],
        &b[pos..end]
    ))
}

// ---------------------------------------------------------------------------------------------
// qemu-made fixtures and oracle checks
// ---------------------------------------------------------------------------------------------

/// `qemu-img convert -O raw SRC DST` (from `cwd`), returning DST's sha256.
pub fn qemu_raw_sha(cwd: &Path, src: &str, dst: &Path) -> String {
    qemu_img_in(cwd, &["convert", "-O", "raw", src, s(dst)]).ok();
    sha256(dst)
}

/// `qemu-img check --output=json FILE`: (exit code, parsed report, record).
pub fn qemu_check(img: &Path) -> (i32, serde_json::Value, Run) {
    let r = qemu_img(&["check", "--output=json", s(img)]);
    let v = serde_json::from_str(&r.stdout).unwrap_or(serde_json::Value::Null);
    (r.code(), v, r)
}

/// Panic unless `qemu-img check` finds the image clean: exit 0, no leaks, no corruption.
#[track_caller]
pub fn assert_qemu_check_clean(img: &Path, what: &str) {
    let (code, v, r) = qemu_check(img);
    let leaks = v["leaks"].as_u64().unwrap_or(0);
    let corrupt = v["corruptions"].as_u64().unwrap_or(0);
    assert!(
        code == 0 && leaks == 0 && corrupt == 0,
        "{what}: qemu-img check is not clean (exit {code}, {corrupt} corruptions, {leaks} leaks):\n{r}"
    );
}

/// Panic unless `qemu-img compare A B` says identical (exit 0).
#[track_caller]
pub fn assert_qemu_compare_identical(cwd: &Path, a: &str, b: &str, what: &str) {
    let r = qemu_img_in(cwd, &["compare", a, b]);
    assert_eq!(
        r.code(),
        0,
        "{what}: qemu-img compare says the images differ:\n{r}"
    );
}

/// `qemu-img info --output=json` of `img` run from `cwd`.
pub fn qemu_info(cwd: &Path, img: &str) -> serde_json::Value {
    qemu_img_in(cwd, &["info", "--output=json", img])
        .ok()
        .json()
}

/// Rewrite a qcow2 header so it no longer names its backing file's format (qemu-img
/// refuses to make such images today, older tools made them): the backing-format header
/// extension is dropped, the others are kept in order.
pub fn strip_backing_format(img: &Path) {
    const EXT_BACKING_FORMAT: u32 = 0xE279_2ACA;
    let mut data = fs::read(img).expect("read qcow2");
    let be32 = |d: &[u8], o: usize| u32::from_be_bytes(d[o..o + 4].try_into().unwrap());
    assert_eq!(&data[..4], b"QFI\xfb", "not a qcow2: {}", img.display());
    let version = be32(&data, 4);
    let backing_off = u64::from_be_bytes(data[8..16].try_into().unwrap()) as usize;
    let start = if version >= 3 {
        be32(&data, 100) as usize
    } else {
        72
    };
    let limit = if backing_off > 0 { backing_off } else { 4096 };
    let mut exts: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut pos = start;
    loop {
        let ty = be32(&data, pos);
        if ty == 0 {
            break;
        }
        let len = be32(&data, pos + 4) as usize;
        exts.push((ty, data[pos + 8..pos + 8 + len].to_vec()));
        pos += 8 + len.div_ceil(8) * 8;
    }
    assert!(
        exts.iter().any(|(t, _)| *t == EXT_BACKING_FORMAT),
        "{} has no backing format extension to strip",
        img.display()
    );
    let mut out = Vec::new();
    for (ty, body) in exts.into_iter().filter(|(t, _)| *t != EXT_BACKING_FORMAT) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(body.len() as u32).to_be_bytes());
        out.extend_from_slice(&body);
        out.resize(out.len().div_ceil(8) * 8, 0);
    }
    out.extend_from_slice(&[0u8; 8]); // end marker
    assert!(
        start + out.len() <= limit,
        "rewritten extensions overlap the backing name"
    );
    data[start..start + out.len()].copy_from_slice(&out);
    for b in &mut data[start + out.len()..limit] {
        *b = 0;
    }
    fs::write(img, data).expect("write qcow2");
}

// ---------------------------------------------------------------------------------------------
// qemu's locks and background processes
// ---------------------------------------------------------------------------------------------

/// Is someone holding a lock on `byte` of `path` that conflicts with an exclusive lock?
/// (qemu's probe: F_OFD_GETLK with F_WRLCK.)
pub fn lock_byte_held(path: &Path, byte: i64) -> bool {
    let f = fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    // SAFETY: flock is plain old data; all-zero is valid and is filled in below.
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = libc::F_WRLCK as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte as libc::off_t;
    fl.l_len = 1;
    // SAFETY: F_OFD_GETLK reads and writes the valid flock struct we own.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_OFD_GETLK, &mut fl) };
    assert!(
        r == 0,
        "F_OFD_GETLK failed: {}",
        std::io::Error::last_os_error()
    );
    fl.l_type != libc::F_UNLCK as libc::c_short
}

/// Poll `cond` every 10 ms until it holds or `timeout` passes; returns whether it held.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A background process killed (SIGKILL) and reaped on drop, so a failing test leaks none.
pub struct Background {
    pub child: std::process::Child,
    pub cmdline: String,
}

impl Background {
    /// Start `cmd` with stdout/stderr going to files in `log_dir`.
    pub fn spawn(cmd: &mut Command, log_dir: &Path, name: &str) -> Self {
        let line = cmdline(cmd);
        let out = fs::File::create(log_dir.join(format!("{name}.stdout"))).expect("log");
        let err = fs::File::create(log_dir.join(format!("{name}.stderr"))).expect("log");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
        Background {
            child,
            cmdline: line,
        }
    }

    /// Still running?
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A seeded mix of qemu-io commands over `[0, size)`: unaligned pattern writes, writes of
/// random bytes from `rnd_file` (at least 1 MiB), zero writes with and without unmap, and
/// discards, all crossing cluster boundaries of `cluster` bytes.
pub fn qemu_io_ops(seed: u64, size: u64, cluster: u64, rnd_file: &Path) -> Vec<String> {
    let mut rng = Rng::new(seed ^ 0x10);
    let mut ops = Vec::new();
    let max_len = (cluster * 3).clamp(4 * KIB, 512 * KIB);
    for i in 0..28 {
        let len = rng.range(1, max_len);
        // half straddle a cluster boundary on purpose
        let off = if rng.chance(1, 2) {
            let boundary = rng.range(1, size / cluster) * cluster;
            boundary.saturating_sub(rng.range(0, len)).min(size - len)
        } else {
            rng.range(0, size - len)
        };
        let op = match i % 7 {
            0 | 1 => format!("write -P {:#x} {off} {len}", rng.range(1, 256)),
            2 | 3 => format!("write -s {} {off} {}", rnd_file.display(), len.min(MIB)),
            4 => format!("write -z {off} {len}"),
            5 => format!("write -z -u {off} {len}"),
            _ => format!("discard {off} {len}"),
        };
        ops.push(op);
    }
    ops
}

/// Write 1 MiB of seeded random bytes to `path` (the source for `qemu-io write -s`).
pub fn make_rnd_file(path: &Path, seed: u64) {
    write_file(path, &Rng::new(seed ^ 0xabc).bytes(MIB as usize));
}

// ---------------------------------------------------------------------------------------------
// Random guest workloads (library tests and the crash-test workload process)
// ---------------------------------------------------------------------------------------------

/// One guest operation of a random workload.
#[derive(Debug, Clone)]
pub enum Op {
    Write {
        off: u64,
        len: u64,
        seed: u64,
    },
    Zero {
        off: u64,
        len: u64,
        may_unmap: bool,
    },
    Discard {
        off: u64,
        len: u64,
    },
    Flush,
    /// Read back and compare (the model-keeping caller does this).
    Verify {
        off: u64,
        len: u64,
    },
}

impl Op {
    /// The next seeded op over a device of `size` bytes with `cluster`-byte clusters:
    /// lengths from one byte to a few clusters, offsets unaligned, 512-aligned, cluster-aligned
    /// or straddling a cluster boundary.
    pub fn random(rng: &mut Rng, size: u64, cluster: u64) -> Op {
        let len = match rng.range(0, 10) {
            0..=2 => rng.range(1, 4097),
            3..=5 => rng.range(1, 2 * cluster + 1),
            6 => cluster * rng.range(1, 4),
            7 => 512 * rng.range(1, 65),
            _ => rng.range(1, (4 * cluster).min(512 * KIB) + 1),
        }
        .min(size);
        let off = match rng.range(0, 4) {
            0 => rng.range(0, size - len + 1),
            1 => rng.range(0, (size - len) / 512 + 1) * 512,
            2 => rng.range(0, (size - len) / cluster + 1) * cluster,
            _ => {
                let boundary = rng.range(1, size / cluster + 1) * cluster;
                boundary
                    .saturating_sub(rng.range(1, len + 1))
                    .min(size - len)
            }
        };
        match rng.range(0, 100) {
            0..=49 => Op::Write {
                off,
                len,
                seed: rng.next_u64(),
            },
            50..=69 => Op::Zero {
                off,
                len,
                may_unmap: rng.chance(1, 2),
            },
            70..=84 => Op::Discard { off, len },
            85..=89 => Op::Flush,
            _ => Op::Verify { off, len },
        }
    }

    /// The data a `Write` op writes.
    pub fn write_data(len: u64, seed: u64) -> Vec<u8> {
        mixed_data(seed, len as usize)
    }
}

/// `err` and all its sources, for messages ("opening x: ... : locked by ...").
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        s.push_str(": ");
        s.push_str(&e.to_string());
        cur = e.source();
    }
    s
}

// ---------------------------------------------------------------------------------------------
// Guest-side oracles (e2fsprogs, gdisk, util-linux, dosfstools, libnbd) and `vmdisk serve`
// ---------------------------------------------------------------------------------------------

/// Debian packages of the guest-side oracle tools (the [`require_tool`] table covers qemu).
const GUEST_TOOL_PACKAGES: &[(&str, &str)] = &[
    ("e2fsck", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("mkfs.ext4", "e2fsprogs"),
    ("sgdisk", "gdisk"),
    ("sfdisk", "fdisk"),
    ("blkid", "util-linux"),
    ("mount", "mount"),
    ("umount", "mount"),
    ("fsck.vfat", "dosfstools"),
    ("openssl", "openssl"),
    ("dd", "coreutils"),
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    ("mkfs.xfs", "xfsprogs"),
    ("filefrag", "e2fsprogs"),
];

/// Path of a guest-side oracle tool (also searched in the sbin directories, which a
/// non-login PATH may lack); panics naming the Debian package when it is missing.
pub fn require_guest_tool(tool: &str) -> PathBuf {
    if let Some(p) = find_in_path(tool) {
        return p;
    }
    for dir in ["/usr/sbin", "/sbin", "/usr/bin", "/bin"] {
        let p = Path::new(dir).join(tool);
        if p.is_file() {
            return p;
        }
    }
    let pkg = GUEST_TOOL_PACKAGES
        .iter()
        .find(|(t, _)| *t == tool)
        .map(|(_, p)| *p)
        .unwrap_or(tool);
    panic!(
        "required tool `{tool}` is not installed; these interop tests never skip.\n\
         install it with:  sudo apt-get install -y {pkg}   (or: cargo xtask deps)"
    )
}

/// Run a guest-side oracle tool (see [`require_guest_tool`]).
pub fn guest_tool<S: AsRef<std::ffi::OsStr>>(tool: &str, args: &[S]) -> Run {
    run(Command::new(require_guest_tool(tool)).args(to_args(args)))
}

/// Run `cmd` with `input` on its stdin; returns the record and stdout's exact bytes (the
/// record's text is lossy). Killed after [`COMMAND_TIMEOUT`] like [`run`].
pub fn run_bytes(cmd: &mut Command, input: Option<&[u8]>) -> (Run, Vec<u8>) {
    run_core(cmd, input, COMMAND_TIMEOUT)
}

/// Spawn, feed `input`, capture, and SIGKILL after `timeout` (the record says HUNG).
fn run_core(cmd: &mut Command, input: Option<&[u8]>, timeout: Duration) -> (Run, Vec<u8>) {
    let line = cmdline(cmd);
    let cwd = cmd.get_current_dir().map(Path::to_path_buf);
    let mut child = cmd
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start `{line}`: {e}"));
    if let Some(data) = input {
        let mut stdin = child.stdin.take().expect("piped stdin");
        let data = data.to_vec();
        // A child that exits without reading gives EPIPE here; that is its business.
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let pid = child.id() as libc::pid_t;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let (out, timed_out) = match rx.recv_timeout(timeout) {
        Ok(r) => (
            r.unwrap_or_else(|e| panic!("waiting for `{line}`: {e}")),
            false,
        ),
        Err(_) => {
            // SAFETY: kill(2) on our own not-yet-reaped child (the waiter has not returned).
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let r = rx.recv().expect("waiter thread");
            (
                r.unwrap_or_else(|e| panic!("waiting for `{line}`: {e}")),
                true,
            )
        }
    };
    let mut stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    if timed_out {
        stderr.push_str(&format!(
            "\n[test harness: HUNG, killed after {} s]",
            timeout.as_secs()
        ));
    }
    let run = Run {
        cmdline: line,
        cwd,
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr,
    };
    (run, out.stdout)
}

/// `vmdisk ARGS...` with `input` on stdin; the record and stdout's exact bytes.
pub fn vmdisk_bytes<S: AsRef<std::ffi::OsStr>>(args: &[S], input: Option<&[u8]>) -> (Run, Vec<u8>) {
    run_bytes(Command::new(vmdisk_bin()).args(to_args(args)), input)
}

/// Copy `len` bytes at `off` of `src` into a new sparse file `dst` (`dd conv=sparse`).
pub fn extract_range(src: &Path, dst: &Path, off: u64, len: u64) {
    guest_tool(
        "dd",
        &[
            format!("if={}", s(src)),
            format!("of={}", s(dst)),
            "bs=1M".into(),
            format!("skip={off}"),
            format!("count={len}"),
            "iflag=skip_bytes,count_bytes".into(),
            "conv=sparse".into(),
            "status=none".into(),
        ],
    )
    .ok();
    let got = fs::metadata(dst).map(|m| m.len()).unwrap_or(0);
    assert_eq!(
        got,
        len,
        "extracting {off}+{len} of {} gave {got} bytes",
        src.display()
    );
}

/// The partitions `vmdisk inspect --json IMG` reports (panics when it has no partition table).
#[track_caller]
pub fn inspect_partitions(img: &Path) -> Vec<serde_json::Value> {
    let r = vmdisk(&["inspect", "--json", s(img)]).ok();
    let v = r.json();
    v["partition-table"]["partitions"]
        .as_array()
        .unwrap_or_else(|| panic!("inspect --json shows no partition-table.partitions:\n{r}"))
        .clone()
}

/// Panic unless `e2fsck -fn` finds the ext2/3/4 filesystem in `dev` clean.
#[track_caller]
pub fn assert_e2fsck_clean(dev: &Path, what: &str) {
    let r = guest_tool("e2fsck", &["-fn", s(dev)]);
    assert_eq!(r.code(), 0, "{what}: e2fsck -fn is not clean:\n{r}");
}

/// A `vmdisk serve IMAGE --socket DIR/nbd.sock ARGS...` child, killed (SIGKILL) on drop.
pub struct Serve {
    pub bg: Background,
    pub socket: PathBuf,
    log_dir: PathBuf,
    name: String,
}

impl Serve {
    /// Start serving `img` with `args` on a unix socket in `dir` and wait (up to 30 s) for
    /// the socket to appear; panics with the server's log when it does not.
    #[track_caller]
    pub fn start(img: &Path, args: &[&str], dir: &Path) -> Serve {
        static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("serve{n}");
        let socket = dir.join(format!("{name}.sock"));
        let mut cmd = Command::new(vmdisk_bin());
        cmd.arg("serve")
            .arg(img)
            .arg("--socket")
            .arg(&socket)
            .args(args);
        let bg = Background::spawn(&mut cmd, dir, &name);
        let mut srv = Serve {
            bg,
            socket,
            log_dir: dir.to_path_buf(),
            name,
        };
        let up = wait_until(Duration::from_secs(30), || {
            srv.socket.exists() || !srv.bg.alive()
        });
        if !(up && srv.socket.exists()) {
            let sock = srv.socket.display().to_string();
            panic!(
                "vmdisk serve did not create its socket {sock}:\n{}",
                srv.describe()
            );
        }
        srv
    }

    /// The NBD URI of the export.
    pub fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    /// Command line, state and logs, for messages.
    pub fn describe(&mut self) -> String {
        let read = |ext: &str| {
            fs::read_to_string(self.log_dir.join(format!("{}.{ext}", self.name)))
                .unwrap_or_default()
        };
        let state = match self.bg.child.try_wait() {
            Ok(Some(st)) => format!("exited: {st}"),
            Ok(None) => "still running".into(),
            Err(e) => format!("unknown: {e}"),
        };
        format!(
            "  $ {}\n  state: {state}\n  stdout: {}\n  stderr: {}",
            self.bg.cmdline,
            clip(&read("stdout")),
            clip(&read("stderr"))
        )
    }

    /// Wait up to `timeout` for the server to exit; its status, or None if still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.bg.child.try_wait().ok().flatten();
            status.is_some()
        });
        status
    }

    /// Panic unless the server exits 0 within `timeout` (e.g. one-shot after its client).
    #[track_caller]
    pub fn assert_exits_ok(&mut self, timeout: Duration, what: &str) {
        let st = self.wait_exit(timeout);
        assert!(
            st.is_some_and(|s| s.success()),
            "{what}: vmdisk serve did not exit 0 within {} s:\n{}",
            timeout.as_secs(),
            self.describe()
        );
    }

    /// Send SIGTERM (unless the server already exited).
    pub fn sigterm(&mut self) {
        if matches!(self.bg.child.try_wait(), Ok(None)) {
            // SAFETY: kill(2) on our own child, which try_wait just found not yet reaped, so
            // its pid cannot have been reused.
            unsafe { libc::kill(self.bg.child.id() as libc::pid_t, libc::SIGTERM) };
        }
    }
}

/// `vmdisk rescue IMAGE [--with-image MORE...] -- SCRIPT` (the images are /dev/nbd0,
/// /dev/nbd1, ... in the VM); its output.
pub fn rescue(images: &[&Path], script: &str) -> Run {
    let mut args = vec!["rescue".to_string(), s(images[0]).to_string()];
    for i in &images[1..] {
        args.extend(["--with-image".to_string(), s(i).to_string()]);
    }
    args.extend(["--".to_string(), script.to_string()]);
    run_with_timeout(
        Command::new(vmdisk_bin()).args(&args),
        Duration::from_secs(600),
    )
}

/// The name of the marker file [`open_everything`] looks for; put one, holding the
/// mountpoint, in each `--copy-in` tree.
pub const MARKER_PREFIX: &str = "vmdisk-marker-";

/// What [`open_everything`] found in the rescue VM.
#[derive(Debug, Default)]
pub struct Opened {
    /// The contents of every marker file found, one per filesystem it was on.
    pub markers: Vec<String>,
    /// LUKS devices opened (`luks-open DEV`) and problems (`luks-fail`, `mount-fail`,
    /// `fsck-fail`), as the script printed them.
    pub opened_luks: usize,
    pub problems: Vec<String>,
    /// Filesystems mounted and checked, as `DEV TYPE`.
    pub checked: Vec<String>,
}

/// Attach `images` in the rescue VM and open everything the way a booting machine would,
/// without being told the layout: assemble md arrays, open every LUKS device with one of
/// `keys` (as given, and without a trailing newline, the two ways disko hands keys to
/// cryptsetup), activate every LVM volume group, repeat for stacks (LUKS on md, LVM on
/// LUKS), scan btrfs devices; then mount each ext2/3/4, vfat and btrfs filesystem (btrfs at
/// its top level, so every subvolume shows) read-only, collect marker files, and fsck it.
/// The rescue busybox has no blkid: a filesystem is whatever mounts, counted once per UUID.
pub fn open_everything(images: &[&Path], keys: &[Vec<u8>]) -> (Opened, Run) {
    use std::fmt::Write as _;
    let mut script =
        String::from("set -e; export DM_DISABLE_UDEV=1; vmdisk-builder-init >/dev/null; set +e\n");
    for (i, k) in keys.iter().enumerate() {
        let hex: String = k.iter().fold(String::new(), |mut h, b| {
            let _ = write!(h, "\\{b:03o}");
            h
        });
        let _ = writeln!(script, "printf '{hex}' > /tmp/key{i}");
        let stripped = k.strip_suffix(b"\n").unwrap_or(k);
        let hex: String = stripped.iter().fold(String::new(), |mut h, b| {
            let _ = write!(h, "\\{b:03o}");
            h
        });
        let _ = writeln!(script, "printf '{hex}' > /tmp/key{i}s");
    }
    script.push_str(&format!(
        r#"for round in 1 2 3 4; do
  mdadm --assemble --scan >/dev/null 2>&1
  for b in /sys/class/block/*; do
    n=${{b##*/}}; d=/dev/$n
    cryptsetup isLuks $d 2>/dev/null || continue
    [ -e /dev/mapper/open-$n ] && continue
    ok=
    for k in /tmp/key*; do
      [ -e "$k" ] || continue
      cryptsetup open $d open-$n --key-file $k 2>/dev/null && {{ ok=1; break; }}
    done
    if [ -n "$ok" ]; then echo "luks-open $d"; elif [ $round = 4 ]; then echo "luks-fail $d"; fi
  done
  vgchange -ay >/dev/null 2>&1
done
btrfs device scan >/dev/null 2>&1
seen=" "
mkdir -p /m
for b in /sys/class/block/*; do
  d=/dev/${{b##*/}}
  # A device something is stacked on (an md member, an opened LUKS container, an LVM PV)
  # is read through what sits above it; a raid1 member with metadata at the end would
  # otherwise look like its filesystem. (`mdadm --examine` cannot tell: it accepts any
  # device with an MBR signature, which includes a FAT boot sector.)
  [ -n "$(ls $b/holders 2>/dev/null)" ] && continue
  t=
  for try in ext4 btrfs vfat; do
    o=ro; [ $try = btrfs ] && o=ro,subvolid=5
    mount -t $try -o $o $d /m 2>/dev/null && {{ t=$try; break; }}
  done
  [ -n "$t" ] || continue
  case $t in
    ext4) u=$(tune2fs -l $d | sed -n 's/^Filesystem UUID: *//p') ;;
    btrfs) u=$(btrfs inspect-internal dump-super $d | sed -n 's/^fsid[[:space:]]*//p') ;;
    *) u=$d ;;
  esac
  case "$seen" in *" $u "*) umount /m; continue;; esac
  seen="$seen$u "
  find /m -maxdepth 5 -type f -name '{MARKER_PREFIX}*' | while read f; do echo "marker $(cat "$f")"; done
  umount /m
  case $t in
    ext4) e2fsck -fn $d >/dev/null 2>&1 ;;
    vfat) fsck.fat -n $d >/dev/null 2>&1 ;;
    btrfs) btrfs check --readonly $d >/dev/null 2>&1 ;;
  esac && echo "checked $d $t" || echo "fsck-fail $d $t"
done
echo open-everything-done
"#
    ));
    let r = rescue(images, &script);
    let mut o = Opened::default();
    for l in r.stdout.lines() {
        if let Some(m) = l.strip_prefix("marker ") {
            o.markers.push(m.to_string());
        } else if l.starts_with("luks-open ") {
            o.opened_luks += 1;
        } else if let Some(c) = l.strip_prefix("checked ") {
            o.checked.push(c.to_string());
        } else if ["luks-fail ", "mount-fail ", "fsck-fail "]
            .iter()
            .any(|p| l.starts_with(p))
        {
            o.problems.push(l.to_string());
        }
    }
    if !r.success() || !r.stdout.contains("open-everything-done") {
        o.problems.push(format!("the rescue VM run failed:\n{r}"));
    }
    (o, r)
}
