//! `vmdisk create --layout` and `vmdisk measure --layout`: disko-style GPT disks, no root.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vmdisk_image::{CreateSpec, Format, ImageOptions, OpenOptions};
use vmdisk_layout::{kernel, DiskSpec, PlanOptions, Sources};

/// Layout flags shared by create and measure.
#[derive(Debug, Clone, clap::Args)]
pub struct LayoutArgs {
    /// A disko JSON file: `nix eval --json` of a disk config, or an evaluated NixOS config.
    #[arg(long, value_name = "DISKO.json")]
    pub layout: Option<PathBuf>,
    /// Which disk of the layout to build, when it has several.
    #[arg(long, value_name = "NAME", requires = "layout")]
    pub disk: Option<String>,
    /// Fill a partition's filesystem from a host directory: PART is the attribute name, GPT
    /// name, number or mountpoint (e.g. root=./rootfs, /boot=./esp).
    #[arg(long = "copy-in", value_name = "PART=DIR", requires = "layout")]
    pub copy_in: Vec<String>,
    /// Seed for every GUID and filesystem UUID the layout does not give (default: derived
    /// from the layout), so the same input gives the same bytes.
    #[arg(long, value_name = "SEED", requires = "layout")]
    pub seed: Option<String>,
    /// With size `auto`: free space to leave in the last (100%) filesystem.
    #[arg(long, value_name = "SIZE", default_value = "64M", requires = "layout")]
    pub free: String,
    /// Another disk of the layout, built into FILE together with this one: disks that share
    /// a volume group, an md array or a multi-device btrfs are made in one builder-VM run
    /// (NAME is the disk's attribute name; the error lists which are needed).
    #[arg(long = "with-disk", value_name = "NAME=FILE", requires = "layout")]
    pub with_disk: Vec<String>,
    /// A LUKS key: PATH=FILE reads FILE for the key or password file PATH the layout names
    /// (by default PATH itself is read, as disko does); NAME=FILE gives the password of the
    /// LUKS device NAME that asks for one (`askPassword`), without trailing newlines.
    #[arg(long = "secret", value_name = "PATH=FILE", requires = "layout")]
    pub secret: Vec<String>,
}

/// `NAME=VALUE` arguments of `flag`, split.
fn pairs(flag: &str, args: &[String], example: &str) -> Result<Vec<(String, PathBuf)>> {
    args.iter()
        .map(|c| match c.split_once('=') {
            Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), PathBuf::from(v))),
            _ => bail!("{flag} {c}: expected NAME=FILE, e.g. {flag} {example}"),
        })
        .collect()
}

/// The parsed layout with the disk to build picked out.
struct Selected {
    path: PathBuf,
    disk: DiskSpec,
    /// Every disk that parsed (the selected one too) and the layout's VGs and arrays: what a
    /// builder-VM group is computed from.
    valid: Vec<DiskSpec>,
    devices: vmdisk_layout::Devices,
}

fn select(a: &LayoutArgs) -> Result<Selected> {
    let Some(path) = &a.layout else {
        bail!("--layout is required here");
    };
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let in_file = || format!("in {}", path.display());
    let mut layout = vmdisk_layout::parse_layout(&json).with_context(in_file)?;
    let at = layout
        .select_index(a.disk.as_deref())
        .with_context(in_file)?;
    let devices = std::mem::take(&mut layout.devices);
    let mut disk = None;
    let mut valid = Vec::new();
    for (i, (_, d)) in layout.into_results().into_iter().enumerate() {
        if i == at {
            let d = d.with_context(in_file)?;
            disk = Some(d.clone());
            valid.push(d);
        } else if let Ok(d) = d {
            valid.push(d);
        }
    }
    Ok(Selected {
        path: path.clone(),
        disk: disk.context("the selected disk is missing")?,
        valid,
        devices,
    })
}

/// Plan options for `disk` with these `--copy-in`s, and the scanned trees.
fn plan_inputs(
    a: &LayoutArgs,
    disk: &DiskSpec,
    copy_in: Vec<(String, PathBuf)>,
) -> Result<(PlanOptions, Sources)> {
    let opts = PlanOptions {
        seed: a.seed.clone(),
        copy_in,
        free_margin: vmdisk_image::parse_size(&a.free)?,
    };
    let sources = vmdisk_layout::scan_copy_in(disk, &opts)?;
    Ok((opts, sources))
}

