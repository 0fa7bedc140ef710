//! Benchmarks of vmdisk side by side with qemu-img, reported as ratios.
//!
//! ```text
//! cargo xtask bench convert [ARGS...]          builds vmdisk + benches in release, then runs this
//! target/release/benches convert [--size 8G] [--data 1.5G] [--runs 3] [--dir DIR]
//!                                [--vmdisk PATH] [--quick] [--json] [--qemu-parallel]
//!                                [--case SUBSTR]...
//! target/release/benches layout  [--runs 3] [--quick] [--json] [--corpus DIR]   (see layout.rs)
//! target/release/benches nbd     [--runs 3] [--quick] [--json] [--reads N]   (see nbd.rs)
//! target/release/benches resize  [--runs 3] [--quick] [--json]   (see resize.rs)
//! ```
//!
//! This program does not build vmdisk: it runs the binary next to itself
//! (`target/release/vmdisk`) unless `--vmdisk` says otherwise; `cargo xtask bench convert`
//! builds both in release first.
//!
//! `convert` generates a seeded raw image (cached in `--dir`, default `target/bench-data`),
//! makes a qcow2 copy of it with qemu-img, then times `qemu-img convert` and `vmdisk convert`
//! alternately on each case (best and median of `--runs`), records output sizes and peak RSS,
//! checks every vmdisk output with `qemu-img compare` / `qemu-img check`, and prints a Markdown
//! table (or JSON). The exit status is non-zero only when vmdisk failed or wrote a wrong image;
//! a missed performance target is reported, not fatal.

mod disko_vm;
mod ext4;
mod gen;
mod layout;
mod nbd;
mod overlay;
mod report;
mod resize;
mod run;
mod table;
mod util;

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};

#[derive(Parser)]
#[command(about = "vmdisk vs qemu-img benchmarks, reported as ratios")]
struct Cli {
    #[command(subcommand)]
    bench: Bench,
}

#[derive(Subcommand)]
enum Bench {
    /// `vmdisk convert` vs `qemu-img convert`: raw->qcow2, qcow2->raw, compressed zlib and zstd.
    Convert(ConvertArgs),
    /// `vmdisk cat` of /etc/shadow vs `qemu-img convert` + `debugfs -R cat` (8 GiB overlay).
    Ext4 {
        /// The vmdisk binary [default: `vmdisk` next to this program].
        #[arg(long)]
        vmdisk: Option<PathBuf>,
        /// Where the disk is built [default: target/bench-data].
        #[arg(long)]
        dir: Option<PathBuf>,
    },
    /// `vmdisk create --layout --copy-in` vs truncate + sgdisk + mkfs + dd + qemu-img convert;
    /// disko's btrfs-subvolumes and luks-lvm examples vs disko's own `_create` in a VM.
    Layout(LayoutArgs),
    /// `vmdisk serve` vs `qemu-nbd`: nbdcopy full/sparse/dense reads, random 4 KiB reads.
    Nbd(NbdArgs),
    /// `vmdisk commit/rebase/copy` vs `qemu-img commit/rebase` and `cp --reflink=auto`.
    Overlay(OverlayArgs),
    /// `vmdisk resize +20G` vs `qemu-img resize +20G` of an 8 GiB qcow2 with data, and
    /// `--grow-fs +20G` vs qemu-img resize + convert + resize2fs + convert.
    Resize(ResizeArgs),
}

#[derive(Args)]
struct ResizeArgs {
    /// Timed runs per side and case (best and median are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where the image is cached and the work is done [default: target/bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The vmdisk binary [default: `vmdisk` next to this program].
    #[arg(long)]
    vmdisk: Option<PathBuf>,
    /// Smoke run: 1 GiB qcow2 with 64 MiB of data.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct OverlayArgs {
    /// Timed runs per side and case (best and median are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seed of the base image's generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where images are cached and the work is done [default: target/bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The vmdisk binary [default: `vmdisk` next to this program].
    #[arg(long)]
    vmdisk: Option<PathBuf>,
    /// Smoke run: 256 MiB base with 128 MiB of data.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct LayoutArgs {
    /// Timed runs per side (best and median are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seed of the copy-in tree.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the tree is cached and outputs written [default: target/bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The vmdisk binary [default: `vmdisk` next to this program].
    #[arg(long)]
    vmdisk: Option<PathBuf>,
    /// Smoke run: 1 GiB disk (ESP 64M, swap 64M), 20 MiB of content.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON instead of Markdown.
    #[arg(long)]
    json: bool,
    /// disko's evaluated examples (the folder holding json/) [default: ../shared/corpus/disko
    /// next to the project].
    #[arg(long)]
    corpus: Option<PathBuf>,
}

