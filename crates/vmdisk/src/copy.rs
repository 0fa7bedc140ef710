//! `vmdisk copy`: copy an image file offline (a reflink where the filesystem can, else a
//! sparse copy; under qemu's locks), or copy a running VM's disk consistently through its QMP
//! socket.
//!
//! The live copy is qemu's own point-in-time backup, driven over QMP:
//!
//! ```text
//!   query-named-block-nodes / query-block   find the node whose file is SRC (or --device)
//!   vmdisk create   .DST.vmdisk-tmp-PID: same format, virtual size, cluster size and
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
//! Any failure (or Ctrl-C) cancels the job, deletes the node and removes the partial file.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::{json, Value};
use vmdisk_image::{CopyOptions, CreateSpec, Format, ImageOptions, PendingFile, Reflink};
use vmdisk_vm::qmp::Qmp;

/// How long qemu gets to accept the QMP connection and greet.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one QMP command may take (blockdev-add opens files; qemu answers in ms).
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);
/// How often the backup job's progress and events are polled.
const JOB_POLL: Duration = Duration::from_millis(100);
/// How long a cancelled job gets to wind down before its node is deleted anyway.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(30);
/// Polls in a row without the job listed and without its end event before giving up.
const JOB_GONE_POLLS: u32 = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ReflinkArg {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Args)]
pub struct CopyArgs {
    /// Share extents with SRC: auto (where the filesystem can — btrfs, XFS, bcachefs — else
    /// a sparse copy), always (or fail), never (a sparse copy sharing nothing). A bare
    /// --reflink means always, as for cp.
    #[arg(
        long,
        value_enum,
        value_name = "WHEN",
        num_args = 0..=1,
        require_equals = true,
        default_missing_value = "always",
        conflicts_with = "qmp"
    )]
    pub reflink: Option<ReflinkArg>,
    /// Copy the disk of the running VM behind this QMP socket, consistently and without
    /// pausing the guest (a qemu backup job; the copy is the disk as of its start).
    #[arg(long, value_name = "SOCKET")]
    pub qmp: Option<PathBuf>,
    /// With --qmp: the node to copy (qemu node-name, drive id or device id), when SRC does
    /// not name exactly one image qemu has open.
    #[arg(long, value_name = "NODE", requires = "qmp")]
    pub device: Option<String>,
    /// With --qmp: copy at most this many bytes per second (k, M, G suffixes).
    #[arg(long, value_name = "BYTES_PER_SEC", requires = "qmp")]
    pub speed: Option<String>,
    /// Copy SRC even while a running qemu writes it (no locks). The copy may then be
    /// inconsistent; --qmp makes a consistent copy of a running VM's disk.
    #[arg(short = 'U', long = "force-share", conflicts_with = "qmp")]
    pub force_share: bool,
    /// Replace DST if it exists (never while a qemu holds it).
    #[arg(long)]
    pub force: bool,
    /// Print what was done as JSON.
    #[arg(long)]
    pub json: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// The image file to copy (with --qmp: the running VM's disk, by its path).
    pub src: PathBuf,
    /// The new file, or a directory to copy into.
    pub dst: PathBuf,
}

pub fn run(a: CopyArgs, quiet: bool) -> Result<u8> {
    let cancel = catch_interrupts();
    match &a.qmp {
        Some(sock) => live(&a, sock, quiet, cancel),
        None => offline(&a, quiet, cancel),
    }
}

// ---------------------------------------------------------------------------------------------
// Offline
// ---------------------------------------------------------------------------------------------

