//! disko sizes (`[0-9]+[KMGTP]?`, `100%`) and sgdisk positions (`0`, `+1G`, `-0`, `2048`).

use crate::error::{Error, JsonPath, Result};

/// Bytes per logical sector; vmdisk writes 512-byte-sector GPTs.
pub const SECTOR: u64 = 512;

/// Multiplier of a unit suffix (binary, as sgdisk and `truncate` use them).
fn unit(c: char) -> Option<u64> {
    match c.to_ascii_uppercase() {
        'K' => Some(1 << 10),
        'M' => Some(1 << 20),
        'G' => Some(1 << 30),
        'T' => Some(1 << 40),
        'P' => Some(1 << 50),
        _ => None,
    }
}

/// Split `123G` into (123, Some(1 GiB)); bare numbers give None. Rejects anything else.
fn number_and_unit(text: &str, path: &JsonPath, what: &str) -> Result<(u64, Option<u64>)> {
    let bad = || {
        Error::invalid(
            path,
            format!(
                "{text:?} is not a valid {what} (disko takes digits with an optional K, M, G, T \
                 or P, e.g. 512M)"
            ),
        )
    };
    let (digits, mult) = match text.chars().last() {
        Some(c) if unit(c).is_some() => (&text[..text.len() - 1], unit(c)),
        _ => (text, None),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| Error::invalid(path, format!("{text:?} overflows a 64-bit number")))?;
    Ok((n, mult))
}

/// The size of a partition as disko states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SizeSpec {
    /// A fixed size in bytes (`512M`; a bare number counts sectors, as in sgdisk).
    Bytes(u64),
    /// `100%`: the rest of the disk.
    Rest,
}

/// Parse a partition `size`.
pub fn parse_size(text: &str, path: &JsonPath) -> Result<SizeSpec> {
    if text == "100%" {
        return Ok(SizeSpec::Rest);
    }
    let (n, mult) = number_and_unit(text, path, "size")?;
    n.checked_mul(mult.unwrap_or(SECTOR))
        .map(SizeSpec::Bytes)
        .ok_or_else(|| Error::invalid(path, format!("{text:?} overflows 64 bits of bytes")))
}

/// Parse a disk `imageSize` (`truncate -s` style: a bare number counts bytes).
pub fn parse_image_size(text: &str, path: &JsonPath) -> Result<u64> {
    let (n, mult) = number_and_unit(text, path, "image size")?;
    n.checked_mul(mult.unwrap_or(1))
        .ok_or_else(|| Error::invalid(path, format!("{text:?} overflows 64 bits of bytes")))
}

/// A start or end position in sgdisk syntax, in sectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Position {
    /// `0` (or any zero, signed or not, with any unit): sgdisk's default (the start of the
    /// largest free block, or its end).
    Default,
    /// An absolute sector (`2048`, `2048s`, `1M`, `1MiB`); as an end, the last sector (inclusive).
    Absolute(u64),
    /// `+N`: N sectors after the start of the free block (start) or the partition start (end).
    Plus(u64),
    /// `-N`: N sectors before the (aligned) end of the free block.
    Minus(u64),
}

