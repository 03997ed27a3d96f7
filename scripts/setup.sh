#!/usr/bin/env bash
# Installs what imgforge, its build and its tests need on a Debian 12 machine, then checks that
# every tool is there and runs. The list is scripts/tools.list (shared with imgforge's errors).
#
#   scripts/setup.sh           install what is missing (apt, rustup, pip), then check
#   scripts/setup.sh --check   only check: one line per missing tool with the command that
#                              installs it; exit 1 if any is missing. No network, no root.
#
# Installing never lets apt remove a package (`--no-remove`), and asks apt for the whole list in
# one call, so apt resolves one consistent set. The qemu-* packages are pinned to one version the
# archive has for all of them: a machine can start with a newer qemu-utils (a backport) whose
# Breaks make apt remove it to install qemu-system-x86 from bookworm.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
list="$here/tools.list"
# Where the list's `pip:SPEC` packages are installed (the same path as in tools.list and tools.rs).
venv=/opt/imgforge/venv

mode=install
case "${1:-}" in
  "") ;;
  --check) mode=check ;;
  -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
  *) echo "setup.sh: unknown argument '$1' (use --check, or nothing)" >&2; exit 2 ;;
esac

# The list's lines, comments and blanks dropped: "kind what package purpose...".
entries() { grep -Ev '^[[:space:]]*(#|$)' "$list"; }

# Whether one tool is present (and, for `version`, runs).
present() {
  local kind="$1" what="$2"
  case "$kind" in
    command) command -v "$what" >/dev/null 2>&1 ;;
    version) command -v "$what" >/dev/null 2>&1 && "$what" --version >/dev/null 2>&1 ;;
    file) [ -f "$what" ] ;;
    dir) [ -d "$what" ] ;;
    rust-target) command -v rustup >/dev/null 2>&1 &&
      rustup target list --installed 2>/dev/null | grep -qx "$what" ;;
    *) echo "setup.sh: $list: unknown kind '$kind'" >&2; return 2 ;;
  esac
}

# The command that installs a package of the list (the same words as imgforge's errors).
install_command() {
  local package="$1" what="$2"
  case "$package" in
    rustup) echo "rustup target add $what" ;;
    rust) echo "install Rust with rustup" ;;
    pip:*) echo "python3 -m venv $venv && $venv/bin/pip install '${package#pip:}'" ;;
    *) echo "apt-get install $package" ;;
  esac
}

# Prints one line per missing tool; returns 1 if any is missing.
check() {
  local kind what package purpose missing=0 total=0
  while read -r kind what package purpose; do
    total=$((total + 1))
    if ! present "$kind" "$what"; then
      echo "missing: $what is not installed: $(install_command "$package" "$what")  [$purpose]" >&2
      missing=$((missing + 1))
    fi
  done < <(entries)
  if [ "$missing" -gt 0 ]; then
    echo "setup: $missing of $total tools missing; scripts/setup.sh installs them" >&2
    return 1
  fi
  echo "setup: all $total tools present"
}

if [ "$mode" = check ]; then
  check
  exit
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# The installed version of a package, or nothing.
installed_version() {
  { dpkg-query -W -f='${Status}|${Version}' "$1" 2>/dev/null || true; } |
    sed -n 's/^install ok installed|//p'
}

# Debian packages of the list, and whether each is installed with its tools present.
apt_packages=()
need_apt=0
while read -r kind what package purpose; do
  case "$package" in rustup|rust|pip:*) continue ;; esac
  [[ " ${apt_packages[*]} " == *" $package "* ]] || apt_packages+=("$package")
  if [ -z "$(installed_version "$package")" ] || ! present "$kind" "$what"; then need_apt=1; fi
done < <(entries)

qemu_packages=()
for p in "${apt_packages[@]}"; do
  case "$p" in qemu-*) qemu_packages+=("$p") ;; esac
done
# The qemu packages of the list installed at more than one version (or some not at all) need
# the pinned, single-call install below.
qemu_versions="$(for p in "${qemu_packages[@]}"; do echo "v$(installed_version "$p")"; done | sort -u)"
if [ "$(echo "$qemu_versions" | wc -l)" -gt 1 ] || [ "$qemu_versions" = "v" ]; then need_apt=1; fi

# The kernel comes from Debian's linux-image-cloud-amd64: apt's lists must know it.
if [ "$need_apt" = 1 ] || ! apt-cache show --no-all-versions linux-image-cloud-amd64 >/dev/null 2>&1; then
  echo "== setup: apt-get update"
  $SUDO apt-get update -q
fi

# One version for every qemu package, the first that the archive has for all of them of: the
# versions already installed (newest first: keeps a consistent backport), the candidates apt
# would pick for those not installed (pins respected), every version the archive has.
available() { apt-cache madison "$1" 2>/dev/null | awk -F' [|] ' '{print $2}'; }
qemu_version_for_all() {
  local v p ok
  for v in $(
    for p in "${qemu_packages[@]}"; do installed_version "$p"; done | sort -u -r -V
    for p in "${qemu_packages[@]}"; do
      [ -n "$(installed_version "$p")" ] || apt-cache policy "$p" | sed -n 's/^ *Candidate: //p'
    done
    available "${qemu_packages[0]}"
  ); do
    ok=1
    for p in "${qemu_packages[@]}"; do available "$p" | grep -qxF "$v" || ok=0; done
    if [ "$ok" = 1 ]; then echo "$v"; return; fi
  done
  echo "setup: the archive has no version that ${qemu_packages[*]} all share;" \
    "check apt's sources (/etc/apt/sources.list.d) and run apt-get update" >&2
  return 1
}

if [ "$need_apt" = 1 ]; then
  request=()
  pin=""
  if [ ${#qemu_packages[@]} -gt 0 ]; then pin="$(qemu_version_for_all)"; fi
  for p in "${apt_packages[@]}"; do
    case "$p" in
      qemu-*) request+=("$p=$pin") ;;
      *) request+=("$p") ;;
    esac
  done
  for p in "${qemu_packages[@]}"; do
    v="$(installed_version "$p")"
    if [ -n "$v" ] && [ "$v" != "$pin" ]; then
      echo "== setup: $p $v is replaced by $pin so that every qemu package has one version"
    fi
  done
  echo "== setup: apt-get install (the whole list; apt never removes a package here)"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    --no-remove --allow-downgrades "${request[@]}"
fi

if ! command -v cargo >/dev/null; then
  echo "setup: cargo is missing; install Rust with rustup first" >&2
  exit 1
fi
while read -r kind what package purpose; do
  if [ "$kind" = rust-target ] && ! present "$kind" "$what"; then
    echo "== setup: rustup target add $what"
    rustup target add "$what"
  fi
done < <(entries)

# PyPI packages, into one venv (after apt: python3-venv makes it).
while read -r kind what package purpose; do
  case "$package" in pip:*) ;; *) continue ;; esac
  if ! present "$kind" "$what"; then
    if [ ! -x "$venv/bin/pip" ]; then
      echo "== setup: python3 -m venv $venv"
      $SUDO mkdir -p "$(dirname "$venv")"
      $SUDO python3 -m venv "$venv"
    fi
    echo "== setup: $venv/bin/pip install '${package#pip:}'"
    $SUDO "$venv/bin/pip" install -q "${package#pip:}"
  fi
done < <(entries)

check
