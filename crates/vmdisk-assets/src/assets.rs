//! Pinned Debian packages: the lock file (`testvms/assets.lock`), the download cache, and
//! relocking against the machine's apt.
//!
//! ```text
//!  <cache>/debs/<name>_<version>_<arch>.deb       verified against the lock's size + sha256
//!  <cache>/unpacked/<name>_<version>_<arch>/      one package's files (see crate::deb)
//!  <cache>/sysroot/<hash of the package set>/     several packages merged (hard links)
//! ```
//!
//! `<cache>` is `$VMDISK_CACHE`, else `$XDG_CACHE_HOME/vmdisk`, else `~/.cache/vmdisk`. Every
//! entry appears by an atomic rename of a finished temporary, so a crash leaves at most a
//! `.tmp-*` sibling and two processes racing for the same entry both end up using one complete
//! copy. `$VMDISK_DEB_DIR` (a `:`-separated list of folders, e.g. `/var/cache/apt/archives`)
//! is searched for a package before the network; its files are verified like downloads.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tempfile::{NamedTempFile, TempDir};

use crate::arch::Arch;
use crate::deb;

/// The committed lock file, built into every binary.
pub const LOCK: &str = include_str!("../../../testvms/assets.lock");
/// Where the lock lives in the repository (for messages).
pub const LOCK_PATH: &str = "testvms/assets.lock";
/// The command that regenerates the lock.
pub const RELOCK_COMMAND: &str = "cargo xtask vmtest --relock";

/// Largest .deb we download or accept in a lock (Debian's kernel package is ~70 MB).
const MAX_DEB_LEN: u64 = 1 << 30;
/// Largest lock file we parse.
const MAX_LOCK_LEN: usize = 1 << 20;
/// Most packages in one lock.
const MAX_LOCK_PACKAGES: usize = 1024;
/// Directory depth `merge_tree` descends to.
const MAX_TREE_DEPTH: usize = 64;
/// Give up connecting to a mirror after this long.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Give up when the mirror sends nothing for this long (a stalled download).
const READ_TIMEOUT: Duration = Duration::from_secs(60);
/// Redirects followed (deb.debian.org redirects to a nearby mirror at most once or twice).
const MAX_REDIRECTS: u32 = 10;
/// Version of the sysroot layout, part of its cache key.
const SYSROOT_FORMAT: u32 = 1;

/// Why a package is pinned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Goes into the guest (kernel, busybox, dropbear, libraries).
    Guest,
    /// Runs on the host (Debian's qemu, for machines without their own).
    Host,
}

/// One pinned package.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LockedPackage {
    /// Debian package name, e.g. `busybox-static`.
    pub name: String,
    /// Debian version with epoch, e.g. `1:1.35.0-4+deb12u1+b1`.
    pub version: String,
    /// Debian architecture: `amd64`, `arm64` or `all`.
    pub arch: String,
    pub role: Role,
    /// Where to download it (plain http; the sha256 is what makes it trustworthy).
    pub url: String,
    /// Size of the .deb in bytes.
    pub size: u64,
    /// sha256 of the .deb, lowercase hex.
    pub sha256: String,
}

impl LockedPackage {
    /// `<name>_<version>_<arch>` with the epoch colon escaped as apt does (`%3a`).
    pub fn id(&self) -> String {
        format!(
            "{}_{}_{}",
            self.name,
            self.version.replace(':', "%3a"),
            self.arch
        )
    }

    /// The file name apt gives this package in /var/cache/apt/archives.
    pub fn file_name(&self) -> String {
        format!("{}.deb", self.id())
    }

    fn validate(&self) -> Result<()> {
        let ok = |s: &str, extra: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || extra.contains(c))
        };
        ensure!(
            ok(&self.name, "+-.") && !self.name.starts_with(['.', '-']),
            "bad package name {:?}",
            self.name
        );
        ensure!(
            ok(&self.version, "+-.~:") && !self.version.starts_with('.'),
            "{}: bad version {:?}",
            self.name,
            self.version
        );
        ensure!(
            ok(&self.arch, "-") && self.arch.bytes().all(|b| !b.is_ascii_uppercase()),
            "{}: bad architecture {:?}",
            self.name,
            self.arch
        );
        ensure!(
            (self.url.starts_with("http://") || self.url.starts_with("https://"))
                && !self.url.contains(char::is_whitespace),
            "{}: url {:?} is not an http(s) URL",
            self.name,
            self.url
        );
        ensure!(
            self.size > 0 && self.size <= MAX_DEB_LEN,
            "{}: size {} is not between 1 and {MAX_DEB_LEN}",
            self.name,
            self.size
        );
        ensure!(
            self.sha256.len() == 64
                && self
                    .sha256
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{}: sha256 {:?} is not 64 lowercase hex digits",
            self.name,
            self.sha256
        );
        Ok(())
    }
}

/// The parsed lock file.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lock {
    /// In file order.
    pub packages: Vec<LockedPackage>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LockFile {
    #[serde(default)]
    package: Vec<LockedPackage>,
}

const LOCK_HEADER: &str = "\
# Pinned Debian packages for the VM harness (crate vmdisk-vm): what the test guests are built
# from (kernel, busybox, dropbear, nbd-client and their libraries; role = \"guest\") and Debian's
# qemu, unpacked into the cache on machines without their own (role = \"host\"). The arm64
# qemu-user-static (role = \"guest\") is not built into the guest: the doctor test copies its
# qemu-x86_64-static into a running aarch64 guest and registers it with binfmt_misc. Every
# package is downloaded from `url` and must have exactly `size` bytes and this `sha256`.
#
# Generated; do not edit by hand. Regenerate on a Debian machine (with apt) with
#
#     cargo xtask vmtest --relock
#
# which asks apt for the current version of each package (the kernel follows the
# linux-image-<arch> metapackage), downloads every one and records its size and sha256.
";

