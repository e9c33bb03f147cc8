"""The merged tree: lookup, listing and every change, in terms of nodes.

Plain Python on trio (no pyfuse3): `ops.py` adapts it to FUSE. Core code raises
OSError with the errno the caller should see.

Atomicity (trio): a method with no ``await`` runs without interruption. The
awaits are: waiting for a node's copy-up to finish (`settle`); the data copy
(and fsync) of a copy-up, which runs in a worker thread; and the one scan of a
lower layer for the other names of a hard-linked file, in a worker thread too.
Across those awaits the node is marked ``copying``; every method that changes
the node or its name settles first, so no two changes to one entry interleave.
Directory fds are re-fetched from the cache after each await (the cache may have
closed them). No request waits for another entry's copy, fsync or scan.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import fcntl
import functools
import logging
import os
import stat
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TypeVar

import trio

from unionfs import copyup, whiteout
from unionfs.inodes import ROOT_INODE, InodeTable, Node, key_of
from unionfs.layers import (
    DataRef,
    DirFdCache,
    Found,
    Holder,
    Layer,
    ListedEntry,
    find_data,
    find_entry,
    holders,
    lstat_at,
    merged_listing,
    open_dir_at,
    open_parent,
    root_layers,
)
from unionfs.sysc import RENAME_EXCHANGE, RENAME_NOREPLACE, at_path, renameat2

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Read-only xattrs that tell where an entry comes from; answered, never listed.
VIRTUAL_XATTRS = frozenset({"user.unionfs.layer", "user.unionfs.layers",
                            "user.unionfs.copied-up"})

#: The mode bits chown(2) clears on a non-directory: set again after it. (The kernel
#: already dropped S_ISGID from a new entry's mode where the caller may not have it.)
_SETID = stat.S_ISUID | stat.S_ISGID

#: In a directory merged from this many layers, lookups use its merged listing.
LISTING_LOOKUP_LAYERS = 3


def _err(code: int, what: bytes | str = "") -> OSError:
    return OSError(code, os.strerror(code), what)


class Data(enum.Enum):
    """What a copy-up does with a regular file's data."""

    COPY = "copy"  # the data comes along (opened for writing, linked, renamed)
    DROP = "drop"  # the caller truncates it to zero at once: no data is needed
    LATER = "later"  # a metadata change: metadata only, the data stays below (metacopy)


@dataclass(frozen=True)
class Caller:
    """Who asks: the owner of what they create."""

    uid: int
    gid: int


