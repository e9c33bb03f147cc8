"""Rootless podman and buildah, as a plain user, on three storages of that user.

The session's test user (tests/rootless.py: subordinate ids 100000-165535, /dev/fuse
0666 for the run, Debian's uidmap for newuidmap) runs podman with its own
``~/.config/containers`` (tests/integration/rootless_support.py) on: the kernel's
overlayfs (rootless native overlay: the reference), fuse-overlayfs as mount_program,
and unionmount as mount_program (a wrapper running this checkout's ``python -m
unionfs``). On each: ``podman run`` of the three-layer image writing, reading and
deleting in every layer; ``podman diff`` and ``podman commit`` of a container that
deleted, replaced and added files; ``buildah bud --layers`` of a Containerfile with
RUN steps. unionmount is compared with the kernel at every step, and its upper must be
what the kernel writes there (user.overlay.*, char 0/0).

fuse-overlayfs runs every step too (it proves the rootless mount-program setup: podman
and buildah as the user, newuidmap, /dev/fuse), and its ``podman diff`` matches the
kernel's; its trees are not compared, since fuse-overlayfs 1.10 differs from the kernel
here in two known ways: files deleted inside a directory that was then replaced
(``rm -rf /rep; mkdir /rep``) are still found by lookup, and the parent directory of a
copied-up file gets a new mtime.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from it_storage import BUSYBOX_IMAGE, THREE_IMAGE, Storage
from it_support import (
    MTIME,
    REPO,
    TREE_SH,
    CommandFailed,
    busybox_entries,
    parse_tree,
    tar_bytes,
    three_layer_tars,
    tree_diff,
    write_oci_layout,
    write_unionfs_wrapper,
)
from mounts import pid_alive, pids_mentioning
from rootless import (
    HostChanges,
    chown_tree,
    format_diff,
    host,
    trusted_xattrs,
    upper_format,
    user_dir,
)
from rootless_support import BUILD_USER, RootlessStore, buildah_image_tar
from test_it_build import CONTAINERFILE
from test_it_containers import CHANGE_SCRIPT, WRITE_SCRIPT

PROGRAMS = ["fuse-overlayfs", "unionmount"]
"""Compared with the kernel on podman diff."""
BUILT = "localhost/it-built:latest"
COMMITTED = "localhost/it-committed:latest"
CHANGED = "it-changed"


class Stores:
    """The three storages, and each step's result per storage, computed once."""

    def __init__(self, base: Path, stores: dict[str, RootlessStore]) -> None:
        self.root = base
        """conftest.daemon_guard's watchdog kills what names it; it checks root/logs."""
        self.by_name = stores
        self.setup_errors: dict[str, str] = {}
        self._memo: dict[tuple[str, str], Any] = {}

    def __getitem__(self, name: str) -> RootlessStore:
        if name in self.setup_errors:
            raise CommandFailed(f"setting up the {name} storage failed:\n{self.setup_errors[name]}")
        return self.by_name[name]

    def once(self, step: str, name: str, fn: Callable[[RootlessStore], Any]) -> Any:
        """fn(store), remembered: a failure is remembered too and raised again."""
        key = (step, name)
        if key not in self._memo:
            try:
                self._memo[key] = ("ok", fn(self[name]))
            except CommandFailed as e:
                self._memo[key] = ("error", e)
        status, value = self._memo[key]
        if status == "error":
            raise value
        return value


@pytest.fixture(scope="module")
def changes(tools: None) -> Iterator[HostChanges]:
    with host() as h:
        yield h


