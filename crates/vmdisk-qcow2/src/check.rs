//! Consistency check and repair of a qcow2 image, judged the way `qemu-img check` judges it.
//!
//! The checker works on the host device alone (it never opens the image as a [`BlockDevice`]
//! guest view). It walks every structure that owns host clusters — the header cluster (with
//! its extensions and backing file name), the active L1 table and its L2 tables, every
//! snapshot's L1 and L2 tables, the snapshot table, the refcount table and refcount blocks,
//! persistent-bitmap directories and tables — and builds an in-memory array of the refcount each
//! cluster *should* have. Comparing it with the stored refcounts classifies problems:
//!
//! ```text
//!   stored <  expected   corruption  "ERROR cluster 5 refcount=0 reference=1"
//!   stored >  expected   leak        "Leaked cluster 17 refcount=1 reference=0"
//!   misaligned tables, references past the end of the file, bad subcluster bitmaps,
//!   wrong OFLAG_COPIED flags, refcount overflow                      corruption
//!   structures that cannot be read at all                             check error
//! ```
//!
//! Repairs ([`Repair::Leaks`], [`Repair::All`]) only ever write refcount entries inside
//! existing, sound refcount blocks, then the COPIED flags of the active L1/L2 tables, then the
//! header's dirty/corrupt bits — each step flushed before the next, so a crash in between at
//! worst leaves leaks. Anything that would need the refcount structure rebuilt is reported
//! ("ERROR need to rebuild refcount structures") and left alone.
//!
//! Memory is bounded: the expected-refcount array has one `u16` per host cluster (rare larger
//! counts spill into a map) and images with more than [`MAX_CHECK_CLUSTERS`] host clusters are
//! refused with [`Error::Limit`]; the message list is capped at [`MAX_CHECK_MESSAGES`].

use std::collections::HashMap;

use vmdisk_block::BlockDevice;

use crate::meta::{
    self, decode_table, encode_table, BitmapCluster, BitmapEntry, Header, SnapshotHeader,
    AUTOCLEAR_BITMAPS, EXT_BITMAPS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, L1E_OFFSET_MASK,
    L2E_OFFSET_MASK, MAX_CLUSTER_BITS, MAX_L1_BYTES, MAX_REFCOUNT_TABLE_BYTES, OFLAG_COMPRESSED,
    OFLAG_COPIED, OFLAG_ZERO, REFT_OFFSET_MASK,
};
use crate::{Error, Result};

/// Host clusters the checker accepts: 2 bytes each for the expected-refcount array, so at
/// most 64 MiB of memory (2 TiB of host file at 64 KiB clusters).
pub const MAX_CHECK_CLUSTERS: u64 = 1 << 25;
/// Messages kept in a report; the rest are counted in one final line.
pub const MAX_CHECK_MESSAGES: usize = 10_000;
/// Tables that may be large (bitmap tables) are read in pieces of this size.
const READ_CHUNK: u64 = 1 << 20;
/// Extended L2 bitmap: the allocation half.
const L2_BITMAP_ALL_ALLOC: u64 = 0xffff_ffff;

/// What `check` may change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Repair {
    /// Only look (`qemu-img check`).
    #[default]
    None,
    /// Lower refcounts of leaked clusters (`-r leaks`).
    Leaks,
    /// Also raise refcounts that are too low and fix COPIED flags, where that is safe (`-r all`).
    All,
}

