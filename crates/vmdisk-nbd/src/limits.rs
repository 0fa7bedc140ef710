//! Every limit of the server and the client in one place, each with the reason for its value.
//!
//! Untrusted sizes (option lengths, request lengths, counts) are checked against these before
//! anything is allocated; the rest bound what one connection or the whole server may hold.
//! This module depends on nothing else in the crate.

use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Negotiation

/// Option data longer than this is answered with NBD_REP_ERR_TOO_BIG and the connection is
/// closed (the longest legal option is a few 4 KiB strings).
pub const MAX_OPTION_LEN: usize = 64 * 1024;
/// Options one client may send before it must pick an export (stops endless haggling).
pub const MAX_OPTIONS: usize = 256;
/// Time a client has to finish negotiation, TLS handshake included (qemu-nbd's default
/// `--handshake-limit`). A client that has negotiated and waits for a `--shared` slot is no
/// longer timed.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Clients accepted beyond the `--shared` limit at once: negotiating, or negotiated and
/// waiting for a slot. Each costs a thread and three descriptors; past it, new clients wait
/// in the listen backlog.
pub const MAX_PENDING_CLIENTS: usize = 64;
/// Longest string (export name, query, message) the protocol allows.
pub const MAX_STRING_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Transmission

/// Longest READ or WRITE the server accepts (advertised as the maximum block size).
pub const MAX_REQUEST_LEN: usize = 32 << 20;
/// Preferred block size advertised with NBD_INFO_BLOCK_SIZE (the page size: no
/// read-modify-write below it on any backing store we serve).
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Requests one connection may have in flight; the reader stops reading when it is reached.
pub const MAX_IN_FLIGHT: usize = 16;
/// Request and reply buffers held at once, server-wide (bounds memory under any load).
pub const MAX_BUFFERED_BYTES: usize = 256 << 20;
/// Device calls running at once, server-wide (bounds blocking threads).
pub const MAX_IO_JOBS: usize = 32;
/// Bytes one BLOCK_STATUS reply describes at most (bounds the device query; the protocol
/// lets a reply cover less than was asked).
pub const MAX_BLOCK_STATUS_LEN: u64 = 1 << 30;
/// Descriptors in one BLOCK_STATUS reply at most (bounds the reply to 128 KiB).
pub const MAX_BLOCK_STATUS_DESCRIPTORS: usize = 1 << 14;
/// Input buffer per connection: a request header plus a 64 KiB WRITE payload and the next
/// header arrive in one receive.
pub const INPUT_BUFFER_LEN: usize = 128 << 10;
/// Idle read/write buffers kept per connection, in bytes (nbdcopy keeps 16 x 256 KiB in
/// flight per connection); beyond it buffers are freed.
pub const POOL_BYTES: usize = 4 << 20;
/// Buffers larger than this are never kept (rare, and would pin memory).
pub const POOL_MAX_BUFFER: usize = 1 << 20;
/// Zero runs shorter than this inside a read are sent as data: a hole chunk would save little,
/// and it bounds the chunks of one reply to about 2 * MAX_REQUEST_LEN / MIN_HOLE_LEN.
pub const MIN_HOLE_LEN: u64 = 4096;
/// Buffers handed to one vectored write at most (well below every system's IOV_MAX).
pub const MAX_IOVECS: usize = 64;

// ---------------------------------------------------------------------------------------------
// The server as a whole

/// How long a stopping server waits for connections to finish their requests.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// Pause after a failed accept (EMFILE and friends) instead of spinning on it.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------------------------------------
// The client

/// Longest option reply or reply chunk the client accepts (a read of the server's maximum
/// request length plus headers fits).
pub const MAX_REPLY_LEN: usize = MAX_REQUEST_LEN + 4096;
