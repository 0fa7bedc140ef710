//! `convert`: a sparse, parallel, bounded-memory copy into a new raw or qcow2 image.
//!
//! ```text
//!   jobs (from block_status: data ranges only, cut into chunks)
//!     │  N reader/compressor threads take the next job while fewer than WINDOW are pending
//!     ▼
//!   reorder buffer (≤ WINDOW chunks) ──▶ one writer (this thread) writes in guest order
//! ```
//!
//! One writer for raw targets too: parallel pwrites to one file serialise on the inode lock
//! anyway, and the spinning cost 19% of a qcow2->raw convert's CPU.
//!
//! Plain threads rather than rayon tasks: workers block waiting for window slots, and a
//! blocking wait inside rayon's pool can starve the pool that should unblock it.

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmdisk_block::{is_zero, BlockDevice, Cancel, ExtentKind, IoBuf};

use crate::create::{create_pending, CreateSpec, ImageOptions};
use crate::q::{self, CompressionType, Qcow2Image};
use crate::{Error, Format, Image, Result};

/// Bytes per uncompressed job (a multiple of every cluster size).
const CHUNK: u64 = 2 << 20;
/// Granularity of zero detection for raw targets (a filesystem block).
const ZERO_BLOCK: u64 = 4096;
/// How much guest space one `block_status` call covers.
const STATUS_WINDOW: u64 = 1 << 30;
/// Jobs in flight (read but not yet written) per worker thread.
const WINDOW_PER_THREAD: usize = 4;

/// How to convert.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub format: Format,
    /// Compress every cluster that shrinks (qcow2 only, like qemu-img's `-c`).
    pub compress: bool,
    /// Target options (`-o`), e.g. cluster_size, compression_type, compat.
    pub options: ImageOptions,
    /// Worker threads; `None` uses the machine's parallelism.
    pub threads: Option<usize>,
    /// fsync the target at the end. Off by default, like qemu-img convert's default
    /// `cache=unsafe`: a target cut short by a crash is garbage either way, and the
    /// engine's intermediate ordering flushes are skipped while converting.
    pub sync: bool,
    /// Raised (Ctrl-C): stop, remove the partial output, return [`Error::Cancelled`].
    pub cancel: Cancel,
}

impl ConvertOptions {
    pub fn new(format: Format) -> Self {
        ConvertOptions {
            format,
            compress: false,
            options: ImageOptions::default(),
            threads: None,
            sync: false,
            cancel: Cancel::never(),
        }
    }
}

/// What a conversion did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ConvertStats {
    pub virtual_size: u64,
    /// Source bytes read (data ranges only).
    pub bytes_read: u64,
    /// Guest bytes written uncompressed to the target.
    pub bytes_written: u64,
    /// Clusters stored compressed.
    pub compressed_clusters: u64,
    /// Bytes of compressed cluster data written.
    pub compressed_bytes: u64,
    pub elapsed: Duration,
}

/// A piece of output, in guest order.
enum Piece {
    Plain { off: u64, start: usize, end: usize },
    Compressed { off: u64, data: Vec<u8> },
}

struct Done {
    end: u64,
    buf: IoBuf,
    pieces: Vec<Piece>,
    read: u64,
}

/// The data ranges of the source, cut into jobs, produced lazily.
struct Jobs<'a> {
    src: &'a dyn BlockDevice,
    size: u64,
    /// Next guest offset whose status has not been asked.
    status_pos: u64,
    /// Data ranges still to cut.
    pending: VecDeque<(u64, u64)>,
    /// Jobs are aligned to this (the target cluster for qcow2, so no cluster is split).
    align: u64,
    /// End of the last job handed out (aligned ranges must not overlap).
    last_end: u64,
    unit: u64,
}

