"""The fuse-overlayfs-compatible interface: what container runtimes pass in -o.

Parsing is checked without mounting; the id mappings and the read-only
lowerdir-only form are checked on real mounts.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

import pytest
from mounts import File, build, is_mounted, server_pids, unionmount, wait_until

from unionfs.cli import parse_config, split_options
from unionfs.config import ConfigError
from unionfs.idmap import IdMap, IdRange, parse_ranges

pytestmark = pytest.mark.usefixtures("mount_guard")


def test_split_options_keeps_quoted_commas_and_drops_empty_items() -> None:
    assert split_options('a=1,,context="x,y",b') == ["a=1", 'context="x,y"', "b"]


def test_runtime_options_are_understood() -> None:
    config, _ = parse_config([
        "-o", ("lowerdir=/l1:/l2,,upperdir=/u,workdir=/w,volatile,context=\"a,b\","
              "xattr_permissions=2"), "/mnt"])
    assert config.lowers == ("/l1", "/l2")
    assert (config.upper, config.workdir, config.mountpoint) == ("/u", "/w", "/mnt")
    assert config.fsync is False
    config, _ = parse_config(["overlay", "/mnt", "-o", "lowerdir=/l1,fsync=0,metacopy=off"])
    assert config.upper is None and config.lowers == ("/l1",) and config.mountpoint == "/mnt"
    assert config.fsync is False and config.metacopy is False


def test_unknown_option_is_a_warning(capsys: pytest.CaptureFixture[str]) -> None:
    config, _ = parse_config(["-o", "lowerdir=/l,frobnicate=3", "/mnt"])
    assert config.lowers == ("/l",)
    assert "unknown option 'frobnicate=3'" in capsys.readouterr().err


def test_id_mapping_options() -> None:
    assert parse_ranges(":0:1000:1:1:110000:65536") == (
        IdRange(0, 1000, 1), IdRange(1, 110000, 65536))
    config, _ = parse_config(["-o", ("lowerdir=/l,uidmapping=0:1000:1:1:110000:65536,"
                              "gidmapping=0:2000:10,squash_to_gid=7"), "/mnt"])
    assert config.uid_map.to_mount(0) == 1000 and config.uid_map.to_mount(5) == 110004
    assert config.uid_map.to_mount(70000) == 65534  # unmapped: the overflow id
    assert config.uid_map.to_disk(110004) == 5
    assert config.gid_map.to_mount(3) == 7  # squashed
    config, _ = parse_config(["-o", "lowerdir=/l,squash_to_root", "/mnt"])
    assert config.uid_map == IdMap((), 0) and config.gid_map == IdMap((), 0)
    for bad in ("uidmapping=0:1", "uidmapping=a:b:c", "uidmapping=0:1:0", "squash_to_uid=x"):
        with pytest.raises(ConfigError):
            parse_config(["-o", f"lowerdir=/l,{bad}", "/mnt"])


def test_bad_mapping_is_one_line_and_nothing_mounted(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {"f": "x"})
    (tmp_path / "mnt").mkdir()
    r = unionmount("-o", f"lowerdir={lower},uidmapping=0:1", tmp_path / "mnt")
    assert r.returncode != 0
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("unionmount: "), r.stderr
    assert not is_mounted(tmp_path / "mnt")


def _mount(tmp_path: Path, opts: str) -> Path:
    mnt = tmp_path / "mnt"
    mnt.mkdir(exist_ok=True)
    r = unionmount("-o", opts, "--log", tmp_path / "log", mnt)
    assert r.returncode == 0, r.stderr
    assert is_mounted(mnt)
    return mnt


def _unmount(mnt: Path) -> None:
    pids = server_pids(mnt)
    subprocess.run(["fusermount3", "-u", str(mnt)], check=True, timeout=30)
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in pids), 10)


def test_uid_and_gid_mapping_on_a_mount(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {
        "root-owned": File(b"a", uid=0, gid=0),
        "one": File(b"b", uid=1, gid=1),
        "far": File(b"c", uid=70000, gid=70000),
    })
    upper, work = tmp_path / "u", tmp_path / "w"
    upper.mkdir()
    mnt = _mount(tmp_path, f"lowerdir={lower},upperdir={upper},workdir={work},"
                           "uidmapping=:0:1000:1:1:110000:65536,gidmapping=0:1000:1:1:110000:65536")
    try:
        owners = {n: (os.lstat(mnt / n).st_uid, os.lstat(mnt / n).st_gid)
                  for n in ("root-owned", "one", "far")}
        assert owners == {"root-owned": (1000, 1000), "one": (110000, 110000),
                          "far": (65534, 65534)}
        assert (os.lstat(mnt).st_uid, os.lstat(mnt).st_gid) == (1000, 1000)
        # What the mount is told is stored as the layers' own ids.
        os.chown(mnt / "one", 110005, 1000)
        assert (os.lstat(mnt / "one").st_uid, os.lstat(mnt / "one").st_gid) == (110005, 1000)
        assert (os.lstat(upper / "one").st_uid, os.lstat(upper / "one").st_gid) == (6, 0)
        # A new file belongs to its creator, root here: mapped, 0 on disk is shown as 1000.
        (mnt / "new").write_text("n")
        assert os.lstat(upper / "new").st_uid == 0
        assert os.lstat(mnt / "new").st_uid == 1000
    finally:
        _unmount(mnt)


def _acl(path: Path) -> list[str]:
    r = subprocess.run(["getfacl", "-cn", str(path)], capture_output=True, text=True, check=True)
    return [line for line in r.stdout.splitlines() if line.startswith(("user:", "group:"))]


def test_ids_inside_acls_are_mapped_too(tmp_path: Path) -> None:
    """uidmapping=/gidmapping= translate the named users and groups of POSIX ACLs both
    ways, as they translate owners."""
    lower = build(tmp_path / "l", {"f": File(b"a", uid=1, gid=1)})
    subprocess.run(["setfacl", "-m", "u:5:rw,g:7:r", str(lower / "f")], check=True)
    upper, work = tmp_path / "u", tmp_path / "w"
    upper.mkdir()
    mnt = _mount(tmp_path, f"lowerdir={lower},upperdir={upper},workdir={work},"
                           "uidmapping=0:100000:65536,gidmapping=0:200000:65536")
    try:
        shown = _acl(mnt / "f")
        assert "user:100005:rw-" in shown and "group:200007:r--" in shown, shown
        subprocess.run(["setfacl", "-m", "u:100009:r", str(mnt / "f")], check=True)
        assert "user:100009:r--" in _acl(mnt / "f")
    finally:
        _unmount(mnt)
    stored = _acl(upper / "f")
    assert "user:5:rw-" in stored and "user:9:r--" in stored and "group:7:r--" in stored, stored


def test_lowerdir_alone_is_read_only_with_one_layer(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {"f": "x", "d/g": "y"})
    link = tmp_path / "link-to-l"
    link.symlink_to(lower)  # runtimes pass l/ID -> ../ID/diff symlinks
    mnt = _mount(tmp_path, f"lowerdir={link}")
    try:
        assert (mnt / "d" / "g").read_text() == "y"
        for action in (lambda: (mnt / "new").write_text("n"), lambda: os.unlink(mnt / "f"),
                       lambda: os.chmod(mnt / "f", 0o600), lambda: os.mkdir(mnt / "x")):
            with pytest.raises(OSError) as raised:
                action()
            assert raised.value.errno == 30  # EROFS
        assert sorted(os.listdir(lower)) == ["d", "f"]
    finally:
        _unmount(mnt)


def test_layers_with_escaped_colons() -> None:
    config, _ = parse_config([r"/l/a\:b:/l/c\\d", "/mnt"])
    assert config.lowers == ("/l/a:b", "/l/c\\d")
    config, _ = parse_config(["-o", r"lowerdir=/l/a\:b:/l/c,upperdir=/u", "/mnt"])
    assert config.lowers == ("/l/a:b", "/l/c")
    for bad in ("/l/a:", ":/l/a", "/l/a::/l/b"):
        with pytest.raises(ConfigError, match="empty layer"):
            parse_config([bad, "/mnt"])


def test_a_layer_whose_name_holds_a_colon(tmp_path: Path) -> None:
    """Both forms of the command line take ``\\:`` for a colon in a layer's path."""
    top = build(tmp_path / "top:1", {"t": "top"})
    base = build(tmp_path / "ba:se", {"b": "base"})
    escaped = f"{top}:{base}".replace(":1", "\\:1").replace("ba:se", "ba\\:se")
    for n, args in enumerate(([escaped], ["-o", f"lowerdir={escaped}"])):
        mnt = tmp_path / f"mnt{n}"
        mnt.mkdir()
        r = unionmount(*args, "--log", tmp_path / f"log{n}", mnt)
        assert r.returncode == 0, r.stderr
        try:
            assert sorted(os.listdir(mnt)) == ["b", "t"]
            assert (mnt / "t").read_text() == "top"
        finally:
            subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
            wait_until(lambda m=mnt: not server_pids(m))


