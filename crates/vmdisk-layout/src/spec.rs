//! disko JSON -> validated [`DiskSpec`]s, following disko's gpt/filesystem/swap semantics.

use crate::error::{Error, JsonPath, Result};
use crate::guid::{type_code_guid, Guid};
use crate::json::Json;
use crate::model::{
    Content, Devices, DiskSpec, FsFormat, FsSpec, HybridSpec, KeySource, LogicalVolume, Luks,
    MdArray, PartitionSpec, Stack, Subvolume, SwapSpec, VolumeGroup, GPT_ENTRIES, GPT_NAME_UNITS,
    PRIORITY_BIOS_BOOT, PRIORITY_DEFAULT, PRIORITY_REST,
};
use crate::size::{
    in_sector_units, parse_image_size, parse_position, parse_size, Position, SizeSpec, SECTOR,
};

/// Cap on disks in one layout (a layout is hand-written; this only bounds work).
pub const MAX_DISKS: usize = 256;

/// Content types disko has that vmdisk does not build at all yet.
const UNSUPPORTED_CONTENT: &[&str] = &["nodev", "bcache", "verity"];

/// disko's default `imageSize`.
pub const DEFAULT_IMAGE_SIZE: u64 = 2 << 30;

/// A parsed layout: every disk, each either valid or with the reason it cannot be built, so
/// that `--disk X` only needs what disk X needs.
#[derive(Debug)]
pub struct Layout {
    disks: Vec<(String, Result<DiskSpec>)>,
    /// `lvm_vg` and `mdadm`: what the builder VM makes from the disks' members.
    pub devices: Devices,
}

impl Layout {
    /// The attribute names of the disks, in document order.
    pub fn names(&self) -> Vec<&str> {
        self.disks.iter().map(|(k, _)| k.as_str()).collect()
    }

    /// The disks that can be built.
    pub fn valid(&self) -> Vec<&DiskSpec> {
        self.disks
            .iter()
            .filter_map(|(_, d)| d.as_ref().ok())
            .collect()
    }

    /// Pick the disk to build: `name` (its attribute name or disko `name`), or the only one;
    /// its refusal, if it has one, comes out here.
    pub fn select(self, name: Option<&str>) -> Result<DiskSpec> {
        let at = self.select_index(name)?;
        self.disks
            .into_iter()
            .nth(at)
            .map(|(_, d)| d)
            .unwrap_or(Err(Error::NoDisk {
                path: JsonPath::root(),
            }))
    }

    /// Where [`Layout::select`]'s disk is in [`Layout::into_results`].
    pub fn select_index(&self, name: Option<&str>) -> Result<usize> {
        let available = self.names().join(", ");
        Ok(match name {
            Some(n) => self
                .disks
                .iter()
                .position(|(k, d)| k == n || d.as_ref().is_ok_and(|d| d.name == n))
                .ok_or_else(|| Error::NoSuchDisk {
                    name: n.to_string(),
                    available: available.clone(),
                })?,
            None => match self.disks.len() {
                1 => 0,
                0 => {
                    return Err(Error::NoDisk {
                        path: JsonPath::root(),
                    })
                }
                _ => return Err(Error::AmbiguousDisk { available }),
            },
        })
    }

    /// Every disk's result, for callers that go through all of them.
    pub fn into_results(self) -> Vec<(String, Result<DiskSpec>)> {
        self.disks
    }
}

