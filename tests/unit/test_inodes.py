"""inodes.py: inode numbers, links and lookup counts, node states, file and dir handles.

Plain objects: no layer is read here except for the fds a FileHandle owns.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from unionfs.inodes import (
    ROOT_INODE,
    DirHandle,
    FileHandle,
    HandleTable,
    InodeTable,
    Node,
    NodeState,
    key_of,
)
from unionfs.layers import Layer

UPPER = Layer(0, "/upper", -1, True)
LOWER = Layer(1, "/lower", -1, False)


def _key(dev: int, ino: int) -> int:
    return (dev << 64) | ino


def _dir(table: InodeTable, inode: int, parent: Node | None = None, name: bytes = b"") -> Node:
    node = Node(inode, parent, name, LOWER, stat.S_IFDIR, (LOWER,))
    table.add(node, _key(1, inode))
    return node


def _file(table: InodeTable, key: int, parent: Node, name: bytes) -> Node:
    node = Node(table.number_for(key), parent, name, LOWER, stat.S_IFREG)
    table.add(node, key)
    table.link(node, parent, name)
    return node


@pytest.fixture
def table() -> InodeTable:
    table = InodeTable()
    root = Node(ROOT_INODE, None, b"", LOWER, stat.S_IFDIR, (LOWER,))
    root.lookups = 1
    table.add(root, _key(1, 2))
    return table


def _root(table: InodeTable) -> Node:
    return table[ROOT_INODE]


# --------------------------------------------------------------------------- numbers


def test_key_of_is_dev_and_ino(tmp_path: Path) -> None:
    st = os.stat(tmp_path)
    assert key_of(st) == _key(st.st_dev, st.st_ino)
    assert key_of(st) >> 64 == st.st_dev and key_of(st) & ((1 << 64) - 1) == st.st_ino


def test_numbers_of_the_first_filesystem_are_its_st_ino(table: InodeTable) -> None:
    assert table.number_for(_key(1, 1234)) == 1234
    assert table.number_for(_key(1, 1234)) == 1234  # the same while unused


def test_a_second_filesystem_gets_its_ordinal_in_the_top_bits(table: InodeTable) -> None:
    assert table.number_for(_key(1, 10)) == 10
    assert table.number_for(_key(9, 10)) == (1 << 56) ^ 10
    assert table.number_for(_key(5, 10)) == (2 << 56) ^ 10
    assert table.number_for(_key(9, 11)) == (1 << 56) ^ 11  # the ordinal is kept


def test_numbers_are_unique_among_live_nodes(table: InodeTable) -> None:
    root = _root(table)
    a = _file(table, _key(1, (1 << 56) ^ 5), root, b"a")
    assert a.inode == (1 << 56) ^ 5
    # Another filesystem's ino 5 would get the same number: a fresh one instead.
    b = _file(table, _key(2, 5), root, b"b")
    assert b.inode != a.inode and b.inode > 1 << 62
    c = _file(table, _key(3, 5), root, b"c")
    assert c.inode not in (a.inode, b.inode)


def test_the_root_number_and_zero_are_never_given(table: InodeTable) -> None:
    for ino in (0, ROOT_INODE):
        assert table.number_for(_key(1, ino)) > 1 << 62


def test_a_copied_key_keeps_the_number(table: InodeTable) -> None:
    """After copy-up the node's upper entry has its lower entry's number, also after the
    kernel forgot it: st_ino is stable across copy-up for the life of the mount."""
    root = _root(table)
    node = _file(table, _key(1, 500), root, b"f")
    upper_key = _key(2, 77)
    table.remember_copy(node, upper_key)
    assert table.by_key(upper_key) is node and node.keys == (_key(1, 500), upper_key)
    table.remember(node)
    assert table.forget(node.inode, 1) is node
    assert table.by_key(upper_key) is None
    assert table.number_for(upper_key) == 500


def test_add_key_is_idempotent(table: InodeTable) -> None:
    node = _file(table, _key(1, 40), _root(table), b"f")
    table.add_key(node, _key(1, 41))
    table.add_key(node, _key(1, 41))
    assert node.keys == (_key(1, 40), _key(1, 41))
    assert table.by_key(_key(1, 41)) is node


# --------------------------------------------------------------------------- links, counts


def test_link_and_unlink(table: InodeTable) -> None:
    root = _root(table)
    d = _dir(table, 20, root, b"d")
    table.link(d, root, b"d")
    f = _file(table, _key(1, 30), root, b"f")
    table.link(f, d, b"g")  # a second name: a hard link
    assert root.children == {b"d": d, b"f": f} and d.children == {b"g": f}
    assert f.links == ((root, b"f"), (d, b"g"))
    table.link(f, d, b"g")  # known already: no second entry
    assert f.links == ((root, b"f"), (d, b"g"))
    # Another node takes the name: the old one no longer has it.
    other = _file(table, _key(1, 31), d, b"g")
    assert d.children[b"g"] is other and f.links == ((root, b"f"),)
    assert table.unlink(root, b"f") is f and f.links == () and b"f" not in root.children
    assert table.unlink(root, b"f") is None


def test_only_directories_are_parents(table: InodeTable) -> None:
    f = _file(table, _key(1, 30), _root(table), b"f")
    with pytest.raises(AssertionError):
        table.link(f, f, b"x")
    assert f.children == {}


def test_lookup_counts_and_forget(table: InodeTable) -> None:
    root = _root(table)
    f = _file(table, _key(1, 30), root, b"f")
    table.remember(f)
    table.remember(f)
    table.remember(f)
    assert f.lookups == 3
    assert table.forget(f.inode, 2) is None
    assert table.get(f.inode) is f and root.children[b"f"] is f
    assert table.forget(f.inode, 1) is f
    assert table.get(f.inode) is None and table.by_key(_key(1, 30)) is None
    assert b"f" not in root.children and f.links == ()
    assert table.forget(f.inode, 1) is None  # unknown now: nothing to do


def test_forget_leaves_a_name_now_held_by_another_node(table: InodeTable) -> None:
    root = _root(table)
    old = _file(table, _key(1, 30), root, b"f")
    table.remember(old)
    table.unlink(root, b"f")
    new = _file(table, _key(1, 31), root, b"f")
    old.links = ((root, b"f"),)  # as if it were still recorded there
    assert table.forget(old.inode, 1) is old
    assert root.children[b"f"] is new


def test_the_root_is_never_forgotten(table: InodeTable) -> None:
    assert table.forget(ROOT_INODE, 100) is None
    assert table[ROOT_INODE].lookups == 1


# --------------------------------------------------------------------------- nodes


def test_a_new_node() -> None:
    d = Node(5, None, b"d", LOWER, stat.S_IFDIR, (LOWER,))
    f = Node(6, d, b"f", LOWER, stat.S_IFREG)
    g = Node(7, d, b"g", LOWER, stat.S_IFLNK)
    assert d.state is NodeState.LIVE and d.live and d.is_dir and not f.is_dir
    assert d.lookups == 0 and d.version == 0 and d.listing is None and d.data is None
    assert d.children == {} and d.children is not Node(8, None, b"", LOWER,
                                                       stat.S_IFDIR).children
    assert f.children is g.children  # non-directories share one empty dict
    assert f.open_fd() is None
    f.changed()
    f.changed()
    assert f.version == 2
    assert "unlinked" in repr(_with_state(f, NodeState.UNLINKED))


def _with_state(node: Node, state: NodeState) -> Node:
    node.state = state
    return node


@pytest.mark.parametrize(("state", "live"), [
    (NodeState.LIVE, True), (NodeState.HOMELESS, False), (NodeState.UNLINKED, False)])
def test_only_a_live_node_is_live(state: NodeState, live: bool) -> None:
    assert _with_state(Node(5, None, b"f", LOWER, stat.S_IFREG), state).live is live


# --------------------------------------------------------------------------- handles


def _open(tmp_path: Path, name: str, data: bytes) -> int:
    (tmp_path / name).write_bytes(data)
    return os.open(tmp_path / name, os.O_RDONLY)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_file_handle_registers_with_its_node(tmp_path: Path) -> None:
    node = Node(5, None, b"f", LOWER, stat.S_IFREG)
    one = FileHandle(node, _open(tmp_path, "a", b"a"), LOWER)
    two = FileHandle(node, _open(tmp_path, "b", b"b"), LOWER)
    assert node.handles == [one, two] and node.open_fd() == one.fd
    one.close()
    assert node.handles == [two] and not _is_open(one.fd) and node.open_fd() == two.fd
    two.close()
    assert node.handles == [] and node.open_fd() is None


def test_fd_for_keeps_the_fd_while_the_data_has_not_moved(tmp_path: Path) -> None:
    node = Node(5, None, b"f", LOWER, stat.S_IFREG)
    handle = FileHandle(node, _open(tmp_path, "lower", b"old"), LOWER)

    def reopen(n: Node, fd: int) -> int:
        raise AssertionError("reopened")

    fd = handle.fd
    assert handle.fd_for(LOWER, reopen) == fd
    handle.close()


def test_fd_for_reopens_after_a_copy_up(tmp_path: Path) -> None:
    node = Node(5, None, b"f", LOWER, stat.S_IFREG)
    handle = FileHandle(node, _open(tmp_path, "lower", b"old"), LOWER)
    old_fd = handle.fd
    calls: list[tuple[Node, int]] = []

    def reopen(n: Node, fd: int) -> int:
        calls.append((n, fd))
        return _open(tmp_path, "upper", b"new")

    fd = handle.fd_for(UPPER, reopen)
    assert calls == [(node, old_fd)]
    assert os.pread(fd, 3, 0) == b"new" and handle.source is UPPER and handle.fd == fd
    assert fd != old_fd and not _is_open(old_fd)
    assert handle.fd_for(UPPER, reopen) == fd and len(calls) == 1  # once only
    handle.close()


def test_fd_for_never_reopens_an_unlinked_node(tmp_path: Path) -> None:
    """Its name is gone: the open file is all that is left of it."""
    node = Node(5, None, b"f", LOWER, stat.S_IFREG)
    handle = FileHandle(node, _open(tmp_path, "lower", b"old"), LOWER)
    node.state = NodeState.UNLINKED

    def reopen(n: Node, fd: int) -> int:
        raise AssertionError("reopened")

    assert os.pread(handle.fd_for(UPPER, reopen), 3, 0) == b"old"
    assert handle.source is LOWER
    handle.close()


def test_handle_numbers_are_never_reused(tmp_path: Path) -> None:
    handles = HandleTable()
    node = Node(5, None, b"f", LOWER, stat.S_IFREG)
    d = Node(6, None, b"d", LOWER, stat.S_IFDIR)
    first = handles.add_file(FileHandle(node, _open(tmp_path, "a", b""), LOWER))
    second = handles.add_dir(DirHandle(d))
    # no snapshot until the first readdir
    assert handles.dirs[second].entries is None and handles.dirs[second].node is d
    handles.files.pop(first).close()
    handles.dirs.pop(second)
    third = handles.add_file(FileHandle(node, _open(tmp_path, "b", b""), LOWER))
    assert len({first, second, third}) == 3 and 0 not in (first, second, third)
    handles.files.pop(third).close()
