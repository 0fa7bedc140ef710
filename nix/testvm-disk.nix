# The root disk of one test VM, built the way `cargo xtask vmtest` builds it: `vmdisk create
# --layout` from the definition's disko JSON (so the NixOS test boots a disk vmdisk made).
# The root filesystem starts empty, as qemu-vm.nix's does; NixOS populates it on first boot.
{
  lib,
  runCommand,
  vmdisk,
  # one value of nix/testvm-names.nix
  def,
  # the testvms/ folder (layouts and copy-in trees are relative to it)
  dir,
}:
let
  copyIns = lib.mapAttrsToList (
    part: tree: "--copy-in ${lib.escapeShellArg "${part}=${dir + "/${tree}"}"}"
  ) def.copy_in;
in
runCommand "vmdisk-testvm-${def.name}-disk"
  {
    nativeBuildInputs = [ vmdisk ];
    passthru.file = "disk.${def.disk_format}";
  }
  ''
    mkdir -p $out
    vmdisk create -q -f ${def.disk_format} \
      --layout ${dir + "/${def.layout}"} \
      ${lib.concatStringsSep " " copyIns} \
      --seed 1 \
      $out/disk.${def.disk_format} ${lib.optionalString (def.disk_size != null) (lib.escapeShellArg def.disk_size)}
  ''
