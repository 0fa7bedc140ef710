//! `vmdisk rescue IMAGE [-- COMMAND]`: boot the harness's rescue VM with IMAGE exported by our
//! NBD server and attached in the guest with nbd-client, so the guest kernel's full ext4 (journal
//! replay included) does what the offline editor refuses.
//!
//! The image is opened here, under qemu's write lock, and served on a loopback port the guest
//! reaches as 10.0.2.2 (qemu user networking). With COMMAND, it runs over SSH in the guest
//! (busybox sh -c; the image is /dev/nbd0, partitions /dev/nbd0p1...) and its exit code becomes
//! ours; then the guest syncs and detaches before the VM stops and the server flushes.
//! Without COMMAND, a shell opens on the VM's serial console.
//!
//! The rescue VM is built from pinned Debian packages (kernel, busybox, dropbear, nbd-client;
//! Debian's qemu where the machine has none) kept in the asset cache. Downloading them is an
//! explicit step, `vmdisk rescue --fetch`; without it nothing is downloaded and a missing
//! package is an error that names that step. What is cached is unpacked and built locally.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use vmdisk_assets::assemble::STAGE2_NBD_ATTACHED;
use vmdisk_image::OpenOptions;
use vmdisk_vm::def::VmDef;
use vmdisk_vm::run::{Faults, Harness, PrepareOptions, Prepared, Timings};
use vmdisk_vm::Arch;

use crate::builder::Served;
use crate::FormatArg;

