"""runc on a bundle whose rootfs is a union mount; mount(8) with -t fuse.NAME and fstab."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from it_storage import Stores
from it_support import host_tree, mounts_under, run, tree_diff

SCRIPT = """
cat /msg/hello.txt /msg/keep
ls -A /opqdir
if test -e /bin/cat; then echo cat-visible; else echo cat-hidden; fi
echo written > /out.txt
rm /bin/vi
mkdir -p /newd/sub
echo x > /opqdir/new
echo appended >> /msg/keep
ls -A / | grep -v -e proc -e dev -e sys
ls /bin | wc -l
id -u
"""


@pytest.fixture(scope="module")
def layers(stores: Stores, busybox_tar: Path) -> Path:
    """Two lower dirs in kernel format: char 0/0 whiteout, trusted.overlay.opaque."""
    root = stores.root / "runc-layers"
    base, top = root / "base", root / "top"
    base.mkdir(parents=True)
    # tar(1), not tarfile: extractall(filter=) needs Python 3.11.4, Debian 12 has 3.11.2.
    subprocess.run(["tar", "-xf", str(busybox_tar), "-C", str(base)], check=True, timeout=60)
    (base / "msg").mkdir()
    (base / "msg" / "keep").write_text("keep\n")
    (base / "opqdir").mkdir()
    (base / "opqdir" / "old").write_text("old\n")
    (top / "msg").mkdir(parents=True)
    (top / "msg" / "hello.txt").write_text("hello from the top layer\n")
    (top / "bin").mkdir()
    os.mknod(top / "bin" / "cat", stat.S_IFCHR | 0o600, os.makedev(0, 0))
    (top / "opqdir").mkdir()
    os.setxattr(top / "opqdir", "trusted.overlay.opaque", b"y")
    (top / "opqdir" / "new").write_text("new\n")
    return root


def _mount_args(work: Path, layers: Path) -> str:
    return (
        f"lowerdir={layers / 'top'}:{layers / 'base'},"
        f"upperdir={work / 'upper'},workdir={work / 'work'}"
    )


def _prepare(work: Path) -> Path:
    for d in ("upper", "work", "bundle/rootfs", "state"):
        (work / d).mkdir(parents=True)
    return work / "bundle"


def _unmount(mnt: Path) -> None:
    fusermount: list[str | Path] = ["fusermount3", "-u", mnt]
    if os.path.ismount(mnt) and run(fusermount, check=False, timeout=30).returncode != 0:
        run(["umount", mnt], timeout=30)
    assert not os.path.ismount(mnt)


@pytest.fixture
def bundles(stores: Stores, layers: Path, name: str) -> Iterator[dict[str, Path]]:
    """bundle/rootfs mounted by the mount program ("union") and by the kernel ("kernel")."""
    out = {}
    try:
        for kind in ("union", "kernel"):
            work = stores.root / f"{name}-{kind}"
            bundle = _prepare(work)
            opts = _mount_args(work, layers)
            rootfs = bundle / "rootfs"
            if kind == "union":
                run([stores.program.path, "-o", opts, rootfs], timeout=30)
            else:
                run(["mount", "-t", "overlay", "overlay", "-o", opts, rootfs], timeout=30)
            assert os.path.ismount(rootfs), f"{kind}: {rootfs} is not mounted"
            out[kind] = work
        yield out
    finally:
        for work in out.values():
            _unmount(work / "bundle" / "rootfs")


def _runc(work: Path, name: str) -> str:
    bundle = work / "bundle"
    run(["runc", "spec", "--bundle", bundle], timeout=30)
    spec = json.loads((bundle / "config.json").read_text())
    spec["process"]["terminal"] = False
    spec["process"]["args"] = ["/bin/sh", "-c", SCRIPT]
    spec["root"]["readonly"] = False
    spec["hostname"] = "it"
    (bundle / "config.json").write_text(json.dumps(spec))
    res = run(["runc", "--root", work / "state", "run", "--bundle", bundle, name], timeout=120)
    run(["runc", "--root", work / "state", "delete", "--force", name], check=False, timeout=30)
    return res.stdout


def test_runc_runs_on_a_union_rootfs(stores: Stores, bundles: dict[str, Path], name: str) -> None:
    out = {kind: _runc(work, f"{name}-{kind}") for kind, work in bundles.items()}
    layers = stores.root / "runc-layers"
    assert out["union"] == out["kernel"], f"union:\n{out['union']}\nkernel:\n{out['kernel']}"
    lines = out["union"].splitlines()
    assert lines[:4] == ["hello from the top layer", "keep", "new", "cat-hidden"], lines
    assert lines[-1] == "0"
    views = {}
    for kind, work in bundles.items():
        _unmount(work / "bundle" / "rootfs")
        views[kind] = _kernel_view(work, layers)
    assert not tree_diff(views["union"], views["kernel"]), (
        "the kernel reads the two upper dirs differently:\n"
        + tree_diff(views["union"], views["kernel"])
    )
    upper = host_tree(bundles["union"] / "upper", mtimes=False)
    assert upper["/out.txt"].startswith("100000 "), upper
    assert upper["/bin/vi"].startswith("20000 ") and "rdev=0,0" in upper["/bin/vi"], upper


def _kernel_view(work: Path, layers: Path) -> dict[str, str]:
    """The upper dir as kernel overlayfs reads it, stacked read-only on the lowers.

    Whiteouts and opaque markers are a contract with the kernel: an upper left
    by the union must mean to the kernel what the kernel's own upper means.
    """
    view = work / "kernel-view"
    view.mkdir()
    lowers = f"{work / 'upper'}:{layers / 'top'}:{layers / 'base'}"
    run(["mount", "-t", "overlay", "overlay", "-o", f"ro,lowerdir={lowers}", view], timeout=30)
    try:
        return host_tree(view, mtimes=False)
    finally:
        run(["umount", view], timeout=30)


# ------------------------------------------------------------- mount(8) helpers


@pytest.fixture(scope="module")
def helper_name(stores: Stores) -> Iterator[str]:
    """The mount program under a name on the default PATH, for mount.fuse3 to exec.

    mount(8) drops PATH before it runs /sbin/mount.fuse3, whose /bin/sh then
    searches the default PATH only: `-t fuse.NAME` needs NAME in
    /usr/local/sbin or the like (a pip install as root puts unionmount in
    /usr/local/bin).  A unique name leaves any installed unionmount alone.
    """
    helper = f"unionmount-it-{uuid.uuid4().hex[:8]}"
    link = Path("/usr/local/sbin") / helper
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(stores.program.path)
    try:
        yield helper
    finally:
        link.unlink()


def _check_mount(mnt: Path) -> None:
    try:
        assert os.path.ismount(mnt)
        assert (mnt / "msg" / "hello.txt").read_text() == "hello from the top layer\n"
        assert sorted(os.listdir(mnt / "opqdir")) == ["new"]
        assert not os.path.lexists(mnt / "bin" / "cat")
        (mnt / "msg" / "written").write_text("via mount(8)\n")
    finally:
        _unmount(mnt)


@pytest.mark.parametrize("how", ["mount -t fuse.NAME", "fstab", "mount -t fuse PROG#SOURCE"])
def test_mount_helper(stores: Stores, layers: Path, helper_name: str, name: str, how: str) -> None:
    work = stores.root / f"{name}-helper"
    _prepare(work)
    mnt = work / "bundle" / "rootfs"
    opts = _mount_args(work, layers)
    if how == "mount -t fuse.NAME":
        run(["mount", "-t", f"fuse.{helper_name}", "overlay", mnt, "-o", opts], timeout=30)
    elif how == "fstab":
        fstab = work / "fstab"
        fstab.write_text(f"overlay {mnt} fuse.{helper_name} noauto,{opts} 0 0\n")
        run(["mount", "--fstab", fstab, mnt], timeout=30)
    else:
        run(["mount", "-t", "fuse", f"{stores.program.path}#overlay", mnt, "-o", opts], timeout=30)
    _check_mount(mnt)
    assert (work / "upper" / "msg" / "written").read_text() == "via mount(8)\n"
    assert not mounts_under(work)