/// Parse a disko layout: `nix eval --json` output (`{"disko":{"devices":{"disk":…}}}`), an
/// evaluated `disko.devices` (`{"disk":…}`, `_`-keys other than `_index` ignored), or a
/// single disk object (`{"type":"disk",…}`). A disk that cannot be built does not fail the
/// whole layout: its error comes out when it is selected ([`Layout::select`]).
pub fn parse_layout(json: &str) -> Result<Layout> {
    let doc = Json::parse(json)?;
    let root = JsonPath::root();
    doc.members(&root)?;
    if let Some(disko) = doc.get("disko") {
        let p = root.key("disko");
        disko.members(&p)?;
        let devices = disko
            .get("devices")
            .ok_or_else(|| Error::invalid(&p, "missing \"devices\""))?;
        return parse_devices(devices, &p.key("devices"));
    }
    if doc.get("devices").is_some() && doc.get("disk").is_none() {
        let p = root.key("devices");
        return parse_devices(doc.get("devices").unwrap_or(&Json::Null), &p);
    }
    if doc.get("disk").is_some() {
        return parse_devices(&doc, &root);
    }
    if doc.get("type").is_none() && doc.get("nodev").is_some() {
        // Only tmpfs-like entries: nothing goes on a disk.
        return Err(Error::NoDisk {
            path: root.key("disk"),
        });
    }
    match doc.get_str("type", &root)? {
        Some("disk") => {
            let name = doc
                .get_str("name", &root)?
                .or(doc.get_str("imageName", &root)?)
                .unwrap_or("main")
                .to_string();
            Ok(Layout {
                disks: vec![(name.clone(), parse_disk(&name, &doc, &root))],
                devices: Default::default(),
            })
        }
        Some(t @ ("luks" | "lvm_pv" | "mdraid" | "filesystem" | "btrfs" | "swap" | "gpt")) => {
            Err(Error::invalid(
                &root.key("type"),
                format!(
                    "a {t:?} content object, not a disk layout (pass the whole disko.devices, \
                     or one disk)"
                ),
            ))
        }
        Some(t) => Err(content_type_error(t, &root.key("type"))),
        None => Err(Error::invalid(
            &root,
            "not a disko layout: expected disko.devices.disk, a \"disk\" member, or a disk \
             object with \"type\": \"disk\"",
        )),
    }
}

fn content_type_error(t: &str, path: &JsonPath) -> Error {
    if let Some(why) = refused_type(t) {
        Error::unsupported(path, why)
    } else if UNSUPPORTED_CONTENT.contains(&t) {
        Error::unsupported(path, format!("content type {t:?}"))
    } else {
        Error::invalid(path, format!("unknown content type {t:?}"))
    }
}

/// The old single-result API: every disk, failing on the first that cannot be built.
pub fn parse(json: &str) -> Result<Vec<DiskSpec>> {
    parse_layout(json)?
        .into_results()
        .into_iter()
        .map(|(_, d)| d)
        .collect()
}

fn devices_of<'a>(v: Option<&'a Json>, path: &JsonPath) -> Result<Option<&'a [(String, Json)]>> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(v) => Ok(Some(v.members(path)?)),
    }
}

fn parse_devices(devices: &Json, path: &JsonPath) -> Result<Layout> {
    let devices_src = devices;
    // lvm_vg, mdadm, zpool, bcachefs_filesystems and nodev live outside the disks: a disk
    // that needs one says so through its own content, and nodev (tmpfs) puts nothing on disk.
    devices.members(path)?;
    let disk_path = path.key("disk");
    let disks = devices.get("disk").ok_or_else(|| Error::NoDisk {
        path: disk_path.clone(),
    })?;
    let members = disks.members(&disk_path)?;
    if members.is_empty() {
        return Err(Error::NoDisk { path: disk_path });
    }
    if members.len() > MAX_DISKS {
        return Err(Error::invalid(
            &disk_path,
            format!("{} disks; at most {MAX_DISKS} are supported", members.len()),
        ));
    }
    let mut devices = Devices::default();
    let vpath = path.key("lvm_vg");
    if let Some(v) = devices_of(devices_src.get("lvm_vg"), &vpath)? {
        for (k, vg) in v {
            devices
                .vgs
                .push((k.clone(), parse_vg(k, vg, &vpath.key(k))));
        }
    }
    let mpath = path.key("mdadm");
    if let Some(v) = devices_of(devices_src.get("mdadm"), &mpath)? {
        for (k, md) in v {
            devices
                .mds
                .push((k.clone(), parse_md(k, md, &mpath.key(k))));
        }
    }
    Ok(Layout {
        disks: members
            .iter()
            .map(|(name, d)| (name.clone(), parse_disk(name, d, &disk_path.key(name))))
            .collect(),
        devices,
    })
}

