//! Images vmdisk must refuse, through the CLI: encrypted qcow2 (never hand out ciphertext)
//! and backing-file loops (never recurse forever), each with an error that says why.

use std::path::Path;

use tests::*;

fn encrypted(d: &Path) {
    qemu_img_in(
        d,
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "--object",
            "secret,id=sec0,data=abc",
            "-o",
            "encrypt.format=luks,encrypt.key-secret=sec0",
            "enc.qcow2",
            "16M",
        ],
    )
    .ok();
    assert_eq!(
        qemu_info(d, "enc.qcow2")["encrypted"],
        true,
        "TEST BUG: qemu-img did not make an encrypted image"
    );
}

#[test]
fn encrypted_image_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    encrypted(d);
    let sha = sha256(&d.join("enc.qcow2"));
    let mut errs = Vec::new();
    let cmds: &[&[&str]] = &[
        &["inspect", "enc.qcow2"],
        &["inspect", "--json", "enc.qcow2"],
        &["convert", "-O", "raw", "enc.qcow2", "out.raw"],
        &["map", "--json", "enc.qcow2"],
    ];
    for args in cmds {
        let r = vmdisk_in(d, args);
        if r.success() || !r.all_output_lower().contains("encrypt") {
            errs.push(format!(
                "expected a refusal that says the image is encrypted:\n{r}"
            ));
        }
    }
    if d.join("out.raw").exists() {
        errs.push("convert of an encrypted image left an output file behind".into());
    }
    if sha256(&d.join("enc.qcow2")) != sha {
        errs.push("refusing the encrypted image changed it".into());
    }
    assert!(errs.is_empty(), "{}", errs.join("\n\n"));
}

#[test]
fn backing_loop_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    qemu_img_in(d, &["create", "-q", "-f", "qcow2", "b.qcow2", "16M"]).ok();
    qemu_img_in(
        d,
        &[
            "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", "a.qcow2",
        ],
    )
    .ok();
    qemu_img_in(
        d,
        &["rebase", "-u", "-b", "a.qcow2", "-F", "qcow2", "b.qcow2"],
    )
    .ok();
    assert_eq!(
        qemu_info(d, "b.qcow2")["backing-filename"],
        "a.qcow2",
        "TEST BUG: no loop made"
    );
    // and an image that is its own backing file
    qemu_img_in(d, &["create", "-q", "-f", "qcow2", "self.qcow2", "16M"]).ok();
    qemu_img_in(
        d,
        &[
            "rebase",
            "-u",
            "-b",
            "self.qcow2",
            "-F",
            "qcow2",
            "self.qcow2",
        ],
    )
    .ok();
    let shas: Vec<String> = ["a.qcow2", "b.qcow2", "self.qcow2"]
        .iter()
        .map(|n| sha256(&d.join(n)))
        .collect();

    let mut errs = Vec::new();
    let cmds: &[(&[&str], &str)] = &[
        (&["inspect", "--backing-chain", "a.qcow2"], "a.qcow2"),
        (&["convert", "-O", "raw", "a.qcow2", "out.raw"], "a.qcow2"),
        (&["compare", "a.qcow2", "b.qcow2"], "a.qcow2"),
        (&["map", "--json", "b.qcow2"], "b.qcow2"),
        (
            &["convert", "-O", "raw", "self.qcow2", "out2.raw"],
            "self.qcow2",
        ),
    ];
    for (args, name) in cmds {
        // a loop followed forever hangs: 30 s is plenty for a 16 MiB image
        let r = run_with_timeout(
            std::process::Command::new(vmdisk_bin())
                .current_dir(d)
                .args(*args),
            std::time::Duration::from_secs(30),
        );
        let out = r.all_output_lower();
        let names_loop = out.contains("loop") || out.contains("cycle") || out.contains("circular");
        if r.success() || !names_loop || !out.contains(name) {
            errs.push(format!(
                "expected a refusal naming the backing loop (\"loop\"/\"cycle\" and {name}):\n{r}"
            ));
        }
        if r.code() < 0 || r.code() == 101 {
            // -signal (stack overflow, abort) or 101 (a Rust panic) instead of a clean error
            errs.push(format!("the loop crashed vmdisk:\n{r}"));
        }
    }
    let now: Vec<String> = ["a.qcow2", "b.qcow2", "self.qcow2"]
        .iter()
        .map(|n| sha256(&d.join(n)))
        .collect();
    if now != shas {
        errs.push("refusing a backing loop changed an image".into());
    }
    assert!(errs.is_empty(), "{}", errs.join("\n\n"));
}
