"""Metadata-only files in lower layers: an upper that went through chmod or chown holds
sparse files marked ``trusted.overlay.metacopy``; stacked again as a lower layer (a
committed container layer, the next build step), their data is still below them.

Kernel overlayfs with ``metacopy=on`` is the reference: it writes such uppers itself
(with a ``trusted.overlay.redirect`` for a renamed file) and reads them in any layer.
"""

from __future__ import annotations

import errno
import json
import os
import tarfile
from pathlib import Path

import pytest
from mounts import (
    READER_OPTS,
    File,
    Mount,
    build,
    diff_trees,
    mount_kernel,
    mount_unionfs,
    ok,
    snapshot,
    tool,
)

from unionfs.layers import Found, find_data, lstat_at, open_stack

pytestmark = pytest.mark.usefixtures("mount_guard")

DATA = os.urandom(151_075)  # the size of the InRelease file that first read as zeros


def _mount(backend: str, lowers: list[Path], upper: Path, tmp: Path, name: str) -> Mount:
    """A read-write mount that writes (and follows) metadata-only copies."""
    if backend == "kernel":
        return mount_kernel(lowers, upper, tmp / f"{name}.work", tmp / name, READER_OPTS)
    return mount_unionfs(lowers, upper, tmp / f"{name}.work", tmp / name, tmp / f"{name}.log")


def _is_metacopy(path: Path) -> bool:
    return "trusted.overlay.metacopy" in os.listxattr(path, follow_symlinks=False)


@pytest.mark.parametrize("backend", ["kernel", "unionfs"])
def test_a_chmodded_upper_stacked_as_a_lower_keeps_its_data(backend: str, tmp_path: Path
                                                             ) -> None:
    base = build(tmp_path / "base", {
        "lists/InRelease": File(DATA, mode=0o644),
        "owned": File(b"owned data\n" * 1000, mode=0o600),
        "keep": "untouched",
    })
    up1 = tmp_path / "up1"
    m = _mount(backend, [base], up1, tmp_path, "m1")
    try:
        os.chmod(m / "lists/InRelease", 0o640)
        os.chown(m / "owned", 1000, 1000)
    finally:
        m.unmount()
    # Both wrote metadata only: a sparse marked file, no data blocks.
    for name in ("lists/InRelease", "owned"):
        assert _is_metacopy(up1 / name), name
        assert os.stat(up1 / name).st_blocks <= 8, name

    # The upper as a lower layer: read, append (a copy-up from it), chmod again.
    up2 = tmp_path / "up2"
    m = _mount(backend, [up1, base], up2, tmp_path, "m2")
    try:
        assert (m / "lists/InRelease").read_bytes() == DATA
        assert (m / "owned").read_bytes() == b"owned data\n" * 1000
        st = os.stat(m / "lists/InRelease")
        assert (st.st_mode & 0o777, st.st_size) == (0o640, len(DATA))
        assert st.st_blocks >= len(DATA) // 512, "blocks are those of the data"
        with open(m / "owned", "ab") as f:
            f.write(b"appended\n")
        assert (m / "owned").read_bytes() == b"owned data\n" * 1000 + b"appended\n"
        os.chmod(m / "lists/InRelease", 0o600)
        tree2 = snapshot(m.mnt)
    finally:
        m.unmount()
    assert (up2 / "owned").read_bytes() == b"owned data\n" * 1000 + b"appended\n"
    assert not _is_metacopy(up2 / "owned"), "the copy-up took the data"
    assert _is_metacopy(up2 / "lists/InRelease")

    # Two metadata-only layers over the data: still the data.
    m = _mount(backend, [up2, up1, base], tmp_path / "up3", tmp_path, "m3")
    try:
        assert (m / "lists/InRelease").read_bytes() == DATA
        assert diff_trees(snapshot(m.mnt), tree2) == []
    finally:
        m.unmount()


def test_kernel_and_unionfs_read_each_others_stacked_uppers(tmp_path: Path) -> None:
    """The kernel's upper (metacopy files, one renamed: it carries a redirect) under
    unionfs, and unionfs's under the kernel: the same trees."""
    base = build(tmp_path / "base", {"a/f": File(DATA), "a/g": File(b"g" * 9000), "b/x": "x"})
    kup = tmp_path / "kup"
    k = mount_kernel([base], kup, tmp_path / "kwork", tmp_path / "k", READER_OPTS)
    try:
        os.chmod(k / "a/f", 0o600)
        os.rename(k / "a/f", k / "b/moved")
        os.chown(k / "a/g", 7, 7)
    finally:
        k.unmount()
    assert os.getxattr(kup / "b/moved", "trusted.overlay.redirect") == b"/a/f"
    assert _is_metacopy(kup / "b/moved")

    views = {}
    for backend in ("kernel", "unionfs"):
        m = _mount(backend, [kup, base], tmp_path / f"{backend}.up", tmp_path, backend)
        try:
            assert (m / "b/moved").read_bytes() == DATA
            assert (m / "a/g").read_bytes() == b"g" * 9000
            views[backend] = snapshot(m.mnt)
        finally:
            m.unmount()
    assert diff_trees(views["kernel"], views["unionfs"]) == []


