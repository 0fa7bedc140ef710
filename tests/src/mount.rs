//! Root-only helpers of the tests that hand filesystems to the real kernel: a shell command
//! that must succeed, the root requirement, and a loop mount undone on drop.

use std::path::{Path, PathBuf};
use std::process::Command;

/// Run `cmd` with `sh -c`; panic with everything it printed unless it succeeds.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(cmd)
        .output()
        .expect("run sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fail (never skip) unless the tests run as root, as loop mounts need (CI is root).
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    assert_eq!(
        uid, 0,
        "these tests loop-mount filesystems: run them as root (CI does)"
    );
}

/// A loop mount that is undone on drop, even when an assertion fails.
pub struct LoopMount {
    pub dir: PathBuf,
}

impl LoopMount {
    /// `mount -o loop,OPTS IMG DIR` (DIR is created).
    pub fn new(img: &Path, dir: &Path, opts: &str) -> LoopMount {
        std::fs::create_dir_all(dir).expect("mkdir");
        sh(&format!(
            "mount -o loop,{opts} '{}' '{}'",
            img.display(),
            dir.display()
        ));
        LoopMount {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}