impl Lock {
    /// Parse and validate lock file text.
    pub fn parse(text: &str) -> Result<Lock> {
        ensure!(
            text.len() <= MAX_LOCK_LEN,
            "the asset lock is {} bytes, more than {MAX_LOCK_LEN}",
            text.len()
        );
        let file: LockFile = toml::from_str(text).with_context(|| {
            format!("parsing the asset lock; regenerate {LOCK_PATH} with `{RELOCK_COMMAND}`")
        })?;
        ensure!(
            file.package.len() <= MAX_LOCK_PACKAGES,
            "the asset lock lists {} packages, more than {MAX_LOCK_PACKAGES}",
            file.package.len()
        );
        let mut seen = BTreeSet::new();
        for p in &file.package {
            p.validate().with_context(|| {
                format!("invalid entry in the asset lock; regenerate {LOCK_PATH} with `{RELOCK_COMMAND}`")
            })?;
            ensure!(
                seen.insert((p.name.clone(), p.arch.clone())),
                "the asset lock lists {} ({}) twice",
                p.name,
                p.arch
            );
        }
        Ok(Lock {
            packages: file.package,
        })
    }

    /// The lock committed at [`LOCK_PATH`] when this binary was built.
    pub fn builtin() -> Result<Lock> {
        Lock::parse(LOCK).with_context(|| format!("the built-in {LOCK_PATH}"))
    }

    /// The lock as file text, with the header saying how to regenerate it.
    pub fn to_toml(&self) -> String {
        let body = toml::to_string(&LockFile {
            package: self.packages.clone(),
        })
        // Serialising plain strings, integers and a unit enum cannot fail.
        .unwrap_or_default();
        format!("{LOCK_HEADER}\n{body}")
    }

    /// The package `name` for Debian architecture `arch` (an `all` package matches any).
    pub fn get(&self, name: &str, arch: &str) -> Result<&LockedPackage> {
        self.packages
            .iter()
            .find(|p| p.name == name && p.arch == arch)
            .or_else(|| {
                self.packages
                    .iter()
                    .find(|p| p.name == name && p.arch == "all")
            })
            .with_context(|| {
                format!(
                    "the asset lock ({LOCK_PATH}) has no package {name} for {arch}; add it to \
                     assets::default_requests if it is new, then regenerate the lock with \
                     `{RELOCK_COMMAND}` on a Debian machine"
                )
            })
    }
}

/// Whether [`Cache::deb`] may download a package that is neither cached nor in
/// `$VMDISK_DEB_DIR`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Downloads {
    #[default]
    Allowed,
    /// Refused: the error ends with `how_to_fetch` (the command that downloads them).
    Refused { how_to_fetch: String },
}

/// The download and unpack cache.
#[derive(Clone, Debug)]
pub struct Cache {
    root: PathBuf,
    lock: Option<Lock>,
    /// Folders searched for .debs before the network (`$VMDISK_DEB_DIR`).
    deb_dirs: Vec<PathBuf>,
    downloads: Downloads,
}

impl Cache {
    /// `$VMDISK_CACHE`, else `$XDG_CACHE_HOME/vmdisk`, else `$HOME/.cache/vmdisk`.
    pub fn default_root() -> Result<PathBuf> {
        let var = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        if let Some(p) = var("VMDISK_CACHE") {
            return Ok(p);
        }
        if let Some(p) = var("XDG_CACHE_HOME").filter(|p| p.is_absolute()) {
            return Ok(p.join("vmdisk"));
        }
        if let Some(home) = var("HOME") {
            return Ok(home.join(".cache/vmdisk"));
        }
        bail!("no cache folder: set VMDISK_CACHE (or XDG_CACHE_HOME or HOME)")
    }

    /// A cache at `root` (created on first use). Names given to [`Cache::sysroot`] resolve in
    /// the built-in lock unless [`Cache::with_lock`] sets another; .debs are looked for in
    /// `$VMDISK_DEB_DIR` (`:`-separated) before the network.
    pub fn new(root: impl Into<PathBuf>) -> Cache {
        let deb_dirs = std::env::var_os("VMDISK_DEB_DIR")
            .map(|v| {
                std::env::split_paths(&v)
                    .filter(|p| !p.as_os_str().is_empty())
                    .collect()
            })
            .unwrap_or_default();
        Cache {
            root: root.into(),
            lock: None,
            deb_dirs,
            downloads: Downloads::Allowed,
        }
    }

    /// Allow or refuse downloads (unpacking and building from cached .debs stay allowed).
    pub fn with_downloads(mut self, downloads: Downloads) -> Cache {
        self.downloads = downloads;
        self
    }

    /// Look for .debs in `dirs` (instead of `$VMDISK_DEB_DIR`) before the network.
    pub fn with_deb_dirs(mut self, dirs: Vec<PathBuf>) -> Cache {
        self.deb_dirs = dirs;
        self
    }

