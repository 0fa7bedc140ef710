//! The offline guest editor verbs: write, upload, mkdir, chmod, chown, ln, rm, ssh-inject and
//! edit --script. Each parses its arguments into `vmdisk_guest::Op`s and runs them as one
//! transaction (`vmdisk_guest::apply_ops`), with the safety defaults of `passwd`.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Args;
use vmdisk_guest::{apply_ops, parse_mode, Op, Owner, Undo};

use crate::guest::Target;

/// Where the change goes, and how it is reported (shared by every editor verb).
#[derive(Debug, Args)]
pub struct EditOpts {
    /// Write into the image itself: required for raw images; for qcow2 skips the undo snapshot.
    #[arg(long, conflicts_with = "overlay")]
    pub in_place: bool,
    /// Leave the image untouched and write the change into a new qcow2 overlay on top of it.
    #[arg(short = 'o', long = "overlay", value_name = "OVERLAY")]
    pub overlay: Option<PathBuf>,
    /// With -o: replace OVERLAY if it exists (by default an existing file is refused).
    #[arg(long, requires = "overlay")]
    pub force: bool,
    /// Check everything (the whole edit is tried on a staged copy) and write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Report what changed as JSON on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct WriteArgs {
    #[command(flatten)]
    pub target: Target,
    /// Path in the guest; created, or its content replaced. Content comes from stdin.
    pub path: String,
    /// Permission bits in octal (default 0644 for a new file; an existing one keeps its own).
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    /// USER:GROUP (names from the guest's /etc/passwd and /etc/group, or numbers).
    #[arg(long, value_name = "USER:GROUP")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct UploadArgs {
    #[command(flatten)]
    pub target: Target,
    /// File on the host.
    pub hostfile: PathBuf,
    /// Path in the guest.
    pub path: String,
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    #[arg(long, value_name = "USER:GROUP")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct MkdirArgs {
    #[command(flatten)]
    pub target: Target,
    pub path: String,
    /// Make missing parents too; an existing directory is no error.
    #[arg(short = 'p', long)]
    pub parents: bool,
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,
    #[arg(long, value_name = "USER:GROUP")]
    pub owner: Option<String>,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct ChmodArgs {
    #[command(flatten)]
    pub target: Target,
    /// Octal mode (e.g. 0700).
    pub mode: String,
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Recurse into directories (symbolic links are not followed).
    #[arg(short = 'R', long)]
    pub recursive: bool,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct ChownArgs {
    #[command(flatten)]
    pub target: Target,
    /// USER:GROUP, USER or :GROUP (guest names or numbers).
    pub owner: String,
    #[arg(required = true)]
    pub paths: Vec<String>,
    #[arg(short = 'R', long)]
    pub recursive: bool,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct LnArgs {
    #[command(flatten)]
    pub target: Target,
    /// Make a symbolic link (the only kind supported).
    #[arg(short = 's', long = "symbolic", required = true)]
    pub symbolic: bool,
    /// What the link points at (stored as given).
    pub link_target: String,
    /// The link's path in the guest.
    pub path: String,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct RmArgs {
    #[command(flatten)]
    pub target: Target,
    #[arg(required = true)]
    pub paths: Vec<String>,
    /// Remove directories and everything in them.
    #[arg(short = 'r', short_alias = 'R', long)]
    pub recursive: bool,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct SshInjectArgs {
    #[command(flatten)]
    pub target: Target,
    /// The guest account (from its /etc/passwd).
    pub user: String,
    /// Public key file on the host (one line, e.g. id_ed25519.pub).
    pub pubkeyfile: PathBuf,
    #[command(flatten)]
    pub opts: EditOpts,
}

#[derive(Debug, Args)]
pub struct EditArgs {
    #[command(flatten)]
    pub target: Target,
    /// One operation per line: write PATH HOSTFILE, upload HOSTFILE PATH, mkdir [-p] PATH,
    /// chmod [-R] MODE PATH..., chown [-R] USER:GROUP PATH..., ln -s TARGET PATH,
    /// rm [-r] PATH..., ssh-inject USER PUBKEYFILE (--mode/--owner on write, upload, mkdir);
    /// `#` starts a comment. All in one transaction, one undo snapshot.
    #[arg(long, value_name = "FILE")]
    pub script: PathBuf,
    #[command(flatten)]
    pub opts: EditOpts,
}

fn mode(m: &Option<String>) -> Result<Option<u16>> {
    m.as_deref()
        .map(parse_mode)
        .transpose()
        .map_err(anyhow::Error::msg)
}

fn owner(o: &Option<String>) -> Result<Option<Owner>> {
    o.as_deref()
        .map(Owner::parse)
        .transpose()
        .map_err(anyhow::Error::msg)
}

fn read_host(p: &std::path::Path) -> Result<Vec<u8>> {
    let md = std::fs::metadata(p).with_context(|| format!("reading {}", p.display()))?;
    if md.len() > vmdisk_guest::ops::MAX_CONTENT_BYTES {
        bail!(
            "{} is {} bytes; the editor writes files up to {} bytes",
            p.display(),
            md.len(),
            vmdisk_guest::ops::MAX_CONTENT_BYTES
        );
    }
    std::fs::read(p).with_context(|| format!("reading {}", p.display()))
}

fn run(what: &str, t: &Target, o: &EditOpts, ops: Vec<Op>, quiet: bool) -> Result<u8> {
    let _cancel = crate::signals::cancel_on_interrupt();
    let target = vmdisk_guest::EditTarget {
        image: t.image.clone(),
        format: t.format.map(Into::into),
        partition: t.partition.clone(),
        undo: match (&o.overlay, o.in_place) {
            (Some(path), _) => Some(Undo::Overlay {
                path: path.clone(),
                replace: o.force,
            }),
            (None, true) => Some(Undo::InPlace),
            (None, false) => None,
        },
        dry_run: o.dry_run,
    };
    let report = apply_ops(&target, what, &ops)?;
    if o.json {
        let v = serde_json::json!({
            "partition": report.partition,
            "how": report.how,
            "dry_run": report.dry_run,
            "undo_snapshot": report.undo_snapshot,
            "overlay": report.overlay,
            "journal_replayed": report.plan.journal_replayed,
            "changes": report.plan.changes,
            "operations": ops,
            "commit": report.plan.commit,
        });
        let mut out = std::io::stdout().lock();
        std::io::Write::write_all(
            &mut out,
            format!("{}\n", serde_json::to_string_pretty(&v)?).as_bytes(),
        )
        .context("writing the JSON report to standard output")?;
    } else if !quiet {
        if report.plan.journal_replayed {
            eprintln!(
                "vmdisk: the journal needed recovery (the VM was not shut down cleanly): {}",
                if report.dry_run {
                    "it would be replayed first"
                } else {
                    "replayed it first"
                }
            );
        }
        for c in &report.plan.changes {
            eprintln!(
                "vmdisk: {}{c}",
                if report.dry_run { "would have " } else { "" }
            );
        }
        eprintln!(
            "vmdisk: {} on {} ({})",
            if report.dry_run {
                "dry run, nothing written"
            } else {
                "done"
            },
            report.partition,
            report.how
        );
        if let Some(name) = &report.undo_snapshot {
            eprintln!(
                "undo with: {}",
                vmdisk_guest::edit::undo_hint(&t.image, name)
            );
        }
    }
    Ok(0)
}

pub fn write(a: WriteArgs, quiet: bool) -> Result<u8> {
    let mut content = Vec::new();
    std::io::stdin()
        .take(vmdisk_guest::ops::MAX_CONTENT_BYTES + 1)
        .read_to_end(&mut content)
        .context("reading the content from standard input")?;
    if content.len() as u64 > vmdisk_guest::ops::MAX_CONTENT_BYTES {
        bail!(
            "standard input is larger than {} bytes, the most the editor writes",
            vmdisk_guest::ops::MAX_CONTENT_BYTES
        );
    }
    let ops = vec![Op::Write {
        path: a.path.clone(),
        content,
        mode: mode(&a.mode)?,
        owner: owner(&a.owner)?,
    }];
    run("write", &a.target, &a.opts, ops, quiet)
}

pub fn upload(a: UploadArgs, quiet: bool) -> Result<u8> {
    let ops = vec![Op::Write {
        path: a.path.clone(),
        content: read_host(&a.hostfile)?,
        mode: mode(&a.mode)?,
        owner: owner(&a.owner)?,
    }];
    run("upload", &a.target, &a.opts, ops, quiet)
}

pub fn mkdir(a: MkdirArgs, quiet: bool) -> Result<u8> {
    let ops = vec![Op::Mkdir {
        path: a.path.clone(),
        parents: a.parents,
        mode: mode(&a.mode)?,
        owner: owner(&a.owner)?,
    }];
    run("mkdir", &a.target, &a.opts, ops, quiet)
}

pub fn chmod(a: ChmodArgs, quiet: bool) -> Result<u8> {
    let ops = vec![Op::Chmod {
        mode: parse_mode(&a.mode).map_err(anyhow::Error::msg)?,
        paths: a.paths.clone(),
        recursive: a.recursive,
    }];
    run("chmod", &a.target, &a.opts, ops, quiet)
}

pub fn chown(a: ChownArgs, quiet: bool) -> Result<u8> {
    let ops = vec![Op::Chown {
        owner: Owner::parse(&a.owner).map_err(anyhow::Error::msg)?,
        paths: a.paths.clone(),
        recursive: a.recursive,
    }];
    run("chown", &a.target, &a.opts, ops, quiet)
}

pub fn ln(a: LnArgs, quiet: bool) -> Result<u8> {
    if !a.symbolic {
        bail!("only symbolic links are supported: vmdisk ln IMAGE -s TARGET PATH");
    }
    let ops = vec![Op::Symlink {
        target: a.link_target.clone(),
        path: a.path.clone(),
    }];
    run("ln", &a.target, &a.opts, ops, quiet)
}

pub fn rm(a: RmArgs, quiet: bool) -> Result<u8> {
    let ops = vec![Op::Rm {
        paths: a.paths.clone(),
        recursive: a.recursive,
    }];
    run("rm", &a.target, &a.opts, ops, quiet)
}

pub fn ssh_inject(a: SshInjectArgs, quiet: bool) -> Result<u8> {
    let key = String::from_utf8(read_host(&a.pubkeyfile)?)
        .with_context(|| format!("{} is not text", a.pubkeyfile.display()))?;
    let ops = vec![Op::SshInject {
        user: a.user.clone(),
        key,
    }];
    run("ssh-inject", &a.target, &a.opts, ops, quiet)
}

pub fn edit(a: EditArgs, quiet: bool) -> Result<u8> {
    let text = std::fs::read_to_string(&a.script)
        .with_context(|| format!("reading the script {}", a.script.display()))?;
    let base = a
        .script
        .parent()
        .map(|p| p.to_path_buf())
        .unwrap_or_default();
    let read = |p: &str| -> std::result::Result<Vec<u8>, String> {
        let path = if std::path::Path::new(p).is_absolute() {
            PathBuf::from(p)
        } else {
            base.join(p)
        };
        read_host(&path).map_err(|e| format!("{e:#}"))
    };
    let ops = vmdisk_guest::parse_script(&text, &read)
        .map_err(|e| anyhow::anyhow!("{}: {e}", a.script.display()))?;
    if ops.is_empty() {
        bail!("{}: no operations in the script", a.script.display());
    }
    run("edit", &a.target, &a.opts, ops, quiet)
}
