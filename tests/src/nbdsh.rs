//! libnbd's `nbdsh` as an NBD client for the tests, and qemu-img's allocation map.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{qemu_img, run, s, Run};

/// Debian's nbdsh is a shell script running `python3 -m nbd`, and the module (package
/// python3-libnbd) is installed for the system's python only: put its directory first so a
/// python3 from pyenv or a venv earlier on PATH does not shadow it.
const SYSTEM_PYTHON_DIR: &str = "/usr/bin";

/// Path of nbdsh; panics with the package to install when it is missing.
pub fn require_nbdsh() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p)
            .map(|d| d.join("nbdsh"))
            .find(|p| p.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "required tool `nbdsh` is not installed; these interop tests never skip.\n\
             install it with:  sudo apt-get install -y python3-libnbd   (or: cargo xtask deps)"
        )
    })
}

/// Run the Python `script` in nbdsh connected to `uri` (`h` is the handle). A failed Python
/// `assert` makes nbdsh exit non-zero with the traceback on stderr.
pub fn nbdsh(uri: &str, script: &str) -> Run {
    let path = match std::env::var_os("PATH") {
        Some(p) => {
            let mut dirs = vec![PathBuf::from(SYSTEM_PYTHON_DIR)];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs).expect("PATH entries are joinable")
        }
        None => SYSTEM_PYTHON_DIR.into(),
    };
    run(Command::new(require_nbdsh())
        .env("PATH", path)
        .args(["-u", uri, "-c", script]))
}

/// One `qemu-img map --output=json` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub present: bool,
    pub zero: bool,
    pub data: bool,
    /// Host offset: the guest range has storage allocated in the image.
    pub offset: Option<u64>,
}

/// `qemu-img map --output=json IMG`, as entries.
#[track_caller]
pub fn qemu_map(img: &Path) -> Vec<MapEntry> {
    let r = qemu_img(&["map", "--output=json", s(img)]).ok();
    let v = r.json();
    v.as_array()
        .unwrap_or_else(|| panic!("qemu-img map gave no array:\n{r}"))
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().expect("start"),
            length: e["length"].as_u64().expect("length"),
            present: e["present"] == true,
            zero: e["zero"] == true,
            data: e["data"] == true,
            offset: e["offset"].as_u64(),
        })
        .collect()
}

/// The map entries overlapping `[off, off + len)`.
pub fn map_range(map: &[MapEntry], off: u64, len: u64) -> Vec<MapEntry> {
    map.iter()
        .filter(|e| e.start < off + len && off < e.start + e.length)
        .cloned()
        .collect()
}
