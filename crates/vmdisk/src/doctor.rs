//! `vmdisk doctor builder`: flags and output only; the checks are vmdisk-doctor's.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand};

#[derive(Debug, Args)]
pub struct DoctorArgs {
    #[command(subcommand)]
    pub what: DoctorCommand,
}

#[derive(Debug, Subcommand)]
pub enum DoctorCommand {
    /// Check Nix remote builders the way nix connects to them: the machines file and nix.conf,
    /// then for each machine name resolution, the port, the SSH banner, the host key (pinned or
    /// known_hosts), the key file and who can read it, the login, the remote nix, each declared
    /// system (native or binfmt_misc) and the features — as the user nix runs ssh as (root for
    /// a nix-daemon). Reads only; exit 0 when every check passes, 1 otherwise.
    Builder(BuilderArgs),
}

#[derive(Debug, Args)]
pub struct BuilderArgs {
    /// Builders to check instead of nix's list: store URIs (ssh://USER@HOST:PORT,
    /// ssh-ng://...) or whole machines-file lines.
    #[arg(value_name = "URI")]
    pub uris: Vec<String>,
    /// Read this file wherever the builders setting names /etc/nix/machines.
    #[arg(long, value_name = "FILE")]
    pub machines: Option<PathBuf>,
    /// The nix.conf to read [default: $NIX_CONF_DIR/nix.conf, else /etc/nix/nix.conf].
    #[arg(long, value_name = "FILE")]
    pub nix_conf: Option<PathBuf>,
    /// Check ssh as this user (default: root when a nix-daemon builds, else you).
    #[arg(long, value_name = "USER")]
    pub as_user: Option<String>,
    /// Seconds each ssh session to a builder may take (the login, the remote nix, the probe).
    #[arg(long, value_name = "SECS", default_value_t = 15)]
    pub timeout: u64,
    #[command(flatten)]
    pub out: crate::JsonArgs,
}

pub fn run(a: DoctorArgs) -> Result<u8> {
    match a.what {
        DoctorCommand::Builder(b) => builder(b),
    }
}

fn builder(a: BuilderArgs) -> Result<u8> {
    let mut opts = vmdisk_doctor::Options::new();
    opts.machines_file = a.machines;
    opts.nix_conf = a.nix_conf.unwrap_or_else(|| {
        std::env::var_os("NIX_CONF_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("/etc/nix"))
            .join("nix.conf")
    });
    // A single machines line on the command line is kept whole (its columns); a bare URI is
    // a one-column line.
    opts.uris = a.uris;
    opts.as_user = a.as_user;
    opts.nix_sshopts = std::env::var("NIX_SSHOPTS").ok();
    opts.nix_remote = std::env::var("NIX_REMOTE").ok();
    opts.ssh_timeout = Duration::from_secs(a.timeout.max(1));
    let report = vmdisk_doctor::run(&opts).context("vmdisk doctor builder")?;
    if a.out.is_json() {
        crate::print_json(&report)?;
    } else {
        crate::say!("{}", report.to_text().trim_end());
    }
    Ok(if report.ok { 0 } else { 1 })
}
