//! jbd2, the ext3/ext4 journal: parse its superblock and work out, without writing anything,
//! which filesystem blocks a replay would overwrite with which journal blocks.
//!
//! ```text
//!  journal block 0: superblock (magic c03b3998, v1 or v2: block size, length, first log
//!                   block, sequence and start of the oldest live transaction, features)
//!  s_first .. s_maxlen-1 (less the fast-commit area): the circular log
//!    descriptor (type 1): header + tags { fs block, flags (escape, same-uuid, last) [, csum] }
//!        followed by one journal block per tag, holding that fs block's new content
//!    revoke (type 5):     header + count + fs block numbers (4 or 8 bytes) no longer to replay
//!    commit (type 2):     ends transaction `sequence` (crc32_be or crc32c checksums)
//! ```
//!
//! The replay follows e2fsck's (and the kernel's) recovery in three passes over the log from
//! `s_start`: SCAN finds the last complete transaction, REVOKE collects the revoke records,
//! REPLAY maps every tagged block of a complete transaction that is not revoked by the same or a
//! later transaction. The log wraps from its end back to `s_first`. A data block whose tag
//! checksum fails is skipped and later transactions still apply (as e2fsck does); a
//! transaction whose commit checksum fails ends the log (the transactions after it are
//! dropped unless the journal uses async_commit).
//!
//! IO goes through a caller's closure (journal block number -> bytes), so this module never
//! touches a device and runs on bytes in tests and fuzzers.

use crate::crc::{crc32_be, crc32c_raw};
use std::collections::{BTreeMap, HashMap};

/// jbd2 magic number (big-endian, first word of every journal metadata block).
pub const JBD2_MAGIC: u32 = 0xc03b_3998;
const BT_DESCRIPTOR: u32 = 1;
const BT_COMMIT: u32 = 2;
const BT_SB_V1: u32 = 3;
const BT_SB_V2: u32 = 4;
const BT_REVOKE: u32 = 5;

const COMPAT_CHECKSUM: u32 = 0x1;
const INCOMPAT_REVOKE: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const INCOMPAT_FAST_COMMIT: u32 = 0x20;
const KNOWN_INCOMPAT: u32 = INCOMPAT_REVOKE
    | INCOMPAT_64BIT
    | INCOMPAT_ASYNC_COMMIT
    | INCOMPAT_CSUM_V2
    | INCOMPAT_CSUM_V3
    | INCOMPAT_FAST_COMMIT;

const FLAG_ESCAPE: u16 = 0x1;
const FLAG_SAME_UUID: u16 = 0x2;
const FLAG_LAST_TAG: u16 = 0x8;

/// jbd2's checksum type for crc32c (csum v2/v3).
const CSUM_TYPE_CRC32C: u8 = 4;
/// Fast-commit blocks when the superblock says 0 (the kernel's default).
const DEFAULT_FC_BLOCKS: u32 = 256;
/// Fewest log blocks a journal may have (the kernel's JBD2_MIN_JOURNAL_BLOCKS).
const MIN_JOURNAL_BLOCKS: u32 = 1024;
/// Longest journal we accept, in blocks (mke2fs makes at most 10,240,000).
pub const MAX_JOURNAL_BLOCKS: u64 = 1 << 26;
/// Most distinct filesystem blocks one replay may map (bounds the in-memory overlay: each
/// entry is a pair of block numbers).
pub const MAX_REPLAY_BLOCKS: usize = 1 << 24;
/// Most revoke records we keep.
pub const MAX_REVOKES: usize = 1 << 24;
/// Fast-commit tag that opens a fast-commit area (EXT4_FC_TAG_HEAD).
const FC_TAG_HEAD: u16 = 0x9;

