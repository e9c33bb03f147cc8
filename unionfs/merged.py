"""The merged view of a stack without mounting it: merged directories and walks.

The offline tools (`report`, `diff`, `ociexport`) read layers with the mount's own
resolution rules (`layers.find_entry`, `layers.merged_listing`, `layers.find_data`).
Everything here only reads; every syscall on a layer is relative to a directory fd and
never follows a symlink. Names are bytes; paths in results are ``b"/a/b"``.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Self

from unionfs import whiteout
from unionfs.layers import (
    DataRef,
    Found,
    Layer,
    Stack,
    find_data,
    find_entry,
    merged_listing,
    open_dir_at,
    open_parent,
    root_layers,
)
from unionfs.sysc import at_path

CAPABILITY_XATTR = "security.capability"


# --------------------------------------------------------------------------- merged dirs


class MergedDir:
    """The open directory fds of one merged directory: one per layer that merges into
    it (top first). Only fds it opened itself are closed by `close`."""

    def __init__(self, layers: tuple[Layer, ...], fds: dict[int, int], owned: bool) -> None:
        self.layers = layers
        self._fds = fds
        self._owned = owned

    def fd_of(self, layer: Layer) -> int:
        return self._fds[layer.index]

    def find(self, name: bytes) -> Found | None:
        return find_entry(self.layers, self.fd_of, name)

    def names(self) -> list[bytes]:
        """The merged listing, sorted by name."""
        return sorted(merged_listing(self.layers, self.fd_of))

    def child(self, name: bytes, found: Found) -> MergedDir:
        """The merged directory *name* (a directory *found* in this one)."""
        fds: dict[int, int] = {}
        try:
            for layer in found.dir_layers:
                fds[layer.index] = open_dir_at(self.fd_of(layer), name)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        return MergedDir(found.dir_layers, fds, owned=True)

    def close(self) -> None:
        if self._owned:
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def root_dir(layers: Sequence[Layer]) -> MergedDir | None:
    """The merged root of *layers* (as the mount builds it). None for an empty stack."""
    dirs = root_layers(layers)
    if not dirs:
        return None
    return MergedDir(dirs, {layer.index: layer.fd for layer in dirs}, owned=False)


def split_path(path: bytes) -> tuple[bytes, ...]:
    """The components of a path inside the union (``/a/b``, ``a/b/`` and ``.`` alike)."""
    return tuple(part for part in path.split(b"/") if part and part != b".")


def join(components: Sequence[bytes]) -> bytes:
    return b"/" + b"/".join(components)


# --------------------------------------------------------------------------- walking


@dataclass(frozen=True)
class WalkEntry:
    """One entry of a merged walk. *parent* is open only until the walk moves on."""

    components: tuple[bytes, ...]
    parent: MergedDir
    found: Found

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.found.st.st_mode)

    @property
    def name(self) -> bytes:
        return self.components[-1]

    @property
    def path(self) -> bytes:
        return join(self.components)


def walk(stack: Stack, start: tuple[bytes, ...] = (),
         prune: Callable[[WalkEntry], bool] | None = None) -> Iterator[WalkEntry]:
    """Every merged entry under *start* (itself included, unless it is the root), parents
    before children, names sorted. A directory for which *prune* is true is not entered.

    Raises FileNotFoundError / NotADirectoryError when *start* does not resolve.
    """
    root = root_dir(stack.layers)
    if root is None:
        return
    with root:
        if not start:
            yield from _walk_dir(stack, root, (), prune)
            return
        parent, owned = _resolve_parent(root, start)
        try:
            found = parent.find(start[-1])
            if found is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), join(start))
            entry = WalkEntry(start, parent, found)
            yield entry
            if entry.is_dir and not (prune and prune(entry)):
                with parent.child(start[-1], found) as child:
                    yield from _walk_dir(stack, child, start, prune)
        finally:
            for d in owned:
                d.close()


def _resolve_parent(root: MergedDir, components: tuple[bytes, ...]
                    ) -> tuple[MergedDir, list[MergedDir]]:
    """The merged directory holding the last of *components*, and the dirs opened."""
    opened: list[MergedDir] = []
    current = root
    try:
        for depth, name in enumerate(components[:-1]):
            found = current.find(name)
            where = join(components[: depth + 1])
            if found is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), where)
            if not stat.S_ISDIR(found.st.st_mode):
                raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), where)
            current = current.child(name, found)
            opened.append(current)
    except BaseException:
        for d in opened:
            d.close()
        raise
    return current, opened


def _walk_dir(stack: Stack, d: MergedDir, components: tuple[bytes, ...],
              prune: Callable[[WalkEntry], bool] | None) -> Iterator[WalkEntry]:
    for name in d.names():
        found = d.find(name)
        if found is None:
            continue  # changed under us
        entry = WalkEntry((*components, name), d, found)
        yield entry
        if entry.is_dir and not (prune and prune(entry)):
            with d.child(name, found) as child:
                yield from _walk_dir(stack, child, entry.components, prune)


def data_ref(stack: Stack, parent: MergedDir, name: bytes, found: Found) -> DataRef:
    """Where the data of the entry *found* for *name* in *parent* is: the entry itself,
    or, for a metadata-only file (in any layer), the file below that holds it, as the
    mount reads it."""
    ref = find_data(stack.layers, parent.layers, parent.fd_of, name, found)
    return DataRef(found.layer, name) if ref is None else ref


def open_data(stack: Stack, components: tuple[bytes, ...]) -> int:
    """Open (read-only) the file that holds the data of the merged entry *components*,
    a regular file of the merged view. Raises OSError."""
    root = root_dir(stack.layers)
    if root is None:
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), join(components))
    with root:
        parent, opened = _resolve_parent(root, components)
        try:
            found = parent.find(components[-1])
            if found is None:
                raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                        join(components))
            ref = data_ref(stack, parent, components[-1], found)
            ref.check()
            if ref.path is None:
                return os.open(ref.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=parent.fd_of(ref.layer))
            dir_fd = open_parent(ref.layer, ref.path)
            try:
                return os.open(ref.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                               dir_fd=dir_fd)
            finally:
                os.close(dir_fd)
        finally:
            for d in reversed(opened):
                d.close()


# --------------------------------------------------------------------------- attributes


class EntryType(enum.Enum):
    """An entry's type, as the tools print it."""

    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    FIFO = "fifo"
    CHR = "chr"
    BLK = "blk"
    SOCK = "sock"
    UNKNOWN = "unknown"


