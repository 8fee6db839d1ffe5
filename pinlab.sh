#!/usr/bin/env bash
# pinlab bootstrap: provisions everything it needs, then runs a pinlab command.
#
#   ./pinlab.sh matrix      the main job: the scenario matrix on the default kernels
#   ./pinlab.sh test        every test (unit + guests), with images built first
#   ./pinlab.sh up          a guest for manual debugging
#   ./pinlab.sh validate --base-kernel 6.1 --candidate-kernel 6.12 [--tags ...]
#                           what a kernel change does to each cell (README.md)
#   ./pinlab.sh <args>      any other `pinlab` command, e.g. `images build --kernel all`
#
# Safe to run again: apt packages, the venv and images are only (re)made when missing or
# out of date. Needs root (apt, mmdebstrap, chroot). Environment: PINLAB_CACHE (images and
# runs, default ~/.cache/pinlab), PINLAB_VENV (default ./.venv), PINLAB_ACCEL (auto|tcg|kvm).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv=${PINLAB_VENV:-$here/.venv}
apt_packages=(mmdebstrap debian-archive-keyring e2fsprogs ca-certificates python3 python3-venv
              python3-pip xz-utils)

log() { printf 'pinlab.sh: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
	log "must run as root (apt, mmdebstrap and chroot build the guest images)"
	exit 1
fi

missing=()
for p in "${apt_packages[@]}"; do
	dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" ||
		missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
	log "installing Debian packages: ${missing[*]}"
	export DEBIAN_FRONTEND=noninteractive
	apt-get update -qq
	apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Prefer a python3 that is 3.11 or newer (Debian 12 and 13 ship one).
py=python3
if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
	log "python3 >= 3.11 is required"
	exit 1
fi

stamp=$(cat "$here/pyproject.toml" | sha256sum | cut -c1-16)
if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.pinlab-stamp" 2>/dev/null)" != "$stamp" ]; then
	log "preparing the Python environment in $venv"
	[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
	"$venv/bin/python" -m pip install -q --upgrade pip
	"$venv/bin/python" -m pip install -q -e "$here[dev]"
	echo "$stamp" >"$venv/.pinlab-stamp"
fi

cmd=${1:-help}
case "$cmd" in
test)
	shift
	exec "$venv/bin/python" -m pinlab.testrun "$@"
	;;
help | -h | --help)
	sed -n '2,13p' "$0"
	exit 0
	;;
*)
	exec "$venv/bin/pinlab" "$@"
	;;
esac
