//! `benches layout`: building an ESP + swap + root qcow2 from a disko layout, vmdisk vs a script
//! (and, in [`crate::disko_vm`], two of disko's examples that need a kernel, vs disko's `_create`).
//!
//! vmdisk runs `vmdisk create -f qcow2 --layout L --copy-in /=TREE --seed 1 OUT`. The script
//! is what a rootless user does today with the usual tools: `truncate` a raw file, `sgdisk`
//! the same three partitions (types and GPT names as disko's), read the offsets back with
//! `sfdisk --json`, make each filesystem in its own file (`mkfs.vfat -F 32 -C`, `mkswap`,
//! `mkfs.ext4 -L nixos -d TREE`), `dd conv=notrunc,sparse` them into place, and
//! `qemu-img convert -O qcow2`. Each script step is timed; `sgdisk` sleeps about a second per
//! table write on a plain file, which users pay, so it counts, but the report also gives the
//! script time without it. A second, reference-only script does what an expert would:
//! `mkfs.vfat --offset` and `mkfs.ext4 -E offset=` straight into the raw disk, so no dd reads
//! the root filesystem's holes (the target is against the first script).
//!
//! The copy-in tree (a few thousand files of mixed sizes, random content) is generated once from
//! a seed, with fixed timestamps set once (mke2fs copies atime, mtime and ctime in, so they
//! must not move between runs; see [`set_times`]), so vmdisk's output is reproducible.
//! Both outputs are checked with `qemu-img check`, `sgdisk -v`, `e2fsck -fn` on the root
//! partition and `fsck.vfat -n` on the ESP.

use std::ffi::CString;
use std::fs;
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::disko_vm::DiskoCase;
use crate::table::{sfdisk_parts, table_differences, Part};
use crate::util::{remove_if_exists, run, sha256, sync};

/// script time / vmdisk time must reach this.
const SPEED_TARGET: f64 = 2.0;
/// Bump when the generated tree changes, so a stale cache is not reused.
const TREE_VERSION: u32 = 2;
/// Every mtime in the tree (2023-11-14T22:13:20Z).
const TREE_MTIME: i64 = 1_700_000_000;
/// Every atime in the tree (2036-07-18T13:20:00Z): later than now, mtime and ctime, so relatime
/// never updates it when the tree is read, and within signed 32 bits for any inode size.
const TREE_ATIME: i64 = 2_100_000_000;
/// Share of files (per mille) drawn from the large-size range.
const LARGE_PER_MILLE: u64 = 25;
const SMALL_FILE: (u64, u64) = (64, 128 << 10);
const LARGE_FILE: (u64, u64) = (1 << 20, 4 << 20);
/// About this many files per package directory.
const FILES_PER_PACKAGE: u64 = 24;
/// One symlink per this many files.
const FILES_PER_SYMLINK: u64 = 50;
/// The seed of vmdisk's GUIDs and UUIDs.
const LAYOUT_SEED: &str = "1";

const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// The disk being built.
#[derive(Clone, Copy, Serialize)]
pub struct Shape {
    pub disk: u64,
    pub esp: u64,
    pub swap: u64,
    /// Bytes of copy-in content for the root filesystem.
    pub tree_bytes: u64,
}

impl Shape {
    pub fn full() -> Self {
        Shape {
            disk: 8 * GIB,
            esp: 512 * MIB,
            swap: GIB,
            tree_bytes: 200 * MIB,
        }
    }

    pub fn quick() -> Self {
        Shape {
            disk: GIB,
            esp: 64 * MIB,
            swap: 64 * MIB,
            tree_bytes: 20 * MIB,
        }
    }

    /// The disko JSON: ESP (vfat), swap, root (ext4, `-L nixos`, the rest of the disk).
    fn disko_json(&self) -> serde_json::Value {
        serde_json::json!({ "disko": { "devices": { "disk": { "main": {
            "type": "disk",
            "device": "/dev/vda",
            "imageSize": format!("{}M", self.disk / MIB),
            "content": { "type": "gpt", "partitions": {
                "ESP": {
                    "type": "EF00",
                    "size": format!("{}M", self.esp / MIB),
                    "content": { "type": "filesystem", "format": "vfat", "mountpoint": "/boot" }
                },
                "swap": { "size": format!("{}M", self.swap / MIB), "content": { "type": "swap" } },
                "root": {
                    "size": "100%",
                    "content": {
                        "type": "filesystem",
                        "format": "ext4",
                        "mountpoint": "/",
                        "extraArgs": ["-L", "nixos"]
                    }
                }
            } }
        } } } } })
    }
}

// ---------------------------------------------------------------------------------------------
// The copy-in tree

