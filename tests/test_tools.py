"""The offline tools on hand-made layers (no mount): ``unionmount diff``, ``inspect``,
``export`` and ``import``, run as the CLI (``python -m unionfs``).

- diff and inspect: a known stack, the exact lines and totals expected;
- export: the archive's entries, PAX records and order, and that two exports are the
  same bytes;
- import: what it restores, the kernel format, and hostile archives: each refused
  with one line, nothing written outside the destination (nor left inside it).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import pty
import socket
import stat
import struct
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.mounts import (
    DIR,
    OPAQUE,
    WHITEOUT,
    File,
    HardLink,
    Symlink,
    Xattr,
    build,
    ok,
    snapshot,
    tool,
)
from unionfs import ociimport
from unionfs.config import LayerError

T0 = 1_600_000_000_000_000_000
T1 = 1_700_000_000_500_000_000
CAPABILITY = struct.pack("<IIIII", 0x02000001, 1 << 13, 0, 0, 0)


def one_error_line(r: subprocess.CompletedProcess[bytes], start: bytes) -> bytes:
    assert r.returncode != 0
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), r.stderr
    return lines[0]


def set_times(root: Path, ns: int, only: tuple[str, ...] = ()) -> None:
    """Give *root* and everything in it (or just *only*) the mtime *ns*."""
    paths = [root / rel for rel in only] if only else [
        Path(d) / n for d, dirs, files in os.walk(root) for n in dirs + files] + [root]
    for p in paths:
        os.utime(p, ns=(ns, ns), follow_symlinks=False)


# =========================================================================== diff


def known_diff_stack(tmp: Path) -> tuple[list[Path], Path]:
    """Two lowers and an upper written by hand (kernel and OCI markers), every mtime
    fixed: T0, except where a change is meant (T1)."""
    l2 = build(tmp / "l2", {
        "etc/passwd": "root\n", "etc/group": "g\n", "etc/hosts": "h\n",
        "bin/sh": File(b"s" * 100, mode=0o755),
        "lib/liba.so.1": "lib", "lib/liba.so": HardLink("lib/liba.so.1"),
        "opt/app/conf": "c", "opt/app/data/big": "b" * 1000,
        "usr/share/doc/a.txt": "a", "usr/share/doc/b.txt": "b",
        "var/log/keep": "k", "home": DIR, "srv": DIR,
        "data": "data", "cache/x": "x", "cache/y": "y",
    })
    l1 = build(tmp / "l1", {"etc/motd": "m", "usr/share/doc/c.txt": "c"})
    upper = build(tmp / "upper", {
        "etc/passwd": "root\nuser\n",
        "etc/new.conf": "n",
        "etc/group": WHITEOUT,
        "etc/motd": File(b"m", mode=0o600),
        "opt/app": OPAQUE, "opt/app/conf2": "c2",
        "usr/share/doc/.wh.b.txt": "",
        "home/user/.profile": "p",
        "lib/liba.so.1": File(b"lib", mode=0o755), "lib/liba.so": HardLink("lib/liba.so.1"),
        "link": Symlink("etc/passwd"),
        "bin/sh": File(b"s" * 100, mode=0o755, xattrs={"user.x": b"1"}),
        "srv": DIR,
        "var/log": DIR,
        "ghost": WHITEOUT,
        "data": OPAQUE, "data/x": "x",
        "cache": "now a file",
    })
    for layer in (l2, l1, upper):
        set_times(layer, T0)
    os.chmod(upper / "srv", 0o700)
    set_times(upper, T1, ("etc/passwd", "etc/new.conf", "opt/app", "opt/app/conf2",
                          "home/user", "home/user/.profile", "link", "data", "data/x",
                          "cache"))
    return [l1, l2], upper


KNOWN_DIFF = """\
C /bin
C /bin/sh
C /cache
C /data
A /data/x
C /etc
D /etc/group
C /etc/motd
A /etc/new.conf
C /etc/passwd
C /home
A /home/user
A /home/user/.profile
C /lib
C /lib/liba.so
C /lib/liba.so.1
A /link
C /opt
C /opt/app
D /opt/app/conf
A /opt/app/conf2
D /opt/app/data
C /srv
C /usr
C /usr/share
C /usr/share/doc
D /usr/share/doc/b.txt
"""


def _layers(lowers: list[Path]) -> str:
    return ":".join(map(str, lowers))


def test_diff_on_a_known_upper(tmp_path: Path) -> None:
    lowers, upper = known_diff_stack(tmp_path)
    assert ok(tool("diff", _layers(lowers), "--upper", upper)).decode() == KNOWN_DIFF


def test_diff_of_an_untouched_upper_is_empty(tmp_path: Path) -> None:
    lowers, _ = known_diff_stack(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert ok(tool("diff", _layers(lowers), "--upper", empty)) == b""


def test_diff_of_names_that_are_not_utf8(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {"d/x": "x"})
    upper = build(tmp_path / "u", {"d": DIR})
    set_times(lower, T0)
    set_times(upper, T0)
    (tmp_path / "u/d").joinpath(os.fsdecode(b"caf\xe9")).write_text("new")
    os.utime(upper / "d", ns=(T0, T0))
    assert ok(tool("diff", lower, "--upper", upper)) == b"C /d\nA /d/caf\xe9\n"


def test_diff_leaves_out_what_podman_leaves_out(tmp_path: Path) -> None:
    """podman diff drops the paths the runtime makes in every container (exact paths:
    a change below them, and their parents' C lines, stay); --all keeps them."""
    lower = build(tmp_path / "l", {"etc/passwd": "p", "run": DIR})
    upper = build(tmp_path / "u", {"etc/hosts": "h", "etc/hostname": "c", "run/.containerenv": "",
                                   "run/mine": "m", "proc": DIR, "sys": DIR, "dev": DIR})
    set_times(lower, T0)
    set_times(upper, T0)
    layers = [lower, "--upper", upper]
    assert ok(tool("diff", *layers)) == b"C /etc\nA /run/mine\n"
    assert ok(tool("diff", *layers, "--all")).decode().split("\n") == [
        "A /dev", "C /etc", "A /etc/hostname", "A /etc/hosts", "A /proc", "C /run",
        "A /run/.containerenv", "A /run/mine", "A /sys", ""]


def test_diff_usage_errors(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {"x": "x"})
    one_error_line(tool("diff", lower), b"unionmount: diff: ")
    one_error_line(tool("diff", tmp_path / "missing", "--upper", lower),
                   b"unionmount: layer ")
    one_error_line(tool("diff", lower, "--upper", lower / "x"), b"unionmount: upper ")


# =========================================================================== inspect


def known_inspect_stack(tmp: Path) -> tuple[list[Path], Path]:
    l2 = build(tmp / "l2", {
        "a": "a" * 10, "d/x": "x" * 20, "d/y": "y" * 30,
        "h1": "h" * 40, "h2": HardLink("h1"), "gone": "g" * 5,
    })
    l1 = build(tmp / "l1", {"a": "A" * 15, ".wh.gone": "", "n": "n" * 7})
    upper = build(tmp / "upper", {"d": OPAQUE, "d/z": "z" * 8, "a": WHITEOUT, "h1": "H" * 41})
    return [l1, l2], upper


def test_inspect_totals_and_tree(tmp_path: Path) -> None:
    (l1, l2), upper = known_inspect_stack(tmp_path)
    out = ok(tool("inspect", f"{l1}:{l2}", "--upper", upper)).decode()
    assert out == (
        f"dir                 -  upper  /d  opaque  shadows: dir@{l2}\n"
        f"file                8  upper  /d/z\n"
        f"file               41  upper  /h1  shadows: file@{l2}\n"
        f"file               40  {l2}  /h2\n"
        f"file                7  {l1}  /n\n"
        f"\n"
        f"upper: added 1 file (8 bytes), changed 1 file (41 bytes), "
        f"deleted 3 files (65 bytes); 0 bytes wasted\n"
        f"{l1}: added 1 file (7 bytes), changed 1 file (15 bytes), "
        f"deleted 1 file (5 bytes); 15 bytes wasted\n"
        f"{l2}: added 6 files (105 bytes), changed 0 files (0 bytes), "
        f"deleted 0 files (0 bytes); 65 bytes wasted\n"
    )


def test_inspect_json_under_a_path(tmp_path: Path) -> None:
    (l1, l2), upper = known_inspect_stack(tmp_path)
    report = json.loads(ok(tool("inspect", f"{l1}:{l2}", "/d", "--upper", upper, "--json")))
    assert report["path"] == "/d"
    assert [(e["path"], e["type"], e["size"], e["layer"], e["opaque"]) for e in
            report["entries"]] == [("/d", "dir", 0, "upper", True),
                                   ("/d/z", "file", 8, "upper", False)]
    assert report["entries"][0]["shadows"] == [{"layer": str(l2), "kind": "dir"}]
    totals = {t["layer"]: (t["added"], t["changed"], t["deleted"], t["wasted_bytes"])
              for t in report["layers"]}
    nothing = {"files": 0, "bytes": 0}
    assert totals == {
        "upper": ({"files": 1, "bytes": 8}, nothing, {"files": 2, "bytes": 50}, 0),
        str(l1): (nothing, nothing, nothing, 0),
        str(l2): ({"files": 2, "bytes": 50}, nothing, nothing, 50),
    }


def test_inspect_without_upper_and_missing_path(tmp_path: Path) -> None:
    (l1, l2), _ = known_inspect_stack(tmp_path)
    report = json.loads(ok(tool("inspect", f"{l1}:{l2}", "--json")))
    paths = [e["path"] for e in report["entries"]]
    assert paths == ["/a", "/d", "/d/x", "/d/y", "/h1", "/h2", "/n"]
    assert report["entries"][0]["layer"] == str(l1)
    assert report["entries"][0]["shadows"] == [{"layer": str(l2), "kind": "file"}]
    one_error_line(tool("inspect", f"{l1}:{l2}", "/gone"), b"unionmount: inspect: ")


def test_inspect_a_metacopy_file(tmp_path: Path) -> None:
    """An upper file holding only metadata (chmod through the mount): its data is the
    lower one's, which is therefore not wasted, and the upper stores no bytes for it."""
    lower = build(tmp_path / "l", {"f": "data" * 25})
    upper = build(tmp_path / "u", {"f": File(b"", mode=0o600)})
    os.truncate(upper / "f", 100)
    os.setxattr(upper / "f", "trusted.overlay.metacopy", b"")
    report = json.loads(ok(tool("inspect", lower, "--upper", upper, "--json")))
    assert report["entries"][0]["data_layer"] == str(lower)
    up, low = report["layers"]
    assert up["changed"] == {"files": 1, "bytes": 0} and up["wasted_bytes"] == 0
    assert low["wasted_bytes"] == 0


# =========================================================================== export


def export_upper(tmp: Path) -> tuple[Path, Path]:
    """A lower and an upper holding every kind of entry and marker export must write."""
    lower = build(tmp / "lower", {"meta": "lower data", "dir/old": "o", "gone": "g"})
    upper = build(tmp / "upper", {
        "a": File(b"hello", mode=0o640, uid=1000, gid=2000,
                  xattrs={"user.x": b"1", "trusted.unionfs.lower-links": b"1"}),
        "b": HardLink("a"),
        "cap": File(b"#!", mode=0o755),
        "dir": OPAQUE, "dir/f": "f",
        "dir2/.wh..wh..opq": "", "dir2/g": "g",
        "dir3": Xattr({"user.overlay.opaque": b"y"}),
        "gone": WHITEOUT,
        ".wh.gone2": "",
        "sym": Symlink("a"),
        "meta": File(b"", mode=0o600),
    })
    os.setxattr(upper / "cap", "security.capability", CAPABILITY)
    os.mkfifo(upper / "fifo")
    os.mknod(upper / "dev", stat.S_IFCHR | 0o600, os.makedev(1, 3))
    os.truncate(upper / "meta", len("lower data"))
    os.setxattr(upper / "meta", "trusted.overlay.metacopy", b"")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(os.fspath(upper / "sock"))
    os.utime(upper / "a", ns=(T0, T1 + 123))
    return lower, upper


def _members(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data), encoding="utf-8",
                      errors="surrogateescape") as tar:
        return tar.getmembers()


