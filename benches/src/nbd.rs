//! `benches nbd`: `vmdisk serve` vs `qemu-nbd` on the same qcow2, over unix sockets.
//!
//! Both servers export one cached, seeded qcow2 (from [`crate::gen`]) read-only with four
//! connections allowed and run for the whole benchmark; the lines are timed alternately
//! against each (which server goes first alternates per run):
//!
//! - `nbdcopy URI -` with stdout on /dev/null: a full read into a stream;
//! - `nbdcopy URI null:`: sparse-aware (nbdcopy asks `base:allocation` and skips holes);
//! - `nbdcopy --no-extents URI null:`: every byte read;
//! - random 4 KiB reads, one connection, one request in flight, from vmdisk-nbd's sync client.
//!
//! Before timing, each server's data is checked against `qemu-img convert -O raw` of the image
//! (sha256 of `nbdcopy URI -` and of a sparse `nbdcopy URI FILE`, and a pass of random reads
//! compared byte for byte), so a fast but wrong server cannot win. Afterwards both servers get
//! SIGTERM and must exit; the image's sha256 must not have changed.

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;
use vmdisk_nbd::client::{Client, ConnectOptions};

use crate::layout::Rng;
use crate::util::sha256;

/// qemu-nbd time / vmdisk time must reach this on every line.
const SPEED_TARGET: f64 = 1.0;
/// How long a server may take to accept its first connection.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// Connections each server allows (nbdcopy opens 4 when the server offers multi-conn).
const CONNECTIONS: &str = "4";
const BLOCK: u64 = 4096;
/// Random reads compared against the reference image, per server.
const VERIFY_READS: u64 = 2000;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

pub struct Options<'a> {
    pub vmdisk: &'a Path,
    pub dir: &'a Path,
    pub runs: usize,
    pub quick: bool,
    pub seed: u64,
    /// Random 4 KiB reads per timed run.
    pub reads: Option<u64>,
    pub size: Option<u64>,
    pub data: Option<u64>,
}

#[derive(Clone, Copy, PartialEq, Serialize)]
enum Who {
    Vmdisk,
    QemuNbd,
}

