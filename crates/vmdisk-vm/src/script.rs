//! A user's `run-*-vm` script (nixos-rebuild build-vm, nixos-shell, vmWithDisko, the
//! linux-builder's): what it is for, read from its text, and the environment that plumbs a run
//! through the script's own interface.
//!
//! qemu-vm.nix's script takes `QEMU_OPTS` (appended word-split to qemu's argv), `QEMU_NET_OPTS`
//! (spliced into `-netdev user,...`), `QEMU_KERNEL_PARAMS` (the end of `-append`),
//! `NIX_DISK_IMAGE` (the root disk; default `./NAME.qcow2`, created by
//! `createEmptyFilesystemImage` when missing), `TMPDIR` + `USE_TMPDIR` (its scratch folder) and
//! `SHARED_DIR` (the `shared` 9p share). [`script_env`] fills them so the script boots with the
//! serial console on our socket (`console=` of the script's architecture, last so it is
//! /dev/console), `boot.panic_on_fail`, no display, `-no-reboot`, QMP, and SSH forwarded to a
//! free port. Pure apart from [`RunScript::load`] reading the file.

use std::fs;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::Arch;

/// A run script is a few KiB of bash; anything this big is not one.
const MAX_SCRIPT_BYTES: u64 = 1 << 20;

/// What a run script says about the VM it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunScript {
    pub path: PathBuf,
    /// The guest architecture, from the qemu binary the script runs.
    pub arch: Arch,
    /// How [`RunScript::arch`] was decided (for the report).
    pub arch_from: String,
    /// `${NIX_DISK_IMAGE:-./nixos.qcow2}`'s default, when the script has a root disk at all.
    pub disk_default: Option<String>,
    /// The size `createEmptyFilesystemImage "$NIX_DISK_IMAGE" SIZE` makes a missing disk with.
    pub fresh_disk_size: Option<u64>,
    /// The label that function gives the filesystem (`mkfs.ext4 -L nixos`).
    pub fresh_disk_label: Option<String>,
    /// `-serial` options the script passes itself: our console is the serial port after them.
    pub own_serials: usize,
    /// The script runs qemu with `-nographic` (`virtualisation.graphics = false`).
    pub nographic: bool,
}

/// The words of a shell text: split on whitespace, quotes and `=`, so that `path=/x` and
/// `"$(cat /x)"` yield `/x`.
fn words(text: &str) -> impl Iterator<Item = &str> {
    text.split(|c: char| {
        c.is_whitespace() || c == '"' || c == '\'' || c == '=' || c == '(' || c == ')'
    })
    .filter(|w| !w.is_empty())
}

fn file_name(word: &str) -> &str {
    word.rsplit('/').next().unwrap_or(word)
}

fn arch_of_program(name: &str) -> Option<Arch> {
    match name.strip_prefix("qemu-system-")? {
        "x86_64" => Some(Arch::X86_64),
        "aarch64" => Some(Arch::Aarch64),
        _ => None,
    }
}

impl RunScript {
    /// Read and inspect the script at `path`.
    pub fn load(path: &Path) -> Result<RunScript> {
        let md = fs::metadata(path)
            .with_context(|| format!("reading the run script {}", path.display()))?;
        if !md.is_file() {
            bail!(
                "{} is not a file (give the run script, e.g. ./result/bin/run-nixos-vm)",
                path.display()
            );
        }
        if md.len() > MAX_SCRIPT_BYTES {
            bail!(
                "{} is {} bytes: not a run-*-vm script (those are a few KiB of bash; limit {MAX_SCRIPT_BYTES})",
                path.display(),
                md.len()
            );
        }
        let bytes =
            fs::read(path).with_context(|| format!("reading the run script {}", path.display()))?;
        let text = String::from_utf8_lossy(&bytes);
        RunScript::inspect(path, &text, &|p| fs::canonicalize(p).ok())
    }