fn offline(a: &CopyArgs, quiet: bool, cancel: &'static AtomicBool) -> Result<u8> {
    let reflink = match a.reflink.unwrap_or(ReflinkArg::Auto) {
        ReflinkArg::Auto => Reflink::Auto,
        ReflinkArg::Always => Reflink::Always,
        ReflinkArg::Never => Reflink::Never,
    };
    // With -U: was a writer really there? Then say the copy may be inconsistent.
    let writer_present = a.force_share && vmdisk_image::held_for_writing(&a.src);
    let pb = crate::progress_bar(a.progress && !quiet);
    let report = crate::report_to(&pb);
    let opts = CopyOptions {
        reflink,
        overwrite: a.force,
        force_share: a.force_share,
        cancel: {
            let _ = cancel;
            crate::signals::cancel_on_interrupt()
        },
    };
    let t0 = Instant::now();
    let st = vmdisk_image::copy_file(&a.src, &a.dst, &opts, &report).map_err(|e| {
        // The source is locked: say the way out for a running VM's disk. (Every other error,
        // a locked destination included, names its file already.)
        let src_locked = matches!(&e, vmdisk_image::Error::Image {
            path,
            source: vmdisk_block::Error::Locked { .. },
            ..
        } if path == &a.src);
        if !src_locked {
            return anyhow::Error::new(e);
        }
        anyhow::Error::new(e).context(format!(
            "cannot copy {src}: a running qemu holds it for writing, so a plain copy could be \
             inconsistent. Copy the running VM's disk consistently with `vmdisk copy --qmp \
             QMP_SOCKET {src} DST`, or stop the VM first, or pass -U/--force-share to copy it \
             anyway (the copy may then be inconsistent)",
            src = a.src.display()
        ))
    })?;
    let seconds = t0.elapsed().as_secs_f64();
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if writer_present && !quiet {
        eprintln!(
            "vmdisk: warning: {} was copied while a running qemu held it for writing (-U): the \
             copy may be inconsistent; `vmdisk copy --qmp QMP_SOCKET` makes a consistent copy",
            a.src.display()
        );
    }
    if let Some(w) = &st.backing_elsewhere {
        if !quiet {
            eprintln!("vmdisk: warning: {}", backing_warning(&st.dst, w));
        }
    }
    if a.json {
        let mut v = serde_json::to_value(&st)?;
        v["seconds"] = json!(round3(seconds));
        v["possibly_inconsistent"] = json!(writer_present);
        crate::print_json(&v)?;
    } else if !quiet {
        println!(
            "Copied {} to {} ({}): {} data bytes of {}, {} copied, in {:.2}s",
            a.src.display(),
            st.dst.display(),
            st.method.as_str(),
            st.data_bytes,
            st.size,
            st.bytes_copied,
            seconds
        );
    }
    Ok(0)
}

fn backing_warning(dst: &Path, w: &vmdisk_image::BackingElsewhere) -> String {
    format!(
        "the copy keeps the backing file name '{}', which is relative: next to {} it means {} \
         (the original uses {}). Copy the backing file there too, or point the copy at it \
         with `qemu-img rebase -u -b {}{} {}`",
        w.name,
        dst.display(),
        w.for_dst.display(),
        w.for_src.display(),
        std::fs::canonicalize(&w.for_src)
            .unwrap_or_else(|_| w.for_src.clone())
            .display(),
        w.format
            .as_deref()
            .map(|f| format!(" -F {f}"))
            .unwrap_or_default(),
        dst.display()
    )
}

fn round3(s: f64) -> f64 {
    (s * 1000.0).round() / 1000.0
}

