//! The `builders` setting of nix.conf, found as nix finds it: `name = value` lines (the value
//! is the remaining words joined by single spaces, possibly none), `#` comments, `include FILE`
//! (an error when missing) and `!include FILE` (skipped when missing), relative to the
//! including file; the last assignment wins. Unset, `builders` is `@/etc/nix/machines`.
//!
//! NixOS writes `builders =` (empty: no remote builders at all) whenever
//! `nix.distributedBuilds` is false, which is the trap behind "my machines file is ignored".

use std::path::{Path, PathBuf};

use serde::Serialize;

/// `include` nesting we follow.
pub const MAX_INCLUDE_DEPTH: usize = 8;
/// Bytes of one nix.conf we read.
pub const MAX_CONF_BYTES: usize = 1 << 20;

/// The default value of `builders` (`@$NIX_CONF_DIR/machines`).
pub const DEFAULT_BUILDERS: &str = "@/etc/nix/machines";

/// Where `builders` got its value.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct BuildersSetting {
    pub value: String,
    /// The file and 1-based line that set it; None = nix's default.
    pub file: Option<PathBuf>,
    pub line: usize,
}

/// What reading nix.conf found.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NixConf {
    pub builders: BuildersSetting,
    /// Every file read, in order.
    pub files: Vec<PathBuf>,
    /// Lines nix would refuse, missing `include`s, unreadable files.
    pub problems: Vec<String>,
}

/// Read `path` (and what it includes) through `read`. A missing top-level file is not an
/// error: nix then runs on defaults.
pub fn read(path: &Path, read: &mut dyn FnMut(&Path) -> std::io::Result<String>) -> NixConf {
    let mut conf = NixConf {
        builders: BuildersSetting {
            value: DEFAULT_BUILDERS.into(),
            file: None,
            line: 0,
        },
        files: Vec::new(),
        problems: Vec::new(),
    };
    match read(path) {
        Ok(text) => apply(&text, path, 0, read, &mut conf),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => conf
            .problems
            .push(format!("cannot read {}: {e}", path.display())),
    }
    conf
}

fn apply(
    text: &str,
    path: &Path,
    depth: usize,
    read: &mut dyn FnMut(&Path) -> std::io::Result<String>,
    conf: &mut NixConf,
) {
    conf.files.push(path.to_path_buf());
    let dir = path.parent().unwrap_or(Path::new("/"));
    for (n, line) in text.lines().enumerate() {
        let line = match line.find('#') {
            Some(i) => &line[..i],
            None => line,
        };
        let tokens: Vec<&str> = line.split_whitespace().collect();
        if tokens.is_empty() {
            continue;
        }
        let at = || format!("{}:{}", path.display(), n + 1);
        if tokens.len() < 2 {
            conf.problems.push(format!(
                "{}: illegal configuration line '{}'",
                at(),
                line.trim()
            ));
            continue;
        }
        if tokens[0] == "include" || tokens[0] == "!include" {
            if tokens.len() != 2 {
                conf.problems.push(format!(
                    "{}: illegal configuration line '{}'",
                    at(),
                    line.trim()
                ));
                continue;
            }
            let inc = dir.join(tokens[1]);
            if depth >= MAX_INCLUDE_DEPTH {
                conf.problems.push(format!(
                    "{}: includes nested deeper than {MAX_INCLUDE_DEPTH} (a loop?): {}",
                    at(),
                    inc.display()
                ));
                continue;
            }
            match read(&inc) {
                Ok(t) => apply(&t, &inc, depth + 1, read, conf),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    if tokens[0] == "include" {
                        conf.problems.push(format!(
                            "{}: file '{}' included from '{}' not found",
                            at(),
                            inc.display(),
                            path.display()
                        ));
                    }
                }
                Err(e) => {
                    conf.problems
                        .push(format!("{}: cannot read {}: {e}", at(), inc.display()))
                }
            }
            continue;
        }
        if tokens[1] != "=" {
            conf.problems.push(format!(
                "{}: illegal configuration line '{}'",
                at(),
                line.trim()
            ));
            continue;
        }
        if tokens[0] == "builders" {
            conf.builders = BuildersSetting {
                value: tokens[2..].join(" "),
                file: Some(path.to_path_buf()),
                line: n + 1,
            };
        }
    }
}

/// Read a file for [`read`], at most [`MAX_CONF_BYTES`].
pub fn read_limited(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let f = std::fs::File::open(path)?;
    let mut buf = Vec::new();
    f.take(MAX_CONF_BYTES as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > MAX_CONF_BYTES {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_CONF_BYTES} bytes; not a nix.conf"
        )));
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

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
    fn unset_means_the_machines_file() {
        let c = read(Path::new("/etc/nix/nix.conf"), &mut files(&[]));
        assert_eq!(c.builders.value, DEFAULT_BUILDERS);
        assert_eq!(c.builders.file, None);
        assert!(c.files.is_empty() && c.problems.is_empty());
    }

    #[test]
    fn the_last_assignment_wins_across_includes() {
        let mut f = files(&[
            (
                "/etc/nix/nix.conf",
                "# NixOS\nbuilders = @/etc/nix/machines\nsubstituters = https://cache.nixos.org\ninclude extra.conf\n!include missing.conf\n",
            ),
            ("/etc/nix/extra.conf", "builders =   ssh://a   x86_64-linux ; ssh://b\n"),
        ]);
        let c = read(Path::new("/etc/nix/nix.conf"), &mut f);
        assert_eq!(c.builders.value, "ssh://a x86_64-linux ; ssh://b");
        assert_eq!(
            c.builders.file.as_deref(),
            Some(Path::new("/etc/nix/extra.conf"))
        );
        assert_eq!(c.builders.line, 1);
        assert!(c.problems.is_empty(), "{:?}", c.problems);
    }

    #[test]
    fn an_empty_value_disables_every_builder() {
        let mut f = files(&[("/etc/nix/nix.conf", "builders =\nmax-jobs = 4\n")]);
        let c = read(Path::new("/etc/nix/nix.conf"), &mut f);
        assert_eq!(c.builders.value, "");
        assert_eq!(c.builders.line, 1);
    }

    #[test]
    fn bad_lines_and_missing_includes_are_reported() {
        let mut f = files(&[("/n.conf", "builders\nfoo bar\ninclude nope.conf\n")]);
        let c = read(Path::new("/n.conf"), &mut f);
        assert_eq!(c.problems.len(), 3, "{:?}", c.problems);
        assert!(c.problems[2].contains("not found"));
    }
}