/// What was generated (also the cache marker, `<tree>.json`, written last).
#[derive(Clone, Serialize, Deserialize, PartialEq)]
pub struct TreeStats {
    pub version: u32,
    pub seed: u64,
    pub target_bytes: u64,
    pub bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
}

/// splitmix64: a small seeded generator, the same everywhere.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0); the modulo bias is irrelevant here.
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }

    fn log_uniform(&mut self, (lo, hi): (u64, u64)) -> u64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        ((lo as f64) * (hi as f64 / lo as f64).powf(u)) as u64
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        for b in chunks.into_remainder() {
            *b = self.next_u64() as u8;
        }
    }
}

/// The cached tree for `(bytes, seed)` under `dir`, generated if needed.
fn ensure_tree(tree: &Path, bytes: u64, seed: u64) -> Result<TreeStats> {
    let marker = tree.with_extension("json");
    if tree.is_dir() {
        if let Ok(text) = fs::read_to_string(&marker) {
            if let Ok(stats) = serde_json::from_str::<TreeStats>(&text) {
                if stats.version == TREE_VERSION
                    && stats.seed == seed
                    && stats.target_bytes == bytes
                {
                    eprintln!("tree: cached {}", tree.display());
                    return Ok(stats);
                }
            }
        }
    }
    let _ = fs::remove_file(&marker);
    if tree.exists() {
        fs::remove_dir_all(tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    let t = Instant::now();
    eprintln!("tree: generating {} ...", tree.display());
    let stats = write_tree(tree, bytes, seed)?;
    eprintln!(
        "tree: {} files, {} dirs, {} symlinks, {:.1} MiB, {:.1} s",
        stats.files,
        stats.dirs,
        stats.symlinks,
        stats.bytes as f64 / MIB as f64,
        t.elapsed().as_secs_f64()
    );
    fs::write(&marker, serde_json::to_string_pretty(&stats)?)
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(stats)
}

/// A Nix-store-like tree: `store/<hash>-pkg-N/{bin,lib,share/doc}/f-NNNNN`, random content.
fn write_tree(tree: &Path, bytes: u64, seed: u64) -> Result<TreeStats> {
    let mut rng = Rng::new(seed);
    let mut stats = TreeStats {
        version: TREE_VERSION,
        seed,
        target_bytes: bytes,
        bytes: 0,
        files: 0,
        dirs: 0,
        symlinks: 0,
    };
    let store = tree.join("store");
    fs::create_dir_all(&store).with_context(|| format!("creating {}", store.display()))?;
    stats.dirs += 2;
    let mut buf = vec![0u8; LARGE_FILE.1 as usize];
    let mut package = PathBuf::new();
    let mut last_file: Option<PathBuf> = None;
    while stats.bytes < bytes {
        if stats.files.is_multiple_of(FILES_PER_PACKAGE) {
            package = store.join(format!(
                "{:016x}-pkg-{}",
                rng.next_u64(),
                stats.files / FILES_PER_PACKAGE
            ));
            for sub in ["bin", "lib", "share/doc"] {
                fs::create_dir_all(package.join(sub))?;
            }
            stats.dirs += 5;
        }
        let range = if rng.below(1000) < LARGE_PER_MILLE {
            LARGE_FILE
        } else {
            SMALL_FILE
        };
        let len = rng.log_uniform(range).min(bytes - stats.bytes).max(1) as usize;
        let sub = ["bin", "lib", "share/doc"][rng.below(3) as usize];
        let path = package.join(sub).join(format!("f-{:05}", stats.files));
        rng.fill(&mut buf[..len]);
        fs::write(&path, &buf[..len]).with_context(|| format!("writing {}", path.display()))?;
        stats.files += 1;
        stats.bytes += len as u64;
        if stats.files.is_multiple_of(FILES_PER_SYMLINK) {
            if let Some(target) = &last_file {
                let link = path.with_file_name(format!("link-{:05}", stats.files));
                std::os::unix::fs::symlink(target, &link)?;
                stats.symlinks += 1;
            }
        }
        last_file = Some(path);
    }
    set_times(tree)?;
    Ok(stats)
}

/// Set atime and mtime of everything under `root` (and `root`) to TREE_ATIME / TREE_MTIME,
/// children first. Done once, when the tree is made: each call moves ctime, which mke2fs also
/// copies in, and an atime in the past would move on the first read (relatime).
fn set_times(root: &Path) -> Result<()> {
    let meta = fs::symlink_metadata(root)?;
    if meta.is_dir() {
        for entry in fs::read_dir(root)? {
            set_times(&entry?.path())?;
        }
    }
    let c = CString::new(root.as_os_str().as_bytes())?;
    let t = |secs: i64| libc::timespec {
        tv_sec: secs as libc::time_t,
        tv_nsec: 0,
    };
    let times = [t(TREE_ATIME), t(TREE_MTIME)];
    // SAFETY: `c` is a NUL-terminated path and `times` points to two timespecs, as
    // utimensat requires; both outlive the call.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error())
            .with_context(|| format!("setting times of {}", root.display()));
    }
    Ok(())
}

/// Read every file once so both sides start with the tree in the page cache.
fn warm_tree(root: &Path) -> Result<()> {
    let mut buf = vec![0u8; 1 << 20];
    let meta = fs::symlink_metadata(root)?;
    if meta.is_dir() {
        for entry in fs::read_dir(root)? {
            warm_tree(&entry?.path())?;
        }
    } else if meta.is_file() {
        let mut f = fs::File::open(root)?;
        while f.read(&mut buf)? != 0 {}
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Running

/// Wall time of one step of the script.
#[derive(Clone, Serialize)]
pub struct StepTime {
    pub step: String,
    pub secs: f64,
}

/// One timed run of either side.
#[derive(Clone, Serialize)]
pub struct RunTime {
    pub secs: f64,
    /// User + system time of the child processes.
    pub cpu_s: f64,
    /// The script's steps (empty for vmdisk).
    pub steps: Vec<StepTime>,
}

impl RunTime {
    fn sgdisk_s(&self) -> f64 {
        let sg = self.steps.iter().filter(|s| s.step.starts_with("sgdisk"));
        sg.map(|s| s.secs).sum()
    }
}

/// CPU time (user + system) of all waited-for children of this process so far.
fn children_cpu() -> f64 {
    // SAFETY: rusage is plain old data; all-zero is a valid value.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `ru` is a live, writable rusage.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

struct Paths {
    layout: PathBuf,
    tree: PathBuf,
    vmdisk_out: PathBuf,
    /// The scripts' working directory (raw, per-filesystem files, out-VARIANT.qcow2).
    work: PathBuf,
}

fn time_vmdisk(vmdisk: &Path, p: &Paths) -> Result<RunTime> {
    remove_if_exists(&p.vmdisk_out)?;
    sync();
    let cpu = children_cpu();
    let t = Instant::now();
    run(Command::new(vmdisk)
        .args(["create", "-q", "-f", "qcow2", "--layout"])
        .arg(&p.layout)
        .arg("--copy-in")
        .arg(format!("/={}", p.tree.display()))
        .args(["--seed", LAYOUT_SEED])
        .arg(&p.vmdisk_out))?;
    Ok(RunTime {
        secs: t.elapsed().as_secs_f64(),
        cpu_s: children_cpu() - cpu,
        steps: Vec::new(),
    })
}

/// How the script puts the filesystems into the raw disk.
#[derive(Clone, Copy, PartialEq, Serialize)]
pub enum Variant {
    /// Each filesystem in its own file, then `dd conv=notrunc,sparse` into place (the usual
    /// recipe; dd reads every byte of the root file, holes included).
    Dd,
    /// `mkfs.vfat --offset` and `mkfs.ext4 -E offset=` straight into the raw disk (this
    /// util-linux's mkswap has no offset, so swap still goes through a file and dd): what a
    /// script written by an expert does. Reference only; the target is against `Dd`.
    Offset,
}

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Dd => "script (mkfs into files + dd)",
            Variant::Offset => "expert script (mkfs --offset into the raw)",
        }
    }

    fn recipe(self) -> &'static str {
        match self {
            Variant::Dd => {
                "truncate, sgdisk, sfdisk --json, mkfs.vfat -F 32 -C, truncate + mkswap, \
                 mkfs.ext4 -L nixos -d into files, dd conv=notrunc,sparse x3, qemu-img convert"
            }
            Variant::Offset => {
                "truncate, sgdisk, sfdisk --json, mkfs.vfat -F 32 --offset, truncate + mkswap + \
                 dd (this mkswap has no offset), mkfs.ext4 -L nixos -d -E offset=, qemu-img convert"
            }
        }
    }

    fn tag(self) -> &'static str {
        match self {
            Variant::Dd => "dd",
            Variant::Offset => "offset",
        }
    }
}

