//! What the builder VM makes opens and mounts as the user's machine would open it: disko's own
//! luks-lvm, mdadm and luks-btrfs-subvolumes examples (from `../shared/corpus/disko`), built by
//! `vmdisk create --layout` with `--copy-in` into the kernel-made filesystems, then attached
//! in a fresh rescue VM (`vmdisk rescue`, Debian's kernel and tools) where `cryptsetup open`
//! with the key, `vgchange -ay`, `mdadm --assemble` and `mount` must find the copied-in files.
//! `cryptsetup luksDump` and blkid read the LUKS header on the host too.

use std::fs;
use std::path::{Path, PathBuf};

use tests::*;

fn example(name: &str) -> PathBuf {
    workspace_root().join(format!("../shared/corpus/disko/json/{name}.evaluated.json"))
}

/// A --copy-in tree with one file whose content names the test.
fn tree(dir: &Path, marker: &str) -> PathBuf {
    fs::create_dir_all(dir.join("sub")).unwrap();
    fs::write(dir.join("sub/marker.txt"), format!("{marker}\n")).unwrap();
    dir.to_path_buf()
}

fn fetch() {
    let r = vmdisk(&["rescue", "--fetch"]);
    assert!(r.success(), "vmdisk rescue --fetch:\n{r}");
}

#[test]
fn luks_lvm_opens_with_either_key_and_shows_the_copied_files() {
    fetch();
    let tmp = tempfile::tempdir().unwrap();
    let (k1, k2) = (tmp.path().join("k1"), tmp.path().join("k2"));
    fs::write(&k1, "first-key-bytes").unwrap();
    fs::write(&k2, "additional-key").unwrap();
    let home = tree(&tmp.path().join("home"), "luks-lvm-home");
    let img = tmp.path().join("luks-lvm.qcow2");
    let r = vmdisk(&[
        "create",
        "-f",
        "qcow2",
        "--layout",
        s(&example("luks-lvm")),
        "--secret",
        &format!("/tmp/secret.key={}", s(&k1)),
        "--secret",
        &format!("/tmp/additionalSecret.key={}", s(&k2)),
        "--copy-in",
        &format!("/home={}", s(&home)),
        s(&img),
        "4G",
    ]);
    assert!(r.success(), "{r}");
    let out = rescue(
        &[&img],
        "set -e; export DM_DISABLE_UDEV=1; vmdisk-builder-init >/dev/null; \
         printf first-key-bytes > /tmp/k1; printf additional-key > /tmp/k2; \
         printf wrong > /tmp/k3; \
         cryptsetup open --test-passphrase /dev/nbd0p2 --key-file /tmp/k1; \
         ! cryptsetup open --test-passphrase /dev/nbd0p2 --key-file /tmp/k3 2>/dev/null; \
         cryptsetup open /dev/nbd0p2 crypted --key-file /tmp/k2; \
         vgchange -ay pool >/dev/null; lvs --noheadings -o lv_name pool; \
         mkdir -p /m; mount /dev/pool/home /m; cat /m/sub/marker.txt; umount /m; \
         e2fsck -fn /dev/pool/root >/dev/null && echo root-clean; \
         vgchange -an pool >/dev/null; cryptsetup close crypted; echo opened-ok",
    );
    assert!(out.success(), "{out}");
    for want in [
        "home",
        "raw",
        "root",
        "luks-lvm-home",
        "root-clean",
        "opened-ok",
    ] {
        assert!(out.stdout.contains(want), "no {want:?} in:\n{out}");
    }
}

#[test]
fn mdadm_raid1_assembles_from_both_disks_and_shows_the_copied_files() {
    fetch();
    let tmp = tempfile::tempdir().unwrap();
    let root = tree(&tmp.path().join("root"), "mdadm-root");
    let (d1, d2) = (tmp.path().join("d1.raw"), tmp.path().join("d2.raw"));
    let r = vmdisk(&[
        "create",
        "--layout",
        s(&example("mdadm")),
        "--disk",
        "disk1",
        "--with-disk",
        &format!("disk2={}", s(&d2)),
        "--copy-in",
        &format!("/={}", s(&root)),
        s(&d1),
        "4G",
    ]);
    assert!(r.success(), "{r}");
    for d in [&d1, &d2] {
        let start = sfdisk_start(d, 2);
        let b = run(std::process::Command::new(require_tool("blkid")).args([
            "-p",
            "-O",
            &(start * 512).to_string(),
            "-o",
            "export",
            s(d),
        ]));
        assert!(
            b.stdout.contains("TYPE=linux_raid_member"),
            "{}: partition 2 is no md member:\n{b}",
            d.display()
        );
    }
    let out = rescue(
        &[&d1, &d2],
        "set -e; vmdisk-builder-init >/dev/null; \
         mdadm --assemble /dev/md/raid1 /dev/nbd0p2 /dev/nbd1p2; \
         cat /proc/mdstat; dev=$(readlink -f /dev/md/raid1); blockdev --rereadpt $dev || true; \
         mkdir -p /m; mount ${dev}p1 /m; cat /m/sub/marker.txt; umount /m; \
         mdadm --stop /dev/md/raid1; echo assembled-ok",
    );
    assert!(out.success(), "{out}");
    for want in ["raid1", "nbd0p2", "nbd1p2", "mdadm-root", "assembled-ok"] {
        assert!(out.stdout.contains(want), "no {want:?} in:\n{out}");
    }
}

