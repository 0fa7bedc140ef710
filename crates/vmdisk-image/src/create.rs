//! `create`: new raw or qcow2 images, with qemu-img's `-o` options.

use std::path::Path;

use vmdisk_block::lock::{ImageLock, LockMode};
use vmdisk_block::{BlockDevice, RawFile};

use crate::open::{open, resolve_backing, Image, OpenOptions};
use crate::output::{FileId, PendingFile};
use crate::q::{self, CompressionType, Preallocation};
use crate::{Error, Format, Result};

/// Smallest and largest qcow2 cluster sizes (qemu's limits).
const MIN_CLUSTER_SIZE: u64 = 512;
const MAX_CLUSTER_SIZE: u64 = 2 << 20;

/// Preallocation modes accepted in `-o preallocation=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreallocMode {
    Off,
    /// qcow2 only: allocate L2 tables and refcounts up front.
    Metadata,
    /// raw only: reserve the space with fallocate.
    Falloc,
    /// raw only: write the zeros.
    Full,
}

/// qemu-img's `-o` options, parsed. `None` means "the default".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ImageOptions {
    pub size: Option<u64>,
    pub cluster_size: Option<u64>,
    pub compression_type: Option<CompressionType>,
    pub lazy_refcounts: Option<bool>,
    pub preallocation: Option<PreallocMode>,
    pub refcount_bits: Option<u32>,
    /// qcow2 version: 2 (compat=0.10) or 3 (compat=1.1).
    pub compat: Option<u32>,
    pub extended_l2: Option<bool>,
    pub backing_file: Option<String>,
    pub backing_fmt: Option<Format>,
}

fn invalid(option: &str, reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        option: option.to_string(),
        reason: reason.into(),
    }
}

/// Parse a size like qemu-img: bytes, or a number with a k/K, M, G, T, P, E suffix
/// (powers of 1024; decimals allowed with a suffix, e.g. `1.5G`).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_lowercase() {
                'b' => 0,
                'k' => 10,
                'm' => 20,
                'g' => 30,
                't' => 40,
                'p' => 50,
                'e' => 60,
                _ => return Err(invalid(s, "unknown size suffix (use k, M, G, T, P or E)")),
            };
            (&t[..i], 1u64 << shift)
        }
        _ => (t, 1),
    };
    let bad = || invalid(s, "not a size (e.g. 10G, 512M, 65536)");
    if num.contains('.') {
        let v: f64 = num.parse().map_err(|_| bad())?;
        let bytes = v * mult as f64;
        if !(0.0..1.8e19).contains(&bytes) {
            return Err(bad());
        }
        Ok(bytes as u64)
    } else {
        let v: u64 = num.parse().map_err(|_| bad())?;
        v.checked_mul(mult).ok_or_else(bad)
    }
}

fn parse_bool(key: &str, v: &str) -> Result<bool> {
    match v {
        "on" | "true" | "yes" => Ok(true),
        "off" | "false" | "no" => Ok(false),
        _ => Err(invalid(key, format!("'{v}' is not on or off"))),
    }
}

/// Split an option string on commas, honouring qemu's `,,` escape.
pub(crate) fn split_opts(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == ',' {
            if chars.peek() == Some(&',') {
                chars.next();
                cur.push(',');
            } else {
                out.push(std::mem::take(&mut cur));
            }
        } else {
            cur.push(c);
        }
    }
    out.push(cur);
    out.retain(|s| !s.is_empty());
    out
}

impl ImageOptions {
    /// Parse `key=value,...` as given to qemu-img's `-o`.
    pub fn parse(s: &str) -> Result<Self> {
        let mut o = ImageOptions::default();
        o.merge(s)?;
        Ok(o)
    }

