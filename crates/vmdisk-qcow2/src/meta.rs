//! On-disk qcow2 structures, parsed from and serialised to bytes. No IO happens here.
//!
//! Everything that reads a raw field of the format lives in this module: the header and its
//! extensions ([`Header`]), L1 and L2 entries ([`l1_entry_offset`], [`L2Entry`],
//! [`SubclusterBitmap`]), refcount entries of every width ([`refcount_get`], [`refcount_set`]),
//! big-endian u64 tables ([`decode_table`], [`encode_table`]), the snapshot table
//! ([`SnapshotHeader`]) and the persistent-bitmap directory ([`BitmapsExtension`],
//! [`BitmapEntry`]). Fixed-layout structures are explicit-endian `zerocopy` structs, so no
//! field is addressed by a byte-offset literal. Parsers are total: they never panic, and every
//! size read from an image is checked against a named limit below before memory is allocated.
//! Errors are [`Qcow2Error`] variants carrying the host offset of the structure that failed.

use std::mem::{offset_of, size_of};

use zerocopy::byteorder::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::error::{Qcow2Error, Result, Table};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Smallest cluster: 512 B (cluster_bits 9), as the spec allows.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB (cluster_bits 21), as the spec allows.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Refcount widths 1..=64 bits (refcount_order 0..=6).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Size of the fixed v2 header.
pub const V2_HEADER_LEN: u32 = offset_of!(RawHeader, incompatible_features) as u32;
/// Size of the v3 header without the compression type field.
pub const V3_HEADER_MIN_LEN: u32 = offset_of!(RawHeader, compression_type) as u32;
/// v3 header with the compression type byte, padded to 8 (what qemu writes).
pub const V3_HEADER_LEN: u32 = size_of::<RawHeader>() as u32;
/// qemu refuses L1 tables above 32 MiB; so do we (it bounds the allocation at open).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// qemu refuses refcount tables above 8 MiB; so do we.
pub const MAX_REFCOUNT_TABLE_BYTES: u64 = 8 << 20;
/// qemu's limit on the number of internal snapshots.
pub const MAX_SNAPSHOTS: u32 = 65536;
/// Bound on the whole snapshot table (qemu: 1 KiB per snapshot on average).
pub const MAX_SNAPSHOT_TABLE_BYTES: u64 = 64 << 20;
/// qemu's limit on per-snapshot extra data.
pub const MAX_SNAPSHOT_EXTRA_DATA: u32 = 1024;
/// Longest snapshot name qemu keeps: its `QEMUSnapshotInfo.name` is a 256-byte C string, so
/// `qemu-img snapshot -c` silently cuts longer names to 255 bytes. vmdisk refuses them.
pub const MAX_SNAPSHOT_NAME_BYTES: usize = 255;
/// Longest snapshot id qemu keeps (`QEMUSnapshotInfo.id_str` is a 128-byte C string).
pub const MAX_SNAPSHOT_ID_BYTES: usize = 127;
/// Backing file names longer than this are refused (qemu: 1023).
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Virtual sizes up to 2^56: host offsets in L1/L2 entries have 56 bits, nothing bigger is
/// meaningful, and it keeps every guest-offset computation far from u64 overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Subclusters per cluster in images with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

/// qemu's limit on the number of persistent bitmaps in one image.
pub const MAX_BITMAPS: u32 = 65535;
/// qemu's bound on the bitmap directory (1 KiB per bitmap).
pub const MAX_BITMAP_DIRECTORY_BYTES: u64 = 1024 * MAX_BITMAPS as u64;
/// qemu's bound on one bitmap's table (entries).
pub const MAX_BITMAP_TABLE_ENTRIES: u32 = 0x800_0000;
/// qemu's bound on one bitmap's data in bytes (what it would hold in memory).
pub const MAX_BITMAP_DATA_BYTES: u64 = 0x2000_0000;
/// Bitmap granularities qemu supports: 512 B ..= 2 GiB per bit.
pub const MIN_BITMAP_GRANULARITY_BITS: u8 = 9;
pub const MAX_BITMAP_GRANULARITY_BITS: u8 = 31;
/// qemu's limit on a bitmap name.
pub const MAX_BITMAP_NAME_BYTES: u16 = 1023;

/// Incompatible feature bits.
pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
/// Every incompatible bit vmdisk understands (data file is understood only to be refused).
pub const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;
/// Compatible feature bit: lazy refcounts.
pub const COMPAT_LAZY_REFCOUNTS: u64 = 1 << 0;
/// Autoclear bits: bitmaps extension valid, raw external data.
pub const AUTOCLEAR_BITMAPS: u64 = 1 << 0;
pub const AUTOCLEAR_DATA_FILE_RAW: u64 = 1 << 1;

/// Header extension types.
pub const EXT_END: u32 = 0;
pub const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
pub const EXT_FEATURE_TABLE: u32 = 0x6803_f857;
pub const EXT_BITMAPS: u32 = 0x2385_2875;
pub const EXT_FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
pub const EXT_DATA_FILE: u32 = 0x4441_5441;

/// L1/L2 flag: refcount is exactly one (the cluster may be written in place).
pub const OFLAG_COPIED: u64 = 1 << 63;
/// L2 flag: compressed cluster.
pub const OFLAG_COMPRESSED: u64 = 1 << 62;
/// L2 flag (standard entries, v3): reads as zeros.
pub const OFLAG_ZERO: u64 = 1;
/// Bits 9..=55: host cluster offset in L1 and standard L2 entries.
pub const L1E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const L2E_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bits 9..=55 of a refcount table entry.
pub const REFT_OFFSET_MASK: u64 = 0xffff_ffff_ffff_fe00;
/// Bitmap table entry: bits 9..=55 are the data cluster offset.
pub const BME_OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
/// Bitmap table entry bits that must be zero.
pub const BME_RESERVED_MASK: u64 = 0xff00_0000_0000_01fe;
/// Bitmap table entry without a data cluster: the whole cluster reads as ones.
pub const BME_ALL_ONES: u64 = 1;
/// Bitmap directory entry flags.
pub const BME_FLAG_IN_USE: u32 = 1 << 0;
pub const BME_FLAG_AUTO: u32 = 1 << 1;
pub const BME_FLAG_EXTRA_DATA_COMPATIBLE: u32 = 1 << 2;
/// The only bitmap type: dirty tracking.
pub const BITMAP_TYPE_DIRTY_TRACKING: u8 = 1;

// ---------------------------------------------------------------- fixed on-disk layouts

/// The fixed header (v2 uses the first [`V2_HEADER_LEN`] bytes).
#[derive(Debug, Clone, Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawHeader {
    pub magic: U32,
    pub version: U32,
    pub backing_file_offset: U64,
    pub backing_file_size: U32,
    pub cluster_bits: U32,
    pub size: U64,
    pub crypt_method: U32,
    pub l1_size: U32,
    pub l1_table_offset: U64,
    pub refcount_table_offset: U64,
    pub refcount_table_clusters: U32,
    pub nb_snapshots: U32,
    pub snapshots_offset: U64,
    pub incompatible_features: U64,
    pub compatible_features: U64,
    pub autoclear_features: U64,
    pub refcount_order: U32,
    pub header_length: U32,
    pub compression_type: u8,
    pub padding: [u8; 7],
}

