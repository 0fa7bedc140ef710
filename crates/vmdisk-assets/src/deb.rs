//! Unpacking Debian packages without root, dpkg or ar(1).
//!
//! ```text
//!  .deb    = "!<arch>\n" member*                      (an ar archive)
//!  member  = header(60 bytes) data pad-to-even
//!  header  = name[16] mtime[12] uid[6] gid[6] mode[8] size[10] "`\n"
//!            name: "debian-binary", "control.tar.xz", "data.tar.xz/" (GNU style ends in '/'),
//!                  or "#1/<len>" (BSD style: the real name is the first <len> bytes of data)
//!  members = debian-binary, control.tar{,.gz,.xz,.zst}, data.tar{,.gz,.xz,.zst}
//! ```
//!
//! `data.tar.*` is unpacked with the tar crate's `unpack_in`, which refuses to write through a
//! symlink out of the destination; on top of that every entry with an absolute path or a `..`
//! is an error (not silently skipped), set-id bits and ownership are dropped, and device nodes
//! and fifos are skipped (they cannot be created without root and no package we use has them).

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path};

use anyhow::{bail, ensure, Context, Result};

/// The ar global header.
const AR_MAGIC: &[u8; 8] = b"!<arch>\n";
/// Size of one ar member header.
const AR_HEADER_LEN: usize = 60;
/// Most members we look at; a .deb has three.
const MAX_MEMBERS: usize = 16;
/// Largest ar member we accept; Debian's largest packages are a few hundred MiB.
const MAX_MEMBER_LEN: u64 = 2 << 30;
/// Most bytes one decompressed data.tar may produce (the kernel package unpacks to ~400 MiB).
const MAX_DATA_TAR_LEN: u64 = 8 << 30;
/// Most bytes a decompressed control.tar may produce; real ones are a few KiB.
const MAX_CONTROL_TAR_LEN: u64 = 64 << 20;
/// Largest `control` file we read.
const MAX_CONTROL_LEN: u64 = 1 << 20;
/// Most entries one data.tar may hold (the kernel package has ~4,500).
const MAX_TAR_ENTRIES: u64 = 1_000_000;
/// Longest BSD-style long member name.
const MAX_AR_NAME_LEN: u64 = 1024;

/// Where one ar member's data lies in the file.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Member {
    name: String,
    offset: u64,
    len: u64,
}

/// List the members of the ar archive `r` (its total length is `file_len`).
fn ar_members<R: Read + Seek>(r: &mut R, file_len: u64) -> Result<Vec<Member>> {
    let mut magic = [0u8; 8];
    r.read_exact(&mut magic)
        .context("the file is shorter than an ar header")?;
    ensure!(
        &magic == AR_MAGIC,
        "not a Debian package: it does not start with the ar magic \"!<arch>\\n\""
    );
    let mut members = Vec::new();
    let mut pos = AR_MAGIC.len() as u64;
    while pos < file_len {
        ensure!(
            members.len() < MAX_MEMBERS,
            "more than {MAX_MEMBERS} ar members; a .deb has three"
        );
        let mut h = [0u8; AR_HEADER_LEN];
        r.seek(SeekFrom::Start(pos))?;
        r.read_exact(&mut h)
            .with_context(|| format!("ar member header at offset {pos} is truncated"))?;
        ensure!(
            &h[58..60] == b"`\n",
            "ar member header at offset {pos} lacks its \"`\\n\" terminator; the file is corrupt"
        );
        let size_field = std::str::from_utf8(&h[48..58])
            .ok()
            .map(str::trim)
            .and_then(|s| s.parse::<u64>().ok())
            .with_context(|| format!("ar member at offset {pos} has a bad size field"))?;
        ensure!(
            size_field <= MAX_MEMBER_LEN,
            "ar member at offset {pos} claims {size_field} bytes, more than the {MAX_MEMBER_LEN} we accept"
        );
        let raw_name = String::from_utf8_lossy(&h[..16]).trim_end().to_string();
        let mut data_off = pos + AR_HEADER_LEN as u64;
        let mut len = size_field;
        let name = if let Some(n) = raw_name.strip_prefix("#1/") {
            // BSD: the name is stored at the start of the data.
            let n: u64 = n
                .parse()
                .ok()
                .filter(|&n| n <= MAX_AR_NAME_LEN && n <= size_field)
                .with_context(|| format!("ar member at offset {pos} has a bad BSD name length"))?;
            let mut buf = vec![0u8; n as usize];
            r.read_exact(&mut buf)
                .with_context(|| format!("ar member name at offset {data_off} is truncated"))?;
            data_off += n;
            len -= n;
            String::from_utf8_lossy(&buf)
                .trim_end_matches('\0')
                .to_string()
        } else {
            raw_name.strip_suffix('/').unwrap_or(&raw_name).to_string()
        };
        let end = data_off + len;
        ensure!(
            end <= file_len,
            "ar member {name} ({len} bytes at offset {data_off}) runs past the end of the file ({file_len} bytes); the download is truncated"
        );
        members.push(Member {
            name,
            offset: data_off,
            len,
        });
        pos = end + (end & 1);
    }
    Ok(members)
}

