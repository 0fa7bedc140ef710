//! Content only a Linux kernel makes — LUKS, LVM, mdadm arrays, btrfs subvolumes and swap
//! files, and every filesystem inside those — parsed from disko's JSON into [`Stack`]s and
//! turned into the shell script the builder VM runs ([`builder_script`]).
//!
//! The host still writes each disk's partition table and every filesystem that sits directly
//! in a partition; the builder VM gets the disks (as /dev/nbd0, /dev/nbd1, ... in the order
//! of [`Script::disks`]) with those partitions visible and runs, for each kernel-made
//! partition, what disko's `_create` runs: `cryptsetup luksFormat`/`open`/`luksAddKey`,
//! `pvcreate`, `vgcreate`/`lvcreate`, `mdadm --create`, sgdisk on an array, `mkfs.*`,
//! `btrfs subvolume create` and `btrfs filesystem mkswapfile`, with disko's arguments. Pure:
//! key files are read by the caller and passed in; the script embeds them (base64) into the
//! VM's tmpfs, never into an image.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use crate::error::{Error, JsonPath, Result};
use crate::json::Json;
use crate::model::{Content, DiskSpec, FsFormat, PartitionSpec};
use crate::size::Position;

/// A kernel-made content tree (what sits in a partition, LV or array).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Stack {
    /// Nothing (an LV or array left empty).
    Empty,
    /// A filesystem or swap, made by its own tool inside the VM.
    Made {
        content: Content,
    },
    Luks(Box<Luks>),
    /// `lvm_pv`: a physical volume of volume group `vg`.
    LvmPv {
        vg: String,
    },
    /// `mdraid`: a member of array `name`.
    MdRaid {
        name: String,
    },
    /// A GPT on an array (mdadm content), written with disko's sgdisk calls.
    Gpt {
        partitions: Vec<PartitionSpec>,
    },
}

/// Where a LUKS key comes from.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeySource {
    /// `settings.keyFile` (or the deprecated `keyFile`): the file's bytes.
    KeyFile(String),
    /// `passwordFile`: the file's text without trailing newlines (disko's `$(cat FILE)`).
    PasswordFile(String),
    /// `askPassword`: disko prompts; vmdisk takes it from `--secret NAME=FILE`.
    Ask,
}

/// `type = "luks"`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Luks {
    /// The dm name (`/dev/mapper/NAME`).
    pub name: String,
    pub key: KeySource,
    pub additional_key_files: Vec<String>,
    pub extra_format_args: Vec<String>,
    pub extra_open_args: Vec<String>,
    pub allow_discards: bool,
    pub keyfile_size: Option<i64>,
    pub keyfile_offset: Option<i64>,
    pub content: Stack,
    pub path: JsonPath,
}

/// `lvm_vg.NAME`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct VolumeGroup {
    pub name: String,
    /// In disko's creation order: thin pools, then fixed sizes, then `%` sizes; by name within.
    pub lvs: Vec<LogicalVolume>,
    pub path: JsonPath,
}

/// `lvm_vg.NAME.lvs.LV`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LogicalVolume {
    pub name: String,
    /// lvcreate's size: `-L SIZE`, or `-l SIZE` when it has a `%` (`100%FREE`).
    pub size: String,
    /// `lvm_type` (`--type=...`): thin-pool, raid0, mirror, ...
    pub lvm_type: Option<String>,
    /// `pool`: a thin volume of this thin pool (`-V SIZE --thinpool=POOL`).
    pub pool: Option<String>,
    pub extra_args: Vec<String>,
    pub content: Stack,
    pub path: JsonPath,
}

/// `mdadm.NAME`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct MdArray {
    pub name: String,
    pub level: i64,
    pub metadata: String,
    pub extra_args: Vec<String>,
    pub content: Stack,
    pub path: JsonPath,
}

/// Why a content type cannot be made at all, even in the builder VM.
pub(crate) fn refused_type(t: &str) -> Option<&'static str> {
    match t {
        "zfs" | "zpool" => Some(
            "ZFS (the builder VM's Debian kernel has no zfs module: Debian ships it only as \
             zfs-dkms source, which the VM cannot compile)",
        ),
        "bcachefs" | "bcachefs_filesystem" => Some(
            "bcachefs (the builder VM's Debian 12 kernel, 6.1, predates it: it entered Linux \
             in 6.7)",
        ),
        _ => None,
    }
}

