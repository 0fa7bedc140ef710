//! A running VM: the qemu process, its serial console and QMP, and its artifact folder.
//!
//! `TestVm` owns everything it started. Drop stops qemu (QMP `quit`, then SIGKILL after a
//! grace period), reaps it and removes the socket directory, so no qemu process or temp dir
//! outlives a test, whatever path the test took out.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use vmdisk_assets::assemble::FAIL_MARKER;
use vmdisk_qmp::Qmp;

use crate::console::{Console, Line, WaitError};
use crate::qemu::{self, Accel, QemuBinary, QemuSpec};

/// Named deadlines: every wait in the harness has one of these, none sleeps blindly.
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// qemu creates its sockets.
    pub qemu_start: Duration,
    /// From qemu start to the last stage-1 marker.
    pub stage1: Duration,
    /// From qemu start to the SSH banner.
    pub ssh_banner: Duration,
    /// One SSH command.
    pub ssh_command: Duration,
    /// QMP `quit` until the process is gone, before SIGKILL.
    pub shutdown: Duration,
    /// The KVM probe boot.
    pub kvm_probe: Duration,
}

impl Timeouts {
    /// Generous enough for TCG on a loaded 2-core machine; a healthy x86_64 TCG boot reaches
    /// SSH in ~4 s.
    pub fn tcg() -> Timeouts {
        Timeouts {
            qemu_start: Duration::from_secs(10),
            stage1: Duration::from_secs(60),
            ssh_banner: Duration::from_secs(90),
            ssh_command: Duration::from_secs(30),
            shutdown: Duration::from_secs(5),
            kvm_probe: Duration::from_secs(4),
        }
    }

    /// Multiply every deadline (`VMDISK_TIMEOUT_SCALE` for slow machines).
    pub fn scaled(self, f: f64) -> Timeouts {
        let s = |d: Duration| d.mul_f64(f.clamp(0.1, 100.0));
        Timeouts {
            qemu_start: s(self.qemu_start),
            stage1: s(self.stage1),
            ssh_banner: s(self.ssh_banner),
            ssh_command: s(self.ssh_command),
            shutdown: s(self.shutdown),
            kvm_probe: s(self.kvm_probe),
        }
    }

    /// `tcg()` scaled by `VMDISK_TIMEOUT_SCALE` when set.
    pub fn from_env() -> Timeouts {
        let f = std::env::var("VMDISK_TIMEOUT_SCALE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(1.0);
        Timeouts::tcg().scaled(f)
    }
}

/// Where a VM's files go.
pub struct VmDirs {
    /// Kept after the run: command line, serial log, QMP log, result JSON.
    pub artifacts: PathBuf,
    /// Short-lived sockets (unix socket paths are limited to 108 bytes, so not under target/).
    sockets: tempfile::TempDir,
}

impl VmDirs {
    /// `tmp`: where the socket directory goes (default: the system temp dir).
    pub fn new(artifacts: &Path, tmp: Option<&Path>) -> Result<VmDirs> {
        fs::create_dir_all(artifacts)
            .with_context(|| format!("creating artifact folder {}", artifacts.display()))?;
        let tmp = tmp.map_or_else(std::env::temp_dir, Path::to_path_buf);
        let sockets = tempfile::Builder::new()
            .prefix("vmdisk-vm-")
            .tempdir_in(&tmp)
            .with_context(|| format!("creating a socket directory in {}", tmp.display()))?;
        Ok(VmDirs {
            artifacts: artifacts.to_path_buf(),
            sockets,
        })
    }
    pub fn serial_socket(&self) -> PathBuf {
        self.sockets.path().join("serial")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.sockets.path().join("qmp")
    }
    pub fn socket_dir(&self) -> &Path {
        self.sockets.path()
    }
}

/// A started qemu with its console attached.
pub struct TestVm {
    pub name: String,
    child: Option<Child>,
    /// Host-side helpers started for this VM (virtiofsd), stopped after qemu.
    helpers: Vec<Child>,
    pub console: Console,
    qmp: Option<Qmp>,
    pub started: Instant,
    pub dirs: VmDirs,
    pub timeouts: Timeouts,
}

/// Quote one argument for a copy-pasteable shell command line.
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@+%".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

impl TestVm {
    /// Start qemu for `spec` (whose socket paths must come from `dirs`) and attach the
    /// console. The guest does not run until the console is attached (serial `wait=on`).
    pub fn start(
        name: &str,
        bin: &QemuBinary,
        spec: &QemuSpec,
        dirs: VmDirs,
        timeouts: Timeouts,
    ) -> Result<TestVm> {
        let args = qemu::args(spec);
        let line = std::iter::once(bin.path.display().to_string())
            .chain(args.iter().cloned())
            .map(|a| shell_quote(&a))
            .collect::<Vec<_>>()
            .join(" ");
        let mut cmd = bin.command();
        cmd.args(&args);
        let helpers = start_virtiofsd(spec, &dirs, timeouts)?;
        TestVm::spawn_with(name, cmd, &line, dirs, timeouts, helpers)
    }