/// A reader that fails (rather than stopping) once more than `limit` bytes came through, so a
/// decompression bomb is an error, not a silently truncated tree.
struct Capped<R> {
    inner: R,
    left: u64,
    what: &'static str,
}

impl<R: Read> Read for Capped<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n as u64 > self.left {
            return Err(io::Error::other(format!(
                "{} decompresses to more than the limit; the package is corrupt or hostile",
                self.what
            )));
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// Open member `prefix` (`control.tar` or `data.tar`, any compression) as a decompressed stream.
fn open_tar(deb: &Path, prefix: &str, limit: u64) -> Result<Box<dyn Read>> {
    let mut f = File::open(deb).with_context(|| format!("opening {}", deb.display()))?;
    let file_len = f.metadata()?.len();
    let members =
        ar_members(&mut f, file_len).with_context(|| format!("reading {}", deb.display()))?;
    let Some(m) = members
        .iter()
        .find(|m| m.name == prefix || m.name.starts_with(&format!("{prefix}.")))
    else {
        bail!(
            "{} has no {prefix}.* member (members: {}); is it a Debian binary package?",
            deb.display(),
            members
                .iter()
                .map(|m| m.name.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        );
    };
    f.seek(SeekFrom::Start(m.offset))?;
    let raw = BufReader::new(f).take(m.len);
    let what: &'static str = if prefix == "data.tar" {
        "data.tar"
    } else {
        "control.tar"
    };
    let decoded: Box<dyn Read> = match m.name.strip_prefix(prefix).unwrap_or_default() {
        "" => Box::new(raw),
        ".xz" => Box::new(liblzma::read::XzDecoder::new_multi_decoder(raw)),
        ".gz" => Box::new(flate2::read::GzDecoder::new(raw)),
        ".zst" => Box::new(
            zstd::stream::read::Decoder::new(raw)
                .with_context(|| format!("starting zstd for {} in {}", m.name, deb.display()))?,
        ),
        other => bail!(
            "{} member {} uses compression {other:?}; only none, .gz, .xz and .zst are supported",
            deb.display(),
            m.name
        ),
    };
    Ok(Box::new(Capped {
        inner: decoded,
        left: limit,
        what,
    }))
}

/// Unpack the files of the Debian package `deb` into `dest` (created if missing), keeping
/// permission bits (without set-id), symlinks and hard links, never changing ownership.
///
/// Any entry with an absolute path or `..`, or one that would be written through a symlink
/// leading out of `dest`, is an error.
pub fn extract_deb(deb: &Path, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let stream = open_tar(deb, "data.tar", MAX_DATA_TAR_LEN)?;
    unpack_tar(stream, dest).with_context(|| {
        format!(
            "unpacking {} into {}; delete the file if it is corrupt and try again",
            deb.display(),
            dest.display()
        )
    })
}

/// Unpack a tar stream into `dest` with the checks described on [`extract_deb`].
fn unpack_tar(stream: Box<dyn Read>, dest: &Path) -> Result<()> {
    let dest = dest
        .canonicalize()
        .with_context(|| format!("resolving {}", dest.display()))?;
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(false); // keeps rwx bits, drops set-id and sticky
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_preserve_mtime(true);
    archive.set_overwrite(true);
    // As the tar crate's own unpack does: directories last, deepest first, so a read-only
    // directory does not block its children.
    let mut directories = Vec::new();
    let mut count = 0u64;
    for entry in archive.entries().context("reading the tar stream")? {
        let mut entry = entry.context("reading a tar entry")?;
        count += 1;
        ensure!(
            count <= MAX_TAR_ENTRIES,
            "more than {MAX_TAR_ENTRIES} entries; the package is corrupt or hostile"
        );
        let path = entry
            .path()
            .context("a tar entry has a bad path")?
            .into_owned();
        for c in path.components() {
            match c {
                Component::Normal(_) | Component::CurDir => {}
                Component::RootDir | Component::Prefix(_) => {
                    bail!(
                        "tar entry {} is absolute; refusing to unpack it",
                        path.display()
                    )
                }
                Component::ParentDir => {
                    bail!(
                        "tar entry {} contains `..`; refusing to unpack it",
                        path.display()
                    )
                }
            }
        }
        let kind = entry.header().entry_type();
        match kind {
            tar::EntryType::Directory => {
                directories.push(entry);
                continue;
            }
            tar::EntryType::Regular
            | tar::EntryType::Continuous
            | tar::EntryType::Link
            | tar::EntryType::Symlink => {}
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => continue,
            tar::EntryType::XGlobalHeader
            | tar::EntryType::XHeader
            | tar::EntryType::GNULongName
            | tar::EntryType::GNULongLink => continue,
            other => bail!(
                "tar entry {} has unsupported type {other:?}",
                path.display()
            ),
        }
        if kind == tar::EntryType::Link {
            if let Some(target) = entry.link_name().context("reading a hard link target")? {
                ensure!(
                    target
                        .components()
                        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir)),
                    "hard link {} points to {}, outside the package; refusing it",
                    path.display(),
                    target.display()
                );
            }
        }
        let done = entry
            .unpack_in(&dest)
            .with_context(|| format!("unpacking {}", path.display()))?;
        ensure!(
            done,
            "tar entry {} would land outside {}",
            path.display(),
            dest.display()
        );
    }
    directories.sort_by(|a, b| b.path_bytes().cmp(&a.path_bytes()));
    for mut d in directories {
        let path = d.path()?.into_owned();
        d.unpack_in(&dest)
            .with_context(|| format!("unpacking directory {}", path.display()))?;
    }
    Ok(())
}

