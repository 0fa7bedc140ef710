//! vfat (ESP) reading: `vmdisk ls`, `cat` and `cp-out` on FAT12/16/32 volumes made by
//! `mkfs.vfat` + `mcopy`, and on a disko ESP built by `vmdisk create --layout`, judged by
//! what `mcopy -s` copies out of them (long names included).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn tool(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap_or_else(|e| panic!("{cmd} missing ({e}): apt-get install -y mtools dosfstools"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An ESP-like tree: systemd-boot entries, kernels, long, mixed-case and non-ASCII names.
fn esp_tree(root: &Path) {
    let files: &[(&str, usize)] = &[
        ("loader/loader.conf", 40),
        ("loader/entries/nixos-generation-1.conf", 300),
        (
            "loader/entries/nixos-generation-42-specialisation-with-a-long-name.conf",
            310,
        ),
        ("EFI/BOOT/BOOTX64.EFI", 150_000),
        ("EFI/systemd/systemd-bootx64.efi", 90_000),
        ("EFI/nixos/kernel with spaces-6.6.efi", 700_000),
        ("EFI/nixos/MixedCase.Txt", 5),
        ("EFI/nixos/abc.txt", 0),
        ("EFI/nixos/über-файл.txt", 17),
        ("a/b/c/d/e/deep.txt", 9),
    ];
    for (i, (p, n)) in files.iter().enumerate() {
        let path = root.join(p);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let data: Vec<u8> = (0..*n).map(|k| (k * 31 + i * 7 + k / 977) as u8).collect();
        std::fs::write(&path, data).unwrap();
    }
    std::fs::create_dir_all(root.join("empty dir")).unwrap();
}

/// path -> Some(content) for files, None for directories.
fn host_tree(root: &Path) -> BTreeMap<String, Option<Vec<u8>>> {
    let mut m = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), String::new())];
    while let Some((d, rel)) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = format!("{rel}/{}", e.file_name().to_string_lossy());
            if e.file_type().unwrap().is_dir() {
                m.insert(p.clone(), None);
                stack.push((e.path(), p));
            } else {
                m.insert(p, Some(std::fs::read(e.path()).unwrap()));
            }
        }
    }
    m
}

fn assert_same_tree(ours: &Path, theirs: &Path, what: &str) {
    let a = host_tree(ours);
    let b = host_tree(theirs);
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: cp-out and mcopy -s copied different paths"
    );
    for (p, v) in &a {
        assert!(v == &b[p], "{what}: {p} differs");
    }
    assert!(a.len() > 15, "{what}: only {} entries", a.len());
}

fn mcopy_out(img_spec: &str, dest: &Path) {
    std::fs::create_dir_all(dest).unwrap();
    tool("mcopy", &["-s", "-n", "-i", img_spec, "::/*", s(dest)]);
}

#[test]
fn mkfs_vfat_volumes_read_like_mcopy() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let src = tmp.join("src");
    esp_tree(&src);
    for (fat, mb) in [("12", 4u64), ("16", 64), ("32", 64)] {
        let img = tmp.join(format!("fat{fat}.img"));
        std::fs::File::create(&img)
            .unwrap()
            .set_len(mb << 20)
            .unwrap();
        tool("mkfs.vfat", &["-F", fat, "-n", "ESP", s(&img)]);
        let entries: Vec<String> = std::fs::read_dir(&src)
            .unwrap()
            .map(|e| s(&e.unwrap().path()).to_string())
            .collect();
        let mut args = vec!["-s", "-i", s(&img)];
        args.extend(entries.iter().map(String::as_str));
        args.push("::/");
        tool("mcopy", &args);
        tool("fsck.vfat", &["-n", s(&img)]);
        let theirs = tmp.join(format!("mcopy{fat}"));
        mcopy_out(s(&img), &theirs);
        let ours = tmp.join(format!("ours{fat}"));
        vmdisk(&["cp-out", s(&img), "/", s(&ours)]).ok();
        assert_same_tree(&ours, &theirs, &format!("FAT{fat}"));
        // Every byte matches the source tree too (long names as written).
        assert_same_tree(&ours, &src, &format!("FAT{fat} vs source"));
        let r = vmdisk(&["ls", "-R", s(&img), "/"]).ok();
        assert!(
            r.stdout.contains(
                "/loader/entries/nixos-generation-42-specialisation-with-a-long-name.conf"
            ),
            "{r}"
        );
        let (r, data) = vmdisk_bytes(&["cat", s(&img), "/EFI/nixos/über-файл.txt"], None);
        let _ = r.ok();
        assert_eq!(
            data,
            std::fs::read(src.join("EFI/nixos/über-файл.txt")).unwrap()
        );
        // FAT names are case-insensitive.
        let (r, data) = vmdisk_bytes(&["cat", s(&img), "/efi/boot/bootx64.efi"], None);
        let _ = r.ok();
        assert_eq!(data.len(), 150_000, "FAT{fat}");
    }
}

