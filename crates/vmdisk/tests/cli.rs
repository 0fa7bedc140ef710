//! Drift checks: the CLI keeps the contract of DESIGN.md ("CLI contract", read from
//! `../shared/DESIGN.md` beside the repository), every command, flag and listed value, both in
//! clap's definitions and in `vmdisk CMD --help`. What the contract promises but is not built
//! yet is listed in `NOT_YET` with its issue: the test fails when anything else is missing, and
//! when a `NOT_YET` entry starts to exist (so the list shrinks as the work lands).

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;

use clap::CommandFactory;

/// Contract entries not implemented yet, each with the issue that implements it. Keys are
/// spelled as `Item::key` prints them: `CMD`, `CMD -x`, `CMD --long=value`, `ALIAS = CMD`.
const NOT_YET: &[(&str, &str)] = &[];

fn design_md() -> PathBuf {
    // crates/vmdisk -> the repository root -> its parent, which holds shared/.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/DESIGN.md");
    std::fs::canonicalize(&path).unwrap_or(path)
}

/// One promise of the contract.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Item {
    /// `vmdisk PATH...` exists.
    Command(Vec<String>),
    /// The command takes this flag (`-f`, `--json`).
    Flag(Vec<String>, String),
    /// The flag accepts this value (`-f raw`, `--reflink=never`).
    Value(Vec<String>, String, String),
    /// The command takes trailing arguments after `--`.
    Last(Vec<String>),
    /// `ALIAS` is another name of the command `TARGET`.
    Alias(String, String),
}

impl Item {
    fn path(&self) -> Vec<String> {
        match self {
            Item::Command(p) | Item::Flag(p, _) | Item::Value(p, _, _) | Item::Last(p) => p.clone(),
            Item::Alias(a, _) => vec![a.clone()],
        }
    }

    fn key(&self) -> String {
        match self {
            Item::Command(p) => p.join(" "),
            Item::Flag(p, f) => format!("{} {f}", p.join(" ")),
            Item::Value(p, f, v) if f.starts_with("--") => format!("{} {f}={v}", p.join(" ")),
            Item::Value(p, f, v) => format!("{} {f} {v}", p.join(" ")),
            Item::Last(p) => format!("{} --", p.join(" ")),
            Item::Alias(a, t) => format!("{a} = {t}"),
        }
    }
}

/// The code block under "## CLI contract".
fn contract_block(design: &str) -> Vec<&str> {
    let mut lines = design.lines();
    lines
        .find(|l| l.starts_with("## CLI contract"))
        .expect("DESIGN.md has a `## CLI contract` section");
    lines
        .by_ref()
        .find(|l| l.starts_with("```"))
        .expect("the CLI contract section has a code block");
    lines.take_while(|l| !l.starts_with("```")).collect()
}

/// Split the block into usages (`vmdisk CMD ...`, comments dropped). Continuation lines are
/// joined; after a gap of three or more spaces comes either another usage, more of the same
/// one, or a comment (lower-case prose); a comment `(and \`x\`, \`y -a/-b\`)` adds usages.
fn contract_usages(design: &str) -> Vec<String> {
    let mut logical: Vec<String> = Vec::new();
    for line in contract_block(design) {
        match logical.last_mut() {
            Some(last) if line.starts_with(char::is_whitespace) => {
                last.push(' ');
                last.push_str(line.trim());
            }
            _ if line.trim().is_empty() => {}
            _ => logical.push(line.trim_end().to_string()),
        }
    }
    let mut usages: Vec<String> = Vec::new();
    for line in logical {
        let mut rest = line.as_str();
        let mut segments = Vec::new();
        while let Some(gap) = rest.find("   ") {
            segments.push(&rest[..gap]);
            rest = rest[gap..].trim_start();
        }
        segments.push(rest);
        for seg in segments {
            if seg.starts_with("vmdisk ") {
                usages.push(seg.to_string());
            } else if let Some(list) = seg.strip_prefix("(and ") {
                usages.extend(extra_usages(list));
            } else if seg.starts_with(|c: char| c.is_ascii_lowercase()) {
                // prose: "exit 0 clean, ...", "qemu-img info fields ..."
            } else if let Some(u) = usages.last_mut() {
                u.push(' ');
                u.push_str(seg);
            }
        }
    }
    usages
}

