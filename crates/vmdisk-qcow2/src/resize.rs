//! Changing the virtual size of an open, writable [`Qcow2Image`], with `qemu-img resize`'s
//! meaning (qemu's `qcow2_co_truncate` and the block layer around it).
//!
//! ```text
//!   grow:   L1 grown to exactly what the new size needs (new table, then the header,
//!           then the old table freed) → the new area: left unallocated; or, when the
//!           backing file reaches past the old end, zero clusters (v3) so the backing's
//!           bytes do not appear; or preallocated (metadata | falloc | full)
//!           → header size (after every table is durable)
//!   shrink: clusters past the new end made unallocated (their references dropped; a
//!           snapshot keeps what it shares) → L2 tables past the new L1 end freed
//!           → header size → the file cut after its last used cluster
//! ```
//!
//! Everything qemu refuses is refused before anything is written: a size that is not a
//! multiple of 512, v2 images with internal snapshots, preallocation while shrinking,
//! a v2 overlay whose backing file would show through the new area. vmdisk also refuses
//! images with persistent dirty bitmaps (qemu resizes the bitmaps with the disk; vmdisk
//! does not rewrite bitmap tables yet) — the message says so.
//!
//! The bytes between a shrunken size and the end of its last cluster are kept, as qemu
//! keeps them: growing the image again shows them again, in qemu and in vmdisk alike.

use vmdisk_block::{Cancel, Result as BResult};

use crate::error::{Qcow2Error, Result};
use crate::image::{Clear, State};
use crate::meta::{self, encode_table, OFLAG_COPIED};
use crate::{BlockDevice, Qcow2Image};

/// How the area a grow adds is allocated (`--preallocation`, as in qemu-img resize).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ResizePrealloc {
    /// Nothing is allocated: the new area reads as zeros (qemu's default).
    #[default]
    Off,
    /// L2 tables and data clusters are allocated; the file stays sparse.
    Metadata,
    /// As metadata, and the data clusters' space is reserved in the host file.
    Falloc,
    /// As metadata, and the data clusters are written with zeros.
    Full,
}

/// Bytes of zeros written per call for `Full` preallocation.
const ZERO_CHUNK: u64 = 1 << 20;

/// The size every resize must be a multiple of (qemu's sector).
pub const RESIZE_ALIGN: u64 = 512;

impl State {
    /// Grow the active L1 table to exactly `entries` entries (no-op when it is that big):
    /// the new table is written and its refcounts made durable before the header points
    /// at it; the old table's clusters are freed afterwards.
    pub(crate) fn grow_l1(&mut self, host: &dyn BlockDevice, entries: u64) -> Result<()> {
        if entries <= u64::from(self.h.l1_size) {
            return Ok(());
        }
        let bytes = entries * 8;
        if bytes > meta::MAX_L1_BYTES {
            return Err(Qcow2Error::Limit {
                what: "L1 table bytes",
                needed: bytes,
                limit: meta::MAX_L1_BYTES,
            });
        }
        self.write_back(host)?;
        let cs = self.cs();
        let n = bytes.div_ceil(cs);
        let at = self.alloc_clusters(host, n)?;
        self.ensure_host_len(host, at + n * cs)?;
        let mut l1 = self.l1.clone();
        l1.resize(entries as usize, 0);
        let mut table = encode_table(&l1);
        table.resize((n * cs) as usize, 0);
        host.write_all_at(&table, at)?;
        // The new clusters' refcounts, then the table, then the header that names it.
        self.write_back(host)?;
        host.flush()?;
        let old_off = self.h.l1_table_offset;
        let old_clusters = (u64::from(self.h.l1_size) * 8).div_ceil(cs);
        self.h.l1_table_offset = at;
        self.h.l1_size = entries as u32;
        self.write_header(host)?;
        host.flush()?;
        self.l1 = l1;
        for c in 0..old_clusters {
            self.push_pending_dec(old_off + c * cs);
        }
        self.write_back(host)
    }

