//! The `vmdisk` command line: clap definitions and thin glue onto the libraries.
//!
//! Subcommands and flags follow DESIGN.md's CLI contract and mean what they mean in
//! qemu-img (`-f`, `-O`, `-o`, `-b`, `-F`, `-c`, `-p`, `-U`). Errors print as
//! `vmdisk: error: ...` with their cause chain and a hint; exit codes are per command and
//! listed in [`EXIT_STATUS`] (check: 0 clean / 1 errors / 2 corruptions / 3 leaks / 63 raw;
//! compare: 0 same / 1 different / 2 error; everything else 0 / 1; usage errors 1; an
//! interrupted command 128 + the signal, after it removed its partial output).

mod builder;
mod copy;
mod doctor;
mod editor;
mod growfs;
mod guest;
mod layout;
mod overlay;
mod part;
mod passwd;
mod rescue;
mod serve;
mod signals;
mod vmtest;

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
    /// Show what an image is: format, sizes, backing file, snapshots (like qemu-img info;
    /// `vmdisk info` is the same command).
    #[command(visible_alias = "info")]
    Inspect(InspectArgs),
    /// Check a qcow2 image's metadata, optionally repairing it (like qemu-img check).
    Check(CheckArgs),
    /// Show where the guest data of an image lives (like qemu-img map).
    Map(MapArgs),
    /// Compare the guest contents of two images (like qemu-img compare).
    Compare(CompareArgs),
    /// Create, list, apply or delete internal snapshots of a qcow2 image (subcommands, or
    /// qemu-img's -l / -c NAME / -a NAME / -d NAME).
    Snapshot(SnapshotArgs),
    /// Grow or shrink an image's virtual size in place (like qemu-img resize); with --grow-fs
    /// also the last partition and the ext4 inside (otherwise they keep their size).
    Resize(ResizeArgs),
    /// Change a qcow2 image's format options in place: compat (0.10 / 1.1) and
    /// lazy_refcounts (like qemu-img amend).
    Amend(AmendArgs),
    /// Copy a byte range of an image into a new image (like qemu-img dd).
    Dd(DdArgs),
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
    /// Create or replace a guest file with standard input (offline; like passwd's safety).
    Write(editor::WriteArgs),
    /// Copy a host file into the guest.
    Upload(editor::UploadArgs),
    /// Make a directory in the guest.
    Mkdir(editor::MkdirArgs),
    /// Change permission bits of guest files.
    Chmod(editor::ChmodArgs),
    /// Change the owner of guest files (names from the guest's /etc/passwd and /etc/group).
    Chown(editor::ChownArgs),
    /// Make a symbolic link in the guest (ln -s TARGET PATH).
    Ln(editor::LnArgs),
    /// Remove guest files (and directory trees with -r).
    Rm(editor::RmArgs),
    /// Add an SSH public key to ~USER/.ssh/authorized_keys in the guest (0700/0600, owned
    /// by USER; appended, never replacing what is there).
    #[command(name = "ssh-inject")]
    SshInject(editor::SshInjectArgs),
    /// Run a script of guest edits (one operation a line) as one transaction.
    Edit(editor::EditArgs),
    /// Export an image (or one partition) over NBD for qemu, nbdcopy, vfkit or the kernel.
    Serve(serve::ServeArgs),
    /// Boot a rescue VM with the image attached over NBD and run a command (or a console
    /// shell) in it: the guest kernel's full ext4, journal replay included.
    Rescue(rescue::RescueArgs),
    /// Boot your own NixOS VM (`./result/bin/run-nixos-vm`) on an overlay of its disk, follow
    /// its boot phase by phase, log in over SSH, and diagnose a failure; or `--explain LOG`.
    Vmtest(vmtest::VmtestArgs),
    /// How big an image converted from SRC (or of --size bytes) would be, as qemu-img measure
    /// says it; or how big a disk built from a layout must be (--layout).
    Measure(MeasureArgs),
    /// Diagnose what stands between nix and a remote builder (`vmdisk doctor builder`).
    Doctor(doctor::DoctorArgs),
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
    /// (`-o help` lists the options of the format given with -f)
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
    /// The image to create (not needed with `-o help`).
    #[arg(required_unless_present = "options")]
    pub file: Option<PathBuf>,
    /// Virtual size in bytes, or with a k, M, G, T suffix (default: the backing file's size,
    /// or the layout's imageSize); `auto` with --layout: just big enough for the content.
    pub size: Option<String>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "qemu-img's numbers: `required` is the file size an image converted from SRC \
needs (its data, with metadata counted as if every cluster were allocated), `fully-allocated` \
the file size with every cluster allocated. With --layout: the disk size a layout needs (JSON)."
)]
pub struct MeasureArgs {
    #[command(flatten)]
    pub layout: layout::LayoutArgs,
    /// Format of the image to measure for (default raw, as in qemu-img).
    #[arg(short = 'O', value_enum, value_name = "FMT", conflicts_with = "layout")]
    pub output_format: Option<FormatArg>,
    /// Options of that image (see `vmdisk create -o`; `-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS", conflicts_with = "layout")]
    pub options: Vec<String>,
    /// Format of SRC (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT", conflicts_with = "layout")]
    pub format: Option<FormatArg>,
    /// Read SRC even if another process (a running VM) holds it (no locks).
    #[arg(short = 'U', long = "force-share", conflicts_with = "layout")]
    pub force_share: bool,
    /// Measure an empty image of this virtual size instead of SRC.
    #[arg(long, value_name = "SIZE", conflicts_with_all = ["src", "layout"])]
    pub size: Option<String>,
    #[command(flatten)]
    pub out: JsonArgs,
    /// The image to measure.
    pub src: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Output format (default raw, as in qemu-img).
    #[arg(short = 'O', value_enum, value_name = "FMT", default_value = "raw")]
    pub output_format: FormatArg,
    /// Zero detection: a run of SIZE zero bytes (default 4k; the cluster for qcow2) is left
    /// as a hole; 0 writes every byte (a fully allocated output).
    #[arg(short = 'S', value_name = "SIZE")]
    pub sparse: Option<String>,
    /// DST exists: write into it (in its format, -O) instead of creating it; the write is a
    /// transaction (an error or Ctrl-C leaves DST as it was). DST must be at least as big.
    #[arg(short = 'n')]
    pub existing: bool,
    /// With -n: DST already reads as zeros, so zero ranges of SRC are not written.
    #[arg(long, requires = "existing")]
    pub target_is_zero: bool,
    /// Make DST a qcow2 overlay on BACKING (stored as given, relative to DST) holding only
    /// what differs from it.
    #[arg(short = 'B', value_name = "BACKING")]
    pub backing: Option<String>,
    /// Format of BACKING (probed when not given).
    #[arg(short = 'F', value_enum, value_name = "FMT", requires = "backing")]
    pub backing_format: Option<FormatArg>,
    /// Convert an internal snapshot of SRC: snapshot.name=NAME, snapshot.id=ID, both
    /// (comma-separated), or ID_OR_NAME.
    #[arg(short = 'l', value_name = "SNAPSHOT", conflicts_with = "snapshot")]
    pub snapshot_param: Option<String>,
    /// Convert the internal snapshot with this id or name (qemu-img's older -s).
    #[arg(short = 's', value_name = "ID_OR_NAME")]
    pub snapshot: Option<String>,
    /// Allow out-of-order writes (accepted for qemu-img compatibility: vmdisk already reads
    /// in parallel and writes a raw or qcow2 target in order, which is as fast).
    #[arg(short = 'W')]
    pub out_of_order: bool,
    /// Parallel workers reading (and compressing) the source, 1 to 16 (default: one per
    /// CPU).
    #[arg(short = 'm', value_name = "N", value_parser = clap::value_parser!(u8).range(1..=16))]
    pub workers: Option<u8>,
    /// Cache mode of the output: none, writeback, writethrough, directsync or unsafe. none,
    /// writethrough and directsync make the output durable before it is renamed into place
    /// (as --sync); writeback and unsafe (the default) do not.
    #[arg(short = 't', value_name = "CACHE", value_parser = ["none", "writeback", "writethrough", "directsync", "unsafe"])]
    pub cache: Option<String>,
    /// Cache mode of the source (accepted; vmdisk reads through the page cache).
    #[arg(short = 'T', value_name = "CACHE", value_parser = ["none", "writeback", "writethrough", "directsync", "unsafe"])]
    pub src_cache: Option<String>,
    /// Compress the output (qcow2).
    #[arg(short = 'c')]
    pub compress: bool,
    /// Output format options (see `vmdisk create -o`; `-o help` lists them).
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
    #[arg(required_unless_present = "options")]
    pub src: Option<PathBuf>,
    #[arg(required_unless_present = "options")]
    pub dst: Option<PathBuf>,
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
    #[command(flatten)]
    pub out: JsonArgs,
    pub a: PathBuf,
    pub b: PathBuf,
}

