//! A guest filesystem inside an image: which partition a guest command works on (`-P`), and
//! the transaction that edits a guest safely ([`edit()`]: undo snapshot, overlay or in place;
//! byte-identical on any failure), with `passwd` as its first user.
//!
//! ```text
//!   Image (vmdisk-image) ──▶ select(-P) ──▶ Chosen { off, len, name, fs } ──▶ Slice ──▶ Ext4
//! ```
//!
//! Errors: [`SelectError`] says which selector matched nothing (and lists what the disk has)
//! or why the default policy could not choose; [`EditError`] why an edit did not happen
//! (nothing was written in every case).

#![forbid(unsafe_code)]

pub mod copyout;
pub mod edit;
pub mod fs;
pub mod ops;
pub mod passwd;
pub mod select;

pub use copyout::{copy_out, resolve_dest, CopyOutError, CopyOutOptions, CopyOutReport};
pub use edit::{edit, EditError, EditReport, EditTarget, Guest, Undo};
pub use fs::{FsError, GuestFile, GuestFs};
pub use ops::{apply_ops, parse_mode, parse_script, Op, OpsPlan, Owner};
pub use passwd::{passwd, passwd_create, PasswdAction, PasswdPlan};
pub use select::{candidates, device_for, select, Chosen, SelectError};
