//! Nix's builder list: the `builders` setting (entries separated by newlines or `;`, `#`
//! comments, `@FILE` to read a machines file, which nix skips silently when it does not exist)
//! and the machines-file line format, every column of it:
//!
//! ```text
//! URI  SYSTEMS  SSH-KEY  MAX-JOBS  SPEED-FACTOR  SUPPORTED-FEATURES  MANDATORY-FEATURES  BASE64-HOST-KEY
//! ssh://builder@linux-builder aarch64-linux /etc/nix/builder_ed25519 1 1 kvm,big-parallel - c3NoLWVk...
//! ```
//!
//! Columns are separated by whitespace; a missing column or `-` means the default (systems: the
//! local system; key: ssh's own choice; jobs and speed: 1; features: none; host key: ssh's
//! known_hosts). A URI without a scheme gets `ssh://`. Pure: files are read through a callback.

use std::path::{Path, PathBuf};

use serde::Serialize;

/// `@FILE` nesting we follow (nix has no limit, and recurses forever on a loop).
pub const MAX_INCLUDE_DEPTH: usize = 8;
/// Machines we read in all (a build farm has dozens).
pub const MAX_MACHINES: usize = 4096;
/// Bytes of one machines file we read.
pub const MAX_FILE_BYTES: usize = 1 << 20;

/// Where an entry was written.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Origin {
    /// The machines file, or None for a `builders` value itself / the command line.
    pub file: Option<PathBuf>,
    /// 1-based line in `file` (or in the `builders` value).
    pub line: usize,
}

impl std::fmt::Display for Origin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.file {
            Some(p) => write!(f, "{}:{}", p.display(), self.line),
            None => write!(f, "builders entry {}", self.line),
        }
    }
}

/// One machine, every column parsed.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Machine {
    /// The store URI as nix uses it (`ssh://` added when the line had no scheme).
    pub uri: String,
    /// The systems it builds for (the local system when the column is unset).
    pub systems: Vec<String>,
    /// True when `systems` is the default, not written in the line.
    pub systems_defaulted: bool,
    /// The SSH identity file (column 3).
    pub ssh_key: Option<String>,
    pub max_jobs: u32,
    pub speed_factor: f64,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    /// The base64 of the pinned public host key line (column 8).
    pub public_host_key: Option<String>,
    pub origin: Origin,
    /// The entry as written.
    pub text: String,
}

impl Machine {
    /// Supported and mandatory features together (nix counts mandatory ones as supported).
    pub fn declared_features(&self) -> Vec<String> {
        let mut v = self.supported_features.clone();
        for f in &self.mandatory_features {
            if !v.contains(f) {
                v.push(f.clone());
            }
        }
        v
    }
}

/// A line nix would refuse, with its reason in nix's words.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct LineError {
    pub origin: Origin,
    pub text: String,
    pub message: String,
}

/// What reading one `@FILE` found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case", tag = "outcome")]
pub enum FileRead {
    /// Read; this many entries came from it (not counting nested files).
    Read { path: PathBuf, entries: usize },
    /// Does not exist: nix skips it without a word.
    Missing { path: PathBuf },
    /// Could not be read (nix fails the build with this error).
    Unreadable { path: PathBuf, error: String },
    /// Nested deeper than [`MAX_INCLUDE_DEPTH`] (a loop).
    TooDeep { path: PathBuf },
}

/// The machines a `builders` value expands to, and everything that went wrong on the way.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Expansion {
    pub machines: Vec<Machine>,
    pub errors: Vec<LineError>,
    pub files: Vec<FileRead>,
    /// Entries beyond [`MAX_MACHINES`] were dropped.
    pub truncated: bool,
}

/// Expand a `builders` value as nix does. `read` returns a file's contents (an error of kind
/// NotFound means "missing"; the caller maps `/etc/nix/machines` to `--machines FILE`);
/// `this_system` is the default for an unset systems column.
pub fn expand(
    builders: &str,
    this_system: &str,
    read: &mut dyn FnMut(&Path) -> std::io::Result<String>,
) -> Expansion {
    let mut out = Expansion::default();
    expand_into(builders, None, 0, this_system, read, &mut out);
    out
}

