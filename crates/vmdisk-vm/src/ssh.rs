//! Reaching the guest over SSH with the host's OpenSSH client, host key pinned.
//!
//! The harness makes two ed25519 keys per VM: a client key (its public half goes into the
//! guest's authorized_keys) and the guest's host key, converted from OpenSSH's private key
//! format to dropbear's so the guest's dropbear serves exactly the key we pinned in
//! `known_hosts`. `StrictHostKeyChecking` stays on: a guest presenting another key fails with
//! [`SIG_HOST_KEY_CHANGED`], which `diagnose` recognises.
//!
//! Key formats (all integers big-endian, "string" = u32 length + bytes):
//!
//! ```text
//! OpenSSH private key (PEM "OPENSSH PRIVATE KEY", unencrypted):
//!   "openssh-key-v1\0" string cipher="none" string kdf="none" string kdfoptions=""
//!   u32 nkeys=1  string public-blob
//!   string private-section:
//!     u32 check  u32 check(same)  string "ssh-ed25519"  string pub[32]
//!     string priv[64] = seed[32] || pub[32]  string comment  padding 1,2,3.. to 8 bytes
//! public blob:        string "ssh-ed25519"  string pub[32]
//! dropbear private:   string "ssh-ed25519"  string seed[32] || pub[32]
//! ```

use std::fs;
use std::io::ErrorKind;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

// The failure signatures are the shared ones (vmdisk-ssh), which `diagnose` and
// `vmdisk doctor builder` match on.
pub use vmdisk_ssh::signature::{
    SIG_BANNER_TIMEOUT, SIG_CONNECTION_REFUSED, SIG_HOST_KEY_CHANGED, SIG_HOST_KEY_VERIFY_FAILED,
    SIG_KEX_CLOSED, SIG_KEY_BAD_PERMISSIONS, SIG_KEY_PERMISSIONS_TOO_OPEN, SIG_PERMISSION_DENIED,
    SIG_UNPROTECTED_KEY,
};
/// What a finished command produced (exit status, stdout, stderr, elapsed).
pub use vmdisk_ssh::Output as SshOutput;

/// How long key generation may take.
const KEYGEN_TIMEOUT: Duration = Duration::from_secs(30);
/// [`wait_banner`]: connect timeout of one try.
const BANNER_CONNECT_TIMEOUT: Duration = Duration::from_millis(300);
/// [`wait_banner`]: how long one try waits for the banner after connecting (slirp accepts
/// before the guest listens; a guest that listens answers in milliseconds).
const BANNER_READ_TIMEOUT: Duration = Duration::from_millis(300);
/// [`wait_banner`]: pause between tries.
const BANNER_POLL: Duration = Duration::from_millis(20);
/// Sizes an ed25519 key file may claim, checked before use.
const ED25519_KEY_LEN: usize = 32;
const KEY_TYPE: &str = "ssh-ed25519";
const OPENSSH_MAGIC: &[u8] = b"openssh-key-v1\0";

/// The harness's client key pair (OpenSSH format, mode 0600).
#[derive(Clone, Debug)]
pub struct ClientKey {
    pub private: PathBuf,
    /// "ssh-ed25519 AAAA... vmdisk-harness", ready for authorized_keys.
    pub public_line: String,
}

impl ClientKey {
    /// Generate `dir/client_ed25519` (+ `.pub`), replacing an earlier one.
    pub fn generate(dir: &Path) -> Result<ClientKey> {
        let private = dir.join("client_ed25519");
        let public = dir.join("client_ed25519.pub");
        for p in [&private, &public] {
            match fs::remove_file(p) {
                Err(e) if e.kind() != ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("removing old key {}", p.display()))
                }
                _ => {}
            }
        }
        ssh_keygen(&private, "vmdisk-harness")?;
        fs::set_permissions(&private, fs::Permissions::from_mode(0o600))
            .with_context(|| format!("chmod 600 {}", private.display()))?;
        let public_line = fs::read_to_string(&public)
            .with_context(|| format!("reading {}", public.display()))?
            .trim()
            .to_string();
        Ok(ClientKey {
            private,
            public_line,
        })
    }
}

