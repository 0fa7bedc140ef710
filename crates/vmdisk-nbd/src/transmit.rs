//! The transmission phase of one connection: a single task reads requests, hands device calls
//! to tokio's blocking pool and writes the replies.
//!
//! ```text
//!            ┌──────────── one task per connection (owns the whole stream) ────────────┐
//!  socket ──▶│ InBuf (header + small WRITE payload in one receive) ─▶ validate          │
//!            │   ─▶ mem_budget (bytes) ─▶ queued ─▶ io_slots ─▶ spawn_blocking ──┐     │
//!  socket ◀──│ OutQueue (one vectored write for every ready reply) ◀─ encode ◀─ done ◀┘ │
//!            └──────────────────────────────────────────────────────────────────────────┘
//! ```
//!
//! The task polls, in turn, the device calls that finished (a channel the blocking jobs send
//! on), the reply queue and the input. There is no per-request task, no writer lock and no
//! split of the stream, so a small request costs one hand-off to the blocking pool and back.
//! Waiting for memory budget or an io slot stops only the reading side: replies keep flowing,
//! so a connection never sits on budget that writing its replies would release.
//!
//! Reads with structured replies are sparse, as qemu-nbd's are: `block_status` over the range
//! decides which parts are read and which are sent as NBD_REPLY_TYPE_OFFSET_HOLE chunks
//! (chunks in offset order, never overlapping, the last one carrying DONE). With
//! NBD_CMD_FLAG_DF the reply is one OFFSET_DATA chunk with the zeros present, and simple
//! replies always carry every byte. Read and write buffers come from a small per-connection
//! pool, so steady traffic neither zero-fills nor faults in fresh memory per request; a buffer
//! is always fully overwritten by the device (or was zero-filled at allocation) before a byte
//! of it is sent.

use std::collections::VecDeque;
use std::future::Future;
use std::io::{self, IoSlice};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::{mpsc, watch, AcquireError, OwnedSemaphorePermit, TryAcquireError};
use vmdisk_block::{BlockDevice, Extent, ExtentKind};

use crate::limits::{
    INPUT_BUFFER_LEN, MAX_BLOCK_STATUS_DESCRIPTORS, MAX_BLOCK_STATUS_LEN, MAX_IN_FLIGHT,
    MAX_IOVECS, MAX_REQUEST_LEN, MIN_HOLE_LEN, POOL_BYTES, POOL_MAX_BUFFER,
};
use crate::negotiate::Negotiated;
use crate::proto::*;
use crate::shared::{stopped, Shared};

type Acquire = Pin<Box<dyn Future<Output = Result<OwnedSemaphorePermit, AcquireError>> + Send>>;

/// Map a device error onto the protocol's errno values.
pub(crate) fn errno_of(e: &vmdisk_block::Error) -> u32 {
    use vmdisk_block::Error as E;
    match e {
        E::OutOfRange { .. } => EINVAL,
        E::ReadOnly => EPERM,
        E::Unsupported { .. } => ENOTSUP,
        E::Limit { .. } => ENOMEM,
        E::Io { source, .. } if source.raw_os_error() == Some(libc::ENOSPC) => ENOSPC,
        _ => EIO,
    }
}

/// Flags each command accepts (FUA on every command: clients are known to set it).
fn allowed_flags(cmd: u16, neg: &Negotiated) -> u16 {
    match cmd {
        CMD_READ if neg.structured => CMD_FLAG_FUA | CMD_FLAG_DF,
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        CMD_BLOCK_STATUS => CMD_FLAG_FUA | CMD_FLAG_REQ_ONE,
        _ => CMD_FLAG_FUA,
    }
}