fn expand_into(
    text: &str,
    file: Option<&Path>,
    depth: usize,
    this_system: &str,
    read: &mut dyn FnMut(&Path) -> std::io::Result<String>,
    out: &mut Expansion,
) {
    for (n, raw_line) in text.lines().enumerate() {
        for entry in raw_line.split(';') {
            let entry = match entry.find('#') {
                Some(i) => &entry[..i],
                None => entry,
            }
            .trim();
            if entry.is_empty() {
                continue;
            }
            let origin = Origin {
                file: file.map(Path::to_path_buf),
                line: n + 1,
            };
            if let Some(path) = entry.strip_prefix('@') {
                let path = PathBuf::from(path.trim());
                if depth >= MAX_INCLUDE_DEPTH {
                    out.files.push(FileRead::TooDeep { path });
                    continue;
                }
                match read(&path) {
                    Ok(contents) => {
                        let before = out.machines.len() + out.errors.len();
                        let idx = out.files.len();
                        out.files.push(FileRead::Read {
                            path: path.clone(),
                            entries: 0,
                        });
                        expand_into(&contents, Some(&path), depth + 1, this_system, read, out);
                        let after = out.machines.len() + out.errors.len();
                        out.files[idx] = FileRead::Read {
                            path,
                            entries: after - before,
                        };
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                        out.files.push(FileRead::Missing { path })
                    }
                    Err(e) => out.files.push(FileRead::Unreadable {
                        path,
                        error: e.to_string(),
                    }),
                }
                continue;
            }
            if out.machines.len() >= MAX_MACHINES {
                out.truncated = true;
                return;
            }
            match parse_line(entry, origin.clone(), this_system) {
                Ok(m) => out.machines.push(m),
                Err(message) => out.errors.push(LineError {
                    origin,
                    text: entry.to_string(),
                    message,
                }),
            }
        }
    }
}

/// The store URI as nix normalises it: schemeless names that are not paths or the special
/// store words get `ssh://`.
pub fn normalise_uri(uri: &str) -> String {
    let special = uri.contains("://")
        || uri.contains('/')
        || matches!(uri, "auto" | "daemon" | "local")
        || ["auto?", "daemon?", "local?", "?"]
            .iter()
            .any(|p| uri.starts_with(p));
    if special {
        uri.to_string()
    } else {
        format!("ssh://{uri}")
    }
}

fn list(s: &str) -> Vec<String> {
    let mut v: Vec<String> = Vec::new();
    for x in s.split(',').filter(|x| !x.is_empty()) {
        if !v.iter().any(|y| y == x) {
            v.push(x.to_string());
        }
    }
    v
}

/// Parse one machines-file entry (comment already removed). Errors read like nix's.
pub fn parse_line(line: &str, origin: Origin, this_system: &str) -> Result<Machine, String> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let set = |i: usize| {
        tokens
            .get(i)
            .copied()
            .filter(|t| !t.is_empty() && *t != "-")
    };
    let Some(uri) = set(0) else {
        return Err(format!(
            "bad machine specification: store URL was not found at the first column of a row: '{line}'"
        ));
    };
    let uint = |i: usize| -> Result<u32, String> {
        match set(i) {
            None => Ok(1),
            Some(t) => t.parse::<u32>().map_err(|_| {
                format!(
                    "bad machine specification: failed to convert column #{i} in a row: '{line}' to 'unsigned int'"
                )
            }),
        }
    };
    let max_jobs = uint(3)?;
    let speed_factor = match set(4) {
        None => 1.0,
        Some(t) => match t.parse::<f64>() {
            Ok(v) if v.is_finite() && v >= 0.0 => v,
            _ => {
                return Err(format!(
                    "bad machine specification: failed to convert column #4 in a row: '{line}' to 'float'"
                ))
            }
        },
    };
    let public_host_key = match set(7) {
        None => None,
        Some(t) => {
            if vmdisk_ssh::hostkey::base64_decode(t).is_err() {
                return Err(format!(
                    "bad machine specification: a column #7 in a row: '{line}' is not valid base64 string"
                ));
            }
            Some(t.to_string())
        }
    };
    let (systems, systems_defaulted) = match set(1) {
        Some(s) => (list(s), false),
        None => (vec![this_system.to_string()], true),
    };
    Ok(Machine {
        uri: normalise_uri(uri),
        systems,
        systems_defaulted,
        ssh_key: set(2).map(str::to_string),
        max_jobs,
        speed_factor,
        supported_features: set(5).map(list).unwrap_or_default(),
        mandatory_features: set(6).map(list).unwrap_or_default(),
        public_host_key,
        origin,
        text: line.to_string(),
    })
}

