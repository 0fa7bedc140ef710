//! The user story: a broken /etc/shadow fixed through the editor, checked with e2fsck,
//! debugfs and openssl.

mod common;
use common::*;
use std::process::Command;
use std::sync::Arc;
use vmdisk_block::{BlockDevice, RawFile};
use vmdisk_ext4::passwd::{self, Action};
use vmdisk_ext4::{replace_file, Ext4};

const OTHERS: &[&[u8]] = &[
    b"daemon:*:19000:0:99999:7:::",
    b"alice:$6$x$y:19000:0:99999:7:::",
];

fn openssl_hash(salt: &str, password: &str) -> String {
    require("openssl", "openssl");
    let out = Command::new("openssl")
        .args(["passwd", "-6", "-salt", salt, password])
        .output()
        .expect("run openssl");
    assert!(out.status.success());
    String::from_utf8(out.stdout)
        .expect("utf8")
        .trim()
        .to_string()
}

#[test]
fn sha512_matches_openssl() {
    for (salt, pw) in [
        ("saltsalt", "secret"),
        ("a", "p"),
        ("0123456789abcdef", "pässwörd long one"),
    ] {
        let ours = passwd::hash_sha512(pw.as_bytes(), Some(salt)).expect("hash");
        assert_eq!(ours, openssl_hash(salt, pw));
    }
    let random = passwd::hash_sha512(b"x", None).expect("hash");
    assert!(
        random.starts_with("$6$") && random.len() == 3 + 16 + 1 + 86,
        "{random}"
    );
}

#[test]
fn broken_shadow_cases_fixed_in_the_image() {
    let cases: &[(&str, &[u8])] = &[
        ("truncated", b"daemon:*:19000:0:99999:7:::\nalice:$6$x$y:19000:0:99999:7:::\nroot:$6$tru"),
        ("garbage", b"daemon:*:19000:0:99999:7:::\n\x00\x01\xfe\xffgarbage:::\nalice:$6$x$y:19000:0:99999:7:::\nroot:!!:zz\n"),
        ("locked", b"root:!$6$old$hash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nalice:$6$x$y:19000:0:99999:7:::\n"),
        ("no-root", b"daemon:*:19000:0:99999:7:::\nalice:$6$x$y:19000:0:99999:7:::\n"),
        ("empty", b""),
    ];
    let tmp = tempfile::tempdir().expect("tempdir");
    let hash = passwd::hash_sha512(b"hunter2", Some("vmdisksalt")).expect("hash");
    assert_eq!(hash, openssl_hash("vmdisksalt", "hunter2"));
    for (i, (name, shadow)) in cases.iter().enumerate() {
        let src = tmp.path().join(format!("src{i}"));
        populate(&src, shadow);
        let img = mkfs(
            tmp.path(),
            &format!("{name}.img"),
            &src,
            32,
            &["-b", "1024"],
        );
        let (old_shadow, pw) = {
            let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, true).expect("open"));
            let fs = Ext4::open(dev).expect("ext4");
            (
                fs.read_file("/etc/shadow").expect("shadow"),
                fs.read_file("/etc/passwd").expect("passwd"),
            )
        };
        assert_eq!(&old_shadow, shadow);
        let new = passwd::repair_shadow(&old_shadow, &pw, "root", Action::SetHash(hash.clone()))
            .expect("repair");
        {
            let dev = RawFile::open(&img, false).expect("open rw");
            replace_file(&dev, "/etc/shadow", &new).expect("replace");
        }
        assert_fsck_clean(&img, name);
        let on_disk = debugfs(&img, "cat /etc/shadow");
        assert_eq!(on_disk, new, "{name}");
        let lines: Vec<&[u8]> = on_disk.split(|&b| b == b'\n').collect();
        let root: Vec<&&[u8]> = lines.iter().filter(|l| l.starts_with(b"root:")).collect();
        assert_eq!(root.len(), 1, "{name}");
        let f: Vec<&[u8]> = root[0].split(|&b| b == b':').collect();
        assert_eq!(f.len(), 9, "{name}");
        assert_eq!(f[1], hash.as_bytes(), "{name}");
        // Every other line of the old file is still there, byte for byte.
        for old in shadow
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty() && !l.starts_with(b"root:"))
        {
            assert!(
                lines.contains(&old),
                "{name}: lost line {:?}",
                String::from_utf8_lossy(old)
            );
        }
        if !name.starts_with("empty") {
            for o in OTHERS {
                assert!(lines.contains(o), "{name}");
            }
        }
        // Owner/mode preserved.
        let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, true).expect("open"));
        let st = Ext4::open(dev)
            .expect("ext4")
            .stat("/etc/shadow")
            .expect("stat");
        assert_eq!(st.mode & 0o7777, 0o640);
    }
}