/// Timing the steps of one script run.
struct Steps(Vec<StepTime>);

impl Steps {
    fn run(&mut self, name: &str, cmd: &mut Command) -> Result<Vec<u8>> {
        let t = Instant::now();
        let out = run(cmd)?;
        self.0.push(StepTime {
            step: name.to_string(),
            secs: t.elapsed().as_secs_f64(),
        });
        Ok(out)
    }
}

fn dd_into(img: &Path, raw: &Path, off: u64) -> Command {
    let mut c = Command::new("dd");
    c.arg(format!("if={}", img.display()))
        .arg(format!("of={}", raw.display()))
        .args([
            "bs=1M",
            "oflag=seek_bytes",
            "conv=notrunc,sparse",
            "status=none",
        ])
        .arg(format!("seek={off}"));
    c
}

/// The script, step by step.
fn time_script(shape: &Shape, p: &Paths, variant: Variant) -> Result<RunTime> {
    let w = &p.work;
    let out = script_out(p, variant);
    let raw = w.join("disk.raw");
    let esp = w.join("esp.img");
    let swap = w.join("swap.img");
    let root = w.join("root.img");
    let scratch = [&raw, &esp, &swap, &root];
    for f in scratch.iter().chain([&&out]) {
        remove_if_exists(f)?;
    }
    sync();

    let mut steps = Steps(Vec::new());
    let cpu = children_cpu();
    let start = Instant::now();
    steps.run(
        "truncate",
        Command::new("truncate")
            .arg("-s")
            .arg(shape.disk.to_string())
            .arg(&raw),
    )?;
    let (esp_m, swap_m) = (shape.esp / MIB, shape.swap / MIB);
    steps.run(
        "sgdisk",
        Command::new("sgdisk")
            .arg(format!("-n1:0:+{esp_m}M"))
            .args(["-t1:EF00", "-c1:disk-main-ESP"])
            .arg(format!("-n2:0:+{swap_m}M"))
            .args(["-t2:8200", "-c2:disk-main-swap"])
            .args(["-n3:0:0", "-t3:8300", "-c3:disk-main-root"])
            .arg(&raw),
    )?;
    let t = Instant::now();
    let parts = sfdisk_parts(&raw)?;
    steps.0.push(StepTime {
        step: "sfdisk --json".into(),
        secs: t.elapsed().as_secs_f64(),
    });
    let [esp_p, swap_p, root_p] = parts.as_slice() else {
        bail!("sgdisk made {} partitions, expected 3", parts.len());
    };
    let kib = |part: &Part| (part.size * 512 / 1024).to_string();
    match variant {
        Variant::Dd => {
            steps.run(
                "mkfs.vfat -F 32 -C",
                Command::new("mkfs.vfat")
                    .args(["-F", "32", "-C"])
                    .arg(&esp)
                    .arg(kib(esp_p)),
            )?;
        }
        Variant::Offset => {
            steps.run(
                "mkfs.vfat -F 32 --offset",
                Command::new("mkfs.vfat")
                    .args(["-F", "32", "--offset"])
                    .arg(esp_p.start.to_string())
                    .arg(&raw)
                    .arg(kib(esp_p)),
            )?;
        }
    }
    steps.run(
        "truncate swap",
        Command::new("truncate")
            .arg("-s")
            .arg((swap_p.size * 512).to_string())
            .arg(&swap),
    )?;
    steps.run("mkswap", Command::new("mkswap").arg("-q").arg(&swap))?;
    match variant {
        Variant::Dd => {
            steps.run(
                "mkfs.ext4 -d",
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-L", "nixos", "-d"])
                    .arg(&p.tree)
                    .arg(&root)
                    .arg(format!("{}k", kib(root_p))),
            )?;
            steps.run("dd esp", &mut dd_into(&esp, &raw, esp_p.start * 512))?;
            steps.run("dd swap", &mut dd_into(&swap, &raw, swap_p.start * 512))?;
            steps.run("dd root", &mut dd_into(&root, &raw, root_p.start * 512))?;
        }
        Variant::Offset => {
            steps.run(
                "mkfs.ext4 -d -E offset=",
                Command::new("mkfs.ext4")
                    .args(["-q", "-F", "-L", "nixos", "-d"])
                    .arg(&p.tree)
                    .arg("-E")
                    .arg(format!("offset={}", root_p.start * 512))
                    .arg(&raw)
                    .arg(format!("{}k", kib(root_p))),
            )?;
            steps.run("dd swap", &mut dd_into(&swap, &raw, swap_p.start * 512))?;
        }
    }
    steps.run(
        "qemu-img convert -O qcow2",
        Command::new("qemu-img")
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&out),
    )?;
    let secs = start.elapsed().as_secs_f64();
    let cpu_s = children_cpu() - cpu;
    for f in scratch {
        remove_if_exists(f)?;
    }
    Ok(RunTime {
        secs,
        cpu_s,
        steps: steps.0,
    })
}

