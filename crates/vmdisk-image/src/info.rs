//! `info`: the `qemu-img info --output=json` model and its human text.

use std::fmt::Write as _;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::open::{open_file, resolve_backing};
use crate::q::{self, CompressionType};
use crate::{Error, Format, OpenOptions, Result, MAX_BACKING_DEPTH};

/// One internal snapshot (qemu's field names and order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct SnapshotEntry {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub icount: Option<u64>,
    pub vm_clock_nsec: u32,
    pub name: String,
    pub date_sec: u64,
    pub date_nsec: u32,
    pub vm_clock_sec: u64,
    pub id: String,
    pub vm_state_size: u64,
}

impl From<&q::SnapshotInfo> for SnapshotEntry {
    fn from(s: &q::SnapshotInfo) -> Self {
        SnapshotEntry {
            icount: s.icount,
            vm_clock_nsec: (s.vm_clock_nsec % 1_000_000_000) as u32,
            name: s.name.clone(),
            date_sec: s.date_sec,
            date_nsec: s.date_nsec,
            vm_clock_sec: s.vm_clock_nsec / 1_000_000_000,
            id: s.id.clone(),
            vm_state_size: s.vm_state_size,
        }
    }
}

/// One persistent dirty bitmap, as `qemu-img info` lists it (same keys, same order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct BitmapEntry {
    /// qemu's names: "in-use" (not saved consistently), "auto" (enabled).
    pub flags: Vec<String>,
    pub name: String,
    /// Bytes of guest disk per bit.
    pub granularity: u64,
}

impl From<&q::BitmapInfo> for BitmapEntry {
    fn from(b: &q::BitmapInfo) -> Self {
        BitmapEntry {
            flags: b.flags.iter().map(|f| f.to_string()).collect(),
            name: b.name.clone(),
            granularity: b.granularity,
        }
    }
}

/// qcow2's `format-specific` data.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct Qcow2Specific {
    pub compat: String,
    pub compression_type: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lazy_refcounts: Option<bool>,
    /// Persistent bitmaps; qemu omits the key when there are none.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub bitmaps: Vec<BitmapEntry>,
    pub refcount_bits: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub corrupt: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub extended_l2: Option<bool>,
}

/// `format-specific` as qemu tags it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", content = "data", rename_all = "lowercase")]
pub enum FormatSpecific {
    Qcow2(Qcow2Specific),
}

/// One image of `qemu-img info --output=json` (same keys, same order, same omissions).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageInfo {
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub snapshots: Vec<SnapshotEntry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename_format: Option<String>,
    pub virtual_size: u64,
    pub filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cluster_size: Option<u64>,
    pub format: Format,
    pub actual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub format_specific: Option<FormatSpecific>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub full_backing_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backing_filename: Option<String>,
    pub dirty_flag: bool,
}