    /// Inspect `text` (the script at `path`); `resolve` follows a symlink (for `qemu-kvm`,
    /// which nixpkgs links to the host's qemu-system-ARCH).
    pub fn inspect(
        path: &Path,
        text: &str,
        resolve: &dyn Fn(&Path) -> Option<PathBuf>,
    ) -> Result<RunScript> {
        let (arch, arch_from) = script_arch(text, resolve).with_context(|| {
            format!(
                "{}: cannot tell the guest's architecture (no qemu-system-x86_64 or \
                 qemu-system-aarch64 in the script); is it a run-*-vm script?",
                path.display()
            )
        })?;
        let disk_default = text
            .split("${NIX_DISK_IMAGE:-")
            .nth(1)
            .and_then(|r| r.split('}').next())
            .map(str::to_string);
        let fresh_disk_size = text
            .lines()
            .map(str::trim)
            .find(|l| l.starts_with("createEmptyFilesystemImage") && l.contains("NIX_DISK_IMAGE"))
            .and_then(|l| l.split('"').filter(|w| !w.trim().is_empty()).nth(2))
            .and_then(|s| vmdisk_image::parse_size(s.trim()).ok());
        let fresh_disk_label = text
            .split("createEmptyFilesystemImage()")
            .nth(1)
            .and_then(|body| body.split("\n}").next())
            .and_then(|body| {
                let mut w = body.split_whitespace();
                w.find(|x| *x == "-L").and(w.next())
            })
            .map(|l| l.trim_matches('"').to_string());
        let exec_part = text.rsplit_once("exec ").map_or(text, |(_, e)| e);
        let own_serials = words(exec_part).filter(|w| *w == "-serial").count();
        let nographic = words(exec_part).any(|w| w == "-nographic");
        Ok(RunScript {
            path: path.to_path_buf(),
            arch,
            arch_from,
            disk_default,
            fresh_disk_size,
            fresh_disk_label,
            own_serials,
            nographic,
        })
    }
}

fn script_arch(text: &str, resolve: &dyn Fn(&Path) -> Option<PathBuf>) -> Option<(Arch, String)> {
    for w in words(text) {
        let name = file_name(w);
        if let Some(a) = arch_of_program(name) {
            return Some((a, format!("the script runs {name}")));
        }
        if name == "qemu-kvm" {
            if let Some(a) = resolve(Path::new(w))
                .as_deref()
                .and_then(|p| arch_of_program(file_name(&p.to_string_lossy())))
            {
                return Some((
                    a,
                    format!("the script runs qemu-kvm, a link to qemu-system-{a}"),
                ));
            }
            // nixpkgs links qemu-kvm to the host's own emulator.
            if let Some(a) = Arch::host() {
                return Some((
                    a,
                    format!("the script runs qemu-kvm, the host's qemu-system-{a}"),
                ));
            }
        }
    }
    None
}

/// The kernel's name for serial port `index` of `arch`'s machine (`-machine pc`/`q35` and
/// `virt`).
pub fn serial_console(arch: Arch, index: usize) -> String {
    match arch {
        Arch::X86_64 => format!("ttyS{index}"),
        Arch::Aarch64 => format!("ttyAMA{index}"),
    }
}

/// The environment a run starts from: what the user had set already (kept, ours added after).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct UserEnv {
    pub qemu_opts: Option<String>,
    pub qemu_net_opts: Option<String>,
    pub qemu_kernel_params: Option<String>,
    pub shared_dir: Option<String>,
}

impl UserEnv {
    /// This process's values.
    pub fn from_process() -> UserEnv {
        let get = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        UserEnv {
            qemu_opts: get("QEMU_OPTS"),
            qemu_net_opts: get("QEMU_NET_OPTS"),
            qemu_kernel_params: get("QEMU_KERNEL_PARAMS"),
            shared_dir: get("SHARED_DIR"),
        }
    }
}

/// Everything [`script_env`] needs.
#[derive(Clone, Debug)]
pub struct Plumbing<'a> {
    pub script: &'a RunScript,
    pub serial_socket: &'a Path,
    pub qmp_socket: &'a Path,
    /// Host port forwarded to the guest's port 22.
    pub ssh_port: Option<u16>,
    /// The run's root disk (`NIX_DISK_IMAGE`); `None` leaves the script's default.
    pub disk: Option<&'a Path>,
    /// The run's scratch folder (`TMPDIR`, with `USE_TMPDIR=1`).
    pub tmpdir: &'a Path,
    /// More kernel parameters (the SSH credentials), after ours.
    pub extra_kernel_params: &'a [String],
    pub user: &'a UserEnv,
}

