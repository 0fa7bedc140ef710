//! What a NixOS boot prints, read line by line: the boot phases with the time each was reached,
//! and the line that ends a failed boot — for both stage-1 styles.
//!
//! ```text
//!   scripted initrd (stage-1-init.sh)          systemd initrd (boot.initrd.systemd, 26.05's default)
//!   <<< NixOS Stage 1 >>>              stage1  Welcome to NixOS … (Initrd)!
//!   mounting D on /...            root-mounted [  OK  ] Mounted /sysroot.  (D from "Found device D.")
//!   mounting T on /nix/.ro-store... store-mounted [  OK  ] Mounted /sysroot/nix/.ro-store.
//!   mounting overlay on /nix/store... store-overlay [  OK  ] Mounted /sysroot/nix/store.
//!   <<< NixOS Stage 2 >>>         switch-root  Starting Switch Root...
//!   then systemd in both:  [  OK  ] Reached target Multi-User System.   multi-user
//! ```
//!
//! A scripted mount is done when the next step starts (stage 1 prints only the start of each
//! mount), so its time is that next line's. The failure lines (stage 1's error prompt, a failed
//! mount, emergency mode, a kernel panic, the 9p store share missing) end the watch at once:
//! the runner diagnoses seconds after the line, never at a timeout. Pure: fed [`Line`]s, no IO.

use std::time::Duration;

use serde::Serialize;

use crate::console::Line;

/// Which stage 1 the guest runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InitrdStyle {
    /// NixOS's stage-1-init.sh (`boot.initrd.systemd.enable = false`).
    Scripted,
    /// systemd in the initrd.
    Systemd,
}

/// The phase ids, in boot order.
pub const PHASES: &[&str] = &[
    "stage1",
    "root-mounted",
    "store-mounted",
    "store-overlay",
    "switch-root",
    "multi-user",
    "sshd-answering",
    "ssh-login",
];

/// One boot phase reached.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Phase {
    /// One of [`PHASES`].
    pub id: &'static str,
    /// Seconds since qemu started.
    pub at_s: f64,
    /// What the console (or SSH) said about it: the device, the share, the unit.
    pub detail: String,
}

/// The line that ended a failed boot.
#[derive(Clone, Debug, PartialEq)]
pub struct Failure {
    pub line: String,
    pub at: Duration,
}

/// A mount stage 1 started and has not finished yet (scripted style).
#[derive(Clone, Debug)]
struct PendingMount {
    what: String,
    point: String,
}

/// Follows one boot's console.
#[derive(Debug, Default)]
pub struct Watcher {
    style: Option<InitrdStyle>,
    phases: Vec<Phase>,
    pending: Option<PendingMount>,
    /// The root device systemd found ("Found device /dev/disk/by-label/nixos.").
    found_device: Option<String>,
    sshd_unit: Option<String>,
    in_stage2: bool,
    failure: Option<Failure>,
}

fn secs(d: Duration) -> f64 {
    (d.as_secs_f64() * 1000.0).round() / 1000.0
}

/// "[  OK  ] Mounted /sysroot." or, with systemd's combined unit format,
/// "[  OK  ] Mounted sysroot.mount - /sysroot." -> "/sysroot".
fn mounted_path(text: &str) -> Option<&str> {
    let rest = text.split_once("Mounted ")?.1.trim_end_matches('.');
    Some(rest.rsplit_once(" - ").map_or(rest, |(_, p)| p).trim())
}

/// "mounting D on /P..." -> (D, /P).
fn scripted_mount(text: &str) -> Option<(String, String)> {
    let rest = text.strip_prefix("mounting ")?;
    let (what, point) = rest.split_once(" on ")?;
    let point = point.strip_suffix("...")?;
    Some((what.to_string(), point.to_string()))
}

impl Watcher {
    pub fn new() -> Watcher {
        Watcher::default()
    }

