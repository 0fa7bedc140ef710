//! Known failure signatures: console, ssh and qemu output -> cause and fix.
//!
//! Each signature is a literal that the failing component really prints (the kernel, OpenSSH,
//! qemu, our stage scripts), checked in order of specificity. Pure functions over text, so
//! every signature has a unit test with the real message.

use serde::Serialize;

/// What went wrong and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Diagnosis {
    /// Stable identifier (`store-share-missing`, `host-key-changed`, ...).
    pub id: &'static str,
    pub cause: String,
    pub fix: String,
    /// The line that matched.
    pub evidence: String,
}

/// The texts a failed run leaves behind.
#[derive(Clone, Copy, Debug, Default)]
pub struct Evidence<'a> {
    pub console: &'a str,
    pub ssh_stderr: &'a str,
    pub qemu_stderr: &'a str,
}

fn line_with<'a>(text: &'a str, needle: &str) -> Option<&'a str> {
    text.lines().find(|l| l.contains(needle)).map(str::trim)
}

/// The first matching signature, most specific first.
pub fn diagnose(ev: Evidence<'_>) -> Option<Diagnosis> {
    let d = |id, cause: String, fix: String, evidence: &str| {
        Some(Diagnosis {
            id,
            cause,
            fix,
            evidence: evidence.to_string(),
        })
    };

    // qemu refused to start.
    if let Some(l) = line_with(ev.qemu_stderr, "Failed to get \"write\" lock")
        .or_else(|| line_with(ev.qemu_stderr, "Failed to get shared \"write\" lock"))
    {
        return d(
            "image-locked",
            "qemu could not get the image lock: another process (a running VM, qemu-nbd or \
             `vmdisk serve`) has the disk open for writing"
                .into(),
            "stop the other user of the image (`fuser -v IMAGE` finds it), or boot an overlay: \
             `vmdisk create -f qcow2 -b IMAGE overlay.qcow2`"
                .into(),
            l,
        );
    }

    // The 9p transport has no device with that mount tag (vfkit offers only virtio-fs).
    if let Some(l) = line_with(ev.console, "9pnet_virtio: no channels available for device") {
        let tag = l
            .rsplit("device ")
            .next()
            .unwrap_or("nix-store")
            .trim()
            .to_string();
        return d(
            "store-share-missing",
            format!(
                "stage 1 mounts the `{tag}` share over 9p, but the VM has no virtio-9p device \
                 with mount_tag={tag} (vfkit has no 9p at all, only virtio-fs)"
            ),
            format!(
                "qemu: add `-virtfs local,path=/nix/store,security_model=none,mount_tag={tag}`; \
                 vfkit: share the store with `--device virtio-fs,sharedDir=/nix/store,\
                 mountTag={tag}` and have stage 1 mount it as virtiofs (NixOS: \
                 `virtualisation.sharedDirectories` over virtiofs, test VM: `store = \
                 \"virtiofs\"`)"
            ),
            l,
        );
    }
    if let Some(l) = line_with(ev.console, "@@vmdisk FAIL stage1 store") {
        return d(
            "store-mount-failed",
            "stage 1 could not mount the `nix-store` share on /nix/.ro-store".into(),
            "check that the VM exports the store with mount tag `nix-store` over the transport \
             stage 1 expects (9p or virtiofs; for virtiofs, that virtiofsd is running)"
                .into(),
            l,
        );
    }

    if let Some(l) = line_with(ev.console, "@@vmdisk FAIL stage1 root") {
        return d(
            "no-root-device",
            format!(
                "stage 1 found no root filesystem: {}",
                l.split_once(": ").map_or(l, |x| x.1)
            ),
            "give the root filesystem the label stage 1 looks for: disko `extraArgs = [ \"-L\" \
             \"nixos\" ]` (or `e2label PARTITION nixos`); `vmdisk inspect DISK` shows the labels"
                .into(),
            l,
        );
    }
    if let Some(l) = line_with(ev.console, "VFS: Unable to mount root fs") {
        return d(
            "no-root-device",
            "the kernel could not mount a root filesystem".into(),
            "check root= and that the disk and its driver (virtio_blk) are present".into(),
            l,
        );
    }

    if let Some(l) = line_with(ev.console, "Exec format error")
        .or_else(|| line_with(ev.ssh_stderr, "Exec format error"))
        .or_else(|| line_with(ev.console, "exec format error"))
    {
        return d(
            "exec-format",
            "a program was built for another architecture than the one running it".into(),
            "build for the guest's architecture, or register qemu-user through binfmt_misc on \
             the host (Debian: `apt-get install qemu-user-static binfmt-support`; NixOS: \
             `boot.binfmt.emulatedSystems = [ \"aarch64-linux\" ]`)"
                .into(),
            l,
        );
    }

    if let Some(l) = line_with(ev.console, "Kernel panic - not syncing") {
        return d(
            "kernel-panic",
            format!(
                "the guest kernel panicked: {}",
                l.split_once("not syncing:").map_or(l, |x| x.1.trim())
            ),
            "read the console log above the panic; a panic right after the initramfs usually \
             means /init failed or is missing"
                .into(),
            l,
        );
    }

    if let Some(l) = line_with(ev.console, "@@vmdisk FAIL") {
        return d(
            "stage-failed",
            l.trim_start_matches("@@vmdisk FAIL ").to_string(),
            "see the console log in the artifact folder".into(),
            l,
        );
    }

    // SSH side: ssh's stderr as vmdisk-ssh classifies it (shared with `vmdisk doctor
    // builder`); the harness's fixes live in ssh.rs.
    if let Some(s) = crate::ssh::diagnose_stderr(ev.ssh_stderr) {
        return d(s.id, s.cause.into(), s.fix.into(), &s.evidence);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn console(c: &str) -> Option<&'static str> {
        diagnose(Evidence {
            console: c,
            ..Default::default()
        })
        .map(|d| d.id)
    }
    fn ssh(s: &str) -> Option<&'static str> {
        diagnose(Evidence {
            ssh_stderr: s,
            ..Default::default()
        })
        .map(|d| d.id)
    }

    #[test]
    fn the_seed_9p_message_names_the_share() {
        let log = "mounting nix-store on /nix/.ro-store...\n\
                   [    0.253387] 9pnet_virtio: no channels available for device nix-store\n\
                   mount: mounting nix-store on /mnt-root/nix/.ro-store failed: No such file or directory\n";
        let d = diagnose(Evidence {
            console: log,
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.id, "store-share-missing");
        assert!(d.cause.contains("`nix-store`"), "{}", d.cause);
        assert!(d.fix.contains("mount_tag=nix-store"));
        assert!(d.evidence.contains("no channels available"));
    }

    #[test]
    fn each_signature_maps_to_its_cause() {
        assert_eq!(
            console("@@vmdisk FAIL stage1 root: no root device LABEL=nixos after 5s"),
            Some("no-root-device")
        );
        assert_eq!(
            console(
                "[ 1.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
            ),
            Some("kernel-panic")
        );
        assert_eq!(
            console("sh: ./hello: Exec format error"),
            Some("exec-format")
        );
        assert_eq!(
            ssh("@@@@@@@@@@@\n@    WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED!     @\n"),
            Some("host-key-changed")
        );
        assert_eq!(
            ssh("Host key verification failed.\n"),
            Some("host-key-changed")
        );
        assert_eq!(
            ssh("@         WARNING: UNPROTECTED PRIVATE KEY FILE!          @\nPermissions 0640 for 'k' are too open.\nroot@127.0.0.1: Permission denied (publickey,password).\n"),
            Some("unprotected-key")
        );
        assert_eq!(
            ssh("root@127.0.0.1: Permission denied (publickey,password)."),
            Some("ssh-auth-refused")
        );
        let d = diagnose(Evidence {
            qemu_stderr: "qemu-system-x86_64: -drive file=d.qcow2: Failed to get \"write\" lock\nIs another process using the image [d.qcow2]?",
            ..Default::default()
        })
        .unwrap();
        assert_eq!(d.id, "image-locked");
        assert_eq!(console("all fine\n@@vmdisk stage2 ready"), None);
    }
}
