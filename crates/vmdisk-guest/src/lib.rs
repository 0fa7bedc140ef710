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

pub mod select;

pub use select::{candidates, device_for, select, Chosen, SelectError};
