//! What to run for the filesystems vmdisk leaves to their own tools (btrfs, xfs, f2fs): the
//! command lines and, for xfs, the protofile that copies a tree in. Pure: `scratch` runs them.

use std::fmt::Write as _;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use crate::error::{Error, JsonPath, Result};
use crate::guid::Guid;
use crate::model::FsFormat;
use crate::tree::{Kind, Node, Tree};

const MIB: u64 = 1 << 20;

/// Smallest filesystem each tool makes: mkfs.btrfs 6.2 refuses below ~109 MiB, mkfs.xfs 6.1
/// below 300 MiB, mkfs.f2fs 1.15 below ~60 MiB (measured on Debian 12).
pub fn min_bytes(format: FsFormat) -> u64 {
    match format {
        FsFormat::Btrfs => 110 * MIB,
        FsFormat::Xfs => 300 * MIB,
        FsFormat::F2fs => 64 * MIB,
        FsFormat::Vfat | FsFormat::Ext2 | FsFormat::Ext3 | FsFormat::Ext4 => MIB,
    }
}

/// One program run on the scratch file (which is appended as the last argument).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ToolRun {
    pub program: &'static str,
    pub args: Vec<String>,
}

/// The tool runs that make `format` with `uuid` and disko's `extra_args`; `rootdir` is the
/// directory to copy in (btrfs `--rootdir`, f2fs `sload.f2fs -f`), `proto` the xfs
/// protofile's path, `subvolumes` the btrfs `--subvol` paths.
pub fn commands(
    format: FsFormat,
    uuid: Guid,
    extra_args: &[String],
    rootdir: Option<&Path>,
    proto: Option<&Path>,
    subvolumes: &[String],
) -> Vec<ToolRun> {
    let extra: Vec<String> = extra_args
        .iter()
        .filter(|a| !matches!(a.as_str(), "-f" | "--force" | "-q" | "--quiet"))
        .cloned()
        .collect();
    match format {
        FsFormat::Btrfs => {
            let mut args = vec!["-q".into(), "-f".into(), "-U".into(), uuid.to_string()];
            args.extend(extra);
            if let Some(d) = rootdir {
                args.push("--rootdir".into());
                args.push(d.display().to_string());
            }
            for s in subvolumes {
                args.push("--subvol".into());
                args.push(s.clone());
            }
            vec![ToolRun {
                program: "mkfs.btrfs",
                args,
            }]
        }
        FsFormat::Xfs => {
            let mut args = vec![
                "-q".into(),
                "-f".into(),
                "-m".into(),
                format!("uuid={uuid}"),
            ];
            args.extend(extra);
            if let Some(p) = proto {
                args.push("-p".into());
                args.push(p.display().to_string());
            }
            vec![ToolRun {
                program: "mkfs.xfs",
                args,
            }]
        }
        FsFormat::F2fs => {
            let mut args = vec!["-q".into(), "-f".into(), "-U".into(), uuid.to_string()];
            args.extend(extra);
            let mut runs = vec![ToolRun {
                program: "mkfs.f2fs",
                args,
            }];
            if let Some(d) = rootdir {
                runs.push(ToolRun {
                    program: "sload.f2fs",
                    args: vec!["-P".into(), "-f".into(), d.display().to_string()],
                });
            }
            runs
        }
        FsFormat::Vfat | FsFormat::Ext2 | FsFormat::Ext3 | FsFormat::Ext4 => Vec::new(),
    }
}

/// An xfs protofile (mkfs.xfs `-p`) that copies `tree` in: modes, owners, files by source
/// path, symlinks by target. Names with whitespace and device nodes cannot be written in a
/// protofile: those are refused.
pub fn xfs_protofile(tree: &Tree, jp: &JsonPath) -> Result<String> {
    let mut out = String::from("/ignored\n0 0\n");
    let root = &tree.meta;
    let _ = writeln!(
        out,
        "d--{:03o} {} {}",
        root.mode & 0o777,
        root.uid,
        root.gid
    );
    proto_dir(&tree.root, 1, &mut out, jp)?;
    out.push_str("$\n");
    Ok(out)
}

fn mode_string(kind: char, mode: u32) -> String {
    format!(
        "{kind}{}{}{:03o}",
        if mode & 0o4000 != 0 { 'u' } else { '-' },
        if mode & 0o2000 != 0 { 'g' } else { '-' },
        mode & 0o777
    )
}

fn proto_word(s: &[u8], what: &Path, jp: &JsonPath) -> Result<String> {
    match std::str::from_utf8(s) {
        Ok(t) if !t.is_empty() && !t.chars().any(char::is_whitespace) => Ok(t.to_string()),
        _ => Err(Error::ContentTooLarge {
            path: jp.clone(),
            detail: format!(
                "{}: mkfs.xfs protofiles cannot hold names or targets with whitespace or \
                 non-UTF-8 bytes",
                what.display()
            ),
        }),
    }
}

fn proto_dir(nodes: &[Node], depth: usize, out: &mut String, jp: &JsonPath) -> Result<()> {
    let pad = " ".repeat(depth);
    for n in nodes {
        let name = proto_word(n.name.as_bytes(), &n.src, jp)?;
        let m = n.meta;
        match &n.kind {
            Kind::Dir(c) => {
                let _ = writeln!(
                    out,
                    "{pad}{name} {} {} {}",
                    mode_string('d', m.mode),
                    m.uid,
                    m.gid
                );
                proto_dir(c, depth + 1, out, jp)?;
                let _ = writeln!(out, "{pad}$");
            }
            Kind::File => {
                let src = proto_word(n.src.as_os_str().as_bytes(), &n.src, jp)?;
                let _ = writeln!(
                    out,
                    "{pad}{name} {} {} {} {src}",
                    mode_string('-', m.mode),
                    m.uid,
                    m.gid
                );
            }
            Kind::Symlink(t) => {
                let t = proto_word(t.as_os_str().as_bytes(), &n.src, jp)?;
                let _ = writeln!(
                    out,
                    "{pad}{name} {} {} {} {t}",
                    mode_string('l', m.mode),
                    m.uid,
                    m.gid
                );
            }
            Kind::Special => {
                return Err(Error::ContentTooLarge {
                    path: jp.clone(),
                    detail: format!(
                        "{}: device nodes, FIFOs and sockets are not copied into xfs",
                        n.src.display()
                    ),
                })
            }
        }
    }
    Ok(())
}
