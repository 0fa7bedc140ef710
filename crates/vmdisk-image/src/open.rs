//! The factory: open an image file by path, probe its format, take qemu's locks and resolve
//! its backing chain.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmdisk_block::lock::{ImageLock, LockMode};
use vmdisk_block::{BlockDevice, RawFile, UndoFile};

use crate::q::{self, Qcow2Image};
use crate::{Error, Format, Result};

/// Longest backing chain we follow (qemu has no fixed limit; real chains are a handful deep).
pub const MAX_BACKING_DEPTH: usize = 64;

/// Bytes read from the start of a file to probe its format.
const PROBE_LEN: u64 = 512;
use crate::sniff::{looks_like, SNIFF_LEN};

/// How to open an image.
#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// Declared format; `None` probes. A file declared raw is never read as qcow2.
    pub format: Option<Format>,
    pub read_only: bool,
    /// Take no locks (qemu-img's `-U`): read an image someone else may be writing.
    pub force_share: bool,
    /// Do not open the backing chain (reads of unallocated ranges then return zeros).
    pub no_backing: bool,
    /// Edit as a transaction (read-write opens only): every change to the image file is
    /// undoable until [`Image::close`] commits it; an error, an interrupt or ENOSPC that
    /// drops the image first puts the file back byte for byte (see `vmdisk_block::UndoFile`).
    pub undo: bool,
}

impl OpenOptions {
    /// Read-only open, probing the format.
    pub fn read_only() -> Self {
        OpenOptions {
            read_only: true,
            ..Default::default()
        }
    }

    /// Read-write open as an undoable transaction (see [`OpenOptions::undo`]).
    pub fn transaction() -> Self {
        OpenOptions {
            undo: true,
            ..Default::default()
        }
    }
}

/// One image file in a chain, top first.
#[derive(Debug, Clone)]
pub struct Layer {
    /// The path the file was opened by (backing names joined to the overlay's directory).
    pub path: PathBuf,
    pub format: Format,
    pub virtual_size: u64,
    /// The backing file name exactly as stored in the image.
    pub backing_name: Option<String>,
    /// The backing format as stored in the image.
    pub backing_format: Option<String>,
}

/// An opened image: a block device for its guest contents plus what the factory learned.
pub struct Image {
    dev: Arc<dyn BlockDevice>,
    qcow2: Option<Arc<Qcow2Image>>,
    host: Arc<RawFile>,
    format: Format,
    path: PathBuf,
    chain: Vec<Layer>,
    read_only: bool,
    looks_like: &'static str,
    /// The transaction over `host`, when opened with [`OpenOptions::undo`]. Declared before
    /// the lock: a rollback on drop happens while the lock is still held.
    undo: Option<Arc<UndoFile>>,
    // Keeps the backing images (and their locks) alive as long as this one.
    _backing: Option<Box<Image>>,
    _lock: Option<ImageLock>,
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("chain", &self.chain)
            .field("read_only", &self.read_only)
            .finish()
    }
}

impl Image {
    /// The guest contents (the whole chain for qcow2 overlays).
    pub fn dev(&self) -> Arc<dyn BlockDevice> {
        self.dev.clone()
    }

    /// The file the image lives in (its host device).
    pub fn host(&self) -> Arc<RawFile> {
        self.host.clone()
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// The backing chain, this image first.
    pub fn chain(&self) -> &[Layer] {
        &self.chain
    }

    /// The qcow2 engine, for qcow2 images.
    pub fn qcow2(&self) -> Option<&Qcow2Image> {
        self.qcow2.as_deref()
    }

    /// The qcow2 engine, or an error naming `what` needed it (and what the file looks like).
    pub fn require_qcow2(&self, what: &'static str) -> Result<&Qcow2Image> {
        self.qcow2().ok_or_else(|| Error::NotQcow2 {
            path: self.path.clone(),
            format: self.format,
            looks_like: self.looks_like,
            what,
        })
    }

    /// What the file's first bytes look like ("a qcow2 image", "a raw ext2/3/4 filesystem").
    pub fn looks_like(&self) -> &'static str {
        self.looks_like
    }

    /// True when the image was declared raw (`-f raw`) but its bytes are a qcow2 image.
    pub fn is_qcow2_read_as_raw(&self) -> bool {
        self.format == Format::Raw && self.looks_like == "a qcow2 image"
    }

    /// Virtual size in bytes.
    pub fn len(&self) -> u64 {
        self.dev.len()
    }

    /// True for a zero-sized image.
    pub fn is_empty(&self) -> bool {
        self.dev.len() == 0
    }

    /// Flush everything and, for qcow2, close cleanly (clearing the dirty bit); an undoable
    /// edit ([`OpenOptions::undo`]) is committed here and only here.
    pub fn close(self) -> Result<()> {
        let Image {
            dev,
            qcow2,
            path,
            read_only,
            undo,
            ..
        } = self;
        drop(dev);
        if let Some(q) = qcow2 {
            match Arc::try_unwrap(q) {
                Ok(q) => q.close().map_err(Error::image("closing", &path))?,
                // Someone still holds the device: flush now, Drop closes it later.
                Err(q) if !read_only => q.flush().map_err(Error::image("flushing", &path))?,
                Err(_) => {}
            }
        }
        if let Some(u) = undo {
            u.commit()
                .map_err(Error::image("committing the changes to", &path))?;
        }
        Ok(())
    }