impl Jobs<'_> {
    fn next_job(&mut self) -> Option<vmdisk_block::Result<(u64, u64)>> {
        loop {
            if let Some((off, end)) = self.pending.front_mut() {
                let start = (*off / self.align * self.align).max(self.last_end);
                let aligned_end = end
                    .div_ceil(self.align)
                    .saturating_mul(self.align)
                    .min(self.size);
                if start >= aligned_end {
                    self.pending.pop_front();
                    continue;
                }
                let job_end = ((start / self.unit + 1) * self.unit).min(aligned_end);
                *off = job_end;
                self.last_end = job_end;
                return Some(Ok((start, job_end - start)));
            }
            if self.status_pos >= self.size {
                return None;
            }
            let n = STATUS_WINDOW.min(self.size - self.status_pos);
            match self.src.block_status(self.status_pos, n) {
                Ok(exts) => {
                    for e in exts.into_iter().filter(|e| e.kind == ExtentKind::Data) {
                        match self.pending.back_mut() {
                            Some(last) if last.1 == e.off => last.1 = e.end(),
                            _ => self.pending.push_back((e.off, e.end())),
                        }
                    }
                }
                Err(e) => return Some(Err(e)),
            }
            self.status_pos += n;
        }
    }
}

struct Pipe<'a> {
    jobs: Jobs<'a>,
    next_seq: u64,
    written: u64,
    exhausted: bool,
    abort: bool,
    results: BTreeMap<u64, Result<Done>>,
    /// Read buffers (page-aligned: see `IoBuf`), reused across chunks.
    pool: Vec<IoBuf>,
}

struct Shared<'a> {
    pipe: Mutex<Pipe<'a>>,
    can_take: Condvar,
    can_write: Condvar,
    window: u64,
}

