//! The editor verbs of the `vmdisk` binary on raw and qcow2 images made by mke2fs and
//! qemu-img: safety defaults (raw needs --in-place, qcow2 gets an undo snapshot, -o leaves the
//! image untouched, --dry-run and failures write nothing), names resolved in the guest, and
//! e2fsck -fn / debugfs as the judges.

use std::path::{Path, PathBuf};

use tests::ext4edit::{assert_fsck_clean, debugfs, mkfs};
use tests::{qemu_img, s, sha256, vmdisk, vmdisk_bytes};

struct Guest {
    _tmp: tempfile::TempDir,
    dir: PathBuf,
    raw: PathBuf,
}

/// An ext4 guest with /etc/passwd, /etc/group, alice's home (wrong owner, as in seed 001).
fn guest(with_shadow: bool) -> Guest {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = tmp.path().to_path_buf();
    let src = dir.join("src");
    std::fs::create_dir_all(src.join("etc")).expect("mkdir");
    std::fs::create_dir_all(src.join("home/alice/.config")).expect("mkdir");
    std::fs::write(
        src.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:100:Alice:/home/alice:/bin/sh\n",
    )
    .expect("w");
    std::fs::write(
        src.join("etc/group"),
        "root:x:0:\nusers:x:100:\nshadow:x:42:\n",
    )
    .expect("w");
    if with_shadow {
        std::fs::write(
            src.join("etc/shadow"),
            "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n",
        )
        .expect("w");
    }
    std::fs::write(src.join("home/alice/.config/x"), "cfg").expect("w");
    let raw = dir.join("disk.img");
    mkfs(&raw, 32, &["-t", "ext4", "-L", "nixos"], Some(&src));
    Guest {
        _tmp: tmp,
        dir,
        raw,
    }
}