@pytest.fixture(scope="module")
def stores(changes: HostChanges) -> Iterator[Stores]:
    """The three rootless storages, with both images in each. (Named as conftest's root
    storages so that its daemon_guard watches these: a watchdog, no traceback in the logs.)"""
    user = changes.user
    assert user is not None
    base = user_dir(changes, "podman")
    (base / "logs").mkdir()
    (base / "bin").mkdir()
    wrapper = write_unionfs_wrapper(base / "bin" / "unionmount", base / "logs")
    fo = shutil.which("fuse-overlayfs")
    assert fo is not None
    (base / "busybox.tar").write_bytes(tar_bytes(busybox_entries()))
    write_oci_layout(base / "oci-three", "three", three_layer_tars())
    chown_tree(base, user)
    s = Stores(base, {
        "kernel": RootlessStore("kernel", base / "kernel", user, None),
        "fuse-overlayfs": RootlessStore("fuse-overlayfs", base / "fo", user, Path(fo)),
        "unionmount": RootlessStore("unionmount", base / "um", user, wrapper),
    })
    for name, st in s.by_name.items():
        try:
            st.podman("import", str(base / "busybox.tar"), BUSYBOX_IMAGE)
            image_id = st.podman("pull", "--quiet", f"oci:{base}/oci-three:three").stdout.strip()
            st.podman("tag", image_id, THREE_IMAGE)
        except CommandFailed as e:
            s.setup_errors[name] = str(e)
    try:
        yield s
    finally:
        problems = [p for st in s.by_name.values() for p in st.cleanup()]
        stray = [p for p in pids_mentioning(base) if pid_alive(p)]
        for p in stray:
            os.kill(p, 9)
        if problems or stray:
            raise CommandFailed(f"cleanup: {problems}; processes left: {stray}")


# ---------------------------------------------------------------------------------------------


def _run(st: RootlessStore) -> str:
    return st.sh(THREE_IMAGE, WRITE_SCRIPT).stdout


def test_run_writes_reads_deletes_in_lower_layers(stores: Stores) -> None:
    ref, ours = stores.once("run", "kernel", _run), stores.once("run", "unionmount", _run)
    a, b = parse_tree(ours, mtimes=False), parse_tree(ref, mtimes=False)
    assert not tree_diff(a, b), "trees differ:\n" + tree_diff(a, b)
    assert "VISIBLE" not in ours.partition("==TREE==")[0], ours
    assert ours.partition("==TREE==")[0] == ref.partition("==TREE==")[0]


def _changed(st: RootlessStore) -> str:
    st.podman("rm", "--force", CHANGED, check=False)
    st.podman("run", "--pull=never", "--name", CHANGED, THREE_IMAGE, "sh", "-c", CHANGE_SCRIPT)
    return CHANGED


def _diff(st: RootlessStore) -> list[str]:
    return sorted(st.podman("diff", CHANGED).stdout.splitlines())


@pytest.mark.parametrize("program", PROGRAMS)
def test_diff_lists_the_same_changes(stores: Stores, program: str) -> None:
    assert stores["kernel"].uses_naive_diff(), "the kernel reference should use the naive diff"
    for name in ("kernel", program):
        stores.once("changed", name, _changed)
    ref, ours = stores.once("diff", "kernel", _diff), stores.once("diff", program, _diff)
    assert ours == ref, "podman diff:\n" + "\n".join(ours) + "\nkernel:\n" + "\n".join(ref)
    for line in ("D /data/keep.txt", "D /wh/stay.txt", "C /mod/file.txt", "A /added/file"):
        assert line in ours, line


def _commit(st: RootlessStore) -> str:
    st.podman("commit", "--quiet", CHANGED, COMMITTED)
    script = f"{TREE_SH}; ls -A /rep /data /opq /wh; tree /data /opq /wh /rep /mod /added /top.txt"
    try:
        return st.sh(COMMITTED, script).stdout
    finally:
        st.podman("rmi", COMMITTED, check=False)


def test_commit_keeps_deletions(stores: Stores) -> None:
    for name in ("kernel", "unionmount"):
        stores.once("changed", name, _changed)
    ref = parse_tree(stores.once("commit", "kernel", _commit))
    ours = parse_tree(stores.once("commit", "unionmount", _commit))
    assert not tree_diff(ours, ref), "committed trees differ:\n" + tree_diff(ours, ref)
    assert [p for p in ours if p.startswith("/rep/")] == ["/rep/new"], sorted(ours)


