//! Assembling a guest from pinned Debian packages: the boot kernel, the stage-1 initramfs and
//! the shared "store" holding stage 2 and its programs.
//!
//! Assets (kernel, initramfs, store) depend only on the lock file, the stage scripts and the
//! module lists, so they are built once into the cache under a key hashed from all of those.
//! The root disk, which carries the per-run secrets (pinned host key, authorized client key),
//! is the VM runtime's (vmdisk-vm `rootfs`), built for every run.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use sha2::{Digest, Sha256};

use crate::arch::Arch;
use crate::assets::{
    Cache, Lock, LockedPackage, BUILDER_PACKAGES, GUEST_PACKAGES, TOOLCHAIN_PACKAGES,
};
use crate::cpio::CpioWriter;
use crate::{elf, kernel};

/// Stage 1 (the initramfs's `/init`).
pub const STAGE1: &str = include_str!("../../../testvms/stage-1.sh");
/// Stage 2 (`<system>/init` in the store); `@system@` is replaced by the system's store path.
pub const STAGE2: &str = include_str!("../../../testvms/stage-2.sh");

/// The markers [`STAGE1`] prints on the console, in order, on the way to stage 2 (each line
/// starts with one; details follow).
pub const STAGE1_MARKERS: &[&str] = &[
    "@@vmdisk stage1 start",
    "@@vmdisk stage1 modules-loaded",
    "@@vmdisk stage1 root-found",
    "@@vmdisk stage1 root-mounted",
    "@@vmdisk stage1 store-mounted",
    "@@vmdisk stage1 overlay-mounted",
    STAGE1_SWITCH,
];
/// The last of [`STAGE1_MARKERS`]: stage 1 hands over to stage 2.
pub const STAGE1_SWITCH: &str = "@@vmdisk stage1 switch";
/// What stage 1 prints after its failure report, just before it powers off.
pub const STAGE1_HALTED: &str = "@@vmdisk stage1 halted";
/// The start of every failure line (`@@vmdisk FAIL stage1 root: ...`).
pub const FAIL_MARKER: &str = "@@vmdisk FAIL";
/// Stage 2 attached the `vmdisk.nbd=` export as /dev/nbd0 (`... /dev/nbd0 N partitions`).
pub const STAGE2_NBD_ATTACHED: &str = "@@vmdisk stage2 nbd-attached";

/// `vmdisk-builder-init` (in the store's bin/): loads [`BUILDER_MODULES`], makes the run
/// directories the builder's tools want, and links /etc/lvm to [`LVM_CONF`]'s folder.
pub const BUILDER_INIT: &str = include_str!("../../../testvms/builder-init.sh");
/// The builder VM's lvm.conf (`<system>/etc/lvm/lvm.conf`).
const LVM_CONF: &str = include_str!("../../../testvms/lvm.conf");

/// Kernel modules the builder VM loads on demand (`vmdisk-builder-init`), kept in the store
/// rather than the initramfs so no other boot pays for them: device mapper targets for LUKS
/// and LVM (thin pools, raid and mirror LVs), the md personalities, btrfs, vfat, and the crypto
/// cryptsetup uses (dm-crypt's aes-xts, and AF_ALG for LUKS2 keyslots).
const BUILDER_MODULES: &[&str] = &[
    // The disks arrive over NBD (attached after this, not by stage 2).
    "nbd",
    "dm_mod",
    "dm_crypt",
    "dm_thin_pool",
    "dm_raid",
    "dm_mirror",
    "dm_snapshot",
    "md_mod",
    "raid0",
    "raid1",
    "raid10",
    "raid456",
    "btrfs",
    // vfat for a --copy-in onto an ESP the VM makes (on an md raid1, as in disko's
    // boot-raid1), with the code page and charsets Debian's fat defaults name.
    "vfat",
    "nls_cp437",
    "nls_ascii",
    "nls_utf8",
    "xts",
    "af_alg",
    "algif_skcipher",
    "algif_hash",
];

