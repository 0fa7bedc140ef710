//! A minimal ELF reader: enough to find a program's interpreter and `DT_NEEDED` libraries, to
//! read one named section (a kernel module's `.modinfo`), and to collect the shared libraries a
//! set of programs needs from an unpacked Debian tree.
//!
//! ```text
//!  0        e_ident: 7f 'E' 'L' 'F', class (1 = 32-bit, 2 = 64-bit), data (1 = LE, 2 = BE)
//!  16       e_type, e_machine, ..., e_phoff, e_shoff, ..., e_phnum, e_shnum, e_shstrndx
//!  e_phoff  program headers: PT_LOAD (vaddr -> file offset), PT_INTERP, PT_DYNAMIC
//!  e_shoff  section headers; section e_shstrndx holds their names
//! ```
//!
//! Every offset and size read from the file is bounds-checked against the bytes given; nothing
//! is allocated from a size the file claims beyond the named limits below. Errors say which
//! structure is broken and where; callers add the file name.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};

use crate::Arch;

/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `e_machine` of 64-bit ARM.
pub const EM_AARCH64: u16 = 183;

/// The ELF magic at offset 0.
pub const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Most `DT_NEEDED` entries one object may list; real programs list a few dozen.
const MAX_NEEDED: usize = 1024;
/// Longest interpreter path or library name we accept (PATH_MAX).
const MAX_NAME_LEN: usize = 4096;
/// Largest program or library `library_closure` reads; real ones are at most tens of MiB.
const MAX_OBJECT_LEN: u64 = 512 << 20;
/// Symlinks followed while resolving one path in a sysroot (Linux's own limit is 40).
const MAX_SYMLINK_HOPS: usize = 40;
/// Most objects one closure may contain, so a hostile tree cannot make us walk forever.
const MAX_CLOSURE_OBJECTS: usize = 4096;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const SHT_NOBITS: u32 = 8;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const DT_STRSZ: u64 = 10;
/// `e_shstrndx` value meaning "the real index is in section 0's `sh_link`".
const SHN_XINDEX: u16 = 0xffff;

/// What [`inspect`] learns about an ELF object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ElfInfo {
    /// `e_machine` (see [`machine_name`]).
    pub machine: u16,
    /// ELFCLASS64 (else ELFCLASS32).
    pub class64: bool,
    /// `PT_INTERP`: the dynamic loader, e.g. `/lib64/ld-linux-x86-64.so.2`.
    pub interp: Option<String>,
    /// `DT_NEEDED` entries in file order, e.g. `libc.so.6`.
    pub needed: Vec<String>,
}

/// A human name for an `e_machine` value.
pub fn machine_name(machine: u16) -> &'static str {
    match machine {
        3 => "x86",
        8 => "MIPS",
        20 => "PowerPC",
        21 => "PowerPC64",
        22 => "S/390",
        40 => "ARM",
        EM_X86_64 => "x86-64",
        EM_AARCH64 => "AArch64",
        243 => "RISC-V",
        258 => "LoongArch",
        _ => "unknown machine",
    }
}

/// The `e_machine` of programs for `arch`.
pub fn arch_machine(arch: Arch) -> u16 {
    match arch {
        Arch::X86_64 => EM_X86_64,
        Arch::Aarch64 => EM_AARCH64,
    }
}

/// Whether `bytes` starts with the ELF magic.
pub fn is_elf(bytes: &[u8]) -> bool {
    bytes.starts_with(ELF_MAGIC)
}

/// Parse the headers of an ELF object: machine, class, interpreter and needed libraries.
pub fn inspect(bytes: &[u8]) -> Result<ElfInfo> {
    let elf = Elf::parse(bytes)?;
    let mut interp = None;
    let mut dynamic = None;
    for i in 0..elf.phnum {
        let ph = elf.phdr(i)?;
        match ph.p_type {
            PT_INTERP => {
                let raw = elf.file_range(ph.offset, ph.filesz, "PT_INTERP")?;
                let raw = raw.split(|&b| b == 0).next().unwrap_or_default();
                interp = Some(name_string(raw, "the PT_INTERP path")?);
            }
            PT_DYNAMIC => dynamic = Some(ph),
            _ => {}
        }
    }
    let needed = match dynamic {
        Some(ph) => elf.needed(&ph)?,
        None => Vec::new(),
    };
    Ok(ElfInfo {
        machine: elf.machine,
        class64: elf.class64,
        interp,
        needed,
    })
}

/// The contents of the section called `name` (`Some(&[])` for an `SHT_NOBITS` section), or
/// `None` when the object has no such section.
pub fn section<'a>(bytes: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    let elf = Elf::parse(bytes)?;
    let (shnum, shstrndx) = elf.section_counts()?;
    if shnum == 0 {
        return Ok(None);
    }
    ensure!(
        shstrndx < shnum,
        "ELF: the section-name table index {shstrndx} is not below the section count {shnum}"
    );
    let names = elf.shdr(shstrndx)?;
    let names = elf.file_range(names.offset, names.size, "the section-name table")?;
    for i in 0..shnum {
        let sh = elf.shdr(i)?;
        let sh_name = usize::try_from(sh.name).unwrap_or(usize::MAX);
        let Some(rest) = names.get(sh_name..) else {
            bail!("ELF: section {i}'s name offset {sh_name} is outside the section-name table");
        };
        let this = rest.split(|&b| b == 0).next().unwrap_or_default();
        if this == name.as_bytes() {
            if sh.sh_type == SHT_NOBITS {
                return Ok(Some(&[]));
            }
            return elf
                .file_range(sh.offset, sh.size, "the section")
                .map(Some)
                .with_context(|| format!("ELF section {name}"));
        }
    }
    Ok(None)
}

