//! `copy_file`: copy an image *file* — its bytes, not its guest contents — the way
//! `cp --reflink=auto` does, but under qemu's locks and crash-safely.
//!
//! ```text
//!   SRC   qemu's read lock ("consistent read"; refused while a qemu writes it; none with -U)
//!    │ FICLONE (Linux) / fclonefileat (macOS, APFS), whole file ─▶ method reflink
//!    │ else, extent by extent (SEEK_DATA / SEEK_HOLE: holes stay holes)
//!    │     copy_file_range (Linux) ──────────────────────────────▶ method copy_file_range
//!    │     else (EXDEV, ENOSYS, EOPNOTSUPP, EINVAL; always on macOS) pread/pwrite
//!    │                                                         ─▶ method read_write
//!    ▼
//!   DIR/.DST.vmdisk-tmp-PID   created O_EXCL beside DST, under qemu's write lock;
//!    │                        length set to SRC's, fsync; removed on any error
//!    ▼ rename (RENAME_NOREPLACE unless replacing), fsync DIR
//!   DST
//! ```
//!
//! A qcow2 stays a qcow2 with the same backing file *name*: when that name is relative and
//! DST lives elsewhere it resolves to another file, which [`CopyStats::backing_elsewhere`]
//! reports for the caller to warn about.
//!
//! `--reflink=never` copies with pread/pwrite only: copy_file_range may share extents on its
//! own (XFS, btrfs, NFS), and "never" promises a copy that shares nothing (as cp does).
//!
//! The platform calls are in `crate::sys`; macOS clones only into a new name, so there the
//! clone replaces the temporary file, which is then reopened and locked again.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use vmdisk_block::lock::{ImageLock, LockMode};
use vmdisk_block::{BlockDevice, Cancel};

use crate::open::{open_file, resolve_backing};
use crate::output::{file_err, PendingFile};
use crate::q;
use crate::sys::{self, Cloned};
use crate::{Error, Format, Result};

/// Bytes per copy_file_range call: bounds how long one call runs between progress reports
/// and cancel checks.
const CFR_CHUNK: u64 = 8 << 20;
/// Buffer of the pread/pwrite fallback.
const RW_BUF: usize = 1 << 20;
/// qemu's write lock on the copy under its temporary name.
fn lock_pending(pending: &PendingFile) -> Result<ImageLock> {
    ImageLock::acquire(pending.file(), pending.tmp_path(), LockMode::Write)
        .map_err(Error::image("locking", pending.tmp_path()))
}

/// Whether the copy may share extents with its source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Reflink {
    /// Share extents when the filesystem can, else copy sparsely.
    #[default]
    Auto,
    /// Share extents or fail.
    Always,
    /// Copy every data byte (sparsely); the copy shares nothing with the source.
    Never,
}

/// How [`copy_file`] copies.
#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    pub reflink: Reflink,
    /// Replace an existing destination (refused while someone holds qemu's locks on it).
    pub overwrite: bool,
    /// Copy without qemu's read lock on the source (qemu-img's `-U`): a source a running qemu
    /// is writing is copied anyway, and the copy may be inconsistent.
    pub force_share: bool,
    /// When raised, the copy stops, removes its partial output and returns
    /// [`Error::Cancelled`].
    pub cancel: Cancel,
}

/// How the bytes got there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CopyMethod {
    /// FICLONE / fclonefileat: the copy shares all extents with the source.
    Reflink,
    /// copy_file_range per data extent.
    CopyFileRange,
    /// pread/pwrite per data extent.
    ReadWrite,
}

impl CopyMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            CopyMethod::Reflink => "reflink",
            CopyMethod::CopyFileRange => "copy_file_range",
            CopyMethod::ReadWrite => "read_write",
        }
    }
}

/// A relative backing file name that resolves to a different file next to the copy.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BackingElsewhere {
    /// The name stored in the image.
    pub name: String,
    /// What it means for the source.
    pub for_src: PathBuf,
    /// What it means for the copy.
    pub for_dst: PathBuf,
    /// The backing format stored with the name, if any.
    pub format: Option<String>,
}

