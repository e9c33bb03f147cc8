"""Helpers for the tests that run without real root: user namespaces and a plain user.

The suite runs as root; these helpers take the privilege away for real:

- `call` runs a function of a test module in a child process, optionally under
  ``unshare --user --map-root-user --mount`` (`USERNS`: root of a new user namespace,
  with no privilege outside it, as in rootless podman; a private mount namespace
  too) or ``unshare --mount`` (`MOUNTNS`: real root, private mounts), and optionally
  as another user. The function's return value (or its traceback) comes back pickled;
  a failure in the child raises `ChildFailed` here with the child's traceback.
- `host()`: the changes to the machine that running as a plain user needs, made once
  per session and always undone (`HostChanges`): the test user `unionfs-test` with
  subordinate ids, ``/dev/fuse`` mode 0666 (these machines start with 0600), and
  traverse permission (an ACL entry) on the directories above this interpreter
  (``/root`` is 0700 here). Each change is written down in ``/run/unionfs-tests``
  before it is made, so a session that was killed is undone by the next one.
- `isolated_run` (run in `MOUNTNS`): a program as the test user in a private mount
  namespace with some files bind-mounted over (``/etc/fuse.conf``, ``fusermount3``,
  ``/dev/fuse``), then what it left mounted or running there.
- `upper_format`, `trusted_xattrs`: what an upper holds on disk, for comparing the
  format unionmount writes with the kernel's.

Programs run here: unshare, mount, umount (util-linux, mount), useradd, usermod,
userdel (passwd), getfacl, setfacl (acl), fusermount3 (fuse3).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import pickle
import pwd
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from mounts import force_unmount, kill_all, mounts_under, pid_alive, pids_mentioning

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

USERNS = ("unshare", "--user", "--map-root-user", "--mount")
"""Root of a new user namespace (only uid/gid 0 mapped, to the caller) with private mounts."""
MOUNTNS = ("unshare", "--mount")
"""Real root, in a private mount namespace (what is mounted there vanishes with it)."""

KERNEL_USERXATTR = "userxattr"
"""Kernel overlayfs options in a user namespace: there index falls back to off (file
handles need CAP_DAC_READ_SEARCH) and redirect_dir can only be nofollow."""

CALL_TIMEOUT = 300
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


class ChildFailed(AssertionError):
    """The function run by `call` raised, or the child died or timed out."""


# ---------------------------------------------------------------------------------------------
# Running a function in a child (in a namespace, as another user)

_BOOT = """\
import importlib, pickle, sys, traceback
sys.path[:0] = [{tests!r}, {repo!r}]
payload, result = sys.argv[1:3]
try:
    with open(payload, "rb") as f:
        target, args = pickle.load(f)
    module, _, name = target.partition(":")
    value = ("ok", getattr(importlib.import_module(module), name)(*args))
except BaseException:
    value = ("error", traceback.format_exc())
with open(result, "wb") as f:
    pickle.dump(value, f)
"""

_calls = iter(range(1 << 30))


def call(
    target: str,
    *args: Any,
    scratch: Path,
    prefix: Sequence[str] = (),
    user: User | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = CALL_TIMEOUT,
) -> Any:
    """Run ``module:function(*args)`` in a child ``PREFIX... python -c BOOT`` and return its
    value. ``scratch`` holds the pickled arguments and result (the child's user must be able
    to write there). Raises ChildFailed with the child's traceback and stderr."""
    n = next(_calls)
    stem = scratch / f".call-{os.getpid()}-{n}"
    payload, result = stem.with_suffix(".in"), stem.with_suffix(".out")
    with open(payload, "wb") as f:
        pickle.dump((target, args), f)
    argv = [*prefix, sys.executable, "-c", _BOOT.format(tests=str(TESTS), repo=str(REPO)),
            str(payload), str(result)]
    if user is not None:
        os.chown(payload, user.uid, user.gid)
    try:
        if env is None and user is not None:
            env = user_env(user)
        rc, out, err = run_group(argv, user=user, env=env, timeout=timeout)
        if not result.exists():
            raise ChildFailed(f"{target} in {' '.join(prefix) or 'a child'}: exited {rc} "
                              f"without a result\nstdout:\n{out[-2000:]}\n"
                              f"stderr:\n{err[-4000:]}")
        with open(result, "rb") as f:
            status, value = pickle.load(f)
    finally:
        for p in (payload, result):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    if status == "error":
        raise ChildFailed(f"{target} in {' '.join(prefix) or 'a child'} failed:\n{value}"
                          + (f"\nstderr:\n{err[-3000:]}" if err.strip() else ""))
    return value


