//! GUIDs: parsing, the GPT mixed-endian encoding, and derivation from a seed.

use std::fmt;
use std::str::FromStr;

use sha2::{Digest, Sha256};

/// A GUID/UUID kept in its canonical (string, big-endian) byte order.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    pub const NIL: Guid = Guid([0; 16]);

    /// Derive a version-4-shaped GUID from `seed` and a `purpose` tag: the same inputs always
    /// give the same GUID, different purposes give unrelated ones.
    pub fn derive(seed: &[u8], purpose: &str) -> Guid {
        let mut h = Sha256::new();
        h.update(b"vmdisk-layout guid v1\0");
        h.update((seed.len() as u64).to_le_bytes());
        h.update(seed);
        h.update(purpose.as_bytes());
        let digest = h.finalize();
        let mut b = [0u8; 16];
        b.copy_from_slice(&digest[..16]);
        b[6] = (b[6] & 0x0f) | 0x40; // version 4
        b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
        Guid(b)
    }

    /// The on-disk GPT encoding: the first three fields little-endian.
    pub fn to_gpt_bytes(self) -> [u8; 16] {
        let b = self.0;
        let mut o = b;
        o[0] = b[3];
        o[1] = b[2];
        o[2] = b[1];
        o[3] = b[0];
        o[4] = b[5];
        o[5] = b[4];
        o[6] = b[7];
        o[7] = b[6];
        o
    }

    /// Inverse of [`Guid::to_gpt_bytes`].
    pub fn from_gpt_bytes(b: [u8; 16]) -> Guid {
        // The byte swap is its own inverse.
        Guid(Guid(b).to_gpt_bytes())
    }

    pub fn is_nil(&self) -> bool {
        self.0 == [0; 16]
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = &self.0;
        write!(
            f,
            "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13],
            b[14], b[15]
        )
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Guid({self})")
    }
}

/// The text is not `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadGuid;

impl FromStr for Guid {
    type Err = BadGuid;

    fn from_str(s: &str) -> Result<Self, BadGuid> {
        let groups: Vec<&str> = s.split('-').collect();
        let lens = [8, 4, 4, 4, 12];
        if groups.len() != 5 || groups.iter().zip(lens).any(|(g, l)| g.len() != l) {
            return Err(BadGuid);
        }
        let hex: String = groups.concat();
        let mut out = [0u8; 16];
        for (i, o) in out.iter_mut().enumerate() {
            let pair = hex.get(2 * i..2 * i + 2).ok_or(BadGuid)?;
            *o = u8::from_str_radix(pair, 16).map_err(|_| BadGuid)?;
        }
        Ok(Guid(out))
    }
}

impl serde::Serialize for Guid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// sgdisk's type codes: every code sgdisk 1.0.9 accepts, with its GUID and name.
pub use crate::typecodes::SGDISK_TYPE_CODES as TYPE_CODES;

/// The GUID of a 4-hex-digit type code (case-insensitive), if sgdisk knows it.
pub fn type_code_guid(code: &str) -> Option<Guid> {
    let n = u16::from_str_radix(code, 16).ok()?;
    TYPE_CODES
        .iter()
        .find(|(c, _, _, _)| *c == n)
        .and_then(|(_, g, _, _)| g.parse().ok())
}

/// The code sgdisk shows for a type GUID (the first listed one) and its name.
pub fn type_code_of(guid: Guid) -> Option<(u16, &'static str)> {
    TYPE_CODES
        .iter()
        .find(|(_, g, _, listed)| *listed && g.parse() == Ok(guid))
        .map(|(c, _, n, _)| (*c, *n))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_format_roundtrip_and_gpt_bytes() {
        let g: Guid = "c12a7328-f81f-11d2-ba4b-00a0c93ec93b".parse().unwrap();
        assert_eq!(g.to_string(), "c12a7328-f81f-11d2-ba4b-00a0c93ec93b");
        let b = g.to_gpt_bytes();
        assert_eq!(&b[..4], &[0x28, 0x73, 0x2a, 0xc1]);
        assert_eq!(Guid::from_gpt_bytes(b), g);
        assert!("c12a7328-f81f-11d2-ba4b-00a0c93ec93"
            .parse::<Guid>()
            .is_err());
        assert!("g12a7328-f81f-11d2-ba4b-00a0c93ec93b"
            .parse::<Guid>()
            .is_err());
        assert!("c12a7328f81f-11d2-ba4b-00a0c93ec93b0"
            .parse::<Guid>()
            .is_err());
    }

    #[test]
    fn every_type_code_parses() {
        for (c, _, _, _) in TYPE_CODES {
            assert!(type_code_guid(&format!("{c:04X}")).is_some(), "{c:04X}");
        }
        assert_eq!(TYPE_CODES.len(), 255);
        assert_eq!(
            type_code_of(type_code_guid("0b00").unwrap()).unwrap().0,
            0x0700
        );
        assert_eq!(type_code_guid("ef00"), type_code_guid("EF00"));
    }

    #[test]
    fn derive_is_stable_and_versioned() {
        let a = Guid::derive(b"seed", "disk");
        assert_eq!(a, Guid::derive(b"seed", "disk"));
        assert_ne!(a, Guid::derive(b"seed", "disk2"));
        assert_eq!(a.0[6] >> 4, 4);
        assert_eq!(a.0[8] >> 6, 2);
    }
}
