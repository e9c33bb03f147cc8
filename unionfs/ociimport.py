"""An OCI layer tar unpacked into a layer directory (``unionmount import``), and what
the layer tar formats share with `ociexport`.

`import_layer` unpacks a layer tar into an empty (or new) directory with
directory-fd-relative calls that never follow a symlink, and refuses, before writing
the entry concerned: absolute paths and ``..``, entries whose path passes through a
symlink, hard links to anything but an earlier file of the same archive, and device
nodes unless running as root. On any failure what it wrote is removed again, so a
refused archive leaves nothing behind. OCI markers are kept (`Format.OCI`) or turned
into the kernel's format (`Format.OVERLAY`), as `whiteout` writes them.
"""

from __future__ import annotations

import base64
import enum
import errno
import logging
import os
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from unionfs import whiteout
from unionfs.config import LayerError
from unionfs.layers import lstat_at, open_dir_at
from unionfs.merged import user_visible_xattr
from unionfs.sysc import at_path, remove_at

log = logging.getLogger(__name__)

NS = 1_000_000_000
_CHUNK = 1 << 20
#: The PAX record prefix of xattrs (GNU tar, Go, containers-storage).
SCHILY_XATTR = "SCHILY.xattr."
_LIBARCHIVE = "LIBARCHIVE.xattr."


class Format(enum.Enum):
    """How import writes deletions and opaque directories."""

    #: keep the OCI markers: unionfs and fuse-overlayfs read them
    OCI = "oci"
    #: the kernel's format (`whiteout.TRUSTED`: char 0/0, trusted xattrs); needs root
    OVERLAY = "overlay"


def tar_name(path: bytes) -> str:
    """A name as tarfile takes it (decoded back to the same bytes on write)."""
    return path.decode("utf-8", "surrogateescape")


def raw_name(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True)
class Imported:
    entries: int
    warnings: tuple[str, ...]


