"""changes.py (`Changes`): create, mkdir, mknod, symlink and link, over whiteouts too;
setattr; xattr writes; open for writing. On temp dirs, no mount.

What the upper holds afterwards is compared with what kernel overlayfs leaves: a name
made over a whiteout replaces it, a directory made there is opaque
(trusted.overlay.opaque=y), a metadata change to a lower file copies its metadata only.
The `stacks` fixture checks that the workdir is empty after each test.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import struct
from pathlib import Path

import pytest
from mounts import DIR, WHITEOUT, File, HardLink, Symlink

from unionfs import whiteout
from unionfs.changes import Caller, SetAttrs
from unionfs.core import Core
from unionfs.inodes import FileHandle, Node, NodeState
from unit.stacks import METACOPY_XATTR, Stacks, has_xattr, is_char00, is_opaque, lookup, node

ME = Caller(uid=1234, gid=5678)
OLD = 1_000_000_000


async def _errno(coro: object) -> int | None:
    try:
        await coro  # type: ignore[misc]
    except OSError as exc:
        return exc.errno
    return None


def _default_acl(path: Path) -> None:
    """Give the directory *path* a default ACL (a named user entry: new entries then get
    an access ACL too), written as the kernel's xattr, no setfacl needed."""
    undefined = 0xFFFFFFFF
    entries = [(0x01, 7, undefined), (0x02, 5, 4321), (0x04, 5, undefined),
               (0x10, 5, undefined), (0x20, 0, undefined)]
    value = struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_default", value)


def _close(fd: int) -> None:
    os.close(fd)


# --------------------------------------------------------------------------- create


async def test_create_in_a_lower_directory(stacks: Stacks) -> None:
    c = stacks.core({"d/old": "x"})
    os.chmod(stacks.lowers[0] / "d", 0o750)
    view = c.view
    d = node(view, "d")
    listing = view.listing(d)
    f, fd = await c.changes.create(d, b"new", stat.S_IFREG | 0o640, os.O_WRONLY, ME)
    try:
        assert os.write(fd, b"written") == 7
    finally:
        _close(fd)
    up = stacks.upper / "d/new"
    st = os.lstat(up)
    assert (st.st_mode, st.st_uid, st.st_gid) == (stat.S_IFREG | 0o640, ME.uid, ME.gid)
    assert up.read_bytes() == b"written"
    assert stat.S_IMODE(os.stat(stacks.upper / "d").st_mode) == 0o750  # copied up first
    assert f.layer is view.upper and view.lookup(d, b"new") is f
    assert listing[b"new"].layer is view.upper and b"old" in listing


