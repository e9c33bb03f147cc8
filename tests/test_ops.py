"""Ops level (STYLE.md habit 14): the `UnionOperations` handlers called directly under
pytest-trio, on a Core built on temp dirs. No mount, no /dev/fuse: a request context is
a plain object, SetattrFields a plain object with its flags, and readdir's replies are
recorded by a stand-in for ``pyfuse3.readdir_reply`` (a real ReaddirToken exists only
inside a request from the kernel; one made here holds a zero-size buffer, so the real
function can only be asked to refuse an entry, which one test does).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyfuse3
import pytest
from mounts import DIR, WHITEOUT, File, Symlink
from unit.stacks import METACOPY_XATTR, Stacks, has_xattr, is_char00, is_opaque

from unionfs import fusecaps
from unionfs import ops as ops_module
from unionfs.idmap import IdMap, IdRange
from unionfs.ops import UnionOperations
from unionfs.sysc import RENAME_EXCHANGE

ROOT = pyfuse3.ROOT_INODE


class _Ctx:
    uid = gid = pid = 0
    umask = 0o022


@dataclass
class _Ctx2:
    uid: int
    gid: int
    pid: int = 0
    umask: int = 0o022


@dataclass
class Fields:
    """What pyfuse3's SetattrFields says (its attributes are read-only in Cython)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_ctime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


CTX = _Ctx()


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Stacks]:
    made = Stacks(tmp_path)
    yield made
    made.close()


class Ops:
    """UnionOperations on a Core of `stacks`; closes the handles it opened."""

    def __init__(self, stacks: Stacks) -> None:
        self.stacks = stacks

    def __call__(self, *lowers: dict[str, object], **kw: object) -> UnionOperations:
        maps = {k: kw.pop(k) for k in ("uid_map", "gid_map") if k in kw}
        return UnionOperations(self.stacks.core(*lowers, **kw), **maps)  # type: ignore[arg-type]


@pytest.fixture
def make(stacks: Stacks) -> Ops:
    return Ops(stacks)


async def _errno(coro: object) -> int:
    with pytest.raises(pyfuse3.FUSEError) as raised:
        await coro  # type: ignore[misc]
    return raised.value.errno


async def _opendir(ops: UnionOperations, inode: int) -> int:
    """opendir's handle: a bare one, or the FileInfo's where pyfuse3 can return one (asking
    the kernel to cache the listing, fusecaps)."""
    reply = await ops.opendir(inode, CTX)
    if fusecaps.CAPS.opendir_file_info:
        assert isinstance(reply, pyfuse3.FileInfo)
        assert reply.cache_readdir and reply.keep_cache
        return reply.fh
    assert isinstance(reply, int)
    return reply


async def _ino(ops: UnionOperations, path: str, parent: int = ROOT) -> int:
    inode = parent
    for part in path.split("/"):
        inode = (await ops.lookup(inode, part.encode(), CTX)).st_ino
        assert inode, f"{path}: {part} not found"
    return inode


class Replies:
    """A stand-in for pyfuse3.readdir_reply: records entries, takes at most *room*."""

    def __init__(self, room: int = 1 << 30) -> None:
        self.room = room
        self.entries: list[tuple[bytes, int, int]] = []

    def __call__(self, token: object, name: bytes, attr: pyfuse3.EntryAttributes,
                 next_id: int) -> bool:
        if len(self.entries) >= self.room:
            return False
        self.entries.append((name, attr.st_ino, next_id))
        return True


# --------------------------------------------------------------------------- lookup, getattr


async def test_lookup_counts_references(make: Ops) -> None:
    ops = make({"d/f": "x"})
    d = await ops.lookup(ROOT, b"d", CTX)
    again = await ops.lookup(ROOT, b"d", CTX)
    node = ops.view.table[d.st_ino]
    assert again.st_ino == d.st_ino and node.lookups == 2
    assert stat.S_ISDIR(d.st_mode) and d.entry_timeout == ops_module.CACHE_TIMEOUT
    dot = await ops.lookup(d.st_ino, b".", CTX)
    dotdot = await ops.lookup(d.st_ino, b"..", CTX)
    assert (dot.st_ino, dotdot.st_ino) == (d.st_ino, ROOT) and node.lookups == 3


