//! Known failure signatures: console, qemu and ssh output -> cause and fix.
//!
//! Each signature is a literal that the failing component really prints — the kernel, NixOS's
//! scripted stage 1 (`stage-1-init.sh`), systemd (in the initrd and in stage 2), qemu, OpenSSH,
//! and the Debian test guests' `@@vmdisk` stage scripts — so every rule has a unit test with the
//! real message, and `vmdisk vmtest --explain` runs the same rules over a log a user pasted.
//!
//! [`diagnose_all`] reports every signature that applies, most specific first, in three tiers:
//!
//! ```text
//!   1. causes      image-locked display-unavailable kvm-required hostfwd-port-in-use
//!                  exec-format store-share-missing store-mount-failed root-not-found
//!                  host-key-changed key-permissions ssh-auth-refused sshd-missing
//!   2. where the boot stopped   stage1-failed  emergency-mode  stage-failed
//!   3. kernel-panic             (always reported when the kernel panicked)
//! ```
//!
//! Pure functions over text: no IO, no clocks. The runner attaches console timestamps
//! ([`Diagnosis::at_s`]) afterwards.

use serde::Serialize;

use vmdisk_ssh::signature::{classify, SshFailureKind, SIG_PERMISSION_DENIED};

use crate::console::clean;

/// What went wrong and what to do about it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Diagnosis {
    /// Stable identifier (`store-share-missing`, `host-key-changed`, ...): what `--json`
    /// callers match on.
    pub id: &'static str,
    pub cause: String,
    /// The NixOS option, environment variable or command that fixes it.
    pub fix: String,
    /// The line that matched.
    pub evidence: String,
    /// When the evidence line reached the serial console (seconds since qemu started), for
    /// live runs; `None` for qemu/ssh output and saved logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub at_s: Option<f64>,
}

/// The texts a failed run leaves behind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Evidence<'a> {
    pub console: &'a str,
    pub ssh_stderr: &'a str,
    pub qemu_stderr: &'a str,
}

/// The lines of a text, cleaned of `\r`, ANSI colour codes and other control characters.
fn lines_of(text: &str) -> Vec<String> {
    text.split('\n')
        .map(|l| clean(l.as_bytes()).trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// The cleaned lines of one source (console, qemu or ssh output).
struct Text {
    lines: Vec<String>,
}

impl Text {
    fn new(t: &str) -> Text {
        Text { lines: lines_of(t) }
    }
    fn find(&self, needle: &str) -> Option<(usize, &str)> {
        self.lines
            .iter()
            .enumerate()
            .find(|(_, l)| l.contains(needle))
            .map(|(i, l)| (i, l.as_str()))
    }
    fn find_any(&self, needles: &[&str]) -> Option<(usize, &str)> {
        self.lines
            .iter()
            .enumerate()
            .find(|(_, l)| needles.iter().any(|n| l.contains(n)))
            .map(|(i, l)| (i, l.as_str()))
    }
    fn find_lower(&self, needle: &str) -> Option<(usize, &str)> {
        self.lines
            .iter()
            .enumerate()
            .find(|(_, l)| l.to_ascii_lowercase().contains(needle))
            .map(|(i, l)| (i, l.as_str()))
    }
    fn has(&self, needle: &str) -> bool {
        self.find(needle).is_some()
    }
}

/// The text between `start` and `end` in `line` (after the first `start`).
fn between<'a>(line: &'a str, start: &str, end: &str) -> Option<&'a str> {
    let from = line.find(start)? + start.len();
    let rest = &line[from..];
    let to = rest.find(end)?;
    Some(&rest[..to])
}

/// The first word after `start` in `line`.
fn word_after<'a>(line: &'a str, start: &str) -> Option<&'a str> {
    let from = line.find(start)? + start.len();
    line[from..]
        .split(|c: char| c.is_whitespace() || c == ',' || c == '\'' || c == '"')
        .find(|w| !w.is_empty())
}

const PANIC_ON_FAIL_FIX: &str = "add `boot.panic_on_fail` to the kernel parameters \
     (`boot.kernelParams = [ \"boot.panic_on_fail\" ];`, or per run \
     `QEMU_KERNEL_PARAMS=boot.panic_on_fail`) so a failed boot ends at once instead of waiting \
     at the console; `vmdisk vmtest` adds it to every run";