/// "`info` = inspect, `snapshot -l/-c/-a/-d`, `dd`" -> "vmdisk info = inspect",
/// "vmdisk snapshot -l -c -a -d", "vmdisk dd".
fn extra_usages(list: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut parts = list.split('`');
    parts.next(); // the text before the first backtick
    while let (Some(code), after) = (parts.next(), parts.next()) {
        let mut usage = format!("vmdisk {}", code.replace('/', " "));
        if let Some(target) = after.and_then(|a| a.trim_start().strip_prefix('=')) {
            let target: String = target
                .trim_start()
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '-')
                .collect();
            usage = format!("{usage} = {target}");
        }
        out.push(usage);
    }
    out
}

fn is_flag(s: &str) -> bool {
    let short = s.len() == 2 && s.starts_with('-') && s.as_bytes()[1].is_ascii_alphabetic();
    let long = s.strip_prefix("--").is_some_and(|l| {
        l.starts_with(|c: char| c.is_ascii_lowercase())
            && l.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    });
    short || long
}

/// `raw|qcow2`, `create`: lower-case words (no flags) separated by `|`.
fn is_word_list(s: &str) -> bool {
    s.split('|').all(|w| {
        w.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
            && w.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    })
}

fn strip_groups(s: &str) -> &str {
    s.trim_matches(|c| matches!(c, '[' | ']' | '(' | ')'))
}

/// The promises of one usage line.
fn usage_items(usage: &str) -> Vec<Item> {
    let mut words = usage.split_whitespace().peekable();
    assert_eq!(
        words.next(),
        Some("vmdisk"),
        "a usage starts with vmdisk: {usage}"
    );
    if let Some((alias, target)) = usage
        .strip_prefix("vmdisk ")
        .and_then(|u| u.split_once(" = "))
    {
        return vec![Item::Alias(alias.trim().into(), target.trim().into())];
    }
    // The command path: lower-case words, each possibly an alternation `a|b` or `(a|b)`.
    let mut levels: Vec<Vec<String>> = Vec::new();
    while let Some(&w) = words.peek() {
        let w = w
            .strip_prefix('(')
            .and_then(|w| w.strip_suffix(')'))
            .unwrap_or(w);
        if !is_word_list(w) {
            break;
        }
        levels.push(w.split('|').map(String::from).collect());
        words.next();
    }
    let mut paths: Vec<Vec<String>> = vec![Vec::new()];
    for level in &levels {
        paths = paths
            .iter()
            .flat_map(|p| {
                level.iter().map(move |w| {
                    let mut q = p.clone();
                    q.push(w.clone());
                    q
                })
            })
            .collect();
    }
    let mut promises: Vec<(String, Option<String>)> = Vec::new(); // (flag, value)
    let mut last = false;
    let mut prev_flag: Option<String> = None;
    for w in words {
        let bare = strip_groups(w);
        // `-r leaks|all`: the values a flag takes.
        if let Some(flag) = prev_flag.take() {
            if bare.contains('|') && is_word_list(bare) {
                promises.extend(bare.split('|').map(|v| (flag.clone(), Some(v.to_string()))));
                continue;
            }
        }
        if bare == "--" {
            last = true;
            continue;
        }
        // `--reflink=auto|always|never`
        if let Some((flag, values)) = bare.split_once('=').filter(|(f, _)| is_flag(f)) {
            promises.push((flag.to_string(), None));
            if is_word_list(values) {
                promises.extend(
                    values
                        .split('|')
                        .map(|v| (flag.to_string(), Some(v.to_string()))),
                );
            }
            continue;
        }
        // `-x`, `(--a|--b HASH|--c)`, `[--in-place|-o OVERLAY]`
        for part in w.split('|').map(strip_groups).filter(|p| is_flag(p)) {
            promises.push((part.to_string(), None));
            prev_flag = Some(part.to_string());
        }
    }
    let mut items = Vec::new();
    for p in paths {
        items.push(Item::Command(p.clone()));
        if last {
            items.push(Item::Last(p.clone()));
        }
        for (flag, value) in &promises {
            items.push(match value {
                None => Item::Flag(p.clone(), flag.clone()),
                Some(v) => Item::Value(p.clone(), flag.clone(), v.clone()),
            });
        }
    }
    items
}

fn contract() -> BTreeSet<Item> {
    let path = design_md();
    let design = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading the CLI contract from {}: {e}", path.display()));
    contract_usages(&design)
        .iter()
        .flat_map(|u| usage_items(u))
        .collect()
}

fn cli() -> clap::Command {
    let mut cmd = vmdisk::Cli::command();
    cmd.build(); // propagates global flags into the subcommands
    cmd
}

