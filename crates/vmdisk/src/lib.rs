//! The `vmdisk` command line: clap definitions and thin glue onto `vmdisk-image`.
//!
//! Subcommands and flags follow DESIGN.md's CLI contract and mean what they mean in
//! qemu-img (`-f`, `-O`, `-o`, `-b`, `-F`, `-c`, `-p`, `-U`). Errors print as
//! `vmdisk: error: ...` with their cause chain and a hint; exit codes are per command
//! (check: 0 clean / 1 errors / 2 corruptions / 3 leaks; compare: 0 same / 1 different /
//! 2 error; everything else 0 / 1).

mod copy;
mod guest;
mod layout;
mod overlay;
mod part;
mod passwd;
mod rescue;
mod serve;
#[allow(dead_code)] // adopted command by command (issue #12)
mod signals;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use vmdisk_image::{
    CheckOutcome, ConvertOptions, CreateSpec, Difference, Format, ImageOptions, OpenOptions, Repair,
};

/// Fast, safe VM disk tooling (raw and qcow2 images, qemu-img compatible).
#[derive(Debug, Parser)]
#[command(name = "vmdisk", version, about, propagate_version = true)]
pub struct Cli {
    /// Print nothing but errors (and requested output).
    #[arg(short, long, global = true)]
    pub quiet: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum FormatArg {
    Raw,
    Qcow2,
}

impl From<FormatArg> for Format {
    fn from(f: FormatArg) -> Self {
        match f {
            FormatArg::Raw => Format::Raw,
            FormatArg::Qcow2 => Format::Qcow2,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RepairArg {
    Leaks,
    All,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputArg {
    Human,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create a raw or qcow2 image (like qemu-img create).
    Create(CreateArgs),
    /// Copy an image into a new raw or qcow2 image, sparsely (like qemu-img convert).
    Convert(ConvertArgs),
    /// Copy an image file: reflink when the filesystem can, sparse otherwise; `--qmp` copies a
    /// running VM's disk consistently.
    Copy(copy::CopyArgs),
    /// Show what an image is: format, sizes, backing file, snapshots (like qemu-img info).
    Inspect(InspectArgs),
    /// Check a qcow2 image's metadata, optionally repairing it (like qemu-img check).
    Check(CheckArgs),
    /// Show where the guest data of an image lives (like qemu-img map).
    Map(MapArgs),
    /// Compare the guest contents of two images (like qemu-img compare).
    Compare(CompareArgs),
    /// Create, list, apply or delete internal snapshots of a qcow2 image.
    Snapshot(SnapshotArgs),
    /// Write an overlay's contents into its backing file and empty it (like qemu-img commit).
    Commit(overlay::CommitArgs),
    /// Point an overlay at another backing file, keeping what the guest sees (like qemu-img
    /// rebase).
    Rebase(overlay::RebaseArgs),
    /// List files in a guest filesystem (ext4 inside the image, no root needed).
    Ls(guest::LsArgs),
    /// Print a file from a guest filesystem.
    Cat(guest::CatArgs),
    /// Copy a file or directory tree out of a guest filesystem, keeping modes and times.
    #[command(name = "cp-out")]
    CpOut(guest::CpOutArgs),
    /// Set, unlock or restore a user's password in the guest's /etc/shadow, safely.
    Passwd(passwd::PasswdArgs),
    /// Export an image (or one partition) over NBD for qemu, nbdcopy, vfkit or the kernel.
    Serve(serve::ServeArgs),
    /// Boot a rescue VM with the image attached over NBD and run a command (or a console
    /// shell) in it: the guest kernel's full ext4, journal replay included.
    Rescue(rescue::RescueArgs),
    /// How big a disk built from a layout must be (JSON).
    Measure(MeasureArgs),
    /// Print a shell completion script.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (or write one page per subcommand with --out-dir).
    Man {
        /// Write vmdisk.1 and vmdisk-SUBCOMMAND.1 into this directory.
        #[arg(long, value_name = "DIR")]
        out_dir: Option<PathBuf>,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// Image format.
    #[arg(short = 'f', value_enum, default_value = "raw", value_name = "FMT")]
    pub format: FormatArg,
    /// Format options: cluster_size=64k,compression_type=zlib|zstd,lazy_refcounts=on,
    /// preallocation=off|metadata|falloc|full,refcount_bits=16,compat=0.10|1.1,extended_l2=on
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Backing file (qcow2 only); relative names are relative to FILE's directory.
    #[arg(short = 'b', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of the backing file (probed when not given).
    #[arg(short = 'F', value_enum, value_name = "FMT", requires = "backing")]
    pub backing_format: Option<FormatArg>,
    #[command(flatten)]
    pub layout: layout::LayoutArgs,
    pub file: PathBuf,
    /// Virtual size in bytes, or with a k, M, G, T suffix (default: the backing file's size,
    /// or the layout's imageSize); `auto` with --layout: just big enough for the content.
    pub size: Option<String>,
}

#[derive(Debug, Args)]
pub struct MeasureArgs {
    #[command(flatten)]
    pub layout: layout::LayoutArgs,
    /// Print JSON (the only output form for now).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Output format.
    #[arg(short = 'O', value_enum, value_name = "FMT")]
    pub output_format: FormatArg,
    /// Compress the output (qcow2).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Output format options (see `vmdisk create -o`).
    #[arg(short = 'o', value_name = "OPTIONS")]
    pub options: Vec<String>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Read the source even if another process holds it (no locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// fsync the output before exiting (qemu-img convert does not by default).
    #[arg(long)]
    pub sync: bool,
    pub src: PathBuf,
    pub dst: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// Print qemu-img info --output=json.
    #[arg(long)]
    pub json: bool,
    /// Output format (qemu-img spelling of --json).
    #[arg(long, value_enum, value_name = "FMT", hide = true)]
    pub output: Option<OutputArg>,
    /// Describe every image of the backing chain.
    #[arg(long)]
    pub backing_chain: bool,
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Read the image even if another process holds it (no locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Print qemu-img check --output=json.
    #[arg(long)]
    pub json: bool,
    /// Output format (qemu-img spelling of --json).
    #[arg(long, value_enum, value_name = "FMT", hide = true)]
    pub output: Option<OutputArg>,
    /// Repair leaked clusters, or everything.
    #[arg(short = 'r', value_enum, value_name = "leaks|all")]
    pub repair: Option<RepairArg>,
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Read the image even if another process holds it (no locks; not with -r).
    #[arg(short = 'U', long = "force-share", conflicts_with = "repair")]
    pub force_share: bool,
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct MapArgs {
    /// Print qemu-img map --output=json.
    #[arg(long)]
    pub json: bool,
    /// Output format (qemu-img spelling of --json).
    #[arg(long, value_enum, value_name = "FMT", hide = true)]
    pub output: Option<OutputArg>,
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Read the image even if another process holds it (no locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Strict: sizes and allocation must match too.
    #[arg(short = 's')]
    pub strict: bool,
    /// Format of A (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format_a: Option<FormatArg>,
    /// Format of B (probed when not given).
    #[arg(short = 'F', value_enum, value_name = "FMT")]
    pub format_b: Option<FormatArg>,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// Read the images even if another process holds them (no locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    pub a: PathBuf,
    pub b: PathBuf,
}

#[derive(Debug, Args)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub action: SnapshotAction,
}

#[derive(Debug, Subcommand)]
pub enum SnapshotAction {
    /// Take an internal snapshot.
    Create { file: PathBuf, name: String },
    /// List internal snapshots.
    List {
        file: PathBuf,
        /// Read the image even if another process holds it (no locks).
        #[arg(short = 'U', long = "force-share")]
        force_share: bool,
    },
    /// Revert the image to a snapshot (by name or id).
    Apply { file: PathBuf, name: String },
    /// Delete a snapshot (by name or id).
    Delete { file: PathBuf, name: String },
}

/// A failure that already printed its message and carries its exit code.
#[derive(Debug)]
struct Exit(u8);

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "exit {}", self.0)
    }
}
impl std::error::Error for Exit {}

/// Run the CLI with the process arguments.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // compare reports errors with 2 (1 means "different").
    let err_code = match cli.command {
        Command::Compare(_) => 2,
        _ => 1,
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if let Some(Exit(c)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*c);
            }
            eprintln!("vmdisk: error: {e:#}");
            if let Some(h) = hint(&e) {
                eprintln!("hint: {h}");
            }
            ExitCode::from(err_code)
        }
    }
}

/// What to do about an error, when we can tell.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    for cause in e.chain() {
        if let Some(ie) = cause.downcast_ref::<vmdisk_image::Error>() {
            match ie {
                vmdisk_image::Error::UnknownFormat { .. } => {
                    return Some("vmdisk reads and writes raw and qcow2; pass -f raw or -f qcow2")
                }
                vmdisk_image::Error::BackingLoop { .. } => {
                    return Some(
                        "fix the backing file name with `vmdisk rebase -u -b NEWBACKING OVERLAY`",
                    )
                }
                _ => {}
            }
        }
        if let Some(be) = cause.downcast_ref::<vmdisk_block::Error>() {
            match be {
                // The lock message already says what to do.
                vmdisk_block::Error::Locked { .. } => return None,
                vmdisk_block::Error::Corrupt { .. } | vmdisk_block::Error::Limit { .. } => {
                    return Some(
                        "run `vmdisk check FILE` (and `vmdisk check -r all FILE` to repair)",
                    )
                }
                vmdisk_block::Error::ReadOnly => return Some("the image was opened read-only"),
                _ => {}
            }
        }
        if let Some(io) = cause.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::NotFound => {
                    return Some("check the file name and that it exists")
                }
                std::io::ErrorKind::PermissionDenied => {
                    return Some("check the file's permissions (or run as its owner)")
                }
                _ => {}
            }
        }
    }
    None
}

