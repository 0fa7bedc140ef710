//! `passwd` as a guest edit: set, unlock or restore a user's `/etc/shadow` line.
//!
//! The account logic (parsing and repairing the files, NixOS detection) is
//! `vmdisk_ext4::passwd`; this module is the transaction around it: the guest is read once,
//! under the write lock, then `/etc/shadow` is replaced (see [`crate::edit`]).

use vmdisk_ext4::passwd::{self as shadow, NixosStatus, ShadowRepair};
use vmdisk_ext4::Ext4;

use crate::edit::{edit, EditError, EditReport, EditTarget, Guest};

/// What to do to the user's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswdAction {
    /// Set this ready-made crypt(3) hash.
    SetHash(String),
    /// Drop a leading `!` or `*`.
    Unlock,
    /// Take the user's line from `/etc/shadow-`.
    RestoreBackup,
}

/// What `passwd` decided.
#[derive(Debug, Clone)]
pub struct PasswdPlan {
    pub repair: ShadowRepair,
    pub nixos: NixosStatus,
}

fn read_optional(fs: &Ext4, path: &str) -> Result<Option<Vec<u8>>, vmdisk_ext4::Error> {
    if fs.exists(path)? {
        Ok(Some(fs.read_file(path)?))
    } else {
        Ok(None)
    }
}

fn plan(
    g: Guest<'_>,
    user: &str,
    action: &PasswdAction,
    today: u64,
) -> Result<PasswdPlan, EditError> {
    let part = g.chosen.name.clone();
    let read = |p: &str| {
        read_optional(g.fs, p).map_err(|source| EditError::Ext4 {
            part: part.clone(),
            source,
        })
    };
    let Some(current) = read("/etc/shadow")? else {
        return Err(EditError::Refused(
            "the guest has no /etc/shadow to edit (creating files is not supported yet)".into(),
        ));
    };
    let passwd_file = read("/etc/passwd")?.unwrap_or_default();
    let action = match action {
        PasswdAction::SetHash(h) => shadow::Action::SetHash(h.clone()),
        PasswdAction::Unlock => shadow::Action::Unlock,
        PasswdAction::RestoreBackup => {
            shadow::Action::RestoreBackup(read("/etc/shadow-")?.ok_or_else(|| {
                EditError::Refused(
                    "--restore-backup: the guest has no /etc/shadow- to restore from".into(),
                )
            })?)
        }
    };
    let repair = shadow::repair_shadow_report(&current, &passwd_file, user, action, today)
        .map_err(|e| EditError::Refused(e.to_string()))?;
    Ok(PasswdPlan {
        repair,
        nixos: shadow::nixos_status(g.fs),
    })
}

/// Change `user`'s line of `/etc/shadow` on `target` (see [`crate::edit::edit`]).
pub fn passwd(
    target: &EditTarget,
    user: &str,
    action: &PasswdAction,
) -> Result<EditReport<PasswdPlan>, EditError> {
    let today = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
        / 86400;
    edit(
        target,
        "passwd",
        |g| plan(g, user, action, today),
        |dev, p| {
            vmdisk_ext4::replace_file(dev, "/etc/shadow", &p.repair.shadow)
                .map(|_| ())
                .map_err(|source| EditError::Apply {
                    what: "/etc/shadow".into(),
                    source,
                })
        },
    )
}
