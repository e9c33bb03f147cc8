"""The warm mount server (unionfs/zygote.py) behind the ``unionmount`` program.

The program is the console script of the venv (what podman runs); each test gives it
a socket directory of its own (UNIONFS_ZYGOTE_DIR) and stops the server it started.
"""

from __future__ import annotations

import os
import re
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from mounts import build, is_mounted, pid_alive, server_pids, wait_until

from unionfs import cli, quick

pytestmark = pytest.mark.usefixtures("mount_guard")

UNIONMOUNT = str(Path(sys.executable).with_name("unionmount"))


def _zygotes(directory: Path) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                argv = Path(f"/proc/{name}/cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"unionfs.zygote" in argv and any(a.startswith(os.fsencode(directory))
                                                  for a in argv):
                found.append(int(name))
    return found


@pytest.fixture
def zdir(tmp_path: Path):
    directory = tmp_path / "zygote"
    yield directory
    for pid in _zygotes(directory):
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda p=pid: not pid_alive(p), 10)


def _listening(zdir: Path) -> bool:
    """A server is there and has its socket bound (it binds after its imports)."""
    return bool(_zygotes(zdir)) and zdir.is_dir() and any(
        p.suffix == ".sock" for p in zdir.iterdir())


def _run(zdir: Path, *args: object, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "UNIONFS_ZYGOTE_DIR": str(zdir), **env}
    return subprocess.run([UNIONMOUNT, *map(str, args)], capture_output=True, text=True,
                          timeout=60, env=full, check=False)


def _unmount(mnt: Path) -> None:
    pids = server_pids(mnt)
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), 10)


def _layers(tmp_path: Path) -> tuple[Path, Path, Path]:
    lower = build(tmp_path / "l", {"f": "lower"})
    upper, mnt = tmp_path / "u", tmp_path / "m"
    upper.mkdir()
    mnt.mkdir()
    return lower, upper, mnt


def test_the_second_mount_is_done_by_the_warm_server(tmp_path: Path, zdir: Path) -> None:
    lower, upper, mnt = _layers(tmp_path)
    logs = []
    for n in range(3):
        log = tmp_path / f"log{n}"
        r = _run(zdir, lower, "--upper", upper, "--log", log, mnt)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""
        assert (mnt / "f").read_text() == "lower"
        (mnt / f"new{n}").write_text("x")
        # Neither the first daemon nor those the server forks hold OpenSSL (5 MiB resident
        # each; unionfs.DEFERRED).
        pid = int(re.search(r"mounted .* \(pid (\d+),", log.read_text())[1])  # type: ignore[index]
        assert "libcrypto" not in Path(f"/proc/{pid}/maps").read_text(), n
        _unmount(mnt)
        logs.append(log.read_text())
        if n == 0:
            assert wait_until(lambda: _listening(zdir), 90), "no server was started"
    assert "started by unionmount itself" in logs[0]
    assert "started by the warm server" in logs[1] and "started by the warm server" in logs[2]
    assert sorted(os.listdir(upper)) == ["new0", "new1", "new2"]
    # Only its owner may reach it.
    assert stat.S_IMODE(os.stat(zdir).st_mode) == 0o700
    (sock,) = [p for p in zdir.iterdir() if p.suffix == ".sock"]
    assert stat.S_ISSOCK(os.lstat(sock).st_mode)


def test_bad_input_through_the_server_is_one_line(tmp_path: Path, zdir: Path) -> None:
    lower, upper, mnt = _layers(tmp_path)
    r = _run(zdir, lower, "--upper", upper, "--log", tmp_path / "log", mnt)
    assert r.returncode == 0, r.stderr
    _unmount(mnt)
    assert wait_until(lambda: _listening(zdir), 90)
    for args, message in (([f"{lower}:", mnt], "empty layer"),
                          ([tmp_path / "missing", mnt], "does not exist")):
        r = _run(zdir, *args)
        assert r.returncode == 2
        assert r.stderr.count("\n") == 1 and r.stderr.startswith("unionmount: "), r.stderr
        assert message in r.stderr
        assert not is_mounted(mnt)


def test_a_stale_or_idle_server_steps_aside(tmp_path: Path, zdir: Path) -> None:
    lower, upper, mnt = _layers(tmp_path)
    assert _run(zdir, lower, "--upper", upper, mnt, UNIONFS_ZYGOTE_IDLE="2").returncode == 0
    _unmount(mnt)
    assert wait_until(lambda: _listening(zdir), 90)
    # Idle for 2 s: it exits by itself.
    assert wait_until(lambda: not _zygotes(zdir), 30), "the idle server did not exit"
    assert _run(zdir, lower, "--upper", upper, mnt).returncode == 0
    _unmount(mnt)
    assert wait_until(lambda: _listening(zdir), 90)
    # The code on disk changes (a new mtime): the server says so and exits; the mount
    # is made all the same.
    module = Path(quick.__file__)
    st = os.stat(module)
    os.utime(module, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    log = tmp_path / "log"
    r = _run(zdir, lower, "--upper", upper, "--log", log, mnt)
    assert r.returncode == 0, r.stderr
    _unmount(mnt)
    assert "started by unionmount itself" in log.read_text()


def test_no_server_when_turned_off(tmp_path: Path, zdir: Path) -> None:
    lower, upper, mnt = _layers(tmp_path)
    for _ in range(2):
        assert _run(zdir, lower, "--upper", upper, mnt, UNIONFS_ZYGOTE="0").returncode == 0
        _unmount(mnt)
    assert not zdir.exists() and not _zygotes(zdir)


def test_the_program_knows_the_offline_commands() -> None:
    assert quick._COMMANDS == {*cli.SUBCOMMANDS, *cli.IMAGE_COMMANDS}


def test_a_reinstalled_pyfuse3_makes_the_server_stale(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Switching between the stock and the patched pyfuse3 reinstalls its extension
    module: the code stamp a server compares before each request changes with it."""
    import pyfuse3

    from unionfs import zygote

    ext = tmp_path / "pyfuse3.so"
    ext.write_bytes(b"one build")
    monkeypatch.setattr(pyfuse3, "__file__", str(ext))
    loaded = zygote._code_stamp()
    assert zygote._code_stamp() == loaded
    new = tmp_path / "new.so"
    new.write_bytes(b"another build")
    os.replace(new, ext)  # what pip does
    assert zygote._code_stamp() != loaded