fn open_opts(format: Option<FormatArg>, read_only: bool, force_share: bool) -> OpenOptions {
    OpenOptions {
        format: format.map(Into::into),
        read_only,
        force_share,
        no_backing: false,
    }
}

fn parse_options(opts: &[String]) -> Result<ImageOptions> {
    let mut o = ImageOptions::default();
    for s in opts {
        o.merge(s)?;
    }
    Ok(o)
}

/// The `(done, total)` callback the libraries take, drawing on `pb` when there is one.
fn report_to(pb: &Option<indicatif::ProgressBar>) -> impl Fn(u64, u64) + '_ {
    move |done, total| {
        if let Some(pb) = pb {
            pb.set_length(total);
            pb.set_position(done);
        }
    }
}

fn progress_bar(enabled: bool) -> Option<indicatif::ProgressBar> {
    if !enabled {
        return None;
    }
    let pb =
        indicatif::ProgressBar::with_draw_target(Some(0), indicatif::ProgressDrawTarget::stderr());
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{elapsed_precise} [{wide_bar}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec}",
    ) {
        pb.set_style(style);
    }
    Some(pb)
}

fn is_json(json: bool, output: Option<OutputArg>) -> bool {
    json || output == Some(OutputArg::Json)
}

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Run one parsed command; returns the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Create(a) => create(a, quiet),
        Command::Convert(a) => convert(a, quiet),
        Command::Copy(a) => copy::run(a, quiet),
        Command::Inspect(a) => inspect(a),
        Command::Check(a) => check(a),
        Command::Map(a) => map(a),
        Command::Compare(a) => compare(a, quiet),
        Command::Snapshot(a) => snapshot(a),
        Command::Measure(a) => layout::measure(&a.layout),
        Command::Commit(a) => overlay::commit(a, quiet),
        Command::Rebase(a) => overlay::rebase(a, quiet),
        Command::Ls(a) => guest::ls(a),
        Command::Cat(a) => guest::cat(a),
        Command::CpOut(a) => guest::cp_out(a, quiet),
        Command::Passwd(a) => passwd::passwd(a, quiet),
        Command::Serve(a) => serve::run(a, quiet),
        Command::Rescue(a) => rescue::run(a, quiet),
        Command::Completions { shell } => {
            let mut cmd = Cli::command();
            clap_complete::generate(shell, &mut cmd, "vmdisk", &mut std::io::stdout());
            Ok(0)
        }
        Command::Man { out_dir } => {
            let cmd = Cli::command();
            match out_dir {
                Some(dir) => {
                    std::fs::create_dir_all(&dir)
                        .with_context(|| format!("creating {}", dir.display()))?;
                    clap_mangen::generate_to(cmd, &dir)
                        .with_context(|| format!("writing man pages to {}", dir.display()))?;
                }
                None => clap_mangen::Man::new(cmd).render(&mut std::io::stdout())?,
            }
            Ok(0)
        }
    }
}