    /// Parse more options on top of these (several `-o` flags add up).
    pub fn merge(&mut self, s: &str) -> Result<()> {
        for item in split_opts(s) {
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| invalid(&item, "expected key=value"))?;
            match key {
                "size" => self.size = Some(parse_size(val)?),
                "cluster_size" => {
                    let c = parse_size(val)?;
                    if !c.is_power_of_two() || !(MIN_CLUSTER_SIZE..=MAX_CLUSTER_SIZE).contains(&c) {
                        return Err(invalid(key, "must be a power of two between 512 and 2M"));
                    }
                    self.cluster_size = Some(c);
                }
                "compression_type" => {
                    self.compression_type = Some(match val {
                        "zlib" => CompressionType::Zlib,
                        "zstd" => CompressionType::Zstd,
                        _ => return Err(invalid(key, "must be zlib or zstd")),
                    })
                }
                "lazy_refcounts" => self.lazy_refcounts = Some(parse_bool(key, val)?),
                "extended_l2" => self.extended_l2 = Some(parse_bool(key, val)?),
                "preallocation" => {
                    self.preallocation = Some(match val {
                        "off" => PreallocMode::Off,
                        "metadata" => PreallocMode::Metadata,
                        "falloc" => PreallocMode::Falloc,
                        "full" => PreallocMode::Full,
                        _ => return Err(invalid(key, "must be off, metadata, falloc or full")),
                    })
                }
                "refcount_bits" => {
                    let b: u32 = val.parse().map_err(|_| invalid(key, "not a number"))?;
                    if !b.is_power_of_two() || b > 64 {
                        return Err(invalid(key, "must be 1, 2, 4, 8, 16, 32 or 64"));
                    }
                    self.refcount_bits = Some(b);
                }
                "compat" => {
                    self.compat = Some(match val {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(invalid(key, "must be 0.10 (v2) or 1.1 (v3)")),
                    })
                }
                "backing_file" => self.backing_file = Some(val.to_string()),
                "backing_fmt" => self.backing_fmt = Some(val.parse()?),
                _ => return Err(invalid(key, "not supported by vmdisk")),
            }
        }
        Ok(())
    }

    /// Fail on options that do not apply to `format`.
    fn validate_for(&self, format: Format) -> Result<()> {
        if format == Format::Raw {
            let qcow2_only = [
                ("cluster_size", self.cluster_size.is_some()),
                ("compression_type", self.compression_type.is_some()),
                ("lazy_refcounts", self.lazy_refcounts.is_some()),
                ("refcount_bits", self.refcount_bits.is_some()),
                ("compat", self.compat.is_some()),
                ("extended_l2", self.extended_l2.is_some()),
                ("backing_file", self.backing_file.is_some()),
                (
                    "preallocation=metadata",
                    self.preallocation == Some(PreallocMode::Metadata),
                ),
            ];
            if let Some((k, _)) = qcow2_only.iter().find(|(_, set)| *set) {
                return Err(invalid(k, "only applies to qcow2 images"));
            }
        } else {
            if matches!(
                self.preallocation,
                Some(PreallocMode::Falloc | PreallocMode::Full)
            ) {
                return Err(invalid(
                    "preallocation",
                    "vmdisk supports off or metadata for qcow2",
                ));
            }
            let v2 = self.compat == Some(2);
            if v2 && self.lazy_refcounts == Some(true) {
                return Err(invalid("lazy_refcounts", "needs compat=1.1"));
            }
            if v2 && self.refcount_bits.is_some_and(|b| b != 16) {
                return Err(invalid("refcount_bits", "compat=0.10 supports only 16"));
            }
            if v2 && self.compression_type == Some(CompressionType::Zstd) {
                return Err(invalid("compression_type", "zstd needs compat=1.1"));
            }
            if v2 && self.extended_l2 == Some(true) {
                return Err(invalid("extended_l2", "needs compat=1.1"));
            }
            if self.extended_l2 == Some(true) && self.cluster_size.is_some_and(|c| c < 16384) {
                return Err(invalid("extended_l2", "needs cluster_size of at least 16k"));
            }
        }
        Ok(())
    }

    /// The qcow2 engine's create options for an image of `size` bytes.
    pub fn qcow2_create_options(&self, size: u64) -> q::CreateOptions {
        let d = q::CreateOptions::default();
        q::CreateOptions {
            size,
            cluster_size: self.cluster_size.unwrap_or(d.cluster_size),
            version: self.compat.unwrap_or(d.version),
            refcount_bits: self.refcount_bits.unwrap_or(d.refcount_bits),
            compression: self.compression_type.unwrap_or(d.compression),
            lazy_refcounts: self.lazy_refcounts.unwrap_or(d.lazy_refcounts),
            preallocation: if self.preallocation == Some(PreallocMode::Metadata) {
                Preallocation::Metadata
            } else {
                Preallocation::Off
            },
            extended_l2: self.extended_l2.unwrap_or(d.extended_l2),
            backing_file: None,
            backing_format: None,
        }
    }
}

