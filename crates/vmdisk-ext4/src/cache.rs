//! A write-back block cache over a device: the editor's staging area.
//!
//! Every change an edit makes lands here first, block by block; reads see the staged blocks
//! over the device. Nothing reaches the device until [`crate::write::Editor::commit`] writes
//! the staged blocks out in its crash-safe order, so an edit that fails half-way leaves the
//! device untouched.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use vmdisk_block::{BlockDevice, Extent};

/// Most blocks one edit may stage (4 GiB of 4 KiB blocks, 1 GiB of 1 KiB blocks): bounds the
/// memory an edit holds.
pub const MAX_STAGED_BLOCKS: usize = 1 << 20;

pub struct Cache {
    base: Arc<dyn BlockDevice>,
    bs: u64,
    dirty: Mutex<BTreeMap<u64, Vec<u8>>>,
}

impl Cache {
    pub fn new(base: Arc<dyn BlockDevice>, bs: u64) -> Cache {
        Cache {
            base,
            bs,
            dirty: Mutex::new(BTreeMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<u64, Vec<u8>>> {
        // A poisoned lock only means another thread panicked while holding it; the map is
        // still a valid map (every mutation is a single insert).
        self.dirty.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The staged blocks, in block order.
    pub fn staged(&self) -> BTreeMap<u64, Vec<u8>> {
        self.lock().clone()
    }

    pub fn staged_count(&self) -> usize {
        self.lock().len()
    }

    fn read_block_into(&self, blk: u64, out: &mut [u8]) -> vmdisk_block::Result<()> {
        if let Some(b) = self.lock().get(&blk) {
            out.copy_from_slice(b);
            return Ok(());
        }
        self.base.read_exact_at(out, blk * self.bs)
    }
}

impl BlockDevice for Cache {
    fn len(&self) -> u64 {
        self.base.len()
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> vmdisk_block::Result<()> {
        let bs = self.bs;
        {
            let d = self.lock();
            let first = off / bs;
            let last = (off + buf.len() as u64).div_ceil(bs);
            if d.range(first..last.max(first + 1)).next().is_none() {
                drop(d);
                return self.base.read_exact_at(buf, off);
            }
        }
        let mut done = 0usize;
        let mut blk = vec![0u8; bs as usize];
        while done < buf.len() {
            let pos = off + done as u64;
            let b = pos / bs;
            let inb = (pos % bs) as usize;
            let n = (bs as usize - inb).min(buf.len() - done);
            self.read_block_into(b, &mut blk)?;
            buf[done..done + n].copy_from_slice(&blk[inb..inb + n]);
            done += n;
        }
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> vmdisk_block::Result<()> {
        vmdisk_block::check_range(self.len(), off, buf.len() as u64)?;
        let bs = self.bs;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = off + done as u64;
            let b = pos / bs;
            let inb = (pos % bs) as usize;
            let n = (bs as usize - inb).min(buf.len() - done);
            let mut blk = vec![0u8; bs as usize];
            if n != bs as usize {
                self.read_block_into(b, &mut blk)?;
            }
            blk[inb..inb + n].copy_from_slice(&buf[done..done + n]);
            let mut d = self.lock();
            if d.len() >= MAX_STAGED_BLOCKS && !d.contains_key(&b) {
                return Err(vmdisk_block::Error::unsupported(
                    "an ext4 edit staging more than MAX_STAGED_BLOCKS blocks; split the edit",
                ));
            }
            d.insert(b, blk);
            done += n;
        }
        Ok(())
    }

    fn flush(&self) -> vmdisk_block::Result<()> {
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> vmdisk_block::Result<Vec<Extent>> {
        self.base.block_status(off, len)
    }

    fn is_read_only(&self) -> bool {
        self.base.is_read_only()
    }
}
