//! What runs on the builder: a tiny static program for each declared system (does the builder
//! really execute that architecture, natively or through binfmt_misc?), the binfmt_misc
//! entries, /dev/kvm and the builder's own `system-features` — all gathered by one POSIX shell
//! script over one SSH session, and parsed back here. Pure: building the script and parsing its
//! output need no builder.
//!
//! Each probe is a complete static ELF executable made here, byte by byte, from three
//! instructions: set the first argument register to [`PROBE_EXIT`], set the exit syscall
//! number, trap. Exit status 42 means the program ran; anything else (an "Exec format error",
//! a shell that tried to read the ELF as a script) means it did not.
//!
//! ```text
//! ELF header (52 / 64 bytes) | one PT_LOAD program header (32 / 56 bytes) | code
//! PT_LOAD maps the whole file read+execute at LOAD_ADDR; e_entry = LOAD_ADDR + code offset
//! ```

use serde::Serialize;

/// The exit status every probe returns.
pub const PROBE_EXIT: i32 = 42;
/// Where the probes are mapped (page-aligned for 4 KiB and 64 KiB pages, above mmap_min_addr).
const LOAD_ADDR: u64 = 0x40_0000;
/// Lines of script output we read (a handful per probe and binfmt entry).
pub const MAX_OUTPUT_LINES: usize = 4096;
/// binfmt_misc magic/mask bytes we read per entry (the kernel allows 128).
const MAX_BINFMT_MAGIC: usize = 128;

/// How to make (and recognise) a program for one Nix system.
#[derive(Clone, Copy, Debug)]
pub struct ProbeArch {
    pub system: &'static str,
    class64: bool,
    big_endian: bool,
    /// e_machine.
    pub machine: u16,
    flags: u32,
    /// exit(42), in the target's byte order.
    code: &'static [u8],
    /// `uname -m` values of machines that run it natively.
    pub native_unames: &'static [&'static str],
}

/// Every Linux system a probe exists for.
pub const PROBE_ARCHES: &[ProbeArch] = &[
    ProbeArch {
        system: "x86_64-linux",
        class64: true,
        big_endian: false,
        machine: 62, // EM_X86_64
        flags: 0,
        // mov edi, 42; mov eax, 60 (exit); syscall
        code: &[0xbf, 0x2a, 0, 0, 0, 0xb8, 0x3c, 0, 0, 0, 0x0f, 0x05],
        native_unames: &["x86_64", "amd64"],
    },
    ProbeArch {
        system: "i686-linux",
        class64: false,
        big_endian: false,
        machine: 3, // EM_386
        flags: 0,
        // mov ebx, 42; mov eax, 1 (exit); int 0x80
        code: &[0xbb, 0x2a, 0, 0, 0, 0xb8, 0x01, 0, 0, 0, 0xcd, 0x80],
        native_unames: &["i686", "i586", "i386", "x86_64"],
    },
    ProbeArch {
        system: "aarch64-linux",
        class64: true,
        big_endian: false,
        machine: 183, // EM_AARCH64
        flags: 0,
        // movz x0, #42; movz x8, #93 (exit); svc #0
        code: &[
            0x40, 0x05, 0x80, 0xd2, 0xa8, 0x0b, 0x80, 0xd2, 0x01, 0x00, 0x00, 0xd4,
        ],
        native_unames: &["aarch64", "arm64"],
    },
    ProbeArch {
        system: "armv7l-linux",
        class64: false,
        big_endian: false,
        machine: 40,        // EM_ARM
        flags: 0x0500_0000, // EF_ARM_EABI_VER5
        // mov r0, #42; mov r7, #1 (exit); svc #0 (ARM state, runs on ARMv5 and later)
        code: &[
            0x2a, 0x00, 0xa0, 0xe3, 0x01, 0x70, 0xa0, 0xe3, 0x00, 0x00, 0x00, 0xef,
        ],
        native_unames: &["armv7l", "armv8l"],
    },
    ProbeArch {
        system: "armv6l-linux",
        class64: false,
        big_endian: false,
        machine: 40,
        flags: 0x0500_0000,
        code: &[
            0x2a, 0x00, 0xa0, 0xe3, 0x01, 0x70, 0xa0, 0xe3, 0x00, 0x00, 0x00, 0xef,
        ],
        native_unames: &["armv6l", "armv7l", "armv8l"],
    },
    ProbeArch {
        system: "armv5tel-linux",
        class64: false,
        big_endian: false,
        machine: 40,
        flags: 0x0500_0000,
        code: &[
            0x2a, 0x00, 0xa0, 0xe3, 0x01, 0x70, 0xa0, 0xe3, 0x00, 0x00, 0x00, 0xef,
        ],
        native_unames: &["armv5tel", "armv6l", "armv7l", "armv8l"],
    },
    ProbeArch {
        system: "riscv64-linux",
        class64: true,
        big_endian: false,
        machine: 243, // EM_RISCV
        flags: 0,
        // addi a0, zero, 42; addi a7, zero, 93 (exit); ecall
        code: &[
            0x13, 0x05, 0xa0, 0x02, 0x93, 0x08, 0xd0, 0x05, 0x73, 0x00, 0x00, 0x00,
        ],
        native_unames: &["riscv64"],
    },
    ProbeArch {
        system: "powerpc64le-linux",
        class64: true,
        big_endian: false,
        machine: 21, // EM_PPC64
        flags: 2,    // ELFv2 ABI
        // li r0, 1 (exit); li r3, 42; sc
        code: &[
            0x01, 0x00, 0x00, 0x38, 0x2a, 0x00, 0x60, 0x38, 0x02, 0x00, 0x00, 0x44,
        ],
        native_unames: &["ppc64le"],
    },
    ProbeArch {
        system: "s390x-linux",
        class64: true,
        big_endian: true,
        machine: 22, // EM_S390
        flags: 0,
        // lghi %r2, 42; svc 1 (exit)
        code: &[0xa7, 0x29, 0x00, 0x2a, 0x0a, 0x01],
        native_unames: &["s390x"],
    },
    ProbeArch {
        system: "loongarch64-linux",
        class64: true,
        big_endian: false,
        machine: 258, // EM_LOONGARCH
        flags: 0x43,  // LP64D ABI, object ABI v1
        // ori $a0, $zero, 42; ori $a7, $zero, 93 (exit); syscall 0
        code: &[
            0x04, 0xa8, 0x80, 0x03, 0x0b, 0x74, 0x81, 0x03, 0x00, 0x00, 0x2b, 0x00,
        ],
        native_unames: &["loongarch64"],
    },
];

