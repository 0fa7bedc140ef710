# The nixpkgs attributes of the devShell's tools (and of the `vmtest` app's PATH), by platform.
# Names, not packages, so this file is pure: tests/tests/flake.rs evaluates it without nixpkgs
# and checks that every attribute of flake.nix's command table is here.
{ isLinux, isDarwin }:
[
  # Rust
  "cargo"
  "rustc"
  "rustfmt"
  "clippy"
  "pkg-config"
  # the image oracles and the VM harness's emulator
  "qemu"
  # ext2/3/4, FAT, GPT
  "e2fsprogs"
  "dosfstools"
  "mtools"
  "gptfdisk"
  # SSH into test VMs, password hashes, checksums
  "openssh"
  "openssl"
  "coreutils"
  # GNU cpio reads the initramfs archives the guest builder writes
  "cpio"
  # nix-instantiate for tests/tests/flake.rs
  "nix"
  # the Darwin cross-builds (issue #20): python3 for the zig venv, file to see Mach-O
  "python3"
  "file"
]
++ (
  if isLinux then
    [
      "util-linux" # blkid, sfdisk, swaplabel, mount
      "libnbd" # nbdinfo, nbdcopy (Linux only in nixpkgs)
      "nbd" # nbd-client for the rescue VM's tests
      "virtiofsd" # the store share of virtiofs test VMs
      "xfsprogs" # mkfs.xfs: a reflink-capable filesystem for the copy tests; xfs_repair
      "btrfs-progs" # disko layouts with btrfs partitions, checked by `btrfs check`
      "f2fs-tools" # disko layouts with f2fs partitions (mkfs.f2fs, sload.f2fs, fsck.f2fs)
      "cryptsetup" # the LUKS headers the builder VM writes, read with luksDump
    ]
  else
    [ ]
)
++ (
  if isDarwin then
    [
      "vfkit" # the hypervisor of virtiofs test VMs on macOS
    ]
  else
    [ ]
)