    /// Cut the host file after its last cluster with a non-zero refcount (qemu's
    /// `qcow2_get_last_cluster` + truncate), after a shrink freed the clusters at its end.
    fn trim_to_last_cluster(&mut self, host: &dyn BlockDevice) -> Result<()> {
        let cs = self.cs();
        let mut last = self.host_end.max(host.len().div_ceil(cs) * cs) / cs;
        while last > 1 && self.refcount(host, (last - 1) * cs)? == 0 {
            last -= 1;
        }
        let end = last * cs;
        if end < host.len() {
            host.resize(end)?;
        }
        self.host_end = end;
        self.file_end = end;
        self.free_hint = self.free_hint.min(last);
        self.compressed_tail = 0;
        Ok(())
    }
}

impl Qcow2Image {
    /// Change the virtual size to `new_size` (see the module docs for what qemu-img does
    /// and what is refused). `cancel` is polled between steps of a long preallocation.
    pub fn resize(&self, new_size: u64, prealloc: ResizePrealloc, cancel: &Cancel) -> BResult<()> {
        self.check_writable()?;
        let _g = self.gate.write().unwrap_or_else(|e| e.into_inner());
        let mut st = self.lock();
        // The engine grows the host ahead of need; start from the exact length.
        st.trim_host(&*self.host)?;
        let old = st.h.size;
        let zero_new_area = self.plan_resize(&st, new_size, prealloc)?;
        if new_size < old {
            self.shrink(&mut st, new_size)?;
        } else {
            self.grow(&mut st, new_size, prealloc, zero_new_area, cancel)?;
        }
        st.trim_host(&*self.host)?;
        self.host.flush()
    }

    /// Every refusal, before anything is written; returns whether the area a grow adds
    /// must be made to read as zeros over a backing file.
    fn plan_resize(&self, st: &State, new_size: u64, prealloc: ResizePrealloc) -> Result<bool> {
        let old = st.h.size;
        if !new_size.is_multiple_of(RESIZE_ALIGN) {
            return Err(Qcow2Error::refused(format!(
                "resizing a qcow2 image to {new_size} bytes: the new size must be a multiple \
                 of {RESIZE_ALIGN}"
            )));
        }
        if new_size > meta::MAX_VIRTUAL_SIZE {
            return Err(Qcow2Error::Limit {
                what: "virtual size",
                needed: new_size,
                limit: meta::MAX_VIRTUAL_SIZE,
            });
        }
        if !st.snaps.is_empty() && st.h.version < 3 {
            // qemu: "Can't resize a v2 image which has snapshots" (v2 snapshots need not
            // record their disk size).
            return Err(Qcow2Error::refused(
                "resizing a v2 (compat=0.10) image that has internal snapshots, which qemu-img \
                 refuses too; upgrade it with `vmdisk amend -o compat=1.1` or delete the \
                 snapshots first",
            ));
        }
        if !st.bitmaps.is_empty() {
            let names: Vec<&str> = st
                .bitmaps
                .entries()
                .iter()
                .map(|b| b.name.as_str())
                .collect();
            return Err(Qcow2Error::refused(format!(
                "resizing an image with persistent dirty bitmaps ({}): qemu-img resizes the \
                 bitmaps with the disk, vmdisk cannot yet; use `qemu-img resize`, or remove \
                 them with `qemu-img bitmap --remove IMAGE NAME`",
                names.join(", ")
            )));
        }
        if new_size < old && prealloc != ResizePrealloc::Off {
            return Err(Qcow2Error::refused(
                "preallocating while shrinking (preallocation can only be used for growing \
                 images)",
            ));
        }
        let l1 = meta::l1_entries_for(new_size, st.h.cluster_bits, st.h.extended_l2());
        if l1 * 8 > meta::MAX_L1_BYTES {
            return Err(Qcow2Error::Limit {
                what: "L1 table bytes",
                needed: l1 * 8,
                limit: meta::MAX_L1_BYTES,
            });
        }
        // The block layer zero-fills a grown area the backing file would otherwise show.
        let backing_shows = new_size > old
            && prealloc == ResizePrealloc::Off
            && self.backing().is_some_and(|b| b.len() > old);
        if backing_shows && st.h.version < 3 {
            // qemu fails here too ("Failed to zero out new clusters"): v2 has no zero flag.
            return Err(Qcow2Error::refused(
                "growing a v2 (compat=0.10) overlay whose backing file is larger than it: the \
                 new area would show the backing file, and v2 cannot mark clusters as zero \
                 (qemu-img fails the same way); upgrade it with `vmdisk amend -o compat=1.1` \
                 first",
            ));
        }
        Ok(backing_shows)
    }

