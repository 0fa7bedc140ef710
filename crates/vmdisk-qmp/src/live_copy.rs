//! A consistent copy of a running VM's disk: qemu's own point-in-time backup, driven over QMP.
//!
//! ```text
//!   query-named-block-nodes / query-block   find the node whose file is SRC (or `device`)
//!   vmdisk_image::create  .DST.vmdisk-tmp-PID: same format, virtual size, cluster size and
//!                   backing file name as the node (no lock held while qemu has it open)
//!   blockdev-add    that file as node vmdisk-copy-PID (its backing: the node's backing file,
//!                   opened read-only again)
//!   blockdev-backup sync=top (an overlay: only its own clusters, like cp of the file) or
//!                   sync=full (no backing); copy-before-write keeps the guest's later writes
//!                   out of the copy, so it is the disk as of the job's start
//!   BLOCK_JOB_COMPLETED (error?) / BLOCK_JOB_CANCELLED, polled with query-block-jobs
//!   blockdev-del, then fsync + rename to DST + fsync the directory
//! ```
//!
//! Any failure, or the caller's cancel flag, cancels the job, deletes the node and removes the
//! partial file; [`LiveCopyError::Aborted`] says whether all of that succeeded.

use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{json, Value};
use vmdisk_block::Cancel;
use vmdisk_image::{BackingElsewhere, CreateSpec, Format, ImageOptions, PendingFile};

use crate::client::{self, Qmp};

/// How often the backup job's progress and events are polled.
const JOB_POLL: Duration = Duration::from_millis(100);
/// How long a cancelled job gets to wind down before its node is deleted anyway.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// Polls in a row without the job listed and without its end event before giving up.
const JOB_GONE_POLLS: u32 = 20;
/// Tries to delete our node after a failure (qemu refuses while the cancelled job winds down).
const NODE_DEL_TRIES: u32 = 50;

