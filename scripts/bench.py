"""Benchmark unionmount against fuse-overlayfs and kernel overlayfs on the same layer stacks.

Run it through scripts/bench, which installs what it needs (BENCH_APT_PKGS) and REPO/.venv.

Synthetic workloads (--synthetic), on layer stacks built once and cached
(REPO/.bench-cache/stack-<size>-v<N>-<hash>):
  main: base (tree/aA/bBB/fFF: small files of 0-30 KiB in ~1,000 directories, big/big0..2),
        mid (overrides 10% of base, adds a file to every leaf directory),
        top (overrides 1%, adds files, whites out 1%, one opaque directory);
        merged/ has entries from all three layers.
  deep: 100 layers l000 (bottom) .. l099 (top), each adding files to shared/;
        shared/bottom-only exists in l000 alone.

Real workloads (--real), on a Debian minbase built once with debootstrap from the host's apt
source, a layer of .debs and the layer `apt-get install python3 git gcc make` writes (cached
in --debian-cache; scripts/bench_real.py): the mount podman does; apt-get install, python3 -m
compileall and rm -rf in a chroot on the union; fio and dbench on it; podman run, buildah bud
and podman commit on a containers-storage that uses each system (scripts/bench_podman.py).

Every scenario mounts each system on a fresh upper and workdir, drops the page cache
(cold), then times its steps one after the other on that mount: a step that repeats the
one before it is the warm figure. Scenarios with a timed mount drop the cache before the
mount instead; podman's and the Debian mount are timed warm. The table shows medians over
--repeat runs and each one's ratio to the kernel (above 1: slower; for a throughput, the
kernel's over this one). --count-requests adds the FUSE requests each step sent, by type
(scripts/bench_trace.py). --userns runs the synthetic workloads in a user namespace.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import os
import platform
import random
import re
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import bench_core
import bench_podman
import bench_real
import bench_report
import bench_trace
import debian_base
from bench_core import (
    MIB,
    SYSTEMS,
    Figure,
    Mount,
    Mounter,
    Scenario,
    Stack,
    Step,
    drop_caches,
    log,
    peak_rss_kib,
    shell,
)
from bench_report import Result

REPO = Path(__file__).resolve().parent.parent
STACK_VERSION = 3  # bump when the stack's layout changes: the cache is keyed by it
SEED = 20260101
USERNS_ENV = "UNIONFS_BENCH_IN_USERNS"  # set in the child that runs in the user namespace


@dataclasses.dataclass(frozen=True)
class Params:
    """The size of the stacks; everything else follows from these and SEED."""

    name: str
    top_dirs: int  # tree/a0 .. : one is read whole, one removed with rm -rf
    leaf_dirs: int  # tree/aA/b00 .. per top directory
    files_per_dir: int
    max_file_size: int
    merged_entries: int  # distinct names in merged/, spread over the three layers
    big_files: int
    big_size: int
    deep_layers: int
    deep_files_per_layer: int
    untar_files: int
    create_files: int

    @property
    def key(self) -> str:
        digest = hashlib.sha256(repr((STACK_VERSION, SEED, self)).encode()).hexdigest()
        return f"stack-{self.name}-v{STACK_VERSION}-{digest[:8]}"


FULL = Params(
    name="full", top_dirs=10, leaf_dirs=100, files_per_dir=25, max_file_size=30 * 1024,
    merged_entries=5000, big_files=3, big_size=256 * MIB, deep_layers=100,
    deep_files_per_layer=3, untar_files=3000, create_files=2000,
)
SMALL = Params(
    name="small", top_dirs=2, leaf_dirs=10, files_per_dir=10, max_file_size=8 * 1024,
    merged_entries=200, big_files=3, big_size=4 * MIB, deep_layers=20,
    deep_files_per_layer=3, untar_files=100, create_files=100,
)



# ---------------------------------------------------------------------------------------------
# Building the stacks


def build_stacks(p: Params, dest: Path) -> None:
    """Write the main and deep stacks and the tarball into dest (which must not exist)."""
    rng = random.Random(SEED)
    pool = rng.randbytes(8 * MIB)

    def blob(size: int) -> bytes:
        off = rng.randrange(len(pool) - size)
        return pool[off : off + size]

    def put(path: Path, data: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)

    def small() -> bytes:
        return blob(rng.randrange(p.max_file_size + 1))

    base, mid, top = (dest / "main" / name for name in ("base", "mid", "top"))
    leaves = [f"tree/a{a}/b{b:02d}" for a in range(p.top_dirs) for b in range(p.leaf_dirs)]
    files = [f"{leaf}/f{f:02d}" for leaf in leaves for f in range(p.files_per_dir)]
    for rel in files:
        put(base / rel, small())
    for rel in rng.sample(files, len(files) // 10):
        put(mid / rel, small())
    for leaf in leaves:
        put(mid / leaf / "mid-extra", small())
    for rel in rng.sample(files, len(files) // 100):
        put(top / rel, small())
    for leaf in leaves[::10]:
        put(top / leaf / "top-extra", small())
    # Whiteouts (char 0/0) in the top layer for 1% of base files, and one opaque directory
    # with none inside (the kernel would list a whiteout in a directory no layer merges into),
    # marked for a mount by root and for one in a user namespace (--userns).
    for rel in rng.sample(files, len(files) // 100):
        if not (top / rel).exists() and not rel.startswith(leaves[1] + "/"):
            (top / rel).parent.mkdir(parents=True, exist_ok=True)
            os.mknod(top / rel, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    opaque = top / leaves[1]
    opaque.mkdir(parents=True, exist_ok=True)
    put(opaque / "only-in-top", small())
    os.setxattr(opaque, "trusted.overlay.opaque", b"y")
    os.setxattr(opaque, "user.overlay.opaque", b"y")  # what the kernel reads with userxattr

    # merged/: half the names in base, 30% in mid, 20% in top, some base names overridden.
    n = p.merged_entries
    owners = [base] * (n // 2) + [mid] * (n * 3 // 10)
    owners += [top] * (n - len(owners))
    for i, layer in enumerate(owners):
        put(layer / "merged" / f"m{i:05d}", blob(rng.randrange(2048)))
    for i in rng.sample(range(n // 2), n // 10):
        put(rng.choice((mid, top)) / "merged" / f"m{i:05d}", blob(rng.randrange(2048)))

    for i in range(p.big_files):
        path = base / "big" / f"big{i}"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            for _ in range(p.big_size // MIB):
                f.write(blob(MIB))

    for depth in range(p.deep_layers):
        shared = dest / "deep" / f"l{depth:03d}" / "shared"
        for i in range(p.deep_files_per_layer):
            put(shared / f"f{depth:03d}-{i}", small())
        if depth == 0:
            put(shared / "bottom-only", b"only in the bottom layer\n")

    with tarfile.open(dest / "untar.tar", "w") as tar:
        for i in range(p.untar_files):
            data = blob(rng.randrange(8192))
            info = tarfile.TarInfo(f"d{i // 100:02d}/f{i:05d}")
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            tar.addfile(info, io.BytesIO(data))
    for path in dest.rglob("*"):  # one mtime everywhere, so listings do not vary run to run
        os.utime(path, (1_700_000_000, 1_700_000_000), follow_symlinks=False)


def ensure_stacks(p: Params, cache: Path) -> tuple[Path, float | None]:
    """The cached stack for p, built now if missing; returns (dir, seconds spent building)."""
    final = cache / p.key
    if (final / ".complete").exists():
        return final, None
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / (p.key + ".building")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(final, ignore_errors=True)
    log(f"building the {p.name} layer stacks in {final} (once) ...")
    t0 = time.perf_counter()
    build_stacks(p, tmp)
    os.sync()
    (tmp / ".complete").write_text(json.dumps(dataclasses.asdict(p)) + "\n")
    tmp.rename(final)
    took = time.perf_counter() - t0
    log(f"built in {took:.1f} s")
    return final, took


def stacks_of(root: Path, p: Params) -> dict[str, Stack]:
    deep = tuple(f"l{i:03d}" for i in reversed(range(p.deep_layers)))
    return {
        "main": Stack(root / "main", ("top", "mid", "base")),
        "deep": Stack(root / "deep", deep),
    }




def _raise(err: OSError) -> None:
    raise err


def walk_lstat(root: Path) -> int:
    count = 0
    for dirpath, dirnames, filenames in os.walk(root, onerror=_raise):
        for name in dirnames + filenames:
            os.lstat(os.path.join(dirpath, name))
            count += 1
    return count


def read_tree(root: Path) -> int:
    total = 0
    for dirpath, _, filenames in os.walk(root, onerror=_raise):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                while chunk := os.read(fd, 1 << 17):
                    total += len(chunk)
            finally:
                os.close(fd)
    return total


def append_byte(path: Path) -> int:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"x")
    finally:
        os.close(fd)
    return os.stat(path).st_size


def create_files(d: Path, n: int) -> int:
    data = bytes(range(256)) * 16
    for i in range(n):
        fd = os.open(d / f"new{i:05d}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    return len(os.listdir(d))


def delete_files(d: Path, n: int) -> int:
    for i in range(n):
        os.unlink(d / f"new{i:05d}")
    return len(os.listdir(d))


def chmod(path: Path, mode: int) -> str:
    os.chmod(path, mode)
    return oct(os.stat(path).st_mode)


def rm_rf(path: Path) -> bool:
    shell("rm -rf {}", path)
    return os.path.lexists(path)




def scenarios(p: Params, tarball: Path) -> list[Scenario]:
    big = p.big_size // MIB
    bigs = [f"big/big{i}" for i in range(p.big_files)]
    rd, rm_dir, cr_dir = "tree/a0", f"tree/a{p.top_dirs - 1}", "tree/a0/b00"
    sub = p.leaf_dirs * p.files_per_dir
    dd_read = "dd if={} of=/dev/null bs=1M status=none"
    return [
        Scenario("walk", "main", mount_row="mount (3 layers)", steps=(
            Step("walk+lstat whole tree, cold", walk_lstat),
            Step("walk+lstat, warm", walk_lstat),
            Step("find | wc -l, warm", lambda m: int(shell("find {} | wc -l", m))),
        )),
        Scenario("listdir", "main", steps=(
            Step(f"list merged dir ({p.merged_entries} entries), cold",
                 lambda m: len(os.listdir(m / "merged"))),
            Step(f"list merged dir ({p.merged_entries} entries), warm",
                 lambda m: len(os.listdir(m / "merged"))),
        )),
        Scenario("read-tree", "main", steps=(
            Step(f"read all files of {rd} ({sub} files), cold", lambda m: read_tree(m / rd)),
            Step(f"read all files of {rd}, warm", lambda m: read_tree(m / rd)),
        )),
        Scenario("read-big", "main", steps=(
            Step(f"read {big} MiB lower file, cold", lambda m: shell(dd_read, m / bigs[0])),
            Step(f"read {big} MiB lower file, warm", lambda m: shell(dd_read, m / bigs[0])),
        )),
        Scenario("write-big", "main", steps=(
            Step(f"write {big} MiB + fsync", lambda m: shell(
                f"dd if=/dev/zero of={{}} bs=1M count={big} conv=fsync status=none",
                m / "big" / "written")),
        )),
        Scenario("append-big", "main", steps=(
            Step(f"append 1 byte to {big} MiB lower file", lambda m: append_byte(m / bigs[1])),
        )),
        Scenario("chmod-big", "main", steps=(
            Step(f"chmod {big} MiB lower file", lambda m: chmod(m / bigs[2], 0o600)),
        )),
        Scenario("create-delete", "main", steps=(
            Step(f"create {p.create_files} files of 4 KiB",
                 lambda m: create_files(m / cr_dir, p.create_files)),
            Step(f"delete those {p.create_files} files",
                 lambda m: delete_files(m / cr_dir, p.create_files)),
        )),
        Scenario("untar", "main", setup=lambda m: (m / "untarred").mkdir(), steps=(
            Step(f"untar {p.untar_files} files",
                 lambda m: shell("tar -xf {} -C {}", tarball, m / "untarred")),
        )),
        Scenario("rm-rf", "main", steps=(
            Step(f"rm -rf lower {rm_dir} ({sub} files)", lambda m: rm_rf(m / rm_dir)),
        )),
        Scenario("deep", "deep", mount_row=f"{p.deep_layers} layers: mount", steps=(
            Step(f"{p.deep_layers} layers: stat file in bottom layer",
                 lambda m: os.stat(m / "shared" / "bottom-only").st_size),
            Step(f"{p.deep_layers} layers: list dir merged from all",
                 lambda m: len(os.listdir(m / "shared"))),
        )),
    ]


# ---------------------------------------------------------------------------------------------
# Running


class Runner:
    def __init__(self, stacks: dict[str, Stack], run_dir: Path, mounter: Mounter,
                 tracer: bench_trace.RequestTracer | None = None,
                 storages: bench_podman.Storages | None = None) -> None:
        self.stacks, self.run_dir, self.mounter = stacks, run_dir, mounter
        self.tracer, self.storages = tracer, storages
        self.record = run_dir / "fuse-mounts.rec"  # what the podman wrappers mounted
        self.result = Result({}, {}, {}, {})

    def scenario(self, sc: Scenario, system: str) -> None:
        """One run of sc on system: fresh upper, mount, steps, unmount (or the steps in
        sc.session). Raises on failure."""
        base = self.run_dir / system
        shutil.rmtree(base, ignore_errors=True)
        upper, work, mnt, daemon_log = base / "upper", base / "work", base / "mnt", base / "log"
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        logs_before = self.storages.logs() if self.storages else set()
        ok = False
        try:
            if sc.session is not None:
                self.steps(sc, system, sc.session(system), None)
            else:
                stack = self.stacks[sc.stack or ""]
                if sc.mount_row and sc.warm_mount:  # untimed: the programs' files are cached
                    for d in (base / "warm-upper", base / "warm-work"):
                        d.mkdir()
                    self.mounter.unmount(self.mounter.mount(
                        system, stack, base / "warm-upper", base / "warm-work", mnt,
                        base / "warm-log"))
                if sc.mount_row and sc.cold:
                    drop_caches()
                m = self.mounter.mount(system, stack, upper, work, mnt, daemon_log)
                try:
                    if sc.mount_row:
                        self.record_sample(sc.mount_row, system, m.seconds, None)
                    self.steps(sc, system, m.mnt, m)
                finally:
                    self.mounter.unmount(m)
            ok = True
        finally:
            logs = [daemon_log]
            if self.storages:
                logs += sorted(self.storages.logs() - logs_before)
            own = bench_trace.own_count(logs)
            if own is not None and system == "unionmount":
                self.result.own.setdefault(sc.key, {}).setdefault(system, []).append(own)
            self.keep_logs(sc, logs, ok)
            shutil.rmtree(base, ignore_errors=True)

    def steps(self, sc: Scenario, system: str, where: Path, m: Mount | None) -> None:
        with sc.around(where) if sc.around else contextlib.nullcontext():
            if sc.setup:
                sc.setup(where)
            if sc.cold and not sc.mount_row:
                drop_caches()
            for step in sc.steps:
                self.step(step, system, where, m)
        rss = peak_rss_kib(m.pid if m else None)
        if rss is not None:
            old = self.result.rss.setdefault(sc.key, {}).get(system, 0)
            self.result.rss[sc.key][system] = max(old, rss)

    def step(self, step: Step, system: str, where: Path, m: Mount | None) -> None:
        os.sync()
        tracer = self.tracer if system != "kernel" else None
        offset = self.record.stat().st_size if self.record.exists() else 0
        # A step on our mount that hangs: kill its daemon. Commands in a session (podman)
        # have their own timeouts.
        watchdog = threading.Timer(bench_core.STEP_TIMEOUT, m.kill) if m else None
        if watchdog:
            watchdog.start()
        if tracer:
            tracer.start()
        try:
            t0 = time.perf_counter()
            value = step.fn(where)
            took = time.perf_counter() - t0
        except Exception as e:
            if m and m.killed:
                raise TimeoutError(f"{step.row}: over {bench_core.STEP_TIMEOUT:.0f} s") from e
            raise
        finally:
            if watchdog:
                watchdog.cancel()
            per, lost = tracer.stop() if tracer else ({}, 0)
        if m and m.killed:  # the step got past the dead daemon's errors somehow
            raise TimeoutError(f"{step.row}: over {bench_core.STEP_TIMEOUT:.0f} s")
        if tracer:
            devs, _ = bench_trace.recorded_devs(self.record, offset)
            if m and m.dev:
                devs.add(m.dev)
            counts: dict[str, int] = {}
            for conn in {bench_trace.connection_of(d) for d in devs}:
                for op, n in per.get(conn, {}).items():
                    counts[op] = counts.get(op, 0) + n
            self.result.counts.setdefault(step.row, {}).setdefault(system, []).append(counts)
            lost_before = self.result.lost.setdefault(step.row, {}).get(system, 0)
            self.result.lost[step.row][system] = max(lost_before, lost)
        if isinstance(value, Figure):
            self.result.units[step.row] = value.unit
            self.record_sample(step.row, system, value.value, value.check)
        else:
            self.record_sample(step.row, system, took, value)

    def keep_logs(self, sc: Scenario, logs: list[Path], ok: bool) -> None:
        """Keep unionmount's logs next to the cache when the run failed or one shows a
        traceback."""
        for i, path in enumerate(p for p in logs if p.exists()):
            if ok and "Traceback" not in path.read_text(errors="replace"):
                continue
            keep = self.run_dir.parent / f"unionmount-{sc.key}{f'-{i}' if i else ''}.log"
            shutil.copy(path, keep)
            log(f"  unionmount's log {'shows a traceback' if ok else 'of the failed run'}: {keep}")

    def record_sample(self, row: str, system: str, value: float, check: object) -> None:
        self.result.samples.setdefault(row, {}).setdefault(system, []).append(value)
        self.result.checks.setdefault(row, {}).setdefault(system, repr(check))

    def fail(self, sc: Scenario, system: str, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:300]
        for row in sc.rows():
            self.result.errors.setdefault(row, {}).setdefault(system, msg)


def _version(argv: list[str], pattern: str) -> str:
    try:
        done = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    except OSError:
        return "?"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "?"


def host_info(real: bool) -> dict[str, str]:
    params = Path("/sys/module/overlay/parameters")
    ovl = {k: (params / k).read_text().strip() for k in ("metacopy", "redirect_dir", "index")
           if (params / k).exists()}
    info = {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "fuse-overlayfs": _version(["fuse-overlayfs", "--version"],
                                   r"fuse-overlayfs: version (\S+)"),
        "overlay params": " ".join(f"{k}={v}" for k, v in ovl.items()),
        "python": platform.python_version(),
    }
    if real:
        info["podman"] = _version(["podman", "--version"], r"version (\S+)")
        info["buildah"] = _version(["buildah", "--version"], r"version (\S+)")
    return info


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario (default 3)")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run the scenarios whose key or a row matches this regex "
                         "(repeatable; see --list)")
    kind = ap.add_mutually_exclusive_group()
    kind.add_argument("--real", action="store_true",
                      help="only the real workloads (Debian, apt-get, podman, fio, ...)")
    kind.add_argument("--synthetic", action="store_true",
                      help="only the synthetic workloads on the generated stacks")
    ap.add_argument("--small", action="store_true",
                    help="a tiny stack and tiny real workloads: a smoke test")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    ap.add_argument("--cache", type=Path, default=Path(
        os.environ.get("UNIONFS_BENCH_CACHE", REPO / ".bench-cache")),
        help="where the layer stacks and the run directory are kept "
             "(default REPO/.bench-cache)")
    ap.add_argument("--debian-cache", type=Path, default=Path(
        os.environ.get("UNIONFS_BENCH_DEBIAN_CACHE", REPO / ".bench-cache" / "debian")),
        help="where the Debian layers are kept: built from the network once "
             "(default REPO/.bench-cache/debian, whatever --cache says)")
    venv_unionmount = Path(sys.prefix) / "bin" / "unionmount"
    default = (str(venv_unionmount) if venv_unionmount.exists()
               else f"{shlex.quote(sys.executable)} -m unionfs")
    ap.add_argument("--unionmount", default=default,
                    help=f"the command that mounts unionfs (default: {default})")
    ap.add_argument("--fio-seconds", type=float, metavar="S",
                    help="how long fio writes (default 30; 3 with --small)")
    ap.add_argument("--dbench-seconds", type=float, metavar="S",
                    help="how long dbench runs (default 30; 3 with --small)")
    ap.add_argument("--count-requests", action="store_true",
                    help="also count the FUSE requests of each step, by type (kernel tracepoint "
                         "fuse:fuse_request_send)")
    ap.add_argument("--userns", action="store_true",
                    help="run the synthetic workloads in a user namespace (unshare --user "
                         "--map-root-user --mount); the kernel mounts with userxattr")
    ap.add_argument("--timeout", type=float, default=bench_core.STEP_TIMEOUT, metavar="SECONDS",
                    help="a step running longer fails: its FUSE daemon is killed "
                         f"(default {bench_core.STEP_TIMEOUT:.0f})")
    ap.add_argument("--list", action="store_true", help="list the scenarios and their rows")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not systems:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown)) or 'empty list'}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    if args.userns and args.real:
        ap.error("--userns runs the synthetic workloads only")
    if args.userns and args.count_requests:
        ap.error("--count-requests needs tracefs, which a user namespace cannot mount")
    args.systems = systems
    return args


def choose(args: argparse.Namespace, all_scenarios: list[Scenario]) -> list[Scenario]:
    patterns = [re.compile(x, re.IGNORECASE) for x in args.only]
    return [sc for sc in all_scenarios
            if not (args.real and not sc.real) and not ((args.synthetic or args.userns)
                                                        and sc.real)
            and (not patterns or any(pat.search(sc.key) or any(pat.search(r) for r in sc.rows())
                                     for pat in patterns))]


def in_userns(argv: list[str] | None, p: Params, cache: Path) -> int:
    """Run this bench again in a new user and mount namespace, root mapped to root."""
    ensure_stacks(p, cache)  # the child could not set the stack's trusted.* xattrs
    args = sys.argv[1:] if argv is None else argv
    cmd = ["unshare", "--user", "--map-root-user", "--mount", "--propagation", "private", "--",
           sys.executable, str(Path(__file__).resolve()), *args]
    os.execvpe("unshare", cmd, dict(os.environ, **{USERNS_ENV: "1"}))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    bench_core.STEP_TIMEOUT = args.timeout
    p = SMALL if args.small else FULL
    rp = bench_real.SMALL_REAL if args.small else bench_real.FULL_REAL
    rp = dataclasses.replace(rp, fio_seconds=args.fio_seconds or rp.fio_seconds,
                             dbench_seconds=args.dbench_seconds or rp.dbench_seconds)
    cache, debian_cache = args.cache.resolve(), args.debian_cache.resolve()
    userns = os.environ.get(USERNS_ENV) == "1"
    run_dir = cache / f"run-{os.getpid()}"
    # Short paths for what this run starts: podman's storages, unionmount's warm server.
    short = Path("/tmp") / f"ub-{os.getpid()}"
    debian = bench_real.Debian(debian_cache)
    storages = bench_podman.Storages(
        run_dir, short, shlex.split(args.unionmount),
        lambda: debian.image_tar or Path("/nonexistent"),
        run_dir / "fuse-mounts.rec" if args.count_requests else None)
    all_scenarios = (scenarios(p, cache / p.key / "untar.tar")
                     + bench_real.scenarios(rp, debian) + bench_podman.scenarios(rp, storages))
    chosen = choose(args, all_scenarios)
    if args.list:
        for sc in all_scenarios:
            print(f"{sc.key} [{'real' if sc.real else 'synthetic'}]: " + "; ".join(sc.rows()))
        return 0
    if not chosen:
        print(f"bench: no scenario matches {args.only}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: must run as root (mount, drop_caches)", file=sys.stderr)
        return 2
    if args.userns and not userns:
        return in_userns(argv, p, cache)

    started = time.perf_counter()
    load_start = loadavg()
    real = any(sc.real for sc in chosen)
    stacks: dict[str, Stack] = {}
    root, build_seconds = (None, None)
    if any(not sc.real for sc in chosen):
        root, build_seconds = ensure_stacks(p, cache)
        stacks.update(stacks_of(root, p))
    debian_seconds = None
    if real:
        try:
            debian_seconds = debian.prepare(image=any(sc.session for sc in chosen))
        except debian_base.BuildError as e:
            print(f"bench: the real workloads need the Debian layers, which could not be "
                  f"built (--synthetic runs without them):\n{e}", file=sys.stderr)
            return 1
        stacks.update(debian.stacks())
    host = host_info(real)
    log("host: " + ", ".join(f"{k} {v}" for k, v in host.items()) + f"; load {load_start}")
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    if short.exists() and not bench_podman.mounts_under(short):
        shutil.rmtree(short)  # an earlier bench's, whose pid this one has
    short.mkdir(mode=0o700)
    # unionmount's warm server for this run only (its socket in `short`), ended at the end;
    # not the one at /run/unionfs that other users' mounts share.
    os.environ.setdefault("UNIONFS_ZYGOTE_DIR", str(short / "zygote"))
    mounter = Mounter(shlex.split(args.unionmount), userns=userns)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    try:
        tracer = bench_trace.RequestTracer(run_dir) if args.count_requests else None
    except bench_core.MountError as e:
        shutil.rmtree(run_dir, ignore_errors=True)
        short.rmdir()
        print(f"bench: {e}", file=sys.stderr)
        return 1
    runner = Runner(stacks, run_dir, mounter, tracer, storages)
    signal.signal(signal.SIGTERM, on_term)
    interrupted = False
    try:
        for sc in chosen:
            given_up: set[str] = set()
            for rep in range(args.repeat):
                for system in args.systems:
                    if system in given_up:
                        continue
                    t0 = time.perf_counter()
                    try:
                        runner.scenario(sc, system)
                    except Exception as e:  # noqa: BLE001 -- one failing system must not end the run
                        runner.fail(sc, system, e)
                        given_up.add(system)
                        log(f"[{sc.key} {rep + 1}/{args.repeat}] {system}: FAILED: {e}")
                        continue
                    figures = ", ".join(
                        bench_report.fmt_value(runner.result.samples[r][system][-1],
                                               runner.result.units.get(r, "s"))
                        for r in sc.rows())
                    log(f"[{sc.key} {rep + 1}/{args.repeat}] {system}: {figures} "
                        f"({time.perf_counter() - t0:.1f} s)")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: unmounting and printing what was measured")
    finally:
        mounter.close()
        storages.close()
        if tracer:
            tracer.close()
        bench_core.end_processes_naming(short)
        left = bench_podman.mounts_under(short)
        if left:
            log(f"still mounted, so {short} stays: {left}")
        else:
            shutil.rmtree(short, ignore_errors=True)
        shutil.rmtree(run_dir, ignore_errors=True)

    rows = [r for sc in chosen for r in sc.rows()]
    total = time.perf_counter() - started
    load_end = loadavg()
    what = " and ".join(w for w, on in ((f"{p.name} stack", any(not sc.real for sc in chosen)),
                                        (f"{rp.name} real workloads", real)) if on)
    print(f"\nunionfs benchmark: {what}, median of {args.repeat}, ratio to kernel overlayfs "
          "in parentheses (above 1: slower; for MiB/s and MB/s, the kernel's over this one)")
    if userns:
        print("in a user namespace (unshare --user --map-root-user --mount); kernel overlayfs "
              "with -o userxattr")
    print("host: " + ", ".join(f"{k} {v}" for k, v in host.items()))
    print(f"load average (1, 5, 15 min): {load_start} at the start, {load_end} at the end\n")
    print(bench_report.table(runner.result, rows, args.systems))
    rss = bench_report.rss_table(runner.result, args.systems)
    if rss:
        print("\n" + rss)
    if args.count_requests:
        counted = bench_trace.counts_table(rows, args.systems, runner.result.counts,
                                           runner.result.lost, runner.result.own)
        print("\n" + (counted or "FUSE requests: nothing counted"))
    errors = dict.fromkeys(
        f"{s}: {e}" for row in rows for s, e in runner.result.errors.get(row, {}).items())
    if errors:
        print("\nfailures:\n  " + "\n  ".join(errors))
    diffs = list(bench_report.mismatches(runner.result, rows))
    if diffs:
        print("\nresults that differ from the kernel's:\n  " + "\n  ".join(diffs))
    built = [f"{what} in {s:.0f} s" for what, s in (("stack built", build_seconds),
                                                           ("Debian layers ready", debian_seconds))
             if s is not None and s >= 1]
    print(f"\ntotal {total:.0f} s" + (f" ({', '.join(built)})" if built else ""))
    if args.json:
        meta = {"params": dataclasses.asdict(p), "real_params": dataclasses.asdict(rp),
                "repeat": args.repeat, "userns": userns, "host": host,
                "loadavg": {"start": load_start, "end": load_end}, "total_seconds": total,
                "build_seconds": build_seconds, "debian_seconds": debian_seconds}
        bench_report.write_json(args.json, meta, runner.result, rows, args.systems)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
