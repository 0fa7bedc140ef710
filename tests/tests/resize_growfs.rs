//! `vmdisk resize --grow-fs` (issue #18 part 2) judged by tools no one here wrote: filesystems
//! made by the real mke2fs, grown by vmdisk, then `e2fsck -fn`, `dumpe2fs`, `debugfs`,
//! `sgdisk -v`, `qemu-img check`/`compare`, resize2fs on a twin as the reference for every
//! counter, and the kernel mounting the result (loop mount as root) with `df` showing the
//! new size.
//!
//! What `qemu-img compare` can judge: the image-level step (`vmdisk resize` without
//! `--grow-fs` against `qemu-img resize` of a twin: identical). After `--grow-fs` the
//! filesystem metadata differs by design, so the old region is compared block by block with
//! the original and every block that differs must be a metadata block of the grown
//! filesystem as dumpe2fs and debugfs list them (superblocks, descriptors, reserved GDT
//! blocks, bitmaps, inode tables, the journal): no data block may change. On GPT disks the
//! bytes of every partition but the last are compared whole.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use tests::mount::{require_root, sh, LoopMount};
use tests::{qemu_img_in, require_tool, s, sha256, vmdisk_in};

const GIB: u64 = 1 << 30;
const MIB: u64 = 1 << 20;

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}

fn tools() {
    for t in [
        "mkfs.ext4",
        "e2fsck",
        "dumpe2fs",
        "debugfs",
        "resize2fs",
        "sgdisk",
        "losetup",
    ] {
        require_tool(t);
    }
}

/// A real mke2fs filesystem of `size` bytes in a sparse raw file, labelled nixos.
fn mkfs(path: &Path, size: u64, opts: &str) {
    let f = std::fs::File::create(path).expect("create");
    f.set_len(size).expect("set_len");
    sh(&format!(
        "mkfs.ext4 -q -F -L nixos {opts} '{}'",
        path.display()
    ));
}

/// Files spread over the filesystem (some large), written by debugfs.
fn populate(dev: &Path, dir: &Path) {
    let src = dir.join("src");
    std::fs::create_dir_all(&src).unwrap();
    let mut cmds = String::from("mkdir /etc\nmkdir /nix\nmkdir /nix/store\n");
    for i in 0..12u64 {
        let len = [100, 5000, 70_000, 3 * MIB as usize][i as usize % 4];
        let data = tests::mixed_data(i + 1, len);
        let p = src.join(format!("f{i}"));
        std::fs::write(&p, data).unwrap();
        let dst = if i % 2 == 0 { "/etc" } else { "/nix/store" };
        cmds.push_str(&format!("write {} {dst}/f{i}\n", p.display()));
    }
    let cf = dir.join("cmds");
    std::fs::write(&cf, cmds).unwrap();
    sh(&format!(
        "debugfs -w -f '{}' '{}' >/dev/null 2>&1",
        cf.display(),
        dev.display()
    ));
}

/// sha256 of every file `populate` wrote, read back by debugfs.
fn file_hashes(dev: &Path, dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for i in 0..12u64 {
        let name = if i % 2 == 0 {
            format!("/etc/f{i}")
        } else {
            format!("/nix/store/f{i}")
        };
        let dst = dir.join("dump");
        let _ = std::fs::remove_file(&dst);
        sh(&format!(
            "debugfs -R 'dump {name} {}' '{}' 2>/dev/null",
            dst.display(),
            dev.display()
        ));
        out.insert(name, sha256(&dst));
    }
    out
}

