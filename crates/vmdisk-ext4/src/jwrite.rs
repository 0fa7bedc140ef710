//! Writing one jbd2 transaction into an empty journal (the editor's crash safety).
//!
//! ```text
//!  journal block: 0 = journal superblock, s_first .. s_maxlen (less fast-commit) = the log
//!  log at s_first:  descriptor { header(magic, type 1, seq), tags: fs block + flags [+ csum],
//!                                first tag followed by the 16-byte UUID, last tag LAST_TAG,
//!                                csum v2/v3: crc32c tail }
//!                   copies of the blocks named by the tags (a copy starting with the jbd2
//!                   magic is stored with its first 4 bytes zeroed and the ESCAPE flag)
//!                   ... more descriptors and copies ...
//!                   commit { header(type 2, seq), crc32c of the block (v2/v3), time }
//!  then s_start = s_first, s_sequence = seq marks the journal as needing replay; after the
//!  checkpoint s_start = 0, s_sequence = seq + 1 marks it empty again.
//! ```

use vmdisk_block::BlockDevice;

use crate::crc::crc32c_raw;
use crate::jbd2::{JournalSuperblock, JBD2_MAGIC};
use crate::volume::Run;
use crate::{Error, Result};

const BT_DESCRIPTOR: u32 = 1;
const BT_COMMIT: u32 = 2;
const COMPAT_CHECKSUM: u32 = 0x1;
const INCOMPAT_64BIT: u32 = 0x2;
const INCOMPAT_ASYNC_COMMIT: u32 = 0x4;
const INCOMPAT_CSUM_V2: u32 = 0x8;
const INCOMPAT_CSUM_V3: u32 = 0x10;
const FLAG_ESCAPE: u32 = 0x1;
const FLAG_SAME_UUID: u32 = 0x2;
const FLAG_LAST_TAG: u32 = 0x8;

