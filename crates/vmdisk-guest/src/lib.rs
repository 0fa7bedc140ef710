//! A guest filesystem inside an image: which partition a guest command works on (`-P`), and
//! (as the editor grows) the transactions that edit a guest safely.
//!
//! ```text
//!   Image (vmdisk-image) ──▶ select(-P) ──▶ Chosen { off, len, name, fs } ──▶ Slice ──▶ Ext4
//! ```
//!
//! Errors: [`SelectError`] says which selector matched nothing (and lists what the disk has)
//! or why the default policy could not choose; block errors pass through with their taxonomy.

#![forbid(unsafe_code)]

pub mod copyout;
pub mod fs;
pub mod select;

pub use copyout::{copy_out, resolve_dest, CopyOutError, CopyOutOptions, CopyOutReport};
pub use fs::{FsError, GuestFile, GuestFs};
pub use select::{candidates, device_for, select, Chosen, SelectError};