@dataclass(frozen=True)
class SetAttrs:
    """What a setattr changes; None means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Union:
    """The merged view of a stack of layers, the upper (if any) on top."""

    def __init__(self, layers: list[Layer], work_fd: int | None, fsync: bool = True,
                 metacopy: bool = True, read_only: bool = False) -> None:
        self.layers = layers
        #: Metadata changes to a lower regular file copy up its metadata only.
        self.metacopy = metacopy
        #: False with ``-o fsync=0`` or ``volatile``: no fsync of copy-ups or on request.
        self.fsync = fsync
        #: The layer changes go to; None for a read-only mount (``-o ro`` shows an upper
        #: without writing to it: every change is EROFS).
        self.upper: Layer | None = (layers[0] if layers[0].writable and not read_only
                                    else None)
        self.work_fd = work_fd
        #: Per lower layer: its non-directories with several names, by st_ino (built on
        #: the first copy-up of such a file; a lower layer never changes).
        self._multi_linked: dict[int, dict[int, list[tuple[bytes, ...]]]] = {}
        self._scan_locks: dict[int, trio.Lock] = {}
        self.name_max = os.statvfs(layers[0].fd).f_namemax
        self.table = InodeTable()
        self.fds = DirFdCache()
        top = layers[0]
        self.root = Node(ROOT_INODE, None, b"", top, stat.S_IFDIR, root_layers(layers))
        self.root.lookups = 1
        self.table.add(self.root, key_of(os.fstat(top.fd)))

    # ---------------------------------------------------------------- locating

    def dir_fd(self, node: Node, layer: Layer) -> int:
        """A real fd of directory *node* in *layer*: cached, or opened from the nearest
        cached ancestor one component at a time (iteratively: paths may be deep)."""
        if node.parent is None:
            return layer.fd
        fd = self.fds.get((node.inode, layer.index))
        if fd is not None:
            return fd
        missing = [node]
        ancestor = node.parent
        while ancestor.parent is not None:
            fd = self.fds.get((ancestor.inode, layer.index))
            if fd is not None:
                break
            missing.append(ancestor)
            ancestor = ancestor.parent
        fd = layer.fd if ancestor.parent is None else self.fds.get((ancestor.inode, layer.index))
        assert fd is not None
        for step in reversed(missing):
            fd = open_dir_at(fd, step.name)
            self.fds.put((step.inode, layer.index), fd)
        return fd

    def location(self, node: Node) -> tuple[int, bytes]:
        """(directory fd, name) of the entry that holds *node*'s data and metadata."""
        assert node.parent is not None, "the root has no location"
        return self.dir_fd(node.parent, node.layer), node.name

    def _fd_of(self, node: Node) -> Callable[[Layer], int]:
        return functools.partial(self.dir_fd, node)

    def upper_fd(self, node: Node) -> int:
        assert self.upper is not None
        return self.dir_fd(node, self.upper)

    def _lower_layers(self, node: Node) -> tuple[Layer, ...]:
        return tuple(layer for layer in node.dir_layers if not layer.writable)

    def lower_has(self, parent: Node, name: bytes) -> bool:
        """True when *name* in *parent* resolves in the lower layers alone: deleting it
        from the merged view needs a whiteout."""
        return find_entry(self._lower_layers(parent), self._fd_of(parent), name) is not None

    # ---------------------------------------------------------------- lookup

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """The node for *name* in *parent*, or None. Does not count a kernel reference."""
        if len(name) > self.name_max:
            raise _err(errno.ENAMETOOLONG, name)
        if whiteout.is_marker_name(name):
            return None
        child = parent.children.get(name)
        if child is not None:
            return child
        if parent.listing is not None or len(parent.dir_layers) >= LISTING_LOOKUP_LAYERS:
            # The merged listing answers without a search through every layer.
            entry = self.listing(parent).get(name)
            listed = None if entry is None else self.child_for_listing(parent, entry)
            return None if listed is None else listed[0]
        found = find_entry(parent.dir_layers, self._fd_of(parent), name)
        if found is None:
            return None
        return self._node_for(parent, name, found)

    def _node_for(self, parent: Node, name: bytes, found: Found) -> Node:
        st = found.st
        layer = found.layer
        key = key_of(st)
        node = self.table.by_key(key)
        if node is not None and node.homeless and node.kind == stat.S_IFMT(st.st_mode):
            node.parent, node.name, node.layer = parent, name, layer
            node.homeless = False
        elif node is None or node.unlinked or node.kind != stat.S_IFMT(st.st_mode):
            node = Node(self.table.number_for(key_of(found.st)), parent, name, layer,
                        stat.S_IFMT(st.st_mode), found.dir_layers)
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                node.data = find_data(self.layers, parent.dir_layers, self._fd_of(parent),
                                      name, found)
                if node.data is not None and node.data.missing:
                    log.warning("%s: metadata-only file with %s",
                                os.fsdecode(name), node.data.missing)
            self.table.add(node, key)
        self.table.link(node, parent, name)
        return node

    def child_for_listing(self, parent: Node, entry: ListedEntry
                          ) -> tuple[Node, os.stat_result | None] | None:
        """The node of a listed entry (readdirplus), found without searching every layer
        again for non-directories; with the layer's stat when the node is new (its
        attributes are that stat)."""
        child = parent.children.get(entry.name)
        if child is not None:
            return child, None
        if entry.is_dir:
            found = find_entry(parent.dir_layers, self._fd_of(parent), entry.name)
        else:
            st = lstat_at(self.dir_fd(parent, entry.layer), entry.name)
            found = None if st is None else Found(entry.layer, st, ())
        if found is None:
            return None
        node = self._node_for(parent, entry.name, found)
        fresh = node.layer is found.layer and node.data is None and node.name == entry.name
        return node, (found.st if fresh and node.parent is parent else None)

    def listing(self, node: Node) -> dict[bytes, ListedEntry]:
        """The merged entries of directory *node*, cached until a change in it."""
        if node.listing is None:
            node.listing = merged_listing(node.dir_layers, self._fd_of(node))
        return node.listing

    def _changed(self, directory: Node, name: bytes, is_dir: bool | None) -> None:
        """*name* in *directory* is now an upper entry (a directory or not), or gone
        (*is_dir* None). A cached listing is updated in place, not rebuilt: creating
        many files in a merged directory must not list every layer each time."""
        directory.touched()
        listing = directory.listing
        if listing is None:
            return
        if is_dir is None:
            listing.pop(name, None)
        else:
            assert self.upper is not None
            listing[name] = ListedEntry(name, self.upper, is_dir)

    # ---------------------------------------------------------------- attributes

    def stat(self, node: Node) -> os.stat_result:
        """The layer's stat of *node*'s entry (not yet adjusted for the merged view)."""
        if node.unlinked or node.homeless:
            if node.open_fds:
                return os.fstat(node.open_fds[0])
            raise _err(errno.ENOENT)
        if node.is_dir:
            return os.fstat(self.dir_fd(node, node.layer))
        fd, name = self.location(node)
        st = lstat_at(fd, name)
        if st is None:
            if node.open_fds:
                return os.fstat(node.open_fds[0])
            raise _err(errno.ENOENT, name)
        return st

    def blocks(self, node: Node, st: os.stat_result) -> int:
        """Blocks in use: a metadata-only copy reports its lower data's, as the kernel does."""
        if node.data is None or node.data.missing:
            return st.st_blocks
        dir_fd, name = self.data_location(node)
        data = lstat_at(dir_fd, name)
        return st.st_blocks if data is None else data.st_blocks

    def nlink(self, node: Node, st: os.stat_result) -> int:
        if node.unlinked:
            return 0
        if node.is_dir:
            # Like the kernel: a directory merged from several layers reports 1
            # ("unknown", find(1) then does not trust it to count subdirectories).
            return 1 if len(node.dir_layers) > 1 else st.st_nlink
        return st.st_nlink

    # ---------------------------------------------------------------- copy-up

    def _need_upper(self) -> Layer:
        if self.upper is None:
            raise _err(errno.EROFS)
        return self.upper

    async def settle(self, node: Node) -> None:
        """Wait until no copy-up of *node* is under way."""
        while node.copying is not None:
            await node.copying.wait()

    async def copy_up(self, node: Node, data: Data = Data.COPY) -> None:
        """Make *node* live in the upper, its parents first; *data* says what becomes of
        a regular file's data."""
        upper = self._need_upper()
        await self.settle(node)
        if node.layer is not upper:
            assert node.parent is not None
            await self.copy_up(node.parent)
            await self.settle(node)
        if node.layer is not upper:
            async with self._copying(node):
                if node.is_dir:
                    self._copy_up_dir(node, upper)
                else:
                    await self._copy_up_file(node, upper, data)
        if node.data is not None and data is not Data.LATER:
            async with self._copying(node):
                await self._fill_data(node, data)

    @contextlib.asynccontextmanager
    async def _copying(self, node: Node) -> AsyncIterator[None]:
        """Mark *node* as being copied up: every change to it settles first."""
        node.copying = trio.Event()
        try:
            yield
        finally:
            event, node.copying = node.copying, None
            event.set()

    def data_location(self, node: Node) -> tuple[int, bytes]:
        """(directory fd, name) of the entry that holds *node*'s data: the entry below a
        metadata-only file, else the entry itself."""
        ref = node.data
        if ref is None:
            return self.location(node)
        ref.check()
        if ref.path is None:
            assert node.parent is not None
            return self.dir_fd(node.parent, ref.layer), ref.name
        key = (ref.layer.index, ref.path[:-1])
        fd = self.fds.get(key)
        if fd is None:
            fd = open_parent(ref.layer, ref.path)
            self.fds.put(key, fd)
        return fd, ref.name

    def data_source(self, node: Node) -> Layer:
        """The layer *node*'s data is read from (an open file changes it only by a
        copy-up of the data)."""
        return node.layer if node.data is None else node.data.layer

    async def _fill_data(self, node: Node, data: Data) -> None:
        """Give a metadata-only copy its data, in place. The metacopy mark goes only once
        the data is whole and synced, so a crash leaves the lower data in use."""
        assert node.data is not None
        dir_fd, name = self.location(node)
        dst = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if data is Data.COPY:
                st = os.fstat(dst)
                src_dir, src_name = self.data_location(node)
                src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=src_dir)
                try:
                    size = min(st.st_size, os.fstat(src).st_size)
                    # Invariant across this await: node.copying is set.
                    await trio.to_thread.run_sync(copyup.copy_data, src, dst, size, self.fsync)
                finally:
                    os.close(src)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            whiteout.clear_metacopy(dst)
        finally:
            os.close(dst)
        node.data = None
        node.touched()

    def _copy_up_dir(self, node: Node, upper: Layer) -> None:
        assert node.parent is not None and self.work_fd is not None
        src_fd = self.dir_fd(node, node.layer)
        tmp = copyup.make_dir_copy(src_fd, os.fstat(src_fd), self.work_fd)
        parent_fd = self.upper_fd(node.parent)
        try:
            with copyup.times_kept(parent_fd):
                os.rename(tmp, node.name, src_dir_fd=self.work_fd, dst_dir_fd=parent_fd)
        except BaseException:
            copyup.discard(self.work_fd, tmp)
            raise
        node.layer = upper
        node.dir_layers = (upper, *node.dir_layers)
        node.touched()
        self._changed(node.parent, node.name, True)
        self.table.remember_copy(node, key_of(os.fstat(self.dir_fd(node, upper))))

    async def _copy_up_file(self, node: Node, upper: Layer, data: Data) -> None:
        assert node.parent is not None and self.work_fd is not None
        work_fd = self.work_fd
        src_layer = node.layer
        src_dir, src_name = self.location(node)
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        # The data may be below the entry (a metadata-only file in a lower layer). An
        # upper mark without a redirect says "at the same path": only then can the data
        # stay where it is.
        below = node.data or DataRef(src_layer, node.name)
        metadata_only = (data is Data.LATER and self.metacopy and stat.S_ISREG(st.st_mode)
                         and st.st_nlink == 1 and st.st_size > 0
                         and below.path is None and below.name == node.name)
        src = dst = None
        if metadata_only:
            tmp = copyup.start_metadata_copy(src_dir, src_name, st, work_fd)
        else:
            data_dir, data_name = self.data_location(node)
            tmp, src, dst = copyup.start_file_copy(data_dir, data_name, st, work_fd,
                                                   with_data=data is not Data.DROP)
        if src is not None and dst is not None:
            try:
                # Invariant across this await: node.copying is set, so nothing else
                # changes this entry; the temporary is ours alone. Dir fds may have been
                # closed by the cache meanwhile: they are fetched again below.
                await trio.to_thread.run_sync(copyup.copy_data, src, dst, st.st_size,
                                             self.fsync)
            except BaseException:
                copyup.discard(work_fd, tmp)
                raise
            finally:
                os.close(src)
                os.close(dst)
        src_dir, src_name = self.location(node)
        copyup.finish_file_copy(src_dir, src_name, st, work_fd, tmp)
        parent_fd = self.upper_fd(node.parent)
        try:
            with copyup.times_kept(parent_fd):
                os.rename(tmp, node.name, src_dir_fd=work_fd, dst_dir_fd=parent_fd)
        except BaseException:
            copyup.discard(work_fd, tmp)
            raise
        node.layer = upper
        node.data = below if metadata_only else None
        node.touched()
        self._changed(node.parent, node.name, False)
        fd, name = self.location(node)
        new = os.stat(name, dir_fd=fd, follow_symlinks=False)
        self.table.remember_copy(node, key_of(new))
        if st.st_nlink > 1:
            await self._link_other_names(node, src_layer, st)

    async def _link_other_names(self, node: Node, layer: Layer, st: os.stat_result) -> None:
        """After copying up a lower inode with several names, link every other name of it
        that the merged view shows into the upper: the names stay one file, and the
        upper alone (what the kernel or a runtime reads) says so."""
        assert self.upper is not None
        own = self.relpath(node)
        for path in await self._other_names(layer, st):
            if path == own:
                continue
            parent = self._resolve_dir(path[:-1])
            if parent is None:
                continue
            found = find_entry(parent.dir_layers, self._fd_of(parent), path[-1])
            if found is None or found.layer is not layer or found.st.st_ino != st.st_ino:
                continue  # whited out or shadowed by a higher layer
            await self.copy_up(parent)
            src_dir, src_name = self.location(node)
            parent_fd = self.upper_fd(parent)
            with copyup.times_kept(parent_fd):
                os.link(src_name, path[-1], src_dir_fd=src_dir, dst_dir_fd=parent_fd,
                        follow_symlinks=False)
            self._changed(parent, path[-1], False)

    def relpath(self, node: Node) -> tuple[bytes, ...]:
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return tuple(reversed(parts))

    def _resolve_dir(self, path: tuple[bytes, ...]) -> Node | None:
        """The directory node at *path* in the merged view, or None."""
        node = self.root
        for name in path:
            child = self.lookup(node, name)
            if child is None or not child.is_dir:
                return None
            node = child
        return node

    async def _other_names(self, layer: Layer, st: os.stat_result) -> list[tuple[bytes, ...]]:
        """The paths of every name of the lower inode *st* in *layer*, found by one scan
        of the layer (in a worker thread: a layer may hold millions of entries), kept for
        the mount. One scan per layer: a second caller waits for the first."""
        table = self._multi_linked.get(layer.index)
        if table is None:
            async with self._scan_locks.setdefault(layer.index, trio.Lock()):
                table = self._multi_linked.get(layer.index)
                if table is None:
                    # Across this await other requests run; a lower layer never changes,
                    # so what the scan finds stays true. The scan opens its own fds.
                    table = await trio.to_thread.run_sync(scan_multi_linked, layer.fd)
                    self._multi_linked[layer.index] = table
        return table.get(st.st_ino, [])

    async def _name_in_upper(self, node: Node, parent: Node, name: bytes) -> None:
        """Make sure the entry *name* in *parent* (a name of *node*) exists in the upper.

        A hard link whose data was copied up through another name may still have this
        name only in a lower layer: link it to the upper copy.
        """
        await self.copy_up(node)
        await self.copy_up(parent)
        parent_fd = self.upper_fd(parent)
        if lstat_at(parent_fd, name) is None:
            src_dir, src_name = self.location(node)
            os.link(src_name, name, src_dir_fd=src_dir, dst_dir_fd=parent_fd,
                    follow_symlinks=False)

    # ---------------------------------------------------------------- creating

    @staticmethod
    def check_name(name: bytes) -> None:
        if whiteout.is_marker_name(name):
            # OCI layers reserve ".wh." names for their markers.
            raise _err(errno.EINVAL, name)

    async def _prepare_create(self, parent: Node, name: bytes) -> int:
        self._need_upper()
        self.check_name(name)
        if self.lookup(parent, name) is not None:
            raise _err(errno.EEXIST, name)
        if parent.layer is not self.upper:
            await self.copy_up(parent)
            if self.lookup(parent, name) is not None:  # created while we copied up
                raise _err(errno.EEXIST, name)
        return self.upper_fd(parent)

    def _owner(self, parent: Node, caller: Caller) -> tuple[int, int, bool]:
        pst = os.fstat(self.upper_fd(parent))
        setgid = bool(pst.st_mode & stat.S_ISGID)
        return caller.uid, (pst.st_gid if setgid else caller.gid), setgid

    def _place(self, parent: Node, name: bytes, build: Callable[[int, bytes], None],
               is_dir: bool) -> None:
        """Create *name* in the upper of *parent* with *build(dir_fd, name)*.

        Over a whiteout, the entry is built in the workdir first and renamed into
        place, so the name is never visible half-made; a directory that replaces a
        whiteout is made opaque, so the lower directory it deletes stays deleted.
        """
        assert self.work_fd is not None
        parent_fd = self.upper_fd(parent)
        existing = lstat_at(parent_fd, name)
        marker = whiteout.has_oci_whiteout(parent_fd, name)
        if existing is None and not marker:
            build(parent_fd, name)
            return
        # Built in the workdir; beside its name when the parent has a default ACL, for
        # the entry to inherit it (under a marker name: never visible, never creatable).
        build_fd = parent_fd if _has_default_acl(parent_fd) else self.work_fd
        tmp = (whiteout.WH_PREFIX if build_fd == parent_fd else b"") + copyup.temp_name()
        build(build_fd, tmp)
        try:
            if is_dir:
                fd = open_dir_at(build_fd, tmp)
                try:
                    whiteout.set_opaque(fd)
                finally:
                    os.close(fd)
            if existing is not None and is_dir:
                renameat2(build_fd, tmp, parent_fd, name, RENAME_EXCHANGE)
            else:
                os.rename(tmp, name, src_dir_fd=build_fd, dst_dir_fd=parent_fd)
        finally:
            copyup.discard(build_fd, tmp)
        if marker:
            os.unlink(whiteout.oci_whiteout_name(name), dir_fd=parent_fd)

    def _new_node(self, parent: Node, name: bytes, is_dir: bool = False) -> Node:
        """The node of an entry just made in the upper. A new directory never merges with
        a lower one: the name was free below, or hidden, or it was made opaque."""
        upper = self._need_upper()
        self._changed(parent, name, is_dir)
        st = os.stat(name, dir_fd=self.upper_fd(parent), follow_symlinks=False)
        return self._node_for(parent, name, Found(upper, st, (upper,) if is_dir else ()))

    async def create(self, parent: Node, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[Node, int]:
        """Create a regular file and open it; returns the node and the open fd."""
        await self._prepare_create(parent, name)
        uid, gid, _ = self._owner(parent, caller)
        access = flags & os.O_ACCMODE
        perm = stat.S_IMODE(mode)  # the kernel applied the umask
        opened: list[int] = []

        def build(dir_fd: int, entry: bytes) -> None:
            fd = os.open(entry, os.O_CREAT | os.O_EXCL | access | os.O_CLOEXEC, perm,
                         dir_fd=dir_fd)
            opened.append(fd)
            os.fchown(fd, uid, gid)
            if perm & _SETID:
                os.fchmod(fd, perm)  # chown cleared them

        try:
            self._place(parent, name, build, is_dir=False)
        except BaseException:
            for fd in opened:
                os.close(fd)
            raise
        return self._new_node(parent, name), opened[0]

    async def mkdir(self, parent: Node, name: bytes, mode: int, caller: Caller) -> Node:
        await self._prepare_create(parent, name)
        uid, gid, setgid = self._owner(parent, caller)
        perm = stat.S_IMODE(mode)  # the kernel applied the umask

        def build(dir_fd: int, entry: bytes) -> None:
            # Created with its mode (a default ACL of the parent needs it to compute the
            # new ACL), then given its owner; chown clears no bit of a directory.
            os.mkdir(entry, perm, dir_fd=dir_fd)
            os.chown(entry, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            if setgid or stat.S_IMODE(os.stat(entry, dir_fd=dir_fd).st_mode) != perm:
                os.chmod(entry, perm | (stat.S_ISGID if setgid else 0), dir_fd=dir_fd,
                         follow_symlinks=False)

        self._place(parent, name, build, is_dir=True)
        return self._new_node(parent, name, is_dir=True)

    async def mknod(self, parent: Node, name: bytes, mode: int, rdev: int,
                    caller: Caller) -> Node:
        if stat.S_ISCHR(mode) and rdev == 0:
            raise _err(errno.EPERM, name)  # a whiteout cannot be made through the union
        await self._prepare_create(parent, name)
        uid, gid, _ = self._owner(parent, caller)
        perm = stat.S_IMODE(mode)  # the kernel applied the umask

        def build(dir_fd: int, entry: bytes) -> None:
            os.mknod(entry, stat.S_IFMT(mode) | perm, rdev, dir_fd=dir_fd)
            os.chown(entry, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            if perm & _SETID:
                os.chmod(entry, perm, dir_fd=dir_fd, follow_symlinks=False)  # chown cleared

        self._place(parent, name, build, is_dir=False)
        return self._new_node(parent, name)

    async def symlink(self, parent: Node, name: bytes, target: bytes, caller: Caller) -> Node:
        await self._prepare_create(parent, name)
        uid, gid, _ = self._owner(parent, caller)

        def build(dir_fd: int, entry: bytes) -> None:
            os.symlink(target, entry, dir_fd=dir_fd)
            os.chown(entry, uid, gid, dir_fd=dir_fd, follow_symlinks=False)

        self._place(parent, name, build, is_dir=False)
        return self._new_node(parent, name)

    async def link(self, node: Node, parent: Node, name: bytes) -> Node:
        if node.is_dir:
            raise _err(errno.EPERM, name)
        await self._prepare_create(parent, name)
        await self.settle(node)
        await self.copy_up(node)
        src_dir, src_name = self.location(node)
        # Link through an O_PATH fd: the source's own dir fd may be evicted meanwhile.
        src = copyup.open_path(src_dir, src_name)
        try:
            def build(dir_fd: int, entry: bytes) -> None:
                os.link(copyup.proc_path(src), entry, dst_dir_fd=dir_fd, follow_symlinks=True)

            self._place(parent, name, build, is_dir=False)
        finally:
            os.close(src)
        self._changed(parent, name, False)
        node.touched()
        self.table.link(node, parent, name)
        return node

    # ---------------------------------------------------------------- removing

    def _remove_upper(self, parent_fd: int, name: bytes, need_whiteout: bool) -> None:
        """Remove the upper entry *name* (a file, or a directory holding only markers),
        leaving a whiteout in its place when a lower layer holds the name."""
        assert self.work_fd is not None
        tmp = copyup.temp_name()
        if need_whiteout:
            whiteout.rename_leaving_whiteout(parent_fd, name, self.work_fd, tmp)
        else:
            os.rename(name, tmp, src_dir_fd=parent_fd, dst_dir_fd=self.work_fd)
        copyup.discard(self.work_fd, tmp)

    async def unlink(self, parent: Node, name: bytes) -> None:
        self._need_upper()
        node = self.lookup(parent, name)
        if node is None:
            raise _err(errno.ENOENT, name)
        if node.is_dir:
            raise _err(errno.EISDIR, name)
        await self.settle(node)
        await self._index_lower_hard_link(node)
        await self.copy_up(parent)
        self._delete_name(parent, name, node)

    async def _index_lower_hard_link(self, node: Node) -> None:
        """Before one name of a lower inode with several names goes away, copy the inode
        up with all its names (as the kernel copies it into its index with index=on):
        its link count then lives on disk."""
        if node.is_dir or node.layer.writable:
            return
        if self.stat(node).st_nlink > 1:
            await self.copy_up(node)

    def _delete_name(self, parent: Node, name: bytes, node: Node) -> None:
        """Remove *name* (a non-directory name of *node*) from the merged view."""
        parent_fd = self.upper_fd(parent)
        need_whiteout = self.lower_has(parent, name)
        nlink = self.stat(node).st_nlink
        if lstat_at(parent_fd, name) is not None:
            if need_whiteout:
                self._remove_upper(parent_fd, name, True)
            else:
                os.unlink(name, dir_fd=parent_fd)
        else:
            whiteout.make_whiteout(parent_fd, name)
        self._changed(parent, name, None)
        node.touched()
        self.table.unlink(parent, name)
        self._after_unlink(node, parent, name, nlink)

    def _after_unlink(self, node: Node, parent: Node, name: bytes, nlink: int) -> None:
        """*name* in *parent*, a name of *node* (which had *nlink* links), is gone: point
        the node at another name it is known by, or mark it homeless or unlinked."""
        if node.parent is not parent or node.name != name:
            return
        for other_parent, other_name in list(node.links):
            found = find_entry(other_parent.dir_layers, self._fd_of(other_parent), other_name)
            if found is not None and key_of(found.st) in node.keys:
                node.parent, node.name, node.layer = other_parent, other_name, found.layer
                return
        if nlink > 1:
            node.homeless = True
        else:
            node.unlinked = True

    async def rmdir(self, parent: Node, name: bytes) -> None:
        self._need_upper()
        node = self.lookup(parent, name)
        if node is None:
            raise _err(errno.ENOENT, name)
        if not node.is_dir:
            raise _err(errno.ENOTDIR, name)
        await self.settle(node)
        if self.listing(node):
            raise _err(errno.ENOTEMPTY, name)
        await self.copy_up(parent)
        parent_fd = self.upper_fd(parent)
        need_whiteout = self.lower_has(parent, name)
        self.fds.drop_inode(node.inode, [layer.index for layer in node.dir_layers])
        if node.layer.writable:
            self._remove_upper(parent_fd, name, need_whiteout)
        else:
            whiteout.make_whiteout(parent_fd, name)
        self._changed(parent, name, None)
        self.table.unlink(parent, name)
        node.unlinked = True
        node.touched()

    # ---------------------------------------------------------------- renaming

    async def rename(self, old_parent: Node, old_name: bytes, new_parent: Node,
                     new_name: bytes, flags: int) -> None:
        self._need_upper()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
                flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise _err(errno.EINVAL)
        self.check_name(new_name)
        src = self.lookup(old_parent, old_name)
        if src is None:
            raise _err(errno.ENOENT, old_name)
        dst = self.lookup(new_parent, new_name)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise _err(errno.ENOENT, new_name)
            await self._exchange(src, old_parent, old_name, dst, new_parent, new_name)
            return
        if dst is src:
            return  # two names of one file: rename(2) does nothing
        if dst is not None and flags & RENAME_NOREPLACE:
            raise _err(errno.EEXIST, new_name)
        if src.is_dir:
            if dst is not None and not dst.is_dir:
                raise _err(errno.ENOTDIR, new_name)
            self._check_movable(src, old_name)
        elif dst is not None and dst.is_dir:
            raise _err(errno.EISDIR, new_name)
        if dst is not None and dst.is_dir and self.listing(dst):
            raise _err(errno.ENOTEMPTY, new_name)
        await self.settle(src)
        if dst is not None:
            await self.settle(dst)
            await self._index_lower_hard_link(dst)
        await self._name_in_upper(src, old_parent, old_name)
        await self.copy_up(new_parent)
        self._do_rename(src, old_parent, old_name, new_parent, new_name, dst)

    @staticmethod
    def _check_movable(node: Node, name: bytes) -> None:
        if node.is_dir and (not node.layer.writable or len(node.dir_layers) > 1):
            # Like the kernel without redirect_dir: a directory that exists in a lower
            # layer cannot be moved; mv(1) falls back to copying.
            raise _err(errno.EXDEV, name)

    async def _exchange(self, a: Node, a_parent: Node, a_name: bytes,
                        b: Node, b_parent: Node, b_name: bytes) -> None:
        """RENAME_EXCHANGE: both names stay, so no whiteout is needed; both entries are
        brought into the upper and swapped there in one renameat2."""
        if a is b:
            return
        self._check_movable(a, a_name)
        self._check_movable(b, b_name)
        await self.settle(a)
        await self.settle(b)
        await self._name_in_upper(a, a_parent, a_name)
        await self._name_in_upper(b, b_parent, b_name)
        # No await from here on: the swap on disk and in the node tree is atomic.
        for moved, parent, name in ((a, b_parent, b_name), (b, a_parent, a_name)):
            if moved.is_dir and self.lower_has(parent, name):
                whiteout.set_opaque(self.dir_fd(moved, moved.layer))  # see _do_rename
        renameat2(self.upper_fd(a_parent), a_name, self.upper_fd(b_parent), b_name,
                  RENAME_EXCHANGE)
        self._changed(a_parent, a_name, b.is_dir)
        self._changed(b_parent, b_name, a.is_dir)
        self.table.unlink(a_parent, a_name)
        self.table.unlink(b_parent, b_name)
        for moved, old, new in ((a, (a_parent, a_name), (b_parent, b_name)),
                                (b, (b_parent, b_name), (a_parent, a_name))):
            if (moved.parent, moved.name) == old:
                moved.parent, moved.name = new
            self.table.link(moved, *new)
            moved.touched()

    def _do_rename(self, src: Node, old_parent: Node, old_name: bytes, new_parent: Node,
                   new_name: bytes, dst: Node | None) -> None:
        """The rename on disk and in the node tree. No await: atomic for trio."""
        old_fd = self.upper_fd(old_parent)
        new_fd = self.upper_fd(new_parent)
        src_whiteout = self.lower_has(old_parent, old_name)
        dst_upper = lstat_at(new_fd, new_name)
        dst_nlink = self.stat(dst).st_nlink if dst is not None and not dst.is_dir else 0
        if src.is_dir and self.lower_has(new_parent, new_name):
            # The moved directory replaces a lower one: it must not merge with it.
            whiteout.set_opaque(self.dir_fd(src, src.layer))
        if dst_upper is not None and stat.S_ISDIR(dst_upper.st_mode):
            # An empty merged directory may still hold whiteouts in the upper.
            self._empty_upper_dir(new_fd, new_name)
        if dst_upper is not None and whiteout.is_whiteout(dst_upper) and src.is_dir:
            renameat2(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
            if not src_whiteout:
                os.unlink(old_name, dir_fd=old_fd)
        elif src_whiteout:
            whiteout.rename_leaving_whiteout(old_fd, old_name, new_fd, new_name)
        else:
            os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        if whiteout.has_oci_whiteout(new_fd, new_name):
            os.unlink(whiteout.oci_whiteout_name(new_name), dir_fd=new_fd)
        self._changed(old_parent, old_name, None)
        self._changed(new_parent, new_name, src.is_dir)
        src.touched()
        if dst is not None:
            dst.touched()
            self.table.unlink(new_parent, new_name)
            if dst.is_dir:
                dst.unlinked = True
            else:
                self._after_unlink(dst, new_parent, new_name, dst_nlink)
        self.table.unlink(old_parent, old_name)
        if src.parent is old_parent and src.name == old_name:
            src.parent, src.name = new_parent, new_name
        self.table.link(src, new_parent, new_name)

    def _empty_upper_dir(self, parent_fd: int, name: bytes) -> None:
        fd = open_dir_at(parent_fd, name)
        try:
            for entry in os.listdir(fd):
                copyup.discard(fd, os.fsencode(entry))
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- changing

    async def setattr(self, node: Node, attrs: SetAttrs, fd: int | None) -> None:
        node.touched()
        if node.parent is not None:
            if attrs.size is None:
                data = Data.LATER
            else:
                data = Data.DROP if attrs.size == 0 else Data.COPY
            await self.copy_up(node, data)
        elif self.upper is None:
            raise _err(errno.EROFS)
        if attrs.size is not None:
            if fd is not None:
                os.ftruncate(fd, attrs.size)
            else:
                dir_fd, name = self.location(node)
                wfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    os.ftruncate(wfd, attrs.size)
                finally:
                    os.close(wfd)
        if attrs.uid is not None or attrs.gid is not None:
            self._at(node, lambda d, n: os.chown(
                n, -1 if attrs.uid is None else attrs.uid,
                -1 if attrs.gid is None else attrs.gid, dir_fd=d, follow_symlinks=False),
                lambda fd_: os.chown(fd_, -1 if attrs.uid is None else attrs.uid,
                                     -1 if attrs.gid is None else attrs.gid))
        if attrs.mode is not None:
            mode = stat.S_IMODE(attrs.mode)
            self._at(node, lambda d, n: os.chmod(n, mode, dir_fd=d, follow_symlinks=False),
                     lambda fd_: os.chmod(fd_, mode))
        if attrs.atime_ns is not None or attrs.mtime_ns is not None:
            st = self.stat(node)
            times = (st.st_atime_ns if attrs.atime_ns is None else attrs.atime_ns,
                     st.st_mtime_ns if attrs.mtime_ns is None else attrs.mtime_ns)
            self._at(node, lambda d, n: os.utime(n, ns=times, dir_fd=d, follow_symlinks=False),
                     lambda fd_: os.utime(fd_, ns=times))

    def _at(self, node: Node, at: Callable[[int, bytes], None],
            on_fd: Callable[[int], None]) -> None:
        """Apply a metadata change to *node*'s entry: by (dir fd, name), or on the
        directory fd itself for the root."""
        if node.parent is None:
            on_fd(self.dir_fd(node, node.layer))
        else:
            dir_fd, name = self.location(node)
            at(dir_fd, name)

    # ---------------------------------------------------------------- files

    async def open(self, node: Node, flags: int) -> int:
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writing:
            await self.copy_up(node, Data.DROP if flags & os.O_TRUNC else Data.COPY)
            if flags & os.O_TRUNC:
                node.touched()
        dir_fd, name = self.data_location(node)
        keep = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
        return os.open(name, keep | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)

    def reopen(self, node: Node, fd: int) -> int:
        """Open *node*'s current entry with the access mode of *fd*."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK)
        dir_fd, name = self.data_location(node)
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)

    def readlink(self, node: Node) -> bytes:
        dir_fd, name = self.location(node)
        return os.readlink(name, dir_fd=dir_fd)

    # ---------------------------------------------------------------- xattrs

    def _xattr_call(self, node: Node, call: Callable[..., T], *args: object) -> T:
        """An os.*xattr call on *node*'s entry itself (a symlink is not followed)."""
        if node.is_dir:
            return call(self.dir_fd(node, node.layer), *args)
        dir_fd, name = self.location(node)
        return call(at_path(dir_fd, name), *args, follow_symlinks=False)

    def getxattr(self, node: Node, name: str) -> bytes:
        if name in VIRTUAL_XATTRS:
            return self.virtual_xattr(node, name)
        if whiteout.is_internal_xattr(name):
            raise _err(errno.ENODATA)
        return self._xattr_call(node, os.getxattr, name)

    def listxattr(self, node: Node) -> list[str]:
        names = self._xattr_call(node, os.listxattr)
        return [name for name in names if not whiteout.is_internal_xattr(name)]

    async def setxattr(self, node: Node, name: str, value: bytes) -> None:
        self._need_upper()
        if name in VIRTUAL_XATTRS:
            raise _err(errno.EPERM)
        if whiteout.is_internal_xattr(name):
            raise _err(errno.EPERM)
        await self._copy_up_any(node)
        self._xattr_call(node, os.setxattr, name, value)
        node.touched()  # ctime, and the mode when it is an ACL

    async def removexattr(self, node: Node, name: str) -> None:
        self._need_upper()
        if name in VIRTUAL_XATTRS:
            raise _err(errno.EPERM)
        if whiteout.is_internal_xattr(name):
            raise _err(errno.ENODATA)
        self._need_upper()
        self.getxattr(node, name)  # ENODATA before any copy-up
        await self._copy_up_any(node)
        self._xattr_call(node, os.removexattr, name)
        node.touched()

    async def _copy_up_any(self, node: Node) -> None:
        if node.parent is None:
            self._need_upper()
        else:
            await self.copy_up(node, Data.LATER)

    def virtual_xattr(self, node: Node, name: str) -> bytes:
        """Answers to "where does this entry come from?" (read-only, never listed)."""
        if name == "user.unionfs.layer":
            return os.fsencode(node.layer.label)
        holders = self.holders(node)
        if name == "user.unionfs.layers":
            return b"".join(b"%s %s\n" % (held.kind.encode(), os.fsencode(held.layer.label))
                            for held in holders)
        shadows = node.layer.writable and any(not held.layer.writable for held in holders)
        return b"yes" if shadows else b"no"

    def holders(self, node: Node) -> list[Holder]:
        """Every layer that holds *node*'s name, top first, with what it holds there."""
        if node.parent is None:
            return [Holder(layer, "dir") for layer in node.dir_layers]
        return holders(node.parent.dir_layers, self._fd_of(node.parent), node.name)

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.layers[0].fd)

    # ---------------------------------------------------------------- forget

    def forget(self, inode: int, count: int) -> None:
        node = self.table.forget(inode, count)
        if node is not None and node.is_dir:
            self.fds.drop_inode(node.inode, [layer.index for layer in self.layers])


def scan_multi_linked(root_fd: int) -> dict[int, list[tuple[bytes, ...]]]:
    """Every non-directory with several names under *root_fd*: st_ino -> paths.

    Walks with directory fds and never follows a symlink.
    """
    result: dict[int, list[tuple[bytes, ...]]] = {}
    stack: list[tuple[int, tuple[bytes, ...]]] = [(os.dup(root_fd), ())]
    while stack:
        fd, path = stack.pop()
        try:
            with os.scandir(fd) as it:
                for entry in it:
                    name = os.fsencode(entry.name)
                    if entry.is_dir(follow_symlinks=False):
                        try:
                            stack.append((open_dir_at(fd, name), (*path, name)))
                        except OSError:
                            continue
                    else:
                        st = entry.stat(follow_symlinks=False)
                        if st.st_nlink > 1:
                            result.setdefault(st.st_ino, []).append((*path, name))
        finally:
            os.close(fd)
    return result


def _has_default_acl(dir_fd: int) -> bool:
    try:
        os.getxattr(dir_fd, "system.posix_acl_default")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True