fn put_be32(b: &mut [u8], o: usize, v: u32) {
    b[o..o + 4].copy_from_slice(&v.to_be_bytes());
}
fn put_be16(b: &mut [u8], o: usize, v: u16) {
    b[o..o + 2].copy_from_slice(&v.to_be_bytes());
}
fn be32(b: &[u8], o: usize) -> u32 {
    u32::from_be_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn jerr(what: impl Into<String>) -> Error {
    Error::unsupported(what)
}

/// Recompute the journal superblock checksum (csum v2/v3 only).
pub fn seal_jsb(jsb: &mut [u8]) {
    let incompat = be32(jsb, 0x28);
    if be32(jsb, 4) == 4 && incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0 {
        put_be32(jsb, 0xfc, 0);
        let c = crc32c_raw(!0, &jsb[..1024]);
        put_be32(jsb, 0xfc, c);
    }
}

fn locate(runs: &[Run], bs: u64, jblk: u32) -> Option<u64> {
    let l = u64::from(jblk);
    let i = runs.partition_point(|r| r.lblk + r.len <= l);
    runs.get(i)
        .filter(|r| r.lblk <= l && !r.unwritten)
        .map(|r| (r.pblk + (l - r.lblk)) * bs)
}

pub struct JournalWriter {
    bs: u64,
    runs: Vec<Run>,
    jsb_raw: Vec<u8>,
    jsb: JournalSuperblock,
    seq: u32,
    seed: u32,
    now: (u32, u32),
}

type Writer<'a> = dyn FnMut(&[u8], u64) -> Result<()> + 'a;

impl JournalWriter {
    /// Open the internal journal mapped by `runs` (of `nblocks` blocks); it must be empty.
    pub fn open(
        dev: &dyn BlockDevice,
        bs: u64,
        runs: Vec<Run>,
        nblocks: u64,
        now: (u32, u32),
    ) -> Result<JournalWriter> {
        let off = locate(&runs, bs, 0)
            .ok_or_else(|| jerr("the journal inode does not map its block 0"))?;
        let mut raw = vec![0u8; bs as usize];
        dev.read_exact_at(&mut raw, off)?;
        let jsb = JournalSuperblock::parse(&raw, bs as u32, nblocks)
            .map_err(|source| Error::Journal { source })?;
        if jsb.start != 0 {
            return Err(Error::NeedsRecovery);
        }
        if jsb.compat & COMPAT_CHECKSUM != 0
            && jsb.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) == 0
        {
            return Err(jerr(
                "writing a journal with v1 (crc32) commit checksums; edit after \
                 `tune2fs -O ^journal_checksum`, or use debugfs",
            ));
        }
        if jsb.incompat & INCOMPAT_ASYNC_COMMIT != 0 {
            return Err(jerr("writing a journal with async_commit"));
        }
        Ok(JournalWriter {
            bs,
            runs,
            seed: crc32c_raw(!0, &jsb.uuid),
            seq: jsb.sequence,
            jsb,
            jsb_raw: raw,
            now,
        })
    }

    fn locate(&self, jblk: u32) -> Option<u64> {
        locate(&self.runs, self.bs, jblk)
    }

    fn csum(&self) -> bool {
        self.jsb.incompat & (INCOMPAT_CSUM_V2 | INCOMPAT_CSUM_V3) != 0
    }
    fn v3(&self) -> bool {
        self.jsb.incompat & INCOMPAT_CSUM_V3 != 0
    }
    fn is64(&self) -> bool {
        self.jsb.incompat & INCOMPAT_64BIT != 0
    }
    fn tag_bytes(&self) -> usize {
        if self.v3() {
            return 16;
        }
        let mut sz = 12;
        if self.jsb.incompat & INCOMPAT_CSUM_V2 != 0 {
            sz += 2;
        }
        if self.is64() {
            sz
        } else {
            sz - 4
        }
    }

    fn header(&self, b: &mut [u8], ty: u32) {
        put_be32(b, 0, JBD2_MAGIC);
        put_be32(b, 4, ty);
        put_be32(b, 8, self.seq);
    }

    /// Write `blocks` (fs block, content) as one transaction into the log (not yet pointed at
    /// by the journal superblock: see [`JournalWriter::mark_started`]). Returns its sequence.
    pub fn write_transaction(
        &mut self,
        blocks: &[(u64, Vec<u8>)],
        w: &mut Writer<'_>,
        dev: &std::sync::Arc<dyn BlockDevice>,
    ) -> Result<u32> {
        let bs = self.bs as usize;
        let tb = self.tag_bytes();
        let space = bs - 12 - if self.csum() { 4 } else { 0 };
        // Tags per descriptor: the first carries the UUID too.
        let per_desc = if space < tb + 16 {
            0
        } else {
            1 + (space - tb - 16) / tb
        };
        if per_desc == 0 {
            return Err(jerr("journal blocks too small for a descriptor"));
        }
        let ndesc = blocks.len().div_ceil(per_desc);
        let need = (ndesc + blocks.len() + 1) as u64;
        let room = u64::from(self.jsb.last - self.jsb.first);
        if need > room {
            return Err(Error::Limit {
                what: "journal blocks for one edit (split the edit into smaller ones)",
                needed: need,
                limit: room,
            });
        }
        let mut pos = self.jsb.first;
        let put = |this: &Self, jblk: u32, data: &[u8], w: &mut Writer<'_>| -> Result<()> {
            let off = this
                .locate(jblk)
                .ok_or_else(|| jerr(format!("journal block {jblk} is not mapped")))?;
            w(data, off)
        };
        for chunk in blocks.chunks(per_desc) {
            let mut d = vec![0u8; bs];
            self.header(&mut d, BT_DESCRIPTOR);
            let mut off = 12;
            let mut copies = Vec::with_capacity(chunk.len());
            for (i, (fsblk, data)) in chunk.iter().enumerate() {
                let mut copy = data.clone();
                let mut flags = 0u32;
                if be32(&copy, 0) == JBD2_MAGIC {
                    copy[..4].fill(0);
                    flags |= FLAG_ESCAPE;
                }
                if i > 0 {
                    flags |= FLAG_SAME_UUID;
                }
                if i + 1 == chunk.len() {
                    flags |= FLAG_LAST_TAG;
                }
                let c = crc32c_raw(crc32c_raw(self.seed, &self.seq.to_be_bytes()), &copy);
                put_be32(&mut d, off, *fsblk as u32);
                if self.v3() {
                    put_be32(&mut d, off + 4, flags);
                    put_be32(&mut d, off + 8, (*fsblk >> 32) as u32);
                    put_be32(&mut d, off + 12, c);
                } else {
                    if self.csum() {
                        put_be16(&mut d, off + 4, c as u16);
                    }
                    put_be16(&mut d, off + 6, flags as u16);
                    if self.is64() {
                        put_be32(&mut d, off + 8, (*fsblk >> 32) as u32);
                    }
                }
                off += tb;
                if i == 0 {
                    d[off..off + 16].copy_from_slice(&self.jsb.uuid);
                    off += 16;
                }
                copies.push(copy);
            }
            if self.csum() {
                let c = crc32c_raw(self.seed, &d[..bs - 4]);
                let c = crc32c_raw(c, &[0; 4]);
                put_be32(&mut d, bs - 4, c);
            }
            put(self, pos, &d, w)?;
            pos += 1;
            for c in &copies {
                put(self, pos, c, w)?;
                pos += 1;
            }
        }
        dev.flush()?;
        let mut c = vec![0u8; bs];
        self.header(&mut c, BT_COMMIT);
        put_be32(&mut c, 0x30, 0);
        put_be32(&mut c, 0x34, self.now.0);
        put_be32(&mut c, 0x38, self.now.1);
        if self.csum() {
            let s = crc32c_raw(self.seed, &c);
            put_be32(&mut c, 16, s);
        }
        put(self, pos, &c, w)?;
        dev.flush()?;
        Ok(self.seq)
    }

    /// The journal holds a complete transaction: point the journal superblock at it.
    pub fn mark_started(&mut self, w: &mut Writer<'_>) -> Result<()> {
        let mut jsb = self.jsb_raw.clone();
        put_be32(&mut jsb, 0x1c, self.jsb.first);
        put_be32(&mut jsb, 0x18, self.seq);
        seal_jsb(&mut jsb);
        let off = self
            .locate(0)
            .ok_or_else(|| jerr("the journal inode does not map its block 0"))?;
        w(&jsb, off)
    }

    /// After the checkpoint: the journal is empty again, the next transaction is seq + 1.
    pub fn mark_empty(&mut self, w: &mut Writer<'_>) -> Result<()> {
        let mut jsb = self.jsb_raw.clone();
        put_be32(&mut jsb, 0x1c, 0);
        put_be32(&mut jsb, 0x18, self.seq.wrapping_add(1));
        seal_jsb(&mut jsb);
        let off = self
            .locate(0)
            .ok_or_else(|| jerr("the journal inode does not map its block 0"))?;
        w(&jsb, off)
    }
}
