//! The vfkit backend (macOS): a test VM definition -> a vfkit command line and launcher script.
//!
//! vfkit (crc-org/vfkit) runs Linux guests on Apple's Virtualization framework. Every flag this
//! module emits is documented in vfkit's `doc/usage.md` (cited next to each); the reading of
//! those docs is summarised here because the differences from qemu decide what a guest needs:
//!
//! ```text
//!  qemu backend (crate::qemu)               vfkit backend (this module)
//!  -kernel vmlinux / Image                  --bootloader linux,kernel=K,initrd=I,cmdline="..."
//!                                             (arm64: uncompressed Image, vfkit refuses others)
//!  console=ttyS0 / ttyAMA0                  console=hvc0 + --device virtio-serial,logFilePath=
//!  -virtfs ... mount_tag=nix-store (9p)     --device virtio-fs,sharedDir=,mountTag=nix-store
//!                                             (no 9p at all: stage 1 must mount virtiofs)
//!  -drive format=qcow2|raw                  --device virtio-blk,path=RAW  (raw images only)
//!                                           --device nbd,uri=nbd://...    (e.g. `vmdisk serve`)
//!  hostfwd tcp:127.0.0.1:PORT-:22           --device virtio-vsock,port=22,socketURL=,connect
//!                                             or NAT + the DHCP lease in /var/db/dhcpd_leases
//!  QMP socket                               --restful-uri unix:///PATH
//!  TCG for a foreign arch                   nothing: the guest arch must be the host's
//! ```
//!
//! vfkit splits `--device` values on every comma with no escaping, and `--bootloader` values
//! on commas outside double quotes, so [`args`] refuses values that would be split (a comma in
//! a path, a `"` in the kernel command line) instead of emitting an argv vfkit misreads.
//!
//! [`preflight`] and [`from_def`] refuse what cannot boot under vfkit (a 9p store, a qcow2
//! disk file, a compressed arm64 kernel) with the fix; [`args`] is pure; [`script`] wraps the
//! argv in a POSIX sh launcher. Errors are `anyhow` (this is harness code).

use std::collections::BTreeSet;
use std::fmt::Write as _;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use sha2::{Digest, Sha256};

use crate::def::{StoreKind, VmDef};
use crate::Arch;

/// Longest unix socket path macOS accepts: `sun_path` is 104 bytes including the NUL (vfkit
/// checks the REST socket against the same limit before listening).
pub const MAX_SOCKET_PATH_LEN: usize = 103;
/// Longest virtio-fs mount tag: the virtio-fs config space `tag` field is 36 bytes.
pub const MAX_MOUNT_TAG_LEN: usize = 36;
/// The vsock port the guest's SSH server listens on in [`VfkitSsh::Vsock`] setups.
pub const SSH_VSOCK_PORT: u32 = 22;
/// `/dev/disk/by-id/virtio-root` in the guest, as the qemu backend's `serial=root`.
pub const ROOT_DEVICE_ID: &str = "root";
/// The mount tag stage 1 mounts on /nix/.ro-store.
pub const STORE_TAG: &str = "nix-store";
/// URI schemes vfkit accepts for `--device nbd,uri=` (the NBD URI spec's four).
const NBD_SCHEMES: &[&str] = &["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"];
/// The first 4 bytes of a qcow2 image.
const QCOW2_MAGIC: &[u8] = b"QFI\xfb";
/// arm64 `Image` magic and its offset (the check vfkit itself makes on Apple silicon).
const ARM64_IMAGE_MAGIC: &[u8] = b"ARM\x64";
const ARM64_IMAGE_MAGIC_OFF: usize = 0x38;

/// The guest's disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfkitDisk {
    /// A raw image file (vfkit's virtio-blk takes nothing else).
    Raw(PathBuf),
    /// An NBD export, e.g. from `vmdisk serve` (any image format, qcow2 included). Needs a vfkit
    /// release that documents `--device nbd` (0.6.0 and later) and macOS 14 or later (Apple's
    /// NBD attachment, VZNetworkBlockDeviceStorageDeviceAttachment, appeared in macOS 14).
    Nbd { uri: String },
}

/// How the host reaches the guest's SSH server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VfkitSsh {
    /// The host connects to guest vsock `port` through the unix socket `socket` that vfkit
    /// creates (`ssh -o ProxyCommand='nc -U SOCKET' ...`). The guest must accept SSH on that
    /// vsock port.
    Vsock { port: u32, socket: PathBuf },
    /// Over the NAT network: the guest's address is its DHCP lease in /var/db/dhcpd_leases,
    /// found by [`VfkitSpec::mac`].
    Nat,
}

