//! Property tests of the ext4 editor: random sequences of operations against filesystems made
//! by `mke2fs` with varied features; after every sequence `e2fsck -fn` must be clean and
//! `debugfs rdump` must read back exactly the model's tree (content, mode, owner, symlinks).

use std::path::Path;
use std::sync::Arc;

use proptest::prelude::*;
use tests::ext4edit::{assert_fsck_clean, assert_same_tree, debugfs_tree, mkfs, Kind, Model, Node};
use vmdisk_block::RawFile;
use vmdisk_ext4::{Attrs, Editor};

#[derive(Debug, Clone)]
enum Op {
    Write { dir: usize, size: usize, seed: u8 },
    Overwrite { file: usize, size: usize, seed: u8 },
    Mkdir { dir: usize },
    Rm { node: usize },
    Chmod { node: usize, mode: u16 },
    Chown { node: usize, uid: u32, gid: u32 },
    Symlink { dir: usize, long: bool },
}

fn op() -> impl Strategy<Value = Op> {
    let size = prop_oneof![
        Just(0usize),
        1usize..100,
        900usize..5000,
        20_000usize..200_000,
    ];
    prop_oneof![
        4 => (any::<usize>(), size.clone(), any::<u8>())
            .prop_map(|(dir, size, seed)| Op::Write { dir, size, seed }),
        1 => (any::<usize>(), size, any::<u8>())
            .prop_map(|(file, size, seed)| Op::Overwrite { file, size, seed }),
        2 => any::<usize>().prop_map(|dir| Op::Mkdir { dir }),
        2 => any::<usize>().prop_map(|node| Op::Rm { node }),
        1 => // setuid/setgid/sticky are left out: rdump keeps only the 0777 bits (they are
        // checked with debugfs stat in `setuid_bits_survive`).
        (any::<usize>(), 0u16..0o777).prop_map(|(node, mode)| Op::Chmod { node, mode }),
        1 => (any::<usize>(), 0u32..70000, 0u32..70000)
            .prop_map(|(node, uid, gid)| Op::Chown { node, uid, gid }),
        1 => (any::<usize>(), any::<bool>()).prop_map(|(dir, long)| Op::Symlink { dir, long }),
    ]
}

fn content(size: usize, seed: u8) -> Vec<u8> {
    (0..size)
        .map(|i| {
            (i as u32)
                .wrapping_mul(2_654_435_761)
                .rotate_left(u32::from(seed) % 32) as u8
        })
        .collect()
}

fn pick(m: &Model, i: usize, f: impl Fn(&Node) -> bool) -> Option<String> {
    let v: Vec<&String> = m.iter().filter(|(_, n)| f(n)).map(|(k, _)| k).collect();
    if v.is_empty() {
        None
    } else {
        Some(v[i % v.len()].clone())
    }
}

fn pick_dir(m: &Model, i: usize) -> String {
    let mut v: Vec<String> = vec![String::new()];
    v.extend(
        m.iter()
            .filter(|(_, n)| n.kind == Kind::Dir)
            .map(|(k, _)| k.clone()),
    );
    v[i % v.len()].clone()
}

fn join(dir: &str, name: &str) -> String {
    if dir.is_empty() {
        name.to_string()
    } else {
        format!("{dir}/{name}")
    }
}

