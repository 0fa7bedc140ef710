//! SSH into a user's NixOS VM without touching the user's configuration: a host key we pin and
//! a fresh client key the guest authorizes, put where NixOS reads them before its first boot.
//!
//! NixOS's sshd reads `/etc/ssh/ssh_host_ed25519_key` and generates host keys only when they are
//! missing, and reads root's `~/.ssh/authorized_keys` (FACTS.md). So [`preseed_ssh`]:
//!
//! ```text
//!   fresh disk (no NIX_DISK_IMAGE yet)  built like createEmptyFilesystemImage, by mke2fs -d
//!                                       from a staged tree that holds both files (owned by root)
//!   overlay on the user's disk          host key: the disk's own .pub is pinned when it has one,
//!                                         else the ext4 editor creates ours in the overlay
//!                                       authorized_keys: the ext4 editor appends our key, or
//!                                         creates the file (and /root/.ssh) in the overlay
//!                                       (a systemd credential only if the editor refuses)
//!   no disk of our own                  a systemd credential for both
//! ```
//!
//! The credential is `tmpfiles.extra`, passed as `systemd.set_credential_binary=` on the kernel
//! command line: systemd-tmpfiles-setup.service imports `tmpfiles.*` credentials
//! (`ImportCredential=tmpfiles.*`, in systemd's unit and in NixOS's initrd variant), and its
//! lines create root's authorized_keys (`f`, then `w+~` appends our key) and a host key only
//! if none exists (`f~`). Nothing here ever writes the user's disk: the fresh disk and the
//! overlay are temporaries the run owns.

use std::fs;
use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;

use crate::ssh;

/// Where NixOS's sshd finds its ed25519 host key.
pub const HOST_KEY_PATH: &str = "/etc/ssh/ssh_host_ed25519_key";
/// Root's authorized keys, which NixOS's sshd reads (`AuthorizedKeysFile` includes it).
pub const AUTHORIZED_KEYS_PATH: &str = "/root/.ssh/authorized_keys";
/// The kernel's command line is at most 2048 bytes on x86_64 and arm64 (COMMAND_LINE_SIZE);
/// NixOS's own parameters (init=, regInfo=, kernel-params, consoles) take about 400 and the
/// run's about 100, so the credential may use this much.
pub const MAX_CREDENTIAL_PARAM_BYTES: usize = 1400;
/// mke2fs, debugfs and ssh-keygen finish in well under this.
const TOOL_TIMEOUT: Duration = Duration::from_secs(120);
/// A public key file on the user's disk is one line; anything bigger is not one.
const MAX_PUBLIC_KEY_BYTES: usize = 16 * 1024;
/// An authorized_keys file the editor rewrites (read into memory).
const MAX_AUTHORIZED_KEYS_BYTES: usize = 1 << 20;

/// A guest host key in OpenSSH's format, for `/etc/ssh`.
#[derive(Clone, Debug)]
pub struct OpensshHostKey {
    /// The private key file (`-----BEGIN OPENSSH PRIVATE KEY-----`).
    pub private_pem: String,
    /// "ssh-ed25519 AAAA... vmdisk-vmtest".
    pub public_line: String,
}

impl OpensshHostKey {
    /// A fresh ed25519 key from ssh-keygen (made in a private folder under `dir`, removed
    /// afterwards).
    pub fn generate(dir: &Path) -> Result<OpensshHostKey> {
        let tmp = tempfile::Builder::new()
            .prefix(".hostkey-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a temporary folder in {}", dir.display()))?;
        let key = tmp.path().join("key");
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-t", "ed25519", "-N", "", "-q", "-C", "vmdisk-vmtest", "-f"])
            .arg(&key);
        let out = ssh::run_bounded(&mut cmd, None, TOOL_TIMEOUT).context(
            "running ssh-keygen (install OpenSSH's client: `apt-get install openssh-client`, \
             `nix shell nixpkgs#openssh`)",
        )?;
        ensure!(
            out.status == Some(0),
            "ssh-keygen -t ed25519 failed (exit {:?}): {}",
            out.status,
            out.stderr_text().trim()
        );
        let private_pem = fs::read_to_string(&key)?;
        let public_line = fs::read_to_string(key.with_extension("pub"))?
            .trim()
            .to_string();
        let parsed = ssh::parse_openssh_ed25519(&private_pem)?;
        ensure!(
            public_line
                .split_whitespace()
                .take(2)
                .eq(parsed.public_line().split_whitespace()),
            "ssh-keygen's .pub does not match its private key"
        );
        Ok(OpensshHostKey {
            private_pem,
            public_line,
        })
    }
}