/// Header byte offsets named in errors and written in place.
pub const HEADER_OFF_BACKING_FILE: u64 = offset_of!(RawHeader, backing_file_offset) as u64;
pub const HEADER_OFF_BACKING_SIZE: u64 = offset_of!(RawHeader, backing_file_size) as u64;
pub const HEADER_OFF_CLUSTER_BITS: u64 = offset_of!(RawHeader, cluster_bits) as u64;
pub const HEADER_OFF_L1_SIZE: u64 = offset_of!(RawHeader, l1_size) as u64;
pub const HEADER_OFF_L1_TABLE: u64 = offset_of!(RawHeader, l1_table_offset) as u64;
pub const HEADER_OFF_REFCOUNT_TABLE: u64 = offset_of!(RawHeader, refcount_table_offset) as u64;
pub const HEADER_OFF_REFCOUNT_CLUSTERS: u64 = offset_of!(RawHeader, refcount_table_clusters) as u64;
pub const HEADER_OFF_SNAPSHOTS: u64 = offset_of!(RawHeader, snapshots_offset) as u64;
pub const HEADER_OFF_INCOMPAT: u64 = offset_of!(RawHeader, incompatible_features) as u64;
pub const HEADER_OFF_REFCOUNT_ORDER: u64 = offset_of!(RawHeader, refcount_order) as u64;
pub const HEADER_OFF_HEADER_LENGTH: u64 = offset_of!(RawHeader, header_length) as u64;
pub const HEADER_OFF_COMPRESSION: u64 = offset_of!(RawHeader, compression_type) as u64;

/// Type and length in front of every header extension.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct RawExtensionHeader {
    kind: U32,
    len: U32,
}

/// One entry of the feature name table extension.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct RawFeatureName {
    kind: u8,
    bit: u8,
    name: [u8; 46],
}

/// The fixed part of a snapshot table entry.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
pub struct RawSnapshotEntry {
    pub l1_table_offset: U64,
    pub l1_size: U32,
    pub id_len: U16,
    pub name_len: U16,
    pub date_sec: U32,
    pub date_nsec: U32,
    pub vm_clock_nsec: U64,
    pub vm_state_size: U32,
    pub extra_len: U32,
}

/// The extra data of a snapshot entry vmdisk knows (each field optional, in this order).
#[derive(Default, FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct RawSnapshotExtra {
    vm_state_size: U64,
    disk_size: U64,
    icount: U64,
}

/// The bitmaps header extension.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct RawBitmapsExtension {
    nb_bitmaps: U32,
    reserved: U32,
    directory_size: U64,
    directory_offset: U64,
}

/// The fixed part of a bitmap directory entry.
#[derive(FromBytes, IntoBytes, Immutable, KnownLayout, Unaligned)]
#[repr(C)]
struct RawBitmapEntry {
    table_offset: U64,
    table_size: U32,
    flags: U32,
    kind: u8,
    granularity_bits: u8,
    name_size: U16,
    extra_size: U32,
}

/// Byte offset of the flags inside a bitmap directory entry (updated in place).
pub const BITMAP_ENTRY_OFF_FLAGS: u64 = offset_of!(RawBitmapEntry, flags) as u64;

/// Decode a table of big-endian u64 entries (L1, L2, refcount and bitmap tables); a trailing
/// partial entry is ignored.
pub fn decode_table(buf: &[u8]) -> Vec<u64> {
    let whole = buf.len() / 8 * 8;
    match <[U64]>::ref_from_bytes(&buf[..whole]) {
        Ok(t) => t.iter().map(|e| e.get()).collect(),
        // Unreachable: `whole` is a multiple of the (unaligned) entry size.
        Err(_) => Vec::new(),
    }
}

/// Encode a table of u64 entries as big-endian bytes.
pub fn encode_table(words: &[u64]) -> Vec<u8> {
    words
        .iter()
        .map(|&w| U64::new(w))
        .collect::<Vec<_>>()
        .as_bytes()
        .to_vec()
}

/// Read a fixed-layout struct from the front of `buf` (None when too short).
fn read_struct<T: FromBytes>(buf: &[u8]) -> Option<T> {
    T::read_from_prefix(buf).ok().map(|(t, _)| t)
}

/// `buf` zero-extended (or cut) to `n` bytes: fields past the end read as 0 ("not present").
fn padded(buf: &[u8], n: usize) -> Vec<u8> {
    let mut v = buf[..buf.len().min(n)].to_vec();
    v.resize(n, 0);
    v
}

fn limit(what: &'static str, needed: u64, limit: u64) -> Qcow2Error {
    Qcow2Error::Limit {
        what,
        needed,
        limit,
    }
}

/// Compression method stored in the header (v3 field at byte 104).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum CompressionType {
    #[default]
    Zlib,
    Zstd,
}

impl CompressionType {
    pub fn as_str(self) -> &'static str {
        match self {
            CompressionType::Zlib => "zlib",
            CompressionType::Zstd => "zstd",
        }
    }
}

/// A header extension vmdisk keeps but does not interpret (bitmaps, unknown ones).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawExtension {
    pub kind: u32,
    pub data: Vec<u8>,
}

/// One entry of the feature name table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FeatureName {
    /// 0 incompatible, 1 compatible, 2 autoclear.
    pub kind: u8,
    pub bit: u8,
    pub name: String,
}

/// The validated qcow2 header (v2 or v3) with its extensions and backing file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub crypt_method: u32,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression_type: CompressionType,
    /// Backing file name (from `backing_file_offset`/`backing_file_size`).
    pub backing_file: Option<String>,
    /// Backing format extension.
    pub backing_format: Option<String>,
    /// Feature name table extension.
    pub feature_names: Vec<FeatureName>,
    /// External data file name extension (its presence alone makes us refuse the image).
    pub data_file: Option<String>,
    /// Extensions kept verbatim (bitmaps, unknown).
    pub other_extensions: Vec<RawExtension>,
}

fn align8(n: usize) -> usize {
    (n + 7) & !7
}

/// Number of L1 entries needed to map `size` bytes.
pub fn l1_entries_for(size: u64, cluster_bits: u32, extended_l2: bool) -> u64 {
    let l2_bits = l2_bits(cluster_bits, extended_l2);
    let per_l1 = 1u64 << (cluster_bits + l2_bits);
    size.div_ceil(per_l1)
}

/// log2 of the number of entries in one L2 table.
pub fn l2_bits(cluster_bits: u32, extended_l2: bool) -> u32 {
    cluster_bits - if extended_l2 { 4 } else { 3 }
}

/// Check `cluster_bits` from a header (or its first 24 bytes).
pub fn check_cluster_bits(bits: u32) -> Result<u32> {
    if (MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&bits) {
        Ok(bits)
    } else {
        Err(Qcow2Error::InvalidClusterBits { bits })
    }
}