/// Everything that decides a vfkit command line.
#[derive(Clone, Debug)]
pub struct VfkitSpec {
    /// The guest's architecture; vfkit boots only the host's.
    pub arch: Arch,
    pub cpus: u32,
    pub memory_mib: u32,
    /// aarch64: the uncompressed arm64 `Image` (vfkit refuses compressed kernels on Apple
    /// silicon). x86_64 (Intel Macs): vfkit's docs state no format requirement; the
    /// distribution's bzImage (`vmlinuz`) is what their Intel examples boot.
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// Kernel command line; [`args`] appends `console=hvc0` unless it is already the last
    /// `console=`.
    pub cmdline: String,
    pub disk: VfkitDisk,
    /// virtio-fs shares: (mount tag, host directory).
    pub shares: Vec<(String, PathBuf)>,
    /// vfkit writes the guest's hvc0 console here.
    pub serial_log: PathBuf,
    /// vfkit's REST API listens on this unix socket.
    pub rest_socket: PathBuf,
    pub ssh: VfkitSsh,
    /// MAC address of the NAT network card (`aa:bb:cc:dd:ee:ff`), so the DHCP lease can be
    /// found again; [`mac_for`] derives a stable one from the VM's name.
    pub mac: String,
}

/// What [`from_def`] needs besides the definition: the built guest assets and where the
/// run's files go.
#[derive(Clone, Debug)]
pub struct VfkitInputs {
    /// See [`VfkitSpec::kernel`].
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line (`init=... vmdisk.root=... vmdisk.store=virtiofs`).
    pub append: String,
    pub disk: VfkitDisk,
    /// Host directory shared as `nix-store`.
    pub store: PathBuf,
    /// Folder for `serial.log` and `rest.sock` (and `ssh.sock` if the caller puts it there).
    pub run_dir: PathBuf,
    pub ssh: VfkitSsh,
}

/// Refuse a definition that cannot boot its disk file under vfkit, naming each fix: a store
/// mounted over 9p (vfkit has only virtio-fs) and a qcow2 disk (vfkit takes raw images).
/// A qcow2 disk can still boot over NBD: see [`from_def`] with [`VfkitDisk::Nbd`].
pub fn preflight(def: &VmDef) -> Result<()> {
    let mut problems = Vec::new();
    problems.extend(store_problem(def));
    if def.disk_format == "qcow2" {
        problems.push(qcow2_problem(Path::new("disk.qcow2")));
    }
    report(def, problems)
}

/// The vfkit spec for `def`: the `nix-store` share over virtio-fs, the serial log and REST
/// socket in `inputs.run_dir`, a MAC derived from the name. Refuses a 9p store, a qcow2 disk
/// file (by the definition or by the file's magic, when the file exists) and, for aarch64, a
/// kernel file that is not an uncompressed arm64 `Image`.
pub fn from_def(def: &VmDef, inputs: VfkitInputs) -> Result<VfkitSpec> {
    let mut problems = Vec::new();
    problems.extend(store_problem(def));
    if problems.is_empty()
        && inputs
            .append
            .split_whitespace()
            .any(|t| t == "vmdisk.store=9p")
    {
        problems.push(format!(
            "the kernel command line says `vmdisk.store=9p`, but vfkit offers only virtio-fs \
             for the `{STORE_TAG}` share. Fix: pass `vmdisk.store=virtiofs`"
        ));
    }
    if let VfkitDisk::Raw(path) = &inputs.disk {
        if def.disk_format == "qcow2" || file_starts_with(path, 0, QCOW2_MAGIC) {
            problems.push(qcow2_problem(path));
        }
    }
    if def.arch == Arch::Aarch64
        && inputs.kernel.is_file()
        && !file_starts_with(&inputs.kernel, ARM64_IMAGE_MAGIC_OFF, ARM64_IMAGE_MAGIC)
    {
        problems.push(format!(
            "{} is not an uncompressed arm64 Image (no \"ARM\\x64\" magic at 0x38), and vfkit \
             refuses compressed kernels on Apple silicon. Fix: boot the uncompressed Image \
             (NixOS: the system's `kernel` is one; Debian's vmlinuz: \
             `vmdisk_vm::kernel::boot_image`)",
            inputs.kernel.display()
        ));
    }
    report(def, problems)?;

    let abs = |p: &Path| {
        std::path::absolute(p).with_context(|| format!("making {} absolute", p.display()))
    };
    let disk = match inputs.disk {
        VfkitDisk::Raw(p) => VfkitDisk::Raw(abs(&p)?),
        nbd @ VfkitDisk::Nbd { .. } => nbd,
    };
    let ssh = match inputs.ssh {
        VfkitSsh::Vsock { port, socket } => VfkitSsh::Vsock {
            port,
            socket: abs(&socket)?,
        },
        VfkitSsh::Nat => VfkitSsh::Nat,
    };
    let run_dir = abs(&inputs.run_dir)?;
    Ok(VfkitSpec {
        arch: def.arch,
        cpus: def.cpus,
        memory_mib: def.memory_mib,
        kernel: abs(&inputs.kernel)?,
        initrd: abs(&inputs.initrd)?,
        cmdline: inputs.append,
        disk,
        shares: vec![(STORE_TAG.to_string(), abs(&inputs.store)?)],
        serial_log: run_dir.join("serial.log"),
        rest_socket: run_dir.join("rest.sock"),
        ssh,
        mac: mac_for(&def.name),
    })
}

