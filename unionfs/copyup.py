"""Copy-up: bringing a lower entry into the upper, the one place that does it.

`CopyUp.copy_up` does it whole: parents first, a per-node lock (every change to a node
settles first, so two changes to one entry never interleave), the copy of a directory
or a file (data, metadata only, or no data), the data of a metadata-only copy filled in
later, and the other names of a hard-linked file.

Crash safety: every copy is built under a temporary name in the workdir (on the
upper's filesystem), given its owner, mode, xattrs and times, its data fsynced, and
only then renamed into the upper. A crash at any point leaves the upper with either no
copy or a whole one; stray temporaries are removed at the next mount
(`clean_workdir`). A metadata-only copy gets its data in place, and loses its mark
only once the data is whole and synced: until then the data below is used.

Threads: the data copy and its fsync, and the one scan of a lower layer for the names
of a hard-linked file, run in worker threads; everything else is short metadata calls
on the trio thread. Across each await the node is marked busy (nothing else changes
it), the temporary is ours alone, and directory fds are fetched again afterwards (the
cache may have closed them).
"""

from __future__ import annotations

import contextlib
import enum
import errno
import itertools
import logging
import os
import stat
from collections.abc import AsyncIterator, Iterator

import trio

from unionfs import whiteout
from unionfs.inodes import Node, key_of
from unionfs.layers import DataRef, Layer, find_entry, lstat_at, open_dir_at
from unionfs.sysc import at_path, remove_at
from unionfs.union import Union

log = logging.getLogger(__name__)

_CHUNK = 1 << 30
_counter = itertools.count()


class Data(enum.Enum):
    """What a copy-up does with a regular file's data."""

    COPY = "copy"  # the data comes along (opened for writing, linked, renamed)
    DROP = "drop"  # the caller truncates it to zero at once: no data is needed
    LATER = "later"  # a metadata change: metadata only, the data stays below (metacopy)


def temp_name() -> bytes:
    """A name for a temporary entry, unique within this process."""
    return b"#%d-%d" % (os.getpid(), next(_counter))


def clean_workdir(work_fd: int) -> None:
    """Remove what a crashed server left in the workdir (never complete copies)."""
    for name in os.listdir(work_fd):
        remove_at(work_fd, os.fsencode(name))


