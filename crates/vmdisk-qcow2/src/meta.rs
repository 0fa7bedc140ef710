//! On-disk qcow2 structures, parsed from and serialised to bytes. No IO happens here.
//!
//! Everything that reads a raw field of the format lives in this module: the header and its
//! extensions ([`Header`]), L1 and L2 entries ([`l1_entry_offset`], [`L2Entry`],
//! [`SubclusterBitmap`]), refcount entries of every width ([`refcount_get`], [`refcount_set`])
//! and the snapshot table ([`SnapshotHeader`]). Parsers are total: they never panic, and every
//! size read from an image is checked against a named limit below before memory is allocated.
//! Errors carry the host offset of the structure that failed (`Error::Corrupt { what, off }`).

use crate::{Error, Result};

/// "QFI\xfb".
pub const MAGIC: u32 = 0x5146_49fb;

/// Smallest cluster: 512 B (cluster_bits 9), as the spec allows.
pub const MIN_CLUSTER_BITS: u32 = 9;
/// Largest cluster: 2 MiB (cluster_bits 21), as the spec allows.
pub const MAX_CLUSTER_BITS: u32 = 21;
/// Refcount widths 1..=64 bits (refcount_order 0..=6).
pub const MAX_REFCOUNT_ORDER: u32 = 6;
/// Size of the fixed v2 header.
pub const V2_HEADER_LEN: u32 = 72;
/// Size of the v3 header without the compression type field.
pub const V3_HEADER_MIN_LEN: u32 = 104;
/// v3 header with the compression type byte, padded to 8 (what qemu writes).
pub const V3_HEADER_LEN: u32 = 112;
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
/// Backing file names longer than this are refused (qemu: 1023).
pub const MAX_BACKING_FILE_NAME: u32 = 1023;
/// Virtual sizes up to 2^56: host offsets in L1/L2 entries have 56 bits, nothing bigger is
/// meaningful, and it keeps every guest-offset computation far from u64 overflow.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Subclusters per cluster in images with extended L2 entries.
pub const SUBCLUSTERS: u32 = 32;

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