/// A stable, locally administered unicast MAC for the VM `name`. Every octet is at least
/// 0x10, so it reads the same with or without leading zeros (searching the DHCP lease file
/// by it cannot miss).
pub fn mac_for(name: &str) -> String {
    let h = Sha256::digest(format!("vmdisk vfkit mac {name}").as_bytes());
    // 0x5a: locally administered (bit 1 set), unicast (bit 0 clear), >= 0x10.
    let mut octets = vec![0x5a_u8];
    // Setting bit 4 makes every octet >= 0x10.
    octets.extend(h[..5].iter().map(|b| b | 0x10));
    octets
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// `cmdline` with `console=hvc0` (vfkit's virtio-serial console) as its last `console=`, so
/// /dev/console, where stage 1 prints its markers, is the console vfkit logs.
pub fn with_hvc0_console(cmdline: &str) -> String {
    let cmdline = cmdline.trim();
    let last = cmdline
        .split_whitespace()
        .rfind(|t| t.starts_with("console="));
    match last {
        Some("console=hvc0") => cmdline.to_string(),
        _ if cmdline.is_empty() => "console=hvc0".to_string(),
        _ => format!("{cmdline} console=hvc0"),
    }
}

/// vfkit's argv for `spec` on a `host` of that architecture, without the program name.
pub fn args(spec: &VfkitSpec, host: Arch) -> Result<Vec<String>> {
    if spec.arch != host {
        bail!(
            "vfkit cannot boot the {} guest on this {} Mac: Apple's Virtualization framework runs \
             guests of the host's architecture only and emulates no CPU (Rosetta runs x86_64 \
             programs inside an aarch64 Linux guest, not an x86_64 kernel). Build a {} guest, \
             or boot this one with the qemu backend (TCG emulation)",
            spec.arch,
            host,
            host
        );
    }
    ensure!(spec.cpus >= 1, "cpus = 0: a VM needs at least one vCPU");
    ensure!(spec.memory_mib >= 1, "memory_mib = 0: a VM needs memory");

    let kernel = boot_path("kernel", &spec.kernel)?;
    let initrd = boot_path("initrd", &spec.initrd)?;
    let cmdline = with_hvc0_console(&spec.cmdline);
    if let Some(c) = cmdline.chars().find(|c| *c == '"' || c.is_control()) {
        bail!(
            "the kernel command line contains {c:?}: vfkit takes it inside double quotes \
             (`cmdline=\"...\"`) and cannot carry a quote or control character"
        );
    }

    let mut a: Vec<String> = Vec::new();
    let mut push = |flag: &str, value: String| {
        a.push(flag.to_string());
        a.push(value);
    };

    // doc/usage.md "Virtual Machine Resources": --cpus N, --memory MiB.
    push("--cpus", spec.cpus.to_string());
    push("--memory", spec.memory_mib.to_string());
    // doc/usage.md "Linux bootloader": kernel=, initrd=, cmdline= enclosed in `"`.
    push(
        "--bootloader",
        format!("linux,kernel={kernel},initrd={initrd},cmdline=\"{cmdline}\""),
    );
    match &spec.disk {
        VfkitDisk::Raw(path) => {
            let path = device_path("disk image", path)?;
            // doc/usage.md "Disk": virtio-blk, path= (absolute, raw), deviceId=.
            push(
                "--device",
                format!("virtio-blk,path={path},deviceId={ROOT_DEVICE_ID}"),
            );
        }
        VfkitDisk::Nbd { uri } => {
            let uri = nbd_uri(uri)?;
            // doc/usage.md "Network Block Device": nbd, uri=, deviceId=.
            push(
                "--device",
                format!("nbd,uri={uri},deviceId={ROOT_DEVICE_ID}"),
            );
        }
    }
    let mut tags = BTreeSet::new();
    for (tag, dir) in &spec.shares {
        let tag = mount_tag(tag)?;
        ensure!(tags.insert(tag), "two shares use the mount tag {tag:?}");
        let dir = device_path("shared directory", dir)?;
        // doc/usage.md "File Sharing": virtio-fs, sharedDir= (absolute), mountTag=.
        push(
            "--device",
            format!("virtio-fs,sharedDir={dir},mountTag={tag}"),
        );
    }
    let mac = mac_address(&spec.mac)?;
    // doc/usage.md "Networking": virtio-net, nat, mac=.
    push("--device", format!("virtio-net,nat,mac={mac}"));
    if let VfkitSsh::Vsock { port, socket } = &spec.ssh {
        ensure!(*port != 0, "vsock port 0: vfkit needs a port number");
        let socket = socket_path("vsock socket", socket)?;
        // doc/usage.md "virtio-vsock communication": port=, socketURL=, connect (the host
        // connects to the guest's port through the unix socket).
        push(
            "--device",
            format!("virtio-vsock,port={port},socketURL={socket},connect"),
        );
    }
    let log = device_path("serial log", &spec.serial_log)?;
    // doc/usage.md "Serial Port": virtio-serial, logFilePath=.
    push("--device", format!("virtio-serial,logFilePath={log}"));
    // doc/usage.md "Random Number Generator": virtio-rng.
    push("--device", "virtio-rng".to_string());
    let rest = socket_path("REST socket", &spec.rest_socket)?;
    if let Some(c) = rest.chars().find(|c| matches!(c, '%' | '?' | '#')) {
        bail!("REST socket {rest}: {c:?} would be read as part of the URI, not the path");
    }
    // doc/usage.md "Generic Options": --restful-uri, scheme unix, then the socket path.
    push("--restful-uri", format!("unix://{rest}"));
    Ok(a)
}

/// A POSIX sh script that starts vfkit for `spec` (what a macOS user runs). It creates the
/// folders of the log and sockets, removes stale sockets of an earlier run, and `exec`s
/// `${VFKIT:-vfkit}` with every argument single-quoted; its own arguments go on to vfkit.
pub fn script(spec: &VfkitSpec, host: Arch) -> Result<String> {
    let argv = args(spec, host)?;
    let mut s = String::new();
    s.push_str("#!/bin/sh\n");
    s.push_str("# Boots a vmdisk test VM with vfkit (Apple Virtualization framework).\n");
    s.push_str("# Generated by vmdisk-vm's vfkit backend; flags: crc-org/vfkit doc/usage.md.\n");
    s.push_str("# VFKIT names the vfkit binary; arguments to this script are passed to vfkit.\n");
    let _ = writeln!(s, "# Console: {}", sh_word(&path_str(&spec.serial_log)?));
    match &spec.ssh {
        VfkitSsh::Vsock { port, socket } => {
            let proxy = format!("ProxyCommand=nc -U {}", sh_word(&path_str(socket)?));
            let _ = writeln!(s, "# SSH: ssh -o {} root@vm", sh_word(&proxy));
            let _ = writeln!(s, "#   (the guest must accept SSH on vsock port {port})");
        }
        VfkitSsh::Nat => {
            let _ = writeln!(
                s,
                "# SSH: ssh root@IP, IP from the DHCP lease of MAC {}:",
                spec.mac
            );
            let _ = writeln!(
                s,
                "#   awk -v RS='}}' '/{}/' /var/db/dhcpd_leases | grep ip_address",
                spec.mac
            );
        }
    }
    s.push_str("set -eu\n");

    let mut sockets = vec![&spec.rest_socket];
    if let VfkitSsh::Vsock { socket, .. } = &spec.ssh {
        sockets.push(socket);
    }
    let mut dirs = BTreeSet::new();
    for p in sockets.iter().copied().chain([&spec.serial_log]) {
        if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(path_str(d)?);
        }
    }
    for d in &dirs {
        let _ = writeln!(s, "mkdir -p -- {}", sh_quote(d));
    }
    for p in sockets {
        let q = sh_quote(&path_str(p)?);
        let _ = writeln!(s, "if [ -S {q} ]; then rm -f -- {q}; fi");
    }
    s.push_str("exec \"${VFKIT:-vfkit}\" \\\n");
    for pair in argv.chunks(2) {
        let words: Vec<String> = pair.iter().map(|w| sh_quote(w)).collect();
        let _ = writeln!(s, "    {} \\", words.join(" "));
    }
    s.push_str("    \"$@\"\n");
    Ok(s)
}