/// What went wrong in a live copy. Variants are named after the failed step.
#[derive(Debug, thiserror::Error)]
pub enum LiveCopyError {
    /// query-named-block-nodes or query-block failed.
    #[error("listing qemu's block nodes")]
    ListingNodes(#[source] client::Error),
    /// `device` names no node, drive or device.
    #[error(
        "qemu at {} has no node, drive or device named '{device}'. Its block nodes (node-name, \
         driver, file, drive/device):\n{nodes}\npass one of these node names with --device",
        socket.display()
    )]
    NoSuchDevice {
        socket: PathBuf,
        device: String,
        nodes: String,
    },
    /// `device` names a node that is not a qcow2 or raw image node.
    #[error(
        "node {node} is a {driver} node; vmdisk copy --qmp copies qcow2 and raw image nodes. \
         qemu's block nodes:\n{nodes}"
    )]
    NotAnImageNode {
        node: String,
        driver: String,
        nodes: String,
    },
    /// `device` matches several nodes.
    #[error("'{device}' names several nodes:\n{nodes}")]
    AmbiguousDevice { device: String, nodes: String },
    /// No image node's file is SRC.
    #[error(
        "qemu at {} has no image open whose file is {}. Its block nodes (node-name, driver, \
         file, drive/device):\n{nodes}\npass the node to copy with --device NODE",
        socket.display(),
        src.display()
    )]
    NoNodeForFile {
        socket: PathBuf,
        src: PathBuf,
        nodes: String,
    },
    /// Several image nodes use SRC.
    #[error("several of qemu's image nodes use {}:\n{nodes}\npick one with --device NODE", src.display())]
    SeveralNodesForFile { src: PathBuf, nodes: String },
    /// qemu's node description lacks what the copy must match.
    #[error("qemu reports no {what} for node {node}")]
    NodeIncomplete { node: String, what: &'static str },
    /// The node's backing file has a format vmdisk cannot record in the copy's header.
    #[error(
        "node {node}'s copy would need a {format} backing file reference; vmdisk writes raw \
         and qcow2"
    )]
    UnsupportedBackingFormat { node: String, format: String },
    /// The node's backing image is not a file on this host.
    #[error(
        "node {node}'s backing image is {file}, which is not a file vmdisk can see; the copy \
         needs it as its backing file"
    )]
    BackingNotVisible { node: String, file: String },
    /// Creating the temporary next to DST (or checking DST) failed.
    #[error("preparing the copy's destination")]
    PreparingDestination(#[source] vmdisk_image::Error),
    /// The temporary's path could not be made absolute (qemu resolves it in its own cwd).
    #[error("making {} absolute", path.display())]
    MakingAbsolute {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// `vmdisk_image::create` of the copy failed.
    #[error("creating {}", path.display())]
    CreatingCopy {
        path: PathBuf,
        #[source]
        source: vmdisk_image::Error,
    },
    /// blockdev-add of the copy failed.
    #[error("adding the copy as a block node")]
    AddingNode(#[source] client::Error),
    /// qemu has no blockdev-backup.
    #[error("qemu {version} has no blockdev-backup (qemu 2.3 or later has)")]
    NoBlockdevBackup {
        version: String,
        #[source]
        source: client::Error,
    },
    /// blockdev-backup failed.
    #[error("starting qemu's backup job")]
    StartingBackup(#[source] client::Error),
    /// query-block-jobs failed while the job ran.
    #[error("following qemu's backup job")]
    PollingJob(#[source] client::Error),
    /// Someone else cancelled the job.
    #[error("qemu's backup job {job} was cancelled (not by vmdisk)")]
    CancelledByOthers { job: String },
    /// The job ended with an error.
    #[error("qemu's backup job failed: {message}")]
    JobFailed { message: String },
    /// The job vanished without an end event.
    #[error("qemu's backup job {job} disappeared without a completion event")]
    JobDisappeared { job: String },
    /// The caller's cancel flag was raised.
    #[error("interrupted")]
    Interrupted,
    /// blockdev-del of the finished copy failed.
    #[error("removing the copy's node from qemu")]
    RemovingNode(#[source] client::Error),
    /// fsync or rename of the finished copy failed.
    #[error("moving the finished copy into place")]
    Committing(#[source] vmdisk_image::Error),
    /// A step after qemu's side was set up failed; what could be undone was undone.
    #[error(transparent)]
    Aborted(Box<Aborted>),
}

/// [`LiveCopyError::Aborted`]: which copy failed, and whether qemu was left clean.
#[derive(Debug, thiserror::Error)]
#[error(
    "copying node {node} ({file}) of the VM behind {} to {}; {}",
    socket.display(),
    dst.display(),
    match node_left {
        None => "the job was cancelled and the partial copy removed".to_string(),
        Some(n) => format!(
            "the partial copy was removed, but node {n} may still be in qemu (deleting it \
             failed): remove it with QMP blockdev-del"
        ),
    }
)]
pub struct Aborted {
    pub node: String,
    pub file: String,
    pub socket: PathBuf,
    pub dst: PathBuf,
    /// Our node, when it is still in qemu.
    pub node_left: Option<String>,
    /// The failure itself.
    #[source]
    pub cause: LiveCopyError,
}

impl LiveCopyError {
    /// The failure itself, under [`LiveCopyError::Aborted`]'s context.
    pub fn cause(&self) -> &LiveCopyError {
        match self {
            LiveCopyError::Aborted(a) => &a.cause,
            e => e,
        }
    }
}

pub type Result<T, E = LiveCopyError> = std::result::Result<T, E>;

/// What to copy, and where.
#[derive(Clone, Debug)]
pub struct LiveCopyOptions<'a> {
    /// The running VM's disk, by its path (matched by inode, or by the name qemu has).
    pub src: &'a Path,
    /// The new file, or a directory to copy into.
    pub dst: &'a Path,
    /// The node to copy by qemu node-name, drive id or device id, instead of by `src`.
    pub device: Option<&'a str>,
    /// Bytes per second qemu may copy.
    pub speed: Option<u64>,
    /// Replace DST if it exists (never while a qemu holds it).
    pub overwrite: bool,
    /// Raised by the caller (e.g. on Ctrl-C) to cancel the copy cleanly.
    pub cancel: Cancel,
}

/// How qemu's backup job copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sync {
    /// Only the overlay's own clusters (the node has a backing file; so has the copy).
    Top,
    /// The whole disk.
    Full,
}

impl Sync {
    pub fn as_str(self) -> &'static str {
        match self {
            Sync::Top => "top",
            Sync::Full => "full",
        }
    }
}

/// What [`live_copy`] did.
#[derive(Clone, Debug, Serialize)]
pub struct LiveCopyReport {
    /// The file written (DST, or DST/NAME when DST is a directory).
    pub dst: PathBuf,
    pub sync: Sync,
    /// The node copied and its file, as qemu names them.
    pub node: String,
    pub file: String,
    pub format: Format,
    /// Virtual size of the disk.
    pub size: u64,
    /// Bytes the job reports done.
    pub bytes_copied: u64,
    /// The backing file name stored in the copy (the node's).
    pub backing_file: Option<String>,
    /// Set when that name is relative and means another file next to the copy.
    pub backing_elsewhere: Option<BackingElsewhere>,
    /// qemu's version from the greeting ("?" when it sent none).
    pub qemu_version: String,
}

/// One block node as qemu reports it.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    /// The driver, e.g. "qcow2", "raw", "file".
    pub drv: String,
    pub file: String,
    pub ro: bool,
    /// Drive id and qdev path of the BlockBackend whose root this node is.
    pub device: Option<String>,
    pub qdev: Option<String>,
    /// `image` of query-named-block-nodes (ImageInfo, with backing-image).
    pub image: Value,
}

impl Node {
    /// One line: name, driver, file, drive and device.
    pub fn describe(&self) -> String {
        let mut s = format!(
            "{}  ({}{})  {}",
            self.name,
            self.drv,
            if self.ro { ", read-only" } else { "" },
            self.file
        );
        if let Some(d) = &self.device {
            s += &format!("  [drive {d}]");
        }
        if let Some(q) = &self.qdev {
            s += &format!("  [device {q}]");
        }
        s
    }
}

fn str_of(v: &Value, key: &str) -> Option<String> {
    v.get(key)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
}

/// Every named node, with the drive/device whose root it is.
pub fn block_nodes(q: &mut Qmp) -> Result<Vec<Node>> {
    let named = q
        .execute("query-named-block-nodes", None)
        .map_err(LiveCopyError::ListingNodes)?;
    let blocks = q
        .execute("query-block", None)
        .map_err(LiveCopyError::ListingNodes)?;
    let mut roots: Vec<(String, Option<String>, Option<String>)> = Vec::new();
    for b in blocks.as_array().into_iter().flatten() {
        if let Some(node) = b.get("inserted").and_then(|i| str_of(i, "node-name")) {
            roots.push((node, str_of(b, "device"), str_of(b, "qdev")));
        }
    }
    let mut nodes = Vec::new();
    for n in named.as_array().into_iter().flatten() {
        let Some(name) = str_of(n, "node-name") else {
            continue;
        };
        let root = roots.iter().find(|r| r.0 == name);
        nodes.push(Node {
            drv: str_of(n, "drv").unwrap_or_default(),
            file: str_of(n, "file").unwrap_or_default(),
            ro: n.get("ro").and_then(Value::as_bool).unwrap_or(false),
            device: root.and_then(|r| r.1.clone()),
            qdev: root.and_then(|r| r.2.clone()),
            image: n.get("image").cloned().unwrap_or(Value::Null),
            name,
        });
    }
    Ok(nodes)
}