/// Describe the image at `path`, and with `backing_chain` every image below it.
/// The qcow2 header is read without opening the image, so damaged images still get an answer.
pub fn info(path: &Path, opts: &OpenOptions, backing_chain: bool) -> Result<Vec<ImageInfo>> {
    let mut out = Vec::new();
    let mut seen: Vec<((u64, u64), PathBuf)> = Vec::new();
    let mut next = Some((path.to_owned(), opts.format));
    while let Some((p, fmt)) = next.take() {
        let (host, _lock, format) = open_file(&p, fmt, true, opts.force_share)?;
        let meta = host.file().metadata().map_err(|source| Error::File {
            op: "stat",
            path: p.clone(),
            source,
        })?;
        let id = (meta.dev(), meta.ino());
        if seen.iter().any(|(i, _)| *i == id) {
            let mut names: Vec<String> =
                seen.iter().map(|(_, p)| p.display().to_string()).collect();
            names.push(p.display().to_string());
            return Err(Error::BackingLoop {
                chain: names.join(" -> "),
            });
        }
        if seen.len() >= MAX_BACKING_DEPTH {
            return Err(Error::BackingTooDeep {
                path: path.to_owned(),
                limit: MAX_BACKING_DEPTH,
            });
        }
        seen.push((id, p.clone()));
        let actual_size = meta.blocks() * 512;
        let filename = p.display().to_string();
        let i = match format {
            Format::Raw => ImageInfo {
                snapshots: Vec::new(),
                backing_filename_format: None,
                virtual_size: vmdisk_block::BlockDevice::len(&host),
                filename,
                cluster_size: None,
                format,
                actual_size,
                format_specific: None,
                full_backing_filename: None,
                backing_filename: None,
                dirty_flag: false,
            },
            Format::Qcow2 => {
                let h = q::read_header(&host).map_err(Error::image("reading the header of", &p))?;
                let full = h.backing_file.as_deref().map(|b| resolve_backing(&p, b));
                if backing_chain {
                    if let Some(full) = &full {
                        let bfmt = match h.backing_format.as_deref() {
                            Some(f) => Some(f.parse::<Format>()?),
                            None => None,
                        };
                        next = Some((full.clone(), bfmt));
                    }
                }
                let v3 = h.version >= 3;
                ImageInfo {
                    snapshots: h.snapshots.iter().map(SnapshotEntry::from).collect(),
                    backing_filename_format: h.backing_format.clone(),
                    virtual_size: h.virtual_size,
                    filename,
                    cluster_size: Some(h.cluster_size),
                    format,
                    actual_size,
                    format_specific: Some(FormatSpecific::Qcow2(Qcow2Specific {
                        compat: if v3 { "1.1" } else { "0.10" }.to_string(),
                        compression_type: match h.compression_type {
                            CompressionType::Zlib => "zlib",
                            CompressionType::Zstd => "zstd",
                        }
                        .to_string(),
                        lazy_refcounts: v3.then_some(h.lazy_refcounts),
                        bitmaps: h.bitmaps.iter().map(BitmapEntry::from).collect(),
                        refcount_bits: h.refcount_bits,
                        corrupt: v3.then_some(h.corrupt),
                        extended_l2: v3.then_some(h.extended_l2),
                    })),
                    full_backing_filename: full.map(|f| f.display().to_string()),
                    backing_filename: h.backing_file.clone(),
                    dirty_flag: h.dirty,
                }
            }
        };
        out.push(i);
    }
    Ok(out)
}

/// A size the way qemu prints it: three significant digits and a binary unit ("464 KiB").
pub fn format_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    // qemu switches to the next unit once the integer part reaches 1000.
    let mut i = 0;
    let mut v = bytes as f64;
    while v >= 1000.0 && i < UNITS.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    let s = if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else if v >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    };
    let s = if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    };
    format!("{s} {}", UNITS[i])
}

fn local_time(sec: u64) -> String {
    let t = sec as libc::time_t;
    // SAFETY: tm is plain old data (all-zero is valid); localtime_r fills it from a valid
    // time_t and we only read it when it succeeded.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals for the duration of the call.
    let ok = unsafe { !libc::localtime_r(&t, &mut tm).is_null() };
    if !ok {
        return "1970-01-01 00:00:00".to_string();
    }
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}",
        tm.tm_year + 1900,
        tm.tm_mon + 1,
        tm.tm_mday,
        tm.tm_hour,
        tm.tm_min,
        tm.tm_sec
    )
}

/// The snapshot table as `qemu-img snapshot -l` and `qemu-img info` print it.
pub fn snapshot_table(snaps: &[SnapshotEntry]) -> String {
    let mut s = format!(
        "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}\n",
        "ID", "TAG", "VM_SIZE", "DATE", "VM_CLOCK", "ICOUNT"
    );
    for sn in snaps {
        let secs = sn.vm_clock_sec;
        let clock = format!(
            "{:04}:{:02}:{:02}.{:03}",
            secs / 3600,
            (secs / 60) % 60,
            secs % 60,
            sn.vm_clock_nsec / 1_000_000
        );
        let icount = sn.icount.map(|i| i.to_string()).unwrap_or_default();
        let _ = writeln!(
            s,
            "{:<7} {:<16} {:>8} {:>19} {:>15} {:>10}",
            sn.id,
            sn.name,
            format_size(sn.vm_state_size),
            local_time(sn.date_sec),
            clock,
            icount
        );
    }
    s
}

