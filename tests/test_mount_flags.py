"""Mount flags: what `mount -t overlay` does with suid, dev, exec, ro and the atime/sync
options, the union does too: as root, setuid programs, file capabilities and device nodes
work unless the mount says nosuid or nodev; every flag asked for shows in /proc/mounts and
is enforced by the kernel.

Each test runs on kernel overlayfs (the reference) and on unionfs with the same option.
The programs run are a static C program (built here with gcc) that prints its effective
uid and capabilities, run as nobody through setpriv (util-linux).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple

import pytest
from mounts import (
    OVERLAY_OPTS,
    File,
    Mount,
    assert_errno,
    build,
    errno_of,
    file_digest,
    mount_kernel,
    mount_unionfs,
)

pytestmark = pytest.mark.usefixtures("mount_guard")

NOBODY = 65534
EUID_C = r"""
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int main(void) {
    char line[256], eff[64] = "?";
    FILE *status = fopen("/proc/self/status", "r");
    while (status != NULL && fgets(line, sizeof line, status) != NULL)
        if (strncmp(line, "CapEff:", 7) == 0)
            sscanf(line + 7, "%63s", eff);
    printf("euid=%d capeff=%s\n", (int)geteuid(), eff);
    return 0;
}
"""
CAP_NET_RAW = 13
NET_RAW_ONLY = f"{1 << CAP_NET_RAW:016x}"
"""CapEff of a process whose only capability is cap_net_raw, as /proc prints it."""


def _file_caps(*caps: int) -> bytes:
    """A security.capability value (VFS_CAP_REVISION_2, effective) granting ``caps``."""
    permitted = sum(1 << c for c in caps)
    return struct.pack("<5I", 0x02000000 | 0x000001, permitted, 0, 0, 0)


@pytest.fixture(scope="module")
def euid_program(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A static program printing ``euid=N capeff=HEX``: it runs from any layer."""
    d = tmp_path_factory.mktemp("euid")
    (d / "euid.c").write_text(EUID_C)
    r = subprocess.run(["gcc", "-static", "-O2", "-o", str(d / "euid"), str(d / "euid.c")],
                       capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"gcc -static failed (gcc and libc6-dev installed?): {r.stderr}"
    return d / "euid"


@pytest.fixture
def lower(tmp_path: Path, euid_program: Path) -> Path:
    """sid: setuid root; fcap: cap_net_raw+ep; plain: 0755; null: char 1:3 like /dev/null."""
    root = build(tmp_path / "lower", {"f": File(b"data", mode=0o644), "d/g": "g"})
    for name, mode in (("sid", 0o4755), ("fcap", 0o755), ("plain", 0o755)):
        shutil.copyfile(euid_program, root / name)
        os.chown(root / name, 0, 0)
        os.chmod(root / name, mode)  # after chown, which clears the set-id bits
    os.setxattr(root / "fcap", "security.capability", _file_caps(CAP_NET_RAW))
    os.mknod(root / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(root / "null", 0o666)
    return root


MountWith = Callable[..., Mount]


@pytest.fixture
def mount_with(backend: str, tmp_path: Path) -> Iterator[MountWith]:
    """Factory: ``mount_with(lower, "opt1,opt2")`` mounts ``lower`` with an upper on
    ``backend`` with those mount options (kernel: added to ``mount -t overlay -o``;
    unionfs: ``unionmount -o``). Unmounted at teardown; a unionfs log must stay clean."""
    made: list[Mount] = []

    def factory(lower: Path, opts: str = "", name: str = "mnt") -> Mount:
        upper, work, mnt = tmp_path / f"{name}.upper", tmp_path / f"{name}.work", tmp_path / name
        if backend == "kernel":
            m = mount_kernel([lower], upper, work, mnt,
                             opts=f"{OVERLAY_OPTS},{opts}" if opts else OVERLAY_OPTS)
        else:
            m = mount_unionfs([lower], upper, work, mnt, tmp_path / f"{name}.log",
                              ["-o", opts] if opts else [])
        made.append(m)
        return m

    yield factory
    for m in made:
        m.unmount()
    for m in made:
        m.assert_log_clean()


def mount_flags(mnt: Path) -> list[str]:
    """The options of the mount on ``mnt`` as /proc/self/mounts shows them (field 4: the
    mount's and the superblock's flags, then the filesystem's options)."""
    found = None
    with open("/proc/self/mounts") as f:
        for line in f:
            fields = line.split()
            if fields[1] == os.path.abspath(mnt):
                found = fields[3].split(",")  # the last one: the mount on top
    assert found is not None, f"{mnt} is not in /proc/self/mounts"
    return found


def run_as_nobody(mnt: Path, name: str) -> str:
    """Run ``./name`` in ``mnt`` as uid/gid 65534 without groups; its output.

    The cwd is entered as root, so nobody needs no search right on the test's
    0700 temp dirs above the mount."""
    r = subprocess.run(
        ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", f"./{name}"],
        cwd=mnt, capture_output=True, text=True, timeout=30, check=False)
    assert r.returncode == 0, f"./{name} as nobody: exit {r.returncode}: {r.stderr}"
    return r.stdout.strip()


def _write_device(path: Path) -> bytes:
    """Open the device node for read and write, write to it, read from it."""
    fd = os.open(path, os.O_RDWR)
    try:
        assert os.write(fd, b"through the union\n") == 18
        return os.read(fd, 10)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# suid, dev, exec: allowed by default


@pytest.mark.parametrize("opts", ["", "suid,dev", "exec"])
def test_setuid_and_file_caps_work_by_default(
    mount_with: MountWith, lower: Path, opts: str
) -> None:
    m = mount_with(lower, opts)
    flags = mount_flags(m.mnt)
    for flag in ("nosuid", "nodev", "noexec", "ro"):
        assert flag not in flags, f"{flag} in {flags}"
    assert run_as_nobody(m.mnt, "plain") == f"euid={NOBODY} capeff={0:016x}"
    assert run_as_nobody(m.mnt, "sid").startswith("euid=0 "), "setuid root was not honoured"
    assert run_as_nobody(m.mnt, "fcap") == f"euid={NOBODY} capeff={NET_RAW_ONLY}", (
        "the file capability was not honoured")
    # A copied-up setuid program (chown and chmod again, which the kernel allows root)
    # keeps working from the upper.
    os.chown(m / "sid", 0, 0)
    os.chmod(m / "sid", 0o4755)
    assert stat.S_IMODE(os.stat(m.upper / "sid").st_mode) == 0o4755
    assert run_as_nobody(m.mnt, "sid").startswith("euid=0 ")


@pytest.mark.parametrize("opts", ["", "dev"])
def test_device_nodes_work_by_default(mount_with: MountWith, lower: Path, opts: str) -> None:
    m = mount_with(lower, opts)
    assert "nodev" not in mount_flags(m.mnt)
    assert _write_device(m / "null") == b""
    os.mknod(m / "null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert _write_device(m / "null2") == b""
    assert os.stat(m.upper / "null2").st_rdev == os.makedev(1, 3)
    # Writing to a device changes no layer.
    assert not (m.upper / "null").exists()


# ---------------------------------------------------------------------------
# nosuid, nodev, noexec: shown and enforced


def test_nosuid(mount_with: MountWith, lower: Path) -> None:
    m = mount_with(lower, "nosuid")
    flags = mount_flags(m.mnt)
    assert "nosuid" in flags and "nodev" not in flags, flags
    assert run_as_nobody(m.mnt, "sid") == f"euid={NOBODY} capeff={0:016x}"
    assert run_as_nobody(m.mnt, "fcap") == f"euid={NOBODY} capeff={0:016x}"
    assert _write_device(m / "null") == b"", "nosuid alone must leave devices usable"


def test_nodev(mount_with: MountWith, lower: Path) -> None:
    m = mount_with(lower, "nodev")
    flags = mount_flags(m.mnt)
    assert "nodev" in flags and "nosuid" not in flags, flags
    assert_errno(errno.EACCES, os.open, m / "null", os.O_RDWR)
    assert_errno(errno.EACCES, os.open, m / "null", os.O_RDONLY)
    # Making a device node is still allowed; opening it is not.
    os.mknod(m / "null2", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    assert_errno(errno.EACCES, os.open, m / "null2", os.O_WRONLY)
    assert run_as_nobody(m.mnt, "sid").startswith("euid=0 "), "nodev alone must leave suid"


def test_noexec(mount_with: MountWith, lower: Path) -> None:
    m = mount_with(lower, "noexec")
    flags = mount_flags(m.mnt)
    assert "noexec" in flags, flags
    for name in ("plain", "sid"):
        got = errno_of(subprocess.run, [str(m / name)], capture_output=True, timeout=30)
        assert got == errno.EACCES, f"exec {name}: {errno.errorcode.get(got, got)}"
    # Also a program made on the mount itself.
    shutil.copyfile(m / "plain", m / "new")
    os.chmod(m / "new", 0o755)
    got = errno_of(subprocess.run, [str(m / "new")], capture_output=True, timeout=30)
    assert got == errno.EACCES, f"exec new: {errno.errorcode.get(got, got)}"
    # Reading the program is still fine.
    assert file_digest(m / "plain") == file_digest(lower / "plain")


# ---------------------------------------------------------------------------
# ro with an upper: the kernel refuses every change, nothing is written


class Entry(NamedTuple):
    mode: int
    uid: int
    gid: int
    size: int
    nlink: int | None
    rdev: int
    mtime_ns: int
    ctime_ns: int | None
    xattrs: tuple[tuple[str, bytes], ...]
    content: bytes | str | None


def _state(root: Path) -> dict[str, Entry]:
    """Everything about every entry under ``root`` (itself included): type and mode,
    owner, size, link count, device, mtime and ctime, all xattrs, data or target."""
    out: dict[str, Entry] = {}

    def visit(path: Path, rel: str) -> None:
        st = os.lstat(path)
        xattrs = tuple(sorted((n, os.getxattr(path, n, follow_symlinks=False))
                              for n in os.listxattr(path, follow_symlinks=False)))
        content: bytes | str | None = None
        if stat.S_ISREG(st.st_mode):
            content = path.read_bytes()
        elif stat.S_ISLNK(st.st_mode):
            content = os.readlink(path)
        out[rel] = Entry(st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_rdev,
                         st.st_mtime_ns, st.st_ctime_ns, xattrs, content)
        if stat.S_ISDIR(st.st_mode):
            for name in sorted(os.listdir(path)):
                visit(path / name, f"{rel}/{name}")

    visit(root, ".")
    return out


def _state_diff(before: dict[str, Entry], after: dict[str, Entry]) -> list[str]:
    return [f"{k}: {before.get(k)} -> {after.get(k)}"
            for k in sorted(before.keys() | after.keys()) if before.get(k) != after.get(k)]


def _unshared(state: dict[str, Entry]) -> dict[str, Entry]:
    """``state`` without the link count and ctime of whiteouts (char 0/0)."""
    return {rel: e._replace(nlink=None, ctime_ns=None)
            if stat.S_ISCHR(e.mode) and e.rdev == 0 else e for rel, e in state.items()}


def _open_close(path: Path, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


def test_read_only_with_an_upper_writes_nothing(
    mount_with: MountWith, lower: Path, backend: str
) -> None:
    # A first, writable mount leaves an upper with a copy-up, a new file and a whiteout.
    m = mount_with(lower, "")
    with open(m / "f", "ab") as f:
        f.write(b"+more")
    (m / "new").write_bytes(b"new")
    os.unlink(m / "d" / "g")
    m.unmount()
    assert m.upper is not None and m.workdir is not None
    upper_before, work_before = _state(m.upper), _state(m.workdir)

    m = mount_with(lower, "ro")
    flags = mount_flags(m.mnt)
    assert flags[0] == "ro", flags
    assert (m / "f").read_bytes() == b"data+more" and (m / "new").read_bytes() == b"new"
    assert os.listdir(m / "d") == []
    changes = {
        "create": lambda: _open_close(m / "created", os.O_WRONLY | os.O_CREAT),
        "write a lower file": lambda: _open_close(m / "plain", os.O_WRONLY),
        "write an upper file": lambda: _open_close(m / "new", os.O_WRONLY | os.O_APPEND),
        "truncate": lambda: os.truncate(m / "f", 0),
        "chmod": lambda: os.chmod(m / "plain", 0o700),
        "chown": lambda: os.chown(m / "plain", 1, 1),
        "utime": lambda: os.utime(m / "plain", (0, 0)),
        "setxattr": lambda: os.setxattr(m / "plain", "user.k", b"v"),
        "unlink a lower file": lambda: os.unlink(m / "plain"),
        "unlink an upper file": lambda: os.unlink(m / "new"),
        "mkdir": lambda: os.mkdir(m / "dir"),
        "rmdir": lambda: os.rmdir(m / "d"),
        "rename": lambda: os.rename(m / "new", m / "renamed"),
        "symlink": lambda: os.symlink("f", m / "link"),
        "mknod": lambda: os.mknod(m / "fifo", stat.S_IFIFO | 0o644),
        "link": lambda: os.link(m / "f", m / "hard"),
    }
    wrong = {what: errno.errorcode.get(got, got) if got else "success"
             for what, fn in changes.items() if (got := errno_of(fn)) != errno.EROFS}
    assert not wrong, f"expected EROFS: {wrong}"
    m.unmount()

    upper_after = _state(m.upper)
    if backend == "kernel":
        # The kernel makes whiteouts as hard links of one in its workdir, which it
        # removes at the next mount: their link count and ctime change, nothing else.
        upper_before, upper_after = _unshared(upper_before), _unshared(upper_after)
    diff = _state_diff(upper_before, upper_after)
    assert not diff, "the read-only mount changed the upper:\n" + "\n".join(diff)
    if backend == "unionfs":
        # The kernel rebuilds its workdir's work/ even on a read-only mount; unionfs
        # writes nothing at all.
        diff = _state_diff(work_before, _state(m.workdir))
        assert not diff, "the read-only mount changed the workdir:\n" + "\n".join(diff)


# ---------------------------------------------------------------------------
# atime, sync and symlink options: shown in /proc/mounts as the kernel shows them
#
# libfuse 3.14 passes ro, nosuid, nodev, noexec, sync, dirsync and noatime to mount(2);
# unionmount sets strictatime, nodiratime and nosymfollow on the new mount itself
# (mount_setattr). Not here: lazytime, a superblock flag FUSE cannot take.

_GENERIC = {"ro", "rw", "sync", "dirsync", "noatime", "relatime", "nodiratime",
            "nosymfollow", "nosuid", "nodev", "noexec"}


@pytest.mark.parametrize(("opt", "shown"), [
    ("noatime", {"rw", "noatime"}),
    ("sync", {"rw", "sync", "relatime"}),
    ("dirsync", {"rw", "dirsync", "relatime"}),
    ("nodiratime", {"rw", "nodiratime", "relatime"}),
    ("strictatime", {"rw"}),  # no atime flag at all: strict
    ("nosymfollow", {"rw", "relatime", "nosymfollow"}),
    ("relatime", {"rw", "relatime"}),
    ("noatime,relatime", {"rw", "noatime"}),  # noatime wins over relatime
    ("noatime,atime", {"rw", "relatime"}),  # the last of two opposites wins
    ("noatime,strictatime", {"rw"}),  # strictatime wins over noatime
])
def test_atime_and_sync_options_show(mount_with: MountWith, lower: Path, opt: str,
                                     shown: set[str]) -> None:
    m = mount_with(lower, opt)
    flags = mount_flags(m.mnt)
    assert set(flags) & _GENERIC == shown, flags
    (m / "w").write_bytes(b"still writable")
    assert (m.upper / "w").read_bytes() == b"still writable"


def test_nosymfollow_is_enforced(mount_with: MountWith, lower: Path) -> None:
    m = mount_with(lower, "nosymfollow")
    os.symlink("plain", m / "to-plain")
    assert os.readlink(m / "to-plain") == "plain"
    with pytest.raises(OSError) as raised:
        open(m / "to-plain", "rb").close()
    assert raised.value.errno == errno.ELOOP
