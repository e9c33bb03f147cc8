"""Images by reference and the layer store, on hand-made OCI layouts and real mounts.

- references: ``oci:DIR[:TAG]`` / ``docker-archive:FILE[:REF]`` parsing, ``\\:``;
- resolve: plain, gzip and zstd layers, nested indexes and platform choice, layers top
  first; the resolved layers mounted with ``python -m unionfs LAYERS MNT`` against kernel
  overlayfs on the same tars (imported in the kernel's format);
- the store: dedup measured with du, modes, progress on a terminal, hostile and corrupt
  blobs (each refused with one line naming the layer, nothing left behind), kill -9
  during an unpack, two resolves at once, gc (records, mounts in use, leftovers);
- commit and squash: the new image mounted shows exactly the container's (or the
  original's) view.

The image commands run as ``python -m unionfs commit|squash|store ...``.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pty
import random
import signal
import stat
import subprocess
import sys
import tarfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.mounts import (
    Mount,
    diff_trees,
    kill_all,
    mount_kernel,
    ok,
    snapshot,
    tool,
    unionmount,
    wait_until,
)
from unionfs.config import ConfigError, Transport, is_reference
from unionfs.oci import parse_reference, this_platform

if sys.version_info >= (3, 14):
    from compression import zstd
else:
    from backports import zstd

pytestmark = pytest.mark.usefixtures("mount_guard")

MTIME = 1_600_000_000
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA = {"tar": "application/vnd.oci.image.layer.v1.tar",
         "gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
         "zstd": "application/vnd.oci.image.layer.v1.tar+zstd"}

# --------------------------------------------------------------------------- building images

Member = tuple[tarfile.TarInfo, bytes | None]


def _info(path: str, kind: bytes, mode: int, uid: int = 0, gid: int = 0) -> tarfile.TarInfo:
    info = tarfile.TarInfo(path)
    info.type, info.mode, info.uid, info.gid, info.mtime = kind, mode, uid, gid, MTIME
    info.uname = info.gname = ""
    return info


def F(path: str, data: bytes | str = b"", mode: int = 0o644, uid: int = 0) -> Member:
    raw = data.encode() if isinstance(data, str) else data
    info = _info(path, tarfile.REGTYPE, mode, uid, uid)
    info.size = len(raw)
    return info, raw


def D(path: str, mode: int = 0o755) -> Member:
    return _info(path, tarfile.DIRTYPE, mode), None


def S(path: str, target: str) -> Member:
    info = _info(path, tarfile.SYMTYPE, 0o777)
    info.linkname = target
    return info, None


def H(path: str, target: str) -> Member:
    info = _info(path, tarfile.LNKTYPE, 0o644)
    info.linkname = target
    return info, None


def tar_of(*members: Member) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def compress(data: bytes, kind: str) -> bytes:
    if kind == "gzip":
        return gzip.compress(data, mtime=0)
    if kind == "zstd":
        return zstd.compress(data)
    return data


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put_blob(root: Path, data: bytes) -> dict[str, object]:
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / sha(data)[7:]).write_bytes(data)
    return {"digest": sha(data), "size": len(data)}


def write_image(root: Path, tag: str | None, tars: Sequence[bytes],
                kinds: Sequence[str] | None = None, *, blobs: Sequence[bytes] | None = None,
                diff_ids: Sequence[str] | None = None, wrap: str | None = None,
                arches: Sequence[str] = ("s390x", this_platform()[1])) -> str:
    """An image in the OCI layout *root* (added to its index.json under *tag*); returns
    its reference. *blobs* stand for the stored layers (default: *tars* compressed as
    *kinds*), *diff_ids* for the config's; *wrap* puts the manifest in a nested index
    ("oci") or a Docker manifest list ("docker") offering it for each of *arches*."""
    kinds = list(kinds or ["tar"] * len(tars))
    blob_data = list(blobs) if blobs is not None else [
        compress(t, k) for t, k in zip(tars, kinds, strict=True)]
    layers = [{"mediaType": MEDIA[k], **put_blob(root, b)}
              for k, b in zip(kinds, blob_data, strict=True)]
    config = {"architecture": this_platform()[1], "os": "linux",
              "config": {"Cmd": ["/bin/sh"]}, "created": "2020-09-13T12:26:40Z",
              "rootfs": {"type": "layers",
                         "diff_ids": list(diff_ids or [sha(t) for t in tars])},
              "history": [{"created_by": f"layer {i}"} for i in range(len(tars))]}
    config_blob = json.dumps(config).encode()
    manifest = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                      **put_blob(root, config_blob)},
                           "layers": layers}).encode()
    entry: dict[str, object] = {"mediaType": OCI_MANIFEST, **put_blob(root, manifest)}
    if wrap is not None:
        offers = [{**entry, "platform": {"os": "linux", "architecture": arch}}
                  for arch in arches]
        kind = OCI_INDEX if wrap == "oci" else \
            "application/vnd.docker.distribution.manifest.list.v2+json"
        index_blob = json.dumps({"schemaVersion": 2, "mediaType": kind,
                                 "manifests": offers}).encode()
        entry = {"mediaType": kind, **put_blob(root, index_blob)}
    if tag is not None:
        entry["annotations"] = {"org.opencontainers.image.ref.name": tag}
    index_path = root / "index.json"
    index = json.loads(index_path.read_text()) if index_path.exists() else {
        "schemaVersion": 2, "manifests": []}
    index["manifests"].append(entry)
    index_path.write_text(json.dumps(index))
    (root / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    return f"oci:{root}" + (f":{tag}" if tag else "")


# A base, a layer that deletes, hides (opaque) and overrides, and a top one.
BASE = tar_of(D("bin"), F("bin/tool", "#!/bin/sh\n", 0o755), D("a"), F("a/keep", "keep"),
              F("a/del", b"d" * 100), F("a/hl1", "hard"), H("a/hl2", "a/hl1"),
              S("a/link", "keep"), D("opq"), F("opq/x", b"x" * 200), D("mod"),
              F("mod/f", "v1"), D("tmp", 0o1777), F("owned", "o", 0o640, uid=1000))
MIDDLE = tar_of(D("a"), F("a/.wh.del"), D("opq"), F("opq/.wh..wh..opq"), F("opq/new", "new"),
                D("mid"), F("mid/m", "m"))
TOP = tar_of(D("mod"), F("mod/f", "v2", 0o600), D("top"), F("top/t", "t"))
HIDDEN_BYTES = 100 + 200 + 2  # a/del, opq/x and the first mod/f


def three(root: Path, tag: str = "three", kinds: Sequence[str] = ("tar", "gzip", "zstd")
          ) -> str:
    return write_image(root, tag, [BASE, MIDDLE, TOP], kinds)


# --------------------------------------------------------------------------- running


def img(*args: object, stdin: int | None = subprocess.DEVNULL, **env: str
        ) -> subprocess.CompletedProcess[bytes]:
    argv = [sys.executable, "-m", "unionfs", *map(os.fspath, map(str, args))]
    return subprocess.run(argv, stdin=stdin, capture_output=True, timeout=300, check=False,
                          env={**os.environ, **env})


def resolve(ref: str, store: Path, *extra: str) -> str:
    """The LAYERS argument for *ref* (``\\:``-escaped)."""
    return ok(img("store", "resolve", ref, "--store", store, *extra)).decode().strip()


def split_layers(text: str) -> list[str]:
    out, cur, chars = [], "", iter(text)
    for c in chars:
        if c == "\\":
            cur += next(chars)
        elif c == ":":
            out.append(cur)
            cur = ""
        else:
            cur += c
    return [*out, cur]


def one_line(r: subprocess.CompletedProcess[bytes], code: int, *needles: str) -> str:
    line = r.stderr.decode()
    assert r.returncode == code, f"exit {r.returncode}: {line}"
    assert line.count("\n") == 1 and line.startswith("unionmount: "), line
    for needle in needles:
        assert needle in line, f"{needle!r} not in {line!r}"
    return line


class Mounts:
    """Mounts made by a test, unmounted at its end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.made: list[Mount] = []

    def union(self, layers: str, name: str, *extra: object) -> Mount:
        mnt, log = self.tmp / name, self.tmp / f"{name}.log"
        mnt.mkdir()
        m = Mount("unionfs", mnt, [], None, None, log)
        self.made.append(m)
        r = unionmount(layers, *extra, "--log", log, mnt)
        assert r.returncode == 0, f"unionmount {layers}: {r.stderr}"
        return m

    def kernel(self, lowers: list[Path], name: str) -> Mount:
        m = mount_kernel(lowers, None, None, self.tmp / name)
        self.made.append(m)
        return m


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[Mounts]:
    made = Mounts(tmp_path)
    yield made
    for m in made.made:
        m.unmount()
    for m in made.made:
        m.assert_log_clean()


