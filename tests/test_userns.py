"""unionmount as root of a user namespace, compared with kernel overlayfs ``-o userxattr``.

Each test runs its mounts in a child under ``unshare --user --map-root-user --mount``
(tests/rootless.py: `call` with `USERNS`): root there holds no privilege outside the
namespace, as in rootless podman, so ``trusted.*`` xattrs are refused and the kernel
only mounts overlayfs with ``-o userxattr``. The same operations run on the kernel's
mount and on unionmount's in the same namespace and must give the same results and
trees; unionmount's upper must be in the kernel's userxattr format (``user.overlay.*``,
char 0/0 whiteouts, never a ``trusted.`` xattr), so that the kernel, given that upper,
shows the same tree. A reduced version of tests/test_differential.py runs there too.

Also here, as real root: ``-o userxattr`` asked for explicitly, and the ids inside POSIX
ACLs translated by ``uidmapping=``/``gidmapping=`` (which rootless containers-storage
passes).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st
from mounts import (
    OPAQUE,
    WHITEOUT,
    File,
    HardLink,
    Mount,
    Symlink,
    Tree,
    Xattr,
    build,
    diff_trees,
    is_whiteout,
    mount_kernel,
    mount_unionfs,
    snapshot,
)
from rootless import (
    ACL_GROUP,
    ACL_GROUP_OBJ,
    ACL_MASK,
    ACL_OTHER,
    ACL_USER,
    ACL_USER_OBJ,
    KERNEL_USERXATTR,
    USERNS,
    call,
    format_diff,
    make_acl,
    parse_acl,
    trusted_xattrs,
    upper_format,
)
from test_differential import FILES, L1, L2, op, run_op

pytestmark = pytest.mark.usefixtures("mount_guard")

USER_OPAQUE = Xattr({"user.overlay.opaque": b"y"})
"""An opaque lower directory in the userxattr format (the only one the kernel reads there)."""

TOP = {
    "f": "top f",
    "wh": WHITEOUT,
    "o": USER_OPAQUE,
    "o/new": "o new",
    "s": Symlink("f"),
}
BOTTOM = {
    "f": "bottom f",
    "g": "g",
    "wh": "hidden by a whiteout",
    "o/old": "hidden by an opaque dir",
    "d/x": "x",
    "d/y": "y",
    "r": "to be renamed",
    "m": File(data=b"m" * 50000, mode=0o644),
    "x": "gets an xattr",
    "e/z": "z",
    "keep": "keep",
}

# Copy-up, delete (whiteout), rmdir + mkdir (opaque), rename, chmod, user xattrs, and
# reads of the lowers' own userxattr markers.
OPS: list[tuple[Any, ...]] = [
    ("listdir", ""),
    ("listdir", "o"),
    ("read", "wh"),
    ("append", "f", b"+more"),
    ("unlink", "g"),
    ("unlink", "d/x"),
    ("unlink", "d/y"),
    ("rmdir", "d"),
    ("mkdir", "d"),
    ("create", "d/new", b"new"),
    ("rename", "r", "r2"),
    ("chmod", "m", 0o600),
    ("setxattr", "x", "user.a", b"1"),
    ("setxattr", "e", "user.b", b"2"),
    ("create", "wh", b"back"),
    ("rename", "e", "e2"),  # a lower directory: EXDEV on both
    ("symlink", "f", "ln"),
    ("mkfifo", "fifo"),
    ("read", "m"),
    ("stat", "m"),
    ("listdir", ""),
    ("listdir", "d"),
]


def _stack(base: Path, name: str) -> tuple[list[Path], Path, Path]:
    lowers = [build(base / name / "top", TOP), build(base / name / "bottom", BOTTOM)]
    return lowers, base / name / "upper", base / name / "work"


def scenario(base_s: str, options: list[str], compare_kernel: bool = True) -> dict[str, Any]:
    """In the namespace: OPS on kernel overlayfs -o userxattr and on unionmount (with
    ``options``), their results and trees; then unionmount mounted again on its upper, and
    the kernel mounting unionmount's upper (fresh workdir)."""
    base = Path(base_s)
    klow, kup, kwork = _stack(base, "k")
    ulow, uup, uwork = _stack(base, "u")
    out: dict[str, Any] = {"k_upper": str(kup), "u_upper": str(uup)}
    mounts: list[Mount] = []
    try:
        if compare_kernel:
            k = mount_kernel(klow, kup, kwork, base / "kmnt", KERNEL_USERXATTR)
            mounts.append(k)
            out["kernel"] = [run_op(k.mnt, o) for o in OPS]
            out["ref"] = snapshot(k.mnt)
            k.unmount()
        u = mount_unionfs(ulow, uup, uwork, base / "umnt", base / "u.log", options)
        mounts.append(u)
        out["unionfs"] = [run_op(u.mnt, o) for o in OPS]
        out["ours"] = snapshot(u.mnt)
        out["m_blocks"] = os.stat(uup / "m").st_blocks
        u.unmount()
        u.assert_log_clean()
        again = mount_unionfs(ulow, uup, uwork, base / "umnt", base / "u2.log", options)
        mounts.append(again)
        out["again"] = snapshot(again.mnt)
        again.unmount()
        again.assert_log_clean()
        if compare_kernel:
            check = mount_kernel(ulow, uup, base / "u" / "kwork", base / "check", KERNEL_USERXATTR)
            mounts.append(check)
            out["theirs"] = snapshot(check.mnt)
            check.unmount()
    finally:
        for m in mounts:
            m.unmount()
    return out


