//! `vmdisk vmtest RUN_SCRIPT` against the test guest's NixOS personality: stage 1 and stage 2
//! print exactly what NixOS prints (stage-1-init.sh / the systemd initrd's unit status lines,
//! stage-2-init.sh, systemd), with no `@@vmdisk` markers, and the guest is started through a run
//! script shaped like nixpkgs' (seed 004): bash, `exec qemu-system-x86_64 ... $QEMU_OPTS "$@"`.
//!
//! Each test boots real qemu (TCG) and a real kernel and runs the product binary: both initrd
//! styles must reach every phase and SSH on an overlay that leaves the user's disk
//! sha256-identical; without the `nix-store` 9p share, each style must be diagnosed with its
//! ids less than 5 s after the failing console line.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use tests::testvm::harness;
use tests::{run_with_timeout, s, sha256, vmdisk, vmdisk_bin, workspace_root};
use vmdisk_vm::def::VmDef;
use vmdisk_vm::run::{Harness, NixosPersonality, PrepareOptions, Prepared};

/// The whole `vmdisk vmtest` run, bounded (TCG boots take seconds; the disk build more).
const RUN_TIMEOUT: Duration = Duration::from_secs(240);

/// The x86_64 guest's disk and a run script for it in `style`.
fn guest(h: &Harness, style: NixosPersonality, tag: &str) -> (Prepared, PathBuf) {
    let def = VmDef::load(&workspace_root().join("testvms/x86_64.toml")).unwrap();
    let p = h
        .prepare(
            &def,
            &PrepareOptions {
                tag: Some(tag.into()),
                ..Default::default()
            },
        )
        .unwrap();
    let bin = h.qemu(p.def.arch).unwrap();
    let script = p.dir.join("run-nixos-vm");
    vmdisk_vm::run::write_nixos_script(&p, &bin, &script, Some(style)).unwrap();
    (p, script)
}

/// `vmdisk vmtest SCRIPT --json` with the user's disk as NIX_DISK_IMAGE.
fn vmtest(dir: &Path, script: &Path, disk: &Path) -> (Value, i32, String) {
    vmtest_with(dir, script, disk, None)
}

/// [`vmtest`] with the user's own `QEMU_KERNEL_PARAMS`.
fn vmtest_with(
    dir: &Path,
    script: &Path,
    disk: &Path,
    params: Option<&str>,
) -> (Value, i32, String) {
    let work = dir.join("vmtest");
    fs::create_dir_all(&work).unwrap();
    let mut cmd = Command::new(vmdisk_bin());
    cmd.args(["vmtest", "--json", "--timeout", "180"])
        .arg(script)
        .env("NIX_DISK_IMAGE", disk)
        .env("TMPDIR", &work)
        .env_remove("QEMU_OPTS")
        .env_remove("QEMU_NET_OPTS")
        .env_remove("SHARED_DIR");
    match params {
        Some(p) => cmd.env("QEMU_KERNEL_PARAMS", p),
        None => cmd.env_remove("QEMU_KERNEL_PARAMS"),
    };
    let r = run_with_timeout(&mut cmd, RUN_TIMEOUT);
    let out = r.stdout.clone();
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| {
        panic!(
            "vmdisk vmtest printed no JSON ({e}):\n{out}\nstderr:\n{}",
            r.stderr
        )
    });
    (v, r.code(), out)
}

fn phase_ids(v: &Value) -> Vec<String> {
    v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["id"].as_str().unwrap().to_string())
        .collect()
}

fn diagnosis_ids(v: &Value) -> Vec<String> {
    v["diagnoses"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect()
}

/// No qemu left running from this test's folder.
fn assert_no_qemu(dir: &Path) {
    let needle = dir.to_string_lossy().to_string();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(
            !(cmd.contains("qemu-system") && cmd.contains(&needle)),
            "a qemu process outlived vmdisk vmtest: {cmd}"
        );
    }
}

fn boots_to_ssh(style: NixosPersonality, initrd: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let (p, script) = guest(&h, style, initrd);
    let text = fs::read_to_string(&script).unwrap();
    assert!(!text.contains("@@vmdisk") && text.contains("exec "));
    let before = sha256(&p.disk);

    let (v, code, out) = vmtest(tmp.path(), &script, &p.disk);
    assert_eq!(v["passed"], true, "{out}");
    assert_eq!(code, 0, "{out}");
    assert_eq!(v["initrd"], initrd, "{out}");
    assert_eq!(v["arch"], "x86_64", "{out}");
    assert_eq!(
        phase_ids(&v),
        [
            "stage1",
            "root-mounted",
            "store-mounted",
            "store-overlay",
            "switch-root",
            "multi-user",
            "sshd-answering",
            "ssh-login"
        ],
        "{out}"
    );
    // Timestamps in boot order.
    let times: Vec<f64> = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["at_s"].as_f64().unwrap())
        .collect();
    assert!(times.windows(2).all(|w| w[0] <= w[1]), "{times:?}");
    let root = &v["phases"][1]["detail"];
    assert!(
        root.as_str()
            .unwrap()
            .starts_with("/dev/disk/by-label/nixos on /"),
        "{root}"
    );
    // SSH: the disk's own host key pinned, the fresh key appended by the ext4 editor in the
    // run's overlay; the login checked what NixOS mounted.
    assert_eq!(v["disk"]["how"], "overlay", "{out}");
    assert_eq!(v["ssh"]["host_key"], "from-user-disk", "{out}");
    assert_eq!(v["ssh"]["authorized_key"], "editor", "{out}");
    let checks = v["checks"].as_array().unwrap();
    assert_eq!(checks.len(), 4, "{out}");
    assert!(checks.iter().all(|c| c["ok"] == true), "{out}");
    let boot_to_ssh = v["boot_to_ssh_s"].as_f64().unwrap();
    let phases: Vec<String> = v["phases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| format!("{} {}", p["id"].as_str().unwrap(), p["at_s"]))
        .collect();
    eprintln!(
        "{initrd} initrd: boot to SSH {boot_to_ssh:.3} s ({})",
        phases.join(", ")
    );
    assert!(v["diagnoses"].as_array().unwrap().is_empty(), "{out}");
    // The user's disk is untouched.
    assert_eq!(sha256(&p.disk), before, "the user's disk changed");
    assert_no_qemu(tmp.path());
}

