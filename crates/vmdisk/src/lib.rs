//! The `vmdisk` command line: clap definitions and thin glue onto the libraries.
//!
//! Subcommands and flags follow DESIGN.md's CLI contract and mean what they mean in
//! qemu-img (`-f`, `-O`, `-o`, `-b`, `-F`, `-c`, `-p`, `-U`). Errors print as
//! `vmdisk: error: ...` with their cause chain and a hint; exit codes are per command and
//! listed in [`EXIT_STATUS`] (check: 0 clean / 1 errors / 2 corruptions / 3 leaks / 63 raw;
//! compare: 0 same / 1 different / 2 error; everything else 0 / 1; usage errors 1; an
//! interrupted command 128 + the signal, after it removed its partial output).

mod copy;
mod guest;
mod layout;
mod overlay;
mod part;
mod passwd;
mod rescue;
mod serve;
mod signals;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};
use vmdisk_image::{
    CheckOutcome, ConvertOptions, CreateSpec, Difference, Format, ImageOptions, OpenOptions, Repair,
};

/// The exit statuses, as `--help` and the man page print them.
pub const EXIT_STATUS: &str = "\
Exit status:
  0    success
  1    an error, or a usage error; nothing was left half-written, and an image that was
       being edited in place is as it was before
  2    (compare) an error; (check) the image has corruptions
  3    (check) the image has leaked clusters only
  63   (check) the image format does not support checks (raw)
  130  interrupted by Ctrl-C (SIGINT); 143 by SIGTERM; 129 by SIGHUP: the partial output
       was removed and an edited image put back as it was

Nothing is lost: a new file is built under a temporary name beside its destination and
renamed into place at the end; an existing destination is replaced only then. A command
refuses a destination that is one of its own inputs (or in an input's backing chain) or
that a running qemu holds.";

/// Fast, safe VM disk tooling (raw and qcow2 images, qemu-img compatible).
#[derive(Debug, Parser)]
#[command(
    name = "vmdisk",
    version,
    about,
    propagate_version = true,
    after_help = EXIT_STATUS
)]
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

/// The flags every command that opens an image shares: `-f` and `-U`, as in qemu-img.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Read the image even if another process (a running VM) holds it: no locks, and what
    /// is read may be inconsistent.
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
}

impl ImageArgs {
    fn open_options(&self, read_only: bool) -> OpenOptions {
        OpenOptions {
            format: self.format.map(Into::into),
            read_only,
            force_share: self.force_share,
            ..Default::default()
        }
    }
}

/// `--json`, and qemu-img's spelling of it, `--output=json`.
#[derive(Debug, Clone, Args)]
pub struct JsonArgs {
    /// Print JSON (stable, documented fields).
    #[arg(long)]
    pub json: bool,
    /// Output format: human or json (qemu-img's spelling of --json).
    #[arg(long, value_enum, value_name = "FMT")]
    pub output: Option<OutputArg>,
}

impl JsonArgs {
    pub fn is_json(&self) -> bool {
        self.json || self.output == Some(OutputArg::Json)
    }
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
    /// fsync the output before renaming it into place (qemu-img convert does not by default;
    /// either way a partial output never appears under DST).
    #[arg(long)]
    pub sync: bool,
    pub src: PathBuf,
    pub dst: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    #[command(flatten)]
    pub out: JsonArgs,
    /// Describe every image of the backing chain.
    #[arg(long)]
    pub backing_chain: bool,
    #[command(flatten)]
    pub image: ImageArgs,
    pub file: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Exit status: 0 no errors; 1 the check could not be done (or a usage \
error); 2 corruptions found; 3 leaked clusters only; 63 the format has no checks (raw)."
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub out: JsonArgs,
    /// Repair leaked clusters, or everything (as a transaction: a repair that fails half-way
    /// leaves the image as it was).
    #[arg(
        short = 'r',
        value_enum,
        value_name = "leaks|all",
        conflicts_with = "force_share"
    )]
    pub repair: Option<RepairArg>,
    #[command(flatten)]
    pub image: ImageArgs,
    pub file: PathBuf,
}

