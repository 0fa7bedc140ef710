//! `cargo xtask`: the project's own automation, thin over cargo and the tools it installs.
//!
//! ```text
//! cargo xtask vmtest [NAME...] [--quick]   build vmdisk, build test VM disks with it, boot, report
//! cargo xtask test [--ci] [--no-install]   install test tools, fmt check, clippy, every test
//! cargo xtask ci                           exactly what .ci/run runs (test --ci)
//! cargo xtask bench convert [ARGS...]      vmdisk vs qemu-img side by side (release builds)
//! cargo xtask deps [--check]               install (or list) the Debian packages tests need
//! ```

mod bench;
mod deps;
mod flags;
mod test;
mod vmtest;

use anyhow::Result;
use xshell::Shell;

fn main() -> Result<()> {
    let flags = flags::Xtask::from_env()?;
    let sh = Shell::new()?;
    sh.change_dir(project_root());
    match flags {
        flags::Xtask::Vmtest(cmd) => cmd.run(&sh),
        flags::Xtask::Test(cmd) => cmd.run(&sh),
        flags::Xtask::Bench(cmd) => cmd.run(&sh),
        flags::Xtask::Deps(cmd) => cmd.run(&sh),
        flags::Xtask::Help => {
            print!("{}", flags::HELP);
            Ok(())
        }
    }
}

fn project_root() -> std::path::PathBuf {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    dir.parent().unwrap_or(dir).to_path_buf()
}