async def test_create_over_a_whiteout_replaces_it(stacks: Stacks,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Atomically: the file is built elsewhere and renamed over the whiteout, so the name
    never shows the lower file, nor a half-made one."""
    c = stacks.core({"f": "old lower data"}, upper={"f": WHITEOUT})
    view = c.view
    assert lookup(view, "f") is None
    seen: list[bool] = []
    real_rename = os.rename

    def rename(src: object, dst: object, **kw: object) -> None:
        seen.append(is_char00(stacks.upper / "f"))
        real_rename(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rename", rename)
    f, fd = await c.changes.create(view.root, b"f", 0o600, os.O_RDWR, ME)
    monkeypatch.undo()
    _close(fd)
    assert seen == [True]  # one rename, over the whiteout still in place
    up = stacks.upper / "f"
    assert stat.S_ISREG(os.lstat(up).st_mode) and up.read_bytes() == b""
    assert os.listdir(stacks.upper) == ["f"]
    assert not is_opaque(up) and f.data is None
    assert view.attributes(f).size == 0  # not the lower file's data


async def test_create_over_an_oci_whiteout(stacks: Stacks) -> None:
    c = stacks.core({"f": "old"}, upper={".wh.f": ""})
    view = c.view
    assert lookup(view, "f") is None
    _, fd = await c.changes.create(view.root, b"f", 0o600, os.O_WRONLY, ME)
    _close(fd)
    assert os.listdir(stacks.upper) == ["f"]
    assert (stacks.upper / "f").read_bytes() == b""


async def test_create_under_a_default_acl_over_a_whiteout(stacks: Stacks) -> None:
    """The entry is built beside its name (it inherits the parent's default ACL, which
    the workdir has not) under a hidden name, and nothing is left behind."""
    c = stacks.core({"d/f": "old"}, upper={"d/f": WHITEOUT})
    _default_acl(stacks.upper / "d")
    view = c.view
    _, fd = await c.changes.create(node(view, "d"), b"f", 0o640, os.O_WRONLY, ME)
    _close(fd)
    up = stacks.upper / "d/f"
    assert stat.S_ISREG(os.lstat(up).st_mode)
    assert "system.posix_acl_access" in os.listxattr(up)
    assert os.listdir(stacks.upper / "d") == ["f"]


async def test_mkdir_under_a_default_acl_over_a_whiteout(stacks: Stacks) -> None:
    c = stacks.core({"d/sub/x": "old"}, upper={"d/sub": WHITEOUT})
    _default_acl(stacks.upper / "d")
    view = c.view
    await c.changes.mkdir(node(view, "d"), b"sub", 0o750, ME)
    up = stacks.upper / "d/sub"
    assert is_opaque(up) and os.listdir(up) == []
    assert {"system.posix_acl_access", "system.posix_acl_default"} <= set(os.listxattr(up))
    assert os.listdir(stacks.upper / "d") == ["sub"]


@pytest.mark.parametrize(("name", "code"), [(b"exists", errno.EEXIST),
                                            (b".wh.x", errno.EINVAL),
                                            (b".wh..wh..opq", errno.EINVAL)])
async def test_create_refuses(stacks: Stacks, name: bytes, code: int) -> None:
    c = stacks.core({"exists": "x"})
    assert await _errno(c.changes.create(c.view.root, name, 0o644, os.O_WRONLY, ME)) == code
    assert await _errno(c.changes.mkdir(c.view.root, name, 0o755, ME)) == code
    assert await _errno(c.changes.symlink(c.view.root, name, b"t", ME)) == code
    assert os.listdir(stacks.upper) == []


async def test_changes_on_a_read_only_core(stacks: Stacks) -> None:
    c = stacks.core({"f": "x", "d": DIR}, read_only=True)
    view, ch = c.view, c.changes
    root, f = view.root, node(view, "f")
    for call in (ch.create(root, b"n", 0o644, os.O_WRONLY, ME), ch.mkdir(root, b"n", 0o755, ME),
                 ch.mknod(root, b"n", stat.S_IFIFO | 0o644, 0, ME),
                 ch.symlink(root, b"n", b"t", ME), ch.link(f, root, b"n"),
                 ch.setattr(f, SetAttrs(mode=0o600), None), ch.setxattr(f, "user.x", b"1"),
                 ch.removexattr(f, "user.x"), ch.open(f, os.O_WRONLY)):
        assert await _errno(call) == errno.EROFS
    fd = await ch.open(f, os.O_RDONLY)  # reading is fine
    assert os.read(fd, 1) == b"x"
    _close(fd)


# --------------------------------------------------------------------------- mkdir & co


async def test_mkdir_over_a_whiteout_is_opaque(stacks: Stacks) -> None:
    c = stacks.core({"d/x": "x"}, upper={"d": WHITEOUT})
    view = c.view
    d = await c.changes.mkdir(view.root, b"d", 0o751, ME)
    up = stacks.upper / "d"
    st = os.lstat(up)
    assert (st.st_mode, st.st_uid, st.st_gid) == (stat.S_IFDIR | 0o751, ME.uid, ME.gid)
    assert is_opaque(up) and os.listdir(up) == []
    assert d.dir_layers == (view.upper,) and view.listing(d) == {}
    assert view.lookup(d, b"x") is None


async def test_mkdir_over_an_oci_whiteout_with_marker_files(stacks: Stacks) -> None:
    files = whiteout.Markers("user.overlay.", opaque_files=True,
                             whiteouts=whiteout.WhiteoutKind.OCI)
    c = stacks.core({"d/x": "x"}, upper={".wh.d": ""}, markers=files)
    d = await c.changes.mkdir(c.view.root, b"d", 0o755, ME)
    assert os.listdir(stacks.upper) == ["d"]
    assert os.listdir(stacks.upper / "d") == [".wh..wh..opq"]
    assert c.view.listing(d) == {}


async def test_mkdir_on_a_free_name_is_not_opaque(stacks: Stacks) -> None:
    c = stacks.core({"other": DIR})
    await c.changes.mkdir(c.view.root, b"d", 0o700, ME)
    assert os.listxattr(stacks.upper / "d") == []


async def test_a_setgid_parent_gives_its_group(stacks: Stacks) -> None:
    c = stacks.core({}, upper={"g": DIR})
    os.chown(stacks.upper / "g", 0, 777)
    os.chmod(stacks.upper / "g", 0o2775)
    g = node(c.view, "g")
    await c.changes.mkdir(g, b"sub", 0o755, ME)
    _, fd = await c.changes.create(g, b"f", 0o644, os.O_WRONLY, ME)
    _close(fd)
    sub, f = os.lstat(stacks.upper / "g/sub"), os.lstat(stacks.upper / "g/f")
    assert (sub.st_gid, stat.S_IMODE(sub.st_mode)) == (777, 0o2755)
    assert (f.st_uid, f.st_gid, stat.S_IMODE(f.st_mode)) == (ME.uid, 777, 0o644)


async def test_setid_bits_survive_the_chown(stacks: Stacks) -> None:
    c = stacks.core({})
    _, fd = await c.changes.create(c.view.root, b"f", 0o4755, os.O_WRONLY, ME)
    _close(fd)
    await c.changes.mknod(c.view.root, b"p", stat.S_IFIFO | 0o2644, 0, ME)
    assert stat.S_IMODE(os.lstat(stacks.upper / "f").st_mode) == 0o4755
    assert stat.S_IMODE(os.lstat(stacks.upper / "p").st_mode) == 0o2644


async def test_mknod(stacks: Stacks) -> None:
    c = stacks.core({"gone": "x"}, upper={"gone": WHITEOUT})
    view = c.view
    n = await c.changes.mknod(view.root, b"null", stat.S_IFCHR | 0o600, os.makedev(1, 3), ME)
    st = os.lstat(stacks.upper / "null")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 3) and st.st_uid == ME.uid
    assert n.kind == stat.S_IFCHR
    await c.changes.mknod(view.root, b"gone", stat.S_IFIFO | 0o644, 0, ME)
    assert stat.S_ISFIFO(os.lstat(stacks.upper / "gone").st_mode)


async def test_mknod_of_a_whiteout_is_refused(stacks: Stacks) -> None:
    c = stacks.core({})
    code = await _errno(c.changes.mknod(c.view.root, b"w", stat.S_IFCHR | 0o600, 0, ME))
    assert code == errno.EPERM and os.listdir(stacks.upper) == []


async def test_symlink(stacks: Stacks) -> None:
    c = stacks.core({"s": "old"}, upper={"s": WHITEOUT})
    await c.changes.symlink(c.view.root, b"s", b"/no/such/target", ME)
    st = os.lstat(stacks.upper / "s")
    assert stat.S_ISLNK(st.st_mode) and (st.st_uid, st.st_gid) == (ME.uid, ME.gid)
    assert os.readlink(stacks.upper / "s") == "/no/such/target"


async def test_link_copies_the_source_up(stacks: Stacks) -> None:
    c = stacks.core({"a": "data", "d": DIR})
    view = c.view
    a = node(view, "a")
    d = node(view, "d")
    same = await c.changes.link(a, d, b"b")
    assert same is a and a.layer is view.upper
    assert os.lstat(stacks.upper / "a").st_ino == os.lstat(stacks.upper / "d/b").st_ino
    assert os.lstat(stacks.upper / "a").st_nlink == 2
    assert view.lookup(d, b"b") is a and (d, b"b") in a.links
    assert view.attributes(a).nlink == 2
    assert await _errno(c.changes.link(a, d, b"b")) == errno.EEXIST
    assert await _errno(c.changes.link(d, view.root, b"x")) == errno.EPERM


async def test_link_over_a_whiteout(stacks: Stacks) -> None:
    c = stacks.core({"a": "data", "b": "old"}, upper={"b": WHITEOUT})
    await c.changes.link(node(c.view, "a"), c.view.root, b"b")
    assert (stacks.upper / "b").read_bytes() == b"data"
    assert sorted(os.listdir(stacks.upper)) == ["a", "b"]


# --------------------------------------------------------------------------- setattr


async def test_chmod_of_a_lower_file_copies_metadata_only(stacks: Stacks) -> None:
    data = b"x" * 50_000
    c = stacks.core({"f": File(data, mode=0o644, mtime=OLD)})
    f = node(c.view, "f")
    version = f.version
    await c.changes.setattr(f, SetAttrs(mode=0o600), None)
    up = stacks.upper / "f"
    st = os.lstat(up)
    assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_size == len(data)
    assert st.st_blocks == 0 and has_xattr(up, METACOPY_XATTR)
    assert st.st_mtime_ns == OLD * 10**9
    assert stat.S_IMODE(os.lstat(stacks.lowers[0] / "f").st_mode) == 0o644
    assert f.version > version and c.view.attributes(f).blocks > 0


async def test_chown_and_utimes(stacks: Stacks) -> None:
    c = stacks.core({"f": File(b"x", uid=1, gid=2, mtime=OLD), "s": Symlink("f")})
    view = c.view
    f, s = node(view, "f"), node(view, "s")
    await c.changes.setattr(f, SetAttrs(uid=10), None)
    assert (os.lstat(stacks.upper / "f").st_uid, os.lstat(stacks.upper / "f").st_gid) == (10, 2)
    await c.changes.setattr(f, SetAttrs(gid=20), None)
    await c.changes.setattr(f, SetAttrs(atime_ns=5 * 10**9), None)
    st = os.lstat(stacks.upper / "f")
    assert (st.st_uid, st.st_gid, st.st_atime_ns, st.st_mtime_ns) == (
        10, 20, 5 * 10**9, OLD * 10**9)
    await c.changes.setattr(f, SetAttrs(mtime_ns=7 * 10**9), None)
    st = os.lstat(stacks.upper / "f")
    assert (st.st_atime_ns, st.st_mtime_ns) == (5 * 10**9, 7 * 10**9)
    # A symlink's own owner and times: the target is never touched.
    await c.changes.setattr(s, SetAttrs(uid=30, mtime_ns=9 * 10**9), None)
    st = os.lstat(stacks.upper / "s")
    assert (st.st_uid, st.st_mtime_ns) == (30, 9 * 10**9)
    assert os.lstat(stacks.upper / "f").st_uid == 10


@pytest.mark.parametrize(("size", "expected"), [(0, b""), (3, b"012"), (12, b"0123456789\0\0")])
async def test_truncate(stacks: Stacks, size: int, expected: bytes) -> None:
    c = stacks.core({"f": "0123456789"})
    f = node(c.view, "f")
    await c.changes.setattr(f, SetAttrs(size=size), None)
    up = stacks.upper / "f"
    assert up.read_bytes() == expected and not has_xattr(up, METACOPY_XATTR)
    assert (stacks.lowers[0] / "f").read_bytes() == b"0123456789"


async def test_truncate_through_an_open_file(stacks: Stacks) -> None:
    c = stacks.core({}, upper={"f": "0123456789"})
    f = node(c.view, "f")
    fd = await c.changes.open(f, os.O_WRONLY)
    try:
        await c.changes.setattr(f, SetAttrs(size=4), fd)
    finally:
        _close(fd)
    assert (stacks.upper / "f").read_bytes() == b"0123"


async def test_setattr_of_the_root(stacks: Stacks) -> None:
    c = stacks.core({"f": "x"})
    await c.changes.setattr(c.view.root, SetAttrs(mode=0o701, uid=3), None)
    st = os.stat(stacks.upper)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o701, 3)


async def test_setattr_of_an_unlinked_open_file(stacks: Stacks) -> None:
    c = stacks.core({}, upper={"f": "0123456789"})
    view = c.view
    f = node(view, "f")
    handle = FileHandle(f, await c.changes.open(f, os.O_RDWR), view.upper)
    await c.removal.unlink(view.root, b"f")
    assert f.state is NodeState.UNLINKED
    await c.changes.setattr(f, SetAttrs(size=2, mode=0o600), None)  # on its open fd
    st = os.fstat(handle.fd)
    assert st.st_size == 2 and stat.S_IMODE(st.st_mode) == 0o600
    handle.close()
    await c.changes.setattr(f, SetAttrs(mode=0o644), None)  # nothing left: no error


# --------------------------------------------------------------------------- xattrs


async def test_setxattr_on_a_lower_file_copies_metadata_only(stacks: Stacks) -> None:
    c = stacks.core({"f": "x" * 10_000})
    f = node(c.view, "f")
    await c.changes.setxattr(f, "user.new", b"v")
    up = stacks.upper / "f"
    assert os.getxattr(up, "user.new") == b"v" and has_xattr(up, METACOPY_XATTR)
    assert os.lstat(up).st_blocks == 0
    assert "user.new" not in os.listxattr(stacks.lowers[0] / "f")
    assert c.view.getxattr(f, "user.new") == b"v"


async def test_setxattr_on_a_directory_and_the_root(stacks: Stacks) -> None:
    c = stacks.core({"d/f": "x"})
    await c.changes.setxattr(node(c.view, "d"), "user.d", b"1")
    await c.changes.setxattr(c.view.root, "user.root", b"2")
    assert os.getxattr(stacks.upper / "d", "user.d") == b"1"
    assert os.getxattr(stacks.upper, "user.root") == b"2"
    assert os.listdir(stacks.upper / "d") == []


@pytest.mark.parametrize("name", ["user.unionfs.layer", "trusted.overlay.opaque",
                                  "user.overlay.metacopy", "trusted.unionfs.x"])
async def test_setxattr_of_the_unions_own_names(stacks: Stacks, name: str) -> None:
    c = stacks.core({"f": "x"})
    assert await _errno(c.changes.setxattr(node(c.view, "f"), name, b"y")) == errno.EPERM
    assert os.listdir(stacks.upper) == []


async def test_removexattr(stacks: Stacks) -> None:
    c = stacks.core({"f": File(b"x" * 100, xattrs={"user.a": b"1", "user.b": b"2"})})
    f = node(c.view, "f")
    assert await _errno(c.changes.removexattr(f, "user.none")) == errno.ENODATA
    assert await _errno(c.changes.removexattr(f, "trusted.overlay.x")) == errno.ENODATA
    assert await _errno(c.changes.removexattr(f, "user.unionfs.layer")) == errno.EPERM
    assert os.listdir(stacks.upper) == []  # nothing copied up for a refusal
    await c.changes.removexattr(f, "user.a")
    up = stacks.upper / "f"
    assert sorted(c.view.listxattr(f)) == ["user.b"]
    assert "user.a" not in os.listxattr(up) and has_xattr(up, METACOPY_XATTR)
    assert "user.a" in os.listxattr(stacks.lowers[0] / "f")


# --------------------------------------------------------------------------- open


async def test_open_for_reading_copies_nothing(stacks: Stacks) -> None:
    c = stacks.core({"f": "lower"})
    f = node(c.view, "f")
    fd = await c.changes.open(f, os.O_RDONLY)
    try:
        assert os.read(fd, 10) == b"lower"
    finally:
        _close(fd)
    assert os.listdir(stacks.upper) == [] and f.layer is c.view.layers[1]


@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_APPEND])
async def test_open_for_writing_copies_up(stacks: Stacks, flags: int) -> None:
    c = stacks.core({"f": "lower"})
    f = node(c.view, "f")
    fd = await c.changes.open(f, flags)
    try:
        os.pwrite(fd, b"L", 0)
    finally:
        _close(fd)
    assert (stacks.upper / "f").read_bytes() == b"Lower"
    assert (stacks.lowers[0] / "f").read_bytes() == b"lower"


async def test_open_with_o_trunc_drops_the_data(stacks: Stacks) -> None:
    c = stacks.core({"f": "x" * 100_000})
    f = node(c.view, "f")
    version = f.version
    fd = await c.changes.open(f, os.O_RDONLY | os.O_TRUNC)
    _close(fd)
    assert os.lstat(stacks.upper / "f").st_size == 0 and f.version > version


async def test_open_of_a_metadata_only_copy_fills_it(stacks: Stacks) -> None:
    c = stacks.core({"f": "the data"})
    f = node(c.view, "f")
    await c.changes.setattr(f, SetAttrs(mode=0o600), None)
    assert f.data is not None
    fd = await c.changes.open(f, os.O_WRONLY)
    _close(fd)
    up = stacks.upper / "f"
    assert up.read_bytes() == b"the data" and not has_xattr(up, METACOPY_XATTR)
    assert stat.S_IMODE(os.lstat(up).st_mode) == 0o600


@pytest.mark.parametrize(("writeback", "access"), [(False, os.O_WRONLY), (True, os.O_RDWR)])
async def test_writeback_opens_write_only_files_read_write(stacks: Stacks, writeback: bool,
                                                           access: int) -> None:
    c = stacks.core({"f": "x"}, writeback=writeback)
    fd = await c.changes.open(node(c.view, "f"), os.O_WRONLY)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == access
    finally:
        _close(fd)
    _, fd = await c.changes.create(c.view.root, b"g", 0o644, os.O_WRONLY, ME)
    try:
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == access
    finally:
        _close(fd)


@pytest.mark.parametrize("writeback", [False, True])
async def test_with_writeback_a_write_keeps_the_mtime_the_kernel_has(stacks: Stacks,
                                                                   writeback: bool) -> None:
    """The kernel owns a written file's mtime with the writeback cache: a write leaves
    the upper's as it was, or as the kernel's last setattr gave it (pages written
    before that setattr may arrive after it)."""
    c = stacks.core({"f": "x"}, writeback=writeback)
    f = node(c.view, "f")
    handle = FileHandle(f, await c.changes.open(f, os.O_WRONLY), c.view.data_source(f))
    up = stacks.upper / "f"
    try:
        os.utime(up, ns=(3, 5))
        c.changes.write(handle, 0, b"y")
        assert (os.stat(up).st_mtime_ns == 5) is writeback
        assert os.stat(up).st_atime_ns == 3  # the write leaves the atime alone
        await c.changes.setattr(f, SetAttrs(mtime_ns=7), None)
        c.changes.write(handle, 1, b"z")
        assert up.read_bytes() == b"yz"
        assert (os.stat(up).st_mtime_ns == 7) is writeback
    finally:
        handle.close()


async def test_with_writeback_the_kernel_may_flush_times_of_a_deleted_lower_file(
        stacks: Stacks) -> None:
    """The kernel flushes the times it cached of a file read, then deleted, as it closes
    it: with nothing of the file left to change, that succeeds (and changes nothing)."""
    c = stacks.core({"f": "x"}, writeback=True)
    n, handle = await _open_then_unlink(c, "f")
    try:
        await c.changes.setattr(n, SetAttrs(mtime_ns=7), None)
        with pytest.raises(OSError):
            await c.changes.setattr(n, SetAttrs(mode=0o600), None)
    finally:
        handle.close()
    assert not (stacks.upper / "f").exists() or is_char00(stacks.upper / "f")


# --------------------------------------------------------------------------- gone names
# A file whose name was removed while it is open can still be changed through its open
# file (fchmod, fsetxattr, a reopen of /proc/self/fd/N for writing): the kernel sends
# those for the inode. The change reaches the file; a removed name never comes back.


async def _open_then_unlink(c: Core, name: str) -> tuple[Node, FileHandle]:
    """*name* opened read-only (as ops.open keeps it), then unlinked."""
    n = node(c.view, name)
    handle = FileHandle(n, await c.changes.open(n, os.O_RDONLY), c.view.data_source(n))
    await c.removal.unlink(c.view.root, name.encode())
    return n, handle


@pytest.mark.parametrize("change", ["open for writing", "setxattr", "removexattr"])
async def test_a_change_to_an_unlinked_lower_file_never_brings_its_name_back(
        stacks: Stacks, change: str) -> None:
    c = stacks.core({"f": File(b"old data", xattrs={"user.a": b"1"})})
    f, handle = await _open_then_unlink(c, "f")
    assert f.state is NodeState.UNLINKED and is_char00(stacks.upper / "f")
    try:
        if change == "open for writing":
            _close(await c.changes.open(f, os.O_WRONLY))
        elif change == "setxattr":
            await c.changes.setxattr(f, "user.b", b"2")
        else:
            await c.changes.removexattr(f, "user.a")
    except OSError:
        pass  # refusing is fine; bringing the deleted name back is not
    finally:
        handle.close()
    assert is_char00(stacks.upper / "f"), os.lstat(stacks.upper / "f")
    assert lookup(c.view, "f") is None


async def test_an_xattr_set_through_a_removed_name_reaches_the_file(stacks: Stacks) -> None:
    """One name of a hard-linked file is removed while open (the other name not yet
    looked up): fsetxattr on the open file changes the file, not the whiteout."""
    c = stacks.core({"a": "shared", "b": HardLink("a")})
    a, handle = await _open_then_unlink(c, "a")
    assert a.state is NodeState.HOMELESS
    try:
        await c.changes.setxattr(a, "trusted.x", b"1")
    finally:
        handle.close()
    assert os.listxattr(stacks.upper / "a", follow_symlinks=False) == []  # the whiteout
    assert os.getxattr(stacks.upper / "b", "trusted.x") == b"1"


async def test_a_reopen_for_writing_through_a_removed_name_reaches_the_file(
        stacks: Stacks) -> None:
    c = stacks.core({"a": "shared", "b": HardLink("a")})
    a, handle = await _open_then_unlink(c, "a")
    try:
        fd = await c.changes.open(a, os.O_WRONLY)
        try:
            os.pwrite(fd, b"S", 0)
        finally:
            _close(fd)
    finally:
        handle.close()
    assert (stacks.upper / "b").read_bytes() == b"Shared"
    assert is_char00(stacks.upper / "a")


async def test_a_hard_link_of_a_symlink(stacks: Stacks) -> None:
    c = stacks.core({"s": Symlink("target")})
    await c.changes.link(node(c.view, "s"), c.view.root, b"t")
    assert os.readlink(stacks.upper / "t") == "target"
    assert os.lstat(stacks.upper / "t").st_ino == os.lstat(stacks.upper / "s").st_ino
