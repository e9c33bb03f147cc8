"""The layer store: each image layer unpacked once, into a directory named by its diff_id.

    STORE/store.lock                  shared while layers are added and images recorded,
                                      exclusive while `gc` removes
    STORE/layers/ALG/HEX/diff/        the layer (OCI markers kept: unionfs reads them)
    STORE/layers/ALG/HEX/layer.json   its diff_id, blob digest, entry count
    STORE/locks/ALG-HEX.lock          held while that layer is unpacked
    STORE/images/SHA.json             a reference that uses layers, and which
    STORE/tmp/                        layers being unpacked (each directory locked by its
                                      maker; an unlocked one was left by a crash)
    STORE/tmp.lock                    shared while a temporary directory is made and
                                      locked, exclusive while the sweep looks for left ones

A layer directory exists only when it is complete and verified: the blob is unpacked with
`ociimport.import_layer` into a directory in STORE/tmp while the blob's digest (against
the manifest) and the uncompressed stream's digest (against the config's diff_id) are
computed in the same pass; only when both match is the file system synced and the
directory renamed into place. A crash leaves at most a temporary directory, which
nothing mounts and the next unpack or `gc` removes. Two processes that need one layer
serialize on its lock file: the second finds it done.

The store is private (mode 0700, ours or root's): the layers inside keep the modes their
tars give, a world-writable /tmp included, and nobody else may reach them.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import gzip
import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO, cast

from unionfs.config import ConfigError, LayerError
from unionfs.oci import Digest, Image, ImageError, ImageSource, LayerRef
from unionfs.ociimport import Format, import_layer

if sys.version_info >= (3, 14):
    from compression import zstd
else:  # the backport of 3.14's compression.zstd (pyproject: python_version < '3.14')
    from backports import zstd

_CHUNK = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
#: Blobs at least this large get a progress bar (when stderr is a terminal).
PROGRESS_MIN_BYTES = 16 << 20
_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def default_path() -> str:
    """/var/lib/unionfs/store for root; $XDG_DATA_HOME/unionfs/store for a user."""
    if os.geteuid() == 0:
        return "/var/lib/unionfs/store"
    data = os.environ.get("XDG_DATA_HOME") or os.path.expanduser("~/.local/share")
    return os.path.join(data, "unionfs", "store")


@dataclass(frozen=True)
class StoredLayer:
    diff_id: Digest
    #: the layer's root, the directory a mount stacks
    path: str
    blob: str | None
    entries: int


@dataclass(frozen=True)
class ImageRecord:
    """A reference resolved through the store, and the layers (base first) it used."""

    reference: str
    config_digest: str
    diff_ids: tuple[Digest, ...]
    recorded: float


Progress = Callable[[int, int | None], None]


class Store:
    """One store directory. Methods that add layers or records expect the caller to hold
    `shared()`; `gc` holds `exclusive()`."""

    def __init__(self, path: str | None = None) -> None:
        path = path or default_path()
        try:
            os.makedirs(path, 0o700, exist_ok=True)
            st = os.stat(path)
        except OSError as exc:
            raise ConfigError(f"store {path}: {exc.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"store {path}: not a directory")
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise ConfigError(f"store {path}: must belong to us (or root) and not be "
                              "writable by others")
        self.root = os.path.realpath(path)
        self.unpacked: list[Digest] = []
        for sub in ("layers", "locks", "images", "tmp"):
            os.makedirs(os.path.join(self.root, sub), 0o700, exist_ok=True)

    # ------------------------------------------------------------ locks

    @contextlib.contextmanager
    def _flock(self, path: str, mode: int, waiting: str | None = None,
               block: bool = True) -> Iterator[bool]:
        """Hold the lock file *path* in *mode*; yields whether it is held (always, unless
        *block* is false and someone else holds it)."""
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not block:
                    yield False
                    return
                if waiting and sys.stderr.isatty():
                    print(f"unionmount: waiting for {waiting}", file=sys.stderr)
                fcntl.flock(fd, mode)
            yield True
        finally:
            os.close(fd)

    def shared(self) -> contextlib.AbstractContextManager[bool]:
        """While held, no layer is removed (`gc` waits)."""
        return self._flock(os.path.join(self.root, "store.lock"), fcntl.LOCK_SH,
                           "a store gc to finish")

    def exclusive(self) -> contextlib.AbstractContextManager[bool]:
        return self._flock(os.path.join(self.root, "store.lock"), fcntl.LOCK_EX,
                           "the store's other users to finish")

    # ------------------------------------------------------------ layers

    def layer_home(self, diff_id: Digest) -> str:
        return os.path.join(self.root, "layers", diff_id.algorithm, diff_id.hex)

    def layer_path(self, diff_id: Digest) -> str:
        """The directory to stack for the layer *diff_id* (it may not exist yet)."""
        return os.path.join(self.layer_home(diff_id), "diff")

    def has_layer(self, diff_id: Digest) -> bool:
        try:
            return stat.S_ISDIR(os.lstat(self.layer_path(diff_id)).st_mode)
        except FileNotFoundError:
            return False

    def ensure_layer(self, source: ImageSource, layer: LayerRef,
                     progress: Progress | None = None) -> str:
        """The layer's directory, unpacked from *source* unless the store holds it.

        Raises ImageError naming the layer when its blob does not match the manifest's
        digest or the config's diff_id, or is not a readable (compressed) layer tar.
        """
        if self.has_layer(layer.diff_id):
            return self.layer_path(layer.diff_id)
        lock = os.path.join(self.root, "locks", f"{layer.diff_id.algorithm}-"
                            f"{layer.diff_id.hex}.lock")
        with self._flock(lock, fcntl.LOCK_EX, f"another unpack of {layer.diff_id.short}"):
            if self.has_layer(layer.diff_id):
                return self.layer_path(layer.diff_id)
            self.clean_temps()
            with self._temp(f"unpack-{layer.diff_id.hex[:16]}-") as tmp:
                what = f"{source.image.reference}: layer {layer.diff_id}"
                meta = _unpack(source, layer, os.path.join(tmp, "diff"), what, progress)
                _write_json(os.path.join(tmp, "layer.json"), meta)
                _syncfs(tmp)
                home = self.layer_home(layer.diff_id)
                os.makedirs(os.path.dirname(home), 0o700, exist_ok=True)
                os.rename(tmp, home)
                _fsync_dir(os.path.dirname(home))
        self.unpacked.append(layer.diff_id)
        return self.layer_path(layer.diff_id)

    @contextlib.contextmanager
    def _temp(self, prefix: str) -> Iterator[str]:
        """A new directory in STORE/tmp, locked while in use and removed afterwards
        (unless renamed away)."""
        # Made and locked under the shared sweep lock: the sweep never sees the
        # directory between its creation and its lock (it would take it for left over).
        with self._flock(self._sweep_lock, fcntl.LOCK_SH):
            tmp = tempfile.mkdtemp(prefix=prefix, dir=os.path.join(self.root, "tmp"))
            fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield tmp
        finally:
            with contextlib.suppress(FileNotFoundError):
                remove_tree(tmp)
            os.close(fd)

    def temp_dir(self) -> contextlib.AbstractContextManager[str]:
        """A private scratch directory on the store's file system (for squash)."""
        return self._temp("work-")

    def clean_temps(self) -> int:
        """Remove what crashed processes left in STORE/tmp: the directories nobody holds
        locked. Returns how many."""
        with self._flock(self._sweep_lock, fcntl.LOCK_EX, block=False) as held:
            # Not held: a directory is being made right now; sweep another time.
            return self._sweep() if held else 0

    @property
    def _sweep_lock(self) -> str:
        return os.path.join(self.root, "tmp.lock")

    def _sweep(self) -> int:
        tmp_dir = os.path.join(self.root, "tmp")
        removed = 0
        for name in os.listdir(tmp_dir):
            path = os.path.join(tmp_dir, name)
            try:
                fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError:
                with contextlib.suppress(OSError):
                    os.unlink(path)
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue  # in use
                # Renamed into place meanwhile? Then this name is someone else's now.
                st, now = os.fstat(fd), os.lstat(path)
                if (st.st_dev, st.st_ino) == (now.st_dev, now.st_ino):
                    remove_tree(path)
                    removed += 1
            except FileNotFoundError:
                pass
            finally:
                os.close(fd)
        return removed

    def layers(self) -> list[StoredLayer]:
        out = []
        for alg in sorted(os.listdir(os.path.join(self.root, "layers"))):
            for hexpart in sorted(os.listdir(os.path.join(self.root, "layers", alg))):
                try:
                    diff_id = Digest.parse(f"{alg}:{hexpart}", "store")
                except ImageError:
                    continue
                meta = _read_json(os.path.join(self.layer_home(diff_id), "layer.json"))
                out.append(StoredLayer(diff_id, self.layer_path(diff_id),
                                       meta.get("blob"), int(meta.get("entries", 0))))
        return out

    def remove_layer(self, diff_id: Digest) -> None:
        """Make the layer vanish at once (a rename into tmp), then delete it."""
        with self._temp("gc-") as tmp:
            os.rename(self.layer_home(diff_id), os.path.join(tmp, "layer"))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(self.root, "locks",
                                   f"{diff_id.algorithm}-{diff_id.hex}.lock"))

    # ------------------------------------------------------------ records

    def _record_path(self, reference: str) -> str:
        name = hashlib.sha256(reference.encode()).hexdigest()
        return os.path.join(self.root, "images", name + ".json")

    def record(self, image: Image) -> None:
        """Remember that the reference uses these layers (gc keeps them)."""
        _write_json(self._record_path(str(image.reference)), {
            "reference": str(image.reference), "config": str(image.config_digest),
            "diff_ids": [str(layer.diff_id) for layer in image.layers],
            "recorded": time.time()})

    def forget(self, reference: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._record_path(reference))

    def records(self) -> list[ImageRecord]:
        out = []
        images = os.path.join(self.root, "images")
        for name in sorted(os.listdir(images)):
            if name.startswith(".") or not name.endswith(".json"):
                continue
            raw = _read_json(os.path.join(images, name))
            try:
                diff_ids = tuple(Digest.parse(d, name) for d in raw.get("diff_ids", []))
                out.append(ImageRecord(str(raw["reference"]), str(raw.get("config", "")),
                                       diff_ids, float(raw.get("recorded", 0))))
            except (KeyError, ValueError, ImageError):
                continue  # unreadable: it protects nothing
        return sorted(out, key=lambda r: r.reference)


