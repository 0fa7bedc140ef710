//! `cargo xtask test`: tools, formatting, lints, then every test in the workspace.

use std::time::Instant;

use anyhow::Result;
use xshell::{cmd, Shell};

use crate::flags::Test;

impl Test {
    pub fn run(self, sh: &Shell) -> Result<()> {
        let start = Instant::now();
        crate::deps::ensure_vm(sh, !self.no_install)?;
        if self.ci {
            // The oracles' versions, so a CI log says what judged the run.
            for (tool, flag) in [
                ("qemu-img", "--version"),
                ("nbdinfo", "--version"),
                ("mke2fs", "-V"),
            ] {
                let line = std::process::Command::new(tool)
                    .arg(flag)
                    .output()
                    .map(|o| {
                        let text = [o.stdout, o.stderr].concat();
                        String::from_utf8_lossy(&text)
                            .lines()
                            .next()
                            .unwrap_or("")
                            .to_string()
                    })
                    .unwrap_or_else(|e| format!("not runnable: {e}"));
                eprintln!("xtask: {tool}: {line}");
            }
        }
        step("cargo fmt --check", || {
            cmd!(sh, "cargo fmt --all -- --check").run()?;
            Ok(())
        })?;
        step("cargo clippy", || {
            cmd!(
                sh,
                "cargo clippy --workspace --all-targets --locked -- -D warnings"
            )
            .run()?;
            Ok(())
        })?;
        // The binary the CLI tests run, built once up front: a build inside a test would run
        // under that test's command timeout, on a machine the test suite keeps busy.
        let bin = step("cargo build vmdisk", || {
            cmd!(
                sh,
                "cargo build --profile test -p vmdisk --bin vmdisk --locked"
            )
            .run()?;
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(std::path::PathBuf::from)
                .unwrap_or_else(|| crate::project_root().join("target"));
            Ok(target.join("debug/vmdisk"))
        })?;
        if self.ci {
            let zig = crate::deps::ensure_zig(sh, !self.no_install)?;
            for target in crate::deps::DARWIN_TARGETS {
                step(&format!("cross-build and clippy for {target}"), || {
                    darwin(sh, &zig, target)
                })?;
            }
        }
        step("cargo test", || {
            cmd!(sh, "cargo test --workspace --locked --no-fail-fast")
                .env("VMDISK_BIN", &bin)
                .run()?;
            Ok(())
        })?;
        eprintln!("xtask: all checks passed in {:.0?}", start.elapsed());
        Ok(())
    }
}

/// Issue #20: the binary cross-builds (zig links it, no Apple SDK) and is a Mach-O
/// executable, and every crate that ships in it is clippy-clean for `target`.
fn darwin(sh: &Shell, zig_bin: &std::path::Path, target: &str) -> Result<()> {
    let path = std::env::join_paths(std::iter::once(zig_bin.to_path_buf()).chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))?;
    let zigbuild = zig_bin.join("cargo-zigbuild");
    cmd!(
        sh,
        "{zigbuild} zigbuild --locked --target {target} -p vmdisk --bin vmdisk"
    )
    .env("PATH", &path)
    .run()?;
    let exe = crate::project_root().join(format!("target/{target}/debug/vmdisk"));
    let what = cmd!(sh, "file -b {exe}").read()?;
    eprintln!("xtask: {}: {what}", exe.display());
    if !what.contains("Mach-O") {
        anyhow::bail!("{} is not a Mach-O executable: {what}", exe.display());
    }
    // The workspace but the Linux test harnesses (tests, xtask), which never run on a Mac.
    cmd!(
        sh,
        "{zigbuild} clippy --locked --target {target} --workspace --exclude tests --exclude xtask -- -D warnings"
    )
    .env("PATH", &path)
    .run()?;
    Ok(())
}

fn step<T>(name: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let t = Instant::now();
    eprintln!("xtask: ── {name}");
    let r = f();
    eprintln!(
        "xtask: ── {name}: {} in {:.1?}",
        if r.is_ok() { "ok" } else { "FAILED" },
        t.elapsed()
    );
    r
}
