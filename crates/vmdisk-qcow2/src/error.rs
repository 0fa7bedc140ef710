//! The qcow2 engine's own errors: one variant per step that can fail, with the host offset of
//! the structure involved. They are mapped onto the block taxonomy ([`vmdisk_block::Error`])
//! at the crate edge by the `From` impl below, which is the only place that decides whether a
//! failure is "corrupt", "unsupported", a named limit, or the host's IO error:
//!
//! - metadata that contradicts itself or the file -> `Corrupt { what, off }`;
//! - a feature vmdisk refuses, or a request it cannot honour -> `Unsupported { what }`;
//! - an untrusted size above a named limit -> `Limit { what, needed, limit }` (never `Corrupt`);
//! - whatever the host device said -> passed through unchanged (`Io`, `OutOfRange`, ...).

use vmdisk_block::Error as BlockError;

/// Result of the engine's internal steps.
pub type Result<T, E = Qcow2Error> = std::result::Result<T, E>;

/// Which on-disk table a failed step was about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    L1,
    L2,
    RefcountTable,
    RefcountBlock,
    SnapshotTable,
    SnapshotL1,
    BitmapDirectory,
    BitmapTable,
    BitmapData,
}

impl std::fmt::Display for Table {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Table::L1 => "L1 table",
            Table::L2 => "L2 table",
            Table::RefcountTable => "refcount table",
            Table::RefcountBlock => "refcount block",
            Table::SnapshotTable => "snapshot table",
            Table::SnapshotL1 => "snapshot L1 table",
            Table::BitmapDirectory => "bitmap directory",
            Table::BitmapTable => "bitmap table",
            Table::BitmapData => "bitmap data cluster",
        })
    }
}

