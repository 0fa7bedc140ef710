//! flake.nix and nix/*.nix, checked without a Nix store, a daemon or nixpkgs (CI has no binary
//! cache): every file parses with `nix-instantiate --parse`, and the parts written with builtins
//! only are evaluated for real with `nix-instantiate --eval --store dummy://`:
//!
//! - nix/testvm-names.nix, which turns a listing of testvms/ into the `vmtest-<name>` checks,
//!   against testvms/*.toml as the harness (`vmdisk_vm::def`) reads them;
//! - flake.nix's outputs, with a stand-in for nixpkgs that fails when touched: the names of its
//!   checks, packages, nixosConfigurations, devShells and apps are computed from builtins alone;
//! - the devShell: every tool of xtask/src/deps.rs TOOLS is in flake.nix's command table, mapped
//!   to a nixpkgs attribute that nix/devshell-tools.nix puts into the shell.
//!
//! What this cannot show is that nixpkgs builds the package, evaluates the NixOS modules or
//! boots the test VMs; `nix flake check` on a machine with a store does.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;
use tests::{run, s, tempfile, workspace_root, Run};
use vmdisk_vm::def::{load_dir, VmDef};

/// The systems flake.nix provides outputs for.
const SYSTEMS: &[&str] = &[
    "x86_64-linux",
    "aarch64-linux",
    "aarch64-darwin",
    "x86_64-darwin",
];

/// `nix-instantiate` (Debian: nix-bin); panics with the package to install when it is missing,
/// as `tests::require_tool` does for the other oracles.
fn nix_instantiate_bin() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("nix-instantiate"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "required tool `nix-instantiate` is not installed; these tests never skip.\n\
             install it with:  sudo apt-get install -y nix-bin   (or: cargo xtask deps, \
             or nix develop)"
        )
    })
}

/// `nix-instantiate --store dummy:// ARGS...` in the workspace root. The dummy store makes it
/// work without /nix/store, a daemon or root; nothing here may need a store path.
fn nix_instantiate<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Run {
    run(Command::new(nix_instantiate_bin())
        .current_dir(workspace_root())
        .args(["--store", "dummy://"])
        .args(args))
}

/// `nix-instantiate --eval --strict --json -E EXPR` plus `extra` arguments, parsed.
#[track_caller]
fn eval_json(expr: &str, extra: &[&str]) -> Value {
    let mut args = vec!["--eval", "--strict", "--json"];
    args.extend_from_slice(extra);
    args.extend_from_slice(&["-E", expr]);
    nix_instantiate(&args).ok().json()
}

/// A Nix expression for the absolute path `p` (a path value, not a string).
fn nix_path(p: &Path) -> String {
    format!("(/. + {})", serde_json::to_string(s(p)).unwrap())
}

/// nix/testvm-names.nix on `dir` for `system`: check name -> definition.
#[track_caller]
fn testvm_names(dir: &Path, system: &str) -> BTreeMap<String, Value> {
    let expr = format!(
        "import ./nix/testvm-names.nix {{ dir = {}; system = {}; }}",
        nix_path(dir),
        serde_json::to_string(system).unwrap()
    );
    match eval_json(&expr, &[]) {
        Value::Object(m) => m.into_iter().collect(),
        other => panic!("testvm-names.nix gave {other}, expected an attribute set"),
    }
}

/// The Nix system a harness arch runs on.
fn system_of(def: &VmDef) -> String {
    format!("{}-linux", def.arch.uname())
}

/// The test VM definitions as the harness reads them.
fn harness_defs() -> Vec<VmDef> {
    let dir = workspace_root().join("testvms");
    let defs = load_dir(&dir).unwrap_or_else(|e| panic!("loading {}: {e:#}", dir.display()));
    assert!(!defs.is_empty(), "no test VMs in {}", dir.display());
    defs
}

/// flake.nix's outputs evaluated with a nixpkgs that throws when touched: the attribute names
/// of each output (per system where the output is per system).
fn flake_output_names() -> Value {
    let expr = r#"
      let
        flake = import ./flake.nix;
        nixpkgs = {
          lib = throw "flake.nix touched nixpkgs.lib outside a value";
          legacyPackages = throw "flake.nix touched nixpkgs.legacyPackages outside a value";
        };
        out = flake.outputs { self = out; inherit nixpkgs; };
        names = builtins.mapAttrs (_: builtins.attrNames);
      in {
        checks = names out.checks;
        packages = names out.packages;
        devShells = names out.devShells;
        apps = names out.apps;
        nixosConfigurations = builtins.attrNames out.nixosConfigurations;
      }
    "#;
    eval_json(expr, &[])
}

