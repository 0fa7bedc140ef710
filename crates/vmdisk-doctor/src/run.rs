//! The checks themselves: read the builder list as nix does, then, for each SSH machine, take
//! the steps nix takes — as the user nix runs ssh as, with the arguments nix gives ssh — each
//! step with its own timeout. The user's files are only read, never written.
//!
//! The ssh arguments are nix's (`SSHMaster::addCommonSSHOpts`): the words of `NIX_SSHOPTS`,
//! `-i KEY` for the key column, `-oUserKnownHostsFile=TMP/host-key` holding `HOST KEY` when a
//! host key is pinned, `-C` for `compress=true`, `-pPORT` for a port in the URI. ssh takes the
//! first value it is given for an option, so a `UserKnownHostsFile` in `NIX_SSHOPTS` beats the
//! pinned key — `ssh -G` with the same arguments says what ssh really ends up with, so that is
//! what the checks use. We add only `-oBatchMode=yes` and a `ConnectTimeout` (a nix-daemon has
//! no terminal to prompt on either).

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use vmdisk_ssh::config::{expand_tilde, EffectiveConfig};
use vmdisk_ssh::hostkey::{known_hosts_name, parse_keyscan, PublicKey};
use vmdisk_ssh::{account, Account, SshFailureKind};

use crate::machines::{self, FileRead, Machine};
use crate::nixconf;
use crate::probe::{self, Kvm, PROBE_EXIT};
use crate::report::{BuildersSource, Check, MachineReport, Report, SshView};
use crate::uri::{Protocol, SshUri};