/// Parse the layout, pick the disk, and scan every `--copy-in` tree (once).
fn load(a: &LayoutArgs) -> Result<(DiskSpec, PlanOptions, Sources)> {
    let sel = select(a)?;
    let copy_in = pairs("--copy-in", &a.copy_in, "root=./rootfs")?;
    let (opts, sources) = plan_inputs(a, &sel.disk, copy_in)?;
    Ok((sel.disk, opts, sources))
}

/// Size from SIZE (`auto` measures), else the layout's imageSize.
fn disk_size(
    disk: &DiskSpec,
    opts: &PlanOptions,
    sources: &Sources,
    size: Option<&str>,
) -> Result<Option<u64>> {
    match size {
        Some("auto") => Ok(Some(vmdisk_layout::measure(disk, opts, sources)?)),
        Some(s) => Ok(Some(vmdisk_image::parse_size(s)?)),
        None => Ok(None),
    }
}

pub fn create(
    a: &LayoutArgs,
    file: &Path,
    format: Format,
    options: ImageOptions,
    size: Option<&str>,
    quiet: bool,
) -> Result<u8> {
    let cancel = crate::signals::cancel_on_interrupt();
    let sel = select(a)?;
    let copy_in = pairs("--copy-in", &a.copy_in, "root=./rootfs")?;
    if !kernel::needs_builder(&sel.disk) {
        if let Some(w) = a.with_disk.first() {
            bail!(
                "--with-disk {w}: disk {:?} shares nothing with another disk (no LUKS, LVM, md \
                 or multi-device btrfs); build each disk on its own",
                sel.disk.key
            );
        }
        let (opts, sources) = plan_inputs(a, &sel.disk, copy_in)?;
        let built = build_host(&sel.disk, file, format, &options, size, &opts, &sources)?;
        cancel.check()?;
        built.new.finish(false)?;
        report(&built.report, file, quiet);
        return Ok(0);
    }
    create_with_builder(a, sel, copy_in, file, format, options, size, quiet, &cancel)
}

/// A disk written by the host, still under its temporary name.
struct Built {
    new: vmdisk_image::NewImage,
    report: vmdisk_layout::ApplyReport,
}

fn report(r: &vmdisk_layout::ApplyReport, file: &Path, quiet: bool) {
    if !quiet {
        eprintln!(
            "vmdisk: built disk '{}' ({} bytes) in {}",
            r.disk_name,
            r.disk_size,
            file.display()
        );
        for p in &r.partitions {
            eprintln!("  {:>2}  {}", p.number, p.label);
        }
    }
}

/// Plan `disk` and write its table and host-made filesystems into a new image that becomes
/// FILE only when the caller finishes it. Kernel-made content is left empty for the builder.
fn build_host(
    disk: &DiskSpec,
    file: &Path,
    format: Format,
    options: &ImageOptions,
    size: Option<&str>,
    opts: &PlanOptions,
    sources: &Sources,
) -> Result<Built> {
    let size = disk_size(disk, opts, sources, size)?;
    // Plan fully (this validates everything) before a byte is written.
    let plan = vmdisk_layout::plan(disk, size, opts, sources).context("nothing was written")?;
    // And the installed tools can make it.
    vmdisk_layout::preflight(&plan)?;
    // Content that cannot fit is refused now, not half-way through writing. measure is the
    // size `auto` would pick; where it cannot estimate (it is conservative for some content),
    // the build itself decides, and a failure still leaves FILE as it was.
    if let Ok(needed) = vmdisk_layout::measure(
        disk,
        &PlanOptions {
            free_margin: 0,
            ..opts.clone()
        },
        sources,
    ) {
        if plan.disk_size < needed {
            bail!(
                "the layout's content needs a disk of at least {} ({needed} bytes, see `vmdisk \
                 measure --layout`), but {} was asked for; pass a bigger SIZE or `auto`; \
                 nothing was written",
                vmdisk_image::format_size(needed),
                vmdisk_image::format_size(plan.disk_size)
            );
        }
    }
    // The disk is built under a temporary name beside FILE, and so are the scratch
    // filesystems mke2fs writes: the copied-in data lands there twice at most.
    vmdisk_image::ensure_space(file, sources.allocated_bytes().saturating_mul(2))?;
    let new = vmdisk_image::create_new(
        file,
        &CreateSpec {
            format,
            size: Some(plan.disk_size),
            options: options.clone(),
            backing_file: None,
            backing_format: None,
        },
    )?;
    let scratch = tempfile::Builder::new()
        .prefix(".vmdisk-layout-")
        .tempdir_in(scratch_dir(file))
        .context("creating a scratch directory")?;
    let _registered = vmdisk_block::register_temp(scratch.path());
    let report = vmdisk_layout::apply(&plan, sources, new.image().dev().as_ref(), scratch.path())
        .with_context(|| format!("building {}", file.display()))?;
    Ok(Built { new, report })
}