/// Every signature that applies, most specific first (see the module docs), each id once.
pub fn diagnose_all(ev: Evidence<'_>) -> Vec<Diagnosis> {
    let console = Text::new(ev.console);
    let qemu = Text::new(ev.qemu_stderr);
    let ssh = Text::new(ev.ssh_stderr);
    let mut out: Vec<Diagnosis> = Vec::new();
    let mut push = |id: &'static str, cause: String, fix: String, evidence: &str| {
        if !out.iter().any(|d| d.id == id) {
            out.push(Diagnosis {
                id,
                cause,
                fix,
                evidence: evidence.to_string(),
                at_s: None,
            });
        }
    };
    // Any of the three sources (a pasted log is all three at once).
    let any =
        |f: &dyn Fn(&Text) -> Option<String>| f(&qemu).or_else(|| f(&console)).or_else(|| f(&ssh));

    // ── Tier 1: causes ──────────────────────────────────────────────────────────────────

    if let Some(l) = any(&|t| {
        t.find_any(&[
            "Failed to get \"write\" lock",
            "Failed to get shared \"write\" lock",
        ])
        .map(|(_, l)| l.to_string())
    }) {
        let image = any(&|t| {
            t.find("Is another process using the image [")
                .and_then(|(_, l)| between(l, "image [", "]").map(str::to_string))
        })
        .or_else(|| word_after(&l, "file=").map(str::to_string))
        .unwrap_or_else(|| "the disk image".into());
        push(
            "image-locked",
            format!(
                "qemu could not get the image lock on {image}: another process has it open for \
                 writing (a VM already running from the same nixos.qcow2, qemu-nbd, or `vmdisk \
                 serve`)"
            ),
            format!(
                "stop the other user of the image (`fuser -v {image}` finds it), or run this VM \
                 on an overlay of it: `vmdisk create -f qcow2 -b {image} run.qcow2` and \
                 `NIX_DISK_IMAGE=run.qcow2` (vmdisk vmtest does that by itself); to copy the \
                 running VM's disk, `vmdisk copy --qmp SOCKET {image} copy.qcow2`"
            ),
            &l,
        );
    }

    if let Some(l) = any(&|t| {
        t.find_any(&["gtk initialization failed", "Could not initialize SDL"])
            .map(|(_, l)| l.to_string())
    }) {
        push(
            "display-unavailable",
            "qemu tried to open a window and there is no display: `virtualisation.graphics` \
             defaults to true, and this host is headless (or an SSH session without X11)"
                .into(),
            "run without a window: `virtualisation.graphics = false;` (the serial console then \
             goes to the terminal), or per run `QEMU_OPTS='-display none'` together with \
             `QEMU_KERNEL_PARAMS=console=ttyS0` (console=ttyAMA0 on aarch64) so the console \
             reaches the serial port; `vmdisk vmtest` does both"
                .into(),
            &l,
        );
    }

    if let Some(l) = any(&|t| {
        t.find("CPU model 'host' requires KVM")
            .map(|(_, l)| l.to_string())
    }) {
        push(
            "kvm-required",
            "the VM asks for `-cpu host`, which only KVM (or HVF on macOS) provides, and qemu \
             runs without KVM here (no /dev/kvm, no access to it, or a cloud or nested VM)"
                .into(),
            "override the CPU per run with `QEMU_OPTS='-cpu max'` (a later -cpu wins) or in \
             the configuration with `virtualisation.qemu.options = [ \"-cpu max\" ];`; for \
             speed, give the user access to /dev/kvm (the `kvm` group)"
                .into(),
            &l,
        );
    }

    if let Some(l) = any(&|t| {
        t.find_lower("could not set up host forwarding rule")
            .map(|(_, l)| l.to_string())
    }) {
        let rule = between(&l, "forwarding rule '", "'").unwrap_or("?");
        // tcp:127.0.0.1:2222-:22 -> 2222 (the host port is before the '-').
        let port = rule
            .split('-')
            .next()
            .and_then(|h| h.rsplit(':').next())
            .filter(|p| !p.is_empty())
            .unwrap_or("PORT");
        push(
            "hostfwd-port-in-use",
            format!(
                "qemu could not listen on host port {port} for its forwarding rule '{rule}': \
                 another process holds that port (often another VM started from the same \
                 configuration, or an earlier run still running)"
            ),
            format!(
                "find it with `ss -ltnp 'sport = :{port}'` and stop it, or pick another host \
                 port in `virtualisation.forwardPorts` (`vmdisk vmtest` forwards SSH to a port \
                 it found free by binding port 0)"
            ),
            &l,
        );
    }

    // An architecture mismatch, not a switch_root that could not execute stage 2.
    let exec_format = |t: &Text| {
        t.lines
            .iter()
            .find(|l| {
                let lower = l.to_ascii_lowercase();
                let mismatch = lower.contains("exec format error")
                    || lower.contains("cannot execute binary file")
                    || (lower.contains("error -8")
                        && (lower.contains("failed to execute")
                            || lower.contains("couldn't execute")));
                mismatch && !lower.contains("switch_root") && !lower.contains("switch-root")
            })
            .cloned()
    };
    if let Some(l) = exec_format(&console)
        .or_else(|| exec_format(&ssh))
        .or_else(|| exec_format(&qemu))
    {
        push(
            "exec-format",
            "a program was built for another CPU architecture than the one running it (the \
             kernel answers ENOEXEC: Exec format error)"
                .into(),
            "build for the machine that runs it (`nixpkgs.hostPlatform` of the VM), or let the \
             host run foreign binaries through qemu-user: NixOS `boot.binfmt.emulatedSystems = \
             [ \"aarch64-linux\" ];`, Debian `apt-get install qemu-user-static \
             binfmt-support`; a remote builder must list only the systems it really runs \
             (`nix.buildMachines.*.systems`)"
                .into(),
            &l,
        );
    }

    // The store share: 9p has no device with that tag, or virtiofs has no such tag.
    // Every missing share the console names; the store's is the one tagged nix-store or the
    // one whose mount on /nix/.ro-store failed (microvm.nix tags it ro-store).
    let mut shares = console.lines.iter().filter_map(|l| {
        if let Some(tag) = word_after(l, "no channels available for device ") {
            return Some((l.clone(), tag.to_string(), "9p"));
        }
        let tag = between(l, "virtio-fs: tag <", "> not found")?;
        Some((l.clone(), tag.to_string(), "virtiofs"))
    });
    let is_store = |tag: &str| {
        tag == "nix-store"
            || console
                .lines
                .iter()
                .any(|x| x.contains("/nix/.ro-store") && x.contains(tag))
    };
    let share = shares.find(|(_, tag, _)| is_store(tag));
    if let Some((l, tag, transport)) = share {
        let (cause, fix) = if transport == "9p" {
            (
                format!(
                    "stage 1 mounts the `{tag}` share over 9p on /nix/.ro-store, but the VM \
                     has no virtio-9p device with mount_tag={tag} (vfkit and Apple's \
                     Virtualization framework have no 9p at all, only virtio-fs)"
                ),
                format!(
                    "qemu: `-virtfs local,path=/nix/store,security_model=none,mount_tag={tag}` \
                     (qemu-vm.nix adds it unless `virtualisation.mountHostNixStore = false`); \
                     vfkit: share the store with `--device virtio-fs,sharedDir=/nix/store,\
                     mountTag={tag}` and mount it as virtiofs: `fileSystems.\"/nix/.ro-store\" \
                     = {{ device = \"{tag}\"; fsType = \"virtiofs\"; }};` with \
                     `boot.initrd.availableKernelModules = [ \"virtiofs\" ];`"
                ),
            )
        } else {
            (
                format!(
                    "stage 1 mounts the `{tag}` share over virtio-fs on /nix/.ro-store, but \
                     the VM has no virtio-fs device with tag={tag} (virtiofsd not started, or \
                     the share not declared)"
                ),
                format!(
                    "qemu: start virtiofsd for /nix/store and add `-chardev \
                     socket,id=store,path=SOCKET -device vhost-user-fs-pci,chardev=store,\
                     tag={tag}` (shared memory: `-object memory-backend-memfd,...,share=on`); \
                     vfkit: `--device virtio-fs,sharedDir=/nix/store,mountTag={tag}`"
                ),
            )
        };
        push("store-share-missing", cause, fix, &l);
    }
    if let Some((_, l)) = console.find("@@vmdisk FAIL stage1 store") {
        push(
            "store-mount-failed",
            "stage 1 could not mount the `nix-store` share on /nix/.ro-store".into(),
            "check that the VM exports the store with mount tag `nix-store` over the transport \
             stage 1 expects (9p or virtiofs; for virtiofs, that virtiofsd is running)"
                .into(),
            l,
        );
    }

    if let Some((l, dev)) = root_not_found(&console) {
        push(
            "root-not-found",
            format!(
                "stage 1 found no root filesystem {dev}: no disk has that label or name (a \
                 disk image made before the label was set, an unlabelled qcow2 reused from an \
                 older setup, or a disko partition named differently from \
                 `fileSystems.\"/\".device`)"
            ),
            "give the filesystem the label the configuration expects (`e2label DEVICE nixos`; \
             `vmdisk inspect DISK` lists the labels), or point the configuration at the device \
             it has: `virtualisation.rootDevice = \"/dev/disk/by-id/virtio-root\";` for \
             build-vm and nixos-shell, `fileSystems.\"/\".device` for disko; deleting a stale \
             nixos.qcow2 makes the run script create a fresh, labelled one"
                .into(),
            &l,
        );
    }

    // What ssh said is classified once, by the rules `vmdisk doctor builder` uses too
    // (vmdisk-ssh); here each failure gets the fix that fits a VM's disk.
    let ssh_failure = classify(&ssh.lines.join("\n"));
    match ssh_failure.as_ref().map(|f| (f.kind, f.evidence.as_str())) {
        // The harness pins the VM's key, so a key that is not known is one that changed.
        Some((SshFailureKind::HostKeyChanged | SshFailureKind::HostKeyUnknown, l)) => {
            let host = ssh
                .lines
                .iter()
                .find_map(|l| between(l, "key for ", " has changed").map(str::to_string))
                .unwrap_or_else(|| "[127.0.0.1]:PORT".into());
            push(
                "host-key-changed",
                format!(
                    "the VM presented another SSH host key than the one known for {host}: the \
                     disk was recreated (a fresh nixos.qcow2 gets a fresh key), another VM \
                     answers on that port, or the configuration points sshd at another key \
                     (`services.openssh.hostKeys`)"
                ),
                format!(
                    "if the change is expected, drop the stale entry with `ssh-keygen -R \
                     '{host}'` and pin the new key; keep the key stable by keeping \
                     /etc/ssh/ssh_host_ed25519_key on the VM's disk (nix-darwin's linux-builder \
                     re-pins its key on activation); do not turn StrictHostKeyChecking off"
                ),
                l,
            );
        }
        Some((SshFailureKind::UnprotectedKey, l)) => {
            let path = ssh
                .lines
                .iter()
                .find_map(|x| {
                    between(x, "for '", "' are too open").or_else(|| between(x, "key \"", "\""))
                })
                .unwrap_or("KEY");
            push(
                "key-permissions",
                format!(
                    "ssh ignored the private key {path} because group or others can read it \
                     (ssh accepts only keys readable by their owner alone)"
                ),
                format!("`chmod 600 {path}` (and keep it owned by the user who runs ssh)"),
                l,
            );
        }
        Some((SshFailureKind::KeyUnreadable, l)) => {
            let path = between(l, "Load key \"", "\"").unwrap_or("KEY");
            push(
                "key-permissions",
                format!(
                    "ssh cannot read the private key {path}: it belongs to another user \
                     (nix-daemon connects to builders as root with root's 0600 key)"
                ),
                format!(
                    "run ssh as the key's owner (`sudo ssh -i {path} ...`), or give yourself a \
                     copy with mode 0600 and point your ssh config's IdentityFile at it"
                ),
                l,
            );
        }
        _ => {}
    }
    // sshd's own complaint (StrictModes), on the VM's console or in a pasted log.
    if let Some((_, l)) = console
        .find("Authentication refused: bad ownership or modes")
        .or_else(|| ssh.find("Authentication refused: bad ownership or modes"))
    {
        push(
            "key-permissions",
            "the VM's sshd refused the authorized key because the home directory, ~/.ssh or \
             authorized_keys is writable by others or not owned by the user (StrictModes)"
                .into(),
            "in the guest: `chmod 700 ~/.ssh && chmod 600 ~/.ssh/authorized_keys`, owned by \
             the user; or declare the key in the configuration instead: \
             `users.users.root.openssh.authorizedKeys.keys = [ \"ssh-ed25519 ...\" ];`"
                .into(),
            l,
        );
    }

    // After an ignored key the server still refuses: both are reported, the cause first.
    if let Some((_, l)) = ssh.find(SIG_PERMISSION_DENIED) {
        push(
            "ssh-auth-refused",
            "the VM's sshd refused every offered credential".into(),
            "authorize the key: `users.users.root.openssh.authorizedKeys.keys = [ \"ssh-ed25519 \
             ...\" ];` (or `vmdisk cat DISK /root/.ssh/authorized_keys` to see what the disk \
             has); `vmdisk passwd DISK root` sets a password offline"
                .into(),
            l,
        );
    }

    if let Some(l) = sshd_missing(&console, &ssh) {
        push(
            "sshd-missing",
            "the VM booted to multi-user but runs no SSH server: nothing answers on its port \
             22"
            .into(),
            SSHD_FIX.into(),
            &l,
        );
    }

    // ── Tier 2: where the boot stopped ──────────────────────────────────────────────────

    if let Some(l) = stage1_failed(&console) {
        let why = console
            .find_any(&["mount: mounting ", "stage 2 init script", "switch_root:"])
            .map(|(_, l)| format!(" (the failed step: {l})"))
            .unwrap_or_default();
        push(
            "stage1-failed",
            format!(
                "NixOS's stage 1 (the scripted initrd) failed before it could start stage \
                 2{why}; without boot.panic_on_fail it then waits for a key at the console \
                 forever"
            ),
            PANIC_ON_FAIL_FIX.into(),
            &l,
        );
    }

    if let Some((_, l)) = console.find_any(&[
        "You are in emergency mode",
        "Entering emergency mode",
        "Reached target Emergency Mode",
        "Reached target emergency.target",
    ]) {
        let l = l.to_string();
        let in_initrd = console.has("(Initrd)!") || console.has("/sysroot");
        let failed = console
            .find_any(&[
                "Failed to mount ",
                "Dependency failed for ",
                "Failed to start ",
            ])
            .map(|(_, x)| format!(" (the first failure: {x})"))
            .unwrap_or_default();
        push(
            "emergency-mode",
            format!(
                "systemd{} gave up on a unit the boot needs and entered emergency mode{failed}; \
                 with the root account locked, it then waits for Enter at the console forever",
                if in_initrd {
                    " in the initrd (stage 1)"
                } else {
                    ""
                }
            ),
            format!(
                "the [FAILED] line names the unit; for a shell there, \
                 `boot.initrd.systemd.emergencyAccess = true;` (stage 1) or a root password \
                 (stage 2); {PANIC_ON_FAIL_FIX}"
            ),
            &l,
        );
    }

    if let Some((_, l)) = console.find("@@vmdisk FAIL") {
        push(
            "stage-failed",
            l.trim_start_matches("@@vmdisk FAIL ").to_string(),
            "see the console log in the artifact folder".into(),
            l,
        );
    }

    // ── Tier 3: the kernel panicked ─────────────────────────────────────────────────────

    if let Some((_, l)) = console.find("Kernel panic - not syncing") {
        let reason = l
            .split_once("not syncing:")
            .map_or("", |x| x.1.trim())
            .to_string();
        let context = if reason.contains("sysrq triggered crash") {
            ": systemd's panic-on-fail.service crashed the kernel on purpose after the boot \
             entered emergency mode (boot.panic_on_fail)"
        } else if reason.contains("kill init") && console.has("<<< NixOS Stage 1 >>>") {
            ": stage 1 (PID 1) exited after a failure; with boot.panic_on_fail that is how a \
             stage-1 failure ends"
        } else if reason.contains("No working init found") || reason.contains("VFS:") {
            ": the kernel found no init to start (a missing or unreadable initrd, or a root \
             device it could not mount)"
        } else {
            ""
        };
        push(
            "kernel-panic",
            format!("the guest kernel panicked: {reason}{context}"),
            "read the lines above the panic for its cause; with `panic=1` in the kernel \
             parameters (vmdisk vmtest uses panic=-1 with qemu's -no-reboot) the VM stops \
             instead of hanging"
                .into(),
            l,
        );
    }

    out
}

