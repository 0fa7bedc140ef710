//! `vmdisk doctor builder` against a real OpenSSH server (sshd on 127.0.0.1, its own host key
//! and authorized_keys, a stub `nix-store` on its PATH) and the real ssh, ssh-keyscan and
//! ssh-keygen: a good setup passes every check without waiting on any step's timeout (it
//! prints the time taken), and each fault of issue #17 fails with its check id, its diagnosis
//! id and a fix that names the remedy.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::sshd::{free_port, keygen, RemoteNix, Sshd};
use tests::{run, vmdisk_bin, Run};

/// `vmdisk doctor builder --json ARGS` with a clean Nix environment; nix.conf is a file in
/// `dir` (missing unless the test writes it), so the host's /etc/nix plays no part.
fn doctor(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> (Run, Value, Duration) {
    let mut c = Command::new(vmdisk_bin());
    c.args(["doctor", "builder", "--json", "--nix-conf"])
        .arg(dir.join("nix.conf"))
        .args(args)
        .env_remove("NIX_SSHOPTS")
        .env_remove("NIX_REMOTE")
        .env_remove("NIX_CONF_DIR");
    for (k, v) in envs {
        c.env(k, v);
    }
    let t = Instant::now();
    let r = run(&mut c);
    let took = t.elapsed();
    let v = r.json();
    (r, v, took)
}

/// The checks of machine `i` (or of the builder list when None) with id `id`.
fn checks<'a>(v: &'a Value, machine: Option<usize>, id: &str) -> Vec<&'a Value> {
    let list = match machine {
        Some(i) => &v["machines"][i]["checks"],
        None => &v["checks"],
    };
    list.as_array()
        .expect("checks array")
        .iter()
        .filter(|c| c["id"] == id)
        .collect()
}

fn check<'a>(v: &'a Value, machine: Option<usize>, id: &str) -> &'a Value {
    let c = checks(v, machine, id);
    assert_eq!(c.len(), 1, "expected one `{id}` check in {v:#}");
    c[0]
}

#[track_caller]
fn assert_fails(v: &Value, machine: Option<usize>, id: &str, diagnosis: &str, fix_has: &str) {
    let c = check(v, machine, id);
    assert_eq!(c["verdict"], "fail", "`{id}` should fail: {c:#}");
    assert_eq!(c["diagnosis"], diagnosis, "`{id}`: {c:#}");
    assert!(c["cause"].as_str().is_some_and(|s| !s.is_empty()), "{c:#}");
    let fix = c["fix"].as_str().unwrap_or_default();
    assert!(
        fix.contains(fix_has),
        "`{id}` fix should name {fix_has:?}: {c:#}"
    );
    assert_eq!(v["ok"], false);
}

/// A machines file with one line.
fn machines(dir: &Path, lines: &[String]) -> String {
    let p = dir.join("machines");
    fs::write(&p, lines.join("\n") + "\n").unwrap();
    p.display().to_string()
}

fn good_line(s: &Sshd, key: &Path) -> String {
    format!(
        "{} x86_64-linux {} 4 2 big-parallel - {}",
        s.uri(),
        key.display(),
        s.host_key_field()
    )
}

#[test]
fn a_good_builder_passes_every_check_in_under_two_seconds() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let m = machines(d, &[good_line(&s, &s.client_key)]);
    let (r, v, took) = doctor(d, &["--machines", &m], &[]);
    let r = r.expect_code(0);
    assert_eq!(v["ok"], true, "{}", r.stdout);
    tests::doctor::assert_every_check_passes(&v, &|| format!("sshd log:\n{}", s.log_text()));
    // Every column was read.
    let mach = &v["machines"][0];
    assert_eq!(mach["max_jobs"], 4);
    assert_eq!(mach["speed_factor"], 2.0);
    assert_eq!(mach["supported_features"][0], "big-parallel");
    assert!(check(&v, Some(0), "remote-nix")["summary"]
        .as_str()
        .unwrap()
        .contains("nix-store (Nix) 2.18.1"));
    // Whose view, and why.
    assert!(v["ssh_view"]["reason"].as_str().unwrap().len() > 10);
    eprintln!(
        "good builder: vmdisk doctor builder took {took:?} ({} ms inside)",
        v["elapsed_ms"]
    );
    // Speed is a measurement, not a timed test (this runs beside the whole suite on shared
    // cores): the bound here is only that no step waited for one of its timeouts (3-5 s each).
    assert!(
        took < Duration::from_secs(10),
        "a good builder took {took:?}: a step must have waited for its timeout: {v:#}"
    );
    // The text report says the same.
    let text = run(Command::new(vmdisk_bin())
        .args(["doctor", "builder", "--nix-conf"])
        .arg(d.join("nix.conf"))
        .args(["--machines", &m])
        .env_remove("NIX_SSHOPTS")
        .env_remove("NIX_REMOTE"))
    .expect_code(0);
    assert!(text.stdout.contains("PASS auth"), "{text}");
    assert!(text.stdout.contains("SSH as "), "{text}");
}

