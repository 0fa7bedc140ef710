use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::{check_range, merge_extents, BlockDevice, Error, Extent, ExtentKind, Result};

/// A raw disk image (or any regular file / block device) accessed with pread/pwrite.
///
/// `block_status` uses `SEEK_DATA`/`SEEK_HOLE`: holes are [`ExtentKind::Zero`].
/// `write_zeroes` and `discard` punch holes or zero ranges with `fallocate` where the host
/// filesystem can, and fall back to writing zeros.
#[derive(Debug)]
pub struct RawFile {
    file: File,
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
            file,
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
        #[cfg(target_os = "linux")]
        {
            use std::os::fd::AsRawFd;
            // SAFETY: a plain syscall on an fd we own; failure only loses the hint.
            unsafe {
                libc::sync_file_range(self.file.as_raw_fd(), 0, 0, libc::SYNC_FILE_RANGE_WRITE);
            }
        }
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

    fn fallocate(&self, mode: libc::c_int, off: u64, len: u64) -> io::Result<()> {
        loop {
            // SAFETY: fallocate on a valid fd owned by self.file; no memory is touched.
            let r = unsafe {
                libc::fallocate(
                    self.file.as_raw_fd(),
                    mode,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            if r == 0 {
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
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
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        if self.fallocate(mode, off, len).is_ok() {
            return Ok(());
        }
        // Fall back to writing zeros.
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