def _results_table(out: dict[str, Any]) -> str:
    return "\n".join(f"{o!r}: kernel {k!r}, unionmount {u!r}"
                     for o, k, u in zip(OPS, out["kernel"], out["unionfs"], strict=True)
                     if k != u)


def scenario_kernel_only(tmp_path: Path) -> dict[str, str]:
    return call("test_userns:kernel_upper_in_ns", str(tmp_path / "k"), scratch=tmp_path,
                prefix=USERNS)


def kernel_upper_in_ns(base_s: str) -> dict[str, str]:
    base = Path(base_s)
    lowers, up, work = _stack(base, "k")
    k = mount_kernel(lowers, up, work, base / "kmnt", KERNEL_USERXATTR)
    try:
        for o in OPS:
            run_op(k.mnt, o)
    finally:
        k.unmount()
    return upper_format(up)


def test_the_namespace_has_no_privilege_outside(tmp_path: Path) -> None:
    """The harness itself: root of the namespace is the caller mapped to 0 alone; trusted
    xattrs and real device nodes are refused there, whiteout devices and user xattrs are
    not; the kernel mounts overlayfs with -o userxattr and writes user.overlay.opaque."""
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    facts = call("rootless:userns_facts", str(scratch), scratch=tmp_path, prefix=USERNS)
    assert facts["uid_map"] == ["0", "0", "1"] and facts["gid_map"] == ["0", "0", "1"], facts
    assert facts["euid"] == 0
    assert facts["trusted_xattr"] == "EPERM", facts
    assert facts["device_mknod"] == "EPERM", facts
    assert facts["user_xattr"] is None and facts["whiteout_mknod"] is None, facts
    assert facts["dev_fuse"] is None, facts  # real root owns /dev/fuse, mapped in there
    out = scenario_kernel_only(tmp_path)
    assert "user.overlay.opaque=b'y'" in out["d"], out
    assert out["g"].startswith("chr 0000 0:0 rdev=0,0"), out


@pytest.mark.parametrize("options", [[], ["-o", "userxattr"]], ids=["chosen", "asked"])
def test_same_results_and_tree_as_the_kernel(tmp_path: Path, options: list[str]) -> None:
    """Without the privilege for trusted xattrs unionmount picks the userxattr format by
    itself ("chosen"), or is told with -o userxattr ("asked"); either way every operation
    gives the kernel's result, and the merged tree is the kernel's, also after a remount."""
    out = call("test_userns:scenario", str(tmp_path), options, scratch=tmp_path, prefix=USERNS)
    assert out["kernel"] == out["unionfs"], "results differ:\n" + _results_table(out)
    assert diff_trees(out["ref"], out["ours"]) == [], "merged trees differ"
    assert diff_trees(out["ref"], out["again"]) == [], "another tree after a remount"