/// Whether a `PT_NOTE` segment of the object holds a note with owner `name` and type
/// `note_type` (e.g. Xen's `XEN_ELFNOTE_PHYS32_ENTRY`, which qemu needs to boot a vmlinux).
pub fn has_note(bytes: &[u8], name: &str, note_type: u32) -> Result<bool> {
    let elf = Elf::parse(bytes)?;
    for i in 0..elf.phnum {
        let ph = elf.phdr(i)?;
        if ph.p_type != PT_NOTE {
            continue;
        }
        let notes = elf.file_range(ph.offset, ph.filesz, "PT_NOTE")?;
        let align = if ph.align == 8 { 8 } else { 4 };
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let field = |o: usize| -> u32 {
                let b: [u8; 4] = [notes[o], notes[o + 1], notes[o + 2], notes[o + 3]];
                if elf.big_endian {
                    u32::from_be_bytes(b)
                } else {
                    u32::from_le_bytes(b)
                }
            };
            let (namesz, descsz, ntype) = (field(at), field(at + 4), field(at + 8));
            let name_start = at + 12;
            let Some(desc_start) = usize::try_from(namesz)
                .ok()
                .and_then(|n| name_start.checked_add(n))
                .map(|e| e.next_multiple_of(align))
            else {
                break;
            };
            let Some(next) = usize::try_from(descsz)
                .ok()
                .and_then(|d| desc_start.checked_add(d))
                .map(|e| e.next_multiple_of(align))
            else {
                break;
            };
            let Some(owner) = notes.get(name_start..name_start + namesz as usize) else {
                break;
            };
            let owner = owner.split(|&b| b == 0).next().unwrap_or_default();
            if ntype == note_type && owner == name.as_bytes() {
                return Ok(true);
            }
            at = next;
        }
    }
    Ok(false)
}