fn find<'a>(root: &'a clap::Command, path: &[String]) -> Option<&'a clap::Command> {
    path.iter()
        .try_fold(root, |c, name| c.find_subcommand(name))
}

fn find_arg<'a>(cmd: &'a clap::Command, flag: &str) -> Option<&'a clap::Arg> {
    cmd.get_arguments().find(|a| match flag.strip_prefix("--") {
        Some(long) => a
            .get_long_and_visible_aliases()
            .is_some_and(|l| l.contains(&long)),
        None => {
            let short = flag.chars().nth(1);
            a.get_short_and_visible_aliases()
                .is_some_and(|s| short.is_some_and(|c| s.contains(&c)))
        }
    })
}

/// Whether clap's definitions keep the promise.
fn holds(root: &clap::Command, item: &Item) -> bool {
    match item {
        Item::Command(p) => find(root, p).is_some(),
        Item::Flag(p, f) => find(root, p).is_some_and(|c| find_arg(c, f).is_some()),
        Item::Value(p, f, v) => find(root, p).and_then(|c| find_arg(c, f)).is_some_and(|a| {
            a.get_possible_values()
                .iter()
                .any(|pv| pv.matches(v, false))
        }),
        Item::Last(p) => find(root, p).is_some_and(|c| c.get_arguments().any(|a| a.is_last_set())),
        Item::Alias(a, t) => root.find_subcommand(a).is_some_and(|c| c.get_name() == t),
    }
}

#[test]
fn contract_is_read_from_design_md() {
    let items = contract();
    let keys: BTreeSet<String> = items.iter().map(Item::key).collect();
    // A sample across every shape of line, so a parser that reads nothing cannot pass.
    for k in [
        "create",
        "create -f raw",
        "create --copy-in",
        "convert -O qcow2",
        "check -r leaks",
        "snapshot create",
        "snapshot delete",
        "rebase -u",
        "copy --reflink=never",
        "copy --device",
        "passwd --restore-backup",
        "passwd -o",
        "serve --tcp",
        "rescue --",
        "resize --grow-fs",
        "info = inspect",
        "snapshot -d",
        "amend",
        "edit",
        "vmtest --explain",
        "doctor builder --nix-conf",
    ] {
        assert!(
            keys.contains(k),
            "the contract parser missed `{k}`; got {keys:#?}"
        );
    }
    // Whole lines, prose after them included, give exactly their promises.
    let of = |cmd: &str| -> Vec<&str> {
        keys.iter()
            .map(String::as_str)
            .filter(|k| *k == cmd || k.starts_with(&format!("{cmd} ")))
            .collect()
    };
    assert_eq!(of("compare"), ["compare", "compare -s"]);
    assert_eq!(
        of("check"),
        [
            "check",
            "check --json",
            "check -r",
            "check -r all",
            "check -r leaks"
        ]
    );
    assert_eq!(of("rescue"), ["rescue", "rescue --"]);
    let commands = items
        .iter()
        .filter(|i| matches!(i, Item::Command(_)))
        .count();
    assert!(
        commands >= 30,
        "only {commands} commands read from the contract"
    );
}

#[test]
fn contract_subcommands_and_flags_exist() {
    let root = cli();
    root.clone().debug_assert();
    let items = contract();
    let mut problems = Vec::new();
    let under_missing_command = |item: &Item| {
        !matches!(item, Item::Command(_) | Item::Alias(..)) && find(&root, &item.path()).is_none()
    };
    for item in &items {
        if under_missing_command(item) {
            continue; // reported once, as the command
        }
        let key = item.key();
        let not_yet = NOT_YET.iter().find(|(k, _)| *k == key);
        match (holds(&root, item), not_yet) {
            (true, None) | (false, Some(_)) => {}
            (false, None) => {
                problems.push(format!("`vmdisk {key}` is in the contract but missing"))
            }
            (true, Some((_, issue))) => problems.push(format!(
                "`vmdisk {key}` exists now: remove it from NOT_YET ({issue})"
            )),
        }
    }
    let keys: BTreeSet<String> = items.iter().map(Item::key).collect();
    for (k, issue) in NOT_YET {
        if !keys.contains(*k) {
            problems.push(format!(
                "NOT_YET lists `{k}` ({issue}), which the contract no longer has"
            ));
        }
    }
    assert!(
        problems.is_empty(),
        "CLI vs the contract in {}:\n  {}",
        design_md().display(),
        problems.join("\n  ")
    );
}