/// What [`copy_file`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CopyStats {
    /// The file written (DST, or DST/NAME when DST is a directory).
    pub dst: PathBuf,
    pub method: CopyMethod,
    /// Length of the source (and the copy) in bytes.
    pub size: u64,
    /// Bytes in the source's data extents (what a reflink shares or a copy writes).
    pub data_bytes: u64,
    /// Bytes actually read and written (0 for a reflink).
    pub bytes_copied: u64,
    /// The probed image format (the copy has the same).
    pub format: Format,
    /// The backing file name stored in a qcow2 source (and so in the copy).
    pub backing_file: Option<String>,
    /// Set when that name is relative and means another file from the copy's directory.
    pub backing_elsewhere: Option<BackingElsewhere>,
}

/// Where a copy of `src` to `dst` goes: `dst`, or `dst/<src's file name>` when `dst` is a
/// directory (as for cp).
pub fn copy_destination(src: &Path, dst: &Path) -> PathBuf {
    match src.file_name() {
        Some(name) if dst.is_dir() => dst.join(name),
        _ => dst.to_owned(),
    }
}

/// When the relative backing name `name` (format `format`) of the image at `src` means a
/// different file for a copy at `dst`, say which two files.
pub fn backing_elsewhere(
    src: &Path,
    dst: &Path,
    name: &str,
    format: Option<&str>,
) -> Option<BackingElsewhere> {
    if Path::new(name).is_absolute() {
        return None;
    }
    let for_src = resolve_backing(src, name);
    let for_dst = resolve_backing(dst, name);
    let dir = |p: &Path| {
        let d = match p.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        std::fs::canonicalize(d).ok()
    };
    if let (Some(a), Some(b)) = (dir(src), dir(dst)) {
        if a == b {
            return None;
        }
    }
    if let (Ok(a), Ok(b)) = (std::fs::metadata(&for_src), std::fs::metadata(&for_dst)) {
        if (a.dev(), a.ino()) == (b.dev(), b.ino()) {
            return None;
        }
    }
    Some(BackingElsewhere {
        name: name.to_string(),
        for_src,
        for_dst,
        format: format.map(str::to_string),
    })
}

/// Whether someone (a running qemu) holds `path` for writing: qemu's read lock would be
/// refused. A file that cannot be opened counts as not held.
pub fn held_for_writing(path: &Path) -> bool {
    // By path: a descriptor of our own, closed here, would drop this process's POSIX locks.
    matches!(
        ImageLock::acquire_path(path, LockMode::Read),
        Err(vmdisk_block::Error::Locked { .. })
    )
}

