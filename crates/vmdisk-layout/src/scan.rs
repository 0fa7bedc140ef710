//! The IO half of `--copy-in`: resolve each `PART=DIR` selector against the disk and walk
//! each directory once into a [`Tree`] value. Everything after this works on the values.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::error::{Error, JsonPath, Result};
use crate::model::PlanOptions;
use crate::model::{Content, DiskSpec, FsFormat, PartitionSpec};
use crate::tree::{Kind, Meta, Node, Sources, Tree};

/// Directory depth followed when links are followed (FAT): also stops symlink loops.
pub const MAX_FOLLOWED_DEPTH: usize = 64;
/// Directory depth followed otherwise (links are not followed, so no loops).
pub const MAX_DEPTH: usize = 4096;
/// Entries one copy-in tree may hold: bounds the memory of the scanned value (~200 bytes each).
pub const MAX_TREE_ENTRIES: usize = 4_000_000;

/// Resolve `opts.copy_in` against `disk` and scan every directory once.
pub fn scan_copy_in(disk: &DiskSpec, opts: &PlanOptions) -> Result<Sources> {
    let mut items: Vec<(u32, Tree)> = Vec::new();
    for (sel, dir) in &opts.copy_in {
        let err = |rule: String| Error::CopyIn {
            selector: format!("{sel}={}", dir.display()),
            rule,
        };
        let matches: Vec<&PartitionSpec> = disk
            .partitions
            .iter()
            .filter(|p| p.answers_to(sel))
            .collect();
        let p = match matches.as_slice() {
            [one] => *one,
            [] => {
                let names: Vec<&str> = disk.partitions.iter().map(|p| p.key.as_str()).collect();
                return Err(err(format!(
                    "no partition of disk {:?} is called that (partitions: {})",
                    disk.name,
                    names.join(", ")
                )));
            }
            _ => return Err(err("more than one partition matches".into())),
        };
        let Content::Filesystem(fs) = &p.content else {
            return Err(err(format!("{} holds no filesystem", p.path)));
        };
        if items.iter().any(|(n, _)| *n == p.number) {
            return Err(err(format!("{} already gets a --copy-in", p.path)));
        }
        if !dir.is_dir() {
            return Err(err("not a directory".into()));
        }
        let follow = fs.format == FsFormat::Vfat;
        items.push((p.number, scan(dir, follow, &p.path)?));
    }
    Ok(Sources::from_items(items))
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::ReadingSource {
        path: path.to_owned(),
        source,
    }
}

fn meta_of(m: &fs::Metadata) -> Meta {
    Meta {
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        len: m.len(),
        allocated: m.blocks().saturating_mul(512),
    }
}

/// Walk `dir` into a [`Tree`]; `follow` resolves symlinks (what a FAT copy needs).
pub fn scan(dir: &Path, follow: bool, jp: &JsonPath) -> Result<Tree> {
    let m = fs::metadata(dir).map_err(io_err(dir))?;
    let mut entries = 0usize;
    let root = scan_dir(dir, follow, jp, 0, &mut entries)?;
    Ok(Tree {
        dir: dir.to_owned(),
        root,
        meta: meta_of(&m),
        entries,
        followed_links: follow,
    })
}

fn scan_dir(
    dir: &Path,
    follow: bool,
    jp: &JsonPath,
    depth: usize,
    entries: &mut usize,
) -> Result<Vec<Node>> {
    let limit = if follow {
        MAX_FOLLOWED_DEPTH
    } else {
        MAX_DEPTH
    };
    if depth > limit {
        return Err(if follow {
            Error::ContentTooLarge {
                path: jp.clone(),
                detail: format!(
                    "{} is nested deeper than {limit} directories (a symlink loop?)",
                    dir.display()
                ),
            }
        } else {
            Error::ReadingSource {
                path: dir.to_owned(),
                source: std::io::Error::other("directory tree too deep"),
            }
        });
    }
    let mut out = Vec::new();
    for e in fs::read_dir(dir).map_err(io_err(dir))? {
        let e = e.map_err(io_err(dir))?;
        let src = e.path();
        let m = if follow {
            fs::metadata(&src)
        } else {
            fs::symlink_metadata(&src)
        }
        .map_err(io_err(&src))?;
        *entries += 1;
        if *entries > MAX_TREE_ENTRIES {
            return Err(Error::ContentTooLarge {
                path: jp.clone(),
                detail: format!("more than {MAX_TREE_ENTRIES} files"),
            });
        }
        let ft = m.file_type();
        let kind = if ft.is_dir() {
            Kind::Dir(scan_dir(&src, follow, jp, depth + 1, entries)?)
        } else if ft.is_file() {
            Kind::File
        } else if ft.is_symlink() {
            Kind::Symlink(fs::read_link(&src).map_err(io_err(&src))?)
        } else {
            Kind::Special
        };
        out.push(Node {
            name: e.file_name(),
            src,
            meta: meta_of(&m),
            kind,
        });
    }
    out.sort_by(|a, b| a.name.as_encoded_bytes().cmp(b.name.as_encoded_bytes()));
    Ok(out)
}
