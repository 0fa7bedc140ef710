{
  description = "vmdisk: fast, safe VM disk tooling (qcow2/raw, disko layouts, offline ext4 repair, NBD) and its test VMs";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  # Outputs (on every system unless noted):
  #   packages.default, packages.vmdisk   the vmdisk binary (nix/package.nix)
  #   packages.testvm-<name>              Linux: the test VM's run script (nix run .#testvm-<name>)
  #   nixosConfigurations.testvm-<name>   the test VMs as NixOS systems (nix/testvm.nix)
  #   checks.vmdisk                       the package builds
  #   checks.vmtest-<name>                Linux: boots testvms/<name>.toml's VM as a NixOS test
  #                                       (nix/vmtest.nix), on the system of its `arch`
  #   devShells.default                   every tool `cargo xtask test` needs (table below)
  #   apps.default, apps.vmtest           `cargo xtask vmtest "$@"` with the devShell's tools
  #
  # The structure (which systems, which check and package names) is computed with builtins only;
  # nixpkgs is touched only inside the values. tests/tests/flake.rs relies on that: it evaluates
  # the names with a stand-in for nixpkgs, because CI has neither a Nix store nor a binary cache.
  #
  # Test tools: every command of xtask/src/deps.rs TOOLS and the nixpkgs attribute that provides
  # it; `where` is the platforms it is on (nixpkgs has no libnbd, nbd or util-linux's Linux tools
  # elsewhere). The attributes are the names in nix/devshell-tools.nix; tests/tests/flake.rs
  # checks this table against both.
  #
  #   command               nixpkgs attribute   where
  #   qemu-img              qemu                all
  #   qemu-io               qemu                all
  #   qemu-nbd              qemu                all
  #   nbdinfo               libnbd              linux
  #   nbdcopy               libnbd              linux
  #   nbdsh                 libnbd              linux
  #   mke2fs                e2fsprogs           all
  #   e2fsck                e2fsprogs           all
  #   debugfs               e2fsprogs           all
  #   dumpe2fs              e2fsprogs           all
  #   filefrag              e2fsprogs           linux
  #   mkfs.xfs              xfsprogs            linux
  #   xfs_repair            xfsprogs            linux
  #   mkfs.btrfs            btrfs-progs         linux
  #   btrfs                 btrfs-progs         linux
  #   mkfs.f2fs             f2fs-tools          linux
  #   sload.f2fs            f2fs-tools          linux
  #   fsck.f2fs             f2fs-tools          linux
  #   sgdisk                gptfdisk            all
  #   sfdisk                util-linux          linux
  #   fsck.vfat             dosfstools          all
  #   mdir                  mtools              all
  #   mcopy                 mtools              all
  #   mkfs.vfat             dosfstools          all
  #   fallocate             util-linux          linux
  #   mount                 util-linux          linux
  #   timeout               coreutils           all
  #   resize2fs             e2fsprogs           all
  #   losetup               util-linux          linux
  #   cryptsetup            cryptsetup          linux
  #   blkid                 util-linux          linux
  #   swaplabel             util-linux          linux
  #   openssl               openssl             all
  #   ssh                   openssh             all
  #   ssh-keygen            openssh             all
  #   sshd                  openssh             all
  #   ssh-keyscan           openssh             all
  #   sha256sum             coreutils           all
  #   cpio                  cpio                all
  #   nix-instantiate       nix                 all
  #   virtiofsd             virtiofsd           linux
  #   qemu-system-x86_64    qemu                all
  #   qemu-system-aarch64   qemu                all
  #   vfkit                 vfkit               darwin
  #   file                  file                all
  #   python3               python3             all

  outputs =
    { self, nixpkgs }:
    let
      systems = [
        "x86_64-linux"
        "aarch64-linux"
        "aarch64-darwin"
        "x86_64-darwin"
      ];
      linuxSystems = builtins.filter (s: builtins.match ".*-linux" s != null) systems;
      forAllSystems =
        f:
        builtins.listToAttrs (
          map (system: {
            name = system;
            value = f system;
          }) systems
        );

      # { "vmtest-<name>" = definition; } of the test VMs whose arch is `system`'s CPU.
      testvmsOn = system: import ./nix/testvm-names.nix { dir = ./testvms; inherit system; };
      # [ definition ] of every test VM, each on its own system.
      allTestvms = builtins.concatMap (s: builtins.attrValues (testvmsOn s)) linuxSystems;

      pkgsFor = system: nixpkgs.legacyPackages.${system};

      toolsFor =
        pkgs:
        map (name: pkgs.${name}) (
          import ./nix/devshell-tools.nix { inherit (pkgs.stdenv.hostPlatform) isLinux isDarwin; }
        );

      vmdiskFor = system: (pkgsFor system).callPackage ./nix/package.nix { root = ./.; };

      # The NixOS module of one test VM (with its disk, built by this system's vmdisk).
      testvmModule =
        def:
        let
          pkgs = pkgsFor def.system;
          disk = pkgs.callPackage ./nix/testvm-disk.nix {
            inherit def;
            vmdisk = vmdiskFor def.system;
            dir = ./testvms;
          };
        in
        import ./nix/testvm.nix { inherit def disk; };

      nixosSystemFor =
        def:
        nixpkgs.lib.nixosSystem {
          modules = [
            (testvmModule def)
            {
              nixpkgs.hostPlatform = def.system;
              system.stateVersion = "25.05";
              # hostnames take no underscores (x86_64)
              networking.hostName = "testvm-" + builtins.replaceStrings [ "_" ] [ "-" ] def.name;
              # an interactive `nix run .#testvm-<name>` logs in on the serial console
              services.getty.autologinUser = "root";
            }
          ];
        };

      vmtestFor =
        def:
        (pkgsFor def.system).callPackage ./nix/vmtest.nix {
          inherit def;
          testvm = testvmModule def;
        };

      vmtestAppFor =
        system:
        let
          pkgs = pkgsFor system;
        in
        pkgs.writeShellApplication {
          name = "vmdisk-vmtest";
          # the devShell's tools, plus what cargo links with
          runtimeInputs = toolsFor pkgs ++ [ pkgs.stdenv.cc ];
          text = ''
            if ! cargo locate-project --workspace >/dev/null 2>&1; then
              echo "vmdisk-vmtest: run this inside a vmdisk checkout (cargo finds no workspace here)" >&2
              exit 2
            fi
            exec cargo xtask vmtest "$@"
          '';
        };
    in
    {
      packages = forAllSystems (
        system:
        {
          default = self.packages.${system}.vmdisk;
          vmdisk = vmdiskFor system;
        }
        // builtins.listToAttrs (
          map (def: {
            name = "testvm-${def.name}";
            value = self.nixosConfigurations."testvm-${def.name}".config.system.build.vm;
          }) (builtins.attrValues (testvmsOn system))
        )
      );

      nixosConfigurations = builtins.listToAttrs (
        map (def: {
          name = "testvm-${def.name}";
          value = nixosSystemFor def;
        }) allTestvms
      );

      checks = forAllSystems (
        system:
        builtins.mapAttrs (_checkName: vmtestFor) (testvmsOn system)
        // {
          vmdisk = self.packages.${system}.vmdisk;
        }
      );

      devShells = forAllSystems (
        system:
        let
          pkgs = pkgsFor system;
        in
        {
          default = pkgs.mkShell {
            packages = toolsFor pkgs;
            # liblzma-sys finds it with pkg-config
            buildInputs = [ pkgs.xz ];
          };
        }
      );

      apps = forAllSystems (
        system:
        let
          app = {
            type = "app";
            program = "${vmtestAppFor system}/bin/vmdisk-vmtest";
            meta.description = "cargo xtask vmtest with the devShell's tools";
          };
        in
        {
          default = app;
          vmtest = app;
        }
      );
    };
}
