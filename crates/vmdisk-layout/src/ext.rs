//! ext2/3/4 via `mke2fs` on a sparse scratch file, reproducibly, then copied into place.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmdisk_block::{BlockDevice, RawFile};

use crate::error::{Error, JsonPath, Result};
use crate::guid::Guid;
use crate::spec::FsFormat;

/// The fixed clock mke2fs sees (E2FSPROGS_FAKE_TIME, SOURCE_DATE_EPOCH): 1980-01-01T00:00:00Z,
/// the same instant the FAT writer stamps.
pub const FIXED_TIME: u64 = 315_532_800;
/// Directory depth followed when measuring a tree (also stops symlink loops).
const MAX_DEPTH: usize = 4096;

/// A finished filesystem image in the scratch directory, removed on drop.
pub struct ScratchImage {
    pub file: RawFile,
    path: PathBuf,
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        // Best effort: a leftover scratch file is only wasted space.
        let _ = fs::remove_file(&self.path);
    }
}

/// Run mke2fs for a filesystem of `len` bytes into a scratch file.
#[allow(clippy::too_many_arguments)]
pub fn build(
    format: FsFormat,
    len: u64,
    uuid: Guid,
    hash_seed: Guid,
    extra_args: &[String],
    copy_in: Option<&Path>,
    scratch_dir: &Path,
    tag: &str,
    jp: &JsonPath,
) -> Result<ScratchImage> {
    let path = scratch_dir.join(format!("vmdisk-layout-{}-{tag}.img", std::process::id()));
    let file = RawFile::create(&path, len).map_err(|e| match e {
        vmdisk_block::Error::File { source, .. } => Error::Scratch {
            path: path.clone(),
            source,
        },
        other => Error::Block(other),
    })?;
    let img = ScratchImage {
        file,
        path: path.clone(),
    };
    let mut cmd = Command::new("mke2fs");
    cmd.arg("-t")
        .arg(format.name())
        .args(["-F", "-q", "-U"])
        .arg(uuid.to_string())
        .arg("-E")
        .arg(format!("hash_seed={hash_seed},root_owner=0:0"))
        .args(extra_args);
    if let Some(d) = copy_in {
        cmd.arg("-d").arg(d);
    }
    cmd.arg(&path)
        .env("E2FSPROGS_FAKE_TIME", FIXED_TIME.to_string())
        .env("SOURCE_DATE_EPOCH", FIXED_TIME.to_string())
        .env("LC_ALL", "C");
    let out = cmd.output().map_err(|source| Error::SpawningTool {
        tool: "mke2fs",
        source,
    })?;
    if !out.status.success() {
        return Err(Error::ToolFailed {
            path: jp.clone(),
            tool: "mke2fs",
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(img)
}

/// What a directory tree needs on ext4, for `--size auto`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    /// Bytes of data blocks (4 KiB rounding, directories and long symlinks included).
    pub data_bytes: u64,
    pub inodes: u64,
}

/// Block size the estimate rounds to (the larger of mke2fs's choices: conservative).
const BLOCK: u64 = 4096;

impl Usage {
    /// Walk `dir` without following symlinks.
    pub fn scan(dir: &Path) -> Result<Usage> {
        let mut u = Usage::default();
        u.walk(dir, 0)?;
        Ok(u)
    }

    fn walk(&mut self, dir: &Path, depth: usize) -> Result<()> {
        let err = |p: &Path| {
            let p = p.to_owned();
            move |source| Error::ReadingSource { path: p, source }
        };
        if depth > MAX_DEPTH {
            return Err(Error::ReadingSource {
                path: dir.to_owned(),
                source: std::io::Error::other("directory tree too deep"),
            });
        }
        let mut dir_bytes = 24u64; // "." and ".."
        for e in fs::read_dir(dir).map_err(err(dir))? {
            let e = e.map_err(err(dir))?;
            let p = e.path();
            let m = fs::symlink_metadata(&p).map_err(err(&p))?;
            dir_bytes += 8 + (e.file_name().len() as u64).div_ceil(4) * 4;
            self.inodes += 1;
            if m.is_dir() {
                self.walk(&p, depth + 1)?;
            } else if m.is_file() {
                // Sparse files still cost their allocated blocks at most; count apparent size
                // unless it is larger than what is allocated (holes stay holes with -d).
                let bytes = m
                    .len()
                    .min(m.blocks().saturating_mul(512).max(m.len().min(BLOCK)));
                let blocks = bytes.div_ceil(BLOCK);
                // Extent tree blocks for big, fragmented files: one per 128 MiB is generous.
                self.data_bytes += (blocks + blocks / 32768) * BLOCK;
            } else if m.file_type().is_symlink() && m.len() >= 60 {
                self.data_bytes += BLOCK;
            }
        }
        self.data_bytes += dir_bytes.div_ceil(BLOCK) * BLOCK + BLOCK;
        self.inodes += 1;
        Ok(())
    }

    /// Smallest filesystem (whole MiB) mke2fs can fill with this content, leaving `margin`.
    pub fn min_fs_bytes(&self, margin: u64) -> u64 {
        const MIB: u64 = 1 << 20;
        let payload = self
            .data_bytes
            .saturating_add(margin)
            .saturating_add(4 * MIB);
        // Inode tables (up to 1/16 with mke2fs's "small" type), 5 % reserved blocks, bitmaps
        // and group descriptors: divide by 0.85 to be safe.
        let mut size = payload.saturating_mul(100) / 85;
        // Enough inodes at the densest ratio mke2fs picks for larger filesystems (16 KiB).
        size = size.max(self.inodes.saturating_add(64).saturating_mul(16384));
        size = size.saturating_add(journal_bytes(size));
        size.div_ceil(MIB).saturating_mul(MIB)
    }
}

/// mke2fs's default journal size for a filesystem of `fs` bytes (4 KiB blocks).
fn journal_bytes(fs: u64) -> u64 {
    const MIB: u64 = 1 << 20;
    match fs {
        f if f < 128 * MIB => 4 * MIB,
        f if f < 1024 * MIB => 16 * MIB,
        f if f < 2048 * MIB => 32 * MIB,
        f if f < 16384 * MIB => 64 * MIB,
        f if f < 32768 * MIB => 128 * MIB,
        f if f < 65536 * MIB => 256 * MIB,
        f if f < 131072 * MIB => 512 * MIB,
        _ => 1024 * MIB,
    }
}

/// Copy the scratch image into `target` (the partition): data extents verbatim, the rest
/// made to read as zeros.
pub fn copy_into(img: &ScratchImage, target: &dyn BlockDevice) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let len = img.file.len();
    let mut buf = vec![0u8; CHUNK as usize];
    for ext in img.file.block_status(0, len)? {
        if ext.reads_as_zero() {
            crate::apply::zero_range(target, ext.off, ext.len)?;
            continue;
        }
        let mut off = ext.off;
        while off < ext.end() {
            let n = (ext.end() - off).min(CHUNK) as usize;
            img.file.read_exact_at(&mut buf[..n], off)?;
            if vmdisk_block::is_zero(&buf[..n]) {
                crate::apply::zero_range(target, off, n as u64)?;
            } else {
                target.write_all_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
    }
    Ok(())
}
