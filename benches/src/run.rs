//! Timing one case: qemu-img and vmdisk alternately, then sizes and a correctness check.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::MetadataExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::gen::Source;
use crate::util::{remove_if_exists, sync};

#[derive(Clone, Copy, PartialEq)]
pub enum Fmt {
    Raw,
    Qcow2,
}

impl Fmt {
    fn name(self) -> &'static str {
        match self {
            Fmt::Raw => "raw",
            Fmt::Qcow2 => "qcow2",
        }
    }
}

pub struct Case {
    pub name: String,
    pub from: Fmt,
    pub to: Fmt,
    /// Options given to both tools after `-O FMT` (`-c`, `-o compression_type=...`).
    pub opts: &'static [&'static str],
    /// Options given to qemu-img only (the `-m 8 -W` reference rows).
    pub qemu_only: &'static [&'static str],
    pub compressed: bool,
}

/// The convert cases; with `qemu_parallel`, each again with qemu-img `-m 8 -W`.
pub fn cases(qemu_parallel: bool) -> Vec<Case> {
    let base: [(&str, Fmt, Fmt, &'static [&'static str]); 4] = [
        ("raw->qcow2", Fmt::Raw, Fmt::Qcow2, &[]),
        ("qcow2->raw", Fmt::Qcow2, Fmt::Raw, &[]),
        (
            "raw->qcow2 -c zlib",
            Fmt::Raw,
            Fmt::Qcow2,
            &["-c", "-o", "compression_type=zlib"],
        ),
        (
            "raw->qcow2 -c zstd",
            Fmt::Raw,
            Fmt::Qcow2,
            &["-c", "-o", "compression_type=zstd"],
        ),
    ];
    let variants: &[(&str, &'static [&'static str])] = if qemu_parallel {
        &[("", &[]), (" (qemu -m 8 -W)", &["-m", "8", "-W"])]
    } else {
        &[("", &[])]
    };
    let mut cases = Vec::new();
    for (name, from, to, opts) in base {
        for (suffix, qemu_only) in variants {
            cases.push(Case {
                name: format!("{name}{suffix}"),
                from,
                to,
                opts,
                qemu_only,
                compressed: opts.contains(&"-c"),
            });
        }
    }
    cases
}

pub struct Setup<'a> {
    pub vmdisk: &'a Path,
    pub dir: &'a Path,
    pub source: &'a Source,
    pub runs: usize,
}

/// Wall times of the runs of one tool on one case.
#[derive(Clone, Serialize)]
pub struct Timing {
    pub best_s: f64,
    pub median_s: f64,
    pub runs_s: Vec<f64>,
    /// Least CPU time (user + system) over the runs: less sensitive to a busy machine.
    pub cpu_s: f64,
    /// Largest peak RSS over the runs.
    pub peak_rss_mib: f64,
}

#[derive(Clone, Copy, Serialize)]
pub struct OutputSize {
    /// st_blocks * 512.
    pub allocated: u64,
    /// st_size.
    pub apparent: u64,
}

