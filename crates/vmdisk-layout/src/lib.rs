//! disko-style disk layouts without root and without a VM: parse disko's JSON, plan a GPT
//! disk with sgdisk's semantics, and write it — protective MBR, primary and backup GPT,
//! FAT32 ESPs (our own deterministic writer), ext2/3/4 (mke2fs on a scratch file, then
//! copied in) and swap headers. The same input and seed always give the same bytes.
//!
//! ```text
//! LBA 0            protective MBR: one 0xEE entry from LBA 1 over the disk, 0x55AA
//! LBA 1            primary GPT header ("EFI PART", rev 1.0, 92 bytes, CRC32 of header
//!                  and of the entry array, disk GUID, usable LBAs 34..=N-34)
//! LBA 2..=33       128 entries x 128 bytes: type GUID, partition GUID, first/last LBA,
//!                  attributes, UTF-16LE name (36 units); GUIDs mixed-endian
//! LBA 2048..       partitions in disko order, each starting on a 2048-sector boundary
//!                  and (sgdisk --align-end) ending just before one
//! LBA N-33..=N-2   backup entry array (same bytes as the primary)
//! LBA N-1          backup GPT header (my/alternate LBAs swapped, entries at N-33)
//! ```
//!
//! Flow: [`parse`] → [`select_disk`] → [`scan_copy_in`] (the only read of the `--copy-in`
//! trees: each becomes a [`Tree`] value) → [`plan`] (pure: sectors, GUIDs, filesystem ids; or
//! [`measure`] for size `auto`) → [`apply`] (IO: filesystems from the plan and the trees). [`probe_partitions`] and [`probe_filesystem`]
//! read back what is on a device for `vmdisk inspect`.
//!
//! Errors ([`Error`]): layout mistakes name the JSON path and the rule broken
//! (`Invalid`, `Unsupported`, `ParsingJson`, disk selection, `CopyIn`, `NoDiskSize`) and all
//! happen before any write; content errors (`ContentTooLarge`, `ReadingSource`), tool
//! failures (`SpawningTool`, `ToolFailed`), scratch files (`Scratch`) also come before the
//! target is touched; only device errors (`Block`) can happen while writing.

#![forbid(unsafe_code)]

mod apply;
mod error;
mod ext;
mod fat;
mod fatwrite;
mod gpt;
pub mod gptgrow;
mod guid;
mod json;
pub mod kernel;
mod legacy;
mod mbr;
mod mkfs;
mod model;
mod plan;
mod probe;
mod scan;
mod scratch;
mod size;
mod spec;
mod swap;
mod tree;
mod typecodes;
mod usage;
mod zero;

pub use apply::{apply, preflight, AppliedPartition, ApplyReport};
pub use error::{Error, JsonPath, Result};
pub use ext::FIXED_TIME;
pub use fat::{Geometry as FatGeometry, MIN_CLUSTERS_32 as FAT_MIN_CLUSTERS_32};
pub use gpt::{probe_partitions, PartitionInfo, PartitionTable};
pub use guid::{type_code_guid, type_code_of, Guid, TYPE_CODES};
pub use model::{
    Content, Devices, DiskSpec, FsFormat, FsSpec, HybridSpec, KeySource, LogicalVolume, Luks,
    MdArray, PartitionSpec, PlanOptions, Stack, Subvolume, SwapFile, SwapSpec, VolumeGroup,
    GPT_ENTRIES,
};
pub use plan::{
    measure, plan, Plan, PlannedContent, PlannedPartition, DEFAULT_ALIGNMENT, MAX_DISK_BYTES,
};
pub use probe::{probe_filesystem, FsInfo, FsKind};
pub use scan::scan_copy_in;
pub use size::{Position, SizeSpec, SECTOR};
pub use spec::{default_label, parse, parse_layout, select_disk, Layout, DEFAULT_IMAGE_SIZE};
pub use tree::{Sources, Tree};

#[cfg(test)]
mod tests;
