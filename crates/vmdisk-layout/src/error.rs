//! The error taxonomy of vmdisk-layout.

use std::fmt;
use std::path::PathBuf;

/// Result of every layout operation.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A location in the layout JSON, rendered like a Nix attribute path
/// (`disko.devices.disk.main.content.partitions.root.size`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
#[serde(transparent)]
pub struct JsonPath(String);

impl JsonPath {
    /// The top level of the document.
    pub fn root() -> Self {
        JsonPath(String::new())
    }

    /// The path of member `key` below this one (quoted when it is not a plain name).
    pub fn key(&self, key: &str) -> Self {
        let plain = !key.is_empty()
            && key
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        let seg = if plain {
            key.to_string()
        } else {
            format!("{key:?}")
        };
        if self.0.is_empty() {
            JsonPath(seg)
        } else {
            JsonPath(format!("{}.{seg}", self.0))
        }
    }

    /// The path of array element `i`.
    pub fn index(&self, i: usize) -> Self {
        JsonPath(format!("{}[{i}]", self.0))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("(top level)")
        } else {
            f.write_str(&self.0)
        }
    }
}

/// What went wrong. Layout mistakes (`Json`, `Invalid`, `Unsupported`, disk selection, copy-in
/// selectors) are all found before a byte is written; the rest happen while applying.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The input is not JSON at all.
    #[error("malformed layout JSON")]
    ParsingJson(#[source] serde_json::Error),
    /// The layout breaks one of disko's rules (or one of ours) at `path`.
    #[error("{path}: {rule}")]
    Invalid { path: JsonPath, rule: String },
    /// The layout asks for something vmdisk does not build yet.
    #[error("{path}: {what} is not supported yet")]
    Unsupported { path: JsonPath, what: String },
    /// `--disk NAME` named no disk of the layout.
    #[error("the layout has no disk named {name:?} (it has: {available})")]
    NoSuchDisk { name: String, available: String },
    /// Several disks and no `--disk NAME`.
    #[error("the layout has several disks ({available}); pick one with --disk NAME")]
    AmbiguousDisk { available: String },
    /// The layout has no disk at all.
    #[error("{path}: the layout defines no disk")]
    NoDisk { path: JsonPath },
    /// A `--copy-in PART=DIR` that cannot be honoured.
    #[error("--copy-in {selector}: {rule}")]
    CopyIn { selector: String, rule: String },
    /// Neither a size argument nor `imageSize` gave the disk a size.
    #[error("{path}: no disk size: give SIZE (or `auto`) after the file name, or set imageSize")]
    NoDiskSize { path: JsonPath },
    /// Reading a copy-in source failed.
    #[error("reading {}", path.display())]
    ReadingSource {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The copy-in content does not fit the partition.
    #[error("{path}: the content copied in does not fit: {detail}")]
    ContentTooLarge { path: JsonPath, detail: String },
    /// Scratch files in the scratch directory.
    #[error("using scratch file {}", path.display())]
    Scratch {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// An external program (mke2fs, mkfs.btrfs, ...) could not be started.
    #[error("cannot run {tool} (install {package})")]
    SpawningTool {
        tool: &'static str,
        package: &'static str,
        #[source]
        source: std::io::Error,
    },
    /// The installed tool cannot make what the layout asks for.
    #[error("{path}: {detail}")]
    ToolLacks { path: JsonPath, detail: String },
    /// An external program failed.
    #[error("{path}: {tool} failed ({status}): {stderr}")]
    ToolFailed {
        path: JsonPath,
        tool: &'static str,
        status: String,
        stderr: String,
    },
    /// The target device is not the size the plan was made for.
    #[error("the target is {actual} bytes but the plan is for {planned} bytes")]
    TargetSize { planned: u64, actual: u64 },
    /// Reading or writing a device failed (IO, out of range, read-only, corrupt, limits).
    #[error(transparent)]
    Block(#[from] vmdisk_block::Error),
}

impl Error {
    pub(crate) fn invalid(path: &JsonPath, rule: impl Into<String>) -> Self {
        Error::Invalid {
            path: path.clone(),
            rule: rule.into(),
        }
    }

    pub(crate) fn unsupported(path: &JsonPath, what: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.clone(),
            what: what.into(),
        }
    }
}
