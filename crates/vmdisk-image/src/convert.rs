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
//! qemu-img's convert flags map onto three knobs: the zero-detection block (`-S`; 0 writes
//! everything, fully allocated), whether the target already reads as zeros where nothing is
//! written (a new image without backing file: yes; `-n`: only with `--target-is-zero`), and
//! an image to compare against (`-B`: a block equal to the new backing file's is left
//! unallocated, so the overlay holds only what differs). When the target does not read as
//! zeros, the source's zero ranges become jobs too and are written as zeros.
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
use crate::{Error, Format, Image, OpenOptions, Result};

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
    /// Zero-detection granularity in bytes (`-S`): a block of this many zero bytes is not
    /// written; `Some(0)` writes every byte (a fully allocated target). `None`: 4 KiB for
    /// raw targets, the cluster for qcow2 targets.
    pub sparse: Option<u64>,
    /// Write into the existing image at the destination (`-n`), as a transaction, instead
    /// of creating one; its format is `format`.
    pub existing: bool,
    /// With `existing`: the target already reads as zeros (`--target-is-zero`), so zero
    /// ranges are not written.
    pub target_is_zero: bool,
    /// `-B`/`-F`: the new image is an overlay on this backing file (stored as given,
    /// relative to the destination) and holds only the blocks that differ from it.
    pub backing: Option<(String, Option<Format>)>,
    /// `-l`/`-s`: convert this internal snapshot of the (qcow2) source, not its active state.
    pub snapshot: Option<q::snapshot::SnapshotSelector>,
}

/// Largest `-S` qemu-img accepts (16 MiB), also a bound on per-block work.
pub const MAX_SPARSE_SIZE: u64 = 16 << 20;

