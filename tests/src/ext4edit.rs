//! Helpers for the ext4 editor tests (`tests/tests/ext4_edit_*.rs`): filesystems made by
//! `mke2fs`, checked by `e2fsck -fn`, read back by `debugfs rdump` (and the kernel), compared
//! with a model tree.

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use crate::{require_tool, run, Run};

/// One node of the expected tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    File(Vec<u8>),
    Dir,
    Link(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: Kind,
    /// Permission bits (symlinks: ignored).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Path (relative, "a/b") -> node. The root itself is not in the map.
pub type Model = BTreeMap<String, Node>;

/// Make a filesystem image of `mib` MiB with `mke2fs ARGS` (and `-d DIR` when given).
pub fn mkfs(img: &Path, mib: u64, args: &[&str], populate: Option<&Path>) -> Run {
    require_tool("mke2fs");
    let f = std::fs::File::create(img).expect("create image");
    f.set_len(mib << 20).expect("size image");
    drop(f);
    let mut c = Command::new("mke2fs");
    c.args(["-F", "-q", "-E", "root_owner=0:0"]).args(args);
    if let Some(d) = populate {
        c.arg("-d").arg(d);
    }
    c.arg(img);
    run(&mut c).ok()
}

/// `e2fsck -fn IMG`: (exit code, output).
pub fn e2fsck(img: &Path) -> (i32, String) {
    require_tool("e2fsck");
    let r = run(Command::new("e2fsck").arg("-fn").arg(img));
    (r.code(), format!("{}{}", r.stdout, r.stderr))
}

/// Panic unless `e2fsck -fn` finds nothing to fix.
pub fn assert_fsck_clean(img: &Path, what: &str) {
    let (code, out) = e2fsck(img);
    assert_eq!(code, 0, "{what}: e2fsck -fn is not clean:\n{out}");
}

/// `debugfs -R CMD IMG` output.
pub fn debugfs(img: &Path, cmd: &str) -> Run {
    require_tool("debugfs");
    run(Command::new("debugfs").arg("-R").arg(cmd).arg(img))
}

/// Read a host tree (as `rdump` or a mount leaves it) into a model.
pub fn read_host_tree(root: &Path) -> Model {
    let mut m = Model::new();
    walk(root, root, &mut m);
    m
}

fn walk(root: &Path, dir: &Path, m: &mut Model) {
    let mut ents: Vec<_> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry"))
        .collect();
    ents.sort_by_key(|e| e.file_name());
    for e in ents {
        let p = e.path();
        let rel = p
            .strip_prefix(root)
            .expect("under root")
            .to_string_lossy()
            .into_owned();
        if rel == "lost+found" {
            continue;
        }
        let md = std::fs::symlink_metadata(&p).expect("lstat");
        let kind = if md.file_type().is_symlink() {
            Kind::Link(
                std::fs::read_link(&p)
                    .expect("readlink")
                    .to_string_lossy()
                    .into_owned(),
            )
        } else if md.is_dir() {
            Kind::Dir
        } else {
            Kind::File(std::fs::read(&p).expect("read"))
        };
        let mode = if md.file_type().is_symlink() {
            0o777
        } else {
            md.permissions().mode() & 0o7777
        };
        let isdir = md.is_dir();
        m.insert(
            rel,
            Node {
                kind,
                mode,
                uid: md.uid(),
                gid: md.gid(),
            },
        );
        if isdir {
            walk(root, &p, m);
        }
    }
}

/// `debugfs rdump /` into a fresh directory and read it back.
pub fn debugfs_tree(img: &Path) -> Model {
    let out = tempfile::tempdir().expect("tempdir");
    let r = debugfs(img, &format!("rdump / {}", out.path().display()));
    assert!(
        !r.stderr.contains("rdump:") || r.stderr.lines().all(|l| !l.contains("rdump")),
        "debugfs rdump failed: {}",
        r.stderr
    );
    read_host_tree(out.path())
}

/// Compare trees, naming the first difference.
pub fn assert_same_tree(got: &Model, want: &Model, what: &str) {
    for (k, w) in want {
        match got.get(k) {
            None => panic!("{what}: {k} is missing"),
            Some(g) => {
                let norm = |n: &Node| {
                    let mut n = n.clone();
                    if let Kind::Link(_) = n.kind {
                        // rdump does not chown symlinks; their mode is always 0777.
                        n.mode = 0o777;
                        n.uid = 0;
                        n.gid = 0;
                    }
                    n
                };
                let (g, w) = (norm(g), norm(w));
                if g != w {
                    let short = |n: &Node| match &n.kind {
                        Kind::File(c) => format!(
                            "file {} bytes mode {:o} {}:{}",
                            c.len(),
                            n.mode,
                            n.uid,
                            n.gid
                        ),
                        Kind::Dir => format!("dir mode {:o} {}:{}", n.mode, n.uid, n.gid),
                        Kind::Link(t) => format!("link -> {t} {}:{}", n.uid, n.gid),
                    };
                    panic!("{what}: {k} differs: got {}, want {}", short(&g), short(&w));
                }
            }
        }
    }
    for k in got.keys() {
        assert!(want.contains_key(k), "{what}: unexpected {k}");
    }
}

/// The crash tests' batch edit: 150 new files, a 1 MiB file, a tree removed, modes and owners
/// changed, a file replaced — one commit.
pub fn crash_batch(
    dev: std::sync::Arc<dyn vmdisk_block::BlockDevice>,
) -> Result<vmdisk_ext4::CommitReport, vmdisk_ext4::Error> {
    use vmdisk_ext4::{Attrs, Editor};
    let mut ed = Editor::open(dev)?;
    ed.mkdir("/new", Attrs::default(), false)?;
    for i in 0..150 {
        ed.write_file(
            &format!("/new/f{i}"),
            format!("content {i}\n").as_bytes(),
            Attrs::default(),
        )?;
    }
    let big: Vec<u8> = (0..1_048_576u32).map(|i| (i * 7 % 253) as u8).collect();
    ed.write_file(
        "/new/big",
        &big,
        Attrs {
            mode: Some(0o600),
            uid: Some(5),
            gid: Some(6),
        },
    )?;
    ed.remove("/old", true)?;
    ed.chown("/keep", Some(1000), Some(100), true)?;
    ed.chmod("/keep/a", 0o700, false)?;
    ed.write_file("/keep/a/replaced", b"new content", Attrs::default())?;
    ed.commit()
}
