//! Hostile clients: malformed handshakes, bad magic, truncated packets, huge lengths,
//! unknown options/commands/flags, and floods of connections. The server must answer with
//! protocol errors, never panic (the fixture asserts `panics == 0`), never hang, and keep
//! serving a well-behaved client.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use common::{pattern, persistent, TestServer};
use proptest::prelude::*;
use vmdisk_block::MemDisk;
use vmdisk_nbd::client::{Client, ConnectOptions};
use vmdisk_nbd::limits::MAX_PENDING_CLIENTS;
use vmdisk_nbd::proto::*;

const MIB: u64 = 1 << 20;
/// Longest the server may take to answer or close on a hostile connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// A raw connection that speaks bytes, for the cases the real client would never send.
struct Raw {
    s: UnixStream,
}

impl Raw {
    fn connect(sock: &Path) -> Raw {
        let s = UnixStream::connect(sock).unwrap();
        s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
        Raw { s }
    }

    /// Read the greeting and send `cflags`.
    fn hello(sock: &Path, cflags: u32) -> Raw {
        let mut r = Raw::connect(sock);
        let mut g = [0u8; GREETING_LEN];
        r.s.read_exact(&mut g).unwrap();
        assert_eq!(
            decode_greeting(&g),
            Some(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
        );
        r.s.write_all(&cflags.to_be_bytes()).unwrap();
        r
    }

    fn opt(&mut self, option: u32, data: &[u8]) {
        let h = encode_option_header(OptionHeader {
            option,
            len: data.len() as u32,
        });
        self.s.write_all(&h).unwrap();
        self.s.write_all(data).unwrap();
    }

    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; OPTION_REPLY_HEADER_LEN];
        self.s.read_exact(&mut h).unwrap();
        let h = decode_option_reply_header(&h).expect("option reply magic");
        let mut d = vec![0u8; h.len as usize];
        self.s.read_exact(&mut d).unwrap();
        (h.option, h.reply, d)
    }

    /// True when the server closes the connection (EOF) within the timeout.
    fn closed(&mut self) -> bool {
        let t0 = Instant::now();
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(_) => return false,
            }
            if t0.elapsed() > IO_TIMEOUT {
                return false;
            }
        }
    }
}

fn go_data(name: &str) -> Vec<u8> {
    encode_info_request(&InfoRequest {
        name: name.into(),
        infos: vec![],
    })
}

/// A well-behaved client still gets correct service.
fn check_healthy(sock: &Path) {
    let mut c = Client::connect_unix(sock, &ConnectOptions::default()).expect("good client");
    let data = pattern(8192, 42);
    c.write(4096, &data, true).unwrap();
    let mut back = vec![0u8; 8192];
    c.read(4096, &mut back).unwrap();
    assert_eq!(back, data);
    c.disconnect().unwrap();
}

const C_FLAGS: u32 = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;