def test_tools_follow_lower_metacopy_files(tmp_path: Path) -> None:
    """inspect says where the data is, export writes the data, not zeros."""
    base = build(tmp_path / "base", {"f": File(DATA), "g": "g"})
    up1 = tmp_path / "up1"
    m = _mount("unionfs", [base], up1, tmp_path, "m1")
    try:
        os.chmod(m / "f", 0o600)
    finally:
        m.unmount()
    up2 = tmp_path / "up2"
    m = _mount("unionfs", [up1, base], up2, tmp_path, "m2")
    try:
        os.chmod(m / "f", 0o640)  # a metadata-only copy of a metadata-only file
        os.utime(m / "g", ns=(5, 5))
    finally:
        m.unmount()
    layers = f"{up1}:{base}"
    report = ok(tool("inspect", layers, "--upper", up2, "--json"))
    entries = {e["path"]: e for e in json.loads(report)["entries"]}
    assert entries["/f"]["layer"] == "upper"
    assert entries["/f"]["data_layer"] == str(base)
    lower_only = {e["path"]: e for e in json.loads(ok(tool("inspect", layers, "--json")))
                  ["entries"]}
    assert lower_only["/f"]["layer"] == str(up1)
    assert lower_only["/f"]["data_layer"] == str(base)

    out = tmp_path / "layer.tar"
    ok(tool("export", layers, "--upper", up2, "-o", out))
    with tarfile.open(out) as tar:
        member = tar.getmember("f")
        assert member.mode == 0o640
        data = tar.extractfile(member)
        assert data is not None and data.read() == DATA
    # The diff of the second step sees a metadata change only.
    assert ok(tool("diff", layers, "--upper", up2)).splitlines() == [b"C /f", b"C /g"]


@pytest.mark.parametrize("backend", ["kernel", "unionfs"])
def test_a_metacopy_file_without_data_fails_with_eio(backend: str, tmp_path: Path) -> None:
    """A marked file with nothing below it: the kernel fails its lookup with EIO;
    unionfs lists it with its own metadata and fails what reads its data with EIO."""
    lower = build(tmp_path / "lower", {"g": "g"})
    with open(lower / "f", "wb") as f:
        f.truncate(100)
    os.setxattr(lower / "f", "trusted.overlay.metacopy", b"")
    m = _mount(backend, [lower], tmp_path / "up", tmp_path, "m")
    try:
        assert sorted(os.listdir(m.mnt)) == ["f", "g"]
        with pytest.raises(OSError) as raised:
            (m / "f").read_bytes()
        assert raised.value.errno == errno.EIO
        with pytest.raises(OSError) as raised, open(m / "f", "ab") as f:
            f.write(b"x")
        assert raised.value.errno == errno.EIO
        assert (m / "g").read_text() == "g"
    finally:
        m.unmount()
    if backend == "unionfs":
        log = (tmp_path / "m.log").read_text()
        assert "metadata-only file with no data below it" in log
        assert "Traceback" not in log


# ----------------------------------------------------------------- find_data on temp dirs


def _found(layers, name: bytes, pos: int = 0) -> Found:
    st = lstat_at(layers[pos].fd, name)
    assert st is not None
    return Found(layers[pos], st, ())


def _layers(*roots: Path):
    return list(open_stack([str(root) for root in roots]).layers)


def _mark(path: Path, redirect: bytes | None = None) -> None:
    os.setxattr(path, "trusted.overlay.metacopy", b"")
    if redirect is not None:
        os.setxattr(path, "trusted.overlay.redirect", redirect)


def _sparse(path: Path, size: int = 10) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def _data(layers, name: bytes, pos: int = 0):
    fd_of = lambda layer: layer.fd
    return find_data(layers, layers, fd_of, name, _found(layers, name, pos))


def test_find_data_rules(tmp_path: Path) -> None:
    top, mid, low = (tmp_path / n for n in ("top", "mid", "low"))
    build(low, {"f": "data", "plain": "p", "d/deep": "deep", "dir/x": "x"})
    _mark(_sparse(top / "f"))
    _mark(_sparse(mid / "f"))  # a chain of marked files: followed to the data
    build(top, {"plain": "own data"})
    _mark(_sparse(top / "moved"), b"/d/deep")  # absolute redirect
    _mark(_sparse(top / "renamed"), b"plain")  # relative: a name in the same directory
    _mark(_sparse(top / "bad"), b"/../f")  # invalid: ignored, so looked up as "bad"
    _mark(_sparse(top / "dir"))  # a directory below: no data
    os.mknod(mid / "gone", 0o20000, 0)  # a whiteout below
    _mark(_sparse(top / "gone"))
    layers = _layers(top, mid, low)
    try:
        assert _data(layers, b"plain") is None
        ref = _data(layers, b"f")
        assert (ref.layer, ref.name, ref.path, ref.missing) == (layers[2], b"f", None, None)
        ref = _data(layers, b"moved")
        assert (ref.layer, ref.name, ref.path) == (layers[2], b"deep", (b"d", b"deep"))
        ref = _data(layers, b"renamed")
        assert (ref.layer, ref.name, ref.path) == (layers[2], b"plain", None)
        for name in (b"bad", b"dir", b"gone"):
            ref = _data(layers, name)
            assert ref is not None and ref.missing, name
            with pytest.raises(OSError) as raised:
                ref.check()
            assert raised.value.errno == errno.EIO
    finally:
        for layer in layers:
            os.close(layer.fd)


def test_find_data_never_follows_a_symlink(tmp_path: Path) -> None:
    """A redirect through a symlink in a lower layer does not leave the layer."""
    outside = build(tmp_path / "outside", {"secret": "secret"})
    low = tmp_path / "low"
    low.mkdir()
    os.symlink(outside, low / "d")
    top = tmp_path / "top"
    _mark(_sparse(top / "f"), b"/d/secret")
    layers = _layers(top, low)
    try:
        ref = _data(layers, b"f")
        assert ref is not None and ref.missing
    finally:
        for layer in layers:
            os.close(layer.fd)