def store_layers(store: Path) -> list[str]:
    root = store / "layers" / "sha256"
    return sorted(os.listdir(root)) if root.exists() else []


def leftovers(store: Path) -> list[str]:
    return sorted(os.listdir(store / "tmp"))


# --------------------------------------------------------------------------- references


def test_references_parse() -> None:
    ref = parse_reference("oci:/img/app:1.0")
    assert (ref.transport, ref.path, ref.tag) == (Transport.OCI, "/img/app", "1.0")
    assert parse_reference("oci:rel").path == os.path.abspath("rel")
    assert parse_reference("oci:rel").tag is None
    colon = parse_reference("oci:/a\\:b:t:x")
    assert (colon.path, colon.tag) == ("/a:b", "t:x")
    assert str(colon) == "oci:/a\\:b:t:x"
    archive = parse_reference("docker-archive:/x.tar:localhost/app:1")
    assert (archive.transport, archive.tag) == (Transport.DOCKER_ARCHIVE, "localhost/app:1")
    assert is_reference("oci:/x") and not is_reference("/img/oci:x")
    for bad in ("oci:", "oci::t", "oci:/x:", "oci:/x:a b", "docker:/x", "/x"):
        with pytest.raises(ConfigError):
            parse_reference(bad)


# --------------------------------------------------------------------------- resolve


