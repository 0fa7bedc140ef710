//! `vmdisk doctor builder` against the aarch64 test VM (TCG, dropbear, a real Debian arm64
//! kernel) used as a Nix remote builder, as issue #17 asks:
//!
//! 1. the VM gets a `builder` account (key login; a stub `nix-store` on its PATH: the guest has
//!    no Nix) and a machines line `ssh://builder@127.0.0.1:PORT aarch64-linux KEY ... HOSTKEY`
//!    pinning the VM's host key;
//! 2. every check passes for `aarch64-linux` (native);
//! 3. declaring `x86_64-linux` too fails `systems` with `no-binfmt` and a fix naming
//!    binfmt / qemu-user-static, and the failed probe leaves nothing in the builder's home;
//! 4. a handler whose interpreter is missing fails with `binfmt-broken`;
//! 5. once Debian's arm64 `qemu-x86_64-static` is registered as Debian registers it (the guest
//!    kernel's binfmt_misc module, the package's `/usr/lib/binfmt.d/qemu-x86_64.conf` line
//!    written to `register`), every check passes for both systems, and Debian's amd64
//!    busybox-static runs in the guest as the builder.
//!
//! One boot (aarch64 under TCG is slow), then steps in order, each waiting on a command's
//! answer, never on time.

use std::fs;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::sshd::keygen;
use tests::{run_with_timeout, vmdisk_bin, workspace_root, Run};
use vmdisk_vm::assets::{Cache, Lock, LockedPackage};
use vmdisk_vm::def::VmDef;
use vmdisk_vm::run::{Booted, Faults, Harness, PrepareOptions, Prepared};

/// Each ssh session the doctor opens to the TCG guest (the login, `nix-store --version`, the
/// probe, which runs qemu-x86_64 inside the emulated guest once registered). A healthy run
/// takes under a second (measured: 0.3-0.6 s); the default 15 s is tight on 2 shared cores.
const DOCTOR_SSH_TIMEOUT_S: u64 = 30;
/// A whole doctor run: its sessions, plus the local steps' own timeouts.
const DOCTOR_TIMEOUT: Duration = Duration::from_secs(4 * DOCTOR_SSH_TIMEOUT_S);
/// A setup command over root's ssh (the largest copies ~10 MiB, the emulator, into the guest).
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);

/// The account nix logs in as (nix-darwin's linux-builder's is `builder` too).
const BUILDER: &str = "builder";
const BUILDER_UID: u32 = 1000;

/// What the stub prints, the line nix-store 2.18 prints.
const STUB_VERSION: &str = "nix-store (Nix) 2.18.1";

/// The booted VM and what the test made for it. Fields drop in order: qemu stops before its
/// folder goes.
struct Guest {
    booted: Booted,
    prepared: Prepared,
    harness: Harness,
    /// The builder's private key on the host (the machines file's key column).
    key: PathBuf,
    dir: tempfile::TempDir,
}

impl Guest {
    fn boot() -> Guest {
        let dir = tempfile::tempdir().unwrap();
        let lock =
            Lock::parse(&fs::read_to_string(workspace_root().join("testvms/assets.lock")).unwrap())
                .unwrap();
        fs::create_dir_all(dir.path().join("tmp")).unwrap();
        let harness = Harness::new(
            vmdisk_bin(),
            Cache::new(Cache::default_root().unwrap()),
            lock,
            dir.path().join("artifacts"),
        )
        .tmp_root(dir.path().join("tmp"));
        let def = VmDef::load(&workspace_root().join("testvms/aarch64.toml")).unwrap();
        let prepared = harness
            .prepare(
                &def,
                &PrepareOptions {
                    tag: Some("doctor".into()),
                    ..Default::default()
                },
            )
            .unwrap();
        let t0 = Instant::now();
        let booted = harness
            .boot(&prepared, &Faults::default(), "", &mut Default::default())
            .unwrap_or_else(|e| {
                panic!(
                    "the aarch64 VM did not boot: {e:#}\nserial log:\n{}",
                    fs::read_to_string(prepared.dir.join("serial.log")).unwrap_or_default()
                )
            });
        eprintln!(
            "aarch64 guest ({:?}) answered SSH after {:?}",
            booted.accel,
            t0.elapsed()
        );
        let key = dir.path().join("builder_ed25519");
        keygen(&key);
        Guest {
            booted,
            prepared,
            harness,
            key,
            dir,
        }
    }