fn store_missing_is_diagnosed(style: NixosPersonality, initrd: &str, expect: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let (p, script) = guest(&h, style, &format!("{initrd}-nostore"));
    // As under vfkit (seed 004): the VM has no 9p device tagged nix-store.
    let text = fs::read_to_string(&script).unwrap();
    assert!(text.contains("mount_tag=nix-store,"));
    fs::write(
        &script,
        text.replace("mount_tag=nix-store,", "mount_tag=host-store,"),
    )
    .unwrap();
    let before = sha256(&p.disk);

    let (v, code, out) = vmtest(tmp.path(), &script, &p.disk);
    assert_eq!(v["passed"], false, "{out}");
    assert_eq!(code, 1, "{out}");
    assert_eq!(v["initrd"], initrd, "{out}");
    assert_eq!(diagnosis_ids(&v), expect, "{out}");
    let share = &v["diagnoses"][0];
    assert!(
        share["evidence"]
            .as_str()
            .unwrap()
            .contains("9pnet_virtio: no channels available for device nix-store"),
        "{out}"
    );
    assert!(share["fix"]
        .as_str()
        .unwrap()
        .contains("mount_tag=nix-store"));
    let failed = v["failure_at_s"].as_f64().unwrap();
    let diagnosed = v["diagnosed_at_s"].as_f64().unwrap();
    eprintln!(
        "{initrd} initrd, no store share: failing line at {failed:.3} s, diagnosed at {diagnosed:.3} s"
    );
    assert!(
        diagnosed - failed < 5.0,
        "diagnosed {:.3} s after the line",
        diagnosed - failed
    );
    assert_eq!(phase_ids(&v), ["stage1", "root-mounted"], "{out}");
    assert_eq!(sha256(&p.disk), before, "the user's disk changed");
    assert_no_qemu(tmp.path());
}

#[test]
fn scripted_initrd_boots_to_ssh_on_an_overlay() {
    boots_to_ssh(NixosPersonality::Scripted, "scripted");
}

#[test]
fn systemd_initrd_boots_to_ssh_on_an_overlay() {
    boots_to_ssh(NixosPersonality::Systemd, "systemd");
}

#[test]
fn scripted_initrd_without_the_store_share_is_diagnosed_at_once() {
    store_missing_is_diagnosed(
        NixosPersonality::Scripted,
        "scripted",
        &["store-share-missing", "stage1-failed", "kernel-panic"],
    );
}

#[test]
fn systemd_initrd_without_the_store_share_is_diagnosed_at_once() {
    store_missing_is_diagnosed(
        NixosPersonality::Systemd,
        "systemd",
        &["store-share-missing", "emergency-mode", "kernel-panic"],
    );
}

#[test]
fn a_vm_without_sshd_is_reported_with_the_line_that_enables_it() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let (p, script) = guest(&h, NixosPersonality::Scripted, "nosshd");
    let (v, code, out) = vmtest_with(tmp.path(), &script, &p.disk, Some("vmdisk.nosshd=1"));
    assert_eq!(v["passed"], false, "{out}");
    assert_eq!(code, 1, "{out}");
    assert_eq!(diagnosis_ids(&v), ["sshd-missing"], "{out}");
    let fix = v["diagnoses"][0]["fix"].as_str().unwrap();
    assert!(fix.contains("services.openssh.enable = true;"), "{fix}");
    assert!(phase_ids(&v).contains(&"multi-user".to_string()), "{out}");
    assert_no_qemu(tmp.path());
}

/// A disk whose root has no authorized_keys (NixOS without `openssh.authorizedKeys`):
/// `vmdisk vmtest` creates the file in the run's overlay with the ext4 editor, so the guest's
/// sshd reads it from the disk (no credential, which a guest without systemd would ignore);
/// the login works and the user's disk is untouched.
#[test]
fn a_disk_without_authorized_keys_gets_ours_created_in_the_overlay() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let (p, script) = guest(&h, NixosPersonality::Scripted, "nokeys");
    vmdisk(&["rm", "--in-place", s(&p.disk), "/root/.ssh/authorized_keys"]).ok();
    assert!(!vmdisk(&["cat", s(&p.disk), "/root/.ssh/authorized_keys"]).success());
    let before = sha256(&p.disk);
    let (v, code, out) = vmtest(tmp.path(), &script, &p.disk);
    assert_eq!(v["passed"], true, "{out}");
    assert_eq!(code, 0, "{out}");
    assert_eq!(v["ssh"]["host_key"], "from-user-disk", "{out}");
    assert_eq!(v["ssh"]["authorized_key"], "editor", "{out}");
    assert!(phase_ids(&v).contains(&"ssh-login".to_string()), "{out}");
    assert_eq!(sha256(&p.disk), before, "the user's disk changed");
    assert_no_qemu(tmp.path());
}
