"""Directory listings the kernel has cached (pyfuse3 patch 0001: opendir returns a FileInfo
with cache_readdir and keep_cache) change exactly when the directory does.

Each change is made after the listings involved were read twice (the second time from the
kernel's cache, where unionfs asks for one): the next listing must show the change, on
kernel overlayfs (the reference) and on unionfs. The kernel drops a cached listing when an
entry is created, removed or renamed in the directory through the mount; what changes a
merged directory without touching its names (a copy-up: the entry's layer) must leave a
cached listing right, even one filled in by two opens (the readdir order does not depend on
the layers, unionfs.ops._snapshot).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import stat
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from mounts import DIR, Dir, Mount, build, readdir_names, wait_until

from unionfs import fusecaps

pytestmark = pytest.mark.usefixtures("mount_guard")

UnionFactory = Callable[..., Mount]


def _stack(tmp_path: Path) -> tuple[Path, Path, Path]:
    """d is merged from the upper and two lowers; e is a lower dir of l1 alone."""
    l1 = build(tmp_path / "l1", {"d/a": "a", "d/sub/x": "x", "d/empty": DIR,
                                 "d/tree/y": "y", "d/tree/deep/z": "z", "d/full/p": "p",
                                 "e/k": "k"})
    l2 = build(tmp_path / "l2", {"d/b": "b", "d/c": "c", "d/full/q": "q", "d/tree/w": "w"})
    up = build(tmp_path / "up", {"d/u": "u"})
    return l1, l2, up


#: What each directory lists before any change (besides "." and "..").
BEFORE = {
    "d": {"a", "b", "c", "u", "sub", "empty", "tree", "full"},
    "d/sub": {"x"},
    "d/tree": {"deep", "w", "y"},
    "d/full": {"p", "q"},
    "e": {"k"},
}


def _touch(path: Path) -> None:
    os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o644))


def _replace_dir(m: Mount) -> None:
    """An upper-only directory renamed over a merged one emptied by whiteouts."""
    (m / "d/full/p").unlink()
    (m / "d/full/q").unlink()
    (m / "d/fresh").mkdir()
    _touch(m / "d/fresh/r")
    os.rename(m / "d/fresh", m / "d/full")


def _remake_dir(m: Mount) -> None:
    """rm -rf of a merged directory and mkdir of the same name (an opaque directory), while
    an fd holds the old directory's inode."""
    held = os.open(m / "d/tree", os.O_RDONLY | os.O_DIRECTORY)
    try:
        shutil.rmtree(m / "d/tree")
        (m / "d/tree").mkdir()
        _touch(m / "d/tree/n")
    finally:
        os.close(held)


def _copy_up(m: Mount) -> None:
    """Copy-ups change no name: a cached listing stays right."""
    os.chmod(m / "d/a", 0o600)
    with open(m / "d/b", "a") as f:
        f.write("more")
    os.chmod(m / "d/sub/x", 0o600)  # copies up d/sub too
    os.chmod(m / "d/full", 0o700)


#: id -> (change, what the listed directories hold after it; the rest as BEFORE).
#: None: the directory is gone.
CHANGES: dict[str, tuple[Callable[[Mount], None], dict[str, set[str] | None]]] = {
    "create": (lambda m: _touch(m / "d/new"), {"d": BEFORE["d"] | {"new"}}),
    "mkdir": (lambda m: (m / "d/nd").mkdir(), {"d": BEFORE["d"] | {"nd"}}),
    "mknod": (lambda m: os.mknod(m / "d/fifo", stat.S_IFIFO | 0o644),
              {"d": BEFORE["d"] | {"fifo"}}),
    "symlink": (lambda m: os.symlink("a", m / "d/s"), {"d": BEFORE["d"] | {"s"}}),
    "link": (lambda m: os.link(m / "d/a", m / "d/h"), {"d": BEFORE["d"] | {"h"}}),
    "unlink-lower": (lambda m: (m / "d/a").unlink(), {"d": BEFORE["d"] - {"a"}}),
    "unlink-upper": (lambda m: (m / "d/u").unlink(), {"d": BEFORE["d"] - {"u"}}),
    "rmdir-lower": (lambda m: (m / "d/empty").rmdir(), {"d": BEFORE["d"] - {"empty"}}),
    "rm-rf-merged": (lambda m: shutil.rmtree(m / "d/tree"),
                     {"d": BEFORE["d"] - {"tree"}, "d/tree": None}),
    "rename-in-dir": (lambda m: os.rename(m / "d/a", m / "d/z"),
                      {"d": BEFORE["d"] - {"a"} | {"z"}}),
    "rename-across": (lambda m: os.rename(m / "d/a", m / "e/a"),
                      {"d": BEFORE["d"] - {"a"}, "e": {"a", "k"}}),
    "rename-over-file": (lambda m: os.rename(m / "d/a", m / "d/b"),
                         {"d": BEFORE["d"] - {"a"}}),
    "unlink-in-subdir": (lambda m: (m / "d/tree/y").unlink(), {"d/tree": {"deep", "w"}}),
    "rename-dir-over-dir": (_replace_dir, {"d/full": {"r"}}),
    "remake-dir": (_remake_dir, {"d/tree": {"n"}}),
    "copy-up": (_copy_up, {}),
}


