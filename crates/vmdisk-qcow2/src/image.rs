//! [`Qcow2Image`]: a qcow2 image as a [`BlockDevice`] over a host device.
//!
//! Metadata (L1, a bounded L2 cache, the refcount table, a bounded refcount-block cache) lives
//! in [`State`] behind a mutex. Reads map the request under the lock and do the data IO
//! without it, so rayon workers read concurrently. Writes are exclusive (an `RwLock` gate).
//!
//! Crash safety: metadata is written back in dependency order by [`State::write_back`]:
//! refcount blocks (increments) → refcount table → L2 tables → L1 table → deferred refcount
//! decrements, with a host flush between each step that had something to write. Data is
//! written to the host before the L2 entries that point at it reach the disk. A freed cluster
//! is only decremented (and so only reusable) after the L2/L1 entry that dropped it is durable.
//! A crash can therefore leak clusters but never leave an entry pointing at a cluster whose
//! refcount is not durable.
//!
//! Writes to images with extended L2 entries are refused at open (`Unsupported`):
//! reading them (subclusters, zero bits) is supported.
//!
//! Every guest read - plain reads, and the copy-on-write reads a partial-cluster write makes -
//! goes through one path ([`Qcow2Image::read_segs`]), so the same damaged image fails the same
//! way whichever operation touches it.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use vmdisk_block::{check_range, merge_extents, Extent, ExtentKind, Result as BResult};

use crate::bitmap::Bitmaps;

mod bitmap_sync;
use crate::error::{Qcow2Error, Result, Table};
use crate::meta::{
    self, check_l1_entry, decode_table, encode_table, refcount_get, refcount_max, refcount_set,
    CompressionType, Header, L2Entry, SnapshotHeader, SubclusterBitmap, SubclusterState,
    OFLAG_COPIED, OFLAG_ZERO,
};
use crate::{decompress_cluster, read_meta, BlockDevice, Error, Qcow2Info};

/// Memory for cached L2 tables (bounded whatever the cluster size).
const L2_CACHE_BYTES: u64 = 32 << 20;
/// Memory for cached refcount blocks.
const RB_CACHE_BYTES: u64 = 8 << 20;
/// Always keep at least this many tables cached (small images, huge clusters).
const MIN_CACHE_SLOTS: usize = 16;

/// One cached metadata cluster.
pub(crate) struct Slot<T> {
    pub val: T,
    pub dirty: bool,
    used: u64,
}

/// A bounded write-back cache of metadata clusters keyed by host offset: L2 tables (as
/// decoded words) and refcount blocks (as bytes) are each held in one of these. Only clean
/// entries are evicted, least recently used first; when every entry is dirty the owner writes
/// back first (see [`State::load`]).
pub(crate) struct Cache<T> {
    map: HashMap<u64, Slot<T>>,
    max: usize,
}

impl<T> Cache<T> {
    fn new(max: usize) -> Self {
        Cache {
            map: HashMap::new(),
            max,
        }
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn needs_room(&self, off: u64) -> bool {
        !self.map.contains_key(&off) && self.map.len() >= self.max
    }
    fn has_clean(&self) -> bool {
        self.map.values().any(|s| !s.dirty)
    }
    /// Drop the least recently used clean entry.
    fn evict_clean(&mut self) {
        if let Some((&k, _)) = self
            .map
            .iter()
            .filter(|(_, s)| !s.dirty)
            .min_by_key(|(_, s)| s.used)
        {
            self.map.remove(&k);
        }
    }
    /// Insert (or replace) an entry.
    fn insert(&mut self, off: u64, val: T, dirty: bool, tick: u64) {
        self.map.insert(
            off,
            Slot {
                val,
                dirty,
                used: tick,
            },
        );
    }
    /// Forget the entry at `off` (a table that was freed).
    pub(crate) fn remove(&mut self, off: u64) {
        self.map.remove(&off);
    }
    fn dirty_count(&self) -> usize {
        self.map.values().filter(|s| s.dirty).count()
    }
    /// End of the last dirty cluster (0 when nothing is dirty).
    fn dirty_end(&self, cs: u64) -> u64 {
        self.map
            .iter()
            .filter(|(_, s)| s.dirty)
            .map(|(&off, _)| off + cs)
            .max()
            .unwrap_or(0)
    }
    fn dirty_mut(&mut self) -> impl Iterator<Item = (u64, &mut Slot<T>)> {
        self.map
            .iter_mut()
            .filter(|(_, s)| s.dirty)
            .map(|(&k, s)| (k, s))
    }
    /// Keep dirty entries only (the on-disk tables changed under the clean ones).
    fn retain_dirty(&mut self) {
        self.map.retain(|_, s| s.dirty);
    }
}

/// Which cache [`State::load`] fills.
#[derive(Clone, Copy)]
enum CacheKind {
    L2,
    RefcountBlock,
}

/// Where a piece of a guest range is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seg {
    Data {
        host_off: u64,
    },
    Zero,
    Backing,
    Compressed {
        host_off: u64,
        clen: u64,
        in_off: u64,
    },
}

/// The metadata state of an open image.
pub(crate) struct State {
    pub h: Header,
    pub snaps: Vec<SnapshotHeader>,
    pub l1: Vec<u64>,
    pub l1_dirty: bool,
    pub(crate) l2: Cache<Vec<u64>>,
    rt: Vec<u64>,
    rt_dirty: bool,
    rb: Cache<Vec<u8>>,
    tick: u64,
    pending_dec: Vec<u64>,
    /// Punch a hole in the host file for every cluster whose refcount reaches zero in the
    /// next write-back (set while emptying an image, so its file shrinks on disk).
    pub punch_freed: bool,
    /// Cluster-aligned end of the space in use (allocation appends here).
    pub(crate) host_end: u64,
    /// Lowest cluster index that may be free.
    pub(crate) free_hint: u64,
    /// Next free byte after the last compressed cluster written (0: none).
    pub(crate) compressed_tail: u64,
    /// Length the host file needs (what it would be grown to exactly); the host itself may
    /// be longer while writing, see [`State::ensure_host_len`] and [`State::trim_host`].
    pub(crate) file_end: u64,
    pub has_backing: bool,
    /// Persistent bitmaps (kept valid while writing; see `bitmap.rs`).
    pub bitmaps: Bitmaps,
}

/// The entry at `off` of `cache`, read from the host and decoded when missing.
fn fill<'c, T>(
    cache: &'c mut Cache<T>,
    host: &dyn BlockDevice,
    off: u64,
    cs: u64,
    tick: u64,
    table: Table,
    decode: impl FnOnce(&[u8]) -> T,
) -> Result<&'c mut Slot<T>> {
    let slot = match cache.map.entry(off) {
        Entry::Occupied(o) => o.into_mut(),
        Entry::Vacant(v) => v.insert(Slot {
            val: decode(&read_meta(host, off, cs, table)?),
            dirty: false,
            used: tick,
        }),
    };
    slot.used = tick;
    Ok(slot)
}

/// Grow the host ahead of need by at least this much (one ftruncate per step, not per
/// allocation); the file is trimmed back to its real end on flush and close.
const HOST_GROW_STEP: u64 = 64 << 20;

impl State {
    pub fn open(host: &dyn BlockDevice, h: Header, has_backing: bool) -> Result<State> {
        let cs = h.cluster_size();
        let l1 = decode_table(&read_meta(
            host,
            h.l1_table_offset,
            u64::from(h.l1_size) * 8,
            Table::L1,
        )?);
        let rt = decode_table(&read_meta(
            host,
            h.refcount_table_offset,
            u64::from(h.refcount_table_clusters) * cs,
            Table::RefcountTable,
        )?);
        let (snaps, _) = crate::read_snapshots(host, &h)?;
        let bitmaps = Bitmaps::new(crate::read_bitmaps(host, &h)?, h.size, cs);
        let host_end = host.len().div_ceil(cs) * cs;
        Ok(State {
            h,
            snaps,
            l1,
            l1_dirty: false,
            l2: Cache::new(((L2_CACHE_BYTES / cs) as usize).max(MIN_CACHE_SLOTS)),
            rt,
            rt_dirty: false,
            rb: Cache::new(((RB_CACHE_BYTES / cs) as usize).max(MIN_CACHE_SLOTS)),
            tick: 0,
            pending_dec: Vec::new(),
            punch_freed: false,
            host_end,
            free_hint: 1,
            compressed_tail: 0,
            file_end: host.len(),
            has_backing,
            bitmaps,
        })
    }

