//! What any Unix can do: the fallbacks (see the table in `sys`). On Linux and macOS these
//! run when the portable paths are forced, elsewhere always.

use std::fs::File;
use std::io;
use std::ops::Range;

use super::unsupported;

/// Other Unixes: no OFD commands; `ofd_locks_work` is false there, so these are never used.
#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
pub use libc::{F_GETLK as F_OFD_GETLK, F_SETLK as F_OFD_SETLK};

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
pub fn ofd_locks_work() -> bool {
    false
}

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
pub fn reopen(_f: &File) -> io::Result<File> {
    Err(unsupported("reopening a descriptor"))
}

#[cfg(not(any(target_os = "linux", target_vendor = "apple")))]
pub fn start_writeback(_f: &File) {}

pub fn punch_hole(_f: &File, _off: u64, _len: u64) -> io::Result<Range<u64>> {
    Err(unsupported("punching holes"))
}

pub fn zero_range(_f: &File, _off: u64, _len: u64) -> io::Result<()> {
    Err(unsupported("zeroing a range without writing"))
}

pub fn grow_allocated(_f: &File, _old_len: u64, _new_len: u64) -> io::Result<()> {
    Err(unsupported("preallocating"))
}