impl Who {
    fn name(self) -> &'static str {
        match self {
            Who::Vmdisk => "vmdisk serve",
            Who::QemuNbd => "qemu-nbd",
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Servers

/// A running server; killed (SIGKILL) on drop unless [`Server::stop`] ended it.
struct Server {
    who: Who,
    child: Option<Child>,
    socket: PathBuf,
    log: PathBuf,
}

impl Server {
    fn start(who: Who, vmdisk: &Path, image: &Path, dir: &Path) -> Result<Server> {
        let tag = match who {
            Who::Vmdisk => "vmdisk",
            Who::QemuNbd => "qemu-nbd",
        };
        // qemu-nbd wants an absolute socket path.
        let socket = std::path::absolute(dir)?.join(format!("nbd-{tag}.sock"));
        let log = dir.join(format!("nbd-{tag}.log"));
        let _ = fs::remove_file(&socket);
        let mut cmd = match who {
            Who::Vmdisk => {
                let mut c = Command::new(vmdisk);
                c.args(["serve", "-q", "--read-only", "--persistent", "-f", "qcow2"])
                    .args(["--shared", CONNECTIONS, "--socket"])
                    .arg(&socket)
                    .arg(image);
                c
            }
            Who::QemuNbd => {
                let mut c = Command::new("qemu-nbd");
                c.args(["--read-only", "--persistent", "-f", "qcow2"])
                    .arg(format!("--shared={CONNECTIONS}"))
                    .arg(format!("--socket={}", socket.display()))
                    .arg(image);
                c
            }
        };
        let log_file = File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone()?)
            .stderr(log_file);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {} (is it installed?)", who.name()))?;
        let mut server = Server {
            who,
            child: Some(child),
            socket,
            log,
        };
        server.wait_ready()?;
        Ok(server)
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///?socket={}", self.socket.display())
    }

    fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Poll until a client can negotiate, or the server dies, or READY_TIMEOUT.
    fn wait_ready(&mut self) -> Result<()> {
        let start = Instant::now();
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                bail!(
                    "{} exited before serving ({status}): {}",
                    self.who.name(),
                    self.log_text().trim()
                );
            }
            if self.socket.exists() {
                if let Ok(c) = Client::connect_unix(&self.socket, &ConnectOptions::default()) {
                    let _ = c.disconnect();
                    return Ok(());
                }
            }
            if start.elapsed() > READY_TIMEOUT {
                bail!(
                    "{} did not accept a connection within {READY_TIMEOUT:?}: {}",
                    self.who.name(),
                    self.log_text().trim()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then wait up to STOP_TIMEOUT; the exit status, or an error if it had to be
    /// killed.
    fn stop(&mut self) -> Result<ExitStatus> {
        let Some(mut child) = self.child.take() else {
            bail!("{} was not running", self.who.name());
        };
        // SAFETY: kill() with a pid we spawned and have not reaped (so it is not reused).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        let start = Instant::now();
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if start.elapsed() > STOP_TIMEOUT {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "{} did not exit within {STOP_TIMEOUT:?} of SIGTERM",
                    self.who.name()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// User + system CPU seconds the server has used so far (from /proc).
    fn cpu_s(&self) -> f64 {
        let Some(pid) = self.pid() else { return 0.0 };
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0.0;
        };
        // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            return 0.0;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks = |i: usize| f.get(i).and_then(|s| s.parse::<f64>().ok()).unwrap_or(0.0);
        // SAFETY: sysconf has no memory-safety preconditions.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        // `rest` starts at field 3 (state), so field N is at index N - 3.
        (ticks(11) + ticks(12)) / hz
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = fs::remove_file(&self.socket);
    }
}

// ---------------------------------------------------------------------------------------------
// Lines

#[derive(Clone, Copy)]
enum Line {
    Stream,
    Sparse,
    Dense,
    Random,
}

impl Line {
    const ALL: [Line; 4] = [Line::Stream, Line::Sparse, Line::Dense, Line::Random];

    fn name(self) -> &'static str {
        match self {
            Line::Stream => "nbdcopy URI - >/dev/null (full read, stream)",
            Line::Sparse => "nbdcopy URI null: (sparse-aware, base:allocation)",
            Line::Dense => "nbdcopy --no-extents URI null: (dense)",
            Line::Random => "random 4 KiB reads, 1 conn, QD1 (vmdisk-nbd sync client)",
        }
    }
}

#[derive(Clone, Serialize)]
pub struct Run {
    pub secs: f64,
    /// CPU seconds of the client (nbdcopy) process; 0 for the in-process random reads.
    pub client_cpu_s: f64,
    pub server_cpu_s: f64,
}

#[derive(Serialize)]
pub struct SideResult {
    pub best_s: Option<f64>,
    pub median_s: Option<f64>,
    pub server_cpu_s: Option<f64>,
    pub client_cpu_s: Option<f64>,
    pub runs: Vec<Run>,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct LineResult {
    pub line: String,
    pub qemu_nbd: SideResult,
    pub vmdisk: SideResult,
    /// qemu-nbd best / vmdisk best; >= 1 means vmdisk is at least as fast.
    pub speed_ratio: Option<f64>,
    /// MiB/s of the virtual disk (nbdcopy lines) or reads/s (random line), best run.
    pub qemu_nbd_rate: Option<f64>,
    pub vmdisk_rate: Option<f64>,
    pub verdict: String,
}

fn children_cpu() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

fn run_line(line: Line, server: &Server, reads: u64, seed: u64) -> Result<Run> {
    let uri = server.uri();
    let server_cpu = server.cpu_s();
    let client_cpu = children_cpu();
    let secs = match line {
        Line::Random => random_reads(&server.socket, reads, seed, None)?,
        _ => {
            let mut cmd = Command::new("nbdcopy");
            match line {
                Line::Stream => cmd.arg(&uri).arg("-"),
                Line::Sparse => cmd.arg(&uri).arg("null:"),
                _ => cmd.arg("--no-extents").arg(&uri).arg("null:"),
            };
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let t = Instant::now();
            let out = cmd.output().context("running nbdcopy (is it installed?)")?;
            let secs = t.elapsed().as_secs_f64();
            if !out.status.success() {
                bail!(
                    "nbdcopy: {}: {}",
                    out.status,
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            secs
        }
    };
    Ok(Run {
        secs,
        client_cpu_s: children_cpu() - client_cpu,
        server_cpu_s: server.cpu_s() - server_cpu,
    })
}

/// `reads` seeded random 4 KiB reads over one connection; the seconds they took (connecting
/// excluded). With `reference`, every block is compared against that raw file.
fn random_reads(socket: &Path, reads: u64, seed: u64, reference: Option<&File>) -> Result<f64> {
    let mut client = Client::connect_unix(socket, &ConnectOptions::default())
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let blocks = client.size() / BLOCK;
    let mut rng = Rng::new(seed);
    let mut buf = vec![0u8; BLOCK as usize];
    let mut want = vec![0u8; BLOCK as usize];
    let t = Instant::now();
    for _ in 0..reads {
        let off = rng.below(blocks) * BLOCK;
        client
            .read(off, &mut buf)
            .with_context(|| format!("reading 4 KiB at {off}"))?;
        if let Some(f) = reference {
            f.read_exact_at(&mut want, off)?;
            if buf != want {
                bail!("4 KiB read at offset {off} differs from qemu-img convert -O raw");
            }
        }
    }
    let secs = t.elapsed().as_secs_f64();
    client.disconnect().context("disconnecting")?;
    Ok(secs)
}

// ---------------------------------------------------------------------------------------------
// Checks

/// sha256 of `nbdcopy URI -` (piped straight into sha256sum).
fn sha256_stream(uri: &str) -> Result<String> {
    let mut copy = Command::new("nbdcopy")
        .arg(uri)
        .arg("-")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("spawning nbdcopy")?;
    let pipe = copy.stdout.take().context("nbdcopy stdout")?;
    let sum = Command::new("sha256sum")
        .stdin(pipe)
        .output()
        .context("running sha256sum")?;
    let mut err = String::new();
    if let Some(mut e) = copy.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let status = copy.wait()?;
    if !status.success() {
        bail!("nbdcopy {uri} -: {status}: {}", err.trim());
    }
    let text = String::from_utf8_lossy(&sum.stdout);
    Ok(text.split_whitespace().next().unwrap_or("").to_string())
}

/// Problems in what `server` serves, compared against the raw reference.
fn verify(server: &Server, reference: &Path, want: &str, scratch: &Path, seed: u64) -> Vec<String> {
    let mut errors = Vec::new();
    let uri = server.uri();
    match sha256_stream(&uri) {
        Ok(got) if got == want => {}
        Ok(got) => errors.push(format!("nbdcopy URI - : sha256 {got}, expected {want}")),
        Err(e) => errors.push(format!("{e:#}")),
    }
    let _ = fs::remove_file(scratch);
    let copied = Command::new("nbdcopy")
        .arg(&uri)
        .arg(scratch)
        .stdin(Stdio::null())
        .output();
    match copied {
        Ok(o) if o.status.success() => match sha256(scratch) {
            Ok(got) if got == want => {}
            Ok(got) => errors.push(format!("nbdcopy URI FILE: sha256 {got}, expected {want}")),
            Err(e) => errors.push(format!("{e:#}")),
        },
        Ok(o) => errors.push(format!(
            "nbdcopy URI FILE: {}: {}",
            o.status,
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => errors.push(format!("running nbdcopy: {e}")),
    }
    let _ = fs::remove_file(scratch);
    let checked = File::open(reference)
        .context("opening the reference")
        .and_then(|f| random_reads(&server.socket, VERIFY_READS, seed ^ 0x5eed, Some(&f)));
    if let Err(e) = checked {
        errors.push(format!("random reads: {e:#}"));
    }
    errors
}

/// `nbdinfo --can multi-conn URI` (exit status 0 = yes); None when nbdinfo is missing.
fn multi_conn(uri: &str) -> Option<bool> {
    let out = Command::new("nbdinfo")
        .args(["--can", "multi-conn"])
        .arg(uri)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .ok()?;
    match out.code() {
        Some(0) => Some(true),
        Some(2) => Some(false),
        _ => None,
    }
}

fn version(tool: &str) -> String {
    Command::new(tool)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()
                .map(str::to_owned)
        })
        .unwrap_or_else(|| format!("{tool} (version unknown)"))
}

// ---------------------------------------------------------------------------------------------
// Report

#[derive(Serialize)]
pub struct ServerInfo {
    pub multi_conn: Option<bool>,
    pub verify_errors: Vec<String>,
    /// Exit status after SIGTERM, or why it did not exit.
    pub exit: String,
    pub exit_ok: bool,
}

#[derive(Serialize)]
pub struct Report {
    pub image: String,
    pub virtual_size: u64,
    pub data_bytes: u64,
    pub image_allocated: u64,
    pub qemu_nbd_version: String,
    pub nbdcopy_version: String,
    pub vmdisk: String,
    pub load_average: String,
    pub runs: usize,
    pub random_reads: u64,
    pub target: f64,
    pub lines: Vec<LineResult>,
    pub qemu_nbd: ServerInfo,
    pub vmdisk_server: ServerInfo,
    pub image_unchanged: bool,
}

fn side_result(runs: Vec<Run>, error: Option<String>) -> SideResult {
    let mut secs: Vec<f64> = runs.iter().map(|r| r.secs).collect();
    secs.sort_by(f64::total_cmp);
    let n = secs.len();
    let median = (n > 0).then(|| {
        if n % 2 == 1 {
            secs[n / 2]
        } else {
            (secs[n / 2 - 1] + secs[n / 2]) / 2.0
        }
    });
    let least = |f: fn(&Run) -> f64| runs.iter().map(f).reduce(f64::min);
    SideResult {
        best_s: secs.first().copied(),
        median_s: median,
        server_cpu_s: least(|r| r.server_cpu_s),
        client_cpu_s: least(|r| r.client_cpu_s),
        runs,
        error,
    }
}

pub fn bench(o: &Options) -> Result<Report> {
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let (size, data, reads) = if o.quick {
        (256u64 << 20, 128u64 << 20, 2000)
    } else {
        (2 << 30, 1 << 30, 20_000)
    };
    let spec = crate::gen::Spec {
        virtual_size: o.size.unwrap_or(size),
        data: o.data.unwrap_or(data),
        seed: o.seed,
    };
    let reads = o.reads.unwrap_or(reads);
    let load_average = load_average();
    let source = crate::gen::ensure(o.dir, &spec)?;
    let image = source.qcow2.clone();
    let before = sha256(&image)?;
    let image_allocated = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&image)?.blocks() * 512
    };

    // The reference: what qemu-img says the image contains.
    let reference = o.dir.join("nbd-reference.raw");
    let _ = fs::remove_file(&reference);
    let conv = Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(&image)
        .arg(&reference)
        .status()
        .context("running qemu-img convert (is qemu-utils installed?)")?;
    if !conv.success() {
        bail!("qemu-img convert -O raw of {}: {conv}", image.display());
    }
    let want = sha256(&reference)?;

    let mut vm = Server::start(Who::Vmdisk, o.vmdisk, &image, o.dir)?;
    let mut qn = Server::start(Who::QemuNbd, o.vmdisk, &image, o.dir)?;
    let scratch = o.dir.join("nbd-copy.raw");
    eprintln!("verifying what both servers serve ...");
    let mut infos = Vec::new();
    for s in [&qn, &vm] {
        let errors = verify(s, &reference, &want, &scratch, o.seed);
        for e in &errors {
            eprintln!("!!!! WRONG DATA from {}: {e}", s.who.name());
        }
        infos.push(ServerInfo {
            multi_conn: multi_conn(&s.uri()),
            verify_errors: errors,
            exit: String::new(),
            exit_ok: false,
        });
    }
    let _ = fs::remove_file(&reference);
    let vm_info_idx = 1;

    let mut lines = Vec::new();
    for line in Line::ALL {
        eprintln!("== {}", line.name());
        let (mut q_runs, mut v_runs) = (Vec::new(), Vec::new());
        let (mut q_err, mut v_err) = (None, None);
        for i in 0..o.runs {
            let order = if i % 2 == 0 {
                [Who::QemuNbd, Who::Vmdisk]
            } else {
                [Who::Vmdisk, Who::QemuNbd]
            };
            for who in order {
                let (server, runs, err) = match who {
                    Who::QemuNbd => (&qn, &mut q_runs, &mut q_err),
                    Who::Vmdisk => (&vm, &mut v_runs, &mut v_err),
                };
                if err.is_some() {
                    continue;
                }
                // The same offsets for both servers in one run, new ones per run.
                match run_line(line, server, reads, o.seed.wrapping_add(i as u64)) {
                    Ok(r) => runs.push(r),
                    Err(e) => *err = Some(format!("{e:#}")),
                }
            }
            let show = |runs: &[Run]| match runs.get(i) {
                Some(r) => format!("{:.3} s (server cpu {:.2} s)", r.secs, r.server_cpu_s),
                None => "failed".into(),
            };
            eprintln!(
                "   run {}: qemu-nbd {} / vmdisk {}",
                i + 1,
                show(&q_runs),
                show(&v_runs)
            );
        }
        let q = side_result(q_runs, q_err);
        let v = side_result(v_runs, v_err);
        let speed_ratio = match (q.best_s, v.best_s) {
            (Some(q), Some(v)) if v > 0.0 => Some(q / v),
            _ => None,
        };
        let rate = |s: &SideResult| {
            s.best_s.map(|t| match line {
                Line::Random => reads as f64 / t,
                _ => spec.virtual_size as f64 / MIB / t,
            })
        };
        let verdict = if v.error.is_some() {
            "FAIL: vmdisk error".to_string()
        } else if !infos[vm_info_idx].verify_errors.is_empty() {
            "FAIL: WRONG DATA".to_string()
        } else if q.error.is_some() {
            "n/a: qemu-nbd failed".to_string()
        } else if speed_ratio.is_some_and(|r| r >= SPEED_TARGET) {
            "PASS".to_string()
        } else {
            "MISS: speed".to_string()
        };
        lines.push(LineResult {
            line: line.name().to_string(),
            qemu_nbd_rate: rate(&q),
            vmdisk_rate: rate(&v),
            qemu_nbd: q,
            vmdisk: v,
            speed_ratio,
            verdict,
        });
    }

    for (info, s) in infos.iter_mut().zip([&mut qn, &mut vm]) {
        match s.stop() {
            Ok(status) => {
                info.exit = status.to_string();
                // qemu-nbd exits 0 on SIGTERM; vmdisk flushes and exits 0 too.
                info.exit_ok = status.success();
            }
            Err(e) => info.exit = format!("{e:#}"),
        }
    }
    let after = sha256(&image)?;
    let mut infos = infos.into_iter();
    let (Some(qemu_nbd), Some(vmdisk_server)) = (infos.next(), infos.next()) else {
        bail!("internal: server info missing");
    };
    Ok(Report {
        image: image.display().to_string(),
        virtual_size: spec.virtual_size,
        data_bytes: source.stats.data_bytes,
        image_allocated,
        qemu_nbd_version: version("qemu-nbd"),
        nbdcopy_version: version("nbdcopy"),
        vmdisk: o.vmdisk.display().to_string(),
        load_average,
        runs: o.runs,
        random_reads: reads,
        target: SPEED_TARGET,
        lines,
        qemu_nbd,
        vmdisk_server,
        image_unchanged: before == after,
    })
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

impl Report {
    /// vmdisk failed, served wrong data, did not exit cleanly, or the image changed.
    pub fn failed(&self) -> bool {
        self.lines.iter().any(|l| l.verdict.starts_with("FAIL"))
            || !self.vmdisk_server.verify_errors.is_empty()
            || !self.vmdisk_server.exit_ok
            || !self.image_unchanged
    }

    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let mut md = String::new();
        let _ = writeln!(md, "## vmdisk serve vs qemu-nbd\n");
        let _ = writeln!(
            md,
            "Image: {} ({:.2} GiB virtual, {:.2} GiB of data written by the generator, qcow2 \
             {:.2} GiB allocated). Both servers read-only, {CONNECTIONS} connections, unix \
             sockets, running side by side. {}; {}; vmdisk `{}`. Times: best of {} runs \
             (median), servers alternating. Load average at start: {} on {} CPUs.\n",
            self.image,
            self.virtual_size as f64 / GIB,
            self.data_bytes as f64 / GIB,
            self.image_allocated as f64 / GIB,
            self.qemu_nbd_version,
            self.nbdcopy_version,
            self.vmdisk,
            self.runs,
            self.load_average,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        );
        md.push_str(
            "| line | qemu-nbd s | vmdisk s | ratio qemu-nbd / vmdisk | rate vmdisk (qemu-nbd) \
             | server CPU s vmdisk (qemu-nbd) | client CPU s vmdisk (qemu-nbd) | verdict |\n\
             |---|--:|--:|--:|--:|--:|--:|---|\n",
        );
        let opt = |v: Option<f64>, d: usize| v.map_or("-".to_string(), |v| format!("{v:.d$}"));
        for l in &self.lines {
            let time = |s: &SideResult| match (s.best_s, s.median_s) {
                (Some(b), Some(m)) => format!("{b:.3} ({m:.3})"),
                _ => "failed".into(),
            };
            let random = l.line.starts_with("random");
            // The random reads run in this process: no client CPU to show.
            let client = |v: Option<f64>| if random { "-".to_string() } else { opt(v, 2) };
            let unit = if random { " reads/s" } else { " MiB/s" };
            let _ = writeln!(
                md,
                "| {} | {} | {} | **{}** | {}{unit} ({}) | {} ({}) | {} ({}) | {} |",
                l.line,
                time(&l.qemu_nbd),
                time(&l.vmdisk),
                l.speed_ratio.map_or("-".into(), |r| format!("{r:.2}x")),
                opt(l.vmdisk_rate, 0),
                opt(l.qemu_nbd_rate, 0),
                opt(l.vmdisk.server_cpu_s, 2),
                opt(l.qemu_nbd.server_cpu_s, 2),
                client(l.vmdisk.client_cpu_s),
                client(l.qemu_nbd.client_cpu_s),
                l.verdict,
            );
        }
        let met = self
            .lines
            .iter()
            .all(|l| l.speed_ratio.is_some_and(|r| r >= self.target));
        let _ = writeln!(
            md,
            "\nTarget: qemu-nbd / vmdisk (best times) >= {:.1}x on every line: **{}**. Rates are \
             of the virtual disk (MiB/s) or reads per second, best run. CPU s = least over the \
             runs; client CPU is nbdcopy's (the random reads run in this process). {} random \
             reads per run, seeded, uniform over the whole disk.\n",
            self.target,
            if met { "met" } else { "not met" },
            self.random_reads,
        );
        for (name, i) in [
            ("qemu-nbd", &self.qemu_nbd),
            ("vmdisk", &self.vmdisk_server),
        ] {
            let mc = match i.multi_conn {
                Some(true) => "yes",
                Some(false) => "no",
                None => "unknown",
            };
            let data = if i.verify_errors.is_empty() {
                "same as `qemu-img convert -O raw` (sha256 of nbdcopy to a stream and to a \
                 sparse file, random reads byte for byte)"
                    .to_string()
            } else {
                format!("**WRONG**: {}", i.verify_errors.join("; "))
            };
            let _ = writeln!(
                md,
                "- {name}: multi-conn advertised: {mc}; data: {data}; after SIGTERM: {}{}",
                i.exit,
                if i.exit_ok { "" } else { " **(not clean)**" }
            );
        }
        let _ = writeln!(
            md,
            "- image sha256 unchanged after both servers: {}",
            if self.image_unchanged {
                "yes"
            } else {
                "**NO**"
            }
        );
        for l in &self.lines {
            for (name, s) in [("vmdisk", &l.vmdisk), ("qemu-nbd", &l.qemu_nbd)] {
                if let Some(e) = &s.error {
                    let _ = writeln!(md, "\n**{}: {name} failed:** {e}", l.line);
                }
            }
        }
        md
    }
}