# --------------------------------------------------------------------------- unpacking


class _Hashed:
    """A readable stream that hashes and counts what passes through it, and can show
    its first bytes before they are read (to recognise the compression)."""

    def __init__(self, f: Any, hasher: Any, report: Callable[[int], None] | None = None
                 ) -> None:
        self.f = f
        self.hash = hasher
        self.size = 0
        self.pending = b""
        self.report = report

    def _pull(self, n: int) -> bytes:
        data = bytes(self.f.read(n))
        self.hash.update(data)
        self.size += len(data)
        if self.report is not None and data:
            self.report(self.size)
        return data

    def peek(self, n: int) -> bytes:
        while len(self.pending) < n and (chunk := self._pull(n - len(self.pending))):
            self.pending += chunk
        return self.pending[:n]

    def read(self, n: int = -1) -> bytes:
        if self.pending:
            if n < 0 or n >= len(self.pending):
                out, self.pending = self.pending, b""
            else:
                out, self.pending = self.pending[:n], self.pending[n:]
            return out
        if n < 0:
            return b"".join(iter(lambda: self._pull(_CHUNK), b""))
        return self._pull(n)

    def readable(self) -> bool:
        return True

    def drain(self) -> None:
        while self.read(_CHUNK):
            pass

    def digest(self) -> Digest:
        return Digest(self.hash.name, self.hash.hexdigest())


