//! Account recovery logic: set, unlock or restore a user's entry in `/etc/shadow`.
//!
//! Pure functions over the bytes of `/etc/shadow`, `/etc/shadow-` and `/etc/passwd`; the caller
//! reads them (with [`crate::Ext4`]) and writes the result back (with [`crate::replace_file`]).
//! Broken files are the normal case here: a truncated last line, garbage bytes, a missing line
//! for the user (rebuilt from `/etc/passwd`), a line with the wrong number of fields. Only the
//! user's line changes; every other line is kept byte for byte (an unterminated last line gets
//! its newline).
//!
//! NixOS ([`nixos_status`]): with `users.mutableUsers = false` the activation script rewrites
//! `/etc/shadow` from the configuration at every boot, so an edit here does not last.

use crate::Ext4;

/// Longest hash string we accept (yescrypt and sha512-crypt are far shorter).
const MAX_HASH_LEN: usize = 512;
/// Largest JSON / activation script read while detecting NixOS settings.
const MAX_NIXOS_FILE: u64 = 16 << 20;
/// Most /nix/store entries scanned for users-groups.json.
const MAX_STORE_ENTRIES: usize = 1_000_000;

/// What went wrong while repairing the account files.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("invalid user name {0:?}")]
    BadUserName(String),
    #[error("user {0:?} has no line in /etc/shadow and none in /etc/passwd to rebuild it from")]
    UserNotInPasswd(String),
    #[error("the hash is not usable in /etc/shadow: {0}")]
    BadHash(&'static str),
    #[error("user {0:?} has no line in /etc/shadow to unlock; set a password instead")]
    NothingToUnlock(String),
    #[error("the /etc/shadow line of user {0:?} is damaged; set a password instead of unlocking")]
    DamagedLine(String),
    #[error("the backup /etc/shadow- has no usable line for user {user:?}: {why}")]
    BadBackup { user: String, why: &'static str },
    #[error("invalid salt (up to 16 characters of [./0-9A-Za-z])")]
    BadSalt,
    #[error("reading random bytes for the salt")]
    Random(#[source] std::io::Error),
}

/// What to do to the user's line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Set this hash (already computed: `$6$...`, `$y$...`), resetting the last-change day.
    SetHash(String),
    /// Drop a leading `!` / `*` (lock markers) from the existing hash.
    Unlock,
    /// Take the user's line from this copy of `/etc/shadow-`, when sane.
    RestoreBackup(Vec<u8>),
}

/// The repaired file plus what was noticed on the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShadowRepair {
    pub shadow: Vec<u8>,
    /// Human notes: damaged lines kept, line rebuilt, newline added, ...
    pub notes: Vec<String>,
}

fn valid_user(u: &str) -> bool {
    !u.is_empty()
        && u.len() <= 256
        && !u.starts_with('-')
        && u.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b'$'))
}

/// A hash field we are willing to write: printable ASCII, no ':' or spaces.
fn check_hash(h: &str) -> Result<(), ShadowError> {
    if h.len() > MAX_HASH_LEN {
        return Err(ShadowError::BadHash("too long"));
    }
    if h.bytes().any(|b| !b.is_ascii_graphic() || b == b':') {
        return Err(ShadowError::BadHash(
            "it contains ':', whitespace or non-printable bytes",
        ));
    }
    Ok(())
}

/// Is `line` a well-formed shadow entry (9 fields, numeric ageing fields)?
fn sane_line(line: &[u8]) -> Result<(), &'static str> {
    let Ok(s) = std::str::from_utf8(line) else {
        return Err("not UTF-8");
    };
    let f: Vec<&str> = s.split(':').collect();
    if f.len() != 9 {
        return Err("wrong number of fields");
    }
    if !valid_user(f[0]) {
        return Err("bad user name");
    }
    if check_hash(f[1]).is_err() {
        return Err("bad hash field");
    }
    if f[2..8]
        .iter()
        .any(|x| !x.bytes().all(|b| b.is_ascii_digit() || b == b'-'))
    {
        return Err("non-numeric ageing field");
    }
    Ok(())
}

fn today_days() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() / 86400)
        .unwrap_or(0)
}

/// Split into lines; returns (lines, last line had no newline).
fn lines(b: &[u8]) -> (Vec<&[u8]>, bool) {
    if b.is_empty() {
        return (Vec::new(), false);
    }
    let mut v: Vec<&[u8]> = b.split(|&c| c == b'\n').collect();
    let unterminated = !b.ends_with(b"\n");
    if !unterminated {
        v.pop();
    }
    (v, unterminated)
}

