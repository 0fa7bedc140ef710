//! qcow2: parse, validate, map, read, write, create, snapshots, compression.
//!
//! vmdisk's own implementation of qemu's qcow2 format (v2 = compat 0.10, v3 = compat 1.1).
//! [`meta`] turns on-disk bytes into validated structures and back and never does IO;
//! [`Qcow2Image`] is a [`BlockDevice`] over a host `BlockDevice` (and an optional, already
//! opened backing device); [`create`], [`snapshot`] and [`check`] work on host devices.
//! Nothing here opens files by path.
//!
//! On-disk layout (all integers big-endian; offsets are host byte offsets):
//!
//! ```text
//!  cluster 0   header (magic "QFI\xfb", version, cluster_bits, size, L1/refcount/snapshot
//!              table pointers, v3 feature bits, refcount_order, compression type)
//!              + header extensions (backing format, feature names, bitmaps, ...) + backing name
//!  refcount table ──▶ refcount blocks ──▶ one 2^refcount_order-bit count per host cluster
//!  L1 table (active) ──▶ L2 tables ──▶ per guest cluster: data cluster | zero | compressed
//!                                      (extended L2: + 32 subcluster alloc/zero bits)
//!  snapshot table ──▶ per snapshot: its own L1 copy (sharing L2/data clusters via refcounts)
//!
//!  guest offset = (l1_index << (l2_bits + cluster_bits)) | (l2_index << cluster_bits) | in_cluster
//!  COPIED flag (bit 63) in L1/L2 entries <=> refcount of the pointed-to cluster is exactly 1
//! ```
//!
//! Errors: inside the engine every step returns [`Qcow2Error`], one variant per failed step
//! (`ReadingHeader`, `InvalidClusterBits { bits }`, `DecodingL2Entry { raw, at }`, ...). Every
//! public entry point returns [`vmdisk_block::Error`]; the one mapping (`From<Qcow2Error>`,
//! in [`error`]) keeps the classes distinct:
//! - `Corrupt { what, off }`: metadata is inconsistent; `off` is the host offset of the bad
//!   structure (header field, L1/L2 entry, refcount block, snapshot table entry);
//! - `Unsupported { what }`: a feature or request we refuse (encryption: never returned as
//!   ciphertext; external data files; unknown incompatible bits; writes to extended-L2
//!   images; snapshot names qemu would cut short);
//! - `Limit { what, needed, limit }`: an untrusted size above a named limit in [`meta`] —
//!   never reported as corrupt;
//! - `Io { .. }` and `OutOfRange` from the host device pass through unchanged; `OutOfRange`
//!   is also a guest request beyond the virtual size; `ReadOnly` for writes to an image
//!   opened read-only.
//!
//! Persistent dirty bitmaps (the "bitmaps" extension) are kept valid, as qemu's spec asks of
//! every writer (see `bitmap.rs`): IN_USE while the image is being written, the
//! "auto" bitmaps updated for every guest change and released on close.

#![forbid(unsafe_code)]

mod amend;
mod bitmap;
pub mod check;
mod create;
pub mod error;
mod image;
pub mod meta;
mod resize;
pub mod snapshot;

pub use amend::{AmendOptions, AmendReport};
pub use create::create;
pub use error::Qcow2Error;
pub use image::Qcow2Image;
pub use meta::CompressionType;
pub use resize::{ResizePrealloc, RESIZE_ALIGN};
pub use vmdisk_block::{BlockDevice, Error, Result};

use error::Result as QResult;

/// How `create` preallocates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Preallocation {
    #[default]
    Off,
    /// Allocate every L2 table and data cluster (data left unwritten), like qemu.
    Metadata,
}

