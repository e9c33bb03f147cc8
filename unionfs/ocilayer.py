"""A union's upper as an OCI layer, and an OCI layer unpacked into a layer directory.

Export (`export_layer`) writes the upper as an OCI image layer (a PAX tar):

- a whiteout (char 0/0, or an OCI ``.wh.NAME`` already in the upper) becomes an empty
  regular file ``.wh.NAME``; an opaque directory (any opaque xattr we read, or a
  ``.wh..wh..opq`` inside) becomes the directory's entry followed by
  ``DIR/.wh..wh..opq``;
- the names of one inode become one file and hard links to it;
- xattrs (file capabilities included) become ``SCHILY.xattr.*`` PAX records, except
  the union's own bookkeeping (`whiteout.is_internal_xattr`);
- owners are numeric (no user or group names), mtimes keep their nanoseconds (a PAX
  ``mtime`` record), and entries come in a fixed order (depth first, names sorted
  bytewise, an opaque marker right after its directory): the same upper gives the
  same bytes. The layer's diff_id is the sha256 of the uncompressed tar.

Import (`import_layer`) unpacks a layer tar into an empty (or new) directory with
directory-fd-relative calls that never follow a symlink, and refuses, before writing
the entry concerned: absolute paths and ``..``, entries whose path passes through a
symlink, hard links to anything but an earlier file of the same archive, and device
nodes unless running as root. On any failure what it wrote is removed again, so a
refused archive leaves nothing behind. OCI markers are kept (`Format.OCI`) or turned
into the kernel's format (`Format.OVERLAY`: char 0/0, ``trusted.overlay.opaque=y``).
"""

from __future__ import annotations

import base64
import enum
import errno
import gzip
import hashlib
import logging
import os
import shutil
import stat
import tarfile
import urllib.parse
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol, Self, cast

from unionfs import copyup, whiteout
from unionfs.inspect import Stack, open_data, read_xattrs, user_visible_xattr
from unionfs.layers import lstat_at, open_dir_at
from unionfs.sysc import at_path

log = logging.getLogger(__name__)

_NS = 1_000_000_000
_CHUNK = 1 << 20
_SCHILY = "SCHILY.xattr."
_LIBARCHIVE = "LIBARCHIVE.xattr."
#: aufs bookkeeping (``.wh..wh.plnk`` and the like): never a whiteout, skipped on import.
_AUFS_META = whiteout.WH_PREFIX + whiteout.WH_PREFIX

Progress = Callable[[int, int], None]


class LayerError(Exception):
    """A layer that cannot be exported or imported as asked; the message is one line."""

    exitcode = 1


class Format(enum.Enum):
    """How import writes deletions and opaque directories."""

    #: keep the OCI markers (``.wh.NAME``, ``.wh..wh..opq``): unionfs and
    #: fuse-overlayfs read them
    OCI = "oci"
    #: the kernel's format (char 0/0, ``trusted.overlay.opaque=y``); needs root
    OVERLAY = "overlay"


def _text(path: bytes) -> str:
    """A name as tarfile takes it (decoded back to the same bytes on write)."""
    return path.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


# =========================================================================== export


class _Kind(enum.Enum):
    ENTRY = "entry"
    WHITEOUT = "whiteout"
    OPAQUE = "opaque"


@dataclass(frozen=True)
class _Item:
    """One archive entry: *path* in the archive, read from *source* in the upper."""

    path: tuple[bytes, ...]
    kind: _Kind
    source: tuple[bytes, ...]
    st: os.stat_result

    @property
    def key(self) -> tuple[bytes, ...]:
        # An opaque marker sorts right after its directory, before any entry in it.
        return (*self.path[:-1], b"") if self.kind is _Kind.OPAQUE else self.path


@dataclass(frozen=True)
class Exported:
    diff_id: str
    #: bytes of the uncompressed tar
    size: int
    entries: int
    #: entries a tar cannot hold (sockets), not exported
    skipped: tuple[bytes, ...]


