//! READ replies in structured mode: ranges the device reports as zero come back as
//! NBD_REPLY_TYPE_OFFSET_HOLE chunks (right offset and length, data chunks byte-exact, no
//! overlap, DONE on the last chunk only), NBD_CMD_FLAG_DF forces one OFFSET_DATA chunk with the
//! zeros present, and simple replies still carry every byte. Checked with a raw client that
//! sees every chunk, and through the sync client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::{pattern, persistent, TestServer};
use vmdisk_block::MemDisk;
use vmdisk_nbd::client::ConnectOptions;
use vmdisk_nbd::proto::*;

const KIB: u64 = 1024;
const DISK: u64 = 1024 * KIB;

/// Data at [0, 64K) and [192K, 256K), zeros everywhere else.
fn disk_bytes() -> Vec<u8> {
    let mut d = vec![0u8; DISK as usize];
    d[..64 * 1024].copy_from_slice(&pattern(64 * 1024, 3));
    d[192 * 1024..256 * 1024].copy_from_slice(&pattern(64 * 1024, 5));
    d
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Chunk {
    Data { off: u64, data: Vec<u8> },
    Hole { off: u64, len: u32 },
    None,
    Error { errno: u32 },
}

/// A raw client that negotiated structured replies and reports every chunk it gets.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let mut s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; GREETING_LEN];
        s.read_exact(&mut g).unwrap();
        s.write_all(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes())
            .unwrap();
        let mut r = Raw { s };
        assert_eq!(r.option(OPT_STRUCTURED_REPLY, &[]), REP_ACK);
        let go = encode_info_request(&InfoRequest {
            name: String::new(),
            infos: vec![],
        });
        // REP_INFO replies, then the ACK.
        let mut rep = r.option(OPT_GO, &go);
        while rep != REP_ACK {
            assert_eq!(rep, REP_INFO);
            rep = r.option_reply();
        }
        r
    }

    fn option(&mut self, option: u32, data: &[u8]) -> u32 {
        let h = encode_option_header(OptionHeader {
            option,
            len: data.len() as u32,
        });
        self.s.write_all(&h).unwrap();
        self.s.write_all(data).unwrap();
        self.option_reply()
    }

    fn option_reply(&mut self) -> u32 {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = decode_option_reply_header(&h).expect("option reply magic");
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d).unwrap();
        h.reply
    }

    fn send_read(&mut self, cookie: u64, flags: u16, off: u64, len: u32) {
        let req = Request {
            flags,
            cmd: CMD_READ,
            cookie,
            off,
            len,
        };
        self.s.write_all(&encode_request(&req)).unwrap();
    }

    /// One chunk: (cookie, DONE flag, chunk).
    fn chunk(&mut self) -> (u64, bool, Chunk) {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        let Some(ReplyHeader::Chunk {
            flags,
            kind,
            cookie,
        }) = decode_reply_start(h[..16].try_into().unwrap())
        else {
            panic!("not a structured reply chunk: {h:02x?}");
        };
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        let mut p = vec![0u8; len];
        self.s.read_exact(&mut p).unwrap();
        let off = || u64::from_be_bytes(p[..8].try_into().unwrap());
        let c = match kind {
            REPLY_TYPE_OFFSET_DATA => Chunk::Data {
                off: off(),
                data: p[8..].to_vec(),
            },
            REPLY_TYPE_OFFSET_HOLE => {
                assert_eq!(len, 12, "hole chunk length");
                Chunk::Hole {
                    off: off(),
                    len: u32::from_be_bytes(p[8..12].try_into().unwrap()),
                }
            }
            REPLY_TYPE_NONE => Chunk::None,
            k if k & (1 << 15) != 0 => Chunk::Error {
                errno: u32::from_be_bytes(p[..4].try_into().unwrap()),
            },
            k => panic!("unexpected chunk type {k}"),
        };
        (cookie, flags & REPLY_FLAG_DONE != 0, c)
    }

    /// Every chunk of the reply to `cookie` (the only request in flight).
    fn reply(&mut self, cookie: u64) -> Vec<Chunk> {
        let mut out = Vec::new();
        loop {
            let (c, done, chunk) = self.chunk();
            assert_eq!(c, cookie);
            out.push(chunk);
            if done {
                return out;
            }
        }
    }

    fn read(&mut self, cookie: u64, flags: u16, off: u64, len: u32) -> Vec<Chunk> {
        self.send_read(cookie, flags, off, len);
        self.reply(cookie)
    }
}

/// Rebuild the read from its content chunks, checking they lie inside the request, never
/// overlap and cover all of it.
fn assemble(chunks: &[Chunk], off: u64, len: u64) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let mut seen = vec![false; len as usize];
    for c in chunks {
        let (at, n) = match c {
            Chunk::Data { off: o, data } => (*o, data.len() as u64),
            Chunk::Hole { off: o, len: l } => (*o, *l as u64),
            Chunk::None => continue,
            Chunk::Error { errno } => panic!("error chunk {errno}"),
        };
        assert!(n > 0, "empty content chunk");
        assert!(
            at >= off && at + n <= off + len,
            "chunk outside the request"
        );
        let r = (at - off) as usize..(at - off + n) as usize;
        assert!(seen[r.clone()].iter().all(|s| !s), "overlapping chunks");
        seen[r.clone()].fill(true);
        if let Chunk::Data { data, .. } = c {
            out[r].copy_from_slice(data);
        }
    }
    assert!(seen.iter().all(|&s| s), "chunks do not cover the request");
    out
}