fn user_in_passwd(passwd: &[u8], user: &str) -> bool {
    let prefix = format!("{user}:");
    lines(passwd)
        .0
        .iter()
        .any(|l| l.starts_with(prefix.as_bytes()) && l.iter().filter(|&&c| c == b':').count() == 6)
}

/// Repair `/etc/shadow` for `user` (see the module docs); today's date for the last change.
pub fn repair_shadow(
    shadow: &[u8],
    passwd: &[u8],
    user: &str,
    action: Action,
) -> Result<Vec<u8>, ShadowError> {
    Ok(repair_shadow_report(shadow, passwd, user, action, today_days())?.shadow)
}

/// [`repair_shadow`] with the day number (days since 1970) and the notes.
pub fn repair_shadow_report(
    shadow: &[u8],
    passwd: &[u8],
    user: &str,
    action: Action,
    today: u64,
) -> Result<ShadowRepair, ShadowError> {
    if !valid_user(user) {
        return Err(ShadowError::BadUserName(user.to_string()));
    }
    let prefix = format!("{user}:");
    let (ls, unterminated) = lines(shadow);
    let mut notes = Vec::new();
    for (i, l) in ls.iter().enumerate() {
        if !l.starts_with(prefix.as_bytes()) {
            if let Err(why) = sane_line(l) {
                notes.push(format!(
                    "line {} is not a valid entry ({why}); kept as it was",
                    i + 1
                ));
            }
        }
    }
    if unterminated {
        notes.push("the last line had no newline (truncated file?); added one".into());
    }
    let idx = ls.iter().position(|l| l.starts_with(prefix.as_bytes()));
    if let Some(i) = idx {
        if ls[i + 1..].iter().any(|l| l.starts_with(prefix.as_bytes())) {
            notes.push(format!(
                "more than one line for {user}; only the first (line {}) is used and changed",
                i + 1
            ));
        }
    }
    let rebuilt = |hash: &str| format!("{user}:{hash}:{today}:0:99999:7:::").into_bytes();
    let new_line: Vec<u8> = match &action {
        Action::SetHash(h) => {
            check_hash(h)?;
            match idx {
                Some(i) if sane_line(ls[i]).is_ok() => {
                    let s = String::from_utf8_lossy(ls[i]);
                    let mut f: Vec<String> = s.split(':').map(str::to_string).collect();
                    f[1] = h.clone();
                    f[2] = today.to_string();
                    f.join(":").into_bytes()
                }
                Some(i) => {
                    notes.push(format!("line {} for {user} was damaged; rebuilt it", i + 1));
                    rebuilt(h)
                }
                None => {
                    if !user_in_passwd(passwd, user) {
                        return Err(ShadowError::UserNotInPasswd(user.to_string()));
                    }
                    notes.push(format!(
                        "no line for {user}; added one (user found in /etc/passwd)"
                    ));
                    rebuilt(h)
                }
            }
        }
        Action::Unlock => {
            let i = idx.ok_or_else(|| ShadowError::NothingToUnlock(user.to_string()))?;
            let s = std::str::from_utf8(ls[i])
                .map_err(|_| ShadowError::DamagedLine(user.to_string()))?;
            let mut f: Vec<String> = s.split(':').map(str::to_string).collect();
            if f.len() < 2 {
                return Err(ShadowError::DamagedLine(user.to_string()));
            }
            let unlocked = f[1].trim_start_matches(['!', '*']).to_string();
            if unlocked.is_empty() || check_hash(&unlocked).is_err() {
                return Err(ShadowError::DamagedLine(user.to_string()));
            }
            if unlocked == f[1] {
                notes.push(format!("{user} was not locked"));
            }
            if f.len() == 9 && sane_line(ls[i]).is_ok() {
                f[1] = unlocked;
                f.join(":").into_bytes()
            } else {
                notes.push(format!("line {} for {user} was damaged; rebuilt it", i + 1));
                rebuilt(&unlocked)
            }
        }
        Action::RestoreBackup(backup) => {
            let bad = |why| ShadowError::BadBackup {
                user: user.to_string(),
                why,
            };
            let (bl, _) = lines(backup);
            let line = bl
                .iter()
                .find(|l| l.starts_with(prefix.as_bytes()))
                .ok_or_else(|| bad("no line for the user"))?;
            sane_line(line).map_err(bad)?;
            line.to_vec()
        }
    };
    let mut out = Vec::with_capacity(shadow.len() + new_line.len() + 1);
    for (i, l) in ls.iter().enumerate() {
        if Some(i) == idx {
            out.extend_from_slice(&new_line);
        } else {
            out.extend_from_slice(l);
        }
        out.push(b'\n');
    }
    if idx.is_none() {
        out.extend_from_slice(&new_line);
        out.push(b'\n');
    }
    Ok(ShadowRepair { shadow: out, notes })
}

