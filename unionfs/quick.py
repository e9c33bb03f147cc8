"""The ``unionmount`` program: a mount goes to the warm server (`zygote`) when there is
one, else (and for everything that is not a plain background mount) to `cli.main`.

This module imports next to nothing, so asking the server costs little more than
starting Python.
"""

from __future__ import annotations

# The C socket module: socket.py would import selectors, enum and more (10 ms of a
# start that must be quick); the methods used here are the same.
import _socket
import os
import struct
import sys

#: The protocol with the warm server (`zygote`): a request is the version, the cwd,
#: the environment and argv, NUL-separated, after its length; a reply is the exit
#: status, then what the command printed on stderr.
VERSION = b"unionfs-zygote-1"
STATUS = struct.Struct("!i")
STALE = 254  # the server's code is not the code on disk: mount without it

#: Options that make a command line something other than a background mount.
_NOT_A_MOUNT = {"-f", "--foreground", "-h", "--help", "--version"}
#: The other commands (cli.SUBCOMMANDS and cli.IMAGE_COMMANDS, spelt again: importing cli
#: is what we avoid).
_COMMANDS = {"inspect", "diff", "export", "import", "commit", "squash", "store"}


def main() -> int:
    argv = sys.argv[1:]
    if (os.environ.get("UNIONFS_ZYGOTE", "1") != "0" and argv and argv[0] not in _COMMANDS
            and not _NOT_A_MOUNT & set(argv)):
        path = socket_path()
        answer = request(argv, path)
        if answer is not None:
            status, printed = answer
            sys.stderr.buffer.write(printed)
            sys.stderr.flush()
            os._exit(status)  # nothing to tear down: the interpreter's finalization is 5 ms
        from unionfs import zygote

        zygote.start(path)
    from unionfs import cli

    return cli.main(argv)


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


def request(argv: list[str], path: str, timeout: float = 120.0) -> tuple[int, bytes] | None:
    """Ask the server at *path* to run *argv*; (status, stderr), or None when there is
    no (usable) server: then the caller mounts by itself."""
    try:
        conn = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    except OSError:
        return None
    try:
        conn.settimeout(timeout)
        try:
            conn.connect(path)
            env = [key + b"=" + value for key, value in os.environb.items()]
            body = b"\0".join([VERSION, os.getcwdb(), b"%d" % len(env), *env,
                               *(os.fsencode(arg) for arg in argv)])
            conn.sendall(STATUS.pack(len(body)) + body)
            reply = b""
            while chunk := conn.recv(65536):
                reply += chunk
        except OSError:
            return None
    finally:
        conn.close()
    if len(reply) < STATUS.size:
        return None
    (status,) = STATUS.unpack(reply[:STATUS.size])
    if status == STALE:
        return None
    return status, reply[STATUS.size:]