/// Why a journal cannot be replayed. Every variant names the cause, so the caller can say
/// exactly why (never just "needs recovery").
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    #[error("journal superblock: bad magic {0:#010x}")]
    BadMagic(u32),
    #[error("journal superblock: unknown block type {0}")]
    BadSuperblockType(u32),
    #[error("unsupported: journal feature {0}")]
    UnsupportedFeature(String),
    #[error("journal superblock is corrupt: {0}")]
    CorruptSuperblock(String),
    #[error("journal superblock checksum mismatch")]
    SuperblockChecksum,
    #[error("journal block {0} is outside the journal")]
    OutOfJournal(u64),
    #[error("reading journal block {block}: {why}")]
    Read { block: u64, why: String },
    #[error(
        "journal transaction {0}: commit checksum mismatch on a newer commit (corrupt journal)"
    )]
    CorruptTransaction(u32),
    #[error("journal revoke block of transaction {0} is corrupt")]
    CorruptRevoke(u32),
    #[error("journal descriptor block of transaction {0} failed its checksum during replay")]
    CorruptDescriptor(u32),
    #[error("unsupported: fast_commit journal replay (the journal holds fast-commit blocks of transaction {0})")]
    FastCommit(u32),
    #[error("limit exceeded: {what} (limit {limit})")]
    Limit { what: &'static str, limit: u64 },
}

fn be16(b: &[u8], o: usize) -> u16 {
    u16::from_be_bytes([b[o], b[o + 1]])
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}
fn be64(b: &[u8], o: usize) -> u64 {
    (u64::from(be32(b, o)) << 32) | u64::from(be32(b, o + 4))
}

/// A validated journal superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalSuperblock {
    pub version: u8,
    pub block_size: u32,
    pub maxlen: u32,
    pub first: u32,
    pub sequence: u32,
    /// First block of the oldest live transaction; 0 when the journal is empty.
    pub start: u32,
    pub errno: i32,
    pub compat: u32,
    pub incompat: u32,
    pub uuid: [u8; 16],
    /// End of the circular log (exclusive): `maxlen` less the fast-commit area.
    pub last: u32,
    /// First block of the fast-commit area (== `last`), when fast_commit is on.
    pub fc_first: Option<u32>,
    csum_seed: u32,
}

impl JournalSuperblock {
    /// Parse the first `block_size` bytes of the journal; `max_blocks` is how many blocks the
    /// journal inode or device really has.
    pub fn parse(raw: &[u8], fs_block_size: u32, max_blocks: u64) -> Result<Self, JournalError> {
        if raw.len() < 1024 {
            return Err(JournalError::CorruptSuperblock(
                "shorter than 1024 bytes".into(),
            ));
        }
        let magic = be32(raw, 0);
        if magic != JBD2_MAGIC {
            return Err(JournalError::BadMagic(magic));
        }
        let bt = be32(raw, 4);
        let version = match bt {
            BT_SB_V1 => 1,
            BT_SB_V2 => 2,
            other => return Err(JournalError::BadSuperblockType(other)),
        };
        let (compat, incompat, ro) = if version == 2 {
            (be32(raw, 0x24), be32(raw, 0x28), be32(raw, 0x2c))
        } else {
            (0, 0, 0)
        };
        if incompat & !KNOWN_INCOMPAT != 0 {
            return Err(JournalError::UnsupportedFeature(format!(
                "incompat {:#x}",
                incompat & !KNOWN_INCOMPAT
            )));
        }
        if ro != 0 {
            return Err(JournalError::UnsupportedFeature(format!(
                "ro_compat {ro:#x}"
            )));
        }
        let v2 = incompat & INCOMPAT_CSUM_V2 != 0;
        let v3 = incompat & INCOMPAT_CSUM_V3 != 0;
        if v2 && v3 {
            return Err(JournalError::CorruptSuperblock(
                "both csum v2 and v3".into(),
            ));
        }
        if (v2 || v3) && compat & COMPAT_CHECKSUM != 0 {
            return Err(JournalError::CorruptSuperblock(
                "both v1 commit checksums and csum v2/v3".into(),
            ));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&raw[0x30..0x40]);
        if v2 || v3 {
            if raw[0x50] != CSUM_TYPE_CRC32C {
                return Err(JournalError::CorruptSuperblock(format!(
                    "checksum type {} is not crc32c",
                    raw[0x50]
                )));
            }
            let mut c = crc32c_raw(!0, &raw[..0xfc]);
            c = crc32c_raw(c, &[0; 4]);
            c = crc32c_raw(c, &raw[0x100..1024]);
            if c != be32(raw, 0xfc) {
                return Err(JournalError::SuperblockChecksum);
            }
        }
        let block_size = be32(raw, 0xc);
        if block_size != fs_block_size {
            return Err(JournalError::CorruptSuperblock(format!(
                "block size {block_size} differs from the filesystem's {fs_block_size}"
            )));
        }
        let maxlen = be32(raw, 0x10);
        if u64::from(maxlen) > max_blocks.min(MAX_JOURNAL_BLOCKS) {
            return Err(JournalError::CorruptSuperblock(format!(
                "s_maxlen {maxlen} exceeds the journal's {max_blocks} blocks"
            )));
        }
        let first = be32(raw, 0x14);
        if first == 0 || first >= maxlen {
            return Err(JournalError::CorruptSuperblock(format!(
                "s_first {first} with s_maxlen {maxlen}"
            )));
        }
        let (last, fc_first) = if incompat & INCOMPAT_FAST_COMMIT != 0 {
            let n = match be32(raw, 0x54) {
                0 => DEFAULT_FC_BLOCKS,
                n => n,
            };
            if maxlen.saturating_sub(n) < MIN_JOURNAL_BLOCKS || maxlen - n <= first {
                return Err(JournalError::CorruptSuperblock(format!(
                    "{n} fast-commit blocks leave too small a log of {maxlen} blocks"
                )));
            }
            // The kernel's j_fc_first is j_last + 1.
            (maxlen - n, Some(maxlen - n + 1))
        } else {
            (maxlen, None)
        };
        let start = be32(raw, 0x1c);
        if start != 0 && (start < first || start >= last) {
            return Err(JournalError::CorruptSuperblock(format!(
                "s_start {start} outside the log {first}..{last}"
            )));
        }
        Ok(JournalSuperblock {
            version,
            block_size,
            maxlen,
            first,
            sequence: be32(raw, 0x18),
            start,
            errno: be32(raw, 0x20) as i32,
            compat,
            incompat,
            uuid,
            last,
            fc_first,
            csum_seed: crc32c_raw(!0, &uuid),
        })
    }

