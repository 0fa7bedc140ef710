//! GUID Partition Table: serialise a [`Plan`]'s table, and read one back (primary, falling
//! back to the backup), validating both CRC32s and bounding every size.

use vmdisk_block::BlockDevice;

use crate::error::Result;
use crate::guid::{type_code_of, Guid};
use crate::mbr::HybridPart;
use crate::model::{GPT_ENTRIES, GPT_NAME_UNITS};
use crate::plan::Plan;
use crate::size::SECTOR;

const SIGNATURE: &[u8; 8] = b"EFI PART";
const REVISION: u32 = 0x0001_0000;
const HEADER_SIZE: u32 = 92;
const ENTRY_SIZE: u32 = 128;
/// Entries vmdisk reads at most (UEFI allows more; nothing real uses them).
pub const MAX_READ_ENTRIES: u32 = 1024;
/// Largest entry size accepted when reading (a multiple of 128).
pub const MAX_ENTRY_SIZE: u32 = 1024;
/// Largest header size accepted when reading (one 512-byte sector).
const MAX_HEADER_SIZE: u32 = 512;

/// The sectors to write: (byte offset, bytes).
pub(crate) fn serialize(plan: &Plan) -> Vec<(u64, Vec<u8>)> {
    let sectors = plan.disk_size / SECTOR;
    let last = sectors - 1;
    let entries_sectors = u64::from(GPT_ENTRIES * ENTRY_SIZE) / SECTOR;
    let mut entries = vec![0u8; (GPT_ENTRIES * ENTRY_SIZE) as usize];
    for p in &plan.partitions {
        let at = (p.number as usize - 1) * ENTRY_SIZE as usize;
        let e = &mut entries[at..at + ENTRY_SIZE as usize];
        e[0..16].copy_from_slice(&p.type_guid.to_gpt_bytes());
        e[16..32].copy_from_slice(&p.guid.to_gpt_bytes());
        e[32..40].copy_from_slice(&p.first_lba.to_le_bytes());
        e[40..48].copy_from_slice(&p.last_lba.to_le_bytes());
        e[48..56].copy_from_slice(&p.attributes.to_le_bytes());
        for (i, u) in p.label.encode_utf16().take(GPT_NAME_UNITS).enumerate() {
            e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
        }
    }
    let entries_crc = crc32fast::hash(&entries);
    let header = |my: u64, alt: u64, entries_lba: u64| {
        let mut h = vec![0u8; SECTOR as usize];
        h[0..8].copy_from_slice(SIGNATURE);
        h[8..12].copy_from_slice(&REVISION.to_le_bytes());
        h[12..16].copy_from_slice(&HEADER_SIZE.to_le_bytes());
        h[24..32].copy_from_slice(&my.to_le_bytes());
        h[32..40].copy_from_slice(&alt.to_le_bytes());
        h[40..48].copy_from_slice(&plan.first_usable_lba.to_le_bytes());
        h[48..56].copy_from_slice(&plan.last_usable_lba.to_le_bytes());
        h[56..72].copy_from_slice(&plan.disk_guid.to_gpt_bytes());
        h[72..80].copy_from_slice(&entries_lba.to_le_bytes());
        h[80..84].copy_from_slice(&GPT_ENTRIES.to_le_bytes());
        h[84..88].copy_from_slice(&ENTRY_SIZE.to_le_bytes());
        h[88..92].copy_from_slice(&entries_crc.to_le_bytes());
        let crc = crc32fast::hash(&h[..HEADER_SIZE as usize]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    let hybrids: Vec<HybridPart> = plan
        .partitions
        .iter()
        .filter_map(|p| {
            let h = p.hybrid.as_ref()?;
            Some(HybridPart {
                number: p.number,
                first_lba: p.first_lba,
                sectors: p.last_lba - p.first_lba + 1,
                // sgdisk: the MBR type is the high byte of the GPT type's listed code.
                derived_kind: type_code_of(p.type_guid).map_or(0, |(c, _)| (c >> 8) as u8),
                kind: h.mbr_type,
                bootable: h.bootable,
            })
        })
        .collect();
    let mbr = if plan.parted {
        crate::mbr::protective_parted(sectors)
    } else if hybrids.is_empty() {
        crate::mbr::protective(sectors)
    } else {
        crate::mbr::hybrid(&hybrids, !plan.efi_gpt_partition_first)
    };
    let backup_entries = last - entries_sectors;
    vec![
        (0, mbr),
        (SECTOR, header(1, last, 2)),
        (2 * SECTOR, entries.clone()),
        (backup_entries * SECTOR, entries),
        (last * SECTOR, header(last, 1, backup_entries)),
    ]
}

/// A partition table read from a device.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionTable {
    /// Always "gpt" for now.
    pub kind: &'static str,
    pub disk_guid: Guid,
    pub first_usable_lba: u64,
    pub last_usable_lba: u64,
    /// True when the primary header was damaged and the backup was used.
    pub from_backup: bool,
    /// Used entries, by number.
    pub partitions: Vec<PartitionInfo>,
}

/// One used GPT entry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PartitionInfo {
    pub number: u32,
    pub first_lba: u64,
    pub last_lba: u64,
    /// Byte offset and length.
    pub offset: u64,
    pub size: u64,
    pub type_guid: Guid,
    /// sgdisk short code and description when known.
    pub type_code: Option<String>,
    pub type_name: Option<&'static str>,
    pub guid: Guid,
    pub name: String,
    pub attributes: u64,
}