    /// Resolve [`Cache::sysroot`] names in `lock`.
    pub fn with_lock(mut self, lock: Lock) -> Cache {
        self.lock = Some(lock);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn subdir(&self, name: &str) -> Result<PathBuf> {
        let dir = self.root.join(name);
        fs::create_dir_all(&dir)
            .with_context(|| format!("creating the cache folder {}", dir.display()))?;
        Ok(dir)
    }

    /// The verified .deb of `pkg`: from the cache, else `$VMDISK_DEB_DIR`, else downloaded.
    pub fn deb(&self, pkg: &LockedPackage) -> Result<PathBuf> {
        let dir = self.subdir("debs")?;
        let path = dir.join(pkg.file_name());
        if path.is_file() {
            match verify_file(&path, pkg) {
                Ok(()) => return Ok(path),
                Err(e) => {
                    eprintln!("vmdisk: discarding cached {}: {e:#}", path.display());
                    fs::remove_file(&path)
                        .with_context(|| format!("removing {}", path.display()))?;
                }
            }
        }
        if let Some(src) = find_in_deb_dirs(&self.deb_dirs, pkg) {
            let tmp = temp_file_in(&dir, &pkg.file_name())?;
            fs::copy(&src, tmp.path())
                .with_context(|| format!("copying {} into the cache", src.display()))?;
            verify_file(tmp.path(), pkg)
                .with_context(|| format!("{} (from VMDISK_DEB_DIR)", src.display()))?;
            persist_file(tmp, &path)?;
            return Ok(path);
        }
        if let Downloads::Refused { how_to_fetch } = &self.downloads {
            bail!(
                "{} {} ({}) is not in the cache {} and this command does not download; \
                 {how_to_fetch}",
                pkg.name,
                pkg.version,
                pkg.arch,
                dir.display()
            );
        }
        let tmp = temp_file_in(&dir, &pkg.file_name())?;
        let (len, sha) = download(&pkg.url, tmp.path(), Some(pkg.size))
            .with_context(|| format!("downloading {} {}", pkg.name, pkg.version))?;
        check_digest(pkg, len, &sha).with_context(|| format!("downloaded from {}", pkg.url))?;
        persist_file(tmp, &path)?;
        Ok(path)
    }

    /// The files of `pkg`, unpacked once into `<cache>/unpacked/<id>/`.
    pub fn unpacked(&self, pkg: &LockedPackage) -> Result<PathBuf> {
        let dir = self.subdir("unpacked")?;
        let dest = dir.join(pkg.id());
        if dest.is_dir() {
            return Ok(dest);
        }
        let deb = self.deb(pkg)?;
        let tmp = temp_dir_in(&dir, &pkg.id())?;
        deb::extract_deb(&deb, tmp.path())
            .with_context(|| format!("unpacking {} {}", pkg.name, pkg.version))?;
        persist_dir(tmp, &dest)?;
        Ok(dest)
    }

    /// Several packages of the lock merged into one tree (see [`Cache::sysroot_of`]).
    pub fn sysroot(&self, arch: Arch, names: &[&str]) -> Result<PathBuf> {
        let builtin;
        let lock = match &self.lock {
            Some(l) => l,
            None => {
                builtin = Lock::builtin()?;
                &builtin
            }
        };
        let pkgs = names
            .iter()
            .map(|n| lock.get(n, arch.debian()))
            .collect::<Result<Vec<_>>>()?;
        self.sysroot_of(&pkgs)
    }

    /// `pkgs` merged into `<cache>/sysroot/<hash>/` (hard links into the unpacked trees, so
    /// treat it as read-only). Where packages overlap the first by name wins; directories merge.
    pub fn sysroot_of(&self, pkgs: &[&LockedPackage]) -> Result<PathBuf> {
        let mut pkgs: Vec<&LockedPackage> = pkgs.to_vec();
        pkgs.sort_by(|a, b| (&a.name, &a.arch).cmp(&(&b.name, &b.arch)));
        pkgs.dedup_by(|a, b| a.name == b.name && a.arch == b.arch);
        let mut manifest = format!("vmdisk sysroot v{SYSROOT_FORMAT}\n");
        for p in &pkgs {
            manifest.push_str(&format!(
                "{} {} {} {}\n",
                p.name, p.version, p.arch, p.sha256
            ));
        }
        let key = hex(&Sha256::digest(manifest.as_bytes()))[..32].to_string();
        let dir = self.subdir("sysroot")?;
        let dest = dir.join(&key);
        if dest.is_dir() {
            return Ok(dest);
        }
        let trees = pkgs
            .iter()
            .map(|p| self.unpacked(p))
            .collect::<Result<Vec<_>>>()?;
        let tmp = temp_dir_in(&dir, &key)?;
        for tree in &trees {
            merge_tree(tree, tmp.path(), 0)
                .with_context(|| format!("merging {} into a sysroot", tree.display()))?;
        }
        fs::write(tmp.path().join(".vmdisk-sysroot"), manifest)?;
        persist_dir(tmp, &dest)?;
        Ok(dest)
    }
}

/// Hard-link (or copy) `src` into `dst`, keeping what `dst` already has.
fn merge_tree(src: &Path, dst: &Path, depth: usize) -> Result<()> {
    ensure!(
        depth <= MAX_TREE_DEPTH,
        "{} is nested more than {MAX_TREE_DEPTH} directories deep",
        src.display()
    );
    let mut entries = fs::read_dir(src)
        .with_context(|| format!("reading {}", src.display()))?
        .collect::<std::io::Result<Vec<_>>>()
        .with_context(|| format!("reading {}", src.display()))?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let from = e.path();
        let to = dst.join(e.file_name());
        let ft = e.file_type()?;
        let exists = to.symlink_metadata().is_ok();
        if ft.is_dir() {
            if !exists {
                fs::create_dir(&to).with_context(|| format!("creating {}", to.display()))?;
                let mode = fs::metadata(&from)?.permissions().mode();
                // Keep the tree writable while we fill it; sysroots are not modified later.
                fs::set_permissions(&to, fs::Permissions::from_mode(mode | 0o700))?;
            }
            if to.is_dir() && !to.symlink_metadata()?.file_type().is_symlink() {
                merge_tree(&from, &to, depth + 1)?;
            }
        } else if exists {
            continue;
        } else if ft.is_symlink() {
            std::os::unix::fs::symlink(fs::read_link(&from)?, &to)
                .with_context(|| format!("creating symlink {}", to.display()))?;
        } else if ft.is_file() && fs::hard_link(&from, &to).is_err() {
            // Another filesystem (or no hard links): copy instead.
            fs::copy(&from, &to)
                .with_context(|| format!("copying {} to {}", from.display(), to.display()))?;
        }
    }
    Ok(())
}

