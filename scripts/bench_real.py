"""The real workloads of scripts/bench on a Debian minbase: apt-get, python3, rm -rf, fio, dbench.

The layers, built once and kept in the Debian cache (scripts/bench --debian-cache, default
REPO/.bench-cache/debian), by scripts/debian_base.py and here:

  minbase-<suite>-<arch>-<key>/  debootstrap --variant=minbase from the host's apt source
  debs-<key>/                    the .debs `apt-get install python3 git gcc make` needs there
                                 (debian_base.debs_layer: a flat repository and local.list)
  bench-debs-<key>/mnt/          a copy of those, as a layer: in the union at /mnt, where
                                 local.list points; apt-get installs from it offline
  bench-installed-<key>/         the upper of a kernel overlay (bench-debs over minbase) after
                                 `apt-get install python3 git gcc make`: char 0/0 whiteouts
                                 and trusted.overlay.opaque, which every system reads; the
                                 kernel's own bookkeeping xattrs (origin, impure, uuid) removed
  bench-image-<key>.tar          the minbase as a tar, for `podman import` (scripts/bench_podman.py)

Stacks: "debian" = bench-debs, minbase; "debian-installed" = bench-installed, bench-debs,
minbase. The chroot workloads run on a fresh union of one of them, with /proc and /dev
mounted (debian_base.Chroot), in an empty network namespace.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bench_core
import debian_base
from bench_core import Figure, MountError, Scenario, Stack, Step, log, run

BENCH_LAYERS_VERSION = 1  # bump when what bench-debs / bench-installed / the tar hold changes
INSTALL = ("python3", "git", "gcc", "make")  # the .debs layer holds these and their dependencies
KEEP_XATTRS = {"trusted.overlay.opaque"}
DROP_XATTRS = {"trusted.overlay.origin", "trusted.overlay.impure", "trusted.overlay.uuid",
               "trusted.overlay.nlink"}


@dataclasses.dataclass(frozen=True)
class RealParams:
    name: str
    install: tuple[str, ...]  # what the timed apt-get install installs (from the .debs layer)
    compile_sub: str  # what compileall compiles, relative to the stdlib ("": all of it)
    fio_seconds: float
    fio_size_mib: int
    dbench_seconds: float
    build_files: int  # files the first RUN step of the build writes (20 directories)
    build_big_mib: int  # the file the build chmods
    commit_files: int  # files the committed container wrote


FULL_REAL = RealParams(
    name="full", install=INSTALL, compile_sub="", fio_seconds=30, fio_size_mib=256,
    dbench_seconds=30, build_files=1000, build_big_mib=64, commit_files=500,
)
SMALL_REAL = RealParams(
    name="small", install=("make",), compile_sub="email", fio_seconds=3, fio_size_mib=32,
    dbench_seconds=3, build_files=100, build_big_mib=4, commit_files=50,
)


# ---------------------------------------------------------------------------------------------
# The layers


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another bench building the same entry: wait for it
        yield
    finally:
        os.close(fd)


def _cached(final: Path, make: Callable[[Path], Path], what: str) -> Path:
    """final if it exists; else make(tmp) under a lock, and rename what it returns to final."""
    if final.exists():
        return final
    with _locked(final.parent / f".{final.name}.lock"):
        if final.exists():
            return final
        for stale in final.parent.glob(f".tmp-{final.name}-*"):
            log(f"removing the leftovers of an interrupted build: {stale}")
            debian_base.remove_tree(stale)
        tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        log(f"building {what} in {final} (once) ...")
        t0 = time.perf_counter()
        try:
            os.rename(make(tmp), final)
        finally:
            debian_base.remove_tree(tmp)
        log(f"built in {time.perf_counter() - t0:.0f} s")
    return final


def chroot(mnt: Path, argv: list[str], timeout: float | None = None) -> str:
    """argv in a chroot of mnt, with debian_base's environment, and no network."""
    return run(f"chroot {argv[0]}", ["unshare", "--net", "--", "chroot", str(mnt), *argv],
               timeout or bench_core.STEP_TIMEOUT, env=debian_base.CHROOT_ENV)


def apt_get(*args: str) -> list[str]:
    return ["apt-get", *debian_base.apt_local_options(), *args]


