//! A writer for "newc" cpio archives, the format the Linux kernel unpacks as an initramfs.
//!
//! ```text
//!  entry   = header(110 bytes) name NUL pad4 data pad4
//!  header  = "070701" and 13 fields of 8 hex digits:
//!            ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor
//!            namesize(incl. NUL) check(0)
//!  archive = entry* trailer("TRAILER!!!") zero padding to a multiple of 512
//! ```
//!
//! Output is deterministic: mtime, uid and gid are 0 and inode numbers count up from 1 in the
//! order entries are added, so the same calls give the same bytes.

use std::collections::HashSet;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path};

use anyhow::{bail, ensure, Context, Result};

/// newc header magic.
const MAGIC: &[u8; 6] = b"070701";
/// Name of the end-of-archive entry.
const TRAILER: &str = "TRAILER!!!";
/// The archive is padded to a multiple of this, as cpio(1) does.
const BLOCK: u64 = 512;
/// The header's file size field is 32 bits.
const MAX_FILE_LEN: u64 = u32::MAX as u64;
/// Longest entry name (PATH_MAX).
const MAX_NAME_LEN: usize = 4096;
/// Directory depth `append_tree` descends to before giving up on a (looping) tree.
const MAX_TREE_DEPTH: usize = 64;

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;

/// Writes a newc cpio archive to `W`. Call [`CpioWriter::finish`] to write the trailer.
pub struct CpioWriter<W: Write> {
    out: W,
    /// Bytes written so far, for alignment.
    pos: u64,
    next_ino: u32,
    names: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            pos: 0,
            next_ino: 1,
            names: HashSet::new(),
        }
    }

    /// Add a directory. `path` is relative to the archive root (a leading `/` is dropped);
    /// `mode` holds the permission bits (e.g. `0o755`).
    pub fn dir(&mut self, path: &str, mode: u32) -> Result<()> {
        let name = self.claim(path)?;
        self.entry(&name, S_IFDIR | (mode & 0o7777), 2, &[])
    }

    /// Add a regular file with permission bits `mode` (e.g. `0o644`) and contents `data`.
    pub fn file(&mut self, path: &str, mode: u32, data: &[u8]) -> Result<()> {
        ensure!(
            data.len() as u64 <= MAX_FILE_LEN,
            "cpio: {path} is {} bytes; newc entries hold at most {MAX_FILE_LEN}",
            data.len()
        );
        let name = self.claim(path)?;
        self.entry(&name, S_IFREG | (mode & 0o7777), 1, data)
    }

    /// Add a symlink at `path` pointing to `target` (stored as is).
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        ensure!(
            !target.is_empty(),
            "cpio: symlink {path} has an empty target"
        );
        ensure!(
            target.len() <= MAX_NAME_LEN,
            "cpio: symlink {path} has a target longer than {MAX_NAME_LEN} bytes"
        );
        let name = self.claim(path)?;
        self.entry(&name, S_IFLNK | 0o777, 1, target.as_bytes())
    }

    /// Write the trailer and pad to 512 bytes; returns the inner writer.
    pub fn finish(mut self) -> Result<W> {
        self.header(0, 0, 1, 0, TRAILER)?;
        let pad = (BLOCK - self.pos % BLOCK) % BLOCK;
        self.write(&vec![0u8; pad as usize])?;
        self.out.flush().context("cpio: flushing the archive")?;
        Ok(self.out)
    }

    /// Normalise `path` and refuse duplicates, `..`, empty names and the trailer's name.
    fn claim(&mut self, path: &str) -> Result<String> {
        let mut parts = Vec::new();
        for c in Path::new(path).components() {
            match c {
                Component::Normal(p) => parts.push(
                    p.to_str()
                        .with_context(|| format!("cpio: {path:?} is not UTF-8"))?,
                ),
                Component::RootDir | Component::CurDir => {}
                Component::ParentDir | Component::Prefix(_) => {
                    bail!("cpio: entry name {path:?} must not contain `..`")
                }
            }
        }
        ensure!(!parts.is_empty(), "cpio: empty entry name {path:?}");
        let name = parts.join("/");
        ensure!(
            name.len() <= MAX_NAME_LEN,
            "cpio: entry name {name} is longer than {MAX_NAME_LEN} bytes"
        );
        ensure!(
            name != TRAILER,
            "cpio: {TRAILER} is reserved for the trailer"
        );
        ensure!(
            self.names.insert(name.clone()),
            "cpio: {name} was added twice"
        );
        Ok(name)
    }

    fn entry(&mut self, name: &str, mode: u32, nlink: u32, data: &[u8]) -> Result<()> {
        let ino = self.next_ino;
        self.next_ino = self
            .next_ino
            .checked_add(1)
            .context("cpio: more than 2^32 entries")?;
        self.header(ino, mode, nlink, data.len() as u32, name)?;
        self.write(data)?;
        self.pad4()
    }

    fn header(&mut self, ino: u32, mode: u32, nlink: u32, filesize: u32, name: &str) -> Result<()> {
        let namesize = name.len() as u32 + 1;
        let mut h = Vec::with_capacity(110 + name.len() + 4);
        h.extend_from_slice(MAGIC);
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        for field in [ino, mode, 0, 0, nlink, 0, filesize, 0, 0, 0, 0, namesize, 0] {
            h.extend_from_slice(format!("{field:08x}").as_bytes());
        }
        h.extend_from_slice(name.as_bytes());
        h.push(0);
        self.write(&h)?;
        self.pad4()
    }

    fn pad4(&mut self) -> Result<()> {
        let pad = (4 - self.pos % 4) % 4;
        self.write(&[0u8; 3][..pad as usize])
    }

    fn write(&mut self, bytes: &[u8]) -> Result<()> {
        self.out
            .write_all(bytes)
            .context("cpio: writing the archive")?;
        self.pos += bytes.len() as u64;
        Ok(())
    }
}

