"""The pyfuse3.Operations subclass: a thin adapter and the one errno boundary.

Every handler decodes its arguments, calls the core (`core.Core`: the view, changes
and removal), and builds the reply. An OSError becomes a FUSEError with its errno
here and nowhere else; any other exception is logged with its traceback and answered
with EIO, so no single request can kill the daemon (pyfuse3 would otherwise end its
main loop).

Caching: lower layers never change and every change goes through this daemon,
so entries, attributes and negative lookups get long timeouts and file pages
are kept (keep_cache); what a change touches is already known to the kernel.
"""

from __future__ import annotations

import collections
import errno
import functools
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3
import trio

from unionfs import fusecaps
from unionfs.changes import Caller, SetAttrs
from unionfs.core import Core
from unionfs.idmap import ACL_XATTRS, IDENTITY, IdMap, translate_acl
from unionfs.inodes import DirHandle, FileHandle, HandleTable, Node
from unionfs.layers import ListedEntry

log = logging.getLogger(__name__)

#: How many nodes' reply attributes are kept. A walk asks for a node's attributes again
#: soon after its lookup, which a small cache catches; 8,192 cost 2.4 MiB more after a
#: walk of 31,843 entries, for no gain measured (README, Benchmarks).
REPLY_CACHE = 2048

#: Seconds the kernel may cache entries and attributes (the layers are ours alone).
CACHE_TIMEOUT = 86400.0

T = TypeVar("T")
P = ParamSpec("P")


#: Requests answered, by type, since the server started (logged at unmount and on
#: SIGUSR1, as fuse-overlayfs prints its own on SIGUSR1).
REQUESTS: collections.Counter[str] = collections.Counter()


def requests_line() -> str:
    """The request counts, as one log line: ``requests: total=N lookup=N ...``."""
    counts = " ".join(f"{name}={count}" for name, count in sorted(REQUESTS.items()))
    return f"requests: total={sum(REQUESTS.values())} {counts}".rstrip()


def boundary(
    handler: Callable[P, Coroutine[Any, Any, T]],
) -> Callable[P, Coroutine[Any, Any, T]]:
    """Turn OSError into FUSEError; log anything else and answer EIO. With DEBUG logging
    (``--debug``) every request is logged with its result and how long it took. Every
    request is counted (`REQUESTS`)."""
    name = handler.__name__

    @functools.wraps(handler)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
        REQUESTS[name] += 1
        if log.isEnabledFor(logging.DEBUG):
            return await _traced(name, handler, *args, **kwargs)
        try:
            return await handler(*args, **kwargs)
        except pyfuse3.FUSEError:
            raise
        except OSError as exc:
            raise pyfuse3.FUSEError(_errno_of(name, exc)) from None
        except Exception:
            log.exception("unexpected error in %s; answered EIO", name)
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper


def _errno_of(name: str, exc: OSError) -> int:
    if exc.errno is None:
        log.error("%s: OSError without errno: %s; answered EIO", name, exc)
        return errno.EIO
    return exc.errno


async def _traced(name: str, handler: Callable[P, Coroutine[Any, Any, T]],
                  *args: P.args, **kwargs: P.kwargs) -> T:
    """`boundary` with a DEBUG line per request: its arguments, result and time."""
    start = time.perf_counter()
    shown = ", ".join(_show(arg) for arg in args[1:]
                      if not isinstance(arg, pyfuse3.RequestContext | pyfuse3.ReaddirToken))
    try:
        result = await handler(*args, **kwargs)
    except pyfuse3.FUSEError as exc:
        outcome = errno.errorcode.get(exc.errno, str(exc.errno))
        raise
    except OSError as exc:
        code = _errno_of(name, exc)
        outcome = f"{errno.errorcode.get(code, code)} ({exc})"
        raise pyfuse3.FUSEError(code) from None
    except Exception:
        outcome = "EIO (unexpected error)"
        log.exception("unexpected error in %s; answered EIO", name)
        raise pyfuse3.FUSEError(errno.EIO) from None
    else:
        outcome = _show(result)
        return result
    finally:
        log.debug("%s(%s) -> %s [%.3f ms]", name, shown, outcome,
                  (time.perf_counter() - start) * 1000)