async def test_a_negative_lookup_is_a_cacheable_entry(make: Ops) -> None:
    ops = make({".wh.x": "", "gone": WHITEOUT})
    for name in (b"missing", b".wh.x", b"x", b"gone"):
        entry = await ops.lookup(ROOT, name, CTX)
        assert entry.st_ino == 0 and entry.entry_timeout == ops_module.CACHE_TIMEOUT


async def test_unknown_inodes_are_estale(make: Ops) -> None:
    ops = make({})
    assert await _errno(ops.getattr(999_999, CTX)) == errno.ESTALE
    assert await _errno(ops.lookup(999_999, b"x", CTX)) == errno.ESTALE
    assert await _errno(ops.access(999_999, os.R_OK, CTX)) == errno.ESTALE
    assert await ops.access(ROOT, os.R_OK, CTX) is True


async def test_getattr(make: Ops) -> None:
    ops = make({"f": File(b"hello", mode=0o640, uid=7, gid=8, mtime=1e9), "d/x": DIR},
               {"d/y": DIR})
    f = await _ino(ops, "f")
    attrs = await ops.getattr(f, CTX)
    assert (attrs.st_ino, attrs.st_mode, attrs.st_uid, attrs.st_gid, attrs.st_size) == (
        f, stat.S_IFREG | 0o640, 7, 8, 5)
    assert attrs.st_mtime_ns == 10**18 and attrs.attr_timeout == ops_module.CACHE_TIMEOUT
    assert (await ops.getattr(await _ino(ops, "d"), CTX)).st_nlink == 1  # merged


async def test_the_reply_cache_is_refreshed_after_a_change(make: Ops) -> None:
    ops = make({}, upper={"f": "abc"})
    f = await _ino(ops, "f")
    first = await ops.getattr(f, CTX)
    assert await ops.getattr(f, CTX) is first  # one object while nothing changed
    info = await ops.open(f, os.O_WRONLY, CTX)
    assert await ops.write(info.fh, 3, b"defg") == 4
    after = await ops.getattr(f, CTX)
    assert after is not first and after.st_size == 7
    await ops.release(info.fh)
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = 0o600
    changed = await ops.setattr(f, attr, Fields(update_mode=True), None, CTX)
    assert changed is not after and stat.S_IMODE(changed.st_mode) == 0o600
    assert await ops.getattr(f, CTX) is changed


async def test_forget_drops_the_reply_cache_entry(make: Ops) -> None:
    ops = make({"f": "x"})
    f = await _ino(ops, "f")
    await ops.getattr(f, CTX)
    assert f in ops._replies
    await ops.forget([(f, 1)])
    assert f not in ops._replies and ops.view.table.get(f) is None
    assert await _errno(ops.getattr(f, CTX)) == errno.ESTALE
    again = await _ino(ops, "f")
    assert again == f  # the same number for the same layer entry


async def test_forget_of_part_of_the_count_keeps_the_node(make: Ops) -> None:
    ops = make({"f": "x"})
    f = await _ino(ops, "f")
    await _ino(ops, "f")
    await ops.getattr(f, CTX)
    await ops.forget([(f, 1)])
    assert f in ops._replies and (await ops.getattr(f, CTX)).st_ino == f
    await ops.forget([(f, 1), (ROOT, 1)])  # the root is never forgotten
    assert await _errno(ops.getattr(f, CTX)) == errno.ESTALE
    assert (await ops.getattr(ROOT, CTX)).st_ino == ROOT


# --------------------------------------------------------------------------- files


async def test_create_write_read_release(make: Ops, stacks: Stacks) -> None:
    ops = make({"d": DIR})
    d = await _ino(ops, "d")
    info, entry = await ops.create(d, b"f", stat.S_IFREG | 0o644, os.O_RDWR, _Ctx2(12, 34))
    assert ops.view.table[entry.st_ino].lookups == 1 and info.keep_cache
    assert (entry.st_uid, entry.st_gid) == (12, 34)
    assert await ops.write(info.fh, 0, b"hello") == 5
    assert await ops.read(info.fh, 1, 3) == b"ell"
    fd = ops.handles.files[info.fh].fd
    await ops.release(info.fh)
    assert info.fh not in ops.handles.files
    with pytest.raises(OSError):
        os.fstat(fd)
    assert (stacks.upper / "d/f").read_bytes() == b"hello"
    assert os.lstat(stacks.upper / "d/f").st_uid == 12


