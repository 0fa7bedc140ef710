//! `vmdisk cp-out` safety: DEST an existing directory, holes kept, no partial destination on
//! SIGINT/SIGTERM or ENOSPC, and a damaged filesystem copied as far as it can be (errors on
//! stderr, non-zero exit, like `cp -r`).

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tests::*;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn sh(cmd: &str) {
    let st = Command::new("sh").arg("-c").arg(cmd).status().expect("sh");
    assert!(st.success(), "`{cmd}` failed");
}

/// An ext4 image made by mke2fs -d from `src`.
fn mkfs(dir: &Path, src: &Path, mb: u64) -> PathBuf {
    let img = dir.join("fs.img");
    sh(&format!(
        "truncate -s {mb}M '{0}' && mkfs.ext4 -q -F -d '{1}' '{0}'",
        img.display(),
        src.display()
    ));
    img
}

fn temps_in(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.contains(".vmdisk-tmp-"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn cp_out_into_an_existing_directory_keeps_holes_and_metadata() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let src = tmp.join("src");
    std::fs::create_dir_all(src.join("etc")).unwrap();
    std::fs::write(src.join("etc/hostname"), "guest\n").unwrap();
    // A 1 GiB file holding 4 KiB of data: sparse in the image (mke2fs -d keeps holes).
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(src.join("sparse")).unwrap();
        f.set_len(1 << 30).unwrap();
        f.write_all_at(&[0x5a; 4096], 512 << 20).unwrap();
    }
    sh(&format!(
        "chmod 0640 '{0}/etc/hostname' && touch -d '2001-02-03 04:05:06' '{0}/etc/hostname'",
        src.display()
    ));
    let img = mkfs(tmp, &src, 64);
    // DEST an existing directory: DEST/basename, as cp.
    let out = tmp.join("out");
    std::fs::create_dir(&out).unwrap();
    vmdisk(&["cp-out", s(&img), "/etc/hostname", s(&out)]).ok();
    let h = out.join("hostname");
    assert_eq!(std::fs::read(&h).unwrap(), b"guest\n");
    let md = std::fs::metadata(&h).unwrap();
    assert_eq!(md.mode() & 0o7777, 0o640);
    assert_eq!(
        md.mtime(),
        std::fs::metadata(src.join("etc/hostname")).unwrap().mtime()
    );
    // Relative `.` as DEST, from another working directory.
    let cwd = tmp.join("cwd");
    std::fs::create_dir(&cwd).unwrap();
    vmdisk_in(&cwd, &["cp-out", s(&img), "/etc/hostname", "."]).ok();
    assert_eq!(std::fs::read(cwd.join("hostname")).unwrap(), b"guest\n");
    // Holes stay holes.
    vmdisk(&["cp-out", s(&img), "/sparse", s(&out)]).ok();
    let sp = out.join("sparse");
    let md = std::fs::metadata(&sp).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(
        md.blocks() * 512 <= 64 << 10,
        "a 1 GiB file holding 4 KiB took {} bytes on the host",
        md.blocks() * 512
    );
    assert_eq!(sha256(&sp), sha256(&src.join("sparse")));
    // A tree never merges into an existing directory.
    let r = vmdisk(&["cp-out", s(&img), "/etc", s(&out)]);
    assert_eq!(r.code(), 0, "{r}");
    let r = vmdisk(&["cp-out", s(&img), "/etc", s(&out)]);
    assert_ne!(
        r.code(),
        0,
        "copying /etc over an existing out/etc must fail:\n{r}"
    );
    assert!(temps_in(&out).is_empty(), "{:?}", temps_in(&out));
}

/// Spawn `vmdisk cp-out`, wait until its temporary output exists, send `sig`, and check that
/// DEST is as it was and no temporary is left.
fn interrupt_midway(img: &Path, src: &str, dest_dir: &Path, dest: &Path, sig: libc::c_int) {
    let before = dest.exists().then(|| sha256(dest));
    let mut child = Command::new(vmdisk_bin())
        .args(["cp-out", s(img), src, s(dest)])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmdisk");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if !temps_in(dest_dir).is_empty() {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "cp-out finished before its temporary was seen"
        );
        assert!(Instant::now() < deadline, "no temporary output appeared");
        std::thread::yield_now();
    }
    // SAFETY: kill(2) on our own child, which is still running (checked above).
    unsafe { libc::kill(child.id() as libc::pid_t, sig) };
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "cp-out was not interrupted: {err}");
    assert!(err.contains("interrupted"), "{err}");
    assert_eq!(dest.exists().then(|| sha256(dest)), before, "DEST changed");
    assert!(
        temps_in(dest_dir).is_empty(),
        "left {:?}",
        temps_in(dest_dir)
    );
}