#[test]
fn malformed_handshakes_get_protocol_errors() {
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), persistent(8));
    let sock = srv.sock.clone();

    // Unknown client flags: the protocol says close.
    assert!(Raw::hello(&sock, 0xffff_0000).closed());
    // Bad option magic: close.
    let mut r = Raw::hello(&sock, C_FLAGS);
    r.s.write_all(&[0x55; OPTION_HEADER_LEN]).unwrap();
    assert!(r.closed());
    // Option length of 1 GiB: ERR_TOO_BIG, then close (no 1 GiB buffer).
    let mut r = Raw::hello(&sock, C_FLAGS);
    r.s.write_all(&encode_option_header(OptionHeader {
        option: OPT_GO,
        len: 1 << 30,
    }))
    .unwrap();
    assert_eq!(r.reply().1, REP_ERR_TOO_BIG);
    assert!(r.closed());

    // One connection walking through every refusal, then still negotiating.
    let mut r = Raw::hello(&sock, C_FLAGS);
    r.opt(4242, b"whatever");
    assert_eq!(r.reply(), (4242, REP_ERR_UNSUP, b"unknown option".to_vec()));
    r.opt(OPT_STARTTLS, &[]);
    assert_eq!(r.reply().1, REP_ERR_UNSUP);
    r.opt(OPT_LIST, b"x");
    assert_eq!(r.reply().1, REP_ERR_INVALID);
    r.opt(OPT_SET_META_CONTEXT, &[]);
    assert_eq!(
        r.reply().1,
        REP_ERR_INVALID,
        "meta context before structured replies"
    );
    let mut bad_go = go_data("");
    bad_go[..4].copy_from_slice(&u32::MAX.to_be_bytes());
    r.opt(OPT_GO, &bad_go);
    assert_eq!(r.reply().1, REP_ERR_INVALID);
    r.opt(OPT_GO, &go_data("nope"));
    assert_eq!(r.reply().1, REP_ERR_UNKNOWN);
    r.opt(OPT_STRUCTURED_REPLY, &[1]);
    assert_eq!(r.reply().1, REP_ERR_INVALID);
    r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().1, REP_ACK);
    r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().1, REP_ERR_INVALID, "twice");
    // LIST_META_CONTEXT without queries lists base:allocation with id 0.
    let q = |queries: Vec<&str>| {
        encode_meta_context_request(&MetaContextRequest {
            name: String::new(),
            queries: queries.into_iter().map(String::from).collect(),
        })
    };
    r.opt(OPT_LIST_META_CONTEXT, &q(vec![]));
    let (_, t, d) = r.reply();
    assert_eq!(t, REP_META_CONTEXT);
    assert_eq!(d, encode_rep_meta_context(0, META_BASE_ALLOCATION));
    assert_eq!(r.reply().1, REP_ACK);
    // Unknown contexts select nothing (just ACK); base:allocation gets id 1.
    r.opt(OPT_SET_META_CONTEXT, &q(vec!["qemu:dirty-bitmap:x"]));
    assert_eq!(r.reply().1, REP_ACK);
    r.opt(
        OPT_SET_META_CONTEXT,
        &q(vec!["x-foo:bar", META_BASE_ALLOCATION]),
    );
    let (_, t, d) = r.reply();
    assert_eq!(
        (t, d),
        (
            REP_META_CONTEXT,
            encode_rep_meta_context(1, META_BASE_ALLOCATION)
        )
    );
    assert_eq!(r.reply().1, REP_ACK);
    // INFO then GO.
    r.opt(OPT_INFO, &go_data(""));
    let (_, t, d) = r.reply();
    assert_eq!(t, REP_INFO);
    assert_eq!(u16::from_be_bytes([d[0], d[1]]), INFO_EXPORT);
    while r.reply().1 != REP_ACK {}
    r.opt(OPT_GO, &go_data(""));
    while r.reply().1 != REP_ACK {}
    // Transmission: a request with a bad magic ends the connection.
    r.s.write_all(&[0u8; REQUEST_LEN]).unwrap();
    assert!(r.closed());

    // ABORT: ACK, then close.
    let mut r = Raw::hello(&sock, C_FLAGS);
    r.opt(OPT_ABORT, &[]);
    assert_eq!(r.reply().1, REP_ACK);
    assert!(r.closed());

    // Legacy EXPORT_NAME: wrong name closes; right name gets size, flags and 124 zeros.
    let mut r = Raw::hello(&sock, FLAG_C_FIXED_NEWSTYLE);
    r.opt(OPT_EXPORT_NAME, b"nope");
    assert!(r.closed());
    let mut r = Raw::hello(&sock, FLAG_C_FIXED_NEWSTYLE);
    r.opt(OPT_EXPORT_NAME, b"");
    let mut b = [0u8; 8 + 2 + 124];
    r.s.read_exact(&mut b).unwrap();
    assert_eq!(u64::from_be_bytes(b[..8].try_into().unwrap()), MIB);
    assert!(b[10..].iter().all(|&x| x == 0));
    // Simple replies there: a read past the end gets EINVAL with the cookie.
    let req = Request {
        flags: 0,
        cmd: CMD_READ,
        cookie: 77,
        off: MIB,
        len: 1,
    };
    r.s.write_all(&encode_request(&req)).unwrap();
    let mut rep = [0u8; SIMPLE_REPLY_LEN];
    r.s.read_exact(&mut rep).unwrap();
    assert_eq!(rep, encode_simple_reply(EINVAL, 77));
    // Truncated request header, then EOF: the server closes.
    r.s.write_all(&encode_request(&req)[..10]).unwrap();
    r.s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(r.closed());

    check_healthy(&sock);
    let stats = srv.stop();
    assert!(stats.protocol_errors >= 4, "{stats:?}");
}

