//! `vmdisk commit | rebase | copy` vs `qemu-img commit | qemu-img rebase | cp --reflink=auto`.
//!
//! One generated image (the convert bench's source) becomes the *base*; an overlay on it gets
//! its own data (a quarter of the base's amount, in extents across the disk), and a *new base*
//! differs from the base in another quarter. Before every timed run, all working copies are
//! restored from pristine ones and synced, so both tools start from the same bytes and the same
//! page-cache state; after each run the result is checked against the other tool's.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::gen;
use crate::util::{remove_if_exists, run, sha256, sync};

pub struct Options<'a> {
    pub vmdisk: &'a Path,
    pub dir: &'a Path,
    pub runs: usize,
    pub quick: bool,
    pub seed: u64,
}

#[derive(Serialize)]
pub struct Line {
    pub case: String,
    pub baseline: String,
    pub baseline_s: Vec<f64>,
    pub vmdisk_s: Vec<f64>,
    /// Best baseline time / best vmdisk time (>1: vmdisk faster).
    pub ratio: f64,
    /// Problems with vmdisk's result (empty: same result as the baseline).
    pub wrong: Vec<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub virtual_size: u64,
    pub overlay_data: u64,
    pub qemu_img: String,
    pub lines: Vec<Line>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.lines.iter().any(|l| !l.wrong.is_empty())
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "## vmdisk commit / rebase / copy vs qemu-img and cp\n\nBase: {:.2} GiB virtual; \
             overlay holds {:.0} MiB of its own data; qemu-img {}. Times: best (median) of {} \
             runs, every run from restored pristine copies after `sync`.\n\n\
             | case | baseline | baseline s | vmdisk s | ratio | result |\n|---|---|--:|--:|--:|---|\n",
            self.virtual_size as f64 / (1u64 << 30) as f64,
            self.overlay_data as f64 / (1u64 << 20) as f64,
            self.qemu_img,
            self.lines.first().map_or(0, |l| l.vmdisk_s.len()),
        );
        for l in &self.lines {
            s += &format!(
                "| {} | `{}` | {:.2} ({:.2}) | {:.2} ({:.2}) | **{:.2}x** | {} |\n",
                l.case,
                l.baseline,
                best(&l.baseline_s),
                median(&l.baseline_s),
                best(&l.vmdisk_s),
                median(&l.vmdisk_s),
                l.ratio,
                if l.wrong.is_empty() {
                    "same as baseline".to_string()
                } else {
                    format!("WRONG: {}", l.wrong.join("; "))
                }
            );
        }
        s
    }
}

fn best(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn qemu_img(dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
    run(Command::new("qemu-img").current_dir(dir).args(args))
}

fn qemu_io(dir: &Path, img: &str, cmds: &[String]) -> Result<()> {
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "qcow2"]);
    for x in cmds {
        c.arg("-c").arg(x);
    }
    let out = String::from_utf8_lossy(&run(c.arg(img))?).into_owned();
    if out.contains("failed") {
        bail!("qemu-io on {img}: {out}");
    }
    Ok(())
}

/// sha256 of the guest contents of `img` (in `dir`), through `qemu-img convert -O raw`.
fn view_sha(dir: &Path, img: &str) -> Result<String> {
    qemu_img(dir, &["convert", "-O", "raw", img, "view.raw"])?;
    let sum = sha256(&dir.join("view.raw"))?;
    fs::remove_file(dir.join("view.raw"))?;
    Ok(sum)
}