#[test]
fn luks_btrfs_subvolumes_mount_by_subvolume_with_the_swap_file() {
    fetch();
    let tmp = tempfile::tempdir().unwrap();
    // A key file is the key byte for byte, trailing newline included (disko passes it to
    // cryptsetup as it is): without the newline it must not open.
    let key = tmp.path().join("key");
    fs::write(&key, "btrfs-key\n").unwrap();
    let home = tree(&tmp.path().join("home"), "in-the-home-subvolume");
    let img = tmp.path().join("luks-btrfs.raw");
    let r = vmdisk(&[
        "create",
        "--layout",
        s(&example("luks-btrfs-subvolumes")),
        "--secret",
        &format!("/tmp/secret.key={}", s(&key)),
        "--secret",
        &format!("/tmp/additionalSecret.key={}", s(&key)),
        "--copy-in",
        &format!("/home={}", s(&home)),
        s(&img),
        "4G",
    ]);
    assert!(r.success(), "{r}");
    // The LUKS header, read by the host's cryptsetup from the partition's bytes.
    let start = sfdisk_start(&img, 2);
    let part = tmp.path().join("p2");
    let dd = run(std::process::Command::new("dd").args([
        &format!("if={}", s(&img)),
        &format!("of={}", s(&part)),
        "bs=512",
        &format!("skip={start}"),
        "count=65536",
        "status=none",
    ]));
    assert!(dd.success(), "{dd}");
    let dump =
        run(std::process::Command::new(require_tool("cryptsetup")).args(["luksDump", s(&part)]));
    assert!(
        dump.success() && dump.stdout.contains("Version:") && dump.stdout.contains("Keyslots:"),
        "{dump}"
    );
    let out = rescue(
        &[&img],
        "set -e; export DM_DISABLE_UDEV=1; vmdisk-builder-init >/dev/null; \
         printf 'btrfs-key\\n' > /tmp/k; printf btrfs-key > /tmp/k0; \
         ! cryptsetup open --test-passphrase /dev/nbd0p2 --key-file /tmp/k0 2>/dev/null; \
         cryptsetup open /dev/nbd0p2 crypted --key-file /tmp/k; \
         mkdir -p /m; mount -t btrfs -o subvol=/ /dev/mapper/crypted /m; \
         btrfs subvolume list /m; umount /m; \
         mount -t btrfs -o subvol=/home /dev/mapper/crypted /m; cat /m/sub/marker.txt; umount /m; \
         mount -t btrfs -o subvol=/swap /dev/mapper/crypted /m; ls -l /m/swapfile; umount /m; \
         btrfs check --readonly /dev/mapper/crypted >/dev/null 2>&1 && echo btrfs-clean; \
         cryptsetup close crypted; echo opened-ok",
    );
    assert!(out.success(), "{out}");
    for want in [
        "path home",
        "path nix",
        "path root",
        "path swap",
        "in-the-home-subvolume",
        "20971520",
        "btrfs-clean",
        "opened-ok",
    ] {
        assert!(out.stdout.contains(want), "no {want:?} in:\n{out}");
    }
}

/// The start sector of partition `n` of `img`, from `sfdisk --json`.
fn sfdisk_start(img: &Path, n: usize) -> u64 {
    let r = run(std::process::Command::new(require_tool("sfdisk")).args(["--json", s(img)]));
    assert!(r.success(), "{r}");
    let v: serde_json::Value = serde_json::from_str(&r.stdout).unwrap();
    v["partitiontable"]["partitions"][n - 1]["start"]
        .as_u64()
        .unwrap()
}
