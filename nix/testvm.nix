# One test VM (testvms/NAME.toml) as a NixOS configuration on nixpkgs' qemu-vm.nix: the guest
# `cargo xtask vmtest` imitates with Debian packages, here the real thing.
#
#   - the root disk is the one vmdisk builds from the definition's disko layout (nix/testvm-disk.nix),
#     attached read-only with a throwaway qemu overlay (`snapshot=on`), so the store copy is
#     never written; stage 1 finds `/` by the definition's `root` (LABEL=nixos);
#   - the host store is shared as `nix-store` and mounted on /nix/.ro-store under a writable
#     overlay on /nix/store: over 9p as qemu-vm.nix does it (`store = "9p"`), or over virtio-fs
#     with a virtiofsd this module starts (`store = "virtiofs"`);
#   - OpenSSH runs, as on the harness's guest.
#
# Used by the flake's `vmtest-<name>` checks (a NixOS test node) and its `testvm-<name>`
# packages and nixosConfigurations (`nix run .#testvm-<name>`).
{
  # one value of nix/testvm-names.nix
  def,
  # its root disk (nix/testvm-disk.nix)
  disk,
}:
{
  config,
  lib,
  modulesPath,
  ...
}:
let
  cfg = config.virtualisation;
  hostPkgs = cfg.host.pkgs;

  rootDevice =
    if lib.hasPrefix "LABEL=" def.root then
      "/dev/disk/by-label/${lib.removePrefix "LABEL=" def.root}"
    else
      def.root;

  # qemu-vm.nix has no hook to start a daemon before qemu, but its qemu options are pasted into
  # the start script's `exec qemu ...` line unquoted: this program runs there as `$(...)`, starts
  # virtiofsd for the store and prints the options that connect qemu to it (vhost-user needs the
  # guest memory shared, hence the memfd backend). If virtiofsd does not come up it prints an
  # option qemu refuses, so the VM stops at once with virtiofsd's log instead of booting without
  # a store.
  startVirtiofsd = hostPkgs.writeShellScript "vmdisk-start-virtiofsd" ''
    set -u
    dir=$1 mem_mib=$2
    sock=$dir/virtiofsd-nix-store.sock
    log=$dir/virtiofsd-nix-store.log
    ${hostPkgs.coreutils}/bin/rm -f "$sock"
    ${hostPkgs.virtiofsd}/bin/virtiofsd \
      --socket-path="$sock" --shared-dir=${builtins.storeDir} \
      --sandbox=none --cache=auto </dev/null >"$log" 2>&1 &
    # Readiness is the socket; 10 s is plenty for a local daemon.
    for _ in $(${hostPkgs.coreutils}/bin/seq 100); do
      [ -S "$sock" ] && break
      ${hostPkgs.coreutils}/bin/sleep 0.1
    done
    if [ ! -S "$sock" ]; then
      echo "vmdisk testvm: virtiofsd for the nix-store share did not start; its log ($log):" >&2
      ${hostPkgs.coreutils}/bin/cat "$log" >&2
      echo "-virtiofsd-for-nix-store-did-not-start"
      exit 0
    fi
    echo "-chardev socket,id=nix-store-fs,path=$sock" \
      "-device vhost-user-fs-pci,chardev=nix-store-fs,tag=nix-store" \
      "-object memory-backend-memfd,id=nix-store-mem,size=''${mem_mib}M,share=on" \
      "-numa node,memdev=nix-store-mem"
  '';
in
{
  imports = [ (modulesPath + "/virtualisation/qemu-vm.nix") ];

  config = lib.mkMerge [
    {
      virtualisation = {
        # NixOS's systemd needs more than the Debian guest's busybox stage 2 (memory_mib).
        memorySize = lib.max 1024 def.memory_mib;
        cores = def.cpus;
        graphics = false;

        # No qemu-vm.nix root image: the root is vmdisk's disk below.
        diskImage = lib.mkForce null;
        useDefaultFilesystems = false;
        fileSystems."/" = {
          device = rootDevice;
          fsType = "ext4";
        };
        qemu.drives = [
          {
            name = "vmdisk";
            file = "${disk}/${disk.file}";
            driveExtraOpts = {
              format = def.disk_format;
              # writes go to a temporary overlay; the disk in the store stays as built
              snapshot = "on";
              cache = "writeback";
              werror = "report";
            };
            deviceExtraOpts = {
              bootindex = "1";
              # /dev/disk/by-id/virtio-vmdisk: the test checks `/` lives on this disk
              serial = "vmdisk";
            };
          }
        ];
      };

      services.openssh.enable = true;
    }

    (lib.mkIf (def.store == "9p") {
      # qemu-vm.nix's own store share: 9p, tag nix-store, on /nix/.ro-store, overlay on /nix/store.
      virtualisation.mountHostNixStore = true;
      virtualisation.writableStore = true;
    })

    (lib.mkIf (def.store == "virtiofs") {
      # The same shape over virtio-fs, set up here (qemu-vm.nix's share is 9p in nixos-25.05).
      virtualisation.mountHostNixStore = false;
      virtualisation.writableStore = true;
      virtualisation.fileSystems."/nix/.ro-store" = {
        device = "nix-store";
        fsType = "virtiofs";
        neededForBoot = true;
        options = [ "ro" ];
      };
      virtualisation.fileSystems."/nix/store".overlay = {
        lowerdir = [ "/nix/.ro-store" ];
        upperdir = "/nix/.rw-store/upper";
        workdir = "/nix/.rw-store/work";
      };
      boot.initrd.availableKernelModules = [ "virtiofs" ];
      boot.initrd.kernelModules = [ "virtiofs" ];
      virtualisation.qemu.options = [ ''$(${startVirtiofsd} "$TMPDIR" ${toString cfg.memorySize})'' ];
    })
  ];
}