    fn csum_v2or3(&self) -> bool {
        self.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0
    }
    fn csum_v3(&self) -> bool {
        self.incompat & INCOMPAT_CSUM_V3 != 0
    }
    fn is64(&self) -> bool {
        self.incompat & INCOMPAT_64BIT != 0
    }

    /// Bytes per descriptor tag (jbd2's `journal_tag_bytes`).
    fn tag_bytes(&self) -> usize {
        if self.csum_v3() {
            return 16;
        }
        let mut sz = 12;
        if self.incompat & INCOMPAT_CSUM_V2 != 0 {
            sz += 2;
        }
        if self.is64() {
            sz
        } else {
            sz - 4
        }
    }

    /// Names of the journal's features, for messages and `inspect`.
    pub fn feature_names(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        if self.compat & COMPAT_CHECKSUM != 0 {
            v.push("journal_checksum_v1");
        }
        for (bit, name) in [
            (INCOMPAT_REVOKE, "journal_incompat_revoke"),
            (INCOMPAT_64BIT, "journal_64bit"),
            (INCOMPAT_ASYNC_COMMIT, "journal_async_commit"),
            (INCOMPAT_CSUM_V2, "journal_checksum_v2"),
            (INCOMPAT_CSUM_V3, "journal_checksum_v3"),
            (INCOMPAT_FAST_COMMIT, "fast_commit"),
        ] {
            if self.incompat & bit != 0 {
                v.push(name);
            }
        }
        v
    }
}

/// Where a replayed filesystem block's new content is: journal block `jblock`, whose first
/// four bytes are the jbd2 magic again when `escaped`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Replayed {
    pub jblock: u32,
    pub escaped: bool,
}

/// The outcome of planning a replay.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReplayPlan {
    /// Filesystem block -> its content in the journal (the newest complete transaction wins).
    pub blocks: BTreeMap<u64, Replayed>,
    /// Transactions `first_transaction..end_transaction` are complete and replayed.
    pub first_transaction: u32,
    pub end_transaction: u32,
    pub revoked_hits: u64,
    /// Data blocks skipped because their tag checksum failed (e2fsck reports and skips them).
    pub bad_block_checksums: u64,
}

/// Read one journal block (journal-relative block number) into a buffer of `block_size`.
pub type ReadJournalBlock<'a> = dyn FnMut(u32) -> Result<Vec<u8>, String> + 'a;

#[derive(PartialEq, Eq, Clone, Copy)]
enum Pass {
    Scan,
    Revoke,
    Replay,
}

