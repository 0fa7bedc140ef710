//! The two checksums ext4 metadata carries: crc32c (metadata_csum) and crc16 (gdt_csum).
//!
//! Both are the "raw" kernel forms: the caller passes the running value in and gets it back
//! without a final inversion, exactly as ext4 chains them (seed, then field after field).

/// Reflected Castagnoli polynomial.
const CRC32C_POLY: u32 = 0x82f6_3b78;
/// Reflected CRC-16/ANSI polynomial (the kernel's `crc16`).
const CRC16_POLY: u16 = 0xa001;

const fn crc32c_table() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC32C_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

const fn crc16_table() -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u16;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ CRC16_POLY
            } else {
                c >> 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32C: [[u32; 256]; 8] = crc32c_table();
static CRC16: [u16; 256] = crc16_table();

/// Continue a crc32c over `data` from `crc` (no pre- or post-inversion: ext4's `ext4_chksum`).
pub fn crc32c_raw(mut crc: u32, data: &[u8]) -> u32 {
    let mut chunks = data.chunks_exact(8);
    for c in &mut chunks {
        let lo = u32::from_le_bytes([c[0], c[1], c[2], c[3]]) ^ crc;
        let hi = u32::from_le_bytes([c[4], c[5], c[6], c[7]]);
        crc = CRC32C[7][(lo & 0xff) as usize]
            ^ CRC32C[6][((lo >> 8) & 0xff) as usize]
            ^ CRC32C[5][((lo >> 16) & 0xff) as usize]
            ^ CRC32C[4][(lo >> 24) as usize]
            ^ CRC32C[3][(hi & 0xff) as usize]
            ^ CRC32C[2][((hi >> 8) & 0xff) as usize]
            ^ CRC32C[1][((hi >> 16) & 0xff) as usize]
            ^ CRC32C[0][(hi >> 24) as usize];
    }
    for &b in chunks.remainder() {
        crc = (crc >> 8) ^ CRC32C[0][((crc ^ u32::from(b)) & 0xff) as usize];
    }
    crc
}

/// Non-reflected CRC-32 polynomial (the kernel's `crc32_be`, used by jbd2 v1 commit checksums).
const CRC32_BE_POLY: u32 = 0x04c1_1db7;

const fn crc32_be_table() -> [u32; 256] {
    let mut t = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = (i as u32) << 24;
        let mut k = 0;
        while k < 8 {
            c = if c & 0x8000_0000 != 0 {
                (c << 1) ^ CRC32_BE_POLY
            } else {
                c << 1
            };
            k += 1;
        }
        t[i] = c;
        i += 1;
    }
    t
}

static CRC32_BE: [u32; 256] = crc32_be_table();

/// Continue the kernel's `crc32_be` over `data` from `crc` (no inversions).
pub fn crc32_be(mut crc: u32, data: &[u8]) -> u32 {
    for &b in data {
        crc = (crc << 8) ^ CRC32_BE[((crc >> 24) ^ u32::from(b)) as usize];
    }
    crc
}

/// Continue the kernel's crc16 over `data` from `crc`.
pub fn crc16(mut crc: u16, data: &[u8]) -> u16 {
    for &b in data {
        crc = (crc >> 8) ^ CRC16[((crc ^ u16::from(b)) & 0xff) as usize];
    }
    crc
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_check_value() {
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xe306_9283);
        // Chaining equals one pass.
        let a = crc32c_raw(!0, b"1234");
        assert_eq!(!crc32c_raw(a, b"56789"), 0xe306_9283);
    }

    #[test]
    fn crc32_be_check_value() {
        // CRC-32/MPEG-2 (init !0, non-reflected 0x04c11db7, no final xor).
        assert_eq!(crc32_be(!0, b"123456789"), 0x0376_e6e7);
    }

    #[test]
    fn crc16_check_value() {
        // CRC-16/ARC check value (init 0, reflected 0x8005).
        assert_eq!(crc16(0, b"123456789"), 0xbb3d);
    }
}
