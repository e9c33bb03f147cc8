"""Changes that make or alter entries: create, mkdir, mknod, symlink, link (over
whiteouts), setattr, xattr writes, and open (for writing: a copy-up first).

Removing and moving entries is `removal.py`. Both change the disk only in the upper
(after `copyup.CopyUp` has brought what they change there) and tell the view
(`union.Union`) what they did. Atomicity (trio): between awaits a method runs without
interruption; its awaits are copy-ups, after which it looks again at what it checked.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from unionfs import whiteout
from unionfs.copyup import CopyUp, Data, temp_name
from unionfs.inodes import FileHandle, Node, NodeState
from unionfs.layers import Found, lstat_at, open_dir_at
from unionfs.sysc import RENAME_EXCHANGE, fd_path, remove_at, renameat2, set_mtime
from unionfs.union import VIRTUAL_XATTRS, Union, error

#: The mode bits chown(2) clears on a non-directory: set again after it. (The kernel
#: already dropped S_ISGID from a new entry's mode where the caller may not have it.)
_SETID = stat.S_ISUID | stat.S_ISGID


@dataclass(frozen=True)
class Caller:
    """Who asks: the owner of what they create."""

    uid: int
    gid: int
    #: The caller's umask, for create, mkdir and mknod (RequestContext.umask).
    umask: int = 0


@dataclass(frozen=True)
class SetAttrs:
    """What a setattr changes; None means unchanged."""

    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    size: int | None = None
    atime_ns: int | None = None
    mtime_ns: int | None = None


class Changes:
    """Entries made and changed in the upper of a `Union`."""

    def __init__(self, view: Union, copier: CopyUp, writeback: bool = False) -> None:
        self.view = view
        self.copier = copier
        #: The kernel caches writes (FUSE writeback cache): it may read a page through a
        #: file opened for writing only, so such files are opened read-write here.
        self.writeback = writeback

    def _access(self, flags: int) -> int:
        access = flags & os.O_ACCMODE
        return os.O_RDWR if self.writeback and access == os.O_WRONLY else access

    def _open_for(self, flags: int, opener: Callable[[int], int]) -> int:
        """*opener(access)*, with `_access`; a file the daemon may write but not read
        (a plain user's mount of a file of mode 0200) is opened write-only, as asked,
        and `uncached` then says so."""
        access = self._access(flags)
        try:
            return opener(access)
        except PermissionError:
            if access == flags & os.O_ACCMODE:
                raise
            return opener(flags & os.O_ACCMODE)

    def uncached(self, fd: int) -> bool:
        """Whether the kernel must not cache the pages of the file open at *fd*: with
        the writeback cache it reads a page through the handle that writes part of it,
        and *fd* cannot read (`_open_for`)."""
        return self.writeback and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_WRONLY

    # ---------------------------------------------------------------- creating

    async def _prepare_create(self, parent: Node, name: bytes) -> None:
        view = self.view
        view.need_upper()
        view.check_new_name(name)
        if view.lookup(parent, name) is not None:
            raise error(errno.EEXIST, name)
        if parent.layer is not view.upper:
            await self.copier.copy_up(parent)
            if view.lookup(parent, name) is not None:  # created while we copied up
                raise error(errno.EEXIST, name)

    def _perm(self, parent: Node, mode: int, caller: Caller) -> int:
        """The permission bits of a new entry in *parent*: *mode*'s, less the caller's umask
        unless the upper parent has a default ACL (POSIX; the upper's filesystem then derives
        the mode from the ACL, as under kernel overlayfs). With FUSE_DONT_MASK the kernel
        leaves the umask to us; without it the mode is already masked, and masking again
        changes nothing."""
        perm = stat.S_IMODE(mode)
        if not caller.umask or _has_default_acl(self.view.upper_fd(parent)):
            return perm
        return perm & ~caller.umask

    def _owner(self, parent: Node, caller: Caller) -> tuple[int, int, bool]:
        pst = os.fstat(self.view.upper_fd(parent))
        setgid = bool(pst.st_mode & stat.S_ISGID)
        return caller.uid, (pst.st_gid if setgid else caller.gid), setgid

    def _place(self, parent: Node, name: bytes, build: Callable[[int, bytes], None],
               is_dir: bool) -> None:
        """Create *name* in the upper of *parent* with *build(dir_fd, name)*.

        Over a whiteout, the entry is built in the workdir first and renamed into
        place, so the name is never visible half-made; a directory that replaces a
        whiteout is made opaque, so the lower directory it deletes stays deleted.
        """
        work_fd = self.copier.work_fd
        parent_fd = self.view.upper_fd(parent)
        existing = lstat_at(parent_fd, name)
        marker = whiteout.has_oci_whiteout(parent_fd, name)
        if existing is None and not marker:
            build(parent_fd, name)
            return
        # Built in the workdir; beside its name when the parent has a default ACL, for
        # the entry to inherit it (under a name never visible, never creatable).
        if _has_default_acl(parent_fd):
            build_fd, tmp = parent_fd, whiteout.hidden_temp_name(temp_name())
        else:
            build_fd, tmp = work_fd, temp_name()
        build(build_fd, tmp)
        try:
            if is_dir:
                fd = open_dir_at(build_fd, tmp)
                try:
                    self.copier.markers.set_opaque(fd)
                finally:
                    os.close(fd)
            if existing is not None and is_dir:
                renameat2(build_fd, tmp, parent_fd, name, RENAME_EXCHANGE)
            else:
                os.rename(tmp, name, src_dir_fd=build_fd, dst_dir_fd=parent_fd)
        finally:
            remove_at(build_fd, tmp)
        if marker:
            whiteout.remove_oci_whiteout(parent_fd, name)

    def _new_node(self, parent: Node, name: bytes, is_dir: bool = False) -> Node:
        """The node of an entry just made in the upper. A new directory never merges with
        a lower one: the name was free below, or hidden, or it was made opaque."""
        view = self.view
        upper = view.need_upper()
        view.entry_changed(parent, name, is_dir)
        st = os.stat(name, dir_fd=view.upper_fd(parent), follow_symlinks=False)
        return view.node_for(parent, name, Found(upper, st, (upper,) if is_dir else ()))

    async def create(self, parent: Node, name: bytes, mode: int, flags: int,
                     caller: Caller) -> tuple[Node, int]:
        """Create a regular file and open it; returns the node and the open fd."""
        await self._prepare_create(parent, name)
        uid, gid, _ = self._owner(parent, caller)
        access = self._access(flags)
        perm = self._perm(parent, mode, caller)
        opened: list[int] = []

        def build(dir_fd: int, entry: bytes) -> None:
            fd = os.open(entry, os.O_CREAT | os.O_EXCL | access | os.O_CLOEXEC, perm,
                         dir_fd=dir_fd)
            opened.append(fd)
            os.fchown(fd, uid, gid)
            if perm & _SETID:  # chown cleared them; the rest may come from a default ACL
                os.fchmod(fd, stat.S_IMODE(os.fstat(fd).st_mode) | perm & _SETID)

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
        perm = self._perm(parent, mode, caller)

        def build(dir_fd: int, entry: bytes) -> None:
            # Created with its mode (a default ACL of the parent needs it to compute the
            # new ACL), then given its owner; chown clears no bit of a directory.
            os.mkdir(entry, perm, dir_fd=dir_fd)
            os.chown(entry, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            made = stat.S_IMODE(os.stat(entry, dir_fd=dir_fd).st_mode)  # a default ACL's part
            if setgid and not made & stat.S_ISGID:
                os.chmod(entry, made | stat.S_ISGID, dir_fd=dir_fd, follow_symlinks=False)

        self._place(parent, name, build, is_dir=True)
        return self._new_node(parent, name, is_dir=True)

    async def mknod(self, parent: Node, name: bytes, mode: int, rdev: int,
                    caller: Caller) -> Node:
        if whiteout.is_whiteout_request(mode, rdev):
            raise error(errno.EPERM, name)  # it would delete, not create
        await self._prepare_create(parent, name)
        uid, gid, _ = self._owner(parent, caller)
        perm = self._perm(parent, mode, caller)

        def build(dir_fd: int, entry: bytes) -> None:
            os.mknod(entry, stat.S_IFMT(mode) | perm, rdev, dir_fd=dir_fd)
            os.chown(entry, uid, gid, dir_fd=dir_fd, follow_symlinks=False)
            if perm & _SETID:  # chown cleared them; the rest may come from a default ACL
                made = stat.S_IMODE(os.stat(entry, dir_fd=dir_fd, follow_symlinks=False).st_mode)
                os.chmod(entry, made | perm & _SETID, dir_fd=dir_fd, follow_symlinks=False)

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
            raise error(errno.EPERM, name)
        await self._prepare_create(parent, name)
        await self.copier.settle(node)
        await self.copier.copy_up(node)
        src_dir, src_name = self.view.location(node)
        # Link through an O_PATH fd: the source's own dir fd may be evicted meanwhile.
        src = os.open(src_name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            def build(dir_fd: int, entry: bytes) -> None:
                os.link(fd_path(src), entry, dst_dir_fd=dir_fd, follow_symlinks=True)

            self._place(parent, name, build, is_dir=False)
        finally:
            os.close(src)
        self.view.entry_changed(parent, name, False)
        node.changed()
        self.view.table.link(node, parent, name)
        return node

    # ---------------------------------------------------------------- changing

    def _found(self, node: Node) -> bool:
        """Whether *node* has a name (after looking for another one where it lost its)."""
        if node.state is NodeState.HOMELESS:
            self.copier.rehome(node)
        return node.live

    def _own_fd(self, node: Node) -> int | None:
        """For a node whose name is gone (UNLINKED, or HOMELESS: its other names not
        found yet): an fd of one of its open files on its own upper entry, through
        which a change still reaches the inode."""
        return next((h.fd for h in node.handles or () if h.source is self.view.upper
                     and node.data is None), None)

    def _gone(self, node: Node) -> OSError:
        """What a change of a node without a name and without an open upper file gets:
        a lower file deleted while open (the kernel would copy it up without a name,
        which we cannot: the change is refused, never made to bring the name back)."""
        return error(errno.ENOENT, node.name)

    def write(self, handle: FileHandle, off: int, buf: bytes) -> int:
        """Write to an open file. With the writeback cache the kernel owns a regular
        file's mtime: it keeps the one it was given (or set itself, at its own clock's
        granularity) and sends it in a setattr when it changed it, perhaps before
        the pages it wrote reach us. So a write here must not move the upper's mtime
        (it would, to a finer time than the kernel shows): it is put back."""
        handle.node.changed()
        mtime = handle.kernel_mtime_ns
        if self.writeback and mtime is None:
            mtime = handle.kernel_mtime_ns = os.fstat(handle.fd).st_mtime_ns
        written = os.pwrite(handle.fd, buf, off)
        if mtime is not None:
            set_mtime(handle.fd, mtime)
        return written

    async def setattr(self, node: Node, attrs: SetAttrs, fd: int | None) -> None:
        node.changed()
        if self.writeback and attrs.mtime_ns is not None:
            for handle in node.handles or ():
                handle.kernel_mtime_ns = attrs.mtime_ns
        if not self._found(node):
            self._setattr_unlinked(node, attrs, fd)
            return
        if node.parent is not None:
            if attrs.size is None:
                data = Data.LATER
            else:
                data = Data.DROP if attrs.size == 0 else Data.COPY
            await self.copier.copy_up(node, data)
        else:
            self.view.need_upper()
        if attrs.size is not None:
            if fd is not None:
                os.ftruncate(fd, attrs.size)
            else:
                dir_fd, name = self.view.location(node)
                wfd = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
                try:
                    os.ftruncate(wfd, attrs.size)
                finally:
                    os.close(wfd)
        if attrs.uid is not None or attrs.gid is not None:
            uid = -1 if attrs.uid is None else attrs.uid
            gid = -1 if attrs.gid is None else attrs.gid
            self._at(node, lambda d, n: os.chown(n, uid, gid, dir_fd=d, follow_symlinks=False),
                     lambda fd_: os.chown(fd_, uid, gid))
        if attrs.mode is not None:
            mode = stat.S_IMODE(attrs.mode)
            self._at(node, lambda d, n: os.chmod(n, mode, dir_fd=d, follow_symlinks=False),
                     lambda fd_: os.chmod(fd_, mode))
        if attrs.atime_ns is not None or attrs.mtime_ns is not None:
            st = self.view.stat(node)
            times = (st.st_atime_ns if attrs.atime_ns is None else attrs.atime_ns,
                     st.st_mtime_ns if attrs.mtime_ns is None else attrs.mtime_ns)
            self._at(node, lambda d, n: os.utime(n, ns=times, dir_fd=d, follow_symlinks=False),
                     lambda fd_: os.utime(fd_, ns=times))

    def _unnamed_fd(self, node: Node) -> int:
        self.view.need_upper()
        fd = self._own_fd(node)
        if fd is None:
            raise self._gone(node)
        return fd

    def _setattr_unlinked(self, node: Node, attrs: SetAttrs, fd: int | None) -> None:
        """A change to a file whose name is gone (still open, or its cached times flushed
        by the kernel after the unlink): on an fd of its own upper entry, if one is open;
        else nothing is left to change."""
        self.view.need_upper()
        if fd is None:
            fd = self._own_fd(node)
        if fd is None:
            if node.layer is not self.view.upper and not (
                    self.writeback and attrs == SetAttrs(mtime_ns=attrs.mtime_ns)):
                raise self._gone(node)
            # nothing of it is left to change (with the writeback cache, the kernel
            # flushes the times it cached of a file read, then deleted, as it closes)
            return
        if attrs.size is not None:
            os.ftruncate(fd, attrs.size)
        if attrs.uid is not None or attrs.gid is not None:
            os.fchown(fd, -1 if attrs.uid is None else attrs.uid,
                      -1 if attrs.gid is None else attrs.gid)
        if attrs.mode is not None:
            os.fchmod(fd, stat.S_IMODE(attrs.mode))
        if attrs.atime_ns is not None or attrs.mtime_ns is not None:
            st = os.fstat(fd)
            os.utime(fd, ns=(st.st_atime_ns if attrs.atime_ns is None else attrs.atime_ns,
                             st.st_mtime_ns if attrs.mtime_ns is None else attrs.mtime_ns))

    def _at(self, node: Node, at: Callable[[int, bytes], None],
            on_fd: Callable[[int], None]) -> None:
        """Apply a metadata change to *node*'s entry: by (dir fd, name), or on the
        directory fd itself for the root."""
        if node.parent is None:
            on_fd(self.view.dir_fd(node, node.layer))
        else:
            dir_fd, name = self.view.location(node)
            at(dir_fd, name)

    async def setxattr(self, node: Node, name: str, value: bytes) -> None:
        self.view.need_upper()
        if name in VIRTUAL_XATTRS or whiteout.is_internal_xattr(name):
            raise error(errno.EPERM)
        if self._found(node):
            await self.copier.copy_up_any(node)
            self.view.xattr_call(node, os.setxattr, name, value)
        else:
            os.setxattr(self._unnamed_fd(node), name, value)
        node.changed()  # ctime, and the mode when it is an ACL

    async def removexattr(self, node: Node, name: str) -> None:
        self.view.need_upper()
        if name in VIRTUAL_XATTRS:
            raise error(errno.EPERM)
        if whiteout.is_internal_xattr(name):
            raise error(errno.ENODATA)
        if not self._found(node):
            os.removexattr(self._unnamed_fd(node), name)
            node.changed()
            return
        self.view.getxattr(node, name)  # ENODATA before any copy-up
        await self.copier.copy_up_any(node)
        self.view.xattr_call(node, os.removexattr, name)
        node.changed()

    # ---------------------------------------------------------------- open

    async def open(self, node: Node, flags: int) -> int:
        """Open *node*: for writing (or O_TRUNC) in the upper, after a copy-up."""
        writing = (flags & os.O_ACCMODE) != os.O_RDONLY or flags & os.O_TRUNC
        if writing and not self._found(node):
            # Reopened through /proc/self/fd after its name went: the same inode.
            keep = flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOCTTY | os.O_APPEND
                             | os.O_ACCMODE)
            path = fd_path(self._unnamed_fd(node))
            return self._open_for(flags, lambda access: os.open(
                path, keep | access | os.O_CLOEXEC))
        if writing:
            await self.copier.copy_up(node, Data.DROP if flags & os.O_TRUNC else Data.COPY)
            if flags & os.O_TRUNC:
                node.changed()
        return self._open_for(flags, lambda access: self.view.open_data(
            node, (flags & ~os.O_ACCMODE) | access))


def _has_default_acl(dir_fd: int) -> bool:
    try:
        os.getxattr(dir_fd, "system.posix_acl_default")
    except OSError as exc:
        if exc.errno in (errno.ENODATA, errno.ENOTSUP, errno.EOPNOTSUPP):
            return False
        raise
    return True
