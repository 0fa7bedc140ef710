//! The three checksums ext4 and jbd2 metadata carry, in the "raw" kernel forms: the caller
//! passes the running value in and gets it back without a final inversion, exactly as ext4
//! chains them (seed, then field after field). The arithmetic is the `crc` crate's; this module
//! only states the kernel's conventions as `crc` algorithms.

use crc::{Algorithm, Crc, Table};

/// crc32c (Castagnoli) without pre- or post-inversion: the kernel's `crc32c()` / `ext4_chksum`.
const CRC32C_RAW: Algorithm<u32> = Algorithm {
    width: 32,
    poly: 0x1edc_6f41,
    init: 0,
    refin: true,
    refout: true,
    xorout: 0,
    check: 0x58e3_fa20, // over "123456789" from 0, no inversions
    residue: 0,
};

/// The kernel's `crc32_be` (non-reflected 0x04c11db7, no inversions): jbd2 v1 commit sums.
const CRC32_BE_RAW: Algorithm<u32> = Algorithm {
    width: 32,
    poly: 0x04c1_1db7,
    init: 0,
    refin: false,
    refout: false,
    xorout: 0,
    check: 0x89a1_897f,
    residue: 0,
};

/// The kernel's `crc16` (CRC-16/ARC's reflected 0x8005, no inversions): gdt_csum.
const CRC16_RAW: Algorithm<u16> = Algorithm {
    width: 16,
    poly: 0x8005,
    init: 0,
    refin: true,
    refout: true,
    xorout: 0,
    check: 0xbb3d,
    residue: 0,
};

/// Sliced tables: crc32c runs over every metadata block read.
static CRC32C: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC32C_RAW);
static CRC32_BE: Crc<u32> = Crc::<u32>::new(&CRC32_BE_RAW);
static CRC16: Crc<u16> = Crc::<u16>::new(&CRC16_RAW);

/// Continue a crc32c over `data` from `crc` (no pre- or post-inversion: ext4's `ext4_chksum`).
pub fn crc32c_raw(crc: u32, data: &[u8]) -> u32 {
    // `crc` takes a reflected algorithm's initial value unreflected; the kernel's running
    // value is the register itself.
    let mut d = CRC32C.digest_with_initial(crc.reverse_bits());
    d.update(data);
    d.finalize()
}

/// Continue the kernel's `crc32_be` over `data` from `crc` (no inversions).
pub fn crc32_be(crc: u32, data: &[u8]) -> u32 {
    let mut d = CRC32_BE.digest_with_initial(crc);
    d.update(data);
    d.finalize()
}

/// Continue the kernel's crc16 over `data` from `crc`.
pub fn crc16(crc: u16, data: &[u8]) -> u16 {
    let mut d = CRC16.digest_with_initial(crc.reverse_bits());
    d.update(data);
    d.finalize()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithms_state_their_check_values() {
        assert_eq!(CRC32C.checksum(b"123456789"), CRC32C_RAW.check);
        assert_eq!(CRC32_BE.checksum(b"123456789"), CRC32_BE_RAW.check);
        assert_eq!(CRC16.checksum(b"123456789"), CRC16_RAW.check);
    }

    #[test]
    fn crc32c_check_value() {
        assert_eq!(!crc32c_raw(!0, b"123456789"), 0xe306_9283);
        // Chaining equals one pass.
        let a = crc32c_raw(!0, b"1234");
        assert_eq!(!crc32c_raw(a, b"56789"), 0xe306_9283);
        // Every slice length and alignment agrees with a bytewise chain.
        let data: Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for n in 0..data.len() {
            let bytewise = data[..n].iter().fold(!0, |c, b| crc32c_raw(c, &[*b]));
            assert_eq!(crc32c_raw(!0, &data[..n]), bytewise, "length {n}");
        }
    }

    #[test]
    fn crc32_be_check_value() {
        // CRC-32/MPEG-2 (init !0, non-reflected 0x04c11db7, no final xor).
        assert_eq!(crc32_be(!0, b"123456789"), 0x0376_e6e7);
        let a = crc32_be(!0, b"12345");
        assert_eq!(crc32_be(a, b"6789"), 0x0376_e6e7);
    }

    #[test]
    fn crc16_check_value() {
        // CRC-16/ARC check value (init 0, reflected 0x8005).
        assert_eq!(crc16(0, b"123456789"), 0xbb3d);
        // CRC-16/MODBUS is the same register from !0.
        assert_eq!(crc16(!0, b"123456789"), 0x4b37);
        let a = crc16(!0, b"1234");
        assert_eq!(crc16(a, b"56789"), 0x4b37);
    }
}
