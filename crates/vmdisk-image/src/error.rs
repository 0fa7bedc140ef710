use std::path::PathBuf;

/// Result of every vmdisk-image operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, with the path of the image it happened to.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A block-level step failed on one image file; `op` names the step.
    #[error("{op} {}", path.display())]
    Image {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: vmdisk_block::Error,
    },
    /// The backing chain points back at an image already in it.
    #[error("backing loop: {chain}")]
    BackingLoop { chain: String },
    /// An overlay's backing file does not exist where its stored name points.
    #[error(
        "the backing file of {} does not exist: it is stored as '{name}', which means {}; if \
         the file moved, point the overlay at it with `vmdisk rebase -u -b NEWPATH {}`",
        overlay.display(),
        resolved.display(),
        overlay.display()
    )]
    MissingBacking {
        overlay: std::path::PathBuf,
        name: String,
        resolved: std::path::PathBuf,
    },
    /// A new image would be part of its own backing chain.
    #[error(
        "{} cannot be created with that backing file: its chain leads back to itself ({chain}); \
         name a backing file that does not depend on {}",
        path.display(),
        path.display()
    )]
    CreateLoop {
        path: std::path::PathBuf,
        chain: String,
    },
    /// A rebase would make an overlay part of its own backing chain.
    #[error(
        "cannot rebase {} onto that file: its backing chain leads back to the overlay ({chain}); \
         name a backing file that does not depend on {}",
        overlay.display(),
        overlay.display()
    )]
    RebaseLoop {
        overlay: std::path::PathBuf,
        chain: String,
    },
    /// The backing chain is longer than [`crate::MAX_BACKING_DEPTH`].
    #[error("backing chain of {} is deeper than {limit} images", path.display())]
    BackingTooDeep { path: PathBuf, limit: usize },
    /// A format name vmdisk does not handle (in `-f`, `-F`, or a backing format extension).
    #[error("unknown or unsupported image format '{name}' (vmdisk handles raw and qcow2)")]
    UnknownFormat { name: String },
    /// A `-o` option or size that cannot be parsed or does not apply.
    #[error("invalid option '{option}': {reason}")]
    InvalidOption { option: String, reason: String },
    /// No size was given and none can be taken from a backing file.
    #[error("image size required: give SIZE, or a backing file to take it from")]
    SizeRequired,
    /// The operation needs a qcow2 image.
    #[error(
        "{} is not a qcow2 image (it is opened as {format} and looks like {looks_like}); {what} \
         works on qcow2 images only",
        path.display()
    )]
    NotQcow2 {
        path: PathBuf,
        format: crate::Format,
        looks_like: &'static str,
        what: &'static str,
    },
    /// The declared format (`-f`) does not match the file.
    #[error(
        "{} was given as {declared} (-f {declared}) but it looks like {looks_like}; {fix}",
        path.display()
    )]
    WrongFormat {
        path: PathBuf,
        declared: crate::Format,
        looks_like: &'static str,
        fix: &'static str,
    },
    /// Creating or inspecting a file on the host failed.
    #[error("cannot {op} {}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A copy's destination exists and replacing it was not asked for.
    #[error("{} already exists; pass --force to replace it", path.display())]
    DestinationExists { path: PathBuf },
    /// A copy's source and destination are one file.
    #[error("{} and {} are the same file", src.display(), dst.display())]
    SameFile { src: PathBuf, dst: PathBuf },
    /// A copy's source or destination is neither a regular file nor (for a source) a block
    /// device.
    #[error("{} is not a regular file", path.display())]
    NotRegularFile { path: PathBuf },
    /// `--reflink=always`, and the filesystem cannot share extents between the two files.
    #[error("cannot reflink {} to {}: {reason}", src.display(), dst.display())]
    ReflinkUnsupported {
        src: PathBuf,
        dst: PathBuf,
        reason: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The source got shorter while it was copied: something else is writing it.
    #[error("{} shrank while it was copied (expected {expected} bytes, it ends at {got})", path.display())]
    SourceShrank {
        path: PathBuf,
        expected: u64,
        got: u64,
    },
    /// The caller's cancel flag was raised (e.g. Ctrl-C); the partial output was removed and
    /// an existing destination (or an image edited in place) is as it was.
    #[error("writing {} was interrupted; it is as it was before and nothing was left behind", path.display())]
    Cancelled { path: PathBuf },
    /// An output would overwrite one of the command's own inputs.
    #[error(
        "{} is {role} ({}): writing it would destroy what is being read; choose another \
         destination",
        dst.display(),
        input.display()
    )]
    OutputIsInput {
        dst: PathBuf,
        input: PathBuf,
        role: String,
    },
    /// Not enough free space for the output, found before writing anything.
    #[error(
        "not enough space for {}: it needs about {} but {} has {} free; free some space or \
         write it elsewhere (nothing was written)",
        path.display(),
        crate::format_size(*needed),
        dir.display(),
        crate::format_size(*available)
    )]
    NoSpace {
        path: PathBuf,
        dir: PathBuf,
        needed: u64,
        available: u64,
    },
    /// A resize would make the image smaller and `--shrink` was not given.
    #[error(
        "{} would shrink from {} to {} bytes, which deletes everything past the new end (a \
         GPT disk's backup partition table lives in its last 16 KiB); make sure nothing \
         important is there, then pass --shrink (nothing was changed)",
        path.display(),
        old,
        new
    )]
    ShrinkWithoutFlag { path: PathBuf, old: u64, new: u64 },
    /// A directory was given where a file (an image, a destination) was expected.
    #[error("{} is a directory, not a disk image file", path.display())]
    IsADirectory { path: PathBuf },
    /// `resize --grow-fs`: what is inside the image cannot be grown; nothing was changed.
    #[error("{}: --grow-fs refused, nothing was changed", path.display())]
    ContentsRefused {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// `resize --grow-fs`: growing what is inside failed half-way; the image was put back.
    #[error("{}: growing the partition and filesystem inside (the image was put back as it was)", path.display())]
    GrowingContents {
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
}

impl Error {
    pub(crate) fn image(
        op: &'static str,
        path: &std::path::Path,
    ) -> impl FnOnce(vmdisk_block::Error) -> Error {
        let path = path.to_owned();
        move |source| Error::Image { op, path, source }
    }

    /// The underlying block error, when there is one.
    pub fn block_error(&self) -> Option<&vmdisk_block::Error> {
        match self {
            Error::Image { source, .. } => Some(source),
            _ => None,
        }
    }

    /// True when the image itself is damaged (as opposed to the host, the request or options).
    pub fn is_corrupt(&self) -> bool {
        self.block_error().is_some_and(|e| e.is_corrupt())
    }
}
