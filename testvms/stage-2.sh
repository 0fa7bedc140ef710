#!@system@/bin/sh
# Stage 2 of a vmdisk test VM, run from the store (@system@/init) after stage 1's switch_root:
# network, SSH (dropbear with the host key the harness generated and pinned), and for the rescue
# VM the NBD export of the image being rescued. Marker lines as in stage 1:
#   @@vmdisk stage2 <step> <details>      and on failure   @@vmdisk FAIL stage2 <step>: <why>
# Parameters: vmdisk.nbd=HOST:PORT[:EXPORT] (attach /dev/nbd0)  vmdisk.console_shell=1
#   vmdisk.net=static|dhcp
# With vmdisk.personality=nixos-scripted|nixos-systemd (see stage-1.sh) it prints what NixOS's
# stage 2 prints instead of markers: stage-2-init.sh's banner and steps (scripted initrd only),
# then systemd's welcome and unit status lines in both styles.
export PATH=@system@/bin:@system@/sbin
export HOME=/root
# Read once, by the shell itself (a `$(cat ...)` is a fork, ~10 ms under TCG).
read -r cmdline </proc/cmdline
nixos=
case " $cmdline " in
    *" vmdisk.personality=nixos-scripted "*) nixos=scripted ;;
    *" vmdisk.personality=nixos-systemd "*) nixos=systemd ;;
esac
OK='[  \033[0;32mOK\033[0m  ]'
nixos_say() { [ -n "$nixos" ] && printf '%b\n' "$1"; return 0; }
[ -n "$nixos" ] || echo "@@vmdisk stage2 start"
if [ "$nixos" = scripted ]; then
    printf '\n\033[1;32m<<< NixOS Stage 2 >>>\033[0m\n\n'
    echo "running activation script..."
    echo "setting up /etc..."
    echo "starting systemd..."
fi
nixos_say '\nWelcome to \033[1mNixOS 25.11 (Xantusia)\033[0m!\n'

fail() {
    echo "@@vmdisk FAIL stage2 $1: $2"
    sync
    poweroff -f
}

mkdir -p /dev/pts /run /tmp
mount -t devpts -o mode=0620,ptmxmode=0666 devpts /dev/pts
mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs -o mode=1777 tmpfs /tmp
name=vmdisk-guest
[ -f /etc/hostname ] && read -r name </etc/hostname
hostname "$name"

nbd= console_shell= net=static
for arg in $cmdline; do
    case "$arg" in
        vmdisk.net=*) net="${arg#vmdisk.net=}" ;;
        vmdisk.nbd=*) nbd="${arg#vmdisk.nbd=}" ;;
        vmdisk.console_shell=*) console_shell="${arg#vmdisk.console_shell=}" ;;
    esac
done

ip link set lo up
ip link set eth0 up || fail network "no eth0 (virtio-net missing?)"
if [ "$net" = dhcp ]; then
    # vfkit's NAT (and any network that is not qemu's user net) hands out addresses by DHCP.
    udhcpc -i eth0 -q -n -t 20 -T 1 -s @system@/udhcpc.script >/dev/null \
        || fail network "no DHCP lease on eth0"
else
    # qemu's user network: a static address is instant where DHCP costs a round trip.
    ip addr add 10.0.2.15/24 dev eth0
    ip route add default via 10.0.2.2
fi
[ -n "$nixos" ] || echo "@@vmdisk stage2 network-up eth0 $(ip -4 -o addr show dev eth0 | awk '{print $4}')"
nixos_say "$OK Reached target network.target - Network."

# The disk may have been built by a non-root user: SSH wants root's files to be root's.
[ -d /root ] && chown -R 0:0 /root && chmod 700 /root
[ -d /root/.ssh ] && chmod 700 /root/.ssh
[ -f /root/.ssh/authorized_keys ] && chmod 600 /root/.ssh/authorized_keys
key=/etc/dropbear/dropbear_ed25519_host_key
[ -f "$key" ] || fail sshd "no host key $key on the root disk"
# vmdisk.nosshd=1 (NixOS personality): a configuration without services.openssh.enable.
case " $cmdline " in
    *" vmdisk.nosshd=1 "*) [ -n "$nixos" ] || fail sshd "vmdisk.nosshd=1 needs the NixOS personality" ;;
    *)
        dropbear -E -p 22 -r "$key" -P /run/dropbear.pid 2>/dev/console || fail sshd "dropbear did not start"
        [ -n "$nixos" ] || echo "@@vmdisk stage2 sshd-started port 22"
        nixos_say "$OK Started sshd.service - SSH Daemon."
        ;;
esac

if [ -n "$nbd" ]; then
    host="${nbd%%:*}"; rest="${nbd#*:}"; port="${rest%%:*}"; name=
    [ "$rest" != "$port" ] && name="${rest#*:}"
    if [ -n "$name" ]; then
        nbd-client "$host" "$port" /dev/nbd0 -N "$name" -b 512 || fail nbd "nbd-client $host $port failed"
    else
        nbd-client "$host" "$port" /dev/nbd0 -b 512 || fail nbd "nbd-client $host $port failed"
    fi
    # 512-byte blocks: a GPT written for 512-byte sectors is not found with 4 KiB ones.
    blockdev --rereadpt /dev/nbd0 2>/dev/null
    echo "@@vmdisk stage2 nbd-attached /dev/nbd0 $(ls /sys/block/nbd0 | grep -c '^nbd0p') partitions"
fi

[ -n "$nixos" ] || echo "@@vmdisk stage2 ready"
tty=ttyS0
[ "$(uname -m)" = aarch64 ] && tty=ttyAMA0
nixos_say "$OK Reached target multi-user.target - Multi-User System.\n\n\n<<< Welcome to NixOS 25.11 ($(uname -m)) - $tty >>>\n"

if [ "$console_shell" = 1 ]; then
    echo "vmdisk rescue shell: the image is /dev/nbd0 (partitions /dev/nbd0p1 ...)."
    echo "Type 'exit' to flush, detach and power off."
    setsid cttyhack sh -l
    sync
    [ -n "$nbd" ] && nbd-client -d /dev/nbd0
    echo "@@vmdisk stage2 poweroff"
    poweroff -f
fi

# PID 1 stays; orphans are reaped by `wait`.
while :; do
    sleep 3600 &
    wait
done