#[test]
fn ssh_ng_reaches_the_daemon_protocol() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let line = good_line(&s, &s.client_key).replacen("ssh://", "ssh-ng://", 1);
    let (_r, v, _) = doctor(d, &[&line], &[]);
    let c = check(&v, Some(0), "remote-nix");
    assert_eq!(c["verdict"], "pass", "{v:#}");
    assert!(c["summary"]
        .as_str()
        .unwrap()
        .contains("nix-daemon --stdio"));
    assert_eq!(v["builders"]["source"], "command-line");
}

#[test]
fn a_wrong_pinned_host_key_is_diagnosed_with_the_right_field() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let other = d.join("other_host_key");
    keygen(&other);
    let wrong = {
        let out = run(Command::new("base64")
            .arg("-w0")
            .arg(d.join("other_host_key.pub")))
        .ok();
        out.stdout.trim().to_string()
    };
    let line = format!(
        "{} x86_64-linux {} 1 1 - - {wrong}",
        s.uri(),
        s.client_key.display()
    );
    let m = machines(d, &[line]);
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    r.expect_code(1);
    // The fix is the correct machines-file field: the server's key, base64 of its line.
    let want = {
        let out = run(Command::new("sh")
            .arg("-c")
            .arg(format!("printf '%s' '{}' | base64 -w0", s.host_pub)))
        .ok();
        out.stdout.trim().to_string()
    };
    assert_fails(&v, Some(0), "host-key", "host-key-changed", &want);
    // And ssh itself (as nix runs it) refuses the host.
    let auth = check(&v, Some(0), "auth");
    assert_eq!(auth["verdict"], "fail", "{auth:#}");
    assert!(
        auth["diagnosis"].as_str().unwrap().starts_with("host-key-"),
        "{auth:#}"
    );
}

#[test]
fn known_hosts_without_a_pin_is_checked_and_a_stale_entry_diagnosed() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let kh = d.join("known_hosts");
    let opts = format!("-o UserKnownHostsFile={}", kh.display());
    let line = format!("{} x86_64-linux {}", s.uri(), s.client_key.display());
    // Nothing known: ssh cannot ask, so it stops.
    let (_r, v, _) = doctor(d, &[&line], &[("NIX_SSHOPTS", &opts)]);
    assert_fails(
        &v,
        Some(0),
        "host-key",
        "host-key-unknown",
        "ssh-keyscan -p",
    );
    // The right key: passes.
    fs::write(&kh, format!("[127.0.0.1]:{} {}\n", s.port, s.host_pub)).unwrap();
    let (r, v, _) = doctor(d, &[&line], &[("NIX_SSHOPTS", &opts)]);
    assert_eq!(check(&v, Some(0), "host-key")["verdict"], "pass", "{r}");
    assert_eq!(check(&v, Some(0), "auth")["verdict"], "pass", "{r}");
    // A stale key: ssh's REMOTE HOST IDENTIFICATION HAS CHANGED.
    let other = d.join("other_host_key");
    keygen(&other);
    let stale = fs::read_to_string(d.join("other_host_key.pub")).unwrap();
    fs::write(&kh, format!("[127.0.0.1]:{} {stale}", s.port)).unwrap();
    let (_r, v, _) = doctor(d, &[&line], &[("NIX_SSHOPTS", &opts)]);
    assert_fails(&v, Some(0), "host-key", "host-key-changed", "ssh-keygen -R");
    assert_eq!(check(&v, Some(0), "auth")["diagnosis"], "host-key-changed");
}

