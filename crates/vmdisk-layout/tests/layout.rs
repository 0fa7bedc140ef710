//! Interop tests: build layouts into raw files and let the real tools judge them
//! (sgdisk, sfdisk, fsck.vfat, mtools, e2fsck, debugfs, blkid, swaplabel). Missing tools fail
//! loudly; `cargo xtask test` installs them (gdisk fdisk dosfstools mtools e2fsprogs
//! util-linux).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmdisk_block::RawFile;
use vmdisk_layout::{
    apply, measure, parse_layout, plan, probe_filesystem, probe_partitions, scan_copy_in,
    select_disk, FsKind, Plan, PlanOptions, PlannedContent,
};

const PACKAGES: &str = "gdisk fdisk dosfstools mtools e2fsprogs util-linux";

fn fixture(name: &str) -> String {
    let ours = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    // crates/vmdisk-layout -> the repository root -> its parent, which holds shared/.
    let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/fixtures/disko")
        .join(name);
    fs::read_to_string(&ours)
        .or_else(|_| fs::read_to_string(&shared))
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

/// Run a command; panic with everything it printed unless it succeeds.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| {
        panic!("cannot run {cmd:?}: {e}. Install the test tools: apt-get install -y {PACKAGES}")
    });
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout + &stderr
}

fn sha256(path: &Path) -> String {
    run(Command::new("sha256sum").arg(path))
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

struct Built {
    dir: tempfile::TempDir,
    image: PathBuf,
    plan: Plan,
}

fn build(json: &str, disk: Option<&str>, size: Option<u64>, opts: &PlanOptions) -> Built {
    let d = &select_disk(parse_layout(json).unwrap(), disk).unwrap();
    let sources = scan_copy_in(d, opts).unwrap();
    let p = plan(d, size, opts, &sources).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join(format!("{}.raw", d.name));
    let dev = RawFile::create(&image, p.disk_size).unwrap();
    let report = apply(&p, &sources, &dev, dir.path()).unwrap();
    assert_eq!(report.partitions.len(), p.partitions.len());
    // Scratch files are gone.
    let left: Vec<_> = fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "scratch files left behind: {left:?}");
    Built {
        dir,
        image,
        plan: p,
    }
}

/// Extract partition `i` of the plan with dd.
fn extract(b: &Built, i: usize) -> PathBuf {
    let p = &b.plan.partitions[i];
    let out = b.dir.path().join(format!("part{}.img", p.number));
    run(Command::new("dd")
        .arg(format!("if={}", b.image.display()))
        .arg(format!("of={}", out.display()))
        .arg("bs=512")
        .arg(format!("skip={}", p.first_lba))
        .arg(format!("count={}", p.last_lba - p.first_lba + 1))
        .arg("conv=sparse")
        .arg("status=none"));
    out
}