/// Run `cmd` in `dir` after restoring `files` from `pristine` and syncing; seconds taken.
fn timed(
    dir: &Path,
    pristine: &Path,
    files: &[&str],
    clean: &[&str],
    cmd: &mut Command,
) -> Result<f64> {
    for f in clean {
        remove_if_exists(&dir.join(f))?;
    }
    for f in files {
        fs::copy(pristine.join(f), dir.join(f)).with_context(|| format!("restoring {f}"))?;
    }
    sync();
    let t = Instant::now();
    run(cmd.current_dir(dir))?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn bench(o: &Options) -> Result<Report> {
    // First: fails with the install hint when qemu-img is missing.
    let qemu_img_version = crate::run::qemu_img_version()?
        .trim_start_matches("qemu-img version ")
        .to_string();
    let (size, data) = if o.quick {
        (256 << 20, 128 << 20)
    } else {
        (2 << 30, 1 << 30)
    };
    let src = gen::ensure(
        o.dir,
        &gen::Spec {
            virtual_size: size,
            data,
            seed: o.seed,
        },
    )?;
    let work: PathBuf = o.dir.join("overlay-bench");
    let pristine = work.join("pristine");
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&pristine)?;
    let w = &work;

    // base: the generated image; ov: overlay with a quarter as much data of its own;
    // new: the base with another quarter changed.
    fs::copy(&src.qcow2, pristine.join("base.qcow2"))?;
    qemu_img(
        &pristine,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    )?;
    fs::copy(pristine.join("base.qcow2"), pristine.join("new.qcow2"))?;
    let quarter = data / 4;
    let pieces = 64u64;
    let step = size / pieces;
    let len = (quarter / pieces) / 65536 * 65536;
    let ov_cmds: Vec<String> = (0..pieces)
        .map(|i| {
            format!(
                "write -P {:#x} {} {len}",
                0x40 + i % 64,
                i * step + step / 3
            )
        })
        .collect();
    let new_cmds: Vec<String> = (0..pieces)
        .map(|i| {
            format!(
                "write -P {:#x} {} {len}",
                0x80 + i % 64,
                i * step + 2 * step / 3
            )
        })
        .collect();
    qemu_io(&pristine, "ov.qcow2", &ov_cmds)?;
    qemu_io(&pristine, "new.qcow2", &new_cmds)?;
    let ov_view = view_sha(&pristine, "ov.qcow2")?;
    let all = ["base.qcow2", "ov.qcow2", "new.qcow2"];

    let vm = |args: &[&str]| {
        let mut c = Command::new(o.vmdisk);
        c.args(args);
        c
    };
    let qi = |args: &[&str]| {
        let mut c = Command::new("qemu-img");
        c.args(args);
        c
    };
    let mut lines = Vec::new();

    // commit
    let (mut b, mut v, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.runs {
        b.push(timed(
            w,
            &pristine,
            &all,
            &[],
            &mut qi(&["commit", "-q", "ov.qcow2"]),
        )?);
        let qemu_base = view_sha(w, "base.qcow2")?;
        v.push(timed(
            w,
            &pristine,
            &all,
            &[],
            &mut vm(&["commit", "-q", "ov.qcow2"]),
        )?);
        let ours = view_sha(w, "base.qcow2")?;
        if ours != qemu_base {
            wrong.push("the committed base differs from qemu-img's".to_string());
        }
        if view_sha(w, "ov.qcow2")? != ov_view {
            wrong.push("the overlay's view changed".to_string());
        }
    }
    lines.push(line("commit", "qemu-img commit", b, v, wrong));

    // rebase onto the new base, keeping the view
    let (mut b, mut v, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..o.runs {
        let args = ["rebase", "-q", "-b", "new.qcow2", "-F", "qcow2", "ov.qcow2"];
        b.push(timed(w, &pristine, &all, &[], &mut qi(&args))?);
        v.push(timed(w, &pristine, &all, &[], &mut vm(&args))?);
        if view_sha(w, "ov.qcow2")? != ov_view {
            wrong.push("the rebased overlay's view changed".to_string());
        }
    }
    lines.push(line("rebase -b NEW", "qemu-img rebase", b, v, wrong));

    // copy of the overlay file
    let (mut b, mut v, mut wrong) = (Vec::new(), Vec::new(), Vec::new());
    let copy = ["copy.qcow2"];
    for _ in 0..o.runs {
        // vmdisk's copy is durable when it returns (fsync of the file and the directory):
        // the baseline gets the same.
        b.push(timed(
            w,
            &pristine,
            &all,
            &copy,
            Command::new("sh").args([
                "-c",
                "cp --reflink=auto --sparse=always ov.qcow2 copy.qcow2 && sync copy.qcow2 .",
            ]),
        )?);
        v.push(timed(
            w,
            &pristine,
            &all,
            &copy,
            &mut vm(&["copy", "-q", "ov.qcow2", "copy.qcow2"]),
        )?);
        if fs::read(w.join("copy.qcow2"))? != fs::read(w.join("ov.qcow2"))? {
            wrong.push("the copy is not byte-identical".to_string());
        }
    }
    lines.push(line(
        "copy overlay",
        "cp --reflink=auto --sparse=always && sync FILE DIR",
        b,
        v,
        wrong,
    ));

    let _ = fs::remove_dir_all(&work);
    Ok(Report {
        virtual_size: size,
        overlay_data: len * pieces,
        qemu_img: qemu_img_version,
        lines,
    })
}

fn line(case: &str, baseline: &str, b: Vec<f64>, v: Vec<f64>, mut wrong: Vec<String>) -> Line {
    wrong.dedup();
    Line {
        case: case.into(),
        baseline: baseline.into(),
        ratio: best(&b) / best(&v),
        baseline_s: b,
        vmdisk_s: v,
        wrong,
    }
}
