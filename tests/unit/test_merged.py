"""merged.py in-process: the offline tools' merged view (merged dirs, walks, data of
metacopy files), which must resolve as the mount does. The tools themselves (report,
diff, ociexport, ociimport) are run as the CLI in tests/test_tools.py.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounts import DIR, FIFO, OPAQUE, WHITEOUT, File, Symlink, build

from unionfs import merged
from unionfs.layers import Stack, open_stack
from unionfs.merged import EntryType
from unit.stacks import METACOPY_XATTR, open_fds


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[Stack]:
    """l0 over l1 under an upper: whiteouts of both kinds, an opaque dir, a symlink
    where a directory is below, a metacopy file whose data is in l1."""
    upper = build(tmp_path / "upper", {"meta": "", "new": "n", "gone": WHITEOUT})
    os.truncate(upper / "meta", 9)
    os.setxattr(upper / "meta", METACOPY_XATTR, b"")
    l0 = build(tmp_path / "l0", {"a/x": "x", ".wh.old": "", "opq": OPAQUE, "opq/k": "k",
                                 "s": Symlink("/etc")})
    l1 = build(tmp_path / "l1", {"a/y": "y", "old": "o", "gone": "g", "opq/hidden": "h",
                                 "s/z": "z", "meta": "meta data"})
    with open_stack([str(l0), str(l1)], str(upper)) as opened:
        yield opened


def _paths(entries: Iterator[merged.WalkEntry]) -> list[bytes]:
    return [entry.path for entry in entries]


def test_split_path_and_join() -> None:
    for text in (b"/a/b", b"a/b/", b"./a//b", b"/a/./b"):
        assert merged.split_path(text) == (b"a", b"b")
    assert merged.split_path(b"/") == () and merged.split_path(b".") == ()
    assert merged.join((b"a", b"b")) == b"/a/b" and merged.join(()) == b"/"


def test_walk_the_whole_stack(stack: Stack) -> None:
    before = open_fds()
    assert _paths(merged.walk(stack)) == [
        b"/a", b"/a/x", b"/a/y", b"/meta", b"/new", b"/opq", b"/opq/k", b"/s"]
    assert open_fds() == before


def test_walk_entries(stack: Stack) -> None:
    entries = {entry.path: entry for entry in merged.walk(stack)}
    assert entries[b"/a"].is_dir and [layer.index for layer in
                                      entries[b"/a"].found.dir_layers] == [1, 2]
    assert entries[b"/opq"].found.dir_layers == (stack.layers[1],)
    assert not entries[b"/s"].is_dir  # a symlink is never entered
    assert entries[b"/a/x"].name == b"x" and entries[b"/a/x"].components == (b"a", b"x")


def test_walk_prunes(stack: Stack) -> None:
    paths = _paths(merged.walk(stack, prune=lambda e: e.name == b"a"))
    assert b"/a" in paths and b"/a/x" not in paths


def test_walk_from_a_path(stack: Stack) -> None:
    assert _paths(merged.walk(stack, (b"a",))) == [b"/a", b"/a/x", b"/a/y"]
    assert _paths(merged.walk(stack, (b"a", b"y"))) == [b"/a/y"]
    for start, error in [((b"missing",), FileNotFoundError), ((b"old",), FileNotFoundError),
                         ((b"a", b"nope"), FileNotFoundError),
                         ((b"new", b"x"), NotADirectoryError),
                         ((b"s", b"z"), NotADirectoryError)]:
        with pytest.raises(error):
            list(merged.walk(stack, start))


def test_a_marker_name_is_no_entry_of_the_merged_view(stack: Stack, tmp_path: Path) -> None:
    """As the mount answers ENOENT for it, so must the tools (``unionmount inspect
    LAYERS /.wh.old`` reports the marker as a file of the merged view)."""
    with pytest.raises(FileNotFoundError):
        list(merged.walk(stack, (b".wh.old",)))
    with pytest.raises(FileNotFoundError):
        os.close(merged.open_data(stack, (b".wh.old",)))


def test_an_abandoned_walk_closes_its_fds(stack: Stack) -> None:
    before = open_fds()
    walk = merged.walk(stack)
    next(walk)
    next(walk)  # inside /a: its merged dir is open
    assert open_fds() != before
    walk.close()
    assert open_fds() == before


def test_merged_dirs(stack: Stack) -> None:
    root = merged.root_dir(stack.layers)
    assert root is not None
    with root:
        assert root.names() == [b"a", b"meta", b"new", b"opq", b"s"]
        found = root.find(b"a")
        assert found is not None and root.find(b"old") is None and root.find(b"gone") is None
        with root.child(b"a", found) as child:
            assert child.names() == [b"x", b"y"]
    # The root's fds are the layers' own: still open.
    for layer in stack.layers:
        os.fstat(layer.fd)
    assert merged.root_dir(()) is None


def test_data_of_a_metacopy_file(stack: Stack) -> None:
    root = merged.root_dir(stack.layers)
    assert root is not None
    with root:
        found = root.find(b"meta")
        assert found is not None and found.layer is stack.layers[0]
        ref = merged.data_ref(stack, root, b"meta", found)
        assert ref.layer is stack.layers[2] and ref.name == b"meta"
        new = root.find(b"new")
        assert new is not None
        assert merged.data_ref(stack, root, b"new", new).layer is stack.layers[0]
    fd = merged.open_data(stack, (b"meta",))
    try:
        assert os.read(fd, 100) == b"meta data"
    finally:
        os.close(fd)
    fd = merged.open_data(stack, (b"a", b"y"))
    try:
        assert os.read(fd, 10) == b"y"
    finally:
        os.close(fd)
    with pytest.raises(FileNotFoundError):
        merged.open_data(stack, (b"old",))


def test_type_of(tmp_path: Path) -> None:
    build(tmp_path, {"f": "x", "d": DIR, "s": Symlink("f"), "p": FIFO, "w": WHITEOUT})
    os.mknod(tmp_path / "b", stat.S_IFBLK | 0o600, os.makedev(7, 0))
    kinds = {name: merged.type_of(os.lstat(tmp_path / name)) for name in "fdspwb"}
    assert kinds == {"f": EntryType.FILE, "d": EntryType.DIR, "s": EntryType.SYMLINK,
                     "p": EntryType.FIFO, "w": EntryType.CHR, "b": EntryType.BLK}


def test_read_xattrs(tmp_path: Path) -> None:
    build(tmp_path, {"f": File(b"", xattrs={"user.b": b"2", "user.a": b"1",
                                            "trusted.overlay.origin": b"o"}),
                     "s": Symlink("f")})
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        values = merged.read_xattrs(fd, b"f", merged.user_visible_xattr)
        assert list(values.items()) == [("user.a", b"1"), ("user.b", b"2")]  # sorted
        assert merged.read_xattrs(fd, b"f", lambda name: True)["trusted.overlay.origin"] == b"o"
        assert merged.read_xattrs(fd, b"s", lambda name: True) == {}  # not followed
    finally:
        os.close(fd)
