//! `cargo xtask vmtest`: build vmdisk, build every test VM's disk with it, boot them, report.

use std::path::PathBuf;
use std::sync::Mutex;

use anyhow::{bail, Context, Result};
use vmdisk_vm::assets::{Cache, Lock};
use vmdisk_vm::def::{self, VmDef};
use vmdisk_vm::run::{Faults, Harness, PrepareOptions, VmResult};
use xshell::{cmd, Shell};

use crate::flags::Vmtest;

impl Vmtest {
    pub fn run(self, sh: &Shell) -> Result<()> {
        let root = crate::project_root();
        if self.relock || self.relock_missing {
            let path = root.join("testvms/assets.lock");
            let cache = Cache::new(Cache::default_root()?);
            let lock = vmdisk_vm::assets::write_lock(
                &path,
                &cache,
                &[vmdisk_vm::Arch::X86_64, vmdisk_vm::Arch::Aarch64],
                self.relock_missing,
            )?;
            eprintln!(
                "xtask: wrote {} ({} packages)",
                path.display(),
                lock.packages.len()
            );
            return Ok(());
        }
        crate::deps::ensure_vm(sh, !self.no_install)?;
        eprintln!("xtask: ── building vmdisk");
        cmd!(sh, "cargo build -p vmdisk --locked").run()?;
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let vmdisk = target.join("debug/vmdisk");

        // The user's own run-*-vm script: exactly what `vmdisk vmtest` does (the product
        // command), with the binary just built.
        if let Some(script) = &self.run_script {
            let mut args = vec!["vmtest".to_string(), script.display().to_string()];
            if self.json {
                args.push("--json".into());
            }
            if self.keep {
                args.push("--keep".into());
            }
            return cmd!(sh, "{vmdisk} {args...}")
                .run()
                .with_context(|| format!("vmdisk vmtest {}", script.display()));
        }

        let lock_text = std::fs::read_to_string(root.join("testvms/assets.lock"))
            .context("reading testvms/assets.lock")?;
        let stamp = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let harness = Harness::new(
            vmdisk,
            Cache::new(Cache::default_root()?),
            Lock::parse(&lock_text)?,
            target.join("vmtest").join(stamp.to_string()),
        )
        .keep_disks(self.keep);

        let defs: Vec<VmDef> = def::load_dir(&root.join("testvms"))?
            .into_iter()
            .filter(|d| !self.quick || d.quick)
            .filter(|d| self.filters.is_empty() || self.filters.iter().any(|f| d.name.contains(f)))
            .collect();
        if defs.is_empty() {
            bail!("no test VM matches {:?} (see testvms/*.toml)", self.filters);
        }

        if self.shell {
            if defs.len() != 1 {
                bail!(
                    "--shell needs exactly one VM; name one of: {}",
                    defs.iter()
                        .map(|d| d.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
            }
            return shell(&harness, &defs[0]);
        }

        if self.vfkit {
            return print_vfkit(&harness, &defs);
        }

        eprintln!(
            "xtask: ── booting {} VM(s), {} at a time (artifacts in {})",
            defs.len(),
            self.jobs,
            harness.artifacts_root.display()
        );
        let queue = Mutex::new(defs.into_iter().enumerate().collect::<Vec<_>>());
        let results = Mutex::new(Vec::new());
        std::thread::scope(|s| {
            for _ in 0..self.jobs {
                s.spawn(|| loop {
                    let next = queue.lock().map(|mut q| q.pop()).ok().flatten();
                    let Some((i, d)) = next else { break };
                    let r = harness.run(&d, &Faults::default());
                    eprintln!(
                        "xtask: {} {}",
                        r.name,
                        if r.passed { "passed" } else { "FAILED" }
                    );
                    if let Ok(mut v) = results.lock() {
                        v.push((i, r));
                    }
                });
            }
        });
        let mut results = results.into_inner().unwrap_or_default();
        results.sort_by_key(|(i, _)| *i);
        let results: Vec<VmResult> = results.into_iter().map(|(_, r)| r).collect();
        finish(&results, self.json)
    }
}

fn finish(results: &[VmResult], json: bool) -> Result<()> {
    if json {
        println!("{}", vmdisk_vm::report::json(results));
    } else {
        print!("{}", vmdisk_vm::report::table(results));
    }
    let failed = results.iter().filter(|r| !r.passed).count();
    if failed > 0 {
        bail!("{failed} of {} test VM(s) failed", results.len());
    }
    Ok(())
}

/// vfkit runs only on macOS: build each VM's assets and raw disk here and print the launcher
/// script that boots it there (`sh run-vfkit.sh`). The preflight refuses a 9p or qcow2 guest
/// with the fix.
fn print_vfkit(harness: &Harness, defs: &[VmDef]) -> Result<()> {
    use vmdisk_vm::vfkit::{self, VfkitDisk, VfkitInputs, VfkitSsh};
    let host = vmdisk_vm::Arch::host().context("unsupported host architecture")?;
    for d in defs {
        vfkit::preflight(d).with_context(|| format!("test VM {}", d.name))?;
        let p = harness.prepare(d, &PrepareOptions::default())?;
        let spec = vfkit::from_def(
            d,
            VfkitInputs {
                kernel: p.assets.kernel.clone(),
                initrd: p.assets.initrd.clone(),
                append: format!(
                    "quiet panic=-1 init={} vmdisk.root={} vmdisk.store={} vmdisk.backend=vfkit \
                     vmdisk.net=dhcp",
                    p.assets.init(),
                    d.root,
                    d.store.param()
                ),
                disk: VfkitDisk::Raw(p.disk.clone()),
                store: p.assets.store.clone(),
                run_dir: p.dir.join("vfkit"),
                ssh: VfkitSsh::Nat,
            },
        )?;
        println!("{}", vfkit::script(&spec, host)?);
    }
    Ok(())
}

/// Boot one VM and hand the terminal to an SSH session in it.
fn shell(harness: &Harness, d: &VmDef) -> Result<()> {
    let p = harness.prepare(d, &PrepareOptions::default())?;
    let mut t = Default::default();
    let b = harness.boot(&p, &Faults::default(), "", &mut t)?;
    eprintln!(
        "xtask: {} is up (SSH banner after {:.2}s); serial log: {}",
        d.name,
        t.banner_s.unwrap_or(0.0),
        p.dir.join("serial.log").display()
    );
    let status = b.ssh.interactive().status()?;
    drop(b);
    if !status.success() {
        bail!("ssh exited with {status}");
    }
    Ok(())
}