/// A disk with LUKS, LVM, md or btrfs-subvolume content: the host writes what it can into
/// every disk of its group, the builder VM makes the rest, then all of them are renamed.
#[allow(clippy::too_many_arguments)]
fn create_with_builder(
    a: &LayoutArgs,
    sel: Selected,
    copy_in: Vec<(String, PathBuf)>,
    file: &Path,
    format: Format,
    options: ImageOptions,
    size: Option<&str>,
    quiet: bool,
    cancel: &vmdisk_block::Cancel,
) -> Result<u8> {
    let layout = sel.path.display().to_string();
    let refs: Vec<&DiskSpec> = sel.valid.iter().collect();
    let at = refs
        .iter()
        .position(|d| d.key == sel.disk.key)
        .context("the selected disk is not among the layout's disks")?;
    let group =
        kernel::build_group(&refs, &sel.devices, at).with_context(|| format!("in {layout}"))?;
    let with = pairs("--with-disk", &a.with_disk, "disk2=second.qcow2")?;
    for (name, _) in &with {
        if !group.iter().any(|i| refs[*i].key == *name) {
            let names: Vec<&str> = group
                .iter()
                .filter(|i| **i != at)
                .map(|i| refs[*i].key.as_str())
                .collect();
            bail!(
                "--with-disk {name}: disk {name:?} is not built together with {:?} (it shares \
                 no volume group, array or filesystem with it; {})",
                sel.disk.key,
                if names.is_empty() {
                    "no other disk is".to_string()
                } else {
                    format!("these are: {}", names.join(", "))
                }
            );
        }
    }
    // The members in NBD order: the selected disk first, then the rest in layout order.
    let mut members: Vec<(&DiskSpec, PathBuf)> = vec![(refs[at], file.to_path_buf())];
    let mut missing = Vec::new();
    for &i in &group {
        if i == at {
            continue;
        }
        match with.iter().find(|(n, _)| *n == refs[i].key) {
            Some((_, f)) => members.push((refs[i], f.clone())),
            None => missing.push(refs[i].key.clone()),
        }
    }
    if !missing.is_empty() {
        bail!(
            "in {layout}: disk {:?} shares a volume group, md array or multi-device filesystem \
             with {}; they are built together: add {}; nothing was written",
            sel.disk.key,
            missing.join(", "),
            missing
                .iter()
                .map(|m| format!("--with-disk {m}=FILE"))
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    for (i, (_, f)) in members.iter().enumerate() {
        if members[..i].iter().any(|(_, g)| g == f) {
            bail!(
                "{} is named for two disks; give each disk its own file",
                f.display()
            );
        }
    }
    let disks: Vec<&DiskSpec> = members.iter().map(|(d, _)| *d).collect();

    // --copy-in: a host-made partition of one of the disks, else a mountpoint the VM makes.
    let vm_mounts = kernel::mountpoints(&disks, &sel.devices);
    let mut host_copy: Vec<Vec<(String, PathBuf)>> = vec![Vec::new(); members.len()];
    let mut vm_copy: Vec<(String, PathBuf)> = Vec::new();
    for (part, dir) in copy_in {
        if vm_mounts.contains(&part) {
            if !dir.is_dir() {
                bail!("--copy-in {part}={}: not a directory", dir.display());
            }
            vm_copy.push((part, dir));
            continue;
        }
        let Some(owner) = disks
            .iter()
            .position(|d| d.partitions.iter().any(|p| p.answers_to(&part)))
        else {
            let parts: Vec<&str> = disks
                .iter()
                .flat_map(|d| d.partitions.iter().map(|p| p.key.as_str()))
                .collect();
            bail!(
                "--copy-in {part}={}: no partition is called that and no filesystem the \
                 builder VM makes is mounted there (partitions: {}; mountpoints made in the VM: \
                 {}); nothing was written",
                dir.display(),
                parts.join(", "),
                vm_mounts.join(", ")
            );
        };
        host_copy[owner].push((part, dir));
    }

    let secrets = read_secrets(
        &layout,
        kernel::secrets_needed(&disks, &sel.devices),
        &pairs("--secret", &a.secret, "/tmp/secret.key=./key")?,
    )?;
    let mounts: Vec<String> = vm_copy.iter().map(|(m, _)| m.clone()).collect();
    let script = kernel::builder_script(&kernel::ScriptInput {
        disks: &disks,
        devices: &sel.devices,
        secrets: &secrets,
        copy_in: &mounts,
    })
    .with_context(|| format!("in {layout}"))?;
    let mut inputs = Vec::new();
    for (i, (d, _)) in members.iter().enumerate() {
        inputs.push(plan_inputs(a, d, std::mem::take(&mut host_copy[i]))?);
    }

    // The VM first: a missing package fails before anything is written.
    let vm = crate::builder::Builder::prepare(quiet)?;
    cancel.check()?;
    let mut built = Vec::new();
    for ((d, f), (opts, sources)) in members.iter().zip(&inputs) {
        built.push(
            build_host(d, f, format, &options, size, opts, sources)
                .with_context(|| format!("building disk {:?} into {}", d.key, f.display()))?,
        );
        cancel.check()?;
    }
    let mut served = crate::builder::Served::new()?;
    for (i, b) in built.iter().enumerate() {
        served.add(
            b.new.image().dev(),
            &format!("disk{i}"),
            false,
            format!("vmdisk create: disk {}", disks[i].key),
        )?;
    }
    // The archives live beside FILE while the VM reads them (only when there are any).
    let scratch = match vm_copy.is_empty() {
        true => None,
        false => Some(
            tempfile::Builder::new()
                .prefix(".vmdisk-copy-in-")
                .tempdir_in(scratch_dir(file))
                .context("creating a scratch directory")?,
        ),
    };
    let _registered = scratch
        .as_ref()
        .map(|d| vmdisk_block::register_temp(d.path()));
    let mut archives = Vec::new();
    for (j, (m, dir)) in vm_copy.iter().enumerate() {
        let at = scratch.as_ref().context("no scratch directory")?.path();
        let tar = crate::builder::tar_of(dir, &at.join(format!("copy-in-{j}.tar")))?;
        let img = vmdisk_image::open(
            &tar,
            &OpenOptions {
                format: Some(Format::Raw),
                ..OpenOptions::read_only()
            },
        )
        .with_context(|| format!("opening the archive of {}", dir.display()))?;
        served.add(
            img.dev(),
            &format!("copy{j}"),
            true,
            format!("--copy-in {m}"),
        )?;
        archives.push(img);
    }
    let ran = vm.run(&served, &script.text, cancel, quiet);
    let stopped = served.stop();
    ran?;
    stopped?;
    drop(archives);
    cancel.check()?;
    for (b, (_, f)) in built.into_iter().zip(&members) {
        b.new.finish(false)?;
        report(&b.report, f, quiet);
    }
    Ok(0)
}

/// Largest key file read: cryptsetup's own default limit (`--keyfile-size` maximum, 8 MiB).
const MAX_KEY_FILE: u64 = 8 << 20;

/// The bytes of every secret the layout needs, from `--secret` or the file the layout names.
fn read_secrets(
    layout: &str,
    needed: Vec<(kernel::SecretRef, vmdisk_layout::JsonPath)>,
    given: &[(String, PathBuf)],
) -> Result<Vec<(kernel::SecretRef, Vec<u8>)>> {
    use kernel::SecretRef;
    let mut out = Vec::new();
    for (r, at) in needed {
        let (key, password) = match &r {
            SecretRef::File(p) => (p.as_str(), false),
            SecretRef::PasswordFile(p) => (p.as_str(), true),
            SecretRef::Password(n) => (n.as_str(), true),
        };
        let from_flag = given.iter().find(|(k, _)| k == key);
        let file = match (from_flag, &r) {
            (Some((_, f)), _) => f.clone(),
            (None, SecretRef::Password(n)) => bail!(
                "in {layout}: {at}: LUKS device {n:?} asks for its password when disko runs \
                 (askPassword); give it in a file with --secret {n}=FILE; nothing was written"
            ),
            (None, _) => PathBuf::from(key),
        };
        let what = if password { "password" } else { "key" };
        let len = std::fs::metadata(&file)
            .with_context(|| {
                let way_out = match from_flag {
                    Some(_) => format!("check the FILE of --secret {key}=FILE"),
                    None => format!("create it, or pass --secret {key}=FILE"),
                };
                format!(
                    "in {layout}: {at}: reading the LUKS {what} file {}; {way_out}; nothing \
                     was written",
                    file.display()
                )
            })?
            .len();
        if len > MAX_KEY_FILE {
            bail!(
                "in {layout}: {at}: {} is {len} bytes, more than a LUKS key file can be \
                 (cryptsetup reads at most 8 MiB); nothing was written",
                file.display()
            );
        }
        let mut bytes = std::fs::read(&file)
            .with_context(|| format!("in {layout}: {at}: reading {}", file.display()))?;
        if password {
            // disko passes `$(cat FILE)`: the shell drops trailing newlines.
            while bytes.last() == Some(&b'\n') {
                bytes.pop();
            }
        }
        if bytes.is_empty() {
            bail!(
                "in {layout}: {at}: the LUKS {what} in {} is empty; nothing was written",
                file.display()
            );
        }
        out.push((r, bytes));
    }
    Ok(out)
}

/// Where scratch filesystems go: beside the disk being built (same filesystem as the output,
/// so the free-space check means something and nothing lands in a small /tmp).
fn scratch_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    }
}