#[test]
fn disko_esp_built_by_vmdisk_reads_like_mcopy_with_p_esp() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let layout = workspace_root().join("testvms/layouts/esp-swap-root.json");
    let esp = tmp.join("esp");
    esp_tree(&esp);
    let root = tmp.join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/hostname"), "esp-test\n").unwrap();
    let img = tmp.join("disk.raw");
    vmdisk(&[
        "create",
        "-f",
        "raw",
        "--layout",
        s(&layout),
        "--copy-in",
        &format!("ESP={}", s(&esp)),
        "--copy-in",
        &format!("root={}", s(&root)),
        s(&img),
        "160M",
    ])
    .ok();
    // The partition's offset, from sfdisk, for mtools' image@@offset.
    let out = Command::new("sfdisk")
        .args(["--json", s(&img)])
        .output()
        .unwrap();
    let j: serde_json::Value = serde_json::from_slice(&out.stdout).expect("sfdisk --json");
    let parts = j["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .clone();
    let esp_part = parts
        .iter()
        .find(|p| p["name"].as_str().is_some_and(|n| n.ends_with("-ESP")))
        .unwrap_or_else(|| panic!("no ESP partition: {j}"));
    let off = esp_part["start"].as_u64().unwrap() * 512;
    let theirs = tmp.join("mcopy");
    mcopy_out(&format!("{}@@{off}", s(&img)), &theirs);

    let r = vmdisk(&["ls", "-P", "ESP", s(&img), "/loader/entries"]).ok();
    assert!(r.stdout.contains("nixos-generation-1.conf"), "{r}");
    let ours = tmp.join("ours");
    vmdisk(&["cp-out", "-P", "ESP", s(&img), "/", s(&ours)]).ok();
    assert_same_tree(&ours, &theirs, "disko ESP");
    assert_same_tree(&ours, &esp, "disko ESP vs source");
    // The root is still found by default.
    let (r, host) = vmdisk_bytes(&["cat", s(&img), "/etc/hostname"], None);
    let _ = r.ok();
    assert_eq!(host, b"esp-test\n");
    // Two partitions answering to the key: an error that lists both, not a guess.
    let esp_no = esp_part["node"]
        .as_str()
        .unwrap()
        .trim_start_matches(s(&img))
        .to_string();
    let other = parts
        .iter()
        .map(|p| {
            p["node"]
                .as_str()
                .unwrap()
                .trim_start_matches(s(&img))
                .to_string()
        })
        .find(|n| *n != esp_no)
        .unwrap();
    let twice = tmp.join("twice.raw");
    std::fs::copy(&img, &twice).unwrap();
    tool(
        "sgdisk",
        &["-c", &format!("{other}:disk-second-ESP"), s(&twice)],
    );
    let r = vmdisk(&["ls", "-P", "ESP", s(&twice), "/"]);
    assert_ne!(r.code(), 0, "{r}");
    assert!(
        r.stderr.contains("disk-main-ESP") && r.stderr.contains("disk-second-ESP"),
        "the ambiguity error lists both candidates:\n{r}"
    );
}