class _Decompressed:
    """The uncompressed stream of a blob; corrupt data becomes one ImageError line."""

    def __init__(self, blob: _Hashed) -> None:
        head = blob.peek(4)
        self.kind = "tar"
        self.f: Any = blob
        if head.startswith(_GZIP_MAGIC):
            self.kind, self.f = "gzip", gzip.GzipFile(fileobj=cast(BinaryIO, blob), mode="rb")
        elif head.startswith(_ZSTD_MAGIC):
            self.kind, self.f = "zstd", zstd.ZstdFile(cast(BinaryIO, blob), mode="rb")

    def read(self, n: int = -1) -> bytes:
        try:
            return bytes(self.f.read(n))
        except (EOFError, zlib.error, gzip.BadGzipFile, zstd.ZstdError) as exc:
            raise ImageError(f"corrupt {self.kind} data ({exc or 'truncated'})") from None

    def readable(self) -> bool:
        return True


def _unpack(source: ImageSource, layer: LayerRef, dest: str, what: str,
            progress: Progress | None) -> dict[str, object]:
    """Unpack *layer* into *dest*, checking both digests in the same pass."""
    total = layer.size if layer.size is not None else source.blob_size(layer.location)
    report = (lambda done: progress(done, total)) if progress is not None else None
    blob_alg = layer.digest.algorithm if layer.digest is not None else "sha256"
    with source.open_blob(layer.location) as raw:
        blob = _Hashed(raw, hashlib.new(blob_alg), report)
        try:
            plain = _Decompressed(blob)
            tar = _Hashed(plain, hashlib.new(layer.diff_id.algorithm))
            imported = import_layer(cast(BinaryIO, tar), dest, Format.OCI)
            tar.drain()  # the tar's end padding belongs to the diff_id too
            blob.drain()
        except LayerError as exc:
            raise ImageError(f"{what}: {exc}") from None
    if layer.digest is not None and blob.digest() != layer.digest:
        raise ImageError(f"{what}: the blob's digest is {blob.digest()}, the manifest says "
                         f"{layer.digest}")
    if layer.size is not None and blob.size != layer.size:
        raise ImageError(f"{what}: the blob has {blob.size} bytes, the manifest says "
                         f"{layer.size}")
    if tar.digest() != layer.diff_id:
        raise ImageError(f"{what}: the uncompressed layer's digest is {tar.digest()}, "
                         "not the config's diff_id")
    if progress is not None:
        progress(blob.size, blob.size)
    return {"diff_id": str(layer.diff_id), "blob": str(blob.digest()),
            "compression": plain.kind, "entries": imported.entries,
            "source": str(source.image.reference), "unpacked": time.time()}