/// Apply `ops` to the image in `batches` commits, mirroring them in `model`.
fn apply(img: &Path, model: &mut Model, ops: &[Op], batches: usize, counter: &mut u32) {
    let chunk = ops.len().div_ceil(batches.max(1)).max(1);
    for part in ops.chunks(chunk) {
        let dev = Arc::new(RawFile::open(img, false).expect("open image"));
        let mut ed = Editor::open(dev).expect("open editor");
        for o in part {
            *counter += 1;
            let n = *counter;
            match o {
                Op::Write { dir, size, seed } => {
                    let d = pick_dir(model, *dir);
                    let p = join(&d, &format!("f{n}"));
                    let c = content(*size, *seed);
                    ed.write_file(
                        &format!("/{p}"),
                        &c,
                        Attrs {
                            mode: Some(0o640),
                            uid: Some(n),
                            gid: Some(7),
                        },
                    )
                    .unwrap_or_else(|e| panic!("write /{p}: {e}"));
                    model.insert(
                        p,
                        Node {
                            kind: Kind::File(c),
                            mode: 0o640,
                            uid: n,
                            gid: 7,
                        },
                    );
                }
                Op::Overwrite { file, size, seed } => {
                    let Some(p) = pick(model, *file, |n| matches!(n.kind, Kind::File(_))) else {
                        continue;
                    };
                    let c = content(*size, *seed);
                    ed.write_file(&format!("/{p}"), &c, Attrs::default())
                        .unwrap_or_else(|e| panic!("overwrite /{p}: {e}"));
                    if let Some(node) = model.get_mut(&p) {
                        node.kind = Kind::File(c);
                    }
                }
                Op::Mkdir { dir } => {
                    let d = pick_dir(model, *dir);
                    let p = join(&d, &format!("d{n}"));
                    ed.mkdir(
                        &format!("/{p}"),
                        Attrs {
                            mode: Some(0o750),
                            uid: Some(3),
                            gid: Some(n),
                        },
                        false,
                    )
                    .unwrap_or_else(|e| panic!("mkdir /{p}: {e}"));
                    model.insert(
                        p,
                        Node {
                            kind: Kind::Dir,
                            mode: 0o750,
                            uid: 3,
                            gid: n,
                        },
                    );
                }
                Op::Rm { node } => {
                    let Some(p) = pick(model, *node, |_| true) else {
                        continue;
                    };
                    ed.remove(&format!("/{p}"), true)
                        .unwrap_or_else(|e| panic!("rm -r /{p}: {e}"));
                    let pre = format!("{p}/");
                    model.retain(|k, _| k != &p && !k.starts_with(&pre));
                }
                Op::Chmod { node, mode } => {
                    let Some(p) = pick(model, *node, |n| !matches!(n.kind, Kind::Link(_))) else {
                        continue;
                    };
                    ed.chmod(&format!("/{p}"), *mode, false)
                        .unwrap_or_else(|e| panic!("chmod /{p}: {e}"));
                    if let Some(x) = model.get_mut(&p) {
                        x.mode = u32::from(*mode);
                    }
                }
                Op::Chown { node, uid, gid } => {
                    let Some(p) = pick(model, *node, |n| !matches!(n.kind, Kind::Link(_))) else {
                        continue;
                    };
                    ed.chown(&format!("/{p}"), Some(*uid), Some(*gid), false)
                        .unwrap_or_else(|e| panic!("chown /{p}: {e}"));
                    if let Some(x) = model.get_mut(&p) {
                        x.uid = *uid;
                        x.gid = *gid;
                    }
                }
                Op::Symlink { dir, long } => {
                    let d = pick_dir(model, *dir);
                    let p = join(&d, &format!("l{n}"));
                    let t = if *long {
                        format!("/nix/store/{}-target/{}", "x".repeat(60), n)
                    } else {
                        format!("../t{n}")
                    };
                    ed.symlink(&t, &format!("/{p}"), Attrs::default())
                        .unwrap_or_else(|e| panic!("ln -s {t} /{p}: {e}"));
                    model.insert(
                        p,
                        Node {
                            kind: Kind::Link(t),
                            mode: 0o777,
                            uid: 0,
                            gid: 0,
                        },
                    );
                }
            }
        }
        ed.commit().expect("commit");
    }
}

/// The mke2fs variants: (name, args).
const VARIANTS: &[(&str, &[&str])] = &[
    ("ext2-1k-128", &["-t", "ext2", "-b", "1024", "-I", "128"]),
    ("ext3-4k", &["-t", "ext3", "-b", "4096"]),
    (
        "ext4-nocsum-1k",
        &["-t", "ext4", "-O", "^metadata_csum", "-b", "1024"],
    ),
    ("ext4-csum-4k", &["-t", "ext4", "-b", "4096"]),
    (
        "ext4-csum-1k-128",
        &["-t", "ext4", "-b", "1024", "-I", "128"],
    ),
    (
        "ext4-nocsum-64bit-4k",
        &["-t", "ext4", "-O", "^metadata_csum,64bit", "-b", "4096"],
    ),
];

