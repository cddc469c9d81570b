#!/usr/bin/env bash
# Runs tessera's whole test suite on a fresh machine: installs what the tests need (Debian
# packages, a world-readable Python venv with py-spiffe and Envoy's protos, a running PostgreSQL
# server), then runs every test. Before it changes anything it prints what it is going to
# install, create and start.
#
# Environment:
#   TESSERA_TEST_VENV      where the py-spiffe venv lives (default /opt/tessera-test/venv as
#                          root, ~/.cache/tessera-test/venv otherwise); created if missing. Only
#                          a venv this script created is made world-readable, and nothing
#                          outside it has its mode changed.
#   TESSERA_TEST_POSTGRES  a libpq connection string for the PostgreSQL datastore tests; when
#                          unset, this script (as root) sets up the local Debian cluster and a
#                          superuser role `root` for them. Outside CI the tests are skipped,
#                          loudly, when no server is available.
#   CI                     when set, tests that cannot run (no root, no PostgreSQL) fail
#                          instead of being skipped.
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
# A venv this script created carries this file; only such a venv has its modes changed.
venv_marker="$venv/.made-by-tessera-test"

# Debian packages: openssl (certificates are checked with `openssl verify`), systemd (the unit
# file is checked with `systemd-analyze verify`), cfssl (the peer CA in the benchmark's quick
# run), strace (state files must be renamed and their directory fsynced), a TrueType font (the
# benchmark's charts), nginx (a real consumer of `svid watch --out`) and a system Python with
# venv, which other uids can execute (an interpreter under /root cannot be).
packages=()
command -v openssl >/dev/null || packages+=(openssl)
command -v strace >/dev/null || packages+=(strace)
command -v systemd-analyze >/dev/null || packages+=(systemd)
command -v cfssl >/dev/null || packages+=(golang-cfssl)
[[ -x /usr/sbin/nginx ]] || packages+=(nginx-light)
[[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]] || packages+=(fonts-dejavu-core)
[[ -x /usr/bin/python3 ]] && /usr/bin/python3 -c 'import venv, ensurepip' 2>/dev/null \
  || packages+=(python3 python3-venv)
# PostgreSQL: the server binaries and Debian's cluster tools, unless a server is given (only
# root can set up a local one).
local_postgres=false
if [[ -z ${TESSERA_TEST_POSTGRES:-} && $(id -u) -eq 0 ]]; then
  local_postgres=true
  { command -v pg_ctlcluster >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null; } \
    || packages+=(postgresql)
fi
# The venv is ready when every client the tests run imports (tests/python/requirements.txt).
# One this script made, or one with py-spiffe already (a test venv from before a requirement was
# added), gets the missing requirements installed; anything else at that path is left alone.
make_venv=false
update_venv=false
if ! "$venv/bin/python" -c 'import spiffe, envoy.service.secret.v3.sds_pb2_grpc' 2>/dev/null; then
  if [[ -x $venv/bin/python ]] \
    && { [[ -f $venv_marker ]] || "$venv/bin/python" -c 'import spiffe' 2>/dev/null; }; then
    update_venv=true
  else
    make_venv=true
  fi
fi

