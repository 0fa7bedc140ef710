//! disko JSON -> validated [`DiskSpec`]s, following disko's gpt/filesystem/swap semantics.

use crate::error::{Error, JsonPath, Result};
use crate::guid::{type_code_guid, Guid};
use crate::json::Json;
use crate::model::{
    Content, DiskSpec, FsFormat, FsSpec, PartitionSpec, SwapSpec, GPT_ENTRIES, GPT_NAME_UNITS,
    PRIORITY_BIOS_BOOT, PRIORITY_DEFAULT, PRIORITY_REST,
};
use crate::size::{parse_image_size, parse_position, parse_size, Position, SizeSpec, SECTOR};

/// Cap on disks in one layout (a layout is hand-written; this only bounds work).
pub const MAX_DISKS: usize = 256;

/// Content types disko has that vmdisk does not build yet.
const UNSUPPORTED_CONTENT: &[&str] = &[
    "luks", "lvm_pv", "btrfs", "zfs", "mdraid", "bcachefs", "nodev", "bcache", "verity", "table",
];

/// Top-level device kinds besides `disk`; a non-empty one is refused.
const OTHER_DEVICE_KINDS: &[&str] = &[
    "lvm_vg",
    "mdadm",
    "zpool",
    "nodev",
    "bcachefs_filesystems",
    "bcachefs",
];

/// Parse a disko layout: `nix eval --json` output (`{"disko":{"devices":{"disk":…}}}`), an
/// evaluated `disko.devices` (`{"disk":…}`, `_`-keys other than `_index` ignored), or a
/// single disk object (`{"type":"disk",…}`).
pub fn parse(json: &str) -> Result<Vec<DiskSpec>> {
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
    match doc.get_str("type", &root)? {
        Some("disk") => {
            let name = doc
                .get_str("name", &root)?
                .or(doc.get_str("imageName", &root)?)
                .unwrap_or("main")
                .to_string();
            Ok(vec![parse_disk(&name, &doc, &root)?])
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
    if UNSUPPORTED_CONTENT.contains(&t) {
        Error::unsupported(path, format!("content type {t:?}"))
    } else {
        Error::invalid(path, format!("unknown content type {t:?}"))
    }
}

fn parse_devices(devices: &Json, path: &JsonPath) -> Result<Vec<DiskSpec>> {
    let members = devices.members(path)?;
    for (k, v) in members {
        if OTHER_DEVICE_KINDS.contains(&k.as_str()) {
            let p = path.key(k);
            if let Some((name, _)) = v.members(&p)?.first() {
                return Err(Error::unsupported(&p.key(name), format!("{k} device")));
            }
        }
    }
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
    members
        .iter()
        .map(|(name, d)| parse_disk(name, d, &disk_path.key(name)))
        .collect()
}

fn parse_disk(name: &str, d: &Json, path: &JsonPath) -> Result<DiskSpec> {
    d.members(path)?;
    if let Some(t) = d.get_str("type", path)? {
        if t != "disk" {
            return Err(Error::invalid(
                &path.key("type"),
                format!("expected \"disk\", found {t:?}"),
            ));
        }
    }
    let image_size = d
        .get_str("imageSize", path)?
        .map(|s| parse_image_size(s, &path.key("imageSize")))
        .transpose()?;
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
        Some(t) => return Err(content_type_error(t, &cpath.key("type"))),
        None => return Err(Error::invalid(&cpath.key("type"), "missing content type")),
    }
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
        .map(|(k, v)| parse_partition(name, k, v, &ppath.key(k)))
        .collect::<Result<Vec<_>>>()?;
    order_partitions(&mut partitions)?;
    let mut canonical = String::new();
    d.canonical(&mut canonical);
    Ok(DiskSpec {
        name: name.to_string(),
        path: path.clone(),
        image_size,
        partitions,
        canonical,
    })
}

/// disko order: priority, ties by attribute name in byte order; numbers from `_index` or the
/// position in that order. Checks unique names, labels and numbers.
fn order_partitions(parts: &mut [PartitionSpec]) -> Result<()> {
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
    v.members(path)?;
    let content = parse_content(v.get("content"), &path.key("content"))?;
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
        None => format!("disk-{disk}-{name}"),
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
    let start = parse_position(v.get_str("start", path)?.unwrap_or("0"), &path.key("start"))?;
    let end = match (v.get_str("end", path)?, size) {
        (Some(e), _) => parse_position(e, &path.key("end"))?,
        (None, Some(SizeSpec::Rest)) => Position::Minus(0),
        (None, Some(SizeSpec::Bytes(b))) => Position::Plus(b / SECTOR),
        (None, None) => Position::Plus(0),
    };
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
        None | Some(0) => 0,
        Some(a) if (1..=(1 << 24)).contains(&a) => a as u64,
        Some(a) => {
            return Err(Error::invalid(
                &path.key("alignment"),
                format!("alignment {a} is outside 0..={}", 1 << 24),
            ))
        }
    };
    match v.get("hybrid") {
        None | Some(Json::Null) => {}
        Some(_) => return Err(Error::unsupported(&path.key("hybrid"), "a hybrid MBR")),
    }
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
        attributes,
        alignment,
        content,
    })
}

fn parse_type(code: &str, path: &JsonPath) -> Result<Guid> {
    if code.len() == 4 && code.bytes().all(|b| b.is_ascii_hexdigit()) {
        return type_code_guid(code).ok_or_else(|| {
            Error::unsupported(
                path,
                format!(
                    "type code {code:?} (use EF00, EF02, 8300, 8200, 8E00, FD00 or a full GUID)"
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

fn parse_content(c: Option<&Json>, path: &JsonPath) -> Result<Content> {
    let c = match c {
        None | Some(Json::Null) => return Ok(Content::None),
        Some(c) => c,
    };
    c.members(path)?;
    let tpath = path.key("type");
    let t = c
        .get_str("type", path)?
        .ok_or_else(|| Error::invalid(&tpath, "missing content type"))?;
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
            };
            if format == FsFormat::Vfat {
                parse_fat_args(&mut fs, &apath)?;
            } else {
                check_mke2fs_args(&fs.extra_args, &apath)?;
            }
            Ok(Content::Filesystem(fs))
        }
        "swap" => {
            let mut swap = SwapSpec {
                label: None,
                uuid: None,
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
            if c.get("randomEncryption") == Some(&Json::Bool(true)) {
                return Err(Error::unsupported(
                    &path.key("randomEncryption"),
                    "random swap encryption",
                ));
            }
            Ok(Content::Swap(swap))
        }
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
                if value()? != "32" {
                    return Err(Error::unsupported(
                        &apath.index(i + 1),
                        "FAT12/FAT16 (vmdisk writes FAT32)",
                    ));
                }
            }
            other => {
                return Err(Error::unsupported(
                    &apath.index(i),
                    format!("mkfs.fat option {other:?} (only -n, -i and -F 32 are)"),
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

/// Pick the disk to build: `name`, or the only one.
pub fn select_disk<'a>(disks: &'a [DiskSpec], name: Option<&str>) -> Result<&'a DiskSpec> {
    let available = || {
        disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match name {
        Some(n) => disks
            .iter()
            .find(|d| d.name == n)
            .ok_or_else(|| Error::NoSuchDisk {
                name: n.to_string(),
                available: available(),
            }),
        None => match disks {
            [only] => Ok(only),
            [] => Err(Error::NoDisk {
                path: JsonPath::root(),
            }),
            _ => Err(Error::AmbiguousDisk {
                available: available(),
            }),
        },
    }
}