def test_resolve_mounts_like_the_kernel(tmp_path: Path, mounts: Mounts) -> None:
    """Plain, gzip and zstd layers, top first; the mount of the resolved layers shows the
    tree kernel overlayfs shows for the same tars (imported in the kernel's format). The
    store's path holds a ':' (escaped in LAYERS)."""
    ref = three(tmp_path / "layout")
    store = tmp_path / "st:ore"
    layers = resolve(ref, store)
    paths = split_layers(layers)
    assert paths == [str(store / "layers/sha256" / sha(t)[7:] / "diff")
                     for t in (TOP, MIDDLE, BASE)]
    assert "\\:" in layers
    kernel_layers = []
    for n, data in enumerate((TOP, MIDDLE, BASE)):
        dest = tmp_path / f"k{n}"
        ok(tool("import", "-", dest, "--format", "overlay", stdin=data))
        kernel_layers.append(dest)
    ours = mounts.union(layers, "mnt")
    ref_mount = mounts.kernel(kernel_layers, "kmnt")
    a, b = snapshot(ours.mnt, times=True), snapshot(ref_mount.mnt, times=True)
    assert not diff_trees(a, b), diff_trees(a, b)
    assert {"a/keep", "a/hl1", "a/hl2", "opq/new", "mod/f", "top/t"} <= a.names()
    assert not {"a/del", "opq/x"} & a.names()
    assert (ours.mnt / "mod/f").read_text() == "v2"


def test_the_whole_stream_counts_in_the_diff_id(tmp_path: Path) -> None:
    """Bytes after the tar's end (zero padding past tarfile's read-ahead) are part of
    the layer's digest: the stream is read to its end before the digests are checked."""
    padded = tar_of(F("f", "x")) + bytes(64 << 10)
    ref = write_image(tmp_path / "l", "t", [padded], ["gzip"])
    assert resolve(ref, tmp_path / "s").endswith(sha(padded)[7:] + "/diff")