def export_layer(stack: Stack, sink: BinaryIO, *, compress: bool = False,
                 progress: Progress | None = None) -> Exported:
    """Write the upper of *stack* as an OCI layer tar (gzipped when *compress*) to *sink*.

    The data of a metadata-only upper file (metacopy) is read from the layer below
    that holds it, as the mount reads it. *progress(done, total)* is called as file
    data is written (bytes of regular files). Raises OSError.
    """
    upper = stack.upper
    if upper is None:
        raise LayerError("no upper layer to export")
    items: list[_Item] = []
    skipped: list[tuple[bytes, ...]] = []
    _collect(upper.fd, (), items, skipped)
    items.sort(key=lambda item: item.key)
    total = _data_bytes(items)
    zipped = None
    if compress:
        # mtime=0 and no file name in the gzip header: the same tar gives the same bytes.
        zipped = gzip.GzipFile(filename="", mode="wb", compresslevel=6, fileobj=sink, mtime=0)
    digest = _DigestWriter(zipped if zipped is not None else sink)
    tar_out = cast(BinaryIO, digest)  # tarfile only calls write()
    with _DirCache(upper.fd) as dirs, tarfile.open(
            fileobj=tar_out, mode="w|", format=tarfile.PAX_FORMAT, encoding="utf-8",
            errors="surrogateescape") as tar:
        writer = _TarWriter(stack, tar, dirs, total, progress)
        for item in items:
            writer.add(item)
    if zipped is not None:
        zipped.close()
    sink.flush()
    return Exported("sha256:" + digest.sha.hexdigest(), digest.size, len(items),
                    tuple(b"/".join(path) for path in skipped))


def _collect(fd: int, components: tuple[bytes, ...], out: list[_Item],
             skipped: list[tuple[bytes, ...]]) -> None:
    """The archive items for the upper directory open at *fd* and everything below it."""
    with os.scandir(fd) as it:
        names = sorted(os.fsencode(entry.name) for entry in it)
    if whiteout.is_opaque_fd(fd):
        out.append(_Item((*components, whiteout.OPAQUE_MARKER), _Kind.OPAQUE, components,
                         os.fstat(fd)))
    deleted: dict[bytes, _Item] = {}
    for name in names:
        if name == whiteout.OPAQUE_MARKER:
            continue  # is_opaque_fd saw it
        st = lstat_at(fd, name)
        if st is None:
            continue
        path = (*components, name)
        target = whiteout.whited_out_name(name)
        if target is not None:  # an OCI whiteout already
            if target and not target.startswith(whiteout.WH_PREFIX):
                deleted.setdefault(target, _Item(path, _Kind.WHITEOUT, path, st))
            continue
        if whiteout.is_whiteout(st):
            marker = (*components, whiteout.oci_whiteout_name(name))
            deleted.setdefault(name, _Item(marker, _Kind.WHITEOUT, path, st))
        elif stat.S_ISSOCK(st.st_mode):
            skipped.append(path)
        else:
            out.append(_Item(path, _Kind.ENTRY, path, st))
            if stat.S_ISDIR(st.st_mode):
                child = open_dir_at(fd, name)
                try:
                    _collect(child, path, out, skipped)
                finally:
                    os.close(child)
    out.extend(deleted.values())


def _data_bytes(items: list[_Item]) -> int:
    seen: set[tuple[int, int]] = set()
    total = 0
    for item in items:
        st = item.st
        key = (st.st_dev, st.st_ino)
        if item.kind is _Kind.ENTRY and stat.S_ISREG(st.st_mode) and key not in seen:
            seen.add(key)
            total += st.st_size
    return total


class _Writable(Protocol):
    def write(self, data: bytes, /) -> int: ...

    def flush(self) -> None: ...


class _DigestWriter:
    """A write-only file that hashes what passes through it."""

    def __init__(self, out: _Writable) -> None:
        self.out = out
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        self.out.write(data)
        return len(data)

    def flush(self) -> None:
        self.out.flush()