/// The outcome of a check; field names mirror `qemu-img check --output=json`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// Inconsistencies that can lose data (`corruptions`).
    pub corruptions: u64,
    /// Clusters with a refcount higher than their references (`leaks`).
    pub leaks: u64,
    /// Structures the checker could not read or evaluate (`check-errors`).
    pub check_errors: u64,
    /// Corruptions repaired (`corruptions-fixed`).
    pub corruptions_fixed: u64,
    /// Leaks repaired (`leaks-fixed`).
    pub leaks_fixed: u64,
    /// End of the last used cluster in the host file (`image-end-offset`).
    pub image_end_offset: u64,
    /// Guest clusters of the virtual disk (`total-clusters`).
    pub total_clusters: u64,
    /// Guest clusters allocated in the active L1/L2 tables (`allocated-clusters`).
    pub allocated_clusters: u64,
    /// Allocated clusters not contiguous with their predecessor (`fragmented-clusters`).
    pub fragmented_clusters: u64,
    /// Guest clusters stored compressed (`compressed-clusters`).
    pub compressed_clusters: u64,
    /// Human-readable findings, worded like qemu's.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// `qemu-img check`'s exit status: 1 check errors, 2 corruptions, 3 leaks only, 0 clean.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// No corruptions, leaks or check errors.
    pub fn is_clean(&self) -> bool {
        self.exit_code() == 0
    }

    fn msg(&mut self, m: String) {
        match self.messages.len().cmp(&MAX_CHECK_MESSAGES) {
            std::cmp::Ordering::Less => self.messages.push(m),
            std::cmp::Ordering::Equal => self
                .messages
                .push("(further messages suppressed)".to_string()),
            std::cmp::Ordering::Greater => {}
        }
    }
}

/// Check the qcow2 image stored on `host`, repairing what `repair` allows.
///
/// Fails only when the image cannot be checked at all: the header does not parse (the error
/// says whether it is corrupt or unsupported), the host has too many clusters
/// ([`Error::Limit`]), or a repair is asked of a read-only host ([`Error::ReadOnly`]). Every
/// other finding is counted in the report. After a repair the image is checked again, as
/// `qemu-img check -r` does, and the report describes the repaired image plus what was fixed.
pub fn check(host: &dyn BlockDevice, repair: Repair) -> Result<CheckReport> {
    if repair != Repair::None && host.is_read_only() {
        return Err(Error::ReadOnly);
    }
    let first = check_once(host, repair)?;
    if first.corruptions_fixed + first.leaks_fixed == 0 {
        return Ok(first);
    }
    let mut again = check_once(host, Repair::None)?;
    again.corruptions_fixed = first.corruptions_fixed;
    again.leaks_fixed = first.leaks_fixed;
    let mut messages = first.messages;
    messages.push(format!(
        "The following inconsistencies were found and repaired: {} leaked clusters, {} \
         corruptions. Double checking the fixed image now...",
        first.leaks_fixed, first.corruptions_fixed
    ));
    messages.append(&mut again.messages);
    messages.truncate(2 * MAX_CHECK_MESSAGES + 2);
    again.messages = messages;
    Ok(again)
}

fn check_once(host: &dyn BlockDevice, repair: Repair) -> Result<CheckReport> {
    let file_len = host.len();
    let head_len = file_len.min(1 << MAX_CLUSTER_BITS);
    let mut head = vec![0u8; head_len as usize];
    host.read_exact_at(&mut head, 0)?;
    let h = Header::parse(&head).map_err(Error::from)?;
    drop(head);
    let cs = h.cluster_size();
    let nb_clusters = file_len.div_ceil(cs);
    if nb_clusters > MAX_CHECK_CLUSTERS {
        return Err(Error::Limit {
            what: "host clusters to check",
            needed: nb_clusters,
            limit: MAX_CHECK_CLUSTERS,
        });
    }
    let mut c = Checker {
        host,
        cs,
        cluster_bits: h.cluster_bits,
        order: h.refcount_order,
        refcount_max: meta::refcount_max(h.refcount_order),
        ext_l2: h.extended_l2(),
        file_len,
        nb_clusters,
        // One slot past the end: references may run less than a cluster past EOF.
        expected: vec![0u16; nb_clusters as usize + 1],
        spill: HashMap::new(),
        reftable: Vec::new(),
        active_l1: Vec::new(),
        rebuild: false,
        report: CheckReport {
            total_clusters: h.size.div_ceil(cs),
            ..CheckReport::default()
        },
        h,
    };
    c.run(repair)?;
    Ok(c.report)
}