// ---------------------------------------------------------------------------------------------
// Interrupts
// ---------------------------------------------------------------------------------------------

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_interrupt(_sig: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Turn SIGINT, SIGTERM and SIGHUP into a flag the copy polls, so it can clean up (cancel
/// qemu's job, remove the partial file). A second signal acts as usual (SA_RESETHAND).
fn catch_interrupts() -> &'static AtomicBool {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: sigaction is given a zero-initialised, then filled-in struct that lives for
        // the call; the handler only stores to an atomic, which is async-signal-safe.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_interrupt as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESETHAND;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
    &INTERRUPTED
}

// ---------------------------------------------------------------------------------------------
// Live (--qmp)
// ---------------------------------------------------------------------------------------------

/// One block node as qemu reports it.
#[derive(Debug, Clone)]
struct Node {
    name: String,
    drv: String,
    file: String,
    ro: bool,
    /// Drive id and qdev path of the BlockBackend whose root this node is.
    device: Option<String>,
    qdev: Option<String>,
    /// `image` of query-named-block-nodes (ImageInfo, with backing-image).
    image: Value,
}

impl Node {
    fn describe(&self) -> String {
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
fn block_nodes(q: &mut Qmp) -> Result<Vec<Node>> {
    let named = q.execute("query-named-block-nodes", None)?;
    let blocks = q.execute("query-block", None)?;
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

fn node_list(nodes: &[Node]) -> String {
    if nodes.is_empty() {
        return "  (none)".into();
    }
    nodes
        .iter()
        .map(|n| format!("  {}", n.describe()))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Image formats whose nodes can be copied (and re-created for the copy).
fn is_image_format(drv: &str) -> bool {
    matches!(drv, "qcow2" | "raw")
}

/// The node to copy: `--device` by node-name, drive id or device id; else the image node
/// whose file is `src` (same inode, or the same name as qemu has it).
fn pick_node<'a>(
    nodes: &'a [Node],
    src: &Path,
    device: Option<&str>,
    sock: &Path,
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
            [n] => bail!(
                "node {} is a {} node; vmdisk copy --qmp copies qcow2 and raw image nodes. \
                 qemu's block nodes:\n{}",
                n.name,
                n.drv,
                node_list(nodes)
            ),
            [] => bail!(
                "qemu at {} has no node, drive or device named '{d}'. Its block nodes \
                 (node-name, driver, file, drive/device):\n{}\npass one of these node names \
                 with --device",
                sock.display(),
                node_list(nodes)
            ),
            _ => bail!(
                "'{d}' names several nodes:\n{}",
                node_list(&hits.into_iter().cloned().collect::<Vec<_>>())
            ),
        };
    }
    use std::os::unix::fs::MetadataExt;
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
        [] => bail!(
            "qemu at {} has no image open whose file is {}. Its block nodes (node-name, \
             driver, file, drive/device):\n{}\npass the node to copy with --device NODE",
            sock.display(),
            src.display(),
            node_list(nodes)
        ),
        _ => bail!(
            "several of qemu's image nodes use {}:\n{}\npick one with --device NODE",
            src.display(),
            node_list(&hits.into_iter().cloned().collect::<Vec<_>>())
        ),
    }
}

/// What the copy must look like, from qemu's view of the node.
struct Plan {
    format: Format,
    size: u64,
    cluster_size: Option<u64>,
    /// (name stored in the header, format stored in the header)
    backing_header: Option<(String, Format)>,
    /// (file qemu opened as the node's backing, its format)
    backing_open: Option<(String, String)>,
}

fn plan(node: &Node) -> Result<Plan> {
    let img = &node.image;
    let format: Format = node.drv.parse()?;
    let size = img
        .get("virtual-size")
        .and_then(Value::as_u64)
        .with_context(|| format!("qemu reports no virtual size for node {}", node.name))?;
    let cluster_size = match format {
        Format::Qcow2 => img.get("cluster-size").and_then(Value::as_u64),
        Format::Raw => None,
    };
    let backing_open = img
        .get("backing-image")
        .map(|b| -> Result<(String, String)> {
            let file = str_of(b, "filename")
                .context("qemu reports a backing image without a file name")?;
            let fmt =
                str_of(b, "format").context("qemu reports a backing image without a format")?;
            Ok((file, fmt))
        });
    let backing_open = backing_open.transpose()?;
    let backing_header = match &backing_open {
        None => None,
        Some((file, fmt)) => {
            let name = str_of(img, "backing-filename").unwrap_or_else(|| file.clone());
            let hfmt = str_of(img, "backing-filename-format").unwrap_or_else(|| fmt.clone());
            let hfmt: Format = hfmt.parse().with_context(|| {
                format!("the copy would need a {hfmt} backing file reference; vmdisk writes raw and qcow2")
            })?;
            Some((name, hfmt))
        }
    };
    if let Some((file, _)) = &backing_open {
        if file.starts_with("json:") || !Path::new(file).exists() {
            bail!(
                "node {}'s backing image is {file}, which is not a file vmdisk can see; the copy \
                 needs it as its backing file",
                node.name
            );
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
        use std::os::unix::fs::FileTypeExt;
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

/// Where the live copy stands, for cleanup.
struct Live<'a> {
    q: Qmp,
    job: String,
    target: String,
    node_added: bool,
    job_running: bool,
    cancel: &'a AtomicBool,
}

impl Live<'_> {
    /// Poll the job until it ends; returns the bytes it reports done.
    fn wait_job(&mut self, pb: &Option<indicatif::ProgressBar>) -> Result<u64> {
        let mut gone = 0;
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                bail!("interrupted");
            }
            let jobs = self.q.execute("query-block-jobs", None)?;
            let mine = jobs
                .as_array()
                .into_iter()
                .flatten()
                .find(|j| j.get("device").and_then(Value::as_str) == Some(&self.job));
            if let (Some(j), Some(pb)) = (mine, pb) {
                pb.set_length(j.get("len").and_then(Value::as_u64).unwrap_or(0));
                pb.set_position(j.get("offset").and_then(Value::as_u64).unwrap_or(0));
            }
            let listed = mine.is_some();
            if let Some(ev) = self.end_event() {
                self.job_running = false;
                let offset = ev.data.get("offset").and_then(Value::as_u64).unwrap_or(0);
                if ev.name == "BLOCK_JOB_CANCELLED" {
                    bail!(
                        "qemu's backup job {} was cancelled (not by vmdisk)",
                        self.job
                    );
                }
                if let Some(err) = ev.data.get("error").and_then(Value::as_str) {
                    bail!("qemu's backup job failed: {err}");
                }
                return Ok(offset);
            }
            if listed {
                gone = 0;
            } else {
                gone += 1;
                if gone >= JOB_GONE_POLLS {
                    self.job_running = false;
                    bail!(
                        "qemu's backup job {} disappeared without a completion event",
                        self.job
                    );
                }
            }
            std::thread::sleep(JOB_POLL);
        }
    }

    /// BLOCK_JOB_COMPLETED or BLOCK_JOB_CANCELLED of our job, if it arrived.
    fn end_event(&self) -> Option<vmdisk_vm::qmp::QmpEvent> {
        self.q
            .events()
            .iter()
            .find(|e| {
                matches!(
                    e.name.as_str(),
                    "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED"
                ) && e.data.get("device").and_then(Value::as_str) == Some(&self.job)
            })
            .cloned()
    }

    /// Undo what was done in qemu: cancel the job (and wait for it), delete the node.
    fn abort(&mut self) {
        if self.job_running {
            let _ = self.q.execute(
                "block-job-cancel",
                Some(json!({ "device": self.job, "force": true })),
            );
            let deadline = Instant::now() + CANCEL_TIMEOUT;
            while Instant::now() < deadline && self.end_event().is_none() {
                match self.q.execute("query-block-jobs", None) {
                    Ok(jobs) => {
                        let listed =
                            jobs.as_array().into_iter().flatten().any(|j| {
                                j.get("device").and_then(Value::as_str) == Some(&self.job)
                            });
                        if !listed {
                            break;
                        }
                    }
                    Err(_) => break,
                }
                std::thread::sleep(JOB_POLL);
            }
            self.job_running = false;
        }
        if self.node_added {
            for _ in 0..50 {
                match self
                    .q
                    .execute("blockdev-del", Some(json!({ "node-name": self.target })))
                {
                    Ok(_) => {
                        self.node_added = false;
                        break;
                    }
                    // qemu is gone: nothing left to remove.
                    Err(e) if is_disconnected(&e) => break,
                    Err(_) => std::thread::sleep(JOB_POLL),
                }
            }
            if self.node_added {
                eprintln!(
                    "vmdisk: warning: could not remove node {} from qemu; remove it with QMP \
                     blockdev-del",
                    self.target
                );
            }
        }
    }
}