fn e2fsck_clean(dev: &Path, what: &str) {
    let o = Command::new("e2fsck")
        .args(["-fn", s(dev)])
        .output()
        .expect("e2fsck");
    assert!(
        o.status.success(),
        "{what}: e2fsck -fn found problems:\n{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
}

/// `dumpe2fs -h` fields by name.
fn sb_fields(dev: &Path) -> BTreeMap<String, String> {
    let out = sh(&format!("dumpe2fs -h '{}' 2>/dev/null", dev.display()));
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

fn field(f: &BTreeMap<String, String>, k: &str) -> u64 {
    f.get(k)
        .unwrap_or_else(|| panic!("dumpe2fs has no {k:?}"))
        .parse()
        .unwrap_or_else(|_| panic!("{k}: {:?}", f[k]))
}

/// The counters resize2fs and vmdisk must agree on.
fn counters(dev: &Path) -> Vec<(String, u64)> {
    let f = sb_fields(dev);
    [
        "Block count",
        "Free blocks",
        "Inode count",
        "Free inodes",
        "Reserved GDT blocks",
        "Reserved block count",
    ]
    .iter()
    .filter(|k| f.contains_key(**k))
    .map(|k| (k.to_string(), field(&f, k)))
    .collect()
}

/// Every metadata block of the filesystem, from dumpe2fs (group layout) and debugfs (the
/// journal's and the resize inode's blocks).
fn metadata_blocks(dev: &Path) -> Vec<(u64, u64)> {
    let out = sh(&format!("dumpe2fs '{}' 2>/dev/null", dev.display()));
    let mut v = Vec::new();
    let num = |t: &str| -> Option<u64> { t.trim().trim_end_matches(',').parse().ok() };
    for l in out.lines() {
        let l = l.trim();
        for key in [
            "superblock at ",
            "Group descriptors at ",
            "Reserved GDT blocks at ",
            "Block bitmap at ",
            "Inode bitmap at ",
            "Inode table at ",
        ] {
            let mut rest = l;
            while let Some(i) = rest.find(key) {
                let tail = &rest[i + key.len()..];
                let word: String = tail
                    .chars()
                    .take_while(|c| c.is_ascii_digit() || *c == '-')
                    .collect();
                let (a, b) = match word.split_once('-') {
                    Some((a, b)) => (num(a), num(b)),
                    None => (num(&word), num(&word)),
                };
                if let (Some(a), Some(b)) = (a, b) {
                    v.push((a, b));
                }
                rest = tail;
            }
        }
    }
    for ino in ["<7>", "<8>"] {
        let b = sh(&format!(
            "debugfs -R 'blocks {ino}' '{}' 2>/dev/null",
            dev.display()
        ));
        for w in b.split_whitespace() {
            if let Ok(n) = w.parse::<u64>() {
                v.push((n, n));
            }
        }
    }
    // The resize inode's double-indirect block.
    let st = sh(&format!(
        "debugfs -R 'stat <7>' '{}' 2>/dev/null",
        dev.display()
    ));
    if let Some(i) = st.find("(DIND):") {
        let n: String = st[i + 7..]
            .chars()
            .take_while(|c| c.is_ascii_digit())
            .collect();
        if let Ok(n) = n.parse::<u64>() {
            v.push((n, n));
        }
    }
    v.sort_unstable();
    v
}

/// Blocks of `bs` bytes that differ between `a` and `b` over `[off, off + len)`.
fn differing_blocks(a: &Path, b: &Path, off: u64, len: u64, bs: u64) -> Vec<u64> {
    use std::os::unix::fs::FileExt;
    let fa = std::fs::File::open(a).unwrap();
    let fb = std::fs::File::open(b).unwrap();
    let chunk = 4 * MIB;
    let mut ba = vec![0u8; chunk as usize];
    let mut bb = vec![0u8; chunk as usize];
    let mut out = Vec::new();
    let mut pos = 0;
    while pos < len {
        let n = chunk.min(len - pos) as usize;
        fa.read_exact_at(&mut ba[..n], off + pos).unwrap();
        fb.read_exact_at(&mut bb[..n], off + pos).unwrap();
        if ba[..n] != bb[..n] {
            for (i, (x, y)) in ba[..n]
                .chunks(bs as usize)
                .zip(bb[..n].chunks(bs as usize))
                .enumerate()
            {
                if x != y {
                    out.push((pos / bs) + i as u64);
                }
            }
        }
        pos += n as u64;
    }
    out
}

/// Only metadata blocks of the grown filesystem changed in the old region.
fn assert_only_metadata_changed(old: &Path, new: &Path, fs_dev: &Path, part_off: u64, what: &str) {
    let bs = field(&sb_fields(fs_dev), "Block size");
    let old_len = std::fs::metadata(old).unwrap().len() - part_off;
    let old_blocks = old_len / bs;
    let meta = metadata_blocks(fs_dev);
    let changed = differing_blocks(old, new, part_off, old_blocks * bs, bs);
    assert!(!changed.is_empty(), "{what}: nothing changed at all");
    let stray: Vec<u64> = changed
        .iter()
        .copied()
        .filter(|&b| !meta.iter().any(|&(lo, hi)| lo <= b && b <= hi))
        .collect();
    assert!(
        stray.is_empty(),
        "{what}: blocks that are no metadata of the grown filesystem changed: {:?}",
        &stray[..stray.len().min(20)]
    );
}

/// A read-only loop device over `[off, off + len)` of `file`, detached on drop.
struct LoopDev(PathBuf);

impl LoopDev {
    fn new(file: &Path, off: u64, len: u64) -> LoopDev {
        let out = sh(&format!(
            "losetup --find --show --read-only --offset {off} --sizelimit {len} '{}'",
            file.display()
        ));
        LoopDev(PathBuf::from(out.trim()))
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// The kernel mounts the filesystem and `df` reports its size in bytes.
fn kernel_df(dev: &Path, dir: &Path, opts: &str) -> u64 {
    let m = LoopMount::new(dev, &dir.join("mnt"), &format!("ro,noload{opts}"));
    let out = sh(&format!("df -B1 --output=size '{}'", m.dir.display()));
    out.lines()
        .nth(1)
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or_else(|| panic!("df output: {out}"))
}

fn qemu_check_clean(d: &Path, img: &str) {
    qemu_img_in(d, &["check", img]).ok();
}

fn to_raw(d: &Path, img: &str, raw: &str) {
    qemu_img_in(d, &["convert", "-O", "raw", img, raw]).ok();
}

/// Grow a whole-disk ext4 made by `mkfs_opts`: qcow2 or raw, by `grow`, and check it
/// against everything above; returns the grown raw image.
fn grow_whole_disk(d: &Path, name: &str, size: u64, mkfs_opts: &str, grow: &str, qcow2: bool) {
    let orig = d.join(format!("{name}.orig.raw"));
    mkfs(&orig, size, mkfs_opts);
    populate(&orig, d);
    let before = file_hashes(&orig, d);
    let img = if qcow2 {
        let q = format!("{name}.qcow2");
        qemu_img_in(d, &["convert", "-O", "qcow2", s(&orig), &q]).ok();
        q
    } else {
        let r = format!("{name}.raw");
        sh(&format!(
            "cp --sparse=always '{}' '{}'",
            orig.display(),
            d.join(&r).display()
        ));
        r
    };
    // The image-level step alone: identical to qemu-img resize of a twin.
    let (twin_q, twin_v) = (format!("{name}.twin-q"), format!("{name}.twin-v"));
    for t in [&twin_q, &twin_v] {
        sh(&format!(
            "cp --sparse=always '{}' '{}'",
            d.join(&img).display(),
            d.join(t).display()
        ));
    }
    let fmt = if qcow2 { "qcow2" } else { "raw" };
    qemu_img_in(d, &["resize", "-q", "-f", fmt, &twin_q, grow]).ok();
    vmdisk_in(d, &["resize", "-f", fmt, &twin_v, grow]).ok();
    tests::assert_qemu_compare_identical(d, &twin_q, &twin_v, "image-level resize");

    let r = vmdisk_in(d, &["resize", "--grow-fs", "--json", &img, grow]).ok();
    let j = r.json();
    let fsj = &j["grow-fs"]["filesystem"];
    if qcow2 {
        qemu_check_clean(d, &img);
    }
    let grown = d.join(format!("{name}.grown.raw"));
    to_raw(d, &img, s(&grown));
    e2fsck_clean(&grown, name);
    let f = sb_fields(&grown);
    let new_size = std::fs::metadata(&grown).unwrap().len();
    let bs = field(&f, "Block size");
    assert_eq!(
        j["new-size"].as_u64(),
        Some(new_size),
        "{name}: json new-size"
    );
    assert_eq!(
        fsj["new_blocks"].as_u64(),
        Some(field(&f, "Block count")),
        "{name}: json"
    );
    assert!(
        field(&f, "Block count") * bs > new_size - 64 * MIB,
        "{name}: the filesystem fills the disk ({} blocks for {new_size} bytes)",
        field(&f, "Block count")
    );
    assert_eq!(file_hashes(&grown, d), before, "{name}: files changed");
    assert_only_metadata_changed(&orig, &grown, &grown, 0, name);

    // resize2fs on a twin is the reference for every counter, and the kernel agrees on df.
    let reference = d.join(format!("{name}.resize2fs.raw"));
    sh(&format!(
        "cp --sparse=always '{}' '{}' && truncate -s {new_size} '{}' && resize2fs '{}' >/dev/null 2>&1",
        orig.display(),
        reference.display(),
        reference.display(),
        reference.display()
    ));
    assert_eq!(
        counters(&grown),
        counters(&reference),
        "{name}: vmdisk vs resize2fs"
    );
    let df = kernel_df(&grown, &d.join(format!("{name}-m")), "");
    let df_ref = kernel_df(&reference, &d.join(format!("{name}-r")), "");
    assert_eq!(df, df_ref, "{name}: df of vmdisk's vs resize2fs's result");
    let old_df = kernel_df(&orig, &d.join(format!("{name}-o")), "");
    assert!(
        df > old_df + (new_size - size) * 9 / 10,
        "{name}: df {df} is not the new size (was {old_df})"
    );
    // The kernel allocates in the new groups (a file larger than the old filesystem), and
    // what it leaves is still clean.
    if new_size - size <= 4 * GIB {
        let m = LoopMount::new(&grown, &d.join(format!("{name}-rw")), "rw");
        sh(&format!(
            "fallocate -l {} '{}/big' && echo x > '{}/small' && sync",
            size + (new_size - size) / 2,
            m.dir.display(),
            m.dir.display()
        ));
        drop(m);
        e2fsck_clean(&grown, &format!("{name} after the kernel wrote to it"));
    }
}

#[test]
fn build_vm_shaped_qcow2_grows_by_1g_and_100g() {
    tools();
    require_root();
    let dir = tmp();
    grow_whole_disk(dir.path(), "g1", GIB, "", "+1G", true);
    grow_whole_disk(dir.path(), "g100", GIB, "", "+100G", true);
}

#[test]
fn growth_across_a_descriptor_block_boundary() {
    tools();
    require_root();
    let dir = tmp();
    let d = dir.path();
    // 64bit, 4 KiB: 64 descriptors per block; 7.5 GiB = 60 groups, 9 GiB = 72.
    grow_whole_disk(d, "gdt", 7680 * MIB, "", "9G", false);
    let f = sb_fields(&d.join("gdt.grown.raw"));
    let orig = sb_fields(&d.join("gdt.orig.raw"));
    assert_eq!(
        field(&f, "Reserved GDT blocks") + 1,
        field(&orig, "Reserved GDT blocks"),
        "one reserved GDT block became a descriptor block"
    );
    // 1 KiB blocks, 64bit: 16 descriptors per block, 128 groups -> 166.
    grow_whole_disk(d, "k1gdt", GIB, "-b 1024", "+300M", true);
}

#[test]
fn variants_1k_blocks_no_flex_bg_no_metadata_csum() {
    tools();
    require_root();
    let dir = tmp();
    let d = dir.path();
    grow_whole_disk(d, "k1", GIB, "-b 1024", "+1G", true);
    grow_whole_disk(d, "noflex", GIB, "-O ^flex_bg,^metadata_csum", "+1G", true);
    grow_whole_disk(
        d,
        "gdtcsum",
        GIB,
        "-O ^metadata_csum,uninit_bg",
        "+3G",
        false,
    );
    grow_whole_disk(d, "nores", GIB, "-O ^resize_inode", "+1G", true);
}

fn assert_refused(d: &Path, img: &str, grow: &str, needles: &[&str]) {
    let before = sha256(&d.join(img));
    let r = vmdisk_in(d, &["resize", "--grow-fs", img, grow]);
    assert_eq!(r.code(), 1, "{img}: not refused:\n{r}");
    for n in needles
        .iter()
        .chain(&[img, "nothing was changed", "resize2fs"])
    {
        assert!(
            r.stderr.contains(n),
            "{img}: the refusal does not say {n:?}:\n{r}"
        );
    }
    assert_eq!(sha256(&d.join(img)), before, "{img}: changed by a refusal");
}

#[test]
fn refusals_change_nothing_and_say_why() {
    tools();
    require_root();
    let dir = tmp();
    let d = dir.path();
    // No reserved GDT blocks and growth that needs a new descriptor block.
    mkfs(&d.join("nores.raw"), 7680 * MIB, "-O ^resize_inode");
    assert_refused(d, "nores.raw", "9G", &["no reserved GDT blocks"]);
    // 1 KiB blocks: 256 reserved descriptor blocks do not reach 101 GiB.
    mkfs(&d.join("k1.raw"), GIB, "-b 1024");
    assert_refused(
        d,
        "k1.raw",
        "+100G",
        &["more group descriptor block", "256 are reserved"],
    );
    mkfs(&d.join("bigalloc.raw"), GIB, "-O bigalloc");
    assert_refused(d, "bigalloc.raw", "+1G", &["bigalloc"]);
    mkfs(&d.join("ss2.raw"), GIB, "-O sparse_super2");
    assert_refused(d, "ss2.raw", "+1G", &["sparse_super2"]);
    mkfs(&d.join("metabg.raw"), GIB, "-O meta_bg,^resize_inode");
    assert_refused(d, "metabg.raw", "+1G", &["meta_bg"]);
    mkfs(&d.join("dirty.raw"), GIB, "");
    sh(&format!(
        "debugfs -w -R 'ssv state 0' '{}' 2>/dev/null",
        d.join("dirty.raw").display()
    ));
    assert_refused(d, "dirty.raw", "+1G", &["not marked clean"]);
    mkfs(&d.join("recover.raw"), GIB, "");
    sh(&format!(
        "debugfs -w -R 'feature needs_recovery' '{}' 2>/dev/null",
        d.join("recover.raw").display()
    ));
    assert_refused(d, "recover.raw", "+1G", &["journal needs recovery"]);
    // A copy taken while the kernel had it mounted read-write (a running VM's disk).
    mkfs(&d.join("live.raw"), GIB, "");
    {
        let m = LoopMount::new(&d.join("live.raw"), &d.join("live-m"), "rw");
        sh(&format!(
            "echo x > '{}/f' && sync && cp --sparse=always '{}' '{}'",
            m.dir.display(),
            d.join("live.raw").display(),
            d.join("mounted.raw").display()
        ));
    }
    assert_refused(d, "mounted.raw", "+1G", &["journal needs recovery"]);
    let f = std::fs::File::create(d.join("zeros.raw")).unwrap();
    f.set_len(64 * MIB).unwrap();
    assert_refused(d, "zeros.raw", "+1G", &["no GPT and no ext4"]);
    // A GPT disk whose last partition is swap (ESP, ext4, swap 100%).
    let layout = tests::workspace_root()
        .join("../shared/corpus/disko/json/real-flameopathic-acervnix.evaluated.json");
    vmdisk_in(
        d,
        &[
            "create",
            "-f",
            "qcow2",
            "--layout",
            s(&layout),
            "swap.qcow2",
            "4G",
        ],
    )
    .ok();
    assert_refused(d, "swap.qcow2", "+1G", &["Swap", "not ext4"]);
}

/// A disko GPT disk (ESP + ext4 root filling the rest) grown by `grow`.
fn grow_gpt(d: &Path, name: &str, grow: &str) {
    let layout =
        tests::workspace_root().join("../shared/corpus/disko/json/simple-efi.evaluated.json");
    let img = format!("{name}.qcow2");
    vmdisk_in(
        d,
        &["create", "-f", "qcow2", "--layout", s(&layout), &img, "2G"],
    )
    .ok();
    let orig = d.join(format!("{name}.orig.raw"));
    to_raw(d, &img, s(&orig));
    let parts = |raw: &Path| -> Vec<(u64, u64, u64)> {
        sh(&format!("sgdisk -p '{}'", raw.display()))
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                Some((
                    w.first()?.parse().ok()?,
                    w.get(1)?.parse().ok()?,
                    w.get(2)?.parse().ok()?,
                ))
            })
            .collect()
    };
    let before_parts = parts(&orig);
    let (_, root_first, root_last) = *before_parts.last().unwrap();
    let root_off = root_first * 512;
    let old_root = LoopDev::new(&orig, root_off, (root_last - root_first + 1) * 512);
    // Files on the root, through a writable loop device of its own.
    {
        let dev = sh(&format!(
            "losetup --find --show --offset {root_off} --sizelimit {} '{}'",
            (root_last - root_first + 1) * 512,
            orig.display()
        ));
        let dev = PathBuf::from(dev.trim());
        populate(&dev, d);
        sh(&format!("losetup -d '{}'", dev.display()));
    }
    qemu_img_in(d, &["convert", "-O", "qcow2", s(&orig), &img]).ok();
    let before = file_hashes(&old_root.0, d);

    let r = vmdisk_in(d, &["resize", "--grow-fs", "--json", &img, grow]).ok();
    let j = r.json();
    qemu_check_clean(d, &img);
    let grown = d.join(format!("{name}.grown.raw"));
    to_raw(d, &img, s(&grown));
    let v = sh(&format!("sgdisk -v '{}'", grown.display()));
    assert!(v.contains("No problems found"), "{name}: sgdisk -v:\n{v}");
    let after_parts = parts(&grown);
    assert_eq!(after_parts.len(), before_parts.len());
    assert_eq!(
        after_parts[..after_parts.len() - 1],
        before_parts[..before_parts.len() - 1]
    );
    let (_, f2, l2) = *after_parts.last().unwrap();
    assert_eq!(f2, root_first);
    let disk = std::fs::metadata(&grown).unwrap().len();
    assert!(
        (l2 + 1) * 512 + 2 * MIB > disk,
        "{name}: the partition fills the disk"
    );
    assert_eq!(j["grow-fs"]["partition"]["new-last-lba"].as_u64(), Some(l2));
    // Everything before the last partition but the GPT itself is byte-identical.
    assert!(
        differing_blocks(&orig, &grown, 34 * 512, root_off - 34 * 512, 512).is_empty(),
        "{name}: the partitions before the last one changed"
    );
    let root = LoopDev::new(&grown, root_off, (l2 - f2 + 1) * 512);
    e2fsck_clean(&root.0, name);
    let f = sb_fields(&root.0);
    assert_eq!(
        j["grow-fs"]["filesystem"]["new_blocks"].as_u64(),
        Some(field(&f, "Block count"))
    );
    assert!(field(&f, "Block count") * field(&f, "Block size") > (l2 - f2) * 512 - 64 * MIB);
    assert_eq!(file_hashes(&root.0, d), before, "{name}: files changed");
    let df = kernel_df(&root.0, &d.join(format!("{name}-m")), "");
    let old_df = kernel_df(&old_root.0, &d.join(format!("{name}-o")), "");
    assert!(
        df > old_df + (disk - 2 * GIB) * 9 / 10,
        "{name}: df {df} (was {old_df})"
    );
}

#[test]
fn disko_gpt_disk_grows_by_1g_and_100g() {
    tools();
    require_root();
    let dir = tmp();
    grow_gpt(dir.path(), "gpt1", "+1G");
    grow_gpt(dir.path(), "gpt100", "+100G");
}

#[test]
fn a_qemu_holding_the_image_is_refused_untouched() {
    tools();
    let dir = tmp();
    let d = dir.path();
    let raw = d.join("held.raw");
    mkfs(&raw, GIB, "");
    qemu_img_in(d, &["convert", "-O", "qcow2", "held.raw", "held.qcow2"]).ok();
    let img = d.join("held.qcow2");
    let sock = d.join("nbd.sock");
    let mut holder = tests::Background::spawn(
        Command::new(require_tool("qemu-nbd"))
            .arg("--socket")
            .arg(&sock)
            .args(["-f", "qcow2"])
            .arg(&img),
        d,
        "qemu-nbd",
    );
    // qemu's "write" permission byte and its "I do not share write" byte.
    assert!(
        tests::wait_until(std::time::Duration::from_secs(20), || {
            tests::lock_byte_held(&img, 101) && tests::lock_byte_held(&img, 201)
        }),
        "TEST BUG: qemu-nbd did not take the write lock"
    );
    let before = sha256(&img);
    let r = vmdisk_in(d, &["resize", "--grow-fs", "held.qcow2", "+1G"]);
    assert_eq!(r.code(), 1, "{r}");
    assert!(
        r.all_output_lower().contains("lock"),
        "names the lock:\n{r}"
    );
    assert_eq!(sha256(&img), before, "changed while qemu held it");
    assert!(holder.alive(), "qemu-nbd died");
    holder.kill();
    vmdisk_in(d, &["resize", "--grow-fs", "held.qcow2", "+1G"]).ok();
    qemu_check_clean(d, "held.qcow2");
}

#[test]
fn a_full_disk_half_way_puts_the_image_back() {
    tools();
    require_root();
    let dir = tmp();
    let d = dir.path();
    mkfs(&d.join("f.raw"), GIB, "");
    qemu_img_in(d, &["convert", "-O", "qcow2", "f.raw", "f.qcow2"]).ok();
    let len = std::fs::metadata(d.join("f.qcow2")).unwrap().len();
    // A filesystem with room for the image and a few clusters more: the image-level resize
    // fits, the new groups' metadata (about 1.4 MiB for +20G) does not.
    let small = d.join("small");
    std::fs::create_dir(&small).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size={} tmpfs '{}'",
        len + 512 * 1024,
        small.display()
    ));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(small.clone());
    std::fs::copy(d.join("f.qcow2"), small.join("f.qcow2")).unwrap();
    let before = sha256(&small.join("f.qcow2"));
    let r = vmdisk_in(&small, &["resize", "--grow-fs", "f.qcow2", "+20G"]);
    assert_eq!(r.code(), 1, "expected running out of space:\n{r}");
    assert!(
        r.all_output_lower().contains("space"),
        "names the cause:\n{r}"
    );
    assert_eq!(sha256(&small.join("f.qcow2")), before, "not put back");
    qemu_check_clean(&small, "f.qcow2");
}
