"""The filesystem's parts put together: the view, copy-up, changes and removal.

`build` is how the mount (and the ops-level tests) make them from an open stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from unionfs import whiteout
from unionfs.changes import Changes
from unionfs.copyup import CopyUp
from unionfs.layers import Stack
from unionfs.removal import Removal
from unionfs.union import Union


@dataclass(frozen=True)
class Core:
    view: Union
    copier: CopyUp
    changes: Changes
    removal: Removal


def build(stack: Stack, work_fd: int | None, *, fsync: bool = True, metacopy: bool = True,
          read_only: bool = False, markers: whiteout.Markers = whiteout.TRUSTED,
          writeback: bool = False) -> Core:
    """The parts serving *stack*; *work_fd* (the workdir's ``work``) is None exactly
    when nothing may be written."""
    view = Union(stack.layers, read_only=read_only or work_fd is None)
    copier = CopyUp(view, work_fd, fsync, metacopy, markers)
    return Core(view, copier, Changes(view, copier, writeback), Removal(view, copier))