/// Check a request before anything is paid for or read, returning the error reply it
/// deserves.
fn validate(sh: &Shared, neg: &Negotiated, r: &Request) -> Option<(u32, &'static str)> {
    let writes = matches!(r.cmd, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    let known = matches!(
        r.cmd,
        CMD_READ | CMD_WRITE | CMD_FLUSH | CMD_TRIM | CMD_WRITE_ZEROES | CMD_BLOCK_STATUS
    );
    if !known {
        return Some((EINVAL, "unknown command"));
    }
    if r.flags & !allowed_flags(r.cmd, neg) != 0 {
        return Some((EINVAL, "flag not valid for this command"));
    }
    if writes && sh.read_only {
        return Some((EPERM, "the export is read-only"));
    }
    if matches!(r.cmd, CMD_READ | CMD_WRITE) && r.len as usize > MAX_REQUEST_LEN {
        return Some((EINVAL, "request longer than the maximum block size"));
    }
    if r.cmd == CMD_BLOCK_STATUS {
        if !neg.structured || !neg.base_allocation {
            return Some((EINVAL, "no metadata context was negotiated"));
        }
        if r.len == 0 {
            return Some((EINVAL, "zero-length block status"));
        }
    }
    if r.cmd != CMD_FLUSH && r.off.checked_add(r.len as u64).is_none_or(|e| e > sh.size) {
        return Some((EINVAL, "request beyond the end of the export"));
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Device calls (run on the blocking pool)

/// What a device call has to do.
enum Work {
    /// `buf` (at least the request's length) comes from the pool; without one the job
    /// allocates only if some part of the range has to be read.
    Read {
        buf: Option<Vec<u8>>,
        sparse: bool,
    },
    Write {
        buf: Vec<u8>,
        fua: bool,
    },
    Flush,
    Trim {
        fua: bool,
    },
    Zeroes {
        may_unmap: bool,
        fua: bool,
    },
    BlockStatus {
        req_one: bool,
    },
}

/// A validated request, paid for, waiting for an io slot.
struct Job {
    req: Request,
    work: Work,
    mem: Option<OwnedSemaphorePermit>,
}

/// One run of a READ reply, relative to the request's offset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    rel: u32,
    len: u32,
    /// Reads as zeros: sent as an OFFSET_HOLE chunk, nothing read.
    hole: bool,
}

/// The result of one request, before it is encoded.
enum Outcome {
    /// Success without data; a WRITE hands its payload buffer back for the pool.
    Done {
        buf: Option<Vec<u8>>,
    },
    /// READ: `pieces` cover the request in order; data pieces are in `buf` at `rel`.
    Data {
        buf: Option<Vec<u8>>,
        pieces: Vec<Piece>,
    },
    Status(Vec<(u32, u32)>),
    Fail(u32, String),
}

/// A finished device call, sent back to the connection task.
struct Done {
    req: Request,
    outcome: Outcome,
    mem: Option<OwnedSemaphorePermit>,
}

fn fail(e: vmdisk_block::Error) -> Outcome {
    Outcome::Fail(errno_of(&e), e.to_string())
}

/// base:allocation flags of one extent kind.
fn state_flags(kind: ExtentKind) -> u32 {
    match kind {
        ExtentKind::Data => 0,
        ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
    }
}

fn block_status(dev: &dyn BlockDevice, off: u64, len: u64, req_one: bool) -> Outcome {
    let len = len.min(MAX_BLOCK_STATUS_LEN);
    let extents = match dev.block_status(off, len) {
        Ok(e) => e,
        Err(e) => return fail(e),
    };
    let mut descs: Vec<(u32, u32)> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        // Clip to the request: extents must lie within it, and each length fits a u32
        // because `len` is at most MAX_BLOCK_STATUS_LEN (< 4 GiB).
        let start = e.off.max(off + covered);
        let end = e.end().min(off + len);
        if end <= start {
            continue;
        }
        let l = (end - start) as u32;
        let f = state_flags(e.kind);
        covered += l as u64;
        match descs.last_mut() {
            Some(last) if last.1 == f => last.0 += l,
            _ => {
                if descs.len() == MAX_BLOCK_STATUS_DESCRIPTORS {
                    break;
                }
                descs.push((l, f));
            }
        }
    }
    if descs.is_empty() {
        return Outcome::Fail(EIO, "device reported no extents".into());
    }
    if req_one {
        descs.truncate(1);
    }
    Outcome::Status(descs)
}

/// Append `[start, end)` (relative, `hole` or data) to `runs`, merging with the last run.
fn push_run(runs: &mut Vec<Piece>, start: u64, end: u64, hole: bool) {
    if end <= start {
        return;
    }
    // Offsets are relative to a request of at most MAX_REQUEST_LEN bytes: they fit a u32.
    let (rel, len) = (start as u32, (end - start) as u32);
    match runs.last_mut() {
        Some(last) if last.hole == hole && last.rel + last.len == rel => last.len += len,
        _ => runs.push(Piece { rel, len, hole }),
    }
}

/// Split a read of `[off, off+len)` into data and hole runs from the device's extents. Parts
/// the extents do not describe are read; zero runs shorter than MIN_HOLE_LEN are read unless
/// they are the whole request.
fn plan_read(extents: &[Extent], off: u64, len: u64) -> Vec<Piece> {
    let end = off + len;
    let mut runs = Vec::new();
    let mut pos = off;
    for e in extents {
        let s = e.off.max(pos);
        let t = e.end().min(end);
        if t <= s {
            continue;
        }
        push_run(&mut runs, pos - off, s - off, false);
        push_run(&mut runs, s - off, t - off, e.reads_as_zero());
        pos = t;
    }
    push_run(&mut runs, pos - off, end - off, false);
    if runs.len() > 1 && runs.iter().any(|r| r.hole && (r.len as u64) < MIN_HOLE_LEN) {
        let mut merged = Vec::with_capacity(runs.len());
        for r in runs {
            let hole = r.hole && r.len as u64 >= MIN_HOLE_LEN;
            push_run(&mut merged, r.rel as u64, r.rel as u64 + r.len as u64, hole);
        }
        runs = merged;
    }
    runs
}

fn read(
    dev: &dyn BlockDevice,
    off: u64,
    len: usize,
    buf: Option<Vec<u8>>,
    sparse: bool,
) -> Outcome {
    if len == 0 {
        return Outcome::Data {
            buf,
            pieces: Vec::new(),
        };
    }
    let whole = || {
        vec![Piece {
            rel: 0,
            len: len as u32,
            hole: false,
        }]
    };
    let pieces = if sparse {
        // If the status cannot be had, read everything: the read reports its own error.
        dev.block_status(off, len as u64)
            .map_or_else(|_| whole(), |ext| plan_read(&ext, off, len as u64))
    } else {
        whole()
    };
    let mut buf = buf;
    for p in pieces.iter().filter(|p| !p.hole) {
        let b = buf.get_or_insert_with(|| vec![0u8; len]);
        let (s, e) = (p.rel as usize, p.rel as usize + p.len as usize);
        if let Err(err) = dev.read_exact_at(&mut b[s..e], off + p.rel as u64) {
            return fail(err);
        }
    }
    Outcome::Data { buf, pieces }
}

fn run(dev: &dyn BlockDevice, req: &Request, work: Work) -> Outcome {
    let (off, len) = (req.off, req.len as usize);
    let done = |r: vmdisk_block::Result<()>, buf: Option<Vec<u8>>| match r {
        Ok(()) => Outcome::Done { buf },
        Err(e) => fail(e),
    };
    let then_flush = |fua: bool| if fua { dev.flush() } else { Ok(()) };
    match work {
        Work::Read { buf, sparse } => read(dev, off, len, buf, sparse),
        Work::Write { buf, fua } => {
            let r = dev
                .write_all_at(&buf[..len], off)
                .and_then(|()| then_flush(fua));
            done(r, Some(buf))
        }
        Work::Flush => done(dev.flush(), None),
        Work::Trim { fua } => {
            let r = if len == 0 {
                Ok(())
            } else {
                dev.discard(off, len as u64)
            };
            done(r.and_then(|()| then_flush(fua)), None)
        }
        Work::Zeroes { may_unmap, fua } => {
            let r = if len == 0 {
                Ok(())
            } else {
                dev.write_zeroes(off, len as u64, may_unmap)
            };
            done(r.and_then(|()| then_flush(fua)), None)
        }
        Work::BlockStatus { req_one } => block_status(dev, off, len as u64, req_one),
    }
}

// ---------------------------------------------------------------------------------------------
// Buffers

/// Idle request buffers of one connection. Every buffer is fully initialised (zeroed when it
/// was allocated) and at least as long as the request it is handed to.
#[derive(Default)]
struct BufPool {
    free: Vec<Vec<u8>>,
    bytes: usize,
}

impl BufPool {
    /// The smallest idle buffer of at least `len` bytes.
    fn take(&mut self, len: usize) -> Option<Vec<u8>> {
        if len == 0 {
            return None;
        }
        let i = (0..self.free.len())
            .filter(|&i| self.free[i].len() >= len)
            .min_by_key(|&i| self.free[i].len())?;
        let b = self.free.swap_remove(i);
        self.bytes -= b.len();
        Some(b)
    }

    fn give(&mut self, b: Vec<u8>) {
        let n = b.len();
        if n == 0
            || n > POOL_MAX_BUFFER
            || self.bytes + n > POOL_BYTES
            || self.free.len() >= MAX_IN_FLIGHT
        {
            return;
        }
        self.bytes += n;
        self.free.push(b);
    }
}

/// Buffered input: request headers are parsed from here, small payloads copied out.
struct InBuf {
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl InBuf {
    fn new() -> InBuf {
        InBuf {
            buf: vec![0u8; INPUT_BUFFER_LEN].into_boxed_slice(),
            start: 0,
            end: 0,
        }
    }

    fn len(&self) -> usize {
        self.end - self.start
    }

    fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Receive more bytes; `Ok(0)` is end of file. Only called with less than a header
    /// buffered, so moving the rest to the front is cheap and always leaves room.
    fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<usize>> {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        let mut rb = ReadBuf::new(&mut self.buf[self.end..]);
        ready!(Pin::new(r).poll_read(cx, &mut rb))?;
        let n = rb.filled().len();
        self.end += n;
        Poll::Ready(Ok(n))
    }
}

// ---------------------------------------------------------------------------------------------
// Replies

/// A range of an [`OutMsg`]: its header bytes or its data buffer.
#[derive(Debug, Clone, Copy)]
struct Seg {
    from_buf: bool,
    start: usize,
    end: usize,
}

/// One whole reply, written contiguously (replies may interleave between requests, never
/// within one).
#[derive(Default)]
struct OutMsg {
    head: Vec<u8>,
    segs: Vec<Seg>,
    /// READ data, back to the pool once written.
    buf: Option<Vec<u8>>,
    /// The request's memory budget, released once written.
    _mem: Option<OwnedSemaphorePermit>,
}

impl OutMsg {
    fn head(&mut self, bytes: &[u8]) {
        let start = self.head.len();
        self.head.extend_from_slice(bytes);
        self.segs.push(Seg {
            from_buf: false,
            start,
            end: self.head.len(),
        });
    }

    fn data(&mut self, start: usize, end: usize) {
        self.segs.push(Seg {
            from_buf: true,
            start,
            end,
        });
    }

    fn bytes(&self, s: &Seg) -> &[u8] {
        if s.from_buf {
            // Data segments exist only with a buffer (see encode_reply).
            self.buf.as_deref().map_or(&[][..], |b| &b[s.start..s.end])
        } else {
            &self.head[s.start..s.end]
        }
    }
}

/// Encode the reply to `req`.
fn encode_reply(structured: bool, req: &Request, outcome: Outcome) -> OutMsg {
    let cookie = req.cookie;
    let len = req.len as usize;
    let mut m = OutMsg::default();
    if !structured {
        match outcome {
            Outcome::Done { .. } | Outcome::Status(_) => m.head(&encode_simple_reply(0, cookie)),
            Outcome::Data { buf, pieces } => {
                m.head(&encode_simple_reply(0, cookie));
                if len > 0 {
                    // Simple replies carry every byte: reads are never sparse here, but
                    // zero-fill holes all the same should one appear.
                    let mut b = buf.unwrap_or_else(|| vec![0u8; len]);
                    for p in pieces.iter().filter(|p| p.hole) {
                        b[p.rel as usize..(p.rel + p.len) as usize].fill(0);
                    }
                    m.buf = Some(b);
                    m.data(0, len);
                }
            }
            Outcome::Fail(e, _) => m.head(&encode_simple_reply(e, cookie)),
        }
        return m;
    }
    match outcome {
        Outcome::Data { buf, pieces } if !pieces.is_empty() => {
            let n = pieces.len();
            let buf = match buf {
                Some(b) => Some(b),
                None if pieces.iter().any(|p| !p.hole) => Some(vec![0u8; len]),
                None => None,
            };
            m.buf = buf;
            for (i, p) in pieces.iter().enumerate() {
                let flags = if i + 1 == n { REPLY_FLAG_DONE } else { 0 };
                let at = req.off + p.rel as u64;
                if p.hole {
                    m.head(&encode_offset_hole_chunk(cookie, flags, at, p.len));
                } else {
                    m.head(&encode_offset_data_start(cookie, flags, at, p.len));
                    m.data(p.rel as usize, (p.rel + p.len) as usize);
                }
            }
        }
        Outcome::Done { .. } | Outcome::Data { .. } => m.head(&encode_chunk_header(&ChunkHeader {
            flags: REPLY_FLAG_DONE,
            kind: REPLY_TYPE_NONE,
            cookie,
            len: 0,
        })),
        Outcome::Status(descs) => m.head(&encode_block_status_chunk(
            cookie,
            REPLY_FLAG_DONE,
            META_BASE_ALLOCATION_ID,
            &descs,
        )),
        Outcome::Fail(e, msg) => m.head(&encode_error_chunk(cookie, e, &msg)),
    }
    m
}

/// Replies waiting to be written, and how far the first one got.
#[derive(Default)]
struct OutQueue {
    msgs: VecDeque<OutMsg>,
    seg: usize,
    pos: usize,
}

impl OutQueue {
    fn is_empty(&self) -> bool {
        self.msgs.is_empty()
    }

    /// Fill `iov` with what is left to write, in order; the number of slices used.
    fn gather<'a>(&'a self, iov: &mut [IoSlice<'a>]) -> usize {
        let mut n = 0;
        for (i, m) in self.msgs.iter().enumerate() {
            let first = if i == 0 { self.seg } else { 0 };
            for (j, s) in m.segs.iter().enumerate().skip(first) {
                if n == iov.len() {
                    return n;
                }
                let mut b = m.bytes(s);
                if i == 0 && j == self.seg {
                    b = &b[self.pos..];
                }
                if !b.is_empty() {
                    iov[n] = IoSlice::new(b);
                    n += 1;
                }
            }
        }
        n
    }

    /// Account for `n` bytes written; each reply written in full goes to `done`.
    fn advance(&mut self, mut n: usize, mut done: impl FnMut(OutMsg)) {
        while let Some(m) = self.msgs.front() {
            while self.seg < m.segs.len() {
                let s = &m.segs[self.seg];
                let left = s.end - s.start - self.pos;
                if n < left {
                    self.pos += n;
                    return;
                }
                n -= left;
                self.seg += 1;
                self.pos = 0;
            }
            self.seg = 0;
            if let Some(m) = self.msgs.pop_front() {
                done(m);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The connection

/// Where the reading side is.
enum ReadState {
    /// Waiting for the next request header.
    Header,
    /// Waiting for memory budget for `req` (paid before its buffer is allocated).
    Budget { req: Request, fut: Acquire },
    /// Reading a WRITE payload into `buf`.
    Payload {
        req: Request,
        mem: Option<OwnedSemaphorePermit>,
        buf: Vec<u8>,
        filled: usize,
    },
    /// Throwing away the payload of a refused WRITE, then answering it.
    Drain {
        req: Request,
        left: usize,
        errno: u32,
        why: &'static str,
    },
}

struct Conn<S> {
    sh: Arc<Shared>,
    neg: Negotiated,
    /// The connection has a thread of its own: device calls may run inline when idle.
    inline_ok: bool,
    io: S,
    inb: InBuf,
    rstate: ReadState,
    /// False after DISC, end of input, a bad magic, a server stop or a broken connection.
    reading: bool,
    stop: Pin<Box<dyn Future<Output = ()> + Send>>,
    /// Paid-for requests waiting for an io slot, in arrival order.
    queued: VecDeque<Job>,
    /// The io slot being waited for on behalf of `queued[0]`.
    io_wait: Option<Acquire>,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    /// Jobs on the blocking pool.
    running: usize,
    out: OutQueue,
    flush_pending: bool,
    /// Requests read and not yet answered in full (at most MAX_IN_FLIGHT).
    inflight: usize,
    pool: BufPool,
    wrote: bool,
    /// Writing a reply failed: nothing more is read or written.
    broken: bool,
}

/// Serve requests on `io` until the client disconnects, the input ends or breaks, or the
/// server stops; then finish and answer every request in flight, flush the device if this
/// connection wrote, and close. `own_thread`: no other client is served on this thread.
pub(crate) async fn transmission<S>(
    sh: Arc<Shared>,
    io: S,
    neg: Negotiated,
    mut stop: watch::Receiver<bool>,
    own_thread: bool,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (done_tx, done_rx) = mpsc::unbounded_channel();
    let mut c = Conn {
        sh,
        neg,
        inline_ok: own_thread,
        io,
        inb: InBuf::new(),
        rstate: ReadState::Header,
        reading: true,
        stop: Box::pin(async move { stopped(&mut stop).await }),
        queued: VecDeque::new(),
        io_wait: None,
        done_tx,
        done_rx,
        running: 0,
        out: OutQueue::default(),
        flush_pending: false,
        inflight: 0,
        pool: BufPool::default(),
        wrote: false,
        broken: false,
    };
    std::future::poll_fn(|cx| c.poll_run(cx)).await;
    if c.wrote {
        if let Ok(slot) = c.sh.io_slots.clone().acquire_owned().await {
            let dev = c.sh.dev.clone();
            let flushed = tokio::task::spawn_blocking(move || {
                let r = dev.flush();
                drop(slot);
                r
            })
            .await;
            if flushed.is_err_and(|e| e.is_panic()) {
                c.sh.counters.panics.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    let _ = c.io.shutdown().await;
}

impl<S> Conn<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            let mut progress = false;
            while let Poll::Ready(Some(done)) = self.done_rx.poll_recv(cx) {
                self.running -= 1;
                self.finish(done);
                progress = true;
            }
            progress |= self.poll_admit(cx);
            progress |= self.poll_write(cx);
            if self.reading {
                progress |= self.poll_read(cx);
                progress |= self.poll_admit(cx);
            }
            let idle_out = self.broken || (self.out.is_empty() && !self.flush_pending);
            if !self.reading && self.running == 0 && self.queued.is_empty() && idle_out {
                return Poll::Ready(());
            }
            if !progress {
                return Poll::Pending;
            }
        }
    }

    fn stop_reading(&mut self) {
        self.reading = false;
        self.rstate = ReadState::Header;
    }

    fn set_broken(&mut self) {
        self.broken = true;
        self.stop_reading();
        self.queued.clear();
        self.io_wait = None;
        self.out = OutQueue::default();
        self.flush_pending = false;
    }

    fn reply(&mut self, req: &Request, outcome: Outcome, mem: Option<OwnedSemaphorePermit>) {
        if self.broken {
            return;
        }
        let mut m = encode_reply(self.neg.structured, req, outcome);
        m._mem = mem;
        self.out.msgs.push_back(m);
    }

    fn reply_error(&mut self, req: &Request, errno: u32, why: &str) {
        self.reply(req, Outcome::Fail(errno, why.into()), None);
    }

    /// A device call finished: count it and queue its reply.
    fn finish(&mut self, done: Done) {
        let Done {
            req,
            mut outcome,
            mem,
        } = done;
        let c = &self.sh.counters;
        match &mut outcome {
            Outcome::Data { .. } => {
                c.bytes_read.fetch_add(req.len as u64, Ordering::Relaxed);
            }
            Outcome::Fail(..) => {
                c.request_errors.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Done { buf } => {
                if req.cmd == CMD_WRITE {
                    c.bytes_written.fetch_add(req.len as u64, Ordering::Relaxed);
                }
                if let Some(b) = buf.take() {
                    self.pool.give(b);
                }
            }
            Outcome::Status(_) => {}
        }
        self.reply(&req, outcome, mem);
    }

    /// Hand queued requests to the blocking pool as io slots allow.
    fn poll_admit(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while !self.queued.is_empty() {
            let slot = match self.io_wait.as_mut() {
                Some(w) => match w.as_mut().poll(cx) {
                    Poll::Pending => break,
                    Poll::Ready(r) => {
                        self.io_wait = None;
                        r.ok()
                    }
                },
                None => match self.sh.io_slots.clone().try_acquire_owned() {
                    Ok(p) => Some(p),
                    Err(TryAcquireError::NoPermits) => {
                        self.io_wait = Some(Box::pin(self.sh.io_slots.clone().acquire_owned()));
                        continue;
                    }
                    Err(TryAcquireError::Closed) => None,
                },
            };
            let Some(job) = self.queued.pop_front() else {
                break;
            };
            progress = true;
            match slot {
                Some(slot) => self.spawn(job, slot),
                None => {
                    let Job { req, mem, .. } = job;
                    let why = "server is shutting down";
                    self.finish(Done {
                        req,
                        outcome: Outcome::Fail(ESHUTDOWN, why.into()),
                        mem,
                    });
                }
            }
        }
        progress
    }

    fn spawn(&mut self, job: Job, slot: OwnedSemaphorePermit) {
        let Job { req, work, mem } = job;
        if matches!(
            work,
            Work::Write { .. } | Work::Trim { .. } | Work::Zeroes { .. }
        ) {
            self.wrote = true;
        }
        // With nothing else to do (no other job, no request waiting, no reply to write), the
        // connection's own thread makes the call: a hand-off to the blocking pool and back
        // would only add latency, and no other client shares this thread.
        let idle = self.inline_ok
            && self.running == 0
            && self.queued.is_empty()
            && self.out.is_empty()
            && self.inb.len() < REQUEST_LEN;
        if idle {
            let outcome = catch_unwind(AssertUnwindSafe(|| run(&*self.sh.dev, &req, work)))
                .unwrap_or_else(|_| {
                    self.sh.counters.panics.fetch_add(1, Ordering::Relaxed);
                    Outcome::Fail(EIO, "internal error".into())
                });
            drop(slot);
            self.finish(Done { req, outcome, mem });
            return;
        }
        let sh = self.sh.clone();
        let tx = self.done_tx.clone();
        self.running += 1;
        tokio::task::spawn_blocking(move || {
            let outcome = catch_unwind(AssertUnwindSafe(|| run(&*sh.dev, &req, work)))
                .unwrap_or_else(|_| {
                    sh.counters.panics.fetch_add(1, Ordering::Relaxed);
                    Outcome::Fail(EIO, "internal error".into())
                });
            drop(slot);
            // The receiver lives as long as the connection task, which waits for every job.
            let _ = tx.send(Done { req, outcome, mem });
        });
    }

    /// Write as much of the reply queue as the stream takes.
    fn poll_write(&mut self, cx: &mut Context<'_>) -> bool {
        let mut progress = false;
        while !self.out.is_empty() && !self.broken {
            let mut iov = [IoSlice::new(&[]); MAX_IOVECS];
            let n = self.out.gather(&mut iov);
            match Pin::new(&mut self.io).poll_write_vectored(cx, &iov[..n]) {
                Poll::Pending => return progress,
                Poll::Ready(Ok(k)) if k > 0 || n == 0 => {
                    let (pool, inflight) = (&mut self.pool, &mut self.inflight);
                    self.out.advance(k, |m| {
                        if let Some(b) = m.buf {
                            pool.give(b);
                        }
                        *inflight -= 1;
                    });
                    self.flush_pending = true;
                    progress = true;
                }
                Poll::Ready(_) => {
                    self.set_broken();
                    return true;
                }
            }
        }
        if self.flush_pending && self.out.is_empty() && !self.broken {
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Pending => {}
                Poll::Ready(Ok(())) => {
                    self.flush_pending = false;
                    progress = true;
                }
                Poll::Ready(Err(_)) => {
                    self.set_broken();
                    progress = true;
                }
            }
        }
        progress
    }

    /// Read and dispatch requests until the input runs dry or MAX_IN_FLIGHT is reached.
    fn poll_read(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stop.as_mut().poll(cx).is_ready() {
            self.stop_reading();
            return true;
        }
        let mut progress = false;
        while self.reading {
            match &mut self.rstate {
                ReadState::Header => {
                    if self.inflight >= MAX_IN_FLIGHT {
                        // A reply written in full wakes this loop again.
                        return progress;
                    }
                    if self.inb.len() < REQUEST_LEN {
                        match self.inb.poll_fill(&mut self.io, cx) {
                            Poll::Pending => return progress,
                            Poll::Ready(Ok(n)) if n > 0 => {
                                progress = true;
                                continue;
                            }
                            // End of input or an error, possibly mid-header: nothing more.
                            Poll::Ready(_) => {
                                self.stop_reading();
                                return true;
                            }
                        }
                    }
                    let mut hb = [0u8; REQUEST_LEN];
                    hb.copy_from_slice(&self.inb.data()[..REQUEST_LEN]);
                    self.inb.consume(REQUEST_LEN);
                    progress = true;
                    self.on_header(&hb);
                }
                ReadState::Budget { fut, .. } => {
                    let Poll::Ready(r) = fut.as_mut().poll(cx) else {
                        return progress;
                    };
                    progress = true;
                    let ReadState::Budget { req, .. } =
                        std::mem::replace(&mut self.rstate, ReadState::Header)
                    else {
                        unreachable!("matched above");
                    };
                    match r {
                        Ok(mem) => self.admit(req, Some(mem)),
                        // The budget is never closed while connections run.
                        Err(_) => self.stop_reading(),
                    }
                }
                ReadState::Payload {
                    req, buf, filled, ..
                } => {
                    let len = req.len as usize;
                    let take = self.inb.len().min(len - *filled);
                    if take > 0 {
                        buf[*filled..*filled + take].copy_from_slice(&self.inb.data()[..take]);
                        self.inb.consume(take);
                        *filled += take;
                        progress = true;
                    }
                    if *filled < len {
                        // The rest goes straight into the payload: never past it.
                        let mut rb = ReadBuf::new(&mut buf[*filled..len]);
                        match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                            Poll::Pending => return progress,
                            Poll::Ready(Ok(())) if !rb.filled().is_empty() => {
                                *filled += rb.filled().len();
                                progress = true;
                                continue;
                            }
                            Poll::Ready(_) => {
                                self.stop_reading();
                                return true;
                            }
                        }
                    }
                    let ReadState::Payload { req, mem, buf, .. } =
                        std::mem::replace(&mut self.rstate, ReadState::Header)
                    else {
                        unreachable!("matched above");
                    };
                    let fua = req.flags & CMD_FLAG_FUA != 0;
                    self.queued.push_back(Job {
                        req,
                        work: Work::Write { buf, fua },
                        mem,
                    });
                    progress = true;
                }
                ReadState::Drain { left, .. } => {
                    let take = self.inb.len().min(*left);
                    self.inb.consume(take);
                    *left -= take;
                    if *left > 0 {
                        match self.inb.poll_fill(&mut self.io, cx) {
                            Poll::Pending => return progress,
                            Poll::Ready(Ok(n)) if n > 0 => {
                                progress = true;
                                continue;
                            }
                            Poll::Ready(_) => {
                                self.stop_reading();
                                return true;
                            }
                        }
                    }
                    let ReadState::Drain {
                        req, errno, why, ..
                    } = std::mem::replace(&mut self.rstate, ReadState::Header)
                    else {
                        unreachable!("matched above");
                    };
                    self.reply_error(&req, errno, why);
                    progress = true;
                }
            }
        }
        true
    }

    /// A request header arrived.
    fn on_header(&mut self, hb: &[u8; REQUEST_LEN]) {
        let c = &self.sh.counters;
        let Some(req) = decode_request(hb) else {
            // A bad magic cannot be answered (there is no cookie to trust) or resynchronised.
            c.protocol_errors.fetch_add(1, Ordering::Relaxed);
            self.stop_reading();
            return;
        };
        c.requests.fetch_add(1, Ordering::Relaxed);
        if req.cmd == CMD_DISC {
            self.stop_reading();
            return;
        }
        self.inflight += 1;
        if let Some((errno, why)) = validate(&self.sh, &self.neg, &req) {
            c.request_errors.fetch_add(1, Ordering::Relaxed);
            if req.cmd == CMD_WRITE {
                if req.len as usize > MAX_REQUEST_LEN {
                    // Too big to drain politely: answer, then close.
                    self.reply_error(&req, errno, why);
                    self.stop_reading();
                    return;
                }
                self.rstate = ReadState::Drain {
                    req,
                    left: req.len as usize,
                    errno,
                    why,
                };
                return;
            }
            self.reply_error(&req, errno, why);
            return;
        }
        // Pay for the buffer before allocating it.
        let need = if matches!(req.cmd, CMD_READ | CMD_WRITE) {
            req.len
        } else {
            0
        };
        if need == 0 {
            self.admit(req, None);
            return;
        }
        let budget = &self.sh.mem_budget;
        match budget.clone().try_acquire_many_owned(need) {
            Ok(mem) => self.admit(req, Some(mem)),
            Err(TryAcquireError::NoPermits) => {
                let fut = Box::pin(budget.clone().acquire_many_owned(need));
                self.rstate = ReadState::Budget { req, fut };
            }
            Err(TryAcquireError::Closed) => self.stop_reading(),
        }
    }

    /// A valid, paid-for request: queue its job (a WRITE reads its payload first).
    fn admit(&mut self, req: Request, mem: Option<OwnedSemaphorePermit>) {
        let len = req.len as usize;
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let work = match req.cmd {
            CMD_READ => Work::Read {
                buf: self.pool.take(len),
                sparse: self.neg.structured && req.flags & CMD_FLAG_DF == 0,
            },
            CMD_WRITE => {
                let buf = self.pool.take(len).unwrap_or_else(|| vec![0u8; len]);
                self.rstate = ReadState::Payload {
                    req,
                    mem,
                    buf,
                    filled: 0,
                };
                return;
            }
            CMD_FLUSH => Work::Flush,
            CMD_TRIM => Work::Trim { fua },
            CMD_WRITE_ZEROES => Work::Zeroes {
                may_unmap: req.flags & CMD_FLAG_NO_HOLE == 0,
                fua,
            },
            CMD_BLOCK_STATUS => Work::BlockStatus {
                req_one: req.flags & CMD_FLAG_REQ_ONE != 0,
            },
            // validate() only lets the commands above through.
            _ => {
                self.reply_error(&req, EINVAL, "unknown command");
                return;
            }
        };
        self.queued.push_back(Job { req, work, mem });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(off: u64, len: u64, kind: ExtentKind) -> Extent {
        Extent::new(off, len, kind)
    }

    fn p(rel: u32, len: u32, hole: bool) -> Piece {
        Piece { rel, len, hole }
    }

    #[test]
    fn plan_read_splits_data_and_holes() {
        use ExtentKind::*;
        let e = [
            ext(0, 65536, Data),
            ext(65536, 65536, Zero),
            ext(131072, 65536, Unallocated),
            ext(196608, 65536, Data),
        ];
        // Clipped to the request; Zero and Unallocated merge into one hole.
        assert_eq!(
            plan_read(&e, 4096, 200_000),
            vec![
                p(0, 61440, false),
                p(61440, 131072, true),
                p(192512, 7488, false)
            ]
        );
        // A request inside one hole is one hole, however short.
        assert_eq!(plan_read(&e, 70_000, 512), vec![p(0, 512, true)]);
        // Short holes between data are read; so are parts no extent describes.
        let e = [
            ext(0, 4096, Data),
            ext(4096, 512, Zero),
            ext(4608, 4096, Data),
        ];
        assert_eq!(plan_read(&e, 0, 16384), vec![p(0, 16384, false)]);
    }

    #[test]
    fn reply_chunks_cover_the_read_in_order() {
        let req = Request {
            flags: 0,
            cmd: CMD_READ,
            cookie: 7,
            off: 1 << 20,
            len: 12288,
        };
        let pieces = vec![p(0, 4096, true), p(4096, 4096, false), p(8192, 4096, true)];
        let buf = vec![0xabu8; 12288];
        let m = encode_reply(
            true,
            &req,
            Outcome::Data {
                buf: Some(buf),
                pieces,
            },
        );
        let mut wire = Vec::new();
        for s in &m.segs {
            wire.extend_from_slice(m.bytes(s));
        }
        assert_eq!(wire.len(), 32 + 28 + 4096 + 32);
        assert_eq!(
            &wire[..32],
            &encode_offset_hole_chunk(7, 0, 1 << 20, 4096)[..]
        );
        assert_eq!(
            &wire[32..60],
            &encode_offset_data_start(7, 0, (1 << 20) + 4096, 4096)[..]
        );
        assert!(wire[60..60 + 4096].iter().all(|&b| b == 0xab));
        assert_eq!(
            &wire[60 + 4096..],
            &encode_offset_hole_chunk(7, REPLY_FLAG_DONE, (1 << 20) + 8192, 4096)[..]
        );
        // Simple replies carry the holes as zeros.
        let m = encode_reply(
            false,
            &req,
            Outcome::Data {
                buf: Some(vec![0xab; 12288]),
                pieces: vec![p(0, 4096, true), p(4096, 8192, false)],
            },
        );
        let wire: Vec<u8> = m.segs.iter().flat_map(|s| m.bytes(s).to_vec()).collect();
        assert_eq!(wire.len(), 16 + 12288);
        assert!(wire[16..16 + 4096].iter().all(|&b| b == 0));
        assert!(wire[16 + 4096..].iter().all(|&b| b == 0xab));
    }

    #[test]
    fn out_queue_resumes_mid_segment_and_returns_buffers() {
        let mut q = OutQueue::default();
        for i in 0..3u8 {
            let mut m = OutMsg {
                buf: Some(vec![i; 100]),
                ..OutMsg::default()
            };
            m.head(&[0xee; 10]);
            m.data(0, 100);
            q.msgs.push_back(m);
        }
        let mut all = Vec::new();
        let mut done = 0;
        // Write in awkward steps: 7 bytes at a time.
        while !q.is_empty() {
            let mut iov = [IoSlice::new(&[]); 4];
            let n = q.gather(&mut iov);
            let mut flat: Vec<u8> = iov[..n].iter().flat_map(|s| s.to_vec()).collect();
            flat.truncate(7);
            all.extend_from_slice(&flat);
            q.advance(flat.len(), |m| {
                assert!(m.buf.is_some());
                done += 1;
            });
        }
        assert_eq!(done, 3);
        assert_eq!(all.len(), 330);
        for i in 0..3usize {
            assert!(all[i * 110..i * 110 + 10].iter().all(|&b| b == 0xee));
            assert!(all[i * 110 + 10..(i + 1) * 110]
                .iter()
                .all(|&b| b == i as u8));
        }
    }

    #[test]
    fn pool_keeps_few_bounded_buffers_best_fit() {
        let mut pool = BufPool::default();
        pool.give(vec![0; 8192]);
        pool.give(vec![0; 4096]);
        pool.give(vec![0; POOL_MAX_BUFFER + 1]);
        assert_eq!(pool.bytes, 12288);
        assert_eq!(pool.take(4000).map(|b| b.len()), Some(4096));
        assert_eq!(pool.take(9000), None);
        assert_eq!(pool.take(0), None);
        assert_eq!(pool.take(1).map(|b| b.len()), Some(8192));
        for _ in 0..MAX_IN_FLIGHT + 4 {
            pool.give(vec![0; 1024]);
        }
        assert_eq!(pool.free.len(), MAX_IN_FLIGHT);
    }
}
