//! Unit tests over in-memory disks: planning, GPT round trips, refusals before any write.

use std::path::PathBuf;

use proptest::prelude::*;
use vmdisk_block::{BlockDevice, MemDisk};

use crate::*;

/// A fixture from the team's shared data (`../shared/fixtures/disko` beside the repo root),
/// else our copy of it.
fn shared(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures/disko");
    std::fs::read_to_string(dir.join(name))
        .or_else(|_| {
            std::fs::read_to_string(
                PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures")
                    .join(name),
            )
        })
        .unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

fn ours(name: &str) -> String {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

fn ranges(plan: &Plan) -> Vec<(u32, &str, u64, u64)> {
    plan.partitions
        .iter()
        .map(|p| (p.number, p.label.as_str(), p.first_lba, p.last_lba))
        .collect()
}

#[test]
fn raw_and_evaluated_shapes_plan_identically() {
    let raw = parse(&shared("raw-esp-swap-root.json")).unwrap();
    let ev = parse(&shared("evaluated-esp-swap-root.json")).unwrap();
    assert_eq!(raw[0].path.as_str(), "disko.devices.disk.main");
    assert_eq!(ev[0].path.as_str(), "disk.main");
    let opts = PlanOptions {
        seed: Some("s".into()),
        ..Default::default()
    };
    let a = plan(&raw[0], None, &opts, &Sources::none()).unwrap();
    let b = plan(&ev[0], None, &opts, &Sources::none()).unwrap();
    let want = vec![
        (1, "disk-main-ESP", 2048, 1050623),
        (2, "disk-main-swap", 1050624, 3147775),
        (3, "disk-main-root", 3147776, 16775167),
    ];
    assert_eq!(ranges(&a), want);
    assert_eq!(ranges(&b), want);
    assert_eq!(a.disk_size, 8 << 30);
    assert_eq!(a.last_usable_lba, (8u64 << 30) / 512 - 34);
    // Same seed, same names: same GUIDs regardless of the JSON shape.
    assert_eq!(a.disk_guid, b.disk_guid);
    assert_eq!(a.partitions[0].guid, b.partitions[0].guid);
    // disko's default type for swap content is 8200.
    assert_eq!(a.partitions[1].type_code, "8200");
    assert_eq!(
        serde_json::to_string(&a.partitions)
            .unwrap()
            .replace("disko.devices.", ""),
        serde_json::to_string(&b.partitions).unwrap()
    );
}

#[test]
fn default_seed_comes_from_the_layout() {
    let d = &parse(&shared("raw-esp-swap-root.json")).unwrap()[0];
    let a = plan(d, None, &PlanOptions::default(), &Sources::none()).unwrap();
    let b = plan(d, None, &PlanOptions::default(), &Sources::none()).unwrap();
    let c = plan(
        d,
        None,
        &PlanOptions {
            seed: Some("other".into()),
            ..Default::default()
        },
        &Sources::none(),
    )
    .unwrap();
    assert_eq!(a.disk_guid, b.disk_guid);
    assert_ne!(a.disk_guid, c.disk_guid);
    let guids: Vec<Guid> = a.partitions.iter().map(|p| p.guid).collect();
    assert!(guids.iter().all(|g| *g != a.disk_guid));
    assert_ne!(guids[0], guids[1]);
}

#[test]
fn luks_content_goes_to_the_builder_vm() {
    // A bare luks content object is not a layout.
    let e = parse(&shared("evaluated-luks-root-content.json")).unwrap_err();
    assert_eq!(
        e.to_string(),
        "type: a \"luks\" content object, not a disk layout (pass the whole disko.devices, \
         or one disk)"
    );
    {
        let d = parse(&ours("luks-partition.json")).unwrap();
        let root = d[0]
            .partitions
            .iter()
            .find(|p| p.key == "root")
            .expect("a root partition");
        let Content::Kernel(k) = &root.content else {
            panic!("{:?}", root.content)
        };
        assert!(matches!(**k, crate::model::Stack::Luks(_)), "{k:?}");
        assert!(crate::kernel::needs_builder(&d[0]));
    }
}

#[test]
fn ordering_priority_then_byte_order() {
    let d = &parse(&ours("bios-root.json")).unwrap()[0];
    let keys: Vec<(&str, u32)> = d
        .partitions
        .iter()
        .map(|p| (p.key.as_str(), p.number))
        .collect();
    assert_eq!(keys, vec![("zz-grub", 1), ("root", 2)]);
    let json = r#"{"type":"disk","imageSize":"64M","content":{"type":"gpt","partitions":{
        "b":{"size":"1M"},"B":{"size":"1M"},"a":{"size":"1M"},"Z":{"size":"1M","priority":1}}}}"#;
    let d = &parse(json).unwrap()[0];
    let keys: Vec<&str> = d.partitions.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, vec!["Z", "B", "a", "b"]);
}

