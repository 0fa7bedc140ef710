//! Pure planning: sector ranges (sgdisk semantics), GUIDs and filesystem ids from the seed.

use std::path::PathBuf;

use crate::error::{Error, JsonPath, Result};
use crate::guid::Guid;
use crate::model::{Content, DiskSpec, FsFormat, HybridSpec, PartitionSpec, PlanOptions};
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
    /// Hybrid MBRs: the 0xEE entry first (disko's `efiGptPartitionFirst`).
    pub efi_gpt_partition_first: bool,
    /// Made as parted makes it (the legacy `table` type): its protective MBR's CHS end.
    pub parted: bool,
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
    /// The partition's entry in a hybrid MBR.
    pub hybrid: Option<HybridSpec>,
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
        /// `-F`: 12, 16 or 32; None lets the size decide, as mkfs.fat does.
        bits: Option<u8>,
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
    /// btrfs, xfs, f2fs: made by their own mkfs tool on a scratch file.
    Mkfs {
        format: FsFormat,
        uuid: Guid,
        extra_args: Vec<String>,
        /// btrfs subvolumes (paths below the top level).
        subvolumes: Vec<String>,
        copy_in: Option<PathBuf>,
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
    let ranges = if disk.parted {
        allocate_parted(disk, size)?
    } else {
        allocate(disk, size).map_err(FitError::into_error)?
    };
    let seed = seed_bytes(disk, opts);
    let tag = |what: &str, p: &PartitionSpec| format!("{what}:{}:{}", disk.name, p.key);
    let mut partitions = Vec::with_capacity(disk.partitions.len());
    for (p, &(first, last)) in disk.partitions.iter().zip(&ranges) {
        let len = (last - first + 1) * SECTOR;
        let src = sources.get(p.number).map(|t| t.dir.clone());
        let content = match &p.content {
            // The builder VM makes it (see `kernel`); the host leaves it zeroed.
            Content::None | Content::Kernel(_) => PlannedContent::None,
            Content::Filesystem(fs) if fs.format == FsFormat::Vfat => {
                crate::fat::Geometry::mkfs(len, first, fs.fat_bits)
                    .map_err(|rule| Error::invalid(&size_path(p), rule))?;
                let id = Guid::derive(&seed, &tag("fat-volume-id", p)).0;
                PlannedContent::Fat {
                    bits: fs.fat_bits,
                    label: fs.fat_label.clone(),
                    volume_id: fs
                        .fat_volume_id
                        .unwrap_or(u32::from_le_bytes([id[0], id[1], id[2], id[3]])),
                    copy_in: src,
                }
            }
            Content::Filesystem(fs) if !fs.format.is_ext() => {
                let min = crate::mkfs::min_bytes(fs.format);
                if len < min {
                    return Err(Error::invalid(
                        &size_path(p),
                        format!(
                            "{len} bytes is too small for {} (mkfs.{} needs at least {min})",
                            fs.format.name(),
                            fs.format.name()
                        ),
                    ));
                }
                if let Some(tree) = sources.get(p.number) {
                    for sv in &fs.subvolumes {
                        if !tree_has_dir(tree, &sv.name) {
                            return Err(Error::CopyIn {
                                selector: format!("{}={}", p.key, tree.dir.display()),
                                rule: format!(
                                    "subvolume {:?} ({}) must be a directory of the tree copied \
                                     in (mkfs.btrfs --subvol makes existing directories \
                                     subvolumes)",
                                    sv.name, sv.path
                                ),
                            });
                        }
                    }
                }
                PlannedContent::Mkfs {
                    format: fs.format,
                    uuid: Guid::derive(&seed, &tag("fs-uuid", p)),
                    extra_args: fs.extra_args.clone(),
                    subvolumes: fs.subvolumes.iter().map(|s| s.name.clone()).collect(),
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
            // disko leaves a randomly encrypted swap partition empty: NixOS sets it up at boot.
            Content::Swap(sw) if sw.random_encryption => PlannedContent::None,
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
            hybrid: p.hybrid.clone(),
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
        efi_gpt_partition_first: disk.efi_gpt_partition_first,
        parted: disk.parted,
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

/// The free-space model sgdisk works on while it adds partitions one by one.
struct Disk<'a> {
    first_usable: u64,
    last_usable: u64,
    used: &'a [(u64, u64)],
}

impl Disk<'_> {
    /// Whether every sector of `a..=b` is usable and in no partition.
    fn range_free(&self, a: u64, b: u64) -> bool {
        a >= self.first_usable
            && b <= self.last_usable
            && !self.used.iter().any(|&(x, y)| x <= b && a <= y)
    }

    fn is_free(&self, s: u64) -> bool {
        self.range_free(s, s)
    }

    /// sgdisk's FindLastInFree: the sector before the next partition starting after `s`, or
    /// the last usable sector.
    fn last_in_free(&self, s: u64) -> u64 {
        self.used
            .iter()
            .filter(|&&(a, _)| a > s)
            .map(|&(a, _)| a - 1)
            .min()
            .unwrap_or(self.last_usable)
    }

    /// sgdisk's Align: move `s` down to a multiple of `align` when every sector in between is
    /// free, else up when that is, else leave it.
    fn align(&self, s: u64, align: u64) -> u64 {
        if s % align == 0 {
            return s;
        }
        let earlier = s / align * align;
        if earlier >= self.first_usable && self.range_free(earlier, s - 1) {
            return earlier;
        }
        match earlier.checked_add(align) {
            Some(later) if later <= self.last_usable && self.range_free(s + 1, later) => later,
            _ => s,
        }
    }
}

/// `sgdisk --align-end [--set-alignment=A] --new=N:START:END` for each partition in order,
/// as gdisk 1.0.9 does it; returns inclusive LBA ranges in the same order.
///
/// sgdisk takes the first sector of the largest free block, aligned (`low`), and the last
/// sector of that block (`high`), which `--align-end` moves down to just before an alignment
/// boundary. START: `0` is `low`, `+N` is `low + N`, `-N` is `high - N`, else a sector. END:
/// `0` is `high`, `+N` is START + N - 1, `-N` is `high - N`, else the last sector itself.
/// Then START is aligned (down when the sectors in between are free, else up), and the range
/// must be free.
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
        let end_path = if p.size.is_some() && p.end_is_default {
            "size"
        } else {
            "end"
        };
        let d = Disk {
            first_usable,
            last_usable,
            used: &used,
        };
        let free = free_blocks(first_usable, last_usable, &used);
        // The first sector of the largest free block (the first of equals), as sgdisk's.
        let Some(&(lo, _)) = free.iter().rev().max_by_key(|(a, b)| b - a) else {
            return Err(too_small(
                "size",
                format!("no free space left on a {size}-byte disk"),
            ));
        };
        let low = d.align(lo, align);
        let high = d.last_in_free(low);
        // --align-end: the default and "-N" ends count back from an alignment boundary.
        let high = match (high + 1) / align * align {
            b if b > low => b - 1,
            _ => high,
        };
        // Offsets and ends below are checked: a layout can ask for any sector.
        let start = match p.start {
            Position::Default => Some(low),
            Position::Absolute(s) => Some(s),
            Position::Plus(n) => low.checked_add(n),
            Position::Minus(n) => high.checked_sub(n),
        }
        .ok_or_else(|| too_small("start", format!("start is outside a {size}-byte disk")))?;
        let end = match p.end {
            Position::Default => Some(high),
            Position::Absolute(s) => Some(s),
            Position::Plus(n) => start.checked_add(n - 1),
            Position::Minus(n) => high.checked_sub(n),
        }
        .ok_or_else(|| too_small(end_path, format!("the end is outside a {size}-byte disk")))?;
        let start = d.align(start, align);
        if !d.is_free(start) {
            let rule = format!("start sector {start} is not in free space on a {size}-byte disk");
            return Err(if start > last_usable {
                too_small("start", rule)
            } else {
                FitError::Other(Error::invalid(&p.path.key("start"), rule))
            });
        }
        if end < start {
            let rule = format!("end sector {end} is before start sector {start}");
            // An end counted back from the end of the disk moves out as the disk grows.
            return Err(if matches!(p.end, Position::Minus(_) | Position::Default) {
                too_small(end_path, rule)
            } else {
                FitError::Other(Error::invalid(&p.path.key(end_path), rule))
            });
        }
        let fhi = d.last_in_free(start);
        if end > fhi {
            return Err(too_small(
                end_path,
                format!(
                    "partition needs sectors {start}..={end} but the free space there ends at \
                     sector {fhi} on a {size}-byte disk"
                ),
            ));
        }
        used.push((start, end));
    }
    Ok(used)
}

/// Whether `rel` (a/b/c) is a directory of `tree`.
fn tree_has_dir(tree: &Tree, rel: &str) -> bool {
    let mut nodes = tree.root.as_slice();
    for comp in rel.split('/') {
        match nodes
            .iter()
            .find(|n| n.name == std::ffi::OsStr::new(comp))
            .map(|n| &n.kind)
        {
            Some(crate::tree::Kind::Dir(c)) => nodes = c,
            _ => return false,
        }
    }
    true
}

/// The legacy `table`: each partition placed as `parted mkpart` places it, in list order.
fn allocate_parted(disk: &DiskSpec, size: u64) -> Result<Vec<(u64, u64)>> {
    let size_path = disk.path.key("imageSize");
    let sectors = size / SECTOR;
    if size > MAX_DISK_BYTES
        || size % SECTOR != 0
        || sectors < GPT_HEAD_SECTORS + GPT_TAIL_SECTORS + 1
    {
        return Err(Error::invalid(
            &size_path,
            format!("disk size {size} cannot hold a GPT (or is not whole sectors)"),
        ));
    }
    let last_usable = sectors - GPT_TAIL_SECTORS - 1;
    let mut next = GPT_HEAD_SECTORS;
    let mut out = Vec::with_capacity(disk.partitions.len());
    for p in &disk.partitions {
        let Some((start, end)) = &p.parted else {
            return Err(Error::invalid(&p.path, "not a legacy table partition"));
        };
        let (a, b) =
            crate::legacy::place(start, end, sectors, next, last_usable).ok_or_else(|| {
                Error::invalid(
                    &p.path,
                    format!("parted cannot place this partition on a {size}-byte disk"),
                )
            })?;
        out.push((a, b));
        next = b + 1;
    }
    Ok(out)
}

/// The smallest disk size (whole MiB) that holds the layout, the content copied in (the
/// scanned `sources`), and `free_margin` spare bytes in the `100%` partition's filesystem.
pub fn measure(disk: &DiskSpec, opts: &PlanOptions, sources: &Sources) -> Result<u64> {
    for p in &disk.partitions {
        if let Some(SizeSpec::Bytes(b)) = p.size {
            if b > MAX_DISK_BYTES {
                return Err(Error::invalid(
                    &p.path.key("size"),
                    format!(
                        "{b} bytes is larger than the largest supported disk \
                         ({MAX_DISK_BYTES} bytes)"
                    ),
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
    let mut candidate = fixed
        .saturating_add(2 * MIB)
        .div_ceil(MIB)
        .saturating_mul(MIB);
    // The partitions that grow with the disk (a "100%" size, an end counted from the end of
    // the disk, no size at all) get the free margin; fixed ones only what their content needs.
    let mut need: Option<Vec<u64>> = None;
    for _ in 0..MEASURE_ROUNDS {
        match allocate(disk, candidate) {
            Ok(ranges) => {
                let need = match &need {
                    Some(n) => n,
                    None => {
                        let bigger = candidate.saturating_add(64 * MIB);
                        let grown = match allocate(disk, bigger) {
                            Ok(r) => r,
                            Err(_) => ranges.clone(),
                        };
                        let mut n = Vec::with_capacity(disk.partitions.len());
                        for (i, p) in disk.partitions.iter().enumerate() {
                            let grows = grown[i].1 - grown[i].0 > ranges[i].1 - ranges[i].0;
                            let margin = if grows { opts.free_margin } else { 0 };
                            n.push(content_min_bytes(p, sources.get(p.number), margin, grows)?);
                        }
                        need.insert(n)
                    }
                };
                let mut deficit = 0u64;
                for ((p, &(a, b)), &n) in disk.partitions.iter().zip(&ranges).zip(need) {
                    let have = (b - a + 1) * SECTOR;
                    if n > have {
                        let bigger = candidate.saturating_add(n - have + 64 * MIB);
                        let grows = allocate(disk, bigger).is_ok_and(|r| {
                            let i = disk.partitions.iter().position(|q| q.number == p.number);
                            i.is_some_and(|i| r[i].1 - r[i].0 > b - a)
                        });
                        if !grows {
                            return Err(Error::ContentTooLarge {
                                path: size_path(p),
                                detail: format!(
                                    "the partition has a fixed size of {have} bytes, its \
                                     content needs {n}; make it larger"
                                ),
                            });
                        }
                        deficit = deficit.max(n - have);
                    }
                }
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
fn content_min_bytes(
    p: &PartitionSpec,
    src: Option<&Tree>,
    margin: u64,
    grows: bool,
) -> Result<u64> {
    Ok(match &p.content {
        Content::None => 0,
        Content::Kernel(_) => {
            return Err(Error::unsupported(
                &p.path.key("content"),
                "measuring content the builder VM makes (LUKS, LVM, md, btrfs subvolumes) for \
                 size `auto`; give the disk a SIZE",
            ))
        }
        Content::Swap(sw) if sw.random_encryption => 0,
        Content::Swap(_) => {
            if grows {
                margin.max(MIN_SWAP_BYTES)
            } else {
                MIN_SWAP_BYTES
            }
        }
        Content::Filesystem(fs) if fs.format == FsFormat::Vfat => {
            if let Some(t) = src {
                crate::fat::check_tree(t, &p.path)?;
            }
            crate::fat::min_size(src, margin, fs.fat_bits)
        }
        Content::Filesystem(fs) if fs.format.is_ext() => {
            src.map(Usage::of).unwrap_or_default().min_fs_bytes(margin)
        }
        Content::Filesystem(fs) => {
            let usage = src.map(Usage::of).unwrap_or_default();
            // The data, with the ext estimate's overheads, but never below what the tool takes.
            usage
                .min_fs_bytes(margin)
                .max(crate::mkfs::min_bytes(fs.format))
        }
    })
}