impl<'a> Shared<'a> {
    fn lock(&self) -> MutexGuard<'_, Pipe<'a>> {
        self.pipe.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How workers turn a chunk into pieces.
#[derive(Clone, Copy)]
enum Mode {
    /// Skip all-zero blocks of this size.
    Sparse(u64),
    /// Compress each cluster of this size.
    Compress(CompressionType, u64),
}

fn work(
    src: &dyn BlockDevice,
    size: u64,
    mode: Mode,
    off: u64,
    len: u64,
    mut buf: IoBuf,
) -> vmdisk_block::Result<Done> {
    if buf.capacity() < len as usize {
        buf = IoBuf::with_capacity(len as usize);
    }
    buf.set_len(len as usize);
    src.read_exact_at(&mut buf, off)?;
    let mut pieces = Vec::new();
    match mode {
        Mode::Sparse(block) => {
            let mut pos = 0u64;
            while pos < len {
                let end = ((off + pos) / block + 1) * block - off;
                let end = end.min(len);
                if !is_zero(&buf[pos as usize..end as usize]) {
                    match pieces.last_mut() {
                        Some(Piece::Plain { end: e, .. }) if *e == pos as usize => {
                            *e = end as usize
                        }
                        _ => pieces.push(Piece::Plain {
                            off: off + pos,
                            start: pos as usize,
                            end: end as usize,
                        }),
                    }
                }
                pos = end;
            }
        }
        Mode::Compress(ctype, cs) => {
            let mut pad = Vec::new();
            let mut pos = 0u64;
            while pos < len {
                let end = (pos + cs).min(len);
                let data = &buf[pos as usize..end as usize];
                if !is_zero(data) {
                    // The last cluster of an image may be short: compress it zero-padded.
                    let full: &[u8] = if data.len() as u64 == cs {
                        data
                    } else {
                        pad.clear();
                        pad.extend_from_slice(data);
                        pad.resize(cs as usize, 0);
                        &pad
                    };
                    let short_tail = off + end == size && data.len() as u64 != cs;
                    match q::compress_cluster(ctype, cs, full)? {
                        Some(c) if !short_tail => pieces.push(Piece::Compressed {
                            off: off + pos,
                            data: c,
                        }),
                        _ => pieces.push(Piece::Plain {
                            off: off + pos,
                            start: pos as usize,
                            end: end as usize,
                        }),
                    }
                }
                pos = end;
            }
        }
    }
    Ok(Done {
        end: off + len,
        buf,
        pieces,
        read: len,
    })
}

struct WorkerCtx<'a> {
    src: &'a dyn BlockDevice,
    src_path: &'a Path,
    size: u64,
    mode: Mode,
}

fn worker(shared: &Shared<'_>, ctx: &WorkerCtx<'_>) {
    let WorkerCtx {
        src,
        src_path,
        size,
        mode,
    } = *ctx;
    loop {
        let (seq, off, len, buf) = {
            let mut g = shared.lock();
            loop {
                if g.abort || g.exhausted {
                    return;
                }
                if g.next_seq < g.written + shared.window {
                    break;
                }
                g = shared.can_take.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            let seq = g.next_seq;
            match g.jobs.next_job() {
                None => {
                    g.exhausted = true;
                    shared.can_write.notify_all();
                    shared.can_take.notify_all();
                    return;
                }
                Some(Err(e)) => {
                    g.results
                        .insert(seq, Err(Error::image("reading", src_path)(e)));
                    g.next_seq += 1;
                    g.exhausted = true;
                    shared.can_write.notify_all();
                    shared.can_take.notify_all();
                    return;
                }
                Some(Ok((off, len))) => {
                    g.next_seq += 1;
                    let buf = g
                        .pool
                        .pop()
                        .unwrap_or_else(|| IoBuf::with_capacity(CHUNK as usize));
                    (seq, off, len, buf)
                }
            }
        };
        let r = work(src, size, mode, off, len, buf).map_err(Error::image("reading", src_path));
        let mut g = shared.lock();
        g.results.insert(seq, r);
        shared.can_write.notify_all();
    }
}

/// A host whose `flush` does nothing (qemu's `cache=unsafe`) for the target of a convert.
struct NoFlush(Arc<vmdisk_block::RawFile>);

impl BlockDevice for NoFlush {
    fn len(&self) -> u64 {
        self.0.len()
    }
    fn read_exact_at(&self, buf: &mut [u8], off: u64) -> vmdisk_block::Result<()> {
        self.0.read_exact_at(buf, off)
    }
    fn write_all_at(&self, buf: &[u8], off: u64) -> vmdisk_block::Result<()> {
        self.0.write_all_at(buf, off)
    }
    fn flush(&self) -> vmdisk_block::Result<()> {
        Ok(())
    }
    fn block_status(&self, off: u64, len: u64) -> vmdisk_block::Result<Vec<vmdisk_block::Extent>> {
        self.0.block_status(off, len)
    }
    fn write_zeroes(&self, off: u64, len: u64, may_unmap: bool) -> vmdisk_block::Result<()> {
        self.0.write_zeroes(off, len, may_unmap)
    }
    fn discard(&self, off: u64, len: u64) -> vmdisk_block::Result<()> {
        self.0.discard(off, len)
    }
    fn resize(&self, new_len: u64) -> vmdisk_block::Result<()> {
        self.0.resize(new_len)
    }
}

/// The target being written.
enum Target {
    Raw(Arc<vmdisk_block::RawFile>),
    Qcow2(Box<Qcow2Image>),
}

impl Target {
    fn dev(&self) -> &dyn BlockDevice {
        match self {
            Target::Raw(r) => &**r,
            Target::Qcow2(q) => &**q,
        }
    }
}

/// Copy the guest contents of `src` into a new image at `dst`. Only data is read and written;
/// zero and unallocated ranges and all-zero blocks stay holes. `progress(done, total)` is
/// called from this thread.
///
/// Everything is checked before the output exists: `dst` must not be `src` or any file of its
/// backing chain, no qemu may hold it, and its filesystem must have the space
/// (`measure`'s `required`; not checked for compressed output, which is smaller by an
/// unknown factor). The output is built under a temporary name and renamed onto `dst` at the
/// end — an existing `dst` is replaced (as by qemu-img) only then, and stays untouched on
/// any error, interrupt or ENOSPC.
pub fn convert(
    src: &Image,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<ConvertStats> {
    let t0 = Instant::now();
    let size = src.len();
    if opts.compress && opts.format != Format::Qcow2 {
        return Err(Error::InvalidOption {
            option: "-c".into(),
            reason: "compression needs a qcow2 target (-O qcow2)".into(),
        });
    }
    if opts.options.backing_file.is_some() {
        return Err(Error::InvalidOption {
            option: "backing_file".into(),
            reason: "convert writes a standalone image".into(),
        });
    }
    crate::refuse_output_onto_input(dst, src, "the source")?;
    if !opts.compress {
        let m = crate::measure(src, opts.format, &opts.options)?;
        crate::ensure_space(dst, m.required)?;
    }
    let spec = CreateSpec {
        format: opts.format,
        size: Some(size),
        options: opts.options.clone(),
        backing_file: None,
        backing_format: None,
    };
    let (pending, host, _lock) = create_pending(dst, &spec)?;
    let host = Arc::new(host);
    let (target, mode) = match opts.format {
        Format::Raw => (Target::Raw(host.clone()), Mode::Sparse(ZERO_BLOCK)),
        Format::Qcow2 => {
            let img = Qcow2Image::open(Arc::new(NoFlush(host.clone())), None, false)
                .map_err(Error::image("opening", dst))?;
            let cs = img.cluster_size();
            let mode = if opts.compress {
                let ctype = opts.options.compression_type.unwrap_or_default();
                Mode::Compress(ctype, cs)
            } else {
                Mode::Sparse(cs)
            };
            (Target::Qcow2(Box::new(img)), mode)
        }
    };
    let align = match mode {
        Mode::Sparse(b) if opts.format == Format::Qcow2 => b,
        Mode::Compress(_, cs) => cs,
        Mode::Sparse(_) => 1,
    };
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
    let src_dev = src.dev();
    let shared = Shared {
        pipe: Mutex::new(Pipe {
            jobs: Jobs {
                src: &*src_dev,
                size,
                status_pos: 0,
                pending: VecDeque::new(),
                align,
                last_end: 0,
                unit: CHUNK,
            },
            next_seq: 0,
            written: 0,
            exhausted: false,
            abort: false,
            results: BTreeMap::new(),
            pool: Vec::new(),
        }),
        can_take: Condvar::new(),
        can_write: Condvar::new(),
        window: (threads * WINDOW_PER_THREAD) as u64,
    };
    let mut stats = ConvertStats {
        virtual_size: size,
        ..Default::default()
    };
    progress(0, size);
    let ctx = WorkerCtx {
        src: &*src_dev,
        src_path: src.path(),
        size,
        mode,
    };
    let written = std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| worker(&shared, &ctx));
        }
        let r = write_in_order(
            &shared,
            &target,
            dst,
            &mut stats,
            size,
            progress,
            &opts.cancel,
        );
        if r.is_err() {
            shared.lock().abort = true;
            shared.can_take.notify_all();
        }
        r
    });
    written?;
    if let Target::Qcow2(q) = target {
        (*q).close().map_err(Error::image("closing", dst))?;
    }
    drop(host);
    if opts.sync {
        pending.commit()?;
    } else {
        pending.commit_unsynced()?;
    }
    progress(size, size);
    stats.elapsed = t0.elapsed();
    Ok(stats)
}