/// `value` in single quotes for a POSIX shell (a `'` inside becomes `'\''`).
pub fn sh_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', "'\\''"))
}

/// `value` bare when it is one plain shell word, else [`sh_quote`]d (for readable comments).
fn sh_word(value: &str) -> String {
    let plain = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "@%+=:,./_-".contains(c));
    if plain {
        value.to_string()
    } else {
        sh_quote(value)
    }
}

fn store_problem(def: &VmDef) -> Option<String> {
    (def.store == StoreKind::NineP).then(|| {
        format!(
            "stage 1 mounts the `{STORE_TAG}` share over 9p (store = \"9p\"), but vfkit has no \
             9p device, only virtio-fs: the guest would stop with `9pnet_virtio: no channels \
             available for device {STORE_TAG}`. Fix: set `store = \"virtiofs\"` in the test VM \
             definition; vfkit then exports the store with `--device virtio-fs,sharedDir=...,\
             mountTag={STORE_TAG}`. For a NixOS guest, mount the `{STORE_TAG}` share with \
             fsType \"virtiofs\" instead of \"9p\" (for example through \
             `virtualisation.fileSystems.\"/nix/.ro-store\".fsType = \"virtiofs\"`; check the \
             option names of your nixpkgs) and have the virtiofs module in the initrd"
        )
    })
}