    pub fn cs(&self) -> u64 {
        self.h.cluster_size()
    }

    /// Make the host at least `end` bytes long, growing it in big steps.
    pub(crate) fn ensure_host_len(&mut self, host: &dyn BlockDevice, end: u64) -> Result<()> {
        self.file_end = self.file_end.max(end);
        let len = host.len();
        if len < end {
            let ahead = HOST_GROW_STEP.max(len / 8);
            host.resize(end.max(len.saturating_add(ahead)))?;
        }
        Ok(())
    }

    /// Cut the host back to the length it needs (undo growing ahead).
    pub fn trim_host(&mut self, host: &dyn BlockDevice) -> Result<()> {
        let len = host.len();
        if len > self.file_end {
            host.resize(self.file_end)?;
        }
        Ok(())
    }

    /// The host was resized by someone else (snapshot code): take its length as needed.
    pub fn adopt_host_len(&mut self, host: &dyn BlockDevice) {
        self.file_end = self.file_end.max(host.len());
    }
    pub(crate) fn cbits(&self) -> u32 {
        self.h.cluster_bits
    }
    pub(crate) fn l2_bits(&self) -> u32 {
        meta::l2_bits(self.h.cluster_bits, self.h.extended_l2())
    }
    fn wpe(&self) -> usize {
        if self.h.extended_l2() {
            2
        } else {
            1
        }
    }

    /// Drop every cached table (after the on-disk metadata changed under us).
    pub fn invalidate_caches(&mut self) {
        self.l2.retain_dirty();
        self.rb.retain_dirty();
    }

    // ---------------------------------------------------------------- L2 tables

    /// Make sure the cluster at `off` is in the cache `kind`: on a miss, room is made first
    /// (the least recently used clean entry goes; when everything cached is dirty, all dirty
    /// metadata is written back before), then the cluster is read from the host.
    fn load(&mut self, host: &dyn BlockDevice, kind: CacheKind, off: u64) -> Result<()> {
        let needs_room = match kind {
            CacheKind::L2 => self.l2.needs_room(off),
            CacheKind::RefcountBlock => self.rb.needs_room(off),
        };
        if needs_room {
            let has_clean = match kind {
                CacheKind::L2 => self.l2.has_clean(),
                CacheKind::RefcountBlock => self.rb.has_clean(),
            };
            if !has_clean {
                self.write_back(host)?;
            }
            match kind {
                CacheKind::L2 => self.l2.evict_clean(),
                CacheKind::RefcountBlock => self.rb.evict_clean(),
            }
        }
        self.tick += 1;
        Ok(())
    }

    fn load_l2(&mut self, host: &dyn BlockDevice, off: u64) -> Result<&mut Slot<Vec<u64>>> {
        self.load(host, CacheKind::L2, off)?;
        let (tick, cs) = (self.tick, self.cs());
        fill(&mut self.l2, host, off, cs, tick, Table::L2, decode_table)
    }

    /// L2 table offset for L1 index `l1i` (0 when unallocated).
    pub(crate) fn l2_off(&self, l1i: u64) -> Result<u64> {
        let Some(&e) = self.l1.get(l1i as usize) else {
            return Ok(0);
        };
        let at = self.h.l1_table_offset + l1i * 8;
        check_l1_entry(e, self.cs(), at)
    }

    /// Standard entry, subcluster bitmap and the entry's host offset for guest cluster `gidx`.
    pub fn entry(&mut self, host: &dyn BlockDevice, gidx: u64) -> Result<(L2Entry, u64, u64)> {
        let l1i = gidx >> self.l2_bits();
        let l2i = (gidx & ((1 << self.l2_bits()) - 1)) as usize;
        let off = self.l2_off(l1i)?;
        if off == 0 {
            return Ok((L2Entry::Unallocated, 0, 0));
        }
        let wpe = self.wpe();
        let (cbits, ext) = (self.cbits(), self.h.extended_l2());
        let slot = self.load_l2(host, off)?;
        let raw = slot.val[l2i * wpe];
        let bm = if wpe == 2 { slot.val[l2i * 2 + 1] } else { 0 };
        let at = off + (l2i * wpe * 8) as u64;
        Ok((L2Entry::decode(raw, cbits, ext, at)?, bm, at))
    }

    /// The (standard) words of the L2 table at `off` with their host offsets.
    pub fn l2_words(&mut self, host: &dyn BlockDevice, off: u64) -> Result<Vec<(u64, u64)>> {
        let wpe = self.wpe();
        let slot = self.load_l2(host, off)?;
        Ok(slot
            .val
            .iter()
            .step_by(wpe)
            .enumerate()
            .map(|(i, &w)| (w, off + (i * wpe * 8) as u64))
            .collect())
    }

    /// Overwrite standard word `idx` of the L2 table at `off` (in place, marked dirty).
    pub fn set_l2_word(
        &mut self,
        host: &dyn BlockDevice,
        off: u64,
        idx: usize,
        raw: u64,
    ) -> Result<()> {
        let wpe = self.wpe();
        let slot = self.load_l2(host, off)?;
        slot.val[idx * wpe] = raw;
        slot.dirty = true;
        Ok(())
    }

    /// Queue a refcount decrement for after the next table write-back.
    pub fn push_pending_dec(&mut self, off: u64) {
        self.pending_dec.push(off);
    }

    /// Make the L2 table for `l1i` writable (allocate it or copy a shared one).
    fn l2_writable(&mut self, host: &dyn BlockDevice, l1i: u64) -> Result<u64> {
        let e = self.l1[l1i as usize];
        let off = self.l2_off(l1i)?;
        if off != 0 && e & OFLAG_COPIED != 0 {
            return Ok(off);
        }
        let cs = self.cs();
        let new = self.alloc_clusters(host, 1)?;
        let words = if off == 0 {
            vec![0u64; (cs / 8) as usize]
        } else {
            let w = self.load_l2(host, off)?.val.clone();
            self.pending_dec.push(off);
            w
        };
        self.tick += 1;
        self.l2.insert(new, words, true, self.tick);
        self.l1[l1i as usize] = new | OFLAG_COPIED;
        self.l1_dirty = true;
        Ok(new)
    }

    /// Set the entry of guest cluster `gidx` (standard word; bitmap word cleared).
    pub(crate) fn set_entry(&mut self, host: &dyn BlockDevice, gidx: u64, raw: u64) -> Result<()> {
        self.set_entry_bm(host, gidx, raw, 0)
    }

    /// Set the entry of guest cluster `gidx` with its subcluster bitmap (extended L2).
    fn set_entry_bm(&mut self, host: &dyn BlockDevice, gidx: u64, raw: u64, bm: u64) -> Result<()> {
        let l1i = gidx >> self.l2_bits();
        let l2i = (gidx & ((1 << self.l2_bits()) - 1)) as usize;
        let off = self.l2_writable(host, l1i)?;
        let wpe = self.wpe();
        let slot = self.load_l2(host, off)?;
        slot.val[l2i * wpe] = raw;
        if wpe == 2 {
            slot.val[l2i * 2 + 1] = bm;
        }
        slot.dirty = true;
        Ok(())
    }