/// The value of `field` (case-insensitive, e.g. `Version`, `Depends`) in the package's
/// `control` file, with continuation lines joined by newlines; `None` when absent.
pub fn control_field(deb: &Path, field: &str) -> Result<Option<String>> {
    let control = read_control(deb)?;
    Ok(parse_control_field(&control, field))
}

/// The whole `control` file of a package.
pub fn read_control(deb: &Path) -> Result<String> {
    let stream = open_tar(deb, "control.tar", MAX_CONTROL_TAR_LEN)?;
    let mut archive = tar::Archive::new(stream);
    for entry in archive
        .entries()
        .with_context(|| format!("reading control.tar of {}", deb.display()))?
    {
        let entry = entry.with_context(|| format!("reading control.tar of {}", deb.display()))?;
        let path = entry.path()?.into_owned();
        let is_control = path
            .components()
            .filter(|c| !matches!(c, Component::CurDir))
            .map(|c| c.as_os_str().to_owned())
            .collect::<Vec<_>>()
            == [std::ffi::OsString::from("control")];
        if !is_control {
            continue;
        }
        ensure!(
            entry.size() <= MAX_CONTROL_LEN,
            "{}: the control file is {} bytes, more than {MAX_CONTROL_LEN}",
            deb.display(),
            entry.size()
        );
        let mut text = String::new();
        entry
            .take(MAX_CONTROL_LEN)
            .read_to_string(&mut text)
            .with_context(|| format!("{}: the control file is not UTF-8 text", deb.display()))?;
        return Ok(text);
    }
    bail!("{} has no control file in control.tar", deb.display())
}

