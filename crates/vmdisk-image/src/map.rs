//! `map`: where each guest range lives, as `qemu-img map --output=json` reports it.

use serde::Serialize;
use vmdisk_block::ExtentKind;

use crate::{Error, Format, Image, Result};

/// How much guest space one `block_status` call covers (bounds the extent list in memory).
const STATUS_WINDOW: u64 = 1 << 30;

/// One run of guest space with the same status (qemu-img map's JSON fields, same order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    /// Chain depth where the status was found (0 = this image).
    pub depth: u32,
    /// Some layer of the chain has the range (data or zero).
    pub present: bool,
    /// Reads as zeros.
    pub zero: bool,
    /// Backed by data in a file.
    pub data: bool,
    pub compressed: bool,
    /// Host offset in the file at `depth`, where the data sits contiguously.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
}

impl MapEntry {
    /// qemu's merge rule: same status, same layer, and contiguous in the file too.
    fn extends(&self, next: &MapEntry) -> bool {
        self.start + self.length == next.start
            && self.depth == next.depth
            && self.present == next.present
            && self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && match (self.offset, next.offset) {
                (None, None) => true,
                (Some(a), Some(b)) => a + self.length == b,
                _ => false,
            }
    }
}

/// Map the whole image (and its backing chain).
pub fn map(img: &Image) -> Result<Vec<MapEntry>> {
    let dev = img.dev();
    let chain = img.chain();
    let bottom = chain.len().saturating_sub(1) as u32;
    let mut out: Vec<MapEntry> = Vec::new();
    let mut pos = 0;
    let len = dev.len();
    while pos < len {
        let n = STATUS_WINDOW.min(len - pos);
        let exts = dev
            .block_status(pos, n)
            .map_err(Error::image("mapping", img.path()))?;
        for e in exts {
            let raw_layer = chain
                .get(e.depth as usize)
                .is_some_and(|l| l.format == Format::Raw);
            let entry = match e.kind {
                ExtentKind::Data => MapEntry {
                    start: e.off,
                    length: e.len,
                    depth: e.depth,
                    present: true,
                    zero: false,
                    data: true,
                    compressed: e.compressed,
                    offset: if e.compressed {
                        None
                    } else {
                        e.host_off.or(raw_layer.then_some(e.off))
                    },
                },
                ExtentKind::Zero => MapEntry {
                    start: e.off,
                    length: e.len,
                    depth: e.depth,
                    present: true,
                    zero: true,
                    data: false,
                    compressed: false,
                    // A hole in a raw file still maps to its own offset.
                    offset: e.host_off.or(raw_layer.then_some(e.off)),
                },
                ExtentKind::Unallocated => MapEntry {
                    start: e.off,
                    length: e.len,
                    // Nothing in the chain has it: qemu reports the deepest layer that covers
                    // the offset (the bottom, unless a backing file is shorter).
                    depth: e.depth.min(bottom),
                    present: false,
                    zero: true,
                    data: false,
                    compressed: false,
                    offset: None,
                },
            };
            match out.last_mut() {
                Some(last) if last.extends(&entry) => last.length += entry.length,
                _ => out.push(entry),
            }
        }
        pos += n;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{open, OpenOptions};
    use vmdisk_block::BlockDevice;

    #[test]
    fn raw_map_matches_qemu_shape() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.raw");
        crate::create(&p, &crate::CreateSpec::new(Format::Raw, 10 << 20)).unwrap();
        let img = open(&p, &OpenOptions::default()).unwrap();
        img.dev().write_all_at(&[1u8; 4096], 1 << 20).unwrap();
        let m = map(&img).unwrap();
        assert_eq!(m.len(), 3, "{m:?}");
        assert_eq!(
            m[1],
            MapEntry {
                start: 1 << 20,
                length: 4096,
                depth: 0,
                present: true,
                zero: false,
                data: true,
                compressed: false,
                offset: Some(1 << 20)
            }
        );
        assert!(m[0].zero && m[0].present && m[0].offset == Some(0));
        let json = serde_json::to_string(&m[1]).unwrap();
        assert_eq!(
            json,
            r#"{"start":1048576,"length":4096,"depth":0,"present":true,"zero":false,"data":true,"compressed":false,"offset":1048576}"#
        );
    }
}