def _build(st: RootlessStore) -> tuple[str, str]:
    context = st.root / "context"
    if not context.exists():
        context.mkdir()
        (context / "Containerfile").write_text(CONTAINERFILE)
        (context / "added.txt").write_text("added\n")
        os.utime(context / "added.txt", (MTIME, MTIME))
        chown_tree(context, st.user)
    args = ("bud", "--layers", "--pull=false", "--network=none", "-t", BUILT, str(context))
    st.buildah(*args, timeout=300)
    image_id = st.podman("image", "inspect", "--format", "{{.Id}}", BUILT).stdout.strip()
    layers = st.podman("image", "inspect", "--format", "{{len .RootFS.Layers}}", BUILT).stdout
    st.buildah(*args, timeout=300)
    again = st.podman("image", "inspect", "--format", "{{.Id}}", BUILT).stdout.strip()
    assert again == image_id, "a second --layers build should come from the cache"
    try:
        tree = st.sh(BUILT, f"{TREE_SH}; ls -A /rep /opq /data /wh; "
                            "tree /data /opq /wh /rep /mod /added").stdout
    finally:
        st.podman("rmi", "--force", BUILT, check=False)
    return layers.strip(), tree


def test_buildah_bud_layers_same_tree(stores: Stores) -> None:
    ref_layers, ref = stores.once("build", "kernel", _build)
    layers, ours = stores.once("build", "unionmount", _build)
    a, b = parse_tree(ours), parse_tree(ref)
    assert not tree_diff(a, b), "built trees differ:\n" + tree_diff(a, b)
    assert layers == ref_layers == "8", (layers, ref_layers)
    assert [p for p in a if p.startswith("/opq/")] == ["/opq/only"], sorted(a)


def test_fuse_overlayfs_runs_every_step(stores: Stores) -> None:
    """The setup, proven with the mount program rootless users run today: every step
    works on fuse-overlayfs as the user (its trees are not compared: see the docstring
    of this module)."""
    st = "fuse-overlayfs"
    assert "==TREE==" in stores.once("run", st, _run)
    stores.once("changed", st, _changed)
    assert "/rep" in stores.once("commit", st, _commit)
    layers, tree = stores.once("build", st, _build)
    assert layers == "8" and "/opq/only" in tree, (layers, tree)
    info = stores[st].podman("info", "--format", "{{json .Store.GraphOptions}}").stdout
    assert "fuse-overlayfs" in info, info


def test_unionmount_upper_is_what_the_kernel_writes(stores: Stores) -> None:
    """The changed container's upper in the unionmount store: no trusted.* xattr, the
    kernel's userxattr format, entry by entry what rootless native overlay wrote for the
    same container."""
    uppers = {}
    for name in ("kernel", "unionmount"):
        stores.once("changed", name, _changed)
        st = stores[name]
        uppers[name] = Path(st.podman("inspect", "--format", "{{.GraphDriver.Data.UpperDir}}",
                                      CHANGED).stdout.strip())
    up = uppers["unionmount"]
    assert trusted_xattrs(up) == []
    ours, ref = upper_format(up), upper_format(uppers["kernel"])
    assert "user.overlay.opaque=b'y'" in ours.get("rep", ""), ours.get("rep")
    assert ours.get("data/keep.txt", "").startswith("chr 0000"), ours.get("data/keep.txt")
    assert ours == ref, format_diff(ours, ref)


# ---------------------------------------------------------------------------------------------
# buildah inside a container without extra privileges

NESTED_CONTAINERFILE = CONTAINERFILE.replace(f"FROM {THREE_IMAGE}",
                                             "FROM oci:/ctx/oci-three:three")
NESTED_SCRIPT = """\
set -e
grep -E '^(CapEff|CapBnd|NoNewPrivs):' /proc/self/status
cd
mkdir -p .config/containers probe/l probe/u probe/w probe/m
printf '[storage]\\ndriver = "overlay"\\n' > .config/containers/storage.conf
echo "==PROBE=="
unshare -Urm mount -t overlay overlay \\
    -o userxattr,lowerdir=probe/l,upperdir=probe/u,workdir=probe/w probe/m 2>&1 \\
    && echo "native overlay: mounted" || echo "native overlay: refused"
B="buildah --storage-driver overlay --storage-opt overlay.mount_program=/ctx/unionmount"
$B bud --layers --isolation chroot -t localhost/built -f /ctx/Containerfile /ctx >/dev/null
echo "==INFO=="
$B info
$B from --name w localhost/built >/dev/null
echo "==TREE=="
$B run --isolation chroot -v /ctx:/ctx:ro w -- sh /ctx/tree.sh
echo "==END=="
"""


