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
    ("filefrag", "e2fsprogs"),
    // reflink copies: an XFS with reflink=1, loop-mounted (as root) by the copy tests
    ("mkfs.xfs", "xfsprogs"),
    // GPT and FAT oracles
    ("sgdisk", "gdisk"),
    ("sfdisk", "fdisk"),
    ("fsck.vfat", "dosfstools"),
    ("mdir", "mtools"),
    ("blkid", "util-linux"),
    ("swaplabel", "util-linux"),
    // password hashes
    ("openssl", "openssl"),
    // the VM harness: OpenSSH is the client the tests log in with
    ("ssh", "openssh-client"),
    ("ssh-keygen", "openssh-client"),
    // the flake checks: tests/tests/flake.rs parses flake.nix and evaluates its pure parts
    ("nix-instantiate", "nix-bin"),
    ("sha256sum", "coreutils"),
    // libnbd's Python shell: the NBD client of tests/tests/nbd_*.rs (runs the system python3)
    ("nbdsh", "python3-libnbd"),
    // initramfs archives: GNU cpio reads what the guest builder writes
    ("cpio", "cpio"),
    // disko layouts: the filesystems vmdisk leaves to their own tools, and their checkers
    ("mkfs.btrfs", "btrfs-progs"),
    ("btrfs", "btrfs-progs"),
    ("xfs_repair", "xfsprogs"),
    ("mkfs.f2fs", "f2fs-tools"),
    ("sload.f2fs", "f2fs-tools"),
    ("fsck.f2fs", "f2fs-tools"),
    // ext4/vfat read tests (issue #14): mcopy as the FAT oracle, mkfs.vfat to make volumes,
    // fallocate/mount for kernel-written ext4, timeout around oracles on hostile images
    ("mcopy", "mtools"),
    ("mkfs.vfat", "dosfstools"),
    ("fallocate", "util-linux"),
    ("mount", "mount"),
    ("timeout", "coreutils"),
    // `vmdisk doctor builder` (issue #17): the tests start a real sshd with its own host key
    // and config; the doctor reads host keys with ssh-keyscan
    ("sshd", "openssh-server"),
    ("ssh-keyscan", "openssh-client"),
    // issue #20: the Darwin cross-builds' binaries must be Mach-O; venv for zig
    ("file", "file"),
    ("python3", "python3-venv"),
    // resize --grow-fs (issue #18 part 2): resize2fs is the reference on a twin, losetup
    // exposes a GPT partition to e2fsck/debugfs/mount
    ("resize2fs", "e2fsprogs"),
    ("losetup", "mount"),
    // disko layouts with LUKS (issue #19): the builder VM's LUKS headers, read on the host
    ("cryptsetup", "cryptsetup-bin"),
];

/// Shared libraries of Debian 12's qemu-system-x86 7.2. The harness unpacks that package into
/// its cache rather than installing it, because installing it removes the machine's newer
/// qemu-utils (the image oracle); its libraries install without conflicts.
pub const QEMU_RUNTIME_LIBS: &[&str] = &[
    "libaio1",
    "libbpf1",
    "libcapstone4",
    "libfdt1",
    "libfuse3-3",
    "libglib2.0-0",
    "libgmp10",
    "libgnutls30",
    "libibverbs1",
    "libjpeg62-turbo",
    "libnuma1",
    "libpixman-1-0",
    "libpmem1",
    "libpng16-16",
    "librdmacm1",
    "libsasl2-2",
    "libseccomp2",
    "libslirp0",
    "libudev1",
    "liburing2",
    "libvdeplug2",
    "libzstd1",
    "zlib1g",
];

/// What the VM harness needs beyond the test tools: a qemu-system-x86_64 (the machine's, or
/// Debian's unpacked by the harness, which needs QEMU_RUNTIME_LIBS).
pub fn ensure_vm(sh: &Shell, install: bool) -> Result<()> {
    ensure(sh, install)?;
    ensure_virtiofsd(sh, install)?;
    if have("qemu-system-x86_64") || std::env::var_os("VMDISK_QEMU_X86_64").is_some() {
        return Ok(());
    }
    let missing: Vec<&str> = QEMU_RUNTIME_LIBS
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    if install && have("apt-get") && is_root() {
        eprintln!(
            "xtask: installing qemu's runtime libraries: {}",
            missing.join(" ")
        );
        cmd!(
            sh,
            "apt-get install -y -q --no-install-recommends {missing...}"
        )
        .env("DEBIAN_FRONTEND", "noninteractive")
        .run()?;
        return Ok(());
    }
    let how = if have("apt-get") {
        format!("sudo apt-get install -y {}", missing.join(" "))
    } else {
        "nix develop   (the devShell has qemu)".into()
    };
    bail!(
        "no qemu-system-x86_64 on PATH, and the libraries for the Debian build the harness \
         unpacks are missing: {}\ninstall them with:\n    {how}\nor install qemu-system-x86 \
         yourself (note: on Debian 12 that replaces a backported qemu-utils with 7.2)",
        missing.join(" ")
    )
}

