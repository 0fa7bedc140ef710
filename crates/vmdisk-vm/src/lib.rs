//! The VM runtime of the harness: boot a real Linux guest whose disk vmdisk built, watch it,
//! reach it over SSH, assert what matters and, when it fails, say why.
//!
//! [`def`] (test VM definitions), [`rootfs`] (the per-run root tree and the disk `vmdisk
//! create --layout` builds from it), [`qemu`] (command lines and binaries), [`console`]
//! (serial log and markers), [`ssh`] (OpenSSH client, keys, pinned host keys), [`vm`] (a
//! running `TestVm` that cleans up in Drop), [`run`] (`Harness`: prepare, boot, assert),
//! [`diagnose`] (known failure signatures), [`report`], and [`vfkit`] (the macOS backend).
//!
//! What a guest is built from (kernel, initramfs, store) comes from `vmdisk-assets`; its
//! [`assets`] module (lock and cache, which [`run::Harness::new`] takes) and [`Arch`] are
//! re-exported here. QMP is `vmdisk-qmp`'s.
//!
//! Errors are `anyhow` with context (ARCHITECTURE.md, "vmdisk-vm returns anyhow errors"); the
//! failure *causes* callers match on are typed ([`diagnose::Diagnosis`]).

pub mod console;
pub mod def;
pub mod diagnose;
pub mod nixos;
pub mod preseed;
pub mod qemu;
pub mod report;
pub mod rootfs;
pub mod run;
pub mod script;
pub mod ssh;
pub mod vfkit;
pub mod vm;
pub mod vmtest;

pub use vmdisk_assets::{assets, Arch};