/// The probe for `system`, if there is one.
pub fn probe_arch(system: &str) -> Option<&'static ProbeArch> {
    PROBE_ARCHES.iter().find(|a| a.system == system)
}

impl ProbeArch {
    /// The complete executable.
    pub fn elf(&self) -> Vec<u8> {
        let mut b = Vec::with_capacity(160);
        let be = self.big_endian;
        let u16b = |v: u16| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let u32b = |v: u32| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let u64b = |v: u64| if be { v.to_be_bytes() } else { v.to_le_bytes() };
        let (ehsize, phsize): (u16, u16) = if self.class64 { (64, 56) } else { (52, 32) };
        let code_off = u64::from(ehsize) + u64::from(phsize);
        let total = code_off + self.code.len() as u64;
        let entry = LOAD_ADDR + code_off;
        // e_ident
        b.extend_from_slice(&[0x7f, b'E', b'L', b'F']);
        b.push(if self.class64 { 2 } else { 1 });
        b.push(if be { 2 } else { 1 });
        b.push(1); // EV_CURRENT
        b.extend_from_slice(&[0; 9]); // OSABI SYSV, ABI version, padding
        b.extend_from_slice(&u16b(2)); // ET_EXEC
        b.extend_from_slice(&u16b(self.machine));
        b.extend_from_slice(&u32b(1)); // e_version
        if self.class64 {
            b.extend_from_slice(&u64b(entry));
            b.extend_from_slice(&u64b(u64::from(ehsize))); // e_phoff
            b.extend_from_slice(&u64b(0)); // e_shoff
        } else {
            b.extend_from_slice(&u32b(entry as u32));
            b.extend_from_slice(&u32b(u32::from(ehsize)));
            b.extend_from_slice(&u32b(0));
        }
        b.extend_from_slice(&u32b(self.flags));
        b.extend_from_slice(&u16b(ehsize));
        b.extend_from_slice(&u16b(phsize));
        b.extend_from_slice(&u16b(1)); // e_phnum
        b.extend_from_slice(&u16b(0)); // e_shentsize
        b.extend_from_slice(&u16b(0)); // e_shnum
        b.extend_from_slice(&u16b(0)); // e_shstrndx
        debug_assert_eq!(b.len(), usize::from(ehsize));
        const PT_LOAD: u32 = 1;
        const PF_R_X: u32 = 4 | 1;
        if self.class64 {
            b.extend_from_slice(&u32b(PT_LOAD));
            b.extend_from_slice(&u32b(PF_R_X));
            b.extend_from_slice(&u64b(0)); // p_offset
            b.extend_from_slice(&u64b(LOAD_ADDR)); // p_vaddr
            b.extend_from_slice(&u64b(LOAD_ADDR)); // p_paddr
            b.extend_from_slice(&u64b(total)); // p_filesz
            b.extend_from_slice(&u64b(total)); // p_memsz
            b.extend_from_slice(&u64b(0x1_0000)); // p_align
        } else {
            b.extend_from_slice(&u32b(PT_LOAD));
            b.extend_from_slice(&u32b(0));
            b.extend_from_slice(&u32b(LOAD_ADDR as u32));
            b.extend_from_slice(&u32b(LOAD_ADDR as u32));
            b.extend_from_slice(&u32b(total as u32));
            b.extend_from_slice(&u32b(total as u32));
            b.extend_from_slice(&u32b(PF_R_X));
            b.extend_from_slice(&u32b(0x1_0000));
        }
        b.extend_from_slice(self.code);
        b
    }
}

