//! Offline guest edits as one transaction: `write`, `upload`, `mkdir`, `chmod`, `chown`,
//! `ln -s`, `rm`, `ssh-inject` and `edit --script` (any number of them at once).
//!
//! ```text
//!   ops (parsed and validated) ─▶ edit(): plan = run every op on a staged ext4 Editor over the
//!   guest as it is (journal replayed in memory when it needs recovery) ─ any error: nothing
//!   written ─▶ apply = replay the journal onto the device, run the same ops, commit once
//! ```
//!
//! Owners are names from the guest's `/etc/passwd` and `/etc/group` (or numbers), resolved
//! against the guest as the edit has it so far.

use vmdisk_ext4::{Attrs, Editor};

use crate::edit::{edit, EditError, EditReport, EditTarget};

/// Longest edit script we read (1 MiB of operations).
pub const MAX_SCRIPT_BYTES: usize = 1 << 20;
/// Most operations in one script.
pub const MAX_SCRIPT_OPS: usize = 100_000;
/// Largest file `write`/`upload` puts into a guest (held in memory).
pub const MAX_CONTENT_BYTES: u64 = vmdisk_ext4::write::MAX_WRITE_BYTES;

/// `USER:GROUP`, `USER`, `:GROUP`, names or numbers.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Owner {
    pub user: Option<String>,
    pub group: Option<String>,
}

impl Owner {
    pub fn parse(s: &str) -> Result<Owner, String> {
        let (u, g) = match s.split_once(':') {
            Some((u, g)) => (u, Some(g)),
            None => (s, None),
        };
        let f = |x: &str| (!x.is_empty()).then(|| x.to_string());
        let o = Owner {
            user: f(u),
            group: g.and_then(f),
        };
        if o.user.is_none() && o.group.is_none() {
            return Err(format!("owner {s:?}: give USER, USER:GROUP or :GROUP"));
        }
        Ok(o)
    }
}

/// Parse a mode: octal digits (`644`, `0755`, `4755`).
pub fn parse_mode(s: &str) -> Result<u16, String> {
    let v =
        u16::from_str_radix(s, 8).map_err(|_| format!("mode {s:?} is not octal (e.g. 0644)"))?;
    if v > 0o7777 {
        return Err(format!("mode {s:?} is larger than 07777"));
    }
    Ok(v)
}

/// One operation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Op {
    Write {
        path: String,
        #[serde(skip)]
        content: Vec<u8>,
        mode: Option<u16>,
        owner: Option<Owner>,
    },
    Mkdir {
        path: String,
        parents: bool,
        mode: Option<u16>,
        owner: Option<Owner>,
    },
    Chmod {
        mode: u16,
        paths: Vec<String>,
        recursive: bool,
    },
    Chown {
        owner: Owner,
        paths: Vec<String>,
        recursive: bool,
    },
    Symlink {
        target: String,
        path: String,
    },
    Rm {
        paths: Vec<String>,
        recursive: bool,
    },
    SshInject {
        user: String,
        #[serde(skip)]
        key: String,
    },
}

/// What the ops did (for `--json` and messages).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OpsPlan {
    /// One line per change, e.g. "created /etc/x (inode 14, 12 bytes)".
    pub changes: Vec<String>,
    /// The journal needed recovery and was replayed first.
    pub journal_replayed: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub commit: Option<vmdisk_ext4::CommitReport>,
}

fn e(path: &str) -> impl Fn(vmdisk_ext4::Error) -> EditError + '_ {
    move |source| EditError::Apply {
        what: format!("editing {path}"),
        source,
    }
}

fn lookup_id(ed: &Editor, file: &str, name: &str) -> Result<u32, EditError> {
    if let Ok(n) = name.parse::<u32>() {
        return Ok(n);
    }
    let text = match ed.read_file(file) {
        Ok(t) => t,
        Err(vmdisk_ext4::Error::NotFound { .. }) => Vec::new(),
        Err(err) => return Err(e(file)(err)),
    };
    for line in String::from_utf8_lossy(&text).lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() >= 3 && f[0] == name {
            if let Ok(n) = f[2].parse::<u32>() {
                return Ok(n);
            }
        }
    }
    Err(EditError::Refused(format!(
        "no {} {name:?} in the guest's {file} (use a number instead)",
        if file == "/etc/passwd" {
            "user"
        } else {
            "group"
        }
    )))
}

