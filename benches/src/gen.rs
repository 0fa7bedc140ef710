//! The benchmark's source images: a seeded, sparse raw image and a qcow2 copy of it.
//!
//! Data sits in scattered extents of 4 KiB .. 8 MiB (log-uniform, 4 KiB aligned). Inside an
//! extent, blocks of 4 KiB .. 256 KiB take one of four contents, by share of bytes:
//! random (incompressible) 25%, word-salad text 45%, "zero-ish" (zeros with a random byte
//! every few hundred) 10%, and all zeros written explicitly 20% — so the tools' sparse
//! detection matters, and zlib shrinks the data about 2-3x overall.
//!
//! Images are cached in the bench dir under a name made of every parameter; a JSON file
//! written last marks a finished set, so an interrupted generation is redone.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

/// Bump when the generated content changes, so stale caches are not reused.
const GEN_VERSION: u32 = 1;
/// Extent and block offsets and lengths are multiples of this.
const ALIGN: u64 = 4096;
const MIN_EXTENT: u64 = 4 << 10;
const MAX_EXTENT: u64 = 8 << 20;
/// Largest block of one kind of content inside an extent.
const MAX_BLOCK_UNITS: u64 = 64; // x ALIGN = 256 KiB
/// Bytes of word-salad text that text blocks are copied from.
const TEXT_POOL: usize = 1 << 20;

const WORDS: &[&str] = &[
    "the",
    "disk",
    "image",
    "cluster",
    "refcount",
    "table",
    "kernel",
    "block",
    "guest",
    "host",
    "error",
    "warning",
    "info",
    "debug",
    "systemd",
    "started",
    "stopped",
    "service",
    "mount",
    "unit",
    "network",
    "address",
    "device",
    "virtio",
    "sector",
    "offset",
    "length",
    "write",
    "read",
    "flush",
    "snapshot",
    "backing",
    "file",
    "qemu",
    "format",
    "allocated",
    "zero",
    "compressed",
    "journal",
    "inode",
    "ext4",
    "partition",
    "boot",
    "loader",
    "entry",
    "config",
    "user",
    "root",
    "session",
    "opened",
    "closed",
    "for",
    "with",
    "from",
    "to",
    "of",
    "and",
    "in",
    "0x1f00",
    "42",
    "2026-11-22",
    "12:00:01",
    "[ok]",
    "/var/log",
];

pub struct Spec {
    pub virtual_size: u64,
    pub data: u64,
    pub seed: u64,
}

/// What was generated (also the cache marker, `<stem>.json`).
#[derive(Clone, Serialize, Deserialize)]
pub struct GenStats {
    pub virtual_size: u64,
    /// Bytes written, explicit zeros included.
    pub data_bytes: u64,
    /// Bytes of all-zero blocks written explicitly.
    pub zero_bytes: u64,
    pub extents: u64,
    pub seed: u64,
}

pub struct Source {
    pub raw: PathBuf,
    pub qcow2: PathBuf,
    pub stats: GenStats,
}

/// Return the cached source images for `spec`, generating them if needed.
pub fn ensure(dir: &Path, spec: &Spec) -> Result<Source> {
    if spec.virtual_size == 0 || align_down(spec.virtual_size) != spec.virtual_size {
        bail!("--size must be a non-zero multiple of {ALIGN}");
    }
    if spec.data > spec.virtual_size {
        bail!("--data is larger than --size");
    }
    let stem = format!(
        "src-v{GEN_VERSION}-{}-{}-seed{}",
        spec.virtual_size, spec.data, spec.seed
    );
    let raw = dir.join(format!("{stem}.raw"));
    let qcow2 = dir.join(format!("{stem}.qcow2"));
    let marker = dir.join(format!("{stem}.json"));
    if raw.is_file() && qcow2.is_file() {
        if let Ok(text) = std::fs::read_to_string(&marker) {
            if let Ok(stats) = serde_json::from_str(&text) {
                eprintln!("source: cached {}", raw.display());
                return Ok(Source { raw, qcow2, stats });
            }
        }
    }
    let _ = std::fs::remove_file(&marker);

    let t = Instant::now();
    eprintln!("source: generating {} ...", raw.display());
    let stats = write_raw(&raw, spec)?;
    eprintln!(
        "source: {:.2} GiB of data in {} extents, {:.1} s",
        stats.data_bytes as f64 / GIB,
        stats.extents,
        t.elapsed().as_secs_f64()
    );
    let status = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(&qcow2)
        .status()
        .context("running qemu-img convert for the qcow2 source")?;
    if !status.success() {
        bail!("qemu-img convert -O qcow2 of the source failed: {status}");
    }
    std::fs::write(&marker, serde_json::to_string_pretty(&stats)?)
        .with_context(|| format!("writing {}", marker.display()))?;
    Ok(Source { raw, qcow2, stats })
}

const GIB: f64 = (1u64 << 30) as f64;