fn strings(v: &Value) -> BTreeSet<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("{v} is not a list"))
        .iter()
        .map(|x| {
            x.as_str()
                .unwrap_or_else(|| panic!("{x} is not a string"))
                .to_string()
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Parsing
// ---------------------------------------------------------------------------------------------

#[test]
fn flake_and_every_nix_file_parse() {
    let root = workspace_root();
    let mut files = vec![root.join("flake.nix")];
    let mut nix: Vec<PathBuf> = fs::read_dir(root.join("nix"))
        .expect("nix/ exists beside flake.nix")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "nix"))
        .collect();
    nix.sort();
    assert!(!nix.is_empty(), "nix/ holds no .nix file");
    files.extend(nix);
    for f in &files {
        let r = nix_instantiate(&[std::ffi::OsStr::new("--parse"), f.as_os_str()]);
        assert!(r.success(), "{} does not parse:\n{r}", f.display());
    }
}

#[test]
fn flake_derives_checks_from_a_listing_of_testvms() {
    let flake = nix_instantiate(&["--parse", "flake.nix"]).ok().stdout;
    assert!(
        flake.contains("/nix/testvm-names.nix") && flake.contains("/testvms"),
        "flake.nix does not compute its checks with nix/testvm-names.nix over ./testvms:\n{flake}"
    );
    let names = nix_instantiate(&["--parse", "nix/testvm-names.nix"])
        .ok()
        .stdout;
    for needle in ["readDir", "\"vmtest-\""] {
        assert!(
            names.contains(needle),
            "nix/testvm-names.nix has no {needle}: it must list testvms/, not name VMs:\n{names}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Test VMs -> checks
// ---------------------------------------------------------------------------------------------

#[test]
fn every_test_vm_has_a_vmtest_check_on_its_system() {
    let defs = harness_defs();
    let dir = workspace_root().join("testvms");
    for system in SYSTEMS {
        let got = testvm_names(&dir, system);
        let want: BTreeSet<String> = defs
            .iter()
            .filter(|d| system_of(d) == *system)
            .map(|d| format!("vmtest-{}", d.name))
            .collect();
        let got_names: BTreeSet<String> = got.keys().cloned().collect();
        assert_eq!(
            got_names, want,
            "nix/testvm-names.nix on {system} disagrees with testvms/*.toml"
        );
        // The fields the NixOS test VM is built from mean what they mean to the harness
        // (the Nix side fills in def.rs's defaults itself).
        for d in defs.iter().filter(|d| system_of(d) == *system) {
            let v = &got[&format!("vmtest-{}", d.name)];
            let ctx = format!("vmtest-{} on {system}: {v}", d.name);
            assert_eq!(v["name"], d.name.as_str(), "{ctx}");
            assert_eq!(v["arch"], d.arch.uname(), "{ctx}");
            assert_eq!(v["system"], *system, "{ctx}");
            assert_eq!(v["store"], d.store.param(), "{ctx}");
            assert_eq!(v["memory_mib"], d.memory_mib, "{ctx}");
            assert_eq!(v["cpus"], d.cpus, "{ctx}");
            assert_eq!(v["disk_format"], d.disk_format.as_str(), "{ctx}");
            assert_eq!(v["disk_size"].as_str(), d.disk_size.as_deref(), "{ctx}");
            assert_eq!(v["root"], d.root.as_str(), "{ctx}");
            assert_eq!(v["quick"], d.quick, "{ctx}");
            let layout = v["layout"].as_str().unwrap_or_else(|| panic!("{ctx}"));
            assert_eq!(dir.join(layout), d.layout, "{ctx}");
            assert_eq!(v["assert"]["stage1"], d.assert.stage1, "{ctx}");
            assert_eq!(v["assert"]["ssh"], d.assert.ssh, "{ctx}");
            assert_eq!(v["assert"]["uname"], d.assert.uname, "{ctx}");
        }
    }
}

#[test]
fn flake_outputs_follow_the_test_vms() {
    let defs = harness_defs();
    let out = flake_output_names();
    for system in SYSTEMS {
        let mine: Vec<&VmDef> = defs.iter().filter(|d| system_of(d) == *system).collect();

        let mut want: BTreeSet<String> =
            mine.iter().map(|d| format!("vmtest-{}", d.name)).collect();
        want.insert("vmdisk".into());
        assert_eq!(
            strings(&out["checks"][*system]),
            want,
            "checks.{system} of flake.nix"
        );

        let mut want: BTreeSet<String> =
            mine.iter().map(|d| format!("testvm-{}", d.name)).collect();
        want.extend(["default".to_string(), "vmdisk".to_string()]);
        assert_eq!(
            strings(&out["packages"][*system]),
            want,
            "packages.{system} of flake.nix"
        );

        assert_eq!(
            strings(&out["devShells"][*system]),
            BTreeSet::from(["default".to_string()]),
            "devShells.{system}"
        );
        assert_eq!(
            strings(&out["apps"][*system]),
            BTreeSet::from(["default".to_string(), "vmtest".to_string()]),
            "apps.{system}"
        );
    }
    let want: BTreeSet<String> = defs.iter().map(|d| format!("testvm-{}", d.name)).collect();
    assert_eq!(
        strings(&out["nixosConfigurations"]),
        want,
        "nixosConfigurations of flake.nix"
    );
}

#[test]
fn testvm_names_discovers_definitions_by_listing() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let vm = |name: &str, arch: &str, extra: &str| {
        format!("name = \"{name}\"\narch = \"{arch}\"\nlayout = \"l.json\"\n{extra}")
    };
    fs::write(d.join("a.toml"), vm("a", "x86_64", "")).unwrap();
    fs::write(
        d.join("b.toml"),
        vm("b", "aarch64", "store = \"virtiofs\"\n"),
    )
    .unwrap();
    fs::write(d.join("notes.txt"), "not a VM").unwrap();
    fs::write(d.join("a.toml.orig"), vm("orig", "x86_64", "")).unwrap();
    fs::create_dir(d.join("dir.toml")).unwrap();

    let x86 = testvm_names(d, "x86_64-linux");
    assert_eq!(x86.keys().collect::<Vec<_>>(), ["vmtest-a"]);
    let a = &x86["vmtest-a"];
    assert_eq!(a["store"], "9p", "{a}");
    assert_eq!(a["root"], "LABEL=nixos", "{a}");
    assert_eq!(a["memory_mib"], 384, "{a}");
    assert_eq!(a["assert"]["ssh"], true, "{a}");

    let arm = testvm_names(d, "aarch64-linux");
    assert_eq!(arm.keys().collect::<Vec<_>>(), ["vmtest-b"]);
    assert_eq!(arm["vmtest-b"]["store"], "virtiofs");
    assert!(testvm_names(d, "aarch64-darwin").is_empty());

    // A new file is a new check, with no edit anywhere else.
    fs::write(d.join("c.toml"), vm("c", "x86_64", "")).unwrap();
    let x86 = testvm_names(d, "x86_64-linux");
    assert_eq!(x86.keys().collect::<Vec<_>>(), ["vmtest-a", "vmtest-c"]);
}

#[test]
fn testvm_names_refuses_what_the_harness_refuses() {
    for (file, text, needle) in [
        (
            "bad.toml",
            "name = \"bad\"\narch = \"mips\"\nlayout = \"l\"\n",
            "arch",
        ),
        (
            "bad.toml",
            "name = \"bad\"\narch = \"x86_64\"\nlayout = \"l\"\nstore = \"nfs\"\n",
            "store",
        ),
        ("bad.toml", "arch = \"x86_64\"\nlayout = \"l\"\n", "name"),
        (
            "twin.toml",
            "name = \"a\"\narch = \"aarch64\"\nlayout = \"l\"\n",
            "named a",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        fs::write(
            dir.path().join("a.toml"),
            "name = \"a\"\narch = \"x86_64\"\nlayout = \"l\"\n",
        )
        .unwrap();
        fs::write(dir.path().join(file), text).unwrap();
        let expr = format!(
            "import ./nix/testvm-names.nix {{ dir = {}; system = \"x86_64-linux\"; }}",
            nix_path(dir.path())
        );
        let r = nix_instantiate(&["--eval", "--strict", "--json", "-E", &expr]);
        assert!(!r.success(), "accepted {file}: {text:?}\n{r}");
        assert!(
            r.stderr.contains(needle),
            "the error for {text:?} does not name `{needle}`:\n{r}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// devShell
// ---------------------------------------------------------------------------------------------

/// `(command, Debian package)` of xtask/src/deps.rs TOOLS, read from the source.
fn deps_tools() -> Vec<(String, String)> {
    let path = workspace_root().join("xtask/src/deps.rs");
    let src = fs::read_to_string(&path).unwrap();
    let start = src
        .find("pub const TOOLS")
        .unwrap_or_else(|| panic!("{} has no `pub const TOOLS`", path.display()));
    let body = &src[start..];
    let body = &body[body.find("= &[").expect("TOOLS = &[ ... ]")..];
    let body = &body[..body.find("];").expect("TOOLS ends with ];")];
    let tools: Vec<(String, String)> = body
        .lines()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("(\""))
        .map(|l| {
            let fields: Vec<&str> = l.split('"').collect();
            assert!(
                fields.len() >= 5,
                "cannot read a (command, package) pair from `{l}`"
            );
            (fields[1].to_string(), fields[3].to_string())
        })
        .collect();
    let tuples = body.matches("(\"").count();
    assert_eq!(
        tools.len(),
        tuples,
        "read {} of TOOLS' {tuples} entries; keep one (\"cmd\", \"pkg\") per line",
        tools.len()
    );
    assert!(tools.len() >= 10, "TOOLS looks truncated: {tools:?}");
    tools
}

/// One row of flake.nix's command table.
#[derive(Debug)]
struct ToolRow {
    attr: String,
    /// all | linux | darwin
    platforms: String,
}

/// flake.nix's comment table: `#   command   nixpkgs-attribute   all|linux|darwin`.
fn flake_tool_table() -> BTreeMap<String, ToolRow> {
    let text = fs::read_to_string(workspace_root().join("flake.nix")).unwrap();
    let mut rows = BTreeMap::new();
    for line in text.lines() {
        let Some(comment) = line.trim_start().strip_prefix('#') else {
            continue;
        };
        let words: Vec<&str> = comment.split_whitespace().collect();
        let [cmd, attr, platforms] = words[..] else {
            continue;
        };
        if !matches!(platforms, "all" | "linux" | "darwin") {
            continue;
        }
        let row = ToolRow {
            attr: attr.to_string(),
            platforms: platforms.to_string(),
        };
        if let Some(old) = rows.insert(cmd.to_string(), row) {
            panic!("flake.nix's tool table lists `{cmd}` twice (first as {old:?})");
        }
    }
    assert!(
        rows.len() >= 10,
        "flake.nix's tool table looks empty: {rows:?}"
    );
    rows
}

/// nix/devshell-tools.nix's attribute names on Linux or Darwin.
fn devshell_attrs(linux: bool) -> BTreeSet<String> {
    let expr = format!(
        "import ./nix/devshell-tools.nix {{ isLinux = {linux}; isDarwin = {}; }}",
        !linux
    );
    strings(&eval_json(&expr, &[]))
}

#[test]
fn dev_shell_has_every_tool_of_xtask_deps() {
    let table = flake_tool_table();
    let linux = devshell_attrs(true);
    let darwin = devshell_attrs(false);
    let flake = fs::read_to_string(workspace_root().join("flake.nix")).unwrap();
    assert!(
        flake.contains("./nix/devshell-tools.nix"),
        "flake.nix does not build its devShell from nix/devshell-tools.nix"
    );

    // Every row names an attribute the shell really has where the row says.
    for (cmd, row) in &table {
        let on: &[(&str, &BTreeSet<String>)] = match row.platforms.as_str() {
            "all" => &[("Linux", &linux), ("Darwin", &darwin)],
            "linux" => &[("Linux", &linux)],
            _ => &[("Darwin", &darwin)],
        };
        for (name, attrs) in on {
            assert!(
                attrs.contains(&row.attr),
                "flake.nix maps `{cmd}` to `{}`, which nix/devshell-tools.nix does not put \
                 into the {name} devShell: {attrs:?}",
                row.attr
            );
        }
    }

    // Every tool the tests use is in the table, available on Linux (where CI runs them).
    let missing: Vec<String> = deps_tools()
        .into_iter()
        .filter(|(cmd, _)| table.get(cmd).is_none_or(|row| row.platforms == "darwin"))
        .map(|(cmd, pkg)| format!("{cmd} (Debian: {pkg})"))
        .collect();
    assert!(
        missing.is_empty(),
        "xtask/src/deps.rs TOOLS has commands flake.nix's devShell table does not map to a \
         nixpkgs attribute on Linux: {missing:?}\nadd a row `#   COMMAND   ATTRIBUTE   all|linux` \
         and the attribute to nix/devshell-tools.nix"
    );
}