/// The configuration line that enables SSH (the `sshd-missing` fix).
pub const SSHD_FIX: &str = "enable it in the configuration: `services.openssh.enable = true;` \
     (root logs in with a key by default; `vmdisk vmtest` forwards a free host port to the \
     VM's port 22 itself, for manual use add `virtualisation.forwardPorts = [ { from = \
     \"host\"; host.port = 2222; guest.port = 22; } ];`), or run `vmdisk vmtest --no-ssh` to \
     stop at multi-user";

/// Root not found or not mountable: the line and the device it names.
fn root_not_found(c: &Text) -> Option<(String, String)> {
    if let Some((_, l)) = c.find("@@vmdisk FAIL stage1 root") {
        let dev = l
            .split_whitespace()
            .find(|w| w.starts_with("LABEL="))
            .unwrap_or("LABEL=nixos");
        return Some((l.to_string(), dev.to_string()));
    }
    // Scripted stage 1: "Timed out waiting for device D, trying to mount anyway."
    if let Some((_, l)) = c.find("Timed out waiting for device ") {
        let dev = between(l, "waiting for device ", ",")
            .or_else(|| between(l, "waiting for device ", "."))
            .unwrap_or("?")
            .trim_end_matches('.')
            .to_string();
        let rootish = !l.contains("[ TIME ]")
            || dev.contains("by-label/nixos")
            || dev.contains("/dev/root")
            || c.has("Dependency failed for /sysroot")
            || c.has("Initrd Root Device");
        if rootish {
            return Some((l.to_string(), dev));
        }
    }
    // busybox mount of the root itself: "mount: mounting D on /mnt-root/ failed: ..."
    if let Some((_, l)) = c.lines.iter().enumerate().find(|(_, l)| {
        l.contains("mount: mounting ")
            && (l.contains(" on /mnt-root/ failed") || l.contains(" on /mnt-root failed"))
    }) {
        let dev = between(l, "mount: mounting ", " on ")
            .unwrap_or("?")
            .to_string();
        return Some((l.clone(), dev));
    }
    if let Some((_, l)) = c.find_any(&[
        "Failed to mount /sysroot.",
        "Dependency failed for /sysroot.",
    ]) {
        return Some((l.to_string(), "on /sysroot".into()));
    }
    if let Some((_, l)) = c.find("VFS: Unable to mount root fs") {
        return Some((l.to_string(), "(root=)".into()));
    }
    // Still waiting when the log ends: "waiting for device D to appear....." with no mount of D.
    if let Some((_, l)) = c.find("waiting for device ") {
        if let Some(dev) = between(l, "waiting for device ", " to appear") {
            if !c.has(&format!("mounting {dev} on")) {
                return Some((l.to_string(), dev.to_string()));
            }
        }
    }
    None
}