class CopyUp:
    """Copies lower entries of a `Union` into its upper."""

    def __init__(self, view: Union, work_fd: int | None, fsync: bool = True,
                 metacopy: bool = True, markers: whiteout.Markers = whiteout.TRUSTED) -> None:
        self.view = view
        #: How this upper's markers are written (every change writes them through here).
        self.markers = markers
        #: The workdir's ``work``; None on a read-only mount, where every change is
        #: refused (`Union.need_upper`) before anything here needs it.
        self._work_fd = work_fd
        #: False with ``-o fsync=0`` or ``volatile``: copies are not fsynced.
        self.fsync = fsync
        #: Metadata changes to a lower regular file copy up its metadata only.
        self.metacopy = metacopy
        self._busy: dict[Node, trio.Event] = {}
        #: Per lower layer: its non-directories with several names, by st_ino (built on
        #: the first copy-up of such a file; a lower layer never changes).
        self._multi_linked: dict[int, dict[int, list[tuple[bytes, ...]]]] = {}
        self._scan_locks: dict[int, trio.Lock] = {}

    @property
    def work_fd(self) -> int:
        """Where copies and other temporaries are built."""
        if self._work_fd is None:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS))
        return self._work_fd

    async def settle(self, node: Node) -> None:
        """Wait until no copy-up of *node* is under way."""
        while (event := self._busy.get(node)) is not None:
            await event.wait()

    @contextlib.asynccontextmanager
    async def _busy_with(self, node: Node) -> AsyncIterator[None]:
        """Mark *node* as being copied up: every change to it settles first."""
        event = self._busy[node] = trio.Event()
        try:
            yield
        finally:
            del self._busy[node]
            event.set()

    async def copy_up(self, node: Node, data: Data = Data.COPY) -> None:
        """Make *node* live in the upper, its parents first; *data* says what becomes of
        a regular file's data."""
        upper = self.view.need_upper()
        await self.settle(node)
        if node.layer is not upper and not node.live:
            # Its name is gone (a whiteout, or another name of the inode): a copy
            # renamed there would bring the name back.
            raise OSError(errno.ENOENT, os.strerror(errno.ENOENT), node.name)
        if node.layer is not upper:
            assert node.parent is not None
            await self.copy_up(node.parent)
            await self.settle(node)
        if node.layer is not upper:
            async with self._busy_with(node):
                if node.is_dir:
                    self._copy_dir(node, upper)
                else:
                    await self._copy_file(node, upper, data)
        if node.data is not None and data is not Data.LATER:
            async with self._busy_with(node):
                await self._fill_data(node, data)

    async def copy_up_any(self, node: Node) -> None:
        """Bring *node* into the upper for a change of its metadata."""
        if node.parent is None:
            self.view.need_upper()
        else:
            await self.copy_up(node, Data.LATER)

    async def keep_link_group(self, node: Node) -> None:
        """Before one name of a lower inode with several names goes away, copy the inode
        up with all its names (as the kernel copies it into its index with index=on):
        its link count then lives on disk."""
        if node.is_dir or node.layer.writable:
            return
        if self.view.stat(node).st_nlink > 1:
            await self.copy_up(node)

    def rehome(self, node: Node) -> None:
        """Give a HOMELESS node (the name it was reached by is gone; the kernel knows no
        other yet) one of its other names again, found through the scan of its layer
        (a link group is copied up whole, so its names are those of the lower inode)."""
        view = self.view
        inos = {key & ((1 << 64) - 1) for key in node.keys}
        for table in self._multi_linked.values():
            for ino in inos:
                for path in table.get(ino, ()):
                    parent = view.resolve_dir(path[:-1])
                    if parent is not None:
                        view.lookup(parent, path[-1])  # finds the node: a new home
                    if node.live:
                        return

    async def name_in_upper(self, node: Node, parent: Node, name: bytes) -> None:
        """Make sure the entry *name* in *parent* (a name of *node*) exists in the upper.

        A hard link whose data was copied up through another name may still have this
        name only in a lower layer: link it to the upper copy.
        """
        await self.copy_up(node)
        await self.copy_up(parent)
        parent_fd = self.view.upper_fd(parent)
        if lstat_at(parent_fd, name) is None:
            src_dir, src_name = self.view.location(node)
            os.link(src_name, name, src_dir_fd=src_dir, dst_dir_fd=parent_fd,
                    follow_symlinks=False)

    # ---------------------------------------------------------------- the copies

    def _copy_dir(self, node: Node, upper: Layer) -> None:
        view = self.view
        assert node.parent is not None
        src_fd = view.dir_fd(node, node.layer)
        tmp = _make_dir_copy(src_fd, os.fstat(src_fd), self.work_fd)
        self._rename_into(node, tmp)
        node.layer = upper
        node.dir_layers = (upper, *node.dir_layers)
        node.changed()
        view.entry_changed(node.parent, node.name, True)
        view.table.remember_copy(node, key_of(os.fstat(view.dir_fd(node, upper))))

    async def _copy_file(self, node: Node, upper: Layer, data: Data) -> None:
        view = self.view
        assert node.parent is not None
        src_layer = node.layer
        src_dir, src_name = view.location(node)
        st = os.stat(src_name, dir_fd=src_dir, follow_symlinks=False)
        # The data may be below the entry (a metadata-only file in a lower layer). An
        # upper mark without a redirect says "at the same path": only then can the data
        # stay where it is.
        below = node.data or DataRef(src_layer, node.name)
        metadata_only = (data is Data.LATER and self.metacopy and stat.S_ISREG(st.st_mode)
                         and st.st_nlink == 1 and st.st_size > 0
                         and below.path is None and below.name == node.name)
        if metadata_only:
            tmp = _metadata_copy(st, self.work_fd, self.markers)
        elif stat.S_ISREG(st.st_mode) and data is not Data.DROP and st.st_size > 0:
            data_dir, data_name = view.data_location(node)
            src = os.open(data_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                          dir_fd=data_dir)
            tmp = temp_name()
            try:
                dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                              0o600, dir_fd=self.work_fd)
                try:
                    await trio.to_thread.run_sync(copy_data, src, dst, st.st_size,
                                                 self.fsync)
                finally:
                    os.close(dst)
            except BaseException:
                remove_at(self.work_fd, tmp)
                raise
            finally:
                os.close(src)
        else:
            tmp = _empty_copy(src_dir, src_name, st, self.work_fd)
        try:
            src_dir, src_name = view.location(node)
            copy_xattrs(at_path(src_dir, src_name), at_path(self.work_fd, tmp))
            _set_metadata(self.work_fd, tmp, st)
        except BaseException:
            remove_at(self.work_fd, tmp)
            raise
        self._rename_into(node, tmp)
        node.layer = upper
        node.data = below if metadata_only else None
        node.changed()
        view.entry_changed(node.parent, node.name, False)
        fd, name = view.location(node)
        view.table.remember_copy(node, key_of(os.stat(name, dir_fd=fd, follow_symlinks=False)))
        if st.st_nlink > 1:
            await self._link_other_names(node, src_layer, st)

    def _rename_into(self, node: Node, tmp: bytes) -> None:
        """The last step: the whole copy *tmp* takes *node*'s name in the upper parent,
        whose times do not change (a copy-up is no change to the merged directory, and
        an image committed from the upper must not show one)."""
        assert node.parent is not None
        parent_fd = self.view.upper_fd(node.parent)
        try:
            with _times_kept(parent_fd):
                os.rename(tmp, node.name, src_dir_fd=self.work_fd, dst_dir_fd=parent_fd)
        except BaseException:
            remove_at(self.work_fd, tmp)
            raise

    async def _fill_data(self, node: Node, data: Data) -> None:
        """Give a metadata-only copy its data, in place. The metacopy mark goes only once
        the data is whole and synced, so a crash leaves the data below in use."""
        view = self.view
        assert node.data is not None
        dir_fd, name = view.location(node)
        dst = os.open(name, os.O_WRONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        try:
            if data is Data.COPY:
                st = os.fstat(dst)
                src_dir, src_name = view.data_location(node)
                src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=src_dir)
                try:
                    size = min(st.st_size, os.fstat(src).st_size)
                    await trio.to_thread.run_sync(copy_data, src, dst, size, self.fsync)
                finally:
                    os.close(src)
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            whiteout.clear_metacopy(dst)
        finally:
            os.close(dst)
        node.data = None
        node.changed()

    # ---------------------------------------------------------------- hard links

    async def _link_other_names(self, node: Node, layer: Layer, st: os.stat_result) -> None:
        """After copying up a lower inode with several names, link every other name of it
        that the merged view shows into the upper: the names stay one file, and the
        upper alone (what the kernel or a runtime reads) says so."""
        view = self.view
        own = view.relpath(node)
        for path in await self._other_names(layer, st):
            if path == own:
                continue
            parent = view.resolve_dir(path[:-1])
            if parent is None:
                continue
            found = find_entry(parent.dir_layers, view.fd_of(parent), path[-1])
            if found is None or found.layer is not layer or found.st.st_ino != st.st_ino:
                continue  # whited out or shadowed by a higher layer
            await self.copy_up(parent)
            src_dir, src_name = view.location(node)
            parent_fd = view.upper_fd(parent)
            with _times_kept(parent_fd):
                os.link(src_name, path[-1], src_dir_fd=src_dir, dst_dir_fd=parent_fd,
                        follow_symlinks=False)
            view.entry_changed(parent, path[-1], False)

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