/// `printf` format that writes `bytes` exactly (every byte as a 3-digit octal escape, which
/// dash, bash and busybox all understand; no `%` or quote can appear).
fn printf_octal(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("\\{b:03o}")).collect()
}

/// The script for `sh -s` on the builder. Its output lines start with `@`.
///
/// It runs inside its own temporary directory: a shell whose execve fails with ENOEXEC may run
/// the probe as a shell script instead (POSIX asks for that; busybox sh does it even for an
/// ELF, where dash and bash refuse), and the x86_64 header's e_machine byte is `>`, so that
/// "script" creates a file in the current directory — which must not be the login's home.
pub fn script(systems: &[&ProbeArch]) -> String {
    let mut s = String::from(
        "d=$(mktemp -d 2>/dev/null) || { d=/tmp/vmdisk-doctor.$$; mkdir -m 700 \"$d\" || exit 97; }\n\
         cd \"$d\" || exit 97\n\
         echo \"@uname $(uname -s) $(uname -m)\"\n",
    );
    for (i, a) in systems.iter().enumerate() {
        s.push_str(&format!(
            "printf '{}' > \"$d/p{i}\" && chmod 700 \"$d/p{i}\" && \"$d/p{i}\" >/dev/null 2>\"$d/e{i}\"; \
             echo \"@probe {i} $?\"; echo \"@err {i} $(head -c 300 \"$d/e{i}\" 2>/dev/null | tr '\\n' ' ')\"\n",
            printf_octal(&a.elf())
        ));
    }
    s.push_str(
        "b=/proc/sys/fs/binfmt_misc\n\
         if [ -e \"$b/status\" ]; then echo \"@binfmt-status $(cat \"$b/status\" 2>/dev/null)\"; \
         for f in \"$b\"/*; do case \"$f\" in */status|*/register) continue;; esac; [ -f \"$f\" ] || continue; \
         echo \"@binfmt-entry ${f##*/}\"; head -n 16 \"$f\" 2>/dev/null | sed 's/^/@binfmt-line /'; done; \
         else echo \"@binfmt-status unmounted\"; fi\n\
         if [ -e /dev/kvm ]; then if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then echo \"@kvm rw\"; else echo \"@kvm no-access\"; fi; else echo \"@kvm absent\"; fi\n\
         f=$(nix --extra-experimental-features nix-command config show system-features 2>/dev/null) \
         || f=$(nix --extra-experimental-features nix-command show-config 2>/dev/null | sed -n 's/^system-features = //p') \
         || f=\n\
         [ -n \"$f\" ] && echo \"@features $f\"\n\
         if [ \"$(uname -s)\" = Darwin ] && [ \"$(uname -m)\" = arm64 ]; then \
         if arch -x86_64 /usr/bin/true 2>/dev/null; then echo \"@rosetta yes\"; else echo \"@rosetta no\"; fi; fi\n\
         cd / && rm -rf \"$d\"\n\
         echo \"@done\"\n",
    );
    s
}

