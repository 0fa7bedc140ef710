//! `vmdisk copy`: copy an image file offline (a reflink where the filesystem can, else a
//! sparse copy; under qemu's locks: `vmdisk_image::copy_file`), or copy a running VM's disk
//! consistently through its QMP socket (qemu's backup job: `vmdisk_qmp::live_copy`). This
//! module only parses flags, catches Ctrl-C and reports.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;
use vmdisk_image::{CopyOptions, Reflink};
use vmdisk_qmp::{LiveCopyOptions, Qmp};

/// How long qemu gets to accept the QMP connection and greet.
const QMP_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one QMP command may take (blockdev-add opens files; qemu answers in ms).
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

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
    let cancel = crate::signals::cancel_on_interrupt();
    match &a.qmp {
        Some(sock) => live(&a, sock, quiet, cancel),
        None => offline(&a, quiet, cancel),
    }
}

// ---------------------------------------------------------------------------------------------
// Offline
// ---------------------------------------------------------------------------------------------

fn offline(a: &CopyArgs, quiet: bool, cancel: vmdisk_block::Cancel) -> Result<u8> {
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
        cancel,
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

fn live(a: &CopyArgs, sock: &Path, quiet: bool, cancel: vmdisk_block::Cancel) -> Result<u8> {
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
    let mut q = Qmp::connect(sock, None, QMP_CONNECT_TIMEOUT).with_context(|| {
        format!(
            "connecting to qemu's QMP socket {} (qemu serves one client per QMP socket: is \
             another one connected?)",
            sock.display()
        )
    })?;
    q.set_timeout(QMP_COMMAND_TIMEOUT);
    let pb = crate::progress_bar(a.progress && !quiet);
    let report = crate::report_to(&pb);
    let opts = LiveCopyOptions {
        src: &a.src,
        dst: &a.dst,
        device: a.device.as_deref(),
        speed,
        overwrite: a.force,
        cancel,
    };
    let r = vmdisk_qmp::live_copy(&mut q, &opts, &report);
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    let r = r?;
    let seconds = t0.elapsed().as_secs_f64();
    if let (Some(w), false) = (&r.backing_elsewhere, quiet) {
        eprintln!("vmdisk: warning: {}", backing_warning(&r.dst, w));
    }
    if a.json {
        let mut v = serde_json::to_value(&r)?;
        v["method"] = json!("qmp_backup");
        v["seconds"] = json!(round3(seconds));
        crate::print_json(&v)?;
    } else if !quiet {
        println!(
            "Copied node {} ({}) of the running VM to {}: the disk as of the copy's start \
             (sync={}), {} bytes in {:.2}s",
            r.node,
            r.file,
            r.dst.display(),
            r.sync.as_str(),
            r.bytes_copied,
            seconds
        );
    }
    Ok(0)
}
