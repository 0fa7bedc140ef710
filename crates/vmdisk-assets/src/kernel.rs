//! Kernel images qemu can boot directly, and the order to load kernel modules in.
//!
//! x86_64 bzImage (Documentation/arch/x86/boot.rst):
//! ```text
//!  0x1f1  setup_sects (u8; 0 means 4)       0x202  "HdrS"   0x206  protocol version (u16)
//!  0x248  payload_offset (u32 LE)           0x24c  payload_length (u32 LE)
//!  payload = file[(setup_sects + 1) * 512 + payload_offset ..][.. payload_length]
//!          = compressed vmlinux (xz/gzip/zstd) + its uncompressed size (u32 LE, last 4 bytes)
//! ```
//! arm64 `Image`: magic "ARM\x64" at 0x38; Debian ships it gzip-compressed as vmlinuz (or as an
//! EFI zboot image: "MZ" then "zimg" at 4, payload offset/size at 8/12, compression at 24).
//!
//! Modules: each `.ko` has a `.modinfo` section of NUL-separated `key=value` strings
//! (`name=`, `depends=a,b`, `softdep=pre: x post: y`, `alias=`). Debian's unpacked package has
//! no modules.dep, so [`load_order`] computes it from `.modinfo`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::arch::Arch;
use crate::elf;

/// Largest kernel image we decompress to (Debian's x86_64 vmlinux is ~66 MB).
const MAX_KERNEL_LEN: u64 = 512 << 20;
/// Compression ratio beyond which we do not trust a payload's size trailer for preallocation
/// (Debian's xz vmlinux compresses about 8:1).
const MAX_KERNEL_RATIO: u64 = 32;
/// Largest module file we read (the biggest Debian modules are ~30 MB).
const MAX_MODULE_LEN: u64 = 256 << 20;
/// Most module files under one release (Debian has ~4,500).
const MAX_MODULES: usize = 100_000;
/// Largest modules.builtin / modules.builtin.modinfo we read.
const MAX_BUILTIN_LIST_LEN: u64 = 64 << 20;
/// Directory depth below lib/modules/<release> we descend to.
const MAX_TREE_DEPTH: usize = 32;

const XZ_MAGIC: &[u8] = b"\xfd7zXZ\0";
const GZIP_MAGIC: &[u8] = b"\x1f\x8b";
const ZSTD_MAGIC: &[u8] = b"\x28\xb5\x2f\xfd";
/// arm64 `Image` magic at [`ARM64_MAGIC_OFF`].
const ARM64_MAGIC: &[u8] = b"ARM\x64";
const ARM64_MAGIC_OFF: usize = 0x38;
/// Xen's `XEN_ELFNOTE_PHYS32_ENTRY`: the PVH entry point qemu needs to boot a vmlinux.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// The image qemu's `-kernel` boots for `arch`, from the package's `/boot/vmlinuz-*`:
/// x86_64: the uncompressed ELF vmlinux inside the bzImage (booted through its PVH entry);
/// aarch64: the uncompressed arm64 `Image`.
pub fn boot_image(arch: Arch, vmlinuz: &[u8]) -> Result<Vec<u8>> {
    match arch {
        Arch::X86_64 => x86_64_vmlinux(vmlinuz),
        Arch::Aarch64 => arm64_image(vmlinuz),
    }
}

fn x86_64_vmlinux(vmlinuz: &[u8]) -> Result<Vec<u8>> {
    let vmlinux = if elf::is_elf(vmlinuz) {
        vmlinuz.to_vec()
    } else {
        let payload = bzimage_payload(vmlinuz)?;
        decompress_kernel(payload).context("decompressing the bzImage payload")?
    };
    let info = elf::inspect(&vmlinux).context("reading the vmlinux ELF header")?;
    ensure!(
        info.machine == elf::EM_X86_64,
        "the kernel is for {}, not x86-64; the lock's linux-image package has the wrong architecture",
        elf::machine_name(info.machine)
    );
    ensure!(
        elf::has_note(&vmlinux, "Xen", XEN_ELFNOTE_PHYS32_ENTRY)?,
        "the vmlinux has no Xen PVH entry note, so qemu cannot boot it with -kernel; \
         use a kernel built with CONFIG_PVH (Debian's is)"
    );
    Ok(vmlinux)
}

/// The compressed payload of an x86 bzImage.
pub fn bzimage_payload(bz: &[u8]) -> Result<&[u8]> {
    ensure!(
        bz.len() >= 0x250 && &bz[0x202..0x206] == b"HdrS",
        "not an x86 bzImage: no \"HdrS\" boot header at 0x202 (and not an ELF vmlinux either)"
    );
    let version = u16::from_le_bytes([bz[0x206], bz[0x207]]);
    ensure!(
        version >= 0x208,
        "bzImage boot protocol {}.{:02} is older than 2.08, which added payload_offset",
        version >> 8,
        version & 0xff
    );
    let setup_sects = match bz[0x1f1] {
        0 => 4,
        n => u64::from(n),
    };
    let le32 = |o: usize| u64::from(u32::from_le_bytes([bz[o], bz[o + 1], bz[o + 2], bz[o + 3]]));
    let start = (setup_sects + 1) * 512 + le32(0x248);
    let len = le32(0x24c);
    let end = start + len;
    ensure!(
        len >= 4 && end <= bz.len() as u64,
        "bzImage payload ({len} bytes at offset {start}) is outside the {}-byte file; the kernel file is truncated",
        bz.len()
    );
    Ok(&bz[start as usize..end as usize])
}