#[derive(Debug, Args)]
#[command(
    args_conflicts_with_subcommands = true,
    after_help = "qemu-img's spellings work too: `vmdisk snapshot -l IMG`, `-c NAME IMG`, \
`-a NAME IMG`, `-d NAME IMG`."
)]
pub struct SnapshotArgs {
    #[command(subcommand)]
    pub action: Option<SnapshotAction>,
    /// List the snapshots of FILE (qemu-img snapshot -l).
    #[arg(short = 'l', group = "op")]
    pub list: bool,
    /// Take a snapshot called NAME (qemu-img snapshot -c).
    #[arg(short = 'c', value_name = "NAME", group = "op")]
    pub create: Option<String>,
    /// Revert FILE to the snapshot NAME or id (qemu-img snapshot -a).
    #[arg(short = 'a', value_name = "NAME", group = "op")]
    pub apply: Option<String>,
    /// Delete the snapshot NAME or id (qemu-img snapshot -d).
    #[arg(short = 'd', value_name = "NAME", group = "op")]
    pub delete: Option<String>,
    /// With -l: read the image even if another process holds it (no locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    #[command(flatten)]
    pub out: JsonArgs,
    /// The qcow2 image (with -l, -c, -a or -d).
    #[arg(requires = "op")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PreallocArg {
    Off,
    Metadata,
    Falloc,
    Full,
}