/// Options of [`create`]; `Default` is v3, 64 KiB clusters, 16-bit refcounts, zlib, no
/// preallocation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateOptions {
    pub size: u64,
    pub cluster_size: u64,
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: u32,
    pub refcount_bits: u32,
    pub compression: CompressionType,
    pub lazy_refcounts: bool,
    pub preallocation: Preallocation,
    pub extended_l2: bool,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            refcount_bits: 16,
            compression: CompressionType::Zlib,
            lazy_refcounts: false,
            preallocation: Preallocation::Off,
            extended_l2: false,
            backing_file: None,
            backing_format: None,
        }
    }
}

/// What `qemu-img info` shows about a qcow2, from its header and snapshot table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Qcow2Info {
    pub version: u32,
    pub virtual_size: u64,
    pub cluster_size: u64,
    pub refcount_bits: u32,
    pub compression_type: CompressionType,
    pub lazy_refcounts: bool,
    pub dirty: bool,
    pub corrupt: bool,
    pub extended_l2: bool,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    pub snapshots: Vec<SnapshotInfo>,
    /// Persistent bitmaps (only when the extension is marked consistent), as `qemu-img info`
    /// lists them.
    pub bitmaps: Vec<BitmapInfo>,
}

/// One persistent dirty bitmap, as `qemu-img info` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BitmapInfo {
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
    /// qemu's flag names: "in-use", "auto".
    pub flags: Vec<&'static str>,
}

/// One internal snapshot, as `qemu-img snapshot -l` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    pub id: String,
    pub name: String,
    pub vm_state_size: u64,
    pub date_sec: u64,
    pub date_nsec: u32,
    pub vm_clock_nsec: u64,
    pub icount: Option<u64>,
}

impl SnapshotInfo {
    pub(crate) fn from_header(s: &meta::SnapshotHeader) -> Self {
        SnapshotInfo {
            id: s.id.clone(),
            name: s.name.clone(),
            vm_state_size: s.vm_state_size,
            date_sec: u64::from(s.date_sec),
            date_nsec: s.date_nsec,
            vm_clock_nsec: s.vm_clock_nsec,
            icount: s.icount,
        }
    }
}

impl Qcow2Info {
    pub(crate) fn from_header(
        h: &meta::Header,
        snaps: &[meta::SnapshotHeader],
        bitmaps: &[meta::BitmapEntry],
    ) -> Self {
        Qcow2Info {
            version: h.version,
            virtual_size: h.size,
            cluster_size: h.cluster_size(),
            refcount_bits: h.refcount_bits(),
            compression_type: h.compression_type,
            lazy_refcounts: h.lazy_refcounts(),
            dirty: h.dirty(),
            corrupt: h.corrupt(),
            extended_l2: h.extended_l2(),
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format.clone(),
            snapshots: snaps.iter().map(SnapshotInfo::from_header).collect(),
            bitmaps: bitmaps
                .iter()
                .map(|b| BitmapInfo {
                    name: b.name.clone(),
                    granularity: b.granularity(),
                    flags: b.flag_names(),
                })
                .collect(),
        }
    }
}

/// True when `first_bytes` start with the qcow2 magic "QFI\xfb".
pub fn probe(first_bytes: &[u8]) -> bool {
    first_bytes.len() >= 4 && first_bytes[..4] == meta::MAGIC.to_be_bytes()
}

/// Read and validate the header (first cluster) of the qcow2 on `host`.
pub(crate) fn read_header_raw(host: &dyn BlockDevice) -> QResult<meta::Header> {
    let len = host.len();
    let mut first = vec![0u8; len.min(u64::from(meta::V3_HEADER_LEN)) as usize];
    host.read_exact_at(&mut first, 0)?;
    let bits = meta::peek_cluster_bits(&first)?;
    let mut buf = vec![0u8; len.min(1u64 << bits) as usize];
    host.read_exact_at(&mut buf, 0)?;
    meta::Header::parse(&buf)
}