def test_the_kernel_mounts_our_upper_with_userxattr(tmp_path: Path) -> None:
    """The kernel, in the namespace, given unionmount's upper (-o userxattr, a fresh
    workdir) shows the tree its own mount showed."""
    out = call("test_userns:scenario", str(tmp_path), [], scratch=tmp_path, prefix=USERNS)
    theirs: Tree = out["theirs"]
    assert diff_trees(out["ref"], theirs) == [], (
        "the kernel reads unionmount's upper differently:\n"
        + "\n".join(diff_trees(out["ref"], theirs)))


def test_the_upper_is_in_the_userxattr_format(tmp_path: Path) -> None:
    """On disk (read here as real root): user.overlay.opaque on the replaced directory,
    char 0/0 whiteouts, no trusted.* xattr anywhere, the chmod'ed file copied whole (no
    metacopy in userxattr mode unless asked); entry by entry what the kernel's upper holds
    (less the kernel's bookkeeping: origin, impure, uuid)."""
    out = call("test_userns:scenario", str(tmp_path), [], scratch=tmp_path, prefix=USERNS)
    up = Path(out["u_upper"])
    assert trusted_xattrs(up) == [], "trusted xattrs in an upper written without privilege"
    ours, ref = upper_format(up), upper_format(out["k_upper"])
    assert "user.overlay.opaque=b'y'" in ours["d"], ours["d"]
    for gone in ("g", "r"):
        assert is_whiteout(up / gone), f"{gone}: {ours.get(gone)}"
    assert "metacopy" not in ours["m"] and out["m_blocks"] > 0, ours["m"]
    assert ours == ref, "the upper differs from the kernel's:\n" + format_diff(ours, ref)


def test_metacopy_is_written_in_user_xattrs_when_asked(tmp_path: Path) -> None:
    """-o metacopy=on in userxattr mode: the chmod of a lower file copies metadata only,
    marked user.overlay.metacopy (never trusted.), and reads still give the lower data."""
    out = call("test_userns:scenario", str(tmp_path), ["-o", "metacopy=on"], False,
               scratch=tmp_path, prefix=USERNS)
    up = Path(out["u_upper"])
    assert trusted_xattrs(up) == []
    names = os.listxattr(up / "m", follow_symlinks=False)
    assert "user.overlay.metacopy" in names, names
    assert out["m_blocks"] == 0, "a metadata-only copy holds no data blocks"
    read_m = out["unionfs"][OPS.index(("read", "m"))]
    assert read_m == ("ok", b"m" * 50000)
    assert diff_trees(out["ours"], out["again"]) == []


# ---------------------------------------------------------------------------------------------
# -o userxattr as real root


def test_userxattr_asked_as_real_root(tmp_path: Path) -> None:
    """Real root, -o userxattr: the upper holds user.overlay.* (no trusted.overlay.*), the
    same as kernel overlayfs -o userxattr writes for the same operations, and the kernel
    mounting it with -o userxattr shows the tree unionmount showed."""
    mounts: list[Mount] = []
    try:
        klow, kup, kwork = _stack(tmp_path, "k")
        k = mount_kernel(klow, kup, kwork, tmp_path / "kmnt", KERNEL_USERXATTR)
        mounts.append(k)
        kernel = [run_op(k.mnt, o) for o in OPS]
        ref = snapshot(k.mnt)
        k.unmount()
        ulow, uup, uwork = _stack(tmp_path, "u")
        u = mount_unionfs(ulow, uup, uwork, tmp_path / "umnt", tmp_path / "u.log",
                          ["-o", "userxattr"])
        mounts.append(u)
        ours = [run_op(u.mnt, o) for o in OPS]
        view = snapshot(u.mnt)
        u.unmount()
        u.assert_log_clean()
        assert kernel == ours
        assert diff_trees(ref, view) == []
        assert not [x for x in trusted_xattrs(uup) if "overlay" in x], trusted_xattrs(uup)
        got, want = upper_format(uup), upper_format(kup)
        assert got == want, format_diff(got, want)
        check = mount_kernel(ulow, uup, tmp_path / "kwork2", tmp_path / "check",
                             KERNEL_USERXATTR)
        mounts.append(check)
        assert diff_trees(ref, snapshot(check.mnt)) == []
    finally:
        for m in mounts:
            m.unmount()