/// The builder VM's programs (package path -> path in the system), copied with their
/// library closure like [`PROGRAMS`].
const BUILDER_PROGRAMS: &[(&str, &str)] = &[
    ("sbin/cryptsetup", "sbin/cryptsetup"),
    ("sbin/lvm", "sbin/lvm"),
    ("sbin/dmsetup", "sbin/dmsetup"),
    ("sbin/mdadm", "sbin/mdadm"),
    ("bin/btrfs", "sbin/btrfs"),
    ("sbin/mkfs.btrfs", "sbin/mkfs.btrfs"),
    ("sbin/mke2fs", "sbin/mke2fs"),
    ("sbin/e2fsck", "sbin/e2fsck"),
    ("sbin/tune2fs", "sbin/tune2fs"),
    ("sbin/mkfs.fat", "sbin/mkfs.fat"),
    ("sbin/fsck.fat", "sbin/fsck.fat"),
    ("sbin/sgdisk", "sbin/sgdisk"),
    // For disko's own `_create` (the layout bench): bash, and a blkid that answers
    // `-o export` (busybox's does not; the store's bin/blkid stays busybox's).
    ("bin/bash", "bin/bash"),
    ("sbin/blkid", "sbin/blkid"),
];

/// Names the packages install as links to a program (in the system's sbin/ -> target).
const BUILDER_LINKS: &[(&str, &str)] = &[
    ("pvcreate", "lvm"),
    ("pvs", "lvm"),
    ("pvscan", "lvm"),
    ("pvremove", "lvm"),
    ("vgcreate", "lvm"),
    ("vgchange", "lvm"),
    ("vgs", "lvm"),
    ("vgscan", "lvm"),
    ("vgremove", "lvm"),
    ("lvcreate", "lvm"),
    ("lvchange", "lvm"),
    ("lvs", "lvm"),
    ("lvscan", "lvm"),
    ("lvremove", "lvm"),
    ("lvmconfig", "lvm"),
    ("mkfs.ext2", "mke2fs"),
    ("mkfs.ext3", "mke2fs"),
    ("mkfs.ext4", "mke2fs"),
    ("fsck.ext4", "e2fsck"),
    ("mkfs.vfat", "mkfs.fat"),
    ("mkfs.msdos", "mkfs.fat"),
    ("fsck.vfat", "fsck.fat"),
    ("fsck.btrfs", "btrfs"),
];

/// busybox udhcpc's event script (`vmdisk.net=dhcp`): apply the lease with `ip`.
const UDHCPC_SCRIPT: &str = "#!/bin/sh\n\
case \"$1\" in\n\
  deconfig) ip addr flush dev \"$interface\" ;;\n\
  bound|renew)\n\
    ip addr flush dev \"$interface\"\n\
    ip addr add \"$ip/${mask:-24}\" dev \"$interface\"\n\
    [ -n \"$router\" ] && ip route replace default via \"${router%% *}\" dev \"$interface\"\n\
    ;;\n\
esac\n\
exit 0\n";

/// Bump when the layout of built assets changes, so stale cache entries are not reused.
const ASSET_FORMAT: u32 = 1;

/// Module groups in the initramfs. Stage 1 loads `base`, then the group named by
/// `vmdisk.store=`, then `nbd` when `vmdisk.nbd=` is set; each group lists only modules that
/// earlier groups did not load, dependencies first.
const MODULE_GROUPS: &[(&str, &[&str])] = &[
    (
        "base",
        &[
            "virtio_pci",
            "virtio_blk",
            "virtio_net",
            // Entropy at once: dropbear otherwise waits ~1 s for the kernel's random pool.
            "virtio_rng",
            "ext4",
            "overlay",
        ],
    ),
    ("9p", &["9pnet_virtio", "9p"]),
    ("virtiofs", &["virtiofs"]),
    ("nbd", &["nbd"]),
    // Loaded first under vfkit (`vmdisk.backend=vfkit`): the hvc0 console and vsock.
    ("vfkit", &["virtio_console", "vmw_vsock_virtio_transport"]),
];

