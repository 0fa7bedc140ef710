//! `compare`: do two images read the same? qemu-img compare semantics.

use rayon::prelude::*;
use vmdisk_block::{is_zero, BlockDevice, Extent, ExtentKind};

use crate::{Error, Image, Result};

/// Bytes compared per parallel task.
const CHUNK: u64 = 2 << 20;
/// Tasks per batch per thread (bounds memory: 2 buffers of CHUNK per task).
const BATCH_PER_THREAD: usize = 4;
/// How much guest space one `block_status` call covers.
const STATUS_WINDOW: u64 = 1 << 30;
/// qemu reports mismatches at sector granularity.
const SECTOR: u64 = 512;

/// Why two images differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Difference {
    /// The first sector (offset in bytes) whose contents differ.
    Content { offset: u64 },
    /// Strict mode: the sizes differ.
    Size,
    /// Strict mode: the allocation status differs at this offset.
    BlockStatus { offset: u64 },
}

/// Result of comparing two images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Comparison {
    /// The virtual sizes differ (without strict mode the extra part only had to be zero).
    pub size_mismatch: bool,
    pub difference: Option<Difference>,
}

impl Comparison {
    pub fn identical(&self) -> bool {
        self.difference.is_none()
    }
}

/// Compare the guest contents of `a` and `b`.
pub fn compare(a: &Image, b: &Image, strict: bool) -> Result<Comparison> {
    compare_with_progress(a, b, strict, &|_, _| {})
}

/// A range to read: from `a` only, `b` only (the other reads as zeros), or both.
#[derive(Debug, Clone, Copy)]
struct Task {
    off: u64,
    len: u64,
    a: bool,
    b: bool,
}

/// [`compare`], reporting `(done, total)` bytes as it goes.
pub fn compare_with_progress(
    a: &Image,
    b: &Image,
    strict: bool,
    progress: &dyn Fn(u64, u64),
) -> Result<Comparison> {
    let (da, db) = (a.dev(), b.dev());
    let (la, lb) = (da.len(), db.len());
    let size_mismatch = la != lb;
    if strict && size_mismatch {
        return Ok(Comparison {
            size_mismatch,
            difference: Some(Difference::Size),
        });
    }
    let total = la.max(lb);
    let common = la.min(lb);
    let batch = rayon::current_num_threads().max(1) * BATCH_PER_THREAD;
    let mut tasks: Vec<Task> = Vec::new();
    let mut pos = 0;
    let found = |d| {
        Ok(Comparison {
            size_mismatch,
            difference: Some(d),
        })
    };
    progress(0, total);
    while pos < total {
        let n = STATUS_WINDOW.min(if pos < common {
            common - pos
        } else {
            total - pos
        });
        let ea = status(&*da, a, pos, n, la)?;
        let eb = status(&*db, b, pos, n, lb)?;
        let (mut i, mut j) = (0, 0);
        let mut at = pos;
        while at < pos + n {
            let ka = kind_at(&ea, &mut i, at);
            let kb = kind_at(&eb, &mut j, at);
            let end = ka.1.min(kb.1);
            if strict && ka.0 != kb.0 {
                return found(Difference::BlockStatus { offset: at });
            }
            let need_a = ka.0 == Some(ExtentKind::Data);
            let need_b = kb.0 == Some(ExtentKind::Data);
            let mut off = at;
            while (need_a || need_b) && off < end {
                let len = CHUNK.min(end - off);
                tasks.push(Task {
                    off,
                    len,
                    a: need_a,
                    b: need_b,
                });
                off += len;
                if tasks.len() >= batch {
                    if let Some(o) = run(&tasks, &*da, &*db, a, b)? {
                        return found(Difference::Content { offset: o });
                    }
                    tasks.clear();
                    progress(off, total);
                }
            }
            at = end;
        }
        pos += n;
        if let Some(o) = run(&tasks, &*da, &*db, a, b)? {
            return found(Difference::Content { offset: o });
        }
        tasks.clear();
        progress(pos, total);
    }
    Ok(Comparison {
        size_mismatch,
        difference: None,
    })
}

/// Extents of `[off, off+n)` of `dev`, or nothing past its end.
fn status(dev: &dyn BlockDevice, img: &Image, off: u64, n: u64, len: u64) -> Result<Vec<Extent>> {
    if off >= len {
        return Ok(Vec::new());
    }
    dev.block_status(off, n.min(len - off))
        .map_err(Error::image("reading the allocation of", img.path()))
}

