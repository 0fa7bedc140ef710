//! ext2/3/4 via `mke2fs` on a sparse scratch file, reproducibly, then copied into place.

use std::path::Path;
use std::process::Command;

use crate::error::{Error, JsonPath, Result};
use crate::guid::Guid;
use crate::model::FsFormat;
use crate::scratch::ScratchImage;

pub use crate::scratch::FIXED_TIME;

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
    let img = ScratchImage::create(scratch_dir, tag, len)?;
    let path = img.path.clone();
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
        package: "e2fsprogs",
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