fn parse_disk(key: &str, d: &Json, path: &JsonPath) -> Result<DiskSpec> {
    d.members(path)?;
    if let Some(t) = d.get_str("type", path)? {
        if t != "disk" {
            return Err(Error::invalid(
                &path.key("type"),
                format!("expected \"disk\", found {t:?}"),
            ));
        }
    }
    // disko: name defaults to the attribute name with "/" replaced by "_".
    let name = match d.get_str("name", path)? {
        Some(n) => n.to_string(),
        None => key.replace('/', "_"),
    };
    let image_size = Some(
        d.get_str("imageSize", path)?
            .map(|s| parse_image_size(s, &path.key("imageSize")))
            .transpose()?
            .unwrap_or(DEFAULT_IMAGE_SIZE),
    );
    let cpath = path.key("content");
    let content = match d.get("content") {
        None | Some(Json::Null) => {
            return Err(Error::unsupported(path, "a disk without content"));
        }
        Some(c) => c,
    };
    content.members(&cpath)?;
    match content.get_str("type", &cpath)? {
        Some("gpt") => {}
        Some("table") => return parse_table(key, name, image_size, content, &cpath, d, path),
        Some(t) => return Err(content_type_error(t, &cpath.key("type"))),
        None => return Err(Error::invalid(&cpath.key("type"), "missing content type")),
    }
    let efi_gpt_partition_first = match content.get("efiGptPartitionFirst") {
        None | Some(Json::Null) => true,
        Some(Json::Bool(b)) => *b,
        Some(other) => {
            return Err(Error::invalid(
                &cpath.key("efiGptPartitionFirst"),
                format!("expected a boolean, found {}", other.kind()),
            ))
        }
    };
    let ppath = cpath.key("partitions");
    let parts = match content.get("partitions") {
        None | Some(Json::Null) => &[][..],
        Some(p) => p.members(&ppath)?,
    };
    if parts.len() > GPT_ENTRIES as usize {
        return Err(Error::invalid(
            &ppath,
            format!("{} partitions; a GPT holds {GPT_ENTRIES}", parts.len()),
        ));
    }
    let mut partitions = parts
        .iter()
        .map(|(k, v)| parse_partition(&name, k, v, &ppath.key(k)))
        .collect::<Result<Vec<_>>>()?;
    order_partitions(&mut partitions)?;
    let mut canonical = String::new();
    d.canonical(&mut canonical);
    Ok(DiskSpec {
        key: key.to_string(),
        name,
        path: path.clone(),
        image_size,
        efi_gpt_partition_first,
        parted: false,
        partitions,
        canonical,
    })
}

/// disko's legacy `type = "table"`: a list of partitions made with parted, in list order.
fn parse_table(
    key: &str,
    name: String,
    image_size: Option<u64>,
    content: &Json,
    cpath: &JsonPath,
    d: &Json,
    path: &JsonPath,
) -> Result<DiskSpec> {
    match content.get_str("format", cpath)?.unwrap_or("gpt") {
        "gpt" => {}
        f => {
            return Err(Error::unsupported(
                &cpath.key("format"),
                format!("a legacy table with format {f:?} (vmdisk writes its gpt format)"),
            ))
        }
    }
    let ppath = cpath.key("partitions");
    let items = match content.get("partitions") {
        None | Some(Json::Null) => &[][..],
        Some(Json::Arr(a)) => a.as_slice(),
        Some(other) => {
            return Err(Error::invalid(
                &ppath,
                format!("expected a list of partitions, found {}", other.kind()),
            ))
        }
    };
    if items.len() > GPT_ENTRIES as usize {
        return Err(Error::invalid(
            &ppath,
            format!("{} partitions; a GPT holds {GPT_ENTRIES}", items.len()),
        ));
    }
    let mut partitions = Vec::with_capacity(items.len());
    for (i, v) in items.iter().enumerate() {
        let p = ppath.index(i);
        v.members(&p)?;
        let content = parse_content(v.get("content"), &p.key("content"), false)?;
        let pname = v.get_str("name", &p)?.unwrap_or("").to_string();
        let mut type_code = match v.get_str("fs-type", &p)? {
            Some("linux-swap" | "linux-swap(v1)" | "linux-swap(new)") => "8200",
            Some("fat16" | "fat32" | "ntfs") => "0700",
            _ => "8300",
        };
        let flag = |v: &Json, k: &str| -> Result<bool> {
            match v.get(k) {
                None | Some(Json::Null) => Ok(false),
                Some(Json::Bool(b)) => Ok(*b),
                Some(o) => Err(Error::invalid(
                    &p.key(k),
                    format!("expected a boolean, found {}", o.kind()),
                )),
            }
        };
        let mut attributes = 0u64;
        if flag(v, "bootable")? {
            type_code = "EF00";
        }
        for (j, f) in v.get_str_list("flags", &p)?.iter().enumerate() {
            match f.as_str() {
                "boot" | "esp" => type_code = "EF00",
                "bios_grub" => type_code = "EF02",
                "lvm" => type_code = "8E00",
                "raid" => type_code = "FD00",
                "swap" => type_code = "8200",
                "legacy_boot" => attributes |= 1 << 2,
                other => {
                    return Err(Error::unsupported(
                        &p.key("flags").index(j),
                        format!("parted flag {other:?} (vmdisk knows boot, esp, bios_grub, lvm, raid, swap, legacy_boot)"),
                    ))
                }
            }
        }
        let start =
            crate::legacy::parse_parted(v.get_str("start", &p)?.unwrap_or("0%"), &p.key("start"))?;
        let end =
            crate::legacy::parse_parted(v.get_str("end", &p)?.unwrap_or("100%"), &p.key("end"))?;
        let label = crate::legacy::hex_escape(&pname);
        if label.encode_utf16().count() > GPT_NAME_UNITS {
            return Err(Error::invalid(
                &p.key("name"),
                format!(
                    "GPT partition name {label:?} is longer than {GPT_NAME_UNITS} UTF-16 units"
                ),
            ));
        }
        partitions.push(PartitionSpec {
            key: (i + 1).to_string(),
            name: pname,
            path: p.clone(),
            // i < GPT_ENTRIES (checked above).
            number: i as u32 + 1,
            priority: i as i64,
            label,
            type_code: type_code.to_string(),
            type_guid: type_code_guid(type_code).unwrap_or(Guid::NIL),
            guid: None,
            size: None,
            start: Position::Default,
            end: Position::Default,
            end_is_default: false,
            hybrid: None,
            parted: Some((start, end)),
            attributes,
            alignment: 0,
            content,
        });
    }
    let mut canonical = String::new();
    d.canonical(&mut canonical);
    Ok(DiskSpec {
        key: key.to_string(),
        name,
        path: path.clone(),
        image_size,
        efi_gpt_partition_first: true,
        parted: true,
        partitions,
        canonical,
    })
}

