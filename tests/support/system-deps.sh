#!/usr/bin/env bash
# Installs the Debian packages the integration tests need (the real C
# xenstored and the xenstore CLI tools) when they are missing. As root it
# installs them; otherwise it says what to install and carries on (the
# real-xenstored tests then skip, or fail under XENDDEV_REQUIRE_REAL_XENSTORED=1).
set -u
# The C xenstored and its tools; the hotplug scripts and what they call
# (losetup/flock/setsid, logger, ip, brctl); gcc builds the test shim.
# qemu-storage-daemon, qemu-img and qemu-io serve the qemu data path;
# nbd-client connects the kernel's nbd devices to it (real Xen).
# etcd-server (3.4) is the pool's store: its tests start a 3-member cluster.
# The real-Xen lane (tests/support/realxen) boots Xen in qemu-system-x86_64,
# builds its initramfs images around a static busybox and runs depmod (kmod);
# cpio is there to look inside those images.
packages=(xen-utils-4.17 xenstore-utils xen-utils-common util-linux bsdutils iproute2
          bridge-utils gcc make qemu-system-common qemu-utils
          qemu-system-x86 busybox-static cpio kmod nbd-client etcd-server)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# The hotplug scripts redirect their output into /var/log/xen and exit at
# once (set -e) if it is missing; Debian does not always create it.
[ "$(id -u)" -eq 0 ] && mkdir -p /var/log/xen
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "Installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    exit $?
fi
echo "NOTE: missing Debian packages: ${missing[*]}"
echo "      install them as root: apt-get install ${missing[*]}"
exit 0