#[test]
fn explicit_guids_types_and_attributes() {
    let d = &parse(&ours("guid-types.json")).unwrap()[0];
    let p = plan(d, None, &PlanOptions::default(), &Sources::none()).unwrap();
    assert_eq!(
        p.partitions[0].guid.to_string(),
        "11111111-2222-4333-8444-555555555555"
    );
    assert_eq!(p.partitions[0].label, "EFI-SYSTEM");
    assert_eq!(p.partitions[1].attributes, 1 | 1 << 63);
    assert_eq!(
        p.partitions[2].type_guid.to_string(),
        "e6d6d379-f507-44c2-a23c-238f2a3df928"
    );
    assert!(matches!(
        p.partitions[0].content,
        PlannedContent::Fat {
            volume_id: 0xDEADBEEF,
            ..
        }
    ));
}

#[test]
fn start_end_forms() {
    let d = &parse(&ours("start-end.json")).unwrap()[0];
    let p = plan(d, None, &PlanOptions::default(), &Sources::none()).unwrap();
    let sectors = 300u64 << 11;
    let r = ranges(&p);
    // sgdisk reads an absolute end ("65M") as the last sector, inclusive; the next start is
    // aligned up past it.
    assert_eq!(r[0].2..=r[0].3, 2048..=65 * 2048);
    assert_eq!(r[1].2, 66 * 2048);
    // "-64M" counts back from the last sector before an alignment boundary (sgdisk
    // --align-end), and stays unaligned itself.
    let last_usable = sectors - 34;
    let aligned_high = (last_usable + 1) / 2048 * 2048 - 1;
    assert_eq!(r[1].3, aligned_high - 64 * 2048);
    assert_eq!(r[2].2, r[1].3 + 1);
    assert_eq!(r[2].3, (last_usable + 1) / 2048 * 2048 - 1);
}

fn err_of(json: &str, size: Option<u64>) -> String {
    match parse(json) {
        Err(e) => e.to_string(),
        Ok(d) => plan(&d[0], size, &PlanOptions::default(), &Sources::none())
            .map(|_| "planned fine".to_string())
            .unwrap_or_else(|e| e.to_string()),
    }
}

fn disk(parts: &str) -> String {
    format!(
        r#"{{"disko":{{"devices":{{"disk":{{"main":{{"type":"disk","imageSize":"1G",
        "content":{{"type":"gpt","partitions":{{{parts}}}}}}}}}}}}}}}"#
    )
}

