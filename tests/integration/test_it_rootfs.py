"""Real software on a real base layer: apt-get and dpkg in a chroot, unionmount against the kernel.

The lower layer is a Debian minbase rootfs made by debootstrap from the mirror and suite
apt uses on this machine; the packages come from a cached layer of .debs (a flat local
repository), so after the first run nothing reaches the network (the chroot runs in an
empty network namespace). Both built by scripts/debian_base.py, cached in
$UNIONFS_CACHE or /var/cache/unionfs-tests.

1. On unionmount and on kernel overlayfs, each over the minbase with an empty upper:
   `apt-get update` and `apt-get install` of INSTALL, then `dpkg-statoverride --update`
   (chmod of a file of the base: a metadata-only change). The merged views must match.
2. Each upper of step 1 stacked as a lower layer on the minbase, with a fresh upper:
   the view must be the one step 1 left; the kernel (metacopy=on) must read unionfs's
   upper the same way. Then programs run there (dpkg --verify, dpkg -l, the installed
   tools, python3 -m compileall) and a second `apt-get install` (SECOND): outputs and
   merged views must match the kernel's.

Programs this runs on the host: debootstrap (first run only), mount, umount, fusermount3,
chroot, unshare, dpkg, dpkg-deb; in the chroot (from the minbase and the .debs): apt-get,
dpkg, dpkg-statoverride, sh, find, sort, less, file, cpio, md5sum, python3, xz.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from it_support import debian_base
from mounts import (
    OVERLAY_OPTS,
    READER_OPTS,
    Mount,
    Tree,
    diff_trees,
    mount_kernel,
    mount_unionfs,
    snapshot,
)

db = debian_base()

pytestmark = pytest.mark.usefixtures("mount_guard")

INSTALL = ("less", "file", "cpio", "python3")
SECOND = ("xz-utils",)

# A file of the minbase (package passwd, listed in its md5sums) whose mode step 1 changes
# with dpkg-statoverride: a metadata-only change of a lower file, which unionfs records
# as a metadata-only copy (trusted.overlay.metacopy) in its upper.
OVERRIDDEN = "usr/sbin/chpasswd"

# Paths whose *content* (size, digest) differs between two runs of step 1 on the kernel
# itself, with the same base, the same .debs and the same commands. Found by running the
# kernel side twice: `PYTHONPATH=tests .venv/bin/python tests/integration/test_it_rootfs.py
# --calibrate` does it and prints the differing paths. Everything else must be identical;
# of these paths, type, mode, owner and link count are still compared.
VOLATILE_1 = {
    # dpkg logs each action with the wall-clock time
    "var/log/dpkg.log": "timestamps",
    # apt's history: Start-Date/End-Date lines
    "var/log/apt/history.log": "timestamps",
    # dpkg's output, with "Log started: <date>" / "Log ended: <date>"
    "var/log/apt/term.log": "timestamps",
    # update-alternatives (cpio's mt) logs with the time
    "var/log/alternatives.log": "timestamps",
    # ldconfig's auxiliary cache records st_dev, st_ino and ctime of every library
    "var/cache/ldconfig/aux-cache": "inode numbers and ctimes",
    # apt's binary caches record the mtimes of the index files and of dpkg's status
    # they were built from (same size every run, different bytes)
    "var/cache/apt/pkgcache.bin": "mtimes of its sources",
    "var/cache/apt/srcpkgcache.bin": "mtimes of its sources",
}
# After step 2's second install: the same seven paths (found the same way, --calibrate).
VOLATILE_2 = dict(VOLATILE_1)

APT = ["apt-get", *db.apt_local_options()]

STEP1 = [
    [*APT, "update"],
    [*APT, "install", "-y", *INSTALL],
    ["dpkg-statoverride", "--update", "--add", "root", "root", "0700", "/" + OVERRIDDEN],
]

PY_SCRIPT = """
import hashlib, json, sqlite3, sys, zlib
con = sqlite3.connect(":memory:")
con.execute("create table t (k text, v integer)")
con.executemany("insert into t values (?, ?)", [(str(i), i * i) for i in range(1000)])
total = con.execute("select sum(v) from t").fetchone()[0]
data = json.dumps({"total": total, "v": sys.version_info[:2]}).encode()
print(total, hashlib.sha256(zlib.compress(data, 9)).hexdigest())
"""

# ustar: no inode or device numbers (newc has them, and they are each backend's own);
# only files the .debs and the base brought, whose mtimes are the archives'.
CPIO_SH = "cd / && find usr/share/doc etc/apt -type f | sort | cpio -o --quiet -H ustar | md5sum"

# Step 2: programs whose whole output is compared, then the second install.
STEP2_PROGRAMS = [
    ["dpkg", "--verify"],
    ["dpkg", "-l"],
    ["less", "--version"],
    ["file", "/usr/bin/cpio", "/etc/passwd", "/usr/lib/python3.11/os.py", "/" + OVERRIDDEN],
    ["sh", "-c", CPIO_SH],
    ["python3", "-c", PY_SCRIPT],
    ["python3", "-m", "compileall", "-q", "-f", "/usr/lib/python3.11/json"],
]
STEP2_INSTALL = [*APT, "install", "-y", *SECOND]
STEP2_AFTER = [["sh", "-c", "xz --version && echo hello | xz | xz -d"], ["dpkg", "--verify"]]


@dataclasses.dataclass(frozen=True)
class Layers:
    base: Path | None
    debs: Path | None
    error: str | None = None


@pytest.fixture(scope="session")
def debian_layers() -> Layers:
    """The cached minbase and .deb layer, built on the first run (its own time limits:
    debootstrap 30 minutes, each apt-get 15). Outside every test's watchdog."""
    try:
        base = db.minbase()
        debs = db.debs_layer(None, base, [INSTALL, SECOND])
    except db.BuildError as e:
        return Layers(None, None, str(e))
    return Layers(base, debs)