/// Parse a kernel-made content (`luks`, `lvm_pv`, `mdraid`, or what sits inside those).
/// `gpt` is accepted only where disko accepts it below a disk-like device (an array).
pub(crate) fn parse_stack(
    c: Option<&Json>,
    path: &JsonPath,
    label_prefix: &str,
    gpt_allowed: bool,
) -> Result<Stack> {
    let c = match c {
        None | Some(Json::Null) => return Ok(Stack::Empty),
        Some(c) => c,
    };
    c.members(path)?;
    let tpath = path.key("type");
    let t = c
        .get_str("type", path)?
        .ok_or_else(|| Error::invalid(&tpath, "missing content type"))?;
    match t {
        "luks" => parse_luks(c, path).map(|l| Stack::Luks(Box::new(l))),
        "lvm_pv" => {
            let vg = c
                .get_str("vg", path)?
                .ok_or_else(|| Error::invalid(&path.key("vg"), "an lvm_pv needs \"vg\""))?;
            Ok(Stack::LvmPv { vg: vg.to_string() })
        }
        "mdraid" => {
            let name = c
                .get_str("name", path)?
                .ok_or_else(|| Error::invalid(&path.key("name"), "an mdraid needs \"name\""))?;
            Ok(Stack::MdRaid {
                name: name.to_string(),
            })
        }
        "gpt" if gpt_allowed => {
            let ppath = path.key("partitions");
            let parts = match c.get("partitions") {
                None | Some(Json::Null) => &[][..],
                Some(p) => p.members(&ppath)?,
            };
            let mut partitions = parts
                .iter()
                .map(|(k, v)| crate::spec::parse_partition_in(label_prefix, k, v, &ppath.key(k)))
                .collect::<Result<Vec<_>>>()?;
            crate::spec::order_partitions(&mut partitions)?;
            Ok(Stack::Gpt { partitions })
        }
        "filesystem" | "btrfs" | "swap" => Ok(Stack::Made {
            content: crate::spec::parse_content_in_vm(Some(c), path)?,
        }),
        other => match refused_type(other) {
            Some(why) => Err(Error::unsupported(&tpath, why)),
            None => Err(Error::invalid(
                &tpath,
                format!("unknown content type {other:?}"),
            )),
        },
    }
}

fn parse_luks(c: &Json, path: &JsonPath) -> Result<Luks> {
    let name = c
        .get_str("name", path)?
        .ok_or_else(|| Error::invalid(&path.key("name"), "a luks device needs \"name\""))?
        .to_string();
    if name.is_empty() || name.contains('/') || name.chars().any(char::is_whitespace) {
        return Err(Error::invalid(
            &path.key("name"),
            format!("{name:?} is not a device-mapper name"),
        ));
    }
    let spath = path.key("settings");
    let settings = match c.get("settings") {
        None | Some(Json::Null) => None,
        Some(s) => {
            s.members(&spath)?;
            Some(s)
        }
    };
    let setting_str = |k: &str| -> Result<Option<String>> {
        Ok(match settings {
            Some(s) => s.get_str(k, &spath)?.map(str::to_string),
            None => None,
        })
    };
    let setting_int = |k: &str| -> Result<Option<i64>> {
        match settings {
            Some(s) => s.get_int(k, &spath),
            None => Ok(None),
        }
    };
    let key = if let Some(k) = setting_str("keyFile")? {
        KeySource::KeyFile(k)
    } else if let Some(k) = c.get_str("keyFile", path)? {
        KeySource::KeyFile(k.to_string())
    } else if let Some(p) = c.get_str("passwordFile", path)? {
        KeySource::PasswordFile(p.to_string())
    } else {
        // `askPassword`, and disko's default when nothing else gives the key: a prompt.
        KeySource::Ask
    };
    let allow_discards = match settings.and_then(|s| s.get("allowDiscards")) {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(other) => {
            return Err(Error::invalid(
                &spath.key("allowDiscards"),
                format!("expected a boolean, found {}", other.kind()),
            ))
        }
    };
    let content = parse_stack(c.get("content"), &path.key("content"), "", false)?;
    Ok(Luks {
        name,
        key,
        additional_key_files: c.get_str_list("additionalKeyFiles", path)?,
        extra_format_args: c.get_str_list("extraFormatArgs", path)?,
        extra_open_args: c.get_str_list("extraOpenArgs", path)?,
        allow_discards,
        keyfile_size: setting_int("keyFileSize")?,
        keyfile_offset: setting_int("keyFileOffset")?,
        content,
        path: path.clone(),
    })
}