/// disko order: priority, ties by attribute name in byte order; numbers from `_index` or the
/// position in that order. Checks unique names, labels and numbers.
pub(crate) fn order_partitions(parts: &mut [PartitionSpec]) -> Result<()> {
    parts.sort_by(|a, b| {
        a.priority
            .cmp(&b.priority)
            .then_with(|| a.key.as_bytes().cmp(b.key.as_bytes()))
    });
    for (i, p) in parts.iter_mut().enumerate() {
        if p.number == 0 {
            // i < GPT_ENTRIES (checked by the caller), so this fits.
            p.number = i as u32 + 1;
        }
    }
    for (i, p) in parts.iter().enumerate() {
        for q in &parts[..i] {
            if q.name == p.name {
                return Err(Error::invalid(
                    &p.path.key("name"),
                    format!(
                        "duplicate partition name {:?} (also used by {})",
                        p.name, q.path
                    ),
                ));
            }
            if q.label == p.label {
                return Err(Error::invalid(
                    &p.path.key("label"),
                    format!(
                        "duplicate GPT partition name {:?} (also used by {})",
                        p.label, q.path
                    ),
                ));
            }
            if q.number == p.number {
                return Err(Error::invalid(
                    &p.path.key("_index"),
                    format!(
                        "duplicate partition number {} (also used by {})",
                        p.number, q.path
                    ),
                ));
            }
            if let (Some(a), Some(b)) = (p.guid, q.guid) {
                if a == b {
                    return Err(Error::invalid(
                        &p.path.key("uuid"),
                        format!("duplicate partition GUID {a} (also used by {})", q.path),
                    ));
                }
            }
        }
    }
    Ok(())
}

fn parse_partition(disk: &str, key: &str, v: &Json, path: &JsonPath) -> Result<PartitionSpec> {
    parse_partition_with(&format!("disk-{disk}"), key, v, path, false)
}

/// A partition of a GPT on an array (made in the builder VM); its default GPT name is
/// `PREFIX-NAME` (`mdadm-raid1-primary`).
pub(crate) fn parse_partition_in(
    prefix: &str,
    key: &str,
    v: &Json,
    path: &JsonPath,
) -> Result<PartitionSpec> {
    parse_partition_with(prefix, key, v, path, true)
}

