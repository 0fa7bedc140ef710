//! `vmdisk vmtest --explain LOG` on recorded real logs: seed 004's console log (cut out of the
//! seed) and logs from public bug reports (`crates/vmdisk-vm/tests/golden/explain/`, each with
//! its source), each mapped to the ids listed in that folder's EXPECTED; a healthy boot gets
//! no id and exit code 0.

use std::fs;
use std::path::{Path, PathBuf};

use tests::{vmdisk, workspace_root};

fn golden() -> PathBuf {
    workspace_root().join("crates/vmdisk-vm/tests/golden/explain")
}

/// The console log in seed 004, as the user pasted it (de-indented).
fn seed_004_console() -> String {
    let dir = workspace_root().join("../shared/seeds");
    let seed = fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("004_"))
        })
        .unwrap_or_else(|| panic!("no seed 004 in {}", dir.display()));
    let text = fs::read_to_string(seed).unwrap();
    let from = text
        .find("<<< NixOS Stage 1 >>>")
        .expect("the seed's console log");
    let to = from + text[from..].find("```").unwrap();
    text[from..to]
        .lines()
        .map(str::trim)
        .collect::<Vec<_>>()
        .join("\r\n")
}

fn explain(log: &Path) -> (Vec<String>, i32, serde_json::Value) {
    let r = vmdisk(&["vmtest", "--explain", log.to_str().unwrap(), "--json"]);
    let v = r.json();
    let ids = v["diagnoses"]
        .as_array()
        .unwrap_or_else(|| panic!("no diagnoses array: {v}"))
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .collect();
    (ids, r.code(), v)
}

#[test]
fn every_recorded_log_maps_to_its_ids() {
    let tmp = tempfile::tempdir().unwrap();
    let expected = fs::read_to_string(golden().join("EXPECTED")).unwrap();
    let mut seen = 0;
    for line in expected
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        let (name, ids) = line.split_once(':').unwrap();
        let want: Vec<String> = ids.split_whitespace().map(str::to_string).collect();
        let path = if name == "seed-004" {
            let p = tmp.path().join("seed-004-console.log");
            fs::write(&p, seed_004_console()).unwrap();
            p
        } else {
            golden().join(name)
        };
        let (got, code, v) = explain(&path);
        assert_eq!(got, want, "{name}: {v:#}");
        assert_eq!(code, if want.is_empty() { 0 } else { 1 }, "{name}");
        for d in v["diagnoses"].as_array().unwrap() {
            for k in ["cause", "fix", "evidence"] {
                let t = d[k].as_str().unwrap();
                assert!(
                    !t.is_empty() && !t.contains('\r') && !t.contains('\x1b'),
                    "{name}: {k} = {t:?}"
                );
            }
        }
        seen += 1;
    }
    // Every log in the folder is listed.
    let logs = fs::read_dir(golden())
        .unwrap()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "log"))
        .count();
    assert_eq!(
        seen,
        logs + 1,
        "EXPECTED must list every .log (and seed-004)"
    );
}

#[test]
fn the_seed_log_names_the_share_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("console.log");
    let log = seed_004_console();
    assert!(log.contains("\r\n") && log.contains("9pnet_virtio"));
    fs::write(&p, &log).unwrap();
    let (_, _, v) = explain(&p);
    let d = &v["diagnoses"][0];
    assert_eq!(
        d["evidence"],
        "[    0.253387] 9pnet_virtio: no channels available for device nix-store"
    );
    assert!(d["fix"]
        .as_str()
        .unwrap()
        .contains("virtio-fs,sharedDir=/nix/store,mountTag=nix-store"));
    // The human report says the same.
    let r = vmdisk(&["vmtest", "--explain", p.to_str().unwrap()]);
    assert_eq!(r.code(), 1);
    assert!(r.stdout.contains("[store-share-missing]"), "{}", r.stdout);
    assert!(r.stdout.contains("[stage1-failed]"), "{}", r.stdout);
}

#[test]
fn a_healthy_boot_gets_no_id() {
    // The seed's boot up to the failing mount is healthy.
    let tmp = tempfile::tempdir().unwrap();
    let log = seed_004_console();
    let healthy = &log[..log.find("mounting nix-store on /nix/.ro-store").unwrap()];
    let p = tmp.path().join("healthy.log");
    fs::write(&p, healthy).unwrap();
    let (ids, code, _) = explain(&p);
    assert!(ids.is_empty(), "{ids:?}");
    assert_eq!(code, 0);
    let r = vmdisk(&["vmtest", "--explain", p.to_str().unwrap()]);
    assert!(r.stdout.contains("no known failure"), "{}", r.stdout);
}