fn be16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}
fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}
fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}
fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
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

    /// Parse and validate a header from the first bytes of an image (ideally the whole first
    /// cluster: extensions and the backing file name must lie inside it).
    pub fn parse(buf: &[u8]) -> Result<Header> {
        if buf.len() < V2_HEADER_LEN as usize {
            return Err(Error::corrupt("image too short for a qcow2 header", 0));
        }
        if be32(buf, 0) != MAGIC {
            return Err(Error::corrupt("bad qcow2 magic", 0));
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return Err(Error::unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(Error::corrupt(
                format!("cluster_bits {cluster_bits} outside 9..=21"),
                20,
            ));
        }
        let cs = 1u64 << cluster_bits;
        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            size: be64(buf, 24),
            crypt_method: be32(buf, 32),
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            snapshots_offset: be64(buf, 64),
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
                return Err(Error::corrupt("image too short for a qcow2 v3 header", 0));
            }
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            h.header_length = be32(buf, 100);
            if h.header_length < V3_HEADER_MIN_LEN {
                return Err(Error::corrupt(
                    format!("header_length {} below 104", h.header_length),
                    100,
                ));
            }
            if u64::from(h.header_length) > cs {
                return Err(Error::corrupt("header_length larger than a cluster", 100));
            }
            if h.header_length as usize > buf.len() {
                return Err(Error::corrupt("header runs past the bytes given", 100));
            }
            if h.refcount_order > MAX_REFCOUNT_ORDER {
                return Err(Error::corrupt(
                    format!("refcount_order {} above 6", h.refcount_order),
                    96,
                ));
            }
        }
        let ctype_byte = if h.header_length > 104 { buf[104] } else { 0 };
        h.compression_type = if h.incompatible_features & INCOMPAT_COMPRESSION != 0 {
            match ctype_byte {
                0 => CompressionType::Zlib,
                1 => CompressionType::Zstd,
                t => return Err(Error::unsupported(format!("compression type {t}"))),
            }
        } else if ctype_byte != 0 {
            return Err(Error::corrupt(
                "compression type set without the compression incompatible bit",
                104,
            ));
        } else {
            CompressionType::Zlib
        };
        if h.crypt_method != 0 {
            return Err(Error::unsupported(format!(
                "encrypted image (crypt_method {}): vmdisk refuses to return ciphertext",
                h.crypt_method
            )));
        }
        if h.size > MAX_VIRTUAL_SIZE {
            return Err(Error::Limit {
                what: "qcow2 virtual size",
                needed: h.size,
                limit: MAX_VIRTUAL_SIZE,
            });
        }
        let al = |v: u64| v.is_multiple_of(cs);
        let l1_bytes = u64::from(h.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(Error::Limit {
                what: "L1 table bytes",
                needed: l1_bytes,
                limit: MAX_L1_BYTES,
            });
        }
        let needed = l1_entries_for(h.size, cluster_bits, h.extended_l2());
        if u64::from(h.l1_size) < needed {
            return Err(Error::corrupt(
                format!(
                    "L1 table has {} entries, the size needs {needed}",
                    h.l1_size
                ),
                36,
            ));
        }
        if h.l1_size > 0 && (h.l1_table_offset == 0 || !al(h.l1_table_offset)) {
            return Err(Error::corrupt("L1 table offset not cluster aligned", 40));
        }
        if h.refcount_table_offset == 0 || !al(h.refcount_table_offset) {
            return Err(Error::corrupt(
                "refcount table offset not cluster aligned",
                48,
            ));
        }
        let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            return Err(Error::Limit {
                what: "refcount table bytes",
                needed: rt_bytes,
                limit: MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        if h.refcount_table_clusters == 0 {
            return Err(Error::corrupt("refcount table has no clusters", 56));
        }
        if h.nb_snapshots > MAX_SNAPSHOTS {
            return Err(Error::Limit {
                what: "number of snapshots",
                needed: u64::from(h.nb_snapshots),
                limit: u64::from(MAX_SNAPSHOTS),
            });
        }
        if h.nb_snapshots > 0 && (h.snapshots_offset == 0 || !al(h.snapshots_offset)) {
            return Err(Error::corrupt(
                "snapshot table offset not cluster aligned",
                64,
            ));
        }
        for (off, v) in [
            (40u64, h.l1_table_offset),
            (48, h.refcount_table_offset),
            (64, h.snapshots_offset),
        ] {
            if v > MAX_VIRTUAL_SIZE {
                return Err(Error::corrupt("table offset beyond 2^56", off));
            }
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(Error::unsupported(
                "qcow2 with an external data file (data-file)",
            ));
        }

        // Header extensions.
        let mut pos = h.header_length as usize;
        let ext_end = if h.backing_file_offset != 0 {
            (h.backing_file_offset as usize).min(buf.len())
        } else {
            buf.len().min(cs as usize)
        };
        loop {
            if pos + 8 > ext_end {
                // v2 images without extensions may end right at the header; qemu tolerates it.
                break;
            }
            let kind = be32(buf, pos);
            let len = be32(buf, pos + 4) as usize;
            if kind == EXT_END {
                break;
            }
            let data_at = pos + 8;
            if len > ext_end.saturating_sub(data_at) {
                return Err(Error::corrupt(
                    format!("header extension {kind:#x} runs past its space"),
                    pos as u64,
                ));
            }
            let data = &buf[data_at..data_at + len];
            match kind {
                EXT_BACKING_FORMAT => {
                    h.backing_format = Some(String::from_utf8_lossy(data).into_owned());
                }
                EXT_FEATURE_TABLE => {
                    for e in data.chunks_exact(48) {
                        let name_end = e[2..].iter().position(|&b| b == 0).unwrap_or(46);
                        h.feature_names.push(FeatureName {
                            kind: e[0],
                            bit: e[1],
                            name: String::from_utf8_lossy(&e[2..2 + name_end]).into_owned(),
                        });
                    }
                }
                EXT_FULL_DISK_ENCRYPTION => {
                    return Err(Error::unsupported(
                        "encrypted image (LUKS header extension): vmdisk refuses to return \
                         ciphertext",
                    ));
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
            return Err(Error::unsupported(
                "qcow2 with an external data file (data-file)",
            ));
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
            return Err(Error::unsupported(format!(
                "unknown incompatible qcow2 features: {}",
                names.join(", ")
            )));
        }

        if h.backing_file_offset != 0 {
            if h.backing_file_size > MAX_BACKING_FILE_NAME {
                return Err(Error::Limit {
                    what: "backing file name length",
                    needed: u64::from(h.backing_file_size),
                    limit: u64::from(MAX_BACKING_FILE_NAME),
                });
            }
            let start = h.backing_file_offset;
            let end = start.saturating_add(u64::from(h.backing_file_size));
            if end > cs || end > buf.len() as u64 {
                return Err(Error::corrupt(
                    "backing file name outside the first cluster",
                    8,
                ));
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
        let mut b = vec![0u8; hlen];
        put32(&mut b, 0, MAGIC);
        put32(&mut b, 4, self.version);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 32, self.crypt_method);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 60, self.nb_snapshots);
        put64(&mut b, 64, self.snapshots_offset);
        if self.version == 3 {
            put64(&mut b, 72, self.incompatible_features);
            put64(&mut b, 80, self.compatible_features);
            put64(&mut b, 88, self.autoclear_features);
            put32(&mut b, 96, self.refcount_order);
            put32(&mut b, 100, hlen as u32);
            if hlen > 104 {
                b[104] = match self.compression_type {
                    CompressionType::Zlib => 0,
                    CompressionType::Zstd => 1,
                };
            }
        }
        let push_ext = |b: &mut Vec<u8>, kind: u32, data: &[u8]| {
            b.extend_from_slice(&kind.to_be_bytes());
            b.extend_from_slice(&(data.len() as u32).to_be_bytes());
            b.extend_from_slice(data);
            b.resize(align8(b.len()), 0);
        };
        if let Some(f) = &self.backing_format {
            push_ext(&mut b, EXT_BACKING_FORMAT, f.as_bytes());
        }
        if !self.feature_names.is_empty() {
            let mut t = Vec::with_capacity(self.feature_names.len() * 48);
            for f in &self.feature_names {
                let mut e = [0u8; 48];
                e[0] = f.kind;
                e[1] = f.bit;
                let n = f.name.len().min(46);
                e[2..2 + n].copy_from_slice(&f.name.as_bytes()[..n]);
                t.extend_from_slice(&e);
            }
            push_ext(&mut b, EXT_FEATURE_TABLE, &t);
        }
        if let Some(d) = &self.data_file {
            push_ext(&mut b, EXT_DATA_FILE, d.as_bytes());
        }
        for e in &self.other_extensions {
            push_ext(&mut b, e.kind, &e.data);
        }
        if self.version == 3 || self.backing_format.is_some() || !self.other_extensions.is_empty() {
            push_ext(&mut b, EXT_END, &[]);
        }
        if let Some(name) = &self.backing_file {
            if name.len() > MAX_BACKING_FILE_NAME as usize {
                return Err(Error::Limit {
                    what: "backing file name length",
                    needed: name.len() as u64,
                    limit: u64::from(MAX_BACKING_FILE_NAME),
                });
            }
            let off = b.len() as u64;
            put64(&mut b, 8, off);
            put32(&mut b, 16, name.len() as u32);
            b.extend_from_slice(name.as_bytes());
        }
        if b.len() as u64 > self.cluster_size() {
            return Err(Error::Limit {
                what: "qcow2 header with extensions",
                needed: b.len() as u64,
                limit: self.cluster_size(),
            });
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
        return Err(Error::corrupt(
            format!("L1 entry {raw:#x} points at an unaligned L2 table"),
            at,
        ));
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
            return Err(Error::corrupt(
                format!("L2 entry {raw:#x} points at an unaligned cluster"),
                at,
            ));
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
                (true, true) => Err(Error::corrupt("subcluster both allocated and zero", at)),
                (true, false) => Ok(SubclusterState::Data {
                    host_off: host_off + u64::from(sc) * sc_size,
                }),
                (false, true) => Ok(SubclusterState::Zero),
                (false, false) => Ok(SubclusterState::Unallocated),
            },
            L2Entry::Unallocated | L2Entry::Zero { .. } => {
                if a {
                    return Err(Error::corrupt(
                        "allocated subcluster in an unallocated cluster",
                        at,
                    ));
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

/// Set refcount entry `index`. Fails with `Error::Limit` when `value` does not fit the width,
/// and `OutOfRange` when the index is outside the block.
pub fn refcount_set(block: &mut [u8], index: u64, order: u32, value: u64) -> Result<()> {
    if value > refcount_max(order) {
        return Err(Error::Limit {
            what: "refcount",
            needed: value,
            limit: refcount_max(order),
        });
    }
    let bits = 1u64 << order;
    let bit_pos = index.saturating_mul(bits);
    let byte = (bit_pos / 8) as usize;
    let blen = block.len() as u64;
    match order {
        0..=2 => {
            let Some(v) = block.get_mut(byte) else {
                return Err(Error::OutOfRange {
                    off: index,
                    len: 1,
                    size: blen,
                });
            };
            let shift = (bit_pos % 8) as u32;
            let mask = (((1u16 << bits) - 1) as u8) << shift;
            *v = (*v & !mask) | (((value as u8) << shift) & mask);
        }
        _ => {
            let n = (bits / 8) as usize;
            let Some(s) = block.get_mut(byte..byte + n) else {
                return Err(Error::OutOfRange {
                    off: index,
                    len: 1,
                    size: blen,
                });
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

impl SnapshotHeader {
    /// Parse `nb` entries from `buf` (the table's bytes); `base` is its host offset.
    pub fn parse_table(buf: &[u8], nb: u32, base: u64) -> Result<Vec<SnapshotHeader>> {
        if nb > MAX_SNAPSHOTS {
            return Err(Error::Limit {
                what: "number of snapshots",
                needed: u64::from(nb),
                limit: u64::from(MAX_SNAPSHOTS),
            });
        }
        let mut out = Vec::with_capacity(nb.min(1024) as usize);
        let mut pos = 0usize;
        for _ in 0..nb {
            let at = base + pos as u64;
            if buf.len() < pos + 40 {
                return Err(Error::corrupt("snapshot table truncated", at));
            }
            let e = &buf[pos..];
            let l1_table_offset = be64(e, 0);
            let l1_size = be32(e, 8);
            let id_len = be16(e, 12) as usize;
            let name_len = be16(e, 14) as usize;
            let date_sec = be32(e, 16);
            let date_nsec = be32(e, 20);
            let vm_clock_nsec = be64(e, 24);
            let vm_state_32 = be32(e, 32);
            let extra_len = be32(e, 36);
            if extra_len > MAX_SNAPSHOT_EXTRA_DATA {
                return Err(Error::Limit {
                    what: "snapshot extra data",
                    needed: u64::from(extra_len),
                    limit: u64::from(MAX_SNAPSHOT_EXTRA_DATA),
                });
            }
            let extra_len = extra_len as usize;
            let total = 40 + extra_len + id_len + name_len;
            if e.len() < total {
                return Err(Error::corrupt("snapshot table entry truncated", at));
            }
            if u64::from(l1_size) * 8 > MAX_L1_BYTES {
                return Err(Error::Limit {
                    what: "snapshot L1 table bytes",
                    needed: u64::from(l1_size) * 8,
                    limit: MAX_L1_BYTES,
                });
            }
            let extra = &e[40..40 + extra_len];
            let mut vm_state_size = u64::from(vm_state_32);
            let mut disk_size = None;
            let mut icount = None;
            if extra.len() >= 8 {
                vm_state_size = be64(extra, 0);
            }
            if extra.len() >= 16 {
                disk_size = Some(be64(extra, 8));
            }
            if extra.len() >= 24 {
                let v = be64(extra, 16);
                icount = (v != u64::MAX).then_some(v);
            }
            let extra_tail = extra.get(24..).unwrap_or(&[]).to_vec();
            let id_at = 40 + extra_len;
            let id = String::from_utf8_lossy(&e[id_at..id_at + id_len]).into_owned();
            let name =
                String::from_utf8_lossy(&e[id_at + id_len..id_at + id_len + name_len]).into_owned();
            out.push(SnapshotHeader {
                l1_table_offset,
                l1_size,
                id,
                name,
                date_sec,
                date_nsec,
                vm_clock_nsec,
                vm_state_size,
                disk_size,
                icount,
                extra_tail,
            });
            pos += align8(total);
            if pos as u64 > MAX_SNAPSHOT_TABLE_BYTES {
                return Err(Error::Limit {
                    what: "snapshot table bytes",
                    needed: pos as u64,
                    limit: MAX_SNAPSHOT_TABLE_BYTES,
                });
            }
        }
        Ok(out)
    }

    /// Serialise a snapshot table (each entry padded to 8 bytes). Extra data is always 24
    /// bytes (vm state size, disk size, icount) plus any kept tail, as qemu writes it.
    pub fn serialize_table(snaps: &[SnapshotHeader]) -> Vec<u8> {
        let mut b = Vec::new();
        for s in snaps {
            let start = b.len();
            let mut extra = Vec::with_capacity(24 + s.extra_tail.len());
            extra.extend_from_slice(&s.vm_state_size.to_be_bytes());
            extra.extend_from_slice(&s.disk_size.unwrap_or(0).to_be_bytes());
            extra.extend_from_slice(&s.icount.unwrap_or(u64::MAX).to_be_bytes());
            extra.extend_from_slice(&s.extra_tail);
            b.extend_from_slice(&s.l1_table_offset.to_be_bytes());
            b.extend_from_slice(&s.l1_size.to_be_bytes());
            b.extend_from_slice(&(s.id.len() as u16).to_be_bytes());
            b.extend_from_slice(&(s.name.len() as u16).to_be_bytes());
            b.extend_from_slice(&s.date_sec.to_be_bytes());
            b.extend_from_slice(&s.date_nsec.to_be_bytes());
            b.extend_from_slice(&s.vm_clock_nsec.to_be_bytes());
            let vm32 = u32::try_from(s.vm_state_size).unwrap_or(0);
            b.extend_from_slice(&vm32.to_be_bytes());
            b.extend_from_slice(&(extra.len() as u32).to_be_bytes());
            b.extend_from_slice(&extra);
            b.extend_from_slice(s.id.as_bytes());
            b.extend_from_slice(s.name.as_bytes());
            let pad = align8(b.len() - start) + start;
            b.resize(pad, 0);
        }
        b
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

    #[test]
    fn refuses_bad_headers() {
        let mut b = sample(3).serialize().unwrap();
        b.resize(65536, 0);
        let mut enc = b.clone();
        put32(&mut enc, 32, 1);
        assert!(matches!(
            Header::parse(&enc),
            Err(Error::Unsupported { .. })
        ));
        let mut unk = b.clone();
        put64(&mut unk, 72, 1 << 20);
        assert!(matches!(
            Header::parse(&unk),
            Err(Error::Unsupported { .. })
        ));
        let mut cb = b.clone();
        put32(&mut cb, 20, 22);
        assert!(matches!(Header::parse(&cb), Err(Error::Corrupt { .. })));
        let mut l1 = b.clone();
        put32(&mut l1, 36, u32::MAX);
        assert!(matches!(Header::parse(&l1), Err(Error::Limit { .. })));
        for n in 0..b.len().min(300) {
            let _ = Header::parse(&b[..n]);
        }
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