def import_layer(src: BinaryIO, dest: str, fmt: Format = Format.OCI, *,
                 allow_devices: bool | None = None) -> Imported:
    """Unpack the layer tar read from *src* (plain or compressed) into *dest*.

    *dest* must be an empty directory or not exist yet (its parent must). Device nodes
    are refused unless *allow_devices* (default: running as root). Raises LayerError
    for an archive it refuses and OSError for a failed call; in both cases whatever it
    wrote is removed (and *dest*, if it made it).
    """
    if allow_devices is None:
        allow_devices = os.geteuid() == 0
    made = False
    try:
        os.mkdir(dest, 0o755)
        made = True
    except FileExistsError:
        pass
    root_fd = os.open(dest, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if not made and os.listdir(root_fd):
            raise LayerError(f"{dest}: not empty (import into a new or empty directory)")
        unpacker = _Unpacker(root_fd, fmt, allow_devices)
        try:
            unpacker.unpack(src)
        except BaseException:
            _remove_written(dest, root_fd, made)
            raise
        return Imported(unpacker.entries, tuple(unpacker.warnings))
    finally:
        os.close(root_fd)


def _remove_written(dest: str, root_fd: int, made: bool) -> None:
    """Undo an import that failed: empty *dest* again, and remove it if we made it."""
    try:
        for name in os.listdir(root_fd):
            remove_at(root_fd, os.fsencode(name))
        if made:
            os.rmdir(dest)
    except OSError as exc:
        log.warning("could not remove what the failed import wrote in %s: %s", dest, exc)


def _components(name: str, what: str) -> tuple[bytes, ...]:
    """The path components of an archive name; refuses absolute paths and ``..``."""
    raw = raw_name(name)
    if raw.startswith(b"/"):
        raise LayerError(f"refused: {what} {name!r} is an absolute path")
    parts = tuple(part for part in raw.split(b"/") if part and part != b".")
    if b".." in parts:
        raise LayerError(f"refused: {what} {name!r} contains '..'")
    return parts


def _shown(components: tuple[bytes, ...]) -> str:
    return repr(tar_name(b"/".join(components)) or ".")


def _pax_ns(text: str) -> int:
    """A PAX time (``[-]SECONDS[.FRACTION]``) in nanoseconds, exactly."""
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise LayerError(f"refused: bad time {text!r} in the archive")
    ns = int(whole) * NS + int((frac + "000000000")[:9])
    return -ns if negative else ns


@dataclass(frozen=True)
class _Meta:
    uid: int
    gid: int
    mode: int
    atime_ns: int
    mtime_ns: int
    xattrs: tuple[tuple[str, bytes], ...]


class _Unpacker:
    def __init__(self, root_fd: int, fmt: Format, allow_devices: bool) -> None:
        self.root_fd = root_fd
        self.fmt = fmt
        self.allow_devices = allow_devices
        self.is_root = os.geteuid() == 0
        self.entries = 0
        self.warnings: list[str] = []
        #: non-directories this archive made: the only targets hard links may have
        self.made: set[tuple[bytes, ...]] = set()
        #: directories and their metadata, applied last (their entries change mtimes)
        self.dirs: list[tuple[tuple[bytes, ...], _Meta]] = []
        #: Format.OVERLAY: (directory, whited-out name or None for opaque)
        self.markers: list[tuple[tuple[bytes, ...], bytes | None]] = []

    # ------------------------------------------------------------ reading

    def unpack(self, src: BinaryIO) -> None:
        try:
            with tarfile.open(fileobj=src, mode="r|*", encoding="utf-8",
                              errors="surrogateescape") as tar:
                for member in tar:
                    self._member(tar, member)
                    self.entries += 1
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise LayerError(f"not a readable layer tar: {exc}") from None
        for directory, name in self.markers:
            self._overlay_marker(directory, name)
        # Deepest first; for one directory named twice, the later entry wins.
        for components, meta in sorted(self.dirs, key=lambda d: -len(d[0])):
            fd = self._open_dir(components, create=False)
            try:
                self._apply_fd(fd, meta)
            finally:
                os.close(fd)

    def _member(self, tar: tarfile.TarFile, member: tarfile.TarInfo) -> None:
        components = _components(member.name, "entry")
        if not components:
            if not member.isdir():
                raise LayerError(f"refused: the entry {member.name!r} is not a directory")
            self.dirs.append(((), self._meta(member)))
            return
        name = components[-1]
        if whiteout.is_marker_name(name) and not self._marker(components):
            return
        parent = self._open_dir(components[:-1], create=True)
        try:
            self._create(tar, member, components, parent, name)
        finally:
            os.close(parent)

    def _marker(self, components: tuple[bytes, ...]) -> bool:
        """Check an OCI marker; True when it is to be unpacked as a file."""
        name = components[-1]
        kind = whiteout.classify_oci_name(name)
        if kind is whiteout.OciName.AUFS:
            self.warnings.append(f"skipped aufs metadata {_shown(components)}")
            return False
        if kind is whiteout.OciName.BAD:
            raise LayerError(f"refused: bad whiteout {_shown(components)}")
        target = whiteout.whited_out_name(name)
        if self.fmt is Format.OCI:
            return True
        os.close(self._open_dir(components[:-1], create=True))
        self.markers.append((components[:-1], target))
        return False

    def _create(self, tar: tarfile.TarFile, member: tarfile.TarInfo,
                components: tuple[bytes, ...], parent: int, name: bytes) -> None:
        if member.isdir():
            existing = lstat_at(parent, name)
            if existing is None or not stat.S_ISDIR(existing.st_mode):
                self._clear(parent, name)
                os.mkdir(name, 0o700, dir_fd=parent)
            self.made.discard(components)
            self.dirs.append((components, self._meta(member)))
            return
        if member.islnk():
            self._hard_link(member, components, parent, name)
            return
        if (member.ischr() or member.isblk()) and not self.allow_devices:
            raise LayerError(f"refused: {_shown(components)} is a device node "
                             "(only root may import device nodes)")
        if not (member.isreg() or member.issym() or member.isfifo() or member.ischr()
                or member.isblk()):
            raise LayerError(f"refused: {_shown(components)} has the unsupported tar type "
                             f"{member.type!r}")
        self._clear(parent, name)
        meta = self._meta(member)
        if member.isreg():
            self._regular(tar, member, parent, name, meta)
        else:
            if member.issym():
                os.symlink(raw_name(member.linkname), name, dir_fd=parent)
            elif member.isfifo():
                os.mkfifo(name, 0o600, dir_fd=parent)
            else:
                kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
                os.mknod(name, kind | 0o600, os.makedev(member.devmajor, member.devminor),
                         dir_fd=parent)
            self._apply_at(parent, name, meta, symlink=member.issym())
        self.made.add(components)

    def _regular(self, tar: tarfile.TarFile, member: tarfile.TarInfo, parent: int,
                 name: bytes, meta: _Meta) -> None:
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600, dir_fd=parent)
        with open(fd, "wb") as out:
            data = tar.extractfile(member)
            if data is not None:
                shutil.copyfileobj(data, out, _CHUNK)
            out.flush()
            self._apply_fd(fd, meta)

    def _hard_link(self, member: tarfile.TarInfo, components: tuple[bytes, ...], parent: int,
                   name: bytes) -> None:
        target = _components(member.linkname, f"hard link {_shown(components)} to")
        if target not in self.made:
            raise LayerError(f"refused: hard link {_shown(components)} points to "
                             f"{member.linkname!r}, not an earlier file of the archive")
        if target == components:
            return
        source = self._open_dir(target[:-1], create=False)
        try:
            self._clear(parent, name)
            os.link(target[-1], name, src_dir_fd=source, dst_dir_fd=parent,
                    follow_symlinks=False)
        finally:
            os.close(source)
        self.made.add(components)

    # ------------------------------------------------------------ paths

    def _open_dir(self, components: tuple[bytes, ...], create: bool) -> int:
        """A new fd of the directory *components* under the root, made (0755) if missing
        and *create*. Refuses a path through a symlink or a non-directory."""
        fd = os.dup(self.root_fd)
        try:
            for depth, name in enumerate(components):
                try:
                    child = open_dir_at(fd, name)
                except OSError as exc:
                    if exc.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                        raise
                    st = lstat_at(fd, name)
                    where = _shown(components[: depth + 1])
                    if st is not None and stat.S_ISLNK(st.st_mode):
                        raise LayerError(f"refused: an entry passes through the symlink {where}"
                                         ) from None
                    if st is not None or not create:
                        raise LayerError(f"refused: an entry passes through {where}, "
                                         "not a directory") from None
                    os.mkdir(name, 0o755, dir_fd=fd)
                    child = open_dir_at(fd, name)
                os.close(fd)
                fd = child
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _clear(self, parent: int, name: bytes) -> None:
        """Remove an earlier entry of the same name (a later one replaces it)."""
        if lstat_at(parent, name) is not None:
            remove_at(parent, name)

    # ------------------------------------------------------------ metadata

    def _meta(self, member: tarfile.TarInfo) -> _Meta:
        pax = member.pax_headers
        mtime = _pax_ns(pax["mtime"]) if "mtime" in pax else int(member.mtime) * NS
        atime = _pax_ns(pax["atime"]) if "atime" in pax else mtime
        xattrs: list[tuple[str, bytes]] = []
        for key, value in sorted(pax.items()):
            if key.startswith(SCHILY_XATTR):
                xattrs.append((key[len(SCHILY_XATTR):], raw_name(value)))
            elif key.startswith(_LIBARCHIVE):
                xattrs.append((urllib.parse.unquote(key[len(_LIBARCHIVE):]),
                               base64.b64decode(value)))
        kept = tuple((k, v) for k, v in xattrs if user_visible_xattr(k))
        if len(kept) != len(xattrs):
            self.warnings.append(f"ignored union bookkeeping xattrs on {member.name!r}")
        return _Meta(member.uid, member.gid, stat.S_IMODE(member.mode), atime, mtime, kept)

    def _chown(self, call: Callable[[], None]) -> None:
        try:
            call()
        except PermissionError:
            if self.is_root:
                raise
            if not any(w.startswith("owners") for w in self.warnings):
                self.warnings.append("owners not restored (not running as root)")

    def _set_xattrs(self, target: int | bytes, meta: _Meta, where: str) -> None:
        """Set *meta*'s xattrs on an fd, or on an `at_path` path (its last component not
        followed)."""
        nofollow = {} if isinstance(target, int) else {"follow_symlinks": False}
        for key, value in meta.xattrs:
            try:
                os.setxattr(target, key, value, **nofollow)
            except OSError as exc:
                if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EACCES):
                    raise
                self.warnings.append(f"xattr {key} not set on {where}: {exc.strerror}")

    def _apply_fd(self, fd: int, meta: _Meta) -> None:
        """Owner, mode, xattrs, times on an open file or directory (chown first: it
        clears set-id bits and file capabilities)."""
        self._chown(lambda: os.fchown(fd, meta.uid, meta.gid))
        os.fchmod(fd, meta.mode)
        self._set_xattrs(fd, meta, f"fd {fd}")
        os.utime(fd, ns=(meta.atime_ns, meta.mtime_ns))

    def _apply_at(self, parent: int, name: bytes, meta: _Meta, symlink: bool) -> None:
        self._chown(lambda: os.chown(name, meta.uid, meta.gid, dir_fd=parent,
                                     follow_symlinks=False))
        if not symlink:
            os.chmod(name, meta.mode, dir_fd=parent, follow_symlinks=False)
        if meta.xattrs:
            self._set_xattrs(at_path(parent, name), meta, tar_name(name))
        os.utime(name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _overlay_marker(self, directory: tuple[bytes, ...], name: bytes | None) -> None:
        """An OCI marker in the kernel's format: an opaque xattr, or a char 0/0 whiteout
        (a directory of the same name in the archive is made opaque instead, since the
        marker deletes only what the layers below hold)."""
        parent = self._open_dir(directory, create=True)
        try:
            if name is None:
                whiteout.TRUSTED.set_opaque(parent)
                return
            st = lstat_at(parent, name)
            if st is None:
                whiteout.TRUSTED.make_whiteout(parent, name)
            elif stat.S_ISDIR(st.st_mode):
                fd = open_dir_at(parent, name)
                try:
                    whiteout.TRUSTED.set_opaque(fd)
                finally:
                    os.close(fd)
        finally:
            os.close(parent)