#[derive(Serialize)]
pub struct ToolResult {
    pub timing: Option<Timing>,
    pub size: Option<OutputSize>,
    /// Why the tool failed, if it did.
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct CaseResult {
    pub case: String,
    pub compressed: bool,
    pub qemu_img: ToolResult,
    pub vmdisk: ToolResult,
    /// Problems `qemu-img compare` / `check` / `info` found in vmdisk's output.
    pub verify_errors: Vec<String>,
}

pub fn run_case(setup: &Setup, case: &Case) -> Result<CaseResult> {
    let src = match case.from {
        Fmt::Raw => &setup.source.raw,
        Fmt::Qcow2 => &setup.source.qcow2,
    };
    let ext = case.to.name();
    let qemu_out = setup.dir.join(format!("out-qemu-img.{ext}"));
    let vmdisk_out = setup.dir.join(format!("out-vmdisk.{ext}"));
    let stderr_path = setup.dir.join("child.stderr");
    // `convert [QEMU_ONLY...] -f FMT -O FMT [OPTS...] SRC OUT`, the same for both tools.
    let command = |program: &Path, qemu_only: &[&str], out: &Path| {
        let mut c = Command::new(program);
        c.arg("convert").args(qemu_only);
        c.args(["-f", case.from.name(), "-O", case.to.name()]);
        c.args(case.opts).arg(src).arg(out);
        c
    };
    let qemu_cmd = || command(Path::new("qemu-img"), case.qemu_only, &qemu_out);
    let vmdisk_cmd = || command(setup.vmdisk, &[], &vmdisk_out);

    eprintln!("== {}", case.name);
    warm_cache(src)?;
    let outs = [qemu_out.as_path(), vmdisk_out.as_path()];
    let (mut qemu_runs, mut vmdisk_runs) = (Vec::new(), Vec::new());
    let (mut qemu_err, mut vmdisk_err) = (None, None);
    for i in 0..setup.runs {
        if qemu_err.is_none() {
            match timed(&mut qemu_cmd(), &qemu_out, &outs, &stderr_path) {
                Ok(m) => qemu_runs.push(m),
                Err(e) => qemu_err = Some(format!("{e:#}")),
            }
        }
        if vmdisk_err.is_none() {
            match timed(&mut vmdisk_cmd(), &vmdisk_out, &outs, &stderr_path) {
                Ok(m) => vmdisk_runs.push(m),
                Err(e) => vmdisk_err = Some(format!("{e:#}")),
            }
        }
        eprintln!(
            "   run {}: qemu-img {} / vmdisk {}",
            i + 1,
            show(&qemu_runs, i),
            show(&vmdisk_runs, i)
        );
    }

    let mut verify_errors = Vec::new();
    if vmdisk_err.is_none() {
        verify_errors = verify(&setup.source.raw, &vmdisk_out, case)?;
        for e in &verify_errors {
            eprintln!("!!!! WRONG OUTPUT from vmdisk ({}): {e}", case.name);
        }
    }
    if let Some(e) = &vmdisk_err {
        eprintln!("!!!! vmdisk FAILED ({}): {e}", case.name);
    }
    let result = CaseResult {
        case: case.name.clone(),
        compressed: case.compressed,
        qemu_img: tool_result(&qemu_runs, qemu_err),
        vmdisk: tool_result(&vmdisk_runs, vmdisk_err),
        verify_errors,
    };
    for out in [&qemu_out, &vmdisk_out] {
        remove_if_exists(out)?;
    }
    Ok(result)
}

fn show(runs: &[Measurement], i: usize) -> String {
    match runs.get(i) {
        Some(m) => format!("{:.2} s (cpu {:.2} s)", m.secs, m.cpu_s),
        None => "failed".into(),
    }
}

fn tool_result(runs: &[Measurement], error: Option<String>) -> ToolResult {
    let size = runs.last().and_then(|m| m.size);
    ToolResult {
        timing: (error.is_none() && !runs.is_empty()).then(|| timing(runs)),
        size: if error.is_none() { size } else { None },
        error,
    }
}

fn timing(runs: &[Measurement]) -> Timing {
    let mut secs: Vec<f64> = runs.iter().map(|m| m.secs).collect();
    let runs_s = secs.clone();
    secs.sort_by(f64::total_cmp);
    let n = secs.len();
    let median_s = if n % 2 == 1 {
        secs[n / 2]
    } else {
        (secs[n / 2 - 1] + secs[n / 2]) / 2.0
    };
    let peak_kib = runs.iter().map(|m| m.max_rss_kib).max().unwrap_or(0);
    let cpu_s = runs.iter().map(|m| m.cpu_s).fold(f64::INFINITY, f64::min);
    Timing {
        best_s: secs[0],
        median_s,
        runs_s,
        cpu_s,
        peak_rss_mib: peak_kib as f64 / 1024.0,
    }
}

struct Measurement {
    secs: f64,
    cpu_s: f64,
    max_rss_kib: u64,
    size: Option<OutputSize>,
}

/// Run `cmd` once, timed, after removing every output of the case (`outs`) and syncing (so the
/// previous run's writeback does not land in this run's time); read its peak RSS from wait4
/// and the size of what it wrote to `out`.
///
/// Removing *both* tools' outputs, not just this tool's, keeps the runs comparable: a writer
/// that starts right after ~1.5 GiB of page cache was freed gets those warm pages back, while
/// one that starts seconds later gets pages the hypervisor has meanwhile reclaimed (virtio
/// free page reporting) and pays a host fault per 4 KiB. Measured on this machine: the same
/// vmdisk raw->qcow2 took 0.40 s or 1.1 s depending only on that, and so did qemu-img.
fn timed(cmd: &mut Command, out: &Path, outs: &[&Path], stderr_path: &Path) -> Result<Measurement> {
    for out in outs {
        remove_if_exists(out)?;
    }
    sync();
    let stderr = File::create(stderr_path)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr);
    let start = Instant::now();
    let child = cmd
        .spawn()
        .with_context(|| format!("spawning {:?}", cmd.get_program()))?;
    let (status, rusage) = wait4(child.id() as libc::pid_t)?;
    let secs = start.elapsed().as_secs_f64();
    if !status.success() {
        let msg = std::fs::read_to_string(stderr_path).unwrap_or_default();
        let msg = if msg.trim().is_empty() {
            "(no stderr)"
        } else {
            msg.trim()
        };
        bail!("{status}: {msg}");
    }
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(Measurement {
        secs,
        cpu_s: tv(rusage.ru_utime) + tv(rusage.ru_stime),
        // ru_maxrss is in KiB on Linux.
        max_rss_kib: rusage.ru_maxrss.max(0) as u64,
        size: std::fs::metadata(out).ok().map(|m| OutputSize {
            allocated: m.blocks() * 512,
            apparent: m.len(),
        }),
    })
}