/// The magic and cluster size from the first bytes of an image (enough to know how much of
/// the first cluster to read before [`Header::parse`]).
pub fn peek_cluster_bits(first: &[u8]) -> Result<u32> {
    let end = offset_of!(RawHeader, cluster_bits) + 4;
    if first.len() < end || first[..4] != MAGIC.to_be_bytes() {
        return Err(Qcow2Error::CheckingMagic);
    }
    let raw: RawHeader =
        read_struct(&padded(first, size_of::<RawHeader>())).ok_or(Qcow2Error::CheckingMagic)?;
    check_cluster_bits(raw.cluster_bits.get())
}

impl Header {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    pub fn dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }
    pub fn corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
    pub fn lazy_refcounts(&self) -> bool {
        self.compatible_features & COMPAT_LAZY_REFCOUNTS != 0
    }
    /// Entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        1 << l2_bits(self.cluster_bits, self.extended_l2())
    }
    /// Bytes per L2 entry (8, or 16 with extended L2).
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    /// Refcount entries per refcount block.
    pub fn refcount_block_entries(&self) -> u64 {
        (self.cluster_size() * 8) >> self.refcount_order
    }

    /// The bitmaps extension, when present and marked consistent by the autoclear bit (the
    /// spec: without the bit its data "must be considered inconsistent").
    pub fn bitmaps(&self) -> Result<Option<BitmapsExtension>> {
        if self.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return Ok(None);
        }
        match self.other_extensions.iter().find(|e| e.kind == EXT_BITMAPS) {
            None => Ok(None),
            Some(e) => BitmapsExtension::parse(&e.data, self.cluster_size()).map(Some),
        }
    }

    /// Parse and validate a header from the first bytes of an image (ideally the whole first
    /// cluster: extensions and the backing file name must lie inside it).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Qcow2Error::ReadingHeader { what: "header" });
        }
        let raw: RawHeader = read_struct(&padded(buf, size_of::<RawHeader>()))
            .ok_or(Qcow2Error::ReadingHeader { what: "header" })?;
        if raw.magic.get() != MAGIC {
            return Err(Qcow2Error::CheckingMagic);
        }
        let version = raw.version.get();
        if version != 2 && version != 3 {
            return Err(Qcow2Error::UnsupportedVersion { version });
        }
        let cluster_bits = check_cluster_bits(raw.cluster_bits.get())?;
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: raw.backing_file_offset.get(),
            backing_file_size: raw.backing_file_size.get(),
            cluster_bits,
            size: raw.size.get(),
            crypt_method: raw.crypt_method.get(),
            l1_size: raw.l1_size.get(),
            l1_table_offset: raw.l1_table_offset.get(),
            refcount_table_offset: raw.refcount_table_offset.get(),
            refcount_table_clusters: raw.refcount_table_clusters.get(),
            nb_snapshots: raw.nb_snapshots.get(),
            snapshots_offset: raw.snapshots_offset.get(),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            compression_type: CompressionType::Zlib,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            data_file: None,
            other_extensions: Vec::new(),
        };
        if version == 3 {
            if buf.len() < V3_HEADER_MIN_LEN as usize {
                return Err(Qcow2Error::ReadingHeader { what: "v3 header" });
            }
            h.incompatible_features = raw.incompatible_features.get();
            h.compatible_features = raw.compatible_features.get();
            h.autoclear_features = raw.autoclear_features.get();
            h.refcount_order = raw.refcount_order.get();
            h.header_length = raw.header_length.get();
            let bad_len = |why| Qcow2Error::InvalidHeaderLength {
                len: h.header_length,
                why,
            };
            if h.header_length < V3_HEADER_MIN_LEN {
                return Err(bad_len("below 104"));
            }
            if u64::from(h.header_length) > cs {
                return Err(bad_len("larger than a cluster"));
            }
            if h.header_length as usize > buf.len() {
                return Err(bad_len("header runs past the bytes given"));
            }
            if h.refcount_order > MAX_REFCOUNT_ORDER {
                return Err(Qcow2Error::InvalidRefcountOrder {
                    order: h.refcount_order,
                });
            }
        }
        let ctype_byte = if h.header_length > V3_HEADER_MIN_LEN {
            raw.compression_type
        } else {
            0
        };
        h.compression_type = if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            match ctype_byte {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                kind => return Err(Qcow2Error::UnsupportedCompressionType { kind }),
            }
        } else if ctype_byte != 0 {
            return Err(Qcow2Error::CompressionTypeWithoutFeatureBit);
        } else {
            CompressionType::Zlib
        };
        if h.crypt_method != 0 {
            return Err(Qcow2Error::Encrypted {
                how: format!("crypt_method {}", h.crypt_method),
            });
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(limit("qcow2 virtual size", h.size, MAX_VIRTUAL_SIZE));
        }
        let al = |v: u64| v.is_multiple_of(cs);
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(limit("L1 table bytes", l1_bytes, MAX_L1_BYTES));
        }
        let needed = l1_entries_for(h.size, cluster_bits, h.extended_l2());
        if u64::from(h.l1_size) < needed {
            return Err(Qcow2Error::L1TooSmall {
                entries: h.l1_size,
                needed,
            });
        }
        let misaligned = |table, off, field| Qcow2Error::MisalignedTable { table, off, field };
        if h.l1_size > 0 && (h.l1_table_offset == 0 || !al(h.l1_table_offset)) {
            return Err(misaligned(
                Table::L1,
                h.l1_table_offset,
                HEADER_OFF_L1_TABLE,
            ));
        }
        if h.refcount_table_offset == 0 || !al(h.refcount_table_offset) {
            return Err(misaligned(
                Table::RefcountTable,
                h.refcount_table_offset,
                HEADER_OFF_REFCOUNT_TABLE,
            ));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(limit(
                "refcount table bytes",
                rt_bytes,
                MAX_REFCOUNT_TABLE_BYTES,
            ));
        }
        if h.refcount_table_clusters == 0 {
            return Err(Qcow2Error::EmptyRefcountTable);
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(limit(
                "number of snapshots",
                u64::from(h.nb_snapshots),
                u64::from(MAX_SNAPSHOTS),
            ));
        }
        if h.nb_snapshots > 0 && (h.snapshots_offset == 0 || !al(h.snapshots_offset)) {
            return Err(misaligned(
                Table::SnapshotTable,
                h.snapshots_offset,
                HEADER_OFF_SNAPSHOTS,
            ));
        }
        for (table, field, v) in [
            (Table::L1, HEADER_OFF_L1_TABLE, h.l1_table_offset),
            (
                Table::RefcountTable,
                HEADER_OFF_REFCOUNT_TABLE,
                h.refcount_table_offset,
            ),
            (
                Table::SnapshotTable,
                HEADER_OFF_SNAPSHOTS,
                h.snapshots_offset,
            ),
        ] {
            if v > MAX_VIRTUAL_SIZE {
                return Err(Qcow2Error::TableOffsetTooLarge { table, field });
            }
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Qcow2Error::ExternalDataFile);
        }

        // Header extensions.
        let mut pos = h.header_length as usize;
        let ext_end = if h.backing_file_offset != 0 {
            (h.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len().min(cs as usize)
        };
        // v2 images without extensions may end right at the header; qemu tolerates it.
        while let Some(eh) = buf
            .get(pos..ext_end)
            .and_then(read_struct::<RawExtensionHeader>)
        {
            let (kind, len) = (eh.kind.get(), eh.len.get() as usize);
            if kind == EXT_END {
                break;
            }
            let data_at = pos + size_of::<RawExtensionHeader>();
            if len > ext_end.saturating_sub(data_at) {
                return Err(Qcow2Error::ParsingHeaderExtension {
                    kind,
                    at: pos as u64,
                });
            }
            let data = &buf[data_at..data_at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(size_of::<RawFeatureName>()) {
                        let Some(f) = read_struct::<RawFeatureName>(e) else {
                            break;
                        };
                        let name_end = f.name.iter().position(|&b| b == 0).unwrap_or(46);
                        h.feature_names.push(FeatureName {
                            kind: f.kind,
                            bit: f.bit,
                            name: String::from_utf8_lossy(&f.name[..name_end]).into_owned(),
                        });
                    }
                }
                EXT_FULL_DISK_ENCRYPTION => {
                    return Err(Qcow2Error::Encrypted {
                        how: "LUKS header extension".into(),
                    });
                }
                EXT_DATA_FILE => {
                    h.data_file = Some(String::from_utf8_lossy(data).into_owned());
                }
                _ => h.other_extensions.push(RawExtension {
                    kind,
                    data: data.to_vec(),
                }),
            }
            pos = data_at + align8(len);
        }
        if h.data_file.is_some() {
            return Err(Qcow2Error::ExternalDataFile);
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| {
                    h.feature_names
                        .iter()
                        .find(|f| f.kind == 0 && u64::from(f.bit) == b)
                        .map(|f| f.name.clone())
                        .unwrap_or_else(|| format!("bit {b}"))
                })
                .collect();
            return Err(Qcow2Error::UnknownIncompatibleFeatures {
                names: names.join(", "),
            });
        }

        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_FILE_NAME {
                return Err(limit(
                    "backing file name length",
                    u64::from(h.backing_file_size),
                    u64::from(MAX_BACKING_FILE_NAME),
                ));
            }
            let start = h.backing_file_offset;
            let end = start.saturating_add(u64::from(h.backing_file_size));
            if end > cs || end > buf.len() as u64 {
                return Err(Qcow2Error::ReadingBackingFileName);
            }
            h.backing_file =
                Some(String::from_utf8_lossy(&buf[start as usize..end as usize]).into_owned());
        }
        Ok(h)
    }

    /// Serialise header, extensions and backing file name into one buffer (at most a cluster).
    /// `backing_file_offset`/`backing_file_size` are recomputed; `header_length` is kept
    /// (v2: 72; v3: at least 104).
    pub fn serialize(&self) -> Result<Vec<u8>> {
        let hlen = if self.version == 2 {
            V2_HEADER_LEN as usize
        } else {
            (self.header_length.max(V3_HEADER_MIN_LEN)) as usize
        };
        let v3 = self.version == 3;
        let raw = RawHeader {
            magic: MAGIC.into(),
            version: self.version.into(),
            backing_file_offset: 0.into(),
            backing_file_size: 0.into(),
            cluster_bits: self.cluster_bits.into(),
            size: self.size.into(),
            crypt_method: self.crypt_method.into(),
            l1_size: self.l1_size.into(),
            l1_table_offset: self.l1_table_offset.into(),
            refcount_table_offset: self.refcount_table_offset.into(),
            refcount_table_clusters: self.refcount_table_clusters.into(),
            nb_snapshots: self.nb_snapshots.into(),
            snapshots_offset: self.snapshots_offset.into(),
            incompatible_features: if v3 { self.incompatible_features } else { 0 }.into(),
            compatible_features: if v3 { self.compatible_features } else { 0 }.into(),
            autoclear_features: if v3 { self.autoclear_features } else { 0 }.into(),
            refcount_order: if v3 { self.refcount_order } else { 0 }.into(),
            header_length: if v3 { hlen as u32 } else { 0 }.into(),
            compression_type: match self.compression_type {
                CompressionType::Zlib => 0,
                CompressionType::Zstd => 1,
            },
            padding: [0; 7],
        };
        let mut b = padded(raw.as_bytes(), hlen);
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            let eh = RawExtensionHeader {
                kind: kind.into(),
                len: (data.len() as u32).into(),
            };
            b.extend_from_slice(eh.as_bytes());
            b.extend_from_slice(data);
            b.resize(align8(b.len()), 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if !self.feature_names.is_empty() {
            let mut t = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = RawFeatureName {
                    kind: f.kind,
                    bit: f.bit,
                    name: [0; 46],
                };
                let n = f.name.len().min(e.name.len());
                e.name[..n].copy_from_slice(&f.name.as_bytes()[..n]);
                t.extend_from_slice(e.as_bytes());
            }
            push_ext(&mut b, EXT_FEATURE_TABLE, &t);
        }
        if let Some(d) = &self.data_file {
            push_ext(&mut b, EXT_DATA_FILE, d.as_bytes());
        }
        for e in &self.other_extensions {
            push_ext(&mut b, e.kind, &e.data);
        }
        if v3 || self.backing_format.is_some() || !self.other_extensions.is_empty() {
            push_ext(&mut b, EXT_END, &[]);
        }
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_FILE_NAME as usize {
                return Err(limit(
                    "backing file name length",
                    name.len() as u64,
                    u64::from(MAX_BACKING_FILE_NAME),
                ));
            }
            let off = b.len() as u64;
            let (o, n) = (
                HEADER_OFF_BACKING_FILE as usize,
                HEADER_OFF_BACKING_SIZE as usize,
            );
            b[o..o + 8].copy_from_slice(&off.to_be_bytes());
            b[n..n + 4].copy_from_slice(&(name.len() as u32).to_be_bytes());
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(limit(
                "qcow2 header with extensions",
                b.len() as u64,
                self.cluster_size(),
            ));
        }
        Ok(b)
    }

    /// qemu's default feature name table (written by create, like qemu).
    pub fn default_feature_names() -> Vec<FeatureName> {
        let f = |kind: u8, bit: u8, name: &str| FeatureName {
            kind,
            bit,
            name: name.to_string(),
        };
        vec![
            f(0, 0, "dirty bit"),
            f(0, 1, "corrupt bit"),
            f(0, 2, "external data file"),
            f(0, 3, "compression type"),
            f(0, 4, "extended L2 entries"),
            f(1, 0, "lazy refcounts"),
            f(2, 0, "bitmaps"),
            f(2, 1, "raw external data"),
        ]
    }
}

