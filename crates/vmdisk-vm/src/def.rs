//! Test VM definitions: `testvms/NAME.toml` -> [`VmDef`].
//!
//! A definition is data: what to boot and what to assert. Everything derived (assets, keys, the
//! disk) is built at run time: assets by `vmdisk-assets`, the disk by the `rootfs` module.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};

use crate::Arch;

/// Largest definition file we read; a VM definition is a few hundred bytes.
const MAX_DEF_BYTES: u64 = 64 * 1024;

/// How stage 1 mounts the `nix-store` share.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// virtio-9p, as qemu-vm.nix does (`-virtfs ... mount_tag=nix-store`).
    #[default]
    #[serde(rename = "9p")]
    NineP,
    /// virtio-fs (vfkit, and newer nixpkgs on Linux).
    Virtiofs,
}

impl StoreKind {
    /// The value of `vmdisk.store=` on the kernel command line.
    pub fn param(self) -> &'static str {
        match self {
            StoreKind::NineP => "9p",
            StoreKind::Virtiofs => "virtiofs",
        }
    }
}

/// Which checks a run makes.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Asserts {
    /// Stage-1 markers in order, then `/` is ext4 from the root label and `/nix/.ro-store` is
    /// the `nix-store` share (confirmed over SSH when `ssh` is on).
    pub stage1: bool,
    /// SSH answers with a fresh 0600 key against the pinned host key.
    pub ssh: bool,
    /// `uname -m` over SSH is the definition's arch.
    pub uname: bool,
    /// The host sends a C source, the guest compiles it natively (tcc) and runs it, the host
    /// checks the ELF's machine (and runs it through binfmt_misc when registered).
    pub cross_build: bool,
}

impl Default for Asserts {
    fn default() -> Self {
        Asserts {
            stage1: true,
            ssh: true,
            uname: true,
            cross_build: false,
        }
    }
}

/// One test VM.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDef {
    pub name: String,
    #[serde(default)]
    pub description: Option<String>,
    pub arch: Arch,
    #[serde(default = "default_memory")]
    pub memory_mib: u32,
    #[serde(default = "default_cpus")]
    pub cpus: u32,
    /// disko JSON for the disk, relative to the definition's folder (absolute after `load`).
    pub layout: PathBuf,
    #[serde(default = "default_format")]
    pub disk_format: String,
    /// Virtual size; default: the layout's `imageSize`.
    #[serde(default)]
    pub disk_size: Option<String>,
    #[serde(default)]
    pub store: StoreKind,
    /// The root device stage 1 looks for.
    #[serde(default = "default_root")]
    pub root: String,
    /// Extra trees for other partitions (`PART = "dir"`), relative to the definition's folder.
    #[serde(default)]
    pub copy_in: BTreeMap<String, PathBuf>,
    #[serde(default)]
    pub assert: Asserts,
    /// Part of the quick suite (`cargo xtask test`).
    #[serde(default)]
    pub quick: bool,
}

fn default_memory() -> u32 {
    384
}
fn default_cpus() -> u32 {
    1
}
fn default_format() -> String {
    "qcow2".into()
}
fn default_root() -> String {
    "LABEL=nixos".into()
}

/// The rescue VM's root disk layout (root only; the disk being rescued arrives over NBD).
pub const RESCUE_LAYOUT: &str = include_str!("../../../testvms/layouts/rescue.json");

impl VmDef {
    /// The rescue VM (`vmdisk rescue`): the test guest with a small root disk from
    /// [`RESCUE_LAYOUT`] written to `layout`.
    pub fn rescue(arch: Arch, layout: &Path) -> Result<VmDef> {
        std::fs::write(layout, RESCUE_LAYOUT)
            .with_context(|| format!("writing {}", layout.display()))?;
        Ok(VmDef {
            name: "rescue".into(),
            description: Some("vmdisk rescue VM".into()),
            arch,
            memory_mib: 384,
            cpus: 1,
            layout: layout.to_path_buf(),
            disk_format: "raw".into(),
            disk_size: None,
            store: StoreKind::NineP,
            root: default_root(),
            copy_in: BTreeMap::new(),
            assert: Asserts::default(),
            quick: false,
        })
    }