#[test]
fn unlock_and_restore_backup_in_the_image() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(
        &src,
        b"root:!$6$old$hash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    );
    let img = mkfs(tmp.path(), "u.img", &src, 32, &["-b", "4096"]);
    let dev = RawFile::open(&img, false).expect("open rw");
    let read = |p: &str| {
        let d: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, true).expect("open"));
        Ext4::open(d).expect("ext4").read_file(p).expect("read")
    };
    let new = passwd::repair_shadow(
        &read("/etc/shadow"),
        &read("/etc/passwd"),
        "root",
        Action::Unlock,
    )
    .expect("unlock");
    replace_file(&dev, "/etc/shadow", &new).expect("replace");
    assert_fsck_clean(&img, "unlock");
    assert!(debugfs(&img, "cat /etc/shadow").starts_with(b"root:$6$old$hash:"));
    let new = passwd::repair_shadow(
        &read("/etc/shadow"),
        &read("/etc/passwd"),
        "root",
        Action::RestoreBackup(read("/etc/shadow-")),
    )
    .expect("restore");
    replace_file(&dev, "/etc/shadow", &new).expect("replace");
    assert_fsck_clean(&img, "restore");
    assert_eq!(
        debugfs(&img, "cat /etc/shadow"),
        b"root:$6$bk$backuphash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n"
    );
}

#[test]
fn nixos_immutable_users_warns() {
    let tmp = tempfile::tempdir().expect("tempdir");
    for (i, mutable) in [false, true].iter().enumerate() {
        let src = tmp.path().join(format!("nix{i}"));
        populate(&src, SHADOW_OK);
        std::fs::write(src.join("etc/NIXOS"), b"").expect("write");
        let store = src.join("nix/store");
        std::fs::create_dir_all(&store).expect("mkdir");
        let json = format!("{{\"groups\":[],\"mutableUsers\":{mutable},\"users\":[]}}");
        std::fs::write(
            store.join("0123456789abcdfghijklmnpqrsvwxyz-users-groups.json"),
            json,
        )
        .expect("write");
        let sys = store.join("aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-test");
        std::fs::create_dir_all(&sys).expect("mkdir");
        std::fs::write(
            sys.join("activate"),
            b"#!/bin/sh\nperl update-users-groups.pl /nix/store/0123456789abcdfghijklmnpqrsvwxyz-users-groups.json\n",
        )
        .expect("write");
        std::fs::create_dir_all(src.join("nix/var/nix/profiles")).expect("mkdir");
        std::os::unix::fs::symlink(
            "/nix/store/aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa-nixos-system-test",
            src.join("nix/var/nix/profiles/system-1-link"),
        )
        .expect("symlink");
        std::os::unix::fs::symlink("system-1-link", src.join("nix/var/nix/profiles/system"))
            .expect("symlink");
        let img = mkfs(
            tmp.path(),
            &format!("nix{i}.img"),
            &src,
            32,
            &["-b", "1024"],
        );
        let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, true).expect("open"));
        let st = passwd::nixos_status(&Ext4::open(dev).expect("ext4"));
        assert!(st.is_nixos);
        assert_eq!(st.mutable_users, Some(*mutable));
        assert_eq!(st.warning.is_some(), !mutable);
        if let Some(w) = st.warning {
            assert!(w.contains("hashedPassword") && w.contains("mutableUsers"));
        }
    }
}