/// busybox applets linked into the initramfs's bin/: what stage-1.sh calls. Linked when the
/// initramfs is built, not by `busybox --install` at boot: under TCG the ~270 symlink calls
/// and the extra exec cost about 0.2 s of every boot.
const STAGE1_APPLETS: &[&str] = &[
    "[",
    "basename",
    "cat",
    "dirname",
    "dmesg",
    "echo",
    "findfs",
    "insmod",
    "ln",
    "mkdir",
    "mount",
    "poweroff",
    "printf",
    "sed",
    "sh",
    "sleep",
    "switch_root",
    "sync",
    "tail",
    "test",
    "usleep",
];

/// busybox applets linked into the store's bin/ (what stage 2, SSH sessions and rescue
/// commands use).
const APPLETS: &[&str] = &[
    "[",
    "[[",
    "awk",
    "base64",
    "basename",
    "blkid",
    "blockdev",
    "cat",
    "chmod",
    "chown",
    "chroot",
    "cmp",
    "cp",
    "cttyhack",
    "cut",
    "date",
    "dd",
    "df",
    "diff",
    "dirname",
    "dmesg",
    "du",
    "echo",
    "env",
    "expr",
    "false",
    "fdisk",
    "find",
    "findfs",
    "free",
    "fsync",
    "grep",
    "gunzip",
    "gzip",
    "head",
    "hexdump",
    "hostname",
    "id",
    "ifconfig",
    "insmod",
    "ip",
    "kill",
    "less",
    "ln",
    "losetup",
    "ls",
    "lsmod",
    "md5sum",
    "mkdir",
    "mkfifo",
    "mknod",
    "mkswap",
    "mktemp",
    "more",
    "mount",
    "mv",
    "nc",
    "od",
    "passwd",
    "pidof",
    "poweroff",
    "printf",
    "ps",
    "pwd",
    "readlink",
    "realpath",
    "reboot",
    "rm",
    "rmdir",
    "sed",
    "seq",
    "setsid",
    "sh",
    "sha256sum",
    "sha512sum",
    "sleep",
    "sort",
    "stat",
    "stty",
    "su",
    "sync",
    "tail",
    "tar",
    "tee",
    "test",
    "touch",
    "tr",
    "true",
    "truncate",
    "udhcpc",
    "umount",
    "uname",
    "uniq",
    "usleep",
    "vi",
    "wc",
    "which",
    "xargs",
    "xxd",
    "yes",
];

/// Dynamically linked programs copied into the store with their library closure
/// (path inside the package tree -> path inside the system).
const PROGRAMS: &[(&str, &str)] = &[
    ("usr/sbin/dropbear", "sbin/dropbear"),
    ("sbin/nbd-client", "sbin/nbd-client"),
];

/// Built, cached guest assets for one architecture.
#[derive(Clone, Debug)]
pub struct GuestAssets {
    pub arch: Arch,
    /// Kernel image qemu boots directly (x86_64: the uncompressed vmlinux, PVH entry).
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Host directory shared as `nix-store`.
    pub store: PathBuf,
    /// Store path of the system inside the guest, e.g. `/nix/store/<hash>-vmdisk-system`.
    pub system: String,
    pub kernel_release: String,
}

impl GuestAssets {
    /// `init=` for the kernel command line.
    pub fn init(&self) -> String {
        format!("{}/init", self.system)
    }
}

fn kernel_package(lock: &Lock, arch: Arch) -> Result<&LockedPackage> {
    lock.packages
        .iter()
        .find(|p| p.name.starts_with("linux-image-") && p.arch == arch.debian())
        .with_context(|| {
            format!(
                "the asset lock has no linux-image-* package for {} ({}); run `cargo xtask vmtest --relock`",
                arch,
                arch.debian()
            )
        })
}

fn packages(lock: &Lock, arch: Arch) -> Result<Vec<&LockedPackage>> {
    let mut v = vec![kernel_package(lock, arch)?];
    for name in GUEST_PACKAGES
        .iter()
        .chain(BUILDER_PACKAGES)
        .chain(TOOLCHAIN_PACKAGES)
    {
        v.push(lock.get(name, arch.debian())?);
    }
    Ok(v)
}