fn qcow2_problem(disk: &Path) -> String {
    let raw = disk.with_extension("raw");
    format!(
        "the disk {} is qcow2, and vfkit's virtio-blk takes raw images only. Fix: `vmdisk \
         convert -O raw {} {}` (or build it raw: `disk_format = \"raw\"`, `vmdisk create -f \
         raw`), or export it with `vmdisk serve` and attach it with `--device nbd` (macOS 14+)",
        disk.display(),
        sh_word(&disk.to_string_lossy()),
        sh_word(&raw.to_string_lossy())
    )
}

fn report(def: &VmDef, problems: Vec<String>) -> Result<()> {
    match problems.len() {
        0 => Ok(()),
        1 => bail!(
            "test VM `{}` cannot boot under vfkit: {}",
            def.name,
            problems[0]
        ),
        _ => bail!(
            "test VM `{}` cannot boot under vfkit:\n  - {}",
            def.name,
            problems.join("\n  - ")
        ),
    }
}

/// Whether the file at `path` has `magic` at `off` (false when it cannot be read).
fn file_starts_with(path: &Path, off: usize, magic: &[u8]) -> bool {
    let mut buf = vec![0u8; off + magic.len()];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok_and(|()| &buf[off..] == magic)
}

fn path_str(p: &Path) -> Result<String> {
    match p.to_str() {
        Some(s) if !s.is_empty() => Ok(s.to_string()),
        Some(_) => bail!("an empty path"),
        None => bail!("{}: not UTF-8", p.display()),
    }
}

/// An absolute path that survives vfkit's option parsing, which splits on every comma.
fn device_path(what: &str, p: &Path) -> Result<String> {
    let s = path_str(p).with_context(|| format!("{what} path"))?;
    ensure!(p.is_absolute(), "{what} {s}: vfkit needs an absolute path");
    if let Some(c) = s.chars().find(|c| *c == ',' || c.is_control()) {
        bail!(
            "{what} {s}: contains {c:?}, which vfkit's comma-separated --device options cannot \
             carry (there is no escape); move or link it to a path without one"
        );
    }
    Ok(s)
}