@pytest.mark.parametrize("wrap", ["oci", "docker"])
def test_index_picks_this_platform(tmp_path: Path, wrap: str) -> None:
    ref = write_image(tmp_path / "l", "t", [BASE], ["gzip"], wrap=wrap)
    assert split_layers(resolve(ref, tmp_path / "s")) == [
        str(tmp_path / "s/layers/sha256" / sha(BASE)[7:] / "diff")]


def test_index_without_this_platform_is_refused(tmp_path: Path) -> None:
    ref = write_image(tmp_path / "l", "t", [BASE], wrap="oci", arches=["s390x", "riscv64"])
    r = img("store", "resolve", ref, "--store", tmp_path / "s")
    one_line(r, 1, f"no image for linux/{this_platform()[1]}", "linux/riscv64, linux/s390x")


def test_references_that_name_nothing(tmp_path: Path) -> None:
    three(tmp_path / "l")
    write_image(tmp_path / "l", "other", [TOP])
    s = tmp_path / "s"
    one_line(img("store", "resolve", f"oci:{tmp_path}/l:nope", "--store", s), 2,
             "no image tagged 'nope'")
    one_line(img("store", "resolve", f"oci:{tmp_path}/l", "--store", s), 2,
             "holds 2 images", "other, three")
    one_line(img("store", "resolve", f"oci:{tmp_path}/none:x", "--store", s), 2,
             "No such file")
    one_line(img("store", "resolve", f"docker-archive:{tmp_path}/none.tar", "--store", s), 2)
    assert store_layers(s) == []


def test_docker_archive(tmp_path: Path, mounts: Mounts) -> None:
    """The legacy ``docker save`` layout (ID/layer.tar, a config named by its digest),
    the whole archive gzipped, a gzipped layer member: same layers as the OCI image."""
    config = json.dumps({"architecture": this_platform()[1], "os": "linux",
                         "rootfs": {"type": "layers",
                                    "diff_ids": [sha(t) for t in (BASE, MIDDLE, TOP)]}}
                        ).encode()
    members = {f"{sha(config)[7:]}.json": config, "l0/layer.tar": BASE,
               "l1/layer.tar": gzip.compress(MIDDLE, mtime=0), "l2/layer.tar": TOP}
    members["manifest.json"] = json.dumps([{
        "Config": f"{sha(config)[7:]}.json", "RepoTags": ["localhost/app:1"],
        "Layers": ["l0/layer.tar", "l1/layer.tar", "l2/layer.tar"]}]).encode()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "app.tar.gz").write_bytes(gzip.compress(buf.getvalue()))
    store = tmp_path / "s"
    ours = resolve(f"docker-archive:{tmp_path}/app.tar.gz:localhost/app:1", store)
    assert ours == resolve(f"docker-archive:{tmp_path}/app.tar.gz", store)
    assert ours == resolve(three(tmp_path / "l"), store)
    assert len(store_layers(store)) == 3
    one_line(img("store", "resolve", f"docker-archive:{tmp_path}/app.tar.gz:other",
                 "--store", store), 2, "no image tagged 'other'")


# --------------------------------------------------------------------------- the store


def du_bytes(path: Path) -> int:
    out = subprocess.run(["du", "-s", "--block-size=1", path], capture_output=True,
                         text=True, timeout=60, check=True).stdout
    return int(out.split()[0])


def test_two_images_share_their_base(tmp_path: Path) -> None:
    """Two images with one base (stored as gzip in one, zstd in the other: same diff_id)
    keep one copy of it: du of the store is the base plus the two small layers."""
    big = random.Random(12).randbytes(4 << 20)
    base = tar_of(D("data"), F("data/blob", big))
    a = write_image(tmp_path / "la", "a", [base, tar_of(F("a", "a"))], ["gzip", "tar"])
    b = write_image(tmp_path / "lb", "b", [base, tar_of(F("b", "b"))], ["zstd", "gzip"])
    store = tmp_path / "s"
    resolve(a, store)
    one_base = du_bytes(store / "layers")
    resolve(b, store)
    both = du_bytes(store / "layers")
    assert len(store_layers(store)) == 3
    assert len(big) < one_base < both < one_base + (256 << 10), (one_base, both)
    use = json.loads(ok(img("store", "du", "--json", "--store", store)))
    shared = [u for u in use["layers"] if len(u["images"]) == 2]
    assert [u["diff_id"] for u in shared] == [sha(base)]
    assert use["shared"] == shared[0]["disk"] >= len(big)


