//! Changing a qcow2 image's format options in place (`qemu-img amend`): the compatibility
//! level (v2 = compat 0.10, v3 = compat 1.1) and lazy refcounts.
//!
//! ```text
//!   upgrade 0.10 -> 1.1:  snapshots get the extra data v3 requires (their disk size), then
//!                         one header write (v3 fields, feature name table)
//!   downgrade 1.1 -> 0.10 (what qemu refuses is refused first: refcount_bits != 16, an
//!                         external data file or extended L2, bitmaps, snapshots of another
//!                         size, zstd with compressed clusters):
//!                         zero clusters expanded (no backing file: made unallocated; else
//!                         allocated and written with zeros), in every L1 table, then the
//!                         v2 header (compatible, incompatible and autoclear bits cleared)
//!   lazy_refcounts on|off (v3 only): the compatible bit (the refcounts vmdisk keeps are
//!                         always exact, so turning it off needs no repair)
//! ```

use std::collections::HashSet;

use vmdisk_block::Result as BResult;

use crate::error::{Qcow2Error, Result, Table};
use crate::image::State;
use crate::meta::{
    self, decode_table, L2Entry, SnapshotHeader, COMPAT_LAZY_REFCOUNTS, INCOMPAT_COMPRESSION,
    INCOMPAT_DIRTY, OFLAG_COPIED, OFLAG_ZERO,
};
use crate::{read_meta, BlockDevice, CompressionType, Qcow2Image};

/// What `amend` changes; `None` leaves an option as it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendOptions {
    /// 2 (compat 0.10) or 3 (compat 1.1).
    pub version: Option<u32>,
    pub lazy_refcounts: Option<bool>,
}

/// What `amend` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AmendReport {
    pub old_version: u32,
    pub new_version: u32,
    /// Zero clusters turned into unallocated or zero-filled data clusters (downgrade).
    pub zero_clusters_expanded: u64,
}

impl Qcow2Image {
    /// Apply `opts` (see the module docs). Everything that would be refused is refused
    /// before the first write.
    pub fn amend(&self, opts: &AmendOptions) -> BResult<AmendReport> {
        let has_backing = self.backing().is_some();
        self.exclusive(|st, host| amend_state(st, host, opts, has_backing))
    }
}

fn amend_state(
    st: &mut State,
    host: &dyn BlockDevice,
    opts: &AmendOptions,
    has_backing: bool,
) -> Result<AmendReport> {
    let old = st.h.version;
    let new = opts.version.unwrap_or(old);
    if !matches!(new, 2 | 3) {
        return Err(Qcow2Error::refused(format!("compat level {new}")));
    }
    let lazy = opts
        .lazy_refcounts
        .unwrap_or(st.h.lazy_refcounts() && new >= 3);
    if lazy && new < 3 {
        return Err(Qcow2Error::refused(
            "lazy refcounts with compat=0.10: they need compatibility level 1.1 (use \
             compat=1.1)",
        ));
    }
    if new < old {
        check_downgrade(st, host)?;
    }
    let mut report = AmendReport {
        old_version: old,
        new_version: new,
        zero_clusters_expanded: 0,
    };
    st.write_back(host)?;
    if new > old {
        upgrade(st, host)?;
    }
    if new >= 3 {
        if lazy {
            st.h.compatible_features |= COMPAT_LAZY_REFCOUNTS;
            // As at open: a lazy-refcounts image is dirty while it is open for writing.
            st.h.incompatible_features |= INCOMPAT_DIRTY;
        } else {
            st.h.compatible_features &= !COMPAT_LAZY_REFCOUNTS;
            st.h.incompatible_features &= !INCOMPAT_DIRTY;
        }
        st.write_header(host)?;
        host.flush()?;
    }
    if new < old {
        report.zero_clusters_expanded = downgrade(st, host, has_backing)?;
    }
    Ok(report)
}

/// qemu's refusals for a downgrade to v2, checked before anything is written.
fn check_downgrade(st: &mut State, host: &dyn BlockDevice) -> Result<()> {
    if st.h.refcount_order != 4 {
        return Err(Qcow2Error::refused(
            "compat=0.10 with refcount_bits other than 16 (v2 images have 16-bit refcounts)",
        ));
    }
    if st.h.data_file.is_some() {
        return Err(Qcow2Error::refused("downgrading an image with a data file"));
    }
    if !st.bitmaps.is_empty() {
        return Err(Qcow2Error::refused(
            "downgrading an image with persistent dirty bitmaps (v2 cannot keep them); remove \
             them first with `qemu-img bitmap --remove IMAGE NAME`",
        ));
    }
    let unknown = st.h.incompatible_features & !(INCOMPAT_DIRTY | INCOMPAT_COMPRESSION);
    if unknown != 0 {
        return Err(Qcow2Error::refused(format!(
            "downgrading an image with incompatible features {unknown:#x} set"
        )));
    }
    let size = st.h.size;
    if st
        .snaps
        .iter()
        .any(|s| s.vm_state_size > u64::from(u32::MAX) || s.disk_size.is_some_and(|d| d != size))
    {
        return Err(Qcow2Error::refused(
            "downgrading: internal snapshots of another disk size (or with more VM state than \
             v2 can record) prevent it, as in qemu-img",
        ));
    }
    if st.h.compression_type == CompressionType::Zstd && has_compressed(st, host)? {
        return Err(Qcow2Error::refused(
            "downgrading an image with zstd compression type and existing compressed clusters",
        ));
    }
    Ok(())
}

