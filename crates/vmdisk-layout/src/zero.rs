//! The one IO helper every writer shares: make a byte range of a device read as zeros.

use vmdisk_block::{BlockDevice, ExtentKind};

use crate::error::Result;

/// Make `[off, off+len)` of `dev` read as zeros, writing only where it holds data.
pub(crate) fn zero_range(dev: &dyn BlockDevice, off: u64, len: u64) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    for e in dev.block_status(off, len)? {
        if e.kind == ExtentKind::Data {
            dev.write_zeroes(e.off, e.len, true)?;
        }
    }
    Ok(())
}