def _names(path: Path) -> set[str]:
    names = readdir_names(path)
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    assert not twice, f"listed twice in {path}: {twice[:20]}"
    assert b"." in names and b".." in names
    return {os.fsdecode(n) for n in names} - {".", ".."}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_cached_listing_follows_the_change(union: UnionFactory, tmp_path: Path,
                                             change: str) -> None:
    l1, l2, up = _stack(tmp_path)
    m = union(l1, l2, upper=up)
    for _ in range(2):  # the second pass reads the kernel's cache, where there is one
        for rel, want in BEFORE.items():
            assert _names(m / rel) == want, rel
    make, after = CHANGES[change]
    make(m)
    for rel, before in BEFORE.items():
        want = after.get(rel, before)
        if want is None:
            assert not os.path.lexists(m / rel), rel
            continue
        for _ in range(2):
            got = _names(m / rel)
            assert got == want, (rel, sorted(got ^ want))
        with Dir(m / rel) as d:  # each listed name is there, with the inode it lists
            for e in d.read_all():
                assert os.lstat(os.path.join(os.fsencode(m / rel), e.name)).st_ino == e.ino


def test_a_listing_cached_by_two_opens_across_copy_ups(union: UnionFactory,
                                                       tmp_path: Path) -> None:
    """The kernel caches a listing as opens read it, the part past what one open read
    appended from the next open's reads. A copy-up between them moves entries to the upper
    layer without changing a name (nothing the kernel sees): the second open's listing
    must continue the first's, so the cached whole lists each name once."""
    names = {f"f{i:04d}" for i in range(3000)}
    lower = build(tmp_path / "many", {f"big/{n}": "" for n in names})
    m = union(lower)
    with Dir(m / "big") as d:  # reads the first getdents' worth only
        first = d.read()
        assert first is not None
    for n in sorted(names)[::7]:  # copy-ups all over the listing
        os.chmod(m / "big" / n, 0o600)
    for _ in range(3):  # the first reads past the first part, the next ones from the cache
        assert _names(m / "big") == names


def test_offsets_stay_valid_across_opens(union: UnionFactory, tmp_path: Path) -> None:
    """telldir positions of one open seek to the same entries in another, cached or not;
    and after the directory changed, a rewind shows it as it is."""
    l1 = build(tmp_path / "s1", {f"d/one_{i:03d}": "" for i in range(300)})
    l2 = build(tmp_path / "s2", {f"d/two_{i:03d}": "" for i in range(300)})
    m = union(l1, l2)
    with Dir(m / "d") as d:
        positions = d.read_all_with_positions()
    assert len(positions) == 602
    for _ in range(2):
        with Dir(m / "d") as d:
            for pos, name in positions[1::13]:
                d.seek(pos)
                e = d.read()
                assert e is not None and e.name == name, (pos, name, e)
    _touch(m / "d/new")
    with Dir(m / "d") as d:
        d.seek(positions[100][0])
        d.rewind()
        now = {e.name for e in d.read_all()}
    assert now == {n for _, n in positions} | {b"new"}


def _readdir_requests(m: Mount) -> int:
    """The daemon's readdir count so far (SIGUSR1 logs the request counts)."""
    assert m.log is not None
    before = m.log_text().count("requests: total=")
    (pid,) = m.pids
    os.kill(pid, signal.SIGUSR1)
    assert wait_until(lambda: m.log_text().count("requests: total=") > before, 10)
    line = [x for x in m.log_text().splitlines() if "requests: total=" in x][-1]
    found = re.search(r"\breaddir=(\d+)", line)
    return int(found.group(1)) if found else 0


@pytest.mark.parametrize("backend", ["unionfs"])
def test_the_kernel_answers_an_unchanged_listing(union: UnionFactory, tmp_path: Path) -> None:
    """With the patched pyfuse3 a listing read once is answered from the kernel's cache,
    across opens, until the directory changes; with a stock pyfuse3 each reaches the
    daemon."""
    m = union(build(tmp_path / "r", {"d/a": "", "d/b": ""}))
    assert _names(m / "d") == {"a", "b"}
    first = _readdir_requests(m)
    assert first >= 1
    for _ in range(3):
        assert _names(m / "d") == {"a", "b"}
    again = _readdir_requests(m)
    if fusecaps.CAPS.opendir_file_info:
        assert again == first, "an unchanged listing went to the daemon"
    else:
        assert again >= first + 3
    _touch(m / "d/c")
    assert _names(m / "d") == {"a", "b", "c"}
    assert _readdir_requests(m) > again