#[test]
fn sigint_and_sigterm_leave_no_partial_destination() {
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let src = tmp.join("src");
    std::fs::create_dir_all(src.join("tree")).unwrap();
    // Compressible but non-zero data, so the compressed qcow2 below is slow enough to read
    // that the signal arrives mid-copy.
    sh(&format!(
        "yes 'vmdisk cp-out interrupt test data' | head -c 384M > '{}/big'",
        src.display()
    ));
    for i in 0..200 {
        std::fs::write(src.join(format!("tree/f{i}")), vec![i as u8 + 1; 200_000]).unwrap();
    }
    let raw = mkfs(tmp, &src, 512);
    let img = tmp.join("fs.qcow2");
    qemu_img(&["convert", "-c", "-O", "qcow2", s(&raw), s(&img)]).ok();
    let out = tmp.join("out");
    std::fs::create_dir(&out).unwrap();
    // A file: DEST absent, then DEST an existing file that must stay as it was.
    interrupt_midway(&img, "/big", &out, &out.join("big"), libc::SIGINT);
    std::fs::write(out.join("big"), b"precious").unwrap();
    interrupt_midway(&img, "/big", &out, &out.join("big"), libc::SIGTERM);
    assert_eq!(std::fs::read(out.join("big")).unwrap(), b"precious");
    // A tree.
    interrupt_midway(&img, "/", &out, &out.join("root"), libc::SIGTERM);
    interrupt_midway(&img, "/", &out, &out.join("root"), libc::SIGINT);
}

#[test]
fn enospc_is_refused_before_writing() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(euid, 0, "mounting a tmpfs needs root (CI is root)");
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let src = tmp.join("src");
    std::fs::create_dir_all(src.join("d")).unwrap();
    sh(&format!(
        "head -c 20M /dev/urandom > '{}/big'",
        src.display()
    ));
    sh(&format!(
        "head -c 3M /dev/urandom > '{}/d/a'",
        src.display()
    ));
    sh(&format!(
        "head -c 3M /dev/urandom > '{}/d/b'",
        src.display()
    ));
    sh(&format!(
        "head -c 3M /dev/urandom > '{}/d/c'",
        src.display()
    ));
    let img = mkfs(tmp, &src, 64);
    let small = tmp.join("small");
    std::fs::create_dir(&small).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=8M tmpfs '{}'",
        small.display()
    ));
    struct Umount(PathBuf);
    impl Drop for Umount {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Umount(small.clone());
    std::fs::write(small.join("big"), b"keep me").unwrap();
    for (from, to) in [("/big", "big"), ("/big", "new"), ("/d", "d")] {
        let r = vmdisk(&["cp-out", s(&img), from, s(&small.join(to))]);
        assert_ne!(r.code(), 0, "cp-out of {from} into 8 MiB must fail:\n{r}");
        assert!(r.stderr.contains("not enough space"), "{r}");
        assert!(temps_in(&small).is_empty(), "{:?}", temps_in(&small));
    }
    assert_eq!(std::fs::read(small.join("big")).unwrap(), b"keep me");
    assert!(!small.join("new").exists() && !small.join("d").exists());
}

#[test]
fn damaged_filesystem_is_listed_and_copied_as_far_as_possible() {
    // f_bad_inode_csum (e2fsprogs' corpus): inodes with bad checksums among readable files.
    let gz = workspace_root().join("../shared/corpus/e2fsprogs/images/f_bad_inode_csum.img.gz");
    let tmp = tempfile::tempdir().unwrap();
    let tmp = tmp.path();
    let img = tmp.join("bad.img");
    sh(&format!(
        "gzip -dc '{}' > '{}'",
        gz.display(),
        img.display()
    ));
    let r = vmdisk(&["ls", "-R", s(&img), "/"]);
    assert_eq!(r.code(), 1, "ls -R of a damaged filesystem exits 1:\n{r}");
    assert!(r.stderr.contains("checksum"), "{r}");
    let listed = r.stdout.lines().count();
    let r = vmdisk(&["ls", "-R", "--json", s(&img), "/"]);
    assert_eq!(r.code(), 1);
    let j = r.json();
    let all = j.as_array().unwrap();
    let bad = all.iter().filter(|e| e["error"].is_string()).count();
    assert!(
        bad > 0 && all.len() - bad >= 80,
        "{} entries, {bad} bad",
        all.len()
    );
    assert!(listed >= 80, "ls -R listed {listed}");
    let out = tmp.join("out");
    let r = vmdisk(&["cp-out", s(&img), "/", s(&out)]);
    assert_eq!(r.code(), 1, "cp-out goes on and exits 1:\n{r}");
    let copied = std::fs::read_dir(out.join("1"))
        .map(|d| d.count())
        .unwrap_or(0)
        + std::fs::read_dir(&out).unwrap().count();
    assert!(copied >= 20, "copied {copied}:\n{r}");
    // Every readable file is byte-identical to debugfs's view.
    let rd = tmp.join("rdump");
    std::fs::create_dir(&rd).unwrap();
    sh(&format!(
        "debugfs -R 'rdump / {}' '{}' >/dev/null 2>&1",
        rd.display(),
        img.display()
    ));
    let mut same = 0;
    let mut stack = vec![out.clone()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let rel = e.path().strip_prefix(&out).unwrap().to_path_buf();
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
            } else if e.file_type().unwrap().is_file() {
                assert_eq!(sha256(&e.path()), sha256(&rd.join(&rel)), "{rel:?}");
                same += 1;
            }
        }
    }
    assert!(same >= 20, "{same} files compared");
}
