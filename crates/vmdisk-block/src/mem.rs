use std::sync::RwLock;

use crate::{check_range, is_zero, merge_extents, BlockDevice, Error, Extent, ExtentKind, Result};

/// A disk held in memory: for tests, fuzzers and parsers that must not touch files.
///
/// `block_status` reports 4 KiB blocks that are all zero as [`ExtentKind::Zero`] so sparse
/// logic can be exercised without a filesystem.
#[derive(Debug, Default)]
pub struct MemDisk {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

/// Granularity of `MemDisk::block_status`.
const MEM_STATUS_BLOCK: u64 = 4096;

impl MemDisk {
    /// A zero-filled disk of `len` bytes.
    pub fn new(len: u64) -> Self {
        MemDisk::from_vec(vec![0; len as usize])
    }

    pub fn from_vec(data: Vec<u8>) -> Self {
        MemDisk {
            data: RwLock::new(data),
            read_only: false,
        }
    }

    /// Same contents, refusing writes.
    pub fn read_only(self) -> Self {
        MemDisk {
            read_only: true,
            ..self
        }
    }

    /// A copy of the current contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BlockDevice for MemDisk {
    fn len(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, off, buf.len() as u64)?;
        buf.copy_from_slice(&data[off as usize..off as usize + buf.len()]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, off, buf.len() as u64)?;
        data[off as usize..off as usize + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn flush(&self) -> Result<()> {
        Ok(())
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        let data = self.data.read().unwrap_or_else(|e| e.into_inner());
        check_range(data.len() as u64, off, len)?;
        let mut out = Vec::new();
        let mut pos = off;
        while pos < off + len {
            let next = ((pos / MEM_STATUS_BLOCK) + 1) * MEM_STATUS_BLOCK;
            let end = next.min(off + len);
            let kind = if is_zero(&data[pos as usize..end as usize]) {
                ExtentKind::Zero
            } else {
                ExtentKind::Data
            };
            out.push(Extent::new(pos, end - pos, kind));
            pos = end;
        }
        Ok(merge_extents(out))
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.write_zeroes(off, len, true)
    }

    fn resize(&self, new_len: u64) -> Result<()> {
        if self.read_only {
            return Err(Error::ReadOnly);
        }
        let mut data = self.data.write().unwrap_or_else(|e| e.into_inner());
        data.resize(new_len as usize, 0);
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        crate::conformance::run_all(MemDisk::new);
    }

    #[test]
    fn read_only_refuses_writes() {
        let d = MemDisk::new(4096).read_only();
        assert!(matches!(d.write_all_at(&[1], 0), Err(Error::ReadOnly)));
    }
}
