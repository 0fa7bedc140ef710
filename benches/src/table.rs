//! Partition tables as `sfdisk --json` reports them, and how two of them differ: what the layout
//! bench compares vmdisk's disks with, its own script's and disko's alike.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::util::run;

/// One GPT entry as `sfdisk --json` reports it (sectors of 512 bytes).
#[derive(Clone, Deserialize, Serialize, PartialEq)]
pub struct Part {
    pub start: u64,
    pub size: u64,
    #[serde(rename = "type")]
    pub type_guid: String,
    #[serde(default)]
    pub name: String,
}

pub(crate) fn sfdisk_parts(raw: &Path) -> Result<Vec<Part>> {
    let out = run(Command::new("sfdisk").arg("--json").arg(raw))?;
    let v: serde_json::Value = serde_json::from_slice(&out).context("parsing sfdisk --json")?;
    let parts = v
        .pointer("/partitiontable/partitions")
        .cloned()
        .context("sfdisk --json: no partitions")?;
    let parts: Vec<Part> = serde_json::from_value(parts).context("parsing sfdisk partitions")?;
    if v.pointer("/partitiontable/sectorsize")
        .and_then(|s| s.as_u64())
        .is_some_and(|s| s != 512)
    {
        bail!("sfdisk reports a sector size other than 512");
    }
    Ok(parts)
}

/// Each way `v` (vmdisk's table) differs from `s` (the script's), one line each.
pub(crate) fn table_differences(v: &[Part], s: &[Part]) -> Vec<String> {
    let mut d = Vec::new();
    if v.len() != s.len() {
        d.push(format!("{} vs {} partitions", v.len(), s.len()));
    }
    for (i, (a, b)) in v.iter().zip(s).enumerate() {
        let n = i + 1;
        if a.type_guid != b.type_guid || a.name != b.name {
            d.push(format!(
                "partition {n}: vmdisk {} {:?}, script {} {:?}",
                a.type_guid, a.name, b.type_guid, b.name
            ));
        }
        if a.start != b.start || a.size != b.size {
            d.push(format!(
                "partition {n}: vmdisk sectors {}+{}, script {}+{}",
                a.start, a.size, b.start, b.size
            ));
        }
    }
    d
}
