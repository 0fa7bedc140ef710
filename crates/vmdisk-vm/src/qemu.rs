//! qemu command lines and binaries.
//!
//! [`args`] turns a declarative [`QemuSpec`] into qemu's argv (pure apart from looking for
//! `qboot.rom` in the firmware folder), [`find_qemu`] locates a usable `qemu-system-*`, and
//! [`free_local_port`] / [`kvm_available`] answer the two host questions a boot needs.
//!
//! The device set is the fast path measured in FACTS.md "Virtualisation": qboot + PVH vmlinux
//! on x86_64, `virt` + cortex-a57 on aarch64, virtio-pci everywhere, no NIC option ROM, serial
//! on a unix socket that holds the guest until the harness listens (`wait=on`), QMP on another.

use std::ffi::{OsStr, OsString};
use std::fs::OpenOptions;
use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::Arch;

/// How long `qemu-system-* --version` may take before we call the binary unusable.
const VERSION_PROBE_TIMEOUT: Duration = Duration::from_secs(20);

/// The accelerator qemu runs the guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Accel {
    /// Linux KVM (`/dev/kvm`); probe it first, it can exist and still hang.
    Kvm,
    /// macOS Hypervisor.framework.
    Hvf,
    /// Pure emulation; always works, slowest.
    Tcg,
}

impl Accel {
    /// qemu's name, as in `accel=NAME`.
    pub fn name(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Hvf => "hvf",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// One virtio-blk disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drive {
    pub path: PathBuf,
    /// qemu's format name: "qcow2" or "raw".
    pub format: String,
    pub read_only: bool,
    /// Shown to the guest as /dev/disk/by-id/virtio-SERIAL.
    pub serial: Option<String>,
}

/// How a host folder reaches the guest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ShareKind {
    /// virtio-9p served by qemu itself.
    NineP,
    /// virtio-fs served by a virtiofsd the caller started, listening on `socket`.
    Virtiofs { socket: PathBuf },
}

/// A host folder shared with the guest, mounted there by `tag`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    pub tag: String,
    pub path: PathBuf,
    pub kind: ShareKind,
    pub read_only: bool,
}

/// Everything that decides a qemu command line.
#[derive(Clone, Debug)]
pub struct QemuSpec {
    pub arch: Arch,
    pub accel: Accel,
    pub memory_mib: u32,
    pub cpus: u32,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// The kernel command line, including `console=` (see [`console_device`]).
    pub append: String,
    pub drives: Vec<Drive>,
    pub shares: Vec<Share>,
    /// Forward `tcp:127.0.0.1:PORT` on the host to the guest's port 22.
    pub ssh_host_port: Option<u16>,
    /// qemu listens here for the serial console and waits for one client before starting.
    pub serial_socket: PathBuf,
    /// qemu listens here for QMP (does not wait).
    pub qmp_socket: PathBuf,
    /// qemu's data folder (`-L`); `qboot.rom` in it selects the fast x86_64 firmware.
    pub firmware_dir: Option<PathBuf>,
    /// Appended verbatim after everything else.
    pub extra_args: Vec<String>,
}

/// The kernel's name for the serial console of our machine types (`console=` argument).
pub fn console_device(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "ttyS0",
        Arch::Aarch64 => "ttyAMA0",
    }
}

/// The program name qemu uses for `arch`.
pub fn program_name(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "qemu-system-x86_64",
        Arch::Aarch64 => "qemu-system-aarch64",
    }
}

/// Escape a value for qemu's `key=value,key=value` option syntax: a comma is written twice.
pub fn escape_opt(value: &str) -> String {
    value.replace(',', ",,")
}

fn opt_path(p: &Path) -> String {
    escape_opt(&p.to_string_lossy())
}