/// Name resolution of the builder's host (getaddrinfo has no timeout of its own).
pub const RESOLVE_TIMEOUT: Duration = Duration::from_secs(3);
/// TCP connect to the builder's SSH port.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// The SSH identification line after connecting.
pub const BANNER_TIMEOUT: Duration = Duration::from_secs(3);
/// `ssh -G`, `ssh-keygen -F`, reading the key as the ssh user: local programs.
pub const LOCAL_TIMEOUT: Duration = Duration::from_secs(5);
/// ssh-keyscan (its own `-T` is one second less).
pub const KEYSCAN_TIMEOUT: Duration = Duration::from_secs(5);
/// Default for each ssh session to the builder (login, `nix-store --version`, the probe).
pub const DEFAULT_SSH_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the master connection outlives its last session (it is closed explicitly after
/// the checks; this bounds a doctor killed half-way).
const CONTROL_PERSIST_SECS: u64 = 30;
/// Where nix-daemon listens; its presence (and a store we cannot write) means nix uses it.
pub const DAEMON_SOCKET: &str = "/nix/var/nix/daemon-socket/socket";
/// The worker protocol's first words (nix's worker-protocol.hh): client hello, daemon reply.
const WORKER_MAGIC_1: u64 = 0x6e69_7863;
const WORKER_MAGIC_2: u64 = 0x6478_696f;

#[derive(Debug, thiserror::Error)]
pub enum DoctorError {
    #[error("--as-user")]
    LookingUpUser(#[source] account::AccountError),
    #[error("finding the user running vmdisk")]
    LookingUpSelf(#[source] account::AccountError),
    #[error("creating a temporary directory for the pinned host keys")]
    CreatingTempDir(#[source] std::io::Error),
}

/// How nix runs builds here, which decides whose ssh runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NixMode {
    /// `--as-user USER`.
    Forced(String),
    /// A nix-daemon (root) does the building: it runs ssh as root.
    Daemon(String),
    /// nix runs in the invoking process, ssh as the invoking user.
    SingleUser(String),
}

/// What the doctor is asked to check.
#[derive(Clone, Debug)]
pub struct Options {
    /// Read instead of `/etc/nix/machines` wherever the builders setting names it.
    pub machines_file: Option<PathBuf>,
    /// nix.conf to read (`$NIX_CONF_DIR/nix.conf`, else /etc/nix/nix.conf).
    pub nix_conf: PathBuf,
    /// Builders given on the command line (URIs or whole machines lines): replace the setting.
    pub uris: Vec<String>,
    /// Check ssh as this user instead of the one nix would use.
    pub as_user: Option<String>,
    /// `NIX_SSHOPTS` as nix would see it.
    pub nix_sshopts: Option<String>,
    /// `NIX_REMOTE` as nix would see it.
    pub nix_remote: Option<String>,
    /// The local system (`x86_64-linux`), the default of an unset systems column.
    pub this_system: String,
    /// Limit of each ssh session to the builder.
    pub ssh_timeout: Duration,
    pub ssh: PathBuf,
    pub ssh_keyscan: PathBuf,
    pub ssh_keygen: PathBuf,
}

impl Options {
    pub fn new() -> Options {
        Options {
            machines_file: None,
            nix_conf: PathBuf::from("/etc/nix/nix.conf"),
            uris: Vec::new(),
            as_user: None,
            nix_sshopts: None,
            nix_remote: None,
            this_system: local_system(),
            ssh_timeout: DEFAULT_SSH_TIMEOUT,
            ssh: "ssh".into(),
            ssh_keyscan: "ssh-keyscan".into(),
            ssh_keygen: "ssh-keygen".into(),
        }
    }
}

impl Default for Options {
    fn default() -> Self {
        Options::new()
    }
}

/// This machine's Nix system name.
pub fn local_system() -> String {
    let os = match std::env::consts::OS {
        "macos" => "darwin",
        o => o,
    };
    format!("{}-{os}", std::env::consts::ARCH)
}

/// Decide whose ssh nix runs, as nix decides whether to use the daemon (`auto` store: the
/// daemon when the store is not writable and its socket exists).
pub fn nix_mode(opts: &Options, me: &Account) -> NixMode {
    if let Some(u) = &opts.as_user {
        return NixMode::Forced(u.clone());
    }
    match opts.nix_remote.as_deref().unwrap_or("") {
        "daemon" => {
            return NixMode::Daemon("NIX_REMOTE=daemon: the nix-daemon (root) opens the SSH connections to builders, so root's ssh config, known_hosts and key access are what count".into())
        }
        r if r.starts_with("unix://") => {
            return NixMode::Daemon(format!("NIX_REMOTE={r}: the nix-daemon (root) opens the SSH connections to builders, so root's ssh config, known_hosts and key access are what count"))
        }
        "local" => {
            return NixMode::SingleUser(format!(
                "NIX_REMOTE=local: nix builds in its own process and runs ssh as {}",
                me.name
            ))
        }
        _ => {}
    }
    if me.is_root() {
        return NixMode::SingleUser(
            "vmdisk runs as root, and root's nix opens builder connections itself".into(),
        );
    }
    let socket = Path::new(DAEMON_SOCKET).exists();
    let writable = writable_by_me(Path::new("/nix/var/nix/db"));
    if socket && !writable {
        NixMode::Daemon(format!(
            "{DAEMON_SOCKET} exists and the store is not writable by {}: this is a multi-user \
             install, the nix-daemon (root) opens the SSH connections to builders, so root's ssh \
             config, known_hosts and key access are what count, not {}'s",
            me.name, me.name
        ))
    } else {
        NixMode::SingleUser(format!(
            "no nix-daemon in use (single-user install): nix runs ssh as {}",
            me.name
        ))
    }
}

fn writable_by_me(p: &Path) -> bool {
    // The directory's mode and owner decide; nix itself tries to create a lock file there.
    match std::fs::metadata(p) {
        Ok(m) => {
            let mode = m.permissions().mode();
            (m.uid() == account::current_uid() && mode & 0o200 != 0) || mode & 0o002 != 0
        }
        Err(_) => false,
    }
}

/// Run every check.
pub fn run(opts: &Options) -> Result<Report, DoctorError> {
    let t0 = Instant::now();
    let me = Account::current().map_err(DoctorError::LookingUpSelf)?;
    let mode = nix_mode(opts, &me);
    let (user, reason) = match &mode {
        NixMode::Forced(u) => (
            Account::by_name(u).map_err(DoctorError::LookingUpUser)?,
            format!("--as-user {u}"),
        ),
        NixMode::Daemon(r) => (
            Account::by_uid(0).map_err(DoctorError::LookingUpUser)?,
            r.clone(),
        ),
        NixMode::SingleUser(r) => (me.clone(), r.clone()),
    };
    let can_check = user.can_run_as();
    let ssh_view = SshView {
        user: user.name.clone(),
        uid: user.uid,
        home: user.home.display().to_string(),
        reason,
        can_check,
    };

    let mut checks = Vec::new();
    // The builder list.
    let machines_file = opts.machines_file.clone();
    let mut read = |p: &Path| -> std::io::Result<String> {
        let p = match (&machines_file, p == Path::new("/etc/nix/machines")) {
            (Some(m), true) => m.clone(),
            _ => p.to_path_buf(),
        };
        machines::read_limited(&p)
    };
    let (builders, conf_problems) = if opts.uris.is_empty() {
        let conf = nixconf::read(&opts.nix_conf, &mut nixconf::read_limited);
        let b = &conf.builders;
        let src = BuildersSource {
            value: b.value.clone(),
            file: b.file.as_ref().map(|f| f.display().to_string()),
            line: b.line,
            source: if b.file.is_some() {
                "nix.conf"
            } else {
                "default"
            },
        };
        (src, conf.problems)
    } else {
        (
            BuildersSource {
                value: opts.uris.join(" ; "),
                file: None,
                line: 0,
                source: "command-line",
            },
            Vec::new(),
        )
    };
    let expansion = machines::expand(&builders.value, &opts.this_system, &mut read);

    checks.push(check_parse(&opts.nix_conf, &conf_problems, &expansion));
    checks.push(check_disabled(&builders, &expansion, opts));
    checks.push(check_duplicates(&expansion.machines));

    let tmp = tempfile::Builder::new()
        .prefix("vmdisk-doctor-")
        .tempdir()
        .map_err(DoctorError::CreatingTempDir)?;
    if !user.is_root() && user.uid != me.uid && me.is_root() {
        // The ssh user must read the pinned host key file, as nix's own temp dir would be
        // theirs. Best effort: without it ssh reports the file unreadable, which we show.
        let _ = std::os::unix::fs::chown(tmp.path(), Some(user.uid), Some(user.gid));
    }
    let ctx = Ctx {
        opts,
        user: &user,
        tmp: tmp.path(),
    };
    let mut machines = Vec::new();
    for (i, m) in expansion.machines.iter().enumerate() {
        machines.push(MachineReport {
            machine: m.clone(),
            checks: ctx.machine(i, m),
        });
    }
    let mut report = Report {
        ok: true,
        elapsed_ms: 0,
        ssh_view,
        builders,
        checks,
        machines,
    };
    report.elapsed_ms = t0.elapsed().as_millis() as u64;
    report.finish();
    Ok(report)
}

fn check_parse(conf: &Path, conf_problems: &[String], e: &machines::Expansion) -> Check {
    let mut bad: Vec<String> = conf_problems.to_vec();
    for err in &e.errors {
        bad.push(format!("{}: {}", err.origin, err.message));
    }
    for f in &e.files {
        match f {
            FileRead::Unreadable { path, error } => {
                bad.push(format!("{}: cannot be read: {error}", path.display()))
            }
            FileRead::TooDeep { path } => bad.push(format!(
                "{}: @-files nested deeper than {} (a loop)",
                path.display(),
                machines::MAX_INCLUDE_DEPTH
            )),
            _ => {}
        }
    }
    if e.truncated {
        bad.push(format!(
            "more than {} machines; the rest were not read",
            machines::MAX_MACHINES
        ));
    }
    let files: Vec<String> = e
        .files
        .iter()
        .map(|f| match f {
            FileRead::Read { path, entries } => format!("{}: {entries} entries", path.display()),
            FileRead::Missing { path } => {
                format!("{}: does not exist (nix skips it silently)", path.display())
            }
            FileRead::Unreadable { path, .. } => format!("{}: unreadable", path.display()),
            FileRead::TooDeep { path } => format!("{}: too deep", path.display()),
        })
        .collect();
    if bad.is_empty() {
        Check::pass(
            "machines-parse",
            format!("{} machine(s) read", e.machines.len()),
        )
        .with_evidence(files)
    } else {
        Check::fail(
            "machines-parse",
            "machines-invalid",
            format!("{} line(s) nix refuses or cannot read", bad.len()),
            "nix stops with these errors (for a machines line) or ignores the setting (nix.conf)",
            format!(
                "correct the lines named above (machines format: URI SYSTEMS KEY MAX-JOBS \
                 SPEED SUPPORTED-FEATURES MANDATORY-FEATURES BASE64-HOST-KEY, `-` for a \
                 default; nix.conf: {})",
                conf.display()
            ),
        )
        .with_evidence(bad.into_iter().chain(files))
    }
}

fn check_disabled(b: &BuildersSource, e: &machines::Expansion, opts: &Options) -> Check {
    let at = match &b.file {
        Some(f) => format!("{f}:{}", b.line),
        None => "nix's default".into(),
    };
    if b.value.trim().is_empty() {
        return Check::fail(
            "builders-disabled",
            "builders-empty",
            "`builders` is set to the empty string: nix uses no remote builder at all",
            format!(
                "{at} sets `builders =`; an empty value disables every builder, the machines \
                 file included (NixOS and nix-darwin write it whenever nix.distributedBuilds is \
                 false; `nix.settings.builders = \"\"` does the same)"
            ),
            "NixOS / nix-darwin: `nix.distributedBuilds = true;` and describe the machines in \
             `nix.buildMachines` (do not set nix.settings.builders); elsewhere: remove the line \
             or write `builders = @/etc/nix/machines`",
        )
        .with_evidence([format!("{at}: builders = {:?}", b.value)]);
    }
    if e.machines.is_empty() {
        let missing: Vec<String> = e
            .files
            .iter()
            .filter_map(|f| match f {
                FileRead::Missing { path } => Some(path.display().to_string()),
                _ => None,
            })
            .collect();
        let shown = match &opts.machines_file {
            Some(m) => format!(" (read as {})", m.display()),
            None => String::new(),
        };
        return Check::fail(
            "builders-disabled",
            "no-machines",
            format!("`builders = {}` names no machine{shown}", b.value),
            if missing.is_empty() {
                "the builder list is there but holds no machine".to_string()
            } else {
                format!(
                    "{} does not exist, and nix skips a missing @FILE without a word",
                    missing.join(", ")
                )
            },
            "NixOS / nix-darwin: `nix.distributedBuilds = true;` with `nix.buildMachines`; \
             elsewhere write one line per machine to /etc/nix/machines",
        )
        .with_evidence([format!("{at}: builders = {}", b.value)]);
    }
    Check::pass(
        "builders-disabled",
        format!(
            "builders enabled: {} machine(s) from `{}`",
            e.machines.len(),
            b.value
        ),
    )
}

fn check_duplicates(ms: &[Machine]) -> Check {
    let mut by_uri: BTreeMap<&str, Vec<&Machine>> = BTreeMap::new();
    for m in ms {
        by_uri.entry(m.uri.as_str()).or_default().push(m);
    }
    let dups: Vec<(&str, Vec<&Machine>)> =
        by_uri.into_iter().filter(|(_, v)| v.len() > 1).collect();
    if dups.is_empty() {
        return Check::pass("duplicate-machines", "every machine is listed once");
    }
    let mut ev = Vec::new();
    for (uri, v) in &dups {
        for m in v {
            ev.push(format!("{}: {uri}", m.origin));
        }
    }
    Check::fail(
        "duplicate-machines",
        "duplicate-machines",
        format!("{} machine(s) listed more than once", dups.len()),
        "nix.buildMachines is a list that modules append to (nix-darwin's nix.linux-builder adds \
         its own entry), so a machine declared again is tried twice and each failure is printed \
         twice",
        "keep one line per machine: remove the extra `nix.buildMachines` entry, or replace the \
         list with `nix.buildMachines = lib.mkForce [ ... ];`",
    )
    .with_evidence(ev)
}

struct Ctx<'a> {
    opts: &'a Options,
    user: &'a Account,
    tmp: &'a Path,
}

/// What the network steps learnt, for the later ones.
struct Reach {
    addr: Option<SocketAddr>,
}

fn timed(f: impl FnOnce() -> Check) -> Check {
    let t = Instant::now();
    let mut c = f();
    c.elapsed_ms = t.elapsed().as_millis() as u64;
    c
}

fn last_lines(text: &str, n: usize) -> Vec<String> {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '@'))
        .collect();
    lines[lines.len().saturating_sub(n)..]
        .iter()
        .map(|l| l.to_string())
        .collect()
}