/// What `create` makes.
#[derive(Debug, Clone)]
pub struct CreateSpec {
    pub format: Format,
    /// Virtual size; `None` takes it from `-o size=` or the backing image.
    pub size: Option<u64>,
    pub options: ImageOptions,
    /// Backing file name as it will be stored (relative names are relative to the new image).
    pub backing_file: Option<String>,
    /// Backing format; probed when `None`.
    pub backing_format: Option<Format>,
}

impl CreateSpec {
    pub fn new(format: Format, size: u64) -> Self {
        CreateSpec {
            format,
            size: Some(size),
            options: ImageOptions::default(),
            backing_file: None,
            backing_format: None,
        }
    }
}

/// Everything `create` decides before it touches a file.
#[derive(Debug, Clone)]
struct CreatePlan {
    format: Format,
    size: u64,
    qcow2: Option<q::CreateOptions>,
    prealloc: Option<PreallocMode>,
}

impl CreatePlan {
    /// Bytes the new file will occupy on the host (for the free-space check).
    fn needed(&self) -> u64 {
        match (self.format, self.prealloc) {
            (Format::Raw, Some(PreallocMode::Falloc | PreallocMode::Full)) => self.size,
            (Format::Raw, _) => 0,
            (Format::Qcow2, _) => {
                let Some(o) = &self.qcow2 else { return 0 };
                let opts = ImageOptions {
                    cluster_size: Some(o.cluster_size),
                    refcount_bits: Some(o.refcount_bits),
                    extended_l2: Some(o.extended_l2),
                    ..Default::default()
                };
                let m = crate::measure_size(Format::Qcow2, &opts, self.size, None);
                match (m, o.preallocation) {
                    (Ok(m), Preallocation::Metadata) => m.fully_allocated - self.size,
                    (Ok(m), Preallocation::Off) => m.required.min(4 * o.cluster_size),
                    (Err(_), _) => 0,
                }
            }
        }
    }
}

/// Validate `spec` for a new image at `path`: options, size, and the backing file (opened
/// with its whole chain, which must not lead back to `path`).
fn plan_create(path: &Path, spec: &CreateSpec) -> Result<CreatePlan> {
    let o = &spec.options;
    o.validate_for(spec.format)?;
    let backing_file = spec.backing_file.clone().or_else(|| o.backing_file.clone());
    let mut backing_format = spec.backing_format.or(o.backing_fmt);
    if spec.format == Format::Raw && backing_file.is_some() {
        return Err(invalid(
            "backing_file",
            "raw images cannot have a backing file",
        ));
    }
    let mut size = spec.size.or(o.size);
    if let Some(name) = &backing_file {
        let bpath = resolve_backing(path, name);
        refuse_own_backing(path, &bpath, &[])?;
        let b = open(
            &bpath,
            &OpenOptions {
                format: backing_format,
                read_only: true,
                force_share: true,
                ..Default::default()
            },
        )
        .map_err(|e| match e {
            // The chain of the backing file needs the file being created: a loop.
            Error::MissingBacking { resolved, .. } if same_path(&resolved, path) => {
                Error::CreateLoop {
                    path: path.to_owned(),
                    chain: format!("{} -> ... -> {}", bpath.display(), resolved.display()),
                }
            }
            e => e,
        })?;
        let chain: Vec<&Path> = b.chain().iter().map(|l| l.path.as_path()).collect();
        for layer in &chain[1..] {
            refuse_own_backing(path, layer, &chain)?;
        }
        backing_format = backing_format.or(Some(b.format()));
        size = size.or(Some(b.len()));
    }
    // Like qemu-img: sizes are rounded up to whole 512-byte sectors.
    let size = size
        .ok_or(Error::SizeRequired)?
        .checked_next_multiple_of(512)
        .ok_or_else(|| invalid("size", "too large"))?;
    let qcow2 = (spec.format == Format::Qcow2).then(|| {
        let mut co = o.qcow2_create_options(size);
        co.backing_file = backing_file;
        co.backing_format = backing_format.map(|f| f.to_string());
        co
    });
    if let Some(co) = &qcow2 {
        // Refuse sizes the format cannot describe before any file exists.
        crate::measure_size(
            Format::Qcow2,
            &ImageOptions {
                cluster_size: Some(co.cluster_size),
                ..Default::default()
            },
            size,
            None,
        )?;
    }
    Ok(CreatePlan {
        format: spec.format,
        size,
        qcow2,
        prealloc: o.preallocation,
    })
}

