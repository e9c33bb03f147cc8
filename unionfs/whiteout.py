"""The only module that knows the on-disk markers of a union, and its hiding rules.

Written (kernel overlayfs format, so the kernel can mount our upper; `Markers`):
  - whiteout: a character device 0/0 under the deleted name;
  - opaque directory: the xattr ``trusted.overlay.opaque=y``, or ``user.overlay.opaque``
    in the kernel's ``userxattr`` format (without the privilege for trusted xattrs);
  - metadata-only file: the xattr ``trusted.overlay.metacopy`` on a sparse file;
  - fuse-overlayfs's fallbacks where the filesystem refuses those: ``.wh.NAME`` files,
    a ``.wh..wh..opq`` file.

Read, in every layer (lowers and upper):
  - char device 0/0;
  - OCI ``.wh.NAME`` (a regular file that hides NAME in the layers below);
  - opaque: ``trusted.overlay.opaque``, ``user.overlay.opaque``,
    ``user.fuseoverlayfs.opaque`` set to ``y``, or a ``.wh..wh..opq`` entry inside;
  - metadata-only: ``trusted.overlay.metacopy`` or ``user.overlay.metacopy``; its data
    is in a layer below, at the same path or at the one its ``overlay.redirect`` xattr
    names (read, never written).

The hiding rules, one set for the live view, inspection and OCI export
(`read_layer_dir`): a whiteout (either kind) hides its name in the layers below, never
in its own layer; marker names (every ``.wh.`` name, aufs's ``.wh..wh.*`` bookkeeping
included) are never entries. Markers never show in the merged view: `is_marker_name`
and `is_internal_xattr` say what to hide. Every function works on a directory fd and
never follows a symlink (a layer is untrusted data).
"""

from __future__ import annotations

import enum
import errno
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass

from unionfs.sysc import RENAME_WHITEOUT, at_path, renameat2

_WH_PREFIX = b".wh."
_OPAQUE_MARKER = b".wh..wh..opq"
#: aufs bookkeeping (``.wh..wh.plnk`` and the like): neither a whiteout nor an entry.
_AUFS_META = b".wh..wh."

OPAQUE_XATTRS = (
    "trusted.overlay.opaque",
    "user.overlay.opaque",
    "user.fuseoverlayfs.opaque",
)
#: Every metacopy mark we read, in any layer: a file whose data is in a layer below.
METACOPY_XATTRS = ("trusted.overlay.metacopy", "user.overlay.metacopy")
#: Where the data of a metacopy file is, when not at its own path (the kernel writes
#: these for renamed metacopy files): ``/abs/path`` from the layer root, or a name in
#: the same directory.
REDIRECT_XATTRS = ("trusted.overlay.redirect", "user.overlay.redirect")

#: xattr name prefixes that belong to the union's bookkeeping, never to the user.
INTERNAL_XATTR_PREFIXES = (
    "trusted.overlay.",
    "user.overlay.",
    "user.fuseoverlayfs.",
    "trusted.unionfs.",
)


# --------------------------------------------------------------------------- predicates


def is_whiteout(st: os.stat_result) -> bool:
    """True for a kernel-format whiteout: a character device with rdev 0/0."""
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def is_whiteout_request(mode: int, rdev: int) -> bool:
    """True when a mknod of *mode* and *rdev* would make a whiteout (refused through the
    union: it would delete, not create)."""
    return stat.S_ISCHR(mode) and rdev == 0


def is_marker_name(name: bytes) -> bool:
    """True for names reserved by OCI layers (``.wh.*``): never listed, never created."""
    return name.startswith(_WH_PREFIX)


def is_internal_xattr(name: str) -> bool:
    """True for xattrs that carry the union's own bookkeeping (hidden from the merged view)."""
    return name.startswith(INTERNAL_XATTR_PREFIXES)


# --------------------------------------------------------------------------- OCI names


def oci_whiteout_name(name: bytes) -> bytes:
    """The OCI marker name that hides *name*."""
    return _WH_PREFIX + name


#: The OCI marker that makes its directory opaque.
OCI_OPAQUE_NAME = _OPAQUE_MARKER


class OciName(enum.Enum):
    """What a ``.wh.`` name in an OCI layer is."""

    WHITEOUT = "whiteout"  # hides the name after the prefix
    OPAQUE = "opaque"  # makes its directory opaque
    AUFS = "aufs"  # aufs bookkeeping, to be skipped
    BAD = "bad"  # a marker that names nothing (``.wh.``, ``.wh..``)


def classify_oci_name(name: bytes) -> OciName | None:
    """What the marker *name* is; None for an ordinary name."""
    if not name.startswith(_WH_PREFIX):
        return None
    if name == _OPAQUE_MARKER:
        return OciName.OPAQUE
    if name.startswith(_AUFS_META):
        return OciName.AUFS
    if whited_out_name(name) is None:
        return OciName.BAD
    return OciName.WHITEOUT


