//! Ratios, targets and the Markdown / JSON report.

use std::fmt::Write;
use std::path::Path;

use serde::Serialize;

use crate::gen::{GenStats, Source};
use crate::run::CaseResult;

/// qemu-img time / vmdisk time must reach this without compression ...
const SPEED_TARGET: f64 = 1.0;
/// ... and this with compression (vmdisk compresses in parallel).
const SPEED_TARGET_COMPRESSED: f64 = 1.5;
/// vmdisk output size / qemu-img output size (allocated and apparent) at most this.
const SIZE_TARGET: f64 = 1.01;
/// vmdisk peak RSS below this (bounded-memory convert).
const RSS_TARGET_MIB: f64 = 100.0;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

#[derive(Serialize)]
pub struct Report {
    pub source: GenStats,
    pub qemu_img_version: String,
    pub vmdisk: String,
    /// /proc/loadavg when the benchmark started (timings on a busy machine are noisy).
    pub load_average: String,
    pub runs: usize,
    pub targets: Targets,
    pub rows: Vec<Row>,
}

#[derive(Serialize)]
pub struct Targets {
    pub speed: f64,
    pub speed_compressed: f64,
    pub size: f64,
    pub rss_mib: f64,
}

#[derive(Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub result: CaseResult,
    /// qemu-img best time / vmdisk best time; > 1 means vmdisk is faster.
    pub speed_ratio: Option<f64>,
    /// vmdisk / qemu-img allocated bytes.
    pub size_ratio: Option<f64>,
    /// vmdisk / qemu-img apparent size.
    pub apparent_size_ratio: Option<f64>,
    /// "PASS", "MISS: ..." (a performance target), or "FAIL: ..." (vmdisk erred or was wrong).
    pub verdict: String,
}

impl Report {
    pub fn new(
        source: &Source,
        qemu_img_version: &str,
        vmdisk: &Path,
        runs: usize,
        results: Vec<CaseResult>,
    ) -> Self {
        Report {
            source: source.stats.clone(),
            qemu_img_version: qemu_img_version.to_string(),
            vmdisk: vmdisk.display().to_string(),
            load_average: load_average(),
            runs,
            targets: Targets {
                speed: SPEED_TARGET,
                speed_compressed: SPEED_TARGET_COMPRESSED,
                size: SIZE_TARGET,
                rss_mib: RSS_TARGET_MIB,
            },
            rows: results.into_iter().map(Row::new).collect(),
        }
    }

    /// Cases where vmdisk failed or wrote a wrong image.
    pub fn failed_cases(&self) -> Vec<String> {
        let failed = self.rows.iter().filter(|r| r.verdict.starts_with("FAIL"));
        failed.map(|r| r.result.case.clone()).collect()
    }

