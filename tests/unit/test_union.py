"""union.py, the merged view: lookup, listings, attributes, xattrs, what a change needs.

The view writes nothing; these tests build layers on temp dirs and read them through a
`core.Core` (tests/unit/stacks.py), never a mount.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from mounts import DIR, File, HardLink, Symlink, assert_errno

from unionfs.inodes import FileHandle, NodeState
from unionfs.union import LISTING_LOOKUP_LAYERS, VIRTUAL_XATTRS, Union
from unit.stacks import METACOPY_XATTR, Stacks, lookup, node

# --------------------------------------------------------------------------- lookup


def test_lookup_finds_and_caches(stacks: Stacks) -> None:
    view = stacks.core({"d/f": "x"}).view
    d = node(view, "d")
    f = view.lookup(d, b"f")
    assert f is not None and d.children == {b"f": f}
    assert view.lookup(d, b"f") is f
    assert f.parent is d and f.name == b"f" and f.layer is view.layers[1]
    assert view.lookup(d, b"missing") is None
    assert f.lookups == 0  # a lookup of the view counts no kernel reference


def test_lookup_of_a_name_too_long(stacks: Stacks) -> None:
    view = stacks.core({}).view
    assert_errno(errno.ENAMETOOLONG, view.lookup, view.root, b"n" * (view.name_max + 1))
    assert view.lookup(view.root, b"n" * view.name_max) is None


def test_markers_are_never_found(stacks: Stacks) -> None:
    view = stacks.core({".wh.x": "", ".wh..wh..opq": "", ".wh..wh.plnk": DIR, "x": "shown"},
                       upper={".wh.y": ""}).view
    for name in (b".wh.x", b".wh..wh..opq", b".wh..wh.plnk", b".wh.y"):
        assert view.lookup(view.root, name) is None, name
    assert view.lookup(view.root, b"x") is not None
    assert sorted(view.listing(view.root)) == [b"x"]


def test_two_names_of_one_inode_are_one_node(stacks: Stacks) -> None:
    view = stacks.core({"a": "x", "d/b": HardLink("a")}).view
    a = node(view, "a")
    b = node(view, "d/b")
    assert a is b
    assert set(a.links) == {(view.root, b"a"), (node(view, "d"), b"b")}


def test_a_deep_walk_with_a_tiny_fd_cache(stacks: Stacks) -> None:
    """Directory fds are opened from the nearest cached ancestor, one step at a time; a
    cache of one fd still reaches every depth."""
    deep = "/".join(f"d{i}" for i in range(30))
    view = stacks.core({f"{deep}/f": "deep", "e/g": "g"}).view
    view.fds.capacity = 1
    f = node(view, f"{deep}/f")
    node(view, "e/g")
    dir_fd, name = view.location(f)  # refetched: the cache had to reopen the walk
    assert os.stat(name, dir_fd=dir_fd).st_size == 4
    assert view.relpath(f) == tuple(f"d{i}".encode() for i in range(30)) + (b"f",)


def test_resolve_dir(stacks: Stacks) -> None:
    view = stacks.core({"a/b/f": "x"}).view
    assert view.resolve_dir(()) is view.root
    assert view.resolve_dir((b"a", b"b")) is node(view, "a/b")
    assert view.resolve_dir((b"a", b"b", b"f")) is None
    assert view.resolve_dir((b"a", b"missing")) is None


def test_lower_has(stacks: Stacks) -> None:
    view = stacks.core({"low": "x"}, upper={"up": "x", "both": "x"}).view
    (stacks.lowers[0] / "both").write_bytes(b"below")
    assert view.lower_has(view.root, b"low") and view.lower_has(view.root, b"both")
    assert not view.lower_has(view.root, b"up")


# --------------------------------------------------------------------------- listings


def test_listing_is_merged_and_cached(stacks: Stacks) -> None:
    view = stacks.core({"d/a": "x"}, {"d/b": "x", "d/a": "below"}).view
    d = node(view, "d")
    listing = view.listing(d)
    assert sorted(listing) == [b"a", b"b"] and listing[b"a"].layer is view.layers[1]
    assert view.listing(d) is listing
    view.drop_listing(d)
    assert d.listing is None
    assert view.listing(d) == listing


def test_a_directory_of_many_layers_keeps_its_listing_for_lookups(stacks: Stacks) -> None:
    specs = [{f"d/f{i}": "x"} for i in range(LISTING_LOOKUP_LAYERS)]
    view = stacks.core(*specs).view
    d = node(view, "d")
    assert len(d.dir_layers) == LISTING_LOOKUP_LAYERS  # the lowers (the upper has no d)
    assert d.listing is None
    f = view.lookup(d, b"f1")  # answered from the merged listing
    assert f is not None and f.layer is view.layers[2]
    assert d.listing is not None and sorted(d.listing) == [b"f0", b"f1", b"f2"]
    view.drop_listing(d)
    assert d.listing is not None  # kept: its lookups use it


def test_a_directory_of_few_layers_looks_up_without_a_listing(stacks: Stacks) -> None:
    view = stacks.core({"d/f": "x"}).view
    d = node(view, "d")
    assert view.lookup(d, b"f") is not None and d.listing is None


def test_entry_changed_updates_the_listing_in_place(stacks: Stacks) -> None:
    view = stacks.core({"d/a": "x", "d/b": "x"}).view
    d = node(view, "d")
    listing = view.listing(d)
    version = d.version
    view.entry_changed(d, b"new", True)
    view.entry_changed(d, b"a", False)
    view.entry_changed(d, b"b", None)
    view.entry_changed(d, b"never-there", None)
    assert view.listing(d) is listing
    assert sorted(listing) == [b"a", b"new"]
    assert listing[b"new"].is_dir and listing[b"new"].layer is view.upper
    assert not listing[b"a"].is_dir and listing[b"a"].layer is view.upper
    assert d.version == version + 4


def test_entry_changed_without_a_listing(stacks: Stacks) -> None:
    view = stacks.core({"d/a": "x"}).view
    d = node(view, "d")
    view.entry_changed(d, b"a", None)
    assert d.listing is None and d.version == 1


def test_child_for_listing(stacks: Stacks) -> None:
    view = stacks.core({"d/f": "x", "d/sub/g": "g"}, {"d/sub/h": "h"}).view
    d = node(view, "d")
    listing = view.listing(d)
    child, st = view.child_for_listing(d, listing[b"f"])
    assert child is view.lookup(d, b"f")
    assert st is not None and st.st_size == 1  # new: its attributes are that stat
    again = view.child_for_listing(d, listing[b"f"])
    assert again == (child, None)  # known: the caller asks the node
    sub, _ = view.child_for_listing(d, listing[b"sub"])
    assert len(sub.dir_layers) == 2  # a directory is resolved in full: it merges
    os.unlink(stacks.lowers[0] / "d" / "f")  # (a lower never changes; here it does)
    d.children.clear()
    assert view.child_for_listing(d, listing[b"f"]) is None


# --------------------------------------------------------------------------- attributes


def test_attributes_of_a_file(stacks: Stacks) -> None:
    view = stacks.core({"f": File(b"hello", mode=0o640, uid=12, gid=34, mtime=1e9)}).view
    f = node(view, "f")
    attrs = view.attributes(f)
    st = os.lstat(stacks.lowers[0] / "f")
    assert (attrs.mode, attrs.nlink, attrs.uid, attrs.gid, attrs.size) == (
        stat.S_IFREG | 0o640, 1, 12, 34, 5)
    assert (attrs.mtime_ns, attrs.ctime_ns, attrs.blocks) == (
        st.st_mtime_ns, st.st_ctime_ns, st.st_blocks)


def test_nlink_of_merged_and_single_directories(stacks: Stacks) -> None:
    view = stacks.core({"merged/a": DIR, "single/a": DIR, "single/b": DIR},
                       {"merged/b": DIR, "merged/c": DIR}).view
    assert view.attributes(node(view, "merged")).nlink == 1  # "unknown", as the kernel
    assert view.attributes(node(view, "single")).nlink == 4
    assert view.attributes(view.root).nlink == 1


def test_nlink_of_hard_links(stacks: Stacks) -> None:
    view = stacks.core({"a": "x", "b": HardLink("a")}).view
    assert view.attributes(node(view, "a")).nlink == 2


def test_an_unlinked_node(stacks: Stacks) -> None:
    view = stacks.core({}, upper={"f": "data"}).view
    f = node(view, "f")
    fd = os.open(stacks.upper / "f", os.O_RDONLY)
    handle = FileHandle(f, fd, view.upper)
    os.unlink(stacks.upper / "f")
    f.state = NodeState.UNLINKED
    attrs = view.attributes(f)
    assert attrs.nlink == 0 and attrs.size == 4  # from its open file
    handle.close()
    assert_errno(errno.ENOENT, view.attributes, f)


def test_a_metacopy_file_reports_its_datas_blocks(stacks: Stacks) -> None:
    data = os.urandom(64 << 10)
    view = stacks.core({"f": data}, upper={"f": ""}).view
    upper_f = stacks.upper / "f"
    os.truncate(upper_f, len(data))  # sparse: no blocks of its own
    os.setxattr(upper_f, METACOPY_XATTR, b"")
    os.chmod(upper_f, 0o600)
    f = node(view, "f")
    assert f.layer is view.upper and f.data is not None and f.data.layer is view.layers[1]
    attrs = view.attributes(f)
    assert os.lstat(upper_f).st_blocks == 0
    assert attrs.blocks == os.lstat(stacks.lowers[0] / "f").st_blocks > 0
    assert attrs.mode == stat.S_IFREG | 0o600 and attrs.size == len(data)
    fd = view.open_data(f, os.O_RDONLY)
    try:
        assert os.pread(fd, 16, 0) == data[:16]  # the data below
        again = view.reopen(f, fd)
        assert os.pread(again, 16, 0) == data[:16]
        os.close(again)
    finally:
        os.close(fd)


def test_a_metacopy_file_without_data_fails_reads_with_eio(stacks: Stacks) -> None:
    view = stacks.core({}, upper={"f": ""}).view
    os.truncate(stacks.upper / "f", 10)
    os.setxattr(stacks.upper / "f", METACOPY_XATTR, b"")
    f = node(view, "f")
    assert f.data is not None and f.data.missing
    assert view.attributes(f).size == 10  # its metadata is shown
    assert_errno(errno.EIO, view.open_data, f, os.O_RDONLY)


def test_readlink(stacks: Stacks) -> None:
    view = stacks.core({"s": Symlink("../target")}).view
    assert view.readlink(node(view, "s")) == b"../target"


# --------------------------------------------------------------------------- xattrs


def test_internal_xattrs_are_hidden(stacks: Stacks) -> None:
    view = stacks.core({"f": File(b"x", xattrs={"user.mine": b"1",
                                                 "trusted.overlay.origin": b"o",
                                                 "user.overlay.x": b"o",
                                                 "trusted.unionfs.probe": b"o"})}).view
    f = node(view, "f")
    assert view.listxattr(f) == ["user.mine"]
    assert view.getxattr(f, "user.mine") == b"1"
    for name in ("trusted.overlay.origin", "user.overlay.x", "trusted.unionfs.probe"):
        assert_errno(errno.ENODATA, view.getxattr, f, name)
    assert_errno(errno.ENODATA, view.getxattr, f, "user.absent")


def test_xattrs_of_a_directory_and_a_symlink(stacks: Stacks) -> None:
    view = stacks.core({"d": DIR, "s": Symlink("d")}).view
    os.setxattr(stacks.lowers[0] / "d", "user.dir", b"d")
    os.setxattr(stacks.lowers[0] / "d", "trusted.overlay.opaque", b"y")
    os.setxattr(stacks.lowers[0] / "s", "trusted.link", b"s", follow_symlinks=False)
    assert view.listxattr(node(view, "d")) == ["user.dir"]
    s = node(view, "s")
    assert view.listxattr(s) == ["trusted.link"]  # the symlink's own, never the target's
    assert_errno(errno.ENODATA, view.getxattr, s, "user.dir")


def test_virtual_xattrs(stacks: Stacks) -> None:
    view = stacks.core({"both": "top lower", "d/x": "x"}, {"both": "bottom", "d/y": "y"},
                       upper={"new": "x", "both": "upper"}).view
    lower0, lower1 = (str(p) for p in stacks.lowers)
    both = node(view, "both")
    assert view.getxattr(both, "user.unionfs.layer") == b"upper"
    assert view.getxattr(both, "user.unionfs.layers") == (
        f"file upper\nfile {lower0}\nfile {lower1}\n".encode())
    assert view.getxattr(both, "user.unionfs.copied-up") == b"yes"
    new = node(view, "new")
    assert view.getxattr(new, "user.unionfs.copied-up") == b"no"
    d = node(view, "d")
    assert view.getxattr(d, "user.unionfs.layer") == lower0.encode()
    assert view.getxattr(d, "user.unionfs.layers") == f"dir {lower0}\ndir {lower1}\n".encode()
    assert view.getxattr(d, "user.unionfs.copied-up") == b"no"
    assert view.getxattr(view.root, "user.unionfs.layers") == (
        f"dir upper\ndir {lower0}\ndir {lower1}\n".encode())
    for name in VIRTUAL_XATTRS:
        assert name not in view.listxattr(both)


# --------------------------------------------------------------------------- changes


def test_need_upper(stacks: Stacks) -> None:
    view = stacks.core({}).view
    assert view.need_upper() is view.upper is view.layers[0]


@pytest.mark.parametrize("how", ["no upper", "read-only"])
def test_need_upper_is_erofs_without_one(stacks: Stacks, how: str) -> None:
    if how == "no upper":
        view = stacks.core({"f": "x"}, writable=False).view
    else:
        view = stacks.core({"f": "x"}, upper={"u": "x"}, read_only=True).view
        assert lookup(view, "u") is not None  # shown, never written
    assert view.upper is None
    assert_errno(errno.EROFS, view.need_upper)


def test_check_new_name() -> None:
    Union.check_new_name(b"fine")
    Union.check_new_name(b"a.wh.b")
    for name in (b".wh.x", b".wh.", b".wh..wh..opq"):
        assert_errno(errno.EINVAL, Union.check_new_name, name)


def test_forget_closes_a_directory_fds(stacks: Stacks) -> None:
    view = stacks.core({"d/f": "x"}, {"d/g": "x"}).view
    d = node(view, "d")
    view.listing(d)  # opens d in both lowers
    fds = [view.fds.get((d.inode, layer.index)) for layer in d.dir_layers]
    assert all(fd is not None for fd in fds)
    view.table.remember(d)
    view.forget(d.inode, 1)
    assert view.table.get(d.inode) is None
    assert all(view.fds.get((d.inode, layer.index)) is None for layer in view.layers)
    for fd in fds:
        assert_errno(errno.EBADF, os.fstat, fd)


def test_statvfs_is_the_uppers(stacks: Stacks) -> None:
    view = stacks.core({}).view
    assert view.statvfs().f_namemax == os.statvfs(stacks.upper).f_namemax == view.name_max
