//! The root disk of one VM run: the root filesystem tree (per-run secrets: the pinned host key,
//! the authorized client key, /etc/shadow) and the disk `vmdisk create --layout` builds from it.
//! As on NixOS, the root disk holds no programs: `/bin`, `/lib`, ... link into the store.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use vmdisk_assets::GuestAssets;

use crate::def::VmDef;

/// The per-run secrets and settings that go onto the root disk.
#[derive(Clone, Debug)]
pub struct RootConfig {
    /// Dropbear-format private host key.
    pub host_key_dropbear: Vec<u8>,
    /// Its public line, kept as `/etc/ssh/ssh_host_ed25519_key.pub` like a NixOS root that
    /// booted once (what `vmdisk vmtest` pins when the user's disk has it).
    pub host_key_public: String,
    /// `authorized_keys` content for root.
    pub authorized_keys: String,
    /// The whole `/etc/shadow`.
    pub shadow: Vec<u8>,
    pub hostname: String,
}

/// The default shadow file: root has no password (key login only).
pub const DEFAULT_SHADOW: &str = "root:*:19000:0:99999:7:::\n";

/// Write the root filesystem tree into `dir` (which must be empty or absent).
pub fn write_root_tree(dir: &Path, assets: &GuestAssets, cfg: &RootConfig) -> Result<()> {
    let w = |rel: &str, data: &[u8], mode: u32| -> Result<()> {
        let p = dir.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent)?;
        }
        fs::write(&p, data)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    for d in [
        "nix/store",
        "nix/.ro-store",
        "nix/.rw-store",
        "proc",
        "sys",
        "dev",
        "run",
        "tmp",
        "mnt",
        "var",
        "etc/dropbear",
        "etc/ssh",
        "root/.ssh",
    ] {
        fs::create_dir_all(dir.join(d))?;
    }
    fs::set_permissions(dir.join("root"), fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(dir.join("root/.ssh"), fs::Permissions::from_mode(0o700))?;
    fs::set_permissions(dir.join("tmp"), fs::Permissions::from_mode(0o1777))?;
    w("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n", 0o644)?;
    w("etc/group", b"root:x:0:\n", 0o644)?;
    w("etc/shadow", &cfg.shadow, 0o600)?;
    w("etc/shells", b"/bin/sh\n", 0o644)?;
    w(
        "etc/hostname",
        format!("{}\n", cfg.hostname).as_bytes(),
        0o644,
    )?;
    w(
        "etc/dropbear/dropbear_ed25519_host_key",
        &cfg.host_key_dropbear,
        0o600,
    )?;
    w(
        "etc/ssh/ssh_host_ed25519_key.pub",
        format!("{}\n", cfg.host_key_public.trim()).as_bytes(),
        0o644,
    )?;
    w(
        "root/.ssh/authorized_keys",
        cfg.authorized_keys.as_bytes(),
        0o600,
    )?;
    // As on NixOS, the root disk holds no programs: everything links into the store.
    for l in ["bin", "sbin", "lib", "lib64", "usr"] {
        symlink(format!("{}/{l}", assets.system), dir.join(l))?;
    }
    Ok(())
}

/// Build the VM's disk with `vmdisk create --layout ... --copy-in root=TREE`.
pub fn build_disk(
    vmdisk: &Path,
    def: &VmDef,
    root_tree: &Path,
    disk: &Path,
    seed: u64,
) -> Result<()> {
    let mut cmd = Command::new(vmdisk);
    cmd.arg("create")
        .arg("-q")
        .arg("-f")
        .arg(&def.disk_format)
        .arg("--layout")
        .arg(&def.layout)
        .arg("--copy-in")
        .arg(format!("/={}", root_tree.display()))
        .arg("--seed")
        .arg(seed.to_string());
    for (part, dir) in &def.copy_in {
        cmd.arg("--copy-in")
            .arg(format!("{part}={}", dir.display()));
    }
    cmd.arg(disk);
    if let Some(size) = &def.disk_size {
        cmd.arg(size);
    }
    let out = cmd
        .output()
        .with_context(|| format!("running {}", vmdisk.display()))?;
    if !out.status.success() {
        bail!(
            "`vmdisk create --layout {}` failed: {}",
            def.layout.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