    /// Undo every change made through this image (opened with [`OpenOptions::undo`]) and
    /// close it; without a transaction this only drops it. Dropping the image does the same,
    /// silently; this reports a rollback that failed.
    pub fn abort(self) -> Result<()> {
        let Image {
            dev,
            qcow2,
            path,
            undo,
            ..
        } = self;
        drop(dev);
        drop(qcow2);
        match undo {
            Some(u) => u
                .rollback()
                .map_err(Error::image("undoing the changes to", &path)),
            None => Ok(()),
        }
    }

    /// True when this image's changes are an undoable transaction.
    pub fn is_transaction(&self) -> bool {
        self.undo.is_some()
    }
}

/// Open the image at `path` (see [`OpenOptions`]).
pub fn open(path: &Path, opts: &OpenOptions) -> Result<Image> {
    let mut seen = Vec::new();
    open_layer(path, opts.format, opts, opts.read_only, &mut seen)
}

/// Where a backing file named `name` in the image at `overlay` lives: relative names are
/// relative to the overlay's directory, as in qemu.
pub fn resolve_backing(overlay: &Path, name: &str) -> PathBuf {
    let name = Path::new(name);
    if name.is_absolute() {
        return name.to_owned();
    }
    match overlay.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.join(name),
        _ => name.to_owned(),
    }
}

/// Probe the format of an opened file: qcow2 magic, else raw.
pub fn probe_format(host: &dyn BlockDevice) -> vmdisk_block::Result<Format> {
    let n = host.len().min(PROBE_LEN) as usize;
    let mut buf = vec![0u8; n];
    host.read_exact_at(&mut buf, 0)?;
    Ok(if q::probe(&buf) {
        Format::Qcow2
    } else {
        Format::Raw
    })
}

/// Open the file, lock it and probe (or trust) its format.
pub(crate) fn open_file(
    path: &Path,
    format: Option<Format>,
    read_only: bool,
    force_share: bool,
) -> Result<(RawFile, Option<ImageLock>, Format)> {
    if std::fs::metadata(path).is_ok_and(|m| m.is_dir()) {
        return Err(Error::IsADirectory {
            path: path.to_owned(),
        });
    }
    let host = RawFile::open(path, read_only).map_err(Error::image("opening", path))?;
    let lock = if force_share {
        None
    } else {
        let mode = if read_only {
            LockMode::Read
        } else {
            LockMode::Write
        };
        Some(ImageLock::acquire(host.file(), path, mode).map_err(Error::image("locking", path))?)
    };
    let probed = probe_format(&host).map_err(Error::image("probing", path))?;
    let format = match format {
        // A declared qcow2 that is not one would only fail later as "corrupt".
        Some(Format::Qcow2) if probed != Format::Qcow2 => {
            return Err(Error::WrongFormat {
                path: path.to_owned(),
                declared: Format::Qcow2,
                looks_like: sniff(&host),
                fix: "pass -f raw, or leave -f out to probe",
            })
        }
        // Writing a qcow2 file as raw bytes would destroy it; reading it so is allowed (and
        // is what qemu does with -f raw).
        Some(Format::Raw) if probed == Format::Qcow2 && !read_only => {
            return Err(Error::WrongFormat {
                path: path.to_owned(),
                declared: Format::Raw,
                looks_like: "a qcow2 image",
                fix: "writing it as raw bytes would destroy it: pass -f qcow2, or leave -f out",
            })
        }
        Some(f) => f,
        None => probed,
    };
    Ok((host, lock, format))
}

/// `e` from opening `bpath`, the backing file `name` of `overlay`: a file that is not there is
/// named as the overlay's missing backing file (with the way to repoint it), not as a bare
/// "No such file" about a name the user never typed.
pub(crate) fn missing_backing(e: Error, overlay: &Path, name: &str, bpath: &Path) -> Error {
    match e {
        Error::Image {
            path,
            source: vmdisk_block::Error::File { source, .. },
            ..
        } if source.kind() == std::io::ErrorKind::NotFound && path == bpath => {
            Error::MissingBacking {
                overlay: overlay.to_owned(),
                name: name.to_owned(),
                resolved: bpath.to_owned(),
            }
        }
        e => e,
    }
}

/// What the file behind `host` looks like (see `sniff`); read errors count as "raw data".
pub(crate) fn sniff(host: &dyn BlockDevice) -> &'static str {
    let n = host.len().min(SNIFF_LEN as u64) as usize;
    let mut head = vec![0u8; n];
    match host.read_exact_at(&mut head, 0) {
        Ok(()) => looks_like(&head, host.len()),
        Err(_) => "raw data",
    }
}

