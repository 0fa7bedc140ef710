//! Drift checks, run by `cargo test` (like rust-analyzer's tidy.rs): the docs against the
//! workspace and against xtask's commands, and the module graph of every crate against import
//! circles. The CLI contract (DESIGN.md) against `vmdisk --help` is in crates/vmdisk/tests/cli.rs.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser};

use crate::flags::{Command, Xtask};

fn root() -> PathBuf {
    crate::project_root()
}

fn read(rel: &str) -> String {
    let path = root().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// Fail with every problem at once, each on its own line.
#[track_caller]
fn report(what: &str, problems: &[String]) {
    assert!(
        problems.is_empty(),
        "{what}: {} problem(s):\n  {}",
        problems.len(),
        problems.join("\n  ")
    );
}

// ---------------------------------------------------------------------------------------------
// The workspace, as cargo sees it.

struct Target {
    /// "lib" or "bin".
    kind: String,
    name: String,
    src: PathBuf,
}

struct Member {
    name: String,
    /// The package's directory relative to the repository root, e.g. `crates/vmdisk-nbd`.
    dir: String,
    targets: Vec<Target>,
}

fn workspace_members() -> Vec<Member> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = std::process::Command::new(&cargo)
        .args([
            "metadata",
            "--no-deps",
            "--offline",
            "--format-version",
            "1",
        ])
        .arg("--manifest-path")
        .arg(root().join("Cargo.toml"))
        .output()
        .unwrap_or_else(|e| panic!("running {cargo} metadata: {e}"));
    assert!(
        out.status.success(),
        "cargo metadata failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON");
    let root = std::fs::canonicalize(root()).expect("the repository root exists");
    let packages = meta["packages"].as_array().expect("metadata has packages");
    let mut members: Vec<Member> = packages
        .iter()
        .map(|p| {
            let manifest = PathBuf::from(p["manifest_path"].as_str().expect("manifest_path"));
            let dir = manifest.parent().expect("a manifest has a directory");
            let dir = dir
                .strip_prefix(&root)
                .unwrap_or_else(|_| panic!("{} is outside the repository", dir.display()));
            let targets = p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .filter_map(|t| {
                    let kinds = t["kind"].as_array()?;
                    let kind = ["lib", "bin"]
                        .into_iter()
                        .find(|k| kinds.iter().any(|x| x == k))?;
                    Some(Target {
                        kind: kind.to_string(),
                        name: t["name"].as_str()?.to_string(),
                        src: PathBuf::from(t["src_path"].as_str()?),
                    })
                })
                .collect();
            Member {
                name: p["name"].as_str().expect("name").to_string(),
                dir: dir.to_string_lossy().into_owned(),
                targets,
            }
        })
        .collect();
    members.sort_by(|a, b| a.dir.cmp(&b.dir));
    assert!(!members.is_empty(), "cargo metadata listed no packages");
    members
}

// ---------------------------------------------------------------------------------------------
// README and ARCHITECTURE.md name every crate, and only crates that exist.

/// The lines of the section under `heading` (up to the next `## ` heading).
fn section<'a>(doc: &'a str, heading: &str) -> Option<Vec<(usize, &'a str)>> {
    let mut lines = doc.lines().enumerate();
    lines.find(|(_, l)| l.trim() == heading)?;
    Some(
        lines
            .take_while(|(_, l)| !l.starts_with("## "))
            .map(|(i, l)| (i + 1, l))
            .collect(),
    )
}

/// The paths that start the section's bullets: "- `crates/vmdisk-block` — ...".
fn bullet_heads<'a>(lines: &[(usize, &'a str)]) -> Vec<(usize, &'a str)> {
    lines
        .iter()
        .filter_map(|&(n, l)| {
            let rest = l.strip_prefix("- `")?;
            let end = rest.find('`')?;
            Some((n, rest[..end].trim_end_matches('/')))
        })
        .collect()
}