fn parse_partition_with(
    prefix: &str,
    key: &str,
    v: &Json,
    path: &JsonPath,
    in_vm: bool,
) -> Result<PartitionSpec> {
    v.members(path)?;
    let content = parse_content(v.get("content"), &path.key("content"), in_vm)?;
    // disko's default type: 8200 for swap content, 8300 otherwise.
    let default_type = if matches!(content, Content::Swap(_)) {
        "8200"
    } else {
        "8300"
    };
    let type_code = v.get_str("type", path)?.unwrap_or(default_type).to_string();
    let type_guid = parse_type(&type_code, &path.key("type"))?;
    let name = v.get_str("name", path)?.unwrap_or(key).to_string();
    let label = match v.get_str("label", path)? {
        Some(l) => l.to_string(),
        None => prefixed_label(prefix, &name),
    };
    let label_path = path.key("label");
    if label.encode_utf16().count() > GPT_NAME_UNITS {
        return Err(Error::invalid(
            &label_path,
            format!("GPT partition name {label:?} is longer than {GPT_NAME_UNITS} UTF-16 units"),
        ));
    }
    if label.contains('\0') {
        return Err(Error::invalid(
            &label_path,
            "GPT partition name contains NUL",
        ));
    }
    let guid = v
        .get_str("uuid", path)?
        .map(|s| {
            s.parse::<Guid>()
                .map_err(|_| Error::invalid(&path.key("uuid"), format!("{s:?} is not a GUID")))
        })
        .transpose()?;
    let size_text = v.get_str("size", path)?;
    let size = size_text
        .map(|s| parse_size(s, &path.key("size")))
        .transpose()?;
    let start_text = v.get_str("start", path)?.unwrap_or("0");
    let start = parse_position(start_text, &path.key("start"))?;
    let end_text = v.get_str("end", path)?;
    let end_is_default = end_text.is_none();
    let end = match (end_text, size) {
        (Some(e), _) => parse_position(e, &path.key("end"))?,
        (None, Some(SizeSpec::Rest)) => Position::Default,
        (None, Some(SizeSpec::Bytes(b))) if b / SECTOR > 0 => Position::Plus(b / SECTOR),
        // disko's default size "0" gives end "+0": sgdisk's default end.
        (None, _) => Position::Default,
    };
    // disko: alignment defaults to 1 when start or end is written in sectors ("2048s").
    let sector_units = in_sector_units(start_text) || end_text.is_some_and(in_sector_units);
    let priority = match v.get_int("priority", path)? {
        Some(p) => p,
        None if size == Some(SizeSpec::Rest) => PRIORITY_REST,
        None if type_guid == type_code_guid("EF02").unwrap_or(Guid::NIL) => PRIORITY_BIOS_BOOT,
        None => PRIORITY_DEFAULT,
    };
    let number = match v.get_int("_index", path)? {
        None => 0,
        Some(i) if (1..=i64::from(GPT_ENTRIES)).contains(&i) => i as u32,
        Some(i) => {
            return Err(Error::invalid(
                &path.key("_index"),
                format!("partition number {i} is outside 1..={GPT_ENTRIES}"),
            ))
        }
    };
    let mut attributes = 0u64;
    if let Some(a) = v.get("attributes") {
        let apath = path.key("attributes");
        match a {
            Json::Null => {}
            Json::Arr(items) => {
                for (i, item) in items.iter().enumerate() {
                    match item {
                        Json::Num(n) if n.as_u64().is_some_and(|b| b < 64) => {
                            attributes |= 1 << n.as_u64().unwrap_or(0);
                        }
                        _ => {
                            return Err(Error::invalid(
                                &apath.index(i),
                                "expected a GPT attribute bit number 0..=63",
                            ))
                        }
                    }
                }
            }
            other => {
                return Err(Error::invalid(
                    &apath,
                    format!("expected a list of bit numbers, found {}", other.kind()),
                ))
            }
        }
    }
    let alignment = match v.get_int("alignment", path)? {
        None if sector_units => 1,
        None | Some(0) => 0,
        Some(a) if (1..=(1 << 24)).contains(&a) => a as u64,
        Some(a) => {
            return Err(Error::invalid(
                &path.key("alignment"),
                format!("alignment {a} is outside 0..={}", 1 << 24),
            ))
        }
    };
    let hybrid = match v.get("hybrid") {
        None | Some(Json::Null) => None,
        Some(h) => Some(parse_hybrid(h, &path.key("hybrid"))?),
    };
    Ok(PartitionSpec {
        key: key.to_string(),
        name,
        path: path.clone(),
        number,
        priority,
        label,
        type_code,
        type_guid,
        guid,
        size,
        start,
        end,
        end_is_default,
        hybrid,
        parted: None,
        attributes,
        alignment,
        content,
    })
}

