//! Golden tests for the vfkit backend (`vmdisk_vm::vfkit`).
//!
//! vfkit runs only on macOS, so on this CI the argv is the evidence: each golden under
//! `tests/golden/` is reviewed against crc-org/vfkit `doc/usage.md`.
//!
//! - `vfkit-x86_64.txt`: an x86_64 guest on an x86_64 (Intel) Mac, one argument per line;
//! - `vfkit-aarch64.txt`: an aarch64 guest on an Apple silicon Mac, one argument per line;
//! - `vfkit-aarch64-script.txt`: the launcher script for the aarch64 guest.
//!
//! Both guests share the store over virtio-fs as `nix-store`, boot a raw disk, reach SSH over
//! vsock, log the console to a file and put vfkit's REST API on a unix socket.
//!
//! After an intended change, rewrite the goldens instead of comparing, then review the diff:
//!
//! ```text
//! VMDISK_UPDATE_GOLDENS=1 cargo test -p vmdisk-vm --test vfkit_golden
//! git diff crates/vmdisk-vm/tests/golden
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;

use vmdisk_vm::def::VmDef;
use vmdisk_vm::vfkit::{self, VfkitDisk, VfkitInputs, VfkitSpec, VfkitSsh};
use vmdisk_vm::Arch;

/// Set to 1 to rewrite the goldens from the current output.
const UPDATE_ENV: &str = "VMDISK_UPDATE_GOLDENS";

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// A line diff (longest common subsequence; goldens are short): `-` golden, `+` got.
fn diff(want: &str, got: &str) -> String {
    let a: Vec<&str> = want.lines().collect();
    let b: Vec<&str> = got.lines().collect();
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            out.push_str(&format!("  {}\n", a[i]));
            i += 1;
            j += 1;
        } else if i < a.len() && (j == b.len() || lcs[i + 1][j] >= lcs[i][j + 1]) {
            out.push_str(&format!("- {}\n", a[i]));
            i += 1;
        } else {
            out.push_str(&format!("+ {}\n", b[j]));
            j += 1;
        }
    }
    out
}

fn check_golden(name: &str, got: &str) {
    let path = golden_dir().join(name);
    if std::env::var_os(UPDATE_ENV).is_some_and(|v| v == "1") {
        std::fs::create_dir_all(golden_dir()).unwrap();
        std::fs::write(&path, got).unwrap();
        eprintln!("rewrote {}", path.display());
        return;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "reading {}: {e}; create it with {UPDATE_ENV}=1 cargo test -p vmdisk-vm --test \
             vfkit_golden",
            path.display()
        )
    });
    if want != got {
        panic!(
            "{} differs from the output (- golden, + got):\n{}\nIf the change is intended: \
             {UPDATE_ENV}=1 cargo test -p vmdisk-vm --test vfkit_golden",
            path.display(),
            diff(&want, got)
        );
    }
}

/// A definition as testvms/*.toml would give it, shaped for vfkit.
fn def(name: &str, arch: &str) -> VmDef {
    VmDef::parse(
        &format!(
            "name = \"{name}\"\narch = \"{arch}\"\nmemory_mib = 1024\ncpus = 2\n\
             layout = \"layouts/esp-swap-root.json\"\ndisk_format = \"raw\"\n\
             store = \"virtiofs\"\n"
        ),
        Path::new("/Users/me/vmdisk/testvms"),
    )
    .unwrap()
}

