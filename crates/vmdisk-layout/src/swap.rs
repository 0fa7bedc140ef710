//! Linux swap area header (version 1), what `mkswap` writes.
//!
//! ```text
//! 0      1024 bytes   boot bits (zero)
//! 1024   u32 version = 1, u32 last_page, u32 nr_badpages = 0
//! 1036   16 bytes UUID, 16 bytes label (NUL padded)
//! ...    zero
//! 4086   "SWAPSPACE2"  (end of the first page)
//! ```

use crate::guid::Guid;

/// Page size the header is written for (x86_64, aarch64 with 4 KiB pages).
pub const PAGE: u64 = 4096;
const MAGIC: &[u8; 10] = b"SWAPSPACE2";

/// The first page of a swap area of `len` bytes.
pub fn header(len: u64, uuid: Guid, label: Option<&str>) -> Vec<u8> {
    let mut p = vec![0u8; PAGE as usize];
    let pages = (len / PAGE).min(u64::from(u32::MAX) + 1);
    let last_page = (pages.saturating_sub(1)) as u32;
    p[1024..1028].copy_from_slice(&1u32.to_le_bytes());
    p[1028..1032].copy_from_slice(&last_page.to_le_bytes());
    p[1036..1052].copy_from_slice(&uuid.0);
    if let Some(l) = label {
        let b = l.as_bytes();
        let n = b.len().min(16);
        p[1052..1052 + n].copy_from_slice(&b[..n]);
    }
    p[PAGE as usize - 10..].copy_from_slice(MAGIC);
    p
}

#[cfg(test)]
/// Parse a swap header page: (uuid, label) when the magic is there.
pub fn parse(page: &[u8]) -> Option<(Guid, Option<String>)> {
    if page.len() < PAGE as usize || &page[PAGE as usize - 10..PAGE as usize] != MAGIC {
        return None;
    }
    let mut u = [0u8; 16];
    u.copy_from_slice(&page[1036..1052]);
    let raw = &page[1052..1068];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let label = String::from_utf8_lossy(&raw[..end]).into_owned();
    Some((Guid(u), (!label.is_empty()).then_some(label)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip() {
        let g = Guid::derive(b"s", "swap");
        let h = header(1 << 30, g, Some("swap"));
        assert_eq!(&h[4086..], b"SWAPSPACE2");
        assert_eq!(
            u32::from_le_bytes(h[1028..1032].try_into().unwrap()),
            262143
        );
        assert_eq!(parse(&h), Some((g, Some("swap".into()))));
    }
}
