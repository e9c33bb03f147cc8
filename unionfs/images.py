"""Images by reference: resolve one to layer directories, commit an upper as a new image,
squash an image into one layer.

- `resolve`: the image's layers unpacked into the store (`unionfs.store`), their
  directories top-most first: the lowers a mount stacks.
- `commit`: the upper exported as a gzip layer (`ociexport.export_layer`) on top of the
  image's layers, with a new config (diff_ids, a history entry) and manifest, written
  into an OCI layout and tagged there. Blobs go first, index.json last (by rename), so
  a reader of the layout sees the old tag or the new image, never half of it.
- `squash`: the merged view of an image's layers as one layer, holding nothing a higher
  layer hid.

A new image's layer is put into the store by unpacking the blob just written, through
the same checks as any other layer: the store never shares files with an upper that a
container goes on changing, and what a later mount sees is what the image holds.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, BinaryIO, Self, cast

from unionfs.config import ConfigError, Transport
from unionfs.layers import open_stack
from unionfs.oci import (
    CONFIG_OCI,
    INDEX_OCI,
    LAYER_GZIP,
    LAYER_TAR,
    LAYER_TYPES,
    LAYER_ZSTD,
    MANIFEST_OCI,
    REF_NAME,
    Descriptor,
    Digest,
    Image,
    ImageError,
    ImageSource,
    LayerRef,
    LayoutSource,
    Reference,
    blob_path,
    open_source,
    parse_reference,
)
from unionfs.ociexport import export_layer, export_merged
from unionfs.store import Bar, Store

_CHUNK = 1 << 20


def resolve(ref: str, store: str | Store | None = None) -> list[str]:
    """The layer directories of the image *ref* (``oci:DIR[:TAG]``,
    ``docker-archive:FILE[:REF]``), top-most first, unpacked into the store at *store*
    (default `store.default_path`) where missing; the reference is recorded there, so
    ``store gc`` keeps its layers.

    Raises ConfigError when *ref* names nothing usable and ImageError (one line naming
    the layer) for a corrupt or forged image.
    """
    st = store if isinstance(store, Store) else Store(store)
    with open_source(parse_reference(ref)) as source, st.shared():
        paths = ensure_layers(st, source)
        st.record(source.image)
    return paths


def ensure_layers(store: Store, source: ImageSource) -> list[str]:
    """Every layer of *source*'s image in *store*; their directories, top-most first.

    A layer listed twice is stacked once, at its top-most place: an identical layer
    below changes nothing the upper copy does not already decide (and a mount refuses
    one directory twice). The caller holds ``store.shared()``.
    """
    layers = source.image.layers
    if not layers:
        raise ConfigError(f"{source.image.reference}: the image has no layers")
    show = sys.stderr.isatty()
    paths = []
    for number, layer in enumerate(layers, 1):
        bar = Bar(f"{layer.diff_id.short} ({number}/{len(layers)})") if show else None
        paths.append(store.ensure_layer(source, layer, bar))
    return top_first(paths)


def top_first(base_first: Sequence[str]) -> list[str]:
    out: list[str] = []
    for path in reversed(base_first):
        if path not in out:
            out.append(path)
    return out


def layers_argument(paths: Sequence[str]) -> str:
    """*paths* as one LAYERS argument: joined by ``:``, with ``\\`` and ``:`` escaped."""
    return ":".join(p.replace("\\", "\\\\").replace(":", "\\:") for p in paths)


# --------------------------------------------------------------------------- layouts


class _BlobSink:
    """A new blob being written: hashed as it goes, renamed to blobs/sha256/HEX on a
    clean exit (removed on any other)."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        fd, self.tmp = tempfile.mkstemp(dir=layout.path, prefix=".unionmount-blob-")
        os.fchmod(fd, 0o644 & ~layout.umask)
        self.f = open(fd, "wb")  # noqa: SIM115 - closed in __exit__
        self.hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()

    @property
    def digest(self) -> Digest:
        return Digest("sha256", self.hash.hexdigest())

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        try:
            if kind is None:
                self.f.flush()
                os.fsync(self.f.fileno())
                self.f.close()
                os.rename(self.tmp, os.path.join(self.layout.path, blob_path(self.digest)))
        finally:
            self.f.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp)


