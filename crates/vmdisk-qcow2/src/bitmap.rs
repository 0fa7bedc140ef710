//! Persistent dirty bitmaps, kept valid while vmdisk writes an image.
//!
//! qemu's rules (docs/interop/qcow2.txt, "Bitmaps"): an `auto` bitmap "must reflect all
//! changes of the virtual disk by any application that would write to this qcow2 file
//! (including writes, snapshot switching, etc.)", and `in_use` must be set while the copy in
//! the file is not in sync. A writer that does not understand bitmaps must clear the
//! autoclear bit instead, after which qemu drops them all and reports their clusters as
//! leaked. vmdisk follows the rules itself, so `qemu-img check` stays clean and incremental
//! backups stay correct:
//!
//! 1. Before the first guest change (write, zero, discard, compressed write, unallocate)
//!    IN_USE is set on every `auto` bitmap that was consistent at open, and
//!    flushed, before any data is written.
//! 2. Changes are recorded in memory at a granularity no coarser than needed (at most
//!    [`MAX_DIRTY_RECORD_BYTES`]); a coarser record only ever sets more bits, never fewer.
//! 3. On close the recorded ranges are ORed into each such bitmap: existing data clusters are
//!    updated in place; all-zero clusters get a new cluster whose refcount is durable before
//!    the bitmap table points at it. Then IN_USE is cleared again and flushed.
//!
//! A crash anywhere leaves IN_USE set: qemu then treats the bitmap as inconsistent (it is).
//! `auto` bitmaps vmdisk cannot update (unknown type or extra data, sizes qemu itself would
//! refuse) are marked IN_USE at the first change and left so: qemu then says they are
//! inconsistent, and `qemu-img bitmap --remove` is the way out. Disabled bitmaps (no `auto`
//! flag) record nothing and are never touched. Snapshot create and delete change no guest
//! data, so they leave every bitmap as it is, as qemu does; snapshot apply is refused while
//! the image has bitmaps, as qemu refuses it ("Device has active dirty bitmaps").

use crate::meta::BitmapEntry;

/// Memory for the in-memory record of changed guest ranges, whatever the disk size (a
/// 1 TiB disk is recorded at 32 KiB granularity, finer than qemu's 64 KiB default).
pub const MAX_DIRTY_RECORD_BYTES: u64 = 4 << 20;

/// The bitmap directory of an open image and what vmdisk does with each bitmap.
pub(crate) struct Bitmaps {
    /// Directory entries, flags as they are on disk.
    pub(crate) entries: Vec<BitmapEntry>,
    /// Entries that are `auto` and were consistent at open: they must follow every change.
    pub(crate) targets: Vec<usize>,
    /// Of those, the ones vmdisk updates itself (the others just stay IN_USE).
    pub(crate) maintained: Vec<usize>,
    /// IN_USE has been written for the targets.
    pub(crate) marked: bool,
    /// One bit per `1 << chunk_bits` guest bytes changed since open (allocated lazily).
    pub(crate) dirty: Vec<u64>,
    pub(crate) chunk_bits: u32,
    pub(crate) size: u64,
}

impl Bitmaps {
    pub fn new(entries: Vec<BitmapEntry>, size: u64, cs: u64) -> Self {
        let targets: Vec<usize> = (0..entries.len())
            .filter(|&i| entries[i].auto() && !entries[i].in_use())
            .collect();
        let maintained: Vec<usize> = targets
            .iter()
            .copied()
            .filter(|&i| entries[i].unmaintainable(size, cs).is_none())
            .collect();
        let mut chunk_bits = maintained
            .iter()
            .map(|&i| u32::from(entries[i].granularity_bits))
            .min()
            .unwrap_or(63);
        while chunk_bits < 63 && size.div_ceil(1 << chunk_bits).div_ceil(8) > MAX_DIRTY_RECORD_BYTES
        {
            chunk_bits += 1;
        }
        Bitmaps {
            entries,
            targets,
            maintained,
            marked: false,
            dirty: Vec::new(),
            chunk_bits,
            size,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn entries(&self) -> &[BitmapEntry] {
        &self.entries
    }

    /// Record a change of guest bytes `[off, off + len)`.
    pub(crate) fn record(&mut self, off: u64, len: u64) {
        if self.maintained.is_empty() || len == 0 || off >= self.size {
            return;
        }
        let c = self.chunk_bits;
        if self.dirty.is_empty() {
            let chunks = self.size.div_ceil(1 << c);
            self.dirty = vec![0u64; chunks.div_ceil(64) as usize];
        }
        let end = off.saturating_add(len).min(self.size);
        let (first, last) = (off >> c, (end - 1) >> c);
        let mut i = first;
        while i <= last {
            let (w, b) = ((i / 64) as usize, i % 64);
            if b == 0 && last - i >= 63 {
                self.dirty[w] = u64::MAX;
                i += 64;
            } else {
                self.dirty[w] |= 1 << b;
                i += 1;
            }
        }
    }

    fn chunk_dirty(&self, i: u64) -> bool {
        self.dirty
            .get((i / 64) as usize)
            .is_some_and(|w| w & (1 << (i % 64)) != 0)
    }

    /// The next run `[a, b)` of dirty chunks starting at or after `from`, below `to`.
    pub(crate) fn next_run(&self, from: u64, to: u64) -> Option<(u64, u64)> {
        let mut i = from;
        while i < to {
            let w = self.dirty.get((i / 64) as usize).copied().unwrap_or(0);
            if w >> (i % 64) == 0 {
                i = (i / 64 + 1) * 64;
                continue;
            }
            if self.chunk_dirty(i) {
                let mut j = i + 1;
                while j < to && self.chunk_dirty(j) {
                    j += 1;
                }
                return Some((i, j));
            }
            i += 1;
        }
        None
    }
}

/// Set bits `[lo, hi)` of `buf` (bit k is bit k % 8 of byte k / 8, least significant first).
pub(crate) fn set_bits(buf: &mut [u8], lo: u64, hi: u64) {
    let mut k = lo;
    while k < hi {
        let byte = (k / 8) as usize;
        if k.is_multiple_of(8) && hi - k >= 8 {
            let n = ((hi - k) / 8) as usize;
            buf[byte..byte + n].fill(0xff);
            k += n as u64 * 8;
        } else {
            buf[byte] |= 1 << (k % 8);
            k += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits_are_least_significant_first() {
        let mut b = vec![0u8; 4];
        set_bits(&mut b, 1, 3);
        assert_eq!(b, [0b110, 0, 0, 0]);
        set_bits(&mut b, 6, 26);
        assert_eq!(b, [0b1100_0110, 0xff, 0xff, 0b11]);
    }

    #[test]
    fn records_are_bounded_and_cover_every_write() {
        let e = BitmapEntry {
            table_offset: 1 << 16,
            table_size: 1,
            flags: crate::meta::BME_FLAG_AUTO,
            kind: 1,
            granularity_bits: 16,
            name: "b".into(),
            extra_data_size: 0,
            at: 0,
        };
        let size = 1u64 << 40;
        let mut bm = Bitmaps::new(
            vec![BitmapEntry {
                table_size: 1 << 20,
                ..e
            }],
            size,
            65536,
        );
        bm.record((5 << 30) + 7, 1);
        assert!(bm.dirty.len() as u64 * 8 <= MAX_DIRTY_RECORD_BYTES);
        let c = bm.chunk_bits;
        assert_eq!(
            bm.next_run(0, size >> c),
            Some((((5 << 30) + 7) >> c, (((5 << 30) + 7) >> c) + 1))
        );
    }
}
