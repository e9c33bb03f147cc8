"""What every workload of scripts/bench shares: mounting the three systems, running a command,
and the Scenario/Step description of a workload. See scripts/bench.py."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

SYSTEMS = ("kernel", "fuse-overlayfs", "unionmount")
MIB = 1 << 20
MOUNT_TIMEOUT = 60.0
UNMOUNT_WAIT = 60.0  # for the daemon to exit after its unmount
STEP_TIMEOUT = 900.0  # scripts/bench --timeout sets it before anything runs


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class MountError(Exception):
    pass


# ---------------------------------------------------------------------------------------------
# Processes and the mount table


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


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def logged_daemon(daemon_log: Path, mnt: Path, wait: float = 2.0) -> int | None:
    """The pid in unionmount's `PID INFO unionfs.mount: mounted MNT` log line, if it holds
    /dev/fuse. A daemon forked by unionmount's warm server has the server's command line,
    which does not name the mount point."""
    line = re.compile(rf"^\S+ \S+ (\d+) INFO \S+: mounted {re.escape(str(mnt))}\b",
                      re.MULTILINE)
    deadline = time.monotonic() + wait
    while True:
        try:
            found = line.search(daemon_log.read_text(errors="replace"))
        except FileNotFoundError:
            found = None
        if found:
            pid = int(found.group(1))
            return pid if pid in fuse_holders() else None
        if time.monotonic() > deadline:
            return None
        time.sleep(0.01)


def users_of(path: Path) -> list[int]:
    """PIDs whose root, cwd or an open file is at or below path."""
    prefix = str(path)
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            links = [f"/proc/{entry.name}/{n}" for n in ("root", "cwd")]
            links += [fd.path for fd in os.scandir(f"/proc/{entry.name}/fd")]
            for link in links:
                target = os.readlink(link)
                if target == prefix or target.startswith(prefix + "/"):
                    found.append(int(entry.name))
                    break
        except OSError:
            continue
    return found


def end_processes_naming(path: Path, grace: float = 5.0) -> list[int]:
    """SIGTERM, then SIGKILL, every process (but this one) whose command line names path:
    what this run started there (unionmount's warm server, with UNIONFS_ZYGOTE_DIR in it)."""
    needle = str(path).encode()
    pids = [int(e.name) for e in os.scandir("/proc") if e.name.isdigit()
            and int(e.name) != os.getpid() and needle in _cmdline(int(e.name))]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    for pid in pids:
        if pid_alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    return pids


def is_mounted(path: Path) -> bool:
    """Whether path is a mount point, from the mount table: no syscall on a mount that may hang."""
    return mount_dev(path) is not None


def mount_dev(path: Path) -> str | None:
    """The MAJOR:MINOR of what is mounted on path (the last mount there), from the mount table."""
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields = line.split()
            if fields[4] == str(path):
                found = fields[2]
    return found


def run(label: str, cmd: list[str], timeout: float, cwd: Path | None = None,
        env: Mapping[str, str] | None = None) -> str:
    """Run cmd in its own process group (killed whole on a timeout) and return its stdout;
    raise MountError with the last lines of its stderr on failure."""
    proc = subprocess.Popen(
        cmd, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, errors="replace", env=dict(env) if env is not None else None,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:  # a grandchild outside the group holds our pipes
            proc.kill()
        raise MountError(f"{label}: {shlex.join(cmd)}: timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        tail = " | ".join(err.strip().splitlines()[-3:]) or f"exit {proc.returncode}"
        raise MountError(f"{label}: {tail}")
    return out


def shell(template: str, *paths: Path) -> str:
    """Run template through sh, with paths quoted into its {} fields; return its stdout."""
    cmd = template.format(*(shlex.quote(str(path)) for path in paths))
    proc = subprocess.run(cmd, check=False, shell=True, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=STEP_TIMEOUT)
    if proc.returncode != 0:
        raise OSError(f"{cmd}: {(proc.stderr.strip().splitlines() or ['failed'])[-1]}")
    return proc.stdout.strip()


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3")


# ---------------------------------------------------------------------------------------------
# Mounting the three systems


@dataclasses.dataclass(frozen=True)
class Stack:
    """Lower layers, top-most first, as names relative to root."""

    root: Path
    lowers: tuple[str, ...]


@dataclasses.dataclass
class Mount:
    system: str
    mnt: Path
    pid: int | None  # the FUSE daemon
    seconds: float  # from running the mount command until the mount point answers
    dev: str | None = None  # MAJOR:MINOR; for FUSE, MINOR is the connection number
    killed: bool = False

    def kill(self) -> None:
        """Unstick a hung mount: a dead daemon fails every pending request with ENOTCONN."""
        if self.pid is not None and pid_alive(self.pid):
            self.killed = True
            os.kill(self.pid, signal.SIGKILL)


class Mounter:
    """Mounts and unmounts; remembers what is mounted so that close() can clean up.

    Every system gets `-o lowerdir=...,upperdir=...,workdir=... MNT`, as containers-storage
    runs a mount program; unionmount also gets `--log FILE`. In a user namespace (userns)
    the kernel gets `userxattr`, as it needs there.
    """

    def __init__(self, unionmount: list[str], userns: bool = False) -> None:
        self.unionmount = unionmount
        self.userns = userns
        self.live: list[Mount] = []

    def command(self, system: str, stack: Stack, upper: Path, work: Path, mnt: Path,
                daemon_log: Path) -> tuple[list[str], Path | None]:
        if system == "kernel":
            # Relative lowerdirs, resolved against cwd: 100 absolute paths overflow the
            # one page that mount(2) takes for options.
            opts = f"lowerdir={':'.join(stack.lowers)},upperdir={upper},workdir={work}"
            opts += ",userxattr" if self.userns else ""
            return ["mount", "-t", "overlay", "overlay", "-o", opts, str(mnt)], stack.root
        lowers_abs = ":".join(str(stack.root / name) for name in stack.lowers)
        opts = f"lowerdir={lowers_abs},upperdir={upper},workdir={work}"
        if system == "fuse-overlayfs":
            return ["fuse-overlayfs", "-o", opts, str(mnt)], None
        return [*self.unionmount, "--log", str(daemon_log), "-o", opts, str(mnt)], None

    def mount(self, system: str, stack: Stack, upper: Path, work: Path, mnt: Path,
              daemon_log: Path) -> Mount:
        before = fuse_holders()
        cmd, cwd = self.command(system, stack, upper, work, mnt, daemon_log)
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
        pid = None
        if system == "unionmount":
            pid = logged_daemon(daemon_log, mnt)
        if system != "kernel" and pid is None:
            pid = next(iter(self._daemons(before, mnt)), None)
        m = Mount(system, mnt, pid, took, mount_dev(mnt))
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
            done = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True)
            if done.returncode:
                users = ", ".join(f"{pid} ({_cmdline(pid)[:60]!r})" for pid in users_of(m.mnt))
                log(f"  {m.system}: {shlex.join(cmd)}: {done.stderr.strip()}; unmounting lazily"
                    f" (processes using it: {users or 'none found'})")
                subprocess.run(["umount", "-l", str(m.mnt)], check=False, capture_output=True)
        if m.pid is not None:
            # Time to write back what the kernel still caches and to log its last lines
            # (unionmount's request counts): after apt-get install, more than 20 s here.
            deadline = time.monotonic() + UNMOUNT_WAIT
            while pid_alive(m.pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            if pid_alive(m.pid):
                log(f"  {m.system}: daemon {m.pid} still alive {UNMOUNT_WAIT:.0f} s after "
                    "unmount, killing it")
                os.kill(m.pid, signal.SIGKILL)

    def close(self) -> None:
        for m in list(self.live):
            try:
                self.unmount(m)
            except OSError as e:
                log(f"  cleanup of {m.mnt}: {e}")


# ---------------------------------------------------------------------------------------------
# What a workload is


@dataclasses.dataclass(frozen=True)
class Figure:
    """What a step measured itself (a throughput), instead of the time it took."""

    value: float
    unit: str  # "MiB/s", "MB/s": higher is better
    check: object = None  # compared across systems, as a step's return value is


@dataclasses.dataclass(frozen=True)
class Step:
    row: str
    # Given the mount point (or a session's directory); returns a value compared across
    # systems, or a Figure.
    fn: Callable[[Path], object]


Around = Callable[[Path], contextlib.AbstractContextManager[object]]


@dataclasses.dataclass(frozen=True)
class Scenario:
    """One workload: mounted on a fresh upper (stack), or run in a session (e.g. a podman
    storage, session(system) -> its directory), then its steps, timed one after the other."""

    key: str
    stack: str | None
    steps: tuple[Step, ...]
    mount_row: str | None = None  # time the mount itself
    setup: Callable[[Path], None] | None = None  # untimed, after mounting (inside `around`)
    around: Around | None = None  # entered after mounting, left before unmounting (untimed)
    session: Callable[[str], Path] | None = None  # instead of a mount (stack is None)
    cold: bool = True  # drop the page cache before the steps (or before the mount_row)
    warm_mount: bool = False  # mount_row: one untimed mount and unmount first
    real: bool = False  # a real workload (--real), not a synthetic one (--synthetic)

    def rows(self) -> list[str]:
        return ([self.mount_row] if self.mount_row else []) + [s.row for s in self.steps]