/// Copy the image file `src` to the new file `dst` (see the module docs). `progress` gets
/// (offset reached, source length) as the copy advances.
pub fn copy_file(
    src: &Path,
    dst: &Path,
    opts: &CopyOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<CopyStats> {
    let dst = copy_destination(src, dst);
    let (host, _src_lock, format) = open_file(src, None, true, opts.force_share)?;
    let src_file = host.file();
    let meta = src_file.metadata().map_err(|source| Error::File {
        op: "stat",
        path: src.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    if !(ft.is_file() || ft.is_block_device()) {
        return Err(Error::NotRegularFile {
            path: src.to_owned(),
        });
    }
    if let Ok(d) = std::fs::metadata(&dst) {
        if (d.dev(), d.ino()) == (meta.dev(), meta.ino()) {
            return Err(Error::SameFile {
                src: src.to_owned(),
                dst,
            });
        }
    }
    let (backing_file, backing_format) = match format {
        // A header we cannot parse is no reason not to copy the file.
        Format::Qcow2 => q::read_header(&host)
            .map(|h| (h.backing_file, h.backing_format))
            .unwrap_or_default(),
        Format::Raw => (None, None),
    };
    let len = host.len();

    let mut pending = PendingFile::create(&dst, opts.overwrite, meta.mode() & 0o777)?;
    let mut dst_lock = lock_pending(&pending)?;

    let cloned = match opts.reflink {
        Reflink::Never => false,
        Reflink::Auto | Reflink::Always => {
            match sys::reflink(src_file, pending.file(), pending.tmp_path()) {
                Ok(Cloned::Into) => true,
                Ok(Cloned::Replaced) => {
                    // The temporary path names the clone now: open and lock that file.
                    drop(dst_lock);
                    pending.reopen()?;
                    dst_lock = lock_pending(&pending)?;
                    true
                }
                Err(e) if sys::reflink_unsupported(&e) && opts.reflink == Reflink::Auto => false,
                Err(e) if sys::reflink_unsupported(&e) => {
                    return Err(Error::ReflinkUnsupported {
                        src: src.to_owned(),
                        dst: dst.clone(),
                        reason: if e.raw_os_error() == Some(libc::EXDEV) {
                            "they are on different filesystems (extents are shared only within one)"
                        } else {
                            sys::REFLINK_UNSUPPORTED
                        },
                        source: e,
                    })
                }
                Err(source) => {
                    return Err(Error::File {
                        op: sys::REFLINK_OP,
                        path: pending.tmp_path().to_owned(),
                        source,
                    })
                }
            }
        }
    };
    let dst_file = pending.file();

    let (method, data_bytes, bytes_copied) = if cloned {
        let data = data_extents(src_file, len)
            .map_err(|source| file_err("find the data extents of", src, source))?;
        (CopyMethod::Reflink, data, 0)
    } else {
        dst_file
            .set_len(len)
            .map_err(|source| file_err("size", pending.tmp_path(), source))?;
        let mut copier = Copier {
            src: src_file,
            dst: dst_file,
            src_path: src,
            tmp_path: pending.tmp_path(),
            len,
            use_cfr: opts.reflink != Reflink::Never,
            fell_back: opts.reflink == Reflink::Never,
            buf: Vec::new(),
            cancel: &opts.cancel,
            final_path: &dst,
            progress,
        };
        let data = copier.copy_all()?;
        let method = if copier.fell_back {
            CopyMethod::ReadWrite
        } else {
            CopyMethod::CopyFileRange
        };
        (method, data, data)
    };
    progress(len, len);
    pending.commit()?;
    drop(dst_lock);

    let backing_elsewhere = backing_file
        .as_deref()
        .and_then(|name| backing_elsewhere(src, &dst, name, backing_format.as_deref()));
    Ok(CopyStats {
        dst,
        method,
        size: len,
        data_bytes,
        bytes_copied,
        format,
        backing_file,
        backing_elsewhere,
    })
}

/// The extent-by-extent copy of [`copy_file`]'s sparse path.
struct Copier<'a> {
    src: &'a File,
    dst: &'a File,
    src_path: &'a Path,
    tmp_path: &'a Path,
    final_path: &'a Path,
    len: u64,
    /// Still trying copy_file_range.
    use_cfr: bool,
    /// Some data went through pread/pwrite.
    fell_back: bool,
    buf: Vec<u8>,
    cancel: &'a Cancel,
    progress: &'a dyn Fn(u64, u64),
}

impl Copier<'_> {
    /// Copy every data extent; returns the bytes copied.
    fn copy_all(&mut self) -> Result<u64> {
        let mut total = 0;
        let mut off = 0;
        while off < self.len {
            let Some((start, end)) = next_data(self.src, off, self.len)
                .map_err(|source| file_err("find the data extents of", self.src_path, source))?
            else {
                break;
            };
            self.copy_range(start, end)?;
            total += end - start;
            off = end;
        }
        Ok(total)
    }

    fn check_cancel(&self) -> Result<()> {
        if self.cancel.is_cancelled() {
            return Err(Error::Cancelled {
                path: self.final_path.to_owned(),
            });
        }
        Ok(())
    }

    fn copy_range(&mut self, start: u64, end: u64) -> Result<()> {
        let mut off = start;
        while off < end {
            self.check_cancel()?;
            let n = if self.use_cfr {
                match sys::copy_range(self.src, self.dst, off, (end - off).min(CFR_CHUNK)) {
                    Ok(0) => return Err(self.shrank(off)),
                    Ok(n) => n,
                    Err(e) if sys::copy_range_unsupported(&e) => {
                        self.use_cfr = false;
                        self.fell_back = true;
                        continue;
                    }
                    Err(source) => {
                        return Err(file_err("copy_file_range into", self.tmp_path, source))
                    }
                }
            } else {
                self.read_write(off, (end - off).min(RW_BUF as u64) as usize)?
            };
            off += n;
            (self.progress)(off, self.len);
        }
        Ok(())
    }

    fn read_write(&mut self, off: u64, n: usize) -> Result<u64> {
        self.buf.resize(RW_BUF, 0);
        let buf = &mut self.buf[..n];
        let mut got = 0;
        while got < n {
            match self.src.read_at(&mut buf[got..], off + got as u64) {
                Ok(0) => return Err(self.shrank(off + got as u64)),
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(file_err("read", self.src_path, source)),
            }
        }
        self.dst
            .write_all_at(buf, off)
            .map_err(|source| file_err("write", self.tmp_path, source))?;
        Ok(n as u64)
    }

    fn shrank(&self, got: u64) -> Error {
        Error::SourceShrank {
            path: self.src_path.to_owned(),
            expected: self.len,
            got,
        }
    }
}

/// The next data extent at or after `off` (clipped to `len`), or None past the last.
/// Filesystems without SEEK_DATA treat the whole file as data.
fn next_data(f: &File, off: u64, len: u64) -> io::Result<Option<(u64, u64)>> {
    if off >= len {
        return Ok(None);
    }
    let start = match seek(f, off, libc::SEEK_DATA) {
        Ok(s) => s,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok(None),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok(Some((off, len))),
        Err(e) => return Err(e),
    };
    if start >= len {
        return Ok(None);
    }
    let end = match seek(f, start, libc::SEEK_HOLE) {
        Ok(e) if e > start => e.min(len),
        // The file shrank between the two calls: copy to `len` and let the copy notice.
        Ok(_) => len,
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => len,
        Err(e) => return Err(e),
    };
    Ok(Some((start, end)))
}

/// Sum of the data extents of `f` below `len`.
fn data_extents(f: &File, len: u64) -> io::Result<u64> {
    let mut total = 0;
    let mut off = 0;
    while let Some((s, e)) = next_data(f, off, len)? {
        total += e - s;
        off = e;
    }
    Ok(total)
}

fn seek(f: &File, off: u64, whence: libc::c_int) -> io::Result<u64> {
    // SAFETY: lseek on a valid fd owned by `f`; no memory is touched.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(r as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 4 MiB file: data at 0..64K and 1M..1M+100K, the rest holes.
    fn sparse_src(dir: &Path) -> (PathBuf, Vec<u8>) {
        let p = dir.join("src.raw");
        let f = File::create(&p).unwrap();
        f.set_len(4 << 20).unwrap();
        let mut want = vec![0u8; 4 << 20];
        for (off, len, byte) in [(0usize, 65536usize, 0x11u8), (1 << 20, 102400, 0x22)] {
            let data: Vec<u8> = (0..len).map(|i| byte ^ (i % 251) as u8).collect();
            f.write_all_at(&data, off as u64).unwrap();
            want[off..off + len].copy_from_slice(&data);
        }
        f.sync_all().unwrap();
        (p, want)
    }

    fn no_temp_left(dir: &Path) {
        let left: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.contains("vmdisk-tmp"))
            .collect();
        assert!(left.is_empty(), "temporary files left behind: {left:?}");
    }

    fn opts(reflink: Reflink) -> CopyOptions {
        CopyOptions {
            reflink,
            ..Default::default()
        }
    }

    #[test]
    fn never_copies_data_extents_with_read_write_and_keeps_holes() {
        let dir = tempfile::tempdir().unwrap();
        let (src, want) = sparse_src(dir.path());
        let dst = dir.path().join("dst.raw");
        let st = copy_file(&src, &dst, &opts(Reflink::Never), &|_, _| {}).unwrap();
        assert_eq!(st.method, CopyMethod::ReadWrite);
        assert_eq!(st.size, 4 << 20);
        assert_eq!(std::fs::read(&dst).unwrap(), want);
        // Only the data extents were copied (the filesystem may round them to its blocks).
        assert!(st.data_bytes >= 65536 + 102400, "{st:?}");
        assert!(st.data_bytes < 1 << 20, "{st:?}");
        assert_eq!(st.bytes_copied, st.data_bytes);
        let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            blocks < 1 << 20,
            "the copy is not sparse: {blocks} bytes allocated"
        );
        no_temp_left(dir.path());
    }

    #[test]
    fn auto_copies_identically_whatever_the_filesystem_can() {
        let dir = tempfile::tempdir().unwrap();
        let (src, want) = sparse_src(dir.path());
        let dst = dir.path().join("dst.raw");
        let st = copy_file(&src, &dst, &opts(Reflink::Auto), &|_, _| {}).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), want);
        if st.method == CopyMethod::Reflink {
            assert_eq!(st.bytes_copied, 0);
        } else {
            assert_eq!(st.bytes_copied, st.data_bytes);
        }
        no_temp_left(dir.path());
    }

    #[test]
    fn a_clone_renamed_over_the_temporary_is_reopened_and_committed() {
        // macOS clones into a new name, renamed over the temporary (emulated here with a
        // plain copy): the copy must carry on with the new file, not the stale descriptor.
        let dir = tempfile::tempdir().unwrap();
        let (src, want) = sparse_src(dir.path());
        let dst = dir.path().join("dst.raw");
        crate::sys::tests::EMULATE_CLONE_BY_RENAME.set(true);
        let r = copy_file(&src, &dst, &opts(Reflink::Always), &|_, _| {});
        crate::sys::tests::EMULATE_CLONE_BY_RENAME.set(false);
        let st = r.unwrap();
        assert_eq!(st.method, CopyMethod::Reflink);
        assert_eq!(std::fs::read(&dst).unwrap(), want);
        assert_eq!(st.bytes_copied, 0);
        no_temp_left(dir.path());
        let left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".clone"))
            .collect();
        assert!(left.is_empty(), "clone siblings left behind: {left:?}");
        // The copy is not held by anyone once copy_file returned.
        assert!(!held_for_writing(&dst));
    }

    #[test]
    fn always_either_clones_or_fails_cleanly() {
        let dir = tempfile::tempdir().unwrap();
        let (src, want) = sparse_src(dir.path());
        let dst = dir.path().join("dst.raw");
        match copy_file(&src, &dst, &opts(Reflink::Always), &|_, _| {}) {
            Ok(st) => {
                assert_eq!(st.method, CopyMethod::Reflink);
                assert_eq!(std::fs::read(&dst).unwrap(), want);
            }
            Err(e) => {
                assert!(matches!(e, Error::ReflinkUnsupported { .. }), "{e:?}");
                assert!(!dst.exists());
            }
        }
        no_temp_left(dir.path());
    }

    #[test]
    fn an_existing_destination_needs_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let (src, want) = sparse_src(dir.path());
        let dst = dir.path().join("dst.raw");
        std::fs::write(&dst, b"keep me").unwrap();
        let e = copy_file(&src, &dst, &opts(Reflink::Never), &|_, _| {}).unwrap_err();
        assert!(matches!(e, Error::DestinationExists { .. }), "{e:?}");
        assert!(e.to_string().contains("--force"), "{e}");
        assert_eq!(std::fs::read(&dst).unwrap(), b"keep me");
        let o = CopyOptions {
            overwrite: true,
            ..opts(Reflink::Never)
        };
        copy_file(&src, &dst, &o, &|_, _| {}).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), want);
        no_temp_left(dir.path());
    }

    #[test]
    fn a_locked_destination_is_not_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _) = sparse_src(dir.path());
        let dst = dir.path().join("dst.raw");
        std::fs::write(&dst, b"in use").unwrap();
        let f = File::open(&dst).unwrap();
        let held = ImageLock::acquire(&f, &dst, LockMode::Write).unwrap();
        let o = CopyOptions {
            overwrite: true,
            ..opts(Reflink::Never)
        };
        let e = copy_file(&src, &dst, &o, &|_, _| {}).unwrap_err();
        assert!(
            matches!(e.block_error(), Some(vmdisk_block::Error::Locked { .. })),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"in use");
        drop(held);
        no_temp_left(dir.path());
    }

    #[test]
    fn a_source_held_for_writing_needs_force_share() {
        let dir = tempfile::tempdir().unwrap();
        let (src, want) = sparse_src(dir.path());
        assert!(!held_for_writing(&src));
        let f = File::open(&src).unwrap();
        let _writer = ImageLock::acquire(&f, &src, LockMode::Write).unwrap();
        assert!(held_for_writing(&src));
        let dst = dir.path().join("dst.raw");
        let e = copy_file(&src, &dst, &opts(Reflink::Never), &|_, _| {}).unwrap_err();
        assert!(
            matches!(e.block_error(), Some(vmdisk_block::Error::Locked { .. })),
            "{e:?}"
        );
        assert!(!dst.exists());
        let o = CopyOptions {
            force_share: true,
            ..opts(Reflink::Never)
        };
        copy_file(&src, &dst, &o, &|_, _| {}).unwrap();
        assert_eq!(std::fs::read(&dst).unwrap(), want);
    }

    #[test]
    fn into_a_directory_and_never_onto_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (src, want) = sparse_src(dir.path());
        let sub = dir.path().join("sub");
        std::fs::create_dir(&sub).unwrap();
        let st = copy_file(&src, &sub, &opts(Reflink::Auto), &|_, _| {}).unwrap();
        assert_eq!(st.dst, sub.join("src.raw"));
        assert_eq!(std::fs::read(sub.join("src.raw")).unwrap(), want);
        let o = CopyOptions {
            overwrite: true,
            ..opts(Reflink::Auto)
        };
        let e = copy_file(&src, &src, &o, &|_, _| {}).unwrap_err();
        assert!(matches!(e, Error::SameFile { .. }), "{e:?}");
        assert_eq!(std::fs::read(&src).unwrap(), want);
    }

    #[test]
    fn a_raised_cancel_flag_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _) = sparse_src(dir.path());
        let dst = dir.path().join("dst.raw");
        let cancel = Cancel::new();
        cancel.cancel();
        let o = CopyOptions {
            cancel,
            ..opts(Reflink::Never)
        };
        let e = copy_file(&src, &dst, &o, &|_, _| {}).unwrap_err();
        assert!(matches!(e, Error::Cancelled { .. }), "{e:?}");
        assert!(!dst.exists());
        no_temp_left(dir.path());
    }

    #[test]
    fn progress_reaches_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let (src, _) = sparse_src(dir.path());
        let last = std::cell::Cell::new((0, 0));
        copy_file(
            &src,
            &dir.path().join("d"),
            &opts(Reflink::Never),
            &|a, b| {
                assert!(a >= last.get().0, "progress went backwards");
                last.set((a, b));
            },
        )
        .unwrap();
        assert_eq!(last.get(), (4 << 20, 4 << 20));
    }

    #[test]
    fn relative_backing_names_are_checked_against_the_copy_directory() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir(d.join("other")).unwrap();
        std::fs::write(d.join("base.raw"), b"").unwrap();
        let src = d.join("ov.qcow2");
        assert_eq!(
            backing_elsewhere(&src, &d.join("copy.qcow2"), "base.raw", None),
            None
        );
        assert_eq!(
            backing_elsewhere(&src, &d.join("other/c.qcow2"), "/abs/base.raw", None),
            None
        );
        let w = backing_elsewhere(&src, &d.join("other/c.qcow2"), "base.raw", Some("raw")).unwrap();
        assert_eq!(w.for_src, d.join("base.raw"));
        assert_eq!(w.for_dst, d.join("other/base.raw"));
        assert_eq!(w.format.as_deref(), Some("raw"));
        // The same file reached another way (here: a hard link) is fine.
        std::fs::hard_link(d.join("base.raw"), d.join("other/base.raw")).unwrap();
        assert_eq!(
            backing_elsewhere(&src, &d.join("other/c.qcow2"), "base.raw", None),
            None
        );
    }
}
