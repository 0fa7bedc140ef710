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
    /// `/etc/shadow` was missing (or empty) and is rebuilt from `/etc/passwd` (`--create`).
    pub rebuilt: bool,
    /// It was missing: it is created (0640, group `shadow` when the guest has one, else
    /// 0600 root).
    pub created: Option<(u16, u32)>,
}

/// `/etc/shadow` rebuilt from `/etc/passwd`: every account locked (`!*`: no password, and
/// `passwd --unlock` cannot turn it into an empty one).
pub fn shadow_from_passwd(passwd_file: &[u8], today: u64) -> Vec<u8> {
    let mut out = String::new();
    for line in String::from_utf8_lossy(passwd_file).lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() == 7 && !f[0].is_empty() {
            out.push_str(&format!("{}:!*:{today}:0:99999:7:::\n", f[0]));
        }
    }
    out.into_bytes()
}

fn group_id(group_file: &[u8], name: &str) -> Option<u32> {
    String::from_utf8_lossy(group_file).lines().find_map(|l| {
        let f: Vec<&str> = l.split(':').collect();
        (f.len() >= 3 && f[0] == name)
            .then(|| f[2].parse().ok())
            .flatten()
    })
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
    create: bool,
) -> Result<PasswdPlan, EditError> {
    let part = g.chosen.name.clone();
    let read = |p: &str| {
        read_optional(g.fs, p).map_err(|source| EditError::Ext4 {
            part: part.clone(),
            source,
        })
    };
    let existing = read("/etc/shadow")?;
    let passwd_file = read("/etc/passwd")?.unwrap_or_default();
    let empty = existing
        .as_ref()
        .is_none_or(|c| c.iter().all(|b| b.is_ascii_whitespace()));
    let mut created = None;
    let (current, rebuilt) = match existing {
        Some(c) if !(create && empty) => (c, false),
        None if !create => {
            return Err(EditError::Refused(
                "the guest has no /etc/shadow; pass --create to rebuild it from /etc/passwd \
                 (every other account locked)"
                    .into(),
            ))
        }
        had => {
            if passwd_file.is_empty() {
                return Err(EditError::Refused(
                    "--create: the guest has no /etc/passwd to rebuild /etc/shadow from".into(),
                ));
            }
            if had.is_none() {
                let group = read("/etc/group")?.unwrap_or_default();
                created = Some(match group_id(&group, "shadow") {
                    Some(gid) => (0o640, gid),
                    None => (0o600, 0),
                });
            }
            (shadow_from_passwd(&passwd_file, today), true)
        }
    };
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
        rebuilt,
        created,
    })
}

/// Change `user`'s line of `/etc/shadow` on `target` (see [`crate::edit::edit`]).
pub fn passwd(
    target: &EditTarget,
    user: &str,
    action: &PasswdAction,
) -> Result<EditReport<PasswdPlan>, EditError> {
    passwd_create(target, user, action, false)
}

/// [`passwd`]; with `create`, a missing or empty `/etc/shadow` is rebuilt from `/etc/passwd`
/// (every account locked) before `user`'s line is set.
pub fn passwd_create(
    target: &EditTarget,
    user: &str,
    action: &PasswdAction,
    create: bool,
) -> Result<EditReport<PasswdPlan>, EditError> {
    let today = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0))
        / 86400;
    edit(
        target,
        "passwd",
        |g| plan(g, user, action, today, create),
        |dev, p| {
            let err = |source| EditError::Apply {
                what: "writing /etc/shadow".into(),
                source,
            };
            match p.created {
                None => vmdisk_ext4::replace_file(dev.as_ref(), "/etc/shadow", &p.repair.shadow)
                    .map(|_| ())
                    .map_err(err),
                Some((mode, gid)) => {
                    let mut ed = vmdisk_ext4::Editor::open(dev.clone()).map_err(err)?;
                    ed.write_file(
                        "/etc/shadow",
                        &p.repair.shadow,
                        vmdisk_ext4::Attrs {
                            mode: Some(mode),
                            uid: Some(0),
                            gid: Some(gid),
                        },
                    )
                    .map_err(err)?;
                    ed.commit().map(|_| ()).map_err(err)
                }
            }
        },
    )
}