/// Every check the real tools can make on a built disk.
fn verify(b: &Built) {
    let img = &b.image;
    let v = run(Command::new("sgdisk").arg("-v").arg(img));
    assert!(v.contains("No problems found"), "sgdisk -v:\n{v}");
    run(Command::new("sfdisk").arg("--verify").arg(img));
    let json = run(Command::new("sfdisk").arg("--json").arg(img));
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    let table = &j["partitiontable"];
    assert_eq!(table["label"], "gpt");
    assert_eq!(
        table["id"].as_str().unwrap().to_lowercase(),
        b.plan.disk_guid.to_string()
    );
    let parts = table["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), b.plan.partitions.len());
    for p in &b.plan.partitions {
        let node = format!("{}{}", img.display(), p.number);
        let s = parts
            .iter()
            .find(|s| s["node"] == node.as_str())
            .unwrap_or_else(|| panic!("sfdisk lists no {node}: {json}"));
        assert_eq!(s["start"].as_u64(), Some(p.first_lba), "{node}");
        assert_eq!(
            s["size"].as_u64(),
            Some(p.last_lba - p.first_lba + 1),
            "{node}"
        );
        assert_eq!(s["name"].as_str(), Some(p.label.as_str()), "{node}");
        assert_eq!(
            s["type"].as_str().unwrap().to_lowercase(),
            p.type_guid.to_string(),
            "{node}"
        );
        assert_eq!(
            s["uuid"].as_str().unwrap().to_lowercase(),
            p.guid.to_string(),
            "{node}"
        );
        assert_eq!(p.first_lba % 2048, 0, "{node} start alignment");
    }
    let dev = RawFile::open(img, true).unwrap();
    let table = probe_partitions(&dev).unwrap().unwrap();
    assert_eq!(table.partitions.len(), b.plan.partitions.len());
    for (i, p) in b.plan.partitions.iter().enumerate() {
        match &p.content {
            PlannedContent::None => {}
            // btrfs/xfs/f2fs: the disko corpus test checks them with their own tools.
            PlannedContent::Mkfs { .. } => {}
            PlannedContent::Fat {
                label, volume_id, ..
            } => {
                let part = extract(b, i);
                let out = run(Command::new("fsck.vfat").arg("-n").arg(&part));
                assert!(!out.contains("differ") && !out.contains("will be"), "{out}");
                let blk = run(Command::new("blkid").arg("-p").arg(&part));
                assert!(blk.contains("TYPE=\"vfat\""), "{blk}");
                // The variant mkfs.fat picks for this size (tests/fat_mkfs.rs holds
                // FatGeometry to mkfs.fat itself).
                let bits = vmdisk_layout::FatGeometry::for_size(p.len(), 0)
                    .unwrap()
                    .bits;
                assert!(blk.contains(&format!("VERSION=\"FAT{bits}\"")), "{blk}");
                let id = format!("{:04X}-{:04X}", volume_id >> 16, volume_id & 0xFFFF);
                assert!(blk.contains(&format!("UUID=\"{id}\"")), "{blk}");
                if let Some(l) = label {
                    assert!(blk.contains(&format!("LABEL=\"{l}\"")), "{blk}");
                }
            }
            PlannedContent::Ext { format, uuid, .. } => {
                let part = extract(b, i);
                run(Command::new("e2fsck").arg("-fn").arg(&part));
                let blk = run(Command::new("blkid").arg("-p").arg(&part));
                assert!(
                    blk.contains(&format!("TYPE=\"{}\"", format.name())),
                    "{blk}"
                );
                assert!(blk.contains(&format!("UUID=\"{uuid}\"")), "{blk}");
            }
            PlannedContent::Swap { label, uuid } => {
                let part = extract(b, i);
                let blk = run(Command::new("blkid").arg("-p").arg(&part));
                assert!(blk.contains("TYPE=\"swap\""), "{blk}");
                assert!(blk.contains("VERSION=\"1\""), "{blk}");
                assert!(blk.contains(&format!("UUID=\"{uuid}\"")), "{blk}");
                let sl = run(Command::new("swaplabel").arg(&part));
                assert!(sl.contains(&format!("UUID:  {uuid}")), "{sl}");
                if let Some(l) = label {
                    assert!(blk.contains(&format!("LABEL=\"{l}\"")), "{blk}");
                    assert!(sl.contains(&format!("LABEL: {l}")), "{sl}");
                }
            }
        }
    }
}

fn seeded(seed: &str) -> PlanOptions {
    PlanOptions {
        seed: Some(seed.into()),
        ..Default::default()
    }
}

#[test]
fn shared_raw_fixture() {
    let b = build(&fixture("raw-esp-swap-root.json"), None, None, &seeded("t"));
    assert_eq!(b.plan.disk_size, 8 << 30);
    verify(&b);
    // Sparse: an 8 GiB disk with empty filesystems stores little.
    let used = {
        use std::os::unix::fs::MetadataExt;
        fs::metadata(&b.image).unwrap().blocks() * 512
    };
    assert!(used < 300 << 20, "{used}");
    let out = run(Command::new("blkid").arg("-p").arg(extract(&b, 2)));
    assert!(out.contains("LABEL=\"nixos\""), "{out}");
}

#[test]
fn shared_evaluated_fixture_matches_raw() {
    // 2 GiB instead of imageSize's 8 GiB keeps hashing quick; the layout is the same.
    let size = Some(2 << 30);
    let a = build(
        &fixture("raw-esp-swap-root.json"),
        None,
        size,
        &seeded("same"),
    );
    let b = build(
        &fixture("evaluated-esp-swap-root.json"),
        None,
        size,
        &seeded("same"),
    );
    verify(&b);
    assert_eq!(sha256(&a.image), sha256(&b.image));
}

#[test]
fn our_fixtures_pass_the_tools() {
    for name in [
        "esp-only.json",
        "esp-root.json",
        "esp-swap-root-disk.json",
        "bios-root.json",
        "guid-types.json",
        "start-end.json",
    ] {
        eprintln!("fixture {name}");
        let b = build(&fixture(name), None, None, &PlanOptions::default());
        verify(&b);
    }
}

#[test]
fn bios_boot_comes_first() {
    let b = build(
        &fixture("bios-root.json"),
        None,
        None,
        &PlanOptions::default(),
    );
    let json = run(Command::new("sfdisk").arg("--json").arg(&b.image));
    let j: serde_json::Value = serde_json::from_str(&json).unwrap();
    let first = &j["partitiontable"]["partitions"][0];
    assert_eq!(first["name"], "disk-legacy-zz-grub");
    assert_eq!(first["type"], "21686148-6449-6E6F-744E-656564454649");
}

#[test]
fn three_disks_one_at_a_time() {
    let json = fixture("three-disks.json");
    let mut guids = Vec::new();
    for name in ["a", "b", "c"] {
        let b = build(&json, Some(name), None, &seeded("three"));
        verify(&b);
        guids.push(b.plan.disk_guid);
    }
    guids.sort();
    guids.dedup();
    assert_eq!(guids.len(), 3, "each disk gets its own GUID from one seed");
}

/// Read every file, directory and symlink under `dir` once (see `reproducible_bytes`).
fn settle_atimes(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            settle_atimes(&p);
        } else if m.is_file() {
            std::fs::read(&p).unwrap();
        } else if m.file_type().is_symlink() {
            // readlink moves a symlink's atime too.
            std::fs::read_link(&p).unwrap();
        }
    }
}