    fn grow(
        &self,
        st: &mut State,
        new_size: u64,
        prealloc: ResizePrealloc,
        zero_new_area: bool,
        cancel: &Cancel,
    ) -> Result<()> {
        let host = &*self.host;
        let old = st.h.size;
        let cs = st.cs();
        st.write_back(host)?;
        let l1 = meta::l1_entries_for(new_size, st.h.cluster_bits, st.h.extended_l2());
        st.grow_l1(host, l1)?;
        let head_end = old.next_multiple_of(cs).min(new_size);
        if prealloc != ResizePrealloc::Off {
            // The cluster holding the old end: allocated (copy-on-write of what it held)
            // with zeros after the old end.
            if head_end > old {
                self.write_locked(st, &vec![0u8; (head_end - old) as usize], old)?;
            }
            self.preallocate(st, head_end, new_size, prealloc, cancel)?;
        } else if zero_new_area {
            if head_end > old {
                self.write_locked(st, &vec![0u8; (head_end - old) as usize], old)?;
            }
            let first = head_end / cs;
            let last = new_size.div_ceil(cs);
            if last > first {
                self.zero_clusters(st, first, last, Clear::Zero)?;
            }
        }
        st.write_back(host)?;
        host.flush()?;
        st.h.size = new_size;
        st.write_header(host)?;
        Ok(host.flush()?)
    }

    /// Allocate data clusters for the whole clusters of `[from, to)` (`from` cluster
    /// aligned), host-contiguous in runs, reserving or zeroing their space as asked.
    fn preallocate(
        &self,
        st: &mut State,
        from: u64,
        to: u64,
        prealloc: ResizePrealloc,
        cancel: &Cancel,
    ) -> Result<()> {
        let host = &*self.host;
        let cs = st.cs();
        let mut g = from / cs;
        let end = to.div_ceil(cs);
        while g < end {
            cancel.check()?;
            // max_run keeps a run inside one refcount block's range (no holes).
            let k = (end - g).min(st.max_run());
            let new = st.alloc_clusters(host, k)?;
            st.ensure_host_len(host, new + k * cs)?;
            match prealloc {
                ResizePrealloc::Falloc => host.write_zeroes(new, k * cs, false)?,
                ResizePrealloc::Full => {
                    let zeros = vec![0u8; ZERO_CHUNK.min(k * cs) as usize];
                    let mut pos = new;
                    while pos < new + k * cs {
                        let n = ZERO_CHUNK.min(new + k * cs - pos);
                        host.write_all_at(&zeros[..n as usize], pos)?;
                        pos += n;
                    }
                }
                ResizePrealloc::Metadata | ResizePrealloc::Off => {}
            }
            for i in 0..k {
                let old = st.entry(host, g + i)?.0;
                st.set_entry(host, g + i, (new + i * cs) | OFLAG_COPIED)?;
                st.release(old);
            }
            self.maybe_write_back(st)?;
            g += k;
        }
        Ok(())
    }

