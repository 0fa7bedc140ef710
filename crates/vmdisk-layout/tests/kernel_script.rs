//! The builder VM's script against disko's own `_create` scripts: for every disko example
//! whose disks need a kernel (LUKS, LVM, mdadm, btrfs subvolumes and swap files), in every
//! JSON shape of the corpus (`../shared/corpus/disko`), the operations vmdisk would run —
//! its builder script plus what the host writes itself — must be the operations disko's
//! generated `_create` runs (from the `evaluated-internals` shape): the same LUKS devices
//! opened and keys added, PVs, VGs and LVs by name, arrays by name and level, mkfs calls by
//! tool, btrfs subvolumes by path and swap files. Device paths differ (disko's
//! /dev/disk/by-partlabel vs the VM's /dev/nbdN), so operations are compared by what they
//! make, as multisets. The script itself is not run here; the builder VM runs it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde_json::Value;
use vmdisk_layout::kernel::{self, ScriptInput, SecretRef};
use vmdisk_layout::{parse_layout, Content, FsFormat};

/// disko's examples that need the builder VM and no ZFS or bcachefs.
const VM_EXAMPLES: &[&str] = &[
    "boot-raid1",
    "btrfs-subvolumes",
    "luks-btrfs-raid",
    "luks-btrfs-subvolumes",
    "luks-interactive-login",
    "luks-lvm",
    "luks-on-mdadm",
    "lvm-raid",
    "lvm-sizes-sort",
    "lvm-thin",
    "mdadm",
    "mdadm-raid0",
    "mdadm-raid5-args",
    "real-nixos-anywhere-examples",
];

fn corpus() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus/disko/json")
}

fn read(name: &str) -> String {
    let p = corpus().join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e} (the disko corpus)", p.display()))
}

/// The operations in a shell script, normalised to what they make.
fn ops(script: &str) -> Vec<String> {
    let joined = script.replace("\\\n", " ");
    let mut out = Vec::new();
    // disko names each subvolume in a variable first.
    let mut subvol = String::new();
    for line in joined.lines() {
        if let Some(v) = line.trim().strip_prefix("SUBVOL_ABS_PATH=") {
            subvol = v.trim_matches('"').to_string();
        }
        let w: Vec<String> = line
            .split_whitespace()
            .map(|t| t.trim_matches(|c| c == '"' || c == '\'').to_string())
            .collect();
        let w: Vec<&str> = w.iter().map(String::as_str).collect();
        let after = |k: &str| {
            w.iter()
                .position(|x| *x == k)
                .and_then(|i| w.get(i + 1).copied())
        };
        if let Some(i) = w.windows(2).position(|x| x == ["mdadm", "--create"]) {
            let level = w
                .iter()
                .find_map(|x| x.strip_prefix("--level="))
                .unwrap_or("?");
            out.push(format!("md {} level {level}", w.get(i + 2).unwrap_or(&"?")));
            continue;
        }
        match w.as_slice() {
            ["cryptsetup", "open", _, name, ..] => out.push(format!("luks {name}")),
            ["cryptsetup", "luksAddKey", ..] => out.push("luksAddKey".into()),
            ["pvcreate", ..] => out.push("pvcreate".into()),
            ["vgcreate", name, ..] => out.push(format!("vgcreate {name}")),
            ["lvcreate", ..] => out.push(format!("lvcreate {}", after("-n").unwrap_or("?"))),
            ["btrfs", "subvolume", "create", path, ..] => {
                let path = if *path == "$SUBVOL_ABS_PATH" {
                    subvol.as_str()
                } else {
                    path
                };
                let p = path.rsplit("//").next().unwrap_or(path);
                let p = p
                    .split('/')
                    .filter(|c| !c.starts_with("vmdisk-") && *c != "mnt")
                    .collect::<Vec<_>>()
                    .join("/");
                out.push(format!("subvolume {}", p.trim_start_matches('/')));
            }
            ["btrfs", "filesystem", "mkswapfile", "--size", size, path, ..] => {
                let base = path.rsplit('/').next().unwrap_or(path);
                out.push(format!("swapfile {size} {base}"));
            }
            [tool, ..] if tool.starts_with("mkfs.") => out.push(tool.to_string()),
            ["mkswap", ..] => out.push("mkswap".into()),
            _ => {}
        }
    }
    out
}

