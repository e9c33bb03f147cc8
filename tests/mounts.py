"""Helpers for the real-mount tests: build layers, mount, unmount, snapshot a tree.

Two backends serve the same layers:

- "kernel": kernel overlayfs (``mount -t overlay``, index=on, redirect_dir=off,
  metacopy=off), the reference every semantic test is checked against;
- "unionfs": our daemon, run as ``python -m unionfs`` in a subprocess (never from
  the test's own thread).

Unmounting never leaves a mount behind: a polite unmount first, then a lazy one,
then SIGKILL for a daemon still alive.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

PYTHON = sys.executable
UNIONMOUNT = [PYTHON, "-m", "unionfs"]
OVERLAY_OPTS = "index=on,redirect_dir=off,metacopy=off"
"""The reference semantics every test compares against."""
READER_OPTS = "index=on,redirect_dir=on,metacopy=on"
"""For a kernel that only reads an upper unionfs wrote: unionfs writes metadata-only
copies in the kernel's metacopy format by default, which a kernel follows only with
metacopy=on (which needs redirect_dir=on; unionfs writes no redirects)."""
MOUNT_TIMEOUT = 60

# ---------------------------------------------------------------------------
# Layer building


class _Marker:
    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


DIR = _Marker("DIR")
"""A plain directory."""
WHITEOUT = _Marker("WHITEOUT")
"""A char 0/0 device: the kernel's (and our written) whiteout."""
OPAQUE = _Marker("OPAQUE")
"""A directory with trusted.overlay.opaque=y."""
FIFO = _Marker("FIFO")


@dataclass(frozen=True)
class Symlink:
    target: str


@dataclass(frozen=True)
class HardLink:
    """Another name for an entry of the same spec (given relative to the layer)."""

    to: str


@dataclass(frozen=True)
class Xattr:
    """A directory with the given extended attributes."""

    attrs: Mapping[str, bytes]


@dataclass(frozen=True)
class File:
    """A regular file with explicit metadata."""

    data: bytes = b""
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    mtime: float | None = None
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


Spec = Mapping[str, object]


def build(root: Path, spec: Spec) -> Path:
    """Create ``root`` and the entries of ``spec`` (relpath -> what) under it.

    Parents are created as needed; entries are made in path order, hard links last.
    """
    root.mkdir(parents=True, exist_ok=True)
    links = []
    for rel in sorted(spec, key=lambda r: (r.count("/"), r)):
        what = spec[rel]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(what, HardLink):
            links.append((root / what.to, path))
        elif isinstance(what, (str, bytes)):
            path.write_bytes(what.encode() if isinstance(what, str) else what)
        elif isinstance(what, File):
            path.write_bytes(what.data)
            for k, v in what.xattrs.items():
                os.setxattr(path, k, v)
            os.chown(path, what.uid, what.gid)
            os.chmod(path, what.mode)
            if what.mtime is not None:
                os.utime(path, (what.mtime, what.mtime))
        elif what is DIR:
            path.mkdir(exist_ok=True)
        elif what is OPAQUE:
            path.mkdir(exist_ok=True)
            os.setxattr(path, "trusted.overlay.opaque", b"y")
        elif isinstance(what, Xattr):
            path.mkdir(exist_ok=True)
            for k, v in what.attrs.items():
                os.setxattr(path, k, v)
        elif what is WHITEOUT:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(0, 0))
        elif what is FIFO:
            os.mkfifo(path)
        elif isinstance(what, Symlink):
            os.symlink(what.target, path)
        else:
            raise TypeError(f"unknown spec for {rel}: {what!r}")
    for src, dst in links:
        os.link(src, dst)
    return root


# ---------------------------------------------------------------------------
# Mount table and processes


def _unescape(field_: str) -> str:
    return (
        field_.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n")
        .replace("\\134", "\\")
    )


def mountpoints() -> list[str]:
    """Every mount point in this namespace, from /proc/self/mountinfo."""
    with open("/proc/self/mountinfo") as f:
        return [_unescape(line.split()[4]) for line in f]