/// One binfmt_misc handler on the builder.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BinfmtEntry {
    pub name: String,
    pub enabled: bool,
    pub interpreter: String,
    pub flags: String,
    #[serde(skip)]
    pub offset: usize,
    #[serde(skip)]
    pub magic: Vec<u8>,
    #[serde(skip)]
    pub mask: Vec<u8>,
}

impl BinfmtEntry {
    /// Whether the kernel would hand `file` to this handler (magic under mask at offset).
    pub fn matches(&self, file: &[u8]) -> bool {
        if self.magic.is_empty() {
            return false;
        }
        self.magic.iter().enumerate().all(|(i, &m)| {
            let mask = self.mask.get(i).copied().unwrap_or(0xff);
            file.get(self.offset + i)
                .is_some_and(|&b| b & mask == m & mask)
        })
    }
}

fn hex_bytes(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    (0..s.len() / 2)
        .take(MAX_BINFMT_MAGIC)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

/// /dev/kvm on the builder, for the user nix logs in as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kvm {
    #[default]
    Unknown,
    Usable,
    NoAccess,
    Absent,
}

/// What the script printed, parsed.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct ProbeOutput {
    pub kernel: String,
    pub machine: String,
    /// Exit status of probe i (None: not reported).
    pub probes: Vec<Option<i32>>,
    /// Its stderr, one line.
    pub probe_errors: Vec<String>,
    /// `enabled`/`disabled`, or `unmounted`.
    pub binfmt_status: Option<String>,
    pub binfmt: Vec<BinfmtEntry>,
    pub kvm: Kvm,
    /// The builder's nix `system-features`, when its `nix` could say.
    pub features: Option<Vec<String>>,
    pub rosetta: Option<bool>,
    /// The script ran to its end.
    pub complete: bool,
}

/// Parse the script's stdout for `n` probes.
pub fn parse_output(out: &str, n: usize) -> ProbeOutput {
    let mut p = ProbeOutput {
        probes: vec![None; n],
        probe_errors: vec![String::new(); n],
        ..Default::default()
    };
    for line in out.lines().take(MAX_OUTPUT_LINES) {
        let Some(rest) = line.strip_prefix('@') else {
            continue;
        };
        let (tag, value) = rest.split_once(' ').unwrap_or((rest, ""));
        let value = value.trim_end();
        match tag {
            "uname" => {
                let (k, m) = value.split_once(' ').unwrap_or((value, ""));
                p.kernel = k.into();
                p.machine = m.trim().into();
            }
            "probe" | "err" => {
                let (i, v) = value.split_once(' ').unwrap_or((value, ""));
                if let Some(i) = i.parse::<usize>().ok().filter(|&i| i < n) {
                    if tag == "probe" {
                        p.probes[i] = v.trim().parse().ok();
                    } else {
                        p.probe_errors[i] = v.trim().to_string();
                    }
                }
            }
            "binfmt-status" => p.binfmt_status = Some(value.trim().into()),
            "binfmt-entry" => p.binfmt.push(BinfmtEntry {
                name: value.trim().into(),
                ..Default::default()
            }),
            "binfmt-line" => {
                if let Some(e) = p.binfmt.last_mut() {
                    let v = value.trim();
                    if v == "enabled" {
                        e.enabled = true;
                    } else if let Some(i) = v.strip_prefix("interpreter ") {
                        e.interpreter = i.trim().into();
                    } else if let Some(f) = v.strip_prefix("flags:") {
                        e.flags = f.trim().into();
                    } else if let Some(o) = v.strip_prefix("offset ") {
                        e.offset = o.trim().parse().unwrap_or(0);
                    } else if let Some(m) = v.strip_prefix("magic ") {
                        e.magic = hex_bytes(m);
                    } else if let Some(m) = v.strip_prefix("mask ") {
                        e.mask = hex_bytes(m);
                    }
                }
            }
            "kvm" => {
                p.kvm = match value.trim() {
                    "rw" => Kvm::Usable,
                    "no-access" => Kvm::NoAccess,
                    "absent" => Kvm::Absent,
                    _ => Kvm::Unknown,
                }
            }
            "features" => p.features = Some(value.split_whitespace().map(str::to_string).collect()),
            "rosetta" => p.rosetta = Some(value.trim() == "yes"),
            "done" => p.complete = true,
            _ => {}
        }
    }
    p
}

