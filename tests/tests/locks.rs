//! Done-when 6: vmdisk and qemu honour each other's image locks.
//!
//! - While qemu (qemu-nbd serving read-write) holds an image, every vmdisk write command and
//!   a read-write library open fail with an error naming the lock, and the image is unchanged;
//!   once qemu lets go, the same commands work (so the refusal really was the lock).
//! - While vmdisk holds an image (library open kept alive here), qemu-img / qemu-io fail
//!   with qemu's own lock error; once vmdisk lets go, they work.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tests::*;

/// qemu's "write" permission byte and its "I do not share write" byte.
const QEMU_PERM_WRITE: i64 = 101;
const QEMU_SHARED_WRITE: i64 = 201;

/// A qcow2 with data and one internal snapshot "q", plus a raw source for convert.
fn fixture(d: &Path) -> (PathBuf, PathBuf) {
    let src = d.join("src.raw");
    make_sparse_raw(&src, 16 * MIB, 7, 12, 500 * KIB);
    let img = d.join("held.qcow2");
    qemu_img(&["convert", "-O", "qcow2", s(&src), s(&img)]).ok();
    qemu_img(&["snapshot", "-c", "q", s(&img)]).ok();
    (img, src)
}

/// qemu-nbd serving `img` read-write: it holds qemu's write lock until dropped.
fn qemu_holds(d: &Path, img: &Path) -> Background {
    let sock = d.join("nbd.sock");
    let mut bg = Background::spawn(
        Command::new(require_tool("qemu-nbd"))
            .arg("--socket")
            .arg(&sock)
            .args(["-f", "qcow2"])
            .arg(img),
        d,
        "qemu-nbd",
    );
    let held = wait_until(Duration::from_secs(20), || {
        lock_byte_held(img, QEMU_PERM_WRITE) && lock_byte_held(img, QEMU_SHARED_WRITE)
    });
    if !held {
        let alive = bg.alive();
        panic!(
            "TEST BUG: qemu-nbd did not take the write lock within 20 s (alive: {alive}):\n  $ {}\n  stderr: {}",
            bg.cmdline,
            std::fs::read_to_string(d.join("qemu-nbd.stderr")).unwrap_or_default()
        );
    }
    bg
}

#[test]
fn qemu_writer_blocks_every_vmdisk_write() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, src) = fixture(d);
    let i = s(&img);
    let writes: Vec<Vec<&str>> = vec![
        vec!["create", "-f", "qcow2", i, "16M"],
        vec!["create", "-f", "raw", i, "16M"],
        vec!["convert", "-O", "qcow2", s(&src), i],
        vec!["convert", "-O", "raw", s(&src), i],
        vec!["snapshot", "create", i, "s1"],
        vec!["snapshot", "apply", i, "q"],
        vec!["snapshot", "delete", i, "q"],
        vec!["check", "-r", "leaks", i],
        vec!["check", "-r", "all", i],
    ];

    let mut holder = qemu_holds(d, &img);
    let sha = sha256(&img);
    let mut errs = Vec::new();
    for args in &writes {
        let r = vmdisk(args);
        if r.success() || !r.all_output_lower().contains("lock") {
            errs.push(format!(
                "expected a refusal naming the lock while qemu-nbd holds the image:\n{r}"
            ));
        }
        if sha256(&img) != sha {
            errs.push(format!(
                "the image changed although qemu holds it, after:\n{r}"
            ));
            break;
        }
    }
    // the library refuses too, with the typed error
    match vmdisk_image::open(
        &img,
        &vmdisk_image::OpenOptions {
            read_only: false,
            ..Default::default()
        },
    ) {
        Ok(_) => errs
            .push("vmdisk_image::open read-write succeeded while qemu-nbd holds the image".into()),
        Err(e) => {
            let msg = error_chain(&e);
            if !msg.to_lowercase().contains("lock") {
                errs.push(format!("library open error does not name the lock: {msg}"));
            }
            if !matches!(e.block_error(), Some(vmdisk_block::Error::Locked { .. })) {
                errs.push(format!("library open error is not Error::Locked: {e:?}"));
            }
        }
    }
    // reading with -U (force share) is allowed, as for qemu-img
    let r = vmdisk(&["inspect", "-U", i]);
    if !r.success() {
        errs.push(format!(
            "vmdisk inspect -U should read an image qemu holds:\n{r}"
        ));
    }
    assert!(holder.alive(), "qemu-nbd died during the test");
    holder.kill();
    if sha256(&img) != sha {
        errs.push("the image changed while qemu held it".into());
    }
    assert!(
        errs.is_empty(),
        "{} failure(s):\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );

    // once qemu is gone the same commands work: the refusals were the lock
    vmdisk(&["snapshot", "create", i, "s1"]).ok();
    vmdisk(&["check", "-r", "leaks", i]).ok();
    assert_qemu_check_clean(&img, "after qemu-nbd exited and vmdisk wrote");
}