/// How the host key we pin got to be the guest's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum HostKeyHow {
    /// Ours, written into the fresh disk.
    OnFreshDisk,
    /// The user's disk has one: that one is pinned.
    FromUserDisk,
    /// Ours, by the tmpfiles.extra credential (created only if the disk has none).
    Credential,
    /// Ours, created in the run's overlay by the ext4 editor (the disk had none).
    Editor,
}

/// How the client key got authorized.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthorizedHow {
    /// Written into the fresh disk.
    OnFreshDisk,
    /// Appended to the disk's authorized_keys, or that file created, in the run's overlay
    /// (ext4 editor).
    Editor,
    /// By the tmpfiles.extra credential.
    Credential,
    /// The user's own key (`--key`), which the configuration authorizes.
    UserKey,
}

/// Where the run's keys go.
#[derive(Clone, Debug)]
pub enum PreseedTarget {
    /// Build the run's disk: an ext4 of `size` bytes labelled `label`, as qcow2 at `disk`.
    Fresh {
        disk: PathBuf,
        size: u64,
        label: String,
    },
    /// The run's qcow2 overlay on the user's disk.
    Overlay { overlay: PathBuf },
    /// The user's disk itself (`--persist`): read only, to learn its host key; nothing is
    /// written to it.
    Persist { disk: PathBuf },
    /// No disk we can prepare (the script makes its own, or has none).
    None,
}

/// What [`preseed_ssh`] did.
#[derive(Clone, Debug, Serialize)]
pub struct Preseed {
    /// The host key line to pin in known_hosts.
    pub host_key_line: String,
    pub host_key: HostKeyHow,
    pub authorized_key: AuthorizedHow,
    /// Kernel parameters the run must add (the credential), if any.
    pub kernel_params: Vec<String>,
    /// What could not be done the preferred way, and why.
    pub notes: Vec<String>,
}

/// The `tmpfiles.extra` lines: root's authorized_keys with `authorized` appended, and the
/// host key when the guest has none.
pub fn tmpfiles_lines(host_key: Option<&OpensshHostKey>, authorized: Option<&str>) -> String {
    let b64 = |s: &str| vmdisk_ssh::hostkey::base64_encode(s.as_bytes());
    let mut t = String::new();
    if let Some(a) = authorized {
        t.push_str("d /root/.ssh 0700 root root -\n");
        t.push_str("f /root/.ssh/authorized_keys 0600 root root -\n");
        // Newlines around the key: the file may not end with one.
        t.push_str(&format!(
            "w+~ /root/.ssh/authorized_keys - - - - {}\n",
            b64(&format!("\n{}\n", a.trim()))
        ));
    }
    if let Some(k) = host_key {
        t.push_str("d /etc/ssh 0755 root root -\n");
        t.push_str(&format!(
            "f~ {HOST_KEY_PATH} 0600 root root - {}\n",
            b64(&k.private_pem)
        ));
    }
    t
}

/// The kernel parameter that hands `tmpfiles` to systemd as the `tmpfiles.extra` credential.
pub fn credential_param(tmpfiles: &str) -> Result<String> {
    let p = format!(
        "systemd.set_credential_binary=tmpfiles.extra:{}",
        vmdisk_ssh::hostkey::base64_encode(tmpfiles.as_bytes())
    );
    ensure!(
        p.len() <= MAX_CREDENTIAL_PARAM_BYTES,
        "the SSH credential would take {} bytes of the kernel command line (limit \
         {MAX_CREDENTIAL_PARAM_BYTES}: the command line holds 2048)",
        p.len()
    );
    Ok(p)
}

