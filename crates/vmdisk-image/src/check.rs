//! `check`: qemu-img check over the qcow2 engine, with qemu-img's report model.

use std::fmt::Write as _;
use std::path::Path;
use std::sync::Arc;

use vmdisk_block::UndoFile;

use serde::Serialize;

use crate::open::open_file;
use crate::q::{self, check as qcheck};
use crate::{Error, Format, OpenOptions, Result};

pub use crate::q::check::Repair;

/// What `qemu-img check --output=json` prints (same keys; zero counters omitted like qemu).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct CheckOutcome {
    #[serde(skip_serializing_if = "is_zero")]
    pub image_end_offset: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub total_clusters: u64,
    pub check_errors: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub leaks_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub corruptions_fixed: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub allocated_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub fragmented_clusters: u64,
    #[serde(skip_serializing_if = "is_zero")]
    pub compressed_clusters: u64,
    pub filename: String,
    pub format: Format,
    /// Per-problem lines ("Leaked cluster 5 refcount=1 reference=0"); qemu-img prints them
    /// on stderr, apart from the report.
    #[serde(skip)]
    pub messages: Vec<String>,
}

/// How the qcow2 engine's own repair summary line begins (see `messages`).
const REPAIR_SUMMARY: &str = "The following inconsistencies were found and repaired";

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// Check (and with `repair`, fix) the image at `path`. Raw images have no metadata: the
/// outcome is `None`. Repairs open the image read-write under the write lock, as a
/// transaction: a repair that fails half-way leaves the file as it was.
///
/// An overlay's backing chain is opened too (as qemu-img does): a missing backing file, a
/// loop or a chain too deep is an error, not "No errors were found".
pub fn check(path: &Path, opts: &OpenOptions, repair: Repair) -> Result<Option<CheckOutcome>> {
    let read_only = repair == Repair::None;
    let (host, lock, format) =
        open_file(path, opts.format, read_only, opts.force_share && read_only)?;
    if format == Format::Raw {
        return Ok(None);
    }
    if q::read_header(&host).is_ok_and(|h| h.backing_file.is_some()) {
        // Our own lock on `path` would look like someone else's: open the chain without locks.
        let chain_opts = OpenOptions {
            format: Some(format),
            read_only: true,
            force_share: true,
            ..Default::default()
        };
        crate::open(path, &chain_opts)?;
    }
    let host = Arc::new(host);
    let r = if read_only {
        qcheck::check(&*host, repair)
    } else {
        let undo = UndoFile::new(host.clone());
        let r = qcheck::check(&undo, repair);
        match r {
            Ok(r) => undo.commit().map(|()| r),
            Err(e) => Err(e),
        }
    }
    .map_err(Error::image("checking", path))?;
    drop(lock);
    Ok(Some(CheckOutcome {
        image_end_offset: r.image_end_offset,
        total_clusters: r.total_clusters,
        check_errors: r.check_errors,
        leaks: r.leaks,
        leaks_fixed: r.leaks_fixed,
        corruptions: r.corruptions,
        corruptions_fixed: r.corruptions_fixed,
        allocated_clusters: r.allocated_clusters,
        fragmented_clusters: r.fragmented_clusters,
        compressed_clusters: r.compressed_clusters,
        filename: path.display().to_string(),
        format,
        // The engine marks where the second pass of a repair begins with a summary of its
        // own; `human()` prints that summary in qemu-img's words, so it is not kept twice.
        messages: r
            .messages
            .iter()
            .filter(|m| !m.starts_with(REPAIR_SUMMARY))
            .cloned()
            .collect(),
    }))
}

impl CheckOutcome {
    /// qemu-img check's exit code: 0 clean, 1 check errors, 2 corruptions, 3 leaks only.
    pub fn exit_code(&self) -> i32 {
        if self.check_errors > 0 {
            1
        } else if self.corruptions > 0 {
            2
        } else if self.leaks > 0 {
            3
        } else {
            0
        }
    }

    /// The human report of `qemu-img check` (stdout; the per-problem [`messages`] go to
    /// stderr, as qemu-img prints them).
    ///
    /// [`messages`]: CheckOutcome::messages
    pub fn human(&self) -> String {
        let mut s = String::new();
        if self.corruptions_fixed > 0 || self.leaks_fixed > 0 {
            let _ = write!(
                s,
                "The following inconsistencies were found and repaired:\n\n    {} leaked clusters\n    {} corruptions\n\nDouble checking the fixed image now...\n",
                self.leaks_fixed, self.corruptions_fixed
            );
        }
        if self.corruptions == 0 && self.leaks == 0 && self.check_errors == 0 {
            s.push_str("No errors were found on the image.\n");
        } else {
            if self.corruptions > 0 {
                let _ = write!(
                    s,
                    "\n{} errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n",
                    self.corruptions
                );
            }
            if self.leaks > 0 {
                let _ = write!(
                    s,
                    "\n{} leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n",
                    self.leaks
                );
            }
            if self.check_errors > 0 {
                let _ = write!(
                    s,
                    "\n{} internal errors have occurred during the check.\n",
                    self.check_errors
                );
            }
        }
        if self.total_clusters != 0 && self.allocated_clusters != 0 {
            let a = self.allocated_clusters as f64;
            let _ = writeln!(
                s,
                "{}/{} = {:.2}% allocated, {:.2}% fragmented, {:.2}% compressed clusters",
                self.allocated_clusters,
                self.total_clusters,
                a * 100.0 / self.total_clusters as f64,
                self.fragmented_clusters as f64 * 100.0 / a,
                self.compressed_clusters as f64 * 100.0 / a
            );
        }
        if self.image_end_offset > 0 {
            let _ = writeln!(s, "Image end offset: {}", self.image_end_offset);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_text_and_json_follow_qemu() {
        let o = CheckOutcome {
            image_end_offset: 655360,
            total_clusters: 160,
            allocated_clusters: 3,
            filename: "base.qcow2".into(),
            format: Format::Qcow2,
            ..Default::default()
        };
        assert_eq!(o.exit_code(), 0);
        assert_eq!(
            o.human(),
            "No errors were found on the image.\n3/160 = 1.88% allocated, 0.00% fragmented, 0.00% compressed clusters\nImage end offset: 655360\n"
        );
        let v = serde_json::to_value(&o).unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(|k| k.as_str()).collect();
        let mut want = vec![
            "image-end-offset",
            "total-clusters",
            "check-errors",
            "allocated-clusters",
            "filename",
            "format",
        ];
        want.sort();
        let mut keys = keys;
        keys.sort();
        assert_eq!(keys, want);
        let leaky = CheckOutcome {
            leaks: 2,
            ..o.clone()
        };
        assert_eq!(leaky.exit_code(), 3);
        assert!(leaky.human().contains("2 leaked clusters were found"));
        assert_eq!(
            CheckOutcome {
                corruptions: 1,
                leaks: 2,
                ..o
            }
            .exit_code(),
            2
        );
    }

    #[test]
    fn raw_has_nothing_to_check() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        crate::create(&p, &crate::CreateSpec::new(Format::Raw, 4096)).unwrap();
        assert!(check(&p, &OpenOptions::read_only(), Repair::None)
            .unwrap()
            .is_none());
    }
}
