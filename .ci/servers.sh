#!/usr/bin/env bash
# Install the servers the launcher tests start by hand: OpenSSH server and a
# single-node Slurm with munge (Debian packages). Idempotent and quiet: does
# nothing when everything is already installed. Services are NOT started here
# (no systemd; the test fixtures in tests/servers.py start them privately).
set -euo pipefail

PKGS=(openssh-server slurmctld slurmd slurm-client munge)

missing=()
for p in "${PKGS[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed'; then
        missing+=("$p")
    fi
done
if [ ${#missing[@]} -eq 0 ]; then
    # sshd's privilege separation directory (no systemd/tmpfiles; /run may be fresh).
    if [ "$(id -u)" -eq 0 ]; then mkdir -p /run/sshd; fi
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        echo "servers.sh: need root to install: ${missing[*]}" >&2; exit 1
    fi
fi

export DEBIAN_FRONTEND=noninteractive
install() {
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/tmp/servers-apt.log 2>&1
}
# apt-get update only when needed: empty package lists, or the install fails.
if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e '^lock$' -e '^partial$' || true)" ]; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
fi
if ! install; then
    $SUDO apt-get update -qq >/dev/null 2>&1 || true
    if ! install; then
        cat /tmp/servers-apt.log >&2
        echo "servers.sh: apt-get install failed: ${missing[*]}" >&2
        exit 1
    fi
fi
# sshd's privilege separation directory (no systemd/tmpfiles here).
$SUDO mkdir -p /run/sshd
echo "servers.sh: installed ${missing[*]}"
