"""unionmount as a plain user: through fusermount3, and in the user's own user namespace.

The session makes a real unprivileged user (tests/rootless.py: `host`: the user
``unionfs-test``, /dev/fuse opened to 0666 for the run, traverse permission to this
interpreter), and undoes all of it at the end. As that user:

- a mount through the setuid fusermount3 of a layer and an upper in the user's own
  directories: writes, deletes, ``fusermount3 -u``; the mount is the user's alone
  (no allow_other, default_permissions on); results, view and upper compared with what
  the kernel's overlayfs -o userxattr does for the same operations in a user namespace
  of the same user, and the kernel (as real root) mounting both uppers;
- ``unshare -Urm`` (root of the user's namespace, as rootless podman runs a mount
  program): unionmount beside the kernel's overlayfs -o userxattr;
- bad input, each in a private mount namespace (so a fuse.conf, a fusermount3 or a
  /dev/fuse can be swapped for that run alone): allow_other without user_allow_other,
  a mountpoint fusermount3 refuses, /dev/fuse not accessible, fusermount3 not setuid or
  missing: one line on stderr, a non-zero exit, nothing mounted, nothing left running.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from mounts import (
    WHITEOUT,
    File,
    Node,
    Tree,
    Xattr,
    build,
    diff_trees,
    is_whiteout,
    mount_kernel,
    mountpoints,
    pid_alive,
    pids_mentioning,
    server_pids,
    snapshot,
    wait_until,
)
from rootless import (
    KERNEL_USERXATTR,
    MOUNTNS,
    USERNS,
    HostChanges,
    Isolated,
    User,
    call,
    chown_tree,
    format_diff,
    host,
    run_group,
    trusted_xattrs,
    upper_format,
    user_dir,
    user_env,
)
from test_differential import run_op
from test_userns import OPS

UNIONMOUNT = [sys.executable, "-m", "unionfs"]

LAYER = {
    "f": "lower f",
    "g": "g",
    "wh": WHITEOUT,
    "o": Xattr({"user.overlay.opaque": b"y"}),
    "o/new": "new",
    "d/x": "x",
    "d/y": "y",
    "r": "to be renamed",
    "m": File(data=b"m" * 50000, mode=0o644),
    "x": "gets an xattr",
    "e/z": "z",
}
BELOW = {"wh": "hidden", "o/old": "hidden", "keep": "keep", "e/below": "merged"}


@pytest.fixture(scope="session")
def changes() -> Iterator[HostChanges]:
    with host() as h:
        yield h


@pytest.fixture
def user(changes: HostChanges) -> User:
    assert changes.user is not None
    return changes.user


_tests = itertools.count()


@pytest.fixture
def work(changes: HostChanges) -> Iterator[Path]:
    """A directory of the test user's for this test; nothing may stay mounted or running
    under it afterwards."""
    # A neutral name: an error message that names the directory must not match by chance.
    d = user_dir(changes, f"t{next(_tests)}")
    yield d
    leaked = [m for m in mountpoints() if m.startswith(str(d) + "/")]
    stray = [p for p in pids_mentioning(d) if pid_alive(p)]
    for m in leaked:
        run_group(["umount", "-l", m], timeout=30)
    for p in stray:
        os.kill(p, 9)
    shutil.rmtree(d, ignore_errors=True)
    assert not leaked, f"mounts left behind: {leaked}"
    assert not stray, f"processes left behind: {stray}"


def _stack(root: Path, user: User) -> tuple[list[Path], Path, Path]:
    root.mkdir(exist_ok=True)
    os.chown(root, user.uid, user.gid)
    lowers = [build(root / "layer", LAYER), build(root / "below", BELOW)]
    for p in lowers:
        chown_tree(p, user)
    for d in (root / "upper", root / "mnt"):
        d.mkdir()
        os.chown(d, user.uid, user.gid)
    return lowers, root / "upper", root / "upper.work"


def _mountinfo(mnt: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [line for line in f if line.split()[4] == str(mnt)]


def _uids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    return []


# Run by the test user (`call(..., user=)`), inside or outside a namespace.


def ops_on(mnt_s: str) -> tuple[list[Any], Tree]:
    mnt = Path(mnt_s)
    return [run_op(mnt, o) for o in OPS], snapshot(mnt)


def kernel_ops(lowers: list[str], upper: str, work: str, mnt: str) -> tuple[list[Any], Tree]:
    """In the user's namespace: the kernel's overlayfs -o userxattr on these directories."""
    k = mount_kernel([Path(p) for p in lowers], Path(upper), Path(work), Path(mnt),
                     KERNEL_USERXATTR)
    try:
        return ops_on(mnt)
    finally:
        k.unmount()


def _owned_by(tree: Tree, user: User) -> Tree:
    """A tree seen as root of the user's namespace, with the ids the user has outside."""
    def fix(n: Node) -> Node:
        return dataclasses.replace(n, uid=user.uid if n.uid == 0 else n.uid,
                                   gid=user.gid if n.gid == 0 else n.gid)
    return Tree({k: fix(v) for k, v in tree.nodes.items()}, tree.links, tree.inos)