struct Ctx<'s, 'r, 'a> {
    sb: &'s JournalSuperblock,
    read: &'r mut ReadJournalBlock<'a>,
    end_transaction: Option<u32>,
    revokes: HashMap<u64, u32>,
    plan: ReplayPlan,
}

fn tid_gt(x: u32, y: u32) -> bool {
    (x.wrapping_sub(y) as i32) > 0
}
fn tid_geq(x: u32, y: u32) -> bool {
    (x.wrapping_sub(y) as i32) >= 0
}

impl Ctx<'_, '_, '_> {
    fn jread(&mut self, blk: u32) -> Result<Vec<u8>, JournalError> {
        if blk >= self.sb.maxlen {
            return Err(JournalError::OutOfJournal(u64::from(blk)));
        }
        let b = (self.read)(blk).map_err(|why| JournalError::Read {
            block: u64::from(blk),
            why,
        })?;
        if b.len() != self.sb.block_size as usize {
            return Err(JournalError::Read {
                block: u64::from(blk),
                why: format!("got {} bytes", b.len()),
            });
        }
        Ok(b)
    }

    fn wrap(&self, b: u32) -> u32 {
        if b >= self.sb.last {
            b - (self.sb.last - self.sb.first)
        } else {
            b
        }
    }

    fn block_tail_ok(&self, b: &[u8]) -> bool {
        if !self.sb.csum_v2or3() {
            return true;
        }
        let n = b.len();
        let mut c = crc32c_raw(self.sb.csum_seed, &b[..n - 4]);
        c = crc32c_raw(c, &[0; 4]);
        c == be32(b, n - 4)
    }

    fn commit_csum_ok(&self, b: &[u8]) -> bool {
        if !self.sb.csum_v2or3() {
            return true;
        }
        let mut c = crc32c_raw(self.sb.csum_seed, &b[..16]);
        c = crc32c_raw(c, &[0; 4]);
        c = crc32c_raw(c, &b[20..]);
        c == be32(b, 16)
    }

    /// (fs block, flags, tag checksum) of every tag in a descriptor block.
    fn tags(&self, b: &[u8]) -> Vec<(u64, u16, u32)> {
        let tb = self.sb.tag_bytes();
        let size = b.len() - if self.sb.csum_v2or3() { 4 } else { 0 };
        let mut off = 12;
        let mut v = Vec::new();
        while off + tb <= size {
            let flags = be16(b, off + 6);
            let mut blk = u64::from(be32(b, off));
            if self.sb.is64() {
                blk |= u64::from(be32(b, off + 8)) << 32;
            }
            let csum = if self.sb.csum_v3() {
                be32(b, off + 12)
            } else {
                u32::from(be16(b, off + 4))
            };
            v.push((blk, flags, csum));
            off += tb;
            if flags & FLAG_SAME_UUID == 0 {
                off += 16;
            }
            if flags & FLAG_LAST_TAG != 0 {
                break;
            }
        }
        v
    }

    fn tag_csum_ok(&self, want: u32, data: &[u8], seq: u32) -> bool {
        if !self.sb.csum_v2or3() {
            return true;
        }
        let c = crc32c_raw(self.sb.csum_seed, &seq.to_be_bytes());
        let c = crc32c_raw(c, data);
        if self.sb.csum_v3() {
            c == want
        } else {
            (c & 0xffff) == want
        }
    }

    fn revoke_records(&mut self, b: &[u8], seq: u32) -> Result<(), JournalError> {
        let csum = if self.sb.csum_v2or3() { 4 } else { 0 };
        let rcount = be32(b, 12) as usize;
        if rcount > b.len() - csum {
            return Err(JournalError::CorruptRevoke(seq));
        }
        let rec = if self.sb.is64() { 8 } else { 4 };
        let mut off = 16;
        while off + rec <= rcount {
            let blk = if rec == 4 {
                u64::from(be32(b, off))
            } else {
                be64(b, off)
            };
            off += rec;
            if self.revokes.len() >= MAX_REVOKES && !self.revokes.contains_key(&blk) {
                return Err(JournalError::Limit {
                    what: "journal revoke records",
                    limit: MAX_REVOKES as u64,
                });
            }
            let e = self.revokes.entry(blk).or_insert(seq);
            if tid_gt(seq, *e) {
                *e = seq;
            }
        }
        Ok(())
    }

    fn revoked(&self, blk: u64, seq: u32) -> bool {
        self.revokes.get(&blk).is_some_and(|&r| !tid_gt(seq, r))
    }

    /// One recovery pass (jbd2's `do_one_pass`).
    fn pass(&mut self, pass: Pass) -> Result<u32, JournalError> {
        let sb = self.sb;
        let mut next_id = sb.sequence;
        let mut next_block = sb.start;
        let mut crc32_sum: u32 = !0;
        let mut need_check_commit_time = false;
        let mut last_commit_time: u64 = 0;
        // A valid log never visits more blocks than it has; a crafted one could cycle.
        let mut budget = u64::from(sb.last - sb.first) + 1;
        let has_v1_checksum = sb.compat & COMPAT_CHECKSUM != 0;
        let mut step = |n: u64| -> bool {
            if budget < n {
                return false;
            }
            budget -= n;
            true
        };
        loop {
            if pass != Pass::Scan {
                if let Some(end) = self.end_transaction {
                    if tid_geq(next_id, end) {
                        break;
                    }
                }
            }
            if !step(1) {
                break;
            }
            let b = self.jread(next_block)?;
            next_block = self.wrap(next_block + 1);
            if be32(&b, 0) != JBD2_MAGIC {
                break;
            }
            let btype = be32(&b, 4);
            let seq = be32(&b, 8);
            if seq != next_id {
                break;
            }
            match btype {
                BT_DESCRIPTOR => {
                    if sb.csum_v2or3() && !self.block_tail_ok(&b) {
                        if pass != Pass::Scan {
                            return Err(JournalError::CorruptDescriptor(seq));
                        }
                        need_check_commit_time = true;
                    }
                    let tags = self.tags(&b);
                    if !step(tags.len() as u64) {
                        break;
                    }
                    if pass != Pass::Replay {
                        if pass == Pass::Scan
                            && has_v1_checksum
                            && !need_check_commit_time
                            && self.end_transaction.is_none()
                        {
                            crc32_sum = crc32_be(crc32_sum, &b);
                            let mut ok = true;
                            for _ in 0..tags.len() {
                                let io = next_block;
                                next_block = self.wrap(next_block + 1);
                                match self.jread(io) {
                                    Ok(d) => crc32_sum = crc32_be(crc32_sum, &d),
                                    Err(_) => {
                                        ok = false;
                                        break;
                                    }
                                }
                            }
                            if !ok {
                                break;
                            }
                            continue;
                        }
                        next_block = self.wrap(next_block + tags.len() as u32);
                        continue;
                    }
                    for (blk, flags, csum) in tags {
                        let io = next_block;
                        next_block = self.wrap(next_block + 1);
                        // An unreadable log block is skipped; recovery reports it at the end.
                        let Ok(data) = self.jread(io) else {
                            self.plan.bad_block_checksums += 1;
                            continue;
                        };
                        if self.revoked(blk, next_id) {
                            self.plan.revoked_hits += 1;
                            continue;
                        }
                        if !self.tag_csum_ok(csum, &data, seq) {
                            self.plan.bad_block_checksums += 1;
                            continue;
                        }
                        if self.plan.blocks.len() >= MAX_REPLAY_BLOCKS
                            && !self.plan.blocks.contains_key(&blk)
                        {
                            return Err(JournalError::Limit {
                                what: "blocks replayed from the journal",
                                limit: MAX_REPLAY_BLOCKS as u64,
                            });
                        }
                        self.plan.blocks.insert(
                            blk,
                            Replayed {
                                jblock: io,
                                escaped: flags & FLAG_ESCAPE != 0,
                            },
                        );
                    }
                }
                BT_COMMIT => {
                    let commit_time = be64(&b, 0x30);
                    if need_check_commit_time {
                        if commit_time >= last_commit_time {
                            return Err(JournalError::CorruptTransaction(next_id));
                        }
                        // Stale blocks of an older use of the journal: the log ends here.
                        break;
                    }
                    let mut bad = false;
                    if pass == Pass::Scan && has_v1_checksum {
                        if self.end_transaction.is_some() {
                            break;
                        }
                        let found = be32(&b, 16);
                        let (ty, sz) = (b[12], b[13]);
                        let ok = (crc32_sum == found && ty == 1 && sz == 4)
                            || (ty == 0 && sz == 0 && found == 0);
                        bad = !ok;
                        crc32_sum = !0;
                    }
                    if pass == Pass::Scan && !bad && !self.commit_csum_ok(&b) {
                        bad = true;
                    }
                    if bad {
                        if commit_time < last_commit_time {
                            break;
                        }
                        self.end_transaction = Some(next_id);
                        if sb.incompat & INCOMPAT_ASYNC_COMMIT == 0 {
                            break;
                        }
                    }
                    if pass == Pass::Scan {
                        last_commit_time = commit_time;
                    }
                    next_id = next_id.wrapping_add(1);
                }
                BT_REVOKE => {
                    if pass == Pass::Scan && !self.block_tail_ok(&b) {
                        need_check_commit_time = true;
                    }
                    if pass == Pass::Revoke {
                        self.revoke_records(&b, next_id)?;
                    }
                }
                _ => break,
            }
        }
        Ok(next_id)
    }
}