#[derive(Debug, Args)]
pub struct MapArgs {
    #[command(flatten)]
    pub out: JsonArgs,
    #[command(flatten)]
    pub image: ImageArgs,
    pub file: PathBuf,
}

#[derive(Debug, Args)]
#[command(after_help = "Exit status: 0 identical; 1 different; 2 an error.")]
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

/// Print a line on stdout; a reader that went away (`| head`) is not an error.
macro_rules! say {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($t)*);
    }};
}
pub(crate) use say;

impl Command {
    /// Commands that only read and print: a closed stdout (`vmdisk cat ... | head`) ends them
    /// silently, as it ends cat. Commands that write keep going to a clean end instead.
    fn only_reads(&self) -> bool {
        match self {
            Command::Inspect(_)
            | Command::Map(_)
            | Command::Compare(_)
            | Command::Ls(_)
            | Command::Cat(_)
            | Command::Measure(_)
            | Command::Completions { .. }
            | Command::Man { .. } => true,
            Command::Check(a) => a.repair.is_none(),
            Command::Snapshot(s) => matches!(s.action, SnapshotAction::List { .. }),
            _ => false,
        }
    }

    /// The exit status of a failed run (compare: 2, since 1 means "different").
    fn error_status(&self) -> u8 {
        match self {
            Command::Compare(_) => 2,
            _ => 1,
        }
    }
}

/// Run the CLI with the process arguments.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // qemu-img's usage errors exit 1 (check's 2 means "corruptions").
            return ExitCode::from(match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => 0,
                _ => 1,
            });
        }
    };
    if cli.command.only_reads() {
        // SAFETY: restoring the default disposition of SIGPIPE has no memory effects; Rust's
        // runtime set it to "ignore", which turns `| head` into a stream of EPIPE errors.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    let err_code = cli.command.error_status();
    let json_errors = match &cli.command {
        Command::Check(a) if a.out.is_json() => Some(a.file.clone()),
        _ => None,
    };
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            if let Some(Exit(c)) = e.downcast_ref::<Exit>() {
                return ExitCode::from(*c);
            }
            if is_broken_pipe(&e) {
                return ExitCode::from(err_code);
            }
            eprintln!("vmdisk: error: {e:#}");
            if let Some(h) = hint(&e) {
                eprintln!("hint: {h}");
            }
            if let Some(file) = json_errors {
                // --json promises JSON on stdout, failures included.
                let v = serde_json::json!({
                    "filename": file.display().to_string(),
                    "error": format!("{e:#}"),
                });
                say!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            }
            if let Some(sig) = signals::interrupted_by() {
                return ExitCode::from(128 + sig as u8);
            }
            ExitCode::from(err_code)
        }
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// The hint for EFBIG: the host filesystem's limit on one file, not the image's.
const TOO_LARGE_HINT: &str = "the filesystem there does not allow one file that large; choose \
    a smaller size, or write it to a filesystem that does (XFS, btrfs); nothing was left behind";

/// What to do about an error, when the message does not already say it.
fn hint(e: &anyhow::Error) -> Option<&'static str> {
    for cause in e.chain() {
        if let Some(ie) = cause.downcast_ref::<vmdisk_image::Error>() {
            use vmdisk_image::Error as E;
            match ie {
                E::UnknownFormat { .. } => {
                    return Some("vmdisk reads and writes raw and qcow2; pass -f raw or -f qcow2")
                }
                E::BackingLoop { .. } => {
                    return Some(
                        "fix the backing file name with `vmdisk rebase -u -b NEWBACKING OVERLAY`",
                    )
                }
                // These say what to do themselves.
                E::WrongFormat { .. }
                | E::NotQcow2 { .. }
                | E::MissingBacking { .. }
                | E::CreateLoop { .. }
                | E::RebaseLoop { .. }
                | E::OutputIsInput { .. }
                | E::NoSpace { .. }
                | E::IsADirectory { .. }
                | E::DestinationExists { .. }
                | E::Cancelled { .. } => return None,
                _ => {}
            }
        }
        if let Some(be) = cause.downcast_ref::<vmdisk_block::Error>() {
            match be {
                // The lock message already says what to do.
                vmdisk_block::Error::Locked { .. } | vmdisk_block::Error::Interrupted => {
                    return None
                }
                vmdisk_block::Error::Corrupt { .. } => {
                    return Some(
                        "run `vmdisk check FILE` (and `vmdisk check -r all FILE` to repair)",
                    )
                }
                vmdisk_block::Error::Limit { .. } => {
                    return Some(
                        "the image may be valid but needs more than vmdisk allows itself for \
                         this structure; qemu-img can convert it into a simpler image",
                    )
                }
                vmdisk_block::Error::ReadOnly => return Some("the image was opened read-only"),
                e if e.is_no_space() => {
                    return Some("the disk is full; free some space (nothing was left behind)")
                }
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
                _ if matches!(io.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT)) => {
                    return Some("the disk is full; free some space (nothing was left behind)")
                }
                _ if io.raw_os_error() == Some(libc::EFBIG) => return Some(TOO_LARGE_HINT),
                _ => {}
            }
        }
    }
    None
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