/// Add the contents of `host_dir` recursively, in sorted order, under `prefix` inside the
/// archive (`""` for the root; the prefix directory itself is added when non-empty). Regular
/// files, directories and symlinks are copied with their permission bits; anything else
/// (devices, sockets, fifos) is refused.
pub fn append_tree<W: Write>(w: &mut CpioWriter<W>, host_dir: &Path, prefix: &str) -> Result<()> {
    let md = fs::metadata(host_dir).with_context(|| format!("reading {}", host_dir.display()))?;
    ensure!(md.is_dir(), "{} is not a directory", host_dir.display());
    let prefix = prefix.trim_matches('/');
    if !prefix.is_empty() {
        w.dir(prefix, md.permissions().mode())?;
    }
    walk(w, host_dir, prefix, 0)
}

fn walk<W: Write>(w: &mut CpioWriter<W>, dir: &Path, prefix: &str, depth: usize) -> Result<()> {
    ensure!(
        depth <= MAX_TREE_DEPTH,
        "{} is nested more than {MAX_TREE_DEPTH} directories deep",
        dir.display()
    );
    let mut entries = fs::read_dir(dir)
        .with_context(|| format!("reading directory {}", dir.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("reading directory {}", dir.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let host = e.path();
        let file_name = e.file_name();
        let file_name = file_name
            .to_str()
            .with_context(|| format!("{} has a non-UTF-8 name", host.display()))?;
        let name = if prefix.is_empty() {
            file_name.to_string()
        } else {
            format!("{prefix}/{file_name}")
        };
        let md =
            fs::symlink_metadata(&host).with_context(|| format!("reading {}", host.display()))?;
        let ft = md.file_type();
        let mode = md.permissions().mode();
        if ft.is_symlink() {
            let target =
                fs::read_link(&host).with_context(|| format!("reading {}", host.display()))?;
            let target = target
                .to_str()
                .with_context(|| format!("symlink {} has a non-UTF-8 target", host.display()))?;
            w.symlink(&name, target)?;
        } else if ft.is_dir() {
            w.dir(&name, mode)?;
            walk(w, &host, &name, depth + 1)?;
        } else if ft.is_file() {
            ensure!(
                md.len() <= MAX_FILE_LEN,
                "{} is {} bytes; newc entries hold at most {MAX_FILE_LEN}",
                host.display(),
                md.len()
            );
            let data = fs::read(&host).with_context(|| format!("reading {}", host.display()))?;
            w.file(&name, mode, &data)?;
        } else {
            bail!(
                "{} is neither a file, a directory nor a symlink; initramfs trees hold only those",
                host.display()
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, PartialEq, Eq)]
    struct Entry {
        ino: u32,
        mode: u32,
        nlink: u32,
        name: String,
        data: Vec<u8>,
    }

    fn hex(b: &[u8]) -> u32 {
        u32::from_str_radix(std::str::from_utf8(b).unwrap(), 16).unwrap()
    }

    /// A strict newc reader: checks magic, alignment, zero uid/gid/mtime and the trailer.
    fn read_all(mut b: &[u8]) -> Vec<Entry> {
        let total = b.len();
        assert_eq!(total % 512, 0, "archive is padded to 512");
        let mut out = Vec::new();
        loop {
            let off = total - b.len();
            assert_eq!(off % 4, 0);
            assert_eq!(&b[..6], MAGIC);
            let f = |i: usize| hex(&b[6 + i * 8..14 + i * 8]);
            let (ino, mode, uid, gid, nlink, mtime, size, namesize) =
                (f(0), f(1), f(2), f(3), f(4), f(5), f(6), f(11));
            assert_eq!((uid, gid, mtime), (0, 0, 0));
            let name_end = 110 + namesize as usize;
            let name = std::str::from_utf8(&b[110..name_end - 1])
                .unwrap()
                .to_string();
            assert_eq!(b[name_end - 1], 0);
            let data_start = (off + name_end).next_multiple_of(4) - off;
            let data_end = data_start + size as usize;
            let data = b[data_start..data_end].to_vec();
            let next = (off + data_end).next_multiple_of(4) - off;
            b = &b[next..];
            if name == TRAILER {
                assert!(b.iter().all(|&x| x == 0));
                return out;
            }
            out.push(Entry {
                ino,
                mode,
                nlink,
                name,
                data,
            });
        }
    }

    #[test]
    fn tiny_archive_has_the_exact_newc_layout() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("/a", 0o644, b"hi").unwrap();
        let bytes = w.finish().unwrap();
        // ino mode uid gid nlink mtime filesize devmaj devmin rdevmaj rdevmin namesize check
        let mut want = Vec::new();
        want.extend_from_slice(b"070701");
        for f in [
            "00000001", "000081a4", "00000000", "00000000", "00000001", "00000000", "00000002",
            "00000000", "00000000", "00000000", "00000000", "00000002", "00000000",
        ] {
            want.extend_from_slice(f.as_bytes());
        }
        // Header (110) + "a\0" = 112, already aligned; data "hi" + 2 bytes of padding.
        want.extend_from_slice(b"a\0hi\0\0");
        want.extend_from_slice(b"070701");
        for f in [
            "00000000", "00000000", "00000000", "00000000", "00000001", "00000000", "00000000",
            "00000000", "00000000", "00000000", "00000000", "0000000b", "00000000",
        ] {
            want.extend_from_slice(f.as_bytes());
        }
        want.extend_from_slice(b"TRAILER!!!\0");
        while want.len() % 4 != 0 {
            want.push(0);
        }
        want.resize(512, 0);
        assert_eq!(bytes.len(), 512);
        assert_eq!(
            String::from_utf8_lossy(&bytes),
            String::from_utf8_lossy(&want)
        );
    }

    #[test]
    fn round_trip_of_dirs_files_and_symlinks() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o4755, b"\x7fELF...").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\n").unwrap();
        w.file("empty", 0o600, b"").unwrap();
        let entries = read_all(&w.finish().unwrap());
        let got: Vec<(u32, u32, u32, &str, &[u8])> = entries
            .iter()
            .map(|e| (e.ino, e.mode, e.nlink, e.name.as_str(), e.data.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                (1, 0o040755, 2, "bin", &b""[..]),
                (2, 0o104755, 1, "bin/busybox", b"\x7fELF..."),
                (3, 0o120777, 1, "bin/sh", b"busybox"),
                (4, 0o100755, 1, "init", b"#!/bin/sh\n"),
                (5, 0o100600, 1, "empty", b""),
            ]
        );
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(w.file("../etc/passwd", 0o644, b"").is_err());
        assert!(w.file("/", 0o644, b"").is_err());
        assert!(w.file("TRAILER!!!", 0o644, b"").is_err());
        w.file("a", 0o644, b"").unwrap();
        let err = w.file("./a", 0o644, b"").unwrap_err().to_string();
        assert!(err.contains("added twice"), "{err}");
        assert!(w.symlink("l", "").is_err());
    }

    #[test]
    fn append_tree_is_sorted_and_keeps_modes() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("b/sub")).unwrap();
        fs::write(root.join("b/sub/z"), b"zz").unwrap();
        fs::write(root.join("a"), b"aaa").unwrap();
        fs::set_permissions(root.join("a"), fs::Permissions::from_mode(0o750)).unwrap();
        std::os::unix::fs::symlink("b/sub/z", root.join("c")).unwrap();
        let mut w = CpioWriter::new(Vec::new());
        append_tree(&mut w, root, "/pre/").unwrap();
        let entries = read_all(&w.finish().unwrap());
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(
            names,
            ["pre", "pre/a", "pre/b", "pre/b/sub", "pre/b/sub/z", "pre/c"]
        );
        assert_eq!(entries[1].mode, 0o100750);
        assert_eq!(entries[1].data, b"aaa");
        assert_eq!(entries[5].mode & 0o170000, S_IFLNK);
        assert_eq!(entries[5].data, b"b/sub/z");

        let mut w = CpioWriter::new(Vec::new());
        append_tree(&mut w, root, "").unwrap();
        let entries = read_all(&w.finish().unwrap());
        assert_eq!(entries[0].name, "a");
    }

    /// GNU cpio, the independent reader (CI installs it: xtask/src/deps.rs TOOLS).
    fn gnu_cpio(args: &[&str], dir: &Path, stdin: &Path) -> std::process::Output {
        let input = fs::File::open(stdin).unwrap();
        std::process::Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(input)
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "running cpio: {e}. This test needs GNU cpio (Debian: apt-get install cpio; \
                     `cargo xtask test` installs it)"
                )
            })
    }

    #[test]
    fn gnu_cpio_reads_the_archive() {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("d", 0o755).unwrap();
        w.file("d/f", 0o640, b"hello").unwrap();
        w.symlink("d/l", "f").unwrap();
        w.file("top", 0o755, b"#!/bin/sh\n").unwrap();
        let bytes = w.finish().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let archive = dir.path().join("a.cpio");
        fs::write(&archive, bytes).unwrap();

        let list = gnu_cpio(&["-itv", "--quiet"], dir.path(), &archive);
        assert!(list.status.success(), "cpio -t: {list:?}");
        let text = String::from_utf8_lossy(&list.stdout);
        let lines: Vec<(&str, &str)> = text
            .lines()
            .map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f[0], l.rsplit_once(char::is_whitespace).map_or("", |x| x.1))
            })
            .collect();
        let modes: Vec<&str> = lines.iter().map(|l| l.0).collect();
        assert_eq!(
            modes,
            ["drwxr-xr-x", "-rw-r-----", "lrwxrwxrwx", "-rwxr-xr-x"],
            "{text}"
        );
        assert!(text.contains("d/l -> f"), "{text}");

        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let x = gnu_cpio(&["-id", "--quiet"], &out, &archive);
        assert!(x.status.success(), "cpio -i: {x:?}");
        assert_eq!(fs::read(out.join("d/f")).unwrap(), b"hello");
        assert_eq!(fs::read(out.join("top")).unwrap(), b"#!/bin/sh\n");
        assert_eq!(fs::read_link(out.join("d/l")).unwrap(), Path::new("f"));
    }

    proptest! {
        #[test]
        fn any_files_round_trip(files in proptest::collection::btree_map(
            "[a-z]{1,12}", proptest::collection::vec(any::<u8>(), 0..64), 0..8)
        ) {
            let mut w = CpioWriter::new(Vec::new());
            for (name, data) in &files {
                w.file(name, 0o644, data).unwrap();
            }
            let entries = read_all(&w.finish().unwrap());
            prop_assert_eq!(entries.len(), files.len());
            for (e, (name, data)) in entries.iter().zip(&files) {
                prop_assert_eq!(&e.name, name);
                prop_assert_eq!(&e.data, data);
            }
        }
    }
}