/// virtiofsd, the host side of virtiofs shares: not packaged in Debian 12, so built from the
/// `virtiofsd` crate into target/tools/bin (where the harness looks for it).
pub const VIRTIOFSD_VERSION: &str = "1.14.0";
const VIRTIOFSD_BUILD_DEPS: &[&str] = &["libseccomp-dev", "libcap-ng-dev", "pkg-config"];

pub fn ensure_virtiofsd(sh: &Shell, install: bool) -> Result<()> {
    if have("virtiofsd") || std::env::var_os("VMDISK_VIRTIOFSD").is_some() {
        return Ok(());
    }
    let root = crate::project_root().join("target/tools");
    if root.join("bin/virtiofsd").is_file() {
        return Ok(());
    }
    let missing: Vec<&str> = VIRTIOFSD_BUILD_DEPS
        .iter()
        .copied()
        .filter(|p| !dpkg_installed(p))
        .collect();
    if !missing.is_empty() {
        if install && have("apt-get") && is_root() {
            eprintln!(
                "xtask: installing virtiofsd's build dependencies: {}",
                missing.join(" ")
            );
            cmd!(
                sh,
                "apt-get install -y -q --no-install-recommends {missing...}"
            )
            .env("DEBIAN_FRONTEND", "noninteractive")
            .run()?;
        } else if have("apt-get") {
            bail!(
                "building virtiofsd needs: {}\ninstall them with:\n    sudo apt-get install -y {}",
                missing.join(" "),
                missing.join(" ")
            );
        }
    }
    eprintln!(
        "xtask: building virtiofsd {VIRTIOFSD_VERSION} into {}",
        root.display()
    );
    cmd!(
        sh,
        "cargo install virtiofsd --version {VIRTIOFSD_VERSION} --locked --root {root}"
    )
    .run()?;
    Ok(())
}

fn dpkg_installed(pkg: &str) -> bool {
    std::process::Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("ok installed"))
        .unwrap_or(false)
}

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

/// The zig toolchain and cargo wrapper that cross-build vmdisk for macOS without an Apple
/// SDK (issue #20), pinned: PyPI's `ziglang` ships zig itself.
pub const ZIGLANG_VERSION: &str = "0.17.1";
pub const CARGO_ZIGBUILD_VERSION: &str = "0.24.1";
/// The Rust targets of the Darwin cross-builds.
pub const DARWIN_TARGETS: &[&str] = &["aarch64-apple-darwin", "x86_64-apple-darwin"];

/// `cargo-zigbuild` in a Python virtual environment under target/tools (pip, no root), and
/// the Darwin targets' standard libraries (rustup). Returns the venv's bin directory, which
/// must be on PATH for cargo-zigbuild to find zig.
pub fn ensure_zig(sh: &Shell, install: bool) -> Result<std::path::PathBuf> {
    let venv = crate::project_root().join("target/tools/zig-venv");
    let bin = venv.join("bin");
    let pinned = |sh: &Shell| -> bool {
        let pip = bin.join("pip");
        cmd!(sh, "{pip} list --format=freeze")
            .quiet()
            .ignore_stderr()
            .read()
            .map(|out| {
                out.lines()
                    .any(|l| l == format!("ziglang=={ZIGLANG_VERSION}"))
                    && out
                        .lines()
                        .any(|l| l == format!("cargo-zigbuild=={CARGO_ZIGBUILD_VERSION}"))
            })
            .unwrap_or(false)
    };
    if !pinned(sh) {
        if !install {
            bail!(
                "no cargo-zigbuild {CARGO_ZIGBUILD_VERSION} / ziglang {ZIGLANG_VERSION} in {}\n\
                 install them with:\n    python3 -m venv {} && {}/pip install \
                 ziglang=={ZIGLANG_VERSION} cargo-zigbuild=={CARGO_ZIGBUILD_VERSION}",
                venv.display(),
                venv.display(),
                bin.display()
            );
        }
        eprintln!(
            "xtask: installing zig and cargo-zigbuild into {}",
            venv.display()
        );
        if !bin.join("pip").is_file() {
            cmd!(sh, "python3 -m venv {venv}").run().map_err(|e| {
                anyhow::anyhow!(
                    "{e}\ncreating the virtual environment needs Python's venv module \
                     (Debian: apt-get install -y python3-venv)"
                )
            })?;
        }
        let pip = bin.join("pip");
        cmd!(
            sh,
            "{pip} install -q ziglang=={ZIGLANG_VERSION} cargo-zigbuild=={CARGO_ZIGBUILD_VERSION}"
        )
        .run()?;
    }
    let installed = cmd!(sh, "rustup target list --installed").quiet().read()?;
    let missing: Vec<&str> = DARWIN_TARGETS
        .iter()
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if !missing.is_empty() {
        if !install {
            bail!(
                "the Darwin targets are missing; install them with:\n    rustup target add {}",
                missing.join(" ")
            );
        }
        cmd!(sh, "rustup target add {missing...}").run()?;
    }
    Ok(bin)
}
