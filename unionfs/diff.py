"""``unionmount diff``: the upper's changes as ``A``/``C``/``D`` lines, computed the way
containers-storage computes them for a mount program ("naive diff",
``archive.ChangesDirs``): the merged view with the upper is compared with the merged
view of the lowers alone, entry by entry. Only reads.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Collection
from dataclasses import dataclass

from unionfs.layers import Found, Stack
from unionfs.merged import (
    CAPABILITY_XATTR,
    MergedDir,
    join,
    read_xattrs,
    root_dir,
    user_visible_xattr,
)

#: Paths podman leaves out of ``podman diff`` (libpod's initInodes: what the runtime
#: mounts or creates in every container), exact paths only: a change below them shows.
PODMAN_HIDDEN = frozenset({
    b"/dev", b"/etc/hostname", b"/etc/hosts", b"/etc/resolv.conf", b"/proc", b"/run",
    b"/run/notify", b"/run/.containerenv", b"/run/secrets", b"/run/podman-init", b"/sys",
    b"/etc/mtab",
})


class ChangeKind(enum.Enum):
    ADD = "A"
    CHANGE = "C"
    DELETE = "D"


@dataclass(frozen=True)
class Change:
    kind: ChangeKind
    path: bytes

    def line(self) -> bytes:
        return self.kind.value.encode() + b" " + self.path


@dataclass(frozen=True)
class _Meta:
    """What containers-storage compares (statDifferent, capability, target, user xattrs)."""

    mode: int
    uid: int
    gid: int
    rdev: int
    mtime_ns: int
    size: int
    target: bytes | None
    capability: bytes | None
    xattrs: tuple[tuple[str, bytes], ...]

    def differs(self, other: _Meta) -> bool:
        if (self.mode, self.uid, self.gid, self.rdev) != (
                other.mode, other.uid, other.gid, other.rdev):
            return True
        if not _same_fs_time(self.mtime_ns, other.mtime_ns):
            return True
        if not stat.S_ISDIR(self.mode) and self.size != other.size:
            return True
        return (self.capability, self.target, self.xattrs) != (
            other.capability, other.target, other.xattrs)


def _same_fs_time(a: int, b: int) -> bool:
    """Equal times, or the same second with either one without nanoseconds (tar and
    many tools drop sub-second precision): containers-storage's sameFsTimeSpec."""
    sec_a, ns_a = divmod(a, 1_000_000_000)
    sec_b, ns_b = divmod(b, 1_000_000_000)
    return sec_a == sec_b and (ns_a == ns_b or ns_a == 0 or ns_b == 0)


def _meta(parent: MergedDir, name: bytes, found: Found) -> _Meta:
    dir_fd = parent.fd_of(found.layer)
    st = found.st
    target = os.readlink(name, dir_fd=dir_fd) if stat.S_ISLNK(st.st_mode) else None
    xattrs = read_xattrs(dir_fd, name, lambda key: key == CAPABILITY_XATTR or (
        key.startswith("user.") and user_visible_xattr(key)))
    capability = xattrs.pop(CAPABILITY_XATTR, None)
    return _Meta(st.st_mode, st.st_uid, st.st_gid, st.st_rdev, st.st_mtime_ns, st.st_size,
                 target, capability, tuple(sorted(xattrs.items())))


def diff(stack: Stack, hidden: Collection[bytes] = ()) -> list[Change]:
    """The changes of the upper, sorted by path, as `podman diff` lists them for a
    container whose storage uses a mount program (containers-storage's naive diff):

    - ``A`` for an entry only in the merged view with the upper, and for everything
      below an added directory;
    - ``D`` for an entry only in the view of the lowers, but not for what is below a
      deleted directory, nor what was below a directory replaced by a non-directory;
    - ``C`` for an entry whose type, mode, owner, rdev, mtime, size (not for
      directories), symlink target, ``user.*`` xattrs or file capability differ, and
      for every directory that holds an A, C or D line (the root is never listed).

    A directory replaced through the mount (rm -rf, then mkdir: opaque in the upper)
    is a ``C`` with a ``D`` for each old entry directly inside and an ``A`` for each new
    one. Lines for the paths in *hidden* are left out afterwards (podman leaves out
    `PODMAN_HIDDEN`; their parent directories keep their ``C``). Raises OSError.
    """
    if stack.upper is None:
        return []
    new_root = root_dir(stack.layers)
    old_root = root_dir(stack.lowers)
    assert new_root is not None
    changes: list[Change] = []
    try:
        _diff_dir(stack, new_root, old_root, (), True, changes)
    finally:
        new_root.close()
        if old_root is not None:
            old_root.close()
    return sorted((change for change in changes if change.path not in hidden),
                  key=lambda change: change.path)


def _diff_dir(stack: Stack, new: MergedDir, old: MergedDir | None,
              components: tuple[bytes, ...], reported: bool, out: list[Change]) -> None:
    """containers-storage's FileInfo.addChanges for the directory *components*.

    *reported*: the directory itself already has an A or C line (or is the root).
    """
    start = len(out)
    old_names = set(old.names()) if old is not None else set()
    for name in new.names():
        found = new.find(name)
        if found is None:
            continue
        child_components = (*components, name)
        path = join(child_components)
        old_found = old.find(name) if old is not None and name in old_names else None
        old_names.discard(name)
        if old_found is None:
            out.append(Change(ChangeKind.ADD, path))
            child_reported = True
        else:
            assert old is not None
            # The same lower entry wins in both views: nothing to compare.
            child_reported = found.layer is not old_found.layer and _meta(
                new, name, found).differs(_meta(old, name, old_found))
            if child_reported:
                out.append(Change(ChangeKind.CHANGE, path))
        if not stat.S_ISDIR(found.st.st_mode):
            continue
        if stack.upper not in found.dir_layers and old_found is not None:
            continue  # the same lower directories merge in both views: nothing differs
        with new.child(name, found) as new_child:
            if old_found is not None and stat.S_ISDIR(old_found.st.st_mode):
                assert old is not None
                with old.child(name, old_found) as old_child:
                    _diff_dir(stack, new_child, old_child, child_components, child_reported,
                              out)
            else:
                _diff_dir(stack, new_child, None, child_components, child_reported, out)
    for name in sorted(old_names):
        out.append(Change(ChangeKind.DELETE, join((*components, name))))
    if len(out) > start and not reported:
        out.insert(start, Change(ChangeKind.CHANGE, join(components)))
