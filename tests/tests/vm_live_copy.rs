//! A running guest's disk, copied with `vmdisk copy --qmp` while the guest writes, reads
//! exactly what the guest had committed (issue 14).
//!
//! The test VM's root ext4 has the smallest journal mke2fs makes (`-J size=1`,
//! testvms/layouts/small-journal.json), mounted with `commit=1`. In the guest, a tree is
//! written and synced, a writer churns files (create, rewrite, symlink, rename, delete, fsync)
//! until the kernel's own journal statistics say the log has wrapped several times, a second
//! tree is written and synced, and the disk is copied through qemu's QMP socket while the
//! writer still runs. On the host, judged by tools no one here wrote:
//! - dumpe2fs: the copy's root has `needs_recovery` and a live journal (log start not 0);
//! - e2fsck `-E journal_only` on a twin of the copy, then debugfs `rdump`: the tree the guest
//!   had committed, which vmdisk's `ls -R --json` and `cat` of the un-replayed copy must equal
//!   entry for entry (kind, size, sha256, mode, owner, symlink target);
//! - every file the guest had synced is there with the content the guest's sha256sum saw.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

use tests::testvm::{
    assert_no_leftovers, debugfs_tree, def, dumpe2fs_header, e2fsck_replay_journal, guest, harness,
    root_partition_raw, tree_diff, vm_report, vmdisk_tree, Node,
};
use tests::{run_with_timeout, vmdisk_bin, workspace_root};
use vmdisk_vm::run::{Booted, Faults, PrepareOptions, Timings};

/// One guest command that returns at once (writing a small tree, reading a counter).
const GUEST_COMMAND: Duration = Duration::from_secs(60);
/// How long the writer may take to wrap the log the required number of times.
const WRAP_TIMEOUT: Duration = Duration::from_secs(150);
/// `vmdisk copy --qmp` of a 160 MiB disk (qemu's backup job runs on the host's I/O threads).
const COPY_TIMEOUT: Duration = Duration::from_secs(120);
/// Journal blocks the writer must have logged before the copy, in journal lengths: the
/// guest's log has wrapped at least this many times.
const WRAPS: u64 = 5;
/// The journal of testvms/layouts/small-journal.json: mke2fs's minimum, 1024 blocks.
const JOURNAL_BLOCKS: u64 = 1024;

/// The churn loop: every iteration a transaction (fsync(2) of a directory: `sync DIR`; this
/// busybox has no `fsync` applet), so the small journal fills fast.
const WRITER: &str = "mkdir -p /churn && cd /churn || exit 1; i=0; while :; do i=$((i+1)); \
    d=d$((i % 13)); mkdir -p $d; echo \"content $i\" > $d/f$((i % 97)); \
    ln -sf f$((i % 97)) $d/l$((i % 7)); mv $d/f$((i % 89)) $d/g$((i % 5)) 2>/dev/null; \
    rm -f $d/g$((i % 3)); \
    if [ $((i % 40)) -eq 0 ]; then head -c $((i * 97 % 300000)) /dev/urandom > big$((i % 4)); fi; \
    sync $d; echo $i > /run/churn.count; done";

/// Total blocks the root filesystem's jbd2 has logged since mount (transactions x logged
/// blocks per transaction, from /proc/fs/jbd2/DEV-8/info).
const LOGGED: &str = "awk 'NR==1{t=$1} /logged blocks per transaction/{l=$1} END{print t*l}' \
    /proc/fs/jbd2/*-8/info";

/// Write a small tree under /synced/NAME (files of varied sizes, one with mode 640, a
/// symlink), make it durable with `sync_cmd`, and print `sha256sum` of every file.
fn synced_tree(name: &str, sync_cmd: &str) -> String {
    format!(
        "mkdir -p /synced/{name}/sub && for i in $(seq 1 25); do seq $i $((i*61)) > \
         /synced/{name}/f$i; done && head -c 150000 /dev/urandom > /synced/{name}/sub/random \
         && chmod 640 /synced/{name}/f2 && ln -s f1 /synced/{name}/link && {sync_cmd} && \
         find /synced/{name} -type f | sort | xargs sha256sum"
    )
}

/// `sha256sum` output -> path -> sha256.
fn sums(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(h, p)| (p.trim().to_string(), h.to_string()))
        .collect()
}

/// Iterations the guest's writer has finished.
fn churn_count(b: &Booted) -> u64 {
    let out = guest(&b.vm, &b.ssh, "cat /run/churn.count", GUEST_COMMAND);
    out.trim()
        .parse()
        .unwrap_or_else(|_| panic!("churn count {out:?}"))
}

