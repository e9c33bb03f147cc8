"""Differential test: random operation sequences on kernel overlayfs and on unionfs.

Each example builds the same layers twice (two lowers with files, a lower hard-link
pair, lower dirs, a whiteout, an opaque dir), mounts kernel overlayfs (index=on,
redirect_dir=off) on one copy and unionfs on the other, runs the same operations on
both and compares every result (value or errno), then the final trees, and the tree
unionfs shows when mounted again on what it left on disk. Last, the
kernel mounts the upper unionfs wrote (same lowers, fresh workdir) and must show the
same tree: the upper alone holds everything, hard-link groups included (a kernel's own
upper needs its workdir's index for those; unionfs links every visible name into the
upper instead).
"""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from mounts import (
    OPAQUE,
    OVERLAY_OPTS,
    READER_OPTS,
    RENAME_NOREPLACE,
    WHITEOUT,
    HardLink,
    Mount,
    Symlink,
    build,
    diff_trees,
    is_mounted,
    kind,
    mount_kernel,
    mount_unionfs,
    renameat2,
    snapshot,
)

pytestmark = pytest.mark.usefixtures("mount_guard")

L1 = {
    "d/y": "y1",
    "d/w": WHITEOUT,
    "wh": WHITEOUT,
    "o": OPAQUE,
    "o/r": "r1",
    "g": "g1",
    "s": Symlink("f"),
    "e/sub/top": "t1",
    "empty/gone": WHITEOUT,
}
L2 = {
    "f": "lower f",
    "h1": "hardlinked",
    "h2": HardLink("h1"),
    "d/x": "x2",
    "d/y": "y2",
    "d/w": "w2",
    "o/p": "p2",
    "o/q": "q2",
    "wh": "whited",
    "e/z": "z2",
    "e/sub/deep": "deep",
    "empty/gone": "x",  # a merged dir that looks empty: its only entry is whited out
}

FILES = [
    "f",
    "g",
    "h1",
    "h2",
    "wh",
    "s",
    "n",
    "d/x",
    "d/y",
    "d/w",
    "d/n",
    "o/p",
    "o/r",
    "e/z",
    "e/sub/deep",
    "e/sub/top",
    "nd/a",
    "empty/m",
]
DIRS = ["d", "o", "e", "e/sub", "nd", "nd/sub", "empty"]
PATHS = FILES + DIRS

path = st.sampled_from(PATHS)
fpath = st.sampled_from(FILES)
data = st.binary(max_size=6)

op = st.one_of(
    st.tuples(st.just("create"), fpath, data),
    st.tuples(st.just("excl"), fpath),
    st.tuples(st.just("write"), fpath, st.integers(0, 12), data),
    st.tuples(st.just("append"), fpath, data),
    st.tuples(st.just("truncate"), fpath, st.integers(0, 12)),
    st.tuples(st.just("read"), path),
    st.tuples(st.just("stat"), path),
    st.tuples(st.just("listdir"), st.sampled_from(["", *DIRS])),
    st.tuples(st.just("unlink"), path),
    st.tuples(st.just("mkdir"), path),
    st.tuples(st.just("rmdir"), path),
    st.tuples(st.just("rename"), path, path),
    st.tuples(st.just("link"), path, path),
    st.tuples(st.just("symlink"), st.sampled_from(["f", "x", "nowhere", "sub"]), path),
    st.tuples(st.just("noreplace"), path, path),
    st.tuples(st.just("readlink"), path),
    st.tuples(st.just("mkfifo"), path),
    st.tuples(st.just("chown"), path, st.sampled_from([0, 1000])),
    st.tuples(st.just("chmod"), path, st.sampled_from([0o600, 0o755, 0o640])),
    st.tuples(st.just("setxattr"), path, st.sampled_from(["user.a", "user.b"]), data),
    st.tuples(st.just("removexattr"), path, st.sampled_from(["user.a", "user.b"])),
)


NB = os.O_NONBLOCK  # a FIFO made by an earlier op must not block an open


