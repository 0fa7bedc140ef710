//! `amend`: change a qcow2 image's format options in place (`qemu-img amend -o ...`), as a
//! transaction. vmdisk amends the compatibility level (`compat=0.10|1.1`, up and down) and
//! `lazy_refcounts=on|off`; the other options qemu-img amends are refused with the command
//! that does the same job.

use std::path::Path;

use crate::q::{AmendOptions, AmendReport};
use crate::{Error, Format, OpenOptions, Result};

fn invalid(option: &str, reason: impl Into<String>) -> Error {
    Error::InvalidOption {
        option: option.to_string(),
        reason: reason.into(),
    }
}

/// Parse `-o key=value,...` for amend (several `-o` add up; `,,` is a literal comma).
pub fn parse_amend_options(opts: &[String]) -> Result<AmendOptions> {
    let mut out = AmendOptions::default();
    for s in opts {
        for item in crate::create::split_opts(s) {
            let (key, val) = item
                .split_once('=')
                .ok_or_else(|| invalid(&item, "expected key=value"))?;
            match key {
                "compat" => {
                    out.version = Some(match val {
                        "0.10" | "v2" => 2,
                        "1.1" | "v3" => 3,
                        _ => return Err(invalid(key, "must be 0.10 (v2) or 1.1 (v3)")),
                    })
                }
                "lazy_refcounts" => {
                    out.lazy_refcounts = Some(match val {
                        "on" | "true" | "yes" => true,
                        "off" | "false" | "no" => false,
                        _ => return Err(invalid(key, format!("'{val}' is not on or off"))),
                    })
                }
                "size" => {
                    return Err(invalid(
                        key,
                        "vmdisk changes the size with `vmdisk resize IMAGE SIZE`",
                    ))
                }
                "backing_file" | "backing_fmt" => {
                    return Err(invalid(
                        key,
                        "vmdisk changes the backing file with `vmdisk rebase -u -b BACKING \
                         [-F FMT] IMAGE`",
                    ))
                }
                "refcount_bits" | "data_file" | "data_file_raw" => {
                    return Err(invalid(
                        key,
                        "vmdisk does not amend this yet; `vmdisk convert -O qcow2 -o \
                         refcount_bits=N` writes a new image with it",
                    ))
                }
                k if k.starts_with("encrypt") => {
                    return Err(invalid(key, "vmdisk refuses encrypted images"))
                }
                _ => return Err(invalid(key, "not an amend option for qcow2 (see -o help)")),
            }
        }
    }
    if out == AmendOptions::default() {
        return Err(invalid(
            "-o",
            "give at least one option to change (compat=0.10|1.1, lazy_refcounts=on|off)",
        ));
    }
    Ok(out)
}

/// The `-o help` text of `amend` (qemu-img's layout; the options vmdisk amends).
pub fn amend_options_help() -> String {
    "Amend options for 'qcow2' (vmdisk):\n\
     \x20 compat=<str>           - Compatibility level (v2 [0.10] or v3 [1.1])\n\
     \x20 lazy_refcounts=<bool (on/off)> - Postpone refcount updates\n"
        .to_string()
}

/// Amend the qcow2 image at `path` (see the module docs). A refusal changes nothing; a
/// failure half-way puts the file back byte for byte.
pub fn amend(path: &Path, format: Option<Format>, opts: &AmendOptions) -> Result<AmendReport> {
    let img = crate::open(
        path,
        &OpenOptions {
            format,
            ..OpenOptions::transaction()
        },
    )?;
    let q = img.require_qcow2("amend")?;
    let report = q.amend(opts).map_err(Error::image("amending", path))?;
    img.close()?;
    Ok(report)
}
