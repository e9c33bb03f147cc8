# shellcheck shell=bash
# Sourced by scripts/demo, scripts/test and scripts/bench: install what is missing.
#
# Both functions are idempotent and take well under a second when everything is
# already there, so every script calls them unconditionally. They assume Debian
# (12 or later) and root, which is what the project's machines and CI are.

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=$REPO/.venv
export REPO VENV

# The Debian packages each script installs. Every program a test or a script runs is listed,
# with its package, in scripts/programs.txt; tests/test_programs.py checks that these lists
# install every one of those packages that is not Essential.
#
# All scripts: what building pyfuse3 from its sdist and mounting with it need on a bare
# Debian, mount(8) and umount(8), and what ensure_deps runs (apt-get, modprobe).
BASE_APT_PKGS=(fuse3 libfuse3-dev pkg-config python3 python3-venv python3-dev gcc libc6-dev
    mount apt kmod)
# scripts/test: the reference systems the tests compare against, the tools they drive,
# bad-input filesystems, and podman, runc, buildah, busybox-static, debootstrap, skopeo and
# docker-registry (a registry the image tests start on 127.0.0.1) for tests/integration.
TEST_APT_PKGS=(
    fuse-overlayfs attr acl dosfstools e2fsprogs psmisc util-linux
    podman runc buildah busybox-static debootstrap skopeo docker-registry
    passwd uidmap
)
# scripts/bench: the other mount program, the benchmark tools, and for the real workloads
# debootstrap (the Debian base), podman, buildah and runc (the runtime its containers.conf names).
BENCH_APT_PKGS=(fuse-overlayfs fio dbench debootstrap podman buildah runc)
# scripts/demo: getfattr.
DEMO_APT_PKGS=(attr)

note() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }

# ensure_deps [PKG...]: install the base Debian packages and any extra ones that are missing.
# apt-get update runs only when something has to be installed.
ensure_deps() {
    local missing=() pkg
    for pkg in "${BASE_APT_PKGS[@]}" "$@"; do
        [[ $(dpkg-query -W -f='${db:Status-Abbrev}' "$pkg" 2>/dev/null) == ii* ]] \
            || missing+=("$pkg")
    done
    if ((${#missing[@]})); then
        note "installing Debian packages: ${missing[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -q </dev/null
        if [[ " ${missing[*]} " == *" docker-registry "* ]]; then
            # Its package would start a registry on *:5000 (and at every boot) where
            # systemd runs; the tests start their own, on 127.0.0.1 only. Masked first.
            mkdir -p /etc/systemd/system
            ln -sfn /dev/null /etc/systemd/system/docker-registry.service
        fi
        apt-get install -y -q "${missing[@]}" </dev/null
    fi
    if [[ ! -e /dev/fuse ]]; then
        modprobe fuse 2>/dev/null || true
        [[ -e /dev/fuse ]] || { note "/dev/fuse is missing: FUSE is not available here"; return 1; }
    fi
}

# The modules (and, after a colon, the executables in the venv) that prove an extra is installed.
_venv_probe() {
    case $1 in
        "") echo "unionfs pyfuse3 trio xattr" ;;
        test) echo "unionfs pyfuse3 trio xattr pytest pytest_trio hypothesis mypy:ruff" ;;
        *) echo "unionfs" ;;
    esac
}

# Which python creates the venv: $UNIONFS_PYTHON, else the first python3 >= 3.11 with venv.
_pick_python() {
    local py
    for py in "${UNIONFS_PYTHON:-}" python3 /usr/bin/python3; do
        [[ -n $py ]] || continue
        command -v "$py" >/dev/null || continue
        if "$py" -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' \
            2>/dev/null; then
            command -v "$py"
            return 0
        fi
    done
    note "no python3 >= 3.11 with venv support found"
    return 1
}

# ensure_venv [EXTRAS]: REPO/.venv with the package installed editable (pip install -e REPO[EXTRAS]).
# Reinstalls when pyproject.toml changed since the last install, when the venv imports the
# package from somewhere else, or when a module of the extras is missing.
ensure_venv() {
    local extras=${1:-} spec=$REPO stamp_file=$VENV/.unionfs-installed hash probe want
    [[ -n $extras ]] && spec="${REPO}[$extras]"
    hash=$(sha256sum "$REPO/pyproject.toml" | cut -c1-16)
    want="^$hash ${extras:-.*}\$"  # any install of this pyproject has the base dependencies
    probe=$(_venv_probe "$extras")
    if [[ -x $VENV/bin/python ]] && grep -q "$want" "$stamp_file" 2>/dev/null \
        && _venv_ok "$probe"; then
        return 0
    fi
    if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        local py
        py=$(_pick_python)
        note "creating $VENV with $py"
        "$py" -m venv --clear "$VENV"
    fi
    note "installing $spec into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" </dev/null
    _venv_ok "$probe" || { note "the venv still lacks one of: $probe"; return 1; }
    echo "$hash ${extras:-base}" >>"$stamp_file"
}

_venv_ok() {
    local mods=${1%%:*} exes="" exe
    [[ $1 == *:* ]] && exes=${1#*:}
    for exe in $exes; do
        [[ -x $VENV/bin/$exe ]] || return 1
    done
    # The package must come from this checkout, not from another clone's editable install.
    # shellcheck disable=SC2086  # one argument per module name
    "$VENV/bin/python" - "$REPO" $mods <<'EOF' 2>/dev/null
import importlib, os, sys
repo, mods = sys.argv[1], sys.argv[2:]
for m in mods:
    importlib.import_module(m)
import unionfs
sys.exit(not os.path.realpath(unionfs.__file__).startswith(os.path.realpath(repo) + os.sep))
EOF
}
