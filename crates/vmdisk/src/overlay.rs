//! `vmdisk commit` and `vmdisk rebase`: overlays folded into, or moved onto, backing files.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use vmdisk_image::{CommitOptions, NewBacking, RebaseOptions};

use crate::{progress_bar, report_to, FormatArg};

#[derive(Debug, Args)]
pub struct CommitArgs {
    /// Keep the overlay's contents after committing (qemu-img commit -d); by default the
    /// overlay is emptied, so it reads through to the backing file again.
    #[arg(short = 'd', long = "keep")]
    pub keep: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    #[command(flatten)]
    pub out: crate::JsonArgs,
    /// The qcow2 overlay whose contents go into its backing file.
    pub overlay: PathBuf,
}

#[derive(Debug, Args)]
pub struct RebaseArgs {
    /// The new backing file, as it should be written into the overlay (relative names are
    /// relative to the overlay's directory); "" removes the backing file (the overlay then
    /// holds everything itself).
    #[arg(short = 'b', value_name = "NEWBACKING", allow_hyphen_values = true)]
    pub backing: String,
    /// Format of the new backing file (probed when not given).
    #[arg(short = 'F', value_enum, value_name = "FMT")]
    pub backing_format: Option<FormatArg>,
    /// Unsafe: only rewrite the backing file name in the header. Right when the backing file
    /// was moved or renamed with its contents unchanged; wrong otherwise.
    #[arg(short = 'u')]
    pub unsafe_header_only: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    #[command(flatten)]
    pub out: crate::JsonArgs,
    /// The qcow2 overlay to rebase.
    pub overlay: PathBuf,
}

pub fn commit(a: CommitArgs, quiet: bool) -> Result<u8> {
    let cancel = crate::signals::cancel_on_interrupt();
    let pb = progress_bar(a.progress && !quiet);
    let report = report_to(&pb);
    let opts = CommitOptions {
        keep: a.keep,
        cancel,
    };
    let stats = vmdisk_image::commit(&a.overlay, &opts, &report)
        .with_context(|| format!("committing {}", a.overlay.display()))?;
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if a.out.is_json() {
        crate::say!("{}", serde_json::to_string_pretty(&stats)?);
    } else if !quiet {
        crate::say!(
            "Committed {} of data and {} of zeros into {}{}{}.",
            vmdisk_image::format_size(stats.data_bytes),
            vmdisk_image::format_size(stats.zero_bytes),
            stats.backing.display(),
            if stats.grew {
                " (grown to the overlay's size)"
            } else {
                ""
            },
            if stats.emptied {
                "; the overlay is empty again"
            } else {
                "; the overlay keeps its copy"
            }
        );
    }
    Ok(0)
}

pub fn rebase(a: RebaseArgs, quiet: bool) -> Result<u8> {
    let cancel = crate::signals::cancel_on_interrupt();
    let pb = progress_bar(a.progress && !quiet && !a.unsafe_header_only);
    let report = report_to(&pb);
    let opts = RebaseOptions {
        backing: NewBacking {
            name: (!a.backing.is_empty()).then(|| a.backing.clone()),
            format: a.backing_format.map(Into::into),
        },
        unsafe_header_only: a.unsafe_header_only,
        cancel,
    };
    let stats = vmdisk_image::rebase(&a.overlay, &opts, &report)
        .with_context(|| format!("rebasing {}", a.overlay.display()))?;
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if a.out.is_json() {
        crate::say!("{}", serde_json::to_string_pretty(&stats)?);
    } else if !quiet {
        let new = stats.new_backing.as_deref().unwrap_or("no backing file");
        if a.unsafe_header_only {
            crate::say!("{} now names {new} (header only).", a.overlay.display());
        } else {
            crate::say!(
                "{} now names {new}; {} that differed were copied into the overlay, so the \
                 guest sees the same disk.",
                a.overlay.display(),
                vmdisk_image::format_size(stats.copied_bytes)
            );
        }
    }
    Ok(0)
}
