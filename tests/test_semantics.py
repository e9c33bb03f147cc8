"""Read-side semantics of the union: lookup, whiteouts, opaque dirs, readdir, stat.

Parametrized over ``backend``: kernel overlayfs is the reference, unionfs must agree.
Tests of what only unionfs reads (OCI ``.wh.`` markers, user.* opaque xattrs, a stray
whiteout in an upper-only dir) run on unionfs alone and compare with the expected tree.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from mounts import (
    DIR,
    OPAQUE,
    WHITEOUT,
    Dir,
    File,
    HardLink,
    Symlink,
    Xattr,
    assert_errno,
    build,
    readdir_names,
)

pytestmark = pytest.mark.usefixtures("mount_guard")

unionfs_only = pytest.mark.parametrize("backend", ["unionfs"])


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


def assert_absent(path: Path) -> None:
    """Neither lookup (stat, lstat, open) nor its parent's readdir may find ``path``."""
    assert_errno(errno.ENOENT, os.lstat, path)
    assert_errno(errno.ENOENT, os.stat, path)
    assert_errno(errno.ENOENT, os.open, path, os.O_RDONLY)
    assert_errno(errno.ENOENT, os.readlink, path)
    parent = path.parent
    if parent.is_dir():
        assert path.name not in os.listdir(parent)


def assert_listing_is_lookup(path: Path) -> None:
    """Every name readdir gives is found by lookup, none is listed twice, '.' and '..' are there."""
    names = readdir_names(path)
    assert len(names) == len(set(names)), f"duplicates in {path}: {names}"
    assert b"." in names and b".." in names
    for n in names:
        os.lstat(os.path.join(os.fsencode(path), n))


# ---------------------------------------------------------------------------
# Lookup


def test_lookup_is_top_down(union, tmp_path):
    up = build(tmp_path / "up", {"f": "upper", "d/u": "u"})
    l1 = build(tmp_path / "l1", {"f": "l1", "g": "l1", "d/a": "l1a", "only1": "1"})
    l2 = build(tmp_path / "l2", {"f": "l2", "g": "l2", "h": "l2", "d/a": "l2a", "d/b": "l2b"})
    m = union(l1, l2, upper=up)
    assert (m / "f").read_text() == "upper"
    assert (m / "g").read_text() == "l1"
    assert (m / "h").read_text() == "l2"
    assert (m / "d/a").read_text() == "l1a"
    assert (m / "d/b").read_text() == "l2b"
    assert (m / "d/u").read_text() == "u"
    assert listing(m.mnt) == ["d", "f", "g", "h", "only1"]
    assert listing(m / "d") == ["a", "b", "u"]
    assert_listing_is_lookup(m.mnt)
    assert_listing_is_lookup(m / "d")


def test_lookup_of_missing_names(union, tmp_path):
    l1 = build(tmp_path / "l1", {"d/a": "a", "f": "f"})
    m = union(l1)
    assert_absent(m / "nope")
    assert_absent(m / "d/nope")
    assert_errno(errno.ENOENT, os.stat, m / "nope/deeper")
    assert_errno(errno.ENOTDIR, os.stat, m / "f/below")


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_whiteout_hides_lower_names(union, tmp_path, where):
    l2 = build(
        tmp_path / "l2",
        {"f": "x", "keep": "k", "d/a": "a", "d/b": "b", "gone/x": "x", "ln": Symlink("keep")},
    )
    marks = {"f": WHITEOUT, "d/a": WHITEOUT, "gone": WHITEOUT, "ln": WHITEOUT}
    if where == "lower":
        m = union(build(tmp_path / "l1", marks), l2)
    else:
        m = union(l2, upper=build(tmp_path / "up", marks))
    assert listing(m.mnt) == ["d", "keep"]
    assert listing(m / "d") == ["b"]
    for name in ("f", "d/a", "gone", "ln"):
        assert_absent(m / name)
    assert_errno(errno.ENOENT, os.stat, m / "gone/x")
    assert_listing_is_lookup(m.mnt)
    assert_listing_is_lookup(m / "d")


