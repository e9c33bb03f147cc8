"""Owner translation between the layers on disk and the mount (fuse-overlayfs's
``uidmapping=``/``gidmapping=`` and ``squash_to_*`` options).

A mapping ``ID:MAPPED:LEN`` says that the ids ID..ID+LEN-1 stored on disk are shown
through the mount as MAPPED..MAPPED+LEN-1, like a line of /proc/PID/uid_map: the
layers of an image keep the ids of the container, and a user namespace sees its own
ids without chowning the files. Ids outside every range show as the overflow id
(65534) and are stored as themselves. A squash makes every entry show one owner;
changing the owner then stores the requested id unchanged.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

OVERFLOW_ID = 65534


class IdMapError(ValueError):
    """A mapping option that does not parse."""


@dataclass(frozen=True)
class IdRange:
    disk: int
    mount: int
    length: int


@dataclass(frozen=True)
class IdMap:
    """One direction-pair of id translation (uids or gids)."""

    ranges: tuple[IdRange, ...] = ()
    squash: int | None = None

    @property
    def identity(self) -> bool:
        return not self.ranges and self.squash is None

    def to_mount(self, disk_id: int) -> int:
        if self.squash is not None:
            return self.squash
        if not self.ranges:
            return disk_id
        for r in self.ranges:
            if r.disk <= disk_id < r.disk + r.length:
                return r.mount + disk_id - r.disk
        return OVERFLOW_ID

    def to_disk(self, mount_id: int) -> int:
        for r in self.ranges:
            if r.mount <= mount_id < r.mount + r.length:
                return r.disk + mount_id - r.mount
        return mount_id


def parse_ranges(text: str) -> tuple[IdRange, ...]:
    """Parse ``ID:MAPPED:LEN[:ID2:MAPPED2:LEN2...]`` (a leading ``:`` is allowed, as
    containers-storage writes it; ``,`` may separate triples too)."""
    fields = [f for f in text.replace(",", ":").split(":") if f != ""]
    if not fields or len(fields) % 3:
        raise IdMapError(f"expected ID:MAPPED-ID:LENGTH triples, got {text!r}")
    try:
        numbers = [int(f) for f in fields]
    except ValueError:
        raise IdMapError(f"not a number in {text!r}") from None
    if any(n < 0 for n in numbers) or any(numbers[i + 2] == 0 for i in range(0, len(numbers), 3)):
        raise IdMapError(f"negative id or empty range in {text!r}")
    return tuple(IdRange(*numbers[i:i + 3]) for i in range(0, len(numbers), 3))


#: No translation: ids on disk are the ids shown.
IDENTITY = IdMap()


#: The xattrs that hold POSIX ACLs (with uids and gids inside).
ACL_XATTRS = frozenset({"system.posix_acl_access", "system.posix_acl_default"})
_ACL_VERSION = 2
_ACL_USER = 0x02
_ACL_GROUP = 0x08
_ACL_ENTRY = struct.Struct("<HHI")


def translate_acl(value: bytes, uids: Callable[[int], int],
                  gids: Callable[[int], int]) -> bytes:
    """A POSIX ACL xattr value (the kernel's little-endian form: a version, then
    tag/perm/id entries) with the ids of its named-user and named-group entries mapped
    by *uids* and *gids*. A value we cannot parse is returned unchanged (the kernel
    validates what is set)."""
    if len(value) < 4 or (len(value) - 4) % _ACL_ENTRY.size or \
            int.from_bytes(value[:4], "little") != _ACL_VERSION:
        return value
    out = bytearray(value[:4])
    for tag, perm, ident in _ACL_ENTRY.iter_unpack(value[4:]):
        if tag == _ACL_USER:
            ident = uids(ident)
        elif tag == _ACL_GROUP:
            ident = gids(ident)
        out += _ACL_ENTRY.pack(tag, perm, ident)
    return bytes(out)
