//! `vmdisk vmtest RUN_SCRIPT`: boot a user's own NixOS VM through its `run-*-vm` script, follow
//! NixOS's real console output phase by phase, reach it over SSH, and diagnose a failure seconds
//! after its line appears.
//!
//! ```text
//!   RunScript::load ─▶ keys (fresh client key, OpenSSH host key) ─▶ the run's disk
//!      (overlay on the user's nixos.qcow2 | fresh disk like the script's | the user's own with
//!       --persist) with the keys pre-seeded (preseed) ─▶ the script, plumbed through its own
//!      environment (script_env) ─▶ console lines ─▶ nixos::Watcher (phases | failure line)
//!      ─▶ SSH banner, login and checks ─▶ VmtestReport (+ diagnoses, most specific first)
//! ```
//!
//! The user's disk is never written without `--persist`: the run boots an overlay (or a fresh
//! disk) inside its own temporary folder, removed at the end unless `--keep`.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::diagnose::{self, diagnose_all, Diagnosis, Evidence};
use crate::nixos::{InitrdStyle, Phase, Watcher};
use crate::preseed::{self, AuthorizedHow, HostKeyHow, OpensshHostKey, PreseedTarget};
use crate::run::Check;
use crate::script::{self, RunScript, UserEnv};
use crate::ssh::{self, ClientKey, Ssh};
use crate::vm::{self, TestVm, Timeouts, VmDirs};
use crate::Arch;

/// After the failing line, how long to keep reading the console for the rest of the story (a
/// panic's lines, emergency mode's prompt) unless qemu exits first.
const FAILURE_GRACE: Duration = Duration::from_secs(2);
/// After multi-user with no SSH unit on the console, how long the banner may still take.
const SSHD_GRACE: Duration = Duration::from_secs(5);
/// How often the watch loop wakes when the console is quiet.
const TICK: Duration = Duration::from_millis(50);
/// Attempts when qemu loses the race for the SSH port it was given.
const PORT_ATTEMPTS: usize = 2;

/// What to run and how.
#[derive(Clone, Debug)]
pub struct VmtestOptions {
    pub script: PathBuf,
    /// Who logs in (`--ssh USER`).
    pub ssh_user: String,
    /// The user's own private key (`--key`); else a fresh one is made and authorized.
    pub key: Option<PathBuf>,
    /// Stop after multi-user.
    pub no_ssh: bool,
    /// Boot the user's disk itself; what the VM writes stays.
    pub persist: bool,
    /// Bounds the whole run.
    pub timeout: Duration,
    /// Keep the run's folder (logs, qemu command line, result.json, the run's disk).
    pub keep: bool,
    /// Passed to the script (qemu options, after everything else).
    pub args: Vec<String>,
    /// `$NIX_DISK_IMAGE` of the caller, if set.
    pub disk_env: Option<PathBuf>,
    /// The caller's working directory (the script's default disk is relative to it).
    pub cwd: PathBuf,
    pub user_env: UserEnv,
    /// Where the run's folder and sockets go (default: the system temp dir).
    pub work_root: Option<PathBuf>,
}

impl VmtestOptions {
    /// Defaults for `script`: root with a fresh key, 300 s, this process's environment.
    pub fn new(script: impl Into<PathBuf>) -> VmtestOptions {
        VmtestOptions {
            script: script.into(),
            ssh_user: "root".into(),
            key: None,
            no_ssh: false,
            persist: false,
            timeout: Duration::from_secs(300),
            keep: false,
            args: Vec::new(),
            disk_env: std::env::var_os("NIX_DISK_IMAGE")
                .filter(|v| !v.is_empty())
                .map(PathBuf::from),
            cwd: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            user_env: UserEnv::from_process(),
            work_root: None,
        }
    }
}

/// The run's disk.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiskReport {
    /// The user's disk (`$NIX_DISK_IMAGE` or the script's default), when there is one.
    pub user_disk: Option<PathBuf>,
    /// `overlay` (on the user's disk), `fresh` (made like the script makes it), `persist` (the
    /// user's disk itself), `script` (the script makes its own, in the run's folder), `none`.
    pub how: &'static str,
}