/// `lvm_vg.NAME`.
pub(crate) fn parse_vg(key: &str, v: &Json, path: &JsonPath) -> Result<VolumeGroup> {
    v.members(path)?;
    let name = v.get_str("name", path)?.unwrap_or(key).to_string();
    let lpath = path.key("lvs");
    let items = match v.get("lvs") {
        None | Some(Json::Null) => &[][..],
        Some(l) => l.members(&lpath)?,
    };
    let mut lvs = Vec::with_capacity(items.len());
    for (k, lv) in items {
        let p = lpath.key(k);
        lv.members(&p)?;
        let size = lv
            .get_str("size", &p)?
            .ok_or_else(|| Error::invalid(&p.key("size"), "an LV needs a size"))?;
        if size.is_empty() || size.chars().any(|c| c.is_whitespace() || c == '\'') {
            return Err(Error::invalid(
                &p.key("size"),
                format!("{size:?} is not an lvcreate size"),
            ));
        }
        lvs.push(LogicalVolume {
            name: lv.get_str("name", &p)?.unwrap_or(k).to_string(),
            size: size.to_string(),
            lvm_type: lv.get_str("lvm_type", &p)?.map(str::to_string),
            pool: lv.get_str("pool", &p)?.map(str::to_string),
            extra_args: lv.get_str_list("extraArgs", &p)?,
            content: parse_stack(lv.get("content"), &p.key("content"), "", false)?,
            path: p,
        });
    }
    // disko (lvm_vg.nix): thin pools first, then the LVs whose size has no `%`, then the rest.
    let rank = |lv: &LogicalVolume| {
        if lv.lvm_type.as_deref() == Some("thin-pool") {
            0
        } else if !lv.size.contains('%') {
            1
        } else {
            2
        }
    };
    lvs.sort_by(|a, b| rank(a).cmp(&rank(b)).then_with(|| a.name.cmp(&b.name)));
    Ok(VolumeGroup {
        name,
        lvs,
        path: path.clone(),
    })
}

/// `mdadm.NAME`.
pub(crate) fn parse_md(key: &str, v: &Json, path: &JsonPath) -> Result<MdArray> {
    v.members(path)?;
    let name = v.get_str("name", path)?.unwrap_or(key).to_string();
    let level = v.get_int("level", path)?.unwrap_or(1);
    if ![0, 1, 4, 5, 6, 10].contains(&level) {
        return Err(Error::invalid(
            &path.key("level"),
            format!("RAID level {level} (mdadm takes 0, 1, 4, 5, 6, 10)"),
        ));
    }
    let metadata = v
        .get_str("metadata", path)?
        .unwrap_or("default")
        .to_string();
    if !matches!(
        metadata.as_str(),
        "default" | "0.90" | "1.0" | "1.1" | "1.2" | "ddf" | "imsm"
    ) {
        return Err(Error::invalid(
            &path.key("metadata"),
            format!("{metadata:?} is not an mdadm metadata version"),
        ));
    }
    Ok(MdArray {
        content: parse_stack(
            v.get("content"),
            &path.key("content"),
            &format!("mdadm-{name}"),
            true,
        )?,
        name,
        level,
        metadata,
        extra_args: v.get_str_list("extraArgs", path)?,
        path: path.clone(),
    })
}

/// What a disk, LV or array feeds: the VGs and arrays its stacks are members of, and the
/// dm names it opens and names in other commands (a btrfs over several LUKS devices).
#[derive(Debug, Default)]
struct Feeds {
    vgs: Vec<String>,
    mds: Vec<String>,
    opens: Vec<String>,
    refs: Vec<String>,
}

fn feeds_of(s: &Stack, f: &mut Feeds) {
    visit(s, &mut |s| match s {
        Stack::Made {
            content: Content::Filesystem(fs),
        } => {
            for w in fs.extra_args.iter().flat_map(|a| a.split_whitespace()) {
                if let Some(n) = w.strip_prefix("/dev/mapper/") {
                    f.refs.push(n.to_string());
                }
            }
        }
        Stack::Luks(l) => f.opens.push(l.name.clone()),
        Stack::LvmPv { vg } => f.vgs.push(vg.clone()),
        Stack::MdRaid { name } => f.mds.push(name.clone()),
        _ => {}
    });
}

fn disk_feeds(d: &DiskSpec) -> Feeds {
    let mut f = Feeds::default();
    for p in &d.partitions {
        if let Content::Kernel(k) = &p.content {
            feeds_of(k, &mut f);
        }
    }
    f
}

/// The kernel-side devices of a layout: volume groups and arrays, each parsed or refused.
#[derive(Debug, Default)]
pub struct Devices {
    pub vgs: Vec<(String, Result<VolumeGroup>)>,
    pub mds: Vec<(String, Result<MdArray>)>,
}

/// One node of the device graph.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Node {
    Disk(usize),
    Vg(String),
    Md(String),
}