/// A guest host key: dropbear's private key file contents and the public line to pin.
#[derive(Clone, Debug)]
pub struct HostKey {
    /// Contents for dropbear's `-r` key file (e.g. /etc/dropbear/dropbear_ed25519_host_key).
    pub dropbear_private: Vec<u8>,
    /// "ssh-ed25519 AAAA..." (no comment).
    pub public_line: String,
}

impl HostKey {
    /// Generate a fresh ed25519 host key with ssh-keygen (in a temporary folder under `dir`,
    /// removed afterwards) and convert it for dropbear. Nothing is left in `dir`.
    pub fn generate(dir: &Path) -> Result<HostKey> {
        // A private folder (0700) removed with its contents on drop.
        let tmp = tempfile::Builder::new()
            .prefix(".hostkey-")
            .tempdir_in(dir)
            .with_context(|| format!("creating a temporary folder in {}", dir.display()))?;
        let key = tmp.path().join("key");
        ssh_keygen(&key, "vmdisk-assets")?;
        let pem = fs::read_to_string(&key)
            .with_context(|| format!("reading the generated key {}", key.display()))?;
        let kp = parse_openssh_ed25519(&pem)
            .with_context(|| format!("converting {} for dropbear", key.display()))?;
        let public_line = kp.public_line();
        let pub_file = fs::read_to_string(key.with_extension("pub")).unwrap_or_default();
        ensure!(
            pub_file
                .split_whitespace()
                .take(2)
                .eq(public_line.split_whitespace()),
            "ssh-keygen's .pub ({}) does not match the public key inside its private key file \
             ({public_line}); this ssh-keygen writes something we do not understand",
            pub_file.trim()
        );
        Ok(HostKey {
            dropbear_private: kp.dropbear_private(),
            public_line,
        })
    }
}

fn ssh_keygen(path: &Path, comment: &str) -> Result<()> {
    let mut cmd = Command::new("ssh-keygen");
    cmd.args(["-t", "ed25519", "-N", "", "-q", "-C", comment, "-f"])
        .arg(path);
    let out = run_bounded(&mut cmd, None, KEYGEN_TIMEOUT).context(
        "running ssh-keygen (install OpenSSH's client: `apt-get install openssh-client`, \
         `nix shell nixpkgs#openssh`)",
    )?;
    ensure!(
        out.status == Some(0),
        "ssh-keygen -t ed25519 -f {} failed (exit {:?}): {}",
        path.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr).trim()
    );
    Ok(())
}

/// An ed25519 key pair as stored in OpenSSH and dropbear key files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ed25519Keypair {
    pub seed: [u8; ED25519_KEY_LEN],
    pub public: [u8; ED25519_KEY_LEN],
}

impl Ed25519Keypair {
    /// The SSH wire encoding of the public key.
    pub fn public_blob(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string(&mut b, KEY_TYPE.as_bytes());
        put_string(&mut b, &self.public);
        b
    }

    /// "ssh-ed25519 AAAA..." as in known_hosts and authorized_keys.
    pub fn public_line(&self) -> String {
        format!("{KEY_TYPE} {}", base64_encode(&self.public_blob()))
    }

