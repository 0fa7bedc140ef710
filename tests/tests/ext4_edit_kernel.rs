//! The ext4 editor judged by the Linux kernel (loop mounts; run as root, as CI does): the
//! kernel reads exactly the tree the editor wrote and keeps writing into it, and a guest
//! image copied while mounted (journal needing recovery) is replayed and edited by
//! `vmdisk passwd` in one command, e2fsck -fn clean afterwards.

use std::path::Path;
use std::sync::Arc;

use tests::ext4edit::{
    assert_fsck_clean, assert_same_tree, debugfs, mkfs, read_host_tree, Kind, Model, Node,
};
use tests::mount::{require_root, sh, LoopMount};
use vmdisk_block::RawFile;
use vmdisk_ext4::{Attrs, Editor};

fn node(kind: Kind, mode: u32, uid: u32, gid: u32) -> Node {
    Node {
        kind,
        mode,
        uid,
        gid,
    }
}

/// A fixed edit touching every kind of change; returns the model of the result.
fn edit_everything(img: &Path) -> Model {
    let mut m = Model::new();
    let dev = Arc::new(RawFile::open(img, false).expect("open"));
    let mut ed = Editor::open(dev).expect("editor");
    ed.mkdir(
        "/home/alice/.ssh",
        Attrs {
            mode: Some(0o700),
            uid: Some(1000),
            gid: Some(100),
        },
        true,
    )
    .expect("mkdir -p");
    m.insert("home".into(), node(Kind::Dir, 0o755, 0, 0));
    m.insert("home/alice".into(), node(Kind::Dir, 0o755, 0, 0));
    m.insert("home/alice/.ssh".into(), node(Kind::Dir, 0o700, 1000, 100));
    let key = b"ssh-ed25519 AAAAC3Nza alice\n".to_vec();
    ed.write_file(
        "/home/alice/.ssh/authorized_keys",
        &key,
        Attrs {
            mode: Some(0o600),
            uid: Some(1000),
            gid: Some(100),
        },
    )
    .expect("write key");
    m.insert(
        "home/alice/.ssh/authorized_keys".into(),
        node(Kind::File(key), 0o600, 1000, 100),
    );
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    ed.write_file("/big", &big, Attrs::default())
        .expect("write big");
    m.insert("big".into(), node(Kind::File(big), 0o644, 0, 0));
    ed.symlink(
        "/home/alice/.ssh/authorized_keys",
        "/fast",
        Attrs::default(),
    )
    .expect("fast link");
    m.insert(
        "fast".into(),
        node(
            Kind::Link("/home/alice/.ssh/authorized_keys".into()),
            0o777,
            0,
            0,
        ),
    );
    let long = format!("/nix/store/{}-x/bin/sh", "a".repeat(100));
    ed.symlink(&long, "/slow", Attrs::default())
        .expect("slow link");
    m.insert("slow".into(), node(Kind::Link(long), 0o777, 0, 0));
    ed.mkdir("/many", Attrs::default(), false)
        .expect("mkdir many");
    m.insert("many".into(), node(Kind::Dir, 0o755, 0, 0));
    for i in 0..400 {
        let p = format!("/many/file-number-{i}");
        ed.write_file(&p, format!("{i}\n").as_bytes(), Attrs::default())
            .expect("write");
        m.insert(
            p[1..].to_string(),
            node(Kind::File(format!("{i}\n").into_bytes()), 0o644, 0, 0),
        );
    }
    ed.mkdir("/gone/deep/er", Attrs::default(), true)
        .expect("mkdir gone");
    ed.write_file("/gone/deep/er/x", &[7u8; 10000], Attrs::default())
        .expect("write");
    ed.commit().expect("commit");
    // A second edit: removals and attribute changes over the first one's work.
    let dev = Arc::new(RawFile::open(img, false).expect("open"));
    let mut ed = Editor::open(dev).expect("editor");
    ed.remove("/gone", true).expect("rm -r");
    for i in (0..400).step_by(3) {
        ed.remove(&format!("/many/file-number-{i}"), false)
            .expect("rm");
        m.remove(&format!("many/file-number-{i}"));
    }
    ed.chown("/many", Some(1000), Some(100), true)
        .expect("chown -R");
    for (k, v) in m.iter_mut() {
        if k == "many" || k.starts_with("many/") {
            v.uid = 1000;
            v.gid = 100;
        }
    }
    ed.chmod("/big", 0o600, false).expect("chmod");
    if let Some(b) = m.get_mut("big") {
        b.mode = 0o600;
    }
    ed.commit().expect("commit");
    m
}

