//! The VM harness against real qemu and a real kernel: the quick suite CI runs.
//!
//! Every test boots guests whose disks `vmdisk create --layout` built, and checks both the
//! harness's verdict and that it leaves nothing behind: each test points the harness's socket
//! directories at a folder of its own and, at the end, asserts that folder is empty and that no
//! qemu process mentions the test's artifact folder.

use std::fs;
use std::time::Duration;

use tests::testvm::{assert_no_leftovers, def, harness};
use tests::{s, vmdisk_bin, vmdisk_bytes, workspace_root};
use vmdisk_vm::def::VmDef;
use vmdisk_vm::run::{Faults, Harness, PrepareOptions, Prepared, VmResult};
use vmdisk_vm::ssh::Ssh;

const PASSWORD: &str = "rescued-by-vmdisk";

fn describe(r: &VmResult) -> String {
    format!(
        "{}\nartifacts: {}\nqemu command line: {}\nqemu stderr:\n{}\nserial log:\n{}",
        vmdisk_vm::report::table(std::slice::from_ref(r)),
        r.artifacts.display(),
        fs::read_to_string(r.artifacts.join("qemu-cmdline.txt")).unwrap_or_default(),
        fs::read_to_string(r.artifacts.join("qemu-stderr.log")).unwrap_or_default(),
        fs::read_to_string(r.artifacts.join("serial.log")).unwrap_or_default()
    )
}

#[test]
fn x86_64_guest_boots_mounts_root_and_store_and_answers_ssh() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let r = h.run(&def("x86_64"), &Faults::default());
    assert!(r.passed, "{}", describe(&r));
    for name in ["stage1", "ssh", "uname", "root", "store", "store-overlay"] {
        assert!(
            r.checks.iter().any(|c| c.name == name && c.ok),
            "check {name} missing or failed:\n{}",
            describe(&r)
        );
    }
    let t = &r.timings;
    let (stage1, banner, ssh) = (t.stage1_s.unwrap(), t.banner_s.unwrap(), t.ssh_s.unwrap());
    assert!(0.0 < stage1 && stage1 <= banner && banner <= ssh, "{t:?}");
    // The artifact folder has what a failure report would point at.
    for f in ["qemu-cmdline.txt", "serial.log", "qmp.log", "result.json"] {
        assert!(r.artifacts.join(f).is_file(), "artifact {f} missing");
    }
    let result: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(r.artifacts.join("result.json")).unwrap())
            .unwrap();
    assert_eq!(result["passed"], true);
    // The disk is not kept without --keep.
    assert!(!r.artifacts.join("disk.qcow2").exists());
    assert_no_leftovers(tmp.path());
}

#[test]
fn aarch64_guest_compiles_natively_and_the_host_checks_the_elf() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let r = h.run(&def("aarch64"), &Faults::default());
    assert!(r.passed, "{}", describe(&r));
    let c = r.checks.iter().find(|c| c.name == "cross-build").unwrap();
    assert!(c.ok && c.detail.contains("AArch64 ELF"), "{c:?}");
    assert!(
        r.checks
            .iter()
            .any(|c| c.name == "uname" && c.detail.contains("= aarch64")),
        "{}",
        describe(&r)
    );
    assert!(r.timings.ssh_s.is_some());
    assert_no_leftovers(tmp.path());
}

#[test]
fn virtiofs_guest_mounts_the_store_over_virtiofs() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let r = h.run(&def("virtiofs"), &Faults::default());
    assert!(r.passed, "{}", describe(&r));
    let c = r.checks.iter().find(|c| c.name == "store").unwrap();
    assert!(
        c.detail
            .starts_with("/nix/.ro-store is virtiofs from nix-store"),
        "{c:?}"
    );
    assert_no_leftovers(tmp.path());
}