/// The disks (by index into `disks`) that must be built together with `disks[at]`: those
/// sharing a volume group, an array, or a multi-device filesystem with it, transitively.
/// Errors name a VG or array the layout uses but does not define, or refuses.
pub fn build_group(disks: &[&DiskSpec], devices: &Devices, at: usize) -> Result<Vec<usize>> {
    // Feeds of every node.
    let mut feeds: BTreeMap<Node, Feeds> = BTreeMap::new();
    for (i, d) in disks.iter().enumerate() {
        feeds.insert(Node::Disk(i), disk_feeds(d));
    }
    for (name, vg) in &devices.vgs {
        if let Ok(vg) = vg {
            let mut f = Feeds::default();
            for lv in &vg.lvs {
                feeds_of(&lv.content, &mut f);
            }
            feeds.insert(Node::Vg(name.clone()), f);
        }
    }
    for (name, md) in &devices.mds {
        if let Ok(md) = md {
            let mut f = Feeds::default();
            feeds_of(&md.content, &mut f);
            feeds.insert(Node::Md(name.clone()), f);
        }
    }
    // Edges: a node to each VG/array it feeds, and to whichever node opens a dm name it uses.
    let mut opener: BTreeMap<String, Node> = BTreeMap::new();
    for (n, f) in &feeds {
        for o in &f.opens {
            opener.insert(o.clone(), n.clone());
        }
    }
    let mut edges: Vec<(Node, Node)> = Vec::new();
    for (n, f) in &feeds {
        for vg in &f.vgs {
            edges.push((n.clone(), Node::Vg(vg.clone())));
        }
        for md in &f.mds {
            edges.push((n.clone(), Node::Md(md.clone())));
        }
        for r in &f.refs {
            if let Some(o) = opener.get(r) {
                edges.push((n.clone(), o.clone()));
            }
        }
    }
    // The component of disk `at`.
    let mut seen = vec![Node::Disk(at)];
    let mut i = 0;
    while i < seen.len() {
        let n = seen[i].clone();
        for (a, b) in &edges {
            for (x, y) in [(a, b), (b, a)] {
                if *x == n && !seen.contains(y) {
                    seen.push(y.clone());
                }
            }
        }
        i += 1;
    }
    // Every VG and array in it must be defined and valid.
    for n in &seen {
        let (kind, name, found) = match n {
            Node::Vg(v) => (
                "lvm_vg",
                v,
                devices
                    .vgs
                    .iter()
                    .find(|(k, _)| k == v)
                    .map(|(_, r)| r.as_ref().err()),
            ),
            Node::Md(m) => (
                "mdadm",
                m,
                devices
                    .mds
                    .iter()
                    .find(|(k, _)| k == m)
                    .map(|(_, r)| r.as_ref().err()),
            ),
            Node::Disk(_) => continue,
        };
        match found {
            None => {
                return Err(Error::invalid(
                    &disks[at].path,
                    format!("uses {kind} {name:?}, which the layout does not define"),
                ))
            }
            Some(Some(e)) => return Err(clone_error(e)),
            Some(None) => {}
        }
    }
    let mut out: Vec<usize> = seen
        .iter()
        .filter_map(|n| match n {
            Node::Disk(i) => Some(*i),
            _ => None,
        })
        .collect();
    out.sort_unstable();
    Ok(out)
}

/// Errors are not Clone (they carry io errors); the layout ones this module re-raises are.
fn clone_error(e: &Error) -> Error {
    match e {
        Error::Invalid { path, rule } => Error::Invalid {
            path: path.clone(),
            rule: rule.clone(),
        },
        Error::Unsupported { path, what } => Error::Unsupported {
            path: path.clone(),
            what: what.clone(),
        },
        other => Error::invalid(&JsonPath::root(), other.to_string()),
    }
}

/// Whether a disk needs the builder VM.
pub fn needs_builder(d: &DiskSpec) -> bool {
    d.partitions
        .iter()
        .any(|p| matches!(p.content, Content::Kernel(_)))
}

/// Every stack node below `s`, `s` first (through LUKS contents and array partitions).
fn visit<'a>(s: &'a Stack, f: &mut dyn FnMut(&'a Stack)) {
    f(s);
    match s {
        Stack::Luks(l) => visit(&l.content, f),
        Stack::Gpt { partitions } => {
            for p in partitions {
                if let Content::Kernel(k) = &p.content {
                    visit(k, f);
                }
            }
        }
        _ => {}
    }
}

/// The kernel-made stacks of `disks` and of the VGs and arrays they feed.
fn group_roots<'a>(disks: &[&'a DiskSpec], devices: &'a Devices) -> Vec<&'a Stack> {
    let mut roots: Vec<&Stack> = disks
        .iter()
        .flat_map(|d| &d.partitions)
        .filter_map(|p| match &p.content {
            Content::Kernel(k) => Some(&**k),
            _ => None,
        })
        .collect();
    let (vgs, mds) = group_devices(disks, devices);
    roots.extend(
        vgs.iter()
            .flat_map(|vg| vg.lvs.iter().map(|lv| &lv.content)),
    );
    roots.extend(mds.iter().map(|md| &md.content));
    roots
}