class Layout:
    """An OCI image layout being written to (made when missing; its parent must exist).

    Blobs are written under temporary names in the layout and renamed into
    blobs/sha256/; the index is rewritten (under a lock on the layout directory, and by
    rename) only once everything it names is there.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self.umask = os.umask(0)
        os.umask(self.umask)
        try:
            os.mkdir(path, 0o755)
        except FileExistsError:
            layout_file = os.path.join(path, "oci-layout")
            if os.listdir(path) and not os.path.isfile(layout_file):
                raise ConfigError(f"{path}: not an OCI image layout (no oci-layout), "
                                  "and not empty") from None
        except OSError as exc:
            raise ConfigError(f"layout {path}: {exc.strerror}") from None
        os.makedirs(os.path.join(path, "blobs", "sha256"), 0o755, exist_ok=True)
        if not os.path.exists(os.path.join(path, "oci-layout")):
            self._write(b"oci-layout", json.dumps({"imageLayoutVersion": "1.0.0"}).encode())

    def has_blob(self, digest: Digest) -> bool:
        return os.path.isfile(os.path.join(self.path, blob_path(digest)))

    def new_blob(self) -> _BlobSink:
        return _BlobSink(self)

    def put(self, data: bytes, media_type: str) -> Descriptor:
        digest = Digest.of(data)
        if not self.has_blob(digest):
            with self.new_blob() as sink:
                sink.write(data)
        return Descriptor(media_type, digest, len(data))

    def copy_layer(self, source: ImageSource, layer: LayerRef) -> Descriptor:
        """The blob of *layer* in this layout (copied, checked against its digest)."""
        if layer.digest is not None and self.has_blob(layer.digest):
            size = os.path.getsize(os.path.join(self.path, blob_path(layer.digest)))
            return Descriptor(LAYER_TYPES.get(layer.media_type, layer.media_type),
                              layer.digest, size)
        check = layer.digest.hasher() if layer.digest is not None else None
        with source.open_blob(layer.location) as src, self.new_blob() as sink:
            head = src.read(4)
            data = head
            while data:
                sink.write(data)
                if check is not None:
                    check.update(data)
                data = src.read(_CHUNK)
            if layer.digest is not None and check is not None and (
                    check.hexdigest() != layer.digest.hex):
                raise ImageError(f"{source.image.reference}: layer {layer.diff_id}: the "
                                 f"blob does not match its digest {layer.digest}")
        media_type = LAYER_TYPES.get(layer.media_type, LAYER_TAR)
        if source.image.manifest_digest is None:  # a docker-archive: say what it holds
            media_type = (LAYER_GZIP if head.startswith(b"\x1f\x8b") else LAYER_ZSTD
                          if head.startswith(b"\x28\xb5\x2f\xfd") else LAYER_TAR)
        return Descriptor(media_type, sink.digest, sink.size)

    def tag(self, manifest: Descriptor, tag: str) -> None:
        """Point *tag* at *manifest* in index.json (an entry with that tag is replaced)."""
        fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            index = self._index()
            entries = [m for m in index.get("manifests") or []
                       if not (isinstance(m, dict) and (m.get("annotations") or {}).get(
                           REF_NAME) == tag)]
            entries.append(Descriptor(manifest.media_type, manifest.digest, manifest.size,
                                      ref_name=tag).json())
            index["manifests"] = entries
            self._write(b"index.json", json.dumps(index, indent=None).encode())
        finally:
            os.close(fd)

    def _index(self) -> dict[str, Any]:
        try:
            with open(os.path.join(self.path, "index.json"), "rb") as f:
                index = json.loads(f.read())
        except FileNotFoundError:
            return {"schemaVersion": 2, "mediaType": INDEX_OCI, "manifests": []}
        except ValueError as exc:
            raise ImageError(f"{self.path}/index.json: not JSON ({exc})") from None
        if not isinstance(index, dict):
            raise ImageError(f"{self.path}/index.json: not a JSON object")
        return index

    def _write(self, name: bytes, data: bytes) -> None:
        """Replace the file *name* in the layout by rename, synced first."""
        fd, tmp = tempfile.mkstemp(dir=self.path, prefix=".unionmount-")
        try:
            os.fchmod(fd, 0o644 & ~self.umask)
            with open(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.rename(tmp, os.path.join(os.fsencode(self.path), name))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


# --------------------------------------------------------------------------- new images


@dataclass(frozen=True)
class Written:
    """An image written into a layout by `commit` or `squash`."""

    reference: Reference
    manifest: Descriptor
    config_digest: Digest
    #: the new layer's diff_id and blob
    diff_id: Digest
    layer: Descriptor
    layers: int


def _created() -> str:
    """Now (or $SOURCE_DATE_EPOCH, for reproducible images), as RFC 3339 UTC."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH", "")
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.UTC) if epoch.isdigit()
            else datetime.datetime.now(datetime.UTC))
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _target(dest: str) -> Reference:
    ref = parse_reference(dest)
    if ref.transport is not Transport.OCI or ref.tag is None:
        raise ConfigError(f"{dest}: a new image is written as oci:DIR:TAG")
    return ref


