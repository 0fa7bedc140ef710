#!/bin/busybox sh
# Stage 1 of a vmdisk test VM: the initramfs's /init. It mirrors NixOS's stage 1: load modules,
# find the root filesystem by label, mount it on /mnt-root, mount the `nix-store` share on
# /nix/.ro-store with a writable overlay on /nix/store, and switch to stage 2 from the store
# (the `init=` kernel parameter). Every step prints one marker line that the harness reads:
#   @@vmdisk stage1 <step> <details>      and on failure   @@vmdisk FAIL stage1 <step>: <why>
# Parameters (kernel command line): init=/nix/store/...-system/init  vmdisk.root=LABEL=nixos
#   vmdisk.store=9p|virtiofs  vmdisk.root_wait=SECONDS
/bin/busybox mkdir -p /bin /sbin /proc /sys /dev /mnt-root
/bin/busybox --install -s /bin
export PATH=/bin

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Under vfkit the console is hvc0 (virtio-console), a module in Debian's kernel: until it is
# loaded /dev/console has no device, so load it first and reopen the console.
case " $(cat /proc/cmdline) " in *" vmdisk.backend=vfkit "*)
    for m in $(cat /lib/modules/load-order.vfkit); do insmod "/lib/modules/$m"; done
    exec </dev/console >/dev/console 2>&1 ;;
esac
echo "@@vmdisk stage1 start"
# An accelerator probe boot (the harness checks that KVM really runs a guest) ends here.
case " $(cat /proc/cmdline) " in *" vmdisk.probe=1 "*) echo "@@vmdisk probe ok"; poweroff -f ;; esac

fail() {
    echo "@@vmdisk FAIL stage1 $1: $2"
    echo "--- /proc/partitions"; cat /proc/partitions
    echo "--- last kernel messages"; dmesg | tail -n 15
    echo "@@vmdisk stage1 halted"
    sync
    poweroff -f
}

root=LABEL=nixos store=9p root_wait=5 init=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        init=*) init="${arg#init=}" ;;
        vmdisk.root=*) root="${arg#vmdisk.root=}" ;;
        vmdisk.store=*) store="${arg#vmdisk.store=}" ;;
        vmdisk.root_wait=*) root_wait="${arg#vmdisk.root_wait=}" ;;
    esac
done

# Module groups, dependencies first: base, the store transport, and nbd for the rescue VM.
groups="base $store"
case " $(cat /proc/cmdline) " in *" vmdisk.nbd="*) groups="$groups nbd" ;; esac
n=0
for g in $groups; do
    [ -f "/lib/modules/load-order.$g" ] || fail modules "no module group $g in the initramfs"
    for m in $(cat "/lib/modules/load-order.$g"); do
        [ -d "/sys/module/${m%.ko}" ] && continue
        insmod "/lib/modules/$m" || fail modules "insmod $m failed"
        n=$((n + 1))
    done
done
echo "@@vmdisk stage1 modules-loaded $n"

# virtio probes finish asynchronously: retry findfs until the deadline (tenths of a second).
tries=$((root_wait * 10))
dev=
while [ "$tries" -gt 0 ]; do
    dev=$(findfs "$root" 2>/dev/null) && break
    dev=
    tries=$((tries - 1))
    usleep 100000
done
[ -n "$dev" ] || fail root "no root device $root after ${root_wait}s (findfs found none)"
echo "@@vmdisk stage1 root-found $root $dev"

mount -t ext4 "$dev" /mnt-root || fail root "mounting $dev ($root) as ext4 failed"
echo "@@vmdisk stage1 root-mounted $dev ext4"

mkdir -p /mnt-root/nix/.ro-store /mnt-root/nix/.rw-store /mnt-root/nix/store
case "$store" in
    9p)
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro \
            nix-store /mnt-root/nix/.ro-store \
            || fail store "mounting the nix-store share (9p) on /nix/.ro-store failed"
        ;;
    virtiofs)
        mount -t virtiofs -o ro nix-store /mnt-root/nix/.ro-store \
            || fail store "mounting the nix-store share (virtiofs) on /nix/.ro-store failed"
        ;;
    *) fail store "unknown vmdisk.store=$store (expected 9p or virtiofs)" ;;
esac
echo "@@vmdisk stage1 store-mounted nix-store $store"

mount -t tmpfs -o mode=0755 tmpfs /mnt-root/nix/.rw-store
mkdir -p /mnt-root/nix/.rw-store/store /mnt-root/nix/.rw-store/work
mount -t overlay overlay \
    -o lowerdir=/mnt-root/nix/.ro-store,upperdir=/mnt-root/nix/.rw-store/store,workdir=/mnt-root/nix/.rw-store/work \
    /mnt-root/nix/store || fail overlay "overlay on /nix/store failed"
echo "@@vmdisk stage1 overlay-mounted /nix/store"

[ -n "$init" ] || fail stage2 "no init= on the kernel command line"
[ -x "/mnt-root$init" ] || fail stage2 "stage 2 $init is not in the store"
mkdir -p /mnt-root/proc /mnt-root/sys /mnt-root/dev
mount --move /proc /mnt-root/proc
mount --move /sys /mnt-root/sys
mount --move /dev /mnt-root/dev
echo "@@vmdisk stage1 switch $init"
exec switch_root /mnt-root "$init"