fn write_in_order(
    shared: &Shared<'_>,
    target: &Target,
    dst: &Path,
    stats: &mut ConvertStats,
    size: u64,
    progress: &dyn Fn(u64, u64),
    cancel: &Cancel,
) -> Result<()> {
    loop {
        if cancel.is_cancelled() {
            return Err(Error::Cancelled {
                path: dst.to_owned(),
            });
        }
        let item = {
            let mut g = shared.lock();
            loop {
                let w = g.written;
                if let Some(r) = g.results.remove(&w) {
                    break Some(r);
                }
                if g.exhausted && g.written == g.next_seq {
                    break None;
                }
                g = shared.can_write.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        };
        let done = match item {
            None => return Ok(()),
            Some(r) => r?,
        };
        let dev = target.dev();
        // Consecutive compressed clusters go to the engine as one batch (one host write).
        let mut batch: Vec<(u64, &[u8])> = Vec::new();
        let flush_batch = |batch: &mut Vec<(u64, &[u8])>| -> Result<()> {
            if let (Target::Qcow2(q), false) = (target, batch.is_empty()) {
                q.write_compressed_batch(batch)
                    .map_err(Error::image("writing", dst))?;
            }
            batch.clear();
            Ok(())
        };
        for p in &done.pieces {
            match p {
                Piece::Plain { off, start, end } => {
                    flush_batch(&mut batch)?;
                    dev.write_all_at(&done.buf[*start..*end], *off)
                        .map_err(Error::image("writing", dst))?;
                    stats.bytes_written += (*end - *start) as u64;
                }
                Piece::Compressed { off, data } => {
                    batch.push((*off, data));
                    stats.compressed_clusters += 1;
                    stats.compressed_bytes += data.len() as u64;
                }
            }
        }
        flush_batch(&mut batch)?;
        stats.bytes_read += done.read;
        progress(done.end, size);
        let mut g = shared.lock();
        g.written += 1;
        g.pool.push(done.buf);
        shared.can_take.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open, CreateSpec, OpenOptions};

    #[test]
    fn raw_to_raw_is_sparse_and_exact() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.raw");
        let b = dir.path().join("b.raw");
        let size = 9 << 20 | 512; // not a multiple of the chunk size
        crate::create(&a, &CreateSpec::new(Format::Raw, size)).unwrap();
        {
            let img = open(&a, &OpenOptions::default()).unwrap();
            let d = img.dev();
            d.write_all_at(&[7u8; 10000], 3 << 20).unwrap();
            d.write_all_at(&[0u8; 65536], 5 << 20).unwrap(); // allocated zeros
            d.write_all_at(&[9u8; 512], size - 512).unwrap();
        }
        let src = open(&a, &OpenOptions::read_only()).unwrap();
        let calls = std::cell::Cell::new(0);
        let stats = convert(
            &src,
            &b,
            &ConvertOptions {
                threads: Some(3),
                ..ConvertOptions::new(Format::Raw)
            },
            &|d, t| {
                assert!(d <= t);
                calls.set(calls.get() + 1);
            },
        )
        .unwrap();
        assert!(calls.get() >= 2);
        assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        // 10000 bytes -> 3 blocks of 4 KiB, and the 512-byte tail.
        assert_eq!(stats.bytes_written, 3 * 4096 + 512);
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&b).unwrap().blocks() * 512 <= 64 << 10);
    }

    #[test]
    fn jobs_align_and_never_overlap() {
        let d = vmdisk_block::MemDisk::new(1 << 20);
        d.write_all_at(&[1u8; 100], 4096 + 10).unwrap();
        d.write_all_at(&[1u8; 100], 3 * 4096).unwrap();
        d.write_all_at(&[1u8; 100], 70000).unwrap();
        let mut j = Jobs {
            src: &d,
            size: 1 << 20,
            status_pos: 0,
            pending: VecDeque::new(),
            align: 65536,
            last_end: 0,
            unit: CHUNK,
        };
        let mut got = Vec::new();
        while let Some(r) = j.next_job() {
            got.push(r.unwrap());
        }
        assert_eq!(got, vec![(0, 65536), (65536, 65536)]);
    }

    #[test]
    fn compress_to_raw_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.raw");
        crate::create(&a, &CreateSpec::new(Format::Raw, 4096)).unwrap();
        let src = open(&a, &OpenOptions::read_only()).unwrap();
        let o = ConvertOptions {
            compress: true,
            ..ConvertOptions::new(Format::Raw)
        };
        assert!(convert(&src, &dir.path().join("b"), &o, &|_, _| {}).is_err());
    }
}