def test_export_entries_markers_and_records(tmp_path: Path) -> None:
    lower, upper = export_upper(tmp_path)
    out = tmp_path / "layer.tar"
    r = tool("export", lower, "--upper", upper, "-o", out)
    diff_id = ok(r).strip()
    assert r.stderr == b"unionmount: warning: sock: a socket, not exported\n"
    data = out.read_bytes()
    assert diff_id == b"sha256:" + hashlib.sha256(data).hexdigest().encode()
    members = _members(data)
    assert [(m.name, m.type) for m in members] == [
        (".wh.gone", tarfile.REGTYPE), (".wh.gone2", tarfile.REGTYPE),
        ("a", tarfile.REGTYPE), ("b", tarfile.LNKTYPE), ("cap", tarfile.REGTYPE),
        ("dev", tarfile.CHRTYPE),
        ("dir", tarfile.DIRTYPE), ("dir/.wh..wh..opq", tarfile.REGTYPE),
        ("dir/f", tarfile.REGTYPE),
        ("dir2", tarfile.DIRTYPE), ("dir2/.wh..wh..opq", tarfile.REGTYPE),
        ("dir2/g", tarfile.REGTYPE),
        ("dir3", tarfile.DIRTYPE), ("dir3/.wh..wh..opq", tarfile.REGTYPE),
        ("fifo", tarfile.FIFOTYPE), ("meta", tarfile.REGTYPE), ("sym", tarfile.SYMTYPE),
    ]
    by_name = {m.name: m for m in members}
    a = by_name["a"]
    assert (a.uid, a.gid, a.uname, a.gname, a.mode, a.size) == (1000, 2000, "", "", 0o640, 5)
    assert a.pax_headers == {"mtime": "1700000000.500000123", "SCHILY.xattr.user.x": "1"}
    assert by_name["b"].linkname == "a"
    cap = by_name["cap"].pax_headers["SCHILY.xattr.security.capability"]
    assert cap.encode("utf-8", "surrogateescape") == CAPABILITY
    for name in ("dir", "dir2", "dir3", "meta"):
        assert not any("overlay" in key for key in by_name[name].pax_headers), name
    assert (by_name["dev"].devmajor, by_name["dev"].devminor) == (1, 3)
    assert by_name["sym"].linkname == "a"
    assert all(m.size == 0 for m in members if ".wh." in m.name)
    with tarfile.open(out) as tar:
        meta = tar.extractfile("meta")
        assert meta is not None and meta.read() == b"lower data"
    assert b"hdrcharset" not in data  # raw PAX values, as GNU tar and Go write them
    listing = subprocess.run(["tar", "--xattrs", "-tvf", out], capture_output=True, check=False)
    assert listing.returncode == 0 and listing.stderr == b""


