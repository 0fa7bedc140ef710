//! Internal snapshots on an open, writable [`Qcow2Image`]: create, list, apply, delete.
//!
//! Refcounts count, per cluster, how many L1 tables (the active one and each snapshot's copy)
//! reach it. The active tables carry COPIED exactly where the refcount is 1. Every step keeps
//! the on-disk image free of references to clusters whose refcount is not durable:
//! increments are written and flushed before the tables that add references, a snapshot is
//! removed from the table before its clusters are released, and COPIED is cleared (durably)
//! before a refcount rises above 1. A crash can leak clusters, and can leave clusters at
//! refcount 1 without COPIED (harmless: the next write copies them; `check -r all` sets the
//! flag again) — never COPIED on a shared cluster. `tests/crash_points.rs` cuts every
//! snapshot operation at each of its writes and has qemu-img check the result.

use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{Qcow2Error, Result, Table};
use crate::image::State;
use crate::meta::{self, decode_table, encode_table, L2Entry, SnapshotHeader, OFLAG_COPIED};
use crate::{read_meta, BlockDevice, Qcow2Image, SnapshotInfo};

/// Find a snapshot by id first, then by name (as qemu does).
fn find(snaps: &[SnapshotHeader], name_or_id: &str) -> Result<usize> {
    snaps
        .iter()
        .position(|s| s.id == name_or_id)
        .or_else(|| snaps.iter().position(|s| s.name == name_or_id))
        .ok_or_else(|| Qcow2Error::refused(format!("no snapshot named or numbered '{name_or_id}'")))
}

/// Refuse up front when adding 1 to every refcount reachable from `l1` would overflow the
/// refcount width (so a failed snapshot leaves memory and disk untouched).
fn check_headroom(st: &mut State, host: &dyn BlockDevice, l1: &[u64]) -> Result<()> {
    let cs = st.cs();
    let mut inc: std::collections::HashMap<u64, u64> = std::collections::HashMap::new();
    for (i, &e) in l1.iter().enumerate() {
        let off = meta::check_l1_entry(e, cs, i as u64 * 8)?;
        if off == 0 {
            continue;
        }
        *inc.entry(off).or_default() += 1;
        for (raw, at) in st.l2_words(host, off)? {
            match L2Entry::decode(raw, st.h.cluster_bits, st.h.extended_l2(), at)? {
                L2Entry::Normal { host_off, .. } => *inc.entry(host_off).or_default() += 1,
                L2Entry::Zero { host_off, .. } if host_off != 0 => {
                    *inc.entry(host_off).or_default() += 1
                }
                L2Entry::Compressed { host_off, len } => {
                    let (a, b) = L2Entry::compressed_clusters(host_off, len, cs);
                    let mut c = a;
                    while c <= b {
                        *inc.entry(c).or_default() += 1;
                        c += cs;
                    }
                }
                _ => {}
            }
        }
    }
    let max = meta::refcount_max(st.h.refcount_order);
    for (c, n) in inc {
        let cur = st.refcount(host, c)?;
        if cur.saturating_add(n) > max {
            return Err(Qcow2Error::Limit {
                what: "refcount (too many snapshots for this refcount width)",
                needed: cur.saturating_add(n),
                limit: max,
            });
        }
    }
    Ok(())
}

/// Add `delta` to the refcount of every L2 table and data cluster reachable from `l1`.
fn tree_adjust(st: &mut State, host: &dyn BlockDevice, l1: &[u64], delta: i64) -> Result<()> {
    let cs = st.cs();
    for (i, &e) in l1.iter().enumerate() {
        let off = meta::check_l1_entry(e, cs, i as u64 * 8)?;
        if off == 0 {
            continue;
        }
        for (raw, at) in st.l2_words(host, off)? {
            match L2Entry::decode(raw, st.h.cluster_bits, st.h.extended_l2(), at)? {
                L2Entry::Normal { host_off, .. } => {
                    st.adjust_refcount(host, host_off, delta)?;
                }
                L2Entry::Zero { host_off, .. } if host_off != 0 => {
                    st.adjust_refcount(host, host_off, delta)?;
                }
                L2Entry::Compressed { host_off, len } => {
                    let (a, b) = L2Entry::compressed_clusters(host_off, len, cs);
                    let mut c = a;
                    while c <= b {
                        st.adjust_refcount(host, c, delta)?;
                        c += cs;
                    }
                }
                _ => {}
            }
        }
        st.adjust_refcount(host, off, delta)?;
    }
    Ok(())
}

