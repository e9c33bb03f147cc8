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
seconds, default 900) and as soon as the unionfs code on disk differs from the code
it loaded. ``UNIONFS_ZYGOTE=0`` turns it off; ``UNIONFS_ZYGOTE_DIR`` puts the socket
elsewhere (tests).
"""

from __future__ import annotations

import fcntl
import io
import os
import select
import signal
import socket
import struct
import sys

_UCRED = struct.Struct("3i")
_VERSION = b"unionfs-zygote-1"
#: A reply: the exit status, then what the command printed on stderr.
_STATUS = struct.Struct("!i")
STALE = 254  # the server's code is not the code on disk: mount without it


def socket_path() -> str:
    """Where this caller's server listens (its uid, user and mount namespace)."""
    base = os.environ.get("UNIONFS_ZYGOTE_DIR") or ""
    if not base and os.geteuid() == 0:
        base = "/run/unionfs"
    elif not base:
        base = os.path.join(os.environ.get("XDG_RUNTIME_DIR") or f"/tmp/unionfs-{os.getuid()}",
                            "unionfs")
    userns = os.stat("/proc/self/ns/user").st_ino
    mntns = os.stat("/proc/self/ns/mnt").st_ino
    return os.path.join(base, f"zygote-{userns}-{mntns}.sock")


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
    from unionfs import cli, mount  # noqa: F401 - the imports this server exists for

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
                    conn.sendall(_STATUS.pack(STALE))
                    return 0
                if os.fork() == 0:
                    listener.close()
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    os._exit(_handle(conn))
    finally:
        os.unlink(path)
        listener.close()


def _reap() -> None:
    try:
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass
    except ChildProcessError:
        pass


def _code_stamp() -> tuple[tuple[str, int], ...]:
    """What identifies the unionfs code on disk: each module's name and mtime."""
    here = os.path.dirname(os.path.abspath(__file__))
    return tuple(sorted((name, os.stat(os.path.join(here, name)).st_mtime_ns)
                        for name in os.listdir(here) if name.endswith(".py")))


def _handle(conn: socket.socket) -> int:
    """Run one command line for the peer and send back its status and stderr."""
    uid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        _UCRED.size))[1]
    if uid != os.geteuid():
        return 1
    request = _receive(conn)
    parts = request.split(b"\0")
    if parts[0] != _VERSION:
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
    conn.sendall(_STATUS.pack(status) + captured.getvalue().encode(errors="replace"))
    conn.shutdown(socket.SHUT_WR)
    return 0


def _receive(conn: socket.socket) -> bytes:
    (size,) = _STATUS.unpack(_exactly(conn, _STATUS.size))
    return _exactly(conn, size)


def _exactly(conn: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("short request")
        data += chunk
    return data


# ------------------------------------------------------------------ the client


def request(argv: list[str], path: str, timeout: float = 120.0) -> tuple[int, bytes] | None:
    """Ask the server at *path* to run *argv*; (status, stderr), or None when there is
    no (usable) server: then the caller mounts by itself."""
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    except OSError:
        return None
    with conn:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            env = [key + b"=" + value for key, value in os.environb.items()]
            body = b"\0".join([_VERSION, os.getcwdb(), b"%d" % len(env), *env,
                               *(os.fsencode(arg) for arg in argv)])
            conn.sendall(_STATUS.pack(len(body)) + body)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        except OSError:
            return None
    if len(reply) < _STATUS.size:
        return None
    (status,) = _STATUS.unpack(reply[:_STATUS.size])
    if status == STALE:
        return None
    return status, reply[_STATUS.size:]


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