async def test_a_reader_sees_the_copy_after_a_writer_copied_up(make: Ops,
                                                               stacks: Stacks) -> None:
    ops = make({"f": "lower"})
    f = await _ino(ops, "f")
    reader = await ops.open(f, os.O_RDONLY, CTX)
    assert await ops.read(reader.fh, 0, 10) == b"lower"
    assert os.listdir(stacks.upper) == []
    writer = await ops.open(f, os.O_WRONLY, CTX)
    await ops.write(writer.fh, 0, b"L")
    assert await ops.read(reader.fh, 0, 10) == b"Lower"  # reopened on the copy
    assert ops.handles.files[reader.fh].source is ops.view.upper
    await ops.fsync(writer.fh, True)
    await ops.release(writer.fh)
    await ops.release(reader.fh)
    assert (stacks.lowers[0] / "f").read_bytes() == b"lower"


async def test_setattr_chmod_copies_metadata_only(make: Ops, stacks: Stacks) -> None:
    ops = make({"f": "x" * 10_000})
    f = await _ino(ops, "f")
    attr = pyfuse3.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o600
    attr.st_uid = 77
    reply = await ops.setattr(f, attr, Fields(update_mode=True, update_uid=True), None, CTX)
    assert stat.S_IMODE(reply.st_mode) == 0o600 and reply.st_uid == 77
    assert reply.st_size == 10_000 and reply.st_blocks > 0  # the data's, below
    up = stacks.upper / "f"
    assert has_xattr(up, METACOPY_XATTR) and os.lstat(up).st_blocks == 0


async def test_setattr_truncate_through_a_handle(make: Ops, stacks: Stacks) -> None:
    ops = make({"f": "0123456789"})
    f = await _ino(ops, "f")
    info = await ops.open(f, os.O_WRONLY, CTX)
    attr = pyfuse3.EntryAttributes()
    attr.st_size = 4
    reply = await ops.setattr(f, attr, Fields(update_size=True), info.fh, CTX)
    await ops.release(info.fh)
    assert reply.st_size == 4 and (stacks.upper / "f").read_bytes() == b"0123"


async def test_setattr_times(make: Ops, stacks: Stacks) -> None:
    ops = make({"f": "x"})
    f = await _ino(ops, "f")
    attr = pyfuse3.EntryAttributes()
    attr.st_atime_ns, attr.st_mtime_ns = 3 * 10**9, 4 * 10**9
    reply = await ops.setattr(f, attr, Fields(update_atime=True, update_mtime=True), None, CTX)
    st = os.lstat(stacks.upper / "f")
    assert (reply.st_atime_ns, reply.st_mtime_ns) == (st.st_atime_ns, st.st_mtime_ns) == (
        3 * 10**9, 4 * 10**9)


async def test_symlink_readlink_mknod_link(make: Ops, stacks: Stacks) -> None:
    ops = make({"a": "data"})
    s = await ops.symlink(ROOT, b"s", b"target", CTX)
    assert await ops.readlink(s.st_ino, CTX) == b"target"
    p = await ops.mknod(ROOT, b"p", stat.S_IFIFO | 0o644, 0, CTX)
    assert stat.S_ISFIFO(p.st_mode)
    a = await _ino(ops, "a")
    linked = await ops.link(a, ROOT, b"b", CTX)
    assert linked.st_ino == a and linked.st_nlink == 2
    assert ops.view.table[a].lookups == 2
    assert os.lstat(stacks.upper / "a").st_ino == os.lstat(stacks.upper / "b").st_ino
    code = await _errno(ops.mknod(ROOT, b"w", stat.S_IFCHR | 0o600, 0, CTX))
    assert code == errno.EPERM  # a whiteout would delete


# --------------------------------------------------------------------------- directories


async def test_mkdir_rmdir_unlink_on_disk(make: Ops, stacks: Stacks) -> None:
    ops = make({"d/x": "x", "f": "x"})
    d = await _ino(ops, "d")
    await ops.unlink(d, b"x", CTX)
    await ops.rmdir(ROOT, b"d", CTX)
    assert is_char00(stacks.upper / "d")
    await ops.unlink(ROOT, b"f", CTX)
    assert is_char00(stacks.upper / "f")
    entry = await ops.mkdir(ROOT, b"d", stat.S_IFDIR | 0o755, CTX)
    assert is_opaque(stacks.upper / "d") and stat.S_ISDIR(entry.st_mode)
    assert (await ops.lookup(entry.st_ino, b"x", CTX)).st_ino == 0