/// An empty temporary file `.tmp-<base>-*` in `dir` (removed on drop unless persisted).
fn temp_file_in(dir: &Path, base: &str) -> Result<NamedTempFile> {
    tempfile::Builder::new()
        .prefix(&format!(".tmp-{base}-"))
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))
}

/// An empty temporary directory `.tmp-<base>-*` (mode 0755) in `dir`, removed on drop.
fn temp_dir_in(dir: &Path, base: &str) -> Result<TempDir> {
    tempfile::Builder::new()
        .prefix(&format!(".tmp-{base}-"))
        .permissions(fs::Permissions::from_mode(0o755))
        .tempdir_in(dir)
        .with_context(|| format!("creating a temporary folder in {}", dir.display()))
}

/// Rename a finished temporary file into place (replacing what is there).
fn persist_file(tmp: NamedTempFile, dest: &Path) -> Result<()> {
    let from = tmp.path().to_path_buf();
    tmp.persist(dest)
        .map(drop)
        .map_err(|e| e.error)
        .with_context(|| format!("moving {} to {}", from.display(), dest.display()))
}

/// Rename a finished temporary directory into place; if another process got there first, keep
/// theirs (ours is removed when `tmp` drops).
fn persist_dir(tmp: TempDir, dest: &Path) -> Result<()> {
    match fs::rename(tmp.path(), dest) {
        Ok(()) => {
            // Renamed away: nothing left to clean up at the old name.
            let _ = tmp.keep();
            Ok(())
        }
        Err(_) if dest.is_dir() => Ok(()),
        Err(e) => {
            Err(e).with_context(|| format!("moving {} to {}", tmp.path().display(), dest.display()))
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Length and sha256 of a file.
fn file_digest(path: &Path) -> Result<(u64, String)> {
    let mut f = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f
            .read(&mut buf)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex(&h.finalize())))
}

fn check_digest(pkg: &LockedPackage, len: u64, sha: &str) -> Result<()> {
    ensure!(
        len == pkg.size && sha == pkg.sha256,
        "{} {} ({}) does not match the asset lock: expected {} bytes with sha256 {}, got {len} \
         bytes with sha256 {sha}. The mirror no longer serves the pinned file or it was \
         corrupted; regenerate {LOCK_PATH} with `{RELOCK_COMMAND}`",
        pkg.name,
        pkg.version,
        pkg.arch,
        pkg.size,
        pkg.sha256
    );
    Ok(())
}

fn verify_file(path: &Path, pkg: &LockedPackage) -> Result<()> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    if len != pkg.size {
        return check_digest(pkg, len, "(not computed: the size differs)");
    }
    let (len, sha) = file_digest(path)?;
    check_digest(pkg, len, &sha)
}

/// A file for `pkg` of the right size in one of `dirs` (apt's or the URL's file name).
fn find_in_deb_dirs(dirs: &[PathBuf], pkg: &LockedPackage) -> Option<PathBuf> {
    let raw_base = pkg.url.rsplit('/').next().unwrap_or_default().to_string();
    let mut names = vec![pkg.file_name(), percent_decode(&raw_base), raw_base];
    names.dedup();
    for dir in dirs {
        for name in &names {
            let p = dir.join(name);
            if fs::metadata(&p).is_ok_and(|m| m.is_file() && m.len() == pkg.size) {
                return Some(p);
            }
        }
    }
    None
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(hi), Some(lo)) = (digit(b[i + 1]), digit(b[i + 2])) {
                out.push(hi << 4 | lo);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Download `url` into `dest` (which exists and is empty), returning its length and sha256.
/// Stops early if the body grows past `expected_len` (when given) or [`MAX_DEB_LEN`].
fn download(url: &str, dest: &Path, expected_len: Option<u64>) -> Result<(u64, String)> {
    ensure!(
        !url.starts_with("https://"),
        "{url}: this build downloads over plain http only (packages are verified by sha256); \
         point apt at an http:// mirror and relock, or put the .deb into a folder named by \
         VMDISK_DEB_DIR"
    );
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_connect(Some(CONNECT_TIMEOUT))
        .timeout_recv_response(Some(READ_TIMEOUT))
        .timeout_per_read(Some(READ_TIMEOUT))
        .max_redirects(MAX_REDIRECTS)
        .build()
        .into();
    if let Some(len) = expected_len {
        eprintln!("vmdisk: downloading {url} ({:.1} MB)", len as f64 / 1e6);
    }
    let resp = agent.get(url).call().with_context(|| {
        format!("GET {url} failed; check the network (or set VMDISK_DEB_DIR to a folder of .debs)")
    })?;
    let limit = expected_len.unwrap_or(MAX_DEB_LEN).min(MAX_DEB_LEN);
    let mut body = resp
        .into_body()
        .into_with_config()
        .limit(limit + 1)
        .reader();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(dest)
        .with_context(|| format!("opening {}", dest.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = body
            .read(&mut buf)
            .with_context(|| format!("reading the body of {url} after {len} bytes"))?;
        if n == 0 {
            break;
        }
        len += n as u64;
        ensure!(
            len <= limit,
            "{url} is longer than the {limit} bytes expected; the mirror serves a different file"
        );
        h.update(&buf[..n]);
        f.write_all(&buf[..n])
            .with_context(|| format!("writing {}", dest.display()))?;
    }
    f.sync_all()
        .with_context(|| format!("writing {}", dest.display()))?;
    Ok((len, hex(&h.finalize())))
}

/// One package to pin: `name` for Debian architecture `arch` (`amd64`, `arm64`, `all`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    pub name: String,
    pub arch: String,
    pub role: Role,
}

impl Request {
    pub fn new(name: &str, arch: &str, role: Role) -> Request {
        Request {
            name: name.to_string(),
            arch: arch.to_string(),
            role,
        }
    }
}

/// Guest packages besides the kernel: busybox, dropbear, nbd-client and their libraries.
pub const GUEST_PACKAGES: &[&str] = &[
    "busybox-static",
    "dropbear-bin",
    "nbd-client",
    "libc6",
    "libcrypt1",
    "libtomcrypt1",
    "libtommath1",
    "zlib1g",
    "libgnutls30",
    "libnl-3-200",
    "libnl-genl-3-200",
    "libp11-kit0",
    "libidn2-0",
    "libunistring2",
    "libtasn1-6",
    "libnettle8",
    "libhogweed6",
    "libgmp10",
    "libffi8",
];

/// The builder VM's tools (what disko's `_create` runs for content only a kernel makes:
/// cryptsetup, lvm2 and dmsetup, mdadm, btrfs-progs, e2fsprogs, dosfstools, sgdisk) and the
/// libraries they need beyond [`GUEST_PACKAGES`]; and bash and util-linux's blkid, so that
/// disko's own generated `_create` (a bash script that asks blkid what a device holds) runs
/// here too, as `cargo xtask bench layout` runs it. xfsprogs is not here: its libicu72 alone
/// is 9 MB, and no corpus example puts xfs inside LUKS, LVM or an array.
pub const BUILDER_PACKAGES: &[&str] = &[
    "bash",
    "util-linux",
    "cryptsetup-bin",
    "lvm2",
    "dmsetup",
    "mdadm",
    "btrfs-progs",
    "e2fsprogs",
    "dosfstools",
    "gdisk",
    "libblkid1",
    "libcryptsetup12",
    "libpopt0",
    "libuuid1",
    "libaio1",
    "libdevmapper-event1.02.1",
    "libedit2",
    "libselinux1",
    "libsystemd0",
    "libudev1",
    "libdevmapper1.02.1",
    "libcom-err2",
    "libext2fs2",
    "liblzo2-2",
    "libzstd1",
    "libss2",
    "libgcc-s1",
    "libncursesw6",
    "libstdc++6",
    "libtinfo6",
    "libargon2-1",
    "libjson-c5",
    "libssl3",
    "libbsd0",
    "libpcre2-8-0",
    "libcap2",
    "libgcrypt20",
    "liblz4-1",
    "liblzma5",
    "libmd0",
    "libgpg-error0",
];

/// A native C toolchain in the guest, for the cross-architecture build assertion: tcc, and the
/// C library's headers and start files it links against.
pub const TOOLCHAIN_PACKAGES: &[&str] = &["tcc", "libc6-dev", "linux-libc-dev"];

/// Emulators pinned for `guest` guests but not built into them: Debian's static qemu user
/// emulators for aarch64 guests, whose `qemu-x86_64-static` the doctor test
/// (tests/tests/doctor_aarch64.rs) copies into a running guest and registers with
/// binfmt_misc, as `apt-get install qemu-user-static` does on a Debian builder.
pub fn emulator_packages(guest: Arch) -> &'static [&'static str] {
    match guest {
        Arch::Aarch64 => &["qemu-user-static"],
        Arch::X86_64 => &[],
    }
}

