//! `vmdisk create --layout` and `vmdisk measure --layout`: disko-style GPT disks, no root.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use vmdisk_image::{CreateSpec, Format, ImageOptions, OpenOptions};
use vmdisk_layout::{DiskSpec, PlanOptions, Sources};

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
}

/// Parse the layout, pick the disk, and scan every `--copy-in` tree (once).
fn load(a: &LayoutArgs) -> Result<(DiskSpec, PlanOptions, Sources)> {
    let Some(path) = &a.layout else {
        bail!("--layout is required here");
    };
    let json =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let layout =
        vmdisk_layout::parse_layout(&json).with_context(|| format!("in {}", path.display()))?;
    let disk = layout
        .select(a.disk.as_deref())
        .with_context(|| format!("in {}", path.display()))?;
    let mut copy_in = Vec::new();
    for c in &a.copy_in {
        let Some((part, dir)) = c.split_once('=') else {
            bail!("--copy-in {c}: expected PART=DIR, e.g. root=./rootfs");
        };
        copy_in.push((part.to_string(), PathBuf::from(dir)));
    }
    let opts = PlanOptions {
        seed: a.seed.clone(),
        copy_in,
        free_margin: vmdisk_image::parse_size(&a.free)?,
    };
    let sources = vmdisk_layout::scan_copy_in(&disk, &opts)?;
    Ok((disk, opts, sources))
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
    let (disk, opts, sources) = load(a)?;
    // LUKS, LVM, md members, btrfs subvolumes: the host would leave them empty. The layout
    // side (vmdisk_layout::kernel) parses them and writes the builder VM's script; until
    // `create` boots that VM, such a disk is refused rather than half built.
    if let Some(p) = disk
        .partitions
        .iter()
        .find(|p| matches!(p.content, vmdisk_layout::Content::Kernel(_)))
    {
        bail!(
            "in {}: {}: this content needs the builder VM (LUKS, LVM, mdadm, btrfs subvolumes \
             or swap files are made by a Linux kernel), which `vmdisk create` does not run \
             yet; nothing was written",
            a.layout.as_deref().unwrap_or(Path::new("?")).display(),
            p.path.key("content")
        );
    }
    let size = disk_size(&disk, &opts, &sources, size)?;
    // Plan fully (this validates everything) before a byte is written.
    let plan = vmdisk_layout::plan(&disk, size, &opts, &sources).context("nothing was written")?;
    // And the installed tools can make it.
    vmdisk_layout::preflight(&plan)?;
    // Content that cannot fit is refused now, not half-way through writing. measure is the
    // size `auto` would pick; where it cannot estimate (it is conservative for some content),
    // the build itself decides, and a failure still leaves FILE as it was.
    if let Ok(needed) = vmdisk_layout::measure(
        &disk,
        &PlanOptions {
            free_margin: 0,
            ..opts.clone()
        },
        &sources,
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
            options,
            backing_file: None,
            backing_format: None,
        },
    )?;
    let scratch = tempfile::Builder::new()
        .prefix(".vmdisk-layout-")
        .tempdir_in(scratch_dir(file))
        .context("creating a scratch directory")?;
    let _registered = vmdisk_block::register_temp(scratch.path());
    cancel.check()?;
    let report = vmdisk_layout::apply(&plan, &sources, new.image().dev().as_ref(), scratch.path())
        .with_context(|| format!("building {}", file.display()))?;
    cancel.check()?;
    drop(scratch);
    new.finish(false)?;
    if !quiet {
        eprintln!(
            "vmdisk: built disk '{}' ({} bytes) in {}",
            report.disk_name,
            report.disk_size,
            file.display()
        );
        for p in &report.partitions {
            eprintln!("  {:>2}  {}", p.number, p.label);
        }
    }
    Ok(0)
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