/// Read `len` bytes of metadata at `off`, refusing ranges outside the host file as corrupt
/// (the one way every table is read from the host).
pub(crate) fn read_meta(
    host: &dyn BlockDevice,
    off: u64,
    len: u64,
    table: error::Table,
) -> QResult<Vec<u8>> {
    if off.checked_add(len).is_none_or(|e| e > host.len()) {
        return Err(Qcow2Error::TableBeyondEnd { table, off });
    }
    let mut buf = vec![0u8; len as usize];
    host.read_exact_at(&mut buf, off)?;
    Ok(buf)
}

/// Read the snapshot table described by `h`: the entries, and the table's length in bytes as
/// qemu counts it (up to the end of the last entry). The one reader of the snapshot table:
/// it grows its buffer only to what the already-validated entry lengths ask for.
pub(crate) fn read_snapshots(
    host: &dyn BlockDevice,
    h: &meta::Header,
) -> QResult<(Vec<meta::SnapshotHeader>, u64)> {
    if h.nb_snapshots == 0 {
        return Ok((Vec::new(), 0));
    }
    let base = h.snapshots_offset;
    let avail = host.len().saturating_sub(base);
    // A first guess that fits most tables in one read (qemu's entries are ~64 bytes).
    let mut buf = Vec::new();
    let mut want = (u64::from(h.nb_snapshots) * 64).clamp(4096, 1 << 20);
    loop {
        let have = buf.len() as u64;
        let upto = want.min(avail).min(meta::MAX_SNAPSHOT_TABLE_BYTES);
        if upto > have {
            buf.resize(upto as usize, 0);
            host.read_exact_at(&mut buf[have as usize..], base + have)?;
        }
        match meta::SnapshotHeader::table_extent(&buf, h.nb_snapshots, base)? {
            meta::TableExtent::Complete { len } => {
                let snaps = meta::SnapshotHeader::parse_table(&buf, h.nb_snapshots, base)?;
                return Ok((snaps, len));
            }
            meta::TableExtent::NeedMore { len } if len > avail => {
                return Err(Qcow2Error::ParsingSnapshotTable {
                    what: "snapshot table",
                    at: base + avail,
                });
            }
            meta::TableExtent::NeedMore { len } if len > meta::MAX_SNAPSHOT_TABLE_BYTES => {
                return Err(Qcow2Error::Limit {
                    what: "snapshot table bytes",
                    needed: len,
                    limit: meta::MAX_SNAPSHOT_TABLE_BYTES,
                });
            }
            // Grows every round: `len` is above what the buffer holds and within both bounds.
            meta::TableExtent::NeedMore { len } => want = len.max(want.saturating_mul(2)),
        }
    }
}

/// Read the persistent-bitmap directory of `h` (empty without a consistent extension).
pub(crate) fn read_bitmaps(
    host: &dyn BlockDevice,
    h: &meta::Header,
) -> QResult<Vec<meta::BitmapEntry>> {
    let Some(ext) = h.bitmaps()? else {
        return Ok(Vec::new());
    };
    if ext.nb_bitmaps == 0 {
        return Ok(Vec::new());
    }
    let dir = read_meta(
        host,
        ext.directory_offset,
        ext.directory_size,
        error::Table::BitmapDirectory,
    )?;
    meta::BitmapEntry::parse_directory(&dir, ext.nb_bitmaps, ext.directory_offset)
}

/// Parse the header of a qcow2 without opening it (backing name/format for the factory).
pub fn read_header(host: &dyn BlockDevice) -> Result<Qcow2Info> {
    let h = read_header_raw(host)?;
    let (snaps, _) = read_snapshots(host, &h)?;
    let bitmaps = read_bitmaps(host, &h)?;
    Ok(Qcow2Info::from_header(&h, &snaps, &bitmaps))
}