/// Look up one field in a deb822 paragraph.
pub fn parse_control_field(control: &str, field: &str) -> Option<String> {
    let mut value: Option<String> = None;
    for line in control.lines() {
        if let Some(v) = value.as_mut() {
            if line.starts_with(' ') || line.starts_with('\t') {
                v.push('\n');
                v.push_str(line.trim());
                continue;
            }
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if !line.starts_with([' ', '\t']) && k.trim().eq_ignore_ascii_case(field) {
                value = Some(v.trim().to_string());
            }
        }
    }
    value
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    /// An ar archive with GNU-style names ("name/").
    pub(crate) fn ar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = AR_MAGIC.to_vec();
        for (name, data) in members {
            let h = format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                format!("{name}/"),
                0,
                0,
                0,
                "100644",
                data.len()
            );
            assert_eq!(h.len(), 60);
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(data);
            if data.len() % 2 == 1 {
                out.push(b'\n');
            }
        }
        out
    }

    pub(crate) enum Item<'a> {
        Dir(&'a str, u32),
        File(&'a str, u32, &'a [u8]),
        Symlink(&'a str, &'a str),
        HardLink(&'a str, &'a str),
    }

    /// A tar stream; paths are written raw (so tests can put `..` or `/` in them).
    pub(crate) fn tar(items: &[Item]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for it in items {
            let mut h = tar::Header::new_gnu();
            let (path, data): (&str, &[u8]) = match it {
                Item::Dir(p, mode) => {
                    h.set_entry_type(tar::EntryType::Directory);
                    h.set_mode(*mode);
                    (p, b"")
                }
                Item::File(p, mode, data) => {
                    h.set_entry_type(tar::EntryType::Regular);
                    h.set_mode(*mode);
                    (p, data)
                }
                Item::Symlink(p, target) => {
                    h.set_entry_type(tar::EntryType::Symlink);
                    h.set_mode(0o777);
                    h.set_link_name_literal(target).unwrap();
                    (p, b"")
                }
                Item::HardLink(p, target) => {
                    h.set_entry_type(tar::EntryType::Link);
                    h.set_mode(0o644);
                    h.set_link_name_literal(target).unwrap();
                    (p, b"")
                }
            };
            let name = &mut h.as_gnu_mut().unwrap().name;
            name.fill(0);
            name[..path.len()].copy_from_slice(path.as_bytes());
            h.set_size(data.len() as u64);
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        liblzma::read::XzEncoder::new(data, 1)
            .read_to_end(&mut out)
            .unwrap();
        out
    }

    pub(crate) fn deb(data_tar_xz: Vec<u8>, control: &str) -> Vec<u8> {
        let control_tar = tar(&[
            Item::Dir("./", 0o755),
            Item::File("./control", 0o644, control.as_bytes()),
        ]);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut gz, &control_tar).unwrap();
        ar(&[
            ("debian-binary", b"2.0\n"),
            ("control.tar.gz", &gz.finish().unwrap()),
            ("data.tar.xz", &data_tar_xz),
        ])
    }

    const CONTROL: &str = "Package: busybox-static\nVersion: 1:1.35.0-4\nArchitecture: amd64\n\
                           Depends: libc6 (>= 2.34),\n zlib1g\nDescription: x\n more\n";

    fn write_deb(dir: &Path, items: &[Item]) -> std::path::PathBuf {
        let p = dir.join("t.deb");
        fs::write(&p, deb(xz(&tar(items)), CONTROL)).unwrap();
        p
    }

    #[test]
    fn unpacks_files_dirs_symlinks_and_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let deb = write_deb(
            dir.path(),
            &[
                Item::Dir("./", 0o755),
                Item::Dir("./bin/", 0o555),
                Item::File("./bin/busybox", 0o4755, b"\x7fELF"),
                Item::Symlink("./bin/sh", "busybox"),
                Item::HardLink("./bin/ash", "./bin/busybox"),
                Item::Symlink("./lib64", "/lib/x86_64-linux-gnu"),
            ],
        );
        let out = dir.path().join("out");
        extract_deb(&deb, &out).unwrap();
        let bb = out.join("bin/busybox");
        assert_eq!(fs::read(&bb).unwrap(), b"\x7fELF");
        // rwx kept, set-uid dropped.
        assert_eq!(
            fs::metadata(&bb).unwrap().permissions().mode() & 0o7777,
            0o755
        );
        assert_eq!(
            fs::metadata(out.join("bin")).unwrap().permissions().mode() & 0o777,
            0o555
        );
        assert_eq!(
            fs::read_link(out.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(fs::read(out.join("bin/ash")).unwrap(), b"\x7fELF");
        assert_eq!(
            fs::read_link(out.join("lib64")).unwrap(),
            Path::new("/lib/x86_64-linux-gnu")
        );
        fs::set_permissions(out.join("bin"), fs::Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn control_fields() {
        let dir = tempfile::tempdir().unwrap();
        let deb = write_deb(dir.path(), &[Item::Dir("./", 0o755)]);
        assert_eq!(
            control_field(&deb, "version").unwrap().as_deref(),
            Some("1:1.35.0-4")
        );
        assert_eq!(
            control_field(&deb, "Depends").unwrap().as_deref(),
            Some("libc6 (>= 2.34),\nzlib1g")
        );
        assert_eq!(control_field(&deb, "Pre-Depends").unwrap(), None);
    }

    #[test]
    fn refuses_escaping_entries() {
        for (what, items) in [
            ("`..`", vec![Item::File("./../evil", 0o644, b"x")]),
            ("absolute", vec![Item::File("/tmp/evil", 0o644, b"x")]),
            (
                "outside",
                vec![
                    Item::Symlink("./up", "/tmp"),
                    Item::File("./up/vmdisk-deb-test-evil", 0o644, b"x"),
                ],
            ),
            (
                "outside the package",
                vec![Item::HardLink("./passwd", "/etc/passwd")],
            ),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let deb = write_deb(dir.path(), &items);
            let err = format!(
                "{:#}",
                extract_deb(&deb, &dir.path().join("out")).unwrap_err()
            );
            assert!(err.contains(what), "{what}: {err}");
            assert!(!Path::new("/tmp/vmdisk-deb-test-evil").exists());
        }
    }

    #[test]
    fn refuses_non_debs_and_truncated_debs() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.deb");
        fs::write(&p, b"PK\x03\x04 not an ar archive").unwrap();
        let err = format!("{:#}", extract_deb(&p, &dir.path().join("o")).unwrap_err());
        assert!(err.contains("ar magic"), "{err}");

        let full = deb(xz(&tar(&[Item::File("./a", 0o644, b"a")])), CONTROL);
        fs::write(&p, &full[..full.len() - 10]).unwrap();
        let err = format!("{:#}", extract_deb(&p, &dir.path().join("o")).unwrap_err());
        assert!(err.contains("truncated"), "{err}");

        fs::write(&p, ar(&[("debian-binary", b"2.0\n")])).unwrap();
        let err = format!("{:#}", extract_deb(&p, &dir.path().join("o")).unwrap_err());
        assert!(err.contains("no data.tar"), "{err}");
    }

    #[test]
    fn bsd_long_names_and_plain_tar() {
        let data = tar(&[Item::File("./hello", 0o644, b"hi")]);
        let mut a = AR_MAGIC.to_vec();
        let name = b"data.tar";
        let body: Vec<u8> = name.iter().chain(data.iter()).copied().collect();
        a.extend_from_slice(
            format!(
                "{:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
                "#1/8",
                0,
                0,
                0,
                "100644",
                body.len()
            )
            .as_bytes(),
        );
        a.extend_from_slice(&body);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.deb");
        fs::write(&p, a).unwrap();
        extract_deb(&p, &dir.path().join("o")).unwrap();
        assert_eq!(fs::read(dir.path().join("o/hello")).unwrap(), b"hi");
    }

    proptest! {
        #[test]
        fn ar_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let mut with_magic = AR_MAGIC.to_vec();
            with_magic.extend_from_slice(&bytes);
            for b in [bytes, with_magic] {
                let len = b.len() as u64;
                let _ = ar_members(&mut std::io::Cursor::new(b), len);
            }
        }

        #[test]
        fn corrupted_debs_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
        ) {
            let mut b = deb(xz(&tar(&[Item::File("./a", 0o644, b"abc")])), CONTROL);
            for (i, v) in edits {
                let at = i.index(b.len());
                b[at] = v;
            }
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("c.deb");
            fs::write(&p, b).unwrap();
            let _ = extract_deb(&p, &dir.path().join("o"));
            let _ = control_field(&p, "Version");
        }

        #[test]
        fn control_parser_never_panics(s in ".{0,200}", f in "[A-Za-z-]{1,10}") {
            let _ = parse_control_field(&s, &f);
        }
    }
}