fn node_list<'a>(nodes: impl IntoIterator<Item = &'a Node>) -> String {
    let lines: Vec<String> = nodes
        .into_iter()
        .map(|n| format!("  {}", n.describe()))
        .collect();
    if lines.is_empty() {
        return "  (none)".into();
    }
    lines.join("\n")
}

/// Image formats whose nodes can be copied (and re-created for the copy).
fn is_image_format(drv: &str) -> bool {
    matches!(drv, "qcow2" | "raw")
}

/// The node to copy: `device` by node-name, drive id or device id; else the image node whose
/// file is `src` (same inode, or the same name as qemu has it). `socket` is for messages.
pub fn pick_node<'a>(
    nodes: &'a [Node],
    src: &Path,
    device: Option<&str>,
    socket: &Path,
) -> Result<&'a Node> {
    if let Some(d) = device {
        let hits: Vec<&Node> = nodes
            .iter()
            .filter(|n| {
                n.name == d || n.device.as_deref() == Some(d) || n.qdev.as_deref() == Some(d)
            })
            .collect();
        return match hits[..] {
            [n] if is_image_format(&n.drv) => Ok(n),
            [n] => Err(LiveCopyError::NotAnImageNode {
                node: n.name.clone(),
                driver: n.drv.clone(),
                nodes: node_list(nodes),
            }),
            [] => Err(LiveCopyError::NoSuchDevice {
                socket: socket.to_path_buf(),
                device: d.to_string(),
                nodes: node_list(nodes),
            }),
            _ => Err(LiveCopyError::AmbiguousDevice {
                device: d.to_string(),
                nodes: node_list(hits),
            }),
        };
    }
    let want = std::fs::metadata(src).ok().map(|m| (m.dev(), m.ino()));
    let hits: Vec<&Node> = nodes
        .iter()
        .filter(|n| is_image_format(&n.drv))
        .filter(|n| {
            let same_inode = want.is_some()
                && std::fs::metadata(&n.file).ok().map(|m| (m.dev(), m.ino())) == want;
            same_inode || Path::new(&n.file) == src
        })
        .collect();
    match hits[..] {
        [n] => Ok(n),
        [] => Err(LiveCopyError::NoNodeForFile {
            socket: socket.to_path_buf(),
            src: src.to_path_buf(),
            nodes: node_list(nodes),
        }),
        _ => Err(LiveCopyError::SeveralNodesForFile {
            src: src.to_path_buf(),
            nodes: node_list(hits),
        }),
    }
}

/// What the copy must look like, from qemu's view of the node.
#[derive(Debug)]
struct Plan {
    format: Format,
    size: u64,
    cluster_size: Option<u64>,
    /// (name stored in the header, format stored in the header)
    backing_header: Option<(String, Format)>,
    /// (file qemu opened as the node's backing, its format)
    backing_open: Option<(String, String)>,
}

impl Plan {
    fn sync(&self) -> Sync {
        if self.backing_open.is_some() {
            Sync::Top
        } else {
            Sync::Full
        }
    }
}

fn plan(node: &Node) -> Result<Plan> {
    let img = &node.image;
    let incomplete = |what| LiveCopyError::NodeIncomplete {
        node: node.name.clone(),
        what,
    };
    let format: Format = match node.drv.as_str() {
        "qcow2" => Format::Qcow2,
        "raw" => Format::Raw,
        _ => {
            return Err(LiveCopyError::NotAnImageNode {
                node: node.name.clone(),
                driver: node.drv.clone(),
                nodes: node_list([node]),
            })
        }
    };
    let size = img
        .get("virtual-size")
        .and_then(Value::as_u64)
        .ok_or_else(|| incomplete("virtual size"))?;
    let cluster_size = match format {
        Format::Qcow2 => img.get("cluster-size").and_then(Value::as_u64),
        Format::Raw => None,
    };
    let backing_open = match img.get("backing-image") {
        None => None,
        Some(b) => Some((
            str_of(b, "filename").ok_or_else(|| incomplete("backing image file name"))?,
            str_of(b, "format").ok_or_else(|| incomplete("backing image format"))?,
        )),
    };
    let backing_header = match &backing_open {
        None => None,
        Some((file, fmt)) => {
            let name = str_of(img, "backing-filename").unwrap_or_else(|| file.clone());
            let hfmt = str_of(img, "backing-filename-format").unwrap_or_else(|| fmt.clone());
            let hfmt: Format =
                hfmt.parse()
                    .map_err(|_| LiveCopyError::UnsupportedBackingFormat {
                        node: node.name.clone(),
                        format: hfmt.clone(),
                    })?;
            Some((name, hfmt))
        }
    };
    if let Some((file, _)) = &backing_open {
        if file.starts_with("json:") || !Path::new(file).exists() {
            return Err(LiveCopyError::BackingNotVisible {
                node: node.name.clone(),
                file: file.clone(),
            });
        }
    }
    Ok(Plan {
        format,
        size,
        cluster_size,
        backing_header,
        backing_open,
    })
}

