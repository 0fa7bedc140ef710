//! The SSH checks that the VM harness (`vmdisk-vm`) and `vmdisk doctor builder`
//! (`vmdisk-doctor`) share: one implementation of how we run OpenSSH's tools and read what they
//! say.
//!
//! - [`process`]: run a program with a hard deadline (its whole process group is killed), its
//!   output captured up to a named limit, optionally as another local account
//!   ([`account::Account`]).
//! - [`banner`]: read a server's SSH identification line (`SSH-2.0-...`) with timeouts.
//! - [`signature`]: the messages OpenSSH's client prints when it fails (host key changed or
//!   unknown, unprotected or unreadable key, authentication refused, connection refused, ...)
//!   and [`signature::classify`], which turns ssh's stderr into one [`signature::SshFailure`].
//! - [`config`]: the effective client configuration, as `ssh -G` prints it.
//! - [`hostkey`]: public host keys (`TYPE BASE64` lines, ssh-keyscan output, SHA256
//!   fingerprints as OpenSSH prints them, the base64 field of Nix's machines file).
//! - [`shell`]: POSIX-shell word splitting (`NIX_SSHOPTS`) and quoting.
//!
//! Errors: [`process::RunError`] (spawn / wait / timed out), [`account::AccountError`] (no
//! such user, lookup failed), [`banner::BannerError`] (connect, no banner, not SSH),
//! [`hostkey::KeyError`] and [`shell::SplitError`] (malformed input). Nothing here panics on
//! what a server, a file or a user sends.

pub mod account;
pub mod banner;
pub mod config;
pub mod hostkey;
pub mod process;
pub mod shell;
pub mod signature;

pub use account::Account;
pub use process::{run_bounded, Output, RunError};
pub use signature::{classify, SshFailure, SshFailureKind};