/// Put the run's SSH keys into `target` (see the module docs). `authorized` is the client's
/// public line, `None` when the user logs in with a key of their own.
pub fn preseed_ssh(
    target: &PreseedTarget,
    host_key: &OpensshHostKey,
    authorized: Option<&str>,
    work: &Path,
) -> Result<Preseed> {
    let auth_how = |on_disk| match authorized {
        None => AuthorizedHow::UserKey,
        Some(_) => on_disk,
    };
    match target {
        PreseedTarget::Fresh { disk, size, label } => {
            fresh_disk(disk, *size, label, host_key, authorized, work)?;
            Ok(Preseed {
                host_key_line: host_key.public_line.clone(),
                host_key: HostKeyHow::OnFreshDisk,
                authorized_key: auth_how(AuthorizedHow::OnFreshDisk),
                kernel_params: Vec::new(),
                notes: Vec::new(),
            })
        }
        PreseedTarget::None => {
            let lines = tmpfiles_lines(Some(host_key), authorized);
            Ok(Preseed {
                host_key_line: host_key.public_line.clone(),
                host_key: HostKeyHow::Credential,
                authorized_key: auth_how(AuthorizedHow::Credential),
                kernel_params: vec![credential_param(&lines)?],
                notes: vec![
                    "the script makes its own disk, so the keys go in as a systemd credential \
                     (tmpfiles.extra on the kernel command line, readable in the guest's \
                     /proc/cmdline; the host key is this run's throwaway key)"
                        .into(),
                ],
            })
        }
        PreseedTarget::Persist { disk } => {
            let seen = read_guest(disk)?;
            let mut notes = vec![
                "--persist: vmdisk writes nothing to the disk; the client key must be one the \
                 configuration authorizes (--key)"
                    .into(),
            ];
            let (line, how, params) = match seen.host_public {
                Some(l) => (l, HostKeyHow::FromUserDisk, Vec::new()),
                None => {
                    notes.push(format!(
                        "the disk has no {HOST_KEY_PATH} yet: the run's key goes in by credential \
                         and stays on the disk, as the key NixOS would have generated"
                    ));
                    (
                        host_key.public_line.clone(),
                        HostKeyHow::Credential,
                        vec![credential_param(&tmpfiles_lines(Some(host_key), None))?],
                    )
                }
            };
            Ok(Preseed {
                host_key_line: line,
                host_key: how,
                authorized_key: AuthorizedHow::UserKey,
                kernel_params: params,
                notes,
            })
        }
        PreseedTarget::Overlay { overlay } => preseed_overlay(overlay, host_key, authorized),
    }
}

/// What the guest disk already has.
#[derive(Debug, Default)]
struct Seen {
    host_public: Option<String>,
    authorized_keys: Option<Vec<u8>>,
}

fn read_optional(fs: &vmdisk_ext4::Ext4, path: &str, limit: usize) -> Result<Option<Vec<u8>>> {
    if !fs.exists(path)? {
        return Ok(None);
    }
    let st = fs.stat(path)?;
    if st.size > limit as u64 {
        bail!("{path} on the guest is {} bytes (limit {limit})", st.size);
    }
    Ok(Some(fs.read_file(path)?))
}

/// Read the host key's public half and root's authorized_keys from `image` (read-only, under
/// qemu's read lock; the journal is replayed in memory only).
fn read_guest(image: &Path) -> Result<Seen> {
    let img = vmdisk_image::open(image, &vmdisk_image::OpenOptions::read_only())
        .with_context(|| format!("opening {} read-only", image.display()))?;
    let dev = img.dev();
    let chosen = vmdisk_guest::select(&dev, None)
        .with_context(|| format!("finding the root filesystem on {}", image.display()))?;
    let part = vmdisk_guest::device_for(dev, &chosen)?;
    let fs = match vmdisk_ext4::Ext4::open(part) {
        Ok(fs) => fs,
        // An empty disk (the script's createEmptyFilesystemImage made one; never booted) is
        // still ext4; anything else has nothing for us.
        Err(e) => {
            return Err(e)
                .with_context(|| format!("reading the ext4 filesystem on {}", image.display()))
        }
    };
    let host_public = read_optional(&fs, &format!("{HOST_KEY_PATH}.pub"), MAX_PUBLIC_KEY_BYTES)?
        .map(|b| String::from_utf8_lossy(&b).trim().to_string())
        .filter(|l| l.starts_with("ssh-ed25519 "));
    let authorized_keys = read_optional(&fs, AUTHORIZED_KEYS_PATH, MAX_AUTHORIZED_KEYS_BYTES)?;
    Ok(Seen {
        host_public,
        authorized_keys,
    })
}