    /// Start `cmd` (qemu itself, or a script that execs qemu with our serial and QMP sockets
    /// from `dirs`) and attach the console and QMP. `cmdline` is recorded in the artifacts.
    pub fn spawn(
        name: &str,
        cmd: Command,
        cmdline: &str,
        dirs: VmDirs,
        timeouts: Timeouts,
    ) -> Result<TestVm> {
        TestVm::spawn_with(name, cmd, cmdline, dirs, timeouts, Vec::new())
    }

    /// [`TestVm::spawn`] with helper processes already started for this VM (stopped with it,
    /// also when qemu fails to start).
    pub fn spawn_with(
        name: &str,
        mut cmd: Command,
        cmdline: &str,
        dirs: VmDirs,
        timeouts: Timeouts,
        mut helpers: Vec<Child>,
    ) -> Result<TestVm> {
        let kill_helpers = |hs: &mut Vec<Child>| {
            for mut h in hs.drain(..) {
                let _ = h.kill();
                let _ = h.wait();
            }
        };
        fs::write(
            dirs.artifacts.join("qemu-cmdline.txt"),
            format!("{cmdline}\n"),
        )?;
        let stderr = fs::File::create(dirs.artifacts.join("qemu-stderr.log"))?;
        let stdout = stderr.try_clone()?;
        let started = Instant::now();
        let mut child = match cmd
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
        {
            Ok(c) => c,
            Err(e) => {
                kill_helpers(&mut helpers);
                return Err(e).with_context(|| format!("starting {cmdline}"));
            }
        };
        let pid = child.id();
        let mut alive = || process_alive(pid);
        let console = match Console::connect(
            &dirs.serial_socket(),
            &dirs.artifacts.join("serial.log"),
            started,
            timeouts.qemu_start,
            &mut alive,
        ) {
            Ok(c) => c,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                let err =
                    fs::read_to_string(dirs.artifacts.join("qemu-stderr.log")).unwrap_or_default();
                bail!("qemu did not start: {e:#}\n{}", err.trim());
            }
        };
        let mut vm = TestVm {
            name: name.to_string(),
            child: Some(child),
            helpers,
            console,
            qmp: None,
            started,
            dirs,
            timeouts,
        };
        vm.qmp = Qmp::connect(
            &vm.dirs.qmp_socket(),
            Some(&vm.dirs.artifacts.join("qmp.log")),
            timeouts.qemu_start,
        )
        .ok();
        Ok(vm)
    }

    /// Whether qemu is still running.
    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// qemu's stderr so far.
    pub fn qemu_stderr(&self) -> String {
        fs::read_to_string(self.dirs.artifacts.join("qemu-stderr.log")).unwrap_or_default()
    }

    /// Wait for a console line containing `needle`; a failure marker or a kernel panic ends
    /// the wait early with [`MarkerError::Failed`].
    pub fn wait_marker(
        &self,
        what: &str,
        needle: &str,
        timeout: Duration,
    ) -> Result<Line, MarkerError> {
        let r = self.console.wait_for(what, timeout, |l: &Line| {
            l.text.contains(needle)
                || l.text.contains(FAIL_MARKER)
                || l.text.contains("Kernel panic - not syncing")
        });
        match r {
            Ok(l) if l.text.contains(needle) => Ok(l),
            Ok(l) => Err(MarkerError::Failed(l)),
            Err(e) => Err(MarkerError::Wait(e)),
        }
    }