#[test]
fn kernel_reads_what_the_editor_wrote_and_writes_on() {
    require_root();
    for (name, args) in [
        ("ext4", &["-t", "ext4"][..]),
        (
            "ext4-1k-128",
            &["-t", "ext4", "-b", "1024", "-I", "128"][..],
        ),
        ("ext3", &["-t", "ext3"][..]),
        ("ext2", &["-t", "ext2"][..]),
    ] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let img = tmp.path().join("fs.img");
        mkfs(&img, 64, args, None);
        let want = edit_everything(&img);
        assert_fsck_clean(&img, name);
        let mnt = tmp.path().join("mnt");
        {
            let _m = LoopMount::new(&img, &mnt, "ro");
            assert_same_tree(
                &read_host_tree(&mnt),
                &want,
                &format!("{name}: kernel view"),
            );
        }
        {
            // The kernel goes on writing into directories and files the editor made.
            let _m = LoopMount::new(&img, &mnt, "rw");
            let d = mnt.display();
            sh(&format!(
                "echo more >> {d}/home/alice/.ssh/authorized_keys && \
                 for i in $(seq 1 200); do echo $i > {d}/many/k$i; done && \
                 rm {d}/many/file-number-1 && mkdir {d}/home/alice/.ssh/sub && sync"
            ));
        }
        assert_fsck_clean(&img, &format!("{name}: after the kernel wrote into it"));
    }
}

#[test]
fn crashed_guest_is_replayed_and_edited_by_passwd() {
    require_root();
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    std::fs::create_dir_all(src.join("etc")).expect("mkdir");
    std::fs::write(
        src.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nalice:x:1000:100::/home/alice:/bin/sh\n",
    )
    .expect("w");
    std::fs::write(
        src.join("etc/shadow"),
        "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n",
    )
    .expect("w");
    let img = tmp.path().join("fs.img");
    mkfs(&img, 64, &["-t", "ext4"], Some(&src));
    let crashed = tmp.path().join("crashed.img");
    let mnt = tmp.path().join("mnt");
    {
        let m = LoopMount::new(&img, &mnt, "rw");
        let d = m.dir.display();
        sh(&format!(
            "mkdir {d}/var && for i in $(seq 1 300); do echo log line $i > {d}/var/log$i; done && \
             echo changed > {d}/etc/motd && sync"
        ));
        // The VM is "killed": the disk as it is while still mounted.
        sh(&format!(
            "cp --sparse=always '{}' '{}'",
            img.display(),
            crashed.display()
        ));
    }
    let stats = debugfs(&crashed, "stats").stdout;
    assert!(
        stats.contains("needs_recovery"),
        "the copy does not need recovery: {stats}"
    );
    let r = tests::vmdisk(&[
        "passwd",
        crashed.to_str().expect("utf8"),
        "alice",
        "--hash",
        "$6$salt$hash",
        "--in-place",
    ]);
    assert!(
        r.success(),
        "passwd on the crashed image: {}{}",
        r.stdout,
        r.stderr
    );
    assert_fsck_clean(&crashed, "crashed image after passwd");
    let shadow = debugfs(&crashed, "cat /etc/shadow").stdout;
    assert!(shadow.contains("alice:$6$salt$hash:"), "{shadow}");
    // What the kernel had committed to the journal survived the replay.
    let motd = debugfs(&crashed, "cat /etc/motd").stdout;
    assert_eq!(motd, "changed\n");
    let log = debugfs(&crashed, "cat /var/log300").stdout;
    assert_eq!(log, "log line 300\n");
    let stats = debugfs(&crashed, "stats").stdout;
    assert!(!stats.contains("needs_recovery"), "{stats}");
}
