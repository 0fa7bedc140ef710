//! Writing a planned FAT filesystem (`FatLayout`) to a device, reading file
//! data from the host tree it was planned from. Only IO lives here.

use std::fs;
use std::io::Read;
use std::path::Path;

use vmdisk_block::BlockDevice;

use crate::error::{Error, Result};
use crate::fat::{FatLayout, Placed};
use crate::tree::Kind;
use crate::zero::zero_range;

/// Chunk size for writing FATs and copying file data.
const CHUNK: usize = 1 << 20;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::ReadingSource {
        path: path.to_owned(),
        source,
    }
}

/// Write the filesystem to `dev` (the partition).
pub(crate) fn write(fat: &FatLayout, dev: &dyn BlockDevice) -> Result<()> {
    dev.write_all_at(&fat.reserved_sectors(), 0)?;
    // FATs, generated chunk by chunk (a FAT12 is at most 6 KiB: one chunk).
    let (_, fat_len) = fat.fat_at(0);
    let mut buf = vec![0u8; CHUNK.max(fat_len.min(CHUNK as u64 * 2) as usize)];
    let mut off = 0u64;
    while off < fat_len {
        let n = (fat_len - off).min(CHUNK as u64) as usize;
        let any = fat.fat_bytes(off, &mut buf[..n]);
        for copy in 0..fat.fat_copies() {
            let at = fat.fat_at(copy).0 + off;
            if any {
                dev.write_all_at(&buf[..n], at)?;
            } else {
                zero_range(dev, at, n as u64)?;
            }
        }
        off += n as u64;
    }
    write_dir(fat, dev, &fat.root, true, 0)
}

fn write_dir(
    fat: &FatLayout,
    dev: &dyn BlockDevice,
    d: &Placed,
    is_root: bool,
    parent: u32,
) -> Result<()> {
    let (at, bytes) = fat.dir_bytes(d, is_root, parent)?;
    dev.write_all_at(&bytes, at)?;
    let me = if is_root { 0 } else { d.first };
    for c in &d.children {
        let Some(node) = c.node else { continue };
        match &node.kind {
            Kind::Dir(_) => write_dir(fat, dev, c, false, me)?,
            _ => write_file(fat, dev, c, &node.src, node.meta.len)?,
        }
    }
    Ok(())
}

fn write_file(
    fat: &FatLayout,
    dev: &dyn BlockDevice,
    c: &Placed,
    src: &Path,
    size: u64,
) -> Result<()> {
    if c.clusters == 0 {
        return Ok(());
    }
    let mut f = fs::File::open(src).map_err(io_err(src))?;
    let (mut off, alloc) = fat.file_at(c);
    let mut left = alloc;
    let mut data_left = size;
    let mut buf = vec![0u8; CHUNK];
    while left > 0 {
        let n = left.min(CHUNK as u64) as usize;
        let d = data_left.min(n as u64) as usize;
        f.read_exact(&mut buf[..d]).map_err(io_err(src))?;
        buf[d..n].fill(0);
        dev.write_all_at(&buf[..n], off)?;
        off += n as u64;
        left -= n as u64;
        data_left -= d as u64;
    }
    // The file must not have grown since it was scanned.
    let mut probe = [0u8; 1];
    if f.read(&mut probe).map_err(io_err(src))? != 0 {
        return Err(Error::ReadingSource {
            path: src.to_owned(),
            source: std::io::Error::other("file changed while being copied"),
        });
    }
    Ok(())
}