fn script_out(p: &Paths, variant: Variant) -> PathBuf {
    p.work.join(format!("out-{}.qcow2", variant.tag()))
}

// ---------------------------------------------------------------------------------------------
// Checking

/// What the checks found in one output.
#[derive(Clone, Serialize)]
pub struct Checked {
    pub qcow2_allocated_mib: f64,
    pub parts: Vec<Part>,
    /// e2fsck's summary line ("nixos: F/F files ..., B/B blocks").
    pub e2fsck_summary: String,
    pub errors: Vec<String>,
}

fn check(out: &Path, scratch: &Path) -> Result<Checked> {
    let mut errors = Vec::new();
    let allocated = fs::metadata(out)?.blocks() * 512;
    let status = |cmd: &mut Command| -> Result<(bool, String)> {
        let o = cmd
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {:?}", cmd.get_program()))?;
        let text = String::from_utf8_lossy(&o.stdout).into_owned()
            + String::from_utf8_lossy(&o.stderr).trim();
        Ok((o.status.success(), text))
    };
    let (ok, text) = status(
        Command::new("qemu-img")
            .args(["check", "-f", "qcow2"])
            .arg(out),
    )?;
    if !ok {
        errors.push(format!("qemu-img check: {}", text.trim()));
    }
    remove_if_exists(scratch)?;
    run(Command::new("qemu-img")
        .args(["convert", "-f", "qcow2", "-O", "raw"])
        .arg(out)
        .arg(scratch))?;
    let (ok, text) = status(Command::new("sgdisk").arg("-v").arg(scratch))?;
    if !ok || !text.contains("No problems found") {
        errors.push(format!("sgdisk -v: {}", text.trim()));
    }
    let parts = sfdisk_parts(scratch)?;
    let mut e2fsck_summary = String::new();
    if let Some(root) = parts.get(2) {
        let dev = format!("{}?offset={}", scratch.display(), root.start * 512);
        let (ok, text) = status(Command::new("e2fsck").args(["-f", "-n"]).arg(&dev))?;
        e2fsck_summary = text
            .lines()
            .find(|l| l.contains(" files ") && l.contains(" blocks"))
            .unwrap_or("")
            .trim()
            .to_string();
        if !ok {
            errors.push(format!("e2fsck -fn on the root partition: {}", text.trim()));
        }
    } else {
        errors.push(format!("{} partitions, expected 3", parts.len()));
    }
    if let Some(esp) = parts.first() {
        let esp_img = scratch.with_extension("esp");
        remove_if_exists(&esp_img)?;
        run(Command::new("dd")
            .arg(format!("if={}", scratch.display()))
            .arg(format!("of={}", esp_img.display()))
            .args([
                "bs=1M",
                "iflag=skip_bytes,count_bytes",
                "conv=sparse",
                "status=none",
            ])
            .arg(format!("skip={}", esp.start * 512))
            .arg(format!("count={}", esp.size * 512)))?;
        let (ok, text) = status(Command::new("fsck.vfat").arg("-n").arg(&esp_img))?;
        if !ok {
            errors.push(format!("fsck.vfat -n on the ESP: {}", text.trim()));
        }
        remove_if_exists(&esp_img)?;
    }
    remove_if_exists(scratch)?;
    Ok(Checked {
        qcow2_allocated_mib: allocated as f64 / MIB as f64,
        parts,
        e2fsck_summary,
        errors,
    })
}

