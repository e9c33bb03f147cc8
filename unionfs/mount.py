"""Mount lifecycle: open the layers, pyfuse3.init, trio.run, clean unmount.

`mount()` returns only once the mount is live. In the background mode the
server is a child in its own session, with stdio on /dev/null and no inherited
file descriptors (a server holding a caller's pipe open hangs that caller, as
podman learned); it reports success or a one-line error through a pipe.
SIGTERM and SIGINT unmount cleanly; the server then exits 0.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import os
import signal
import sys
from collections.abc import Callable

import pyfuse3
import trio

from unionfs import copyup, core, fusecaps, sysc, whiteout
from unionfs import ops as ops_module
from unionfs.config import ConfigError, MountConfig, check_private
from unionfs.layers import open_stack
from unionfs.ops import UnionOperations

log = logging.getLogger(__name__)

WORK_SUBDIR = "work"

#: Mount flags libfuse passes to mount(2) itself; the rest are set by `_set_mount_attrs`.
_LIBFUSE_FLAGS = frozenset({"ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec",
                            "sync", "async", "dirsync", "noatime", "atime"})
#: Per-mount attributes libfuse 3.14 cannot ask for (mount_setattr(2) after the mount).
_MOUNT_ATTRS = {
    "strictatime": (sysc.MOUNT_ATTR_STRICTATIME, sysc.MOUNT_ATTR__ATIME),
    "nodiratime": (sysc.MOUNT_ATTR_NODIRATIME, 0),
    "nosymfollow": (sysc.MOUNT_ATTR_NOSYMFOLLOW, 0),
}
#: Flags that cancel each other: the last one given wins (as mount(8) sets and clears
#: bits). Of the atime modes the kernel takes strictatime over noatime over relatime.
_OPPOSITES = (("ro", "rw"), ("suid", "nosuid"), ("dev", "nodev"), ("exec", "noexec"),
              ("sync", "async"), ("atime", "noatime"), ("strictatime", "nostrictatime"),
              ("relatime", "norelatime"), ("diratime", "nodiratime"),
              ("symfollow", "nosymfollow"), ("dirsync",))


def open_workdir(workdir: str, userxattr: bool = False) -> tuple[int, whiteout.Markers]:
    """Open the workdir's ``work`` directory (made private, emptied), creating the workdir
    and ``work`` when missing, and choose how markers are written there: what the
    filesystem and the caller allow (`choose_markers`).

    Everything made here is mode 0700 (the server runs with umask 0). On failure what
    was made is removed again. Raises ConfigError (bad input) or OSError.
    """
    made: list[str] = []
    path = os.path.join(workdir, WORK_SUBDIR)
    try:
        for directory in (workdir, path):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                pass
            else:
                made.append(directory)
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            check_private(f"workdir {workdir}", os.stat(workdir))
            check_private(f"workdir {path}", os.fstat(fd))
            try:
                # Held for the life of the server: a second mount would remove the
                # copies this one is building (the kernel refuses a workdir in use, too).
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise ConfigError(f"workdir {workdir}: in use by another mount") from None
            copyup.clean_workdir(fd)
            markers = choose_markers(workdir, whiteout.probe(fd, copyup.temp_name()),
                                     userxattr)
        except BaseException:
            os.close(fd)
            raise
    except BaseException:
        for directory in reversed(made):
            with contextlib.suppress(OSError):
                os.rmdir(directory)
        raise
    return fd, markers


def choose_markers(workdir: str, support: whiteout.Support,
                   userxattr: bool) -> whiteout.Markers:
    """The format of the upper's markers: the kernel's trusted xattrs where we may set
    them, else (or with ``-o userxattr``) the kernel's userxattr format; where the
    filesystem holds no xattrs, or no whiteout devices, fuse-overlayfs's OCI marker
    files (which the kernel cannot read). Raises ConfigError when ``-o userxattr`` was
    asked for and user xattrs cannot be set."""
    where = f"the filesystem of the upper and workdir {workdir}"
    if userxattr and support.user_xattrs is not None:
        raise ConfigError(f"{where} cannot hold user xattrs ({support.user_xattrs}); "
                          f"-o userxattr needs them")
    if not userxattr and support.trusted_xattrs is None:
        markers = whiteout.TRUSTED
    elif support.user_xattrs is None:
        markers = whiteout.USERXATTR
        if not userxattr:
            log.info("trusted xattrs cannot be set here (%s): writing the userxattr format",
                     support.trusted_xattrs)
    else:
        markers = dataclasses.replace(whiteout.USERXATTR, opaque_files=True)
        log.warning("%s holds no xattrs (%s): opaque directories get OCI marker files, "
                    "which the kernel does not read", where, support.user_xattrs)
    if support.whiteout_devices is not None:
        markers = dataclasses.replace(markers, whiteouts=whiteout.WhiteoutKind.OCI)
        log.warning("%s refuses whiteout devices (%s): whiteouts are OCI marker files, "
                    "which the kernel does not read", where, support.whiteout_devices)
    log.info("upper markers: %s", markers.name)
    return markers


def build_core(config: MountConfig) -> core.Core:
    """Open the layers and the workdir; raises ConfigError or OSError (then nothing is
    left open, and no workdir we made is left)."""
    stack = open_stack(config.lowers, config.upper)
    try:
        work_fd, markers = None, whiteout.TRUSTED
        if not config.read_only:
            assert config.workdir is not None
            work_fd, markers = open_workdir(config.workdir, config.userxattr)
    except BaseException:
        stack.close()
        raise
    # The kernel refuses metacopy=on with userxattr: off there, unless asked for.
    metacopy = config.metacopy if config.metacopy is not None else markers is whiteout.TRUSTED
    return core.build(stack, work_fd, fsync=config.fsync, metacopy=metacopy,
                      read_only=config.read_only, markers=markers,
                      writeback=config.writeback)


def mount_flags(config: MountConfig) -> list[str]:
    """The mount flags to ask for: those given, the last of two opposites winning. As
    root, like ``mount -t overlay``, setuid bits and device nodes work unless ``nosuid``
    or ``nodev`` is given (libfuse's own default is nosuid,nodev)."""
    given = list(config.mount_flags)
    if os.geteuid() == 0:
        given = ["suid", "dev", *given]
    elif {"suid", "dev"} & set(given):
        # fusermount3 mounts nosuid,nodev for every user but root, whatever is asked.
        log.warning("suid and dev need root: the mount is nosuid,nodev")
        given = [flag for flag in given if flag not in ("suid", "dev")]
    flags = []
    for group in _OPPOSITES:
        last = next((flag for flag in reversed(given) if flag in group), None)
        if last is not None:
            flags.append(last)
    if "strictatime" in flags and "noatime" in flags:
        flags.remove("noatime")
    return flags


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
    options |= {flag for flag in mount_flags(config) if flag in _LIBFUSE_FLAGS}
    return options


def _set_mount_attrs(config: MountConfig) -> None:
    """Apply the flags libfuse cannot pass to mount(2), on the new mount."""
    attr_set = attr_clr = 0
    for flag in mount_flags(config):
        if flag in _MOUNT_ATTRS:
            bits, clear = _MOUNT_ATTRS[flag]
            attr_set |= bits
            attr_clr |= clear
    if attr_set:
        sysc.mount_setattr(config.mountpoint, attr_set, attr_clr)


def serve(config: MountConfig, ready: Callable[[str | None], None]) -> int:
    """Mount and serve until unmounted. *ready(None)* is called once the mount is live,
    *ready(message)* on failure. Returns the exit code."""
    # The caller's umask is applied by the kernel to the modes it sends, or with
    # FUSE_DONT_MASK by Changes (fusecaps); what the server makes for itself passes
    # explicit, private modes.
    os.umask(0)
    try:
        parts = build_core(config)
    except ConfigError as exc:
        ready(str(exc))
        return exc.exitcode
    except OSError as exc:
        ready(f"cannot mount {config.mountpoint}: {exc}")
        return 1
    try:
        ops = UnionOperations(parts, config.uid_map, config.gid_map)
        pyfuse3.init(ops, config.mountpoint, fuse_options(config))
    except (OSError, RuntimeError) as exc:
        ready(f"cannot mount {config.mountpoint}: {exc}")
        return 1
    try:
        _set_mount_attrs(config)
    except OSError as exc:
        pyfuse3.close(unmount=True)
        ready(f"cannot mount {config.mountpoint}: {exc}")
        return 1
    log.info("mounted %s (pid %d, started by %s)", config.mountpoint, os.getpid(),
             os.environ.get("UNIONFS_STARTED_BY", "unionmount itself"))
    log.info("%s", fusecaps.describe())
    terminated = False

    async def run() -> None:
        nonlocal terminated
        async with trio.open_nursery() as nursery:
            async def on_signals() -> None:
                nonlocal terminated
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT,
                                               signal.SIGUSR1) as signals:
                    async for signum in signals:
                        if signum == signal.SIGUSR1:
                            log.info("%s", ops_module.requests_line())
                            continue
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
    log.info("unmounted %s; %s", config.mountpoint, ops_module.requests_line())
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
