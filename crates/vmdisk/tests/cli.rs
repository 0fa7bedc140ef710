//! Drift checks: the CLI keeps DESIGN.md's contract (names and flags) for this milestone.

use clap::CommandFactory;
use std::process::Command;

/// (subcommand, flags it must accept) from DESIGN.md "CLI contract".
const CONTRACT: &[(&str, &[&str])] = &[
    ("create", &["-f", "-o", "-b", "-F"]),
    ("convert", &["-f", "-O", "-c", "-o", "-p"]),
    ("inspect", &["--json", "--backing-chain", "-f", "-U"]),
    ("check", &["--json", "-r", "-f"]),
    ("map", &["--json", "-f", "-U"]),
    ("compare", &["-s", "-f", "-F", "-p"]),
    ("copy", &["--reflink", "--qmp", "--device"]),
    ("snapshot", &[]),
    ("completions", &[]),
    ("man", &["--out-dir"]),
];

#[test]
fn contract_subcommands_and_flags_exist() {
    let cmd = vmdisk::Cli::command();
    cmd.clone().debug_assert();
    for (name, flags) in CONTRACT {
        let sub = cmd
            .find_subcommand(name)
            .unwrap_or_else(|| panic!("subcommand {name} missing"));
        assert!(sub.get_about().is_some(), "{name} has no help text");
        for flag in *flags {
            let found = sub.get_arguments().any(|a| {
                if let Some(l) = flag.strip_prefix("--") {
                    a.get_long() == Some(l)
                } else {
                    a.get_short() == flag.chars().nth(1)
                }
            });
            assert!(found, "{name} lacks {flag}");
        }
    }
    let snap = cmd.find_subcommand("snapshot").unwrap();
    for action in ["create", "list", "apply", "delete"] {
        assert!(
            snap.find_subcommand(action).is_some(),
            "snapshot {action} missing"
        );
    }
}

fn vmdisk(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_vmdisk"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn every_subcommand_has_help() {
    for (name, _) in CONTRACT {
        let o = vmdisk(&[name, "--help"]);
        assert!(o.status.success(), "{name} --help failed");
        assert!(
            String::from_utf8_lossy(&o.stdout).contains("Usage"),
            "{name}"
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