/// The QMP blockdev definition of the copy's node.
fn target_blockdev(plan: &Plan, node_name: &str, file: &Path) -> Value {
    let mut v = json!({
        "driver": plan.format.as_str(),
        "node-name": node_name,
        "file": { "driver": "file", "filename": file.to_string_lossy() },
    });
    if let Some((bfile, bfmt)) = &plan.backing_open {
        let proto = match std::fs::metadata(bfile) {
            Ok(m) if m.file_type().is_block_device() => "host_device",
            _ => "file",
        };
        v["backing"] = json!({
            "driver": bfmt,
            "read-only": true,
            "file": { "driver": proto, "filename": bfile },
        });
    }
    v
}

/// Where the live copy stands in qemu, for cleanup.
struct Job<'q, 'c> {
    q: &'q mut Qmp,
    /// Job id and node name of the copy (the same string).
    id: String,
    node_added: bool,
    job_running: bool,
    cancel: &'c Cancel,
}

impl Job<'_, '_> {
    fn cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }

    fn ours(&self, j: &Value) -> bool {
        j.get("device").and_then(Value::as_str) == Some(&self.id)
    }

    /// Poll the job until it ends; returns the bytes it reports done.
    fn wait(&mut self, progress: &dyn Fn(u64, u64)) -> Result<u64> {
        let mut gone = 0;
        loop {
            if self.cancelled() {
                return Err(LiveCopyError::Interrupted);
            }
            let jobs = self
                .q
                .execute("query-block-jobs", None)
                .map_err(LiveCopyError::PollingJob)?;
            let mine = jobs.as_array().into_iter().flatten().find(|j| self.ours(j));
            if let Some(j) = mine {
                let field = |k: &str| j.get(k).and_then(Value::as_u64).unwrap_or(0);
                progress(field("offset"), field("len"));
            }
            let listed = mine.is_some();
            if let Some(ev) = self.end_event() {
                self.job_running = false;
                let offset = ev.data.get("offset").and_then(Value::as_u64).unwrap_or(0);
                if ev.name == "BLOCK_JOB_CANCELLED" {
                    return Err(LiveCopyError::CancelledByOthers {
                        job: self.id.clone(),
                    });
                }
                if let Some(err) = ev.data.get("error").and_then(Value::as_str) {
                    return Err(LiveCopyError::JobFailed {
                        message: err.to_string(),
                    });
                }
                let len = ev.data.get("len").and_then(Value::as_u64).unwrap_or(offset);
                progress(offset, len);
                return Ok(offset);
            }
            if listed {
                gone = 0;
            } else {
                gone += 1;
                if gone >= JOB_GONE_POLLS {
                    self.job_running = false;
                    return Err(LiveCopyError::JobDisappeared {
                        job: self.id.clone(),
                    });
                }
            }
            std::thread::sleep(JOB_POLL);
        }
    }

    /// BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED of our job, if it arrived.
    fn end_event(&self) -> Option<client::QmpEvent> {
        self.q
            .events()
            .iter()
            .find(|e| {
                matches!(
                    e.name.as_str(),
                    "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
                ) && self.ours(&e.data)
            })
            .cloned()
    }

    /// Undo what was done in qemu: cancel the job (and wait for it), delete the node. Returns
    /// the node's name when it could not be deleted.
    fn abort(&mut self) -> Option<String> {
        if self.job_running {
            let _ = self.q.execute(
                "block-job-cancel",
                Some(json!({ "device": self.id, "force": true })),
            );
            let deadline = Instant::now() + CANCEL_TIMEOUT;
            while Instant::now() < deadline && self.end_event().is_none() {
                match self.q.execute("query-block-jobs", None) {
                    Ok(jobs) if !jobs.as_array().into_iter().flatten().any(|j| self.ours(j)) => {
                        break
                    }
                    Ok(_) => std::thread::sleep(JOB_POLL),
                    Err(_) => break,
                }
            }
            self.job_running = false;
        }
        if self.node_added {
            for _ in 0..NODE_DEL_TRIES {
                match self
                    .q
                    .execute("blockdev-del", Some(json!({ "node-name": self.id })))
                {
                    Ok(_) => {
                        self.node_added = false;
                        break;
                    }
                    // No way to reach qemu any more: whether the node went with it is unknown,
                    // so it is reported as left.
                    Err(e) if e.is_disconnected() => break,
                    Err(_) => std::thread::sleep(JOB_POLL),
                }
            }
        }
        self.node_added.then(|| self.id.clone())
    }
}

