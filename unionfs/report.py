"""``unionmount inspect``: where each entry of the merged view comes from, what it
hides, and per layer what it adds, changes, deletes and wastes.

Only reads; built on `merged` (the mount's own resolution rules) and, for the per-layer
totals, on `whiteout.read_layer_dir` (the hiding rules).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from dataclasses import dataclass

from unionfs import whiteout
from unionfs.layers import Found, Held, Holder, Layer, Stack, holders, lstat_at, open_dir_at
from unionfs.merged import (
    EntryType,
    MergedDir,
    data_ref,
    join,
    root_dir,
    split_path,
    type_of,
    walk,
)


@dataclass(frozen=True)
class TreeEntry:
    path: bytes
    kind: EntryType
    size: int
    layer: Layer
    #: Further layers whose directories merge into this one (directories only).
    merges: tuple[Layer, ...]
    #: Layers below that hold the name and are hidden by this entry.
    shadows: tuple[Holder, ...]
    #: A directory that stops the merge with the layers below it.
    opaque: bool = False
    #: For a metadata-only file (metacopy, in any layer): the layer that holds its data.
    data_layer: Layer | None = None


@dataclass(frozen=True)
class Count:
    files: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class LayerTotals:
    """What one layer does to the layers below it, under the inspected path.

    added: non-directories with no entry below; changed: non-directories that replace
    one below; deleted: the non-directories below that its whiteouts, opaque
    directories and type changes remove (each counted once); wasted: bytes of its own
    regular files that no name of the merged view shows (a higher layer overrides or
    deletes them). Bytes are regular-file sizes, one per hard-linked inode.
    """

    layer: Layer
    added: Count
    changed: Count
    deleted: Count
    wasted: int


@dataclass(frozen=True)
class Report:
    path: bytes
    entries: tuple[TreeEntry, ...]
    totals: tuple[LayerTotals, ...]


def inspect(stack: Stack, path: bytes = b"/") -> Report:
    """The merged tree under *path* with each entry's origin, and per-layer totals."""
    start = split_path(path)
    entries: list[TreeEntry] = []
    visible: dict[bytes, tuple[Layer, ...]] = {}
    for item in walk(stack, start):
        found = item.found
        merges = found.dir_layers[1:]
        held = holders(item.parent.layers, item.parent.fd_of, item.name)
        shadows = tuple(h for h in held if h.layer is not found.layer and h.layer not in merges)
        opaque = any(h.layer is found.layer and h.kind is Held.OPAQUE for h in held)
        data = data_ref(stack, item.parent, item.name, found).layer
        if not item.is_dir:
            visible[item.path] = (found.layer, data)
        size = found.st.st_size if stat.S_ISREG(found.st.st_mode) else 0
        entries.append(TreeEntry(item.path, type_of(found.st), size, found.layer, merges,
                                 shadows, opaque, None if data is found.layer else data))
    totals = tuple(_layer_totals(stack, pos, start, visible)
                   for pos in range(len(stack.layers)))
    return Report(join(start), tuple(entries), totals)


class _Change(enum.Enum):
    """What a layer does to a non-directory of the layers below it."""

    ADDED = "added"
    CHANGED = "changed"
    DELETED = "deleted"


class _Tally:
    """Running totals of one layer (mutable while walking; frozen into LayerTotals)."""

    def __init__(self) -> None:
        self._counts: dict[_Change, list[int]] = {}
        self._counted: set[tuple[bool, int, int]] = set()
        #: (st_dev, st_ino) of the layer's own regular files -> (size, shown by a
        #: name of the merged view)
        self.own: dict[tuple[int, int], tuple[int, bool]] = {}

    def add(self, what: _Change, st: os.stat_result, size: int) -> None:
        """Count one non-directory as *what*; its *size* once per inode (the first time
        the layer's own entries, or the entries below it, meet the inode)."""
        counts = self._counts.setdefault(what, [0, 0])
        counts[0] += 1
        key = (what is _Change.DELETED, st.st_dev, st.st_ino)
        if key not in self._counted:
            self._counted.add(key)
            counts[1] += size

    def count(self, what: _Change) -> Count:
        files, size = self._counts.get(what, (0, 0))
        return Count(files, size)