def test_store_is_private(tmp_path: Path) -> None:
    store = tmp_path / "s"
    resolve(three(tmp_path / "l"), store)
    for d, dirs, files in os.walk(store):
        if "/diff" in d:
            continue  # the image's own files keep the modes the image gives them
        for name in dirs:
            if name != "diff":
                assert stat.S_IMODE(os.lstat(Path(d) / name).st_mode) == 0o700, (d, name)
        for name in files:
            assert stat.S_IMODE(os.lstat(Path(d) / name).st_mode) & 0o077 == 0, (d, name)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700
    open_store = tmp_path / "open"
    open_store.mkdir(mode=0o777)
    os.chmod(open_store, 0o777)
    one_line(img("store", "ls", "--store", open_store), 2, "not be writable by others")


def test_progress_on_a_terminal(tmp_path: Path) -> None:
    ref = write_image(tmp_path / "l", "big", [tar_of(F("big", random.Random(3).randbytes(
        17 << 20)))])
    primary, secondary = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "unionfs", "store", "resolve",
                                 ref, "--store", tmp_path / "s"], stderr=secondary,
                                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL)
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 4096)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=120) == 0, seen
    finally:
        os.close(primary)
    assert b"unpacking sha256:" in seen and b"100% 17/17 MiB" in seen, seen
    quiet = img("store", "resolve", write_image(tmp_path / "l", "big2", [tar_of(F(
        "big", random.Random(4).randbytes(17 << 20)))]), "--store", tmp_path / "s")
    assert quiet.returncode == 0 and quiet.stderr == b""


# --------------------------------------------------------------------------- hostile blobs


def _refused(tmp_path: Path, ref: str, *needles: str) -> None:
    store = tmp_path / "s"
    one_line(img("store", "resolve", ref, "--store", store), 1, *needles)
    assert store_layers(store) == [] and leftovers(store) == []
    assert json.loads(ok(img("store", "ls", "--json", "--store", store)))["images"] == []


def test_blob_that_does_not_match_its_digest(tmp_path: Path) -> None:
    layer = tar_of(F("f", "good"))
    ref = write_image(tmp_path / "l", "t", [layer], ["gzip"])
    blob = tmp_path / "l/blobs/sha256" / sha(gzip.compress(layer, mtime=0))[7:]
    blob.write_bytes(gzip.compress(tar_of(F("f", "evil")), mtime=0))
    _refused(tmp_path, ref, f"layer {sha(layer)}", "the blob's digest is", "manifest says")


def test_layer_that_does_not_match_its_diff_id(tmp_path: Path) -> None:
    layer = tar_of(F("f", "good"))
    ref = write_image(tmp_path / "l", "t", [layer], ["zstd"], diff_ids=[sha(b"other")])
    _refused(tmp_path, ref, f"layer {sha(b'other')}", "not the config's diff_id")


@pytest.mark.parametrize("kind", ["gzip", "zstd"])
def test_truncated_blob(tmp_path: Path, kind: str) -> None:
    """Truncated, with a manifest that states the truncated blob's digest (so only the
    decompression can tell)."""
    layer = tar_of(F("f", random.Random(5).randbytes(300_000)))
    cut = compress(layer, kind)[:-5000]
    ref = write_image(tmp_path / "l", "t", [layer], [kind], blobs=[cut])
    _refused(tmp_path, ref, f"layer {sha(layer)}", f"corrupt {kind} data")