fn run_case(variant: usize, ops: &[Op], batches: usize) {
    let (name, args) = VARIANTS[variant % VARIANTS.len()];
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("fs.img");
    mkfs(&img, 48, args, None);
    let mut model = Model::new();
    let mut counter = 0u32;
    apply(&img, &mut model, ops, batches, &mut counter);
    assert_fsck_clean(&img, &format!("{name} after {ops:?}"));
    assert_same_tree(&debugfs_tree(&img), &model, name);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 12, max_shrink_iters: 20, ..ProptestConfig::default() })]
    #[test]
    fn random_edits_stay_consistent(
        variant in 0usize..VARIANTS.len(),
        ops in proptest::collection::vec(op(), 1..40),
        batches in 1usize..4,
    ) {
        run_case(variant, &ops, batches);
    }
}

/// Every variant at least once, with a fixed busy sequence.
#[test]
fn every_variant_fixed_sequence() {
    let mut ops = Vec::new();
    for i in 0..30usize {
        ops.push(match i % 7 {
            0 => Op::Write {
                dir: i,
                size: 150_000 + i,
                seed: i as u8,
            },
            1 => Op::Mkdir { dir: i },
            2 => Op::Write {
                dir: i,
                size: 3000,
                seed: 1,
            },
            3 => Op::Symlink {
                dir: i,
                long: i % 2 == 0,
            },
            4 => Op::Overwrite {
                file: i,
                size: 70_000,
                seed: 9,
            },
            5 => Op::Chown {
                node: i,
                uid: 1000,
                gid: 100,
            },
            _ => Op::Rm { node: i * 3 },
        });
    }
    for v in 0..VARIANTS.len() {
        run_case(v, &ops, 2);
    }
}

/// Mode bits rdump cannot carry (setuid, setgid), read with debugfs stat.
#[test]
fn setuid_bits_survive() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("fs.img");
    mkfs(&img, 16, &["-t", "ext4"], None);
    let dev = Arc::new(RawFile::open(&img, false).expect("open"));
    let mut ed = Editor::open(dev).expect("editor");
    ed.write_file(
        "/su",
        b"x",
        Attrs {
            mode: Some(0o4755),
            uid: Some(0),
            gid: Some(0),
        },
    )
    .expect("write");
    ed.mkdir("/sg", Attrs::default(), false).expect("mkdir");
    ed.chmod("/sg", 0o2775, false).expect("chmod");
    ed.mkdir(
        "/tmp",
        Attrs {
            mode: Some(0o1777),
            uid: None,
            gid: None,
        },
        false,
    )
    .expect("mkdir");
    ed.commit().expect("commit");
    assert_fsck_clean(&img, "setuid");
    let su = tests::ext4edit::debugfs(&img, "stat /su").stdout;
    assert!(su.contains("Mode:  04755"), "{su}");
    let sg = tests::ext4edit::debugfs(&img, "stat /sg").stdout;
    assert!(sg.contains("Mode:  02775"), "{sg}");
    let t = tests::ext4edit::debugfs(&img, "stat /tmp").stdout;
    assert!(t.contains("Mode:  01777"), "{t}");
}

