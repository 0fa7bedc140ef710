//! An offline edit of a guest filesystem as one transaction.
//!
//! ```text
//!   validate the request ─▶ open for writing:  qcow2 (default) the image, as a transaction
//!   (nothing opened yet)                       -o OVERLAY       a new overlay, under a temp name
//!                                              --in-place       the image, as a transaction
//!        ─▶ pick the partition ─▶ open ext4 ─▶ plan (reads; may refuse)
//!        ─▶ qcow2 default only: take the undo snapshot
//!        ─▶ apply (writes) ─▶ flush ─▶ commit: close the image / rename the overlay into place
//! ```
//!
//! A journal that needs recovery (a guest that was killed) is replayed onto the device first,
//! inside the same transaction (so the undo snapshot or the overlay covers it too).
//!
//! A plan that refuses, an apply that fails, an interrupt or a full disk before the commit
//! leaves the image byte-identical (`vmdisk_image::OpenOptions::undo`) and no overlay behind —
//! so there is no separate dry run and the guest is read once. A SIGKILL is covered by the
//! writers' own ordering (the qcow2 engine, the ext4 editor): never corruption.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use vmdisk_block::BlockDevice;
use vmdisk_ext4::{Ext4, FsState};
use vmdisk_image::{Format, Image, NewImage, OpenOptions};

use crate::select::{device_for, select, Chosen, SelectError};

/// Where an edit's change goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// qcow2: an internal snapshot is taken first (`vmdisk snapshot apply` undoes the edit).
    Snapshot,
    /// The image stays untouched; the change goes into a new qcow2 overlay on top of it.
    Overlay { path: PathBuf, replace: bool },
    /// Straight into the image (required for raw images, which cannot hold a snapshot).
    InPlace,
}

/// What an edit works on.
#[derive(Debug, Clone)]
pub struct EditTarget {
    pub image: PathBuf,
    pub format: Option<Format>,
    /// `-P`: number, GPT name or label; `None` applies the default policy.
    pub partition: Option<String>,
    /// `None`: the default (a snapshot for qcow2; raw images must say).
    pub undo: Option<Undo>,
    /// Validate and plan only; write nothing.
    pub dry_run: bool,
}

/// Why an edit did not happen. Nothing was written in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum EditError {
    #[error(transparent)]
    Image(#[from] vmdisk_image::Error),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error("preparing partition {part}")]
    Partition {
        part: String,
        #[source]
        source: vmdisk_block::Error,
    },
    #[error("reading the ext4 filesystem on {part}")]
    Ext4 {
        part: String,
        #[source]
        source: vmdisk_ext4::Error,
    },
    #[error(
        "{} is a raw image: vmdisk cannot keep an undo snapshot inside it. Pass -o \
         OVERLAY.qcow2 to leave it untouched, or --in-place to edit it directly",
        image.display()
    )]
    RawNeedsChoice { image: PathBuf },
    #[error(
        "the overlay {} already exists (it may hold other changes); pass --force to replace it, \
         or name a new file",
        path.display()
    )]
    OverlayExists { path: PathBuf },
    #[error("{}", vmdisk_ext4::Error::NeedsRecovery)]
    NeedsRecovery,
    #[error(
        "the filesystem on {part} is not clean ({state:?}); shut the VM down cleanly or run \
         e2fsck on the partition first"
    )]
    NotClean { part: String, state: FsState },
    #[error("taking the undo snapshot of {}", image.display())]
    Snapshot {
        image: PathBuf,
        #[source]
        source: vmdisk_image::Error,
    },
    /// The plan refused the edit (its own reason).
    #[error("{0}")]
    Refused(String),
    /// `what` is the step, as a phrase ("editing /etc/shadow", "replaying the journal").
    #[error("{what}")]
    Apply {
        what: String,
        #[source]
        source: vmdisk_ext4::Error,
    },
}

/// What an edit did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EditReport<T> {
    /// The partition edited (its GPT name, or "(whole disk)").
    pub partition: String,
    /// "in place", "into the new overlay X" — for messages.
    pub how: String,
    /// The internal snapshot that undoes the edit, when one was taken.
    pub undo_snapshot: Option<String>,
    /// The overlay that holds the edit, when one was made.
    pub overlay: Option<PathBuf>,
    pub dry_run: bool,
    /// What the plan decided.
    pub plan: T,
}