/// The VGs and arrays `disks` feed (directly or through each other), in layout order.
fn group_devices<'a>(
    disks: &[&DiskSpec],
    devices: &'a Devices,
) -> (Vec<&'a VolumeGroup>, Vec<&'a MdArray>) {
    let mut vg_names = Vec::new();
    let mut md_names = Vec::new();
    let mut pending: Vec<Feeds> = disks.iter().map(|d| disk_feeds(d)).collect();
    while let Some(f) = pending.pop() {
        for v in f.vgs {
            if !vg_names.contains(&v) {
                if let Some((_, Ok(vg))) = devices.vgs.iter().find(|(k, _)| *k == v) {
                    let mut g = Feeds::default();
                    for lv in &vg.lvs {
                        feeds_of(&lv.content, &mut g);
                    }
                    pending.push(g);
                }
                vg_names.push(v);
            }
        }
        for m in f.mds {
            if !md_names.contains(&m) {
                if let Some((_, Ok(md))) = devices.mds.iter().find(|(k, _)| *k == m) {
                    let mut g = Feeds::default();
                    feeds_of(&md.content, &mut g);
                    pending.push(g);
                }
                md_names.push(m);
            }
        }
    }
    let vgs = devices
        .vgs
        .iter()
        .filter(|(k, _)| vg_names.contains(k))
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    let mds = devices
        .mds
        .iter()
        .filter(|(k, _)| md_names.contains(k))
        .filter_map(|(_, r)| r.as_ref().ok())
        .collect();
    (vgs, mds)
}

/// A secret the script needs: a path the layout names (`/tmp/secret.key`) or, for
/// `askPassword`, the LUKS name; the caller resolves it to bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretRef {
    File(String),
    Password(String),
}

/// The secrets the builder script for `disks` reads, with the JSON path that names each.
pub fn secrets_needed(disks: &[&DiskSpec], devices: &Devices) -> Vec<(SecretRef, JsonPath)> {
    let mut out = Vec::new();
    for root in group_roots(disks, devices) {
        visit(root, &mut |s| {
            if let Stack::Luks(l) = s {
                let r = match &l.key {
                    KeySource::KeyFile(f) | KeySource::PasswordFile(f) => {
                        SecretRef::File(f.clone())
                    }
                    KeySource::Ask => SecretRef::Password(l.name.clone()),
                };
                out.push((r, l.path.clone()));
                for a in &l.additional_key_files {
                    out.push((SecretRef::File(a.clone()), l.path.key("additionalKeyFiles")));
                }
            }
        });
    }
    let mut seen = Vec::new();
    out.retain(|(r, _)| {
        if seen.contains(r) {
            false
        } else {
            seen.push(r.clone());
            true
        }
    });
    out
}

/// The builder VM's script and what it expects attached.
#[derive(Debug, Clone)]
pub struct Script {
    /// busybox sh; assumes `vmdisk-builder-init` has run and disk i is /dev/nbd{i} with its
    /// partitions scanned; copy-in archive j is /dev/nbd{disks + j}.
    pub text: String,
    /// Keys of the disks, in NBD order.
    pub disks: Vec<String>,
    /// The `--copy-in` mountpoints, in NBD order after the disks (each a tar archive).
    pub copy_in: Vec<String>,
}

/// Everything the script is built from.
pub struct ScriptInput<'a> {
    /// The disks, in NBD order, with their host-side partition numbers.
    pub disks: &'a [&'a DiskSpec],
    pub devices: &'a Devices,
    /// Bytes of every [`secrets_needed`] entry.
    pub secrets: &'a [(SecretRef, Vec<u8>)],
    /// Mountpoints that get a tar archive extracted into them (in this order after the disks).
    pub copy_in: &'a [String],
}

fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// disko splits `extraArgs` entries on whitespace (they go unquoted into its script).
fn words(args: &[String]) -> String {
    args.iter()
        .flat_map(|a| a.split_whitespace())
        .map(q)
        .collect::<Vec<_>>()
        .join(" ")
}

fn sgdisk_pos(p: &Position) -> String {
    match p {
        Position::Default => "0".into(),
        Position::Absolute(s) => s.to_string(),
        Position::Plus(n) => format!("+{n}"),
        Position::Minus(n) => format!("-{n}"),
    }
}

struct Emitter<'a> {
    input: &'a ScriptInput<'a>,
    out: String,
    /// Undo commands, run in reverse at the end (close, deactivate, stop).
    teardown: Vec<String>,
    members: BTreeMap<String, Vec<String>>,
    mounts: usize,
    secret_files: BTreeMap<SecretRef, String>,
}

