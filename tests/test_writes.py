"""Writes through the union: copy-up, whiteouts, opaque dirs, renames, links, xattrs.

Parametrized over ``backend`` (kernel overlayfs is the reference) except what is about
unionfs alone: names starting with ".wh." and the kernel reading an upper unionfs wrote.
"""

from __future__ import annotations

import errno
import mmap
import os
import shutil
import stat
import threading
import time
from pathlib import Path

import pytest
from mounts import (
    DIR,
    OPAQUE,
    OVERLAY_OPTS,
    READER_OPTS,
    RENAME_NOREPLACE,
    WHITEOUT,
    File,
    HardLink,
    Symlink,
    assert_errno,
    build,
    diff_trees,
    is_whiteout,
    mount_kernel,
    renameat2,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("mount_guard")

unionfs_only = pytest.mark.parametrize("backend", ["unionfs"])


def listing(path: Path) -> list[str]:
    return sorted(os.listdir(path))


@pytest.fixture
def base(tmp_path):
    """Two lowers with files, dirs, a whiteout, an opaque dir and a symlink."""
    l1 = build(
        tmp_path / "l1",
        {
            "f": "lower f\n",
            "d/x": "x1",
            "o": OPAQUE,
            "o/p": "p",
            "w": WHITEOUT,
            "s": Symlink("f"),
        },
    )
    l2 = build(
        tmp_path / "l2",
        {
            "g": "lower g\n",
            "d/y": "y2",
            "d/x": "x2",
            "o/hidden": "h",
            "w": "whited out",
            "e/z": "z",
            "empty": DIR,
        },
    )
    return l1, l2


# ---------------------------------------------------------------------------
# create / open / write / truncate


def test_create_new_files(union, base):
    m = union(*base)
    fd = os.open(m / "new", os.O_CREAT | os.O_WRONLY | os.O_EXCL, 0o640)
    assert os.write(fd, b"hello") == 5
    os.fsync(fd)
    os.close(fd)
    assert (m / "new").read_bytes() == b"hello"
    assert stat.S_IMODE(os.lstat(m / "new").st_mode) == 0o640
    (m / "d/new").write_text("in a lower dir")
    (m / "e/new").write_text("in a lower-only dir")
    assert listing(m / "e") == ["new", "z"]
    assert (m / "e/new").read_text() == "in a lower-only dir"
    assert m.upper is not None and (m.upper / "e/new").exists()


def test_o_excl(union, base):
    m = union(*base)
    for name in ("f", "g", "d", "d/x", "s", "o/p"):
        assert_errno(errno.EEXIST, os.open, m / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    # a whited-out name and a name hidden by an opaque dir do not exist
    for name in ("w", "o/hidden"):
        os.close(os.open(m / name, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        assert (m / name).read_bytes() == b""


def test_open_o_trunc_lower_file(union, base):
    _, l2 = base
    m = union(*base)
    fd = os.open(m / "g", os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert (m / "g").read_bytes() == b""
    assert os.lstat(m / "g").st_size == 0
    assert (l2 / "g").read_text() == "lower g\n"


def test_write_and_append_copy_up(union, base):
    l1, l2 = base
    m = union(*base)
    with open(m / "f", "r+b") as f:
        f.seek(2)
        f.write(b"W")
    with open(m / "g", "ab") as f:
        f.write(b"appended")
    assert (m / "f").read_bytes() == b"loWer f\n"
    assert (m / "g").read_bytes() == b"lower g\nappended"
    assert (l1 / "f").read_bytes() == b"lower f\n"
    assert (l2 / "g").read_bytes() == b"lower g\n"
    fd = os.open(m / "d/x", os.O_WRONLY)
    os.pwrite(fd, b"Z", 10)  # past the end: a hole of zeros
    os.close(fd)
    assert (m / "d/x").read_bytes() == b"x1" + b"\0" * 8 + b"Z"


def test_copy_up_of_big_file(union, tmp_path):
    data = os.urandom(5 << 20) + b"tail"
    l1 = build(tmp_path / "l1", {"big": data})
    m = union(l1)
    with open(m / "big", "ab") as f:
        f.write(b"+")
    assert (m / "big").read_bytes() == data + b"+"
    assert (l1 / "big").read_bytes() == data


def test_copy_up_keeps_holes(union, tmp_path):
    l1 = build(tmp_path / "l1", {})
    with open(l1 / "sparse", "wb") as f:
        f.write(b"head")
        f.seek(256 << 20)
        f.write(b"tail")
    assert os.lstat(l1 / "sparse").st_blocks * 512 < 1 << 20
    m = union(l1)
    with open(m / "sparse", "ab") as f:
        f.write(b"+")
    assert m.upper is not None
    ust = os.lstat(m.upper / "sparse")
    assert ust.st_size == (256 << 20) + 5
    assert ust.st_blocks * 512 < 8 << 20, "copy-up filled the holes"
    with open(m / "sparse", "rb") as f:
        assert f.read(4) == b"head"
        f.seek(128 << 20)
        assert f.read(4) == b"\0\0\0\0"
        f.seek(256 << 20)
        assert f.read() == b"tail+"


def test_reader_opened_before_copy_up_sees_new_data(union, base):
    m = union(*base)
    rfd = os.open(m / "g", os.O_RDONLY)
    try:
        assert os.pread(rfd, 100, 0) == b"lower g\n"
        wfd = os.open(m / "g", os.O_WRONLY)
        os.pwrite(wfd, b"L", 0)
        os.close(wfd)
        assert os.pread(rfd, 100, 0) == b"Lower g\n"
    finally:
        os.close(rfd)


def test_truncate(union, base):
    m = union(*base)
    os.truncate(m / "f", 3)
    assert (m / "f").read_bytes() == b"low"
    os.truncate(m / "g", 12)
    assert (m / "g").read_bytes() == b"lower g\n\0\0\0\0"
    fd = os.open(m / "d/y", os.O_RDWR)
    os.ftruncate(fd, 1)
    os.fsync(fd)
    os.fdatasync(fd)
    os.close(fd)
    assert (m / "d/y").read_bytes() == b"y"


def test_open_unlinked_file(union, base):
    m = union(*base)
    (m / "u").write_bytes(b"upper data")
    fd = os.open(m / "u", os.O_RDWR)
    try:
        os.unlink(m / "u")
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 100, 0) == b"upper data"
        os.pwrite(fd, b"U", 0)
        assert os.pread(fd, 100, 0) == b"Upper data"
    finally:
        os.close(fd)
    rfd = os.open(m / "g", os.O_RDONLY)
    try:
        os.unlink(m / "g")
        assert os.pread(rfd, 100, 0) == b"lower g\n"
    finally:
        os.close(rfd)
    assert not (m / "g").exists()


def test_metadata_of_an_open_unlinked_file(union, base):
    """fchmod, fchown, futimens and ftruncate on a file whose name is gone."""
    m = union(*base)
    (m / "u").write_bytes(b"upper data")
    fd = os.open(m / "u", os.O_RDWR)
    try:
        os.unlink(m / "u")
        os.fchmod(fd, 0o600)
        os.fchown(fd, 7, 8)
        os.ftruncate(fd, 5)
        os.utime(fd, ns=(5_000_000_000, 6_000_000_000))
        st = os.fstat(fd)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 7, 8)
        assert (st.st_mtime_ns, st.st_size, st.st_nlink) == (6_000_000_000, 5, 0)
        assert os.pread(fd, 100, 0) == b"upper"
    finally:
        os.close(fd)


def test_open_files_follow_renames_and_unlinks(union, base):
    m = union(*base)
    fd = os.open(m / "f", os.O_RDWR)  # a lower file, copied up on open for write
    try:
        os.rename(m / "f", m / "d/f-moved")
        os.pwrite(fd, b"L", 0)
        assert (m / "d/f-moved").read_bytes() == b"Lower f\n"
        os.unlink(m / "d/f-moved")
        os.pwrite(fd, b"LO", 0)
        assert os.pread(fd, 100, 0) == b"LOwer f\n"
        assert os.fstat(fd).st_nlink == 0
    finally:
        os.close(fd)
    assert_errno(errno.ENOENT, os.lstat, m / "d/f-moved")
    assert_errno(errno.ENOENT, os.lstat, m / "f")


# ---------------------------------------------------------------------------
# metadata


def test_chmod_chown_utimens(union, base):
    l1, l2 = base
    m = union(*base)
    os.chmod(m / "g", 0o600)
    os.chown(m / "f", 1000, 2000)
    os.utime(m / "d/y", ns=(1_500_000_000_123_456_789, 1_400_000_000_987_654_321))
    os.chmod(m / "e", 0o711)
    st = os.lstat(m / "g")
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert (m / "g").read_text() == "lower g\n"
    st = os.lstat(m / "f")
    assert (st.st_uid, st.st_gid) == (1000, 2000)
    st = os.lstat(m / "d/y")
    assert st.st_mtime_ns == 1_400_000_000_987_654_321
    assert st.st_atime_ns == 1_500_000_000_123_456_789
    assert stat.S_IMODE(os.lstat(m / "e").st_mode) == 0o711
    assert stat.S_IMODE(os.lstat(l2 / "g").st_mode) == 0o644
    assert os.lstat(l1 / "f").st_uid == 0
    os.utime(m / "s", ns=(1, 2), follow_symlinks=False)
    assert os.lstat(m / "s").st_mtime_ns == 2
    before = time.time()
    os.utime(m / "g")
    assert os.lstat(m / "g").st_mtime >= before - 2


def test_copy_up_keeps_metadata(union, tmp_path):
    meta = {
        "mode": 0o640,
        "uid": 1234,
        "gid": 4321,
        "mtime": 1_000_000_000.25,
        "xattrs": {"user.a": b"1", "trusted.b": b"2"},
    }
    l1 = build(
        tmp_path / "l1",
        {
            "f": File(b"data", **meta),
            "g": File(b"data", **meta),
            "p/q/r": File(b"deep", **meta),
        },
    )
    for d in ("p", "p/q"):
        os.chown(l1 / d, 77, 88)
        os.chmod(l1 / d, 0o750)
        os.setxattr(l1 / d, "user.dir", d.encode())
    m = union(l1)
    lst = os.lstat(l1 / "f")
    os.setxattr(m / "f", "user.new", b"n")  # copy-up by metadata only: mtime kept
    os.chmod(m / "g", 0o600)  # copy-up by chmod
    with open(m / "p/q/r", "ab") as f:  # copy-up of the parents on the way
        f.write(b"!")
    up = m.upper
    assert up is not None
    for name in ("f", "g"):
        ust = os.lstat(up / name)
        want_mode = 0o640 if name == "f" else 0o600
        assert stat.S_IMODE(ust.st_mode) == want_mode, name
        assert (ust.st_uid, ust.st_gid) == (1234, 4321), name
        assert ust.st_mtime_ns == lst.st_mtime_ns, name
        assert os.getxattr(up / name, "user.a") == b"1", name
        assert os.getxattr(up / name, "trusted.b") == b"2", name
        mst = os.lstat(m / name)
        assert (mst.st_uid, mst.st_gid, mst.st_mtime_ns) == (1234, 4321, lst.st_mtime_ns)
        assert os.getxattr(m / name, "user.a") == b"1"
        assert (m / name).read_bytes() == b"data"
    assert os.getxattr(m / "f", "user.new") == b"n"
    for d in ("p", "p/q"):
        ust = os.lstat(up / d)
        assert stat.S_ISDIR(ust.st_mode)
        assert (stat.S_IMODE(ust.st_mode), ust.st_uid, ust.st_gid) == (0o750, 77, 88), d
        assert os.getxattr(up / d, "user.dir") == d.encode()
        assert os.getxattr(m / d, "user.dir") == d.encode()
    rst = os.lstat(up / "p/q/r")
    assert (stat.S_IMODE(rst.st_mode), rst.st_uid, rst.st_gid) == (0o640, 1234, 4321)
    assert (m / "p/q/r").read_bytes() == b"deep!"


def test_xattrs(union, base):
    _, l2 = base
    os.setxattr(l2 / "g", "user.old", b"old")
    m = union(*base)
    assert os.getxattr(m / "g", "user.old") == b"old"
    for p in ("g", "d", "new"):
        if p == "new":
            (m / p).write_text("n")
        os.setxattr(m / p, "user.k", b"v\0binary")
        os.setxattr(m / p, "trusted.t", b"tv")
        assert os.getxattr(m / p, "user.k") == b"v\0binary"
        assert os.getxattr(m / p, "trusted.t") == b"tv"
        names = os.listxattr(m / p)
        assert "user.k" in names and "trusted.t" in names, names
        os.removexattr(m / p, "user.k")
        assert_errno(errno.ENODATA, os.getxattr, m / p, "user.k")
        assert "user.k" not in os.listxattr(m / p)
    assert_errno(errno.ENODATA, os.removexattr, m / "g", "user.never")
    assert_errno(errno.ENODATA, os.getxattr, m / "f", "user.never")
    assert os.getxattr(m / "g", "user.old") == b"old"
    os.setxattr(m / "g", "user.old", b"x", os.XATTR_REPLACE)
    assert_errno(errno.EEXIST, os.setxattr, m / "g", "user.old", b"y", os.XATTR_CREATE)
    assert_errno(errno.ENODATA, os.setxattr, m / "g", "user.zz", b"y", os.XATTR_REPLACE)
    assert os.getxattr(l2 / "g", "user.old") == b"old"
    # on a symlink: trusted.* is allowed, user.* is not (EPERM, as on any Linux fs)
    os.setxattr(m / "s", "trusted.sl", b"1", follow_symlinks=False)
    assert os.getxattr(m / "s", "trusted.sl", follow_symlinks=False) == b"1"
    assert os.readlink(m / "s") == "f"
    assert_errno(errno.EPERM, os.setxattr, m / "s", "user.sl", b"1", follow_symlinks=False)


def test_statfs_is_the_uppers(union, base):
    m = union(*base)
    assert m.upper is not None
    a, b = os.statvfs(m.mnt), os.statvfs(m.upper)
    for f in ("f_bsize", "f_frsize", "f_blocks", "f_files", "f_namemax"):
        assert getattr(a, f) == getattr(b, f), f
    assert abs(a.f_bfree - b.f_bfree) <= b.f_blocks // 100
    assert abs(a.f_ffree - b.f_ffree) <= b.f_files // 100


# ---------------------------------------------------------------------------
# mkdir / rmdir / unlink


def test_mkdir_rmdir(union, base):
    m = union(*base)
    os.mkdir(m / "nd", 0o750)
    assert stat.S_IMODE(os.lstat(m / "nd").st_mode) == 0o750
    os.mkdir(m / "nd/sub")
    assert_errno(errno.EEXIST, os.mkdir, m / "nd")
    assert_errno(errno.EEXIST, os.mkdir, m / "d")
    assert_errno(errno.EEXIST, os.mkdir, m / "f")
    assert_errno(errno.ENOTEMPTY, os.rmdir, m / "nd")
    os.rmdir(m / "nd/sub")
    os.rmdir(m / "nd")
    assert not (m / "nd").exists()
    assert_errno(errno.ENOTEMPTY, os.rmdir, m / "d")  # merged, lower entries
    assert_errno(errno.ENOTEMPTY, os.rmdir, m / "e")  # lower only
    assert_errno(errno.ENOTDIR, os.rmdir, m / "f")
    assert_errno(errno.ENOENT, os.rmdir, m / "w")
    os.rmdir(m / "empty")
    assert_errno(errno.ENOENT, os.lstat, m / "empty")
    assert m.upper is not None and is_whiteout(m.upper / "empty")
    # a lower dir whose entries are all deleted through the mount can go
    os.unlink(m / "e/z")
    os.rmdir(m / "e")
    assert not (m / "e").exists()
    assert "e" not in os.listdir(m.mnt)


def test_unlink_lower_leaves_whiteout(union, base):
    l1, l2 = base
    m = union(*base)
    os.unlink(m / "g")
    os.unlink(m / "d/x")
    os.unlink(m / "s")
    assert_errno(errno.ENOENT, os.lstat, m / "g")
    assert_errno(errno.ENOENT, os.unlink, m / "g")
    assert_errno(errno.EISDIR, os.unlink, m / "d")
    assert listing(m / "d") == ["y"]
    assert "g" not in os.listdir(m.mnt) and "s" not in os.listdir(m.mnt)
    up = m.upper
    assert up is not None
    for p in ("g", "d/x", "s"):
        assert is_whiteout(up / p), p
    assert (l2 / "g").exists() and (l1 / "d/x").exists() and (l2 / "d/x").exists()
    # and the name can come back
    (m / "g").write_text("again")
    assert (m / "g").read_text() == "again"
    (m / "u").write_text("upper only")
    os.unlink(m / "u")
    assert not (m / "u").exists()


def test_rmdir_then_mkdir_makes_opaque_dir(union, base):
    m = union(*base)
    for n in os.listdir(m / "d"):
        os.unlink(m / "d" / n)
    os.rmdir(m / "d")
    os.mkdir(m / "d")
    assert listing(m / "d") == []
    assert_errno(errno.ENOENT, os.lstat, m / "d/x")
    assert m.upper is not None
    assert os.getxattr(m.upper / "d", "trusted.overlay.opaque") == b"y"
    (m / "d/n").write_text("n")
    assert listing(m / "d") == ["n"]
    # a file in place of a lower dir
    os.unlink(m / "e/z")
    os.rmdir(m / "e")
    (m / "e").write_text("now a file")
    assert (m / "e").read_text() == "now a file"


def test_rm_rf_of_merged_tree(union, tmp_path):
    l1 = build(tmp_path / "l1", {f"t/a{i}/f{j}": "x" for i in range(5) for j in range(5)})
    l2 = build(tmp_path / "l2", {f"t/a{i}/g{j}": "x" for i in range(3, 8) for j in range(5)})
    m = union(l1, l2)
    for root, dirs, files in os.walk(m / "t", topdown=False):
        for f in files:
            os.unlink(os.path.join(root, f))
        for d in dirs:
            os.rmdir(os.path.join(root, d))
    os.rmdir(m / "t")
    assert os.listdir(m.mnt) == []


def test_parallel_writers_then_rm_rf(union, tmp_path):
    l1 = build(tmp_path / "l1", {f"t/w{i}/lower{j}": "x" for i in range(4) for j in range(20)})
    m = union(l1)
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            base = m / f"t/w{i}"
            for round_ in range(5):
                for j in range(10):
                    d = base / f"r{round_}/d{j}"
                    d.mkdir(parents=True)
                    (d / "f").write_text("f")
                    os.symlink("f", d / "s")
                for j in range(0, 20, 3):
                    p = base / f"lower{j}"
                    if p.exists():
                        p.unlink()
                shutil.rmtree(base / f"r{round_}")
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    shutil.rmtree(m / "t")
    assert os.listdir(m.mnt) == []


def test_concurrent_appends_copy_up_once(union, tmp_path):
    l1 = build(tmp_path / "l1", {"f": b"base\n" + os.urandom(1 << 20)})
    m = union(l1)
    orig = (l1 / "f").read_bytes()
    barrier = threading.Barrier(8)
    errors: list[BaseException] = []

    def append(i: int) -> None:
        try:
            barrier.wait()
            fd = os.open(m / "f", os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"line %d\n" % i)
            finally:
                os.close(fd)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=append, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    data = (m / "f").read_bytes()
    assert data[: len(orig)] == orig
    assert sorted(data[len(orig) :].splitlines()) == sorted(b"line %d" % i for i in range(8))


def test_mmap_write(union, base):
    m = union(*base)
    fd = os.open(m / "g", os.O_RDWR)
    try:
        with mmap.mmap(fd, 0) as mm:
            mm[0:5] = b"LOWER"
            mm.flush()
    finally:
        os.close(fd)
    assert (m / "g").read_bytes() == b"LOWER g\n"


# ---------------------------------------------------------------------------
# rename


def test_rename_files(union, base):
    l1, l2 = base
    m = union(*base)
    os.rename(m / "g", m / "g2")  # lower file to a new name
    assert (m / "g2").read_text() == "lower g\n"
    assert_errno(errno.ENOENT, os.lstat, m / "g")
    assert m.upper is not None and is_whiteout(m.upper / "g")
    os.rename(m / "f", m / "d/y")  # over a lower file, into a lower dir
    assert (m / "d/y").read_text() == "lower f\n"
    assert listing(m / "d") == ["x", "y"]
    os.rename(m / "d/x", m / "e/x")  # between lower dirs
    assert listing(m / "e") == ["x", "z"]
    assert (m / "e/x").read_text() == "x1"
    os.rename(m / "e/z", m / "w")  # onto a whited-out name
    assert (m / "w").read_text() == "z"
    os.rename(m / "o/p", m / "o/hidden")  # onto a name the opaque dir hides
    assert listing(m / "o") == ["hidden"]
    assert (m / "o/hidden").read_text() == "p"
    os.rename(m / "s", m / "s2")  # a symlink
    assert os.readlink(m / "s2") == "f"
    (m / "u").write_text("u")
    os.rename(m / "u", m / "u2")  # upper only
    os.rename(m / "u2", m / "u2")  # onto itself
    assert (m / "u2").read_text() == "u"
    assert (l2 / "g").exists() and (l1 / "f").exists() and (l1 / "d/x").exists()
    assert_errno(errno.ENOENT, os.rename, m / "nope", m / "x")
    assert_errno(errno.EISDIR, os.rename, m / "g2", m / "d")
    assert_errno(errno.ENOTDIR, os.rename, m / "d", m / "g2")


def test_rename_upper_only_dir(union, base):
    m = union(*base)
    os.makedirs(m / "nd/a/b")
    (m / "nd/a/b/f").write_text("deep")
    os.rename(m / "nd", m / "nd2")
    assert (m / "nd2/a/b/f").read_text() == "deep"
    assert_errno(errno.ENOENT, os.lstat, m / "nd")
    os.rename(m / "nd2", m / "d/nd3")
    assert (m / "d/nd3/a/b/f").read_text() == "deep"
    # a dir made opaque by rmdir + mkdir is an upper dir: it can move
    os.unlink(m / "e/z")
    os.rmdir(m / "e")
    os.mkdir(m / "e")
    (m / "e/k").write_text("k")
    os.rename(m / "e", m / "e2")
    assert listing(m / "e2") == ["k"]
    assert "e" not in os.listdir(m.mnt)


def test_rename_lower_dir_is_exdev(union, base):
    m = union(*base)
    assert_errno(errno.EXDEV, os.rename, m / "e", m / "e2")  # lower only
    assert_errno(errno.EXDEV, os.rename, m / "d", m / "d2")  # merged
    assert_errno(errno.EXDEV, os.rename, m / "empty", m / "e3")  # empty lower dir
    (m / "d/new").write_text("copied up d")
    assert_errno(errno.EXDEV, os.rename, m / "d", m / "d2")  # merged, upper too
    assert listing(m / "d") == ["new", "x", "y"]
    assert (m / "e/z").exists()


def test_rename_noreplace(union, base):
    m = union(*base)
    assert_errno(errno.EEXIST, renameat2, m / "f", m / "g", RENAME_NOREPLACE)
    assert_errno(errno.EEXIST, renameat2, m / "f", m / "d/x", RENAME_NOREPLACE)
    renameat2(m / "f", m / "w", RENAME_NOREPLACE)  # whited out: free
    assert (m / "w").read_text() == "lower f\n"
    renameat2(m / "g", m / "fresh", RENAME_NOREPLACE)
    assert (m / "fresh").read_text() == "lower g\n"
    renameat2(m / "o/p", m / "o/hidden", RENAME_NOREPLACE)  # hidden by opaque: free
    assert (m / "g").exists() is False


RENAME_EXCHANGE = 2


def test_rename_exchange(union, base, tmp_path):
    m = union(*base)
    # Two lower files, from different layers and directories.
    renameat2(m / "f", m / "d/y", RENAME_EXCHANGE)
    assert (m / "f").read_text() == "y2"
    assert (m / "d/y").read_text() == "lower f\n"
    # An upper file and a lower file.
    (m / "new").write_text("new")
    renameat2(m / "new", m / "g", RENAME_EXCHANGE)
    assert ((m / "new").read_text(), (m / "g").read_text()) == ("lower g\n", "new")
    # An upper-only directory and a file.
    os.mkdir(m / "ud")
    (m / "ud/in").write_text("in")
    renameat2(m / "ud", m / "new", RENAME_EXCHANGE)
    assert (m / "new/in").read_text() == "in"
    assert (m / "ud").read_text() == "lower g\n"
    # An upper-only directory moved onto a name a lower directory holds: the lower
    # directory's entries must not show through.
    os.mkdir(m / "ud2")
    (m / "ud2/mine").write_text("m")
    shutil.rmtree(m / "e")  # the lower e/ with z is whited out ...
    (m / "e").write_text("file")  # ... and a file takes its name
    renameat2(m / "ud2", m / "e", RENAME_EXCHANGE)
    assert sorted(os.listdir(m / "e")) == ["mine"]
    assert (m / "ud2").read_text() == "file"
    # What the upper says, for the next mount: the moved directory is opaque.
    assert os.getxattr(m.upper / "e", "trusted.overlay.opaque") == b"y"
    # A directory that exists in a lower layer cannot move; missing names are ENOENT.
    assert_errno(errno.EXDEV, renameat2, m / "d", m / "f", RENAME_EXCHANGE)
    assert_errno(errno.ENOENT, renameat2, m / "f", m / "nothing", RENAME_EXCHANGE)
    assert_errno(errno.EINVAL, renameat2, m / "f", m / "g",
                 RENAME_EXCHANGE | RENAME_NOREPLACE)
    listing = sorted(os.listdir(m.mnt))
    assert {"f", "g", "ud", "ud2", "new", "e"} <= set(listing), listing


# ---------------------------------------------------------------------------
# symlink, link, mknod


def test_symlink_readlink(union, base):
    m = union(*base)
    os.symlink("target/does/not/exist", m / "sl")
    os.symlink("g", m / "d/sg")
    os.symlink("x" * 1000, m / "long")
    assert os.readlink(m / "sl") == "target/does/not/exist"
    assert os.readlink(m / "long") == "x" * 1000
    assert os.lstat(m / "long").st_size == 1000
    assert stat.S_ISLNK(os.lstat(m / "sl").st_mode)
    assert_errno(errno.EEXIST, os.symlink, "x", m / "f")
    assert_errno(errno.EINVAL, os.readlink, m / "f")
    os.symlink("../g", m / "e/up")
    assert (m / "e/up").read_text() == "lower g\n"


def test_link(union, base):
    m = union(*base)
    os.link(m / "g", m / "g-link")
    os.link(m / "d/x", m / "e/x-link")
    (m / "u").write_text("u")
    os.link(m / "u", m / "u-link")
    for a, b in (("g", "g-link"), ("d/x", "e/x-link"), ("u", "u-link")):
        sa, sb = os.lstat(m / a), os.lstat(m / b)
        assert sa.st_ino == sb.st_ino, (a, b)
        assert sa.st_nlink == sb.st_nlink == 2, (a, b)
        assert (m / a).read_bytes() == (m / b).read_bytes()
    with open(m / "g-link", "ab") as f:
        f.write(b"more")
    assert (m / "g").read_text() == "lower g\nmore"
    assert_errno(errno.EEXIST, os.link, m / "g", m / "f")
    assert_errno(errno.EPERM, os.link, m / "d", m / "d-link")
    os.unlink(m / "g")
    assert os.lstat(m / "g-link").st_nlink == 1


def test_mknod(union, base):
    m = union(*base)
    os.mkfifo(m / "fifo", 0o640)
    st = os.lstat(m / "fifo")
    assert stat.S_ISFIFO(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
    os.mknod(m / "null", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    st = os.lstat(m / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3)
    os.mknod(m / "d/blk", stat.S_IFBLK | 0o600, os.makedev(7, 200))
    st = os.lstat(m / "d/blk")
    assert stat.S_ISBLK(st.st_mode) and st.st_rdev == os.makedev(7, 200)
    assert sorted(os.listdir(m.mnt)).count("null") == 1
    assert_errno(errno.EEXIST, os.mkfifo, m / "f")
    # a char device 0/0 is a whiteout: the kernel refuses to make one
    assert_errno(errno.EPERM, os.mknod, m / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))


# ---------------------------------------------------------------------------
# names and paths


def test_long_names(union, base):
    m = union(*base)
    ok = "n" * 255
    (m / ok).write_text("ok")
    assert (m / ok).read_text() == "ok"
    assert_errno(errno.ENAMETOOLONG, os.open, m / ("n" * 256), os.O_CREAT | os.O_WRONLY)
    assert_errno(errno.ENAMETOOLONG, os.lstat, m / ("n" * 256))
    assert_errno(errno.ENAMETOOLONG, os.mkdir, m / ("n" * 256))


def _deep_chain(top_fd: int, depth: int, name: bytes) -> int:
    """mkdir name/name/... ``depth`` deep from ``top_fd``; returns an fd of the last."""
    fd = os.dup(top_fd)
    for _ in range(depth):
        try:
            os.mkdir(name, dir_fd=fd)
        except FileExistsError:
            pass
        nfd = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    return fd


def test_paths_longer_than_path_max(union, tmp_path):
    name = b"p" * 200
    l1 = build(tmp_path / "l1", {})
    lfd = os.open(l1, os.O_RDONLY)
    deep = _deep_chain(lfd, 25, name)  # 5,000+ bytes below the layer root
    with open(os.open(b"lowerfile", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=deep), "wb") as f:
        f.write(b"deep lower")
    os.close(deep)
    os.close(lfd)
    m = union(l1)
    mfd = os.open(m.mnt, os.O_RDONLY)
    try:
        dfd = _deep_chain(mfd, 25, name)
        with open(os.open(b"lowerfile", os.O_RDWR | os.O_APPEND, dir_fd=dfd), "r+b") as f:
            assert f.read() == b"deep lower"
            f.write(b"+up")
        with open(os.open(b"new", os.O_CREAT | os.O_WRONLY, 0o644, dir_fd=dfd), "wb") as f:
            f.write(b"new deep")
        assert sorted(os.listdir(dfd)) == ["lowerfile", "new"]
        os.unlink(b"new", dir_fd=dfd)
        with open(os.open(b"lowerfile", os.O_RDONLY, dir_fd=dfd), "rb") as f:
            assert f.read() == b"deep lower+up"
        os.close(dfd)
    finally:
        os.close(mfd)


# ---------------------------------------------------------------------------
# read-only


def test_read_only_mount_refuses_writes(union, base):
    l1, l2 = base
    before = [snapshot(l1, times=True), snapshot(l2, times=True)]
    m = union(*base, upper=False)
    ops = [
        (os.open, m / "n", os.O_CREAT | os.O_WRONLY, 0o644),
        (os.open, m / "f", os.O_WRONLY),
        (os.open, m / "f", os.O_RDWR | os.O_TRUNC),
        (os.truncate, m / "f", 0),
        (os.mkdir, m / "nd"),
        (os.rmdir, m / "empty"),
        (os.unlink, m / "f"),
        (os.rename, m / "f", m / "f2"),
        (os.symlink, "x", m / "sl"),
        (os.link, m / "f", m / "f2"),
        (os.mkfifo, m / "fifo"),
        (os.chmod, m / "f", 0o600),
        (os.chown, m / "f", 1, 1),
        (os.utime, m / "f", (1, 1)),
        (os.setxattr, m / "f", "user.x", b"1"),
        (os.removexattr, m / "f", "user.x"),
    ]
    for fn, *args in ops:
        assert_errno(errno.EROFS, fn, *args)
    assert (m / "f").read_text() == "lower f\n"
    assert [snapshot(l1, times=True), snapshot(l2, times=True)] == before


# ---------------------------------------------------------------------------
# unionfs only


@unionfs_only
def test_wh_names_are_refused(union, base):
    m = union(*base)
    (m / "plain").write_text("p")
    for name in (".wh.x", ".wh..wh..opq", "d/.wh.y", ".wh.f"):
        assert_errno(errno.EINVAL, os.open, m / name, os.O_CREAT | os.O_WRONLY, 0o644)
        assert_errno(errno.EINVAL, os.mkdir, m / name)
        assert_errno(errno.EINVAL, os.symlink, "t", m / name)
        assert_errno(errno.EINVAL, os.mkfifo, m / name)
        assert_errno(errno.EINVAL, os.link, m / "plain", m / name)
        assert_errno(errno.EINVAL, os.rename, m / "plain", m / name)
    assert (m / "plain").read_text() == "p"
    assert m.upper is not None
    assert not [p for p in m.upper.rglob(".wh.*")]
    assert listing(m.mnt) == sorted(["d", "e", "empty", "f", "g", "o", "plain", "s"])


def _exercise(m) -> None:
    """A bit of everything, through the mount, no hard links."""
    (m / "new").write_text("new")
    with open(m / "g", "ab") as f:
        f.write(b"appended")
    os.unlink(m / "f")
    os.unlink(m / "d/x")
    os.unlink(m / "e/z")
    os.rmdir(m / "e")
    os.mkdir(m / "e")
    (m / "e/fresh").write_text("fresh")
    os.rename(m / "d/y", m / "moved")
    os.makedirs(m / "nd/sub")
    os.symlink("../moved", m / "nd/sub/sl")
    os.chmod(m / "empty", 0o700)
    os.setxattr(m / "moved", "user.k", b"v")
    os.mkfifo(m / "nd/fifo")
    (m / "o/p").write_text("rewritten")
    (m / "w").write_text("reborn")


# unionfs by default writes metadata-only copies (kernel metacopy format), which a kernel
# reads with metacopy=on; with -o metacopy=off it writes whole copies, which the
# reference kernel options (metacopy=off) read.
metacopy_modes = pytest.mark.parametrize(
    ("options", "reader"),
    [((), READER_OPTS), (("-o", "metacopy=off"), OVERLAY_OPTS)],
    ids=["metacopy", "no-metacopy"],
)


def _metadata_changes(m) -> None:
    """Metadata-only changes to lower files (metadata-only copy-ups, where enabled)."""
    os.chmod(m / "g", 0o600)
    os.chown(m / "d/x", 1000, 1000)
    os.utime(m / "e/z", ns=(1, 2))
    os.setxattr(m / "d/y", "user.meta", b"1")


@unionfs_only
def test_written_times_reach_the_upper(union, base):
    """With the writeback cache the kernel keeps a written file's mtime (at its clock's
    granularity) and sends it later, perhaps before the last pages: the upper ends with
    the mtime the mount showed, for a file written in many pages, a new one, and a lower
    file given old times then appended to."""
    m = union(*base)
    block = os.urandom(4096)
    fd = os.open(m / "big", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _ in range(8192):  # 32 MiB in 4 KiB writes: many WRITEs queue behind others
            os.write(fd, block)
    finally:
        os.close(fd)
    (m / "small").write_bytes(b"small")
    os.utime(m / "g", ns=(5, 7))
    with open(m / "g", "ab") as f:
        f.write(b"more")
    names = ("big", "small", "g")
    shown = {name: os.stat(m / name).st_mtime_ns for name in names}
    assert shown["g"] > 7
    m.unmount()
    assert {name: os.stat(m.upper / name).st_mtime_ns for name in names} == shown


@unionfs_only
@metacopy_modes
def test_overlayfs_reads_our_upper(union, base, tmp_path, options, reader):
    m = union(*base, options=options)
    _metadata_changes(m)
    _exercise(m)
    ours = snapshot(m.mnt, times=True)
    m.unmount()
    k = mount_kernel(list(base), m.upper, tmp_path / "kwork", tmp_path / "kmnt", reader)
    try:
        theirs = snapshot(k.mnt, times=True)
    finally:
        k.unmount()
    assert diff_trees(ours, theirs) == []


@unionfs_only
@metacopy_modes
def test_overlayfs_reads_our_upper_after_metadata_changes(union, base, tmp_path, options, reader):
    m = union(*base, options=options)
    _metadata_changes(m)
    ours = snapshot(m.mnt, times=True)
    m.unmount()
    k = mount_kernel(list(base), m.upper, tmp_path / "kwork", tmp_path / "kmnt", reader)
    try:
        theirs = snapshot(k.mnt, times=True)
        # and the kernel can go on from there: a write gives the file its data
        with open(k / "g", "ab") as f:
            f.write(b"+")
        assert (k / "g").read_bytes() == b"lower g\n+"
    finally:
        k.unmount()
    assert diff_trees(ours, theirs) == []


@unionfs_only
@metacopy_modes
def test_overlayfs_reads_our_upper_hard_links(union, tmp_path, options, reader):
    """Lower hard links copied up through one name, unlinked, linked again: the upper
    alone must say it all (the kernel gets a fresh workdir, without any index)."""
    spec = {
        "a": "data",
        "b": HardLink("a"),
        "c": "c",
        "c2": HardLink("c"),
        "e": "e",
        "e2": HardLink("e"),
        "e3": HardLink("e"),
        "m": "meta",
        "m2": HardLink("m"),
    }
    l1 = build(tmp_path / "l1", spec)
    m = union(l1, options=options)
    with open(m / "a", "ab") as f:
        f.write(b"+")
    os.unlink(m / "c")
    os.link(m / "c2", m / "c3")
    os.unlink(m / "e3")
    os.chmod(m / "m2", 0o600)
    ours = snapshot(m.mnt)
    m.unmount()
    k = mount_kernel([l1], m.upper, tmp_path / "kwork", tmp_path / "kmnt", reader)
    try:
        theirs = snapshot(k.mnt)
    finally:
        k.unmount()
    assert diff_trees(ours, theirs) == []