/// Bytes a hostile client might send: pure noise, or a valid prefix then noise.
fn hostile_bytes() -> impl Strategy<Value = Vec<u8>> {
    let noise = proptest::collection::vec(any::<u8>(), 0..300);
    let option = (
        prop_oneof![
            Just(OPT_GO),
            Just(OPT_INFO),
            Just(OPT_LIST),
            Just(OPT_SET_META_CONTEXT),
            Just(OPT_LIST_META_CONTEXT),
            Just(OPT_STRUCTURED_REPLY),
            Just(OPT_EXPORT_NAME),
            Just(OPT_ABORT),
            any::<u32>()
        ],
        prop_oneof![0u32..64, any::<u32>()],
        proptest::collection::vec(any::<u8>(), 0..64),
    )
        .prop_map(|(o, len, data)| {
            let mut b = C_FLAGS.to_be_bytes().to_vec();
            b.extend_from_slice(&encode_option_header(OptionHeader { option: o, len }));
            b.extend_from_slice(&data);
            b
        });
    let request = (
        any::<bool>(),
        proptest::collection::vec(
            (
                prop_oneof![0u16..10, any::<u16>()],
                any::<u16>(),
                prop_oneof![0u64..2 * MIB, any::<u64>()],
                prop_oneof![0u32..70_000, Just(MAX_REQ), any::<u32>()],
                0usize..600,
            ),
            1..6,
        ),
        any::<bool>(),
    )
        .prop_map(|(structured, reqs, bad_tail)| {
            let mut b = C_FLAGS.to_be_bytes().to_vec();
            let mut opt = |o: u32, d: &[u8]| {
                b.extend_from_slice(&encode_option_header(OptionHeader {
                    option: o,
                    len: d.len() as u32,
                }));
                b.extend_from_slice(d);
            };
            if structured {
                opt(OPT_STRUCTURED_REPLY, &[]);
                opt(
                    OPT_SET_META_CONTEXT,
                    &encode_meta_context_request(&MetaContextRequest {
                        name: String::new(),
                        queries: vec![META_BASE_ALLOCATION.into()],
                    }),
                );
            }
            opt(OPT_GO, &go_data(""));
            for (i, (cmd, flags, off, len, payload)) in reqs.into_iter().enumerate() {
                let r = Request {
                    flags,
                    cmd,
                    cookie: i as u64,
                    off,
                    len,
                };
                b.extend_from_slice(&encode_request(&r));
                b.extend(std::iter::repeat_n(0xcd, payload));
            }
            if bad_tail {
                b.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 1, 2, 3]);
            }
            b
        });
    prop_oneof![noise, option, request]
}

const MAX_REQ: u32 = vmdisk_nbd::MAX_REQUEST_LEN as u32;

#[test]
fn hostile_bytes_never_break_the_server() {
    let srv = TestServer::start(Arc::new(MemDisk::new(2 * MIB)), persistent(16));
    let sock = srv.sock.clone();
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 300,
        failure_persistence: None,
        ..ProptestConfig::default()
    });
    runner
        .run(&(hostile_bytes(), 0usize..2), |(bytes, cut)| {
            let mut r = Raw::connect(&sock);
            // Sometimes truncate the packet stream mid-way.
            let end = if cut == 1 {
                bytes.len() / 2
            } else {
                bytes.len()
            };
            let _ = r.s.write_all(&bytes[..end]);
            let _ = r.s.shutdown(std::net::Shutdown::Write);
            prop_assert!(
                r.closed(),
                "server did not close after EOF: {:02x?}",
                &bytes[..end]
            );
            check_healthy(&sock);
            Ok(())
        })
        .unwrap();
    let stats = srv.stop();
    assert_eq!(stats.panics, 0);
}

/// Where client `i` of `five_hundred_simultaneous_clients` writes: 4 KiB ranges 8 KiB apart,
/// all below 4 MiB, so no two overlap.
fn client_off(i: usize) -> u64 {
    i as u64 * 8192
}