# ---------------------------------------------------------------------------------------------
# A mount through fusermount3


@dataclasses.dataclass
class Run:
    """What one plain-user mount, its operations and its unmount showed."""

    root: Path
    mount: Any = None  # (exit status, stdout, stderr) of unionmount
    mountinfo: list[str] = dataclasses.field(default_factory=list)
    daemon_uids: list[list[int]] = dataclasses.field(default_factory=list)
    root_access: str = ""
    ours: tuple[list[Any], Tree] | None = None
    unmount: Any = None
    still_mounted: bool = True
    daemon_exited: bool = False
    kernel: tuple[list[Any], Tree] | None = None
    log: str = ""

    def mounted_ok(self) -> None:
        assert self.mount is not None and self.mount[0] == 0, (
            f"unionmount as a plain user failed: {self.mount}\nlog:\n{self.log[-3000:]}")


@pytest.fixture(scope="module")
def plain(changes: HostChanges) -> Iterator[Run]:
    """As the test user: mount, OPS, fusermount3 -u; then the kernel's reference in the
    user's namespace. Records what happened; the tests below judge it."""
    user = changes.user
    assert user is not None
    root = user_dir(changes, "plain-user-mount")
    run = Run(root)
    lowers, up, _ = _stack(root / "u", user)
    mnt = root / "u" / "mnt"
    log = root / "u.log"
    try:
        run.mount = run_group([*UNIONMOUNT, ":".join(map(str, lowers)), "--upper", str(up),
                               "--log", str(log), str(mnt)], user=user, env=user_env(user),
                              cwd=root, timeout=60)
        run.mountinfo = _mountinfo(mnt)
        run.daemon_uids = [_uids(p) for p in server_pids(mnt)]
        if run.mount[0] == 0:
            try:
                os.stat(mnt / "f")
                run.root_access = "allowed"
            except OSError as e:
                run.root_access = os.strerror(e.errno or 0)
            run.ours = call("test_unprivileged:ops_on", str(mnt), scratch=root, user=user)
            pids = server_pids(mnt)
            run.unmount = run_group(["fusermount3", "-u", str(mnt)], user=user,
                                    env=user_env(user), timeout=60)
            run.still_mounted = bool(_mountinfo(mnt))
            run.daemon_exited = wait_until(lambda: not any(pid_alive(p) for p in pids), 10)
        klow, kup, kwork = _stack(root / "k", user)
        run.kernel = call("test_unprivileged:kernel_ops", [str(p) for p in klow], str(kup),
                          str(kwork), str(root / "k" / "mnt"), scratch=root, user=user,
                          prefix=USERNS)
        run.log = log.read_text(errors="replace") if log.exists() else ""
        yield run
    finally:
        for m in [m for m in mountpoints() if m.startswith(str(root) + "/")]:
            run_group(["umount", "-l", m], timeout=30)
        for p in pids_mentioning(root):
            os.kill(p, 9)
        shutil.rmtree(root, ignore_errors=True)


def test_a_plain_user_mounts_through_fusermount3(plain: Run, user: User) -> None:
    """The mount is made (by fusermount3: nosuid,nodev), served by a daemon running as the
    user, with default_permissions and without allow_other: root itself is refused."""
    plain.mounted_ok()
    assert len(plain.mountinfo) == 1, plain.mountinfo
    fields = plain.mountinfo[0].split()
    mount_opts = fields[5].split(",")
    fstype, super_opts = fields[fields.index("-") + 1], fields[-1].split(",")
    assert fstype == "fuse.unionfs", plain.mountinfo
    assert "nosuid" in mount_opts and "nodev" in mount_opts, mount_opts
    assert f"user_id={user.uid}" in super_opts, super_opts
    assert "default_permissions" in super_opts and "allow_other" not in super_opts, super_opts
    assert plain.daemon_uids and all(set(u) == {user.uid} for u in plain.daemon_uids), (
        plain.daemon_uids)
    assert plain.root_access == os.strerror(13), f"root got {plain.root_access!r}"


def test_fusermount3_unmounts_it(plain: Run) -> None:
    plain.mounted_ok()
    assert plain.unmount is not None and plain.unmount[0] == 0, plain.unmount
    assert not plain.still_mounted
    assert plain.daemon_exited, "the daemon is still running after fusermount3 -u"
    assert "Traceback" not in plain.log, plain.log[-4000:]


