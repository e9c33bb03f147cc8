"""The daemon itself: what it must never do (die, stall, be asked what the kernel
already knows) and what it must keep (ACLs).

The first test calls the Operations directly (no mount, as STYLE's "ops" level);
the others use real mounts of the daemon in a subprocess.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyfuse3
import pytest
from mounts import UNIONMOUNT, File, build, mount_unionfs

from unionfs import core
from unionfs import mount as mount_module
from unionfs.layers import open_stack
from unionfs.ops import UnionOperations

pytestmark = pytest.mark.usefixtures("mount_guard")


class _Ctx:
    uid = gid = pid = 0
    umask = 0o022


async def test_unexpected_error_is_logged_and_answered_eio(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = build(tmp_path / "l", {"f": "x"})
    ops = UnionOperations(core.build(open_stack([str(layer)]), None))
    entry = await ops.lookup(pyfuse3.ROOT_INODE, b"f", _Ctx())
    assert entry.st_ino

    def broken(*args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(ops.view, "stat", broken)
    ops.view.table[entry.st_ino].changed()
    with caplog.at_level(logging.ERROR), pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.getattr(entry.st_ino, _Ctx())
    assert raised.value.errno == errno.EIO
    assert "a bug" in caplog.text and "Traceback" in caplog.text
    # An OSError keeps its errno and is no error of the daemon's.
    monkeypatch.setattr(ops.view, "stat", lambda *a: (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "no")))
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await ops.getattr(entry.st_ino, _Ctx())
    assert raised.value.errno == errno.EACCES


def test_large_copy_up_does_not_stall_other_requests(tmp_path: Path) -> None:
    big = tmp_path / "lower" / "big"
    build(tmp_path / "lower", {"small": "s", "dir/x": "x"})
    with open(big, "wb") as f:
        f.truncate(0)
        block = os.urandom(1 << 20)
        f.writelines(block for _ in range(768))
    m = mount_unionfs([tmp_path / "lower"], tmp_path / "upper", tmp_path / "work",
                      tmp_path / "mnt", tmp_path / "mnt.log")
    try:
        done = threading.Event()

        def append() -> None:
            with open(m / "big", "ab") as f:  # copies 768 MiB up
                f.write(b"!")
            done.set()

        writer = threading.Thread(target=append)
        writer.start()
        # Wait until the copy is under way in the workdir.
        work = tmp_path / "work" / "work"
        deadline = time.monotonic() + 30
        while not any(work.iterdir()) and not done.is_set():
            assert time.monotonic() < deadline, "the copy-up never started"
            time.sleep(0.005)
        started = time.monotonic()
        assert (m / "small").read_text() == "s"
        os.mkdir(m / "new")
        assert sorted(os.listdir(m / "dir")) == ["x"]
        served = time.monotonic() - started
        still_copying = not done.is_set()
        writer.join(120)
        assert done.is_set()
        assert still_copying, "the copy finished before the other requests: make it larger"
        assert served < 1.0, f"other requests waited {served:.2f}s for the copy-up"
        assert os.path.getsize(m / "big") == (768 << 20) + 1
    finally:
        m.unmount()
    m.assert_log_clean()


_READER = """
import os, sys
root, names = sys.argv[1], sys.argv[2:]
# Half the files are only stat'ed, half only read: a read marks the kernel's atime of
# the file stale (also when a readahead completes later), and the next stat of that
# file asks the daemon for it again; that is FUSE, not a cache miss of ours.
stat_only, read_only = names[::2], names[1::2]
for name in stat_only:
    os.lstat(os.path.join(root, name))
os.lstat(root)
fds = [os.open(os.path.join(root, n), os.O_RDONLY) for n in read_only]
for fd in fds:
    os.pread(fd, 100, 0)
# The first close() sends FLUSH; the daemon answers ENOSYS once and the kernel stops
# sending it, so closing the fds below at exit reaches the daemon only with RELEASE,
# which the kernel sends without waiting.
os.close(os.open(os.path.join(root, read_only[0]), os.O_RDONLY))
print("ready", flush=True)
sys.stdin.readline()
for name in stat_only:
    os.lstat(os.path.join(root, name))
