"""podman run / diff / commit / restart on the union, compared with kernel overlay."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from typing import TypeVar

import pytest
from it_storage import BUSYBOX_IMAGE, THREE_IMAGE, Storage, Stores
from it_support import TREE_SH, parse_tree, run, tree_diff

T = TypeVar("T")

# Writes, reads and deletes that reach every lower layer of the three-layer image.
WRITE_SCRIPT = f"""
set -e
{TREE_SH}
echo new > /data/new.txt
echo more >> /data/keep.txt
cat /data/keep.txt /data/new.txt /data/link
rm /data/l2.txt
rm /wh/gone.txt
rm -rf /rep/deep
mv /mod/file.txt /mod/moved.txt
mv /swap /swapped
chmod 0700 /wh/stay.txt
chown 1:1 /owned/file
mkdir -p /newdir/a/b
echo deep > /newdir/a/b/c
ln -s /data/new.txt /newdir/link
rm /l2only/g
rmdir /l2only
echo over > /opq/new2
: > /data/sub/b.txt
mkdir /wh/gonedir
echo again > /wh/gonedir/f2
rm -rf /rep
mkdir /rep
echo fresh > /rep/new
ls -A /rep /wh /data /mod /
for p in /rep/old1 /rep/old2 /rep/deep /rep/deep/old3 /data/l2.txt /wh/gone.txt /l2only/g \
         /wh/gonedir/f /mod/file.txt /swap/dir; do
    if test -e $p || test -L $p; then echo "VISIBLE after delete: $p"; fi