#[test]
fn a_missing_key_is_diagnosed() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let m = machines(d, &[good_line(&s, &d.join("no_such_key"))]);
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    r.expect_code(1);
    assert_fails(
        &v,
        Some(0),
        "key-file",
        "key-missing",
        "ssh-keygen -t ed25519",
    );
    assert_eq!(check(&v, Some(0), "auth")["verdict"], "fail");
}

#[test]
fn a_0640_key_is_diagnosed_by_us_and_by_ssh() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    fs::set_permissions(&s.client_key, fs::Permissions::from_mode(0o640)).unwrap();
    let m = machines(d, &[good_line(&s, &s.client_key)]);
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    r.expect_code(1);
    assert_fails(&v, Some(0), "key-file", "unprotected-key", "chmod 600");
    // ssh's own words, classified.
    assert_fails(&v, Some(0), "auth", "unprotected-key", "chmod 600");
    let ev = check(&v, Some(0), "auth")["evidence"].to_string();
    assert!(
        ev.contains("UNPROTECTED PRIVATE KEY FILE") || ev.contains("bad permissions"),
        "{ev}"
    );
}

#[test]
fn a_key_only_root_can_read_is_diagnosed_for_the_user_nix_runs_ssh_as() {
    assert_eq!(
        vmdisk_ssh_uid(),
        0,
        "this test switches to another local user (nobody) and so must run as root, as CI does"
    );
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    // 0600, owned by root: nobody cannot read it.
    let m = machines(d, &[good_line(&s, &s.client_key)]);
    let (r, v, _) = doctor(d, &["--machines", &m, "--as-user", "nobody"], &[]);
    r.expect_code(1);
    assert_eq!(v["ssh_view"]["user"], "nobody");
    assert_fails(
        &v,
        Some(0),
        "key-readable",
        "key-unreadable",
        "install -m 600 -o nobody",
    );
    // ssh run as nobody says "Load key ...: Permission denied".
    let auth = check(&v, Some(0), "auth");
    assert_eq!(auth["verdict"], "fail", "{auth:#}");
    assert_eq!(auth["diagnosis"], "key-unreadable", "{auth:#}");
    // As root (the nix-daemon's view) the same machine passes.
    let (_r, v, _) = doctor(d, &["--machines", &m], &[]);
    assert_eq!(v["ok"], true, "{v:#}");
}

fn vmdisk_ssh_uid() -> u32 {
    let out = run(Command::new("id").arg("-u")).ok();
    out.stdout.trim().parse().unwrap()
}

#[test]
fn an_unresolvable_name_costs_seconds_not_minutes() {
    let d = tempfile::tempdir().unwrap();
    let (r, v, took) = doctor(
        d.path(),
        &["ssh://builder@linux-builder.vmdisk-test.invalid"],
        &[],
    );
    r.expect_code(1);
    assert_fails(
        &v,
        Some(0),
        "host-resolves",
        "unresolvable-host",
        "/etc/hosts",
    );
    assert_eq!(check(&v, Some(0), "port-open")["verdict"], "skip");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_closed_port_costs_seconds_not_minutes() {
    let d = tempfile::tempdir().unwrap();
    let port = free_port();
    let (r, v, took) = doctor(d.path(), &[&format!("ssh://builder@127.0.0.1:{port}")], &[]);
    r.expect_code(1);
    assert_fails(&v, Some(0), "port-open", "connection-refused", "hostfwd");
    assert_eq!(check(&v, Some(0), "auth")["verdict"], "skip");
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn a_key_the_builder_does_not_authorize_is_diagnosed() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let stranger = d.join("stranger_key");
    keygen(&stranger);
    let m = machines(d, &[good_line(&s, &stranger)]);
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    r.expect_code(1);
    assert_eq!(check(&v, Some(0), "key-file")["verdict"], "pass");
    assert_fails(&v, Some(0), "auth", "auth-refused", "authorized_keys");
    assert_eq!(check(&v, Some(0), "remote-nix")["verdict"], "skip");
}

#[test]
fn a_builder_without_nix_is_diagnosed() {
    let s = Sshd::start(RemoteNix::None);
    let d = s.dir.path();
    let m = machines(d, &[good_line(&s, &s.client_key)]);
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    assert_eq!(check(&v, Some(0), "auth")["verdict"], "pass", "{r}");
    r.expect_code(1);
    assert_fails(
        &v,
        Some(0),
        "remote-nix",
        "no-remote-nix",
        "remote-program=",
    );
}

/// A Linux system this machine can neither run natively nor through binfmt_misc.
fn foreign_system_without_binfmt() -> &'static str {
    let native = std::env::consts::ARCH;
    let registered: String = fs::read_dir("/proc/sys/fs/binfmt_misc")
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default();
    for (sys, arch, qemu) in [
        ("s390x-linux", "s390x", "s390x"),
        ("riscv64-linux", "riscv64", "riscv64"),
        ("powerpc64le-linux", "powerpc64", "ppc64le"),
    ] {
        if native != arch && !registered.contains(qemu) {
            return sys;
        }
    }
    panic!("every candidate system has a binfmt_misc handler here: {registered}");
}

