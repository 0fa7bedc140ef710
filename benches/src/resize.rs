//! `vmdisk resize +20G` vs `qemu-img resize +20G` of an 8 GiB qcow2 holding data.
//!
//! The qcow2 is made once by qemu-img (cached in the bench dir) with data in extents across
//! the disk, so the L1 table, the refcounts and the tail of the file are real. Before every
//! timed run the working copy is restored from the pristine one and synced, so both tools
//! start from the same bytes and page-cache state; afterwards vmdisk's result must pass
//! `qemu-img check` and compare equal to qemu-img's (`qemu-img compare`).
//!
//! `--grow-fs +20G` (issue #18 part 2): an 8 GiB build-vm-shaped qcow2 (a whole-disk ext4
//! labelled nixos, made by mkfs.ext4 with files in it) grown by `vmdisk resize --grow-fs`
//! against the rootless way today, timed as one: `qemu-img resize` + `qemu-img convert -O
//! raw` + `resize2fs` + `qemu-img convert -O qcow2`. vmdisk's result must pass `qemu-img
//! check` and `e2fsck -fn`, and carry the block count resize2fs gave the baseline.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use serde::Serialize;

use crate::util::{remove_if_exists, run, sync};

pub struct Options<'a> {
    pub vmdisk: &'a Path,
    pub dir: &'a Path,
    pub runs: usize,
    pub quick: bool,
}

#[derive(Serialize)]
pub struct Line {
    pub case: String,
    pub qemu_img_s: Vec<f64>,
    pub vmdisk_s: Vec<f64>,
    /// Best qemu-img time / best vmdisk time (>1: vmdisk faster).
    pub ratio: f64,
    /// Problems with vmdisk's result (empty: same result as qemu-img's).
    pub wrong: Vec<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub virtual_size: u64,
    pub data: u64,
    pub qemu_img: String,
    pub lines: Vec<Line>,
}

impl Report {
    pub fn failed(&self) -> bool {
        self.lines.iter().any(|l| !l.wrong.is_empty())
    }