def test_whiteout_in_middle_layer_only_hides_below(union, tmp_path):
    l1 = build(tmp_path / "l1", {"f": "top"})
    l2 = build(tmp_path / "l2", {"f": WHITEOUT, "g": WHITEOUT})
    l3 = build(tmp_path / "l3", {"f": "bottom", "g": "bottom"})
    m = union(l1, l2, l3)
    assert (m / "f").read_text() == "top"
    assert_absent(m / "g")
    assert listing(m.mnt) == ["f"]


@pytest.mark.parametrize("where", ["lower", "upper"])
def test_opaque_dir_stops_the_merge(union, tmp_path, where):
    l2 = build(
        tmp_path / "l2", {"o/hidden": "h", "o/sub/deep": "d", "o/same": "l2", "plain/x": "x"}
    )
    marks = {"o": OPAQUE, "o/mine": "m", "o/same": "top", "plain/y": "y"}
    if where == "lower":
        m = union(build(tmp_path / "l1", marks), l2)
    else:
        m = union(l2, upper=build(tmp_path / "up", marks))
    assert listing(m / "o") == ["mine", "same"]
    assert (m / "o/same").read_text() == "top"
    assert_absent(m / "o/hidden")
    assert_absent(m / "o/sub")
    assert_errno(errno.ENOENT, os.stat, m / "o/sub/deep")
    assert listing(m / "plain") == ["x", "y"]
    assert_listing_is_lookup(m / "o")
    # a name the listing does not show can be created afresh
    fd = os.open(m / "o/hidden", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.close(fd)
    assert (m / "o/hidden").read_bytes() == b""


def test_opaque_in_middle_of_three_layers(union, tmp_path):
    l1 = build(tmp_path / "l1", {"o/a": "a"})
    l2 = build(tmp_path / "l2", {"o": OPAQUE, "o/b": "b"})
    l3 = build(tmp_path / "l3", {"o/c": "c", "o/a": "l3"})
    m = union(l1, l2, l3)
    assert listing(m / "o") == ["a", "b"]
    assert (m / "o/a").read_text() == "a"
    assert_absent(m / "o/c")


def test_nondir_hides_lower_dir(union, tmp_path):
    l1 = build(tmp_path / "l1", {"d": "now a file", "s": Symlink("d"), "p": WHITEOUT})
    l2 = build(tmp_path / "l2", {"d/x": "x", "s/y": "y", "p/z": "z"})
    m = union(l1, l2)
    assert stat.S_ISREG(os.lstat(m / "d").st_mode)
    assert (m / "d").read_text() == "now a file"
    assert_errno(errno.ENOTDIR, os.lstat, m / "d/x")
    assert stat.S_ISLNK(os.lstat(m / "s").st_mode)
    assert_errno(errno.ENOTDIR, os.lstat, m / "s/y")
    assert listing(m.mnt) == ["d", "s"]


def test_dir_hides_lower_nondir(union, tmp_path):
    l1 = build(tmp_path / "l1", {"d/x": "x", "e": DIR})
    l2 = build(tmp_path / "l2", {"d": "file below", "e": Symlink("/")})
    m = union(l1, l2)
    assert listing(m / "d") == ["x"]
    assert listing(m / "e") == []
    assert stat.S_ISDIR(os.lstat(m / "e").st_mode)


def test_markers_are_invisible(union, tmp_path):
    l1 = build(
        tmp_path / "l1", {"o": OPAQUE, "o/a": "a", "w": WHITEOUT, "d/w2": WHITEOUT, "d/k": "k"}
    )
    l2 = build(tmp_path / "l2", {"o/b": "b", "w": "w", "d/w2": "w2"})
    m = union(l1, l2)
    for d in (m.mnt, m / "o", m / "d"):
        for e in os.scandir(d):
            st = e.stat(follow_symlinks=False)
            assert not (stat.S_ISCHR(st.st_mode) and st.st_rdev == 0), e.path
    assert "trusted.overlay.opaque" not in os.listxattr(m / "o")
    assert not [x for x in os.listxattr(m / "o") if x.startswith("trusted.overlay.")]
    assert_errno(errno.ENODATA, os.getxattr, m / "o", "trusted.overlay.opaque")


# ---------------------------------------------------------------------------
# What only unionfs reads: OCI markers, user.* opaque xattrs, stray whiteouts


@unionfs_only
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_oci_markers(union, tmp_path, where):
    l2 = build(
        tmp_path / "l2",
        {"f": "x", "g": "g", "d/a": "a", "d/b": "b", "o/old": "old", "o/sub/x": "x", "gone/x": "x"},
    )
    marks = {".wh.f": "", "d/.wh.a": "", "o/.wh..wh..opq": "", "o/new": "n", ".wh.gone": ""}
    if where == "lower":
        m = union(build(tmp_path / "l1", marks), l2)
    else:
        m = union(l2, upper=build(tmp_path / "up", marks))
    assert listing(m.mnt) == ["d", "g", "o"]
    assert listing(m / "d") == ["b"]
    assert listing(m / "o") == ["new"]
    for name in (
        "f",
        "gone",
        "d/a",
        "o/old",
        "o/sub",
        ".wh.f",
        ".wh.gone",
        "d/.wh.a",
        "o/.wh..wh..opq",
    ):
        assert_absent(m / name)
    assert_listing_is_lookup(m / "o")


@unionfs_only
def test_oci_marker_without_lower_target_is_hidden(union, tmp_path):
    l1 = build(tmp_path / "l1", {".wh.nothing": "", "e/.wh..wh..opq": "", "e/f": "f"})
    m = union(l1)
    assert listing(m.mnt) == ["e"]
    assert listing(m / "e") == ["f"]
    assert_absent(m / ".wh.nothing")
    assert_absent(m / "e/.wh..wh..opq")


@unionfs_only
@pytest.mark.parametrize(
    "key", ["trusted.overlay.opaque", "user.overlay.opaque", "user.fuseoverlayfs.opaque"]
)
@pytest.mark.parametrize("where", ["lower", "upper"])
def test_opaque_xattr_variants(union, tmp_path, key, where):
    l2 = build(tmp_path / "l2", {"o/hidden": "h", "n/seen": "s"})
    marks = {"o": Xattr({key: b"y"}), "o/mine": "m", "n": Xattr({key: b"n"}), "n/also": "a"}
    if where == "lower":
        m = union(build(tmp_path / "l1", marks), l2)
    else:
        m = union(l2, upper=build(tmp_path / "up", marks))
    assert listing(m / "o") == ["mine"]
    assert_absent(m / "o/hidden")
    # only the value "y" makes a directory opaque
    assert listing(m / "n") == ["also", "seen"]


@unionfs_only
def test_stray_whiteout_in_upper_only_dir_is_hidden(union, tmp_path):
    # The kernel lists such a whiteout (it reads an upper-only dir as is) but cannot look it
    # up; unionfs hides it in both: a name readdir shows must be found by lookup.
    up = build(tmp_path / "up", {"pure/ghost": WHITEOUT, "pure/real": "r"})
    m = union(build(tmp_path / "l1", {"x": "x"}), upper=up)
    assert listing(m / "pure") == ["real"]
    assert_absent(m / "pure/ghost")
    assert_listing_is_lookup(m / "pure")


# ---------------------------------------------------------------------------
# readdir


def test_readdir_union_once_per_name(union, tmp_path):
    up = build(tmp_path / "up", {"d/c": "u", "d/f": "u", "d/sub/u": "u"})
    l1 = build(tmp_path / "l1", {"d/a": "1", "d/b": "1", "d/c": "1", "d/sub/x": "1"})
    l2 = build(
        tmp_path / "l2", {"d/b": "2", "d/c": "2", "d/e": "2", "d/sub/x": "2", "d/s": Symlink("a")}
    )
    m = union(l1, l2, upper=up)
    names = readdir_names(m / "d")
    assert sorted(names) == sorted([b".", b"..", b"a", b"b", b"c", b"e", b"f", b"s", b"sub"])
    assert_listing_is_lookup(m.mnt)
    assert_listing_is_lookup(m / "d/sub")
    assert sorted(readdir_names(m / "d/sub")) == [b".", b"..", b"u", b"x"]


def test_readdir_types_and_inodes_match_stat(union, tmp_path):
    up = build(tmp_path / "up", {"d/uf": "u", "d/ud": DIR})
    l1 = build(tmp_path / "l1", {"d/f": "f", "d/s": Symlink("f"), "d/sub": DIR, "d/e": DIR})
    l2 = build(tmp_path / "l2", {"d/g": "g", "d/sub/x": "x"})
    m = union(l1, l2, upper=up)
    kinds = {stat.S_IFREG: 8, stat.S_IFDIR: 4, stat.S_IFLNK: 10}
    with Dir(m / "d") as d:
        entries = d.read_all()
    for e in entries:
        if e.name in (b".", b".."):
            continue
        st = os.lstat(os.path.join(os.fsencode(m / "d"), e.name))
        if e.type != 0:  # DT_UNKNOWN is allowed
            assert e.type == kinds[stat.S_IFMT(st.st_mode)], e
        assert e.ino == st.st_ino, (e, st.st_ino)


def _seek_scenario(m, d: Path):
    """Read part of ``d``, change it, seek back: stable names come exactly once."""
    with Dir(d) as dirp:
        first = dirp.read_all_with_positions()
        names = [n for _, n in first]
        assert len(names) == len(set(names))
        # change the directory while it is open
        removed = {b"l1_03", b"l2_05", b"up_07", b"l1_30", b"l2_31", b"both_10"}
        added = {b"new_%02d" % i for i in range(10)}
        for n in removed:
            os.unlink(os.path.join(os.fsencode(d), n))
        for n in added:
            os.close(os.open(os.path.join(os.fsencode(d), n), os.O_CREAT | os.O_WRONLY, 0o644))
        stable = set(names) - removed - {b".", b".."}

        # seek back to the middle: what follows is what followed there before
        k = len(first) // 2
        pos_k = first[k][0]
        dirp.seek(pos_k)
        rest = [e.name for e in dirp.read_all()]
        assert len(rest) == len(set(rest)), rest
        before = {n for _, n in first[:k]}
        after = {n for _, n in first[k:]}
        assert (after & stable) <= set(rest), sorted((after & stable) - set(rest))
        assert not (before & stable & set(rest)), sorted(before & stable & set(rest))

        # telldir positions taken earlier stay valid: seek to each, read one entry
        # (not position 0: seeking there may rewind, which shows the dir as it is now)
        for pos, name in first[1::7]:
            if name in removed or pos == 0:
                continue
            dirp.seek(pos)
            e = dirp.read()
            assert e is not None and e.name == name, (pos, name, e)

        # rewinddir shows the directory as it is now
        dirp.rewind()
        now = [e.name for e in dirp.read_all()]
        assert sorted(now) == sorted(stable | added | {b".", b".."})


def test_telldir_seekdir_stable_while_changing(union, tmp_path):
    l2 = {f"d/l2_{i:02d}": "x" for i in range(40)}
    l2.update({f"d/both_{i:02d}": "2" for i in range(20)})
    l1 = {f"d/l1_{i:02d}": "x" for i in range(40)}
    l1.update({f"d/both_{i:02d}": "1" for i in range(10, 30)})
    up = {f"d/up_{i:02d}": "x" for i in range(20)}
    m = union(
        build(tmp_path / "l1", l1), build(tmp_path / "l2", l2), upper=build(tmp_path / "up", up)
    )
    _seek_scenario(m, m / "d")


def test_readdir_continues_across_changes(union, tmp_path):
    l2 = {f"d/l2_{i:03d}": "x" for i in range(150)}
    l1 = {f"d/l1_{i:03d}": "x" for i in range(150)}
    m = union(build(tmp_path / "l1", l1), build(tmp_path / "l2", l2))
    d = m / "d"
    with Dir(d) as dirp:
        seen = []
        for _ in range(100):
            e = dirp.read()
            assert e is not None
            seen.append(e.name)
        removed = {b"l1_%03d" % i for i in range(120, 140)} | {b"l2_%03d" % i for i in range(5)}
        for n in removed:
            os.unlink(os.path.join(os.fsencode(d), n))
        for i in range(30):
            os.mkdir(os.path.join(os.fsencode(d), b"nd_%02d" % i))
        seen += [e.name for e in dirp.read_all()]
    assert len(seen) == len(set(seen)), "a name came twice"
    stable = {b"l1_%03d" % i for i in range(150)} | {b"l2_%03d" % i for i in range(150)}
    stable -= removed
    assert stable <= set(seen), sorted(stable - set(seen))[:10]


def test_readdir_of_big_merged_dir(union, tmp_path):
    l1 = {f"d/{i:04d}": "" for i in range(0, 1500, 2)}
    l2 = {f"d/{i:04d}": "" for i in range(0, 1500, 3)}
    m = union(build(tmp_path / "l1", l1), build(tmp_path / "l2", l2))
    names = readdir_names(m / "d")
    want = {f"{i:04d}".encode() for i in range(1500) if i % 2 == 0 or i % 3 == 0}
    assert len(names) == len(want) + 2
    assert set(names) == want | {b".", b".."}


# ---------------------------------------------------------------------------
# stat


def test_one_st_dev_for_the_whole_mount(union, tmp_path):
    up = build(tmp_path / "up", {"u": "u", "d/u": "u"})
    l1 = build(tmp_path / "l1", {"a": "a", "d/a": "a", "e/x": "x", "s": Symlink("a")})
    l2 = build(tmp_path / "l2", {"b": "b", "d/b": "b", "f/y": "y"})
    m = union(l1, l2, upper=up)
    dev = os.stat(m.mnt).st_dev
    for p in ["u", "d", "d/u", "a", "d/a", "e", "e/x", "s", "b", "d/b", "f", "f/y"]:
        assert os.lstat(m / p).st_dev == dev, p
    (m / "b").write_text("copied up")
    (m / "new").write_text("new")
    for p in ["b", "new", "f/y"]:
        assert os.lstat(m / p).st_dev == dev, p


def test_st_ino_stable_across_copy_up(union, tmp_path):
    l1 = build(tmp_path / "l1", {"d/sub/f": "data", "g": "g", "h": "h"})
    m = union(l1)
    before = {p: os.lstat(m / p).st_ino for p in ["d", "d/sub", "d/sub/f", "g", "h"]}
    with open(m / "d/sub/f", "ab") as f:
        f.write(b" more")
    os.chmod(m / "g", 0o600)
    os.setxattr(m / "h", "user.x", b"1")
    after = {p: os.lstat(m / p).st_ino for p in before}
    assert before == after
    assert (m / "d/sub/f").read_bytes() == b"data more"
    assert m.upper is not None and (m.upper / "d/sub/f").exists()


def test_distinct_files_have_distinct_inodes(union, tmp_path):
    up = build(tmp_path / "up", {"u1": "x", "u2": "x"})
    l1 = build(tmp_path / "l1", {"a": "x", "b": "x", "d/c": "x"})
    l2 = build(tmp_path / "l2", {"e": "x", "d/f": "x"})
    m = union(l1, l2, upper=up)
    (m / "n").write_text("x")
    paths = ["u1", "u2", "a", "b", "d/c", "e", "d/f", "n", "d"]
    inos = [os.lstat(m / p).st_ino for p in paths]
    assert len(set(inos)) == len(inos), dict(zip(paths, inos))


def test_lower_hard_links_share_inode(union, tmp_path):
    l1 = build(
        tmp_path / "l1", {"a": "data", "b": HardLink("a"), "sub/c": HardLink("a"), "other": "data"}
    )
    m = union(l1)
    sts = [os.lstat(m / p) for p in ("a", "b", "sub/c")]
    assert len({s.st_ino for s in sts}) == 1
    assert [s.st_nlink for s in sts] == [3, 3, 3]
    assert os.lstat(m / "other").st_ino != sts[0].st_ino
    assert os.lstat(m / "other").st_nlink == 1


def test_hard_link_copy_up_keeps_the_link(union, tmp_path):
    l1 = build(tmp_path / "l1", {"a": "data", "b": HardLink("a"), "sub/c": HardLink("a")})
    m = union(l1)
    ino = os.lstat(m / "a").st_ino
    with open(m / "b", "ab") as f:
        f.write(b"+more")
    for p in ("a", "b", "sub/c"):
        assert (m / p).read_bytes() == b"data+more", p
        st = os.lstat(m / p)
        assert st.st_ino == ino, p
        assert st.st_nlink == 3, p
    os.chmod(m / "sub/c", 0o600)
    for p in ("a", "b"):
        assert stat.S_IMODE(os.lstat(m / p).st_mode) == 0o600, p
    assert (l1 / "a").read_bytes() == b"data"


def test_unlink_one_name_of_lower_hard_link(union, tmp_path):
    l1 = build(tmp_path / "l1", {"a": "data", "b": HardLink("a"), "c": HardLink("a")})
    m = union(l1)
    os.unlink(m / "b")
    assert os.lstat(m / "a").st_nlink == 2
    assert os.lstat(m / "c").st_nlink == 2
    os.unlink(m / "a")
    assert os.lstat(m / "c").st_nlink == 1
    assert (m / "c").read_text() == "data"


def test_lower_metadata_shown_unchanged(union, tmp_path):
    l1 = build(
        tmp_path / "l1",
        {
            "f": File(b"contents", mode=0o640, uid=1234, gid=4321, mtime=1_000_000_000.5),
            "x": File(b"#!/bin/sh\n", mode=0o4755, uid=0, gid=0, mtime=1_200_000_000),
            "s": Symlink("f"),
            "d": DIR,
        },
    )
    os.chown(l1 / "d", 99, 98)
    os.chmod(l1 / "d", 0o1777)
    os.utime(l1 / "d", (1_100_000_000, 1_100_000_000))
    m = union(l1)
    for p in ("f", "x", "s", "d"):
        a, b = os.lstat(l1 / p), os.lstat(m / p)
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) == (
            b.st_mode,
            b.st_uid,
            b.st_gid,
            b.st_mtime_ns,
        ), p
        if not stat.S_ISDIR(a.st_mode):
            assert (a.st_size, a.st_nlink, a.st_blocks) == (b.st_size, b.st_nlink, b.st_blocks), p
    assert (m / "f").read_bytes() == b"contents"


