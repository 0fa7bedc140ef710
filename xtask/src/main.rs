//! `cargo xtask`: the project's own automation, thin over cargo and the tools it installs.
//!
//! `cargo xtask --help` lists the commands and `cargo xtask CMD --help` their flags; both are
//! generated from `flags.rs`, where every flag is defined. Each command is one module with
//! `fn run(self, sh: &Shell) -> Result<()>`.

#![forbid(unsafe_code)]

mod bench;
mod ci;
mod deps;
mod flags;
mod test;
#[cfg(test)]
mod tidy;
mod vmtest;

use anyhow::Result;
use clap::{CommandFactory, Parser};
use xshell::Shell;

use flags::Command;

fn main() -> Result<()> {
    let flags = flags::Xtask::parse();
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    match flags.command {
        Some(Command::Vmtest(cmd)) => cmd.run(&sh),
        Some(Command::Test(cmd)) => cmd.run(&sh),
        Some(Command::Ci(cmd)) => cmd.run(&sh),
        Some(Command::Bench(cmd)) => cmd.run(&sh),
        Some(Command::Deps(cmd)) => cmd.run(&sh),
        None => {
            flags::Xtask::command().print_help()?;
            Ok(())
        }
    }
}

fn project_root() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().unwrap_or(dir).to_path_buf()
}