    /// Time since qemu started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Lend the QMP socket to another client for the duration of `f` (e.g. `vmdisk copy
    /// --qmp SOCKET`): qemu serves one QMP client at a time, so the harness's own connection
    /// is closed first and taken again afterwards (for `quit` in [`TestVm::stop`]; should
    /// qemu not greet again, stop falls back to SIGKILL after the shutdown deadline).
    pub fn lend_qmp<R>(&mut self, f: impl FnOnce(&Path) -> R) -> R {
        let socket = self.dirs.qmp_socket();
        self.qmp = None;
        let r = f(&socket);
        self.qmp = Qmp::connect(
            &socket,
            Some(&self.dirs.artifacts.join("qmp.log")),
            self.timeouts.qemu_start,
        )
        .ok();
        r
    }

    /// Hand a host-side helper process (virtiofsd) to the VM: it is stopped with qemu.
    pub fn adopt(&mut self, helper: Child) {
        self.helpers.push(helper);
    }

    /// Stop qemu: QMP `quit` (instant for a guest whose disks were synced), then SIGKILL after
    /// the shutdown deadline; then the helpers. Idempotent.
    pub fn stop(&mut self) {
        self.stop_qemu();
        for mut h in self.helpers.drain(..) {
            // virtiofsd exits by itself when qemu disconnects; give it a moment, then kill.
            let deadline = Instant::now() + Duration::from_millis(500);
            while matches!(h.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = h.kill();
            let _ = h.wait();
        }
    }

    fn stop_qemu(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(q) = self.qmp.as_mut() {
            let _ = q.quit();
        }
        let deadline = Instant::now() + self.timeouts.shutdown;
        loop {
            match child.try_wait() {
                Ok(Some(_)) => return,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// Wait (up to `timeout`) for qemu to exit by itself, e.g. after the guest powered off.
    pub fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while let Some(c) = self.child.as_mut() {
            match c.try_wait() {
                Ok(Some(_)) => {
                    self.child = None;
                    return true;
                }
                Ok(None) if Instant::now() < deadline => {
                    let _ = self
                        .console
                        .wait_for("exit", Duration::from_millis(50), |_| false);
                }
                _ => return false,
            }
        }
        true
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Find virtiofsd: `$VMDISK_VIRTIOFSD`, PATH, the distributions' libexec paths, or
/// `target/tools/bin/virtiofsd` (where `cargo xtask` installs it) above this executable.
pub fn find_virtiofsd() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("VMDISK_VIRTIOFSD").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let mut tried = Vec::new();
    if let Some(path) = std::env::var_os("PATH") {
        for d in std::env::split_paths(&path) {
            tried.push(d.join("virtiofsd"));
        }
    }
    tried.push("/usr/libexec/virtiofsd".into());
    tried.push("/usr/lib/qemu/virtiofsd".into());
    if let Ok(exe) = std::env::current_exe() {
        for a in exe.ancestors().skip(1) {
            tried.push(a.join("tools/bin/virtiofsd"));
            tried.push(a.join("target/tools/bin/virtiofsd"));
        }
    }
    tried.into_iter().find(|p| p.is_file()).context(
        "no virtiofsd (the host side of a virtiofs share). Debian 12 has no package: \
         `cargo xtask deps` builds the virtiofsd crate into target/tools/bin (needs \
         libseccomp-dev and libcap-ng-dev), or set VMDISK_VIRTIOFSD=/path/to/virtiofsd",
    )
}

/// Start one virtiofsd per virtiofs share of `spec` and wait for its socket.
fn start_virtiofsd(spec: &QemuSpec, dirs: &VmDirs, timeouts: Timeouts) -> Result<Vec<Child>> {
    use crate::qemu::ShareKind;
    let mut started: Vec<Child> = Vec::new();
    let result = (|| -> Result<()> {
        for share in &spec.shares {
            let ShareKind::Virtiofs { socket } = &share.kind else {
                continue;
            };
            let bin = find_virtiofsd()?;
            let log =
                fs::File::create(dirs.artifacts.join(format!("virtiofsd-{}.log", share.tag)))?;
            let mut cmd = Command::new(&bin);
            cmd.arg(format!("--socket-path={}", socket.display()))
                .arg(format!("--shared-dir={}", share.path.display()))
                // The store is shared read-only, and no sandbox keeps it working unprivileged.
                .arg("--sandbox=none")
                .arg("--cache=auto");
            if share.read_only {
                cmd.arg("--readonly");
            }
            let child = cmd
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()
                .with_context(|| format!("starting {}", bin.display()))?;
            started.push(child);
            let deadline = Instant::now() + timeouts.qemu_start;
            while !socket.exists() {
                let c = started.last_mut().expect("just pushed");
                if let Ok(Some(st)) = c.try_wait() {
                    bail!(
                        "virtiofsd for `{}` exited ({st}) before creating its socket; see {}",
                        share.tag,
                        dirs.artifacts
                            .join(format!("virtiofsd-{}.log", share.tag))
                            .display()
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "virtiofsd for `{}` did not create {} in time",
                        share.tag,
                        socket.display()
                    );
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Ok(())
    })();
    match result {
        Ok(()) => Ok(started),
        Err(e) => {
            for mut c in started {
                let _ = c.kill();
                let _ = c.wait();
            }
            Err(e)
        }
    }
}

/// Why a marker wait ended without the marker.
#[derive(Debug)]
pub enum MarkerError {
    /// The guest printed a failure marker or panicked.
    Failed(Line),
    /// Timeout or console closed.
    Wait(WaitError),
}

impl std::fmt::Display for MarkerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MarkerError::Failed(l) => write!(f, "the guest reported: {}", l.text),
            MarkerError::Wait(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for MarkerError {}

pub fn process_alive(pid: u32) -> bool {
    // SAFETY: kill with signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 {
        return false;
    }
    // A zombie still "exists": read its state.
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
        Err(_) => true,
    }
}

/// Decide the accelerator once per process: KVM only when /dev/kvm opens and a probe boot of
/// `kernel` + `initrd` prints the probe marker in time (on some machines /dev/kvm exists but
/// hangs), else TCG. `VMDISK_ACCEL=tcg|kvm` forces a choice.
///
/// The verdict is remembered for a day in `verdict_file` (keyed by the qemu binary), so
/// separate processes (`vmdisk rescue` after a test run) do not each pay for the probe.
pub fn choose_accel(
    bin: &QemuBinary,
    probe: impl FnOnce() -> Result<(QemuSpec, VmDirs)>,
    timeouts: Timeouts,
    verdict_file: Option<&Path>,
) -> Accel {
    static CHOSEN: OnceLock<Accel> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        match std::env::var("VMDISK_ACCEL").as_deref() {
            Ok("tcg") => return Accel::Tcg,
            Ok("kvm") => return Accel::Kvm,
            _ => {}
        }
        if !qemu::kvm_available() {
            return Accel::Tcg;
        }
        let key = format!(
            "{} {}",
            bin.path.display(),
            bin.version.as_deref().unwrap_or("?")
        );
        if let Some(f) = verdict_file {
            let fresh = fs::metadata(f)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age < Duration::from_secs(24 * 3600));
            if fresh {
                if let Ok(text) = fs::read_to_string(f) {
                    match text.split_once('\n') {
                        Some(("kvm", k)) if k.trim() == key => return Accel::Kvm,
                        Some(("tcg", k)) if k.trim() == key => return Accel::Tcg,
                        _ => {}
                    }
                }
            }
        }
        let run = || -> Result<bool> {
            let (spec, dirs) = probe()?;
            let vm = TestVm::start(
                "kvm-probe",
                bin,
                &spec,
                dirs,
                Timeouts {
                    shutdown: Duration::from_millis(200),
                    ..timeouts
                },
            )?;
            Ok(vm
                .wait_marker("KVM probe", "@@vmdisk probe ok", timeouts.kvm_probe)
                .is_ok())
        };
        let accel = if run().unwrap_or(false) {
            Accel::Kvm
        } else {
            Accel::Tcg
        };
        if let Some(f) = verdict_file {
            let word = if accel == Accel::Kvm { "kvm" } else { "tcg" };
            let _ = fs::write(f, format!("{word}\n{key}\n"));
        }
        accel
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_keeps_plain_words_and_quotes_the_rest() {
        assert_eq!(shell_quote("-m"), "-m");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn timeouts_scale() {
        let t = Timeouts::tcg().scaled(2.0);
        assert_eq!(t.stage1, Timeouts::tcg().stage1 * 2);
    }
}
