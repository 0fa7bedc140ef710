//! `cargo xtask bench NAME`: build vmdisk and the bench driver in release, then run it.

use anyhow::{bail, Result};
use xshell::{cmd, Shell};

use crate::flags::Bench;

impl Bench {
    pub fn run(self, sh: &Shell) -> Result<()> {
        match self.what.as_str() {
            "convert" | "ext4" | "layout" | "nbd" | "overlay" | "resize" => {}
            other => {
                bail!("unknown benchmark `{other}`; available: convert, ext4, layout, nbd, overlay, resize")
            }
        }
        crate::deps::ensure(sh, true)?;
        cmd!(sh, "cargo build --release -p vmdisk -p benches").run()?;
        let what = &self.what;
        let args = &self.args;
        cmd!(sh, "target/release/benches {what} {args...}").run()?;
        Ok(())
    }
}
