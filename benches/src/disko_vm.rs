//! `benches layout`, the layouts only a kernel makes: two of disko's own examples, btrfs with
//! subvolumes (`btrfs-subvolumes`) and LVM on LUKS (`luks-lvm`), read from the disko corpus
//! (`../shared/corpus/disko/json`, used from there). Each is built both ways, side by side in
//! one run and in the same builder VM (vmdisk's rescue kernel and Debian's tools, the disk over
//! NBD), sides alternating:
//!
//! - vmdisk: `vmdisk create -f raw --layout NAME.evaluated.json` (its builder VM runs the
//!   cryptsetup / lvm / btrfs steps);
//! - disko: what disko's image builder does — boot a VM with an empty disk attached and run the
//!   configuration's own generated `_create` (from `NAME.evaluated-internals.json`) with bash,
//!   the disk's `device` replaced by the VM's disk. The VM has no udev, so `udevadm` is a stub
//!   that makes the `/dev/disk/by-partlabel` links udev would make, `partprobe` is
//!   `blockdev --rereadpt`, `modprobe` succeeds for a module the builder already loaded, and
//!   /dev/fd (for bash's process substitution) links to /proc/self/fd.
//!   That is `vmdisk rescue EMPTY -- SCRIPT`; the time is the whole command, boot included,
//!   as vmdisk's is.
//!
//! Both outputs are compared: the partition tables (names, types, starts, sizes) and the
//! content the kernel made — for btrfs, `btrfs check --readonly` and the subvolume names; for
//! LUKS, `cryptsetup luksDump`'s version and key slots.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::Serialize;
use serde_json::Value;

use crate::table::{sfdisk_parts, table_differences, Part};
use crate::util::{remove_if_exists, sync};

/// One example: its corpus name and the key files its configuration names (for vmdisk's
/// `--secret`, and written where the configuration expects them in disko's VM).
struct Example {
    name: &'static str,
    what: &'static str,
    keys: &'static [&'static str],
}

const EXAMPLES: &[Example] = &[
    Example {
        name: "btrfs-subvolumes",
        what: "ESP + btrfs root with 6 subvolumes and 4 swapfiles",
        keys: &[],
    },
    Example {
        name: "luks-lvm",
        what: "ESP + LUKS2 (2 keys) holding an LVM VG with 3 LVs (ext4, ext4, raw)",
        keys: &["/tmp/secret.key", "/tmp/additionalSecret.key"],
    },
];

/// The key a bench key file holds.
fn key_bytes(path: &str) -> String {
    format!("vmdisk-bench-key {path}")
}

#[derive(Clone, Serialize)]
pub struct DiskoSide {
    pub best_s: Option<f64>,
    pub median_s: Option<f64>,
    pub runs_s: Vec<f64>,
    pub error: Option<String>,
    /// What the content check found (see the module docs).
    pub content: Vec<String>,
}

#[derive(Clone, Serialize)]
pub struct DiskoCase {
    pub example: String,
    pub what: String,
    pub image_size: u64,
    pub vmdisk: DiskoSide,
    pub disko: DiskoSide,
    /// disko's best / vmdisk's best.
    pub speed_ratio: Option<f64>,
    /// Partition table: vmdisk's vs disko's.
    pub table_differences: Vec<String>,
    /// The content checks disagree, or one side's content is wrong.
    pub content_differences: Vec<String>,
}

impl DiskoCase {
    pub fn failed(&self) -> bool {
        self.vmdisk.error.is_some()
            || !self.table_differences.is_empty()
            || !self.content_differences.is_empty()
    }
}

/// Parse disko's size strings the way its image builder hands them to `truncate` (`2G`).
fn image_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => (&s[..i], &s[i..]),
        None => (s, ""),
    };
    let m: u64 = match mult {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        "G" => 1 << 30,
        "T" => 1 << 40,
        _ => bail!("imageSize {s:?}: unknown unit"),
    };
    Ok(num
        .parse::<u64>()
        .with_context(|| format!("imageSize {s:?}"))?
        * m)
}

