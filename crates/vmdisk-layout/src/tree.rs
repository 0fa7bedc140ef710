//! A host directory tree as a value: what `--copy-in` puts into a filesystem, scanned once
//! (by `scan`) and then only read — planning, sizing and the FAT writer's layout all work on
//! this value, so the host tree is walked exactly once per build.

use std::ffi::OsString;
use std::path::PathBuf;

/// A scanned directory: its entries, sorted by name bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Tree {
    /// The directory that was scanned.
    pub dir: PathBuf,
    pub root: Vec<Node>,
    /// Metadata of the directory itself.
    pub meta: Meta,
    /// Entries below the root, all levels.
    pub entries: usize,
    /// Whether symlinks were followed (FAT) or recorded as links (ext, btrfs, xfs, f2fs).
    pub followed_links: bool,
}

/// One directory entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub name: OsString,
    /// Absolute (or as given) path of the entry on the host.
    pub src: PathBuf,
    pub meta: Meta,
    pub kind: Kind,
}

/// What `lstat` (or `stat` when links are followed) said.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// st_mode: file type and permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Apparent length in bytes.
    pub len: u64,
    /// Bytes the host allocated (st_blocks * 512).
    pub allocated: u64,
}

/// The kind of an entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir(Vec<Node>),
    /// A symlink (only when links are not followed), with its target.
    Symlink(PathBuf),
    /// A device node, FIFO or socket.
    Special,
}

impl Tree {
    /// Every node, depth first, parents before children.
    pub fn walk(&self) -> Vec<&Node> {
        fn go<'a>(nodes: &'a [Node], out: &mut Vec<&'a Node>) {
            for n in nodes {
                out.push(n);
                if let Kind::Dir(c) = &n.kind {
                    go(c, out);
                }
            }
        }
        let mut out = Vec::with_capacity(self.entries);
        go(&self.root, &mut out);
        out
    }
}

/// The scanned `--copy-in` trees of one disk, by partition number.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    items: Vec<(u32, Tree)>,
}

impl Sources {
    pub(crate) fn from_items(items: Vec<(u32, Tree)>) -> Sources {
        Sources { items }
    }

    /// No copy-in at all.
    pub fn none() -> Sources {
        Sources::default()
    }

    /// The tree copied into partition `number`, if any.
    pub fn get(&self, number: u32) -> Option<&Tree> {
        self.items
            .iter()
            .find(|(n, _)| *n == number)
            .map(|(_, t)| t)
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Bytes the host allocated for all the copied-in trees (files only): roughly what
    /// building the disk writes, for the free-space check before a build.
    pub fn allocated_bytes(&self) -> u64 {
        self.items
            .iter()
            .flat_map(|(_, t)| t.walk())
            .filter(|n| matches!(n.kind, Kind::File))
            .map(|n| n.meta.allocated.max(n.meta.len))
            .fold(0u64, u64::saturating_add)
    }
}