def test_same_results_and_view_as_the_kernel_in_a_user_namespace(plain: Run,
                                                                  user: User) -> None:
    """Every operation gives what the kernel's overlayfs -o userxattr gives in a user
    namespace of the same user, and the views match (the kernel's seen from inside its
    namespace, where the user is 0)."""
    plain.mounted_ok()
    assert plain.ours is not None and plain.kernel is not None
    (ours, view), (ref, kview) = plain.ours, plain.kernel
    table = "\n".join(f"{o!r}: kernel {k!r}, unionmount {u!r}"
                      for o, k, u in zip(OPS, ref, ours, strict=True) if k != u)
    assert ours == ref, "results differ:\n" + table
    assert diff_trees(_owned_by(kview, user), view) == []


def test_the_upper_is_what_the_kernel_writes(plain: Run, user: User) -> None:
    """On disk: char 0/0 whiteouts, user.overlay.opaque, no trusted.* xattr, everything
    owned by the user; entry by entry the upper the kernel wrote (less its bookkeeping)."""
    plain.mounted_ok()
    up, kup = plain.root / "u" / "upper", plain.root / "k" / "upper"
    ours, ref = upper_format(up), upper_format(kup)
    assert trusted_xattrs(up) == []
    assert is_whiteout(up / "g") and is_whiteout(up / "r"), ours
    assert "user.overlay.opaque=b'y'" in ours["d"], ours["d"]
    assert all(f" {user.uid}:{user.gid}" in d for d in ours.values()), ours
    assert ours == ref, "the upper differs from the kernel's:\n" + format_diff(ours, ref)


def test_the_kernel_reads_both_uppers_the_same(plain: Run, tmp_path: Path) -> None:
    """Real root's kernel overlayfs -o userxattr on the user's upper shows what it shows on
    the upper its own mount in the user's namespace wrote."""
    plain.mounted_ok()
    trees = {}
    for side in ("u", "k"):
        base = plain.root / side
        m = mount_kernel([base / "layer", base / "below"], base / "upper",
                         tmp_path / f"{side}.work", tmp_path / f"{side}.mnt", KERNEL_USERXATTR)
        try:
            trees[side] = snapshot(m.mnt)
        finally:
            m.unmount()
    assert diff_trees(trees["k"], trees["u"]) == []


WRITE_ONLY = bytes(range(256)) * 40  # 10,240 bytes: a page and a half past the second


def write_only_writes(path_s: str) -> list[Any]:
    """Run by the test user on a file of mode 0200 (it may write, not read): write-only
    opens that append, rewrite a whole page and write a few bytes inside a page."""
    path = Path(path_s)
    out: list[Any] = []
    for flags, off, data in ((os.O_APPEND, -1, b"appended"), (0, 4096, b"P" * 4096),
                             (0, 5000, b"mid")):
        fd = os.open(path, os.O_WRONLY | flags)
        try:
            out.append(os.write(fd, data) if off < 0 else os.pwrite(fd, data, off))
        finally:
            os.close(fd)
    try:
        os.close(os.open(path, os.O_RDONLY))
        out.append("readable")
    except OSError as e:
        out.append(os.strerror(e.errno or 0))
    return out


def test_a_file_the_user_may_write_but_not_read(work: Path, user: User) -> None:
    """With the kernel's writeback cache a write-only open is made read-write by the
    daemon (the kernel reads the pages it fills in through it); a plain user's daemon
    cannot read a file of mode 0200 either. The writes must still do what they do on a
    local file, which the same user writes the same way."""
    _, up, _ = _stack(work / "u", user)
    local = work / "local"
    for path in (up / "wo", local):
        path.write_bytes(WRITE_ONLY)  # before the mount: no page of it is cached
        os.chown(path, user.uid, user.gid)
        os.chmod(path, 0o200)
    mnt = work / "u" / "mnt"
    r = run_group([*UNIONMOUNT, str(work / "u" / "layer"), "--upper", str(up), str(mnt)],
                  user=user, env=user_env(user), cwd=work, timeout=60)
    assert r[0] == 0, r
    try:
        ours = call("test_unprivileged:write_only_writes", str(mnt / "wo"), scratch=work,
                    user=user)
    finally:
        run_group(["fusermount3", "-u", str(mnt)], user=user, env=user_env(user), timeout=60)
    theirs = call("test_unprivileged:write_only_writes", str(local), scratch=work, user=user)
    assert ours == theirs == [8, 4096, 3, os.strerror(13)]
    assert (up / "wo").read_bytes() == local.read_bytes()
    assert stat.S_IMODE(os.stat(up / "wo").st_mode) == 0o200


# ---------------------------------------------------------------------------------------------
# In the user's own namespace (where rootless podman runs a mount program)


