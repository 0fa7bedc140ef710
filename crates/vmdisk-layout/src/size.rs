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
            format!("{text:?} is not a valid {what} (digits with an optional K, M, G, T or P)"),
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
    /// `0`: the default (start or end of the largest free block).
    Default,
    /// An absolute sector (`2048`, `1M`).
    Absolute(u64),
    /// `+N`: relative to the start of the free block (start) or to the partition start (end).
    Plus(u64),
    /// `-N`: back from the end of the free block.
    Minus(u64),
}

/// Parse an sgdisk position (`0`, `2048`, `1M`, `+512M`, `-0`).
pub fn parse_position(text: &str, path: &JsonPath) -> Result<Position> {
    let (sign, rest) = match text.as_bytes().first() {
        Some(b'+') => (1, &text[1..]),
        Some(b'-') => (-1, &text[1..]),
        _ => (0, text),
    };
    let (n, mult) = number_and_unit(rest, path, "sgdisk position")?;
    let sectors = match mult {
        None => n,
        Some(m) => {
            n.checked_mul(m).ok_or_else(|| {
                Error::invalid(path, format!("{text:?} overflows 64 bits of bytes"))
            })? / SECTOR
        }
    };
    Ok(match sign {
        1 => Position::Plus(sectors),
        -1 => Position::Minus(sectors),
        _ if sectors == 0 => Position::Default,
        _ => Position::Absolute(sectors),
    })
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
        assert_eq!(parse_position("-0", &p()).unwrap(), Position::Minus(0));
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