/// The guest's filesystem, opened for planning.
pub struct Guest<'a> {
    /// The filesystem as the guest would see it (a journal that needs recovery is replayed
    /// in memory).
    pub fs: &'a Ext4,
    pub chosen: &'a Chosen,
    /// The partition's device, for planners that stage a whole edit (never written by plan).
    pub dev: &'a Arc<dyn BlockDevice>,
    /// The journal needs recovery: it is replayed onto the device before `apply` runs.
    pub needs_recovery: bool,
}

/// An image open for the edit: the user's own (a transaction), or a new overlay.
enum Writable {
    Image(Image),
    Overlay(NewImage),
}

impl Writable {
    fn image(&self) -> &Image {
        match self {
            Writable::Image(i) => i,
            Writable::Overlay(n) => n.image(),
        }
    }

    fn commit(self) -> Result<(), vmdisk_image::Error> {
        match self {
            Writable::Image(i) => i.close(),
            Writable::Overlay(n) => n.finish(true),
        }
    }
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// `YYYYMMDDTHHMMSSZ` (UTC) for `secs` since the epoch.
pub fn utc_stamp(secs: i64) -> String {
    let (y, mo, d, h, mi, s) = utc(secs);
    format!("{y:04}{mo:02}{d:02}T{h:02}{mi:02}{s:02}Z")
}

/// (year, month, day, hour, minute, second) in UTC from seconds since the epoch.
pub fn utc(secs: i64) -> (i64, u32, u32, u32, u32, u32) {
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        y,
        m,
        d,
        (rem / 3600) as u32,
        (rem % 3600 / 60) as u32,
        (rem % 60) as u32,
    )
}

fn open_fs(
    img: &Image,
    partition: Option<&str>,
) -> Result<(Arc<dyn BlockDevice>, Chosen, Ext4, bool), EditError> {
    let whole = img.dev();
    let chosen = select(&whole, partition)?;
    let dev = device_for(whole, &chosen).map_err(|source| EditError::Partition {
        part: chosen.name.clone(),
        source,
    })?;
    let fs = Ext4::open(dev.clone()).map_err(|source| EditError::Ext4 {
        part: chosen.name.clone(),
        source,
    })?;
    let needs_recovery = match fs.fs_info().state {
        FsState::Clean => false,
        // Replayed onto the device inside the edit (undoable like the edit itself).
        FsState::NeedsRecovery => true,
        state => {
            return Err(EditError::NotClean {
                part: chosen.name.clone(),
                state,
            })
        }
    };
    Ok((dev, chosen, fs, needs_recovery))
}