/// What client `i` writes: a pattern with `i` stamped into every 512-byte sector, so no two
/// clients write the same bytes (the pattern alone repeats every 256 clients).
fn client_data(i: usize) -> Vec<u8> {
    let mut d = pattern(4096, i as u8);
    for sector in d.chunks_mut(512) {
        sector[..8].copy_from_slice(&(i as u64).to_be_bytes());
    }
    d
}

#[test]
fn five_hundred_simultaneous_clients() {
    const N: usize = 500;
    assert!(client_off(N - 1) + 4096 <= 4 * MIB);
    let srv = TestServer::start(Arc::new(MemDisk::new(4 * MIB)), persistent(N + 10));
    let sock = srv.sock.clone();
    let t0 = Instant::now();
    let start = Arc::new(Barrier::new(N));
    let all_open = Arc::new(Barrier::new(N));
    let threads: Vec<_> = (0..N)
        .map(|i| {
            let (sock, start, all_open) = (sock.clone(), start.clone(), all_open.clone());
            std::thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    start.wait();
                    // Everything before the barrier reports instead of panicking, so one
                    // failing client cannot leave the others waiting on the barrier forever.
                    let opened = (|| {
                        let mut c = Client::connect_unix(&sock, &ConnectOptions::default())
                            .map_err(|e| format!("connect: {e}"))?;
                        let data = client_data(i);
                        c.write(client_off(i), &data, false)
                            .map_err(|e| format!("write: {e}"))?;
                        let mut back = vec![0u8; 4096];
                        c.read(client_off(i), &mut back)
                            .map_err(|e| format!("read: {e}"))?;
                        if back != data {
                            return Err("read back differs from its write".to_string());
                        }
                        Ok(c)
                    })();
                    all_open.wait(); // every connection is open (and has written) here
                    let mut c = opened.unwrap_or_else(|e| panic!("client {i}: {e}"));
                    // Nobody else wrote over this client's range, and another connection's
                    // write is visible here: each connection reaches the one shared device.
                    let mut back = vec![0u8; 4096];
                    let j = (i + 1) % N;
                    for (k, what) in [(i, "its own"), (j, "a neighbour's")] {
                        c.read(client_off(k), &mut back).unwrap();
                        assert!(
                            back == client_data(k),
                            "client {i}: {what} range ({k}) changed after every write"
                        );
                    }
                    c.block_status(0, 4 * MIB, false).unwrap();
                    c.disconnect().unwrap();
                })
                .unwrap()
        })
        .collect();
    for t in threads {
        t.join().expect("client thread");
    }
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "took {:?}",
        t0.elapsed()
    );
    check_healthy(&sock);
    let stats = srv.stop();
    assert_eq!(stats.connections, N as u64 + 1);
    assert_eq!(stats.refused, 0);
}

/// Longest a well-behaved client may wait for service while others sit idle in negotiation
/// (they hold no slot, so it is served at once; the bound only absorbs a loaded machine, and
/// stays well below the 10 s an idle client could otherwise hold a slot).
const SERVED_WHILE_OTHERS_IDLE: Duration = Duration::from_secs(5);

/// Connect `n` clients that do nothing after connecting; each is greeted (not queued).
fn silent_clients(sock: &Path, n: usize) -> Vec<UnixStream> {
    (0..n)
        .map(|_| {
            let mut s = UnixStream::connect(sock).unwrap();
            s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
            let mut g = [0u8; GREETING_LEN];
            s.read_exact(&mut g)
                .expect("a negotiating client is greeted at once");
            s
        })
        .collect()
}

#[test]
fn idle_and_half_negotiated_clients_hold_no_slot() {
    // --shared 1 (the default): before, one silent client kept everyone else out until its
    // handshake timed out.
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), persistent(1));
    let mut idle = silent_clients(&srv.sock, 10);
    // Half-way through the handshake: flags sent, nothing more.
    for _ in 0..5 {
        idle.push(Raw::hello(&srv.sock, C_FLAGS).s);
    }
    // Half-way through an option: header and a part of its data.
    for _ in 0..5 {
        let mut r = Raw::hello(&srv.sock, C_FLAGS);
        let h = encode_option_header(OptionHeader {
            option: OPT_GO,
            len: 100,
        });
        r.s.write_all(&h).unwrap();
        r.s.write_all(&[0u8; 40]).unwrap();
        idle.push(r.s);
    }
    let t0 = Instant::now();
    check_healthy(&srv.sock);
    let took = t0.elapsed();
    assert!(
        took < SERVED_WHILE_OTHERS_IDLE,
        "a good client took {took:?} while 20 others sat idle in negotiation"
    );
    // The idle ones are still connected, waiting (the server has not given up on them yet).
    let mut s = idle.swap_remove(0);
    s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let e = s
        .read(&mut [0u8; 1])
        .expect_err("an idle client got data or EOF");
    assert!(matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    ));
    drop(idle);
    let stats = srv.stop();
    assert_eq!(stats.refused, 0, "{stats:?}");
}