    fn shrink(&self, st: &mut State, new_size: u64) -> Result<()> {
        let host = &*self.host;
        let old = st.h.size;
        let cs = st.cs();
        st.write_back(host)?;
        // qemu discards from the first whole cluster past the new end: the tail of a
        // partial last cluster stays.
        let first = new_size.div_ceil(cs);
        let last = old.div_ceil(cs);
        if last > first {
            self.zero_clusters(st, first, last, Clear::Unallocate)?;
        }
        st.write_back(host)?;
        // L2 tables no guest offset below the new size can reach.
        let keep = meta::l1_entries_for(new_size, st.h.cluster_bits, st.h.extended_l2());
        for i in keep..st.l1.len() as u64 {
            let off = st.l2_off(i)?;
            if off == 0 {
                continue;
            }
            // Every entry of it is unallocated now (or it is shared with a snapshot,
            // which keeps its own reference).
            debug_assert!(st.l1[i as usize] != 0);
            st.l1[i as usize] = 0;
            st.l1_dirty = true;
            st.l2.remove(off);
            st.push_pending_dec(off);
        }
        st.write_back(host)?;
        host.flush()?;
        st.h.size = new_size;
        st.write_header(host)?;
        host.flush()?;
        st.trim_to_last_cluster(host)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmdisk_block::{BlockDevice, MemDisk};

    use super::*;
    use crate::meta::L2Entry;
    use crate::{create, CreateOptions};

    fn image(size: u64, version: u32) -> (Arc<MemDisk>, Qcow2Image) {
        let host = Arc::new(MemDisk::new(0));
        create(
            &*host,
            &CreateOptions {
                size,
                version,
                ..Default::default()
            },
        )
        .unwrap();
        let img = Qcow2Image::open(host.clone(), None, false).unwrap();
        (host, img)
    }

    #[test]
    fn grow_keeps_data_and_reads_zeros_after() {
        let (host, img) = image(1 << 20, 3);
        img.write_all_at(&[7u8; 4096], (1 << 20) - 4096).unwrap();
        img.resize(3 << 30, ResizePrealloc::Off, &Cancel::never())
            .unwrap();
        assert_eq!(img.len(), 3 << 30);
        let mut b = vec![1u8; 8192];
        img.read_exact_at(&mut b, (1 << 20) - 4096).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 7) && b[4096..].iter().all(|&x| x == 0));
        img.write_all_at(&[9u8; 512], (3 << 30) - 512).unwrap();
        img.flush().unwrap();
        drop(img);
        let img = Qcow2Image::open(host, None, true).unwrap();
        assert_eq!(img.len(), 3 << 30);
        let mut b = vec![0u8; 512];
        img.read_exact_at(&mut b, (3 << 30) - 512).unwrap();
        assert!(b.iter().all(|&x| x == 9));
    }

    #[test]
    fn shrink_frees_clusters_and_cuts_the_file() {
        let (host, img) = image(2 << 30, 3);
        img.write_all_at(&vec![5u8; 1 << 20], 0).unwrap();
        img.write_all_at(&vec![6u8; 1 << 20], (1 << 30) + (1 << 20))
            .unwrap();
        img.flush().unwrap();
        let big = host.len();
        img.resize(1 << 30, ResizePrealloc::Off, &Cancel::never())
            .unwrap();
        assert!(host.len() + (1 << 20) <= big, "{} vs {big}", host.len());
        let e = img.lock().entry(&**img.host(), 0).unwrap().0;
        assert!(e != L2Entry::Unallocated);
        let mut b = vec![0u8; 1 << 20];
        img.read_exact_at(&mut b, 0).unwrap();
        assert!(b.iter().all(|&x| x == 5));
        // The freed space is there again when it grows back, as zeros.
        img.resize(2 << 30, ResizePrealloc::Off, &Cancel::never())
            .unwrap();
        img.read_exact_at(&mut b, (1 << 30) + (1 << 20)).unwrap();
        assert!(b.iter().all(|&x| x == 0));
    }

    #[test]
    fn refusals_touch_nothing() {
        let (host, img) = image(1 << 20, 3);
        img.flush().unwrap();
        let before = host.len();
        let c = Cancel::never();
        assert!(img
            .resize((1 << 20) + 100, ResizePrealloc::Off, &c)
            .is_err());
        assert!(img.resize(1 << 19, ResizePrealloc::Metadata, &c).is_err());
        assert!(img
            .resize(meta::MAX_VIRTUAL_SIZE + 512, ResizePrealloc::Off, &c)
            .is_err());
        assert_eq!(img.len(), 1 << 20);
        assert_eq!(host.len(), before);
        let (_h, v2) = image(1 << 20, 2);
        crate::snapshot::create(&v2, "s").unwrap();
        assert!(v2.resize(2 << 20, ResizePrealloc::Off, &c).is_err());
    }

    #[test]
    fn preallocation_allocates_every_new_cluster() {
        for p in [
            ResizePrealloc::Metadata,
            ResizePrealloc::Falloc,
            ResizePrealloc::Full,
        ] {
            let (_host, img) = image(1_000_448, 3);
            img.resize(3 << 20, p, &Cancel::never()).unwrap();
            let ext = img.block_status(983_040, (3 << 20) - 983_040).unwrap();
            assert!(
                ext.iter().all(|e| e.kind == vmdisk_block::ExtentKind::Data),
                "{p:?}: {ext:?}"
            );
            let mut b = vec![1u8; 3 << 20];
            img.read_exact_at(&mut b, 0).unwrap();
            assert!(b.iter().all(|&x| x == 0), "{p:?}");
        }
    }
}
