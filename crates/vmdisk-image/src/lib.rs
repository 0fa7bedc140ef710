//! Images by path: the one factory that opens image files, plus the whole-image operations
//! built on the block contract.
//!
//! ```text
//!   open(path, &OpenOptions) ──▶ Image { dev: Arc<dyn BlockDevice>, chain, locks }
//!        │ probe: "QFI\xfb" → qcow2, else raw (a declared format is never second-guessed)
//!        │ lock:  qemu's locks, write for read-write, read for read-only, none with -U
//!        └ chain: backing name relative to the overlay, format from the header extension
//!                 or probed, read-only, depth ≤ MAX_BACKING_DEPTH, loops refused
//!
//!   create   raw (sparse) or qcow2 with qemu-img's -o options, write lock before truncating
//!   convert  block_status-driven sparse copy: parallel readers/compressors, one ordered writer,
//!            a bounded window of chunks in flight (memory independent of image size)
//!   copy     the image *file*: FICLONE / clonefile, else a SEEK_DATA sparse copy, crash-safe
//!   compare  qemu-img compare semantics, skipping ranges both images know are zero
//!   map      qemu-img map --output=json entries, merged by qemu's rules
//!   info     qemu-img info --output=json model (and its human text)
//!   check    qemu-img check over the qcow2 engine, with the qemu-img report model
//!   commit   fold an overlay into its backing file, then empty it (qemu-img commit)
//!   rebase   point an overlay at another backing file, keeping the guest view (qemu-img rebase)
//!   resize   change the virtual size in place, as a transaction (qemu-img resize)
//!   amend    change compat / lazy_refcounts of a qcow2 in place (qemu-img amend)
//!   dd       a byte window of an image into a new image (qemu-img dd)
//! ```
//!
//! Errors ([`Error`]) wrap the block taxonomy (`vmdisk_block::Error`: IO, out of range,
//! corrupt, unsupported, limit, locked) with the path and the step that failed, and add the
//! factory's own failures: backing loops, chains too deep, unknown formats, bad options.

mod amend;
mod check;
mod compare;
mod convert;
mod copy;
pub(crate) mod create;
mod dd;
mod error;
mod info;
mod map;
pub(crate) mod measure;
mod open;
mod output;
mod overlay;
mod q;
mod resize;
mod snapshot;
mod sniff;
mod sys;

pub use amend::{amend, amend_options_help, parse_amend_options};
pub use check::{check, CheckOutcome, Repair};
pub use compare::{compare, compare_with_progress, Comparison, Difference};
pub use convert::{convert, ConvertOptions, ConvertStats, MAX_SPARSE_SIZE};
pub use copy::{
    backing_elsewhere, copy_destination, copy_file, held_for_writing, BackingElsewhere, CopyMethod,
    CopyOptions, CopyStats, Reflink,
};
pub use create::{
    create, create_in_place, create_new, create_overlay, overlay_spec, parse_size, CreateSpec,
    ImageOptions, NewImage, PreallocMode,
};
pub use dd::{dd, parse_operands as parse_dd_operands, DdOptions, MAX_DD_BLOCK_SIZE};
pub use error::{Error, Result};
pub use info::{
    format_size, info, snapshot_table, FormatSpecific, ImageInfo, Qcow2Specific, SnapshotEntry,
};
pub use map::{map, MapEntry};
pub use measure::{data_bytes, measure, measure_size, DataBytes, Measure};
pub use open::{open, probe_format, resolve_backing, Image, Layer, OpenOptions, MAX_BACKING_DEPTH};
pub use output::{ensure_space, free_space, refuse_output_onto_input, FileId, PendingFile};
pub use overlay::{
    commit, rebase, CommitOptions, CommitStats, NewBacking, RebaseOptions, RebaseStats,
};
pub use q::snapshot::SnapshotSelector;
pub use q::{AmendOptions, AmendReport, ResizePrealloc, RESIZE_ALIGN};
pub use resize::{
    parse_prealloc, resize, resize_with, HookError, ResizeHook, ResizeOptions, ResizeStats,
    SizeChange,
};
pub use snapshot::{snapshot_apply, snapshot_create, snapshot_delete, snapshot_list};
pub use sniff::looks_like;

/// Image formats vmdisk reads and writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Raw,
    Qcow2,
}

impl Format {
    /// The name qemu uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

impl std::fmt::Display for Format {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Format {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "raw" => Ok(Format::Raw),
            "qcow2" => Ok(Format::Qcow2),
            _ => Err(Error::UnknownFormat {
                name: s.to_string(),
            }),
        }
    }
}