/// Set COPIED in the active L1/L2 tables exactly where the refcount is 1.
fn fix_copied(st: &mut State, host: &dyn BlockDevice) -> Result<()> {
    let cs = st.cs();
    for i in 0..st.l1.len() {
        let off = meta::check_l1_entry(st.l1[i], cs, i as u64 * 8)?;
        if off == 0 {
            continue;
        }
        let rc = st.refcount(host, off)?;
        let want = if rc == 1 { off | OFLAG_COPIED } else { off };
        if st.l1[i] != want {
            st.l1[i] = want;
            st.l1_dirty = true;
        }
        for (idx, (raw, at)) in st.l2_words(host, off)?.into_iter().enumerate() {
            let host_off = match L2Entry::decode(raw, st.h.cluster_bits, st.h.extended_l2(), at)? {
                L2Entry::Normal { host_off, .. } => host_off,
                L2Entry::Zero { host_off, .. } if host_off != 0 => host_off,
                _ => continue,
            };
            let want = if st.refcount(host, host_off)? == 1 {
                raw | OFLAG_COPIED
            } else {
                raw & !OFLAG_COPIED
            };
            if want != raw {
                st.set_l2_word(host, off, idx, want)?;
            }
        }
    }
    Ok(())
}

/// Clear COPIED everywhere in the active L1/L2 tables (before a snapshot shares them all).
fn clear_copied(st: &mut State, host: &dyn BlockDevice) -> Result<()> {
    let cs = st.cs();
    for i in 0..st.l1.len() {
        let off = meta::check_l1_entry(st.l1[i], cs, i as u64 * 8)?;
        if off == 0 {
            continue;
        }
        for (idx, (raw, _)) in st.l2_words(host, off)?.into_iter().enumerate() {
            if raw & OFLAG_COPIED != 0 {
                st.set_l2_word(host, off, idx, raw & !OFLAG_COPIED)?;
            }
        }
        if st.l1[i] & OFLAG_COPIED != 0 {
            st.l1[i] &= !OFLAG_COPIED;
            st.l1_dirty = true;
        }
    }
    Ok(())
}

/// Write `snaps` as the new snapshot table and point the header at it (crash-safe order).
pub(crate) fn replace_table(
    st: &mut State,
    host: &dyn BlockDevice,
    snaps: Vec<SnapshotHeader>,
) -> Result<()> {
    let cs = st.cs();
    let old_off = st.h.snapshots_offset;
    let old_len = if st.h.nb_snapshots > 0 {
        SnapshotHeader::serialize_table(&st.snaps).len() as u64
    } else {
        0
    };
    let table = SnapshotHeader::serialize_table(&snaps);
    let new_off = if snaps.is_empty() {
        0
    } else {
        let n = (table.len() as u64).div_ceil(cs);
        let at = st.alloc_clusters(host, n)?;
        if host.len() < at + n * cs {
            host.resize(at + n * cs)?;
        }
        host.write_all_at(&table, at)?;
        at
    };
    st.write_back(host)?;
    host.flush()?;
    st.h.nb_snapshots = snaps.len() as u32;
    st.h.snapshots_offset = new_off;
    st.write_header(host)?;
    host.flush()?;
    st.snaps = snaps;
    if old_off != 0 {
        for c in 0..old_len.div_ceil(cs) {
            st.push_pending_dec(old_off + c * cs);
        }
    }
    st.write_back(host)
}