pub fn measure(a: &LayoutArgs) -> Result<u8> {
    let (disk, opts, sources) = load(a)?;
    let required = vmdisk_layout::measure(&disk, &opts, &sources)?;
    let v = serde_json::json!({ "disk": disk.name, "required": required });
    println!("{}", serde_json::to_string_pretty(&v)?);
    Ok(0)
}

/// Partition table and filesystems of an image, for `inspect`.
pub fn describe(
    file: &Path,
    format: Option<Format>,
    force_share: bool,
) -> Result<serde_json::Value> {
    let img = vmdisk_image::open(
        file,
        &OpenOptions {
            format,
            read_only: true,
            force_share,
            no_backing: false,
            ..Default::default()
        },
    )?;
    let dev = img.dev();
    let mut v = serde_json::Map::new();
    match vmdisk_layout::probe_partitions(dev.as_ref())? {
        Some(table) => {
            let mut parts = Vec::new();
            for p in &table.partitions {
                let slice = vmdisk_block::Slice::new(dev.clone(), p.offset, p.size)?;
                let mut pv = serde_json::to_value(p)?;
                if let (Some(obj), Some(fs)) =
                    (pv.as_object_mut(), vmdisk_layout::probe_filesystem(&slice))
                {
                    obj.insert("filesystem".into(), serde_json::to_value(fs)?);
                }
                parts.push(pv);
            }
            let mut tv = serde_json::to_value(&table)?;
            if let Some(obj) = tv.as_object_mut() {
                obj.insert("partitions".into(), serde_json::Value::Array(parts));
            }
            v.insert("partition-table".into(), tv);
        }
        None => {
            if let Some(fs) = vmdisk_layout::probe_filesystem(dev.as_ref()) {
                v.insert("filesystem".into(), serde_json::to_value(fs)?);
            }
        }
    }
    Ok(serde_json::Value::Object(v))
}