fn qcow2(g: &Guest) -> PathBuf {
    let q = g.dir.join("disk.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&g.raw), s(&q)]).ok();
    q
}

fn raw_of(q: &Path, dir: &Path) -> PathBuf {
    let r = dir.join("view.img");
    qemu_img(&["convert", "-O", "raw", s(q), s(&r)]).ok();
    r
}

#[test]
fn raw_needs_in_place_and_dry_run_writes_nothing() {
    let g = guest(true);
    let before = sha256(&g.raw);
    let r = vmdisk(&["mkdir", s(&g.raw), "/srv"]);
    assert!(!r.success());
    assert!(r.stderr.contains("--in-place"), "{}", r.stderr);
    let r = vmdisk(&["mkdir", s(&g.raw), "/srv", "--in-place", "--dry-run"]);
    assert!(r.success(), "{}", r.stderr);
    assert_eq!(sha256(&g.raw), before, "a dry run wrote");
    // A failing operation anywhere in a script: nothing at all is written.
    let script = g.dir.join("bad.txt");
    std::fs::write(&script, "mkdir /srv\nrm /does/not/exist\n").expect("w");
    let r = vmdisk(&["edit", s(&g.raw), "--script", s(&script), "--in-place"]);
    assert!(!r.success());
    assert!(r.stderr.contains("/does/not/exist"), "{}", r.stderr);
    assert_eq!(sha256(&g.raw), before, "a failed edit wrote");
    let r = vmdisk(&["mkdir", s(&g.raw), "/srv", "--in-place"]);
    assert!(r.success(), "{}", r.stderr);
    assert_fsck_clean(&g.raw, "mkdir");
    assert!(debugfs(&g.raw, "stat /srv")
        .stdout
        .contains("Type: directory"));
}

#[test]
fn qcow2_edits_take_one_undo_snapshot_each_and_overlay_leaves_image_alone() {
    let g = guest(true);
    let q = qcow2(&g);
    let key = g.dir.join("id.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey alice@host\n",
    )
    .expect("w");
    let file = g.dir.join("motd");
    std::fs::write(&file, "hello from the host\n").expect("w");
    let script = g.dir.join("fix.txt");
    std::fs::write(
        &script,
        format!(
            "# seed 001: the home directory's owner is wrong\n\
             chown -R alice:users /home/alice\n\
             mkdir -p /srv/www --mode 0750 --owner alice:users\n\
             upload {} /srv/www/motd --mode 0640\n\
             ln -s /srv/www/motd /etc/motd\n\
             chmod 0700 /home/alice\n\
             ssh-inject alice {}\n",
            s(&file),
            s(&key)
        ),
    )
    .expect("w");
    let r = vmdisk(&["edit", s(&q), "--script", s(&script), "--json"]);
    assert!(r.success(), "{}", r.stderr);
    let v = r.json();
    assert!(
        v["undo_snapshot"]
            .as_str()
            .is_some_and(|n| n.starts_with("vmdisk-before-edit-")),
        "{v}"
    );
    let snaps = qemu_img(&["snapshot", "-l", s(&q)]).ok().stdout;
    assert_eq!(snaps.matches("vmdisk-before-").count(), 1, "{snaps}");
    // ssh-inject again: appended once, not twice; the second key is appended.
    let r = vmdisk(&["ssh-inject", s(&q), "alice", s(&key)]);
    assert!(r.success(), "{}", r.stderr);
    let key2 = g.dir.join("id2.pub");
    std::fs::write(&key2, "ssh-ed25519 AAAAC3NzaSecond alice@other\n").expect("w");
    let r = vmdisk(&["ssh-inject", s(&q), "alice", s(&key2)]);
    assert!(r.success(), "{}", r.stderr);
    let (r, _) = vmdisk_bytes(
        &[
            "write",
            s(&q),
            "/etc/hostname",
            "--mode",
            "644",
            "--owner",
            "root:root",
        ],
        Some(b"guest\n"),
    );
    assert!(r.success(), "{}", r.stderr);
    let view = raw_of(&q, &g.dir);
    assert_fsck_clean(&view, "after the edits");
    let st = debugfs(&view, "stat /home/alice/.config/x").stdout;
    assert!(st.contains("User:  1000   Group:   100"), "{st}");
    let st = debugfs(&view, "stat /home/alice").stdout;
    assert!(
        st.contains("Mode:  0700") && st.contains("User:  1000"),
        "{st}"
    );
    let ak = debugfs(&view, "cat /home/alice/.ssh/authorized_keys").stdout;
    assert_eq!(
        ak,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKey alice@host\nssh-ed25519 AAAAC3NzaSecond alice@other\n"
    );
    let st = debugfs(&view, "stat /home/alice/.ssh/authorized_keys").stdout;
    assert!(
        st.contains("Mode:  0600") && st.contains("User:  1000"),
        "{st}"
    );
    let st = debugfs(&view, "stat /home/alice/.ssh").stdout;
    assert!(
        st.contains("Mode:  0700") && st.contains("User:  1000"),
        "{st}"
    );
    let st = debugfs(&view, "stat /srv/www").stdout;
    assert!(
        st.contains("Mode:  0750") && st.contains("Group:   100"),
        "{st}"
    );
    assert_eq!(
        debugfs(&view, "cat /srv/www/motd").stdout,
        "hello from the host\n"
    );
    assert!(debugfs(&view, "stat /etc/motd")
        .stdout
        .contains("Fast link dest: \"/srv/www/motd\""));
    assert_eq!(debugfs(&view, "cat /etc/hostname").stdout, "guest\n");
    // Undo the first edit: the snapshot holds the guest as it was.
    let name = v["undo_snapshot"].as_str().expect("name").to_string();
    let r = vmdisk(&["snapshot", "apply", s(&q), &name]);
    assert!(r.success(), "{}", r.stderr);
    let view = raw_of(&q, &g.dir);
    assert_eq!(
        sha256(&view),
        sha256(&g.raw),
        "undo did not restore the guest"
    );
    // -o: the image stays byte-identical, the overlay holds the change.
    let before = sha256(&q);
    let ov = g.dir.join("ov.qcow2");
    let r = vmdisk(&["rm", s(&q), "-r", "/home/alice", "-o", s(&ov)]);
    assert!(r.success(), "{}", r.stderr);
    assert_eq!(sha256(&q), before, "-o changed the image");
    let view = raw_of(&ov, &g.dir);
    assert_fsck_clean(&view, "rm -r in the overlay");
    assert!(debugfs(&view, "stat /home/alice")
        .stderr
        .contains("not found"));
}

#[test]
fn passwd_create_rebuilds_a_missing_shadow() {
    let g = guest(false);
    let r = vmdisk(&[
        "passwd",
        s(&g.raw),
        "alice",
        "--hash",
        "$6$s$h",
        "--in-place",
    ]);
    assert!(!r.success());
    assert!(r.stderr.contains("--create"), "{}", r.stderr);
    let r = vmdisk(&[
        "passwd",
        s(&g.raw),
        "alice",
        "--hash",
        "$6$s$h",
        "--in-place",
        "--create",
    ]);
    assert!(r.success(), "{}", r.stderr);
    assert_fsck_clean(&g.raw, "passwd --create");
    let sh = debugfs(&g.raw, "cat /etc/shadow").stdout;
    let lines: Vec<&str> = sh.lines().collect();
    assert_eq!(lines.len(), 2, "{sh}");
    assert!(lines[0].starts_with("root:!*:"), "{sh}");
    assert!(lines[1].starts_with("alice:$6$s$h:"), "{sh}");
    let st = debugfs(&g.raw, "stat /etc/shadow").stdout;
    assert!(
        st.contains("Mode:  0640") && st.contains("Group:    42"),
        "{st}"
    );
}