/// Words `vmdisk-NAME` (crate names) and `crates/NAME` in free text, with their line numbers.
fn crate_mentions(doc: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (i, line) in doc.lines().enumerate() {
        let bytes = line.as_bytes();
        for (at, _) in line.match_indices("vmdisk-") {
            let prev = at.checked_sub(1).map(|p| bytes[p]);
            let in_path = prev == Some(b'/') && line[..at].ends_with("crates/");
            let word_start =
                prev.is_none_or(|c| !(c.is_ascii_alphanumeric() || b"_.-/".contains(&c)));
            if !(in_path || word_start) {
                continue;
            }
            let tail = &line[at + "vmdisk-".len()..];
            let len = tail
                .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
                .unwrap_or(tail.len());
            let name = tail[..len].trim_end_matches('-');
            // `vmdisk-SUBCOMMAND.1` and the like are not crate names.
            if name.is_empty() || tail[len..].starts_with(|c: char| c.is_ascii_uppercase()) {
                continue;
            }
            found.push((i + 1, format!("vmdisk-{name}")));
        }
    }
    found
}

fn check_crate_list(doc_name: &str, heading: &str, members: &[Member], problems: &mut Vec<String>) {
    let doc = read(doc_name);
    let Some(lines) = section(&doc, heading) else {
        problems.push(format!("{doc_name} has no `{heading}` section"));
        return;
    };
    let heads = bullet_heads(&lines);
    for m in members {
        if !heads.iter().any(|(_, h)| *h == m.dir) {
            problems.push(format!(
                "{doc_name} `{heading}` does not name workspace member `{}` ({}): add a \
                 \"- `{}` — ...\" line",
                m.dir, m.name, m.dir
            ));
        }
    }
    for (n, head) in &heads {
        let is_member = members.iter().any(|m| m.dir == *head);
        let plain_dir =
            root().join(head).is_dir() && !root().join(head).join("Cargo.toml").exists();
        if !is_member && (head.starts_with("crates/") || !plain_dir) {
            problems.push(format!(
                "{doc_name}:{n}: `{head}` is not a workspace member (members: {})",
                members
                    .iter()
                    .map(|m| m.dir.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    for (n, name) in crate_mentions(&doc) {
        if !members.iter().any(|m| m.name == name) {
            problems.push(format!(
                "{doc_name}:{n}: names crate `{name}`, which does not exist"
            ));
        }
    }
}

#[test]
fn docs_list_every_workspace_crate() {
    let members = workspace_members();
    let mut problems = Vec::new();
    check_crate_list(
        "README.md",
        "## Layout of the code",
        &members,
        &mut problems,
    );
    check_crate_list("ARCHITECTURE.md", "## Code map", &members, &mut problems);
    report("crate lists vs the workspace", &problems);
}

#[test]
fn crate_mentions_are_found() {
    let text = "see `crates/vmdisk-foo` and vmdisk-bar's API; not .DST.vmdisk-tmp-PID, \
                nor vmdisk-SUBCOMMAND.1, nor my-vmdisk-thing";
    let got: Vec<String> = crate_mentions(text).into_iter().map(|(_, n)| n).collect();
    assert_eq!(got, ["vmdisk-foo", "vmdisk-bar"]);
}

// ---------------------------------------------------------------------------------------------
// xtask's help and the docs against its commands.

/// The benchmarks `cargo xtask bench` accepts, as clap spells them.
fn xtask_benches() -> Vec<String> {
    Xtask::command()
        .find_subcommand("bench")
        .expect("xtask has a bench command")
        .get_subcommands()
        .map(|c| c.get_name().to_string())
        .collect()
}

/// Files whose `cargo xtask ...` lines must be commands xtask accepts.
const XTASK_DOCS: &[&str] = &["README.md", "ARCHITECTURE.md", ".ci/run", "flake.nix"];

/// One `cargo xtask ...` in the docs.
struct Invocation {
    line: usize,
    args: Vec<String>,
    /// Cut short at a placeholder (`NAME`, `[ARGS...]`): a missing argument is fine.
    truncated: bool,
}

/// Every `cargo xtask ...` invocation in `text`, up to where the command line obviously ends
/// (closing backtick, comment, redirection, quote) or a placeholder starts (`[ARGS...]`, `NAME`).
fn xtask_invocations(text: &str) -> Vec<Invocation> {
    let mut found = Vec::new();
    for (i, line) in text.lines().enumerate() {
        for (at, _) in line.match_indices("cargo xtask") {
            let rest = &line[at + "cargo xtask".len()..];
            let end = rest
                .find(['`', '#', '>', '"', '\'', ')', ',', ';'])
                .unwrap_or(rest.len());
            let words: Vec<&str> = rest[..end].split_whitespace().collect();
            let placeholder = |w: &&str| {
                w.contains(['[', ']', '|', '$', '=', '(', '{'])
                    || w.contains("...")
                    || (w.chars().any(|c| c.is_ascii_uppercase())
                        && !w.chars().any(|c| c.is_ascii_lowercase()))
            };
            let args: Vec<String> = words
                .iter()
                .take_while(|w| !placeholder(w))
                .map(|w| w.trim_end_matches(['.', ':']).to_string())
                .collect();
            found.push(Invocation {
                line: i + 1,
                truncated: args.len() < words.len(),
                args,
            });
        }
    }
    found
}

#[test]
fn docs_show_only_real_xtask_commands() {
    let mut problems = Vec::new();
    let mut mentioned = BTreeSet::new();
    for doc in XTASK_DOCS {
        for Invocation {
            line: n,
            args,
            truncated,
        } in xtask_invocations(&read(doc))
        {
            let argv = std::iter::once("cargo xtask".to_string()).chain(args.iter().cloned());
            match Xtask::try_parse_from(argv) {
                Err(e) if e.kind() == ErrorKind::DisplayHelp => {}
                Err(e)
                    if truncated
                        && matches!(
                            e.kind(),
                            ErrorKind::MissingRequiredArgument
                                | ErrorKind::MissingSubcommand
                                | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
                        ) =>
                {
                    if let Some(first) = args.first() {
                        mentioned.insert(first.clone());
                    }
                }
                Ok(_) => {
                    mentioned.insert(args.iter().take(2).cloned().collect::<Vec<_>>().join(" "));
                    if let Some(first) = args.first() {
                        mentioned.insert(first.clone());
                    }
                }
                Err(e) => problems.push(format!(
                    "{doc}:{n}: `cargo xtask {}` is refused by xtask: {}",
                    args.join(" "),
                    e.to_string().lines().next().unwrap_or("")
                )),
            }
        }
    }
    let cmd = Xtask::command();
    for sub in cmd.get_subcommands() {
        if !mentioned.contains(sub.get_name()) {
            problems.push(format!(
                "`cargo xtask {}` is documented nowhere in {}",
                sub.get_name(),
                XTASK_DOCS.join(", ")
            ));
        }
    }
    for bench in xtask_benches() {
        let line = format!("bench {bench}");
        if !mentioned.contains(&line) {
            problems.push(format!(
                "`cargo xtask {line}` is documented nowhere in {}",
                XTASK_DOCS.join(", ")
            ));
        }
    }
    report("xtask commands in the docs", &problems);
}

#[test]
fn xtask_invocations_are_found() {
    let text = "run `cargo xtask bench convert` or\ncargo xtask vmtest --backend vfkit vm > x.sh\n\
                cargo xtask bench NAME [ARGS...]\n`cargo xtask`";
    let got: Vec<(Vec<String>, bool)> = xtask_invocations(text)
        .into_iter()
        .map(|i| (i.args, i.truncated))
        .collect();
    let v = |a: &[&str], t| (a.iter().map(|s| s.to_string()).collect::<Vec<_>>(), t);
    assert_eq!(
        got,
        [
            v(&["bench", "convert"], false),
            v(&["vmtest", "--backend", "vfkit", "vm"], false),
            v(&["bench"], true),
            v(&[], false),
        ]
    );
}

#[test]
fn help_lists_every_command_and_bench() {
    let mut cmd = Xtask::command();
    let top = cmd.render_long_help().to_string();
    let mut problems = Vec::new();
    for sub in cmd.get_subcommands() {
        if !top.contains(sub.get_name()) {
            problems.push(format!(
                "`cargo xtask --help` does not list {}",
                sub.get_name()
            ));
        }
    }
    let bench_help = cmd
        .find_subcommand_mut("bench")
        .expect("xtask has a bench command")
        .render_long_help()
        .to_string();
    for name in xtask_benches() {
        if !bench_help.contains(&name) {
            problems.push(format!("`cargo xtask bench --help` does not list {name}"));
        }
    }
    report("xtask help", &problems);
}

/// The subcommands of the `benches` driver: the variants of `enum Bench` in benches/src/main.rs,
/// spelled as clap spells them (kebab-case).
fn driver_benches(main_rs: &str) -> Vec<String> {
    let start = main_rs
        .find("enum Bench {")
        .expect("benches/src/main.rs defines `enum Bench {`");
    let mut depth = 0usize;
    let mut names = Vec::new();
    for line in main_rs[start..].lines() {
        let trimmed = line.trim();
        if depth == 1 && !trimmed.starts_with("//") && !trimmed.starts_with('#') {
            let ident: String = trimmed
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            if ident.starts_with(|c: char| c.is_ascii_uppercase()) {
                let mut kebab = String::new();
                for (i, c) in ident.chars().enumerate() {
                    if c.is_ascii_uppercase() && i > 0 {
                        kebab.push('-');
                    }
                    kebab.push(c.to_ascii_lowercase());
                }
                names.push(kebab);
            }
        }
        depth += line.matches(['{', '(']).count();
        depth = depth.saturating_sub(line.matches(['}', ')']).count());
        if depth == 0 {
            break;
        }
    }
    names
}

#[test]
fn bench_names_match_the_driver() {
    let driver = driver_benches(&read("benches/src/main.rs"));
    let xtask = xtask_benches();
    assert!(
        !driver.is_empty(),
        "found no benches in benches/src/main.rs"
    );
    // What bench.rs hands the driver is what was typed.
    for name in &xtask {
        match Xtask::try_parse_from(["cargo xtask", "bench", name]).map(|x| x.command) {
            Ok(Some(Command::Bench(b))) => assert_eq!(b.bench.name(), name),
            other => panic!("`cargo xtask bench {name}` parsed as {other:?}"),
        }
    }
    assert_eq!(
        xtask, driver,
        "flags::BenchName (cargo xtask bench) and benches/src/main.rs `enum Bench` disagree"
    );
}

// ---------------------------------------------------------------------------------------------
// The lints apply everywhere.

/// Whether `code` (from `code_only`) uses the `unsafe` keyword.
fn uses_unsafe(code: &str) -> bool {
    let b = code.as_bytes();
    code.match_indices("unsafe").any(|(at, _)| {
        let before = at.checked_sub(1).map(|p| b[p]);
        let after = b.get(at + "unsafe".len()).copied();
        !before.is_some_and(is_ident) && !after.is_some_and(is_ident)
    })
}

#[test]
fn every_crate_uses_the_workspace_lints() {
    let repo = std::fs::canonicalize(root()).expect("the repository root exists");
    let mut problems = Vec::new();
    for member in workspace_members() {
        let manifest = format!("{}/Cargo.toml", member.dir);
        let text = read(&manifest);
        let inherits = text
            .split("\n[")
            .any(|t| t.starts_with("lints]") && t.lines().any(|l| l.trim() == "workspace = true"));
        if !inherits {
            problems.push(format!("{manifest} lacks `[lints] workspace = true`"));
        }
        for t in &member.targets {
            let g = module_graph(&t.src);
            let any_unsafe = g.files.values().any(|f| {
                let text = std::fs::read_to_string(f).unwrap_or_default();
                uses_unsafe(&code_only(&text))
            });
            let root_code = code_only(&std::fs::read_to_string(&t.src).unwrap_or_default());
            let forbids = root_code.contains("#![forbid(unsafe_code)]");
            let rel = t
                .src
                .strip_prefix(&repo)
                .unwrap_or(&t.src)
                .display()
                .to_string();
            if !any_unsafe && !forbids {
                problems.push(format!(
                    "{rel} ({} {}) has no unsafe code: add `#![forbid(unsafe_code)]`",
                    member.name, t.kind
                ));
            }
        }
    }
    report("workspace lints", &problems);
}

#[test]
fn unsafe_is_found_as_a_keyword() {
    assert!(uses_unsafe("fn f() { unsafe { g() } }"));
    assert!(uses_unsafe("unsafe impl Send for X {}"));
    assert!(!uses_unsafe("let unsafe_header_only = true; is_unsafe();"));
    assert!(!uses_unsafe(&code_only("// unsafe\nlet s = \"unsafe\";")));
}

// ---------------------------------------------------------------------------------------------
// No import circle inside a crate.

/// Import circles that exist today, to be removed. Each is a crate root (relative to the
/// repository) and the modules of one circle (a strongly connected component of the `crate::`
/// import graph), sorted; `crate` is the root module.
const KNOWN_CYCLES: &[(&str, &[&str], &str)] = &[];

/// Rust source with comments and the contents of string and char literals blanked out
/// (newlines kept, so line numbers stay right).
fn code_only(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let blank = |out: &mut Vec<u8>, c: u8| out.push(if c == b'\n' { b'\n' } else { b' ' });
    while i < b.len() {
        let c = b[i];
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            while i < b.len() && b[i] != b'\n' {
                out.push(b' ');
                i += 1;
            }
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0usize;
            while i < b.len() {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    out.extend_from_slice(b"  ");
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
        } else if c == b'r'
            && (b.get(i + 1) == Some(&b'"') || b.get(i + 1) == Some(&b'#'))
            && (i == 0 || !(b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_'))
        {
            // A raw string r"..." or r#"..."#; `r#ident` is a raw identifier.
            let hashes = b[i + 1..].iter().take_while(|&&h| h == b'#').count();
            if b.get(i + 1 + hashes) != Some(&b'"') {
                out.push(c);
                i += 1;
                continue;
            }
            let close: Vec<u8> = std::iter::once(b'"')
                .chain(std::iter::repeat_n(b'#', hashes))
                .collect();
            out.push(b'"');
            i += 2 + hashes;
            while i < b.len() && !b[i..].starts_with(&close) {
                blank(&mut out, b[i]);
                i += 1;
            }
            out.push(b'"');
            i += close.len();
        } else if c == b'"' {
            out.push(b'"');
            i += 1;
            while i < b.len() && b[i] != b'"' {
                if b[i] == b'\\' {
                    blank(&mut out, b[i]);
                    i += 1;
                }
                if i < b.len() {
                    blank(&mut out, b[i]);
                    i += 1;
                }
            }
            out.push(b'"');
            i += 1;
        } else if c == b'\'' {
            // A char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            let lit_len = if b.get(i + 1) == Some(&b'\\') {
                // '\n', '\'', '\u{..}': the closing quote comes after the escaped char.
                b.get(i + 3..)
                    .and_then(|t| t.iter().position(|&x| x == b'\''))
                    .map(|p| p + 4)
            } else {
                let ch_len = src[i + 1..].chars().next().map_or(1, char::len_utf8);
                (b.get(i + 1 + ch_len) == Some(&b'\'')).then_some(ch_len + 2)
            };
            match lit_len {
                Some(n) => {
                    out.extend_from_slice(b"' '");
                    out.extend(std::iter::repeat_n(b' ', n.saturating_sub(3)));
                    i += n;
                }
                None => {
                    out.push(c);
                    i += 1;
                }
            }
        } else {
            out.push(c);
            i += 1;
        }
    }
    // Only ASCII was replaced, and only by ASCII, so char boundaries are intact.
    String::from_utf8_lossy(&out).into_owned()
}

/// `code` (from `code_only`) with test-only modules blanked out: `#[cfg(test)] mod x { ... }`
/// and `#[cfg(test)] mod x;`. A test importing a sibling to build fixtures is no circle.
fn without_test_modules(code: &str) -> String {
    let mut out = code.as_bytes().to_vec();
    for (at, _) in code.match_indices("#[cfg(test)]") {
        let b = code.as_bytes();
        let mut i = at + "#[cfg(test)]".len();
        // Further attributes and `pub`/`pub(crate)` before `mod`.
        loop {
            while i < b.len() && b[i].is_ascii_whitespace() {
                i += 1;
            }
            if b[i..].starts_with(b"#[") {
                match code[i..].find(']') {
                    Some(end) => i += end + 1,
                    None => break,
                }
            } else if b[i..].starts_with(b"pub(") {
                match code[i..].find(')') {
                    Some(end) => i += end + 1,
                    None => break,
                }
            } else if b[i..].starts_with(b"pub ") {
                i += 4;
            } else {
                break;
            }
        }
        if !(b[i..].starts_with(b"mod") && b.get(i + 3).is_some_and(|c| c.is_ascii_whitespace())) {
            continue;
        }
        let Some(open) = code[i..].find(['{', ';']).map(|o| i + o) else {
            continue;
        };
        let mut end = open + 1;
        if b[open] == b'{' {
            let mut depth = 0usize;
            for (j, &c) in b.iter().enumerate().skip(open) {
                match c {
                    b'{' => depth += 1,
                    b'}' => depth -= 1,
                    _ => {}
                }
                if depth == 0 {
                    end = j + 1;
                    break;
                }
            }
        }
        for c in &mut out[at..end] {
            if *c != b'\n' {
                *c = b' ';
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn is_ident(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_'
}

/// Parse a use tree / path after `crate::` at `b[*i..]` into its paths (segments).
fn path_tree(b: &[u8], i: &mut usize) -> Vec<Vec<String>> {
    let skip_ws = |i: &mut usize| {
        while *i < b.len() && b[*i].is_ascii_whitespace() {
            *i += 1;
        }
    };
    skip_ws(i);
    if b.get(*i) == Some(&b'{') {
        *i += 1;
        let mut all = Vec::new();
        loop {
            skip_ws(i);
            match b.get(*i) {
                None => break,
                Some(b'}') => {
                    *i += 1;
                    break;
                }
                Some(b',') => *i += 1,
                Some(_) => {
                    let before = *i;
                    all.extend(path_tree(b, i));
                    // `x as y`: skip the rename.
                    skip_ws(i);
                    if b[*i..].starts_with(b"as") && b.get(*i + 2).is_some_and(|c| !is_ident(*c)) {
                        *i += 2;
                        skip_ws(i);
                        while *i < b.len() && is_ident(b[*i]) {
                            *i += 1;
                        }
                    }
                    if *i == before {
                        *i += 1; // not a path: step over it
                    }
                }
            }
        }
        return all;
    }
    let start = *i;
    while *i < b.len() && is_ident(b[*i]) {
        *i += 1;
    }
    if *i == start {
        return vec![Vec::new()]; // `*` or the end of the path
    }
    let seg = String::from_utf8_lossy(&b[start..*i]).into_owned();
    let mut j = *i;
    while j < b.len() && b[j].is_ascii_whitespace() {
        j += 1;
    }
    if b[j..].starts_with(b"::") {
        *i = j + 2;
        let mut subs = path_tree(b, i);
        for s in &mut subs {
            s.insert(0, seg.clone());
        }
        return subs;
    }
    vec![vec![seg]]
}

/// Every `crate::...` path in `code` (already passed through `code_only`), with its line.
fn crate_paths(code: &str) -> Vec<(usize, Vec<String>)> {
    let b = code.as_bytes();
    let mut found = Vec::new();
    for (at, _) in code.match_indices("crate::") {
        if at > 0 && (is_ident(b[at - 1]) || b[at - 1] == b'$') {
            continue;
        }
        let line = code[..at].matches('\n').count() + 1;
        let mut i = at + "crate::".len();
        for mut p in path_tree(b, &mut i) {
            if p.last().is_some_and(|s| s == "self") {
                p.pop();
            }
            found.push((line, p));
        }
    }
    found
}

/// `mod NAME;` declarations (file modules) in `code`.
fn file_mods(code: &str) -> Vec<String> {
    let b = code.as_bytes();
    let mut mods = Vec::new();
    for (at, _) in code.match_indices("mod") {
        if (at > 0 && is_ident(b[at - 1]))
            || !b.get(at + 3).is_some_and(|c| c.is_ascii_whitespace())
        {
            continue;
        }
        let mut i = at + 3;
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        let start = i;
        while i < b.len() && is_ident(b[i]) {
            i += 1;
        }
        let name = &code[start..i];
        while i < b.len() && b[i].is_ascii_whitespace() {
            i += 1;
        }
        if !name.is_empty() && b.get(i) == Some(&b';') {
            mods.push(name.trim_start_matches("r#").to_string());
        }
    }
    mods
}

struct ModuleGraph {
    /// Module path ("crate", "server", "a::b") -> its file.
    files: BTreeMap<String, PathBuf>,
    /// Module -> modules it imports, each with the first line that does it.
    edges: BTreeMap<String, BTreeMap<String, usize>>,
}

fn module_graph(root_file: &Path) -> ModuleGraph {
    let mut files = BTreeMap::new();
    let mut code = BTreeMap::new();
    let src_dir = root_file
        .parent()
        .expect("a crate root is in a directory")
        .to_path_buf();
    let mut todo = vec![("crate".to_string(), root_file.to_path_buf(), src_dir)];
    while let Some((name, file, child_dir)) = todo.pop() {
        let text = std::fs::read_to_string(&file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
        let text = without_test_modules(&code_only(&text));
        for m in file_mods(&text) {
            let flat = child_dir.join(format!("{m}.rs"));
            let nested = child_dir.join(&m).join("mod.rs");
            let path = if flat.is_file() { flat } else { nested };
            if !path.is_file() {
                continue; // a `#[path]` module or a cfg'd-out platform file: not followed
            }
            let full = if name == "crate" {
                m.clone()
            } else {
                format!("{name}::{m}")
            };
            todo.push((full, path, child_dir.join(&m)));
        }
        files.insert(name.clone(), file);
        code.insert(name, text);
    }
    let mut edges: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
    for (name, text) in &code {
        for (line, path) in crate_paths(text) {
            let target = (1..=path.len())
                .rev()
                .map(|n| path[..n].join("::"))
                .find(|m| files.contains_key(m))
                .unwrap_or_else(|| "crate".to_string());
            if target != *name {
                edges
                    .entry(name.clone())
                    .or_default()
                    .entry(target)
                    .or_insert(line);
            }
        }
    }
    ModuleGraph { files, edges }
}

/// The strongly connected components with more than one module (Tarjan), each sorted.
fn cycles(g: &ModuleGraph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a ModuleGraph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn visit<'a>(s: &mut State<'a>, v: &'a str) {
        let n = s.index.len();
        s.index.insert(v, n);
        s.low.insert(v, n);
        s.stack.push(v);
        s.on_stack.insert(v);
        let g = s.g;
        for w in g.edges.get(v).into_iter().flat_map(|e| e.keys()) {
            let w = w.as_str();
            if !s.index.contains_key(w) {
                visit(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).expect("visited");
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut comp = Vec::new();
            while let Some(w) = s.stack.pop() {
                s.on_stack.remove(w);
                comp.push(w.to_string());
                if w == v {
                    break;
                }
            }
            if comp.len() > 1 {
                comp.sort();
                s.out.push(comp);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in g.files.keys() {
        if !s.index.contains_key(v.as_str()) {
            visit(&mut s, v);
        }
    }
    s.out.sort();
    s.out
}

/// "a -> b (a.rs:12), b -> a (b.rs:3)": the imports that make up one circle.
fn describe(g: &ModuleGraph, comp: &[String], repo: &Path) -> String {
    let mut parts = Vec::new();
    for from in comp {
        for (to, line) in g.edges.get(from).into_iter().flatten() {
            if comp.contains(to) {
                let file = &g.files[from];
                let file = file.strip_prefix(repo).unwrap_or(file);
                parts.push(format!("{from} -> {to} ({}:{line})", file.display()));
            }
        }
    }
    parts.join(", ")
}

#[test]
fn no_import_cycles_inside_a_crate() {
    let repo = std::fs::canonicalize(root()).expect("the repository root exists");
    let mut problems = Vec::new();
    let mut seen_known = BTreeSet::new();
    for member in workspace_members() {
        for t in &member.targets {
            let g = module_graph(&t.src);
            let rel = t
                .src
                .strip_prefix(&repo)
                .unwrap_or(&t.src)
                .display()
                .to_string();
            for comp in cycles(&g) {
                let known = KNOWN_CYCLES
                    .iter()
                    .position(|(r, mods, _)| *r == rel && mods.iter().eq(comp.iter()));
                match known {
                    Some(k) => {
                        seen_known.insert(k);
                    }
                    None => problems.push(format!(
                        "{} {} `{}`: import circle {{{}}}: {}",
                        member.name,
                        t.kind,
                        t.name,
                        comp.join(", "),
                        describe(&g, &comp, &repo)
                    )),
                }
            }
        }
    }
    for (k, (rel, mods, why)) in KNOWN_CYCLES.iter().enumerate() {
        if !seen_known.contains(&k) {
            problems.push(format!(
                "KNOWN_CYCLES entry {rel} {{{}}} ({why}) no longer exists: remove it",
                mods.join(", ")
            ));
        }
    }
    report(
        "import circles (see KNOWN_CYCLES in xtask/src/tidy.rs)",
        &problems,
    );
}

#[test]
fn import_graph_parsing() {
    let src = r##"
        //! Uses crate::doc::link only in a comment.
        use crate::{a::{self, B}, b::c::D as E, *};
        use std::fmt;
        mod x;
        pub(crate) mod y;
        mod inline { use super::*; }
        fn f<'a>(s: &'a str) -> char { let _ = "crate::in_string"; let _ = r#"crate::raw"#; '"' }
        fn g() { crate::z::call(); $crate::not_ours(); }
    "##;
    let code = code_only(src);
    let paths: Vec<Vec<String>> = crate_paths(&code).into_iter().map(|(_, p)| p).collect();
    let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    assert_eq!(
        paths,
        [
            s(&["a"]),
            s(&["a", "B"]),
            s(&["b", "c", "D"]),
            s(&[]),
            s(&["z", "call"])
        ]
    );
    assert_eq!(file_mods(&code), ["x", "y"]);

    let src = "use crate::a::A;\n#[cfg(test)]\n#[allow(dead_code)]\npub(crate) mod tests {\n    \
               use crate::b::{B, C};\n    fn f() { if true { crate::c::f() } }\n}\n\
               #[cfg(test)] mod more;\nfn g() { crate::d::g() }\n";
    let code = without_test_modules(&code_only(src));
    let paths: Vec<(usize, Vec<String>)> = crate_paths(&code);
    assert_eq!(paths, [(1, s(&["a", "A"])), (9, s(&["d", "g"]))]);
    assert!(file_mods(&code).is_empty());

    let edges = |pairs: &[(&str, &str)]| {
        let mut e: BTreeMap<String, BTreeMap<String, usize>> = BTreeMap::new();
        for (a, b) in pairs {
            e.entry(a.to_string()).or_default().insert(b.to_string(), 1);
        }
        e
    };
    let files = ["crate", "a", "b", "c", "d"]
        .iter()
        .map(|m| (m.to_string(), PathBuf::from(format!("{m}.rs"))))
        .collect();
    let g = ModuleGraph {
        files,
        edges: edges(&[
            ("a", "b"),
            ("b", "a"),
            ("c", "d"),
            ("d", "crate"),
            ("crate", "c"),
        ]),
    };
    assert_eq!(cycles(&g), [s(&["a", "b"]), s(&["c", "crate", "d"])]);
}
