//! Writing a [`Plan`] to a device: every filesystem is prepared (FAT layouts planned from the
//! scanned trees, mke2fs run in the scratch directory) before the first byte of the target is
//! touched.

use std::path::Path;

use vmdisk_block::{BlockDevice, Slice};

use crate::error::{Error, Result};
use crate::fat::FatLayout;
use crate::model::FsFormat;
use crate::plan::{Plan, PlannedContent};
use crate::probe::{probe_filesystem, FsInfo};
use crate::scratch::{copy_into, ScratchImage};
use crate::tree::Sources;
use crate::zero::zero_range;

/// What `apply` wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ApplyReport {
    pub disk_name: String,
    pub disk_size: u64,
    pub partitions: Vec<AppliedPartition>,
}

/// One written partition, with what a probe finds on it now.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppliedPartition {
    pub number: u32,
    pub label: String,
    pub offset: u64,
    pub size: u64,
    pub filesystem: Option<FsInfo>,
}

/// A `Plan` has public fields: re-check what serialising it relies on.
fn check_plan(plan: &Plan) -> Result<()> {
    let sectors = plan.disk_size / crate::SECTOR;
    let bad = |rule: String| Err(Error::invalid(&plan.disk_path, rule));
    if plan.disk_size % crate::SECTOR != 0
        || sectors < crate::plan::GPT_HEAD_SECTORS + crate::plan::GPT_TAIL_SECTORS + 1
        || plan.first_usable_lba < crate::plan::GPT_HEAD_SECTORS
        || plan.last_usable_lba + crate::plan::GPT_TAIL_SECTORS >= sectors
    {
        return bad(format!(
            "plan for a {}-byte disk is inconsistent",
            plan.disk_size
        ));
    }
    for (i, p) in plan.partitions.iter().enumerate() {
        if !(1..=crate::GPT_ENTRIES).contains(&p.number)
            || p.first_lba < plan.first_usable_lba
            || p.last_lba > plan.last_usable_lba
            || p.first_lba > p.last_lba
            || plan.partitions[..i].iter().any(|q| {
                q.number == p.number || (q.first_lba <= p.last_lba && p.first_lba <= q.last_lba)
            })
        {
            return bad(format!("planned partition {} is inconsistent", p.number));
        }
    }
    Ok(())
}

enum Prepared<'a> {
    None,
    Fat(FatLayout<'a>),
    Ext(ScratchImage),
    Swap(Vec<u8>),
}

/// Check, before anything is created, that the installed tools can make what `plan` asks
/// for: btrfs subvolumes need `mkfs.btrfs --subvol` (btrfs-progs 6.11 or newer).
pub fn preflight(plan: &Plan) -> Result<()> {
    for p in &plan.partitions {
        if let PlannedContent::Mkfs {
            format: FsFormat::Btrfs,
            subvolumes,
            ..
        } = &p.content
        {
            if subvolumes.is_empty() {
                continue;
            }
            let (version, ok) = crate::scratch::btrfs_subvol_support()?;
            if !ok {
                return Err(Error::ToolLacks {
                    path: p.path.key("content").key("subvolumes"),
                    detail: format!(
                        "btrfs subvolumes cannot be made without root here: the installed \
                         mkfs.btrfs ({version}) has no --subvol option (btrfs-progs 6.11 or \
                         newer has it), and otherwise only a mounted filesystem (root and a \
                         kernel, the builder VM) can get subvolumes"
                    ),
                });
            }
        }
    }
    Ok(())
}