fn create(a: CreateArgs, quiet: bool) -> Result<u8> {
    if a.layout.layout.is_some() {
        if a.backing.is_some() {
            anyhow::bail!("--layout builds a whole disk; it cannot have a backing file (-b)");
        }
        return layout::create(
            &a.layout,
            &a.file,
            a.format.into(),
            parse_options(&a.options)?,
            a.size.as_deref(),
            quiet,
        );
    }
    let size = a
        .size
        .as_deref()
        .map(vmdisk_image::parse_size)
        .transpose()?;
    let spec = CreateSpec {
        format: a.format.into(),
        size,
        options: parse_options(&a.options)?,
        backing_file: a.backing.clone(),
        backing_format: a.backing_format.map(Into::into),
    };
    vmdisk_image::create(&a.file, &spec)?;
    if !quiet {
        let size = vmdisk_image::open(
            &a.file,
            &OpenOptions {
                no_backing: true,
                ..OpenOptions::read_only()
            },
        )
        .map(|i| i.len())
        .unwrap_or(0);
        println!("{}", formatting_line(&a.file, &spec, size));
    }
    Ok(0)
}

/// qemu-img create's "Formatting ..." line.
fn formatting_line(file: &Path, spec: &CreateSpec, size: u64) -> String {
    let mut s = format!("Formatting '{}', fmt={}", file.display(), spec.format);
    if spec.format == Format::Qcow2 {
        let o = spec.options.qcow2_create_options(size);
        s += &format!(
            " cluster_size={} extended_l2={} compression_type={}",
            o.cluster_size,
            if o.extended_l2 { "on" } else { "off" },
            format!("{:?}", o.compression).to_lowercase()
        );
    }
    s += &format!(" size={size}");
    if let Some(b) = &spec.backing_file {
        s += &format!(" backing_file={b}");
        if let Some(f) = spec.backing_format {
            s += &format!(" backing_fmt={f}");
        }
    }
    if spec.format == Format::Qcow2 {
        let o = spec.options.qcow2_create_options(size);
        s += &format!(
            " lazy_refcounts={} refcount_bits={}",
            if o.lazy_refcounts { "on" } else { "off" },
            o.refcount_bits
        );
    }
    s
}

