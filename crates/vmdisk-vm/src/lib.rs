//! The VM harness: everything needed to boot a real Linux guest whose disk vmdisk built, watch
//! it, reach it over SSH, assert what matters and, when it fails, say why.
//!
//! Build side: [`assets`] (pinned Debian packages: lock file, download, verify, unpack),
//! [`deb`] (unpacking .deb files without root or dpkg), [`kernel`] (bootable kernel images and
//! module load order), [`elf`] (library closures), [`cpio`] (initramfs archives) and [`guest`]
//! (assembling initramfs, store and root tree for a test VM definition from [`def`]).
//!
//! Run side: [`qemu`] (command lines and binaries), [`console`] (serial log and markers),
//! [`qmp`], [`ssh`] (OpenSSH client, keys, pinned host keys), [`vm`] (a running `TestVm` that
//! cleans up in Drop), [`diagnose`] (known failure signatures) and [`report`].

pub mod assets;
pub mod console;
pub mod cpio;
pub mod deb;
pub mod def;
pub mod diagnose;
pub mod elf;
pub mod guest;
pub mod kernel;
pub mod qemu;
pub mod qmp;
pub mod report;
pub mod run;
pub mod ssh;
pub mod vfkit;
pub mod vm;

use std::fmt;

/// Guest architecture. Named as the kernel's `uname -m` names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Arch {
    X86_64,
    Aarch64,
}

impl Arch {
    /// `uname -m` in the guest.
    pub fn uname(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
        }
    }
    /// Debian's architecture name.
    pub fn debian(self) -> &'static str {
        match self {
            Arch::X86_64 => "amd64",
            Arch::Aarch64 => "arm64",
        }
    }
    /// The GNU multiarch triplet used under /lib and /usr/lib.
    pub fn multiarch(self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64-linux-gnu",
            Arch::Aarch64 => "aarch64-linux-gnu",
        }
    }
    /// The architecture this program was built for, if it is one we can boot.
    pub fn host() -> Option<Arch> {
        match std::env::consts::ARCH {
            "x86_64" => Some(Arch::X86_64),
            "aarch64" => Some(Arch::Aarch64),
            _ => None,
        }
    }
}

impl fmt::Display for Arch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.uname())
    }
}
