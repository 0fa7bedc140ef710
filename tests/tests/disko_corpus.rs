//! Every configuration of the disko corpus (`../shared/corpus/disko`: disko's 38 examples,
//! its templates, public configs and variants, each in four JSON shapes), built with
//! `vmdisk create --layout` one disk at a time and judged against what disko itself made:
//! `sfdisk --json` of our image against the recorded `STEM.sfdisk.json` field by field
//! (start, size, type, name, attributes, and the partition GUID where the config fixes it),
//! the MBR bytes against the recorded ones, and every filesystem disko's `_create` made
//! checked with the tool that makes it (`fsck.vfat -n`, `e2fsck -fn`, `btrfs check`,
//! `xfs_repair -n`, `fsck.f2fs`) and compared with `blkid` / `dumpe2fs` to the recorded
//! `STEM.fs.json`. A disk vmdisk does not build must be refused with one line naming the
//! JSON path, leaving no file. Disks the builder VM makes (LUKS, LVM, md, btrfs subvolumes)
//! get a `--copy-in` at every filesystem it makes and must then open in a fresh rescue VM
//! without being told the layout (`tests::open_everything`: arrays assembled, LUKS opened
//! with the key, volume groups activated, each filesystem mounted and fsck'd).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use serde_json::Value;
use tests::*;
use vmdisk_layout::kernel::{self, SecretRef};

/// disko's examples (example/*.nix at the corpus' disko commit).
const EXAMPLES: &[&str] = &[
    "bcachefs",
    "boot-raid1",
    "btrfs-only-root-subvolume",
    "btrfs-subvolumes",
    "complex",
    "f2fs",
    "gpt-bios-compat",
    "gpt-name-with-whitespace",
    "gpt-unformatted",
    "hybrid",
    "hybrid-mbr",
    "hybrid-tmpfs-on-root",
    "legacy-table",
    "legacy-table-with-whitespace",
    "long-device-name",
    "luks-btrfs-raid",
    "luks-btrfs-subvolumes",
    "luks-interactive-login",
    "luks-lvm",
    "luks-on-mdadm",
    "lvm-raid",
    "lvm-sizes-sort",
    "lvm-thin",
    "mdadm",
    "mdadm-raid0",
    "mdadm-raid5-args",
    "multi-device-no-deps",
    "negative-size",
    "non-root-zfs",
    "simple-efi",
    "swap",
    "tmpfs",
    "with-lib",
    "xfs-with-quota",
    "zfs",
    "zfs-encrypted-root",
    "zfs-over-legacy",
    "zfs-with-vdevs",
];

/// Disks whose every partition disko's script made, that vmdisk does not build yet, with why.
const NOT_YET: &[(&str, &str)] = &[];

/// At least this many of disko's 38 examples must be built exactly as disko builds them, every
/// disk in every shape (the rest need ZFS or bcachefs, which the builder VM's kernel lacks).
const MIN_EXAMPLES_BUILT: usize = 30;

/// disko's templates that need no ZFS: each must be built exactly, every disk in every shape (the
/// other two, `tpl-zfs-impermanence` and `tpl-single-ext4-luks-and-double-zfs-mirror`, need ZFS).
const TEMPLATES_WITHOUT_ZFS: &[&str] = &["tpl-single-disk-ext4"];

fn corpus() -> PathBuf {
    workspace_root().join("../shared/corpus/disko")
}