/// The system-features nix assumes when nix.conf does not set them: nixos-test, benchmark,
/// big-parallel, uid-range on Linux, and kvm when /dev/kvm is usable.
pub fn default_features(p: &ProbeOutput) -> Vec<String> {
    let mut v: Vec<String> = ["nixos-test", "benchmark", "big-parallel"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    if p.kernel == "Linux" {
        v.push("uid-range".into());
    }
    if p.kvm == Kvm::Usable {
        v.push("kvm".into());
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_probe_is_a_well_formed_static_executable() {
        for a in PROBE_ARCHES {
            let e = a.elf();
            assert_eq!(&e[..4], b"\x7fELF", "{}", a.system);
            assert_eq!(e[4], if a.class64 { 2 } else { 1 });
            let machine = if a.big_endian {
                u16::from_be_bytes([e[18], e[19]])
            } else {
                u16::from_le_bytes([e[18], e[19]])
            };
            assert_eq!(machine, a.machine, "{}", a.system);
            let hdr = if a.class64 { 64 + 56 } else { 52 + 32 };
            assert_eq!(e.len(), hdr + a.code.len());
            assert_eq!(a.code.len() % 2, 0);
        }
        assert!(probe_arch("x86_64-linux").is_some());
        assert!(probe_arch("x86_64-darwin").is_none());
    }

    #[test]
    fn the_script_writes_each_probe_byte_exactly() {
        let a = probe_arch("aarch64-linux").unwrap();
        let s = script(&[a]);
        let want = printf_octal(&a.elf());
        assert!(s.contains(&want));
        assert!(want.starts_with("\\177\\105\\114\\106"));
        assert!(!want.contains('%') && !want.contains('\''));
        // Every probe runs from the script's own directory, removed at the end.
        let cd = s
            .find("cd \"$d\" || exit 97")
            .expect("the script enters its directory");
        assert!(cd < s.find(&want).unwrap());
        assert!(s.contains("cd / && rm -rf \"$d\""));
    }

    /// binfmt entries as Debian's qemu-user-static registers them (`cat
    /// /proc/sys/fs/binfmt_misc/qemu-x86_64`).
    const OUT: &str = "@uname Linux aarch64\n@probe 0 42\n@err 0 \n@probe 1 126\n\
        @err 1 sh: /tmp/tmp.x/p1: Exec format error\n@binfmt-status enabled\n\
        @binfmt-entry qemu-x86_64\n@binfmt-line enabled\n\
        @binfmt-line interpreter /usr/libexec/qemu-binfmt/x86_64-binfmt-P\n\
        @binfmt-line flags: POCF\n@binfmt-line offset 0\n\
        @binfmt-line magic 7f454c4602010100000000000000000002003e00\n\
        @binfmt-line mask fffffffffffefefcfffffffffffffffffeffffff\n@kvm absent\n@done\n";

    #[test]
    fn output_parses_and_binfmt_magic_matches_the_right_probe() {
        let p = parse_output(OUT, 2);
        assert_eq!(
            (p.kernel.as_str(), p.machine.as_str()),
            ("Linux", "aarch64")
        );
        assert_eq!(p.probes, [Some(42), Some(126)]);
        assert!(p.probe_errors[1].contains("Exec format error"));
        assert_eq!(p.binfmt.len(), 1);
        let e = &p.binfmt[0];
        assert!(e.enabled && e.flags == "POCF");
        assert!(e.matches(&probe_arch("x86_64-linux").unwrap().elf()));
        assert!(!e.matches(&probe_arch("aarch64-linux").unwrap().elf()));
        assert!(!e.matches(&probe_arch("i686-linux").unwrap().elf()));
        assert_eq!(p.kvm, Kvm::Absent);
        assert!(p.complete);
        assert_eq!(p.features, None);
        assert!(!default_features(&p).contains(&"kvm".to_string()));
        // Garbage and out-of-range indexes are ignored.
        let p = parse_output("@probe 7 42\n@probe x y\nnoise\n", 1);
        assert_eq!(p.probes, [None]);
        assert!(!p.complete);
    }
}
