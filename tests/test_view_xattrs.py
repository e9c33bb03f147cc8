"""user.unionfs.* on a mounted view: where an entry comes from (issue 5).

Answered by getxattr, never listed by listxattr (so cp -a and tar do not copy
them), read-only.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from mounts import DIR, OPAQUE, WHITEOUT, build

pytestmark = pytest.mark.usefixtures("mount_guard")


def _layers(value: bytes) -> list[tuple[str, str]]:
    return [tuple(line.split(" ", 1)) for line in value.decode().splitlines()]  # type: ignore[misc]


@pytest.mark.parametrize("backend", ["unionfs"])
def test_where_entries_come_from(union, tmp_path: Path) -> None:
    top = build(tmp_path / "top", {"etc/motd": "top", "gone": WHITEOUT, "opq": OPAQUE})
    mid = build(tmp_path / "mid", {"etc/hosts": "mid", "etc/motd": "mid", "opq/x": "x"})
    base = build(tmp_path / "base", {"etc/passwd": "base", "etc/motd": "base", "gone": "g",
                                     "opq/y": "y", "bin": DIR})
    m = union(top, mid, base)
    t, md, b = (str(p) for p in (top, mid, base))

    assert os.getxattr(m / "etc/passwd", "user.unionfs.layer") == b.encode()
    assert os.getxattr(m / "etc/motd", "user.unionfs.layer") == t.encode()
    assert _layers(os.getxattr(m / "etc/motd", "user.unionfs.layers")) == [
        ("file", t), ("file", md), ("file", b)]
    # A directory merged from all three layers, and one that is opaque.
    assert _layers(os.getxattr(m / "etc", "user.unionfs.layers")) == [
        ("dir", t), ("dir", md), ("dir", b)]
    assert _layers(os.getxattr(m / "opq", "user.unionfs.layers")) == [
        ("opaque", t), ("dir", md), ("dir", b)]
    assert os.getxattr(m / "etc/motd", "user.unionfs.copied-up") == b"no"

    # Copy-up: the upper provides it now, and shadows the lowers.
    with open(m / "etc/passwd", "a") as f:
        f.write("+")
    assert os.getxattr(m / "etc/passwd", "user.unionfs.layer") == b"upper"
    assert os.getxattr(m / "etc/passwd", "user.unionfs.copied-up") == b"yes"
    assert _layers(os.getxattr(m / "etc/passwd", "user.unionfs.layers")) == [
        ("file", "upper"), ("file", b)]
    # A new file lives in the upper and shadows nothing.
    (m / "etc/new").write_text("n")
    assert os.getxattr(m / "etc/new", "user.unionfs.copied-up") == b"no"
    # A deleted name leaves a whiteout in the upper; the layers below still hold it.
    os.unlink(m / "etc/hosts")
    assert not (m / "etc/hosts").exists()

    # Never listed, never copied, never changed.
    for path in ("etc/passwd", "etc", "opq"):
        assert not [n for n in os.listxattr(m / path) if n.startswith("user.unionfs.")]
    with pytest.raises(OSError) as raised:
        os.setxattr(m / "etc/passwd", "user.unionfs.layer", b"x")
    assert raised.value.errno == errno.EPERM
