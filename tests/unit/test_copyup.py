"""copyup.py: copy-up whole (files, directories, metadata only, the later fill, hard-link
groups), its per-node lock, and the steps on disk (holes, xattrs, the workdir).

What a copy leaves in the upper is what kernel overlayfs leaves: the entry with its
mode, owner, times and user xattrs, never the union's own xattrs, the upper parent's
times unchanged; a metadata-only copy is a sparse file marked trusted.overlay.metacopy.
The `stacks` fixture checks after every test that the workdir is empty.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from pathlib import Path

import pytest
import trio
from mounts import DIR, FIFO, OPAQUE, WHITEOUT, File, HardLink, Symlink, assert_errno, build

from unionfs import copyup, whiteout
from unionfs.copyup import Data
from unionfs.inodes import key_of
from unit.stacks import METACOPY_XATTR, OPAQUE_XATTR, Stacks, has_xattr, node, open_fds

OLD = 1_000_000_000  # a time in the past, in seconds
XATTRS = {"user.mine": b"kept", "trusted.mine": b"kept too", "trusted.overlay.origin": b"o",
          "user.overlay.redirect": b"/r"}


def _meta(path: Path) -> tuple[int, ...]:
    """What a copy keeps: type and mode, owner, times (read a copy's before reading its
    data: a read moves the atime)."""
    st = os.lstat(path)
    return (st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns, st.st_atime_ns)


def _user_xattrs(path: Path) -> dict[str, bytes]:
    return {name: os.getxattr(path, name, follow_symlinks=False)
            for name in os.listxattr(path, follow_symlinks=False)}


def _age(*paths: Path) -> None:
    for path in paths:
        os.utime(path, (OLD, OLD), follow_symlinks=False)


# --------------------------------------------------------------------------- files


async def test_copy_up_of_a_file(stacks: Stacks) -> None:
    c = stacks.core({"d/e/f": File(b"data" * 1000, mode=0o4750, uid=12, gid=34, mtime=OLD,
                                   xattrs=XATTRS)})
    lower = stacks.lowers[0]
    os.chown(lower / "d", 56, 78)
    os.chmod(lower / "d", 0o751)
    _age(lower / "d/e", lower / "d", stacks.upper)
    view = c.view
    f = node(view, "d/e/f")
    inode, version = f.inode, f.version
    listing = view.listing(node(view, "d/e"))
    before = {rel: _meta(lower / rel) for rel in ("d", "d/e", "d/e/f")}
    await c.copier.copy_up(f)
    up = stacks.upper / "d/e/f"
    # The parents came first, with their own metadata; the upper's times are unchanged.
    assert {rel: _meta(stacks.upper / rel) for rel in before} == before
    assert os.stat(stacks.upper).st_mtime_ns == OLD * 10**9
    assert stat.S_IMODE(os.lstat(up).st_mode) == 0o4750  # chown first: set-id bits stay
    assert _user_xattrs(up) == {"user.mine": b"kept", "trusted.mine": b"kept too"}
    assert up.read_bytes() == b"data" * 1000
    # The view: same inode number, now in the upper, its listing updated in place.
    assert f.layer is view.upper and f.inode == inode and f.version > version
    assert view.table.by_key(key_of(os.lstat(up))) is f
    assert listing[b"f"].layer is view.upper
    await c.copier.copy_up(f)  # already there: nothing happens
    assert up.read_bytes() == b"data" * 1000


async def test_a_second_copy_up_into_an_existing_upper_dir_keeps_its_times(
        stacks: Stacks) -> None:
    c = stacks.core({"d/a": "a", "d/b": "b"})
    view = c.view
    await c.copier.copy_up(node(view, "d/a"))
    _age(stacks.upper / "d")
    await c.copier.copy_up(node(view, "d/b"))
    assert os.stat(stacks.upper / "d").st_mtime_ns == OLD * 10**9
    assert sorted(os.listdir(stacks.upper / "d")) == ["a", "b"]


@pytest.mark.parametrize("what", ["symlink", "fifo", "chardev", "empty"])
async def test_copy_up_of_other_kinds(stacks: Stacks, what: str) -> None:
    spec = {"symlink": Symlink("../some/target"), "fifo": FIFO, "empty": File(b"", mode=0o600),
            "chardev": "placeholder"}[what]
    c = stacks.core({"x": spec})
    lower = stacks.lowers[0] / "x"
    if what == "chardev":
        lower.unlink()
        os.mknod(lower, stat.S_IFCHR | 0o620, os.makedev(1, 3))
    os.lchown(lower, 5, 6)
    _age(lower)
    before = _meta(lower)
    await c.copier.copy_up(node(c.view, "x"))
    up = stacks.upper / "x"
    assert _meta(up) == before
    if what == "symlink":
        assert os.readlink(up) == "../some/target"
    elif what == "chardev":
        assert os.lstat(up).st_rdev == os.makedev(1, 3)
    elif what == "empty":
        assert up.read_bytes() == b""


async def test_copy_up_drop_leaves_no_data(stacks: Stacks) -> None:
    c = stacks.core({"f": File(b"x" * 5000, mode=0o640, uid=3, mtime=OLD)})
    f = node(c.view, "f")
    await c.copier.copy_up(f, Data.DROP)
    up = stacks.upper / "f"
    assert os.lstat(up).st_size == 0
    st = os.lstat(up)
    assert (st.st_mode, st.st_uid, st.st_mtime_ns) == (stat.S_IFREG | 0o640, 3, OLD * 10**9)
    assert f.data is None and not has_xattr(up, METACOPY_XATTR)


async def test_copy_up_of_a_metadata_change_copies_metadata_only(stacks: Stacks) -> None:
    data = os.urandom(100_000)
    c = stacks.core({"f": File(data, mode=0o640, mtime=OLD, xattrs={"user.a": b"1"})})
    view = c.view
    f = node(view, "f")
    before = _meta(stacks.lowers[0] / "f")
    await c.copier.copy_up(f, Data.LATER)
    up = stacks.upper / "f"
    assert _meta(up) == before
    st = os.lstat(up)
    assert st.st_size == len(data) and st.st_blocks == 0  # sparse
    assert os.getxattr(up, METACOPY_XATTR) == b""
    assert os.getxattr(up, "user.a") == b"1"
    assert f.layer is view.upper and f.data is not None
    assert f.data.layer is view.layers[1] and f.data.name == b"f"
    fd = view.open_data(f, os.O_RDONLY)  # reads the data below
    try:
        assert os.pread(fd, len(data), 0) == data
    finally:
        os.close(fd)
    # Opened for writing: the data is filled in place, then the mark goes.
    ino = st.st_ino
    await c.copier.copy_up(f, Data.COPY)
    st = os.lstat(up)
    assert st.st_ino == ino and up.read_bytes() == data
    assert not has_xattr(up, METACOPY_XATTR)
    assert st.st_mtime_ns == OLD * 10**9  # the fill is no change of the file
    assert f.data is None


async def test_a_metadata_only_copy_dropped_later(stacks: Stacks) -> None:
    c = stacks.core({"f": "x" * 100})
    f = node(c.view, "f")
    await c.copier.copy_up(f, Data.LATER)
    await c.copier.copy_up(f, Data.DROP)  # O_TRUNC: the mark goes, no data is copied
    up = stacks.upper / "f"
    assert not has_xattr(up, METACOPY_XATTR) and os.lstat(up).st_blocks == 0
    assert f.data is None


@pytest.mark.parametrize("case", ["metacopy off", "empty", "hard-linked"])
async def test_when_a_metadata_change_copies_the_data(stacks: Stacks, case: str) -> None:
    spec: dict[str, object] = {"f": "" if case == "empty" else "data"}
    if case == "hard-linked":
        spec["g"] = HardLink("f")
    c = stacks.core(spec, metacopy=case != "metacopy off")
    f = node(c.view, "f")
    await c.copier.copy_up(f, Data.LATER)
    up = stacks.upper / "f"
    assert not has_xattr(up, METACOPY_XATTR) and f.data is None
    assert up.read_bytes() == (b"" if case == "empty" else b"data")


async def test_metadata_only_in_the_userxattr_format(stacks: Stacks) -> None:
    c = stacks.core({"f": "data"}, markers=whiteout.USERXATTR)
    await c.copier.copy_up(node(c.view, "f"), Data.LATER)
    assert os.listxattr(stacks.upper / "f") == ["user.overlay.metacopy"]


async def test_the_data_of_a_lower_metacopy_file_comes_from_below(stacks: Stacks) -> None:
    c = stacks.core({"f": ""}, {"f": "the data"})
    top = stacks.lowers[0] / "f"
    os.truncate(top, 8)
    os.setxattr(top, METACOPY_XATTR, b"")
    f = node(c.view, "f")
    assert f.data is not None and f.data.layer is c.view.layers[2]
    await c.copier.copy_up(f, Data.COPY)
    up = stacks.upper / "f"
    assert up.read_bytes() == b"the data" and not has_xattr(up, METACOPY_XATTR)


# --------------------------------------------------------------------------- directories


async def test_copy_up_of_a_directory(stacks: Stacks) -> None:
    c = stacks.core({"d": OPAQUE, "d/f": "x"}, {"d/g": "hidden by the opaque d"})
    lower = stacks.lowers[0] / "d"
    os.setxattr(lower, "user.mine", b"kept")
    os.setxattr(lower, "user.overlay.opaque", b"y")
    os.chown(lower, 9, 8)
    os.chmod(lower, 0o2710)
    _age(lower)
    view = c.view
    d = node(view, "d")
    assert d.dir_layers == (view.layers[1],)
    before = _meta(lower)
    await c.copier.copy_up(d)
    up = stacks.upper / "d"
    assert _meta(up) == before
    assert os.listdir(up) == []  # the entries stay below
    assert _user_xattrs(up) == {"user.mine": b"kept"}  # opaque marks are the union's
    assert d.layer is view.upper and d.dir_layers == (view.upper, view.layers[1])
    assert view.table.by_key(key_of(os.stat(up))) is d
    assert sorted(view.listing(d)) == [b"f"]


# --------------------------------------------------------------------------- hard links


async def test_a_link_group_stays_one_inode(stacks: Stacks) -> None:
    c = stacks.core(
        {"b": "shadowing", "gone": WHITEOUT},
        {"a": "shared", "b": HardLink("a"), "d/c": HardLink("a"), "gone": HardLink("a"),
         "other": "x"},
    )
    view = c.view
    _age(stacks.upper)
    a = node(view, "a")
    await c.copier.copy_up(a)
    up = stacks.upper
    st = os.lstat(up / "a")
    assert os.lstat(up / "d/c").st_ino == st.st_ino and st.st_nlink == 2
    # Shadowed by a higher layer, or whited out: not a name of this file in the view.
    assert not (up / "b").exists() and not (up / "gone").exists()
    assert sorted(os.listdir(up)) == ["a", "d"]
    assert os.stat(up).st_mtime_ns == OLD * 10**9
    assert node(view, "d/c") is a


async def test_keep_link_group(stacks: Stacks) -> None:
    c = stacks.core({"a": "x", "b": HardLink("a"), "single": "x", "d": DIR})
    view = c.view
    await c.copier.keep_link_group(node(view, "single"))
    await c.copier.keep_link_group(node(view, "d"))
    assert os.listdir(stacks.upper) == []
    await c.copier.keep_link_group(node(view, "a"))
    assert os.lstat(stacks.upper / "a").st_ino == os.lstat(stacks.upper / "b").st_ino


def test_scan_multi_linked(tmp_path: Path) -> None:
    layer = build(tmp_path / "layer", {
        "a": "x", "b": HardLink("a"), "d/c": HardLink("a"), "single": "x",
        "e/x": "y", "e/y": HardLink("e/x"), "loop": Symlink("."), "up": Symlink("..")})
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    before = open_fds()
    try:
        result = copyup.scan_multi_linked(fd)
        assert open_fds() == before
        os.fstat(fd)  # the caller's fd is left open
    finally:
        os.close(fd)
    ino_a, ino_x = os.lstat(layer / "a").st_ino, os.lstat(layer / "e/x").st_ino
    assert {ino: sorted(paths) for ino, paths in result.items()} == {
        ino_a: [(b"a",), (b"b",), (b"d", b"c")], ino_x: [(b"e", b"x"), (b"e", b"y")]}


# --------------------------------------------------------------------------- failures


async def test_a_source_that_vanished(stacks: Stacks) -> None:
    c = stacks.core({"d/f": "x"})
    f = node(c.view, "d/f")
    os.unlink(stacks.lowers[0] / "d/f")
    with pytest.raises(FileNotFoundError):
        await c.copier.copy_up(f)
    assert f.layer is c.view.layers[1]
    assert os.listdir(stacks.upper / "d") == []  # the parent was copied up before


@pytest.mark.parametrize("step", ["copy_data", "copy_xattrs", "_rename_into"])
async def test_a_failed_copy_leaves_nothing(stacks: Stacks, step: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    c = stacks.core({"f": "data", "g": "data"})

    def fail(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EIO, "injected")

    if step == "_rename_into":
        real = copyup.CopyUp._rename_into

        def rename_fails(self: copyup.CopyUp, n: object, tmp: bytes) -> None:
            monkeypatch.setattr(copyup.os, "rename", fail)
            try:
                real(self, n, tmp)  # type: ignore[arg-type]
            finally:
                monkeypatch.undo()

        monkeypatch.setattr(copyup.CopyUp, "_rename_into", rename_fails)
    else:
        monkeypatch.setattr(copyup, step, fail)
    f = node(c.view, "f")
    with pytest.raises(OSError) as raised:
        await c.copier.copy_up(f)
    assert raised.value.errno == errno.EIO
    assert os.listdir(stacks.upper) == [] and os.listdir(stacks.work) == []
    assert f.layer is c.view.layers[1]
    monkeypatch.undo()
    await c.copier.copy_up(f)  # not left busy
    assert (stacks.upper / "f").read_bytes() == b"data"


async def test_a_failed_directory_copy_leaves_nothing(stacks: Stacks,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    c = stacks.core({"d/f": "x"})

    def fail(*args: object) -> None:
        raise OSError(errno.EIO, "injected")

    monkeypatch.setattr(copyup, "copy_xattrs", fail)
    with pytest.raises(OSError):
        await c.copier.copy_up(node(c.view, "d/f"))
    assert os.listdir(stacks.upper) == [] and os.listdir(stacks.work) == []


async def test_copy_up_on_a_read_only_core(stacks: Stacks) -> None:
    c = stacks.core({"f": "x"}, read_only=True)
    with pytest.raises(OSError) as raised:
        await c.copier.copy_up(node(c.view, "f"))
    assert raised.value.errno == errno.EROFS
    with pytest.raises(OSError) as raised:
        await c.copier.copy_up_any(c.view.root)
    assert raised.value.errno == errno.EROFS


async def test_copy_up_any_of_the_root_copies_nothing(stacks: Stacks) -> None:
    c = stacks.core({"f": "x"})
    await c.copier.copy_up_any(c.view.root)
    assert os.listdir(stacks.upper) == []


# --------------------------------------------------------------------------- the lock


async def test_settle_waits_for_a_copy_up_of_the_same_node_only(
        stacks: Stacks, monkeypatch: pytest.MonkeyPatch) -> None:
    c = stacks.core({"big": "b" * 4096, "small": "s"})
    view, copier = c.view, c.copier
    big, small = node(view, "big"), node(view, "small")
    entered, release = threading.Event(), threading.Event()
    calls: list[int] = []
    real = copyup.copy_data

    def slow(src: int, dst: int, size: int, fsync: bool = True) -> None:
        calls.append(size)
        if size == 4096:
            entered.set()
            release.wait(10)
        real(src, dst, size, fsync)

    monkeypatch.setattr(copyup, "copy_data", slow)
    events: list[str] = []

    async def change_big() -> None:
        await copier.settle(big)
        events.append(f"settled: big in {'upper' if big.layer is view.upper else 'lower'}")

    async def copy(n: object, label: str) -> None:
        await copier.copy_up(n)  # type: ignore[arg-type]
        events.append(label)

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(copy, big, "big copied")
                while not entered.is_set():
                    await trio.sleep(0.005)
                nursery.start_soon(change_big)
                nursery.start_soon(copy, big, "big copied again")
                await copy(small, "small copied")  # another node: no wait
                await trio.sleep(0.05)
                assert events == ["small copied"]
                release.set()
    finally:
        release.set()
    assert events[0] == "small copied"
    assert "settled: big in upper" in events and len(events) == 4
    assert sorted(calls) == [1, 4096]  # big was copied once


# --------------------------------------------------------------------------- the steps


def _sparse(path: Path) -> bytes:
    """A 4 MiB file: data at 0 and at 1 MiB, holes elsewhere (a trailing one too)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.pwrite(fd, b"A" * 4096, 0)
        os.pwrite(fd, b"B" * 4096, 1 << 20)
        os.ftruncate(fd, 4 << 20)
    finally:
        os.close(fd)
    return path.read_bytes()