#[test]
fn a_declared_system_without_binfmt_is_diagnosed() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let foreign = foreign_system_without_binfmt();
    let native = tests_native_system();
    let line = format!(
        "{} {native},{foreign} {} 1 1 - - {}",
        s.uri(),
        s.client_key.display(),
        s.host_key_field()
    );
    let m = machines(d, &[line]);
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    r.expect_code(1);
    let sys = checks(&v, Some(0), "systems");
    assert_eq!(sys.len(), 2, "{v:#}");
    let by = |name: &str| *sys.iter().find(|c| c["subject"] == name).unwrap();
    assert_eq!(by(native)["verdict"], "pass", "{v:#}");
    assert!(by(native)["summary"].as_str().unwrap().contains("native"));
    let c = by(foreign);
    assert_eq!(c["verdict"], "fail", "{c:#}");
    assert_eq!(c["diagnosis"], "no-binfmt");
    assert!(c["fix"]
        .as_str()
        .unwrap()
        .contains(&format!("boot.binfmt.emulatedSystems = [ \"{foreign}\" ]")));
    assert!(
        c["evidence"].to_string().contains("Exec format error"),
        "{c:#}"
    );
}

fn tests_native_system() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "x86_64-linux",
        "aarch64" => "aarch64-linux",
        a => panic!("no probe for this test machine's arch {a}"),
    }
}

#[test]
fn duplicate_machine_lines_are_diagnosed() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let line = good_line(&s, &s.client_key);
    let m = machines(d, &[line.clone(), line]);
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    r.expect_code(1);
    assert_fails(
        &v,
        None,
        "duplicate-machines",
        "duplicate-machines",
        "lib.mkForce",
    );
    let ev = check(&v, None, "duplicate-machines")["evidence"].to_string();
    assert!(ev.contains(":1") && ev.contains(":2"), "{ev}");
}

#[test]
fn an_empty_builders_setting_is_diagnosed_even_with_a_machines_file() {
    let s = Sshd::start(RemoteNix::Stub);
    let d = s.dir.path();
    let m = machines(d, &[good_line(&s, &s.client_key)]);
    fs::write(d.join("nix.conf"), "max-jobs = 4\nbuilders =\n").unwrap();
    let (r, v, _) = doctor(d, &["--machines", &m], &[]);
    r.expect_code(1);
    assert_fails(
        &v,
        None,
        "builders-disabled",
        "builders-empty",
        "nix.distributedBuilds = true",
    );
    let ev = check(&v, None, "builders-disabled")["evidence"].to_string();
    assert!(ev.contains("nix.conf:2"), "{ev}");
    assert_eq!(v["machines"].as_array().unwrap().len(), 0);
}

#[test]
fn a_malformed_machines_line_is_diagnosed_in_nix_words() {
    let d = tempfile::tempdir().unwrap();
    let m = machines(d.path(), &["ssh://b x86_64-linux - lots".to_string()]);
    let (r, v, _) = doctor(d.path(), &["--machines", &m], &[]);
    r.expect_code(1);
    assert_fails(&v, None, "machines-parse", "machines-invalid", "MAX-JOBS");
    assert!(check(&v, None, "machines-parse")["evidence"]
        .to_string()
        .contains("column #3"));
}