    /// Queue decrements for every host cluster an entry references.
    pub(crate) fn release(&mut self, e: L2Entry) {
        match e {
            L2Entry::Normal { host_off, .. } => self.pending_dec.push(host_off),
            L2Entry::Zero { host_off, .. } if host_off != 0 => self.pending_dec.push(host_off),
            L2Entry::Compressed { host_off, len } => {
                let (a, b) = L2Entry::compressed_clusters(host_off, len, self.cs());
                let mut c = a;
                while c <= b {
                    self.pending_dec.push(c);
                    c += self.cs();
                }
            }
            _ => {}
        }
    }

    // ---------------------------------------------------------------- refcounts

    fn rb_entries(&self) -> u64 {
        self.h.refcount_block_entries()
    }

    fn load_rb(&mut self, host: &dyn BlockDevice, off: u64) -> Result<&mut Slot<Vec<u8>>> {
        self.load(host, CacheKind::RefcountBlock, off)?;
        let tick = self.tick;
        fill(
            &mut self.rb,
            host,
            off,
            self.h.cluster_size(),
            tick,
            Table::RefcountBlock,
            |b| b.to_vec(),
        )
    }

    fn rb_off(&self, bi: u64) -> Result<u64> {
        match self.rt.get(bi as usize) {
            None => Ok(0),
            Some(&e) => {
                let off = e & meta::REFT_OFFSET_MASK;
                if !off.is_multiple_of(self.cs()) {
                    return Err(Qcow2Error::DecodingRefcountTableEntry {
                        at: self.h.refcount_table_offset + bi * 8,
                    });
                }
                Ok(off)
            }
        }
    }

    /// Refcount of the host cluster containing `off`.
    pub fn refcount(&mut self, host: &dyn BlockDevice, off: u64) -> Result<u64> {
        let idx = off >> self.cbits();
        let bi = idx / self.rb_entries();
        let boff = self.rb_off(bi)?;
        if boff == 0 {
            return Ok(0);
        }
        let order = self.h.refcount_order;
        let i = idx % self.rb_entries();
        Ok(refcount_get(&self.load_rb(host, boff)?.val, i, order))
    }

    /// Set the refcount of the cluster at `off` (the refcount block must exist).
    fn set_refcount(&mut self, host: &dyn BlockDevice, off: u64, v: u64) -> Result<()> {
        self.ensure_refblock(host, off)?;
        let idx = off >> self.cbits();
        let bi = idx / self.rb_entries();
        let boff = self.rb_off(bi)?;
        let order = self.h.refcount_order;
        let i = idx % self.rb_entries();
        let s = self.load_rb(host, boff)?;
        refcount_set(&mut s.val, i, order, v)?;
        s.dirty = true;
        Ok(())
    }

    /// Add `delta` (±1) to the refcount of the cluster at `off`.
    pub fn adjust_refcount(&mut self, host: &dyn BlockDevice, off: u64, delta: i64) -> Result<u64> {
        let cur = self.refcount(host, off)?;
        let new = if delta < 0 {
            cur.checked_sub(delta.unsigned_abs())
                .ok_or(Qcow2Error::DecrementingRefcount { off })?
        } else {
            cur.checked_add(delta as u64)
                .filter(|&v| v <= refcount_max(self.h.refcount_order))
                .ok_or(Qcow2Error::Limit {
                    what: "refcount",
                    needed: cur.saturating_add(1),
                    limit: refcount_max(self.h.refcount_order),
                })?
        };
        self.set_refcount(host, off, new)?;
        if new == 0 {
            self.free_hint = self.free_hint.min(off >> self.cbits());
        }
        Ok(new)
    }

    /// Make sure a refcount block covers the cluster at `off`; returns true when one was made.
    fn ensure_refblock(&mut self, host: &dyn BlockDevice, off: u64) -> Result<bool> {
        let cs = self.cs();
        let idx = off >> self.cbits();
        let bi = idx / self.rb_entries();
        if bi as usize >= self.rt.len() {
            self.grow_reftable(host, bi)?;
        }
        if self.rb_off(bi)? != 0 {
            return Ok(false);
        }
        // A missing block means every cluster in its range has refcount 0: place the new
        // block at the first cluster of its own range, counting itself.
        let at = bi * self.rb_entries() * cs;
        if at == 0 {
            return Err(Qcow2Error::MissingFirstRefcountBlock {
                at: self.h.refcount_table_offset,
            });
        }
        let mut data = vec![0u8; cs as usize];
        refcount_set(&mut data, 0, self.h.refcount_order, 1)?;
        self.tick += 1;
        self.rb.insert(at, data, true, self.tick);
        self.rt[bi as usize] = at;
        self.rt_dirty = true;
        self.host_end = self.host_end.max(at + cs);
        Ok(true)
    }

    /// Replace the refcount table by a bigger one that can index block `need_bi`.
    fn grow_reftable(&mut self, host: &dyn BlockDevice, need_bi: u64) -> Result<()> {
        let cs = self.cs();
        let e = self.rb_entries();
        let p = self.host_end;
        let mut new_entries = ((need_bi + 1).max(self.rt.len() as u64) * 2).max(cs / 8);
        let (mut t, mut blocks);
        loop {
            t = (new_entries * 8).div_ceil(cs);
            // Blocks needed for [p, p + t + nb) that do not exist yet.
            let mut nb = 0u64;
            loop {
                let first = p / cs;
                let end = first + t + nb;
                let mut missing = Vec::new();
                for bi in first / e..=(end - 1) / e {
                    if self.rb_off(bi)? == 0 {
                        missing.push(bi);
                    }
                }
                if missing.len() as u64 <= nb {
                    blocks = missing;
                    break;
                }
                nb = missing.len() as u64;
            }
            let last_bi = (p / cs + t + nb) / e;
            if last_bi < new_entries && need_bi < new_entries {
                break;
            }
            new_entries = (last_bi + 1).max(need_bi + 1) * 2;
        }
        if new_entries * 8 > meta::MAX_REFCOUNT_TABLE_BYTES {
            return Err(Qcow2Error::Limit {
                what: "refcount table bytes",
                needed: new_entries * 8,
                limit: meta::MAX_REFCOUNT_TABLE_BYTES,
            });
        }
        let mut rt = self.rt.clone();
        rt.resize((t * cs / 8) as usize, 0);
        let order = self.h.refcount_order;
        // New blocks live right after the new table.
        let mut new_blocks: HashMap<u64, Vec<u8>> = HashMap::new();
        for (k, &bi) in blocks.iter().enumerate() {
            let at = p + (t + k as u64) * cs;
            rt[bi as usize] = at;
            new_blocks.insert(at, vec![0u8; cs as usize]);
        }
        let n_new = t + blocks.len() as u64;
        for c in 0..n_new {
            let coff = p + c * cs;
            let idx = coff / cs;
            let boff = rt[(idx / e) as usize];
            let i = idx % e;
            if let Some(b) = new_blocks.get_mut(&boff) {
                refcount_set(b, i, order, 1)?;
            } else {
                self.rt = rt.clone();
                let s = self.load_rb(host, boff)?;
                refcount_set(&mut s.val, i, order, 1)?;
                s.dirty = true;
            }
        }
        // Durable order: blocks (new and dirty old), table, header, then free the old table.
        self.ensure_host_len(host, p + n_new * cs)?;
        for (at, b) in &new_blocks {
            host.write_all_at(b, *at)?;
        }
        self.rt = rt;
        self.write_dirty_rbs(host)?;
        host.flush()?;
        host.write_all_at(&encode_table(&self.rt), p)?;
        host.flush()?;
        let old_off = self.h.refcount_table_offset;
        let old_clusters = u64::from(self.h.refcount_table_clusters);
        self.h.refcount_table_offset = p;
        self.h.refcount_table_clusters = t as u32;
        self.write_header(host)?;
        host.flush()?;
        for c in 0..old_clusters {
            self.pending_dec.push(old_off + c * cs);
        }
        for (at, data) in new_blocks {
            self.tick += 1;
            self.rb.insert(at, data, false, self.tick);
        }
        self.rt_dirty = false;
        self.host_end = self.host_end.max(p + n_new * cs);
        Ok(())
    }