    /// Parse one definition; relative paths become relative to `base`.
    pub fn parse(text: &str, base: &Path) -> Result<VmDef> {
        let mut def: VmDef = toml::from_str(text)?;
        def.validate()?;
        def.layout = base.join(&def.layout);
        for dir in def.copy_in.values_mut() {
            *dir = base.join(&*dir);
        }
        Ok(def)
    }

    /// Read `path` (a `.toml` under testvms/).
    pub fn load(path: &Path) -> Result<VmDef> {
        let len = std::fs::metadata(path)
            .with_context(|| format!("reading test VM definition {}", path.display()))?
            .len();
        if len > MAX_DEF_BYTES {
            bail!("{}: {len} bytes is not a VM definition", path.display());
        }
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading test VM definition {}", path.display()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        VmDef::parse(&text, base).with_context(|| format!("in {}", path.display()))
    }

    fn validate(&self) -> Result<()> {
        if self.name.is_empty()
            || !self
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "name {:?}: use letters, digits, '-' and '_' (it names artifact folders)",
                self.name
            );
        }
        if !(64..=65536).contains(&self.memory_mib) {
            bail!("memory_mib = {}: expected 64..65536", self.memory_mib);
        }
        if !(1..=64).contains(&self.cpus) {
            bail!("cpus = {}: expected 1..64", self.cpus);
        }
        if !matches!(self.disk_format.as_str(), "qcow2" | "raw") {
            bail!(
                "disk_format = {:?}: expected qcow2 or raw",
                self.disk_format
            );
        }
        if self.root.contains(char::is_whitespace) || self.root.is_empty() {
            bail!(
                "root = {:?}: expected LABEL=... or a device path",
                self.root
            );
        }
        Ok(())
    }
}

/// Every `*.toml` in `dir`, sorted by name.
pub fn load_dir(dir: &Path) -> Result<Vec<VmDef>> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing test VMs in {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    paths.sort();
    let defs = paths
        .iter()
        .map(|p| VmDef::load(p))
        .collect::<Result<Vec<_>>>()?;
    let mut names: Vec<&str> = defs.iter().map(|d| d.name.as_str()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        bail!("two test VMs in {} are named {:?}", dir.display(), w[0]);
    }
    Ok(defs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_minimal_definition_with_defaults() {
        let d = VmDef::parse(
            "name = \"x\"\narch = \"x86_64\"\nlayout = \"l.json\"\n",
            Path::new("/t"),
        )
        .unwrap();
        assert_eq!(d.layout, Path::new("/t/l.json"));
        assert_eq!(d.store, StoreKind::NineP);
        assert_eq!(d.root, "LABEL=nixos");
        assert_eq!(d.disk_format, "qcow2");
        assert!(d.assert.ssh && d.assert.stage1);
    }

    #[test]
    fn refuses_unknown_keys_and_bad_values() {
        let base = Path::new("/");
        for bad in [
            "name = \"x\"\narch = \"x86_64\"\nlayout = \"l\"\nmemroy = 3\n",
            "name = \"x y\"\narch = \"x86_64\"\nlayout = \"l\"\n",
            "name = \"x\"\narch = \"mips\"\nlayout = \"l\"\n",
            "name = \"x\"\narch = \"x86_64\"\nlayout = \"l\"\nstore = \"nfs\"\n",
            "name = \"x\"\narch = \"x86_64\"\nlayout = \"l\"\nmemory_mib = 1\n",
            "name = \"x\"\narch = \"x86_64\"\nlayout = \"l\"\ndisk_format = \"vmdk\"\n",
        ] {
            assert!(VmDef::parse(bad, base).is_err(), "accepted {bad:?}");
        }
    }

    #[test]
    fn the_committed_definitions_load() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testvms");
        let defs = load_dir(&dir).unwrap();
        assert!(defs.iter().any(|d| d.name == "x86_64" && d.quick));
        for d in &defs {
            assert!(
                d.layout.is_file(),
                "{}: missing {}",
                d.name,
                d.layout.display()
            );
        }
    }
}
