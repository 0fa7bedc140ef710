//! Guest assets for the VM harness: everything that turns pinned Debian packages into the
//! kernel, initramfs and shared store a test VM boots, without root, dpkg or a network beyond
//! the package downloads.
//!
//! [`assets`] (the lock file `testvms/assets.lock`, the download cache, relocking), [`deb`]
//! (unpacking .deb files), [`kernel`] (bootable kernel images, module load order), [`elf`]
//! (interpreters, `DT_NEEDED`, library closures), [`cpio`] (initramfs archives) and
//! [`assemble`] (the recipe: stage scripts, module groups, applets; built once per recipe into
//! the cache). Running a guest is the business of `vmdisk-vm`.
//!
//! Errors are `anyhow` with context naming the package, file and the way out (relock, set
//! `VMDISK_DEB_DIR`, fetch first): this is build tooling for the harness, whose callers report
//! errors rather than match on them (ARCHITECTURE.md, "vmdisk-vm returns anyhow errors").

#![forbid(unsafe_code)]

mod arch;
pub mod assemble;
pub mod assets;
pub mod cpio;
pub mod deb;
pub mod elf;
pub mod kernel;

pub use arch::Arch;
pub use assemble::{prepare_assets, GuestAssets};