    /// Allocate `n` contiguous free clusters (refcount set to 1); returns the host offset.
    ///
    /// New refcount blocks sit at the start of the range they cover, so a run can never
    /// span more than one block's range: `n` must stay below the entries of one block
    /// (callers split bigger writes with [`State::max_run`]).
    pub fn alloc_clusters(&mut self, host: &dyn BlockDevice, n: u64) -> Result<u64> {
        let cs = self.cs();
        if n >= self.rb_entries() {
            return Err(Qcow2Error::refused(format!(
                "allocating {n} contiguous clusters (at most {} with this cluster size and \
                 refcount width)",
                self.rb_entries() - 1
            )));
        }
        'retry: loop {
            let mut start = self.free_hint.max(1);
            let end_idx = self.host_end / cs;
            let mut run = 0u64;
            let mut idx = start;
            while idx < end_idx && run < n {
                if self.refcount(host, idx * cs)? == 0 {
                    run += 1;
                } else {
                    run = 0;
                    start = idx + 1;
                    if self.free_hint == idx {
                        self.free_hint = idx + 1;
                    }
                }
                idx += 1;
            }
            // A run that reaches the end of the file may continue past it.
            let s = start;
            for c in s..s + n {
                if self.ensure_refblock(host, c * cs)? {
                    continue 'retry;
                }
            }
            for c in s..s + n {
                if self.refcount(host, c * cs)? != 0 {
                    continue 'retry;
                }
            }
            for c in s..s + n {
                self.set_refcount(host, c * cs, 1)?;
            }
            self.host_end = self.host_end.max((s + n) * cs);
            if self.free_hint == s {
                self.free_hint = s + n;
            }
            return Ok(s * cs);
        }
    }

    /// Longest run `alloc_clusters` is asked for by writes: at most 1/8 of a refcount
    /// block's range, and never past the end of the range the next allocation (at the end
    /// of the space in use) falls in. A run that straddles into a range without a refcount
    /// block would restart after the new block and leave a hole — a longer file than
    /// qemu's, and free clusters at `free_hint` every later allocation scans past.
    pub fn max_run(&self) -> u64 {
        let cap = (self.rb_entries() / 8).clamp(1, 1024);
        let per = self.rb_entries();
        let next = self.host_end / self.cs();
        // At a range's first cluster the new refcount block itself takes that cluster.
        let left = match per - next % per {
            n if n == per => per - 1,
            n => n,
        };
        cap.min(left.max(1))
    }

    // ---------------------------------------------------------------- write-back

    pub(crate) fn write_dirty_rbs(&mut self, host: &dyn BlockDevice) -> Result<bool> {
        let cs = self.cs();
        let mut any = false;
        let end = self.rb.dirty_end(cs);
        if end > 0 {
            self.ensure_host_len(host, end)?;
        }
        for (off, s) in self.rb.dirty_mut() {
            host.write_all_at(&s.val, off)?;
            s.dirty = false;
            any = true;
        }
        Ok(any)
    }

    pub fn write_header(&mut self, host: &dyn BlockDevice) -> Result<()> {
        let b = self.h.serialize()?;
        Ok(host.write_all_at(&b, 0)?)
    }

    /// Write all dirty metadata in crash-safe order (see the module doc).
    pub fn write_back(&mut self, host: &dyn BlockDevice) -> Result<()> {
        let cs = self.cs();
        if self.write_dirty_rbs(host)? {
            host.flush()?;
        }
        if self.rt_dirty {
            host.write_all_at(&encode_table(&self.rt), self.h.refcount_table_offset)?;
            host.flush()?;
            self.rt_dirty = false;
        }
        let mut any = false;
        let end = self.l2.dirty_end(cs);
        if end > 0 {
            self.ensure_host_len(host, end)?;
        }
        for (off, s) in self.l2.dirty_mut() {
            host.write_all_at(&encode_table(&s.val), off)?;
            s.dirty = false;
            any = true;
        }
        if any {
            host.flush()?;
        }
        if self.l1_dirty {
            host.write_all_at(&encode_table(&self.l1), self.h.l1_table_offset)?;
            host.flush()?;
            self.l1_dirty = false;
        }
        if !self.pending_dec.is_empty() {
            let pend = std::mem::take(&mut self.pending_dec);
            let cs = self.cs();
            let mut freed = Vec::new();
            for off in pend {
                if self.adjust_refcount(host, off, -1)? == 0 && self.punch_freed {
                    freed.push(off / cs * cs);
                }
            }
            // Nothing points at these clusters any more (L2/L1 are on disk): their bytes may
            // go. A crash before the refcounts are written leaks holes, as it would leak the
            // clusters. One call per contiguous run: each can cost a synchronous discard.
            freed.sort_unstable();
            let mut i = 0;
            while i < freed.len() {
                let mut j = i + 1;
                while j < freed.len() && freed[j] == freed[j - 1] + cs {
                    j += 1;
                }
                host.discard(freed[i], (j - i) as u64 * cs)?;
                i = j;
            }
            self.compressed_tail = 0;
            // Decrements of refcount-table clusters never need a new block, so this cannot
            // recurse into more decrements.
            if self.write_dirty_rbs(host)? {
                host.flush()?;
            }
        }
        Ok(())
    }

    fn dirty_l2_count(&self) -> usize {
        self.l2.dirty_count()
    }

    // ---------------------------------------------------------------- mapping

    /// Map `[off, off+len)` into segments (merged where contiguous).
    pub fn map(
        &mut self,
        host: &dyn BlockDevice,
        off: u64,
        len: u64,
    ) -> Result<Vec<(u64, u64, Seg)>> {
        let cs = self.cs();
        let cbits = self.cbits();
        let ext = self.h.extended_l2();
        let span_bits = cbits + self.l2_bits();
        let mut out: Vec<(u64, u64, Seg)> = Vec::new();
        let push = |out: &mut Vec<(u64, u64, Seg)>, o: u64, n: u64, seg: Seg| {
            if let Some(last) = out.last_mut() {
                let merged = match (last.2, seg) {
                    (Seg::Zero, Seg::Zero) | (Seg::Backing, Seg::Backing) => true,
                    (Seg::Data { host_off: a }, Seg::Data { host_off: b }) => a + last.1 == b,
                    _ => false,
                };
                if merged && last.0 + last.1 == o {
                    last.1 += n;
                    return;
                }
            }
            out.push((o, n, seg));
        };
        // Unallocated here: reads from the backing file (zeros without one or past its end);
        // block_status reports it as unallocated, not as a zero cluster.
        let unalloc = Seg::Backing;
        let end = off + len;
        let mut pos = off;
        while pos < end {
            let l1i = pos >> span_bits;
            if self.l2_off(l1i)? == 0 {
                let next = ((l1i + 1) << span_bits).min(end);
                push(&mut out, pos, next - pos, unalloc);
                pos = next;
                continue;
            }
            let gidx = pos >> cbits;
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            let (e, bm, at) = self.entry(host, gidx)?;
            if ext && !matches!(e, L2Entry::Compressed { .. }) {
                let scs = cs / u64::from(meta::SUBCLUSTERS);
                let bm = SubclusterBitmap::decode(bm);
                let mut p = pos;
                while p < pos + n {
                    let sc_in = p & (cs - 1);
                    let sc = (sc_in / scs) as u32;
                    let sn = (scs - (sc_in % scs)).min(pos + n - p);
                    let seg = match bm.state(e, sc, scs, at)? {
                        SubclusterState::Unallocated => unalloc,
                        SubclusterState::Zero => Seg::Zero,
                        SubclusterState::Data { host_off } => Seg::Data {
                            host_off: host_off + sc_in % scs,
                        },
                    };
                    push(&mut out, p, sn, seg);
                    p += sn;
                }
            } else {
                let seg = match e {
                    L2Entry::Unallocated => unalloc,
                    L2Entry::Zero { .. } => Seg::Zero,
                    L2Entry::Normal { host_off, .. } => Seg::Data {
                        host_off: host_off + in_off,
                    },
                    L2Entry::Compressed { host_off, len } => Seg::Compressed {
                        host_off,
                        clen: len,
                        in_off,
                    },
                };
                push(&mut out, pos, n, seg);
            }
            pos += n;
        }
        Ok(out)
    }
}

