"""Rootless podman and buildah as the test user (tests/rootless.py), on three storages.

Each `RootlessStore` is what a user sets up by hand: ``~/.config/containers/storage.conf``
and ``containers.conf`` in a HOME of its own, an ``XDG_RUNTIME_DIR``, subordinate ids
(made by `rootless.host`), and the overlay driver with either the kernel's overlayfs
(rootless native overlay, kernel >= 5.13) or a ``mount_program``: fuse-overlayfs, or a
wrapper that runs this checkout's ``python -m unionfs``. podman reads the user's files
from HOME, as for any rootless user: no CONTAINERS_CONF / CONTAINERS_STORAGE_CONF here
(rootless containers-storage ignores the graphroot of a storage.conf named that way).

Everything runs as the test user, with a time limit on the whole process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
from pathlib import Path

from it_support import CMD_TIMEOUT, CommandFailed, Result, debian_base
from rootless import SYSTEM_PATH, ChildFailed, User, chown_tree, run_group

#: The host settings ANCHORS.md lists, for a user: root-less limits cannot be raised here
#: either, crun refuses this host's cgroup layout, the host network stays untouched.
CONTAINERS_CONF = """\
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]
netns = "none"
[network]
network_config_dir = "{root}/networks"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "{root}/events.log"
tmp_dir = "{root}/libpod-tmp"
image_copy_tmp_dir = "{root}/tmp"
"""

STORAGE_CONF = """\
[storage]
driver = "overlay"
graphroot = "{root}/graph"
runroot = "{root}/run"
"""


class RootlessStore:
    """One user's podman/buildah configuration and storage under ``root``."""

    def __init__(self, name: str, root: Path, user: User, mount_program: Path | None) -> None:
        self.name = name
        self.root = root
        self.user = user
        self.mount_program = mount_program
        self.home = root / "home"
        conf = self.home / ".config" / "containers"
        for d in (conf, root / "graph", root / "run", root / "tmp", root / "libpod-tmp",
                  root / "networks", root / "xdg"):
            d.mkdir(parents=True, exist_ok=True)
        (conf / "containers.conf").write_text(CONTAINERS_CONF.format(root=root))
        storage = STORAGE_CONF.format(root=root)
        if mount_program is not None:
            storage += f'[storage.options.overlay]\nmount_program = "{mount_program}"\n'
        (conf / "storage.conf").write_text(storage)
        if mount_program is None:
            # The naive diff, as with a mount program (see it_storage.Storage._force_naive_diff):
            # then only the filesystems differ between the stores.
            cache = root / "run" / "overlay"
            cache.mkdir(parents=True, exist_ok=True)
            (cache / "native-diff()-false").write_text("forced by the unionfs rootless tests")
        chown_tree(root, user)
        (root / "xdg").chmod(0o700)

    def env(self) -> dict[str, str]:
        env = {"PATH": SYSTEM_PATH, "HOME": str(self.home), "LANG": "C.UTF-8",
               "USER": self.user.name, "LOGNAME": self.user.name,
               "XDG_RUNTIME_DIR": str(self.root / "xdg"), "TMPDIR": str(self.root / "tmp")}
        if os.environ.get("PYTHONPATH"):
            env["PYTHONPATH"] = os.environ["PYTHONPATH"]
        return env

    def run(self, argv: list[str], *, check: bool = True, timeout: float = CMD_TIMEOUT,
            input: str | None = None, cwd: Path | None = None) -> Result:
        try:
            rc, out, err = run_group(argv, user=self.user, env=self.env(), cwd=cwd or self.root,
                                     timeout=timeout, input=input)
        except ChildFailed as e:
            raise CommandFailed(f"[{self.name}] {e}") from None
        res = Result(tuple(argv), rc, out, err)
        if check and rc != 0:
            raise CommandFailed(f"[{self.name}, as {self.user.name}]\n{res.describe()}")
        return res

    def podman(self, *args: str, **kw: object) -> Result:
        return self.run(["podman", *args], **kw)  # type: ignore[arg-type]

    def buildah(self, *args: str, **kw: object) -> Result:
        return self.run(["buildah", *args], **kw)  # type: ignore[arg-type]

    def sh(self, image: str, script: str, *extra: str) -> Result:
        return self.podman("run", "--rm", "--pull=never", *extra, image, "sh", "-c", script)

    def uses_naive_diff(self) -> bool:
        cache = self.root / "run" / "overlay"
        return self.mount_program is not None or not (cache / "native-diff()-true").exists()

    def cleanup(self) -> list[str]:
        """Containers, images and build containers removed, the pause process (it holds the
        user namespace and its mounts) stopped; returns what went wrong."""
        problems = []
        for argv in (["podman", "rm", "--all", "--force", "--time", "0"],
                     ["buildah", "rm", "--all"], ["podman", "rmi", "--all", "--force"]):
            try:
                self.run(argv, check=False, timeout=120)
            except CommandFailed as e:
                problems.append(str(e))
        pause = self.root / "libpod-tmp" / "pause.pid"
        with contextlib.suppress(FileNotFoundError, ValueError, ProcessLookupError):
            os.kill(int(pause.read_text()), signal.SIGKILL)
        return problems