/// The spec the harness would build on a Mac for `arch`, under /Users/me/vmdisk.
fn spec(arch: Arch) -> VfkitSpec {
    let name = format!("vfkit-{arch}");
    let guest = PathBuf::from(format!("/Users/me/vmdisk/guest/{arch}"));
    let run = PathBuf::from(format!("/Users/me/vmdisk/runs/{name}"));
    let kernel = match arch {
        Arch::X86_64 => "bzImage",
        Arch::Aarch64 => "Image",
    };
    vfkit::from_def(
        &def(&name, arch.uname()),
        VfkitInputs {
            kernel: guest.join(kernel),
            initrd: guest.join("initrd.img"),
            append: "quiet panic=-1 init=/nix/store/0123456789abcdef-vmdisk-system/init \
                     vmdisk.root=LABEL=nixos vmdisk.store=virtiofs"
                .into(),
            disk: VfkitDisk::Raw(run.join("disk.raw")),
            store: guest.join("store"),
            run_dir: run.clone(),
            ssh: VfkitSsh::Vsock {
                port: vfkit::SSH_VSOCK_PORT,
                socket: run.join("ssh.sock"),
            },
        },
    )
    .unwrap()
}

fn lines(args: &[String]) -> String {
    let mut s = String::new();
    for a in args {
        assert!(!a.contains('\n'), "an argument spans lines: {a:?}");
        s.push_str(a);
        s.push('\n');
    }
    s
}

#[test]
fn x86_64_guest_on_an_intel_mac() {
    let a = vfkit::args(&spec(Arch::X86_64), Arch::X86_64).unwrap();
    check_golden("vfkit-x86_64.txt", &lines(&a));
}

#[test]
fn aarch64_guest_on_apple_silicon() {
    let a = vfkit::args(&spec(Arch::Aarch64), Arch::Aarch64).unwrap();
    check_golden("vfkit-aarch64.txt", &lines(&a));
}

#[test]
fn aarch64_launcher_script() {
    let s = vfkit::script(&spec(Arch::Aarch64), Arch::Aarch64).unwrap();
    check_golden("vfkit-aarch64-script.txt", &s);
}

#[test]
fn the_goldens_use_only_flags_and_devices_from_vfkits_usage_doc() {
    // Everything doc/usage.md documents that we use; a new flag must be added here on purpose,
    // after checking the doc.
    const FLAGS: &[&str] = &[
        "--cpus",
        "--memory",
        "--bootloader",
        "--device",
        "--restful-uri",
    ];
    const DEVICES: &[&str] = &[
        "virtio-blk",
        "nbd",
        "virtio-fs",
        "virtio-net",
        "virtio-vsock",
        "virtio-serial",
        "virtio-rng",
    ];
    for arch in [Arch::X86_64, Arch::Aarch64] {
        let a = vfkit::args(&spec(arch), arch).unwrap();
        for pair in a.chunks(2) {
            assert!(FLAGS.contains(&pair[0].as_str()), "{}", pair[0]);
            if pair[0] == "--device" {
                let kind = pair[1].split(',').next().unwrap();
                assert!(DEVICES.contains(&kind), "{kind}");
            }
        }
    }
}

/// The script, run by a real `sh` with a fake vfkit that prints its argv, hands vfkit exactly
/// the argv of `args`, even for paths with spaces and quotes.
#[test]
fn the_script_passes_the_argv_through_sh_unchanged() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("it's a run");
    let mut s = spec(Arch::Aarch64);
    s.serial_log = run.join("serial $HOME `x`.log");
    s.rest_socket = run.join("rest.sock");
    s.ssh = VfkitSsh::Vsock {
        port: 22,
        socket: run.join("ssh.sock"),
    };
    let host = Arch::host().unwrap_or(Arch::Aarch64);
    s.arch = host;
    let want = vfkit::args(&s, host).unwrap();

    let fake = dir.path().join("fake-vfkit");
    std::fs::write(
        &fake,
        "#!/bin/sh\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let script = dir.path().join("run-vfkit.sh");
    std::fs::write(&script, vfkit::script(&s, host).unwrap()).unwrap();

    let out = Command::new("sh")
        .arg(&script)
        .arg("--log-level")
        .arg("debug")
        .env("VFKIT", &fake)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut want = lines(&want);
    want.push_str("--log-level\ndebug\n");
    assert_eq!(String::from_utf8(out.stdout).unwrap(), want);
    assert!(run.is_dir(), "the script creates the run folder");
}
