//! Local accounts: who a user is (uid, primary and supplementary groups, home), and running a
//! command as that user.
//!
//! OpenSSH finds `~/.ssh` through the password database (getpwuid), not `$HOME`, and the kernel
//! decides whether a key file is readable from the real uid and *all* groups of the process. So
//! "ssh as USER" means: the user's uid, primary gid and full supplementary group list
//! (initgroups' answer), which [`Account::run_as`] sets in the child before exec.

use std::ffi::{CStr, CString};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::Command;

/// Largest buffer offered to getpwnam_r/getpwuid_r (a password entry is a few hundred bytes;
/// NSS backends with huge gecos fields stay well below this).
const MAX_PW_BUF: usize = 1 << 20;
/// Most supplementary groups we accept for one user (Linux's NGROUPS_MAX).
const MAX_GROUPS: usize = 65536;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("no local user named {name:?} (getent passwd {name} finds nothing)")]
    NoSuchUser { name: String },
    #[error("no local user with uid {uid}")]
    NoSuchUid { uid: u32 },
    #[error("looking up the groups of {name}")]
    ListingGroups { name: String },
    #[error("user name {name:?} contains a NUL byte")]
    BadName { name: String },
    #[error("looking up user {what}")]
    Lookup {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

/// A local user as the password and group databases describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    /// Primary group.
    pub gid: u32,
    /// Every group the user is in (primary included), as initgroups would set them.
    pub groups: Vec<u32>,
    pub home: PathBuf,
    pub shell: PathBuf,
}

enum Key<'a> {
    Name(&'a CStr),
    Uid(u32),
}

/// name, uid, gid, home, shell of one password entry.
type PwEntry = (String, u32, u32, PathBuf, PathBuf);

fn getpw(key: Key<'_>) -> Result<Option<PwEntry>, std::io::Error> {
    let mut size = 16 * 1024;
    loop {
        let mut buf = vec![0u8; size];
        // SAFETY: an all-zero passwd (null pointers, zero ids) is a valid value of this plain C
        // struct; getpw*_r only writes into it.
        let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call: `pw` and `result` are locals, `buf` has
        // `buf.len()` writable bytes, the name is NUL-terminated.
        let rc = unsafe {
            match key {
                Key::Name(n) => libc::getpwnam_r(
                    n.as_ptr(),
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                ),
                Key::Uid(u) => libc::getpwuid_r(
                    u as libc::uid_t,
                    &mut pw,
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    &mut result,
                ),
            }
        };
        if rc == libc::ERANGE && size < MAX_PW_BUF {
            size *= 4;
            continue;
        }
        if rc != 0 {
            return Err(std::io::Error::from_raw_os_error(rc));
        }
        if result.is_null() {
            return Ok(None);
        }
        let text = |p: *const libc::c_char| {
            if p.is_null() {
                String::new()
            } else {
                // SAFETY: getpw*_r succeeded, so the non-null string fields point at
                // NUL-terminated strings inside `buf`, which is still alive here.
                unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
            }
        };
        return Ok(Some((
            text(pw.pw_name),
            pw.pw_uid as u32,
            pw.pw_gid as u32,
            PathBuf::from(text(pw.pw_dir)),
            PathBuf::from(text(pw.pw_shell)),
        )));
    }
}

fn group_list(name: &CStr, gid: u32) -> Option<Vec<u32>> {
    let mut n: usize = 64;
    loop {
        let mut groups = vec![0 as libc::gid_t; n];
        let mut count: libc::c_int = n as libc::c_int;
        // SAFETY: `groups` has room for `count` entries, `name` is NUL-terminated.
        #[cfg(not(target_os = "macos"))]
        let rc = unsafe {
            libc::getgrouplist(
                name.as_ptr(),
                gid as libc::gid_t,
                groups.as_mut_ptr(),
                &mut count,
            )
        };
        // SAFETY: as above; macOS declares the group arrays as c_int (same size as gid_t).
        #[cfg(target_os = "macos")]
        let rc = unsafe {
            libc::getgrouplist(
                name.as_ptr(),
                gid as libc::c_int,
                groups.as_mut_ptr().cast(),
                &mut count,
            )
        };
        if rc >= 0 {
            let count = (count.max(0) as usize).min(groups.len());
            let mut v: Vec<u32> = groups[..count].to_vec();
            v.sort_unstable();
            v.dedup();
            return Some(v);
        }
        // Too small: Linux says how many it needs, macOS does not; grow either way.
        let want = (count.max(0) as usize).max(n * 2);
        if n >= MAX_GROUPS {
            return None;
        }
        n = want.min(MAX_GROUPS);
    }
}

impl Account {
    /// The user called `name`.
    pub fn by_name(name: &str) -> Result<Account, AccountError> {
        let c = CString::new(name).map_err(|_| AccountError::BadName { name: name.into() })?;
        let Some((pw_name, uid, gid, home, shell)) =
            getpw(Key::Name(&c)).map_err(|source| AccountError::Lookup {
                what: name.into(),
                source,
            })?
        else {
            return Err(AccountError::NoSuchUser { name: name.into() });
        };
        Self::finish(pw_name, uid, gid, home, shell)
    }

