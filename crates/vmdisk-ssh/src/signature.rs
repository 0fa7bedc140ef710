//! What OpenSSH's client prints when it fails, and which failure that is.
//!
//! Each signature is a literal OpenSSH 9.x really prints (checked against Debian 12's 9.2p1 in
//! the interop tests). [`classify`] tries them most specific first: an unprotected key also
//! ends in "Permission denied (publickey)", a changed host key also in "Host key verification
//! failed.", so the earlier, more telling line wins. Callers attach their own fix: the harness
//! knows the guest disk, the builder doctor knows the machines file.

use self::SshFailureKind as Kind;

/// What OpenSSH prints when the server's host key differs from the pinned one (first of
/// a boxed warning; followed by [`SIG_HOST_KEY_VERIFY_FAILED`]).
pub const SIG_HOST_KEY_CHANGED: &str = "WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!";
/// The line naming the host whose key changed: "Host key for linux-builder has changed and
/// you have requested strict checking." (also printed without the box, e.g. in pasted logs).
pub const SIG_HOST_KEY_CHANGED_STRICT: &str = "has changed and you have requested strict checking";
/// OpenSSH's last line when host key checking refused the server (changed or unknown key).
pub const SIG_HOST_KEY_VERIFY_FAILED: &str = "Host key verification failed.";
/// An unknown host in batch mode (no prompt possible): "No ED25519 host key is known for
/// [127.0.0.1]:2222 and you have requested strict checking."
pub const SIG_HOST_KEY_UNKNOWN: &str = "host key is known for";
/// OpenSSH's warning when the private key file is readable by group or others and owned by
/// the user running ssh; it then ignores the key (and key authentication fails).
pub const SIG_UNPROTECTED_KEY: &str = "WARNING: UNPROTECTED PRIVATE KEY FILE!";
/// Follows [`SIG_UNPROTECTED_KEY`]: "Permissions 0640 for 'PATH' are too open."
pub const SIG_KEY_PERMISSIONS_TOO_OPEN: &str = "are too open.";
/// Follows the box: `Load key "PATH": bad permissions`.
pub const SIG_KEY_BAD_PERMISSIONS: &str = "bad permissions";
/// The key file exists but the user running ssh cannot read it:
/// `Load key "/etc/nix/builder_ed25519": Permission denied`.
pub const SIG_LOAD_KEY: &str = "Load key \"";
/// The key file does not exist: `Warning: Identity file /x not accessible: No such file or
/// directory.`
pub const SIG_IDENTITY_NOT_ACCESSIBLE: &str = "not accessible: No such file or directory";
/// The server refused every authentication method ("root@127.0.0.1: Permission denied
/// (publickey).").
pub const SIG_PERMISSION_DENIED: &str = "Permission denied (";
/// Too many keys offered (an agent or default keys before the right one).
pub const SIG_TOO_MANY_AUTH_FAILURES: &str = "Too many authentication failures";
/// Nothing accepted the TCP connection.
pub const SIG_CONNECTION_REFUSED: &str = "Connection refused";
/// The host name does not resolve: "ssh: Could not resolve hostname linux-builder: Name or
/// service not known".
pub const SIG_UNRESOLVABLE: &str = "Could not resolve hostname";
/// A qemu forward (slirp) held the connection (guest network not up yet) until ConnectTimeout.
pub const SIG_BANNER_TIMEOUT: &str = "Connection timed out during banner exchange";
/// No answer to the TCP connection within ConnectTimeout.
pub const SIG_CONNECT_TIMEOUT: &str = "Connection timed out";
/// The route to the host is missing.
pub const SIG_NO_ROUTE: &str = "No route to host";
/// Something accepted the connection but closed it before the SSH banner
/// ("kex_exchange_identification: Connection closed by remote host" /
/// "read: Connection reset by peer").
pub const SIG_KEX_CLOSED: &str = "kex_exchange_identification";

/// Which failure ssh reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SshFailureKind {
    /// The server's key differs from the known or pinned one.
    HostKeyChanged,
    /// No key is known for the host and ssh may not ask (batch mode, or no terminal).
    HostKeyUnknown,
    /// The private key is readable by group/others; ssh ignored it.
    UnprotectedKey,
    /// The private key file cannot be read by the user running ssh.
    KeyUnreadable,
    /// The named identity file does not exist.
    KeyMissing,
    /// The server accepted none of the offered credentials.
    AuthRefused,
    /// The host name does not resolve.
    Unresolvable,
    /// Nothing listens on the port.
    ConnectionRefused,
    /// No answer to the TCP connection, or no route.
    ConnectTimeout,
    /// The port accepted but no SSH banner came in time.
    BannerTimeout,
    /// The port accepted and closed before the SSH banner.
    ClosedBeforeBanner,
}