# ---------------------------------------------------------------------------------------------
# uidmapping= / gidmapping= and POSIX ACLs

RW, R, RWX, X = 6, 4, 7, 1


def test_acl_ids_are_translated_like_owners(tmp_path: Path) -> None:
    """With ``uidmapping=1000:0:100,gidmapping=1000:0:100`` (disk 1000.. shows as 0..),
    the ids inside POSIX ACLs (access and default) are shown and stored through the same
    map as the owners: disk 1007 shows as 7, an id outside the map as 65534; an ACL set
    through the mount naming 3 is stored as 1003."""
    lower = tmp_path / "lower"
    lower.mkdir()
    f, d = lower / "f", lower / "d"
    f.write_text("acl\n")
    d.mkdir()
    os.chown(f, 1005, 1005)
    os.chown(d, 1005, 1005)
    os.setxattr(f, "system.posix_acl_access", make_acl([
        (ACL_USER_OBJ, None, RW), (ACL_USER, 1007, RW), (ACL_USER, 50, R),
        (ACL_GROUP_OBJ, None, R), (ACL_GROUP, 1009, R), (ACL_MASK, None, RW),
        (ACL_OTHER, None, R)]))
    os.setxattr(d, "system.posix_acl_default", make_acl([
        (ACL_USER_OBJ, None, RWX), (ACL_USER, 1007, RWX), (ACL_GROUP_OBJ, None, X),
        (ACL_MASK, None, RWX), (ACL_OTHER, None, X)]))
    up = tmp_path / "upper"
    m = mount_unionfs([lower], up, tmp_path / "work", tmp_path / "mnt", tmp_path / "u.log",
                      ["-o", "uidmapping=1000:0:100,gidmapping=1000:0:100"])
    try:
        st_f = os.stat(m / "f")
        assert (st_f.st_uid, st_f.st_gid) == (5, 5)
        # (compared as sets: an idmapped mount of the kernel keeps the entries' order too)
        shown = parse_acl(os.getxattr(m / "f", "system.posix_acl_access"))
        assert sorted(shown) == sorted(["user::rw-", "user:7:rw-", "user:65534:r--",
                                        "group::r--", "group:9:r--", "mask::rw-",
                                        "other::r--"]), shown
        dflt = parse_acl(os.getxattr(m / "d", "system.posix_acl_default"))
        assert sorted(dflt) == sorted(["user::rwx", "user:7:rwx", "group::--x", "mask::rwx",
                                       "other::--x"]), dflt
        os.setxattr(m / "f", "system.posix_acl_access", make_acl([
            (ACL_USER_OBJ, None, RW), (ACL_USER, 3, R), (ACL_GROUP_OBJ, None, R),
            (ACL_GROUP, 4, R), (ACL_MASK, None, RW), (ACL_OTHER, None, R)]))
    finally:
        m.unmount()
        m.assert_log_clean()
    stored = parse_acl(os.getxattr(up / "f", "system.posix_acl_access"))
    assert sorted(stored) == sorted(["user::rw-", "user:1003:r--", "group::r--",
                                     "group:1004:r--", "mask::rw-", "other::r--"]), stored


# ---------------------------------------------------------------------------------------------
# The differential test, reduced, in the namespace


def _ns_layer(spec: dict[str, object]) -> dict[str, object]:
    """test_differential's layers in the userxattr format, without the lower hard link (in
    a user namespace the kernel runs with index=off, which splits a copied-up link)."""
    out: dict[str, object] = {}
    for rel, what in spec.items():
        if what is OPAQUE:
            out[rel] = USER_OPAQUE
        elif isinstance(what, HardLink):
            out[rel] = "was a hard link"
        else:
            out[rel] = what
    return out


