#!/bin/sh
# xenddev real-Xen lane: dom0's set-up step, PID 1 after switch_root (the
# host's /bin/sh; see files/dom0-init).
#
# Hides the host's state directories behind tmpfs, makes the /dev links
# udev would, loads the Xen back-end modules, starts the host's own
# xenstored, xen-init-dom0 and xenconsoled (guest consoles are logged to
# /mnt/share/console, where the test process reads them), makes the bridge
# xenbr0 (169.254.99.1/24), then runs the command channel (channel.py) as a
# child: this shell stays PID 1 and reaps the daemons' orphans. When the
# channel ends, the machine is reset (QEMU runs with -no-reboot and exits).
SHARE=/mnt/share
XENBIN=/usr/lib/xen-4.17/bin
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root
export LANG=C.UTF-8
exec > "$SHARE/dom0-setup.log" 2>&1

FAILURES=
step() { echo "[$(cut -d' ' -f1 /proc/uptime)] $*"; }
try() {
    "$@" || { echo "FAILED: $*"; FAILURES="$FAILURES$*;"; }
}

step "set-up"
try mount -t tmpfs -o mode=755 tmpfs /run
mkdir -p /dev/pts /dev/shm
try mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts
try mount -t tmpfs tmpfs /dev/shm
# devtmpfs has none of udev's links; the hotplug scripts' claim_lock does
# `stat -L /dev/stdin` and spins until libxl kills the script without them.
ln -sf /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin
ln -sf /proc/self/fd/1 /dev/stdout
ln -sf /proc/self/fd/2 /dev/stderr
# The host's own files would show through the overlay otherwise.
for d in /var/log/xen /var/lib/xen /var/lib/xenstored; do
    mkdir -p "$d"
    try mount -t tmpfs tmpfs "$d"
done
mkdir -p /run/xen /run/xenstored /run/lock /var/log/xen/console /var/lib/realxen /root
hostname dom0

step "modules"
# One modprobe for all: every process started costs dom0 dearly under TCG.
try modprobe -a xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xen-blkback xen-netback \
    loop bridge
try mount -t xenfs xenfs /proc/xen

step "toolstack"
try "$XENBIN/xenstored" --pid-file=/run/xenstored.pid
try "$XENBIN/xen-init-dom0"
mkdir -p "$SHARE/console"
try "$XENBIN/xenconsoled" --pid-file=/run/xenconsoled.pid --log=guest --log-dir="$SHARE/console"

step "network"
try ip link set lo up
try ip link add name xenbr0 type bridge stp_state 0 forward_delay 0
try ip addr add 169.254.99.1/24 dev xenbr0
try ip link set xenbr0 up

step "channel"
export XENDDEV_SETUP_FAILURES="$FAILURES"
"$XENDDEV_PYTHON" /etc/xenddev-realxen/channel.py "$SHARE" 2>> "$SHARE/channel.log"
step "channel ended (exit status $?): resetting"
sync
busybox reboot -f