/// What went wrong in the qcow2 engine, named after the step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Qcow2Error {
    /// The host device failed (IO error, or a host read past its end).
    #[error(transparent)]
    Host(#[from] BlockError),

    // ------------------------------------------------------------ header
    #[error("not a qcow2 image (bad magic)")]
    CheckingMagic,
    #[error("image too short for a qcow2 {what}")]
    ReadingHeader { what: &'static str },
    #[error("qcow2 version {version}")]
    UnsupportedVersion { version: u32 },
    #[error("cluster_bits {bits} outside 9..=21")]
    InvalidClusterBits { bits: u32 },
    #[error("header_length {len}: {why}")]
    InvalidHeaderLength { len: u32, why: &'static str },
    #[error("refcount_order {order} above 6")]
    InvalidRefcountOrder { order: u32 },
    #[error("compression type {kind}")]
    UnsupportedCompressionType { kind: u8 },
    #[error("compression type set without the compression incompatible bit")]
    CompressionTypeWithoutFeatureBit,
    #[error("encrypted image ({how}): vmdisk refuses to return ciphertext")]
    Encrypted { how: String },
    #[error("qcow2 with an external data file (data-file)")]
    ExternalDataFile,
    #[error("unknown incompatible qcow2 features: {names}")]
    UnknownIncompatibleFeatures { names: String },
    #[error("L1 table has {entries} entries, the size needs {needed}")]
    L1TooSmall { entries: u32, needed: u64 },
    /// `field` is the header byte offset of the pointer, or the host offset of the entry.
    #[error("{table} offset {off:#x} not cluster aligned")]
    MisalignedTable { table: Table, off: u64, field: u64 },
    #[error("{table} offset beyond 2^56")]
    TableOffsetTooLarge { table: Table, field: u64 },
    #[error("refcount table has no clusters")]
    EmptyRefcountTable,
    #[error("header extension {kind:#x} runs past its space")]
    ParsingHeaderExtension { kind: u32, at: u64 },
    #[error("bitmaps header extension: {why}")]
    ParsingBitmapsExtension { why: String, at: u64 },
    #[error("backing file name outside the first cluster")]
    ReadingBackingFileName,

    // ------------------------------------------------------------ tables
    #[error("{table} lies beyond the end of the file")]
    TableBeyondEnd { table: Table, off: u64 },
    #[error("L1 entry {raw:#x} points at an unaligned L2 table")]
    DecodingL1Entry { raw: u64, at: u64 },
    #[error("L2 entry {raw:#x} points at an unaligned cluster")]
    DecodingL2Entry { raw: u64, at: u64 },
    #[error("subcluster bitmap: {why}")]
    DecodingSubclusterBitmap { why: &'static str, at: u64 },
    #[error("refcount table entry not cluster aligned")]
    DecodingRefcountTableEntry { at: u64 },
    #[error("refcount would drop below zero")]
    DecrementingRefcount { off: u64 },
    #[error("refcount block 0 is missing")]
    MissingFirstRefcountBlock { at: u64 },
    #[error("{what} entry truncated")]
    ParsingSnapshotTable { what: &'static str, at: u64 },
    #[error("bitmap directory entry: {why}")]
    ParsingBitmapDirectory { why: String, at: u64 },
    #[error("bitmap table entry {raw:#x} is invalid")]
    DecodingBitmapTableEntry { raw: u64, at: u64 },

    // ------------------------------------------------------------ data
    #[error("data cluster beyond the end of the file")]
    ReadingDataCluster { host_off: u64 },
    #[error("compressed cluster beyond the end of the file")]
    ReadingCompressedCluster { host_off: u64 },
    #[error("compressed cluster: {why}")]
    DecompressingCluster { why: &'static str, at: u64 },
    #[error("compressing a cluster ({codec})")]
    CompressingCluster {
        codec: &'static str,
        #[source]
        source: std::io::Error,
    },

    // ------------------------------------------------------------ named limits
    /// An untrusted size above a named limit (see the constants in `meta`).
    #[error("{what} needs {needed}, limit is {limit}")]
    Limit {
        what: &'static str,
        needed: u64,
        limit: u64,
    },

    // ------------------------------------------------------------ refused requests
    #[error(
        "image is marked corrupt (corrupt bit set); repair it with `vmdisk check -r all` \
         before writing"
    )]
    OpeningCorruptForWrite,
    /// Anything vmdisk refuses to do, with the reason and the way out.
    #[error("{what}")]
    Refused { what: String },
    #[error(
        "snapshot {field} is {len} bytes; qemu allows at most {limit} (it would cut it \
         short), so choose a shorter one"
    )]
    SnapshotNameTooLong {
        field: &'static str,
        len: usize,
        limit: usize,
    },
}

impl Qcow2Error {
    /// A refusal with its reason (mapped to `Unsupported`).
    pub fn refused(what: impl Into<String>) -> Self {
        Qcow2Error::Refused { what: what.into() }
    }

    /// Host offset of the structure the error is about (0 for the header).
    fn off(&self) -> u64 {
        use Qcow2Error::*;
        match self {
            InvalidClusterBits { .. } => 20,
            InvalidHeaderLength { .. } => 100,
            InvalidRefcountOrder { .. } => 96,
            CompressionTypeWithoutFeatureBit => 104,
            L1TooSmall { .. } => 36,
            MisalignedTable { field, .. } | TableOffsetTooLarge { field, .. } => *field,
            EmptyRefcountTable => 56,
            ReadingBackingFileName => 8,
            OpeningCorruptForWrite => 72,
            ParsingHeaderExtension { at, .. }
            | ParsingBitmapsExtension { at, .. }
            | DecodingL1Entry { at, .. }
            | DecodingL2Entry { at, .. }
            | DecodingSubclusterBitmap { at, .. }
            | DecodingRefcountTableEntry { at }
            | MissingFirstRefcountBlock { at }
            | ParsingSnapshotTable { at, .. }
            | ParsingBitmapDirectory { at, .. }
            | DecodingBitmapTableEntry { at, .. }
            | DecompressingCluster { at, .. } => *at,
            TableBeyondEnd { off, .. }
            | DecrementingRefcount { off }
            | ReadingDataCluster { host_off: off }
            | ReadingCompressedCluster { host_off: off } => *off,
            _ => 0,
        }
    }
}

/// The crate edge: every public entry point returns the block taxonomy.
impl From<Qcow2Error> for BlockError {
    fn from(e: Qcow2Error) -> Self {
        use Qcow2Error::*;
        match e {
            Host(inner) => inner,
            Limit {
                what,
                needed,
                limit,
            } => BlockError::Limit {
                what,
                needed,
                limit,
            },
            CompressingCluster { source, .. } => BlockError::io("compressing a cluster", 0, source),
            UnsupportedVersion { .. }
            | UnsupportedCompressionType { .. }
            | Encrypted { .. }
            | ExternalDataFile
            | UnknownIncompatibleFeatures { .. }
            | Refused { .. }
            | SnapshotNameTooLong { .. } => BlockError::Unsupported {
                what: e.to_string(),
            },
            _ => {
                let off = e.off();
                BlockError::Corrupt {
                    what: e.to_string(),
                    off,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_are_never_corrupt() {
        let e: BlockError = Qcow2Error::Limit {
            what: "L1 table bytes",
            needed: 2,
            limit: 1,
        }
        .into();
        assert!(matches!(e, BlockError::Limit { .. }), "{e:?}");
        let e: BlockError = Qcow2Error::InvalidClusterBits { bits: 40 }.into();
        assert!(matches!(e, BlockError::Corrupt { off: 20, .. }), "{e:?}");
        let e: BlockError = Qcow2Error::Host(BlockError::OutOfRange {
            off: 1,
            len: 2,
            size: 3,
        })
        .into();
        assert!(matches!(e, BlockError::OutOfRange { .. }), "{e:?}");
    }
}
