//! One test VM end to end: build its disk with vmdisk, boot it, follow stage 1 on the console,
//! reach it over SSH with a pinned host key, assert, diagnose failures, write the result.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use vmdisk_assets::assemble::{STAGE1_HALTED, STAGE1_MARKERS, STAGE1_SWITCH};
use vmdisk_assets::assets::{Cache, Lock};
use vmdisk_assets::{elf, GuestAssets};

use crate::def::{StoreKind, VmDef};
use crate::diagnose::{diagnose, Diagnosis, Evidence};
use crate::qemu::{self, Accel, Drive, QemuBinary, QemuEnv, QemuSpec, Share, ShareKind};
use crate::rootfs::{self, RootConfig};
use crate::ssh::{self, ClientKey, HostKey, Ssh};
use crate::vm::{self, MarkerError, TestVm, Timeouts, VmDirs};
use crate::Arch;

/// Shared settings of a harness run ([`Harness::new`], then the setters for what differs from
/// the defaults).
pub struct Harness {
    /// The vmdisk binary that builds the disks.
    pub vmdisk: PathBuf,
    pub cache: Cache,
    pub lock: Lock,
    /// Artifact folders go under here, one per VM run.
    pub artifacts_root: PathBuf,
    /// Keep each VM's disk in its artifact folder.
    pub keep: bool,
    pub timeouts: Timeouts,
    /// Forced accelerator (else probed).
    pub accel: Option<Accel>,
    /// Where short-lived socket directories go (default: the system temp dir); tests point it
    /// at a folder of their own to prove nothing is left behind.
    pub tmp_root: Option<PathBuf>,
}

/// Deliberate faults for the negative tests (each must produce its own diagnosis).
#[derive(Clone, Debug, Default)]
pub struct Faults {
    /// Start qemu without the `nix-store` share.
    pub omit_store_share: bool,
    /// Pin a different host key than the one on the disk.
    pub pin_wrong_host_key: bool,
    /// chmod the client key to this mode (e.g. 0o640).
    pub client_key_mode: Option<u32>,
}

/// A VM whose disk is built and not yet booted.
pub struct Prepared {
    pub def: VmDef,
    pub assets: GuestAssets,
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub client_key: ClientKey,
    pub host_key: HostKey,
    /// Seconds spent building assets, keys and disk.
    pub build_s: f64,
}

