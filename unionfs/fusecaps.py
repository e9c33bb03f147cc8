"""What the pyfuse3 in use can ask of the kernel, found by probing its API.

The install scripts build pyfuse3 from its sdist with the patches in scripts/pyfuse3-patches/
(README, "pyfuse3 patches"); with ``UNIONFS_STOCK_PYFUSE3=1``, or under any other install,
it is the stock pyfuse3, which lacks what they add, and unionfs must work on it too (slower).
A feature is recognised by the API it adds, never by a version number, so a pyfuse3 release
that takes one of the patches upstream is used as it is.

Like ops.py and mount.py, this module imports pyfuse3: it is the one place that knows how
each feature shows in pyfuse3's API.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import pyfuse3


@dataclass(frozen=True)
class FuseCaps:
    """The features of one pyfuse3, each named for the patch that adds it."""

    #: 0001: ``Operations.opendir`` may return a `pyfuse3.FileInfo`, whose ``cache_readdir``
    #: (with ``keep_cache``) lets the kernel answer later listings of the directory from its
    #: cache, until an entry is created, removed or renamed in it through the mount, its
    #: mtime changes, or the daemon invalidates the inode.
    opendir_file_info: bool
    #: 0002: ``Operations.enable_dont_mask = True`` asks for FUSE_DONT_MASK. create, mknod and
    #: mkdir then get the mode the caller asked for, before the umask, and apply
    #: ``RequestContext.umask`` themselves (which is the caller's umask whether or not the
    #: kernel granted the flag, so applying it is right on either pyfuse3).
    dont_mask: bool


def probe(module: ModuleType) -> FuseCaps:
    """The features of the pyfuse3 *module* (or anything shaped like it)."""
    return FuseCaps(
        # A `cdef public` attribute of the Cython class: a descriptor on the type.
        opendir_file_info=hasattr(module.FileInfo, "cache_readdir"),
        dont_mask=hasattr(module.Operations, "enable_dont_mask"),
    )


#: The features of the pyfuse3 this process runs on.
CAPS = probe(pyfuse3)


def opendir_reply(fh: int) -> int | pyfuse3.FileInfo:
    """What ``opendir`` returns for the directory handle *fh*: where pyfuse3 can say so, a
    `pyfuse3.FileInfo` asking the kernel to cache the listing and to keep that cache across
    opens (``keep_cache``: without it every opendir drops it); else the bare handle."""
    if CAPS.opendir_file_info:
        # A stock pyfuse3's stub has no cache_readdir (and this line never runs there).
        return pyfuse3.FileInfo(fh=fh, keep_cache=True,
                                cache_readdir=True)  # type: ignore[call-arg, unused-ignore]
    return fh


def describe() -> str:
    """One line for the log: pyfuse3's version and which of the features it has."""
    have = [name for name, present in vars(CAPS).items() if present]
    return f"pyfuse3 {pyfuse3.__version__} ({', '.join(have) or 'no patched features'})"
