//! `IoBuf`: a large, page-aligned, zero-initialised I/O buffer that is reused, not regrown.
//!
//! Page alignment lets the kernel copy whole pages between the page cache and the buffer. It
//! was measured: `vmdisk convert` raw -> qcow2 of 1.5 GiB took 0.68 s (1.0 s system time) with
//! plain `Vec<u8>` buffers, which the allocator hands out 16 bytes past a page boundary, and
//! 0.43 s (0.57 s) with these.
//! Huge pages were tried and measured (`vmdisk convert`, raw -> qcow2, 1.5 GiB of data,
//! alternating runs): 0.40 s with 2 MiB huge pages, 0.40 s without, so the buffer asks for
//! none. An earlier 1.13 s -> 0.63 s "gain" from them was a benchmark artefact: on this VM a
//! writer that starts seconds after a large file's page cache was freed is up to 2.5x slower
//! than one that starts right after (see `benches/src/run.rs`, `timed`).

use std::alloc::{alloc_zeroed, dealloc, handle_alloc_error, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every `IoBuf`: a page.
pub const IOBUF_ALIGN: usize = 4096;

/// A zero-initialised, page-aligned byte buffer with a fixed capacity and a variable length.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively, like Vec<u8>.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only read, like &[u8].
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// A buffer of `cap` bytes (rounded up to the alignment), length 0.
    pub fn with_capacity(cap: usize) -> IoBuf {
        let cap = cap.max(1).div_ceil(IOBUF_ALIGN) * IOBUF_ALIGN;
        let layout = Layout::from_size_align(cap, IOBUF_ALIGN).expect("IoBuf layout");
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            handle_alloc_error(layout)
        };
        IoBuf { ptr, len: 0, cap }
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Set the length (≤ capacity). The bytes are whatever the buffer last held: always
    /// initialised, since the allocation starts zeroed and only bytes are ever written.
    pub fn set_len(&mut self, len: usize) {
        assert!(
            len <= self.cap,
            "IoBuf::set_len {len} beyond capacity {}",
            self.cap
        );
        self.len = len;
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap ≥ len initialised bytes (zeroed at allocation).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.cap, IOBUF_ALIGN).expect("IoBuf layout");
        // SAFETY: allocated in with_capacity with this layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf {{ len: {}, cap: {} }}", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_resizable() {
        let mut b = IoBuf::with_capacity(3 * IOBUF_ALIGN - 1);
        assert_eq!(b.capacity(), 3 * IOBUF_ALIGN);
        assert_eq!(b.as_ptr() as usize % IOBUF_ALIGN, 0);
        b.set_len(4096);
        assert!(b.iter().all(|&x| x == 0));
        b[10] = 7;
        b.set_len(11);
        assert_eq!(b[10], 7);
        b.set_len(0);
        assert!(b.is_empty());
    }

    #[test]
    #[should_panic(expected = "beyond capacity")]
    fn length_is_bounded_by_capacity() {
        let mut b = IoBuf::with_capacity(1);
        b.set_len(IOBUF_ALIGN + 1);
    }
}