/// One refcount block as read for comparison.
enum RefBlock {
    /// No block: every refcount in its range is 0.
    Absent,
    /// The reftable entry cannot be used (unaligned).
    Unusable,
    /// The block's bytes (zero-filled past the end of the host).
    Loaded(Vec<u8>),
}

struct Checker<'a> {
    host: &'a dyn BlockDevice,
    h: Header,
    cs: u64,
    cluster_bits: u32,
    order: u32,
    refcount_max: u64,
    ext_l2: bool,
    file_len: u64,
    nb_clusters: u64,
    expected: Vec<u16>,
    /// Expected refcounts that do not fit a u16.
    spill: HashMap<u64, u64>,
    reftable: Vec<u64>,
    active_l1: Vec<u64>,
    /// The refcount structure itself is damaged: no in-place repair is safe.
    rebuild: bool,
    report: CheckReport,
}

impl Checker<'_> {
    fn run(&mut self, repair: Repair) -> Result<()> {
        // Refcount table first: without it nothing can be compared.
        let rt_bytes = u64::from(self.h.refcount_table_clusters) * self.cs;
        if rt_bytes > MAX_REFCOUNT_TABLE_BYTES {
            // Header::parse enforces this; keep the allocation bound local and obvious.
            return Err(Error::Limit {
                what: "refcount table bytes",
                needed: rt_bytes,
                limit: MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        let rt = self.read_padded(self.h.refcount_table_offset, rt_bytes);
        self.reftable = decode_table(&rt);
        drop(rt);

        // Snapshot table: parsed before anything is counted, like qemu.
        let (snapshots, snap_bytes) = match self.read_snapshot_table() {
            Ok(s) => s,
            Err(e) => {
                self.report.check_errors += 1;
                self.report
                    .msg(format!("ERROR cannot read the snapshot table: {e}"));
                return Ok(());
            }
        };

        // Header cluster: header, extensions and backing file name all live in it.
        self.inc(0, self.cs);

        // Active L1 and its L2 tables.
        let (l1_off, l1_size) = (self.h.l1_table_offset, self.h.l1_size);
        self.active_l1 = self.walk_l1(l1_off, l1_size, true);

        for sn in &snapshots {
            if self.misaligned(sn.l1_table_offset) {
                self.report.corruptions += 1;
                self.report.msg(format!(
                    "ERROR snapshot {} ({}) l1_offset={:#x}: L1 table is not cluster aligned; \
                     snapshot table entry corrupted",
                    sn.id, sn.name, sn.l1_table_offset
                ));
                continue;
            }
            if u64::from(sn.l1_size) * 8 > MAX_L1_BYTES {
                self.report.corruptions += 1;
                self.report.msg(format!(
                    "ERROR snapshot {} ({}) l1_size={:#x}: L1 table is too large; snapshot \
                     table entry corrupted",
                    sn.id, sn.name, sn.l1_size
                ));
                continue;
            }
            self.walk_l1(sn.l1_table_offset, sn.l1_size, false);
        }
        self.inc(self.h.snapshots_offset, snap_bytes);
        self.inc(self.h.refcount_table_offset, rt_bytes);
        self.count_bitmaps();
        self.check_refblocks();

        // Pass 1 only looks; it also finds out whether the structure needs rebuilding.
        let saved = self.report.clone();
        let (zero_refcounts, highest) = self.compare(Repair::None);
        let mut highest = highest;
        let wants_fix = repair != Repair::None && (self.report.leaks + self.report.corruptions) > 0;
        if repair != Repair::None && (self.rebuild || (zero_refcounts && repair == Repair::Leaks)) {
            self.report.check_errors += 1;
            self.report
                .msg("ERROR need to rebuild refcount structures".to_string());
        } else if wants_fix {
            self.report = saved;
            let (_, h2) = self.compare(repair);
            highest = h2;
            if let Err(e) = self.host.flush() {
                self.report.check_errors += 1;
                self.report
                    .msg(format!("ERROR flushing refcount repairs: {e}"));
            }
        }

        self.check_oflag_copied(repair);
        self.report.image_end_offset = (highest + 1) * self.cs;

        if repair != Repair::None
            && self.report.check_errors == 0
            && self.report.corruptions == 0
            && self.h.version == 3
            && self.h.incompatible_features & (INCOMPAT_DIRTY | INCOMPAT_CORRUPT) != 0
        {
            self.mark_clean();
        }
        Ok(())
    }

    /// Read `len` bytes at `off`; whatever lies past the end of the host reads as zeros (as
    /// qemu's block layer does). `len` is bounded by the caller.
    fn read_padded(&mut self, off: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; len as usize];
        if off < self.file_len {
            let n = (self.file_len - off).min(len) as usize;
            if let Err(e) = self.host.read_exact_at(&mut buf[..n], off) {
                self.report.check_errors += 1;
                self.report
                    .msg(format!("ERROR reading {len} bytes at {off:#x}: {e}"));
            }
        }
        buf
    }

    /// The expected refcount of cluster `k`.
    fn get(&self, k: u64) -> u64 {
        match self.expected.get(k as usize) {
            Some(&u16::MAX) => self.spill.get(&k).copied().unwrap_or(u64::from(u16::MAX)),
            Some(&v) => u64::from(v),
            None => 0,
        }
    }

    fn set(&mut self, k: u64, v: u64) {
        let Some(slot) = self.expected.get_mut(k as usize) else {
            return;
        };
        if v >= u64::from(u16::MAX) {
            *slot = u16::MAX;
            self.spill.insert(k, v);
        } else {
            *slot = v as u16;
            self.spill.remove(&k);
        }
    }

    /// Count one reference to every host cluster of `[off, off+size)`.
    fn inc(&mut self, off: u64, size: u64) {
        if size == 0 {
            return;
        }
        let end = match off.checked_add(size) {
            Some(end) if end - self.file_len.min(end) < self.cs => end,
            _ => {
                self.report.corruptions += 1;
                self.report.msg(format!(
                    "ERROR: counting reference for region exceeding the end of the file by one \
                     cluster or more: offset {off:#x} size {size:#x}"
                ));
                return;
            }
        };
        let first = off >> self.cluster_bits;
        let last = (end - 1) >> self.cluster_bits;
        for k in first..=last {
            let cur = self.get(k);
            if cur >= self.refcount_max {
                self.report.corruptions += 1;
                self.report.msg(format!(
                    "ERROR: overflow cluster offset={:#x}",
                    k << self.cluster_bits
                ));
                continue;
            }
            self.set(k, cur + 1);
        }
    }

    /// Parse the snapshot table (the engine's one reader); also returns its length in bytes as
    /// qemu counts it (entries padded to 8 bytes, except the last one).
    fn read_snapshot_table(&mut self) -> Result<(Vec<SnapshotHeader>, u64)> {
        Ok(crate::read_snapshots(self.host, &self.h)?)
    }

    /// Count an L1 table, its L2 tables and their clusters; returns the L1 entries.
    fn walk_l1(&mut self, l1_off: u64, l1_size: u32, active: bool) -> Vec<u64> {
        let bytes = u64::from(l1_size) * 8;
        self.inc(l1_off, bytes);
        if bytes == 0 || bytes > MAX_L1_BYTES {
            return Vec::new();
        }
        let raw = self.read_padded(l1_off, bytes);
        let l1 = decode_table(&raw);
        drop(raw);
        for &e in &l1 {
            let l2_off = e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            self.inc(l2_off, self.cs);
            if self.misaligned(l2_off) {
                self.report.corruptions += 1;
                self.report.msg(format!(
                    "ERROR l2_offset={l2_off:x}: Table is not cluster aligned; L1 entry corrupted"
                ));
            }
            self.walk_l2(l2_off, active);
        }
        l1
    }

    fn walk_l2(&mut self, l2_off: u64, active: bool) {
        let table = decode_table(&self.read_padded(l2_off, self.cs));
        let step = if self.ext_l2 { 2 } else { 1 };
        let mut next_contiguous = 0u64;
        for ent in table.chunks_exact(step) {
            let e = ent[0];
            let bitmap = ent.get(1).copied().unwrap_or(0);
            match self.classify(e) {
                Kind::Compressed => {
                    if e & OFLAG_COPIED != 0 {
                        self.report.corruptions += 1;
                        self.report.msg(format!(
                            "ERROR: coffset={:#x}: copied flag must never be set for compressed \
                             clusters",
                            e & !(OFLAG_COPIED | OFLAG_COMPRESSED)
                        ));
                    }
                    // The compressed path of the decoder cannot fail.
                    if let Ok(meta::L2Entry::Compressed { host_off, len }) =
                        meta::L2Entry::decode(e, self.cluster_bits, self.ext_l2, l2_off)
                    {
                        self.inc(host_off, len);
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.compressed_clusters += 1;
                        // Compressed clusters are fragmented by nature.
                        self.report.fragmented_clusters += 1;
                    }
                }
                Kind::Allocated(off) => {
                    if (bitmap >> 32) & bitmap != 0 {
                        self.report.corruptions += 1;
                        self.report.msg(format!(
                            "ERROR offset={off:x}: Allocated cluster has corrupted subcluster \
                             allocation bitmap"
                        ));
                    }
                    if self.misaligned(off) {
                        self.report.corruptions += 1;
                        let contains_data = if self.ext_l2 {
                            bitmap & L2_BITMAP_ALL_ALLOC != 0
                        } else {
                            e & OFLAG_ZERO == 0
                        };
                        self.report.msg(if contains_data {
                            format!(
                                "ERROR offset={off:x}: Data cluster is not properly aligned; L2 \
                                 entry corrupted."
                            )
                        } else {
                            format!(
                                "ERROR offset={off:x}: Preallocated cluster is not properly \
                                 aligned; L2 entry corrupted."
                            )
                        });
                    }
                    if active {
                        self.report.allocated_clusters += 1;
                        if next_contiguous != 0 && off != next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        next_contiguous = off.saturating_add(self.cs);
                    }
                    self.inc(off, self.cs);
                }
                Kind::ZeroPlain => {}
                Kind::Unallocated => {
                    if bitmap & L2_BITMAP_ALL_ALLOC != 0 {
                        self.report.corruptions += 1;
                        self.report.msg(
                            "ERROR: Unallocated cluster has non-zero subcluster allocation map"
                                .to_string(),
                        );
                    }
                }
            }
        }
    }

    /// True when `off` is not at the start of a cluster.
    fn misaligned(&self, off: u64) -> bool {
        off & (self.cs - 1) != 0
    }

    /// qemu's cluster type of a standard L2 descriptor.
    fn classify(&self, e: u64) -> Kind {
        let off = e & L2E_OFFSET_MASK;
        if e & OFLAG_COMPRESSED != 0 {
            Kind::Compressed
        } else if e & OFLAG_ZERO != 0 && !self.ext_l2 {
            if off != 0 {
                Kind::Allocated(off)
            } else {
                Kind::ZeroPlain
            }
        } else if off == 0 {
            Kind::Unallocated
        } else {
            Kind::Allocated(off)
        }
    }

    /// Persistent bitmaps (only when the autoclear bit says the extension is valid), parsed
    /// by the same code the engine uses.
    fn count_bitmaps(&mut self) {
        if self.h.autoclear_features & AUTOCLEAR_BITMAPS == 0 {
            return;
        }
        let Some(ext) = self
            .h
            .other_extensions
            .iter()
            .find(|e| e.kind == EXT_BITMAPS)
        else {
            return;
        };
        let ext = match meta::BitmapsExtension::parse(&ext.data, self.cs) {
            Ok(e) => e,
            Err(e) => {
                self.report.corruptions += 1;
                self.report
                    .msg(format!("ERROR bitmap directory invalid: {e}"));
                return;
            }
        };
        if ext.nb_bitmaps == 0 {
            return;
        }
        self.inc(ext.directory_offset, ext.directory_size);
        let dir = self.read_padded(ext.directory_offset, ext.directory_size);
        let entries = match BitmapEntry::parse_directory(&dir, ext.nb_bitmaps, ext.directory_offset)
        {
            Ok(e) => e,
            Err(e) => {
                self.report.corruptions += 1;
                self.report.msg(format!("ERROR {e}"));
                return;
            }
        };
        drop(dir);
        for b in entries {
            let (table_off, bytes) = (b.table_offset, u64::from(b.table_size) * 8);
            self.inc(table_off, bytes);
            if self.misaligned(table_off) {
                self.report.corruptions += 1;
                self.report.msg(format!(
                    "ERROR bitmap table at {table_off:#x} is not cluster aligned"
                ));
                continue;
            }
            let mut done = 0u64;
            while done < bytes {
                let n = READ_CHUNK.min(bytes - done);
                let Some(at) = table_off.checked_add(done) else {
                    break;
                };
                let chunk = self.read_padded(at, n);
                for (k, raw) in decode_table(&chunk).into_iter().enumerate() {
                    match BitmapEntry::decode_table_entry(raw, self.cs, at + k as u64 * 8) {
                        Ok(BitmapCluster::Data { host_off }) => self.inc(host_off, self.cs),
                        Ok(_) => {}
                        Err(e) => {
                            self.report.corruptions += 1;
                            self.report.msg(format!("ERROR {e}"));
                        }
                    }
                }
                done += n;
            }
        }
    }

    /// Count the refcount blocks themselves and check each is where it can be used.
    fn check_refblocks(&mut self) {
        for i in 0..self.reftable.len() {
            let off = self.reftable[i] & REFT_OFFSET_MASK;
            let cluster = off >> self.cluster_bits;
            if self.misaligned(off) {
                self.report.corruptions += 1;
                self.rebuild = true;
                self.report.msg(format!(
                    "ERROR refcount block {i} is not cluster aligned; refcount table entry \
                     corrupted"
                ));
                continue;
            }
            if cluster >= self.nb_clusters {
                self.report.corruptions += 1;
                self.rebuild = true;
                self.report
                    .msg(format!("ERROR refcount block {i} is outside image"));
                continue;
            }
            if off != 0 {
                self.inc(off, self.cs);
                let rc = self.get(cluster);
                if rc != 1 {
                    self.report.corruptions += 1;
                    self.rebuild = true;
                    self.report
                        .msg(format!("ERROR refcount block {i} refcount={rc}"));
                }
            }
        }
    }

    fn load_refblock(&mut self, block_idx: u64) -> (u64, RefBlock) {
        let raw = self.reftable.get(block_idx as usize).copied().unwrap_or(0);
        let off = raw & REFT_OFFSET_MASK;
        if off == 0 {
            (0, RefBlock::Absent)
        } else if self.misaligned(off) {
            (off, RefBlock::Unusable)
        } else {
            (off, RefBlock::Loaded(self.read_padded(off, self.cs)))
        }
    }

    /// Compare stored with expected refcounts, fixing what `fix` allows. Returns whether some
    /// referenced cluster has a stored refcount of 0, and the highest used cluster.
    fn compare(&mut self, fix: Repair) -> (bool, u64) {
        let per_block = self.h.refcount_block_entries();
        let mut zero_refcounts = false;
        let mut highest = 0u64;
        let nb_blocks = self.nb_clusters.div_ceil(per_block);
        for b in 0..nb_blocks {
            let start = b * per_block;
            let end = (start + per_block).min(self.nb_clusters);
            let (rb_off, mut block) = self.load_refblock(b);
            // In-place writes only into a block that is inside the file and used by nothing else.
            let writable = matches!(block, RefBlock::Loaded(_))
                && rb_off
                    .checked_add(self.cs)
                    .is_some_and(|end| end <= self.file_len)
                && self.get(rb_off >> self.cluster_bits) == 1
                && !self.rebuild;
            let (mut dirty, mut fixed_leaks, mut fixed_corr) = (false, 0u64, 0u64);
            for i in start..end {
                let idx = i - start;
                let stored = match &block {
                    RefBlock::Absent => 0,
                    RefBlock::Loaded(buf) => meta::refcount_get(buf, idx, self.order),
                    RefBlock::Unusable => {
                        self.report.check_errors += 1;
                        self.report.msg(format!(
                            "Can't get refcount for cluster {i}: refcount block offset {rb_off:#x} \
                             is not cluster aligned"
                        ));
                        continue;
                    }
                };
                let exp = self.get(i);
                if stored > 0 || exp > 0 {
                    highest = i;
                }
                if stored == exp {
                    continue;
                }
                let leak = stored > exp;
                if stored == 0 {
                    zero_refcounts = true;
                    if !writable {
                        self.rebuild = true;
                    }
                }
                let may_fix = writable
                    && match fix {
                        Repair::None => false,
                        Repair::Leaks => leak,
                        Repair::All => true,
                    };
                self.report.msg(format!(
                    "{} cluster {i} refcount={stored} reference={exp}",
                    if may_fix {
                        "Repairing"
                    } else if leak {
                        "Leaked"
                    } else {
                        "ERROR"
                    }
                ));
                if may_fix {
                    if let RefBlock::Loaded(buf) = &mut block {
                        if meta::refcount_set(buf, idx, self.order, exp).is_ok() {
                            dirty = true;
                            if leak {
                                fixed_leaks += 1;
                            } else {
                                fixed_corr += 1;
                            }
                            continue;
                        }
                    }
                }
                if leak {
                    self.report.leaks += 1;
                } else {
                    self.report.corruptions += 1;
                }
            }
            if dirty {
                if let RefBlock::Loaded(buf) = &block {
                    match self.host.write_all_at(buf, rb_off) {
                        Ok(()) => {
                            self.report.leaks_fixed += fixed_leaks;
                            self.report.corruptions_fixed += fixed_corr;
                        }
                        Err(e) => {
                            self.report.check_errors += 1;
                            self.report.leaks += fixed_leaks;
                            self.report.corruptions += fixed_corr;
                            self.report
                                .msg(format!("ERROR writing refcount block at {rb_off:#x}: {e}"));
                        }
                    }
                }
            }
        }
        (zero_refcounts, highest)
    }

    /// The refcount stored on disk for cluster `k` (None when it cannot be read).
    fn stored_refcount(&mut self, k: u64, cache: &mut Option<(u64, Vec<u8>)>) -> Option<u64> {
        let per_block = self.h.refcount_block_entries();
        let b = k / per_block;
        let raw = self.reftable.get(b as usize).copied().unwrap_or(0);
        let off = raw & REFT_OFFSET_MASK;
        if off == 0 {
            return Some(0);
        }
        if self.misaligned(off) {
            return None;
        }
        if cache.as_ref().map(|(o, _)| *o) != Some(off) {
            let buf = self.read_padded(off, self.cs);
            *cache = Some((off, buf));
        }
        let (_, buf) = cache.as_ref()?;
        Some(meta::refcount_get(buf, k % per_block, self.order))
    }

    /// OFLAG_COPIED must be set exactly when the stored refcount is 1 (active tables only).
    fn check_oflag_copied(&mut self, repair: Repair) {
        let repair = !self.rebuild
            && match repair {
                Repair::All => true,
                Repair::Leaks => {
                    self.report.check_errors == 0
                        && self.report.corruptions == 0
                        && self.report.leaks == 0
                }
                Repair::None => false,
            };
        let word = if repair { "Repairing" } else { "ERROR" };
        let mut cache = None;
        let l1 = std::mem::take(&mut self.active_l1);
        let mut wrote = false;
        for (i, &l1e) in l1.iter().enumerate() {
            let l2_off = l1e & L1E_OFFSET_MASK;
            if l2_off == 0 {
                continue;
            }
            let Some(rc) = self.stored_refcount(l2_off >> self.cluster_bits, &mut cache) else {
                continue;
            };
            if (rc == 1) != (l1e & OFLAG_COPIED != 0) {
                self.report.corruptions += 1;
                self.report.msg(format!(
                    "{word} OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={l1e:x} refcount={rc}"
                ));
                if repair {
                    let new = if rc == 1 {
                        l1e | OFLAG_COPIED
                    } else {
                        l1e & !OFLAG_COPIED
                    };
                    let at = self.h.l1_table_offset + i as u64 * 8;
                    match self.host.write_all_at(&new.to_be_bytes(), at) {
                        Ok(()) => {
                            wrote = true;
                            self.report.corruptions -= 1;
                            self.report.corruptions_fixed += 1;
                        }
                        Err(e) => {
                            self.report.check_errors += 1;
                            self.report
                                .msg(format!("ERROR writing L1 entry at {at:#x}: {e}"));
                        }
                    }
                }
            }
            let mut table = decode_table(&self.read_padded(l2_off, self.cs));
            let step = if self.ext_l2 { 2 } else { 1 };
            let mut dirty = 0u64;
            for j in 0..table.len() / step {
                let e = table[j * step];
                let Kind::Allocated(off) = self.classify(e) else {
                    continue;
                };
                let Some(rc) = self.stored_refcount(off >> self.cluster_bits, &mut cache) else {
                    continue;
                };
                if (rc == 1) != (e & OFLAG_COPIED != 0) {
                    self.report.corruptions += 1;
                    self.report.msg(format!(
                        "{word} OFLAG_COPIED data cluster: l2_entry={e:x} refcount={rc}"
                    ));
                    if repair {
                        let new = if rc == 1 {
                            e | OFLAG_COPIED
                        } else {
                            e & !OFLAG_COPIED
                        };
                        table[j * step] = new;
                        dirty += 1;
                    }
                }
            }
            // Only a whole, aligned L2 table inside the file is ever rewritten.
            if dirty > 0 {
                if !self.misaligned(l2_off) && l2_off + self.cs <= self.file_len {
                    match self.host.write_all_at(&encode_table(&table), l2_off) {
                        Ok(()) => {
                            wrote = true;
                            self.report.corruptions -= dirty;
                            self.report.corruptions_fixed += dirty;
                        }
                        Err(e) => {
                            self.report.check_errors += 1;
                            self.report
                                .msg(format!("ERROR writing L2 table at {l2_off:#x}: {e}"));
                        }
                    }
                } else {
                    self.report.msg(format!(
                        "ERROR L2 table at {l2_off:#x} cannot be rewritten in place"
                    ));
                }
            }
        }
        self.active_l1 = l1;
        if wrote {
            if let Err(e) = self.host.flush() {
                self.report.check_errors += 1;
                self.report
                    .msg(format!("ERROR flushing COPIED repairs: {e}"));
            }
        }
    }

    /// Clear the dirty and corrupt bits after a repair that left the image consistent.
    fn mark_clean(&mut self) {
        let bits = self.h.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_CORRUPT);
        let res = self
            .host
            .write_all_at(&bits.to_be_bytes(), meta::HEADER_OFF_INCOMPAT)
            .and_then(|()| self.host.flush());
        match res {
            Ok(()) => {
                self.h.incompatible_features = bits;
                self.report
                    .msg("Marked the image clean (dirty/corrupt bits cleared)".to_string());
            }
            Err(e) => {
                self.report.check_errors += 1;
                self.report
                    .msg(format!("ERROR clearing the dirty bit: {e}"));
            }
        }
    }
}

/// What one L2 descriptor refers to, as the checker sees it.
enum Kind {
    Compressed,
    /// A host cluster (data, or preallocated zeros) at this (maybe misaligned) offset.
    Allocated(u64),
    ZeroPlain,
    Unallocated,
}