def test_layer_that_escapes(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    for n, evil in enumerate([tar_of(F("../escaped", "x")),
                              tar_of(S("link", str(outside)), F("link/file", "x"))]):
        ref = write_image(tmp_path / f"l{n}", "t", [evil], ["gzip"])
        _refused(tmp_path, ref, f"layer {sha(evil)}", "refused:")
    assert list(outside.iterdir()) == [] and not (tmp_path / "escaped").exists()


def test_blob_that_is_a_symlink(tmp_path: Path) -> None:
    layer = tar_of(F("f", "x"))
    ref = write_image(tmp_path / "l", "t", [layer])
    blob = tmp_path / "l/blobs/sha256" / sha(layer)[7:]
    blob.rename(tmp_path / "elsewhere")
    blob.symlink_to(tmp_path / "elsewhere")
    _refused(tmp_path, ref, "Too many levels of symbolic links")


# --------------------------------------------------------------------------- crashes, races


def many_files(count: int, seed: int) -> bytes:
    rnd = random.Random(seed)
    members = [D(f"d{i}") for i in range(count // 100)]
    members += [F(f"d{i // 100}/f{i}", rnd.randbytes(8)) for i in range(count)]
    return tar_of(*members)


def test_kill_during_unpack(tmp_path: Path, mounts: Mounts) -> None:
    """kill -9 while a layer is unpacked: no layer directory, only a leftover temporary;
    the next resolve unpacks it whole (and removes the leftover), and it mounts."""
    layer = many_files(15_000, 1)
    ref = write_image(tmp_path / "l", "t", [layer], ["gzip"])
    store = tmp_path / "s"
    proc = subprocess.Popen([sys.executable, "-m", "unionfs", "store", "resolve", ref,
                             "--store", store], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def unpacking() -> bool:
        tmp = store / "tmp"
        return tmp.exists() and any(len(list((tmp / t / "diff").glob("d*/*"))) > 500
                                    for t in os.listdir(tmp) if (tmp / t / "diff").exists())

    assert wait_until(unpacking, 60, 0.01), proc.stderr.read() if proc.stderr else ""
    kill_all([proc.pid])
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert store_layers(store) == []
    assert len(leftovers(store)) == 1
    layers = resolve(ref, store)
    assert leftovers(store) == []
    m = mounts.union(layers, "mnt")
    assert sum(len(files) for _, _, files in os.walk(m.mnt)) == 15_000


def test_two_resolves_at_once_unpack_a_shared_layer_once(tmp_path: Path,
                                                         mounts: Mounts) -> None:
    base = many_files(8_000, 2)
    a = write_image(tmp_path / "la", "a", [base, tar_of(F("a", "a"))], ["gzip", "tar"])
    b = write_image(tmp_path / "lb", "b", [base, tar_of(F("b", "b"))], ["tar", "tar"])
    store = tmp_path / "s"
    procs = [subprocess.Popen([sys.executable, "-m", "unionfs", "store", "resolve",
                               ref, "--store", store, "-v"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for ref in (a, b)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    said = b"".join(err for _, err in outs).decode()
    assert said.count(f"unpacked {sha(base)}") == 1, said
    assert said.count("unpacked ") == 3, said
    tops = [split_layers(out.decode().strip()) for out, _ in outs]
    assert tops[0][1] == tops[1][1]
    assert sum(len(files) for _, _, files in os.walk(tops[0][1])) == 8_000
    for n, (out, _) in enumerate(outs):
        m = mounts.union(out.decode().strip(), f"m{n}")
        assert sum(len(files) for _, _, files in os.walk(m.mnt)) == 8_001


def test_gc(tmp_path: Path, mounts: Mounts) -> None:
    """gc forgets references that name nothing now, removes the layers no record uses,
    keeps one a mount has open until it is unmounted, and removes leftovers."""
    base = tar_of(F("base", "b"))
    a = write_image(tmp_path / "la", "a", [base, tar_of(F("a", "a"))])
    b = write_image(tmp_path / "lb", "b", [base, tar_of(F("b", "b"))])
    store = tmp_path / "s"
    layers_a = resolve(a, store)
    resolve(b, store)
    (tmp_path / "lb/index.json").write_text('{"schemaVersion": 2, "manifests": []}')
    (store / "tmp" / "unpack-crashed").mkdir()
    out = ok(img("store", "gc", "--dry-run", "--store", store)).decode()
    assert f"would forget {b}" in out and "would remove 1 layers" in out, out
    assert len(store_layers(store)) == 3
    out = ok(img("store", "gc", "--store", store)).decode()
    assert f"removed {sha(tar_of(F('b', 'b')))}" in out, out
    assert "1 leftover temporary directories removed" in out, out
    assert store_layers(store) == sorted(sha(t)[7:] for t in (base, tar_of(F("a", "a"))))
    m = mounts.union(layers_a, "mnt")
    for p in (tmp_path / "la").rglob("*"):
        if p.is_file():
            p.unlink()
    out = ok(img("store", "gc", "--store", store)).decode()
    assert out.count("a mount has it open") == 2 and len(store_layers(store)) == 2, out
    assert (m.mnt / "base").read_text() == "b"
    m.unmount()
    out = ok(img("store", "gc", "--store", store)).decode()
    assert "removed 2 layers" in out and store_layers(store) == [], out


# --------------------------------------------------------------------------- commit, squash


def change_things(mnt: Path) -> None:
    (mnt / "new").write_text("new file")
    (mnt / "a/keep").write_text("changed")
    (mnt / "a/link").unlink()
    os.link(mnt / "a/keep", mnt / "a/keep2")
    for p in (mnt / "opq").iterdir():
        p.unlink()
    (mnt / "opq").rmdir()
    (mnt / "opq").mkdir()
    (mnt / "opq/again").write_text("again")
    os.chmod(mnt / "bin/tool", 0o700)
    os.setxattr(mnt / "mod/f", "user.note", b"x")
    os.utime(mnt / "top/t", ns=(MTIME * 10**9 + 5, MTIME * 10**9 + 5))


def test_commit(tmp_path: Path, mounts: Mounts) -> None:
    """A container's changes committed: mounted, the new image shows exactly the
    container's view, in the same layout and in another one; the tag is replaced by a
    second commit; the new layer is in the store already (nothing to unpack)."""
    layout = tmp_path / "l"
    ref = three(layout)
    store = tmp_path / "s"
    upper = tmp_path / "upper"
    upper.mkdir()
    container = mounts.union(resolve(ref, store), "c", "--upper", upper)
    change_things(container.mnt)
    seen = snapshot(container.mnt, times=True)
    container.unmount()
    # One creation time for both (else the configs differ when a second passes between).
    digest = ok(img("commit", ref, "--upper", upper, f"oci:{layout}:c1", "--store", store,
                    SOURCE_DATE_EPOCH="1700000000"))
    other = ok(img("commit", ref, "--upper", upper, f"oci:{tmp_path}/other:c1",
                   "--store", store, SOURCE_DATE_EPOCH="1700000000"))
    assert digest == other  # the same bytes, config and manifest alike
    for n, new in enumerate((f"oci:{layout}:c1", f"oci:{tmp_path}/other:c1")):
        r = img("store", "resolve", new, "--store", store, "-v")
        assert r.returncode == 0 and r.stderr == b"", r.stderr
        view = mounts.union(r.stdout.decode().strip(), f"v{n}")
        got = snapshot(view.mnt, times=True)
        assert not diff_trees(got, seen), diff_trees(got, seen)
    fresh = tmp_path / "fresh"
    r = img("store", "resolve", f"oci:{tmp_path}/other:c1", "--store", fresh, "-v")
    assert r.returncode == 0 and r.stderr.count(b"unpacked") == 4, r.stderr
    (upper / "second").write_text("2")
    again = ok(img("commit", ref, "--upper", upper, f"oci:{layout}:c1", "--store", store))
    index = json.loads((layout / "index.json").read_text())
    tags = [m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]]
    assert sorted(tags) == ["c1", "three"]
    assert again != digest and again.decode().strip() in json.dumps(index)
    config_digest = json.loads((layout / "blobs/sha256" / again.decode().strip()[7:]
                                ).read_text())["config"]["digest"]
    config = json.loads((layout / "blobs/sha256" / config_digest[7:]).read_text())
    assert len(config["rootfs"]["diff_ids"]) == 4
    assert config["history"][-1]["created_by"] == "unionmount commit"
    assert not [p for p in layout.iterdir() if p.name.startswith(".unionmount")]


def test_squash(tmp_path: Path, mounts: Mounts) -> None:
    """One layer, the same view, nothing hidden stored; store du said what it saves."""
    layout = tmp_path / "l"
    ref = three(layout)
    store = tmp_path / "s"
    original = resolve(ref, store)
    use = json.loads(ok(img("store", "du", "--json", "--store", store)))
    assert [i["squash_saves"] for i in use["images"]] == [HIDDEN_BYTES]
    ok(img("squash", ref, f"oci:{layout}:flat", "--store", store))
    flat = resolve(f"oci:{layout}:flat", store)
    assert len(split_layers(flat)) == 1
    names = [p.name for p in Path(flat).rglob("*")]
    assert not [n for n in names if n.startswith(".wh.")] and "del" not in names
    assert "x" not in names
    a = snapshot(mounts.union(original, "orig").mnt, times=True)
    b = snapshot(mounts.union(flat, "flat").mnt, times=True)
    assert not diff_trees(b, a), diff_trees(b, a)
    use = json.loads(ok(img("store", "du", "--json", "--store", store)))
    assert {i["reference"]: i["squash_saves"] for i in use["images"]} == {
        ref: HIDDEN_BYTES, f"oci:{layout}:flat": 0}


def test_squash_of_layer_directories_to_a_tar(tmp_path: Path, mounts: Mounts) -> None:
    """``unionmount squash LAYERS FILE``: the merged view of plain layer directories as
    one layer tar, markers applied and gone; imported and mounted alone, the same view,
    and the same bytes each time."""
    store = tmp_path / "s"
    layers = resolve(three(tmp_path / "l"), store)
    out = tmp_path / "flat.tar"
    diff_id = ok(img("squash", layers, out)).strip()
    with tarfile.open(out) as tar:
        names = tar.getnames()
    assert not [n for n in names if "/.wh." in "/" + n], names
    ok(img("import", out, tmp_path / "flat-layer"))
    a = snapshot(mounts.union(layers, "orig").mnt, times=True)
    b = snapshot(mounts.union(str(tmp_path / "flat-layer"), "flat").mnt, times=True)
    assert not diff_trees(b, a), diff_trees(b, a)
    assert ok(img("squash", layers, tmp_path / "again.tar.gz")).strip() == diff_id
    r = img("squash", f"{tmp_path}/missing", out)
    one_line(r, 2, "does not exist")


def test_mount_by_reference(tmp_path: Path, mounts: Mounts) -> None:
    """``unionmount oci:DIR:TAG [--upper U] MNT``: the image's layers from the store,
    read-only or with a container's upper."""
    layout = tmp_path / "l"
    ref = three(layout)
    store = tmp_path / "s"
    by_layers = snapshot(mounts.union(resolve(ref, store), "layers").mnt, times=True)
    view = mounts.union(ref, "ref", "--store", store)
    assert not diff_trees(snapshot(view.mnt, times=True), by_layers)
    upper = tmp_path / "up"
    upper.mkdir()
    container = mounts.union(ref, "c", "--store", store, "--upper", upper)
    (container.mnt / "new").write_text("n")
    assert (upper / "new").read_text() == "n"
    r = unionmount(f"oci:{layout}:nosuchtag", "--store", store, tmp_path / "c")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr


def test_commit_refuses_bad_targets(tmp_path: Path) -> None:
    ref = three(tmp_path / "l")
    (tmp_path / "u").mkdir()
    s = tmp_path / "s"
    one_line(img("commit", ref, "--upper", tmp_path / "u", f"oci:{tmp_path}/l", "--store", s),
             2, "oci:DIR:TAG")
    one_line(img("commit", ref, "--upper", tmp_path / "nope", f"oci:{tmp_path}/l:x",
                 "--store", s), 2, "not a directory")
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk/file").write_text("x")
    one_line(img("squash", ref, f"oci:{tmp_path}/junk:x", "--store", s), 2,
             "not an OCI image layout")
    assert os.listdir(tmp_path / "junk") == ["file"]