/// disko's `_create` scripts of everything disk `key` is built with.
fn disko_ops(config: &str, group: &[String]) -> Vec<String> {
    let v: Value =
        serde_json::from_str(&read(&format!("{config}.evaluated-internals.json"))).unwrap();
    let mut text = String::new();
    for d in group {
        text += v["disk"][d]["_create"].as_str().unwrap_or_default();
    }
    for kind in ["lvm_vg", "mdadm"] {
        for dev in v[kind].as_object().into_iter().flatten().map(|(_, d)| d) {
            text += dev["_create"].as_str().unwrap_or_default();
        }
    }
    let mut o = ops(&text);
    // disko's btrfs creates each subvolume in a subshell with its own mount; its mkfs lines
    // appear once per device.
    o.sort();
    o
}

#[test]
fn builder_scripts_make_what_disko_makes() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for config in VM_EXAMPLES {
        for shape in ["raw", "raw-wrapped", "evaluated", "evaluated-internals"] {
            let layout = parse_layout(&read(&format!("{config}.{shape}.json")))
                .unwrap_or_else(|e| panic!("{config}.{shape}: {e}"));
            let names: Vec<String> = layout.names().iter().map(|s| s.to_string()).collect();
            let specs = layout.valid().into_iter().cloned().collect::<Vec<_>>();
            assert_eq!(
                specs.len(),
                names.len(),
                "{config}.{shape}: a disk failed to parse"
            );
            let refs: Vec<&vmdisk_layout::DiskSpec> = specs.iter().collect();
            for at in 0..refs.len() {
                if !kernel::needs_builder(refs[at]) {
                    continue;
                }
                let group = kernel::build_group(&refs, &layout.devices, at)
                    .unwrap_or_else(|e| panic!("{config}.{shape}: {e}"));
                let disks: Vec<&vmdisk_layout::DiskSpec> = group.iter().map(|i| refs[*i]).collect();
                let secrets: Vec<(SecretRef, Vec<u8>)> =
                    kernel::secrets_needed(&disks, &layout.devices)
                        .into_iter()
                        .map(|(r, _)| (r, b"not-a-real-key\n".to_vec()))
                        .collect();
                let script = kernel::builder_script(&ScriptInput {
                    disks: &disks,
                    devices: &layout.devices,
                    secrets: &secrets,
                    copy_in: &[],
                })
                .unwrap_or_else(|e| panic!("{config}.{shape}: {e}"));
                let mut ours = ops(&script.text);
                // What the host makes itself, directly in partitions.
                for d in &disks {
                    for p in &d.partitions {
                        match &p.content {
                            Content::Filesystem(fs) if fs.format == FsFormat::Vfat => {
                                ours.push("mkfs.vfat".into())
                            }
                            Content::Filesystem(fs) => {
                                ours.push(format!("mkfs.{}", fs.format.name()))
                            }
                            Content::Swap(sw) if !sw.random_encryption => {
                                ours.push("mkswap".into())
                            }
                            _ => {}
                        }
                    }
                }
                ours.sort();
                let keys: Vec<String> = disks.iter().map(|d| d.key.clone()).collect();
                let want = disko_ops(config, &keys);
                if ours != want {
                    let count = |v: &[String]| {
                        let mut m: BTreeMap<String, i32> = BTreeMap::new();
                        for x in v {
                            *m.entry(x.clone()).or_default() += 1;
                        }
                        m
                    };
                    failures.push(format!(
                        "{config}.{shape} disk {}: ours {:?}\n    disko {:?}\n--- script:\n{}",
                        refs[at].key,
                        count(&ours),
                        count(&want),
                        script.text
                    ));
                }
                checked += 1;
                // Keys are embedded for the VM's tmpfs, never passed as arguments in clear.
                assert!(
                    !script.text.contains("not-a-real-key"),
                    "{config}: a key in clear"
                );
            }
        }
    }
    assert!(
        checked >= 4 * VM_EXAMPLES.len(),
        "only {checked} disks checked"
    );
    assert!(
        failures.is_empty(),
        "{} differences:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
