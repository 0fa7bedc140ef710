//! All xtask flags in one place (clap derive). `cargo xtask --help` and every
//! `cargo xtask CMD --help` are generated from these definitions, so help cannot drift from what
//! the commands accept.

use std::path::PathBuf;

use clap::builder::{PossibleValuesParser, TypedValueParser};
use clap::{Args, Parser, Subcommand};

/// The project's own automation: tests, VM tests, benchmarks, CI.
#[derive(Debug, Parser)]
#[command(name = "cargo xtask", bin_name = "cargo xtask")]
pub struct Xtask {
    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Build vmdisk, build the test VMs' disks with it, boot them, report.
    Vmtest(Vmtest),
    /// Install test tools (as root on Debian), then fmt check, clippy and every test.
    Test(Test),
    /// Exactly what .ci/run runs: `test --ci`.
    Ci(Ci),
    /// Run one benchmark side by side with the tool people use today (release builds).
    Bench(Bench),
    /// Install the Debian packages the tests need (or only check for them).
    Deps(Deps),
}

#[derive(Debug, Args)]
pub struct Test {
    /// Running in CI: print the oracles' versions; fail on anything that would only warn locally.
    #[arg(long)]
    pub ci: bool,
    /// Do not install missing tools; fail with the command to run instead.
    #[arg(long)]
    pub no_install: bool,
}

#[derive(Debug, Args)]
pub struct Ci {}

/// Most VMs booted at once by `vmtest -j`: each is a qemu process with its own disk.
const MAX_VMTEST_JOBS: usize = 64;

#[derive(Debug, Args)]
pub struct Vmtest {
    /// Only the test VMs whose name contains one of these (testvms/NAME.toml).
    #[arg(value_name = "NAME")]
    pub filters: Vec<String>,
    /// Only the VMs marked quick (what CI runs).
    #[arg(long)]
    pub quick: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
    /// Keep each VM's disk in its artifact folder.
    #[arg(long)]
    pub keep: bool,
    /// Boot one VM and open an SSH session in it instead of asserting.
    #[arg(long)]
    pub shell: bool,
    /// VMs booted in parallel.
    #[arg(short = 'j', long = "jobs", value_name = "N", default_value_t = 2,
          value_parser = parse_jobs)]
    pub jobs: usize,
    /// Drive a nixpkgs-shaped run-*-vm script instead of qemu directly.
    #[arg(long, value_name = "PATH")]
    pub run_script: Option<PathBuf>,
    /// Re-resolve testvms/assets.lock from Debian (as root on Debian).
    #[arg(long)]
    pub relock: bool,
    /// Like --relock, but keep every package the lock pins (the kernel too) and pin only
    /// those it lacks: for adding a package without moving the others.
    #[arg(long)]
    pub relock_missing: bool,
    /// Do not apt-get; print what is missing.
    #[arg(long)]
    pub no_install: bool,
    /// `vfkit`: print the vfkit launcher (macOS) for each VM instead of booting it with qemu.
    #[arg(long = "backend", value_name = "BACKEND", default_value = "qemu", action = clap::ArgAction::Set,
          value_parser = PossibleValuesParser::new(["qemu", "vfkit"]).map(|b| b == "vfkit"))]
    pub vfkit: bool,
}

fn parse_jobs(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_VMTEST_JOBS).contains(&n) => Ok(n),
        _ => Err(format!(
            "needs a number of VMs to run at once (1..={MAX_VMTEST_JOBS})"
        )),
    }
}

#[derive(Debug, Args)]
#[command(
    disable_help_subcommand = true,
    subcommand_value_name = "NAME",
    subcommand_help_heading = "Benchmarks"
)]
pub struct Bench {
    #[command(subcommand)]
    pub bench: BenchName,
}