/// Host offset of the L2 table an L1 entry points at (0 = unallocated).
pub fn l1_entry_offset(raw: u64) -> u64 {
    raw & L1E_OFFSET_MASK
}

/// Check an L1 entry; `at` is its host offset (for the error).
pub fn check_l1_entry(raw: u64, cluster_size: u64, at: u64) -> Result<u64> {
    let off = l1_entry_offset(raw);
    if !off.is_multiple_of(cluster_size) {
        return Err(Qcow2Error::DecodingL1Entry { raw, at });
    }
    Ok(off)
}

/// What one (standard part of an) L2 entry says about a guest cluster.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum L2Entry {
    /// Not allocated here: read from the backing file (or zeros).
    Unallocated,
    /// Reads as zeros (v3 zero flag). `host_off` is a preallocated cluster or 0.
    Zero { host_off: u64, copied: bool },
    /// Data at `host_off` (cluster aligned).
    Normal { host_off: u64, copied: bool },
    /// Compressed data at byte `host_off`, `len` bytes to read (sector-rounded, as stored).
    Compressed { host_off: u64, len: u64 },
}

impl L2Entry {
    /// Decode the 64-bit standard descriptor. With extended L2 the zero bit is reserved and
    /// zeros come from the subcluster bitmap. `at` is the entry's host offset (for errors).
    pub fn decode(raw: u64, cluster_bits: u32, extended_l2: bool, at: u64) -> Result<L2Entry> {
        if raw & OFLAG_COMPRESSED != 0 {
            let x = 62 - (cluster_bits - 8);
            let host_off = raw & ((1u64 << x) - 1);
            let sectors = ((raw >> x) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
            let len = sectors * 512 - (host_off & 511);
            return Ok(L2Entry::Compressed { host_off, len });
        }
        let copied = raw & OFLAG_COPIED != 0;
        let host_off = raw & L2E_OFFSET_MASK;
        if host_off & ((1u64 << cluster_bits) - 1) != 0 {
            return Err(Qcow2Error::DecodingL2Entry { raw, at });
        }
        if !extended_l2 && raw & OFLAG_ZERO != 0 {
            return Ok(L2Entry::Zero { host_off, copied });
        }
        if host_off == 0 {
            return Ok(L2Entry::Unallocated);
        }
        Ok(L2Entry::Normal { host_off, copied })
    }

    /// Encode a compressed entry for `len` bytes at byte `host_off`.
    pub fn encode_compressed(host_off: u64, len: u64, cluster_bits: u32) -> u64 {
        let x = 62 - (cluster_bits - 8);
        let nb = ((host_off + len - 1) >> 9) - (host_off >> 9);
        OFLAG_COMPRESSED | host_off | (nb << x)
    }

    /// Host clusters a compressed entry touches: `[first, last]` cluster offsets.
    pub fn compressed_clusters(host_off: u64, len: u64, cluster_size: u64) -> (u64, u64) {
        let first = host_off & !(cluster_size - 1);
        let last = (host_off + len.max(1) - 1) & !(cluster_size - 1);
        (first, last)
    }
}

/// The 64-bit subcluster bitmap of an extended L2 entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubclusterBitmap {
    /// Bit n: subcluster n is allocated (data at host_off + n * subcluster size).
    pub alloc: u32,
    /// Bit n: subcluster n reads as zeros.
    pub zero: u32,
}