    /// dropbear's private key file: string "ssh-ed25519", string seed || public.
    pub fn dropbear_private(&self) -> Vec<u8> {
        let mut both = Vec::with_capacity(2 * ED25519_KEY_LEN);
        both.extend_from_slice(&self.seed);
        both.extend_from_slice(&self.public);
        let mut b = Vec::new();
        put_string(&mut b, KEY_TYPE.as_bytes());
        put_string(&mut b, &both);
        b
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    // Key material is a few dozen bytes; the length always fits.
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// A cursor over SSH wire data.
struct Wire<'a> {
    b: &'a [u8],
    what: &'static str,
}

impl<'a> Wire<'a> {
    fn u32(&mut self) -> Result<u32> {
        ensure!(
            self.b.len() >= 4,
            "{} ends inside a length field",
            self.what
        );
        let (h, t) = self.b.split_at(4);
        self.b = t;
        Ok(u32::from_be_bytes([h[0], h[1], h[2], h[3]]))
    }
    fn string(&mut self) -> Result<&'a [u8]> {
        let n = self.u32()? as usize;
        ensure!(
            n <= self.b.len(),
            "{} claims a {n}-byte field with only {} bytes left",
            self.what,
            self.b.len()
        );
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
}

/// Parse an unencrypted OpenSSH private key file holding one ed25519 key.
pub fn parse_openssh_ed25519(pem: &str) -> Result<Ed25519Keypair> {
    const BEGIN: &str = "-----BEGIN OPENSSH PRIVATE KEY-----";
    const END: &str = "-----END OPENSSH PRIVATE KEY-----";
    let start = pem
        .find(BEGIN)
        .context("not an OpenSSH private key (no BEGIN OPENSSH PRIVATE KEY line)")?
        + BEGIN.len();
    let len = pem[start..]
        .find(END)
        .context("OpenSSH private key without its END line")?;
    let blob = base64_decode(&pem[start..start + len])?;

    let rest = blob
        .strip_prefix(OPENSSH_MAGIC)
        .context("OpenSSH private key without the openssh-key-v1 magic")?;
    let mut w = Wire {
        b: rest,
        what: "OpenSSH private key",
    };
    let cipher = w.string()?;
    let kdf = w.string()?;
    let _kdf_options = w.string()?;
    ensure!(
        cipher == b"none" && kdf == b"none",
        "the OpenSSH private key is encrypted (cipher {}, kdf {}); generate it with -N ''",
        String::from_utf8_lossy(cipher),
        String::from_utf8_lossy(kdf)
    );
    let nkeys = w.u32()?;
    ensure!(
        nkeys == 1,
        "the key file holds {nkeys} keys; expected exactly one"
    );
    let public_blob = w.string()?;
    let private = w.string()?;

    let mut p = Wire {
        b: private,
        what: "the private section of the OpenSSH key",
    };
    let (c1, c2) = (p.u32()?, p.u32()?);
    ensure!(
        c1 == c2,
        "check integers differ ({c1:#x} != {c2:#x}): corrupt or encrypted key"
    );
    let ktype = p.string()?;
    ensure!(
        ktype == KEY_TYPE.as_bytes(),
        "the key is {}, not {KEY_TYPE}; generate it with -t ed25519",
        String::from_utf8_lossy(ktype)
    );
    let public = p.string()?;
    let secret = p.string()?;
    let _comment = p.string()?;
    ensure!(
        public.len() == ED25519_KEY_LEN,
        "ed25519 public key of {} bytes, expected {ED25519_KEY_LEN}",
        public.len()
    );
    ensure!(
        secret.len() == 2 * ED25519_KEY_LEN,
        "ed25519 private key of {} bytes, expected {}",
        secret.len(),
        2 * ED25519_KEY_LEN
    );
    ensure!(
        &secret[ED25519_KEY_LEN..] == public,
        "the private key's embedded public half differs from its public key: corrupt key"
    );
    ensure!(
        p.b.iter().enumerate().all(|(i, &b)| b as usize == i + 1),
        "bad padding after the private key: corrupt key"
    );
    let mut kp = Ed25519Keypair {
        seed: [0; ED25519_KEY_LEN],
        public: [0; ED25519_KEY_LEN],
    };
    kp.seed.copy_from_slice(&secret[..ED25519_KEY_LEN]);
    kp.public.copy_from_slice(public);
    ensure!(
        public_blob == kp.public_blob(),
        "the key file's public blob does not match its private section: corrupt key"
    );
    Ok(kp)
}

/// Standard base64 with padding (OpenSSH's key blobs).
fn base64_encode(data: &[u8]) -> String {
    vmdisk_ssh::hostkey::base64_encode(data)
}

/// Standard base64 as OpenSSH writes it: whitespace (PEM line breaks) is ignored, padding
/// optional.
fn base64_decode(text: &str) -> Result<Vec<u8>> {
    vmdisk_ssh::hostkey::base64_decode(text).context("invalid base64")
}

/// Write `path` holding exactly one entry: the guest's key for 127.0.0.1:`port`.
/// `host_public_line` is "TYPE BASE64 [comment]"; the comment is dropped.
pub fn write_known_hosts(path: &Path, port: u16, host_public_line: &str) -> Result<()> {
    let key = vmdisk_ssh::hostkey::PublicKey::parse_line(host_public_line)
        .with_context(|| format!("host key {host_public_line:?}"))?;
    let name = vmdisk_ssh::hostkey::known_hosts_name("127.0.0.1", port);
    fs::write(path, format!("{name} {}\n", key.to_line()))
        .with_context(|| format!("writing {}", path.display()))
}

/// Run `cmd` to completion, feeding `stdin` (or /dev/null) and collecting its output; after
/// `timeout` kill its whole process group and fail. Never waits longer than `timeout` plus
/// a short grace for the pipes. (The shared [`vmdisk_ssh::run_bounded`] with anyhow errors.)
pub fn run_bounded(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
) -> Result<SshOutput> {
    Ok(vmdisk_ssh::run_bounded(cmd, stdin, timeout)?)
}

/// Quote a path for an `ssh -o Key=VALUE` option: ssh splits values on whitespace (unless
/// double-quoted) and expands `%` tokens in file names.
fn ssh_path_value(p: &Path) -> String {
    let s = p.to_string_lossy().replace('%', "%%");
    if s.contains(|c: char| c.is_whitespace() || c == '"' || c == '\\' || c == '\'') {
        format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
    } else {
        s
    }
}

/// How to reach one guest with the OpenSSH client.
#[derive(Clone, Debug)]
pub struct Ssh {
    pub port: u16,
    /// The client's private key (mode 0600, or ssh ignores it).
    pub key: PathBuf,
    /// A known_hosts file pinning the guest's host key (see [`write_known_hosts`]).
    pub known_hosts: PathBuf,
    pub user: String,
    pub connect_timeout_s: u32,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Auth {
    Key,
    KeyTty,
    Password,
}

/// Environment variable the askpass helper reads the password from.
const ASKPASS_ENV: &str = "VMDISK_SSH_PASSWORD";

impl Ssh {
    fn command(&self, auth: Auth) -> Command {
        let mut c = Command::new("ssh");
        let o = |c: &mut Command, kv: String| {
            c.arg("-o").arg(kv);
        };
        c.args(["-F", "/dev/null"]);
        o(&mut c, "StrictHostKeyChecking=yes".into());
        o(
            &mut c,
            format!("UserKnownHostsFile={}", ssh_path_value(&self.known_hosts)),
        );
        o(&mut c, "GlobalKnownHostsFile=/dev/null".into());
        o(&mut c, "UpdateHostKeys=no".into());
        o(&mut c, "CheckHostIP=no".into());
        o(&mut c, "IdentitiesOnly=yes".into());
        o(
            &mut c,
            format!("IdentityFile={}", ssh_path_value(&self.key)),
        );
        match auth {
            Auth::Key | Auth::KeyTty => o(&mut c, "BatchMode=yes".into()),
            Auth::Password => {
                o(&mut c, "PreferredAuthentications=password".into());
                o(&mut c, "PubkeyAuthentication=no".into());
                o(&mut c, "NumberOfPasswordPrompts=1".into());
            }
        }
        o(&mut c, format!("ConnectTimeout={}", self.connect_timeout_s));
        o(&mut c, "ServerAliveInterval=2".into());
        o(&mut c, "LogLevel=ERROR".into());
        if auth == Auth::KeyTty {
            c.arg("-t");
        }
        c.arg("-p").arg(self.port.to_string());
        // `--` so that a remote command starting with '-' is never read as an ssh option.
        c.arg("--").arg(format!("{}@127.0.0.1", self.user));
        c
    }

