#!/usr/bin/env bash
# Build xsshim.so, the LD_PRELOAD library that lets the real C xenstored run
# without a Xen hypervisor (see xsshim.c for the why).
#
# Usage: bash tests/support/shim/build.sh [OUTPUT_DIR]
#   OUTPUT_DIR defaults to tests/support/shim/build/ (next to this script).
#   Rebuilds only when xsshim.c, xsshim.map or this script is newer than the
#   existing xsshim.so.  Prints the path of the library on success.
#   Honours $CC (default: gcc).  Exits 2 with a message if the compiler is
#   missing and a (re)build is needed.
set -euo pipefail

script="${BASH_SOURCE[0]}"
case "$script" in
    */*) here="$(cd "${script%/*}" && pwd)" ;;
    *) here="$(pwd)" ;;
esac
src="$here/xsshim.c"
map="$here/xsshim.map"
outdir="${1:-$here/build}"
out="$outdir/xsshim.so"
cc="${CC:-gcc}"

for f in "$src" "$map"; do
    if [ ! -f "$f" ]; then
        echo "build.sh: missing source file $f" >&2
        exit 2
    fi
done

if [ -f "$out" ] && [ "$out" -nt "$src" ] && [ "$out" -nt "$map" ] \
        && [ "$out" -nt "${BASH_SOURCE[0]}" ]; then
    echo "$out"
    exit 0
fi

if ! command -v "$cc" >/dev/null 2>&1; then
    echo "build.sh: C compiler '$cc' not found; install gcc (e.g. apt-get install gcc) to build the xenstored shim" >&2
    exit 2
fi

mkdir -p "$outdir"
# Build into a private temporary name and rename, so that concurrent builds
# (parallel test runs) never expose a half-written library.
tmp="$(mktemp "$outdir/.xsshim.XXXXXX.so")"
trap 'rm -f "$tmp"' EXIT
"$cc" -shared -fPIC -O2 -g -Wall -Wextra \
    -o "$tmp" "$src" \
    -Wl,--version-script="$map" -Wl,-z,defs -ldl
chmod 0755 "$tmp"
mv -f "$tmp" "$out"
trap - EXIT
echo "$out"
