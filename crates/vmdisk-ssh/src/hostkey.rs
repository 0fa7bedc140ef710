//! Public host keys as OpenSSH writes them (`TYPE BASE64 [comment]`, as in `*.pub`,
//! known_hosts and ssh-keyscan output), their SHA256 fingerprints, and the base64 field of
//! Nix's machines file (the base64 of a whole `.pub` line: `base64 -w0 ssh_host_ed25519_key.pub`).
//!
//! ```text
//! public key blob:  string TYPE  (type-specific fields; ed25519: string pub[32])
//! "string" = u32 big-endian length + bytes
//! ```

use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Longest key line we accept (a 16384-bit RSA key is about 2.8 KB of base64).
pub const MAX_KEY_LINE_BYTES: usize = 16 * 1024;
/// Most keys read from one ssh-keyscan run (a server offers one per key type).
pub const MAX_SCANNED_KEYS: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    #[error("the key is longer than {MAX_KEY_LINE_BYTES} bytes")]
    TooLong,
    #[error("not `TYPE BASE64`: {0:?}")]
    NotAKeyLine(String),
    #[error("unknown SSH key type {0:?}")]
    UnknownType(String),
    #[error("invalid base64")]
    Base64,
    #[error("the key blob says it is {inner:?}, the line says {outer:?}")]
    TypeMismatch { outer: String, inner: String },
    #[error("the key blob is truncated")]
    Truncated,
    #[error("the base64 field decodes to bytes that are not text")]
    NotText,
}

/// Key types OpenSSH 9 knows (certificates are not host keys one pins this way).
pub const KEY_TYPES: &[&str] = &[
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
    "sk-ecdsa-sha2-nistp256@openssh.com",
    "ssh-dss",
];

/// One public key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicKey {
    pub kind: String,
    pub blob: Vec<u8>,
}

/// Standard base64 with padding.
pub fn base64_encode(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(data)
}

/// Standard base64; whitespace (line breaks) ignored, padding optional.
pub fn base64_decode(text: &str) -> Result<Vec<u8>, KeyError> {
    let compact: String = text.split_ascii_whitespace().collect();
    base64::engine::general_purpose::STANDARD_PAD_INDIFFERENT
        .decode(compact)
        .map_err(|_| KeyError::Base64)
}

impl PublicKey {
    /// Parse `TYPE BASE64 [comment]` (the comment is dropped).
    pub fn parse_line(line: &str) -> Result<PublicKey, KeyError> {
        if line.len() > MAX_KEY_LINE_BYTES {
            return Err(KeyError::TooLong);
        }
        let mut w = line.split_whitespace();
        let (Some(kind), Some(b64)) = (w.next(), w.next()) else {
            return Err(KeyError::NotAKeyLine(
                line.trim().chars().take(80).collect(),
            ));
        };
        if !KEY_TYPES.contains(&kind) {
            return Err(KeyError::UnknownType(kind.chars().take(80).collect()));
        }
        let blob = base64_decode(b64)?;
        // The blob starts with its own type name; it must be the line's.
        if blob.len() < 4 {
            return Err(KeyError::Truncated);
        }
        let n = u32::from_be_bytes([blob[0], blob[1], blob[2], blob[3]]) as usize;
        let inner = blob.get(4..4 + n).ok_or(KeyError::Truncated)?;
        if inner != kind.as_bytes() {
            return Err(KeyError::TypeMismatch {
                outer: kind.into(),
                inner: String::from_utf8_lossy(inner).chars().take(80).collect(),
            });
        }
        Ok(PublicKey {
            kind: kind.into(),
            blob,
        })
    }

    /// The base64 field of a machines-file line: base64 of a `.pub` line.
    pub fn from_machines_field(field: &str) -> Result<PublicKey, KeyError> {
        if field.len() > 2 * MAX_KEY_LINE_BYTES {
            return Err(KeyError::TooLong);
        }
        let bytes = base64_decode(field)?;
        let text = String::from_utf8(bytes).map_err(|_| KeyError::NotText)?;
        PublicKey::parse_line(text.trim())
    }

    /// `TYPE BASE64`.
    pub fn to_line(&self) -> String {
        format!("{} {}", self.kind, base64_encode(&self.blob))
    }

    /// What to put in the machines file's last column for this key.
    pub fn to_machines_field(&self) -> String {
        base64_encode(self.to_line().as_bytes())
    }