// ---------------------------------------------------------------------------------------------
// Report

/// One side: vmdisk or a script variant.
#[derive(Serialize)]
pub struct Side {
    pub name: String,
    /// Scripts: the commands, in order.
    pub recipe: String,
    pub best_s: Option<f64>,
    pub median_s: Option<f64>,
    /// Least CPU time over the runs.
    pub cpu_s: Option<f64>,
    /// Scripts: best and median time without the sgdisk step.
    pub without_sgdisk_best_s: Option<f64>,
    pub without_sgdisk_median_s: Option<f64>,
    /// Scripts: median time of each step.
    pub steps_median_s: Vec<StepTime>,
    /// Scripts: this side's best / vmdisk's best, with and without sgdisk.
    pub speed_ratio: Option<f64>,
    pub speed_ratio_without_sgdisk: Option<f64>,
    pub runs: Vec<RunTime>,
    pub check: Option<Checked>,
    /// Scripts: differences from vmdisk's partition table (starts, sizes, types, names).
    pub table_differences: Vec<String>,
    pub error: Option<String>,
}

#[derive(Serialize)]
pub struct Report {
    pub shape: Shape,
    pub tree: TreeStats,
    pub qemu_img_version: String,
    pub vmdisk: String,
    pub load_average: String,
    pub runs: usize,
    pub vmdisk_side: Side,
    /// The script (the target is against it), then the expert script (reference).
    pub scripts: Vec<Side>,
    pub target: f64,
    pub target_met: bool,
    /// Every vmdisk run wrote the same bytes (same seed, layout and tree).
    pub vmdisk_reproducible: Option<bool>,
    /// disko's btrfs-subvolumes and luks-lvm examples, vmdisk vs disko's `_create` in a VM.
    pub disko_layouts: Vec<DiskoCase>,
    pub verdict: String,
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn least(v: impl Iterator<Item = f64>) -> Option<f64> {
    v.reduce(f64::min)
}

fn side(name: &str, recipe: &str, runs: Vec<RunTime>, error: Option<String>) -> Side {
    let secs: Vec<f64> = runs.iter().map(|r| r.secs).collect();
    let wo: Vec<f64> = runs.iter().map(|r| r.secs - r.sgdisk_s()).collect();
    let mut steps_median_s = Vec::new();
    if let Some(first) = runs.first() {
        for (k, st) in first.steps.iter().enumerate() {
            let times = runs.iter().filter_map(|r| r.steps.get(k)).map(|s| s.secs);
            steps_median_s.push(StepTime {
                step: st.step.clone(),
                secs: median(times.collect()).unwrap_or(f64::NAN),
            });
        }
    }
    let is_script = !steps_median_s.is_empty();
    Side {
        name: name.to_string(),
        recipe: recipe.to_string(),
        best_s: least(secs.iter().copied()),
        median_s: median(secs),
        cpu_s: least(runs.iter().map(|r| r.cpu_s)),
        without_sgdisk_best_s: least(wo.iter().copied()).filter(|_| is_script),
        without_sgdisk_median_s: median(wo).filter(|_| is_script),
        steps_median_s,
        speed_ratio: None,
        speed_ratio_without_sgdisk: None,
        runs,
        check: None,
        table_differences: Vec::new(),
        error,
    }
}

pub struct Options<'a> {
    pub vmdisk: &'a Path,
    pub dir: &'a Path,
    pub runs: usize,
    pub quick: bool,
    pub seed: u64,
    /// The disko corpus (the folder holding json/).
    pub corpus: &'a Path,
}