/// The cache key of the assets: everything that goes into them.
fn asset_key(arch: Arch, pkgs: &[&LockedPackage]) -> String {
    let mut h = Sha256::new();
    h.update(format!("vmdisk-assets-assets v{ASSET_FORMAT} {arch}\n"));
    for p in pkgs {
        h.update(format!(
            "{} {} {} {}\n",
            p.name, p.version, p.arch, p.sha256
        ));
    }
    h.update(STAGE1);
    h.update(STAGE2);
    for (g, mods) in MODULE_GROUPS {
        h.update(format!("{g}:{}\n", mods.join(",")));
    }
    h.update(APPLETS.join(","));
    h.update(format!("stage1 applets: {}\n", STAGE1_APPLETS.join(",")));
    h.update("modules: unsigned\n");
    h.update(UDHCPC_SCRIPT);
    for (a, b) in PROGRAMS.iter().chain(BUILDER_PROGRAMS) {
        h.update(format!("{a}>{b}\n"));
    }
    for (a, b) in BUILDER_LINKS {
        h.update(format!("{a}->{b}\n"));
    }
    h.update(format!("builder modules: {}\n", BUILDER_MODULES.join(",")));
    h.update(BUILDER_INIT);
    h.update(LVM_CONF);
    h.update("toolchain: libc6 + TOOLCHAIN_PACKAGES, whole\n");
    hex(&h.finalize())[..32].to_string()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Build (or reuse from the cache) the kernel, initramfs and store for `arch`.
pub fn prepare_assets(cache: &Cache, lock: &Lock, arch: Arch) -> Result<GuestAssets> {
    let pkgs = packages(lock, arch)?;
    let key = asset_key(arch, &pkgs);
    let dir = cache.root().join("guest").join(format!("{arch}-{key}"));
    let system = format!("/nix/store/{key}-vmdisk-system");
    let manifest = dir.join("kernel-release");
    if !manifest.is_file() {
        build_assets(cache, &pkgs, arch, &dir, &key)
            .with_context(|| format!("building the {arch} guest assets"))?;
    }
    let kernel_release = fs::read_to_string(&manifest)?.trim().to_string();
    Ok(GuestAssets {
        arch,
        kernel: dir.join("kernel"),
        initrd: dir.join("initrd.img"),
        store: dir.join("store"),
        system,
        kernel_release,
    })
}

fn build_assets(
    cache: &Cache,
    pkgs: &[&LockedPackage],
    arch: Arch,
    dir: &Path,
    key: &str,
) -> Result<()> {
    let parent = dir.parent().expect("guest dir has a parent");
    fs::create_dir_all(parent)?;
    let tmp = tempfile::Builder::new()
        .prefix(".building-")
        .tempdir_in(parent)?;
    let out = tmp.path();

    // Kernel.
    let kpkg = cache.unpacked(pkgs[0])?;
    let release = kernel::kernel_release(&kpkg)?;
    let vmlinuz = fs::read(kpkg.join(format!("boot/vmlinuz-{release}")))
        .with_context(|| format!("reading boot/vmlinuz-{release} of {}", pkgs[0].name))?;
    let image = kernel::boot_image(arch, &vmlinuz)?;
    fs::write(out.join("kernel"), image)?;

    // Initramfs: busybox, modules in load order, stage 1.
    let busybox = fs::read(
        cache
            .unpacked(find(pkgs, "busybox-static")?)?
            .join("bin/busybox"),
    )
    .context("reading busybox from busybox-static")?;
    let modroot = kernel::modules_dir(&kpkg)?;
    let mut initrd = Vec::new();
    {
        let mut w = CpioWriter::new(&mut initrd);
        for d in [
            "bin",
            "dev",
            "proc",
            "sys",
            "mnt-root",
            "lib",
            "lib/modules",
        ] {
            w.dir(d, 0o755)?;
        }
        w.file("bin/busybox", 0o755, &busybox)?;
        for a in STAGE1_APPLETS {
            w.symlink(&format!("bin/{a}"), "busybox")?;
        }
        w.file("init", 0o755, STAGE1.as_bytes())?;
        let mut loaded: Vec<PathBuf> = Vec::new();
        for (group, wanted) in MODULE_GROUPS {
            let order = kernel::load_order(&modroot, wanted)
                .with_context(|| format!("module group {group}"))?;
            let mut list = String::new();
            for m in order {
                // The vfkit group loads before base, so it lists its whole closure.
                if loaded.contains(&m) && *group != "vfkit" {
                    continue;
                }
                // Named as the kernel names the module (`_`, not `-`), so stage 1 can see in
                // /sys/module whether it is loaded already.
                let name = m
                    .file_name()
                    .and_then(|n| n.to_str())
                    .context("module file name")?
                    .replace('-', "_");
                if !loaded.contains(&m) {
                    let bytes = fs::read(modroot.join(&m)).or_else(|_| fs::read(&m))?;
                    let bytes = kernel::strip_module_signature(&bytes)
                        .with_context(|| format!("module {}", m.display()))?;
                    w.file(&format!("lib/modules/{name}"), 0o644, bytes)?;
                    loaded.push(m);
                }
                list.push_str(&name);
                list.push('\n');
            }
            w.file(
                &format!("lib/modules/load-order.{group}"),
                0o644,
                list.as_bytes(),
            )?;
        }
        w.finish()?;
    }
    fs::write(out.join("initrd.img"), initrd)?;

    // Store: <key>-vmdisk-system with stage 2, busybox + applets, programs + libraries.
    let sys = out.join("store").join(format!("{key}-vmdisk-system"));
    let system_path = format!("/nix/store/{key}-vmdisk-system");
    fs::create_dir_all(sys.join("bin"))?;
    fs::create_dir_all(sys.join("sbin"))?;
    fs::write(sys.join("bin/busybox"), &busybox)?;
    fs::set_permissions(sys.join("bin/busybox"), fs::Permissions::from_mode(0o755))?;
    for a in APPLETS {
        symlink("busybox", sys.join("bin").join(a))?;
    }
    let udhcpc = sys.join("udhcpc.script");
    fs::write(&udhcpc, UDHCPC_SCRIPT)?;
    fs::set_permissions(&udhcpc, fs::Permissions::from_mode(0o755))?;
    let init = sys.join("init");
    fs::write(&init, STAGE2.replace("@system@", &system_path))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;

    let sysroot = cache.sysroot_of(&pkgs[1..])?;
    let all_programs = || PROGRAMS.iter().chain(BUILDER_PROGRAMS);
    let programs: Vec<PathBuf> = all_programs().map(|(src, _)| PathBuf::from(src)).collect();
    for (src, dst) in all_programs() {
        copy_file(&sysroot.join(src), &sys.join(dst))?;
    }
    for (link, target) in BUILDER_LINKS {
        symlink(target, sys.join("sbin").join(link))?;
    }
    install_builder(&sys, &system_path, &modroot)?;
    for rel in elf::library_closure(&sysroot, arch, &programs)? {
        copy_entry(&sysroot, &rel, &sys)?;
    }
    // The native toolchain (tcc + the C library's headers, start files and libraries) goes in
    // whole: tcc finds them at Debian's paths, which the root disk links into the store.
    for name in ["libc6"].iter().chain(TOOLCHAIN_PACKAGES) {
        let root = cache.unpacked(find(pkgs, name)?)?;
        copy_tree(&root, Path::new(""), &sys)
            .with_context(|| format!("copying {name} into the store"))?;
    }
    fs::write(out.join("kernel-release"), format!("{release}\n"))?;

    let staged = tmp.keep();
    match fs::rename(&staged, dir) {
        Ok(()) => Ok(()),
        // Someone else finished the same key first: theirs is identical.
        Err(_) if dir.join("kernel-release").is_file() => {
            let _ = fs::remove_dir_all(&staged);
            Ok(())
        }
        Err(e) => {
            let _ = fs::remove_dir_all(&staged);
            Err(e).with_context(|| format!("moving built assets to {}", dir.display()))
        }
    }
}

/// The builder VM's part of the store: `bin/vmdisk-builder-init`, `etc/lvm/lvm.conf` and
/// `lib/vmdisk-modules/` (the modules, unsigned, and their `load-order`).
fn install_builder(sys: &Path, system_path: &str, modroot: &Path) -> Result<()> {
    let init = sys.join("bin/vmdisk-builder-init");
    fs::write(&init, BUILDER_INIT.replace("@system@", system_path))?;
    fs::set_permissions(&init, fs::Permissions::from_mode(0o755))?;
    fs::create_dir_all(sys.join("etc/lvm"))?;
    fs::write(sys.join("etc/lvm/lvm.conf"), LVM_CONF)?;
    let mods = sys.join("lib/vmdisk-modules");
    fs::create_dir_all(&mods)?;
    let mut list = String::new();
    for m in kernel::load_order(modroot, BUILDER_MODULES).context("the builder's modules")? {
        let name = m
            .file_name()
            .and_then(|n| n.to_str())
            .context("module file name")?
            .replace('-', "_");
        let bytes = fs::read(modroot.join(&m)).or_else(|_| fs::read(&m))?;
        let bytes = kernel::strip_module_signature(&bytes)
            .with_context(|| format!("module {}", m.display()))?;
        fs::write(mods.join(&name), bytes)?;
        list.push_str(&name);
        list.push('\n');
    }
    fs::write(mods.join("load-order"), list)?;
    Ok(())
}

fn find<'a>(pkgs: &[&'a LockedPackage], name: &str) -> Result<&'a LockedPackage> {
    pkgs.iter()
        .copied()
        .find(|p| p.name == name)
        .with_context(|| format!("package {name} is not in the asset set"))
}

