"""System calls the os module lacks (renameat2), through ctypes, and *at() stand-ins."""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import stat

RENAME_NOREPLACE = 1 << 0
RENAME_EXCHANGE = 1 << 1
RENAME_WHITEOUT = 1 << 2

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_renameat2 = _libc.renameat2
_renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
_renameat2.restype = ctypes.c_int


def renameat2(olddirfd: int, oldname: bytes, newdirfd: int, newname: bytes, flags: int = 0) -> None:
    """renameat2(2); raises OSError with the call's errno."""
    if _renameat2(olddirfd, oldname, newdirfd, newname, flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), oldname, None, newname)


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_UTIME_OMIT = (1 << 30) - 2
_futimens = _libc.futimens
_futimens.argtypes = [ctypes.c_int, ctypes.POINTER(_Timespec)]
_futimens.restype = ctypes.c_int


def set_mtime(fd: int, mtime_ns: int) -> None:
    """futimens(2) of the mtime alone (the atime left as it is, which os.utime cannot)."""
    times = (_Timespec * 2)(_Timespec(0, _UTIME_OMIT),
                            _Timespec(*divmod(mtime_ns, 1_000_000_000)))
    if _futimens(fd, times) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


_SYS_MOUNT_SETATTR = 442  # the same number on every architecture (a new-style syscall)
AT_FDCWD = -100
MOUNT_ATTR_NOSUID = 0x2
MOUNT_ATTR_NODEV = 0x4
MOUNT_ATTR_NOEXEC = 0x8
MOUNT_ATTR__ATIME = 0x70
MOUNT_ATTR_STRICTATIME = 0x20
MOUNT_ATTR_NODIRATIME = 0x80
MOUNT_ATTR_NOSYMFOLLOW = 0x200000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def mount_setattr(path: str, attr_set: int, attr_clr: int = 0) -> None:
    """mount_setattr(2) on the mount at *path* (Linux 5.12+); raises OSError."""
    attr = _MountAttr(attr_set, attr_clr, 0, 0)
    if _libc.syscall(_SYS_MOUNT_SETATTR, AT_FDCWD, os.fsencode(path), 0,
                     ctypes.byref(attr), ctypes.sizeof(attr)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), path)


def at_path(dir_fd: int, name: bytes) -> bytes:
    """A path naming the entry *name* of the directory open at *dir_fd*, for calls that
    have no *at() form (the xattr calls): pass it with follow_symlinks=False.

    /proc/self/fd/N resolves to that very directory, and the last component is not
    followed, so this is as safe as a dir_fd call and costs one syscall.
    """
    return b"/proc/self/fd/%d/%s" % (dir_fd, name)


def fd_path(fd: int) -> bytes:
    """A path naming what *fd* (an O_PATH fd, say) refers to, for linkat through it."""
    return b"/proc/self/fd/%d" % fd


def remove_at(dir_fd: int, name: bytes) -> None:
    """Remove the entry *name* of the directory open at *dir_fd*, a directory with all
    it holds; never follows a symlink. Nothing there is no error."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=dir_fd)
        try:
            for entry in os.listdir(fd):
                remove_at(fd, os.fsencode(entry))
        finally:
            os.close(fd)
        os.rmdir(name, dir_fd=dir_fd)
    else:
        os.unlink(name, dir_fd=dir_fd)
