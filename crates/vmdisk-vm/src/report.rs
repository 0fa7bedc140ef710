//! The human table and the JSON report of a harness run.

use std::fmt::Write as _;

use serde::Serialize;

use crate::run::VmResult;

/// The whole run, as `--json` prints it.
#[derive(Debug, Serialize)]
pub struct Report<'a> {
    pub passed: bool,
    pub vms: &'a [VmResult],
}

pub fn json(results: &[VmResult]) -> String {
    let r = Report {
        passed: results.iter().all(|r| r.passed),
        vms: results,
    };
    serde_json::to_string_pretty(&r).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
}

fn t(v: Option<f64>) -> String {
    v.map_or("-".into(), |s| format!("{s:.2}s"))
}

/// One row per VM, then the failures with their diagnosis and artifact folder.
pub fn table(results: &[VmResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<16} {:<8} {:<5} {:<6} {:>8} {:>8} {:>8} {:>9} {:>8}",
        "VM", "ARCH", "ACCEL", "RESULT", "BUILD", "STAGE1", "BANNER", "SSH", "OVERHEAD"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<16} {:<8} {:<5} {:<6} {:>8} {:>8} {:>8} {:>9} {:>8}",
            r.name,
            r.arch.uname(),
            r.accel,
            if r.passed { "pass" } else { "FAIL" },
            format!("{:.2}s", r.timings.build_s),
            t(r.timings.stage1_s),
            t(r.timings.banner_s),
            t(r.timings.ssh_s),
            r.timings
                .overhead_pct
                .map_or("-".into(), |p| format!("{p:.1}%")),
        );
    }
    for r in results.iter().filter(|r| !r.passed) {
        let _ = writeln!(out, "\n{} failed:", r.name);
        for c in r.checks.iter().filter(|c| !c.ok) {
            let _ = writeln!(out, "  check {}: {}", c.name, c.detail);
        }
        if let Some(d) = &r.diagnosis {
            let _ = writeln!(out, "  cause: {}", d.cause);
            let _ = writeln!(out, "  fix:   {}", d.fix);
            let _ = writeln!(out, "  seen:  {}", d.evidence);
        } else if let Some(e) = &r.error {
            let _ = writeln!(out, "  error: {e}");
        }
        let _ = writeln!(out, "  artifacts: {}", r.artifacts.display());
    }
    out
}