/// The network stage 2 uses under vfkit (DHCP, no fixed qemu address), proved under qemu.
#[test]
fn dhcp_network_as_under_vfkit_reaches_ssh() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let p = h
        .prepare(
            &def("x86_64"),
            &PrepareOptions {
                tag: Some("dhcp".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let r = h.run_prepared(&p, &Faults::default(), "vmdisk.net=dhcp");
    assert!(r.passed, "{}", describe(&r));
    let log = fs::read_to_string(r.artifacts.join("serial.log")).unwrap();
    assert!(
        log.contains("@@vmdisk stage2 network-up eth0 10.0.2.15/24"),
        "the DHCP lease from qemu's user net is not on eth0:\n{log}"
    );
    assert_no_leftovers(tmp.path());
}

/// Run `def` with `faults`; it must fail with diagnosis `id` before any generic timeout.
fn expect_diagnosis(def: &VmDef, faults: &Faults, id: &str) -> VmResult {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let t0 = std::time::Instant::now();
    let r = h.run(def, faults);
    let took = t0.elapsed();
    assert!(!r.passed, "a faulty VM passed:\n{}", describe(&r));
    let d = r
        .diagnosis
        .clone()
        .unwrap_or_else(|| panic!("no diagnosis for {id}:\n{}", describe(&r)));
    assert_eq!(d.id, id, "wrong diagnosis:\n{}", describe(&r));
    assert!(
        took < h.timeouts.stage1,
        "{id} took {took:?}: it waited for a timeout instead of recognising the failure"
    );
    assert_no_leftovers(tmp.path());
    r
}

#[test]
fn vm_without_the_9p_share_fails_in_stage1_naming_nix_store() {
    let r = expect_diagnosis(
        &def("x86_64"),
        &Faults {
            omit_store_share: true,
            ..Default::default()
        },
        "store-share-missing",
    );
    let d = r.diagnosis.unwrap();
    assert!(d.cause.contains("nix-store"), "{}", d.cause);
    assert!(d.evidence.contains("9pnet_virtio: no channels available"));
    assert!(r
        .checks
        .iter()
        .any(|c| !c.ok && c.name.contains("store-mounted")));
}

#[test]
fn wrong_pinned_host_key_is_diagnosed() {
    expect_diagnosis(
        &def("x86_64"),
        &Faults {
            pin_wrong_host_key: true,
            ..Default::default()
        },
        "host-key-changed",
    );
}

#[test]
fn group_readable_client_key_is_diagnosed() {
    expect_diagnosis(
        &def("x86_64"),
        &Faults {
            client_key_mode: Some(0o640),
            ..Default::default()
        },
        "key-permissions",
    );
}

#[test]
fn disk_without_nixos_label_is_diagnosed() {
    let mut d = def("x86_64");
    d.layout = workspace_root().join("testvms/layouts/no-nixos-label.json");
    let r = expect_diagnosis(&d, &Faults::default(), "root-not-found");
    assert!(r.diagnosis.unwrap().cause.contains("LABEL=nixos"));
}

#[test]
fn disk_held_by_another_writer_is_diagnosed_as_locked() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let p = h
        .prepare(
            &def("x86_64"),
            &PrepareOptions {
                tag: Some("locked".into()),
                ..Default::default()
            },
        )
        .unwrap();
    // Hold qemu's write lock on the disk, as a running VM or `vmdisk serve` would.
    let held = vmdisk_image::open(&p.disk, &vmdisk_image::OpenOptions::default()).unwrap();
    let r = h.run_prepared(&p, &Faults::default(), "");
    drop(held);
    assert!(!r.passed, "{}", describe(&r));
    let d = r
        .diagnosis
        .clone()
        .unwrap_or_else(|| panic!("{}", describe(&r)));
    assert_eq!(d.id, "image-locked", "{}", describe(&r));
    assert_no_leftovers(tmp.path());
}

/// A shadow file no login can use: garbage where root's line should be.
const BROKEN_SHADOW: &[u8] = b"root:$6$truncated\x00\xff\nnot a shadow line at all\n";

fn password_login(p: &Prepared, h: &Harness) {
    let mut t = Default::default();
    let b = h
        .boot(p, &Faults::default(), "", &mut t)
        .unwrap_or_else(|e| panic!("the repaired disk did not boot: {e:#}"));
    let ssh = Ssh {
        user: "root".into(),
        ..b.ssh.clone()
    };
    let out = ssh
        .password_command(PASSWORD)
        .unwrap()
        .arg("echo logged-in-as-$(id -u)")
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("logged-in-as-0"),
        "password login failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        fs::read_to_string(p.dir.join("serial.log")).unwrap_or_default()
    );
    // And a wrong password is refused (the check above could not pass by accident).
    let out = ssh
        .password_command("wrong")
        .unwrap()
        .arg("true")
        .output()
        .unwrap();
    assert!(!out.status.success(), "a wrong password was accepted");
}

