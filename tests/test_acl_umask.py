"""The mode (and ACL, group) of new files, directories and nodes, for umasks 000, 022 and
077, in plain and setgid directories with and without a default ACL.

POSIX: the umask applies unless the parent has a default ACL, which then gives the new
entry's ACL, its mask narrowed by the mode asked for. Kernel overlayfs (the reference)
behaves as a local directory does. So does unionfs with FUSE_DONT_MASK (pyfuse3 patch 0002:
the daemon gets the mode before the umask and applies the umask itself). With a stock
pyfuse3 the kernel applies the umask before the daemon sees the mode, so under a default
ACL the result is that of the mode already masked (a known limitation, README "pyfuse3
patches"); the test expects exactly that there, and checks that the two outcomes differ.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from mounts import Mount, build

from unionfs import fusecaps

pytestmark = pytest.mark.usefixtures("mount_guard")

UnionFactory = Callable[..., Mount]
DEFAULT_ACL = "u::rwx,g::rwx,o::r-x,u:1234:rwx"
GROUP = 1234
#: parent -> (its mode, whether it has DEFAULT_ACL)
PARENTS = {"plain": (0o755, False), "acl": (0o755, True), "sg": (0o2775, False),
           "sgacl": (0o2775, True)}
#: name -> (how it is made, the mode asked for)
ENTRIES = {"file": ("open", 0o666), "exe": ("open", 0o777), "dir": ("mkdir", 0o777),
           "fifo": ("mknod", stat.S_IFIFO | 0o666), "chr": ("mknod", stat.S_IFCHR | 0o666)}

Seen = dict[str, tuple[str, int, str]]


def _layer(root: Path) -> Path:
    build(root, {f"{parent}/.keep": "x" for parent in PARENTS})
    for parent, (mode, acl) in PARENTS.items():
        os.chown(root / parent, 0, GROUP)
        os.chmod(root / parent, mode)
        if acl:
            subprocess.run(["setfacl", "-d", "-m", DEFAULT_ACL, str(root / parent)], check=True)
    return root


def _make(root: Path, mask: int, premasked: bool = False) -> Seen:
    """Make every entry under every parent with umask *mask* (or, *premasked*, with umask 0
    and the mode already masked: what a stock pyfuse3's daemon is asked for)."""
    old = os.umask(0 if premasked else mask)
    try:
        for parent in PARENTS:
            for name, (how, mode) in ENTRIES.items():
                path = root / parent / name
                mode = mode & ~mask if premasked else mode
                if how == "open":
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
                elif how == "mkdir":
                    os.mkdir(path, mode)
                else:
                    os.mknod(path, mode, os.makedev(1, 3) if stat.S_ISCHR(mode) else 0)
    finally:
        os.umask(old)
    seen = {}
    for parent in PARENTS:
        for name in ENTRIES:
            path = root / parent / name
            acl = subprocess.run(["getfacl", "-cpn", str(path)], check=True,
                                 capture_output=True).stdout.decode()
            st = os.lstat(path)
            seen[f"{parent}/{name}"] = (stat.filemode(st.st_mode), st.st_gid, acl)
    return seen


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=["umask000", "umask022",
                                                             "umask077"])
def test_new_entry_modes(union: UnionFactory, backend: str, tmp_path: Path,
                         mask: int) -> None:
    want = _make(_layer(tmp_path / "local"), mask)
    # What the parents are for: setgid parents give their group and, to directories, the
    # setgid bit; a default ACL beats the umask.
    assert want["sg/file"][1] == GROUP and want["sg/dir"][0][6] in "sS"
    assert want["plain/file"][1] == 0 and want["plain/dir"][0][6] not in "sS"
    assert "mask::rw-" in want["acl/file"][2]
    premasked = _make(_layer(tmp_path / "premasked"), mask, premasked=True)
    if mask:
        assert premasked != want, "the test cannot tell the two outcomes apart"
        assert {k for k in want if want[k] != premasked[k]} <= {
            f"{parent}/{name}" for parent, (_, acl) in PARENTS.items() if acl
            for name in ENTRIES}, "only the default-ACL parents differ"
    m = union(_layer(tmp_path / "lower"))
    got = _make(m.mnt, mask)
    if backend == "kernel" or fusecaps.CAPS.dont_mask:
        assert got == want
    else:
        assert got == premasked
