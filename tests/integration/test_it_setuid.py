"""A setuid-root program in an image runs as root for an unprivileged container user,
on the union storage as on the kernel's: the container's rootfs is not nosuid.

The program is a static C program (built here with gcc -static) that prints its
effective uid; the image is the busybox one with it added as /usr/local/bin/sid
(root, 4755) and as /usr/local/bin/plain (0755, the control).
"""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from it_storage import Stores
from it_support import MTIME

SETUID_IMAGE = "localhost/it-setuid:latest"
NOBODY = "65534"
EUID_C = r"""
#include <stdio.h>
#include <unistd.h>

int main(void) {
    printf("euid=%d\n", (int)geteuid());
    return 0;
}
"""


def _compile_static(workdir: Path) -> Path:
    (workdir / "euid.c").write_text(EUID_C)
    r = subprocess.run(
        ["gcc", "-static", "-O2", "-o", str(workdir / "euid"), str(workdir / "euid.c")],
        capture_output=True, text=True, timeout=120, check=False)
    assert r.returncode == 0, f"gcc -static failed (gcc and libc6-dev installed?): {r.stderr}"
    return workdir / "euid"


@pytest.fixture(scope="module")
def setuid_image(stores: Stores, busybox_tar: Path) -> Iterator[str]:
    work = stores.root / "setuid"
    work.mkdir()
    program = _compile_static(work)
    tar_path = work / "image.tar"
    shutil.copyfile(busybox_tar, tar_path)
    with tarfile.open(tar_path, "a", format=tarfile.PAX_FORMAT) as tar:
        for d in ("usr", "usr/local", "usr/local/bin"):
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, MTIME
            tar.addfile(info)
        data = program.read_bytes()
        for name, mode in (("sid", 0o4755), ("plain", 0o755)):
            info = tarfile.TarInfo(f"usr/local/bin/{name}")
            info.mode, info.size, info.mtime = mode, len(data), MTIME
            info.uid = info.gid = 0
            with open(program, "rb") as f:
                tar.addfile(info, f)
    try:
        for st in stores.both():
            st.podman("import", str(tar_path), SETUID_IMAGE)
        yield SETUID_IMAGE
    finally:
        for st in stores.both():
            st.podman("rmi", "--force", SETUID_IMAGE, check=False)


def test_setuid_root_program_runs_as_root(stores: Stores, setuid_image: str) -> None:
    out = {}
    for st in stores.both():
        runs = {}
        for name in ("sid", "plain"):
            r = st.podman("run", "--rm", "--pull=never", "--user", NOBODY, setuid_image,
                          f"/usr/local/bin/{name}")
            runs[name] = r.stdout.strip()
        mode = st.podman("run", "--rm", "--pull=never", setuid_image,
                         "stat", "-c", "%a %u", "/usr/local/bin/sid").stdout.strip()
        out[st.name] = (runs["sid"], runs["plain"], mode)
    assert out["kernel"] == ("euid=0", f"euid={NOBODY}", "4755 0"), out["kernel"]
    assert out["union"] == out["kernel"], out
