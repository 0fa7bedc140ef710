//! `measure`: how many bytes an image written by `convert` or `create` needs, with
//! `qemu-img measure`'s two numbers:
//!
//! - `required`: the file size for the data the source actually holds (metadata counted as
//!   if every cluster were allocated, as qemu does, so it is an upper bound);
//! - `fully_allocated`: the file size with every cluster allocated (preallocation=full).
//!
//! Compression is ignored (it can only make the output smaller), as in qemu. The qcow2
//! metadata arithmetic follows qemu's `qcow2_calc_prealloc_size` and
//! `qcow2_refcount_metadata_size` (block/qcow2.c, block/qcow2-refcount.c).

use vmdisk_block::{BlockDevice, ExtentKind};

use crate::create::{ImageOptions, PreallocMode};
use crate::{Error, Format, Image, Result};

/// Guest bytes asked about per block_status call.
const STATUS_WINDOW: u64 = 1 << 30;

/// Bytes per L1 / refcount-table entry.
const TABLE_ENTRY: u64 = 8;

/// What `measure` found, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Measure {
    pub required: u64,
    #[serde(rename = "fully-allocated")]
    pub fully_allocated: u64,
}

/// The bytes an output of `format` with `options` needs for an image of `virtual_size`
/// bytes of which `data` (from [`data_bytes`]) are data.
pub fn measure_size(
    format: Format,
    options: &ImageOptions,
    virtual_size: u64,
    data: Option<DataBytes>,
) -> Result<Measure> {
    match format {
        // qemu counts a raw output at its full size, source or not (raw_measure).
        Format::Raw => Ok(Measure {
            required: virtual_size,
            fully_allocated: virtual_size,
        }),
        Format::Qcow2 => {
            if virtual_size > crate::q::meta::MAX_VIRTUAL_SIZE {
                return Err(Error::InvalidOption {
                    option: "size".into(),
                    reason: format!(
                        "{} is larger than a qcow2 image can be ({})",
                        crate::format_size(virtual_size),
                        crate::format_size(crate::q::meta::MAX_VIRTUAL_SIZE)
                    ),
                });
            }
            let o = options.qcow2_create_options(virtual_size);
            let cs = o.cluster_size;
            let aligned = virtual_size
                .checked_next_multiple_of(cs)
                .ok_or_else(|| too_large(virtual_size))?;
            let l2e = if o.extended_l2 { 16 } else { 8 };
            let refcount_order = u64::from(o.refcount_bits.trailing_zeros());
            let fully = prealloc_size(aligned, cs, l2e, refcount_order)
                .ok_or_else(|| too_large(virtual_size))?;
            // Without a source (`--size`), qemu counts no data clusters; preallocating the
            // data (falloc, full) needs all of it.
            let data_clusters = data.map_or(0, |d| d.clusters);
            let required = if matches!(
                options.preallocation,
                Some(PreallocMode::Falloc | PreallocMode::Full)
            ) {
                fully
            } else {
                fully - aligned + data_clusters.saturating_mul(cs).min(aligned)
            };
            Ok(Measure {
                required,
                fully_allocated: fully,
            })
        }
    }
}

fn too_large(size: u64) -> Error {
    Error::InvalidOption {
        option: "size".into(),
        reason: format!("{size} bytes is too large for this cluster size"),
    }
}

/// qemu's `qcow2_calc_prealloc_size` for a cluster-aligned size; None on overflow.
fn prealloc_size(aligned: u64, cs: u64, l2e: u64, refcount_order: u64) -> Option<u64> {
    let mut meta = cs; // the header cluster
    let nl2e = (aligned / cs).checked_next_multiple_of(cs / l2e)?;
    meta = meta.checked_add(nl2e.checked_mul(l2e)?)?;
    let nl1e = (nl2e * l2e / cs).checked_next_multiple_of(cs / TABLE_ENTRY)?;
    meta = meta.checked_add(nl1e.checked_mul(TABLE_ENTRY)?)?;
    let clusters = meta.checked_add(aligned)? / cs;
    meta = meta.checked_add(refcount_metadata_size(clusters, cs, refcount_order)?)?;
    meta.checked_add(aligned)
}