/// Decompress a kernel payload (xz, gzip or zstd by magic). Kernel payloads end with the
/// uncompressed size as u32 LE, and the kernel's xz streams need not end the way xz(1)
/// expects, so a decoder error at the very end is accepted when the output is a complete ELF
/// of exactly that size.
pub fn decompress_kernel(payload: &[u8]) -> Result<Vec<u8>> {
    ensure!(
        payload.len() >= 8,
        "kernel payload of {} bytes is too short",
        payload.len()
    );
    let tail = &payload[payload.len() - 4..];
    let expected = u64::from(u32::from_le_bytes([tail[0], tail[1], tail[2], tail[3]]));
    let mut out = Vec::new();
    // Reserve what the trailer promises, but not more than a plausible ratio of the input, so a
    // lying trailer cannot make us reserve much.
    if expected <= MAX_KERNEL_LEN && expected <= payload.len() as u64 * MAX_KERNEL_RATIO {
        out.reserve_exact(expected as usize);
    }
    let (kind, res) = if payload.starts_with(XZ_MAGIC) {
        ("xz", xz_decode(payload, &mut out))
    } else {
        let (kind, decoder): (&str, Box<dyn Read + '_>) = if payload.starts_with(GZIP_MAGIC) {
            ("gzip", Box::new(flate2::bufread::GzDecoder::new(payload)))
        } else if payload.starts_with(ZSTD_MAGIC) {
            let mut d = zstd::stream::read::Decoder::with_buffer(payload)
                .context("starting the zstd decoder")?
                .single_frame();
            d.window_log_max(31)
                .context("configuring the zstd decoder")?;
            ("zstd", Box::new(d))
        } else {
            bail!(
                "kernel payload compression not supported (first bytes {:02x?}); \
                 xz, gzip and zstd are (CONFIG_KERNEL_XZ/GZIP/ZSTD)",
                &payload[..payload.len().min(6)]
            );
        };
        let res = decoder
            .take(MAX_KERNEL_LEN + 1)
            .read_to_end(&mut out)
            .map(|_| ())
            .map_err(anyhow::Error::from);
        (kind, res)
    };
    ensure!(
        out.len() as u64 <= MAX_KERNEL_LEN,
        "the kernel decompresses to more than {MAX_KERNEL_LEN} bytes; refusing it"
    );
    match res {
        Ok(()) => Ok(out),
        // The whole image came out; only the stream's end did not parse.
        Err(_) if out.len() as u64 == expected && elf::is_elf(&out) => Ok(out),
        Err(e) => Err(e).with_context(|| {
            format!(
                "{kind} decoding stopped after {} of {expected} bytes; the kernel file is corrupt",
                out.len()
            )
        }),
    }
}

/// Decode one xz stream from `input` into `out`, keeping everything decoded before an error
/// (the `Read` adapters drop the output of the call that fails). Stops past [`MAX_KERNEL_LEN`].
fn xz_decode(input: &[u8], out: &mut Vec<u8>) -> Result<()> {
    use liblzma::stream::{Action, Status, Stream};
    let mut stream = Stream::new_stream_decoder(u64::MAX, 0).context("starting the xz decoder")?;
    let mut chunk = vec![0u8; 1 << 20];
    loop {
        let (in_before, out_before) = (stream.total_in(), stream.total_out());
        // total_in never exceeds what we handed in.
        let rest = input.get(in_before as usize..).unwrap_or_default();
        let res = stream.process(rest, &mut chunk, Action::Run);
        let produced = (stream.total_out() - out_before) as usize;
        out.extend_from_slice(&chunk[..produced.min(chunk.len())]);
        if out.len() as u64 > MAX_KERNEL_LEN {
            return Ok(()); // the caller reports the size
        }
        match res {
            Ok(Status::StreamEnd) => return Ok(()),
            Ok(_) if produced == 0 && stream.total_in() == in_before => {
                bail!("the input ended before the xz stream did")
            }
            Ok(_) => {}
            Err(e) => return Err(e).context("xz data error"),
        }
    }
}

fn arm64_image(vmlinuz: &[u8]) -> Result<Vec<u8>> {
    let image = if vmlinuz.starts_with(GZIP_MAGIC) {
        gunzip_capped(vmlinuz)?
    } else if vmlinuz.len() >= 64 && &vmlinuz[..2] == b"MZ" && &vmlinuz[4..8] == b"zimg" {
        efi_zboot_payload(vmlinuz)?
    } else {
        vmlinuz.to_vec()
    };
    ensure!(
        image.get(ARM64_MAGIC_OFF..ARM64_MAGIC_OFF + 4) == Some(ARM64_MAGIC),
        "not an arm64 kernel Image: no \"ARM\\x64\" magic at 0x38 (after decompression)"
    );
    Ok(image)
}

