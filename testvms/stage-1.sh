#!/bin/busybox sh
# Stage 1 of a vmdisk test VM: the initramfs's /init. It mirrors NixOS's stage 1: load modules,
# find the root filesystem by label, mount it on /mnt-root, mount the `nix-store` share on
# /nix/.ro-store with a writable overlay on /nix/store, and switch to stage 2 from the store
# (the `init=` kernel parameter). Every step prints one marker line that the harness reads:
#   @@vmdisk stage1 <step> <details>      and on failure   @@vmdisk FAIL stage1 <step>: <why>
# Parameters (kernel command line): init=/nix/store/...-system/init  vmdisk.root=LABEL=nixos
#   vmdisk.store=9p|virtiofs  vmdisk.root_wait=SECONDS
# With vmdisk.personality=nixos-scripted or nixos-systemd the guest has a NixOS personality: no
# markers, but the lines NixOS's own stage 1 prints (nixpkgs stage-1-init.sh, or the systemd
# initrd's unit status lines), and NixOS's handling of boot.panic_on_fail: the scripted stage 1
# exits (the kernel panics, "Attempted to kill init!") instead of waiting at its prompt; the
# systemd initrd reaches emergency mode and panic-on-fail.service crashes the kernel by sysrq.
# bin/ has busybox's applet links already (STAGE1_APPLETS in vmdisk-assets' assemble.rs).
export PATH=/bin
mkdir -p /sbin /proc /sys /dev /mnt-root

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
# Read once, by the shell itself (a `$(cat ...)` is a fork, ~10 ms under TCG).
read -r cmdline </proc/cmdline
# Under vfkit the console is hvc0 (virtio-console), a module in Debian's kernel: until it is
# loaded /dev/console has no device, so load it first and reopen the console.
case " $cmdline " in *" vmdisk.backend=vfkit "*)
    for m in $(cat /lib/modules/load-order.vfkit); do insmod "/lib/modules/$m"; done
    exec </dev/console >/dev/console 2>&1 ;;
esac
nixos= panic_on_fail=
for arg in $cmdline; do
    case "$arg" in
        vmdisk.personality=nixos-scripted) nixos=scripted ;;
        vmdisk.personality=nixos-systemd) nixos=systemd ;;
        boot.panic_on_fail) panic_on_fail=1 ;;
    esac
done
# The NixOS line for a step, by style: say SCRIPTED-LINE SYSTEMD-LINE (either may be empty).
say() {
    case "$nixos" in
        scripted) [ -n "$1" ] && printf '%b\n' "$1" ;;
        # systemd escapes '-' in unit names as \x2d, which printf's %b would decode: the
        # lines carry @x2d@ for it. (A shell substitution, not a sed: each fork costs ~10 ms
        # under TCG.)
        systemd) [ -n "$2" ] && printf '%b\n' "${2//@x2d@/\\\\x2d}" ;;
    esac
    return 0
}
OK='[  \033[0;32mOK\033[0m  ]'
# How NixOS ends a failed stage 1 (the mount's own error and the kernel's lines came before).
nixos_fail() {
    if [ "$nixos" = scripted ]; then
        # stage-1-init.sh's fail(): with boot.panic_on_fail it exits at once, PID 1 dies.
        [ -n "$panic_on_fail" ] && exit 1
        printf '\nAn error occurred in stage 1 of the boot process, which must mount the\n'
        printf "root filesystem on \`/mnt-root' and then start stage 2.  Press one\n"
        printf 'of the following keys:\n\n  r) to reboot immediately\n'
        printf '  *) to ignore the error and continue\n'
    else
        printf '%b\n' "$OK Reached target emergency.target - Emergency Mode."
        printf 'You are in emergency mode. After logging in, type "journalctl -xb" to view\n'
        printf 'system logs, "systemctl reboot" to reboot, or "exit"\nto continue bootup.\n'
        if [ -n "$panic_on_fail" ]; then
            printf '         Starting panic-on-fail.service...\n'
            echo c > /proc/sysrq-trigger
        fi
    fi
    # Waiting for a key that never comes, as NixOS does without boot.panic_on_fail.
    while :; do sleep 3600; done
}
[ -n "$nixos" ] || echo "@@vmdisk stage1 start"
say '\n\033[1;32m<<< NixOS Stage 1 >>>\033[0m\n' 'Welcome to \033[1mNixOS 25.11 (Initrd)\033[0m!\n'
# An accelerator probe boot (the harness checks that KVM really runs a guest) ends here.
case " $cmdline " in *" vmdisk.probe=1 "*) echo "@@vmdisk probe ok"; poweroff -f ;; esac

fail() {
    [ -n "$nixos" ] && nixos_fail
    echo "@@vmdisk FAIL stage1 $1: $2"
    echo "--- /proc/partitions"; cat /proc/partitions
    echo "--- last kernel messages"; dmesg | tail -n 15
    echo "@@vmdisk stage1 halted"
    sync
    poweroff -f
}

root=LABEL=nixos store=9p root_wait=5 init=
for arg in $cmdline; do
    case "$arg" in
        init=*) init="${arg#init=}" ;;
        vmdisk.root=*) root="${arg#vmdisk.root=}" ;;
        vmdisk.store=*) store="${arg#vmdisk.store=}" ;;
        vmdisk.root_wait=*) root_wait="${arg#vmdisk.root_wait=}" ;;
    esac
done

# Module groups, dependencies first: base, the store transport, and nbd for the rescue VM.
groups="base $store"
case " $cmdline " in *" vmdisk.nbd="*) groups="$groups nbd" ;; esac
n=0
for g in $groups; do
    [ -f "/lib/modules/load-order.$g" ] || fail modules "no module group $g in the initramfs"
    for m in $(cat "/lib/modules/load-order.$g"); do
        [ -d "/sys/module/${m%.ko}" ] && continue
        name="${m%.ko}"
        say "loading module ${name##*/}..." ''
        insmod "/lib/modules/$m" || fail modules "insmod $m failed"
        n=$((n + 1))
    done
