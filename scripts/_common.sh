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
# All scripts: what building pyfuse3 from its sdist (with our patches: patch) and mounting
# with it need on a bare Debian, mount(8) and umount(8), and what ensure_deps runs (apt-get,
# modprobe).
BASE_APT_PKGS=(fuse3 libfuse3-dev pkg-config python3 python3-venv python3-dev gcc libc6-dev
    patch mount apt kmod)
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

# pyfuse3 has no wheels: it is built from its sdist, with the patches in
# scripts/pyfuse3-patches/ applied in order (README, "pyfuse3 patches"), or without them when
# UNIONFS_STOCK_PYFUSE3=1. The sdist is downloaded once into $UNIONFS_CACHE and must match
# PYFUSE3_SHA256; the sdist's build requirements (pip fetches them into its isolated build
# environment) are pinned by PYFUSE3_BUILD_PINS. Each build is kept in the cache as a wheel,
# so a new venv, or switching between the stock and the patched build, compiles nothing.
PYFUSE3_VERSION=3.5.0
PYFUSE3_SHA256=88399a9494b88603230bba300f4ba9ad63fece5ed514ca3633d555a0c6a42b24
PYFUSE3_BUILD_PINS=(Cython==3.2.4 setuptools==84.2.1 setuptools_scm==10.3.4)
PYFUSE3_PATCHES=$REPO/scripts/pyfuse3-patches
UNIONFS_CACHE=${UNIONFS_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/unionfs}