    /// `SHA256:...` as `ssh-keygen -l` and ssh's warnings print it (unpadded base64).
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(&self.blob);
        format!(
            "SHA256:{}",
            base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
        )
    }

    /// `ED25519`, `RSA`, `ECDSA`, ... as ssh names key types in messages.
    pub fn short_kind(&self) -> &'static str {
        match self.kind.as_str() {
            "ssh-ed25519" => "ED25519",
            "ssh-rsa" => "RSA",
            "ssh-dss" => "DSA",
            "sk-ssh-ed25519@openssh.com" => "ED25519-SK",
            "sk-ecdsa-sha2-nistp256@openssh.com" => "ECDSA-SK",
            _ => "ECDSA",
        }
    }
}

/// The keys in ssh-keyscan's output (`HOST TYPE BASE64` lines; `#` lines are comments).
/// Lines that do not parse are skipped.
pub fn parse_keyscan(out: &str) -> Vec<PublicKey> {
    let mut keys: Vec<PublicKey> = Vec::new();
    for line in out.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((_host, rest)) = line.split_once(char::is_whitespace) else {
            continue;
        };
        if let Ok(k) = PublicKey::parse_line(rest.trim()) {
            if !keys.contains(&k) {
                keys.push(k);
            }
        }
        if keys.len() >= MAX_SCANNED_KEYS {
            break;
        }
    }
    keys
}

/// The known_hosts name OpenSSH uses for `host` and `port` (brackets for ports other than 22).
pub fn known_hosts_name(host: &str, port: u16) -> String {
    if port == 22 {
        host.to_string()
    } else {
        format!("[{host}]:{port}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// nix-darwin's linux-builder pins this (modules/nix/linux-builder.nix).
    const DARWIN_BUILDER_FIELD: &str = "c3NoLWVkMjU1MTkgQUFBQUMzTnphQzFsWkRJMU5URTVBQUFBSUpCV2N4Yi9CbGFxdDFhdU90RStGOFFVV3JVb3RpQzVxQkorVXVFV2RWQ2Igcm9vdEBuaXhvcwo=";

    #[test]
    fn the_nix_darwin_field_decodes_to_an_ed25519_key() {
        let k = PublicKey::from_machines_field(DARWIN_BUILDER_FIELD).unwrap();
        assert_eq!(k.kind, "ssh-ed25519");
        assert_eq!(
            k.to_line(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJBWcxb/Blaqt1auOtE+F8QUWrUotiC5qBJ+UuEWdVCb"
        );
        // Round trip without the comment.
        let again = PublicKey::from_machines_field(&k.to_machines_field()).unwrap();
        assert_eq!(again, k);
        assert!(k.fingerprint().starts_with("SHA256:"));
        assert_eq!(k.fingerprint().len(), 7 + 43);
    }

    #[test]
    fn bad_lines_are_refused_with_reasons() {
        assert!(matches!(
            PublicKey::parse_line("hello"),
            Err(KeyError::NotAKeyLine(_))
        ));
        assert!(matches!(
            PublicKey::parse_line("ssh-foo AAAA"),
            Err(KeyError::UnknownType(_))
        ));
        assert_eq!(
            PublicKey::parse_line("ssh-ed25519 !!!"),
            Err(KeyError::Base64)
        );
        // An RSA blob labelled ed25519.
        let rsa_blob = {
            let mut b = vec![0, 0, 0, 7];
            b.extend_from_slice(b"ssh-rsa");
            b
        };
        assert!(matches!(
            PublicKey::parse_line(&format!("ssh-ed25519 {}", base64_encode(&rsa_blob))),
            Err(KeyError::TypeMismatch { .. })
        ));
        assert_eq!(
            PublicKey::from_machines_field(&base64_encode(&[0xff, 0xfe])),
            Err(KeyError::NotText)
        );
    }

    #[test]
    fn keyscan_output_yields_each_key_once() {
        let line =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJBWcxb/Blaqt1auOtE+F8QUWrUotiC5qBJ+UuEWdVCb";
        let out = format!(
            "# 127.0.0.1:2222 SSH-2.0-OpenSSH_9.2p1\n[127.0.0.1]:2222 {line}\n[127.0.0.1]:2222 {line}\ngarbage\n"
        );
        let keys = parse_keyscan(&out);
        assert_eq!(keys.len(), 1);
        assert_eq!(keys[0].to_line(), line);
        assert_eq!(known_hosts_name("h", 22), "h");
        assert_eq!(known_hosts_name("h", 2222), "[h]:2222");
    }

    proptest! {
        #[test]
        fn parsers_never_panic(s in ".{0,300}") {
            let _ = PublicKey::parse_line(&s);
            let _ = PublicKey::from_machines_field(&s);
            let _ = parse_keyscan(&s);
        }
    }
}
