"""Benchmark unionmount against fuse-overlayfs and kernel overlayfs on the same layer stacks.

Run it through scripts/bench, which installs fuse-overlayfs and REPO/.venv first.

The layer stacks are built once and cached (REPO/.bench-cache/stack-<size>-v<N>-<hash>):
  main: base (tree/aA/bBB/fFF: small files of 0-30 KiB in ~1,000 directories, big/big0..2),
        mid (overrides 10% of base, adds a file to every leaf directory),
        top (overrides 1%, adds files, whites out 1%, one opaque directory);
        merged/ has entries from all three layers.
  deep: 100 layers l000 (bottom) .. l099 (top), each adding files to shared/;
        shared/bottom-only exists in l000 alone.

Every scenario mounts each system on a fresh upper and workdir, drops the page cache
(cold), then times its steps one after the other on that mount: a step that repeats the
one before it is the warm figure. Scenarios with a timed mount drop the cache before the
mount instead. The table shows medians over --repeat runs and each one's ratio to the kernel.
"""

from __future__ import annotations

import argparse
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
import statistics
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STACK_VERSION = 2  # bump when the stack's layout changes: the cache is keyed by it
SEED = 20260101
MIB = 1 << 20
SYSTEMS = ("kernel", "fuse-overlayfs", "unionmount")
MOUNT_TIMEOUT = 60.0
STEP_TIMEOUT = 900.0


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


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


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
    # with none inside (the kernel would list a whiteout in a directory no layer merges into).
    for rel in rng.sample(files, len(files) // 100):
        if not (top / rel).exists() and not rel.startswith(leaves[1] + "/"):
            (top / rel).parent.mkdir(parents=True, exist_ok=True)
            os.mknod(top / rel, 0o600 | stat.S_IFCHR, os.makedev(0, 0))
    opaque = top / leaves[1]
    opaque.mkdir(parents=True, exist_ok=True)
    put(opaque / "only-in-top", small())
    os.setxattr(opaque, "trusted.overlay.opaque", b"y")

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


@dataclasses.dataclass(frozen=True)
class Stack:
    """Lower layers, top-most first, as names relative to root."""

    root: Path
    lowers: tuple[str, ...]


def stacks_of(root: Path, p: Params) -> dict[str, Stack]:
    deep = tuple(f"l{i:03d}" for i in reversed(range(p.deep_layers)))
    return {
        "main": Stack(root / "main", ("top", "mid", "base")),
        "deep": Stack(root / "deep", deep),
    }


# ---------------------------------------------------------------------------------------------
# Mounting the three systems


class MountError(Exception):
    pass


def fuse_holders() -> set[int]:
    """PIDs that hold /dev/fuse open: the FUSE daemons."""
    pids = set()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            for fd in os.scandir(f"/proc/{entry.name}/fd"):
                if os.readlink(fd.path) == "/dev/fuse":
                    pids.add(int(entry.name))
                    break
        except OSError:
            continue
    return pids


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/status") as f:
            return not any(line.startswith("State:") and "Z" in line.split()[1] for line in f)
    except OSError:
        return False


def peak_rss_kib(pid: int | None) -> int | None:
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def run(label: str, cmd: list[str], timeout: float, cwd: Path | None = None) -> str:
    """Run cmd, return its stdout; raise MountError with its last line of stderr on failure."""
    try:
        proc = subprocess.run(
            cmd, check=False, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True,
            text=True, timeout=timeout,
        )
    except subprocess.TimeoutExpired as e:
        raise MountError(f"{label}: {shlex.join(cmd)}: timed out after {timeout:.0f} s") from e
    if proc.returncode != 0:
        msg = (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]
        raise MountError(f"{label}: {msg}")
    return proc.stdout


@dataclasses.dataclass
class Mount:
    system: str
    mnt: Path
    pid: int | None  # the FUSE daemon
    seconds: float  # from running the mount command until the mount point answers
    killed: bool = False

    def kill(self) -> None:
        """Unstick a hung mount: a dead daemon fails every pending request with ENOTCONN."""
        if self.pid is not None and pid_alive(self.pid):
            self.killed = True
            os.kill(self.pid, signal.SIGKILL)


class Mounter:
    """Mounts and unmounts; remembers what is mounted so that close() can clean up."""

    def __init__(self, unionmount: list[str]) -> None:
        self.unionmount = unionmount
        self.live: list[Mount] = []

    def mount(self, system: str, stack: Stack, upper: Path, work: Path, mnt: Path,
              daemon_log: Path) -> Mount:
        before = fuse_holders()
        lowers_abs = ":".join(str(stack.root / name) for name in stack.lowers)
        cwd = None
        if system == "kernel":
            # Relative lowerdirs, resolved against cwd: 100 absolute paths overflow the
            # one page that mount(2) takes for options.
            opts = f"lowerdir={':'.join(stack.lowers)},upperdir={upper},workdir={work}"
            cmd, cwd = ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], stack.root
        elif system == "fuse-overlayfs":
            opts = f"lowerdir={lowers_abs},upperdir={upper},workdir={work}"
            cmd = ["fuse-overlayfs", "-o", opts, str(mnt)]
        else:
            cmd = [*self.unionmount, lowers_abs, "--upper", str(upper), "--workdir", str(work),
                   "--log", str(daemon_log), str(mnt)]
        # A daemon that never answers would hang the liveness check (a stat of mnt) for good:
        # killing it makes that stat fail instead.
        watchdog = threading.Timer(MOUNT_TIMEOUT, self._kill_daemons, (before, mnt))
        watchdog.start()
        try:
            t0 = time.perf_counter()
            run(f"{system} mount", cmd, MOUNT_TIMEOUT, cwd=cwd)
            deadline = time.monotonic() + MOUNT_TIMEOUT
            while not os.path.ismount(mnt):
                if time.monotonic() > deadline:
                    raise MountError(f"{system}: {mnt} is not live {MOUNT_TIMEOUT:.0f} s after "
                                     "the mount command returned")
                time.sleep(0.005)
            took = time.perf_counter() - t0
        except BaseException:
            # Leave nothing behind: a half-started daemon, a mount that came up late.
            self._kill_daemons(before, mnt)
            subprocess.run(["umount", "-l", str(mnt)], check=False, capture_output=True)
            raise
        finally:
            watchdog.cancel()
        pid = None if system == "kernel" else next(iter(self._daemons(before, mnt)), None)
        m = Mount(system, mnt, pid, took)
        self.live.append(m)
        return m

    @staticmethod
    def _daemons(before: set[int], mnt: Path) -> list[int]:
        """New holders of /dev/fuse that name mnt: ours, not another user's FUSE daemon."""
        return [p for p in sorted(fuse_holders() - before) if str(mnt).encode() in _cmdline(p)]

    def _kill_daemons(self, before: set[int], mnt: Path) -> None:
        for pid in self._daemons(before, mnt):
            os.kill(pid, signal.SIGKILL)

    def unmount(self, m: Mount) -> None:
        self.live.remove(m)
        if is_mounted(m.mnt):
            tool = ["umount"] if m.system == "kernel" else ["fusermount3", "-u"]
            cmd = [*tool, str(m.mnt)]
            done = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True)
            if done.returncode:
                subprocess.run(["umount", "-l", str(m.mnt)], check=False, capture_output=True)
        if m.pid is not None:
            deadline = time.monotonic() + 20
            while pid_alive(m.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if pid_alive(m.pid):
                log(f"  {m.system}: daemon {m.pid} still alive 20 s after unmount, killing it")
                os.kill(m.pid, signal.SIGKILL)

    def close(self) -> None:
        for m in list(self.live):
            try:
                self.unmount(m)
            except OSError as e:
                log(f"  cleanup of {m.mnt}: {e}")


def is_mounted(path: Path) -> bool:
    """Whether path is a mount point, from the mount table: no syscall on a mount that may hang."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


# ---------------------------------------------------------------------------------------------
# Workloads


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


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


def shell(template: str, *paths: Path) -> str:
    """Run template through sh, with paths quoted into its {} fields; return its stdout."""
    cmd = template.format(*(shlex.quote(str(path)) for path in paths))
    proc = subprocess.run(cmd, check=False, shell=True, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if proc.returncode != 0:
        raise OSError(f"{cmd}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return proc.stdout.strip()


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


@dataclasses.dataclass(frozen=True)
class Step:
    row: str
    fn: Callable[[Path], object]  # given the mount point; returns a value compared across systems


@dataclasses.dataclass(frozen=True)
class Scenario:
    key: str
    stack: str
    steps: tuple[Step, ...]
    mount_row: str | None = None  # time the mount itself (the cache is dropped before it)
    setup: Callable[[Path], None] | None = None  # untimed, after mounting

    def rows(self) -> list[str]:
        return ([self.mount_row] if self.mount_row else []) + [s.row for s in self.steps]


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


@dataclasses.dataclass
class Result:
    samples: dict[str, dict[str, list[float]]]  # row -> system -> seconds
    errors: dict[str, dict[str, str]]  # row -> system -> first error
    checks: dict[str, dict[str, str]]  # row -> system -> value of the step, first run
    rss: dict[str, dict[str, int]]  # scenario -> system -> peak VmHWM in KiB


class Runner:
    def __init__(self, stacks: dict[str, Stack], run_dir: Path, mounter: Mounter) -> None:
        self.stacks, self.run_dir, self.mounter = stacks, run_dir, mounter
        self.result = Result({}, {}, {}, {})

    def scenario(self, sc: Scenario, system: str) -> None:
        """One run of sc on system: fresh upper, mount, steps, unmount. Raises on failure."""
        base = self.run_dir / system
        shutil.rmtree(base, ignore_errors=True)
        upper, work, mnt, daemon_log = base / "upper", base / "work", base / "mnt", base / "log"
        for d in (upper, work, mnt):
            d.mkdir(parents=True)
        ok = False
        try:
            if sc.mount_row:
                drop_caches()
            m = self.mounter.mount(system, self.stacks[sc.stack], upper, work, mnt, daemon_log)
            try:
                if sc.mount_row:
                    self.record(sc.mount_row, system, m.seconds, None)
                self.steps(sc, system, m)
            finally:
                self.mounter.unmount(m)
            ok = True
        finally:
            self.keep_log(sc, daemon_log, ok)
            shutil.rmtree(base, ignore_errors=True)

    def steps(self, sc: Scenario, system: str, m: Mount) -> None:
        if sc.setup:
            sc.setup(m.mnt)
        if not sc.mount_row:
            drop_caches()
        for step in sc.steps:
            os.sync()
            watchdog = threading.Timer(STEP_TIMEOUT, m.kill)
            watchdog.start()
            try:
                t0 = time.perf_counter()
                value = step.fn(m.mnt)
                took = time.perf_counter() - t0
            except Exception as e:
                if m.killed:
                    raise TimeoutError(f"{step.row}: over {STEP_TIMEOUT:.0f} s") from e
                raise
            finally:
                watchdog.cancel()
            if m.killed:  # the step got past the dead daemon's errors somehow
                raise TimeoutError(f"{step.row}: over {STEP_TIMEOUT:.0f} s")
            self.record(step.row, system, took, value)
        rss = peak_rss_kib(m.pid)
        if rss is not None:
            old = self.result.rss.setdefault(sc.key, {}).get(system, 0)
            self.result.rss[sc.key][system] = max(old, rss)

    def keep_log(self, sc: Scenario, daemon_log: Path, ok: bool) -> None:
        """Keep unionmount's log next to the cache when the run failed or it shows a traceback."""
        if not daemon_log.exists():
            return
        if ok and "Traceback" not in daemon_log.read_text(errors="replace"):
            return
        keep = self.run_dir.parent / f"unionmount-{sc.key}.log"
        shutil.copy(daemon_log, keep)
        log(f"  unionmount's log {'shows a traceback' if ok else 'of the failed run'}: {keep}")

    def record(self, row: str, system: str, seconds: float, value: object) -> None:
        self.result.samples.setdefault(row, {}).setdefault(system, []).append(seconds)
        self.result.checks.setdefault(row, {}).setdefault(system, repr(value))

    def fail(self, sc: Scenario, system: str, err: BaseException) -> None:
        msg = f"{type(err).__name__}: {err}".splitlines()[0][:200]
        for row in sc.rows():
            self.result.errors.setdefault(row, {}).setdefault(system, msg)


def fmt_time(s: float) -> str:
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def medians(result: Result, row: str, systems: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for system in systems:
        samples = result.samples.get(row, {}).get(system)
        failed = system in result.errors.get(row, {})
        out[system] = None if failed or not samples else statistics.median(samples)
    return out


def table(result: Result, rows: list[str], systems: list[str]) -> str:
    width = max(len(r) for r in rows) + 2
    lines = ["".join([f"{'workload':<{width}}"] + [f"{s:>24}" for s in systems])]
    lines.append("-" * len(lines[0]))
    for row in rows:
        med = medians(result, row, systems)
        ref = med.get("kernel")
        cells = []
        for system in systems:
            value = med[system]
            if value is None:
                cells.append("fail" if system in result.errors.get(row, {}) else "-")
            elif system == "kernel" or not ref:
                cells.append(fmt_time(value))
            else:
                cells.append(f"{fmt_time(value)} (x{value / ref:.3g})")
        lines.append(f"{row:<{width}}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def rss_table(result: Result, systems: list[str]) -> str:
    fuse = [s for s in systems if s != "kernel"]
    if not fuse or not result.rss:
        return ""
    head = "daemon peak RSS (VmHWM)"
    width = max(len(head), *(len(k) for k in result.rss)) + 2
    lines = [f"{head:<{width}}" + "".join(f"{s:>18}" for s in fuse)]
    lines.append("-" * len(lines[0]))
    for key, per in result.rss.items():
        cells = [f"{per[s] / 1024:.1f} MiB" if s in per else "-" for s in fuse]
        lines.append(f"{key:<{width}}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def mismatches(result: Result, rows: list[str]) -> Iterator[str]:
    """Steps whose value (file count, bytes read, ...) differs from the kernel's."""
    for row in rows:
        per = result.checks.get(row, {})
        ref = per.get("kernel")
        for system, value in per.items():
            if ref is not None and system != "kernel" and value != ref:
                yield f"{row}: {system} gave {value}, the kernel {ref}"


def host_info() -> dict[str, str]:
    fo = subprocess.run(["fuse-overlayfs", "--version"], check=False, capture_output=True,
                        text=True)
    version = re.search(r"fuse-overlayfs: version (\S+)", fo.stdout + fo.stderr)
    params = Path("/sys/module/overlay/parameters")
    ovl = {k: (params / k).read_text().strip() for k in ("metacopy", "redirect_dir", "index")
           if (params / k).exists()}
    return {
        "kernel": platform.release(),
        "cpus": str(os.cpu_count()),
        "fuse-overlayfs": version.group(1) if version else "?",
        "overlay params": " ".join(f"{k}={v}" for k, v in ovl.items()),
        "python": platform.python_version(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=3, help="runs per scenario (default 3)")
    ap.add_argument("--only", action="append", default=[], metavar="PATTERN",
                    help="run the scenarios whose key or a row matches this regex "
                         "(repeatable; see --list)")
    ap.add_argument("--small", action="store_true", help="a tiny stack: a smoke test in seconds")
    ap.add_argument("--systems", default=",".join(SYSTEMS),
                    help=f"comma-separated subset of {','.join(SYSTEMS)}")
    ap.add_argument("--json", type=Path, metavar="FILE", help="also write the results here")
    ap.add_argument("--cache", type=Path, default=Path(
        os.environ.get("UNIONFS_BENCH_CACHE", REPO / ".bench-cache")),
        help="where the layer stacks are kept (default REPO/.bench-cache)")
    ap.add_argument("--unionmount", default=f"{shlex.quote(sys.executable)} -m unionfs",
                    help="the command that mounts unionfs (default: this python -m unionfs)")
    ap.add_argument("--timeout", type=float, default=STEP_TIMEOUT, metavar="SECONDS",
                    help="a step running longer fails: its FUSE daemon is killed "
                         f"(default {STEP_TIMEOUT:.0f})")
    ap.add_argument("--list", action="store_true", help="list the scenarios and their rows")
    args = ap.parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown or not systems:
        ap.error(f"--systems: unknown {', '.join(sorted(unknown)) or 'empty list'}")
    if args.repeat < 1:
        ap.error("--repeat must be at least 1")
    args.systems = systems
    return args


def main(argv: list[str] | None = None) -> int:
    global STEP_TIMEOUT  # set once, before anything runs
    args = parse_args(argv)
    STEP_TIMEOUT = args.timeout
    p = SMALL if args.small else FULL
    cache = args.cache.resolve()
    all_scenarios = scenarios(p, cache / p.key / "untar.tar")
    patterns = [re.compile(x, re.IGNORECASE) for x in args.only]
    chosen = [sc for sc in all_scenarios if not patterns or any(
        pat.search(sc.key) or any(pat.search(r) for r in sc.rows()) for pat in patterns)]
    if args.list:
        for sc in all_scenarios:
            print(f"{sc.key}: " + "; ".join(sc.rows()))
        return 0
    if not chosen:
        print(f"bench: no scenario matches {args.only}", file=sys.stderr)
        return 2
    if os.geteuid() != 0:
        print("bench: must run as root (mount, drop_caches)", file=sys.stderr)
        return 2

    started = time.perf_counter()
    root, build_seconds = ensure_stacks(p, cache)
    host = host_info()
    log("host: " + ", ".join(f"{k} {v}" for k, v in host.items()))
    run_dir = cache / f"run-{os.getpid()}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    mounter = Mounter(shlex.split(args.unionmount))
    runner = Runner(stacks_of(root, p), run_dir, mounter)

    def on_term(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

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
                        fmt_time(runner.result.samples[r][system][-1]) for r in sc.rows())
                    log(f"[{sc.key} {rep + 1}/{args.repeat}] {system}: {figures} "
                        f"({time.perf_counter() - t0:.1f} s)")
    except KeyboardInterrupt:
        interrupted = True
        log("interrupted: unmounting and printing what was measured")
    finally:
        mounter.close()
        shutil.rmtree(run_dir, ignore_errors=True)

    rows = [r for sc in chosen for r in sc.rows()]
    total = time.perf_counter() - started
    print(f"\nunionfs benchmark: {p.name} stack, median of {args.repeat}, "
          f"ratio to kernel overlayfs in parentheses")
    print("host: " + ", ".join(f"{k} {v}" for k, v in host.items()) + "\n")
    print(table(runner.result, rows, args.systems))
    rss = rss_table(runner.result, args.systems)
    if rss:
        print("\n" + rss)
    errors = dict.fromkeys(
        f"{s}: {e}" for row in rows for s, e in runner.result.errors.get(row, {}).items())
    if errors:
        print("\nfailures:\n  " + "\n  ".join(errors))
    diffs = list(mismatches(runner.result, rows))
    if diffs:
        print("\nresults that differ from the kernel's:\n  " + "\n  ".join(diffs))
    print(f"\ntotal {total:.0f} s" + (f" (stack built in {build_seconds:.0f} s)"
                                       if build_seconds is not None else ""))
    if args.json:
        write_json(args, p, host, runner.result, rows, total, build_seconds)
    return 130 if interrupted else 0


def write_json(args: argparse.Namespace, p: Params, host: dict[str, str], result: Result,
               rows: list[str], total: float, build_seconds: float | None) -> None:
    out = {
        "params": dataclasses.asdict(p),
        "repeat": args.repeat,
        "systems": args.systems,
        "host": host,
        "rows": [
            {
                "row": row,
                "results": {
                    s: {
                        "samples": result.samples.get(row, {}).get(s, []),
                        "median": medians(result, row, args.systems)[s],
                        "error": result.errors.get(row, {}).get(s),
                        "value": result.checks.get(row, {}).get(s),
                    }
                    for s in args.systems
                },
            }
            for row in rows
        ],
        "peak_rss_kib": result.rss,
        "total_seconds": total,
        "build_seconds": build_seconds,
    }
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