fn preseed_overlay(
    overlay: &Path,
    host_key: &OpensshHostKey,
    authorized: Option<&str>,
) -> Result<Preseed> {
    let seen = read_guest(overlay)?;
    let mut notes = Vec::new();
    let new_host = seen.host_public.is_none().then_some(host_key);
    let host_key_line = match &seen.host_public {
        Some(l) => l.clone(),
        None => host_key.public_line.clone(),
    };
    let ops = overlay_ops(new_host, authorized, seen.authorized_keys.as_deref());
    let edited = if ops.is_empty() {
        Ok(())
    } else {
        edit_overlay(overlay, &ops)
    };
    let (host_how, auth_how, kernel_params) = match edited {
        Ok(()) => (
            if new_host.is_some() {
                HostKeyHow::Editor
            } else {
                HostKeyHow::FromUserDisk
            },
            match authorized {
                None => AuthorizedHow::UserKey,
                Some(_) => AuthorizedHow::Editor,
            },
            Vec::new(),
        ),
        Err(e) => {
            notes.push(format!(
                "writing the SSH keys into the overlay failed ({e:#}); they go in as a systemd \
                 credential instead (readable in the guest's /proc/cmdline; a throwaway key)"
            ));
            (
                if new_host.is_some() {
                    HostKeyHow::Credential
                } else {
                    HostKeyHow::FromUserDisk
                },
                match authorized {
                    None => AuthorizedHow::UserKey,
                    Some(_) => AuthorizedHow::Credential,
                },
                vec![credential_param(&tmpfiles_lines(new_host, authorized))?],
            )
        }
    };
    Ok(Preseed {
        host_key_line,
        host_key: host_how,
        authorized_key: auth_how,
        kernel_params,
        notes,
    })
}

/// The editor operations that put the run's keys into the overlay: `host_key` (when the disk
/// has none) as /etc/ssh/ssh_host_ed25519_key (0600) and .pub (0644), and `authorized`
/// appended to root's authorized_keys (`old`, when it exists), created 0600 in /root/.ssh
/// (0700) otherwise. Everything owned by root, by number: an empty disk has no /etc/passwd.
fn overlay_ops(
    host_key: Option<&OpensshHostKey>,
    authorized: Option<&str>,
    old: Option<&[u8]>,
) -> Vec<vmdisk_guest::Op> {
    use vmdisk_guest::{Op, Owner};
    let root = || {
        Some(Owner {
            user: Some("0".into()),
            group: Some("0".into()),
        })
    };
    let mkdir = |path: &str, mode: u16| Op::Mkdir {
        path: path.into(),
        parents: true,
        mode: Some(mode),
        owner: root(),
    };
    let mut ops = Vec::new();
    if let Some(k) = host_key {
        ops.push(mkdir(parent(HOST_KEY_PATH), 0o755));
        ops.push(Op::Write {
            path: HOST_KEY_PATH.into(),
            content: k.private_pem.clone().into_bytes(),
            mode: Some(0o600),
            owner: root(),
        });
        ops.push(Op::Write {
            path: format!("{HOST_KEY_PATH}.pub"),
            content: format!("{}\n", k.public_line.trim()).into_bytes(),
            mode: Some(0o644),
            owner: root(),
        });
    }
    if let Some(line) = authorized {
        let mut content = old.unwrap_or_default().to_vec();
        if !content.is_empty() && !content.ends_with(b"\n") {
            content.push(b'\n');
        }
        content.extend_from_slice(line.trim().as_bytes());
        content.push(b'\n');
        if old.is_none() {
            // /root and /root/.ssh: 0700 each (existing ones are left as they are).
            let ssh_dir = parent(AUTHORIZED_KEYS_PATH);
            ops.push(mkdir(parent(ssh_dir), 0o700));
            ops.push(mkdir(ssh_dir, 0o700));
        }
        ops.push(Op::Write {
            path: AUTHORIZED_KEYS_PATH.into(),
            content,
            mode: Some(0o600),
            owner: root(),
        });
    }
    ops
}

/// The directory holding the absolute path `p` ("/" for a top-level name).
fn parent(p: &str) -> &str {
    match p.rsplit_once('/') {
        Some(("", _)) | None => "/",
        Some((d, _)) => d,
    }
}

/// Run `ops` on the run's overlay as one transaction (never the user's disk: the overlay's
/// backing is opened read-only).
fn edit_overlay(overlay: &Path, ops: &[vmdisk_guest::Op]) -> Result<()> {
    let target = vmdisk_guest::EditTarget {
        image: overlay.to_path_buf(),
        format: Some(vmdisk_image::Format::Qcow2),
        partition: None,
        undo: Some(vmdisk_guest::Undo::InPlace),
        dry_run: false,
    };
    vmdisk_guest::apply_ops(&target, "vmtest-ssh", ops)?;
    Ok(())
}