/// qemu's `qcow2_refcount_metadata_size` (without the generous increase): the refcount table
/// and blocks that cover `clusters` clusters and themselves.
fn refcount_metadata_size(clusters: u64, cs: u64, refcount_order: u64) -> Option<u64> {
    let per_table_cluster = cs / TABLE_ENTRY;
    let per_block = cs * 8 / (1u64 << refcount_order);
    let (mut table, mut blocks, mut n) = (0u64, 0u64, 0u64);
    loop {
        let last = n;
        blocks = clusters
            .checked_add(table)?
            .checked_add(blocks)?
            .div_ceil(per_block);
        table = blocks.div_ceil(per_table_cluster);
        n = clusters + blocks + table;
        if n == last {
            return blocks.checked_add(table)?.checked_mul(cs);
        }
    }
}

/// How much of an image is data: bytes, and the clusters of a given size they touch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DataBytes {
    pub bytes: u64,
    pub clusters: u64,
}

/// Walk `dev`'s block status: the bytes reported as data, and the `cluster`-sized clusters
/// they touch (each counted once).
pub fn data_bytes(dev: &dyn BlockDevice, cluster: u64) -> vmdisk_block::Result<DataBytes> {
    let size = dev.len();
    let mut out = DataBytes::default();
    // End of the last cluster counted, so clusters shared by two extents count once.
    let mut counted_end = 0u64;
    let mut pos = 0;
    while pos < size {
        let n = STATUS_WINDOW.min(size - pos);
        for e in dev.block_status(pos, n)? {
            if e.kind != ExtentKind::Data || e.len == 0 {
                continue;
            }
            out.bytes += e.len;
            let start = (e.off / cluster * cluster).max(counted_end);
            let end = e.end().div_ceil(cluster).saturating_mul(cluster);
            if end > start {
                out.clusters += (end - start) / cluster;
                counted_end = end;
            }
        }
        pos += n;
    }
    Ok(out)
}

/// `qemu-img measure -O FORMAT [-o OPTIONS] SRC`.
pub fn measure(src: &Image, format: Format, options: &ImageOptions) -> Result<Measure> {
    measure_device(&*src.dev(), src.path(), format, options)
}

/// Bytes a converted copy of `dev` will occupy on the host: qemu's `required`, except
/// that a sparse raw output needs only its data (qemu counts a raw output whole).
pub(crate) fn space_needed(
    dev: &dyn BlockDevice,
    path: &std::path::Path,
    format: Format,
    options: &ImageOptions,
) -> Result<u64> {
    let preallocated = matches!(
        options.preallocation,
        Some(PreallocMode::Falloc | PreallocMode::Full)
    );
    if format == Format::Raw && !preallocated {
        return Ok(data_bytes(dev, 1)
            .map_err(Error::image("measuring", path))?
            .bytes);
    }
    Ok(measure_device(dev, path, format, options)?.required)
}

/// [`measure`] of any device (`path` names it in errors).
pub(crate) fn measure_device(
    dev: &dyn BlockDevice,
    path: &std::path::Path,
    format: Format,
    options: &ImageOptions,
) -> Result<Measure> {
    let cluster = match format {
        Format::Raw => 1,
        Format::Qcow2 => options.qcow2_create_options(dev.len()).cluster_size,
    };
    let data = data_bytes(dev, cluster).map_err(Error::image("measuring", path))?;
    measure_size(format, options, dev.len(), Some(data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_qcow2_of_one_gib_matches_qemu() {
        // `qemu-img measure -O qcow2 --size 1G`: required 393216, fully-allocated 1074135040.
        let m = measure_size(Format::Qcow2, &ImageOptions::default(), 1 << 30, None).unwrap();
        assert_eq!(m.fully_allocated, 1_074_135_040);
        assert_eq!(m.required, 393_216);
        // `-o cluster_size=2M,refcount_bits=1 --size 100T`.
        let o = ImageOptions::parse("cluster_size=2M,refcount_bits=1").unwrap();
        let m = measure_size(Format::Qcow2, &o, 100 << 40, None).unwrap();
        assert_eq!(m.required, 434_110_464);
        assert_eq!(m.fully_allocated, 109_951_596_888_064);
    }

    #[test]
    fn absurd_sizes_are_errors_not_overflows() {
        assert!(measure_size(Format::Qcow2, &ImageOptions::default(), u64::MAX, None).is_err());
    }
}