done
[ -n "$nixos" ] || echo "@@vmdisk stage1 modules-loaded $n"
say 'running udev...' "$OK Finished systemd-modules-load.service - Load Kernel Modules.\n$OK Started systemd-udevd.service - Rule-based Manager for Device Events and Files."
# NixOS names the root by its /dev/disk/by-label link, systemd by the link's device unit.
case "$root" in
    LABEL=*) rootdev="/dev/disk/by-label/${root#LABEL=}" ;;
    *) rootdev="$root" ;;
esac
rootunit="$(echo "${rootdev#/}" | sed 's/-/@x2d@/g; s,/,-,g').device"

# virtio probes finish asynchronously: retry findfs until the deadline (tenths of a second).
tries=$((root_wait * 10))
dev=
while [ "$tries" -gt 0 ]; do
    dev=$(findfs "$root" 2>/dev/null) && break
    dev=
    tries=$((tries - 1))
    usleep 100000
done
if [ -z "$dev" ]; then
    say "Timed out waiting for device $rootdev, trying to mount anyway.\nmounting $rootdev on /...\nmount: mounting $rootdev on /mnt-root/ failed: No such file or directory" \
        "[ \033[0;1;39mTIME\033[0m ] Timed out waiting for device $rootunit - $rootdev.\n[\033[0;1;33mDEPEND\033[0m] Dependency failed for sysroot.mount - /sysroot."
    fail root "no root device $root after ${root_wait}s (findfs found none)"
fi
[ -n "$nixos" ] || echo "@@vmdisk stage1 root-found $root $dev"
say "mounting $rootdev on /..." "$OK Found device $rootunit - $rootdev.\n$OK Reached target initrd-root-device.target - Initrd Root Device.\n         Mounting sysroot.mount - /sysroot..."

mount -t ext4 "$dev" /mnt-root || fail root "mounting $dev ($root) as ext4 failed"
# udev's by-label link, which a NixOS guest has (and vmdisk vmtest resolves over SSH).
if [ -n "$nixos" ] && [ "$rootdev" != "$dev" ]; then
    mkdir -p "$(dirname "$rootdev")" && ln -sf "$dev" "$rootdev"
fi
[ -n "$nixos" ] || echo "@@vmdisk stage1 root-mounted $dev ext4"
say 'mounting nix-store on /nix/.ro-store...' "$OK Mounted sysroot.mount - /sysroot.\n         Mounting sysroot-nix-.ro@x2d@store.mount - /sysroot/nix/.ro-store..."
# The systemd initrd's mount errors go to the journal, not the console.
merr=/dev/console
[ "$nixos" = systemd ] && merr=/dev/null
store_failed() {
    say '' "[\033[0;1;31mFAILED\033[0m] Failed to mount sysroot-nix-.ro@x2d@store.mount - /sysroot/nix/.ro-store.\n[\033[0;1;33mDEPEND\033[0m] Dependency failed for initrd-fs.target - Initrd File Systems."
    fail store "$1"
}

mkdir -p /mnt-root/nix/.ro-store /mnt-root/nix/.rw-store /mnt-root/nix/store
case "$store" in
    9p)
        mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=loose,ro \
            nix-store /mnt-root/nix/.ro-store 2>"$merr" \
            || store_failed "mounting the nix-store share (9p) on /nix/.ro-store failed"
        ;;
    virtiofs)
        mount -t virtiofs -o ro nix-store /mnt-root/nix/.ro-store 2>"$merr" \
            || store_failed "mounting the nix-store share (virtiofs) on /nix/.ro-store failed"
        ;;
    *) fail store "unknown vmdisk.store=$store (expected 9p or virtiofs)" ;;
esac
[ -n "$nixos" ] || echo "@@vmdisk stage1 store-mounted nix-store $store"
say 'mounting tmpfs on /nix/.rw-store...' "$OK Mounted sysroot-nix-.ro@x2d@store.mount - /sysroot/nix/.ro-store.\n$OK Mounted sysroot-nix-.rw@x2d@store.mount - /sysroot/nix/.rw-store."

mount -t tmpfs -o mode=0755 tmpfs /mnt-root/nix/.rw-store
mkdir -p /mnt-root/nix/.rw-store/store /mnt-root/nix/.rw-store/work
say 'mounting overlay on /nix/store...' ''
mount -t overlay overlay \
    -o lowerdir=/mnt-root/nix/.ro-store,upperdir=/mnt-root/nix/.rw-store/store,workdir=/mnt-root/nix/.rw-store/work \
    /mnt-root/nix/store || fail overlay "overlay on /nix/store failed"
[ -n "$nixos" ] || echo "@@vmdisk stage1 overlay-mounted /nix/store"
say '' "$OK Mounted sysroot-nix-store.mount - /sysroot/nix/store.\n$OK Reached target initrd-fs.target - Initrd File Systems.\n$OK Reached target initrd.target - Initrd Default Target.\n         Starting initrd-switch-root.service - Switch Root..."

[ -n "$init" ] || fail stage2 "no init= on the kernel command line"
[ -x "/mnt-root$init" ] || fail stage2 "stage 2 $init is not in the store"
mkdir -p /mnt-root/proc /mnt-root/sys /mnt-root/dev
mount --move /proc /mnt-root/proc
mount --move /sys /mnt-root/sys
mount --move /dev /mnt-root/dev
[ -n "$nixos" ] || echo "@@vmdisk stage1 switch $init"
exec switch_root /mnt-root "$init"
