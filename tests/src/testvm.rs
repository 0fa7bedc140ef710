//! Helpers of the tests that boot test VMs with `vmdisk_vm::run::Harness` and judge what the
//! guest left on its disk with tools no one here wrote (qemu-img, sfdisk, dumpe2fs, e2fsck,
//! debugfs, OpenSSH).
//!
//! - [`harness`] writes into a folder of the test's own, so [`assert_no_leftovers`] can prove
//!   that no socket directory and no qemu process outlived the test;
//! - [`root_partition_raw`] is the guest's root filesystem as a raw file (qemu-img convert,
//!   the partition found by sfdisk);
//! - [`vmdisk_tree`] is a filesystem as `vmdisk ls -R --json` and `vmdisk cat` show it,
//!   [`debugfs_tree`] the same as `debugfs -R rdump` writes it out;
//! - [`openssh`] is a plain OpenSSH client command with exactly one identity.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use sha2::{Digest, Sha256};
use vmdisk_vm::assets::{Cache, Lock};
use vmdisk_vm::def::VmDef;
use vmdisk_vm::run::Harness;
use vmdisk_vm::vm::TestVm;

use crate::{guest_tool, qemu_img, run_with_timeout, s, vmdisk_bin, vmdisk_bytes, workspace_root};

/// How long one debugfs / e2fsck / dumpe2fs run on a ~100 MiB filesystem may take.
const FS_TOOL_TIMEOUT: Duration = Duration::from_secs(120);

/// A harness writing into `dir` (artifacts in dir/artifacts, sockets in dir/tmp).
pub fn harness(dir: &Path) -> Harness {
    let lock = Lock::parse(
        &fs::read_to_string(workspace_root().join("testvms/assets.lock")).expect("assets.lock"),
    )
    .expect("parse assets.lock");
    fs::create_dir_all(dir.join("tmp")).expect("mkdir tmp");
    Harness::new(
        vmdisk_bin(),
        Cache::new(Cache::default_root().expect("cache root")),
        lock,
        dir.join("artifacts"),
    )
    .tmp_root(dir.join("tmp"))
}

/// The test VM definition `testvms/NAME.toml`.
pub fn def(name: &str) -> VmDef {
    VmDef::load(&workspace_root().join(format!("testvms/{name}.toml"))).expect("load VM def")
}

/// No socket dir left under dir/tmp, no qemu process still pointing into `dir`.
pub fn assert_no_leftovers(dir: &Path) {
    let left: Vec<PathBuf> = fs::read_dir(dir.join("tmp"))
        .expect("read tmp")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    assert!(left.is_empty(), "temp dirs left behind: {left:?}");
    let needle = dir.to_string_lossy().to_string();
    for e in fs::read_dir("/proc").expect("read /proc").flatten() {
        let name = e.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(cmd) = fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        assert!(
            !(cmd.contains("qemu-system") && cmd.contains(&needle)),
            "a qemu process outlived its test: pid {name:?}: {cmd}"
        );
    }
}

/// What a failure message about a running VM needs: its console and qemu's stderr.
pub fn vm_report(vm: &TestVm) -> String {
    format!(
        "artifacts: {}\nqemu stderr:\n{}\nserial console:\n{}",
        vm.dirs.artifacts.display(),
        vm.qemu_stderr(),
        vm.console.text()
    )
}

/// Run `cmd` in the guest as root through the harness's SSH; panic (with the console) unless
/// it exits 0. Returns its stdout.
#[track_caller]
pub fn guest(vm: &TestVm, ssh: &vmdisk_vm::ssh::Ssh, cmd: &str, timeout: Duration) -> String {
    let out = ssh
        .run(cmd, None, timeout)
        .unwrap_or_else(|e| panic!("ssh {cmd:?}: {e:#}\n{}", vm_report(vm)));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status == Some(0),
        "guest command {cmd:?} failed (exit {:?}):\nstdout: {stdout}\nstderr: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        vm_report(vm)
    );
    stdout
}

