"""A mount server kept warm: container start should not wait for Python to import trio.

Importing trio and pyfuse3 takes most of a mount's time (a third of a second), and
podman mounts once per container start and per build step. The ``unionmount``
program (`quick.main`) therefore first asks a long-lived server, which has them
imported, to do the mount: the server forks a handler that runs the usual command
line (`cli.main`) in the caller's working directory and environment, and sends back
its exit status and what it printed. Nothing depends on the server: when there is
none (or it is stale, or anything fails), the program mounts by itself as before,
and starts a server for the next time.

Trust: the socket lives in a directory only its owner may enter (``/run/unionfs``
for root, ``$XDG_RUNTIME_DIR/unionfs`` for a user), and the server answers only a
peer with its own uid (SO_PEERCRED). A server serves one mount namespace and one
user namespace, those it was started in: they are part of the socket's name, so a
caller elsewhere starts its own. The server exits when idle (``UNIONFS_ZYGOTE_IDLE``
seconds, default 900) and as soon as the unionfs code (or pyfuse3) on disk differs
from the code it loaded. ``UNIONFS_ZYGOTE=0`` turns it off; ``UNIONFS_ZYGOTE_DIR`` puts the socket
elsewhere (tests).
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import select
import signal
import socket
import struct
import sys

from unionfs.quick import STALE, STATUS, VERSION

_UCRED = struct.Struct("3i")


# ------------------------------------------------------------------ the server


def serve(path: str) -> int:
    """Listen on *path* until idle or stale; one forked handler per request."""
    directory = os.path.dirname(path)
    os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_uid != os.geteuid() or st.st_mode & 0o077:
        return 1  # not ours alone: never listen there
    lock = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return 0  # another server is already here
    # What every mount needs, and no more: each daemon forked from here starts with what
    # the server holds (the image modules would load OpenSSL's libcrypto, 5 MiB resident in
    # every daemon; a mount by image reference imports them in its own handler).
    from unionfs import cli, mount  # noqa: F401 - what this server is for

    cli.prepare()

    loaded = _code_stamp()
    idle = float(os.environ.get("UNIONFS_ZYGOTE_IDLE", "900"))
    if os.path.exists(path):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(64)
    signal.signal(signal.SIGCHLD, lambda *_: _reap())
    try:
        while True:
            ready, _, _ = select.select([listener], [], [], idle)
            if not ready:
                return 0
            try:
                conn, _ = listener.accept()
            except InterruptedError:
                continue
            with conn:
                if _code_stamp() != loaded:
                    conn.sendall(STATUS.pack(STALE))
                    return 0
                if os.fork() == 0:
                    listener.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    _name_process()
                    os._exit(_handle(conn))
    finally:
        os.unlink(path)
        listener.close()


def _name_process() -> None:
    """A handler, and the FUSE server it forks, keep the warm server's command line;
    their name (ps -o comm, pgrep) at least says what they are."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(15, b"unionmount", 0, 0, 0)  # PR_SET_NAME


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _code_stamp() -> tuple[tuple[str, int], ...]:
    """What identifies the code on disk: each unionfs module's name and mtime, and
    pyfuse3's extension module (a reinstall makes a new file: switching between the stock
    and the patched build, README "pyfuse3 patches")."""
    import pyfuse3

    here = os.path.dirname(os.path.abspath(__file__))
    ext = os.stat(pyfuse3.__file__ or "")
    return (*sorted((name, os.stat(os.path.join(here, name)).st_mtime_ns)
                    for name in os.listdir(here) if name.endswith(".py")),
            ("pyfuse3", ext.st_ino), ("pyfuse3", ext.st_mtime_ns))


def _handle(conn: socket.socket) -> int:
    """Run one command line for the peer and send back its status and stderr."""
    uid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        _UCRED.size))[1]
    if uid != os.geteuid():
        return 1
    request = _receive(conn)
    parts = request.split(b"\0")
    if parts[0] != VERSION:
        return 1
    cwd, env_count = parts[1], int(parts[2])
    env = parts[3:3 + env_count]
    argv = [os.fsdecode(arg) for arg in parts[3 + env_count:]]
    os.chdir(cwd)
    os.environ.clear()
    for item in env:
        key, _, value = item.partition(b"=")
        os.environb[key] = value
    os.environ["UNIONFS_STARTED_BY"] = f"the warm server {os.getppid()}"
    captured = io.StringIO()
    real_stderr = sys.stderr
    sys.stderr = captured
    try:
        from unionfs import cli

        status = cli.main(argv)
    except BaseException as exc:  # noqa: BLE001 - nothing may escape a forked handler
        status = 1
        print(f"unionmount: {exc}", file=captured)
    finally:
        sys.stderr = real_stderr
    conn.sendall(STATUS.pack(status) + captured.getvalue().encode(errors="replace"))
    conn.shutdown(socket.SHUT_WR)
    return 0


def _receive(conn: socket.socket) -> bytes:
    (size,) = STATUS.unpack(_exactly(conn, STATUS.size))
    return _exactly(conn, size)


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("short request")
        data += chunk
    return data


# ------------------------------------------------------------------ starting it


def start(path: str) -> None:
    """Start a server for *path* in the background (its own session, stdio on
    /dev/null); it serves the next mount, not this one."""
    devnull = os.open(os.devnull, os.O_RDWR)
    try:
        os.posix_spawn(sys.executable, [sys.executable, "-m", "unionfs.zygote", path],
                       os.environ, setsid=True,
                       file_actions=[(os.POSIX_SPAWN_DUP2, devnull, fd) for fd in (0, 1, 2)])
    except OSError:
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(serve(sys.argv[1]))