    /// `ssh` with every option set (key auth, batch mode, pinned host key); append the remote
    /// command as one argument.
    pub fn base_command(&self) -> Command {
        self.command(Auth::Key)
    }

    /// Run `remote_cmd` in the guest, feeding `stdin`; kill ssh and fail after `timeout`.
    /// A nonzero exit is not an error here: look at `status` (255 = ssh itself failed; its
    /// stderr carries one of the `SIG_*` messages).
    pub fn run(
        &self,
        remote_cmd: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<SshOutput> {
        let mut c = self.base_command();
        c.arg(remote_cmd);
        run_bounded(&mut c, stdin, timeout)
            .with_context(|| format!("ssh {}@127.0.0.1:{} {remote_cmd:?}", self.user, self.port))
    }

    /// `ssh` logging in with `password` non-interactively: an askpass helper (written next
    /// to the known_hosts file) prints it, stdin is /dev/null. Append the remote command;
    /// run it with [`run_bounded`].
    pub fn password_command(&self, password: &str) -> Result<Command> {
        let dir = self
            .known_hosts
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        let askpass = dir.join("askpass.sh");
        fs::write(
            &askpass,
            format!("#!/bin/sh\nprintf '%s\\n' \"${ASKPASS_ENV}\"\n"),
        )
        .with_context(|| format!("writing the askpass helper {}", askpass.display()))?;
        fs::set_permissions(&askpass, fs::Permissions::from_mode(0o700))
            .with_context(|| format!("chmod 700 {}", askpass.display()))?;
        let mut c = self.command(Auth::Password);
        c.env("SSH_ASKPASS", &askpass)
            .env("SSH_ASKPASS_REQUIRE", "force")
            .env("DISPLAY", "none")
            .env(ASKPASS_ENV, password)
            .stdin(Stdio::null());
        Ok(c)
    }

    /// `ssh -t` for an interactive shell on the caller's terminal.
    pub fn interactive(&self) -> Command {
        self.command(Auth::KeyTty)
    }
}

/// Wait until 127.0.0.1:`port` sends an SSH identification line ("SSH-2.0-..."), i.e. the
/// guest's sshd really answers (slirp accepts connections before the guest listens, then
/// closes them). Returns how long this call waited. Fails at `deadline`, or as soon as
/// `is_alive` says qemu exited.
pub fn wait_banner(
    port: u16,
    deadline: Instant,
    is_alive: &mut dyn FnMut() -> bool,
) -> Result<Duration> {
    let t0 = Instant::now();
    let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let mut tries = 0u32;
    let mut last = String::from("no attempt yet");
    loop {
        if !is_alive() {
            bail!(
                "qemu exited while waiting for the guest's SSH banner on 127.0.0.1:{port} \
                 (after {tries} tries; last: {last}); see qemu's stderr and the serial log"
            );
        }
        let now = Instant::now();
        if now >= deadline {
            bail!(
                "no SSH banner on 127.0.0.1:{port} within {:.1}s ({tries} tries; last: {last}); \
                 the guest's sshd did not come up: look for dropbear and network errors in the \
                 serial log",
                (now - t0).as_secs_f64()
            );
        }
        tries += 1;
        match try_banner(addr, deadline) {
            Ok(line) => {
                if vmdisk_ssh::banner::is_ssh2(&line) {
                    return Ok(t0.elapsed());
                }
                last = format!("unexpected identification {line:?}");
            }
            Err(e) => last = e,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        std::thread::sleep(BANNER_POLL.min(left));
    }
}

/// One connection: the first line starting with "SSH-", or why there was none.
fn try_banner(addr: SocketAddr, deadline: Instant) -> Result<String, String> {
    let left = deadline.saturating_duration_since(Instant::now());
    vmdisk_ssh::banner::read_banner(
        addr,
        BANNER_CONNECT_TIMEOUT.min(left),
        BANNER_READ_TIMEOUT.min(left),
    )
    .map_err(|e| {
        let mut msg = e.to_string();
        if let Some(src) = std::error::Error::source(&e) {
            msg.push_str(&format!(": {src}"));
        }
        msg
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::io::Write;
    use std::net::TcpListener;

    /// Build an OpenSSH private key file the way ssh-keygen lays it out.
    fn openssh_pem(kp: &Ed25519Keypair, check: u32, comment: &str) -> String {
        let mut private = Vec::new();
        private.extend_from_slice(&check.to_be_bytes());
        private.extend_from_slice(&check.to_be_bytes());
        put_string(&mut private, KEY_TYPE.as_bytes());
        put_string(&mut private, &kp.public);
        let mut secret = kp.seed.to_vec();
        secret.extend_from_slice(&kp.public);
        put_string(&mut private, &secret);
        put_string(&mut private, comment.as_bytes());
        let mut pad = 1u8;
        while private.len() % 8 != 0 {
            private.push(pad);
            pad += 1;
        }
        let mut blob = OPENSSH_MAGIC.to_vec();
        put_string(&mut blob, b"none");
        put_string(&mut blob, b"none");
        put_string(&mut blob, b"");
        blob.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut blob, &kp.public_blob());
        put_string(&mut blob, &private);
        let b64 = base64_encode(&blob);
        let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
        for chunk in b64.as_bytes().chunks(70) {
            pem.push_str(std::str::from_utf8(chunk).unwrap());
            pem.push('\n');
        }
        pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
        pem
    }

    fn sample() -> Ed25519Keypair {
        let mut kp = Ed25519Keypair {
            seed: [0; 32],
            public: [0; 32],
        };
        for i in 0..32 {
            kp.seed[i] = i as u8;
            kp.public[i] = 0xa0 + i as u8;
        }
        kp
    }

    #[test]
    fn openssh_key_converts_to_dropbear_layout() {
        let kp = sample();
        let pem = openssh_pem(&kp, 0x1234_5678, "vmdisk-assets");
        let got = parse_openssh_ed25519(&pem).unwrap();
        assert_eq!(got, kp);
        let d = got.dropbear_private();
        assert_eq!(d.len(), 4 + 11 + 4 + 64);
        assert_eq!(&d[..4], &[0, 0, 0, 11]);
        assert_eq!(&d[4..15], b"ssh-ed25519");
        assert_eq!(&d[15..19], &[0, 0, 0, 64]);
        assert_eq!(&d[19..51], &kp.seed);
        assert_eq!(&d[51..], &kp.public);
        let line = got.public_line();
        assert!(
            line.starts_with("ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAI"),
            "{line}"
        );
    }

    #[test]
    fn a_real_ssh_keygen_key_parses() {
        // Generated once with `ssh-keygen -t ed25519 -N '' -C test`; public line from its .pub.
        let pem = "-----BEGIN OPENSSH PRIVATE KEY-----
b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW
QyNTUxOQAAACB4hm0/+w6bLVU+eWLNuWv76+IsQYB0tR1TLrMW5xkUkQAAAIiAnGArgJxg
KwAAAAtzc2gtZWQyNTUxOQAAACB4hm0/+w6bLVU+eWLNuWv76+IsQYB0tR1TLrMW5xkUkQ
AAAEAKTor5ewAJ5Ijn9WyKn9N97xf1A1+fBvBTAl+7+CI7qXiGbT/7DpstVT55Ys25a/vr
4ixBgHS1HVMusxbnGRSRAAAABHRlc3QB
-----END OPENSSH PRIVATE KEY-----
";
        let kp = parse_openssh_ed25519(pem).unwrap();
        assert_eq!(
            kp.public_line(),
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHiGbT/7DpstVT55Ys25a/vr4ixBgHS1HVMusxbnGRSR"
        );
    }

    #[test]
    fn wrong_keys_are_refused_with_reasons() {
        let kp = sample();
        let good = openssh_pem(&kp, 7, "c");
        let reencode = |f: &dyn Fn(&mut Vec<u8>)| {
            let s = good.find('\n').unwrap() + 1;
            let e = good.find("-----END").unwrap();
            let mut blob = base64_decode(&good[s..e]).unwrap();
            f(&mut blob);
            format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
                base64_encode(&blob)
            )
        };
        let err = |pem: &str| format!("{:#}", parse_openssh_ed25519(pem).unwrap_err());
        assert!(err("hello").contains("not an OpenSSH private key"));
        // Encrypted: cipher "aes256-ctr" instead of "none".
        let enc = reencode(&|b: &mut Vec<u8>| {
            let at = OPENSSH_MAGIC.len();
            b.splice(at..at + 8, {
                let mut s = Vec::new();
                put_string(&mut s, b"aes256-ctr");
                s
            });
        });
        assert!(err(&enc).contains("encrypted"), "{}", err(&enc));
        // Flip a check integer (first byte of the private section).
        let bad_check = reencode(&|b: &mut Vec<u8>| {
            let n = b.len();
            let private_len: usize = 4 + 4 + (4 + 11) + (4 + 32) + (4 + 64) + (4 + 1);
            let padded = private_len.div_ceil(8) * 8;
            b[n - padded] ^= 0xff;
        });
        assert!(err(&bad_check).contains("check integers differ"));
        // Truncated.
        let short = reencode(&|b: &mut Vec<u8>| b.truncate(b.len() - 40));
        assert!(err(&short).contains("bytes left") || err(&short).contains("length field"));
    }

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for (plain, enc) in [
            (&b""[..], ""),
            (b"f", "Zg=="),
            (b"fo", "Zm8="),
            (b"foo", "Zm9v"),
            (b"foob", "Zm9vYg=="),
        ] {
            assert_eq!(base64_encode(plain), enc);
            assert_eq!(base64_decode(enc).unwrap(), plain);
        }
        assert_eq!(base64_decode("Zm9v\n Yg==").unwrap(), b"foob");
        assert!(base64_decode("Zm9v!").is_err());
        assert!(base64_decode("Zg==Zg").is_err());
    }

    proptest! {
        #[test]
        fn parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut blob = OPENSSH_MAGIC.to_vec();
            blob.extend_from_slice(&bytes);
            let pem = format!(
                "-----BEGIN OPENSSH PRIVATE KEY-----\n{}\n-----END OPENSSH PRIVATE KEY-----\n",
                base64_encode(&blob)
            );
            let _ = parse_openssh_ed25519(&pem);
        }

        #[test]
        fn any_keypair_round_trips(seed in any::<[u8; 32]>(), public in any::<[u8; 32]>(),
                                   check in any::<u32>(), comment in "[a-z@.-]{0,20}") {
            let kp = Ed25519Keypair { seed, public };
            prop_assert_eq!(parse_openssh_ed25519(&openssh_pem(&kp, check, &comment)).unwrap(), kp);
        }
    }

