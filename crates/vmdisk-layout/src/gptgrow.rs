//! Growing a GPT disk in place after its image grew (`vmdisk resize --grow-fs`): the backup
//! header and entries move to the new end, the last usable LBA follows, the last partition
//! (by position on disk) grows to fill the space, the protective MBR covers the new size.
//!
//! ```text
//!  before:  MBR | hdr(1) | entries(2..) | parts ...... last part | bkp entries | bkp hdr | new space
//!  after:   MBR'| hdr'   | entries'     | parts ...... last part ────────────▶ | bkp entries'| bkp hdr'
//! ```
//!
//! [`plan`] reads and checks both copies (their CRCs, that they agree) and computes every
//! sector to write; [`GptGrowPlan::writes`] lists them, old backup sectors zeroed first. No IO
//! beyond reading happens here.

use vmdisk_block::BlockDevice;

use crate::size::SECTOR;

const SIGNATURE: &[u8; 8] = b"EFI PART";
/// The header size vmdisk rewrites (the UEFI one; larger headers are refused).
const HEADER_SIZE: usize = 92;
/// Most bytes of entries handled (128 entries of 128 bytes is what every tool writes;
/// UEFI allows more, bounded here at 1 MiB).
const MAX_ENTRIES_BYTES: u64 = 1 << 20;
/// sgdisk's default partition alignment (1 MiB in 512-byte sectors).
const ALIGN_SECTORS: u64 = 2048;

