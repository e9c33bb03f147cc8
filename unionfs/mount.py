"""Mount lifecycle: open the layers, pyfuse3.init, trio.run, clean unmount.

`mount()` returns only once the mount is live. In the background mode the
server is a child in its own session, with stdio on /dev/null and no inherited
file descriptors (a server holding a caller's pipe open hangs that caller, as
podman learned); it reports success or a one-line error through a pipe.
SIGTERM and SIGINT unmount cleanly; the server then exits 0.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable

import pyfuse3
import trio

from unionfs import copyup
from unionfs.config import ConfigError, MountConfig
from unionfs.layers import Layer, open_layer
from unionfs.ops import UnionOperations
from unionfs.union import Union

log = logging.getLogger(__name__)

WORK_SUBDIR = "work"


def _open_workdir(workdir: str) -> int:
    """Create (if needed) and open the workdir's ``work`` directory, emptied."""
    path = os.path.join(workdir, WORK_SUBDIR)
    os.makedirs(path, mode=0o700, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    copyup.clean_workdir(fd)
    return fd


def build_union(config: MountConfig) -> Union:
    layers: list[Layer] = []
    if config.upper is not None:
        layers.append(open_layer(0, config.upper, writable=True))
    for path in config.lowers:
        layers.append(open_layer(len(layers), path, writable=False))
    work_fd = None
    if config.upper is not None:
        assert config.workdir is not None
        work_fd = _open_workdir(config.workdir)
    return Union(layers, work_fd, fsync=config.fsync, metacopy=config.metacopy)


def fuse_options(config: MountConfig) -> set[str]:
    options = set(pyfuse3.default_options)
    options |= {"fsname=unionfs", "subtype=unionfs"}
    if os.geteuid() == 0:
        options.add("allow_other")
    options |= set(config.fuse_options)
    for name in list(options):
        if name.startswith("no_") and name[3:] in options:
            options.discard(name[3:])
            options.discard(name)
    return options


def serve(config: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve until unmounted. *ready(None)* is called once the mount is live,
    *ready(message)* on failure. Returns the exit code."""
    os.umask(0)
    try:
        union = build_union(config)
        ops = UnionOperations(union, config.uid_map, config.gid_map)
        pyfuse3.init(ops, config.mountpoint, fuse_options(config))
    except (OSError, RuntimeError) as exc:
        ready(f"cannot mount {config.mountpoint}: {exc}")
        return 1
    terminated = False

    async def run() -> None:
        nonlocal terminated
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                nonlocal terminated
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                    async for _ in signals:
                        terminated = True
                        pyfuse3.terminate()
                        return

            nursery.start_soon(on_signals)
            ready(None)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    try:
        trio.run(run)
    except BaseException as exc:
        if _only(exc, ConnectionAbortedError):
            # The kernel ended the connection (an abort through /sys/fs/fuse/connections,
            # or a forced unmount): nothing is left to serve.
            log.warning("the FUSE connection to %s was aborted", config.mountpoint)
            pyfuse3.close(unmount=False)
            return 0
        log.exception("the FUSE main loop failed")
        pyfuse3.close(unmount=True)
        return 1
    pyfuse3.close(unmount=terminated)
    log.info("unmounted %s", config.mountpoint)
    return 0


def _only(exc: BaseException, kind: type[BaseException]) -> bool:
    """True when *exc* is *kind*, or a (trio nursery) exception group of nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        return all(_only(inner, kind) for inner in exc.exceptions)
    return isinstance(exc, kind)


def daemonize(config: MountConfig, setup_logging: Callable[[], None]) -> int:
    """Fork a server in its own session; return 0 once its mount is live."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write_end)
        with os.fdopen(read_end, "rb") as pipe:
            message = pipe.read().decode(errors="replace")
        if message == "ok":
            return 0
        os.waitpid(pid, 0)
        raise ConfigError(message or "the server died before mounting")

    # The server: its own session, no inherited fds, stdio on /dev/null.
    try:
        os.setsid()
        _close_inherited_fds(keep=write_end)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        if devnull > 2:
            os.close(devnull)
        setup_logging()

        def ready(message: str | None) -> None:
            nonlocal write_end
            if write_end < 0:
                return
            os.write(write_end, b"ok" if message is None else message.encode())
            os.close(write_end)
            write_end = -1

        code = serve(config, ready)
        ready("the server stopped before mounting")
    except BaseException:
        log.exception("server failed")
        code = 1
    finally:
        logging.shutdown()
    os._exit(code)


def _close_inherited_fds(keep: int) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd > 2 and fd != keep:
            try:
                os.close(fd)
            except OSError:
                pass


def foreground(config: MountConfig) -> int:
    """Serve in this process (``-f``)."""
    def ready(message: str | None) -> None:
        if message is not None:
            print(f"unionmount: {message}", file=sys.stderr)

    return serve(config, ready)
