//! `vmdisk vmtest RUN_SCRIPT`: boot the user's own `result/bin/run-*-vm` on an overlay of its
//! disk, follow NixOS's boot phase by phase, log in over SSH and report; and `vmdisk vmtest
//! --explain LOG`: the same diagnoses for a saved console, qemu or ssh log. The work is in
//! `vmdisk_vm::vmtest` and `vmdisk_vm::diagnose`; this is the command line and the report.
//!
//! Exit codes: 0 passed (or, with --explain, no known failure in the log), 1 the VM failed or the
//! log shows a failure, 2 usage errors (clap's).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::Args;
use vmdisk_vm::diagnose::{self, Diagnosis};
use vmdisk_vm::vmtest::{VmtestOptions, VmtestReport};

/// A pasted log bigger than this is not a console capture (they are a few hundred KiB).
const MAX_LOG_BYTES: u64 = 64 << 20;

#[derive(Debug, Args)]
pub struct VmtestArgs {
    /// The run script (`./result/bin/run-nixos-vm`, nixos-shell's, vmWithDisko's, the
    /// linux-builder's).
    #[arg(required_unless_present = "explain")]
    pub run_script: Option<PathBuf>,
    /// Diagnose a saved log instead (a console capture, or what qemu or ssh printed).
    #[arg(long, value_name = "LOG", conflicts_with_all = ["run_script", "ssh", "key", "no_ssh", "persist", "keep"])]
    pub explain: Option<PathBuf>,
    /// Log in as USER (default root, with a fresh key vmdisk authorizes on the run's disk).
    #[arg(long, value_name = "USER")]
    pub ssh: Option<String>,
    /// Log in with this private key (one the configuration authorizes) instead of a fresh one.
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// Stop when the VM reached multi-user; no SSH.
    #[arg(long)]
    pub no_ssh: bool,
    /// Boot the disk itself instead of an overlay: what the VM writes stays (vmdisk adds
    /// nothing to it; give --key).
    #[arg(long)]
    pub persist: bool,
    /// Bound on the whole run, in seconds.
    #[arg(long, value_name = "S", default_value_t = 300)]
    pub timeout: u64,
    /// Print the report as JSON (stable: ids, phases with seconds, diagnoses).
    #[arg(long)]
    pub json: bool,
    /// Keep the run's folder (console log, qemu command line, result.json, the run's disk).
    #[arg(long)]
    pub keep: bool,
    /// Passed to the script after everything else (qemu options).
    #[arg(last = true)]
    pub args: Vec<String>,
}

pub fn run(a: VmtestArgs, quiet: bool) -> Result<u8> {
    if let Some(log) = &a.explain {
        return explain(log, a.json);
    }
    // clap guarantees one of the two.
    let Some(script) = a.run_script.clone() else {
        anyhow::bail!("give RUN_SCRIPT or --explain LOG");
    };
    let mut o = VmtestOptions::new(script);
    if let Some(u) = a.ssh {
        o.ssh_user = u;
    }
    o.key = a.key;
    o.no_ssh = a.no_ssh;
    o.persist = a.persist;
    o.timeout = Duration::from_secs(a.timeout.max(1));
    o.keep = a.keep;
    o.args = a.args;
    let r = vmdisk_vm::vmtest::vmtest(&o);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else if !quiet || !r.passed {
        print!("{}", human(&r));
    }
    Ok(if r.passed { 0 } else { 1 })
}

fn explain(log: &std::path::Path, json: bool) -> Result<u8> {
    let md =
        std::fs::metadata(log).with_context(|| format!("reading the log {}", log.display()))?;
    if md.len() > MAX_LOG_BYTES {
        anyhow::bail!(
            "{} is {} bytes: not a console log (limit {MAX_LOG_BYTES}); cut out the boot in question",
            log.display(),
            md.len()
        );
    }
    let bytes = std::fs::read(log).with_context(|| format!("reading the log {}", log.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    let d = diagnose::explain(&text);
    if json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            log: &'a std::path::Path,
            diagnoses: &'a [Diagnosis],
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Out { log, diagnoses: &d })?
        );
    } else if d.is_empty() {
        println!("{}: no known failure in this log", log.display());
    } else {
        print!("{}", diagnoses_text(&d));
    }
    Ok(if d.is_empty() { 0 } else { 1 })
}

fn diagnoses_text(d: &[Diagnosis]) -> String {
    let mut s = String::new();
    for d in d {
        let at = d.at_s.map(|t| format!(" (at {t:.3}s)")).unwrap_or_default();
        let _ = writeln!(s, "[{}]{at} {}", d.id, d.evidence);
        let _ = writeln!(s, "  cause: {}", d.cause);
        let _ = writeln!(s, "  fix:   {}", d.fix);
    }
    s
}

fn human(r: &VmtestReport) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "{} {} ({}; {} initrd)",
        if r.passed { "PASS" } else { "FAIL" },
        r.script.display(),
        r.arch_from.as_deref().unwrap_or("architecture unknown"),
        r.initrd
            .map(|i| format!("{i:?}").to_lowercase())
            .unwrap_or_else(|| "unknown".into())
    );
    let _ = writeln!(
        s,
        "  disk: {} {}",
        r.disk.how,
        r.disk
            .user_disk
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    for p in &r.phases {
        let _ = writeln!(s, "  {:>8.3}s  {:<15} {}", p.at_s, p.id, p.detail);
    }
    if let Some(t) = r.boot_to_ssh_s {
        let _ = writeln!(s, "  boot to SSH: {t:.3}s");
    }
    for c in &r.checks {
        let _ = writeln!(
            s,
            "  {} {}: {}",
            if c.ok { "ok  " } else { "FAIL" },
            c.name,
            c.detail
        );
    }
    if let Some(ssh) = &r.ssh {
        for n in &ssh.notes {
            let _ = writeln!(s, "  note: {n}");
        }
    }
    s.push_str(&diagnoses_text(&r.diagnoses));
    if let Some(e) = &r.error {
        let _ = writeln!(s, "  error: {e}");
    }
    if let Some(a) = &r.artifacts {
        let _ = writeln!(s, "  artifacts: {}", a.display());
    }
    s
}