class _DirCache:
    """Directory fds along the current path of a depth-first walk of one tree."""

    def __init__(self, root_fd: int) -> None:
        self.root_fd = root_fd
        self._open: list[tuple[bytes, int]] = []

    def fd(self, components: tuple[bytes, ...]) -> int:
        """The fd of directory *components* (valid until the next call)."""
        keep = 0
        while (keep < len(self._open) and keep < len(components)
               and self._open[keep][0] == components[keep]):
            keep += 1
        while len(self._open) > keep:
            os.close(self._open.pop()[1])
        for name in components[keep:]:
            parent = self._open[-1][1] if self._open else self.root_fd
            self._open.append((name, open_dir_at(parent, name)))
        return self._open[-1][1] if self._open else self.root_fd

    def close(self) -> None:
        while self._open:
            os.close(self._open.pop()[1])

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _PaxInfo(tarfile.TarInfo):
    """A TarInfo whose PAX records hold raw bytes, as GNU tar and Go write them.

    tarfile marks a header holding any non-UTF-8 value (a binary xattr such as a file
    capability, a non-UTF-8 name) ``hdrcharset=BINARY``, which GNU tar warns about;
    the values themselves are the same bytes either way.
    """

    @classmethod
    def _create_pax_generic_header(cls, pax_headers: dict[str, str], type: bytes,
                                   encoding: str) -> bytes:
        records = b""
        for keyword, value in pax_headers.items():
            record = b" " + keyword.encode("utf-8") + b"=" + _raw(value) + b"\n"
            size = len(record)
            while len(str(size).encode()) + len(record) != size:
                size = len(str(size).encode()) + len(record)
            records += str(size).encode() + record
        header = {"name": "././@PaxHeader", "type": type, "size": len(records),
                  "magic": tarfile.POSIX_MAGIC}
        # tarfile's own (private, untyped) helpers build the header block and padding.
        block = cls._create_header(  # type: ignore[attr-defined]
            header, tarfile.USTAR_FORMAT, "ascii", "replace")
        return bytes(block + cls._create_payload(records))  # type: ignore[attr-defined]


def _pax_time(ns: int) -> str:
    sign = "-" if ns < 0 else ""
    sec, frac = divmod(abs(ns), _NS)
    return f"{sign}{sec}.{frac:09d}"


class _TarWriter:
    def __init__(self, stack: Stack, tar: tarfile.TarFile, dirs: _DirCache, total: int,
                 progress: Progress | None) -> None:
        self.stack = stack
        self.tar = tar
        self.dirs = dirs
        self.total = total
        self.done = 0
        self.progress = progress
        #: (st_dev, st_ino) -> archive name of the first name of a hard-linked inode
        self.links: dict[tuple[int, int], str] = {}

    def _info(self, path: tuple[bytes, ...], st: os.stat_result, mode: int) -> tarfile.TarInfo:
        info = _PaxInfo(_text(b"/".join(path)))
        info.mode = mode
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        sec = st.st_mtime_ns // _NS
        if st.st_mtime_ns % _NS or sec < 0:
            info.pax_headers = {"mtime": _pax_time(st.st_mtime_ns)}
        info.mtime = max(sec, 0)
        return info

    def add(self, item: _Item) -> None:
        st = item.st
        if item.kind is _Kind.WHITEOUT:
            mode = 0o600 if whiteout.is_whiteout(st) else stat.S_IMODE(st.st_mode)
            self.tar.addfile(self._info(item.path, st, mode))
            return
        if item.kind is _Kind.OPAQUE:
            self.tar.addfile(self._info(item.path, st, stat.S_IMODE(st.st_mode) & 0o777))
            return
        info = self._info(item.path, st, stat.S_IMODE(st.st_mode))
        parent = self.dirs.fd(item.source[:-1])
        name = item.source[-1]
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = self.links.setdefault((st.st_dev, st.st_ino), info.name)
            if first != info.name:
                info.type = tarfile.LNKTYPE
                info.linkname = first
                self.tar.addfile(info)
                return
        xattrs = read_xattrs(parent, name, user_visible_xattr)
        if xattrs:
            info.pax_headers = {**info.pax_headers,
                                **{_SCHILY + key: _text(value) for key, value in xattrs.items()}}
        if stat.S_ISREG(st.st_mode):
            self._add_file(info, item.source, parent, st)
            return
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = _text(os.readlink(name, dir_fd=parent))
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.CHRTYPE if stat.S_ISCHR(st.st_mode) else tarfile.BLKTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self.tar.addfile(info)

    def _add_file(self, info: tarfile.TarInfo, components: tuple[bytes, ...],
                  parent: int, st: os.stat_result) -> None:
        name = components[-1]
        if whiteout.is_metacopy(parent, name):
            # Metadata only: the size is the upper file's, the data that of the file
            # below that holds it (through further metadata-only layers, or a redirect).
            fd = open_data(self.stack, components)
            info.size = st.st_size
        else:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
            info.size = os.fstat(fd).st_size
        with open(fd, "rb", buffering=0) as data:
            self.tar.addfile(info, _Counted(data, self._advance))

    def _advance(self, count: int) -> None:
        self.done += count
        if self.progress is not None:
            self.progress(self.done, self.total)