def test_buildah_bud_inside_an_unprivileged_container(stores: Stores,
                                                      changes: HostChanges) -> None:
    """Rootful podman runs an image holding buildah with no extra privilege: the default
    capabilities (no CAP_SYS_ADMIN), ``--device /dev/fuse``, as a plain user of the image
    (as CI runners and Kubernetes pods run builds). There the kernel refuses overlayfs
    for the user (its home is on the container's own overlay), and rootless buildah
    builds with unionmount as its mount program (this checkout and its interpreter bound
    in read-only): the image has the tree the same Containerfile gives on the host's
    rootless kernel storage."""
    user = changes.user
    assert user is not None
    base = stores.root / "nested"
    base.mkdir()
    image_tar = buildah_image_tar(base / "image", user.uid, user.gid)
    outer = Storage("outer", base / "outer", None)
    ctx = base / "ctx"
    (ctx / "logs").mkdir(parents=True)
    write_oci_layout(ctx / "oci-three", "three", three_layer_tars())
    (ctx / "Containerfile").write_text(NESTED_CONTAINERFILE)
    (ctx / "added.txt").write_text("added\n")
    os.utime(ctx / "added.txt", (MTIME, MTIME))
    wrapper = ctx / "unionmount"
    wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO}\nexport PYTHONPATH\n"
                       f'exec {sys.executable} -m unionfs --log /ctx/logs/um-$$.log "$@"\n')
    wrapper.chmod(0o755)
    (ctx / "tree.sh").write_text(
        f"{TREE_SH}; ls -A /rep /opq /data /wh; tree /data /opq /wh /rep /mod /added\n")
    chown_tree(ctx, user)
    try:
        outer.podman("import", str(image_tar), "localhost/it-buildah", timeout=600)
        out = outer.podman(
            "run", "--rm", "--device", "/dev/fuse", "--user", BUILD_USER,
            "-v", f"{ctx}:/ctx", "-v", f"{REPO}:{REPO}:ro",
            "-v", f"{sys.base_prefix}:{sys.base_prefix}:ro",
            "localhost/it-buildah", "sh", "-c", NESTED_SCRIPT, timeout=900).stdout
    finally:
        problems = outer.cleanup()
    assert not problems, problems
    assert "==END==" in out, out
    status = dict(line.split(":\t") for line in out.splitlines()[:3])
    assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"] == "0", status
    assert not int(status["CapBnd"], 16) & (1 << 21), "CAP_SYS_ADMIN in the bounding set"
    sections = {}
    for part in out.split("\n==")[1:]:
        head, _, body = part.partition("==\n")
        sections[head] = body
    assert "native overlay: refused" in sections["PROBE"], sections["PROBE"]
    info = json.loads(sections["INFO"])["store"]
    assert info["GraphDriverName"] == "overlay", info
    graph = " ".join(info["GraphOptions"] or [])
    assert re.findall(r"overlay\.mount_program=\S*", graph) == [
        "overlay.mount_program=/ctx/unionmount"], graph
    _, ref_tree = stores.once("build", "kernel", _build)
    ours, ref = parse_tree(sections["TREE"]), parse_tree(ref_tree)
    assert not tree_diff(ours, ref), (
        "the tree differs from the host's rootless kernel build:\n" + tree_diff(ours, ref))
    assert [p for p in ours if p.startswith("/rep/")] == ["/rep/new"], sorted(ours)

    logs = sorted((ctx / "logs").glob("*.log"))
    assert logs, "unionmount was never run inside the container"
    text = "".join(p.read_text(errors="replace") for p in logs)
    assert "Traceback" not in text, text[-5000:]