/// What one subcluster holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubclusterState {
    Unallocated,
    Zero,
    Data { host_off: u64 },
}

impl SubclusterBitmap {
    pub fn decode(raw: u64) -> Self {
        SubclusterBitmap {
            alloc: raw as u32,
            zero: (raw >> 32) as u32,
        }
    }
    pub fn encode(self) -> u64 {
        u64::from(self.alloc) | (u64::from(self.zero) << 32)
    }

    /// State of subcluster `sc` of a cluster whose standard entry is `entry`.
    pub fn state(self, entry: L2Entry, sc: u32, sc_size: u64, at: u64) -> Result<SubclusterState> {
        let bit = 1u32 << sc;
        let (a, z) = (self.alloc & bit != 0, self.zero & bit != 0);
        match entry {
            L2Entry::Normal { host_off, .. } => match (a, z) {
                (true, true) => Err(Qcow2Error::DecodingSubclusterBitmap {
                    why: "subcluster both allocated and zero",
                    at,
                }),
                (true, false) => Ok(SubclusterState::Data {
                    host_off: host_off + u64::from(sc) * sc_size,
                }),
                (false, true) => Ok(SubclusterState::Zero),
                (false, false) => Ok(SubclusterState::Unallocated),
            },
            L2Entry::Unallocated | L2Entry::Zero { .. } => {
                if a {
                    return Err(Qcow2Error::DecodingSubclusterBitmap {
                        why: "allocated subcluster in an unallocated cluster",
                        at,
                    });
                }
                Ok(if z {
                    SubclusterState::Zero
                } else {
                    SubclusterState::Unallocated
                })
            }
            L2Entry::Compressed { .. } => Ok(SubclusterState::Unallocated),
        }
    }
}

/// Read refcount entry `index` of a refcount block with 2^order-bit entries. Out-of-range
/// indexes read as 0 (callers compute indexes from the block size, so this never happens).
pub fn refcount_get(block: &[u8], index: u64, order: u32) -> u64 {
    let bits = 1u64 << order;
    let bit_pos = index.saturating_mul(bits);
    let byte = (bit_pos / 8) as usize;
    match order {
        0..=2 => {
            let Some(&v) = block.get(byte) else { return 0 };
            let shift = (bit_pos % 8) as u32;
            (u64::from(v) >> shift) & ((1 << bits) - 1)
        }
        _ => {
            let n = (bits / 8) as usize;
            let Some(s) = block.get(byte..byte + n) else {
                return 0;
            };
            s.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
        }
    }
}

/// Largest refcount a 2^order-bit entry can hold.
pub fn refcount_max(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

/// Set refcount entry `index`. Fails with `Qcow2Error::Limit` when `value` does not fit the width,
/// and `OutOfRange` when the index is outside the block.
pub fn refcount_set(block: &mut [u8], index: u64, order: u32, value: u64) -> Result<()> {
    if value > refcount_max(order) {
        return Err(limit("refcount", value, refcount_max(order)));
    }
    let bits = 1u64 << order;
    let bit_pos = index.saturating_mul(bits);
    let byte = (bit_pos / 8) as usize;
    let blen = block.len() as u64;
    match order {
        0..=2 => {
            let Some(v) = block.get_mut(byte) else {
                return Err(Qcow2Error::Host(vmdisk_block::Error::OutOfRange {
                    off: index,
                    len: 1,
                    size: blen,
                }));
            };
            let shift = (bit_pos % 8) as u32;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            *v = (*v & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let n = (bits / 8) as usize;
            let Some(s) = block.get_mut(byte..byte + n) else {
                return Err(Qcow2Error::Host(vmdisk_block::Error::OutOfRange {
                    off: index,
                    len: 1,
                    size: blen,
                }));
            };
            let be = value.to_be_bytes();
            s.copy_from_slice(&be[8 - n..]);
        }
    }
    Ok(())
}

/// One entry of the snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotHeader {
    pub l1_table_offset: u64,
    pub l1_size: u32,
    pub id: String,
    pub name: String,
    pub date_sec: u32,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    /// VM state size (the 64-bit extra field when present, else the 32-bit one).
    pub vm_state_size: u64,
    /// Virtual disk size when the snapshot was taken (extra data, v3).
    pub disk_size: Option<u64>,
    /// Instruction count (extra data; None when absent or -1).
    pub icount: Option<u64>,
    /// Extra data beyond the three fields vmdisk knows, kept verbatim.
    pub extra_tail: Vec<u8>,
}

/// Bytes of the fixed part of a snapshot table entry.
pub const SNAPSHOT_ENTRY_FIXED: usize = size_of::<RawSnapshotEntry>();

/// How much of a snapshot table a buffer holds (see [`SnapshotHeader::table_extent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableExtent {
    /// The whole table: `len` bytes up to the end of the last entry (qemu's table size).
    Complete { len: u64 },
    /// The buffer ends inside the table: at least `len` bytes are needed.
    NeedMore { len: u64 },
}

