//! A real OpenSSH server for tests: `sshd -D` on 127.0.0.1 at a port obtained from port 0,
//! with its own ed25519 host key, its own authorized_keys and a PATH holding test stubs
//! (`nix-store`, `nix-daemon`), killed on Drop. It logs in the user running the tests (sshd
//! can only authenticate an account that exists, and the tests create none).

use std::fs;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::{require_tool, run};

/// How long sshd may take to answer with its banner after starting.
const SSHD_READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the server's PATH offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteNix {
    /// Stub `nix-store --version` and `nix-daemon --stdio` (answers the worker magic).
    Stub,
    /// No Nix at all.
    None,
}

pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// `ssh-ed25519 AAAA...` of the server.
    pub host_pub: String,
    /// A private key the server accepts (0600, owned by the test user).
    pub client_key: PathBuf,
    /// The account sshd logs in.
    pub login: String,
    child: Child,
    pub log: PathBuf,
}

/// A port nothing listens on right now (bound on port 0, then released).
pub fn free_port() -> u16 {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// `ssh-keygen -t ed25519 -N '' -f path`.
pub fn keygen(path: &Path) {
    run(Command::new(require_tool("ssh-keygen"))
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "vmdisk-test", "-f"])
        .arg(path))
    .ok();
}

fn current_user() -> String {
    let out = run(Command::new("id").arg("-un")).ok();
    out.stdout.trim().to_string()
}

impl Sshd {
    pub fn start(nix: RemoteNix) -> Sshd {
        let sshd = PathBuf::from("/usr/sbin/sshd");
        assert!(
            sshd.is_file(),
            "sshd is not installed: apt-get install -y openssh-server (or: cargo xtask deps)"
        );
        let dir = tempfile::Builder::new()
            .prefix("vmdisk-sshd-")
            .tempdir()
            .expect("tempdir");
        // Others (a second local user in the tests) must reach files below it.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).unwrap();
        let d = dir.path();
        let host_key = d.join("host_ed25519");
        keygen(&host_key);
        let host_pub = fs::read_to_string(d.join("host_ed25519.pub")).unwrap();
        let host_pub = host_pub
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        let client_key = d.join("client_key");
        keygen(&client_key);
        fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        let bin = d.join("bin");
        fs::create_dir(&bin).unwrap();
        if nix == RemoteNix::Stub {
            let store = bin.join("nix-store");
            fs::write(
                &store,
                "#!/bin/sh\ncase \"$1\" in --version) echo 'nix-store (Nix) 2.18.1'; exit 0;; esac\n\
                 echo \"stub nix-store: $*\" >&2; exit 1\n",
            )
            .unwrap();
            // nix-daemon --stdio: read the client's 8-byte hello, answer WORKER_MAGIC_2
            // (0x6478696f, little-endian u64) and the protocol version 1.37.
            let daemon = bin.join("nix-daemon");
            fs::write(
                &daemon,
                "#!/bin/sh\n[ \"$1\" = --stdio ] || exit 1\nhead -c 8 >/dev/null\n\
                 printf '\\157\\151\\170\\144\\000\\000\\000\\000\\045\\001\\000\\000\\000\\000\\000\\000'\n",
            )
            .unwrap();
            for p in [&store, &daemon] {
                fs::set_permissions(p, fs::Permissions::from_mode(0o755)).unwrap();
            }
        }
        if nix == RemoteNix::None {
            // This machine may have Nix in /usr/bin (nix-bin): the server's PATH is only this
            // directory, holding the few tools a login and the doctor's probe use.
            for tool in [
                "sh", "bash", "head", "uname", "mktemp", "mkdir", "chmod", "cat", "rm", "tr",
                "sed", "printf", "id", "true",
            ] {
                if let Some(p) = ["/usr/bin", "/bin"]
                    .iter()
                    .map(|d| Path::new(d).join(tool))
                    .find(|p| p.exists())
                {
                    std::os::unix::fs::symlink(p, bin.join(tool)).unwrap();
                }
            }
        }
        if !Path::new("/run/sshd").is_dir() {
            // sshd's privilege separation directory (Debian's service creates it at boot).
            let _ = fs::create_dir_all("/run/sshd");
        }
        let port = free_port();
        let login = current_user();
        let config = d.join("sshd_config");
        fs::write(
            &config,
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile none\n\
                 AuthorizedKeysFile {ak}\nStrictModes no\nUsePAM no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 SetEnv PATH={path}\nLogLevel VERBOSE\n\
                 AllowUsers {login}\n",
                hk = host_key.display(),
                ak = d.join("authorized_keys").display(),
                path = match nix {
                    RemoteNix::Stub => format!("{}:/usr/local/bin:/usr/bin:/bin", bin.display()),
                    RemoteNix::None => bin.display().to_string(),
                },
            ),
        )
        .unwrap();
        let log = d.join("sshd.log");
        let child = Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .expect("start sshd");
        let mut s = Sshd {
            dir,
            port,
            host_pub,
            client_key,
            login,
            child,
            log,
        };
        s.wait_ready();
        s
    }

    fn wait_ready(&mut self) {
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, self.port));
        let t0 = Instant::now();
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!(
                    "sshd exited ({st}) before listening: {}",
                    fs::read_to_string(&self.log).unwrap_or_default()
                );
            }
            let ok = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .and_then(|mut s| {
                    use std::io::Read;
                    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
                    let mut b = [0u8; 4];
                    s.read_exact(&mut b).ok()?;
                    Some(&b == b"SSH-")
                })
                .unwrap_or(false);
            if ok {
                return;
            }
            assert!(
                t0.elapsed() < SSHD_READY_TIMEOUT,
                "sshd did not answer on {addr} within {SSHD_READY_TIMEOUT:?}: {}",
                fs::read_to_string(&self.log).unwrap_or_default()
            );
            // Poll interval while sshd binds its socket (readiness is the banner above).
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `ssh://LOGIN@127.0.0.1:PORT`.
    pub fn uri(&self) -> String {
        format!("ssh://{}@127.0.0.1:{}", self.login, self.port)
    }

    /// The machines-file base64 field of the server's host key (`base64 -w0` of the .pub line).
    pub fn host_key_field(&self) -> String {
        let out = run(Command::new("base64")
            .arg("-w0")
            .arg(self.path("host_ed25519.pub")))
        .ok();
        out.stdout.trim().to_string()
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