#[test]
fn reproducible_bytes() {
    let json = fixture("esp-swap-root-disk.json");
    let src = copy_in_tree();
    // mke2fs -d copies atimes too, and relatime moves a fresh file's atime on its first read:
    // read the tree once so both builds see the same input.
    settle_atimes(src.path());
    let opts = PlanOptions {
        seed: Some("repro".into()),
        copy_in: vec![
            ("/".into(), src.path().join("root")),
            ("ESP".into(), src.path().join("esp")),
        ],
        free_margin: 0,
    };
    let a = build(&json, None, None, &opts);
    let b = build(&json, None, None, &opts);
    assert_eq!(sha256(&a.image), sha256(&b.image));
    let c = build(&json, None, None, &seeded("other"));
    assert_ne!(sha256(&a.image), sha256(&c.image));
}

/// A tree with long names, nested dirs, modes, symlinks and an empty file.
fn copy_in_tree() -> tempfile::TempDir {
    use std::os::unix::fs::{symlink, PermissionsExt};
    let t = tempfile::tempdir().unwrap();
    let root = t.path().join("root");
    fs::create_dir_all(root.join("etc/ssh")).unwrap();
    fs::create_dir_all(root.join("var/empty")).unwrap();
    fs::write(root.join("etc/hostname"), "vm\n").unwrap();
    fs::write(root.join("etc/ssh/ssh_host_ed25519_key"), "secret\n").unwrap();
    fs::set_permissions(
        root.join("etc/ssh/ssh_host_ed25519_key"),
        fs::Permissions::from_mode(0o600),
    )
    .unwrap();
    symlink("hostname", root.join("etc/name-link")).unwrap();
    fs::write(root.join("big.bin"), vec![7u8; 3 << 20]).unwrap();
    let esp = t.path().join("esp");
    fs::create_dir_all(esp.join("EFI/BOOT")).unwrap();
    fs::create_dir_all(esp.join("loader/entries")).unwrap();
    fs::write(esp.join("EFI/BOOT/BOOTX64.EFI"), vec![0x4d; 200_000]).unwrap();
    fs::write(esp.join("loader/loader.conf"), "timeout 0\n").unwrap();
    fs::write(
        esp.join("loader/entries/nixos-generation-1-specialisation.conf"),
        "title NixOS\nlinux /k\n",
    )
    .unwrap();
    fs::write(
        esp.join("loader/entries/nixos-generation-2-specialisation.conf"),
        "",
    )
    .unwrap();
    fs::write(esp.join("Mixed Case Name.txt"), "x").unwrap();
    fs::write(esp.join("ünïcödé.txt"), "u").unwrap();
    t
}