/// Scripted stage 1 failed: its prompt, a missing stage 2, or PID 1 exiting before stage 2.
fn stage1_failed(c: &Text) -> Option<String> {
    if let Some((_, l)) = c.find_any(&[
        "An error occurred in stage 1 of the boot process",
        "init script (",
    ]) {
        if !l.contains("init script (") || l.contains("not found") {
            return Some(l.to_string());
        }
    }
    if let Some((_, l)) = c.lines.iter().enumerate().find(|(_, l)| {
        let lower = l.to_ascii_lowercase();
        (lower.contains("switch_root") || lower.contains("switch-root"))
            && (lower.contains("exec format error")
                || lower.contains("can't execute")
                || lower.contains("failed to execute"))
    }) {
        return Some(l.clone());
    }
    let (stage1, _) = c.find("<<< NixOS Stage 1 >>>")?;
    let (panic, l) = c.find("Attempted to kill init")?;
    let stage2 = c.find("<<< NixOS Stage 2 >>>").map(|(i, _)| i);
    (panic > stage1 && stage2.is_none_or(|s| s > panic)).then(|| l.to_string())
}

/// Multi-user reached with no SSH unit, and ssh found nothing listening.
fn sshd_missing(c: &Text, ssh: &Text) -> Option<String> {
    c.find_any(&[
        "Reached target Multi-User System",
        "Reached target multi-user.target",
    ])?;
    let ssh_unit = c.lines.iter().any(|l| {
        l.contains("SSH Daemon")
            || l.contains("sshd.service")
            || l.contains("SSH Socket")
            || l.contains("sshd.socket")
    });
    if ssh_unit {
        return None;
    }
    // Nothing answered as sshd: refused, or closed before the banner (qemu's forward accepts
    // and then finds nothing behind it).
    let f = classify(&ssh.lines.join("\n"))?;
    matches!(
        f.kind,
        SshFailureKind::ConnectionRefused | SshFailureKind::ClosedBeforeBanner
    )
    .then_some(f.evidence)
}