fn vmdisk(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmdisk"))
        .args(args)
        .output()
        .unwrap()
}

/// Whether `word` (a flag or a value) occurs in help text on its own (`-f` is not in
/// `--force-share`).
fn mentions(help: &str, word: &str) -> bool {
    let joins =
        |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    help.match_indices(word).any(|(at, _)| {
        !joins(help[..at].chars().next_back()) && !joins(help[at + word.len()..].chars().next())
    })
}

#[test]
fn help_shows_the_contract() {
    let root = cli();
    let items = contract();
    let commands: BTreeSet<Vec<String>> = items
        .iter()
        .filter_map(|i| match i {
            Item::Command(p) if find(&root, p).is_some() => Some(p.clone()),
            _ => None,
        })
        .collect();
    assert!(commands.len() >= 20, "only {} commands", commands.len());
    let mut problems = Vec::new();
    for path in &commands {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = vmdisk(&args);
        let help = String::from_utf8_lossy(&o.stdout);
        let shown = path.join(" ");
        if !o.status.success() || !help.contains("Usage") {
            problems.push(format!("`vmdisk {shown} --help` failed: {o:?}"));
            continue;
        }
        for item in &items {
            let word = match item {
                Item::Flag(p, f) if p == path => f,
                Item::Value(p, _, v) if p == path => v,
                _ => continue,
            };
            if holds(&root, item) && !mentions(&help, word) {
                problems.push(format!("`vmdisk {shown} --help` does not show {word}"));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn every_subcommand_has_help() {
    fn walk(cmd: &clap::Command, path: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            path.push(sub.get_name().to_string());
            assert!(
                sub.get_about().is_some(),
                "vmdisk {} has no help text",
                path.join(" ")
            );
            out.push(path.clone());
            walk(sub, path, out);
            path.pop();
        }
    }
    let mut all = Vec::new();
    walk(&cli(), &mut Vec::new(), &mut all);
    assert!(all.len() >= 20, "only {} subcommands", all.len());
    for path in all {
        let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
        args.push("--help");
        let o = vmdisk(&args);
        assert!(
            o.status.success(),
            "vmdisk {} --help failed",
            path.join(" ")
        );
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "vmdisk {} --help",
            path.join(" ")
        );
    }
}

#[test]
fn completions_and_man() {
    let o = vmdisk(&["completions", "bash"]);
    assert!(o.status.success());
    assert!(String::from_utf8_lossy(&o.stdout).contains("vmdisk"));
    let o = vmdisk(&["man"]);
    assert!(o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with(".ie")
            || String::from_utf8_lossy(&o.stdout).contains(".TH")
    );
    let dir = tempfile::tempdir().unwrap();
    let o = vmdisk(&["man", "--out-dir", dir.path().to_str().unwrap()]);
    assert!(o.status.success());
    assert!(dir.path().join("vmdisk-convert.1").exists());
}

#[test]
fn raw_round_trip_and_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.raw");
    let b = dir.path().join("b.raw");
    let (sa, sb) = (a.to_str().unwrap(), b.to_str().unwrap());
    assert!(vmdisk(&["-q", "create", "-f", "raw", sa, "4M"])
        .status
        .success());
    std::fs::OpenOptions::new()
        .write(true)
        .open(&a)
        .and_then(|f| std::os::unix::fs::FileExt::write_all_at(&f, b"hello", 1 << 20))
        .unwrap();
    assert!(vmdisk(&["convert", "-O", "raw", sa, sb]).status.success());
    let o = vmdisk(&["compare", sa, sb]);
    assert_eq!(o.status.code(), Some(0));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Images are identical.\n"
    );
    std::fs::write(&b, vec![1u8; 4 << 20]).unwrap();
    let o = vmdisk(&["compare", sa, sb]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        "Content mismatch at offset 0!\n"
    );
    assert_eq!(
        vmdisk(&["compare", sa, "/nonexistent"]).status.code(),
        Some(2)
    );
    // qemu-img's contract: a format without checks exits 63 with its message.
    let o = vmdisk(&["check", sa]);
    assert_eq!(o.status.code(), Some(63));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("This image format does not support checks")
    );
    let o = vmdisk(&["inspect", "--json", sa]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["virtual-size"], 4 << 20);
    let o = vmdisk(&["inspect", "/nonexistent"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).starts_with("vmdisk: error: "));
}
