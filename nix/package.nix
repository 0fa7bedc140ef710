# The `vmdisk` binary (only it: not xtask, the tests or the benches).
{
  lib,
  rustPlatform,
  pkg-config,
  makeWrapper,
  xz,
  e2fsprogs,
  root,
}:
let
  workspace = (builtins.fromTOML (builtins.readFile (root + "/Cargo.toml"))).workspace.package;

  # The cargo workspace as cargo needs it (every member's manifest, testvms/ for the harness's
  # include_str!s), without build output or the Nix files, so editing the flake rebuilds nothing.
  notForCargo = [
    "target"
    "result"
    "flake.nix"
    "flake.lock"
    "nix"
    ".git"
  ];
  src = lib.cleanSourceWith {
    src = root;
    name = "vmdisk-source";
    filter =
      path: _type:
      let
        rel = lib.removePrefix (toString root + "/") (toString path);
      in
      !(builtins.elem rel notForCargo || lib.hasPrefix "result-" rel);
  };
in
rustPlatform.buildRustPackage {
  pname = "vmdisk";
  inherit (workspace) version;
  inherit src;

  cargoLock.lockFile = root + "/Cargo.lock";
  cargoBuildFlags = [
    "-p"
    "vmdisk"
  ];

  nativeBuildInputs = [
    pkg-config
    makeWrapper
  ];
  # liblzma-sys links the system liblzma when pkg-config finds it (else it builds its own copy).
  buildInputs = [ xz ];

  # The tests need qemu (KVM or TCG), qemu-img/qemu-io as oracles and the network (the VM tests
  # download pinned Debian packages); none of that exists in the build sandbox. CI runs them
  # with `cargo xtask test` (.ci/run), and the flake's vmtest-* checks boot the test VMs.
  doCheck = false;

  # `vmdisk create --layout` runs mke2fs for ext2/3/4 partitions.
  postInstall = ''
    wrapProgram $out/bin/vmdisk --prefix PATH : ${lib.makeBinPath [ e2fsprogs ]}
  '';

  meta = {
    description = "Fast, safe VM disk tooling: qcow2/raw images, disko layouts, offline guest repair, NBD export";
    license = with lib.licenses; [
      mit
      asl20
    ];
    mainProgram = "vmdisk";
    platforms = lib.platforms.linux ++ lib.platforms.darwin;
  };
}
