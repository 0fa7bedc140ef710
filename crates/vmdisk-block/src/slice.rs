use crate::{check_range, BlockDevice, Error, Extent, Result};

/// A window `[off, off+len)` onto another device, e.g. one partition of a disk.
#[derive(Debug)]
pub struct Slice<D> {
    dev: D,
    off: u64,
    len: u64,
}

impl<D: BlockDevice> Slice<D> {
    /// Fails with [`Error::OutOfRange`] when the window does not fit inside `dev`.
    pub fn new(dev: D, off: u64, len: u64) -> Result<Self> {
        check_range(dev.len(), off, len)?;
        Ok(Slice { dev, off, len })
    }

    pub fn inner(&self) -> &D {
        &self.dev
    }

    pub fn offset(&self) -> u64 {
        self.off
    }
}

impl<D: BlockDevice> BlockDevice for Slice<D> {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(self.len, off, buf.len() as u64)?;
        self.dev.read_exact_at(buf, self.off + off)
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        check_range(self.len, off, buf.len() as u64)?;
        self.dev.write_all_at(buf, self.off + off)
    }

    fn flush(&self) -> Result<()> {
        self.dev.flush()
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.len, off, len)?;
        let mut ext = self.dev.block_status(self.off + off, len)?;
        for e in &mut ext {
            e.off -= self.off;
        }
        Ok(ext)
    }

    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        check_range(self.len, off, len)?;
        self.dev.write_zeroes(self.off + off, len, may_unmap)
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        check_range(self.len, off, len)?;
        self.dev.discard(self.off + off, len)
    }

    fn resize(&self, _new_len: u64) -> Result<()> {
        Err(Error::unsupported("resizing a slice"))
    }

    fn is_read_only(&self) -> bool {
        self.dev.is_read_only()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemDisk;

    #[test]
    fn conformance() {
        crate::conformance::run_all(|len| Slice::new(MemDisk::new(len + 8192), 4096, len).unwrap());
    }

    #[test]
    fn window_must_fit() {
        assert!(Slice::new(MemDisk::new(100), 50, 51).is_err());
        assert!(Slice::new(MemDisk::new(100), u64::MAX, 2).is_err());
    }

    #[test]
    fn writes_land_at_offset() {
        let s = Slice::new(MemDisk::new(100), 10, 20).unwrap();
        s.write_all_at(b"ab", 0).unwrap();
        let mut b = [0u8; 2];
        s.inner().read_exact_at(&mut b, 10).unwrap();
        assert_eq!(&b, b"ab");
    }
}
