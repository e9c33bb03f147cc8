"""Image references, and reading images from OCI image layouts and docker-archive tars.

    oci:DIR[:TAG]            an OCI image layout (oci-layout, index.json, blobs/ALG/HEX);
                             TAG is an ``org.opencontainers.image.ref.name`` of index.json
    docker-archive:FILE[:REF]  the tar ``docker save`` and ``podman save`` write

The path ends at the first ``:`` (as skopeo splits it); ``\\:`` is a colon inside it.

Everything read here is untrusted: JSON blobs are read with a size limit and checked
against their digests before they are parsed, blobs are opened relative to the layout's
directory fd without following symlinks, and a docker-archive is read as a tar (member
names are looked up, never extracted). Layer data is not read here: `ImageSource.open_blob`
hands the stored bytes to the layer store, which checks them while it unpacks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import platform
import re
import tarfile
from dataclasses import dataclass
from typing import IO, Any, BinaryIO, Self, cast

from unionfs.config import ConfigError, LayerError, Transport

MANIFEST_OCI = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_DOCKER = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_OCI = "application/vnd.oci.image.index.v1+json"
INDEX_DOCKER = "application/vnd.docker.distribution.manifest.list.v2+json"
CONFIG_OCI = "application/vnd.oci.image.config.v1+json"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
LAYER_GZIP = LAYER_TAR + "+gzip"
LAYER_ZSTD = LAYER_TAR + "+zstd"
REF_NAME = "org.opencontainers.image.ref.name"

#: Layer media types, and the OCI type of the same bytes (Docker's are gzip tars).
LAYER_TYPES = {
    LAYER_TAR: LAYER_TAR, LAYER_GZIP: LAYER_GZIP, LAYER_ZSTD: LAYER_ZSTD,
    "application/vnd.oci.image.layer.nondistributable.v1.tar": LAYER_TAR,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip": LAYER_GZIP,
    "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd": LAYER_ZSTD,
    "application/vnd.docker.image.rootfs.diff.tar.gzip": LAYER_GZIP,
    "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip": LAYER_GZIP,
}
#: The largest manifest, index or config read (they are read whole, into memory).
JSON_LIMIT = 16 << 20
#: How deep indexes may nest (an index pointing to an index ...): a loop is refused.
_MAX_DEPTH = 8
_HEX = {"sha256": re.compile(r"[0-9a-f]{64}"), "sha512": re.compile(r"[0-9a-f]{128}")}
_TAG = re.compile(r"[A-Za-z0-9._/:@+-]{1,255}")


class ImageError(LayerError):
    """An image that cannot be used: missing or corrupt data. The message is one line."""

    exitcode = 1


@dataclass(frozen=True)
class Digest:
    """``ALGORITHM:HEX``, with the algorithms the OCI spec registers (sha256, sha512)."""

    algorithm: str
    hex: str

    @classmethod
    def parse(cls, text: object, what: str) -> Digest:
        """Raises ImageError for anything but a well-formed sha256 or sha512 digest."""
        alg, _, hexpart = str(text).partition(":")
        pattern = _HEX.get(alg)
        if not isinstance(text, str) or pattern is None or not pattern.fullmatch(hexpart):
            raise ImageError(f"{what}: bad digest {str(text)[:80]!r}")
        return cls(alg, hexpart)

    @classmethod
    def of(cls, data: bytes) -> Digest:
        return cls("sha256", hashlib.sha256(data).hexdigest())

    def hasher(self) -> Any:
        return hashlib.new(self.algorithm)

    @property
    def short(self) -> str:
        return f"{self.algorithm}:{self.hex[:12]}"

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"


@dataclass(frozen=True)
class Reference:
    """Where an image is: *path* is absolute, *tag* None when not given."""

    transport: Transport
    path: str
    tag: str | None

    def __str__(self) -> str:
        path = self.path.replace("\\", "\\\\").replace(":", "\\:")
        tail = "" if self.tag is None else f":{self.tag}"
        return f"{self.transport.value}:{path}{tail}"


def parse_reference(text: str) -> Reference:
    """Raises ConfigError for text that is not a well-formed reference."""
    for transport in Transport:
        if text.startswith(transport.value + ":"):
            break
    else:
        raise ConfigError(f"{text}: not an image reference (oci:DIR[:TAG] or "
                          "docker-archive:FILE[:REF])")
    rest = text[len(transport.value) + 1:]
    path: list[str] = []
    tag: str | None = None
    chars = iter(enumerate(rest))
    for at, char in chars:
        if char == "\\":
            path.append(next(chars, (at, "\\"))[1])
        elif char == ":":
            tag = rest[at + 1:]
            break
        else:
            path.append(char)
    if not path:
        raise ConfigError(f"{text}: no path in the image reference")
    if tag is not None and not _TAG.fullmatch(tag):
        raise ConfigError(f"{text}: bad tag {tag!r}")
    return Reference(transport, os.path.abspath("".join(path)), tag)


@dataclass(frozen=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int
    #: the ``org.opencontainers.image.ref.name`` annotation (a tag, in index.json)
    ref_name: str | None = None
    #: (os, architecture, variant) of an index entry
    platform: tuple[str, str, str] | None = None

    @classmethod
    def parse(cls, raw: object, what: str) -> Descriptor:
        if not isinstance(raw, dict):
            raise ImageError(f"{what}: not a descriptor")
        media_type, size = raw.get("mediaType", ""), raw.get("size")
        if not isinstance(media_type, str) or not isinstance(size, int) or size < 0:
            raise ImageError(f"{what}: a descriptor without a media type or size")
        annotations = raw.get("annotations") or {}
        ref_name = annotations.get(REF_NAME) if isinstance(annotations, dict) else None
        plat = raw.get("platform")
        triple = None
        if isinstance(plat, dict):
            triple = (str(plat.get("os", "")), str(plat.get("architecture", "")),
                      str(plat.get("variant", "")))
        return cls(media_type, Digest.parse(raw.get("digest"), what), size,
                   ref_name if isinstance(ref_name, str) else None, triple)

    def json(self) -> dict[str, object]:
        """The descriptor as a manifest or index holds it (ref_name as an annotation)."""
        out: dict[str, object] = {"mediaType": self.media_type, "digest": str(self.digest),
                                  "size": self.size}
        if self.ref_name is not None:
            out["annotations"] = {REF_NAME: self.ref_name}
        return out


@dataclass(frozen=True)
class LayerRef:
    """One layer of an image: its diff_id (the config's), and where its blob is."""

    diff_id: Digest
    media_type: str
    #: the blob's digest and size as the manifest gives them (None in a docker-archive,
    #: which names no digest; the diff_id is checked all the same)
    digest: Digest | None
    size: int | None
    #: the blob's path in the layout (``blobs/ALG/HEX``) or member name in the archive
    location: str


@dataclass(frozen=True)
class Image:
    reference: Reference
    #: the manifest's digest (None for a docker-archive, which holds no manifest blob)
    manifest_digest: Digest | None
    config_digest: Digest
    #: the config blob, as stored
    config: bytes
    #: the layers, base first, as the manifest lists them
    layers: tuple[LayerRef, ...]

    def config_json(self) -> dict[str, Any]:
        return cast(dict[str, Any], json.loads(self.config))


def this_platform() -> tuple[str, str]:
    """(os, architecture) in OCI's words, for picking a manifest from an index."""
    arch = {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "i686": "386"}
    return "linux", arch.get(platform.machine(), platform.machine())


# --------------------------------------------------------------------------- sources


class ImageSource:
    """An image opened for reading: `image`, and its blobs by location."""

    image: Image

    def open_blob(self, location: str) -> BinaryIO:
        raise NotImplementedError

    def blob_size(self, location: str) -> int | None:
        """The stored size of a blob, when the source knows it without reading it."""
        return None

    def close(self) -> None:
        pass

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_source(ref: Reference) -> ImageSource:
    """Open the image *ref* names. Raises ConfigError when the reference names nothing
    (no such layout, file or tag) and ImageError for a corrupt image."""
    if ref.transport is Transport.OCI:
        return LayoutSource(ref)
    return ArchiveSource(ref)


def _json(data: bytes, what: str) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ImageError(f"{what}: not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ImageError(f"{what}: not a JSON object")
    return value


def _read_limited(f: IO[bytes], what: str) -> bytes:
    data = f.read(JSON_LIMIT + 1)
    if len(data) > JSON_LIMIT:
        raise ImageError(f"{what}: larger than {JSON_LIMIT >> 20} MiB")
    return data


def _diff_ids(config: dict[str, Any], count: int, what: str) -> list[Digest]:
    rootfs = config.get("rootfs")
    ids = rootfs.get("diff_ids") if isinstance(rootfs, dict) else None
    if not isinstance(ids, list):
        raise ImageError(f"{what}: no rootfs.diff_ids")
    if len(ids) != count:
        raise ImageError(f"{what}: {len(ids)} diff_ids for {count} layers")
    return [Digest.parse(d, f"{what}: diff_id") for d in ids]


class LayoutSource(ImageSource):
    """An OCI image layout. The tag picks an entry of index.json; an entry that is an
    index (or a Docker manifest list) is followed to the manifest for this platform."""

    def __init__(self, ref: Reference, image: Image | None = None) -> None:
        """Read the image *ref* names, or take *image* as read (one just written)."""
        self.ref = ref
        try:
            self.fd = os.open(ref.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise ConfigError(f"{ref}: {exc.strerror}") from None
        try:
            self.image = image if image is not None else self._load()
        except BaseException:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def open_blob(self, location: str) -> BinaryIO:
        """Open ``blobs/ALG/HEX`` without following a symlink on the way."""
        fd = os.dup(self.fd)
        try:
            *dirs, name = location.split("/")
            for part in dirs:
                child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
                                | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd = child
            blob = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except OSError as exc:
            raise ImageError(f"{self.ref}: blob {location}: {exc.strerror}") from None
        finally:
            os.close(fd)
        return open(blob, "rb")

    def blob_size(self, location: str) -> int | None:
        with self.open_blob(location) as f:
            return os.fstat(f.fileno()).st_size

    def read_blob(self, desc: Descriptor, what: str) -> bytes:
        """A JSON blob, checked against *desc*'s digest and size."""
        with self.open_blob(blob_path(desc.digest)) as f:
            data = _read_limited(f, what)
        if len(data) != desc.size or Digest(desc.digest.algorithm, hashlib.new(
                desc.digest.algorithm, data).hexdigest()) != desc.digest:
            raise ImageError(f"{self.ref}: {what} {desc.digest}: the blob does not match its "
                             "digest or size")
        return data

    def _index(self) -> dict[str, Any]:
        try:
            with open(os.open("index.json", os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC,
                              dir_fd=self.fd), "rb") as f:
                data = _read_limited(f, f"{self.ref}: index.json")
        except OSError as exc:
            if exc.errno in (errno.ENOENT, errno.ENOTDIR):
                raise ConfigError(f"{self.ref}: not an OCI image layout (no index.json)"
                                  ) from None
            raise
        return _json(data, f"{self.ref}: index.json")

    def _load(self) -> Image:
        index = self._index()
        entries = [Descriptor.parse(d, f"{self.ref}: index.json")
                   for d in index.get("manifests") or []]
        tag = self.ref.tag
        if tag is None:
            if len(entries) != 1:
                tags = sorted({d.ref_name for d in entries if d.ref_name})
                raise ConfigError(f"{self.ref}: holds {len(entries)} images, name one as "
                                  f"oci:DIR:TAG (tags: {', '.join(tags) or 'none'})")
            chosen = entries[0]
        else:
            named = [d for d in entries if d.ref_name == tag]
            if not named:
                raise ConfigError(f"{self.ref}: no image tagged {tag!r} in the layout")
            chosen = named[0]
        manifest_desc, manifest = self._manifest(chosen, 0)
        what = f"{self.ref}: manifest {manifest_desc.digest.short}"
        config_desc = Descriptor.parse(manifest.get("config"), what + ": config")
        config = self.read_blob(config_desc, "config")
        blobs = [Descriptor.parse(d, what + ": layer") for d in manifest.get("layers") or []]
        diff_ids = _diff_ids(_json(config, f"{self.ref}: config"), len(blobs),
                             f"{self.ref}: config")
        for blob in blobs:
            if blob.media_type not in LAYER_TYPES:
                raise ImageError(f"{what}: layer {blob.digest.short} has the media type "
                                 f"{blob.media_type!r}, not a layer tar")
        layers = tuple(LayerRef(diff_id, blob.media_type, blob.digest, blob.size,
                                blob_path(blob.digest))
                       for diff_id, blob in zip(diff_ids, blobs, strict=True))
        return Image(self.ref, manifest_desc.digest, config_desc.digest, config, layers)

    def _manifest(self, desc: Descriptor, depth: int) -> tuple[Descriptor, dict[str, Any]]:
        if depth > _MAX_DEPTH:
            raise ImageError(f"{self.ref}: indexes nest deeper than {_MAX_DEPTH}")
        data = _json(self.read_blob(desc, "manifest"), f"{self.ref}: {desc.digest.short}")
        media_type = desc.media_type or str(data.get("mediaType", ""))
        if media_type in (MANIFEST_OCI, MANIFEST_DOCKER):
            return desc, data
        if media_type not in (INDEX_OCI, INDEX_DOCKER):
            raise ImageError(f"{self.ref}: {desc.digest.short} has the media type "
                             f"{media_type!r}, not a manifest or an index")
        entries = [Descriptor.parse(d, f"{self.ref}: index {desc.digest.short}")
                   for d in data.get("manifests") or []]
        return self._manifest(pick_platform(entries, f"{self.ref}: index"), depth + 1)


def pick_platform(entries: list[Descriptor], what: str) -> Descriptor:
    """The entry of an index for this machine (linux/ARCH; of several variants, the
    first), or the only entry when it names no platform."""
    want = this_platform()
    fits = [d for d in entries if d.platform is not None and d.platform[:2] == want]
    if fits:
        return fits[0]
    if len(entries) == 1 and entries[0].platform is None:
        return entries[0]
    offered = sorted({"/".join(p for p in d.platform if p) for d in entries if d.platform})
    raise ImageError(f"{what}: no image for {'/'.join(want)} (offered: "
                     f"{', '.join(offered) or 'none'})")


def blob_path(digest: Digest) -> str:
    return f"blobs/{digest.algorithm}/{digest.hex}"


class ArchiveSource(ImageSource):
    """A docker-archive: manifest.json lists, per image, its config and layer members.

    The archive may be compressed as a whole (gzip, as ``docker save | gzip``); each
    layer member may be compressed too. Layers named ``blobs/sha256/HEX`` (Docker 25's
    OCI-style archives) have their blob digest checked as well as their diff_id.
    """

    def __init__(self, ref: Reference) -> None:
        self.ref = ref
        try:
            self.tar = tarfile.open(ref.path, "r:*")  # noqa: SIM115 - closed in close()
        except OSError as exc:
            raise ConfigError(f"{ref}: {exc.strerror or exc}") from None
        except tarfile.TarError as exc:
            raise ImageError(f"{ref}: not a readable tar: {exc}") from None
        try:
            self.image = self._load()
        except BaseException:
            self.tar.close()
            raise

    def close(self) -> None:
        self.tar.close()

    def open_blob(self, location: str) -> BinaryIO:
        try:
            member = self.tar.getmember(location)
            f = self.tar.extractfile(member)
        except (KeyError, tarfile.TarError):
            f = None
        if f is None:
            raise ImageError(f"{self.ref}: no file {location!r} in the archive")
        return cast(BinaryIO, f)

    def blob_size(self, location: str) -> int | None:
        with contextlib.suppress(KeyError):
            return self.tar.getmember(location).size
        return None

    def _load(self) -> Image:
        with self.open_blob("manifest.json") as f:
            try:
                entries = json.loads(_read_limited(f, f"{self.ref}: manifest.json"))
            except (ValueError, UnicodeDecodeError) as exc:
                raise ImageError(f"{self.ref}: manifest.json: not JSON ({exc})") from None
        if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
            raise ImageError(f"{self.ref}: manifest.json: not a list of images")
        entry = self._choose(entries)
        config_name, members = entry.get("Config"), entry.get("Layers")
        if not isinstance(config_name, str) or not isinstance(members, list) or not all(
                isinstance(m, str) for m in members):
            raise ImageError(f"{self.ref}: manifest.json: an image without Config or Layers")
        with self.open_blob(config_name) as f:
            config = _read_limited(f, f"{self.ref}: {config_name}")
        config_digest = Digest.of(config)
        named = _named_digest(config_name)
        if named is not None and named != config_digest:
            raise ImageError(f"{self.ref}: config {config_name}: does not match its digest")
        diff_ids = _diff_ids(_json(config, f"{self.ref}: config"), len(members),
                             f"{self.ref}: config")
        layers = tuple(LayerRef(diff_id, LAYER_TAR, _named_digest(member), None, member)
                       for diff_id, member in zip(diff_ids, members, strict=True))
        return Image(self.ref, None, config_digest, config, layers)

    def _choose(self, entries: list[dict[str, Any]]) -> dict[str, Any]:
        tag = self.ref.tag
        if tag is None:
            if len(entries) != 1:
                raise ConfigError(f"{self.ref}: holds {len(entries)} images, name one as "
                                  "docker-archive:FILE:REF")
            return entries[0]
        wanted = {tag, tag + ":latest"}
        for entry in entries:
            tags = entry.get("RepoTags") or []
            if isinstance(tags, list) and wanted & set(map(str, tags)):
                return entry
        raise ConfigError(f"{self.ref}: no image tagged {tag!r} in the archive")


def _named_digest(member: str) -> Digest | None:
    """The digest a member's name states: ``blobs/ALG/HEX`` or ``HEX.json``."""
    parts = member.split("/")
    if len(parts) == 3 and parts[0] == "blobs" and parts[1] in _HEX:
        return Digest.parse(f"{parts[1]}:{parts[2]}", member)
    stem, dot, ext = member.rpartition(".")
    if dot and ext == "json" and _HEX["sha256"].fullmatch(stem):
        return Digest("sha256", stem)
    return None