impl Ctx<'_> {
    fn machine(&self, idx: usize, m: &Machine) -> Vec<Check> {
        let mut out = Vec::new();
        let uri = match SshUri::parse(&m.uri) {
            Ok(u) => u,
            Err(e) => {
                out.push(Check::skip("ssh-config", format!("not checked: {e}")));
                return out;
            }
        };
        if uri.is_fake_ssh() {
            out.push(Check::skip(
                "ssh-config",
                "ssh://localhost is nix's \"fake ssh\": it runs the store command locally, \
                 without ssh",
            ));
            return out;
        }
        if !self.user.can_run_as() {
            out.push(Check::skip(
                "ssh-config",
                format!(
                    "nix runs ssh as {} here; run `sudo vmdisk doctor builder` to check as {}, \
                     or `--as-user {}` to check as yourself",
                    self.user.name,
                    self.user.name,
                    account::user_name(account::current_uid()).unwrap_or_default()
                ),
            ));
            return out;
        }
        let key = m
            .ssh_key
            .clone()
            .or_else(|| uri.params.get("ssh-key").filter(|k| !k.is_empty()).cloned());
        let pinned = m.public_host_key.clone().or_else(|| {
            uri.params
                .get("base64-ssh-public-host-key")
                .filter(|k| !k.is_empty())
                .cloned()
        });

        // nix's arguments.
        let mut args: Vec<String> = Vec::new();
        let mut sshopts_problem = None;
        if let Some(o) = &self.opts.nix_sshopts {
            match vmdisk_ssh::shell::split(o) {
                Ok(w) => args.extend(w),
                Err(e) => sshopts_problem = Some(format!("NIX_SSHOPTS {o:?}: {e}")),
            }
        }
        if let Some(k) = &key {
            args.push("-i".into());
            args.push(k.clone());
        }
        let mut pinned_key: Option<Result<PublicKey, String>> = None;
        if let Some(p) = &pinned {
            let file = self.tmp.join(format!("host-key-{idx}"));
            let decoded = vmdisk_ssh::hostkey::base64_decode(p)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
                .unwrap_or_default();
            // As nix writes it: the host of the URI, a space, the decoded field.
            let _ = std::fs::write(&file, format!("{} {}\n", uri.host, decoded.trim()));
            args.push(format!("-oUserKnownHostsFile={}", file.display()));
            pinned_key = Some(PublicKey::from_machines_field(p).map_err(|e| e.to_string()));
        }
        if uri.compress() {
            args.push("-C".into());
        }
        if let Some(p) = uri.port {
            args.push(format!("-p{p}"));
        }
        let dest = uri.destination();

        // ssh-config
        let cfg_check_t = Instant::now();
        let g = self.ssh_local(&args, &["-G"], &dest);
        let cfg = match g {
            Ok(o) if o.status == Some(0) => EffectiveConfig::parse(&o.stdout_text()),
            Ok(o) => {
                out.push(
                    Check::fail(
                        "ssh-config",
                        "ssh-config-invalid",
                        "ssh refuses the options nix would give it",
                        "ssh -G fails on the configuration and options nix passes (NIX_SSHOPTS, \
                         the key, the pinned host key file)",
                        format!(
                            "correct the option ssh names (in NIX_SSHOPTS or ~{}/.ssh/config)",
                            self.user.name
                        ),
                    )
                    .with_evidence(last_lines(&o.stderr_text(), 4)),
                );
                return out;
            }
            Err(e) => {
                out.push(Check::fail(
                    "ssh-config",
                    "ssh-not-runnable",
                    format!("cannot run {}: {e}", self.opts.ssh.display()),
                    "nix runs `ssh` from PATH",
                    "install OpenSSH's client",
                ));
                return out;
            }
        };
        let mut c = Check::pass(
            "ssh-config",
            format!(
                "ssh as {} connects to {}@{}:{}",
                self.user.name, cfg.user, cfg.hostname, cfg.port
            ),
        )
        .with_evidence([format!("ssh {} {dest}", args.join(" "))]);
        if let Some(p) = sshopts_problem {
            c = Check::warn(
                "ssh-config",
                "nix-sshopts-unparsable",
                c.summary.clone(),
                p,
                "quote NIX_SSHOPTS the way a POSIX shell would",
            );
        }
        c.elapsed_ms = cfg_check_t.elapsed().as_millis() as u64;
        out.push(c);

        // Network.
        let reach = self.network(&cfg, &mut out);
        if reach.addr.is_none() && !cfg.is_proxied() {
            for id in ["host-key", "key-file", "key-readable", "auth", "remote-nix"] {
                out.push(Check::skip(
                    id,
                    "not checked: the SSH port is not reachable",
                ));
            }
            return out;
        }

        // Like nix, one master connection carries the sessions after the login.
        let control = self.tmp.join(format!("cm-{idx}"));
        args.extend([
            "-oControlMaster=auto".to_string(),
            format!("-oControlPath={}", control.display()),
            format!("-oControlPersist={}", CONTROL_PERSIST_SECS),
        ]);
        let checks_after_login = self.after_network(
            &args,
            &dest,
            &uri,
            m,
            &cfg,
            key.as_deref(),
            pinned_key.as_ref(),
        );
        if control.exists() {
            let _ = self.ssh_local(
                &[format!("-oControlPath={}", control.display())],
                &["-O", "exit"],
                &dest,
            );
        }
        out.extend(checks_after_login);
        out
    }

    #[allow(clippy::too_many_arguments)]
    fn after_network(
        &self,
        args: &[String],
        dest: &str,
        uri: &SshUri,
        m: &Machine,
        cfg: &EffectiveConfig,
        key: Option<&str>,
        pinned_key: Option<&Result<PublicKey, String>>,
    ) -> Vec<Check> {
        // The host key scan and the login are independent connections: run them side by
        // side, as the remote nix check and the probe (sessions over the master) are.
        let key_path = key.map(|k| expand_tilde(k, &self.user.home));
        let (host_key, key_file, key_readable, auth) = std::thread::scope(|s| {
            let hk = s.spawn(|| timed(|| self.host_key(cfg, pinned_key)));
            let kf = timed(|| self.key_file(key_path.as_deref(), cfg));
            let kr = timed(|| self.key_readable(key_path.as_deref()));
            let auth = timed(|| self.auth(args, dest, key, cfg));
            let hk = hk
                .join()
                .unwrap_or_else(|_| Check::skip("host-key", "the check's thread panicked"));
            (hk, kf, kr, auth)
        });
        let auth_ok = auth.passed();
        let mut out = vec![host_key, key_file, key_readable, auth];
        if !auth_ok {
            out.push(Check::skip(
                "remote-nix",
                "not checked: no SSH login (auth)",
            ));
            out.push(Check::skip("systems", "not checked: no SSH login (auth)"));
            out.push(Check::skip("features", "not checked: no SSH login (auth)"));
            return out;
        }
        let (nix, rest) = std::thread::scope(|s| {
            let nix = s.spawn(|| timed(|| self.remote_nix(args, dest, uri)));
            let rest = self.systems_and_features(args, dest, m);
            let nix = nix
                .join()
                .unwrap_or_else(|_| Check::skip("remote-nix", "the check's thread panicked"));
            (nix, rest)
        });
        out.push(nix);
        out.extend(rest);
        out
    }

    /// Run a local OpenSSH program as the ssh user.
    fn run_as(
        &self,
        program: &Path,
        args: &[String],
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<vmdisk_ssh::Output, vmdisk_ssh::RunError> {
        let mut c = Command::new(program);
        c.args(args);
        self.user.run_as(&mut c);
        vmdisk_ssh::run_bounded(&mut c, stdin, timeout)
    }

    fn ssh_local(
        &self,
        args: &[String],
        extra: &[&str],
        dest: &str,
    ) -> Result<vmdisk_ssh::Output, vmdisk_ssh::RunError> {
        let mut a: Vec<String> = args.to_vec();
        a.extend(extra.iter().map(|s| s.to_string()));
        a.push(dest.into());
        self.run_as(&self.opts.ssh, &a, None, LOCAL_TIMEOUT)
    }

    /// ssh to the builder as nix would, with BatchMode and a connect timeout.
    fn ssh_remote(
        &self,
        args: &[String],
        dest: &str,
        command: &str,
        stdin: Option<&[u8]>,
    ) -> Result<vmdisk_ssh::Output, vmdisk_ssh::RunError> {
        let mut a: Vec<String> = args.to_vec();
        a.push("-oBatchMode=yes".into());
        a.push(format!("-oConnectTimeout={}", CONNECT_TIMEOUT.as_secs()));
        a.push("-T".into());
        a.push(dest.into());
        a.push(command.into());
        self.run_as(&self.opts.ssh, &a, stdin, self.opts.ssh_timeout)
    }

    fn network(&self, cfg: &EffectiveConfig, out: &mut Vec<Check>) -> Reach {
        if cfg.is_proxied() {
            let via = cfg
                .proxy_jump
                .clone()
                .or_else(|| cfg.proxy_command.clone())
                .unwrap_or_default();
            for id in ["host-resolves", "port-open", "ssh-banner"] {
                out.push(Check::skip(
                    id,
                    format!("ssh reaches {} through {via}", cfg.hostname),
                ));
            }
            return Reach { addr: None };
        }
        let name_fix = format!(
            "make `{h}` resolve for {u}: add `127.0.0.1 {h}` to /etc/hosts (NixOS: \
             networking.hosts.\"127.0.0.1\" = [ \"{h}\" ]; nix-darwin: an activation script), or \
             give ssh a `Host {h}` block with `HostName 127.0.0.1` in ~{u}/.ssh/config (or \
             /etc/ssh/ssh_config), the config of the user nix runs ssh as",
            h = cfg.hostname,
            u = self.user.name
        );
        // host-resolves
        let t = Instant::now();
        let (host, port) = (cfg.hostname.clone(), cfg.port);
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(
                (host.as_str(), port)
                    .to_socket_addrs()
                    .map(|a| a.collect::<Vec<_>>()),
            );
        });
        let addrs = match rx.recv_timeout(RESOLVE_TIMEOUT) {
            Ok(Ok(a)) if !a.is_empty() => a,
            Ok(r) => {
                let why = match r {
                    Err(e) => e.to_string(),
                    Ok(_) => "no addresses".into(),
                };
                let mut c = Check::fail(
                    "host-resolves",
                    SshFailureKind::Unresolvable.id(),
                    format!("`{}` does not resolve", cfg.hostname),
                    SshFailureKind::Unresolvable.cause(),
                    name_fix,
                )
                .with_evidence([format!(
                    "ssh: Could not resolve hostname {}: {why}",
                    cfg.hostname
                )]);
                c.elapsed_ms = t.elapsed().as_millis() as u64;
                out.push(c);
                out.push(Check::skip(
                    "port-open",
                    "not checked: the name does not resolve",
                ));
                out.push(Check::skip(
                    "ssh-banner",
                    "not checked: the name does not resolve",
                ));
                return Reach { addr: None };
            }
            Err(_) => {
                let mut c = Check::fail(
                    "host-resolves",
                    "resolve-timeout",
                    format!(
                        "resolving `{}` took longer than {}s",
                        cfg.hostname,
                        RESOLVE_TIMEOUT.as_secs()
                    ),
                    "the resolver does not answer (DNS down or slow)",
                    name_fix,
                );
                c.elapsed_ms = t.elapsed().as_millis() as u64;
                out.push(c);
                out.push(Check::skip(
                    "port-open",
                    "not checked: the name does not resolve",
                ));
                out.push(Check::skip(
                    "ssh-banner",
                    "not checked: the name does not resolve",
                ));
                return Reach { addr: None };
            }
        };
        let mut c = Check::pass(
            "host-resolves",
            format!(
                "{} -> {}",
                cfg.hostname,
                addrs
                    .iter()
                    .map(|a| a.ip().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        );
        c.elapsed_ms = t.elapsed().as_millis() as u64;
        out.push(c);

        // port-open
        let t = Instant::now();
        let mut errors = Vec::new();
        let mut open = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(_) => {
                    open = Some(*a);
                    break;
                }
                Err(e) => errors.push((a, e)),
            }
        }
        let Some(addr) = open else {
            let refused = errors
                .iter()
                .any(|(_, e)| e.kind() == std::io::ErrorKind::ConnectionRefused);
            let kind = if refused {
                SshFailureKind::ConnectionRefused
            } else {
                SshFailureKind::ConnectTimeout
            };
            let mut c = Check::fail(
                "port-open",
                kind.id(),
                format!(
                    "nothing accepts connections on {}:{}",
                    cfg.hostname, cfg.port
                ),
                kind.cause(),
                format!(
                    "start the builder (VM) and check the port: for a qemu VM, \
                     `-nic user,hostfwd=tcp:127.0.0.1:{p}-:22`; nix-darwin's linux-builder \
                     listens on 31022; the port comes from the URI (`ssh://host:PORT`) or `Port` \
                     in ~{u}/.ssh/config",
                    p = cfg.port,
                    u = self.user.name
                ),
            )
            .with_evidence(errors.iter().map(|(a, e)| format!("connect to {a}: {e}")));
            c.elapsed_ms = t.elapsed().as_millis() as u64;
            out.push(c);
            out.push(Check::skip("ssh-banner", "not checked: the port is closed"));
            return Reach { addr: None };
        };
        let mut c = Check::pass("port-open", format!("{addr} accepts connections"));
        c.elapsed_ms = t.elapsed().as_millis() as u64;
        out.push(c);

        // ssh-banner
        let t = Instant::now();
        let c = match vmdisk_ssh::banner::read_banner(addr, CONNECT_TIMEOUT, BANNER_TIMEOUT) {
            Ok(line) if vmdisk_ssh::banner::is_ssh2(&line) => Check::pass("ssh-banner", line),
            Ok(line) => Check::fail(
                "ssh-banner",
                "not-ssh2",
                format!("{addr} speaks an SSH protocol OpenSSH does not: {line}"),
                "the server is not an SSH-2 server",
                "point the URI at the builder's sshd",
            ),
            Err(e) => {
                let kind = match e {
                    vmdisk_ssh::banner::BannerError::NoBanner { .. } => {
                        SshFailureKind::BannerTimeout
                    }
                    _ => SshFailureKind::ClosedBeforeBanner,
                };
                Check::fail(
                    "ssh-banner",
                    kind.id(),
                    e.to_string(),
                    format!(
                        "{}; a VM's port forward accepts before the guest's sshd is up",
                        kind.cause()
                    ),
                    "wait for the builder to finish booting (is its sshd enabled? \
                     services.openssh.enable = true;), or check that the port forwards to the \
                     guest's port 22",
                )
            }
        };
        let mut c = c;
        c.elapsed_ms = t.elapsed().as_millis() as u64;
        let ok = c.passed();
        out.push(c);
        Reach {
            addr: ok.then_some(addr),
        }
    }

    fn host_key(&self, cfg: &EffectiveConfig, pinned: Option<&Result<PublicKey, String>>) -> Check {
        let mut scan_args = vec![
            "-T".to_string(),
            (KEYSCAN_TIMEOUT.as_secs() - 1).max(1).to_string(),
            "-p".into(),
            cfg.port.to_string(),
        ];
        // With a key pinned, only its type matters (each type scanned costs a key exchange).
        if let Some(Ok(k)) = pinned {
            if let Some(t) = keyscan_type(&k.kind) {
                scan_args.extend(["-t".to_string(), t.to_string()]);
            }
        }
        scan_args.push(cfg.hostname.clone());
        let scan = self.run_as(&self.opts.ssh_keyscan, &scan_args, None, KEYSCAN_TIMEOUT);
        let offered = match &scan {
            Ok(o) => parse_keyscan(&o.stdout_text()),
            Err(_) => Vec::new(),
        };
        if offered.is_empty() {
            let why = match &scan {
                Ok(o) => last_lines(&o.stderr_text(), 3),
                Err(e) => vec![e.to_string()],
            };
            return Check::fail(
                "host-key",
                "host-key-unreadable",
                "ssh-keyscan got no host key from the builder",
                "the server offered no host key ssh-keyscan could read",
                "check the builder's sshd (HostKey lines in sshd_config)",
            )
            .with_evidence(why);
        }
        let best = offered
            .iter()
            .find(|k| k.kind == "ssh-ed25519")
            .unwrap_or(&offered[0]);
        let offered_ev: Vec<String> = offered
            .iter()
            .map(|k| format!("the builder offers {} {}", k.short_kind(), k.fingerprint()))
            .collect();
        let field_fix = format!(
            "set the machine's last column (base64 host key) to {} — that is `{}` base64-encoded \
             (nix.buildMachines.*.publicHostKey = \"{}\";)",
            best.to_machines_field(),
            best.to_line(),
            best.to_machines_field()
        );
        if let Some(p) = pinned {
            return match p {
                Err(e) => Check::fail(
                    "host-key",
                    "pinned-key-invalid",
                    format!("the pinned host key (column 8) is not a public key line: {e}"),
                    "nix writes the decoded column into a known_hosts file; ssh then ignores \
                     the line and refuses the host",
                    field_fix,
                ),
                Ok(k) if offered.contains(k) => Check::pass(
                    "host-key",
                    format!(
                        "the pinned {} key {} matches",
                        k.short_kind(),
                        k.fingerprint()
                    ),
                ),
                Ok(k) => Check::fail(
                    "host-key",
                    SshFailureKind::HostKeyChanged.id(),
                    format!(
                        "the pinned {} key {} is not the builder's",
                        k.short_kind(),
                        k.fingerprint()
                    ),
                    "the machines file pins a host key the builder does not have (a rebuilt VM \
                     generates new host keys; nix-darwin's linux-builder pins a fixed key); ssh \
                     stops with `Host key verification failed`",
                    field_fix,
                )
                .with_evidence(
                    std::iter::once(format!("pinned {} {}", k.short_kind(), k.fingerprint()))
                        .chain(offered_ev),
                ),
            };
        }
        if cfg.ignores_host_keys() {
            return Check::warn(
                "host-key",
                "host-key-unchecked",
                "StrictHostKeyChecking is off: ssh accepts any host key",
                "a changed builder key is accepted silently",
                field_fix,
            )
            .with_evidence(offered_ev);
        }
        // known_hosts, as the ssh user's ssh reads them.
        let name = known_hosts_name(cfg.host_key_name(), cfg.port);
        let files: Vec<PathBuf> = cfg
            .user_known_hosts
            .iter()
            .chain(cfg.global_known_hosts.iter())
            .map(|f| expand_tilde(f, &self.user.home))
            .collect();
        let mut known: Vec<(PathBuf, PublicKey)> = Vec::new();
        for f in &files {
            if !f.exists() {
                continue;
            }
            let Ok(o) = self.run_as(
                &self.opts.ssh_keygen,
                &[
                    "-F".into(),
                    name.clone(),
                    "-f".into(),
                    f.display().to_string(),
                ],
                None,
                LOCAL_TIMEOUT,
            ) else {
                continue;
            };
            for k in parse_keyscan(&o.stdout_text()) {
                known.push((f.clone(), k));
            }
        }
        if let Some((f, k)) = known.iter().find(|(_, k)| offered.contains(k)) {
            return Check::pass(
                "host-key",
                format!(
                    "{} key {} known for {name} in {}",
                    k.short_kind(),
                    k.fingerprint(),
                    f.display()
                ),
            );
        }
        if let Some((f, _)) = known.first() {
            return Check::fail(
                "host-key",
                SshFailureKind::HostKeyChanged.id(),
                format!("{} knows another key for {name}", f.display()),
                "the builder's host key changed since it was recorded (a rebuilt VM); ssh stops \
                 with `REMOTE HOST IDENTIFICATION HAS CHANGED`",
                format!(
                    "if the change is expected: `ssh-keygen -R '{name}' -f {}` (as {}), then \
                     pin the key in the machines file instead: {field_fix}",
                    f.display(),
                    self.user.name
                ),
            )
            .with_evidence(
                known
                    .iter()
                    .map(|(f, k)| {
                        format!("{} has {} {}", f.display(), k.short_kind(), k.fingerprint())
                    })
                    .chain(offered_ev),
            );
        }
        if cfg.accepts_unknown_host_keys() {
            return Check::warn(
                "host-key",
                "host-key-accept-new",
                format!("no key known for {name}; StrictHostKeyChecking=accept-new records it"),
                "the first connection trusts whatever key it sees",
                field_fix,
            )
            .with_evidence(offered_ev);
        }
        Check::fail(
            "host-key",
            SshFailureKind::HostKeyUnknown.id(),
            format!(
                "no host key is pinned and {}'s known_hosts has none for {name}",
                self.user.name
            ),
            format!(
                "ssh run by nix cannot ask whether to trust the key, so it stops with `Host key \
                 verification failed`; {}'s known_hosts count here, not yours",
                self.user.name
            ),
            format!(
                "{field_fix}; or record it for {}: `ssh-keyscan -p {} {} >> {}`",
                self.user.name,
                cfg.port,
                cfg.hostname,
                files
                    .first()
                    .map(|f| f.display().to_string())
                    .unwrap_or_else(|| "~/.ssh/known_hosts".into())
            ),
        )
        .with_evidence(
            files
                .iter()
                .map(|f| format!("looked in {}", f.display()))
                .chain(offered_ev),
        )
    }

    fn key_file(&self, key: Option<&Path>, cfg: &EffectiveConfig) -> Check {
        let Some(key) = key else {
            return Check::pass(
                "key-file",
                format!(
                    "no key in the machines file: ssh tries {}",
                    cfg.identity_files.join(", ")
                ),
            );
        };
        let meta = match std::fs::metadata(key) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Check::fail(
                    "key-file",
                    SshFailureKind::KeyMissing.id(),
                    format!("{} does not exist", key.display()),
                    "the machines file names a private key that is not there; ssh goes on \
                     without it and the builder refuses the login",
                    format!(
                        "create it (`ssh-keygen -t ed25519 -N '' -f {k}`) and authorize \
                         {k}.pub on the builder, or correct the key column",
                        k = key.display()
                    ),
                )
            }
            Err(e) => {
                return Check::fail(
                    "key-file",
                    "key-unstat-able",
                    format!("cannot stat {}: {e}", key.display()),
                    "a directory on the way is not searchable",
                    "check the modes of the directories above the key",
                )
            }
        };
        let mode = meta.permissions().mode() & 0o7777;
        let owner = account::user_name(meta.uid()).unwrap_or_else(|| meta.uid().to_string());
        let group = account::group_name(meta.gid()).unwrap_or_else(|| meta.gid().to_string());
        let ev = format!("{}: mode {mode:04o}, owner {owner}:{group}", key.display());
        if !meta.is_file() {
            return Check::fail(
                "key-file",
                "key-not-a-file",
                format!("{} is not a regular file", key.display()),
                "ssh cannot load a key from it",
                "point the key column at the private key file",
            )
            .with_evidence([ev]);
        }
        // OpenSSH (sshkey_perm_ok) refuses a key that group or others can read only when the
        // user running ssh owns it.
        if mode & 0o077 != 0 && meta.uid() == self.user.uid {
            return Check::fail(
                "key-file",
                SshFailureKind::UnprotectedKey.id(),
                format!(
                    "{} is mode {mode:04o}: ssh run by {} ignores it",
                    key.display(),
                    self.user.name
                ),
                "ssh refuses a private key that group or others can read (`WARNING: \
                 UNPROTECTED PRIVATE KEY FILE!`) when the user running it owns the file",
                format!("chmod 600 {}", key.display()),
            )
            .with_evidence([ev]);
        }
        Check::pass("key-file", ev)
    }

    fn key_readable(&self, key: Option<&Path>) -> Check {
        let Some(key) = key else {
            return Check::skip("key-readable", "no key in the machines file");
        };
        if !key.is_file() {
            return Check::skip("key-readable", "not checked: no key file");
        }
        // The kernel decides, for the ssh user with all its groups.
        let out = self.run_as(
            Path::new("head"),
            &["-c".into(), "1".into(), key.display().to_string()],
            None,
            LOCAL_TIMEOUT,
        );
        match out {
            Ok(o) if o.status == Some(0) => Check::pass(
                "key-readable",
                format!("{} can read {}", self.user.name, key.display()),
            ),
            Ok(o) => {
                let me = account::user_name(account::current_uid()).unwrap_or_default();
                let other = if self.user.is_root() {
                    String::new()
                } else {
                    format!(
                        "; or, if a nix-daemon should do the building (it runs ssh as root), \
                         use a multi-user install; `sudo nix build` works only because root \
                         can read it (checked as {me})"
                    )
                };
                Check::fail(
                    "key-readable",
                    SshFailureKind::KeyUnreadable.id(),
                    format!("{} cannot read {}", self.user.name, key.display()),
                    format!(
                        "nix runs ssh as {} here, and ssh cannot load the key (`Load key \"{}\": \
                         Permission denied`), so the builder refuses the login",
                        self.user.name,
                        key.display()
                    ),
                    format!(
                        "give {u} its own copy: `install -m 600 -o {u} {k} ~{u}/.ssh/builder_key` \
                         and name that in the key column{other}",
                        u = self.user.name,
                        k = key.display()
                    ),
                )
                .with_evidence(last_lines(&o.stderr_text(), 2))
            }
            Err(e) => Check::skip("key-readable", format!("not checked: {e}")),
        }
    }

    fn auth(&self, args: &[String], dest: &str, key: Option<&str>, cfg: &EffectiveConfig) -> Check {
        let out = match self.ssh_remote(args, dest, "echo vmdisk-doctor-login", None) {
            Ok(o) => o,
            Err(e) => {
                return Check::fail(
                    "auth",
                    if e.is_timeout() {
                        "ssh-timeout"
                    } else {
                        "ssh-not-runnable"
                    },
                    e.to_string(),
                    "ssh did not finish",
                    "see the evidence; a hanging login usually means a ProxyCommand or a \
                     prompt",
                )
            }
        };
        let stderr = out.stderr_text();
        if out.status == Some(0) && out.stdout_text().contains("vmdisk-doctor-login") {
            return Check::pass(
                "auth",
                format!(
                    "{} logged in as {}@{} in {} ms",
                    self.user.name,
                    cfg.user,
                    cfg.hostname,
                    out.elapsed.as_millis()
                ),
            );
        }
        let ev = last_lines(&stderr, 6);
        let pubkey = key
            .map(|k| format!("{k}.pub"))
            .unwrap_or_else(|| "your public key".into());
        match vmdisk_ssh::classify(&stderr) {
            Some(f) => {
                let fix = match f.kind {
                    SshFailureKind::AuthRefused => format!(
                        "authorize the key on the builder: append {pubkey} to ~{ru}/.ssh/authorized_keys \
                         there (`ssh-copy-id -i {pubkey} -p {p} {ru}@{h}`; NixOS builder: \
                         users.users.{ru}.openssh.authorizedKeys.keys)",
                        ru = cfg.user,
                        p = cfg.port,
                        h = cfg.hostname
                    ),
                    SshFailureKind::UnprotectedKey => {
                        format!("chmod 600 {}", key.unwrap_or("the key"))
                    }
                    SshFailureKind::HostKeyChanged | SshFailureKind::HostKeyUnknown => {
                        "see the host-key check above".into()
                    }
                    SshFailureKind::KeyMissing | SshFailureKind::KeyUnreadable => {
                        "see the key-file and key-readable checks above".into()
                    }
                    _ => "see the network checks above".into(),
                };
                Check::fail(
                    "auth",
                    f.kind.id(),
                    format!("ssh as {} failed: {}", self.user.name, f.evidence),
                    f.kind.cause(),
                    fix,
                )
                .with_evidence(ev)
            }
            None if out.status == Some(255) => Check::fail(
                "auth",
                "ssh-failed",
                format!("ssh as {} failed", self.user.name),
                "ssh exited 255 with a message no known signature matches",
                "see the evidence (ssh's last lines)",
            )
            .with_evidence(ev),
            None => Check::fail(
                "auth",
                "login-refused",
                format!(
                    "logged in, but the remote shell did not run a command (exit {:?})",
                    out.status
                ),
                "the account's shell or a ForceCommand refuses commands",
                format!(
                    "give {} on the builder a login shell (NixOS: users.users.{}.useDefaultShell \
                     = true)",
                    cfg.user, cfg.user
                ),
            )
            .with_evidence(ev),
        }
    }

    fn remote_nix(&self, args: &[String], dest: &str, uri: &SshUri) -> Check {
        let program = uri.remote_program();
        let no_nix_fix = format!(
            "install Nix on the builder for {}, or name its full path in the URI: \
             `{}://{}?remote-program=/nix/var/nix/profiles/default/bin/{}` (a non-interactive \
             ssh shell may not have Nix on PATH)",
            dest,
            uri.protocol.scheme(),
            uri.authority(),
            uri.protocol.default_remote_program()
        );
        match uri.protocol {
            Protocol::Ssh => {
                let cmd = format!("{} --version", vmdisk_ssh::shell::quote(&program));
                match self.ssh_remote(args, dest, &cmd, None) {
                    Ok(o) if o.status == Some(0) => {
                        Check::pass("remote-nix", format!("`{cmd}`: {}", o.stdout_text().trim()))
                    }
                    Ok(o) => Check::fail(
                        "remote-nix",
                        "no-remote-nix",
                        format!("`{cmd}` failed on the builder (exit {:?})", o.status),
                        "nix starts `nix-store --serve --write` on an ssh:// builder; the \
                         builder's shell cannot run it",
                        no_nix_fix,
                    )
                    .with_evidence(last_lines(&o.stderr_text(), 3)),
                    Err(e) => Check::fail(
                        "remote-nix",
                        "ssh-timeout",
                        e.to_string(),
                        "the builder did not answer in time",
                        "see the evidence",
                    ),
                }
            }
            Protocol::SshNg => {
                let cmd = format!("{} --stdio", vmdisk_ssh::shell::quote(&program));
                let hello = WORKER_MAGIC_1.to_le_bytes();
                match self.ssh_remote(args, dest, &cmd, Some(&hello)) {
                    Ok(o)
                        if o.stdout.len() >= 8 && o.stdout[..8] == WORKER_MAGIC_2.to_le_bytes() =>
                    {
                        Check::pass("remote-nix", format!("`{cmd}` answers the worker protocol"))
                    }
                    Ok(o) => Check::fail(
                        "remote-nix",
                        "no-remote-nix",
                        format!(
                            "`{cmd}` did not answer the worker protocol (exit {:?})",
                            o.status
                        ),
                        "nix starts `nix-daemon --stdio` on an ssh-ng:// builder; the builder's \
                         shell cannot run it, or it is not a nix-daemon",
                        no_nix_fix,
                    )
                    .with_evidence(last_lines(&o.stderr_text(), 3)),
                    Err(e) => Check::fail(
                        "remote-nix",
                        "ssh-timeout",
                        e.to_string(),
                        "the builder did not answer in time",
                        "see the evidence",
                    ),
                }
            }
        }
    }

    fn systems_and_features(&self, args: &[String], dest: &str, m: &Machine) -> Vec<Check> {
        let mut out = Vec::new();
        let t = Instant::now();
        let arches: Vec<&probe::ProbeArch> = m
            .systems
            .iter()
            .filter_map(|s| probe::probe_arch(s))
            .collect();
        let script = probe::script(&arches);
        let res = self.ssh_remote(args, dest, "sh -s", Some(script.as_bytes()));
        let elapsed = t.elapsed().as_millis() as u64;
        let p = match res {
            Ok(o) => {
                let p = probe::parse_output(&o.stdout_text(), arches.len());
                if !p.complete {
                    let c = Check::fail(
                        "systems",
                        "probe-failed",
                        format!("the probe script did not finish (exit {:?})", o.status),
                        "the builder's shell could not run a POSIX sh script",
                        "see the evidence",
                    )
                    .with_evidence(last_lines(&o.stderr_text(), 4));
                    out.push(c);
                    out.push(Check::skip("features", "not checked: the probe failed"));
                    return out;
                }
                p
            }
            Err(e) => {
                out.push(Check::fail(
                    "systems",
                    "ssh-timeout",
                    e.to_string(),
                    "the builder did not run the probe in time",
                    "raise --timeout for a slow (emulated) builder",
                ));
                out.push(Check::skip("features", "not checked: the probe failed"));
                return out;
            }
        };
        for sys in &m.systems {
            let mut c = self.system(sys, &arches, &p);
            c.elapsed_ms = elapsed;
            out.push(c.about(sys.clone()));
        }
        out.push(features(m, &p));
        out
    }

    fn system(&self, sys: &str, arches: &[&probe::ProbeArch], p: &probe::ProbeOutput) -> Check {
        let Some(i) = arches.iter().position(|a| a.system == sys) else {
            if let Some(arch) = sys.strip_suffix("-darwin") {
                let native = p.kernel == "Darwin"
                    && (p.machine == arch || (arch == "aarch64" && p.machine == "arm64"));
                let rosetta = p.kernel == "Darwin" && arch == "x86_64" && p.rosetta == Some(true);
                if native || rosetta {
                    return Check::pass(
                        "systems",
                        format!(
                            "{sys}: {} {}{}",
                            p.kernel,
                            p.machine,
                            if rosetta { " with Rosetta 2" } else { "" }
                        ),
                    );
                }
                return Check::fail(
                    "systems",
                    "system-not-supported",
                    format!("{sys}: the builder is {} {}", p.kernel, p.machine),
                    "a Darwin system builds only on a Mac of that arch (x86_64 on Apple silicon \
                     needs Rosetta 2)",
                    format!("remove {sys} from the machine's systems column"),
                );
            }
            return Check::skip("systems", format!("{sys}: no probe for this system"));
        };
        let a = arches[i];
        let status = p.probes.get(i).copied().flatten();
        let elf = a.elf();
        let handler = p.binfmt.iter().find(|e| e.enabled && e.matches(&elf));
        if status == Some(PROBE_EXIT) {
            let how = if a.native_unames.contains(&p.machine.as_str()) {
                format!("native ({})", p.machine)
            } else if let Some(h) = handler {
                format!(
                    "through binfmt_misc `{}` ({}, flags {})",
                    h.name, h.interpreter, h.flags
                )
            } else {
                format!("on a {} kernel", p.machine)
            };
            return Check::pass(
                "systems",
                format!("{sys}: a static {sys} program ran, {how}"),
            );
        }
        let err = p.probe_errors.get(i).cloned().unwrap_or_default();
        let mut ev = vec![format!(
            "probe exit {}: {err}",
            status.map(|s| s.to_string()).unwrap_or_else(|| "?".into())
        )];
        ev.push(format!(
            "binfmt_misc: {}",
            p.binfmt_status.clone().unwrap_or_else(|| "?".into())
        ));
        for e in &p.binfmt {
            ev.push(format!(
                "binfmt entry {} ({}) {}",
                e.name,
                if e.enabled { "enabled" } else { "disabled" },
                e.interpreter
            ));
        }
        if let Some(h) = p.binfmt.iter().find(|e| e.matches(&elf)) {
            return Check::fail(
                "systems",
                "binfmt-broken",
                format!(
                    "{sys}: binfmt_misc `{}` claims it, but the program did not run",
                    h.name
                ),
                format!(
                    "the handler is {} or its interpreter {} cannot run (missing, or not \
                     static without the F flag inside the build sandbox)",
                    if h.enabled { "registered" } else { "disabled" },
                    h.interpreter
                ),
                format!(
                    "NixOS builder: boot.binfmt.emulatedSystems = [ \"{sys}\" ]; Debian: \
                     `apt-get install qemu-user-static binfmt-support`, then `update-binfmts \
                     --enable {}`",
                    h.name
                ),
            )
            .with_evidence(ev);
        }
        Check::fail(
            "systems",
            "no-binfmt",
            format!(
                "{sys}: the builder ({} {}) cannot run {sys} programs",
                p.kernel, p.machine
            ),
            format!(
                "the machine declares {sys}, but it is not the builder's own arch and no \
                 binfmt_misc handler emulates it, so every {sys} build fails with `Exec format \
                 error`"
            ),
            format!(
                "NixOS builder: boot.binfmt.emulatedSystems = [ \"{sys}\" ]; Debian builder: \
                 `apt-get install qemu-user-static binfmt-support`; or remove {sys} from the \
                 machine's systems column"
            ),
        )
        .with_evidence(ev)
    }
}