def test_help_names_every_command() -> None:
    r = unionmount("--help")
    assert r.returncode == 0
    for command in ("inspect", "diff", "export", "import"):
        assert f"unionmount {command} " in r.stdout, command
    assert "\\:" in r.stdout


def test_debug_logs_every_request_with_its_time(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {"f": "data"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    r = unionmount(lower, "--debug", "--log", log, mnt)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "f").read_text() == "data"
        assert not (mnt / "missing").exists()
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        wait_until(lambda: not server_pids(mnt))
    text = log.read_text()
    for pattern in (r"lookup\(1, b'f'\) -> inode \d+ \[\d+\.\d{3} ms\]",
                    r"lookup\(1, b'missing'\) -> inode 0 \[",
                    r"open\(\d+, \d+\) -> fh \d+ \[",
                    r"read\(\d+, 0, \d+\) -> b'data' \["):
        assert re.search(pattern, text), f"{pattern} not in the log:\n{text[-3000:]}"
    assert os.stat(log).st_mode & 0o077 == 0, "the log is private"


def test_request_counts_are_logged_on_sigusr1_and_at_unmount(tmp_path: Path) -> None:
    lower = build(tmp_path / "l", {"f": "data", "g": "g"})
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    log = tmp_path / "log"
    r = unionmount(lower, "--log", log, mnt)
    assert r.returncode == 0, r.stderr
    try:
        assert (mnt / "f").read_text() == "data"
        os.listdir(mnt)
        (pid,) = server_pids(mnt)
        os.kill(pid, signal.SIGUSR1)
        assert wait_until(lambda: "requests: total=" in log.read_text(), 10)
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], check=True)
        wait_until(lambda: not server_pids(mnt))
    lines = [line for line in log.read_text().splitlines() if "requests: total=" in line]
    assert len(lines) == 2, lines
    counts = dict(item.split("=") for item in lines[-1].split("requests: ")[1].split())
    assert int(counts["lookup"]) >= 1 and int(counts["open"]) == 1
    assert int(counts["readdir"]) >= 1
    assert int(counts["total"]) == sum(int(v) for k, v in counts.items() if k != "total")


