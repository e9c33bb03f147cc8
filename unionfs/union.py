"""The merged view: nodes, directory fds, lookup, listings and what a reply needs.

Plain Python (no pyfuse3; `ops.py` adapts it to FUSE). It writes nothing to disk:
copy-up (`copyup.py`) and every change (`changes.py`, `removal.py`) do, and tell the
view what they did (`entry_changed`, `Node.changed`). Core code raises OSError with
the errno the caller should see.

Directory fds come from a bounded cache (`layers.DirFdCache`): a fd obtained here is
valid until the next call that may open another one, and never across an ``await``.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import logging
import os
import stat
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from unionfs import whiteout
from unionfs.inodes import ROOT_INODE, InodeTable, Node, NodeState, key_of
from unionfs.layers import (
    DirFdCache,
    Found,
    Held,
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
from unionfs.sysc import at_path

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Read-only xattrs that tell where an entry comes from; answered, never listed.
VIRTUAL_XATTRS = frozenset({"user.unionfs.layer", "user.unionfs.layers",
                            "user.unionfs.copied-up"})

#: In a directory merged from this many layers, lookups use its merged listing.
LISTING_LOOKUP_LAYERS = 3


def error(code: int, what: bytes | str = "") -> OSError:
    """The OSError for *code*, naming *what*."""
    return OSError(code, os.strerror(code), what)


@dataclass(frozen=True)
class Attributes:
    """What a reply says of a node: its entry's stat, adjusted for the merged view."""

    mode: int
    nlink: int
    uid: int
    gid: int
    rdev: int
    size: int
    blksize: int
    blocks: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