    pub fn markdown(&self) -> String {
        let mut s = format!(
            "## vmdisk resize vs qemu-img resize\n\nqcow2 of {:.2} GiB virtual with {:.0} MiB \
             of data; qemu-img {}. Times: best (median) of {} runs, each from a restored \
             pristine copy after `sync`.\n\n\
             | case | qemu-img s | vmdisk s | ratio | result |\n|---|--:|--:|--:|---|\n",
            self.virtual_size as f64 / (1u64 << 30) as f64,
            self.data as f64 / (1u64 << 20) as f64,
            self.qemu_img,
            self.lines.first().map_or(0, |l| l.vmdisk_s.len()),
        );
        for l in &self.lines {
            s += &format!(
                "| {} | {:.3} ({:.3}) | {:.3} ({:.3}) | **{:.2}x** | {} |\n",
                l.case,
                best(&l.qemu_img_s),
                median(&l.qemu_img_s),
                best(&l.vmdisk_s),
                median(&l.vmdisk_s),
                l.ratio,
                if l.wrong.is_empty() {
                    "ok (qemu-img check; compare, or e2fsck + resize2fs block count)".to_string()
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

/// The pristine 8 GiB (or, quick, 1 GiB) qcow2 with data spread over the disk.
fn ensure_source(dir: &Path, size: u64, data: u64) -> Result<String> {
    let name = format!("resize-src-{size}-{data}.qcow2");
    if dir.join(&name).exists() {
        return Ok(name);
    }
    let tmp = format!(".{name}.tmp");
    remove_if_exists(&dir.join(&tmp))?;
    qemu_img(
        dir,
        &["create", "-q", "-f", "qcow2", &tmp, &size.to_string()],
    )?;
    // Extents of 4 MiB, evenly spread, patterned (so they are real data).
    let extent = 4u64 << 20;
    let n = (data / extent).max(1);
    let step = size / n;
    let mut c = Command::new("qemu-io");
    c.current_dir(dir).args(["-f", "qcow2"]);
    for i in 0..n {
        c.arg("-c")
            .arg(format!("write -P {} {} {extent}", (i % 250) + 1, i * step));
    }
    run(c.arg(&tmp))?;
    fs::rename(dir.join(&tmp), dir.join(&name)).context("naming the bench source")?;
    Ok(name)
}

/// Restore `work` from `pristine`, sync, run `cmd`; seconds taken.
fn timed(dir: &Path, pristine: &str, work: &str, cmd: &mut Command) -> Result<f64> {
    fs::copy(dir.join(pristine), dir.join(work)).with_context(|| format!("restoring {work}"))?;
    sync();
    let t = Instant::now();
    run(cmd.current_dir(dir))?;
    Ok(t.elapsed().as_secs_f64())
}

pub fn bench(o: &Options<'_>) -> Result<Report> {
    fs::create_dir_all(o.dir)?;
    let (size, data) = if o.quick {
        (1u64 << 30, 64u64 << 20)
    } else {
        (8u64 << 30, 1u64 << 30)
    };
    let src = ensure_source(o.dir, size, data)?;
    let version = String::from_utf8_lossy(&qemu_img(o.dir, &["--version"])?)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    let cases: &[(&str, &[&str])] = &[
        ("+20G", &[]),
        (
            "+20G --preallocation=metadata",
            &["--preallocation=metadata"],
        ),
    ];
    let mut lines = Vec::new();
    for (case, extra) in cases {
        let (mut q, mut v) = (Vec::new(), Vec::new());
        for _ in 0..o.runs.max(1) {
            let mut qc = Command::new("qemu-img");
            qc.args(["resize", "-q", "-f", "qcow2"])
                .args(*extra)
                .args(["q.qcow2", "+20G"]);
            q.push(timed(o.dir, &src, "q.qcow2", &mut qc)?);
            let mut vc = Command::new(o.vmdisk);
            vc.args(["-q", "resize", "-f", "qcow2"])
                .args(*extra)
                .args(["v.qcow2", "+20G"]);
            v.push(timed(o.dir, &src, "v.qcow2", &mut vc)?);
        }
        let mut wrong = Vec::new();
        if let Err(e) = qemu_img(o.dir, &["check", "-q", "v.qcow2"]) {
            wrong.push(format!("qemu-img check: {e:#}"));
        }
        if let Err(e) = qemu_img(o.dir, &["compare", "-q", "v.qcow2", "q.qcow2"]) {
            wrong.push(format!("qemu-img compare: {e:#}"));
        }
        lines.push(Line {
            case: case.to_string(),
            ratio: best(&q) / best(&v),
            qemu_img_s: q,
            vmdisk_s: v,
            wrong,
        });
    }
    lines.push(grow_fs(o, size)?);
    remove_if_exists(&o.dir.join("q.qcow2"))?;
    remove_if_exists(&o.dir.join("v.qcow2"))?;
    Ok(Report {
        virtual_size: size,
        data,
        qemu_img: version,
        lines,
    })
}

/// The pristine build-vm-shaped qcow2: mkfs.ext4 -L nixos over a tree of files.
fn ensure_ext4_source(dir: &Path, size: u64) -> Result<String> {
    let name = format!("growfs-src-{size}.qcow2");
    if dir.join(&name).exists() {
        return Ok(name);
    }
    let tree = dir.join("growfs-tree");
    let _ = fs::remove_dir_all(&tree);
    // 64 files of 1 MiB in a nix-store-like tree, patterned (real data).
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for i in 0..64 {
        let d = tree.join(format!("nix/store/{i:02}-pkg"));
        fs::create_dir_all(&d)?;
        let mut buf = vec![0u8; 1 << 20];
        for b in buf.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
        }
        fs::write(d.join("file"), &buf)?;
    }
    let raw = dir.join("growfs-src.raw");
    remove_if_exists(&raw)?;
    fs::File::create(&raw)?.set_len(size)?;
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "nixos", "-d"])
        .arg(&tree)
        .arg(&raw))?;
    let tmp = format!(".{name}.tmp");
    qemu_img(dir, &["convert", "-O", "qcow2", "growfs-src.raw", &tmp])?;
    fs::rename(dir.join(&tmp), dir.join(&name))?;
    remove_if_exists(&raw)?;
    fs::remove_dir_all(&tree)?;
    Ok(name)
}

fn block_count(dir: &Path, raw: &str) -> Result<u64> {
    let out = String::from_utf8_lossy(&run(Command::new("dumpe2fs")
        .current_dir(dir)
        .args(["-h", raw]))?)
    .into_owned();
    out.lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .and_then(|v| v.trim().parse().ok())
        .context("dumpe2fs -h has no block count")
}

fn grow_fs(o: &Options<'_>, size: u64) -> Result<Line> {
    let src = ensure_ext4_source(o.dir, size)?;
    let (mut q, mut v) = (Vec::new(), Vec::new());
    for _ in 0..o.runs.max(1) {
        fs::copy(o.dir.join(&src), o.dir.join("b.qcow2"))?;
        remove_if_exists(&o.dir.join("b.raw"))?;
        sync();
        let t = Instant::now();
        qemu_img(o.dir, &["resize", "-q", "-f", "qcow2", "b.qcow2", "+20G"])?;
        qemu_img(o.dir, &["convert", "-O", "raw", "b.qcow2", "b.raw"])?;
        run(Command::new("resize2fs").current_dir(o.dir).args(["b.raw"]))?;
        qemu_img(o.dir, &["convert", "-O", "qcow2", "b.raw", "b.qcow2"])?;
        q.push(t.elapsed().as_secs_f64());
        let mut vc = Command::new(o.vmdisk);
        vc.args([
            "-q",
            "resize",
            "--grow-fs",
            "-f",
            "qcow2",
            "v.qcow2",
            "+20G",
        ]);
        v.push(timed(o.dir, &src, "v.qcow2", &mut vc)?);
    }
    let mut wrong = Vec::new();
    if let Err(e) = qemu_img(o.dir, &["check", "-q", "v.qcow2"]) {
        wrong.push(format!("qemu-img check: {e:#}"));
    }
    qemu_img(o.dir, &["convert", "-O", "raw", "v.qcow2", "v.raw"])?;
    if let Err(e) = run(Command::new("e2fsck")
        .current_dir(o.dir)
        .args(["-fn", "v.raw"]))
    {
        wrong.push(format!("e2fsck -fn: {e:#}"));
    }
    let (bv, bq) = (block_count(o.dir, "v.raw")?, block_count(o.dir, "b.raw")?);
    if bv != bq {
        wrong.push(format!("{bv} blocks, resize2fs made {bq}"));
    }
    for f in ["b.qcow2", "b.raw", "v.raw"] {
        remove_if_exists(&o.dir.join(f))?;
    }
    Ok(Line {
        case: "--grow-fs +20G of a whole-disk ext4 (baseline: qemu-img resize + convert -O raw \
               + resize2fs + convert -O qcow2)"
            .into(),
        ratio: best(&q) / best(&v),
        qemu_img_s: q,
        vmdisk_s: v,
        wrong,
    })
}