/// Who runs in one timed slot.
#[derive(Clone, Copy)]
enum Job {
    Vmdisk,
    Script(Variant),
}

const JOBS: [Job; 3] = [
    Job::Vmdisk,
    Job::Script(Variant::Dd),
    Job::Script(Variant::Offset),
];

pub fn bench(o: &Options) -> Result<Report> {
    if o.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let qemu_img_version = crate::run::qemu_img_version()?;
    let shape = if o.quick {
        Shape::quick()
    } else {
        Shape::full()
    };
    let tree_name = if o.quick {
        "layout-tree-quick"
    } else {
        "layout-tree"
    };
    let tree = o.dir.join(tree_name);
    let tree_stats = ensure_tree(&tree, shape.tree_bytes, o.seed)?;
    let work = o.dir.join("layout-script");
    fs::create_dir_all(&work)?;
    let p = Paths {
        layout: o.dir.join(format!("layout-{}M.json", shape.disk / MIB)),
        tree,
        vmdisk_out: o.dir.join("layout-vmdisk.qcow2"),
        work,
    };
    fs::write(
        &p.layout,
        serde_json::to_string_pretty(&shape.disko_json())?,
    )?;
    warm_tree(&p.tree)?;
    let load_average = load_average();

    // Runs and first error per job, in JOBS order.
    let mut runs: [Vec<RunTime>; 3] = Default::default();
    let mut errors: [Option<String>; 3] = Default::default();
    let mut hashes = Vec::new();
    for i in 0..o.runs {
        // Rotate who goes first.
        for k in 0..JOBS.len() {
            let j = (i + k) % JOBS.len();
            if errors[j].is_some() {
                continue;
            }
            let r = match JOBS[j] {
                Job::Vmdisk => time_vmdisk(o.vmdisk, &p).and_then(|r| {
                    hashes.push(sha256(&p.vmdisk_out)?);
                    Ok(r)
                }),
                Job::Script(v) => time_script(&shape, &p, v),
            };
            match r {
                Ok(r) => runs[j].push(r),
                Err(e) => errors[j] = Some(format!("{e:#}")),
            }
        }
        let show = |j: usize| match runs[j].get(i) {
            Some(r) => format!("{:.2} s (cpu {:.2} s)", r.secs, r.cpu_s),
            None => "failed".into(),
        };
        let sg = runs[1].get(i).map_or(0.0, RunTime::sgdisk_s);
        eprintln!(
            "   run {}: script {} (sgdisk {sg:.2} s) / expert script {} / vmdisk {}",
            i + 1,
            show(1),
            show(2),
            show(0)
        );
    }
    let [v_runs, dd_runs, off_runs] = runs;
    let [v_err, dd_err, off_err] = errors;
    if let Some(e) = &v_err {
        eprintln!("!!!! vmdisk FAILED: {e}");
    }

    let scratch = p.work.join("check.raw");
    let mut vmdisk_side = side(
        "vmdisk create -f qcow2 --layout --copy-in",
        "",
        v_runs,
        v_err,
    );
    if vmdisk_side.error.is_none() {
        vmdisk_side.check = Some(check(&p.vmdisk_out, &scratch)?);
    }
    let mut scripts = Vec::new();
    for (variant, runs, err) in [
        (Variant::Dd, dd_runs, dd_err),
        (Variant::Offset, off_runs, off_err),
    ] {
        if let Some(e) = &err {
            eprintln!("!!!! {} FAILED: {e}", variant.name());
        }
        let mut s = side(variant.name(), variant.recipe(), runs, err);
        if s.error.is_none() {
            let c = check(&script_out(&p, variant), &scratch)?;
            if let Some(v) = &vmdisk_side.check {
                s.table_differences = table_differences(&v.parts, &c.parts);
            }
            s.check = Some(c);
            if let (Some(v), Some(b), Some(wo)) =
                (vmdisk_side.best_s, s.best_s, s.without_sgdisk_best_s)
            {
                s.speed_ratio = Some(b / v);
                s.speed_ratio_without_sgdisk = Some(wo / v);
            }
        }
        remove_if_exists(&script_out(&p, variant))?;
        scripts.push(s);
    }
    remove_if_exists(&p.vmdisk_out)?;

    let vmdisk_reproducible = (hashes.len() > 1).then(|| hashes.iter().all(|h| *h == hashes[0]));
    let main = &scripts[0];
    let target_met = main.speed_ratio.is_some_and(|r| r >= SPEED_TARGET);
    let bad_output = vmdisk_side
        .check
        .as_ref()
        .is_some_and(|c| !c.errors.is_empty());
    let verdict = if vmdisk_side.error.is_some() {
        "FAIL: vmdisk error".to_string()
    } else if bad_output {
        "FAIL: WRONG OUTPUT".to_string()
    } else if main.error.is_some() {
        "n/a: the script failed".to_string()
    } else if target_met {
        "PASS".to_string()
    } else {
        "MISS: speed".to_string()
    };
    eprintln!("   disko's own examples that need a kernel, vmdisk vs disko's _create in a VM:");
    let disko_layouts = crate::disko_vm::cases(o.vmdisk, o.corpus, o.dir, o.runs)?;
    let verdict = match disko_layouts.iter().find(|c| c.failed()) {
        Some(c) if !verdict.starts_with("FAIL") => format!("FAIL: {} (disko example)", c.example),
        _ => verdict,
    };
    Ok(Report {
        disko_layouts,
        shape,
        tree: tree_stats,
        qemu_img_version,
        vmdisk: o.vmdisk.display().to_string(),
        load_average,
        runs: o.runs,
        vmdisk_side,
        scripts,
        target: SPEED_TARGET,
        target_met,
        vmdisk_reproducible,
        verdict,
    })
}