/// ssh-keyscan's `-t` name of a key type.
fn keyscan_type(kind: &str) -> Option<&'static str> {
    Some(match kind {
        "ssh-ed25519" => "ed25519",
        "ssh-rsa" => "rsa",
        "ssh-dss" => "dsa",
        "ecdsa-sha2-nistp256" | "ecdsa-sha2-nistp384" | "ecdsa-sha2-nistp521" => "ecdsa",
        "sk-ssh-ed25519@openssh.com" => "ed25519-sk",
        "sk-ecdsa-sha2-nistp256@openssh.com" => "ecdsa-sk",
        _ => return None,
    })
}

fn features(m: &Machine, p: &probe::ProbeOutput) -> Check {
    let declared = m.declared_features();
    let (present, from) = match &p.features {
        Some(f) => (f.clone(), "the builder's `nix config show system-features`"),
        None => (
            probe::default_features(p),
            "nix's defaults (the builder's nix could not say)",
        ),
    };
    let mut ev = vec![
        format!("declared: {}", declared.join(",")),
        format!("builder: {} (from {from})", present.join(",")),
        format!(
            "/dev/kvm: {}",
            match p.kvm {
                Kvm::Usable => "usable",
                Kvm::NoAccess => "present, not accessible to the build user",
                Kvm::Absent => "absent",
                Kvm::Unknown => "?",
            }
        ),
    ];
    let missing: Vec<&String> = declared.iter().filter(|f| !present.contains(f)).collect();
    let kvm_declared = declared.iter().any(|f| f == "kvm");
    if kvm_declared && p.kvm != Kvm::Usable {
        ev.push("a `kvm` build (NixOS tests) needs /dev/kvm on the builder".into());
        return Check::fail(
            "features",
            "kvm-missing",
            "the machine declares `kvm` but the builder has no usable /dev/kvm",
            "nix sends builds requiring kvm there, and they fail (or crawl under TCG)",
            "remove kvm from the machine's supported features, or give the builder VM nested \
             virtualisation (qemu `-enable-kvm -cpu host` on a host with /dev/kvm)",
        )
        .with_evidence(ev);
    }
    if !missing.is_empty() {
        let list: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
        return Check::fail(
            "features",
            "feature-missing",
            format!(
                "declared but not offered by the builder: {}",
                list.join(",")
            ),
            "nix sends builds that require these features there; the builder's nix refuses them \
             (`required system or feature not available`)",
            format!(
                "on the builder: nix.settings.system-features = [ {} ]; or drop them from the \
                 machine's features columns",
                present
                    .iter()
                    .chain(list.iter())
                    .map(|f| format!("\"{f}\""))
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        )
        .with_evidence(ev);
    }
    Check::pass(
        "features",
        if declared.is_empty() {
            "no features declared".to_string()
        } else {
            format!("{} offered by the builder", declared.join(","))
        },
    )
    .with_evidence(ev)
}