/// The Debian package with qemu for `guest` guests.
pub fn qemu_package(guest: Arch) -> &'static str {
    match guest {
        Arch::X86_64 => "qemu-system-x86",
        Arch::Aarch64 => "qemu-system-arm",
    }
}

/// What the harness pins for `guest` guests run on a `host` machine: the current kernel (the
/// dependency of `linux-image-<arch>`), [`GUEST_PACKAGES`], [`TOOLCHAIN_PACKAGES`],
/// [`emulator_packages`], and Debian's qemu for the host
/// (the emulator, `qemu-system-common` for its TCG module, `qemu-system-data` for firmware).
/// Asks apt, so it works only on Debian.
pub fn default_requests(guest: Arch, host: Arch) -> Result<Vec<Request>> {
    ensure_debian()?;
    let g = guest.debian();
    let meta = format!("linux-image-{g}");
    let out = run_apt(
        Command::new("apt-cache")
            .arg("depends")
            .arg(format!("{meta}:{g}")),
    )?;
    let kernel = out
        .lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(|d| d.trim().trim_start_matches('|').trim())
        .find(|d| d.starts_with("linux-image-") && !d.starts_with('<'))
        .map(|d| d.split(':').next().unwrap_or(d).to_string())
        .with_context(|| {
            format!(
                "`apt-cache depends {meta}:{g}` names no linux-image-* package; \
                 is {g} enabled (dpkg --add-architecture {g}; apt-get update)?\n{out}"
            )
        })?;
    let mut reqs = vec![Request::new(&kernel, g, Role::Guest)];
    reqs.extend(
        GUEST_PACKAGES
            .iter()
            .chain(BUILDER_PACKAGES)
            .chain(TOOLCHAIN_PACKAGES)
            .chain(emulator_packages(guest))
            .map(|n| Request::new(n, g, Role::Guest)),
    );
    reqs.push(Request::new(qemu_package(guest), host.debian(), Role::Host));
    // Debian builds TCG as a loadable module (accel-tcg-*.so, found via QEMU_MODULE_DIR).
    reqs.push(Request::new(
        "qemu-system-common",
        host.debian(),
        Role::Host,
    ));
    // Firmware: qboot.rom, pvh.bin, keymaps.
    reqs.push(Request::new("qemu-system-data", "all", Role::Host));
    Ok(reqs)
}

fn ensure_debian() -> Result<()> {
    let debian = Path::new("/etc/debian_version").is_file()
        && Command::new("apt-get")
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success());
    ensure!(
        debian,
        "relocking needs a Debian machine with apt: it asks apt which package versions are \
         current and where they are. Use the committed {LOCK_PATH} here, or relock in a Debian \
         container (e.g. `docker run -it debian:bookworm`)"
    );
    Ok(())
}

