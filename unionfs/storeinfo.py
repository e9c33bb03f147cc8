"""What the layer store holds, what uses it, and removing what nothing uses.

- `usage`: bytes per layer, the images (recorded references) that use each, the bytes
  shared by several images, and per image what a squash would save (the bytes of its
  layers' files that its merged view hides: `inspect.inspect`'s "wasted").
- `collect` (``store gc``): removes the layers no recorded image uses and no mount has
  open. A record is dropped first when its reference no longer names the same image
  (the layout is gone, or the tag points elsewhere).

"In use by a mount" is read from the kernel, so it needs nothing from the daemon and
holds for fuse-overlayfs and kernel overlayfs too: a FUSE daemon keeps a directory fd
open on every layer it serves (``/proc/PID/fd``), and a kernel overlay mount names its
lowers in ``mountinfo`` (of every mount namespace). A layer that is still being
resolved is safe as well: resolving holds the store lock shared, and `collect` holds
it exclusive, so it runs between resolves, after the reference was recorded.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass

from unionfs import report
from unionfs.config import ConfigError
from unionfs.layers import open_stack
from unionfs.oci import Digest, ImageError, open_source, parse_reference
from unionfs.store import ImageRecord, Store, StoredLayer


@dataclass(frozen=True)
class LayerUsage:
    layer: StoredLayer
    #: regular files and their bytes (sizes, a hard-linked file once)
    files: int
    bytes: int
    #: what the layer takes on disk (allocated blocks of every inode once, as du counts)
    disk: int
    #: the recorded references that use it
    images: tuple[str, ...]
    in_use: bool


@dataclass(frozen=True)
class ImageUsage:
    record: ImageRecord
    #: disk bytes of its layers, and of those other images use too
    disk: int
    shared: int
    #: bytes of its layers' regular files that its merged view does not show
    squash_saves: int
    #: layers it lists that the store does not hold (gc'ed, or never unpacked)
    missing: tuple[Digest, ...]


@dataclass(frozen=True)
class Usage:
    layers: tuple[LayerUsage, ...]
    images: tuple[ImageUsage, ...]

    @property
    def disk(self) -> int:
        return sum(u.disk for u in self.layers)

    @property
    def shared(self) -> int:
        """Disk bytes of the layers more than one image uses (stored once)."""
        return sum(u.disk for u in self.layers if len(u.images) > 1)


def _measure(path: str) -> tuple[int, int, int]:
    """(regular files, their bytes, disk bytes) of the tree at *path*; never follows a
    symlink, and counts each inode once."""
    seen: set[tuple[int, int]] = set()
    files = size = disk = 0
    root = os.lstat(path)
    seen.add((root.st_dev, root.st_ino))
    disk += root.st_blocks * 512
    for _, dirs, names, dir_fd in os.fwalk(path, follow_symlinks=False):
        for name in dirs + names:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            key = (st.st_dev, st.st_ino)
            if key in seen:
                continue
            seen.add(key)
            disk += st.st_blocks * 512
            if stat.S_ISREG(st.st_mode):
                files += 1
                size += st.st_size
    return files, size, disk


def usage(store: Store, squash: bool = True) -> Usage:
    """How the store's bytes divide among its layers and images. *squash*: also work out
    what squashing each image would save (a walk of its merged view)."""
    layers = store.layers()
    records = store.records()
    busy = layers_in_use(store)
    users: dict[Digest, list[str]] = {}
    for record in records:
        for diff_id in dict.fromkeys(record.diff_ids):
            users.setdefault(diff_id, []).append(record.reference)
    per_layer = []
    for layer in layers:
        files, size, disk = _measure(layer.path)
        per_layer.append(LayerUsage(layer, files, size, disk,
                                    tuple(users.get(layer.diff_id, ())), layer.diff_id in busy))
    by_id = {u.layer.diff_id: u for u in per_layer}
    per_image = []
    for record in records:
        held = [by_id[d] for d in dict.fromkeys(record.diff_ids) if d in by_id]
        missing = tuple(d for d in dict.fromkeys(record.diff_ids) if d not in by_id)
        saves = 0
        if squash and held and not missing:
            saves = _hidden_bytes(store, record)
        per_image.append(ImageUsage(record, sum(u.disk for u in held),
                                    sum(u.disk for u in held if len(u.images) > 1),
                                    saves, missing))
    return Usage(tuple(per_layer), tuple(per_image))


def _hidden_bytes(store: Store, record: ImageRecord) -> int:
    lowers: list[str] = []
    for diff_id in reversed(record.diff_ids):
        path = store.layer_path(diff_id)
        if path not in lowers:
            lowers.append(path)
    with open_stack(lowers, None) as stack:
        result = report.inspect(stack)
    return sum(t.wasted for t in result.totals)


def layers_in_use(store: Store) -> set[Digest]:
    """The store's layers a process has open (a FUSE daemon's layer fds, a cwd or root
    inside one) or a mount names (kernel overlayfs lowerdir=), in any mount namespace."""
    pattern = re.compile(re.escape(os.fsencode(store.root)) +
                         rb"/layers/(sha256|sha512)/([0-9a-f]{64,128})")
    found: set[Digest] = set()

    def scan(text: bytes) -> None:
        for match in pattern.finditer(text):
            try:
                found.add(Digest.parse(f"{match[1].decode()}:{match[2].decode()}", "store"))
            except ImageError:
                pass

    namespaces: set[bytes] = set()
    for pid in os.listdir(b"/proc"):
        if not pid.isdigit():
            continue
        proc = b"/proc/" + pid
        try:
            for link in (b"cwd", b"root"):
                scan(os.readlink(proc + b"/" + link))
            for fd in os.listdir(proc + b"/fd"):
                scan(os.readlink(proc + b"/fd/" + fd))
            ns = os.readlink(proc + b"/ns/mnt")
            if ns not in namespaces:
                namespaces.add(ns)
                with open(proc + b"/mountinfo", "rb") as f:
                    scan(f.read())
        except OSError:
            continue  # gone, or not ours to look at
    return found


@dataclass(frozen=True)
class Collected:
    removed: tuple[StoredLayer, ...]
    freed: int
    #: unused by any record, but open in a mount: kept
    in_use: tuple[StoredLayer, ...]
    #: records dropped because their reference names another image now, or nothing
    forgotten: tuple[str, ...]
    temps: int


def collect(store: Store, dry_run: bool = False) -> Collected:
    """Remove the layers that no recorded image uses and nothing has open (with
    *dry_run*, only say which). Holds the store lock exclusively meanwhile."""
    with store.exclusive():
        forgotten = []
        keep: set[Digest] = set()
        for record in store.records():
            if _still_there(record):
                keep.update(record.diff_ids)
                continue
            forgotten.append(record.reference)
            if not dry_run:
                store.forget(record.reference)
        busy = layers_in_use(store)
        removed, in_use = [], []
        freed = 0
        for layer in store.layers():
            if layer.diff_id in keep:
                continue
            if layer.diff_id in busy:
                in_use.append(layer)
                continue
            removed.append(layer)
            freed += _measure(layer.path)[2]
            if not dry_run:
                store.remove_layer(layer.diff_id)
        temps = 0 if dry_run else store.clean_temps()
    return Collected(tuple(removed), freed, tuple(in_use), tuple(forgotten), temps)


def _still_there(record: ImageRecord) -> bool:
    """Whether the record's reference still names the image recorded. A reference that
    cannot be read right now (a corrupt index, say) keeps its record: gc removes only
    what it knows to be unused."""
    try:
        with open_source(parse_reference(record.reference)) as source:
            return str(source.image.config_digest) == record.config_digest
    except ConfigError:
        return False
    except (ImageError, OSError):
        return True
