//! `-P PART`: the policy lives in `vmdisk_guest::select`; this re-export keeps the CLI's callers.

pub use vmdisk_guest::select;
