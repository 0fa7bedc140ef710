//! Pure planning: sector ranges (sgdisk semantics), GUIDs and filesystem ids from the seed.

use std::path::PathBuf;

use crate::error::{Error, JsonPath, Result};
use crate::guid::Guid;
use crate::model::{Content, DiskSpec, FsFormat, PartitionSpec, PlanOptions};
use crate::size::{Position, SizeSpec, SECTOR};
use crate::tree::{Sources, Tree};
use crate::usage::Usage;

/// sgdisk's default partition alignment: 2048 sectors (1 MiB).
pub const DEFAULT_ALIGNMENT: u64 = 2048;
/// Sectors a GPT with 128 entries of 128 bytes needs at each end (header + 32 entry sectors),
/// plus the protective MBR at the start.
pub const GPT_HEAD_SECTORS: u64 = 34;
pub const GPT_TAIL_SECTORS: u64 = 33;
/// Largest disk vmdisk plans (1 EiB): keeps every sector computation far from overflow.
pub const MAX_DISK_BYTES: u64 = 1 << 60;
/// Smallest swap area Linux `swapon` accepts: 10 pages.
pub const MIN_SWAP_BYTES: u64 = 10 * crate::swap::PAGE;
/// mke2fs refuses filesystems much smaller than this.
pub const MIN_EXT_BYTES: u64 = 1 << 20;
/// Rounds of growing the disk that `measure` tries before giving up.
const MEASURE_ROUNDS: usize = 64;
/// Sizes `measure` returns are whole MiB.
const MIB: u64 = 1 << 20;

/// The whole disk, ready to write.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Plan {
    pub disk_name: String,
    pub disk_path: JsonPath,
    pub disk_size: u64,
    pub sector_size: u64,
    pub disk_guid: Guid,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// In creation (disko) order.
    pub partitions: Vec<PlannedPartition>,
}

/// One partition with its place on disk.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PlannedPartition {
    pub number: u32,
    pub key: String,
    pub name: String,
    pub path: JsonPath,
    /// GPT partition name.
    pub label: String,
    pub type_code: String,
    pub type_guid: Guid,
    pub guid: Guid,
    pub first_lba: u64,
    pub last_lba: u64,
    pub attributes: u64,
    pub content: PlannedContent,
}

impl PlannedPartition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    pub fn len(&self) -> u64 {
        (self.last_lba - self.first_lba + 1) * SECTOR
    }

    pub fn is_empty(&self) -> bool {
        false
    }
}

/// What `apply` puts into a partition; `copy_in` names the scanned tree's directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum PlannedContent {
    None,
    Fat {
        label: Option<String>,
        volume_id: u32,
        copy_in: Option<PathBuf>,
    },
    Ext {
        format: FsFormat,
        uuid: Guid,
        hash_seed: Guid,
        extra_args: Vec<String>,
        copy_in: Option<PathBuf>,
    },
    Swap {
        label: Option<String>,
        uuid: Guid,
    },
}

/// The seed bytes for a disk.
fn seed_bytes(disk: &DiskSpec, opts: &PlanOptions) -> Vec<u8> {
    match &opts.seed {
        Some(s) => format!("seed:{s}").into_bytes(),
        None => format!("layout:{}", disk.canonical).into_bytes(),
    }
}

