"""A frozen MountConfig and its validation: every bad input becomes one clear error.

Validation only reads; it creates nothing except a probe entry in the upper that
it removes again, to learn whether the upper's filesystem can hold what we write.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from dataclasses import dataclass, field

from unionfs.idmap import IDENTITY, IdMap


class ConfigError(Exception):
    """A user mistake: printed as one line, without a traceback, exit code 2."""

    exitcode = 2


@dataclass(frozen=True)
class MountConfig:
    lowers: tuple[str, ...]
    upper: str | None
    workdir: str | None
    mountpoint: str
    fuse_options: frozenset[str] = field(default_factory=frozenset)
    fsync: bool = True
    metacopy: bool = True
    uid_map: IdMap = IDENTITY
    gid_map: IdMap = IDENTITY


def default_workdir(upper: str) -> str:
    """The workdir when none is given: a sibling of the upper, ``UPPER.work``."""
    return os.path.abspath(upper).rstrip("/") + ".work"


def _real(path: str) -> str:
    return os.path.realpath(path)


def _inside(path: str, parent: str) -> bool:
    """True when *path* is *parent* or below it (both real paths)."""
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check_dir(kind: str, path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"{kind} {path}: does not exist") from None
    except NotADirectoryError:
        raise ConfigError(f"{kind} {path}: a path component is not a directory") from None
    except PermissionError:
        raise ConfigError(f"{kind} {path}: permission denied") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{kind} {path}: not a directory")
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"{kind} {path}: not readable")
    return st


def _is_mountpoint(real: str) -> bool:
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = line.split(b" ")[4].decode("unicode_escape").encode("latin-1")
            if os.fsdecode(point) == real:
                return True
    return False


def validate(config: MountConfig) -> MountConfig:
    """Check *config*; raises ConfigError naming the first problem found."""
    if not config.lowers:
        raise ConfigError("no lower layer given")
    seen: dict[tuple[int, int], str] = {}
    for layer in config.lowers:
        if not layer:
            raise ConfigError("an empty layer path was given")
        st = check_dir("layer", layer)
        key = (st.st_dev, st.st_ino)
        if key in seen:
            raise ConfigError(f"layer {layer}: the same directory as layer {seen[key]}")
        seen[key] = layer

    _check_mountpoint(config.mountpoint)
    mnt = _real(config.mountpoint)
    lowers = [_real(layer) for layer in config.lowers]
    for layer, real in zip(config.lowers, lowers):
        _check_apart(f"layer {layer}", real, f"the mountpoint {config.mountpoint}", mnt)

    if config.upper is None:
        if config.workdir is not None:
            raise ConfigError("--workdir needs --upper")
        return config

    upper_st = check_dir("upper", config.upper)
    upper = _real(config.upper)
    if not os.access(config.upper, os.W_OK):
        raise ConfigError(f"upper {config.upper}: not writable")
    for layer, real in zip(config.lowers, lowers):
        _check_apart(f"upper {config.upper}", upper, f"layer {layer}", real)
    _check_apart(f"upper {config.upper}", upper, f"the mountpoint {config.mountpoint}", mnt)

    workdir = config.workdir or default_workdir(config.upper)
    _check_workdir(workdir, upper, upper_st, lowers, mnt)
    _probe_upper(config.upper)
    return dataclasses.replace(config, workdir=workdir)


def _check_apart(what: str, real: str, other: str, other_real: str) -> None:
    """Fail when *what* (at the real path *real*) is, is inside or contains *other*."""
    if real == other_real:
        raise ConfigError(f"{what}: the same directory as {other}")
    if _inside(real, other_real):
        raise ConfigError(f"{what}: inside {other}")
    if _inside(other_real, real):
        raise ConfigError(f"{what}: contains {other}")


def _check_mountpoint(path: str) -> os.stat_result:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ConfigError(f"mountpoint {path}: does not exist") from None
    except OSError as exc:
        raise ConfigError(f"mountpoint {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"mountpoint {path}: not a directory")
    if _is_mountpoint(_real(path)):
        raise ConfigError(f"mountpoint {path}: already a mount point")
    return st


def _check_workdir(workdir: str, upper: str, upper_st: os.stat_result, lowers: list[str],
                   mnt: str) -> None:
    real = _real(workdir)
    if _inside(real, upper) or _inside(upper, real):
        raise ConfigError(f"workdir {workdir}: must be outside the upper, and not contain it")
    if any(_inside(real, layer) for layer in lowers):
        raise ConfigError(f"workdir {workdir}: inside a lower layer")
    if _inside(real, mnt):
        raise ConfigError(f"workdir {workdir}: inside the mountpoint")
    try:
        st = os.stat(workdir)
    except FileNotFoundError:
        parent = os.path.dirname(real)
        try:
            st = os.stat(parent)
        except FileNotFoundError:
            raise ConfigError(f"workdir {workdir}: its parent does not exist") from None
    else:
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"workdir {workdir}: not a directory")
    if st.st_dev != upper_st.st_dev:
        raise ConfigError(f"workdir {workdir}: not on the same filesystem as the upper {upper}")


def _probe_upper(upper: str) -> None:
    """Fail unless the upper's filesystem holds trusted xattrs and device nodes."""
    probe = os.path.join(upper, f".unionfs-probe-{os.getpid()}")
    try:
        os.mkdir(probe, 0o700)
    except OSError as exc:
        raise ConfigError(f"upper {upper}: cannot create entries: {exc.strerror}") from None
    try:
        try:
            os.setxattr(probe, "trusted.unionfs.probe", b"y")
        except OSError as exc:
            raise ConfigError(
                f"upper {upper}: its filesystem cannot hold trusted xattrs "
                f"({exc.strerror}); opaque directories need them") from None
        try:
            os.mknod(os.path.join(probe, "wh"), stat.S_IFCHR | 0o600, os.makedev(0, 0))
        except OSError as exc:
            raise ConfigError(
                f"upper {upper}: its filesystem cannot hold device nodes "
                f"({exc.strerror}); whiteouts need them") from None
    finally:
        for leftover in ("wh",):
            try:
                os.unlink(os.path.join(probe, leftover))
            except FileNotFoundError:
                pass
        os.rmdir(probe)


def check_fuse() -> None:
    """Fail unless /dev/fuse can be opened."""
    try:
        fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise ConfigError("/dev/fuse does not exist: load the fuse module") from None
    except PermissionError:
        raise ConfigError("/dev/fuse: permission denied (no permission to mount)") from None
    except OSError as exc:
        if exc.errno == errno.ENODEV:
            raise ConfigError("/dev/fuse: no FUSE support in this kernel") from None
        raise ConfigError(f"/dev/fuse: {exc.strerror}") from None
    os.close(fd)
