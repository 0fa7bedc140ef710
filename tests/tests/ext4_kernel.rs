//! Filesystems written by a real Linux kernel (loop mounts; these tests run as root, as CI
//! does), read by our ext4 reader and judged by the kernel itself, debugfs and e2fsck.
//!
//! - preallocated (fallocate) files read as zeros, not as the old data their blocks held;
//! - copies of a mounted filesystem taken while a writer runs (journal live, needs_recovery
//!   set, a journal small enough to wrap many times) read exactly as e2fsck's journal-only
//!   replay of the same copy, for ext4 (64-bit, csum v3) and ext3 (32-bit, no checksums).

use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tests::mount::{require_root, sh, LoopMount};
use vmdisk_block::{BlockDevice, RawFile};

fn require_root_and_tools() {
    require_root();
    for t in [
        "mkfs.ext4",
        "mkfs.ext3",
        "debugfs",
        "e2fsck",
        "fallocate",
        "mount",
    ] {
        sh(&format!(
            "command -v {t} || test -x /usr/sbin/{t} || test -x /sbin/{t}"
        ));
    }
}

fn open(img: &Path) -> vmdisk_ext4::Ext4 {
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(img, true).expect("open image"));
    vmdisk_ext4::Ext4::open(dev).expect("open ext4")
}