#[test]
fn broken_shadow_repaired_offline_with_vmdisk_passwd_then_password_login_works() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let p = h
        .prepare(
            &def("x86_64"),
            &PrepareOptions {
                shadow: Some(BROKEN_SHADOW.to_vec()),
                tag: Some("passwd".into()),
            },
        )
        .unwrap();
    let (r, _) = vmdisk_bytes(
        &["passwd", s(&p.disk), "root", "--password-stdin"],
        Some(format!("{PASSWORD}\n").as_bytes()),
    );
    r.ok();
    password_login(&p, &h);
    assert_no_leftovers(tmp.path());
}

#[test]
fn broken_shadow_repaired_through_vmdisk_rescue_then_password_login_works() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let p = h
        .prepare(
            &def("x86_64"),
            &PrepareOptions {
                shadow: Some(BROKEN_SHADOW.to_vec()),
                tag: Some("rescue".into()),
            },
        )
        .unwrap();
    // The harness has fetched the guest's packages (as `cargo xtask vmtest` does) and, on a
    // machine without a qemu of its own, Debian's qemu: `vmdisk rescue` without --fetch uses
    // what is cached and downloads nothing.
    h.qemu(vmdisk_vm::Arch::X86_64).unwrap();
    // The hash comes from the host's openssl; the guest only writes the line.
    let hash = std::process::Command::new(tests::require_tool("openssl"))
        .args(["passwd", "-6", PASSWORD])
        .output()
        .unwrap();
    let hash = String::from_utf8(hash.stdout).unwrap().trim().to_string();
    assert!(hash.starts_with("$6$"), "openssl passwd -6 gave {hash:?}");
    // Partition 3 of esp-swap-root is the ext4 root; the guest kernel mounts it (journal
    // replay and all), the command rewrites /etc/shadow, unmounts, and rescue detaches.
    let script = format!(
        "mount /dev/nbd0p3 /mnt && printf '%s\\n' 'root:{hash}:19000:0:99999:7:::' > /mnt/etc/shadow \
         && chmod 600 /mnt/etc/shadow && umount /mnt && echo rescue-done"
    );
    let out = tests::run_with_timeout(
        std::process::Command::new(vmdisk_bin())
            .env("TMPDIR", tmp.path().join("tmp"))
            .args(["rescue", s(&p.disk), "--", &script]),
        Duration::from_secs(300),
    );
    assert!(
        out.success() && out.stdout.contains("rescue-done"),
        "vmdisk rescue failed:\n{out}"
    );
    // The edit is on the disk as the guest kernel wrote it, readable offline.
    let shadow = tests::vmdisk(&["cat", s(&p.disk), "/etc/shadow"]).ok();
    assert!(shadow.stdout.contains(&hash), "{shadow}");
    password_login(&p, &h);
    assert_no_leftovers(tmp.path());
}

/// Without --fetch, `vmdisk rescue` downloads nothing: with an empty cache it stops before
/// opening the image, naming the fetch step (an unreachable package URL would be named
/// instead, had it tried the network).
#[test]
fn rescue_without_fetch_downloads_nothing_and_names_the_fetch_step() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("empty-cache");
    let out = tests::run_with_timeout(
        std::process::Command::new(vmdisk_bin())
            .env("VMDISK_CACHE", &cache)
            .env_remove("VMDISK_DEB_DIR")
            .env("TMPDIR", tmp.path())
            .args(["rescue", s(&tmp.path().join("no-such.qcow2")), "--", "true"]),
        Duration::from_secs(60),
    );
    assert_eq!(out.code(), 1, "{out}");
    assert!(
        out.stderr.contains("vmdisk rescue --fetch") && out.stderr.contains("not in the cache"),
        "the refusal does not name the fetch step:\n{out}"
    );
    assert!(
        !out.stderr.contains("no-such.qcow2"),
        "the image was opened before the VM was ready:\n{out}"
    );
    let debs = cache.join("debs");
    let fetched: Vec<_> = fs::read_dir(&debs)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(fetched.is_empty(), "something was downloaded: {fetched:?}");
}