impl Emitter<'_> {
    fn line(&mut self, s: &str) {
        self.out.push_str(s);
        self.out.push('\n');
    }

    fn secret(&self, r: &SecretRef, path: &JsonPath) -> Result<String> {
        self.secret_files.get(r).cloned().ok_or_else(|| {
            Error::invalid(path, format!("no bytes were given for the secret {r:?}"))
        })
    }

    fn emit(&mut self, s: &Stack, dev: &str) -> Result<()> {
        match s {
            Stack::Empty => {}
            Stack::Made { content } => self.made(content, dev)?,
            Stack::Luks(l) => {
                let key = match &l.key {
                    KeySource::KeyFile(f) | KeySource::PasswordFile(f) => {
                        self.secret(&SecretRef::File(f.clone()), &l.path)?
                    }
                    KeySource::Ask => self.secret(&SecretRef::Password(l.name.clone()), &l.path)?,
                };
                let mut kargs = format!("--key-file {}", q(&key));
                if let Some(n) = l.keyfile_size {
                    let _ = write!(kargs, " --keyfile-size {n}");
                }
                if let Some(n) = l.keyfile_offset {
                    let _ = write!(kargs, " --keyfile-offset {n}");
                }
                self.line(&format!(
                    "cryptsetup -q luksFormat {} {} {kargs}",
                    q(dev),
                    words(&l.extra_format_args)
                ));
                self.line(&format!(
                    "cryptsetup open {} {} {} {} {kargs} --persistent",
                    q(dev),
                    q(&l.name),
                    if l.allow_discards {
                        "--allow-discards"
                    } else {
                        ""
                    },
                    words(&l.extra_open_args)
                ));
                self.teardown
                    .push(format!("cryptsetup close {}", q(&l.name)));
                for a in &l.additional_key_files {
                    let f = self.secret(&SecretRef::File(a.clone()), &l.path)?;
                    self.line(&format!(
                        "cryptsetup luksAddKey {} {} {kargs}",
                        q(dev),
                        q(&f)
                    ));
                }
                self.emit(&l.content, &format!("/dev/mapper/{}", l.name))?;
            }
            Stack::LvmPv { vg } => {
                self.line(&format!("pvcreate {}", q(dev)));
                self.members
                    .entry(format!("vg:{vg}"))
                    .or_default()
                    .push(dev.to_string());
            }
            Stack::MdRaid { name } => {
                self.members
                    .entry(format!("md:{name}"))
                    .or_default()
                    .push(dev.to_string());
            }
            Stack::Gpt { partitions } => {
                self.line(&format!("sgdisk --clear {}", q(dev)));
                for p in partitions {
                    let uuid = p.guid.map_or("R".to_string(), |g| g.to_string());
                    let mut attrs = String::new();
                    let _ = write!(attrs, "{:x}", p.attributes);
                    self.line(&format!(
                        "sgdisk --align-end --new={n}:{}:{} --partition-guid={n}:{uuid} \
                         --change-name={} --typecode={n}:{} --attributes={n}:=:{attrs} {}",
                        sgdisk_pos(&p.start),
                        sgdisk_pos(&p.end),
                        q(&format!("{}:{}", p.number, p.label)),
                        p.type_guid,
                        q(dev),
                        n = p.number,
                    ));
                }
                self.line(&format!("vmdisk_rescan {}", q(dev)));
                for p in partitions {
                    // A fixed name for the array's partition (the kernel numbers the array).
                    let part = format!("{dev}-part{}", p.number);
                    self.line(&format!(
                        "ln -sf \"$(vmdisk_part {} {})\" {}",
                        q(dev),
                        p.number,
                        q(&part)
                    ));
                    match &p.content {
                        Content::Kernel(k) => self.emit(k, &part)?,
                        Content::None => {}
                        c => self.made(c, &part)?,
                    }
                }
            }
        }
        Ok(())
    }

    fn made(&mut self, c: &Content, dev: &str) -> Result<()> {
        let d = q(dev);
        match c {
            Content::None | Content::Kernel(_) => {}
            Content::Swap(sw) => {
                if !sw.random_encryption {
                    let mut args = String::new();
                    if let Some(l) = &sw.label {
                        let _ = write!(args, " -L {}", q(l));
                    }
                    if let Some(u) = &sw.uuid {
                        let _ = write!(args, " -U {u}");
                    }
                    self.line(&format!("mkswap{args} {d}"));
                }
            }
            Content::Filesystem(fs) => {
                let extra = words(&fs.extra_args);
                match fs.format {
                    FsFormat::Btrfs => self.line(&format!("mkfs.btrfs {d} {extra}")),
                    FsFormat::F2fs => {
                        return Err(Error::unsupported(
                            &JsonPath::root(),
                            "f2fs inside a LUKS, LVM or md device (the builder VM has no \
                             mkfs.f2fs)",
                        ))
                    }
                    f => self.line(&format!("mkfs.{} {extra} {d}", f.name())),
                }
                let has_subvols = !fs.subvolumes.is_empty() || !fs.swapfiles.is_empty();
                let copies: Vec<(usize, &String)> = self
                    .input
                    .copy_in
                    .iter()
                    .enumerate()
                    .filter(|(_, m)| {
                        fs.mountpoint.as_deref() == Some(m.as_str())
                            || fs
                                .subvolumes
                                .iter()
                                .any(|s| s.mountpoint.as_deref() == Some(m.as_str()))
                    })
                    .collect();
                if !has_subvols && copies.is_empty() {
                    return Ok(());
                }
                self.mounts += 1;
                let mnt = format!("/mnt/vmdisk-{}", self.mounts);
                self.line(&format!("mkdir -p {mnt}"));
                if fs.format == FsFormat::Btrfs {
                    self.line(&format!("mount -t btrfs -o subvol=/ {d} {mnt}"));
                } else {
                    self.line(&format!("mount -t {} {d} {mnt}", fs.format.name()));
                }
                for sw in &fs.swapfiles {
                    self.line(&format!(
                        "btrfs filesystem mkswapfile --size {} {}",
                        q(&sw.size),
                        q(&format!("{mnt}/{}", sw.path))
                    ));
                }
                for s in &fs.subvolumes {
                    let abs = format!("{mnt}/{}", s.name);
                    self.line(&format!("mkdir -p \"$(dirname {})\"", q(&abs)));
                    self.line(&format!("btrfs subvolume create {} >/dev/null", q(&abs)));
                    for sw in &s.swapfiles {
                        self.line(&format!(
                            "btrfs filesystem mkswapfile --size {} {}",
                            q(&sw.size),
                            q(&format!("{abs}/{}", sw.path))
                        ));
                    }
                }
                let disks = self.input.disks.len();
                for (j, m) in copies {
                    let sub = fs
                        .subvolumes
                        .iter()
                        .find(|s| s.mountpoint.as_deref() == Some(m.as_str()))
                        .map(|s| format!("/{}", s.name))
                        .unwrap_or_default();
                    self.line(&format!(
                        "tar -x -f /dev/nbd{} -C {}",
                        disks + j,
                        q(&format!("{mnt}{sub}"))
                    ));
                }
                self.line(&format!("umount {mnt}"));
            }
        }
        Ok(())
    }
}