impl SnapshotHeader {
    /// Walk the entry lengths of a table of `nb` entries whose first `buf.len()` bytes are
    /// given (`base`: its host offset). Checks the named limits on the way, so a reader can
    /// grow its buffer to `NeedMore { len }` without trusting anything unchecked.
    pub fn table_extent(buf: &[u8], nb: u32, base: u64) -> Result<TableExtent> {
        if nb > MAX_SNAPSHOTS {
            return Err(limit(
                "number of snapshots",
                u64::from(nb),
                u64::from(MAX_SNAPSHOTS),
            ));
        }
        let mut pos = 0u64;
        let mut end = 0u64;
        for _ in 0..nb {
            let Some(fixed) = buf
                .get(pos as usize..)
                .and_then(read_struct::<RawSnapshotEntry>)
            else {
                return Ok(TableExtent::NeedMore {
                    len: pos + SNAPSHOT_ENTRY_FIXED as u64,
                });
            };
            let extra = fixed.extra_len.get();
            if extra > MAX_SNAPSHOT_EXTRA_DATA {
                return Err(limit(
                    "snapshot extra data",
                    u64::from(extra),
                    u64::from(MAX_SNAPSHOT_EXTRA_DATA),
                ));
            }
            end = pos
                + SNAPSHOT_ENTRY_FIXED as u64
                + u64::from(extra)
                + u64::from(fixed.id_len.get())
                + u64::from(fixed.name_len.get());
            if end > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(limit("snapshot table bytes", end, MAX_SNAPSHOT_TABLE_BYTES));
            }
            if end > buf.len() as u64 {
                return Ok(TableExtent::NeedMore { len: end });
            }
            pos = end.next_multiple_of(8);
        }
        let _ = base;
        Ok(TableExtent::Complete { len: end })
    }

    /// Parse `nb` entries from `buf` (the table's bytes); `base` is its host offset.
    pub fn parse_table(buf: &[u8], nb: u32, base: u64) -> Result<Vec<SnapshotHeader>> {
        let len = match Self::table_extent(buf, nb, base)? {
            TableExtent::Complete { len } => len,
            TableExtent::NeedMore { .. } => {
                return Err(Qcow2Error::ParsingSnapshotTable {
                    what: "snapshot table",
                    at: base + buf.len() as u64,
                })
            }
        };
        let buf = &buf[..len as usize];
        let mut out = Vec::with_capacity(nb.min(1024) as usize);
        let mut pos = 0usize;
        for _ in 0..nb {
            let at = base + pos as u64;
            let e = &buf[pos..];
            // table_extent proved every entry (fixed part, extra, id, name) is inside `buf`.
            let Some(fixed) = read_struct::<RawSnapshotEntry>(e) else {
                return Err(Qcow2Error::ParsingSnapshotTable {
                    what: "snapshot table",
                    at,
                });
            };
            let extra_len = fixed.extra_len.get() as usize;
            let (id_len, name_len) = (
                usize::from(fixed.id_len.get()),
                usize::from(fixed.name_len.get()),
            );
            let total = SNAPSHOT_ENTRY_FIXED + extra_len + id_len + name_len;
            if e.len() < total {
                return Err(Qcow2Error::ParsingSnapshotTable {
                    what: "snapshot table",
                    at,
                });
            }
            let l1_size = fixed.l1_size.get();
            if u64::from(l1_size) * 8 > MAX_L1_BYTES {
                return Err(limit(
                    "snapshot L1 table bytes",
                    u64::from(l1_size) * 8,
                    MAX_L1_BYTES,
                ));
            }
            let extra = &e[SNAPSHOT_ENTRY_FIXED..SNAPSHOT_ENTRY_FIXED + extra_len];
            let known: RawSnapshotExtra =
                read_struct(&padded(extra, size_of::<RawSnapshotExtra>())).unwrap_or_default();
            let has = |field_end: usize| extra.len() >= field_end;
            let vm_state_size = if has(8) {
                known.vm_state_size.get()
            } else {
                u64::from(fixed.vm_state_size.get())
            };
            let disk_size = has(16).then(|| known.disk_size.get());
            let icount = if has(24) {
                let v = known.icount.get();
                (v != u64::MAX).then_some(v)
            } else {
                None
            };
            let extra_tail = extra
                .get(size_of::<RawSnapshotExtra>()..)
                .unwrap_or(&[])
                .to_vec();
            let id_at = SNAPSHOT_ENTRY_FIXED + extra_len;
            let id = String::from_utf8_lossy(&e[id_at..id_at + id_len]).into_owned();
            let name =
                String::from_utf8_lossy(&e[id_at + id_len..id_at + id_len + name_len]).into_owned();
            out.push(SnapshotHeader {
                l1_table_offset: fixed.l1_table_offset.get(),
                l1_size,
                id,
                name,
                date_sec: fixed.date_sec.get(),
                date_nsec: fixed.date_nsec.get(),
                vm_clock_nsec: fixed.vm_clock_nsec.get(),
                vm_state_size,
                disk_size,
                icount,
                extra_tail,
            });
            pos = align8(pos + total);
        }
        Ok(out)
    }

    /// Serialise a snapshot table (each entry padded to 8 bytes). Extra data is always 24
    /// bytes (vm state size, disk size, icount) plus any kept tail, as qemu writes it.
    pub fn serialize_table(snaps: &[SnapshotHeader]) -> Vec<u8> {
        let mut b = Vec::new();
        for s in snaps {
            let start = b.len();
            let extra = RawSnapshotExtra {
                vm_state_size: s.vm_state_size.into(),
                disk_size: s.disk_size.unwrap_or(0).into(),
                icount: s.icount.unwrap_or(u64::MAX).into(),
            };
            let fixed = RawSnapshotEntry {
                l1_table_offset: s.l1_table_offset.into(),
                l1_size: s.l1_size.into(),
                id_len: (s.id.len() as u16).into(),
                name_len: (s.name.len() as u16).into(),
                date_sec: s.date_sec.into(),
                date_nsec: s.date_nsec.into(),
                vm_clock_nsec: s.vm_clock_nsec.into(),
                vm_state_size: u32::try_from(s.vm_state_size).unwrap_or(0).into(),
                extra_len: ((size_of::<RawSnapshotExtra>() + s.extra_tail.len()) as u32).into(),
            };
            b.extend_from_slice(fixed.as_bytes());
            b.extend_from_slice(extra.as_bytes());
            b.extend_from_slice(&s.extra_tail);
            b.extend_from_slice(s.id.as_bytes());
            b.extend_from_slice(s.name.as_bytes());
            let pad = align8(b.len() - start) + start;
            b.resize(pad, 0);
        }
        b
    }
}

