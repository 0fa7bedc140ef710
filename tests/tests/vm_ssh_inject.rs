//! `vmdisk ssh-inject` on a test VM's disk image, judged by the guest itself (issue 15): the
//! edited image is `e2fsck -fn` clean, boots, and OpenSSH logs in with the injected key.
//!
//! The account `alice` is added offline with `vmdisk write` (passwd, group, shadow: she has
//! no home and no key yet), then `vmdisk ssh-inject IMAGE alice KEY.pub` creates
//! /home/alice/.ssh/authorized_keys with a key ssh-keygen made for this test only, and a
//! second inject appends the same key to root's existing file (which holds the harness's
//! key). Over SSH as the harness never could: `ssh -i NEWKEY -o IdentitiesOnly=yes` (no
//! agent, no config) logs in as alice, and the guest's `stat` shows home, ~/.ssh and
//! authorized_keys owned by alice with modes 700/700/600. The harness's own key and a second
//! fresh key that was never injected are both refused for alice, so only the injected key
//! can be what let us in.

use std::fs;
use std::time::{Duration, Instant};

use tests::testvm::{
    assert_no_leftovers, def, harness, openssh, root_partition_raw, ssh_keygen, vm_report,
};
use tests::{run_with_timeout, s, vmdisk, vmdisk_bytes};
use vmdisk_vm::run::{Faults, PrepareOptions, Timings};

/// One SSH login to the booted guest (TCG on a loaded machine: seconds, not minutes).
const LOGIN_TIMEOUT: Duration = Duration::from_secs(90);

const ALICE_PASSWD: &str = "alice:x:1000:1000:Alice:/home/alice:/bin/sh\n";
const ALICE_GROUP: &str = "alice:x:1000:\n";
/// No password (`*`): key login only, like root on the test VM.
const ALICE_SHADOW: &str = "alice:*:19000:0:99999:7:::\n";

/// Append `line` to the guest file `path` with `vmdisk cat` + `vmdisk write` (mode kept).
fn append_guest_file(img: &std::path::Path, path: &str, line: &str, mode: &str) {
    let (r, mut content) = vmdisk_bytes(&["cat", s(img), path], None);
    assert!(r.success(), "vmdisk cat {path}:\n{r}");
    content.extend_from_slice(line.as_bytes());
    let (r, _) = vmdisk_bytes(
        &["write", s(img), path, "--mode", mode, "--owner", "0:0"],
        Some(&content),
    );
    assert!(r.success(), "vmdisk write {path}:\n{r}");
}

#[test]
fn image_edited_by_ssh_inject_boots_and_openssh_logs_in_with_the_injected_key() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let p = h
        .prepare(
            &def("x86_64"),
            &PrepareOptions {
                tag: Some("ssh-inject".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let keys = tmp.path().join("keys");
    fs::create_dir(&keys).unwrap();
    let (new_key, new_pub) = ssh_keygen(&keys, "injected");
    let (other_key, _) = ssh_keygen(&keys, "never-injected");

    append_guest_file(&p.disk, "/etc/passwd", ALICE_PASSWD, "0644");
    append_guest_file(&p.disk, "/etc/group", ALICE_GROUP, "0644");
    append_guest_file(&p.disk, "/etc/shadow", ALICE_SHADOW, "0600");
    let before = vmdisk(&["ls", s(&p.disk), "/home"]);
    assert!(
        !before.success(),
        "/home exists before the inject:\n{before}"
    );

    let pubfile = keys.join("injected.pub");
    let alice = vmdisk(&["ssh-inject", "--json", s(&p.disk), "alice", s(&pubfile)]).ok();
    let root = vmdisk(&["ssh-inject", s(&p.disk), "root", s(&pubfile)]).ok();

    // The edited image, before boot: e2fsck finds nothing to fix.
    let work = tmp.path().join("work");
    fs::create_dir(&work).unwrap();
    let part = root_partition_raw(&p.disk, "disk-main-root", &work);
    let fsck = run_with_timeout(
        std::process::Command::new(tests::require_guest_tool("e2fsck")).args(["-fn", s(&part)]),
        Duration::from_secs(120),
    );
    assert_eq!(fsck.code(), 0, "e2fsck -fn of the edited image:\n{fsck}");
    fs::remove_file(&part).unwrap();

    let b = h
        .boot(&p, &Faults::default(), "", &mut Timings::default())
        .unwrap_or_else(|e| panic!("the edited image did not boot: {e:#}"));
    let known_hosts = &b.ssh.known_hosts;
    let login = |key: &std::path::Path, user: &str, cmd: &str| {
        run_with_timeout(
            openssh(b.port, known_hosts, key, user).arg(cmd),
            LOGIN_TIMEOUT,
        )
    };

    let r = login(
        &new_key,
        "alice",
        "id -u; id -un; stat -c '%U %G %a %n' ~ ~/.ssh ~/.ssh/authorized_keys; \
         cat ~/.ssh/authorized_keys",
    );
    assert!(
        r.success(),
        "OpenSSH with the injected key could not log in as alice:\n{r}\n\
         ssh-inject said:\n{alice}\n{}",
        vm_report(&b.vm)
    );
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "1000",
            "alice",
            "alice alice 700 /home/alice",
            "alice alice 700 /home/alice/.ssh",
            "alice alice 600 /home/alice/.ssh/authorized_keys",
            new_pub.as_str(),
        ],
        "what alice sees in the guest:\n{r}"
    );

    // Only the injected key opens alice's account.
    for (key, what) in [
        (&other_key, "a fresh key that was never injected"),
        (&p.client_key.private, "the harness's own key"),
    ] {
        let r = login(key, "alice", "echo logged-in");
        assert!(
            !r.success()
                && r.stderr.contains("Permission denied")
                && !r.stdout.contains("logged-in"),
            "{what} logged in as alice:\n{r}"
        );
    }
    // root: the key was appended, the harness's key still works beside it.
    for key in [&new_key, &p.client_key.private] {
        let r = login(key, "root", "id -u; grep -c . ~/.ssh/authorized_keys");
        assert!(
            r.success(),
            "root login with {}:\n{r}\nssh-inject said:\n{root}",
            key.display()
        );
        assert_eq!(r.stdout, "0\n2\n", "{r}");
    }
    drop(b);
    println!(
        "ssh-inject: e2fsck -fn clean, booted and logged in as alice (uid 1000) and root with \
         the injected key in {:?}; ssh-inject --json: {}",
        t0.elapsed(),
        alice.stdout.trim()
    );
    assert_no_leftovers(tmp.path());
}