/// `key-permissions` found before ssh ran: `path` has mode `mode`, readable by others.
pub fn key_too_open(path: &std::path::Path, mode: u32) -> Diagnosis {
    let p = path.display();
    Diagnosis {
        id: "key-permissions",
        cause: format!(
            "the private key {p} is mode {mode:04o}: group or others can read it, and ssh \
             ignores such keys (\"Permissions {mode:04o} for '{p}' are too open.\")"
        ),
        fix: format!("`chmod 600 {p}` (and keep it owned by the user who runs ssh)"),
        evidence: format!("vmdisk: --key {p} has mode {mode:04o}"),
        at_s: None,
    }
}

/// `sshd-missing` seen live: multi-user reached, no SSH unit, nothing answers on port 22.
pub fn sshd_missing_live(multi_user_line: &str, waited_s: f64, port: u16) -> Diagnosis {
    Diagnosis {
        id: "sshd-missing",
        cause: format!(
            "the VM reached multi-user without starting an SSH server: no SSH unit on the \
             console, and nothing answered on its port 22 (host port {port}) for {waited_s:.1}s \
             after"
        ),
        fix: SSHD_FIX.into(),
        evidence: multi_user_line.to_string(),
        at_s: None,
    }
}

/// The first signature, or none (the harness's single verdict).
pub fn diagnose(ev: Evidence<'_>) -> Option<Diagnosis> {
    diagnose_all(ev).into_iter().next()
}