_TYPES = {
    stat.S_IFREG: EntryType.FILE, stat.S_IFDIR: EntryType.DIR, stat.S_IFLNK: EntryType.SYMLINK,
    stat.S_IFIFO: EntryType.FIFO, stat.S_IFCHR: EntryType.CHR, stat.S_IFBLK: EntryType.BLK,
    stat.S_IFSOCK: EntryType.SOCK,
}


def type_of(st: os.stat_result) -> EntryType:
    return _TYPES.get(stat.S_IFMT(st.st_mode), EntryType.UNKNOWN)


def read_xattrs(dir_fd: int, name: bytes, want: Callable[[str], bool]) -> dict[str, bytes]:
    """The xattrs of the entry *name* (never following a symlink) for which *want* holds."""
    path = at_path(dir_fd, name)
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            return {}
        raise
    values: dict[str, bytes] = {}
    for key in sorted(names):
        if not want(key):
            continue
        try:
            values[key] = os.getxattr(path, key, follow_symlinks=False)
        except OSError as exc:
            if exc.errno != errno.ENODATA:  # removed meanwhile
                raise
    return values


def user_visible_xattr(name: str) -> bool:
    """Xattrs that are the user's own data (not the union's bookkeeping)."""
    return not whiteout.is_internal_xattr(name)
