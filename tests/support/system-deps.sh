#!/usr/bin/env bash
# Installs the Debian packages the integration tests need (the real C
# xenstored and the xenstore CLI tools) when they are missing. As root it
# installs them; otherwise it says what to install and carries on (the
# real-xenstored tests then skip, or fail under XENDDEV_REQUIRE_REAL_XENSTORED=1).
set -u
packages=(xen-utils-4.17 xenstore-utils gcc)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
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