@pytest.mark.parametrize("method", ["copy_file_range", "sendfile", "readwrite"])
def test_copy_data_keeps_holes(tmp_path: Path, method: str,
                               monkeypatch: pytest.MonkeyPatch) -> None:
    expected = _sparse(tmp_path / "src")

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV if method == "sendfile" else errno.EINVAL, "refused")

    if method != "copy_file_range":
        monkeypatch.setattr(copyup.os, "copy_file_range", refuse)
    if method == "readwrite":
        monkeypatch.setattr(copyup.os, "sendfile", refuse)
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copyup.copy_data(src, dst, 4 << 20)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == expected
    assert os.stat(tmp_path / "dst").st_blocks <= os.stat(tmp_path / "src").st_blocks
    fd = os.open(tmp_path / "dst", os.O_RDONLY)
    try:
        assert os.lseek(fd, 4096, os.SEEK_DATA) == 1 << 20  # the hole is a hole
        assert_errno(errno.ENXIO, os.lseek, fd, (1 << 20) + 4096, os.SEEK_DATA)
    finally:
        os.close(fd)


def test_copy_data_copies_the_first_size_bytes(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"0123456789")
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copyup.copy_data(src, dst, 4, fsync=False)
        copyup.copy_data(src, dst, 0, fsync=False)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == b"0123"


