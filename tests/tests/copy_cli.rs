//! `vmdisk copy` against the real tools.
//!
//! - Offline: a qcow2 overlay is copied byte for byte (sha256) and stays a valid overlay of the
//!   same base (`qemu-img compare`, `qemu-img check`); a sparse raw stays sparse; a relative
//!   backing name copied elsewhere is warned about; an existing DST is never replaced without
//!   --force; `--reflink=always` on a filesystem without reflinks fails and leaves nothing.
//! - Locks: while qemu-nbd holds an image read-write, copying it is refused with an error that
//!   names the lock and `--qmp`; `-U` copies anyway; a DST qemu holds is never replaced.
//! - Reflinks for real: on a loop-mounted XFS (reflink=1), `--reflink=always` shares every
//!   extent (`filefrag -v` says "shared", free space does not drop), `never` shares none.
//! - Live (`--qmp`): a real qemu-system-x86_64 runs an overlay; while a rate-limited copy is in
//!   progress the "guest" (HMP qemu-io) overwrites the disk, and the copy still holds the disk
//!   as of the copy's start (`qemu-img compare` against the expected raw) while the live disk
//!   holds the new data; a wrong --device lists qemu's nodes; Ctrl-C cancels cleanly.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use tests::*;

/// qemu's "write" permission byte and its "I do not share write" byte.
const QEMU_PERM_WRITE: i64 = 101;
const QEMU_SHARED_WRITE: i64 = 201;

/// statfs magic numbers of filesystems that can share extents.
const XFS_MAGIC: i64 = 0x5846_5342;
const BTRFS_MAGIC: i64 = 0x9123_683e;
const BCACHEFS_MAGIC: i64 = 0xca45_1a4e;

fn statfs(path: &Path) -> libc::statfs {
    let c = std::ffi::CString::new(s(path)).unwrap();
    // SAFETY: statfs is plain old data; all-zero is valid and the call fills it in.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid out-pointer, both live for the call.
    let r = unsafe { libc::statfs(c.as_ptr(), &mut st) };
    assert_eq!(
        r,
        0,
        "statfs {}: {}",
        path.display(),
        std::io::Error::last_os_error()
    );
    st
}

/// The filesystem type (statfs magic) of `path`.
// f_type is an i64 on Linux x86_64 and aarch64 but not everywhere.
#[allow(clippy::unnecessary_cast)]
fn fs_type(path: &Path) -> i64 {
    statfs(path).f_type as i64
}

/// A temp dir on a filesystem that cannot share extents (the machine's ext4 in CI; /dev/shm
/// where the temp dir is on btrfs or XFS).
fn no_reflink_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let ft = fs_type(dir.path());
    if ![XFS_MAGIC, BTRFS_MAGIC, BCACHEFS_MAGIC].contains(&ft) {
        return dir;
    }
    let shm = Path::new("/dev/shm");
    assert!(
        shm.is_dir(),
        "TEST SETUP: the temp dir is on a reflink-capable filesystem and there is no /dev/shm; \
         point TMPDIR at an ext4 or tmpfs directory"
    );
    tempfile::tempdir_in(shm).unwrap()
}

/// Names in `dir` that look like a copy's temporary file.
fn temp_files(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("vmdisk-tmp"))
        .collect()
}

/// base.qcow2 (data) and ov.qcow2 over it by the relative name "base.qcow2" (more data).
fn overlay_fixture(d: &Path) -> (PathBuf, PathBuf) {
    let base = d.join("base.qcow2");
    let ov = d.join("ov.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "32M"]).ok();
    qemu_io(
        &base,
        &["write -P 0x11 0 4M".into(), "write -P 0x12 10M 1M".into()],
    );
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    )
    .ok();
    qemu_io(
        &ov,
        &[
            "write -P 0x21 1M 1M".into(),
            "write -P 0x22 12345678 100000".into(),
            "write -z 3M 64k".into(),
        ],
    );
    (base, ov)
}