/// Take an internal snapshot of the active state named `name`; returns its id.
pub fn create(img: &Qcow2Image, name: &str) -> vmdisk_block::Result<String> {
    img.exclusive(|st, host| {
        meta::check_snapshot_name("name", name)?;
        if st.h.refcount_order == 0 {
            return Err(Qcow2Error::refused(
                "snapshots need refcount_bits of at least 2",
            ));
        }
        if st.snaps.iter().any(|s| s.name == name) {
            return Err(Qcow2Error::refused(format!(
                "a snapshot named '{name}' already exists"
            )));
        }
        if st.snaps.len() as u32 >= meta::MAX_SNAPSHOTS {
            return Err(Qcow2Error::Limit {
                what: "number of snapshots",
                needed: st.snaps.len() as u64 + 1,
                limit: u64::from(meta::MAX_SNAPSHOTS),
            });
        }
        st.write_back(host)?;
        let active = st.l1.clone();
        check_headroom(st, host, &active)?;
        let cs = st.cs();
        let l1: Vec<u64> = st.l1.iter().map(|e| e & !OFLAG_COPIED).collect();
        let l1_bytes = encode_table(&l1);
        let n = (l1_bytes.len() as u64).div_ceil(cs);
        let l1_off = if n > 0 {
            let at = st.alloc_clusters(host, n)?;
            if host.len() < at + n * cs {
                host.resize(at + n * cs)?;
            }
            host.write_all_at(&l1_bytes, at)?;
            at
        } else {
            0
        };
        // COPIED goes first and durably: until the new refcounts land, a cluster without
        // COPIED at refcount 1 only costs a needless copy-on-write, while COPIED at refcount
        // 2 would be a real inconsistency (qemu-img check counts it as corruption).
        // (write_back flushes the tables before returning).
        clear_copied(st, host)?;
        st.write_back(host)?;
        tree_adjust(st, host, &active, 1)?;
        st.write_back(host)?;
        let id = st
            .snaps
            .iter()
            .filter_map(|s| s.id.parse::<u64>().ok())
            .max()
            .unwrap_or(0)
            + 1;
        meta::check_snapshot_name("id", &id.to_string())?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        let mut snaps = st.snaps.clone();
        snaps.push(SnapshotHeader {
            l1_table_offset: l1_off,
            l1_size: st.h.l1_size,
            id: id.to_string(),
            name: name.to_string(),
            date_sec: now.as_secs() as u32,
            date_nsec: now.subsec_nanos(),
            vm_clock_nsec: 0,
            vm_state_size: 0,
            disk_size: Some(st.h.size),
            icount: None,
            extra_tail: Vec::new(),
        });
        replace_table(st, host, snaps)?;
        // Normally a no-op (everything active is now shared); it settles odd inputs such as
        // a cluster the active tables reach twice.
        fix_copied(st, host)?;
        st.write_back(host)?;
        Ok(id.to_string())
    })
}

/// The snapshots of an open image.
pub fn list(img: &Qcow2Image) -> Vec<SnapshotInfo> {
    img.info().snapshots
}

fn read_l1(st: &State, host: &dyn BlockDevice, sn: &SnapshotHeader) -> Result<Vec<u64>> {
    if sn.l1_size > st.h.l1_size {
        return Err(Qcow2Error::refused(
            "applying a snapshot with a larger L1 table than the active one",
        ));
    }
    let mut l1 = snapshot_l1(host, st.cs(), sn)?;
    l1.resize(st.h.l1_size as usize, 0);
    Ok(l1)
}

/// A snapshot's L1 table as it is on disk: the one reader of every snapshot L1 (apply,
/// delete, amend, snapshot views), so each gets the same size limit and alignment check.
pub(crate) fn snapshot_l1(
    host: &dyn BlockDevice,
    cluster_size: u64,
    sn: &SnapshotHeader,
) -> Result<Vec<u64>> {
    let bytes = u64::from(sn.l1_size) * 8;
    if bytes > meta::MAX_L1_BYTES {
        return Err(Qcow2Error::Limit {
            what: "snapshot L1 table bytes",
            needed: bytes,
            limit: meta::MAX_L1_BYTES,
        });
    }
    if !sn.l1_table_offset.is_multiple_of(cluster_size) {
        return Err(Qcow2Error::MisalignedTable {
            table: Table::SnapshotL1,
            off: sn.l1_table_offset,
            field: sn.l1_table_offset,
        });
    }
    Ok(decode_table(&read_meta(
        host,
        sn.l1_table_offset,
        bytes,
        Table::SnapshotL1,
    )?))
}

/// Revert the active state to snapshot `name_or_id`.
pub fn apply(img: &Qcow2Image, name_or_id: &str) -> vmdisk_block::Result<()> {
    img.exclusive(|st, host| {
        let i = find(&st.snaps, name_or_id)?;
        let sn = st.snaps[i].clone();
        if !st.bitmaps.is_empty() {
            // qemu refuses too (bdrv_snapshot_goto: "Device has active dirty bitmaps"), for
            // enabled and disabled bitmaps alike: what a bitmap recorded would no longer
            // describe the disk.
            let names: Vec<&str> = st
                .bitmaps
                .entries()
                .iter()
                .map(|b| b.name.as_str())
                .collect();
            return Err(Qcow2Error::refused(format!(
                "applying a snapshot to an image with persistent dirty bitmaps ({}), which \
                 qemu-img refuses as well; remove them first with `qemu-img bitmap --remove \
                 IMAGE NAME`, then apply the snapshot",
                names.join(", ")
            )));
        }
        // A snapshot taken before a resize brings its own size back, as in qemu
        // (qcow2_snapshot_goto truncates to it and grows the active L1 to fit).
        let disk_size = sn.disk_size.unwrap_or(st.h.size);
        if disk_size > meta::MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::Limit {
                what: "snapshot disk size",
                needed: disk_size,
                limit: meta::MAX_VIRTUAL_SIZE,
            });
        }
        st.write_back(host)?;
        st.grow_l1(host, u64::from(sn.l1_size))?;
        let new_l1: Vec<u64> = read_l1(st, host, &sn)?
            .into_iter()
            .map(|e| e & !OFLAG_COPIED)
            .collect();
        check_headroom(st, host, &new_l1)?;
        tree_adjust(st, host, &new_l1, 1)?;
        st.write_back(host)?;
        let old = std::mem::replace(&mut st.l1, new_l1);
        st.l1_dirty = true;
        st.write_back(host)?;
        tree_adjust(st, host, &old, -1)?;
        st.write_back(host)?;
        fix_copied(st, host)?;
        st.write_back(host)?;
        if disk_size != st.h.size {
            host.flush()?;
            st.h.size = disk_size;
            st.write_header(host)?;
            host.flush()?;
        }
        st.invalidate_caches();
        Ok(())
    })
}