/// Refuse a snapshot name or id qemu would cut short (or that does not fit the table).
pub fn check_snapshot_name(field: &'static str, s: &str) -> Result<()> {
    let limit = if field == "id" {
        MAX_SNAPSHOT_ID_BYTES
    } else {
        MAX_SNAPSHOT_NAME_BYTES
    };
    if s.len() > limit {
        return Err(Qcow2Error::SnapshotNameTooLong {
            field,
            len: s.len(),
            limit,
        });
    }
    Ok(())
}

// ---------------------------------------------------------------- persistent bitmaps

/// The bitmaps header extension: where the bitmap directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BitmapsExtension {
    pub nb_bitmaps: u32,
    pub directory_size: u64,
    pub directory_offset: u64,
}

impl BitmapsExtension {
    /// Parse and validate the extension data (`cs`: cluster size).
    pub fn parse(data: &[u8], cs: u64) -> Result<Self> {
        let bad = |why: String| Qcow2Error::ParsingBitmapsExtension { why, at: 0 };
        let raw: RawBitmapsExtension =
            read_struct(data).ok_or_else(|| bad(format!("{} bytes, needs 24", data.len())))?;
        let e = BitmapsExtension {
            nb_bitmaps: raw.nb_bitmaps.get(),
            directory_size: raw.directory_size.get(),
            directory_offset: raw.directory_offset.get(),
        };
        if e.nb_bitmaps > MAX_BITMAPS {
            return Err(limit(
                "number of bitmaps",
                u64::from(e.nb_bitmaps),
                u64::from(MAX_BITMAPS),
            ));
        }
        if e.directory_size > MAX_BITMAP_DIRECTORY_BYTES {
            return Err(limit(
                "bitmap directory bytes",
                e.directory_size,
                MAX_BITMAP_DIRECTORY_BYTES,
            ));
        }
        if e.nb_bitmaps > 0 && !e.directory_offset.is_multiple_of(cs) {
            return Err(bad(format!(
                "directory offset {:#x} not cluster aligned",
                e.directory_offset
            )));
        }
        Ok(e)
    }
}

/// One bitmap of the bitmap directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapEntry {
    pub table_offset: u64,
    pub table_size: u32,
    pub flags: u32,
    pub kind: u8,
    pub granularity_bits: u8,
    pub name: String,
    pub extra_data_size: u32,
    /// Host offset of this directory entry (its flags are updated in place).
    pub at: u64,
}

/// What one bitmap table entry says about its cluster of bitmap data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BitmapCluster {
    Zeros,
    Ones,
    Data { host_off: u64 },
}