    #[test]
    fn known_hosts_entry_brackets_the_port_and_drops_the_comment() {
        let dir = tempfile::tempdir().unwrap();
        let kh = dir.path().join("known_hosts");
        let line = sample().public_line();
        write_known_hosts(&kh, 2222, &format!("{line} root@guest")).unwrap();
        assert_eq!(
            fs::read_to_string(&kh).unwrap(),
            format!("[127.0.0.1]:2222 {line}\n")
        );
        write_known_hosts(&kh, 22, &line).unwrap();
        assert_eq!(
            fs::read_to_string(&kh).unwrap(),
            format!("127.0.0.1 {line}\n")
        );
        assert!(write_known_hosts(&kh, 22, "garbage").is_err());
        assert!(write_known_hosts(&kh, 22, "ssh-ed25519 !!!").is_err());
    }

    fn ssh() -> Ssh {
        Ssh {
            port: 2222,
            key: "/k/client key%1".into(),
            known_hosts: "/k/known_hosts".into(),
            user: "root".into(),
            connect_timeout_s: 10,
        }
    }

    fn argv(c: &Command) -> Vec<String> {
        std::iter::once(c.get_program())
            .chain(c.get_args())
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }

    #[test]
    fn base_command_golden() {
        let want = "ssh -F /dev/null -o StrictHostKeyChecking=yes \
            -o UserKnownHostsFile=/k/known_hosts -o GlobalKnownHostsFile=/dev/null \
            -o UpdateHostKeys=no -o CheckHostIP=no -o IdentitiesOnly=yes \
            -o IdentityFile=\"/k/client key%%1\" -o BatchMode=yes -o ConnectTimeout=10 \
            -o ServerAliveInterval=2 -o LogLevel=ERROR -p 2222 -- root@127.0.0.1";
        let got = argv(&ssh().base_command());
        // The quoted identity file has a space inside one argument: compare around it.
        let joined = got.join(" ");
        assert_eq!(joined, want);
        assert!(got.contains(&"IdentityFile=\"/k/client key%%1\"".to_string()));
        let i = argv(&ssh().interactive());
        let t = i.iter().position(|a| a == "-t").unwrap();
        assert!(t < i.iter().position(|a| a == "--").unwrap());
    }

