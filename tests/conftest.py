"""Fixtures for the real-mount tests.

``backend`` runs a test against kernel overlayfs (the reference) and against unionfs;
a test about unionfs only parametrizes ``backend`` itself with ``["unionfs"]``.

Every mount made through ``union`` is unmounted at teardown (politely, then lazily,
then the daemon is killed), and a unionfs test fails if its daemon log holds a
traceback. A mount that cannot be made fails the test: nothing here skips.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

# Helpers live in tests/mounts.py: `from mounts import ...` (pytest puts tests/ on sys.path)
# or `from tests.mounts import ...` (the repo root, added here however pytest is started).
_REPO = str(Path(__file__).resolve().parents[1])
if _REPO not in sys.path:
    sys.path.append(_REPO)

from mounts import (
    Mount,
    force_unmount,
    kill_all,
    mount_backend,
    mounts_under,
    pids_mentioning,
)
from programs import ProgramAudit

WATCHDOG = float(os.environ.get("UNIONFS_TEST_WATCHDOG", "180"))


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "watchdog(seconds): kill this test's daemons after so long (default 180)"
    )
    # Every program the session runs must be in scripts/programs.txt, from a package
    # scripts/test installs: the session fails at its end otherwise (tests/programs.py).
    config.pluginmanager.register(ProgramAudit(), "unionfs-program-audit")


@pytest.fixture(params=["kernel", "unionfs"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


UnionFactory = Callable[..., Mount]


@pytest.fixture
def union(backend: str, tmp_path: Path) -> Iterator[UnionFactory]:
    """Factory: ``union(lower1, lower2, ..., upper=True|False|Path, name="mnt")``.

    Lowers are given top-most first. ``upper=True`` makes an empty upper, a Path uses
    that directory, ``False`` mounts read-only. ``options`` are extra unionmount arguments
    (a test passing them runs on unionfs only). Returns a live Mount.
    """
    made: list[Mount] = []

    def factory(
        *lowers: Path,
        upper: bool | Path = True,
        workdir: Path | None = None,
        name: str = "mnt",
        options: Sequence[str] = (),
    ) -> Mount:
        assert lowers, "at least one lower layer"
        if upper is True:
            up: Path | None = tmp_path / f"{name}.upper"
        elif upper is False:
            up = None
        else:
            up = Path(upper)
        wd = workdir if workdir is not None else (tmp_path / f"{name}.work" if up else None)
        m = mount_backend(
            backend,
            list(lowers),
            up,
            wd,
            tmp_path / name,
            log=tmp_path / f"{name}.log",
            options=options,
        )
        made.append(m)
        return m

    yield factory
    for m in made:
        m.unmount()
    for m in made:
        m.assert_log_clean()


@pytest.fixture(scope="session")
def _session_mount_cleanup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """At the end of the session: nothing mounted or running on its temp dirs."""
    yield
    base = tmp_path_factory.getbasetemp()
    for mnt in sorted(mounts_under(base), key=len, reverse=True):
        force_unmount(mnt)
    kill_all(pids_mentioning(base))


@pytest.fixture
def mount_guard(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
    _session_mount_cleanup: None,
) -> Iterator[None]:
    """For every mount test (``pytestmark = pytest.mark.usefixtures("mount_guard")``):

    - a watchdog: a hung daemon would hang the suite (FUSE requests wait forever), so
      past the limit every process started on this session's temp dirs is killed, which
      fails the blocked syscalls with ENOTCONN, and the test fails;
    - a leak check: a test that leaves a mount or a process behind under its tmp_path
      fails (after they are cleaned up).
    """
    marker = request.node.get_closest_marker("watchdog")
    limit = float(marker.args[0]) if marker else WATCHDOG
    fired = threading.Event()

    def bite() -> None:
        fired.set()
        kill_all(pids_mentioning(tmp_path_factory.getbasetemp()))

    timer = threading.Timer(limit, bite)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()
    leaked = mounts_under(tmp_path)
    for mnt in sorted(leaked, key=len, reverse=True):
        force_unmount(mnt)
    stray = pids_mentioning(tmp_path)
    kill_all(stray)
    assert not fired.is_set(), f"watchdog: the test ran over {limit:.0f}s, its daemons were killed"
    assert not leaked, f"mounts left behind: {leaked}"
    assert not stray, f"processes left behind: {stray}"
