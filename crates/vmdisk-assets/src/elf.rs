//! What the guest build needs from ELF objects: a program's interpreter and `DT_NEEDED`
//! libraries, one named section (a kernel module's `.modinfo`), a `PT_NOTE` (the vmlinux's PVH
//! entry), and the closure of shared libraries a set of programs needs from an unpacked
//! Debian tree.
//!
//! ```text
//!  0        e_ident: 7f 'E' 'L' 'F', class (1 = 32-bit, 2 = 64-bit), data (1 = LE, 2 = BE)
//!  16       e_type, e_machine, ..., e_phoff, e_shoff, ..., e_phnum, e_shnum, e_shstrndx
//!  e_phoff  program headers: PT_LOAD (vaddr -> file offset), PT_INTERP, PT_DYNAMIC, PT_NOTE
//!  e_shoff  section headers; section e_shstrndx holds their names
//! ```
//!
//! The headers are read by the `object` crate (its ELF reader only: no other formats, no
//! decompression), which bounds-checks every offset and size against the bytes given. What
//! this module adds is the loader's view: `DT_NEEDED` names through the dynamic segment's
//! `DT_STRTAB` address, mapped through the `PT_LOAD` segments as ld.so does (sections may be
//! stripped), and the named limits below. Errors say which structure is broken; callers add
//! the file name.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::ffi::OsString;
use std::fs;
use std::path::{Component, Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use object::elf::{FileHeader32, FileHeader64};
use object::read::elf::{Dyn, FileHeader, ProgramHeader, SectionHeader};
use object::{elf as abi, Endianness};

use crate::arch::Arch;

/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = abi::EM_X86_64.0;
/// `e_machine` of 64-bit ARM.
pub const EM_AARCH64: u16 = abi::EM_AARCH64.0;

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
/// Most notes looked at in one object; a vmlinux has about a dozen.
const MAX_NOTES: usize = 4096;

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

/// `e_machine` from the first bytes of an object, when they hold a whole ELF header.
fn header_machine(head: &[u8]) -> Option<u16> {
    match class(head).ok()? {
        Class::Elf32 => header::<FileHeader32<Endianness>>(head)
            .ok()
            .map(|(h, e)| h.e_machine(e).0),
        Class::Elf64 => header::<FileHeader64<Endianness>>(head)
            .ok()
            .map(|(h, e)| h.e_machine(e).0),
    }
}

enum Class {
    Elf32,
    Elf64,
}

fn class(bytes: &[u8]) -> Result<Class> {
    ensure!(
        is_elf(bytes),
        "not an ELF object: the first bytes are not 7f 45 4c 46 (\\x7fELF)"
    );
    match bytes.get(4) {
        Some(1) => Ok(Class::Elf32),
        Some(2) => Ok(Class::Elf64),
        Some(c) => bail!("ELF: unknown class {c} at offset 4 (1 = 32-bit, 2 = 64-bit)"),
        None => bail!("ELF: the file is shorter than an ELF header"),
    }
}

/// The validated file header and its byte order.
fn header<Elf: FileHeader<Endian = Endianness>>(bytes: &[u8]) -> Result<(&Elf, Endianness)> {
    let h = Elf::parse(bytes).map_err(|e| anyhow!("ELF header: {e}"))?;
    let endian = h.endian().map_err(|e| anyhow!("ELF header: {e}"))?;
    Ok((h, endian))
}

/// Run `f` on the object's header, whichever its class.
macro_rules! with_header {
    ($bytes:expr, |$h:ident, $e:ident| $body:expr) => {
        match class($bytes)? {
            Class::Elf32 => {
                let ($h, $e) = header::<FileHeader32<Endianness>>($bytes)?;
                $body
            }
            Class::Elf64 => {
                let ($h, $e) = header::<FileHeader64<Endianness>>($bytes)?;
                $body
            }
        }
    };
}

/// Parse the headers of an ELF object: machine, class, interpreter and needed libraries.
pub fn inspect(bytes: &[u8]) -> Result<ElfInfo> {
    with_header!(bytes, |h, e| inspect_as(h, e, bytes))
}

fn inspect_as<Elf: FileHeader<Endian = Endianness>>(
    h: &Elf,
    e: Endianness,
    bytes: &[u8],
) -> Result<ElfInfo> {
    let phdrs = h
        .program_headers(e, bytes)
        .map_err(|err| anyhow!("ELF: the program header table: {err}"))?;
    let mut interp = None;
    let mut needed = Vec::new();
    for ph in phdrs {
        if let Some(raw) = ph
            .interpreter(e, bytes)
            .map_err(|err| anyhow!("ELF: PT_INTERP: {err}"))?
        {
            interp = Some(name_string(raw, "the PT_INTERP path")?);
        }
        if let Some(dynamic) = ph
            .dynamic(e, bytes)
            .map_err(|err| anyhow!("ELF: PT_DYNAMIC: {err}"))?
        {
            needed = needed_names::<Elf>(phdrs, dynamic, e, bytes)?;
        }
    }
    Ok(ElfInfo {
        machine: h.e_machine(e).0,
        class64: h.is_class_64(),
        interp,
        needed,
    })
}

/// The `DT_NEEDED` names of a dynamic segment, their string table found through `DT_STRTAB`
/// (a virtual address) and `DT_STRSZ`, as the loader finds it.
fn needed_names<Elf: FileHeader<Endian = Endianness>>(
    phdrs: &[Elf::ProgramHeader],
    dynamic: &[Elf::Dyn],
    e: Endianness,
    bytes: &[u8],
) -> Result<Vec<String>> {
    let mut offs = Vec::new();
    let (mut strtab, mut strsz) = (None, None);
    for d in dynamic {
        match d.tag(e) {
            abi::DT_NULL => break,
            abi::DT_NEEDED => {
                ensure!(
                    offs.len() < MAX_NEEDED,
                    "ELF: more than {MAX_NEEDED} DT_NEEDED entries"
                );
                offs.push(d.val(e));
            }
            abi::DT_STRTAB => strtab = Some(d.val(e)),
            abi::DT_STRSZ => strsz = Some(d.val(e)),
            _ => {}
        }
    }
    if offs.is_empty() {
        return Ok(Vec::new());
    }
    let strtab = strtab.context("ELF: the dynamic segment lists DT_NEEDED but no DT_STRTAB")?;
    let strsz = strsz.context("ELF: the dynamic segment lists DT_NEEDED but no DT_STRSZ")?;
    let mut strings = None;
    for ph in phdrs.iter().filter(|ph| ph.p_type(e) == abi::PT_LOAD) {
        if let Some(s) = ph
            .data_range(e, bytes, strtab, strsz)
            .map_err(|()| anyhow!("ELF: a PT_LOAD segment runs past the end of the file"))?
        {
            strings = Some(s);
            break;
        }
    }
    let strings = strings.with_context(|| {
        format!(
            "ELF: the dynamic string table ({strsz} bytes at {strtab:#x}) is in no PT_LOAD segment"
        )
    })?;
    offs.into_iter()
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

/// The contents of the section called `name` (`Some(&[])` for an `SHT_NOBITS` section), or
/// `None` when the object has no such section.
pub fn section<'a>(bytes: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    with_header!(bytes, |h, e| section_as(h, e, bytes, name))
}

fn section_as<'a, Elf: FileHeader<Endian = Endianness>>(
    h: &Elf,
    e: Endianness,
    bytes: &'a [u8],
    name: &str,
) -> Result<Option<&'a [u8]>> {
    let sections = h
        .sections(e, bytes)
        .map_err(|err| anyhow!("ELF: the section header table: {err}"))?;
    match sections.section_by_name(e, name.as_bytes()) {
        None => Ok(None),
        Some((_, sh)) => sh
            .data(e, bytes)
            .map(Some)
            .map_err(|err| anyhow!("ELF section {name}: {err}")),
    }
}

