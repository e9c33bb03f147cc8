"""A union's upper as an OCI layer tar (``unionmount export``).

`export_layer` writes the upper as an OCI image layer (a PAX tar):

- a whiteout (either kind, by `whiteout.read_layer_dir`) becomes the OCI whiteout
  marker, an empty regular file; an opaque directory (`whiteout.is_opaque_fd`) becomes
  the directory's entry followed by the OCI opaque marker inside it;
- the names of one inode become one file and hard links to it;
- xattrs (file capabilities included) become ``SCHILY.xattr.*`` PAX records, except
  the union's own bookkeeping (`whiteout.is_internal_xattr`);
- owners are numeric (no user or group names), mtimes keep their nanoseconds (a PAX
  ``mtime`` record), and entries come in a fixed order (depth first, names sorted
  bytewise, an opaque marker right after its directory): the same upper gives the
  same bytes. The layer's diff_id is the sha256 of the uncompressed tar.
"""

from __future__ import annotations

import enum
import gzip
import hashlib
import os
import stat
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO, Protocol, Self, cast

from unionfs import whiteout
from unionfs.config import LayerError
from unionfs.layers import Stack, lstat_at, open_dir_at
from unionfs.merged import open_data, read_xattrs, user_visible_xattr, walk
from unionfs.ociimport import NS, SCHILY_XATTR, raw_name, tar_name

Progress = Callable[[int, int], None]


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
    with _DirCache(upper.fd) as dirs, _Output(sink, compress) as out:
        writer = _TarWriter(stack, out.tar, _data_bytes(items), progress)
        for item in items:
            if item.kind is _Kind.ENTRY:
                writer.entry(item.path, item.st, dirs.fd(item.source[:-1]), item.source[-1])
            else:
                writer.marker(item.path, item.st, opaque=item.kind is _Kind.OPAQUE)
    return out.result(len(items), skipped)


def export_merged(stack: Stack, sink: BinaryIO, *, compress: bool = False,
                  progress: Progress | None = None) -> Exported:
    """Write the merged view of *stack* as one OCI layer (``unionmount squash``): every
    entry the view shows, nothing a higher layer hides, no markers; data of
    metadata-only files from below them. The same order and rules as `export_layer`."""
    total = sum(entry.found.st.st_size for entry in walk(stack)
                if stat.S_ISREG(entry.found.st.st_mode))
    skipped: list[tuple[bytes, ...]] = []
    entries = 0
    with _Output(sink, compress) as out:
        writer = _TarWriter(stack, out.tar, total, progress)
        for entry in walk(stack):
            st = entry.found.st
            if stat.S_ISSOCK(st.st_mode):
                skipped.append(entry.components)
                continue
            writer.entry(entry.components, st, entry.parent.fd_of(entry.found.layer),
                         entry.name)
            entries += 1
    return out.result(entries, skipped)


class _Output:
    """The tar stream of an export: gzipped or not, hashed as it is written (the
    uncompressed tar's sha256 is the layer's diff_id)."""

    def __init__(self, sink: BinaryIO, compress: bool) -> None:
        self.sink = sink
        self.zipped = None
        if compress:
            # mtime=0 and no file name in the gzip header: the same tar, the same bytes.
            self.zipped = gzip.GzipFile(filename="", mode="wb", compresslevel=6,
                                        fileobj=sink, mtime=0)
        self.digest = _DigestWriter(self.zipped if self.zipped is not None else sink)
        self.tar = tarfile.open(  # noqa: SIM115 - closed by __exit__
            fileobj=cast(BinaryIO, self.digest), mode="w|", format=tarfile.PAX_FORMAT,
            encoding="utf-8", errors="surrogateescape")

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.tar.close()
        if self.zipped is not None:
            self.zipped.close()
        self.sink.flush()

    def result(self, entries: int, skipped: list[tuple[bytes, ...]]) -> Exported:
        return Exported("sha256:" + self.digest.sha.hexdigest(), self.digest.size, entries,
                        tuple(b"/".join(path) for path in skipped))