/// qemu's argv for `spec`, without the program name.
pub fn args(spec: &QemuSpec) -> Vec<String> {
    let mut a: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| a.extend(items.iter().map(|s| s.to_string()));

    let accel = spec.accel.name();
    match spec.arch {
        Arch::X86_64 => {
            push(&["-machine", &format!("pc,accel={accel}")]);
        }
        Arch::Aarch64 => {
            push(&["-machine", &format!("virt,gic-version=2,accel={accel}")]);
            let cpu = match spec.accel {
                Accel::Tcg => "cortex-a57",
                Accel::Kvm | Accel::Hvf => "host",
            };
            push(&["-cpu", cpu]);
        }
    }
    if let Some(fw) = &spec.firmware_dir {
        push(&["-L", &fw.to_string_lossy()]);
        let qboot = fw.join("qboot.rom");
        if spec.arch == Arch::X86_64 && qboot.is_file() {
            push(&["-bios", &qboot.to_string_lossy()]);
        }
    }
    push(&["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"]);
    push(&["-m", &spec.memory_mib.to_string()]);
    push(&["-smp", &spec.cpus.to_string()]);
    push(&["-kernel", &spec.kernel.to_string_lossy()]);
    push(&["-initrd", &spec.initrd.to_string_lossy()]);
    push(&["-append", &spec.append]);

    for (i, d) in spec.drives.iter().enumerate() {
        let mut drive = format!(
            "file={},format={},if=none,id=drive{i},cache=writeback,werror=report",
            opt_path(&d.path),
            escape_opt(&d.format)
        );
        if d.read_only {
            drive.push_str(",readonly=on");
        }
        let mut dev = format!("virtio-blk-pci,drive=drive{i}");
        if let Some(s) = &d.serial {
            dev.push_str(&format!(",serial={}", escape_opt(s)));
        }
        push(&["-drive", &drive, "-device", &dev]);
    }

    let mut netdev = "user,id=net0".to_string();
    if let Some(port) = spec.ssh_host_port {
        netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{port}-:22"));
    }
    push(&[
        "-netdev",
        &netdev,
        "-device",
        "virtio-net-pci,netdev=net0,romfile=",
    ]);

    let mut shared_memory = false;
    for (i, s) in spec.shares.iter().enumerate() {
        let tag = escape_opt(&s.tag);
        match &s.kind {
            ShareKind::NineP => {
                let mut fsdev = format!(
                    "local,id=fs{i},path={},security_model=none",
                    opt_path(&s.path)
                );
                if s.read_only {
                    fsdev.push_str(",readonly=on");
                }
                push(&[
                    "-fsdev",
                    &fsdev,
                    "-device",
                    &format!("virtio-9p-pci,fsdev=fs{i},mount_tag={tag}"),
                ]);
            }
            ShareKind::Virtiofs { socket } => {
                shared_memory = true;
                push(&[
                    "-chardev",
                    &format!("socket,id=vfs{i},path={}", opt_path(socket)),
                    "-device",
                    &format!("vhost-user-fs-pci,chardev=vfs{i},tag={tag}"),
                ]);
            }
        }
    }
    if shared_memory {
        // vhost-user needs guest RAM in a shareable file.
        push(&[
            "-object",
            &format!(
                "memory-backend-memfd,id=mem,size={}M,share=on",
                spec.memory_mib
            ),
            "-numa",
            "node,memdev=mem",
        ]);
    }

    push(&["-device", "virtio-rng-pci"]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=ser0,path={},server=on,wait=on",
            opt_path(&spec.serial_socket)
        ),
        "-serial",
        "chardev:ser0",
    ]);
    push(&[
        "-chardev",
        &format!(
            "socket,id=qmp0,path={},server=on,wait=off",
            opt_path(&spec.qmp_socket)
        ),
        "-mon",
        "chardev=qmp0,mode=control",
    ]);
    a.extend(spec.extra_args.iter().cloned());
    a
}

/// A qemu system emulator we can run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuBinary {
    pub path: PathBuf,
    /// Its data folder (BIOS images, option ROMs), when we know where it is.
    pub firmware_dir: Option<PathBuf>,
    /// The version `--version` reported, e.g. "7.2.18".
    pub version: Option<String>,
    /// `QEMU_MODULE_DIR` for a qemu unpacked outside its prefix (Debian ships TCG as a module).
    pub module_dir: Option<PathBuf>,
}

impl QemuBinary {
    /// A command running this qemu, with the environment it needs.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.path);
        if let Some(m) = &self.module_dir {
            c.env("QEMU_MODULE_DIR", m);
        }
        c
    }
}