/// The builder VM's script for `input.disks` (see [`Script`]).
pub fn builder_script(input: &ScriptInput) -> Result<Script> {
    let mut e = Emitter {
        input,
        out: String::new(),
        teardown: Vec::new(),
        members: BTreeMap::new(),
        mounts: 0,
        secret_files: BTreeMap::new(),
    };
    e.line("set -eu");
    e.line("vmdisk_part() { echo \"$(readlink -f \"$1\")p$2\"; }");
    e.line(
        "vmdisk_rescan() { blockdev --rereadpt \"$1\" 2>/dev/null || partx -u \"$1\" 2>/dev/null || true; }",
    );
    // Secrets live in the VM's tmpfs only.
    e.line("mkdir -p /run/vmdisk-secrets && chmod 700 /run/vmdisk-secrets");
    for (i, (r, bytes)) in input.secrets.iter().enumerate() {
        let f = format!("/run/vmdisk-secrets/{i}");
        let b64 = base64_encode(bytes);
        e.line(&format!(
            "base64 -d > {f} <<'VMDISK_EOF'\n{b64}\nVMDISK_EOF"
        ));
        e.secret_files.insert(r.clone(), f);
    }
    // disko's device paths (a btrfs over several devices names them).
    e.line("mkdir -p /dev/disk/by-partlabel");
    for (i, d) in input.disks.iter().enumerate() {
        for p in &d.partitions {
            e.line(&format!(
                "ln -sf /dev/nbd{i}p{} {}",
                p.number,
                q(&format!("/dev/disk/by-partlabel/{}", p.label))
            ));
        }
    }
    for (i, d) in input.disks.iter().enumerate() {
        for p in &d.partitions {
            if let Content::Kernel(k) = &p.content {
                e.line(&format!("# {}", p.path));
                e.emit(k, &format!("/dev/nbd{i}p{}", p.number))?;
            }
        }
    }
    // Volume groups and arrays, each once all its members exist.
    let (vgs, mds) = group_devices(input.disks, input.devices);
    let mut expected: BTreeMap<String, usize> = BTreeMap::new();
    let mut all = Feeds::default();
    for root in group_roots(input.disks, input.devices) {
        feeds_of(root, &mut all);
    }
    for v in all.vgs {
        *expected.entry(format!("vg:{v}")).or_default() += 1;
    }
    for m in all.mds {
        *expected.entry(format!("md:{m}")).or_default() += 1;
    }
    let mut done: Vec<String> = Vec::new();
    loop {
        let ready = |k: &str, e: &Emitter| {
            e.members.get(k).map_or(0, Vec::len) == expected.get(k).copied().unwrap_or(0)
        };
        let next_md = mds.iter().find(|m| {
            !done.contains(&format!("md:{}", m.name)) && ready(&format!("md:{}", m.name), &e)
        });
        if let Some(md) = next_md {
            let k = format!("md:{}", md.name);
            done.push(k.clone());
            let members = e.members.get(&k).cloned().unwrap_or_default();
            e.line(&format!("# {}", md.path));
            e.line(&format!(
                "echo y | mdadm --create {} --level={} --raid-devices={} --metadata={} --force \
                 --homehost=any {} {} >/dev/null",
                q(&format!("/dev/md/{}", md.name)),
                md.level,
                members.len(),
                md.metadata,
                words(&md.extra_args),
                members.iter().map(|m| q(m)).collect::<Vec<_>>().join(" ")
            ));
            e.teardown.push(format!(
                "mdadm --stop {}",
                q(&format!("/dev/md/{}", md.name))
            ));
            e.line(&format!(
                "sgdisk --zap-all {} >/dev/null",
                q(&format!("/dev/md/{}", md.name))
            ));
            e.emit(&md.content, &format!("/dev/md/{}", md.name))?;
            continue;
        }
        let next_vg = vgs.iter().find(|v| {
            !done.contains(&format!("vg:{}", v.name)) && ready(&format!("vg:{}", v.name), &e)
        });
        if let Some(vg) = next_vg {
            let k = format!("vg:{}", vg.name);
            done.push(k.clone());
            let members = e.members.get(&k).cloned().unwrap_or_default();
            e.line(&format!("# {}", vg.path));
            e.line(&format!(
                "vgcreate {} {}",
                q(&vg.name),
                members.iter().map(|m| q(m)).collect::<Vec<_>>().join(" ")
            ));
            e.teardown.push(format!("vgchange -an {}", q(&vg.name)));
            for lv in &vg.lvs {
                let size = if let Some(pool) = &lv.pool {
                    format!("-V {} --thinpool={}", q(&lv.size), q(pool))
                } else if lv.size.contains('%') {
                    format!("-l {}", q(&lv.size))
                } else {
                    format!("-L {}", q(&lv.size))
                };
                let ty = match (&lv.lvm_type, &lv.pool) {
                    (Some(t), None) => format!(" --type={}", q(t)),
                    _ => String::new(),
                };
                e.line(&format!(
                    "lvcreate --yes {size} -n {}{ty} {} {}",
                    q(&lv.name),
                    words(&lv.extra_args),
                    q(&vg.name)
                ));
            }
            for lv in &vg.lvs {
                e.emit(&lv.content, &format!("/dev/{}/{}", vg.name, lv.name))?;
            }
            continue;
        }
        break;
    }
    for (k, n) in &expected {
        if !done.contains(k) {
            let have = e.members.get(k).map_or(0, Vec::len);
            return Err(Error::invalid(
                &JsonPath::root(),
                format!("{k} gets {have} of its {n} members: its members depend on it"),
            ));
        }
    }
    e.line("# teardown");
    while let Some(t) = e.teardown.pop() {
        e.line(&t);
    }
    e.line("sync");
    Ok(Script {
        text: e.out,
        disks: input.disks.iter().map(|d| d.key.clone()).collect(),
        copy_in: input.copy_in.to_vec(),
    })
}

fn base64_encode(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut s = String::with_capacity(b.len().div_ceil(3) * 4 + b.len() / 57);
    for (i, c) in b.chunks(3).enumerate() {
        if i > 0 && i % 19 == 0 {
            s.push('\n');
        }
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        s.push(T[(n >> 18) as usize & 63] as char);
        s.push(T[(n >> 12) as usize & 63] as char);
        s.push(if c.len() > 1 {
            T[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        s.push(if c.len() > 2 {
            T[n as usize & 63] as char
        } else {
            '='
        });
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(i.as_bytes()), o);
        }
    }

    #[test]
    fn quoting_survives_quotes() {
        assert_eq!(q("a'b"), r"'a'\''b'");
        assert_eq!(
            words(&["-d raid1".into(), "/dev/x".into()]),
            "'-d' 'raid1' '/dev/x'"
        );
    }
}