async def test_rename_and_exchange(make: Ops, stacks: Stacks) -> None:
    ops = make({"a": "lower a"}, upper={"b": "upper b"})
    await ops.rename(ROOT, b"a", ROOT, b"c", 0, CTX)
    assert is_char00(stacks.upper / "a") and (stacks.upper / "c").read_bytes() == b"lower a"
    await ops.rename(ROOT, b"b", ROOT, b"c", RENAME_EXCHANGE, CTX)
    assert (stacks.upper / "b").read_bytes() == b"lower a"
    assert (stacks.upper / "c").read_bytes() == b"upper b"


async def test_errnos_reach_the_kernel(make: Ops) -> None:
    ops = make({"lowdir/x": "x", "full/y": "y", "f": "x"})
    assert await _errno(ops.rename(ROOT, b"lowdir", ROOT, b"z", 0, CTX)) == errno.EXDEV
    assert await _errno(ops.rmdir(ROOT, b"full", CTX)) == errno.ENOTEMPTY
    assert await _errno(ops.unlink(ROOT, b"missing", CTX)) == errno.ENOENT
    assert await _errno(ops.mkdir(ROOT, b"f", 0o755, CTX)) == errno.EEXIST
    assert await _errno(ops.create(ROOT, b".wh.f", 0o644, os.O_WRONLY, CTX)) == errno.EINVAL
    assert await _errno(ops.mkdir(ROOT, b".wh.d", 0o755, CTX)) == errno.EINVAL
    assert await _errno(ops.rename(ROOT, b"f", ROOT, b".wh.g", 0, CTX)) == errno.EINVAL
    assert await _errno(ops.lookup(ROOT, b"n" * 300, CTX)) == errno.ENAMETOOLONG


async def test_a_read_only_core_is_erofs(make: Ops) -> None:
    ops = make({"f": "x", "d": DIR}, read_only=True)
    f = await _ino(ops, "f")
    for call in (ops.mkdir(ROOT, b"n", 0o755, CTX), ops.unlink(ROOT, b"f", CTX),
                 ops.rmdir(ROOT, b"d", CTX), ops.create(ROOT, b"n", 0o644, os.O_WRONLY, CTX),
                 ops.rename(ROOT, b"f", ROOT, b"g", 0, CTX), ops.open(f, os.O_RDWR, CTX),
                 ops.setxattr(f, b"user.x", b"1", CTX), ops.symlink(ROOT, b"s", b"t", CTX)):
        assert await _errno(call) == errno.EROFS
    info = await ops.open(f, os.O_RDONLY, CTX)
    assert await ops.read(info.fh, 0, 1) == b"x"
    await ops.release(info.fh)


