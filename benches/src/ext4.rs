//! `benches ext4`: reading one guest file out of a VM disk, vmdisk vs the usual pair.
//!
//! The disk has the `nixos-rebuild build-vm` shape: a whole-disk ext4 labelled `nixos`
//! (8 GiB virtual) as a qcow2 base, with a qcow2 overlay on top as `run-nixos-vm` leaves it.
//! vmdisk runs `vmdisk cat overlay.qcow2 /etc/shadow` (whole process); the pair is what
//! people do today without root: `qemu-img convert -O raw` of the overlay, then
//! `debugfs -R 'cat /etc/shadow'` on the result. Both outputs must be identical.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// Timed runs per side (best and median are reported).
const RUNS: usize = 15;
/// Goals from the issue: vmdisk under 20 ms, and at least 20x the pair.
const GOAL_MS: f64 = 20.0;
const GOAL_RATIO: f64 = 20.0;

fn run(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .output()
        .with_context(|| format!("running {cmd:?} (is it installed?)"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out.stdout)
}

fn build(dir: &Path) -> Result<std::path::PathBuf> {
    let overlay = dir.join("ext4-overlay.qcow2");
    let root = dir.join("ext4-root");
    let base_raw = dir.join("ext4-base.raw");
    let base = dir.join("ext4-base.qcow2");
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(root.join("etc"))?;
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:System administrator:/root:/bin/sh\nalice:x:1000:100::/home/alice:/bin/sh\n",
    )?;
    std::fs::write(
        root.join("etc/shadow"),
        "root:!:20000::::::\nalice:$6$salt$hash:20000::::::\n",
    )?;
    // Some bulk so the filesystem is not trivially empty (~64 MiB in 256 files).
    let store = root.join("nix/store");
    std::fs::create_dir_all(&store)?;
    let block: Vec<u8> = (0..256 * 1024u32).map(|i| (i * 2654435761) as u8).collect();
    for i in 0..256 {
        std::fs::write(store.join(format!("file-{i:03}")), &block)?;
    }
    let f = std::fs::File::create(&base_raw)?;
    f.set_len(8 << 30)?;
    drop(f);
    run(Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "nixos", "-d"])
        .arg(&root)
        .arg(&base_raw))?;
    let _ = std::fs::remove_file(&base);
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&base_raw)
        .arg(&base))?;
    std::fs::remove_file(&base_raw)?;
    let _ = std::fs::remove_file(&overlay);
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&overlay))?;
    Ok(overlay)
}

fn stats(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (ms(v[0]), ms(v[v.len() / 2]))
}

pub fn bench(vmdisk: &Path, dir: &Path) -> Result<()> {
    let overlay = build(dir)?;
    let scratch = dir.join("ext4-pair.raw");
    let mut ours = Vec::new();
    let mut pair = Vec::new();
    let mut want = None;
    for _ in 0..RUNS {
        let t = Instant::now();
        let a = run(Command::new(vmdisk)
            .arg("cat")
            .arg(&overlay)
            .arg("/etc/shadow"))?;
        ours.push(t.elapsed());

        let t = Instant::now();
        let _ = std::fs::remove_file(&scratch);
        run(Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&overlay)
            .arg(&scratch))?;
        let b = run(Command::new("debugfs")
            .args(["-R", "cat /etc/shadow"])
            .arg(&scratch))?;
        pair.push(t.elapsed());
        if a != b {
            bail!("vmdisk cat and debugfs disagree on /etc/shadow: {a:?} vs {b:?}");
        }
        want.get_or_insert(a);
    }
    let _ = std::fs::remove_file(&scratch);
    let (ob, om) = stats(ours);
    let (pb, pm) = stats(pair);
    let ratio = pb / ob;
    println!("| job: /etc/shadow out of an 8 GiB qcow2 overlay | best ms | median ms |");
    println!("|---|--:|--:|");
    println!("| qemu-img convert + debugfs -R cat | {pb:.1} | {pm:.1} |");
    println!("| vmdisk cat | {ob:.1} | {om:.1} |");
    println!();
    println!(
        "speed ratio {ratio:.0}x (goal >= {GOAL_RATIO:.0}x: {}); vmdisk {ob:.1} ms (goal < {GOAL_MS:.0} ms: {})",
        if ratio >= GOAL_RATIO { "PASS" } else { "MISS" },
        if ob < GOAL_MS { "PASS" } else { "MISS" },
    );
    Ok(())
}
