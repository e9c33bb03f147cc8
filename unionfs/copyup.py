"""Copy-up: the only multi-step change to disk.

Every copy is built under a temporary name in the workdir (same filesystem as
the upper), given its owner, mode, xattrs and times, fsynced, and only then
renamed into the upper. A crash at any point leaves the upper with either no
copy or a whole one; stray temporaries in the workdir are removed at mount.

The data is copied with copy_file_range (the kernel clones or copies in-kernel,
never through Python buffers), falling back to sendfile and then read/write
where a filesystem refuses it. The data copy is the only part that may run in
a worker thread (`copy_data`); everything else here is short metadata calls.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import stat
from collections.abc import Iterator

from unionfs import whiteout
from unionfs.sysc import at_path

log = logging.getLogger(__name__)

_CHUNK = 1 << 30
_counter = itertools.count()


@contextlib.contextmanager
def times_kept(dir_fd: int) -> Iterator[None]:
    """Keep the directory's atime and mtime across a copy-up into it: a copy-up is no
    change to the merged directory (the kernel restores them too), and an image
    committed from the upper must not show one."""
    st = os.fstat(dir_fd)
    yield
    os.utime(dir_fd, ns=(st.st_atime_ns, st.st_mtime_ns))


def temp_name() -> bytes:
    """A name for a temporary entry in the workdir, unique within this process."""
    return b"#%d-%d" % (os.getpid(), next(_counter))


def copy_data(src_fd: int, dst_fd: int, size: int, fsync: bool = True) -> None:
    """Copy the first *size* bytes of *src_fd* to the same offsets of *dst_fd*, keeping
    holes (only the data extents are copied, found with SEEK_DATA/SEEK_HOLE, as the
    kernel does), then fsync *dst_fd* (unless *fsync* is False: ``-o fsync=0``).

    Blocking: run it in a worker thread for large files.
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


def proc_path(fd: int) -> str:
    return f"/proc/self/fd/{fd}"


def open_path(dir_fd: int, name: bytes) -> int:
    """An O_PATH descriptor of the entry itself (a symlink is not followed)."""
    return os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)


def set_metadata(dir_fd: int, name: bytes, st: os.stat_result) -> None:
    """Give the entry *name* the owner, mode and times of *st* (never following a symlink).

    chown comes before chmod, since chown clears the set-id bits.
    """
    os.chown(name, st.st_uid, st.st_gid, dir_fd=dir_fd, follow_symlinks=False)
    if not stat.S_ISLNK(st.st_mode):
        os.chmod(name, stat.S_IMODE(st.st_mode), dir_fd=dir_fd, follow_symlinks=False)
    os.utime(name, ns=(st.st_atime_ns, st.st_mtime_ns), dir_fd=dir_fd, follow_symlinks=False)


def copy_xattrs_at(src_dir: int, src_name: bytes, dst_dir: int, dst_name: bytes) -> None:
    copy_xattrs(at_path(src_dir, src_name), at_path(dst_dir, dst_name))


def make_dir_copy(src_fd: int, st: os.stat_result, work_fd: int) -> bytes:
    """Build a copy of the directory open at *src_fd* (without its entries) in the workdir.

    Returns the temporary name; the caller renames it into the upper.
    """
    tmp = temp_name()
    os.mkdir(tmp, 0o700, dir_fd=work_fd)
    try:
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=work_fd)
        try:
            copy_xattrs(src_fd, fd)
            whiteout.clear_opaque(fd)
        finally:
            os.close(fd)
        set_metadata(work_fd, tmp, st)
    except BaseException:
        os.rmdir(tmp, dir_fd=work_fd)
        raise
    return tmp


def start_file_copy(src_dir: int, src_name: bytes, st: os.stat_result, work_fd: int,
                    with_data: bool) -> tuple[bytes, int | None, int | None]:
    """First step of a non-directory copy-up: the temporary entry in the workdir.

    Returns (temp name, source fd, destination fd); the fds are set only for a
    regular file whose data must still be copied (by `copy_data`, then closed).
    """
    tmp = temp_name()
    kind = stat.S_IFMT(st.st_mode)
    if kind == stat.S_IFREG:
        src = os.open(src_name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=src_dir)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600,
                          dir_fd=work_fd)
        except BaseException:
            os.close(src)
            raise
        if with_data and st.st_size > 0:
            return tmp, src, dst
        # No data, no fsync (as the kernel's copy-up): the rename is what must hold.
        os.close(src)
        os.close(dst)
    elif kind == stat.S_IFLNK:
        os.symlink(os.readlink(src_name, dir_fd=src_dir), tmp, dir_fd=work_fd)
    else:
        os.mknod(tmp, st.st_mode, st.st_rdev, dir_fd=work_fd)
    return tmp, None, None


def start_metadata_copy(src_dir: int, src_name: bytes, st: os.stat_result,
                        work_fd: int) -> bytes:
    """A metadata-only copy of a regular file: a sparse file of the same size, marked
    metacopy (its data stays in the lower layer until it is opened for writing)."""
    tmp = temp_name()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600, dir_fd=work_fd)
    try:
        os.ftruncate(fd, st.st_size)
        whiteout.set_metacopy(fd)
    except BaseException:
        os.close(fd)
        os.unlink(tmp, dir_fd=work_fd)
        raise
    os.close(fd)
    return tmp


def finish_file_copy(src_dir: int, src_name: bytes, st: os.stat_result, work_fd: int,
                     tmp: bytes) -> None:
    """Second step: owner, mode, xattrs and times of the source onto the temporary entry."""
    try:
        copy_xattrs_at(src_dir, src_name, work_fd, tmp)
        set_metadata(work_fd, tmp, st)
    except BaseException:
        discard(work_fd, tmp)
        raise


def discard(work_fd: int, tmp: bytes) -> None:
    """Remove a temporary entry (file or directory tree) from the workdir."""
    try:
        st = os.stat(tmp, dir_fd=work_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=work_fd)
        try:
            for name in os.listdir(fd):
                discard(fd, os.fsencode(name))
        finally:
            os.close(fd)
        os.rmdir(tmp, dir_fd=work_fd)
    else:
        os.unlink(tmp, dir_fd=work_fd)


def clean_workdir(work_fd: int) -> None:
    """Remove what a crashed server left in the workdir (never complete copies)."""
    for name in os.listdir(work_fd):
        discard(work_fd, os.fsencode(name))