/// Read a file for [`expand`], at most [`MAX_FILE_BYTES`].
pub fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(MAX_FILE_BYTES as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > MAX_FILE_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE_BYTES} bytes; not a machines file"
        )));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const DARWIN: &str = "ssh-ng://builder@linux-builder aarch64-linux,x86_64-linux /etc/nix/builder_ed25519 1 1 kvm,benchmark,big-parallel - c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUpCV2N4Yi9CbGFxdDFhdU90RStGOFFVV3JVb3RpQzVxQkorVXVFV2RWQ2Igcm9vdEBuaXhvcwo=";

    fn files(map: &[(&str, &str)]) -> impl FnMut(&Path) -> std::io::Result<String> {
        let m: HashMap<PathBuf, String> = map
            .iter()
            .map(|(k, v)| (PathBuf::from(k), v.to_string()))
            .collect();
        move |p: &Path| {
            m.get(p)
                .cloned()
                .ok_or_else(|| std::io::Error::from(std::io::ErrorKind::NotFound))
        }
    }

    #[test]
    fn every_column_of_the_nix_darwin_line_is_parsed() {
        let m = parse_line(
            DARWIN,
            Origin {
                file: None,
                line: 1,
            },
            "aarch64-darwin",
        )
        .unwrap();
        assert_eq!(m.uri, "ssh-ng://builder@linux-builder");
        assert_eq!(m.systems, ["aarch64-linux", "x86_64-linux"]);
        assert!(!m.systems_defaulted);
        assert_eq!(m.ssh_key.as_deref(), Some("/etc/nix/builder_ed25519"));
        assert_eq!((m.max_jobs, m.speed_factor), (1, 1.0));
        assert_eq!(m.supported_features, ["kvm", "benchmark", "big-parallel"]);
        assert!(m.mandatory_features.is_empty());
        assert!(m
            .public_host_key
            .as_deref()
            .unwrap()
            .starts_with("c3NoLWVk"));
    }

    #[test]
    fn defaults_and_schemeless_names() {
        let m = parse_line(
            "mac",
            Origin {
                file: None,
                line: 1,
            },
            "x86_64-linux",
        )
        .unwrap();
        assert_eq!(m.uri, "ssh://mac");
        assert_eq!(m.systems, ["x86_64-linux"]);
        assert!(m.systems_defaulted);
        assert_eq!(m.ssh_key, None);
        assert_eq!((m.max_jobs, m.speed_factor), (1, 1.0));
        let m = parse_line(
            "ssh://b - - 8 2.5 - big-parallel",
            Origin {
                file: None,
                line: 1,
            },
            "x",
        )
        .unwrap();
        assert_eq!((m.max_jobs, m.speed_factor), (8, 2.5));
        assert_eq!(m.declared_features(), ["big-parallel"]);
        for special in ["local", "daemon", "auto", "/nix/store", "local?root=/x"] {
            assert_eq!(normalise_uri(special), special);
        }
    }

    #[test]
    fn bad_columns_are_refused_in_nix_words() {
        let o = || Origin {
            file: None,
            line: 1,
        };
        let e = parse_line("ssh://b x86_64-linux - many", o(), "x").unwrap_err();
        assert!(e.contains("column #3") && e.contains("unsigned int"), "{e}");
        let e = parse_line("ssh://b x86_64-linux - 1 fast", o(), "x").unwrap_err();
        assert!(e.contains("column #4"), "{e}");
        let e = parse_line("ssh://b x - 1 1 - - !!notbase64", o(), "x").unwrap_err();
        assert!(e.contains("column #7") && e.contains("base64"), "{e}");
        let e = parse_line("- x86_64-linux", o(), "x").unwrap_err();
        assert!(e.contains("store URL was not found"), "{e}");
    }

    #[test]
    fn builders_values_expand_files_comments_and_semicolons() {
        let mut read = files(&[
            (
                "/etc/nix/machines",
                "# generated\nssh://a x86_64-linux\n\nssh://b aarch64-linux # b\n@/etc/nix/more\n",
            ),
            ("/etc/nix/more", "ssh://c; ssh://d\n"),
        ]);
        let e = expand("@/etc/nix/machines; ssh://e", "x86_64-linux", &mut read);
        let uris: Vec<&str> = e.machines.iter().map(|m| m.uri.as_str()).collect();
        assert_eq!(
            uris,
            ["ssh://a", "ssh://b", "ssh://c", "ssh://d", "ssh://e"]
        );
        assert_eq!(
            e.machines[1].origin,
            Origin {
                file: Some("/etc/nix/machines".into()),
                line: 4
            }
        );
        assert_eq!(
            e.machines[4].origin,
            Origin {
                file: None,
                line: 1
            }
        );
        assert_eq!(
            e.files[0],
            FileRead::Read {
                path: "/etc/nix/machines".into(),
                entries: 4
            }
        );
        assert!(e.errors.is_empty());
    }

    #[test]
    fn empty_missing_and_looping_files() {
        let mut read = files(&[("/loop", "@/loop\n")]);
        assert_eq!(expand("", "x", &mut read), Expansion::default());
        let e = expand("@/nope", "x", &mut read);
        assert_eq!(
            e.files,
            [FileRead::Missing {
                path: "/nope".into()
            }]
        );
        assert!(e.machines.is_empty());
        let e = expand("@/loop", "x", &mut read);
        assert!(matches!(e.files.last(), Some(FileRead::TooDeep { .. })));
        assert_eq!(e.files.len(), MAX_INCLUDE_DEPTH + 1);
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in ".{0,200}") {
            let mut read = files(&[]);
            let _ = expand(&s, "x86_64-linux", &mut read);
        }
    }
}