fn run_apt(cmd: &mut Command) -> Result<String> {
    let shown = format!("{cmd:?}");
    // An empty folder: `apt-get download` skips (prints nothing for) files already in its cwd.
    let cwd = tempfile::Builder::new()
        .prefix("vmdisk-apt-")
        .tempdir()
        .context("creating a temporary folder for apt")?;
    let out = cmd
        .current_dir(cwd.path())
        .env("LC_ALL", "C")
        .output()
        .with_context(|| format!("running {shown}"))?;
    ensure!(
        out.status.success(),
        "{shown} failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `apt-get --print-uris download` says about one package.
#[derive(Debug, PartialEq, Eq)]
struct AptUri {
    url: String,
    file_name: String,
    size: u64,
    /// `SHA256:<hex>` when apt knows it.
    sha256: Option<String>,
}

fn parse_print_uris(out: &str) -> Result<AptUri> {
    let line = out
        .lines()
        .find(|l| l.starts_with('\''))
        .with_context(|| format!("apt-get --print-uris printed no URL:\n{out}"))?;
    let rest = &line[1..];
    let (url, rest) = rest
        .split_once('\'')
        .with_context(|| format!("unterminated URL in apt output: {line}"))?;
    let mut words = rest.split_whitespace();
    let file_name = words
        .next()
        .context("apt output lacks a file name")?
        .to_string();
    let size = words
        .next()
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("apt output lacks a size: {line}"))?;
    let sha256 = words
        .next()
        .and_then(|h| h.strip_prefix("SHA256:"))
        .map(|h| h.to_ascii_lowercase());
    Ok(AptUri {
        url: url.to_string(),
        file_name,
        size,
        sha256,
    })
}

/// Pin the current version of every request: ask apt where each package is, download it into
/// `cache` (so the next build needs no network), and record size and sha256. A request that
/// `keep` already pins keeps that entry (no apt, no download). Debian only.
pub fn relock(cache: &Cache, requests: &[Request], keep: Option<&Lock>) -> Result<Lock> {
    ensure_debian()?;
    let dir = cache.subdir("debs")?;
    let mut packages = Vec::new();
    for r in requests {
        let kept = keep.and_then(|k| {
            k.packages
                .iter()
                .find(|p| p.name == r.name && p.arch == r.arch && p.role == r.role)
        });
        if let Some(p) = kept {
            packages.push(p.clone());
            continue;
        }
        let spec = format!("{}:{}", r.name, r.arch);
        let out = run_apt(
            Command::new("apt-get")
                .arg("--print-uris")
                .arg("download")
                .arg(&spec),
        )
        .with_context(|| {
            format!("asking apt for {spec}; is the package known (apt-get update) and the architecture enabled?")
        })?;
        let uri = parse_print_uris(&out).with_context(|| format!("apt's answer for {spec}"))?;
        ensure!(
            uri.size > 0 && uri.size <= MAX_DEB_LEN,
            "{spec}: apt says it is {} bytes",
            uri.size
        );
        let tmp = temp_file_in(&dir, &uri.file_name.replace('/', "_"))?;
        let (len, sha) = download(&uri.url, tmp.path(), Some(uri.size))
            .with_context(|| format!("downloading {spec}"))?;
        ensure!(
            len == uri.size,
            "{}: got {len} bytes, apt's index says {}",
            uri.url,
            uri.size
        );
        if let Some(want) = &uri.sha256 {
            ensure!(
                *want == sha,
                "{}: sha256 {sha} differs from apt's index ({want}); the mirror is inconsistent, try again later",
                uri.url
            );
        }
        let control = deb::read_control(tmp.path())
            .with_context(|| format!("reading the control file of {}", uri.url))?;
        let field = |f: &str| {
            deb::parse_control_field(&control, f)
                .with_context(|| format!("{} has no {f} field", uri.url))
        };
        let (name, version, arch) = (field("Package")?, field("Version")?, field("Architecture")?);
        ensure!(
            name == r.name,
            "{} holds package {name}, not {}",
            uri.url,
            r.name
        );
        ensure!(
            arch == r.arch || arch == "all",
            "{} is for {arch}, not {}",
            uri.url,
            r.arch
        );
        let pkg = LockedPackage {
            name,
            version,
            arch,
            role: r.role,
            url: uri.url,
            size: len,
            sha256: sha,
        };
        pkg.validate()
            .with_context(|| format!("the entry apt gave for {spec}"))?;
        persist_file(tmp, &dir.join(pkg.file_name()))?;
        eprintln!("vmdisk: pinned {} {} ({})", pkg.name, pkg.version, pkg.arch);
        packages.push(pkg);
    }
    let lock = Lock { packages };
    // Round-trip through the parser so a lock we write is one we can read.
    Lock::parse(&lock.to_toml()).context("the relocked lock does not parse")?;
    Ok(lock)
}

/// Relock the default packages for `guests` (host packages for this machine's architecture)
/// and write the lock to `path` atomically. What `cargo xtask vmtest --relock` runs; with
/// `keep_pinned` (`--relock-missing`), every package `path` pins already keeps its version
/// (and the kernel its release: it is the entry named `linux-image-*`) and only packages the
/// lock lacks are asked of apt.
pub fn write_lock(path: &Path, cache: &Cache, guests: &[Arch], keep_pinned: bool) -> Result<Lock> {
    let host = Arch::host().context("this machine's architecture cannot run the harness")?;
    let mut requests: Vec<Request> = Vec::new();
    for g in guests {
        for r in default_requests(*g, host)? {
            if !requests
                .iter()
                .any(|q| q.name == r.name && q.arch == r.arch)
            {
                requests.push(r);
            }
        }
    }
    let old = if keep_pinned {
        let text = fs::read_to_string(path)
            .with_context(|| format!("reading {} to keep its pins", path.display()))?;
        let old = Lock::parse(&text).with_context(|| format!("parsing {}", path.display()))?;
        // The kernel request names apt's current release; keep the pinned one instead.
        for r in requests.iter_mut() {
            if r.name.starts_with("linux-image-") {
                if let Some(k) = old
                    .packages
                    .iter()
                    .find(|p| p.name.starts_with("linux-image-") && p.arch == r.arch)
                {
                    r.name = k.name.clone();
                }
            }
        }
        Some(old)
    } else {
        None
    };
    let lock = relock(cache, &requests, old.as_ref())?;
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = temp_file_in(dir, "assets.lock")?;
    fs::write(tmp.path(), lock.to_toml())
        .with_context(|| format!("writing {}", tmp.path().display()))?;
    fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o644))?;
    persist_file(tmp, path)?;
    Ok(lock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn pkg() -> LockedPackage {
        LockedPackage {
            name: "busybox-static".into(),
            version: "1:1.35.0-4+deb12u1+b1".into(),
            arch: "amd64".into(),
            role: Role::Guest,
            url: "http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb".into(),
            size: 5,
            sha256: hex(&Sha256::digest(b"hello")),
        }
    }

    #[test]
    fn lock_round_trips_and_names_the_relock_command() {
        let mut data = pkg();
        data.name = "qemu-system-data".into();
        data.arch = "all".into();
        data.role = Role::Host;
        let lock = Lock {
            packages: vec![pkg(), data],
        };
        let text = lock.to_toml();
        assert!(text.starts_with("# Pinned Debian packages"));
        assert!(
            text.contains("[[package]]\nname = \"busybox-static\""),
            "{text}"
        );
        assert!(text.contains("role = \"host\""));
        assert_eq!(Lock::parse(&text).unwrap(), lock);
        assert_eq!(lock.get("busybox-static", "amd64").unwrap().size, 5);
        assert_eq!(lock.get("qemu-system-data", "arm64").unwrap().arch, "all");
        let err = lock.get("busybox-static", "arm64").unwrap_err().to_string();
        assert!(
            err.contains(RELOCK_COMMAND) && err.contains(LOCK_PATH),
            "{err}"
        );
    }

    #[test]
    fn lock_rejects_bad_entries() {
        let base = Lock {
            packages: vec![pkg()],
        }
        .to_toml();
        for (from, to) in [
            ("name = \"busybox-static\"", "name = \"../evil\""),
            ("version = \"1:", "version = \"1/"),
            ("size = 5", "size = 0"),
            ("role = \"guest\"", "role = \"both\""),
            ("url = \"http://", "url = \"file://"),
            ("sha256 = \"2c", "sha256 = \"ZZ"),
            ("size = 5", "size = 5\nextra = 1"),
        ] {
            assert!(base.contains(from), "{from}");
            let text = base.replace(from, to);
            assert!(Lock::parse(&text).is_err(), "accepted {to}");
        }
        let entry = base.split_once("[[package]]").unwrap().1;
        let dup = format!("{base}\n[[package]]{entry}");
        let err = format!("{:#}", Lock::parse(&dup).unwrap_err());
        assert!(err.contains("twice"), "{err}");
        assert_eq!(Lock::parse("# empty\n").unwrap(), Lock::default());
    }

    #[test]
    fn builtin_lock_parses_and_pins_the_guest() {
        let lock = Lock::builtin().unwrap();
        for name in GUEST_PACKAGES.iter().chain(BUILDER_PACKAGES) {
            for arch in ["amd64", "arm64"] {
                lock.get(name, arch).unwrap();
            }
        }
        assert!(lock
            .packages
            .iter()
            .any(|p| p.name.starts_with("linux-image-") && p.arch == "amd64"));
        lock.get("qemu-system-x86", "amd64").unwrap();
        lock.get("qemu-system-common", "amd64").unwrap();
        lock.get("qemu-system-data", "amd64").unwrap();
        for arch in [Arch::X86_64, Arch::Aarch64] {
            for name in TOOLCHAIN_PACKAGES.iter().chain(emulator_packages(arch)) {
                lock.get(name, arch.debian()).unwrap();
            }
        }
    }

    #[test]
    fn file_names_escape_the_epoch() {
        assert_eq!(
            pkg().file_name(),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(
            percent_decode("busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb"),
            "busybox-static_1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(percent_decode("a%2"), "a%2");
        assert_eq!(percent_decode("%zz%"), "%zz%");
    }

    #[test]
    fn print_uris_output_parses() {
        let out = "'http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb' busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb 928188 SHA256:3D3F\n";
        assert_eq!(
            parse_print_uris(out).unwrap(),
            AptUri {
                url: "http://deb.debian.org/debian/pool/main/b/busybox/busybox-static_1.35.0-4%2bdeb12u1%2bb1_amd64.deb".into(),
                file_name: "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb".into(),
                size: 928188,
                sha256: Some("3d3f".into()),
            }
        );
        let md5 = "'http://x/y.deb' y.deb 12 MD5Sum:abc\n";
        assert_eq!(parse_print_uris(md5).unwrap().sha256, None);
        assert!(parse_print_uris("Reading package lists...\n").is_err());
    }

    #[test]
    fn cache_serves_verified_files_from_the_deb_dir_and_discards_bad_ones() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = dir.path().join("mirror");
        fs::create_dir(&mirror).unwrap();
        let cache = Cache::new(dir.path().join("cache")).with_deb_dirs(vec![mirror.clone()]);
        let mut p = pkg();
        // Unreachable URL: anything not served locally must fail, not hang.
        p.url = "http://127.0.0.1:9/none.deb".into();
        fs::write(mirror.join(p.file_name()), b"hello").unwrap();
        let got = cache.deb(&p).unwrap();
        assert_eq!(fs::read(&got).unwrap(), b"hello");
        // A corrupted cache entry is discarded and fetched again.
        fs::write(&got, b"HELLO").unwrap();
        assert_eq!(fs::read(cache.deb(&p).unwrap()).unwrap(), b"hello");
        // A mirror file with the right size but the wrong content is refused.
        fs::remove_file(&got).unwrap();
        fs::write(mirror.join(p.file_name()), b"jello").unwrap();
        let err = format!("{:#}", cache.deb(&p).unwrap_err());
        assert!(
            err.contains("expected 5 bytes with sha256") && err.contains(RELOCK_COMMAND),
            "{err}"
        );
        let cache = cache.with_deb_dirs(Vec::new());
        let err = format!("{:#}", cache.deb(&p).unwrap_err());
        assert!(err.contains("127.0.0.1:9"), "{err}");
        // No temporaries left behind.
        let debs: Vec<_> = fs::read_dir(cache.root().join("debs")).unwrap().collect();
        assert!(debs.is_empty(), "{debs:?}");
    }

    #[test]
    fn a_cache_without_downloads_serves_local_files_and_names_the_fetch_step() {
        let dir = tempfile::tempdir().unwrap();
        let mirror = dir.path().join("mirror");
        fs::create_dir(&mirror).unwrap();
        let mut p = pkg();
        // Were a download tried, the error would name this address instead of the fetch step.
        p.url = "http://127.0.0.1:9/none.deb".into();
        let cache = Cache::new(dir.path().join("cache")).with_downloads(Downloads::Refused {
            how_to_fetch: "fetch them with `frobnicate --fetch`".into(),
        });
        let err = format!("{:#}", cache.deb(&p).unwrap_err());
        assert!(
            err.contains("busybox-static") && err.contains("frobnicate --fetch"),
            "{err}"
        );
        assert!(!err.contains("127.0.0.1:9"), "a download was tried: {err}");
        // What is already local is still served (and unpacking needs no download).
        fs::write(mirror.join(p.file_name()), b"hello").unwrap();
        let cache = cache.with_deb_dirs(vec![mirror]);
        assert_eq!(fs::read(cache.deb(&p).unwrap()).unwrap(), b"hello");
    }

    #[test]
    fn unpacked_and_sysroot_are_built_once() {
        use crate::deb::tests::{deb, tar, Item};
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache")).with_deb_dirs(Vec::new());
        let mut pkgs = Vec::new();
        for (name, items) in [
            (
                "liba",
                vec![
                    Item::Dir("./lib/", 0o755),
                    Item::File("./lib/liba.so", 0o644, b"a"),
                ],
            ),
            (
                "libb",
                vec![
                    Item::File("./lib/libb.so", 0o644, b"b"),
                    Item::Symlink("./lib/libb.so.1", "libb.so"),
                ],
            ),
        ] {
            let mut xz = Vec::new();
            liblzma::read::XzEncoder::new(&tar(&items)[..], 1)
                .read_to_end(&mut xz)
                .unwrap();
            let bytes = deb(xz, "Package: x\n");
            let mut p = pkg();
            p.name = name.into();
            p.url = "http://127.0.0.1:9/none.deb".into();
            p.size = bytes.len() as u64;
            p.sha256 = hex(&Sha256::digest(&bytes));
            let debs = cache.subdir("debs").unwrap();
            fs::write(debs.join(p.file_name()), &bytes).unwrap();
            pkgs.push(p);
        }
        let a = cache.unpacked(&pkgs[0]).unwrap();
        assert_eq!(fs::read(a.join("lib/liba.so")).unwrap(), b"a");
        assert_eq!(cache.unpacked(&pkgs[0]).unwrap(), a);
        let refs: Vec<&LockedPackage> = pkgs.iter().rev().collect();
        let root = cache.sysroot_of(&refs).unwrap();
        assert_eq!(fs::read(root.join("lib/liba.so")).unwrap(), b"a");
        assert_eq!(fs::read(root.join("lib/libb.so.1")).unwrap(), b"b");
        // Same set in another order: same folder.
        let refs: Vec<&LockedPackage> = pkgs.iter().collect();
        assert_eq!(cache.sysroot_of(&refs).unwrap(), root);
        let lock = Lock {
            packages: pkgs.clone(),
        };
        let by_name = cache
            .clone()
            .with_lock(lock)
            .sysroot(Arch::X86_64, &["libb", "liba"])
            .unwrap();
        assert_eq!(by_name, root);
        let leftovers: Vec<_> = fs::read_dir(cache.root().join("unpacked"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(".tmp"))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn racing_unpacks_use_one_copy() {
        use crate::deb::tests::{deb, tar, Item};
        let dir = tempfile::tempdir().unwrap();
        let cache = Cache::new(dir.path().join("cache")).with_deb_dirs(Vec::new());
        let mut xz = Vec::new();
        liblzma::read::XzEncoder::new(&tar(&[Item::File("./f", 0o644, b"f")])[..], 1)
            .read_to_end(&mut xz)
            .unwrap();
        let bytes = deb(xz, "Package: x\n");
        let mut p = pkg();
        p.size = bytes.len() as u64;
        p.sha256 = hex(&Sha256::digest(&bytes));
        fs::write(cache.subdir("debs").unwrap().join(p.file_name()), &bytes).unwrap();
        let results: Vec<PathBuf> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..4)
                .map(|_| s.spawn(|| cache.unpacked(&p).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(|r| *r == results[0]));
        assert_eq!(fs::read(results[0].join("f")).unwrap(), b"f");
        let n = fs::read_dir(cache.root().join("unpacked")).unwrap().count();
        assert_eq!(n, 1);
    }

    proptest! {
        #[test]
        fn lock_parser_never_panics(s in ".{0,400}") {
            let _ = Lock::parse(&s);
        }

        #[test]
        fn percent_decode_never_panics(s in ".{0,40}") {
            let _ = percent_decode(&s);
        }
    }
}
