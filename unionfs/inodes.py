"""Inode numbers, lookup counts and forget; the file- and dir-handle tables.

Inode numbers: a node's number comes from the layer inode of its origin (the
entry it was first found as), like kernel overlayfs with all layers on one
filesystem: ``st_ino`` for the first filesystem seen, with the filesystem's
ordinal in the top bits for the others. A copied-up entry keeps its number for
the life of the mount (`InodeTable.remember_copy`), so ``st_ino`` is stable
across copy-up, and two names of one layer inode (hard links) are one node.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from unionfs.layers import DataRef, Layer, ListedEntry

ROOT_INODE = 1
_NO_CHILDREN: dict[bytes, Node] = {}
#: A layer entry's identity, (st_dev, st_ino), as one int (a tuple of two ints costs
#: twice as much, and there is one per node).
Key = int
_INO_BITS = 64


def key_of(st: os.stat_result) -> Key:
    return (st.st_dev << _INO_BITS) | st.st_ino


class NodeState(enum.Enum):
    """Where a node's entry is."""

    #: at (parent, name) in node.layer
    LIVE = "live"
    #: the name it was reached by is gone, but other names of the inode remain
    #: (nlink > 0): the next lookup of one of them gives the node its new home
    HOMELESS = "homeless"
    #: its last name is gone; it lives on while open (its data until forget)
    UNLINKED = "unlinked"


class Node:
    """One inode of the merged view.

    ``parent``/``name``/``layer`` say where its entry lives now (while `state` is LIVE).
    ``dir_layers`` is, for a directory, every layer whose directory merges into it (top
    first). ``links`` is every (parent, name) under which the kernel knows this node.
    ``version`` counts changes to its attributes: a cache of them is good while it is
    unchanged.
    """

    __slots__ = (
        "_keys",
        "_links",
        "children",
        "data",
        "dir_layers",
        "handles",
        "inode",
        "kind",
        "layer",
        "listing",
        "lookups",
        "name",
        "parent",
        "state",
        "version",
    )

    def __init__(self, inode: int, parent: Node | None, name: bytes, layer: Layer, kind: int,
                 dir_layers: tuple[Layer, ...] = ()) -> None:
        self.inode = inode
        self.parent = parent
        self.name = name
        self.layer = layer
        self.kind = kind
        self.dir_layers = dir_layers
        self.state = NodeState.LIVE
        self.lookups = 0
        self.version = 0
        #: Directories only; the others share one empty dict that nothing adds to
        #: (`InodeTable.link` takes directories as parents).
        self.children: dict[bytes, Node] = {} if kind == stat.S_IFDIR else _NO_CHILDREN
        # Stored flat, as nearly every node has one of each and a walk of a large tree
        # keeps a node per entry: links as (parent, name, parent, name, ...), one key as
        # the int itself (a tuple of pairs costs 104 bytes a node, a 1-tuple 48).
        self._links: tuple[Node | bytes, ...] = ()
        self._keys: Key | tuple[Key, ...] = ()
        self.listing: dict[bytes, ListedEntry] | None = None
        #: For a metadata-only file (a metacopy mark, in the upper or a lower layer):
        #: where its data is, in a layer below its entry.
        self.data: DataRef | None = None
        #: Its open files (an unlinked file's attributes come from one of them).
        self.handles: list[FileHandle] | None = None

    @property
    def links(self) -> tuple[tuple[Node, bytes], ...]:
        """Every (parent, name) under which the kernel knows this node."""
        flat = self._links
        return tuple(zip(flat[::2], flat[1::2], strict=True))  # type: ignore[arg-type]

    @links.setter
    def links(self, pairs: tuple[tuple[Node, bytes], ...]) -> None:
        self._links = tuple(item for pair in pairs for item in pair)

    def has_link(self, parent: Node, name: bytes) -> bool:
        flat = self._links
        return any(flat[i] is parent and flat[i + 1] == name for i in range(0, len(flat), 2))

    def add_link(self, parent: Node, name: bytes) -> None:
        if not self.has_link(parent, name):
            self._links = (*self._links, parent, name)

    def drop_link(self, parent: Node, name: bytes) -> None:
        self.links = tuple(pair for pair in self.links
                           if pair[0] is not parent or pair[1] != name)

    @property
    def keys(self) -> tuple[Key, ...]:
        """The layer entries this node is (its origin, then its copies)."""
        keys = self._keys
        return (keys,) if isinstance(keys, int) else keys

    def add_key(self, key: Key) -> None:
        keys = self._keys
        if keys == ():
            self._keys = key
        elif key not in self.keys:
            self._keys = (*self.keys, key)

    def changed(self) -> None:
        """Its attributes (or those of its entry) changed."""
        self.version += 1

    @property
    def is_dir(self) -> bool:
        return self.kind == stat.S_IFDIR

    @property
    def live(self) -> bool:
        return self.state is NodeState.LIVE

    def open_fd(self) -> int | None:
        """An fd of one of its open files, if any."""
        return self.handles[0].fd if self.handles else None

    def __repr__(self) -> str:
        return f"<Node {self.inode} {self.name!r} in {self.layer!r} {self.state.value}>"


