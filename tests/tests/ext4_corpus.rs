//! The e2fsprogs regression corpus (`../shared/corpus/e2fsprogs`, 233 images) read by our ext4
//! reader and by debugfs, file by file.
//!
//! For every image: decompress it into a temp dir; when its superblock asks for recovery, the
//! oracle is a copy replayed by `e2fsck -E journal_only` (the reader replays in memory and must
//! end up in the same state); debugfs `rdump`s the oracle's whole tree; our reader walks the
//! image (going on past damage) and hashes every file. The two trees must be equal (names,
//! types, sha256 of every regular file, symlink targets) except for entries whose inode, or an
//! ancestor directory's inode, `e2fsck -fn` names as damaged; those are printed with e2fsck's
//! line. Images only one side reads, and refusals by feature, are counted and printed.

use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vmdisk_block::{BlockDevice, RawFile};

/// Longest any oracle command may take on one image (a hostile image must not hang the test).
const ORACLE_TIMEOUT: &str = "45";
/// Workers: the machine has 2 cores; oracle runs are mostly IO and process start.
const WORKERS: usize = 3;

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpus/e2fsprogs/images")
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Dir,
    File(String),
    Symlink(Vec<u8>),
}

fn sha256_hex(data: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(data);
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn gunzip(src: &Path, dst: &Path) {
    let f = std::fs::File::open(src).expect("open corpus image");
    let mut d = flate2::read::GzDecoder::new(std::io::BufReader::new(f));
    let mut out = std::fs::File::create(dst).expect("create image");
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = d.read(&mut buf).expect("gunzip");
        if n == 0 {
            break;
        }
        // Keep zero runs sparse: these images are mostly empty.
        if buf[..n].iter().all(|&b| b == 0) {
            use std::io::Seek;
            out.seek(std::io::SeekFrom::Current(n as i64))
                .expect("seek");
        } else {
            use std::io::Write;
            out.write_all(&buf[..n]).expect("write image");
        }
    }
    let len = std::io::Seek::stream_position(&mut out).expect("pos");
    out.set_len(len).expect("set_len");
}

fn run(cmd: &mut Command) -> std::process::Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// The host tree debugfs wrote, as path -> node (paths relative, starting with '/').
fn host_tree(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(root.to_path_buf(), Vec::new())];
    while let Some((dir, rel)) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&dir) else {
            continue;
        };
        for e in rd.flatten() {
            let mut p = rel.clone();
            p.push(b'/');
            p.extend_from_slice(e.file_name().as_bytes());
            let Ok(md) = std::fs::symlink_metadata(e.path()) else {
                continue;
            };
            if md.file_type().is_symlink() {
                let t = std::fs::read_link(e.path()).expect("readlink");
                out.insert(p, Node::Symlink(t.as_os_str().as_bytes().to_vec()));
            } else if md.is_dir() {
                out.insert(p.clone(), Node::Dir);
                stack.push((e.path(), p));
            } else if md.is_file() {
                let data = std::fs::read(e.path()).expect("read dumped file");
                out.insert(p, Node::File(sha256_hex(&data)));
            }
        }
    }
    out
}

/// Inode numbers `e2fsck -fn` names, with the line naming each.
fn damaged_inodes(text: &str) -> BTreeMap<u32, String> {
    let mut m = BTreeMap::new();
    for line in text.lines() {
        let l = line.to_ascii_lowercase();
        let mut add = |s: &str| {
            let digits: String = s.chars().take_while(|c| c.is_ascii_digit()).collect();
            if let Ok(n) = digits.parse::<u32>() {
                m.entry(n).or_insert_with(|| line.trim().to_string());
            }
        };
        for (i, _) in l.match_indices("inode ") {
            let rest = &l[i + 6..];
            add(rest.trim_start_matches('#'));
        }
        for (i, _) in l.match_indices('(') {
            add(&l[i + 1..]);
        }
    }
    m
}

#[derive(Default)]
struct Tally {
    compared: Vec<String>,
    matched: Vec<String>,
    refused: BTreeMap<String, Vec<String>>,
    debugfs_refused: Vec<String>,
    both_refused: Vec<String>,
    exceptions: Vec<String>,
    failures: Vec<String>,
    encrypted_entries: usize,
}

fn refusal_kind(e: &vmdisk_ext4::Error) -> String {
    match e {
        vmdisk_ext4::Error::Unsupported { what } => format!(
            "unsupported: {}",
            what.split(':').next().unwrap_or(what).trim()
        ),
        vmdisk_ext4::Error::Journal { source } => format!("journal: {source}"),
        vmdisk_ext4::Error::Corrupt { .. } => "corrupt".to_string(),
        other => format!("{other}"),
    }
}