/// (uid, gid) for an owner; a user without a group takes the user's primary group.
fn resolve_owner(ed: &Editor, o: &Owner) -> Result<(Option<u32>, Option<u32>), EditError> {
    let uid = o
        .user
        .as_deref()
        .map(|u| lookup_id(ed, "/etc/passwd", u))
        .transpose()?;
    let gid = o
        .group
        .as_deref()
        .map(|g| lookup_id(ed, "/etc/group", g))
        .transpose()?;
    Ok((uid, gid))
}

/// The guest's passwd line for `user`: (uid, gid, home).
fn passwd_entry(ed: &Editor, user: &str) -> Result<(u32, u32, String), EditError> {
    let text = ed.read_file("/etc/passwd").map_err(e("/etc/passwd"))?;
    for line in String::from_utf8_lossy(&text).lines() {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() == 7 && f[0] == user {
            let (Ok(u), Ok(g)) = (f[2].parse(), f[3].parse()) else {
                break;
            };
            return Ok((u, g, f[5].to_string()));
        }
    }
    Err(EditError::Refused(format!(
        "no user {user:?} in the guest's /etc/passwd"
    )))
}

/// Run `ops` on `ed` (staged; nothing is written until the caller commits).
pub fn run_ops(ed: &mut Editor, ops: &[Op]) -> Result<Vec<String>, EditError> {
    let mut out = Vec::new();
    for op in ops {
        match op {
            Op::Write {
                path,
                content,
                mode,
                owner,
            } => {
                let (uid, gid) = match owner {
                    Some(o) => resolve_owner(ed, o)?,
                    None => (None, None),
                };
                let existed = ed.lstat(path).map_err(e(path))?.is_some();
                let ino = ed
                    .write_file(
                        path,
                        content,
                        Attrs {
                            mode: *mode,
                            uid,
                            gid,
                        },
                    )
                    .map_err(e(path))?;
                out.push(format!(
                    "{} {path} (inode {ino}, {} bytes)",
                    if existed { "replaced" } else { "created" },
                    content.len()
                ));
            }
            Op::Mkdir {
                path,
                parents,
                mode,
                owner,
            } => {
                let (uid, gid) = match owner {
                    Some(o) => resolve_owner(ed, o)?,
                    None => (None, None),
                };
                let ino = ed
                    .mkdir(
                        path,
                        Attrs {
                            mode: *mode,
                            uid,
                            gid,
                        },
                        *parents,
                    )
                    .map_err(e(path))?;
                out.push(format!("made directory {path} (inode {ino})"));
            }
            Op::Chmod {
                mode,
                paths,
                recursive,
            } => {
                for p in paths {
                    ed.chmod(p, *mode, *recursive).map_err(e(p))?;
                    out.push(format!("chmod {mode:04o} {p}"));
                }
            }
            Op::Chown {
                owner,
                paths,
                recursive,
            } => {
                let (uid, gid) = resolve_owner(ed, owner)?;
                for p in paths {
                    ed.chown(p, uid, gid, *recursive).map_err(e(p))?;
                    out.push(format!(
                        "chown {}:{} {p}",
                        uid.map(|u| u.to_string()).unwrap_or_default(),
                        gid.map(|g| g.to_string()).unwrap_or_default()
                    ));
                }
            }
            Op::Symlink { target, path } => {
                let ino = ed
                    .symlink(target, path, Attrs::default())
                    .map_err(e(path))?;
                out.push(format!("symlink {path} -> {target} (inode {ino})"));
            }
            Op::Rm { paths, recursive } => {
                for p in paths {
                    ed.remove(p, *recursive).map_err(e(p))?;
                    out.push(format!("removed {p}"));
                }
            }
            Op::SshInject { user, key } => {
                out.extend(ssh_inject(ed, user, key)?);
            }
        }
    }
    Ok(out)
}

