"""kill -9 of the daemon: the upper is never left with a partial copy-up.

unionfs only. A 1 GiB lower file is being copied up (an append through the mount) when
the daemon is killed; after a lazy unmount and a remount, the file is either the lower
one or a whole copy (original, or original plus the append), never a torn one.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mounts import (
    build,
    file_digest,
    is_mounted,
    kill_all,
    mount_unionfs,
    pid_alive,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("mount_guard")

BIG = 1 << 30
BLOCK = 1 << 20
PART = 64 << 20  # kill once this much of the copy is written


def _write_big(path: Path) -> tuple[str, str]:
    """Write BIG bytes of random-looking data; return sha256 of it and of it + b'X'."""
    h = hashlib.sha256()
    seed = os.urandom(BLOCK)
    with open(path, "wb") as f:
        for i in range(BIG // BLOCK):
            # cheap, distinct blocks: a random block with the block number stamped in
            block = i.to_bytes(8, "little") + seed[8:]
            f.write(block)
            h.update(block)
        f.flush()
        os.fsync(f.fileno())
        # push it out of the page cache: the copy-up then reads from disk and takes longer
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
    whole = h.hexdigest()
    h.update(b"X")
    return whole, h.hexdigest()


def _work_files(workdir: Path) -> list[tuple[str, int]]:
    """Files below ``workdir`` with how far they got (the larger of size and allocation)."""
    out = []
    for root, _, files in os.walk(workdir):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except FileNotFoundError:
                continue
            out.append((os.path.join(root, f), max(st.st_size, st.st_blocks * 512)))
    return out


def test_kill_during_copy_up(tmp_path):
    try:
        _kill_during_copy_up(tmp_path)
    finally:  # do not leave gigabytes in pytest's kept temp dirs
        for p in [*tmp_path.glob("*/big"), *tmp_path.glob("work/**/*")]:
            if p.is_file() and not p.is_symlink():
                p.unlink()


def _kill_during_copy_up(tmp_path: Path) -> None:
    lower = build(tmp_path / "l1", {"small": "s"})
    orig, appended = _write_big(lower / "big")
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    m = mount_unionfs([lower], upper, work, mnt, tmp_path / "log1")
    writer = None
    try:
        pids = m.pids
        assert pids, "no server process found"
        writer = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys\nwith open(sys.argv[1], 'ab') as f: f.write(b'X')",
                str(mnt / "big"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # the copy-up goes through a temp file in workdir/work: kill it well under way
        deadline = time.monotonic() + 60
        seen: list[tuple[str, int]] = []
        while time.monotonic() < deadline and writer.poll() is None:
            now = _work_files(work / "work")
            seen = now or seen
            if any(n >= PART for _, n in now):
                break
        kill_all(pids, signal.SIGKILL)
        assert seen, (
            "no temp file in workdir/work before the copy-up ended "
            f"(writer exit {writer.poll()}); copy-up must go through the workdir"
        )
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10)
    finally:
        if writer is not None:
            writer.kill()
            writer.wait()
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=True)
    assert not is_mounted(mnt)
    m.assert_log_clean()

    # the upper holds no copy, or a whole one
    if os.path.lexists(upper / "big"):
        size = os.lstat(upper / "big").st_size
        assert size in (BIG, BIG + 1), f"torn copy-up: {size} bytes in the upper"
        assert file_digest(upper / "big") == (orig if size == BIG else appended)

    m2 = mount_unionfs([lower], upper, work, mnt, tmp_path / "log2")
    try:
        # what the crash left in the workdir is cleaned up by the next mount
        assert not [p for p, _ in seen if os.path.lexists(p)]
        st = os.lstat(mnt / "big")
        assert st.st_size in (BIG, BIG + 1)
        assert file_digest(mnt / "big") == (orig if st.st_size == BIG else appended)
        with open(mnt / "big", "ab") as f:
            f.write(b"Y")
        assert os.lstat(mnt / "big").st_size == st.st_size + 1
        (mnt / "after").write_text("the mount works")
        assert sorted(os.listdir(mnt)) == ["after", "big", "small"]
    finally:
        m2.unmount()
    m2.assert_log_clean()
    assert file_digest(lower / "big") == orig


def test_kill_after_fsync_keeps_data(tmp_path):
    lower = build(tmp_path / "l1", {"f": "lower", "d/x": "x"})
    upper, work, mnt = tmp_path / "upper", tmp_path / "work", tmp_path / "mnt"
    m = mount_unionfs([lower], upper, work, mnt, tmp_path / "log1")
    try:
        pids = m.pids
        assert pids
        with open(mnt / "f", "ab") as f:
            f.write(b"+synced")
            f.flush()
            os.fsync(f.fileno())
        os.mkdir(mnt / "nd")
        with open(mnt / "nd/n", "wb") as f:
            f.write(b"new")
            os.fsync(f.fileno())
        os.unlink(mnt / "d/x")
        kill_all(pids, signal.SIGKILL)
        assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10)
        # a dead FUSE mount answers ENOTCONN until it is unmounted
        try:
            os.listdir(mnt)
        except OSError:
            pass
    finally:
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=True)
    m.assert_log_clean()
    m2 = mount_unionfs([lower], upper, work, mnt, tmp_path / "log2")
    try:
        assert (mnt / "f").read_text() == "lower+synced"
        assert (mnt / "nd/n").read_text() == "new"
        assert os.listdir(mnt / "d") == []
    finally:
        m2.unmount()
    m2.assert_log_clean()
