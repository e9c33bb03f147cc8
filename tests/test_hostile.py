"""Hostile layers: symlinks in a lower layer must never be followed as path components.

The bottom layer holds ``d -> HOST`` (HOST is a directory outside every layer with a
sentinel file); a higher layer holds a real directory ``d/``. Through the mount, ``d``
is that real directory: HOST must never be shown, read or changed, whatever is done
inside ``d``. Kernel overlayfs is the reference.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest
from mounts import DIR, FIFO, Symlink, assert_errno, build, is_whiteout, snapshot

pytestmark = pytest.mark.usefixtures("mount_guard")


@pytest.fixture
def host(tmp_path):
    h = build(tmp_path / "host", {"sentinel": "host secret", "sub/deep": "deep secret"})
    return h, snapshot(h, times=True)


def _assert_host_untouched(host) -> None:
    h, before = host
    assert snapshot(h, times=True) == before
    assert sorted(os.listdir(h)) == ["sentinel", "sub"]


def _target(h: Path, layer: Path, how: str) -> str:
    return str(h) if how == "absolute" else os.path.relpath(h, layer)


@pytest.mark.parametrize("how", ["absolute", "relative"])
def test_lower_symlink_under_a_real_dir(union, tmp_path, host, how):
    h, _ = host
    bottom = tmp_path / "l2"
    build(bottom, {"d": Symlink(_target(h, bottom, how)), "sub": Symlink(_target(h, bottom, how))})
    top = build(tmp_path / "l1", {"d/mine": "mine", "d/inner/x": "x", "sub/deep": "top deep"})
    m = union(top, bottom)

    assert sorted(os.listdir(m / "d")) == ["inner", "mine"]
    assert_errno(errno.ENOENT, os.lstat, m / "d/sentinel")
    assert_errno(errno.ENOENT, os.open, m / "d/sentinel", os.O_RDONLY)
    assert_errno(errno.ENOENT, os.lstat, m / "d/sub")
    assert (m / "d/mine").read_text() == "mine"
    assert (m / "sub/deep").read_text() == "top deep"

    # writes inside d: create, copy-up, unlink, mkdir, rename, link, xattr, chmod
    (m / "d/new").write_text("new")
    with open(m / "d/mine", "a") as f:
        f.write("+")
    (m / "d/inner/x").write_text("rewritten")
    os.unlink(m / "d/inner/x")
    os.mkdir(m / "d/nd")
    os.rename(m / "d/new", m / "d/nd/new")
    os.link(m / "d/mine", m / "d/mine2")
    os.setxattr(m / "d", "user.k", b"v")
    os.chmod(m / "d", 0o700)
    with open(m / "sub/deep", "a") as f:
        f.write("+")
    fd = os.open(m / "d/sentinel", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    os.write(fd, b"ours")
    os.close(fd)
    assert (m / "d/sentinel").read_text() == "ours"
    os.unlink(m / "d/sentinel")

    assert sorted(os.listdir(m / "d")) == ["inner", "mine", "mine2", "nd"]
    assert (m / "d/mine").read_text() == "mine+"
    assert (m / "sub/deep").read_text() == "top deep+"
    _assert_host_untouched(host)
    assert m.upper is not None
    assert (m.upper / "d").is_dir() and not (m.upper / "d").is_symlink()
    assert is_whiteout(m.upper / "d/inner/x")


def test_symlink_component_deeper_in_a_lower(union, tmp_path, host):
    h, _ = host
    l3 = build(tmp_path / "l3", {"a/b": Symlink(str(h)), "c": Symlink(str(h / "sub"))})
    l2 = build(tmp_path / "l2", {"a/b/c": Symlink(str(h)), "c/deep": "l2 deep"})
    l1 = build(tmp_path / "l1", {"a/b/c/d": "real", "c/q": "q"})
    m = union(l1, l2, l3)
    # a/b is a real dir in l1 over the symlink in l3; a/b/c is a real dir in l1 over the
    # symlink in l2, which stops the merge: nothing of HOST can show up below
    assert sorted(os.listdir(m / "a/b")) == ["c"]
    assert sorted(os.listdir(m / "a/b/c")) == ["d"]
    assert_errno(errno.ENOENT, os.lstat, m / "a/b/sentinel")
    assert_errno(errno.ENOENT, os.lstat, m / "a/b/c/sentinel")
    assert sorted(os.listdir(m / "c")) == ["deep", "q"]
    assert (m / "c/deep").read_text() == "l2 deep"
    (m / "a/b/c/new").write_text("n")
    (m / "a/b/c/d").write_text("changed")
    os.unlink(m / "c/deep")
    (m / "c/deep").write_text("over it")
    assert sorted(os.listdir(m / "c")) == ["deep", "q"]
    _assert_host_untouched(host)


def test_lower_symlink_shown_as_symlink(union, tmp_path, host):
    # Where nothing hides it, the symlink is a symlink: readlink, no merge with HOST.
    h, _ = host
    l1 = build(tmp_path / "l1", {"link": Symlink(str(h)), "f": "f"})
    m = union(l1)
    assert os.readlink(m / "link") == str(h)
    assert os.listdir(m.mnt) and sorted(os.listdir(m.mnt)) == ["f", "link"]
    os.unlink(m / "link")
    os.mkdir(m / "link")
    (m / "link/sentinel").write_text("ours")
    assert sorted(os.listdir(m / "link")) == ["sentinel"]
    _assert_host_untouched(host)


def test_upper_symlink_replaced_by_dir(union, tmp_path, host):
    # The upper itself holds the symlink; a lower has the dir. Removing the symlink and
    # making a dir through the mount must not create anything in HOST.
    h, _ = host
    up = build(tmp_path / "up", {"d": Symlink(str(h))})
    l1 = build(tmp_path / "l1", {"d/low": "low"})
    m = union(l1, upper=up)
    assert os.readlink(m / "d") == str(h)
    os.unlink(m / "d")
    os.mkdir(m / "d")
    assert os.listdir(m / "d") == []
    (m / "d/sentinel").write_text("ours")
    _assert_host_untouched(host)


def test_special_files_in_a_lower(union, tmp_path):
    """FIFOs, sockets and devices in a lower are shown and copied up as what they are:
    never opened (a FIFO would block the daemon), never read as data."""
    l1 = build(tmp_path / "l1", {"fifo": FIFO, "fifo2": FIFO, "d": DIR})
    os.mknod(l1 / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(l1 / "zero", stat.S_IFCHR | 0o666, os.makedev(1, 5))
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(l1 / "sock"))
    m = union(l1)
    assert sorted(os.listdir(m.mnt)) == ["d", "fifo", "fifo2", "null", "sock", "zero"]
    for name, test in (("fifo", stat.S_ISFIFO), ("null", stat.S_ISCHR), ("sock", stat.S_ISSOCK)):
        assert test(os.lstat(m / name).st_mode), name
        os.listxattr(m / name, follow_symlinks=False)
        assert_errno(errno.ENODATA, os.getxattr, m / name, "trusted.none", follow_symlinks=False)
    assert os.lstat(m / "null").st_rdev == os.makedev(1, 3)
    # copy-ups by metadata
    os.chmod(m / "fifo", 0o600)
    os.chown(m / "null", 1000, 1000)
    os.chmod(m / "sock", 0o700)
    os.setxattr(m / "zero", "trusted.x", b"1", follow_symlinks=False)
    os.rename(m / "fifo2", m / "d/fifo2")
    assert m.upper is not None
    assert stat.S_ISFIFO(os.lstat(m.upper / "fifo").st_mode)
    assert stat.S_IMODE(os.lstat(m / "fifo").st_mode) == 0o600
    ust = os.lstat(m.upper / "null")
    assert stat.S_ISCHR(ust.st_mode) and ust.st_rdev == os.makedev(1, 3)
    assert (ust.st_uid, ust.st_gid) == (1000, 1000)
    assert stat.S_ISSOCK(os.lstat(m / "sock").st_mode)
    assert stat.S_ISFIFO(os.lstat(m / "d/fifo2").st_mode)
    assert os.lstat(m / "zero").st_rdev == os.makedev(1, 5)
    # a FIFO through the mount is a FIFO: a reader and a writer meet
    fd = os.open(m / "fifo", os.O_RDONLY | os.O_NONBLOCK)
    try:
        wfd = os.open(m / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.write(wfd, b"through")
        os.close(wfd)
        assert os.read(fd, 100) == b"through"
    finally:
        os.close(fd)