/// The benchmarks; each is the subcommand of the `benches` driver (benches/src/main.rs) of the
/// same name, which the tidy test checks. `cargo xtask bench NAME --help` is the driver's help.
#[derive(Debug, Subcommand)]
pub enum BenchName {
    /// `vmdisk convert` vs `qemu-img convert`
    #[command(disable_help_flag = true)]
    Convert(BenchArgs),
    /// `vmdisk cat` vs `qemu-img convert` + `debugfs -R cat`
    #[command(disable_help_flag = true)]
    Ext4(BenchArgs),
    /// `vmdisk create --layout` vs sgdisk + mkfs + dd + qemu-img
    #[command(disable_help_flag = true)]
    Layout(BenchArgs),
    /// `vmdisk serve` vs `qemu-nbd`
    #[command(disable_help_flag = true)]
    Nbd(BenchArgs),
    /// `vmdisk commit/rebase/copy` vs `qemu-img commit/rebase` and `cp --reflink`
    #[command(disable_help_flag = true)]
    Overlay(BenchArgs),
    /// `vmdisk resize` vs `qemu-img resize` (grow a qcow2, with and without preallocation)
    #[command(disable_help_flag = true)]
    Resize(BenchArgs),
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Passed on to the benchmark driver (`--help` lists them).
    #[arg(
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "ARGS"
    )]
    pub args: Vec<String>,
}

#[derive(Debug, Args)]
pub struct Deps {
    /// Only check; install nothing.
    #[arg(long = "check")]
    pub check_only: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(s: &str) -> Result<Option<Command>, clap::Error> {
        let args = std::iter::once("cargo xtask").chain(s.split_whitespace());
        Xtask::try_parse_from(args).map(|x| x.command)
    }

    #[test]
    fn definitions_are_consistent() {
        Xtask::command().debug_assert();
    }

    #[test]
    fn parses_commands() {
        assert!(matches!(
            parse("test --ci").unwrap(),
            Some(Command::Test(Test {
                ci: true,
                no_install: false
            }))
        ));
        assert!(matches!(
            parse("test --no-install").unwrap(),
            Some(Command::Test(Test {
                ci: false,
                no_install: true
            }))
        ));
        assert!(matches!(parse("ci").unwrap(), Some(Command::Ci(_))));
        assert!(parse("").unwrap().is_none());
        assert!(matches!(
            parse("deps --check").unwrap(),
            Some(Command::Deps(Deps { check_only: true }))
        ));
        match parse("bench convert --quick --case zstd").unwrap() {
            Some(Command::Bench(Bench {
                bench: BenchName::Convert(a),
            })) => assert_eq!(a.args, ["--quick", "--case", "zstd"]),
            other => panic!("bench parsed as {other:?}"),
        }
        // The driver's own help, not xtask's.
        match parse("bench nbd --help").unwrap() {
            Some(Command::Bench(Bench {
                bench: BenchName::Nbd(a),
            })) => assert_eq!(a.args, ["--help"]),
            other => panic!("bench parsed as {other:?}"),
        }
        // xtask's help lists the benchmarks.
        let e = parse("bench --help").unwrap_err();
        assert_eq!(e.kind(), clap::error::ErrorKind::DisplayHelp);
        assert!(e.to_string().contains("overlay"), "{e}");
    }

    #[test]
    fn parses_vmtest() {
        match parse("vmtest x86 --quick -j 3 --json --run-script ./run-nixos-vm").unwrap() {
            Some(Command::Vmtest(v)) => {
                assert_eq!(v.filters, ["x86"]);
                assert!(v.quick && v.json && !v.keep && !v.vfkit);
                assert_eq!(v.jobs, 3);
                assert_eq!(
                    v.run_script.as_deref().and_then(|p| p.to_str()),
                    Some("./run-nixos-vm")
                );
            }
            other => panic!("vmtest parsed as {other:?}"),
        }
        match parse("vmtest --backend vfkit vfkit-aarch64 --jobs 1 --keep --no-install").unwrap() {
            Some(Command::Vmtest(v)) => {
                assert_eq!(v.filters, ["vfkit-aarch64"]);
                assert!(v.vfkit && v.keep && v.no_install);
                assert_eq!(v.jobs, 1);
            }
            other => panic!("vmtest parsed as {other:?}"),
        }
        match parse("vmtest").unwrap() {
            Some(Command::Vmtest(v)) => assert!(v.jobs == 2 && !v.vfkit && v.filters.is_empty()),
            other => panic!("vmtest parsed as {other:?}"),
        }
        for bad in [
            "vmtest -j 0",
            "vmtest -j 65",
            "vmtest -j",
            "vmtest --bogus",
            "vmtest --backend hyperv",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }

    #[test]
    fn rejects_unknown() {
        for bad in [
            "test --bogus",
            "ci --no-install",
            "frobnicate",
            "bench",
            "bench frobnicate",
            "bench help",
            "deps --bogus",
        ] {
            assert!(parse(bad).is_err(), "{bad} parsed");
        }
    }
}
