"""Session fixtures for the real-tools tests (podman, buildah, runc).

Two private container storages live under one temporary directory: "union"
uses the overlay driver with our mount program, "kernel" uses the same driver
with the kernel's overlayfs.  Every test does the same steps on both and
compares.  Images are built once per session.

The mount program is the unionfs wrapper unless $UNIONFS_IT_MOUNT_PROGRAM
names another (e.g. fuse-overlayfs, to check the tests themselves).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from it_storage import BUSYBOX_IMAGE, THREE_IMAGE, Storage, Stores
from it_support import (
    CommandFailed,
    busybox_entries,
    select_mount_program,
    tar_bytes,
    three_layer_tars,
    unmount_all_under,
    write_oci_layout,
)
from programs import SCRIPTS, package_status, script_installs

# Seconds one test may take before its mount daemons are killed.
WATCHDOG = float(os.environ.get("UNIONFS_IT_WATCHDOG", "300"))


def _daemons_under(root: Path) -> list[int]:
    """Pids of processes (other than us) whose command line names a path under root."""
    pids = []
    needle = str(root).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if needle in f.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="session")
def it_root() -> Iterator[Path]:
    # Lower-case letters and digits only: podman names an image pulled from
    # oci:DIR after DIR's path, and rejects '_' or capitals there.
    root = Path(tempfile.gettempdir()) / f"uit-{uuid.uuid4().hex[:10]}"
    root.mkdir(mode=0o700)
    yield root
    left = unmount_all_under(root)
    if left:
        raise CommandFailed(f"still mounted after the tests, not removing {root}: {left}")
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def tools() -> None:
    """podman, buildah, runc, busybox-static, fuse-overlayfs, ... come from scripts/test (the
    packages it installs are in scripts/_common.sh; the programs in scripts/programs.txt).
    Without one of them the tests fail here, naming the packages, not inside a podman call."""
    missing = sorted(p for p, st in package_status(script_installs(SCRIPTS / "test")).items()
                     if not st.installed)
    if missing:
        raise CommandFailed(f"Debian packages missing: {' '.join(missing)} (scripts/test "
                            "installs them)")


@pytest.fixture(scope="session")
def stores(it_root: Path, tools: None) -> Iterator[Stores]:
    bindir = it_root / "bin"
    bindir.mkdir()
    (it_root / "logs").mkdir()
    program = select_mount_program(bindir, it_root / "logs")
    s = Stores(
        union=Storage("union", it_root / "union", program.path),
        kernel=Storage("kernel", it_root / "kernel", None),
        program=program,
        root=it_root,
    )
    try:
        yield s
    finally:
        problems = [p for st in s.both() for p in st.cleanup()]
        deadline = time.monotonic() + 10  # daemons exit shortly after their unmount
        while (leaked := _daemons_under(it_root)) and time.monotonic() < deadline:
            time.sleep(0.2)
        if leaked:
            problems.append(f"processes left running with {it_root} in their arguments: {leaked}")
            for pid in leaked:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if problems:
            raise CommandFailed("cleanup: " + "; ".join(problems))


@pytest.fixture(scope="session")
def busybox_tar(it_root: Path, tools: None) -> Path:
    path = it_root / "busybox.tar"
    path.write_bytes(tar_bytes(busybox_entries()))
    return path


@pytest.fixture(scope="session")
def images(stores: Stores, busybox_tar: Path) -> dict[str, str]:
    """BUSYBOX_IMAGE (podman import) and THREE_IMAGE (oci: layout) in both storages."""
    layout = stores.root / "oci-three"
    write_oci_layout(layout, "three", three_layer_tars())
    for st in stores.both():
        st.podman("import", str(busybox_tar), BUSYBOX_IMAGE)
        image_id = st.podman("pull", "--quiet", f"oci:{layout}:three").stdout.strip()
        st.podman("tag", image_id, THREE_IMAGE)
    return {"busybox": BUSYBOX_IMAGE, "three": THREE_IMAGE}


@pytest.fixture(autouse=True)
def daemon_guard(request: pytest.FixtureRequest) -> Iterator[None]:
    """A watchdog, and no traceback in the daemon logs.

    A hung FUSE daemon blocks every process that touches its mount, the test
    process included, where no subprocess timeout helps.  After WATCHDOG
    seconds the mount daemons (every process naming the session directory)
    are killed: blocked calls then fail with ENOTCONN and the test fails.
    """
    if "stores" not in request.fixturenames:
        yield
        return
    root = request.getfixturevalue("stores").root
    fired = threading.Event()

    def bite() -> None:
        fired.set()
        for pid in _daemons_under(root):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    timer = threading.Timer(WATCHDOG, bite)
    timer.daemon = True
    logs = root / "logs"
    seen = {p: p.stat().st_size for p in logs.glob("*.log")}
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
    if fired.is_set():
        raise CommandFailed(f"watchdog: the test ran over {WATCHDOG}s; its daemons were killed")
    bad = []
    for p in sorted(logs.glob("*.log")):
        with open(p, errors="replace") as f:
            f.seek(seen.get(p, 0))
            text = f.read()
        at = text.find("Traceback")
        if at >= 0:
            bad.append(f"==> {p} <==\n{text[max(0, at - 2000) : at + 4000]}")
    if bad:
        raise CommandFailed("the daemon logged tracebacks:\n" + "\n".join(bad))


@pytest.fixture
def name() -> str:
    """A container/image name unique to the test."""
    return "it-" + uuid.uuid4().hex[:12]