os.lstat(root)
for name, fd in zip(read_only, fds):
    assert os.pread(fd, 100, 0) == name.encode()
print("done", flush=True)
"""


def test_warm_stats_and_reads_do_not_reach_the_daemon(tmp_path: Path) -> None:
    names = [f"d{i}/f{j}" for i in range(5) for j in range(20)]
    lower = build(tmp_path / "lower", {name: name for name in names})
    m = mount_unionfs([lower], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt",
                      tmp_path / "mnt.log")
    reader = subprocess.Popen([sys.executable, "-c", _READER, str(m.mnt), *names],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pids = m.pids
    try:
        assert reader.stdout is not None and reader.stdin is not None
        assert reader.stdout.readline().strip() == "ready"
        assert pids
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        # A stopped daemon answers nothing: what still works is served by the kernel.
        reader.stdin.write("go\n")
        reader.stdin.flush()
        try:
            out, _ = reader.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            raise AssertionError("a warm stat or read reached the (stopped) daemon") from None
        assert out.strip() == "done" and reader.returncode == 0
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        reader.kill()
        reader.wait()
        m.unmount()
    m.assert_log_clean()


def test_acls_are_kept_and_enforced(tmp_path: Path) -> None:
    lower = build(tmp_path / "lower", {"f": File(b"secret", mode=0o600)})
    subprocess.run(["setfacl", "-m", "u:nobody:r", str(lower / "f")], check=True)
    m = mount_unionfs([lower], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt",
                      tmp_path / "mnt.log")

    def nobody_reads(path: Path) -> bool:
        # From an inherited fd of the mount's root: nobody may not walk pytest's 0700
        # temp dirs, and only the ACL of the file itself is under test.
        root = os.open(m.mnt, os.O_PATH | os.O_DIRECTORY)
        try:
            code = ("import os, sys\n"
                    "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
                    f"os.close(os.open({path.name!r}, os.O_RDONLY, dir_fd={root}))\n")
            r = subprocess.run([sys.executable, "-c", code], pass_fds=(root,),
                               capture_output=True, check=False, timeout=10)
        finally:
            os.close(root)
        return r.returncode == 0

    try:
        assert nobody_reads(m.mnt / "f"), "the lower ACL grants nobody read"
        subprocess.run(["setfacl", "-m", "u:nobody:-", str(m.mnt / "f")], check=True)
        assert not nobody_reads(m.mnt / "f"), "the changed ACL must deny it"
        acl = subprocess.run(["getfacl", "-c", str(tmp_path / "upper" / "f")], check=True,
                             capture_output=True, text=True).stdout
        assert "user:nobody:---" in acl, acl
        os.mkdir(m.mnt / "dd")
        subprocess.run(["setfacl", "-d", "-m", "u:nobody:rwx", str(m.mnt / "dd")], check=True)
        (m.mnt / "dd" / "new").write_text("n")
        acl = subprocess.run(["getfacl", "-c", str(m.mnt / "dd" / "new")], check=True,
                             capture_output=True, text=True).stdout
        assert "user:nobody:rwx" in acl, acl
    finally:
        m.unmount()
    m.assert_log_clean()


def test_no_dev_fuse_is_one_clear_error(tmp_path: Path) -> None:
    lower = build(tmp_path / "lower", {"f": "x"})
    (tmp_path / "mnt").mkdir()
    # A private mount namespace whose /dev has no fuse device.
    script = (
        "mount --make-rprivate / && mount -t tmpfs none /dev && "
        f"exec {' '.join(UNIONMOUNT)} {lower} {tmp_path / 'mnt'}"
    )
    r = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True,
                       text=True, timeout=60, check=False, stdin=subprocess.DEVNULL)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unionmount: "), r.stderr
    assert "/dev/fuse" in lines[0]
    assert not os.path.ismount(tmp_path / "mnt")


def test_aborted_connection_ends_the_server_quietly(tmp_path: Path) -> None:
    """An abort through /sys/fs/fuse/connections while requests wait (here: the daemon
    is stopped and a stat hangs on it) ends the server, without a traceback."""
    lower = build(tmp_path / "lower", {"f": "x"})
    m = mount_unionfs([lower], None, None, tmp_path / "mnt", tmp_path / "mnt.log")
    pids = m.pids
    assert pids
    waiting = None
    try:
        control = Path("/sys/fs/fuse/connections")
        if not os.path.ismount(control):
            subprocess.run(["mount", "-t", "fusectl", "fusectl", str(control)], check=True,
                           timeout=30)
        conn = os.minor(os.stat(m.mnt).st_dev)  # /sys/fs/fuse/connections/<minor>
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        waiting = subprocess.Popen([sys.executable, "-c",
                                    f"import os; os.stat({str(m.mnt / 'f')!r})"])
        time.sleep(0.3)  # the stat is now queued for the stopped daemon
        (control / str(conn) / "abort").write_text("1")
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
        for pid in pids:
            for _ in range(500):
                if not os.path.exists(f"/proc/{pid}") or _zombie(pid):
                    break
                time.sleep(0.01)
            else:
                raise AssertionError("the server outlived its aborted connection")
    finally:
        for pid in pids:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGCONT)
        if waiting is not None:
            waiting.wait(30)
        m.unmount()
    m.assert_log_clean()


def test_an_aborted_connection_is_recognised_inside_exception_groups() -> None:
    """pyfuse3 may raise ConnectionAbortedError from its worker tasks: trio wraps it in
    exception groups, which must still count as an abort, and nothing else may."""
    aborted = ConnectionAbortedError(103, "fuse_session_receive_buf failed")
    nested = BaseExceptionGroup("outer", [ExceptionGroup("inner", [aborted])])
    assert mount_module._only(nested, ConnectionAbortedError)
    assert mount_module._only(aborted, ConnectionAbortedError)
    mixed = ExceptionGroup("outer", [aborted, RuntimeError("a bug")])
    assert not mount_module._only(mixed, ConnectionAbortedError)
    assert not mount_module._only(RuntimeError("a bug"), ConnectionAbortedError)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except OSError:
        return True


def test_hard_link_copy_up_in_a_large_layer_does_not_stall_others(tmp_path: Path) -> None:
    """The first copy-up of a hard-linked lower file scans its layer for the other names
    (100,000 entries here); requests for unrelated files are answered meanwhile."""
    lower = tmp_path / "lower"
    build(lower, {"unrelated": "u", "linked": "data"})
    os.link(lower / "linked", lower / "other-name")
    for d in range(100):
        sub = lower / f"d{d:03}"
        sub.mkdir()
        for i in range(1000):
            os.close(os.open(sub / f"f{i:04}", os.O_CREAT | os.O_WRONLY, 0o644))
    m = mount_unionfs([lower], tmp_path / "upper", tmp_path / "work", tmp_path / "mnt",
                      tmp_path / "mnt.log")
    try:
        probe = str(m / "unrelated")
        os.listxattr(probe)
        done = threading.Event()
        took: list[float] = []

        def chmod() -> None:
            start = time.monotonic()
            os.chmod(m / "linked", 0o600)  # a copy-up with data: the names stay one file
            took.append(time.monotonic() - start)
            done.set()

        worker = threading.Thread(target=chmod)
        worker.start()
        waits = []
        while not done.is_set():
            start = time.monotonic()
            os.listxattr(probe)  # no kernel cache for xattrs: every call reaches the daemon
            waits.append(time.monotonic() - start)
        worker.join(60)
        assert took, "the chmod did not finish"
        assert max(waits) < 0.1, f"an unrelated request waited {max(waits):.3f}s"
        assert len(waits) >= 10 and took[0] > 0.1, (
            f"the copy-up took {took[0]:.3f}s, {len(waits)} probes: too quick to tell")
        assert os.stat(m / "linked").st_ino == os.stat(m / "other-name").st_ino
        assert os.stat(m / "other-name").st_mode & 0o777 == 0o600
    finally:
        m.unmount()
    m.assert_log_clean()
    upper = tmp_path / "upper"
    assert os.stat(upper / "linked").st_ino == os.stat(upper / "other-name").st_ino
