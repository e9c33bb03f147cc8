#!/usr/bin/env python3
"""A cached Debian minbase root filesystem and a cached layer of .deb files.

For tests and benchmarks that run real software (apt-get, dpkg, python3) on a real
base layer:

    base = minbase()                                  # debootstrap --variant=minbase, cached
    debs = debs_layer(None, base, [["less", "file"], ["xz-utils"]])   # .debs + a local repo
    with Chroot(merged_view, binds={DEBS_MOUNT: debs}) as ch:
        ch.run(["apt-get", *apt_local_options(), "update"])
        ch.run(["apt-get", *apt_local_options(), "install", "-y", "less"])

The base comes from the Debian mirror and suite apt uses on this machine (the first
`deb` entry of /etc/apt/sources.list or /etc/apt/sources.list.d/*.sources whose suite
is not an -updates/-security/-backports one). Everything lives under one cache
directory ($UNIONFS_CACHE, else /var/cache/unionfs-tests), outside any checkout, so a
fresh clone reuses it:

    minbase-<suite>-<arch>-<key>/   rootfs/ (mount it as a lower layer, never write to it)
                                    and info.json (its source and tree_digest at build time)
    debs-<key>/                     the .debs for some package sets, Packages, Release and
                                    local.list: a flat repository for `file:` + DEBS_MOUNT

Each entry is built in a temporary directory beside it and renamed into place when
complete, under an flock: a killed build leaves only a `.tmp-*` directory, which the
next build of that entry unmounts and removes; two runs never build the same entry
twice. Nothing here skips: a missing debootstrap or an unreachable mirror raises
BuildError with the command's output.

    python3 scripts/debian_base.py source             # what would be used
    python3 scripts/debian_base.py minbase            # build (or find) the rootfs
    python3 scripts/debian_base.py debs less,file xz-utils   # one package set per argument

Needs root, debootstrap (Debian package `debootstrap`), mount/umount, chroot and
unshare (util-linux, coreutils) and kernel overlayfs (for the .deb download chroot).
"""

from __future__ import annotations

import argparse
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Self

CACHE_ENV = "UNIONFS_CACHE"
DEFAULT_CACHE = Path("/var/cache/unionfs-tests")
LAYOUT_VERSION = 3  # bump when what a cache entry holds changes: entries are keyed by it

DEBS_MOUNT = "/mnt"
"""Where Chroot binds the .deb layer; its local.list names this path."""

CHROOT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHROOT_ENV = {
    "PATH": CHROOT_PATH,
    "HOME": "/root",
    "LC_ALL": "C.UTF-8",
    "DEBIAN_FRONTEND": "noninteractive",
    "DEBCONF_NONINTERACTIVE_SEEN": "true",
}

DEBOOTSTRAP_TIMEOUT = 1800.0
APT_TIMEOUT = 900.0
LOCK_TIMEOUT = 3600.0

_SKIP_SUITE = re.compile(r"-(updates|security|backports|proposed-updates)$|/updates$")


class BuildError(RuntimeError):
    """A cache entry could not be built (missing tool, mirror unreachable, command failed)."""


# --------------------------------------------------------------------------- commands


@dataclasses.dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self, tail: int = 6000) -> str:
        return (
            f"$ {' '.join(self.argv)}\n-> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout[-tail:]}--- stderr ---\n{self.stderr[-tail:]}"
        )


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    timeout: float,
    check: bool = True,
    env: Mapping[str, str] | None = None,
) -> Result:
    """Run argv in its own process group (killed whole on a timeout), output captured.

    Raises BuildError on a timeout, a missing program, and a non-zero exit if `check`.
    """
    args = tuple(os.fspath(a) for a in argv)
    try:
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    except FileNotFoundError as e:
        raise BuildError(f"cannot run {args[0]}: {e.strerror}") from None
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", "(output lost: pipes held open by another process)"
        res = Result(args, -1, out or "", err or "")
        raise BuildError(f"timed out after {timeout:.0f}s\n{res.describe()}") from None
    res = Result(args, proc.returncode, out, err)
    if check and res.returncode != 0:
        raise BuildError(res.describe())
    return res


