"""Argument parsing, logging set-up and exit codes; nothing else.

    unionmount LAYER1:LAYER2:... [--upper DIR] [--workdir DIR] [-o OPTS] MOUNTPOINT
    unionmount -o lowerdir=L1:L2,upperdir=U,workdir=W MOUNTPOINT      (fuse-overlayfs style)
    unionmount SOURCE MOUNTPOINT -o ...                               (mount.fuse3 style)
"""

from __future__ import annotations

import argparse
import functools
import logging
import logging.handlers
import os
import sys

from unionfs import __version__
from unionfs.config import (
    MOUNT_FLAGS,
    ConfigError,
    LayerError,
    MountConfig,
    check_fuse,
    check_unprivileged,
    is_reference,
    parse_layers,
    validate,
)
from unionfs.idmap import IdMap, IdMapError, parse_ranges

log = logging.getLogger(__name__)

#: Commands that inspect layers without mounting (unionfs/tools.py).
SUBCOMMANDS = ("inspect", "diff", "export", "import")
#: Commands on images and the layer store (unionfs/imagecli.py).
IMAGE_COMMANDS = ("commit", "squash", "store")
#: -o keys that configure the union itself; every other key is a FUSE option.
_UNION_KEYS = {"lowerdir", "upperdir", "workdir"}
#: fuse-overlayfs keys runtimes pass that need nothing from us.
_TOLERATED = {"volatile", "fsync", "context", "xattr_permissions", "xattr", "noacl",
              "redirect_dir", "index", "threaded", "static_nlink",
              "plugins", "timeout", "fast_ino"}
#: Options FUSE itself takes.
_FUSE_KEYS = {"allow_other", "allow_root", "default_permissions", "no_default_permissions",
              "no_allow_other", "max_read", "fsname", "subtype", "auto_unmount"}


def split_options(text: str) -> list[str]:
    """Split a comma-separated -o list; commas inside double quotes, or after a backslash,
    do not split (the backslash stays, for `parse_layers`)."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    chars = iter(text)
    for char in chars:
        if char == "\\":
            current.append(char + next(chars, ""))
            continue
        if char == '"':
            quoted = not quoted
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
            continue
        current.append(char)
    items.append("".join(current))
    return [item for item in items if item]


_EPILOG = """\
A backslash in LAYERS takes the next character literally: a\\:b is the layer "a:b".

commands that work on layer directories without mounting (unionmount COMMAND --help):
  unionmount inspect LAYERS [--upper DIR] [PATH] [--json]   where entries come from
  unionmount diff LAYERS --upper DIR [--all]                 podman diff's A/C/D lines
  unionmount export LAYERS --upper DIR -o FILE               the upper as an OCI layer tar
  unionmount import LAYER.TAR DIR [--format oci|overlay]     an OCI layer tar as a layer dir

images (LAYERS may also be oci:DIR[:TAG] or docker-archive:FILE, from the layer store):
  unionmount commit IMAGE --upper DIR oci:DIR:TAG            the upper as a new image
  unionmount squash IMAGE oci:DIR:TAG | squash LAYERS FILE   one layer, nothing hidden kept
  unionmount store ls|du|gc|resolve                          the layer store
