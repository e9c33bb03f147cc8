"""mount.py without mounting: the workdir (modes, the lock, cleaning, the probe, undoing
what it made), the choice of marker format, build_core, and how mount flags and FUSE
options are resolved. Nothing here calls pyfuse3.init or opens /dev/fuse.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
from mounts import build

from unionfs import core, mount, whiteout
from unionfs.config import ConfigError, MountConfig
from unionfs.whiteout import Support, WhiteoutKind
from unit.stacks import open_fds

NO = os.strerror(errno.EOPNOTSUPP)  # as the probe reports a refusal


@pytest.fixture
def opened() -> Iterator[list[int]]:
    """fds to close at teardown."""
    fds: list[int] = []
    yield fds
    for fd in fds:
        os.close(fd)


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


# --------------------------------------------------------------------------- open_workdir


def test_open_workdir_makes_private_dirs(tmp_path: Path, opened: list[int]) -> None:
    workdir = tmp_path / "w"
    fd, markers = mount.open_workdir(str(workdir))
    opened.append(fd)
    assert markers is whiteout.TRUSTED
    assert os.path.samestat(os.fstat(fd), os.stat(workdir / "work"))
    assert _mode(workdir) == 0o700 and _mode(workdir / "work") == 0o700
    assert os.listdir(workdir) == ["work"] and os.listdir(workdir / "work") == []


def test_open_workdir_userxattr(tmp_path: Path, opened: list[int]) -> None:
    fd, markers = mount.open_workdir(str(tmp_path / "w"), userxattr=True)
    opened.append(fd)
    assert markers is whiteout.USERXATTR


def test_the_lock_refuses_a_second_open(tmp_path: Path, opened: list[int]) -> None:
    workdir = tmp_path / "w"
    fd, _ = mount.open_workdir(str(workdir))
    (workdir / "work" / "#1-1").write_bytes(b"a copy being built")
    before = open_fds()
    with pytest.raises(ConfigError, match="in use by another mount"):
        mount.open_workdir(str(workdir))
    assert open_fds() == before
    # The first one's workdir is untouched: nothing cleaned, nothing removed.
    assert os.listdir(workdir / "work") == ["#1-1"]
    os.close(fd)
    fd, _ = mount.open_workdir(str(workdir))  # free again
    opened.append(fd)
    assert os.listdir(workdir / "work") == []  # what a dead server left is cleaned


def test_open_workdir_cleans_what_a_crash_left(tmp_path: Path, opened: list[int]) -> None:
    workdir = build(tmp_path / "w", {"work/#9-1": "half", "work/#9-2/x/y": "z",
                                     "other": "not ours"})
    os.chmod(workdir, 0o700)
    os.chmod(workdir / "work", 0o700)
    fd, _ = mount.open_workdir(str(workdir))
    opened.append(fd)
    assert os.listdir(workdir / "work") == []
    assert sorted(os.listdir(workdir)) == ["other", "work"]  # only work/ is ours to empty


def test_open_workdir_probes_inside_work(tmp_path: Path, opened: list[int],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple[Path, list[str]]] = []
    real = whiteout.probe

    def probe(work_fd: int, name: bytes) -> Support:
        seen.append((Path(os.readlink(f"/proc/self/fd/{work_fd}")), os.listdir(work_fd)))
        assert real(work_fd, name) == Support(None, None, None)
        assert os.listdir(work_fd) == []
        return Support(None, None, "refused")  # as if the filesystem had no devices

    monkeypatch.setattr(whiteout, "probe", probe)
    fd, markers = mount.open_workdir(str(tmp_path / "w"))
    opened.append(fd)
    assert seen == [(tmp_path / "w" / "work", [])]  # after cleaning, in work/
    assert markers.whiteouts is WhiteoutKind.OCI and markers.xattrs == "trusted.overlay."


@pytest.mark.parametrize("existing", [False, True])
def test_a_failure_removes_what_open_workdir_made(tmp_path: Path, existing: bool,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    workdir = tmp_path / "w"
    if existing:
        workdir.mkdir(mode=0o700)
    monkeypatch.setattr(whiteout, "probe", lambda fd, name: Support(NO, NO, None))
    before = open_fds()
    with pytest.raises(ConfigError, match="cannot hold user xattrs"):
        mount.open_workdir(str(workdir), userxattr=True)
    assert open_fds() == before
    if existing:
        assert os.listdir(workdir) == []  # work/ went; the workdir was not ours
    else:
        assert not workdir.exists()


def test_a_foreign_workdir_is_refused_and_left_alone(tmp_path: Path) -> None:
    workdir = tmp_path / "w"
    (workdir / "work").mkdir(parents=True, mode=0o700)
    os.chown(workdir / "work", 4321, 4321)
    before = open_fds()
    with pytest.raises(ConfigError, match="owned by uid 4321"):
        mount.open_workdir(str(workdir))
    assert open_fds() == before
    assert os.listdir(workdir) == ["work"]


# --------------------------------------------------------------------------- markers


@pytest.mark.parametrize(("support", "userxattr", "expected"), [
    (Support(None, None, None), False, whiteout.TRUSTED),
    (Support(None, None, None), True, whiteout.USERXATTR),
    (Support(NO, None, None), False, whiteout.USERXATTR),
    (Support(NO, NO, None), False, whiteout.Markers("user.overlay.", opaque_files=True)),
    (Support(None, None, NO), False,
     whiteout.Markers("trusted.overlay.", whiteouts=WhiteoutKind.OCI)),
    (Support(NO, None, NO), True,
     whiteout.Markers("user.overlay.", whiteouts=WhiteoutKind.OCI)),
])
def test_choose_markers(support: Support, userxattr: bool, expected: whiteout.Markers,
                        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="unionfs.mount"):
        assert mount.choose_markers("/w", support, userxattr) == expected
    assert f"upper markers: {expected.name}" in caplog.text
    if support.whiteout_devices or (support.user_xattrs and support.trusted_xattrs):
        assert any(r.levelno == logging.WARNING for r in caplog.records)


def test_choose_markers_refuses_userxattr_without_user_xattrs() -> None:
    with pytest.raises(ConfigError, match=f"cannot hold user xattrs \\({NO}\\)"):
        mount.choose_markers("/w", Support(None, NO, None), True)


# --------------------------------------------------------------------------- build_core


def _close_core(made: core.Core) -> None:
    for fd in list(made.view.fds._fds.values()):
        os.close(fd)
    for layer in made.view.layers:
        os.close(layer.fd)
    if made.copier._work_fd is not None:
        os.close(made.copier._work_fd)


def _config(tmp_path: Path, **kw: object) -> MountConfig:
    lower = build(tmp_path / "l", {"f": "x"})
    upper = build(tmp_path / "u", {})
    fields: dict[str, object] = {"lowers": (str(lower),), "upper": str(upper),
                                 "workdir": str(tmp_path / "w"), "mountpoint": "/m"}
    fields.update(kw)
    return MountConfig(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(("userxattr", "metacopy", "expected"), [
    (False, None, True), (True, None, False), (True, True, True), (False, False, False)])
def test_build_core(tmp_path: Path, userxattr: bool, metacopy: bool | None,
                    expected: bool) -> None:
    made = mount.build_core(_config(tmp_path, userxattr=userxattr, metacopy=metacopy))
    try:
        assert made.view.upper is not None and made.copier.metacopy is expected
        assert made.copier.markers is (whiteout.USERXATTR if userxattr else whiteout.TRUSTED)
        assert os.listdir(tmp_path / "w") == ["work"]
    finally:
        _close_core(made)


@pytest.mark.parametrize("how", ["ro", "no upper"])
def test_build_core_read_only_makes_no_workdir(tmp_path: Path, how: str) -> None:
    cfg = _config(tmp_path, mount_flags=("ro",)) if how == "ro" else _config(
        tmp_path, upper=None, workdir=None)
    made = mount.build_core(cfg)
    try:
        assert made.view.upper is None and made.copier._work_fd is None
        assert not (tmp_path / "w").exists()
    finally:
        _close_core(made)


def test_build_core_closes_the_layers_when_the_workdir_fails(tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    (tmp_path / "w").mkdir(mode=0o777)
    os.chmod(tmp_path / "w", 0o777)
    before = open_fds()
    with pytest.raises(ConfigError, match="writable by other users"):
        mount.build_core(cfg)
    assert open_fds() == before
    assert os.listdir(tmp_path / "w") == []  # the work/ it made is gone again


# --------------------------------------------------------------------------- flags


def _flags(*given: str) -> list[str]:
    return mount.mount_flags(MountConfig(("/l",), "/u", "/w", "/m", mount_flags=given))


def test_mount_flags_as_root() -> None:
    assert _flags() == ["suid", "dev"]  # like mount -t overlay, not libfuse's default
    assert _flags("nosuid") == ["nosuid", "dev"]
    assert _flags("nodev", "dev") == ["suid", "dev"]
    assert _flags("ro", "rw") == ["rw", "suid", "dev"]
    assert _flags("rw", "ro", "noexec") == ["ro", "suid", "dev", "noexec"]
    assert _flags("noatime", "atime") == ["suid", "dev", "atime"]
    assert _flags("strictatime", "noatime") == ["suid", "dev", "strictatime"]
    assert _flags("nodiratime", "diratime", "nosymfollow", "dirsync") == [
        "suid", "dev", "diratime", "nosymfollow", "dirsync"]
    assert _flags("relatime", "norelatime", "sync", "async") == [
        "suid", "dev", "async", "norelatime"]


def test_mount_flags_for_a_user(monkeypatch: pytest.MonkeyPatch,
                                caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(mount.os, "geteuid", lambda: 1000)
    assert _flags() == []
    assert _flags("nodev", "noexec") == ["nodev", "noexec"]
    with caplog.at_level(logging.WARNING):
        assert _flags("suid", "dev", "ro") == ["ro"]
    assert "suid and dev need root" in caplog.text


def _options(*fuse: str, flags: tuple[str, ...] = ()) -> set[str]:
    return mount.fuse_options(MountConfig(("/l",), "/u", "/w", "/m",
                                          fuse_options=frozenset(fuse), mount_flags=flags))


def test_fuse_options_as_root() -> None:
    assert _options() == {"default_permissions", "fsname=unionfs", "subtype=unionfs",
                          "allow_other", "suid", "dev"}
    assert "allow_other" not in _options("no_allow_other")
    assert "no_allow_other" not in _options("no_allow_other")
    assert "default_permissions" not in _options("no_default_permissions")
    assert "max_read=4096" in _options("max_read=4096")


def test_fuse_options_carry_only_the_flags_libfuse_passes() -> None:
    options = _options(flags=("ro", "noexec", "strictatime", "nodiratime", "nosymfollow"))
    assert {"ro", "noexec", "suid", "dev"} <= options
    assert not {"strictatime", "nodiratime", "nosymfollow"} & options  # mount_setattr's


def test_fuse_options_for_a_user(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mount.os, "geteuid", lambda: 1000)
    assert _options() == {"default_permissions", "fsname=unionfs", "subtype=unionfs"}


def test_only_sees_through_exception_groups() -> None:
    abort = ConnectionAbortedError()
    assert mount._only(abort, ConnectionAbortedError)
    assert mount._only(ExceptionGroup("g", [abort, ExceptionGroup("h", [abort])]),
                       ConnectionAbortedError)
    assert not mount._only(ExceptionGroup("g", [abort, ValueError()]), ConnectionAbortedError)
    assert not mount._only(ValueError(), ConnectionAbortedError)