/// Parse an sgdisk position the way sgdisk 1.0.9 reads it: an optional `+` or `-`, digits, and
/// an optional unit: `s` (sectors; also the meaning of no unit) or `K`, `M`, `G`, `T`, `P`, `E`
/// (binary), optionally written `KiB` or `KB`. A zero value of any form is the default.
pub fn parse_position(text: &str, path: &JsonPath) -> Result<Position> {
    let bad = || {
        Error::invalid(
            path,
            format!(
                "{text:?} is not a valid sgdisk position (an optional + or -, digits, and an \
                 optional unit: s, K, M, G, T, P, E, KiB, MiB, ...)"
            ),
        )
    };
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => (0, text),
    };
    let digits_end = rest
        .bytes()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(rest.len());
    let (digits, suffix) = rest.split_at(digits_end);
    if digits.is_empty() {
        return Err(bad());
    }
    let bytes_per_unit: Option<u64> = match suffix.to_ascii_lowercase().as_str() {
        "" | "s" => None,
        u => {
            let mut chars = u.chars();
            let letter = chars.next();
            if !matches!(chars.as_str(), "" | "b" | "ib") {
                return Err(bad());
            }
            let shift = match letter {
                Some('k') => 10,
                Some('m') => 20,
                Some('g') => 30,
                Some('t') => 40,
                Some('p') => 50,
                Some('e') => 60,
                _ => return Err(bad()),
            };
            Some(1u64 << shift)
        }
    };
    let n: u64 = digits
        .parse()
        .map_err(|_| Error::invalid(path, format!("{text:?} overflows a 64-bit number")))?;
    let sectors = match bytes_per_unit {
        None => n,
        Some(u) => n.checked_mul(u / SECTOR).ok_or_else(|| {
            Error::invalid(path, format!("{text:?} overflows 64 bits of sectors"))
        })?,
    };
    Ok(match sign {
        _ if sectors == 0 => Position::Default,
        1 => Position::Plus(sectors),
        -1 => Position::Minus(sectors),
        _ => Position::Absolute(sectors),
    })
}

/// Whether an sgdisk position is written in sectors with an `s` (disko then defaults the
/// partition's alignment to 1).
pub fn in_sector_units(text: &str) -> bool {
    text.ends_with('s')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> JsonPath {
        JsonPath::root().key("size")
    }

    #[test]
    fn sizes() {
        assert_eq!(
            parse_size("512M", &p()).unwrap(),
            SizeSpec::Bytes(512 << 20)
        );
        assert_eq!(parse_size("100%", &p()).unwrap(), SizeSpec::Rest);
        assert_eq!(parse_size("8", &p()).unwrap(), SizeSpec::Bytes(4096));
        assert_eq!(parse_size("1g", &p()).unwrap(), SizeSpec::Bytes(1 << 30));
        for bad in ["", "M", "1.5G", "50%", "-1G", "1GB", " 1G", "1 G"] {
            assert!(parse_size(bad, &p()).is_err(), "{bad:?}");
        }
        let e = parse_size("99999999999999999999P", &p())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("size: ") && e.contains("overflows"), "{e}");
        assert!(parse_size("20000P", &p())
            .unwrap_err()
            .to_string()
            .contains("overflows"));
    }

    #[test]
    fn positions() {
        assert_eq!(parse_position("0", &p()).unwrap(), Position::Default);
        assert_eq!(parse_position("-0", &p()).unwrap(), Position::Default);
        assert_eq!(parse_position("+0", &p()).unwrap(), Position::Default);
        assert_eq!(
            parse_position("2048s", &p()).unwrap(),
            Position::Absolute(2048)
        );
        assert_eq!(
            parse_position("1MiB", &p()).unwrap(),
            Position::Absolute(2048)
        );
        assert_eq!(
            parse_position("4096MiB", &p()).unwrap(),
            Position::Absolute(4096 * 2048)
        );
        assert_eq!(
            parse_position("-18GiB", &p()).unwrap(),
            Position::Minus(18 << 21)
        );
        assert_eq!(
            parse_position("+1000K", &p()).unwrap(),
            Position::Plus(2000)
        );
        let e = parse_position("-18GB!", &p()).unwrap_err().to_string();
        assert!(e.contains("\"-18GB!\""), "{e}");
        assert!(parse_position("1.5G", &p()).is_err());
        assert!(parse_position("1Q", &p()).is_err());
        assert_eq!(
            parse_position("+1G", &p()).unwrap(),
            Position::Plus(2 << 20)
        );
        assert_eq!(
            parse_position("1M", &p()).unwrap(),
            Position::Absolute(2048)
        );
        assert_eq!(
            parse_position("4096", &p()).unwrap(),
            Position::Absolute(4096)
        );
        assert!(parse_position("+", &p()).is_err());
        assert!(parse_position("+-1", &p()).is_err());
    }

    #[test]
    fn image_sizes() {
        assert_eq!(parse_image_size("8G", &p()).unwrap(), 8 << 30);
        assert_eq!(parse_image_size("1000", &p()).unwrap(), 1000);
    }
}
