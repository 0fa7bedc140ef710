//! FAT names: volume labels, long names, 8.3 short names and their LFN slots.

use super::{ATTR_LFN, FAT_DATE, FAT_TIME};

/// Check a volume label the way mkfs.fat would accept it.
pub fn check_label(l: &str) -> std::result::Result<(), String> {
    if l.is_empty() || l.len() > 11 {
        return Err("a FAT label has 1 to 11 characters".into());
    }
    if !l
        .bytes()
        .all(|b| (0x20..0x7f).contains(&b) && !b"\"*+,./:;<=>?[\\]|".contains(&b))
    {
        return Err(format!("FAT label {l:?} has characters FAT does not allow"));
    }
    Ok(())
}

pub(crate) fn check_long_name(name: &str) -> std::result::Result<(), String> {
    if name.encode_utf16().count() > 255 {
        return Err("name longer than 255 UTF-16 units".into());
    }
    if name.ends_with('.') || name.ends_with(' ') {
        return Err("FAT names cannot end with '.' or ' '".into());
    }
    if name
        .chars()
        .any(|c| (c as u32) < 0x20 || "\"*/:<>?\\|".contains(c))
    {
        return Err("name has characters FAT does not allow".into());
    }
    Ok(())
}

/// Valid characters of a short (8.3) name besides A-Z and 0-9.
const SHORT_SPECIAL: &[u8] = b"!#$%&'()-@^_`{}~";

fn short_char_ok(b: u8) -> bool {
    b.is_ascii_uppercase() || b.is_ascii_digit() || SHORT_SPECIAL.contains(&b)
}

/// The 8.3 form of `name` when it is exactly representable after upper-casing.
pub(crate) fn exact_short(name: &str) -> Option<[u8; 11]> {
    let upper = name.to_ascii_uppercase();
    if !upper.is_ascii() || upper.starts_with('.') {
        return None;
    }
    let (base, ext) = match upper.rfind('.') {
        Some(i) => (&upper[..i], &upper[i + 1..]),
        None => (upper.as_str(), ""),
    };
    if base.is_empty() || base.len() > 8 || ext.len() > 3 {
        return None;
    }
    if !base.bytes().chain(ext.bytes()).all(short_char_ok) {
        return None;
    }
    let mut out = [b' '; 11];
    out[..base.len()].copy_from_slice(base.as_bytes());
    out[8..8 + ext.len()].copy_from_slice(ext.as_bytes());
    Some(out)
}

/// Generate the `BASE~N.EXT` short name for `name`, unique among `taken`.
pub(crate) fn generated_short(name: &str, taken: &[[u8; 11]]) -> Option<[u8; 11]> {
    let clean = |s: &str| -> Vec<u8> {
        s.chars()
            .filter(|&c| c != ' ' && c != '.')
            .map(|c| {
                let u = c.to_ascii_uppercase();
                if u.is_ascii() && short_char_ok(u as u8) {
                    u as u8
                } else {
                    b'_'
                }
            })
            .collect()
    };
    let trimmed = name.trim_start_matches('.');
    let (base, ext) = match trimmed.rfind('.') {
        Some(i) => (&trimmed[..i], &trimmed[i + 1..]),
        None => (trimmed, ""),
    };
    let mut base = clean(base);
    if base.is_empty() {
        base.push(b'_');
    }
    let ext: Vec<u8> = clean(ext).into_iter().take(3).collect();
    for n in 1..1_000_000u32 {
        let tail = format!("~{n}");
        let keep = (8 - tail.len()).min(base.len());
        let mut out = [b' '; 11];
        out[..keep].copy_from_slice(&base[..keep]);
        out[keep..keep + tail.len()].copy_from_slice(tail.as_bytes());
        out[8..8 + ext.len()].copy_from_slice(&ext);
        if !taken.contains(&out) {
            return Some(out);
        }
    }
    None
}

pub(crate) fn lfn_checksum(short: &[u8; 11]) -> u8 {
    short.iter().fold(0u8, |sum, &b| {
        (sum >> 1).wrapping_add(sum << 7).wrapping_add(b)
    })
}

pub(crate) fn short_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    e[14..16].copy_from_slice(&FAT_TIME.to_le_bytes());
    e[16..18].copy_from_slice(&FAT_DATE.to_le_bytes());
    e[18..20].copy_from_slice(&FAT_DATE.to_le_bytes());
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&FAT_TIME.to_le_bytes());
    e[24..26].copy_from_slice(&FAT_DATE.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// LFN slots for `name`, in on-disk order (last slot first).
pub(crate) fn lfn_entries(name: &str, short: &[u8; 11]) -> Vec<[u8; 32]> {
    let mut units: Vec<u16> = name.encode_utf16().collect();
    if units.len() % 13 != 0 {
        units.push(0);
        while units.len() % 13 != 0 {
            units.push(0xFFFF);
        }
    }
    let sum = lfn_checksum(short);
    let n = units.len() / 13;
    let mut out = Vec::with_capacity(n);
    for i in (0..n).rev() {
        let chunk = &units[i * 13..i * 13 + 13];
        let mut e = [0u8; 32];
        e[0] = (i as u8 + 1) | if i == n - 1 { 0x40 } else { 0 };
        e[11] = ATTR_LFN;
        e[13] = sum;
        let offs = [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30];
        for (u, &o) in chunk.iter().zip(offs.iter()) {
            e[o..o + 2].copy_from_slice(&u.to_le_bytes());
        }
        out.push(e);
    }
    out
}

/// Entry slots a child takes (LFN slots + 1), upper bound used before names are assigned.
pub(crate) fn slots_for(name: &str) -> usize {
    if exact_short(name).is_some_and(|s| short_to_string(&s) == name) {
        1
    } else {
        name.encode_utf16().count().div_ceil(13) + 1
    }
}

pub(crate) fn short_to_string(s: &[u8; 11]) -> String {
    let base = String::from_utf8_lossy(&s[..8]).trim_end().to_string();
    let ext = String::from_utf8_lossy(&s[8..]).trim_end().to_string();
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}