echo "==> scripts/test.sh will:"
if ((${#packages[@]})); then
  echo "    - install Debian packages: ${packages[*]} (apt-get)"
fi
if $make_venv; then
  echo "    - create a Python venv with py-spiffe at $venv (TESSERA_TEST_VENV), readable by every user"
elif $update_venv; then
  echo "    - install tests/python/requirements.txt into the Python venv at $venv (TESSERA_TEST_VENV)"
else
  echo "    - use the Python venv at $venv (TESSERA_TEST_VENV)"
fi
if $local_postgres; then
  echo "    - start the local PostgreSQL cluster (creating one if there is none) with a superuser role root"
elif [[ -n ${TESSERA_TEST_POSTGRES:-} ]]; then
  echo "    - use the PostgreSQL server named by TESSERA_TEST_POSTGRES"
fi
echo "    - check formatting and lints (cargo fmt, cargo clippy), then run the whole test suite"

if ((${#packages[@]})); then
  if [[ $(id -u) -ne 0 ]]; then
    echo "scripts/test.sh: please install as root: apt-get install ${packages[*]}" >&2
    exit 1
  fi
  echo "==> installing ${packages[*]}"
  apt-get update -qq
  # A package that ships a service (nginx, postgresql) must not start it here: the tests run
  # their own. Debian asks /usr/sbin/policy-rc.d; one that exits 101 says no.
  no_service_starts=false
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 0755 /usr/sbin/policy-rc.d
    no_service_starts=true
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${packages[@]}" >/dev/null
  if $no_service_starts; then
    rm -f /usr/sbin/policy-rc.d
  fi
fi

if $make_venv; then
  if [[ -e $venv && ! -f $venv_marker ]] && [[ -n $(ls -A "$venv" 2>/dev/null) ]]; then
    echo "scripts/test.sh: $venv exists but has no py-spiffe and was not made by this script;" \
      "install py-spiffe into it (pip install -r tests/python/requirements.txt) or set" \
      "TESSERA_TEST_VENV to a new path" >&2
    exit 1
  fi
  echo "==> creating $venv with py-spiffe"
  rm -rf "$venv"
  mkdir -p "$(dirname "$venv")"
  /usr/bin/python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
  touch "$venv_marker"
elif $update_venv; then
  echo "==> installing tests/python/requirements.txt into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check -r tests/python/requirements.txt
fi
# Clients run as other uids in the tests: they must be able to read and run the venv. Only a
# venv this script made is opened up, and no directory above it is touched.
if [[ -f $venv_marker ]]; then
  chmod -R a+rX "$venv"
fi
if [[ $(id -u) -eq 0 ]] && ! runuser -u nobody -- "$venv/bin/python" -c '' 2>/dev/null; then
  echo "scripts/test.sh: warning: other users cannot run $venv/bin/python (a directory above it" \
    "is not searchable by others); the tests that run py-spiffe as another uid will fail." \
    "Choose a TESSERA_TEST_VENV under a world-searchable directory such as /opt." >&2
fi
export TESSERA_TEST_PYTHON="$venv/bin/python"
# Brings up the local PostgreSQL cluster (creating it if the package did not) with a superuser
# role `root`, which the tests, running as root, reach by peer authentication on the socket.
setup_postgres() {
  local version cluster port status
  if [[ -z $(pg_lsclusters --no-header 2>/dev/null) ]]; then
    version="$(ls /usr/lib/postgresql | sort -V | tail -n 1)"
    echo "==> creating PostgreSQL $version cluster main"
    pg_createcluster "$version" main >/dev/null
  fi
  read -r version cluster port status _ < <(pg_lsclusters --no-header | sort -k1,1V | tail -n 1)
  if [[ $status != online* ]]; then
    echo "==> starting PostgreSQL $version/$cluster"
    pg_ctlcluster "$version" "$cluster" start
  fi
  (cd / && runuser -u postgres -- psql -p "$port" -qtA -v ON_ERROR_STOP=1) <<'SQL'
SELECT 'CREATE ROLE root SUPERUSER LOGIN'
WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'root') \gexec
SQL
  export TESSERA_TEST_POSTGRES="host=/var/run/postgresql port=$port user=root dbname=postgres"
}

if [[ -z ${TESSERA_TEST_POSTGRES:-} ]]; then
  if [[ $(id -u) -eq 0 ]]; then
    setup_postgres
  else
    echo "scripts/test.sh: PostgreSQL datastore tests need TESSERA_TEST_POSTGRES (or run as root)" >&2
  fi
fi
if [[ -n ${TESSERA_TEST_POSTGRES:-} ]] && command -v psql >/dev/null; then
  # Test databases are named tessera_test_<unix seconds>_<random>; a passing test drops its
  # own. Drop those an interrupted or failed run left behind more than an hour ago (younger
  # ones may belong to a run in progress). Best effort.
  psql "$TESSERA_TEST_POSTGRES" -qtA <<'SQL' || true
SELECT format('DROP DATABASE %I WITH (FORCE)', datname) FROM pg_database
WHERE CASE WHEN datname ~ '^tessera_test_[0-9]+_[0-9a-f]+$'
  THEN split_part(datname, '_', 3)::bigint < extract(epoch FROM now()) - 3600 END \gexec
SQL
fi

# Formatting and lints first, so that a change that fails them never lands. The lints
# themselves are in Cargo.toml ([workspace.lints]).
echo "==> checking formatting (cargo fmt) and lints (cargo clippy)"
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  echo "scripts/test.sh: rustfmt and clippy are needed (rustup component add rustfmt clippy)" >&2
  exit 1
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings

# The binary every node runs carries none of the benchmark's plotting crates (bench/ is a
# workspace member of its own for that).
if cargo tree -e normal -p tessera --prefix none | grep -qE '^(plotters|png) '; then
  echo "scripts/test.sh: the tessera package depends on plotters or png; they belong to tessera-bench" >&2
  exit 1
fi

# The whole workspace: the tessera package, the benchmark harness (bench/), whose quick run
# measures the tessera binary this build leaves beside it, and the process harness (harness/).
echo "==> running the test suite"
# The mTLS example pair runs as real processes in tests/mtls_example.rs: build it as the
# programs it is (a test build of an example is its test harness, not the program).
cargo build --examples
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets --no-fail-fast
else
  cargo test --workspace --all-targets --no-fail-fast
fi