/// Reap `pid` (a child std::process spawned and we never `wait()` on) with its rusage.
fn wait4(pid: libc::pid_t) -> Result<(ExitStatus, libc::rusage)> {
    let mut status = 0;
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut rusage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: both pointers refer to live, writable locals of the right types.
        let r = unsafe { libc::wait4(pid, &mut status, 0, &mut rusage) };
        if r == pid {
            return Ok((ExitStatus::from_raw(status), rusage));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err).context("wait4");
        }
    }
}

/// Check vmdisk's output against the raw source with qemu-img; returns the problems found.
fn verify(src_raw: &Path, out: &Path, case: &Case) -> Result<Vec<String>> {
    let mut errors = Vec::new();
    let fmt = case.to.name();
    let compare = qemu_img(&["compare", "-f", "raw", "-F", fmt], &[src_raw, out])?;
    if !compare.0.success() {
        errors.push(format!("qemu-img compare: {} {}", compare.0, compare.1));
    }
    if case.to == Fmt::Qcow2 {
        let check = qemu_img(&["check", "-f", "qcow2"], &[out])?;
        if !check.0.success() {
            errors.push(format!("qemu-img check: {} {}", check.0, check.1));
        }
        let info = qemu_img(&["info", "--output=json", "-f", "qcow2"], &[out])?;
        let want = case
            .opts
            .iter()
            .find_map(|o| o.strip_prefix("compression_type="))
            .unwrap_or("zlib");
        let got = serde_json::from_str::<serde_json::Value>(&info.1)
            .ok()
            .and_then(|v| {
                v.pointer("/format-specific/data/compression-type")
                    .and_then(|t| t.as_str().map(str::to_owned))
            });
        if got.as_deref() != Some(want) {
            errors.push(format!(
                "qemu-img info: compression-type {got:?}, expected {want:?}"
            ));
        }
    }
    Ok(errors)
}

/// Run qemu-img; returns its status and stdout + stderr.
fn qemu_img(args: &[&str], paths: &[&Path]) -> Result<(ExitStatus, String)> {
    let out = Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .context("running qemu-img")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned()
        + String::from_utf8_lossy(&out.stderr).trim();
    Ok((out.status, text))
}

/// `qemu-img --version`'s first line; fails with the install hint when it is missing.
pub fn qemu_img_version() -> Result<String> {
    match Command::new("qemu-img").arg("--version").output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("qemu-img")
            .to_string()),
        Ok(out) => bail!("`qemu-img --version` failed: {}", out.status),
        Err(e) if e.kind() == io::ErrorKind::NotFound => bail!(
            "qemu-img not found: this benchmark runs it side by side with vmdisk.\n\
             Install it with `apt-get install qemu-utils` (or `cargo xtask deps` as root)."
        ),
        Err(e) => Err(e).context("running qemu-img --version"),
    }
}

/// Read the whole source once so both tools start with it in the page cache.
fn warm_cache(path: &Path) -> Result<()> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 4 << 20];
    while f.read(&mut buf)? != 0 {}
    Ok(())
}