/// What the data-read path needs from the metadata state.
#[derive(Clone, Copy)]
struct ReadCtx {
    cs: u64,
    ctype: CompressionType,
    /// Bytes of the host file in use (it may be longer while growing ahead).
    end: u64,
}

impl State {
    fn read_ctx(&self) -> ReadCtx {
        ReadCtx {
            cs: self.cs(),
            ctype: self.h.compression_type,
            end: self.file_end,
        }
    }
}

/// What `zero_clusters` makes of each whole cluster.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Clear {
    /// Reads as zeros from now on (zero flag, or unallocated when nothing is below).
    Zero,
    /// Reads as zeros and keeps its storage (`write_zeroes` without `may_unmap`, i.e.
    /// NBD_CMD_FLAG_NO_HOLE): an allocated cluster stays allocated.
    ZeroKeep,
    /// The guest gave it up: zeros, or (v2 over a backing file) whatever the backing holds.
    Discard,
    /// Unallocated: reads from the backing file again.
    Unallocate,
}

/// A qcow2 image opened over a host device. `Send + Sync`; see the module doc for locking.
pub struct Qcow2Image {
    pub(crate) host: Arc<dyn BlockDevice>,
    backing: Option<Arc<dyn BlockDevice>>,
    read_only: bool,
    pub(crate) gate: RwLock<()>,
    st: Mutex<State>,
    closed: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Qcow2Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Image")
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

impl Qcow2Image {
    /// Open over `host`; `backing` is the already-opened backing device (the factory resolves
    /// names). Refuses encrypted images, external data files, unknown incompatible features;
    /// for writing also refuses images marked corrupt or dirty, and extended L2 images.
    pub fn open(
        host: Arc<dyn BlockDevice>,
        backing: Option<Arc<dyn BlockDevice>>,
        read_only: bool,
    ) -> BResult<Self> {
        let h = crate::read_header_raw(&*host)?;
        let read_only = read_only || host.is_read_only();
        if !read_only {
            if h.corrupt() {
                return Err(Qcow2Error::OpeningCorruptForWrite.into());
            }
            if h.dirty() {
                return Err(Qcow2Error::refused(
                    "writing an image whose dirty bit is set (refcounts may be stale); run \
                     `vmdisk check -r all` first",
                )
                .into());
            }
            if h.extended_l2() {
                return Err(Qcow2Error::refused(
                    "writing qcow2 images with extended L2 entries (reading is supported)",
                )
                .into());
            }
        }
        let mut st = State::open(&*host, h, backing.is_some())?;
        if !read_only {
            let mut changed = false;
            // Autoclear bits we do not maintain must go before the first write (the spec);
            // the bitmaps bit stays when the bitmaps were read: vmdisk keeps them valid.
            let keep = if st.bitmaps.is_empty() {
                0
            } else {
                meta::AUTOCLEAR_BITMAPS
            };
            if st.h.autoclear_features & !keep != 0 {
                st.h.autoclear_features &= keep;
                changed = true;
            }
            if st.h.lazy_refcounts() && st.h.version == 3 {
                st.h.incompatible_features |= meta::INCOMPAT_DIRTY;
                changed = true;
            }
            if changed {
                st.write_header(&*host)?;
                host.flush()?;
            }
        }
        Ok(Qcow2Image {
            host,
            backing,
            read_only,
            gate: RwLock::new(()),
            st: Mutex::new(st),
            closed: false.into(),
        })
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.st.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` with exclusive access to the metadata (for snapshots).
    pub(crate) fn exclusive<R>(
        &self,
        f: impl FnOnce(&mut State, &dyn BlockDevice) -> Result<R>,
    ) -> BResult<R> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        // Snapshot code sizes the host itself: give it the exact length, then adopt its.
        st.trim_host(&*self.host)?;
        let r = f(&mut st, &*self.host);
        st.adopt_host_len(&*self.host);
        Ok(r?)
    }

    pub fn info(&self) -> Qcow2Info {
        let st = self.lock();
        Qcow2Info::from_header(&st.h, &st.snaps, st.bitmaps.entries())
    }

    pub fn cluster_size(&self) -> u64 {
        self.lock().cs()
    }

    /// The host device (for tools that inspect the file).
    pub fn host(&self) -> &Arc<dyn BlockDevice> {
        &self.host
    }

    /// The backing device, if any.
    pub fn backing(&self) -> Option<&Arc<dyn BlockDevice>> {
        self.backing.as_ref()
    }

    fn read_backing(&self, buf: &mut [u8], off: u64) -> Result<()> {
        match &self.backing {
            None => buf.fill(0),
            Some(b) => {
                let blen = b.len();
                let n = if off >= blen {
                    0
                } else {
                    ((blen - off) as usize).min(buf.len())
                };
                if n > 0 {
                    b.read_exact_at(&mut buf[..n], off)?;
                }
                buf[n..].fill(0);
            }
        }
        Ok(())
    }

    /// Fill `buf` (guest bytes from `base`) from mapped segments. The one data-read path:
    /// plain reads call it without the metadata lock, writes (copy-on-write of a partial
    /// cluster) with it, so what it needs from the state comes in `ctx`. Host offsets are
    /// checked against the file's real end, not the length it was grown ahead to.
    fn read_segs(
        &self,
        segs: &[(u64, u64, Seg)],
        buf: &mut [u8],
        base: u64,
        ctx: ReadCtx,
    ) -> Result<()> {
        let (cs, ctype, hlen) = (ctx.cs, ctx.ctype, ctx.end);
        for &(o, n, seg) in segs {
            let dst = &mut buf[(o - base) as usize..(o - base + n) as usize];
            match seg {
                Seg::Zero => dst.fill(0),
                Seg::Backing => self.read_backing(dst, o)?,
                Seg::Data { host_off } => {
                    if host_off.checked_add(n).is_none_or(|e| e > hlen) {
                        return Err(Qcow2Error::ReadingDataCluster { host_off });
                    }
                    self.host.read_exact_at(dst, host_off)?;
                }
                Seg::Compressed {
                    host_off,
                    clen,
                    in_off,
                } => {
                    if host_off >= hlen {
                        return Err(Qcow2Error::ReadingCompressedCluster { host_off });
                    }
                    let mut cbuf = vec![0u8; clen.min(hlen - host_off) as usize];
                    self.host.read_exact_at(&mut cbuf, host_off)?;
                    let mut c = vec![0u8; cs as usize];
                    decompress_cluster(ctype, &cbuf, &mut c, host_off)?;
                    dst.copy_from_slice(&c[in_off as usize..(in_off + n) as usize]);
                }
            }
        }
        Ok(())
    }

    /// Read with the gate already held (used by writes for partial clusters).
    fn read_locked(&self, st: &mut State, buf: &mut [u8], off: u64) -> Result<()> {
        let segs = st.map(&*self.host, off, buf.len() as u64)?;
        self.read_segs(&segs, buf, off, st.read_ctx())
    }

    pub(crate) fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly.into());
        }
        Ok(())
    }

    pub(crate) fn maybe_write_back(&self, st: &mut State) -> Result<()> {
        if st.l2.len() * 2 >= st.l2.max && st.dirty_l2_count() * 2 >= st.l2.max {
            st.write_back(&*self.host)?;
        }
        Ok(())
    }

    pub(crate) fn write_locked(&self, st: &mut State, buf: &[u8], off: u64) -> Result<()> {
        let host = &*self.host;
        let cs = st.cs();
        let cbits = st.cbits();
        let end = off + buf.len() as u64;
        let mut pos = off;
        while pos < end {
            let gidx = pos >> cbits;
            let in_off = pos & (cs - 1);
            let n = (cs - in_off).min(end - pos);
            let (e, _, _) = st.entry(host, gidx)?;
            if let L2Entry::Normal {
                host_off,
                copied: true,
            } = e
            {
                // In place; extend over following in-place clusters that are host-contiguous.
                let mut run = n;
                let mut h_next = host_off + cs;
                while pos + run < end {
                    let g2 = (pos + run) >> cbits;
                    match st.entry(host, g2)?.0 {
                        L2Entry::Normal {
                            host_off: h,
                            copied: true,
                        } if h == h_next => {
                            run += cs.min(end - pos - run);
                            h_next += cs;
                        }
                        _ => break,
                    }
                }
                let s = (pos - off) as usize;
                host.write_all_at(&buf[s..s + run as usize], host_off + in_off)?;
                pos += run;
                continue;
            }
            // Needs a new cluster: gather following clusters that also need one and are
            // fully covered, allocate them as one contiguous run.
            let mut k = 1u64;
            if in_off == 0 && n == cs {
                while pos + k * cs + cs <= end {
                    let e2 = st.entry(host, gidx + k)?.0;
                    if matches!(e2, L2Entry::Normal { copied: true, .. }) {
                        break;
                    }
                    k += 1;
                    if k >= st.max_run() {
                        break;
                    }
                }
            }
            let new = st.alloc_clusters(host, k)?;
            st.ensure_host_len(host, new + k * cs)?;
            if k == 1 && n < cs {
                let mut c = vec![0u8; cs as usize];
                let cstart = gidx << cbits;
                let vis = cs.min(st.h.size - cstart);
                self.read_locked(st, &mut c[..vis as usize], cstart)?;
                let s = (pos - off) as usize;
                c[in_off as usize..(in_off + n) as usize].copy_from_slice(&buf[s..s + n as usize]);
                host.write_all_at(&c, new)?;
            } else {
                let s = (pos - off) as usize;
                host.write_all_at(&buf[s..s + (k * cs) as usize], new)?;
            }
            for i in 0..k {
                let old = st.entry(host, gidx + i)?.0;
                st.set_entry(host, gidx + i, (new + i * cs) | OFLAG_COPIED)?;
                st.release(old);
            }
            pos += if k == 1 { n } else { k * cs };
            self.maybe_write_back(st)?;
        }
        Ok(())
    }

    /// Zero (or discard, when `discard`) whole clusters `[first, last)`.
    pub(crate) fn zero_clusters(
        &self,
        st: &mut State,
        first: u64,
        last: u64,
        clear: Clear,
    ) -> Result<()> {
        if clear == Clear::ZeroKeep {
            return self.zero_clusters_keep(st, first, last);
        }
        let host = &*self.host;
        let v3 = st.h.version >= 3;
        let backing = st.has_backing;
        let discard = clear != Clear::Zero;
        // Leaving clusters unallocated is the wanted result (not just an acceptable one).
        let unallocate = !backing || (discard && !v3) || clear == Clear::Unallocate;
        let cs = st.cs();
        let span_bits = st.cbits() + st.l2_bits();
        let mut g = first;
        while g < last {
            let l1i = g >> st.l2_bits();
            if st.l2_off(l1i)? == 0 && unallocate {
                // Whole L2 range already reads as zeros / from backing as wanted.
                g = (((l1i + 1) << span_bits) >> st.cbits()).min(last);
                continue;
            }
            let (e, _, _) = st.entry(host, g)?;
            let target: Option<u64> = if unallocate {
                // Unallocated reads as wanted (zeros, or backing for a v2 discard).
                (e != L2Entry::Unallocated).then_some(0)
            } else if v3 {
                (!matches!(e, L2Entry::Zero { host_off: 0, .. })).then_some(OFLAG_ZERO)
            } else {
                None
            };
            match target {
                Some(raw) => {
                    st.set_entry(host, g, raw)?;
                    st.release(e);
                }
                None if !v3 && backing && !discard => {
                    // v2 over a backing file has no zero flag: write zeros.
                    let zeros = vec![0u8; cs as usize];
                    self.write_locked(st, &zeros, g * cs)?;
                }
                None => {}
            }
            self.maybe_write_back(st)?;
            g += 1;
        }
        Ok(())
    }

    /// Zero whole clusters `[first, last)` without giving up their storage, as qemu zeroes
    /// without BDRV_REQ_MAY_UNMAP: an allocated cluster keeps its host cluster and gets the
    /// zero flag (v3) or is overwritten with zeros (v2, which has no zero flag). A compressed
    /// cluster cannot stay; it becomes a zero cluster (v3) or written zeros (v2). Unallocated
    /// clusters already read as zeros unless a backing file lies below; then they get the
    /// zero flag (v3) or written zeros (v2).
    fn zero_clusters_keep(&self, st: &mut State, first: u64, last: u64) -> Result<()> {
        let host = &*self.host;
        let v3 = st.h.version >= 3;
        let backing = st.has_backing;
        let cs = st.cs();
        let size = st.h.size;
        let span_bits = st.cbits() + st.l2_bits();
        let mut g = first;
        while g < last {
            let l1i = g >> st.l2_bits();
            if st.l2_off(l1i)? == 0 && !backing {
                // Nothing allocated in this L2 range, nothing below: zeros already.
                g = (((l1i + 1) << span_bits) >> st.cbits()).min(last);
                continue;
            }
            let (e, _, _) = st.entry(host, g)?;
            match e {
                L2Entry::Zero { .. } => {}
                L2Entry::Unallocated if !backing => {}
                L2Entry::Normal { host_off, copied } if v3 => {
                    let copied = if copied { OFLAG_COPIED } else { 0 };
                    st.set_entry(host, g, host_off | OFLAG_ZERO | copied)?;
                }
                L2Entry::Unallocated | L2Entry::Compressed { .. } if v3 => {
                    st.set_entry(host, g, OFLAG_ZERO)?;
                    st.release(e);
                }
                L2Entry::Unallocated | L2Entry::Normal { .. } | L2Entry::Compressed { .. } => {
                    // v2: zeros written in place (a shared or compressed cluster gets a new
                    // one); the last cluster may be cut short by the end of the disk.
                    let n = cs.min(size - g * cs);
                    self.write_locked(st, &vec![0u8; n as usize], g * cs)?;
                }
            }
            self.maybe_write_back(st)?;
            g += 1;
        }
        Ok(())
    }

    /// Make the whole clusters of `[off, off + len)` unallocated in this image, so they read
    /// from the backing file again (zeros without one); `off` and `off + len` must be cluster
    /// boundaries (or the end of the disk). Clusters shared with internal snapshots stay with
    /// them. This is how `commit` empties an overlay, as `qemu-img commit` does.
    pub fn unallocate(&self, off: u64, len: u64) -> BResult<()> {
        self.check_writable()?;
        check_range(self.len(), off, len)?;
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let cs = st.cs();
        let end = off + len;
        if !off.is_multiple_of(cs) || (!end.is_multiple_of(cs) && end != st.h.size) {
            return Err(Qcow2Error::refused(format!(
                "unallocating {len} bytes at {off}: only whole {cs}-byte clusters can be"
            ))
            .into());
        }
        st.note_write(&*self.host, off, len)?;
        self.zero_clusters(&mut st, off / cs, end.div_ceil(cs), Clear::Unallocate)?;
        st.punch_freed = true;
        let done = st.write_back(&*self.host);
        st.punch_freed = false;
        done?;
        st.trim_host(&*self.host)?;
        self.host.flush()
    }

    /// Point the image at another backing file (`None`: no backing file), with its format
    /// (written as the backing-format header extension). Only the header changes, in one
    /// write after all pending metadata is on disk; the guest view changes with it unless the
    /// caller first copied what differs (a safe rebase). The new backing is used from the
    /// next open on: until then this handle keeps reading the old one.
    pub fn set_backing(&self, file: Option<&str>, format: Option<&str>) -> BResult<()> {
        self.check_writable()?;
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let mut h = st.h.clone();
        h.backing_file = file.map(str::to_owned);
        h.backing_format = file.and(format).map(str::to_owned);
        // Refuse (too long, header over a cluster) before anything is written.
        h.serialize()?;
        st.write_back(&*self.host)?;
        self.host.flush()?;
        st.h = h;
        st.write_header(&*self.host)?;
        st.has_backing = file.is_some();
        self.host.flush()
    }

    fn zero_range(&self, off: u64, len: u64, clear: Clear) -> Result<()> {
        let discard = clear == Clear::Discard;
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let cs = st.cs();
        let size = st.h.size;
        let end = off + len;
        // Whole clusters; the last guest cluster counts as whole when it ends the disk.
        let first = off.div_ceil(cs);
        let last = if end == size {
            end.div_ceil(cs)
        } else {
            end / cs
        };
        if first >= last {
            if !discard {
                st.note_write(&*self.host, off, len)?;
                let z = vec![0u8; len as usize];
                self.write_locked(&mut st, &z, off)?;
            }
            return Ok(());
        }
        if !discard {
            let head = first * cs - off;
            if head > 0 {
                self.write_locked(&mut st, &vec![0u8; head as usize], off)?;
            }
            let tail_start = (last * cs).min(size);
            if end > tail_start {
                self.write_locked(&mut st, &vec![0u8; (end - tail_start) as usize], tail_start)?;
            }
        }
        st.note_write(&*self.host, off, len)?;
        self.zero_clusters(&mut st, first, last, clear)
    }

    /// Store one whole guest cluster already compressed by `compress_cluster`
    /// (the guest cluster must be unallocated in this image).
    pub fn write_compressed(&self, guest_off: u64, compressed: &[u8]) -> BResult<()> {
        self.write_compressed_batch(&[(guest_off, compressed)])
    }

    /// Store several whole guest clusters already compressed by `compress_cluster`, in
    /// strictly increasing guest order (each guest cluster must be unallocated in this
    /// image). They are packed back to back and written with one host write per
    /// contiguous stretch.
    pub fn write_compressed_batch(&self, items: &[(u64, &[u8])]) -> BResult<()> {
        self.check_writable()?;
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        let host = &*self.host;
        let cs = st.cs();
        // Validate everything before touching anything.
        let mut prev: Option<u64> = None;
        for &(guest_off, compressed) in items {
            check_range(st.h.size, guest_off, 1)?;
            if !guest_off.is_multiple_of(cs) {
                return Err(
                    Qcow2Error::refused("compressed write not at a cluster boundary").into(),
                );
            }
            if prev.is_some_and(|p| p >= guest_off) {
                return Err(Qcow2Error::refused(
                    "compressed batch not in strictly increasing guest order",
                )
                .into());
            }
            prev = Some(guest_off);
            let len = compressed.len() as u64;
            if len == 0 || len >= cs {
                return Err(Error::Limit {
                    what: "compressed cluster length",
                    needed: len,
                    limit: cs - 1,
                });
            }
            if st.entry(host, guest_off / cs)?.0 != L2Entry::Unallocated {
                return Err(Qcow2Error::refused(
                    "compressed write to a cluster that is already allocated",
                )
                .into());
            }
        }
        for &(guest_off, _) in items {
            st.note_write(host, guest_off, cs)?;
        }
        // 1. Place (allocate, count references); 2. write the data; 3. point L2 at it, so
        // no entry can reach the disk before its data.
        let mut places = Vec::with_capacity(items.len());
        for &(_, compressed) in items {
            places.push(self.place_compressed(&mut st, compressed.len() as u64)?);
        }
        let mut i = 0;
        let mut run = Vec::new();
        while i < items.len() {
            let start = places[i];
            let mut end = start + items[i].1.len() as u64;
            let mut j = i + 1;
            while j < items.len() && places[j] == end {
                end += items[j].1.len() as u64;
                j += 1;
            }
            st.ensure_host_len(host, end.div_ceil(cs) * cs)?;
            if j == i + 1 {
                host.write_all_at(items[i].1, start)?;
            } else {
                run.clear();
                for it in &items[i..j] {
                    run.extend_from_slice(it.1);
                }
                host.write_all_at(&run, start)?;
            }
            i = j;
        }
        for (&(guest_off, compressed), &at) in items.iter().zip(&places) {
            let raw = L2Entry::encode_compressed(at, compressed.len() as u64, st.cbits());
            st.set_entry(host, guest_off / cs, raw)?;
        }
        self.maybe_write_back(&mut st)?;
        Ok(())
    }

    /// Choose where `len` compressed bytes go (refcounts taken), packing after the previous
    /// compressed cluster when it fits, like qemu.
    fn place_compressed(&self, st: &mut State, len: u64) -> Result<u64> {
        let host = &*self.host;
        let cs = st.cs();
        let mut place = None;
        let t = st.compressed_tail;
        if t != 0 && !t.is_multiple_of(cs) {
            let room = cs - t % cs;
            let cur = t - t % cs;
            // Share a host cluster between at most max/2 compressed clusters, so a snapshot
            // (one more reference per entry) still fits narrow refcounts (2 bits hold 3).
            // Unreachable with 16-bit counts.
            if st.refcount(host, cur)? < refcount_max(st.h.refcount_order) / 2 {
                if len <= room {
                    st.adjust_refcount(host, cur, 1)?;
                    place = Some(t);
                } else {
                    let extra = (len - room).div_ceil(cs);
                    let next = cur + cs;
                    if next == st.host_end {
                        let got = st.alloc_clusters(host, extra)?;
                        if got == next {
                            st.adjust_refcount(host, cur, 1)?;
                            place = Some(t);
                        } else {
                            for c in 0..extra {
                                st.pending_dec.push(got + c * cs);
                            }
                        }
                    }
                }
            }
        }
        let at = match place {
            Some(p) => p,
            None => st.alloc_clusters(host, len.div_ceil(cs))?,
        };
        st.compressed_tail = at + len;
        Ok(at)
    }

    fn finish(&self) -> Result<()> {
        if self.read_only || self.closed.swap(true, std::sync::atomic::Ordering::SeqCst) {
            return Ok(());
        }
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        st.write_back(&*self.host)?;
        st.sync_bitmaps(&*self.host)?;
        st.trim_host(&*self.host)?;
        self.host.flush()?;
        if st.h.dirty() {
            st.h.incompatible_features &= !meta::INCOMPAT_DIRTY;
            st.write_header(&*self.host)?;
            self.host.flush()?;
        }
        Ok(())
    }

    /// Flush metadata and data, clear the dirty bit; also done (best effort) on Drop.
    pub fn close(self) -> BResult<()> {
        Ok(self.finish()?)
    }
}

impl Drop for Qcow2Image {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}

impl BlockDevice for Qcow2Image {
    fn len(&self) -> u64 {
        self.lock().h.size
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> BResult<()> {
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let segs = {
            let mut st = self.lock();
            check_range(st.h.size, off, buf.len() as u64)?;
            if buf.is_empty() {
                return Ok(());
            }
            (st.map(&*self.host, off, buf.len() as u64)?, st.read_ctx())
        };
        Ok(self.read_segs(&segs.0, buf, off, segs.1)?)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> BResult<()> {
        self.check_writable()?;
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        check_range(st.h.size, off, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        st.note_write(&*self.host, off, buf.len() as u64)?;
        Ok(self.write_locked(&mut st, buf, off)?)
    }

    fn flush(&self) -> BResult<()> {
        if self.read_only {
            return Ok(());
        }
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        st.write_back(&*self.host)?;
        st.trim_host(&*self.host)?;
        self.host.flush()
    }

    fn block_status(&self, off: u64, len: u64) -> BResult<Vec<Extent>> {
        let _g = self.gate.read().unwrap_or_else(|e| e.into_inner());
        let segs = {
            let mut st = self.lock();
            check_range(st.h.size, off, len)?;
            st.map(&*self.host, off, len)?
        };
        let mut out = Vec::with_capacity(segs.len());
        for (o, n, seg) in segs {
            match seg {
                Seg::Zero => out.push(Extent::new(o, n, ExtentKind::Zero)),
                Seg::Data { host_off } => out.push(Extent {
                    host_off: Some(host_off),
                    ..Extent::new(o, n, ExtentKind::Data)
                }),
                Seg::Compressed { .. } => out.push(Extent {
                    compressed: true,
                    ..Extent::new(o, n, ExtentKind::Data)
                }),
                Seg::Backing => {
                    let b = self.backing.as_ref();
                    let blen = b.map_or(0, |b| b.len());
                    let in_b = if o >= blen { 0 } else { n.min(blen - o) };
                    if let (Some(b), true) = (b, in_b > 0) {
                        for mut e in b.block_status(o, in_b)? {
                            e.depth += 1;
                            out.push(e);
                        }
                    }
                    if in_b < n {
                        // Nothing below covers it: qemu reports the depth of this image.
                        out.push(Extent::new(o + in_b, n - in_b, ExtentKind::Unallocated));
                    }
                }
            }
        }
        Ok(merge_extents(out))
    }

    /// Without `may_unmap` (NBD_CMD_FLAG_NO_HOLE, qemu-io's plain `write -z`) allocated
    /// clusters stay allocated; with it they may be freed.
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> BResult<()> {
        self.check_writable()?;
        check_range(self.len(), off, len)?;
        if len == 0 {
            return Ok(());
        }
        let clear = if may_unmap {
            Clear::Zero
        } else {
            Clear::ZeroKeep
        };
        Ok(self.zero_range(off, len, clear)?)
    }

    fn discard(&self, off: u64, len: u64) -> BResult<()> {
        self.check_writable()?;
        check_range(self.len(), off, len)?;
        if len == 0 {
            return Ok(());
        }
        Ok(self.zero_range(off, len, Clear::Discard)?)
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

/// Allocate every L2 table and data cluster of a freshly created image on `host` (data left
/// unwritten, extended L2 subclusters marked allocated): `preallocation=metadata`, as qemu.
pub(crate) fn preallocate_metadata(host: &dyn BlockDevice) -> Result<()> {
    let h = crate::read_header_raw(host)?;
    let mut st = State::open(host, h, false)?;
    let cs = st.cs();
    let bm = if st.h.extended_l2() {
        u64::from(u32::MAX)
    } else {
        0
    };
    let n = st.h.size.div_ceil(cs);
    let mut g = 0;
    while g < n {
        let k = (n - g).min(st.max_run());
        let new = st.alloc_clusters(host, k)?;
        st.ensure_host_len(host, new + k * cs)?;
        for i in 0..k {
            st.set_entry_bm(host, g + i, (new + i * cs) | OFLAG_COPIED, bm)?;
        }
        if st.l2.len() * 2 >= st.l2.max {
            st.write_back(host)?;
        }
        g += k;
    }
    st.write_back(host)?;
    st.trim_host(host)?;
    Ok(host.flush()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, CreateOptions};
    use vmdisk_block::MemDisk;

    fn new_image(size: u64) -> (Arc<MemDisk>, Qcow2Image) {
        let host = Arc::new(MemDisk::new(0));
        create(
            &*host,
            &CreateOptions {
                size,
                ..Default::default()
            },
        )
        .unwrap();
        let img = Qcow2Image::open(host.clone(), None, false).unwrap();
        (host, img)
    }

    #[test]
    fn compressed_batch_matches_single_writes() {
        let cs = 65536u64;
        let clusters: Vec<(u64, Vec<u8>)> = (0..40u64)
            .filter(|g| g % 7 != 3)
            .map(|g| {
                let data: Vec<u8> = (0..cs).map(|i| ((i % 251) as u8) ^ (g as u8)).collect();
                let c = crate::compress_cluster(crate::CompressionType::Zlib, cs, &data)
                    .unwrap()
                    .unwrap();
                (g * cs, c)
            })
            .collect();
        let (h1, one) = new_image(64 << 20);
        for (o, c) in &clusters {
            one.write_compressed(*o, c).unwrap();
        }
        one.flush().unwrap();
        let (h2, batch) = new_image(64 << 20);
        let items: Vec<(u64, &[u8])> = clusters.iter().map(|(o, c)| (*o, &c[..])).collect();
        batch.write_compressed_batch(&items[..10]).unwrap();
        batch.write_compressed_batch(&items[10..]).unwrap();
        batch.flush().unwrap();
        assert_eq!(h1.len(), h2.len());
        let (mut a, mut b) = (vec![0u8; 40 << 16], vec![1u8; 40 << 16]);
        one.read_exact_at(&mut a, 0).unwrap();
        batch.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b);
        // Out of order or already allocated: refused, nothing written.
        assert!(batch
            .write_compressed_batch(&[(41 * cs, items[0].1), (41 * cs, items[1].1)])
            .is_err());
        assert!(batch.write_compressed_batch(&items[..1]).is_err());
    }

    #[test]
    fn host_grows_ahead_and_is_trimmed_on_flush() {
        let (host, img) = new_image(256 << 20);
        let data = vec![3u8; 3 << 16];
        img.write_all_at(&data, 1 << 20).unwrap();
        assert!(host.len() >= 64 << 20, "grown ahead: {}", host.len());
        img.flush().unwrap();
        // Header, refcount table + block, L1, L2 and three data clusters.
        assert!(host.len() <= 9 << 16, "trimmed: {}", host.len());
        let mut back = vec![0u8; 3 << 16];
        img.read_exact_at(&mut back, 1 << 20).unwrap();
        assert!(back == data);
    }

    #[test]
    fn unallocated_without_backing_is_not_zero() {
        let (_host, img) = new_image(4 << 20);
        img.write_all_at(&[5u8; 65536], 1 << 20).unwrap();
        let ext = img.block_status(0, 4 << 20).unwrap();
        let kinds: Vec<_> = ext.iter().map(|e| (e.kind, e.depth)).collect();
        assert_eq!(
            kinds,
            [
                (ExtentKind::Unallocated, 0),
                (ExtentKind::Data, 0),
                (ExtentKind::Unallocated, 0)
            ]
        );
    }

    #[test]
    fn runs_leave_no_holes_at_refcount_block_boundaries() {
        // 512-byte clusters, 16-bit refcounts: one refcount block per 256 clusters, so a
        // 4 MiB write crosses 32 block ranges. Every cluster below the end is in use.
        let host = Arc::new(MemDisk::new(0));
        create(
            &*host,
            &CreateOptions {
                size: 8 << 20,
                cluster_size: 512,
                ..Default::default()
            },
        )
        .unwrap();
        let img = Qcow2Image::open(host.clone(), None, false).unwrap();
        img.write_all_at(&vec![9u8; 4 << 20], 0).unwrap();
        img.flush().unwrap();
        let mut st = img.lock();
        let end = host.len() / 512;
        let free: Vec<u64> = (1..end)
            .filter(|&c| st.refcount(&*host, c * 512).unwrap() == 0)
            .collect();
        assert!(
            free.is_empty(),
            "{} free clusters below the end: {:?}",
            free.len(),
            &free[..free.len().min(8)]
        );
    }

    #[test]
    fn allocation_stays_compact_small_clusters() {
        let host = Arc::new(MemDisk::new(0));
        create(
            &*host,
            &CreateOptions {
                size: 24 << 20,
                cluster_size: 512,
                ..Default::default()
            },
        )
        .unwrap();
        let img = Qcow2Image::open(host.clone(), None, false).unwrap();
        let data = vec![7u8; 4 << 20];
        img.write_all_at(&data, 1 << 20).unwrap();
        img.flush().unwrap();
        let len = host.len();
        assert!(len < (4 << 20) + (1 << 20), "host grew to {len}");
        let mut back = vec![0u8; 4 << 20];
        img.read_exact_at(&mut back, 1 << 20).unwrap();
        assert!(back == data);
    }
}
