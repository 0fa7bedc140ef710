# The test VMs (testvms/NAME.toml) that get a flake check on `system`:
#
#   { "vmtest-<name>" = <the definition, defaults filled in as crates/vmdisk-vm/src/def.rs does>; }
#
# Pure: builtins only (no nixpkgs, no store paths, no derivations), so it evaluates without a
# Nix store, a daemon or the network: tests/tests/flake.rs runs it with `nix-instantiate --eval`
# and compares the result with testvms/*.toml as the harness reads them.
#
# Definitions are discovered by listing `dir`, never by name: a new testvms/NAME.toml is a new
# check. Each lands on the system of its `arch` (x86_64 -> x86_64-linux, aarch64 ->
# aarch64-linux) so Hydra and remote builders spread the checks by system; on Darwin there
# are none.
{ dir, system }:
let
  isToml = file: type: (type == "regular" || type == "symlink") && builtins.match ".+\\.toml" file != null;

  entries = builtins.readDir dir;
  tomls = builtins.filter (file: isToml file entries.${file}) (builtins.attrNames entries);

  systemOfArch = {
    x86_64 = "x86_64-linux";
    aarch64 = "aarch64-linux";
  };

  # The defaults of crates/vmdisk-vm/src/def.rs (VmDef, Asserts).
  defaults = {
    description = null;
    memory_mib = 384;
    cpus = 1;
    disk_format = "qcow2";
    disk_size = null;
    store = "9p";
    root = "LABEL=nixos";
    copy_in = { };
    quick = false;
  };
  defaultAsserts = {
    stage1 = true;
    ssh = true;
    uname = true;
  };

  load =
    file:
    let
      raw = builtins.fromTOML (builtins.readFile (dir + "/${file}"));
      where = "testvms/${file}";
      need =
        key:
        if raw ? ${key} then raw.${key} else throw "${where}: `${key}` is missing";
      arch = need "arch";
      def = defaults // raw // {
        inherit file;
        name = need "name";
        layout = need "layout";
        "assert" = defaultAsserts // (raw."assert" or { });
        system = systemOfArch.${arch} or (throw "${where}: arch = \"${arch}\": expected x86_64 or aarch64");
      };
    in
    if def.store != "9p" && def.store != "virtiofs" then
      throw "${where}: store = \"${def.store}\": expected 9p or virtiofs"
    else if def.disk_format != "qcow2" && def.disk_format != "raw" then
      throw "${where}: disk_format = \"${def.disk_format}\": expected qcow2 or raw"
    else
      def;

  defs = map load tomls;

  # Two files with one name would silently collapse into one check.
  byName = builtins.groupBy (d: d.name) defs;
  duplicates = builtins.filter (n: builtins.length byName.${n} > 1) (builtins.attrNames byName);

  here = builtins.filter (d: d.system == system) defs;
in
if duplicates != [ ] then
  throw "two test VMs in testvms/ are named ${builtins.head duplicates}"
else
  builtins.listToAttrs (
    map (d: {
      name = "vmtest-${d.name}";
      value = d;
    }) here
  )