# The pyfuse3 version to install: PYFUSE3_VERSION, with a local label naming the patch set
# and the build pins (3.5.0+unionfs.0123456789ab) unless UNIONFS_STOCK_PYFUSE3=1.
_pyfuse3_want() {
    if [[ ${UNIONFS_STOCK_PYFUSE3:-} == 1 ]]; then
        echo "$PYFUSE3_VERSION"
        return 0
    fi
    local id
    id=$({ cat "$PYFUSE3_PATCHES"/*.patch; printf '%s\n' "${PYFUSE3_BUILD_PINS[@]}"; } \
        | sha256sum | cut -c1-12)
    echo "$PYFUSE3_VERSION+unionfs.$id"
}

# _ensure_pyfuse3: the wanted pyfuse3 build in $VENV, from the cache's wheel or built now.
_ensure_pyfuse3() {
    local want have wheels
    want=$(_pyfuse3_want)
    have=$("$VENV/bin/python" -c \
        'import importlib.metadata as m; print(m.version("pyfuse3"))' 2>/dev/null) || have=""
    [[ $have == "$want" ]] && return 0
    wheels=$UNIONFS_CACHE/wheels/$want
    if ! _pip_pyfuse3_wheel "$want" "$wheels" 2>/dev/null; then
        _build_pyfuse3 "$want" "$wheels" || return 1
        _pip_pyfuse3_wheel "$want" "$wheels" || return 1
    fi
}

_pip_pyfuse3_wheel() {
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        --force-reinstall --no-index --find-links "$2" "pyfuse3==$1" </dev/null
}

# _build_pyfuse3 VERSION WHEEL_DIR: the verified sdist, patched unless VERSION is the stock
# one, built into a wheel in WHEEL_DIR (about a minute: Cython and gcc).
_build_pyfuse3() {
    local want=$1 wheels=$2 sdist=$UNIONFS_CACHE/pyfuse3-$PYFUSE3_VERSION.tar.gz tmp src patch
    mkdir -p "$UNIONFS_CACHE"
    if ! sha256sum -c --status <<<"$PYFUSE3_SHA256  $sdist" 2>/dev/null; then
        note "downloading the pyfuse3 $PYFUSE3_VERSION sdist into $UNIONFS_CACHE"
        rm -f "$sdist"
        "$VENV/bin/python" -m pip download -q --disable-pip-version-check --no-deps \
            --no-binary :all: "pyfuse3==$PYFUSE3_VERSION" -d "$UNIONFS_CACHE" </dev/null \
            || return 1
        if ! sha256sum -c --status <<<"$PYFUSE3_SHA256  $sdist"; then
            note "$sdist: not the sha256 pinned in scripts/_common.sh; removed"
            rm -f "$sdist"
            return 1
        fi
    fi
    tmp=$(mktemp -d)
    tar -xzf "$sdist" -C "$tmp"
    src=$tmp/pyfuse3-$PYFUSE3_VERSION
    if [[ $want != "$PYFUSE3_VERSION" ]]; then
        for patch in "$PYFUSE3_PATCHES"/*.patch; do
            if ! patch -p1 -s -N -d "$src" <"$patch"; then
                note "$patch does not apply to pyfuse3 $PYFUSE3_VERSION"
                rm -rf "$tmp"
                return 1
            fi
        done
    fi
    printf '%s\n' "${PYFUSE3_BUILD_PINS[@]}" >"$tmp/build-pins.txt"
    note "building pyfuse3 $want (about a minute)"
    if ! SETUPTOOLS_SCM_PRETEND_VERSION_FOR_PYFUSE3=$want PIP_CONSTRAINT=$tmp/build-pins.txt \
        "$VENV/bin/python" -m pip wheel -q --disable-pip-version-check --no-deps \
        -w "$wheels" "$src" </dev/null; then
        rm -rf "$tmp"
        return 1
    fi
    rm -rf "$tmp"
}

# ensure_venv [EXTRAS]: REPO/.venv with the package installed editable (pip install -e REPO[EXTRAS]).
# Reinstalls when pyproject.toml or the pyfuse3 build (its patches, UNIONFS_STOCK_PYFUSE3)
# changed since the last install, when the venv imports the package from somewhere else, or
# when a module of the extras is missing.
ensure_venv() {
    local extras=${1:-} spec=$REPO stamp_file=$VENV/.unionfs-installed hash probe want
    [[ -n $extras ]] && spec="${REPO}[$extras]"
    hash=$({ cat "$REPO/pyproject.toml"; _pyfuse3_want; echo editable_mode=compat; } | sha256sum | cut -c1-16)
    want="^$hash ${extras:-.*}\$"  # any install of this pyproject has the base dependencies
    probe=$(_venv_probe "$extras")
    if [[ -x $VENV/bin/python ]] && grep -q "$want" "$stamp_file" 2>/dev/null \
        && _venv_ok "$probe"; then
        _compile_package
        return 0
    fi
    if ! "$VENV/bin/python" -c 'import sys' 2>/dev/null; then
        local py
        py=$(_pick_python)
        note "creating $VENV with $py"
        "$py" -m venv --clear "$VENV"
    fi
    _ensure_pyfuse3 || { note "could not install pyfuse3 $(_pyfuse3_want)"; return 1; }
    note "installing $spec into $VENV"
    # compat: the checkout goes on sys.path by a plain .pth line; the default editable
    # finder costs every start of `unionmount` (the warm server's client) some 15 ms.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$spec" \
        --config-settings editable_mode=compat </dev/null
    _venv_ok "$probe" || { note "the venv still lacks one of: $probe"; return 1; }
    echo "$hash ${extras:-base}" >>"$stamp_file"
    _compile_package
}

# The package's bytecode, as pip writes it for a regular install (an editable one has
# none): where PYTHONDONTWRITEBYTECODE is set, every start of unionmount would otherwise
# compile each module it imports (importing what a mount loads took 0.34-0.42 s against
# 0.31-0.39 s with the bytecode there). Only what changed is compiled again.
_compile_package() {
    "$VENV/bin/python" -m compileall -q "$REPO/unionfs" >/dev/null || true
}

_venv_ok() {
    local mods=${1%%:*} exes="" exe
    [[ $1 == *:* ]] && exes=${1#*:}
    for exe in $exes; do
        [[ -x $VENV/bin/$exe ]] || return 1
    done
    # The package must come from this checkout, not from another clone's editable install,
    # and pyfuse3 must be the wanted build (_pyfuse3_want).
    # shellcheck disable=SC2086  # one argument per module name
    PYFUSE3_WANT=$(_pyfuse3_want) "$VENV/bin/python" - "$REPO" $mods <<'EOF' 2>/dev/null
import importlib, importlib.metadata, os, sys
repo, mods = sys.argv[1], sys.argv[2:]
for m in mods:
    importlib.import_module(m)
if importlib.metadata.version("pyfuse3") != os.environ["PYFUSE3_WANT"]:
    sys.exit(1)
import unionfs
sys.exit(not os.path.realpath(unionfs.__file__).startswith(os.path.realpath(repo) + os.sep))
EOF
}
