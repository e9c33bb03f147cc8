"""buildah bud --layers on the union builds the same image tree as on the kernel."""

from __future__ import annotations

import os
from pathlib import Path

from it_storage import THREE_IMAGE, Storage, Stores
from it_support import MTIME, TREE_SH, parse_tree, tree_diff

CONTAINERFILE = f"""\
FROM {THREE_IMAGE}
RUN rm /data/keep.txt /wh/stay.txt && rm -rf /data/sub
RUN rm -rf /rep && mkdir /rep && echo fresh > /rep/new && ls -A /rep /rep/.
COPY added.txt /added/added.txt
RUN echo changed >> /mod/file.txt && rm -rf /opq && mkdir /opq && echo only > /opq/only
RUN test ! -e /rep/old1 && test ! -e /data/keep.txt && test ! -e /opq/l3
"""

BUILT = "localhost/it-built:latest"


def _build(st: Storage, context: Path) -> tuple[str, str, str]:
    args = ("bud", "--layers", "--pull=false", "--network=none", "-t", BUILT, str(context))
    st.buildah(*args, timeout=300)
    image_id = st.podman("image", "inspect", "--format", "{{.Id}}", BUILT).stdout.strip()
    layers = st.podman("image", "inspect", "--format", "{{len .RootFS.Layers}}", BUILT).stdout
    again = st.buildah(*args, timeout=300)
    rebuilt = st.podman("image", "inspect", "--format", "{{.Id}}", BUILT).stdout.strip()
    assert rebuilt == image_id, (
        f"a second --layers build should come from the cache:\n{again.stdout}"
    )
    tree = st.sh(
        BUILT, f"{TREE_SH}; ls -A /rep /opq /data /wh; tree /data /opq /wh /rep /mod /added"
    ).stdout
    return image_id, layers.strip(), tree


def test_buildah_bud_layers_same_tree(
    stores: Stores, images: dict[str, str], tmp_path: Path
) -> None:
    context = tmp_path / "context"
    context.mkdir()
    (context / "Containerfile").write_text(CONTAINERFILE)
    (context / "added.txt").write_text("added\n")
    os.utime(context / "added.txt", (MTIME, MTIME))
    out = {}
    for st in stores.both():
        try:
            out[st.name] = _build(st, context)
        finally:
            st.podman("rmi", "--force", BUILT, check=False)
    ours, ref = parse_tree(out["union"][2]), parse_tree(out["kernel"][2])
    assert not tree_diff(ours, ref), "built trees differ:\n" + tree_diff(ours, ref)
    # Three layers of the base image, one for each of the five instructions.
    assert out["union"][1] == out["kernel"][1] == "8", (out["union"][1], out["kernel"][1])
    assert [p for p in ours if p.startswith("/rep/")] == ["/rep/new"], sorted(ours)
    assert [p for p in ours if p.startswith("/opq/")] == ["/opq/only"], sorted(ours)
    for gone in ("/data/keep.txt", "/wh/stay.txt", "/data/sub"):
        assert gone not in ours
