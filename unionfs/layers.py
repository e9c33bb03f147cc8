"""Layers and the stack: top-down resolution and merged listings.

A `Layer` is a directory opened once; every later syscall on it is relative to
a directory fd and never follows a symlink, so a hostile layer (a symlink
where a directory is expected) cannot lead us out of it. `open_stack` is the one
way layers are opened, by the mount and by the offline tools.

Resolution rules (kernel overlayfs is the reference):
  - layers are searched top-down; the first entry found wins;
  - a whiteout (see `whiteout`: either kind) hides the name in every layer below
    and stops the search;
  - a non-directory hides everything below;
  - directories merge with the directories below until one is opaque; a
    non-directory or a whiteout below a directory stops the merge too.
`find_entry` (lookup) and `merged_listing` (readdir) apply the same rules,
so a name that a listing does not show is never found by lookup either.
"""

from __future__ import annotations

import collections
import contextlib
import enum
import errno
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Self

from unionfs import whiteout

DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


@dataclass(frozen=True, eq=False)
class Layer:
    """One layer of the stack. ``index`` 0 is the top; the upper, if any, is index 0."""

    index: int
    path: str
    fd: int
    writable: bool

    @property
    def label(self) -> str:
        """How the layer is named to users (``upper`` for the writable layer)."""
        return "upper" if self.writable else self.path

    def __repr__(self) -> str:
        return f"<Layer {self.index} {self.label}>"


class Stack:
    """Open layers, top first (the upper, if any, is index 0): what a mount serves and
    what the offline tools read. Closing it closes the layers' fds."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        self.layers = tuple(layers)

    @property
    def upper(self) -> Layer | None:
        return self.layers[0] if self.layers and self.layers[0].writable else None

    @property
    def lowers(self) -> tuple[Layer, ...]:
        return tuple(layer for layer in self.layers if not layer.writable)

    def close(self) -> None:
        for layer in self.layers:
            os.close(layer.fd)
        self.layers = ()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_stack(lowers: Sequence[str], upper: str | None = None) -> Stack:
    """Open *lowers* (top first) under *upper*. The paths the user gave may themselves
    be symlinks; nothing inside a layer is followed. Raises OSError (then nothing is
    left open)."""
    layers: list[Layer] = []
    try:
        for path, writable in ([(upper, True)] if upper is not None else []) + [
                (path, False) for path in lowers]:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            layers.append(Layer(len(layers), os.path.abspath(path), fd, writable))
    except BaseException:
        for layer in layers:
            os.close(layer.fd)
        raise
    return Stack(layers)


def lstat_at(dir_fd: int, name: bytes) -> os.stat_result | None:
    """lstat *name* in *dir_fd*; None when absent."""
    try:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return None


def open_dir_at(dir_fd: int, name: bytes) -> int:
    """Open the directory *name* in *dir_fd*, refusing symlinks (ELOOP/ENOTDIR)."""
    return os.open(name, DIR_FLAGS, dir_fd=dir_fd)


@dataclass(frozen=True)
class Found:
    """The result of resolving a name: the entry that wins and, for a directory,
    every layer whose directory merges into it (top first)."""

    layer: Layer
    st: os.stat_result
    dir_layers: tuple[Layer, ...]


DirFdGetter = Callable[[Layer], int]


def find_entry(parent_layers: Sequence[Layer], fd_of: DirFdGetter, name: bytes
               ) -> Found | None:
    """Resolve *name* in a merged directory made of *parent_layers* (top first).

    *fd_of(layer)* gives the parent directory's fd in that layer. Returns None when the
    name is absent or whited out; raises OSError on I/O errors.
    """
    if whiteout.is_marker_name(name):
        return None  # never an entry: a listing does not show it either
    winner: tuple[Layer, os.stat_result] | None = None
    dirs: list[Layer] = []
    for pos, layer in enumerate(parent_layers):
        fd = fd_of(layer)
        st = lstat_at(fd, name)
        if st is None:
            if whiteout.has_oci_whiteout(fd, name):
                break
            continue
        if whiteout.is_whiteout(st):
            break
        if not stat.S_ISDIR(st.st_mode):
            if winner is None:
                return Found(layer, st, ())
            break
        if winner is None:
            winner = (layer, st)
        dirs.append(layer)
        if pos + 1 < len(parent_layers) and _dir_is_opaque(fd, name):
            break
    if winner is None:
        return None
    return Found(winner[0], winner[1], tuple(dirs))


def _dir_is_opaque(parent_fd: int, name: bytes) -> bool:
    fd = open_dir_at(parent_fd, name)
    try:
        return whiteout.is_opaque_fd(fd)
    finally:
        os.close(fd)


def root_layers(layers: Sequence[Layer]) -> tuple[Layer, ...]:
    """The layers whose roots merge into the union's root: down to the first opaque one."""
    dirs: list[Layer] = []
    for pos, layer in enumerate(layers):
        dirs.append(layer)
        if pos + 1 < len(layers) and whiteout.is_opaque_fd(layer.fd):
            break
    return tuple(dirs)