#[derive(Debug, Args)]
pub struct RescueArgs {
    /// Download the rescue VM's pinned Debian packages into the cache first ($VMDISK_CACHE,
    /// else ~/.cache/vmdisk; each checked against its sha256). Nothing is downloaded without
    /// it. Without IMAGE, only that.
    #[arg(long)]
    pub fetch: bool,
    /// The image to rescue (raw or qcow2; a backing chain is followed).
    #[arg(required_unless_present = "fetch")]
    pub image: Option<PathBuf>,
    /// Format of IMAGE (probed when not given).
    #[arg(short = 'f', value_enum)]
    pub format: Option<FormatArg>,
    /// Attach the image read-only (the guest sees a read-only /dev/nbd0).
    #[arg(long)]
    pub read_only: bool,
    /// More images to attach, in order, as /dev/nbd1, /dev/nbd2, ... (the other members of
    /// an md array or a volume group); with a COMMAND. Same format probing and locks.
    #[arg(long = "with-image", value_name = "FILE", requires = "command")]
    pub with_image: Vec<PathBuf>,
    /// Keep the rescue VM's artifact folder (console log, qemu command line) and print it.
    #[arg(long)]
    pub keep: bool,
    /// Command to run in the rescue VM with busybox `sh -c` (e.g. `mount /dev/nbd0p2 /mnt &&
    /// ...`); without one, a shell opens on the VM's console.
    #[arg(last = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

pub fn run(a: RescueArgs, quiet: bool) -> Result<u8> {
    let arch = Arch::host().context("vmdisk rescue runs on x86_64 and aarch64 hosts")?;
    let work = tempfile::Builder::new()
        .prefix("vmdisk-rescue-")
        .tempdir()?;
    let harness = crate::builder::harness(work.path(), a.fetch)?;
    // The VM first (assets, qemu, its own disk), so nothing holds the image while that fails.
    if !quiet {
        eprintln!(
            "vmdisk: rescue: preparing the rescue VM (from pinned Debian packages in {}{})",
            harness.cache.root().display(),
            if a.fetch {
                ", downloaded if missing"
            } else {
                ""
            }
        );
    }
    harness
        .qemu(arch)
        .context("finding qemu for the rescue VM")?;
    let def = VmDef::rescue(arch, &work.path().join("rescue-layout.json"))?;
    let p = harness
        .prepare(&def, &PrepareOptions::default())
        .context("building the rescue VM")?;
    let Some(image) = &a.image else {
        if !quiet {
            eprintln!("vmdisk: rescue: the rescue VM is ready; run `vmdisk rescue IMAGE`");
        }
        return Ok(0);
    };

    let img = vmdisk_image::open(
        image,
        &OpenOptions {
            format: a.format.map(Into::into),
            read_only: a.read_only,
            force_share: false,
            no_backing: false,
            ..Default::default()
        },
    )
    .with_context(|| format!("opening {} for the rescue VM", image.display()))?;
    let mut extra = Vec::new();
    for f in &a.with_image {
        extra.push(
            vmdisk_image::open(
                f,
                &OpenOptions {
                    read_only: a.read_only,
                    ..Default::default()
                },
            )
            .with_context(|| format!("opening {} for the rescue VM", f.display()))?,
        );
    }

    // Our NBD server on loopback ports, in its own runtime threads until we say stop.
    let mut served = Served::new()?;
    let port = served.add(
        img.dev(),
        "rescue",
        a.read_only,
        format!("vmdisk rescue of {}", image.display()),
    )?;
    for (i, (x, f)) in extra.iter().zip(&a.with_image).enumerate() {
        served.add(
            x.dev(),
            &format!("with{}", i + 1),
            a.read_only,
            format!("vmdisk rescue of {}", f.display()),
        )?;
    }

    let outcome = boot_and_work(&a, image, &harness, &p, port, &served, quiet);
    if outcome.is_err() || a.keep {
        let kept = work.keep();
        eprintln!(
            "vmdisk: rescue: console log and qemu command line in {}",
            kept.display()
        );
    }

    if let Err(e) = served.stop() {
        eprintln!("vmdisk: rescue: {e}");
    }
    img.close()?;
    for x in extra {
        x.close()?;
    }
    outcome
}

fn boot_and_work(
    a: &RescueArgs,
    image: &Path,
    harness: &Harness,
    p: &Prepared,
    port: u16,
    served: &Served,
    quiet: bool,
) -> Result<u8> {
    let mut append = format!("vmdisk.nbd=10.0.2.2:{port}:rescue");
    let interactive = a.command.is_empty();
    if interactive {
        append.push_str(" vmdisk.console_shell=1");
    }
    let mut t = Timings::default();
    let mut b = harness
        .boot(p, &Faults::default(), &append, &mut t)
        .context("booting the rescue VM")?;
    match b.vm.wait_marker(
        "NBD attach",
        STAGE2_NBD_ATTACHED,
        harness.timeouts.ssh_command,
    ) {
        Ok(l) => {
            if !quiet {
                let detail = l
                    .text
                    .trim_start_matches(STAGE2_NBD_ATTACHED)
                    .trim_start()
                    .trim_start_matches("/dev/nbd0 ");
                eprintln!(
                    "vmdisk: rescue: {} is /dev/nbd0 in the VM ({detail})",
                    image.display()
                );
            }
        }
        Err(e) => bail!("the rescue VM could not attach the image: {e}"),
    }
    if interactive {
        return console_shell(&mut b.vm);
    }
    if served.len() > 1 {
        let out = b.ssh.run(
            &served.attach_script_from(1),
            None,
            harness.timeouts.ssh_command,
        )?;
        if out.status != Some(0) {
            bail!(
                "the rescue VM could not attach {}: {}",
                a.with_image
                    .iter()
                    .map(|f| f.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        if !quiet {
            for (i, f) in a.with_image.iter().enumerate() {
                eprintln!(
                    "vmdisk: rescue: {} is /dev/nbd{} in the VM",
                    f.display(),
                    i + 1
                );
            }
        }
    }
    let script = a.command.join(" ");
    let status = b
        .ssh
        .base_command()
        .arg(format!("cd /root && {script}"))
        .stdin(std::process::Stdio::inherit())
        .status()
        .context("running the command over SSH")?;
    // Flush the guest's caches to the NBD device and detach before stopping the VM.
    let out = b
        .ssh
        .run(&served.detach_script(), None, harness.timeouts.ssh_command)?;
    if out.status != Some(0) {
        bail!(
            "the rescue VM could not flush and detach the image: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    b.vm.stop();
    Ok(status.code().map_or(1, |c| c.clamp(0, 255) as u8))
}

/// Bridge the terminal to the VM's serial console until the guest powers off (the shell's
/// `exit` makes stage 2 sync, detach the image and power off).
fn console_shell(vm: &mut vmdisk_vm::vm::TestVm) -> Result<u8> {
    // stdin is read on a detached thread (a blocking read cannot be cancelled); keystrokes
    // reach the console through a channel.
    let (tx, rx) = std::sync::mpsc::channel::<Vec<u8>>();
    std::thread::spawn(move || {
        let mut buf = [0u8; 1024];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let console = &vm.console;
    let mut out = std::io::stdout();
    let mut shown = console.line_count();
    let mut shown_pending = String::new();
    loop {
        while let Ok(keys) = rx.try_recv() {
            console.write(&keys)?;
        }
        let lines = console.lines();
        for l in lines.iter().skip(shown) {
            // A prompt shown earlier as pending is now the start of this line.
            let text = l
                .text
                .strip_prefix(shown_pending.as_str())
                .unwrap_or(&l.text);
            writeln!(out, "{text}")?;
            shown_pending.clear();
        }
        shown = shown.max(lines.len());
        let pending = console.pending();
        if pending != shown_pending {
            let new = pending
                .strip_prefix(shown_pending.as_str())
                .unwrap_or(&pending);
            write!(out, "{new}")?;
            shown_pending = pending;
        }
        out.flush()?;
        if console.closed() {
            return Ok(0);
        }
        let _ = console.wait_for_from("console output", shown, Duration::from_millis(50), |_| true);
    }
}
