//! `dd`: copy a byte range of an image's guest view into a new image, with `qemu-img dd`'s
//! operands and meaning:
//!
//! ```text
//!   if=INPUT of=OUTPUT [bs=BYTES (512)] [count=BLOCKS] [skip=BLOCKS]
//!   end   = min(input size, count * bs)      count counts from the start of the input,
//!   start = skip * bs                        as in qemu-img dd (not after the skip)
//!   OUTPUT = a new image of (end - start) bytes holding INPUT[start, end)
//! ```
//!
//! The copy is `convert` over a window of the input: sparse, parallel, built under a
//! temporary name and renamed into place. Where qemu-img dd prints "cannot skip to
//! specified offset" but still creates an empty output and exits 0, vmdisk refuses and
//! creates nothing.

use std::path::Path;
use std::sync::Arc;

use vmdisk_block::{BlockDevice, Cancel, Slice};

use crate::convert::{convert_device, ConvertOptions, ConvertStats};
use crate::{Error, Format, OpenOptions, Result};

/// Largest `bs` (qemu-img's limit, a C int).
pub const MAX_DD_BLOCK_SIZE: u64 = i32::MAX as u64;

/// The operands and flags of `dd`.
#[derive(Debug, Clone)]
pub struct DdOptions {
    /// Block size in bytes (`bs=`, default 512).
    pub bs: u64,
    /// Blocks to copy, counted from the start of the input (`count=`).
    pub count: Option<u64>,
    /// Blocks to skip at the start of the input (`skip=`).
    pub skip: u64,
    /// Input format (`-f`), probed when `None`.
    pub format: Option<Format>,
    /// Output format (`-O`, default raw).
    pub output_format: Format,
    /// Read the input even if another process holds it (`-U`).
    pub force_share: bool,
    pub cancel: Cancel,
}

impl Default for DdOptions {
    fn default() -> Self {
        DdOptions {
            bs: 512,
            count: None,
            skip: 0,
            format: None,
            output_format: Format::Raw,
            force_share: false,
            cancel: Cancel::never(),
        }
    }
}

fn invalid(option: &str, reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        option: option.to_string(),
        reason: reason.into(),
    }
}

/// Parse `key=value` operands (`if`, `of`, `bs`, `count`, `skip`) into (input, output,
/// options); flags (`-f`, `-O`, `-U`) are set by the caller.
pub fn parse_operands(ops: &[String]) -> Result<(String, String, DdOptions)> {
    let (mut input, mut output) = (None, None);
    let mut o = DdOptions::default();
    let count = |key: &str, v: &str| -> Result<u64> {
        v.parse::<u64>()
            .map_err(|_| invalid(key, format!("'{v}' is not a number of blocks")))
    };
    for op in ops {
        let (k, v) = op.split_once('=').ok_or_else(|| {
            invalid(
                op,
                "dd operands are KEY=VALUE (if=, of=, bs=, count=, skip=)",
            )
        })?;
        match k {
            "if" => input = Some(v.to_string()),
            "of" => output = Some(v.to_string()),
            "bs" => {
                let bs = crate::parse_size(v)?;
                if !(1..=MAX_DD_BLOCK_SIZE).contains(&bs) {
                    return Err(invalid("bs", "must be between 1 and 2147483647"));
                }
                o.bs = bs;
            }
            "count" => o.count = Some(count(k, v)?),
            "skip" => o.skip = count(k, v)?,
            _ => {
                return Err(invalid(
                    k,
                    "not a dd operand (if=, of=, bs=, count=, skip=)",
                ))
            }
        }
    }
    match (input, output) {
        (Some(i), Some(out)) => Ok((i, out, o)),
        _ => Err(invalid(
            "if/of",
            "give both the input (if=) and the output (of=)",
        )),
    }
}

/// Copy as `qemu-img dd` does (see the module docs).
pub fn dd(
    input: &Path,
    output: &Path,
    opts: &DdOptions,
    progress: &dyn Fn(u64, u64),
) -> Result<ConvertStats> {
    let src = crate::open(
        input,
        &OpenOptions {
            format: opts.format,
            read_only: true,
            force_share: opts.force_share,
            ..Default::default()
        },
    )?;
    let too_big = || invalid("count", "count * bs is too large");
    let end = match opts.count {
        Some(c) => c.checked_mul(opts.bs).ok_or_else(too_big)?.min(src.len()),
        None => src.len(),
    };
    let start = opts.skip.checked_mul(opts.bs).ok_or_else(too_big)?;
    if start > end {
        return Err(invalid(
            "skip",
            format!(
                "cannot skip to byte {start} of {}: the copy ends at byte {end} (count counts \
                 from the start of the input, as in qemu-img dd)",
                input.display()
            ),
        ));
    }
    let window: Arc<dyn BlockDevice> = Arc::new(
        Slice::new(src.dev(), start, end - start).map_err(Error::image("reading", input))?,
    );
    let copts = ConvertOptions {
        cancel: opts.cancel.clone(),
        ..ConvertOptions::new(opts.output_format)
    };
    convert_device(&src, window, output, &copts, progress)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operands() {
        let ops: Vec<String> = ["if=a", "of=b", "bs=4k", "count=3", "skip=1"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let (i, o, d) = parse_operands(&ops).unwrap();
        assert_eq!((i.as_str(), o.as_str()), ("a", "b"));
        assert_eq!((d.bs, d.count, d.skip), (4096, Some(3), 1));
        assert!(parse_operands(&["if=a".to_string()]).is_err());
        assert!(parse_operands(&["if=a".into(), "of=b".into(), "bs=0".into()]).is_err());
        assert!(parse_operands(&["if=a".into(), "of=b".into(), "foo=1".into()]).is_err());
    }

    #[test]
    fn windows_follow_qemu() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&a, &data).unwrap();
        let b = dir.path().join("b");
        let o = DdOptions {
            bs: 4096,
            skip: 2,
            count: Some(5),
            ..Default::default()
        };
        dd(&a, &b, &o, &|_, _| {}).unwrap();
        assert_eq!(std::fs::read(&b).unwrap(), data[8192..20480]);
        let o = DdOptions { skip: 6, ..o };
        assert!(dd(&a, &dir.path().join("c"), &o, &|_, _| {}).is_err());
        assert!(!dir.path().join("c").exists());
    }
}
