"""Bad input to ``unionmount``: one line on stderr, exit != 0, nothing mounted or created.

unionfs only. Each case starts from a good command line (two lowers, an empty upper, an
empty mountpoint, the default workdir ``<upper>.work``) and breaks one thing.

Not written: "no /dev/fuse" (it cannot be taken away here without affecting other tests).
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from mounts import build, is_mounted, mountpoints, mounts_under, server_pids, unionmount

pytestmark = pytest.mark.usefixtures("mount_guard")


@dataclass
class Env:
    tmp: Path
    l1: Path
    l2: Path
    upper: Path
    mnt: Path
    workdir: Path | None = None
    cleanup: list[Path] = field(default_factory=list)  # mounts we made for the case

    def lowers(self) -> str:
        return f"{self.l1}:{self.l2}"

    def args(
        self,
        lowers: str | None = None,
        upper: Path | None = None,
        mnt: Path | None = None,
        workdir: Path | None = None,
    ) -> list[object]:
        a: list[object] = [
            lowers if lowers is not None else self.lowers(),
            "--upper",
            upper or self.upper,
        ]
        if workdir is not None:
            a += ["--workdir", workdir]
        return [*a, "--log", self.tmp / "log", mnt or self.mnt]


@pytest.fixture
def env(tmp_path):
    e = Env(
        tmp=tmp_path,
        l1=build(tmp_path / "l1", {"a": "a"}),
        l2=build(tmp_path / "l2", {"b": "b"}),
        upper=tmp_path / "upper",
        mnt=tmp_path / "mnt",
    )
    e.upper.mkdir()
    e.mnt.mkdir()
    yield e
    for p in reversed(e.cleanup):
        subprocess.run(["umount", "-l", str(p)], capture_output=True, check=False)


def _tmpfs(env: Env, path: Path, fstype: str = "tmpfs") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", fstype, fstype, str(path)], check=True)
    env.cleanup.append(path)
    return path


def assert_refused(
    env: Env,
    args: list[object],
    *,
    upper: Path | None = None,
    mnt: Path | None = None,
    absent: tuple[Path, ...] = (),
) -> str:
    """Run unionmount; check the one-line refusal and that nothing was mounted or made."""
    upper = upper or env.upper
    mnt = mnt or env.mnt
    before_mounts = mounts_under(env.tmp)
    upper_before = sorted(os.listdir(upper)) if upper.is_dir() else None
    mnt_before = sorted(os.listdir(mnt)) if mnt.is_dir() else None
    r = unionmount(*args, timeout=30)
    assert r.returncode != 0, f"accepted: {args}"
    lines = r.stderr.splitlines()
    assert len(lines) == 1, f"want one line on stderr, got:\n{r.stderr}"
    assert lines[0].startswith("unionmount: "), lines[0]
    assert r.stdout == ""
    assert mounts_under(env.tmp) == before_mounts, "something was mounted"
    assert not server_pids(mnt), "a server is running"
    assert not Path(f"{upper}.work").exists(), "the default workdir was created"
    if upper_before is not None:
        assert sorted(os.listdir(upper)) == upper_before, "the upper was written"
    if mnt_before is not None:
        assert sorted(os.listdir(mnt)) == mnt_before, "the mountpoint was written"
    for p in absent:
        assert not os.path.lexists(p), f"{p} was created"
    log = env.tmp / "log"
    assert not log.exists() or "Traceback" not in log.read_text(), log.read_text()
    return lines[0]


def test_missing_layer(env):
    assert_refused(env, env.args(lowers=f"{env.l1}:{env.tmp / 'missing'}"))


def test_missing_layer_creates_no_upper(env):
    up = env.tmp / "new-upper"
    assert_refused(
        env,
        env.args(lowers=f"{env.tmp / 'missing'}", upper=up),
        upper=up,
        absent=(up, Path(f"{up}.work")),
    )


def test_layer_not_a_dir(env):
    (env.tmp / "file").write_text("x")
    assert_refused(env, env.args(lowers=f"{env.l1}:{env.tmp / 'file'}"))


def test_layer_below_a_file(env):
    (env.tmp / "file").write_text("x")
    assert_refused(env, env.args(lowers=f"{env.tmp / 'file' / 'sub'}:{env.l2}"))


def test_no_layer(env):
    assert_refused(env, env.args(lowers=""))


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
def test_same_layer_twice(env, spelling):
    other = {"same": str(env.l1), "dotdot": f"{env.l1}/../l1", "symlink": str(env.tmp / "alias")}[
        spelling
    ]
    os.symlink(env.l1, env.tmp / "alias")
    assert_refused(env, env.args(lowers=f"{env.l1}:{other}"))


def test_upper_is_a_lower(env):
    assert_refused(env, env.args(upper=env.l2), upper=env.l2)


def test_upper_inside_a_lower(env):
    up = env.l1 / "up"
    up.mkdir()
    assert_refused(env, env.args(upper=up), upper=up)


def test_upper_contains_a_lower(env):
    big = env.tmp / "big"
    low = build(big / "l", {"c": "c"})
    assert_refused(env, env.args(lowers=f"{env.l1}:{low}", upper=big), upper=big)


def test_upper_is_the_mountpoint(env):
    assert_refused(env, env.args(upper=env.mnt), upper=env.mnt)


def test_upper_inside_the_mountpoint(env):
    up = env.mnt / "up"
    up.mkdir()
    assert_refused(env, env.args(upper=up), upper=up)


def test_upper_contains_the_mountpoint(env):
    mnt = env.upper / "mnt"
    mnt.mkdir()
    assert_refused(env, env.args(mnt=mnt), mnt=mnt)


def test_layer_inside_the_mountpoint(env):
    low = build(env.mnt / "l", {"c": "c"})
    assert_refused(env, env.args(lowers=f"{env.l1}:{low}"))


def test_mountpoint_is_a_layer(env):
    assert_refused(env, env.args(mnt=env.l2), mnt=env.l2)


def test_mountpoint_missing(env):
    mnt = env.tmp / "nomnt"
    assert_refused(env, env.args(mnt=mnt), mnt=mnt, absent=(mnt,))


def test_mountpoint_not_a_dir(env):
    mnt = env.tmp / "file"
    mnt.write_text("x")
    assert_refused(env, env.args(mnt=mnt), mnt=mnt)


def test_mountpoint_already_a_mount(env):
    _tmpfs(env, env.mnt)
    assert_refused(env, env.args())
    assert mountpoints().count(str(env.mnt)) == 1


def test_workdir_on_another_filesystem(env):
    other = _tmpfs(env, env.tmp / "tmpfs")
    wd = other / "work"
    assert_refused(env, env.args(workdir=wd), absent=(wd,))


def test_workdir_is_the_upper(env):
    # the kernel refuses this too: temp files would show in the union
    assert_refused(env, env.args(workdir=env.upper))


def test_workdir_inside_the_upper(env):
    wd = env.upper / "work"
    wd.mkdir()
    assert_refused(env, env.args(workdir=wd))


def test_userxattr_on_an_upper_without_xattrs(env):
    ram = _tmpfs(env, env.tmp / "ramfs", "ramfs")  # ramfs has no xattrs at all
    up = ram / "upper"
    up.mkdir()
    line = assert_refused(env, [*env.args(upper=up)[:-1], "-o", "userxattr", env.mnt],
                          upper=up)
    assert "user xattrs" in line, f"the message should say xattrs are the problem: {line}"


def test_an_upper_without_xattrs_gets_opaque_marker_files(env):
    """Where the upper holds no xattrs at all, opaque directories are marked as
    fuse-overlayfs marks them: an OCI opaque marker file; the log says so."""
    ram = _tmpfs(env, env.tmp / "ramfs", "ramfs")
    up = ram / "upper"
    up.mkdir()
    build(env.l1, {"d/old": "old"})
    r = unionmount(*env.args(upper=up), timeout=30)
    assert r.returncode == 0, r.stderr
    try:
        os.unlink(env.mnt / "d/old")
        os.rmdir(env.mnt / "d")
        os.mkdir(env.mnt / "d")
        assert os.listdir(env.mnt / "d") == []
    finally:
        subprocess.run(["fusermount3", "-u", str(env.mnt)], check=True, timeout=30)
    assert os.listdir(up / "d") == [".wh..wh..opq"]
    assert "opaque directories get OCI marker files" in (env.tmp / "log").read_text()


def test_unknown_option(env):
    r = unionmount(*env.args(), "--no-such-option", timeout=30)
    assert r.returncode != 0
    assert not is_mounted(env.mnt)
    assert not Path(f"{env.upper}.work").exists()


@pytest.mark.parametrize("spelling", ["{l1}:", ":{l1}", "{l1}::{l2}", "{l1}:{l2}:"])
def test_an_empty_layer_item(env, spelling):
    lowers = spelling.format(l1=env.l1, l2=env.l2)
    line = assert_refused(env, env.args(lowers=lowers))
    assert "empty layer" in line, line


def test_an_empty_layer_item_in_lowerdir(env):
    args = ["-o", f"lowerdir={env.l1}::{env.l2},upperdir={env.upper}", "--log",
            env.tmp / "log", env.mnt]
    assert "empty layer" in assert_refused(env, args)


def test_a_foreign_workdir_is_refused(env):
    wd = env.tmp / "shared-work"
    wd.mkdir(mode=0o777)
    os.chmod(wd, 0o777)  # anyone may rename what is in it: refused
    line = assert_refused(env, env.args(workdir=wd))
    assert "workdir" in line and "writable by other users" in line, line
    os.chmod(wd, 0o755)
    os.chown(wd, 1234, 1234)
    line = assert_refused(env, env.args(workdir=wd))
    assert "owned by uid 1234" in line, line
    assert os.listdir(wd) == []


def test_import_of_a_missing_archive_is_bad_input(tmp_path):
    r = unionmount("import", tmp_path / "no-such.tar", tmp_path / "dest")
    assert r.returncode == 2, r
    assert r.stderr.splitlines() == [
        f"unionmount: archive {tmp_path / 'no-such.tar'}: No such file or directory"]
    assert not (tmp_path / "dest").exists()
