# The flake check `vmtest-<name>`: boot the test VM of nix/testvm.nix in a NixOS test and assert
# what `cargo xtask vmtest` asserts of its Debian guest, as the definition's [assert] asks:
#
#   stage1  `/` is ext4 found by the root label (LABEL=nixos), on the disk vmdisk built;
#           /nix/.ro-store is the `nix-store` share (9p or virtiofs) under an overlay on /nix/store
#   ssh     sshd answers a fresh 0600 key with StrictHostKeyChecking against the pinned host key
#   uname   `uname -m` is the definition's arch
#
# TCG is enough (no `kvm` system feature is required); KVM only makes it faster.
{
  lib,
  testers,
  # one value of nix/testvm-names.nix
  def,
  # nix/testvm.nix applied to it
  testvm,
}:
let
  a = def."assert";
  py = builtins.toJSON; # a Nix string as a Python string literal

  rootDevice =
    if lib.hasPrefix "LABEL=" def.root then
      "/dev/disk/by-label/${lib.removePrefix "LABEL=" def.root}"
    else
      def.root;
  # "" when `root` is a device path rather than LABEL=...
  rootLabel = if lib.hasPrefix "LABEL=" def.root then lib.removePrefix "LABEL=" def.root else "";

  boot = ''
    machine.start()
    machine.wait_for_unit("multi-user.target")


    def out(cmd: str) -> str:
        return machine.succeed(cmd).strip()
  '';

  stage1 = ''
    with subtest("root: ext4 from ${def.root}, on the disk vmdisk built"):
        fstype = out("findmnt -n -o FSTYPE --mountpoint /")
        assert fstype == "ext4", f"/ is {fstype!r}, expected ext4"
        source = out("readlink -f $(findmnt -n -o SOURCE --mountpoint /)")
        wanted = out("readlink -f ${rootDevice}")
        assert source == wanted, f"/ is mounted from {source}, expected ${rootDevice} ({wanted})"
        disk = out("readlink -f /dev/disk/by-id/virtio-vmdisk")
        parent = "/dev/" + out(f"lsblk -n -o PKNAME {source}")
        assert parent == disk, f"/ is on {parent}, not on vmdisk's disk {disk}"
        root_label = ${py rootLabel}
        if root_label:
            label = out(f"blkid -o value -s LABEL {source}")
            assert label == root_label, f"/ has label {label!r}, expected {root_label!r}"

    with subtest("store: the nix-store share on /nix/.ro-store over ${def.store}, overlay on /nix/store"):
        mount = out("findmnt -n -o SOURCE,FSTYPE --mountpoint /nix/.ro-store").split()
        assert mount == ["nix-store", ${py def.store}], f"/nix/.ro-store is {mount}, expected nix-store ${def.store}"
        store = out("findmnt -n -o FSTYPE --mountpoint /nix/store")
        assert store == "overlay", f"/nix/store is {store!r}, expected an overlay"
  '';

  ssh = ''
    with subtest("ssh: a fresh 0600 key, StrictHostKeyChecking against the pinned host key"):
        machine.wait_for_unit("sshd.service")
        machine.wait_for_open_port(22)
        machine.succeed(
            "rm -rf /tmp/vmtest-ssh && install -d -m 700 /tmp/vmtest-ssh",
            "ssh-keygen -q -t ed25519 -N \"\" -C vmtest -f /tmp/vmtest-ssh/id",
            "test \"$(stat -c %a /tmp/vmtest-ssh/id)\" = 600",
            "install -d -m 755 /etc/ssh/authorized_keys.d",
            "install -m 644 /tmp/vmtest-ssh/id.pub /etc/ssh/authorized_keys.d/root",
            "echo \"localhost $(cut -d ' ' -f 1,2 /etc/ssh/ssh_host_ed25519_key.pub)\""
            " > /tmp/vmtest-ssh/known_hosts",
        )
        answer = out(
            "ssh -i /tmp/vmtest-ssh/id -o IdentitiesOnly=yes -o BatchMode=yes"
            " -o StrictHostKeyChecking=yes -o UserKnownHostsFile=/tmp/vmtest-ssh/known_hosts"
            " root@localhost echo ssh-ok"
        )
        assert answer == "ssh-ok", f"ssh answered {answer!r}"
  '';

  uname = ''
    with subtest("uname -m is ${def.arch}"):
        arch = out("uname -m")
        assert arch == ${py def.arch}, f"uname -m is {arch!r}, expected ${def.arch}"
  '';
in
testers.runNixOSTest {
  name = "vmtest-${def.name}";
  nodes.machine = testvm;
  testScript = lib.concatStringsSep "\n" (
    [ boot ]
    ++ lib.optional a.stage1 stage1
    ++ lib.optional a.ssh ssh
    ++ lib.optional a.uname uname
  );
}