def _log(msg: str) -> None:
    print(f"debian_base: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- apt source


@dataclasses.dataclass(frozen=True)
class AptSource:
    mirror: str
    suite: str
    components: tuple[str, ...] = ("main",)


def _deb822_stanzas(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    last = None
    for line in text.splitlines() + [""]:
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, last = {}, None
        elif line[0] in " \t" and last is not None:
            fields[last] += " " + line.strip()
        elif ":" in line:
            k, _, v = line.partition(":")
            last = k.strip().lower()
            fields[last] = v.strip()


def _one_line_entries(text: str) -> Iterator[tuple[str, str, list[str]]]:
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if not words or words[0] != "deb":
            continue
        words = words[1:]
        if words and words[0].startswith("["):  # [options]
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2:
            yield words[0], words[1], words[2:]


def host_apt_source(etc: Path = Path("/etc/apt")) -> AptSource:
    """The first binary Debian source apt uses here whose suite is a release, not an update.

    Reads sources.list (one-line format) and sources.list.d/*.list and *.sources (deb822),
    in apt's order. Raises BuildError if there is none.
    """
    files = [etc / "sources.list"] + sorted((etc / "sources.list.d").glob("*.list"))
    files += sorted((etc / "sources.list.d").glob("*.sources"))
    for f in files:
        try:
            text = f.read_text()
        except OSError:
            continue
        entries: list[tuple[str, str, list[str]]] = []
        if f.suffix == ".sources":
            for s in _deb822_stanzas(text):
                if "deb" not in s.get("types", "").split():
                    continue
                if s.get("enabled", "yes").lower() == "no":
                    continue
                for uri in s.get("uris", "").split():
                    for suite in s.get("suites", "").split():
                        entries.append((uri, suite, s.get("components", "").split()))
        else:
            entries = list(_one_line_entries(text))
        for uri, suite, comps in entries:
            if uri.startswith(("http://", "https://")) and not _SKIP_SUITE.search(suite):
                return AptSource(uri.rstrip("/"), suite, tuple(comps) or ("main",))
    raise BuildError(f"no Debian release source (deb URI SUITE) found in {[str(f) for f in files]}")


def cache_root(cache_dir: os.PathLike[str] | str | None = None) -> Path:
    """cache_dir, else $UNIONFS_CACHE, else /var/cache/unionfs-tests (created 0755)."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE)
    root.mkdir(mode=0o755, parents=True, exist_ok=True)
    return root


def dpkg_arch() -> str:
    return run(["dpkg", "--print-architecture"], timeout=30).stdout.strip()


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps([LAYOUT_VERSION, *parts]).encode()).hexdigest()[:12]


# --------------------------------------------------------------------------- mounts


def _mountpoints() -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [
            line.split()[4].replace("\\040", " ").replace("\\011", "\t").replace("\\134", "\\")
            for line in f
        ]


def mounts_under(path: os.PathLike[str] | str) -> list[str]:
    """Mount points at or below path, deepest first."""
    base = os.path.abspath(path).rstrip("/")
    found = {m for m in _mountpoints() if m == base or m.startswith(base + "/")}
    return sorted(found, key=lambda m: m.count("/"), reverse=True)


def unmount_under(path: os.PathLike[str] | str) -> None:
    """Unmount everything at or below path (lazily if busy); raise if something stays."""
    for _ in range(3):
        for m in mounts_under(path):
            if run(["umount", m], check=False, timeout=60).returncode != 0:
                run(["umount", "-l", m], check=False, timeout=60)
        if not mounts_under(path):
            return
    raise BuildError(f"still mounted under {path}: {mounts_under(path)}")


def remove_tree(path: Path) -> None:
    """Unmount what is under path, then delete it (never across a mount)."""
    if not os.path.lexists(path):
        return
    unmount_under(path)
    shutil.rmtree(path)


def _real_dir(root: Path, rel: str) -> Path:
    """root/rel, checked to be a directory reached through no symlink (mount(8) follows them)."""
    cur = root
    for part in Path(rel.strip("/")).parts:
        cur = cur / part
        st = os.lstat(cur)
        if not stat.S_ISDIR(st.st_mode):
            raise BuildError(f"{cur} is not a directory (a symlink?): refusing to mount on it")
    return cur


class Chroot:
    """A root directory with /proc, /dev and some read-only binds mounted while open.

    `binds` maps a directory inside the root (which must exist there) to a host
    directory, mounted read-only (`writable` lists the ones mounted read-write).
    Everything is unmounted on exit, innermost first.
    """

    def __init__(
        self,
        root: os.PathLike[str] | str,
        binds: Mapping[str, os.PathLike[str] | str] | None = None,
        writable: Sequence[str] = (),
    ) -> None:
        self.root = Path(root)
        self.binds = dict(binds or {})
        self.writable = set(writable)
        self._mounted: list[Path] = []

    def __enter__(self) -> Self:
        try:
            self._mount(["-t", "proc", "proc"], "proc")
            self._mount(["--bind", "/dev"], "dev")
            for inside, host in self.binds.items():
                opts = "bind" if inside in self.writable else "bind,ro"
                self._mount(["-o", opts, os.fspath(host)], inside)
        except BaseException:
            self.close()
            raise
        return self

    def _mount(self, args: list[str], inside: str) -> None:
        target = _real_dir(self.root, inside)
        run(["mount", *args, target], timeout=60)
        self._mounted.append(target)

    def run(
        self,
        argv: Sequence[str],
        *,
        timeout: float = APT_TIMEOUT,
        check: bool = True,
        network: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> Result:
        """argv in the chroot, with CHROOT_ENV; in a new, empty network namespace unless
        `network` (so an offline step that would reach the network fails)."""
        prefix = [] if network else ["unshare", "--net", "--"]
        full_env = dict(CHROOT_ENV, **(env or {}))
        return run([*prefix, "chroot", self.root, *argv], timeout=timeout, check=check,
                   env=full_env)

    def close(self) -> None:
        problems = []
        while self._mounted:
            target = self._mounted.pop()
            if run(["umount", target], check=False, timeout=60).returncode != 0:
                res = run(["umount", "-l", target], check=False, timeout=60)
                if res.returncode != 0:
                    problems.append(res.describe())
        if problems:
            raise BuildError("could not unmount:\n" + "\n".join(problems))

    def __exit__(
        self,
        t: type[BaseException] | None,
        e: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def prepare_for_dpkg(root: os.PathLike[str] | str) -> None:
    """Make a root where maintainer scripts start no service: usr/sbin/policy-rc.d exits 101."""
    d = _real_dir(Path(root), "usr/sbin")
    path = d / "policy-rc.d"
    if os.path.lexists(path):
        os.unlink(path)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o755)
    with os.fdopen(fd, "w") as f:
        f.write("#!/bin/sh\n# written by unionfs scripts/debian_base.py: start no service\n"
                "exit 101\n")
    os.chmod(path, 0o755)


def apt_local_options() -> list[str]:
    """apt-get options that use only the local repository of a bound debs layer."""
    return [
        "-q",
        "-o", f"Dir::Etc::SourceList={DEBS_MOUNT}/local.list",
        "-o", "Dir::Etc::SourceParts=/nonexistent",
        "-o", "Dpkg::Use-Pty=0",
        "-o", "APT::Install-Recommends=false",
    ]


# --------------------------------------------------------------------------- building


@contextmanager
def _locked(lock_path: Path, timeout: float = LOCK_TIMEOUT) -> Iterator[None]:
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout
        waited = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited:
                    _log(f"waiting for another build ({lock_path})")
                    waited = True
                if time.monotonic() > deadline:
                    raise BuildError(f"{lock_path} held for over {timeout:.0f}s") from None
                time.sleep(1)
        yield
    finally:
        os.close(fd)


def _build(final: Path, make: Callable[[Path], Path], what: str) -> Path:
    """final if complete; else make(tmp) under the lock, then rename tmp to final."""
    if final.is_dir():
        return final
    root = final.parent
    with _locked(root / f".{final.name}.lock"):
        if final.is_dir():  # another run built it while we waited
            return final
        for stale in root.glob(f".tmp-{final.name}-*"):  # a killed build's leftovers
            _log(f"removing the leftovers of an interrupted build: {stale}")
            remove_tree(stale)
        tmp = root / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir(mode=0o755)
        t0 = time.monotonic()
        _log(f"building {what} in {tmp}")
        try:
            result = make(tmp)
            if mounts_under(tmp):
                raise BuildError(f"the build left mounts: {mounts_under(tmp)}")
            os.rename(result, final)
        finally:
            remove_tree(tmp)
        _log(f"built {final} in {time.monotonic() - t0:.0f}s")
    return final


def minbase(
    cache_dir: os.PathLike[str] | str | None = None,
    *,
    source: AptSource | None = None,
    variant: str = "minbase",
    arch: str | None = None,
) -> Path:
    """A debootstrap --variant=minbase rootfs from the host's apt source, built once.

    Returns CACHE/minbase-<suite>-<arch>-<key>/rootfs, keyed by mirror, suite, components,
    variant and architecture. Treat it as read-only (a lower layer); verify_minbase()
    tells whether it still is what was built.
    """
    root = cache_root(cache_dir)
    src = source or host_apt_source()
    arch = arch or dpkg_arch()
    key = _key(src.mirror, src.suite, list(src.components), variant, arch)
    final = root / f"{variant}-{src.suite}-{arch}-{key}"

    def make(tmp: Path) -> Path:
        if shutil.which("debootstrap") is None:
            raise BuildError(
                "debootstrap is not installed (Debian package debootstrap, in scripts/test)"
            )
        entry = tmp / "entry"
        entry.mkdir(mode=0o755)
        target = entry / "rootfs"
        argv: list[str | os.PathLike[str]] = [
            "debootstrap", f"--variant={variant}", f"--arch={arch}",
            f"--components={','.join(src.components)}", src.suite, target, src.mirror,
        ]
        try:
            run(argv, timeout=DEBOOTSTRAP_TIMEOUT)
        except BuildError as e:
            log = target / "debootstrap" / "debootstrap.log"
            tail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
            raise BuildError(
                f"debootstrap of {src.suite} from {src.mirror} failed:\n{e}\n"
                f"--- debootstrap.log (tail) ---\n{tail}"
            ) from None
        if not (target / "usr" / "bin" / "apt-get").exists():
            raise BuildError(f"debootstrap finished but {target} has no usr/bin/apt-get")
        # As Debian's container images are: no downloaded .debs, no package lists.
        for d in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in _real_dir(target, d).iterdir():
                if p.is_file() and not p.is_symlink() and p.name != "lock":
                    p.unlink()
        info = {"mirror": src.mirror, "suite": src.suite, "components": list(src.components),
                "variant": variant, "arch": arch,
                "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "tree_digest": tree_digest(target)}
        (entry / "info.json").write_text(json.dumps(info, indent=1) + "\n")
        return entry

    return _build(final, make, f"a {variant} {src.suite} rootfs from {src.mirror}") / "rootfs"


def tree_digest(root: os.PathLike[str] | str) -> str:
    """sha256 over every entry below root: name, st_mode, owner, mtime, size, content,
    link target, device number. Follows no symlink."""
    h = hashlib.sha256()
    base = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(base):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            h.update(os.fsencode(os.path.relpath(path, base)) + b"\0")
            h.update(f"{st.st_mode:o} {st.st_uid}:{st.st_gid} {st.st_mtime_ns} ".encode())
            if stat.S_ISREG(st.st_mode):
                h.update(f"{st.st_size} ".encode())
                fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
                with os.fdopen(fd, "rb") as f:
                    while chunk := f.read(1 << 20):
                        h.update(chunk)
            elif stat.S_ISLNK(st.st_mode):
                h.update(os.readlink(os.fsencode(path)))
            elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
                h.update(f"{st.st_rdev}".encode())
            h.update(b"\n")
    return h.hexdigest()


def verify_minbase(base: Path) -> None:
    """Raise BuildError unless base (a minbase() path) is byte for byte what was built: a
    test that mounts it as a lower layer must leave it so."""
    info = json.loads((base.parent / "info.json").read_text())
    if tree_digest(base) != info["tree_digest"]:
        raise BuildError(
            f"{base} changed since it was built (tree_digest differs from "
            f"{base.parent / 'info.json'}): something wrote to a lower layer. Remove "
            f"{base.parent} to rebuild it."
        )


def _packages_index(layer: Path) -> None:
    """Packages and Release for the .debs in layer: a flat repository for local.list."""
    stanzas = []
    for deb in sorted(layer.glob("*.deb")):
        control = run(["dpkg-deb", "-f", deb], timeout=60).stdout.rstrip("\n")
        data = deb.read_bytes()
        stanzas.append(
            f"{control}\nFilename: ./{deb.name}\nSize: {len(data)}\n"
            f"MD5sum: {hashlib.md5(data).hexdigest()}\n"
            f"SHA256: {hashlib.sha256(data).hexdigest()}\n"
        )
    packages = "\n".join(stanzas).encode()
    (layer / "Packages").write_bytes(packages)
    (layer / "Release").write_text(
        "Origin: unionfs-tests\nLabel: unionfs-tests\nSuite: local\nCodename: local\n"
        "Date: Tue, 01 Jan 2019 00:00:00 UTC\n"
        f"SHA256:\n {hashlib.sha256(packages).hexdigest()} {len(packages)} Packages\n"
    )
    (layer / "local.list").write_text(f"deb [trusted=yes] file:{DEBS_MOUNT} ./\n")


def debs_layer(
    cache_dir: os.PathLike[str] | str | None,
    base: Path,
    package_sets: Sequence[Sequence[str]],
) -> Path:
    """The .debs that `apt-get install --no-install-recommends SET` needs on `base`, for
    each set (each resolved on the bare base), downloaded once from base's own sources.

    The download runs in a chroot of a kernel overlay over base (base is not changed),
    with the layer bound at DEBS_MOUNT as apt's archive directory. The layer also holds
    Packages, Release, local.list and sets.json; bind it at DEBS_MOUNT and use
    apt_local_options() to install from it offline.
    """
    root = cache_root(cache_dir)
    sets = [sorted(s) for s in package_sets]
    final = root / f"debs-{_key(os.path.abspath(base), sets)}"

    def make(tmp: Path) -> Path:
        layer, upper, work, mnt = (tmp / n for n in ("layer", "upper", "work", "root"))
        for d in (layer, layer / "partial", upper, work, mnt):
            d.mkdir(mode=0o755)
        opts = f"lowerdir={base},upperdir={upper},workdir={work}"
        run(["mount", "-t", "overlay", "-o", opts, "overlay", mnt], timeout=60)
        try:
            etc = _real_dir(mnt, "etc")
            if os.path.lexists(etc / "resolv.conf"):
                os.unlink(etc / "resolv.conf")
            shutil.copyfile("/etc/resolv.conf", etc / "resolv.conf")
            with Chroot(mnt, binds={DEBS_MOUNT: layer}, writable=[DEBS_MOUNT]) as ch:
                ch.run(["apt-get", "-q", "update"], network=True)
                for s in sets:
                    ch.run(
                        ["apt-get", "-q", "-y", "--no-install-recommends", "--download-only",
                         "-o", f"Dir::Cache::archives={DEBS_MOUNT}/", "install", *s],
                        network=True,
                    )
        finally:
            unmount_under(mnt)
        shutil.rmtree(layer / "partial")
        if (layer / "lock").exists():
            (layer / "lock").unlink()
        if not any(layer.glob("*.deb")):
            raise BuildError(f"apt-get downloaded nothing for {sets}")
        _packages_index(layer)
        (layer / "sets.json").write_text(json.dumps({"base": str(base), "sets": sets}) + "\n")
        return layer

    return _build(final, make, f".debs for {sets} on {base}")


# --------------------------------------------------------------------------- command line


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Build (once) and print the cached Debian minbase rootfs and .deb layers.",
        epilog=f"The cache is --cache, else ${CACHE_ENV}, else {DEFAULT_CACHE}.",
    )
    ap.add_argument("--cache", help="cache directory")
    ap.add_argument("--mirror", help="Debian mirror URL (default: the host's apt source)")
    ap.add_argument("--suite", help="suite (default: the host's apt source)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("source", help="print the mirror and suite that would be used")
    sub.add_parser("minbase", help="build or find the minbase rootfs; print its path")
    p = sub.add_parser("debs", help="build or find the .deb layer; print its path")
    p.add_argument("sets", nargs="+", metavar="PKG[,PKG...]", help="one package set each")
    args = ap.parse_args(argv)
    try:
        src = host_apt_source()
        src = dataclasses.replace(src, mirror=args.mirror or src.mirror,
                                  suite=args.suite or src.suite)
        if args.cmd == "source":
            print(f"{src.mirror} {src.suite} {' '.join(src.components)}")
            return 0
        base = minbase(args.cache, source=src)
        if args.cmd == "minbase":
            print(base)
            return 0
        print(debs_layer(args.cache, base, [s.split(",") for s in args.sets]))
        return 0
    except BuildError as e:
        print(f"debian_base: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
