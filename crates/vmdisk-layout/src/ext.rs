//! ext2/3/4 via `mke2fs` on a sparse scratch file, reproducibly, then copied into place.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmdisk_block::{BlockDevice, RawFile};

use crate::error::{Error, JsonPath, Result};
use crate::guid::Guid;
use crate::model::FsFormat;
use crate::zero::zero_range;

/// The fixed clock mke2fs sees (E2FSPROGS_FAKE_TIME, SOURCE_DATE_EPOCH): 1980-01-01T00:00:00Z,
/// the same instant the FAT writer stamps.
pub const FIXED_TIME: u64 = 315_532_800;

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

/// Copy the scratch image into `target` (the partition): data extents verbatim, the rest
/// made to read as zeros.
pub fn copy_into(img: &ScratchImage, target: &dyn BlockDevice) -> Result<()> {
    const CHUNK: u64 = 1 << 20;
    let len = img.file.len();
    let mut buf = vec![0u8; CHUNK as usize];
    for ext in img.file.block_status(0, len)? {
        if ext.reads_as_zero() {
            zero_range(target, ext.off, ext.len)?;
            continue;
        }
        let mut off = ext.off;
        while off < ext.end() {
            let n = (ext.end() - off).min(CHUNK) as usize;
            img.file.read_exact_at(&mut buf[..n], off)?;
            if vmdisk_block::is_zero(&buf[..n]) {
                zero_range(target, off, n as u64)?;
            } else {
                target.write_all_at(&buf[..n], off)?;
            }
            off += n as u64;
        }
    }
    Ok(())
}
