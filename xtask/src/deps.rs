//! The external tools the tests use as oracles, and how they get onto a machine.
//!
//! On Debian/Ubuntu as root the missing packages are installed with apt-get; anywhere else
//! (or with `--no-install`) we print the exact command and stop. In `nix develop` the flake's
//! devShell provides them.

use anyhow::{bail, Result};
use xshell::{cmd, Shell};

use crate::flags::Deps;

/// (command the tests run, Debian package that provides it)
pub const TOOLS: &[(&str, &str)] = &[
    // images: the qcow2 oracle
    ("qemu-img", "qemu-utils"),
    ("qemu-io", "qemu-utils"),
    ("qemu-nbd", "qemu-utils"),
    // NBD clients
    ("nbdinfo", "libnbd-bin"),
    ("nbdcopy", "libnbd-bin"),
    // ext4: mkfs for layouts and fixtures, e2fsck/debugfs as oracles
    ("mke2fs", "e2fsprogs"),
    ("e2fsck", "e2fsprogs"),
    ("debugfs", "e2fsprogs"),
    ("dumpe2fs", "e2fsprogs"),
    // GPT and FAT oracles
    ("sgdisk", "gdisk"),
    ("sfdisk", "fdisk"),
    ("fsck.vfat", "dosfstools"),
    ("mdir", "mtools"),
    ("blkid", "util-linux"),
    ("swaplabel", "util-linux"),
    // password hashes
    ("openssl", "openssl"),
    ("sha256sum", "coreutils"),
];

impl Deps {
    pub fn run(self, sh: &Shell) -> Result<()> {
        ensure(sh, !self.check_only)
    }
}

fn have(tool: &str) -> bool {
    std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false)
}

fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Make sure every tool is present, installing with apt-get when allowed and possible.
pub fn ensure(sh: &Shell, install: bool) -> Result<()> {
    let mut missing: Vec<&str> = TOOLS
        .iter()
        .filter(|(tool, _)| !have(tool))
        .map(|&(_, pkg)| pkg)
        .collect();
    missing.sort_unstable();
    missing.dedup();
    if missing.is_empty() {
        eprintln!("xtask: test tools present: {}", tool_names());
        return Ok(());
    }
    let apt = have("apt-get");
    if install && apt && is_root() {
        eprintln!("xtask: installing {}", missing.join(" "));
        cmd!(sh, "apt-get update -q")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()?;
        cmd!(
            sh,
            "apt-get install -y -q --no-install-recommends {missing...}"
        )
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
        let still: Vec<&str> = TOOLS
            .iter()
            .filter(|(t, _)| !have(t))
            .map(|&(t, _)| t)
            .collect();
        if !still.is_empty() {
            bail!("still missing after apt-get install: {}", still.join(" "));
        }
        return Ok(());
    }
    let how = if apt {
        format!("sudo apt-get install -y {}", missing.join(" "))
    } else {
        "nix develop   (the flake's devShell has every tool)".to_string()
    };
    bail!(
        "the tests need these missing packages: {}\ninstall them with:\n    {how}",
        missing.join(" ")
    )
}

fn tool_names() -> String {
    TOOLS.iter().map(|(t, _)| *t).collect::<Vec<_>>().join(" ")
}