    #[test]
    fn password_command_uses_askpass_and_no_keys() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = ssh();
        s.known_hosts = dir.path().join("known_hosts");
        let c = s.password_command("hunter2").unwrap();
        let a = argv(&c).join(" ");
        assert!(
            a.contains(
                "-o PreferredAuthentications=password -o PubkeyAuthentication=no \
                            -o NumberOfPasswordPrompts=1"
            ),
            "{a}"
        );
        assert!(!a.contains("BatchMode"), "{a}");
        let env: Vec<(String, String)> = c
            .get_envs()
            .filter_map(|(k, v)| Some((k.to_string_lossy().into(), v?.to_string_lossy().into())))
            .collect();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        assert_eq!(get("SSH_ASKPASS_REQUIRE").as_deref(), Some("force"));
        assert_eq!(get(ASKPASS_ENV).as_deref(), Some("hunter2"));
        // The helper prints the password from the environment.
        let helper = get("SSH_ASKPASS").unwrap();
        let mut h = Command::new(&helper);
        h.env(ASKPASS_ENV, "it's a \"pass\" $HOME");
        let out = run_bounded(&mut h, None, Duration::from_secs(10)).unwrap();
        assert_eq!(out.stdout_text(), "it's a \"pass\" $HOME\n");
    }

    /// The wrapper keeps what vmdisk-ssh's tests prove (output, exit status, the process
    /// group killed) and its error still names the kill and what the process said.
    #[test]
    fn run_bounded_errors_say_the_process_was_killed_and_what_it_printed() {
        let mut c = Command::new("sh");
        c.args(["-c", "echo started >&2; sleep 30 & sleep 30"]);
        let t = Instant::now();
        let e = run_bounded(&mut c, None, Duration::from_millis(300)).unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let msg = format!("{e:#}");
        assert!(
            msg.contains("was killed") && msg.contains("started"),
            "{msg}"
        );
    }