def test_in_the_users_own_namespace_as_the_kernel(work: Path, user: User) -> None:
    """``unshare -Urm`` as the plain user: unionmount mounts there directly (the user's
    namespace owns the mount; /dev/fuse is 0666) and agrees with the kernel's overlayfs
    -o userxattr in the same namespace; the kernel mounts unionmount's upper the same."""
    out = call("test_userns:scenario", str(work), [], scratch=work, user=user, prefix=USERNS)
    assert out["kernel"] == out["unionfs"]
    assert diff_trees(out["ref"], out["ours"]) == []
    assert diff_trees(out["ref"], out["theirs"]) == []
    assert trusted_xattrs(out["u_upper"]) == []
    assert upper_format(out["u_upper"]) == upper_format(out["k_upper"]), format_diff(
        upper_format(out["u_upper"]), upper_format(out["k_upper"]))


# ---------------------------------------------------------------------------------------------
# Bad input, each in a private mount namespace


def _bad(work: Path, user: User, *, options: tuple[str, ...] = (), mnt: Path | None = None,
         binds: list[tuple[str, str]] | None = None, tmpfs: list[str] | None = None) -> Isolated:
    lowers, up, _ = _stack(work, user)
    target = mnt if mnt is not None else work / "mnt"
    argv = [*UNIONMOUNT, ":".join(map(str, lowers)), "--upper", str(up), *options, str(target)]
    return call("rootless:isolated_run", argv, user.uid, user.gid,
                user_env(user), str(work), binds or [], tmpfs or [],
                scratch=work, prefix=MOUNTNS)


def _assert_refused(r: Isolated, *words: str) -> str:
    lines = r.stderr.splitlines()
    assert r.returncode != 0, f"exit 0: {r}"
    assert len(lines) == 1, f"want one line on stderr, got {lines!r}"
    assert lines[0].startswith("unionmount: "), lines[0]
    for w in words:
        assert w in lines[0], f"{w!r} not in {lines[0]!r}"
    assert r.mounted == [], f"mounted anyway: {r.mounted}"
    assert r.running == [], f"left running: {r.running}"
    return lines[0]


def _fuse_conf(work: Path, text: str) -> str:
    p = work / "fuse.conf"
    p.write_text(text)
    p.chmod(0o644)
    return str(p)


def test_allow_other_without_user_allow_other(work: Path, user: User) -> None:
    conf = _fuse_conf(work, "# user_allow_other\nmount_max = 1000\n")
    r = _bad(work, user, options=("-o", "allow_other"), binds=[(conf, "/etc/fuse.conf")])
    _assert_refused(r, "fuse.conf", "allow_other")


def test_allow_other_with_user_allow_other(work: Path, user: User) -> None:
    """With user_allow_other in /etc/fuse.conf, -o allow_other is granted."""
    conf = _fuse_conf(work, "user_allow_other\n")
    r = _bad(work, user, options=("-o", "allow_other"), binds=[(conf, "/etc/fuse.conf")])
    assert r.returncode == 0 and r.stderr == "", r
    assert r.mounted == [str(work / "mnt")], r


@pytest.mark.parametrize("mode", [0o755, 0o1777], ids=["root-0755", "root-sticky-1777"])
def test_a_mountpoint_the_user_does_not_own(work: Path, user: User, mode: int) -> None:
    """fusermount3 refuses a directory the user may not write, and a sticky one the user
    does not own; unionmount says so first, naming the mountpoint."""
    mnt = work / "not-mine"
    mnt.mkdir()
    mnt.chmod(mode)
    _assert_refused(_bad(work, user, mnt=mnt), str(mnt))


def test_dev_fuse_not_accessible(work: Path, user: User) -> None:
    node = work / "fuse-0600"
    st = os.stat("/dev/fuse")
    os.mknod(node, stat.S_IFCHR | 0o600, st.st_rdev)
    _assert_refused(_bad(work, user, binds=[(str(node), "/dev/fuse")]), "/dev/fuse")


def test_fusermount3_not_setuid(work: Path, user: User) -> None:
    """A fusermount3 without its setuid bit (a copy bound over it, in this namespace only:
    libfuse runs /usr/bin/fusermount3 before looking in PATH)."""
    copy = work / "fusermount3"
    shutil.copyfile("/usr/bin/fusermount3", copy)
    copy.chmod(0o755)
    _assert_refused(_bad(work, user, binds=[(str(copy), "/usr/bin/fusermount3")]),
                    "fusermount3", "setuid")


def test_fusermount3_missing(work: Path, user: User) -> None:
    """No fusermount3 anywhere: an empty /usr/bin (so /bin too) for this run."""
    _assert_refused(_bad(work, user, tmpfs=["/usr/bin"]), "fusermount3")
