use crate::{Error, Result};

/// What a range of a device holds, as `block_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ExtentKind {
    /// Allocated data (may still happen to contain zeros).
    Data,
    /// Reads as zeros and is known to: a hole in a raw file, a qcow2 zero cluster.
    Zero,
    /// Not allocated anywhere in the chain; reads as zeros (or from a backing device the
    /// caller did not ask about).
    Unallocated,
}

/// One contiguous run of the same status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Guest offset in bytes.
    pub off: u64,
    /// Length in bytes (never 0).
    pub len: u64,
    pub kind: ExtentKind,
    /// Depth in a backing chain where the status was found: 0 is the device itself.
    pub depth: u32,
    /// Host offset of the data in the file at `depth`, when it is stored contiguously there.
    pub host_off: Option<u64>,
    /// Data is stored compressed.
    pub compressed: bool,
}

impl Extent {
    pub fn new(off: u64, len: u64, kind: ExtentKind) -> Self {
        Extent {
            off,
            len,
            kind,
            depth: 0,
            host_off: None,
            compressed: false,
        }
    }

    pub fn end(&self) -> u64 {
        self.off + self.len
    }

    /// True when the range reads as zeros without looking at data.
    pub fn reads_as_zero(&self) -> bool {
        matches!(self.kind, ExtentKind::Zero | ExtentKind::Unallocated)
    }
}

/// A disk: positional, synchronous, shareable across threads.
///
/// Edge cases every implementation honours (the conformance suite checks them):
/// - an empty buffer is a no-op that succeeds, at any offset up to and including `len()`;
/// - any byte of a request at or past `len()` makes the whole request fail with
///   [`Error::OutOfRange`] and touch nothing: never a short read, never a silent grow;
/// - short reads/writes and `EINTR` are retried inside;
/// - `block_status(off, len)` returns extents that exactly cover `[off, off+len)` in order,
///   adjacent extents differ in status, and the range must itself be in bounds.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn len(&self) -> u64;

    /// True when the device has no bytes.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fill `buf` from `off`.
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()>;

    /// Write all of `buf` at `off`.
    fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()>;

    /// Make every completed write durable.
    fn flush(&self) -> Result<()>;

    /// Allocation status of `[off, off+len)`.
    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>>;

    /// Make `[off, off+len)` read as zeros; `may_unmap` allows freeing storage.
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        let _ = may_unmap;
        check_range(self.len(), off, len)?;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; CHUNK.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = CHUNK.min(off + len - pos);
            self.write_all_at(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }

    /// Advise that `[off, off+len)` is no longer needed. Contents afterwards are unspecified
    /// unless the implementation documents otherwise; the default does nothing.
    fn discard(&self, off: u64, len: u64) -> Result<()> {
        check_range(self.len(), off, len)
    }

    /// Change the size. Devices that cannot grow return [`Error::Unsupported`].
    fn resize(&self, new_len: u64) -> Result<()> {
        let _ = new_len;
        Err(Error::unsupported("resizing this kind of device"))
    }

    /// True when writes will fail with [`Error::ReadOnly`].
    fn is_read_only(&self) -> bool {
        false
    }
}

macro_rules! forward_block_device {
    ($($t:ty),*) => {$(
        impl<T: BlockDevice + ?Sized> BlockDevice for $t {
            fn len(&self) -> u64 { (**self).len() }
            fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> { (**self).read_exact_at(buf, off) }
            fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> { (**self).write_all_at(buf, off) }
            fn flush(&self) -> Result<()> { (**self).flush() }
            fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> { (**self).block_status(off, len) }
            fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> { (**self).write_zeroes(off, len, may_unmap) }
            fn discard(&self, off: u64, len: u64) -> Result<()> { (**self).discard(off, len) }
            fn resize(&self, new_len: u64) -> Result<()> { (**self).resize(new_len) }
            fn is_read_only(&self) -> bool { (**self).is_read_only() }
        }
    )*};
}
forward_block_device!(std::sync::Arc<T>, Box<T>, &T);

/// Fail with [`Error::OutOfRange`] unless `[off, off+len)` lies within `size`.
pub fn check_range(size: u64, off: u64, len: u64) -> Result<()> {
    match off.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::OutOfRange { off, len, size }),
    }
}

/// True when every byte of `buf` is zero (word-at-a-time).
pub fn is_zero(buf: &[u8]) -> bool {
    let (head, body, tail) = {
        // SAFETY: u64 has no invalid bit patterns and align_to only yields aligned, in-bounds
        // middle slices.
        unsafe { buf.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && body.iter().all(|&w| w == 0) && tail.iter().all(|&b| b == 0)
}

/// Merge adjacent extents with the same status (and contiguous host offsets).
pub fn merge_extents(extents: Vec<Extent>) -> Vec<Extent> {
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        if e.len == 0 {
            continue;
        }
        if let Some(last) = out.last_mut() {
            let host_contig = match (last.host_off, e.host_off) {
                (None, None) => true,
                (Some(a), Some(b)) => a + last.len == b,
                _ => false,
            };
            if last.end() == e.off
                && last.kind == e.kind
                && last.depth == e.depth
                && last.compressed == e.compressed
                && host_contig
            {
                last.len += e.len;
                continue;
            }
        }
        out.push(e);
    }
    out
}