done
ls -A /wh/gonedir /data /opq /mod /
test ! -e /data/l2.txt && test ! -e /rep/deep && test ! -e /l2only
cat /data/hl1 /opq/new2 /wh/gonedir/f2 /newdir/link /mod/moved.txt
echo ==TREE==
tree /data /opq /wh /rep /mod /swapped /l2only /owned /newdir
"""


def _both(stores: Stores, fn: Callable[[Storage], T]) -> dict[str, T]:
    """fn on the union storage and on the kernel one: {"union": ..., "kernel": ...}."""
    return {st.name: fn(st) for st in stores.both()}


def test_run_writes_reads_deletes_in_lower_layers(stores: Stores, images: dict[str, str]) -> None:
    out = _both(stores, lambda st: st.sh(THREE_IMAGE, WRITE_SCRIPT).stdout)
    ours, ref = parse_tree(out["union"], mtimes=False), parse_tree(out["kernel"], mtimes=False)
    assert not tree_diff(ours, ref), "trees differ:\n" + tree_diff(ours, ref)
    text = {k: v.partition("==TREE==")[0] for k, v in out.items()}
    assert "VISIBLE" not in text["union"], text["union"]
    assert text["union"] == text["kernel"]


def test_run_on_imported_busybox(stores: Stores, images: dict[str, str]) -> None:
    script = (
        "set -e; echo hi > /x; cat /x; rm /bin/vi; test ! -e /bin/vi; "
        "mv /bin/ls /bin/ls2; /bin/ls2 /bin | wc -l; mkdir /bin/new; rmdir /bin/new; "
        "busybox ls -A /"
    )
    out = _both(stores, lambda st: st.sh(BUSYBOX_IMAGE, script).stdout)
    assert out["union"] == out["kernel"]
    assert out["union"].startswith("hi\n")


# --------------------------------------------------------------- diff and commit

CHANGE_SCRIPT = """
set -e
rm /data/keep.txt /wh/stay.txt
rm -rf /data/sub
echo changed >> /mod/file.txt
chmod 0640 /opq/new2
rm -rf /rep
mkdir /rep
echo fresh > /rep/new
ls -A /rep /data /wh > /dev/null
mkdir /added
echo added > /added/file
echo top > /top.txt
"""


@pytest.fixture(scope="module")
def changed(stores: Stores, images: dict[str, str]) -> Iterator[dict[str, str]]:
    """A stopped container per storage that deleted, changed, replaced and added files."""
    name = "it-changed"
    try:
        for st in stores.both():
            st.podman("run", "--pull=never", "--name", name, THREE_IMAGE, "sh", "-c", CHANGE_SCRIPT)
        yield {"name": name}
    finally:
        for st in stores.both():
            st.podman("rm", "--force", name, check=False)


def test_diff_lists_the_same_changes(stores: Stores, changed: dict[str, str]) -> None:
    assert stores.kernel.uses_naive_diff(), "the kernel reference should use the naive diff"
    out = _both(stores, lambda st: st.podman("diff", changed["name"]).stdout)
    lines = {k: sorted(v.splitlines()) for k, v in out.items()}
    assert lines["union"] == lines["kernel"], f"union:\n{out['union']}\nkernel:\n{out['kernel']}"
    for expected in (
        "D /data/keep.txt",
        "D /wh/stay.txt",
        "D /data/sub",
        "C /mod/file.txt",
        "A /added",
        "A /added/file",
        "A /top.txt",
    ):
        assert expected in lines["union"], f"{expected!r} missing from:\n{out['union']}"


def test_commit_keeps_deletions(stores: Stores, changed: dict[str, str]) -> None:
    image = "localhost/it-committed:latest"
    script = f"{TREE_SH}; ls -A /rep /data /opq /wh; tree /data /opq /wh /rep /mod /added /top.txt"
    out = {}
    for st in stores.both():
        st.podman("commit", "--quiet", changed["name"], image)
        try:
            out[st.name] = st.sh(image, script).stdout
        finally:
            st.podman("rmi", image, check=False)
    ours, ref = parse_tree(out["union"]), parse_tree(out["kernel"])
    assert not tree_diff(ours, ref), "committed trees differ:\n" + tree_diff(ours, ref)
    got = ours.keys()
    assert [p for p in got if p.startswith("/rep/")] == ["/rep/new"], (
        "the replaced directory must hold only its new content (deleted files came back?)"
    )
    for gone in ("/data/keep.txt", "/wh/stay.txt", "/data/sub", "/rep/old1", "/rep/deep/old3"):
        assert gone not in got, f"{gone} was deleted in the container but is in the image"


# --------------------------------------------------------------- restart

RESTART_SCRIPT = """
ls -A /data
cat /data/count 2>/dev/null || echo no-count
echo x >> /data/count
rm -f /data/keep.txt
test -e /rep/runs || { rm -rf /rep; mkdir /rep; }
echo run >> /rep/runs
cat /rep/runs
"""


def _run_twice(st: Storage, name: str) -> tuple[str, str, list[str]]:
    first = st.podman(
        "run", "--pull=never", "--name", name, THREE_IMAGE, "sh", "-c", RESTART_SCRIPT
    ).stdout
    try:
        between = st.merged_mounts()
        second = st.podman("start", "--attach", name).stdout
    finally:
        st.podman("rm", "--force", name, check=False)
    return first, second, between


def test_restarted_container_keeps_its_changes(
    stores: Stores, images: dict[str, str], name: str
) -> None:
    res = _both(stores, lambda st: _run_twice(st, name))
    assert res["union"][:2] == res["kernel"][:2]
    first, second, between = res["union"]
    assert "keep.txt" in first and "no-count" in first
    assert "keep.txt" not in second and "no-count" not in second
    assert second.rstrip().endswith("run\nrun"), second
    assert not [m for m in between if m.endswith("/merged")], (
        f"the stopped container is still mounted: {between}"
    )


# --------------------------------------------------------------- podman info


def test_podman_info_reports_the_mount_program(stores: Stores) -> None:
    """`podman info` runs `PROG --version` and shows what it printed."""
    info = json.loads(stores.union.podman("info", "--format", "json").stdout)
    opts = info["store"]["graphOptions"]["overlay.mount_program"]
    assert opts["Executable"] == str(stores.program.path), opts
    version = run([stores.program.path, "--version"], timeout=30).stdout.strip()
    assert version and opts["Version"] == version, (opts, version)


def test_unionmount_diff_prints_what_podman_diff_prints(
    stores: Stores, changed: dict[str, str]
) -> None:
    """`unionmount diff` on the container's own layer directories, without mounting."""
    st = stores.union
    data = st.podman("inspect", "--format", "{{json .GraphDriver.Data}}", changed["name"]).stdout
    layers = json.loads(data)
    podman_lines = sorted(st.podman("diff", changed["name"]).stdout.splitlines())
    ours = run(
        [sys.executable, "-m", "unionfs", "diff", layers["LowerDir"], "--upper", layers["UpperDir"]],
        timeout=120,
    )
    assert sorted(ours.stdout.splitlines()) == podman_lines, (
        f"unionmount diff:\n{ours.stdout}\npodman diff:\n{chr(10).join(podman_lines)}"
    )