    /// The stage-1 style, once its first line was seen.
    pub fn style(&self) -> Option<InitrdStyle> {
        self.style
    }

    /// The phases reached so far, in the order they were reached.
    pub fn phases(&self) -> &[Phase] {
        &self.phases
    }

    pub fn phase(&self, id: &str) -> Option<&Phase> {
        self.phases.iter().find(|p| p.id == id)
    }

    /// The line that ended the boot, if one did.
    pub fn failure(&self) -> Option<&Failure> {
        self.failure.as_ref()
    }

    /// The SSH unit's status line ("Started SSH Daemon."), if systemd printed one.
    pub fn sshd_unit(&self) -> Option<&str> {
        self.sshd_unit.as_deref()
    }

    /// Record a phase reached outside the console (the SSH banner, the first login).
    pub fn reach(&mut self, id: &'static str, at: Duration, detail: impl Into<String>) {
        if self.phase(id).is_none() {
            self.phases.push(Phase {
                id,
                at_s: secs(at),
                detail: detail.into(),
            });
        }
    }

    /// Add what was learnt later (over SSH) to a phase's detail.
    pub fn annotate(&mut self, id: &str, more: &str) {
        if let Some(p) = self.phases.iter_mut().find(|p| p.id == id) {
            p.detail = format!("{}; {more}", p.detail);
        }
    }

    fn finish_pending(&mut self, at: Duration) {
        if let Some(m) = self.pending.take() {
            let id = match m.point.as_str() {
                "/" => "root-mounted",
                "/nix/.ro-store" => "store-mounted",
                "/nix/store" => "store-overlay",
                _ => return,
            };
            self.reach(id, at, format!("{} on {}", m.what, m.point));
        }
    }

    fn fail(&mut self, line: &Line) {
        if self.failure.is_none() {
            self.pending = None;
            self.failure = Some(Failure {
                line: line.text.trim().to_string(),
                at: line.at,
            });
        }
    }

    /// Take one console line.
    pub fn feed(&mut self, line: &Line) {
        let t = line.text.trim();
        if t.is_empty() || self.failure.is_some() {
            return;
        }
        if is_failure(t, self.in_stage2) {
            self.fail(line);
            return;
        }
        let at = line.at;

        // Stage 1 starts.
        if t.contains("<<< NixOS Stage 1 >>>") {
            self.style = Some(InitrdStyle::Scripted);
            self.reach("stage1", at, "scripted initrd (<<< NixOS Stage 1 >>>)");
            return;
        }
        if t.starts_with("Welcome to ") && t.ends_with("!") {
            if t.contains("(Initrd)") {
                self.style = Some(InitrdStyle::Systemd);
                self.reach("stage1", at, "systemd initrd");
            } else if self.phase("stage1").is_some() {
                // systemd of the real root after switch-root (systemd initrd) or after
                // stage-2-init.sh's "starting systemd..." (scripted initrd).
                self.in_stage2 = true;
                self.reach("switch-root", at, "systemd started on the real root");
            }
            return;
        }

        // Scripted stage 1: each "mounting" line ends the mount before it.
        if let Some((what, point)) = scripted_mount(t) {
            self.finish_pending(at);
            self.pending = Some(PendingMount { what, point });
            return;
        }
        if t.contains("<<< NixOS Stage 2 >>>") {
            self.finish_pending(at);
            self.in_stage2 = true;
            self.reach("switch-root", at, "stage 2 (<<< NixOS Stage 2 >>>)");
            return;
        }

        // systemd (initrd and stage 2).
        if let Some(rest) = t.split_once("Found device ").map(|x| x.1) {
            if self.found_device.is_none() {
                let dev = rest.trim_end_matches('.');
                let dev = dev.rsplit_once(" - ").map_or(dev, |(_, d)| d);
                self.found_device = Some(dev.trim().to_string());
            }
            return;
        }
        if t.contains("Mounted ") {
            match mounted_path(t) {
                Some("/sysroot") => {
                    let dev = self
                        .found_device
                        .clone()
                        .unwrap_or_else(|| "the root device".into());
                    self.reach("root-mounted", at, format!("{dev} on /sysroot"));
                }
                Some("/sysroot/nix/.ro-store") => self.reach(
                    "store-mounted",
                    at,
                    "the store share on /sysroot/nix/.ro-store",
                ),
                Some("/sysroot/nix/store") => {
                    self.reach("store-overlay", at, "overlay on /sysroot/nix/store")
                }
                _ => {}
            }
            return;
        }
        if t.contains("Starting Switch Root") || t.contains("Starting initrd-switch-root.service") {
            self.reach("switch-root", at, "systemd initrd: Switch Root");
            return;
        }
        if t.contains("Reached target Multi-User System")
            || t.contains("Reached target multi-user.target")
        {
            self.reach(
                "multi-user",
                at,
                t.trim_start_matches("[  OK  ] ").to_string(),
            );
            return;
        }
        if self.sshd_unit.is_none()
            && (t.contains("Started SSH Daemon")
                || t.contains("Started sshd.service")
                || t.contains("Listening on SSH Socket")
                || t.contains("Listening on sshd.socket"))
        {
            self.sshd_unit = Some(t.trim_start_matches("[  OK  ] ").to_string());
        }
    }
}

