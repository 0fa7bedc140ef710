//! `vmdisk passwd`: set, unlock or restore a user's password in the guest's /etc/shadow, safely.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use vmdisk_ext4::{passwd, Ext4, FsState};
use vmdisk_image::{Format, Image, OpenOptions};

use crate::guest::{fs_device, open_image, utc, Target};

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