def whited_out_name(marker: bytes) -> bytes | None:
    """The name an OCI whiteout hides; None for other names and other markers."""
    if not marker.startswith(_WH_PREFIX) or marker.startswith(_AUFS_META):
        return None
    target = marker[len(_WH_PREFIX):]
    return None if target in (b"", b".", b"..") else target


def hidden_temp_name(base: bytes) -> bytes:
    """A temporary name for an entry built beside its final name: a marker name, so
    never listed and never creatable through the union while it exists."""
    return _WH_PREFIX + base


# --------------------------------------------------------------------------- hiding rules


@dataclass(frozen=True)
class LayerDir:
    """What one layer's directory holds, by the hiding rules: its own entries (name ->
    whether it is a directory) and the names it hides in the layers below it."""

    entries: dict[bytes, bool]
    hidden: frozenset[bytes]


def read_layer_dir(fd: int) -> LayerDir:
    """The entries and whiteouts of the directory open at *fd* (one scandir; an lstat
    only for entries whose d_type a whiteout could have)."""
    entries: dict[bytes, bool] = {}
    hidden: set[bytes] = set()
    # os.scandir on an fd works on its own dup and rewinds it when done; it yields str
    # names, and os.fsencode gives back the exact bytes.
    with os.scandir(fd) as it:
        for entry in it:
            name = os.fsencode(entry.name)
            if name.startswith(_WH_PREFIX):
                target = whited_out_name(name)
                if target is not None:
                    hidden.add(target)
                continue
            is_dir = entry.is_dir(follow_symlinks=False)
            if not (is_dir or entry.is_file(follow_symlinks=False) or entry.is_symlink()):
                try:
                    st = os.stat(name, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if is_whiteout(st):
                    hidden.add(name)
                    continue
            entries[name] = is_dir
    return LayerDir(entries, frozenset(hidden))


def is_opaque_fd(dir_fd: int) -> bool:
    """True when the directory open at *dir_fd* stops the merge of the layers below it.

    *dir_fd* must be a real (not O_PATH) descriptor of the directory itself. One
    flistxattr answers for the common case of a directory without xattrs.
    """
    try:
        names = os.listxattr(dir_fd)
    except OSError as exc:
        if exc.errno not in (errno.ENOTSUP, errno.EPERM, errno.EACCES):
            raise
        names = []
    for name in OPAQUE_XATTRS:
        if name in names:
            try:
                if os.getxattr(dir_fd, name) == b"y":
                    return True
            except OSError as exc:
                if exc.errno not in (errno.ENODATA, errno.EPERM, errno.EACCES):
                    raise
    try:
        os.stat(_OPAQUE_MARKER, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return True


def has_oci_whiteout(dir_fd: int, name: bytes) -> bool:
    """True when the directory at *dir_fd* holds an OCI ``.wh.NAME`` marker for *name*."""
    try:
        os.stat(_WH_PREFIX + name, dir_fd=dir_fd, follow_symlinks=False)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return False
        raise
    return True


def remove_oci_whiteout(dir_fd: int, name: bytes) -> None:
    """Remove the OCI marker for *name* from *dir_fd*, if there is one (the name is
    about to be an entry of this layer)."""
    try:
        os.unlink(_WH_PREFIX + name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


# --------------------------------------------------------------------------- writing


class WhiteoutKind(enum.Enum):
    """How an upper's whiteouts are written."""

    #: a character device 0/0, the kernel's (unprivileged too, since Linux 5.8)
    DEVICE = "device"
    #: an empty ``.wh.NAME`` file, as fuse-overlayfs falls back to where mknod is refused
    #: (the kernel cannot read it)
    OCI = "oci"


@dataclass(frozen=True)
class Markers:
    """How the markers of one upper are written.

    The kernel's formats are ``trusted.overlay.*`` xattrs (it needs privilege) and,
    with ``userxattr``, ``user.overlay.*``, each with char 0/0 whiteouts. Where the
    filesystem holds no xattrs at all, an opaque directory gets the OCI opaque marker
    file instead (*opaque_files*), and where it refuses whiteout devices, whiteouts are
    OCI marker files: fuse-overlayfs's fallbacks, which unionfs reads and the kernel
    does not.
    """

    #: the xattr prefix: ``trusted.overlay.`` or ``user.overlay.``
    xattrs: str
    whiteouts: WhiteoutKind = WhiteoutKind.DEVICE
    opaque_files: bool = False

    @property
    def name(self) -> str:
        """How the format is named in the log."""
        text = "userxattr" if self.xattrs.startswith("user.") else "trusted xattrs"
        if self.opaque_files:
            text = "OCI opaque marker files (no xattrs)"
        if self.whiteouts is WhiteoutKind.OCI:
            text += ", OCI whiteout files"
        return text

    def make_whiteout(self, dir_fd: int, name: bytes) -> None:
        """Create a whiteout named *name* in *dir_fd*."""
        if self.whiteouts is WhiteoutKind.DEVICE:
            os.mknod(name, stat.S_IFCHR | 0o000, os.makedev(0, 0), dir_fd=dir_fd)
        else:
            os.close(os.open(_WH_PREFIX + name, os.O_WRONLY | os.O_CREAT | os.O_EXCL
                             | os.O_NOFOLLOW | os.O_CLOEXEC, 0o000, dir_fd=dir_fd))

    def rename_leaving_whiteout(self, old_dir: int, old: bytes, new_dir: int,
                                new: bytes) -> None:
        """Rename *old* to *new* and leave a whiteout where *old* was: atomically with
        RENAME_WHITEOUT where the kernel can, else a rename and then the whiteout."""
        if self.whiteouts is WhiteoutKind.DEVICE:
            try:
                renameat2(old_dir, old, new_dir, new, RENAME_WHITEOUT)
                return
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, errno.EPERM):
                    raise
        os.rename(old, new, src_dir_fd=old_dir, dst_dir_fd=new_dir)
        self.make_whiteout(old_dir, old)

    def set_opaque(self, fd: int) -> None:
        """Mark the directory open at *fd* opaque."""
        if self.opaque_files:
            os.close(os.open(_OPAQUE_MARKER, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW
                             | os.O_CLOEXEC, 0o000, dir_fd=fd))
        else:
            os.setxattr(fd, self.xattrs + "opaque", b"y")

    def set_metacopy(self, fd: int) -> None:
        """Mark the regular file open at *fd* as holding metadata only."""
        os.setxattr(fd, self.xattrs + "metacopy", b"")


#: The kernel's format for a privileged upper.
TRUSTED = Markers("trusted.overlay.")
#: The kernel's ``userxattr`` format, for an unprivileged upper.
USERXATTR = Markers("user.overlay.")


# --------------------------------------------------------------------------- metacopy


def is_metacopy(dir_fd: int, name: bytes) -> bool:
    """True when the regular file *name* in *dir_fd* holds metadata only (either mark).

    One llistxattr (see `sysc.at_path`).
    """
    try:
        names = os.listxattr(at_path(dir_fd, name), follow_symlinks=False)
    except OSError as exc:
        if exc.errno in (errno.ENOTSUP, errno.ENOENT, errno.EPERM, errno.EACCES):
            return False
        raise
    return any(mark in names for mark in METACOPY_XATTRS)


def redirect_of(dir_fd: int, name: bytes) -> bytes | None:
    """The ``overlay.redirect`` value of the entry *name* in *dir_fd*, if it has one."""
    path = at_path(dir_fd, name)
    for xattr in REDIRECT_XATTRS:
        try:
            return os.getxattr(path, xattr, follow_symlinks=False)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP, errno.EPERM, errno.EACCES):
                raise
    return None


def clear_metacopy(fd: int) -> None:
    """The file open at *fd* now holds its data."""
    for xattr in (*METACOPY_XATTRS, *REDIRECT_XATTRS):
        try:
            os.removexattr(fd, xattr)
        except OSError as exc:
            if exc.errno not in (errno.ENODATA, errno.ENOTSUP):
                raise


# --------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class Support:
    """What a filesystem can hold of the markers we write (learnt by `probe`): for
    each, None when it can, else why not (an errno string)."""

    trusted_xattrs: str | None
    user_xattrs: str | None
    whiteout_devices: str | None


def probe(work_fd: int, name: bytes) -> Support:
    """Learn what the filesystem of the directory *work_fd* holds, with a scratch
    directory *name* made in it and removed again (the workdir: nothing a user sees)."""
    os.mkdir(name, 0o700, dir_fd=work_fd)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                     dir_fd=work_fd)
        try:
            trusted = _failure(lambda: TRUSTED.set_opaque(fd))
            user = _failure(lambda: USERXATTR.set_opaque(fd))
            devices = _failure(lambda: TRUSTED.make_whiteout(fd, b"wh"))
            if devices is None:
                os.unlink(b"wh", dir_fd=fd)
        finally:
            os.close(fd)
    finally:
        os.rmdir(name, dir_fd=work_fd)
    return Support(trusted, user, devices)


def _failure(call: Callable[[], None]) -> str | None:
    """None when *call* succeeds; the strerror of an OSError it raises."""
    try:
        call()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None