def is_mounted(path: os.PathLike[str] | str) -> bool:
    """True if ``path`` is a mount point (works on a dead FUSE mount, unlike ismount)."""
    return os.path.abspath(path) in mountpoints()


def mounts_under(prefix: os.PathLike[str] | str) -> list[str]:
    base = os.path.abspath(prefix).rstrip("/") + "/"
    return [m for m in mountpoints() if m.startswith(base)]


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _pids() -> Iterator[int]:
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != os.getpid():
            yield int(name)


def server_pids(mnt: os.PathLike[str] | str) -> list[int]:
    """Processes of the unionfs daemon serving ``mnt`` (its path is an argv item)."""
    target = os.path.abspath(mnt)
    found = []
    for pid in _pids():
        argv = _cmdline(pid)
        if target in argv and any("unionfs" in a or "unionmount" in a for a in argv):
            found.append(pid)
    return found


def pids_mentioning(prefix: os.PathLike[str] | str) -> list[int]:
    """Processes with an argv item under ``prefix`` (leftover daemons of a test)."""
    base = os.path.abspath(prefix).rstrip("/") + "/"
    return [p for p in _pids() if any(a.startswith(base) for a in _cmdline(p))]


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_until(pred, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(interval)


def kill_all(pids: Iterable[int], sig: int = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def force_unmount(mnt: str) -> None:
    """Lazy-unmount ``mnt`` (all stacked mounts) and kill what served it."""
    pids = server_pids(mnt)
    for _ in range(5):
        if not is_mounted(mnt):
            break
        subprocess.run(["umount", "-l", mnt], capture_output=True, timeout=30, check=False)
    kill_all(pids)


# ---------------------------------------------------------------------------
# Mounting


def tool(*args: object, stdin: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    """Run ``python -m unionfs ARGS`` (bytes in, bytes out)."""
    argv = [sys.executable, "-m", "unionfs",
            *(a if isinstance(a, bytes) else os.fspath(a) if isinstance(a, Path) else str(a)
              for a in args)]
    return subprocess.run(argv, input=stdin, capture_output=True, timeout=300, check=False)


def ok(r: subprocess.CompletedProcess[bytes]) -> bytes:
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr.decode(errors='replace')}"
    return r.stdout


def unionmount(*args: object, timeout: float = MOUNT_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    """Run ``python -m unionfs ARGS`` to completion, capturing its output as text."""
    kw.setdefault("capture_output", True)
    kw.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.run(
        [*UNIONMOUNT, *map(str, args)], text=True, timeout=timeout, check=False, **kw
    )


@dataclass
class Mount:
    backend: str
    mnt: Path
    lowers: list[Path]
    upper: Path | None
    workdir: Path | None
    log: Path | None = None
    empty: Path | None = None

    def __truediv__(self, rel: str) -> Path:
        return self.mnt / rel

    @property
    def pids(self) -> list[int]:
        return server_pids(self.mnt) if self.backend == "unionfs" else []

    def unmount(self) -> None:
        """Unmount politely; fall back to a lazy unmount and SIGKILL. Idempotent."""
        mnt = str(self.mnt)
        pids = self.pids
        if is_mounted(mnt):
            cmd = ["fusermount3", "-u", mnt] if self.backend == "unionfs" else ["umount", mnt]
            try:
                subprocess.run(cmd, capture_output=True, timeout=30, check=False)
            except subprocess.TimeoutExpired:
                pass
        if is_mounted(mnt):
            force_unmount(mnt)
        if pids and not wait_until(lambda: not any(pid_alive(p) for p in pids), 10):
            kill_all(pids)
            wait_until(lambda: not any(pid_alive(p) for p in pids), 5)

    def log_text(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")

    def assert_log_clean(self) -> None:
        text = self.log_text()
        assert "Traceback" not in text, f"daemon log of {self.mnt} has a traceback:\n{text[-6000:]}"


def mount_kernel(
    lowers: Sequence[Path],
    upper: Path | None,
    workdir: Path | None,
    mnt: Path,
    opts: str = OVERLAY_OPTS,
) -> Mount:
    """Mount kernel overlayfs. Read-only if ``upper`` is None (an empty extra lower
    is added when there is a single lower: the kernel needs two without an upper)."""
    mnt.mkdir(parents=True, exist_ok=True)
    lowers = list(lowers)
    empty = None
    stack = list(lowers)
    if upper is None:
        if len(stack) == 1:
            empty = mnt.parent / (mnt.name + ".empty")
            empty.mkdir(exist_ok=True)
            stack.append(empty)
        options = "lowerdir=" + ":".join(map(str, stack))
    else:
        assert workdir is not None
        upper.mkdir(parents=True, exist_ok=True)
        workdir.mkdir(parents=True, exist_ok=True)
        options = f"lowerdir={':'.join(map(str, stack))},upperdir={upper},workdir={workdir},{opts}"
    r = subprocess.run(
        ["mount", "-t", "overlay", "-o", options, "overlay", str(mnt)],
        capture_output=True,
        text=True,
        timeout=MOUNT_TIMEOUT,
        check=False,
    )
    assert r.returncode == 0, f"kernel overlay mount failed: {r.stderr}"
    assert os.path.ismount(mnt)
    return Mount("kernel", mnt, lowers, upper, workdir, None, empty)


def mount_unionfs(
    lowers: Sequence[Path],
    upper: Path | None,
    workdir: Path | None,
    mnt: Path,
    log: Path,
    extra: Sequence[str] = (),
) -> Mount:
    """Mount with ``python -m unionfs``; it must return 0 only once the mount is live."""
    mnt.mkdir(parents=True, exist_ok=True)
    args: list[object] = [":".join(map(str, lowers))]
    if upper is not None:
        upper.mkdir(parents=True, exist_ok=True)
        args += ["--upper", upper]
        if workdir is not None:
            args += ["--workdir", workdir]
    args += ["--log", log, *extra, mnt]
    m = Mount("unionfs", mnt, list(lowers), upper, workdir, log)
    try:
        r = unionmount(*args)
    except subprocess.TimeoutExpired:
        m.unmount()
        raise AssertionError(f"unionmount did not return within {MOUNT_TIMEOUT}s")
    if r.returncode != 0:
        m.unmount()
        raise AssertionError(
            f"unionmount exited {r.returncode}: {r.stderr.strip()}\nlog:\n{m.log_text()[-4000:]}"
        )
    if not os.path.ismount(mnt):
        m.unmount()
        raise AssertionError(f"unionmount returned 0 but {mnt} is not a mount yet")
    return m


def mount_backend(
    backend: str,
    lowers: Sequence[Path],
    upper: Path | None,
    workdir: Path | None,
    mnt: Path,
    log: Path | None = None,
    options: Sequence[str] = (),
) -> Mount:
    """Mount ``backend``; ``options`` are extra unionmount arguments (unionfs only)."""
    if backend == "kernel":
        assert not options, "unionmount options given to a kernel mount"
        return mount_kernel(lowers, upper, workdir, mnt)
    assert backend == "unionfs", backend
    assert log is not None
    return mount_unionfs(lowers, upper, workdir, mnt, log, options)


# ---------------------------------------------------------------------------
# Tree snapshots


@dataclass(frozen=True)
class Node:
    kind: str
    mode: int
    uid: int
    gid: int
    size: int | None = None
    digest: str | None = None
    target: bytes | None = None
    rdev: tuple[int, int] | None = None
    nlink: int | None = None
    xattrs: tuple[tuple[str, bytes], ...] = ()
    mtime_ns: int | None = None


_KINDS = {
    stat.S_IFREG: "file",
    stat.S_IFDIR: "dir",
    stat.S_IFLNK: "symlink",
    stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr",
    stat.S_IFBLK: "blk",
    stat.S_IFSOCK: "sock",
}


def kind(st: os.stat_result) -> str:
    return _KINDS[stat.S_IFMT(st.st_mode)]


def user_xattrs(path: os.PathLike[str] | str) -> tuple[tuple[str, bytes], ...]:
    names = sorted(n for n in os.listxattr(path, follow_symlinks=False) if n.startswith("user."))
    return tuple((n, os.getxattr(path, n, follow_symlinks=False)) for n in names)


def file_digest(path: os.PathLike[str] | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Tree:
    nodes: dict[str, Node]
    links: frozenset[frozenset[str]]
    """Groups (2 or more names) of non-directories sharing one st_ino."""
    inos: dict[str, int] = field(default_factory=dict, compare=False)
    """st_ino of each name (not compared: only the grouping is)."""

    def without(self, names: set[str]) -> Tree:
        """This tree less ``names`` (and those names in the link groups)."""
        nodes = {k: v for k, v in self.nodes.items() if k not in names}
        links = frozenset(
            g
            for g in (frozenset(x for x in grp if x not in names) for grp in self.links)
            if len(g) > 1
        )
        return Tree(nodes, links, {k: v for k, v in self.inos.items() if k not in names})

    def names(self) -> set[str]:
        return set(self.nodes)


def snapshot(
    root: os.PathLike[str] | str, *, times: bool = False, xattrs: bool = True, nlink: bool = True
) -> Tree:
    """Everything visible under ``root`` (not following symlinks), without ``root`` itself.

    ``times``: record mtimes of non-directories; ``nlink``: record link counts (hard-link
    groups are recorded either way)."""
    nodes: dict[str, Node] = {}
    inos: dict[str, int] = {}
    by_ino: dict[tuple[int, int], list[str]] = {}
    root = os.fspath(root)

    def walk(rel: str) -> None:
        full = os.path.join(root, rel) if rel else root
        for name in sorted(os.listdir(full)):
            r = f"{rel}/{name}" if rel else name
            p = os.path.join(root, r)
            st = os.lstat(p)
            k = kind(st)
            n = Node(
                kind=k,
                mode=stat.S_IMODE(st.st_mode),
                uid=st.st_uid,
                gid=st.st_gid,
                size=st.st_size if k == "file" else None,
                digest=file_digest(p) if k == "file" else None,
                target=os.readlink(os.fsencode(p)) if k == "symlink" else None,
                rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)) if k in ("chr", "blk") else None,
                nlink=st.st_nlink if k != "dir" and nlink else None,
                xattrs=user_xattrs(p) if xattrs and k in ("file", "dir") else (),
                mtime_ns=st.st_mtime_ns if times and k != "dir" else None,
            )
            nodes[r] = n
            inos[r] = st.st_ino
            if k != "dir":
                by_ino.setdefault((st.st_dev, st.st_ino), []).append(r)
            else:
                walk(r)

    walk("")
    links = frozenset(frozenset(v) for v in by_ino.values() if len(v) > 1)
    return Tree(nodes, links, inos)


def diff_trees(a: Tree, b: Tree) -> list[str]:
    """Human-readable differences, empty if the trees are equal."""
    out = []
    for name in sorted(a.names() | b.names()):
        na, nb = a.nodes.get(name), b.nodes.get(name)
        if na != nb:
            out.append(f"{name}: {na} != {nb}")
    if a.links != b.links:
        out.append(
            f"hard-link groups: {sorted(map(sorted, a.links))} != {sorted(map(sorted, b.links))}"
        )
    return out


# ---------------------------------------------------------------------------
# libc: renameat2, opendir/readdir/telldir/seekdir

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)

RENAME_NOREPLACE = 1
RENAME_EXCHANGE = 2
AT_FDCWD = -100

_libc.renameat2.argtypes = [
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_int,
    ctypes.c_char_p,
    ctypes.c_uint,
]
_libc.renameat2.restype = ctypes.c_int


def renameat2(old: os.PathLike[str] | str, new: os.PathLike[str] | str, flags: int) -> None:
    """renameat2(2) on two paths; raises OSError."""
    if _libc.renameat2(AT_FDCWD, os.fsencode(old), AT_FDCWD, os.fsencode(new), flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), os.fspath(old), None, os.fspath(new))


class _Dirent(ctypes.Structure):  # glibc struct dirent on 64-bit Linux
    _fields_ = [
        ("d_ino", ctypes.c_uint64),
        ("d_off", ctypes.c_int64),
        ("d_reclen", ctypes.c_ushort),
        ("d_type", ctypes.c_ubyte),
        ("d_name", ctypes.c_char * 256),
    ]


_libc.opendir.argtypes = [ctypes.c_char_p]
_libc.opendir.restype = ctypes.c_void_p
_libc.readdir.argtypes = [ctypes.c_void_p]
_libc.readdir.restype = ctypes.POINTER(_Dirent)
_libc.telldir.argtypes = [ctypes.c_void_p]
_libc.telldir.restype = ctypes.c_long
_libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
_libc.seekdir.restype = None
_libc.rewinddir.argtypes = [ctypes.c_void_p]
_libc.rewinddir.restype = None
_libc.closedir.argtypes = [ctypes.c_void_p]
_libc.closedir.restype = ctypes.c_int

DT_NAMES = {1: "fifo", 2: "chr", 4: "dir", 6: "blk", 8: "file", 10: "symlink", 12: "sock"}


@dataclass(frozen=True)
class DirEntry:
    name: bytes
    ino: int
    type: int


class Dir:
    """A libc DIR* stream: readdir/telldir/seekdir/rewinddir exactly as C programs see them."""

    def __init__(self, path: os.PathLike[str] | str) -> None:
        ctypes.set_errno(0)
        self._d = _libc.opendir(os.fsencode(path))
        if not self._d:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), os.fspath(path))

    def read(self) -> DirEntry | None:
        ctypes.set_errno(0)
        p = _libc.readdir(self._d)
        if not p:
            e = ctypes.get_errno()
            if e:
                raise OSError(e, os.strerror(e))
            return None
        d = p.contents
        return DirEntry(d.d_name, d.d_ino, d.d_type)

    def read_all(self) -> list[DirEntry]:
        out = []
        while (e := self.read()) is not None:
            out.append(e)
        return out

    def read_all_with_positions(self) -> list[tuple[int, bytes]]:
        """(telldir before it, name) of each entry left to read."""
        out = []
        while True:
            pos = self.tell()
            if (e := self.read()) is None:
                return out
            out.append((pos, e.name))

    def tell(self) -> int:
        return int(_libc.telldir(self._d))

    def seek(self, pos: int) -> None:
        _libc.seekdir(self._d, pos)

    def rewind(self) -> None:
        _libc.rewinddir(self._d)

    def close(self) -> None:
        if self._d:
            _libc.closedir(self._d)
            self._d = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def readdir_names(path: os.PathLike[str] | str) -> list[bytes]:
    """All names one full pass of readdir returns, '.' and '..' included, in order."""
    with Dir(path) as d:
        return [e.name for e in d.read_all()]


# ---------------------------------------------------------------------------
# Small assertions


def errno_of(fn, *args, **kw) -> int | None:
    """Call fn; return the errno of the OSError it raised, or None if it returned."""
    try:
        fn(*args, **kw)
    except OSError as e:
        return e.errno
    return None


def assert_errno(expected: int, fn, *args, **kw) -> None:
    got = errno_of(fn, *args, **kw)
    assert got == expected, (
        f"{getattr(fn, '__name__', fn)}{args}: expected {errno.errorcode[expected]}, got "
        f"{errno.errorcode.get(got, got) if got else 'success'}"
    )


def is_whiteout(path: os.PathLike[str] | str) -> bool:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(0, 0)