def test_export_is_deterministic(tmp_path: Path) -> None:
    lower, upper = export_upper(tmp_path)
    outputs = {}
    for name in ("one.tar", "two.tar", "one.tar.gz", "two.tar.gz"):
        out = tmp_path / name
        outputs[name] = (ok(tool("export", lower, "--upper", upper, "-o", out)).strip(),
                         out.read_bytes())
    assert outputs["one.tar"] == outputs["two.tar"]
    assert outputs["one.tar.gz"] == outputs["two.tar.gz"]
    # The diff_id is that of the uncompressed tar.
    assert outputs["one.tar.gz"][0] == outputs["one.tar"][0]
    assert gzip.decompress(outputs["one.tar.gz"][1]) == outputs["one.tar"][1]
    piped = tool("export", lower, "--upper", upper, "-o", "-")
    assert ok(piped) == outputs["one.tar"][1]
    assert piped.stderr.splitlines()[-1] == outputs["one.tar"][0]


def test_export_shows_progress_on_a_terminal(tmp_path: Path) -> None:
    """A progress bar on stderr for a large layer, only when stderr is a terminal."""
    lower = build(tmp_path / "l", {"x": "x"})
    upper = build(tmp_path / "u", {})
    with open(upper / "big", "wb") as f:
        f.truncate(80 << 20)  # sparse: quick to read
    primary, secondary = pty.openpty()
    try:
        r = subprocess.run([sys.executable, "-m", "unionfs", "export", lower, "--upper", upper,
                            "-o", tmp_path / "layer.tar"], stderr=secondary,
                           stdout=subprocess.PIPE, timeout=300, check=False)
        os.close(secondary)
        seen = b""
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the other side is closed
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(primary)
    assert r.returncode == 0
    assert b"exporting [" in seen and b"100% 80/80 MiB" in seen
    quiet = tool("export", lower, "--upper", upper, "-o", tmp_path / "again.tar")
    assert ok(quiet) == r.stdout and quiet.stderr == b""