/// Delete snapshot `name_or_id`, releasing what only it referenced.
pub fn delete(img: &Qcow2Image, name_or_id: &str) -> vmdisk_block::Result<()> {
    img.exclusive(|st, host| {
        let i = find(&st.snaps, name_or_id)?;
        let sn = st.snaps[i].clone();
        st.write_back(host)?;
        let l1 = snapshot_l1(host, st.cs(), &sn)?;
        let mut snaps = st.snaps.clone();
        snaps.remove(i);
        replace_table(st, host, snaps)?;
        tree_adjust(st, host, &l1, -1)?;
        let cs = st.cs();
        for c in 0..(u64::from(sn.l1_size) * 8).div_ceil(cs) {
            st.adjust_refcount(host, sn.l1_table_offset + c * cs, -1)?;
        }
        st.write_back(host)?;
        fix_copied(st, host)?;
        st.write_back(host)
    })
}

/// How a snapshot is named on the command line (`qemu-img convert -l`): by id, by name, by
/// both (both must match), or by one string tried as an id first, then as a name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SnapshotSelector {
    IdOrName(String),
    Id(String),
    Name(String),
    IdAndName { id: String, name: String },
}

impl SnapshotSelector {
    fn find(&self, snaps: &[SnapshotHeader]) -> Result<usize> {
        let pos = |f: &dyn Fn(&SnapshotHeader) -> bool| snaps.iter().position(f);
        let (found, what) = match self {
            SnapshotSelector::IdOrName(s) => {
                (find(snaps, s).ok(), format!("named or numbered '{s}'"))
            }
            SnapshotSelector::Id(id) => (
                pos(&|s: &SnapshotHeader| s.id == *id),
                format!("with id '{id}'"),
            ),
            SnapshotSelector::Name(n) => (
                pos(&|s: &SnapshotHeader| s.name == *n),
                format!("named '{n}'"),
            ),
            SnapshotSelector::IdAndName { id, name } => (
                pos(&|s: &SnapshotHeader| s.id == *id && s.name == *name),
                format!("with id '{id}' and name '{name}'"),
            ),
        };
        found.ok_or_else(|| Qcow2Error::refused(format!("no snapshot {what}")))
    }
}

impl Qcow2Image {
    /// Open the image as it was when snapshot `which` was taken: read-only, its size and
    /// its L1 table (the active state is never touched). `backing` is the image's backing
    /// device, as for [`Qcow2Image::open`].
    pub fn open_snapshot(
        host: std::sync::Arc<dyn BlockDevice>,
        backing: Option<std::sync::Arc<dyn BlockDevice>>,
        which: &SnapshotSelector,
    ) -> vmdisk_block::Result<Qcow2Image> {
        let img = Qcow2Image::open(host, backing, true)?;
        {
            let mut st = img.lock();
            let host = img.host().clone();
            let i = which.find(&st.snaps)?;
            let sn = st.snaps[i].clone();
            let l1 = snapshot_l1(&*host, st.cs(), &sn)?;
            let size = sn.disk_size.unwrap_or(st.h.size);
            let need = meta::l1_entries_for(size, st.h.cluster_bits, st.h.extended_l2());
            if need > l1.len() as u64 {
                return Err(Qcow2Error::refused(format!(
                    "snapshot '{}' has an L1 table of {} entries, too small for its disk size \
                     of {size} bytes",
                    sn.name,
                    l1.len()
                ))
                .into());
            }
            st.h.size = size;
            st.h.l1_size = sn.l1_size;
            st.h.l1_table_offset = sn.l1_table_offset;
            st.l1 = l1;
            st.invalidate_caches();
        }
        Ok(img)
    }
}