/// Why a GPT disk cannot be grown. Nothing was written.
#[derive(Debug, thiserror::Error)]
pub enum GptGrowError {
    #[error("reading the partition table")]
    Reading(#[from] vmdisk_block::Error),
    /// The primary or backup table is damaged or inconsistent.
    #[error("the GPT is damaged ({what}); repair it first (`sgdisk -v`, then `sgdisk -e`)")]
    Damaged { what: String },
    /// Something vmdisk does not grow.
    #[error("{what}")]
    Unsupported { what: String },
}

fn damaged(what: impl Into<String>) -> GptGrowError {
    GptGrowError::Damaged { what: what.into() }
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn header_crc(h: &[u8]) -> u32 {
    let mut c = h[..HEADER_SIZE].to_vec();
    c[16..20].fill(0);
    crc32fast::hash(&c)
}

/// Everything a GPT grow writes, and what it grows.
#[derive(Debug, Clone)]
pub struct GptGrowPlan {
    /// Number (1-based entry index) and name of the partition that grows.
    pub number: u32,
    pub name: String,
    pub first_lba: u64,
    pub old_last_lba: u64,
    pub new_last_lba: u64,
    old_backup_entries_lba: u64,
    entries_sectors: u64,
    mbr: Vec<u8>,
    header: Vec<u8>,
    backup_header: Vec<u8>,
    entries: Vec<u8>,
    new_backup_entries_lba: u64,
    new_disk_last_lba: u64,
}

impl GptGrowPlan {
    /// Byte offset and length of the partition after the grow.
    pub fn new_partition_range(&self) -> (u64, u64) {
        (
            self.first_lba * SECTOR,
            (self.new_last_lba - self.first_lba + 1) * SECTOR,
        )
    }

    /// Sectors to write, in order: the old backup zeroed, the new backup, then the primary
    /// (so a crash half-way leaves a valid primary or a valid backup that sgdisk can use).
    pub fn writes(&self) -> Vec<(u64, Vec<u8>)> {
        let zeros = vec![0u8; ((self.entries_sectors + 1) * SECTOR) as usize];
        let mut hdr = self.header.clone();
        hdr.resize(SECTOR as usize, 0);
        let mut bkp = self.backup_header.clone();
        bkp.resize(SECTOR as usize, 0);
        vec![
            (self.old_backup_entries_lba * SECTOR, zeros),
            (self.new_backup_entries_lba * SECTOR, self.entries.clone()),
            (self.new_disk_last_lba * SECTOR, bkp),
            (2 * SECTOR, self.entries.clone()),
            (SECTOR, hdr),
            (0, self.mbr.clone()),
        ]
        .into_iter()
        .collect()
    }
}

/// Is there a GPT on `dev` (a valid primary header)?
pub fn has_gpt(dev: &dyn BlockDevice) -> Result<bool, GptGrowError> {
    if dev.len() < 3 * SECTOR {
        return Ok(false);
    }
    let mut h = vec![0u8; SECTOR as usize];
    dev.read_exact_at(&mut h, SECTOR)?;
    Ok(&h[0..8] == SIGNATURE)
}

/// Plan growing the GPT disk `dev` (at its current size) to `new_len` bytes.
pub fn plan(dev: &dyn BlockDevice, new_len: u64) -> Result<GptGrowPlan, GptGrowError> {
    let sectors = dev.len() / SECTOR;
    let new_sectors = new_len / SECTOR;
    if sectors < 3 || new_sectors < sectors {
        return Err(GptGrowError::Unsupported {
            what: "the disk is too small to hold a GPT".into(),
        });
    }
    let mut h = vec![0u8; SECTOR as usize];
    dev.read_exact_at(&mut h, SECTOR)?;
    if &h[0..8] != SIGNATURE {
        return Err(damaged("no primary header at LBA 1"));
    }
    if le32(&h, 12) as usize != HEADER_SIZE {
        return Err(GptGrowError::Unsupported {
            what: format!(
                "a GPT header of {} bytes (vmdisk grows 92-byte headers)",
                le32(&h, 12)
            ),
        });
    }
    if header_crc(&h) != le32(&h, 16) || le64(&h, 24) != 1 {
        return Err(damaged("primary header checksum"));
    }
    let alt = le64(&h, 32);
    if alt != sectors - 1 {
        return Err(damaged(format!(
            "the backup header is at LBA {alt}, not at the end of the disk (LBA {})",
            sectors - 1
        )));
    }
    let first_usable = le64(&h, 40);
    let last_usable = le64(&h, 48);
    let entries_lba = le64(&h, 72);
    let count = u64::from(le32(&h, 80));
    let esize = u64::from(le32(&h, 84));
    let bytes = count * esize;
    if esize < 128 || esize % 128 != 0 || bytes > MAX_ENTRIES_BYTES || bytes == 0 {
        return Err(damaged(format!("{count} entries of {esize} bytes")));
    }
    let entries_sectors = bytes.div_ceil(SECTOR);
    if entries_lba != 2 || first_usable < 2 + entries_sectors || last_usable >= sectors {
        return Err(damaged("header geometry"));
    }
    let mut entries = vec![0u8; (entries_sectors * SECTOR) as usize];
    dev.read_exact_at(&mut entries, entries_lba * SECTOR)?;
    if crc32fast::hash(&entries[..bytes as usize]) != le32(&h, 88) {
        return Err(damaged("primary entries checksum"));
    }
    // The backup must be intact and agree: it is what we rewrite at the new end.
    let mut b = vec![0u8; SECTOR as usize];
    dev.read_exact_at(&mut b, (sectors - 1) * SECTOR)?;
    let bkp_entries_lba = le64(&b, 72);
    if &b[0..8] != SIGNATURE
        || header_crc(&b) != le32(&b, 16)
        || le64(&b, 24) != sectors - 1
        || le32(&b, 88) != le32(&h, 88)
        || bkp_entries_lba + entries_sectors != sectors - 1
        || bkp_entries_lba <= last_usable
    {
        return Err(damaged(
            "backup header missing or different from the primary",
        ));
    }
    // The MBR must be protective (one 0xEE entry): a hybrid MBR names partitions by LBA and
    // vmdisk does not rewrite it.
    let mut mbr = vec![0u8; SECTOR as usize];
    dev.read_exact_at(&mut mbr, 0)?;
    let kinds: Vec<u8> = (0..4).map(|i| mbr[446 + 16 * i + 4]).collect();
    if mbr[510..512] != [0x55, 0xAA] || kinds[0] != 0xEE || kinds[1..].iter().any(|&k| k != 0) {
        return Err(GptGrowError::Unsupported {
            what: "the MBR is not a plain protective MBR (a hybrid MBR?); vmdisk grows GPT \
                   disks with a protective MBR only"
                .into(),
        });
    }
    // The last partition by position.
    let mut last: Option<(u32, u64, u64)> = None;
    for i in 0..count {
        let e = &entries[(i * esize) as usize..((i + 1) * esize) as usize];
        if e[0..16].iter().all(|&x| x == 0) {
            continue;
        }
        let (f, l) = (le64(e, 32), le64(e, 40));
        if f > l || l > last_usable || f < first_usable {
            return Err(damaged(format!("partition {} spans LBA {f}..{l}", i + 1)));
        }
        if last.is_none_or(|(_, _, ll)| l > ll) {
            last = Some((i as u32 + 1, f, l));
        }
    }
    let Some((number, first_lba, old_last_lba)) = last else {
        return Err(GptGrowError::Unsupported {
            what: "the GPT has no partition to grow".into(),
        });
    };
    let e_at = ((u64::from(number) - 1) * esize) as usize;
    let units: Vec<u16> = entries[e_at + 56..e_at + 128]
        .chunks_exact(2)
        .map(|u| u16::from_le_bytes([u[0], u[1]]))
        .take_while(|&u| u != 0)
        .collect();
    let name = String::from_utf16_lossy(&units);

    let new_disk_last = new_sectors - 1;
    let new_bkp_entries = new_disk_last - entries_sectors;
    let new_last_usable = new_bkp_entries - 1;
    // A partition that ended on a 1 MiB boundary (what sgdisk and disko make) still does.
    let new_last_lba = if (old_last_lba + 1) % ALIGN_SECTORS == 0 {
        ((new_last_usable + 1) / ALIGN_SECTORS * ALIGN_SECTORS - 1).max(old_last_lba)
    } else {
        new_last_usable
    };
    entries[e_at + 40..e_at + 48].copy_from_slice(&new_last_lba.to_le_bytes());
    let ecrc = crc32fast::hash(&entries[..bytes as usize]);
    let mut hdr = h[..HEADER_SIZE].to_vec();
    hdr[32..40].copy_from_slice(&new_disk_last.to_le_bytes());
    hdr[48..56].copy_from_slice(&new_last_usable.to_le_bytes());
    hdr[88..92].copy_from_slice(&ecrc.to_le_bytes());
    let c = header_crc(&hdr);
    hdr[16..20].copy_from_slice(&c.to_le_bytes());
    let mut bkp = hdr.clone();
    bkp[24..32].copy_from_slice(&new_disk_last.to_le_bytes());
    bkp[32..40].copy_from_slice(&1u64.to_le_bytes());
    bkp[72..80].copy_from_slice(&new_bkp_entries.to_le_bytes());
    let c = header_crc(&bkp);
    bkp[16..20].copy_from_slice(&c.to_le_bytes());
    // The protective MBR keeps its boot code and disk signature; only its 0xEE entry's size
    // (and CHS end) follow the disk.
    let mut new_mbr = mbr.clone();
    let fresh = crate::mbr::protective(new_sectors);
    new_mbr[446 + 5..446 + 8].copy_from_slice(&fresh[446 + 5..446 + 8]);
    if mbr[446 + 5..446 + 8] == [0xFF, 0xFF, 0xFF] {
        new_mbr[446 + 5..446 + 8].copy_from_slice(&[0xFF, 0xFF, 0xFF]);
    }
    new_mbr[446 + 12..446 + 16].copy_from_slice(&fresh[446 + 12..446 + 16]);
    Ok(GptGrowPlan {
        number,
        name,
        first_lba,
        old_last_lba,
        new_last_lba,
        old_backup_entries_lba: bkp_entries_lba,
        entries_sectors,
        mbr: new_mbr,
        header: hdr,
        backup_header: bkp,
        entries,
        new_backup_entries_lba: new_bkp_entries,
        new_disk_last_lba: new_disk_last,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmdisk_block::MemDisk;

    /// A disko-style disk: ESP then root filling the rest, its GPT written to memory.
    fn disk(size: u64) -> MemDisk {
        let json = r#"{"disko":{"devices":{"disk":{"main":{"type":"disk","imageSize":"1G",
            "content":{"type":"gpt","partitions":{
              "ESP":{"size":"100M","type":"EF00"},
              "root":{"size":"100%"}}}}}}}}"#;
        let d = &crate::parse(json).expect("layout")[0];
        let p = crate::plan(
            d,
            Some(size),
            &crate::PlanOptions::default(),
            &crate::Sources::none(),
        )
        .expect("plan");
        let dev = MemDisk::new(size);
        for (off, bytes) in crate::gpt::serialize(&p) {
            dev.write_all_at(&bytes, off).expect("write");
        }
        dev
    }

    fn grown(old: &MemDisk, new_len: u64) -> (MemDisk, GptGrowPlan) {
        let plan = plan(old, new_len).expect("plan");
        let dev = MemDisk::new(new_len);
        let mut buf = vec![0u8; old.len() as usize];
        old.read_exact_at(&mut buf, 0).expect("read");
        dev.write_all_at(&buf, 0).expect("copy");
        for (off, bytes) in plan.writes() {
            dev.write_all_at(&bytes, off).expect("write");
        }
        (dev, plan)
    }

    #[test]
    fn last_partition_grows_and_both_copies_agree() {
        let old = disk(1 << 30);
        let before = crate::probe_partitions(&old).unwrap().unwrap();
        let (dev, plan) = grown(&old, 3 << 30);
        assert_eq!(plan.number, 2);
        assert_eq!(plan.old_last_lba, before.partitions[1].last_lba);
        let t = crate::probe_partitions(&dev).unwrap().unwrap();
        assert!(!t.from_backup);
        let sectors = (3u64 << 30) / SECTOR;
        assert_eq!(t.last_usable_lba, sectors - 34);
        assert_eq!(
            t.partitions[0], before.partitions[0],
            "the ESP is untouched"
        );
        let root = &t.partitions[1];
        assert_eq!(root.first_lba, before.partitions[1].first_lba);
        assert_eq!(root.last_lba, plan.new_last_lba);
        assert_eq!(
            (root.last_lba + 1) % ALIGN_SECTORS,
            0,
            "still 1 MiB aligned"
        );
        assert!(
            root.last_lba <= t.last_usable_lba && root.last_lba + ALIGN_SECTORS > t.last_usable_lba
        );
        // The backup alone gives the same table.
        dev.write_all_at(&[0xff], SECTOR + 20).unwrap();
        let b = crate::probe_partitions(&dev).unwrap().unwrap();
        assert!(b.from_backup);
        assert_eq!(b.partitions, t.partitions);
        // The protective MBR covers the new disk.
        let mut mbr = vec![0u8; 512];
        dev.read_exact_at(&mut mbr, 0).unwrap();
        assert_eq!(le32(&mbr, 446 + 12), (sectors - 1) as u32);
        // The old backup header is gone.
        let mut h = vec![0u8; 512];
        dev.read_exact_at(&mut h, old.len() - SECTOR).unwrap();
        assert!(h.iter().all(|&b| b == 0));
    }

    #[test]
    fn damaged_backup_or_hybrid_mbr_is_refused() {
        let old = disk(1 << 30);
        old.write_all_at(&[0xff], old.len() - SECTOR + 20).unwrap();
        assert!(matches!(
            plan(&old, 2 << 30),
            Err(GptGrowError::Damaged { .. })
        ));
        let old = disk(1 << 30);
        old.write_all_at(&[0x83], 446 + 16 + 4).unwrap();
        assert!(matches!(
            plan(&old, 2 << 30),
            Err(GptGrowError::Unsupported { .. })
        ));
    }

    #[test]
    fn no_gpt_is_not_a_gpt() {
        let d = MemDisk::new(1 << 20);
        assert!(!has_gpt(&d).unwrap());
        assert!(matches!(
            plan(&d, 2 << 20),
            Err(GptGrowError::Damaged { .. })
        ));
    }
}