/// The Linux kernel as an NBD client of `vmdisk serve`: Debian's nbd-client in a TCG guest
/// reaches the host server as 10.0.2.2, the kernel mounts the ext4 partition, writes a file,
/// unmounts and disconnects; on the host the filesystem is e2fsck-clean and holds the file.
#[test]
fn guest_kernel_nbd_client_writes_through_vmdisk_serve() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let data = h
        .prepare(
            &def("x86_64"),
            &PrepareOptions {
                tag: Some("nbd-data".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let rescue = VmDef::rescue(vmdisk_vm::Arch::X86_64, &tmp.path().join("rescue.json")).unwrap();
    let client = h
        .prepare(
            &rescue,
            &PrepareOptions {
                tag: Some("nbd-client".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let port = vmdisk_vm::qemu::free_local_port().unwrap();
    let mut serve = std::process::Command::new(vmdisk_bin())
        .args(["serve", "--persistent", "--export-name", "data", "--tcp"])
        .arg(format!("127.0.0.1:{port}"))
        .arg(&data.disk)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "vmdisk serve did not listen"
        );
        assert!(
            serve.try_wait().unwrap().is_none(),
            "vmdisk serve exited early"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut t = Default::default();
    let booted = h
        .boot(
            &client,
            &Faults::default(),
            &format!("vmdisk.nbd=10.0.2.2:{port}:data"),
            &mut t,
        )
        .unwrap_or_else(|e| panic!("the NBD client VM did not boot: {e:#}"));
    booted
        .vm
        .wait_marker(
            "nbd attach",
            "@@vmdisk stage2 nbd-attached",
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| {
            panic!(
                "nbd-client did not attach: {e}\n{}",
                booted.vm.console.text()
            )
        });
    let out = booted
        .ssh
        .run(
            "mount /dev/nbd0p3 /mnt && echo written-by-the-guest-kernel > /mnt/from-guest.txt \
             && umount /mnt && nbd-client -d /dev/nbd0 && echo detached",
            None,
            Duration::from_secs(60),
        )
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("detached"),
        "guest side failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        booted.vm.console.text()
    );
    drop(booted);
    // SAFETY: plain kill(2) of our own child.
    unsafe { libc::kill(serve.id() as i32, libc::SIGTERM) };
    let st = serve.wait().unwrap();
    assert!(st.success(), "vmdisk serve after SIGTERM: {st}");

    let parts = tests::inspect_partitions(&data.disk);
    let root = parts
        .iter()
        .find(|p| p["name"] == "disk-main-root")
        .unwrap();
    let (off, len) = (
        root["offset"].as_u64().unwrap(),
        root["size"].as_u64().unwrap(),
    );
    let raw = tmp.path().join("data.raw");
    tests::qemu_img(&["convert", "-O", "raw", s(&data.disk), s(&raw)]).ok();
    let part = tmp.path().join("root.raw");
    tests::extract_range(&raw, &part, off, len);
    tests::assert_e2fsck_clean(&part, "root after the guest kernel wrote through NBD");
    let file = tests::vmdisk(&["cat", s(&data.disk), "/from-guest.txt"]).ok();
    assert_eq!(file.stdout, "written-by-the-guest-kernel\n");
    assert_no_leftovers(tmp.path());
}

#[test]
fn nixpkgs_shaped_run_script_boots_and_passes() {
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let p = h
        .prepare(
            &def("x86_64"),
            &PrepareOptions {
                tag: Some("script".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let bin = h.qemu(p.def.arch).unwrap();
    let script = p.dir.join("run-nixos-vm");
    vmdisk_vm::run::write_nixpkgs_script(&p, &bin, &script).unwrap();
    let text = fs::read_to_string(&script).unwrap();
    for shape in [
        "\"$QEMU_NET_OPTS\"",
        "$QEMU_OPTS",
        "NIX_DISK_IMAGE",
        "mount_tag=nix-store",
        "exec ",
    ] {
        assert!(
            text.contains(shape),
            "script lacks the nixpkgs shape {shape:?}"
        );
    }
    let r = h.run_script(&p, &script);
    assert!(r.passed, "{}", describe(&r));
    let cmdline = fs::read_to_string(r.artifacts.join("qemu-cmdline.txt")).unwrap();
    assert!(cmdline.contains("QEMU_NET_OPTS=") && cmdline.contains("hostfwd=tcp:127.0.0.1:"));
    assert_no_leftovers(tmp.path());
}