def _no_links(tree: Tree) -> Tree:
    return Tree(tree.nodes, frozenset(), tree.inos)


def diff_sequence(base_s: str, ops: list[tuple[Any, ...]]) -> None:
    """In the namespace: ops on kernel -o userxattr and on unionmount agree op by op and in
    the final tree; unionmount remounted and the kernel on unionmount's upper agree too.

    Trees are compared without their hard-link groups (link counts are compared): with
    index=off, as in a user namespace, the kernel gives the two names of a copied-up file
    linked again (``link f g``) different st_ino; unionmount keeps index=on semantics."""
    base = Path(base_s)
    stacks = {}
    for name in ("k", "u"):
        lowers = [build(base / name / layer, _ns_layer(spec))
                  for layer, spec in (("l1", L1), ("l2", L2))]
        stacks[name] = (lowers, base / name / "upper", base / name / "work")
    mounts: list[Mount] = []
    try:
        k = mount_kernel(*stacks["k"], base / "kmnt", KERNEL_USERXATTR)
        mounts.append(k)
        u = mount_unionfs(*stacks["u"], base / "umnt", base / "u.log")
        mounts.append(u)
        history = []
        for i, o in enumerate(ops):
            rk, ru = run_op(k.mnt, o), run_op(u.mnt, o)
            history.append(f"{i}: {o!r} -> kernel {rk!r}")
            assert rk == ru, f"op {i} {o!r}: kernel {rk!r}, unionfs {ru!r}\n" + "\n".join(history)
        ref = _no_links(snapshot(k.mnt))
        differ = diff_trees(ref, _no_links(snapshot(u.mnt)))
        assert differ == [], ("final trees differ:\n" + "\n".join(differ) + "\nafter:\n"
                              + "\n".join(history))
        k.unmount()
        u.unmount()
        u.assert_log_clean()
        again = mount_unionfs(*stacks["u"], base / "umnt", base / "u2.log")
        mounts.append(again)
        assert diff_trees(ref, _no_links(snapshot(again.mnt))) == [], (
            "remount:\n" + "\n".join(history))
        again.unmount()
        lowers, uup, _ = stacks["u"]
        check = mount_kernel(lowers, uup, base / "u" / "kwork", base / "check", KERNEL_USERXATTR)
        mounts.append(check)
        assert diff_trees(ref, _no_links(snapshot(check.mnt))) == [], (
            "the kernel reads unionfs's upper differently:\n" + "\n".join(history))
    finally:
        for m in mounts:
            m.unmount()
    shutil.rmtree(base, ignore_errors=True)


_counter = iter(range(1 << 30))


@pytest.mark.watchdog(900)
@settings(
    max_examples=int(os.environ.get("UNIONFS_USERNS_DIFF_EXAMPLES", "8")),
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=[Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink],
)
@given(ops=st.lists(op, min_size=1, max_size=10))
@example(ops=[("unlink", "d/x"), ("unlink", "d/y"), ("rmdir", "d"), ("mkdir", "d"),
              ("listdir", "d"), ("rename", "f", "d/x"), ("rename", "d", "nd")])
@example(ops=[("link", "f", "wh"), ("stat", "wh"), ("unlink", "f"), ("stat", "wh")])
@example(ops=[("setxattr", "e", "user.a", b"v"), ("create", "wh", b"new"),
              ("chmod", "h1", 0o600), ("read", "h1"), ("listdir", "o"), ("rmdir", "empty")])
def test_random_sequences_agree_in_userns(tmp_path_factory: pytest.TempPathFactory,
                                          ops: list[tuple[Any, ...]]) -> None:
    assert set(FILES) >= {"h1", "h2"}  # the layers' names this test rewrites
    base = tmp_path_factory.mktemp(f"nsdiff{next(_counter)}")
    call("test_userns:diff_sequence", str(base / "run"), ops, scratch=base, prefix=USERNS)
