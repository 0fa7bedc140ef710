//! The qcow2 engine, as this crate uses it.
pub use vmdisk_qcow2::*;