impl From<PreallocArg> for vmdisk_image::ResizePrealloc {
    fn from(p: PreallocArg) -> Self {
        use vmdisk_image::ResizePrealloc as P;
        match p {
            PreallocArg::Off => P::Off,
            PreallocArg::Metadata => P::Metadata,
            PreallocArg::Falloc => P::Falloc,
            PreallocArg::Full => P::Full,
        }
    }
}

#[derive(Debug, Args)]
#[command(
    after_help = "SIZE is bytes or a number with a k, M, G, T suffix; +SIZE grows by \
that much, -SIZE shrinks (no `--` needed). qcow2 sizes are multiples of 512. The image is \
edited as a transaction: an error or Ctrl-C leaves it byte-identical. Refused while a VM \
holds the image. A qcow2 v3 image keeps its internal snapshots (applying one brings its own \
size back); v2 images with snapshots are refused, as by qemu-img. Growing an overlay whose \
backing file is bigger makes the new area read as zeros, not as the backing file.

--grow-fs then grows what fills the image, in the same transaction: a whole-disk ext4 (the \
nixos.qcow2 of `nixos-rebuild build-vm`, no partition table), or on a GPT disk the last \
partition by position (the backup GPT moves to the new end) and the ext4 in it. The ext4 \
gains block groups offline, lazily initialised (nothing is copied), as resize2fs would. \
Refused before anything changes when the last partition is not ext4, the filesystem is not \
clean, needs journal recovery, uses bigalloc, meta_bg or sparse_super2, or has no reserved \
GDT blocks left for the new group descriptors; the error says how to do it inside the guest."
)]
pub struct ResizeArgs {
    /// Image format (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Allow a smaller size: everything past the new end is deleted.
    #[arg(long)]
    pub shrink: bool,
    /// Also grow the last partition (GPT) and the ext4 filesystem inside to fill the new size.
    #[arg(long, conflicts_with = "shrink")]
    pub grow_fs: bool,
    /// How the added space is allocated: off (default, sparse), metadata (qcow2: tables and
    /// clusters allocated, file sparse), falloc (space reserved), full (zeros written).
    #[arg(long, value_enum, value_name = "MODE", default_value = "off")]
    pub preallocation: PreallocArg,
    #[command(flatten)]
    pub out: JsonArgs,
    /// The image to resize (raw or qcow2).
    pub file: PathBuf,
    /// New size, or +SIZE / -SIZE relative to the current one.
    #[arg(allow_hyphen_values = true, value_name = "[+|-]SIZE")]
    pub size: String,
}

