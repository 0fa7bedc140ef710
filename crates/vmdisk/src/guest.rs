//! Guest filesystem commands: `ls`, `cat`, `cp-out` (read-only) and `passwd` (a safe edit).

use std::io::{Read, Write};
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use vmdisk_block::{BlockDevice, Slice};
use vmdisk_ext4::{passwd, Entry, Ext4, FileKind, FsState};
use vmdisk_image::{Format, Image, OpenOptions};

use crate::{part, FormatArg};

/// Where the filesystem is: the image and the partition.
#[derive(Debug, Args)]
pub struct Target {
    /// The disk image (raw or qcow2, with its backing chain).
    pub image: PathBuf,
    /// Partition: number, GPT name or filesystem label (default: the only Linux filesystem,
    /// else the one labelled nixos).
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
    /// Print JSON (one array of entries).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct CatArgs {
    #[command(flatten)]
    pub target: Target,
    /// File inside the guest filesystem.
    pub path: String,
}

#[derive(Debug, Args)]
pub struct CpOutArgs {
    #[command(flatten)]
    pub target: Target,
    /// File or directory inside the guest filesystem.
    pub path: String,
    /// Where to put it on the host.
    pub dest: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Scheme {
    /// sha512-crypt ($6$), understood by every glibc.
    Sha512,
    /// yescrypt ($y$): not implemented yet; pass a hash with --hash instead.
    Yescrypt,
}

#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("action").required(true)
    .args(["password_stdin", "hash", "unlock", "restore_backup"])))]
pub struct PasswdArgs {
    #[command(flatten)]
    pub target: Target,
    /// The account whose /etc/shadow line is set.
    pub user: String,
    /// Read the new password from standard input (first line).
    #[arg(long)]
    pub password_stdin: bool,
    /// Set this ready-made hash ($6$..., $y$...).
    #[arg(long, value_name = "HASH")]
    pub hash: Option<String>,
    /// Remove a leading ! or * that locks the account.
    #[arg(long)]
    pub unlock: bool,
    /// Take the user's line from /etc/shadow- (the backup the shadow tools keep).
    #[arg(long)]
    pub restore_backup: bool,
    /// Hash scheme for --password-stdin.
    #[arg(long, value_enum, default_value = "sha512")]
    pub scheme: Scheme,
    /// Write into the image itself: required for raw images; for qcow2 skips the undo snapshot.
    #[arg(long, conflicts_with = "overlay")]
    pub in_place: bool,
    /// Leave the image untouched and write the change into a new qcow2 overlay on top of it.
    #[arg(short = 'o', long = "overlay", value_name = "OVERLAY")]
    pub overlay: Option<PathBuf>,
}

fn open_image(t: &Target, read_only: bool) -> Result<Image> {
    Ok(vmdisk_image::open(
        &t.image,
        &OpenOptions {
            format: t.format.map(Into::into),
            read_only,
            force_share: t.force_share && read_only,
            no_backing: false,
        },
    )?)
}

fn fs_device(img: &Image, sel: Option<&str>) -> Result<(Arc<dyn BlockDevice>, part::Chosen)> {
    let whole = img.dev();
    let chosen = part::select(&whole, sel)?;
    let dev: Arc<dyn BlockDevice> = if chosen.off == 0 && chosen.len == whole.len() {
        whole
    } else {
        Arc::new(Slice::new(whole, chosen.off, chosen.len)?)
    };
    Ok((dev, chosen))
}