/// How SSH was set up.
#[derive(Clone, Debug, Serialize)]
pub struct SshReport {
    pub user: String,
    pub port: u16,
    pub host_key: HostKeyHow,
    pub authorized_key: AuthorizedHow,
    pub notes: Vec<String>,
}

/// Everything a run found, as `--json` prints it.
#[derive(Clone, Debug, Serialize)]
pub struct VmtestReport {
    pub script: PathBuf,
    pub arch: Option<Arch>,
    pub arch_from: Option<String>,
    pub initrd: Option<InitrdStyle>,
    pub passed: bool,
    /// In the order reached; seconds since qemu started.
    pub phases: Vec<Phase>,
    /// qemu start to the first SSH command answered.
    pub boot_to_ssh_s: Option<f64>,
    pub disk: DiskReport,
    pub ssh: Option<SshReport>,
    /// What the guest said over SSH.
    pub checks: Vec<Check>,
    /// Most specific first.
    pub diagnoses: Vec<Diagnosis>,
    /// When the line that ended the boot reached the console.
    pub failure_at_s: Option<f64>,
    /// When the diagnosis was made (same clock).
    pub diagnosed_at_s: Option<f64>,
    pub error: Option<String>,
    /// The run's folder, kept with `--keep`.
    pub artifacts: Option<PathBuf>,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// Run `o.script` and report (never panics; a failure to run at all is `error`).
pub fn vmtest(o: &VmtestOptions) -> VmtestReport {
    let mut r = VmtestReport {
        script: o.script.clone(),
        arch: None,
        arch_from: None,
        initrd: None,
        passed: false,
        phases: Vec::new(),
        boot_to_ssh_s: None,
        disk: DiskReport {
            user_disk: None,
            how: "none",
        },
        ssh: None,
        checks: Vec::new(),
        diagnoses: Vec::new(),
        failure_at_s: None,
        diagnosed_at_s: None,
        error: None,
        artifacts: None,
    };
    let deadline = Instant::now() + o.timeout;
    let work_root = o.work_root.clone().unwrap_or_else(std::env::temp_dir);
    let work = match tempfile::Builder::new()
        .prefix("vmdisk-vmtest-")
        .tempdir_in(&work_root)
    {
        Ok(w) => w,
        Err(e) => {
            r.error = Some(format!(
                "creating the run's folder in {}: {e}",
                work_root.display()
            ));
            return r;
        }
    };
    if let Err(e) = run(o, &mut r, work.path(), deadline) {
        r.error = Some(format!("{e:#}"));
        r.passed = false;
    }
    if !r.passed && r.error.is_none() && r.diagnoses.is_empty() {
        r.error = Some("the run failed without a known cause; see the console log".into());
    }
    if let Ok(j) = serde_json::to_string_pretty(&r) {
        let _ = fs::write(work.path().join("artifacts/result.json"), j + "\n");
    }
    if o.keep {
        r.artifacts = Some(work.keep());
    }
    r
}

/// The disk the run boots and how the keys get in.
struct RunDisk {
    /// `NIX_DISK_IMAGE` for the script.
    nix_disk_image: Option<PathBuf>,
    target: PreseedTarget,
}

fn plan_disk(
    o: &VmtestOptions,
    s: &RunScript,
    work: &Path,
    r: &mut VmtestReport,
) -> Result<RunDisk> {
    let user_disk = o
        .disk_env
        .clone()
        .or_else(|| s.disk_default.as_ref().map(|d| o.cwd.join(d)))
        .map(|d| if d.is_absolute() { d } else { o.cwd.join(d) });
    let exists = user_disk.as_ref().is_some_and(|d| d.exists());
    let user_disk = match user_disk {
        Some(d) if exists => {
            Some(fs::canonicalize(&d).with_context(|| format!("resolving {}", d.display()))?)
        }
        other => other,
    };
    r.disk.user_disk = user_disk.clone();
    let run_disk = work.join("run-disk.qcow2");
    Ok(match (&user_disk, o.persist, exists) {
        (Some(d), true, true) => {
            r.disk.how = "persist";
            RunDisk {
                nix_disk_image: Some(d.clone()),
                target: PreseedTarget::Persist { disk: d.clone() },
            }
        }
        (Some(d), true, false) => {
            r.disk.how = "persist";
            RunDisk {
                nix_disk_image: Some(d.clone()),
                target: PreseedTarget::None,
            }
        }
        (Some(d), false, true) => {
            // The overlay opens the user's disk read-only, under qemu's read lock.
            let spec = vmdisk_image::overlay_spec(d, None)?;
            vmdisk_image::create_new(&run_disk, &spec)
                .and_then(|n| n.finish(false))
                .with_context(|| format!("creating the run's overlay on {}", d.display()))?;
            r.disk.how = "overlay";
            RunDisk {
                nix_disk_image: Some(run_disk.clone()),
                target: PreseedTarget::Overlay { overlay: run_disk },
            }
        }
        (Some(_), false, false) => match s.fresh_disk_size {
            Some(size) => {
                r.disk.how = "fresh";
                RunDisk {
                    nix_disk_image: Some(run_disk.clone()),
                    target: PreseedTarget::Fresh {
                        disk: run_disk,
                        size,
                        label: s.fresh_disk_label.clone().unwrap_or_else(|| "nixos".into()),
                    },
                }
            }
            None => {
                r.disk.how = "script";
                RunDisk {
                    nix_disk_image: Some(run_disk),
                    target: PreseedTarget::None,
                }
            }
        },
        (None, _, _) => {
            r.disk.how = "none";
            RunDisk {
                nix_disk_image: None,
                target: PreseedTarget::None,
            }
        }
    })
}

/// The lock error of a failed open, as the `image-locked` diagnosis.
fn locked_diagnosis(e: &anyhow::Error) -> Option<Diagnosis> {
    let img = e
        .chain()
        .find_map(|c| c.downcast_ref::<vmdisk_image::Error>())?;
    match img.block_error()? {
        vmdisk_block::Error::Locked { path, .. } => {
            let text = format!(
                "{e:#}\nFailed to get \"write\" lock\nIs another process using the image [{}]?",
                path.display()
            );
            let mut d = diagnose::explain(&text)
                .into_iter()
                .find(|d| d.id == "image-locked")?;
            d.evidence = format!("{e:#}");
            Some(d)
        }
        _ => None,
    }
}

fn run(o: &VmtestOptions, r: &mut VmtestReport, work: &Path, deadline: Instant) -> Result<()> {
    let s = RunScript::load(&o.script)?;
    r.arch = Some(s.arch);
    r.arch_from = Some(s.arch_from.clone());
    let artifacts = work.join("artifacts");
    let keys = work.join("keys");
    let scratch = work.join("tmp");
    for d in [&artifacts, &keys, &scratch] {
        fs::create_dir_all(d)?;
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&keys, fs::Permissions::from_mode(0o700))?;

    // Refuse what cannot work before anything boots.
    if let Some(k) = &o.key {
        let mode = fs::metadata(k)
            .with_context(|| format!("--key {}", k.display()))?
            .permissions()
            .mode()
            & 0o777;
        if mode & 0o077 != 0 && !o.no_ssh {
            r.diagnoses.push(diagnose::key_too_open(k, mode));
            return Ok(());
        }
    }
    if !o.no_ssh && o.key.is_none() && o.ssh_user != "root" {
        bail!(
            "--ssh {} needs --key FILE: vmdisk authorizes its fresh key for root only \
             (/root/.ssh/authorized_keys); give a key the configuration authorizes for {} \
             (users.users.{}.openssh.authorizedKeys.keys)",
            o.ssh_user,
            o.ssh_user,
            o.ssh_user
        );
    }
    if !o.no_ssh && o.key.is_none() && o.persist {
        bail!(
            "--persist boots your disk itself and vmdisk adds nothing to it: pass --key FILE \
             with a key the configuration authorizes \
             (users.users.root.openssh.authorizedKeys.keys), or --no-ssh"
        );
    }

    let (client_key, authorized) = match &o.key {
        Some(k) => (k.clone(), None),
        None => {
            let c = ClientKey::generate(&keys)?;
            (c.private.clone(), Some(c.public_line))
        }
    };
    let host_key = OpensshHostKey::generate(&keys)?;
    let disk = match plan_disk(o, &s, work, r) {
        Ok(d) => d,
        Err(e) => {
            if let Some(d) = locked_diagnosis(&e) {
                r.diagnoses.push(d);
                return Ok(());
            }
            return Err(e);
        }
    };
    let seeded = preseed::preseed_ssh(&disk.target, &host_key, authorized.as_deref(), work)
        .context("pre-seeding the SSH keys")?;

    let mut last_err = None;
    for attempt in 0..PORT_ATTEMPTS {
        let port = crate::qemu::free_local_port()?;
        if !o.no_ssh {
            r.ssh = Some(SshReport {
                user: o.ssh_user.clone(),
                port,
                host_key: seeded.host_key,
                authorized_key: seeded.authorized_key,
                notes: seeded.notes.clone(),
            });
        }
        match boot(
            o,
            r,
            &s,
            &disk,
            &seeded.kernel_params,
            &seeded.host_key_line,
            &client_key,
            port,
            work,
            deadline,
        ) {
            Ok(()) => return Ok(()),
            Err(BootError::PortTaken) if attempt + 1 < PORT_ATTEMPTS => {
                r.diagnoses.clear();
                continue;
            }
            Err(BootError::PortTaken) => return Ok(()),
            Err(BootError::Other(e)) => {
                last_err = Some(e);
                break;
            }
        }
    }
    match last_err {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

enum BootError {
    /// qemu could not bind the port we picked (someone took it meanwhile): try another.
    PortTaken,
    Other(anyhow::Error),
}

impl From<anyhow::Error> for BootError {
    fn from(e: anyhow::Error) -> Self {
        BootError::Other(e)
    }
}

impl From<std::io::Error> for BootError {
    fn from(e: std::io::Error) -> Self {
        BootError::Other(e.into())
    }
}

/// Find the console time of each diagnosis's evidence line.
fn stamp(diags: &mut [Diagnosis], lines: &[crate::console::Line]) {
    for d in diags {
        if let Some(l) = lines.iter().find(|l| {
            let t = crate::console::clean(l.text.as_bytes());
            t.trim() == d.evidence || (!d.evidence.is_empty() && t.contains(&d.evidence))
        }) {
            d.at_s = Some(secs(l.at));
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn boot(
    o: &VmtestOptions,
    r: &mut VmtestReport,
    s: &RunScript,
    disk: &RunDisk,
    kernel_params: &[String],
    host_key_line: &str,
    client_key: &Path,
    port: u16,
    work: &Path,
    deadline: Instant,
) -> std::result::Result<(), BootError> {
    let artifacts = work.join("artifacts");
    let scratch = work.join("tmp");
    let dirs = VmDirs::new(&artifacts, o.work_root.as_deref())?;
    let env = script::script_env(&script::Plumbing {
        script: s,
        serial_socket: &dirs.serial_socket(),
        qmp_socket: &dirs.qmp_socket(),
        ssh_port: (!o.no_ssh).then_some(port),
        disk: disk.nix_disk_image.as_deref(),
        tmpdir: &scratch,
        extra_kernel_params: kernel_params,
        user: &o.user_env,
    });
    // The script runs in the run's scratch folder: name it by an absolute path (not resolving
    // links, so `result/bin/run-nixos-vm` stays what the user gave).
    let script_path = if o.script.is_absolute() {
        o.script.clone()
    } else {
        o.cwd.join(&o.script)
    };
    let mut cmd = Command::new(&script_path);
    cmd.args(&o.args).current_dir(&scratch);
    for (k, v) in &env {
        cmd.env(k, v);
    }
    let line = env
        .iter()
        .map(|(k, v)| format!("{k}={}", vm::shell_quote(v)))
        .chain(std::iter::once(vm::shell_quote(
            &o.script.to_string_lossy(),
        )))
        .chain(o.args.iter().map(|a| vm::shell_quote(a)))
        .collect::<Vec<_>>()
        .join(" ");
    let left = deadline.saturating_duration_since(Instant::now());
    let timeouts = Timeouts {
        // The script may build the disk before it starts qemu.
        qemu_start: left.min(Duration::from_secs(120)),
        ssh_command: left.min(Duration::from_secs(60)),
        ..Timeouts::tcg()
    };
    let vm = match TestVm::spawn("vmtest", cmd, &line, dirs, timeouts) {
        Ok(vm) => vm,
        Err(e) => {
            let stderr = fs::read_to_string(artifacts.join("qemu-stderr.log")).unwrap_or_default();
            r.diagnoses = diagnose_all(Evidence {
                qemu_stderr: &stderr,
                ..Default::default()
            });
            if r.diagnoses.iter().any(|d| {
                d.id == "hostfwd-port-in-use" && d.evidence.contains(&format!("127.0.0.1:{port}-"))
            }) {
                return Err(BootError::PortTaken);
            }
            if !r.diagnoses.is_empty() {
                return Ok(());
            }
            return Err(BootError::Other(e.context("starting the run script")));
        }
    };
    // What the script really ran: qemu's argv, now that it exec'd.
    if let Some(pid) = vm.pid() {
        if let Ok(argv) = fs::read(format!("/proc/{pid}/cmdline")) {
            let argv: Vec<String> = argv
                .split(|b| *b == 0)
                .filter(|a| !a.is_empty())
                .map(|a| vm::shell_quote(&String::from_utf8_lossy(a)))
                .collect();
            let _ = fs::write(
                artifacts.join("qemu-cmdline.txt"),
                format!(
                    "{line}\n# qemu as the script started it:\n{}\n",
                    argv.join(" ")
                ),
            );
        }
    }
    watch(
        o,
        r,
        vm,
        host_key_line,
        client_key,
        &work.join("keys"),
        port,
        deadline,
    );
    Ok(())
}

/// Follow the boot until it passed, failed or ran out of time; fill `r`.
#[allow(clippy::too_many_arguments)]
fn watch(
    o: &VmtestOptions,
    r: &mut VmtestReport,
    mut vm: TestVm,
    host_key_line: &str,
    client_key: &Path,
    keys: &Path,
    port: u16,
    deadline: Instant,
) {
    let mut w = Watcher::new();
    let pid = vm.pid();
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Result<Duration, String>>();
    let banner = (!o.no_ssh).then(|| {
        let stop = Arc::clone(&stop);
        let started = vm.started;
        std::thread::spawn(move || {
            let mut alive = || !stop.load(Ordering::Relaxed) && pid.is_some_and(vm::process_alive);
            let res = ssh::wait_banner(port, deadline, &mut alive)
                .map(|_| started.elapsed())
                .map_err(|e| format!("{e:#}"));
            let _ = tx.send(res);
        })
    });

    let mut next = 0;
    let mut banner_at: Option<Duration> = None;
    let mut banner_err: Option<String> = None;
    let mut failed_seen: Option<Instant> = None;
    let mut multi_seen: Option<Instant> = None;
    let outcome: &str = loop {
        // New console lines.
        for l in vm.console.lines_since(next) {
            next += 1;
            w.feed(&l);
        }
        if w.failure().is_some() && failed_seen.is_none() {
            failed_seen = Some(Instant::now());
        }
        if let Some(t) = failed_seen {
            if t.elapsed() >= FAILURE_GRACE || vm.console.closed() {
                break "failed";
            }
        } else {
            if let Ok(res) = rx.try_recv() {
                match res {
                    Ok(at) => banner_at = Some(at),
                    Err(e) => banner_err = Some(e),
                }
            }
            if w.phase("multi-user").is_some() && multi_seen.is_none() {
                multi_seen = Some(Instant::now());
            }
            if o.no_ssh && w.phase("multi-user").is_some() {
                break "multi-user";
            }
            if banner_at.is_some() {
                break "banner";
            }
            if let Some(m) = multi_seen {
                if w.sshd_unit().is_none() && m.elapsed() >= SSHD_GRACE {
                    break "sshd-missing";
                }
            }
            if vm.console.closed() || !vm.alive() {
                // Let the reader take the last lines.
                let _ = vm
                    .console
                    .wait_for_from("exit", next, Duration::from_millis(200), |_| false);
                for l in vm.console.lines_since(next) {
                    w.feed(&l);
                }
                if w.failure().is_some() {
                    break "failed";
                }
                break "exited";
            }
            if banner_err.is_some() && !o.no_ssh {
                break "no-banner";
            }
        }
        if Instant::now() >= deadline {
            break "timeout";
        }
        let _ = vm.console.wait_for_from("console", next, TICK, |_| true);
    };
    r.initrd = w.style();

    let console_lines = vm.console.lines();
    let console = vm.console.text();
    let evidence_diags = |ssh_stderr: &str| {
        let stderr = vm.qemu_stderr();
        let mut d = diagnose_all(Evidence {
            console: &console,
            ssh_stderr,
            qemu_stderr: &stderr,
        });
        stamp(&mut d, &console_lines);
        d
    };
    match outcome {
        "failed" => {
            r.diagnoses = evidence_diags("");
            r.failure_at_s = w.failure().map(|f| secs(f.at));
            r.diagnosed_at_s = Some(secs(vm.elapsed()));
        }
        "multi-user" => {
            r.passed = true;
        }
        "banner" => {
            if let Some(at) = banner_at {
                w.reach(
                    "sshd-answering",
                    at,
                    format!("SSH banner on 127.0.0.1:{port}"),
                );
            }
            let checks = login(
                o,
                r.arch.unwrap_or(Arch::X86_64),
                &vm,
                &mut w,
                host_key_line,
                client_key,
                keys,
                port,
            );
            match checks {
                Ok(c) => {
                    r.passed = c.iter().all(|c| c.ok);
                    r.checks = c;
                }
                Err(stderr) => {
                    r.diagnoses = evidence_diags(&stderr);
                    if r.diagnoses.is_empty() {
                        r.error = Some(format!("ssh failed: {}", stderr.trim()));
                    }
                }
            }
        }
        "sshd-missing" => {
            let multi = w
                .phase("multi-user")
                .map(|p| p.detail.clone())
                .unwrap_or_default();
            let mut d = diagnose::sshd_missing_live(&multi, SSHD_GRACE.as_secs_f64(), port);
            stamp(std::slice::from_mut(&mut d), &console_lines);
            r.diagnoses = vec![d];
            r.diagnosed_at_s = Some(secs(vm.elapsed()));
        }
        "exited" => {
            r.diagnoses = evidence_diags("");
            if r.diagnoses.is_empty() {
                r.error = Some(format!(
                    "qemu exited before the VM was up (the last phase reached: {}); see the \
                     console log and qemu's output",
                    w.phases().last().map_or("none", |p| p.id)
                ));
            }
        }
        "no-banner" => {
            r.diagnoses = evidence_diags("");
            r.error = banner_err;
        }
        _ => {
            r.diagnoses = evidence_diags("");
            r.error = Some(format!(
                "the run did not finish within --timeout {:.0}s (the last phase reached: {})",
                o.timeout.as_secs_f64(),
                w.phases().last().map_or("none", |p| p.id)
            ));
        }
    }
    r.phases = w.phases().to_vec();
    r.boot_to_ssh_s = w.phase("ssh-login").map(|p| p.at_s);
    stop.store(true, Ordering::Relaxed);
    vm.stop();
    if let Some(h) = banner {
        let _ = h.join();
    }
}

/// Log in with the pinned host key and check what NixOS mounted. `Err` carries ssh's stderr.
#[allow(clippy::too_many_arguments)]
fn login(
    o: &VmtestOptions,
    arch: Arch,
    vm: &TestVm,
    w: &mut Watcher,
    host_key_line: &str,
    client_key: &Path,
    keys: &Path,
    port: u16,
) -> std::result::Result<Vec<Check>, String> {
    let known_hosts = keys.join("known_hosts");
    ssh::write_known_hosts(&known_hosts, port, host_key_line).map_err(|e| format!("{e:#}"))?;
    let ssh = Ssh {
        port,
        key: client_key.to_path_buf(),
        known_hosts,
        user: o.ssh_user.clone(),
        connect_timeout_s: 10,
    };
    let root_dev = w
        .phase("root-mounted")
        .and_then(|p| p.detail.split_whitespace().next().map(str::to_string))
        .filter(|d| d.starts_with("/dev/"))
        .unwrap_or_else(|| "/".into());
    let probe = format!(
        "uname -m; echo @@mounts; cat /proc/mounts; echo @@root; readlink -f {}",
        vm::shell_quote(&root_dev)
    );
    let out = ssh
        .run(&probe, None, vm.timeouts.ssh_command)
        .map_err(|e| format!("{e:#}"))?;
    if out.status != Some(0) {
        return Err(out.stderr_text());
    }
    w.reach(
        "ssh-login",
        vm.elapsed(),
        format!("{}@127.0.0.1:{port} with the pinned host key", o.ssh_user),
    );
    let checks = check_nixos(arch, &root_dev, &out.stdout_text());
    // What SSH saw completes the console's account (which names no filesystem types).
    for (check, phase) in [
        ("root", "root-mounted"),
        ("store", "store-mounted"),
        ("store-overlay", "store-overlay"),
    ] {
        if let Some(c) = checks.iter().find(|c| c.name == check && c.ok) {
            w.annotate(phase, &format!("confirmed over SSH: {}", c.detail));
        }
    }
    Ok(checks)
}

/// Checks over `uname -m; echo @@mounts; cat /proc/mounts; echo @@root; readlink -f DEV`.
pub fn check_nixos(arch: Arch, console_root: &str, text: &str) -> Vec<Check> {
    let (uname, rest) = text.split_once("@@mounts").unwrap_or((text, ""));
    let (mounts, root) = rest.split_once("@@root").unwrap_or((rest, ""));
    let uname = uname.trim();
    let root = root.trim();
    let mount = |target: &str| {
        mounts.lines().rev().find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() >= 3 && f[1] == target).then(|| (f[0].to_string(), f[2].to_string()))
        })
    };
    let mut checks = vec![Check {
        name: "uname".into(),
        ok: uname == arch.uname(),
        detail: format!("uname -m = {uname} (the script's qemu: {})", arch.uname()),
    }];
    checks.push(match mount("/") {
        Some((dev, fstype)) => Check {
            name: "root".into(),
            ok: console_root == "/" || dev == root,
            detail: format!("/ is {fstype} on {dev} (stage 1 mounted {console_root} = {root})"),
        },
        None => Check {
            name: "root".into(),
            ok: false,
            detail: "no / in /proc/mounts".into(),
        },
    });
    checks.push(match mount("/nix/.ro-store") {
        Some((src, fstype)) => Check {
            name: "store".into(),
            ok: fstype == "9p" || fstype == "virtiofs",
            detail: format!("/nix/.ro-store is {fstype} from {src}"),
        },
        None => Check {
            name: "store".into(),
            ok: false,
            detail: "/nix/.ro-store is not mounted".into(),
        },
    });
    checks.push(match mount("/nix/store") {
        Some((_, fstype)) => Check {
            name: "store-overlay".into(),
            ok: fstype == "overlay",
            detail: format!("/nix/store is {fstype}"),
        },
        None => Check {
            name: "store-overlay".into(),
            ok: false,
            detail: "/nix/store is not mounted".into(),
        },
    });
    checks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checks_read_the_guest_mounts() {
        let out = "x86_64\n@@mounts\n/dev/vda / ext4 rw 0 0\n\
                   nix-store /nix/.ro-store 9p ro 0 0\ntmpfs /nix/.rw-store tmpfs rw 0 0\n\
                   overlay /nix/store overlay rw 0 0\n@@root\n/dev/vda\n";
        let c = check_nixos(Arch::X86_64, "/dev/disk/by-label/nixos", out);
        assert!(c.iter().all(|c| c.ok), "{c:#?}");
        assert_eq!(c[2].detail, "/nix/.ro-store is 9p from nix-store");
        let bad = out.replace("/dev/vda / ext4", "/dev/vdb / ext4");
        let c = check_nixos(Arch::X86_64, "/dev/disk/by-label/nixos", &bad);
        assert!(!c[1].ok);
        let c = check_nixos(Arch::Aarch64, "/", out);
        assert!(!c[0].ok && c[1].ok);
    }
}