    /// Run `cmd` as root in the guest; it must exit 0. Returns stdout.
    #[track_caller]
    fn root(&self, cmd: &str, stdin: Option<&[u8]>) -> String {
        let out = self
            .booted
            .ssh
            .run(cmd, stdin, SETUP_TIMEOUT)
            .unwrap_or_else(|e| panic!("ssh root {cmd:?}: {e:#}\n{}", self.console()));
        assert_eq!(
            out.status,
            Some(0),
            "as root in the guest: {cmd:?}\nstdout: {}\nstderr: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.console()
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The builder's own ssh (its key, the harness's pinned host key).
    fn builder_ssh(&self) -> vmdisk_vm::ssh::Ssh {
        vmdisk_vm::ssh::Ssh {
            user: BUILDER.into(),
            key: self.key.clone(),
            ..self.booted.ssh.clone()
        }
    }

    fn console(&self) -> String {
        format!("serial console:\n{}", self.booted.vm.console.text())
    }

    /// The `builder` account: key login (`*` password, as root has), its own home, the public
    /// key in its authorized_keys, and a stub `nix-store` in /usr/bin, which dropbear's PATH
    /// for non-root sessions contains (asserted here from the session itself).
    fn add_builder(&self) {
        let public = fs::read_to_string(self.key.with_extension("pub")).unwrap();
        let home = format!("/home/{BUILDER}");
        self.root(
            &format!(
                "set -e; \
                 echo '{BUILDER}:x:{BUILDER_UID}:{BUILDER_UID}:Nix remote builder:{home}:/bin/sh' >> /etc/passwd; \
                 echo '{BUILDER}:x:{BUILDER_UID}:' >> /etc/group; \
                 echo '{BUILDER}:*:19000:0:99999:7:::' >> /etc/shadow; \
                 mkdir -p {home}/.ssh; cat > {home}/.ssh/authorized_keys; \
                 chown -R {BUILDER_UID}:{BUILDER_UID} {home}; chmod 700 {home} {home}/.ssh; \
                 chmod 600 {home}/.ssh/authorized_keys"
            ),
            Some(public.as_bytes()),
        );
        let stub = format!(
            "#!/bin/sh\ncase \"$1\" in --version) echo '{STUB_VERSION}'; exit 0;; esac\n\
             echo \"stub nix-store: $*\" >&2; exit 1\n"
        );
        self.root(
            "set -e; cat > /usr/bin/nix-store; chmod 755 /usr/bin/nix-store",
            Some(stub.as_bytes()),
        );
    }

    /// `ssh://builder@127.0.0.1:PORT SYSTEMS KEY 1 1 - - HOSTKEY`, the host key column made
    /// the way Nix users make it: `base64 -w0 /etc/ssh/ssh_host_ed25519_key.pub` of the
    /// builder's file (read from the guest; coreutils' base64 on the host, busybox has none).
    fn machines_line(&self, systems: &str) -> String {
        let pub_file = self.dir.path().join("vm_host_key.pub");
        fs::write(
            &pub_file,
            self.root("cat /etc/ssh/ssh_host_ed25519_key.pub", None),
        )
        .unwrap();
        let field = tests::run(Command::new("base64").arg("-w0").arg(&pub_file)).ok();
        format!(
            "ssh://{BUILDER}@127.0.0.1:{} {systems} {} 1 1 - - {}",
            self.booted.port,
            self.key.display(),
            field.stdout.trim()
        )
    }

    /// `vmdisk doctor builder --json` over a machines file holding `line`, with a clean Nix
    /// environment (nix.conf in the test's folder, absent).
    fn doctor(&self, line: &str) -> (Run, Value) {
        let d = self.dir.path();
        let machines = d.join("machines");
        fs::write(&machines, format!("{line}\n")).unwrap();
        let t = Instant::now();
        let r = run_with_timeout(
            Command::new(vmdisk_bin())
                .args(["doctor", "builder", "--json", "--nix-conf"])
                .arg(d.join("nix.conf"))
                .arg("--machines")
                .arg(&machines)
                .args(["--timeout", &DOCTOR_SSH_TIMEOUT_S.to_string()])
                .env_remove("NIX_SSHOPTS")
                .env_remove("NIX_REMOTE")
                .env_remove("NIX_CONF_DIR"),
            DOCTOR_TIMEOUT,
        );
        let v = r.json();
        eprintln!(
            "doctor, systems {}: {:?}",
            line.split(' ').nth(1).unwrap_or(""),
            t.elapsed()
        );
        for c in v["machines"][0]["checks"].as_array().into_iter().flatten() {
            if c["id"] == "systems" {
                eprintln!("  {}", serde_json::to_string(c).unwrap());
            }
        }
        (r, v)
    }

    /// A file of one of the lock's packages, unpacked into the cache.
    fn package_file(&self, pkg: &LockedPackage, rel: &str) -> PathBuf {
        let root = self.harness.cache.unpacked(pkg).unwrap();
        let p = root.join(rel);
        assert!(p.exists(), "{} has no {rel}", pkg.name);
        p
    }

    fn package(&self, name: &str, arch: &str) -> &LockedPackage {
        self.harness.lock.get(name, arch).unwrap()
    }
}

/// Every check of machine 0 (and of the list) passes; returns machine 0's checks.
#[track_caller]
fn assert_all_pass<'a>(r: &Run, v: &'a Value, g: &Guest) -> Vec<&'a Value> {
    assert_eq!(v["ok"], true, "{r}\n{v:#}\n{}", g.console());
    assert_eq!(r.code(), 0, "{r}");
    tests::doctor::assert_every_check_passes(v, &|| g.console());
    v["machines"][0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .collect()
}