/// Plan `disk` on a device of `disk_size` bytes (None: the layout's `imageSize`), with the
/// trees `scan_copy_in` scanned. Pure: no file is read.
pub fn plan(
    disk: &DiskSpec,
    disk_size: Option<u64>,
    opts: &PlanOptions,
    sources: &Sources,
) -> Result<Plan> {
    let size = disk_size
        .or(disk.image_size)
        .ok_or_else(|| Error::NoDiskSize {
            path: disk.path.clone(),
        })?;
    let ranges = allocate(disk, size).map_err(FitError::into_error)?;
    let seed = seed_bytes(disk, opts);
    let tag = |what: &str, p: &PartitionSpec| format!("{what}:{}:{}", disk.name, p.key);
    let mut partitions = Vec::with_capacity(disk.partitions.len());
    for (p, &(first, last)) in disk.partitions.iter().zip(&ranges) {
        let len = (last - first + 1) * SECTOR;
        let src = sources.get(p.number).map(|t| t.dir.clone());
        let content = match &p.content {
            Content::None => PlannedContent::None,
            Content::Filesystem(fs) if fs.format == FsFormat::Vfat => {
                crate::fat::Geometry::for_size(len, first).map_err(|rule| {
                    Error::invalid(&size_path(p), format!("{} bytes: {rule}", len))
                })?;
                let id = Guid::derive(&seed, &tag("fat-volume-id", p)).0;
                PlannedContent::Fat {
                    label: fs.fat_label.clone(),
                    volume_id: fs
                        .fat_volume_id
                        .unwrap_or(u32::from_le_bytes([id[0], id[1], id[2], id[3]])),
                    copy_in: src,
                }
            }
            Content::Filesystem(fs) => {
                if len < MIN_EXT_BYTES {
                    return Err(Error::invalid(
                        &size_path(p),
                        format!("{len} bytes is too small for {}", fs.format.name()),
                    ));
                }
                PlannedContent::Ext {
                    format: fs.format,
                    uuid: Guid::derive(&seed, &tag("ext-uuid", p)),
                    hash_seed: Guid::derive(&seed, &tag("ext-hash-seed", p)),
                    extra_args: fs.extra_args.clone(),
                    copy_in: src,
                }
            }
            Content::Swap(sw) => {
                if len < MIN_SWAP_BYTES {
                    return Err(Error::invalid(
                        &size_path(p),
                        format!("{len} bytes is too small for swap (at least {MIN_SWAP_BYTES})"),
                    ));
                }
                PlannedContent::Swap {
                    label: sw.label.clone(),
                    uuid: sw
                        .uuid
                        .unwrap_or_else(|| Guid::derive(&seed, &tag("swap-uuid", p))),
                }
            }
        };
        partitions.push(PlannedPartition {
            number: p.number,
            key: p.key.clone(),
            name: p.name.clone(),
            path: p.path.clone(),
            label: p.label.clone(),
            type_code: p.type_code.clone(),
            type_guid: p.type_guid,
            guid: p
                .guid
                .unwrap_or_else(|| Guid::derive(&seed, &tag("partition-guid", p))),
            first_lba: first,
            last_lba: last,
            attributes: p.attributes,
            content,
        });
    }
    for (i, p) in partitions.iter().enumerate() {
        if let Some(q) = partitions[..i].iter().find(|q| q.guid == p.guid) {
            return Err(Error::invalid(
                &p.path.key("uuid"),
                format!("partition GUID {} is also used by {}", p.guid, q.path),
            ));
        }
    }
    let sectors = size / SECTOR;
    Ok(Plan {
        disk_name: disk.name.clone(),
        disk_path: disk.path.clone(),
        disk_size: size,
        sector_size: SECTOR,
        disk_guid: Guid::derive(&seed, &format!("disk-guid:{}", disk.name)),
        first_usable_lba: GPT_HEAD_SECTORS,
        last_usable_lba: sectors - GPT_TAIL_SECTORS - 1,
        partitions,
    })
}

fn size_path(p: &PartitionSpec) -> JsonPath {
    if p.size.is_some() {
        p.path.key("size")
    } else {
        p.path.key("end")
    }
}

/// Why a layout does not fit a disk size.
#[derive(Debug)]
pub(crate) enum FitError {
    /// Growing the disk may help.
    TooSmall(Error),
    /// It never will.
    Other(Error),
}

impl FitError {
    pub(crate) fn into_error(self) -> Error {
        match self {
            FitError::TooSmall(e) | FitError::Other(e) => e,
        }
    }
}

/// Free blocks `[lo, hi]` of the usable area minus `used`.
fn free_blocks(first: u64, last: u64, used: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut used = used.to_vec();
    used.sort_unstable();
    let mut out = Vec::new();
    let mut cur = first;
    for &(a, b) in &used {
        if a > cur {
            out.push((cur, a - 1));
        }
        cur = cur.max(b + 1);
    }
    if cur <= last {
        out.push((cur, last));
    }
    out
}

