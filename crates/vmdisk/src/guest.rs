//! Read-only guest filesystem commands: `ls`, `cat`, `cp-out` (ext2/3/4 and vfat, through
//! `vmdisk_guest::GuestFs`), and the `-P` target they share with the editing commands.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use clap::Args;
use vmdisk_block::BlockDevice;
use vmdisk_ext4::{Entry, FileKind};
use vmdisk_guest::GuestFs;
use vmdisk_image::{Image, OpenOptions};

use crate::FormatArg;

/// Where the filesystem is: the image and the partition.
#[derive(Debug, Args)]
pub struct Target {
    /// The disk image (raw or qcow2, with its backing chain).
    pub image: PathBuf,
    /// Partition: number, GPT name, filesystem label or disko partition key (`ESP` matches
    /// `disk-*-ESP`) (default: the only Linux filesystem, else the one labelled nixos).
    #[arg(short = 'P', long = "partition", value_name = "PART", global = true)]
    pub partition: Option<String>,
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT", global = true)]
    pub format: Option<FormatArg>,
    /// Read the image even if a running VM holds it (no locks; what you read may be stale).
    #[arg(short = 'U', long = "force-share", global = true)]
    pub force_share: bool,
}

#[derive(Debug, Args)]
pub struct LsArgs {
    #[command(flatten)]
    pub target: Target,
    /// Path inside the guest filesystem.
    #[arg(default_value = "/")]
    pub path: String,
    /// Long listing: mode, owner, size, mtime, symlink target.
    #[arg(short = 'l')]
    pub long: bool,
    /// Recurse into directories.
    #[arg(short = 'R')]
    pub recursive: bool,
    /// Print JSON (one array of entries; unreadable ones carry an `error`).
    #[arg(long)]
    pub json: bool,
    /// External journal device of an ext3/4 filesystem that needs recovery from it.
    #[arg(long = "external-journal", value_name = "FILE")]
    pub external_journal: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CatArgs {
    #[command(flatten)]
    pub target: Target,
    /// File inside the guest filesystem.
    pub path: String,
    /// External journal device of an ext3/4 filesystem that needs recovery from it.
    #[arg(long = "external-journal", value_name = "FILE")]
    pub external_journal: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CpOutArgs {
    #[command(flatten)]
    pub target: Target,
    /// File or directory inside the guest filesystem.
    pub path: String,
    /// Where to put it on the host (an existing directory: DEST/basename).
    pub dest: PathBuf,
    /// As cp -a: keep owner and group too (when running as root), besides mode, times and
    /// symbolic links, which are always kept.
    #[arg(short = 'a', long = "archive")]
    pub archive: bool,
    /// External journal device of an ext3/4 filesystem that needs recovery from it.
    #[arg(long = "external-journal", value_name = "FILE")]
    pub external_journal: Option<PathBuf>,
}

pub(crate) fn open_image(t: &Target, read_only: bool) -> Result<Image> {
    Ok(vmdisk_image::open(
        &t.image,
        &OpenOptions {
            format: t.format.map(Into::into),
            read_only,
            force_share: t.force_share && read_only,
            no_backing: false,
            ..Default::default()
        },
    )?)
}

pub(crate) fn fs_device(
    img: &Image,
    sel: Option<&str>,
) -> Result<(Arc<dyn BlockDevice>, vmdisk_guest::Chosen)> {
    let whole = img.dev();
    let chosen = vmdisk_guest::select(&whole, sel)?;
    let dev = vmdisk_guest::device_for(whole, &chosen)?;
    Ok((dev, chosen))
}

fn open_fs(t: &Target, journal: Option<&std::path::Path>) -> Result<(Image, GuestFs)> {
    let img = open_image(t, true)?;
    let (dev, chosen) = fs_device(&img, t.partition.as_deref())?;
    let jdev = match journal {
        Some(p) => Some(
            vmdisk_image::open(
                p,
                &OpenOptions {
                    format: None,
                    read_only: true,
                    force_share: t.force_share,
                    ..OpenOptions::default()
                },
            )?
            .dev(),
        ),
        None => None,
    };
    let fs = GuestFs::open(dev, jdev).with_context(|| format!("reading {}", chosen.name))?;
    Ok((img, fs))
}

fn mode_string(e: &Entry) -> String {
    let t = match e.kind {
        FileKind::Dir => 'd',
        FileKind::Symlink => 'l',
        FileKind::BlockDev => 'b',
        FileKind::CharDev => 'c',
        FileKind::Fifo => 'p',
        FileKind::Socket => 's',
        FileKind::File => '-',
        FileKind::Unknown => '?',
    };
    let mut s = String::from(t);
    for shift in [6u32, 3, 0] {
        let bits = (e.mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(if bits & 1 != 0 { 'x' } else { '-' });
    }
    s
}

/// `YYYY-MM-DD HH:MM` (UTC) from seconds since the epoch.
fn fmt_time(secs: i64) -> String {
    let (y, mo, d, h, mi, _) = vmdisk_guest::edit::utc(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}")
}

fn print_entry(out: &mut dyn Write, e: &Entry, name: &str, long: bool) -> Result<()> {
    if long {
        let link = e
            .symlink_target
            .as_ref()
            .map(|t| format!(" -> {t}"))
            .unwrap_or_default();
        writeln!(
            out,
            "{} {:>5} {:>5} {:>10} {} {name}{link}",
            mode_string(e),
            e.uid,
            e.gid,
            e.size,
            fmt_time(e.mtime)
        )?;
    } else {
        writeln!(out, "{name}")?;
    }
    Ok(())
}

pub fn ls(a: LsArgs) -> Result<u8> {
    let (_img, fs) = open_fs(&a.target, a.external_journal.as_deref())?;
    let st = fs.stat(&a.path)?;
    let entries = if a.recursive && st.kind == FileKind::Dir {
        fs.walk_lossy(&a.path)?
    } else if st.kind == FileKind::Dir {
        fs.read_dir(&a.path)?
    } else {
        vec![st]
    };
    let mut out = std::io::stdout().lock();
    let bad = entries.iter().filter(|e| e.error.is_some()).count();
    // Unreadable entries: on stderr, and the exit status says so at the end (like `ls`/`cp -r`).
    for e in entries.iter().filter(|e| e.error.is_some()) {
        eprintln!(
            "vmdisk ls: {}: {}",
            e.path,
            e.error.as_deref().unwrap_or_default()
        );
    }
    if a.json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
    } else {
        for e in &entries {
            let name = if a.recursive { &e.path } else { &e.name };
            if e.error.is_some() && e.mode == 0 {
                continue;
            }
            print_entry(&mut out, e, name, a.long)?;
        }
    }
    out.flush()?;
    if bad > 0 {
        eprintln!("vmdisk ls: {bad} entries could not be read");
        return Ok(1);
    }
    Ok(0)
}

pub fn cat(a: CatArgs) -> Result<u8> {
    let (_img, fs) = open_fs(&a.target, a.external_journal.as_deref())?;
    let f = fs.open_file(&a.path)?;
    let mut out = std::io::stdout().lock();
    let mut buf = vec![0u8; (1usize << 20).min(f.size() as usize)];
    let mut off = 0u64;
    while off < f.size() {
        let n = (f.size() - off).min(buf.len() as u64) as usize;
        fs.read_at(&f, off, &mut buf[..n])?;
        out.write_all(&buf[..n])?;
        off += n as u64;
    }
    out.flush()?;
    Ok(0)
}

pub fn cp_out(a: CpOutArgs, quiet: bool) -> Result<u8> {
    let cancel = crate::signals::cancel_on_interrupt();
    let (_img, fs) = open_fs(&a.target, a.external_journal.as_deref())?;
    let opts = vmdisk_guest::CopyOutOptions {
        cancel,
        owner: a.archive,
    };
    let r = vmdisk_guest::copy_out(&fs, &a.path, &a.dest, &opts)?;
    for (p, e) in &r.errors {
        eprintln!("vmdisk cp-out: {p}: {e}");
    }
    if !quiet {
        eprintln!(
            "copied {} files, {} directories, {} symlinks ({} bytes, {} written) to {}",
            r.files,
            r.dirs,
            r.symlinks,
            r.bytes,
            r.data_bytes,
            r.dest.display()
        );
        if !r.skipped.is_empty() {
            eprintln!(
                "skipped {} device nodes, fifos or sockets: {}",
                r.skipped.len(),
                r.skipped.join(", ")
            );
        }
    }
    if !r.errors.is_empty() {
        eprintln!(
            "vmdisk cp-out: {} entries could not be read; everything else was copied",
            r.errors.len()
        );
        return Ok(1);
    }
    Ok(0)
}