fn gunzip_capped(bytes: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::bufread::GzDecoder::new(bytes)
        .take(MAX_KERNEL_LEN + 1)
        .read_to_end(&mut out)
        .context("gunzipping the kernel; the file is corrupt")?;
    ensure!(
        out.len() as u64 <= MAX_KERNEL_LEN,
        "the kernel decompresses to more than {MAX_KERNEL_LEN} bytes; refusing it"
    );
    Ok(out)
}

/// The decompressed payload of an arm64 EFI zboot image (CONFIG_EFI_ZBOOT).
fn efi_zboot_payload(img: &[u8]) -> Result<Vec<u8>> {
    let le32 = |o: usize| u32::from_le_bytes([img[o], img[o + 1], img[o + 2], img[o + 3]]) as usize;
    let (off, len) = (le32(8), le32(12));
    let payload = off
        .checked_add(len)
        .and_then(|end| img.get(off..end))
        .context("EFI zboot payload is outside the file; the kernel file is truncated")?;
    let kind = String::from_utf8_lossy(&img[24..32]);
    match kind.trim_end_matches('\0') {
        "gzip" => gunzip_capped(payload),
        "zstd" | "zstd22" => {
            let mut out = Vec::new();
            zstd::stream::read::Decoder::with_buffer(payload)?
                .take(MAX_KERNEL_LEN + 1)
                .read_to_end(&mut out)
                .context("decompressing the EFI zboot payload")?;
            ensure!(out.len() as u64 <= MAX_KERNEL_LEN, "kernel too large");
            Ok(out)
        }
        other => bail!("EFI zboot compression {other:?} is not supported (gzip and zstd are)"),
    }
}

/// The kernel release of an unpacked linux-image package: the one directory under
/// `lib/modules` (or `usr/lib/modules`).
pub fn kernel_release(unpacked_root: &Path) -> Result<String> {
    let mut releases = BTreeSet::new();
    for dir in ["lib/modules", "usr/lib/modules"] {
        let Ok(rd) = fs::read_dir(unpacked_root.join(dir)) else {
            continue;
        };
        for e in rd {
            let e = e.with_context(|| format!("reading {}", unpacked_root.join(dir).display()))?;
            if e.file_type()?.is_dir() {
                releases.insert(e.file_name().to_string_lossy().into_owned());
            }
        }
    }
    match releases.len() {
        1 => Ok(releases.into_iter().next().unwrap_or_default()),
        0 => bail!(
            "{} has no lib/modules/<release> directory; is it an unpacked linux-image package?",
            unpacked_root.display()
        ),
        _ => bail!(
            "{} holds modules of several kernel releases ({}); expected exactly one",
            unpacked_root.display(),
            releases.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }
}

/// `lib/modules/<release>` (or `usr/lib/modules/<release>`) of an unpacked linux-image package.
pub fn modules_dir(unpacked_root: &Path) -> Result<PathBuf> {
    let release = kernel_release(unpacked_root)?;
    let lib = unpacked_root.join("lib/modules").join(&release);
    if lib.is_dir() {
        Ok(lib)
    } else {
        Ok(unpacked_root.join("usr/lib/modules").join(release))
    }
}

/// What a module's `.modinfo` says about loading it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ModInfo {
    /// `name=` with `-` turned into `_` (empty when the module does not say).
    pub name: String,
    /// `depends=`: modules that must be loaded first.
    pub depends: Vec<String>,
    /// `softdep=pre:` modules, which modprobe loads first too (e.g. ext4 -> crc32c).
    pub softdep_pre: Vec<String>,
    /// `alias=` entries.
    pub aliases: Vec<String>,
}