/// Build the run's fresh disk the way the run script's createEmptyFilesystemImage does (a raw
/// file of `size`, `mkfs.ext4 -L label`, converted to qcow2), with the SSH files staged in it
/// by `mke2fs -d` and made root's with debugfs (mke2fs copies the staging tree's owners).
fn fresh_disk(
    disk: &Path,
    size: u64,
    label: &str,
    host_key: &OpensshHostKey,
    authorized: Option<&str>,
    work: &Path,
) -> Result<()> {
    let stage = tempfile::Builder::new()
        .prefix("vmdisk-stage-")
        .tempdir_in(work)?;
    let root = stage.path();
    let mk = |rel: &str, mode: u32| -> Result<()> {
        let p = root.join(rel);
        fs::create_dir_all(&p)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let put = |rel: &str, data: &str, mode: u32| -> Result<()> {
        let p = root.join(rel);
        fs::write(&p, data)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    mk("etc", 0o755)?;
    mk("etc/ssh", 0o755)?;
    put("etc/ssh/ssh_host_ed25519_key", &host_key.private_pem, 0o600)?;
    put(
        "etc/ssh/ssh_host_ed25519_key.pub",
        &format!("{}\n", host_key.public_line),
        0o644,
    )?;
    let mut owned = vec![
        "/etc",
        "/etc/ssh",
        HOST_KEY_PATH,
        "/etc/ssh/ssh_host_ed25519_key.pub",
    ];
    if let Some(a) = authorized {
        mk("root", 0o700)?;
        mk("root/.ssh", 0o700)?;
        put(
            "root/.ssh/authorized_keys",
            &format!("{}\n", a.trim()),
            0o600,
        )?;
        owned.extend(["/root", "/root/.ssh", AUTHORIZED_KEYS_PATH]);
    }

    let raw = work.join("fresh-disk.raw");
    let _ = fs::remove_file(&raw);
    {
        let f = fs::File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
        f.set_len(size)
            .with_context(|| format!("sizing {} to {size} bytes", raw.display()))?;
    }
    let result = (|| -> Result<()> {
        let mut mke2fs = Command::new("mke2fs");
        mke2fs
            .args(["-q", "-F", "-t", "ext4", "-L", label, "-d"])
            .arg(root)
            .arg(&raw);
        run_tool(&mut mke2fs, "mke2fs", "e2fsprogs")?;
        let cmds: String = owned
            .iter()
            .map(|p| format!("set_inode_field {p} uid 0\nset_inode_field {p} gid 0\n"))
            .collect();
        let cmdfile = work.join("fresh-disk.debugfs");
        fs::write(&cmdfile, cmds)?;
        let mut debugfs = Command::new("debugfs");
        debugfs.arg("-w").arg("-f").arg(&cmdfile).arg(&raw);
        run_tool(&mut debugfs, "debugfs", "e2fsprogs")?;
        let _ = fs::remove_file(&cmdfile);
        let src = vmdisk_image::open(
            &raw,
            &vmdisk_image::OpenOptions {
                format: Some(vmdisk_image::Format::Raw),
                read_only: true,
                ..Default::default()
            },
        )?;
        vmdisk_image::convert(
            &src,
            disk,
            &vmdisk_image::ConvertOptions::new(vmdisk_image::Format::Qcow2),
            &|_, _| {},
        )
        .with_context(|| format!("converting the fresh disk to qcow2 at {}", disk.display()))?;
        Ok(())
    })();
    match fs::remove_file(&raw) {
        Err(e) if e.kind() != ErrorKind::NotFound => {
            return Err(e).with_context(|| format!("removing {}", raw.display()))
        }
        _ => {}
    }
    result
}

fn run_tool(cmd: &mut Command, name: &str, package: &str) -> Result<()> {
    let out = ssh::run_bounded(cmd, None, TOOL_TIMEOUT)
        .with_context(|| format!("running {name} (Debian package {package})"))?;
    ensure!(
        out.status == Some(0),
        "{name} failed (exit {:?}): {}",
        out.status,
        out.stderr_text().trim()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> OpensshHostKey {
        OpensshHostKey {
            private_pem: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----\n".into(),
            public_line: "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIH+FWvm7WQNgC0GeE2ggNZPUqfDUABzLrkd70AhioxZv vmdisk-vmtest".into(),
        }
    }

    fn unb64(s: &str) -> String {
        String::from_utf8(vmdisk_ssh::hostkey::base64_decode(s).unwrap()).unwrap()
    }

    /// (verb, path, mode, content) of each op, for comparing.
    fn shape(ops: &[vmdisk_guest::Op]) -> Vec<(&'static str, String, Option<u16>, Vec<u8>)> {
        use vmdisk_guest::Op;
        ops.iter()
            .map(|op| match op {
                Op::Mkdir {
                    path,
                    parents,
                    mode,
                    owner,
                } => {
                    assert!(*parents);
                    let o = owner.as_ref().unwrap();
                    assert_eq!(
                        (o.user.as_deref(), o.group.as_deref()),
                        (Some("0"), Some("0"))
                    );
                    ("mkdir", path.clone(), *mode, Vec::new())
                }
                Op::Write {
                    path,
                    content,
                    mode,
                    owner,
                } => {
                    let o = owner.as_ref().unwrap();
                    assert_eq!(
                        (o.user.as_deref(), o.group.as_deref()),
                        (Some("0"), Some("0"))
                    );
                    ("write", path.clone(), *mode, content.clone())
                }
                other => panic!("unexpected op {other:?}"),
            })
            .collect()
    }

    #[test]
    fn overlay_ops_create_missing_keys_and_append_to_an_existing_file() {
        let client = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient vmdisk-harness";
        let k = key();
        // An empty disk: both keys, with their directories, all root's.
        assert_eq!(
            shape(&overlay_ops(Some(&k), Some(client), None)),
            [
                ("mkdir", "/etc/ssh".into(), Some(0o755), vec![]),
                (
                    "write",
                    HOST_KEY_PATH.into(),
                    Some(0o600),
                    k.private_pem.clone().into_bytes()
                ),
                (
                    "write",
                    format!("{HOST_KEY_PATH}.pub"),
                    Some(0o644),
                    format!("{}\n", k.public_line).into_bytes()
                ),
                ("mkdir", "/root".into(), Some(0o700), vec![]),
                ("mkdir", "/root/.ssh".into(), Some(0o700), vec![]),
                (
                    "write",
                    AUTHORIZED_KEYS_PATH.into(),
                    Some(0o600),
                    format!("{client}\n").into_bytes()
                ),
            ]
        );
        // The disk's host key is kept; its authorized_keys (no final newline) gets ours.
        assert_eq!(
            shape(&overlay_ops(
                None,
                Some(client),
                Some(b"ssh-rsa AAAA theirs")
            )),
            [(
                "write",
                AUTHORIZED_KEYS_PATH.into(),
                Some(0o600),
                format!("ssh-rsa AAAA theirs\n{client}\n").into_bytes()
            )]
        );
        // The user's own key and a host key on the disk: nothing to write.
        assert!(overlay_ops(None, None, Some(b"x\n")).is_empty());
        assert_eq!(parent("/root"), "/");
        assert_eq!(parent("/root/.ssh/authorized_keys"), "/root/.ssh");
    }

    #[test]
    fn tmpfiles_lines_create_what_is_missing_and_append_the_key() {
        let client = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIClient vmdisk-harness";
        let t = tmpfiles_lines(Some(&key()), Some(client));
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines[0], "d /root/.ssh 0700 root root -");
        assert_eq!(lines[1], "f /root/.ssh/authorized_keys 0600 root root -");
        let (head, b64) = lines[2].rsplit_once(' ').unwrap();
        assert_eq!(head, "w+~ /root/.ssh/authorized_keys - - - -");
        assert_eq!(unb64(b64), format!("\n{client}\n"));
        assert_eq!(lines[3], "d /etc/ssh 0755 root root -");
        let (head, b64) = lines[4].rsplit_once(' ').unwrap();
        // f without +: a host key the disk already has is kept.
        assert_eq!(head, "f~ /etc/ssh/ssh_host_ed25519_key 0600 root root -");
        assert_eq!(unb64(b64), key().private_pem);
        assert_eq!(lines.len(), 5);

        let p = credential_param(&t).unwrap();
        let v = p
            .strip_prefix("systemd.set_credential_binary=tmpfiles.extra:")
            .unwrap();
        assert_eq!(unb64(v), t);
        assert!(tmpfiles_lines(None, None).is_empty());
    }

    #[test]
    fn a_credential_too_long_for_the_command_line_is_refused() {
        let big = "x".repeat(MAX_CREDENTIAL_PARAM_BYTES);
        let e = credential_param(&big).unwrap_err();
        assert!(format!("{e:#}").contains("kernel command line"), "{e:#}");
    }
}