#[test]
fn copy_in_fills_fat_and_ext4() {
    let src = copy_in_tree();
    let opts = PlanOptions {
        seed: Some("copy".into()),
        copy_in: vec![
            ("root".into(), src.path().join("root")),
            ("disk-main-ESP".into(), src.path().join("esp")),
        ],
        free_margin: 0,
    };
    let b = build(&fixture("esp-root.json"), None, None, &opts);
    verify(&b);
    // FAT: mtools reads back every file, long names included.
    let esp = extract(&b, 0);
    let i = esp.to_str().unwrap();
    let conf = run(Command::new("mtype").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        i,
        "::/loader/entries/nixos-generation-1-specialisation.conf",
    ]));
    assert_eq!(conf, "title NixOS\nlinux /k\n");
    let efi = b.dir.path().join("bootx64.efi");
    run(Command::new("mcopy").env("MTOOLS_SKIP_CHECK", "1").args([
        "-i",
        i,
        "::/EFI/BOOT/BOOTX64.EFI",
        efi.to_str().unwrap(),
    ]));
    assert_eq!(fs::read(&efi).unwrap(), vec![0x4d; 200_000]);
    let dir = run(Command::new("mdir")
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-i", i, "-a", "::/"]));
    assert!(dir.contains("Mixed Case Name.txt"), "{dir}");
    assert!(dir.contains("ünïcödé.txt"), "{dir}");
    // ext4: modes, owners, symlinks.
    let root = extract(&b, 1);
    let r = root.to_str().unwrap();
    let st = run(Command::new("debugfs").args(["-R", "stat /etc/ssh/ssh_host_ed25519_key", r]));
    assert!(st.contains("Mode:  0600"), "{st}");
    let uid = my_uid();
    assert!(st.contains(&format!("User: {uid:5}")), "{st}");
    let ln = run(Command::new("debugfs").args(["-R", "stat /etc/name-link", r]));
    assert!(
        ln.contains("Type: symlink") && ln.contains("Fast link dest: \"hostname\""),
        "{ln}"
    );
    let cat = run(Command::new("debugfs").args(["-R", "cat /etc/hostname", r]));
    assert!(cat.contains("vm\n"), "{cat}");
    let fs_info = probe_filesystem(
        &vmdisk_block::Slice::new(
            RawFile::open(&b.image, true).unwrap(),
            b.plan.partitions[1].offset(),
            b.plan.partitions[1].len(),
        )
        .unwrap(),
    )
    .unwrap();
    assert_eq!(fs_info.kind, FsKind::Ext4);
    assert_eq!(fs_info.label.as_deref(), Some("nixos"));
}

/// The uid owning files we create (tests may run as root or not).
fn my_uid() -> u32 {
    use std::os::unix::fs::MetadataExt;
    let t = tempfile::NamedTempFile::new().unwrap();
    t.as_file().metadata().unwrap().uid()
}

#[test]
fn size_auto_holds_content_with_margin() {
    let src = copy_in_tree();
    let d = &select_disk(parse_layout(&fixture("esp-root.json")).unwrap(), None).unwrap();
    let opts = PlanOptions {
        seed: Some("auto".into()),
        copy_in: vec![
            ("root".into(), src.path().join("root")),
            ("ESP".into(), src.path().join("esp")),
        ],
        free_margin: 32 << 20,
    };
    let size = measure(d, &opts, &scan_copy_in(d, &opts).unwrap()).unwrap();
    assert_eq!(size % (1 << 20), 0);
    assert!(
        size < 512 << 20,
        "auto size {size} should be far below imageSize"
    );
    let b = build(&fixture("esp-root.json"), None, Some(size), &opts);
    verify(&b);
    // The root filesystem really has the margin free.
    let root = extract(&b, 1);
    let out = run(Command::new("dumpe2fs").arg("-h").arg(&root));
    let field = |name: &str| -> u64 {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} in {out}"))
    };
    let free = (field("Free blocks") - field("Reserved block count")) * field("Block size");
    assert!(free >= 32 << 20, "free {free}");
}
