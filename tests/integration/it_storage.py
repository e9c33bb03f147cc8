"""The two private container storages the integration tests compare.

"union" uses the overlay driver with the mount program under test, "kernel"
the same driver with kernel overlayfs.  Test modules import from here, never
from conftest.py (two conftest modules share that name).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from it_support import (
    CMD_TIMEOUT,
    CommandFailed,
    MountProgram,
    Result,
    mounts_under,
    run,
    unmount_all_under,
)

BUSYBOX_IMAGE = "localhost/it-busybox:latest"
THREE_IMAGE = "localhost/it-three:latest"


class Storage:
    """One private containers-storage (graphroot, runroot, configs) and its CLI calls."""

    def __init__(self, name: str, root: Path, mount_program: Path | None) -> None:
        self.name = name
        self.root = root
        self.mount_program = mount_program
        self.graphroot = root / "graph"
        self.runroot = root / "run"
        self.tmp = root / "tmp"
        for d in (self.graphroot, self.runroot, self.tmp, root / "libpod-tmp", root / "networks"):
            d.mkdir(parents=True, exist_ok=True)
        self.containers_conf = root / "containers.conf"
        self.containers_conf.write_text(
            "[containers]\n"
            'default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]\n'
            'netns = "none"\n'
            "[network]\n"
            f'network_config_dir = "{root}/networks"\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/libpod-tmp"\n'
            f'image_copy_tmp_dir = "{self.tmp}"\n'
        )
        self.storage_conf = self.write_storage_conf(root / "storage.conf", mount_program)
        if mount_program is None:
            self._force_naive_diff()

    def _force_naive_diff(self) -> None:
        """Make the kernel storage diff and commit the way a mount program's does.

        With a mount program containers-storage computes `podman diff` and the
        committed layer by comparing a mount of the container with a read-only
        mount of its parent ("naive diff"); with the kernel it reads the upper
        directory instead ("native diff"), whose output differs for replaced
        directories ("D /d" + "A /d/x" against "C /d" + "D /d/old" + ...).
        Recording "native diff unusable" in the driver's feature cache makes the
        reference run the same algorithm, so only the filesystems differ.
        """
        cache = self.runroot / "overlay"
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "native-diff()-false").write_text("forced by the unionfs integration tests")

    def uses_naive_diff(self) -> bool:
        cache = self.runroot / "overlay"
        return self.mount_program is not None or (
            (cache / "native-diff()-false").exists() and not (cache / "native-diff()-true").exists()
        )

    def write_storage_conf(self, path: Path, mount_program: Path | None) -> Path:
        """A storage.conf for this graphroot; another mount program may share it."""
        text = (
            "[storage]\n"
            'driver = "overlay"\n'
            f'graphroot = "{self.graphroot}"\n'
            f'runroot = "{self.runroot}"\n'
        )
        if mount_program is not None:
            text += f'[storage.options.overlay]\nmount_program = "{mount_program}"\n'
        path.write_text(text)
        return path

    def env(self, storage_conf: Path | None = None) -> dict[str, str]:
        return dict(
            os.environ,
            CONTAINERS_CONF=str(self.containers_conf),
            CONTAINERS_STORAGE_CONF=str(storage_conf or self.storage_conf),
            TMPDIR=str(self.tmp),
        )

    def podman(
        self,
        *args: str,
        check: bool = True,
        timeout: float = CMD_TIMEOUT,
        storage_conf: Path | None = None,
        input: str | None = None,
    ) -> Result:
        return run(
            ["podman", *args],
            env=self.env(storage_conf),
            check=check,
            timeout=timeout,
            input=input,
            cwd=self.root,
        )

    def buildah(self, *args: str, check: bool = True, timeout: float = CMD_TIMEOUT) -> Result:
        return run(["buildah", *args], env=self.env(), check=check, timeout=timeout, cwd=self.root)

    def sh(self, image: str, script: str, *extra: str, check: bool = True) -> Result:
        """podman run --rm IMAGE sh -c SCRIPT."""
        return self.podman(
            "run", "--rm", "--pull=never", *extra, image, "sh", "-c", script, check=check
        )

    def merged_mounts(self) -> list[str]:
        return mounts_under(self.graphroot)

    def cleanup(self) -> list[str]:
        """Remove containers and images, unmount; returns what went wrong.

        Each step runs even when one before it failed or timed out (a hung
        mount must not leave the rest behind); the unmount comes last and is
        lazy if it has to be.
        """
        problems = []
        steps: list[tuple[str, ...]] = [
            ("podman", "rm", "--all", "--force", "--time", "0"),
            ("podman", "image", "umount", "--all", "--force"),
            ("buildah", "rm", "--all"),
            ("podman", "rmi", "--all", "--force"),
        ]
        for tool, *args in steps:
            try:
                run([tool, *args], env=self.env(), check=False, timeout=60, cwd=self.root)
            except CommandFailed as e:
                problems.append(f"{self.name}: {e}")
        left = unmount_all_under(self.root)
        if left:
            problems.append(f"{self.name}: still mounted: {left}")
        return problems


@dataclass
class Stores:
    union: Storage
    kernel: Storage
    program: MountProgram
    root: Path

    def both(self) -> tuple[Storage, Storage]:
        return self.union, self.kernel