@dataclasses.dataclass
class Run:
    """What one backend did: its upper, the merged view afterwards, the commands' output."""

    backend: str
    upper: Path
    view: Tree
    outputs: list[str]


def _mount(backend: str, lowers: Sequence[Path], tmp: Path, name: str, opts: str) -> Mount:
    upper, work, mnt = tmp / f"{name}.upper", tmp / f"{name}.work", tmp / f"{name}.mnt"
    if backend == "kernel":
        return mount_kernel(lowers, upper, work, mnt, opts)
    return mount_unionfs(lowers, upper, work, mnt, tmp / f"{name}.log")


def _apt_lines(out: str) -> str:
    """What dpkg did, from apt-get's output (the rest has sizes and speeds)."""
    keep = ("Unpacking ", "Setting up ", "Processing triggers ", "Selecting previously")
    return "\n".join(ln for ln in out.splitlines() if ln.startswith(keep))


def _view(root: Path, since_ns: int) -> Tree:
    """snapshot() with mtimes, where an mtime after since_ns (written by this test's own
    commands, so different on every run) reads as None: an mtime from the .debs or the
    base must survive as it is."""
    tree = snapshot(root, times=True)
    nodes = {
        k: dataclasses.replace(n, mtime_ns=None) if (n.mtime_ns or 0) >= since_ns else n
        for k, n in tree.nodes.items()
    }
    return Tree(nodes, tree.links, tree.inos)


def _loose(tree: Tree, volatile: dict[str, str]) -> Tree:
    """tree with the content (size, digest, mtime) of the volatile paths left out."""
    nodes = dict(tree.nodes)
    for p in volatile:
        if p in nodes:
            nodes[p] = dataclasses.replace(nodes[p], size=None, digest=None, mtime_ns=None)
    return Tree(nodes, tree.links, tree.inos)


def do_run(
    backend: str,
    lowers: Sequence[Path],
    debs: Path,
    tmp: Path,
    name: str,
    commands: Sequence[Sequence[str]],
    since_ns: int,
    opts: str = OVERLAY_OPTS,
    snapshot_first: bool = False,
) -> tuple[Run, Tree | None]:
    """Mount, run commands in a chroot there, snapshot the merged view, unmount.

    With snapshot_first, the view before any command is returned too."""
    m = _mount(backend, lowers, tmp, name, opts)
    outputs = []
    try:
        before = _view(m.mnt, since_ns) if snapshot_first else None
        db.prepare_for_dpkg(m.mnt)
        with db.Chroot(m.mnt, binds={db.DEBS_MOUNT: debs}) as ch:
            for argv in commands:
                try:
                    res = ch.run(list(argv))
                except db.BuildError as e:
                    raise AssertionError(f"{backend}: {e}\n{m.log_text()[-3000:]}") from None
                out = res.stdout
                outputs.append(_apt_lines(out) if argv[0] == "apt-get" else out)
        view = _view(m.mnt, since_ns)
    finally:
        m.unmount()
    m.assert_log_clean()
    assert m.upper is not None
    return Run(backend, m.upper, view, outputs), before


def _metacopies(upper: Path) -> list[str]:
    """Files in upper marked as metadata-only copies (their data is in a lower layer)."""
    found = []
    for dirpath, _dirs, files in os.walk(upper):
        for f in files:
            p = os.path.join(dirpath, f)
            try:
                os.getxattr(p, "trusted.overlay.metacopy", follow_symlinks=False)
            except OSError:
                continue
            found.append(os.path.relpath(p, upper))
    return sorted(found)


def _base_changed(base: Path) -> str:
    """'' if the cached minbase is still what debootstrap made (the shared lower layer of
    every run: a mount that writes to it would corrupt all later runs), else why not."""
    try:
        db.verify_minbase(base)
    except db.BuildError as e:
        return str(e)
    return ""


def _report(title: str, diffs: list[str], limit: int = 60) -> str:
    more = f"\n... and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return f"{title} ({len(diffs)} differences):\n" + "\n".join(diffs[:limit]) + more


def _outputs_differ(a: Run, b: Run, commands: Sequence[Sequence[str]]) -> list[str]:
    return [
        f"$ {' '.join(argv)}\n--- {a.backend} ---\n{x}--- {b.backend} ---\n{y}"
        for argv, x, y in zip(commands, a.outputs, b.outputs, strict=True)
        if x != y
    ]