def _write_image(layout: Layout, target: Reference, store: Store, config: dict[str, Any],
                 layers: list[Descriptor], diff_id: Digest) -> Written:
    """Write config and manifest, tag them, then put the new (top) layer into the store
    from the blob just written (and record the new image there)."""
    config_blob = json.dumps(config, separators=(",", ":")).encode()
    config_desc = layout.put(config_blob, CONFIG_OCI)
    manifest = {"schemaVersion": 2, "mediaType": MANIFEST_OCI,
                "config": config_desc.json(), "layers": [d.json() for d in layers]}
    manifest_desc = layout.put(json.dumps(manifest, separators=(",", ":")).encode(),
                               MANIFEST_OCI)
    assert target.tag is not None
    layout.tag(manifest_desc, target.tag)
    diff_ids = [Digest.parse(d, "config") for d in config["rootfs"]["diff_ids"]]
    image = Image(target, manifest_desc.digest, config_desc.digest, config_blob, tuple(
        LayerRef(d_id, desc.media_type, desc.digest, desc.size, blob_path(desc.digest))
        for d_id, desc in zip(diff_ids, layers, strict=True)))
    with LayoutSource(target, image) as written:
        ensure_layers(store, written)
        store.record(image)
    return Written(target, manifest_desc, config_desc.digest, diff_id, layers[-1], len(layers))


def commit(src: str, upper: str, dest: str, store: str | None = None,
           comment: str | None = None) -> Written:
    """The image *src* with the upper *upper* (a container's changes) on top, as a new
    image in the layout of *dest* (``oci:DIR:TAG``; may be *src*'s layout: blobs are
    shared). Raises ConfigError, ImageError, OSError."""
    target = _target(dest)
    if not os.path.isdir(upper):
        raise ConfigError(f"upper {upper}: not a directory")
    st = Store(store)
    with open_source(parse_reference(src)) as source, st.shared():
        lowers = ensure_layers(st, source)
        st.record(source.image)
        layout = Layout(target.path)
        layers = [layout.copy_layer(source, layer) for layer in source.image.layers]
        with open_stack(lowers, upper) as stack, layout.new_blob() as sink:
            exported = export_layer(stack, cast(BinaryIO, sink), compress=True,
                                    progress=_export_bar("committing"))
        layers.append(Descriptor(LAYER_GZIP, sink.digest, sink.size))
        diff_id = Digest.parse(exported.diff_id, "export")
        config = source.image.config_json()
        entry: dict[str, object] = {"created": _created(), "created_by": "unionmount commit"}
        if comment:
            entry["comment"] = comment
        _extend(config, diff_id, entry)
        return _write_image(layout, target, st, config, layers, diff_id)


def squash(src: str, dest: str, store: str | None = None) -> Written:
    """The image *src* as an image of one layer: its merged view, in which nothing a
    higher layer hid is left (`ociexport.export_merged`). Raises ConfigError, ImageError, OSError."""
    target = _target(dest)
    st = Store(store)
    with open_source(parse_reference(src)) as source, st.shared():
        lowers = ensure_layers(st, source)
        st.record(source.image)
        layout = Layout(target.path)
        with open_stack(lowers, None) as stack, layout.new_blob() as sink:
            exported = export_merged(stack, cast(BinaryIO, sink), compress=True,
                                     progress=_export_bar("squashing"))
        diff_id = Digest.parse(exported.diff_id, "export")
        config = source.image.config_json()
        for old in config.get("history") or []:
            if isinstance(old, dict):
                old["empty_layer"] = True
        config["rootfs"] = {"type": "layers", "diff_ids": []}
        entry: dict[str, object] = {"created": _created(),
                                    "created_by": f"unionmount squash of {len(lowers)} layers"}
        _extend(config, diff_id, entry)
        layer = Descriptor(LAYER_GZIP, sink.digest, sink.size)
        return _write_image(layout, target, st, config, [layer], diff_id)


def _extend(config: dict[str, Any], diff_id: Digest, entry: dict[str, object]) -> None:
    """Add a layer to a config: its diff_id, and the history entry that made it."""
    rootfs = config.setdefault("rootfs", {"type": "layers", "diff_ids": []})
    rootfs["diff_ids"] = [*(rootfs.get("diff_ids") or []), str(diff_id)]
    config["history"] = [*(config.get("history") or []), entry]
    config["created"] = entry["created"]


def _export_bar(verb: str) -> Bar | None:
    """A progress bar for writing a layer of 16 MiB or more, on a terminal."""
    return Bar("the new layer", verb) if sys.stderr.isatty() else None
