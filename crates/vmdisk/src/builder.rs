//! The builder VM: what only a Linux kernel makes (LUKS, LVM, md arrays, btrfs subvolumes and
//! swap files) is made by the rescue VM's kernel with Debian's cryptsetup, lvm2, mdadm and
//! btrfs-progs, running the script `vmdisk_layout::kernel::builder_script` writes from the
//! layout (disko's own commands and arguments).
//!
//! The host has already written each disk's partition table and every filesystem that sits
//! directly in a partition, into images that still have their temporary names. Here each
//! image is served by our NBD server on its own loopback port and attached in the guest as
//! /dev/nbd0, /dev/nbd1, ... (then the `--copy-in` archives, read-only); the script arrives on
//! ssh's stdin (so keys never appear in an argument list or on the console), and the guest
//! syncs and detaches everything before the VM stops. Only then does the caller rename the
//! images into place; on any failure they are removed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use vmdisk_assets::assets::{Cache, Downloads, Lock};
use vmdisk_block::BlockDevice;
use vmdisk_nbd::{Listen, Listener, ServerConfig};
use vmdisk_vm::def::VmDef;
use vmdisk_vm::run::{Faults, Harness, PrepareOptions, Prepared, Timings};
use vmdisk_vm::Arch;

/// How long the build script may run: LUKS key derivation alone is ~20 s per keyslot under
/// TCG, and a mkfs of a large LV writes its metadata through NBD.
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(3600);
/// The builder VM's memory: cryptsetup sizes argon2id's memory cost to half the RAM it sees,
/// so the LUKS keyslots it makes here are no weaker than ~0.5 GiB allows.
const BUILDER_MEMORY_MIB: u32 = 1024;

/// What the error says when the VM's packages are not in the cache.
pub(crate) const HOW_TO_FETCH: &str = "download the rescue VM's packages once with `vmdisk \
     rescue --fetch` (pinned Debian packages, about 120 MB, each checked against its sha256), \
     or point VMDISK_DEB_DIR at a folder holding those .debs";

/// The harness that builds and boots the rescue VM, over `work`.
pub(crate) fn harness(work: &Path, fetch: bool) -> Result<Harness> {
    let downloads = if fetch {
        Downloads::Allowed
    } else {
        Downloads::Refused {
            how_to_fetch: HOW_TO_FETCH.into(),
        }
    };
    let cache = Cache::new(Cache::default_root()?).with_downloads(downloads);
    Ok(Harness::new(
        std::env::current_exe().context("finding the vmdisk binary")?,
        cache,
        Lock::builtin()?,
        work,
    ))
}

/// Block devices served by our NBD server, each on its own loopback port (the guest reaches
/// the host as 10.0.2.2), until [`Served::stop`].
pub(crate) struct Served {
    rt: tokio::runtime::Runtime,
    exports: Vec<Export>,
}

struct Export {
    port: u16,
    name: String,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<vmdisk_nbd::Result<vmdisk_nbd::ServeStats>>>,
}