/// Options for [`Harness::prepare`].
#[derive(Clone, Debug, Default)]
pub struct PrepareOptions {
    /// The whole /etc/shadow (default: root with no password).
    pub shadow: Option<Vec<u8>>,
    /// Suffix for the artifact folder name.
    pub tag: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct Check {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Timings {
    /// Building assets (cached after the first run), keys and the disk.
    pub build_s: f64,
    /// qemu start -> last stage-1 marker (switch to stage 2).
    pub stage1_s: Option<f64>,
    /// qemu start -> SSH banner: the guest's own boot.
    pub banner_s: Option<f64>,
    /// qemu start -> first SSH command answered.
    pub ssh_s: Option<f64>,
    /// (ssh_s - banner_s) / banner_s: what the harness adds beyond the boot.
    pub overhead_pct: Option<f64>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VmResult {
    pub name: String,
    pub arch: Arch,
    pub accel: String,
    pub passed: bool,
    pub checks: Vec<Check>,
    pub timings: Timings,
    pub diagnosis: Option<Diagnosis>,
    pub error: Option<String>,
    pub artifacts: PathBuf,
}

/// A booted VM reachable over SSH.
pub struct Booted {
    pub vm: TestVm,
    pub ssh: Ssh,
    pub accel: Accel,
    pub port: u16,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

impl Harness {
    /// A harness that builds disks with the `vmdisk` binary, guests from `lock`'s packages in
    /// `cache`, and puts one artifact folder per VM run under `artifacts_root`. Defaults: disks
    /// are removed after each run, timeouts from the environment ([`Timeouts::from_env`]), the
    /// accelerator probed, socket folders in the system temp dir.
    pub fn new(
        vmdisk: impl Into<PathBuf>,
        cache: Cache,
        lock: Lock,
        artifacts_root: impl Into<PathBuf>,
    ) -> Harness {
        Harness {
            vmdisk: vmdisk.into(),
            cache,
            lock,
            artifacts_root: artifacts_root.into(),
            keep: false,
            timeouts: Timeouts::from_env(),
            accel: None,
            tmp_root: None,
        }
    }

    /// Keep each VM's disk in its artifact folder.
    pub fn keep_disks(mut self, keep: bool) -> Harness {
        self.keep = keep;
        self
    }

    /// Use these timeouts instead of the environment's.
    pub fn timeouts(mut self, timeouts: Timeouts) -> Harness {
        self.timeouts = timeouts;
        self
    }

    /// Force an accelerator instead of probing.
    pub fn accel(mut self, accel: Accel) -> Harness {
        self.accel = Some(accel);
        self
    }

    /// Put short-lived socket folders under `dir`.
    pub fn tmp_root(mut self, dir: impl Into<PathBuf>) -> Harness {
        self.tmp_root = Some(dir.into());
        self
    }

    /// Find qemu for `arch`: the machine's, else Debian's unpacked into the cache.
    pub fn qemu(&self, arch: Arch) -> Result<QemuBinary> {
        let env = QemuEnv::from_process(arch);
        match qemu::find_qemu(arch, &env) {
            Ok(b) => Ok(b),
            Err(e) => {
                let pkg = vmdisk_assets::assets::qemu_package(arch);
                let host = Arch::host().context("unsupported host architecture")?;
                let (Ok(sys), Ok(data)) = (
                    self.lock.get(pkg, host.debian()),
                    self.lock.get("qemu-system-data", "all"),
                ) else {
                    return Err(e);
                };
                let common = self.lock.get("qemu-system-common", host.debian());
                let mut pkgs = vec![sys, data];
                pkgs.extend(common.ok());
                let root = self
                    .cache
                    .sysroot_of(&pkgs)
                    .context("unpacking Debian's qemu into the cache")?;
                qemu::find_qemu(arch, &env.with_unpacked(&root))
                    .map_err(|e2| e2.context(format!("{e:#}")))
            }
        }
    }

    /// Build everything for `def` up to the disk, in a fresh artifact folder.
    pub fn prepare(&self, def: &VmDef, opts: &PrepareOptions) -> Result<Prepared> {
        let t0 = Instant::now();
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let mut name = format!("{}-{}-{}", def.name, stamp.as_millis(), std::process::id());
        if let Some(t) = &opts.tag {
            name = format!(
                "{}-{t}-{}-{}",
                def.name,
                stamp.as_millis(),
                std::process::id()
            );
        }
        let dir = self.artifacts_root.join(name);
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating artifact folder {}", dir.display()))?;
        let assets = vmdisk_assets::prepare_assets(&self.cache, &self.lock, def.arch)?;
        let keys = dir.join("keys");
        fs::create_dir_all(&keys)?;
        let client_key = ClientKey::generate(&keys)?;
        let host_key = HostKey::generate(&keys)?;
        let tree = tempfile::Builder::new()
            .prefix("vmdisk-root-")
            .tempdir_in(&dir)?;
        rootfs::write_root_tree(
            tree.path(),
            &assets,
            &RootConfig {
                host_key_dropbear: host_key.dropbear_private.clone(),
                host_key_public: host_key.public_line.clone(),
                authorized_keys: format!("{}\n", client_key.public_line),
                shadow: opts
                    .shadow
                    .clone()
                    .unwrap_or_else(|| rootfs::DEFAULT_SHADOW.as_bytes().to_vec()),
                hostname: format!("vmdisk-{}", def.name),
            },
        )?;
        let disk = dir.join(format!("disk.{}", def.disk_format));
        rootfs::build_disk(&self.vmdisk, def, tree.path(), &disk, 1)?;
        drop(tree);
        Ok(Prepared {
            def: def.clone(),
            assets,
            dir,
            disk,
            client_key,
            host_key,
            build_s: secs(t0.elapsed()),
        })
    }

    fn accel_for(&self, p: &Prepared, bin: &QemuBinary) -> Accel {
        if let Some(a) = self.accel {
            return a;
        }
        if Arch::host() != Some(p.def.arch) {
            return Accel::Tcg;
        }
        let probe_dir = p.dir.join("kvm-probe");
        vm::choose_accel(
            bin,
            || {
                let dirs = VmDirs::new(&probe_dir, self.tmp_root.as_deref())?;
                let mut s = self.spec(p, Accel::Kvm, &dirs, None, &Faults::default());
                s.firmware_dir = bin.firmware_dir.clone();
                s.append.push_str(" vmdisk.probe=1");
                s.drives.clear();
                s.shares.clear();
                Ok((s, dirs))
            },
            self.timeouts,
            Some(&self.cache.root().join("accel-probe")),
        )
    }

    /// The qemu spec for a prepared VM.
    fn spec(
        &self,
        p: &Prepared,
        accel: Accel,
        dirs: &VmDirs,
        port: Option<u16>,
        faults: &Faults,
    ) -> QemuSpec {
        let mut shares = Vec::new();
        if !faults.omit_store_share {
            shares.push(Share {
                tag: "nix-store".into(),
                path: p.assets.store.clone(),
                kind: match p.def.store {
                    StoreKind::NineP => ShareKind::NineP,
                    StoreKind::Virtiofs => ShareKind::Virtiofs {
                        socket: dirs.socket_dir().join("virtiofs"),
                    },
                },
                read_only: true,
            });
        }
        QemuSpec {
            arch: p.def.arch,
            accel,
            memory_mib: p.def.memory_mib,
            cpus: p.def.cpus,
            kernel: p.assets.kernel.clone(),
            initrd: p.assets.initrd.clone(),
            append: format!(
                "console={} quiet panic=-1 init={} vmdisk.root={} vmdisk.store={}",
                qemu::console_device(p.def.arch),
                p.assets.init(),
                p.def.root,
                p.def.store.param()
            ),
            drives: vec![Drive {
                path: p.disk.clone(),
                format: p.def.disk_format.clone(),
                read_only: false,
                serial: Some("root".into()),
            }],
            shares,
            ssh_host_port: port,
            serial_socket: dirs.serial_socket(),
            qmp_socket: dirs.qmp_socket(),
            firmware_dir: None,
            extra_args: Vec::new(),
        }
    }

    /// Boot a prepared VM and follow it to the SSH banner. Stage-1 failures come back as
    /// errors carrying the console evidence; the VM is stopped by Drop in every case.
    pub fn boot(
        &self,
        p: &Prepared,
        faults: &Faults,
        append: &str,
        timings: &mut Timings,
    ) -> Result<Booted> {
        self.boot_with(p, faults, append, None, timings)
    }

    fn boot_with(
        &self,
        p: &Prepared,
        faults: &Faults,
        append: &str,
        script: Option<&Path>,
        timings: &mut Timings,
    ) -> Result<Booted> {
        let bin = self.qemu(p.def.arch)?;
        let dirs = VmDirs::new(&p.dir, self.tmp_root.as_deref())?;
        let port = qemu::free_local_port()?;
        let (vm, accel) = match script {
            None => {
                let accel = self.accel_for(p, &bin);
                let mut spec = self.spec(p, accel, &dirs, Some(port), faults);
                spec.firmware_dir = bin.firmware_dir.clone();
                if !append.is_empty() {
                    spec.append.push(' ');
                    spec.append.push_str(append);
                }
                (
                    TestVm::start(&p.def.name, &bin, &spec, dirs, self.timeouts)?,
                    accel,
                )
            }
            Some(script) => {
                let (mut cmd, line) = script_command(script, p, &dirs, port, append);
                if let Some(m) = &bin.module_dir {
                    cmd.env("QEMU_MODULE_DIR", m);
                }
                (
                    TestVm::spawn(&p.def.name, cmd, &line, dirs, self.timeouts)?,
                    Accel::Tcg,
                )
            }
        };

        let stage1_deadline = self.timeouts.stage1;
        for m in STAGE1_MARKERS {
            let left = stage1_deadline.saturating_sub(vm.elapsed());
            match vm.wait_marker(m, m, left) {
                Ok(l) => {
                    if *m == STAGE1_SWITCH {
                        timings.stage1_s = Some(secs(l.at));
                    }
                }
                Err(e) => {
                    // Let the guest finish printing its failure report.
                    if matches!(e, MarkerError::Failed(_)) {
                        let _ =
                            vm.wait_marker("failure report", STAGE1_HALTED, Duration::from_secs(5));
                    }
                    bail!(StageError {
                        step: m.to_string(),
                        detail: e.to_string(),
                    });
                }
            }
        }

        let key = p.client_key.private.clone();
        if let Some(mode) = faults.client_key_mode {
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&key, fs::Permissions::from_mode(mode))?;
        }
        let known_hosts = p.dir.join("keys/known_hosts");
        let pinned = if faults.pin_wrong_host_key {
            HostKey::generate(&p.dir.join("keys"))?.public_line
        } else {
            p.host_key.public_line.clone()
        };
        ssh::write_known_hosts(&known_hosts, port, &pinned)?;
        let ssh = Ssh {
            port,
            key,
            known_hosts,
            user: "root".into(),
            connect_timeout_s: 10,
        };
        let deadline = vm.started + self.timeouts.ssh_banner;
        let pid = vm.pid();
        ssh::wait_banner(port, deadline, &mut || pid.is_some_and(vm::process_alive)).map_err(
            |e| {
                anyhow::anyhow!(StageError {
                    step: "ssh banner".into(),
                    detail: format!("{e:#}"),
                })
            },
        )?;
        timings.banner_s = Some(secs(vm.elapsed()));
        Ok(Booted {
            vm,
            ssh,
            accel,
            port,
        })
    }

    /// Prepare, boot, assert, diagnose, and write `result.json` into the artifact folder.
    pub fn run(&self, def: &VmDef, faults: &Faults) -> VmResult {
        match self.prepare(def, &PrepareOptions::default()) {
            Ok(p) => self.run_prepared(&p, faults, ""),
            Err(e) => VmResult {
                name: def.name.clone(),
                arch: def.arch,
                accel: "-".into(),
                passed: false,
                checks: Vec::new(),
                timings: Timings::default(),
                diagnosis: None,
                error: Some(format!("{e:#}")),
                artifacts: self.artifacts_root.clone(),
            },
        }
    }

    /// Boot and assert an already prepared VM.
    pub fn run_prepared(&self, p: &Prepared, faults: &Faults, append: &str) -> VmResult {
        self.run_inner(p, faults, append, None)
    }

    /// Boot through a nixpkgs-shaped `run-*-vm` script (hostfwd via QEMU_NET_OPTS, serial and
    /// QMP sockets via QEMU_OPTS, the disk via NIX_DISK_IMAGE) and assert the same things.
    pub fn run_script(&self, p: &Prepared, script: &Path) -> VmResult {
        self.run_inner(p, &Faults::default(), "", Some(script))
    }

    fn run_inner(
        &self,
        p: &Prepared,
        faults: &Faults,
        append: &str,
        script: Option<&Path>,
    ) -> VmResult {
        let mut timings = Timings {
            build_s: p.build_s,
            ..Default::default()
        };
        let mut checks = Vec::new();
        let mut error = None;
        let mut ssh_stderr = String::new();
        let mut accel = "-".to_string();
        let console;
        let qemu_stderr;
        match self.boot_with(p, faults, append, script, &mut timings) {
            Ok(mut b) => {
                accel = format!("{:?}", b.accel).to_lowercase();
                checks.push(Check {
                    name: "stage1".into(),
                    ok: true,
                    detail: "all stage-1 markers in order".into(),
                });
                match assert_over_ssh(p, &b, &mut timings) {
                    Ok(mut c) => checks.append(&mut c),
                    Err(e) => {
                        ssh_stderr = e.ssh_stderr.clone();
                        checks.push(Check {
                            name: "ssh".into(),
                            ok: false,
                            detail: e.message.clone(),
                        });
                        error = Some(e.message);
                    }
                }
                // A clean stop: nothing to flush in a guest we are about to discard.
                b.vm.stop();
                console = b.vm.console.text();
                qemu_stderr = b.vm.qemu_stderr();
            }
            Err(e) => {
                checks.push(Check {
                    name: e
                        .downcast_ref::<StageError>()
                        .map_or("boot".into(), |s| s.step.clone()),
                    ok: false,
                    detail: format!("{e:#}"),
                });
                error = Some(format!("{e:#}"));
                console = fs::read_to_string(p.dir.join("serial.log")).unwrap_or_default();
                qemu_stderr = fs::read_to_string(p.dir.join("qemu-stderr.log")).unwrap_or_default();
            }
        }
        let passed = error.is_none() && checks.iter().all(|c| c.ok);
        let diagnosis = if passed {
            None
        } else {
            diagnose(Evidence {
                console: &console,
                ssh_stderr: &ssh_stderr,
                qemu_stderr: &qemu_stderr,
            })
        };
        if !self.keep {
            let _ = fs::remove_file(&p.disk);
        }
        let r = VmResult {
            name: p.def.name.clone(),
            arch: p.def.arch,
            accel,
            passed,
            checks,
            timings,
            diagnosis,
            error,
            artifacts: p.dir.clone(),
        };
        if let Ok(j) = serde_json::to_string_pretty(&r) {
            let _ = fs::write(p.dir.join("result.json"), j + "\n");
        }
        r
    }
}

/// The environment a nixpkgs `run-*-vm` script takes: QEMU_NET_OPTS is spliced into
/// `-netdev user,...`, QEMU_OPTS is appended word-split, NIX_DISK_IMAGE names the disk.
fn script_command(
    script: &Path,
    p: &Prepared,
    dirs: &VmDirs,
    port: u16,
    append: &str,
) -> (std::process::Command, String) {
    let net = format!("hostfwd=tcp:127.0.0.1:{port}-:22");
    let opts = format!(
        "-chardev socket,id=vmdisk-serial,path={},server=on,wait=on -serial chardev:vmdisk-serial \
         -chardev socket,id=vmdisk-qmp,path={},server=on,wait=off -mon chardev=vmdisk-qmp,mode=control",
        dirs.serial_socket().display(),
        dirs.qmp_socket().display()
    );
    let mut cmd = std::process::Command::new(script);
    cmd.env("QEMU_NET_OPTS", &net)
        .env("QEMU_OPTS", &opts)
        .env("NIX_DISK_IMAGE", &p.disk)
        .env("TMPDIR", dirs.socket_dir())
        .env("USE_TMPDIR", "1")
        .env("QEMU_KERNEL_PARAMS", append);
    let line = format!(
        "QEMU_NET_OPTS={} QEMU_OPTS={} NIX_DISK_IMAGE={} USE_TMPDIR=1 {}",
        vm::shell_quote(&net),
        vm::shell_quote(&opts),
        vm::shell_quote(&p.disk.display().to_string()),
        vm::shell_quote(&script.display().to_string())
    );
    (cmd, line)
}

/// Write a `run-nixos-vm` script in nixpkgs' shape (testvms/run-nixos-vm.sh.in) that boots the
/// prepared guest with `bin`.
pub fn write_nixpkgs_script(p: &Prepared, bin: &QemuBinary, path: &Path) -> Result<()> {
    write_nixos_script(p, bin, path, None)
}

/// The test guest's NixOS personality (stage-1.sh, stage-2.sh): it prints what NixOS prints,
/// with the scripted stage 1 or the systemd initrd, and no `@@vmdisk` markers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NixosPersonality {
    Scripted,
    Systemd,
}

impl NixosPersonality {
    /// The kernel parameter that selects it.
    pub fn param(self) -> &'static str {
        match self {
            NixosPersonality::Scripted => "vmdisk.personality=nixos-scripted",
            NixosPersonality::Systemd => "vmdisk.personality=nixos-systemd",
        }
    }
}

/// The test guest's own kernel parameters against what its kernel spends under TCG, measured
/// with `initcall_debug` and `printk.time=1` (the guest's configuration, as a user's
/// `boot.kernelParams`; nothing NixOS's stage 1 or 2 prints or does depends on them):
/// - `cryptomgr.notests`: the crypto self-tests `crypto_algapi_init` runs at boot take
///   ~0.4 s of guest time (nothing in the guest relies on them);
/// - `acpi=noirq` (x86_64): routing each PCI device's legacy interrupt through ACPI's link
///   devices (`_SRS`/`_CRS` in the AML interpreter) costs 110–190 ms per device, ~1 s for the
///   script's six virtio devices while virtio_pci loads; with the MP table's routing instead
///   it is ~50 ms, and the virtio devices use MSI-X anyway. ACPI itself (power-off) stays.
pub fn tcg_boot_params(arch: Arch) -> &'static str {
    match arch {
        Arch::X86_64 => "acpi=noirq cryptomgr.notests",
        Arch::Aarch64 => "cryptomgr.notests",
    }
}

