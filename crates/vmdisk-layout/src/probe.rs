//! Recognise the filesystems vmdisk writes (ext2/3/4, FAT, swap) from their first bytes.

use vmdisk_block::BlockDevice;

use crate::guid::Guid;

/// Filesystem kinds [`probe_filesystem`] recognises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FsKind {
    Ext4,
    Ext3,
    Ext2,
    Vfat,
    Swap,
}

/// What a partition holds.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct FsInfo {
    pub kind: FsKind,
    pub label: Option<String>,
    /// ext and swap: a UUID; FAT: the volume id as `XXXX-XXXX`.
    pub uuid: Option<String>,
}

/// Bytes read to probe: enough for the ext superblock and a 64 KiB-page swap header.
const PROBE_BYTES: u64 = 64 * 1024;

fn text(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]).trim_end().to_string();
    (!s.is_empty()).then_some(s)
}

/// Identify the filesystem on `dev` (a partition), if any. Read errors count as "nothing".
pub fn probe_filesystem(dev: &dyn BlockDevice) -> Option<FsInfo> {
    let n = dev.len().min(PROBE_BYTES) as usize;
    let mut b = vec![0u8; n];
    dev.read_exact_at(&mut b, 0).ok()?;
    if let Some(i) = probe_ext(&b) {
        return Some(i);
    }
    for page in [4096usize, 8192, 16384, 65536] {
        if b.len() >= page && &b[page - 10..page] == b"SWAPSPACE2" {
            let mut u = [0u8; 16];
            u.copy_from_slice(&b[1036..1052]);
            let g = Guid(u);
            return Some(FsInfo {
                kind: FsKind::Swap,
                label: text(&b[1052..1068]),
                uuid: (!g.is_nil()).then(|| g.to_string()),
            });
        }
    }
    probe_fat(&b)
}

fn probe_ext(b: &[u8]) -> Option<FsInfo> {
    let sb = b.get(1024..2048)?;
    if sb[56..58] != [0x53, 0xEF] {
        return None;
    }
    let le = |at: usize| u32::from_le_bytes([sb[at], sb[at + 1], sb[at + 2], sb[at + 3]]);
    let compat = le(0x5C);
    let incompat = le(0x60);
    let ro_compat = le(0x64);
    // extents, 64bit, flex_bg, inline_data...; or huge_file, gdt_csum, dir_nlink,
    // extra_isize, metadata_csum.
    let ext4 = incompat & !0x0006 != 0 || ro_compat & 0x0478 != 0;
    let kind = if ext4 {
        FsKind::Ext4
    } else if compat & 0x4 != 0 {
        FsKind::Ext3
    } else {
        FsKind::Ext2
    };
    let mut u = [0u8; 16];
    u.copy_from_slice(&sb[0x68..0x78]);
    Some(FsInfo {
        kind,
        label: text(&sb[0x78..0x88]),
        uuid: Some(Guid(u).to_string()),
    })
}

fn probe_fat(b: &[u8]) -> Option<FsInfo> {
    let s = b.get(..512)?;
    if s[510..512] != [0x55, 0xAA] {
        return None;
    }
    let bps = u16::from_le_bytes([s[11], s[12]]);
    if !matches!(bps, 512 | 1024 | 2048 | 4096) || s[13] == 0 || !s[13].is_power_of_two() {
        return None;
    }
    let (id_at, label_at) = if &s[82..87] == b"FAT32" {
        (67, 71)
    } else if &s[54..59] == b"FAT12" || &s[54..59] == b"FAT16" {
        (39, 43)
    } else {
        return None;
    };
    if s[id_at - 1] != 0x29 {
        return Some(FsInfo {
            kind: FsKind::Vfat,
            label: None,
            uuid: None,
        });
    }
    let id = u32::from_le_bytes([s[id_at], s[id_at + 1], s[id_at + 2], s[id_at + 3]]);
    let label = text(&s[label_at..label_at + 11]).filter(|l| l != "NO NAME");
    Some(FsInfo {
        kind: FsKind::Vfat,
        label,
        uuid: Some(format!("{:04X}-{:04X}", id >> 16, id & 0xFFFF)),
    })
}
