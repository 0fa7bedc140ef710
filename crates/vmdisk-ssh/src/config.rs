//! The client configuration ssh would use for one destination, as `ssh -G` prints it: one
//! `keyword value` per line, keywords in lower case, every Host/Match block and command-line
//! `-o` already applied. This is the only faithful way to know which HostName, Port, User,
//! IdentityFile and known_hosts files a given user's ssh ends up with.

use std::path::{Path, PathBuf};

/// Most lines of `ssh -G` output we read (OpenSSH 9 prints about 100).
pub const MAX_DUMP_LINES: usize = 10_000;

/// What `ssh -G` says, reduced to what the checks need.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EffectiveConfig {
    pub user: String,
    /// The name or address ssh connects to (after `HostName`).
    pub hostname: String,
    pub port: u16,
    /// Identity files in the order ssh tries them (`-i` first), `~` not expanded.
    pub identity_files: Vec<String>,
    pub identities_only: bool,
    /// `HostKeyAlias`: the name ssh looks host keys up under instead of `hostname`.
    pub host_key_alias: Option<String>,
    pub user_known_hosts: Vec<String>,
    pub global_known_hosts: Vec<String>,
    /// `true`, `false`, `ask` or `accept-new` (ssh -G's spelling of yes/no/ask/accept-new).
    pub strict_host_key_checking: String,
    pub batch_mode: bool,
    pub proxy_command: Option<String>,
    pub proxy_jump: Option<String>,
}

impl EffectiveConfig {
    /// Parse `ssh -G` output. Unknown keywords are ignored; a missing or invalid port is 22.
    pub fn parse(dump: &str) -> EffectiveConfig {
        let mut c = EffectiveConfig {
            port: 22,
            strict_host_key_checking: "ask".into(),
            ..Default::default()
        };
        for line in dump.lines().take(MAX_DUMP_LINES) {
            let line = line.trim();
            let (key, value) = match line.split_once(char::is_whitespace) {
                Some((k, v)) => (k.to_ascii_lowercase(), v.trim()),
                None => continue,
            };
            let words = || value.split_whitespace().map(str::to_string).collect();
            let yes = || matches!(value, "yes" | "true");
            match key.as_str() {
                "user" => c.user = value.into(),
                "hostname" => c.hostname = value.into(),
                "port" => c.port = value.parse().unwrap_or(22),
                "identityfile" => c.identity_files.push(value.into()),
                "identitiesonly" => c.identities_only = yes(),
                "hostkeyalias" => c.host_key_alias = Some(value.into()),
                "userknownhostsfile" => c.user_known_hosts = words(),
                "globalknownhostsfile" => c.global_known_hosts = words(),
                "stricthostkeychecking" => c.strict_host_key_checking = value.into(),
                "batchmode" => c.batch_mode = yes(),
                "proxycommand" if value != "none" => c.proxy_command = Some(value.into()),
                "proxyjump" if value != "none" => c.proxy_jump = Some(value.into()),
                _ => {}
            }
        }
        c
    }

    /// The name host keys are looked up under: HostKeyAlias, else the HostName (OpenSSH then
    /// tries `[name]:port` for a port other than 22, and the bare name as a fallback).
    pub fn host_key_name(&self) -> &str {
        self.host_key_alias.as_deref().unwrap_or(&self.hostname)
    }

    /// ssh connects through another program or host: resolution and TCP are not ours to test.
    pub fn is_proxied(&self) -> bool {
        self.proxy_command.is_some() || self.proxy_jump.is_some()
    }

    /// Whether ssh accepts an unknown host key by itself (`no` or `accept-new`).
    pub fn accepts_unknown_host_keys(&self) -> bool {
        matches!(
            self.strict_host_key_checking.as_str(),
            "false" | "no" | "off" | "accept-new"
        )
    }

    /// Whether ssh accepts even a changed host key (`StrictHostKeyChecking no`).
    pub fn ignores_host_keys(&self) -> bool {
        matches!(
            self.strict_host_key_checking.as_str(),
            "false" | "no" | "off"
        )
    }
}

/// `~` and `~/x` expanded against `home`, as ssh expands its file options.
pub fn expand_tilde(path: &str, home: &Path) -> PathBuf {
    if path == "~" {
        home.to_path_buf()
    } else if let Some(rest) = path.strip_prefix("~/") {
        home.join(rest)
    } else {
        PathBuf::from(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An excerpt of what OpenSSH 9.2p1's `ssh -G` printed for nix-darwin's linux-builder
    /// block (`Host linux-builder / Hostname localhost / HostKeyAlias linux-builder /
    /// Port 31022`).
    const DUMP: &str = "user builder\nhostname localhost\nport 31022\naddressfamily any\n\
        batchmode no\ncheckhostip no\nidentitiesonly no\nstricthostkeychecking ask\n\
        hostkeyalias linux-builder\nidentityfile /etc/nix/builder_ed25519\n\
        identityfile ~/.ssh/id_rsa\nglobalknownhostsfile /etc/ssh/ssh_known_hosts /etc/ssh/ssh_known_hosts2\n\
        userknownhostsfile ~/.ssh/known_hosts ~/.ssh/known_hosts2\nproxycommand none\n";

    #[test]
    fn the_fields_the_checks_use_are_read() {
        let c = EffectiveConfig::parse(DUMP);
        assert_eq!(c.user, "builder");
        assert_eq!(c.hostname, "localhost");
        assert_eq!(c.port, 31022);
        assert_eq!(c.host_key_name(), "linux-builder");
        assert_eq!(
            c.identity_files,
            ["/etc/nix/builder_ed25519", "~/.ssh/id_rsa"]
        );
        assert_eq!(c.user_known_hosts.len(), 2);
        assert_eq!(c.global_known_hosts[0], "/etc/ssh/ssh_known_hosts");
        assert!(!c.is_proxied());
        assert!(!c.accepts_unknown_host_keys());
        let c =
            EffectiveConfig::parse("hostname h\nstricthostkeychecking false\nproxyjump bastion\n");
        assert_eq!(c.port, 22);
        assert_eq!(c.host_key_name(), "h");
        assert!(c.is_proxied() && c.ignores_host_keys());
    }

    #[test]
    fn tilde_expands_against_the_given_home() {
        let h = Path::new("/var/root");
        assert_eq!(
            expand_tilde("~/.ssh/known_hosts", h),
            Path::new("/var/root/.ssh/known_hosts")
        );
        assert_eq!(expand_tilde("/etc/x", h), Path::new("/etc/x"));
    }
}