#[test]
fn vmdisk_writer_blocks_qemu() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = fixture(d);
    let i = s(&img);
    let image = vmdisk_image::open(
        &img,
        &vmdisk_image::OpenOptions {
            read_only: false,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open read-write: {}", error_chain(&e)));
    assert!(
        lock_byte_held(&img, QEMU_PERM_WRITE) && lock_byte_held(&img, QEMU_SHARED_WRITE),
        "vmdisk holds the image read-write but not qemu's write lock bytes 101/201"
    );
    let mut errs = Vec::new();
    let info = qemu_img(&["info", i]);
    if info.success() || !info.stderr.contains("lock") {
        errs.push(format!(
            "qemu-img info should fail on qemu's lock while vmdisk writes:\n{info}"
        ));
    }
    let io =
        run(Command::new(require_tool("qemu-io")).args(["-f", "qcow2", "-c", "write 0 512", i]));
    if !io.stderr.contains("lock") || io.stdout.contains("wrote") {
        errs.push(format!(
            "qemu-io write should fail on qemu's lock while vmdisk writes:\n{io}"
        ));
    }
    let forced = qemu_img(&["info", "-U", i]);
    if !forced.success() {
        errs.push(format!("qemu-img info -U should still read it:\n{forced}"));
    }
    // another vmdisk refuses as well
    let r = vmdisk(&["snapshot", "create", i, "x"]);
    if r.success() || !r.all_output_lower().contains("lock") {
        errs.push(format!(
            "a second vmdisk should refuse to write an image vmdisk holds:\n{r}"
        ));
    }
    image
        .close()
        .unwrap_or_else(|e| panic!("close: {}", error_chain(&e)));
    assert!(
        errs.is_empty(),
        "{} failure(s):\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );

    // released: qemu works again. Another test's child process may still hold a copy of
    // the descriptor for the moment between its fork and its exec (the OFD lock lives until
    // the last copy closes), so wait for the release with a deadline rather than once.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while lock_byte_held(&img, QEMU_PERM_WRITE) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        !lock_byte_held(&img, QEMU_PERM_WRITE),
        "lock byte 101 still held 10 s after close"
    );
    qemu_img(&["info", i]).ok();
    qemu_io(&img, &["write -P 0x42 0 512".into()]);
    assert_qemu_check_clean(&img, "after vmdisk released the image");
}

#[test]
fn vmdisk_reader_blocks_qemu_writes_only() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (img, _) = fixture(d);
    let i = s(&img);
    let image = vmdisk_image::open(
        &img,
        &vmdisk_image::OpenOptions {
            read_only: true,
            ..Default::default()
        },
    )
    .unwrap_or_else(|e| panic!("open read-only: {}", error_chain(&e)));
    let mut errs = Vec::new();
    let info = qemu_img(&["info", i]);
    if !info.success() {
        errs.push(format!(
            "qemu-img info should share an image vmdisk only reads:\n{info}"
        ));
    }
    let io =
        run(Command::new(require_tool("qemu-io")).args(["-f", "qcow2", "-c", "write 0 512", i]));
    if !io.stderr.contains("lock") || io.stdout.contains("wrote") {
        errs.push(format!(
            "qemu-io write should fail on qemu's lock while vmdisk reads consistently:\n{io}"
        ));
    }
    drop(image);
    assert!(
        errs.is_empty(),
        "{} failure(s):\n\n{}",
        errs.len(),
        errs.join("\n\n")
    );
    qemu_io(&img, &["write -P 0x42 0 512".into()]);
}
