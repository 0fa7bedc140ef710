//! `resize`: change an image's virtual size in place, with `qemu-img resize`'s meaning.
//!
//! ```text
//!   SIZE | +SIZE | -SIZE ──▶ new size (checked: positive, no overflow, --shrink to shrink,
//!                                      no preallocation when shrinking, the space is there)
//!   open as a transaction (qemu's write lock: refused while a VM holds the image)
//!     raw:   the file's length (+ fallocate | zeros for --preallocation=falloc | full)
//!     qcow2: Qcow2Image::resize (L1, discards, preallocation, header), backing chain open
//!   close = commit; any error or interrupt before it puts the file back byte for byte
//! ```

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmdisk_block::{BlockDevice, Cancel};

use crate::q::ResizePrealloc;
use crate::{Error, Format, OpenOptions, Result};

/// Bytes of zeros written per call for a raw `--preallocation=full`.
const ZERO_CHUNK: u64 = 1 << 20;

/// What the size argument asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeChange {
    /// `SIZE`: exactly this many bytes.
    To(u64),
    /// `+SIZE`: this many bytes more.
    Grow(u64),
    /// `-SIZE`: this many bytes fewer.
    Shrink(u64),
}

impl SizeChange {
    /// Parse `SIZE`, `+SIZE` or `-SIZE` (sizes as in [`crate::parse_size`]).
    pub fn parse(s: &str) -> Result<SizeChange> {
        let t = s.trim();
        if let Some(r) = t.strip_prefix('+') {
            Ok(SizeChange::Grow(crate::parse_size(r)?))
        } else if let Some(r) = t.strip_prefix('-') {
            Ok(SizeChange::Shrink(crate::parse_size(r)?))
        } else {
            Ok(SizeChange::To(crate::parse_size(t)?))
        }
    }

    /// The new size of an image of `old` bytes; qemu-img's "must be positive" rule.
    pub fn apply(self, old: u64) -> Result<u64> {
        let positive = || Error::InvalidOption {
            option: "size".into(),
            reason: "the new image size must be positive".into(),
        };
        let new = match self {
            SizeChange::To(n) => n,
            SizeChange::Grow(n) => old.checked_add(n).ok_or_else(|| Error::InvalidOption {
                option: "size".into(),
                reason: format!("{old} + {n} bytes is too large"),
            })?,
            SizeChange::Shrink(n) => old.checked_sub(n).ok_or_else(positive)?,
        };
        if new == 0 {
            return Err(positive());
        }
        Ok(new)
    }
}

/// How to resize.
#[derive(Debug, Clone, Default)]
pub struct ResizeOptions {
    /// Declared format (`-f`); probed when `None`.
    pub format: Option<Format>,
    /// Shrinking is allowed (`--shrink`); without it a smaller size is refused.
    pub shrink: bool,
    pub prealloc: ResizePrealloc,
    /// Raised (Ctrl-C): stop and put the image back as it was.
    pub cancel: Cancel,
}

/// What a resize did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ResizeStats {
    pub filename: PathBuf,
    pub format: Format,
    #[serde(rename = "old-size")]
    pub old_size: u64,
    #[serde(rename = "new-size")]
    pub new_size: u64,
}

/// An error from a [`ResizeHook`] (its own crate's type, boxed).
pub type HookError = Box<dyn std::error::Error + Send + Sync>;

/// Work done on the image's contents inside the resize transaction (`resize --grow-fs`).
pub trait ResizeHook {
    /// On the image at its old size (`old` bytes), before anything is written: refuse here.
    fn check(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        old: u64,
        new: u64,
    ) -> std::result::Result<(), HookError>;
    /// On the resized image, in the same transaction: an error puts the file back.
    fn apply(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        old: u64,
        new: u64,
    ) -> std::result::Result<(), HookError>;
}

/// Resize the image at `path` (see the module docs). The image is edited as a transaction:
/// a refusal touches nothing, and an error, interrupt or full disk half-way leaves the file
/// byte-identical.
pub fn resize(path: &Path, change: SizeChange, opts: &ResizeOptions) -> Result<ResizeStats> {
    resize_with(path, change, opts, None)
}