class Debian:
    """The cached Debian layers; prepare() builds what is missing (from the network, once)."""

    def __init__(self, cache: Path) -> None:
        self.cache = cache
        self.base: Path | None = None
        self.debs: Path | None = None
        self.installed: Path | None = None
        self.image_tar: Path | None = None
        self.stdlib = ""  # usr/lib/python3.N, from the installed layer

    def prepare(self, image: bool) -> float:
        """Build (or find) the layers, and the image tar if `image`; return seconds spent.
        Raises debian_base.BuildError when something cannot be built."""
        t0 = time.perf_counter()
        base = debian_base.minbase(self.cache)
        debian_base.verify_minbase(base)  # no earlier run wrote to it through a lower layer
        source = debian_base.debs_layer(self.cache, base, [list(INSTALL)])
        key = hashlib.sha256(repr((BENCH_LAYERS_VERSION, str(base), str(source))).encode()
                             ).hexdigest()[:12]
        self.base = base
        self.debs = _cached(self.cache / f"bench-debs-{key}", lambda tmp: _debs(tmp, source),
                            "the .debs as a layer")
        self.installed = _cached(self.cache / f"bench-installed-{key}",
                                 lambda tmp: _installed(tmp, base, self.debs), "the layer "
                                 f"`apt-get install {' '.join(INSTALL)}` writes")
        libs = sorted((self.installed / "usr" / "lib").glob("python3.[0-9]*"))
        if not libs:
            raise debian_base.BuildError(f"{self.installed}: no usr/lib/python3.N")
        self.stdlib = "/" + str(libs[-1].relative_to(self.installed))
        if image:
            self.image_tar = _cached(self.cache / f"bench-image-{key}.tar",
                                     lambda tmp: _tar(tmp, base), "the minbase as a tar")
        return time.perf_counter() - t0

    def stacks(self) -> dict[str, Stack]:
        assert self.base and self.debs and self.installed, "prepare() first"
        debs, base, installed = (os.path.relpath(p, self.cache)
                                 for p in (self.debs, self.base, self.installed))
        return {"debian": Stack(self.cache, (debs, base)),
                "debian-installed": Stack(self.cache, (installed, debs, base))}


def _debs(tmp: Path, source: Path) -> Path:
    layer = tmp / "layer"
    (layer / debian_base.DEBS_MOUNT.strip("/")).mkdir(parents=True, mode=0o755)
    for f in source.iterdir():
        if f.is_file() and not f.is_symlink():
            shutil.copy2(f, layer / debian_base.DEBS_MOUNT.strip("/") / f.name)
    return layer


def _installed(tmp: Path, base: Path, debs: Path | None) -> Path:
    assert debs is not None
    upper, work, root = tmp / "upper", tmp / "work", tmp / "root"
    for d in (upper, work, root):
        d.mkdir(mode=0o755)
    # Plain copy-ups whatever the module's defaults: layers the FUSE systems read as written.
    opts = (f"lowerdir={debs}:{base},upperdir={upper},workdir={work},"
            "metacopy=off,redirect_dir=off,index=off")
    run("mount", ["mount", "-t", "overlay", "overlay", "-o", opts, str(root)], 60)
    try:
        with debian_base.Chroot(root):
            chroot(root, apt_get("update"), debian_base.APT_TIMEOUT)
            chroot(root, apt_get("install", "-y", *INSTALL), debian_base.APT_TIMEOUT)
    finally:
        debian_base.unmount_under(root)
    for dirpath, dirnames, filenames in os.walk(upper):
        for name in [".", *dirnames, *filenames]:
            path = os.path.join(dirpath, name)
            for attr in os.listxattr(path, follow_symlinks=False):
                if attr in DROP_XATTRS:
                    os.removexattr(path, attr, follow_symlinks=False)
                elif attr.startswith("trusted.overlay.") and attr not in KEEP_XATTRS:
                    raise debian_base.BuildError(f"{path}: {attr}: a kernel overlay feature "
                                                 "the FUSE systems may not read")
    return upper


def _tar(tmp: Path, base: Path) -> Path:
    out = tmp / "image.tar"
    run("tar", ["tar", "--numeric-owner", "-C", str(base), "-cf", str(out), "."], 600)
    return out