fn check_image(name: &str, dir: &Path, t: &Mutex<Tally>) {
    let src = corpus_dir().join(format!("{name}.img.gz"));
    let img = dir.join(format!("{name}.img"));
    gunzip(&src, &img);
    let ext_src = corpus_dir().join(format!("{name}.extjournal.gz"));
    let ext = ext_src.exists().then(|| {
        let p = dir.join(format!("{name}.journal"));
        gunzip(&ext_src, &p);
        p
    });

    // The oracle's view: replayed by e2fsck when the superblock asks for recovery.
    let mut sb = [0u8; 1024];
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::open(&img).expect("open");
        let _ = f.read_exact_at(&mut sb, 1024);
    }
    let needs_recovery = u32::from_le_bytes([sb[0x60], sb[0x61], sb[0x62], sb[0x63]]) & 4 != 0;
    // What e2fsck said while replaying (it may also fix things then, e.g. move a visible
    // journal file to its hidden inode).
    let mut recovery_text = String::new();
    let oracle_img = if needs_recovery {
        let o = dir.join(format!("{name}.oracle.img"));
        std::fs::copy(&img, &o).expect("copy");
        let mut c = Command::new("timeout");
        c.args([ORACLE_TIMEOUT, "e2fsck", "-E", "journal_only", "-y"]);
        if let Some(j) = &ext {
            c.arg("-j").arg(j);
        }
        let r = run(c.arg(&o));
        recovery_text =
            String::from_utf8_lossy(&r.stdout).to_string() + &String::from_utf8_lossy(&r.stderr);
        o
    } else {
        img.clone()
    };
    let fsck = run(Command::new("timeout")
        .args([ORACLE_TIMEOUT, "e2fsck", "-fn"])
        .arg(&oracle_img));
    let fsck_text =
        String::from_utf8_lossy(&fsck.stdout).to_string() + &String::from_utf8_lossy(&fsck.stderr);
    let damaged = damaged_inodes(&fsck_text);

    let out_dir = dir.join(format!("{name}.rdump"));
    std::fs::create_dir(&out_dir).expect("mkdir");
    let dbg = run(Command::new("timeout")
        .args([ORACLE_TIMEOUT, "debugfs", "-R"])
        .arg(format!("rdump / {}", out_dir.display()))
        .arg(&oracle_img));
    let dbg_err = String::from_utf8_lossy(&dbg.stderr).to_string();
    let mut debugfs_ok = dbg.status.success() && !dbg_err.contains("Filesystem not open");
    if !debugfs_ok && dbg_err.contains("while reading allocation bitmaps") {
        // debugfs refuses a filesystem whose bitmaps are bad; its catastrophic mode (-c) reads
        // the tree without them, which is all a reader needs.
        let _ = std::fs::remove_dir_all(&out_dir);
        std::fs::create_dir(&out_dir).expect("mkdir");
        let dbg = run(Command::new("timeout")
            .args([ORACLE_TIMEOUT, "debugfs", "-c", "-R"])
            .arg(format!("rdump / {}", out_dir.display()))
            .arg(&oracle_img));
        let err = String::from_utf8_lossy(&dbg.stderr).to_string();
        debugfs_ok = dbg.status.success() && !err.contains("Filesystem not open");
    }

    // Our reader, on the image as it is (journal replayed in memory).
    let dev: Arc<dyn BlockDevice> = Arc::new(RawFile::open(&img, true).expect("open image"));
    let jdev = ext
        .as_ref()
        .map(|j| Arc::new(RawFile::open(j, true).expect("open journal")) as Arc<dyn BlockDevice>);
    let ours = vmdisk_ext4::Ext4::open_with_journal(dev, jdev);
    let mut tally = t.lock().unwrap_or_else(|e| e.into_inner());
    let fs = match (ours, debugfs_ok) {
        (Err(_), false) => {
            tally.both_refused.push(name.to_string());
            return;
        }
        (Err(e), true) => {
            tally
                .refused
                .entry(refusal_kind(&e))
                .or_default()
                .push(format!("{name}: {e}"));
            return;
        }
        (Ok(_), false) => {
            tally.debugfs_refused.push(name.to_string());
            return;
        }
        (Ok(fs), true) => fs,
    };
    drop(tally);
    let theirs = host_tree(&out_dir);
    let mut mine: BTreeMap<Vec<u8>, Node> = BTreeMap::new();
    // Our content of inline-data files (debugfs dumps their whole inline area, past i_size).
    let mut inline_content: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
    let mut ino_of: BTreeMap<Vec<u8>, u32> = BTreeMap::new();
    let mut errors: BTreeMap<Vec<u8>, String> = BTreeMap::new();
    let mut encrypted = 0usize;
    match fs.walk_lossy("/") {
        Ok(entries) => {
            for e in entries {
                ino_of.insert(e.path_bytes.clone(), e.ino);
                if let Some(err) = &e.error {
                    if err.contains("encrypt") {
                        encrypted += 1;
                    }
                    errors.insert(e.path_bytes.clone(), err.clone());
                }
                let node = match e.kind {
                    vmdisk_ext4::FileKind::Dir => Some(Node::Dir),
                    vmdisk_ext4::FileKind::Symlink if e.error.is_none() => {
                        e.target_bytes.clone().map(Node::Symlink)
                    }
                    vmdisk_ext4::FileKind::File if e.error.is_none() => {
                        let inline = fs
                            .volume()
                            .inode(e.ino)
                            .is_ok_and(|i| i.flags & 0x1000_0000 != 0);
                        if inline {
                            if let Ok(d) = fs.open_inode(e.ino).and_then(|f| {
                                let mut v = vec![0u8; f.size() as usize];
                                fs.read_at(&f, 0, &mut v)?;
                                Ok(v)
                            }) {
                                inline_content.insert(e.path_bytes.clone(), d);
                            }
                        }
                        match fs.open_inode(e.ino).and_then(|f| {
                            let mut h = Sha256::new();
                            let mut w = HashWriter(&mut h);
                            fs.copy_open_file(&f, &mut w)?;
                            Ok(h.finalize())
                        }) {
                            Ok(d) => {
                                Some(Node::File(d.iter().map(|b| format!("{b:02x}")).collect()))
                            }
                            Err(err) => {
                                if err.to_string().contains("encrypt") {
                                    encrypted += 1;
                                }
                                errors.insert(e.path_bytes.clone(), err.to_string());
                                None
                            }
                        }
                    }
                    _ => None,
                };
                if let Some(n) = node {
                    mine.insert(e.path_bytes, n);
                }
            }
        }
        Err(e) => {
            errors.insert(b"/".to_vec(), e.to_string());
        }
    }

    let paths: BTreeSet<&Vec<u8>> = mine.keys().chain(theirs.keys()).collect();
    let mut fails = Vec::new();
    let mut excused = Vec::new();
    for p in paths {
        let (a, b) = (mine.get(p), theirs.get(p));
        if a == b {
            continue;
        }
        // Inodes that may explain the difference: the entry's and its ancestors' (ours).
        let mut cands = Vec::new();
        let mut q = p.clone();
        loop {
            if let Some(&i) = ino_of.get(&q) {
                cands.push(i);
            }
            match q.iter().rposition(|&c| c == b'/') {
                Some(0) | None => break,
                Some(k) => q.truncate(k),
            }
        }
        cands.push(2);
        let why = cands.iter().find_map(|i| damaged.get(i).map(|l| (*i, l)));
        let shown = String::from_utf8_lossy(p);
        let named_in_recovery = recovery_text
            .lines()
            .find(|l| l.contains(&format!("{shown} ")) || l.ends_with(&*shown));
        // An entry inside an encrypted directory we refuse to list.
        let mut anc = p.clone();
        let mut in_encrypted = false;
        while let Some(k) = anc.iter().rposition(|&c| c == b'/') {
            if errors.get(&anc).is_some_and(|e| e.contains("encrypt")) {
                in_encrypted = true;
            }
            if k == 0 {
                break;
            }
            anc.truncate(k);
        }
        let desc = format!(
            "{name}:{shown}: vmdisk {:?}{} / debugfs {:?}",
            a,
            errors.get(p).map(|e| format!(" ({e})")).unwrap_or_default(),
            b
        );
        // debugfs quirk: it dumps an inline-data file's whole inline area (60 bytes and more),
        // ignoring i_size; the kernel and we read i_size bytes, which debugfs's dump starts with.
        let quirk = inline_content.get(p).is_some_and(|ours| {
            let mut hp = out_dir.clone();
            hp.push(std::ffi::OsStr::from_bytes(&p[1..]));
            std::fs::read(&hp).is_ok_and(|d| d.len() > ours.len() && d.starts_with(ours))
        });
        match why {
            _ if quirk => excused.push(format!(
                "{desc} — debugfs dumps the inline area past i_size; our bytes are its prefix"
            )),
            Some((i, line)) => excused.push(format!("{desc} — e2fsck: inode {i}: {line}")),
            None if in_encrypted => excused.push(format!("{desc} — encrypted, needs the key")),
            None if named_in_recovery.is_some() => excused.push(format!(
                "{desc} — e2fsck changed it while replaying: {}",
                named_in_recovery.unwrap_or_default().trim()
            )),
            None => fails.push(desc),
        }
    }
    let mut tally = t.lock().unwrap_or_else(|e| e.into_inner());
    tally.encrypted_entries += encrypted;
    tally.compared.push(name.to_string());
    if fails.is_empty() && excused.is_empty() {
        tally.matched.push(name.to_string());
    }
    tally.exceptions.extend(excused);
    tally.failures.extend(fails);
}