#[test]
fn bad_inputs_name_path_and_rule() {
    let p = "disko.devices.disk.main.content.partitions";
    let cases: Vec<(String, String)> = vec![
        ("{\"disko\": ".into(), "malformed layout JSON".into()),
        (
            disk(r#""x":{"size":"1M","content":{"type":"frobfs"}}"#),
            format!("{p}.x.content.type: unknown content type \"frobfs\""),
        ),
        (
            disk(r#""x":{"size":"1M","content":{"type":"filesystem","format":"reiser4"}}"#),
            format!("{p}.x.content.format: filesystem format \"reiser4\" is not supported yet"),
        ),
        (
            disk(r#""x":{"size":"99999999999999999999P"}"#),
            format!("{p}.x.size: \"99999999999999999999P\" overflows a 64-bit number"),
        ),
        (
            disk(r#""x":{"size":"20000P"}"#),
            format!("{p}.x.size: \"20000P\" overflows 64 bits of bytes"),
        ),
        (
            disk(r#""x":{"size":"2G"}"#),
            format!("{p}.x.size: partition needs sectors"),
        ),
        (
            disk(r#""x":{"size":"1M","name":"n"},"y":{"size":"1M","name":"n"}"#),
            format!("{p}.y.name: duplicate partition name \"n\""),
        ),
        (
            disk(r#""x":{"size":"1M"},"x":{"size":"2M"}"#),
            format!("{p}.x: duplicate key"),
        ),
        (
            disk(r#""root":{"size":"100%","priority":1},"z":{"size":"1M"}"#),
            format!("{p}.root.size: \"100%\" partition must be the last"),
        ),
        (
            disk(r#""x":{"size":"1M","type":"ABCD"}"#),
            format!("{p}.x.type: sgdisk has no type code \"ABCD\""),
        ),
        (
            disk(r#""x":{"size":"1M","label":"0123456789012345678901234567890123456"}"#),
            format!("{p}.x.label: GPT partition name"),
        ),
        (
            disk(r#""x":{"size":"8K","content":{"type":"filesystem","format":"vfat"}}"#),
            format!("{p}.x.size: 8192 bytes is too small for FAT12"),
        ),
        (
            disk(r#""x":{"size":"1M","content":{"type":"zfs","pool":"z"}}"#),
            format!("{p}.x.content.type: ZFS (the builder VM's Debian kernel has no zfs module"),
        ),
        (
            disk(
                r#""x":{"size":"1M","content":{"type":"swap","extraArgs":["--pagesize","8192"]}}"#,
            ),
            format!("{p}.x.content.extraArgs[0]: mkswap option"),
        ),
        (
            r#"{"disko":{"devices":{"disk":{},"nodev":{"/tmp":{"fsType":"tmpfs"}}}}}"#.into(),
            // nodev (tmpfs) puts nothing on a disk: a layout with only that has no disk.
            "disko.devices.disk: the layout defines no disk".into(),
        ),
        (
            disk(r#""x":{"end":"18446744073709551615"}"#),
            format!("{p}.x.end: partition needs sectors 2048..=18446744073709551615"),
        ),
        ("[1,2]".into(), "(top level): expected an object".into()),
        (
            r#"{"foo":1}"#.into(),
            "(top level): not a disko layout".into(),
        ),
    ];
    for (json, want) in cases {
        let got = err_of(&json, None);
        assert!(
            got.starts_with(&want),
            "\n got: {got}\nwant: {want}\njson: {json}"
        );
    }
}

#[test]
fn bad_inputs_leave_the_target_untouched() {
    let target = MemDisk::new(4 << 20);
    let layouts = [
        disk(r#""x":{"size":"100%","priority":1},"y":{"size":"1M"}"#),
        disk(r#""x":{"size":"1M","content":{"type":"luks"}}"#),
        "not json".to_string(),
        disk(r#""x":{"size":"5M"}"#),
    ];
    for json in layouts {
        let r = parse(&json)
            .and_then(|d| {
                plan(
                    &d[0],
                    Some(4 << 20),
                    &PlanOptions::default(),
                    &Sources::none(),
                )
            })
            .and_then(|p| {
                apply(
                    &p,
                    &Sources::none(),
                    &target,
                    std::path::Path::new("/nonexistent"),
                )
            });
        assert!(r.is_err(), "{json}");
        assert!(target.to_vec().iter().all(|&b| b == 0), "{json}");
    }
    // Content that does not fit is found before writing too.
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("big"), vec![1u8; 40 << 20]).unwrap();
    let json = disk(r#""ESP":{"size":"34M","content":{"type":"filesystem","format":"vfat"}}"#);
    let d = parse(&json).unwrap();
    let opts = PlanOptions {
        copy_in: vec![("ESP".into(), dir.path().to_owned())],
        ..Default::default()
    };
    let sources = scan_copy_in(&d[0], &opts).unwrap();
    let p = plan(&d[0], Some(40 << 20), &opts, &sources).unwrap();
    let target = MemDisk::new(40 << 20);
    let e = apply(&p, &sources, &target, dir.path()).unwrap_err();
    assert!(
        e.to_string().starts_with(
            "disko.devices.disk.main.content.partitions.ESP: the content copied in does not fit"
        ),
        "{e}"
    );
    assert!(target.to_vec().iter().all(|&b| b == 0));
}

#[test]
fn disk_selection() {
    let layout = || parse_layout(&ours("three-disks.json")).unwrap();
    assert_eq!(layout().names().len(), 3);
    assert!(matches!(
        select_disk(layout(), None),
        Err(Error::AmbiguousDisk { .. })
    ));
    assert_eq!(select_disk(layout(), Some("b")).unwrap().name, "b");
    let e = select_disk(layout(), Some("q")).unwrap_err().to_string();
    assert_eq!(e, "the layout has no disk named \"q\" (it has: a, b, c)");
}

#[test]
fn copy_in_selectors() {
    let d = &parse(&shared("raw-esp-swap-root.json")).unwrap()[0];
    let dir = tempfile::tempdir().unwrap();
    for sel in ["root", "disk-main-root", "3", "/"] {
        let opts = PlanOptions {
            copy_in: vec![(sel.into(), dir.path().to_owned())],
            ..Default::default()
        };
        let p = plan(d, None, &opts, &scan_copy_in(d, &opts).unwrap()).unwrap();
        assert!(
            matches!(
                &p.partitions[2].content,
                PlannedContent::Ext {
                    copy_in: Some(_),
                    ..
                }
            ),
            "{sel}"
        );
    }
    let opts = PlanOptions {
        copy_in: vec![("swap".into(), dir.path().to_owned())],
        ..Default::default()
    };
    let e = scan_copy_in(d, &opts).unwrap_err().to_string();
    assert!(e.contains("holds no filesystem"), "{e}");
}

#[test]
fn gpt_roundtrip_and_backup_fallback() {
    let d = &parse(&ours("guid-types.json")).unwrap()[0];
    let mut p = plan(d, Some(64 << 20), &PlanOptions::default(), &Sources::none());
    if p.is_err() {
        p = plan(d, None, &PlanOptions::default(), &Sources::none());
    }
    let p = p.unwrap();
    let dev = MemDisk::new(p.disk_size);
    for (off, bytes) in crate::gpt::serialize(&p) {
        dev.write_all_at(&bytes, off).unwrap();
    }
    let t = probe_partitions(&dev).unwrap().unwrap();
    assert!(!t.from_backup);
    assert_eq!(t.disk_guid, p.disk_guid);
    assert_eq!(t.partitions.len(), 4);
    for (a, b) in t.partitions.iter().zip(&p.partitions) {
        assert_eq!(
            (a.number, a.first_lba, a.last_lba),
            (b.number, b.first_lba, b.last_lba)
        );
        assert_eq!(
            (a.guid, a.type_guid, &a.name),
            (b.guid, b.type_guid, &b.label)
        );
        assert_eq!(a.attributes, b.attributes);
    }
    assert_eq!(t.partitions[0].type_code.as_deref(), Some("EF00"));
    // Damage the primary header: the backup is used.
    dev.write_all_at(&[0xFF], 512 + 20).unwrap();
    let t2 = probe_partitions(&dev).unwrap().unwrap();
    assert!(t2.from_backup);
    assert_eq!(t2.partitions, t.partitions);
    // Damage the backup entries too: no table.
    dev.write_all_at(&[0xFF], p.disk_size - 33 * 512).unwrap();
    assert_eq!(probe_partitions(&dev).unwrap(), None);
    assert_eq!(probe_partitions(&MemDisk::new(1 << 20)).unwrap(), None);
}

#[test]
fn fat_and_swap_on_memdisk_probe_back() {
    let d = &parse(&ours("esp-swap-root-disk.json")).unwrap()[0];
    assert_eq!(d.name, "vm");
    // Drop the ext4 root so no tool is needed here.
    let mut d = d.clone();
    d.partitions.pop();
    let p = plan(
        &d,
        Some(100 << 20),
        &PlanOptions::default(),
        &Sources::none(),
    )
    .unwrap();
    let dev = MemDisk::new(p.disk_size);
    let r = apply(
        &p,
        &Sources::none(),
        &dev,
        std::path::Path::new("/nonexistent"),
    )
    .unwrap();
    let fs: Vec<_> = r
        .partitions
        .iter()
        .map(|p| p.filesystem.clone().unwrap())
        .collect();
    assert_eq!(fs[0].kind, FsKind::Vfat);
    assert_eq!(fs[1].kind, FsKind::Swap);
    assert_eq!(fs[1].label.as_deref(), Some("vmswap"));
    let PlannedContent::Swap { uuid, .. } = &p.partitions[1].content else {
        panic!()
    };
    assert_eq!(fs[1].uuid.as_deref(), Some(uuid.to_string().as_str()));
    // Same plan, same bytes.
    let dev2 = MemDisk::new(p.disk_size);
    apply(
        &p,
        &Sources::none(),
        &dev2,
        std::path::Path::new("/nonexistent"),
    )
    .unwrap();
    assert!(dev.to_vec() == dev2.to_vec());
}

#[test]
fn measure_without_content() {
    let d = &parse(&shared("raw-esp-swap-root.json")).unwrap()[0];
    let size = measure(d, &PlanOptions::default(), &Sources::none()).unwrap();
    let p = plan(d, Some(size), &PlanOptions::default(), &Sources::none()).unwrap();
    assert!(p.partitions[2].len() >= 1 << 20);
    assert!(size < (512u64 + 1024 + 64) << 20, "{size}");
    // One MiB less does not hold it.
    assert!(
        measure(
            d,
            &PlanOptions {
                free_margin: 100 << 20,
                ..Default::default()
            },
            &Sources::none()
        )
        .unwrap()
            > size
    );
}

/// Mutate one byte of a layout.
fn mutated() -> impl Strategy<Value = String> {
    let bases = [
        shared("raw-esp-swap-root.json"),
        shared("evaluated-esp-swap-root.json"),
        ours("start-end.json"),
        ours("guid-types.json"),
    ];
    (0..bases.len(), any::<usize>(), any::<u8>(), 0..3u8).prop_map(move |(i, pos, byte, op)| {
        let mut b = bases[i].clone().into_bytes();
        let at = pos % b.len();
        match op {
            0 => b[at] = byte,
            1 => {
                b.remove(at);
            }
            _ => b.insert(at, b"0123456789%+-KMGTP\"{}[],:"[byte as usize % 25]),
        }
        String::from_utf8_lossy(&b).into_owned()
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]
    #[test]
    fn parse_and_plan_never_panic(json in mutated(), size in proptest::option::of(0u64..(1 << 40))) {
        if let Ok(disks) = parse(&json) {
            for d in &disks {
                let _ = plan(d, size.map(|s| s / 512 * 512), &PlanOptions::default(), &Sources::none());
                let _ = plan(d, size, &PlanOptions::default(), &Sources::none());
            }
        }
    }

    #[test]
    fn probes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..70000)) {
        let dev = MemDisk::from_vec(bytes);
        let _ = probe_partitions(&dev);
        let _ = probe_filesystem(&dev);
    }
}

#[test]
fn measure_handles_sub_mib_partitions_without_content() {
    // disko's derived-odd-units: 1000K and 100-sector partitions with nothing in them.
    let json = r#"{"disk":{"main":{"type":"disk","content":{"type":"gpt","partitions":{
        "ESP":{"size":"64M","type":"EF00","content":{"type":"filesystem","format":"vfat"}},
        "a":{"size":"1000K"},"b":{"size":"4096"},"c":{"size":"100"},
        "root":{"size":"100%","content":{"type":"filesystem","format":"ext4"}}}}}}}"#;
    let d = &parse(json).unwrap()[0];
    let size = measure(d, &PlanOptions::default(), &Sources::none()).unwrap();
    let p = plan(d, Some(size), &PlanOptions::default(), &Sources::none()).unwrap();
    let lens: Vec<u64> = p.partitions.iter().map(|p| p.len()).collect();
    assert_eq!(&lens[1..4], &[1_024_000, 4096 * 512, 100 * 512]);
}

#[test]
fn the_free_margin_goes_to_the_partition_that_grows() {
    // A rest-of-disk root written with `end = "-10M"` (and a swap after it), or with no size
    // at all: that root gets the margin, not the fixed-size partitions.
    let margin = 200 << 20;
    let opts = PlanOptions {
        free_margin: margin,
        ..Default::default()
    };
    for root in [
        r#""root":{"end":"-10M","content":{"type":"filesystem","format":"ext4"}},
           "swap":{"size":"100%","content":{"type":"swap"}}"#,
        r#""root":{"content":{"type":"filesystem","format":"ext4"}}"#,
    ] {
        let json = format!(
            r#"{{"disk":{{"main":{{"type":"disk","content":{{"type":"gpt","partitions":{{
            "ESP":{{"size":"64M","type":"EF00","content":{{"type":"filesystem","format":"vfat"}}}},
            {root}}}}}}}}}}}"#
        );
        let d = &parse(&json).unwrap()[0];
        let size = measure(d, &opts, &Sources::none()).unwrap();
        let p = plan(d, Some(size), &opts, &Sources::none()).unwrap();
        let root = p.partitions.iter().find(|p| p.key == "root").unwrap();
        assert!(root.len() >= margin, "{root:?} on {size} bytes: {json}");
    }
}
