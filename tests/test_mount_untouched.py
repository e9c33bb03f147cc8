"""Mounting changes nothing the user sees: the roots of the layers keep their times.

Kernel overlayfs leaves the mtime of the upper root (and so of the merged ``/``) and the
mtime and ctime of every lower root alone, on a read-write mount as on a read-only one;
so must unionfs, which probes what the upper's filesystem can hold.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from mounts import Mount, build

pytestmark = pytest.mark.usefixtures("mount_guard")

UnionFactory = Callable[..., Mount]
OLD = 946_684_800  # 2000-01-01, a time no entry made by this test can have


def _times(path: Path) -> tuple[int, int]:
    st = os.lstat(path)
    return st.st_mtime_ns, st.st_ctime_ns


@pytest.mark.parametrize("writable", [True, False], ids=["rw", "ro"])
def test_mounting_leaves_the_layer_roots_alone(
    union: UnionFactory, tmp_path: Path, backend: str, writable: bool
) -> None:
    l1 = build(tmp_path / "l1", {"a": "a", "d/x": "x"})
    l2 = build(tmp_path / "l2", {"b": "b", "d/y": "y"})
    upper = build(tmp_path / "upper", {"u": "u"})
    for root in (l1, l2, upper):
        os.utime(root, (OLD, OLD))
    lowers_before = {root: _times(root) for root in (l1, l2)}
    upper_before = _times(upper)

    m = union(l1, l2, upper=upper if writable else False)
    top = upper if writable else l1
    assert os.stat(m.mnt).st_mtime == OLD, "the merged / got a new mtime"
    assert sorted(os.listdir(m.mnt)) == (["a", "b", "d", "u"] if writable else ["a", "b", "d"])
    assert os.stat(top).st_mtime == OLD, f"{top} got a new mtime from the mount"
    m.unmount()

    for root, times in lowers_before.items():
        assert _times(root) == times, f"lower root {root}: mtime/ctime changed by the mount"
    assert _times(upper)[0] == upper_before[0], "the upper root's mtime changed"
    if backend == "unionfs":
        # Kernel overlayfs (index=on) records trusted.overlay.origin and .uuid on the upper
        # root at its first mount, which moves its ctime; unionfs has nothing to record.
        assert _times(upper) == upper_before, "the upper root's ctime changed"
    assert os.listdir(upper) == ["u"]


def test_a_second_mount_leaves_the_roots_alone(union: UnionFactory, tmp_path: Path) -> None:
    """After a mount that wrote something, mounting again changes no root either."""
    l1 = build(tmp_path / "l1", {"a": "a"})
    m = union(l1)
    (m / "new").write_text("n")
    m.unmount()
    assert m.upper is not None
    for root in (l1, m.upper):
        os.utime(root, (OLD, OLD))
    before = {root: _times(root) for root in (l1, m.upper)}
    m = union(l1, upper=m.upper, workdir=m.workdir, name="again")
    assert os.stat(m.mnt).st_mtime == OLD
    assert (m / "new").read_text() == "n"
    m.unmount()
    assert {root: _times(root) for root in (l1, m.upper)} == before