#[derive(Debug, Args)]
#[command(
    after_help = "compat=1.1 upgrades a v2 image; compat=0.10 downgrades (zero clusters \
are expanded first; refused, as by qemu-img, for refcount widths other than 16, snapshots of \
another size, or zstd-compressed clusters); lazy_refcounts=on|off needs compat 1.1. The \
image is edited as a transaction."
)]
pub struct AmendArgs {
    /// Image format (probed when not given; only qcow2 can be amended).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Options to change: compat=0.10|1.1, lazy_refcounts=on|off (`-o help` lists them).
    #[arg(short = 'o', value_name = "OPTIONS", required = true)]
    pub options: Vec<String>,
    /// The qcow2 image to amend (not needed with `-o help`).
    #[arg(required_unless_present = "options")]
    pub file: Option<PathBuf>,
}

#[derive(Debug, Args)]
#[command(
    after_help = "Operands: if=INPUT of=OUTPUT [bs=BYTES (default 512)] [count=BLOCKS] \
[skip=BLOCKS]. As in qemu-img dd, count counts from the start of INPUT (the copy ends at \
count*bs) and skip moves its start. OUTPUT is created (replacing a file there, only once it \
is complete)."
)]
pub struct DdArgs {
    /// Format of INPUT (probed when not given).
    #[arg(short = 'f', value_enum, value_name = "FMT")]
    pub format: Option<FormatArg>,
    /// Format of OUTPUT (default raw).
    #[arg(short = 'O', value_enum, value_name = "FMT", default_value = "raw")]
    pub output_format: FormatArg,
    /// Read INPUT even if another process holds it (no locks).
    #[arg(short = 'U', long = "force-share")]
    pub force_share: bool,
    /// Show a progress bar.
    #[arg(short = 'p')]
    pub progress: bool,
    /// if=INPUT of=OUTPUT bs=BYTES count=BLOCKS skip=BLOCKS
    #[arg(value_name = "OPERAND", required = true)]
    pub operands: Vec<String>,
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
        #[command(flatten)]
        out: JsonArgs,
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
            Command::Snapshot(s) => s.list || matches!(s.action, Some(SnapshotAction::List { .. })),
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
            if let Some(msg) = qemu_img_refusal(&e, std::env::args().skip(1)) {
                eprintln!("vmdisk: error: {msg}");
                return ExitCode::from(1);
            }
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

/// qemu-img flags vmdisk does not take (yet), by command ("" for any command), with the
/// nearest thing vmdisk offers.
const QEMU_IMG_FLAGS: &[(&str, &str, &str)] = &[
    (
        "",
        "--object",
        "none: vmdisk has no QEMU objects (secrets, throttling); it refuses encrypted images",
    ),
    (
        "",
        "--image-opts",
        "give the file name; -f names its format",
    ),
    (
        "",
        "--target-image-opts",
        "give the file name; -O names its format",
    ),
    ("", "-T", "none needed: vmdisk reads through the page cache"),
    (
        "",
        "-t",
        "none needed: vmdisk writes through the page cache (convert takes -t and --sync)",
    ),
    (
        "convert",
        "-C",
        "`vmdisk copy --reflink=always` shares the file's extents; convert always copies",
    ),
    (
        "convert",
        "-r",
        "none: vmdisk converts at full speed (run it under ionice to slow it)",
    ),
    (
        "convert",
        "--salvage",
        "none: a read error stops the convert and removes the partial output",
    ),
    (
        "convert",
        "--bitmaps",
        "none: persistent bitmaps are not copied (qemu-img convert --bitmaps)",
    ),
    (
        "convert",
        "--skip-broken-bitmaps",
        "none: persistent bitmaps are not copied",
    ),
    ("convert", "-a", "none"),
    (
        "create",
        "-u",
        "create checks that the backing file opens; create it first, or `vmdisk rebase -u` later",
    ),
    (
        "commit",
        "-b",
        "vmdisk commit folds the overlay into its own backing file (one level at a time)",
    ),
    ("commit", "-r", "none: vmdisk commits at full speed"),
    ("rebase", "-c", "none: rebase copies clusters uncompressed"),
    (
        "map",
        "--start-offset",
        "none: vmdisk map maps the whole image (filter its --json output)",
    ),
    (
        "map",
        "--max-length",
        "none: vmdisk map maps the whole image (filter its --json output)",
    ),
    ("info", "--limits", "none"),
    ("inspect", "--limits", "none"),
];

/// qemu-img commands vmdisk does not have, with what to use instead.
const QEMU_IMG_COMMANDS: &[(&str, &str)] = &[
    (
        "bitmap",
        "use `qemu-img bitmap`; vmdisk keeps existing bitmaps valid while it writes",
    ),
    (
        "bench",
        "use `qemu-img bench`, or `cargo xtask bench` for vmdisk's own benchmarks",
    ),
];

/// When clap rejects a flag or command qemu-img users type, say that vmdisk does not
/// support it yet and what comes nearest, instead of clap's "to pass '-S' as a value, use
/// '-- -S'".
fn qemu_img_refusal(e: &clap::Error, args: impl Iterator<Item = String>) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let args: Vec<String> = args.collect();
    let arg = match e.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(s)) => s.clone(),
        _ => match e.get(ContextKind::InvalidSubcommand) {
            Some(ContextValue::String(s)) => s.clone(),
            _ => return None,
        },
    };
    if e.kind() == ErrorKind::InvalidSubcommand {
        let (_, why) = QEMU_IMG_COMMANDS.iter().find(|(c, _)| *c == arg)?;
        return Some(format!("vmdisk does not support `{arg}` yet; {why}"));
    }
    if e.kind() != ErrorKind::UnknownArgument {
        return None;
    }
    let flag = arg.split('=').next().unwrap_or(&arg);
    let cmd = args
        .iter()
        .find(|a| !a.starts_with('-'))
        .map(String::as_str)
        .unwrap_or("");
    let hit = QEMU_IMG_FLAGS
        .iter()
        .find(|(c, f, _)| *c == cmd && *f == flag)
        .or_else(|| {
            QEMU_IMG_FLAGS
                .iter()
                .find(|(c, f, _)| c.is_empty() && *f == flag)
        });
    Some(match hit {
        Some((_, _, near)) => format!("vmdisk does not support {flag} yet; nearest: {near}"),
        // A qemu-img style short flag nobody listed: still no "use '-- -X'" advice.
        None if flag.len() == 2 && flag.starts_with('-') => format!(
            "vmdisk does not support {flag}{} yet; see `vmdisk {cmd} --help` for what it takes",
            if cmd.is_empty() {
                String::new()
            } else {
                format!(" for `{cmd}`")
            }
        ),
        None => return None,
    })
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
        Command::Measure(a) => measure(a),
        Command::Resize(a) => resize(a, quiet),
        Command::Amend(a) => amend(a, quiet),
        Command::Dd(a) => dd(a, quiet),
        Command::Commit(a) => overlay::commit(a, quiet),
        Command::Rebase(a) => overlay::rebase(a, quiet),
        Command::Ls(a) => guest::ls(a),
        Command::Cat(a) => guest::cat(a),
        Command::CpOut(a) => guest::cp_out(a, quiet),
        Command::Passwd(a) => passwd::passwd(a, quiet),
        Command::Write(a) => editor::write(a, quiet),
        Command::Upload(a) => editor::upload(a, quiet),
        Command::Mkdir(a) => editor::mkdir(a, quiet),
        Command::Chmod(a) => editor::chmod(a, quiet),
        Command::Chown(a) => editor::chown(a, quiet),
        Command::Ln(a) => editor::ln(a, quiet),
        Command::Rm(a) => editor::rm(a, quiet),
        Command::SshInject(a) => editor::ssh_inject(a, quiet),
        Command::Edit(a) => editor::edit(a, quiet),
        Command::Serve(a) => serve::run(a, quiet),
        Command::Rescue(a) => rescue::run(a, quiet),
        Command::Doctor(a) => doctor::run(a),
        Command::Vmtest(a) => vmtest::run(a, quiet),
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