@pytest.mark.watchdog(900)
def test_apt_get_in_a_chroot_matches_kernel(debian_layers: Layers, tmp_path: Path) -> None:
    assert debian_layers.error is None, (
        "cannot build the Debian base layers (debootstrap from the host's apt source, then "
        f"apt-get --download-only): {debian_layers.error}"
    )
    base, debs = debian_layers.base, debian_layers.debs
    assert base is not None and debs is not None
    assert not (changed := _base_changed(base)), changed
    since = time.time_ns() - 2_000_000_000
    problems: list[str] = []

    # Step 1: the same install on both, over the bare minbase.
    one = {
        b: do_run(b, [base], debs, tmp_path, f"{b}1", STEP1, since)[0]
        for b in ("unionfs", "kernel")
    }
    u1, k1 = one["unionfs"], one["kernel"]
    assert u1.outputs[1] and u1.outputs[1] == k1.outputs[1], (
        f"apt-get install did different things:\n--- unionfs ---\n{u1.outputs[1]}\n"
        f"--- kernel ---\n{k1.outputs[1]}"
    )
    d = diff_trees(_loose(u1.view, VOLATILE_1), _loose(k1.view, VOLATILE_1))
    if d:
        problems.append(_report("step 1: merged views after the install differ", d))
    metacopies = _metacopies(u1.upper)

    # Step 2a: the kernel reads the unionfs upper of step 1 as unionfs does.
    cross = mount_kernel([u1.upper, base], tmp_path / "x.upper", tmp_path / "x.work",
                         tmp_path / "x.mnt", READER_OPTS)
    try:
        cross_view = _view(cross.mnt, since)
    finally:
        cross.unmount()
    d = diff_trees(cross_view, u1.view)
    if d:
        problems.append(_report(
            "step 2: the kernel (metacopy=on) over unionfs's step-1 upper differs from the "
            "step-1 unionfs view", d))

    # Step 2b: each upper as a lower layer, a fresh upper, programs and a second install.
    commands = [*STEP2_PROGRAMS, STEP2_INSTALL, *STEP2_AFTER]
    u2, u2_before = do_run("unionfs", [u1.upper, base], debs, tmp_path, "unionfs2", commands,
                           since, snapshot_first=True)
    k2, _ = do_run("kernel", [k1.upper, base], debs, tmp_path, "kernel2", commands, since)
    assert u2_before is not None
    d = diff_trees(u2_before, u1.view)
    if d:
        problems.append(_report(
            "step 2: unionfs over its own step-1 upper does not show the step-1 view "
            f"(metadata-only copies in that upper: {metacopies})", d))
    d = _outputs_differ(u2, k2, commands)
    if d:
        problems.append("step 2: programs printed different things:\n" + "\n".join(d))
    d = diff_trees(_loose(u2.view, VOLATILE_2), _loose(k2.view, VOLATILE_2))
    if d:
        problems.append(_report("step 2: merged views after the second install differ", d))
    if changed := _base_changed(base):
        problems.append(changed)
    assert not problems, "\n\n".join(problems)

    # The premise: the work was real and the kernel side found nothing wrong.
    assert k2.outputs[0] == "" and k2.outputs[-1] == "", f"dpkg --verify: {k2.outputs}"
    assert "Setting up xz-utils" in k2.outputs[len(STEP2_PROGRAMS)], k2.outputs
    assert k2.view.nodes[OVERRIDDEN].mode == 0o700
    assert "usr/bin/python3.11" in k2.view.nodes and "usr/bin/xz" in k2.view.nodes


# --------------------------------------------------------------------------- calibration


def calibrate(tmp: Path) -> None:
    """Run each kernel step twice; print the paths whose content differs between the runs
    (what VOLATILE_1 and VOLATILE_2 may list, and nothing else)."""
    base = db.minbase()
    debs = db.debs_layer(None, base, [INSTALL, SECOND])
    since = time.time_ns() - 2_000_000_000
    commands = [*STEP2_PROGRAMS, STEP2_INSTALL, *STEP2_AFTER]
    runs = []
    for i in (1, 2):
        r1, _ = do_run("kernel", [base], debs, tmp, f"k1-{i}", STEP1, since)
        r2, _ = do_run("kernel", [r1.upper, base], debs, tmp, f"k2-{i}", commands, since)
        runs.append((r1, r2))
    for step, (a, b) in enumerate(zip(*runs, strict=True), 1):
        print(f"step {step}: paths that differ between two kernel runs:")
        for line in diff_trees(a.view, b.view):
            print("  ", line[:300])
        for x in _outputs_differ(a, b, STEP1 if step == 1 else commands):
            print("   output:", x[:600])


if __name__ == "__main__":
    import tempfile

    assert sys.argv[1:] == ["--calibrate"], "usage: test_it_rootfs.py --calibrate"
    with tempfile.TemporaryDirectory(prefix="rootfs-calibrate-") as d:
        calibrate(Path(d))