/// Lines after which the boot cannot go on by itself.
fn is_failure(t: &str, in_stage2: bool) -> bool {
    if t.contains("Kernel panic - not syncing")
        || t.contains("9pnet_virtio: no channels available for device nix-store")
        || t.contains("An error occurred in stage 1 of the boot process")
        || t.contains("You are in emergency mode")
        || t.contains("Entering emergency mode")
        || t.contains("Reached target Emergency Mode")
        || t.contains("Failed to mount /sysroot")
        || t.contains("Dependency failed for /sysroot")
        || t.contains("Dependency failed for Initrd")
        || (t.contains("init script (") && t.contains("not found"))
        || t.contains("@@vmdisk FAIL")
    {
        return true;
    }
    // busybox (and util-linux) mount failures in stage 1.
    !in_stage2 && t.starts_with("mount: ") && (t.contains("failed") || t.contains("/mnt-root"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feed(w: &mut Watcher, lines: &[(f64, &str)]) {
        for (at, text) in lines {
            w.feed(&Line {
                at: Duration::from_secs_f64(*at),
                text: crate::console::clean(text.as_bytes()),
            });
        }
    }

    fn ids(w: &Watcher) -> Vec<&'static str> {
        w.phases().iter().map(|p| p.id).collect()
    }

    #[test]
    fn scripted_boot_reaches_every_phase_in_order() {
        let mut w = Watcher::new();
        feed(
            &mut w,
            &[
                (0.5, ""),
                (0.5, "<<< NixOS Stage 1 >>>"),
                (0.6, "loading module virtio_pci..."),
                (0.9, "running udev..."),
                (1.0, "mounting /dev/disk/by-label/nixos on /..."),
                (1.1, "mounting nix-store on /nix/.ro-store..."),
                (1.2, "mounting tmpfs on /nix/.rw-store..."),
                (1.3, "mounting overlay on /nix/store..."),
                (1.4, "mounting shared on /tmp/shared..."),
                (1.5, "\x1b[1;32m<<< NixOS Stage 2 >>>\x1b[0m\r"),
                (1.6, "running activation script..."),
                (1.7, "starting systemd..."),
                (1.8, "Welcome to \x1b[1mNixOS 26.05\x1b[0m!"),
                (2.0, "[  OK  ] Started SSH Daemon."),
                (2.1, "[  OK  ] Reached target Multi-User System."),
            ],
        );
        assert_eq!(w.style(), Some(InitrdStyle::Scripted));
        assert_eq!(
            ids(&w),
            [
                "stage1",
                "root-mounted",
                "store-mounted",
                "store-overlay",
                "switch-root",
                "multi-user"
            ]
        );
        let root = w.phase("root-mounted").unwrap();
        assert_eq!(root.detail, "/dev/disk/by-label/nixos on /");
        // Done when the next step started.
        assert_eq!(root.at_s, 1.1);
        assert_eq!(w.phase("store-overlay").unwrap().at_s, 1.4);
        assert_eq!(w.sshd_unit(), Some("Started SSH Daemon."));
        assert!(w.failure().is_none());
    }

    #[test]
    fn systemd_initrd_boot_reaches_every_phase_in_order() {
        let mut w = Watcher::new();
        feed(
            &mut w,
            &[
                (0.4, "Welcome to \x1b[1mNixOS 26.05 (Initrd)\x1b[0m!"),
                (0.6, "[  OK  ] Found device /dev/disk/by-label/nixos."),
                (0.7, "[  OK  ] Reached target Initrd Root Device."),
                (0.8, "         Mounting /sysroot..."),
                (0.9, "[  OK  ] Mounted /sysroot."),
                (
                    1.0,
                    "[  OK  ] Mounted sysroot-nix-.ro\\x2dstore.mount - /sysroot/nix/.ro-store.",
                ),
                (1.1, "[  OK  ] Mounted /sysroot/nix/store."),
                (1.2, "         Starting Switch Root..."),
                (1.5, "Welcome to \x1b[1mNixOS 26.05\x1b[0m!"),
                (1.9, "[  OK  ] Reached target Multi-User System."),
            ],
        );
        assert_eq!(w.style(), Some(InitrdStyle::Systemd));
        assert_eq!(
            ids(&w),
            [
                "stage1",
                "root-mounted",
                "store-mounted",
                "store-overlay",
                "switch-root",
                "multi-user"
            ]
        );
        assert_eq!(
            w.phase("root-mounted").unwrap().detail,
            "/dev/disk/by-label/nixos on /sysroot"
        );
        assert_eq!(w.phase("switch-root").unwrap().at_s, 1.2);
        assert_eq!(w.sshd_unit(), None);
    }

    #[test]
    fn failures_end_the_watch_at_their_line() {
        let mut w = Watcher::new();
        feed(
            &mut w,
            &[
                (0.5, "<<< NixOS Stage 1 >>>"),
                (1.0, "mounting /dev/disk/by-label/nixos on /..."),
                (1.1, "mounting nix-store on /nix/.ro-store..."),
                (1.2, "[    1.2] 9pnet_virtio: no channels available for device nix-store"),
                (1.3, "mount: mounting nix-store on /mnt-root/nix/.ro-store failed: No such file or directory"),
            ],
        );
        let f = w.failure().unwrap();
        assert_eq!(f.at, Duration::from_secs_f64(1.2));
        assert!(f.line.contains("no channels available"));
        assert_eq!(ids(&w), ["stage1", "root-mounted"]);

        for line in [
            "[FAILED] Failed to mount /sysroot/nix/.ro-store.",
            "You are in emergency mode. After logging in, type \"journalctl -xb\" to view",
            "[   3.1] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100",
            "An error occurred in stage 1 of the boot process, which must mount the",
            "stage 2 init script (/mnt-root//nix/store/x/init) not found",
            "mount: mounting /dev/disk/by-label/nixos on /mnt-root/ failed: No such file or directory",
        ] {
            let mut w = Watcher::new();
            feed(&mut w, &[(1.0, line)]);
            assert!(w.failure().is_some(), "{line}");
        }
        // A failed mount in stage 2 is not stage 1's end.
        let mut w = Watcher::new();
        feed(
            &mut w,
            &[
                (0.1, "<<< NixOS Stage 1 >>>"),
                (0.2, "<<< NixOS Stage 2 >>>"),
                (0.3, "mount: /nix/store: bind /nix/store failed."),
            ],
        );
        assert!(w.failure().is_none());
    }
}
