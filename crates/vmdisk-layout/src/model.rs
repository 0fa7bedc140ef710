//! The validated layout: what `parse` makes of disko's JSON and what planning reads.

use std::path::PathBuf;

use crate::error::{JsonPath, Result};
use crate::guid::Guid;
use crate::legacy::PartedPos;
use crate::size::{Position, SizeSpec};

/// GPT tables vmdisk writes have this many entries (the UEFI minimum, what sgdisk writes).
pub const GPT_ENTRIES: u32 = 128;
/// A GPT partition name holds at most 36 UTF-16 code units.
pub const GPT_NAME_UNITS: usize = 36;
/// disko's default priorities.
pub const PRIORITY_BIOS_BOOT: i64 = 100;
pub const PRIORITY_DEFAULT: i64 = 1000;
pub const PRIORITY_REST: i64 = 9001;

/// One disk of a layout, partitions in disko's creation order.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DiskSpec {
    /// The attribute name under `disk` (what `--disk` selects).
    pub key: String,
    /// disko's `name`: given, else the attribute name with `/` replaced by `_`; GPT names
    /// default to `disk-NAME-PART`.
    pub name: String,
    /// Where the disk sits in the JSON.
    pub path: JsonPath,
    /// `imageSize` in bytes (disko's default: 2G).
    pub image_size: Option<u64>,
    /// gpt `efiGptPartitionFirst` (hybrid MBRs: the 0xEE entry first).
    pub efi_gpt_partition_first: bool,
    /// The legacy `table` type: partitions placed as parted places them.
    pub parted: bool,
    pub partitions: Vec<PartitionSpec>,
    /// Canonical JSON of the disk object; the default seed derives from it.
    #[serde(skip)]
    pub canonical: String,
}

/// One partition of a disk.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PartitionSpec {
    /// Attribute name under `partitions`.
    pub key: String,
    /// disko `name` (defaults to the key).
    pub name: String,
    pub path: JsonPath,
    /// GPT entry number (disko `_index`), from 1.
    pub number: u32,
    pub priority: i64,
    /// GPT partition name (disko `label`, default `disk-<disk>-<name>`).
    pub label: String,
    /// The type as written (`EF00` or a GUID).
    pub type_code: String,
    pub type_guid: Guid,
    /// Partition GUID (disko `uuid`) when given.
    pub guid: Option<Guid>,
    pub size: Option<SizeSpec>,
    pub start: Position,
    pub end: Position,
    /// The end came from `size` (disko's `+SIZE`), not from an `end` of the layout.
    pub end_is_default: bool,
    /// `hybrid`: an entry of a hybrid MBR.
    pub hybrid: Option<HybridSpec>,
    /// Legacy `table` partitions: parted's start and end.
    pub parted: Option<(PartedPos, PartedPos)>,
    /// GPT attribute bits (disko `attributes`, bit numbers).
    pub attributes: u64,
    /// Alignment in sectors (disko `alignment`; 0 means sgdisk's 2048).
    pub alignment: u64,
    pub content: Content,
}

impl PartitionSpec {
    /// Whether `--copy-in SEL=...` means this partition: its attribute name, disko name, GPT
    /// name, number or filesystem mountpoint.
    pub fn answers_to(&self, sel: &str) -> bool {
        self.key == sel
            || self.name == sel
            || self.label == sel
            || self.number.to_string() == sel
            || self.content.mountpoint() == Some(sel)
    }
}

/// A partition's entry in a hybrid MBR (`sgdisk -h`, then `sfdisk --part-type/--activate`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct HybridSpec {
    /// `mbrPartitionType` (`0x0c`); None keeps the type sgdisk derives from the GPT type.
    pub mbr_type: Option<u8>,
    /// `mbrBootableFlag`.
    pub bootable: bool,
}

/// What goes into a partition.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    /// Nothing (e.g. a BIOS boot partition).
    None,
    Filesystem(FsSpec),
    Swap(SwapSpec),
    /// Made in the builder VM: LUKS, LVM, mdadm members, btrfs with subvolumes or swap
    /// files, and what sits inside those.
    Kernel(Box<Stack>),
}

/// Filesystem formats vmdisk can make.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsFormat {
    Vfat,
    Ext4,
    Ext3,
    Ext2,
    Btrfs,
    Xfs,
    F2fs,
}

impl FsFormat {
    pub fn name(self) -> &'static str {
        match self {
            FsFormat::Vfat => "vfat",
            FsFormat::Ext4 => "ext4",
            FsFormat::Ext3 => "ext3",
            FsFormat::Ext2 => "ext2",
            FsFormat::Btrfs => "btrfs",
            FsFormat::Xfs => "xfs",
            FsFormat::F2fs => "f2fs",
        }
    }

    pub fn is_ext(self) -> bool {
        matches!(self, FsFormat::Ext4 | FsFormat::Ext3 | FsFormat::Ext2)
    }
}

/// `content.type = "filesystem"`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct FsSpec {
    pub format: FsFormat,
    /// Passed to mke2fs (ext*); for vfat the mkfs.fat options `-n LABEL`, `-i VOLID`, `-F 32`.
    pub extra_args: Vec<String>,
    pub mountpoint: Option<String>,
    /// vfat: label from `-n`; volume id from `-i`; FAT size from `-F` (12, 16, 32).
    pub fat_label: Option<String>,
    pub fat_volume_id: Option<u32>,
    pub fat_bits: Option<u8>,
    /// btrfs: the subvolumes (`subvolumes`), in name order.
    pub subvolumes: Vec<Subvolume>,
    /// btrfs: swap files at the top level (`swap`), in name order.
    pub swapfiles: Vec<SwapFile>,
}

/// A btrfs swap file (`btrfs filesystem mkswapfile --size SIZE PATH`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SwapFile {
    /// Relative to the subvolume (or the top level).
    pub path: String,
    /// As disko writes it (`20M`).
    pub size: String,
}

/// A btrfs subvolume of the layout.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Subvolume {
    /// Path below the top level (`/home`, `@nix`).
    pub name: String,
    pub mountpoint: Option<String>,
    pub path: JsonPath,
    /// Swap files in this subvolume.
    pub swapfiles: Vec<SwapFile>,
}

/// `content.type = "swap"`.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SwapSpec {
    /// From mkswap `-L`.
    pub label: Option<String>,
    /// From mkswap `-U`.
    pub uuid: Option<Guid>,
    /// `randomEncryption`: NixOS encrypts it with a random key at boot, so disko leaves it
    /// unformatted, and so does vmdisk.
    pub random_encryption: bool,
}

impl Content {
    /// Where the content is mounted, when it is a filesystem with a mountpoint.
    pub fn mountpoint(&self) -> Option<&str> {
        match self {
            Content::Filesystem(fs) => fs.mountpoint.as_deref(),
            _ => None,
        }
    }
}

/// Options for `plan` and `measure`.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    /// Seed for every GUID and filesystem id the layout does not give; None derives one from
    /// the layout's content.
    pub seed: Option<String>,
    /// `--copy-in PART=DIR`: PART is a partition attribute name, disko name, GPT name, number,
    /// or mountpoint. Scanned once by `scan_copy_in`.
    pub copy_in: Vec<(String, PathBuf)>,
    /// Free bytes `measure` leaves in the `100%` partition's filesystem beyond its content.
    pub free_margin: u64,
}

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

/// The kernel-side devices of a layout: volume groups and arrays, each parsed or refused.
#[derive(Debug, Default)]
pub struct Devices {
    pub vgs: Vec<(String, Result<VolumeGroup>)>,
    pub mds: Vec<(String, Result<MdArray>)>,
}
