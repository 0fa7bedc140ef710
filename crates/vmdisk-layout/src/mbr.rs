//! The MBR in sector 0: the protective one sgdisk writes (one 0xEE entry, CHS values from a
//! 255-head, 63-sector geometry), and the hybrid one disko asks for with `sgdisk -h` and then
//! edits with `sfdisk --part-type` / `--activate`. Pure bytes.

/// Heads and sectors per track of the geometry sgdisk computes CHS values with.
const HEADS: u64 = 255;
const SECTORS: u64 = 63;

/// One MBR partition entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MbrEntry {
    pub status: u8,
    pub kind: u8,
    pub first_lba: u64,
    pub sectors: u64,
}

/// CHS bytes of `lba` (cylinders beyond 1023 saturate to FF FF FF, as sgdisk does).
fn chs(lba: u64) -> [u8; 3] {
    let c = lba / (HEADS * SECTORS);
    if c > 1023 {
        return [0xFF, 0xFF, 0xFF];
    }
    let rem = lba % (HEADS * SECTORS);
    let h = rem / SECTORS;
    let s = rem % SECTORS + 1;
    // h < 255, s <= 63, c <= 1023.
    [h as u8, (s as u8) | (((c >> 8) as u8) << 6), c as u8]
}

/// Sector 0 with `entries` (at most 4) and the 0x55AA signature.
pub fn sector(entries: &[MbrEntry]) -> Vec<u8> {
    let mut mbr = vec![0u8; 512];
    for (i, e) in entries.iter().take(4).enumerate() {
        let at = 446 + 16 * i;
        let last = e.first_lba + e.sectors.saturating_sub(1);
        mbr[at] = e.status;
        mbr[at + 1..at + 4].copy_from_slice(&chs(e.first_lba));
        mbr[at + 4] = e.kind;
        mbr[at + 5..at + 8].copy_from_slice(&chs(last));
        let first = e.first_lba.min(u64::from(u32::MAX)) as u32;
        let len = e.sectors.min(u64::from(u32::MAX)) as u32;
        mbr[at + 8..at + 12].copy_from_slice(&first.to_le_bytes());
        mbr[at + 12..at + 16].copy_from_slice(&len.to_le_bytes());
    }
    mbr[510] = 0x55;
    mbr[511] = 0xAA;
    mbr
}

/// sgdisk's protective MBR for a disk of `disk_sectors`.
pub fn protective(disk_sectors: u64) -> Vec<u8> {
    sector(&[MbrEntry {
        status: 0,
        kind: 0xEE,
        first_lba: 1,
        sectors: (disk_sectors - 1).min(u64::from(u32::MAX)),
    }])
}

/// parted's protective MBR: like sgdisk's, but the CHS end is always FF FF FF.
pub fn protective_parted(disk_sectors: u64) -> Vec<u8> {
    let mut m = protective(disk_sectors);
    m[446 + 5..446 + 8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    m
}

/// A hybrid partition: its GPT number, range, the MBR type sgdisk derives from its GPT type,
/// and disko's `mbrPartitionType` / `mbrBootableFlag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HybridPart {
    pub number: u32,
    pub first_lba: u64,
    pub sectors: u64,
    pub derived_kind: u8,
    pub kind: Option<u8>,
    pub bootable: bool,
}

/// `sgdisk -h N1:N2..[:EE]` (the 0xEE entry first, or last with `ee_last`), then disko's
/// `sfdisk --part-type DEV N TYPE` and `--activate DEV N`, which address MBR entry N by the
/// partition's GPT number.
pub fn hybrid(parts: &[HybridPart], ee_last: bool) -> Vec<u8> {
    let mut entries: Vec<MbrEntry> = parts
        .iter()
        .map(|p| MbrEntry {
            status: 0,
            kind: p.derived_kind,
            first_lba: p.first_lba,
            sectors: p.sectors,
        })
        .collect();
    // The 0xEE entry covers sector 1 up to the first hybrid partition.
    let ee_end = parts.iter().map(|p| p.first_lba).min().unwrap_or(2);
    let ee = MbrEntry {
        status: 0,
        kind: 0xEE,
        first_lba: 1,
        sectors: ee_end.saturating_sub(1),
    };
    if ee_last {
        entries.push(ee);
    } else {
        entries.insert(0, ee);
    }
    for p in parts {
        let i = p.number as usize;
        if let Some(e) = i.checked_sub(1).and_then(|i| entries.get_mut(i)) {
            if let Some(k) = p.kind {
                e.kind = k;
            }
            if p.bootable {
                e.status = 0x80;
            }
        }
    }
    sector(&entries)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[test]
    fn protective_chs_as_sgdisk_writes_it() {
        // Recorded by sgdisk 1.0.9 for 4 GiB, 3 GiB and 24 GiB disks (disko corpus).
        assert_eq!(
            hex(&protective(8 << 20)[446..462]),
            "00000200ee2aa00a01000000ffff7f00"
        );
        assert_eq!(
            hex(&protective(6 << 20)[446..462]),
            "00000200ee9f588701000000ffff5f00"
        );
        assert_eq!(
            hex(&protective(48 << 20)[446..462]),
            "00000200eeffffff01000000ffffff02"
        );
    }

    #[test]
    fn hybrid_as_disko_makes_it() {
        let p = HybridPart {
            number: 1,
            first_lba: 2048,
            sectors: 65536,
            derived_kind: 0xEF,
            kind: Some(0x0c),
            bootable: false,
        };
        assert_eq!(
            hex(&hybrid(&[p], true)[446..]),
            "002021000c343004000800000000010000000200ee20200001000000ff07000000000000000000000000\
             0000000000000000000000000000000000000000000055aa"
        );
    }
}