def _open_dir_or_none(dir_fd: int, name: bytes) -> int | None:
    """open_dir_at, or None when *name* is absent, not a directory or a symlink."""
    try:
        return open_dir_at(dir_fd, name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
            return None
        raise


class _LayerWalk:
    """Walks one layer's own tree beside the merged view of the layers below it."""

    def __init__(self, stack: Stack, pos: int,
                 visible: dict[bytes, tuple[Layer, ...]]) -> None:
        self.stack = stack
        self.layer = stack.layers[pos]
        self.below = stack.layers[pos + 1:]
        self.visible = visible
        self.tally = _Tally()

    def run(self, start: tuple[bytes, ...]) -> LayerTotals:
        below_root = root_dir(self.below)
        opened: list[MergedDir] = []
        fds: list[int] = []
        try:
            layer_fd: int | None = self.layer.fd
            below = below_root
            hiding = False
            for name in start[:-1]:
                assert layer_fd is not None
                hiding = hiding or whiteout.is_opaque_fd(layer_fd)
                layer_fd = _open_dir_or_none(layer_fd, name)
                if layer_fd is None:
                    break
                fds.append(layer_fd)
                found = below.find(name) if below is not None else None
                if below is not None and found is not None and stat.S_ISDIR(found.st.st_mode):
                    below = below.child(name, found)
                    opened.append(below)
                else:
                    below = None
            if layer_fd is not None and not start:
                self._dir(layer_fd, below, ())
            elif layer_fd is not None:
                hiding = hiding or whiteout.is_opaque_fd(layer_fd)
                self._entry(layer_fd, start[-1], below, start, hiding)
        finally:
            for d in reversed(opened):
                d.close()
            if below_root is not None:
                below_root.close()
            for fd in fds:
                os.close(fd)
        t = self.tally
        wasted = sum(size for size, shown in t.own.values() if not shown)
        return LayerTotals(self.layer, t.count(_Change.ADDED),
                           t.count(_Change.CHANGED), t.count(_Change.DELETED), wasted)

    def _dir(self, fd: int, below: MergedDir | None, components: tuple[bytes, ...],
             hiding: bool = False) -> None:
        """*hiding*: an ancestor in this layer is opaque, so everything below that this
        layer does not hold is deleted, here too."""
        held = whiteout.read_layer_dir(fd)
        hiding = hiding or whiteout.is_opaque_fd(fd)
        for name in sorted(held.entries):
            self._entry(fd, name, below, (*components, name), hiding)
        if below is None:
            return
        gone = held.hidden - held.entries.keys()
        if hiding:
            gone |= set(below.names()) - held.entries.keys()
        for name in sorted(gone):
            found = below.find(name)
            if found is not None:
                self._deleted(below, name, found)

    def _entry(self, parent_fd: int, name: bytes, below: MergedDir | None,
               components: tuple[bytes, ...], hiding: bool = False) -> None:
        st = lstat_at(parent_fd, name)
        if st is None:
            return
        found = below.find(name) if below is not None else None
        if whiteout.is_whiteout(st):
            if below is not None and found is not None:
                self._deleted(below, name, found)
            return
        if stat.S_ISDIR(st.st_mode):
            child_below = None
            if below is not None and found is not None:
                if stat.S_ISDIR(found.st.st_mode):
                    child_below = below.child(name, found)
                else:
                    self._deleted(below, name, found)
            fd = open_dir_at(parent_fd, name)
            try:
                self._dir(fd, child_below, components, hiding)
            finally:
                os.close(fd)
                if child_below is not None:
                    child_below.close()
            return
        # Bytes this layer stores: none for a metadata-only copy (its data is below).
        size = st.st_size if stat.S_ISREG(st.st_mode) else 0
        if size and whiteout.is_metacopy(parent_fd, name):
            size = 0
        if found is None:
            self.tally.add(_Change.ADDED, st, size)
        elif stat.S_ISDIR(found.st.st_mode):
            assert below is not None
            self.tally.add(_Change.ADDED, st, size)
            self._deleted(below, name, found)
        else:
            self.tally.add(_Change.CHANGED, st, size)
        if size:
            key = (st.st_dev, st.st_ino)
            shown = self.tally.own.get(key, (size, False))[1]
            shown = shown or self.layer in self.visible.get(join(components), ())
            self.tally.own[key] = (size, shown)

    def _deleted(self, below: MergedDir, name: bytes, found: Found) -> None:
        """Count the non-directories of the below view that *found* is or holds."""
        if not stat.S_ISDIR(found.st.st_mode):
            st = found.st
            self.tally.add(_Change.DELETED, st, st.st_size if stat.S_ISREG(st.st_mode) else 0)
            return
        with below.child(name, found) as child:
            for sub in child.names():
                sub_found = child.find(sub)
                if sub_found is not None:
                    self._deleted(child, sub, sub_found)


def _layer_totals(stack: Stack, pos: int, start: tuple[bytes, ...],
                  visible: dict[bytes, tuple[Layer, ...]]) -> LayerTotals:
    return _LayerWalk(stack, pos, visible).run(start)