def run_op(root: Path, o: tuple) -> tuple:
    """Run one operation below ``root``: ("ok", value) or ("err", ERRNO NAME)."""
    name, *args = o

    def p(rel: str) -> str:
        return os.path.join(root, rel) if rel else str(root)

    try:
        if name == "create":
            with open(
                os.open(p(args[0]), NB | os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644), "wb"
            ) as f:
                f.write(args[1])
            return ("ok", None)
        if name == "excl":
            os.close(os.open(p(args[0]), NB | os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            return ("ok", None)
        if name == "write":
            fd = os.open(p(args[0]), NB | os.O_WRONLY)
            try:
                return ("ok", os.pwrite(fd, args[2], args[1]))
            finally:
                os.close(fd)
        if name == "append":
            fd = os.open(p(args[0]), NB | os.O_WRONLY | os.O_APPEND)
            try:
                return ("ok", os.write(fd, args[1]))
            finally:
                os.close(fd)
        if name == "truncate":
            os.truncate(p(args[0]), args[1])
            return ("ok", None)
        if name == "read":
            fd = os.open(p(args[0]), NB | os.O_RDONLY)
            try:
                return ("ok", os.read(fd, 1 << 16))
            finally:
                os.close(fd)
        if name == "stat":
            s = os.lstat(p(args[0]))
            k = kind(s)
            return (
                "ok",
                (
                    k,
                    stat.S_IMODE(s.st_mode),
                    s.st_size if k == "file" else None,
                    s.st_nlink if k != "dir" else None,
                ),
            )
        if name == "listdir":
            return ("ok", sorted(os.listdir(p(args[0]))))
        if name == "unlink":
            os.unlink(p(args[0]))
        elif name == "mkdir":
            os.mkdir(p(args[0]))
        elif name == "rmdir":
            os.rmdir(p(args[0]))
        elif name == "rename":
            os.rename(p(args[0]), p(args[1]))
        elif name == "link":
            os.link(p(args[0]), p(args[1]))
        elif name == "symlink":
            os.symlink(args[0], p(args[1]))
        elif name == "noreplace":
            renameat2(p(args[0]), p(args[1]), RENAME_NOREPLACE)
        elif name == "readlink":
            return ("ok", os.readlink(p(args[0])))
        elif name == "mkfifo":
            os.mkfifo(p(args[0]), 0o640)
        elif name == "chown":
            os.chown(p(args[0]), args[1], args[1], follow_symlinks=False)
        elif name == "chmod":
            os.chmod(p(args[0]), args[1])
        elif name == "setxattr":
            os.setxattr(p(args[0]), args[1], args[2], follow_symlinks=False)
        elif name == "removexattr":
            os.removexattr(p(args[0]), args[1], follow_symlinks=False)
        else:
            raise AssertionError(name)
        return ("ok", None)
    except OSError as e:
        return ("err", errno.errorcode.get(e.errno, e.errno))


def _stack(base: Path) -> tuple[list[Path], Path, Path]:
    lowers = [build(base / "l1", L1), build(base / "l2", L2)]
    return lowers, base / "upper", base / "work"


def _cleanup(mounts: list[Mount], base: Path) -> None:
    for m in mounts:
        m.unmount()
    for leftover in (base / "kmnt", base / "umnt", base / "check"):
        if is_mounted(leftover):
            subprocess.run(["umount", "-l", str(leftover)], capture_output=True, check=False)
    shutil.rmtree(base, ignore_errors=True)


def check_sequence(
    base: Path, ops: list[tuple], options: tuple[str, ...] = (), reader: str = READER_OPTS
) -> None:
    klow, kup, kwork = _stack(base / "k")
    ulow, uup, uwork = _stack(base / "u")
    mounts: list[Mount] = []
    try:
        k = mount_kernel(klow, kup, kwork, base / "kmnt")
        mounts.append(k)
        u = mount_unionfs(ulow, uup, uwork, base / "umnt", base / "u.log", options)
        mounts.append(u)

        history = []
        for i, o in enumerate(ops):
            rk, ru = run_op(k.mnt, o), run_op(u.mnt, o)
            history.append(f"{i}: {o!r} -> kernel {rk!r}")
            assert rk == ru, (
                f"op {i} {o!r}: kernel {rk!r}, unionfs {ru!r}\nsequence:\n" + "\n".join(history)
            )
        ref = snapshot(k.mnt)
        ours = snapshot(u.mnt)
        assert diff_trees(ref, ours) == [], "final trees differ after:\n" + "\n".join(history)

        k.unmount()
        u.unmount()
        u.assert_log_clean()

        # unionfs mounted again on what it left on disk shows the same tree
        again = mount_unionfs(ulow, uup, uwork, base / "umnt", base / "u2.log", options)
        mounts.append(again)
        after = snapshot(again.mnt)
        again.unmount()
        again.assert_log_clean()
        assert diff_trees(ref, after) == [], (
            "unionfs shows another tree after a remount, after:\n" + "\n".join(history)
        )

        # the kernel, given unionfs's upper and a fresh workdir, shows the same tree
        # (following metadata-only copies where unionfs writes them)
        check = mount_kernel(ulow, uup, base / "u" / "kwork", base / "check", reader)
        mounts.append(check)
        theirs = snapshot(check.mnt)
        check.unmount()
        assert diff_trees(ref, theirs) == [], (
            "the kernel reads unionfs's upper differently, after:\n" + "\n".join(history)
        )
    finally:
        _cleanup(mounts, base)


_counter = iter(range(1 << 30))


@pytest.mark.watchdog(900)
@pytest.mark.parametrize(
    ("options", "reader"),
    [((), READER_OPTS), (("-o", "metacopy=off"), OVERLAY_OPTS)],
    ids=["metacopy", "no-metacopy"],
)
@settings(
    max_examples=int(os.environ.get("UNIONFS_DIFF_EXAMPLES", "30")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
@given(ops=st.lists(op, min_size=1, max_size=12))
@example(
    ops=[("append", "h1", b"+"), ("read", "h2"), ("stat", "h2"), ("unlink", "h1"), ("stat", "h2")]
)
@example(
    ops=[
        ("unlink", "d/x"),
        ("unlink", "d/y"),
        ("rmdir", "d"),
        ("mkdir", "d"),
        ("listdir", "d"),
        ("rename", "f", "d/x"),
        ("rename", "d", "nd"),
    ]
)
@example(
    ops=[
        ("rename", "e", "nd"),
        ("mkdir", "nd"),
        ("rename", "nd", "e/sub/x"),
        ("link", "g", "nd/a"),
        ("chmod", "nd/a", 0o600),
        ("stat", "g"),
        ("rename", "o/p", "o/q"),
        ("listdir", "o"),
        ("rmdir", "empty"),
    ]
)
@example(
    ops=[
        ("setxattr", "e", "user.a", b"v"),
        ("create", "wh", b"new"),
        ("symlink", "f", "d/n"),
        ("read", "d/n"),
        ("truncate", "s", 3),
        ("read", "f"),
    ]
)
def test_random_sequences_agree(tmp_path_factory, ops, options, reader):
    base = tmp_path_factory.mktemp(f"diff{next(_counter)}")
    check_sequence(base, ops, options, reader)