/// Diagnose a saved log (a console capture with CRLF and colour codes, or what qemu or ssh
/// printed): every rule runs over the whole text.
pub fn explain(log: &str) -> Vec<Diagnosis> {
    diagnose_all(Evidence {
        console: log,
        ssh_stderr: log,
        qemu_stderr: log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(log: &str) -> Vec<&'static str> {
        explain(log).into_iter().map(|d| d.id).collect()
    }
    fn console(c: &str) -> Option<&'static str> {
        diagnose(Evidence {
            console: c,
            ..Default::default()
        })
        .map(|d| d.id)
    }
    fn ssh(s: &str) -> Option<&'static str> {
        diagnose(Evidence {
            ssh_stderr: s,
            ..Default::default()
        })
        .map(|d| d.id)
    }

    #[test]
    fn the_seed_9p_message_names_the_share_and_the_stage1_prompt() {
        let log = "<<< NixOS Stage 1 >>>\r\n\
                   mounting /dev/disk/by-label/nixos on /...\r\n\
                   mounting nix-store on /nix/.ro-store...\r\n\
                   [    0.253387] 9pnet_virtio: no channels available for device nix-store\r\n\
                   mount: mounting nix-store on /mnt-root/nix/.ro-store failed: No such file or directory\r\n\
                   \r\n\
                   An error occurred in stage 1 of the boot process, which must mount the\r\n";
        let d = explain(log);
        let got: Vec<&str> = d.iter().map(|d| d.id).collect();
        assert_eq!(got, ["store-share-missing", "stage1-failed"]);
        assert!(d[0].cause.contains("`nix-store`"), "{}", d[0].cause);
        assert!(d[0].fix.contains("mount_tag=nix-store"));
        assert!(d[0].evidence.contains("no channels available"));
        assert!(!d[0].evidence.contains('\r'));
        assert!(
            d[1].cause.contains("mount: mounting nix-store"),
            "{}",
            d[1].cause
        );
        assert!(d[1].fix.contains("boot.panic_on_fail"));
    }

    #[test]
    fn the_store_share_is_found_among_other_missing_shares() {
        let log = "kernel: virtio-fs: tag <persist> not found\n\
                   kernel: virtio-fs: tag <ro-store> not found\n\
                   mount: /sysroot/nix/.ro-store: wrong fs type, bad option, bad superblock on ro-store, missing codepage\n";
        let d = explain(log);
        assert_eq!(d[0].id, "store-share-missing");
        assert!(d[0].evidence.contains("<ro-store>"), "{}", d[0].evidence);
        assert!(d[0].fix.contains("tag=ro-store"), "{}", d[0].fix);
        // A missing share that is not the store is not this diagnosis.
        assert!(explain("kernel: virtio-fs: tag <persist> not found\n").is_empty());
    }

    #[test]
    fn a_panic_is_reported_next_to_its_cause() {
        let log = "<<< NixOS Stage 1 >>>\n\
                   [ 1.0] 9pnet_virtio: no channels available for device nix-store\n\
                   mount: mounting nix-store on /mnt-root/nix/.ro-store failed: No such file or directory\n\
                   [ 1.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n";
        assert_eq!(
            ids(log),
            ["store-share-missing", "stage1-failed", "kernel-panic"]
        );
        let systemd = "Welcome to \x1b[1mNixOS 26.05 (Initrd)\x1b[0m!\n\
                   Mounting /sysroot/nix/.ro-store...\n\
                   [ 1.0] 9pnet_virtio: no channels available for device nix-store\n\
                   [\x1b[0;1;31mFAILED\x1b[0m] Failed to mount /sysroot/nix/.ro-store.\n\
                   You are in emergency mode. After logging in, type \"journalctl -xb\" to view\n\
                   [ 2.0] Kernel panic - not syncing: sysrq triggered crash\n";
        let d = explain(systemd);
        let got: Vec<&str> = d.iter().map(|d| d.id).collect();
        assert_eq!(
            got,
            ["store-share-missing", "emergency-mode", "kernel-panic"]
        );
        assert!(d[1].cause.contains("in the initrd"), "{}", d[1].cause);
        assert!(
            d[1].cause
                .contains("Failed to mount /sysroot/nix/.ro-store"),
            "{}",
            d[1].cause
        );
        assert!(d[2].cause.contains("panic-on-fail"), "{}", d[2].cause);
    }

    #[test]
    fn root_not_found_in_both_initrd_styles() {
        let scripted = "<<< NixOS Stage 1 >>>\n\
            waiting for device /dev/disk/by-label/nixos to appear.......................\n\
            Timed out waiting for device /dev/disk/by-label/nixos, trying to mount anyway.\n\
            mounting /dev/disk/by-label/nixos on /...\n\
            mount: mounting /dev/disk/by-label/nixos on /mnt-root/ failed: No such file or directory\n";
        let d = explain(scripted);
        assert_eq!(d[0].id, "root-not-found");
        assert!(
            d[0].cause.contains("/dev/disk/by-label/nixos"),
            "{}",
            d[0].cause
        );
        let systemd = "[ TIME ] Timed out waiting for device /dev/disk/by-label/nixos.\n\
            [DEPEND] Dependency failed for /sysroot.\n\
            You are in emergency mode.\n";
        assert_eq!(ids(systemd), ["root-not-found", "emergency-mode"]);
        // Still waiting when the user pasted the log.
        assert_eq!(
            ids("waiting for device /dev/disk/by-partlabel/disk-vda-root to appear......"),
            ["root-not-found"]
        );
        // A device that appeared after a wait is fine.
        assert!(
            ids("waiting for device /dev/vda to appear...\nmounting /dev/vda on /...\n").is_empty()
        );
        // A non-root device timing out under systemd is not the root.
        assert!(ids("[ TIME ] Timed out waiting for device /dev/vdb2.\n").is_empty());
    }

    #[test]
    fn qemu_refusals() {
        let cases = [
            ("gtk initialization failed", "display-unavailable"),
            ("qemu-system-x86_64: CPU model 'host' requires KVM", "kvm-required"),
            ("qemu-kvm: CPU model 'host' requires KVM or HVF", "kvm-required"),
            (
                "qemu-system-x86_64: -netdev user,id=user.0,hostfwd=tcp:127.0.0.1:2222-:22: Could not set up host forwarding rule 'tcp:127.0.0.1:2222-:22'",
                "hostfwd-port-in-use",
            ),
            (
                "qemu-system-x86_64: -netdev user,id=onienet,hostfwd=:0.0.0.0:3040-:22: could not set up host forwarding rule ':0.0.0.0:3040-:22'",
                "hostfwd-port-in-use",
            ),
            (
                "qemu-system-x86_64: -drive cache=writeback,file=/h/nixos.qcow2,id=drive1: Failed to get \"write\" lock\nIs another process using the image [/h/nixos.qcow2]?",
                "image-locked",
            ),
        ];
        for (log, id) in cases {
            assert_eq!(ids(log), [id], "{log}");
        }
        let d = explain(cases[3].0);
        assert!(d[0].cause.contains("port 2222"), "{}", d[0].cause);
        let d = explain(cases[5].0);
        assert!(d[0].fix.contains("fuser -v /h/nixos.qcow2"), "{}", d[0].fix);
    }

    #[test]
    fn exec_format_only_for_an_architecture_mismatch() {
        for log in [
            "error: while setting up the build environment: executing '/nix/store/x-bootstrap-tools/bin/bash': Exec format error",
            "bash: ./hello: cannot execute binary file: Exec format error",
            "[    1.2] Failed to execute /init (error -8)",
        ] {
            assert_eq!(ids(log).first(), Some(&"exec-format"), "{log}");
        }
        let switch =
            "switch_root: can't execute '/nix/store/abc-nixos-system/init': Exec format error";
        assert_eq!(ids(switch), ["stage1-failed"]);
    }

    #[test]
    fn ssh_failures() {
        assert_eq!(
            ssh("@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\nHost key for linux-builder has changed and you have requested strict checking.\nHost key verification failed.\n"),
            Some("host-key-changed")
        );
        let d = explain(
            "Host key for [localhost]:2222 has changed and you have requested strict checking.",
        );
        assert!(
            d[0].fix.contains("ssh-keygen -R '[localhost]:2222'"),
            "{}",
            d[0].fix
        );
        let d = explain("@         WARNING: UNPROTECTED PRIVATE KEY FILE!          @\nPermissions 0640 for '/etc/nix/builder_ed25519' are too open.\nThis private key will be ignored.\nroot@127.0.0.1: Permission denied (publickey).\n");
        let got: Vec<&str> = d.iter().map(|d| d.id).collect();
        assert_eq!(got, ["key-permissions", "ssh-auth-refused"]);
        assert_eq!(
            d[0].fix,
            "`chmod 600 /etc/nix/builder_ed25519` (and keep it owned by the user who runs ssh)"
        );
        let d = explain("Load key \"/etc/nix/builder_ed25519\": Permission denied\n");
        assert_eq!(d[0].id, "key-permissions");
        assert!(
            d[0].fix.contains("sudo ssh -i /etc/nix/builder_ed25519"),
            "{}",
            d[0].fix
        );
        assert_eq!(
            ssh("root@127.0.0.1: Permission denied (publickey,password)."),
            Some("ssh-auth-refused")
        );
    }

    #[test]
    fn sshd_missing_needs_both_the_console_and_ssh() {
        let console = "[  OK  ] Reached target Multi-User System.\n";
        let refused = "kex_exchange_identification: read: Connection reset by peer\n";
        assert_eq!(ids(&format!("{console}{refused}")), ["sshd-missing"]);
        assert!(ids(console).is_empty());
        assert!(ids(&format!("[  OK  ] Started SSH Daemon.\n{console}{refused}")).is_empty());
        assert!(explain(&format!("{console}{refused}"))[0]
            .fix
            .contains("services.openssh.enable = true;"));
    }

    #[test]
    fn harness_guest_markers() {
        assert_eq!(
            console("@@vmdisk FAIL stage1 root: no root device LABEL=nixos after 5s"),
            Some("root-not-found")
        );
        assert_eq!(
            console(
                "[ 1.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
            ),
            Some("kernel-panic")
        );
        assert_eq!(
            console("sh: ./hello: Exec format error"),
            Some("exec-format")
        );
        assert_eq!(console("all fine\n@@vmdisk stage2 ready"), None);
    }

    #[test]
    fn healthy_boots_get_no_id() {
        let scripted = "\n<<< NixOS Stage 1 >>>\n\nloading module virtio_pci...\nrunning udev...\n\
            mounting /dev/disk/by-label/nixos on /...\nmounting nix-store on /nix/.ro-store...\n\
            mounting overlay on /nix/store...\n\n\x1b[1;32m<<< NixOS Stage 2 >>>\x1b[0m\n\n\
            running activation script...\nsetting up /etc...\nstarting systemd...\n\n\
            Welcome to \x1b[1mNixOS 26.05\x1b[0m!\n\n[  OK  ] Started SSH Daemon.\n\
            [  OK  ] Reached target Multi-User System.\n\n<<< Welcome to NixOS 26.05 (x86_64) - ttyS0 >>>\n";
        assert!(ids(scripted).is_empty(), "{:?}", explain(scripted));
    }
}