fn print_json<T: serde::Serialize>(v: &T) -> Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, v)?;
    writeln!(out)?;
    Ok(())
}

/// Say so when a qcow2 file is read as raw bytes because of `-f raw` (allowed, as in qemu).
fn warn_raw_view(img: &vmdisk_image::Image, quiet: bool) {
    if img.is_qcow2_read_as_raw() && !quiet {
        eprintln!(
            "vmdisk: note: {} is a qcow2 image; reading its file bytes as raw because of -f raw \
             (leave -f out to read the disk inside it)",
            img.path().display()
        );
    }
}

/// Run one parsed command; returns the exit code.
pub fn run(cli: Cli) -> Result<u8> {
    let quiet = cli.quiet;
    match cli.command {
        Command::Create(a) => create(a, quiet),
        Command::Convert(a) => convert(a, quiet),
        Command::Copy(a) => copy::run(a, quiet),
        Command::Inspect(a) => inspect(a, quiet),
        Command::Check(a) => check(a, quiet),
        Command::Map(a) => map(a, quiet),
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
    let file = a.file.clone();
    create_image(a, quiet).with_context(|| format!("creating {}", file.display()))
}

fn create_image(a: CreateArgs, quiet: bool) -> Result<u8> {
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
    // Every argument is checked before any file is touched.
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
                force_share: true,
                ..OpenOptions::read_only()
            },
        )
        .map(|i| i.len())
        .unwrap_or(0);
        say!("{}", formatting_line(&a.file, &spec, size));
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
    // Before any thread exists, so every thread inherits the blocked signals.
    let cancel = signals::cancel_on_interrupt();
    let options = parse_options(&a.options)?;
    let src = vmdisk_image::open(
        &a.src,
        &OpenOptions {
            format: a.format.map(Into::into),
            read_only: true,
            force_share: a.force_share,
            ..Default::default()
        },
    )?;
    warn_raw_view(&src, quiet);
    let opts = ConvertOptions {
        format: a.output_format.into(),
        compress: a.compress,
        options,
        threads: None,
        sync: a.sync,
        cancel,
    };
    let pb = progress_bar(a.progress && !quiet);
    let report = report_to(&pb);
    vmdisk_image::convert(&src, &a.dst, &opts, &report)?;
    if let Some(pb) = &pb {
        pb.finish();
    }
    Ok(0)
}

fn inspect(a: InspectArgs, quiet: bool) -> Result<u8> {
    let opts = OpenOptions {
        no_backing: true,
        ..a.image.open_options(true)
    };
    let infos = match vmdisk_image::info(&a.file, &opts, a.backing_chain) {
        Ok(i) => i,
        Err(e) => {
            // A layer of the chain that cannot be opened: opening the chain the way every
            // other command does names the overlay whose backing file is missing.
            if a.backing_chain && !matches!(e, vmdisk_image::Error::BackingLoop { .. }) {
                let chain = OpenOptions {
                    force_share: true,
                    ..a.image.open_options(true)
                };
                if let Err(named @ vmdisk_image::Error::MissingBacking { .. }) =
                    vmdisk_image::open(&a.file, &chain)
                {
                    return Err(named.into());
                }
            }
            return Err(e.into());
        }
    };
    // What the guest sees: partition table and filesystems (vmdisk's addition to qemu's info).
    let guest = layout::describe(&a.file, a.image.format.map(Into::into), a.image.force_share);
    if let (Err(e), false) = (&guest, quiet) {
        eprintln!("vmdisk: warning: cannot look inside the image: {e:#}");
    }
    if a.out.is_json() {
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
        let mut out = std::io::stdout().lock();
        write!(out, "{}", text.join("\n"))?;
        if let Ok(g) = &guest {
            write!(out, "{}", layout::describe_human(g))?;
        }
    }
    Ok(0)
}