def _collect(fd: int, components: tuple[bytes, ...], out: list[_Item],
             skipped: list[tuple[bytes, ...]]) -> None:
    """The archive items for the upper directory open at *fd* and everything below it."""
    if whiteout.is_opaque_fd(fd):
        out.append(_Item((*components, whiteout.OCI_OPAQUE_NAME), _Kind.OPAQUE, components,
                         os.fstat(fd)))
    held = whiteout.read_layer_dir(fd)
    for name in sorted(held.entries):
        st = lstat_at(fd, name)
        if st is None:
            continue
        path = (*components, name)
        if stat.S_ISSOCK(st.st_mode):
            skipped.append(path)
            continue
        out.append(_Item(path, _Kind.ENTRY, path, st))
        if stat.S_ISDIR(st.st_mode):
            child = open_dir_at(fd, name)
            try:
                _collect(child, path, out, skipped)
            finally:
                os.close(child)
    for name in sorted(held.hidden):
        # The marker's own metadata: an OCI marker already in the upper, else the
        # kernel-format whiteout's.
        marker = whiteout.oci_whiteout_name(name)
        source = marker if whiteout.has_oci_whiteout(fd, name) else name
        st = lstat_at(fd, source)
        if st is not None:
            out.append(_Item((*components, marker), _Kind.WHITEOUT, (*components, source), st))


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
            record = b" " + keyword.encode("utf-8") + b"=" + raw_name(value) + b"\n"
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
    sec, frac = divmod(abs(ns), NS)
    return f"{sign}{sec}.{frac:09d}"


class _TarWriter:
    def __init__(self, stack: Stack, tar: tarfile.TarFile, total: int,
                 progress: Progress | None) -> None:
        self.stack = stack
        self.tar = tar
        self.total = total
        self.done = 0
        self.progress = progress
        #: (st_dev, st_ino) -> archive name of the first name of a hard-linked inode
        self.links: dict[tuple[int, int], str] = {}

    def _info(self, path: tuple[bytes, ...], st: os.stat_result, mode: int) -> tarfile.TarInfo:
        info = _PaxInfo(tar_name(b"/".join(path)))
        info.mode = mode
        info.uid, info.gid = st.st_uid, st.st_gid
        info.uname = info.gname = ""
        sec = st.st_mtime_ns // NS
        if st.st_mtime_ns % NS or sec < 0:
            info.pax_headers = {"mtime": _pax_time(st.st_mtime_ns)}
        info.mtime = max(sec, 0)
        return info

    def marker(self, path: tuple[bytes, ...], st: os.stat_result, opaque: bool) -> None:
        """An OCI whiteout or opaque marker at *path*, with the metadata *st* of what it
        stands for (a kernel-format whiteout, an OCI marker file, the opaque directory)."""
        if opaque:
            mode = stat.S_IMODE(st.st_mode) & 0o777
        else:
            mode = 0o600 if whiteout.is_whiteout(st) else stat.S_IMODE(st.st_mode)
        self.tar.addfile(self._info(path, st, mode))

    def entry(self, path: tuple[bytes, ...], st: os.stat_result, parent: int,
              name: bytes) -> None:
        """The entry *name* of the directory open at *parent* (its stat *st*), archived
        as *path*, which is also its path in the merged view of the stack."""
        info = self._info(path, st, stat.S_IMODE(st.st_mode))
        if not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1:
            first = self.links.setdefault((st.st_dev, st.st_ino), info.name)
            if first != info.name:
                info.type = tarfile.LNKTYPE
                info.linkname = first
                self.tar.addfile(info)
                return
        xattrs = read_xattrs(parent, name, user_visible_xattr)
        if xattrs:
            info.pax_headers = {**info.pax_headers, **{
                SCHILY_XATTR + key: tar_name(value) for key, value in xattrs.items()}}
        if stat.S_ISREG(st.st_mode):
            self._add_file(info, path, parent, name, st)
            return
        if stat.S_ISDIR(st.st_mode):
            info.type = tarfile.DIRTYPE
        elif stat.S_ISLNK(st.st_mode):
            info.type = tarfile.SYMTYPE
            info.linkname = tar_name(os.readlink(name, dir_fd=parent))
        elif stat.S_ISFIFO(st.st_mode):
            info.type = tarfile.FIFOTYPE
        else:
            info.type = tarfile.BLKTYPE if stat.S_ISBLK(st.st_mode) else tarfile.CHRTYPE
            info.devmajor, info.devminor = os.major(st.st_rdev), os.minor(st.st_rdev)
        self.tar.addfile(info)

    def _add_file(self, info: tarfile.TarInfo, components: tuple[bytes, ...],
                  parent: int, name: bytes, st: os.stat_result) -> None:
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