/// Whether two paths name one file: the same inode when both exist, else the same absolute
/// path once the directories are resolved.
fn same_path(a: &Path, b: &Path) -> bool {
    if let (Some(x), Some(y)) = (FileId::of(a), FileId::of(b)) {
        return x == y;
    }
    let abs = |p: &Path| -> Option<std::path::PathBuf> {
        let dir = crate::output::dir_of(p);
        Some(std::fs::canonicalize(dir).ok()?.join(p.file_name()?))
    };
    matches!((abs(a), abs(b)), (Some(x), Some(y)) if x == y)
}

fn refuse_own_backing(path: &Path, backing: &Path, chain: &[&Path]) -> Result<()> {
    if !same_path(path, backing) {
        return Ok(());
    }
    if chain.is_empty() {
        return Err(Error::CreateLoop {
            path: path.to_owned(),
            chain: format!("{} -> {}", path.display(), backing.display()),
        });
    }
    let names: Vec<String> = chain.iter().map(|p| p.display().to_string()).collect();
    Err(Error::CreateLoop {
        path: path.to_owned(),
        chain: format!("{} -> {}", path.display(), names.join(" -> ")),
    })
}

/// Write the new image's structure into the empty `host` (the temporary file of the new
/// image at `path`, which is the name messages use: the temporary is an implementation
/// detail the user never named).
fn format_host(host: &RawFile, path: &Path, plan: &CreatePlan) -> Result<()> {
    match &plan.qcow2 {
        None => {
            // The host filesystem's limit on one file's size is not a fault of the image.
            let too_big = |step: &'static str| {
                move |e: vmdisk_block::Error| match e {
                    vmdisk_block::Error::Io { source, .. }
                        if source.raw_os_error() == Some(libc::EFBIG) =>
                    {
                        Error::File {
                            op: "make a file of the size asked for at",
                            path: path.to_owned(),
                            source,
                        }
                    }
                    e => Error::image(step, path)(e),
                }
            };
            if matches!(
                plan.prealloc,
                Some(PreallocMode::Falloc | PreallocMode::Full)
            ) {
                // Sized and allocated in one step (fallocate / F_PREALLOCATE, else zeros).
                host.allocate(plan.size).map_err(too_big("preallocating"))?;
            } else {
                host.resize(plan.size).map_err(too_big("sizing"))?;
            }
        }
        Some(co) => q::create(host, co).map_err(Error::image("creating", path))?,
    }
    Ok(())
}

/// A new file under its temporary name, write-locked, ready to be formatted.
fn pending_host(path: &Path, plan: &CreatePlan) -> Result<(PendingFile, RawFile, ImageLock)> {
    crate::ensure_space(path, plan.needed())?;
    let pending = PendingFile::create(path, true, 0o644)?;
    let tmp = pending.tmp_path().to_owned();
    let file = pending.file().try_clone().map_err(|source| Error::File {
        op: "reopen",
        path: tmp.clone(),
        source,
    })?;
    let lock =
        ImageLock::acquire(&file, &tmp, LockMode::Write).map_err(Error::image("locking", &tmp))?;
    let host = RawFile::from_file(file, &tmp, false).map_err(Error::image("opening", &tmp))?;
    Ok((pending, host, lock))
}