def test_writeback_cache(tmp_path: Path) -> None:
    """The kernel's writeback cache, on unless -o writeback=0: the kernel caches writes
    and sends them in pages (fewer requests); the data, O_APPEND and a file opened
    write-only stay right."""
    lower = build(tmp_path / "l", {"f": "lower\n"})
    upper, work = tmp_path / "u", tmp_path / "w"
    upper.mkdir()
    counts = {}
    for writeback in ("0", "default"):
        option = ",writeback=0" if writeback == "0" else ""
        mnt = _mount(tmp_path, f"lowerdir={lower},upperdir={upper},workdir={work}{option}")
        try:
            fd = os.open(mnt / f"new{writeback}", os.O_WRONLY | os.O_CREAT, 0o644)
            for i in range(200):
                os.write(fd, b"%03d\n" % i)
            os.close(fd)
            with open(mnt / "f", "a") as f:  # a lower file: copied up, then appended
                f.write("more\n")
        finally:
            _unmount(mnt)
        counts[writeback] = int(re.findall(r"requests: .* write=(\d+)",
                                           (tmp_path / "log").read_text())[-1])
        assert (upper / f"new{writeback}").read_bytes() == b"".join(
            b"%03d\n" % i for i in range(200))
    assert (upper / "f").read_text() == "lower\nmore\nmore\n"
    assert counts["0"] >= 200 and counts["default"] < 20, counts
