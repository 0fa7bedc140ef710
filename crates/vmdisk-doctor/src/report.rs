//! What the doctor found: one [`Check`] per step nix takes, grouped per machine, and how the
//! report prints (text for people, `--json` for scripts).
//!
//! JSON shape (stable; fields are only ever added):
//!
//! ```text
//! { "ok": bool, "elapsed_ms": u64,
//!   "ssh_view": { "user", "uid", "home", "reason", "can_check" },
//!   "builders": { "value", "file", "line", "source" },
//!   "checks":   [ CHECK ],                     // the builder list as a whole
//!   "machines": [ { "uri", "origin", "systems", "ssh_key", "max_jobs", "speed_factor",
//!                   "supported_features", "mandatory_features", "public_host_key",
//!                   "checks": [ CHECK ] } ] }
//! CHECK = { "id", "subject"?, "verdict": "pass"|"fail"|"warn"|"skip", "diagnosis"?,
//!           "summary", "evidence": [..], "cause"?, "fix"?, "elapsed_ms" }
//! ```

use serde::Serialize;

use crate::machines::Machine;

/// The outcome of one check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Verdict {
    Pass,
    /// Nix will fail (or silently not use the builder) because of this.
    Fail,
    /// Works, but is fragile or not what the user probably meant.
    Warn,
    /// Not checked (an earlier step failed, or nothing to check); the summary says why.
    Skip,
}

impl Verdict {
    fn label(self) -> &'static str {
        match self {
            Verdict::Pass => "PASS",
            Verdict::Fail => "FAIL",
            Verdict::Warn => "WARN",
            Verdict::Skip => "SKIP",
        }
    }
}

/// One step, its verdict, the evidence, and (when not passing) the cause and the fix.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Stable id of the step (`host-key`, `auth`, `systems`, ...).
    pub id: &'static str,
    /// What the step was about when it runs more than once (`x86_64-linux` for `systems`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    pub verdict: Verdict,
    /// Stable id of what was found when the step did not pass (`host-key-changed`,
    /// `unprotected-key`, `no-binfmt`, ...).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub diagnosis: Option<String>,
    /// One line.
    pub summary: String,
    /// What was seen: the lines of ssh's stderr, file modes, fingerprints.
    pub evidence: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cause: Option<String>,
    /// An exact command or Nix option.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fix: Option<String>,
    pub elapsed_ms: u64,
}

impl Check {
    pub fn new(id: &'static str, verdict: Verdict, summary: impl Into<String>) -> Check {
        Check {
            id,
            subject: None,
            verdict,
            diagnosis: None,
            summary: summary.into(),
            evidence: Vec::new(),
            cause: None,
            fix: None,
            elapsed_ms: 0,
        }
    }
    pub fn pass(id: &'static str, summary: impl Into<String>) -> Check {
        Check::new(id, Verdict::Pass, summary)
    }
    pub fn skip(id: &'static str, summary: impl Into<String>) -> Check {
        Check::new(id, Verdict::Skip, summary)
    }
    /// A failure with its diagnosis id, cause and fix.
    pub fn fail(
        id: &'static str,
        diagnosis: impl Into<String>,
        summary: impl Into<String>,
        cause: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            diagnosis: Some(diagnosis.into()),
            cause: Some(cause.into()),
            fix: Some(fix.into()),
            ..Check::new(id, Verdict::Fail, summary)
        }
    }
    pub fn warn(
        id: &'static str,
        diagnosis: impl Into<String>,
        summary: impl Into<String>,
        cause: impl Into<String>,
        fix: impl Into<String>,
    ) -> Check {
        Check {
            verdict: Verdict::Warn,
            ..Check::fail(id, diagnosis, summary, cause, fix)
        }
    }
    pub fn with_evidence<S: Into<String>>(mut self, lines: impl IntoIterator<Item = S>) -> Check {
        self.evidence.extend(lines.into_iter().map(Into::into));
        self
    }
    pub fn about(mut self, subject: impl Into<String>) -> Check {
        self.subject = Some(subject.into());
        self
    }
    pub fn passed(&self) -> bool {
        self.verdict == Verdict::Pass
    }
}

/// Whose SSH configuration, keys and known_hosts the checks use, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SshView {
    pub user: String,
    pub uid: u32,
    pub home: String,
    pub reason: String,
    /// This process can run ssh as that user (it is that user, or root).
    pub can_check: bool,
}

/// Where the list of builders came from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BuildersSource {
    pub value: String,
    pub file: Option<String>,
    pub line: usize,
    /// `command-line`, `nix.conf` or `default`.
    pub source: &'static str,
}

