//! disko's legacy `type = "table"` (`format = "gpt"`): partitions made one by one with
//! `parted -s DEV -- mkpart NAME START END` and `set N boot on`, as disko's table.nix does.
//! Positions follow parted 3.5: SI units (`M`, `MB`, `GB`, bare numbers in MB) and `%` are
//! approximate (plus or minus half a unit) and parted picks the 1 MiB-aligned sector nearest
//! to the one asked for inside that range; `s`, `B` and IEC units (`MiB`) are exact, and an
//! exact end names the first sector after the partition. Pure: parsing and placement.

use crate::error::{Error, JsonPath, Result};

/// parted's optimal alignment on a plain file: 1 MiB.
const GRAIN: u64 = 2048;
const SECTOR: u64 = 512;

/// A parted position: the sector asked for, and how far parted may move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PartedPos {
    /// The value in bytes (or hundredths of a percent of the disk for `%`, see `percent`).
    value_milli: u128,
    /// Bytes per unit times 1000 (parted takes decimals); 0 marks a percentage.
    unit: u128,
    /// Exact units (s, B, KiB, MiB, ...): no fuzz, and an end is the sector before.
    exact: bool,
}

impl PartedPos {
    /// The sector it names on a disk of `sectors`, and the radius parted allows.
    fn resolve(&self, sectors: u64) -> (u64, u64) {
        let len = u128::from(sectors) * u128::from(SECTOR);
        let (bytes, unit_bytes) = if self.unit == 0 {
            // value_milli is percent * 1000.
            (len * self.value_milli / 100_000, len / 100)
        } else {
            (self.value_milli * self.unit / 1_000_000, self.unit / 1000)
        };
        let sector = (bytes / u128::from(SECTOR)).min(u128::from(u64::MAX)) as u64;
        let radius = if self.exact {
            0
        } else {
            ((unit_bytes / u128::from(SECTOR)) / 2).saturating_sub(1) as u64
        };
        (sector, radius)
    }
}

/// Parse a parted position (`1M`, `500MB`, `1MiB`, `2048s`, `100%`, `1.5GB`).
pub fn parse_parted(text: &str, path: &JsonPath) -> Result<PartedPos> {
    let bad = || {
        Error::invalid(
            path,
            format!(
                "{text:?} is not a parted position vmdisk reads (a number with s, B, kB, MB, \
                 GB, TB, KiB, MiB, GiB, TiB or %; no negative positions)"
            ),
        )
    };
    let t = text.trim();
    let num_end = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(num_end);
    if num.is_empty() || num.matches('.').count() > 1 || num.len() > 20 {
        return Err(bad());
    }
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    let frac3: String = frac.chars().chain("000".chars()).take(3).collect();
    let milli: u128 = format!("{int}{frac3}").parse().map_err(|_| bad())?;
    let (unit, exact): (u128, bool) = match unit.to_ascii_lowercase().as_str() {
        "s" => (512, true),
        "b" => (1, true),
        "kib" => (1 << 10, true),
        "mib" => (1 << 20, true),
        "gib" => (1 << 30, true),
        "tib" => (1 << 40, true),
        "k" | "kb" => (1_000, false),
        "" | "m" | "mb" => (1_000_000, false),
        "g" | "gb" => (1_000_000_000, false),
        "t" | "tb" => (1_000_000_000_000, false),
        "%" => (0, false),
        _ => return Err(bad()),
    };
    if unit == 0 && milli > 100_000 {
        return Err(Error::invalid(path, format!("{text:?} is more than 100%")));
    }
    Ok(PartedPos {
        value_milli: milli,
        unit: unit * 1000,
        exact,
    })
}

/// disko's `hexEscapeUdevSymlink`, which it applies to the name it hands parted: every byte
/// outside `[0-9A-Za-z#+,-./:=@_]` becomes `\xHH`.
pub fn hex_escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for b in name.bytes() {
        if b.is_ascii_alphanumeric() || b"#+,-./:=@_".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("\\x{b:X}"));
        }
    }
    out
}

/// The sector nearest to `want` inside `[lo, hi]` with `(s + shift) % GRAIN == 0`.
fn nearest_aligned(want: u64, lo: u64, hi: u64, shift: u64) -> Option<u64> {
    if lo > hi {
        return None;
    }
    let down = (want + shift) / GRAIN * GRAIN;
    let cands = [down.checked_sub(shift), (down + GRAIN).checked_sub(shift)];
    cands
        .into_iter()
        .flatten()
        .filter(|s| (lo..=hi).contains(s))
        .min_by_key(|s| s.abs_diff(want))
        .or_else(|| {
            // The aligned sector just inside either bound.
            let a = (lo + shift).div_ceil(GRAIN) * GRAIN;
            a.checked_sub(shift).filter(|s| (lo..=hi).contains(s))
        })
}

/// parted's placement of one partition in `[first_free, last_free]`: start and end sectors.
pub fn place(
    start: &PartedPos,
    end: &PartedPos,
    sectors: u64,
    first_free: u64,
    last_free: u64,
) -> Option<(u64, u64)> {
    let (s, sr) = start.resolve(sectors);
    let (e, er) = end.resolve(sectors);
    let e = if end.exact { e.checked_sub(1)? } else { e };
    let s_lo = s.saturating_sub(sr).max(first_free);
    let s_hi = s.saturating_add(sr).min(last_free);
    let e_lo = e.saturating_sub(er).max(first_free);
    let e_hi = e.saturating_add(er).min(last_free);
    let start = nearest_aligned(s.clamp(s_lo.min(s_hi), s_hi.max(s_lo)), s_lo, s_hi, 0)
        .or_else(|| (s_lo <= s_hi).then(|| s.clamp(s_lo, s_hi)))?;
    let e_lo = e_lo.max(start);
    let end = nearest_aligned(e.clamp(e_lo.min(e_hi), e_hi.max(e_lo)), e_lo, e_hi, 1)
        .or_else(|| (e_lo <= e_hi).then(|| e.clamp(e_lo, e_hi)))?;
    Some((start, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(t: &str) -> PartedPos {
        parse_parted(t, &JsonPath::root()).unwrap()
    }

    #[test]
    fn places_as_parted_did_in_the_corpus() {
        let n = 8 << 20; // 4 GiB
        let last = n - 34;
        assert_eq!(
            place(&p("1M"), &p("500M"), n, 34, last),
            Some((2048, 976_895))
        );
        assert_eq!(
            place(&p("500M"), &p("100%"), n, 976_896, last),
            Some((976_896, 8_386_559))
        );
        assert_eq!(
            place(&p("1MiB"), &p("100MiB"), n, 34, last),
            Some((2048, 204_799))
        );
        assert_eq!(
            place(&p("200MiB"), &p("100%"), n, 409_600, last),
            Some((409_600, 8_386_559))
        );
        assert!(parse_parted("-1GiB", &JsonPath::root()).is_err());
        assert!(parse_parted("1Q", &JsonPath::root()).is_err());
        assert_eq!(hex_escape("name with spaces"), "name\\x20with\\x20spaces");
        assert_eq!(hex_escape("a^b"), "a\\x5Eb");
    }
}