/// Create (or replace, like qemu-img) the image at `path`. Everything is validated first;
/// the image is built under a temporary name and renamed into place, so an existing file at
/// `path` is replaced only once the new one is complete, and never when anything fails.
pub fn create(path: &Path, spec: &CreateSpec) -> Result<()> {
    let plan = plan_create(path, spec)?;
    let (pending, host, lock) = pending_host(path, &plan)?;
    format_host(&host, path, &plan)?;
    drop((host, lock));
    // A fully preallocated raw image is as big as its size: leave the flushing to the kernel.
    if matches!(
        plan.prealloc,
        Some(PreallocMode::Full | PreallocMode::Falloc)
    ) {
        pending.commit_unsynced()
    } else {
        pending.commit()
    }
}

/// Format the file at `path` in place (creating or truncating it, under qemu's write lock):
/// for temporary files the caller owns, such as a `PendingFile` another program will write.
pub fn create_in_place(path: &Path, spec: &CreateSpec) -> Result<()> {
    let plan = plan_create(path, spec)?;
    let (host, _lock) = lock_and_truncate(path)?;
    format_host(&host, path, &plan)?;
    host.flush().map_err(Error::image("flushing", path))
}

/// A new image still under its temporary name, open read-write (with its backing chain):
/// [`NewImage::finish`] closes it and renames it into place; dropping it removes it.
pub struct NewImage {
    // Declared first: the image is closed before the temporary file goes.
    image: Option<Image>,
    pending: PendingFile,
}

impl NewImage {
    pub fn image(&self) -> &Image {
        // Only `finish` takes the image out, and it consumes self.
        self.image
            .as_ref()
            .expect("NewImage holds its image until finish")
    }

    /// Where the image will be once finished.
    pub fn path(&self) -> &Path {
        self.pending.dst()
    }

    /// Close the image (flushing it) and rename it into place; `sync` also waits for the
    /// data to reach the disk.
    pub fn finish(mut self, sync: bool) -> Result<()> {
        if let Some(img) = self.image.take() {
            img.close()?;
        }
        if sync {
            self.pending.commit()
        } else {
            self.pending.commit_unsynced()
        }
    }
}

/// `create`, but the new image stays under its temporary name, opened read-write, until
/// [`NewImage::finish`].
pub fn create_new(path: &Path, spec: &CreateSpec) -> Result<NewImage> {
    let plan = plan_create(path, spec)?;
    let (pending, host, lock) = pending_host(path, &plan)?;
    format_host(&host, path, &plan)?;
    drop((host, lock));
    let image = open(
        pending.tmp_path(),
        &OpenOptions {
            format: Some(plan.format),
            ..Default::default()
        },
    )?;
    Ok(NewImage {
        image: Some(image),
        pending,
    })
}

/// Create a qcow2 overlay at `overlay` whose backing file is `image` (stored as an absolute
/// path, so the overlay can live anywhere); `image_format` is probed and recorded when `None`.
pub fn create_overlay(overlay: &Path, image: &Path, image_format: Option<Format>) -> Result<()> {
    create(overlay, &overlay_spec(image, image_format)?)
}

/// The spec of a qcow2 overlay on `image` (see [`create_overlay`]).
pub fn overlay_spec(image: &Path, image_format: Option<Format>) -> Result<CreateSpec> {
    let backing = std::fs::canonicalize(image).map_err(|source| Error::File {
        op: "resolve",
        path: image.to_owned(),
        source,
    })?;
    Ok(CreateSpec {
        format: Format::Qcow2,
        size: None,
        options: ImageOptions::default(),
        backing_file: Some(backing.to_string_lossy().into_owned()),
        backing_format: image_format,
    })
}