/// The partition of `img` (any format qemu-img reads) whose GPT name is `name`, as a raw file
/// under `work`: `qemu-img convert -O raw`, then the range sfdisk reports.
pub fn root_partition_raw(img: &Path, name: &str, work: &Path) -> PathBuf {
    let whole = work.join("whole.raw");
    qemu_img(&["convert", "-O", "raw", s(img), s(&whole)]).ok();
    let table = guest_tool("sfdisk", &["--json", s(&whole)]).ok();
    let v: serde_json::Value = serde_json::from_str(&table.stdout).expect("sfdisk --json");
    let sector = v["partitiontable"]["sectorsize"].as_u64().unwrap_or(512);
    let part = v["partitiontable"]["partitions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .unwrap_or_else(|| panic!("no partition named {name} in {}:\n{table}", img.display()));
    let (start, size) = (
        part["start"].as_u64().expect("start") * sector,
        part["size"].as_u64().expect("size") * sector,
    );
    let out = work.join(format!("{name}.raw"));
    crate::extract_range(&whole, &out, start, size);
    fs::remove_file(&whole).expect("remove the whole-disk copy");
    out
}

/// `dumpe2fs -h` of an ext2/3/4 filesystem: field name -> value (trimmed).
pub fn dumpe2fs_header(dev: &Path) -> BTreeMap<String, String> {
    let r = run_with_timeout(
        Command::new(crate::require_guest_tool("dumpe2fs")).args(["-h", s(dev)]),
        FS_TOOL_TIMEOUT,
    );
    assert!(r.success(), "dumpe2fs -h {}:\n{r}", dev.display());
    r.stdout
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// `e2fsck -E journal_only -y` on `dev`: replay the journal, nothing else. Panics unless
/// e2fsck exits 0 or 1 (1: the filesystem was changed, i.e. replayed).
pub fn e2fsck_replay_journal(dev: &Path) {
    let r = run_with_timeout(
        Command::new(crate::require_guest_tool("e2fsck")).args([
            "-E",
            "journal_only",
            "-y",
            s(dev),
        ]),
        FS_TOOL_TIMEOUT,
    );
    assert!(
        matches!(r.code(), 0 | 1),
        "e2fsck -E journal_only {}:\n{r}",
        dev.display()
    );
}

/// One entry of a filesystem tree: kind with content, permission bits, owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TreeEntry {
    pub node: Node,
    /// Permission bits `mode & 0o777`: debugfs's `rdump`, the oracle, restores no more (it
    /// drops setuid, setgid and sticky). 0 for symlinks (compared by target only).
    pub perm: u32,
    /// uid and gid; 0 for symlinks.
    pub owner: (u32, u32),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Node {
    Dir,
    /// Size and sha256 of the content.
    File(u64, String),
    Symlink(String),
    /// Anything else (device, fifo, socket; or an entry that could not be read, and why).
    Other(String),
}

fn sha_hex(b: &[u8]) -> String {
    Sha256::digest(b)
        .iter()
        .map(|x| format!("{x:02x}"))
        .collect()
}

/// The tree of the Linux filesystem in `img` as vmdisk's CLI shows it: `vmdisk ls -R --json
/// IMG /` for the entries, `vmdisk cat IMG PATH` for each regular file's content. Keys are
/// absolute paths without the root itself.
pub fn vmdisk_tree(img: &Path) -> BTreeMap<String, TreeEntry> {
    // Exit 1 with entries carrying their error is a listing too: the diff shows them.
    let (r, out) = vmdisk_bytes(&["ls", "-R", "--json", s(img), "/"], None);
    assert!(matches!(r.code(), 0 | 1), "vmdisk ls -R:\n{r}");
    let entries: Vec<serde_json::Value> = serde_json::from_slice(&out).expect("ls --json");
    let mut m = BTreeMap::new();
    for e in entries {
        let path = e["path"].as_str().expect("path").to_string();
        if path == "/" {
            continue;
        }
        let mode = e["mode"].as_u64().expect("mode") as u32;
        let owner = (
            e["uid"].as_u64().expect("uid") as u32,
            e["gid"].as_u64().expect("gid") as u32,
        );
        let kind = e["kind"].as_str().expect("kind");
        let node = match kind {
            _ if e.get("error").is_some() => {
                Node::Other(format!("{kind}, unreadable: {}", e["error"]))
            }
            "dir" => Node::Dir,
            "symlink" => {
                let t = e["symlink_target"].as_str().expect("target").to_string();
                m.insert(
                    path,
                    TreeEntry {
                        node: Node::Symlink(t),
                        perm: 0,
                        owner: (0, 0),
                    },
                );
                continue;
            }
            "file" => {
                let (r, data) = vmdisk_bytes(&["cat", s(img), &path], None);
                if r.success() {
                    Node::File(data.len() as u64, sha_hex(&data))
                } else {
                    Node::Other(format!("file, cat fails: {}", r.stderr.trim()))
                }
            }
            k => Node::Other(k.to_string()),
        };
        m.insert(
            path,
            TreeEntry {
                node,
                perm: mode & 0o777,
                owner,
            },
        );
    }
    m
}

fn host_tree(root: &Path, rel: &str, m: &mut BTreeMap<String, TreeEntry>) {
    for e in fs::read_dir(root).expect("readdir").flatten() {
        let name = String::from_utf8_lossy(e.file_name().as_bytes()).into_owned();
        let p = format!("{rel}/{name}");
        let md = fs::symlink_metadata(e.path()).expect("lstat");
        let entry = if md.file_type().is_symlink() {
            let t = fs::read_link(e.path()).expect("readlink");
            TreeEntry {
                node: Node::Symlink(String::from_utf8_lossy(t.as_os_str().as_bytes()).into()),
                perm: 0,
                owner: (0, 0),
            }
        } else {
            let node = if md.is_dir() {
                host_tree(&e.path(), &p, m);
                Node::Dir
            } else if !md.is_file() {
                Node::Other(format!("{:?}", md.file_type()))
            } else {
                let data = fs::read(e.path()).expect("read");
                Node::File(data.len() as u64, sha_hex(&data))
            };
            TreeEntry {
                node,
                perm: md.mode() & 0o777,
                owner: (md.uid(), md.gid()),
            }
        };
        m.insert(p, entry);
    }
}

/// The tree of the ext2/3/4 filesystem in the raw file `dev` as debugfs sees it: `rdump /`
/// into `work/rdump` (as root, so modes and owners are kept), then read back from the host.
/// `flags` go to debugfs before the device (e.g. `-c`: do not read the bitmaps).
pub fn debugfs_tree(dev: &Path, work: &Path, flags: &[&str]) -> BTreeMap<String, TreeEntry> {
    let out = work.join("rdump");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).expect("mkdir rdump");
    let r = run_with_timeout(
        Command::new(crate::require_guest_tool("debugfs"))
            .args(flags)
            .arg("-R")
            .arg(format!("rdump / {}", out.display()))
            .arg(dev),
        FS_TOOL_TIMEOUT,
    );
    assert!(r.success(), "debugfs rdump of {}:\n{r}", dev.display());
    let mut m = BTreeMap::new();
    host_tree(&out, "", &mut m);
    fs::remove_dir_all(&out).expect("remove rdump");
    m
}

/// Where two trees differ, one line per path (empty when they are equal).
pub fn tree_diff(
    a_name: &str,
    a: &BTreeMap<String, TreeEntry>,
    b_name: &str,
    b: &BTreeMap<String, TreeEntry>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("{k}: only in {a_name} ({v:?})")),
            Some(w) if w != v => d.push(format!("{k}: {a_name} {v:?} vs {b_name} {w:?}")),
            _ => {}
        }
    }
    for (k, w) in b {
        if !a.contains_key(k) {
            d.push(format!("{k}: only in {b_name} ({w:?})"));
        }
    }
    d
}