# ---------------------------------------------------------------------------------------------
# An image holding buildah, for buildah inside a container

#: What the image holds besides Debian's minbase: buildah and the mount programs, the
#: libraries this checkout's interpreter (bound in from the host) loads at import.
BUILDAH_PACKAGES = ("buildah", "fuse-overlayfs", "uidmap", "fuse3", "libssl3", "libffi8")
BUILD_USER = "build"
CAP_SETGID, CAP_SETUID = 6, 7


def _file_caps(*caps: int) -> bytes:
    """A security.capability xattr (VFS_CAP_REVISION_2, effective) granting ``caps``."""
    permitted = sum(1 << c for c in caps)
    return struct.pack("<IIIII", 0x02000001, permitted, 0, 0, 0)


def buildah_image_tar(work: Path, uid: int, gid: int) -> Path:
    """A tar of a Debian rootfs (the cached minbase of scripts/debian_base.py plus
    BUILDAH_PACKAGES from its cached .deb layer) with a user BUILD_USER (uid/gid) that has
    subordinate ids 100000-165535, for ``podman import``.

    newuidmap/newgidmap get file capabilities (cap_setuid, cap_setgid) instead of the
    setuid bit Debian gives them: in a container without CAP_SYS_ADMIN a setuid-root
    newuidmap may not write the uid_map of a user namespace it does not own (the kernel
    wants CAP_SYS_ADMIN over it), while one running as the user, which owns it, may.
    """
    db = debian_base()
    base = db.minbase()
    debs = db.debs_layer(None, base, [list(BUILDAH_PACKAGES)])
    upper, wd, mnt = work / "upper", work / "work", work / "rootfs"
    for d in (upper, wd, mnt):
        d.mkdir(parents=True)
    db.run(["mount", "-t", "overlay", "-o", f"lowerdir={base},upperdir={upper},workdir={wd}",
            "overlay", mnt], timeout=60)
    tar = work / "buildah-image.tar"
    try:
        db.prepare_for_dpkg(mnt)
        with db.Chroot(mnt, binds={db.DEBS_MOUNT: debs}) as ch:
            ch.run(["apt-get", *db.apt_local_options(), "update"])
            ch.run(["apt-get", *db.apt_local_options(), "install", "-y", *BUILDAH_PACKAGES])
            ch.run(["groupadd", "--gid", str(gid), BUILD_USER])
            ch.run(["useradd", "--create-home", "--uid", str(uid), "--gid", str(gid),
                    BUILD_USER])
        (mnt / "usr" / "sbin" / "policy-rc.d").unlink()
        for name in ("subuid", "subgid"):
            (mnt / "etc" / name).write_text(f"{BUILD_USER}:100000:65536\n")
        (mnt / "root").chmod(0o755)  # the host's interpreter is bound under /root
        for prog, cap in (("newuidmap", CAP_SETUID), ("newgidmap", CAP_SETGID)):
            p = mnt / "usr" / "bin" / prog
            p.chmod(0o755)
            os.setxattr(p, "security.capability", _file_caps(cap))
        db.run(["tar", "-C", mnt, "--numeric-owner", "--xattrs",
                "--xattrs-include=security.capability", "-cf", tar, "."], timeout=600)
    finally:
        db.run(["umount", mnt], timeout=60, check=False)
    return tar
