"""removal.py (`Removal`): unlink, rmdir, rename and RENAME_EXCHANGE. On temp dirs.

What the upper holds afterwards is what kernel overlayfs (redirect_dir=off) leaves: a
char 0/0 whiteout where a lower name was removed or moved away, an opaque directory
where a directory lands on a name a lower directory holds, EXDEV for moving a directory
a lower layer holds. The `stacks` fixture checks that the workdir is empty afterwards.
"""

from __future__ import annotations

import errno
import os
import stat

import pytest
from mounts import DIR, WHITEOUT, HardLink

from unionfs import whiteout
from unionfs.changes import Caller
from unionfs.inodes import NodeState
from unionfs.sysc import RENAME_EXCHANGE, RENAME_NOREPLACE, RENAME_WHITEOUT
from unit.stacks import Stacks, is_char00, is_opaque, lookup, node

ME = Caller(0, 0)


async def _errno(coro: object) -> int | None:
    try:
        await coro  # type: ignore[misc]
    except OSError as exc:
        return exc.errno
    return None


# --------------------------------------------------------------------------- unlink


async def test_unlink_of_a_lower_file_leaves_a_whiteout(stacks: Stacks) -> None:
    c = stacks.core({"d/f": "x", "d/g": "y"})
    view = c.view
    d = node(view, "d")
    f = node(view, "d/f")
    listing = view.listing(d)
    await c.removal.unlink(d, b"f")
    assert is_char00(stacks.upper / "d/f")
    assert sorted(os.listdir(stacks.upper / "d")) == ["f"]
    assert view.lookup(d, b"f") is None and b"f" not in listing
    assert f.state is NodeState.UNLINKED
    assert (stacks.lowers[0] / "d/f").exists()  # a lower layer never changes


async def test_unlink_of_an_upper_only_file(stacks: Stacks) -> None:
    c = stacks.core({}, upper={"f": "x"})
    await c.removal.unlink(c.view.root, b"f")
    assert os.listdir(stacks.upper) == []