def run_group(
    argv: Sequence[str | os.PathLike[str]],
    *,
    user: User | None = None,
    env: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    timeout: float = CALL_TIMEOUT,
    input: str | None = None,
) -> tuple[int, str, str]:
    """Run argv (as ``user`` if given) in its own session; kill the whole group on a
    timeout and raise ChildFailed. Returns (exit status, stdout, stderr)."""
    ids: dict[str, Any] = {}
    if user is not None:
        ids = {"user": user.uid, "group": user.gid, "extra_groups": []}
    proc = subprocess.Popen(
        [os.fspath(a) for a in argv], stdin=subprocess.PIPE if input is not None
        else subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True, **ids)
    try:
        out, err = proc.communicate(input, timeout=timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = "", "(output lost: a grandchild holds the pipes)"
        raise ChildFailed(f"timed out after {timeout}s: {' '.join(map(str, argv))[:300]}\n"
                          f"stdout:\n{out[-2000:]}\nstderr:\n{err[-2000:]}") from None
    return proc.returncode, out, err


def user_env(user: User, **extra: str) -> dict[str, str]:
    """A plain environment for the test user (PYTHONPATH is passed on: it may pin the
    checkout under test)."""
    env = {"PATH": SYSTEM_PATH, "HOME": str(user.home), "LANG": "C.UTF-8",
           "USER": user.name, "LOGNAME": user.name, "PYTHONDONTWRITEBYTECODE": "1"}
    if os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.environ["PYTHONPATH"]
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------------
# Inside a user namespace


def userns_facts(scratch: str) -> dict[str, Any]:
    """What root of this namespace may do (run in USERNS): the id maps, and the errno (or
    None) of a trusted xattr, a whiteout device and a real device node made in ``scratch``."""

    def attempt(fn: Any) -> str | None:
        try:
            fn()
        except OSError as e:
            return errno.errorcode.get(e.errno, str(e.errno))
        return None

    d = Path(scratch)
    f = d / "probe"
    f.write_bytes(b"")
    facts = {
        "uid_map": Path("/proc/self/uid_map").read_text().split(),
        "gid_map": Path("/proc/self/gid_map").read_text().split(),
        "euid": os.geteuid(),
        "trusted_xattr": attempt(lambda: os.setxattr(f, "trusted.overlay.opaque", b"y")),
        "user_xattr": attempt(lambda: os.setxattr(f, "user.overlay.opaque", b"y")),
        "whiteout_mknod": attempt(lambda: os.mknod(d / "wh", stat.S_IFCHR, os.makedev(0, 0))),
        "device_mknod": attempt(lambda: os.mknod(d / "null", stat.S_IFCHR, os.makedev(1, 3))),
        "dev_fuse": attempt(lambda: os.close(os.open("/dev/fuse", os.O_RDWR))),
    }
    return facts


# ---------------------------------------------------------------------------------------------
# What an upper holds

IGNORED_OVERLAY_XATTRS = frozenset({"origin", "impure", "uuid", "nlink", "upper"})
"""Kernel bookkeeping that says nothing about the tree (file handles of the lower origin,
"this directory holds copied-up entries", the layer uuid, index link counts)."""


def _overlay_xattr(name: str) -> str | None:
    """``user.overlay.opaque`` -> "opaque" for the union xattrs of any namespace."""
    for prefix in ("trusted.overlay.", "user.overlay."):
        if name.startswith(prefix):
            return name[len(prefix):]
    return None


def upper_format(root: os.PathLike[str] | str) -> dict[str, str]:
    """{relpath: description} of everything under an upper (never following a symlink):
    type, mode, owner, device numbers, data digest, symlink target, and every xattr but
    the kernel's bookkeeping (IGNORED_OVERLAY_XATTRS) with its namespace, so the
    descriptions of a kernel upper and one unionmount wrote compare. Link counts and
    times are left out."""
    out: dict[str, str] = {}
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            p = os.path.join(dirpath, name)
            rel = os.path.relpath(p, root)
            st = os.lstat(p)
            kind = stat.S_IFMT(st.st_mode)
            desc = (f"{_TYPE.get(kind, oct(kind))} {stat.S_IMODE(st.st_mode):04o} "
                    f"{st.st_uid}:{st.st_gid}")
            if stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                desc += f" rdev={os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
            elif stat.S_ISREG(kind):
                with open(p, "rb") as f:
                    desc += f" size={st.st_size} sha={hashlib.sha256(f.read()).hexdigest()[:16]}"
            elif stat.S_ISLNK(kind):
                desc += f" -> {os.readlink(p)}"
            xattrs = []
            for x in sorted(os.listxattr(p, follow_symlinks=False)):
                short = _overlay_xattr(x)
                if short is not None and short in IGNORED_OVERLAY_XATTRS:
                    continue
                if x.startswith("security."):
                    continue
                xattrs.append(f"{x}={os.getxattr(p, x, follow_symlinks=False)!r}")
            if xattrs:
                desc += " [" + " ".join(xattrs) + "]"
            out[rel] = desc
    return out


_TYPE = {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink",
         stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFIFO: "fifo", stat.S_IFSOCK: "sock"}


def trusted_xattrs(root: os.PathLike[str] | str) -> list[str]:
    """``relpath: name`` of every trusted.* xattr under ``root`` (read as real root)."""
    found = []
    root = os.fspath(root)
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames + ([] if dirpath != root else ["."]):
            p = os.path.join(dirpath, name) if name != "." else root
            for x in os.listxattr(p, follow_symlinks=False):
                if x.startswith("trusted."):
                    found.append(f"{os.path.relpath(p, root)}: {x}")
    return sorted(found)


def format_diff(ours: Mapping[str, str], ref: Mapping[str, str]) -> str:
    lines = []
    for p in sorted(set(ours) | set(ref)):
        if ours.get(p) != ref.get(p):
            lines.append(f"{p}\n    unionmount: {ours.get(p)}\n    kernel:     {ref.get(p)}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# POSIX ACLs as xattrs (system.posix_acl_access / _default), without getfacl

ACL_USER_OBJ, ACL_USER, ACL_GROUP_OBJ, ACL_GROUP, ACL_MASK, ACL_OTHER = 1, 2, 4, 8, 16, 32
_ACL_TAGS = {ACL_USER_OBJ: "user", ACL_USER: "user", ACL_GROUP_OBJ: "group",
             ACL_GROUP: "group", ACL_MASK: "mask", ACL_OTHER: "other"}
_NO_ID = 0xFFFFFFFF


def parse_acl(raw: bytes) -> list[str]:
    """The entries of an ACL xattr as getfacl -n prints them (``user:1007:rw-``)."""
    version = int.from_bytes(raw[:4], "little")
    assert version == 2, f"ACL xattr version {version}"
    out = []
    for i in range(4, len(raw), 8):
        tag = int.from_bytes(raw[i:i + 2], "little")
        perm = int.from_bytes(raw[i + 2:i + 4], "little")
        ident = int.from_bytes(raw[i + 4:i + 8], "little")
        who = "" if tag not in (ACL_USER, ACL_GROUP) else str(ident)
        bits = "".join(c if perm & b else "-" for c, b in (("r", 4), ("w", 2), ("x", 1)))
        out.append(f"{_ACL_TAGS[tag]}:{who}:{bits}")
    return out


def make_acl(entries: Sequence[tuple[int, int | None, int]]) -> bytes:
    """An ACL xattr from (tag, id or None, perm bits) entries, sorted as the kernel wants."""
    raw = (2).to_bytes(4, "little")
    for tag, ident, perm in sorted(entries, key=lambda e: (e[0], e[1] or 0)):
        raw += tag.to_bytes(2, "little") + perm.to_bytes(2, "little")
        raw += (_NO_ID if ident is None else ident).to_bytes(4, "little")
    return raw


# ---------------------------------------------------------------------------------------------
# The test user and the host changes a plain user needs

TEST_USER = "unionfs-test"
USER_COMMENT = "unionfs tests (made and removed by the test session)"
SUBID_START, SUBID_COUNT = 100000, 65536
STATE_DIR = Path("/run/unionfs-tests")


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: Path
    """A directory of the session's, owned by the user (its passwd entry says /nonexistent)."""


def _checked(argv: Sequence[str], timeout: float = 120) -> str:
    rc, out, err = run_group(argv, timeout=timeout)
    if rc != 0:
        raise ChildFailed(f"$ {' '.join(argv)}\n-> exit {rc}\n{err.strip()}")
    return out


def _subid_lines(path: str) -> list[list[str]]:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return []
    return [line.split(":") for line in text.splitlines() if line.count(":") == 2]


class HostChanges:
    """Every change to the machine the plain-user tests need, undone by `restore`.

    One instance per process (see `host`); an flock on STATE_DIR/lock keeps two test
    sessions from changing the same things at once (the second waits)."""

    def __init__(self, base: Path) -> None:
        STATE_DIR.mkdir(mode=0o700, exist_ok=True)
        self._lock = os.open(STATE_DIR / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ChildFailed(f"another test session holds {STATE_DIR}/lock") from None
                time.sleep(1)
        self.recover()
        self.base = base
        self.user: User | None = None

    # -- recording and undoing

    def _record(self, kind: str, data: dict[str, Any]) -> Path:
        path = STATE_DIR / f"{kind}-{hashlib.sha256(json.dumps(data).encode()).hexdigest()[:12]}"
        path.write_text(json.dumps({"kind": kind, **data}))
        return path

    def recover(self) -> list[str]:
        """Undo what a killed session left recorded; returns what was undone."""
        undone = []
        for rec in sorted(STATE_DIR.glob("*-*")):
            data = json.loads(rec.read_text())
            self._undo(data)
            undone.append(data["kind"])
            rec.unlink()
        return undone

    def _undo(self, data: dict[str, Any]) -> None:
        kind = data["kind"]
        if kind == "chmod":
            os.chmod(data["path"], data["mode"])
        elif kind == "acl":
            _checked(["setfacl", f"--restore={data['saved']}"])
            Path(data["saved"]).unlink()
        elif kind == "user":
            _remove_user(data["name"])
        else:
            raise ValueError(f"unknown record {data}")

    def restore(self) -> None:
        """Undo everything, the last change first. Raises after trying all of them."""
        problems = []
        for rec in sorted(STATE_DIR.glob("*-*"), key=lambda p: p.stat().st_mtime_ns, reverse=True):
            data = json.loads(rec.read_text())
            try:
                self._undo(data)
                rec.unlink()
            except Exception as e:  # noqa: BLE001 - try the others, then report
                problems.append(f"{data}: {e}")
        with contextlib.suppress(OSError):
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            os.close(self._lock)
        if problems:
            raise ChildFailed("could not undo: " + "; ".join(problems))

    # -- the changes

    def make_user(self) -> User:
        """The test user with SUBID_COUNT subordinate uids and gids at SUBID_START, and a
        home under the session's base directory. Removed (with its processes) by `restore`."""
        try:
            pw = pwd.getpwnam(TEST_USER)
        except KeyError:
            self._record("user", {"name": TEST_USER})
            _checked(["useradd", "--system", "--user-group", "--no-create-home",
                      "--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin",
                      "--comment", USER_COMMENT, TEST_USER])
            pw = pwd.getpwnam(TEST_USER)
        else:
            if pw.pw_gecos != USER_COMMENT:
                raise ChildFailed(f"a user {TEST_USER} exists that the tests did not make")
            self._record("user", {"name": TEST_USER})
        end = SUBID_START + SUBID_COUNT - 1
        for path in ("/etc/subuid", "/etc/subgid"):
            for name, start, count in _subid_lines(path):
                s, c = int(start), int(count)
                if name != TEST_USER and s <= end and SUBID_START < s + c:
                    raise ChildFailed(f"{path}: {name} holds {s}-{s + c - 1}, which overlaps "
                                      f"the test range {SUBID_START}-{end}")
        ours = [TEST_USER, str(SUBID_START), str(SUBID_COUNT)]
        if ours not in _subid_lines("/etc/subuid") or ours not in _subid_lines("/etc/subgid"):
            _checked(["usermod", "--add-subuids", f"{SUBID_START}-{end}",
                      "--add-subgids", f"{SUBID_START}-{end}", TEST_USER])
        home = self.base / "home"
        home.mkdir(exist_ok=True)
        os.chown(home, pw.pw_uid, pw.pw_gid)
        os.chmod(home, 0o700)
        self.user = User(TEST_USER, pw.pw_uid, pw.pw_gid, home)
        return self.user

    def chmod(self, path: str, mode: int) -> None:
        """chmod ``path`` now, back to its mode at the first call at the end."""
        current = stat.S_IMODE(os.stat(path).st_mode)
        if not any(json.loads(r.read_text()).get("path") == path
                   for r in STATE_DIR.glob("chmod-*")):
            self._record("chmod", {"path": path, "mode": current})
        os.chmod(path, mode)

    def grant_traverse(self, user: User, targets: Sequence[str | os.PathLike[str]]) -> list[str]:
        """Let ``user`` reach each target: an ACL entry ``u:USER:x`` on every directory above
        it the user cannot search (by its mode bits), undone with the ACL saved before.
        Returns the directories changed."""
        changed: list[str] = []
        for target in targets:
            path = Path(os.path.realpath(target))
            for d in [*reversed(path.parents), *([path] if path.is_dir() else [])]:
                st = os.stat(d)
                if _may_search(st, user) or str(d) in changed:
                    continue
                saved = STATE_DIR / f"saved.{hashlib.sha256(str(d).encode()).hexdigest()[:12]}"
                saved.write_text(_checked(["getfacl", "--absolute-names", "-p", str(d)]))
                self._record("acl", {"path": str(d), "saved": str(saved)})
                _checked(["setfacl", "-m", f"u:{user.name}:x", str(d)])
                changed.append(str(d))
        return changed


def _may_search(st: os.stat_result, user: User) -> bool:
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def user_pids(uid: int) -> list[int]:
    """Processes whose real uid is ``uid`` (all started by this session for the test user)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/status") as f:
                for line in f:
                    if line.startswith("Uid:"):
                        if int(line.split()[1]) == uid:
                            found.append(int(name))
                        break
        except OSError:
            continue
    return found


def _remove_user(name: str) -> None:
    """Kill the user's processes (each by its pid), remove its subordinate ids and itself."""
    try:
        pw = pwd.getpwnam(name)
    except KeyError:
        return
    if pw.pw_gecos != USER_COMMENT:
        raise ChildFailed(f"not removing {name}: the tests did not make it")
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in user_pids(pw.pw_uid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 10
        while user_pids(pw.pw_uid) and time.monotonic() < deadline:
            time.sleep(0.1)
    for path, flag in (("/etc/subuid", "--del-subuids"), ("/etc/subgid", "--del-subgids")):
        for n, start, count in _subid_lines(path):
            if n == name:
                _checked(["usermod", flag, f"{start}-{int(start) + int(count) - 1}", name])
    _checked(["userdel", name])


_host: HostChanges | None = None
_host_users = 0


@contextlib.contextmanager
def host() -> Iterator[HostChanges]:
    """The session's HostChanges with the test user, /dev/fuse open to everyone and this
    interpreter and checkout reachable by the user; shared by every module that enters it,
    undone when the last one leaves."""
    global _host, _host_users
    if _host is None:
        base = Path(tempfile.mkdtemp(prefix="unionfs-rootless-", dir="/tmp"))
        os.chmod(base, 0o755)
        h = HostChanges(base)
        try:
            user = h.make_user()
            h.chmod("/dev/fuse", 0o666)
            imports = [p for p in sys.path if p.startswith("/") and os.path.isdir(p)]
            h.grant_traverse(user, [sys.executable, sys.prefix, sys.base_prefix, REPO, *imports])
        except BaseException:
            h.restore()
            shutil.rmtree(base, ignore_errors=True)
            raise
        _host = h
    _host_users += 1
    try:
        yield _host
    finally:
        _host_users -= 1
        if _host_users == 0:
            h, _host = _host, None
            try:
                _cleanup_base(h.base)
            finally:
                h.restore()


def _cleanup_base(base: Path) -> None:
    for mnt in sorted(mounts_under(base), key=len, reverse=True):
        force_unmount(mnt)
    kill_all(pids_mentioning(base))
    shutil.rmtree(base, ignore_errors=True)


def user_dir(h: HostChanges, name: str) -> Path:
    """A fresh directory ``BASE/NAME`` owned by the test user (mode 0755)."""
    assert h.user is not None
    d = h.base / name
    if d.exists():
        shutil.rmtree(d)
    d.mkdir(mode=0o755)
    os.chown(d, h.user.uid, h.user.gid)
    return d


def chown_tree(root: Path, user: User) -> None:
    os.chown(root, user.uid, user.gid, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), user.uid, user.gid, follow_symlinks=False)


# ---------------------------------------------------------------------------------------------
# A program as the test user in a private mount namespace (run in MOUNTNS as real root)


@dataclasses.dataclass(frozen=True)
class Isolated:
    """What `isolated_run` saw."""

    returncode: int
    stdout: str
    stderr: str
    mounted: list[str]
    """Mounts under ``watch`` in the namespace right after the program returned."""
    running: list[int]
    """Processes naming ``watch`` in their arguments still alive then."""


def isolated_run(
    argv: list[str],
    uid: int,
    gid: int,
    env: dict[str, str],
    watch: str,
    binds: Sequence[tuple[str, str]] = (),
    tmpfs: Sequence[str] = (),
    timeout: float = 120,
) -> Isolated:
    """Bind each (source, target) and mount an empty tmpfs on each ``tmpfs`` path, then run
    ``argv`` as uid/gid; report what it left under ``watch`` and clean that up. Meant to run
    in MOUNTNS: the binds are private to the namespace and vanish with it."""
    for src, dst in binds:
        _checked(["mount", "--bind", src, dst])
    for dst in tmpfs:
        _checked(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", dst])
    # No external program may be needed from here on: /usr/bin may be hidden.
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, user=uid, group=gid,
                            extra_groups=[], start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        err += f"\n(killed after {timeout}s)"
    mounted = mounts_under(watch)
    running = [p for p in pids_mentioning(watch) if pid_alive(p)]
    for dst in reversed(tmpfs):  # umount(8) may be under one of them: the syscall
        if _libc.umount2(os.fsencode(dst), 2) != 0:  # MNT_DETACH
            raise OSError(ctypes.get_errno(), f"umount2 {dst}")
    for mnt in sorted(mounted, key=len, reverse=True):
        with contextlib.suppress(Exception):
            force_unmount(mnt)
    kill_all(running)
    return Isolated(proc.returncode, out, err, mounted, running)