impl Served {
    pub(crate) fn new() -> Result<Served> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?;
        Ok(Served {
            rt,
            exports: Vec::new(),
        })
    }

    /// Serve `dev` as export `name`; returns its port.
    pub(crate) fn add(
        &mut self,
        dev: Arc<dyn BlockDevice>,
        name: &str,
        read_only: bool,
        description: String,
    ) -> Result<u16> {
        let cfg = ServerConfig {
            export_name: name.into(),
            read_only,
            persistent: true,
            max_connections: 2,
            allow_uids: None,
            description: Some(description),
            allow_remote: false,
            tls: None,
        };
        let addr: SocketAddr = "127.0.0.1:0".parse()?;
        let listener = self
            .rt
            .block_on(async { Listener::bind(&Listen::Tcp(addr), &cfg) })?;
        let port = listener
            .local_addr()
            .context("the NBD listener has no address")?
            .port();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = self
            .rt
            .spawn(vmdisk_nbd::serve_listener(dev, listener, cfg, async move {
                let _ = rx.await;
            }));
        self.exports.push(Export {
            port,
            name: name.into(),
            stop: Some(tx),
            task: Some(task),
        });
        Ok(port)
    }

    pub(crate) fn len(&self) -> usize {
        self.exports.len()
    }

    /// Shell lines that attach every export in the guest, in order, as /dev/nbd0, /dev/nbd1...
    fn attach_script(&self) -> String {
        self.attach_script_from(0)
    }

    /// [`Served::attach_script`] for the exports from `first` on (stage 2 attached the ones
    /// before).
    pub(crate) fn attach_script_from(&self, first: usize) -> String {
        let mut s = String::from("set -e\n");
        for (i, e) in self.exports.iter().enumerate().skip(first) {
            s.push_str(&format!(
                "nbd-client 10.0.2.2 {} /dev/nbd{i} -N {} -b 512 >/dev/null\n\
                 blockdev --rereadpt /dev/nbd{i} 2>/dev/null || true\n",
                e.port, e.name
            ));
        }
        s
    }

    /// Shell lines that sync and detach every export in the guest.
    pub(crate) fn detach_script(&self) -> String {
        let mut s = String::from("sync\n");
        for i in 0..self.exports.len() {
            s.push_str(&format!("nbd-client -d /dev/nbd{i} >/dev/null\n"));
        }
        s
    }

    /// Stop serving (every write the guest made has reached the devices); the first error.
    pub(crate) fn stop(mut self) -> Result<()> {
        let mut first = None;
        for e in &mut self.exports {
            if let Some(tx) = e.stop.take() {
                let _ = tx.send(());
            }
        }
        for e in &mut self.exports {
            if let Some(t) = e.task.take() {
                let r = match self.rt.block_on(t) {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(err)) => Err(anyhow::anyhow!("NBD server for {}: {err}", e.name)),
                    Err(err) => Err(anyhow::anyhow!("NBD server task for {}: {err}", e.name)),
                };
                if let (Err(err), None) = (r, &first) {
                    first = Some(err);
                }
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// The rescue VM, built (from the cache) and ready to boot as the builder.
pub(crate) struct Builder {
    harness: Harness,
    prepared: Prepared,
    work: tempfile::TempDir,
}

impl Builder {
    /// Build the VM's assets and disk now, before any output exists, so a missing package
    /// fails before a byte of the user's disks is written.
    pub(crate) fn prepare(quiet: bool) -> Result<Builder> {
        let arch = Arch::host().context("the builder VM runs on x86_64 and aarch64 hosts")?;
        let work = tempfile::Builder::new()
            .prefix("vmdisk-builder-")
            .tempdir()?;
        let harness = harness(work.path(), false)?;
        if !quiet {
            eprintln!(
                "vmdisk: this layout has content only a Linux kernel makes (LUKS, LVM, md, \
                 btrfs subvolumes): preparing the builder VM from {}",
                harness.cache.root().display()
            );
        }
        harness
            .qemu(arch)
            .context("finding qemu for the builder VM")?;
        let mut def = VmDef::rescue(arch, &work.path().join("rescue-layout.json"))?;
        def.name = "builder".into();
        def.memory_mib = BUILDER_MEMORY_MIB;
        let prepared = harness
            .prepare(&def, &PrepareOptions::default())
            .context("building the builder VM")?;
        Ok(Builder {
            harness,
            prepared,
            work,
        })
    }

    /// Boot, attach `served`'s exports, run `script`, sync and detach, stop. The console log
    /// is kept (and named in the error) when it fails. An interrupt (`cancel`) stops the VM
    /// at once: the outputs are still temporaries, which the caller then removes.
    pub(crate) fn run(
        self,
        served: &Served,
        script: &str,
        cancel: &vmdisk_block::Cancel,
        quiet: bool,
    ) -> Result<()> {
        let r = self.run_inner(served, script, cancel, quiet);
        if r.is_err() && !cancel.is_cancelled() {
            let kept = self.work.keep();
            eprintln!(
                "vmdisk: the builder VM's console log and qemu command line are in {}",
                kept.display()
            );
        }
        r
    }

    fn run_inner(
        &self,
        served: &Served,
        script: &str,
        cancel: &vmdisk_block::Cancel,
        quiet: bool,
    ) -> Result<()> {
        let h = &self.harness;
        let mut t = Timings::default();
        let started = std::time::Instant::now();
        let mut b = h
            .boot(&self.prepared, &Faults::default(), "", &mut t)
            .context("booting the builder VM")?;
        let (vm, ssh) = (&mut b.vm, &b.ssh);
        // One command in the guest; the VM is stopped if an interrupt comes meanwhile.
        let mut step = |what: &str, cmd: &str, stdin: Option<&[u8]>, timeout: Duration| {
            let out = std::thread::scope(|sc| {
                let job = sc.spawn(|| ssh.run(cmd, stdin, timeout));
                while !job.is_finished() {
                    if cancel.is_cancelled() {
                        vm.stop();
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                job.join()
            });
            cancel.check()?;
            let out = out.map_err(|_| anyhow::anyhow!("the ssh thread panicked"))??;
            if out.status != Some(0) {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.trim().lines().rev().take(12).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                bail!(
                    "the builder VM failed {what} (exit {}):\n{}",
                    out.status.map_or("by a signal".into(), |c| c.to_string()),
                    tail.join("\n")
                );
            }
            anyhow::Ok(())
        };
        let short = h.timeouts.ssh_command;
        step(
            "to attach the disks",
            &format!("vmdisk-builder-init >/dev/null\n{}", served.attach_script()),
            None,
            short,
        )?;
        if !quiet {
            eprintln!(
                "vmdisk: builder VM up in {:.1} s; running the layout's cryptsetup / lvm / mdadm \
                 / mkfs steps",
                started.elapsed().as_secs_f64()
            );
        }
        step(
            "while building",
            "export DM_DISABLE_UDEV=1; cd /root && sh -s",
            Some(script.as_bytes()),
            SCRIPT_TIMEOUT,
        )?;
        step(
            "to flush and detach the disks",
            &served.detach_script(),
            None,
            short,
        )?;
        b.vm.stop();
        if !quiet {
            eprintln!(
                "vmdisk: builder VM done in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        Ok(())
    }
}

/// Write `dir` as a tar archive (what the guest extracts into a kernel-made filesystem for
/// `--copy-in`): owners, modes and symlinks as they are; padded to whole 512-byte records.
pub(crate) fn tar_of(dir: &Path, into: &Path) -> Result<PathBuf> {
    let f = std::fs::File::create(into).with_context(|| format!("creating {}", into.display()))?;
    let mut t = tar::Builder::new(std::io::BufWriter::new(f));
    t.follow_symlinks(false);
    t.mode(tar::HeaderMode::Complete);
    t.append_dir_all(".", dir)
        .with_context(|| format!("archiving {} for the builder VM", dir.display()))?;
    let mut w = t.into_inner().context("finishing the archive")?;
    std::io::Write::flush(&mut w)?;
    Ok(into.to_path_buf())
}