class Held(enum.Enum):
    """What a layer holds under a name."""

    FILE = "file"  # any non-directory
    DIR = "dir"
    OPAQUE = "opaque"  # an opaque directory
    WHITEOUT = "whiteout"


@dataclass(frozen=True)
class Holder:
    """A layer that holds a name, and what it holds there."""

    layer: Layer
    kind: Held


def holders(parent_layers: Sequence[Layer], fd_of: DirFdGetter, name: bytes) -> list[Holder]:
    """Every layer of a merged directory that holds *name*, top first."""
    result = []
    for layer in parent_layers:
        fd = fd_of(layer)
        st = lstat_at(fd, name)
        if st is None:
            if whiteout.has_oci_whiteout(fd, name):
                result.append(Holder(layer, Held.WHITEOUT))
        elif whiteout.is_whiteout(st):
            result.append(Holder(layer, Held.WHITEOUT))
        elif stat.S_ISDIR(st.st_mode):
            opaque = _dir_is_opaque(fd, name)
            result.append(Holder(layer, Held.OPAQUE if opaque else Held.DIR))
        else:
            result.append(Holder(layer, Held.FILE))
    return result


@dataclass(frozen=True)
class DataRef:
    """Where the data of a metadata-only file is: the regular file *name* in *layer*, in
    the entry's own parent directory when *path* is None, else at *path* (components
    from the layer root, ending in *name*: an absolute ``overlay.redirect``).

    *missing* says why no data was found (then *layer* is the marked entry's own).
    """

    layer: Layer
    name: bytes
    path: tuple[bytes, ...] | None = None
    missing: str | None = None

    def check(self) -> None:
        """Raise OSError(EIO) when the data is missing, as the kernel fails such a file."""
        if self.missing is not None:
            raise OSError(errno.EIO, f"metadata-only file with {self.missing}", self.name)


def find_data(stack: Sequence[Layer], parent_layers: Sequence[Layer], fd_of: DirFdGetter,
              name: bytes, found: Found) -> DataRef | None:
    """Where the data of the entry *found* for *name* is, when it holds metadata only
    (a metacopy mark, in whatever layer it is): None when it holds its own data.

    The kernel's rule (``metacopy=on``): the data is the first regular file without a
    metacopy mark below it, at the same path in the layers its parent directory
    merges, or at the path its redirect names (then in every layer below it). Marked
    files met on the way are followed the same way. *stack* is every layer, top first.
    When no data is found (a whiteout, a non-file, or nothing below) the reference is
    *missing*: the kernel fails the lookup with EIO; we show the entry's metadata and
    fail what reads its data (`DataRef.check`).
    """
    if not stat.S_ISREG(found.st.st_mode) or not whiteout.is_metacopy(fd_of(found.layer),
                                                                        name):
        return None
    ref = DataRef(found.layer, name)  # the marked entry reached so far
    while True:
        with _parent_of(ref, fd_of) as dir_fd:
            redirect = whiteout.redirect_of(dir_fd, ref.name)
        target, path = ref.name, ref.path
        if redirect is not None:
            target, path = _follow(redirect, target, path)
        below = parent_layers if path is None else stack
        step = _first_below(below[below.index(ref.layer) + 1:], fd_of, target, path)
        if step is None:
            return DataRef(found.layer, name, missing="no data below it")
        ref, st = step
        if not stat.S_ISREG(st.st_mode):
            return DataRef(found.layer, name, missing="no regular file below it")
        with _parent_of(ref, fd_of) as dir_fd:
            if not whiteout.is_metacopy(dir_fd, ref.name):
                return ref