class Bar:
    """A one-line progress bar on stderr for large blobs (call it as a `Progress`)."""

    WIDTH = 30

    def __init__(self, label: str, verb: str = "unpacking") -> None:
        self.label = label
        self.verb = verb
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int | None) -> None:
        if total is None or total < PROGRESS_MIN_BYTES:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        fill = self.WIDTH * min(done, total) // total
        sys.stderr.write(f"\r{self.verb} {self.label} [{'#' * fill}{'.' * (self.WIDTH - fill)}] "
                         f"{100 * done // total:3d}% {done >> 20}/{total >> 20} MiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# --------------------------------------------------------------------------- files


def _write_json(path: str, value: object) -> None:
    """Write *value* to *path* atomically (a temporary file in the same directory)."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
    try:
        with open(fd, "w") as f:
            json.dump(value, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            value = json.loads(f.read())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _syncfs(path: str) -> None:
    """Everything written on *path*'s file system reaches the disk (before the rename that
    makes a layer visible: after a power loss it is whole or absent)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if _libc.syncfs(fd) != 0:
            os.sync()
    finally:
        os.close(fd)


def remove_tree(path: str) -> None:
    """shutil.rmtree (which never follows a symlink), also through the read-only
    directories a layer may hold (mode 0555 /proc, say) when we are not root."""

    def retry(func: Callable[..., Any], failed: str, info: Any) -> None:
        exc = info[1]
        if isinstance(exc, FileNotFoundError):
            return
        if not isinstance(exc, PermissionError):
            raise exc
        if func in (os.unlink, os.rmdir):
            os.chmod(os.path.dirname(failed), 0o700)
            func(failed)
        else:  # could not open or list the directory itself
            os.chmod(failed, 0o700, follow_symlinks=False)
            shutil.rmtree(failed, onerror=retry)

    shutil.rmtree(path, onerror=retry)
