use std::fs::{File, OpenOptions};
use std::io;
use std::mem::ManuallyDrop;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{check_range, merge_extents, sys, BlockDevice, Error, Extent, ExtentKind, Result};

/// Bytes of zeros written per call where no hole can be punched (bounds the buffer).
const ZERO_CHUNK: u64 = 1 << 20;

/// A raw disk image (or any regular file / block device) accessed with pread/pwrite.
///
/// `block_status` uses `SEEK_DATA`/`SEEK_HOLE`: holes are [`ExtentKind::Zero`].
/// `write_zeroes` and `discard` punch holes or zero ranges where the host can (`crate::sys`:
/// fallocate on Linux, F_PUNCHHOLE on macOS), and write zeros elsewhere.
///
/// Dropping it closes the file, except while this process holds POSIX image locks on it
/// (macOS without OFD locks, or the portable paths): the descriptor is then parked until the
/// last lock goes, since closing any descriptor of a file drops all such locks (`lock`).
#[derive(Debug)]
pub struct RawFile {
    /// Taken out only in Drop.
    file: ManuallyDrop<File>,
    path: PathBuf,
    len: AtomicU64,
    read_only: bool,
}

impl RawFile {
    /// Open an existing file.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| Error::File {
                op: "open",
                path: path.to_owned(),
                source,
            })?;
        Self::from_file(file, path, read_only)
    }

    /// Create (or truncate) a file of `len` bytes, sparse.
    pub fn create(path: impl AsRef<Path>, len: u64) -> Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(|source| Error::File {
                op: "create",
                path: path.to_owned(),
                source,
            })?;
        file.set_len(len).map_err(|source| Error::File {
            op: "size",
            path: path.to_owned(),
            source,
        })?;
        Self::from_file(file, path, false)
    }

    /// Wrap an already open file; `path` is kept for error messages.
    pub fn from_file(file: File, path: impl Into<PathBuf>, read_only: bool) -> Result<Self> {
        let path = path.into();
        let len = device_len(&file).map_err(|source| Error::File {
            op: "get the size of",
            path: path.clone(),
            source,
        })?;
        Ok(RawFile {
            file: ManuallyDrop::new(file),
            path,
            len: AtomicU64::new(len),
            read_only,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn file(&self) -> &File {
        &self.file
    }

    /// Ask the kernel to start writing this file's dirty pages back, without waiting: a hint
    /// for long writers, so the `flush` that makes the data durable has less left to do.
    pub fn start_writeback(&self) {
        sys::start_writeback(&self.file);
    }

    /// Grow the file to `new_len` bytes with the new bytes allocated on disk where the host
    /// can reserve space (`-o preallocation=falloc`): fallocate on Linux, F_PREALLOCATE on
    /// macOS; elsewhere the zeros are written. A `new_len` not above the length only resizes.
    pub fn allocate(&self, new_len: u64) -> Result<()> {
        self.writable()?;
        let old = self.len();
        if new_len <= old {
            return self.resize(new_len);
        }
        let done = sys::grow_allocated(&self.file, old, new_len);
        // Whatever happened to the length, it is `new_len` from here on.
        self.resize(new_len)?;
        if done.is_err() {
            self.write_zero_bytes(old, new_len - old)?;
        }
        Ok(())
    }

    fn writable(&self) -> Result<()> {
        if self.read_only {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    fn seek(&self, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
        // SAFETY: lseek on a valid fd owned by self.file; no memory is touched.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off as libc::off_t, whence) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }

    fn write_zero_bytes(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let zeros = vec![0u8; ZERO_CHUNK.min(len) as usize];
        let mut pos = off;
        while pos < off + len {
            let n = ZERO_CHUNK.min(off + len - pos);
            self.write_all_at(&zeros[..n as usize], pos)?;
            pos += n;
        }
        Ok(())
    }
}

impl Drop for RawFile {
    fn drop(&mut self) {
        // SAFETY: `file` is never used again: this is the last use of self.
        let file = unsafe { ManuallyDrop::take(&mut self.file) };
        crate::lock::park(file);
    }
}

fn device_len(file: &File) -> io::Result<u64> {
    let meta = file.metadata()?;
    if meta.file_type().is_file() {
        return Ok(meta.len());
    }
    // Block devices report 0 in metadata; seek to the end instead.
    // SAFETY: lseek on a valid fd; no memory is touched.
    let r = unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

impl BlockDevice for RawFile {
    fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> Result<()> {
        check_range(self.len(), off, buf.len() as u64)?;
        self.file.read_exact_at(buf, off).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                Error::OutOfRange {
                    off,
                    len: buf.len() as u64,
                    size: self.len(),
                }
            } else {
                Error::io("read", off, e)
            }
        })
    }

    fn write_all_at(&self, buf: &[u8], off: u64) -> Result<()> {
        self.writable()?;
        check_range(self.len(), off, buf.len() as u64)?;
        self.file
            .write_all_at(buf, off)
            .map_err(|e| Error::io("write", off, e))
    }

    fn flush(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data().map_err(|e| Error::io("flush", 0, e))
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(self.len(), off, len)?;
        let end = off + len;
        let mut out = Vec::new();
        let mut pos = off;
        while pos < end {
            let data = match self.seek(pos, libc::SEEK_DATA) {
                Ok(d) => d,
                // The filesystem cannot tell: report everything as data.
                Err(_) => Some(pos),
            };
            match data {
                None => {
                    out.push(Extent::new(pos, end - pos, ExtentKind::Zero));
                    break;
                }
                Some(d) if d > pos => {
                    let z = d.min(end);
                    out.push(Extent::new(pos, z - pos, ExtentKind::Zero));
                    pos = z;
                }
                Some(_) => {
                    let hole = self
                        .seek(pos, libc::SEEK_HOLE)
                        .ok()
                        .flatten()
                        .unwrap_or(end)
                        .clamp(pos + 1, end);
                    let mut e = Extent::new(pos, hole - pos, ExtentKind::Data);
                    e.host_off = Some(pos);
                    out.push(e);
                    pos = hole;
                }
            }
        }
        Ok(merge_extents(out))
    }

    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> Result<()> {
        self.writable()?;
        check_range(self.len(), off, len)?;
        if len == 0 {
            return Ok(());
        }
        let end = off + len;
        let done = if may_unmap {
            sys::punch_hole(&self.file, off, len)
        } else {
            sys::zero_range(&self.file, off, len).map(|()| off..end)
        };
        match done {
            // What the host did not zero (the unaligned ends of a hole), zeros are written to.
            Ok(r) => {
                self.write_zero_bytes(off, r.start.clamp(off, end) - off)?;
                let tail = r.end.clamp(off, end);
                self.write_zero_bytes(tail, end - tail)
            }
            Err(_) => self.write_zero_bytes(off, len),
        }
    }

    fn discard(&self, off: u64, len: u64) -> Result<()> {
        self.writable()?;
        check_range(self.len(), off, len)?;
        if len == 0 {
            return Ok(());
        }
        // Discarded ranges of a raw file read as zeros: punch a hole or write zeros.
        self.write_zeroes(off, len, true)
    }

    fn resize(&self, new_len: u64) -> Result<()> {
        self.writable()?;
        self.file
            .set_len(new_len)
            .map_err(|e| Error::io("resize", new_len, e))?;
        self.len.store(new_len, Ordering::Release);
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
        let dir = tempfile::tempdir().unwrap();
        let n = std::sync::atomic::AtomicUsize::new(0);
        crate::conformance::run_all(|len| {
            let i = n.fetch_add(1, Ordering::Relaxed);
            RawFile::create(dir.path().join(format!("d{i}")), len).unwrap()
        });
    }

    #[test]
    fn holes_are_zero_extents() {
        let dir = tempfile::tempdir().unwrap();
        let d = RawFile::create(dir.path().join("sparse"), 4 << 20).unwrap();
        d.write_all_at(&[7u8; 4096], 1 << 20).unwrap();
        let ext = d.block_status(0, 4 << 20).unwrap();
        assert_eq!(ext.first().unwrap().kind, ExtentKind::Zero);
        assert!(ext
            .iter()
            .any(|e| e.kind == ExtentKind::Data && e.off <= 1 << 20 && e.end() > 1 << 20));
    }

    #[test]
    fn read_only_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("ro");
        RawFile::create(&p, 4096).unwrap();
        let d = RawFile::open(&p, true).unwrap();
        assert!(matches!(d.write_all_at(&[1], 0), Err(Error::ReadOnly)));
        assert!(matches!(d.resize(0), Err(Error::ReadOnly)));
    }
}