/// Append `key` to ~USER/.ssh/authorized_keys (created 0700/0600, owned by USER; sshd's
/// StrictModes refuses a group- or world-writable one, so the modes are set either way).
fn ssh_inject(ed: &mut Editor, user: &str, key: &str) -> Result<Vec<String>, EditError> {
    let key = key.trim();
    if key.is_empty() || key.contains('\n') || !key.contains(' ') {
        return Err(EditError::Refused(
            "the public key file must hold one key line (\"ssh-ed25519 AAAA... comment\")".into(),
        ));
    }
    let (uid, gid, home) = passwd_entry(ed, user)?;
    if !home.starts_with('/') {
        return Err(EditError::Refused(format!(
            "{user}'s home directory {home:?} in /etc/passwd is not an absolute path"
        )));
    }
    let mut out = Vec::new();
    let home = home.trim_end_matches('/').to_string();
    let own = Attrs {
        mode: Some(0o700),
        uid: Some(uid),
        gid: Some(gid),
    };
    if ed.lstat(&format!("{home}/")).map_err(e(&home))?.is_none() && !home.is_empty() {
        ed.mkdir(&home, own, true).map_err(e(&home))?;
        out.push(format!("made home directory {home}"));
    }
    let ssh = format!("{home}/.ssh");
    if ed.lstat(&ssh).map_err(e(&ssh))?.is_none() {
        ed.mkdir(&ssh, own, false).map_err(e(&ssh))?;
        out.push(format!("made {ssh} (0700)"));
    } else {
        ed.chmod(&ssh, 0o700, false).map_err(e(&ssh))?;
        ed.chown(&ssh, Some(uid), Some(gid), false)
            .map_err(e(&ssh))?;
    }
    let ak = format!("{ssh}/authorized_keys");
    let mut content = match ed.read_file(&ak) {
        Ok(c) => c,
        Err(vmdisk_ext4::Error::NotFound { .. }) => Vec::new(),
        Err(err) => return Err(e(&ak)(err)),
    };
    let present = String::from_utf8_lossy(&content)
        .lines()
        .any(|l| l.trim() == key);
    if !present {
        if !content.is_empty() && !content.ends_with(b"\n") {
            content.push(b'\n');
        }
        content.extend_from_slice(key.as_bytes());
        content.push(b'\n');
    }
    ed.write_file(
        &ak,
        &content,
        Attrs {
            mode: Some(0o600),
            uid: Some(uid),
            gid: Some(gid),
        },
    )
    .map_err(e(&ak))?;
    out.push(if present {
        format!("{ak} already holds the key (modes and owner set)")
    } else {
        format!("appended the key to {ak} (0600, owned by {user})")
    });
    Ok(out)
}

/// Parse an edit script: one operation per line, the CLI verbs without the image
/// (`write PATH HOSTFILE` reads content from a host file; `#` comments, blank lines skipped).
pub fn parse_script(
    text: &str,
    read_host: &dyn Fn(&str) -> Result<Vec<u8>, String>,
) -> Result<Vec<Op>, String> {
    if text.len() > MAX_SCRIPT_BYTES {
        return Err(format!(
            "the script is {} bytes; the limit is {MAX_SCRIPT_BYTES}",
            text.len()
        ));
    }
    let mut ops = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if ops.len() >= MAX_SCRIPT_OPS {
            return Err(format!("more than {MAX_SCRIPT_OPS} operations"));
        }
        let w: Vec<&str> = line.split_whitespace().collect();
        let at = |m: String| format!("line {}: {m}", n + 1);
        let mut flags: Vec<&str> = Vec::new();
        let mut args: Vec<&str> = Vec::new();
        let mut mode = None;
        let mut owner = None;
        let mut i = 1;
        while i < w.len() {
            match w[i] {
                "--mode" => {
                    let v = w
                        .get(i + 1)
                        .ok_or_else(|| at("--mode needs a value".into()))?;
                    mode = Some(parse_mode(v).map_err(at)?);
                    i += 1;
                }
                "--owner" => {
                    let v = w
                        .get(i + 1)
                        .ok_or_else(|| at("--owner needs a value".into()))?;
                    owner = Some(Owner::parse(v).map_err(at)?);
                    i += 1;
                }
                f if f.starts_with('-') && f.len() > 1 => flags.push(f),
                a => args.push(a),
            }
            i += 1;
        }
        let has = |f: &str| flags.contains(&f);
        for f in &flags {
            if !["-p", "-R", "-r", "-s", "-f"].contains(f) {
                return Err(at(format!("unknown option {f}")));
            }
        }
        let need = |k: usize| -> Result<(), String> {
            if args.len() < k {
                Err(at(format!("{} needs {k} arguments", w[0])))
            } else {
                Ok(())
            }
        };
        let op = match w[0] {
            "write" | "upload" => {
                // write PATH HOSTFILE   /   upload HOSTFILE PATH
                need(2)?;
                let (path, host) = if w[0] == "write" {
                    (args[0], args[1])
                } else {
                    (args[1], args[0])
                };
                Op::Write {
                    path: path.to_string(),
                    content: read_host(host).map_err(at)?,
                    mode,
                    owner,
                }
            }
            "mkdir" => {
                need(1)?;
                Op::Mkdir {
                    path: args[0].to_string(),
                    parents: has("-p"),
                    mode,
                    owner,
                }
            }
            "chmod" => {
                need(2)?;
                Op::Chmod {
                    mode: parse_mode(args[0]).map_err(at)?,
                    paths: args[1..].iter().map(|s| s.to_string()).collect(),
                    recursive: has("-R"),
                }
            }
            "chown" => {
                need(2)?;
                Op::Chown {
                    owner: Owner::parse(args[0]).map_err(at)?,
                    paths: args[1..].iter().map(|s| s.to_string()).collect(),
                    recursive: has("-R"),
                }
            }
            "ln" => {
                need(2)?;
                if !has("-s") {
                    return Err(at("only symbolic links: ln -s TARGET PATH".into()));
                }
                Op::Symlink {
                    target: args[0].to_string(),
                    path: args[1].to_string(),
                }
            }
            "rm" => {
                need(1)?;
                Op::Rm {
                    paths: args.iter().map(|s| s.to_string()).collect(),
                    recursive: has("-r") || has("-R"),
                }
            }
            "ssh-inject" => {
                need(2)?;
                let key = read_host(args[1]).map_err(at)?;
                Op::SshInject {
                    user: args[0].to_string(),
                    key: String::from_utf8_lossy(&key).into_owned(),
                }
            }
            other => return Err(at(format!("unknown operation {other:?}"))),
        };
        ops.push(op);
    }
    Ok(ops)
}

