"""config.py in-process: parse_layers, validate's checks (each bad input one ConfigError
naming it), MountConfig.read_only, check_private, check_unprivileged. Validation only
reads: no test here creates what it validates. (tests/test_badinput.py runs the same
mistakes through the CLI.)
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from unionfs import config
from unionfs.config import ConfigError, LayerError, MountConfig, check_private, parse_layers

# --------------------------------------------------------------------------- LAYERS


@pytest.mark.parametrize(("text", "layers"), [
    ("a", ("a",)),
    ("a:b:c", ("a", "b", "c")),
    ("/x/y:/z", ("/x/y", "/z")),
    (r"a\:b:c", ("a:b", "c")),
    (r"a\\:b", ("a\\", "b")),
    (r"a\b", ("ab",)),
    ("a\\", ("a\\",)),  # a trailing backslash is itself
    ("", ()),
])
def test_parse_layers(text: str, layers: tuple[str, ...]) -> None:
    assert parse_layers(text) == layers


@pytest.mark.parametrize("text", ["a::b", ":a", "a:", ":", "a\\::"])
def test_parse_layers_refuses_an_empty_item(text: str) -> None:
    with pytest.raises(ConfigError, match="empty layer path"):
        parse_layers(text)


def test_error_exit_codes() -> None:
    assert ConfigError.exitcode == 2 and LayerError.exitcode == 1


# --------------------------------------------------------------------------- read_only


@pytest.mark.parametrize(("upper", "flags", "read_only"), [
    (None, (), True),
    ("/u", (), False),
    ("/u", ("ro",), True),
    ("/u", ("ro", "rw"), False),
    ("/u", ("rw", "ro"), True),
    ("/u", ("ro", "noatime"), True),
    ("/u", ("nosuid", "nodev"), False),
    (None, ("rw",), True),
])
def test_read_only(upper: str | None, flags: tuple[str, ...], read_only: bool) -> None:
    cfg = MountConfig(lowers=("/l",), upper=upper, workdir=None, mountpoint="/m",
                      mount_flags=flags)
    assert cfg.read_only is read_only


def test_default_workdir() -> None:
    assert config.default_workdir("/a/upper") == "/a/upper.work"
    assert config.default_workdir("/a/upper/") == "/a/upper.work"
    assert config.default_workdir("rel").startswith(os.getcwd())


# --------------------------------------------------------------------------- check_private


def _st(path: Path, mode: int, uid: int = 0) -> os.stat_result:
    os.chown(path, uid, 0)
    os.chmod(path, mode)
    return os.stat(path)


@pytest.mark.parametrize("mode", [0o700, 0o755, 0o1777, 0o1770])
def test_check_private_accepts(tmp_path: Path, mode: int) -> None:
    check_private("workdir w", _st(tmp_path, mode))


@pytest.mark.parametrize(("mode", "uid", "message"), [
    (0o777, 0, "writable by other users (mode 0777)"),
    (0o775, 0, "writable by other users (mode 0775)"),
    (0o722, 0, "writable by other users"),
    (0o700, 4321, "owned by uid 4321"),
])
def test_check_private_refuses(tmp_path: Path, mode: int, uid: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_private("workdir w", _st(tmp_path, mode, uid))


# --------------------------------------------------------------------------- validate


@pytest.fixture
def good(tmp_path: Path) -> MountConfig:
    for name in ("l1", "l2", "upper", "mnt"):
        (tmp_path / name).mkdir()
    return MountConfig(lowers=(str(tmp_path / "l1"), str(tmp_path / "l2")),
                       upper=str(tmp_path / "upper"), workdir=None,
                       mountpoint=str(tmp_path / "mnt"))


def test_validate_a_good_config(good: MountConfig, tmp_path: Path) -> None:
    before = sorted(os.listdir(tmp_path))
    checked = config.validate(good)
    assert checked.workdir == str(tmp_path / "upper.work")  # the default, not made
    assert dataclasses.replace(checked, workdir=None) == good
    assert sorted(os.listdir(tmp_path)) == before
    explicit = dataclasses.replace(good, workdir=str(tmp_path / "w"))
    assert config.validate(explicit).workdir == str(tmp_path / "w")


def test_validate_read_only_without_upper(good: MountConfig) -> None:
    cfg = dataclasses.replace(good, upper=None)
    assert config.validate(cfg) == cfg


def _refused(cfg: MountConfig, message: str) -> None:
    with pytest.raises(ConfigError) as raised:
        config.validate(cfg)
    assert message in str(raised.value), str(raised.value)


def test_validate_lowers(good: MountConfig, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    os.symlink(tmp_path / "l1", tmp_path / "alias")
    cases = {
        (): "no lower layer given",
        ("",): "an empty layer path",
        (str(tmp_path / "missing"),): "does not exist",
        (str(tmp_path / "file"),): "not a directory",
        (str(tmp_path / "file" / "x"),): "a path component is not a directory",
        (str(tmp_path / "l1"), str(tmp_path / "alias")): "the same directory as layer",
        (str(tmp_path / "l1"), str(tmp_path / "l1") + "/"): "the same directory as layer",
    }
    for lowers, message in cases.items():
        _refused(dataclasses.replace(good, lowers=lowers), message)


def test_validate_mountpoint(good: MountConfig, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "l1" / "sub").mkdir()
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "file"): "not a directory",
        "/proc": "already a mount point",
        str(tmp_path / "l1"): "the same directory as the mountpoint",
        str(tmp_path / "l1" / "sub"): "contains the mountpoint",
        str(tmp_path): "inside the mountpoint",
    }
    for mnt, message in cases.items():
        _refused(dataclasses.replace(good, mountpoint=mnt), message)


def test_validate_upper(good: MountConfig, tmp_path: Path) -> None:
    (tmp_path / "l1" / "in").mkdir()
    (tmp_path / "mnt" / "in").mkdir()
    cases = {
        str(tmp_path / "missing"): "upper",
        str(tmp_path / "l1"): "the same directory as layer",
        str(tmp_path / "l1" / "in"): "inside layer",
        str(tmp_path / "mnt"): "the same directory as the mountpoint",
        str(tmp_path / "mnt" / "in"): "inside the mountpoint",
    }
    for upper, message in cases.items():
        _refused(dataclasses.replace(good, upper=upper), message)
    (tmp_path / "outer" / "l").mkdir(parents=True)
    _refused(dataclasses.replace(good, lowers=(str(tmp_path / "outer" / "l"),),
                                 upper=str(tmp_path / "outer")), "contains layer")


def test_validate_workdir(good: MountConfig, tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    (tmp_path / "upper" / "w").mkdir()
    cases = {
        str(tmp_path / "upper"): "must be outside the upper",
        str(tmp_path / "upper" / "w"): "must be outside the upper",
        str(tmp_path / "l1" / "w"): "inside a lower layer",
        str(tmp_path / "mnt" / "w"): "inside the mountpoint",
        str(tmp_path / "file"): "not a directory",
        str(tmp_path / "no" / "parent"): "its parent does not exist",
        f"/dev/shm/unionfs-unit-{os.getpid()}-absent": "not on the same filesystem",
    }
    for workdir, message in cases.items():
        _refused(dataclasses.replace(good, workdir=workdir), message)
    _refused(dataclasses.replace(good, upper=None, workdir=str(tmp_path / "w")),
             "--workdir needs --upper")


def test_validate_a_workdir_that_is_not_private(good: MountConfig, tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    cfg = dataclasses.replace(good, workdir=str(work))
    os.chmod(work, 0o777)
    _refused(cfg, "writable by other users")
    os.chmod(work, 0o700)
    os.chown(work, 4321, 0)
    _refused(cfg, "owned by uid 4321")


# --------------------------------------------------------------------------- unprivileged


def test_check_unprivileged_as_root_checks_nothing(good: MountConfig,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config, "FUSERMOUNT", "/nonexistent/fusermount3")
    monkeypatch.setenv("PATH", "/nonexistent")
    config.check_unprivileged(good)


def _as_user(monkeypatch: pytest.MonkeyPatch, program: Path) -> None:
    monkeypatch.setattr(config.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(config, "FUSERMOUNT", str(program))


def test_check_unprivileged(good: MountConfig, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    program = tmp_path / "fusermount3"
    program.write_bytes(b"")
    _as_user(monkeypatch, program)
    os.chmod(program, 0o755)
    with pytest.raises(ConfigError, match="not setuid root"):
        config.check_unprivileged(good)
    os.chmod(program, 0o4755)
    conf = tmp_path / "fuse.conf"
    conf.write_text("# user_allow_other\n")
    config.check_unprivileged(good, str(conf))  # not asked for allow_other
    asks = dataclasses.replace(good, fuse_options=frozenset({"allow_other"}))
    with pytest.raises(ConfigError, match="does not have user_allow_other"):
        config.check_unprivileged(asks, str(conf))
    with pytest.raises(ConfigError, match="does not have user_allow_other"):
        config.check_unprivileged(asks, str(tmp_path / "absent.conf"))
    conf.write_text("mount_max = 10\n  user_allow_other  # yes\n")
    config.check_unprivileged(asks, str(conf))


def test_check_unprivileged_without_fusermount(good: MountConfig, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    _as_user(monkeypatch, tmp_path / "absent")
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ConfigError, match="fusermount3 not found"):
        config.check_unprivileged(good)