class InodeTable:
    """Live nodes by number and by layer key; lookup counts live here alone."""

    def __init__(self) -> None:
        self.nodes: dict[int, Node] = {}
        self._by_key: dict[Key, Node] = {}
        self._copied: dict[Key, int] = {}
        self._devs: dict[int, int] = {}
        self._fresh = 1 << 62

    def __getitem__(self, inode: int) -> Node:
        return self.nodes[inode]

    def get(self, inode: int) -> Node | None:
        return self.nodes.get(inode)

    def by_key(self, key: Key) -> Node | None:
        return self._by_key.get(key)

    def number_for(self, key: Key) -> int:
        """The inode number for a layer entry, unique among live nodes."""
        number = self._copied.get(key)
        if number is None:
            dev, ino = key >> _INO_BITS, key & ((1 << _INO_BITS) - 1)
            ordinal = self._devs.get(dev)
            if ordinal is None:
                ordinal = self._devs[dev] = len(self._devs)
            number = ino if ordinal == 0 else (ordinal << 56) ^ ino
        if number <= ROOT_INODE or number in self.nodes:
            self._fresh += 1
            number = self._fresh
        return number

    def add(self, node: Node, key: Key) -> None:
        self.nodes[node.inode] = node
        self.add_key(node, key)

    def add_key(self, node: Node, key: Key) -> None:
        node.add_key(key)
        self._by_key[key] = node

    def remember_copy(self, node: Node, key: Key) -> None:
        """Record that *node* now lives at the layer entry *key* (after copy-up)."""
        self._copied[key] = node.inode
        self.add_key(node, key)

    def link(self, node: Node, parent: Node, name: bytes) -> None:
        """Record that *node* is known to the kernel as *name* in *parent*."""
        assert parent.is_dir, parent
        old = parent.children.get(name)
        if old is not None and old is not node:
            old.drop_link(parent, name)
        parent.children[name] = node
        node.add_link(parent, name)

    def unlink(self, parent: Node, name: bytes) -> Node | None:
        node = parent.children.pop(name, None)
        if node is not None:
            node.drop_link(parent, name)
        return node

    def remember(self, node: Node) -> None:
        """Count one more reference handed to the kernel (lookup, create, readdirplus)."""
        node.lookups += 1

    def forget(self, inode: int, count: int) -> Node | None:
        """Drop *count* kernel references; returns the node when it is gone."""
        node = self.nodes.get(inode)
        if node is None or inode == ROOT_INODE:
            return None
        node.lookups -= count
        if node.lookups > 0:
            return None
        del self.nodes[inode]
        for key in node.keys:
            if self._by_key.get(key) is node:
                del self._by_key[key]
        for parent, name in node.links:
            if parent.children.get(name) is node:
                del parent.children[name]
        node.links = ()
        return node


class FileHandle:
    """An open file of the merged view: it owns its fd, and knows the layer the fd
    reads. A file opened read-only before its node's data was copied up reads the copy
    from then on (as kernel overlayfs does): `fd_for` reopens it."""

    def __init__(self, node: Node, fd: int, source: Layer) -> None:
        self.node = node
        self.fd = fd
        self.source = source
        #: With the kernel's writeback cache: the node's mtime as the kernel has it,
        #: which `Changes.write` keeps on the upper over its writes.
        self.kernel_mtime_ns: int | None = None
        if node.handles is None:
            node.handles = []
        node.handles.append(self)

    def fd_for(self, source: Layer, reopen: Callable[[Node, int], int]) -> int:
        """The fd to read *source*, the layer the node's data is in now:
        *reopen(node, fd)* opens it with the access mode of the current fd."""
        if source is not self.source and self.node.state is not NodeState.UNLINKED:
            fd = reopen(self.node, self.fd)
            os.close(self.fd)
            self.fd, self.source = fd, source
        return self.fd

    def close(self) -> None:
        if self.node.handles is not None and self in self.node.handles:
            self.node.handles.remove(self)
        os.close(self.fd)


@dataclass
class DirHandle:
    node: Node
    #: The snapshot the offsets index; None until the first readdir takes it.
    entries: list[ListedEntry] | None = None


class HandleTable:
    """Open files and directories by handle number (never reusing inode numbers)."""

    def __init__(self) -> None:
        self.files: dict[int, FileHandle] = {}
        self.dirs: dict[int, DirHandle] = {}
        self._next = 0

    def _number(self) -> int:
        self._next += 1
        return self._next

    def add_file(self, handle: FileHandle) -> int:
        fh = self._number()
        self.files[fh] = handle
        return fh

    def add_dir(self, handle: DirHandle) -> int:
        fh = self._number()
        self.dirs[fh] = handle
        return fh