/// One machine and its checks.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct MachineReport {
    #[serde(flatten)]
    pub machine: Machine,
    pub checks: Vec<Check>,
}

/// Everything the doctor found.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Report {
    pub ok: bool,
    pub elapsed_ms: u64,
    pub ssh_view: SshView,
    pub builders: BuildersSource,
    pub checks: Vec<Check>,
    pub machines: Vec<MachineReport>,
}

impl Report {
    /// Every check, the builder list's first.
    pub fn all_checks(&self) -> impl Iterator<Item = &Check> {
        self.checks
            .iter()
            .chain(self.machines.iter().flat_map(|m| m.checks.iter()))
    }

    /// Set `ok`: no check failed.
    pub fn finish(&mut self) {
        let failed = self.all_checks().any(|c| c.verdict == Verdict::Fail);
        self.ok = !failed;
    }

    /// The report for people.
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let v = &self.ssh_view;
        s.push_str(&format!(
            "SSH as {} (uid {}): {}\n",
            v.user, v.uid, v.reason
        ));
        let b = &self.builders;
        let from = match (&b.file, b.source) {
            (Some(f), _) => format!("{f}:{}", b.line),
            (None, "command-line") => "the command line".into(),
            (None, _) => "nix's default".into(),
        };
        s.push_str(&format!("builders = {:?} (from {from})\n", b.value));
        for c in &self.checks {
            push_check(&mut s, c, "");
        }
        for m in &self.machines {
            s.push_str(&format!(
                "\n{}  ({}; systems {})\n",
                m.machine.uri,
                m.machine.origin,
                m.machine.systems.join(",")
            ));
            for c in &m.checks {
                push_check(&mut s, c, "  ");
            }
        }
        let (fail, warn) = self.all_checks().fold((0, 0), |(f, w), c| match c.verdict {
            Verdict::Fail => (f + 1, w),
            Verdict::Warn => (f, w + 1),
            _ => (f, w),
        });
        s.push_str(&format!(
            "\n{}: {fail} failed, {warn} warnings, {} checks in {} ms\n",
            if self.ok { "ok" } else { "not ok" },
            self.all_checks().count(),
            self.elapsed_ms
        ));
        s
    }
}

fn push_check(s: &mut String, c: &Check, indent: &str) {
    let id = match &c.subject {
        Some(sub) => format!("{} {sub}", c.id),
        None => c.id.to_string(),
    };
    let diag = match &c.diagnosis {
        Some(d) => format!(" [{d}]"),
        None => String::new(),
    };
    s.push_str(&format!(
        "{indent}{} {id:<20}{diag} {}\n",
        c.verdict.label(),
        c.summary
    ));
    for e in &c.evidence {
        s.push_str(&format!("{indent}       | {e}\n"));
    }
    if let Some(cause) = &c.cause {
        s.push_str(&format!("{indent}       cause: {cause}\n"));
    }
    if let Some(fix) = &c.fix {
        s.push_str(&format!("{indent}       fix:   {fix}\n"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_prints_its_id_cause_and_fix_and_sets_ok() {
        let mut r = Report {
            ok: true,
            elapsed_ms: 3,
            ssh_view: SshView {
                user: "root".into(),
                uid: 0,
                home: "/root".into(),
                reason: "a nix-daemon runs the builds".into(),
                can_check: true,
            },
            builders: BuildersSource {
                value: "".into(),
                file: Some("/etc/nix/nix.conf".into()),
                line: 4,
                source: "nix.conf",
            },
            checks: vec![Check::fail(
                "builders-disabled",
                "builders-empty",
                "builders is empty",
                "NixOS writes it",
                "nix.distributedBuilds = true;",
            )
            .with_evidence(["/etc/nix/nix.conf:4: builders ="])],
            machines: vec![],
        };
        r.finish();
        assert!(!r.ok);
        let t = r.to_text();
        assert!(t.contains("FAIL builders-disabled"), "{t}");
        assert!(t.contains("[builders-empty]"), "{t}");
        assert!(t.contains("fix:   nix.distributedBuilds = true;"), "{t}");
        assert!(t.contains("/etc/nix/nix.conf:4"), "{t}");
        let j = serde_json::to_value(&r).unwrap();
        assert_eq!(j["checks"][0]["verdict"], "fail");
        assert_eq!(j["checks"][0]["diagnosis"], "builders-empty");
        assert_eq!(j["ok"], false);
    }
}