/// disko's default GPT name: `disk-DISK-PART`, or, when that is longer than 36 characters,
/// the first 36 hex digits of its SHA-256 (lib/types/gpt.nix).
pub fn default_label(disk: &str, part: &str) -> String {
    prefixed_label(&format!("disk-{disk}"), part)
}

/// `PREFIX-PART`, hashed as [`default_label`] hashes.
fn prefixed_label(prefix: &str, part: &str) -> String {
    use sha2::{Digest, Sha256};
    let label = format!("{prefix}-{part}");
    // Nix's stringLength counts bytes.
    if label.len() > GPT_NAME_UNITS {
        let digest = Sha256::digest(label.as_bytes());
        digest
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
            .chars()
            .take(GPT_NAME_UNITS)
            .collect()
    } else {
        label
    }
}

fn parse_hybrid(h: &Json, path: &JsonPath) -> Result<HybridSpec> {
    h.members(path)?;
    let mbr_type = match h.get_str("mbrPartitionType", path)? {
        None => None,
        Some(t) => {
            let hex = t.strip_prefix("0x").or(t.strip_prefix("0X")).unwrap_or(t);
            Some(u8::from_str_radix(hex, 16).map_err(|_| {
                Error::invalid(
                    &path.key("mbrPartitionType"),
                    format!("{t:?} is not an MBR type byte (e.g. 0x0c)"),
                )
            })?)
        }
    };
    let bootable = match h.get("mbrBootableFlag") {
        None | Some(Json::Null) => false,
        Some(Json::Bool(b)) => *b,
        Some(other) => {
            return Err(Error::invalid(
                &path.key("mbrBootableFlag"),
                format!("expected a boolean, found {}", other.kind()),
            ))
        }
    };
    Ok(HybridSpec { mbr_type, bootable })
}

fn parse_type(code: &str, path: &JsonPath) -> Result<Guid> {
    if code.len() == 4 && code.bytes().all(|b| b.is_ascii_hexdigit()) {
        return type_code_guid(code).ok_or_else(|| {
            Error::invalid(
                path,
                format!(
                    "sgdisk has no type code {code:?} (it would silently use 8300, Linux \
                     filesystem); see `sgdisk -L`, or give the type GUID"
                ),
            )
        });
    }
    code.parse::<Guid>().map_err(|_| {
        Error::invalid(
            path,
            format!("{code:?} is neither a 4-digit type code nor a GUID"),
        )
    })
}

/// What goes into a partition. `in_vm`: it is made in the builder VM anyway (it sits in a
/// LUKS, LVM or md device), so filesystems may span devices and carry subvolumes.
fn parse_content(c: Option<&Json>, path: &JsonPath, in_vm: bool) -> Result<Content> {
    let content = parse_content_inner(c, path)?;
    // What the host cannot make goes to the builder VM: btrfs subvolumes and swap files (made
    // on the mounted filesystem) and filesystems over several devices.
    let vm_only = match &content {
        Content::Filesystem(fs) => {
            !fs.subvolumes.is_empty()
                || !fs.swapfiles.is_empty()
                || fs
                    .extra_args
                    .iter()
                    .any(|a| a.split_whitespace().any(|w| w.starts_with("/dev/")))
        }
        _ => false,
    };
    if vm_only && !in_vm {
        return Ok(Content::Kernel(Box::new(Stack::Made { content })));
    }
    Ok(content)
}

/// [`parse_content`] for a filesystem or swap the builder VM makes.
pub(crate) fn parse_content_in_vm(c: Option<&Json>, path: &JsonPath) -> Result<Content> {
    parse_content(c, path, true)
}