    pub fn markdown(&self) -> String {
        let s = &self.source;
        let mut md = String::new();
        let _ = writeln!(md, "## vmdisk convert vs qemu-img convert\n");
        let _ = writeln!(
            md,
            "Source: {:.2} GiB virtual, {:.2} GiB data ({:.2} GiB of it explicit zeros) in {} \
             extents, seed {}. {}; vmdisk `{}`. Times: best of {} runs (median). \
             Load average at start: {} on {} CPUs.\n",
            s.virtual_size as f64 / GIB,
            s.data_bytes as f64 / GIB,
            s.zero_bytes as f64 / GIB,
            s.extents,
            s.seed,
            self.qemu_img_version,
            self.vmdisk,
            self.runs,
            self.load_average,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        );
        md.push_str(
            "| case | qemu-img s | vmdisk s | speed ratio | qemu-img size MiB | vmdisk size MiB \
             | size ratio | vmdisk peak RSS MiB (qemu-img) | CPU s vmdisk (qemu-img) | verdict |\n\
             |---|--:|--:|--:|--:|--:|--:|--:|--:|---|\n",
        );
        for row in &self.rows {
            let (q, v) = (&row.result.qemu_img, &row.result.vmdisk);
            let time = |t: &Option<crate::run::Timing>| match t {
                Some(t) => format!("{:.2} ({:.2})", t.best_s, t.median_s),
                None => "failed".into(),
            };
            let size = |s: &Option<crate::run::OutputSize>| match s {
                Some(s) => format!("{:.1}", s.allocated as f64 / MIB),
                None => "-".into(),
            };
            let rss = format!(
                "{} ({})",
                opt(v.timing.as_ref().map(|t| t.peak_rss_mib), 1, ""),
                opt(q.timing.as_ref().map(|t| t.peak_rss_mib), 1, ""),
            );
            let cpu = format!(
                "{} ({})",
                opt(v.timing.as_ref().map(|t| t.cpu_s), 2, ""),
                opt(q.timing.as_ref().map(|t| t.cpu_s), 2, ""),
            );
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                row.result.case,
                time(&q.timing),
                time(&v.timing),
                opt(row.speed_ratio, 2, "x"),
                size(&q.size),
                size(&v.size),
                opt(row.size_ratio, 3, "x"),
                rss,
                cpu,
                row.verdict,
            );
        }
        let _ = writeln!(
            md,
            "\nTargets: speed ratio (qemu-img / vmdisk best time, >1 = vmdisk faster) >= {:.1}x \
             uncompressed, >= {:.1}x compressed; size ratio (vmdisk / qemu-img allocated bytes, \
             st_blocks*512; apparent sizes must match too, see --json) <= {:.2}x; vmdisk peak \
             RSS < {:.0} MiB. qemu-img runs with default settings (no -W) unless the case says \
             otherwise. CPU s = least user+system time over the runs (steadier than wall time on a \
             busy machine). FAIL = vmdisk erred or `qemu-img compare`/`check` rejected its output.",
            SPEED_TARGET, SPEED_TARGET_COMPRESSED, SIZE_TARGET, RSS_TARGET_MIB
        );
        for row in &self.rows {
            if let Some(e) = &row.result.vmdisk.error {
                let _ = writeln!(md, "\n**{}: vmdisk failed:** {e}", row.result.case);
            }
            if let Some(e) = &row.result.qemu_img.error {
                let _ = writeln!(md, "\n**{}: qemu-img failed:** {e}", row.result.case);
            }
            for e in &row.result.verify_errors {
                let _ = writeln!(md, "\n**{}: WRONG OUTPUT:** {e}", row.result.case);
            }
        }
        md
    }
}

impl Row {
    fn new(result: CaseResult) -> Self {
        let (q, v) = (&result.qemu_img, &result.vmdisk);
        let speed_ratio = match (&q.timing, &v.timing) {
            (Some(q), Some(v)) if v.best_s > 0.0 => Some(q.best_s / v.best_s),
            _ => None,
        };
        let ratio = |f: fn(&crate::run::OutputSize) -> u64| match (&q.size, &v.size) {
            (Some(q), Some(v)) if f(q) > 0 => Some(f(v) as f64 / f(q) as f64),
            _ => None,
        };
        let size_ratio = ratio(|s| s.allocated);
        let apparent_size_ratio = ratio(|s| s.apparent);

        let verdict = if v.error.is_some() {
            "FAIL: vmdisk error".to_string()
        } else if !result.verify_errors.is_empty() {
            "FAIL: WRONG OUTPUT".to_string()
        } else if q.error.is_some() {
            "n/a: qemu-img failed".to_string()
        } else {
            let speed_target = if result.compressed {
                SPEED_TARGET_COMPRESSED
            } else {
                SPEED_TARGET
            };
            let rss = v.timing.as_ref().map(|t| t.peak_rss_mib);
            let mut misses = Vec::new();
            if speed_ratio.is_none_or(|r| r < speed_target) {
                misses.push("speed");
            }
            let size_ok = |r: Option<f64>| r.is_some_and(|r| r <= SIZE_TARGET);
            if !size_ok(size_ratio) || !size_ok(apparent_size_ratio) {
                misses.push("size");
            }
            if rss.is_none_or(|r| r >= RSS_TARGET_MIB) {
                misses.push("RSS");
            }
            if misses.is_empty() {
                "PASS".to_string()
            } else {
                format!("MISS: {}", misses.join(", "))
            }
        };
        Row {
            result,
            speed_ratio,
            size_ratio,
            apparent_size_ratio,
            verdict,
        }
    }
}

fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn opt(v: Option<f64>, decimals: usize, unit: &str) -> String {
    match v {
        Some(v) => format!("{v:.decimals$}{unit}"),
        None => "-".into(),
    }
}