class _Counted:
    """A readable file that reports how much was read from it."""

    def __init__(self, f: BinaryIO, report: Callable[[int], None]) -> None:
        self.f = f
        self.report = report

    def read(self, size: int = -1) -> bytes:
        data = self.f.read(size)
        self.report(len(data))
        return data


# =========================================================================== import


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
            copyup.discard(root_fd, os.fsencode(name))
        if made:
            os.rmdir(dest)
    except OSError as exc:
        log.warning("could not remove what the failed import wrote in %s: %s", dest, exc)


def _components(name: str, what: str) -> tuple[bytes, ...]:
    """The path components of an archive name; refuses absolute paths and ``..``."""
    raw = _raw(name)
    if raw.startswith(b"/"):
        raise LayerError(f"refused: {what} {name!r} is an absolute path")
    parts = tuple(part for part in raw.split(b"/") if part and part != b".")
    if b".." in parts:
        raise LayerError(f"refused: {what} {name!r} contains '..'")
    return parts


def _shown(components: tuple[bytes, ...]) -> str:
    return repr(_text(b"/".join(components)) or ".")


def _pax_ns(text: str) -> int:
    """A PAX time (``[-]SECONDS[.FRACTION]``) in nanoseconds, exactly."""
    negative = text.startswith("-")
    whole, _, frac = text.lstrip("-").partition(".")
    if not whole.isdigit() or (frac and not frac.isdigit()):
        raise LayerError(f"refused: bad time {text!r} in the archive")
    ns = int(whole) * _NS + int((frac + "000000000")[:9])
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
        target = None
        if name != whiteout.OPAQUE_MARKER:
            if name.startswith(_AUFS_META):
                self.warnings.append(f"skipped aufs metadata {_shown(components)}")
                return False
            target = whiteout.whited_out_name(name)
            if target in (None, b"", b".", b".."):
                raise LayerError(f"refused: bad whiteout {_shown(components)}")
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
                os.symlink(_raw(member.linkname), name, dir_fd=parent)
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
            copyup.discard(parent, name)

    # ------------------------------------------------------------ metadata

    def _meta(self, member: tarfile.TarInfo) -> _Meta:
        pax = member.pax_headers
        mtime = _pax_ns(pax["mtime"]) if "mtime" in pax else int(member.mtime) * _NS
        atime = _pax_ns(pax["atime"]) if "atime" in pax else mtime
        xattrs: list[tuple[str, bytes]] = []
        for key, value in sorted(pax.items()):
            if key.startswith(_SCHILY):
                xattrs.append((key[len(_SCHILY):], _raw(value)))
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
            self._set_xattrs(at_path(parent, name), meta, _text(name))
        os.utime(name, ns=(meta.atime_ns, meta.mtime_ns), dir_fd=parent, follow_symlinks=False)

    def _overlay_marker(self, directory: tuple[bytes, ...], name: bytes | None) -> None:
        """An OCI marker in the kernel's format: an opaque xattr, or a char 0/0 whiteout
        (a directory of the same name in the archive is made opaque instead, since the
        marker deletes only what the layers below hold)."""
        parent = self._open_dir(directory, create=True)
        try:
            if name is None:
                whiteout.set_opaque(parent)
                return
            st = lstat_at(parent, name)
            if st is None:
                whiteout.make_whiteout(parent, name)
            elif stat.S_ISDIR(st.st_mode):
                fd = open_dir_at(parent, name)
                try:
                    whiteout.set_opaque(fd)
                finally:
                    os.close(fd)
        finally:
            os.close(parent)