/// [`resize`], then `hook` on the contents, as one transaction: the hook checks the image
/// before the first write and grows what is inside after the image has grown.
pub fn resize_with(
    path: &Path,
    change: SizeChange,
    opts: &ResizeOptions,
    mut hook: Option<&mut dyn ResizeHook>,
) -> Result<ResizeStats> {
    let invalid = |reason: String| Error::InvalidOption {
        option: "preallocation".into(),
        reason,
    };
    let img = crate::open(
        path,
        &OpenOptions {
            format: opts.format,
            ..OpenOptions::transaction()
        },
    )?;
    let old = img.len();
    let new = change.apply(old)?;
    if new < old && !opts.shrink {
        return Err(Error::ShrinkWithoutFlag {
            path: path.to_owned(),
            old,
            new,
        });
    }
    if new < old && opts.prealloc != ResizePrealloc::Off {
        return Err(invalid(
            "preallocation can only be used for growing images".into(),
        ));
    }
    if img.format() == Format::Raw && opts.prealloc == ResizePrealloc::Metadata {
        return Err(invalid(
            "metadata is a qcow2 mode; a raw image takes off, falloc or full".into(),
        ));
    }
    if matches!(opts.prealloc, ResizePrealloc::Falloc | ResizePrealloc::Full) && new > old {
        // The new data, and for qcow2 its tables (one L2 entry and a refcount per cluster).
        let extra = (new - old) + (new - old) / 4096 + (1 << 20);
        crate::ensure_space(path, extra)?;
    }
    if let Some(h) = hook.as_deref_mut() {
        h.check(&img.dev(), old, new)
            .map_err(|source| Error::ContentsRefused {
                path: path.to_owned(),
                source,
            })?;
    }
    let step = |what: &'static str| Error::image(what, path);
    match img.qcow2() {
        Some(q) => q
            .resize(new, opts.prealloc, &opts.cancel)
            .map_err(step("resizing"))?,
        None => {
            let dev = img.dev();
            dev.resize(new).map_err(step("resizing"))?;
            if new > old {
                match opts.prealloc {
                    ResizePrealloc::Falloc => dev
                        .write_zeroes(old, new - old, false)
                        .map_err(step("preallocating"))?,
                    ResizePrealloc::Full => {
                        let zeros = vec![0u8; ZERO_CHUNK.min(new - old) as usize];
                        let mut pos = old;
                        while pos < new {
                            if opts.cancel.is_cancelled() {
                                return Err(Error::Cancelled {
                                    path: path.to_owned(),
                                });
                            }
                            let n = ZERO_CHUNK.min(new - pos);
                            dev.write_all_at(&zeros[..n as usize], pos)
                                .map_err(step("preallocating"))?;
                            pos += n;
                        }
                    }
                    ResizePrealloc::Off | ResizePrealloc::Metadata => {}
                }
            }
        }
    }
    if opts.cancel.is_cancelled() {
        return Err(Error::Cancelled {
            path: path.to_owned(),
        });
    }
    if let Some(h) = hook {
        h.apply(&img.dev(), old, new)
            .map_err(|source| Error::GrowingContents {
                path: path.to_owned(),
                source,
            })?;
        if opts.cancel.is_cancelled() {
            return Err(Error::Cancelled {
                path: path.to_owned(),
            });
        }
    }
    let format = img.format();
    img.close()?;
    Ok(ResizeStats {
        filename: path.to_owned(),
        format,
        old_size: old,
        new_size: new,
    })
}

/// Parse `--preallocation=off|metadata|falloc|full`.
pub fn parse_prealloc(s: &str) -> Result<ResizePrealloc> {
    Ok(match s {
        "off" => ResizePrealloc::Off,
        "metadata" => ResizePrealloc::Metadata,
        "falloc" => ResizePrealloc::Falloc,
        "full" => ResizePrealloc::Full,
        _ => {
            return Err(Error::InvalidOption {
                option: "preallocation".into(),
                reason: format!("'{s}' is not off, metadata, falloc or full"),
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn size_changes() {
        assert_eq!(SizeChange::parse("+1G").unwrap(), SizeChange::Grow(1 << 30));
        assert_eq!(
            SizeChange::parse("-512M").unwrap(),
            SizeChange::Shrink(512 << 20)
        );
        assert_eq!(SizeChange::parse("10G").unwrap(), SizeChange::To(10 << 30));
        assert_eq!(SizeChange::Grow(1).apply(1).unwrap(), 2);
        assert!(SizeChange::Shrink(2).apply(1).is_err());
        assert!(SizeChange::Shrink(1).apply(1).is_err());
        assert!(SizeChange::To(0).apply(1).is_err());
        assert!(SizeChange::Grow(u64::MAX).apply(1).is_err());
    }

    #[test]
    fn raw_grows_shrinks_only_with_the_flag_and_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        std::fs::write(&p, vec![3u8; 8192]).unwrap();
        let o = ResizeOptions::default();
        let s = resize(&p, SizeChange::Grow(4096), &o).unwrap();
        assert_eq!((s.old_size, s.new_size), (8192, 12288));
        let e = resize(&p, SizeChange::To(4096), &o).unwrap_err();
        assert!(matches!(e, Error::ShrinkWithoutFlag { .. }), "{e}");
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 12288);
        let shrink = ResizeOptions {
            shrink: true,
            ..Default::default()
        };
        resize(&p, SizeChange::Shrink(8192), &shrink).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), vec![3u8; 4096]);
        let cancelled = ResizeOptions {
            prealloc: ResizePrealloc::Full,
            cancel: Cancel::new(),
            ..Default::default()
        };
        cancelled.cancel.cancel();
        assert!(resize(&p, SizeChange::To(8 << 20), &cancelled).is_err());
        assert_eq!(std::fs::read(&p).unwrap(), vec![3u8; 4096], "rolled back");
    }
}