/// [`write_nixpkgs_script`], optionally for the NixOS personality: then the script's
/// `kernel-params` are NixOS's defaults (`loglevel=4`, no `quiet panic=-1`: a user's NixOS
/// has neither, and `vmdisk vmtest` must add what it needs).
pub fn write_nixos_script(
    p: &Prepared,
    bin: &QemuBinary,
    path: &Path,
    personality: Option<NixosPersonality>,
) -> Result<()> {
    const TEMPLATE: &str = include_str!("../../../testvms/run-nixos-vm.sh.in");
    let fw = bin.firmware_dir.clone();
    let machine = match p.def.arch {
        Arch::X86_64 => {
            let mut m = "-machine pc,accel=tcg".to_string();
            if let Some(fw) = &fw {
                m.push_str(&format!(
                    " -L {}",
                    vm::shell_quote(&fw.display().to_string())
                ));
                if fw.join("qboot.rom").is_file() {
                    m.push_str(&format!(
                        " -bios {}",
                        vm::shell_quote(&fw.join("qboot.rom").display().to_string())
                    ));
                }
            }
            m
        }
        Arch::Aarch64 => "-machine virt,gic-version=2,accel=tcg -cpu cortex-a57".to_string(),
    };
    let params = p.dir.join("kernel-params");
    let fast = tcg_boot_params(p.def.arch);
    let params_text = match personality {
        None => format!(
            "quiet panic=-1 {fast} vmdisk.root={} vmdisk.store=9p\n",
            p.def.root
        ),
        Some(n) => format!(
            "loglevel=4 net.ifnames=0 {fast} vmdisk.root={} vmdisk.store=9p {}\n",
            p.def.root,
            n.param()
        ),
    };
    fs::write(&params, params_text)?;
    let q = |x: &Path| vm::shell_quote(&x.display().to_string());
    let bash = [
        "/bin/bash",
        "/usr/bin/bash",
        "/run/current-system/sw/bin/bash",
    ]
    .into_iter()
    .find(|b| Path::new(b).is_file())
    .unwrap_or("/bin/sh");
    let text = TEMPLATE
        .replace("@bash@", bash)
        .replace("@qemu@", &q(&bin.path))
        .replace("@machine@", &machine)
        .replace("@memory@", &p.def.memory_mib.to_string())
        .replace("@store@", &q(&p.assets.store))
        .replace("@kernel@", &q(&p.assets.kernel))
        .replace("@initrd@", &q(&p.assets.initrd))
        .replace("@kernel_params@", &q(&params))
        .replace("@init@", &p.assets.init())
        .replace("@console@", qemu::console_device(p.def.arch));
    fs::write(path, text)?;
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755))?;
    Ok(())
}