/// A `--bootloader linux` path: also no `"` (vfkit's quote handling there).
fn boot_path(what: &str, p: &Path) -> Result<String> {
    let s = device_path(what, p)?;
    ensure!(
        !s.contains('"'),
        "{what} {s}: contains '\"', which vfkit's --bootloader parsing treats as a quote"
    );
    Ok(s)
}

fn socket_path(what: &str, p: &Path) -> Result<String> {
    let s = device_path(what, p)?;
    ensure!(
        s.len() <= MAX_SOCKET_PATH_LEN,
        "{what} {s}: {} bytes, macOS allows unix socket paths of at most {MAX_SOCKET_PATH_LEN}; \
         use a shorter run folder (e.g. under /tmp)",
        s.len()
    );
    Ok(s)
}

fn mount_tag(tag: &str) -> Result<&str> {
    ensure!(
        !tag.is_empty() && tag.len() <= MAX_MOUNT_TAG_LEN,
        "mount tag {tag:?}: expected 1..={MAX_MOUNT_TAG_LEN} bytes"
    );
    ensure!(
        !tag.chars()
            .any(|c| c == ',' || c.is_whitespace() || c.is_control()),
        "mount tag {tag:?}: no commas, spaces or control characters"
    );
    Ok(tag)
}

fn nbd_uri(uri: &str) -> Result<&str> {
    ensure!(
        NBD_SCHEMES.iter().any(|s| uri.starts_with(s)),
        "NBD URI {uri:?}: vfkit takes nbd://, nbds://, nbd+unix:// or nbds+unix:// URIs \
         (e.g. nbd://127.0.0.1:10809 for `vmdisk serve --tcp 127.0.0.1:10809`)"
    );
    ensure!(
        !uri.chars()
            .any(|c| c == ',' || c.is_whitespace() || c.is_control()),
        "NBD URI {uri:?}: no commas or spaces (vfkit splits --device options on commas)"
    );
    Ok(uri)
}