/// Whether a `PT_NOTE` segment of the object holds a note with owner `name` and type
/// `note_type` (e.g. Xen's `XEN_ELFNOTE_PHYS32_ENTRY`, which qemu needs to boot a vmlinux).
pub fn has_note(bytes: &[u8], name: &str, note_type: u32) -> Result<bool> {
    with_header!(bytes, |h, e| has_note_as(h, e, bytes, name, note_type))
}

fn has_note_as<Elf: FileHeader<Endian = Endianness>>(
    h: &Elf,
    e: Endianness,
    bytes: &[u8],
    name: &str,
    note_type: u32,
) -> Result<bool> {
    let phdrs = h
        .program_headers(e, bytes)
        .map_err(|err| anyhow!("ELF: the program header table: {err}"))?;
    for ph in phdrs {
        let Some(mut notes) = ph
            .notes(e, bytes)
            .map_err(|err| anyhow!("ELF: PT_NOTE: {err}"))?
        else {
            continue;
        };
        // A malformed note ends this segment's list, as the kernel's own parser stops there.
        for _ in 0..MAX_NOTES {
            match notes.next() {
                Ok(Some(n)) if n.n_type(e).0 == note_type && n.name() == name.as_bytes() => {
                    return Ok(true)
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
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
        if header_machine(&head).is_some_and(|m| m != machine) {
            continue;
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

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    // The raw numbers the builder writes (object's constants are typed).
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    const PT_INTERP: u32 = 3;
    const PT_NOTE: u32 = 4;
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    const DT_STRSZ: u64 = 10;

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
