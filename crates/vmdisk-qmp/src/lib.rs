//! QMP, qemu's JSON control protocol, and what vmdisk does with it.
//!
//! - [`Qmp`] (module `client`): a small synchronous client. One line of JSON per message;
//!   `{"QMP": ...}` greeting, then `qmp_capabilities`, then commands `{"execute", "arguments",
//!   "id"}` answered by `{"return"|"error", "id"}`, with `{"event", "data", "timestamp"}`
//!   interleaved at any time. Every read has a deadline and a size limit.
//! - [`live_copy`]: a consistent copy of a running VM's disk through qemu's backup job
//!   (`vmdisk copy --qmp`), undone completely on failure or cancellation.
//!
//! Errors: [`Error`] for the protocol (connecting, sending, reading, a command's QMP error, a
//! timeout), [`LiveCopyError`] for the copy's steps (finding the node, creating the copy, the
//! job, cleaning up). Both are `thiserror` enums whose variants name the failed step.
//!
//! No async runtime: a QMP conversation is strictly request/answer plus events, and the
//! callers (the CLI, the VM harness) are synchronous.

#![forbid(unsafe_code)]

mod client;
#[cfg(test)]
mod fake;
pub mod live_copy;

pub use client::{Error, Qmp, QmpEvent, Result, DEFAULT_COMMAND_TIMEOUT, MAX_MESSAGE_BYTES};
pub use live_copy::{
    live_copy, Aborted, LiveCopyError, LiveCopyOptions, LiveCopyReport, Node, Sync,
};