impl Kind {
    /// Stable identifier.
    pub fn id(self) -> &'static str {
        match self {
            Kind::HostKeyChanged => "host-key-changed",
            Kind::HostKeyUnknown => "host-key-unknown",
            Kind::UnprotectedKey => "unprotected-key",
            Kind::KeyUnreadable => "key-unreadable",
            Kind::KeyMissing => "key-missing",
            Kind::AuthRefused => "auth-refused",
            Kind::Unresolvable => "unresolvable-host",
            Kind::ConnectionRefused => "connection-refused",
            Kind::ConnectTimeout => "connect-timeout",
            Kind::BannerTimeout => "banner-timeout",
            Kind::ClosedBeforeBanner => "closed-before-banner",
        }
    }

    /// What it means, in words that hold wherever ssh ran.
    pub fn cause(self) -> &'static str {
        match self {
            Kind::HostKeyChanged => {
                "the server's SSH host key is not the one pinned or known for it"
            }
            Kind::HostKeyUnknown => {
                "no host key is known for the server, and ssh may not ask (batch mode)"
            }
            Kind::UnprotectedKey => {
                "ssh ignored the private key because group or others can read its file"
            }
            Kind::KeyUnreadable => "the user running ssh cannot read the private key file",
            Kind::KeyMissing => "the private key file does not exist",
            Kind::AuthRefused => "the server refused every offered credential",
            Kind::Unresolvable => "the host name does not resolve",
            Kind::ConnectionRefused => "nothing listens on the port",
            Kind::ConnectTimeout => "the host did not answer the TCP connection in time",
            Kind::BannerTimeout => "the port accepted the connection but no SSH server answered",
            Kind::ClosedBeforeBanner => {
                "the port accepted the connection and closed it before the SSH banner"
            }
        }
    }

    /// Whether the failure happened before authentication (network or host key).
    pub fn before_auth(self) -> bool {
        !matches!(
            self,
            Kind::UnprotectedKey | Kind::KeyUnreadable | Kind::KeyMissing | Kind::AuthRefused
        )
    }
}

/// One recognised failure and the line that shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SshFailure {
    pub kind: SshFailureKind,
    /// The line of stderr that matched, trimmed.
    pub evidence: String,
}

fn line_with<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
    text.lines().find(|l| l.contains(needle)).map(str::trim)
}