class Union:
    """The merged view of a stack of layers, the upper (if any) on top."""

    def __init__(self, layers: Sequence[Layer], read_only: bool = False) -> None:
        self.layers = tuple(layers)
        #: The layer changes go to; None for a read-only mount (``-o ro`` shows an upper
        #: without writing to it: every change is EROFS).
        self.upper: Layer | None = (layers[0] if layers[0].writable and not read_only
                                    else None)
        self.name_max = os.statvfs(layers[0].fd).f_namemax
        self.table = InodeTable()
        self.fds = DirFdCache()
        top = layers[0]
        self.root = Node(ROOT_INODE, None, b"", top, stat.S_IFDIR, root_layers(layers))
        self.root.lookups = 1
        self.table.add(self.root, key_of(os.fstat(top.fd)))

    def need_upper(self) -> Layer:
        """The upper, for a change; EROFS on a read-only mount."""
        if self.upper is None:
            raise error(errno.EROFS)
        return self.upper

    @staticmethod
    def check_new_name(name: bytes) -> None:
        """EINVAL for a name no entry may take: OCI layers reserve it for their markers."""
        if whiteout.is_marker_name(name):
            raise error(errno.EINVAL, name)

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
        """(directory fd, name) of the entry that holds *node*'s metadata."""
        assert node.parent is not None, "the root has no location"
        return self.dir_fd(node.parent, node.layer), node.name

    def fd_of(self, node: Node) -> Callable[[Layer], int]:
        """The fd of directory *node* in a layer, as `layers` asks for it."""
        return functools.partial(self.dir_fd, node)

    def upper_fd(self, node: Node) -> int:
        return self.dir_fd(node, self.need_upper())

    def lower_has(self, parent: Node, name: bytes) -> bool:
        """True when *name* in *parent* resolves in the lower layers alone: deleting it
        from the merged view needs a whiteout."""
        lowers = tuple(layer for layer in parent.dir_layers if not layer.writable)
        return find_entry(lowers, self.fd_of(parent), name) is not None

    def data_location(self, node: Node) -> tuple[int, bytes]:
        """(directory fd, name) of the file that holds *node*'s data: the file below a
        metadata-only one, else its entry. EIO when that data is missing."""
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
        """The layer *node*'s data is read from (it changes only by a copy-up of data)."""
        return node.layer if node.data is None else node.data.layer

    def relpath(self, node: Node) -> tuple[bytes, ...]:
        parts = []
        while node.parent is not None:
            parts.append(node.name)
            node = node.parent
        return tuple(reversed(parts))

    def resolve_dir(self, path: tuple[bytes, ...]) -> Node | None:
        """The directory node at *path* in the merged view, or None."""
        node = self.root
        for name in path:
            child = self.lookup(node, name)
            if child is None or not child.is_dir:
                return None
            node = child
        return node

    # ---------------------------------------------------------------- lookup

    def lookup(self, parent: Node, name: bytes) -> Node | None:
        """The node for *name* in *parent*, or None. Does not count a kernel reference."""
        if len(name) > self.name_max:
            raise error(errno.ENAMETOOLONG, name)
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
        found = find_entry(parent.dir_layers, self.fd_of(parent), name)
        if found is None:
            return None
        return self.node_for(parent, name, found)

    def node_for(self, parent: Node, name: bytes, found: Found) -> Node:
        """The node of the entry *found* for *name* in *parent* (an existing one for the
        same layer inode: a hard link, or a homeless node finding its new name)."""
        st = found.st
        key = key_of(st)
        kind = stat.S_IFMT(st.st_mode)
        node = self.table.by_key(key)
        if node is not None and node.state is NodeState.HOMELESS and node.kind == kind:
            node.parent, node.name, node.layer = parent, name, found.layer
            node.state = NodeState.LIVE
        elif node is None or node.state is NodeState.UNLINKED or node.kind != kind:
            node = Node(self.table.number_for(key), parent, name, found.layer, kind,
                        found.dir_layers)
            if stat.S_ISREG(st.st_mode) and st.st_size > 0:
                node.data = find_data(self.layers, parent.dir_layers, self.fd_of(parent),
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
            found = find_entry(parent.dir_layers, self.fd_of(parent), entry.name)
        else:
            st = lstat_at(self.dir_fd(parent, entry.layer), entry.name)
            found = None if st is None else Found(entry.layer, st, ())
        if found is None:
            return None
        node = self.node_for(parent, entry.name, found)
        fresh = node.layer is found.layer and node.data is None and node.name == entry.name
        return node, (found.st if fresh and node.parent is parent else None)

    def listing(self, node: Node) -> dict[bytes, ListedEntry]:
        """The merged entries of directory *node*, cached until a change in it."""
        if node.listing is None:
            node.listing = merged_listing(node.dir_layers, self.fd_of(node))
        return node.listing

    def drop_listing(self, node: Node) -> None:
        """Nothing reads directory *node* any more: forget its merged listing, unless its
        lookups use it (a directory merged from many layers). A walk of a large tree
        would otherwise keep an entry per name."""
        if len(node.dir_layers) < LISTING_LOOKUP_LAYERS:
            node.listing = None

    def entry_changed(self, directory: Node, name: bytes, is_dir: bool | None) -> None:
        """*name* in *directory* is now an upper entry (a directory or not), or gone
        (*is_dir* None). A cached listing is updated in place, not rebuilt: creating
        many files in a merged directory must not list every layer each time."""
        directory.changed()
        listing = directory.listing
        if listing is None:
            return
        if is_dir is None:
            listing.pop(name, None)
        else:
            listing[name] = ListedEntry(name, self.need_upper(), is_dir)

    # ---------------------------------------------------------------- attributes

    def stat(self, node: Node) -> os.stat_result:
        """The layer's stat of *node*'s entry (not yet adjusted for the merged view)."""
        open_fd = node.open_fd()
        if not node.live:
            if open_fd is not None:
                return os.fstat(open_fd)
            raise error(errno.ENOENT)
        if node.is_dir:
            return os.fstat(self.dir_fd(node, node.layer))
        fd, name = self.location(node)
        st = lstat_at(fd, name)
        if st is None:
            if open_fd is not None:
                return os.fstat(open_fd)
            raise error(errno.ENOENT, name)
        return st

    def attributes(self, node: Node, st: os.stat_result | None = None) -> Attributes:
        """What a reply says of *node*; *st* is its entry's stat when the caller has it."""
        if st is None:
            st = self.stat(node)
        return Attributes(st.st_mode, self._nlink(node, st), st.st_uid, st.st_gid, st.st_rdev,
                          st.st_size, st.st_blksize, self._blocks(node, st), st.st_atime_ns,
                          st.st_mtime_ns, st.st_ctime_ns)

    def _blocks(self, node: Node, st: os.stat_result) -> int:
        """Blocks in use: a metadata-only file reports its data's, as the kernel does."""
        if node.data is None or node.data.missing:
            return st.st_blocks
        dir_fd, name = self.data_location(node)
        data = lstat_at(dir_fd, name)
        return st.st_blocks if data is None else data.st_blocks

    @staticmethod
    def _nlink(node: Node, st: os.stat_result) -> int:
        if node.state is NodeState.UNLINKED:
            return 0
        if node.is_dir:
            # Like the kernel: a directory merged from several layers reports 1
            # ("unknown", find(1) then does not trust it to count subdirectories).
            return 1 if len(node.dir_layers) > 1 else st.st_nlink
        return st.st_nlink

    # ---------------------------------------------------------------- reading

    def open_data(self, node: Node, flags: int) -> int:
        """Open the file holding *node*'s data with *flags* (its entry for writing)."""
        dir_fd, name = self.data_location(node)
        keep = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND)
        return os.open(name, keep | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)

    def reopen(self, node: Node, fd: int) -> int:
        """Open *node*'s current data with the access mode of *fd*."""
        flags = fcntl.fcntl(fd, fcntl.F_GETFL) & (os.O_ACCMODE | os.O_NONBLOCK)
        return self.open_data(node, flags)

    def readlink(self, node: Node) -> bytes:
        dir_fd, name = self.location(node)
        return os.readlink(name, dir_fd=dir_fd)

    def xattr_call(self, node: Node, call: Callable[..., T], *args: object) -> T:
        """An os.*xattr call on *node*'s entry itself (a symlink is not followed)."""
        if node.is_dir:
            return call(self.dir_fd(node, node.layer), *args)
        dir_fd, name = self.location(node)
        return call(at_path(dir_fd, name), *args, follow_symlinks=False)

    def getxattr(self, node: Node, name: str) -> bytes:
        if name in VIRTUAL_XATTRS:
            return self._virtual_xattr(node, name)
        if whiteout.is_internal_xattr(name):
            raise error(errno.ENODATA)
        return self.xattr_call(node, os.getxattr, name)

    def listxattr(self, node: Node) -> list[str]:
        names = self.xattr_call(node, os.listxattr)
        return [name for name in names if not whiteout.is_internal_xattr(name)]

    def _virtual_xattr(self, node: Node, name: str) -> bytes:
        """Answers to "where does this entry come from?" (read-only, never listed)."""
        if name == "user.unionfs.layer":
            return os.fsencode(node.layer.label)
        if node.parent is None:
            held = [Holder(layer, Held.DIR) for layer in node.dir_layers]
        else:
            held = holders(node.parent.dir_layers, self.fd_of(node.parent), node.name)
        if name == "user.unionfs.layers":
            return b"".join(b"%s %s\n" % (h.kind.value.encode(), os.fsencode(h.layer.label))
                            for h in held)
        shadows = node.layer.writable and any(not h.layer.writable for h in held)
        return b"yes" if shadows else b"no"

    def statvfs(self) -> os.statvfs_result:
        return os.statvfs(self.layers[0].fd)

    # ---------------------------------------------------------------- forget

    def forget(self, inode: int, count: int) -> None:
        node = self.table.forget(inode, count)
        if node is not None and node.is_dir:
            self.fds.drop_inode(node.inode, [layer.index for layer in self.layers])