#[test]
fn idle_and_over_limit_connections_do_not_starve_good_clients() {
    // 500 silent connections against 300 slots: negotiating clients hold none, so 300 +
    // MAX_PENDING_CLIENTS are accepted and greeted and the rest wait in the listen backlog.
    // Dropping the queued ones and a few greeted ones lets a good client in.
    const SHARED: usize = 300;
    let accepted = SHARED + MAX_PENDING_CLIENTS;
    let srv = TestServer::start(Arc::new(MemDisk::new(MIB)), persistent(SHARED));
    let t0 = Instant::now();
    let mut idle: Vec<_> = (0..500)
        .map(|_| UnixStream::connect(&srv.sock).unwrap())
        .collect();
    let mut greeted = 0;
    let mut waiting = 0;
    for (i, mut s) in idle.iter().enumerate() {
        // Accepted ones get the greeting at once; queued ones see nothing (not EOF).
        let wait = if i < accepted {
            IO_TIMEOUT
        } else {
            Duration::from_millis(20)
        };
        s.set_read_timeout(Some(wait)).unwrap();
        let mut g = [0u8; GREETING_LEN];
        match s.read_exact(&mut g) {
            Ok(()) => {
                assert_eq!(decode_greeting(&g), Some(3));
                greeted += 1;
            }
            Err(e) => {
                assert!(
                    matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ),
                    "a queued connection must wait, not be closed: {e}"
                );
                waiting += 1;
            }
        }
    }
    assert_eq!((greeted, waiting), (accepted, 500 - accepted));
    idle.truncate(accepted - 10);
    let t1 = Instant::now();
    loop {
        match Client::connect_unix(&srv.sock, &ConnectOptions::default()) {
            Ok(c) => {
                c.disconnect().unwrap();
                break;
            }
            Err(_) => assert!(t1.elapsed() < IO_TIMEOUT, "no room freed"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    check_healthy(&srv.sock);
    drop(idle);
    assert!(t0.elapsed() < Duration::from_secs(60));
    let stats = srv.stop();
    assert_eq!(stats.refused, 0, "{stats:?}");
}

#[test]
fn pipelined_huge_reads_are_bounded_and_answered() {
    let size = vmdisk_nbd::MAX_REQUEST_LEN;
    let disk = MemDisk::from_vec(pattern(size, 9));
    let srv = TestServer::start(Arc::new(disk), persistent(1));
    let mut r = Raw::hello(&srv.sock, C_FLAGS);
    r.opt(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(r.reply().1, REP_ACK);
    r.opt(OPT_GO, &go_data(""));
    while r.reply().1 != REP_ACK {}
    // 40 reads of 32 MiB (1.25 GiB) sent before reading a single reply.
    const N: u64 = 40;
    let mut w = r.s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        for cookie in 0..N {
            let req = Request {
                flags: 0,
                cmd: CMD_READ,
                cookie,
                off: 0,
                len: size as u32,
            };
            w.write_all(&encode_request(&req)).unwrap();
        }
    });
    let want = pattern(size, 9);
    let mut seen = vec![false; N as usize];
    let mut buf = vec![0u8; size];
    for _ in 0..N {
        let mut h = [0u8; CHUNK_HEADER_LEN + 8];
        r.s.read_exact(&mut h).unwrap();
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
        assert_eq!(len, size + 8);
        r.s.read_exact(&mut buf).unwrap();
        assert!(buf == want);
        seen[cookie as usize] = true;
    }
    writer.join().unwrap();
    assert!(seen.iter().all(|&s| s));
    drop(r);
    srv.stop();
}