/// Open `path` for writing (creating it), take the write lock, truncate it.
pub(crate) fn lock_and_truncate(path: &Path) -> Result<(RawFile, ImageLock)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| Error::File {
            op: "create",
            path: path.to_owned(),
            source,
        })?;
    let lock =
        ImageLock::acquire(&file, path, LockMode::Write).map_err(Error::image("locking", path))?;
    // Only a non-empty file is truncated: ext4 flushes everything written to a file that was
    // truncated to 0 when it is closed (auto_da_alloc), and a new temporary is empty already.
    let non_empty_file = file
        .metadata()
        .map(|m| m.is_file() && m.len() > 0)
        .unwrap_or(false);
    if non_empty_file {
        file.set_len(0).map_err(|source| Error::File {
            op: "truncate",
            path: path.to_owned(),
            source,
        })?;
    }
    let host = RawFile::from_file(file, path, false).map_err(Error::image("opening", path))?;
    Ok((host, lock))
}

/// A new image for `convert`: validated, under its temporary name, formatted and locked.
pub(crate) fn create_pending(
    path: &Path,
    spec: &CreateSpec,
) -> Result<(PendingFile, RawFile, ImageLock)> {
    let plan = plan_create(path, spec)?;
    let (pending, host, lock) = pending_host(path, &plan)?;
    format_host(&host, path, &plan)?;
    Ok((pending, host, lock))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536").unwrap(), 65536);
        assert_eq!(parse_size("64k").unwrap(), 65536);
        assert_eq!(parse_size("64K").unwrap(), 65536);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("1.5M").unwrap(), 3 << 19);
        assert_eq!(parse_size("2T").unwrap(), 2 << 40);
        assert!(parse_size("12Q").is_err());
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999E").is_err());
    }

    #[test]
    fn options() {
        let o = ImageOptions::parse(
            "cluster_size=64k,compression_type=zstd,lazy_refcounts=on,preallocation=metadata,refcount_bits=16,compat=v3,extended_l2=on",
        )
        .unwrap();
        assert_eq!(o.cluster_size, Some(65536));
        assert_eq!(o.compression_type, Some(CompressionType::Zstd));
        assert_eq!(o.lazy_refcounts, Some(true));
        assert_eq!(o.preallocation, Some(PreallocMode::Metadata));
        assert_eq!(o.compat, Some(3));
        assert_eq!(o.extended_l2, Some(true));
        assert_eq!(ImageOptions::parse("compat=0.10").unwrap().compat, Some(2));
        assert!(ImageOptions::parse("cluster_size=3k").is_err());
        assert!(ImageOptions::parse("refcount_bits=3").is_err());
        assert!(ImageOptions::parse("encryption=on").is_err());
        assert!(ImageOptions::parse("nonsense").is_err());
        assert_eq!(
            ImageOptions::parse("backing_file=a,,b")
                .unwrap()
                .backing_file
                .as_deref(),
            Some("a,b")
        );
        assert!(ImageOptions::parse("cluster_size=64k")
            .unwrap()
            .validate_for(Format::Raw)
            .is_err());
        assert!(ImageOptions::parse("compat=0.10,lazy_refcounts=on")
            .unwrap()
            .validate_for(Format::Qcow2)
            .is_err());
    }

    #[test]
    fn raw_create_is_sparse_and_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        std::fs::write(&p, vec![9u8; 8192]).unwrap();
        create(&p, &CreateSpec::new(Format::Raw, 1 << 30)).unwrap();
        let m = std::fs::metadata(&p).unwrap();
        assert_eq!(m.len(), 1 << 30);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(m.blocks(), 0);
    }

    #[test]
    fn create_refuses_a_locked_image() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("busy.raw");
        std::fs::write(&p, vec![9u8; 8192]).unwrap();
        let f = std::fs::File::open(&p).unwrap();
        let _held = ImageLock::acquire(&f, &p, LockMode::Write).unwrap();
        let e = create(&p, &CreateSpec::new(Format::Raw, 4096)).unwrap_err();
        assert!(
            matches!(e.block_error(), Some(vmdisk_block::Error::Locked { .. })),
            "{e}"
        );
        assert_eq!(std::fs::read(&p).unwrap(), vec![9u8; 8192], "untouched");
    }
}
