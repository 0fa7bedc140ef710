//! `vmdisk passwd`: set, unlock or restore a user's password in the guest's /etc/shadow, safely.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use vmdisk_ext4::passwd;
use vmdisk_guest::{EditTarget, PasswdAction, Undo};

use crate::guest::Target;

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
    /// With -o: replace OVERLAY if it exists (by default an existing file is refused).
    #[arg(long, requires = "overlay")]
    pub force: bool,
    /// A missing or empty /etc/shadow (e.g. wiped by a repartition) is rebuilt from
    /// /etc/passwd with every account locked, then USER's line is set.
    #[arg(long)]
    pub create: bool,
    /// Check everything and say what would change; write nothing.
    #[arg(long)]
    pub dry_run: bool,
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

pub fn passwd(a: PasswdArgs, quiet: bool) -> Result<u8> {
    let _cancel = crate::signals::cancel_on_interrupt();
    let t = &a.target;
    // Work out the action first: nothing is opened before the input is good.
    let action = if a.password_stdin {
        if a.scheme == Scheme::Yescrypt {
            bail!(
                "yescrypt hashing is not implemented yet; use the default sha512 scheme or \
                 pass a ready-made hash with --hash (e.g. from `mkpasswd -m yescrypt`)"
            );
        }
        PasswdAction::SetHash(passwd::hash_sha512(read_password()?.as_bytes(), None)?)
    } else if let Some(h) = &a.hash {
        if !h.starts_with('$') || h.contains(':') || h.contains('\n') {
            bail!("--hash {h:?} is not a crypt(3) hash (expected $6$..., $y$..., no ':')");
        }
        PasswdAction::SetHash(h.clone())
    } else if a.unlock {
        PasswdAction::Unlock
    } else if a.restore_backup {
        PasswdAction::RestoreBackup
    } else {
        bail!("say what to do: --password-stdin, --hash, --unlock or --restore-backup");
    };
    let target = EditTarget {
        image: t.image.clone(),
        format: t.format.map(Into::into),
        partition: t.partition.clone(),
        undo: match (&a.overlay, a.in_place) {
            (Some(path), _) => Some(Undo::Overlay {
                path: path.clone(),
                replace: a.force,
            }),
            (None, true) => Some(Undo::InPlace),
            (None, false) => None,
        },
        dry_run: a.dry_run,
    };
    let report = vmdisk_guest::passwd_create(&target, &a.user, &action, a.create)?;

    if !quiet {
        if report.dry_run {
            eprintln!(
                "vmdisk: dry run: {}'s /etc/shadow line on {} would be set; nothing was written",
                a.user, report.partition
            );
        } else {
            eprintln!(
                "vmdisk: set {}'s /etc/shadow line on {} ({})",
                a.user, report.partition, report.how
            );
        }
        if report.plan.rebuilt {
            eprintln!(
                "note: /etc/shadow was {} and is rebuilt from /etc/passwd: every other account \
                 is locked (!*)",
                if report.plan.created.is_some() {
                    "missing"
                } else {
                    "empty"
                }
            );
        }
        for n in &report.plan.repair.notes {
            eprintln!("note: {n}");
        }
        if let Some(name) = &report.undo_snapshot {
            eprintln!(
                "undo with: {}",
                vmdisk_guest::edit::undo_hint(&t.image, name)
            );
        }
        if let Some(w) = &report.plan.nixos.warning {
            eprintln!("warning: {w}");
        }
    }
    Ok(0)
}