#[test]
fn offline_copy_of_an_overlay_is_the_same_file_and_the_same_disk() {
    let dir = no_reflink_dir();
    let d = dir.path();
    let (base, ov) = overlay_fixture(d);
    let base_sha = sha256(&base);

    let r = vmdisk_in(d, &["copy", "--json", "-p", "ov.qcow2", "copy.qcow2"]).ok();
    let v = r.json();
    let copy = d.join("copy.qcow2");
    assert_eq!(
        sha256(&copy),
        sha256(&ov),
        "the copy is not byte-identical:\n{r}"
    );
    assert_eq!(v["format"], "qcow2", "{r}");
    assert_eq!(v["backing_file"], "base.qcow2", "{r}");
    assert_eq!(v["backing_elsewhere"], Value::Null, "{r}");
    assert_eq!(v["size"], fs::metadata(&ov).unwrap().len(), "{r}");
    assert_ne!(
        v["method"], "reflink",
        "this filesystem cannot reflink:\n{r}"
    );
    assert!(v["seconds"].is_number(), "{r}");
    assert_qemu_compare_identical(d, "ov.qcow2", "copy.qcow2", "overlay copy");
    assert_qemu_check_clean(&copy, "overlay copy");
    let info = qemu_info(d, "copy.qcow2");
    assert_eq!(info["backing-filename"], "base.qcow2");
    assert_eq!(info["backing-filename-format"], "qcow2");
    assert!(temp_files(d).is_empty(), "{:?}", temp_files(d));

    // Into another directory: the same name there means another (missing) file — warned.
    fs::create_dir(d.join("elsewhere")).unwrap();
    let r = vmdisk_in(d, &["copy", "--json", "ov.qcow2", "elsewhere/"]).ok();
    let v = r.json();
    assert_eq!(sha256(&d.join("elsewhere/ov.qcow2")), sha256(&ov));
    assert_eq!(v["backing_elsewhere"]["name"], "base.qcow2", "{r}");
    assert!(
        r.stderr.contains("warning")
            && r.stderr.contains("relative")
            && r.stderr.contains("rebase"),
        "no warning about the relative backing name:\n{r}"
    );
    assert_eq!(sha256(&base), base_sha, "the backing file changed");
}

#[test]
fn offline_copy_of_a_sparse_raw_stays_sparse() {
    use std::os::unix::fs::MetadataExt;
    let dir = no_reflink_dir();
    let d = dir.path();
    let src = d.join("sparse.raw");
    make_sparse_raw(&src, 64 * MIB, 42, 12, 500 * KIB);
    for (reflink, method, name) in [
        ("--reflink=never", "read_write", "never.raw"),
        ("--reflink=auto", "", "auto.raw"),
    ] {
        let dst = d.join(name);
        let r = vmdisk(&["copy", "--json", reflink, s(&src), s(&dst)]).ok();
        let v = r.json();
        if method.is_empty() {
            assert!(
                v["method"] == "copy_file_range" || v["method"] == "read_write",
                "auto without reflinks falls back to a sparse copy:\n{r}"
            );
        } else {
            assert_eq!(v["method"], method, "{r}");
        }
        assert_eq!(sha256(&dst), sha256(&src), "{reflink}: content differs");
        let r = qemu_img(&["compare", "-f", "raw", "-F", "raw", s(&src), s(&dst)]);
        assert_eq!(r.code(), 0, "{reflink}:\n{r}");
        let (sb, db) = (
            fs::metadata(&src).unwrap().blocks() * 512,
            fs::metadata(&dst).unwrap().blocks() * 512,
        );
        assert_eq!(fs::metadata(&dst).unwrap().len(), 64 * MIB);
        // The same data extents, so about the same allocation (allow the fs some slack).
        assert!(
            db <= sb + sb / 10 + 64 * KIB && db + sb / 10 + 64 * KIB >= sb,
            "{reflink}: source allocates {sb} bytes, the copy {db}"
        );
        assert!(
            db < 16 * MIB,
            "{reflink}: the copy is not sparse ({db} bytes)"
        );
        assert_eq!(
            v["data_bytes"].as_u64().unwrap(),
            v["bytes_copied"].as_u64().unwrap()
        );
    }
}

