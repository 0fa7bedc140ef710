//! vmdisk's sgdisk type-code table against sgdisk itself: every code in it, set with
//! `sgdisk --typecode`, gives the GUID the table says, and sgdisk lists (`-L`) exactly the
//! codes the table marks as listed.

use std::process::Command;

use vmdisk_layout::TYPE_CODES;

#[test]
fn every_type_code_is_the_one_sgdisk_sets() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("codes.img");
    for chunk in TYPE_CODES.chunks(128) {
        let f = std::fs::File::create(&img).unwrap();
        f.set_len(1 << 30).unwrap();
        drop(f);
        let mut cmd = Command::new("sgdisk");
        cmd.args(["--clear", "-a", "1"]);
        for (i, (code, _, _, _)) in chunk.iter().enumerate() {
            let n = i + 1;
            let first = 2048 + 8 * i;
            cmd.arg(format!("--new={n}:{first}:{}", first + 7))
                .arg(format!("--typecode={n}:{code:04x}"));
        }
        let out = cmd
            .arg(&img)
            .output()
            .expect("sgdisk (gdisk) must be installed");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json = Command::new("sfdisk")
            .arg("--json")
            .arg(&img)
            .output()
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        let parts = v["partitiontable"]["partitions"].as_array().unwrap();
        assert_eq!(parts.len(), chunk.len());
        for (p, (code, guid, _, _)) in parts.iter().zip(chunk) {
            assert_eq!(
                p["type"].as_str().unwrap().to_lowercase(),
                *guid,
                "type code {code:04X}"
            );
        }
    }
    let listed = Command::new("sgdisk").arg("-L").output().unwrap();
    let text = String::from_utf8_lossy(&listed.stdout);
    let mut codes: Vec<u16> = text
        .split_whitespace()
        .filter(|w| w.len() == 4 && w.bytes().all(|b| b.is_ascii_hexdigit()))
        .filter_map(|w| u16::from_str_radix(w, 16).ok())
        .collect();
    codes.sort_unstable();
    let mut ours: Vec<u16> = TYPE_CODES
        .iter()
        .filter(|(_, _, _, listed)| *listed)
        .map(|(c, _, _, _)| *c)
        .collect();
    ours.sort_unstable();
    assert_eq!(ours, codes, "sgdisk -L lists other codes");
}