fn open_fs(t: &Target) -> Result<(Image, Ext4)> {
    let img = open_image(t, true)?;
    let (dev, chosen) = fs_device(&img, t.partition.as_deref())?;
    let fs = Ext4::open(dev).with_context(|| format!("reading ext4 on {}", chosen.name))?;
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
fn utc(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

fn fmt_time(secs: i64) -> String {
    let (y, mo, d, h, mi, _) = utc(secs);
    format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}")
}

pub fn ls(a: LsArgs) -> Result<u8> {
    let (_img, fs) = open_fs(&a.target)?;
    let st = fs.stat(&a.path)?;
    let entries = if a.recursive {
        fs.walk(&a.path)?
    } else if st.kind == FileKind::Dir {
        fs.read_dir(&a.path)?
    } else {
        vec![st]
    };
    let mut out = std::io::stdout().lock();
    if a.json {
        serde_json::to_writer_pretty(&mut out, &entries)?;
        writeln!(out)?;
        return Ok(0);
    }
    for e in &entries {
        let name = if a.recursive { &e.path } else { &e.name };
        if a.long {
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
    }
    Ok(0)
}

pub fn cat(a: CatArgs) -> Result<u8> {
    let (_img, fs) = open_fs(&a.target)?;
    let mut out = std::io::stdout().lock();
    fs.copy_file_to(&a.path, &mut out)?;
    out.flush()?;
    Ok(0)
}

pub fn cp_out(a: CpOutArgs, quiet: bool) -> Result<u8> {
    let (_img, fs) = open_fs(&a.target)?;
    let r = fs.copy_out(&a.path, &a.dest)?;
    if !quiet {
        eprintln!(
            "copied {} files, {} directories, {} symlinks ({} bytes) to {}",
            r.files,
            r.dirs,
            r.symlinks,
            r.bytes,
            a.dest.display()
        );
        if !r.skipped.is_empty() {
            eprintln!(
                "skipped {} device nodes, fifos or sockets: {}",
                r.skipped.len(),
                r.skipped.join(", ")
            );
        }
    }
    Ok(0)
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn read_optional(fs: &Ext4, path: &str) -> Result<Option<Vec<u8>>> {
    if fs.exists(path)? {
        Ok(Some(fs.read_file(path)?))
    } else {
        Ok(None)
    }
}

fn read_password() -> Result<String> {
    let mut s = String::new();
    std::io::stdin()
        .read_to_string(&mut s)
        .context("reading the password from standard input")?;
    let pw = s.lines().next().unwrap_or("").to_string();
    if pw.is_empty() {
        bail!("no password on standard input (pipe it in: `echo PASSWORD | vmdisk passwd ...`)");
    }
    Ok(pw)
}

/// Everything `passwd` decides before writing: the new shadow file and what to warn about.
struct ShadowPlan {
    repair: passwd::ShadowRepair,
    nixos: passwd::NixosStatus,
    part_name: String,
}

/// Read the guest and compute the new /etc/shadow; fails on anything that forbids the edit.
fn plan_shadow(img: &Image, a: &PasswdArgs, hash: &Option<String>) -> Result<ShadowPlan> {
    let (dev, chosen) = fs_device(img, a.target.partition.as_deref())?;
    let fs = Ext4::open(dev).with_context(|| format!("reading ext4 on {}", chosen.name))?;
    match fs.fs_info().state {
        FsState::Clean => {}
        FsState::NeedsRecovery => bail!("{}", vmdisk_ext4::Error::NeedsRecovery),
        other => bail!(
            "the filesystem is not clean ({other:?}); shut the VM down cleanly or run e2fsck \
             on the partition first; nothing was written"
        ),
    }
    if !fs.exists("/etc/shadow")? {
        bail!(
            "the guest has no /etc/shadow to edit (creating files is not supported yet); \
             nothing was written"
        );
    }
    let shadow = fs.read_file("/etc/shadow")?;
    let passwd_file = read_optional(&fs, "/etc/passwd")?.unwrap_or_default();
    let action = match (hash, a.unlock, a.restore_backup) {
        (Some(h), _, _) => passwd::Action::SetHash(h.clone()),
        (None, true, _) => passwd::Action::Unlock,
        (None, _, true) => passwd::Action::RestoreBackup(
            read_optional(&fs, "/etc/shadow-")?
                .context("--restore-backup: the guest has no /etc/shadow- to restore from")?,
        ),
        _ => bail!("say what to do: --password-stdin, --hash, --unlock or --restore-backup"),
    };
    let today = (now_secs() / 86400).max(0) as u64;
    let repair = passwd::repair_shadow_report(&shadow, &passwd_file, &a.user, action, today)?;
    Ok(ShadowPlan {
        repair,
        nixos: passwd::nixos_status(&fs),
        part_name: chosen.name,
    })
}

pub fn passwd(a: PasswdArgs, quiet: bool) -> Result<u8> {
    let t = &a.target;
    // Work out the action first: nothing is opened for writing before the input is good.
    let hash = if a.password_stdin {
        if a.scheme == Scheme::Yescrypt {
            bail!(
                "yescrypt hashing is not implemented yet; use the default sha512 scheme or \
                 pass a ready-made hash with --hash (e.g. from `mkpasswd -m yescrypt`)"
            );
        }
        Some(passwd::hash_sha512(read_password()?.as_bytes(), None)?)
    } else {
        a.hash.clone()
    };
    if let Some(h) = &hash {
        if !h.starts_with('$') || h.contains(':') || h.contains('\n') {
            bail!("--hash {h:?} is not a crypt(3) hash (expected $6$..., $y$..., no ':')");
        }
    }

    // A read-only dry run: a refused edit leaves no overlay, snapshot or byte behind.
    let probe = open_image(t, true)?;
    let is_qcow2 = probe.format() == Format::Qcow2;
    plan_shadow(&probe, &a, &hash)?;
    drop(probe);
    if a.overlay.is_none() && !is_qcow2 && !a.in_place {
        bail!(
            "{} is a raw image: vmdisk cannot keep an undo copy inside it. Pass -o \
             OVERLAY.qcow2 to leave it untouched, or --in-place to edit it directly",
            t.image.display()
        );
    }

    // Open for writing; the plan is recomputed under the write lock.
    let (img, how) = match &a.overlay {
        Some(ov) => {
            vmdisk_image::create_overlay(ov, &t.image, t.format.map(Into::into))
                .with_context(|| format!("creating the overlay {}", ov.display()))?;
            let img = vmdisk_image::open(
                ov,
                &OpenOptions {
                    format: Some(Format::Qcow2),
                    read_only: false,
                    force_share: false,
                    no_backing: false,
                },
            )?;
            (img, format!("into the new overlay {}", ov.display()))
        }
        None => (open_image(t, false)?, "in place".to_string()),
    };
    let plan = plan_shadow(&img, &a, &hash)?;

    // The undo point, taken only now that everything checked out.
    let mut undo = None;
    if a.overlay.is_none() && is_qcow2 && !a.in_place {
        let (y, mo, d, h, mi, s) = utc(now_secs());
        let name = format!("vmdisk-before-passwd-{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z");
        vmdisk_image::snapshot_create(&img, &name).context("taking the undo snapshot")?;
        undo = Some(name);
    }
    let (dev, _) = fs_device(&img, t.partition.as_deref())?;
    vmdisk_ext4::replace_file(dev.as_ref(), "/etc/shadow", &plan.repair.shadow)
        .context("writing /etc/shadow")?;
    dev.flush()?;
    drop(dev);
    img.close()?;

    if !quiet {
        eprintln!(
            "vmdisk: set {}'s /etc/shadow line on {} ({how})",
            a.user, plan.part_name
        );
        for n in &plan.repair.notes {
            eprintln!("note: {n}");
        }
        if let Some(name) = undo {
            eprintln!(
                "undo with: vmdisk snapshot apply {} {name}",
                t.image.display()
            );
        }
        if let Some(w) = plan.nixos.warning {
            eprintln!("warning: {w}");
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(1_795_000_000), (2026, 11, 18, 11, 6, 40));
    }
}
