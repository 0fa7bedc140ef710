//! Fixtures built with the real e2fsprogs, and the oracles (debugfs, e2fsck).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// Fail loudly when a tool is missing, naming the Debian package.
pub fn require(tool: &str, package: &str) {
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "command -v {tool} || test -x /usr/sbin/{tool} || test -x /sbin/{tool}"
        ))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{tool} is missing: install it with `apt-get update && apt-get install -y {package}`"
    );
}

pub fn require_e2fsprogs() {
    for t in ["mkfs.ext4", "debugfs", "e2fsck"] {
        require(t, "e2fsprogs");
    }
}

/// Make a sparse image of `size_mb` MiB holding the tree under `src`.
pub fn mkfs(dir: &Path, name: &str, src: &Path, size_mb: u64, opts: &[&str]) -> PathBuf {
    require_e2fsprogs();
    let img = dir.join(name);
    let f = std::fs::File::create(&img).expect("create image");
    f.set_len(size_mb << 20).expect("size image");
    drop(f);
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "nixos", "-d"])
        .arg(src)
        .args(opts)
        .arg(&img)
        .env("MKE2FS_DEVICE_SECTSIZE", "512")
        .output()
        .expect("run mkfs.ext4");
    assert!(
        out.status.success(),
        "mkfs.ext4 {opts:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    img
}

pub fn debugfs(img: &Path, req: &str) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(req)
        .arg(img)
        .output()
        .expect("run debugfs");
    assert!(out.status.success(), "debugfs -R {req} failed");
    out.stdout
}

/// `e2fsck -fn` must find nothing.
pub fn assert_fsck_clean(img: &Path, ctx: &str) {
    let out = Command::new("e2fsck")
        .args(["-fn"])
        .arg(img)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck -fn not clean ({ctx}):\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Small deterministic PRNG (xorshift64*), so failures replay.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }
}

/// A guest-like tree: /etc with account files, nested dirs, symlinks, files of many sizes.
pub fn populate(root: &Path, shadow: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("ssh")).expect("mkdir");
    std::fs::write(
        etc.join("passwd"),
        b"root:x:0:0:root:/root:/bin/sh\ndaemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin\nalice:x:1000:100::/home/alice:/bin/bash\n",
    )
    .expect("write");
    std::fs::write(etc.join("shadow"), shadow).expect("write");
    std::fs::set_permissions(etc.join("shadow"), std::fs::Permissions::from_mode(0o640))
        .expect("chmod");
    std::fs::write(
        etc.join("shadow-"),
        b"root:$6$bk$backuphash:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\n",
    )
    .expect("write");
    std::fs::write(etc.join("ssh/sshd_config"), b"PermitRootLogin yes\n").expect("write");
    std::os::unix::fs::symlink("/etc/passwd", etc.join("passwd.link")).expect("symlink");
    let long_target = format!("/{}", "x".repeat(100));
    std::os::unix::fs::symlink(&long_target, etc.join("long.link")).expect("symlink");
    let data = root.join("data/deep/deeper");
    std::fs::create_dir_all(&data).expect("mkdir");
    let mut rng = Rng(42);
    for (i, size) in [0usize, 1, 1023, 1024, 1025, 4096, 70_000, 300_000]
        .iter()
        .enumerate()
    {
        let p = data.join(format!("f{i}"));
        std::fs::write(&p, rng.bytes(*size)).expect("write");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600 + i as u32))
            .expect("chmod");
    }
    let many = root.join("many");
    std::fs::create_dir_all(&many).expect("mkdir");
    for i in 0..150 {
        std::fs::write(
            many.join(format!("small{i:03}")),
            rng.bytes(2500 + (i % 7) * 300),
        )
        .expect("write");
    }
}

pub const SHADOW_OK: &[u8] =
    b"root:!:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nalice:$6$x$y:19000:0:99999:7:::\n";

/// (name, mkfs options, image MiB)
pub const VARIANTS: &[(&str, &[&str], u64)] = &[
    ("default-1k", &["-b", "1024"], 32),
    ("default-4k", &["-b", "4096", "-g", "4096"], 48),
    (
        "no-metadata-csum",
        &["-b", "1024", "-O", "^metadata_csum"],
        32,
    ),
    (
        "no-64bit",
        &["-b", "4096", "-g", "4096", "-O", "^64bit"],
        48,
    ),
    (
        "no-csum",
        &["-b", "1024", "-O", "^metadata_csum,^uninit_bg"],
        32,
    ),
    ("no-flex-bg", &["-b", "1024", "-O", "^flex_bg"], 32),
];