/// True when qemu-img would answer these `-o` options with the option list (`help`, `?`).
fn wants_options_help(opts: &[String]) -> bool {
    opts.iter()
        .flat_map(|o| o.split(','))
        .any(|k| k == "help" || k == "?")
}

/// `-o help`: the options vmdisk takes for a format, in qemu-img's layout.
fn options_help(format: Format) -> String {
    let lines: &[(&str, &str)] = match format {
        Format::Qcow2 => &[
            ("backing_file=<str>", "File name of a base image"),
            ("backing_fmt=<str>", "Image format of the base image"),
            ("cluster_size=<size>", "qcow2 cluster size"),
            (
                "compat=<str>",
                "Compatibility level (v2 [0.10] or v3 [1.1])",
            ),
            (
                "compression_type=<str>",
                "Compression method used for image cluster compression (zlib, zstd)",
            ),
            ("extended_l2=<bool (on/off)>", "Extended L2 tables"),
            (
                "lazy_refcounts=<bool (on/off)>",
                "Postpone refcount updates",
            ),
            (
                "preallocation=<str>",
                "Preallocation mode (allowed values: off, metadata)",
            ),
            (
                "refcount_bits=<num>",
                "Width of a reference count entry in bits",
            ),
            ("size=<size>", "Virtual disk size"),
        ],
        Format::Raw => &[
            (
                "preallocation=<str>",
                "Preallocation mode (allowed values: off, falloc, full)",
            ),
            ("size=<size>", "Virtual disk size"),
        ],
    };
    let mut out = format!("Supported {format} options:\n");
    for (k, d) in lines {
        out += &format!("  {k:<22} - {d}\n");
    }
    out
}