/// A boot step that did not complete.
#[derive(Debug)]
pub struct StageError {
    pub step: String,
    pub detail: String,
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.step, self.detail)
    }
}

impl std::error::Error for StageError {}

/// An SSH step that failed, with what ssh printed.
pub struct SshFailure {
    pub message: String,
    pub ssh_stderr: String,
}

/// The SSH checks: one round trip gathers `uname -m`, the mount table and the root label.
fn assert_over_ssh(
    p: &Prepared,
    b: &Booted,
    timings: &mut Timings,
) -> std::result::Result<Vec<Check>, SshFailure> {
    let probe = format!(
        "uname -m; echo @@mounts; cat /proc/mounts; echo @@findfs; findfs {}",
        p.def.root
    );
    let out = b
        .ssh
        .run(&probe, None, b.vm.timeouts.ssh_command)
        .map_err(|e| SshFailure {
            message: format!("ssh: {e:#}"),
            ssh_stderr: String::new(),
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    if out.status != Some(0) {
        return Err(SshFailure {
            message: format!(
                "ssh root@127.0.0.1:{} failed (exit {:?}): {}",
                b.port,
                out.status,
                stderr.trim()
            ),
            ssh_stderr: stderr,
        });
    }
    let answered = b.vm.elapsed();
    timings.ssh_s = Some(secs(answered));
    if let Some(banner) = timings.banner_s {
        if banner > 0.0 {
            let over = (answered.as_secs_f64() - banner) / banner * 100.0;
            timings.overhead_pct = Some((over * 10.0).round() / 10.0);
        }
    }
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let mut checks = check_guest_state(p, &text);
    if p.def.assert.cross_build {
        checks.push(cross_build(p, b));
    }
    Ok(checks)
}

/// The program the cross-architecture build assertion compiles in the guest.
const HELLO_C: &str =
    "#include <stdio.h>\nint main(void) { printf(\"hello from %s\\n\", \"vmdisk\"); return 0; }\n";
const HELLO_OUT: &str = "hello from vmdisk";

/// Host sends C source, guest compiles it natively with tcc and runs it, host checks the
/// returned ELF's machine and, when a binfmt_misc handler for it is registered, runs it too.
fn cross_build(p: &Prepared, b: &Booted) -> Check {
    let fail = |detail: String| Check {
        name: "cross-build".into(),
        ok: false,
        detail,
    };
    let t = b.vm.timeouts.ssh_command;
    let built = match b.ssh.run(
        "cat > /tmp/hello.c && tcc -o /tmp/hello /tmp/hello.c && /tmp/hello",
        Some(HELLO_C.as_bytes()),
        t,
    ) {
        Ok(o) => o,
        Err(e) => return fail(format!("ssh: {e:#}")),
    };
    let said = String::from_utf8_lossy(&built.stdout).trim().to_string();
    if built.status != Some(0) || said != HELLO_OUT {
        return fail(format!(
            "guest build/run failed (exit {:?}): {said} {}",
            built.status,
            String::from_utf8_lossy(&built.stderr).trim()
        ));
    }
    let elf_bytes = match b.ssh.run("cat /tmp/hello", None, t) {
        Ok(o) if o.status == Some(0) => o.stdout,
        Ok(o) => return fail(format!("fetching the binary: exit {:?}", o.status)),
        Err(e) => return fail(format!("fetching the binary: {e:#}")),
    };
    let info = match elf::inspect(&elf_bytes) {
        Ok(i) => i,
        Err(e) => return fail(format!("the guest's binary is not an ELF: {e:#}")),
    };
    let want = elf::arch_machine(p.def.arch);
    if info.machine != want {
        return fail(format!(
            "the guest built a {} ELF, expected {}",
            elf::machine_name(info.machine),
            elf::machine_name(want)
        ));
    }
    let host_run = host_run(p, &elf_bytes);
    Check {
        name: "cross-build".into(),
        ok: host_run.as_ref().is_none_or(|r| r.is_ok()),
        detail: format!(
            "guest tcc built a {} ELF ({} bytes) that printed {HELLO_OUT:?}; on the host: {}",
            elf::machine_name(info.machine),
            elf_bytes.len(),
            match &host_run {
                None => format!(
                    "not tried (no binfmt_misc handler for {} is registered here)",
                    p.def.arch
                ),
                Some(Ok(how)) => format!("ran it through {how}"),
                Some(Err(e)) => format!("running it failed: {e}"),
            }
        ),
    }
}

/// Run the guest-built binary on the host when that is possible: natively for the host's own
/// architecture, else through a registered, enabled binfmt_misc handler. None = not tried.
fn host_run(p: &Prepared, elf_bytes: &[u8]) -> Option<std::result::Result<String, String>> {
    let how = if Arch::host() == Some(p.def.arch) {
        "the host CPU (same architecture)".to_string()
    } else {
        binfmt_handler(p.def.arch)?
    };
    let path = p.dir.join("hello-from-guest");
    let run = || -> std::result::Result<String, String> {
        use std::os::unix::fs::PermissionsExt;
        fs::write(&path, elf_bytes).map_err(|e| e.to_string())?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).map_err(|e| e.to_string())?;
        let out = std::process::Command::new(&path)
            .output()
            .map_err(|e| e.to_string())?;
        let said = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if said == HELLO_OUT {
            Ok(how.clone())
        } else {
            Err(format!("it printed {said:?} ({})", out.status))
        }
    };
    Some(run())
}

/// The interpreter of an enabled binfmt_misc entry for `arch`'s ELF machine, if any.
fn binfmt_handler(arch: Arch) -> Option<String> {
    let dir = Path::new("/proc/sys/fs/binfmt_misc");
    let name = format!("qemu-{}", arch.uname());
    for e in fs::read_dir(dir).ok()?.flatten() {
        let text = fs::read_to_string(e.path()).unwrap_or_default();
        if !text.starts_with("enabled") {
            continue;
        }
        if let Some(interp) = text.lines().find_map(|l| l.strip_prefix("interpreter ")) {
            if interp.contains(&name) {
                return Some(format!("binfmt_misc ({interp})"));
            }
        }
    }
    None
}

/// Pure checks over the probe output (testable without a VM).
pub fn check_guest_state(p: &Prepared, text: &str) -> Vec<Check> {
    check_probe_output(p.def.arch, &p.def.root, p.def.store, text)
}

/// Checks over `uname -m; echo @@mounts; cat /proc/mounts; echo @@findfs; findfs ROOT`.
pub fn check_probe_output(arch: Arch, root: &str, store: StoreKind, text: &str) -> Vec<Check> {
    let mut checks = Vec::new();
    let (uname, rest) = text.split_once("@@mounts").unwrap_or((text, ""));
    let (mounts, findfs) = rest.split_once("@@findfs").unwrap_or((rest, ""));
    let uname = uname.trim();
    checks.push(Check {
        name: "ssh".into(),
        ok: true,
        detail: "key login with the pinned host key".into(),
    });
    checks.push(Check {
        name: "uname".into(),
        ok: uname == arch.uname(),
        detail: format!("uname -m = {uname} (want {})", arch.uname()),
    });
    let mount = |target: &str| {
        mounts.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[1] == target).then(|| (f[0].to_string(), f[2].to_string()))
        })
    };
    let root_dev = findfs.trim();
    match mount("/") {
        Some((dev, fs)) => checks.push(Check {
            name: "root".into(),
            ok: fs == "ext4" && !root_dev.is_empty() && dev == root_dev,
            detail: format!("/ is {fs} on {dev}; findfs {root} = {root_dev}"),
        }),
        None => checks.push(Check {
            name: "root".into(),
            ok: false,
            detail: "no / in /proc/mounts".into(),
        }),
    }
    match mount("/nix/.ro-store") {
        Some((src, fs)) => checks.push(Check {
            name: "store".into(),
            ok: src == "nix-store" && fs == store.param(),
            detail: format!(
                "/nix/.ro-store is {fs} from {src} (want {} from nix-store)",
                store.param()
            ),
        }),
        None => checks.push(Check {
            name: "store".into(),
            ok: false,
            detail: "/nix/.ro-store is not mounted".into(),
        }),
    }
    match mount("/nix/store") {
        Some((_, fs)) => checks.push(Check {
            name: "store-overlay".into(),
            ok: fs == "overlay",
            detail: format!("/nix/store is {fs}"),
        }),
        None => checks.push(Check {
            name: "store-overlay".into(),
            ok: false,
            detail: "/nix/store is not mounted".into(),
        }),
    }
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "x86_64\n@@mounts\n\
        /dev/vda3 / ext4 rw,relatime 0 0\n\
        proc /proc proc rw 0 0\n\
        nix-store /nix/.ro-store 9p ro,relatime,cache=loose 0 0\n\
        tmpfs /nix/.rw-store tmpfs rw 0 0\n\
        overlay /nix/store overlay rw,lowerdir=/nix/.ro-store 0 0\n\
        @@findfs\n/dev/vda3\n";

    #[test]
    fn probe_output_of_a_healthy_guest_passes() {
        let c = check_probe_output(Arch::X86_64, "LABEL=nixos", StoreKind::NineP, GOOD);
        assert!(c.iter().all(|c| c.ok), "{c:#?}");
    }

    #[test]
    fn each_wrong_fact_fails_its_own_check() {
        let cases = [
            (GOOD.replace("x86_64\n", "aarch64\n"), "uname"),
            (GOOD.replace("/ ext4", "/ xfs"), "root"),
            (
                GOOD.replace("@@findfs\n/dev/vda3", "@@findfs\n/dev/vda2"),
                "root",
            ),
            (
                GOOD.replace(
                    "nix-store /nix/.ro-store 9p",
                    "nix-store /nix/.ro-store virtiofs",
                ),
                "store",
            ),
            (
                GOOD.replace("overlay /nix/store overlay", "tmpfs /nix/store tmpfs"),
                "store-overlay",
            ),
        ];
        for (text, name) in cases {
            let c = check_probe_output(Arch::X86_64, "LABEL=nixos", StoreKind::NineP, &text);
            let failed: Vec<&str> = c
                .iter()
                .filter(|c| !c.ok)
                .map(|c| c.name.as_str())
                .collect();
            assert_eq!(failed, vec![name], "{text}");
        }
    }
}
