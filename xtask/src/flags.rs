//! All xtask flags in one place.

use anyhow::{bail, Result};

pub const HELP: &str = "\
cargo xtask <command>

  test [--ci] [--no-install]   install test tools (as root on Debian), fmt check, clippy, all tests
  ci                           what .ci/run runs: test --ci
  bench convert|ext4 [ARGS...] vmdisk vs qemu-img (+ debugfs) side by side (release)
  deps [--check]               install the Debian packages the tests need (or only check)
";

pub enum Xtask {
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
    fn rejects_unknown() {
        assert!(parse("test --bogus").is_err());
        assert!(parse("frobnicate").is_err());
        assert!(parse("bench").is_err());
    }
}