fn load_average() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

impl Report {
    /// Problems that make the exit status non-zero: vmdisk failed or wrote a bad image.
    pub fn failed(&self) -> bool {
        self.verdict.starts_with("FAIL")
    }

    pub fn markdown(&self) -> String {
        use std::fmt::Write;
        let mut md = String::new();
        let sh = &self.shape;
        let t = &self.tree;
        let _ = writeln!(
            md,
            "## vmdisk create --layout vs truncate + sgdisk + mkfs + dd + qemu-img convert\n"
        );
        let _ = writeln!(
            md,
            "Disk: {} MiB qcow2, GPT with ESP {} MiB (vfat), swap {} MiB, root ext4 `-L nixos` \
             (rest). Root content: {} files, {} symlinks, {} dirs, {:.1} MiB (random data, seed \
             {}). {}; vmdisk `{}`. Times: best of {} runs (median), sides rotating. Load \
             average at start: {} on {} CPUs.\n",
            sh.disk / MIB,
            sh.esp / MIB,
            sh.swap / MIB,
            t.files,
            t.symlinks,
            t.dirs,
            t.bytes as f64 / MIB as f64,
            t.seed,
            self.qemu_img_version,
            self.vmdisk,
            self.runs,
            self.load_average,
            std::thread::available_parallelism().map_or(1, |n| n.get()),
        );
        let f2 = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let pair = |b: Option<f64>, m: Option<f64>| match (b, m) {
            (Some(b), Some(m)) => format!("{b:.2} ({m:.2})"),
            _ => "failed".into(),
        };
        let ratio = |r: Option<f64>| r.map_or("-".into(), |r| format!("{r:.2}x"));
        let size = |s: &Side| match &s.check {
            Some(c) => format!("{:.1}", c.qcow2_allocated_mib),
            None => "-".into(),
        };
        md.push_str(
            "| job | time s best (median) | without sgdisk s | CPU s | qcow2 MiB \
             | ratio / vmdisk | ratio without sgdisk | verdict |\n\
             |---|--:|--:|--:|--:|--:|--:|---|\n",
        );
        for (i, s) in self.scripts.iter().enumerate() {
            let r = ratio(s.speed_ratio);
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} | {} | {} |",
                s.name,
                pair(s.best_s, s.median_s),
                pair(s.without_sgdisk_best_s, s.without_sgdisk_median_s),
                f2(s.cpu_s),
                size(s),
                if i == 0 { format!("**{r}**") } else { r },
                ratio(s.speed_ratio_without_sgdisk),
                if i == 0 { &self.verdict } else { "(reference)" },
            );
        }
        let v = &self.vmdisk_side;
        let _ = writeln!(
            md,
            "| {} | {} | | {} | {} | | | |",
            v.name,
            pair(v.best_s, v.median_s),
            f2(v.cpu_s),
            size(v),
        );
        let _ = writeln!(
            md,
            "\nTarget: script / vmdisk (best times) >= {:.1}x: **{}**. CPU s = least user+system \
             time of the child processes over the runs. Every tool syncs as it does by default (mke2fs fsyncs its output, vmdisk fdatasyncs between qcow2 metadata steps), nothing is added. sgdisk sleeps about \
             1 s after writing the table (it asks the kernel to re-read partitions, even on a \
             plain file): users pay it, so it counts, but the ratio without it is shown too.\n",
            self.target,
            if self.target_met { "met" } else { "not met" }
        );
        for s in &self.scripts {
            if s.steps_median_s.is_empty() {
                continue;
            }
            let steps: Vec<String> = s
                .steps_median_s
                .iter()
                .map(|st| format!("{} {:.3}", st.step, st.secs))
                .collect();
            let _ = writeln!(
                md,
                "- {}: {}. Steps (median s): {}",
                s.name,
                s.recipe,
                steps.join(", ")
            );
        }
        for s in std::iter::once(v).chain(&self.scripts) {
            if let Some(e) = &s.error {
                let _ = writeln!(md, "- **{} failed:** {e}", s.name);
            }
            if let Some(c) = &s.check {
                let verdict = if c.errors.is_empty() {
                    "qemu-img check, sgdisk -v, e2fsck -fn (root), fsck.vfat -n (ESP) clean"
                } else {
                    "**WRONG OUTPUT**"
                };
                let _ = writeln!(
                    md,
                    "- {}: {verdict}; e2fsck: `{}`",
                    s.name, c.e2fsck_summary
                );
                for e in &c.errors {
                    let _ = writeln!(md, "  - {e}");
                }
            }
            if !s.table_differences.is_empty() {
                let _ = writeln!(
                    md,
                    "  - partition table vs vmdisk's (sgdisk's last partition ends at the last \
                     usable sector, disko's is 1 MiB aligned): {}",
                    s.table_differences.join("; ")
                );
            }
        }
        if let Some(r) = self.vmdisk_reproducible {
            let _ = writeln!(
                md,
                "- vmdisk output identical in every run (sha256): {}",
                if r { "yes" } else { "**no**" }
            );
        }
        md.push_str(&crate::disko_vm::markdown(&self.disko_layouts));
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rng_is_seeded() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..100 {
            assert_eq!(a.next_u64(), b.next_u64());
            let n = a.log_uniform(SMALL_FILE);
            assert!((SMALL_FILE.0..=SMALL_FILE.1).contains(&n));
            b.log_uniform(SMALL_FILE);
        }
    }

    #[test]
    fn layout_json_has_the_shape() {
        let j = Shape::full().disko_json();
        let parts = &j["disko"]["devices"]["disk"]["main"]["content"]["partitions"];
        assert_eq!(j["disko"]["devices"]["disk"]["main"]["imageSize"], "8192M");
        assert_eq!(parts["ESP"]["size"], "512M");
        assert_eq!(parts["swap"]["size"], "1024M");
        assert_eq!(parts["root"]["size"], "100%");
        assert_eq!(parts["root"]["content"]["extraArgs"][1], "nixos");
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0]), Some(2.5));
        assert_eq!(median(Vec::new()), None);
    }
}