fn create(a: CreateArgs, quiet: bool) -> Result<u8> {
    if wants_options_help(&a.options) {
        print!("{}", options_help(a.format.into()));
        return Ok(0);
    }
    let Some(file) = a.file.clone() else {
        anyhow::bail!("give the image to create: vmdisk create [-f FMT] FILE [SIZE]");
    };
    create_image(a, file.clone(), quiet).with_context(|| format!("creating {}", file.display()))
}

fn create_image(a: CreateArgs, file: std::path::PathBuf, quiet: bool) -> Result<u8> {
    if a.layout.layout.is_some() {
        if a.backing.is_some() {
            anyhow::bail!("--layout builds a whole disk; it cannot have a backing file (-b)");
        }
        return layout::create(
            &a.layout,
            &file,
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
    vmdisk_image::create(&file, &spec)?;
    if !quiet {
        let size = vmdisk_image::open(
            &file,
            &OpenOptions {
                no_backing: true,
                force_share: true,
                ..OpenOptions::read_only()
            },
        )
        .map(|i| i.len())
        .unwrap_or(0);
        say!("{}", formatting_line(&file, &spec, size));
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

/// `-l snapshot.name=NAME,snapshot.id=ID` / `-l ID_OR_NAME` / `-s ID_OR_NAME`.
fn snapshot_selector(
    param: Option<&str>,
    old: Option<&str>,
) -> Result<Option<vmdisk_image::SnapshotSelector>> {
    use vmdisk_image::SnapshotSelector as S;
    if let Some(s) = old {
        return Ok(Some(S::IdOrName(s.to_string())));
    }
    let Some(p) = param else { return Ok(None) };
    if !p.contains('=') {
        return Ok(Some(S::IdOrName(p.to_string())));
    }
    let (mut id, mut name) = (None, None);
    for item in p.split(',') {
        match item.split_once('=') {
            Some(("snapshot.id", v)) => id = Some(v.to_string()),
            Some(("snapshot.name", v)) => name = Some(v.to_string()),
            _ => anyhow::bail!(
                "-l {p}: expected snapshot.name=NAME, snapshot.id=ID (or both, comma-separated) \
                 or a snapshot id or name"
            ),
        }
    }
    Ok(Some(match (id, name) {
        (Some(id), Some(name)) => S::IdAndName { id, name },
        (Some(id), None) => S::Id(id),
        (None, Some(name)) => S::Name(name),
        (None, None) => unreachable!("the loop sets one or returns"),
    }))
}

fn convert(a: ConvertArgs, quiet: bool) -> Result<u8> {
    if wants_options_help(&a.options) {
        print!("{}", options_help(a.output_format.into()));
        return Ok(0);
    }
    let (Some(src_path), Some(dst)) = (a.src.clone(), a.dst.clone()) else {
        anyhow::bail!("give the source and the destination: vmdisk convert [-O FMT] SRC DST");
    };
    // Every flag is checked before any file is opened.
    let sparse = a
        .sparse
        .as_deref()
        .map(vmdisk_image::parse_size)
        .transpose()?;
    let snapshot = snapshot_selector(a.snapshot_param.as_deref(), a.snapshot.as_deref())?;
    let options = parse_options(&a.options)?;
    // Before any thread exists, so every thread inherits the blocked signals.
    let cancel = signals::cancel_on_interrupt();
    let src = vmdisk_image::open(
        &src_path,
        &OpenOptions {
            format: a.format.map(Into::into),
            read_only: true,
            force_share: a.force_share,
            ..Default::default()
        },
    )?;
    warn_raw_view(&src, quiet);
    let durable_cache = matches!(
        a.cache.as_deref(),
        Some("none" | "writethrough" | "directsync")
    );
    let opts = ConvertOptions {
        format: a.output_format.into(),
        compress: a.compress,
        options,
        threads: a.workers.map(usize::from),
        sync: a.sync || durable_cache,
        cancel,
        sparse,
        existing: a.existing,
        target_is_zero: a.target_is_zero,
        backing: a
            .backing
            .clone()
            .map(|b| (b, a.backing_format.map(Into::into))),
        snapshot,
    };
    let pb = progress_bar(a.progress && !quiet);
    let report = report_to(&pb);
    vmdisk_image::convert(&src, &dst, &opts, &report)?;
    if let Some(pb) = &pb {
        pb.finish();
    }
    Ok(0)
}

fn measure(a: MeasureArgs) -> Result<u8> {
    if a.layout.layout.is_some() {
        return layout::measure(&a.layout);
    }
    let format: Format = a.output_format.map(Into::into).unwrap_or(Format::Raw);
    if wants_options_help(&a.options) {
        print!("{}", options_help(format));
        return Ok(0);
    }
    let options = parse_options(&a.options)?;
    let m = match (&a.src, &a.size) {
        (Some(src), None) => {
            let img = vmdisk_image::open(
                src,
                &OpenOptions {
                    format: a.format.map(Into::into),
                    read_only: true,
                    force_share: a.force_share,
                    ..Default::default()
                },
            )?;
            vmdisk_image::measure(&img, format, &options)?
        }
        (None, Some(size)) => {
            let size = vmdisk_image::parse_size(size)?;
            vmdisk_image::measure_size(format, &options, size, None)?
        }
        _ => {
            anyhow::bail!("give the image to measure (SRC), or --size SIZE, or --layout DISKO.json")
        }
    };
    if a.out.is_json() {
        print_json(&m)?;
    } else {
        say!("required size: {}", m.required);
        say!("fully allocated size: {}", m.fully_allocated);
    }
    Ok(0)
}

fn resize(a: ResizeArgs, quiet: bool) -> Result<u8> {
    let change = vmdisk_image::SizeChange::parse(&a.size)?;
    let cancel = signals::cancel_on_interrupt();
    let opts = vmdisk_image::ResizeOptions {
        format: a.format.map(Into::into),
        shrink: a.shrink,
        prealloc: a.preallocation.into(),
        cancel,
    };
    let mut hook = growfs::GrowFs::new(a.file.clone());
    let h: Option<&mut dyn vmdisk_image::ResizeHook> =
        if a.grow_fs { Some(&mut hook) } else { None };
    let stats = vmdisk_image::resize_with(&a.file, change, &opts, h)
        .with_context(|| format!("resizing {}", a.file.display()))?;
    if a.out.is_json() {
        let mut v = serde_json::to_value(&stats)?;
        if let (Some(r), Some(o)) = (&hook.report, v.as_object_mut()) {
            o.insert("grow-fs".into(), serde_json::to_value(r)?);
        }
        print_json(&v)?;
    } else if !quiet {
        say!("Image resized.");
        if let Some(r) = &hook.report {
            let f = &r.filesystem;
            let what = match &r.partition {
                Some(p) => format!(
                    "Partition {} ({}) grown to LBA {}; its",
                    p.number, p.name, p.new_last_lba
                ),
                None => "The whole-disk".to_string(),
            };
            say!(
                "{what} ext4 filesystem grown from {} to {} blocks of {} bytes ({} to {} groups).",
                f.plan.old_blocks,
                f.plan.new_blocks,
                f.plan.block_size,
                f.plan.old_groups,
                f.plan.new_groups
            );
        }
    }
    Ok(0)
}

fn amend(a: AmendArgs, quiet: bool) -> Result<u8> {
    if wants_options_help(&a.options) {
        print!("{}", vmdisk_image::amend_options_help());
        return Ok(0);
    }
    let Some(file) = &a.file else {
        anyhow::bail!("give the image to amend: vmdisk amend -o OPTIONS FILE");
    };
    let opts = vmdisk_image::parse_amend_options(&a.options)?;
    let r = vmdisk_image::amend(file, a.format.map(Into::into), &opts)
        .with_context(|| format!("amending {}", file.display()))?;
    if !quiet && r.old_version != r.new_version {
        let compat = |v: u32| if v == 2 { "0.10" } else { "1.1" };
        eprintln!(
            "vmdisk: {} is now compat={} (was {})",
            file.display(),
            compat(r.new_version),
            compat(r.old_version)
        );
    }
    Ok(0)
}

fn dd(a: DdArgs, quiet: bool) -> Result<u8> {
    let (input, output, mut opts) = vmdisk_image::parse_dd_operands(&a.operands)?;
    opts.format = a.format.map(Into::into);
    opts.output_format = a.output_format.into();
    opts.force_share = a.force_share;
    opts.cancel = signals::cancel_on_interrupt();
    let pb = progress_bar(a.progress && !quiet);
    let report = report_to(&pb);
    vmdisk_image::dd(Path::new(&input), Path::new(&output), &opts, &report)?;
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
    if a.out.is_json() {
        let (kind, offset) = match c.difference {
            None => (None, None),
            Some(Difference::Content { offset }) => (Some("content"), Some(offset)),
            Some(Difference::Size) => (Some("size"), None),
            Some(Difference::BlockStatus { offset }) => (Some("block-status"), Some(offset)),
        };
        print_json(&serde_json::json!({
            "identical": c.identical(),
            "size-mismatch": c.size_mismatch,
            "difference": kind,
            "offset": offset,
        }))?;
        return Ok(if c.identical() { 0 } else { 1 });
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
    let action = match (a.action, a.file) {
        (Some(action), _) => action,
        (None, Some(file)) => {
            if let Some(name) = a.create {
                SnapshotAction::Create { file, name }
            } else if let Some(name) = a.apply {
                SnapshotAction::Apply { file, name }
            } else if let Some(name) = a.delete {
                SnapshotAction::Delete { file, name }
            } else {
                SnapshotAction::List {
                    file,
                    force_share: a.force_share,
                    out: a.out.clone(),
                }
            }
        }
        (None, None) => anyhow::bail!(
            "say what to do: vmdisk snapshot (list|create|apply|delete) FILE [NAME], or \
             -l FILE / -c NAME FILE / -a NAME FILE / -d NAME FILE"
        ),
    };
    match action {
        SnapshotAction::List {
            file,
            force_share,
            out,
        } => {
            let json = out.is_json();
            let img = vmdisk_image::open(
                &file,
                &OpenOptions {
                    no_backing: true,
                    force_share,
                    ..OpenOptions::read_only()
                },
            )?;
            let list = vmdisk_image::snapshot_list(&img)?;
            if json {
                print_json(&list)?;
            } else {
                print!("Snapshot list:\n{}", vmdisk_image::snapshot_table(&list));
            }
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