/// Human lines for `inspect`.
pub fn describe_human(v: &serde_json::Value) -> String {
    let fs_text = |f: &serde_json::Value| {
        let kind = f["kind"].as_str().unwrap_or("?").to_lowercase();
        let label = f["label"]
            .as_str()
            .map(|l| format!(" LABEL={l}"))
            .unwrap_or_default();
        let uuid = f["uuid"]
            .as_str()
            .map(|u| format!(" UUID={u}"))
            .unwrap_or_default();
        format!("{kind}{label}{uuid}")
    };
    let mut s = String::new();
    if let Some(t) = v.get("partition-table") {
        s += "Partition table: gpt\n";
        s += &format!(
            "    {:>3}  {:<24} {:<6} {:>14} {:>14}  {}\n",
            "#", "name", "type", "start", "size", "contents"
        );
        for p in t["partitions"].as_array().into_iter().flatten() {
            s += &format!(
                "    {:>3}  {:<24} {:<6} {:>14} {:>14}  {}\n",
                p["number"].to_string(),
                p["name"].as_str().unwrap_or(""),
                p["type_code"].as_str().unwrap_or("-"),
                p["offset"].to_string(),
                p["size"].to_string(),
                p.get("filesystem").map(fs_text).unwrap_or_default()
            );
        }
    } else if let Some(f) = v.get("filesystem") {
        s += &format!("Filesystem (whole disk): {}\n", fs_text(f));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use kernel::SecretRef;

    fn at() -> vmdisk_layout::JsonPath {
        vmdisk_layout::JsonPath::root().key("disk").key("main")
    }

    #[test]
    fn key_files_are_read_as_they_are_and_password_files_lose_trailing_newlines() {
        let tmp = tempfile::tempdir().unwrap();
        let key = tmp.path().join("key");
        std::fs::write(&key, b"bytes\n\n").unwrap();
        let needed = vec![
            (SecretRef::File(s(&key)), at()),
            (SecretRef::PasswordFile(s(&key)), at()),
            (SecretRef::Password("crypted".into()), at()),
        ];
        let given = vec![("crypted".to_string(), key.clone())];
        let got = read_secrets("l.json", needed, &given).unwrap();
        assert_eq!(got[0].1, b"bytes\n\n");
        assert_eq!(got[1].1, b"bytes");
        assert_eq!(got[2].1, b"bytes");
        // --secret PATH=FILE reads FILE instead of PATH.
        let other = tmp.path().join("other");
        std::fs::write(&other, b"other").unwrap();
        let got = read_secrets(
            "l.json",
            vec![(SecretRef::File("/nonexistent/secret.key".into()), at())],
            &[("/nonexistent/secret.key".into(), other)],
        )
        .unwrap();
        assert_eq!(got[0].1, b"other");
    }

    #[test]
    fn missing_secrets_are_refused_naming_the_json_path_and_the_way_out() {
        let e = read_secrets(
            "l.json",
            vec![(SecretRef::Password("crypted".into()), at())],
            &[],
        )
        .unwrap_err();
        let m = format!("{e:#}");
        assert!(
            m.contains("disk.main") && m.contains("--secret crypted=FILE"),
            "{m}"
        );
        let e = read_secrets(
            "l.json",
            vec![(SecretRef::File("/nonexistent/secret.key".into()), at())],
            &[],
        )
        .unwrap_err();
        let m = format!("{e:#}");
        assert!(
            m.contains("/nonexistent/secret.key")
                && m.contains("--secret /nonexistent/secret.key=FILE"),
            "{m}"
        );
        let tmp = tempfile::tempdir().unwrap();
        let empty = tmp.path().join("empty");
        std::fs::write(&empty, b"\n").unwrap();
        let e = read_secrets(
            "l.json",
            vec![(SecretRef::PasswordFile(s(&empty)), at())],
            &[],
        )
        .unwrap_err();
        assert!(format!("{e:#}").contains("is empty"), "{e:#}");
    }

    #[test]
    fn name_file_pairs_are_split_or_refused_with_an_example() {
        let ok = pairs("--with-disk", &["b=x.raw".to_string()], "d=f").unwrap();
        assert_eq!(ok, vec![("b".to_string(), PathBuf::from("x.raw"))]);
        for bad in ["b", "=x", "b="] {
            let e = pairs("--with-disk", &[bad.to_string()], "disk2=second.qcow2").unwrap_err();
            assert!(e.to_string().contains("disk2=second.qcow2"), "{e}");
        }
    }

    fn s(p: &Path) -> String {
        p.display().to_string()
    }
}