#[test]
fn qmp_copy_of_a_running_guest_reads_like_e2fsck_journal_replay() {
    let t0 = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let h = harness(tmp.path());
    let mut d = def("x86_64");
    d.layout = workspace_root().join("testvms/layouts/small-journal.json");
    let p = h
        .prepare(
            &d,
            &PrepareOptions {
                tag: Some("live-copy".into()),
                ..Default::default()
            },
        )
        .unwrap();
    let mut b = h
        .boot(&p, &Faults::default(), "", &mut Timings::default())
        .unwrap_or_else(|e| panic!("the test VM did not boot: {e:#}"));
    let (vm, ssh) = (&b.vm, &b.ssh);
    let mounts = guest(
        vm,
        ssh,
        "mount -o remount,commit=1 / && grep ' / ' /proc/mounts",
        GUEST_COMMAND,
    );
    assert!(mounts.contains("commit=1"), "root not remounted: {mounts}");

    // Synced long before the copy (sync(1) writes the blocks home too).
    let mut expected = sums(&guest(
        vm,
        ssh,
        &synced_tree("early", "sync"),
        GUEST_COMMAND,
    ));
    guest(
        vm,
        ssh,
        &format!("setsid sh -c '{WRITER}' </dev/null >/dev/null 2>&1 & echo started"),
        GUEST_COMMAND,
    );
    // Readiness: the kernel's count of logged journal blocks, polled in the guest.
    let wrapped = guest(
        vm,
        ssh,
        &format!(
            "until [ \"$({LOGGED})\" -ge {} ]; do usleep 200000; done; {LOGGED}",
            WRAPS * JOURNAL_BLOCKS
        ),
        WRAP_TIMEOUT,
    );
    let logged_before: u64 = wrapped.trim().parse().expect("logged blocks");
    // Made durable just before the copy by fsync(2) of each file and directory (`sync
    // FILE...`): committed to the journal, not yet written home (so a reader that ignored the
    // journal would miss it). The writer's count comes in the same session, to keep the copy
    // close behind.
    let late = guest(
        vm,
        ssh,
        &format!(
            "{} && cat /run/churn.count",
            synced_tree(
                "late",
                "sync /synced/late/f* /synced/late/sub/random /synced/late/sub /synced/late \
                 /synced"
            )
        ),
        GUEST_COMMAND,
    );
    expected.extend(sums(&late));
    assert_eq!(expected.len(), 52, "{expected:?}");
    let before: u64 = late.lines().last().unwrap_or_default().parse().unwrap();

    let copy = tmp.path().join("copy.qcow2");
    let out = b.vm.lend_qmp(|sock| {
        run_with_timeout(
            Command::new(vmdisk_bin())
                .args(["copy", "--json", "--qmp"])
                .arg(sock)
                .arg(&p.disk)
                .arg(&copy),
            COPY_TIMEOUT,
        )
    });
    assert!(
        out.success(),
        "vmdisk copy --qmp:\n{out}\n{}",
        vm_report(&b.vm)
    );
    let after = churn_count(&b);
    assert!(
        after > before,
        "the writer did not run during the copy ({before} -> {after} iterations)"
    );
    let info = guest(&b.vm, &b.ssh, "cat /proc/fs/jbd2/*-8/info", GUEST_COMMAND);
    drop(b);
    let copied_at = t0.elapsed();

    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let part = root_partition_raw(&copy, "disk-main-root", &work);
    let head = dumpe2fs_header(&part);
    let features = head.get("Filesystem features").cloned().unwrap_or_default();
    let field = |k: &str| -> u64 {
        head.get(k)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("dumpe2fs -h shows no number for {k:?}: {head:?}"))
    };
    let journal_start = field("Journal start");
    let journal_len = field("Total journal blocks");
    assert!(
        features.contains("needs_recovery") && journal_start != 0,
        "the copy's journal is not live: features {features}, journal start {journal_start}"
    );
    assert_eq!(journal_len, JOURNAL_BLOCKS, "{head:?}");
    assert!(
        logged_before >= WRAPS * journal_len,
        "the log wrapped fewer than {WRAPS} times: {logged_before} blocks logged"
    );

    // The oracle: e2fsck replays a twin of the copy's root, debugfs dumps it.
    let twin = work.join("twin.raw");
    std::fs::copy(&part, &twin).unwrap();
    e2fsck_replay_journal(&twin);
    let replayed = dumpe2fs_header(&twin);
    assert!(
        !replayed["Filesystem features"].contains("needs_recovery"),
        "e2fsck left the journal unreplayed: {replayed:?}"
    );
    let theirs = debugfs_tree(&twin, &work, &[]);
    // (-c: without the replay the bitmaps fail their checksums and debugfs would not open it.)
    let unreplayed = debugfs_tree(&part, &work, &["-c"]);
    let ours = vmdisk_tree(&copy);
    let diff = tree_diff("vmdisk", &ours, "e2fsck+debugfs", &theirs);
    assert!(
        diff.is_empty(),
        "vmdisk's view of the live copy differs from e2fsck's journal replay in {} \
         entries:\n{}",
        diff.len(),
        diff.join("\n")
    );
    for (path, sha) in &expected {
        match ours.get(path).map(|e| &e.node) {
            Some(Node::File(_, got)) if got == sha => {}
            other => panic!("{path}: synced by the guest as {sha}, the copy has {other:?}"),
        }
    }
    let churn = ours.keys().filter(|k| k.starts_with("/churn/")).count();
    assert!(churn > 20, "the writer's tree has {churn} entries");
    // The replay mattered: a reader ignoring the journal (debugfs on the un-replayed copy)
    // gets entries wrong, among them files the guest had fsync'ed.
    let stale = tree_diff("unreplayed", &unreplayed, "replayed", &theirs);
    let stale_late = expected
        .keys()
        .filter(|k| unreplayed.get(*k) != theirs.get(*k))
        .count();
    assert!(
        stale_late > 0,
        "every synced file was already home: the copy does not test the journal replay \
         ({} entries differ without it)",
        stale.len()
    );
    println!(
        "live copy after {copied_at:?} (total {:?}): {} entries ({churn} in /churn), {} \
         synced files checked; journal {journal_len} blocks, start {journal_start}, {} logged \
         blocks before the copy ({:.1} log lengths); writer iterations {before} -> {after} \
         across the copy; {} entries ({stale_late} synced files) differ without the replay\n{info}",
        t0.elapsed(),
        ours.len(),
        expected.len(),
        logged_before,
        logged_before as f64 / journal_len as f64,
        stale.len(),
    );
    assert_no_leftovers(tmp.path());
}