/// Read the GPT of `dev`, or None when it has none (no valid primary or backup header).
pub fn probe_partitions(dev: &dyn BlockDevice) -> Result<Option<PartitionTable>> {
    let sectors = dev.len() / SECTOR;
    if sectors < 3 {
        return Ok(None);
    }
    if let Some(t) = read_table(dev, 1, sectors)? {
        return Ok(Some(t));
    }
    let mut t = read_table(dev, sectors - 1, sectors)?;
    if let Some(t) = &mut t {
        t.from_backup = true;
    }
    Ok(t)
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn guid_at(b: &[u8], at: usize) -> Guid {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    Guid::from_gpt_bytes(a)
}

/// Parse the header at `lba`; None when it is missing or invalid in any way.
fn read_table(dev: &dyn BlockDevice, lba: u64, sectors: u64) -> Result<Option<PartitionTable>> {
    let mut h = vec![0u8; SECTOR as usize];
    dev.read_exact_at(&mut h, lba * SECTOR)?;
    if &h[0..8] != SIGNATURE {
        return Ok(None);
    }
    let hsize = le32(&h, 12);
    if !(HEADER_SIZE..=MAX_HEADER_SIZE).contains(&hsize) {
        return Ok(None);
    }
    let stored = le32(&h, 16);
    let mut c = h[..hsize as usize].to_vec();
    c[16..20].fill(0);
    if crc32fast::hash(&c) != stored || le64(&h, 24) != lba {
        return Ok(None);
    }
    let first_usable = le64(&h, 40);
    let last_usable = le64(&h, 48);
    let entries_lba = le64(&h, 72);
    let count = le32(&h, 80);
    let esize = le32(&h, 84);
    if count > MAX_READ_ENTRIES
        || !(ENTRY_SIZE..=MAX_ENTRY_SIZE).contains(&esize)
        || esize % ENTRY_SIZE != 0
        || first_usable > last_usable
        || last_usable >= sectors
    {
        return Ok(None);
    }
    let bytes = u64::from(count) * u64::from(esize);
    let Some(end) = entries_lba
        .checked_mul(SECTOR)
        .and_then(|o| o.checked_add(bytes))
    else {
        return Ok(None);
    };
    if end > dev.len() || entries_lba == 0 {
        return Ok(None);
    }
    // bytes <= MAX_READ_ENTRIES * MAX_ENTRY_SIZE = 1 MiB.
    let mut entries = vec![0u8; bytes as usize];
    dev.read_exact_at(&mut entries, entries_lba * SECTOR)?;
    if crc32fast::hash(&entries) != le32(&h, 88) {
        return Ok(None);
    }
    let mut partitions = Vec::new();
    for (i, e) in entries.chunks_exact(esize as usize).enumerate() {
        let type_guid = guid_at(e, 0);
        if type_guid.is_nil() {
            continue;
        }
        let first = le64(e, 32);
        let last = le64(e, 40);
        let units: Vec<u16> = e[56..128]
            .chunks_exact(2)
            .map(|u| u16::from_le_bytes([u[0], u[1]]))
            .take_while(|&u| u != 0)
            .collect();
        let known = type_code_of(type_guid);
        let size = if last >= first {
            (last - first + 1).saturating_mul(SECTOR)
        } else {
            0
        };
        partitions.push(PartitionInfo {
            // i < MAX_READ_ENTRIES.
            number: i as u32 + 1,
            first_lba: first,
            last_lba: last,
            offset: first.saturating_mul(SECTOR),
            size,
            type_guid,
            type_code: known.map(|k| format!("{:04X}", k.0)),
            type_name: known.map(|k| k.1),
            guid: guid_at(e, 16),
            name: String::from_utf16_lossy(&units),
            attributes: le64(e, 48),
        });
    }
    Ok(Some(PartitionTable {
        kind: "gpt",
        disk_guid: guid_at(&h, 56),
        first_usable_lba: first_usable,
        last_usable_lba: last_usable,
        from_backup: false,
        partitions,
    }))
}