/// The shared objects the `binaries` (paths relative to `sysroot`) need at run time: their
/// interpreter and the transitive `DT_NEEDED` closure, searched in `lib/<multiarch>`,
/// `usr/lib/<multiarch>`, `lib`, `usr/lib` and `lib64` of the sysroot.
///
/// Returns sorted paths relative to `sysroot` to copy: every symlink met on the way (also
/// directory symlinks) and the file it finally names, so a tree holding exactly these paths
/// resolves the same way. No returned path has a symlink among its parent directories. The
/// binaries themselves are not in the list.
pub fn library_closure(sysroot: &Path, arch: Arch, binaries: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let machine = arch_machine(arch);
    let search: Vec<PathBuf> = [
        format!("lib/{}", arch.multiarch()),
        format!("usr/lib/{}", arch.multiarch()),
        "lib".to_string(),
        "usr/lib".to_string(),
        "lib64".to_string(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect();

    let mut out = BTreeSet::new();
    let mut seen = HashSet::new();
    // (real path of an object to scan, how we got there for error messages)
    let mut queue: VecDeque<(PathBuf, String)> = VecDeque::new();
    for bin in binaries {
        let (_, real) = resolve_in_root(sysroot, bin)?.with_context(|| {
            format!(
                "program {} is not in the sysroot {}; is the package that ships it in the lock?",
                bin.display(),
                sysroot.display()
            )
        })?;
        if seen.insert(real.clone()) {
            queue.push_back((real, bin.display().to_string()));
        }
    }

    while let Some((rel, who)) = queue.pop_front() {
        ensure!(
            seen.len() <= MAX_CLOSURE_OBJECTS,
            "the library closure of {} grew past {MAX_CLOSURE_OBJECTS} objects; the sysroot {} looks broken",
            binaries.iter().map(|b| b.display().to_string()).collect::<Vec<_>>().join(", "),
            sysroot.display()
        );
        let bytes = read_object(&sysroot.join(&rel))?;
        let info =
            inspect(&bytes).with_context(|| format!("reading {} ({who}) as ELF", rel.display()))?;
        ensure!(
            info.machine == machine,
            "{} ({who}) is for {}, not {} ({arch}); the lock holds a package of the wrong architecture",
            rel.display(),
            machine_name(info.machine),
            machine_name(machine),
        );
        if let Some(interp) = &info.interp {
            let (links, real) = resolve_in_root(sysroot, Path::new(interp))?.with_context(|| {
                format!(
                    "the interpreter {interp} of {who} is not in the sysroot {}; is libc6 in the guest package list?",
                    sysroot.display()
                )
            })?;
            out.extend(links);
            out.insert(real.clone());
            if seen.insert(real.clone()) {
                queue.push_back((real, format!("{interp}, interpreter of {who}")));
            }
        }
        for lib in &info.needed {
            let found = find_library(sysroot, &search, lib, machine)?;
            let Some((links, real)) = found else {
                bail!(
                    "library {lib} needed by {who} is not in the sysroot {} (searched {}); add the \
                     Debian package that ships it to the guest packages and relock",
                    sysroot.display(),
                    search
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            };
            out.extend(links);
            out.insert(real.clone());
            if seen.insert(real.clone()) {
                queue.push_back((real, format!("{lib}, needed by {who}")));
            }
        }
    }
    Ok(out.into_iter().collect())
}

/// Find `lib` in the search directories: the first regular file of the right machine.
fn find_library(
    sysroot: &Path,
    search: &[PathBuf],
    lib: &str,
    machine: u16,
) -> Result<Option<(Vec<PathBuf>, PathBuf)>> {
    if lib.contains('/') {
        // A path, not a name: the loader takes it as is.
        return resolve_in_root(sysroot, Path::new(lib));
    }
    for dir in search {
        let Some((links, real)) = resolve_in_root(sysroot, &dir.join(lib))? else {
            continue;
        };
        let path = sysroot.join(&real);
        if !path.is_file() {
            continue;
        }
        // Like the loader, skip objects of another machine (e.g. 32-bit compat libraries).
        let head = read_head(&path)?;
        if let Ok(elf) = Elf::parse(&head) {
            if elf.machine != machine {
                continue;
            }
        }
        return Ok(Some((links, real)));
    }
    Ok(None)
}

fn read_object(path: &Path) -> Result<Vec<u8>> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    ensure!(
        len <= MAX_OBJECT_LEN,
        "{} is {len} bytes, more than the {MAX_OBJECT_LEN} bytes a program or library may have",
        path.display()
    );
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

/// The first 64 bytes of a file (enough for the ELF header).
fn read_head(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let mut buf = Vec::with_capacity(64);
    fs::File::open(path)
        .and_then(|f| f.take(64).read_to_end(&mut buf))
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(buf)
}

/// Resolve `path` inside `root` as a chroot would: absolute symlink targets start again at
/// `root` and `..` stops at it. Returns the symlinks passed (relative to `root`) and the final
/// path (relative, free of symlinks), or `None` when some component does not exist.
pub fn resolve_in_root(root: &Path, path: &Path) -> Result<Option<(Vec<PathBuf>, PathBuf)>> {
    let mut pending: Vec<OsString> = Vec::new();
    push_components(&mut pending, path);
    let mut links = Vec::new();
    let mut cur = PathBuf::new();
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part == ".." {
            cur.pop();
            continue;
        }
        let cand = cur.join(&part);
        let md = match fs::symlink_metadata(root.join(&cand)) {
            Ok(md) => md,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            // A file used as a directory.
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => return Ok(None),
            Err(e) => {
                return Err(e).with_context(|| format!("reading {}", root.join(&cand).display()))
            }
        };
        if md.file_type().is_symlink() {
            hops += 1;
            ensure!(
                hops <= MAX_SYMLINK_HOPS,
                "more than {MAX_SYMLINK_HOPS} symlinks while resolving {} in {}; is there a loop?",
                path.display(),
                root.display()
            );
            let target = fs::read_link(root.join(&cand))
                .with_context(|| format!("reading symlink {}", root.join(&cand).display()))?;
            links.push(cand);
            if target.is_absolute() {
                cur = PathBuf::new();
            }
            push_components(&mut pending, &target);
        } else {
            cur = cand;
        }
    }
    Ok(Some((links, cur)))
}

/// Push the meaningful components of `path` onto a stack so they pop in order.
fn push_components(stack: &mut Vec<OsString>, path: &Path) {
    let parts: Vec<OsString> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(p) => Some(p.to_os_string()),
            Component::ParentDir => Some(OsString::from("..")),
            Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

fn name_string(raw: &[u8], what: &str) -> Result<String> {
    ensure!(
        raw.len() <= MAX_NAME_LEN,
        "ELF: {what} is {} bytes long, more than {MAX_NAME_LEN}",
        raw.len()
    );
    String::from_utf8(raw.to_vec()).with_context(|| format!("ELF: {what} is not UTF-8"))
}

/// A program header, widened to 64 bits.
#[derive(Clone, Copy, Debug)]
struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    align: u64,
}

/// A section header, widened to 64 bits.
#[derive(Clone, Copy, Debug)]
struct Shdr {
    name: u32,
    sh_type: u32,
    offset: u64,
    size: u64,
    link: u32,
}

/// A validated ELF header over the whole file's bytes.
struct Elf<'a> {
    bytes: &'a [u8],
    class64: bool,
    big_endian: bool,
    machine: u16,
    phoff: u64,
    phentsize: u64,
    phnum: u64,
    shoff: u64,
    shentsize: u64,
    shnum_raw: u16,
    shstrndx_raw: u16,
}

impl<'a> Elf<'a> {
    fn parse(bytes: &'a [u8]) -> Result<Self> {
        ensure!(
            is_elf(bytes),
            "not an ELF object: the first bytes are not 7f 45 4c 46 (\\x7fELF)"
        );
        ensure!(
            bytes.len() >= 52,
            "ELF: the file is {} bytes, shorter than an ELF header",
            bytes.len()
        );
        let class64 = match bytes[4] {
            1 => false,
            2 => true,
            c => bail!("ELF: unknown class {c} at offset 4 (1 = 32-bit, 2 = 64-bit)"),
        };
        let big_endian = match bytes[5] {
            1 => false,
            2 => true,
            d => bail!("ELF: unknown data encoding {d} at offset 5 (1 = LE, 2 = BE)"),
        };
        let mut elf = Elf {
            bytes,
            class64,
            big_endian,
            machine: 0,
            phoff: 0,
            phentsize: 0,
            phnum: 0,
            shoff: 0,
            shentsize: 0,
            shnum_raw: 0,
            shstrndx_raw: 0,
        };
        elf.machine = elf.u16(18)?;
        if class64 {
            ensure!(
                bytes.len() >= 64,
                "ELF: the file is shorter than an ELF64 header"
            );
            elf.phoff = elf.u64(32)?;
            elf.shoff = elf.u64(40)?;
            elf.phentsize = elf.u16(54)?.into();
            elf.phnum = elf.u16(56)?.into();
            elf.shentsize = elf.u16(58)?.into();
            elf.shnum_raw = elf.u16(60)?;
            elf.shstrndx_raw = elf.u16(62)?;
        } else {
            elf.phoff = elf.u32(28)?.into();
            elf.shoff = elf.u32(32)?.into();
            elf.phentsize = elf.u16(42)?.into();
            elf.phnum = elf.u16(44)?.into();
            elf.shentsize = elf.u16(46)?.into();
            elf.shnum_raw = elf.u16(48)?;
            elf.shstrndx_raw = elf.u16(50)?;
        }
        let (min_ph, min_sh) = if class64 { (56, 64) } else { (32, 40) };
        if elf.phnum > 0 {
            ensure!(
                elf.phentsize >= min_ph,
                "ELF: program header size {} is smaller than {min_ph}",
                elf.phentsize
            );
            elf.table_range(elf.phoff, elf.phentsize, elf.phnum, "program header table")?;
        }
        if elf.shoff != 0 {
            ensure!(
                elf.shentsize >= min_sh,
                "ELF: section header size {} is smaller than {min_sh}",
                elf.shentsize
            );
        }
        Ok(elf)
    }

    fn get(&self, off: u64, len: usize) -> Result<&'a [u8]> {
        usize::try_from(off)
            .ok()
            .and_then(|o| Some(o..o.checked_add(len)?))
            .and_then(|r| self.bytes.get(r))
            .with_context(|| {
                format!(
                    "ELF: reading {len} bytes at offset {off} runs past the end of the file ({} bytes)",
                    self.bytes.len()
                )
            })
    }

    fn u16(&self, off: u64) -> Result<u16> {
        let b: [u8; 2] = self.get(off, 2)?.try_into()?;
        Ok(if self.big_endian {
            u16::from_be_bytes(b)
        } else {
            u16::from_le_bytes(b)
        })
    }

    fn u32(&self, off: u64) -> Result<u32> {
        let b: [u8; 4] = self.get(off, 4)?.try_into()?;
        Ok(if self.big_endian {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }

    fn u64(&self, off: u64) -> Result<u64> {
        let b: [u8; 8] = self.get(off, 8)?.try_into()?;
        Ok(if self.big_endian {
            u64::from_be_bytes(b)
        } else {
            u64::from_le_bytes(b)
        })
    }

    /// An address-sized field (`Elf32_Addr`/`Elf64_Addr` and friends).
    fn word(&self, off: u64) -> Result<u64> {
        if self.class64 {
            self.u64(off)
        } else {
            self.u32(off).map(u64::from)
        }
    }

    /// `len` bytes at file offset `off`, checked.
    fn file_range(&self, off: u64, len: u64, what: &str) -> Result<&'a [u8]> {
        let end = off.checked_add(len);
        match end {
            Some(end) if end <= self.bytes.len() as u64 => {
                // Both fit in usize: they are at most the slice's length.
                Ok(&self.bytes[off as usize..end as usize])
            }
            _ => bail!(
                "ELF: {what} at offset {off} ({len} bytes) runs past the end of the file ({} bytes)",
                self.bytes.len()
            ),
        }
    }

    fn table_range(&self, off: u64, entsize: u64, count: u64, what: &str) -> Result<()> {
        let len = entsize
            .checked_mul(count)
            .with_context(|| format!("ELF: the {what} size overflows"))?;
        self.file_range(off, len, what).map(|_| ())
    }

    fn phdr(&self, i: u64) -> Result<Phdr> {
        let base = self.phoff + i * self.phentsize; // checked by table_range in parse
        if self.class64 {
            Ok(Phdr {
                p_type: self.u32(base)?,
                offset: self.u64(base + 8)?,
                vaddr: self.u64(base + 16)?,
                filesz: self.u64(base + 32)?,
                align: self.u64(base + 48)?,
            })
        } else {
            Ok(Phdr {
                p_type: self.u32(base)?,
                offset: self.u32(base + 4)?.into(),
                vaddr: self.u32(base + 8)?.into(),
                filesz: self.u32(base + 16)?.into(),
                align: self.u32(base + 28)?.into(),
            })
        }
    }

    /// (section count, section-name table index), following the extended numbering scheme.
    fn section_counts(&self) -> Result<(u64, u64)> {
        if self.shoff == 0 {
            return Ok((0, 0));
        }
        let mut shnum = u64::from(self.shnum_raw);
        let mut shstrndx = u64::from(self.shstrndx_raw);
        if shnum == 0 || self.shstrndx_raw == SHN_XINDEX {
            self.table_range(self.shoff, self.shentsize, 1, "section header table")?;
            let zero = self.shdr_at(self.shoff)?;
            if shnum == 0 {
                shnum = zero.size;
            }
            if self.shstrndx_raw == SHN_XINDEX {
                shstrndx = zero.link.into();
            }
        }
        self.table_range(self.shoff, self.shentsize, shnum, "section header table")?;
        Ok((shnum, shstrndx))
    }

    fn shdr(&self, i: u64) -> Result<Shdr> {
        // In range: section_counts checked the whole table and callers stay below shnum.
        self.shdr_at(self.shoff + i * self.shentsize)
    }

    fn shdr_at(&self, base: u64) -> Result<Shdr> {
        if self.class64 {
            Ok(Shdr {
                name: self.u32(base)?,
                sh_type: self.u32(base + 4)?,
                offset: self.u64(base + 24)?,
                size: self.u64(base + 32)?,
                link: self.u32(base + 40)?,
            })
        } else {
            Ok(Shdr {
                name: self.u32(base)?,
                sh_type: self.u32(base + 4)?,
                offset: self.u32(base + 16)?.into(),
                size: self.u32(base + 20)?.into(),
                link: self.u32(base + 24)?,
            })
        }
    }

    /// Map a virtual address to a file offset through the PT_LOAD segments.
    fn vaddr_to_offset(&self, vaddr: u64) -> Result<Option<u64>> {
        for i in 0..self.phnum {
            let ph = self.phdr(i)?;
            if ph.p_type == PT_LOAD
                && vaddr >= ph.vaddr
                && vaddr - ph.vaddr < ph.filesz
                && ph.offset.checked_add(vaddr - ph.vaddr).is_some()
            {
                return Ok(Some(ph.offset + (vaddr - ph.vaddr)));
            }
        }
        Ok(None)
    }

    /// The `DT_NEEDED` names of the dynamic segment `dynamic`.
    fn needed(&self, dynamic: &Phdr) -> Result<Vec<String>> {
        let table = self.file_range(dynamic.offset, dynamic.filesz, "PT_DYNAMIC")?;
        let entsize: u64 = if self.class64 { 16 } else { 8 };
        let count = table.len() as u64 / entsize;
        let mut needed_offs = Vec::new();
        let mut strtab = None;
        let mut strsz = None;
        for i in 0..count {
            let at = dynamic.offset + i * entsize;
            let tag = self.word(at)?;
            let val = self.word(at + entsize / 2)?;
            match tag {
                DT_NULL => break,
                DT_NEEDED => {
                    ensure!(
                        needed_offs.len() < MAX_NEEDED,
                        "ELF: more than {MAX_NEEDED} DT_NEEDED entries"
                    );
                    needed_offs.push(val);
                }
                DT_STRTAB => strtab = Some(val),
                DT_STRSZ => strsz = Some(val),
                _ => {}
            }
        }
        if needed_offs.is_empty() {
            return Ok(Vec::new());
        }
        let strtab = strtab.context("ELF: the dynamic segment lists DT_NEEDED but no DT_STRTAB")?;
        let strsz = strsz.context("ELF: the dynamic segment lists DT_NEEDED but no DT_STRSZ")?;
        let off = self.vaddr_to_offset(strtab)?.with_context(|| {
            format!("ELF: DT_STRTAB address {strtab:#x} is in no PT_LOAD segment")
        })?;
        let strings = self.file_range(off, strsz, "the dynamic string table")?;
        needed_offs
            .into_iter()
            .map(|o| {
                let rest = usize::try_from(o)
                    .ok()
                    .and_then(|o| strings.get(o..))
                    .with_context(|| {
                        format!("ELF: DT_NEEDED string offset {o} is outside the string table")
                    })?;
                let raw = rest.split(|&b| b == 0).next().unwrap_or_default();
                ensure!(!raw.is_empty(), "ELF: an empty DT_NEEDED name");
                name_string(raw, "a DT_NEEDED name")
            })
            .collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Builds small ELF objects for tests: one PT_LOAD covering the file, optional PT_INTERP and
    /// PT_DYNAMIC (DT_NEEDED names), and named sections.
    pub(crate) struct ElfBuilder {
        pub class64: bool,
        pub big_endian: bool,
        pub machine: u16,
        pub interp: Option<String>,
        pub needed: Vec<String>,
        pub sections: Vec<(String, Vec<u8>)>,
        /// (owner, type, desc) in one PT_NOTE segment.
        pub notes: Vec<(String, u32, Vec<u8>)>,
    }

    impl ElfBuilder {
        pub(crate) fn new(machine: u16) -> Self {
            ElfBuilder {
                class64: true,
                big_endian: false,
                machine,
                interp: None,
                needed: Vec::new(),
                sections: Vec::new(),
                notes: Vec::new(),
            }
        }

        fn put(&self, buf: &mut Vec<u8>, v: u64, size: usize) {
            let bytes = v.to_le_bytes();
            let mut b = bytes[..size].to_vec();
            if self.big_endian {
                b.reverse();
            }
            buf.extend_from_slice(&b);
        }

        fn word(&self, buf: &mut Vec<u8>, v: u64) {
            self.put(buf, v, if self.class64 { 8 } else { 4 });
        }

        pub(crate) fn build(&self) -> Vec<u8> {
            const VADDR: u64 = 0x40_0000;
            let (ehsize, phentsize, shentsize) = if self.class64 {
                (64u64, 56u64, 64u64)
            } else {
                (52, 32, 40)
            };
            let dynamic = !self.needed.is_empty();
            let phnum = 1
                + u64::from(self.interp.is_some())
                + u64::from(dynamic)
                + u64::from(!self.notes.is_empty());

            // Data area after the program headers.
            let data_start = ehsize + phnum * phentsize;
            let mut data = Vec::new();
            let interp_off = data_start;
            if let Some(i) = &self.interp {
                data.extend_from_slice(i.as_bytes());
                data.push(0);
            }
            let dynstr_off = data_start + data.len() as u64;
            let mut dynstr = vec![0u8];
            let mut name_offs = Vec::new();
            for n in &self.needed {
                name_offs.push(dynstr.len() as u64);
                dynstr.extend_from_slice(n.as_bytes());
                dynstr.push(0);
            }
            data.extend_from_slice(&dynstr);
            while data.len() % 8 != 0 {
                data.push(0);
            }
            let dyn_off = data_start + data.len() as u64;
            let mut dyn_tab = Vec::new();
            if dynamic {
                for o in &name_offs {
                    self.word(&mut dyn_tab, DT_NEEDED);
                    self.word(&mut dyn_tab, *o);
                }
                self.word(&mut dyn_tab, DT_STRTAB);
                self.word(&mut dyn_tab, VADDR + dynstr_off);
                self.word(&mut dyn_tab, DT_STRSZ);
                self.word(&mut dyn_tab, dynstr.len() as u64);
                self.word(&mut dyn_tab, DT_NULL);
                self.word(&mut dyn_tab, 0);
            }
            data.extend_from_slice(&dyn_tab);
            let notes_off = data_start + data.len() as u64;
            for (owner, ntype, desc) in &self.notes {
                self.put(&mut data, owner.len() as u64 + 1, 4);
                self.put(&mut data, desc.len() as u64, 4);
                self.put(&mut data, (*ntype).into(), 4);
                data.extend_from_slice(owner.as_bytes());
                data.push(0);
                while data.len() % 4 != 0 {
                    data.push(0);
                }
                data.extend_from_slice(desc);
                while data.len() % 4 != 0 {
                    data.push(0);
                }
            }
            let notes_len = data_start + data.len() as u64 - notes_off;
            // Sections: index 0 null, then the named ones, then .shstrtab.
            let mut shstr = vec![0u8];
            let mut secs = Vec::new();
            for (name, body) in &self.sections {
                let name_off = shstr.len() as u64;
                shstr.extend_from_slice(name.as_bytes());
                shstr.push(0);
                secs.push((name_off, data_start + data.len() as u64, body.len() as u64));
                data.extend_from_slice(body);
            }
            let shstr_name = shstr.len() as u64;
            shstr.extend_from_slice(b".shstrtab\0");
            let shstr_off = data_start + data.len() as u64;
            data.extend_from_slice(&shstr);
            while data.len() % 8 != 0 {
                data.push(0);
            }
            let shoff = data_start + data.len() as u64;
            let shnum = secs.len() as u64 + 2;
            let total = shoff + shnum * shentsize;

            let mut b = Vec::new();
            b.extend_from_slice(ELF_MAGIC);
            b.push(if self.class64 { 2 } else { 1 });
            b.push(if self.big_endian { 2 } else { 1 });
            b.push(1);
            b.resize(16, 0);
            self.put(&mut b, 2, 2); // ET_EXEC
            self.put(&mut b, self.machine.into(), 2);
            self.put(&mut b, 1, 4);
            self.word(&mut b, VADDR); // entry
            self.word(&mut b, ehsize); // phoff
            self.word(&mut b, shoff);
            self.put(&mut b, 0, 4); // flags
            self.put(&mut b, ehsize, 2);
            self.put(&mut b, phentsize, 2);
            self.put(&mut b, phnum, 2);
            self.put(&mut b, shentsize, 2);
            self.put(&mut b, shnum, 2);
            self.put(&mut b, shnum - 1, 2);
            assert_eq!(b.len() as u64, ehsize);
            let mut phdr = |p_type: u64, off: u64, size: u64| {
                let mut ph = Vec::new();
                if self.class64 {
                    self.put(&mut ph, p_type, 4);
                    self.put(&mut ph, 4, 4); // flags
                    self.word(&mut ph, off);
                    self.word(&mut ph, VADDR + off);
                    self.word(&mut ph, VADDR + off);
                    self.word(&mut ph, size);
                    self.word(&mut ph, size);
                    self.word(&mut ph, 4);
                } else {
                    self.put(&mut ph, p_type, 4);
                    self.word(&mut ph, off);
                    self.word(&mut ph, VADDR + off);
                    self.word(&mut ph, VADDR + off);
                    self.word(&mut ph, size);
                    self.word(&mut ph, size);
                    self.put(&mut ph, 4, 4);
                    self.word(&mut ph, 4);
                }
                assert_eq!(ph.len() as u64, phentsize);
                b.extend_from_slice(&ph);
            };
            phdr(u64::from(PT_LOAD), 0, total);
            if let Some(i) = &self.interp {
                phdr(u64::from(PT_INTERP), interp_off, i.len() as u64 + 1);
            }
            if dynamic {
                phdr(u64::from(PT_DYNAMIC), dyn_off, dyn_tab.len() as u64);
            }
            if !self.notes.is_empty() {
                phdr(u64::from(PT_NOTE), notes_off, notes_len);
            }
            b.extend_from_slice(&data);
            let mut shdr = |name: u64, sh_type: u64, off: u64, size: u64| {
                let mut sh = Vec::new();
                self.put(&mut sh, name, 4);
                self.put(&mut sh, sh_type, 4);
                self.word(&mut sh, 0); // flags
                self.word(&mut sh, 0); // addr
                self.word(&mut sh, off);
                self.word(&mut sh, size);
                self.put(&mut sh, 0, 4); // link
                self.put(&mut sh, 0, 4); // info
                self.word(&mut sh, 1); // align
                self.word(&mut sh, 0); // entsize
                assert_eq!(sh.len() as u64, shentsize);
                b.extend_from_slice(&sh);
            };
            shdr(0, 0, 0, 0);
            for (name, off, size) in &secs {
                shdr(*name, 1, *off, *size);
            }
            shdr(shstr_name, 3, shstr_off, shstr.len() as u64);
            assert_eq!(b.len() as u64, total);
            b
        }
    }

    fn sample(class64: bool, big_endian: bool) -> ElfBuilder {
        let mut b = ElfBuilder::new(EM_X86_64);
        b.class64 = class64;
        b.big_endian = big_endian;
        b.interp = Some("/lib64/ld-linux-x86-64.so.2".into());
        b.needed = vec!["libz.so.1".into(), "libc.so.6".into()];
        b.sections = vec![
            (".text".into(), vec![0x90; 7]),
            (".modinfo".into(), b"name=x\0depends=\0".to_vec()),
        ];
        b
    }

    #[test]
    fn inspect_reads_interp_and_needed_in_all_four_layouts() {
        for class64 in [false, true] {
            for be in [false, true] {
                let bytes = sample(class64, be).build();
                let info = inspect(&bytes).unwrap();
                assert_eq!(info.machine, EM_X86_64);
                assert_eq!(info.class64, class64);
                assert_eq!(info.interp.as_deref(), Some("/lib64/ld-linux-x86-64.so.2"));
                assert_eq!(info.needed, ["libz.so.1", "libc.so.6"]);
                assert_eq!(
                    section(&bytes, ".modinfo").unwrap(),
                    Some(&b"name=x\0depends=\0"[..])
                );
                assert_eq!(section(&bytes, ".text").unwrap(), Some(&[0x90u8; 7][..]));
                assert_eq!(section(&bytes, ".nope").unwrap(), None);
            }
        }
    }

    #[test]
    fn static_objects_have_no_interp_or_needed() {
        let bytes = ElfBuilder::new(EM_AARCH64).build();
        let info = inspect(&bytes).unwrap();
        assert_eq!(machine_name(info.machine), "AArch64");
        assert_eq!(info.interp, None);
        assert!(info.needed.is_empty());
    }

    #[test]
    fn broken_objects_give_errors() {
        assert!(inspect(b"not an elf at all, no").is_err());
        assert!(inspect(b"\x7fELF").is_err());
        let mut bytes = sample(true, false).build();
        // Program header table pointing past the end.
        bytes[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        let err = inspect(&bytes).unwrap_err().to_string();
        assert!(err.contains("program header table"), "{err}");
        let mut bytes = sample(true, false).build();
        // Section header table pointing past the end.
        bytes[40..48].copy_from_slice(&(1u64 << 40).to_le_bytes());
        assert!(section(&bytes, ".modinfo").is_err());
        assert!(inspect(&bytes).is_ok(), "inspect needs no sections");
    }

    #[test]
    fn notes_are_found_by_owner_and_type() {
        for class64 in [false, true] {
            let mut b = sample(class64, !class64);
            b.notes = vec![
                ("GNU".into(), 3, vec![1, 2, 3, 4, 5]),
                ("Xen".into(), 18, vec![0; 4]),
            ];
            let bytes = b.build();
            assert!(has_note(&bytes, "Xen", 18).unwrap());
            assert!(has_note(&bytes, "GNU", 3).unwrap());
            assert!(!has_note(&bytes, "Xen", 3).unwrap());
            assert_eq!(inspect(&bytes).unwrap().needed.len(), 2);
        }
        assert!(!has_note(&sample(true, false).build(), "Xen", 18).unwrap());
    }

    #[test]
    fn machine_names() {
        assert_eq!(machine_name(62), "x86-64");
        assert_eq!(machine_name(183), "AArch64");
        assert_eq!(machine_name(9999), "unknown machine");
    }

    proptest! {
        #[test]
        fn inspect_and_section_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = inspect(&bytes);
            let _ = section(&bytes, ".modinfo");
        }

        #[test]
        fn corrupted_objects_never_panic(
            class64 in any::<bool>(),
            be in any::<bool>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..16),
        ) {
            let mut b = sample(class64, be);
            b.notes = vec![("Xen".into(), 18, vec![0; 4])];
            let mut bytes = b.build();
            for (i, v) in edits {
                let at = i.index(bytes.len());
                bytes[at] = v;
            }
            let _ = inspect(&bytes);
            let _ = section(&bytes, ".modinfo");
            let _ = has_note(&bytes, "Xen", 18);
        }
    }

    fn write(root: &Path, rel: &str, bytes: &[u8]) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, bytes).unwrap();
    }

    fn symlink(root: &Path, rel: &str, target: &str) {
        let p = root.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(target, p).unwrap();
    }

    fn lib(needed: &[&str]) -> Vec<u8> {
        let mut b = ElfBuilder::new(EM_X86_64);
        b.needed = needed.iter().map(|s| s.to_string()).collect();
        b.build()
    }

    #[test]
    fn closure_follows_needed_interp_and_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let mut prog = ElfBuilder::new(EM_X86_64);
        prog.interp = Some("/lib64/ld-linux-x86-64.so.2".into());
        prog.needed = vec!["libz.so.1".into(), "libc.so.6".into()];
        write(root, "usr/sbin/prog", &prog.build());
        write(root, "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2", &lib(&[]));
        symlink(
            root,
            "lib64/ld-linux-x86-64.so.2",
            "/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
        );
        write(root, "lib/x86_64-linux-gnu/libc.so.6", &lib(&[]));
        write(
            root,
            "usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
            &lib(&["libc.so.6"]),
        );
        symlink(root, "usr/lib/x86_64-linux-gnu/libz.so.1", "libz.so.1.2.13");
        // A 32-bit-machine decoy earlier in the search path is skipped.
        write(root, "lib/libc.so.6", &ElfBuilder::new(3).build());

        let got = library_closure(root, Arch::X86_64, &[PathBuf::from("usr/sbin/prog")]).unwrap();
        let got: Vec<String> = got.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(
            got,
            [
                "lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
                "lib/x86_64-linux-gnu/libc.so.6",
                "lib64/ld-linux-x86-64.so.2",
                "usr/lib/x86_64-linux-gnu/libz.so.1",
                "usr/lib/x86_64-linux-gnu/libz.so.1.2.13",
            ]
        );
    }

    #[test]
    fn closure_names_the_missing_library_and_who_needs_it() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "bin/prog", &lib(&["libfoo.so.1"]));
        write(root, "lib/libfoo.so.1", &lib(&["libbar.so.2"]));
        let err = library_closure(root, Arch::X86_64, &[PathBuf::from("bin/prog")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("libbar.so.2"), "{err}");
        assert!(err.contains("libfoo.so.1, needed by bin/prog"), "{err}");
    }

    #[test]
    fn closure_refuses_the_wrong_machine_and_symlink_loops() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "bin/arm", &ElfBuilder::new(EM_AARCH64).build());
        let err = library_closure(root, Arch::X86_64, &[PathBuf::from("bin/arm")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("AArch64"), "{err}");

        write(root, "bin/prog", &lib(&["libloop.so"]));
        symlink(root, "lib/libloop.so", "libloop2.so");
        symlink(root, "lib/libloop2.so", "libloop.so");
        let err = library_closure(root, Arch::X86_64, &[PathBuf::from("bin/prog")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("symlinks"), "{err}");
    }

    #[test]
    fn resolve_stays_inside_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write(root, "etc/passwd", b"inside");
        symlink(root, "a/up", "../../../../etc/passwd");
        let (links, real) = resolve_in_root(root, Path::new("a/up")).unwrap().unwrap();
        assert_eq!(links, [PathBuf::from("a/up")]);
        assert_eq!(real, PathBuf::from("etc/passwd"));
        assert!(resolve_in_root(root, Path::new("etc/passwd/x"))
            .unwrap()
            .is_none());
        assert!(resolve_in_root(root, Path::new("nope")).unwrap().is_none());
    }
}
