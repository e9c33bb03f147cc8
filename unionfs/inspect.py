"""Look inside a stack of layers without mounting it.

- `walk`: the merged tree, with the same resolution rules as the mount (it is built on
  `layers.find_entry` and `layers.merged_listing`).
- `inspect`: each merged entry with its layer and what it shadows, and per-layer totals.
- `diff`: the upper's changes as ``A``/``C``/``D`` lines, computed the way
  containers-storage computes them for a mount program ("naive diff",
  ``archive.ChangesDirs``): the merged view with the upper is compared with the merged
  view of the lowers alone, entry by entry.

Everything here only reads. Every syscall on a layer is relative to a directory fd
and never follows a symlink. Names are bytes; paths in results are ``b"/a/b"``.
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass
from typing import Self

from unionfs import whiteout
from unionfs.layers import (
    DataRef,
    Found,
    Holder,
    Layer,
    find_data,
    find_entry,
    holders,
    lstat_at,
    merged_listing,
    open_dir_at,
    open_layer,
    open_parent,
    root_layers,
)
from unionfs.sysc import at_path

CAPABILITY_XATTR = "security.capability"


# --------------------------------------------------------------------------- the stack


class Stack:
    """Open layers, top first (the upper, if any, is index 0)."""

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
    """Open *lowers* (top first) and *upper*. Raises OSError."""
    layers: list[Layer] = []
    try:
        if upper is not None:
            layers.append(open_layer(0, upper, writable=True))
        for path in lowers:
            layers.append(open_layer(len(layers), path, writable=False))
    except BaseException:
        for layer in layers:
            os.close(layer.fd)
        raise
    return Stack(layers)


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


_KINDS = {
    stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "symlink", stat.S_IFIFO: "fifo",
    stat.S_IFCHR: "chr", stat.S_IFBLK: "blk", stat.S_IFSOCK: "sock",
}


def kind_of(st: os.stat_result) -> str:
    return _KINDS.get(stat.S_IFMT(st.st_mode), "unknown")


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


# --------------------------------------------------------------------------- inspect


@dataclass(frozen=True)
class TreeEntry:
    path: bytes
    kind: str
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
        opaque = any(h.layer is found.layer and h.kind == "opaque" for h in held)
        data = data_ref(stack, item.parent, item.name, found).layer
        if not item.is_dir:
            visible[item.path] = (found.layer, data)
        size = found.st.st_size if stat.S_ISREG(found.st.st_mode) else 0
        entries.append(TreeEntry(item.path, kind_of(found.st), size, found.layer, merges,
                                 shadows, opaque, None if data is found.layer else data))
    totals = tuple(_layer_totals(stack, pos, start, visible)
                   for pos in range(len(stack.layers)))
    return Report(join(start), tuple(entries), totals)


class _Tally:
    """Running totals of one layer (mutable while walking; frozen into LayerTotals)."""

    def __init__(self) -> None:
        self._counts: dict[str, list[int]] = {}
        self._counted: set[tuple[bool, int, int]] = set()
        #: (st_dev, st_ino) of the layer's own regular files -> (size, shown by a
        #: name of the merged view)
        self.own: dict[tuple[int, int], tuple[int, bool]] = {}

    def add(self, what: str, st: os.stat_result, size: int) -> None:
        """Count one non-directory as *what*; its *size* once per inode (the first time
        the layer's own entries, or the entries below it, meet the inode)."""
        counts = self._counts.setdefault(what, [0, 0])
        counts[0] += 1
        key = (what == "deleted", st.st_dev, st.st_ino)
        if key not in self._counted:
            self._counted.add(key)
            counts[1] += size

    def count(self, what: str) -> Count:
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
        return LayerTotals(self.layer, t.count("added"), t.count("changed"),
                           t.count("deleted"), wasted)

    def _dir(self, fd: int, below: MergedDir | None, components: tuple[bytes, ...],
             hiding: bool = False) -> None:
        """*hiding*: an ancestor in this layer is opaque, so everything below that this
        layer does not hold is deleted, here too."""
        with os.scandir(fd) as it:
            names = sorted(os.fsencode(e.name) for e in it)
        present = {n for n in names if not whiteout.is_marker_name(n)}
        oci_whiteouts = {t for n in names if (t := whiteout.whited_out_name(n)) is not None}
        hiding = hiding or whiteout.is_opaque_fd(fd)
        for name in sorted(present):
            self._entry(fd, name, below, (*components, name), hiding)
        if below is None:
            return
        gone = oci_whiteouts - present
        if hiding:
            gone |= set(below.names()) - present
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
            self.tally.add("added", st, size)
        elif stat.S_ISDIR(found.st.st_mode):
            assert below is not None
            self.tally.add("added", st, size)
            self._deleted(below, name, found)
        else:
            self.tally.add("changed", st, size)
        if size:
            key = (st.st_dev, st.st_ino)
            shown = self.tally.own.get(key, (size, False))[1]
            shown = shown or self.layer in self.visible.get(join(components), ())
            self.tally.own[key] = (size, shown)

    def _deleted(self, below: MergedDir, name: bytes, found: Found) -> None:
        """Count the non-directories of the below view that *found* is or holds."""
        if not stat.S_ISDIR(found.st.st_mode):
            st = found.st
            self.tally.add("deleted", st, st.st_size if stat.S_ISREG(st.st_mode) else 0)
            return
        with below.child(name, found) as child:
            for sub in child.names():
                sub_found = child.find(sub)
                if sub_found is not None:
                    self._deleted(child, sub, sub_found)


def _layer_totals(stack: Stack, pos: int, start: tuple[bytes, ...],
                  visible: dict[bytes, tuple[Layer, ...]]) -> LayerTotals:
    return _LayerWalk(stack, pos, visible).run(start)


# --------------------------------------------------------------------------- diff


#: Paths podman leaves out of ``podman diff`` (libpod's initInodes: what the runtime
#: mounts or creates in every container), exact paths only: a change below them shows.
PODMAN_HIDDEN = frozenset({
    b"/dev", b"/etc/hostname", b"/etc/hosts", b"/etc/resolv.conf", b"/proc", b"/run",
    b"/run/notify", b"/run/.containerenv", b"/run/secrets", b"/run/podman-init", b"/sys",
    b"/etc/mtab",
})


class ChangeKind(enum.Enum):
    ADD = "A"
    CHANGE = "C"
    DELETE = "D"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    path: bytes

    def line(self) -> bytes:
        return self.kind.value.encode() + b" " + self.path


@dataclass(frozen=True)
class _Meta:
    """What containers-storage compares (statDifferent, capability, target, user xattrs)."""

    mode: int
    uid: int
    gid: int
    rdev: int
    mtime_ns: int
    size: int
    target: bytes | None
    capability: bytes | None
    xattrs: tuple[tuple[str, bytes], ...]

    def differs(self, other: _Meta) -> bool:
        if (self.mode, self.uid, self.gid, self.rdev) != (
                other.mode, other.uid, other.gid, other.rdev):
            return True
        if not _same_fs_time(self.mtime_ns, other.mtime_ns):
            return True
        if not stat.S_ISDIR(self.mode) and self.size != other.size:
            return True
        return (self.capability, self.target, self.xattrs) != (
            other.capability, other.target, other.xattrs)


def _same_fs_time(a: int, b: int) -> bool:
    """Equal times, or the same second with either one without nanoseconds (tar and
    many tools drop sub-second precision): containers-storage's sameFsTimeSpec."""
    sec_a, ns_a = divmod(a, 1_000_000_000)
    sec_b, ns_b = divmod(b, 1_000_000_000)
    return sec_a == sec_b and (ns_a == ns_b or ns_a == 0 or ns_b == 0)


def _meta(parent: MergedDir, name: bytes, found: Found) -> _Meta:
    dir_fd = parent.fd_of(found.layer)
    st = found.st
    target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
    xattrs = read_xattrs(dir_fd, name, lambda key: key == CAPABILITY_XATTR or (
        key.startswith("user.") and user_visible_xattr(key)))
    capability = xattrs.pop(CAPABILITY_XATTR, None)
    return _Meta(st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_mtime_ns, st.st_size,
                 target, capability, tuple(sorted(xattrs.items())))


def diff(stack: Stack, hidden: Collection[bytes] = ()) -> list[Change]:
    """The changes of the upper, sorted by path, as `podman diff` lists them for a
    container whose storage uses a mount program (containers-storage's naive diff):

    - ``A`` for an entry only in the merged view with the upper, and for everything
      below an added directory;
    - ``D`` for an entry only in the view of the lowers, but not for what is below a
      deleted directory, nor what was below a directory replaced by a non-directory;
    - ``C`` for an entry whose type, mode, owner, rdev, mtime, size (not for
      directories), symlink target, ``user.*`` xattrs or file capability differ, and
      for every directory that holds an A, C or D line (the root is never listed).

    A directory replaced through the mount (rm -rf, then mkdir: opaque in the upper)
    is a ``C`` with a ``D`` for each old entry directly inside and an ``A`` for each new
    one. Lines for the paths in *hidden* are left out afterwards (podman leaves out
    `PODMAN_HIDDEN`; their parent directories keep their ``C``). Raises OSError.
    """
    if stack.upper is None:
        return []
    new_root = root_dir(stack.layers)
    old_root = root_dir(stack.lowers)
    assert new_root is not None
    changes: list[Change] = []
    try:
        _diff_dir(stack, new_root, old_root, (), True, changes)
    finally:
        new_root.close()
        if old_root is not None:
            old_root.close()
    return sorted((change for change in changes if change.path not in hidden),
                  key=lambda change: change.path)


def _diff_dir(stack: Stack, new: MergedDir, old: MergedDir | None,
              components: tuple[bytes, ...], reported: bool, out: list[Change]) -> None:
    """containers-storage's FileInfo.addChanges for the directory *components*.

    *reported*: the directory itself already has an A or C line (or is the root).
    """
    start = len(out)
    old_names = set(old.names()) if old is not None else set()
    for name in new.names():
        found = new.find(name)
        if found is None:
            continue
        child_components = (*components, name)
        path = join(child_components)
        old_found = old.find(name) if old is not None and name in old_names else None
        old_names.discard(name)
        if old_found is None:
            out.append(Change(ChangeKind.ADD, path))
            child_reported = True
        else:
            assert old is not None
            # The same lower entry wins in both views: nothing to compare.
            child_reported = found.layer is not old_found.layer and _meta(
                new, name, found).differs(_meta(old, name, old_found))
            if child_reported:
                out.append(Change(ChangeKind.CHANGE, path))
        if not stat.S_ISDIR(found.st.st_mode):
            continue
        if stack.upper not in found.dir_layers and old_found is not None:
            continue  # the same lower directories merge in both views: nothing differs
        with new.child(name, found) as new_child:
            if old_found is not None and stat.S_ISDIR(old_found.st.st_mode):
                assert old is not None
                with old.child(name, old_found) as old_child:
                    _diff_dir(stack, new_child, old_child, child_components, child_reported,
                              out)
            else:
                _diff_dir(stack, new_child, None, child_components, child_reported, out)
    for name in sorted(old_names):
        out.append(Change(ChangeKind.DELETE, join((*components, name))))
    if len(out) > start and not reported:
        out.insert(start, Change(ChangeKind.CHANGE, join(components)))