/// The `systems` check of machine 0 about `system`.
#[track_caller]
fn system_check<'a>(v: &'a Value, system: &str) -> &'a Value {
    let c: Vec<&Value> = v["machines"][0]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["id"] == "systems" && c["subject"] == system)
        .collect();
    assert_eq!(
        c.len(),
        1,
        "expected one `systems` check for {system}: {v:#}"
    );
    c[0]
}

#[track_caller]
fn assert_system_fails(v: &Value, system: &str, diagnosis: &str, fix_has: &[&str]) {
    assert_eq!(v["ok"], false, "{v:#}");
    let c = system_check(v, system);
    assert_eq!(c["verdict"], "fail", "{c:#}");
    assert_eq!(c["diagnosis"], diagnosis, "{c:#}");
    let fix = c["fix"].as_str().unwrap_or_default();
    for f in fix_has {
        assert!(fix.contains(f), "the fix should name {f:?}: {c:#}");
    }
}

#[test]
fn the_aarch64_vm_builds_aarch64_natively_and_x86_64_only_once_qemu_user_static_is_registered() {
    let g = Guest::boot();
    g.add_builder();
    // The stub is on the PATH of the builder's ssh sessions, and the login is not root's.
    let path = {
        let o = g
            .builder_ssh()
            .run("id -u; command -v nix-store", None, SETUP_TIMEOUT)
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    };
    assert_eq!(
        path.split_whitespace().collect::<Vec<_>>(),
        [BUILDER_UID.to_string().as_str(), "/usr/bin/nix-store"],
        "{}",
        g.console()
    );

    // 2. Native.
    let (r, v) = g.doctor(&g.machines_line("aarch64-linux"));
    let checks = assert_all_pass(&r, &v, &g);
    let sys = system_check(&v, "aarch64-linux");
    assert!(
        sys["summary"]
            .as_str()
            .unwrap()
            .contains("ran, native (aarch64)"),
        "{sys:#}"
    );
    let nix = checks.iter().find(|c| c["id"] == "remote-nix").unwrap();
    assert!(
        nix["summary"].as_str().unwrap().contains(STUB_VERSION),
        "{nix:#}"
    );
    let hk = checks.iter().find(|c| c["id"] == "host-key").unwrap();
    assert!(
        hk["summary"]
            .as_str()
            .unwrap()
            .starts_with("the pinned ED25519 key"),
        "{hk:#}"
    );
    let auth = checks.iter().find(|c| c["id"] == "auth").unwrap();
    assert!(
        auth["summary"]
            .as_str()
            .unwrap()
            .contains(&format!("as {BUILDER}@127.0.0.1")),
        "{auth:#}"
    );

    // 3. x86_64-linux declared, no binfmt_misc in the guest: diagnosed, aarch64 still passes.
    let both = g.machines_line("aarch64-linux,x86_64-linux");
    let (r, v) = g.doctor(&both);
    r.expect_code(1);
    assert_eq!(
        system_check(&v, "aarch64-linux")["verdict"],
        "pass",
        "{v:#}"
    );
    assert_system_fails(
        &v,
        "x86_64-linux",
        "no-binfmt",
        &[
            "boot.binfmt.emulatedSystems = [ \"x86_64-linux\" ]",
            "qemu-user-static",
        ],
    );
    let ev = system_check(&v, "x86_64-linux")["evidence"].to_string();
    assert!(ev.contains("binfmt_misc: unmounted"), "{ev}");
    // The probe that could not run leaves nothing behind on the builder: busybox sh (like dash)
    // runs a file the kernel refuses with ENOEXEC as a shell script, and the x86_64 ELF header
    // holds a `>` (e_machine 62), so run from the login's home it created a file there.
    assert_eq!(
        g.root(&format!("ls -A /home/{BUILDER}"), None).trim(),
        ".ssh",
        "the doctor's probe left files in the builder's home"
    );

    // The guest kernel's own binfmt_misc module (Debian builds it as a module), mounted where
    // systemd and binfmt-support mount it.
    let kernel = g
        .harness
        .lock
        .packages
        .iter()
        .find(|p| p.name.starts_with("linux-image-") && p.arch == "arm64")
        .expect("the lock pins an arm64 kernel");
    let module = g.package_file(
        kernel,
        &format!(
            "lib/modules/{}/kernel/fs/binfmt_misc.ko",
            g.prepared.assets.kernel_release
        ),
    );
    g.root(
        "set -e; cat > /tmp/binfmt_misc.ko; insmod /tmp/binfmt_misc.ko; \
         mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc; \
         cat /proc/sys/fs/binfmt_misc/status",
        Some(&fs::read(&module).unwrap()),
    );

    // 4. A handler whose interpreter is not there (registered without F, so the kernel looks
    // for it only at exec): the doctor names the broken handler, not a missing one.
    let conf = g.package_file(
        g.package("qemu-user-static", "arm64"),
        "usr/lib/binfmt.d/qemu-x86_64.conf",
    );
    let conf_line = fs::read_to_string(&conf).unwrap();
    let (head, flags) = conf_line.trim_end().rsplit_once(':').unwrap();
    let (magic_mask, interp) = head.rsplit_once(':').unwrap();
    assert_eq!(
        interp, "/usr/libexec/qemu-binfmt/x86_64-binfmt-P",
        "{conf_line}"
    );
    let broken = format!(
        "{magic_mask}:/usr/libexec/qemu-binfmt/missing-x86_64:{}\n",
        flags.replace('F', "")
    );
    g.root(
        "cat > /tmp/broken.conf && cat /tmp/broken.conf > /proc/sys/fs/binfmt_misc/register",
        Some(broken.as_bytes()),
    );
    let (r, v) = g.doctor(&both);
    r.expect_code(1);
    assert_system_fails(
        &v,
        "x86_64-linux",
        "binfmt-broken",
        &["qemu-user-static", "update-binfmts --enable qemu-x86_64"],
    );
    g.root("echo -1 > /proc/sys/fs/binfmt_misc/qemu-x86_64", None);

    // 5. Debian's emulator where Debian puts it, registered with Debian's own line (flags F:
    // the kernel opens the interpreter now, so it works inside a build sandbox too).
    let emulator = g.package_file(
        g.package("qemu-user-static", "arm64"),
        "usr/bin/qemu-x86_64-static",
    );
    let bytes = fs::read(&emulator).unwrap();
    let sum = g.root(
        "set -e; mkdir -p /usr/libexec/qemu-binfmt; cat > /usr/bin/qemu-x86_64-static; \
         chmod 755 /usr/bin/qemu-x86_64-static; \
         ln -sf ../../bin/qemu-x86_64-static /usr/libexec/qemu-binfmt/x86_64-binfmt-P; \
         sha256sum /usr/bin/qemu-x86_64-static",
        Some(&bytes),
    );
    assert!(sum.starts_with(&tests::sha256(&emulator)), "{sum}");
    let entry = g.root(
        "cat > /tmp/qemu-x86_64.conf && cat /tmp/qemu-x86_64.conf > /proc/sys/fs/binfmt_misc/register \
         && cat /proc/sys/fs/binfmt_misc/qemu-x86_64",
        Some(conf_line.as_bytes()),
    );
    assert!(entry.starts_with("enabled\n"), "{entry}");

    let (r, v) = g.doctor(&both);
    assert_all_pass(&r, &v, &g);
    let sys = system_check(&v, "x86_64-linux");
    assert!(
        sys["summary"].as_str().unwrap().contains(
            "through binfmt_misc `qemu-x86_64` (/usr/libexec/qemu-binfmt/x86_64-binfmt-P"
        ),
        "{sys:#}"
    );
    assert!(
        system_check(&v, "aarch64-linux")["summary"]
            .as_str()
            .unwrap()
            .contains("native (aarch64)"),
        "{v:#}"
    );

    // And a real x86_64 program, Debian's busybox-static for amd64, runs in the guest as the
    // builder: the kernel says aarch64, the emulated program's uname says x86_64.
    let busybox = g.package_file(g.package("busybox-static", "amd64"), "bin/busybox");
    assert_eq!(
        &fs::read(&busybox).unwrap()[18..20],
        &62u16.to_le_bytes(),
        "busybox-static amd64 is an x86-64 ELF (EM_X86_64)"
    );
    g.root(
        "set -e; cat > /tmp/busybox-x86_64; chmod 755 /tmp/busybox-x86_64",
        Some(&fs::read(&busybox).unwrap()),
    );
    let o = g
        .builder_ssh()
        .run(
            "uname -m; /tmp/busybox-x86_64 uname -m; /tmp/busybox-x86_64 echo ran-x86_64-busybox",
            None,
            SETUP_TIMEOUT,
        )
        .unwrap();
    let said = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        said.split_whitespace().collect::<Vec<_>>(),
        ["aarch64", "x86_64", "ran-x86_64-busybox"],
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    drop(g);
}