    #[test]
    fn wait_banner_skips_closed_connections_until_a_banner() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        let server = std::thread::spawn(move || {
            // Like slirp before the guest listens: accept and close, twice.
            for _ in 0..2 {
                drop(l.accept().unwrap());
            }
            let (mut s, _) = l.accept().unwrap();
            s.write_all(b"SSH-2.0-dropbear_2022.83\r\n").unwrap();
        });
        let d = wait_banner(port, Instant::now() + Duration::from_secs(10), &mut || true).unwrap();
        assert!(d < Duration::from_secs(10));
        server.join().unwrap();
    }

    #[test]
    fn wait_banner_gives_up_at_the_deadline_or_when_qemu_died() {
        let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let port = l.local_addr().unwrap().port();
        // Accepts (backlog) but never speaks.
        let t = Instant::now();
        let e = wait_banner(
            port,
            Instant::now() + Duration::from_millis(400),
            &mut || true,
        )
        .unwrap_err();
        assert!(t.elapsed() < Duration::from_secs(3));
        let msg = format!("{e:#}");
        assert!(msg.contains(&format!("127.0.0.1:{port}")), "{msg}");
        assert!(msg.contains("no SSH banner"), "{msg}");
        let e = wait_banner(port, Instant::now() + Duration::from_secs(60), &mut || {
            false
        })
        .unwrap_err();
        assert!(format!("{e:#}").contains("qemu exited"));
        drop(l);
    }
}
