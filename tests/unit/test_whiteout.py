"""whiteout.py: every on-disk marker, the hiding rules of one layer directory, the probe.

On a temp dir of the test machine's filesystem (root: trusted xattrs and whiteout
devices both work); the formats are those kernel overlayfs reads and writes.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounts import DIR, FIFO, OPAQUE, WHITEOUT, Symlink, build

from unionfs import whiteout
from unionfs.whiteout import OciName, WhiteoutKind
from unit.stacks import is_char00

OCI = whiteout.Markers("trusted.overlay.", whiteouts=WhiteoutKind.OCI)
FILES = whiteout.Markers("user.overlay.", opaque_files=True)


@pytest.fixture
def dir_fd(tmp_path: Path) -> Iterator[int]:
    """An fd of the empty directory tmp_path/d."""
    (tmp_path / "d").mkdir()
    fd = os.open(tmp_path / "d", os.O_RDONLY | os.O_DIRECTORY)
    yield fd
    os.close(fd)


def _lstat(path: Path) -> os.stat_result:
    return os.lstat(path)


# --------------------------------------------------------------------------- predicates


def test_is_whiteout_is_a_char_device_0_0_only(tmp_path: Path) -> None:
    os.mknod(tmp_path / "wh", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    os.mknod(tmp_path / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.mknod(tmp_path / "blk", stat.S_IFBLK | 0o600, os.makedev(0, 0))
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "file").write_bytes(b"")
    assert whiteout.is_whiteout(_lstat(tmp_path / "wh"))
    for name in ("null", "blk", "fifo", "file"):
        assert not whiteout.is_whiteout(_lstat(tmp_path / name)), name


def test_is_whiteout_request() -> None:
    assert whiteout.is_whiteout_request(stat.S_IFCHR | 0o644, 0)
    assert whiteout.is_whiteout_request(stat.S_IFCHR, os.makedev(0, 0))
    assert not whiteout.is_whiteout_request(stat.S_IFCHR | 0o644, os.makedev(1, 3))
    assert not whiteout.is_whiteout_request(stat.S_IFCHR | 0o644, os.makedev(0, 1))
    assert not whiteout.is_whiteout_request(stat.S_IFBLK | 0o644, 0)
    assert not whiteout.is_whiteout_request(stat.S_IFREG | 0o644, 0)
    assert not whiteout.is_whiteout_request(stat.S_IFIFO | 0o644, 0)


@pytest.mark.parametrize("name", [b".wh.x", b".wh.", b".wh..wh..opq", b".wh..wh.plnk"])
def test_marker_names(name: bytes) -> None:
    assert whiteout.is_marker_name(name)


@pytest.mark.parametrize("name", [b"x", b".wh", b".whx", b"a.wh.x", b"..wh.x", b"WH.x"])
def test_ordinary_names(name: bytes) -> None:
    assert not whiteout.is_marker_name(name)
    assert whiteout.classify_oci_name(name) is None
    assert whiteout.whited_out_name(name) is None


@pytest.mark.parametrize(("name", "kind"), [
    (b".wh.foo", OciName.WHITEOUT),
    (b".wh..hidden", OciName.WHITEOUT),  # hides ".hidden"
    (b".wh..wh..opq", OciName.OPAQUE),
    (b".wh..wh.plnk", OciName.AUFS),
    (b".wh..wh.aufs", OciName.AUFS),
    (b".wh..wh.", OciName.AUFS),
    (b".wh.", OciName.BAD),
    (b".wh..", OciName.BAD),
    (b".wh...", OciName.BAD),
])
def test_classify_oci_name(name: bytes, kind: OciName) -> None:
    assert whiteout.classify_oci_name(name) is kind


@pytest.mark.parametrize(("marker", "hidden"), [
    (b".wh.foo", b"foo"),
    (b".wh..hidden", b".hidden"),
    (b".wh.\xff\xfe", b"\xff\xfe"),  # names are bytes, never decoded
    (b".wh.", None),
    (b".wh..", None),
    (b".wh...", None),
    (b".wh..wh..opq", None),
    (b".wh..wh.plnk", None),
])
def test_whited_out_name(marker: bytes, hidden: bytes | None) -> None:
    assert whiteout.whited_out_name(marker) == hidden


def test_oci_whiteout_name_round_trips() -> None:
    for name in (b"a", b".x", b"\xff"):
        marker = whiteout.oci_whiteout_name(name)
        assert marker == b".wh." + name
        assert whiteout.whited_out_name(marker) == name
        assert whiteout.classify_oci_name(marker) is OciName.WHITEOUT


def test_hidden_temp_name_is_a_marker(tmp_path: Path) -> None:
    tmp = whiteout.hidden_temp_name(b"#12-3")
    assert tmp != b"#12-3" and whiteout.is_marker_name(tmp)
    # Built beside its final name, it is never an entry of the layer.
    (tmp_path / os.fsdecode(tmp)).write_bytes(b"half made")
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert whiteout.read_layer_dir(fd).entries == {}
    finally:
        os.close(fd)


@pytest.mark.parametrize(("name", "internal"), [
    ("trusted.overlay.opaque", True),
    ("trusted.overlay.metacopy", True),
    ("user.overlay.redirect", True),
    ("user.fuseoverlayfs.opaque", True),
    ("trusted.unionfs.probe", True),
    ("trusted.overlayfoo", False),
    ("user.overlay", False),
    ("user.comment", False),
    ("security.capability", False),
    ("system.posix_acl_access", False),
])
def test_is_internal_xattr(name: str, internal: bool) -> None:
    assert whiteout.is_internal_xattr(name) is internal


# --------------------------------------------------------------------------- hiding rules


def test_read_layer_dir_entries_and_hidden(tmp_path: Path) -> None:
    layer = build(tmp_path / "layer", {
        "file": "x",
        "dir": DIR,
        "opaque": OPAQUE,
        "dangling": Symlink("/nonexistent"),
        "to-dir": Symlink("dir"),  # a symlink to a directory is no directory here
        "gone": WHITEOUT,
        ".wh.old": "",  # OCI whiteout of "old"
        ".wh..wh..opq": "",  # opaque marker: neither an entry nor a whiteout
        ".wh..wh.plnk": DIR,  # aufs bookkeeping
        ".wh.": "",  # names nothing
        "fifo": FIFO,
    })
    os.mknod(layer / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))  # not a whiteout
    os.mknod(layer / "zero-blk", stat.S_IFBLK | 0o600, os.makedev(0, 0))
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = whiteout.read_layer_dir(fd)
        again = whiteout.read_layer_dir(fd)  # the fd is left as it was: same answer
    finally:
        os.close(fd)
    assert held.entries == {
        b"file": False, b"dir": True, b"opaque": True, b"dangling": False, b"to-dir": False,
        b"fifo": False, b"null": False, b"zero-blk": False,
    }
    assert held.hidden == {b"gone", b"old"}
    assert again == held


def test_read_layer_dir_a_whiteout_and_an_entry_of_one_name(tmp_path: Path) -> None:
    """An OCI whiteout hides its name in the layers below, never in its own layer."""
    layer = build(tmp_path / "layer", {"a": "kept", ".wh.a": ""})
    fd = os.open(layer, os.O_RDONLY | os.O_DIRECTORY)
    try:
        held = whiteout.read_layer_dir(fd)
    finally:
        os.close(fd)
    assert held.entries == {b"a": False}
    assert held.hidden == {b"a"}


@pytest.mark.parametrize("xattr", whiteout.OPAQUE_XATTRS)
def test_each_opaque_xattr(dir_fd: int, xattr: str) -> None:
    assert not whiteout.is_opaque_fd(dir_fd)
    os.setxattr(dir_fd, xattr, b"y")
    assert whiteout.is_opaque_fd(dir_fd)


@pytest.mark.parametrize("value", [b"n", b"", b"yes", b"Y", b"y\n"])
def test_an_opaque_xattr_other_than_y_is_not_opaque(dir_fd: int, value: bytes) -> None:
    for xattr in whiteout.OPAQUE_XATTRS:
        os.setxattr(dir_fd, xattr, value)
    assert not whiteout.is_opaque_fd(dir_fd)


def test_the_oci_opaque_marker_file(dir_fd: int) -> None:
    os.close(os.open(".wh..wh..opq", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dir_fd))
    assert whiteout.is_opaque_fd(dir_fd)


def test_other_xattrs_are_not_opaque(dir_fd: int) -> None:
    os.setxattr(dir_fd, "user.comment", b"y")
    os.setxattr(dir_fd, "trusted.overlay.origin", b"y")
    assert not whiteout.is_opaque_fd(dir_fd)


def test_has_and_remove_oci_whiteout(dir_fd: int) -> None:
    assert not whiteout.has_oci_whiteout(dir_fd, b"a")
    os.close(os.open(".wh.a", os.O_CREAT | os.O_WRONLY, 0o600, dir_fd=dir_fd))
    assert whiteout.has_oci_whiteout(dir_fd, b"a")
    assert not whiteout.has_oci_whiteout(dir_fd, b"b")
    # A name too long for a marker has none (and is no error).
    assert not whiteout.has_oci_whiteout(dir_fd, b"n" * 255)
    whiteout.remove_oci_whiteout(dir_fd, b"a")
    assert not whiteout.has_oci_whiteout(dir_fd, b"a")
    assert os.listdir(dir_fd) == []
    whiteout.remove_oci_whiteout(dir_fd, b"a")  # none there: no error


# --------------------------------------------------------------------------- writing


def test_make_whiteout_device(tmp_path: Path, dir_fd: int) -> None:
    whiteout.TRUSTED.make_whiteout(dir_fd, b"gone")
    assert is_char00(tmp_path / "d" / "gone")
    with pytest.raises(FileExistsError):
        whiteout.TRUSTED.make_whiteout(dir_fd, b"gone")


def test_make_whiteout_oci_file(tmp_path: Path, dir_fd: int) -> None:
    OCI.make_whiteout(dir_fd, b"gone")
    assert os.listdir(dir_fd) == [".wh.gone"]
    st = os.lstat(tmp_path / "d" / ".wh.gone")
    assert stat.S_ISREG(st.st_mode) and st.st_size == 0
    assert whiteout.read_layer_dir(dir_fd).hidden == {b"gone"}
    with pytest.raises(FileExistsError):
        OCI.make_whiteout(dir_fd, b"gone")


@pytest.mark.parametrize("fallback", [False, True])
def test_rename_leaving_a_device_whiteout(tmp_path: Path, dir_fd: int, fallback: bool,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    if fallback:  # a kernel or filesystem without RENAME_WHITEOUT
        def refuse(*args: object) -> None:
            raise OSError(errno.EINVAL, "no RENAME_WHITEOUT")
        monkeypatch.setattr(whiteout, "renameat2", refuse)
    (tmp_path / "d" / "old").write_bytes(b"data")
    (tmp_path / "other").mkdir()
    other = os.open(tmp_path / "other", os.O_RDONLY | os.O_DIRECTORY)
    try:
        whiteout.TRUSTED.rename_leaving_whiteout(dir_fd, b"old", other, b"new")
    finally:
        os.close(other)
    assert is_char00(tmp_path / "d" / "old")
    assert (tmp_path / "other" / "new").read_bytes() == b"data"


def test_rename_leaving_whiteout_raises_other_errors(dir_fd: int) -> None:
    with pytest.raises(FileNotFoundError):
        whiteout.TRUSTED.rename_leaving_whiteout(dir_fd, b"missing", dir_fd, b"new")
    assert os.listdir(dir_fd) == []


def test_rename_leaving_an_oci_whiteout(tmp_path: Path, dir_fd: int) -> None:
    (tmp_path / "d" / "old").write_bytes(b"data")
    OCI.rename_leaving_whiteout(dir_fd, b"old", dir_fd, b"new")
    assert sorted(os.listdir(dir_fd)) == [".wh.old", "new"]
    assert (tmp_path / "d" / "new").read_bytes() == b"data"


@pytest.mark.parametrize(("markers", "xattr"), [
    (whiteout.TRUSTED, "trusted.overlay.opaque"),
    (whiteout.USERXATTR, "user.overlay.opaque"),
])
def test_set_opaque_xattr(dir_fd: int, markers: whiteout.Markers, xattr: str) -> None:
    markers.set_opaque(dir_fd)
    assert os.listxattr(dir_fd) == [xattr]
    assert os.getxattr(dir_fd, xattr) == b"y"
    assert whiteout.is_opaque_fd(dir_fd)


def test_set_opaque_with_marker_files(dir_fd: int) -> None:
    FILES.set_opaque(dir_fd)
    assert os.listdir(dir_fd) == [".wh..wh..opq"]
    assert os.listxattr(dir_fd) == []
    assert whiteout.is_opaque_fd(dir_fd)
    FILES.set_opaque(dir_fd)  # already opaque: no error


def test_markers_names() -> None:
    assert whiteout.TRUSTED.name == "trusted xattrs"
    assert whiteout.USERXATTR.name == "userxattr"
    assert FILES.name == "OCI opaque marker files (no xattrs)"
    assert OCI.name == "trusted xattrs, OCI whiteout files"


# --------------------------------------------------------------------------- metacopy


def _file(tmp_path: Path, name: str, data: bytes = b"x") -> Path:
    path = tmp_path / "d" / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("markers", "xattr"), [
    (whiteout.TRUSTED, "trusted.overlay.metacopy"),
    (whiteout.USERXATTR, "user.overlay.metacopy"),
])
def test_set_and_read_metacopy(tmp_path: Path, dir_fd: int, markers: whiteout.Markers,
                               xattr: str) -> None:
    path = _file(tmp_path, "f")
    assert not whiteout.is_metacopy(dir_fd, b"f")
    fd = os.open(path, os.O_WRONLY)
    try:
        markers.set_metacopy(fd)
    finally:
        os.close(fd)
    assert os.getxattr(path, xattr) == b""
    assert whiteout.is_metacopy(dir_fd, b"f")


def test_is_metacopy_of_what_is_not_there_or_a_symlink(tmp_path: Path, dir_fd: int) -> None:
    target = _file(tmp_path, "target")
    os.setxattr(target, "trusted.overlay.metacopy", b"")
    os.symlink("target", tmp_path / "d" / "link")
    assert whiteout.is_metacopy(dir_fd, b"target")
    assert not whiteout.is_metacopy(dir_fd, b"link")  # the symlink is not followed
    assert not whiteout.is_metacopy(dir_fd, b"missing")


def test_redirect_of(tmp_path: Path, dir_fd: int) -> None:
    path = _file(tmp_path, "f")
    assert whiteout.redirect_of(dir_fd, b"f") is None
    os.setxattr(path, "user.overlay.redirect", b"/user/path")
    assert whiteout.redirect_of(dir_fd, b"f") == b"/user/path"
    os.setxattr(path, "trusted.overlay.redirect", b"/trusted/path")
    assert whiteout.redirect_of(dir_fd, b"f") == b"/trusted/path"  # the kernel's first


def test_clear_metacopy_removes_both_marks_and_redirects(tmp_path: Path, dir_fd: int) -> None:
    path = _file(tmp_path, "f")
    for xattr in (*whiteout.METACOPY_XATTRS, *whiteout.REDIRECT_XATTRS):
        os.setxattr(path, xattr, b"/x" if "redirect" in xattr else b"")
    os.setxattr(path, "user.keep", b"1")
    fd = os.open(path, os.O_WRONLY)
    try:
        whiteout.clear_metacopy(fd)
        whiteout.clear_metacopy(fd)  # nothing left to clear: no error
    finally:
        os.close(fd)
    assert os.listxattr(path) == ["user.keep"]


# --------------------------------------------------------------------------- the probe


def test_probe_here_supports_everything(dir_fd: int) -> None:
    assert whiteout.probe(dir_fd, b"scratch") == whiteout.Support(None, None, None)
    assert os.listdir(dir_fd) == []


def test_probe_says_why_and_cleans_up(dir_fd: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the filesystem refuses is reported by its strerror; nothing stays behind."""
    def no_devices(self: whiteout.Markers, fd: int, name: bytes) -> None:
        raise PermissionError(errno.EPERM, os.strerror(errno.EPERM))

    monkeypatch.setattr(whiteout.Markers, "make_whiteout", no_devices)
    support = whiteout.probe(dir_fd, b"scratch")
    assert support == whiteout.Support(None, None, os.strerror(errno.EPERM))
    assert os.listdir(dir_fd) == []


def test_probe_refuses_a_scratch_name_in_use(tmp_path: Path, dir_fd: int) -> None:
    (tmp_path / "d" / "scratch").mkdir()
    with pytest.raises(FileExistsError):
        whiteout.probe(dir_fd, b"scratch")
    assert os.listdir(dir_fd) == ["scratch"]  # not ours: left alone