# ---------------------------------------------------------------------------------------------
# The workloads


def setting_up(out: str) -> int:
    """How many packages apt-get set up: the same on every system."""
    return len(re.findall(r"^Setting up ", out, re.MULTILINE))


def fio(d: Path, seconds: float, size_mib: int) -> Figure:
    """4 KiB random writes for `seconds`, each 1024 verified as they go (verify_backlog: with
    time_based, fio's usual verify phase after the writes never starts)."""
    out = run("fio", [
        "fio", "--name=bench", f"--directory={d}", "--rw=randwrite", "--bs=4k",
        f"--size={size_mib}M", f"--runtime={seconds:g}", "--time_based", "--verify=crc32c",
        "--verify_backlog=1024", "--verify_state_save=0", "--output-format=json",
    ], seconds + bench_core.STEP_TIMEOUT, cwd=d)
    job = json.loads(out[out.index("{"):])["jobs"][0]
    if job["error"]:
        raise OSError(job["error"], f"fio: {os.strerror(job['error'])}")
    return Figure(job["write"]["bw_bytes"] / bench_core.MIB, "MiB/s", "verified")


def dbench(d: Path, seconds: float, clients: int = 4) -> Figure:
    out = run("dbench", ["dbench", "-D", str(d), "-t", f"{seconds:g}", str(clients)],
              seconds + bench_core.STEP_TIMEOUT)
    m = re.search(r"Throughput ([\d.]+) MB/sec\s+(\d+) clients", out)
    if not m:
        raise MountError(f"dbench: no throughput in its output: {out[-300:]!r}")
    return Figure(float(m.group(1)), "MB/s", f"{m.group(2)} clients")


def apt_update(mnt: Path) -> None:
    chroot(mnt, apt_get("update"))


def rm_rf(mnt: Path, paths: list[str]) -> list[bool]:
    chroot(mnt, ["rm", "-rf", *paths])
    return [os.path.lexists(mnt / p.lstrip("/")) for p in paths]


def mkdir(name: str) -> Callable[[Path], None]:
    return lambda mnt: (mnt / name).mkdir()


def scenarios(rp: RealParams, debian: Debian) -> list[Scenario]:
    def stdlib() -> str:
        return f"{debian.stdlib}/{rp.compile_sub}".rstrip("/")

    what = "the stdlib" + (f" ({rp.compile_sub}/)" if rp.compile_sub else "")
    docs = ["/usr/share/doc", "/usr/share/locale"]
    return [
        Scenario("debian-mount", "debian-installed", steps=(), real=True, cold=False,
                 warm_mount=True, mount_row="mount (Debian: 3 layers, -o as podman runs it)"),
        Scenario("apt-install", "debian", real=True, around=debian_base.Chroot,
                 setup=apt_update, steps=(
                     Step(f"apt-get install {' '.join(rp.install)} (chroot, local .debs)",
                          lambda m: setting_up(chroot(m, apt_get("install", "-y",
                                                                 *rp.install)))),
                 )),
        Scenario("compileall", "debian-installed", real=True, around=debian_base.Chroot, steps=(
            Step(f"python3 -m compileall {what}, all up to date",
                 lambda m: chroot(m, ["python3", "-m", "compileall", "-q", stdlib()])),
            Step(f"python3 -m compileall -f {what} (rewrites each .pyc)",
                 lambda m: chroot(m, ["python3", "-m", "compileall", "-q", "-f", stdlib()])),
        )),
        Scenario("rm-docs", "debian-installed", real=True, around=debian_base.Chroot, steps=(
            Step(f"rm -rf {' '.join(docs)} (chroot)", lambda m: rm_rf(m, docs)),
        )),
        Scenario("fio", "debian", real=True, setup=mkdir("fio"), steps=(
            Step(f"fio 4 KiB random writes + verify, {rp.fio_seconds:g} s",
                 lambda m: fio(m / "fio", rp.fio_seconds, rp.fio_size_mib)),
        )),
        Scenario("dbench", "debian", real=True, setup=mkdir("dbench"), steps=(
            Step(f"dbench 4 clients, {rp.dbench_seconds:g} s",
                 lambda m: dbench(m / "dbench", rp.dbench_seconds)),
        )),
    ]