fn align_up(v: u64, a: u64) -> Option<u64> {
    v.div_ceil(a).checked_mul(a)
}

/// sgdisk `--align-end --new=N:start:end` for each partition in order; returns inclusive LBA
/// ranges in the same order.
pub(crate) fn allocate(
    disk: &DiskSpec,
    size: u64,
) -> std::result::Result<Vec<(u64, u64)>, FitError> {
    let size_path = disk.path.key("imageSize");
    if size > MAX_DISK_BYTES {
        return Err(FitError::Other(Error::invalid(
            &size_path,
            format!("disk size {size} is larger than the supported {MAX_DISK_BYTES}"),
        )));
    }
    if size % SECTOR != 0 {
        return Err(FitError::Other(Error::invalid(
            &size_path,
            format!("disk size {size} is not a multiple of {SECTOR}"),
        )));
    }
    let sectors = size / SECTOR;
    if sectors < GPT_HEAD_SECTORS + GPT_TAIL_SECTORS + 1 {
        return Err(FitError::TooSmall(Error::invalid(
            &size_path,
            format!("disk size {size} cannot hold a GPT"),
        )));
    }
    let first_usable = GPT_HEAD_SECTORS;
    let last_usable = sectors - GPT_TAIL_SECTORS - 1;
    let parts = &disk.partitions;
    if let Some(i) = parts[..parts.len().saturating_sub(1)]
        .iter()
        .position(|p| p.size == Some(SizeSpec::Rest))
    {
        return Err(FitError::Other(Error::invalid(
            &parts[i].path.key("size"),
            format!(
                "\"100%\" partition must be the last (it is created before {}; check priority)",
                parts[i + 1].path
            ),
        )));
    }
    let mut used: Vec<(u64, u64)> = Vec::with_capacity(parts.len());
    for p in parts {
        let align = if p.alignment == 0 {
            DEFAULT_ALIGNMENT
        } else {
            p.alignment
        };
        let too_small =
            |what: &str, rule: String| FitError::TooSmall(Error::invalid(&p.path.key(what), rule));
        let free = free_blocks(first_usable, last_usable, &used);
        // The largest free block (the first of equals), as sgdisk's default.
        let Some(&(lo, hi)) = free.iter().rev().max_by_key(|(a, b)| b - a) else {
            return Err(too_small(
                "size",
                format!("no free space left on a {size}-byte disk"),
            ));
        };
        let low = match align_up(lo, align) {
            Some(a) if a <= hi => a,
            _ => lo,
        };
        let start = match p.start {
            Position::Default => low,
            Position::Absolute(s) => s,
            Position::Plus(n) => low.saturating_add(n),
            Position::Minus(n) => hi.saturating_sub(n),
        };
        let start = match align_up(start, align) {
            Some(a) if free.iter().any(|&(x, y)| x <= a && a <= y) => a,
            _ => start,
        };
        let Some(&(_, fhi)) = free.iter().find(|&&(x, y)| x <= start && start <= y) else {
            let rule = format!("start sector {start} is not in free space on a {size}-byte disk");
            return Err(if start > last_usable {
                too_small("start", rule)
            } else {
                FitError::Other(Error::invalid(&p.path.key("start"), rule))
            });
        };
        let end_path = if p.size.is_some() && !matches!(p.end, Position::Minus(0)) {
            "size"
        } else {
            "end"
        };
        let mut end = match p.end {
            Position::Default | Position::Plus(0) => fhi,
            Position::Plus(n) => start
                .checked_add(n - 1)
                .ok_or_else(|| too_small(end_path, "end sector overflows".to_string()))?,
            Position::Minus(n) => fhi.checked_sub(n).ok_or_else(|| {
                too_small(
                    end_path,
                    format!("{n} sectors before the end leaves no room"),
                )
            })?,
            Position::Absolute(s) => s,
        };
        if end > fhi {
            return Err(too_small(
                end_path,
                format!(
                    "partition needs sectors {start}..={end} but the free space there ends at \
                     sector {fhi} on a {size}-byte disk"
                ),
            ));
        }
        // end <= fhi < sectors <= MAX_DISK_BYTES / 512: no overflow below.
        if (end + 1) % align != 0 {
            let aligned = (end + 1) / align * align;
            if aligned > start + 1 {
                end = aligned - 1;
            }
        }
        if end < start {
            let rule = format!("end sector {end} is before start sector {start}");
            // An end counted back from the end of the disk moves out as the disk grows.
            return Err(if matches!(p.end, Position::Minus(_)) {
                too_small(end_path, rule)
            } else {
                FitError::Other(Error::invalid(&p.path.key(end_path), rule))
            });
        }
        used.push((start, end));
    }
    Ok(used)
}

