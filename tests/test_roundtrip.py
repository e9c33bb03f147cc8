"""A container's changes exported as an OCI layer and imported as a new layer.

Three lowers and an upper are mounted; changes are made through the mount (writes,
deletions, a directory removed and made again, hard links, xattrs, symlinks, chmod,
chown, a fifo, odd names); then ``unionmount export`` writes the upper as a layer,
``unionmount import`` unpacks it into a new layer directory, and the lowers with that
layer on top and no upper, mounted again, must show the same tree (names, types,
modes, owners, sizes, contents, link targets, user xattrs, hard-link groups, mtimes).

The same layer in the kernel's format (``--format overlay``) is mounted with kernel
overlayfs too. And ``unionmount diff`` is checked against containers-storage's naive
diff (what ``podman diff`` computes for a container on a mount program), run here on
the two live mounts it compares: the container's and a read-only one of its lowers.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mounts import (
    OPAQUE,
    WHITEOUT,
    File,
    HardLink,
    Mount,
    Symlink,
    Tree,
    Xattr,
    build,
    diff_trees,
    mount_kernel,
    mount_unionfs,
    ok,
    snapshot,
    tool,
)
from tests.test_tools import KNOWN_DIFF, known_diff_stack

T0 = 1_600_000_000_000_000_000  # lower mtimes, in ns
#: cap_net_raw+ep (vfs_cap_data revision 2)
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)
CAFE = b"caf\xe9"  # a name that is not UTF-8
LONG = "deep/" + "d" * 80 + "/" + "e" * 80 + "/a-file-whose-path-needs-a-pax-record"


def _lowers(tmp: Path) -> list[Path]:
    l3 = build(tmp / "l3", {
        "etc/passwd": File(b"root:x:0:0::/root:/bin/sh\n", mtime=T0 / 1e9),
        "etc/shadow": File(b"root:*:1::::::\n", mode=0o640, gid=42, mtime=T0 / 1e9),
        "etc/group": "root:x:0:\n",
        "etc/hosts": "127.0.0.1 localhost\n",
        "bin/tool": File(b"\x7fELF" + b"\1" * 996, mode=0o755),
        "usr/lib/liba.so.1": File(b"lib" * 100),
        "usr/lib/liba.so": HardLink("usr/lib/liba.so.1"),
        "usr/share/doc/readme": "doc",
        "usr/share/doc/sub/more": "more",
        "var/cache/app/one": "1",
        "var/cache/app/two": "2",
        "var/cache/app/sub/three": "3",
        "data/keep.txt": "keep",
        "data/remove.txt": "bottom",
        "home/alice/.profile": File(b"export A=1\n", uid=1000, gid=1000),
        "sym": Symlink("etc/passwd"),
        "opt/x": Xattr({"user.dirattr": b"bottom"}),
    })
    l2 = build(tmp / "l2", {
        "bin/tool": File(b"\x7fELF" + b"\2" * 1996, mode=0o755),
        "etc/group": WHITEOUT,
        "etc/motd": "hello\n",
        "srv/www": OPAQUE,
        "srv/www/index.html": "<html/>",
    })
    l1 = build(tmp / "l1", {
        "data/remove.txt": "top",
        "etc/issue": "Linux\n",
    })
    return [l1, l2, l3]


def _make_changes(m: Path) -> None:
    """What a container might do, through the mount."""
    with open(m / "etc/passwd", "a") as f:
        f.write("alice:x:1000:1000::/home/alice:/bin/sh\n")
    (m / "etc/new.conf").write_text("new\n")
    (m / "bin/tool").write_bytes(b"\x7fELF" + b"\3" * 3000)
    os.unlink(m / "data/remove.txt")
    os.unlink(m / "etc/hosts")
    shutil.rmtree(m / "usr/share/doc")
    shutil.rmtree(m / "var/cache/app")
    os.mkdir(m / "var/cache/app")
    (m / "var/cache/app/fresh").write_text("fresh")
    os.mkdir(m / "var/cache/app/sub")
    (m / "var/cache/app/sub/new").write_text("new")
    os.mkdir(m / "emptydir", 0o750)
    os.link(m / "etc/passwd", m / "etc/passwd.hard")
    os.link(m / "etc/new.conf", m / "etc/new.link")
    os.chmod(m / "usr/lib/liba.so.1", 0o600)  # one inode, two lower names
    os.chmod(m / "etc/shadow", 0o600)  # metadata only: the data stays below
    os.setxattr(m / "data/keep.txt", "user.note", b"hello")
    os.setxattr(m / "etc/new.conf", "user.bin", b"\xff\x00bin")
    os.setxattr(m / "opt/x", "user.dirattr", b"changed")
    os.symlink("../../etc/motd", m / "home/alice/motd-link")
    os.unlink(m / "sym")
    os.symlink("bin/tool", m / "sym")
    os.chmod(m / "home/alice", 0o700)
    os.chown(m / "etc/motd", 1234, 5678)
    os.chown(m / "opt", 42, 43)
    os.chmod(m / "bin/tool", 0o4755)
    os.setxattr(m / "bin/tool", "security.capability", CAPABILITY)
    os.mkfifo(m / "run.fifo")
    with open(os.path.join(os.fsencode(m), CAFE), "wb") as f:
        f.write(b"latin-1 name")
    os.makedirs((m / LONG).parent)
    (m / LONG).write_text("long")
    os.utime(m / "etc/new.conf", ns=(T0 + 123_456_789, T0 + 987_654_321))


@pytest.fixture
def container(tmp_path: Path) -> Iterator[tuple[list[Path], Path, Tree, list[bytes]]]:
    """Lowers, the upper after the changes, the merged tree then, and the naive diff of
    the two live mounts (the container's, and its lowers' read-only)."""
    lowers = _lowers(tmp_path)
    upper = tmp_path / "upper"
    mounts: list[Mount] = []
    try:
        m = mount_unionfs(lowers, upper, tmp_path / "upper.work", tmp_path / "mnt",
                          tmp_path / "mnt.log")
        mounts.append(m)
        _make_changes(m.mnt)
        assert os.getxattr(m.mnt / "bin/tool", "security.capability") == CAPABILITY
        tree = snapshot(m.mnt, times=True)
        parent = mount_unionfs(lowers, None, None, tmp_path / "parent", tmp_path / "parent.log")
        mounts.append(parent)
        naive = naive_diff(m.mnt, parent.mnt)
    finally:
        for mount in mounts:
            mount.unmount()
    for mount in mounts:
        mount.assert_log_clean()
    yield lowers, upper, tree, naive


def _layers(lowers: list[Path]) -> str:
    return ":".join(map(str, lowers))


def _check_mounted(tree: Tree, stack: list[Path], tmp_path: Path, kernel: bool) -> None:
    mnt = tmp_path / ("kmnt" if kernel else "rmnt")
    if kernel:
        m = mount_kernel(stack, None, None, mnt)
    else:
        m = mount_unionfs(stack, None, None, mnt, tmp_path / "rmnt.log")
    try:
        again = snapshot(m.mnt, times=True)
        assert os.getxattr(m.mnt / "bin/tool", "security.capability") == CAPABILITY
    finally:
        m.unmount()
    m.assert_log_clean()
    assert diff_trees(tree, again) == []


def test_round_trip_through_an_oci_layer(container, tmp_path: Path) -> None:
    lowers, upper, tree, naive = container
    layer_tar = tmp_path / "layer.tar"
    diff_id = ok(tool("export", _layers(lowers), "--upper", upper, "-o", layer_tar)).strip()
    assert diff_id == b"sha256:" + hashlib.sha256(layer_tar.read_bytes()).hexdigest().encode()

    imported = tmp_path / "imported"
    ok(tool("import", layer_tar, imported))
    # The new layer keeps OCI markers: a deleted file is a .wh. file, not a device.
    assert (imported / "etc/.wh.hosts").is_file()
    assert (imported / "var/cache/app/.wh..wh..opq").is_file()
    _check_mounted(tree, [imported, *lowers], tmp_path, kernel=False)

    # The imported layer describes the same changes as the upper did.
    lines = ok(tool("diff", _layers(lowers), "--upper", upper, "--all")).splitlines()
    assert lines == naive
    assert ok(tool("diff", _layers(lowers), "--upper", imported, "--all")).splitlines() == lines


def test_round_trip_in_the_kernel_format(container, tmp_path: Path) -> None:
    lowers, upper, tree, naive = container
    layer = tmp_path / "layer.tar.gz"
    ok(tool("export", _layers(lowers), "--upper", upper, "-o", layer))
    imported = tmp_path / "imported"
    ok(tool("import", layer, imported, "--format", "overlay"))
    st = os.lstat(imported / "etc/hosts")
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    assert os.getxattr(imported / "var/cache/app", "trusted.overlay.opaque") == b"y"
    assert not any(name.startswith(".wh.") for _, _, names in os.walk(imported)
                   for name in names)
    _check_mounted(tree, [imported, *lowers], tmp_path, kernel=True)
    _check_mounted(tree, [imported, *lowers], tmp_path, kernel=False)
    assert ok(tool("diff", _layers(lowers), "--upper", imported, "--all")).splitlines() == naive


def test_export_from_stdout_is_the_same_layer(container, tmp_path: Path) -> None:
    lowers, upper, _, _ = container
    r = tool("export", _layers(lowers), "--upper", upper, "-o", "-")
    ok(r)
    assert r.stderr.strip() == b"sha256:" + hashlib.sha256(r.stdout).hexdigest().encode()
    imported = tmp_path / "imported"
    ok(tool("import", "-", imported, stdin=r.stdout))
    assert snapshot(imported, times=True).names()


def test_known_diff_is_what_the_mounts_show(tmp_path: Path) -> None:
    """test_tools' hand-made upper (kernel and OCI markers): its expected lines are what
    the naive diff of the two live mounts gives."""
    lowers, upper = known_diff_stack(tmp_path)
    mounts: list[Mount] = []
    try:
        mounts.append(mount_unionfs(lowers, upper, tmp_path / "upper.work", tmp_path / "mnt",
                                    tmp_path / "mnt.log"))
        mounts.append(mount_unionfs(lowers, None, None, tmp_path / "parent",
                                    tmp_path / "parent.log"))
        naive = naive_diff(mounts[0].mnt, mounts[1].mnt)
    finally:
        for mount in mounts:
            mount.unmount()
    for mount in mounts:
        mount.assert_log_clean()
    assert b"".join(line + b"\n" for line in naive).decode() == KNOWN_DIFF


# --------------------------------------------------------------------------- naive diff


def _info(path: bytes) -> tuple[object, ...]:
    st = os.lstat(path)
    xattrs = sorted((k, os.getxattr(path, k, follow_symlinks=False))
                    for k in os.listxattr(path, follow_symlinks=False) if k.startswith("user."))
    try:
        cap: bytes | None = os.getxattr(path, "security.capability", follow_symlinks=False)
    except OSError:
        cap = None
    target = os.readlink(path) if stat.S_ISLNK(st.st_mode) else None
    return st, tuple(xattrs), cap, target


def _different(old: tuple[object, ...], new: tuple[object, ...]) -> bool:
    """containers-storage's statDifferent, plus capability, target and user xattrs."""
    a, b = old[0], new[0]
    assert isinstance(a, os.stat_result) and isinstance(b, os.stat_result)
    sa, na = divmod(a.st_mtime_ns, 10**9)
    sb, nb = divmod(b.st_mtime_ns, 10**9)
    same_time = sa == sb and (na == nb or na == 0 or nb == 0)
    return (a.st_mode != b.st_mode or a.st_uid != b.st_uid or a.st_gid != b.st_gid
            or a.st_rdev != b.st_rdev or not same_time
            or (not stat.S_ISDIR(a.st_mode) and a.st_size != b.st_size)
            or old[1:] != new[1:])


