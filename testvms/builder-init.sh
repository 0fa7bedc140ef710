#!@system@/bin/sh
# vmdisk-builder-init: make the rescue VM ready to build what only a kernel makes (LUKS, LVM,
# md arrays, btrfs subvolumes) with Debian's cryptsetup, lvm2, mdadm and btrfs-progs, as
# `vmdisk create` runs them. There is no udev here: libdevmapper and mdadm make their own
# device nodes (the caller exports DM_DISABLE_UDEV=1), and LVM reads the lvm.conf in the store,
# which turns udev, monitoring, metadata backups and thin_check off.
set -eu
mods=@system@/lib/vmdisk-modules
for m in $(cat "$mods/load-order"); do
    [ -d "/sys/module/${m%.ko}" ] && continue
    insmod "$mods/$m" || { echo "vmdisk-builder-init: insmod $m failed" >&2; exit 1; }
done
# A new md array's initial resync would write every member through NBD now (slow, and the
# images lose their sparseness); held back here, the kernel resumes it when the array is
# first assembled, as it does after any interrupted resync.
echo 1 > /proc/sys/dev/raid/speed_limit_min
echo 1 > /proc/sys/dev/raid/speed_limit_max
mkdir -p /run/cryptsetup /run/lvm /run/lock/lvm /run/mdadm /dev/mapper /dev/disk/by-partlabel /etc
[ -e /etc/lvm ] || ln -s @system@/etc/lvm /etc/lvm
[ -e /dev/mapper/control ] || { echo "vmdisk-builder-init: no /dev/mapper/control after loading dm_mod" >&2; exit 1; }
echo "vmdisk-builder-init: ready"