"""


def prepare() -> None:
    """Build now what every mount needs built (the argument parser): the warm server
    calls it, so that its handlers do not (4 ms each)."""
    _parser()


@functools.cache
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="unionmount",
        usage="%(prog)s [options] LAYERS MOUNTPOINT\n"
              "       %(prog)s -o lowerdir=LAYERS[,upperdir=DIR,workdir=DIR] [SOURCE] MOUNTPOINT\n"
              "       %(prog)s {inspect,diff,export,import,commit,squash,store} ...",
        description="Mount a union of read-only layers (top-most first) and an optional "
                    "writable upper.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("positional", nargs="*", metavar="LAYERS MOUNTPOINT",
                        help="LAYER1:LAYER2:... (top-most first) and the mountpoint")
    parser.add_argument("--upper", help="the writable layer (without it: read-only)")
    parser.add_argument("--workdir", help="scratch dir on the upper's filesystem "
                        "(default: UPPER.work)")
    parser.add_argument("-o", dest="options", action="append", default=[],
                        help="mount options: lowerdir=,upperdir=,workdir=, mount flags "
                             "(ro, nosuid, nodev, noexec, noatime, ...) or FUSE options")
    parser.add_argument("-f", "--foreground", action="store_true",
                        help="stay in the foreground, log to stderr")
    parser.add_argument("--debug", action="store_true",
                        help="log every request, with its result and how long it took")
    parser.add_argument("--log", metavar="FILE", help="log to FILE")
    parser.add_argument("--store", metavar="DIR",
                        help="the layer store for oci:DIR[:TAG] and docker-archive:FILE "
                             "references (default: /var/lib/unionfs/store for root, "
                             "$XDG_DATA_HOME/unionfs/store for a user)")
    parser.add_argument("--version", action="version", version=f"unionmount {__version__}")
    return parser


def parse_config(argv: list[str]) -> tuple[MountConfig, argparse.Namespace]:
    args = _parser().parse_intermixed_args(argv)
    keys: dict[str, str] = {}
    fuse: set[str] = set()
    flags: list[str] = []
    fsync = True
    metacopy: bool | None = None
    userxattr = False
    writeback = True
    ids: dict[str, str] = {}
    for text in args.options:
        for item in split_options(text):
            key, _, value = item.partition("=")
            if key in _UNION_KEYS:
                keys[key] = value
            elif key in _FUSE_KEYS:
                fuse.add(item)
            elif item in MOUNT_FLAGS:
                flags.append(item)
            elif key == "fsync" and value == "0" or key == "volatile":
                fsync = False
            elif key == "metacopy" and value in ("on", "off"):
                metacopy = value == "on"
            elif item == "userxattr":
                userxattr = True
            elif key == "writeback" and value in ("0", "1", "on", "off"):
                writeback = value in ("1", "on")
            elif key in ("uidmapping", "gidmapping", "squash_to_uid", "squash_to_gid",
                         "squash_to_root"):
                ids[key] = value
            elif key in _TOLERATED:
                log.debug("option %s ignored", item)
            else:
                print(f"unionmount: warning: unknown option {item!r} ignored", file=sys.stderr)
    positional = list(args.positional)
    if "lowerdir" in keys:
        if len(positional) == 2:
            positional = positional[1:]  # mount.fuse3: SOURCE MOUNTPOINT
        if len(positional) != 1:
            raise ConfigError("expected one MOUNTPOINT with -o lowerdir=")
        lowers = keys["lowerdir"]
        mountpoint = positional[0]
    else:
        if len(positional) != 2:
            raise ConfigError("expected LAYERS and MOUNTPOINT (see --help)")
        lowers, mountpoint = positional
    upper = args.upper or keys.get("upperdir") or None
    workdir = args.workdir or keys.get("workdir") or None
    config = MountConfig(lowers=_layers(lowers, args.store), upper=upper, workdir=workdir,
                         mountpoint=mountpoint, fuse_options=frozenset(fuse),
                         mount_flags=tuple(flags), fsync=fsync, metacopy=metacopy,
                         userxattr=userxattr, writeback=writeback,
                         uid_map=_id_map(ids, "uid"), gid_map=_id_map(ids, "gid"))
    return config, args


def _layers(text: str, store: str | None) -> tuple[str, ...]:
    """The lower layers: LAYERS as given, or an image reference's layers from the store
    (unpacked there first when needed)."""
    if not is_reference(text):
        return parse_layers(text)
    from unionfs import images

    return tuple(images.resolve(text, store))


def _id_map(ids: dict[str, str], kind: str) -> IdMap:
    """The uid or gid translation from fuse-overlayfs's options."""
    try:
        ranges = parse_ranges(ids[f"{kind}mapping"]) if f"{kind}mapping" in ids else ()
        squash = None
        if f"squash_to_{kind}" in ids:
            squash = int(ids[f"squash_to_{kind}"])
        elif "squash_to_root" in ids:
            squash = 0
    except (IdMapError, ValueError) as exc:
        raise ConfigError(f"option {kind}mapping/squash_to_{kind}: {exc}") from None
    return IdMap(ranges, squash)


def _setup_logging(args: argparse.Namespace, foreground: bool) -> None:
    level = logging.DEBUG if args.debug else logging.INFO
    handler: logging.Handler
    if args.log:
        # Created private: a log names files and may hold other users' names.
        os.close(os.open(args.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC,
                         0o600))
        handler = logging.FileHandler(args.log)
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler(address="/dev/log")
    else:
        handler = logging.NullHandler()
    handler.setFormatter(logging.Formatter(
        "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in SUBCOMMANDS:
        from unionfs import tools  # type: ignore[attr-defined,unused-ignore]

        return int(tools.main(argv))
    if argv and argv[0] in IMAGE_COMMANDS:
        from unionfs import imagecli

        return imagecli.main(argv)
    try:
        config, args = parse_config(argv)
        config = validate(config)
        check_fuse()
        check_unprivileged(config)
        from unionfs import mount  # pyfuse3 is imported only where it is needed

        if args.foreground:
            _setup_logging(args, foreground=True)
            return mount.foreground(config)
        return mount.daemonize(config, lambda: _setup_logging(args, foreground=False))
    except (ConfigError, LayerError) as exc:
        print(f"unionmount: {exc}", file=sys.stderr)
        return exc.exitcode
    except KeyboardInterrupt:
        return 130
