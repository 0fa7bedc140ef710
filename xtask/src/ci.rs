//! `cargo xtask ci`: exactly what `.ci/run` runs.

use anyhow::Result;
use xshell::Shell;

use crate::flags::{Ci, Test};

impl Ci {
    pub fn run(self, sh: &Shell) -> Result<()> {
        Test {
            ci: true,
            no_install: false,
        }
        .run(sh)
    }
}
