#!/usr/bin/env bash
# Runs tessera's whole test suite on a fresh machine: installs what the tests need (Debian
# packages, a world-readable Python venv with py-spiffe), then runs every test.
#
# Tests that start clients as other uids need root; as another user they report that loudly.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"

if [[ $(id -u) -eq 0 ]]; then
  venv="${TESSERA_TEST_VENV:-/opt/tessera-test/venv}"
else
  venv="${TESSERA_TEST_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/tessera-test/venv}"
fi

# Debian packages: openssl (certificates are checked with `openssl verify`), systemd (the unit
# file is checked with `systemd-analyze verify`) and a system Python
# with venv, which other uids can execute (an interpreter under /root cannot be).
packages=()
command -v openssl >/dev/null || packages+=(openssl)
command -v systemd-analyze >/dev/null || packages+=(systemd)
[[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null \
  || packages+=(python3 python3-venv)
if ((${#packages[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/test.sh: please install as root: apt-get install ${packages[*]}" >&2
    exit 1
  fi
  echo "==> installing ${packages[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
fi

if ! "$venv/bin/python" -c 'import spiffe' 2>/dev/null; then
  echo "==> creating $venv with py-spiffe"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
# Clients run as other uids in the tests: they must be able to read and run the venv.
chmod -R a+rX "$(dirname "$venv")"
export TESSERA_TEST_PYTHON="$venv/bin/python"

echo "==> running the test suite"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --all-targets --no-fail-fast
else
  cargo test --all-targets --no-fail-fast
fi