/// A plain OpenSSH client to the guest at 127.0.0.1:`port` as `user`, offering exactly one
/// key (`-i KEY -o IdentitiesOnly=yes`, no config file, no agent), batch mode, the host key
/// pinned by `known_hosts`. Append the remote command.
pub fn openssh(port: u16, known_hosts: &Path, key: &Path, user: &str) -> Command {
    let mut c = Command::new(crate::require_tool("ssh"));
    c.env_remove("SSH_AUTH_SOCK")
        .args(["-F", "/dev/null", "-i"])
        .arg(key)
        .args([
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "BatchMode=yes",
            "-o",
            "StrictHostKeyChecking=yes",
        ])
        .arg("-o")
        .arg(format!("UserKnownHostsFile={}", known_hosts.display()))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "ConnectTimeout=30",
            "-o",
            "LogLevel=ERROR",
            "-p",
        ])
        .arg(port.to_string())
        .arg(format!("{user}@127.0.0.1"));
    c
}

/// `ssh-keygen -t ed25519 -N '' -f dir/NAME`: a fresh key pair; returns (private, public line).
pub fn ssh_keygen(dir: &Path, name: &str) -> (PathBuf, String) {
    let key = dir.join(name);
    let r = crate::run(
        Command::new(crate::require_tool("ssh-keygen"))
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&key),
    );
    assert!(r.success(), "ssh-keygen:\n{r}");
    let public = fs::read_to_string(key.with_extension("pub")).expect("read .pub");
    (key, public.trim().to_string())
}