def test_symlinks_read_through(union, tmp_path):
    l1 = build(
        tmp_path / "l1",
        {
            "rel": Symlink("d/target"),
            "abs": Symlink("/nonexistent/x"),
            "dangling": Symlink("nope"),
            "long": Symlink("a" * 1000),
        },
    )
    l2 = build(tmp_path / "l2", {"d/target": "hello"})
    m = union(l1, l2)
    assert os.readlink(m / "rel") == "d/target"
    assert (m / "rel").read_text() == "hello"
    assert os.readlink(m / "abs") == "/nonexistent/x"
    assert os.readlink(m / "long") == "a" * 1000
    assert os.lstat(m / "long").st_size == 1000
    assert_errno(errno.ENOENT, os.stat, m / "dangling")


def test_read_only_mount_reads(union, tmp_path):
    l1 = build(tmp_path / "l1", {"f": "top", "d/a": "a"})
    l2 = build(tmp_path / "l2", {"f": "bottom", "d/b": "b", "w": "w"})
    m = union(l1, l2, upper=False)
    assert (m / "f").read_text() == "top"
    assert listing(m / "d") == ["a", "b"]
    one = union(l2, upper=False, name="one")
    assert listing(one.mnt) == ["d", "f", "w"]
    assert_errno(errno.EROFS, os.mkdir, one / "x")
    assert_errno(errno.EROFS, os.open, m / "n", os.O_CREAT | os.O_WRONLY, 0o644)


def test_directory_link_counts(union, tmp_path):
    up = build(tmp_path / "up", {"u/a": DIR, "u/b": DIR, "u/f": "f", "m/ua": DIR})
    l1 = build(tmp_path / "l1", {"lo/a": DIR, "lo/b": DIR, "lo/c": DIR, "m/la": DIR})
    m = union(l1, upper=up)
    # a directory from one layer has its own count; a merged one reports 1, as the
    # kernel does (counting the union's subdirectories would need a listing)
    assert os.lstat(m / "u").st_nlink == 4
    assert os.lstat(m / "lo").st_nlink == 5
    assert os.lstat(m / "m").st_nlink == 1
