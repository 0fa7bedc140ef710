//! All xtask flags in one place.

use anyhow::{bail, Result};

pub const HELP: &str = "\
cargo xtask <command>

  vmtest [NAME...] [OPTIONS]   build vmdisk, build the test VMs' disks with it, boot them, report
      --quick                  only the VMs marked quick (what CI runs)
      --json                   print the report as JSON
      --keep                   keep each VM's disk in its artifact folder
      --shell                  boot one VM and open an SSH session instead of asserting
      -j N                     VMs in parallel (default 2)
      --run-script PATH        drive a nixpkgs-shaped run-*-vm script instead of qemu directly
      --backend vfkit          print the vfkit launcher (macOS) for the VM instead of booting it
      --relock                 re-resolve testvms/assets.lock from Debian (as root on Debian)
      --no-install             do not apt-get; print what is missing
  test [--ci] [--no-install]   install test tools (as root on Debian), fmt check, clippy, all tests
  ci                           what .ci/run runs: test --ci
  bench convert|ext4 [ARGS...] vmdisk vs qemu-img (+ debugfs) side by side (release)
  deps [--check]               install the Debian packages the tests need (or only check)
";

pub enum Xtask {
    Vmtest(Vmtest),
    Test(Test),
    Bench(Bench),
    Deps(Deps),
    Help,
}

pub struct Test {
    /// Running in CI: also fail on anything that would only warn locally.
    pub ci: bool,
    /// Do not install missing tools; fail with the command to run instead.
    pub no_install: bool,
}

pub struct Vmtest {
    pub filters: Vec<String>,
    pub quick: bool,
    pub json: bool,
    pub keep: bool,
    pub shell: bool,
    pub jobs: usize,
    pub run_script: Option<std::path::PathBuf>,
    pub relock: bool,
    pub no_install: bool,
    pub vfkit: bool,
}

pub struct Bench {
    pub what: String,
    pub args: Vec<String>,
}

pub struct Deps {
    pub check_only: bool,
}

impl Xtask {
    pub fn from_env() -> Result<Self> {
        let args: Vec<String> = std::env::args().skip(1).collect();
        Self::parse(&args)
    }

    pub fn parse(args: &[String]) -> Result<Self> {
        let Some((cmd, rest)) = args.split_first() else {
            return Ok(Xtask::Help);
        };
        let has = |f: &str| rest.iter().any(|a| a == f);
        let only = |allowed: &[&str]| -> Result<()> {
            for a in rest {
                if !allowed.contains(&a.as_str()) {
                    bail!("unknown flag {a} for `cargo xtask {cmd}`\n\n{HELP}");
                }
            }
            Ok(())
        };
        Ok(match cmd.as_str() {
            "test" => {
                only(&["--ci", "--no-install"])?;
                Xtask::Test(Test {
                    ci: has("--ci"),
                    no_install: has("--no-install"),
                })
            }
            "vmtest" => Xtask::Vmtest(parse_vmtest(rest)?),
            "ci" => {
                only(&[])?;
                Xtask::Test(Test {
                    ci: true,
                    no_install: false,
                })
            }
            "bench" => {
                let Some((what, args)) = rest.split_first() else {
                    bail!("`cargo xtask bench` needs a benchmark name: convert\n\n{HELP}");
                };
                Xtask::Bench(Bench {
                    what: what.clone(),
                    args: args.to_vec(),
                })
            }
            "deps" => {
                only(&["--check"])?;
                Xtask::Deps(Deps {
                    check_only: has("--check"),
                })
            }
            "help" | "--help" | "-h" => Xtask::Help,
            other => bail!("unknown command `{other}`\n\n{HELP}"),
        })
    }
}

fn parse_vmtest(rest: &[String]) -> Result<Vmtest> {
    let mut v = Vmtest {
        filters: Vec::new(),
        quick: false,
        json: false,
        keep: false,
        shell: false,
        jobs: 2,
        run_script: None,
        relock: false,
        no_install: false,
        vfkit: false,
    };
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--quick" => v.quick = true,
            "--json" => v.json = true,
            "--keep" => v.keep = true,
            "--shell" => v.shell = true,
            "--relock" => v.relock = true,
            "--no-install" => v.no_install = true,
            "--backend" => match it.next().map(String::as_str) {
                Some("qemu") => v.vfkit = false,
                Some("vfkit") => v.vfkit = true,
                _ => bail!("--backend takes qemu or vfkit"),
            },
            "-j" | "--jobs" => {
                let n = it.next().map(|s| s.parse::<usize>());
                match n {
                    Some(Ok(n)) if (1..=64).contains(&n) => v.jobs = n,
                    _ => bail!("-j needs a number of VMs to run at once (1..64)"),
                }
            }
            "--run-script" => match it.next() {
                Some(p) => v.run_script = Some(p.into()),
                None => bail!("--run-script needs the path of a run-*-vm script"),
            },
            f if f.starts_with('-') => bail!("unknown flag {f} for `cargo xtask vmtest`\n\n{HELP}"),
            name => v.filters.push(name.to_string()),
        }
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Xtask> {
        let v: Vec<String> = s.split_whitespace().map(String::from).collect();
        Xtask::parse(&v)
    }

    #[test]
    fn parses_commands() {
        assert!(matches!(
            parse("test --ci").unwrap(),
            Xtask::Test(Test { ci: true, .. })
        ));
        assert!(matches!(
            parse("ci").unwrap(),
            Xtask::Test(Test {
                ci: true,
                no_install: false
            })
        ));
        assert!(matches!(parse("").unwrap(), Xtask::Help));
        match parse("bench convert --quick").unwrap() {
            Xtask::Bench(b) => {
                assert_eq!(b.what, "convert");
                assert_eq!(b.args, vec!["--quick"]);
            }
            _ => panic!("bench"),
        }
    }

    #[test]
    fn parses_vmtest() {
        match parse("vmtest x86 --quick -j 3 --json --run-script ./run-nixos-vm").unwrap() {
            Xtask::Vmtest(v) => {
                assert_eq!(v.filters, vec!["x86"]);
                assert!(v.quick && v.json && !v.keep);
                assert_eq!(v.jobs, 3);
                assert_eq!(v.run_script.unwrap().to_str(), Some("./run-nixos-vm"));
            }
            _ => panic!("vmtest"),
        }
        assert!(parse("vmtest -j 0").is_err());
        assert!(parse("vmtest -j").is_err());
        assert!(parse("vmtest --bogus").is_err());
    }

    #[test]
    fn rejects_unknown() {
        assert!(parse("test --bogus").is_err());
        assert!(parse("frobnicate").is_err());
        assert!(parse("bench").is_err());
    }
}