fn sha(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

#[test]
fn fallocated_files_read_as_zeros_not_old_data() {
    require_root_and_tools();
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join("fresh.img");
    sh(&format!(
        "truncate -s 64M '{0}' && mkfs.ext4 -q -F '{0}'",
        img.display()
    ));
    let mnt = tmp.path().join("mnt");
    {
        let m = LoopMount::new(&img, &mnt, "rw");
        let d = m.dir.display();
        sh(&format!("fallocate -l 1M {d}/f"));
        // Partly written: 4 KiB of data in the middle of a 2 MiB preallocation, so the file
        // has unwritten extents on both sides of a written one.
        sh(&format!(
            "fallocate -l 2M {d}/g && printf 'written!%.0s' $(seq 512) | \
             dd of={d}/g bs=4096 seek=100 conv=notrunc status=none"
        ));
        // KEEP_SIZE: blocks preallocated past the end of the file.
        sh(&format!(
            "printf 'short' > {d}/h && fallocate -n -l 1M {d}/h && sync"
        ));
    }
    let dump = sh(&format!(
        "debugfs -R 'stat /f' '{}' 2>/dev/null",
        img.display()
    ));
    assert!(dump.contains("[u]"), "f has unwritten extents: {dump}");
    // Stale data under every unwritten extent, as a deleted file would leave it: the kernel
    // must still read zeros there, and so must we.
    let mut marked = 0u64;
    {
        use std::os::unix::fs::FileExt;
        let fs = open(&img);
        let raw = std::fs::OpenOptions::new()
            .write(true)
            .open(&img)
            .expect("open image for writing");
        let block = b"SECRET-OLD-DATA\n".repeat(256);
        for n in ["/f", "/g", "/h"] {
            let ino = fs.volume().resolve(n, false).expect("inode");
            for r in fs.volume().runs(&ino, None).expect("runs") {
                if r.unwritten {
                    for b in r.pblk..r.pblk + r.len {
                        raw.write_all_at(&block, b * 4096).expect("mark block");
                        marked += 1;
                    }
                }
            }
        }
        raw.sync_all().expect("sync");
    }
    assert!(
        marked >= 256 + 511 + 255,
        "marked {marked} unwritten blocks"
    );
    let kernel_view;
    {
        let m = LoopMount::new(&img, &mnt, "ro");
        kernel_view =
            ["f", "g", "h"].map(|n| sha(&std::fs::read(m.dir.join(n)).expect("kernel read")));
    }
    let fs = open(&img);
    let f = fs.read_file("/f").expect("read /f");
    assert_eq!(f.len(), 1 << 20);
    assert!(f.iter().all(|&b| b == 0), "/f must read as zeros");
    let f_file = fs.open_file("/f").expect("open /f");
    assert!(
        f_file.data_segments(4096).is_empty(),
        "an unwritten file has no data segments"
    );
    for (i, n) in ["f", "g", "h"].iter().enumerate() {
        let ours = fs.read_file(&format!("/{n}")).expect("read");
        let theirs = Command::new("debugfs")
            .arg("-R")
            .arg(format!("cat /{n}"))
            .arg(&img)
            .output()
            .expect("debugfs")
            .stdout;
        assert_eq!(sha(&ours), kernel_view[i], "/{n} vs the kernel");
        assert_eq!(sha(&ours), sha(&theirs), "/{n} vs debugfs");
    }
    let g = fs.read_file("/g").expect("read /g");
    assert_eq!(&g[100 * 4096..100 * 4096 + 8], b"written!");
    assert!(g[..100 * 4096].iter().all(|&b| b == 0));
    assert!(g[101 * 4096..].iter().all(|&b| b == 0));
    assert_eq!(fs.read_file("/h").expect("read /h"), b"short");
}

#[derive(Debug, PartialEq, Eq)]
enum Node {
    Dir,
    File(String),
    Symlink(Vec<u8>),
}

fn ours_tree(fs: &vmdisk_ext4::Ext4) -> BTreeMap<Vec<u8>, Node> {
    let mut m = BTreeMap::new();
    for e in fs.walk("/").expect("walk") {
        let n = match e.kind {
            vmdisk_ext4::FileKind::Dir => Node::Dir,
            vmdisk_ext4::FileKind::Symlink => Node::Symlink(e.target_bytes.clone().unwrap()),
            vmdisk_ext4::FileKind::File => {
                let f = fs.open_inode(e.ino).expect("open");
                let mut v = vec![0u8; f.size() as usize];
                fs.read_at(&f, 0, &mut v).expect("read");
                Node::File(sha(&v))
            }
            _ => continue,
        };
        m.insert(e.path_bytes, n);
    }
    m
}

fn host_tree(root: &Path, rel: &[u8], m: &mut BTreeMap<Vec<u8>, Node>) {
    for e in std::fs::read_dir(root).expect("readdir").flatten() {
        let mut p = rel.to_vec();
        p.push(b'/');
        p.extend_from_slice(e.file_name().as_bytes());
        let md = std::fs::symlink_metadata(e.path()).expect("lstat");
        if md.file_type().is_symlink() {
            let t = std::fs::read_link(e.path()).expect("readlink");
            m.insert(p, Node::Symlink(t.as_os_str().as_bytes().to_vec()));
        } else if md.is_dir() {
            m.insert(p.clone(), Node::Dir);
            host_tree(&e.path(), &p, m);
        } else {
            m.insert(p, Node::File(sha(&std::fs::read(e.path()).expect("read"))));
        }
    }
}

/// The tree of `img` after `e2fsck -E journal_only` on a copy, dumped by debugfs.
fn oracle_tree(img: &Path, work: &Path) -> BTreeMap<Vec<u8>, Node> {
    let copy = work.join("oracle.img");
    std::fs::copy(img, &copy).expect("copy");
    let _ = Command::new("e2fsck")
        .args(["-E", "journal_only", "-y"])
        .arg(&copy)
        .output()
        .expect("e2fsck");
    let out = work.join("rdump");
    let _ = std::fs::remove_dir_all(&out);
    std::fs::create_dir(&out).expect("mkdir");
    let o = Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", out.display()))
        .arg(&copy)
        .output()
        .expect("debugfs");
    assert!(o.status.success(), "debugfs rdump");
    let mut m = BTreeMap::new();
    host_tree(&out, b"", &mut m);
    m
}

/// A writer that keeps creating, rewriting, renaming and deleting files (metadata-heavy, so
/// the journal fills and wraps quickly), killed on drop.
struct Writer(Child);

impl Writer {
    fn start(dir: &Path) -> Writer {
        let script = format!(
            "cd '{}' || exit 1; i=0; while :; do i=$((i+1)); d=d$((i % 13)); mkdir -p $d; \
             echo \"content $i $(date +%N)\" > $d/f$((i % 97)); \
             ln -sf f$((i % 97)) $d/l$((i % 7)); \
             mv $d/f$((i % 89)) $d/g$((i % 5)) 2>/dev/null; \
             rm -f $d/g$((i % 3)); \
             if [ $((i % 50)) -eq 0 ]; then head -c $((i % 200000)) /dev/zero > big$((i % 4)); fi; \
             done",
            dir.display()
        );
        Writer(
            Command::new("sh")
                .arg("-c")
                .arg(script)
                .spawn()
                .expect("spawn writer"),
        )
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn journal_start(img: &Path) -> (u32, u32) {
    // Journal superblock fields via debugfs's logdump header.
    let out = sh(&format!("dumpe2fs -h '{}' 2>/dev/null", img.display()));
    let field = |name: &str| {
        out.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split(':').nth(1))
            .map(|v| v.trim().trim_start_matches("0x").to_string())
            .unwrap_or_default()
    };
    let start = field("Journal start").parse().unwrap_or(0);
    let seq = u32::from_str_radix(&field("Journal sequence"), 16).unwrap_or(0);
    (start, seq)
}

/// Entries below `dir` on the host (the mounted filesystem), counted as they are now.
fn count_entries(dir: &Path) -> usize {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            1 + match e.file_type() {
                Ok(t) if t.is_dir() => count_entries(&e.path()),
                _ => 0,
            }
        })
        .sum()
}