/// A directory with thousands of entries, indexed (htree) by `e2fsck -fyD`: adding and
/// removing entries keeps the filesystem clean and the tree exact.
#[test]
fn htree_directory_with_thousands_of_entries() {
    for (name, args) in [
        ("csum-4k", &["-t", "ext4", "-b", "4096"][..]),
        (
            "nocsum-1k",
            &["-t", "ext4", "-O", "^metadata_csum", "-b", "1024"][..],
        ),
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("big")).expect("mkdir");
        for i in 0..3000 {
            std::fs::write(
                src.join("big")
                    .join(format!("entry-with-a-longish-name-{i:05}")),
                b"",
            )
            .expect("write");
        }
        let img = dir.path().join("fs.img");
        mkfs(&img, 64, args, Some(&src));
        let r = tests::run(std::process::Command::new("e2fsck").arg("-fyD").arg(&img));
        assert!(r.code() <= 1, "e2fsck -fyD: {}{}", r.stdout, r.stderr);
        let st = tests::ext4edit::debugfs(&img, "stat /big").stdout;
        assert!(
            st.contains("Flags: 0x1000") || st.contains("Flags: 0x81000"),
            "{name}: /big is not indexed: {st}"
        );
        let mut model = debugfs_tree(&img);
        assert!(
            model.len() > 3000,
            "{name}: populated tree has {} entries",
            model.len()
        );
        let dev = Arc::new(RawFile::open(&img, false).expect("open"));
        let mut ed = Editor::open(dev).expect("editor");
        for i in 0..300 {
            let p = format!("big/new-{i}");
            ed.write_file(&format!("/{p}"), b"hello", Attrs::default())
                .expect("write");
            model.insert(
                p,
                Node {
                    kind: Kind::File(b"hello".to_vec()),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            );
        }
        for i in (0..3000).step_by(7) {
            let p = format!("big/entry-with-a-longish-name-{i:05}");
            ed.remove(&format!("/{p}"), false).expect("rm");
            model.remove(&p);
        }
        ed.commit().expect("commit");
        assert_fsck_clean(&img, name);
        assert_same_tree(&debugfs_tree(&img), &model, name);
    }
}

/// A file in fragmented free space needs more than 4 extents: the extent tree grows to depth
/// 1, and debugfs reads it back.
#[test]
fn extent_tree_grows_in_depth() {
    let dir = tempfile::tempdir().expect("tempdir");
    let img = dir.path().join("fs.img");
    mkfs(&img, 32, &["-t", "ext4", "-b", "1024"], None);
    let dev = Arc::new(RawFile::open(&img, false).expect("open"));
    let mut ed = Editor::open(dev).expect("editor");
    // 400 one-block files, then every other one removed: free space in 1-block holes.
    for i in 0..400 {
        ed.write_file(&format!("/h{i}"), &[i as u8; 1000], Attrs::default())
            .expect("write");
    }
    ed.commit().expect("commit");
    let dev = Arc::new(RawFile::open(&img, false).expect("open"));
    let mut ed = Editor::open(dev).expect("editor");
    let mut model = Model::new();
    for i in 0..400 {
        if i % 2 == 0 {
            ed.remove(&format!("/h{i}"), false).expect("rm");
        } else {
            model.insert(
                format!("h{i}"),
                Node {
                    kind: Kind::File(vec![i as u8; 1000]),
                    mode: 0o644,
                    uid: 0,
                    gid: 0,
                },
            );
        }
    }
    ed.commit().expect("commit");
    let dev = Arc::new(RawFile::open(&img, false).expect("open"));
    let mut ed = Editor::open(dev).expect("editor");
    // Holes from the removals in this same edit are not reused; the ones above are.
    let big = content(180 * 1024, 5);
    ed.write_file("/frag", &big, Attrs::default())
        .expect("write frag");
    model.insert(
        "frag".into(),
        Node {
            kind: Kind::File(big),
            mode: 0o644,
            uid: 0,
            gid: 0,
        },
    );
    ed.commit().expect("commit");
    assert_fsck_clean(&img, "fragmented");
    let ex = tests::ext4edit::debugfs(&img, "ex /frag").stdout;
    // debugfs prints "LEVEL/ DEPTH" first: an index level 0 of a depth-1 tree.
    assert!(
        ex.lines().any(|l| l.trim_start().starts_with("0/ 1")),
        "extent tree of /frag has no depth: {ex}"
    );
    assert_same_tree(&debugfs_tree(&img), &model, "fragmented");
}