/// The environment variable that names the qemu binary for `arch`.
pub fn env_var(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "VMDISK_QEMU_X86_64",
        Arch::Aarch64 => "VMDISK_QEMU_AARCH64",
    }
}

fn install_hint(arch: Arch) -> String {
    let (deb, nix) = match arch {
        Arch::X86_64 => ("qemu-system-x86", "qemu_kvm"),
        Arch::Aarch64 => ("qemu-system-arm", "qemu"),
    };
    format!(
        "install it (`apt-get install {deb}` on Debian/Ubuntu, `nix shell nixpkgs#{nix}` with \
         Nix) or point {} at a {} binary",
        env_var(arch),
        program_name(arch)
    )
}

/// What [`find_qemu`] looks at: the environment it would otherwise read from the process, and
/// the caller's unpacked Debian qemu. Tests build one by hand; the harness uses
/// [`QemuEnv::from_process`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QemuEnv {
    /// The value of [`env_var`] for the arch (`VMDISK_QEMU_X86_64`, ...), when set.
    pub override_path: Option<PathBuf>,
    /// `PATH`.
    pub path: Option<OsString>,
    /// A tree holding Debian's qemu packages unpacked (`usr/bin/qemu-system-*`,
    /// `usr/share/qemu`, `usr/lib/<multiarch>/qemu`), e.g. a sysroot in the asset cache.
    pub unpacked: Option<PathBuf>,
}

impl QemuEnv {
    /// This process's `VMDISK_QEMU_<ARCH>` and `PATH`; no unpacked tree.
    pub fn from_process(arch: Arch) -> QemuEnv {
        QemuEnv {
            override_path: std::env::var_os(env_var(arch))
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            path: std::env::var_os("PATH"),
            unpacked: None,
        }
    }

    /// The same, with `root` as the unpacked fallback.
    pub fn with_unpacked(self, root: &Path) -> QemuEnv {
        QemuEnv {
            unpacked: Some(root.to_path_buf()),
            ..self
        }
    }
}

/// Find qemu for `arch` in `env`: its override path when set (and then only that), else
/// `qemu-system-<arch>` on its PATH, else `<unpacked>/usr/bin/qemu-system-<arch>` with firmware
/// from `<unpacked>/usr/share/qemu`. Each candidate must answer `--version`.
pub fn find_qemu(arch: Arch, env: &QemuEnv) -> Result<QemuBinary> {
    let prog = program_name(arch);
    let var = env_var(arch);
    if let Some(path) = &env.override_path {
        return probe_binary(path, firmware_beside(path), None).with_context(|| {
            format!(
                "{var}={} does not name a working {prog}; fix or unset it",
                path.display()
            )
        });
    }

    let mut tried = vec![format!("{var} (not set)")];
    match env.path.as_deref().and_then(|p| which(prog, p)) {
        Some(path) => match probe_binary(&path, firmware_beside(&path), None) {
            Ok(b) => return Ok(b),
            Err(e) => tried.push(format!("{}: {e:#}", path.display())),
        },
        None => tried.push(format!("{prog} on PATH (not found)")),
    }
    match &env.unpacked {
        Some(root) => {
            let path = root.join("usr/bin").join(prog);
            let fw = root.join("usr/share/qemu");
            if path.is_file() {
                let modules = Arch::host()
                    .map(|h| root.join("usr/lib").join(h.multiarch()).join("qemu"))
                    .filter(|m| m.is_dir());
                match probe_binary(&path, fw.is_dir().then_some(fw), modules) {
                    Ok(b) => return Ok(b),
                    Err(e) => tried.push(format!("{}: {e:#}", path.display())),
                }
            } else {
                tried.push(format!("{} (not found)", path.display()));
            }
        }
        None => tried.push("no unpacked Debian qemu given".into()),
    }
    bail!(
        "no usable {prog}; tried:\n  {}\n{}",
        tried.join("\n  "),
        install_hint(arch)
    )
}