/// Each distinct L2 table reachable from any L1 table (the active one and each
/// snapshot's), once. The L1 tables are read one at a time (each bounded by
/// `MAX_L1_BYTES`), and every offset must lie inside the file, so the set is bounded by
/// the file's clusters.
fn all_l2s(st: &State, host: &dyn BlockDevice) -> Result<Vec<u64>> {
    let cs = st.cs();
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut add = |l1: &[u64], base: u64| -> Result<()> {
        for (i, &e) in l1.iter().enumerate() {
            let at = base + i as u64 * 8;
            let off = meta::check_l1_entry(e, cs, at)?;
            if off == 0 {
                continue;
            }
            if off.checked_add(cs).is_none_or(|end| end > host.len()) {
                return Err(Qcow2Error::TableBeyondEnd {
                    table: Table::L2,
                    off,
                });
            }
            if seen.insert(off) {
                out.push(off);
            }
        }
        Ok(())
    };
    add(&st.l1, st.h.l1_table_offset)?;
    for sn in &st.snaps {
        if u64::from(sn.l1_size) * 8 > meta::MAX_L1_BYTES {
            return Err(Qcow2Error::Limit {
                what: "snapshot L1 table bytes",
                needed: u64::from(sn.l1_size) * 8,
                limit: meta::MAX_L1_BYTES,
            });
        }
        let l1 = decode_table(&read_meta(
            host,
            sn.l1_table_offset,
            u64::from(sn.l1_size) * 8,
            Table::SnapshotL1,
        )?);
        add(&l1, sn.l1_table_offset)?;
    }
    Ok(out)
}

fn has_compressed(st: &mut State, host: &dyn BlockDevice) -> Result<bool> {
    let (bits, ext) = (st.h.cluster_bits, st.h.extended_l2());
    for off in all_l2s(st, host)? {
        for (raw, at) in st.l2_words(host, off)? {
            if matches!(
                L2Entry::decode(raw, bits, ext, at)?,
                L2Entry::Compressed { .. }
            ) {
                return Ok(true);
            }
        }
    }
    Ok(false)
}

fn upgrade(st: &mut State, host: &dyn BlockDevice) -> Result<()> {
    // v3 requires every snapshot to record its disk size.
    if st.snaps.iter().any(|s| s.disk_size.is_none()) {
        let size = st.h.size;
        let snaps: Vec<SnapshotHeader> = st
            .snaps
            .iter()
            .cloned()
            .map(|mut s| {
                s.disk_size.get_or_insert(size);
                s
            })
            .collect();
        crate::snapshot::replace_table(st, host, snaps)?;
    }
    st.h.version = 3;
    st.h.refcount_order = 4;
    st.h.header_length = meta::V3_HEADER_LEN;
    st.h.incompatible_features = 0;
    st.h.compatible_features = 0;
    st.h.autoclear_features = 0;
    st.h.compression_type = CompressionType::Zlib;
    if st.h.feature_names.is_empty() {
        st.h.feature_names = meta::Header::default_feature_names();
    }
    write_whole_header(st, host)
}

/// Write the header and zero the rest of its cluster (no stale extension bytes of another
/// version may follow it).
fn write_whole_header(st: &mut State, host: &dyn BlockDevice) -> Result<()> {
    let mut b = st.h.serialize()?;
    b.resize(st.cs() as usize, 0);
    host.write_all_at(&b, 0)?;
    Ok(host.flush()?)
}

fn downgrade(st: &mut State, host: &dyn BlockDevice, has_backing: bool) -> Result<u64> {
    let cs = st.cs();
    let (bits, ext) = (st.h.cluster_bits, st.h.extended_l2());
    let mut expanded = 0u64;
    for l2 in all_l2s(st, host)? {
        let l2_refs = st.refcount(host, l2)?;
        for (idx, (raw, at)) in st.l2_words(host, l2)?.into_iter().enumerate() {
            let L2Entry::Zero { host_off, .. } = L2Entry::decode(raw, bits, ext, at)? else {
                continue;
            };
            // An allocated zero cluster only this L2 table reaches: its bytes become zeros.
            if host_off != 0 && st.refcount(host, host_off)? <= l2_refs {
                host.write_zeroes(host_off, cs, false)?;
                st.set_l2_word(host, l2, idx, raw & !OFLAG_ZERO)?;
                expanded += 1;
                continue;
            }
            if host_off != 0 {
                // Shared with another L2 table (a snapshot's data): leave its bytes alone,
                // drop this table's references and expand as if it were unallocated.
                for _ in 0..l2_refs {
                    st.push_pending_dec(host_off);
                }
            }
            let new_raw = if !has_backing {
                // Reads as zeros unallocated too.
                0
            } else {
                // Over a backing file it must hide what is below: a cluster of zeros,
                // referenced by every L1 table that shares this L2 table.
                let c = st.alloc_clusters(host, 1)?;
                st.ensure_host_len(host, c + cs)?;
                host.write_zeroes(c, cs, false)?;
                for _ in 1..l2_refs {
                    st.adjust_refcount(host, c, 1)?;
                }
                if l2_refs == 1 {
                    c | OFLAG_COPIED
                } else {
                    c
                }
            };
            st.set_l2_word(host, l2, idx, new_raw)?;
            expanded += 1;
        }
        // Keep the cache bounded on big images.
        st.write_back(host)?;
    }
    st.write_back(host)?;
    host.flush()?;
    st.h.version = 2;
    st.h.incompatible_features = 0;
    st.h.compatible_features = 0;
    st.h.autoclear_features = 0;
    st.h.compression_type = CompressionType::Zlib;
    st.h.feature_names.clear();
    write_whole_header(st, host)?;
    Ok(expanded)
}