#[derive(Args)]
struct NbdArgs {
    /// Timed runs per server and line (best and median are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Virtual size of the generated image [default: 2G; --quick 256M].
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Bytes of data in the generated image [default: 1G; --quick 128M].
    #[arg(long, value_parser = parse_size)]
    data: Option<u64>,
    /// Random 4 KiB reads per run [default: 20000; --quick 2000].
    #[arg(long)]
    reads: Option<u64>,
    /// Seed of the image generator and the random offsets.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Where the image is cached and sockets live [default: target/bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The vmdisk binary [default: `vmdisk` next to this program].
    #[arg(long)]
    vmdisk: Option<PathBuf>,
    /// Smoke run: smaller image and fewer random reads.
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON instead of Markdown.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ConvertArgs {
    /// Virtual size of the generated source image (K/M/G/T suffixes, binary units).
    #[arg(long, value_parser = parse_size)]
    size: Option<u64>,
    /// Bytes of data written into the source (explicit zero runs included).
    #[arg(long, value_parser = parse_size)]
    data: Option<u64>,
    /// Seed of the source image generator.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Timed runs per tool and case (best and median are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Where source images are cached and outputs written [default: target/bench-data].
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The vmdisk binary [default: `vmdisk` next to this program].
    #[arg(long)]
    vmdisk: Option<PathBuf>,
    /// Smoke run: 1 GiB virtual, 200 MiB data (unless --size/--data say otherwise).
    #[arg(long)]
    quick: bool,
    /// Print the results as JSON instead of a Markdown table.
    #[arg(long)]
    json: bool,
    /// Also time qemu-img with `-m 8 -W` (parallel, out-of-order writes) as extra rows.
    #[arg(long)]
    qemu_parallel: bool,
    /// Only the cases whose name contains this (repeatable), e.g. `--case zstd`.
    #[arg(long = "case")]
    cases: Vec<String>,
}

fn main() -> Result<()> {
    match Cli::parse().bench {
        Bench::Convert(args) => convert(args),
        Bench::Ext4 { vmdisk, dir } => {
            let (exe_vmdisk, exe_dir) = locate(vmdisk, dir)?;
            ext4::bench(&exe_vmdisk, &exe_dir)
        }
        Bench::Layout(a) => {
            let (vmdisk, dir) = locate(a.vmdisk, a.dir)?;
            let report = layout::bench(&layout::Options {
                vmdisk: &vmdisk,
                dir: &dir,
                runs: a.runs,
                quick: a.quick,
                seed: a.seed,
                corpus: &a.corpus.unwrap_or_else(disko_vm::default_corpus),
            })?;
            print_report(&report, a.json, report.markdown(), report.failed())
        }
        Bench::Resize(a) => {
            let (vmdisk, dir) = locate(a.vmdisk, a.dir)?;
            let report = resize::bench(&resize::Options {
                vmdisk: &vmdisk,
                dir: &dir,
                runs: a.runs,
                quick: a.quick,
            })?;
            print_report(&report, a.json, report.markdown(), report.failed())
        }
        Bench::Overlay(a) => {
            let (vmdisk, dir) = locate(a.vmdisk, a.dir)?;
            let report = overlay::bench(&overlay::Options {
                vmdisk: &vmdisk,
                dir: &dir,
                runs: a.runs,
                quick: a.quick,
                seed: a.seed,
            })?;
            print_report(&report, a.json, report.markdown(), report.failed())
        }
        Bench::Nbd(a) => {
            let (vmdisk, dir) = locate(a.vmdisk, a.dir)?;
            let report = nbd::bench(&nbd::Options {
                vmdisk: &vmdisk,
                dir: &dir,
                runs: a.runs,
                quick: a.quick,
                seed: a.seed,
                reads: a.reads,
                size: a.size,
                data: a.data,
            })?;
            print_report(&report, a.json, report.markdown(), report.failed())
        }
    }
}

/// Print JSON or Markdown; exit non-zero when vmdisk failed or was wrong.
fn print_report(
    report: &impl serde::Serialize,
    json: bool,
    md: String,
    failed: bool,
) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        print!("{md}");
    }
    if failed {
        eprintln!("\n!!!! vmdisk FAILED (error, wrong output, or unclean exit): see the report");
        std::process::exit(1);
    }
    Ok(())
}

