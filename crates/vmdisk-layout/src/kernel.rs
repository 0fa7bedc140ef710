//! Content only a Linux kernel makes — LUKS, LVM, mdadm arrays, btrfs subvolumes and swap
//! files, and every filesystem inside those — turned into the shell script the builder VM
//! runs ([`builder_script`]). The [`Stack`] types live in `model` and are parsed by `spec`,
//! so this module only reads them.
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
use crate::model::{
    Content, Devices, DiskSpec, FsFormat, KeySource, Luks, MdArray, Stack, VolumeGroup,
};
use crate::size::Position;

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
/// The mountpoints of the filesystems (and btrfs subvolumes) the builder VM makes for this
/// group: where a `--copy-in` that is not a host-made partition can go.
pub fn mountpoints(disks: &[&DiskSpec], devices: &Devices) -> Vec<String> {
    let mut out = Vec::new();
    for root in group_roots(disks, devices) {
        let mut add = |fs: &crate::model::FsSpec| {
            out.extend(fs.mountpoint.clone());
            out.extend(fs.subvolumes.iter().filter_map(|v| v.mountpoint.clone()));
        };
        visit(root, &mut |s| match s {
            Stack::Made {
                content: Content::Filesystem(fs),
            } => add(fs),
            // A GPT on an array: its partitions' filesystems are made in the VM too.
            Stack::Gpt { partitions } => {
                for p in partitions {
                    if let Content::Filesystem(fs) = &p.content {
                        add(fs);
                    }
                }
            }
            _ => {}
        });
    }
    out
}

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

/// A secret the builder needs, as the layout names it. The caller supplies its bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum SecretRef {
    /// A key file (`settings.keyFile`, `additionalKeyFiles`): its bytes, as they are.
    File(String),
    /// A `passwordFile`: its text without trailing newlines (disko's `$(cat FILE)`).
    PasswordFile(String),
    /// The password of LUKS device NAME, which disko asks for (`askPassword`).
    Password(String),
}

fn secret_of(l: &Luks) -> SecretRef {
    match &l.key {
        KeySource::KeyFile(f) => SecretRef::File(f.clone()),
        KeySource::PasswordFile(f) => SecretRef::PasswordFile(f.clone()),
        KeySource::Ask => SecretRef::Password(l.name.clone()),
    }
}

/// The secrets the builder script for `disks` reads, with the JSON path that names each.
pub fn secrets_needed(disks: &[&DiskSpec], devices: &Devices) -> Vec<(SecretRef, JsonPath)> {
    let mut out = Vec::new();
    for root in group_roots(disks, devices) {
        visit(root, &mut |s| {
            if let Stack::Luks(l) = s {
                let r = secret_of(l);
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

/// awk over `cryptsetup luksDump` of a fresh LUKS device: slot 0's PBKDF as cryptsetup
/// options (`--pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 65536
/// --pbkdf-parallel 1`, or pbkdf2 with its iterations), nothing for a header it cannot read
/// (LUKS1), so cryptsetup falls back to benchmarking.
const PBKDF_OF_SLOT0: &str = "awk '/^Keyslots:/{k=1;next} /^[^ \\t]/{if(k)exit} \
     k&&$1==\"PBKDF:\"{p=$2} k&&$1==\"Time\"{t=$3} k&&$1==\"Memory:\"{m=$2} \
     k&&$1==\"Threads:\"{th=$2} k&&$1==\"Iterations:\"{it=$2} \
     END{if(p~/^argon2/&&t&&m&&th)print \"--pbkdf \"p\" --pbkdf-force-iterations \"t\" --pbkdf-memory \"m\" --pbkdf-parallel \"th; \
     else if(p==\"pbkdf2\"&&it)print \"--pbkdf pbkdf2 --pbkdf-force-iterations \"it}'";

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
                let key = self.secret(&secret_of(l), &l.path)?;
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
                // Each luksAddKey would benchmark the PBKDF again (about 7 s of its 15 s under
                // an emulated CPU) only to pick what luksFormat's benchmark picked on the
                // same VM: the added keys get slot 0's parameters. Not when the layout
                // chose its own PBKDF options, which disko applies to luksFormat alone.
                let own_pbkdf = l
                    .extra_format_args
                    .iter()
                    .any(|a| a.starts_with("--pbkdf") || a.starts_with("--iter-time"));
                let mut add_args = String::new();
                if !l.additional_key_files.is_empty() && !own_pbkdf {
                    self.line(&format!(
                        "pbkdf=$(cryptsetup luksDump {} | {PBKDF_OF_SLOT0})",
                        q(dev)
                    ));
                    add_args.push_str(" $pbkdf");
                }
                for a in &l.additional_key_files {
                    let f = self.secret(&SecretRef::File(a.clone()), &l.path)?;
                    self.line(&format!(
                        "cryptsetup luksAddKey {} {} {kargs}{add_args}",
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
                    FsFormat::F2fs | FsFormat::Xfs => {
                        return Err(Error::unsupported(
                            &JsonPath::root(),
                            format!(
                                "{} inside a LUKS, LVM or md device (the builder VM has no \
                                 mkfs.{0}: xfsprogs needs libicu's 9 MB, f2fs-tools is not \
                                 carried)",
                                fs.format.name()
                            ),
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
                } else if lv.size.ends_with('%') {
                    // disko: a bare percentage is of the free space (`100%` -> `100%FREE`).
                    format!("-l {}", q(&format!("{}FREE", lv.size)))
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

    /// `PBKDF_OF_SLOT0` over what the real `cryptsetup luksDump` prints: LUKS2 argon2id and
    /// pbkdf2 give slot 0's parameters back as options, LUKS1 gives nothing.
    #[test]
    fn slot0_pbkdf_is_read_from_the_real_luks_dump() {
        let dir = std::env::temp_dir().join(format!("vmdisk-pbkdf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = dir.join("key");
        std::fs::write(&key, "secret").unwrap();
        for (format, want) in [
            (
                "--type luks2 --pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 32768 \
                 --pbkdf-parallel 1",
                "--pbkdf argon2id --pbkdf-force-iterations 4 --pbkdf-memory 32768 \
                 --pbkdf-parallel 1",
            ),
            (
                "--type luks2 --pbkdf pbkdf2 --pbkdf-force-iterations 1000",
                "--pbkdf pbkdf2 --pbkdf-force-iterations 1000",
            ),
            ("--type luks1 --pbkdf-force-iterations 1000", ""),
        ] {
            let dev = dir.join("dev");
            let f = std::fs::File::create(&dev).unwrap();
            f.set_len(32 << 20).unwrap();
            drop(f);
            let sh = format!(
                "cryptsetup luksFormat --batch-mode {format} {} {} && \
                 cryptsetup luksDump {} | {PBKDF_OF_SLOT0}",
                q(dev.to_str().unwrap()),
                q(key.to_str().unwrap()),
                q(dev.to_str().unwrap()),
            );
            let out = std::process::Command::new("sh")
                .args(["-c", &sh])
                .output()
                .expect("sh");
            assert!(
                out.status.success(),
                "cryptsetup (Debian: cryptsetup-bin) failed for {format}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert_eq!(
                String::from_utf8_lossy(&out.stdout).trim(),
                want,
                "{format}"
            );
        }
        std::fs::remove_dir_all(&dir).unwrap();
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
