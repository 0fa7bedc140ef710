//! Done-when 5: a SIGKILL at any moment of a write workload leaves a qcow2 that
//! `qemu-img check` finds free of corruption (leaks allowed, as for qemu); `vmdisk check`
//! agrees with qemu-img on the verdict, and `vmdisk check -r leaks` repairs the leaks so
//! `qemu-img check` then exits 0.
//!
//! The workload is `src/bin/qcow2-workload.rs` (vmdisk_image::open read-write, endless
//! seeded writes/zeroes/discards/flushes). 50 kills at seeded random moments 5-300 ms after
//! the image is open, across three image kinds, each image sometimes fresh, sometimes
//! continued from the last kill.

use std::io::BufRead as _;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use tests::*;

const KILLS: usize = 50;
const SIZE: u64 = 64 * MIB;

struct Scenario {
    label: &'static str,
    file: &'static str,
    opts: &'static str,
    cluster: u64,
    backing: bool,
    /// Starts as a copy of base.raw carrying an internal snapshot "keep" of that content.
    snapshot: bool,
}

const SCENARIOS: [Scenario; 4] = [
    Scenario {
        label: "64K clusters",
        file: "a.qcow2",
        opts: "cluster_size=65536",
        cluster: 65536,
        backing: false,
        snapshot: false,
    },
    Scenario {
        label: "4K clusters, refcount_bits=4",
        file: "b.qcow2",
        opts: "cluster_size=4096,refcount_bits=4",
        cluster: 4096,
        backing: false,
        snapshot: false,
    },
    Scenario {
        label: "overlay over a qcow2",
        file: "c.qcow2",
        opts: "cluster_size=65536",
        cluster: 65536,
        backing: true,
        snapshot: false,
    },
    Scenario {
        label: "image with an internal snapshot",
        file: "d.qcow2",
        opts: "cluster_size=65536",
        cluster: 65536,
        backing: false,
        snapshot: true,
    },
];

fn fresh(d: &Path, sc: &Scenario) {
    let img = d.join(sc.file);
    std::fs::remove_file(&img).ok();
    if sc.snapshot {
        qemu_img_in(
            d,
            &["convert", "-O", "qcow2", "-o", sc.opts, "base.raw", sc.file],
        )
        .ok();
        qemu_img_in(d, &["snapshot", "-c", "keep", sc.file]).ok();
        return;
    }
    let mut args = vec!["create", "-q", "-f", "qcow2", "-o", sc.opts];
    if sc.backing {
        args.extend(["-b", "base.qcow2", "-F", "qcow2"]);
    }
    let size = SIZE.to_string();
    args.push(sc.file);
    args.push(&size);
    qemu_img_in(d, &args).ok();
}

/// Start the workload and wait for it to have the image open; returns it.
fn start(bin: &str, img: &Path, seed: u64, cluster: u64, log: &Path) -> Background {
    let mut cmd = Command::new(bin);
    cmd.arg(img).arg(seed.to_string()).arg(cluster.to_string());
    let line = cmdline(&cmd);
    let err = std::fs::File::create(log).expect("log");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {line}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let mut bg = Background {
        child,
        cmdline: line,
    };
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut l = String::new();
        let _ = std::io::BufReader::new(stdout).read_line(&mut l);
        let _ = tx.send(l);
    });
    match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(l) if l.trim() == "ready" => bg,
        other => {
            bg.kill();
            panic!(
                "the workload did not open the image ({other:?}):\n  $ {}\n  stderr: {}",
                bg.cmdline,
                std::fs::read_to_string(log).unwrap_or_default()
            )
        }
    }
}

#[test]
fn sigkill_never_corrupts() {
    require_tool("qemu-img");
    let bin = env!("CARGO_BIN_EXE_qcow2-workload");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    make_sparse_raw(&d.join("base.raw"), SIZE, 1234, 40, MIB);
    qemu_img_in(d, &["convert", "-O", "qcow2", "base.raw", "base.qcow2"]).ok();
    let base_sha = sha256(&d.join("base.qcow2"));
    for sc in &SCENARIOS {
        fresh(d, sc);
    }
    let mut rng = Rng::new(0xC4A5);
    let mut leaky = 0;
    for i in 0..KILLS {
        let sc = &SCENARIOS[i % SCENARIOS.len()];
        let renew = rng.chance(1, 4);
        if renew {
            fresh(d, sc);
        }
        let img = d.join(sc.file);
        let delay = rng.range(5, 301);
        let seed = rng.next_u64();
        let what = format!(
            "kill #{i} ({}, {} image, workload seed {seed}, {delay} ms after open)",
            sc.label,
            if renew { "fresh" } else { "continued" }
        );
        let log = d.join("workload.stderr");
        let mut bg = start(bin, &img, seed, sc.cluster, &log);
        std::thread::sleep(Duration::from_millis(delay));
        assert!(
            bg.alive(),
            "{what}: the workload stopped by itself:\n  $ {}\n  stderr: {}",
            bg.cmdline,
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        bg.kill(); // SIGKILL + reap: its locks are gone

        let (code, qv, q) = qemu_check(&img);
        assert!(
            code == 0 || code == 3,
            "{what}: qemu-img check finds corruption after SIGKILL (exit {code}):\n{q}"
        );
        let v = vmdisk(&["check", "--json", s(&img)]);
        let vj: serde_json::Value = serde_json::from_str(&v.stdout).unwrap_or_default();
        assert_eq!(
            v.code(),
            code,
            "{what}: vmdisk check's verdict differs from qemu-img check's\nvmdisk:\n{v}\nqemu-img:\n{q}"
        );
        let (ql, vl) = (
            qv["leaks"].as_u64().unwrap_or(0),
            vj["leaks"].as_u64().unwrap_or(0),
        );
        assert_eq!(
            vl, ql,
            "{what}: vmdisk check counts {vl} leaks, qemu-img {ql}\nvmdisk:\n{v}\nqemu-img:\n{q}"
        );
        if sc.snapshot {
            let kept = d.join("kept.raw");
            qemu_img_in(
                d,
                &[
                    "convert",
                    "-l",
                    "snapshot.name=keep",
                    "-O",
                    "raw",
                    sc.file,
                    s(&kept),
                ],
            )
            .ok();
            let c = qemu_img_in(
                d,
                &["compare", "-f", "raw", "-F", "raw", "base.raw", s(&kept)],
            );
            assert_eq!(
                c.code(),
                0,
                "{what}: the internal snapshot's content changed:\n{c}"
            );
        }
        if code == 3 {
            leaky += 1;
            let r = vmdisk(&["check", "-r", "leaks", s(&img)]);
            assert_eq!(
                r.code(),
                0,
                "{what}: vmdisk check -r leaks did not end clean:\n{r}\nqemu-img before:\n{q}"
            );
            let (code2, _, q2) = qemu_check(&img);
            assert_eq!(code2, 0, "{what}: after vmdisk check -r leaks, qemu-img check is not clean:\n{q2}\nrepair:\n{r}");
        }
    }
    assert_eq!(
        sha256(&d.join("base.qcow2")),
        base_sha,
        "the overlay workload changed its backing file"
    );
    eprintln!("{KILLS} kills, {leaky} left leaks that vmdisk repaired");
}