def test_copy_data_of_a_source_shorter_than_said(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"abc")
    src = os.open(tmp_path / "src", os.O_RDONLY)
    dst = os.open(tmp_path / "dst", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        copyup.copy_data(src, dst, 10, fsync=False)
    finally:
        os.close(src)
        os.close(dst)
    assert (tmp_path / "dst").read_bytes() == b"abc" + b"\0" * 7


def test_copy_xattrs_skips_the_unions_own(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).write_bytes(b"")
    for key, value in XATTRS.items():
        os.setxattr(tmp_path / "a", key, value)
    os.setxattr(tmp_path / "a", METACOPY_XATTR, b"")
    copyup.copy_xattrs(os.fsencode(tmp_path / "a"), os.fsencode(tmp_path / "b"))
    src = os.open(tmp_path / "a", os.O_RDONLY)
    dst = os.open(tmp_path / "c", os.O_RDONLY)
    try:
        copyup.copy_xattrs(src, dst)
    finally:
        os.close(src)
        os.close(dst)
    for name in ("b", "c"):
        assert _user_xattrs(tmp_path / name) == {"user.mine": b"kept",
                                                  "trusted.mine": b"kept too"}


def test_temp_names_are_unique() -> None:
    names = {copyup.temp_name() for _ in range(1000)}
    assert len(names) == 1000
    assert all(name.startswith(b"#%d-" % os.getpid()) for name in names)


def test_clean_workdir(tmp_path: Path) -> None:
    """What a crashed server left is removed; a symlink in it is never followed."""
    outside = build(tmp_path / "outside", {"keep": "x", "sub/keep": "x"})
    work = build(tmp_path / "work", {"#1-1": "half a copy", "#1-2/a/b": "x", "#1-3": WHITEOUT,
                                     "#1-4": Symlink(str(outside)), "#1-5": FIFO,
                                     "#1-6": Symlink(str(outside / "sub"))})
    os.chmod(work / "#1-2/a", 0o000)
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        copyup.clean_workdir(fd)
        copyup.clean_workdir(fd)  # nothing left: no error
    finally:
        os.close(fd)
    assert os.listdir(work) == []
    assert (outside / "keep").exists() and (outside / "sub/keep").exists()


async def test_the_opaque_xattr_is_never_copied_with_trusted_markers(stacks: Stacks) -> None:
    c = stacks.core({"d": OPAQUE})
    await c.copier.copy_up(node(c.view, "d"))
    assert not has_xattr(stacks.upper / "d", OPAQUE_XATTR)
