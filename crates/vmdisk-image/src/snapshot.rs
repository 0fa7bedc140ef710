//! Internal snapshots of qcow2 images, with the path in every error.

use crate::info::SnapshotEntry;
use crate::q::snapshot as qs;
use crate::{Error, Image, Result};

/// Take an internal snapshot called `name` (the image must be open read-write); returns
/// the new snapshot's id.
pub fn snapshot_create(img: &Image, name: &str) -> Result<String> {
    let q = img.require_qcow2("snapshot create")?;
    qs::create(q, name).map_err(Error::image("creating a snapshot in", img.path()))
}

/// The image's internal snapshots, in table order.
pub fn snapshot_list(img: &Image) -> Result<Vec<SnapshotEntry>> {
    let q = img.require_qcow2("snapshot list")?;
    let l = qs::list(q);
    Ok(l.iter().map(SnapshotEntry::from).collect())
}

/// Revert the image to the snapshot with this name or id.
pub fn snapshot_apply(img: &Image, name_or_id: &str) -> Result<()> {
    let q = img.require_qcow2("snapshot apply")?;
    qs::apply(q, name_or_id).map_err(Error::image("applying a snapshot to", img.path()))
}

/// Delete the snapshot with this name or id.
pub fn snapshot_delete(img: &Image, name_or_id: &str) -> Result<()> {
    let q = img.require_qcow2("snapshot delete")?;
    qs::delete(q, name_or_id).map_err(Error::image("deleting a snapshot from", img.path()))
}