def _show(value: object) -> str:
    """A short form of a request argument or result for the debug log."""
    if isinstance(value, pyfuse3.EntryAttributes):
        return f"inode {value.st_ino}"
    if isinstance(value, pyfuse3.FileInfo):
        return f"fh {value.fh}"
    if isinstance(value, bytes):
        return repr(value) if len(value) <= 64 else f"<{len(value)} bytes>"
    if isinstance(value, tuple):
        return "(" + ", ".join(_show(item) for item in value) + ")"
    if isinstance(value, list) and len(value) > 8:
        return f"<{len(value)} items>"
    return repr(value)


def _entry_name(entry: ListedEntry) -> bytes:
    return entry.name


class UnionOperations(pyfuse3.Operations):
    """FUSE requests on a union's `Core`."""

    enable_acl = True
    #: The kernel leaves the caller's umask to us (pyfuse3 patch 0002; ignored by a stock
    #: pyfuse3, where the kernel applies it): `Changes` applies it unless the parent has a
    #: default ACL, as POSIX says and kernel overlayfs does.
    enable_dont_mask = True

    def __init__(self, core: Core, uid_map: IdMap = IDENTITY,
                 gid_map: IdMap = IDENTITY) -> None:
        super().__init__()
        self.core = core
        #: pyfuse3 asks for the kernel's writeback cache when this is set: writes are
        #: cached and sent in pages, mtime and size kept by the kernel until flushed
        #: (files opened for writing are opened read-write: `Changes.writeback`).
        self.enable_writeback_cache = core.changes.writeback
        self.view = core.view
        self.handles = HandleTable()
        self.uid_map = uid_map
        self.gid_map = gid_map
        #: The attributes last sent for each inode, with the node's version then:
        #: pyfuse3 copies them into each reply, so one object serves many (readdirplus
        #: and getattr) until the node changes.
        #: Bounded (least recently used go first): a walk of a large tree would keep one
        #: per entry, and a stat is cheap next to a request.
        self._replies: collections.OrderedDict[
            int, tuple[Node, int, pyfuse3.EntryAttributes]] = collections.OrderedDict()

    def _caller(self, ctx: pyfuse3.RequestContext) -> Caller:
        """The caller, with ids as stored on disk."""
        return Caller(uid=self.uid_map.to_disk(ctx.uid), gid=self.gid_map.to_disk(ctx.gid),
                      # Without FUSE_DONT_MASK the kernel has applied it already.
                      umask=ctx.umask if fusecaps.CAPS.dont_mask else 0)

    # ------------------------------------------------------------ helpers

    def _node(self, inode: int) -> Node:
        node = self.view.table.get(inode)
        if node is None:
            raise pyfuse3.FUSEError(errno.ESTALE)
        return node

    def _attrs(self, node: Node, st: os.stat_result | None = None) -> pyfuse3.EntryAttributes:
        """*node*'s attributes for a reply; *st* is the layer's stat of its entry when
        the caller has it."""
        cached = self._replies.get(node.inode)
        if cached is not None and cached[0] is node and cached[1] == node.version:
            self._replies.move_to_end(node.inode)
            return cached[2]
        attrs = self.view.attributes(node, st)
        entry = pyfuse3.EntryAttributes()
        entry.st_ino = node.inode
        entry.generation = 0
        entry.entry_timeout = CACHE_TIMEOUT
        entry.attr_timeout = CACHE_TIMEOUT
        entry.st_mode = attrs.mode
        entry.st_nlink = attrs.nlink
        entry.st_uid = self.uid_map.to_mount(attrs.uid)
        entry.st_gid = self.gid_map.to_mount(attrs.gid)
        entry.st_rdev = attrs.rdev
        entry.st_size = attrs.size
        entry.st_blksize = attrs.blksize
        entry.st_blocks = attrs.blocks
        entry.st_atime_ns = attrs.atime_ns
        entry.st_mtime_ns = attrs.mtime_ns
        entry.st_ctime_ns = attrs.ctime_ns
        if node.live:
            self._replies[node.inode] = (node, node.version, entry)
            self._replies.move_to_end(node.inode)
            if len(self._replies) > REPLY_CACHE:
                self._replies.popitem(last=False)
        return entry

    def _reply_entry(self, node: Node) -> pyfuse3.EntryAttributes:
        """Attributes for a reply that hands the kernel a reference (counted here)."""
        entry = self._attrs(node)
        self.view.table.remember(node)
        return entry

    # ------------------------------------------------------------ lookup & attributes

    @boundary
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        parent = self._node(parent_inode)
        if name == b".":
            return self._reply_entry(parent)
        if name == b"..":
            return self._reply_entry(parent.parent or parent)
        node = self.view.lookup(parent, name)
        if node is None:
            # A negative entry the kernel may cache: only we change the tree.
            entry = pyfuse3.EntryAttributes()
            entry.st_ino = 0
            entry.entry_timeout = CACHE_TIMEOUT
            return entry
        return self._reply_entry(node)

    @boundary
    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
        for inode, count in inode_list:
            self.view.forget(inode, count)
            if inode not in self.view.table.nodes:
                self._replies.pop(inode, None)

    @boundary
    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._attrs(self._node(inode))

    @boundary
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = self._node(inode)
        handle = self.handles.files.get(fh) if fh is not None else None
        attrs = SetAttrs(
            mode=attr.st_mode if fields.update_mode else None,
            uid=self.uid_map.to_disk(attr.st_uid) if fields.update_uid else None,
            gid=self.gid_map.to_disk(attr.st_gid) if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
        )
        await self.core.changes.setattr(node, attrs, handle.fd if handle else None)
        return self._attrs(node)

    @boundary
    async def readlink(self, inode: int, ctx: pyfuse3.RequestContext) -> bytes:
        return self.view.readlink(self._node(inode))

    @boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        sv = self.view.statvfs()
        data = pyfuse3.StatvfsData()
        data.f_bsize = sv.f_bsize
        data.f_frsize = sv.f_frsize
        data.f_blocks = sv.f_blocks
        data.f_bfree = sv.f_bfree
        data.f_bavail = sv.f_bavail
        data.f_files = sv.f_files
        data.f_ffree = sv.f_ffree
        data.f_favail = sv.f_favail
        data.f_namemax = sv.f_namemax
        return data

    @boundary
    async def access(self, inode: int, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        # Permissions are checked by the kernel (default_permissions).
        self._node(inode)
        return True

    # ------------------------------------------------------------ creating & removing

    @boundary
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.core.changes.mkdir(self._node(parent_inode), name, mode, self._caller(ctx))
        return self._reply_entry(node)

    @boundary
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.core.changes.mknod(self._node(parent_inode), name, mode, rdev,
                                             self._caller(ctx))
        return self._reply_entry(node)

    @boundary
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.core.changes.symlink(self._node(parent_inode), name, target,
                                               self._caller(ctx))
        return self._reply_entry(node)

    @boundary
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        node = await self.core.changes.link(self._node(inode), self._node(new_parent_inode),
                                            new_name)
        return self._reply_entry(node)

    @boundary
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.core.removal.unlink(self._node(parent_inode), name)

    @boundary
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.core.removal.rmdir(self._node(parent_inode), name)

    @boundary
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.core.removal.rename(self._node(parent_inode_old), name_old,
                                       self._node(parent_inode_new), name_new, flags)

    # ------------------------------------------------------------ files

    def _file_info(self, node: Node, fd: int) -> pyfuse3.FileInfo:
        fh = self.handles.add_file(FileHandle(node, fd, self.view.data_source(node)))
        # Every change to a file's data goes through us: its cached pages stay valid.
        return pyfuse3.FileInfo(fh=fh, keep_cache=True)

    @boundary
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self._node(inode)
        fd = await self.core.changes.open(node, flags)
        info = self._file_info(node, fd)
        if flags & os.O_ACCMODE == os.O_WRONLY and self.core.changes.uncached(fd):
            info.direct_io = True
        return info

    @boundary
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        node, fd = await self.core.changes.create(self._node(parent_inode), name, mode, flags,
                                                  self._caller(ctx))
        return self._file_info(node, fd), self._reply_entry(node)

    @boundary
    async def read(self, fh: int, off: int, size: int) -> bytes:
        handle = self.handles.files[fh]
        fd = handle.fd_for(self.view.data_source(handle.node), self.view.reopen)
        return os.pread(fd, size, off)

    @boundary
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return self.core.changes.write(self.handles.files[fh], off, buf)

    @boundary
    async def fsync(self, fh: int, datasync: bool) -> None:
        if not self.core.copier.fsync:
            return  # -o fsync=0 / volatile: the caller accepted losing data on a crash
        fd = self.handles.files[fh].fd
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)

    @boundary
    async def release(self, fh: int) -> None:
        self.handles.files.pop(fh).close()

    # ------------------------------------------------------------ directories

    def _snapshot(self, node: Node) -> list[ListedEntry]:
        """The entries of directory *node*, by name. The kernel's readdir cache (pyfuse3
        patch 0001) may be filled by two opens, the part past where one stopped reading
        appended from the other's reads: both must list the same names in the same order,
        though a copy-up between them moved entries to the upper layer (which a fresh
        `merged_listing` lists first) without a change the kernel sees."""
        return sorted(self.view.listing(node).values(), key=_entry_name)

    @boundary
    async def opendir(  # type: ignore[override, unused-ignore]  # stock: returns an int
            self, inode: int, ctx: pyfuse3.RequestContext) -> int | pyfuse3.FileInfo:
        node = self._node(inode)
        # No snapshot yet: the first readdir takes it (at offset 0, or after a seek), and
        # with the kernel's readdir cache most opens never read.
        fh = self.handles.add_dir(DirHandle(node))
        return fusecaps.opendir_reply(fh)

    @boundary
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        handle = self.handles.dirs[fh]
        node = handle.node
        if start_id == 0 or handle.entries is None:
            # Offsets index a snapshot taken at the first read or a rewind, so they stay
            # valid while entries come and go (telldir/seekdir).
            handle.entries = self._snapshot(node)
        position = start_id
        while position < 2:
            dot = node if position == 0 else (node.parent or node)
            # "." and ".." take no kernel reference in readdirplus.
            if not pyfuse3.readdir_reply(token, b"." if position == 0 else b"..",
                                         self._attrs(dot), position + 1):
                return
            position += 1
        for index in range(position - 2, len(handle.entries)):
            entry = handle.entries[index]
            listed = self.view.child_for_listing(node, entry)
            if listed is None:
                continue
            child, st = listed
            try:
                attrs = self._attrs(child, st)
            except FileNotFoundError:
                continue
            if not pyfuse3.readdir_reply(token, entry.name, attrs, index + 3):
                return
            self.view.table.remember(child)

    @boundary
    async def releasedir(self, fh: int) -> None:
        node = self.handles.dirs.pop(fh).node
        if not any(handle.node is node for handle in self.handles.dirs.values()):
            self.view.drop_listing(node)

    @boundary
    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """The directory's upper part, as kernel overlayfs does (the lower layers never
        change); nothing with ``-o fsync=0`` / ``volatile``."""
        node = self.handles.dirs[fh].node
        upper = self.view.upper
        if not self.core.copier.fsync or upper is None or upper not in node.dir_layers:
            return
        # A copy: the view may close its cached fd (an rmdir) while the thread syncs.
        fd = os.dup(self.view.dir_fd(node, upper))
        try:
            await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, fd)
        finally:
            os.close(fd)

    # ------------------------------------------------------------ xattrs

    @boundary
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        key = os.fsdecode(name)
        value = self.view.getxattr(self._node(inode), key)
        if key in ACL_XATTRS and not (self.uid_map.identity and self.gid_map.identity):
            value = translate_acl(value, self.uid_map.to_mount, self.gid_map.to_mount)
        return value

    @boundary
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(name) for name in self.view.listxattr(self._node(inode))]

    @boundary
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        key = os.fsdecode(name)
        if key in ACL_XATTRS and not (self.uid_map.identity and self.gid_map.identity):
            value = translate_acl(value, self.uid_map.to_disk, self.gid_map.to_disk)
        await self.core.changes.setxattr(self._node(inode), key, value)

    @boundary
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.core.changes.removexattr(self._node(inode), os.fsdecode(name))