/// Compress one cluster for this image type; `None` when it does not shrink.
pub fn compress_cluster(
    ctype: CompressionType,
    cluster_size: u64,
    data: &[u8],
) -> Result<Option<Vec<u8>>> {
    if data.len() as u64 != cluster_size {
        return Err(Error::OutOfRange {
            off: 0,
            len: data.len() as u64,
            size: cluster_size,
        });
    }
    thread_local! {
        // One compressor per thread, reset between clusters (building one costs more than
        // compressing a mostly-empty cluster).
        static ZLIB: std::cell::RefCell<Option<flate2::Compress>> =
            const { std::cell::RefCell::new(None) };
        static ZSTD: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let out = match ctype {
        CompressionType::Zlib => ZLIB.with(|cell| {
            let mut slot = cell.borrow_mut();
            // Raw deflate with a 4 KiB window (windowBits -12), as qemu writes it.
            let c = slot.get_or_insert_with(|| {
                flate2::Compress::new_with_window_bits(flate2::Compression::default(), false, 12)
            });
            c.reset();
            let mut out = Vec::with_capacity(cluster_size as usize);
            let st = c
                .compress_vec(data, &mut out, flate2::FlushCompress::Finish)
                .map_err(|e| Qcow2Error::CompressingCluster {
                    codec: "zlib",
                    source: e.into(),
                })?;
            // Not at the stream end: did not fit in a cluster, it does not shrink.
            Ok::<_, Qcow2Error>((st == flate2::Status::StreamEnd).then_some(out))
        })?,
        CompressionType::Zstd => ZSTD.with(|cell| {
            let mut slot = cell.borrow_mut();
            let c = match &mut *slot {
                Some(c) => c,
                None => slot.insert(zstd::bulk::Compressor::new(0).map_err(|source| {
                    Qcow2Error::CompressingCluster {
                        codec: "zstd",
                        source,
                    }
                })?),
            };
            c.compress(data)
                .map(Some)
                .map_err(|source| Qcow2Error::CompressingCluster {
                    codec: "zstd",
                    source,
                })
        })?,
    };
    let Some(out) = out else {
        return Ok(None);
    };
    if out.len() as u64 >= cluster_size {
        return Ok(None);
    }
    Ok(Some(out))
}

/// Decompress one cluster into `out` (exactly a cluster); trailing input bytes are ignored.
pub(crate) fn decompress_cluster(
    ctype: CompressionType,
    input: &[u8],
    out: &mut [u8],
    at: u64,
) -> QResult<()> {
    let bad = |why: &'static str| Qcow2Error::DecompressingCluster { why, at };
    match ctype {
        CompressionType::Zlib => {
            let mut d = flate2::Decompress::new_with_window_bits(false, 12);
            loop {
                let (i, o) = (d.total_in() as usize, d.total_out() as usize);
                if o == out.len() {
                    return Ok(());
                }
                let st = d
                    .decompress(&input[i..], &mut out[o..], flate2::FlushDecompress::Finish)
                    .map_err(|_| bad("invalid deflate data"))?;
                let progressed = d.total_in() as usize != i || d.total_out() as usize != o;
                if d.total_out() as usize == out.len() {
                    return Ok(());
                }
                if st == flate2::Status::StreamEnd || !progressed {
                    return Err(bad("decompresses to less than a cluster"));
                }
            }
        }
        CompressionType::Zstd => {
            use zstd::stream::raw::{InBuffer, Operation, OutBuffer};
            let mut d =
                zstd::stream::raw::Decoder::new().map_err(|e| Error::io("zstd decoder", at, e))?;
            let mut inb = InBuffer::around(input);
            let mut outb = OutBuffer::around(out);
            loop {
                let before = (inb.pos(), outb.pos());
                let r = d
                    .run(&mut inb, &mut outb)
                    .map_err(|_| bad("invalid zstd data"))?;
                if outb.pos() == outb.capacity() {
                    return Ok(());
                }
                if r == 0 && inb.pos() == input.len() || before == (inb.pos(), outb.pos()) {
                    return Err(bad("decompresses to less than a cluster"));
                }
            }
        }
    }
}
