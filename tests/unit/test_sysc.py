"""sysc.py: renameat2 and its flags, mount_setattr's errors, the *at() stand-ins."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from mounts import DIR, FIFO, WHITEOUT, Symlink, build

from unionfs import sysc
from unit.stacks import is_char00


@pytest.fixture
def fd(tmp_path: Path) -> int:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    yield fd  # type: ignore[misc]
    os.close(fd)


def test_renameat2_plain_and_noreplace(tmp_path: Path, fd: int) -> None:
    build(tmp_path, {"a": "a", "b": "b"})
    with pytest.raises(FileExistsError) as raised:
        sysc.renameat2(fd, b"a", fd, b"b", sysc.RENAME_NOREPLACE)
    assert raised.value.filename == b"a" and raised.value.filename2 == b"b"
    sysc.renameat2(fd, b"a", fd, b"c", sysc.RENAME_NOREPLACE)
    sysc.renameat2(fd, b"c", fd, b"b")
    assert os.listdir(tmp_path) == ["b"] and (tmp_path / "b").read_bytes() == b"a"


def test_renameat2_exchange(tmp_path: Path, fd: int) -> None:
    build(tmp_path, {"a": "a", "d/x": "x"})
    sysc.renameat2(fd, b"a", fd, b"d", sysc.RENAME_EXCHANGE)
    assert (tmp_path / "d").read_bytes() == b"a" and os.listdir(tmp_path / "a") == ["x"]
    with pytest.raises(FileNotFoundError):
        sysc.renameat2(fd, b"a", fd, b"missing", sysc.RENAME_EXCHANGE)


def test_renameat2_whiteout(tmp_path: Path, fd: int) -> None:
    build(tmp_path, {"a": "a"})
    sysc.renameat2(fd, b"a", fd, b"b", sysc.RENAME_WHITEOUT)
    assert is_char00(tmp_path / "a") and (tmp_path / "b").read_bytes() == b"a"


def test_renameat2_bad_flags(fd: int, tmp_path: Path) -> None:
    build(tmp_path, {"a": "a"})
    with pytest.raises(OSError) as raised:
        sysc.renameat2(fd, b"a", fd, b"b", sysc.RENAME_EXCHANGE | sysc.RENAME_NOREPLACE)
    assert raised.value.errno == errno.EINVAL
    assert os.listdir(tmp_path) == ["a"]


def test_mount_setattr_errors(tmp_path: Path) -> None:
    """Errors only: a directory that is no mount's root is refused (nothing changes)."""
    with pytest.raises(FileNotFoundError) as raised:
        sysc.mount_setattr(str(tmp_path / "missing"), sysc.MOUNT_ATTR_NOEXEC)
    assert raised.value.filename == str(tmp_path / "missing")
    (tmp_path / "d").mkdir()
    with pytest.raises(OSError) as raised:
        sysc.mount_setattr(str(tmp_path / "d"), sysc.MOUNT_ATTR_NOEXEC)
    assert raised.value.errno == errno.EINVAL


def test_at_path_names_the_entry_itself(tmp_path: Path, fd: int) -> None:
    build(tmp_path, {"f": "data", "s": Symlink("f"), "d/g": "g"})
    os.setxattr(tmp_path / "f", "trusted.file", b"f")
    os.setxattr(tmp_path / "s", "trusted.link", b"s", follow_symlinks=False)
    assert os.getxattr(sysc.at_path(fd, b"f"), "trusted.file", follow_symlinks=False) == b"f"
    # The last component is not followed: the symlink's own xattrs.
    assert os.listxattr(sysc.at_path(fd, b"s"), follow_symlinks=False) == ["trusted.link"]
    # The fd is what is resolved, not the directory's path: a rename does not matter.
    sub = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.rename(tmp_path / "d", tmp_path / "moved")
        assert os.stat(sysc.at_path(sub, b"g")).st_size == 1
    finally:
        os.close(sub)


def test_fd_path_links_an_o_path_fd(tmp_path: Path, fd: int) -> None:
    build(tmp_path, {"f": "data", "s": Symlink("f")})
    for name in (b"f", b"s"):
        src = os.open(name, os.O_PATH | os.O_NOFOLLOW, dir_fd=fd)
        try:
            assert os.stat(sysc.fd_path(src)).st_ino == (
                os.lstat(tmp_path / os.fsdecode(name)).st_ino)
            os.link(sysc.fd_path(src), name + b"2", dst_dir_fd=fd, follow_symlinks=True)
        finally:
            os.close(src)
    assert os.lstat(tmp_path / "f2").st_ino == os.lstat(tmp_path / "f").st_ino
    assert stat.S_ISLNK(os.lstat(tmp_path / "s2").st_mode)  # the symlink, not its target


def test_remove_at(tmp_path: Path, fd: int) -> None:
    outside = build(tmp_path.parent / f"{tmp_path.name}-outside", {"keep/x": "x"})
    build(tmp_path, {"f": "x", "tree/a/b/c": "x", "tree/e": DIR, "tree/w": WHITEOUT,
                     "tree/p": FIFO, "tree/link": Symlink(str(outside / "keep")),
                     "s": Symlink(str(outside))})
    for name in (b"f", b"tree", b"s", b"missing"):
        sysc.remove_at(fd, name)
    assert os.listdir(tmp_path) == []
    assert (outside / "keep/x").exists()  # no symlink was followed