/// Copy the disk of the VM behind `q` as [`LiveCopyOptions`] say. `progress` gets (bytes done,
/// bytes to do) as qemu reports them. On any failure the job is cancelled, the node deleted and
/// the partial file removed before the error is returned.
pub fn live_copy(
    q: &mut Qmp,
    opts: &LiveCopyOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<LiveCopyReport> {
    let version = q.qemu_version().unwrap_or_else(|| "?".into());
    let socket = q.socket().to_path_buf();
    let nodes = block_nodes(q)?;
    let node = pick_node(&nodes, opts.src, opts.device, &socket)?.clone();
    let plan = plan(&node)?;

    let dst = vmdisk_image::copy_destination(opts.src, opts.dst);
    let pending = PendingFile::create(&dst, opts.overwrite, 0o644)
        .map_err(LiveCopyError::PreparingDestination)?;
    let tmp = std::path::absolute(pending.tmp_path()).map_err(|source| {
        LiveCopyError::MakingAbsolute {
            path: pending.tmp_path().to_path_buf(),
            source,
        }
    })?;
    let spec = CreateSpec {
        format: plan.format,
        size: Some(plan.size),
        options: ImageOptions {
            cluster_size: plan.cluster_size,
            ..Default::default()
        },
        backing_file: plan.backing_header.as_ref().map(|b| b.0.clone()),
        backing_format: plan.backing_header.as_ref().map(|b| b.1),
    };
    vmdisk_image::create_in_place(&tmp, &spec).map_err(|source| LiveCopyError::CreatingCopy {
        path: tmp.clone(),
        source,
    })?;

    let mut job = Job {
        q,
        id: format!("vmdisk-copy-{}", std::process::id()),
        node_added: false,
        job_running: false,
        cancel: &opts.cancel,
    };
    let result = (|| -> Result<u64> {
        job.q
            .execute("blockdev-add", Some(target_blockdev(&plan, &job.id, &tmp)))
            .map_err(LiveCopyError::AddingNode)?;
        job.node_added = true;
        let mut args = json!({
            "job-id": job.id,
            "device": node.name,
            "target": job.id,
            "sync": plan.sync().as_str(),
        });
        if let Some(s) = opts.speed {
            args["speed"] = json!(s);
        }
        job.q.execute("blockdev-backup", Some(args)).map_err(|e| {
            if e.is_command_not_found() {
                LiveCopyError::NoBlockdevBackup {
                    version: version.clone(),
                    source: e,
                }
            } else {
                LiveCopyError::StartingBackup(e)
            }
        })?;
        job.job_running = true;
        let done = job.wait(progress)?;
        job.q
            .execute("blockdev-del", Some(json!({ "node-name": job.id })))
            .map_err(LiveCopyError::RemovingNode)?;
        job.node_added = false;
        Ok(done)
    })();
    let bytes_copied = match result {
        Ok(b) => b,
        Err(cause) => {
            let node_left = job.abort();
            // Dropping the pending file removes the partial copy.
            drop(pending);
            return Err(LiveCopyError::Aborted(Box::new(Aborted {
                node: node.name,
                file: node.file,
                socket,
                dst,
                node_left,
                cause,
            })));
        }
    };
    let final_dst = pending.dst().to_owned();
    pending.commit().map_err(LiveCopyError::Committing)?;

    let backing_elsewhere = plan.backing_header.as_ref().and_then(|(name, fmt)| {
        let src = if opts.src.exists() {
            opts.src
        } else {
            Path::new(&node.file)
        };
        vmdisk_image::backing_elsewhere(src, &final_dst, name, Some(fmt.as_str()))
    });
    Ok(LiveCopyReport {
        dst: final_dst,
        sync: plan.sync(),
        node: node.name,
        file: node.file,
        format: plan.format,
        size: plan.size,
        bytes_copied,
        backing_file: plan.backing_header.map(|b| b.0),
        backing_elsewhere,
        qemu_version: version,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{fake_with, CLOSE};
    use std::sync::{Arc, Mutex};

    fn node(name: &str, drv: &str, file: &str) -> Node {
        Node {
            name: name.into(),
            drv: drv.into(),
            file: file.into(),
            ro: false,
            device: None,
            qdev: None,
            image: Value::Null,
        }
    }

    #[test]
    fn the_image_node_of_a_path_is_picked_not_its_protocol_node() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("vda.qcow2");
        std::fs::write(&f, b"x").unwrap();
        let link = dir.path().join("link.qcow2");
        std::os::unix::fs::symlink(&f, &link).unwrap();
        let p = f.to_str().unwrap();
        let nodes = vec![
            node("#block123", "file", p),
            node("ov0", "qcow2", p),
            node("#block456", "qcow2", "/nix/store/base.qcow2"),
        ];
        let sock = Path::new("/run/qmp");
        assert_eq!(pick_node(&nodes, &f, None, sock).unwrap().name, "ov0");
        // The same file by another name (the seed's symlinked /tmp/.../vda.qcow2).
        assert_eq!(pick_node(&nodes, &link, None, sock).unwrap().name, "ov0");
        let e = pick_node(&nodes, Path::new("/nope.qcow2"), None, sock).unwrap_err();
        assert!(matches!(e, LiveCopyError::NoNodeForFile { .. }), "{e:?}");
        let msg = e.to_string();
        assert!(
            msg.contains("ov0") && msg.contains("#block456") && msg.contains("--device"),
            "{msg}"
        );
    }

    #[test]
    fn device_names_nodes_drives_and_devices() {
        let mut d0 = node("#block1", "qcow2", "/a.qcow2");
        d0.device = Some("drive0".into());
        d0.qdev = Some("/machine/peripheral/disk0/virtio-backend".into());
        let nodes = vec![d0, node("#block2", "file", "/a.qcow2")];
        let sock = Path::new("/run/qmp");
        let src = Path::new("whatever");
        for d in [
            "#block1",
            "drive0",
            "/machine/peripheral/disk0/virtio-backend",
        ] {
            assert_eq!(
                pick_node(&nodes, src, Some(d), sock).unwrap().name,
                "#block1"
            );
        }
        let e = pick_node(&nodes, src, Some("#block2"), sock).unwrap_err();
        assert!(e.to_string().contains("qcow2 and raw"), "{e}");
        let e = pick_node(&nodes, src, Some("nope"), sock).unwrap_err();
        assert!(e.to_string().contains("[drive drive0]"), "{e}");
    }

    #[test]
    fn an_overlay_node_plans_a_top_copy_with_its_backing_name() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        std::fs::write(&base, b"x").unwrap();
        let mut n = node("ov0", "qcow2", "/d/vda.qcow2");
        n.image = json!({
            "filename": "/d/vda.qcow2", "format": "qcow2", "virtual-size": 1073741824u64,
            "cluster-size": 65536, "backing-filename": "base.qcow2",
            "backing-filename-format": "qcow2",
            "backing-image": { "filename": base.to_str().unwrap(), "format": "qcow2",
                               "virtual-size": 1073741824u64 }
        });
        let p = plan(&n).unwrap();
        assert_eq!(p.format, Format::Qcow2);
        assert_eq!(p.size, 1 << 30);
        assert_eq!(p.cluster_size, Some(65536));
        assert_eq!(p.backing_header, Some(("base.qcow2".into(), Format::Qcow2)));
        assert_eq!(p.sync(), Sync::Top);
        let v = target_blockdev(&p, "vmdisk-copy-1", Path::new("/d/.c.vmdisk-tmp-1"));
        assert_eq!(v["driver"], "qcow2");
        assert_eq!(v["file"]["filename"], "/d/.c.vmdisk-tmp-1");
        assert_eq!(v["backing"]["file"]["filename"], base.to_str().unwrap());
        assert_eq!(v["backing"]["read-only"], true);

        let mut raw = node("r", "raw", "/d/disk.raw");
        raw.image = json!({"filename": "/d/disk.raw", "format": "raw", "virtual-size": 4096});
        let p = plan(&raw).unwrap();
        assert!(p.backing_open.is_none() && p.backing_header.is_none());
        assert_eq!(p.sync(), Sync::Full);
        assert!(target_blockdev(&p, "t", Path::new("/t"))
            .get("backing")
            .is_none());

        let mut hidden = n.clone();
        hidden.image["backing-image"]["filename"] = json!("json:{\"driver\": \"nbd\"}");
        let e = plan(&hidden).unwrap_err();
        assert!(
            matches!(e, LiveCopyError::BackingNotVisible { .. }),
            "{e:?}"
        );
    }

    // -----------------------------------------------------------------------------------------
    // The whole transaction against a fake qemu
    // -----------------------------------------------------------------------------------------

    /// Virtual size of the fake VM's disk.
    const DISK: u64 = 4 << 20;

    /// How the fake's backup job behaves.
    #[derive(Clone, Copy, PartialEq, Eq, Debug)]
    enum JobEnd {
        /// Runs for two polls, then completes.
        Completes,
        /// Fails with an I/O error after one poll.
        Fails,
        /// Runs until block-job-cancel, then reports BLOCK_JOB_CANCELLED.
        RunsUntilCancelled,
        /// qemu has no blockdev-backup.
        NoBackupCommand,
        /// qemu exits (closes QMP) at the first job poll.
        QemuExits,
    }

    /// A directory with base.qcow2 and vda.qcow2 (an overlay of it by the relative name), and
    /// a fake qemu that runs vda.qcow2 as node ov0 of drive d0.
    struct Fixture {
        dir: tempfile::TempDir,
        vda: PathBuf,
        fake_dir: tempfile::TempDir,
        sock: PathBuf,
        qemu: std::thread::JoinHandle<Vec<Value>>,
    }

    fn fixture(end: JobEnd) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.qcow2");
        vmdisk_image::create(&base, &CreateSpec::new(Format::Qcow2, DISK)).unwrap();
        let vda = dir.path().join("vda.qcow2");
        std::fs::write(&vda, b"qemu has it open").unwrap();
        let nodes = json!([
            { "node-name": "ov0", "drv": "qcow2", "file": vda.to_str().unwrap(), "ro": false,
              "image": { "filename": vda.to_str().unwrap(), "format": "qcow2",
                         "virtual-size": DISK, "cluster-size": 65536,
                         "backing-filename": "base.qcow2", "backing-filename-format": "qcow2",
                         "backing-image": { "filename": base.to_str().unwrap(),
                                            "format": "qcow2", "virtual-size": DISK } } },
            { "node-name": "#block1", "drv": "file", "file": vda.to_str().unwrap(),
              "ro": false },
        ]);
        let blocks = json!([
            { "device": "d0", "qdev": "/machine/peripheral-anon/device[0]/virtio-backend",
              "inserted": { "node-name": "ov0" } },
        ]);
        // The fake's state: the job's id once started, polls so far, whether it was cancelled.
        let state = Arc::new(Mutex::new((None::<String>, 0u32, false)));
        let (fake_dir, sock, qemu) = fake_with(move |v| {
            let ok = |r: Value| vec![json!({"return": r, "id": v["id"]}).to_string()];
            let mut st = state.lock().unwrap();
            let event = |name: &str, data: Value| {
                json!({"timestamp": {"seconds": 1, "microseconds": 0}, "event": name, "data": data})
                    .to_string()
            };
            match v["execute"].as_str().unwrap() {
                "qmp_capabilities" | "blockdev-add" | "blockdev-del" => ok(json!({})),
                "query-named-block-nodes" => ok(nodes.clone()),
                "query-block" => ok(blocks.clone()),
                "blockdev-backup" if end == JobEnd::NoBackupCommand => vec![json!({
                    "error": { "class": "CommandNotFound",
                               "desc": "The command blockdev-backup has not been found" },
                    "id": v["id"],
                })
                .to_string()],
                "blockdev-backup" => {
                    st.0 = v["arguments"]["job-id"].as_str().map(str::to_string);
                    ok(json!({}))
                }
                "block-job-cancel" => {
                    st.2 = true;
                    ok(json!({}))
                }
                "query-block-jobs" => {
                    let id = st.0.clone().unwrap();
                    st.1 += 1;
                    let running = json!([{ "device": id, "type": "backup", "len": DISK,
                                           "offset": DISK / 4 * u64::from(st.1.min(3)) }]);
                    match end {
                        JobEnd::QemuExits => vec![CLOSE.into()],
                        JobEnd::Completes if st.1 > 2 => {
                            let mut r = vec![event(
                                "BLOCK_JOB_COMPLETED",
                                json!({"device": id, "type": "backup", "len": DISK, "offset": DISK}),
                            )];
                            r.extend(ok(json!([])));
                            r
                        }
                        JobEnd::Fails if st.1 > 1 => {
                            let mut r = vec![event(
                                "BLOCK_JOB_COMPLETED",
                                json!({"device": id, "type": "backup", "len": DISK,
                                       "offset": DISK / 4, "error": "No space left on device"}),
                            )];
                            r.extend(ok(json!([])));
                            r
                        }
                        JobEnd::RunsUntilCancelled if st.2 => {
                            let mut r = vec![event(
                                "BLOCK_JOB_CANCELLED",
                                json!({"device": id, "type": "backup", "len": DISK, "offset": DISK / 4}),
                            )];
                            r.extend(ok(json!([])));
                            r
                        }
                        _ => ok(running),
                    }
                }
                other => panic!("the live copy sent an unexpected command {other}"),
            }
        });
        Fixture {
            dir,
            vda,
            fake_dir,
            sock,
            qemu,
        }
    }

    impl Fixture {
        fn connect(&self) -> Qmp {
            Qmp::connect(&self.sock, None, Duration::from_secs(5)).unwrap()
        }

        /// The commands the fake received, after the client hung up.
        fn commands(self) -> Vec<Value> {
            let _keep = self.fake_dir;
            self.qemu.join().unwrap()
        }

        /// Every file in the directory but the fixture's own.
        fn extra_files(&self) -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(self.dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|n| n != "base.qcow2" && n != "vda.qcow2")
                .collect();
            v.sort();
            v
        }
    }

    fn names(cmds: &[Value]) -> Vec<&str> {
        cmds.iter()
            .map(|c| c["execute"].as_str().unwrap())
            .collect()
    }

    fn opts<'a>(f: &'a Fixture, dst: &'a Path) -> LiveCopyOptions<'a> {
        LiveCopyOptions {
            src: &f.vda,
            dst,
            device: None,
            speed: Some(1 << 20),
            overwrite: false,
            cancel: Cancel::never(),
        }
    }

    #[test]
    fn a_completed_backup_job_leaves_the_copy_under_its_name_and_nothing_in_qemu() {
        let f = fixture(JobEnd::Completes);
        let dst = f.dir.path().join("copy.qcow2");
        let mut q = f.connect();
        let seen = Mutex::new(Vec::new());
        let r = live_copy(&mut q, &opts(&f, &dst), &|done, total| {
            seen.lock().unwrap().push((done, total))
        })
        .unwrap();
        drop(q);
        assert_eq!(r.dst, dst);
        assert_eq!(r.sync, Sync::Top);
        assert_eq!(r.node, "ov0");
        assert_eq!(r.format, Format::Qcow2);
        assert_eq!((r.size, r.bytes_copied), (DISK, DISK));
        assert_eq!(r.backing_file.as_deref(), Some("base.qcow2"));
        assert!(r.backing_elsewhere.is_none(), "{r:?}");
        assert_eq!(r.qemu_version, "7.2.18");
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.last(), Some(&(DISK, DISK)), "{seen:?}");
        assert!(seen.windows(2).all(|w| w[0].0 <= w[1].0), "{seen:?}");

        // The copy is the file qemu filled: a qcow2 shaped like the node, under DST's name.
        let info = vmdisk_image::info(&dst, &Default::default(), false).unwrap();
        assert_eq!(info[0].virtual_size, DISK);
        assert_eq!(info[0].cluster_size, Some(65536));
        assert_eq!(info[0].backing_filename.as_deref(), Some("base.qcow2"));
        assert_eq!(f.extra_files(), vec!["copy.qcow2".to_string()]);

        let cmds = f.commands();
        let n = names(&cmds);
        assert_eq!(
            n[..5],
            [
                "qmp_capabilities",
                "query-named-block-nodes",
                "query-block",
                "blockdev-add",
                "blockdev-backup"
            ]
        );
        assert_eq!(n.last(), Some(&"blockdev-del"));
        assert!(!n.contains(&"block-job-cancel"), "{n:?}");
        let add = &cmds[3]["arguments"];
        let id = add["node-name"].as_str().unwrap();
        // qemu opens the temporary beside DST by its absolute path, the backing read-only.
        let tmp = add["file"]["filename"].as_str().unwrap();
        assert!(
            Path::new(tmp).is_absolute() && tmp.contains("vmdisk-tmp"),
            "{tmp}"
        );
        assert_eq!(Path::new(tmp).parent(), Some(f_dir(&dst)));
        assert_eq!(add["backing"]["read-only"], true);
        let backup = &cmds[4]["arguments"];
        assert_eq!(backup["device"], "ov0");
        assert_eq!(backup["target"], id);
        assert_eq!(backup["job-id"], id);
        assert_eq!(backup["sync"], "top");
        assert_eq!(backup["speed"], 1 << 20);
        assert_eq!(cmds.last().unwrap()["arguments"]["node-name"], id);
    }

    fn f_dir(p: &Path) -> &Path {
        p.parent().unwrap()
    }

    /// The failure left nothing: no copy, no temporary; the node was deleted in qemu.
    fn assert_undone(f: Fixture, e: &LiveCopyError, dst: &Path) -> Vec<String> {
        let LiveCopyError::Aborted(a) = e else {
            panic!("not wrapped as Aborted: {e:?}");
        };
        assert_eq!(a.node_left, None, "{e}");
        assert!(e.to_string().contains("partial copy removed"), "{e}");
        assert!(!dst.exists());
        assert!(f.extra_files().is_empty(), "{:?}", f.extra_files());
        let cmds = f.commands();
        let n: Vec<String> = names(&cmds).into_iter().map(str::to_string).collect();
        assert!(n.contains(&"blockdev-add".to_string()), "{n:?}");
        assert_eq!(n.last().map(String::as_str), Some("blockdev-del"), "{n:?}");
        n
    }

    #[test]
    fn a_failed_backup_job_removes_the_node_and_the_partial_copy() {
        let f = fixture(JobEnd::Fails);
        let dst = f.dir.path().join("copy.qcow2");
        let mut q = f.connect();
        let e = live_copy(&mut q, &opts(&f, &dst), &|_, _| {}).unwrap_err();
        drop(q);
        assert!(
            matches!(e.cause(), LiveCopyError::JobFailed { message } if message.contains("No space")),
            "{e:?}"
        );
        let n = assert_undone(f, &e, &dst);
        // The job had ended: nothing to cancel.
        assert!(!n.contains(&"block-job-cancel".to_string()), "{n:?}");
    }

    #[test]
    fn cancelling_cancels_the_job_then_removes_the_node_and_the_partial_copy() {
        let f = fixture(JobEnd::RunsUntilCancelled);
        let dst = f.dir.path().join("copy.qcow2");
        let cancel = Cancel::new();
        let mut q = f.connect();
        let o = LiveCopyOptions {
            cancel: cancel.clone(),
            ..opts(&f, &dst)
        };
        // Ctrl-C once the job is under way.
        let e = live_copy(&mut q, &o, &|_, _| cancel.cancel()).unwrap_err();
        drop(q);
        assert!(matches!(e.cause(), LiveCopyError::Interrupted), "{e:?}");
        let n = assert_undone(f, &e, &dst);
        let cancel_at = n.iter().position(|c| c == "block-job-cancel").unwrap();
        let del_at = n.iter().rposition(|c| c == "blockdev-del").unwrap();
        assert!(cancel_at < del_at, "{n:?}");
    }

    #[test]
    fn a_qemu_without_blockdev_backup_is_named_and_the_node_removed() {
        let f = fixture(JobEnd::NoBackupCommand);
        let dst = f.dir.path().join("copy.qcow2");
        let mut q = f.connect();
        let e = live_copy(&mut q, &opts(&f, &dst), &|_, _| {}).unwrap_err();
        drop(q);
        assert!(
            matches!(e.cause(), LiveCopyError::NoBlockdevBackup { version, .. } if version == "7.2.18"),
            "{e:?}"
        );
        assert_undone(f, &e, &dst);
    }

    #[test]
    fn qemu_exiting_mid_copy_fails_at_once_and_leaves_no_file() {
        let f = fixture(JobEnd::QemuExits);
        let dst = f.dir.path().join("copy.qcow2");
        let mut q = f.connect();
        let t = Instant::now();
        let e = live_copy(&mut q, &opts(&f, &dst), &|_, _| {}).unwrap_err();
        drop(q);
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        assert!(
            matches!(e.cause(), LiveCopyError::PollingJob(c) if c.is_disconnected()),
            "{e:?}"
        );
        // qemu cannot be asked any more: the node is reported as possibly left.
        assert!(
            matches!(&e, LiveCopyError::Aborted(a)
                if a.node_left.as_deref().is_some_and(|n| n.starts_with("vmdisk-copy-"))),
            "{e:?}"
        );
        assert!(e.to_string().contains("blockdev-del"), "{e}");
        assert!(!dst.exists());
        assert!(f.extra_files().is_empty(), "{:?}", f.extra_files());
        f.commands();
    }

    #[test]
    fn a_wrong_device_lists_the_nodes_and_creates_nothing() {
        let f = fixture(JobEnd::Completes);
        let dst = f.dir.path().join("copy.qcow2");
        let mut q = f.connect();
        let o = LiveCopyOptions {
            device: Some("nope"),
            ..opts(&f, &dst)
        };
        let e = live_copy(&mut q, &o, &|_, _| {}).unwrap_err();
        drop(q);
        let msg = e.to_string();
        for needle in ["nope", "ov0", "[drive d0]", "--device"] {
            assert!(msg.contains(needle), "`{needle}` missing: {msg}");
        }
        assert!(f.extra_files().is_empty());
        let cmds = f.commands();
        assert!(!names(&cmds).contains(&"blockdev-add"));
    }

    #[test]
    fn an_existing_destination_is_not_replaced_without_overwrite() {
        let f = fixture(JobEnd::Completes);
        let dst = f.dir.path().join("copy.qcow2");
        std::fs::write(&dst, b"precious").unwrap();
        let mut q = f.connect();
        let e = live_copy(&mut q, &opts(&f, &dst), &|_, _| {}).unwrap_err();
        drop(q);
        assert!(
            matches!(
                e,
                LiveCopyError::PreparingDestination(vmdisk_image::Error::DestinationExists { .. })
            ),
            "{e:?}"
        );
        assert_eq!(std::fs::read(&dst).unwrap(), b"precious");
        let cmds = f.commands();
        assert!(!names(&cmds).contains(&"blockdev-add"));
    }
}