impl ImageInfo {
    /// The human text of `qemu-img info` (without qemu's child-node section).
    pub fn human(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "image: {}", self.filename);
        let _ = writeln!(s, "file format: {}", self.format);
        let _ = writeln!(
            s,
            "virtual size: {} ({} bytes)",
            format_size(self.virtual_size),
            self.virtual_size
        );
        let _ = writeln!(s, "disk size: {}", format_size(self.actual_size));
        if let Some(c) = self.cluster_size {
            let _ = writeln!(s, "cluster_size: {c}");
        }
        if let Some(b) = &self.backing_filename {
            let _ = write!(s, "backing file: {b}");
            if let Some(full) = &self.full_backing_filename {
                if full != b {
                    let _ = write!(s, " (actual path: {full})");
                }
            }
            s.push('\n');
        }
        if let Some(f) = &self.backing_filename_format {
            let _ = writeln!(s, "backing file format: {f}");
        }
        if self.dirty_flag {
            s.push_str("cleanly shut down: no\n");
        }
        if !self.snapshots.is_empty() {
            s.push_str("Snapshot list:\n");
            s.push_str(&snapshot_table(&self.snapshots));
        }
        if let Some(FormatSpecific::Qcow2(q)) = &self.format_specific {
            s.push_str("Format specific information:\n");
            let _ = writeln!(s, "    compat: {}", q.compat);
            let _ = writeln!(s, "    compression type: {}", q.compression_type);
            if let Some(l) = q.lazy_refcounts {
                let _ = writeln!(s, "    lazy refcounts: {l}");
            }
            if !q.bitmaps.is_empty() {
                s.push_str("    bitmaps:\n");
                for (i, b) in q.bitmaps.iter().enumerate() {
                    let _ = writeln!(s, "        [{i}]:");
                    s.push_str("            flags:\n");
                    for (j, f) in b.flags.iter().enumerate() {
                        let _ = writeln!(s, "                [{j}]: {f}");
                    }
                    let _ = writeln!(s, "            name: {}", b.name);
                    let _ = writeln!(s, "            granularity: {}", b.granularity);
                }
            }
            let _ = writeln!(s, "    refcount bits: {}", q.refcount_bits);
            if let Some(c) = q.corrupt {
                let _ = writeln!(s, "    corrupt: {c}");
            }
            if let Some(e) = q.extended_l2 {
                let _ = writeln!(s, "    extended l2: {e}");
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_print_like_qemu() {
        assert_eq!(format_size(0), "0 B");
        assert_eq!(format_size(512), "512 B");
        assert_eq!(format_size(1000), "0.977 KiB");
        assert_eq!(format_size(475136), "464 KiB");
        assert_eq!(format_size(10 << 20), "10 MiB");
        assert_eq!(format_size(1 << 30), "1 GiB");
        assert_eq!(format_size(3 << 29), "1.5 GiB");
    }

    #[test]
    fn raw_info_json_omits_what_qemu_omits() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        crate::create(&p, &crate::CreateSpec::new(Format::Raw, 10 << 20)).unwrap();
        let i = info(&p, &OpenOptions::read_only(), false).unwrap();
        let v = serde_json::to_value(&i[0]).unwrap();
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys.len(), 5, "{v}");
        assert_eq!(v["virtual-size"], 10 << 20);
        assert_eq!(v["format"], "raw");
        assert_eq!(v["actual-size"], 0);
        assert_eq!(v["dirty-flag"], false);
        assert!(i[0]
            .human()
            .contains("virtual size: 10 MiB (10485760 bytes)"));
    }

    #[test]
    fn snapshot_rows_line_up_like_qemu() {
        let t = snapshot_table(&[SnapshotEntry {
            icount: Some(0),
            vm_clock_nsec: 0,
            name: "s1".into(),
            date_sec: 0,
            date_nsec: 0,
            vm_clock_sec: 0,
            id: "1".into(),
            vm_state_size: 0,
        }]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "ID      TAG               VM_SIZE                DATE        VM_CLOCK     ICOUNT"
        );
        assert!(
            lines[1].starts_with("1       s1                    0 B "),
            "{t}"
        );
        assert!(lines[1].ends_with("  0000:00:00.000          0"), "{t}");
    }
}