async def test_opendir_and_readdir(make: Ops, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = make({"d/a": "x", "d/gone": WHITEOUT, "d/.wh.b": "", "d/s": Symlink("a")},
               {"d/b": "hidden", "d/gone": "hidden", "d/c": DIR})
    d = await _ino(ops, "d")
    replies = Replies()
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
    fh = await _opendir(ops, d)
    await ops.readdir(fh, 0, pyfuse3.ReaddirToken())
    names = [name for name, _, _ in replies.entries]
    assert names[:2] == [b".", b".."] and sorted(names[2:]) == [b"a", b"c", b"s"]
    assert [next_id for _, _, next_id in replies.entries] == [1, 2, 3, 4, 5]
    inodes = {name: ino for name, ino, _ in replies.entries}
    assert inodes[b"."] == d and inodes[b".."] == ROOT
    for name in (b"a", b"c", b"s"):  # each entry handed over counts a reference
        assert ops.view.table[inodes[name]].lookups == 1
        assert (await ops.lookup(d, name, CTX)).st_ino == inodes[name]
    assert ops.view.table[d].lookups == 1  # "." and ".." count nothing
    await ops.releasedir(fh)


async def test_readdir_stops_when_the_buffer_is_full(make: Ops,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ops = make({"d/a": "x", "d/b": "x", "d/c": "x"})
    d = await _ino(ops, "d")
    fh = await _opendir(ops, d)
    replies = Replies(room=3)
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies)
    await ops.readdir(fh, 0, pyfuse3.ReaddirToken())
    first = replies.entries
    assert len(first) == 3
    refused = [n for n in ops.view.listing(ops.view.table[d]) if n not in
               {name for name, _, _ in first}]
    assert len(refused) == 2
    # The entry that did not fit took no reference; the next readdir goes on from it.
    replies2 = Replies()
    monkeypatch.setattr(pyfuse3, "readdir_reply", replies2)
    await ops.readdir(fh, first[-1][2], pyfuse3.ReaddirToken())
    assert sorted(name for name, _, _ in replies2.entries) == sorted(refused)
    for name, ino, _ in first[2:] + replies2.entries:
        assert ops.view.table[ino].lookups == 1, name
    await ops.releasedir(fh)


async def test_readdir_with_the_real_reply_function(make: Ops) -> None:
    """A token made outside a request has no room: the real readdir_reply refuses the
    first entry, and nothing is remembered."""
    ops = make({"d/a": "x"})
    d = await _ino(ops, "d")
    fh = await _opendir(ops, d)
    await ops.readdir(fh, 0, pyfuse3.ReaddirToken())
    assert ops.view.table[d].children == {}
    await ops.releasedir(fh)


async def test_releasedir_drops_the_listing_when_the_last_handle_goes(
        make: Ops, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = make({"d/a": "x"})
    d = await _ino(ops, "d")
    node = ops.view.table[d]
    one, two = await _opendir(ops, d), await _opendir(ops, d)
    assert node.listing is None  # the first readdir lists it, not opendir
    monkeypatch.setattr(pyfuse3, "readdir_reply", Replies())
    for fh in (one, two):
        await ops.readdir(fh, 0, pyfuse3.ReaddirToken())
    assert node.listing is not None
    await ops.releasedir(one)
    assert node.listing is not None
    await ops.releasedir(two)
    assert node.listing is None


async def test_statfs_and_fsyncdir(make: Ops, stacks: Stacks) -> None:
    ops = make({})
    data = await ops.statfs(CTX)
    assert data.f_namemax == os.statvfs(stacks.upper).f_namemax
    assert data.f_bsize == os.statvfs(stacks.upper).f_bsize
    assert await ops.fsyncdir(await _opendir(ops, ROOT), True) is None


@pytest.mark.parametrize("fsync", [True, False])
async def test_fsyncdir_syncs_the_upper_part(make: Ops, stacks: Stacks,
                                             monkeypatch: pytest.MonkeyPatch,
                                             fsync: bool) -> None:
    """As kernel overlayfs: a directory's upper part is synced, a lower-only directory
    has nothing to sync, and -o fsync=0 syncs nothing."""
    synced: list[str] = []

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(os, "fsync", record)
    monkeypatch.setattr(os, "fdatasync", record)
    ops = make({"low/f": "x", "merged/g": "y"}, upper={"merged/h": "z"}, fsync=fsync)
    for name in ("low", "merged"):
        await ops.fsyncdir(await _opendir(ops, await _ino(ops, name)), False)
    await ops.fsyncdir(await _opendir(ops, ROOT), True)
    made = (await ops.mkdir(ROOT, b"new", 0o755, CTX)).st_ino
    await ops.fsyncdir(await _opendir(ops, made), False)
    upper = os.path.realpath(stacks.upper)
    assert synced == ([f"{upper}/merged", upper, f"{upper}/new"] if fsync else [])


# --------------------------------------------------------------------------- xattrs


async def test_xattrs(make: Ops, stacks: Stacks) -> None:
    ops = make({"f": File(b"x" * 100, xattrs={"user.a": b"1", "trusted.overlay.origin": b""})})
    f = await _ino(ops, "f")
    assert await ops.listxattr(f, CTX) == [b"user.a"]
    assert await ops.getxattr(f, b"user.a", CTX) == b"1"
    assert await _errno(ops.getxattr(f, b"trusted.overlay.origin", CTX)) == errno.ENODATA
    assert await ops.getxattr(f, b"user.unionfs.layer", CTX) == (
        str(stacks.lowers[0]).encode())
    await ops.setxattr(f, b"user.b", b"2", CTX)
    assert sorted(await ops.listxattr(f, CTX)) == [b"user.a", b"user.b"]
    assert await ops.getxattr(f, b"user.unionfs.copied-up", CTX) == b"yes"
    await ops.removexattr(f, b"user.a", CTX)
    assert await ops.listxattr(f, CTX) == [b"user.b"]
    assert await _errno(ops.removexattr(f, b"user.a", CTX)) == errno.ENODATA
    assert await _errno(ops.setxattr(f, b"user.unionfs.layer", b"x", CTX)) == errno.EPERM
    up = stacks.upper / "f"
    assert has_xattr(up, METACOPY_XATTR) and os.getxattr(up, "user.b") == b"2"


# --------------------------------------------------------------------------- id maps


async def test_ids_are_mapped_both_ways(make: Ops, stacks: Stacks) -> None:
    uids = IdMap((IdRange(0, 100_000, 65536),))
    gids = IdMap((), squash=5)
    ops = make({"f": File(b"x", uid=7, gid=8)}, uid_map=uids, gid_map=gids)
    attrs = await ops.getattr(await _ino(ops, "f"), CTX)
    assert (attrs.st_uid, attrs.st_gid) == (100_007, 5)
    _, entry = await ops.create(ROOT, b"new", 0o644, os.O_WRONLY, _Ctx2(100_012, 3))
    st = os.lstat(stacks.upper / "new")
    assert (st.st_uid, st.st_gid) == (12, 3) and (entry.st_uid, entry.st_gid) == (100_012, 5)


# --------------------------------------------------------------------------- the boundary


async def test_an_unexpected_exception_is_eio_and_logged(
        make: Ops, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = make({})

    async def broken(*args: object) -> None:
        raise KeyError("a bug")

    monkeypatch.setattr(ops.core.changes, "mkdir", broken)
    before = ops_module.REQUESTS["mkdir"]
    with caplog.at_level(logging.ERROR, logger="unionfs.ops"):
        assert await _errno(ops.mkdir(ROOT, b"d", 0o755, CTX)) == errno.EIO
    assert "unexpected error in mkdir" in caplog.text and "Traceback" in caplog.text
    assert "a bug" in caplog.text
    assert ops_module.REQUESTS["mkdir"] == before + 1
    monkeypatch.undo()
    assert (await ops.mkdir(ROOT, b"d", 0o755, CTX)).st_ino  # the next request is served


async def test_an_oserror_keeps_its_errno_and_is_not_logged(
        make: Ops, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    ops = make({"f": "x"})
    f = await _ino(ops, "f")

    def denied(*args: object) -> None:
        raise PermissionError(errno.EACCES, "no")

    monkeypatch.setattr(ops.view, "readlink", denied)
    with caplog.at_level(logging.WARNING):
        assert await _errno(ops.readlink(f, CTX)) == errno.EACCES
    assert caplog.records == []


async def test_an_oserror_without_errno_is_eio(make: Ops, caplog: pytest.LogCaptureFixture,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    ops = make({"f": "x"})
    f = await _ino(ops, "f")
    monkeypatch.setattr(ops.view, "readlink", lambda node: (_ for _ in ()).throw(
        OSError("no errno")))
    with caplog.at_level(logging.ERROR, logger="unionfs.ops"):
        assert await _errno(ops.readlink(f, CTX)) == errno.EIO
    assert "OSError without errno" in caplog.text


async def test_debug_logs_each_request_with_its_outcome(
        make: Ops, caplog: pytest.LogCaptureFixture) -> None:
    ops = make({"f": "x"})
    with caplog.at_level(logging.DEBUG, logger="unionfs.ops"):
        entry = await ops.lookup(ROOT, b"f", CTX)
        assert await _errno(ops.unlink(ROOT, b"missing", CTX)) == errno.ENOENT
    lines = [r.getMessage() for r in caplog.records]
    # (The fake request context shows in the arguments; a real one is left out.)
    assert any(line.startswith(f"lookup({ROOT}, b'f', ") and
               f"-> inode {entry.st_ino} [" in line and line.endswith(" ms]")
               for line in lines), lines
    assert any(line.startswith(f"unlink({ROOT}, b'missing', ") and "-> ENOENT (" in line
               for line in lines), lines


def test_requests_line() -> None:
    line = ops_module.requests_line()
    assert line.startswith("requests: total=")
    total = int(line.split()[1].split("=")[1])
    assert total == sum(ops_module.REQUESTS.values())
