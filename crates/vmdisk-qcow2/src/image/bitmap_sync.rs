//! The engine's side of persistent dirty bitmaps (see `crate::bitmap` for the rules): marking
//! them IN_USE before the first change, and writing the recorded changes back on close. A
//! child of `image` because it works on the engine's `State`; the tracker itself
//! (`crate::bitmap::Bitmaps`) knows nothing of the engine.

use super::State;
use crate::bitmap::set_bits;
use crate::error::{Result, Table};
use crate::meta::{
    decode_table, encode_table, BitmapCluster, BitmapEntry, BITMAP_ENTRY_OFF_FLAGS, BME_FLAG_IN_USE,
};
use crate::{read_meta, BlockDevice};

impl State {
    /// Guest bytes `[off, off + len)` are about to change: mark the auto bitmaps IN_USE (once,
    /// durably, before any data is written) and record the range.
    pub(crate) fn note_write(&mut self, host: &dyn BlockDevice, off: u64, len: u64) -> Result<()> {
        if self.bitmaps.targets.is_empty() || len == 0 {
            return Ok(());
        }
        if !self.bitmaps.marked {
            for k in 0..self.bitmaps.targets.len() {
                let i = self.bitmaps.targets[k];
                self.write_bitmap_flags(host, i, true)?;
            }
            host.flush()?;
            self.bitmaps.marked = true;
        }
        self.bitmaps.record(off, len);
        Ok(())
    }

    fn write_bitmap_flags(&mut self, host: &dyn BlockDevice, i: usize, in_use: bool) -> Result<()> {
        let e = &mut self.bitmaps.entries[i];
        if in_use {
            e.flags |= BME_FLAG_IN_USE;
        } else {
            e.flags &= !BME_FLAG_IN_USE;
        }
        host.write_all_at(&e.flags.to_be_bytes(), e.at + BITMAP_ENTRY_OFF_FLAGS)?;
        Ok(())
    }

    /// Write the recorded changes into the maintained bitmaps and clear their IN_USE flags
    /// (see the module doc for the order). Called on close, after the guest metadata is
    /// written back.
    pub(crate) fn sync_bitmaps(&mut self, host: &dyn BlockDevice) -> Result<()> {
        if !self.bitmaps.marked {
            return Ok(());
        }
        let cs = self.cs();
        let mut new_tables = Vec::new();
        for k in 0..self.bitmaps.maintained.len() {
            let i = self.bitmaps.maintained[k];
            let e = self.bitmaps.entries[i].clone();
            if let Some(t) = self.update_bitmap(host, &e, cs)? {
                new_tables.push((e.table_offset, t));
            }
        }
        if !new_tables.is_empty() {
            // New data clusters: their refcounts (and data) are durable before any table
            // points at them.
            self.write_back(host)?;
            host.flush()?;
            for (off, t) in &new_tables {
                host.write_all_at(&encode_table(t), *off)?;
            }
        }
        host.flush()?;
        for k in 0..self.bitmaps.maintained.len() {
            let i = self.bitmaps.maintained[k];
            self.write_bitmap_flags(host, i, false)?;
        }
        host.flush()?;
        self.bitmaps.marked = false;
        self.bitmaps.dirty.clear();
        Ok(())
    }

    /// OR the recorded changes into bitmap `e`; returns its new table when clusters were
    /// allocated (existing data clusters are rewritten in place, IN_USE being set).
    fn update_bitmap(
        &mut self,
        host: &dyn BlockDevice,
        e: &BitmapEntry,
        cs: u64,
    ) -> Result<Option<Vec<u64>>> {
        if self.bitmaps.dirty.is_empty() {
            return Ok(None);
        }
        let g = u32::from(e.granularity_bits);
        let c = self.bitmaps.chunk_bits;
        let size = self.bitmaps.size;
        let entries = e.data_bytes(size).div_ceil(cs);
        let mut table = decode_table(&read_meta(
            host,
            e.table_offset,
            entries * 8,
            Table::BitmapTable,
        )?);
        let mut changed_table = false;
        // Guest bytes covered by one cluster of bitmap data.
        let span = (cs * 8) << g;
        let chunks = size.div_ceil(1 << c);
        for ci in 0..entries {
            let g_lo = ci * span;
            let g_hi = (g_lo + span).min(size);
            let (c_lo, c_hi) = (g_lo >> c, g_hi.div_ceil(1 << c).min(chunks));
            let Some(mut run) = self.bitmaps.next_run(c_lo, c_hi) else {
                continue;
            };
            let at = e.table_offset + ci * 8;
            let raw = table[ci as usize];
            let (mut data, dst) = match BitmapEntry::decode_table_entry(raw, cs, at)? {
                BitmapCluster::Ones => continue,
                BitmapCluster::Zeros => (vec![0u8; cs as usize], None),
                BitmapCluster::Data { host_off } => (
                    read_meta(host, host_off, cs, Table::BitmapData)?,
                    Some(host_off),
                ),
            };
            let bit0 = ci * cs * 8;
            loop {
                // Chunks [a, b) -> guest bytes -> bits of this bitmap, clipped to the cluster.
                let (a, b) = run;
                let lo = (a << c).max(g_lo);
                let hi = (b << c).min(g_hi);
                if hi > lo {
                    let (b_lo, b_hi) = (lo >> g, ((hi - 1) >> g) + 1);
                    set_bits(&mut data, b_lo - bit0, b_hi - bit0);
                }
                match self.bitmaps.next_run(b, c_hi) {
                    Some(r) => run = r,
                    None => break,
                }
            }
            let host_off = match dst {
                Some(o) => o,
                None => {
                    let o = self.alloc_clusters(host, 1)?;
                    self.ensure_host_len(host, o + cs)?;
                    table[ci as usize] = o;
                    changed_table = true;
                    o
                }
            };
            host.write_all_at(&data, host_off)?;
        }
        Ok(changed_table.then_some(table))
    }
}