fn open_layer(
    path: &Path,
    format: Option<Format>,
    opts: &OpenOptions,
    read_only: bool,
    seen: &mut Vec<(u64, u64, PathBuf)>,
) -> Result<Image> {
    let (host, lock, format) = open_file(path, format, read_only, opts.force_share)?;
    let meta = host.file().metadata().map_err(|source| Error::File {
        op: "stat",
        path: path.to_owned(),
        source,
    })?;
    let id = (meta.dev(), meta.ino());
    if seen.iter().any(|(d, i, _)| (*d, *i) == id) {
        let mut names: Vec<String> = seen
            .iter()
            .map(|(_, _, p)| p.display().to_string())
            .collect();
        names.push(path.display().to_string());
        return Err(Error::BackingLoop {
            chain: names.join(" -> "),
        });
    }
    if seen.len() >= MAX_BACKING_DEPTH {
        return Err(Error::BackingTooDeep {
            path: seen
                .first()
                .map(|s| s.2.clone())
                .unwrap_or_else(|| path.to_owned()),
            limit: MAX_BACKING_DEPTH,
        });
    }
    seen.push((id.0, id.1, path.to_owned()));

    let looks_like = sniff(&host);
    let host = Arc::new(host);
    // Only the top layer is ever written, so only it gets a transaction.
    let undo = (opts.undo && !read_only).then(|| Arc::new(UndoFile::new(host.clone())));
    let host_dev: Arc<dyn BlockDevice> = match &undo {
        Some(u) => u.clone(),
        None => host.clone(),
    };
    if format == Format::Raw {
        return Ok(Image {
            dev: host_dev,
            qcow2: None,
            chain: vec![Layer {
                path: path.to_owned(),
                format,
                virtual_size: host.len(),
                backing_name: None,
                backing_format: None,
            }],
            host,
            format,
            path: path.to_owned(),
            read_only,
            looks_like,
            undo,
            _backing: None,
            _lock: lock,
        });
    }
    let hdr = q::read_header(&*host).map_err(Error::image("reading the header of", path))?;
    let backing = match (&hdr.backing_file, opts.no_backing) {
        (Some(name), false) => {
            let bpath = resolve_backing(path, name);
            let bfmt = match hdr.backing_format.as_deref() {
                Some(f) => Some(f.parse::<Format>()?),
                None => None,
            };
            let layer = open_layer(&bpath, bfmt, opts, true, seen)
                .map_err(|e| missing_backing(e, path, name, &bpath))?;
            Some(Box::new(layer))
        }
        _ => None,
    };
    let img = Arc::new(
        Qcow2Image::open(host_dev, backing.as_ref().map(|b| b.dev()), read_only)
            .map_err(Error::image("opening", path))?,
    );
    let mut chain = vec![Layer {
        path: path.to_owned(),
        format,
        virtual_size: hdr.virtual_size,
        backing_name: hdr.backing_file.clone(),
        backing_format: hdr.backing_format.clone(),
    }];
    if let Some(b) = &backing {
        chain.extend(b.chain.iter().cloned());
    }
    Ok(Image {
        dev: img.clone(),
        qcow2: Some(img),
        host,
        format,
        path: path.to_owned(),
        chain,
        read_only,
        looks_like,
        undo,
        _backing: backing,
        _lock: lock,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_against_the_overlay_directory() {
        assert_eq!(
            resolve_backing(Path::new("a/b/ov.qcow2"), "base.raw"),
            Path::new("a/b/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("ov.qcow2"), "base.raw"),
            Path::new("base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("a/ov.qcow2"), "/x/base"),
            Path::new("/x/base")
        );
        assert_eq!(
            resolve_backing(Path::new("/d/ov"), "../b"),
            Path::new("/d/../b")
        );
    }

    #[test]
    fn raw_is_probed_and_locked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        std::fs::write(&p, vec![1u8; 8192]).unwrap();
        let img = open(&p, &OpenOptions::default()).unwrap();
        assert_eq!(img.format(), Format::Raw);
        assert_eq!(img.len(), 8192);
        assert_eq!(img.chain().len(), 1);
        // A second writer is refused while the first holds the write lock.
        let e = open(&p, &OpenOptions::default()).unwrap_err();
        assert!(
            matches!(e.block_error(), Some(vmdisk_block::Error::Locked { .. })),
            "{e}"
        );
        // ... but -U reads anyway.
        let ro = OpenOptions {
            force_share: true,
            ..OpenOptions::read_only()
        };
        open(&p, &ro).unwrap();
        drop(img);
        open(&p, &OpenOptions::read_only()).unwrap();
    }

    #[test]
    fn declared_raw_is_never_qcow2() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("fake");
        let mut data = vec![0u8; 4096];
        data[..4].copy_from_slice(b"QFI\xfb");
        std::fs::write(&p, &data).unwrap();
        let o = OpenOptions {
            format: Some(Format::Raw),
            ..OpenOptions::read_only()
        };
        let img = open(&p, &o).unwrap();
        assert_eq!(img.format(), Format::Raw);
        assert_eq!(img.len(), 4096);
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = open(Path::new("/nonexistent/x.img"), &OpenOptions::read_only()).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
    }
}
