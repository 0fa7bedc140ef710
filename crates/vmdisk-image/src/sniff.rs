//! What a file looks like, for messages: a user who passed the wrong `-f` (or handed vmdisk a
//! VMDK) is told what the bytes are, not that they are "corrupt".

/// Bytes [`looks_like`] wants from the start of the file (the ext superblock magic is at
/// 1080, the ISO 9660 descriptor at 32769).
pub const SNIFF_LEN: usize = 34 * 1024;

/// A short description of what `head` (the first bytes of a file of `len` bytes) holds.
pub fn looks_like(head: &[u8], len: u64) -> &'static str {
    let at = |off: usize, magic: &[u8]| head.get(off..off + magic.len()) == Some(magic);
    if len == 0 {
        return "an empty file";
    }
    if at(0, b"QFI\xfb") {
        return "a qcow2 image";
    }
    if at(0, b"KDMV") || at(0, b"# Disk DescriptorFile") {
        return "a VMDK image (vmdisk handles raw and qcow2: convert it with qemu-img first)";
    }
    if at(0x40, &[0x7f, 0x10, 0xda, 0xbe]) {
        return "a VDI image (vmdisk handles raw and qcow2: convert it with qemu-img first)";
    }
    if at(0, b"vhdxfile") {
        return "a VHDX image (vmdisk handles raw and qcow2: convert it with qemu-img first)";
    }
    if at(0, b"conectix") {
        return "a VHD (vpc) image (vmdisk handles raw and qcow2: convert it with qemu-img first)";
    }
    if at(0, b"LUKS\xba\xbe") {
        return "a LUKS-encrypted volume";
    }
    if at(512, b"EFI PART") {
        return "a raw disk with a GPT partition table";
    }
    if at(1080, &[0x53, 0xef]) {
        return "a raw ext2/3/4 filesystem";
    }
    if at(32769, b"CD001") {
        return "an ISO 9660 image";
    }
    if at(510, &[0x55, 0xaa]) {
        if at(82, b"FAT32") || at(54, b"FAT1") {
            return "a raw FAT filesystem";
        }
        return "a raw disk with an MBR partition table";
    }
    if head.iter().all(|&b| b == 0) {
        return "raw data (it starts with zeros)";
    }
    "raw data"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_what_users_hand_over() {
        let mut b = vec![0u8; SNIFF_LEN];
        assert_eq!(looks_like(&b, 0), "an empty file");
        assert!(looks_like(&b, 1).starts_with("raw data"));
        b[1080] = 0x53;
        b[1081] = 0xef;
        assert_eq!(looks_like(&b, 1 << 20), "a raw ext2/3/4 filesystem");
        b[512..520].copy_from_slice(b"EFI PART");
        assert_eq!(
            looks_like(&b, 1 << 20),
            "a raw disk with a GPT partition table"
        );
        b[..4].copy_from_slice(b"QFI\xfb");
        assert_eq!(looks_like(&b, 1 << 20), "a qcow2 image");
        assert!(looks_like(b"KDMV", 4).contains("VMDK"));
        assert!(looks_like(b"short", 5).starts_with("raw data"));
    }
}