fn mac_address(mac: &str) -> Result<&str> {
    let ok = mac.len() == 17
        && mac.split(':').count() == 6
        && mac
            .split(':')
            .all(|o| o.len() == 2 && o.chars().all(|c| c.is_ascii_hexdigit()));
    ensure!(
        ok,
        "MAC address {mac:?}: expected six hex octets, aa:bb:cc:dd:ee:ff"
    );
    Ok(mac)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def(extra: &str) -> VmDef {
        VmDef::parse(
            &format!("name = \"t\"\narch = \"aarch64\"\nlayout = \"l.json\"\n{extra}"),
            Path::new("/defs"),
        )
        .unwrap()
    }

    fn inputs(disk: VfkitDisk) -> VfkitInputs {
        VfkitInputs {
            kernel: "/a/Image".into(),
            initrd: "/a/initrd".into(),
            append: "console=ttyAMA0 init=/nix/store/x/init vmdisk.store=virtiofs".into(),
            disk,
            store: "/a/store".into(),
            run_dir: "/r".into(),
            ssh: VfkitSsh::Vsock {
                port: SSH_VSOCK_PORT,
                socket: "/r/ssh.sock".into(),
            },
        }
    }

    fn spec() -> VfkitSpec {
        let d = def("store = \"virtiofs\"\ndisk_format = \"raw\"\n");
        from_def(&d, inputs(VfkitDisk::Raw("/r/disk.raw".into()))).unwrap()
    }

    fn err(r: Result<impl std::fmt::Debug>) -> String {
        format!("{:#}", r.unwrap_err())
    }

    #[test]
    fn preflight_refuses_9p_naming_virtiofs_and_the_store_tag() {
        let msg = err(preflight(&def("store = \"9p\"\ndisk_format = \"raw\"\n")));
        for want in [
            "virtio-fs",
            "nix-store",
            "store = \"virtiofs\"",
            "9pnet_virtio",
        ] {
            assert!(msg.contains(want), "{want:?} missing from: {msg}");
        }
        preflight(&def("store = \"virtiofs\"\ndisk_format = \"raw\"\n")).unwrap();
    }

    #[test]
    fn preflight_lists_every_problem_of_a_qemu_shaped_guest() {
        // The defaults are qemu-vm.nix's shape: 9p store, qcow2 disk.
        let d = VmDef::parse(
            "name = \"q\"\narch = \"x86_64\"\nlayout = \"l\"\n",
            Path::new("/"),
        )
        .unwrap();
        let msg = err(preflight(&d));
        assert!(msg.contains("\n  - "), "{msg}");
        assert!(
            msg.contains("virtio-fs") && msg.contains("vmdisk convert -O raw"),
            "{msg}"
        );
    }

    #[test]
    fn qcow2_disks_are_refused_with_the_convert_command() {
        let d = def("store = \"virtiofs\"\n"); // disk_format defaults to qcow2
        let msg = err(preflight(&d));
        assert!(
            msg.contains("vmdisk convert -O raw disk.qcow2 disk.raw"),
            "{msg}"
        );

        let msg = err(from_def(
            &d,
            inputs(VfkitDisk::Raw("/r/vm disk.qcow2".into())),
        ));
        assert!(
            msg.contains("vmdisk convert -O raw '/r/vm disk.qcow2' '/r/vm disk.raw'"),
            "{msg}"
        );

        // A file that says raw but is qcow2 inside.
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        std::fs::write(&disk, b"QFI\xfb\0\0\0\x03").unwrap();
        let d = def("store = \"virtiofs\"\ndisk_format = \"raw\"\n");
        let msg = err(from_def(&d, inputs(VfkitDisk::Raw(disk))));
        assert!(msg.contains("vmdisk convert -O raw"), "{msg}");
    }

    #[test]
    fn qcow2_over_nbd_is_fine() {
        let d = def("store = \"virtiofs\"\n");
        let s = from_def(
            &d,
            inputs(VfkitDisk::Nbd {
                uri: "nbd://127.0.0.1:10809".into(),
            }),
        )
        .unwrap();
        let a = args(&s, Arch::Aarch64).unwrap();
        let i = a.iter().position(|x| x.starts_with("nbd,")).unwrap();
        assert_eq!(a[i - 1], "--device");
        assert_eq!(a[i], "nbd,uri=nbd://127.0.0.1:10809,deviceId=root");
        assert!(!a.iter().any(|x| x.starts_with("virtio-blk")));
    }

    #[test]
    fn nbd_uris_are_checked() {
        let mut s = spec();
        for bad in ["http://x/y", "nbd://h:1/a,b", "/tmp/sock", "nbd://h/a b"] {
            s.disk = VfkitDisk::Nbd { uri: bad.into() };
            assert!(args(&s, Arch::Aarch64).is_err(), "accepted {bad}");
        }
        s.disk = VfkitDisk::Nbd {
            uri: "nbd+unix:///?socket=/tmp/vmdisk/disk.sock".into(),
        };
        args(&s, Arch::Aarch64).unwrap();
    }

    #[test]
    fn a_foreign_guest_arch_is_refused() {
        let s = spec();
        let msg = err(args(&s, Arch::X86_64));
        assert!(
            msg.contains("the aarch64 guest on this x86_64 Mac"),
            "{msg}"
        );
        assert!(msg.contains("qemu"), "{msg}");
        assert!(script(&s, Arch::X86_64).is_err());
    }

    #[test]
    fn a_compressed_arm64_kernel_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let k = dir.path().join("vmlinuz");
        std::fs::write(&k, b"\x1f\x8b\x08\0compressed").unwrap();
        let d = def("store = \"virtiofs\"\ndisk_format = \"raw\"\n");
        let mut i = inputs(VfkitDisk::Raw("/r/disk.raw".into()));
        i.kernel = k.clone();
        assert!(err(from_def(&d, i.clone())).contains("uncompressed arm64 Image"));

        let mut image = vec![0u8; 0x40];
        image[0x38..0x3c].copy_from_slice(b"ARM\x64");
        std::fs::write(&k, image).unwrap();
        from_def(&d, i).unwrap();
    }

    #[test]
    fn a_9p_store_on_the_command_line_is_refused() {
        let d = def("store = \"virtiofs\"\ndisk_format = \"raw\"\n");
        let mut i = inputs(VfkitDisk::Raw("/r/disk.raw".into()));
        i.append = "vmdisk.store=9p".into();
        assert!(err(from_def(&d, i)).contains("vmdisk.store=virtiofs"));
    }

    #[test]
    fn hvc0_becomes_the_last_console() {
        assert_eq!(with_hvc0_console(""), "console=hvc0");
        assert_eq!(with_hvc0_console(" quiet "), "quiet console=hvc0");
        assert_eq!(
            with_hvc0_console("console=ttyS0 quiet"),
            "console=ttyS0 quiet console=hvc0"
        );
        assert_eq!(
            with_hvc0_console("console=hvc0 console=ttyAMA0"),
            "console=hvc0 console=ttyAMA0 console=hvc0"
        );
        assert_eq!(with_hvc0_console("a console=hvc0 b"), "a console=hvc0 b");
    }

    #[test]
    fn the_bootloader_argument_quotes_the_command_line() {
        let a = args(&spec(), Arch::Aarch64).unwrap();
        let i = a.iter().position(|x| x == "--bootloader").unwrap();
        assert_eq!(
            a[i + 1],
            "linux,kernel=/a/Image,initrd=/a/initrd,cmdline=\"console=ttyAMA0 \
             init=/nix/store/x/init vmdisk.store=virtiofs console=hvc0\""
        );
    }

    #[test]
    fn values_vfkit_would_split_are_refused() {
        let base = spec();
        let mut s = base.clone();
        s.shares[0].1 = "/a/st,ore".into();
        assert!(err(args(&s, Arch::Aarch64)).contains("no escape"));
        let mut s = base.clone();
        s.kernel = "/a/\"k".into();
        assert!(args(&s, Arch::Aarch64).is_err());
        let mut s = base.clone();
        s.cmdline = "init=\"/x\"".into();
        assert!(args(&s, Arch::Aarch64).is_err());
        let mut s = base.clone();
        s.disk = VfkitDisk::Raw("relative.raw".into());
        assert!(err(args(&s, Arch::Aarch64)).contains("absolute"));
        let mut s = base.clone();
        s.rest_socket = PathBuf::from(format!("/{}", "x".repeat(MAX_SOCKET_PATH_LEN)));
        assert!(err(args(&s, Arch::Aarch64)).contains("at most 103"));
        let mut s = base.clone();
        s.shares.push(("nix-store".into(), "/b".into()));
        assert!(err(args(&s, Arch::Aarch64)).contains("two shares"));
        let mut s = base.clone();
        s.shares[0].0 = "t".repeat(MAX_MOUNT_TAG_LEN + 1);
        assert!(args(&s, Arch::Aarch64).is_err());
        let mut s = base.clone();
        s.mac = "5a:0:1:2:3:4".into();
        assert!(args(&s, Arch::Aarch64).is_err());
        let mut s = base;
        s.ssh = VfkitSsh::Vsock {
            port: 0,
            socket: "/r/s".into(),
        };
        assert!(args(&s, Arch::Aarch64).is_err());
    }

    #[test]
    fn nat_ssh_has_no_vsock_device() {
        let mut s = spec();
        s.ssh = VfkitSsh::Nat;
        let a = args(&s, Arch::Aarch64).unwrap();
        assert!(!a.iter().any(|x| x.starts_with("virtio-vsock")));
        assert!(a.contains(&format!("virtio-net,nat,mac={}", s.mac)));
        let sh = script(&s, Arch::Aarch64).unwrap();
        assert!(sh.contains("/var/db/dhcpd_leases"), "{sh}");
    }

    #[test]
    fn macs_are_stable_local_unicast_without_short_octets() {
        let m = mac_for("x86_64");
        assert_eq!(m, mac_for("x86_64"));
        assert_ne!(m, mac_for("aarch64"));
        mac_address(&m).unwrap();
        for name in ["a", "b", "c", "rescue", ""] {
            let m = mac_for(name);
            assert!(m.starts_with("5a:"));
            assert!(m
                .split(':')
                .all(|o| u8::from_str_radix(o, 16).unwrap() >= 0x10));
        }
    }

    #[test]
    fn script_quotes_every_argument() {
        let mut s = spec();
        s.serial_log = "/r/it's here/serial.log".into();
        let sh = script(&s, Arch::Aarch64).unwrap();
        assert!(sh.starts_with("#!/bin/sh\n"));
        assert!(sh.contains("'virtio-serial,logFilePath=/r/it'\\''s here/serial.log'"));
        assert!(sh.contains("    '--cpus' '1' \\\n"));
        assert!(sh.contains("mkdir -p -- '/r'\n"));
        assert!(sh.contains("if [ -S '/r/ssh.sock' ]; then rm -f -- '/r/ssh.sock'; fi\n"));
        assert!(sh.ends_with("    \"$@\"\n"));
    }

    #[test]
    fn quoting() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_word("/plain/path.raw"), "/plain/path.raw");
        assert_eq!(sh_word("a b"), "'a b'");
    }
}
