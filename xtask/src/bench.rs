//! `cargo xtask bench NAME`: build vmdisk and the bench driver in release, then run it.

use anyhow::Result;
use xshell::{cmd, Shell};

use crate::flags::{Bench, BenchArgs, BenchName};

impl BenchName {
    /// The driver's subcommand, spelled as on xtask's command line (the tidy test checks both).
    pub fn name(&self) -> &'static str {
        match self {
            BenchName::Convert(_) => "convert",
            BenchName::Ext4(_) => "ext4",
            BenchName::Layout(_) => "layout",
            BenchName::Nbd(_) => "nbd",
            BenchName::Overlay(_) => "overlay",
            BenchName::Resize(_) => "resize",
        }
    }

    fn args(&self) -> &BenchArgs {
        match self {
            BenchName::Convert(a)
            | BenchName::Ext4(a)
            | BenchName::Layout(a)
            | BenchName::Nbd(a)
            | BenchName::Overlay(a)
            | BenchName::Resize(a) => a,
        }
    }
}

impl Bench {
    pub fn run(self, sh: &Shell) -> Result<()> {
        crate::deps::ensure(sh, true)?;
        cmd!(sh, "cargo build --release -p vmdisk -p benches").run()?;
        let what = self.bench.name();
        let args = &self.bench.args().args;
        cmd!(sh, "target/release/benches {what} {args...}").run()?;
        Ok(())
    }
}