/// Run one edit on `target`: `plan` reads the guest and decides (or refuses, with
/// [`EditError::Refused`]); `apply` writes the decision onto the partition's device.
/// `what` names the edit in messages and in the undo snapshot's name (`vmdisk-before-WHAT-…`).
pub fn edit<T>(
    target: &EditTarget,
    what: &str,
    plan: impl FnOnce(Guest<'_>) -> Result<T, EditError>,
    apply: impl FnOnce(&Arc<dyn BlockDevice>, &mut T) -> Result<(), EditError>,
) -> Result<EditReport<T>, EditError> {
    let image = &target.image;
    // Validate the request before opening anything for writing.
    let probe = vmdisk_image::open(
        image,
        &OpenOptions {
            format: target.format,
            read_only: true,
            ..Default::default()
        },
    )?;
    let is_qcow2 = probe.format() == Format::Qcow2;
    let undo = match &target.undo {
        Some(u) => u.clone(),
        None if is_qcow2 => Undo::Snapshot,
        None => {
            return Err(EditError::RawNeedsChoice {
                image: image.clone(),
            })
        }
    };
    if let Undo::Overlay { path, replace } = &undo {
        vmdisk_image::refuse_output_onto_input(path, &probe, "the image being edited")?;
        if path.exists() && !replace {
            return Err(EditError::OverlayExists { path: path.clone() });
        }
    }
    if target.dry_run {
        let (dev, chosen, fs, needs_recovery) = open_fs(&probe, target.partition.as_deref())?;
        let t = plan(Guest {
            fs: &fs,
            chosen: &chosen,
            dev: &dev,
            needs_recovery,
        })?;
        return Ok(EditReport {
            partition: chosen.name,
            how: "dry run: nothing written".into(),
            undo_snapshot: None,
            overlay: None,
            dry_run: true,
            plan: t,
        });
    }
    drop(probe);

    let (writable, how) = match &undo {
        Undo::Overlay { path, .. } => {
            let spec = vmdisk_image::overlay_spec(image, target.format)?;
            let new = vmdisk_image::create_new(path, &spec)?;
            (
                Writable::Overlay(new),
                format!("into the new overlay {}", path.display()),
            )
        }
        Undo::Snapshot | Undo::InPlace => {
            let img = vmdisk_image::open(
                image,
                &OpenOptions {
                    format: target.format,
                    ..OpenOptions::transaction()
                },
            )?;
            let how = if undo == Undo::InPlace {
                "in place"
            } else {
                "in place, after an undo snapshot"
            };
            (Writable::Image(img), how.to_string())
        }
    };
    let (dev, chosen, fs, needs_recovery) = open_fs(writable.image(), target.partition.as_deref())?;
    let mut t = plan(Guest {
        fs: &fs,
        chosen: &chosen,
        dev: &dev,
        needs_recovery,
    })?;
    drop(fs);

    // The undo point, inside the transaction: a failure below removes it again.
    let mut undo_snapshot = None;
    if undo == Undo::Snapshot {
        let name = free_snapshot_name(
            writable.image(),
            &format!("vmdisk-before-{what}-{}", utc_stamp(now_secs())),
        )
        .map_err(|source| EditError::Snapshot {
            image: image.clone(),
            source,
        })?;
        vmdisk_image::snapshot_create(writable.image(), &name).map_err(|source| {
            EditError::Snapshot {
                image: image.clone(),
                source,
            }
        })?;
        undo_snapshot = Some(name);
    }
    if needs_recovery {
        // What e2fsck does first: the journal's blocks written home, the journal emptied.
        vmdisk_ext4::replay_journal(dev.clone()).map_err(|source| EditError::Apply {
            what: "replaying the journal".into(),
            source,
        })?;
    }
    apply(&dev, &mut t)?;
    dev.flush().map_err(|source| EditError::Partition {
        part: chosen.name.clone(),
        source,
    })?;
    drop(dev);
    let overlay = match &undo {
        Undo::Overlay { path, .. } => Some(path.clone()),
        _ => None,
    };
    writable.commit()?;
    Ok(EditReport {
        partition: chosen.name,
        how,
        undo_snapshot,
        overlay,
        dry_run: false,
        plan: t,
    })
}

/// `base`, or `base-2`, `base-3`, ... : the first name no snapshot of `img` has yet. Two edits
/// in the same second (or one after a run that was killed after its snapshot) must not be
/// refused for a clash of names.
fn free_snapshot_name(img: &Image, base: &str) -> Result<String, vmdisk_image::Error> {
    let taken: Vec<String> = vmdisk_image::snapshot_list(img)?
        .into_iter()
        .map(|s| s.name)
        .collect();
    let mut name = base.to_string();
    let mut n = 1;
    while taken.contains(&name) {
        n += 1;
        name = format!("{base}-{n}");
    }
    Ok(name)
}

/// The image path an edit's undo snapshot can be applied to, for the "undo with" hint.
pub fn undo_hint(image: &Path, snapshot: &str) -> String {
    format!("vmdisk snapshot apply {} {snapshot}", image.display())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_dates() {
        assert_eq!(utc(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(utc(951_782_400), (2000, 2, 29, 0, 0, 0));
        assert_eq!(utc(1_795_000_000), (2026, 11, 18, 11, 6, 40));
        assert_eq!(utc_stamp(1_795_000_000), "20261118T110640Z");
    }
}