fn convert(a: ConvertArgs, quiet: bool) -> Result<u8> {
    let src = vmdisk_image::open(&a.src, &open_opts(a.format, true, a.force_share))?;
    let opts = ConvertOptions {
        format: a.output_format.into(),
        compress: a.compress,
        options: parse_options(&a.options)?,
        threads: None,
        sync: a.sync,
    };
    let pb = progress_bar(a.progress && !quiet);
    let report = report_to(&pb);
    vmdisk_image::convert(&src, &a.dst, &opts, &report)?;
    if let Some(pb) = &pb {
        pb.finish();
    }
    Ok(0)
}

fn inspect(a: InspectArgs) -> Result<u8> {
    let opts = OpenOptions {
        no_backing: true,
        ..open_opts(a.format, true, a.force_share)
    };
    let infos = vmdisk_image::info(&a.file, &opts, a.backing_chain)?;
    // What the guest sees: partition table and filesystems (vmdisk's addition to qemu's info).
    let guest = layout::describe(&a.file, a.format.map(Into::into), a.force_share);
    if let Err(e) = &guest {
        eprintln!("vmdisk: warning: cannot look inside the image: {e:#}");
    }
    if is_json(a.json, a.output) {
        let mut values = Vec::new();
        for (i, info) in infos.iter().enumerate() {
            let mut v = serde_json::to_value(info)?;
            if let (0, Some(obj), Ok(serde_json::Value::Object(g))) = (i, v.as_object_mut(), &guest)
            {
                obj.extend(g.clone());
            }
            values.push(v);
        }
        if a.backing_chain {
            print_json(&values)?;
        } else if let Some(v) = values.first() {
            print_json(v)?;
        }
    } else {
        let text: Vec<String> = infos.iter().map(|i| i.human()).collect();
        print!("{}", text.join("\n"));
        if let Ok(g) = &guest {
            print!("{}", layout::describe_human(g));
        }
    }
    Ok(0)
}