impl ConvertOptions {
    pub fn new(format: Format) -> Self {
        ConvertOptions {
            format,
            compress: false,
            options: ImageOptions::default(),
            threads: None,
            sync: false,
            cancel: Cancel::never(),
            sparse: None,
            existing: false,
            target_is_zero: false,
            backing: None,
            snapshot: None,
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
    Plain {
        off: u64,
        start: usize,
        end: usize,
    },
    Compressed {
        off: u64,
        data: Vec<u8>,
    },
    /// Make `[off, off+len)` read as zeros (targets that do not already).
    Zero {
        off: u64,
        len: u64,
    },
}

impl Piece {
    /// Append a zero range, merging with a zero range just before it.
    fn push_zero(pieces: &mut Vec<Piece>, off: u64, len: u64) {
        if let Some(Piece::Zero { off: o, len: l }) = pieces.last_mut() {
            if *o + *l == off {
                *l += len;
                return;
            }
        }
        pieces.push(Piece::Zero { off, len });
    }
}

struct Done {
    end: u64,
    buf: IoBuf,
    pieces: Vec<Piece>,
    read: u64,
}

/// The ranges of the source to copy, cut into jobs, produced lazily.
struct Jobs<'a> {
    src: &'a dyn BlockDevice,
    size: u64,
    /// Next guest offset whose status has not been asked.
    status_pos: u64,
    /// Ranges still to cut: (start, end, holds data).
    pending: VecDeque<(u64, u64, bool)>,
    /// Jobs are aligned to this (the target cluster for qcow2, so no cluster is split):
    /// data ranges outwards, zero ranges inwards (a cluster with any data is data).
    align: u64,
    /// End of the last job handed out (aligned ranges must not overlap).
    last_end: u64,
    unit: u64,
    /// Zero ranges are jobs too (the target does not read as zeros by itself).
    zeros: bool,
    /// Every range is read and written as data (`-S 0`).
    all_data: bool,
}

/// Guest bytes one zero job covers (it needs no buffer).
const ZERO_UNIT: u64 = 1 << 30;

impl Jobs<'_> {
    fn next_job(&mut self) -> Option<vmdisk_block::Result<(u64, u64, bool)>> {
        let a = self.align;
        loop {
            if let Some((off, end, data)) = self.pending.front_mut() {
                let (data, end) = (*data, *end);
                let (start, stop) = if data {
                    let stop = end.div_ceil(a).saturating_mul(a).min(self.size);
                    ((*off / a * a).max(self.last_end), stop)
                } else {
                    let stop = if end == self.size { end } else { end / a * a };
                    (off.next_multiple_of(a).max(self.last_end), stop)
                };
                if start >= stop {
                    self.pending.pop_front();
                    continue;
                }
                let unit = if data { self.unit } else { ZERO_UNIT };
                let job_end = ((start / unit + 1) * unit).min(stop);
                *off = job_end;
                self.last_end = job_end;
                return Some(Ok((start, job_end - start, data)));
            }
            if self.status_pos >= self.size {
                return None;
            }
            let n = STATUS_WINDOW.min(self.size - self.status_pos);
            match self.src.block_status(self.status_pos, n) {
                Ok(exts) => {
                    for e in exts {
                        let data = self.all_data || e.kind == ExtentKind::Data;
                        if !data && !self.zeros {
                            continue;
                        }
                        match self.pending.back_mut() {
                            Some(last) if last.1 == e.off && last.2 == data => last.1 = e.end(),
                            _ => self.pending.push_back((e.off, e.end(), data)),
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
    /// Write everything (`-S 0`).
    Full,
    /// Skip all-zero blocks of this size.
    Sparse(u64),
    /// Compress each cluster of this size.
    Compress(CompressionType, u64),
}

/// Read `buf.len()` bytes of `dev` at `off`, zeros past its end.
fn read_padded(dev: &dyn BlockDevice, buf: &mut [u8], off: u64) -> vmdisk_block::Result<()> {
    let n = dev.len().saturating_sub(off).min(buf.len() as u64) as usize;
    if n > 0 {
        dev.read_exact_at(&mut buf[..n], off)?;
    }
    buf[n..].fill(0);
    Ok(())
}

fn push_plain(pieces: &mut Vec<Piece>, off: u64, pos: u64, end: u64) {
    match pieces.last_mut() {
        Some(Piece::Plain { end: e, .. }) if *e == pos as usize => *e = end as usize,
        _ => pieces.push(Piece::Plain {
            off: off + pos,
            start: pos as usize,
            end: end as usize,
        }),
    }
}

fn work(
    ctx: &WorkerCtx<'_>,
    off: u64,
    len: u64,
    data: bool,
    mut buf: IoBuf,
) -> vmdisk_block::Result<Done> {
    let mut pieces = Vec::new();
    if !data {
        // A zero range of the source, on a target that does not read as zeros by itself:
        // zeros wherever what shows through (-B) is not known to read as zeros.
        match ctx.compare {
            None => Piece::push_zero(&mut pieces, off, len),
            Some(b) => {
                let end = (off + len).min(b.len());
                if off < end {
                    for e in b.block_status(off, end - off)? {
                        if e.reads_as_zero() {
                            continue;
                        }
                        // Whole target clusters (a partial one would be copied-on-write).
                        let a = ctx.align.max(1);
                        let s = (e.off / a * a).max(off);
                        let t = e.end().div_ceil(a).saturating_mul(a).min(off + len);
                        if t > s {
                            Piece::push_zero(&mut pieces, s, t - s);
                        }
                    }
                }
            }
        }
        return Ok(Done {
            end: off + len,
            buf,
            pieces,
            read: 0,
        });
    }
    if buf.capacity() < len as usize {
        buf = IoBuf::with_capacity(len as usize);
    }
    buf.set_len(len as usize);
    ctx.src.read_exact_at(&mut buf, off)?;
    // What the target shows where nothing is written (-B): equal blocks stay unwritten.
    let below: Option<Vec<u8>> = match ctx.compare {
        Some(b) => {
            let mut v = vec![0u8; len as usize];
            read_padded(b, &mut v, off)?;
            Some(v)
        }
        None => None,
    };
    let same_below = |a: usize, b: usize| below.as_ref().is_some_and(|v| v[a..b] == buf[a..b]);
    match ctx.mode {
        Mode::Full => pieces.push(Piece::Plain {
            off,
            start: 0,
            end: len as usize,
        }),
        Mode::Sparse(block) => {
            let mut pos = 0u64;
            while pos < len {
                let end = (((off + pos) / block + 1) * block - off).min(len);
                let (a, b) = (pos as usize, end as usize);
                if same_below(a, b) {
                    // Reads the same through the backing file.
                } else if is_zero(&buf[a..b]) {
                    if !ctx.target_zero {
                        Piece::push_zero(&mut pieces, off + pos, end - pos);
                    }
                } else {
                    push_plain(&mut pieces, off, pos, end);
                }
                pos = end;
            }
        }
        Mode::Compress(ctype, cs) => {
            let mut pad = Vec::new();
            let mut pos = 0u64;
            while pos < len {
                let end = (pos + cs).min(len);
                let (a, b) = (pos as usize, end as usize);
                let chunk = &buf[a..b];
                if same_below(a, b) {
                } else if is_zero(chunk) {
                    if !ctx.target_zero {
                        Piece::push_zero(&mut pieces, off + pos, end - pos);
                    }
                } else {
                    // The last cluster of an image may be short: compress it zero-padded.
                    let full: &[u8] = if chunk.len() as u64 == cs {
                        chunk
                    } else {
                        pad.clear();
                        pad.extend_from_slice(chunk);
                        pad.resize(cs as usize, 0);
                        &pad
                    };
                    let short_tail = off + end == ctx.size && chunk.len() as u64 != cs;
                    match q::compress_cluster(ctype, cs, full)? {
                        Some(c) if !short_tail => pieces.push(Piece::Compressed {
                            off: off + pos,
                            data: c,
                        }),
                        _ => push_plain(&mut pieces, off, pos, end),
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
    /// The target reads as zeros where nothing is written.
    target_zero: bool,
    /// The target's backing file (`-B`): blocks equal to it are not written.
    compare: Option<&'a dyn BlockDevice>,
    /// Job alignment (the target cluster for qcow2).
    align: u64,
}

fn worker(shared: &Shared<'_>, ctx: &WorkerCtx<'_>) {
    let src_path = ctx.src_path;
    loop {
        let (seq, off, len, data, buf) = {
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
                Some(Ok((off, len, data))) => {
                    g.next_seq += 1;
                    let buf = g
                        .pool
                        .pop()
                        .unwrap_or_else(|| IoBuf::with_capacity(CHUNK as usize));
                    (seq, off, len, data, buf)
                }
            }
        };
        let r = work(ctx, off, len, data, buf).map_err(Error::image("reading", src_path));
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
    /// An existing image written in place (`-n`), as a transaction.
    Existing(Image),
}

impl Target {
    /// The device to write; `holder` keeps an existing image's device alive.
    fn dev<'a>(&'a self, holder: &'a Option<Arc<dyn BlockDevice>>) -> Result<&'a dyn BlockDevice> {
        Ok(match self {
            Target::Raw(r) => &**r,
            Target::Qcow2(q) => &**q,
            Target::Existing(_) => holder.as_deref().ok_or(Error::InvalidOption {
                option: "-n".into(),
                reason: "the target device is gone".into(),
            })?,
        })
    }
    fn qcow2(&self) -> Option<&Qcow2Image> {
        match self {
            Target::Qcow2(q) => Some(q),
            Target::Existing(img) => img.qcow2(),
            Target::Raw(_) => None,
        }
    }
}

/// Check the combination of options before anything is opened for writing.
fn validate(opts: &ConvertOptions) -> Result<()> {
    let bad = |option: &str, reason: &str| {
        Err(Error::InvalidOption {
            option: option.into(),
            reason: reason.into(),
        })
    };
    if opts.compress && opts.format != Format::Qcow2 {
        return bad("-c", "compression needs a qcow2 target (-O qcow2)");
    }
    if opts.options.backing_file.is_some() {
        return bad("backing_file", "give the backing file with -B (and -F)");
    }
    if let Some(s) = opts.sparse {
        if !s.is_multiple_of(512) || s > MAX_SPARSE_SIZE {
            return bad(
                "-S",
                "the sparse size must be a multiple of 512 up to 16M (0: fully allocated)",
            );
        }
    }
    if opts.target_is_zero && !opts.existing {
        return bad(
            "--target-is-zero",
            "it needs -n (a new target reads as zeros anyway)",
        );
    }
    if opts.existing {
        if opts.options != ImageOptions::default() {
            return bad("-o", "options shape a new image; -n writes an existing one");
        }
        if opts.compress {
            return bad(
                "-c",
                "compressed clusters can only go to a new image (leave -n out)",
            );
        }
        if opts.backing.is_some() {
            return bad(
                "-B",
                "a backing file is set when the image is created (leave -n out)",
            );
        }
    }
    if opts.backing.is_some() && opts.format != Format::Qcow2 {
        return bad("-B", "only qcow2 images have backing files (-O qcow2)");
    }
    Ok(())
}

/// Copy the guest contents of `src` into a new image at `dst` (or, with `existing`, into
/// the image there). Only data is read and written; zero and unallocated ranges and
/// all-zero blocks stay holes when the target reads as zeros. `progress(done, total)` is
/// called from this thread.
///
/// Everything is checked before the output exists: `dst` must not be `src` or any file of its
/// backing chain, no qemu may hold it, and its filesystem must have the space
/// (`measure`'s `required`; not checked for compressed output, which is smaller by an
/// unknown factor). A new output is built under a temporary name and renamed onto `dst` at
/// the end — an existing `dst` is replaced (as by qemu-img) only then, and stays untouched
/// on any error, interrupt or ENOSPC; an existing target written with `existing` is an
/// undoable transaction, put back byte for byte on any failure.
pub fn convert(
    src: &Image,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<ConvertStats> {
    validate(opts)?;
    let src_dev: Arc<dyn BlockDevice> = match &opts.snapshot {
        None => src.dev(),
        Some(sel) => {
            let q = src.require_qcow2("converting a snapshot (-l)")?;
            Arc::new(
                Qcow2Image::open_snapshot(q.host().clone(), q.backing().cloned(), sel)
                    .map_err(Error::image("opening the snapshot of", src.path()))?,
            )
        }
    };
    convert_device(src, src_dev, dst, opts, progress)
}

/// [`convert`] from `src_dev`, a view of `src` (the image itself, a snapshot of it, or a
/// slice for `dd`): `src` is what the destination must not be.
pub(crate) fn convert_device(
    src: &Image,
    src_dev: Arc<dyn BlockDevice>,
    dst: &Path,
    opts: &ConvertOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<ConvertStats> {
    let t0 = Instant::now();
    validate(opts)?;
    let size = src_dev.len();
    crate::refuse_output_onto_input(dst, src, "the source")?;
    // The new backing file (-B), opened to compare against; a loop is refused by create.
    let compare_img = match &opts.backing {
        Some((name, fmt)) => Some(crate::open(
            &crate::resolve_backing(dst, name),
            &OpenOptions {
                format: *fmt,
                read_only: true,
                force_share: true,
                ..Default::default()
            },
        )?),
        None => None,
    };
    let mut pending = None;
    let mut host_keep = None;
    let mut _lock = None;
    let (target, target_zero) = if opts.existing {
        let img = crate::open(
            dst,
            &OpenOptions {
                format: Some(opts.format),
                ..OpenOptions::transaction()
            },
        )?;
        if img.len() < size {
            return Err(Error::InvalidOption {
                option: "-n".into(),
                reason: format!(
                    "{} is {} bytes, smaller than the {size} bytes being converted",
                    dst.display(),
                    img.len()
                ),
            });
        }
        (Target::Existing(img), opts.target_is_zero)
    } else {
        if !opts.compress && opts.backing.is_none() {
            let needed =
                crate::measure::space_needed(&*src_dev, src.path(), opts.format, &opts.options)?;
            crate::ensure_space(dst, needed)?;
        }
        let spec = CreateSpec {
            format: opts.format,
            size: Some(size),
            options: opts.options.clone(),
            backing_file: opts.backing.as_ref().map(|b| b.0.clone()),
            backing_format: opts.backing.as_ref().and_then(|b| b.1),
        };
        let (p, host, lock) = create_pending(dst, &spec)?;
        let host = Arc::new(host);
        pending = Some(p);
        _lock = Some(lock);
        host_keep = Some(host.clone());
        match opts.format {
            Format::Raw => (Target::Raw(host), true),
            Format::Qcow2 => {
                let img = Qcow2Image::open(
                    Arc::new(NoFlush(host)),
                    compare_img.as_ref().map(|b| b.dev()),
                    false,
                )
                .map_err(Error::image("opening", dst))?;
                (Target::Qcow2(Box::new(img)), compare_img.is_none())
            }
        }
    };
    let cs = target.qcow2().map(|q| q.cluster_size());
    let mode = match (opts.sparse, cs) {
        (Some(0), _) => Mode::Full,
        _ if opts.compress => {
            let ctype = opts.options.compression_type.unwrap_or_default();
            Mode::Compress(ctype, cs.unwrap_or(65536))
        }
        (Some(sz), Some(cs)) => Mode::Sparse(sz.max(cs)),
        (None, Some(cs)) => Mode::Sparse(cs),
        (Some(sz), None) => Mode::Sparse(sz),
        (None, None) => Mode::Sparse(ZERO_BLOCK),
    };
    // Jobs never split a target cluster (or a zero-detection block).
    let align = match mode {
        Mode::Sparse(b) => b,
        Mode::Compress(_, cs) => cs,
        Mode::Full => cs.unwrap_or(1),
    };
    let align = if matches!(target, Target::Raw(_)) && matches!(mode, Mode::Sparse(_)) {
        1
    } else {
        align
    };
    let threads = opts
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get()))
        .max(1);
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
                zeros: !target_zero || compare_img.is_some(),
                all_data: matches!(mode, Mode::Full),
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
    let compare_dev = compare_img.as_ref().map(|b| b.dev());
    let ctx = WorkerCtx {
        src: &*src_dev,
        src_path: src.path(),
        size,
        mode,
        target_zero,
        compare: compare_dev.as_deref(),
        align,
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
    match target {
        Target::Qcow2(q) => (*q).close().map_err(Error::image("closing", dst))?,
        Target::Existing(img) => {
            if opts.sync {
                img.dev().flush().map_err(Error::image("flushing", dst))?;
            }
            img.close()?;
        }
        Target::Raw(_) => {}
    }
    drop(host_keep);
    if let Some(pending) = pending {
        if opts.sync {
            pending.commit()?;
        } else {
            pending.commit_unsynced()?;
        }
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
    let holder = match target {
        Target::Existing(img) => Some(img.dev()),
        _ => None,
    };
    let dev = target.dev(&holder)?;
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
                Piece::Zero { off, len } => {
                    flush_batch(&mut batch)?;
                    dev.write_zeroes(*off, *len, true)
                        .map_err(Error::image("writing zeros to", dst))?;
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
    use crate::{open, CreateSpec};

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
        let jobs = |zeros: bool| {
            let mut j = Jobs {
                src: &d,
                size: 1 << 20,
                status_pos: 0,
                pending: VecDeque::new(),
                align: 65536,
                last_end: 0,
                unit: CHUNK,
                zeros,
                all_data: false,
            };
            let mut got = Vec::new();
            while let Some(r) = j.next_job() {
                got.push(r.unwrap());
            }
            got
        };
        assert_eq!(jobs(false), vec![(0, 65536, true), (65536, 65536, true)]);
        // With zero ranges: a cluster holding any data is data; the rest are zero jobs that
        // cover the disk exactly once.
        assert_eq!(
            jobs(true),
            vec![
                (0, 65536, true),
                (65536, 65536, true),
                (131072, (1 << 20) - 131072, false)
            ]
        );
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