/// Run `ops` on `target` as one edit (see [`crate::edit::edit`]): validated on a staged copy
/// first, then written with one commit. `what` names the undo snapshot.
pub fn apply_ops(
    target: &EditTarget,
    what: &str,
    ops: &[Op],
) -> Result<EditReport<OpsPlan>, EditError> {
    edit(
        target,
        what,
        |g| {
            let mut ed = Editor::open_staged(g.dev.clone()).map_err(|source| EditError::Ext4 {
                part: g.chosen.name.clone(),
                source,
            })?;
            let changes = run_ops(&mut ed, ops)?;
            Ok(OpsPlan {
                changes,
                journal_replayed: g.needs_recovery,
                commit: None,
            })
        },
        |dev, plan| {
            let mut ed = Editor::open(dev.clone()).map_err(|source| EditError::Apply {
                what: "opening the filesystem for writing".into(),
                source,
            })?;
            run_ops(&mut ed, ops)?;
            let report = ed.commit().map_err(|source| EditError::Apply {
                what: "committing the edit".into(),
                source,
            })?;
            plan.commit = Some(report);
            Ok(())
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scripts_parse_every_verb_and_refuse_nonsense() {
        let read = |p: &str| -> Result<Vec<u8>, String> { Ok(format!("<{p}>").into_bytes()) };
        let ops = parse_script(
            "# comment\n\nwrite /etc/x host.txt --mode 0600 --owner alice:users\n\
             upload h2 /y\nmkdir -p /a/b\nchmod -R 755 /a /b\nchown 1000: /a\n\
             ln -s /t /l\nrm -r /a /c\nssh-inject bob key.pub\n",
            &read,
        )
        .expect("parse");
        assert_eq!(ops.len(), 8);
        assert_eq!(
            ops[0],
            Op::Write {
                path: "/etc/x".into(),
                content: b"<host.txt>".to_vec(),
                mode: Some(0o600),
                owner: Some(Owner {
                    user: Some("alice".into()),
                    group: Some("users".into())
                }),
            }
        );
        assert!(matches!(&ops[1], Op::Write { path, .. } if path == "/y"));
        assert!(
            matches!(&ops[3], Op::Chmod { mode: 0o755, recursive: true, paths } if paths.len() == 2)
        );
        assert!(
            matches!(&ops[4], Op::Chown { owner: Owner { user: Some(u), group: None }, .. } if u == "1000")
        );
        for bad in [
            "frobnicate /x",
            "chmod 999 /x",
            "ln /a /b",
            "rm",
            "mkdir -z /x",
            "write /x",
        ] {
            assert!(parse_script(bad, &read).is_err(), "{bad} parsed");
        }
        assert!(Owner::parse(":").is_err());
        assert_eq!(parse_mode("4755"), Ok(0o4755));
        assert!(parse_mode("17777").is_err());
    }
}