#[test]
fn reflink_always_fails_cleanly_without_reflinks_and_existing_dst_needs_force() {
    let dir = no_reflink_dir();
    let d = dir.path();
    let (_, ov) = overlay_fixture(d);
    let dst = d.join("c.qcow2");
    for flag in ["--reflink=always", "--reflink"] {
        let r = vmdisk(&["copy", flag, s(&ov), s(&dst)]).expect_code(1);
        let out = r.all_output_lower();
        assert!(
            out.contains("cannot reflink") && out.contains("share extents"),
            "{flag}: the error does not say the filesystem cannot share extents:\n{r}"
        );
        assert!(!dst.exists(), "{flag} left {} behind", dst.display());
        assert!(temp_files(d).is_empty(), "{flag} left {:?}", temp_files(d));
    }

    fs::write(&dst, b"precious").unwrap();
    let r = vmdisk(&["copy", s(&ov), s(&dst)]).expect_code(1);
    assert!(
        r.stderr.contains("--force"),
        "the refusal does not offer --force:\n{r}"
    );
    assert_eq!(fs::read(&dst).unwrap(), b"precious");
    vmdisk(&["copy", "--force", s(&ov), s(&dst)]).ok();
    assert_eq!(sha256(&dst), sha256(&ov));
    assert!(temp_files(d).is_empty());
}

/// qemu-nbd serving `img` read-write: it holds qemu's write lock until dropped.
fn qemu_holds(d: &Path, img: &Path, name: &str) -> Background {
    let sock = d.join(format!("{name}.sock"));
    let mut bg = Background::spawn(
        Command::new(require_tool("qemu-nbd"))
            .arg("--socket")
            .arg(&sock)
            .args(["-f", "qcow2"])
            .arg(img),
        d,
        name,
    );
    let held = wait_until(Duration::from_secs(20), || {
        lock_byte_held(img, QEMU_PERM_WRITE) && lock_byte_held(img, QEMU_SHARED_WRITE)
    });
    assert!(
        held,
        "TEST BUG: qemu-nbd did not take the write lock within 20 s (alive: {}):\n  $ {}",
        bg.alive(),
        bg.cmdline
    );
    bg
}

