"""Images as the union shows them: the three-layer OCI image and `podman image mount`."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

from it_storage import THREE_IMAGE, Stores
from it_support import TREE_SH, host_tree, parse_tree, tree_diff

IMAGE_ROOTS = "/bin /data /opq /wh /rep /mod /swap /tmp /l2only /owned /empty"

# What the three layers add up to (layer 1 + layer 2 + layer 3, see it_support).
EXPECTED_LISTINGS = {
    "/data": "hl1 hl2 keep.txt l2.txt link sub",
    "/data/sub": "b.txt",
    "/opq": "l3 new2",
    "/wh": "gone.txt stay.txt",
    "/l2only": "g",
    "/mod": "exe.sh file.txt",
    "/mod/exe.sh": "inner",
    "/rep": "deep old1 old2",
}


# Names the upper layers delete or hide: readdir must not list them and a
# lookup by name must not find them either.
HIDDEN = (
    "/data/del.txt",
    "/data/sub/a.txt",
    "/opq/x",
    "/opq/y",
    "/opq/sub",
    "/opq/sub/z",
    "/wh/gonedir",
    "/wh/gonedir/f",
    "/l2only/f",
    "/swap/dir/f",
    "/mod/exe.sh/.wh.x",
    "/wh/.wh.gone.txt",
    "/opq/.wh..wh..opq",
)

LOOKUP_SH = "for p in {}; do if test -e $p || test -L $p; then echo VISIBLE $p; fi; done"


def _listing_script() -> str:
    return "; ".join(f"echo \"{d}: $(ls -A {d} | tr '\\n' ' ')\"" for d in EXPECTED_LISTINGS)


def test_three_layer_tree_matches_kernel(stores: Stores, images: dict[str, str]) -> None:
    lookups = LOOKUP_SH.format(" ".join(HIDDEN))
    script = f"{TREE_SH}; find / -xdev | sort; {_listing_script()}; {lookups}; tree {IMAGE_ROOTS}"
    out = {st.name: st.sh(THREE_IMAGE, script).stdout for st in stores.both()}
    ours, ref = parse_tree(out["union"]), parse_tree(out["kernel"])
    assert not tree_diff(ours, ref), "trees differ:\n" + tree_diff(ours, ref)
    found = {st: {ln for ln in o.splitlines() if ln.startswith("/")} for st, o in out.items()}
    assert found["union"] == found["kernel"], (
        f"only in union: {sorted(found['union'] - found['kernel'])}\n"
        f"only in kernel: {sorted(found['kernel'] - found['union'])}"
    )
    for d, names in EXPECTED_LISTINGS.items():
        assert f"{d}: {names} " in out["union"], f"{d} should list {names!r}:\n{out['union']}"
    assert not [p for p in found["union"] if "/.wh." in p]
    assert "VISIBLE" not in out["union"], "hidden names found by lookup:\n" + "\n".join(
        ln for ln in out["union"].splitlines() if ln.startswith("VISIBLE")
    )
    assert ours["/wh/gone.txt"].startswith("regular file"), ours["/wh/gone.txt"]
    assert ours["/swap/dir"].startswith("regular file")


def test_union_storage_keeps_oci_markers(stores: Stores, images: dict[str, str]) -> None:
    """With a mount program the layers hold `.wh.` files: the union must read them."""
    overlay = stores.union.graphroot / "overlay"
    markers = {p.name for p in overlay.glob("*/diff/**/.wh.*")}
    assert {".wh..wh..opq", ".wh.gone.txt", ".wh.gonedir", ".wh.del.txt"} <= markers, markers


def _open(path: Path, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


WRITES: dict[str, Callable[[Path], object]] = {
    "create": lambda m: _open(m / "data" / "new", os.O_CREAT | os.O_EXCL | os.O_WRONLY),
    "open-for-write": lambda m: _open(m / "data" / "keep.txt", os.O_RDWR),
    "truncate": lambda m: os.truncate(m / "data" / "keep.txt", 0),
    "mkdir": lambda m: os.mkdir(m / "newdir"),
    "unlink": lambda m: os.unlink(m / "data" / "keep.txt"),
    "rmdir": lambda m: os.rmdir(m / "empty"),
    "rename": lambda m: os.rename(m / "data" / "keep.txt", m / "data" / "moved"),
    "chmod": lambda m: os.chmod(m / "data" / "keep.txt", 0o600),
    "chown": lambda m: os.chown(m / "data" / "keep.txt", 1, 1),
    "symlink": lambda m: os.symlink("x", m / "data" / "sym"),
    "link": lambda m: os.link(m / "data" / "keep.txt", m / "data" / "hl3"),
    "utime": lambda m: os.utime(m / "data" / "keep.txt", (1, 1)),
    "setxattr": lambda m: os.setxattr(m / "data" / "keep.txt", "user.x", b"1"),
    "mknod-fifo": lambda m: os.mkfifo(m / "data" / "fifo"),
}


def _try_writes(mnt: Path) -> dict[str, str]:
    results = {}
    for name, op in WRITES.items():
        try:
            op(mnt)
            results[name] = "ok"
        except OSError as e:
            results[name] = errno.errorcode.get(e.errno or 0, str(e.errno))
    return results


def test_image_mount_is_read_only(stores: Stores, images: dict[str, str]) -> None:
    """`podman image mount` (lowerdir only, no upper): same tree, every write EROFS."""
    trees, writes = {}, {}
    for st in stores.both():
        mnt = Path(st.podman("image", "mount", THREE_IMAGE).stdout.strip())
        try:
            trees[st.name] = host_tree(mnt)
            writes[st.name] = _try_writes(mnt)
            trees[st.name + "-after"] = host_tree(mnt)
        finally:
            st.podman("image", "umount", THREE_IMAGE)
        assert str(mnt) not in st.merged_mounts()
    assert not tree_diff(trees["union"], trees["kernel"]), tree_diff(
        trees["union"], trees["kernel"]
    )
    assert trees["union-after"] == trees["union"], tree_diff(trees["union-after"], trees["union"])
    assert writes["union"] == {k: "EROFS" for k in WRITES}, writes
    assert writes["union"] == writes["kernel"], writes
