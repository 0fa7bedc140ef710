//! `-P PART`: which partition (or the whole disk) a guest command works on.
//!
//! By number, GPT partition name (`disk-main-root`), filesystem label (`nixos`) or disko
//! partition key (`ESP` matches the GPT name `disk-<disk>-ESP` that disko gives it). Without
//! `-P`: an unpartitioned disk is used whole; otherwise the only Linux filesystem, else the one
//! labelled `nixos`, else the candidates are listed and nothing is done.

use std::sync::Arc;

use vmdisk_block::{BlockDevice, Slice};
use vmdisk_layout::{FsInfo, FsKind};

/// A chosen byte range of the disk and what it holds.
#[derive(Debug, Clone)]
pub struct Chosen {
    pub off: u64,
    pub len: u64,
    pub number: Option<u32>,
    pub name: String,
    pub fs: Option<FsInfo>,
}

/// Why no partition was chosen. `candidates` is the disk's list, one line each, ready to print.
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error("reading the partition table")]
    ReadingTable(#[source] vmdisk_layout::Error),
    #[error("slicing partition {number}")]
    Slicing {
        number: u32,
        #[source]
        source: vmdisk_block::Error,
    },
    #[error(
        "no partition matches -P {selector} (by number, GPT name, filesystem label or disko \
         partition key); the disk has:\n{candidates}"
    )]
    NoMatch {
        selector: String,
        candidates: String,
    },
    #[error("-P {selector} matches several partitions ({how}); pick one by number:\n{candidates}")]
    AmbiguousSelector {
        selector: String,
        how: &'static str,
        candidates: String,
    },
    #[error("no ext2/3/4 filesystem found on this disk; it has:\n{candidates}")]
    NoLinuxFilesystem { candidates: String },
    #[error(
        "several Linux filesystems and none (or more than one) labelled nixos; pick one with \
         -P:\n{candidates}"
    )]
    Ambiguous { candidates: String },
}

fn is_linux_fs(fs: &Option<FsInfo>) -> bool {
    matches!(
        fs.as_ref().map(|f| f.kind),
        Some(FsKind::Ext4 | FsKind::Ext3 | FsKind::Ext2)
    )
}

/// Every partition with its filesystem, or the whole disk when there is no partition table.
pub fn candidates(dev: &Arc<dyn BlockDevice>) -> Result<Vec<Chosen>, SelectError> {
    let Some(table) =
        vmdisk_layout::probe_partitions(dev.as_ref()).map_err(SelectError::ReadingTable)?
    else {
        return Ok(vec![Chosen {
            off: 0,
            len: dev.len(),
            number: None,
            name: "(whole disk)".to_string(),
            fs: vmdisk_layout::probe_filesystem(dev.as_ref()),
        }]);
    };
    let mut out = Vec::new();
    for p in table.partitions {
        let slice =
            Slice::new(dev.clone(), p.offset, p.size).map_err(|source| SelectError::Slicing {
                number: p.number,
                source,
            })?;
        out.push(Chosen {
            off: p.offset,
            len: p.size,
            number: Some(p.number),
            name: p.name.clone(),
            fs: vmdisk_layout::probe_filesystem(&slice),
        });
    }
    Ok(out)
}

fn describe(c: &Chosen) -> String {
    let fs = match &c.fs {
        Some(f) => format!(
            "{:?}{}",
            f.kind,
            f.label
                .as_ref()
                .map(|l| format!(" LABEL={l}"))
                .unwrap_or_default()
        )
        .to_lowercase(),
        None => "no filesystem found".to_string(),
    };
    match c.number {
        Some(n) => format!("  -P {n}   {} ({fs}, {} bytes)", c.name, c.len),
        None => format!("  whole disk ({fs}, {} bytes)", c.len),
    }
}

/// One way a `-P` selector can name a partition.
type Rule<'a> = dyn Fn(&Chosen) -> bool + 'a;

/// Pick by selector, or by the default policy.
pub fn select(dev: &Arc<dyn BlockDevice>, sel: Option<&str>) -> Result<Chosen, SelectError> {
    let all = candidates(dev)?;
    let list = || all.iter().map(describe).collect::<Vec<_>>().join("\n");
    if let Some(sel) = sel {
        let by_number = sel.parse::<u32>().ok();
        if let Some(c) = all
            .iter()
            .find(|c| by_number.is_some() && c.number == by_number)
        {
            return Ok(c.clone());
        }
        let key_suffix = format!("-{sel}");
        let rules: [(&'static str, &Rule); 3] = [
            ("GPT name", &|c: &Chosen| {
                c.number.is_some() && c.name == sel
            }),
            ("filesystem label", &|c: &Chosen| {
                c.fs.as_ref().and_then(|f| f.label.as_deref()) == Some(sel)
            }),
            // disko names GPT partitions `disk-${diskname}-${partkey}`.
            ("disko partition key", &|c: &Chosen| {
                c.number.is_some()
                    && c.name.starts_with("disk-")
                    && c.name.len() > "disk-".len() + key_suffix.len()
                    && c.name.ends_with(&key_suffix)
            }),
        ];
        for (how, rule) in rules {
            let found: Vec<&Chosen> = all.iter().filter(|c| rule(c)).collect();
            match found.len() {
                0 => continue,
                1 => return Ok(found[0].clone()),
                _ => {
                    return Err(SelectError::AmbiguousSelector {
                        selector: sel.to_string(),
                        how,
                        candidates: found
                            .iter()
                            .map(|c| describe(c))
                            .collect::<Vec<_>>()
                            .join("\n"),
                    })
                }
            }
        }
        return Err(SelectError::NoMatch {
            selector: sel.to_string(),
            candidates: list(),
        });
    }
    // An unpartitioned disk is used whole, whatever it holds (an ext4 or a FAT image).
    if let [only] = all.as_slice() {
        if only.number.is_none() && only.fs.is_some() {
            return Ok(only.clone());
        }
    }
    let linux: Vec<&Chosen> = all.iter().filter(|c| is_linux_fs(&c.fs)).collect();
    if linux.len() == 1 {
        return Ok(linux[0].clone());
    }
    let nixos: Vec<&Chosen> = linux
        .iter()
        .copied()
        .filter(|c| c.fs.as_ref().and_then(|f| f.label.as_deref()) == Some("nixos"))
        .collect();
    if nixos.len() == 1 {
        return Ok(nixos[0].clone());
    }
    if linux.is_empty() {
        return Err(SelectError::NoLinuxFilesystem { candidates: list() });
    }
    Err(SelectError::Ambiguous { candidates: list() })
}

/// The device a guest command works on: the whole disk, or a [`Slice`] of the chosen partition.
pub fn device_for(
    whole: Arc<dyn BlockDevice>,
    chosen: &Chosen,
) -> Result<Arc<dyn BlockDevice>, vmdisk_block::Error> {
    if chosen.off == 0 && chosen.len == whole.len() {
        Ok(whole)
    } else {
        Ok(Arc::new(Slice::new(whole, chosen.off, chosen.len)?))
    }
}