/// The vmdisk binary and the data directory, defaulting to target/release and target/bench-data.
fn locate(vmdisk: Option<PathBuf>, dir: Option<PathBuf>) -> Result<(PathBuf, PathBuf)> {
    let exe_dir = std::env::current_exe()
        .context("locating the benches binary")?
        .parent()
        .context("the benches binary has no parent directory")?
        .to_path_buf();
    let vmdisk = vmdisk.unwrap_or_else(|| exe_dir.join("vmdisk"));
    if !vmdisk.is_file() {
        bail!(
            "vmdisk binary not found at {}; build it with `cargo build --release -p vmdisk` \
             (or run `cargo xtask bench ...`, which builds both) or pass --vmdisk PATH",
            vmdisk.display()
        );
    }
    let dir = dir.unwrap_or_else(|| match exe_dir.parent() {
        Some(target) => target.join("bench-data"),
        None => PathBuf::from("target/bench-data"),
    });
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok((vmdisk, dir))
}

fn convert(args: ConvertArgs) -> Result<()> {
    let (vmdisk, dir) = locate(args.vmdisk, args.dir)?;
    let qemu_version = run::qemu_img_version()?;
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }

    let (size, data) = if args.quick {
        (1 << 30, 200 << 20)
    } else {
        (8 << 30, 1536 << 20)
    };
    let spec = gen::Spec {
        virtual_size: args.size.unwrap_or(size),
        data: args.data.unwrap_or(data),
        seed: args.seed,
    };
    let source = gen::ensure(&dir, &spec)?;

    let mut cases = run::cases(args.qemu_parallel);
    if !args.cases.is_empty() {
        cases.retain(|c| args.cases.iter().any(|want| c.name.contains(want.as_str())));
        if cases.is_empty() {
            bail!("no case matches --case {:?}", args.cases);
        }
    }
    let setup = run::Setup {
        vmdisk: &vmdisk,
        dir: &dir,
        source: &source,
        runs: args.runs,
    };
    let mut rows = Vec::new();
    for case in &cases {
        rows.push(run::run_case(&setup, case)?);
    }

    let report = report::Report::new(&source, &qemu_version, &vmdisk, args.runs, rows);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.markdown());
    }
    let failed = report.failed_cases();
    if !failed.is_empty() {
        eprintln!(
            "\n!!!! vmdisk FAILED (error or wrong output) in: {}",
            failed.join(", ")
        );
        std::process::exit(1);
    }
    Ok(())
}

/// "8G", "1.5G", "200M", "4096" -> bytes (binary units; "GiB"/"GB" spellings accepted).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => return Err(format!("unknown size suffix in `{s}`")),
            };
            (&t[..i], shift)
        }
        _ => (t, 0),
    };
    let n: f64 = num.parse().map_err(|_| format!("bad size `{s}`"))?;
    if !n.is_finite() || n < 0.0 {
        return Err(format!("bad size `{s}`"));
    }
    Ok((n * (1u64 << shift) as f64).round() as u64)
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1.5G"), Ok(1536 << 20));
        assert_eq!(parse_size("200MiB"), Ok(200 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("512"), Ok(512));
        assert!(parse_size("1X").is_err());
        assert!(parse_size("G").is_err());
    }
}