/// The smallest disk size (whole MiB) that holds the layout, the content copied in (the
/// scanned `sources`), and `free_margin` spare bytes in the `100%` partition's filesystem.
pub fn measure(disk: &DiskSpec, opts: &PlanOptions, sources: &Sources) -> Result<u64> {
    // Minimum bytes each partition's content needs.
    let mut need: Vec<u64> = Vec::with_capacity(disk.partitions.len());
    for p in &disk.partitions {
        let src = sources.get(p.number);
        let rest = p.size == Some(SizeSpec::Rest);
        let margin = if rest { opts.free_margin } else { 0 };
        need.push(content_min_bytes(p, src, margin)?);
    }
    for p in &disk.partitions {
        if let Some(SizeSpec::Bytes(b)) = p.size {
            if b > MAX_DISK_BYTES {
                return Err(Error::invalid(
                    &p.path.key("size"),
                    format!("{b} bytes is larger than the largest supported disk ({MAX_DISK_BYTES} bytes)"),
                ));
            }
        }
    }
    let fixed: u64 = disk
        .partitions
        .iter()
        .map(|p| match p.size {
            Some(SizeSpec::Bytes(b)) => b,
            _ => 0,
        })
        .fold(0u64, u64::saturating_add);
    let rest_need: u64 = disk
        .partitions
        .iter()
        .zip(&need)
        .filter(|(p, _)| p.size == Some(SizeSpec::Rest))
        .map(|(_, n)| *n)
        .sum();
    let mut candidate = fixed
        .saturating_add(rest_need)
        .saturating_add(2 * MIB)
        .div_ceil(MIB)
        .saturating_mul(MIB);
    for _ in 0..MEASURE_ROUNDS {
        match allocate(disk, candidate) {
            Ok(ranges) => {
                let deficit = disk
                    .partitions
                    .iter()
                    .zip(&ranges)
                    .zip(&need)
                    .map(|((_, &(a, b)), &n)| n.saturating_sub((b - a + 1) * SECTOR))
                    .max()
                    .unwrap_or(0);
                if deficit == 0 {
                    // Validate the rest (GUIDs, content sizes) the way create will.
                    plan(disk, Some(candidate), opts, sources)?;
                    return Ok(candidate);
                }
                candidate = candidate.saturating_add(deficit.div_ceil(MIB) * MIB);
            }
            Err(FitError::TooSmall(_)) => candidate = candidate.saturating_add(candidate / 8 + MIB),
            Err(FitError::Other(e)) => return Err(e),
        }
        candidate = candidate.div_ceil(MIB).saturating_mul(MIB);
        if candidate > MAX_DISK_BYTES {
            break;
        }
    }
    Err(Error::invalid(
        &disk.path,
        "cannot find a disk size that holds this layout (check start/end)",
    ))
}

/// Minimum partition bytes for the content of `p` (with `src` copied in).
fn content_min_bytes(p: &PartitionSpec, src: Option<&Tree>, margin: u64) -> Result<u64> {
    Ok(match &p.content {
        Content::None => MIB,
        Content::Swap(_) => {
            if p.size == Some(SizeSpec::Rest) && margin == 0 {
                MIB
            } else {
                margin.max(MIN_SWAP_BYTES)
            }
        }
        Content::Filesystem(fs) if fs.format == FsFormat::Vfat => {
            if let Some(t) = src {
                crate::fat::check_tree(t, &p.path)?;
            }
            crate::fat::min_size(src, margin)
        }
        Content::Filesystem(_) => src.map(Usage::of).unwrap_or_default().min_fs_bytes(margin),
    })
}
