"""Changes that remove or move names: unlink, rmdir, rename, RENAME_EXCHANGE.

A name that a lower layer holds goes away by a whiteout in the upper; a directory
that lands on a name a lower directory holds is made opaque, so it does not merge
with what it replaced. One name of a lower inode with several names is removed only
after the inode is copied up with all its names (`CopyUp.keep_link_group`), so link
counts live on disk. Atomicity (trio): after the last await of a method, its change
on disk and in the node tree happen without interruption.
"""

from __future__ import annotations

import errno
import os
import stat

from unionfs import whiteout
from unionfs.copyup import CopyUp, temp_name
from unionfs.inodes import Node, NodeState, key_of
from unionfs.layers import find_entry, lstat_at, open_dir_at
from unionfs.sysc import RENAME_EXCHANGE, RENAME_NOREPLACE, remove_at, renameat2
from unionfs.union import Union, error


class Removal:
    """Names removed and moved in the upper of a `Union`."""

    def __init__(self, view: Union, copier: CopyUp) -> None:
        self.view = view
        self.copier = copier

    # ---------------------------------------------------------------- removing

    def _remove_upper(self, parent_fd: int, name: bytes, need_whiteout: bool) -> None:
        """Remove the upper entry *name* (a file, or a directory holding only markers),
        leaving a whiteout in its place when a lower layer holds the name."""
        work_fd = self.copier.work_fd
        tmp = temp_name()
        if need_whiteout:
            self.copier.markers.rename_leaving_whiteout(parent_fd, name, work_fd, tmp)
        else:
            os.rename(name, tmp, src_dir_fd=parent_fd, dst_dir_fd=work_fd)
        remove_at(work_fd, tmp)

    async def unlink(self, parent: Node, name: bytes) -> None:
        view = self.view
        view.need_upper()
        node = view.lookup(parent, name)
        if node is None:
            raise error(errno.ENOENT, name)
        if node.is_dir:
            raise error(errno.EISDIR, name)
        await self.copier.settle(node)
        await self.copier.keep_link_group(node)
        await self.copier.copy_up(parent)
        self._delete_name(parent, name, node)

    def _delete_name(self, parent: Node, name: bytes, node: Node) -> None:
        """Remove *name* (a non-directory name of *node*) from the merged view."""
        view = self.view
        parent_fd = view.upper_fd(parent)
        need_whiteout = view.lower_has(parent, name)
        nlink = view.stat(node).st_nlink
        if lstat_at(parent_fd, name) is not None:
            if need_whiteout:
                self._remove_upper(parent_fd, name, True)
            else:
                os.unlink(name, dir_fd=parent_fd)
        else:
            self.copier.markers.make_whiteout(parent_fd, name)
        view.entry_changed(parent, name, None)
        node.changed()
        view.table.unlink(parent, name)
        self._after_unlink(node, parent, name, nlink)

    def _after_unlink(self, node: Node, parent: Node, name: bytes, nlink: int) -> None:
        """*name* in *parent*, a name of *node* (which had *nlink* links), is gone: point
        the node at another name it is known by, or mark it homeless or unlinked."""
        if node.parent is not parent or node.name != name:
            return
        for other_parent, other_name in list(node.links):
            found = find_entry(other_parent.dir_layers, self.view.fd_of(other_parent),
                               other_name)
            if found is not None and key_of(found.st) in node.keys:
                node.parent, node.name, node.layer = other_parent, other_name, found.layer
                return
        node.state = NodeState.HOMELESS if nlink > 1 else NodeState.UNLINKED

    async def rmdir(self, parent: Node, name: bytes) -> None:
        view = self.view
        view.need_upper()
        node = view.lookup(parent, name)
        if node is None:
            raise error(errno.ENOENT, name)
        if not node.is_dir:
            raise error(errno.ENOTDIR, name)
        await self.copier.settle(node)
        if view.listing(node):
            raise error(errno.ENOTEMPTY, name)
        await self.copier.copy_up(parent)
        parent_fd = view.upper_fd(parent)
        need_whiteout = view.lower_has(parent, name)
        view.fds.drop_inode(node.inode, [layer.index for layer in node.dir_layers])
        if node.layer.writable:
            self._remove_upper(parent_fd, name, need_whiteout)
        else:
            self.copier.markers.make_whiteout(parent_fd, name)
        view.entry_changed(parent, name, None)
        view.table.unlink(parent, name)
        node.state = NodeState.UNLINKED
        node.changed()

    # ---------------------------------------------------------------- renaming

    async def rename(self, old_parent: Node, old_name: bytes, new_parent: Node,
                     new_name: bytes, flags: int) -> None:
        view = self.view
        view.need_upper()
        if flags & ~(RENAME_NOREPLACE | RENAME_EXCHANGE) or (
                flags & RENAME_NOREPLACE and flags & RENAME_EXCHANGE):
            raise error(errno.EINVAL)
        view.check_new_name(new_name)
        src = view.lookup(old_parent, old_name)
        if src is None:
            raise error(errno.ENOENT, old_name)
        dst = view.lookup(new_parent, new_name)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise error(errno.ENOENT, new_name)
            await self._exchange(src, old_parent, old_name, dst, new_parent, new_name)
            return
        if dst is src:
            return  # two names of one file: rename(2) does nothing
        if dst is not None and flags & RENAME_NOREPLACE:
            raise error(errno.EEXIST, new_name)
        if src.is_dir:
            if dst is not None and not dst.is_dir:
                raise error(errno.ENOTDIR, new_name)
            _check_movable(src, old_name)
        elif dst is not None and dst.is_dir:
            raise error(errno.EISDIR, new_name)
        if dst is not None and dst.is_dir and view.listing(dst):
            raise error(errno.ENOTEMPTY, new_name)
        await self.copier.settle(src)
        if dst is not None:
            await self.copier.settle(dst)
            await self.copier.keep_link_group(dst)
        await self.copier.name_in_upper(src, old_parent, old_name)
        await self.copier.copy_up(new_parent)
        self._do_rename(src, old_parent, old_name, new_parent, new_name, dst)

    async def _exchange(self, a: Node, a_parent: Node, a_name: bytes,
                        b: Node, b_parent: Node, b_name: bytes) -> None:
        """RENAME_EXCHANGE: both names stay, so no whiteout is needed; both entries are
        brought into the upper and swapped there in one renameat2."""
        if a is b:
            return
        view = self.view
        _check_movable(a, a_name)
        _check_movable(b, b_name)
        await self.copier.settle(a)
        await self.copier.settle(b)
        await self.copier.name_in_upper(a, a_parent, a_name)
        await self.copier.name_in_upper(b, b_parent, b_name)
        # No await from here on: the swap on disk and in the node tree is atomic.
        for moved, parent, name in ((a, b_parent, b_name), (b, a_parent, a_name)):
            if moved.is_dir and view.lower_has(parent, name):
                self.copier.markers.set_opaque(view.dir_fd(moved, moved.layer))  # see _do_rename
        renameat2(view.upper_fd(a_parent), a_name, view.upper_fd(b_parent), b_name,
                  RENAME_EXCHANGE)
        view.entry_changed(a_parent, a_name, b.is_dir)
        view.entry_changed(b_parent, b_name, a.is_dir)
        view.table.unlink(a_parent, a_name)
        view.table.unlink(b_parent, b_name)
        for moved, old, new in ((a, (a_parent, a_name), (b_parent, b_name)),
                                (b, (b_parent, b_name), (a_parent, a_name))):
            if (moved.parent, moved.name) == old:
                moved.parent, moved.name = new
            view.table.link(moved, *new)
            moved.changed()

    def _do_rename(self, src: Node, old_parent: Node, old_name: bytes, new_parent: Node,
                   new_name: bytes, dst: Node | None) -> None:
        """The rename on disk and in the node tree. No await: atomic for trio."""
        view = self.view
        old_fd = view.upper_fd(old_parent)
        new_fd = view.upper_fd(new_parent)
        src_whiteout = view.lower_has(old_parent, old_name)
        dst_upper = lstat_at(new_fd, new_name)
        dst_nlink = view.stat(dst).st_nlink if dst is not None and not dst.is_dir else 0
        if src.is_dir and view.lower_has(new_parent, new_name):
            # The moved directory replaces a lower one: it must not merge with it.
            self.copier.markers.set_opaque(view.dir_fd(src, src.layer))
        if dst_upper is not None and stat.S_ISDIR(dst_upper.st_mode):
            # An empty merged directory may still hold whiteouts in the upper.
            _empty_upper_dir(new_fd, new_name)
        if dst_upper is not None and whiteout.is_whiteout(dst_upper) and src.is_dir:
            renameat2(old_fd, old_name, new_fd, new_name, RENAME_EXCHANGE)
            if not src_whiteout:
                os.unlink(old_name, dir_fd=old_fd)
        elif src_whiteout:
            self.copier.markers.rename_leaving_whiteout(old_fd, old_name, new_fd, new_name)
        else:
            os.rename(old_name, new_name, src_dir_fd=old_fd, dst_dir_fd=new_fd)
        whiteout.remove_oci_whiteout(new_fd, new_name)
        view.entry_changed(old_parent, old_name, None)
        view.entry_changed(new_parent, new_name, src.is_dir)
        src.changed()
        if dst is not None:
            dst.changed()
            view.table.unlink(new_parent, new_name)
            if dst.is_dir:
                dst.state = NodeState.UNLINKED
            else:
                self._after_unlink(dst, new_parent, new_name, dst_nlink)
        view.table.unlink(old_parent, old_name)
        if src.parent is old_parent and src.name == old_name:
            src.parent, src.name = new_parent, new_name
        view.table.link(src, new_parent, new_name)


def _check_movable(node: Node, name: bytes) -> None:
    if node.is_dir and (not node.layer.writable or len(node.dir_layers) > 1):
        # Like the kernel without redirect_dir: a directory that exists in a lower
        # layer cannot be moved; mv(1) falls back to copying.
        raise error(errno.EXDEV, name)


def _empty_upper_dir(parent_fd: int, name: bytes) -> None:
    fd = open_dir_at(parent_fd, name)
    try:
        for entry in os.listdir(fd):
            remove_at(fd, os.fsencode(entry))
    finally:
        os.close(fd)
