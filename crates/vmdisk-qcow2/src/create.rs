//! Creating qcow2 images, laid out like qemu: header cluster, refcount table, refcount
//! block(s), L1 table; then (preallocation=metadata) L2 tables and data clusters.

use crate::error::{Qcow2Error, Result};
use crate::meta::{self, CompressionType, Header};
use crate::{BlockDevice, CreateOptions, Preallocation};

/// Check options and build the header (table offsets filled in by `create`).
fn header_for(opts: &CreateOptions) -> Result<Header> {
    let cs = opts.cluster_size;
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(Qcow2Error::refused(format!(
            "cluster size {cs} (must be a power of two from 512 B to 2 MiB)"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if !opts.refcount_bits.is_power_of_two() || opts.refcount_bits > 64 {
        return Err(Qcow2Error::refused(format!(
            "refcount_bits {} (must be 1, 2, 4, 8, 16, 32 or 64)",
            opts.refcount_bits
        )));
    }
    if !opts.size.is_multiple_of(512) {
        return Err(Qcow2Error::refused(
            "image size must be a multiple of 512 bytes",
        ));
    }
    if opts.size > meta::MAX_VIRTUAL_SIZE {
        return Err(Qcow2Error::Limit {
            what: "qcow2 virtual size",
            needed: opts.size,
            limit: meta::MAX_VIRTUAL_SIZE,
        });
    }
    match opts.version {
        2 => {
            if opts.refcount_bits != 16 {
                return Err(Qcow2Error::refused(
                    "v2 (compat 0.10) images need refcount_bits=16",
                ));
            }
            if opts.lazy_refcounts {
                return Err(Qcow2Error::refused(
                    "lazy_refcounts needs a v3 (compat 1.1) image",
                ));
            }
            if opts.compression != CompressionType::Zlib {
                return Err(Qcow2Error::refused(
                    "compression_type=zstd needs a v3 image",
                ));
            }
            if opts.extended_l2 {
                return Err(Qcow2Error::refused("extended_l2 needs a v3 image"));
            }
        }
        3 => {}
        v => return Err(Qcow2Error::refused(format!("qcow2 version {v}"))),
    }
    if opts.extended_l2 && cs < 16384 {
        return Err(Qcow2Error::refused(
            "extended_l2 needs a cluster size of at least 16 KiB",
        ));
    }
    if opts.backing_format.is_some() && opts.backing_file.is_none() {
        return Err(Qcow2Error::refused(
            "a backing format without a backing file",
        ));
    }
    let mut incompat = 0;
    if opts.compression == CompressionType::Zstd {
        incompat |= meta::INCOMPAT_COMPRESSION;
    }
    if opts.extended_l2 {
        incompat |= meta::INCOMPAT_EXTL2;
    }
    let v3 = opts.version == 3;
    Ok(Header {
        version: opts.version,
        backing_file_offset: 0,
        backing_file_size: 0,
        cluster_bits,
        size: opts.size,
        crypt_method: 0,
        l1_size: 0,
        l1_table_offset: 0,
        refcount_table_offset: 0,
        refcount_table_clusters: 0,
        nb_snapshots: 0,
        snapshots_offset: 0,
        incompatible_features: incompat,
        compatible_features: if opts.lazy_refcounts {
            meta::COMPAT_LAZY_REFCOUNTS
        } else {
            0
        },
        autoclear_features: 0,
        refcount_order: opts.refcount_bits.trailing_zeros(),
        header_length: if v3 {
            meta::V3_HEADER_LEN
        } else {
            meta::V2_HEADER_LEN
        },
        compression_type: opts.compression,
        backing_file: opts.backing_file.clone(),
        backing_format: opts.backing_format.clone(),
        feature_names: if v3 {
            Header::default_feature_names()
        } else {
            Vec::new()
        },
        data_file: None,
        other_extensions: Vec::new(),
    })
}

/// Create a qcow2 image on `host` (resized to fit; its old contents are overwritten).
pub fn create(host: &dyn BlockDevice, opts: &CreateOptions) -> vmdisk_block::Result<()> {
    Ok(create_on(host, opts)?)
}

fn create_on(host: &dyn BlockDevice, opts: &CreateOptions) -> Result<()> {
    let mut h = header_for(opts)?;
    let cs = h.cluster_size();
    let l1_entries = meta::l1_entries_for(h.size, h.cluster_bits, opts.extended_l2);
    if l1_entries * 8 > meta::MAX_L1_BYTES {
        return Err(Qcow2Error::Limit {
            what: "L1 table bytes",
            needed: l1_entries * 8,
            limit: meta::MAX_L1_BYTES,
        });
    }
    let l = (l1_entries * 8).div_ceil(cs);
    let e = h.refcount_block_entries();
    // Fixed point: header + table (t) + blocks (b) + L1 (l) clusters, all counted.
    let (mut t, mut b) = (1u64, 1u64);
    loop {
        let total = 1 + t + b + l;
        let nb = total.div_ceil(e);
        let nt = (nb * 8).div_ceil(cs);
        if nb <= b && nt <= t {
            break;
        }
        b = b.max(nb);
        t = t.max(nt);
    }
    if t * cs > meta::MAX_REFCOUNT_TABLE_BYTES {
        return Err(Qcow2Error::Limit {
            what: "refcount table bytes",
            needed: t * cs,
            limit: meta::MAX_REFCOUNT_TABLE_BYTES,
        });
    }
    let total = 1 + t + b + l;
    h.refcount_table_offset = cs;
    h.refcount_table_clusters = t as u32;
    h.l1_table_offset = (1 + t + b) * cs;
    h.l1_size = l1_entries as u32;
    let hdr = h.serialize()?;
    // Truncating to 0 only when there is something to drop: on ext4 any truncate to 0 marks
    // the file for a full flush of its delayed allocations on close (auto_da_alloc), which
    // made every convert wait ~0.5 s per GiB at exit.
    if !host.is_empty() {
        host.resize(0)?;
    }
    host.resize(total * cs)?;
    host.write_all_at(&hdr, 0)?;
    let mut table = vec![0u64; (t * cs / 8) as usize];
    for k in 0..b {
        let at = (1 + t + k) * cs;
        table[k as usize] = at;
        let mut block = vec![0u8; cs as usize];
        for c in k * e..((k + 1) * e).min(total) {
            meta::refcount_set(&mut block, c - k * e, h.refcount_order, 1)?;
        }
        host.write_all_at(&block, at)?;
    }
    host.write_all_at(&meta::encode_table(&table), cs)?;
    host.flush()?;
    if opts.preallocation == Preallocation::Metadata && h.size > 0 {
        crate::image::preallocate_metadata(host)?;
    }
    Ok(())
}