@contextlib.contextmanager
def _parent_of(ref: DataRef, fd_of: DirFdGetter) -> Iterator[int]:
    """The fd of the directory holding *ref* (opened for the block when it is a path)."""
    if ref.path is None:
        yield fd_of(ref.layer)
        return
    fd = open_parent(ref.layer, ref.path)
    try:
        yield fd
    finally:
        os.close(fd)


def _first_below(layers: Sequence[Layer], fd_of: DirFdGetter, name: bytes,
                 path: tuple[bytes, ...] | None) -> tuple[DataRef, os.stat_result] | None:
    """The first entry *name* (in the merged parent, or at *path*) in *layers*, with its
    stat; None when a whiteout hides it first, or no layer holds it."""
    for layer in layers:
        ref = DataRef(layer, name, path)
        try:
            with _parent_of(ref, fd_of) as fd:
                st = lstat_at(fd, name)
                hidden = st is None and whiteout.has_oci_whiteout(fd, name)
        except FileNotFoundError:
            continue  # the redirect's directories are not in this layer
        if st is not None:
            return None if whiteout.is_whiteout(st) else (ref, st)
        if hidden:
            return None
    return None


def _follow(redirect: bytes, target: bytes, path: tuple[bytes, ...] | None
            ) -> tuple[bytes, tuple[bytes, ...] | None]:
    """The (name, path) an ``overlay.redirect`` value leads to; an invalid one (empty
    components, ``.`` or ``..``, a relative one with a ``/``) is ignored, as the kernel
    ignores it."""
    if redirect.startswith(b"/"):
        parts = tuple(redirect[1:].split(b"/"))
        if all(part and part not in (b".", b"..") for part in parts):
            return parts[-1], parts
        return target, path
    if redirect and b"/" not in redirect and redirect not in (b".", b".."):
        return redirect, None if path is None else (*path[:-1], redirect)
    return target, path


def open_parent(layer: Layer, path: tuple[bytes, ...]) -> int:
    """Open the directory holding *path* (components from the root of *layer*), never
    following a symlink; the caller closes it. Raises FileNotFoundError when a component
    is missing, a symlink or not a directory."""
    fd = os.dup(layer.fd)
    try:
        for part in path[:-1]:
            try:
                child = open_dir_at(fd, part)
            except OSError as exc:
                if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT),
                                            part) from None
                raise
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True, slots=True)
class ListedEntry:
    name: bytes
    layer: Layer
    is_dir: bool


def merged_listing(dir_layers: Sequence[Layer], fd_of: DirFdGetter) -> dict[bytes, ListedEntry]:
    """The union of the directories in *dir_layers* (top first), once per name.

    Whiteouts hide names below them (`whiteout.read_layer_dir` says which) and are
    never listed, nor are OCI markers.
    """
    seen: dict[bytes, ListedEntry | None] = {}
    for layer in dir_layers:
        held = whiteout.read_layer_dir(fd_of(layer))
        for name, is_dir in held.entries.items():
            if name not in seen:
                seen[name] = ListedEntry(name, layer, is_dir)
        for name in held.hidden:
            seen.setdefault(name, None)
    return {name: entry for name, entry in seen.items() if entry is not None}


#: A directory fd's key: (inode, layer index) for a node's directory, or (layer index,
#: path) for a directory reached by path (an ``overlay.redirect``).
FdKey = tuple[int, int] | tuple[int, tuple[bytes, ...]]


class DirFdCache:
    """A bounded LRU of open directory fds, keyed by (inode, layer index).

    Holding one fd per directory and layer for as long as the kernel knows the
    directory would exhaust the fd limit on large trees (fuse-overlayfs #34, #210);
    a miss costs one openat from the parent's fd.
    """

    def __init__(self, capacity: int = 2048) -> None:
        self.capacity = capacity
        self._fds: collections.OrderedDict[FdKey, int] = collections.OrderedDict()

    def get(self, key: FdKey) -> int | None:
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
        return fd

    def put(self, key: FdKey, fd: int) -> None:
        old = self._fds.pop(key, None)
        if old is not None and old != fd:
            os.close(old)
        self._fds[key] = fd
        while len(self._fds) > self.capacity:
            _, victim = self._fds.popitem(last=False)
            os.close(victim)

    def close(self) -> None:
        while self._fds:
            os.close(self._fds.popitem()[1])

    def drop_inode(self, inode: int, layer_indices: Sequence[int]) -> None:
        for index in layer_indices:
            fd = self._fds.pop((inode, index), None)
            if fd is not None:
                os.close(fd)
