"""Images by reference with the real tools on both ends.

- The three-layer image written out by buildah (``buildah push IMG oci:DIR``), by skopeo
  (re-compressed as zstd) and by ``podman save`` (docker-archive): each resolved
  through one layer store (which then holds its three layers once) and mounted with
  ``python -m unionfs LAYERS MNT``; every tree equals ``podman image mount`` of the image
  (kernel overlayfs storage).
- A container's changes committed with ``unionmount commit``: ``podman run
  oci:DIR:TAG`` shows the same tree as the container did and as the committed image
  mounted by unionmount (the same busybox ``find``/``stat``/``md5sum``, run in a chroot
  on our mounts).
- A registry (Debian's docker-registry, on 127.0.0.1 only, started and stopped here):
  the committed image pushed with ``skopeo copy``, pulled into a fresh layout, resolved
  into a fresh store and mounted: the same tree.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from it_storage import THREE_IMAGE, Stores
from it_support import (
    REPO,
    TREE_SH,
    CommandFailed,
    host_tree,
    parse_tree,
    run,
    tree_diff,
    unmount_all_under,
)

IMAGE_ROOTS = "/bin /data /opq /wh /rep /mod /swap /tmp /l2only /owned /empty"
TREE_SCRIPT = f"{TREE_SH}; tree {IMAGE_ROOTS}"


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(REPO))


def imagecli(*args: object) -> str:
    return run([sys.executable, "-m", "unionfs", *map(str, args)], env=_env(),
               timeout=300).stdout


def layers_of(ref: str, store: Path) -> str:
    return imagecli("store", "resolve", ref, "--store", store).strip()


@contextlib.contextmanager
def mounted(layers: str, mnt: Path, *extra: object) -> Iterator[Path]:
    mnt.mkdir(parents=True)
    run([sys.executable, "-m", "unionfs", layers, *map(str, extra), "--log",
         f"{mnt}.log", mnt], env=_env(), timeout=60)
    try:
        yield mnt
    finally:
        run(["fusermount3", "-u", mnt], check=False, timeout=30)
        left = unmount_all_under(mnt)
        assert not left, left
        assert "Traceback" not in Path(f"{mnt}.log").read_text()


def chroot_tree(mnt: Path) -> dict[str, str]:
    """The tree as busybox inside the image sees it (as in a container)."""
    return parse_tree(run(["chroot", mnt, "/bin/sh", "-c", TREE_SCRIPT], timeout=120).stdout)


@pytest.fixture(scope="module")
def image_tools(stores: Stores) -> None:
    """skopeo and docker-registry come from scripts/test, like the rest (see the
    session's tools fixture, which stores depends on)."""


@pytest.fixture(scope="module")
def pushed(stores: Stores, images: dict[str, str], image_tools: None) -> dict[str, str]:
    """THREE_IMAGE as an OCI layout by buildah and by skopeo (zstd), and as a
    docker-archive by podman save."""
    root = stores.root / "images"
    root.mkdir()
    kernel = stores.kernel
    kernel.buildah("push", THREE_IMAGE, f"oci:{root}/buildah:three")
    run(["skopeo", "copy", "--dest-compress-format", "zstd", "--dest-compress",
         f"oci:{root}/buildah:three", f"oci:{root}/skopeo:three"], env=kernel.env(),
        timeout=120)
    kernel.podman("save", "--format", "docker-archive", "-o", str(root / "three.tar"),
                  THREE_IMAGE)
    return {"buildah": f"oci:{root}/buildah:three", "skopeo": f"oci:{root}/skopeo:three",
            "podman-save": f"docker-archive:{root}/three.tar"}


def _media_types(layout: str) -> set[str]:
    path = Path(layout[4:].rsplit(":", 1)[0])
    index = json.loads((path / "index.json").read_text())
    blob = path / "blobs/sha256" / index["manifests"][0]["digest"][7:]
    return {layer["mediaType"] for layer in json.loads(blob.read_text())["layers"]}


def test_resolved_images_match_podman_image_mount(stores: Stores, pushed: dict[str, str]
                                                  ) -> None:
    kernel = stores.kernel
    ref_mnt = Path(kernel.podman("image", "mount", THREE_IMAGE).stdout.strip())
    try:
        expected = host_tree(ref_mnt)
    finally:
        kernel.podman("image", "umount", THREE_IMAGE)
    assert "application/vnd.oci.image.layer.v1.tar+zstd" in _media_types(pushed["skopeo"])
    store = stores.root / "store-resolve"
    for name, ref in pushed.items():
        with mounted(layers_of(ref, store), stores.root / f"mnt-{name}") as mnt:
            ours = host_tree(mnt)
        assert not tree_diff(ours, expected), f"{name}:\n" + tree_diff(ours, expected)
    assert len(os.listdir(store / "layers/sha256")) == 3  # one copy for all three


@pytest.fixture(scope="module")
def committed(stores: Stores, pushed: dict[str, str]) -> dict[str, object]:
    """A container of the buildah-pushed image, changed and committed (its view, before
    the commit, as busybox saw it)."""
    store = stores.root / "store-commit"
    upper = stores.root / "commit-upper"
    upper.mkdir()
    with mounted(layers_of(pushed["buildah"], store), stores.root / "container",
                 "--upper", upper) as mnt:
        script = ("echo new > /data/new.txt; echo changed > /data/keep.txt; rm /data/link; "
                  "rm -rf /rep; mkdir /rep; echo fresh > /rep/only; chmod 600 /mod/file.txt; "
                  "ln /data/keep.txt /data/keep-link; mkdir -p /srv/app; "
                  "echo 'echo hello from the commit' > /srv/app/run.sh")
        run(["chroot", mnt, "/bin/sh", "-c", script], timeout=60)
        view = chroot_tree(mnt)
    target = pushed["buildah"].rsplit(":", 1)[0] + ":committed"
    imagecli("commit", pushed["buildah"], "--upper", upper, target, "--store", store)
    return {"ref": target, "view": view, "store": store}


def test_committed_image_runs_in_podman(stores: Stores, committed: dict[str, object]) -> None:
    ref = str(committed["ref"])
    image = stores.kernel.podman("pull", "--quiet", ref).stdout.strip()
    out = stores.kernel.sh(image, TREE_SCRIPT + "; sh /srv/app/run.sh").stdout
    assert "hello from the commit" in out
    in_podman = parse_tree(out)
    view = committed["view"]
    assert isinstance(view, dict)
    assert not tree_diff(in_podman, view), tree_diff(in_podman, view)
    with mounted(layers_of(ref, Path(str(committed["store"]))),
                 stores.root / "mnt-committed") as mnt:
        ours = chroot_tree(mnt)
    assert not tree_diff(ours, view), tree_diff(ours, view)
    assert ours["/rep/only"].startswith("regular file") and "/rep/old1" not in ours
    assert "/data/link" not in ours


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def registry(root: Path) -> Iterator[str]:
    """docker-registry on 127.0.0.1:PORT (loopback only), stopped on the way out."""
    port = _free_port()
    root.mkdir()
    config = root / "config.yml"
    config.write_text("version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n"
                      f"    rootdirectory: {root / 'data'}\nhttp:\n  addr: 127.0.0.1:{port}\n")
    log = open(root / "registry.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdin=subprocess.DEVNULL,
                            stdout=log, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise CommandFailed("docker-registry did not start: " +
                                    (root / "registry.log").read_text())
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
        log.close()


def test_push_to_a_registry_and_pull_back(stores: Stores, committed: dict[str, object]
                                          ) -> None:
    ref = str(committed["ref"])
    pulled = stores.root / "pulled"
    with registry(stores.root / "registry") as host:
        run(["skopeo", "copy", "--dest-tls-verify=false", ref,
             f"docker://{host}/it/committed:1"], env=stores.kernel.env(), timeout=120)
        run(["skopeo", "copy", "--src-tls-verify=false", f"docker://{host}/it/committed:1",
             f"oci:{pulled}:1"], env=stores.kernel.env(), timeout=120)
    fresh = stores.root / "store-pulled"
    with mounted(layers_of(f"oci:{pulled}:1", fresh), stores.root / "mnt-pulled") as mnt:
        pulled_tree = host_tree(mnt)
        in_chroot = chroot_tree(mnt)
    view = committed["view"]
    assert isinstance(view, dict)
    assert not tree_diff(in_chroot, view), tree_diff(in_chroot, view)
    with mounted(layers_of(ref, Path(str(committed["store"]))),
                 stores.root / "mnt-original") as mnt:
        original = host_tree(mnt)
    assert not tree_diff(pulled_tree, original), tree_diff(pulled_tree, original)
    assert len(os.listdir(fresh / "layers/sha256")) == 4
