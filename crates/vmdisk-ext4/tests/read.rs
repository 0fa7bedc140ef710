//! Read side against debugfs, on every fixture variant.

mod common;
use common::*;
use std::sync::Arc;
use vmdisk_block::{BlockDevice, RawFile};
use vmdisk_ext4::{Ext4, FileKind, FsState};

fn open(img: &std::path::Path) -> Ext4 {
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(img, true).expect("open image"));
    Ext4::open(dev).expect("open ext4")
}

/// (mode, uid, gid, size, name) from `debugfs -R 'ls -l DIR'`.
fn debugfs_ls(img: &std::path::Path, dir: &str) -> Vec<(u32, u32, u32, u64, String)> {
    let out = String::from_utf8(debugfs(img, &format!("ls -l {dir}"))).expect("utf8");
    let mut v = Vec::new();
    for line in out.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 9 {
            continue;
        }
        let name = f[f.len() - 1].to_string();
        if name == "." || name == ".." {
            continue;
        }
        let mode = u32::from_str_radix(f[1], 8).expect("mode");
        v.push((
            mode,
            f[3].parse().expect("uid"),
            f[4].parse().expect("gid"),
            f[5].parse().expect("size"),
            name,
        ));
    }
    v.sort_by(|a, b| a.4.cmp(&b.4));
    v
}

#[test]
fn ls_cat_info_match_debugfs_on_all_variants() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    for (name, opts, mb) in VARIANTS {
        let img = mkfs(tmp.path(), &format!("{name}.img"), &src, *mb, opts);
        let fs = open(&img);
        let info = fs.fs_info();
        assert_eq!(info.label, "nixos", "{name}");
        assert_eq!(info.state, FsState::Clean, "{name}");
        assert_eq!(
            info.features.iter().any(|f| f == "metadata_csum"),
            !name.contains("metadata-csum") && !name.contains("no-csum"),
            "{name}: {:?}",
            info.features
        );
        assert!(info.has_journal);
        let uuid = String::from_utf8(debugfs(&img, "stats")).expect("utf8");
        assert!(uuid.contains(&info.uuid), "{name}: uuid {}", info.uuid);

        for dir in ["/", "/etc", "/data/deep/deeper", "/many"] {
            let ours: Vec<_> = fs
                .read_dir(dir)
                .expect("read_dir")
                .into_iter()
                .map(|e| (e.mode, e.uid, e.gid, e.size, e.name))
                .collect();
            let theirs: Vec<_> = debugfs_ls(&img, dir)
                .into_iter()
                .filter(|e| e.4 != "lost+found" || dir == "/")
                .collect();
            assert_eq!(ours, theirs, "{name}: ls -l {dir}");
        }
        let all = fs.walk("/").expect("walk");
        let files: Vec<_> = all.iter().filter(|e| e.kind == FileKind::File).collect();
        assert!(files.len() > 150, "{name}: walk found {}", files.len());
        for e in files.iter().filter(|e| !e.path.starts_with("/many/")) {
            let ours = fs.read_file(&e.path).expect("read_file");
            assert_eq!(
                ours,
                debugfs(&img, &format!("cat {}", e.path)),
                "{name}: cat {}",
                e.path
            );
            assert_eq!(ours.len() as u64, e.size);
        }
        let link = fs.stat("/etc/passwd.link").expect("stat");
        assert_eq!(link.kind, FileKind::Symlink);
        assert_eq!(link.symlink_target.as_deref(), Some("/etc/passwd"));
        assert_eq!(fs.read_link("/etc/long.link").expect("readlink").len(), 101);
        assert!(matches!(
            fs.stat("/nope"),
            Err(vmdisk_ext4::Error::NotFound { .. })
        ));
        assert!(matches!(
            fs.read_file("/etc"),
            Err(vmdisk_ext4::Error::IsADirectory { .. })
        ));
    }
}

#[test]
fn cp_out_keeps_content_modes_and_times() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let tmp = tempfile::tempdir().expect("tempdir");
    let src = tmp.path().join("src");
    populate(&src, SHADOW_OK);
    let img = mkfs(tmp.path(), "cp.img", &src, 32, &["-b", "1024"]);
    let fs = open(&img);
    let dest = tmp.path().join("out");
    let rep = fs.copy_out("/", &dest).expect("copy_out");
    assert!(rep.files > 150 && rep.symlinks == 2, "{rep:?}");
    for e in fs.walk("/").expect("walk") {
        let host = dest.join(e.path.trim_start_matches('/'));
        let md = std::fs::symlink_metadata(&host).expect("copied");
        match e.kind {
            FileKind::File => {
                assert_eq!(
                    std::fs::read(&host).expect("read"),
                    fs.read_file(&e.path).expect("read")
                );
                assert_eq!(
                    md.permissions().mode() & 0o7777,
                    e.mode & 0o7777,
                    "{}",
                    e.path
                );
                assert_eq!(md.mtime(), e.mtime, "{}", e.path);
            }
            FileKind::Dir => {
                assert_eq!(
                    md.permissions().mode() & 0o7777,
                    e.mode & 0o7777,
                    "{}",
                    e.path
                );
                assert_eq!(md.mtime(), e.mtime, "{}", e.path);
            }
            FileKind::Symlink => {
                assert_eq!(
                    std::fs::read_link(&host).expect("link").to_string_lossy(),
                    e.symlink_target.clone().expect("target")
                );
            }
            _ => {}
        }
    }
    let json = serde_json_like(&fs.stat("/etc/shadow").expect("stat"));
    assert!(json.contains("shadow"));
}

fn serde_json_like(e: &vmdisk_ext4::Entry) -> String {
    format!("{e:?}")
}
