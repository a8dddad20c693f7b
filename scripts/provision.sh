#!/usr/bin/env bash
# Install the deployer agent into a base image: Python, a `deployer` user, the agent in its
# own venv, a config skeleton and the systemd units, enabled. The image carries the agent,
# never the application: instances converge by boot replay.
#
#   provision.sh --wheel DIR_OR_FILE [--root DIR] [--python PYTHON] [--wheelhouse DIR] [--trust FILE]
#   provision.sh --version 0.1.0 ...        # from the package index instead of a wheel
#
# --trust installs a trust document (`deployer trust new`) as /etc/deployer/trust.json: the
# keys whose signatures the fleet believes, the floor of every later signed trust update.
#
# --root / (the default, an AMI build) also installs Python with the distro's package manager
# and creates the system user. Any other root is a prefix (tests, CI): the script uses the
# Python it finds (or --python) and skips the user and the package manager, which only mean
# something on a real system; files stay owned by whoever runs it.
# Every step looks before it changes anything, so running it twice changes nothing.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=/
wheel=""
version=""
wheelhouse=""
python=""
trust=""
user=deployer

usage() {
  sed -n '6,7p' "$0" | sed 's/^# *//' >&2
  exit "${1:-2}"
}

while [ $# -gt 0 ]; do
  case $1 in
    --root) root=$2; shift 2 ;;
    --wheel) wheel=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --wheelhouse) wheelhouse=$2; shift 2 ;;
    --python) python=$2; shift 2 ;;
    --trust) trust=$2; shift 2 ;;
    -h | --help) usage 0 ;;
    *) echo "provision: unknown argument $1" >&2; usage ;;
  esac
done
[ -n "$wheel" ] || [ -n "$version" ] || { echo "provision: give --wheel or --version" >&2; usage; }

root=$(cd "$root" && pwd)
prefix=${root%/}   # "" for the real root, so "$prefix/etc" is /etc there
opt="$prefix/opt/deployer"
venv="$opt/venv"
on_system() { [ "$root" = / ]; }
say() { echo "provision: $*"; }

python_ok() {
  # pyproject.toml says requires-python >= 3.11; the venv module is split out on Debian/Ubuntu.
  "$1" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

install_python() {
  # shellcheck disable=SC1091 # present on every distro this supports
  . /etc/os-release
  case "$ID:$VERSION_ID" in
    amzn:2023)
      # AL2023's system python3 is 3.9 and belongs to dnf; 3.11 installs beside it.
      python=${python:-python3.11}
      python_ok "$python" || dnf install -y -q python3.11 python3.11-pip
      ;;
    ubuntu:24.04 | debian:12 | debian:13)
      python=${python:-python3}
      if ! python_ok "$python"; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q
        apt-get install -y -q python3 python3-venv
      fi
      ;;
    *)
      python=${python:-python3}
      python_ok "$python" || { echo "provision: unsupported distro $ID $VERSION_ID and no Python >= 3.11" >&2; exit 1; }
      ;;
  esac
}

create_user() {
  # A system user with no login shell and no home: hooks run as it, nothing logs in as it.
  if ! getent group "$user" >/dev/null; then
    groupadd --system "$user"
    say "created group $user"
  fi
  if ! getent passwd "$user" >/dev/null; then
    useradd --system --gid "$user" --home-dir /var/lib/deployer --no-create-home \
      --shell /usr/sbin/nologin --comment "fleet-deployer agent" "$user"
    say "created user $user"
  fi
}

# install_file SRC DEST MODE: copy only when the content differs, so a re-run keeps mtimes.
install_file() {
  if ! cmp -s "$1" "$2"; then
    install -D -m "$3" "$1" "$2"
    say "installed $2"
  fi
}

make_dir() {
  local mode=$1 dir=$2 owner=${3:-}
  if [ ! -d "$dir" ]; then
    install -d -m "$mode" "$dir"
    say "created $dir"
  fi
  if [ -n "$owner" ] && on_system && [ "$(stat -c %U "$dir")" != "$owner" ]; then
    chown "$owner:$owner" "$dir"
  fi
}

install_agent() {
  [ -x "$venv/bin/python" ] || { "$python" -m venv "$venv"; say "created venv $venv"; }
  local index_args=() spec stamp_value
  if [ -n "$wheelhouse" ]; then
    # Air-gapped builds: every dependency comes from this directory, nothing from an index.
    index_args=(--no-index --find-links "$wheelhouse")
  fi
  if [ -n "$wheel" ]; then
    [ -d "$wheel" ] && wheel=$(find "$wheel" -maxdepth 1 -name 'fleet_deployer-*.whl' | sort -V | tail -n 1)
    [ -f "$wheel" ] || { echo "provision: no fleet_deployer wheel at ${wheel:-the given directory}" >&2; exit 1; }
    spec=$wheel
    stamp_value=$(sha256sum "$wheel" | cut -d' ' -f1)
  else
    spec="fleet-deployer==$version"
    stamp_value=$spec
  fi
  # The stamp records what was installed; the same wheel again is a no-op, a rebuilt wheel
  # with the same version number is still reinstalled.
  local stamp="$opt/installed"
  if [ "$(cat "$stamp" 2>/dev/null)" != "$stamp_value" ]; then
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "${index_args[@]}" "$spec"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check --no-deps --force-reinstall "$spec"
    echo "$stamp_value" >"$stamp"
    say "installed $("$venv/bin/deployer" --version) from $spec"
  fi
}

enable_units() {
  install_file "$here/systemd/deployer-boot.service" "$prefix/etc/systemd/system/deployer-boot.service" 0644
  install_file "$here/systemd/deployer-agent.service" "$prefix/etc/systemd/system/deployer-agent.service" 0644
  # --root works offline on the unit files (no running systemd needed); it only adds the
  # multi-user.target.wants symlinks, and does nothing when they are already there.
  systemctl --root="$root" --quiet enable deployer-boot.service deployer-agent.service 2>/dev/null
  if on_system && [ -d /run/systemd/system ]; then
    systemctl daemon-reload
  fi
}

if on_system; then
  install_python
  create_user
else
  python=${python:-python3}
  python_ok "$python" || { echo "provision: $python is not Python >= 3.11 with venv" >&2; exit 1; }
fi

make_dir 0755 "$opt"
make_dir 0755 "$opt/bin"
make_dir 0755 "$prefix/etc/deployer"
# State (applied seqs, lock) is the agent's alone; StateDirectory= in the units keeps it so.
make_dir 0750 "$prefix/var/lib/deployer" "$user"
install_agent
install_file "$here/deployer-prepare-dirs" "$opt/bin/deployer-prepare-dirs" 0755
install_file "$here/deployer-config-from-tags" "$opt/bin/deployer-config-from-tags" 0755
install_file "$here/config/agent.yml.example" "$prefix/etc/deployer/agent.yml.example" 0644
if [ -n "$trust" ]; then
  # Checked with the agent's own parser before it goes into the image.
  "$venv/bin/deployer" trust check "$trust"
  install_file "$trust" "$prefix/etc/deployer/trust.json" 0644
fi
enable_units
say "done: $("$venv/bin/deployer" --version) in $venv"