impl BitmapEntry {
    pub fn in_use(&self) -> bool {
        self.flags & BME_FLAG_IN_USE != 0
    }
    pub fn auto(&self) -> bool {
        self.flags & BME_FLAG_AUTO != 0
    }
    /// Bytes of the guest disk one bit covers (granularity_bits is at most 255: saturates).
    pub fn granularity(&self) -> u64 {
        1u64.checked_shl(u32::from(self.granularity_bits))
            .unwrap_or(u64::MAX)
    }
    /// Flags as `qemu-img info` names them.
    pub fn flag_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.in_use() {
            v.push("in-use");
        }
        if self.auto() {
            v.push("auto");
        }
        v
    }

    /// Why vmdisk cannot keep this bitmap up to date itself (None: it can), for a disk of
    /// `size` bytes with clusters of `cs` bytes.
    pub fn unmaintainable(&self, size: u64, cs: u64) -> Option<&'static str> {
        if self.kind != BITMAP_TYPE_DIRTY_TRACKING {
            return Some("not a dirty-tracking bitmap");
        }
        if !(MIN_BITMAP_GRANULARITY_BITS..=MAX_BITMAP_GRANULARITY_BITS)
            .contains(&self.granularity_bits)
        {
            return Some("granularity outside 512 B ..= 2 GiB");
        }
        if self.extra_data_size != 0 && self.flags & BME_FLAG_EXTRA_DATA_COMPATIBLE == 0 {
            return Some("unknown extra data");
        }
        if self.flags & !(BME_FLAG_IN_USE | BME_FLAG_AUTO | BME_FLAG_EXTRA_DATA_COMPATIBLE) != 0 {
            return Some("reserved flags set");
        }
        let data = self.data_bytes(size);
        if data > MAX_BITMAP_DATA_BYTES {
            return Some("bitmap data above qemu's size limit");
        }
        if u64::from(self.table_size) < data.div_ceil(cs)
            || self.table_size > MAX_BITMAP_TABLE_ENTRIES
        {
            return Some("bitmap table does not match the disk size");
        }
        if self.table_offset == 0 || !self.table_offset.is_multiple_of(cs) {
            return Some("bitmap table not cluster aligned");
        }
        None
    }

    /// Bytes of bitmap data for a disk of `size` bytes.
    pub fn data_bytes(&self, size: u64) -> u64 {
        size.div_ceil(self.granularity()).div_ceil(8)
    }

    /// Parse the `nb` entries of a bitmap directory (`buf`, at host offset `base`).
    pub fn parse_directory(buf: &[u8], nb: u32, base: u64) -> Result<Vec<BitmapEntry>> {
        if nb > MAX_BITMAPS {
            return Err(limit(
                "number of bitmaps",
                u64::from(nb),
                u64::from(MAX_BITMAPS),
            ));
        }
        let mut out = Vec::with_capacity(nb.min(1024) as usize);
        let mut pos = 0usize;
        for _ in 0..nb {
            let at = base + pos as u64;
            let bad = |why: &str| Qcow2Error::ParsingBitmapDirectory {
                why: why.to_string(),
                at,
            };
            let raw: RawBitmapEntry = buf
                .get(pos..)
                .and_then(read_struct)
                .ok_or_else(|| bad("bitmap directory truncated"))?;
            let name_size = raw.name_size.get();
            let extra = raw.extra_size.get();
            if name_size == 0 || name_size > MAX_BITMAP_NAME_BYTES {
                return Err(bad("bitmap name empty or longer than 1023 bytes"));
            }
            let fixed = size_of::<RawBitmapEntry>();
            let name_at = (pos + fixed)
                .checked_add(extra as usize)
                .ok_or_else(|| bad("bitmap directory truncated"))?;
            let name = buf
                .get(name_at..name_at + usize::from(name_size))
                .ok_or_else(|| bad("bitmap directory truncated"))?;
            out.push(BitmapEntry {
                table_offset: raw.table_offset.get(),
                table_size: raw.table_size.get(),
                flags: raw.flags.get(),
                kind: raw.kind,
                granularity_bits: raw.granularity_bits,
                name: String::from_utf8_lossy(name).into_owned(),
                extra_data_size: extra,
                at,
            });
            pos = align8(name_at + usize::from(name_size));
        }
        Ok(out)
    }

    /// Decode one bitmap table entry (`at`: its host offset) for clusters of `cs` bytes.
    pub fn decode_table_entry(raw: u64, cs: u64, at: u64) -> Result<BitmapCluster> {
        let off = raw & BME_OFFSET_MASK;
        if raw & BME_RESERVED_MASK != 0 || !off.is_multiple_of(cs) {
            return Err(Qcow2Error::DecodingBitmapTableEntry { raw, at });
        }
        Ok(match (off, raw & BME_ALL_ONES) {
            (0, 0) => BitmapCluster::Zeros,
            (0, _) => BitmapCluster::Ones,
            (host_off, _) => BitmapCluster::Data { host_off },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(version: u32) -> Header {
        Header {
            version,
            backing_file_offset: 0,
            backing_file_size: 0,
            cluster_bits: 16,
            size: 1 << 30,
            crypt_method: 0,
            l1_size: 2,
            l1_table_offset: 3 << 16,
            refcount_table_offset: 1 << 16,
            refcount_table_clusters: 1,
            nb_snapshots: 0,
            snapshots_offset: 0,
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: if version == 3 { 112 } else { 72 },
            compression_type: CompressionType::Zlib,
            backing_file: Some("base.raw".into()),
            backing_format: Some("raw".into()),
            feature_names: if version == 3 {
                Header::default_feature_names()
            } else {
                vec![]
            },
            data_file: None,
            other_extensions: vec![],
        }
    }

    #[test]
    fn header_roundtrip() {
        for v in [2, 3] {
            let h = sample(v);
            let mut b = h.serialize().unwrap();
            b.resize(65536, 0);
            let mut p = Header::parse(&b).unwrap();
            p.backing_file_offset = 0;
            p.backing_file_size = 0;
            assert_eq!(p, h);
        }
    }

    fn put(b: &mut [u8], at: u64, v: &[u8]) {
        b[at as usize..at as usize + v.len()].copy_from_slice(v);
    }

    #[test]
    fn refuses_bad_headers() {
        let mut b = sample(3).serialize().unwrap();
        b.resize(65536, 0);
        let mut enc = b.clone();
        put(
            &mut enc,
            offset_of!(RawHeader, crypt_method) as u64,
            &1u32.to_be_bytes(),
        );
        assert!(matches!(
            Header::parse(&enc),
            Err(Qcow2Error::Encrypted { .. })
        ));
        let mut unk = b.clone();
        put(&mut unk, HEADER_OFF_INCOMPAT, &(1u64 << 20).to_be_bytes());
        assert!(matches!(
            Header::parse(&unk),
            Err(Qcow2Error::UnknownIncompatibleFeatures { .. })
        ));
        let mut cb = b.clone();
        put(&mut cb, HEADER_OFF_CLUSTER_BITS, &22u32.to_be_bytes());
        assert!(matches!(
            Header::parse(&cb),
            Err(Qcow2Error::InvalidClusterBits { bits: 22 })
        ));
        let mut l1 = b.clone();
        put(&mut l1, HEADER_OFF_L1_SIZE, &u32::MAX.to_be_bytes());
        assert!(matches!(Header::parse(&l1), Err(Qcow2Error::Limit { .. })));
        for n in 0..b.len().min(300) {
            let _ = Header::parse(&b[..n]);
        }
    }

    #[test]
    fn header_layout_matches_the_spec() {
        // qcow2.txt: v2 header is 72 bytes, v3 at least 104, compression type at 104.
        assert_eq!(V2_HEADER_LEN, 72);
        assert_eq!(V3_HEADER_MIN_LEN, 104);
        assert_eq!(V3_HEADER_LEN, 112);
        assert_eq!(HEADER_OFF_CLUSTER_BITS, 20);
        assert_eq!(HEADER_OFF_INCOMPAT, 72);
        assert_eq!(SNAPSHOT_ENTRY_FIXED, 40);
        assert_eq!(size_of::<RawBitmapEntry>(), 24);
        assert_eq!(size_of::<RawBitmapsExtension>(), 24);
        assert_eq!(BITMAP_ENTRY_OFF_FLAGS, 12);
    }

    #[test]
    fn tables_roundtrip() {
        let w = vec![0u64, 1, u64::MAX, 0x0102_0304_0506_0708];
        let b = encode_table(&w);
        assert_eq!(&b[24..], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(decode_table(&b), w);
        assert_eq!(decode_table(&b[..31]), w[..3]);
    }

    #[test]
    fn snapshot_names_longer_than_qemus_are_refused() {
        assert!(check_snapshot_name("name", &"x".repeat(255)).is_ok());
        assert!(matches!(
            check_snapshot_name("name", &"x".repeat(256)),
            Err(Qcow2Error::SnapshotNameTooLong { limit: 255, .. })
        ));
        assert!(check_snapshot_name("id", &"1".repeat(127)).is_ok());
        assert!(check_snapshot_name("id", &"1".repeat(128)).is_err());
    }

    #[test]
    fn refcounts_every_width() {
        for order in 0..=6u32 {
            let mut block = vec![0u8; 512];
            let n = (512 * 8) >> order;
            let max = refcount_max(order);
            for i in 0..n {
                refcount_set(&mut block, i, order, (i * 7 + 3) & max).unwrap();
            }
            for i in 0..n {
                assert_eq!(refcount_get(&block, i, order), (i * 7 + 3) & max);
            }
            if order < 6 {
                assert!(refcount_set(&mut block, 0, order, max + 1).is_err());
            }
            assert!(refcount_set(&mut block, n, order, 0).is_err());
        }
        // Bit order within a byte: entry 0 is the least significant bit.
        let mut b = vec![0u8; 1];
        refcount_set(&mut b, 0, 0, 1).unwrap();
        assert_eq!(b[0], 1);
    }

    #[test]
    fn l2_entries() {
        let e = L2Entry::encode_compressed(0x12345, 1000, 16);
        match L2Entry::decode(e, 16, false, 0).unwrap() {
            L2Entry::Compressed { host_off, len } => {
                assert_eq!(host_off, 0x12345);
                assert!((1000..1000 + 512).contains(&len));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            L2Entry::decode(OFLAG_COPIED | 0x30000, 16, false, 0).unwrap(),
            L2Entry::Normal {
                host_off: 0x30000,
                copied: true
            }
        );
        assert_eq!(
            L2Entry::decode(1, 16, false, 0).unwrap(),
            L2Entry::Zero {
                host_off: 0,
                copied: false
            }
        );
        assert!(L2Entry::decode(0x30200, 16, false, 0).is_err());
        assert_eq!(
            L2Entry::decode(0, 16, false, 0).unwrap(),
            L2Entry::Unallocated
        );
    }

    #[test]
    fn snapshot_table_roundtrip() {
        let s = SnapshotHeader {
            l1_table_offset: 0x50000,
            l1_size: 2,
            id: "1".into(),
            name: "before".into(),
            date_sec: 5,
            date_nsec: 6,
            vm_clock_nsec: 7,
            vm_state_size: 0,
            disk_size: Some(1 << 30),
            icount: None,
            extra_tail: vec![],
        };
        let t = SnapshotHeader::serialize_table(&[s.clone(), s.clone()]);
        assert_eq!(t.len() % 8, 0);
        let back = SnapshotHeader::parse_table(&t, 2, 0).unwrap();
        assert_eq!(back, vec![s.clone(), s]);
        // The final padding byte is optional; every shorter prefix is refused.
        for n in 0..t.len() - 1 {
            assert!(SnapshotHeader::parse_table(&t[..n], 2, 0).is_err());
        }
    }
}