def test_export_refuses_a_missing_upper_and_leaves_no_file(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {"x": "x"})
    one_error_line(tool("export", lower, "-o", tmp_path / "x.tar"), b"unionmount: export: ")
    one_error_line(tool("export", lower, "--upper", tmp_path / "nope", "-o",
                        tmp_path / "x.tar"), b"unionmount: upper ")
    assert sorted(os.listdir(tmp_path)) == ["l"]
    one_error_line(tool("export", lower, "--upper", lower, "-o", tmp_path / "no/such/dir.tar"),
                   b"unionmount: export: ")
    assert sorted(os.listdir(tmp_path)) == ["l"]


# =========================================================================== import


def make_tar(entries: list[tuple[tarfile.TarInfo, bytes | None]], compress: bool = False
             ) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz" if compress else "w",
                      format=tarfile.PAX_FORMAT, encoding="utf-8",
                      errors="surrogateescape") as tar:
        for info, data in entries:
            if data is not None:
                info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name: str, kind: bytes = tarfile.REGTYPE, data: bytes | None = None, *,
          mode: int = 0o644, link: str = "", uid: int = 0, gid: int = 0, mtime: int = 1000,
          pax: dict[str, str] | None = None, dev: tuple[int, int] = (0, 0)
          ) -> tuple[tarfile.TarInfo, bytes | None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode, info.uid, info.gid, info.mtime = mode, uid, gid, mtime
    info.linkname = link
    info.devmajor, info.devminor = dev
    info.pax_headers = pax or {}
    return info, (data if data is not None else (b"" if kind == tarfile.REGTYPE else None))


def test_import_restores_metadata(tmp_path: Path) -> None:
    archive = tmp_path / "layer.tar.gz"
    archive.write_bytes(make_tar([
        entry("./", tarfile.DIRTYPE, mode=0o755, mtime=5),
        entry("d/", tarfile.DIRTYPE, mode=0o705, uid=7, gid=8,
              pax={"mtime": "1700000000.500000123", "SCHILY.xattr.user.dir": "yes"}),
        entry("d/f", data=b"content", mode=0o4750, uid=1000, gid=2000,
              pax={"mtime": "-1.25", "SCHILY.xattr.user.bin": b"\xff\x00".decode(
                  "utf-8", "surrogateescape"),
                   "SCHILY.xattr.trusted.overlay.opaque": "y",
                   "LIBARCHIVE.xattr.user.la%3Dx": "dmFsdWU="}),
        entry("d/hard", tarfile.LNKTYPE, link="d/f", mode=0o777),
        entry("d/sym", tarfile.SYMTYPE, link="/absolute/is/fine", uid=3, gid=4,
              pax={"mtime": "12.000000007"}),
        entry("fifo", tarfile.FIFOTYPE, mode=0o640),
        entry("null", tarfile.CHRTYPE, mode=0o666, dev=(1, 3)),
        entry(os.fsdecode(b"caf\xe9"), data=b"x"),
        entry("implicit/parent/file", data=b"p"),
    ], compress=True))
    dest = tmp_path / "dest"
    r = tool("import", archive, dest)
    ok(r)
    assert b"bookkeeping xattrs" in r.stderr  # trusted.overlay.* is never imported
    f = os.lstat(dest / "d/f")
    assert (stat.S_IMODE(f.st_mode), f.st_uid, f.st_gid, f.st_mtime_ns) == (
        0o4750, 1000, 2000, -1_250_000_000)
    assert f.st_nlink == 2 and os.lstat(dest / "d/hard").st_ino == f.st_ino
    assert (dest / "d/f").read_bytes() == b"content"
    assert os.getxattr(dest / "d/f", "user.bin") == b"\xff\x00"
    assert os.getxattr(dest / "d/f", "user.la=x") == b"value"
    assert "trusted.overlay.opaque" not in os.listxattr(dest / "d/f")
    d = os.lstat(dest / "d")
    assert (stat.S_IMODE(d.st_mode), d.st_uid, d.st_gid, d.st_mtime_ns) == (
        0o705, 7, 8, 1_700_000_000_500_000_123)
    assert os.getxattr(dest / "d", "user.dir") == b"yes"
    s = os.lstat(dest / "d/sym")
    assert (os.readlink(dest / "d/sym"), s.st_uid, s.st_gid, s.st_mtime_ns) == (
        "/absolute/is/fine", 3, 4, 12_000_000_007)
    assert stat.S_ISFIFO(os.lstat(dest / "fifo").st_mode)
    assert os.lstat(dest / "null").st_rdev == os.makedev(1, 3)
    assert os.path.exists(os.path.join(os.fsencode(dest), b"caf\xe9"))
    assert (dest / "implicit/parent/file").read_bytes() == b"p"
    assert os.lstat(dest).st_mtime_ns == 5 * 10**9


def test_import_keeps_or_converts_markers(tmp_path: Path) -> None:
    layer = make_tar([
        entry("a/", tarfile.DIRTYPE),
        entry("a/.wh..wh..opq"),
        entry("a/kept", data=b"k"),
        entry("a/.wh.gone"),
        entry(".wh.redone"),
        entry("redone/", tarfile.DIRTYPE),
        entry("redone/new", data=b"n"),
        entry("b/.wh.file"),
        entry("x/.wh..wh.plnk/", tarfile.DIRTYPE),  # aufs bookkeeping: skipped
    ])
    archive = tmp_path / "layer.tar"
    archive.write_bytes(layer)
    oci = tmp_path / "oci"
    ok(tool("import", archive, oci))
    assert sorted(str(p.relative_to(oci)) for p in oci.rglob("*")) == [
        ".wh.redone", "a", "a/.wh..wh..opq", "a/.wh.gone", "a/kept", "b", "b/.wh.file",
        "redone", "redone/new"]
    kernel = tmp_path / "kernel"
    ok(tool("import", archive, kernel, "--format", "overlay"))
    assert sorted(str(p.relative_to(kernel)) for p in kernel.rglob("*")) == [
        "a", "a/gone", "a/kept", "b", "b/file", "redone", "redone/new"]
    for path in ("a/gone", "b/file"):
        st = os.lstat(kernel / path)
        assert stat.S_ISCHR(st.st_mode) and st.st_rdev == 0
    # A directory deleted and made again in one layer is an opaque directory.
    for path in ("a", "redone"):
        assert os.getxattr(kernel / path, "trusted.overlay.opaque") == b"y"


def test_import_refuses_a_non_empty_destination(tmp_path: Path) -> None:
    archive = tmp_path / "layer.tar"
    archive.write_bytes(make_tar([entry("f", data=b"f")]))
    dest = build(tmp_path / "dest", {"mine": "mine"})
    one_error_line(tool("import", archive, dest), b"unionmount: import: ")
    assert sorted(os.listdir(dest)) == ["mine"]


def test_import_of_garbage_is_one_error(tmp_path: Path) -> None:
    archive = tmp_path / "layer.tar"
    archive.write_bytes(b"this is not a tar file at all" * 100)
    one_error_line(tool("import", archive, tmp_path / "dest"), b"unionmount: import: ")
    truncated = tmp_path / "short.tar"
    truncated.write_bytes(make_tar([entry("f", data=b"x" * 100_000)])[:20_000])
    one_error_line(tool("import", truncated, tmp_path / "dest"), b"unionmount: import: ")
    assert sorted(os.listdir(tmp_path)) == ["layer.tar", "short.tar"]


def test_import_refuses_device_nodes_unless_allowed(tmp_path: Path) -> None:
    layer = make_tar([entry("f", data=b"f"), entry("null", tarfile.CHRTYPE, dev=(1, 3))])
    dest = tmp_path / "dest"
    with pytest.raises(LayerError, match="device node"):
        ociimport.import_layer(io.BytesIO(layer), os.fspath(dest), allow_devices=False)
    assert not dest.exists()


# --------------------------------------------------------------------------- hostile


OUTSIDE = "outside"  # a directory beside the destination, with a sentinel


def _hostile(outside: Path) -> dict[str, list[tuple[tarfile.TarInfo, bytes | None]]]:
    out = os.fspath(outside)
    return {
        "absolute": [entry(f"{out}/evil", data=b"evil")],
        "dotdot": [entry("../outside/evil", data=b"evil")],
        "dotdot-inside": [entry("a/", tarfile.DIRTYPE), entry("a/../../outside/evil",
                                                              data=b"evil")],
        "symlink-dir": [entry("link", tarfile.SYMTYPE, link=out),
                        entry("link/evil", data=b"evil")],
        "symlink-dotdot": [entry("up", tarfile.SYMTYPE, link=".."),
                           entry("up/outside/evil", data=b"evil")],
        "symlink-replaces-dir": [entry("d/", tarfile.DIRTYPE), entry("d/ok", data=b"ok"),
                                 entry("d", tarfile.SYMTYPE, link=out),
                                 entry("d/evil", data=b"evil")],
        "hardlink-absolute": [entry("h", tarfile.LNKTYPE, link=f"{out}/sentinel")],
        "hardlink-dotdot": [entry("h", tarfile.LNKTYPE, link="../outside/sentinel")],
        "hardlink-not-in-archive": [entry("h", tarfile.LNKTYPE, link="sentinel")],
        "hardlink-through-symlink": [entry("s", tarfile.SYMTYPE, link=out),
                                     entry("h", tarfile.LNKTYPE, link="s/sentinel")],
        "hardlink-to-dir": [entry("d/", tarfile.DIRTYPE), entry("h", tarfile.LNKTYPE,
                                                                link="d")],
        "marker-through-symlink": [entry("link", tarfile.SYMTYPE, link=out),
                                   entry("link/.wh.sentinel")],
        "bad-whiteout": [entry(".wh..")],
        "file-as-parent": [entry("f", data=b"f"), entry("f/evil", data=b"evil")],
    }


def _state(path: Path) -> object:
    return snapshot(path, times=True), sorted(os.listdir(path))


@pytest.mark.parametrize("case", sorted(_hostile(Path("/x"))))
@pytest.mark.parametrize("fmt", ["oci", "overlay"])
def test_import_refuses_hostile_archives(tmp_path: Path, case: str, fmt: str) -> None:
    work = tmp_path / "work"
    outside = build(work / OUTSIDE, {"sentinel": "secret", "sub/deep": "deep"})
    archive = tmp_path / "layer.tar"
    archive.write_bytes(make_tar(_hostile(outside)[case]))
    before = _state(work), _state(outside)

    for dest in (work / "new", work / "empty"):
        existed = dest.name == "empty"
        if existed:
            dest.mkdir()
            before = _state(work), _state(outside)
        r = tool("import", archive, dest, "--format", fmt)
        one_error_line(r, b"unionmount: import: refused: ")
        assert (_state(work), _state(outside)) == before, f"{case}: something was written"
        assert dest.exists() == existed and (not existed or os.listdir(dest) == [])


def test_a_directory_replaces_an_earlier_symlink(tmp_path: Path) -> None:
    """A later entry replaces an earlier one of the same name, a symlink included: the
    directory is made in its place, never through it."""
    outside = build(tmp_path / OUTSIDE, {"sentinel": "secret"})
    before = _state(outside)
    archive = tmp_path / "layer.tar"
    archive.write_bytes(make_tar([entry("link", tarfile.SYMTYPE, link=os.fspath(outside)),
                                  entry("link/", tarfile.DIRTYPE, mode=0o777),
                                  entry("link/inside", data=b"in")]))
    dest = tmp_path / "dest"
    ok(tool("import", archive, dest))
    assert stat.S_ISDIR(os.lstat(dest / "link").st_mode)
    assert (dest / "link/inside").read_bytes() == b"in"
    assert _state(outside) == before


def test_hostile_names_reach_the_tarfile(tmp_path: Path) -> None:
    """The hostile archives really hold what the cases say (tarfile keeps the names)."""
    outside = tmp_path / OUTSIDE
    for case, entries in _hostile(outside).items():
        names = [m.name for m in _members(make_tar(entries))]
        assert names == [info.name.rstrip("/") if info.isdir() else info.name
                         for info, _ in entries], case


def test_import_from_stdin(tmp_path: Path) -> None:
    layer = make_tar([entry("f", data=b"from stdin")], compress=True)
    ok(tool("import", "-", tmp_path / "dest", stdin=layer))
    assert (tmp_path / "dest/f").read_bytes() == b"from stdin"


def test_export_then_import_gives_the_same_upper(tmp_path: Path) -> None:
    """Without mounting: the imported layer holds the upper's entries, with OCI markers
    in place of the kernel ones (the round trip through a mount is test_roundtrip)."""
    lower, upper = export_upper(tmp_path)
    os.unlink(upper / "sock")
    out = tmp_path / "layer.tar"
    ok(tool("export", lower, "--upper", upper, "-o", out))
    dest = tmp_path / "dest"
    ok(tool("import", out, dest))
    got = snapshot(dest, times=True)
    assert set(got.nodes) == {".wh.gone", ".wh.gone2", "a", "b", "cap", "dev", "dir",
                              "dir/.wh..wh..opq", "dir/f", "dir2", "dir2/.wh..wh..opq",
                              "dir2/g", "dir3", "dir3/.wh..wh..opq", "fifo", "meta", "sym"}
    want = snapshot(upper, times=True)
    for name in ("a", "b", "cap", "dev", "dir/f", "dir2/g", "fifo", "sym"):
        assert got.nodes[name] == want.nodes[name], name
    assert got.links == frozenset({frozenset({"a", "b"})})
    assert (dest / "meta").read_bytes() == b"lower data"
    assert os.getxattr(dest / "cap", "security.capability") == CAPABILITY

