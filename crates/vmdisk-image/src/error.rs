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
    #[error("{} is a {format} image; {what} needs qcow2", path.display())]
    NotQcow2 {
        path: PathBuf,
        format: crate::Format,
        what: &'static str,
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
    /// The caller's cancel flag was raised (e.g. Ctrl-C); the partial copy was removed.
    #[error("copying to {} was interrupted; nothing was left behind", path.display())]
    Cancelled { path: PathBuf },
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