#[test]
fn an_image_qemu_writes_is_copied_only_with_force_share() {
    let dir = no_reflink_dir();
    let d = dir.path();
    let (_, ov) = overlay_fixture(d);
    let dst = d.join("c.qcow2");
    let mut holder = qemu_holds(d, &ov, "nbd-src");

    let r = vmdisk(&["copy", s(&ov), s(&dst)]).expect_code(1);
    let out = r.all_output_lower();
    for needle in ["lock", "--qmp", "-u/--force-share", "stop the vm"] {
        assert!(
            out.contains(needle),
            "the refusal does not mention `{needle}`:\n{r}"
        );
    }
    assert!(!dst.exists() && temp_files(d).is_empty());

    let r = vmdisk(&["copy", "-U", "--json", s(&ov), s(&dst)]).ok();
    assert!(
        r.stderr.contains("inconsistent"),
        "-U does not warn that the copy may be inconsistent:\n{r}"
    );
    assert_eq!(r.json()["possibly_inconsistent"], true, "{r}");
    assert_eq!(sha256(&dst), sha256(&ov));
    assert!(holder.alive());
    holder.kill();

    // A destination qemu holds is never replaced, not even with --force.
    let other = d.join("other.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&other), "1M"]).ok();
    let other_sha = sha256(&other);
    let mut holder = qemu_holds(d, &other, "nbd-dst");
    let r = vmdisk(&["copy", "--force", s(&ov), s(&other)]).expect_code(1);
    assert!(r.all_output_lower().contains("lock"), "{r}");
    assert_eq!(
        sha256(&other),
        other_sha,
        "a destination qemu holds was replaced"
    );
    assert!(temp_files(d).is_empty());
    holder.kill();
}

// ---------------------------------------------------------------------------------------------
// Real reflinks: XFS in a loop-mounted file
// ---------------------------------------------------------------------------------------------

/// A filesystem image loop-mounted on a temp dir; unmounted on drop.
struct LoopMount {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopMount {
    fn xfs() -> LoopMount {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        assert!(
            root,
            "the reflink test loop-mounts an XFS filesystem and must run as root (CI does); \
             run it with sudo, e.g. `sudo -E cargo test -p tests --test copy_cli`"
        );
        let mkfs = require_guest_tool("mkfs.xfs");
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("xfs.img");
        // mkfs.xfs refuses filesystems under 300 MiB; the file stays sparse.
        fs::File::create(&img).unwrap().set_len(512 * MIB).unwrap();
        run(Command::new(mkfs).args(["-q", "-m", "reflink=1"]).arg(&img)).ok();
        let mnt = dir.path().join("mnt");
        fs::create_dir(&mnt).unwrap();
        guest_tool("mount", &["-o", "loop", s(&img), s(&mnt)]).ok();
        LoopMount { mnt, _dir: dir }
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let r = guest_tool("umount", &[s(&self.mnt)]);
        if !r.success() {
            guest_tool("umount", &["-l", s(&self.mnt)]);
        }
    }
}

fn free_bytes(path: &Path) -> u64 {
    let st = statfs(path);
    st.f_bfree * st.f_bsize as u64
}

#[test]
fn reflink_always_shares_every_extent_on_xfs() {
    let fs_ = LoopMount::xfs();
    let d = &fs_.mnt;
    assert_eq!(fs_type(d), XFS_MAGIC, "not an XFS mount");
    let src = d.join("disk.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&src), "64M"]).ok();
    qemu_io(
        &src,
        &["write -P 0x5a 0 8M".into(), "write -P 0xa5 40M 8M".into()],
    );
    let filefrag = require_guest_tool("filefrag");
    let shared = |p: &Path| {
        let r = run(Command::new(&filefrag).arg("-v").arg(p)).ok();
        (r.stdout.contains("shared"), r)
    };
    run(&mut Command::new("sync")).ok();
    let before = free_bytes(d);

    let dst = d.join("clone.qcow2");
    let r = vmdisk(&["copy", "--reflink=always", "--json", s(&src), s(&dst)]).ok();
    let v = r.json();
    assert_eq!(v["method"], "reflink", "{r}");
    assert_eq!(v["bytes_copied"], 0, "{r}");
    assert!(v["data_bytes"].as_u64().unwrap() >= 16 * MIB, "{r}");
    let (is_shared, ff) = shared(&dst);
    assert!(
        is_shared,
        "filefrag shows no shared extent in the reflink copy:\n{ff}"
    );
    run(&mut Command::new("sync")).ok();
    let used = before.saturating_sub(free_bytes(d));
    assert!(
        used < 2 * MIB,
        "a reflink of 16 MiB of data used {used} bytes of free space"
    );
    assert_eq!(sha256(&dst), sha256(&src));
    assert_qemu_compare_identical(d, "disk.qcow2", "clone.qcow2", "reflink copy");
    assert_qemu_check_clean(&dst, "reflink copy");

    // auto takes the reflink too; never shares nothing.
    let r = vmdisk(&["copy", "--json", s(&src), s(&d.join("auto.qcow2"))]).ok();
    assert_eq!(r.json()["method"], "reflink", "{r}");
    let never = d.join("never.qcow2");
    let r = vmdisk(&["copy", "--reflink=never", "--json", s(&src), s(&never)]).ok();
    assert_eq!(r.json()["method"], "read_write", "{r}");
    let (is_shared, ff) = shared(&never);
    assert!(
        !is_shared,
        "--reflink=never made a copy that shares extents:\n{ff}"
    );
    assert_eq!(sha256(&never), sha256(&src));
    assert!(temp_files(d).is_empty());
}

// ---------------------------------------------------------------------------------------------
// Live copies through QMP
// ---------------------------------------------------------------------------------------------

/// A qemu-system-x86_64 with no guest (-S) running `overlay` as drive d0 (node ov0), with two
/// QMP sockets: one for vmdisk, one for the test. Killed and reaped on drop.
struct Vm {
    bg: Background,
    qmp: vmdisk_qmp::Qmp,
    vmdisk_sock: PathBuf,
    dir: PathBuf,
}

impl Vm {
    fn start(dir: &Path, overlay: &Path) -> Vm {
        let lock = vmdisk_vm::assets::Lock::parse(
            &fs::read_to_string(workspace_root().join("testvms/assets.lock")).unwrap(),
        )
        .unwrap();
        let h = vmdisk_vm::run::Harness::new(
            vmdisk_bin(),
            vmdisk_vm::assets::Cache::new(vmdisk_vm::assets::Cache::default_root().unwrap()),
            lock,
            dir.join("artifacts"),
        )
        .tmp_root(dir);
        let qemu = h
            .qemu(vmdisk_vm::Arch::X86_64)
            .unwrap_or_else(|e| panic!("no qemu-system-x86_64 for the live copy test: {e:#}"));
        let vmdisk_sock = dir.join("qmp-vmdisk.sock");
        let test_sock = dir.join("qmp-test.sock");
        let mut cmd = qemu.command();
        if let Some(fw) = &qemu.firmware_dir {
            cmd.arg("-L").arg(fw);
            // The harness's firmware: no SeaBIOS needed (the CPU never runs anyway).
            if fw.join("qboot.rom").is_file() {
                cmd.arg("-bios").arg(fw.join("qboot.rom"));
            }
        }
        cmd.args(["-machine", "q35", "-nodefaults", "-display", "none", "-S"])
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", s(&vmdisk_sock)))
            .arg("-qmp")
            .arg(format!("unix:{},server=on,wait=off", s(&test_sock)))
            .arg("-drive")
            .arg(format!(
                "file={},format=qcow2,if=none,id=d0,node-name=ov0",
                s(overlay)
            ))
            .args(["-device", "virtio-blk-pci,drive=d0"]);
        let mut bg = Background::spawn(&mut cmd, dir, "qemu");
        let qmp = vmdisk_qmp::Qmp::connect(
            &test_sock,
            Some(&dir.join("qmp-test.log")),
            Duration::from_secs(30),
        )
        .unwrap_or_else(|e| {
            panic!(
                "qemu did not come up ({e:#}; alive: {}):\n  $ {}\n  stderr: {}",
                bg.alive(),
                bg.cmdline,
                fs::read_to_string(dir.join("qemu.stderr")).unwrap_or_default()
            )
        });
        eprintln!("live copy test: qemu {:?}", qmp.qemu_version());
        Vm {
            bg,
            qmp,
            vmdisk_sock,
            dir: dir.to_path_buf(),
        }
    }

    /// Run a qemu-io command on d0 through HMP (as the guest would write); panics on failure.
    #[track_caller]
    fn io(&mut self, cmd: &str) {
        let out = self
            .qmp
            .execute(
                "human-monitor-command",
                Some(json!({ "command-line": format!("qemu-io d0 \"{cmd}\"") })),
            )
            .unwrap_or_else(|e| panic!("HMP qemu-io {cmd}: {e:#}"));
        // qemu prints qemu-io's report on its own stdout, not into the HMP reply; an error
        // (bad device, bad command) comes back here.
        let text = out.as_str().unwrap_or_default();
        assert!(text.trim().is_empty(), "qemu-io d0 \"{cmd}\": {text}");
    }

    fn jobs(&mut self) -> Vec<Value> {
        self.qmp
            .execute("query-block-jobs", None)
            .unwrap()
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    fn node_names(&mut self) -> Vec<String> {
        self.qmp
            .execute("query-named-block-nodes", None)
            .unwrap()
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["node-name"].as_str().map(str::to_string))
            .collect()
    }

    fn stderr(&self) -> String {
        fs::read_to_string(self.dir.join("qemu.stderr")).unwrap_or_default()
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.qmp.quit();
        if !wait_until(Duration::from_secs(5), || !self.bg.alive()) {
            self.bg.kill();
        }
    }
}

/// The background `vmdisk copy --qmp ...`, with its output files.
fn spawn_copy(vm: &Vm, d: &Path, name: &str, args: &[&str]) -> Background {
    let mut cmd = Command::new(vmdisk_bin());
    cmd.current_dir(d)
        .args(["copy", "--qmp"])
        .arg(&vm.vmdisk_sock)
        .args(args);
    Background::spawn(&mut cmd, d, name)
}

fn wait_exit(
    bg: &mut Background,
    d: &Path,
    name: &str,
) -> (std::process::ExitStatus, String, String) {
    let mut status = None;
    let done = wait_until(Duration::from_secs(120), || {
        status = bg.child.try_wait().ok().flatten();
        status.is_some()
    });
    let out = fs::read_to_string(d.join(format!("{name}.stdout"))).unwrap_or_default();
    let err = fs::read_to_string(d.join(format!("{name}.stderr"))).unwrap_or_default();
    assert!(
        done,
        "`{}` did not finish in 120 s:\n{out}\n{err}",
        bg.cmdline
    );
    (status.unwrap(), out, err)
}

#[test]
fn live_copy_through_qmp_is_the_disk_as_of_its_start() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // base: 0x11 at 8M..12M; the overlay starts empty (its data comes from the "guest").
    let base = d.join("base.qcow2");
    qemu_img(&["create", "-q", "-f", "qcow2", s(&base), "64M"]).ok();
    qemu_io(&base, &["write -P 0x11 8M 4M".into()]);
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "base.qcow2",
            "-F",
            "qcow2",
            "ov.qcow2",
        ],
    )
    .ok();
    let ov = d.join("ov.qcow2");
    let base_sha = sha256(&base);
    let mut vm = Vm::start(d, &ov);

    // Pattern A, written by the "guest".
    vm.io("write -P 0xaa 0 6M");
    vm.io("write -P 0xa1 16M 1M");

    // A plain copy is refused: qemu holds the overlay.
    let r = vmdisk_in(d, &["copy", "ov.qcow2", "plain.qcow2"]).expect_code(1);
    assert!(
        r.all_output_lower().contains("lock") && r.stderr.contains("--qmp"),
        "copying a running VM's disk without --qmp is not refused with the lock:\n{r}"
    );

    // A wrong --device names what qemu has.
    let mut bg = spawn_copy(
        &vm,
        d,
        "wrong",
        &["--device", "nope", "ov.qcow2", "w.qcow2"],
    );
    let (st, _, err) = wait_exit(&mut bg, d, "wrong");
    assert!(!st.success(), "a wrong --device succeeded:\n{err}");
    for needle in ["nope", "ov0", "[drive d0]", "--device"] {
        assert!(
            err.contains(needle),
            "the error does not list `{needle}`:\n{err}"
        );
    }
    assert!(!d.join("w.qcow2").exists() && temp_files(d).is_empty());

    // The copy, slowed down so the guest can write while it runs.
    let t0 = std::time::Instant::now();
    let mut bg = spawn_copy(
        &vm,
        d,
        "live",
        &["--json", "--speed", "1M", "ov.qcow2", "copy.qcow2"],
    );
    let started = wait_until(Duration::from_secs(60), || {
        !vm.jobs().is_empty() || !bg.alive()
    });
    assert!(
        started && bg.alive(),
        "the backup job never showed up (vmdisk alive: {})",
        bg.alive()
    );
    // Pattern B over A, over base data the overlay did not have, and over nothing.
    vm.io("write -P 0xbb 0 6M");
    vm.io("write -P 0xb1 8M 4M");
    vm.io("write -P 0xb2 32M 1M");
    let jobs = vm.jobs();
    assert!(
        jobs.iter()
            .any(|j| j["offset"].as_u64() < j["len"].as_u64()),
        "TEST BUG: the copy finished before the guest wrote (lower --speed): {jobs:?}"
    );
    eprintln!("guest wrote B {:?} after the copy started", t0.elapsed());
    let (st, out, err) = wait_exit(&mut bg, d, "live");
    eprintln!("the copy took {:?}", t0.elapsed());
    assert!(
        st.success(),
        "vmdisk copy --qmp failed:\n{out}\n{err}\nqemu: {}",
        vm.stderr()
    );
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    assert_eq!(v["method"], "qmp_backup", "{out}");
    assert_eq!(v["sync"], "top", "{out}");
    assert_eq!(v["node"], "ov0", "{out}");

    // Nothing of the copy is left in qemu.
    assert!(vm.jobs().is_empty(), "a job is left: {:?}", vm.jobs());
    let nodes = vm.node_names();
    assert!(
        !nodes.iter().any(|n| n.starts_with("vmdisk-copy")),
        "vmdisk's node is left in qemu: {nodes:?}"
    );

    // The copy: the disk as of the start (A, the base's data, nothing where B went later).
    let copy = d.join("copy.qcow2");
    assert_qemu_check_clean(&copy, "live copy");
    let info = qemu_info(d, "copy.qcow2");
    assert_eq!(info["backing-filename"], "base.qcow2", "{info}");
    assert_eq!(info["backing-filename-format"], "qcow2", "{info}");
    assert_eq!(info["virtual-size"], 64 * MIB, "{info}");
    assert_eq!(info["cluster-size"], 65536, "{info}");
    let mut expected = vec![0u8; (64 * MIB) as usize];
    for (off, len, byte) in [
        (0, 6 * MIB, 0xaa),
        (8 * MIB, 4 * MIB, 0x11),
        (16 * MIB, MIB, 0xa1),
    ] {
        expected[off as usize..(off + len) as usize].fill(byte);
    }
    write_sparse_file(&d.join("expected-a.raw"), &expected);
    let r = qemu_img_in(
        d,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "copy.qcow2",
            "expected-a.raw",
        ],
    );
    assert_eq!(
        r.code(),
        0,
        "the copy is not the disk as of the copy's start:\n{r}"
    );

    // Ctrl-C: the job is cancelled, the node removed, nothing is left behind.
    let mut bg = spawn_copy(
        &vm,
        d,
        "intr",
        &["--speed", "256k", "ov.qcow2", "intr.qcow2"],
    );
    let started = wait_until(Duration::from_secs(60), || {
        !vm.jobs().is_empty() || !bg.alive()
    });
    assert!(
        started && bg.alive(),
        "the second backup job never showed up"
    );
    // SAFETY: kill(2) on our own child, which is still running (checked just above).
    unsafe { libc::kill(bg.child.id() as libc::pid_t, libc::SIGINT) };
    let (st, _, err) = wait_exit(&mut bg, d, "intr");
    assert!(!st.success() && err.contains("interrupted"), "{st}: {err}");
    assert!(
        vm.jobs().is_empty(),
        "the interrupted job is left: {:?}",
        vm.jobs()
    );
    assert!(!vm.node_names().iter().any(|n| n.starts_with("vmdisk-copy")));
    assert!(
        !d.join("intr.qcow2").exists() && temp_files(d).is_empty(),
        "{:?}",
        temp_files(d)
    );

    // The live disk has B (qemu flushes it when it quits).
    drop(vm);
    for (off, len, byte) in [
        (0, 6 * MIB, 0xbb),
        (8 * MIB, 4 * MIB, 0xb1),
        (32 * MIB, MIB, 0xb2),
    ] {
        expected[off as usize..(off + len) as usize].fill(byte);
    }
    write_sparse_file(&d.join("expected-b.raw"), &expected);
    let r = qemu_img_in(
        d,
        &[
            "compare",
            "-f",
            "qcow2",
            "-F",
            "raw",
            "ov.qcow2",
            "expected-b.raw",
        ],
    );
    assert_eq!(
        r.code(),
        0,
        "the live disk does not hold the guest's later writes:\n{r}"
    );
    assert_qemu_check_clean(&ov, "the live overlay");
    assert_eq!(sha256(&base), base_sha, "the backing file changed");
}
