//! SSH store URIs: `ssh://[USER@]HOST[:PORT][?PARAMS]` (nix's legacy `nix-store --serve`
//! protocol) and `ssh-ng://...` (the daemon protocol through `nix-daemon --stdio`).
//! Parameters nix reads for them: `ssh-key`, `base64-ssh-public-host-key`, `remote-program`,
//! `remote-store`, `compress`.

use std::collections::BTreeMap;

use serde::Serialize;

/// Longest URI accepted.
pub const MAX_URI_BYTES: usize = 4096;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// `ssh://`: `nix-store --serve --write` on the remote.
    Ssh,
    /// `ssh-ng://`: `nix-daemon --stdio` on the remote.
    SshNg,
}

impl Protocol {
    pub fn scheme(self) -> &'static str {
        match self {
            Protocol::Ssh => "ssh",
            Protocol::SshNg => "ssh-ng",
        }
    }
    /// The program nix starts on the remote when `remote-program` is not set.
    pub fn default_remote_program(self) -> &'static str {
        match self {
            Protocol::Ssh => "nix-store",
            Protocol::SshNg => "nix-daemon",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SshUri {
    pub protocol: Protocol,
    pub user: Option<String>,
    pub host: String,
    pub port: Option<u16>,
    pub params: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UriError {
    #[error("`{0}` is not an SSH store (only ssh:// and ssh-ng:// builders are checked)")]
    NotSsh(String),
    #[error("the URI is longer than {MAX_URI_BYTES} bytes")]
    TooLong,
    #[error("no host name in `{0}`")]
    NoHost(String),
    #[error("invalid SSH authority `{0}`: {1}")]
    BadAuthority(String, &'static str),
    #[error("invalid port `{0}`")]
    BadPort(String),
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let hex = std::str::from_utf8(&b[i + 1..i + 3])
                .ok()
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(v) = hex {
                out.push(v);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl SshUri {
    pub fn parse(uri: &str) -> Result<SshUri, UriError> {
        if uri.len() > MAX_URI_BYTES {
            return Err(UriError::TooLong);
        }
        let (scheme, rest) = uri
            .split_once("://")
            .ok_or_else(|| UriError::NotSsh(uri.into()))?;
        let protocol = match scheme {
            "ssh" => Protocol::Ssh,
            "ssh-ng" => Protocol::SshNg,
            _ => return Err(UriError::NotSsh(uri.into())),
        };
        let (authority, query) = match rest.split_once('?') {
            Some((a, q)) => (a, Some(q)),
            None => (rest, None),
        };
        let authority = authority.trim_end_matches('/');
        let (user, hostport) = match authority.rsplit_once('@') {
            Some((u, h)) => (Some(percent_decode(u)), h),
            None => (None, authority),
        };
        let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
            let (h, after) = v6
                .split_once(']')
                .ok_or_else(|| UriError::BadAuthority(authority.into(), "unclosed '['"))?;
            let port = match after.strip_prefix(':') {
                Some(p) => Some(p),
                None if after.is_empty() => None,
                None => return Err(UriError::BadAuthority(authority.into(), "junk after ']'")),
            };
            (h.to_string(), port)
        } else {
            match hostport.rsplit_once(':') {
                Some((h, p)) => (percent_decode(h), Some(p)),
                None => (percent_decode(hostport), None),
            }
        };
        let port = match port {
            None => None,
            Some(p) => Some(
                p.parse::<u16>()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or_else(|| UriError::BadPort(p.into()))?,
            ),
        };
        if host.is_empty() {
            return Err(UriError::NoHost(uri.into()));
        }
        if host.starts_with('-') {
            return Err(UriError::BadAuthority(
                authority.into(),
                "host name must not start with '-'",
            ));
        }
        if let Some(u) = &user {
            if u.is_empty() {
                return Err(UriError::BadAuthority(
                    authority.into(),
                    "user name must not be empty",
                ));
            }
            if u.starts_with('-') {
                return Err(UriError::BadAuthority(
                    authority.into(),
                    "user name must not start with '-'",
                ));
            }
        }
        let mut params = BTreeMap::new();
        for kv in query.unwrap_or("").split('&').filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            params.insert(percent_decode(k), percent_decode(v));
        }
        Ok(SshUri {
            protocol,
            user,
            host,
            port,
            params,
        })
    }

    /// `user@host` or `host`, as nix passes it to ssh.
    pub fn destination(&self) -> String {
        match &self.user {
            Some(u) => format!("{u}@{}", self.host),
            None => self.host.clone(),
        }
    }

    /// The authority as nix prints it (`user@host:port`); `ssh://localhost` (exactly) is
    /// nix's "fake ssh": it runs the command locally without ssh.
    pub fn authority(&self) -> String {
        let mut s = self.destination();
        if let Some(p) = self.port {
            s.push_str(&format!(":{p}"));
        }
        s
    }

    pub fn is_fake_ssh(&self) -> bool {
        self.authority() == "localhost"
    }

    pub fn remote_program(&self) -> String {
        self.params
            .get("remote-program")
            .filter(|p| !p.is_empty())
            .cloned()
            .unwrap_or_else(|| self.protocol.default_remote_program().to_string())
    }

    pub fn compress(&self) -> bool {
        matches!(
            self.params.get("compress").map(String::as_str),
            Some("true" | "1")
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_host_port_and_params() {
        let u = SshUri::parse("ssh-ng://builder@linux-builder:31022?ssh-key=/etc/nix/k&remote-program=/run/current-system/sw/bin/nix-daemon").unwrap();
        assert_eq!(u.protocol, Protocol::SshNg);
        assert_eq!(u.user.as_deref(), Some("builder"));
        assert_eq!(u.host, "linux-builder");
        assert_eq!(u.port, Some(31022));
        assert_eq!(u.params["ssh-key"], "/etc/nix/k");
        assert_eq!(u.remote_program(), "/run/current-system/sw/bin/nix-daemon");
        assert_eq!(u.destination(), "builder@linux-builder");
        let u = SshUri::parse("ssh://[::1]:22").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("::1", Some(22)));
        let u = SshUri::parse("ssh://mac").unwrap();
        assert_eq!(u.remote_program(), "nix-store");
        assert!(!u.is_fake_ssh());
        assert!(SshUri::parse("ssh://localhost").unwrap().is_fake_ssh());
        assert!(!SshUri::parse("ssh://root@localhost").unwrap().is_fake_ssh());
    }

    #[test]
    fn what_nix_refuses_is_refused() {
        assert!(matches!(SshUri::parse("local"), Err(UriError::NotSsh(_))));
        assert!(matches!(
            SshUri::parse("https://cache.nixos.org"),
            Err(UriError::NotSsh(_))
        ));
        assert!(matches!(
            SshUri::parse("ssh://h:99999"),
            Err(UriError::BadPort(_))
        ));
        assert!(matches!(SshUri::parse("ssh://"), Err(UriError::NoHost(_))));
        assert!(matches!(
            SshUri::parse("ssh://-oProxyCommand=x"),
            Err(UriError::BadAuthority(..))
        ));
        assert!(matches!(
            SshUri::parse("ssh://@h"),
            Err(UriError::BadAuthority(..))
        ));
    }

    proptest::proptest! {
        #[test]
        fn parsing_never_panics(s in "(ssh|ssh-ng)://.{0,60}") {
            let _ = SshUri::parse(&s);
        }
    }
}
