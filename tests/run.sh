#!/usr/bin/env bash
# Installs everything the test suite needs (Debian packages, Python packages) and runs it:
# `ruff check`, then pytest. Safe to run again: installs only what is missing.
# Tests that need root, network namespaces or a missing tool fail when CI is set
# (tests/support.py `need`); locally they are reported as not run.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
DEBIAN_PACKAGES=(curl iproute2 procps iperf3 iputils-ping util-linux dnsmasq-base dnsperf tcpdump openssl nftables python3-nftables chromium dante-server microsocks)

missing=()
for pkg in "${DEBIAN_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "tests/run.sh: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
  else
    echo "tests/run.sh: missing Debian packages: ${missing[*]} (run as root to install them)" >&2
  fi
fi

"$PYTHON" -m pip install -q --disable-pip-version-check -e '.[test]'
"$PYTHON" -m ruff check .
exec "$PYTHON" -m pytest -q -p no:cacheprovider "$@"