fn write_raw(path: &Path, spec: &Spec) -> Result<GenStats> {
    let tmp = path.with_extension("raw.tmp");
    let mut file = File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    file.set_len(spec.virtual_size)?;

    let mut rng = Rng::new(spec.seed);
    let text = text_pool(&mut rng);
    let mut stats = GenStats {
        virtual_size: spec.virtual_size,
        data_bytes: 0,
        zero_bytes: 0,
        extents: 0,
        seed: spec.seed,
    };
    let mean_extent =
        (MAX_EXTENT - MIN_EXTENT) as f64 / (MAX_EXTENT as f64 / MIN_EXTENT as f64).ln();
    let mut buf = vec![0u8; MAX_EXTENT as usize];
    let mut pos = 0u64;
    while stats.data_bytes < spec.data && pos < spec.virtual_size {
        // Spread the remaining hole evenly over the extents still to come, on average.
        let left = spec.data - stats.data_bytes;
        let extents_left = (left as f64 / mean_extent).ceil() + 1.0;
        let hole_left = (spec.virtual_size - pos).saturating_sub(left);
        let mean_gap = hole_left as f64 / extents_left;
        pos += align_down(rng.below((2.0 * mean_gap) as u64 + 1));
        let len = rng
            .log_uniform(MIN_EXTENT, MAX_EXTENT)
            .min(align_up(left))
            .min(spec.virtual_size.saturating_sub(pos));
        let len = align_down(len);
        if len == 0 {
            break;
        }
        let extent = &mut buf[..len as usize];
        stats.zero_bytes += fill_extent(&mut rng, &text, extent);
        file.write_all_at(extent, pos)
            .with_context(|| format!("writing {}", tmp.display()))?;
        stats.data_bytes += len;
        stats.extents += 1;
        pos += len;
    }
    file.flush()?;
    drop(file);
    std::fs::rename(&tmp, path)?;
    Ok(stats)
}

/// Fill one extent with blocks of mixed content; returns the bytes of all-zero blocks.
fn fill_extent(rng: &mut Rng, text: &[u8], extent: &mut [u8]) -> u64 {
    let mut zeros = 0;
    let mut off = 0;
    while off < extent.len() {
        let len = (ALIGN * (1 + rng.below(MAX_BLOCK_UNITS))) as usize;
        let end = (off + len).min(extent.len());
        let block = &mut extent[off..end];
        match rng.below(100) {
            0..25 => rng.fill(block),
            25..70 => {
                let start = rng.below((text.len() - block.len()) as u64) as usize;
                block.copy_from_slice(&text[start..start + block.len()]);
            }
            70..80 => {
                block.fill(0);
                let mut i = rng.below(512) as usize;
                while i < block.len() {
                    block[i] = rng.next() as u8;
                    i += 1 + rng.below(512) as usize;
                }
            }
            _ => {
                block.fill(0);
                zeros += block.len() as u64;
            }
        }
        off += block.len();
    }
    zeros
}

/// Word salad with log-line-like punctuation; zlib shrinks it roughly 3-4x.
fn text_pool(rng: &mut Rng) -> Vec<u8> {
    let mut text = Vec::with_capacity(TEXT_POOL + 64);
    while text.len() < TEXT_POOL {
        let word = WORDS[rng.below(WORDS.len() as u64) as usize];
        text.extend_from_slice(word.as_bytes());
        text.push(if rng.below(12) == 0 { b'\n' } else { b' ' });
    }
    text.truncate(TEXT_POOL);
    text
}

fn align_down(n: u64) -> u64 {
    n / ALIGN * ALIGN
}

fn align_up(n: u64) -> u64 {
    n.div_ceil(ALIGN) * ALIGN
}

/// xorshift64* seeded through splitmix64: small, fast, deterministic everywhere.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        let mut z = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in `0..n` (0 when `n` is 0); the modulo bias is irrelevant here.
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }

    /// Log-uniform in `lo..=hi`, aligned down to ALIGN.
    fn log_uniform(&mut self, lo: u64, hi: u64) -> u64 {
        let u = (self.next() >> 11) as f64 / (1u64 << 53) as f64;
        let v = (lo as f64) * (hi as f64 / lo as f64).powf(u);
        align_down(v as u64).clamp(lo, hi)
    }

    fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next().to_le_bytes());
        }
        for b in chunks.into_remainder() {
            *b = self.next() as u8;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic_and_aligned() {
        let (mut a, mut b) = (Rng::new(7), Rng::new(7));
        for _ in 0..1000 {
            assert_eq!(a.next(), b.next());
            let n = a.log_uniform(MIN_EXTENT, MAX_EXTENT);
            assert_eq!(n % ALIGN, 0);
            assert!((MIN_EXTENT..=MAX_EXTENT).contains(&n));
            b.log_uniform(MIN_EXTENT, MAX_EXTENT);
        }
    }

    #[test]
    fn extent_mix_has_zeros_and_data() {
        let mut rng = Rng::new(3);
        let text = text_pool(&mut rng);
        let mut buf = vec![1u8; 8 << 20];
        let zeros = fill_extent(&mut rng, &text, &mut buf);
        assert!(zeros > 0 && zeros < buf.len() as u64);
    }
}