/// The first executable `name` in the directories of `path` (a PATH value).
fn which(name: &str, path: &OsStr) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::env::split_paths(path)
        .filter(|d| !d.as_os_str().is_empty())
        .map(|d| d.join(name))
        .find(|p| {
            p.metadata()
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

/// `<prefix>/share/qemu` for `<prefix>/bin/qemu-system-*` (symlinks resolved, as Nix profiles
/// link into the store), when that folder exists.
fn firmware_beside(bin: &Path) -> Option<PathBuf> {
    let real = bin.canonicalize().ok()?;
    let fw = real.parent()?.parent()?.join("share/qemu");
    fw.is_dir().then_some(fw)
}

fn probe_binary(
    path: &Path,
    firmware_dir: Option<PathBuf>,
    module_dir: Option<PathBuf>,
) -> Result<QemuBinary> {
    if !path.is_file() {
        bail!("{} does not exist", path.display());
    }
    let mut cmd = Command::new(path);
    cmd.arg("--version");
    let out = crate::ssh::run_bounded(&mut cmd, None, VERSION_PROBE_TIMEOUT)
        .with_context(|| format!("running {} --version", path.display()))?;
    if out.status != Some(0) {
        bail!(
            "`{} --version` failed (exit {:?}): {}",
            path.display(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(QemuBinary {
        path: path.to_path_buf(),
        firmware_dir,
        version: parse_version(&String::from_utf8_lossy(&out.stdout)),
        module_dir,
    })
}

/// "QEMU emulator version 7.2.18 (Debian 1:7.2+dfsg-7+deb12u18)" -> "7.2.18".
fn parse_version(text: &str) -> Option<String> {
    let rest = text.split("version ").nth(1)?;
    let v: String = rest
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    (!v.is_empty()).then_some(v)
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bind to port 0, read it, let go).
/// Another process can take it before qemu binds it; qemu then fails with "Could not set up
/// host forwarding rule", which the caller sees in qemu's stderr.
pub fn free_local_port() -> Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .context("binding 127.0.0.1:0 to find a free port for SSH forwarding")?;
    Ok(l.local_addr()?.port())
}

/// Whether `/dev/kvm` opens read-write. It can and still hang: probe with a short boot.
pub fn kvm_available() -> bool {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(arch: Arch, fw: Option<PathBuf>) -> QemuSpec {
        QemuSpec {
            arch,
            accel: Accel::Tcg,
            memory_mib: 512,
            cpus: 1,
            kernel: "/a/vmlinux".into(),
            initrd: "/a/initrd".into(),
            append: "console=ttyS0 quiet panic=-1".into(),
            drives: vec![
                Drive {
                    path: "/d/disk,1.qcow2".into(),
                    format: "qcow2".into(),
                    read_only: false,
                    serial: Some("root".into()),
                },
                Drive {
                    path: "/d/seed.raw".into(),
                    format: "raw".into(),
                    read_only: true,
                    serial: None,
                },
            ],
            shares: vec![
                Share {
                    tag: "nix-store".into(),
                    path: "/nix/store".into(),
                    kind: ShareKind::NineP,
                    read_only: true,
                },
                Share {
                    tag: "data".into(),
                    path: "/srv/data".into(),
                    kind: ShareKind::Virtiofs {
                        socket: "/s/vfs".into(),
                    },
                    read_only: false,
                },
            ],
            ssh_host_port: Some(2222),
            serial_socket: "/s/serial".into(),
            qmp_socket: "/s/qmp".into(),
            firmware_dir: fw,
            extra_args: vec!["-S".into()],
        }
    }

    fn words(s: &str) -> Vec<String> {
        s.split_whitespace().map(str::to_string).collect()
    }

    const DEVICES: &str = "\
        -drive file=/d/disk,,1.qcow2,format=qcow2,if=none,id=drive0,cache=writeback,werror=report \
        -device virtio-blk-pci,drive=drive0,serial=root \
        -drive file=/d/seed.raw,format=raw,if=none,id=drive1,cache=writeback,werror=report,readonly=on \
        -device virtio-blk-pci,drive=drive1 \
        -netdev user,id=net0,hostfwd=tcp:127.0.0.1:2222-:22 \
        -device virtio-net-pci,netdev=net0,romfile= \
        -fsdev local,id=fs0,path=/nix/store,security_model=none,readonly=on \
        -device virtio-9p-pci,fsdev=fs0,mount_tag=nix-store \
        -chardev socket,id=vfs1,path=/s/vfs \
        -device vhost-user-fs-pci,chardev=vfs1,tag=data \
        -object memory-backend-memfd,id=mem,size=512M,share=on -numa node,memdev=mem \
        -device virtio-rng-pci \
        -chardev socket,id=ser0,path=/s/serial,server=on,wait=on -serial chardev:ser0 \
        -chardev socket,id=qmp0,path=/s/qmp,server=on,wait=off -mon chardev=qmp0,mode=control \
        -S";

    /// The argv with the `-append` value (which has spaces) replaced by a placeholder.
    fn flat(a: Vec<String>) -> Vec<String> {
        let i = a.iter().position(|x| x == "-append").unwrap() + 1;
        let mut a = a;
        a[i] = "APPEND".into();
        a
    }

    #[test]
    fn x86_64_golden_with_qboot() {
        let fw = tempfile::tempdir().unwrap();
        std::fs::write(fw.path().join("qboot.rom"), b"").unwrap();
        let fwp = fw.path().to_string_lossy().to_string();
        let got = flat(args(&spec(Arch::X86_64, Some(fw.path().into()))));
        let want = words(&format!(
            "-machine pc,accel=tcg -L {fwp} -bios {fwp}/qboot.rom \
             -nodefaults -no-user-config -nographic -no-reboot -m 512 -smp 1 \
             -kernel /a/vmlinux -initrd /a/initrd -append APPEND {DEVICES}"
        ));
        assert_eq!(got, want);
    }

    #[test]
    fn x86_64_without_qboot_uses_default_bios() {
        let fw = tempfile::tempdir().unwrap();
        let got = args(&spec(Arch::X86_64, Some(fw.path().into())));
        assert!(!got.iter().any(|a| a == "-bios"), "{got:?}");
        assert!(got.iter().any(|a| a == "-L"));
        let got = args(&spec(Arch::X86_64, None));
        assert!(!got.iter().any(|a| a == "-bios" || a == "-L"), "{got:?}");
    }

    #[test]
    fn aarch64_golden() {
        let mut s = spec(Arch::Aarch64, Some("/fw".into()));
        s.append = "console=ttyAMA0".into();
        let got = args(&s);
        let mut want = words(
            "-machine virt,gic-version=2,accel=tcg -cpu cortex-a57 -L /fw \
             -nodefaults -no-user-config -nographic -no-reboot -m 512 -smp 1 \
             -kernel /a/vmlinux -initrd /a/initrd -append console=ttyAMA0",
        );
        want.extend(words(DEVICES));
        assert_eq!(got, want);

        s.accel = Accel::Kvm;
        let got = args(&s);
        assert_eq!(
            got[..4],
            words("-machine virt,gic-version=2,accel=kvm -cpu host")[..]
        );
    }

    #[test]
    fn append_stays_one_argument_and_is_not_escaped() {
        let got = args(&spec(Arch::X86_64, None));
        let i = got.iter().position(|x| x == "-append").unwrap();
        assert_eq!(got[i + 1], "console=ttyS0 quiet panic=-1");
    }

    #[test]
    fn minimal_spec_has_no_shares_memory_backend_or_hostfwd() {
        let mut s = spec(Arch::X86_64, None);
        s.shares.clear();
        s.drives.clear();
        s.ssh_host_port = None;
        s.extra_args.clear();
        let got = args(&s);
        assert!(!got.iter().any(|a| a == "-object" || a == "-numa"));
        assert!(got.contains(&"user,id=net0".to_string()));
    }

    #[test]
    fn escaping_doubles_commas_only() {
        assert_eq!(escape_opt("a,b,,c=d"), "a,,b,,,,c=d");
        assert_eq!(escape_opt("/plain/path"), "/plain/path");
    }

    #[test]
    fn console_devices() {
        assert_eq!(console_device(Arch::X86_64), "ttyS0");
        assert_eq!(console_device(Arch::Aarch64), "ttyAMA0");
    }

    #[test]
    fn version_parsing() {
        assert_eq!(
            parse_version("QEMU emulator version 7.2.18 (Debian 1:7.2+dfsg-7+deb12u18)\n")
                .as_deref(),
            Some("7.2.18")
        );
        assert_eq!(parse_version("something else"), None);
    }

    #[test]
    fn free_port_is_nonzero_and_bindable() {
        let p = free_local_port().unwrap();
        assert_ne!(p, 0);
        TcpListener::bind((Ipv4Addr::LOCALHOST, p)).unwrap();
    }

    /// A fake qemu answering `--version` as `version`.
    fn fake_qemu(path: &Path, version: &str) {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(
            path,
            format!("#!/bin/sh\necho 'QEMU emulator version {version} (fake)'\n"),
        )
        .unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn lookup_order_is_override_then_path_then_the_unpacked_tree() {
        let dir = tempfile::tempdir().unwrap();
        let prog = program_name(Arch::Aarch64);
        // Debian's packages unpacked: binary, firmware.
        let root = dir.path().join("sysroot");
        let unpacked = root.join("usr/bin").join(prog);
        fake_qemu(&unpacked, "9.9.1");
        std::fs::create_dir_all(root.join("usr/share/qemu")).unwrap();
        // One on a PATH of our own, and one named by the override variable.
        let bin = dir.path().join("bin");
        fake_qemu(&bin.join(prog), "8.8.8");
        let pinned = dir.path().join("pinned/qemu");
        fake_qemu(&pinned, "7.7.7");
        let empty = dir.path().join("empty");
        std::fs::create_dir(&empty).unwrap();

        let only_unpacked = QemuEnv {
            override_path: None,
            path: Some(empty.clone().into_os_string()),
            unpacked: Some(root.clone()),
        };
        let b = find_qemu(Arch::Aarch64, &only_unpacked).unwrap();
        assert_eq!(b.path, unpacked);
        assert_eq!(b.firmware_dir, Some(root.join("usr/share/qemu")));
        assert_eq!(b.version.as_deref(), Some("9.9.1"));

        let on_path = QemuEnv {
            path: Some(std::env::join_paths([&empty, &bin]).unwrap()),
            ..only_unpacked.clone()
        };
        let b = find_qemu(Arch::Aarch64, &on_path).unwrap();
        assert_eq!(
            (b.path, b.version.as_deref()),
            (bin.join(prog), Some("8.8.8"))
        );

        let pinned_env = QemuEnv {
            override_path: Some(pinned.clone()),
            ..on_path.clone()
        };
        let b = find_qemu(Arch::Aarch64, &pinned_env).unwrap();
        assert_eq!((b.path, b.version.as_deref()), (pinned, Some("7.7.7")));

        // An override that does not work is an error, not a fall-through.
        let broken = QemuEnv {
            override_path: Some(dir.path().join("nope")),
            ..on_path
        };
        let msg = format!("{:#}", find_qemu(Arch::Aarch64, &broken).unwrap_err());
        assert!(
            msg.contains("VMDISK_QEMU_AARCH64") && msg.contains("fix or unset"),
            "{msg}"
        );

        let nothing = QemuEnv {
            override_path: None,
            path: Some(empty.into_os_string()),
            unpacked: Some(dir.path().join("no-sysroot")),
        };
        let msg = format!("{:#}", find_qemu(Arch::Aarch64, &nothing).unwrap_err());
        assert!(msg.contains("apt-get install qemu-system-arm"), "{msg}");
        assert!(msg.contains("VMDISK_QEMU_AARCH64"), "{msg}");
        assert!(
            msg.contains("no-sysroot/usr/bin/qemu-system-aarch64 (not found)"),
            "{msg}"
        );
    }

    #[test]
    fn the_process_environment_is_read_per_arch() {
        let env = QemuEnv::from_process(Arch::X86_64);
        assert_eq!(env.path, std::env::var_os("PATH"));
        assert_eq!(
            env.override_path,
            std::env::var_os("VMDISK_QEMU_X86_64")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        );
        assert_eq!(env.unpacked, None);
        let root = Path::new("/cache/sysroot/abc");
        assert_eq!(env.with_unpacked(root).unpacked.as_deref(), Some(root));
    }
}