/// The only disk of `evaluated`: (its `device`, its `imageSize` in bytes).
fn the_disk(evaluated: &Value) -> Result<(String, u64)> {
    let disks = evaluated["disk"]
        .as_object()
        .context("no `disk` in the evaluated configuration")?;
    let [(_, d)] = &disks.iter().collect::<Vec<_>>()[..] else {
        bail!(
            "the bench takes one-disk examples, this has {}",
            disks.len()
        );
    };
    let device = d["device"].as_str().context("disk without `device`")?;
    let size = image_size(d["imageSize"].as_str().unwrap_or("2G"))?;
    Ok((device.to_string(), size))
}

/// The command `vmdisk rescue` runs: stubs for what udev would do, the keys, then disko's
/// `_create` with `device` replaced by /dev/nbd0, then everything closed and flushed.
fn disko_vm_script(create: &str, device: &str, keys: &[&str]) -> Result<String> {
    const EOF: &str = "VMDISK_BENCH_DISKO_CREATE_EOF";
    if create.contains(EOF) {
        bail!("disko's _create contains the here-document delimiter");
    }
    let create = replace_device(create, device, "/dev/nbd0")?;
    let mut s = String::from(
        r##"set -e
export DM_DISABLE_UDEV=1
vmdisk-builder-init >/dev/null
sys=$(dirname "$(dirname "$(command -v vmdisk-builder-init)")")
# bash's process substitution (`readarray < <(...)`) reads /dev/fd, which udev or systemd
# would have made.
[ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
b=/tmp/disko-bin
mkdir -p $b
printf '#!%s/bin/sh\nexec %s/sbin/blkid "$@"\n' "$sys" "$sys" > $b/blkid
printf '#!%s/bin/sh\nblockdev --rereadpt "$1"\n' "$sys" > $b/partprobe
printf '#!%s/bin/sh\n[ -d /sys/module/$(echo "$1" | tr - _) ]\n' "$sys" > $b/modprobe
{ echo "#!$sys/bin/sh"; cat <<'STUB'
# What udev would do for `udevadm trigger` / `settle`: the by-partlabel links.
mkdir -p /dev/disk/by-partlabel
for u in /sys/class/block/*/uevent; do
  n=; d=
  while IFS='=' read -r k v; do
    case $k in PARTNAME) n=$v ;; DEVNAME) d=$v ;; esac
  done < "$u"
  [ -n "$n" ] && ln -sfn "/dev/$d" "/dev/disk/by-partlabel/$n"
done
exit 0
STUB
} > $b/udevadm
chmod +x $b/*
"##,
    );
    for k in keys {
        s.push_str(&format!("printf '%s' '{}' > '{k}'\n", key_bytes(k)));
    }
    s.push_str(&format!(
        "cat > /tmp/create.sh <<'{EOF}'\n{create}\n{EOF}\n"
    ));
    s.push_str(
        r#"t0=$(cut -d' ' -f1 /proc/uptime)
PATH=$b:$PATH bash /tmp/create.sh > /tmp/create.log 2>&1 || { tail -n 25 /tmp/create.log >&2; exit 1; }
t1=$(cut -d' ' -f1 /proc/uptime)
vgchange -an >/dev/null 2>&1 || true
dmsetup remove_all
sync
blockdev --flushbufs /dev/nbd0
echo "disko-create-seconds $t0 $t1"
"#,
    );
    Ok(s)
}

/// `create` with every whole-word `device` (not followed by a name character, so never a
/// partition like `/dev/vdb1`) replaced by `with`; an error if any other use remains.
fn replace_device(create: &str, device: &str, with: &str) -> Result<String> {
    let mut out = String::with_capacity(create.len());
    let mut rest = create;
    while let Some(i) = rest.find(device) {
        let after = &rest[i + device.len()..];
        if after.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            bail!("disko's _create names {device} as part of another path; the bench cannot rewrite it");
        }
        out.push_str(&rest[..i]);
        out.push_str(with);
        rest = after;
    }
    out.push_str(rest);
    Ok(out)
}

/// What the kernel made on `raw`, for comparing the two sides: for btrfs, `btrfs check` and
/// the subvolume names; for LUKS, the header version and key slots.
fn content(raw: &Path, parts: &[Part], scratch: &Path) -> Result<Vec<String>> {
    let mut found = Vec::new();
    for (i, p) in parts.iter().enumerate() {
        let img = scratch.join(format!("part{}.img", i + 1));
        crate::util::run(
            Command::new("dd")
                .arg(format!("if={}", raw.display()))
                .arg(format!("of={}", img.display()))
                .args(["bs=512", "conv=sparse", "status=none"])
                .arg(format!("skip={}", p.start))
                .arg(format!("count={}", p.size)),
        )?;
        let n = i + 1;
        let r = Command::new("cryptsetup")
            .arg("luksDump")
            .arg(&img)
            .output();
        if let Some(r) = r.ok().filter(|r| r.status.success()) {
            let dump = String::from_utf8_lossy(&r.stdout);
            let version = dump
                .lines()
                .find_map(|l| l.strip_prefix("Version:"))
                .unwrap_or("?")
                .trim()
                .to_string();
            let slots = luks_keyslots(&dump);
            found.push(format!("partition {n}: LUKS{version}, key slots {slots:?}"));
        } else if is_btrfs(&img)? {
            let c = Command::new("btrfs")
                .args(["check", "--readonly"])
                .arg(&img)
                .output()?;
            found.push(format!(
                "partition {n}: btrfs check --readonly {}",
                if c.status.success() {
                    "clean"
                } else {
                    "FAILED"
                }
            ));
            let t = Command::new("btrfs")
                .args(["inspect-internal", "dump-tree", "-t", "root"])
                .arg(&img)
                .output()?;
            let names = subvolume_names(&String::from_utf8_lossy(&t.stdout));
            found.push(format!("partition {n}: subvolumes {names:?}"));
        }
        remove_if_exists(&img)?;
    }
    Ok(found)
}

fn is_btrfs(img: &Path) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(img)?;
    let mut magic = [0u8; 8];
    f.seek(SeekFrom::Start(0x10040))?;
    Ok(f.read_exact(&mut magic).is_ok() && &magic == b"_BHRfS_M")
}

/// Key slot numbers in `cryptsetup luksDump` (LUKS2: "  0: luks2" under "Keyslots:").
fn luks_keyslots(dump: &str) -> Vec<u32> {
    let mut in_slots = false;
    let mut v = Vec::new();
    for l in dump.lines() {
        if !l.starts_with([' ', '\t']) {
            in_slots = l.starts_with("Keyslots:");
            continue;
        }
        if in_slots {
            let t = l.trim();
            if let Some((n, rest)) = t.split_once(':') {
                if rest.trim().starts_with("luks") {
                    if let Ok(n) = n.parse() {
                        v.push(n);
                    }
                }
            }
        }
    }
    v
}

/// Subvolume paths' last components from `btrfs inspect-internal dump-tree -t root`'s
/// ROOT_REF items ("root ref key dirid 256 sequence 2 name home"), sorted.
fn subvolume_names(dump: &str) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    let mut after_ref = false;
    for l in dump.lines() {
        if l.contains(" ROOT_REF ") {
            after_ref = true;
            continue;
        }
        if after_ref {
            if let Some((_, name)) = l.split_once(" name ") {
                names.push(name.trim().to_string());
            }
            after_ref = false;
        }
    }
    names.sort();
    names
}

fn median(mut v: Vec<f64>) -> Option<f64> {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

fn tail(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(b);
    let v: Vec<&str> = s.trim().lines().rev().take(12).collect();
    v.into_iter().rev().collect::<Vec<_>>().join("\n")
}

/// Build `ex` both ways `runs` times; check the last outputs.
fn case(vmdisk: &Path, corpus: &Path, dir: &Path, runs: usize, ex: &Example) -> Result<DiskoCase> {
    let json = corpus.join("json");
    let evaluated_path = json.join(format!("{}.evaluated.json", ex.name));
    let internals_path = json.join(format!("{}.evaluated-internals.json", ex.name));
    let read = |p: &Path| -> Result<Value> {
        serde_json::from_slice(&fs::read(p).with_context(|| format!("{}", p.display()))?)
            .with_context(|| format!("{}", p.display()))
    };
    let evaluated = read(&evaluated_path)?;
    let internals = read(&internals_path)?;
    let (device, size) = the_disk(&evaluated)?;
    let create = internals["_create"]
        .as_str()
        .with_context(|| format!("{}: no `_create`", internals_path.display()))?;
    let script = disko_vm_script(create, &device, ex.keys)?;

    let work = dir.join(format!("disko-{}", ex.name));
    fs::create_dir_all(&work)?;
    let mut secrets = Vec::new();
    for (i, k) in ex.keys.iter().enumerate() {
        let f = work.join(format!("key{i}"));
        fs::write(&f, key_bytes(k))?;
        secrets.push(format!("{k}={}", f.display()));
    }
    let v_out = work.join("vmdisk.raw");
    let d_out = work.join("disko.raw");
    let mut v = DiskoSide {
        best_s: None,
        median_s: None,
        runs_s: Vec::new(),
        error: None,
        content: Vec::new(),
    };
    let mut d = v.clone();
    for i in 0..runs {
        for k in 0..2 {
            let vmdisk_turn = (i + k) % 2 == 0;
            if (vmdisk_turn && v.error.is_some()) || (!vmdisk_turn && d.error.is_some()) {
                continue;
            }
            let out = if vmdisk_turn { &v_out } else { &d_out };
            remove_if_exists(out)?;
            let mut c = Command::new(vmdisk);
            if vmdisk_turn {
                c.args(["create", "-q", "-f", "raw", "--layout"])
                    .arg(&evaluated_path)
                    .args(["--seed", "1"]);
                for s in &secrets {
                    c.args(["--secret", s]);
                }
                c.arg(out);
            } else {
                fs::File::create(out)?.set_len(size)?;
                c.arg("rescue").arg(out).arg("--").arg(&script);
            }
            sync();
            let t = Instant::now();
            let r = c.output()?;
            let secs = t.elapsed().as_secs_f64();
            let side = if vmdisk_turn { &mut v } else { &mut d };
            if r.status.success() {
                side.runs_s.push(secs);
            } else {
                side.error = Some(format!("{}\n{}", tail(&r.stdout), tail(&r.stderr)));
            }
        }
        let show = |s: &DiskoSide| match s.runs_s.get(i) {
            Some(t) => format!("{t:.2} s"),
            None => "failed".into(),
        };
        eprintln!(
            "   {} run {}: disko _create in the VM {} / vmdisk {}",
            ex.name,
            i + 1,
            show(&d),
            show(&v)
        );
    }
    for s in [&mut v, &mut d] {
        s.best_s = s.runs_s.iter().copied().reduce(f64::min);
        s.median_s = median(s.runs_s.clone());
    }
    let mut table = Vec::new();
    let mut content_diff = Vec::new();
    if v.error.is_none() && d.error.is_none() {
        let vp = sfdisk_parts(&v_out)?;
        let dp = sfdisk_parts(&d_out)?;
        table = table_differences(&vp, &dp);
        v.content = content(&v_out, &vp, &work)?;
        d.content = content(&d_out, &dp, &work)?;
        if v.content != d.content {
            content_diff.push(format!(
                "vmdisk: {}; disko: {}",
                v.content.join(", "),
                d.content.join(", ")
            ));
        }
        for c in v.content.iter().chain(&d.content) {
            if c.contains("FAILED") {
                content_diff.push(c.clone());
            }
        }
    }
    remove_if_exists(&v_out)?;
    remove_if_exists(&d_out)?;
    Ok(DiskoCase {
        example: ex.name.to_string(),
        what: ex.what.to_string(),
        image_size: size,
        speed_ratio: match (d.best_s, v.best_s) {
            (Some(d), Some(v)) => Some(d / v),
            _ => None,
        },
        vmdisk: v,
        disko: d,
        table_differences: table,
        content_differences: content_diff,
    })
}

/// Every example, in order.
pub fn cases(vmdisk: &Path, corpus: &Path, dir: &Path, runs: usize) -> Result<Vec<DiskoCase>> {
    if !corpus.join("json").is_dir() {
        bail!(
            "the disko corpus is not at {} (pass --corpus DIR, the folder holding json/)",
            corpus.display()
        );
    }
    EXAMPLES
        .iter()
        .map(|ex| case(vmdisk, corpus, dir, runs.max(1), ex))
        .collect()
}

/// The corpus next to the project (`../shared/corpus/disko`).
pub fn default_corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/disko")
}

/// The report's section.
pub fn markdown(cases: &[DiskoCase]) -> String {
    use std::fmt::Write;
    let mut md = String::from(
        "\n## Kernel-made layouts: vmdisk create --layout vs disko's own `_create` in a VM\n\n\
         Both in the same builder VM (the rescue kernel and Debian's cryptsetup, lvm2, \
         btrfs-progs; the disk over NBD); each time is the whole command, VM boot included. \
         disko's side is `vmdisk rescue EMPTY -- '<stubs>; bash _create'`, its script taken \
         unchanged from the corpus but for the device path.\n\n\
         | example | layout | disko _create s best (median) | vmdisk s best (median) | ratio disko / vmdisk | same table | same content |\n\
         |---|---|--:|--:|--:|---|---|\n",
    );
    let pair = |s: &DiskoSide| match (s.best_s, s.median_s) {
        (Some(b), Some(m)) if s.error.is_none() => format!("{b:.2} ({m:.2})"),
        _ => "failed".into(),
    };
    for c in cases {
        let both = c.vmdisk.error.is_none() && c.disko.error.is_none();
        let yes_no = |ok: bool| {
            if !both {
                "-"
            } else if ok {
                "yes"
            } else {
                "**no**"
            }
        };
        let _ = writeln!(
            md,
            "| {} | {} ({} MiB) | {} | {} | {} | {} | {} |",
            c.example,
            c.what,
            c.image_size >> 20,
            pair(&c.disko),
            pair(&c.vmdisk),
            c.speed_ratio.map_or("-".into(), |r| format!("**{r:.2}x**")),
            yes_no(c.table_differences.is_empty()),
            yes_no(c.content_differences.is_empty()),
        );
    }
    for c in cases {
        if !c.vmdisk.content.is_empty() {
            let _ = writeln!(md, "- {}: {}", c.example, c.vmdisk.content.join("; "));
        }
        for (who, s) in [("vmdisk", &c.vmdisk), ("disko", &c.disko)] {
            if let Some(e) = &s.error {
                let _ = writeln!(md, "- **{} {who} failed:**\n```\n{e}\n```", c.example);
            }
        }
        for d in c.table_differences.iter().chain(&c.content_differences) {
            let _ = writeln!(md, "- **{} differs:** {d}", c.example);
        }
    }
    md
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(image_size("2G").unwrap(), 2 << 30);
        assert_eq!(image_size("500M").unwrap(), 500 << 20);
        assert!(image_size("2GiB").is_err());
    }

    #[test]
    fn the_device_is_rewritten_everywhere_or_refused() {
        let create = "( # gpt /dev/vdb   #\ndevice=/dev/vdb\nif ! blkid \"/dev/vdb\" >&2; then\n  sgdisk --clear \"/dev/vdb\"\nfi\n";
        let s = disko_vm_script(create, "/dev/vdb", &["/tmp/k"]).unwrap();
        assert!(!s.contains("/dev/vdb"), "{s}");
        assert!(s.contains("sgdisk --clear \"/dev/nbd0\""));
        assert!(s.contains("printf '%s' 'vmdisk-bench-key /tmp/k' > '/tmp/k'"));
        assert!(disko_vm_script("mkfs /dev/vdb1", "/dev/vdb", &[]).is_err());
    }

    #[test]
    fn dumps_are_read() {
        let tree = "\titem 3 key (5 ROOT_REF 256) itemoff 15800 itemsize 22\n\
                    \t\troot ref key dirid 256 sequence 2 name home\n\
                    \titem 4 key (256 DIR_ITEM 1) itemoff 1 itemsize 1\n\
                    \t\tlocation key (256 ROOT_ITEM -1) type DIR\n\
                    \titem 5 key (256 ROOT_REF 257) itemoff 15700 itemsize 22\n\
                    \t\troot ref key dirid 256 sequence 2 name user\n\
                    \titem 6 key (257 ROOT_BACKREF 256) itemoff 15700 itemsize 22\n\
                    \t\troot backref key dirid 256 sequence 2 name user\n";
        assert_eq!(subvolume_names(tree), ["home", "user"]);
        let dump = "LUKS header information\nVersion:       \t2\nKeyslots:\n  0: luks2\n\tKey:        512 bits\n  1: luks2\n\tKey:        512 bits\nTokens:\nDigests:\n  0: pbkdf2\n";
        assert_eq!(luks_keyslots(dump), [0, 1]);
    }
}
