"""The podman and buildah workloads of scripts/bench, on a private containers-storage per system.

Each system gets its own storage, made on first use and kept for the run: the overlay
driver, natively on kernel overlayfs (native diff, as a root user gets it), and with
`mount_program` = fuse-overlayfs or unionmount. unionmount is run through a wrapper (podman
needs one absolute path; the wrapper adds `--log`); with --count-requests both FUSE programs
are, and the wrapper appends each mount's MAJOR:MINOR to a record file, from which the
request counter knows the connections a step's mounts used. The containers.conf is the one
tests/integration/it_storage.py writes for this host (runc, cgroupfs, no network, ulimits
root can set here). The storages live in the run's short directory under /tmp (see
Storages.short); the wrappers and unionmount's logs in the run directory. The image is the Debian minbase
(`podman import`), imported and run once, untimed, before the first timed step; podman steps
are not preceded by a cache drop (a container start usually finds its image warm).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bench_core
from bench_core import Scenario, Step, log, run
from bench_real import RealParams

IMAGE = "localhost/bench-debian:latest"
BUILT = "localhost/bench-built:latest"
COMMITTED = "localhost/bench-committed:latest"
CHANGED = "bench-changed"  # the container that podman commit commits


def _q(s: object) -> str:
    return shlex.quote(str(s))


class Storages:
    """One containers-storage per system under run_dir, made by root(system) on first use."""

    def __init__(self, run_dir: Path, short: Path, unionmount: list[str],
                 image_tar: Callable[[], Path], record: Path | None) -> None:
        self.run_dir = run_dir
        # A short path for the storages: with a graphroot or runroot path of about 45
        # characters or more, podman 4.3 waits out its 20 s conmon timeout at every
        # container exit.
        self.short = short
        self.unionmount = unionmount
        self.image_tar = image_tar
        self.record = record  # set: wrappers record the mounts' devices (--count-requests)
        self.logs_dir = run_dir / "podman-logs"
        self.roots: dict[str, Path] = {}

    def root(self, system: str) -> Path:
        if system in self.roots:
            return self.roots[system]
        root = self.short / system[0]  # k, f, u
        for d in ("graph", "run", "tmp", "libpod-tmp", "networks"):
            (root / d).mkdir(parents=True, exist_ok=True)
        (root / "containers.conf").write_text(
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
            f'image_copy_tmp_dir = "{root}/tmp"\n'
        )
        conf = f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\n'
        conf += f'runroot = "{root}/run"\n'
        program = self.mount_program(system)
        if program is not None:
            conf += f'[storage.options.overlay]\nmount_program = "{program}"\n'
        (root / "storage.conf").write_text(conf)
        self.roots[system] = root  # from here on close() cleans it up
        t0 = time.perf_counter()
        podman(root, "import", "--quiet", str(self.image_tar()), IMAGE)
        podman(root, "run", "--rm", "--pull=never", IMAGE, "true")
        log(f"  {system}: podman storage ready in {time.perf_counter() - t0:.1f} s "
            "(image imported, one container run)")
        return root

    def mount_program(self, system: str) -> Path | None:
        """What storage.conf names: None for the kernel, else the program or its wrapper."""
        if system == "kernel":
            return None
        if system == "fuse-overlayfs" and self.record is None:
            found = shutil.which("fuse-overlayfs")
            if found is None:
                raise bench_core.MountError("fuse-overlayfs is not installed")
            return Path(found)
        self.logs_dir.mkdir(exist_ok=True)
        wrapper = self.run_dir / "bin" / system
        wrapper.parent.mkdir(exist_ok=True)
        if system == "fuse-overlayfs":
            command = "fuse-overlayfs"
        else:
            command = shlex.join(self.unionmount) + f" --log {_q(self.logs_dir)}/unionmount-$$.log"
        text = f"#!/bin/sh\n# written by scripts/bench: podman's mount program for {system}\n"
        if self.record is None:
            text += f'exec {command} "$@"\n'
        else:
            text += (f'{command} "$@"\nrc=$?\nfor mnt; do :; done\n'
                     f'grep -F -e " $mnt " /proc/self/mountinfo | cut -d" " -f3 '
                     f'>>{_q(self.record)}\nexit $rc\n')
        wrapper.write_text(text)
        wrapper.chmod(0o755)
        return wrapper

    def logs(self) -> set[Path]:
        return set(self.logs_dir.glob("*.log")) if self.logs_dir.is_dir() else set()

    def close(self) -> None:
        """Containers and images removed, everything under the storages unmounted."""
        for system, root in self.roots.items():
            for args in (("rm", "--all", "--force", "--time", "0"), ("rmi", "--all", "--force")):
                try:
                    podman(root, *args, timeout=120)
                except bench_core.MountError as e:
                    log(f"  {system}: cleanup: {e}")
            for mnt in sorted(mounts_under(root), key=len, reverse=True):
                subprocess.run(["umount", "-l", mnt], check=False, capture_output=True)
        self.roots.clear()


def mounts_under(root: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [m for m in (line.split()[4] for line in f) if m.startswith(f"{root}/")]


def env_of(root: Path) -> dict[str, str]:
    return dict(os.environ, CONTAINERS_CONF=str(root / "containers.conf"),
                CONTAINERS_STORAGE_CONF=str(root / "storage.conf"), TMPDIR=str(root / "tmp"))


def podman(root: Path, *args: str, timeout: float | None = None) -> str:
    return run(f"podman {args[0]}", ["podman", *args], timeout or bench_core.STEP_TIMEOUT,
               cwd=root, env=env_of(root)).strip()


def buildah(root: Path, *args: str) -> str:
    return run(f"buildah {args[0]}", ["buildah", *args], bench_core.STEP_TIMEOUT, cwd=root,
               env=env_of(root)).strip()


def containerfile(rp: RealParams) -> str:
    """Five RUN steps: add files (and a big one), modify some, delete some, chmod the big one
    (a copy-up of all its data, from the layer below), hard links."""
    per = rp.build_files // 20
    return (
        f"FROM {IMAGE}\n"
        "RUN set -e; mkdir -p /data/small; cd /data/small; for d in $(seq 0 19); do mkdir d$d; "
        f'for f in $(seq 0 {per - 1}); do echo "file $d $f" > d$d/f$f; done; done; '
        f"head -c {rp.build_big_mib}M /dev/zero > /data/big; cp -a /usr/share/doc /data/doc\n"
        "RUN set -e; for d in $(seq 0 19); do "
        f"for f in $(seq 0 {max(per // 5, 1) - 1}); do echo changed >> /data/small/d$d/f$f; "
        "done; done; echo changed >> /etc/os-release\n"
        "RUN set -e; rm -rf /data/doc /data/small/d1 /data/small/d2 /usr/share/locale\n"
        "RUN chmod 600 /data/big\n"
        "RUN set -e; mkdir /data/links; for d in $(seq 3 9); do "
        f"for f in $(seq 0 {per - 1}); do ln /data/small/d$d/f$f /data/links/l$d-$f; "
        "done; done\n"
    )


@contextlib.contextmanager
def removing(root: Path, *, containers: tuple[str, ...] = (),
             images: tuple[str, ...] = ()) -> Iterator[None]:
    """Remove these containers and images afterwards (untimed), whatever happened."""
    try:
        yield
    finally:
        for argv in ([["podman", "rm", "--force", "--time", "0", c] for c in containers]
                     # rmi removes the build's untagged intermediate images with it
                     + [["podman", "rmi", "--force", i] for i in images]):
            subprocess.run(argv, check=False, capture_output=True, stdin=subprocess.DEVNULL,
                           cwd=root, env=env_of(root), timeout=120)


def scenarios(rp: RealParams, storages: Storages) -> list[Scenario]:
    def build_context(root: Path) -> None:
        ctx = root / "build"
        ctx.mkdir(exist_ok=True)
        (ctx / "Containerfile").write_text(containerfile(rp))

    def change(root: Path) -> None:
        podman(root, "run", "--name", CHANGED, "--pull=never", IMAGE, "sh", "-c",
               f"set -e; mkdir /data; for i in $(seq 1 {rp.commit_files}); do "
               "echo $i > /data/f$i; done; rm -rf /usr/share/doc; echo changed >> /etc/os-release")

    def bud(root: Path) -> str:
        buildah(root, "bud", "--layers", "--no-cache", "--pull=false", "--network=none",
                "--quiet", "-t", BUILT, str(root / "build"))
        return "built"

    def commit(root: Path) -> str:
        podman(root, "commit", "--quiet", CHANGED, COMMITTED)
        return "committed"

    return [
        Scenario("podman-run", None, session=storages.root, real=True, cold=False, steps=(
            Step("podman run --rm IMAGE true (Debian minbase)",
                 lambda root: podman(root, "run", "--rm", "--pull=never", IMAGE, "true")),
        )),
        Scenario("buildah-bud", None, session=storages.root, real=True, cold=False,
                 setup=build_context, around=lambda root: removing(root, images=(BUILT,)),
                 steps=(
                     Step(f"buildah bud --layers --no-cache, 5 RUN steps ({rp.build_big_mib} "
                          "MiB chmod)", bud),
                 )),
        Scenario("podman-commit", None, session=storages.root, real=True, cold=False,
                 setup=change, around=lambda root: removing(
                     root, containers=(CHANGED,), images=(COMMITTED,)),
                 steps=(
                     Step(f"podman commit of a changed container ({rp.commit_files} files)",
                          commit),
                 )),
    ]