@pytest.mark.parametrize("rename_whiteout", [True, False])
async def test_unlink_of_an_upper_file_over_a_lower_one(
        stacks: Stacks, rename_whiteout: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    if not rename_whiteout:
        def refuse(old_dir: int, old: bytes, new_dir: int, new: bytes, flags: int = 0) -> None:
            if flags & RENAME_WHITEOUT:
                raise OSError(errno.EINVAL, "no RENAME_WHITEOUT")
        monkeypatch.setattr(whiteout, "renameat2", refuse)
    c = stacks.core({"f": "lower"}, upper={"f": "upper"})
    await c.removal.unlink(c.view.root, b"f")
    assert is_char00(stacks.upper / "f")
    assert lookup(c.view, "f") is None


async def test_unlink_with_oci_whiteouts(stacks: Stacks) -> None:
    oci = whiteout.Markers("trusted.overlay.", whiteouts=whiteout.WhiteoutKind.OCI)
    c = stacks.core({"f": "x", "g": "y"}, upper={"g": "upper"}, markers=oci)
    await c.removal.unlink(c.view.root, b"f")
    await c.removal.unlink(c.view.root, b"g")
    assert sorted(os.listdir(stacks.upper)) == [".wh.f", ".wh.g"]
    assert c.view.lookup(c.view.root, b"f") is None and c.view.listing(c.view.root) == {}


async def test_unlink_refuses(stacks: Stacks) -> None:
    c = stacks.core({"d": DIR})
    assert await _errno(c.removal.unlink(c.view.root, b"missing")) == errno.ENOENT
    assert await _errno(c.removal.unlink(c.view.root, b"d")) == errno.EISDIR
    ro = stacks.core({"f": "x"}, read_only=True)
    assert await _errno(ro.removal.unlink(ro.view.root, b"f")) == errno.EROFS
    assert await _errno(ro.removal.rmdir(ro.view.root, b"d")) == errno.EROFS
    assert await _errno(ro.removal.rename(ro.view.root, b"f", ro.view.root, b"g", 0)) == (
        errno.EROFS)


async def test_unlink_of_one_name_of_a_lower_link_group(stacks: Stacks) -> None:
    """The inode is copied up with all its names first: its link count lives on disk.
    The node then has no name the kernel knows (homeless) until a lookup of another."""
    c = stacks.core({"a": "shared", "b": HardLink("a")})
    view = c.view
    a = node(view, "a")
    await c.removal.unlink(view.root, b"a")
    assert is_char00(stacks.upper / "a")
    st = os.lstat(stacks.upper / "b")
    assert st.st_nlink == 1 and (stacks.upper / "b").read_bytes() == b"shared"
    assert a.state is NodeState.HOMELESS
    b = node(view, "b")
    assert b is a and a.state is NodeState.LIVE and a.name == b"b"
    assert view.attributes(a).nlink == 1


async def test_unlink_of_a_name_moves_the_node_to_another_known_name(stacks: Stacks) -> None:
    c = stacks.core({"a": "shared", "b": HardLink("a")})
    view = c.view
    a = node(view, "a")
    assert node(view, "b") is a
    await c.removal.unlink(view.root, b"a")
    assert a.state is NodeState.LIVE and (a.parent, a.name) == (view.root, b"b")


# --------------------------------------------------------------------------- rmdir


async def test_rmdir_of_a_lower_directory_leaves_a_whiteout(stacks: Stacks) -> None:
    c = stacks.core({"d": DIR, "e": DIR})
    view = c.view
    d = node(view, "d")
    await c.removal.rmdir(view.root, b"d")
    assert os.listdir(stacks.upper) == ["d"] and is_char00(stacks.upper / "d")
    assert d.state is NodeState.UNLINKED and lookup(view, "d") is None
    assert sorted(view.listing(view.root)) == [b"e"]


async def test_rmdir_of_a_directory_emptied_through_the_union(stacks: Stacks) -> None:
    """Its upper copy holds only whiteouts: it goes, and a whiteout takes its place."""
    c = stacks.core({"d/a": "x", "d/b": "y"})
    view = c.view
    d = node(view, "d")
    await c.removal.unlink(d, b"a")
    await c.removal.unlink(d, b"b")
    assert sorted(os.listdir(stacks.upper / "d")) == ["a", "b"]
    await c.removal.rmdir(view.root, b"d")
    assert is_char00(stacks.upper / "d")


async def test_rmdir_then_mkdir_is_opaque(stacks: Stacks) -> None:
    c = stacks.core({"d/x": "x"})
    view = c.view
    await c.removal.unlink(node(view, "d"), b"x")
    await c.removal.rmdir(view.root, b"d")
    d = await c.changes.mkdir(view.root, b"d", 0o755, ME)
    assert stat.S_ISDIR(os.lstat(stacks.upper / "d").st_mode)
    assert is_opaque(stacks.upper / "d") and os.listdir(stacks.upper / "d") == []
    assert view.listing(d) == {} and view.lookup(d, b"x") is None


async def test_rmdir_of_an_upper_only_directory(stacks: Stacks) -> None:
    c = stacks.core({}, upper={"d": DIR})
    await c.removal.rmdir(c.view.root, b"d")
    assert os.listdir(stacks.upper) == []


async def test_rmdir_refuses(stacks: Stacks) -> None:
    c = stacks.core({"full/f": "x", "f": "x"}, {"merged/g": "x"}, upper={"merged": DIR})
    root = c.view.root
    assert await _errno(c.removal.rmdir(root, b"full")) == errno.ENOTEMPTY
    assert await _errno(c.removal.rmdir(root, b"merged")) == errno.ENOTEMPTY
    assert await _errno(c.removal.rmdir(root, b"f")) == errno.ENOTDIR
    assert await _errno(c.removal.rmdir(root, b"missing")) == errno.ENOENT
    assert os.listdir(stacks.upper) == ["merged"]


# --------------------------------------------------------------------------- rename


async def test_rename_of_a_lower_file(stacks: Stacks) -> None:
    c = stacks.core({"a": "data", "d": DIR})
    view = c.view
    a = node(view, "a")
    d = node(view, "d")
    await c.removal.rename(view.root, b"a", d, b"b", 0)
    assert is_char00(stacks.upper / "a")
    assert (stacks.upper / "d/b").read_bytes() == b"data"
    assert (a.parent, a.name, a.layer) == (d, b"b", view.upper)
    assert lookup(view, "a") is None and view.lookup(d, b"b") is a


async def test_rename_of_an_upper_file_over_a_lower_one(stacks: Stacks) -> None:
    c = stacks.core({"b": "lower b"}, upper={"a": "upper a"})
    view = c.view
    b = node(view, "b")
    await c.removal.rename(view.root, b"a", view.root, b"b", 0)
    assert os.listdir(stacks.upper) == ["b"]
    assert (stacks.upper / "b").read_bytes() == b"upper a"
    assert b.state is NodeState.UNLINKED
    assert sorted(view.listing(view.root)) == [b"b"]


async def test_rename_over_a_whiteout(stacks: Stacks) -> None:
    c = stacks.core({"gone": "old"}, upper={"a": "new", "gone": WHITEOUT})
    await c.removal.rename(c.view.root, b"a", c.view.root, b"gone", 0)
    assert os.listdir(stacks.upper) == ["gone"]
    assert (stacks.upper / "gone").read_bytes() == b"new"


async def test_rename_refuses(stacks: Stacks) -> None:
    c = stacks.core({"lowdir/x": "x", "merged/y": "y", "f": "x", "g": "y", "full/z": "z"},
                    upper={"merged/u": "u", "updir": DIR, "upfile": "x"})
    root, rename = c.view.root, c.removal.rename
    cases = [
        (b"lowdir", b"elsewhere", 0, errno.EXDEV),  # a lower directory: no redirect_dir
        (b"merged", b"elsewhere", 0, errno.EXDEV),  # partly lower
        (b"f", b"g", RENAME_NOREPLACE, errno.EEXIST),
        (b"f", b"g", RENAME_NOREPLACE | RENAME_EXCHANGE, errno.EINVAL),
        (b"f", b"g", 1 << 7, errno.EINVAL),
        (b"f", b".wh.g", 0, errno.EINVAL),
        (b"missing", b"g", 0, errno.ENOENT),
        (b"f", b"updir", 0, errno.EISDIR),
        (b"updir", b"upfile", 0, errno.ENOTDIR),
        (b"updir", b"full", 0, errno.ENOTEMPTY),
    ]
    for old, new, flags, code in cases:
        assert await _errno(rename(root, old, root, new, flags)) == code, (old, new, flags)
    assert sorted(os.listdir(stacks.upper)) == ["merged", "updir", "upfile"]


async def test_rename_of_two_names_of_one_file_does_nothing(stacks: Stacks) -> None:
    c = stacks.core({}, upper={"a": "x", "b": HardLink("a")})
    await c.removal.rename(c.view.root, b"a", c.view.root, b"b", 0)
    assert sorted(os.listdir(stacks.upper)) == ["a", "b"]


async def test_a_directory_moved_onto_a_lower_directorys_name_is_opaque(
        stacks: Stacks) -> None:
    c = stacks.core({"old/x": "x"}, upper={"new/y": "y", "old": WHITEOUT})
    view = c.view
    new = node(view, "new")
    await c.removal.rename(view.root, b"new", view.root, b"old", 0)
    assert sorted(os.listdir(stacks.upper)) == ["old"]  # the whiteout went with the swap
    assert is_opaque(stacks.upper / "old")
    assert sorted(view.listing(new)) == [b"y"] and view.lookup(new, b"x") is None


async def test_a_directory_moved_onto_an_empty_lower_directory(stacks: Stacks) -> None:
    c = stacks.core({"empty": DIR}, upper={"new/y": "y"})
    await c.removal.rename(c.view.root, b"new", c.view.root, b"empty", 0)
    assert os.listdir(stacks.upper) == ["empty"]
    assert is_opaque(stacks.upper / "empty")
    assert os.listdir(stacks.upper / "empty") == ["y"]


async def test_an_upper_directory_moved_to_a_free_name_is_not_opaque(stacks: Stacks) -> None:
    c = stacks.core({}, upper={"a/f": "x"})
    await c.removal.rename(c.view.root, b"a", c.view.root, b"b", 0)
    assert os.listdir(stacks.upper) == ["b"] and not is_opaque(stacks.upper / "b")


# --------------------------------------------------------------------------- exchange


async def test_exchange_of_a_lower_and_an_upper_file(stacks: Stacks) -> None:
    c = stacks.core({"low": "lower data"}, upper={"up": "upper data"})
    view = c.view
    low, up = node(view, "low"), node(view, "up")
    await c.removal.rename(view.root, b"low", view.root, b"up", RENAME_EXCHANGE)
    assert (stacks.upper / "low").read_bytes() == b"upper data"
    assert (stacks.upper / "up").read_bytes() == b"lower data"
    assert sorted(os.listdir(stacks.upper)) == ["low", "up"]  # no whiteout: both stay
    assert (low.name, up.name) == (b"up", b"low")
    assert node(view, "up") is low and node(view, "low") is up


async def test_exchange_refuses(stacks: Stacks) -> None:
    c = stacks.core({"lowdir": DIR, "f": "x"})
    root = c.view.root
    assert await _errno(c.removal.rename(root, b"f", root, b"none", RENAME_EXCHANGE)) == (
        errno.ENOENT)
    assert await _errno(c.removal.rename(root, b"lowdir", root, b"f", RENAME_EXCHANGE)) == (
        errno.EXDEV)


async def test_exchange_puts_a_directory_on_a_lower_directorys_name(stacks: Stacks) -> None:
    c = stacks.core({"a/x": "x"}, upper={"a": WHITEOUT, "b/y": "y"})
    view = c.view
    await c.changes.mkdir(view.root, b"a", 0o755, ME)  # opaque: a whiteout was there
    os.setxattr(stacks.upper / "a", "user.was", b"a")
    b = node(view, "b")
    assert not is_opaque(stacks.upper / "b")
    await c.removal.rename(view.root, b"a", view.root, b"b", RENAME_EXCHANGE)
    # "a" now holds the old "b", which lands on the lower "a": opaque.
    assert os.getxattr(stacks.upper / "b", "user.was") == b"a"
    assert is_opaque(stacks.upper / "a") and os.listdir(stacks.upper / "a") == ["y"]
    assert node(view, "a") is b and view.lookup(b, b"x") is None