const CRYPT_ALPHABET: &[u8; 64] =
    b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Byte order of the sha512-crypt output encoding (from the SHA-crypt specification).
const SHA512_ORDER: [usize; 64] = [
    42, 21, 0, 1, 43, 22, 23, 2, 44, 45, 24, 3, 4, 46, 25, 26, 5, 47, 48, 27, 6, 7, 49, 28, 29, 8,
    50, 51, 30, 9, 10, 52, 31, 32, 11, 53, 54, 33, 12, 13, 55, 34, 35, 14, 56, 57, 36, 15, 16, 58,
    37, 38, 17, 59, 60, 39, 18, 19, 61, 40, 41, 20, 62, 63,
];

/// sha512-crypt (`$6$SALT$...`, 5000 rounds) of `password`; a random 16-character salt
/// from /dev/urandom when `salt` is `None`.
pub fn hash_sha512(password: &[u8], salt: Option<&str>) -> Result<String, ShadowError> {
    let salt = match salt {
        Some(s) => {
            if s.is_empty() || s.len() > 16 || !s.bytes().all(|b| CRYPT_ALPHABET.contains(&b)) {
                return Err(ShadowError::BadSalt);
            }
            s.to_string()
        }
        None => {
            use std::io::Read;
            let mut r = [0u8; 16];
            std::fs::File::open("/dev/urandom")
                .and_then(|mut f| f.read_exact(&mut r))
                .map_err(ShadowError::Random)?;
            r.iter()
                .map(|b| char::from(CRYPT_ALPHABET[usize::from(b & 63)]))
                .collect()
        }
    };
    let raw = sha_crypt::sha512_crypt(password, salt.as_bytes(), sha_crypt::Params::RECOMMENDED);
    let t: Vec<u8> = SHA512_ORDER.iter().map(|&i| raw[i]).collect();
    let mut enc = String::with_capacity(86);
    for chunk in t.chunks(3) {
        let mut w = 0u32;
        for (k, &b) in chunk.iter().enumerate() {
            w |= u32::from(b) << (8 * k);
        }
        for _ in 0..chunk.len() + 1 {
            enc.push(char::from(CRYPT_ALPHABET[(w & 63) as usize]));
            w >>= 6;
        }
    }
    Ok(format!("$6${salt}${enc}"))
}

/// What the image says about NixOS user management.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct NixosStatus {
    /// `/etc/NIXOS` exists.
    pub is_nixos: bool,
    /// `mutableUsers` from the system's users-groups.json, when found.
    pub mutable_users: Option<bool>,
    /// Set when an edit of /etc/shadow will not survive the next boot.
    pub warning: Option<String>,
}

/// The warning for `users.mutableUsers = false`.
pub const NIXOS_IMMUTABLE_WARNING: &str = "this is NixOS with users.mutableUsers = false: the \
activation script rewrites /etc/shadow from the configuration at every boot, so this change \
lasts only until then. To keep a password, set users.users.<name>.hashedPassword (or \
hashedPasswordFile) in the configuration and rebuild, or set users.mutableUsers = true.";

/// `mutableUsers` from a users-groups.json document (tolerant, no full JSON parse).
pub fn mutable_users_from_json(json: &[u8]) -> Option<bool> {
    let key = b"\"mutableUsers\"";
    let pos = json.windows(key.len()).position(|w| w == key)?;
    let rest = &json[pos + key.len()..];
    let rest: Vec<u8> = rest
        .iter()
        .copied()
        .skip_while(|b| b.is_ascii_whitespace())
        .collect();
    let rest = rest.strip_prefix(b":")?;
    let rest: Vec<u8> = rest
        .iter()
        .copied()
        .skip_while(|b| b.is_ascii_whitespace())
        .collect();
    if rest.starts_with(b"false") {
        Some(false)
    } else if rest.starts_with(b"true") {
        Some(true)
    } else {
        None
    }
}

fn read_small(fs: &Ext4, path: &str) -> Option<Vec<u8>> {
    // `metadata` follows symlinks (absolute ones resolve inside the image).
    let md = fs.metadata(path).ok()?;
    if md.size > MAX_NIXOS_FILE {
        return None;
    }
    fs.read_file(path).ok()
}

/// Find the store path of users-groups.json referenced from `script`.
fn users_groups_path(script: &[u8]) -> Option<String> {
    let suffix = b"-users-groups.json";
    let end = script.windows(suffix.len()).position(|w| w == suffix)? + suffix.len();
    let start = script[..end]
        .windows(11)
        .rposition(|w| w == b"/nix/store/")?;
    String::from_utf8(script[start..end].to_vec()).ok()
}

