"""A frozen MountConfig and its validation: every bad input becomes one clear error.

Validation only reads; it creates nothing. What the upper's filesystem can hold is
learnt at mount time, by a probe inside the workdir (`mount.open_workdir`), where it
changes nothing a user sees.
"""

from __future__ import annotations

import dataclasses
import enum
import errno
import os
import shutil
import stat
from dataclasses import dataclass, field

from unionfs.idmap import IDENTITY, IdMap


class Transport(enum.Enum):
    """The kinds of image reference LAYERS may be instead of directories (`oci`)."""

    OCI = "oci"
    DOCKER_ARCHIVE = "docker-archive"


def is_reference(text: str) -> bool:
    """Whether *text* names an image (``oci:...``, ``docker-archive:...``) rather than
    layer directories. A directory whose name starts so is given as ``./oci:x``."""
    return any(text.startswith(t.value + ":") for t in Transport)


class ConfigError(Exception):
    """A user mistake: printed as one line, without a traceback, exit code 2."""

    exitcode = 2


class LayerError(Exception):
    """A layer or image that cannot be read, exported or imported as asked (corrupt,
    hostile): printed as one line, exit code 1."""

    exitcode = 1


#: Mount flags the kernel honours on any mount (mount(8)'s generic options), as
#: ``mount -t overlay`` takes them: they are asked for from the kernel and show in
#: /proc/mounts. The ``no``-less forms undo their opposites (``suid``, ``dev``, ...).
MOUNT_FLAGS = frozenset({
    "ro", "rw", "suid", "nosuid", "dev", "nodev", "exec", "noexec", "sync", "async",
    "dirsync", "atime", "noatime", "relatime", "norelatime", "strictatime", "nostrictatime",
    "nodiratime", "diratime", "nosymfollow", "symfollow",
})


@dataclass(frozen=True)
class MountConfig:
    lowers: tuple[str, ...]
    upper: str | None
    workdir: str | None
    mountpoint: str
    fuse_options: frozenset[str] = field(default_factory=frozenset)
    #: The `MOUNT_FLAGS` asked for with -o, as given (the last of two opposites wins).
    mount_flags: tuple[str, ...] = ()
    fsync: bool = True
    #: None: on with trusted xattrs, off in the userxattr format (the kernel refuses
    #: metacopy=on with userxattr)
    metacopy: bool | None = None
    #: -o userxattr: write the kernel's unprivileged format even where trusted xattrs work
    userxattr: bool = False
    #: The kernel's writeback cache (-o writeback=0 turns it off): the kernel keeps
    #: written pages and a regular file's size and times, and sends them later.
    writeback: bool = True
    uid_map: IdMap = IDENTITY
    gid_map: IdMap = IDENTITY

    @property
    def read_only(self) -> bool:
        """No writes: no upper, or ``-o ro`` (then the upper is shown, never written)."""
        return self.upper is None or _last_of(self.mount_flags, "ro", "rw") == "ro"


def _last_of(flags: tuple[str, ...], *names: str) -> str | None:
    for flag in reversed(flags):
        if flag in names:
            return flag
    return None


def parse_layers(text: str) -> tuple[str, ...]:
    """Split ``LAYER1:LAYER2:...`` (top-most first). A backslash takes the next character
    literally, so ``\\:`` is a colon inside a path, as the kernel reads ``lowerdir=``.

    Raises ConfigError for an empty item (``a::b``, a leading or trailing ``:``).
    """
    layers: list[str] = []
    current: list[str] = []
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(next(chars, "\\"))
        elif char == ":":
            layers.append("".join(current))
            current = []
        else:
            current.append(char)
    layers.append("".join(current))
    if text and any(not layer for layer in layers):
        raise ConfigError(f"layers {text!r}: an empty layer path (a stray ':')")
    return tuple(layer for layer in layers if layer)


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
        check_private(f"workdir {workdir}", st)
    if st.st_dev != upper_st.st_dev:
        raise ConfigError(f"workdir {workdir}: not on the same filesystem as the upper {upper}")


def check_private(what: str, st: os.stat_result) -> None:
    """Fail unless the directory *st* is ours (or root's) and no one else may change
    what is in it: copy-ups are built there, so a directory another user can write to,
    or rename entries of, would let them plant what we rename into the upper."""
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"{what}: owned by uid {st.st_uid}, not by us")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(f"{what}: writable by other users "
                          f"(mode {stat.S_IMODE(st.st_mode):04o}); make it private")


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


#: Where libfuse 3 runs fusermount3 from first (its FUSERMOUNT_DIR), then $PATH.
FUSERMOUNT = "/usr/bin/fusermount3"
FUSE_CONF = "/etc/fuse.conf"


def check_unprivileged(config: MountConfig, fuse_conf: str = FUSE_CONF) -> None:
    """For a user without root (outside a user namespace of their own, where they are
    root): libfuse mounts through the setuid fusermount3, which refuses what this
    catches first, each as one clear line."""
    if os.geteuid() == 0:
        return
    program = FUSERMOUNT if os.path.exists(FUSERMOUNT) else shutil.which("fusermount3")
    if program is None:
        raise ConfigError("fusermount3 not found: a user without root mounts through it "
                          "(Debian package fuse3)")
    st = os.stat(program)
    if st.st_uid != 0 or not st.st_mode & stat.S_ISUID:
        raise ConfigError(f"{program}: not setuid root, so it cannot mount for a user "
                          f"(chmod u+s {program})")
    mnt = os.stat(config.mountpoint)
    if mnt.st_uid != os.getuid() and (mnt.st_mode & stat.S_ISVTX
                                      or not os.access(config.mountpoint, os.W_OK)):
        raise ConfigError(f"mountpoint {config.mountpoint}: not yours (fusermount3 mounts "
                          f"only on a directory the user owns or may write to)")
    asks = any(option.partition("=")[0] == "allow_other" for option in config.fuse_options)
    if asks and not _user_allow_other(fuse_conf):
        raise ConfigError(f"allow_other: {fuse_conf} does not have user_allow_other, "
                          f"so only root may let other users see a FUSE mount")


def _user_allow_other(fuse_conf: str) -> bool:
    try:
        with open(fuse_conf) as f:
            return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in f)
    except FileNotFoundError:
        return False