/// The failure ssh's stderr shows, most specific first; None when it shows none of them.
pub fn classify(stderr: &str) -> Option<SshFailure> {
    let found = |kind, l: &str| {
        Some(SshFailure {
            kind,
            evidence: l.to_string(),
        })
    };
    let rules: &[(&[&str], Kind)] = &[
        (
            &[SIG_UNPROTECTED_KEY, SIG_KEY_PERMISSIONS_TOO_OPEN],
            Kind::UnprotectedKey,
        ),
        (
            &[SIG_HOST_KEY_CHANGED, SIG_HOST_KEY_CHANGED_STRICT],
            Kind::HostKeyChanged,
        ),
        (&[SIG_HOST_KEY_UNKNOWN], Kind::HostKeyUnknown),
        (&[SIG_UNRESOLVABLE], Kind::Unresolvable),
        (&[SIG_CONNECTION_REFUSED], Kind::ConnectionRefused),
        (&[SIG_BANNER_TIMEOUT], Kind::BannerTimeout),
        (&[SIG_CONNECT_TIMEOUT, SIG_NO_ROUTE], Kind::ConnectTimeout),
        (&[SIG_KEX_CLOSED], Kind::ClosedBeforeBanner),
    ];
    for (needles, kind) in rules {
        for n in *needles {
            if let Some(l) = line_with(stderr, n) {
                return found(*kind, l);
            }
        }
    }
    // "Host key verification failed." alone: unknown or changed; the box above says which,
    // and without it (LogLevel=ERROR hides "No ... host key is known") it is still the host
    // key that stopped ssh.
    if let Some(l) = line_with(stderr, SIG_HOST_KEY_VERIFY_FAILED) {
        return found(Kind::HostKeyUnknown, l);
    }
    // `Load key "K": bad permissions` is the unprotected case (handled above when the box is
    // there); `Load key "K": Permission denied` / other errors mean unreadable.
    if let Some(l) = line_with(stderr, SIG_LOAD_KEY) {
        let kind = if l.contains(SIG_KEY_BAD_PERMISSIONS) {
            Kind::UnprotectedKey
        } else {
            Kind::KeyUnreadable
        };
        return found(kind, l);
    }
    if let Some(l) = line_with(stderr, SIG_IDENTITY_NOT_ACCESSIBLE) {
        return found(Kind::KeyMissing, l);
    }
    for n in [SIG_PERMISSION_DENIED, SIG_TOO_MANY_AUTH_FAILURES] {
        if let Some(l) = line_with(stderr, n) {
            return found(Kind::AuthRefused, l);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(s: &str) -> Option<Kind> {
        classify(s).map(|f| f.kind)
    }

    /// The messages as OpenSSH 9.2p1 prints them (captured from real runs).
    #[test]
    fn each_real_message_maps_to_its_failure() {
        let changed = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            @    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n\
            @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            IT IS POSSIBLE THAT SOMEONE IS DOING SOMETHING NASTY!\n\
            Host key verification failed.\n";
        assert_eq!(kind(changed), Some(Kind::HostKeyChanged));
        let f = classify(changed).unwrap();
        assert!(f
            .evidence
            .contains("REMOTE HOST IDENTIFICATION HAS CHANGED"));
        assert_eq!(
            kind("No ED25519 host key is known for [127.0.0.1]:2222 and you have requested strict checking.\nHost key verification failed.\n"),
            Some(Kind::HostKeyUnknown)
        );
        assert_eq!(
            kind("Host key verification failed.\n"),
            Some(Kind::HostKeyUnknown)
        );
        let unprotected = "@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            @         WARNING: UNPROTECTED PRIVATE KEY FILE!          @\n\
            @@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@@\n\
            Permissions 0640 for '/k' are too open.\n\
            It is required that your private key files are NOT accessible by others.\n\
            This private key will be ignored.\n\
            Load key \"/k\": bad permissions\n\
            builder@127.0.0.1: Permission denied (publickey).\n";
        assert_eq!(kind(unprotected), Some(Kind::UnprotectedKey));
        assert_eq!(
            kind("Load key \"/etc/nix/builder_ed25519\": Permission denied\nbuilder@localhost: Permission denied (publickey).\n"),
            Some(Kind::KeyUnreadable)
        );
        assert_eq!(
            kind("Warning: Identity file /nope not accessible: No such file or directory.\nb@h: Permission denied (publickey).\n"),
            Some(Kind::KeyMissing)
        );
        assert_eq!(
            kind("builder@127.0.0.1: Permission denied (publickey)."),
            Some(Kind::AuthRefused)
        );
        assert_eq!(
            kind(
                "Received disconnect from 127.0.0.1 port 31022:2: Too many authentication failures"
            ),
            Some(Kind::AuthRefused)
        );
        assert_eq!(
            kind("ssh: Could not resolve hostname linux-builder: Name or service not known"),
            Some(Kind::Unresolvable)
        );
        assert_eq!(
            kind("ssh: connect to host 127.0.0.1 port 2222: Connection refused"),
            Some(Kind::ConnectionRefused)
        );
        assert_eq!(
            kind("ssh: connect to host 192.0.2.1 port 22: Connection timed out"),
            Some(Kind::ConnectTimeout)
        );
        assert_eq!(
            kind("Connection timed out during banner exchange\nConnection to 127.0.0.1 port 2222 timed out"),
            Some(Kind::BannerTimeout)
        );
        assert_eq!(
            kind("kex_exchange_identification: Connection closed by remote host"),
            Some(Kind::ClosedBeforeBanner)
        );
        assert_eq!(kind("bash: nix-store: command not found"), None);
        assert_eq!(kind(""), None);
    }

    #[test]
    fn ids_are_distinct_and_auth_failures_come_after_the_host_key() {
        let all = [
            Kind::HostKeyChanged,
            Kind::HostKeyUnknown,
            Kind::UnprotectedKey,
            Kind::KeyUnreadable,
            Kind::KeyMissing,
            Kind::AuthRefused,
            Kind::Unresolvable,
            Kind::ConnectionRefused,
            Kind::ConnectTimeout,
            Kind::BannerTimeout,
            Kind::ClosedBeforeBanner,
        ];
        let ids: std::collections::BTreeSet<_> = all.iter().map(|k| k.id()).collect();
        assert_eq!(ids.len(), all.len());
        assert!(!Kind::AuthRefused.before_auth());
        assert!(Kind::HostKeyChanged.before_auth());
    }
}
