//! `vmdisk doctor builder`: diagnose Nix remote builders the way nix connects to them.
//!
//! nix reads its builder list from the `builders` setting ([`nixconf`]: nix.conf with its
//! includes; unset means `@/etc/nix/machines`), expands `@FILE`s and parses each machines line
//! ([`machines`]), turns each URI into an ssh destination ([`uri`]) and runs `ssh` — as the
//! user who runs the build: the invoking user for single-user Nix, root for the nix-daemon.
//! [`run`] takes the same steps, one check per step with its own timeout, and [`report`]
//! prints what each found: a stable id, the verdict, the evidence, the cause and the fix.
//! [`probe`] is what runs on the builder: a tiny static program per declared system
//! (native, or through binfmt_misc?), plus /dev/kvm and the builder's system-features.
//!
//! The SSH part (running OpenSSH's tools as a user, reading banners, classifying ssh's
//! failures, host keys) is `vmdisk-ssh`, which the VM harness shares.
//!
//! Errors: parsing never fails as a whole — bad lines become [`machines::LineError`]s and a
//! failing `machines-parse` check; [`run::DoctorError`] is only for what stops the doctor
//! itself (an unknown `--as-user`, no temporary directory). Nothing here writes the user's
//! files.

#![forbid(unsafe_code)]

pub mod machines;
pub mod nixconf;
pub mod probe;
pub mod report;
pub mod run;
pub mod uri;

pub use report::{Check, Report, Verdict};
pub use run::{run, DoctorError, Options};
