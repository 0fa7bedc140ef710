use std::io;
use std::path::PathBuf;

/// Result of every block operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What went wrong, kept in the classes a user has to act on differently.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The host failed an IO call; `op` says which step it was.
    #[error("{op} at offset {off} failed")]
    Io {
        op: &'static str,
        off: u64,
        #[source]
        source: io::Error,
    },
    /// Opening or locking a file on the host failed.
    #[error("cannot {op} {}", path.display())]
    File {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A request reached beyond the end of the device.
    #[error("request for {len} bytes at offset {off} is beyond the device size {size}")]
    OutOfRange { off: u64, len: u64, size: u64 },
    /// A write was asked of a device opened read-only.
    #[error("the device is read-only")]
    ReadOnly,
    /// The image's metadata is inconsistent; `what` names the structure, `off` where it lives.
    #[error("corrupt image: {what} (at host offset {off:#x})")]
    Corrupt { what: String, off: u64 },
    /// The image uses something vmdisk does not implement.
    #[error("unsupported: {what}")]
    Unsupported { what: String },
    /// A named safety limit would be exceeded (untrusted sizes are checked before allocating).
    #[error("limit exceeded: {what} needs {needed}, limit is {limit}")]
    Limit {
        what: &'static str,
        needed: u64,
        limit: u64,
    },
    /// The operation was interrupted (Ctrl-C, SIGTERM) through its [`crate::Cancel`] flag and
    /// stopped at a safe point.
    #[error("interrupted")]
    Interrupted,
    /// Another process holds a lock that conflicts with what we need.
    #[error("{}", lock_message(path, what, *pid))]
    Locked {
        path: PathBuf,
        what: String,
        pid: Option<i32>,
    },
}

fn lock_message(path: &std::path::Path, what: &str, pid: Option<i32>) -> String {
    let who = match pid {
        Some(p) if p > 0 => format!("process {p}"),
        _ => "another process (probably qemu)".to_string(),
    };
    format!(
        "{} is locked by {who}: it holds qemu's \"{what}\" lock. Stop the VM first, or copy \
         the running disk consistently with `vmdisk copy --qmp SOCKET`; read-only commands \
         accept -U/--force-share to read anyway",
        path.display()
    )
}

impl Error {
    /// Shorthand for an IO failure at `off`.
    pub fn io(op: &'static str, off: u64, source: io::Error) -> Self {
        Error::Io { op, off, source }
    }

    /// Shorthand for corrupt metadata.
    pub fn corrupt(what: impl Into<String>, off: u64) -> Self {
        Error::Corrupt {
            what: what.into(),
            off,
        }
    }

    /// Shorthand for an unsupported feature.
    pub fn unsupported(what: impl Into<String>) -> Self {
        Error::Unsupported { what: what.into() }
    }

    /// True when the failure says the image content is corrupt (not the host, the request, or
    /// one of vmdisk's own resource limits: an image that needs more than a [`Error::Limit`]
    /// allows may be perfectly valid).
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    /// True when the host ran out of space (ENOSPC or EDQUOT) during the failed step.
    pub fn is_no_space(&self) -> bool {
        let io = match self {
            Error::Io { source, .. } | Error::File { source, .. } => source,
            _ => return false,
        };
        matches!(io.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
    }
}