fn parse_swapfiles(sw: Option<&Json>, path: &JsonPath) -> Result<Vec<crate::model::SwapFile>> {
    let Some(sw) = sw else {
        return Ok(Vec::new());
    };
    if matches!(sw, Json::Null) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for (k, f) in sw.members(path)? {
        let p = path.key(k);
        f.members(&p)?;
        let rel = f
            .get_str("path", &p)?
            .unwrap_or(k)
            .trim_start_matches('/')
            .to_string();
        if rel.is_empty()
            || rel
                .split('/')
                .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(Error::invalid(
                &p.key("path"),
                format!("{rel:?} is not a swap file path"),
            ));
        }
        let size = f.get_str("size", &p)?.unwrap_or("0");
        if !size.bytes().all(|b| b.is_ascii_alphanumeric()) || size.is_empty() {
            return Err(Error::invalid(
                &p.key("size"),
                format!("{size:?} is not a swap file size"),
            ));
        }
        out.push(crate::model::SwapFile {
            path: rel,
            size: size.to_string(),
        });
    }
    Ok(out)
}

/// A content object and its `type`; None for an absent or null content.
fn content_object<'a>(c: Option<&'a Json>, path: &JsonPath) -> Result<Option<(&'a Json, &'a str)>> {
    let c = match c {
        None | Some(Json::Null) => return Ok(None),
        Some(c) => c,
    };
    c.members(path)?;
    let t = c
        .get_str("type", path)?
        .ok_or_else(|| Error::invalid(&path.key("type"), "missing content type"))?;
    Ok(Some((c, t)))
}

fn parse_content_inner(c: Option<&Json>, path: &JsonPath) -> Result<Content> {
    let Some((c, t)) = content_object(c, path)? else {
        return Ok(Content::None);
    };
    let tpath = path.key("type");
    let extra_args = c.get_str_list("extraArgs", path)?;
    let apath = path.key("extraArgs");
    match t {
        "filesystem" => {
            let fpath = path.key("format");
            let format = match c.get_str("format", path)? {
                Some("vfat") | Some("fat32") => FsFormat::Vfat,
                Some("ext4") => FsFormat::Ext4,
                Some("ext3") => FsFormat::Ext3,
                Some("ext2") => FsFormat::Ext2,
                Some("btrfs") => FsFormat::Btrfs,
                Some("xfs") => FsFormat::Xfs,
                Some("f2fs") => FsFormat::F2fs,
                Some(f) => {
                    return Err(Error::unsupported(
                        &fpath,
                        format!("filesystem format {f:?}"),
                    ))
                }
                None => return Err(Error::invalid(&fpath, "missing filesystem format")),
            };
            let mut fs = FsSpec {
                format,
                extra_args,
                mountpoint: c.get_str("mountpoint", path)?.map(str::to_string),
                fat_label: None,
                fat_volume_id: None,
                fat_bits: None,
                subvolumes: Vec::new(),
                swapfiles: Vec::new(),
            };
            match format {
                FsFormat::Vfat => parse_fat_args(&mut fs, &apath)?,
                f if f.is_ext() => check_mke2fs_args(&fs.extra_args, &apath)?,
                _ => {}
            }
            Ok(Content::Filesystem(fs))
        }
        "btrfs" => {
            let swapfiles = parse_swapfiles(c.get("swap"), &path.key("swap"))?;
            let mut subvolumes = Vec::new();
            if let Some(sv) = c.get("subvolumes") {
                let spath = path.key("subvolumes");
                for (k, s) in sv.members(&spath)? {
                    let p = spath.key(k);
                    s.members(&p)?;
                    let sub_swap = parse_swapfiles(s.get("swap"), &p.key("swap"))?;
                    let name = s.get_str("name", &p)?.unwrap_or(k).to_string();
                    let rel = name.trim_start_matches('/');
                    if rel.is_empty()
                        || rel
                            .split('/')
                            .any(|c| c.is_empty() || c == "." || c == "..")
                    {
                        return Err(Error::invalid(
                            &p,
                            format!("{name:?} is not a subvolume path"),
                        ));
                    }
                    subvolumes.push(Subvolume {
                        name: rel.to_string(),
                        mountpoint: s.get_str("mountpoint", &p)?.map(str::to_string),
                        path: p,
                        swapfiles: sub_swap,
                    });
                }
            }
            subvolumes.sort_by(|a, b| a.name.cmp(&b.name));
            Ok(Content::Filesystem(FsSpec {
                format: FsFormat::Btrfs,
                extra_args,
                mountpoint: c.get_str("mountpoint", path)?.map(str::to_string),
                fat_label: None,
                fat_volume_id: None,
                fat_bits: None,
                subvolumes,
                swapfiles,
            }))
        }
        "swap" => {
            let mut swap = SwapSpec {
                label: None,
                uuid: None,
                random_encryption: c.get("randomEncryption") == Some(&Json::Bool(true)),
            };
            let mut args = extra_args.iter().enumerate();
            while let Some((i, a)) = args.next() {
                let mut value = || {
                    args.next().map(|(_, v)| v.clone()).ok_or_else(|| {
                        Error::invalid(&apath.index(i), format!("{a} needs a value"))
                    })
                };
                match a.as_str() {
                    "-L" | "--label" => {
                        let l = value()?;
                        if l.len() > 16 {
                            return Err(Error::invalid(
                                &apath.index(i + 1),
                                "a swap label holds at most 16 bytes",
                            ));
                        }
                        swap.label = Some(l);
                    }
                    "-U" | "--uuid" => {
                        let u = value()?;
                        swap.uuid = Some(u.parse().map_err(|_| {
                            Error::invalid(&apath.index(i + 1), format!("{u:?} is not a UUID"))
                        })?);
                    }
                    other => {
                        return Err(Error::unsupported(
                            &apath.index(i),
                            format!("mkswap option {other:?} (only -L and -U are)"),
                        ))
                    }
                }
            }
            Ok(Content::Swap(swap))
        }
        "luks" | "lvm_pv" | "mdraid" => Ok(Content::Kernel(Box::new(parse_stack(
            Some(c),
            path,
            "",
            false,
        )?))),
        other => Err(content_type_error(other, &tpath)),
    }
}