/// The kind at `at` (None past the device's end) and where that run ends.
fn kind_at(ext: &[Extent], i: &mut usize, at: u64) -> (Option<ExtentKind>, u64) {
    while *i < ext.len() && ext[*i].end() <= at {
        *i += 1;
    }
    match ext.get(*i) {
        Some(e) => (Some(e.kind), e.end()),
        None => (None, u64::MAX),
    }
}

/// Compare a batch in parallel; the lowest mismatching offset wins.
fn run(
    tasks: &[Task],
    da: &dyn BlockDevice,
    db: &dyn BlockDevice,
    a: &Image,
    b: &Image,
) -> Result<Option<u64>> {
    let r: Vec<Option<u64>> = tasks
        .par_iter()
        .map(|t| -> Result<Option<u64>> {
            let read = |dev: &dyn BlockDevice, img: &Image| -> Result<Vec<u8>> {
                let mut buf = vec![0u8; t.len as usize];
                dev.read_exact_at(&mut buf, t.off)
                    .map_err(Error::image("reading", img.path()))?;
                Ok(buf)
            };
            let first = match (t.a, t.b) {
                (true, true) => {
                    let (x, y) = (read(da, a)?, read(db, b)?);
                    x.iter().zip(&y).position(|(p, q)| p != q)
                }
                (true, false) => first_nonzero(&read(da, a)?),
                (false, true) => first_nonzero(&read(db, b)?),
                (false, false) => None,
            };
            Ok(first.map(|i| (t.off + i as u64) / SECTOR * SECTOR))
        })
        .collect::<Result<_>>()?;
    Ok(r.into_iter().flatten().min())
}

fn first_nonzero(buf: &[u8]) -> Option<usize> {
    if is_zero(buf) {
        return None;
    }
    buf.iter().position(|&b| b != 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{create, open, CreateSpec, Format, OpenOptions};

    fn img(dir: &std::path::Path, name: &str, size: u64, writes: &[(u64, u8, usize)]) -> Image {
        let p = dir.join(name);
        create(&p, &CreateSpec::new(Format::Raw, size)).unwrap();
        {
            let i = open(&p, &OpenOptions::default()).unwrap();
            for &(off, v, n) in writes {
                i.dev().write_all_at(&vec![v; n], off).unwrap();
            }
        }
        open(&p, &OpenOptions::read_only()).unwrap()
    }

    #[test]
    fn identical_and_different() {
        let d = tempfile::tempdir().unwrap();
        let a = img(d.path(), "a", 8 << 20, &[(1 << 20, 1, 4096)]);
        let b = img(d.path(), "b", 8 << 20, &[(1 << 20, 1, 4096)]);
        assert!(compare(&a, &b, false).unwrap().identical());
        assert!(compare(&a, &b, true).unwrap().identical());
        let c = img(
            d.path(),
            "c",
            8 << 20,
            &[(1 << 20, 1, 4096), (5 << 20 | 1000, 2, 1)],
        );
        assert_eq!(
            compare(&a, &c, false).unwrap().difference,
            Some(Difference::Content {
                offset: 5 << 20 | 512
            })
        );
        // Allocated zeros equal a hole, except in strict mode.
        let z = img(
            d.path(),
            "z",
            8 << 20,
            &[(1 << 20, 1, 4096), (6 << 20, 0, 4096)],
        );
        assert!(compare(&a, &z, false).unwrap().identical());
        assert!(matches!(
            compare(&a, &z, true).unwrap().difference,
            Some(Difference::BlockStatus { .. })
        ));
    }

    #[test]
    fn sizes_differ() {
        let d = tempfile::tempdir().unwrap();
        let a = img(d.path(), "a", 10 << 20, &[(1 << 20, 1, 4096)]);
        let b = img(d.path(), "b", 12 << 20, &[(1 << 20, 1, 4096)]);
        let c = compare(&a, &b, false).unwrap();
        assert!(c.identical() && c.size_mismatch);
        assert_eq!(
            compare(&a, &b, true).unwrap().difference,
            Some(Difference::Size)
        );
        let e = img(
            d.path(),
            "e",
            12 << 20,
            &[(1 << 20, 1, 4096), (11 << 20, 9, 512)],
        );
        assert_eq!(
            compare(&a, &e, false).unwrap().difference,
            Some(Difference::Content { offset: 11 << 20 })
        );
        assert_eq!(
            compare(&e, &a, false).unwrap().difference,
            Some(Difference::Content { offset: 11 << 20 })
        );
    }
}