# ------------------------------------------------------------------ the steps on disk


@contextlib.contextmanager
def _times_kept(dir_fd: int) -> Iterator[None]:
    """Keep the directory's atime and mtime across a change that is a copy-up."""
    st = os.fstat(dir_fd)
    yield
    os.utime(dir_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def copy_data(src_fd: int, dst_fd: int, size: int, fsync: bool = True) -> None:
    """Copy the first *size* bytes of *src_fd* to the same offsets of *dst_fd*, keeping
    holes (only the data extents are copied, found with SEEK_DATA/SEEK_HOLE, as the
    kernel does), then fsync *dst_fd* (unless *fsync* is False: ``-o fsync=0``).

    Blocking: run it in a worker thread.
    """
    for start, end in _data_extents(src_fd, size):
        _copy_range(src_fd, dst_fd, start, end)
    if os.fstat(dst_fd).st_size < size:
        os.ftruncate(dst_fd, size)  # a trailing hole
    if fsync:
        os.fsync(dst_fd)


def _data_extents(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """The [start, end) ranges of *fd* below *size* that hold data (all of it where the
    filesystem cannot tell holes)."""
    offset = 0
    while offset < size:
        try:
            start = os.lseek(fd, offset, os.SEEK_DATA)
            end = min(size, os.lseek(fd, start, os.SEEK_HOLE))
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                return  # only a hole is left
            if exc.errno != errno.EINVAL:
                raise
            start, end = offset, size  # no SEEK_DATA here
        if start >= size:
            return
        yield start, end
        offset = end


def _copy_range(src_fd: int, dst_fd: int, offset: int, end: int) -> None:
    """Copy bytes [offset, end) in the kernel: copy_file_range (a clone where the
    filesystem can), else sendfile, else read/write."""
    method = "copy_file_range"
    while offset < end:
        count = min(_CHUNK, end - offset)
        try:
            if method == "copy_file_range":
                done = os.copy_file_range(src_fd, dst_fd, count, offset, offset)
            elif method == "sendfile":
                os.lseek(dst_fd, offset, os.SEEK_SET)
                done = os.sendfile(dst_fd, src_fd, offset, count)
            else:
                buf = os.pread(src_fd, min(count, 1 << 20), offset)
                done = os.pwrite(dst_fd, buf, offset) if buf else 0
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
                method = "sendfile" if method == "copy_file_range" else "readwrite"
                continue
            raise
        if done == 0:
            return  # the source is shorter than its stat said
        offset += done


def copy_xattrs(src: int | bytes, dst: int | bytes) -> None:
    """Copy every xattr the caller may read from *src* to *dst* (fds, or `at_path` paths
    whose last component is not followed), except the union's own bookkeeping."""
    nofollow = {} if isinstance(src, int) else {"follow_symlinks": False}
    try:
        names = os.listxattr(src, **nofollow)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.EPERM):
            return
        raise
    for name in names:
        if whiteout.is_internal_xattr(name):
            continue
        try:
            os.setxattr(dst, name, os.getxattr(src, name, **nofollow), **nofollow)
        except OSError as exc:
            # A name the upper cannot hold (e.g. a security module's) is not worth
            # failing the copy for; the kernel skips such names too.
            if exc.errno not in (errno.ENOTSUP, errno.EPERM):
                raise
            log.debug("copy-up: xattr %s not copied: %s", name, exc)


def _set_metadata(dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Give the entry *name* the owner, mode and times of *st* (never following a symlink).

    chown comes before chmod, since chown clears the set-id bits.
    """
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def _make_dir_copy(src_fd: int, st: os.stat_result, work_fd: int) -> bytes:
    """A copy of the directory open at *src_fd* (without its entries) in the workdir."""
    tmp = temp_name()
    os.mkdir(tmp, 0o700, dir_fd=work_fd)
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=work_fd)
        try:
            copy_xattrs(src_fd, fd)  # never the opaque marks: they are the union's own
        finally:
            os.close(fd)
        _set_metadata(work_fd, tmp, st)
    except BaseException:
        os.rmdir(tmp, dir_fd=work_fd)
        raise
    return tmp


def _empty_copy(src_dir: int, src_name: bytes, st: os.stat_result, work_fd: int) -> bytes:
    """A copy without data in the workdir: an empty regular file (no fsync, as the
    kernel's copy-up: the rename is what must hold), a symlink, or a special file."""
    tmp = temp_name()
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                         dir_fd=work_fd))
    elif kind == stat.S_IFLNK:
        os.symlink(os.readlink(src_name, dir_fd=src_dir), tmp, dir_fd=work_fd)
    else:
        os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work_fd)
    return tmp


def _metadata_copy(st: os.stat_result, work_fd: int, markers: whiteout.Markers) -> bytes:
    """A metadata-only copy of a regular file: a sparse file of the same size, marked
    metacopy (its data stays below until it is opened for writing)."""
    tmp = temp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work_fd)
    try:
        os.ftruncate(fd, st.st_size)
        markers.set_metacopy(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=work_fd)
        raise
    os.close(fd)
    return tmp