/// Whether a QMP error means the connection to qemu is gone.
fn is_disconnected(e: &anyhow::Error) -> bool {
    let text = format!("{e:#}");
    text.contains("closed QMP") || text.contains("over QMP") || text.contains("from QMP")
}

fn live(a: &CopyArgs, sock: &Path, quiet: bool, cancel: &'static AtomicBool) -> Result<u8> {
    let t0 = Instant::now();
    let speed = a
        .speed
        .as_deref()
        .map(vmdisk_image::parse_size)
        .transpose()?;
    if !sock.exists() {
        bail!(
            "no QMP socket at {} (start the VM with -qmp unix:{},server=on,wait=off)",
            sock.display(),
            sock.display()
        );
    }
    let mut q =
        Qmp::connect(sock, Path::new("/dev/null"), QMP_CONNECT_TIMEOUT).with_context(|| {
            format!(
                "connecting to qemu's QMP socket {} (qemu serves one client per QMP socket: is \
             another one connected?)",
                sock.display()
            )
        })?;
    q.set_timeout(QMP_COMMAND_TIMEOUT);
    let version = q.qemu_version().unwrap_or_else(|| "?".into());
    let nodes = block_nodes(&mut q).context("listing qemu's block nodes")?;
    let node = pick_node(&nodes, &a.src, a.device.as_deref(), sock)?.clone();
    let plan = plan(&node)?;
    let sync = if plan.backing_open.is_some() {
        "top"
    } else {
        "full"
    };

    let dst = vmdisk_image::copy_destination(&a.src, &a.dst);
    let pending = PendingFile::create(&dst, a.force, 0o644)?;
    let tmp = std::path::absolute(pending.tmp_path())
        .with_context(|| format!("making {} absolute", pending.tmp_path().display()))?;
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
    vmdisk_image::create_in_place(&tmp, &spec)
        .with_context(|| format!("creating {}", tmp.display()))?;

    let id = format!("vmdisk-copy-{}", std::process::id());
    let mut live = Live {
        q,
        job: id.clone(),
        target: id,
        node_added: false,
        job_running: false,
        cancel,
    };
    let pb = crate::progress_bar(a.progress && !quiet);
    let result = (|| -> Result<u64> {
        live.q
            .execute(
                "blockdev-add",
                Some(target_blockdev(&plan, &live.target, &tmp)),
            )
            .context("adding the copy as a block node")?;
        live.node_added = true;
        let mut args = json!({
            "job-id": live.job,
            "device": node.name,
            "target": live.target,
            "sync": sync,
        });
        if let Some(s) = speed {
            args["speed"] = json!(s);
        }
        live.q
            .execute("blockdev-backup", Some(args))
            .map_err(|e| {
                if format!("{e:#}").contains("CommandNotFound") {
                    e.context(format!(
                        "qemu {version} has no blockdev-backup (qemu 2.3 or later has)"
                    ))
                } else {
                    e
                }
            })
            .context("starting qemu's backup job")?;
        live.job_running = true;
        let done = live.wait_job(&pb)?;
        live.q
            .execute("blockdev-del", Some(json!({ "node-name": live.target })))
            .context("removing the copy's node from qemu")?;
        live.node_added = false;
        Ok(done)
    })();
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let bytes = match result {
        Ok(b) => b,
        Err(e) => {
            live.abort();
            drop(pending);
            return Err(e.context(format!(
                "copying node {} ({}) of the VM behind {} to {}; the job was cancelled and the \
                 partial copy removed",
                node.name,
                node.file,
                sock.display(),
                dst.display()
            )));
        }
    };
    let final_dst = pending.dst().to_owned();
    pending.commit()?;
    let seconds = t0.elapsed().as_secs_f64();

    let elsewhere = plan.backing_header.as_ref().and_then(|(name, fmt)| {
        let src = if a.src.exists() {
            a.src.as_path()
        } else {
            Path::new(&node.file)
        };
        vmdisk_image::backing_elsewhere(src, &final_dst, name, Some(fmt.as_str()))
    });
    if let (Some(w), false) = (&elsewhere, quiet) {
        eprintln!("vmdisk: warning: {}", backing_warning(&final_dst, w));
    }
    if a.json {
        crate::print_json(&json!({
            "dst": final_dst,
            "method": "qmp_backup",
            "sync": sync,
            "node": node.name,
            "file": node.file,
            "format": plan.format,
            "size": plan.size,
            "bytes_copied": bytes,
            "backing_file": plan.backing_header.as_ref().map(|b| &b.0),
            "backing_elsewhere": elsewhere,
            "qemu_version": version,
            "seconds": round3(seconds),
        }))?;
    } else if !quiet {
        println!(
            "Copied node {} ({}) of the running VM to {}: the disk as of the copy's start \
             (sync={sync}), {bytes} bytes in {:.2}s",
            node.name,
            node.file,
            final_dst.display(),
            seconds
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let msg = format!("{e:#}");
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
        assert!(format!("{e:#}").contains("qcow2 and raw"), "{e:#}");
        let e = pick_node(&nodes, src, Some("nope"), sock).unwrap_err();
        assert!(format!("{e:#}").contains("[drive drive0]"), "{e:#}");
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
        let v = target_blockdev(&p, "vmdisk-copy-1", Path::new("/d/.c.vmdisk-tmp-1"));
        assert_eq!(v["driver"], "qcow2");
        assert_eq!(v["file"]["filename"], "/d/.c.vmdisk-tmp-1");
        assert_eq!(v["backing"]["file"]["filename"], base.to_str().unwrap());
        assert_eq!(v["backing"]["read-only"], true);

        let mut raw = node("r", "raw", "/d/disk.raw");
        raw.image = json!({"filename": "/d/disk.raw", "format": "raw", "virtual-size": 4096});
        let p = plan(&raw).unwrap();
        assert!(p.backing_open.is_none() && p.backing_header.is_none());
        assert!(target_blockdev(&p, "t", Path::new("/t"))
            .get("backing")
            .is_none());
    }
}