/// What the kernel's `sign-file` appends after a module's signature (`module_signature.h`).
const MODULE_SIG_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature` before the magic: algo, hash, id_type, signer_len, key_id_len,
/// pad[3], sig_len (u32 BE).
const MODULE_SIG_INFO_LEN: usize = 12;

/// `ko` without the signature `sign-file` appended, or `ko` itself when it has none.
///
/// The test guests' initramfs loads its modules unsigned (as NixOS's own kernels, which are
/// not signed, do): the kernel then skips hashing each module and checking its signature,
/// which under TCG costs ~0.1 s for the ~20 modules stage 1 loads. (Debian's kernel does not
/// enforce signatures without Secure Boot; it only notes the taint, at KERN_NOTICE.)
pub fn strip_module_signature(ko: &[u8]) -> Result<&[u8]> {
    let Some(body) = ko.strip_suffix(MODULE_SIG_MAGIC) else {
        return Ok(ko);
    };
    ensure!(
        body.len() >= MODULE_SIG_INFO_LEN,
        "the module ends in {MODULE_SIG_MAGIC:?} but is too short ({} bytes) for the signature \
         header; the .ko file is corrupt",
        ko.len()
    );
    let (rest, info) = body.split_at(body.len() - MODULE_SIG_INFO_LEN);
    let signer = u64::from(info[3]);
    let key_id = u64::from(info[4]);
    let sig = u64::from(u32::from_be_bytes([info[8], info[9], info[10], info[11]]));
    let trailer = sig + signer + key_id;
    ensure!(
        trailer <= rest.len() as u64,
        "the module's signature trailer claims {trailer} bytes but only {} precede it; the \
         .ko file is corrupt",
        rest.len()
    );
    // In range: trailer <= rest.len(), checked above.
    let unsigned = &rest[..rest.len() - trailer as usize];
    ensure!(
        elf::is_elf(unsigned),
        "the module without its {trailer}-byte signature is not an ELF file; the .ko file is \
         corrupt"
    );
    Ok(unsigned)
}

/// Module names treat `-` and `_` alike; we spell them with `_`.
pub fn normalize_module_name(name: &str) -> String {
    name.replace('-', "_")
}

/// Parse the `.modinfo` section of a kernel module (an uncompressed `.ko`).
pub fn modinfo(ko_bytes: &[u8]) -> Result<ModInfo> {
    let section = elf::section(ko_bytes, ".modinfo")
        .context("reading the module's ELF sections")?
        .context("the file has no .modinfo section; it is not a kernel module")?;
    Ok(parse_modinfo(section))
}

fn parse_modinfo(section: &[u8]) -> ModInfo {
    let mut info = ModInfo::default();
    for entry in section.split(|&b| b == 0) {
        let entry = String::from_utf8_lossy(entry);
        let Some((key, value)) = entry.split_once('=') else {
            continue;
        };
        match key {
            "name" => info.name = normalize_module_name(value),
            "depends" => info.depends.extend(
                value
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(normalize_module_name),
            ),
            "softdep" => {
                let mut pre = false;
                for word in value.split_whitespace() {
                    if let Some(section) = word.strip_suffix(':') {
                        pre = section == "pre";
                    } else if pre {
                        info.softdep_pre.push(normalize_module_name(word));
                    }
                }
            }
            "alias" => info.aliases.push(value.to_string()),
            _ => {}
        }
    }
    info
}

/// Read a module file, decompressing `.ko.xz`, `.ko.zst` and `.ko.gz`.
pub fn read_module(path: &Path) -> Result<Vec<u8>> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    ensure!(
        len <= MAX_MODULE_LEN,
        "{} is {len} bytes, more than the {MAX_MODULE_LEN} a module may have",
        path.display()
    );
    let raw = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let name = path.to_string_lossy();
    let decoder: Box<dyn Read + '_> = if name.ends_with(".ko.xz") {
        Box::new(liblzma::bufread::XzDecoder::new_multi_decoder(&raw[..]))
    } else if name.ends_with(".ko.zst") {
        Box::new(zstd::stream::read::Decoder::with_buffer(&raw[..])?)
    } else if name.ends_with(".ko.gz") {
        Box::new(flate2::bufread::GzDecoder::new(&raw[..]))
    } else {
        return Ok(raw);
    };
    let mut out = Vec::new();
    decoder
        .take(MAX_MODULE_LEN + 1)
        .read_to_end(&mut out)
        .with_context(|| format!("decompressing {}", path.display()))?;
    ensure!(
        out.len() as u64 <= MAX_MODULE_LEN,
        "{} decompresses to more than {MAX_MODULE_LEN} bytes",
        path.display()
    );
    Ok(out)
}

/// The module name a file stands for: `crc32c-intel.ko.xz` -> `crc32c_intel`.
fn module_file_name(file_name: &str) -> Option<String> {
    ["ko", "ko.xz", "ko.zst", "ko.gz"]
        .iter()
        .find_map(|ext| file_name.strip_suffix(&format!(".{ext}")))
        .filter(|s| !s.is_empty())
        .map(normalize_module_name)
}

/// The modules of one kernel release, indexed by name, with built-ins and (lazily) aliases.
struct ModuleIndex<'a> {
    root: &'a Path,
    /// name -> path relative to `root`
    files: BTreeMap<String, PathBuf>,
    builtin: BTreeSet<String>,
    /// Aliases of built-in modules (normalized).
    builtin_aliases: BTreeSet<String>,
    /// alias (normalized) -> module names; filled on the first name that is not a file or
    /// built-in.
    aliases: Option<BTreeMap<String, BTreeSet<String>>>,
    infos: HashMap<String, ModInfo>,
}

/// How a name resolved.
enum Resolved {
    Module(String),
    Builtin,
}

impl<'a> ModuleIndex<'a> {
    fn new(root: &'a Path) -> Result<Self> {
        let mut files = BTreeMap::new();
        let mut stack = vec![(PathBuf::new(), 0usize)];
        while let Some((rel, depth)) = stack.pop() {
            ensure!(
                depth <= MAX_TREE_DEPTH,
                "{} is nested too deep",
                root.join(&rel).display()
            );
            let dir = root.join(&rel);
            let mut entries = fs::read_dir(&dir)
                .with_context(|| format!("reading {}", dir.display()))?
                .collect::<std::io::Result<Vec<_>>>()
                .with_context(|| format!("reading {}", dir.display()))?;
            entries.sort_by_key(|e| e.file_name());
            for e in entries {
                let ft = e.file_type()?;
                let child = rel.join(e.file_name());
                if ft.is_dir() {
                    stack.push((child, depth + 1));
                } else if ft.is_file() {
                    let Some(name) = module_file_name(&e.file_name().to_string_lossy()) else {
                        continue;
                    };
                    ensure!(
                        files.len() < MAX_MODULES,
                        "more than {MAX_MODULES} modules under {}",
                        root.display()
                    );
                    // depmod's rule, simplified: updates/ overrides everything else.
                    let prefer = child.starts_with("updates");
                    match files.get(&name) {
                        Some(_) if !prefer => {}
                        _ => {
                            files.insert(name, child);
                        }
                    }
                }
            }
        }
        let mut builtin = BTreeSet::new();
        if let Some(list) = read_optional(&root.join("modules.builtin"))? {
            for line in String::from_utf8_lossy(&list).lines() {
                let file = line.rsplit('/').next().unwrap_or_default();
                if let Some(name) = module_file_name(file) {
                    builtin.insert(name);
                }
            }
        }
        let mut builtin_aliases = BTreeSet::new();
        if let Some(list) = read_optional(&root.join("modules.builtin.modinfo"))? {
            for entry in list.split(|&b| b == 0) {
                let entry = String::from_utf8_lossy(entry);
                if let Some((module, kv)) = entry.split_once('.') {
                    if let Some(alias) = kv.strip_prefix("alias=") {
                        builtin_aliases.insert(normalize_module_name(alias));
                        builtin.insert(normalize_module_name(module));
                    }
                }
            }
        }
        Ok(ModuleIndex {
            root,
            files,
            builtin,
            builtin_aliases,
            aliases: None,
            infos: HashMap::new(),
        })
    }

    fn info(&mut self, name: &str) -> Result<&ModInfo> {
        if !self.infos.contains_key(name) {
            let rel = &self.files[name];
            let path = self.root.join(rel);
            let info = modinfo(&read_module(&path)?)
                .with_context(|| format!("reading .modinfo of {}", path.display()))?;
            self.infos.insert(name.to_string(), info);
        }
        Ok(&self.infos[name])
    }

    fn alias_index(&mut self) -> Result<&BTreeMap<String, BTreeSet<String>>> {
        if self.aliases.is_none() {
            let mut map: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
            let names: Vec<String> = self.files.keys().cloned().collect();
            for name in names {
                let aliases = self.info(&name)?.aliases.clone();
                for a in aliases {
                    map.entry(normalize_module_name(&a))
                        .or_default()
                        .insert(name.clone());
                }
            }
            self.aliases = Some(map);
        }
        Ok(self.aliases.get_or_insert_with(BTreeMap::new))
    }

    /// A module file, a built-in, or an alias (`NAME` or `crypto-NAME`) of either.
    fn resolve(&mut self, name: &str) -> Result<Option<Resolved>> {
        let norm = normalize_module_name(name);
        if self.files.contains_key(&norm) {
            return Ok(Some(Resolved::Module(norm)));
        }
        if self.builtin.contains(&norm) {
            return Ok(Some(Resolved::Builtin));
        }
        // Aliases compare with `-` = `_` too (ext4 asks for `crypto-crc32c`).
        let wanted = [norm.clone(), format!("crypto_{norm}")];
        if wanted.iter().any(|a| self.builtin_aliases.contains(a)) {
            return Ok(Some(Resolved::Builtin));
        }
        let index = self.alias_index()?;
        let mut candidates: Vec<&String> = wanted
            .iter()
            .filter_map(|a| index.get(a))
            .flatten()
            .collect();
        // Prefer the portable implementation (crc32c_generic over crc32c_intel), then by name.
        candidates.sort_by_key(|c| (!c.ends_with("_generic"), c.as_str()));
        Ok(candidates.first().map(|c| Resolved::Module((*c).clone())))
    }
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>> {
    match fs::metadata(path) {
        Ok(md) => {
            ensure!(
                md.len() <= MAX_BUILTIN_LIST_LEN,
                "{} is {} bytes, more than {MAX_BUILTIN_LIST_LEN}",
                path.display(),
                md.len()
            );
            Ok(Some(
                fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The module files (relative to `modules_root`, i.e. `.../lib/modules/<release>`) to load, in
/// order, so that `wanted` and everything they depend on (`depends=` and `softdep=pre:`,
/// transitively) is loaded, dependencies first. Built-in modules are skipped; names resolve as
/// module file names (`-` = `_`), then built-ins, then aliases (`crc32c` -> crc32c_generic).
/// The order is deterministic: `wanted` in the order given, each module's dependencies sorted.
pub fn load_order(modules_root: &Path, wanted: &[&str]) -> Result<Vec<PathBuf>> {
    let mut index = ModuleIndex::new(modules_root)?;
    let mut state: HashMap<String, Visit> = HashMap::new();
    let mut order = Vec::new();
    let mut stack = Vec::new();
    for w in wanted {
        visit(
            &mut index,
            w,
            "the wanted list",
            &mut state,
            &mut stack,
            &mut order,
        )?;
    }
    Ok(order)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Visit {
    InProgress,
    Done,
}

fn visit(
    index: &mut ModuleIndex,
    name: &str,
    who: &str,
    state: &mut HashMap<String, Visit>,
    stack: &mut Vec<String>,
    order: &mut Vec<PathBuf>,
) -> Result<()> {
    let module = match index.resolve(name)? {
        Some(Resolved::Module(m)) => m,
        Some(Resolved::Builtin) => return Ok(()),
        None => bail!(
            "kernel module {name} (wanted by {who}) is not under {}: no such module file, \
             built-in (modules.builtin) or alias; check the name or the kernel's config",
            index.root.display()
        ),
    };
    match state.get(&module) {
        Some(Visit::Done) => return Ok(()),
        Some(Visit::InProgress) => {
            let start = stack.iter().position(|m| *m == module).unwrap_or(0);
            let mut cycle = stack[start..].to_vec();
            cycle.push(module);
            bail!(
                "kernel modules depend on each other in a cycle: {}",
                cycle.join(" -> ")
            );
        }
        None => {}
    }
    state.insert(module.clone(), Visit::InProgress);
    stack.push(module.clone());
    let info = index.info(&module)?.clone();
    let mut deps: Vec<(String, String)> = Vec::new();
    let mut soft = info.softdep_pre.clone();
    soft.sort();
    deps.extend(
        soft.into_iter()
            .map(|d| (d, format!("{module} (softdep pre)"))),
    );
    let mut hard = info.depends.clone();
    hard.sort();
    deps.extend(hard.into_iter().map(|d| (d, format!("{module} (depends)"))));
    for (dep, why) in deps {
        visit(index, &dep, &why, state, stack, order)?;
    }
    stack.pop();
    state.insert(module.clone(), Visit::Done);
    order.push(index.files[&module].clone());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::elf::tests::ElfBuilder;
    use proptest::prelude::*;
    use std::io::Write;

    fn ko(modinfo: &str) -> Vec<u8> {
        let mut b = ElfBuilder::new(elf::EM_X86_64);
        b.sections = vec![(".modinfo".into(), modinfo.replace(';', "\0").into_bytes())];
        b.build()
    }

    /// `body` signed the way `sign-file` lays it out: PKCS#7 bytes, module_signature, magic.
    fn signed(body: &[u8], sig: &[u8], signer: u8, key_id: u8) -> Vec<u8> {
        let mut v = body.to_vec();
        v.extend(std::iter::repeat_n(
            0xaa,
            usize::from(signer) + usize::from(key_id),
        ));
        v.extend_from_slice(sig);
        // algo, hash, id_type (PKEY_ID_PKCS7 = 2), signer_len, key_id_len, pad[3], sig_len.
        v.extend_from_slice(&[0, 0, 2, signer, key_id, 0, 0, 0]);
        v.extend_from_slice(&(sig.len() as u32).to_be_bytes());
        v.extend_from_slice(MODULE_SIG_MAGIC);
        v
    }

    #[test]
    fn module_signatures_are_stripped_and_unsigned_modules_kept() {
        let body = ko("name=ext4;depends=jbd2");
        let s = signed(&body, &[0x30; 577], 0, 0);
        assert_eq!(strip_module_signature(&s).unwrap(), &body[..]);
        let s = signed(&body, &[0x30; 40], 3, 5);
        assert_eq!(strip_module_signature(&s).unwrap(), &body[..]);
        assert_eq!(strip_module_signature(&body).unwrap(), &body[..]);
        assert_eq!(
            modinfo(strip_module_signature(&s).unwrap()).unwrap().name,
            "ext4"
        );
    }

    #[test]
    fn corrupt_signature_trailers_are_errors() {
        let body = ko("name=ext4");
        // sig_len larger than the file.
        let mut s = signed(&body, &[0x30; 16], 0, 0);
        let at = s.len() - MODULE_SIG_MAGIC.len() - 4;
        s[at..at + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        let e = strip_module_signature(&s).unwrap_err().to_string();
        assert!(e.contains("corrupt"), "{e}");
        // Only the magic.
        assert!(strip_module_signature(MODULE_SIG_MAGIC).is_err());
        // A trailer that does not leave an ELF file.
        let s = signed(b"not an elf file at all", &[0x30; 8], 0, 0);
        assert!(strip_module_signature(&s).is_err());
    }

    proptest! {
        #[test]
        fn stripping_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64),
                                  tail in 0usize..16) {
            let mut v = bytes;
            v.extend_from_slice(&MODULE_SIG_MAGIC[..MODULE_SIG_MAGIC.len().min(tail + 13)]);
            let _ = strip_module_signature(&v);
        }
    }

    #[test]
    fn modinfo_parses_depends_softdeps_and_aliases() {
        let info = modinfo(&ko(
            "license=GPL;softdep=pre: crc32c post: foo-bar;depends=jbd2,mbcache,crc16;\
             alias=fs-ext4;alias=ext3;name=ext4;vermagic=6.1.0",
        ))
        .unwrap();
        assert_eq!(
            info,
            ModInfo {
                name: "ext4".into(),
                depends: vec!["jbd2".into(), "mbcache".into(), "crc16".into()],
                softdep_pre: vec!["crc32c".into()],
                aliases: vec!["fs-ext4".into(), "ext3".into()],
            }
        );
        let info = modinfo(&ko("depends=;name=overlay")).unwrap();
        assert!(info.depends.is_empty());
        let err = modinfo(&ElfBuilder::new(62).build())
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a kernel module"), "{err}");
    }

    fn tree(mods: &[(&str, &str)], builtin: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (path, info) in mods {
            let p = dir.path().join(path);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, ko(info)).unwrap();
        }
        fs::write(dir.path().join("modules.builtin"), builtin.join("\n")).unwrap();
        dir
    }

    fn names(order: &[PathBuf]) -> Vec<String> {
        order
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn load_order_puts_dependencies_first_and_resolves_aliases() {
        let t = tree(
            &[
                (
                    "kernel/fs/ext4/ext4.ko",
                    "name=ext4;depends=jbd2,mbcache,crc16;softdep=pre: crypto-crc32c",
                ),
                ("kernel/fs/jbd2/jbd2.ko", "name=jbd2;depends="),
                ("kernel/fs/mbcache.ko", "name=mbcache;depends="),
                ("kernel/lib/crc16.ko", "name=crc16;depends="),
                (
                    "kernel/crypto/crc32c_generic.ko",
                    "name=crc32c_generic;alias=crypto-crc32c;alias=crc32c",
                ),
                (
                    "kernel/arch/x86/crypto/crc32c-intel.ko",
                    "name=crc32c_intel;alias=crypto-crc32c;alias=crc32c",
                ),
                (
                    "kernel/drivers/virtio/virtio_pci.ko",
                    "name=virtio_pci;depends=virtio_ring,virtio",
                ),
                (
                    "kernel/drivers/virtio/virtio_ring.ko",
                    "name=virtio_ring;depends=virtio",
                ),
            ],
            &["kernel/drivers/virtio/virtio.ko"],
        );
        let order = load_order(t.path(), &["virtio-pci", "ext4", "crc16"]).unwrap();
        assert_eq!(
            names(&order),
            [
                "virtio_ring.ko",
                "virtio_pci.ko",
                "crc32c_generic.ko",
                "crc16.ko",
                "jbd2.ko",
                "mbcache.ko",
                "ext4.ko",
            ]
        );
        assert_eq!(order[0], Path::new("kernel/drivers/virtio/virtio_ring.ko"));
        // Built-ins are skipped without error.
        assert!(load_order(t.path(), &["virtio"]).unwrap().is_empty());
    }

    #[test]
    fn load_order_names_missing_modules_and_cycles() {
        let t = tree(
            &[
                ("a.ko", "name=a;depends=b"),
                ("b.ko", "name=b;depends=c"),
                ("c.ko", "name=c;depends=a"),
                ("d.ko", "name=d;depends=nope"),
            ],
            &[],
        );
        let err = load_order(t.path(), &["d"]).unwrap_err().to_string();
        assert!(
            err.contains("nope") && err.contains("wanted by d (depends)"),
            "{err}"
        );
        let err = load_order(t.path(), &["a"]).unwrap_err().to_string();
        assert!(err.contains("a -> b -> c -> a"), "{err}");
        let err = load_order(t.path(), &["zzz"]).unwrap_err().to_string();
        assert!(err.contains("zzz") && err.contains("wanted list"), "{err}");
    }

    #[test]
    fn compressed_modules_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.ko.xz");
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
        enc.write_all(&ko("name=x;depends=")).unwrap();
        fs::write(&p, enc.finish().unwrap()).unwrap();
        assert_eq!(modinfo(&read_module(&p).unwrap()).unwrap().name, "x");
        let order = load_order(dir.path(), &["x"]).unwrap();
        assert_eq!(order, [PathBuf::from("x.ko.xz")]);
    }

    #[test]
    fn kernel_release_is_the_one_modules_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(kernel_release(dir.path()).is_err());
        fs::create_dir_all(dir.path().join("lib/modules/6.1.0-56-amd64/kernel")).unwrap();
        assert_eq!(kernel_release(dir.path()).unwrap(), "6.1.0-56-amd64");
        assert_eq!(
            modules_dir(dir.path()).unwrap(),
            dir.path().join("lib/modules/6.1.0-56-amd64")
        );
        fs::create_dir_all(dir.path().join("lib/modules/6.1.0-57-amd64")).unwrap();
        let err = kernel_release(dir.path()).unwrap_err().to_string();
        assert!(err.contains("6.1.0-56-amd64, 6.1.0-57-amd64"), "{err}");
    }

    /// A fake vmlinux: an x86-64 ELF with the PVH note, padded so compression has work to do.
    fn vmlinux(pvh: bool) -> Vec<u8> {
        let mut b = ElfBuilder::new(elf::EM_X86_64);
        if pvh {
            b.notes = vec![("Xen".into(), XEN_ELFNOTE_PHYS32_ENTRY, vec![0; 4])];
        }
        b.sections = vec![(
            ".text".into(),
            (0..20_000u32).flat_map(|i| i.to_le_bytes()).collect(),
        )];
        b.build()
    }

    /// A bzImage around `payload` (setup_sects = 0, i.e. 4), with size appended like the kernel.
    fn bzimage(compressed: &[u8], size: usize) -> Vec<u8> {
        let mut bz = vec![0u8; 5 * 512];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        bz[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes());
        let payload_off = 0x100u32;
        let mut payload = compressed.to_vec();
        payload.extend_from_slice(&(size as u32).to_le_bytes());
        bz[0x248..0x24c].copy_from_slice(&payload_off.to_le_bytes());
        bz[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        bz.resize(5 * 512 + payload_off as usize, 0xaa);
        bz.extend_from_slice(&payload);
        bz.extend_from_slice(&[0u8; 100]);
        bz
    }

    fn xz(data: &[u8]) -> Vec<u8> {
        let mut enc = liblzma::write::XzEncoder::new(Vec::new(), 1);
        enc.write_all(data).unwrap();
        enc.finish().unwrap()
    }

    #[test]
    fn x86_64_boot_image_from_xz_gzip_and_zstd_bzimages() {
        let v = vmlinux(true);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&v).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&v[..], 3).unwrap();
        let x = xz(&v);
        // The kernel's own xz streams may lack a proper end: cut the index and footer off.
        let truncated = &x[..x.len() - 16];
        for (what, payload) in [("xz", &x[..]), ("xz cut", truncated), ("zstd", &zst[..])] {
            let got = boot_image(Arch::X86_64, &bzimage(payload, v.len())).unwrap();
            assert_eq!(got, v, "{what}");
        }
        // gzip carries its own size; the kernel appends nothing, so the tail is ISIZE.
        let bz = bzimage(&gz[..gz.len() - 4], v.len());
        assert_eq!(boot_image(Arch::X86_64, &bz).unwrap(), v);
        // An ELF vmlinux passes through.
        assert_eq!(boot_image(Arch::X86_64, &v).unwrap(), v);
    }

    #[test]
    fn x86_64_boot_image_errors() {
        let v = vmlinux(true);
        let x = xz(&v);
        // Truncated in the middle: the size does not match, so the decoder error stands.
        let err = format!(
            "{:#}",
            boot_image(Arch::X86_64, &bzimage(&x[..x.len() / 2], v.len())).unwrap_err()
        );
        assert!(err.contains("corrupt"), "{err}");
        let err = format!(
            "{:#}",
            boot_image(Arch::X86_64, &bzimage(&xz(&vmlinux(false)), v.len())).unwrap_err()
        );
        assert!(err.contains("PVH"), "{err}");
        let mut arm = ElfBuilder::new(elf::EM_AARCH64);
        arm.notes = vec![("Xen".into(), XEN_ELFNOTE_PHYS32_ENTRY, vec![0; 4])];
        let err = boot_image(Arch::X86_64, &arm.build())
            .unwrap_err()
            .to_string();
        assert!(err.contains("AArch64"), "{err}");
        let err = boot_image(Arch::X86_64, b"MZ not a kernel")
            .unwrap_err()
            .to_string();
        assert!(err.contains("HdrS"), "{err}");
        let err = format!(
            "{:#}",
            boot_image(Arch::X86_64, &bzimage(b"BZh91AY&SY....", 100)).unwrap_err()
        );
        assert!(err.contains("not supported"), "{err}");
    }

    #[test]
    fn arm64_boot_image() {
        let mut image = vec![0u8; 4096];
        image[0x38..0x3c].copy_from_slice(ARM64_MAGIC);
        assert_eq!(boot_image(Arch::Aarch64, &image).unwrap(), image);
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&image).unwrap();
        assert_eq!(
            boot_image(Arch::Aarch64, &gz.finish().unwrap()).unwrap(),
            image
        );
        let mut zboot = vec![0u8; 64];
        zboot[..2].copy_from_slice(b"MZ");
        zboot[4..8].copy_from_slice(b"zimg");
        let z = zstd::encode_all(&image[..], 3).unwrap();
        zboot[8..12].copy_from_slice(&64u32.to_le_bytes());
        zboot[12..16].copy_from_slice(&(z.len() as u32).to_le_bytes());
        zboot[24..28].copy_from_slice(b"zstd");
        zboot.extend_from_slice(&z);
        assert_eq!(boot_image(Arch::Aarch64, &zboot).unwrap(), image);
        assert!(boot_image(Arch::Aarch64, &vec![0u8; 4096]).is_err());
    }

    proptest! {
        #[test]
        fn boot_image_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let _ = boot_image(Arch::X86_64, &bytes);
            let _ = boot_image(Arch::Aarch64, &bytes);
            let _ = decompress_kernel(&bytes);
        }

        #[test]
        fn corrupted_bzimages_never_panic(
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8)
        ) {
            let v = vmlinux(true);
            let mut bz = bzimage(&zstd::encode_all(&v[..], 1).unwrap(), v.len());
            for (i, val) in edits {
                let at = i.index(bz.len());
                bz[at] = val;
            }
            let _ = boot_image(Arch::X86_64, &bz);
        }

        #[test]
        fn modinfo_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_modinfo(&bytes);
        }
    }
}
