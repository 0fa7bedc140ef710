//! Writing a [`Plan`] to a device: every filesystem is prepared (FAT layouts planned from the
//! scanned trees, mke2fs run in the scratch directory) before the first byte of the target is
//! touched.

use std::path::Path;

use vmdisk_block::{BlockDevice, Slice};

use crate::error::{Error, Result};
use crate::fat::FatLayout;
use crate::plan::{Plan, PlannedContent};
use crate::probe::{probe_filesystem, FsInfo};
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
    Ext(crate::ext::ScratchImage),
    Swap(Vec<u8>),
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
    // Phase 1: everything that can fail on bad content, no writes to the target.
    let mut prepared = Vec::with_capacity(plan.partitions.len());
    for p in &plan.partitions {
        prepared.push(match &p.content {
            PlannedContent::None => Prepared::None,
            PlannedContent::Fat {
                label, volume_id, ..
            } => Prepared::Fat(FatLayout::new(
                p.len(),
                p.first_lba,
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
            Prepared::Ext(img) => crate::ext::copy_into(img, &part)?,
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
