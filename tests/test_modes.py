"""Modes of everything the daemon creates.

Its own files (the workdir it makes, ``work/`` in it, the ``--log`` file) are private
to root, whatever the umask of the caller who mounted; a workdir that others could
write is refused. Entries made for a caller get exactly the mode the caller asked for,
less the caller's umask, as on kernel overlayfs; copy-up keeps every mode bit.

The daemon's own files are unionfs only (the kernel has no log and makes no workdir);
entries made through the mount are compared with kernel overlayfs.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from mounts import (
    FIFO,
    File,
    Mount,
    Symlink,
    build,
    force_unmount,
    is_mounted,
    mount_unionfs,
    server_pids,
    unionmount,
)

pytestmark = pytest.mark.usefixtures("mount_guard")

UnionFactory = Callable[..., Mount]
GROUP = 1234
"""The group of the set-group-id directories (no user is in it)."""


@contextmanager
def umask(mask: int) -> Iterator[None]:
    """Run the body with the process umask ``mask`` (children inherit it)."""
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


# ---------------------------------------------------------------------------
# What the daemon makes for itself (unionfs only)


@pytest.mark.parametrize("given", [False, True], ids=["default-UPPER.work", "missing-workdir"])
def test_a_workdir_the_daemon_creates_is_private(tmp_path: Path, given: bool) -> None:
    lower = build(tmp_path / "lower", {"f": "x", "d/g": "g"})
    upper, mnt = tmp_path / "upper", tmp_path / "mnt"
    upper.mkdir()
    mnt.mkdir()
    workdir = tmp_path / "w" if given else None
    made = workdir or tmp_path / "upper.work"
    with umask(0):  # the caller's umask must not decide who can enter the workdir
        m = mount_unionfs([lower], upper, workdir, mnt, tmp_path / "mnt.log")
    try:
        (m / "f").write_text("copied up")
        (m / "d" / "new").write_text("n")  # a directory copy-up too
        for path in (made, made / "work"):
            st = os.lstat(path)
            assert stat.S_ISDIR(st.st_mode), path
            assert stat.S_IMODE(st.st_mode) == 0o700, f"{path}: mode {stat.S_IMODE(st.st_mode):o}"
            assert st.st_uid == 0, f"{path}: owner {st.st_uid}"
        assert os.listdir(made / "work") == []
    finally:
        m.unmount()
    m.assert_log_clean()


def test_the_log_file_is_private(tmp_path: Path) -> None:
    lower = build(tmp_path / "lower", {"f": "x"})
    (tmp_path / "upper").mkdir()
    (tmp_path / "mnt").mkdir()
    log = tmp_path / "mnt.log"
    with umask(0):
        m = mount_unionfs([lower], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt", log)
    try:
        assert log.exists(), "the daemon made no log file"
        assert _mode(log) == 0o600, f"{log}: mode {_mode(log):o}"
        assert os.lstat(log).st_uid == 0
    finally:
        m.unmount()
    m.assert_log_clean()


def _workdir_args(form: str, lower: Path, upper: Path, workdir: Path, mnt: Path,
                  log: Path) -> list[object]:
    if form == "given":
        return [lower, "--upper", upper, "--workdir", workdir, "--log", log, mnt]
    if form == "option":  # as container runtimes call it
        return ["-o", f"lowerdir={lower},upperdir={upper},workdir={workdir}", "--log", log, mnt]
    assert workdir == Path(f"{upper}.work")
    return [lower, "--upper", upper, "--log", log, mnt]


@pytest.mark.parametrize("form", ["given", "option", "default"])
@pytest.mark.parametrize("case", ["world-writable", "other-owner"])
def test_a_workdir_open_to_others_is_refused(tmp_path: Path, form: str, case: str) -> None:
    lower = build(tmp_path / "lower", {"f": "x"})
    upper, mnt = tmp_path / "upper", tmp_path / "mnt"
    upper.mkdir()
    mnt.mkdir()
    workdir = tmp_path / "upper.work" if form == "default" else tmp_path / "w"
    workdir.mkdir()
    (workdir / "work").mkdir(mode=0o700)  # what an earlier mount left
    if case == "world-writable":
        os.chmod(workdir, 0o777)
    else:
        os.chown(workdir, 1000, 1000)
    before = os.lstat(workdir)
    r = unionmount(*_workdir_args(form, lower, upper, workdir, mnt, tmp_path / "log"))
    if is_mounted(mnt):
        force_unmount(str(mnt))
        raise AssertionError(f"mounted on a workdir that others control (exit {r.returncode})")
    assert r.returncode != 0, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("unionmount: "), r.stderr
    assert "workdir" in r.stderr, r.stderr
    assert not is_mounted(mnt) and not server_pids(mnt)
    assert os.listdir(upper) == [] and os.listdir(workdir) == ["work"]
    after = os.lstat(workdir)
    assert (after.st_mode, after.st_uid, after.st_gid) == (
        before.st_mode, before.st_uid, before.st_gid), "the workdir was changed"


@pytest.mark.parametrize("mode", [0o700, 0o755])
def test_a_private_workdir_is_accepted(tmp_path: Path, mode: int) -> None:
    lower = build(tmp_path / "lower", {"f": "x"})
    workdir = tmp_path / "w"
    workdir.mkdir()
    os.chmod(workdir, mode)
    m = mount_unionfs([lower], tmp_path / "upper", workdir, tmp_path / "mnt",
                      tmp_path / "mnt.log")
    try:
        (m / "f").write_text("copied up")
        assert (tmp_path / "upper" / "f").read_text() == "copied up"
    finally:
        m.unmount()
    m.assert_log_clean()


# ---------------------------------------------------------------------------
# Entries made for a caller (kernel and unionfs)


def _sgid_dir(path: Path) -> None:
    path.mkdir()
    os.chown(path, 0, GROUP)
    os.chmod(path, 0o2775)


@pytest.mark.parametrize("mask", [0, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def test_new_entries_get_the_mode_asked_for(
    union: UnionFactory, tmp_path: Path, mask: int
) -> None:
    lower = build(tmp_path / "lower", {"f": "x"})
    _sgid_dir(lower / "sg")
    m = union(lower)
    expected: dict[str, tuple[int, int]] = {}  # name -> (file type | mode, gid)
    with umask(mask):
        for mode in (0o777, 0o666, 0o600, 0o4755, 0o2775, 0o6777):
            name = f"file{mode:o}"
            os.close(os.open(m / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
            expected[name] = (stat.S_IFREG | mode & ~mask, 0)
        for mode in (0o777, 0o755, 0o700, 0o1777, 0o2775):
            name = f"dir{mode:o}"
            os.mkdir(m / name, mode)
            # mkdir(2) takes only the permission and sticky bits from its mode argument.
            expected[name] = (stat.S_IFDIR | mode & 0o1777 & ~mask, 0)
        os.mkfifo(m / "fifo", 0o666)
        expected["fifo"] = (stat.S_IFIFO | 0o666 & ~mask, 0)
        os.mknod(m / "chr", stat.S_IFCHR | 0o666, os.makedev(1, 3))
        expected["chr"] = (stat.S_IFCHR | 0o666 & ~mask, 0)
        os.symlink("f", m / "link")
        expected["link"] = (stat.S_IFLNK | 0o777, 0)
        # In a set-group-id directory of the lower layer (copied up first) and in one
        # made on the mount: the group is the directory's, a subdirectory inherits
        # the set-group-id bit, whatever the umask.
        os.mkdir(m / "newsg", 0o777)
        os.chown(m / "newsg", 0, GROUP)
        os.chmod(m / "newsg", 0o2777)
        expected["newsg"] = (stat.S_IFDIR | 0o2777, GROUP)
        for parent in ("sg", "newsg"):
            os.mkdir(m / parent / "sub", 0o777)
            expected[f"{parent}/sub"] = (stat.S_IFDIR | stat.S_ISGID | 0o777 & ~mask, GROUP)
            os.close(os.open(m / parent / "file", os.O_WRONLY | os.O_CREAT, 0o664))
            expected[f"{parent}/file"] = (stat.S_IFREG | 0o664 & ~mask, GROUP)
            os.mkfifo(m / parent / "fifo", 0o660)
            expected[f"{parent}/fifo"] = (stat.S_IFIFO | 0o660 & ~mask, GROUP)
    assert m.upper is not None
    wrong = []
    for name, (mode, gid) in expected.items():
        for where in (m.mnt, m.upper):
            st = os.lstat(where / name)
            if (st.st_mode, st.st_gid, st.st_uid) != (mode, gid, 0):
                wrong.append(f"{where / name}: mode {st.st_mode:o} gid {st.st_gid} uid "
                             f"{st.st_uid}, expected mode {mode:o} gid {gid} uid 0")
    assert not wrong, "\n".join(wrong)


def test_copy_up_keeps_every_mode_bit(union: UnionFactory, tmp_path: Path) -> None:
    lower = build(tmp_path / "lower", {
        "suid": File(b"#!/bin/sh\n", mode=0o4755),
        "sgid": File(b"sgid", mode=0o2755, gid=GROUP),
        "open": File(b"open", mode=0o666),
        "private": File(b"private", mode=0o600),
        "fifo": FIFO,
        "link": Symlink("open"),
    })
    os.chmod(lower / "fifo", 0o666)
    os.mknod(lower / "chr", stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.chmod(lower / "chr", 0o666)
    (lower / "tmp").mkdir()
    os.chmod(lower / "tmp", 0o1777)
    _sgid_dir(lower / "sgdir")
    expected = {name: os.lstat(lower / name).st_mode for name in os.listdir(lower)}
    m = union(lower)
    with umask(0o077):  # no umask applies to a copy-up
        with open(m / "suid", "ab") as f:  # a copy-up with data
            f.write(b"exit 0\n")
        with open(m / "private", "ab") as f:
            f.write(b"+")
        for name in ("sgid", "fifo", "chr", "link"):  # metadata only (unionfs: metacopy)
            os.utime(m / name, (1_000_000_000, 1_000_000_000), follow_symlinks=False)
        os.setxattr(m / "open", "user.k", b"v")
        (m / "tmp" / "x").write_text("x")  # a directory copied up as a parent
        (m / "sgdir" / "x").write_text("x")
    assert m.upper is not None
    wrong = []
    for name, mode in sorted(expected.items()):
        for where in (m.mnt, m.upper):
            st = os.lstat(where / name)
            if st.st_mode != mode or st.st_uid != 0:
                wrong.append(f"{where / name}: mode {st.st_mode:o} uid {st.st_uid}, "
                             f"expected {mode:o} uid 0")
    assert not wrong, "\n".join(wrong)
    assert os.lstat(m.upper / "sgid").st_gid == GROUP
    assert os.lstat(m.upper / "sgdir").st_gid == GROUP
    assert os.lstat(m.upper / "sgdir" / "x").st_gid == GROUP
    assert m.workdir is not None
    assert os.listdir(m.workdir / "work") == [], "the copy-ups left something in work/"