fn live_copies_read_like_e2fsck(mkfs: &str, label: &str) {
    require_root_and_tools();
    let tmp = tempfile::tempdir().expect("tempdir");
    let img = tmp.path().join(format!("{label}.img"));
    sh(&format!(
        "truncate -s 96M '{0}' && {mkfs} -q -F '{0}'",
        img.display()
    ));
    let mnt = tmp.path().join("mnt");
    let m = LoopMount::new(&img, &mnt, "rw,commit=1");
    let writer = Writer::start(&m.dir);
    let started = Instant::now();
    let mut replayed_blocks = 0u64;
    let mut starts = Vec::new();
    let mut copies = 0;
    // Wait for the writer to have made a tree worth comparing (a loaded machine runs its
    // shell loop slowly), then copy until at least 6 copies were taken and the log wrapped.
    let deadline = Instant::now() + Duration::from_secs(60);
    while count_entries(&m.dir) < 30 {
        assert!(
            Instant::now() < deadline,
            "{label}: the writer made no tree in 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // And make the kernel commit that tree to the journal once, so the first copy has it
    // (delayed allocation may otherwise keep it in memory for a while); the writer goes on.
    sh(&format!("sync -f '{}'", m.dir.display()));
    let wrapped = |starts: &[(u32, u32)]| starts.windows(2).any(|w| w[1].0 < w[0].0);
    let overall = Instant::now() + Duration::from_secs(300);
    while copies < 6 || !wrapped(&starts) {
        assert!(
            Instant::now() < overall,
            "{label}: the journal never wrapped in 300 s: {starts:?}"
        );
        // Wait on the journal itself: take a copy only once transactions are live in it.
        let deadline = Instant::now() + Duration::from_secs(30);
        let copy = tmp.path().join(format!("copy{copies}.img"));
        loop {
            std::fs::copy(&img, &copy).expect("copy the live image");
            let (start, seq) = journal_start(&copy);
            if start != 0 {
                starts.push((start, seq));
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the journal never had live transactions"
            );
        }
        let fs = open(&copy);
        assert_eq!(fs.fs_info().state, vmdisk_ext4::FsState::NeedsRecovery);
        let j = fs.fs_info().journal;
        assert!(j.replayed, "{label}: copy {copies} was replayed");
        replayed_blocks += j.blocks;
        let ours = ours_tree(&fs);
        let work = tmp.path().join(format!("w{copies}"));
        std::fs::create_dir(&work).expect("mkdir");
        let theirs = oracle_tree(&copy, &work);
        assert!(
            ours.len() > 10,
            "{label}: copy {copies} has {} entries",
            ours.len()
        );
        let only_ours: Vec<_> = ours.keys().filter(|k| !theirs.contains_key(*k)).collect();
        let only_theirs: Vec<_> = theirs.keys().filter(|k| !ours.contains_key(*k)).collect();
        let differ: Vec<_> = ours
            .iter()
            .filter(|(k, v)| theirs.get(*k).is_some_and(|t| t != *v))
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect();
        assert!(
            only_ours.is_empty() && only_theirs.is_empty() && differ.is_empty(),
            "{label}: copy {copies} differs from e2fsck's replay: {} only ours, {} only \
             e2fsck's, differing {:?}",
            only_ours.len(),
            only_theirs.len(),
            differ
        );
        copies += 1;
        // Next copy once the kernel has moved the journal on (its superblock changes when
        // the log tail moves, i.e. after transactions were checkpointed).
        let last = starts.last().copied().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(60);
        while journal_start(&img) == last {
            assert!(
                Instant::now() < deadline,
                "{label}: the journal stopped advancing"
            );
        }
    }
    drop(writer);
    drop(m);
    // The journal wrapped: its sequence advanced by far more transactions than a 1024-block
    // log holds at once, and the log start moved backwards at least once.
    let seqs: Vec<u32> = starts.iter().map(|s| s.1).collect();
    assert!(
        wrapped(&starts),
        "{label}: the journal never wrapped during the test: {starts:?}"
    );
    assert!(replayed_blocks > 0, "{label}: nothing was ever replayed");
    println!(
        "{label}: {copies} live copies in {:?}, journal (start, sequence) {starts:?}, \
         sequences {seqs:?}, {replayed_blocks} blocks replayed in total",
        started.elapsed()
    );
}

#[test]
fn live_ext4_copies_read_like_e2fsck_journal_replay() {
    // Default ext4 (64-bit, metadata_csum, csum v3 journal) with the smallest journal.
    live_copies_read_like_e2fsck("mkfs.ext4 -J size=4 -O 64bit", "ext4");
}

#[test]
fn live_ext3_copies_read_like_e2fsck_journal_replay() {
    // ext3: 32-bit journal, no checksums, indirect block maps, 1 KiB blocks.
    live_copies_read_like_e2fsck("mkfs.ext3 -b 1024 -J size=1", "ext3");
}