/// Plan the replay of the journal described by `sb`, reading its blocks through `read`.
///
/// An empty journal (`s_start == 0`) yields an empty plan. With fast_commit, a fast-commit
/// area that continues the last transaction is refused (its replay is not implemented).
pub fn plan_replay(
    sb: &JournalSuperblock,
    read: &mut ReadJournalBlock<'_>,
) -> Result<ReplayPlan, JournalError> {
    let mut ctx = Ctx {
        sb,
        read,
        end_transaction: None,
        revokes: HashMap::new(),
        plan: ReplayPlan {
            first_transaction: sb.sequence,
            end_transaction: sb.sequence,
            ..ReplayPlan::default()
        },
    };
    if sb.start == 0 {
        return Ok(ctx.plan);
    }
    let end = ctx.pass(Pass::Scan)?;
    let end = *ctx.end_transaction.get_or_insert(end);
    ctx.pass(Pass::Revoke)?;
    ctx.pass(Pass::Replay)?;
    if let Some(fc) = sb.fc_first.filter(|&f| f < sb.maxlen) {
        let b = ctx.jread(fc)?;
        // A fast-commit area starts with a HEAD tag naming the transaction it continues.
        let tag = u16::from_le_bytes([b[0], b[1]]);
        let tid = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
        if tag == FC_TAG_HEAD && tid == end {
            return Err(JournalError::FastCommit(end));
        }
    }
    ctx.plan.end_transaction = end;
    Ok(ctx.plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BS: usize = 1024;

    fn put_be32(b: &mut [u8], o: usize, v: u32) {
        b[o..o + 4].copy_from_slice(&v.to_be_bytes());
    }

    fn header(b: &mut [u8], ty: u32, seq: u32) {
        put_be32(b, 0, JBD2_MAGIC);
        put_be32(b, 4, ty);
        put_be32(b, 8, seq);
    }

    /// A v2 journal of `len` blocks, 32-bit, no checksums, with revoke.
    fn journal(len: u32, start: u32, seq: u32) -> Vec<Vec<u8>> {
        let mut j = vec![vec![0u8; BS]; len as usize];
        header(&mut j[0], BT_SB_V2, 0);
        put_be32(&mut j[0], 0xc, BS as u32);
        put_be32(&mut j[0], 0x10, len);
        put_be32(&mut j[0], 0x14, 1);
        put_be32(&mut j[0], 0x18, seq);
        put_be32(&mut j[0], 0x1c, start);
        put_be32(&mut j[0], 0x28, INCOMPAT_REVOKE);
        j
    }

    fn descriptor(j: &mut [Vec<u8>], at: u32, seq: u32, blocks: &[u32]) {
        let b = &mut j[at as usize];
        header(b, BT_DESCRIPTOR, seq);
        let mut off = 12;
        for (i, &blk) in blocks.iter().enumerate() {
            put_be32(b, off, blk);
            let mut flags = if i > 0 { FLAG_SAME_UUID } else { 0 };
            if i + 1 == blocks.len() {
                flags |= FLAG_LAST_TAG;
            }
            b[off + 6..off + 8].copy_from_slice(&flags.to_be_bytes());
            off += 8 + if i == 0 { 16 } else { 0 };
        }
    }

    fn plan(j: &[Vec<u8>]) -> Result<ReplayPlan, JournalError> {
        let sb = JournalSuperblock::parse(&j[0], BS as u32, j.len() as u64)?;
        let mut read = |b: u32| Ok(j[b as usize].clone());
        plan_replay(&sb, &mut read)
    }

    #[test]
    fn wrapped_log_replays_newest_and_honours_revokes() {
        // Log of blocks 1..8; transaction 7 starts at block 6 and wraps to block 1.
        let mut j = journal(8, 6, 7);
        descriptor(&mut j, 6, 7, &[100, 101]); // data at 7, then wrap: 1
        header(&mut j[2], BT_COMMIT, 7);
        descriptor(&mut j, 3, 8, &[100]); // data at 4
        header(&mut j[5], BT_REVOKE, 8);
        put_be32(&mut j[5], 12, 20);
        put_be32(&mut j[5], 16, 101);
        // Block 6 is the next header position after 5: transaction 8's commit would be at 6,
        // but 6 holds transaction 7's descriptor, so 8 is incomplete and ignored.
        let p = plan(&j).expect("plan");
        assert_eq!(p.end_transaction, 8);
        assert_eq!(p.blocks[&100].jblock, 7);
        assert_eq!(p.blocks[&101].jblock, 1);
        // Now complete transaction 8 by pointing the log end at a commit.
        let mut j = journal(9, 6, 7);
        descriptor(&mut j, 6, 7, &[100, 101]);
        // data 7, 8, commit wraps to 1
        header(&mut j[1], BT_COMMIT, 7);
        descriptor(&mut j, 2, 8, &[100]);
        header(&mut j[4], BT_REVOKE, 8);
        put_be32(&mut j[4], 12, 20);
        put_be32(&mut j[4], 16, 101);
        header(&mut j[5], BT_COMMIT, 8);
        let p = plan(&j).expect("plan");
        assert_eq!(p.end_transaction, 9);
        assert_eq!(p.blocks[&100].jblock, 3);
        assert!(
            !p.blocks.contains_key(&101),
            "revoked by a later transaction"
        );
        assert_eq!(p.revoked_hits, 1);
    }

    #[test]
    fn empty_journal_plans_nothing() {
        let j = journal(8, 0, 3);
        assert!(plan(&j).expect("plan").blocks.is_empty());
    }

    #[test]
    fn hostile_superblocks_are_errors_not_panics() {
        let mut j = journal(8, 6, 7);
        put_be32(&mut j[0], 0x14, 0);
        assert!(plan(&j).is_err());
        let mut j = journal(8, 6, 7);
        put_be32(&mut j[0], 0x10, 1 << 30);
        assert!(plan(&j).is_err());
        let mut j = journal(8, 6, 7);
        put_be32(&mut j[0], 0x28, 0x8000);
        assert!(matches!(plan(&j), Err(JournalError::UnsupportedFeature(_))));
    }

    #[test]
    fn cyclic_descriptors_end() {
        // Every block a descriptor of the same transaction with no tags reaching a commit.
        let mut j = journal(8, 1, 1);
        for b in 1..8 {
            descriptor(&mut j, b, 1, &[]);
            header(&mut j[b as usize], BT_DESCRIPTOR, 1);
        }
        let p = plan(&j).expect("plan");
        assert!(p.blocks.is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        #[test]
        fn arbitrary_journals_never_panic(
            blocks in proptest::collection::vec(proptest::collection::vec(0u8..=255, 64), 8),
            picks in proptest::collection::vec((0usize..8, 0usize..64, 0u8..=255), 0..64),
            start in 0u32..10, seq in 0u32..4, incompat in 0u32..64)
        {
            let mut j = journal(8, start.clamp(1, 7), seq);
            put_be32(&mut j[0], 0x28, incompat);
            for (i, b) in blocks.iter().enumerate().skip(1) {
                j[i][..64].copy_from_slice(b);
                if i % 2 == 1 {
                    header(&mut j[i], 1 + (b[0] as u32 % 5), seq + (b[1] as u32 % 2));
                }
            }
            for (blk, off, v) in picks {
                j[blk][off] = v;
            }
            let _ = plan(&j);
        }
    }
}