struct HashWriter<'a>(&'a mut Sha256);
impl std::io::Write for HashWriter<'_> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.update(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn every_corpus_image_reads_as_debugfs_reads_it() {
    for t in ["debugfs", "e2fsck", "timeout"] {
        assert!(
            Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "command -v {t} || test -x /usr/sbin/{t} || test -x /sbin/{t}"
                ))
                .output()
                .is_ok_and(|o| o.status.success()),
            "{t} is missing: apt-get install -y e2fsprogs coreutils"
        );
    }
    let started = Instant::now();
    let mut names: Vec<String> = std::fs::read_dir(corpus_dir())
        .expect("the corpus ../shared/corpus/e2fsprogs/images")
        .flatten()
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_suffix(".img.gz"))
                .map(str::to_string)
        })
        .collect();
    names.sort();
    if let Ok(only) = std::env::var("EXT4_CORPUS_ONLY") {
        names.retain(|n| only.split(',').any(|o| n.contains(o)));
    }
    assert!(
        names.len() >= 233 || std::env::var("EXT4_CORPUS_ONLY").is_ok(),
        "corpus has {} images",
        names.len()
    );
    let tally = Mutex::new(Tally::default());
    let next = AtomicUsize::new(0);
    let timings = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..WORKERS {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                let Some(name) = names.get(i) else {
                    break;
                };
                let dir = tempfile::tempdir().expect("tempdir");
                let t0 = Instant::now();
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    check_image(name, dir.path(), &tally)
                }));
                let took = t0.elapsed();
                timings.lock().unwrap().push((took, name.clone()));
                if let Err(p) = r {
                    let msg = p
                        .downcast_ref::<String>()
                        .cloned()
                        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                        .unwrap_or_default();
                    tally
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .failures
                        .push(format!("{name}: PANIC {msg}"));
                }
            });
        }
    });
    let t = tally.into_inner().unwrap();
    let mut timings = timings.into_inner().unwrap();
    timings.sort();
    let refused: usize = t.refused.values().map(Vec::len).sum();
    println!(
        "ext4 corpus: {} images; both read: {}; fully matching debugfs: {}; with excused \
         differences: {}; vmdisk refuses (debugfs reads): {refused}; debugfs refuses (vmdisk \
         reads): {}; both refuse: {}; encrypted entries: {}; {:.1}s (slowest: {:?})",
        names.len(),
        t.compared.len(),
        t.matched.len(),
        t.compared.len() - t.matched.len(),
        t.debugfs_refused.len(),
        t.both_refused.len(),
        t.encrypted_entries,
        started.elapsed().as_secs_f64(),
        timings.iter().rev().take(3).collect::<Vec<_>>()
    );
    for (k, v) in &t.refused {
        println!("  refused ({k}): {}", v.len());
        for i in v {
            println!("    {i}");
        }
    }
    println!("  debugfs refuses: {:?}", t.debugfs_refused);
    println!("  both refuse: {:?}", t.both_refused);
    // Exceptions, grouped by image: how many entries, and the first one with its reason.
    let mut by_image: BTreeMap<&str, Vec<&String>> = BTreeMap::new();
    for e in &t.exceptions {
        by_image
            .entry(e.split(':').next().unwrap_or(""))
            .or_default()
            .push(e);
    }
    println!(
        "  exceptions: {} entries in {} images",
        t.exceptions.len(),
        by_image.len()
    );
    for (img, v) in &by_image {
        let first: String = v[0].chars().take(300).collect();
        println!("    {img}: {} entries, e.g. {first}", v.len());
    }
    for f in &t.failures {
        println!("  FAIL {f}");
    }
    assert!(
        t.failures.is_empty(),
        "{} differences not explained by e2fsck -fn (see above)",
        t.failures.len()
    );
    assert!(
        refused < 15,
        "vmdisk refuses {refused} images debugfs reads (target: fewer than 15)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(600),
        "the corpus took {:?}",
        started.elapsed()
    );
}