#[test]
fn zero_ranges_come_back_as_hole_chunks() {
    let want = disk_bytes();
    let srv = TestServer::start(Arc::new(MemDisk::from_vec(want.clone())), persistent(2));
    let mut r = Raw::connect(&srv.sock);

    // Data, a 128 KiB hole, data.
    let (off, len) = (32 * KIB, 192 * KIB);
    let chunks = r.read(1, 0, off, len as u32);
    assert_eq!(
        chunks,
        vec![
            Chunk::Data {
                off: 32 * KIB,
                data: want[32 * 1024..64 * 1024].to_vec()
            },
            Chunk::Hole {
                off: 64 * KIB,
                len: 128 * 1024
            },
            Chunk::Data {
                off: 192 * KIB,
                data: want[192 * 1024..224 * 1024].to_vec()
            },
        ]
    );
    assert_eq!(
        assemble(&chunks, off, len),
        want[off as usize..(off + len) as usize]
    );

    // All inside a hole, however small: one hole chunk, DONE.
    assert_eq!(
        r.read(2, 0, 300 * KIB + 512, 1000),
        vec![Chunk::Hole {
            off: 300 * KIB + 512,
            len: 1000
        }]
    );
    // The tail of the disk is one hole.
    assert_eq!(
        r.read(3, 0, 256 * KIB, (DISK - 256 * KIB) as u32),
        vec![Chunk::Hole {
            off: 256 * KIB,
            len: (DISK - 256 * KIB) as u32
        }]
    );
    // All data: one data chunk.
    assert_eq!(
        r.read(4, 0, 0, 4096),
        vec![Chunk::Data {
            off: 0,
            data: want[..4096].to_vec()
        }]
    );
    // Zero length: just NONE.
    assert_eq!(r.read(5, 0, 4096, 0), vec![Chunk::None]);
    drop(r);
    srv.stop();
}

#[test]
fn dont_fragment_gets_one_data_chunk_with_the_zeros() {
    let want = disk_bytes();
    let srv = TestServer::start(Arc::new(MemDisk::from_vec(want.clone())), persistent(2));
    let mut r = Raw::connect(&srv.sock);
    let (off, len) = (32 * KIB, 192 * KIB);
    let chunks = r.read(1, CMD_FLAG_DF, off, len as u32);
    assert_eq!(
        chunks,
        vec![Chunk::Data {
            off,
            data: want[off as usize..(off + len) as usize].to_vec()
        }]
    );
    let Chunk::Data { data, .. } = &chunks[0] else {
        unreachable!()
    };
    assert!(data[32 * 1024..160 * 1024].iter().all(|&b| b == 0));
    // Even a read entirely inside a hole.
    assert_eq!(
        r.read(2, CMD_FLAG_DF, 512 * KIB, 8192),
        vec![Chunk::Data {
            off: 512 * KIB,
            data: vec![0; 8192]
        }]
    );
    drop(r);
    srv.stop();
}

#[test]
fn pipelined_sparse_reads_are_answered_whole() {
    let want = disk_bytes();
    let srv = TestServer::start(Arc::new(MemDisk::from_vec(want.clone())), persistent(2));
    let mut r = Raw::connect(&srv.sock);
    // Many reads in flight at once, mixing holes, data and DF.
    let reqs: Vec<(u64, u16, u64, u32)> = (0..40u64)
        .map(|i| {
            let off = (i * 28 * KIB) % (DISK - 96 * KIB);
            let flags = if i % 3 == 0 { CMD_FLAG_DF } else { 0 };
            (i, flags, off, (64 * KIB + i * 512) as u32)
        })
        .collect();
    for &(cookie, flags, off, len) in &reqs {
        r.send_read(cookie, flags, off, len);
    }
    let mut got: Vec<Vec<Chunk>> = vec![Vec::new(); reqs.len()];
    let mut done = vec![false; reqs.len()];
    while done.iter().any(|d| !d) {
        let (cookie, last, c) = r.chunk();
        let i = cookie as usize;
        assert!(!done[i], "chunk after DONE");
        got[i].push(c);
        done[i] = last;
    }
    for (&(cookie, flags, off, len), chunks) in reqs.iter().zip(&got) {
        if flags & CMD_FLAG_DF != 0 {
            assert_eq!(chunks.len(), 1, "DF read {cookie} fragmented");
        }
        assert_eq!(
            assemble(chunks, off, len as u64),
            want[off as usize..off as usize + len as usize],
            "read {cookie}"
        );
    }
    drop(r);
    srv.stop();
}

#[test]
fn clients_see_the_same_bytes_sparse_or_not() {
    let want = disk_bytes();
    let srv = TestServer::start(Arc::new(MemDisk::from_vec(want.clone())), persistent(4));
    let simple = ConnectOptions {
        structured_replies: false,
        base_allocation: false,
        ..ConnectOptions::default()
    };
    for opts in [ConnectOptions::default(), simple] {
        let mut c = srv.connect_with(&opts).unwrap();
        let mut back = vec![0u8; DISK as usize];
        c.read(0, &mut back).unwrap();
        assert!(back == want);
        // A write into the hole turns it into data at once, on this connection and others.
        c.write(100 * KIB, &pattern(4096, 9), false).unwrap();
        let mut other = srv.connect();
        let mut b = vec![0u8; 8192];
        other.read(100 * KIB - 2048, &mut b).unwrap();
        assert!(b[..2048].iter().all(|&x| x == 0));
        assert_eq!(b[2048..6144], pattern(4096, 9));
        c.write_zeroes(100 * KIB, 4096, false, false).unwrap();
        other.disconnect().unwrap();
        c.disconnect().unwrap();
    }
    srv.stop();
}