    /// The user with `uid`.
    pub fn by_uid(uid: u32) -> Result<Account, AccountError> {
        let Some((pw_name, uid, gid, home, shell)) =
            getpw(Key::Uid(uid)).map_err(|source| AccountError::Lookup {
                what: format!("uid {uid}"),
                source,
            })?
        else {
            return Err(AccountError::NoSuchUid { uid });
        };
        Self::finish(pw_name, uid, gid, home, shell)
    }

    /// The user this process runs as (its real uid).
    pub fn current() -> Result<Account, AccountError> {
        Self::by_uid(current_uid())
    }

    fn finish(
        name: String,
        uid: u32,
        gid: u32,
        home: PathBuf,
        shell: PathBuf,
    ) -> Result<Account, AccountError> {
        let c =
            CString::new(name.clone()).map_err(|_| AccountError::BadName { name: name.clone() })?;
        let mut groups = group_list(&c, gid)
            .ok_or_else(|| AccountError::ListingGroups { name: name.clone() })?;
        if !groups.contains(&gid) {
            groups.push(gid);
            groups.sort_unstable();
        }
        Ok(Account {
            name,
            uid,
            gid,
            groups,
            home,
            shell,
        })
    }

    pub fn is_root(&self) -> bool {
        self.uid == 0
    }

    /// Whether this process can run commands as this account: it is us, or we are root.
    pub fn can_run_as(&self) -> bool {
        current_uid() == self.uid || current_uid() == 0
    }

    /// Make `cmd` run as this account: its uid, primary gid and supplementary groups (set in
    /// the child just before exec), and `HOME`, `USER`, `LOGNAME` from the password database.
    /// A no-op for the identity (uid, groups) when the account is the current user. Only root
    /// can switch to another user; for anyone else the child fails to start (EPERM).
    pub fn run_as(&self, cmd: &mut Command) {
        cmd.env("HOME", &self.home)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name);
        if current_uid() == self.uid {
            return;
        }
        let groups: Vec<libc::gid_t> = self.groups.iter().map(|&g| g as libc::gid_t).collect();
        let (uid, gid) = (self.uid as libc::uid_t, self.gid as libc::gid_t);
        // SAFETY: the closure runs in the forked child before exec and only makes three
        // async-signal-safe system calls on data allocated before the fork (`groups` is moved
        // in; nothing is allocated or locked in the child). Order matters: groups and gid must
        // change while we are still root, uid last.
        unsafe {
            cmd.pre_exec(move || {
                if libc::setgroups(groups.len() as _, groups.as_ptr()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setgid(gid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setuid(uid) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}

/// The real uid of this process.
pub fn current_uid() -> u32 {
    // SAFETY: getuid has no preconditions and cannot fail.
    unsafe { libc::getuid() as u32 }
}

/// The effective uid of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() as u32 }
}

/// The name of group `gid`, if the group database knows it.
pub fn group_name(gid: u32) -> Option<String> {
    let mut size = 16 * 1024;
    loop {
        let mut buf = vec![0u8; size];
        // SAFETY: an all-zero group (null pointers) is a valid value of this plain C struct.
        let mut gr: libc::group = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::group = std::ptr::null_mut();
        // SAFETY: every pointer is valid for the call; `buf` has `buf.len()` writable bytes.
        let rc = unsafe {
            libc::getgrgid_r(
                gid as libc::gid_t,
                &mut gr,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && size < MAX_PW_BUF {
            size *= 4;
            continue;
        }
        if rc != 0 || result.is_null() || gr.gr_name.is_null() {
            return None;
        }
        // SAFETY: getgrgid_r succeeded; gr_name points at a NUL-terminated string in `buf`.
        return Some(
            unsafe { CStr::from_ptr(gr.gr_name) }
                .to_string_lossy()
                .into_owned(),
        );
    }
}

/// The name of user `uid`, if the password database knows it.
pub fn user_name(uid: u32) -> Option<String> {
    getpw(Key::Uid(uid)).ok().flatten().map(|t| t.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_user_is_found_by_uid_and_by_name() {
        let me = Account::current().unwrap();
        assert_eq!(me.uid, current_uid());
        assert!(me.groups.contains(&me.gid));
        let again = Account::by_name(&me.name).unwrap();
        assert_eq!(again, me);
        assert!(me.can_run_as());
    }

    #[test]
    fn unknown_users_are_named_in_the_error() {
        let e = Account::by_name("vmdisk-no-such-user-x").unwrap_err();
        assert!(e.to_string().contains("vmdisk-no-such-user-x"), "{e}");
        assert!(matches!(
            Account::by_name("a\0b"),
            Err(AccountError::BadName { .. })
        ));
    }

    #[test]
    fn run_as_self_sets_the_environment_only() {
        let me = Account::current().unwrap();
        let mut c = Command::new("sh");
        c.args(["-c", "echo $USER $(id -u)"]);
        me.run_as(&mut c);
        let out = crate::run_bounded(&mut c, None, std::time::Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout_text().trim(), format!("{} {}", me.name, me.uid));
    }
}