/// Detect NixOS and whether `/etc/shadow` edits survive a boot.
pub fn nixos_status(fs: &Ext4) -> NixosStatus {
    let is_nixos = fs.exists("/etc/NIXOS").unwrap_or(false);
    if !is_nixos {
        return NixosStatus {
            is_nixos,
            mutable_users: None,
            warning: None,
        };
    }
    let mut mutable_users = None;
    // The current system's activation script names its users-groups.json.
    if let Some(script) = read_small(fs, "/nix/var/nix/profiles/system/activate") {
        if let Some(p) = users_groups_path(&script) {
            mutable_users = read_small(fs, &p).and_then(|j| mutable_users_from_json(&j));
        }
    }
    // Otherwise any users-groups.json in the store saying false is reason enough to warn.
    if mutable_users.is_none() {
        if let Ok(entries) = fs.read_dir("/nix/store") {
            for e in entries.iter().take(MAX_STORE_ENTRIES) {
                if e.name.ends_with("-users-groups.json") {
                    if let Some(m) =
                        read_small(fs, &e.path).and_then(|j| mutable_users_from_json(&j))
                    {
                        mutable_users = Some(m);
                        if !m {
                            break;
                        }
                    }
                }
            }
        }
    }
    NixosStatus {
        is_nixos,
        mutable_users,
        warning: (mutable_users == Some(false)).then(|| NIXOS_IMMUTABLE_WARNING.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &[u8] = b"root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1::/:/sbin/nologin\n";

    fn set(shadow: &[u8]) -> ShadowRepair {
        repair_shadow_report(
            shadow,
            PASSWD,
            "root",
            Action::SetHash("$6$s$h".into()),
            20000,
        )
        .expect("repair")
    }

    #[test]
    fn sets_hash_keeps_others() {
        let r = set(b"root:!:1:0:99999:7:::\ndaemon:*:1:0:99999:7:::\n");
        assert_eq!(
            r.shadow,
            b"root:$6$s$h:20000:0:99999:7:::\ndaemon:*:1:0:99999:7:::\n"
        );
    }

    #[test]
    fn truncated_root_line_is_rebuilt() {
        let r = set(b"daemon:*:1:0:99999:7:::\nroot:$6$ab");
        assert_eq!(
            r.shadow,
            b"daemon:*:1:0:99999:7:::\nroot:$6$s$h:20000:0:99999:7:::\n"
        );
    }

    #[test]
    fn missing_and_empty() {
        assert_eq!(set(b"").shadow, b"root:$6$s$h:20000:0:99999:7:::\n");
        let r = set(b"daemon:*:1:0:99999:7:::\n\x00\xff garbage\n");
        assert_eq!(
            r.shadow,
            b"daemon:*:1:0:99999:7:::\n\x00\xff garbage\nroot:$6$s$h:20000:0:99999:7:::\n"
        );
        let e = repair_shadow(b"", b"", "root", Action::SetHash("x".into()));
        assert!(matches!(e, Err(ShadowError::UserNotInPasswd(_))));
    }

    #[test]
    fn unlock_and_restore() {
        let sh = b"root:!$6$a$b:1:0:99999:7:::\n";
        let r = repair_shadow(sh, PASSWD, "root", Action::Unlock).expect("unlock");
        assert_eq!(r, b"root:$6$a$b:1:0:99999:7:::\n");
        let r = repair_shadow(
            b"root:broken\n",
            PASSWD,
            "root",
            Action::RestoreBackup(b"x:1\nroot:$6$q$w:5:0:99999:7:::\n".to_vec()),
        )
        .expect("restore");
        assert_eq!(r, b"root:$6$q$w:5:0:99999:7:::\n");
        assert!(repair_shadow(
            b"",
            PASSWD,
            "root",
            Action::RestoreBackup(b"root:x\n".to_vec())
        )
        .is_err());
        assert!(repair_shadow(b"root:!:1\n", PASSWD, "root", Action::Unlock).is_err());
    }

    #[test]
    fn rejects_bad_hash() {
        for h in ["a:b", "a b", "a\nb"] {
            assert!(repair_shadow(b"", PASSWD, "root", Action::SetHash(h.into())).is_err());
        }
    }

    #[test]
    fn json_mutable_users() {
        assert_eq!(
            mutable_users_from_json(br#"{"groups":[],"mutableUsers":false}"#),
            Some(false)
        );
        assert_eq!(
            mutable_users_from_json(br#"{ "mutableUsers" : true }"#),
            Some(true)
        );
        assert_eq!(mutable_users_from_json(b"{}"), None);
        assert_eq!(
            users_groups_path(b"x /nix/store/abc-users-groups.json y").as_deref(),
            Some("/nix/store/abc-users-groups.json")
        );
    }
}