fn read_json(p: &Path) -> Value {
    serde_json::from_slice(&fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// One disk of one configuration in one shape.
#[derive(Clone)]
struct Case {
    config: String,
    shape: String,
    file: PathBuf,
    disk: String,
    /// More than one disk: pass `--disk`.
    several: bool,
    /// The index entry (None for configs disko cannot evaluate).
    index: Option<Value>,
}

impl Case {
    /// disko's image size for this disk (4G where the corpus records none).
    fn size(&self) -> u64 {
        self.index
            .as_ref()
            .and_then(|i| i["size_bytes"].as_u64())
            .unwrap_or(4 << 30)
    }
}

/// `create -f raw --layout FILE [--disk DISK]`: what every build starts with.
fn create_args(c: &Case) -> Vec<String> {
    let mut args = vec![
        "create".to_string(),
        "-f".into(),
        "raw".into(),
        "--layout".into(),
        s(&c.file).into(),
    ];
    if c.several {
        args.extend(["--disk".to_string(), c.disk.clone()]);
    }
    args
}

fn cases() -> Vec<Case> {
    let index = read_json(&corpus().join("tables/index.json"));
    let mut out = Vec::new();
    let mut files: Vec<PathBuf> = fs::read_dir(corpus().join("json"))
        .expect("the disko corpus (../shared/corpus/disko) is missing")
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for f in files {
        let stem = f
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .trim_end_matches(".json");
        let (config, shape) = stem.split_once('.').unwrap();
        let disks: Vec<(String, Option<Value>)> = match index.get(config) {
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| (k.clone(), Some(v.clone())))
                .collect(),
            _ => {
                let v = read_json(&f);
                let d = v["disko"]["devices"]["disk"]
                    .as_object()
                    .or(v["disk"].as_object())
                    .cloned()
                    .unwrap_or_default();
                d.keys().map(|k| (k.clone(), None)).collect()
            }
        };
        let several = disks.len() > 1;
        for (disk, idx) in disks {
            out.push(Case {
                config: config.to_string(),
                shape: shape.to_string(),
                file: f.clone(),
                disk,
                several,
                index: idx,
            });
        }
    }
    out
}

/// Copy `len` bytes at `off` of `img` into a new sparse file, only the data extents.
fn extract(img: &Path, off: u64, len: u64, out: &Path) {
    let src = fs::File::open(img).unwrap();
    let dst = fs::File::create(out).unwrap();
    dst.set_len(len).unwrap();
    let fd = src.as_raw_fd();
    let mut pos = off;
    let end = off + len;
    let mut buf = vec![0u8; 1 << 20];
    while pos < end {
        // SAFETY: lseek on a file descriptor we own; no memory is passed.
        let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 || data as u64 >= end {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let stop = (hole as u64).min(end);
        let mut p = data as u64;
        while p < stop {
            let n = ((stop - p) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], p).unwrap();
            dst.write_all_at(&buf[..n], p - off).unwrap();
            p += n as u64;
        }
        pos = stop;
    }
}

fn tool(name: &str, args: &[&str]) -> Run {
    require_tool(name);
    run(Command::new(name).args(args).env("LC_ALL", "C"))
}

/// `blkid -p -o export` as a map.
fn blkid(p: &Path) -> BTreeMap<String, String> {
    let r = tool("blkid", &["-p", "-o", "export", s(p)]);
    r.stdout
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The partition GUIDs the evaluated shape of `config` fixes, by partition number.
fn fixed_uuids(config: &str, disk: &str) -> BTreeMap<u64, String> {
    let p = corpus().join(format!("json/{config}.evaluated.json"));
    let mut out = BTreeMap::new();
    if !p.exists() {
        return out;
    }
    let v = read_json(&p);
    if let Some(parts) = v["disk"][disk]["content"]["partitions"].as_object() {
        for part in parts.values() {
            if let (Some(i), Some(u)) = (part["_index"].as_u64(), part["uuid"].as_str()) {
                out.insert(i, u.to_uppercase());
            }
        }
    }
    out
}

/// Compare the built image with disko's table; a list of differences.
fn compare_table(c: &Case, img: &Path, idx: &Value, diffs: &mut Vec<String>) -> Vec<Value> {
    let want = read_json(&corpus().join("tables").join(idx["table"].as_str().unwrap()));
    let want = &want["partitiontable"];
    let r = tool("sfdisk", &["--json", s(img)]);
    assert_eq!(r.code(), 0, "sfdisk --json:\n{r}");
    let got: Value = serde_json::from_str(&r.stdout).unwrap();
    let got = &got["partitiontable"];
    for k in ["label", "firstlba", "lastlba", "sectorsize"] {
        if got[k] != want[k] {
            diffs.push(format!("{k}: {} != disko's {}", got[k], want[k]));
        }
    }
    let node = |p: &Value| {
        let n = p["node"].as_str().unwrap();
        n[n.rfind(|ch: char| !ch.is_ascii_digit()).unwrap() + 1..]
            .parse::<u64>()
            .unwrap()
    };
    let gp: BTreeMap<u64, Value> = got["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (node(p), p.clone()))
        .collect();
    let wp: BTreeMap<u64, Value> = want["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| (node(p), p.clone()))
        .collect();
    if gp.keys().collect::<Vec<_>>() != wp.keys().collect::<Vec<_>>() {
        diffs.push(format!(
            "partition numbers {:?} != disko's {:?}",
            gp.keys().collect::<Vec<_>>(),
            wp.keys().collect::<Vec<_>>()
        ));
    }
    let uuids = fixed_uuids(&c.config, &c.disk);
    for (n, w) in &wp {
        let g = gp.get(n).cloned().unwrap_or(Value::Null);
        for k in ["start", "size", "type", "name", "attrs", "bootable"] {
            if g[k] != w[k] {
                diffs.push(format!("partition {n} {k}: {} != disko's {}", g[k], w[k]));
            }
        }
        if let Some(u) = uuids.get(n) {
            if g["uuid"].as_str() != Some(u.as_str()) {
                diffs.push(format!(
                    "partition {n} uuid: {} != the config's {u}",
                    g["uuid"]
                ));
            }
        }
    }
    // The MBR (protective with sgdisk's CHS values, or hybrid) and the entry count.
    let mut mbr = [0u8; 66];
    fs::File::open(img)
        .unwrap()
        .read_exact_at(&mut mbr, 446)
        .unwrap();
    let hex: String = mbr.iter().map(|b| format!("{b:02x}")).collect();
    if Some(hex.as_str()) != idx["mbr"].as_str() {
        diffs.push(format!("MBR {hex} != disko's {}", idx["mbr"]));
    }
    let r = tool("sgdisk", &["-p", s(img)]);
    let entries = r
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("Partition table holds up to "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse::<u64>().ok());
    if entries != idx["entries"].as_u64() {
        diffs.push(format!(
            "GPT entries {entries:?} != disko's {}",
            idx["entries"]
        ));
    }
    gp.into_values().collect()
}

/// The blkid TYPE the builder VM's kernel makes in partition `n`, where disko's recorded run
/// could not (its `content_not_made`: "p2 luks").
fn kernel_made(idx: &Value, n: u64) -> Option<&'static str> {
    idx["content_not_made"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .filter_map(|e| e.split_once(' '))
        .find(|(p, _)| *p == format!("p{n}"))
        .and_then(|(_, what)| match what {
            "luks" => Some("crypto_LUKS"),
            "lvm_pv" => Some("LVM2_member"),
            "mdraid" => Some("linux_raid_member"),
            _ => None,
        })
}

/// Check every filesystem disko made with its own tool and against disko's record.
fn compare_filesystems(
    img: &Path,
    idx: &Value,
    parts: &[Value],
    tmp: &Path,
    diffs: &mut Vec<String>,
) {
    let Some(fs_name) = idx["fs"].as_str() else {
        return;
    };
    let rec = read_json(&corpus().join("tables").join(fs_name));
    // What disko left unformatted (BIOS boot, randomEncryption swap, bare partitions) holds
    // nothing here either.
    let made: Vec<u64> = rec["filesystems"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|f| f["number"].as_u64())
        .collect();
    for p in parts {
        let node = p["node"].as_str().unwrap();
        let n: u64 = node[node.rfind(|ch: char| !ch.is_ascii_digit()).unwrap() + 1..]
            .parse()
            .unwrap();
        if made.contains(&n) {
            continue;
        }
        let kernel = kernel_made(idx, n);
        let part = tmp.join(format!("empty{n}"));
        extract(
            img,
            p["start"].as_u64().unwrap() * 512,
            p["size"].as_u64().unwrap() * 512,
            &part,
        );
        let got = blkid(&part).get("TYPE").cloned();
        match (kernel, got) {
            (None, Some(t)) => diffs.push(format!(
                "partition {n}: disko left it empty, vmdisk made {t}"
            )),
            (Some(want), got) if got.as_deref() != Some(want) => diffs.push(format!(
                "partition {n}: disko's kernel makes {want} here, vmdisk's builder VM made {got:?}"
            )),
            (Some("crypto_LUKS"), _) => {
                let r = tool("cryptsetup", &["luksDump", s(&part)]);
                if r.code() != 0 || !r.stdout.contains("Keyslots:") {
                    diffs.push(format!("partition {n}: cryptsetup luksDump failed:\n{r}"));
                }
            }
            _ => {}
        }
        let _ = fs::remove_file(&part);
    }
    for f in rec["filesystems"].as_array().into_iter().flatten() {
        if f["rc"] != 0 {
            continue;
        }
        let n = f["number"].as_u64().unwrap();
        let Some(p) = parts
            .iter()
            .find(|p| p["node"].as_str().unwrap().ends_with(&n.to_string()))
        else {
            diffs.push(format!("no partition {n} for disko's {}", f["tool"]));
            continue;
        };
        let off = p["start"].as_u64().unwrap() * 512;
        let len = p["size"].as_u64().unwrap() * 512;
        let part = tmp.join(format!("part{n}"));
        extract(img, off, len, &part);
        let b = blkid(&part);
        let want = &f["blkid"];
        let what = format!("partition {n} ({})", f["tool"].as_str().unwrap());
        for k in ["TYPE", "LABEL", "VERSION"] {
            let w = want[k].as_str();
            let g = b.get(k).map(String::as_str);
            // mkswap and mke2fs versions are header versions: compare them too.
            if w != g {
                diffs.push(format!("{what}: blkid {k} {g:?} != disko's {w:?}"));
            }
        }
        let args: Vec<&str> = f["args"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let fixes_uuid = args.iter().any(|a| matches!(*a, "-i" | "-U"));
        if fixes_uuid && b.get("UUID").map(String::as_str) != want["UUID"].as_str() {
            diffs.push(format!(
                "{what}: UUID {:?} != disko's {}",
                b.get("UUID"),
                want["UUID"]
            ));
        }
        let check = match want["TYPE"].as_str() {
            Some("vfat") => Some(tool("fsck.vfat", &["-n", s(&part)])),
            Some("ext2" | "ext3" | "ext4") => {
                let r = tool("dumpe2fs", &["-h", s(&part)]);
                let fields: BTreeMap<&str, &str> = r
                    .stdout
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim(), v.trim()))
                    .collect();
                for (k, w) in f["ext"].as_object().into_iter().flatten() {
                    if k == "Filesystem UUID" {
                        continue;
                    }
                    if fields.get(k.as_str()).copied() != w.as_str() {
                        diffs.push(format!(
                            "{what}: dumpe2fs {k} {:?} != disko's {w}",
                            fields.get(k.as_str())
                        ));
                    }
                }
                Some(tool("e2fsck", &["-fn", s(&part)]))
            }
            Some("btrfs") => Some(tool("btrfs", &["check", "--readonly", s(&part)])),
            Some("xfs") => Some(tool("xfs_repair", &["-n", "-f", s(&part)])),
            Some("f2fs") => Some(tool("fsck.f2fs", &[s(&part)])),
            Some("swap") => None,
            other => {
                diffs.push(format!("{what}: no check for {other:?}"));
                None
            }
        };
        if let Some(r) = check {
            if r.code() != 0 {
                diffs.push(format!("{what}: the checker failed:\n{r}"));
            }
        }
        let _ = fs::remove_file(&part);
    }
}

/// Disks the builder VM makes together (sharing a VG, an array or a multi-device btrfs),
/// built once: every shape of the config parses to the same plans and the same builder
/// script (checked in [`vm_groups`]), so one build stands for all four.
struct VmGroup {
    config: String,
    /// The shape built (the evaluated one where there is one).
    file: PathBuf,
    /// Disk keys, the first is the one passed to `--disk`.
    members: Vec<String>,
    secrets: Vec<SecretRef>,
    /// Where the builder VM makes filesystems: each gets a `--copy-in`, and the built disks
    /// must open in a rescue VM with every one of them mounted and holding its file.
    mountpoints: Vec<String>,
}

/// What the builder script and the host plan of a group are, minus what names the JSON
/// location (comments, `path`) or is seeded from the file (GUIDs): equal across shapes.
fn signature(
    disks: &[&vmdisk_layout::DiskSpec],
    devices: &vmdisk_layout::Devices,
    secrets: &[(SecretRef, Vec<u8>)],
) -> Result<String, String> {
    let script = kernel::builder_script(&kernel::ScriptInput {
        disks,
        devices,
        secrets,
        copy_in: &[],
    })
    .map_err(|e| e.to_string())?;
    let mut sig: String = script
        .text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect::<Vec<_>>()
        .join("\n");
    for d in disks {
        let plan = vmdisk_layout::plan(
            d,
            Some(4 << 30),
            &vmdisk_layout::PlanOptions {
                seed: Some("corpus".into()),
                ..Default::default()
            },
            &vmdisk_layout::Sources::default(),
        )
        .map_err(|e| e.to_string())?;
        let mut v = serde_json::to_value(&plan).unwrap();
        strip(&mut v);
        sig.push_str(&v.to_string());
    }
    Ok(sig)
}

fn strip(v: &mut Value) {
    match v {
        Value::Object(m) => {
            m.retain(|k, _| {
                !matches!(
                    k.as_str(),
                    "path" | "disk_path" | "guid" | "disk_guid" | "uuid"
                )
            });
            m.values_mut().for_each(strip);
        }
        Value::Array(a) => a.iter_mut().for_each(strip),
        _ => {}
    }
}

/// The builder-VM groups of the corpus, and for each (config, disk) the group it is in.
/// Shapes whose plans or scripts differ from the built shape's are failures.
fn vm_groups(
    all: &[Case],
    failures: &mut Vec<String>,
) -> (Vec<VmGroup>, BTreeMap<(String, String), usize>) {
    let mut groups: Vec<VmGroup> = Vec::new();
    let mut of: BTreeMap<(String, String), usize> = BTreeMap::new();
    let mut sigs: BTreeMap<usize, Vec<(String, String)>> = BTreeMap::new();
    let mut files: Vec<&PathBuf> = all.iter().map(|c| &c.file).collect();
    files.dedup();
    // The evaluated shape first, so it is the one built.
    files.sort_by_key(|f| !s(f).ends_with(".evaluated.json"));
    for f in files {
        let c = all.iter().find(|c| &c.file == f).unwrap();
        let Ok(layout) = vmdisk_layout::parse_layout(&fs::read_to_string(f).unwrap()) else {
            continue;
        };
        let valid: Vec<vmdisk_layout::DiskSpec> = layout.valid().into_iter().cloned().collect();
        let refs: Vec<&vmdisk_layout::DiskSpec> = valid.iter().collect();
        for at in 0..refs.len() {
            if !kernel::needs_builder(refs[at]) {
                continue;
            }
            let Ok(group) = kernel::build_group(&refs, &layout.devices, at) else {
                continue;
            };
            let members: Vec<&vmdisk_layout::DiskSpec> = group.iter().map(|i| refs[*i]).collect();
            let keys: Vec<String> = members.iter().map(|d| d.key.clone()).collect();
            let needed = kernel::secrets_needed(&members, &layout.devices);
            let secrets: Vec<(SecretRef, Vec<u8>)> = needed
                .iter()
                .map(|(r, _)| (r.clone(), b"vmdisk-corpus-key".to_vec()))
                .collect();
            let sig = signature(&members, &layout.devices, &secrets).unwrap_or_else(|e| e);
            let id = match of.get(&(c.config.clone(), keys[0].clone())) {
                Some(id) => *id,
                None => {
                    groups.push(VmGroup {
                        config: c.config.clone(),
                        file: f.clone(),
                        members: keys.clone(),
                        secrets: needed.into_iter().map(|(r, _)| r).collect(),
                        mountpoints: kernel::mountpoints(&members, &layout.devices),
                    });
                    for k in &keys {
                        of.insert((c.config.clone(), k.clone()), groups.len() - 1);
                    }
                    groups.len() - 1
                }
            };
            sigs.entry(id).or_default().push((c.shape.clone(), sig));
        }
    }
    for (id, v) in &sigs {
        let (first_shape, first) = &v[0];
        for (shape, sig) in &v[1..] {
            if sig != first {
                let at = sig
                    .bytes()
                    .zip(first.bytes())
                    .position(|(a, b)| a != b)
                    .unwrap_or(sig.len().min(first.len()));
                let around = |t: &str| {
                    String::from_utf8_lossy(
                        &t.as_bytes()[at.saturating_sub(60)..(at + 60).min(t.len())],
                    )
                    .into_owned()
                };
                failures.push(format!(
                    "{} ({shape}) disks {:?}: plan or builder script differs from the {first_shape} \
                     shape's, which is the one built: ...{}... vs ...{}...",
                    groups[*id].config,
                    groups[*id].members,
                    around(sig),
                    around(first)
                ));
            }
        }
    }
    (groups, of)
}

/// Build a group in the builder VM and judge every member as [`build`] judges a disk.
fn build_vm_group(g: &VmGroup, all: &[Case], tmp: &Path) -> Vec<(String, Outcome)> {
    let out = |k: &str| tmp.join(format!("{k}.raw"));
    let case = |k: &str| {
        all.iter()
            .find(|c| c.config == g.config && c.disk == k)
            .unwrap()
            .clone()
    };
    // The group's first disk, in the shape the group is built from.
    let first = Case {
        file: g.file.clone(),
        ..case(&g.members[0])
    };
    let mut args = create_args(&first);
    args.insert(1, "-q".into());
    for m in &g.members[1..] {
        args.extend(["--with-disk".to_string(), format!("{m}={}", s(&out(m)))]);
    }
    let key_of = |i: usize| format!("vmdisk-corpus-key-{i}\n").into_bytes();
    for (i, r) in g.secrets.iter().enumerate() {
        let key = tmp.join(format!("secret{i}"));
        fs::write(&key, key_of(i)).unwrap();
        let name = match r {
            SecretRef::File(p) | SecretRef::PasswordFile(p) | SecretRef::Password(p) => p,
        };
        args.extend(["--secret".to_string(), format!("{name}={}", s(&key))]);
    }
    for (i, mp) in g.mountpoints.iter().enumerate() {
        let dir = tmp.join(format!("copy-in-{i}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(format!("{MARKER_PREFIX}{i}")), mp).unwrap();
        args.extend(["--copy-in".to_string(), format!("{mp}={}", s(&dir))]);
    }
    args.extend([s(&out(&g.members[0])).to_string(), first.size().to_string()]);
    let r = vmdisk(&args);
    // Opened as the machine would open them: every LUKS device with its key, every array
    // and volume group, every filesystem mounted with its copied-in file.
    let opened = r.success().then(|| {
        let paths: Vec<PathBuf> = g.members.iter().map(|m| out(m)).collect();
        let refs: Vec<&Path> = paths.iter().map(|p| p.as_path()).collect();
        let keys: Vec<Vec<u8>> = (0..g.secrets.len()).map(key_of).collect();
        let (o, _) = open_everything(&refs, &keys);
        let mut diffs = o.problems.clone();
        let mut want = g.mountpoints.clone();
        want.sort();
        let mut got = o.markers.clone();
        got.sort();
        if got != want {
            diffs.push(format!(
                "opened in a rescue VM, the copied-in files found are for {got:?}, not for \
                 every filesystem the builder made ({want:?}); filesystems checked: {:?}",
                o.checked
            ));
        }
        if !g.secrets.is_empty() && o.opened_luks == 0 {
            diffs.push("no LUKS device opened with the keys given".into());
        }
        diffs
    });
    let mut results = Vec::new();
    for m in &g.members {
        let c = case(m);
        let o = if !r.success() {
            Outcome::Differs(vec![format!("the builder VM build failed:\n{r}")])
        } else if let Some(idx) = c.index.as_ref().filter(|i| i["table"].is_string()) {
            // The group opens or fails as a whole: its findings go with the first disk.
            let mut diffs = if m == &g.members[0] {
                opened.clone().unwrap_or_default()
            } else {
                Vec::new()
            };
            let parts = compare_table(&c, &out(m), idx, &mut diffs);
            compare_filesystems(&out(m), idx, &parts, tmp, &mut diffs);
            if diffs.is_empty() {
                Outcome::Exact
            } else {
                Outcome::Differs(diffs)
            }
        } else {
            Outcome::Differs(vec!["built, but disko made no table for it".into()])
        };
        let _ = fs::remove_file(out(m));
        results.push((m.clone(), o));
    }
    results
}

#[derive(Clone)]
enum Outcome {
    Exact,
    Differs(Vec<String>),
    Refused { reason: String, vm: bool },
    Unclean(String),
}

fn build(c: &Case, tmp: &Path) -> Outcome {
    let out = tmp.join("disk.raw");
    let _ = fs::remove_file(&out);
    let mut args = create_args(c);
    args.extend([s(&out).to_string(), c.size().to_string()]);
    let r = vmdisk(&args);
    if !r.success() {
        let msg = r.stderr.trim().to_string();
        let one_line = !msg.contains('\n') && !msg.is_empty();
        let names_path = msg.contains("disk.") || msg.contains("disko.devices");
        if !one_line || !names_path || out.exists() {
            return Outcome::Unclean(format!(
                "one line: {one_line}, JSON path: {names_path}, file left: {}:\n{r}",
                out.exists()
            ));
        }
        let vm = msg.contains("needs the builder VM");
        let reason = msg.rsplit(": ").next().unwrap_or(&msg).to_string();
        return Outcome::Refused { reason, vm };
    }
    let Some(idx) = c.index.as_ref().filter(|i| i["table"].is_string()) else {
        return Outcome::Differs(vec!["built, but disko made no table for it".into()]);
    };
    let mut diffs = Vec::new();
    let parts = compare_table(c, &out, idx, &mut diffs);
    compare_filesystems(&out, idx, &parts, tmp, &mut diffs);
    let _ = fs::remove_file(&out);
    if diffs.is_empty() {
        Outcome::Exact
    } else {
        Outcome::Differs(diffs)
    }
}

#[test]
fn every_corpus_disk_is_built_as_disko_builds_it_or_refused_cleanly() {
    let all = cases();
    assert!(
        all.len() > 300,
        "expected the whole corpus, found {} cases",
        all.len()
    );
    let mut failures = Vec::new();
    let (groups, in_group) = vm_groups(&all, &mut failures);
    // The builder VM's pinned packages, as a user fetches them once.
    let r = vmdisk(&["rescue", "--fetch"]);
    assert!(r.success(), "vmdisk rescue --fetch:\n{r}");
    let results: Mutex<Vec<(Case, Outcome)>> = Mutex::new(Vec::new());
    let queue = Mutex::new(
        all.iter()
            .filter(|c| !in_group.contains_key(&(c.config.clone(), c.disk.clone())))
            .cloned()
            .collect::<Vec<_>>(),
    );
    let group_queue = Mutex::new((0..groups.len()).collect::<Vec<_>>());
    let group_results: Mutex<BTreeMap<(String, String), Outcome>> = Mutex::new(BTreeMap::new());
    std::thread::scope(|sc| {
        for _ in 0..2 {
            sc.spawn(|| {
                let tmp = tempfile::tempdir().unwrap();
                // The builder-VM groups first: they take longest.
                loop {
                    let Some(g) = group_queue.lock().unwrap().pop() else {
                        break;
                    };
                    let g = &groups[g];
                    for (disk, o) in build_vm_group(g, &all, tmp.path()) {
                        group_results
                            .lock()
                            .unwrap()
                            .insert((g.config.clone(), disk), o);
                    }
                }
                loop {
                    let Some(c) = queue.lock().unwrap().pop() else {
                        break;
                    };
                    let o = build(&c, tmp.path());
                    results.lock().unwrap().push((c, o));
                }
            });
        }
    });
    let group_results = group_results.into_inner().unwrap();
    let mut results = results.into_inner().unwrap();
    // Every shape of a group's disk gets the outcome of the group's one build.
    for c in &all {
        if let Some(o) = group_results.get(&(c.config.clone(), c.disk.clone())) {
            results.push((c.clone(), o.clone()));
        }
    }
    eprintln!(
        "  builder-VM groups built once for all their shapes: {}",
        groups.len()
    );
    results.sort_by(|a, b| {
        (&a.0.config, &a.0.disk, &a.0.shape).cmp(&(&b.0.config, &b.0.disk, &b.0.shape))
    });

    let mut built: BTreeMap<String, usize> = BTreeMap::new();
    let mut refused: BTreeMap<String, usize> = BTreeMap::new();
    // Per example: every disk in every shape built exactly as disko builds it.
    let mut all_built: BTreeMap<&str, bool> = EXAMPLES
        .iter()
        .chain(TEMPLATES_WITHOUT_ZFS)
        .map(|e| (*e, true))
        .collect();
    let mut shapes_seen: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (c, o) in &results {
        let what = format!("{} ({}) disk {}", c.config, c.shape, c.disk);
        let ok = match o {
            Outcome::Exact => {
                *built.entry(c.shape.clone()).or_default() += 1;
                true
            }
            Outcome::Refused { reason, vm } => {
                *refused.entry(reason.clone()).or_default() += 1;
                let complete = c.index.as_ref().is_some_and(|i| i["complete"] == true);
                let excused = NOT_YET.iter().any(|(n, _)| *n == c.config);
                if *vm {
                    failures.push(format!(
                        "{what}: refused as needing the builder VM, which create now runs: {reason}"
                    ));
                } else if complete && !excused {
                    failures.push(format!(
                        "{what}: disko made every partition of it, vmdisk refused: {reason}"
                    ));
                }
                false
            }
            Outcome::Differs(d) => {
                failures.push(format!(
                    "{what}: differs from disko:\n    {}",
                    d.join("\n    ")
                ));
                false
            }
            Outcome::Unclean(m) => {
                failures.push(format!("{what}: unclean refusal: {m}"));
                false
            }
        };
        if let Some(h) = all_built.get_mut(c.config.as_str()) {
            *h &= ok;
            shapes_seen
                .entry(c.config.as_str())
                .or_default()
                .insert(c.shape.as_str());
        }
    }
    // An example with no case in some shape was not built in that shape.
    for (e, h) in all_built.iter_mut() {
        *h &= shapes_seen.get(e).map_or(0, |s| s.len()) == 4;
    }
    let n_built = EXAMPLES.iter().filter(|e| all_built[*e]).count();
    let not_built: Vec<&str> = all_built
        .iter()
        .filter(|(e, h)| !**h && EXAMPLES.contains(e))
        .map(|(e, _)| *e)
        .collect();
    eprintln!("disko corpus: {} cases", results.len());
    eprintln!("  built exactly as disko does, by shape: {built:?}");
    eprintln!("  refused, by reason: {refused:#?}");
    eprintln!(
        "  disko's examples built exactly, every disk and shape: {n_built} of {}; not built: \
         {not_built:?}",
        EXAMPLES.len(),
    );
    assert!(
        failures.is_empty(),
        "{} corpus failures:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        n_built >= MIN_EXAMPLES_BUILT,
        "only {n_built} of disko's examples are built (not: {not_built:?})"
    );
    for t in TEMPLATES_WITHOUT_ZFS {
        assert!(
            all_built[t],
            "disko's template {t} needs no ZFS but is not built exactly"
        );
    }
}