fn copy_file(src: &Path, dst: &Path) -> Result<()> {
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    fs::copy(src, dst).with_context(|| format!("copying {}", src.display()))?;
    Ok(())
}

/// Copy `rel` (a file or a symlink, as found in `from`) to the same relative path under `to`.
fn copy_entry(from: &Path, rel: &Path, to: &Path) -> Result<()> {
    let src = from.join(rel);
    let dst = to.join(rel);
    if dst.symlink_metadata().is_ok() {
        return Ok(());
    }
    if let Some(p) = dst.parent() {
        fs::create_dir_all(p)?;
    }
    let md = src
        .symlink_metadata()
        .with_context(|| format!("{}", src.display()))?;
    if md.file_type().is_symlink() {
        symlink(fs::read_link(&src)?, &dst)?;
    } else {
        fs::copy(&src, &dst).with_context(|| format!("copying {}", src.display()))?;
    }
    Ok(())
}

/// Copy `from/rel` recursively into `to/rel` (files, dirs, symlinks), skipping documentation
/// and entries already present.
fn copy_tree(from: &Path, rel: &Path, to: &Path) -> Result<()> {
    let src = from.join(rel);
    for e in fs::read_dir(&src).with_context(|| format!("{}", src.display()))? {
        let e = e?;
        let r = rel.join(e.file_name());
        if r.starts_with("usr/share") || r.starts_with("etc") {
            continue;
        }
        let ft = e.file_type()?;
        if ft.is_dir() {
            fs::create_dir_all(to.join(&r))?;
            copy_tree(from, &r, to)?;
        } else {
            copy_entry(from, &r, to)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Where `echo "MARKER` is in `script` (a comment mentioning it does not count).
    fn printed_at(script: &str, marker: &str) -> Option<usize> {
        script.find(&format!("echo \"{marker}"))
    }

    #[test]
    fn stage_scripts_print_the_markers_the_harness_waits_for_in_order() {
        let mut last = 0;
        for m in STAGE1_MARKERS {
            let at = printed_at(STAGE1, m).unwrap_or_else(|| panic!("stage-1.sh never prints {m}"));
            assert!(
                at > last,
                "stage-1.sh prints {m} before the marker listed ahead of it"
            );
            last = at;
        }
        assert_eq!(STAGE1_MARKERS.last(), Some(&STAGE1_SWITCH));
        assert!(printed_at(STAGE1, STAGE1_HALTED).is_some());
        assert!(printed_at(STAGE1, &format!("{FAIL_MARKER} stage1 ")).is_some());
        assert!(printed_at(STAGE2, &format!("{FAIL_MARKER} stage2 ")).is_some());
        assert!(printed_at(STAGE2, STAGE2_NBD_ATTACHED).is_some());
        assert!(STAGE2.starts_with("#!@system@/bin/sh\n"));
    }

    /// The words of `script` in command position (after a line start, `;`, `|`, `&&`, `||`,
    /// `(`, or a keyword that starts a command list), comments and quoted text dropped; a
    /// `$(...)`, even inside double quotes, is a command of its own.
    fn commands(script: &str) -> Vec<String> {
        let mut out = Vec::new();
        for line in script.lines() {
            let line = line.trim_start();
            if line.starts_with('#') {
                continue;
            }
            let mut pieces = vec![line];
            let mut rest = line;
            while let Some(i) = rest.find("$(") {
                rest = &rest[i + 2..];
                // `$((...))` is arithmetic, not a command.
                if !rest.starts_with('(') {
                    pieces.push(rest.split(')').next().unwrap_or(rest));
                }
            }
            for piece in pieces {
                command_words(piece, &mut out);
            }
        }
        out
    }

    fn command_words(piece: &str, out: &mut Vec<String>) {
        // Drop quoted text: a command inside quotes is only printed.
        let mut bare = String::new();
        let mut quote = None;
        for c in piece.chars() {
            match (quote, c) {
                (None, '\'' | '"') => quote = Some(c),
                (Some(q), c) if c == q => quote = None,
                (None, _) => bare.push(c),
                _ => {}
            }
        }
        let bare = bare
            .replace(">&", ">")
            .replace("$((", "$")
            .replace("$(", " ; ")
            .replace(['(', '|', '&', ';'], " ; ");
        let mut at_start = true;
        for word in bare.split_whitespace() {
            if word == ";" {
                at_start = true;
                continue;
            }
            if at_start {
                if !["then", "do", "else", "if", "while", "!", "exec"].contains(&word) {
                    at_start = false;
                }
                let is_name = word
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c == '_' || c == '[' || c == '!');
                if is_name {
                    out.push(word.to_string());
                }
            }
        }
    }

    #[test]
    fn the_initramfs_links_every_applet_stage1_calls() {
        const SHELL: &[&str] = &[
            "then", "do", "done", "else", "fi", "esac", "case", "for", "while", "if", "export",
            "return", "exit", "continue", "break", "in", "read", "[[", "exec", "!",
        ];
        let functions: Vec<&str> = STAGE1
            .lines()
            .filter_map(|l| l.strip_suffix("() {"))
            .collect();
        assert!(functions.contains(&"say") && functions.contains(&"fail"));
        let calls = commands(STAGE1);
        for must in ["mount", "insmod", "findfs", "switch_root", "usleep", "sed"] {
            assert!(
                calls.iter().any(|c| c == must),
                "{must} not seen in {calls:?}"
            );
        }
        for c in &calls {
            assert!(
                SHELL.contains(&c.as_str())
                    || functions.contains(&c.as_str())
                    || STAGE1_APPLETS.contains(&c.as_str()),
                "stage-1.sh calls {c}, which the initramfs does not link to busybox"
            );
        }
        assert!(
            !STAGE1.contains("--install"),
            "the applets are linked when the initramfs is built"
        );
    }

    #[test]
    fn applets_cover_what_the_stage_scripts_call() {
        for cmd in [
            "sh", "mount", "ip", "hostname", "chown", "chmod", "sleep", "poweroff", "sync",
            "blockdev", "setsid", "cttyhack", "grep", "ls", "cat", "mkdir",
        ] {
            assert!(APPLETS.contains(&cmd), "{cmd} is not linked into the store");
        }
        let mut sorted = APPLETS.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), APPLETS.len());
    }
}