fn check(a: CheckArgs) -> Result<u8> {
    let repair = match a.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let opts = open_opts(a.format, a.repair.is_none(), a.force_share);
    let outcome: Option<CheckOutcome> = vmdisk_image::check(&a.file, &opts, repair)?;
    let Some(o) = outcome else {
        println!("raw images have no metadata to check");
        return Ok(0);
    };
    if is_json(a.json, a.output) {
        print_json(&o)?;
    } else {
        print!("{}", o.human());
    }
    Ok(o.exit_code() as u8)
}

fn map(a: MapArgs) -> Result<u8> {
    let img = vmdisk_image::open(&a.file, &open_opts(a.format, true, a.force_share))?;
    let entries = vmdisk_image::map(&img)?;
    let mut out = std::io::stdout().lock();
    if is_json(a.json, a.output) {
        // qemu-img's layout: one entry per line.
        write!(out, "[")?;
        for (i, e) in entries.iter().enumerate() {
            let sep = if i + 1 == entries.len() { "]" } else { "," };
            let j = serde_json::to_string(e)?
                .replace("\":", "\": ")
                .replace(",\"", ", \"")
                .replacen('{', "{ ", 1);
            writeln!(out, "{j}{sep}")?;
        }
        if entries.is_empty() {
            writeln!(out, "]")?;
        }
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )?;
        for e in entries.iter().filter(|e| e.data && !e.zero) {
            let off = e.offset.with_context(|| {
                format!(
                    "{}: the range at {:#x} is compressed and has no host offset (use --json)",
                    a.file.display(),
                    e.start
                )
            })?;
            let file = img
                .chain()
                .get(e.depth as usize)
                .map(|l| l.path.display().to_string())
                .unwrap_or_default();
            writeln!(
                out,
                "{:<16}{:<16}{:<16}{file}",
                hex(e.start),
                hex(e.length),
                hex(off)
            )?;
        }
    }
    Ok(0)
}

/// C's `%#x`: 0 has no prefix.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".to_string()
    } else {
        format!("{v:#x}")
    }
}

fn compare(a: CompareArgs, quiet: bool) -> Result<u8> {
    let ia = vmdisk_image::open(&a.a, &open_opts(a.format_a, true, a.force_share))?;
    let ib = vmdisk_image::open(&a.b, &open_opts(a.format_b, true, a.force_share))?;
    let pb = progress_bar(a.progress && !quiet);
    let report = report_to(&pb);
    let c = vmdisk_image::compare_with_progress(&ia, &ib, a.strict, &report)?;
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if c.size_mismatch && !a.strict && !quiet {
        println!("Warning: Image size mismatch!");
    }
    let msg = match c.difference {
        None => "Images are identical.".to_string(),
        Some(Difference::Content { offset }) => format!("Content mismatch at offset {offset}!"),
        Some(Difference::Size) => "Strict mode: Image size mismatch!".to_string(),
        Some(Difference::BlockStatus { offset }) => {
            format!("Strict mode: Offset {offset} block status mismatch!")
        }
    };
    if !quiet {
        println!("{msg}");
    }
    Ok(if c.identical() { 0 } else { 1 })
}

fn snapshot(a: SnapshotArgs) -> Result<u8> {
    match a.action {
        SnapshotAction::List { file, force_share } => {
            let img = vmdisk_image::open(
                &file,
                &OpenOptions {
                    no_backing: true,
                    ..open_opts(None, true, force_share)
                },
            )?;
            let list = vmdisk_image::snapshot_list(&img)?;
            print!("Snapshot list:\n{}", vmdisk_image::snapshot_table(&list));
        }
        SnapshotAction::Create { file, name } => {
            let img = open_rw(&file)?;
            vmdisk_image::snapshot_create(&img, &name)?;
            img.close()?;
        }
        SnapshotAction::Apply { file, name } => {
            let img = open_rw(&file)?;
            vmdisk_image::snapshot_apply(&img, &name)?;
            img.close()?;
        }
        SnapshotAction::Delete { file, name } => {
            let img = open_rw(&file)?;
            vmdisk_image::snapshot_delete(&img, &name)?;
            img.close()?;
        }
    }
    Ok(0)
}

fn open_rw(file: &Path) -> Result<vmdisk_image::Image> {
    Ok(vmdisk_image::open(file, &open_opts(None, false, false))?)
}