/// qemu-img check's exit status for a format without checks.
const CHECK_UNSUPPORTED: u8 = 63;

fn check(a: CheckArgs, quiet: bool) -> Result<u8> {
    let repair = match a.repair {
        None => Repair::None,
        Some(RepairArg::Leaks) => Repair::Leaks,
        Some(RepairArg::All) => Repair::All,
    };
    let opts = a.image.open_options(a.repair.is_none());
    let outcome: Option<CheckOutcome> = vmdisk_image::check(&a.file, &opts, repair)
        .with_context(|| format!("checking {}", a.file.display()))?;
    let Some(o) = outcome else {
        // qemu-img's message and status, whatever the output format.
        eprintln!("vmdisk: This image format does not support checks");
        if a.out.is_json() {
            let v = serde_json::json!({
                "filename": a.file.display().to_string(),
                "format": "raw",
                "error": "This image format does not support checks",
            });
            print_json(&v)?;
        }
        return Ok(CHECK_UNSUPPORTED);
    };
    if a.out.is_json() {
        print_json(&o)?;
    } else {
        // qemu-img's order and streams: each problem on stderr, then the report on stdout.
        for m in &o.messages {
            eprintln!("{m}");
        }
        if !quiet {
            print!("{}", o.human());
        }
    }
    Ok(o.exit_code() as u8)
}

fn map(a: MapArgs, quiet: bool) -> Result<u8> {
    let img = vmdisk_image::open(&a.file, &a.image.open_options(true))?;
    warn_raw_view(&img, quiet);
    let entries = vmdisk_image::map(&img)?;
    let mut out = std::io::stdout().lock();
    if a.out.is_json() {
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
    let ro = |format: Option<FormatArg>| OpenOptions {
        format: format.map(Into::into),
        read_only: true,
        force_share: a.force_share,
        ..Default::default()
    };
    let ia = vmdisk_image::open(&a.a, &ro(a.format_a))?;
    let ib = vmdisk_image::open(&a.b, &ro(a.format_b))?;
    warn_raw_view(&ia, quiet);
    warn_raw_view(&ib, quiet);
    let pb = progress_bar(a.progress && !quiet);
    let report = report_to(&pb);
    let c = vmdisk_image::compare_with_progress(&ia, &ib, a.strict, &report)?;
    if let Some(pb) = &pb {
        pb.finish_and_clear();
    }
    if c.size_mismatch && !a.strict && !quiet {
        say!("Warning: Image size mismatch!");
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
        say!("{msg}");
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
                    force_share,
                    ..OpenOptions::read_only()
                },
            )?;
            let list = vmdisk_image::snapshot_list(&img)?;
            print!("Snapshot list:\n{}", vmdisk_image::snapshot_table(&list));
        }
        SnapshotAction::Create { file, name } => {
            let img = open_transaction(&file)?;
            vmdisk_image::snapshot_create(&img, &name)?;
            img.close()?;
        }
        SnapshotAction::Apply { file, name } => {
            let img = open_transaction(&file)?;
            vmdisk_image::snapshot_apply(&img, &name)?;
            img.close()?;
        }
        SnapshotAction::Delete { file, name } => {
            let img = open_transaction(&file)?;
            vmdisk_image::snapshot_delete(&img, &name)?;
            img.close()?;
        }
    }
    Ok(0)
}

/// Open an image to change it in place, as a transaction (an error leaves it as it was).
fn open_transaction(file: &Path) -> Result<vmdisk_image::Image> {
    let img = vmdisk_image::open(file, &OpenOptions::transaction())?;
    img.require_qcow2("snapshot")?;
    Ok(img)
}
