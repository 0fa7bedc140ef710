//! `vmdisk resize --grow-fs`: after the image grows, grow what fills it — a whole-disk ext4
//! (build-vm's nixos.qcow2), or on a GPT disk the last partition and the ext4 in it. Runs as
//! a [`vmdisk_image::ResizeHook`]: everything is checked on the image at its old size before
//! the first byte changes, and the writes happen inside the resize's transaction (an error or
//! Ctrl-C puts the file back byte for byte).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context, Result};
use vmdisk_block::{BlockDevice, Slice};
use vmdisk_image::HookError;
use vmdisk_layout::gptgrow::{self, GptGrowPlan};
use vmdisk_layout::FsKind;

/// What was grown, for `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GrowFsReport {
    /// The partition grown (GPT disks), or null for a whole-disk filesystem.
    pub partition: Option<PartitionGrowth>,
    pub filesystem: vmdisk_ext4::GrowReport,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct PartitionGrowth {
    pub number: u32,
    pub name: String,
    #[serde(rename = "first-lba")]
    pub first_lba: u64,
    #[serde(rename = "old-last-lba")]
    pub old_last_lba: u64,
    #[serde(rename = "new-last-lba")]
    pub new_last_lba: u64,
}

pub struct GrowFs {
    path: PathBuf,
    gpt: Option<GptGrowPlan>,
    pub report: Option<GrowFsReport>,
}

impl GrowFs {
    pub fn new(path: PathBuf) -> Self {
        GrowFs {
            path,
            gpt: None,
            report: None,
        }
    }

    fn way_out(&self) -> String {
        format!(
            "grow it from inside instead: `vmdisk resize {0} +SIZE` without --grow-fs, then \
             `vmdisk rescue {0}` (or boot the VM) and run growpart and resize2fs there",
            self.path.display()
        )
    }

    fn check_inner(&mut self, dev: &Arc<dyn BlockDevice>, old: u64, new: u64) -> Result<()> {
        if new <= old {
            bail!("--grow-fs only grows: give a larger size (shrinking a filesystem is not supported)");
        }
        if gptgrow::has_gpt(dev.as_ref())? {
            let plan = gptgrow::plan(dev.as_ref(), new)?;
            let old_off = plan.first_lba * vmdisk_layout::SECTOR;
            let old_len = (plan.old_last_lba - plan.first_lba + 1) * vmdisk_layout::SECTOR;
            let part: Arc<dyn BlockDevice> = Arc::new(Slice::new(dev.clone(), old_off, old_len)?);
            let what = format!("partition {} ({:?})", plan.number, plan.name);
            match vmdisk_layout::probe_filesystem(part.as_ref()) {
                Some(fs) if matches!(fs.kind, FsKind::Ext4 | FsKind::Ext3 | FsKind::Ext2) => {}
                Some(fs) => bail!(
                    "the last partition, {what}, holds {:?}, not ext4: vmdisk grows ext4 only",
                    fs.kind
                ),
                None => {
                    bail!("the last partition, {what}, holds no filesystem vmdisk knows (not ext4)")
                }
            }
            let (_, new_len) = plan.new_partition_range();
            vmdisk_ext4::plan_grow(part, new_len).with_context(|| format!("in {what}"))?;
            self.gpt = Some(plan);
        } else {
            match vmdisk_layout::probe_filesystem(dev.as_ref()) {
                Some(fs) if matches!(fs.kind, FsKind::Ext4 | FsKind::Ext3 | FsKind::Ext2) => {}
                _ => bail!(
                    "no GPT and no ext4 filesystem at byte 0 (vmdisk grows a whole-disk ext4 or \
                     the last partition of a GPT disk)"
                ),
            }
            vmdisk_ext4::plan_grow(dev.clone(), new)?;
        }
        Ok(())
    }

    fn apply_inner(&mut self, dev: &Arc<dyn BlockDevice>, new: u64) -> Result<()> {
        if dev.len() < new {
            bail!(
                "the image reads as {} bytes after resizing, not {new}",
                dev.len()
            );
        }
        let report = match &self.gpt {
            Some(plan) => {
                for (off, data) in plan.writes() {
                    dev.write_all_at(&data, off)
                        .context("writing the partition table")?;
                }
                let (off, len) = plan.new_partition_range();
                let part: Arc<dyn BlockDevice> = Arc::new(Slice::new(dev.clone(), off, len)?);
                let fs = vmdisk_ext4::grow(part, len)
                    .with_context(|| format!("in partition {}", plan.number))?;
                GrowFsReport {
                    partition: Some(PartitionGrowth {
                        number: plan.number,
                        name: plan.name.clone(),
                        first_lba: plan.first_lba,
                        old_last_lba: plan.old_last_lba,
                        new_last_lba: plan.new_last_lba,
                    }),
                    filesystem: fs,
                }
            }
            None => GrowFsReport {
                partition: None,
                filesystem: vmdisk_ext4::grow(dev.clone(), new)?,
            },
        };
        // No flush here: the editor's commit flushed in its order, and closing the image (the
        // transaction's commit) flushes the rest.
        self.report = Some(report);
        Ok(())
    }
}

fn boxed(e: anyhow::Error) -> HookError {
    format!("{e:#}").into()
}

impl vmdisk_image::ResizeHook for GrowFs {
    fn check(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        old: u64,
        new: u64,
    ) -> std::result::Result<(), HookError> {
        self.check_inner(dev, old, new)
            .map_err(|e| boxed(anyhow!("{e:#}; {}", self.way_out())))
    }

    fn apply(
        &mut self,
        dev: &Arc<dyn BlockDevice>,
        _old: u64,
        new: u64,
    ) -> std::result::Result<(), HookError> {
        self.apply_inner(dev, new).map_err(boxed)
    }
}