/// mkfs.fat options our FAT writer honours.
fn parse_fat_args(fs: &mut FsSpec, apath: &JsonPath) -> Result<()> {
    let args = fs.extra_args.clone();
    let mut it = args.iter().enumerate();
    while let Some((i, a)) = it.next() {
        let mut value = || {
            it.next()
                .map(|(_, v)| v.clone())
                .ok_or_else(|| Error::invalid(&apath.index(i), format!("{a} needs a value")))
        };
        match a.as_str() {
            "-n" => {
                let l = value()?;
                crate::fat::names::check_label(&l)
                    .map_err(|rule| Error::invalid(&apath.index(i + 1), rule))?;
                fs.fat_label = Some(l);
            }
            "-i" => {
                let v = value()?;
                fs.fat_volume_id = Some(u32::from_str_radix(&v, 16).map_err(|_| {
                    Error::invalid(&apath.index(i + 1), "volume id must be 8 hex digits")
                })?);
            }
            "-F" => {
                fs.fat_bits = Some(match value()?.as_str() {
                    "12" => 12,
                    "16" => 16,
                    "32" => 32,
                    v => {
                        return Err(Error::invalid(
                            &apath.index(i + 1),
                            format!("-F {v}: mkfs.fat takes 12, 16 or 32"),
                        ))
                    }
                });
            }
            other => {
                return Err(Error::unsupported(
                    &apath.index(i),
                    format!("mkfs.fat option {other:?} (only -n, -i and -F are)"),
                ))
            }
        }
    }
    Ok(())
}

/// Refuse mke2fs arguments that would break the image or its reproducibility.
fn check_mke2fs_args(args: &[String], apath: &JsonPath) -> Result<()> {
    for (i, a) in args.iter().enumerate() {
        if !a.starts_with('-') && (i == 0 || !takes_value(&args[i - 1])) {
            return Err(Error::invalid(
                &apath.index(i),
                format!("{a:?} would be taken as the device or size by mke2fs"),
            ));
        }
        if matches!(a.as_str(), "-n" | "-S" | "-c" | "-l" | "-d") {
            return Err(Error::unsupported(
                &apath.index(i),
                format!("mke2fs option {a:?} here"),
            ));
        }
    }
    Ok(())
}

/// mke2fs options that take a separate value.
fn takes_value(opt: &str) -> bool {
    matches!(
        opt,
        "-b" | "-C"
            | "-E"
            | "-e"
            | "-G"
            | "-g"
            | "-I"
            | "-i"
            | "-J"
            | "-L"
            | "-M"
            | "-m"
            | "-N"
            | "-O"
            | "-o"
            | "-r"
            | "-T"
            | "-t"
            | "-U"
            | "-z"
    )
}

/// Pick the disk to build from a parsed layout (see [`Layout::select`]).
pub fn select_disk(layout: Layout, name: Option<&str>) -> Result<DiskSpec> {
    layout.select(name)
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
    let Some((c, t)) = content_object(c, path)? else {
        return Ok(Stack::Empty);
    };
    let tpath = path.key("type");
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
