"""Layers on temp dirs and a `core.Core` built on them, for the unit and ops-level tests.

Nothing here mounts: the core is called in-process, as ``ops.py`` calls it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mounts import Spec, build

from unionfs import core, whiteout
from unionfs.inodes import Node
from unionfs.layers import Stack, open_stack
from unionfs.union import Union

OPAQUE_XATTR = "trusted.overlay.opaque"
METACOPY_XATTR = "trusted.overlay.metacopy"


def open_fds() -> set[int]:
    """The fds this process holds now."""
    return {int(name) for name in os.listdir("/proc/self/fd")}


def is_opaque(path: Path) -> bool:
    """True when *path* carries the kernel's opaque mark (trusted.overlay.opaque=y)."""
    try:
        return os.getxattr(path, OPAQUE_XATTR, follow_symlinks=False) == b"y"
    except OSError:
        return False


def has_xattr(path: Path, name: str) -> bool:
    return name in os.listxattr(path, follow_symlinks=False)


def is_char00(path: Path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


class Stacks:
    """Builds layers under *tmp_path* (``l0`` top-most, ``upper``, ``work``) and a Core on
    them; `close` closes every fd the cores opened and checks the workdir is empty."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp = tmp_path
        self.lowers: list[Path] = []
        self.upper = tmp_path / "upper"
        self.work = tmp_path / "work"
        self._stacks: list[Stack] = []
        self._work_fds: list[int] = []
        self._cores: list[core.Core] = []

    def layers(self, *specs: Spec) -> list[Path]:
        """Lower layers ``l0`` (top) ... from *specs*."""
        self.lowers = [build(self.tmp / f"l{i}", spec) for i, spec in enumerate(specs)]
        return self.lowers

    def core(self, *lower_specs: Spec, upper: Spec | None = None, writable: bool = True,
             read_only: bool = False, markers: whiteout.Markers = whiteout.TRUSTED,
             metacopy: bool = True, fsync: bool = False, writeback: bool = False) -> core.Core:
        """A Core on lowers built from *lower_specs* (top first) and, when *writable*, an
        upper built from *upper* with a private ``work`` dir."""
        self.layers(*lower_specs)
        work_fd = None
        upper_path = None
        if writable:
            upper_path = str(build(self.upper, upper or {}))
            self.work.mkdir(mode=0o700, exist_ok=True)
            work_fd = os.open(self.work, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            self._work_fds.append(work_fd)
        stack = open_stack([str(p) for p in self.lowers], upper_path)
        self._stacks.append(stack)
        made = core.build(stack, work_fd, fsync=fsync, metacopy=metacopy, read_only=read_only,
                          markers=markers, writeback=writeback)
        self._cores.append(made)
        return made

    def close(self) -> None:
        for made in self._cores:
            # The view's directory-fd cache has no close of its own (a mount keeps it
            # until exit); the tests close what it holds.
            for fd in list(made.view.fds._fds.values()):
                os.close(fd)
            made.view.fds._fds.clear()
        for stack in self._stacks:
            stack.close()
        for fd in self._work_fds:
            os.close(fd)
        if self.work.exists():
            left = os.listdir(self.work)
            assert not left, f"the workdir holds {left} after the test"


def lookup(view: Union, path: str) -> Node | None:
    """The node at *path* in the merged view (components looked up one by one)."""
    node = view.root
    for part in path.split("/"):
        child = view.lookup(node, part.encode())
        if child is None:
            return None
        node = child
    return node


def node(view: Union, path: str) -> Node:
    found = lookup(view, path)
    assert found is not None, f"{path} not found in the merged view"
    return found
