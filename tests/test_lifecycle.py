"""The daemon's life: --version, mount only once live, unmount every way, detach cleanly.

unionfs only.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from mounts import (
    UNIONMOUNT,
    build,
    is_mounted,
    mount_unionfs,
    pid_alive,
    server_pids,
    unionmount,
    wait_until,
)

import unionfs

pytestmark = pytest.mark.usefixtures("mount_guard")


@pytest.fixture
def layers(tmp_path):
    l1 = build(tmp_path / "l1", {"a": "a", "d/x": "x"})
    l2 = build(tmp_path / "l2", {"b": "b", "d/y": "y"})
    (tmp_path / "upper").mkdir()
    return l1, l2


def _mount(tmp_path, layers, **kw):
    return mount_unionfs(
        list(layers),
        tmp_path / "upper",
        tmp_path / "work",
        tmp_path / "mnt",
        tmp_path / "log",
        **kw,
    )


def _server(m) -> int:
    pids = m.pids
    assert len(pids) == 1, f"want one server process for {m.mnt}, found {pids}"
    return pids[0]


def _gone(m, pid: int, timeout: float = 15) -> None:
    assert wait_until(lambda: not is_mounted(m.mnt), timeout), "still mounted"
    assert wait_until(lambda: not pid_alive(pid), timeout), "server still running"


def test_version():
    r = unionmount("--version", timeout=30)
    assert r.returncode == 0, r.stderr
    assert unionfs.__version__ in r.stdout


def test_mount_is_live_on_return(tmp_path, layers):
    m = _mount(tmp_path, layers)
    try:
        assert os.path.ismount(m.mnt)
        assert sorted(os.listdir(m.mnt)) == ["a", "b", "d"]
        assert (m / "a").read_text() == "a"
    finally:
        m.unmount()
    m.assert_log_clean()


def test_default_workdir_is_next_to_upper(tmp_path, layers):
    up = tmp_path / "upper"
    m = mount_unionfs(list(layers), up, None, tmp_path / "mnt", tmp_path / "log")
    try:
        (m / "a").write_text("copied up")
        assert (tmp_path / "upper.work").is_dir()
        assert (tmp_path / "upper.work" / "work").is_dir()
    finally:
        m.unmount()
    m.assert_log_clean()


def test_symlinked_layers_are_accepted(tmp_path, layers):
    # containers-storage passes each lower as a symlink l/ID -> ../ID/diff
    (tmp_path / "links").mkdir()
    aliases = []
    for i, layer in enumerate(layers):
        a = tmp_path / "links" / f"L{i}"
        os.symlink(os.path.relpath(layer, a.parent), a)
        aliases.append(a)
    m = mount_unionfs(
        aliases, tmp_path / "upper", tmp_path / "work", tmp_path / "mnt", tmp_path / "log"
    )
    try:
        assert sorted(os.listdir(m.mnt)) == ["a", "b", "d"]
    finally:
        m.unmount()
    m.assert_log_clean()


@pytest.mark.parametrize("how", ["fusermount3", "umount"])
def test_unmount_command(tmp_path, layers, how):
    m = _mount(tmp_path, layers)
    pid = _server(m)
    cmd = ["fusermount3", "-u", str(m.mnt)] if how == "fusermount3" else ["umount", str(m.mnt)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    try:
        assert r.returncode == 0, r.stderr
        _gone(m, pid)
    finally:
        m.unmount()
    m.assert_log_clean()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_unmounts_background_server(tmp_path, layers, sig):
    m = _mount(tmp_path, layers)
    pid = _server(m)
    try:
        os.kill(pid, sig)
        _gone(m, pid)
    finally:
        m.unmount()
    m.assert_log_clean()


def _foreground_args(tmp_path, layers, mnt, flag: str) -> list[str]:
    """The command line of a server that stays in the foreground (-f/--foreground)."""
    lowers = ":".join(map(str, layers))
    return [*UNIONMOUNT, lowers, "--upper", str(tmp_path / "upper"),
            "--workdir", str(tmp_path / "work"), flag, str(mnt)]


def _assert_exited_cleanly(p: subprocess.Popen[bytes]) -> None:
    """The foreground server ends with exit 0 and no traceback on its stderr."""
    _, err = p.communicate(timeout=30)
    assert p.returncode == 0, err.decode(errors="replace")
    assert b"Traceback" not in err, err.decode(errors="replace")


def _stop(p: subprocess.Popen[bytes], mnt) -> None:
    """Leave neither the server nor its mount behind."""
    if p.poll() is None:
        p.kill()
        p.wait()
    if is_mounted(mnt):
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_foreground_exits_0(tmp_path, layers, sig):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = _foreground_args(tmp_path, layers, mnt, "-f")
    p = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert wait_until(lambda: is_mounted(mnt) or p.poll() is not None, 30)
        assert p.poll() is None, f"-f server exited: {p.communicate()[1]!r}"
        assert os.path.ismount(mnt)
        assert sorted(os.listdir(mnt)) == ["a", "b", "d"]
        p.send_signal(sig)
        _assert_exited_cleanly(p)
        assert not is_mounted(mnt)
    finally:
        _stop(p, mnt)


def test_foreground_stays_attached(tmp_path, layers):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = _foreground_args(tmp_path, layers, mnt, "--foreground")
    p = subprocess.Popen(
        args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        assert wait_until(lambda: is_mounted(mnt) or p.poll() is not None, 30)
        time.sleep(0.5)
        assert p.poll() is None, "the foreground server returned"
        assert p.pid in server_pids(mnt)
        (mnt / "new").write_text("n")
        r = subprocess.run(
            ["fusermount3", "-u", str(mnt)], capture_output=True, timeout=30, check=False
        )
        assert r.returncode == 0, r.stderr
        _assert_exited_cleanly(p)
    finally:
        _stop(p, mnt)


def test_server_is_detached(tmp_path, layers):
    """Own session, stdio on /dev/null, no inherited descriptors."""
    r_fd, w_fd = os.pipe()
    extra = os.open(tmp_path / "l1" / "a", os.O_RDONLY)
    try:
        mnt = tmp_path / "mnt"
        mnt.mkdir()
        args = [
            ":".join(map(str, layers)),
            "--upper",
            tmp_path / "upper",
            "--workdir",
            tmp_path / "work",
            "--log",
            tmp_path / "log",
            mnt,
        ]
        r = unionmount(*args, pass_fds=(w_fd, extra), timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
        pids = server_pids(mnt)
        assert len(pids) == 1, pids
        pid = pids[0]
        assert os.getsid(pid) == pid, "the server is not in its own session"
        for n in (0, 1, 2):
            assert os.readlink(f"/proc/{pid}/fd/{n}") == "/dev/null", n
        ours = {os.readlink(f"/proc/self/fd/{w_fd}"), os.readlink(f"/proc/self/fd/{extra}")}
        theirs = {os.readlink(f"/proc/{pid}/fd/{n}") for n in os.listdir(f"/proc/{pid}/fd")}
        assert not ours & theirs, f"inherited: {ours & theirs}"
        # nobody holds the write end of the pipe but us: closing it gives EOF at once
        os.close(w_fd)
        w_fd = -1
        assert os.read(r_fd, 1) == b""
    finally:
        os.close(r_fd)
        os.close(extra)
        if w_fd >= 0:
            os.close(w_fd)
        subprocess.run(
            ["fusermount3", "-u", str(tmp_path / "mnt")], capture_output=True, check=False
        )
        wait_until(lambda: not server_pids(tmp_path / "mnt"), 10)
        if is_mounted(tmp_path / "mnt"):
            subprocess.run(["umount", "-l", str(tmp_path / "mnt")], check=False)
    assert "Traceback" not in (tmp_path / "log").read_text()


def test_capture_output_does_not_hang(tmp_path, layers):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        # subprocess.run waits for EOF on the pipes: a server holding them would hang here
        r = subprocess.run(
            [
                *UNIONMOUNT,
                ":".join(map(str, layers)),
                "--upper",
                str(tmp_path / "upper"),
                "--workdir",
                str(tmp_path / "work"),
                str(mnt),
            ],
            capture_output=True,
            timeout=30,
            stdin=subprocess.DEVNULL,
            check=False,
        )
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mnt)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        wait_until(lambda: not server_pids(mnt), 10)
        if is_mounted(mnt):
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_two_mounts_of_the_same_lowers(tmp_path, layers):
    a = mount_unionfs(
        list(layers), tmp_path / "u1", tmp_path / "w1", tmp_path / "m1", tmp_path / "log1"
    )
    b = mount_unionfs(
        list(layers), tmp_path / "u2", tmp_path / "w2", tmp_path / "m2", tmp_path / "log2"
    )
    try:
        (a / "a").write_text("from a")
        assert (b / "a").read_text() == "a"
        assert a.pids and b.pids and set(a.pids).isdisjoint(b.pids)
    finally:
        a.unmount()
        b.unmount()
    a.assert_log_clean()
    b.assert_log_clean()
