//! `vmdisk vmtest` plumbs a run through the script's own interface: a literal copy of seed 004's
//! `run-nixos-vm` (only its /nix/store paths pointed at a fake store) runs a stub
//! `qemu-system-*` that records its argv. The argv must carry our serial console with the
//! script's arch's `console=` last, `boot.panic_on_fail`, `-display none`, `-no-reboot`, QMP,
//! SSH forwarded to a real free port, and the run's overlay instead of the user's disk — which
//! stays sha256-identical.

use std::fs;
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::{require_tool, run_with_timeout, sha256, vmdisk_bin, workspace_root};

/// seed 004's file (the user's story with their run script).
fn seed_004() -> String {
    let dir = workspace_root().join("../shared/seeds");
    let path = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("004_"))
        })
        .unwrap_or_else(|| panic!("no seed 004 in {}", dir.display()));
    fs::read_to_string(path).unwrap()
}

/// The run script as the user pasted it, de-indented.
fn seed_script() -> String {
    let text = seed_004();
    let start = text
        .find("The run-nixos-vm script looks like this:")
        .expect("seed 004 has the run script");
    let body = &text[start..];
    let body = &body[body.find("```bash\n").unwrap() + 8..];
    let body = &body[..body.find("```").unwrap()];
    let indent = body
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| l.len() - l.trim_start().len())
        .min()
        .unwrap();
    let mut out: String = body
        .lines()
        .map(|l| {
            if l.len() >= indent {
                &l[indent..]
            } else {
                l.trim_start()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    out.push('\n');
    out
}

/// A fake /nix/store for the seed's paths: bash, qemu-img and mkfs.ext4 are the host's, the
/// qemu-system binary is `stub`, kernel-params a file.
fn fake_store(root: &Path, script: &str, stub: &Path) -> String {
    let store = root.join("store");
    let mut text = script.to_string();
    let mut paths: Vec<String> = Vec::new();
    let mut rest = script;
    while let Some(i) = rest.find("/nix/store/") {
        let tail = &rest[i..];
        let end = tail[11..]
            .find(|c: char| c == '/' || c.is_whitespace() || c == '"' || c == '}' || c == ')')
            .map_or(tail.len(), |e| e + 11);
        paths.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    paths.sort();
    paths.dedup();
    for p in &paths {
        let name = &p["/nix/store/".len()..];
        let dir = store.join(name);
        fs::create_dir_all(dir.join("bin")).unwrap();
        if name.contains("-bash-") {
            symlink("/bin/bash", dir.join("bin/bash")).unwrap();
        }
        if name.contains("-qemu-") {
            symlink(require_tool("qemu-img"), dir.join("bin/qemu-img")).unwrap();
            for arch in ["x86_64", "aarch64"] {
                symlink(stub, dir.join(format!("bin/qemu-system-{arch}"))).unwrap();
            }
        }
        if name.contains("-e2fsprogs-") {
            symlink(require_tool("mkfs.ext4"), dir.join("bin/mkfs.ext4")).unwrap();
        }
        if name.contains("-nixos-system-") {
            fs::write(dir.join("kernel-params"), "loglevel=4 net.ifnames=0\n").unwrap();
        }
        text = text.replace(p.as_str(), &dir.to_string_lossy());
    }
    // The store share itself (`path=/nix/store,`).
    text.replace("path=/nix/store,", &format!("path={},", store.display()))
}

/// The stub qemu: records its argv (one argument a line) and exits as qemu does on a bad
/// option.
fn write_stub(dir: &Path) -> (PathBuf, PathBuf) {
    let argv = dir.join("argv.txt");
    let stub = dir.join("stub-qemu");
    fs::write(
        &stub,
        format!(
            "#!/bin/sh\n: > {a}\nfor x in \"$0\" \"$@\"; do printf '%s\\n' \"$x\" >> {a}; done\n\
             echo 'stub qemu: argv recorded' >&2\nexit 1\n",
            a = argv.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&stub, fs::Permissions::from_mode(0o755)).unwrap();
    (stub, argv)
}

/// A user's disk as the seed's createEmptyFilesystemImage makes it: raw, mkfs.ext4 -L nixos,
/// converted to qcow2.
fn user_disk(dir: &Path) -> PathBuf {
    let raw = dir.join("nixos.raw");
    let f = fs::File::create(&raw).unwrap();
    f.set_len(64 << 20).unwrap();
    drop(f);
    let mkfs = run_with_timeout(
        Command::new(require_tool("mkfs.ext4"))
            .args(["-q", "-F", "-L", "nixos"])
            .arg(&raw),
        Duration::from_secs(60),
    );
    assert!(mkfs.status.success(), "{}", mkfs.stderr);
    let disk = dir.join("nixos.qcow2");
    let conv = run_with_timeout(
        Command::new(require_tool("qemu-img"))
            .args(["convert", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&disk),
        Duration::from_secs(60),
    );
    assert!(conv.status.success(), "{}", conv.stderr);
    fs::remove_file(&raw).unwrap();
    disk
}

fn after(argv: &[String], flag: &str) -> Vec<String> {
    argv.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].clone())
        .collect()
}

/// Run the seed's script (its qemu-system-ARCH named `arch`) through `vmdisk vmtest`.
fn plumb(tmp: &Path, arch: &str) -> (Vec<String>, serde_json::Value, PathBuf, String, PathBuf) {
    let (stub, argv_file) = write_stub(tmp);
    let mut script = seed_script();
    assert!(script.contains("qemu-system-aarch64 -machine virt"));
    if arch != "aarch64" {
        script = script.replace("qemu-system-aarch64", &format!("qemu-system-{arch}"));
    }
    let script = fake_store(tmp, &script, &stub);
    let path = tmp.join("run-nixos-vm");
    fs::write(&path, &script).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    let disk = user_disk(tmp);
    let before = sha256(&disk);
    let work = tmp.join("work");
    fs::create_dir_all(&work).unwrap();
    let mut cmd = Command::new(vmdisk_bin());
    cmd.args(["vmtest", "--json", "--timeout", "60"])
        .arg(&path)
        .current_dir(tmp)
        .env("TMPDIR", &work)
        .env("QEMU_KERNEL_PARAMS", "loglevel=7")
        .env("QEMU_NET_OPTS", "hostfwd=tcp:127.0.0.1:0-:80")
        .env_remove("NIX_DISK_IMAGE")
        .env_remove("QEMU_OPTS")
        .env_remove("SHARED_DIR");
    let r = run_with_timeout(&mut cmd, Duration::from_secs(120));
    let v: serde_json::Value = serde_json::from_str(&r.stdout)
        .unwrap_or_else(|e| panic!("no JSON ({e}): {}\n{}", r.stdout, r.stderr));
    assert_eq!(r.code(), 1, "the stub exits 1: {}", r.stdout);
    assert_eq!(sha256(&disk), before, "the user's disk changed");
    let argv: Vec<String> = fs::read_to_string(&argv_file)
        .unwrap_or_else(|e| panic!("the stub never ran ({e}): {}", r.stdout))
        .lines()
        .map(str::to_string)
        .collect();
    (argv, v, disk, script, work)
}

#[test]
fn the_seed_script_gets_console_panic_display_qmp_ssh_and_an_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let (argv, v, disk, script, work) = plumb(tmp.path(), "aarch64");
    assert!(argv[0].ends_with("/bin/qemu-system-aarch64"), "{argv:?}");
    assert_eq!(v["arch"], "aarch64");
    assert_eq!(v["arch_from"], "the script runs qemu-system-aarch64");
    // The script's own arguments come first, ours after them (`$QEMU_OPTS` is last).
    assert!(argv.iter().any(|a| a == "-nographic"));
    let display = argv.iter().position(|a| a == "-display").expect("-display");
    assert_eq!(argv[display + 1], "none");
    assert!(display > argv.iter().position(|a| a == "-nographic").unwrap());
    assert!(argv.iter().any(|a| a == "-no-reboot"), "{argv:?}");
    let chardevs = after(&argv, "-chardev");
    let serial = chardevs
        .iter()
        .find(|c| c.starts_with("socket,id=vmdisk-serial,path="))
        .expect("serial chardev");
    assert!(serial.ends_with(",server=on,wait=on"), "{serial}");
    assert_eq!(after(&argv, "-serial"), ["chardev:vmdisk-serial"]);
    assert!(chardevs
        .iter()
        .any(|c| c.starts_with("socket,id=vmdisk-qmp,path=")));
    assert_eq!(after(&argv, "-mon"), ["chardev=vmdisk-qmp,mode=control"]);
    // The serial and QMP sockets are in vmdisk's own temporary folder.
    let sock =
        serial["socket,id=vmdisk-serial,path=".len()..].trim_end_matches(",server=on,wait=on");
    assert!(Path::new(sock).is_absolute(), "{sock}");

    // SSH: the user's QEMU_NET_OPTS kept, ours added, on a port that was free.
    let netdev = after(&argv, "-netdev");
    assert_eq!(netdev.len(), 1);
    let fwd = netdev[0]
        .split(',')
        .find_map(|p| {
            p.strip_prefix("hostfwd=tcp:127.0.0.1:")
                .filter(|p| p.ends_with("-:22"))
        })
        .unwrap_or_else(|| panic!("no SSH hostfwd in {}", netdev[0]));
    let port: u16 = fwd.trim_end_matches("-:22").parse().unwrap();
    assert!(port > 0);
    assert!(
        netdev[0].starts_with("user,id=user.0,hostfwd=tcp:127.0.0.1:0-:80,"),
        "{}",
        netdev[0]
    );
    assert_eq!(v["ssh"]["port"], port);

    // The kernel command line: the script's own, the user's QEMU_KERNEL_PARAMS, then ours,
    // console= of the script's arch last so it is /dev/console.
    let append = after(&argv, "-append");
    assert_eq!(append.len(), 1);
    let words: Vec<&str> = append[0].split_whitespace().collect();
    let consoles: Vec<&&str> = words.iter().filter(|w| w.starts_with("console=")).collect();
    assert_eq!(
        consoles,
        [
            &"console=tty0",
            &"console=ttyAMA0,115200n8",
            &"console=ttyAMA0"
        ]
    );
    let pos = |w: &str| {
        words
            .iter()
            .position(|x| *x == w)
            .unwrap_or_else(|| panic!("no {w} in {words:?}"))
    };
    assert!(pos("loglevel=4") < pos("loglevel=7"));
    assert!(pos("loglevel=7") < pos("console=ttyAMA0"));
    assert!(pos("console=ttyAMA0") < pos("boot.panic_on_fail"));
    assert!(words.iter().any(|w| w.starts_with("init=")));
    // The keys: this empty ext4 has no /etc/ssh and no authorized_keys; the ext4 editor
    // creates both in the run's overlay, so no credential travels on the command line.
    assert!(
        !words
            .iter()
            .any(|w| w.starts_with("systemd.set_credential_binary=")),
        "{words:?}"
    );
    assert_eq!(v["ssh"]["host_key"], "editor");
    assert_eq!(v["ssh"]["authorized_key"], "editor");

    // The disk: an overlay in vmdisk's folder whose backing is the user's disk.
    let drives = after(&argv, "-drive");
    assert_eq!(drives.len(), 1);
    let file = drives[0]
        .split(',')
        .find_map(|p| p.strip_prefix("file="))
        .unwrap();
    assert_ne!(Path::new(file), disk.as_path());
    assert!(
        file.starts_with(&*work.to_string_lossy()),
        "{file} not under {}",
        work.display()
    );
    assert_eq!(v["disk"]["how"], "overlay");
    assert_eq!(
        Path::new(v["disk"]["user_disk"].as_str().unwrap()),
        fs::canonicalize(&disk).unwrap()
    );
    // The run script itself is unchanged by the run.
    assert!(script.contains("$QEMU_OPTS"));
    // Nothing of the run is left behind without --keep.
    let left: Vec<_> = fs::read_dir(&work)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}");
}

#[test]
fn an_x86_64_script_gets_tty_s0() {
    let tmp = tempfile::tempdir().unwrap();
    let (argv, v, ..) = plumb(tmp.path(), "x86_64");
    assert_eq!(v["arch"], "x86_64");
    let append = after(&argv, "-append").join(" ");
    let consoles: Vec<&str> = append
        .split_whitespace()
        .filter(|w| w.starts_with("console="))
        .collect();
    assert_eq!(
        consoles,
        ["console=tty0", "console=ttyAMA0,115200n8", "console=ttyS0"]
    );
}
