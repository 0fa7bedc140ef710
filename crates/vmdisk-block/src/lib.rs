//! The block contract every vmdisk disk speaks.
//!
//! One synchronous, thread-safe trait, [`BlockDevice`], is implemented by raw files
//! ([`RawFile`]), in-memory disks ([`MemDisk`]), windows onto another device ([`Slice`]),
//! qcow2 images (in `vmdisk-qcow2`) and anything the NBD server exports. Positional IO with
//! `&self` lets rayon workers and tokio tasks share one device through an `Arc`.
//!
//! ```text
//!   caller ──read_exact_at/write_all_at/block_status──▶ dyn BlockDevice
//!                                                     ├─ RawFile   (pread/pwrite, SEEK_DATA/SEEK_HOLE)
//!                                                     ├─ MemDisk   (Vec<u8> behind a RwLock)
//!                                                     ├─ Slice     (offset window onto another device)
//!                                                     └─ Qcow2Image (vmdisk-qcow2, over a host device)
//! ```
//!
//! Errors ([`Error`]) keep the four things a user must tell apart distinct: an IO failure of
//! the host, a request out of range, a corrupt image, and a feature we do not support. Image
//! locks ([`lock`]) follow qemu's own byte-range protocol so qemu and vmdisk respect each
//! other.
//!
//! Platform calls (fallocate / F_PUNCHHOLE, OFD or POSIX locks, ...) live in [`sys`] and
//! nowhere else; `sys::force_portable` (or `VMDISK_FORCE_PORTABLE=1`) makes Linux run the
//! fallbacks macOS uses, so the tests exercise them.

pub mod cancel;
mod device;
mod error;
mod iobuf;
pub mod lock;
mod mem;
mod raw;
mod slice;
pub mod sys;
mod undo;

#[cfg(any(test, feature = "conformance"))]
pub mod conformance;

pub use cancel::{register_temp, remove_registered_temps, Cancel, RegisteredTemp};
pub use device::{check_range, is_zero, merge_extents, BlockDevice, Extent, ExtentKind};
pub use error::{Error, Result};
pub use iobuf::{IoBuf, IOBUF_ALIGN};
pub use mem::MemDisk;
pub use raw::RawFile;
pub use slice::Slice;
pub use undo::UndoFile;