/// Write `plan` to `target` (exactly `plan.disk_size` bytes): the whole device is zeroed,
/// filesystems are written, and the GPT (protective MBR, primary and backup) comes last.
/// `sources` are the trees the plan was made with.
pub fn apply(
    plan: &Plan,
    sources: &Sources,
    target: &dyn BlockDevice,
    scratch_dir: &Path,
) -> Result<ApplyReport> {
    if target.len() != plan.disk_size {
        return Err(Error::TargetSize {
            planned: plan.disk_size,
            actual: target.len(),
        });
    }
    check_plan(plan)?;
    preflight(plan)?;
    // Phase 1: everything that can fail on bad content, no writes to the target.
    let mut prepared = Vec::with_capacity(plan.partitions.len());
    for p in &plan.partitions {
        prepared.push(match &p.content {
            PlannedContent::None => Prepared::None,
            PlannedContent::Fat {
                bits,
                label,
                volume_id,
                ..
            } => Prepared::Fat(FatLayout::new(
                p.len(),
                p.first_lba,
                *bits,
                label.as_deref(),
                *volume_id,
                sources.get(p.number),
                &p.path,
            )?),
            PlannedContent::Ext {
                format,
                uuid,
                hash_seed,
                extra_args,
                copy_in,
            } => Prepared::Ext(crate::ext::build(
                *format,
                p.len(),
                *uuid,
                *hash_seed,
                extra_args,
                copy_in.as_deref(),
                scratch_dir,
                &format!("{}-{}", plan.disk_name.replace('/', "_"), p.number),
                &p.path,
            )?),
            PlannedContent::Mkfs {
                format,
                uuid,
                extra_args,
                subvolumes,
                ..
            } => {
                let tag = format!("{}-{}", plan.disk_name.replace('/', "_"), p.number);
                let img = ScratchImage::create(scratch_dir, &tag, p.len())?;
                let tree = sources.get(p.number);
                let skeleton;
                let rootdir = match tree {
                    Some(t) => Some(t.dir.as_path()),
                    None if !subvolumes.is_empty() => {
                        skeleton =
                            crate::scratch::subvolume_skeleton(scratch_dir, &tag, subvolumes)?;
                        Some(skeleton.as_path())
                    }
                    None => None,
                };
                let proto_path =
                    scratch_dir.join(format!("vmdisk-layout-{}-{tag}.proto", std::process::id()));
                let proto = match (format, tree) {
                    (FsFormat::Xfs, Some(t)) => {
                        let text = crate::mkfs::xfs_protofile(t, &p.path)?;
                        std::fs::write(&proto_path, text).map_err(|source| Error::Scratch {
                            path: proto_path.clone(),
                            source,
                        })?;
                        Some(proto_path.as_path())
                    }
                    _ => None,
                };
                let runs =
                    crate::mkfs::commands(*format, *uuid, extra_args, rootdir, proto, subvolumes);
                let r = crate::scratch::run_tools(&runs, &img, &p.path);
                if proto.is_some() {
                    // Best effort: a leftover protofile is only a small scratch file.
                    let _ = std::fs::remove_file(&proto_path);
                }
                if tree.is_none() && rootdir.is_some() {
                    if let Some(d) = rootdir {
                        let _ = std::fs::remove_dir_all(d);
                    }
                }
                r?;
                Prepared::Ext(img)
            }
            PlannedContent::Swap { label, uuid } => {
                Prepared::Swap(crate::swap::header(p.len(), *uuid, label.as_deref()))
            }
        });
    }
    // Phase 2: write.
    zero_range(target, 0, target.len())?;
    let mut report = ApplyReport {
        disk_name: plan.disk_name.clone(),
        disk_size: plan.disk_size,
        partitions: Vec::new(),
    };
    for (p, prep) in plan.partitions.iter().zip(&prepared) {
        let part = Slice::new(target, p.offset(), p.len())?;
        match prep {
            Prepared::None => {}
            Prepared::Fat(f) => crate::fatwrite::write(f, &part)?,
            Prepared::Ext(img) => copy_into(img, &part)?,
            Prepared::Swap(h) => part.write_all_at(h, 0)?,
        }
        report.partitions.push(AppliedPartition {
            number: p.number,
            label: p.label.clone(),
            offset: p.offset(),
            size: p.len(),
            filesystem: probe_filesystem(&part),
        });
    }
    for (off, bytes) in crate::gpt::serialize(plan) {
        target.write_all_at(&bytes, off)?;
    }
    target.flush()?;
    Ok(report)
}
