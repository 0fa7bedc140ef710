//! Scratch files: a filesystem made by an external tool in the scratch directory, then copied
//! into its partition (data extents verbatim, holes as holes). Also runs the tools for btrfs,
//! xfs and f2fs and checks, before anything is written, that the installed ones can do what
//! the plan asks.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vmdisk_block::{BlockDevice, RawFile};

use crate::error::{Error, JsonPath, Result};
use crate::mkfs::ToolRun;
use crate::zero::zero_range;

/// A finished filesystem image in the scratch directory, removed on drop.
pub struct ScratchImage {
    pub file: RawFile,
    pub(crate) path: PathBuf,
}

impl Drop for ScratchImage {
    fn drop(&mut self) {
        // Best effort: a leftover scratch file is only wasted space.
        let _ = fs::remove_file(&self.path);
    }
}

impl ScratchImage {
    /// A sparse file of `len` bytes in `dir`, named after this process and `tag`.
    pub fn create(dir: &Path, tag: &str, len: u64) -> Result<ScratchImage> {
        let path = dir.join(format!("vmdisk-layout-{}-{tag}.img", std::process::id()));
        let file = RawFile::create(&path, len).map_err(|e| match e {
            vmdisk_block::Error::File { source, .. } => Error::Scratch {
                path: path.clone(),
                source,
            },
            other => Error::Block(other),
        })?;
        Ok(ScratchImage { file, path })
    }
}

/// The fixed clock the tools see (E2FSPROGS_FAKE_TIME, SOURCE_DATE_EPOCH): 1980-01-01T00:00:00Z,
/// the same instant the FAT writer stamps.
pub const FIXED_TIME: u64 = 315_532_800;

/// The Debian package of each tool (what to install when it is missing).
pub fn package_of(tool: &str) -> &'static str {
    match tool {
        "mkfs.btrfs" => "btrfs-progs",
        "mkfs.xfs" => "xfsprogs",
        "mkfs.f2fs" | "sload.f2fs" => "f2fs-tools",
        _ => "e2fsprogs",
    }
}

/// Run `runs` on `img` (its path appended to each), failing with the tool's stderr.
pub fn run_tools(runs: &[ToolRun], img: &ScratchImage, jp: &JsonPath) -> Result<()> {
    for r in runs {
        let out = Command::new(r.program)
            .args(&r.args)
            .arg(&img.path)
            .env("LC_ALL", "C")
            .env("SOURCE_DATE_EPOCH", FIXED_TIME.to_string())
            .output()
            .map_err(|source| Error::SpawningTool {
                tool: r.program,
                package: package_of(r.program),
                source,
            })?;
        if !out.status.success() {
            return Err(Error::ToolFailed {
                path: jp.clone(),
                tool: r.program,
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
    }
    Ok(())
}

/// `mkfs.btrfs --subvol` (btrfs-progs 6.11 and newer) makes subvolumes without mounting; the
/// version of the installed one, and whether it has the option.
pub fn btrfs_subvol_support() -> Result<(String, bool)> {
    let out = Command::new("mkfs.btrfs")
        .arg("--help")
        .env("LC_ALL", "C")
        .output()
        .map_err(|source| Error::SpawningTool {
            tool: "mkfs.btrfs",
            package: "btrfs-progs",
            source,
        })?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let version = Command::new("mkfs.btrfs")
        .arg("--version")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    Ok((version, text.contains("--subvol")))
}

/// Make `dirs` (relative paths) below a new directory in `scratch_dir`: the `--rootdir` of a
/// btrfs with subvolumes and nothing copied in.
pub fn subvolume_skeleton(scratch_dir: &Path, tag: &str, dirs: &[String]) -> Result<PathBuf> {
    let root = scratch_dir.join(format!("vmdisk-layout-{}-{tag}-root", std::process::id()));
    for d in dirs {
        let p = root.join(d);
        fs::create_dir_all(&p).map_err(|source| Error::Scratch { path: p, source })?;
    }
    fs::create_dir_all(&root).map_err(|source| Error::Scratch {
        path: root.clone(),
        source,
    })?;
    Ok(root)
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