def naive_diff(new_root: Path, old_root: Path) -> list[bytes]:
    """archive.ChangesDirs(new, old) of containers-storage, on two mounted trees, as
    ``podman diff`` prints it, sorted."""
    changes: list[bytes] = []

    def is_dir(path: bytes | None) -> bool:
        return path is not None and stat.S_ISDIR(os.lstat(path).st_mode)

    def walk(rel: bytes, new: bytes, old: bytes | None, reported: bool) -> None:
        start = len(changes)
        old_children = ({n: os.path.join(old, n) for n in os.listdir(old)}
                        if old is not None and is_dir(old) else {})
        for name in sorted(os.listdir(new)):
            child_rel = rel + b"/" + name
            child_new = os.path.join(new, name)
            child_old = old_children.pop(name, None)
            child_reported = True
            if child_old is None:
                changes.append(b"A " + child_rel)
            elif _different(_info(child_old), _info(child_new)):
                changes.append(b"C " + child_rel)
            else:
                child_reported = False
            if is_dir(child_new):
                walk(child_rel, child_new, child_old, child_reported)
        changes.extend(b"D " + rel + b"/" + name for name in old_children)
        if len(changes) > start and not reported:
            changes.insert(start, b"C " + rel)

    walk(b"", os.fsencode(new_root), os.fsencode(old_root), True)
    return sorted(changes, key=lambda line: line[2:])