/// The kernel parameters every run adds (after the user's own, so they win).
pub fn run_kernel_params(script: &RunScript, user_serials: usize) -> Vec<String> {
    vec![
        format!(
            "console={}",
            serial_console(script.arch, script.own_serials + user_serials)
        ),
        // stage-1-init.sh and the systemd initrd's panic-on-fail.service: fail, do not wait.
        "boot.panic_on_fail".into(),
        // A panic reboots at once, and -no-reboot turns the reboot into qemu's exit.
        "panic=-1".into(),
        // Unit status lines on the console even with `quiet`: the phases are read from them.
        "systemd.show_status=true".into(),
    ]
}

fn join(a: Option<&str>, b: &str, sep: &str) -> String {
    match a {
        Some(a) if !a.trim().is_empty() => format!("{a}{sep}{b}"),
        _ => b.to_string(),
    }
}

/// The variables to run the script with (on top of the inherited environment).
pub fn script_env(p: &Plumbing<'_>) -> Vec<(String, String)> {
    let user_serials = p.user.qemu_opts.as_deref().map_or(0, |o| {
        o.split_whitespace().filter(|w| *w == "-serial").count()
    });
    let opts = format!(
        "-display none -no-reboot \
         -chardev socket,id=vmdisk-serial,path={},server=on,wait=on -serial chardev:vmdisk-serial \
         -chardev socket,id=vmdisk-qmp,path={},server=on,wait=off -mon chardev=vmdisk-qmp,mode=control",
        crate::qemu::escape_opt(&p.serial_socket.to_string_lossy()),
        crate::qemu::escape_opt(&p.qmp_socket.to_string_lossy()),
    );
    let mut params = run_kernel_params(p.script, user_serials);
    params.extend(p.extra_kernel_params.iter().cloned());
    let mut env = vec![
        (
            "QEMU_OPTS".to_string(),
            join(p.user.qemu_opts.as_deref(), &opts, " "),
        ),
        (
            "QEMU_KERNEL_PARAMS".to_string(),
            join(p.user.qemu_kernel_params.as_deref(), &params.join(" "), " "),
        ),
        (
            "TMPDIR".to_string(),
            p.tmpdir.to_string_lossy().into_owned(),
        ),
        ("USE_TMPDIR".to_string(), "1".to_string()),
    ];
    if let Some(port) = p.ssh_port {
        env.push((
            "QEMU_NET_OPTS".to_string(),
            join(
                p.user.qemu_net_opts.as_deref(),
                &format!("hostfwd=tcp:127.0.0.1:{port}-:22"),
                ",",
            ),
        ));
    } else if let Some(n) = &p.user.qemu_net_opts {
        env.push(("QEMU_NET_OPTS".to_string(), n.clone()));
    }
    if let Some(d) = p.disk {
        env.push((
            "NIX_DISK_IMAGE".to_string(),
            d.to_string_lossy().into_owned(),
        ));
    }
    if let Some(s) = &p.user.shared_dir {
        env.push(("SHARED_DIR".to_string(), s.clone()));
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of seed 004's script (store paths shortened).
    const SEED_SHAPED: &str = r#"#! /nix/store/b-bash-5.2p37/bin/bash
export PATH=/nix/store/c-coreutils-9.7/bin${PATH:+:}$PATH
set -e
createEmptyFilesystemImage() {
  local name=$1
  local size=$2
  local temp=$(mktemp)
  /nix/store/q-qemu-host-cpu-only-10.0.2/bin/qemu-img create -f raw "$temp" "$size"
  /nix/store/e-e2fsprogs-1.47.2-bin/bin/mkfs.ext4 -L nixos "$temp"
  /nix/store/q-qemu-host-cpu-only-10.0.2/bin/qemu-img convert -f raw -O qcow2 "$temp" "$name"
  rm "$temp"
}
NIX_DISK_IMAGE=$(readlink -f "${NIX_DISK_IMAGE:-./nixos.qcow2}") || test -z "$NIX_DISK_IMAGE"
if test -n "$NIX_DISK_IMAGE" && ! test -e "$NIX_DISK_IMAGE"; then
    createEmptyFilesystemImage "$NIX_DISK_IMAGE" "1024M"
fi
cd "$TMPDIR"
exec /nix/store/q-qemu-host-cpu-only-10.0.2/bin/qemu-system-aarch64 -machine virt,gic-version=2,accel=hvf:tcg -cpu max \
    -net nic,netdev=user.0,model=virtio -netdev user,id=user.0,"$QEMU_NET_OPTS" \
    -append "$(cat /nix/store/s-nixos-system/kernel-params) init=/nix/store/s-nixos-system/init console=tty0 console=ttyAMA0,115200n8 $QEMU_KERNEL_PARAMS" \
    -nographic \
    $QEMU_OPTS \
    "$@"
"#;

    fn no_links(_: &Path) -> Option<PathBuf> {
        None
    }

    #[test]
    fn the_seed_script_is_read() {
        let s = RunScript::inspect(Path::new("run-nixos-vm"), SEED_SHAPED, &no_links).unwrap();
        assert_eq!(s.arch, Arch::Aarch64);
        assert_eq!(s.arch_from, "the script runs qemu-system-aarch64");
        assert_eq!(s.disk_default.as_deref(), Some("./nixos.qcow2"));
        assert_eq!(s.fresh_disk_size, Some(1024 << 20));
        assert_eq!(s.fresh_disk_label.as_deref(), Some("nixos"));
        assert_eq!(s.own_serials, 0);
        assert!(s.nographic);
    }

    #[test]
    fn qemu_kvm_is_followed_and_unknown_scripts_refused() {
        let t = "exec /nix/store/q/bin/qemu-kvm -cpu max $QEMU_OPTS";
        let s = RunScript::inspect(Path::new("s"), t, &|_| {
            Some("/nix/store/q/bin/qemu-system-x86_64".into())
        })
        .unwrap();
        assert_eq!(s.arch, Arch::X86_64);
        assert_eq!(s.disk_default, None);
        assert_eq!(s.fresh_disk_size, None);
        let e = RunScript::inspect(Path::new("hello.sh"), "echo hello", &no_links).unwrap_err();
        assert!(
            format!("{e:#}").contains("cannot tell the guest's architecture"),
            "{e:#}"
        );
        let e = RunScript::inspect(
            Path::new("s"),
            "exec qemu-system-riscv64 -M virt",
            &no_links,
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("hello") || format!("{e:#}").contains("architecture"));
    }

    #[test]
    fn the_environment_plumbs_console_panic_display_qmp_and_ssh() {
        let s = RunScript::inspect(Path::new("run-nixos-vm"), SEED_SHAPED, &no_links).unwrap();
        let user = UserEnv {
            qemu_kernel_params: Some("loglevel=7".into()),
            qemu_net_opts: Some("hostfwd=tcp::8080-:80".into()),
            ..Default::default()
        };
        let creds = vec!["systemd.set_credential_binary=tmpfiles.extra:ZA==".to_string()];
        let env = script_env(&Plumbing {
            script: &s,
            serial_socket: Path::new("/t/s,1/serial"),
            qmp_socket: Path::new("/t/qmp"),
            ssh_port: Some(40022),
            disk: Some(Path::new("/t/run.qcow2")),
            tmpdir: Path::new("/t/tmp"),
            extra_kernel_params: &creds,
            user: &user,
        });
        let get = |k: &str| {
            env.iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.as_str())
                .unwrap()
        };
        assert_eq!(
            get("QEMU_OPTS"),
            "-display none -no-reboot -chardev socket,id=vmdisk-serial,path=/t/s,,1/serial,server=on,wait=on \
             -serial chardev:vmdisk-serial -chardev socket,id=vmdisk-qmp,path=/t/qmp,server=on,wait=off \
             -mon chardev=vmdisk-qmp,mode=control"
        );
        assert_eq!(
            get("QEMU_KERNEL_PARAMS"),
            "loglevel=7 console=ttyAMA0 boot.panic_on_fail panic=-1 systemd.show_status=true \
             systemd.set_credential_binary=tmpfiles.extra:ZA=="
        );
        assert_eq!(
            get("QEMU_NET_OPTS"),
            "hostfwd=tcp::8080-:80,hostfwd=tcp:127.0.0.1:40022-:22"
        );
        assert_eq!(get("NIX_DISK_IMAGE"), "/t/run.qcow2");
        assert_eq!((get("TMPDIR"), get("USE_TMPDIR")), ("/t/tmp", "1"));
        assert!(!env.iter().any(|(k, _)| k == "SHARED_DIR"));

        // A script with a -serial of its own: ours is the next port.
        let own = SEED_SHAPED
            .replace("-nographic", "-serial mon:stdio")
            .replace("aarch64", "x86_64");
        let s = RunScript::inspect(Path::new("s"), &own, &no_links).unwrap();
        assert_eq!(run_kernel_params(&s, 0)[0], "console=ttyS1");
    }
}
