"""Plain helpers for the integration tests: tools, commands, images, trees.

Nothing here is a fixture; conftest.py wires these into session-scoped
fixtures.  Every external command goes through `run`, which enforces a
timeout on the whole process group so that a hanging podman (for instance
one waiting on a pipe that a mount daemon kept open) fails the test instead
of hanging the suite.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import io
import json
import os
import platform
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[2]


def debian_base() -> ModuleType:
    """scripts/debian_base.py (a Debian minbase and a layer of .debs), loaded once."""
    if "debian_base" in sys.modules:
        return sys.modules["debian_base"]
    path = REPO / "scripts" / "debian_base.py"
    spec = importlib.util.spec_from_file_location("debian_base", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    sys.modules["debian_base"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module

MOUNT_PROGRAM_ENV = "UNIONFS_IT_MOUNT_PROGRAM"

# Each podman/buildah/runc call gets at most this long.
CMD_TIMEOUT = 120


class CommandFailed(AssertionError):
    """A command exited non-zero (when that was not allowed) or timed out."""


@dataclasses.dataclass(frozen=True)
class Result:
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    def describe(self) -> str:
        return (
            f"$ {' '.join(self.argv)}\n-> exit {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


def run(
    argv: Sequence[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = CMD_TIMEOUT,
    check: bool = True,
    input: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
) -> Result:
    """Run argv in its own process group; kill the group when it times out.

    Raises CommandFailed on a timeout, and on a non-zero exit if `check`.
    """
    args = tuple(os.fspath(a) for a in argv)
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env) if env is not None else None,
        cwd=cwd,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input=input, timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_group(proc.pid)
        try:
            out, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            # A grandchild outside the group still holds our pipes.
            proc.kill()
            out, err = "", "(output lost: pipes still held open by another process)"
        res = Result(args, -1, out or "", err or "")
        raise CommandFailed(f"timed out after {timeout}s\n{res.describe()}") from None
    res = Result(args, proc.returncode, out, err)
    if check and res.returncode != 0:
        raise CommandFailed(res.describe())
    return res


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- tools


@dataclasses.dataclass(frozen=True)
class MountProgram:
    """The mount program under test: the unionfs wrapper or another one."""

    path: Path
    is_unionfs: bool

    @property
    def error_prefix(self) -> str:
        """What the program's own error line starts with."""
        return "unionmount: " if self.is_unionfs else f"{self.path.name}: "


def write_unionfs_wrapper(path: Path, log_dir: Path) -> Path:
    """The mount_program podman calls: this interpreter running this checkout.

    PYTHONPATH pins the checkout under test even if the venv's editable
    install points at another clone.  Each daemon logs to its own file in
    log_dir (named after the wrapper's pid), which the tests scan for
    tracebacks.
    """
    log = _sh_quote(str(log_dir)) + "/unionmount-$$.log"
    path.write_text(
        "#!/bin/sh\n"
        f"PYTHONPATH={_sh_quote(str(REPO))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f'exec {_sh_quote(sys.executable)} -m unionfs --log {log} "$@"\n'
    )
    path.chmod(0o755)
    return path


def select_mount_program(bindir: Path, log_dir: Path) -> MountProgram:
    """$UNIONFS_IT_MOUNT_PROGRAM (a path or a name on PATH), else the unionfs wrapper."""
    chosen = os.environ.get(MOUNT_PROGRAM_ENV, "").strip()
    if not chosen:
        wrapper = write_unionfs_wrapper(bindir / "unionmount", log_dir)
        return MountProgram(wrapper, is_unionfs=True)
    found = shutil.which(chosen)
    if found is None:
        raise CommandFailed(f"{MOUNT_PROGRAM_ENV}={chosen!r}: no such program")
    return MountProgram(Path(found).resolve(), is_unionfs=False)


def write_bogus_wrapper(path: Path, real: Path, bogus_lower: str) -> Path:
    """A mount program that puts `bogus_lower` on top of every writable mount's lowers."""
    path.write_text(
        f"#!{sys.executable}\n"
        + textwrap.dedent(
            f"""\
            import os, sys
            real = {str(real)!r}
            args = sys.argv[1:]
            for i, a in enumerate(args[:-1]):
                if a == "-o" and "upperdir=" in args[i + 1]:
                    args[i + 1] = args[i + 1].replace("lowerdir=", "lowerdir=" + {bogus_lower!r} + ":", 1)
            os.execv(real, [real] + args)
            """
        )
    )
    path.chmod(0o755)
    return path


def _sh_quote(s: str) -> str:
    return "'" + s.replace("'", "'\\''") + "'"


# --------------------------------------------------------------------------- mounts


def mounts_under(root: Path) -> list[str]:
    """Mount points at or below root, deepest first (from /proc/self/mountinfo)."""
    prefix = str(root).rstrip("/")
    found = []
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            mnt = line.split()[4].decode().replace("\\040", " ")
            if mnt == prefix or mnt.startswith(prefix + "/"):
                found.append(mnt)
    return sorted(set(found), key=lambda m: m.count("/"), reverse=True)


def unmount_all_under(root: Path) -> list[str]:
    """Unmount everything under root (fusermount3 -u, then a lazy umount)."""
    left = []
    for _ in range(3):
        for mnt in mounts_under(root):
            if run(["fusermount3", "-u", mnt], check=False, timeout=30).returncode != 0:
                run(["umount", "-l", mnt], check=False, timeout=30)
        left = mounts_under(root)
        if not left:
            break
    return left


# --------------------------------------------------------------------------- images


MTIME = 1_600_000_000  # fixed mtimes keep layer digests and stat output stable


@dataclasses.dataclass(frozen=True)
class Entry:
    """One tar member: kind is 'file', 'dir', 'symlink' or 'hardlink'."""

    path: str
    kind: str = "file"
    data: str = ""  # file content, or the link target
    mode: int | None = None
    uid: int = 0
    gid: int = 0


def F(path: str, data: str = "", mode: int = 0o644, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "file", data, mode, uid, gid)


def D(path: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> Entry:
    return Entry(path, "dir", "", mode, uid, gid)


def S(path: str, target: str) -> Entry:
    return Entry(path, "symlink", target, 0o777)


def H(path: str, target: str) -> Entry:
    return Entry(path, "hardlink", target, 0o644)


def busybox_entries() -> list[Entry]:
    """/bin/busybox (static) and a symlink per applet."""
    out = run(["/bin/busybox", "--list"], timeout=30).stdout.split()
    entries = [D("bin"), Entry("bin/busybox", "file", "", 0o755)]
    entries += [S(f"bin/{a}", "busybox") for a in sorted(set(out)) if a != "busybox"]
    return entries


def tar_bytes(entries: Iterable[Entry], mtime: int = MTIME) -> bytes:
    """An uncompressed tar of the entries, parents before children, stable bytes."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for e in entries:
            ti = tarfile.TarInfo(e.path)
            ti.uid, ti.gid, ti.uname, ti.gname = e.uid, e.gid, "", ""
            ti.mtime = mtime
            ti.mode = e.mode if e.mode is not None else 0o644
            payload = None
            if e.kind == "dir":
                ti.type = tarfile.DIRTYPE
            elif e.kind == "symlink":
                ti.type, ti.linkname = tarfile.SYMTYPE, e.data
            elif e.kind == "hardlink":
                ti.type, ti.linkname = tarfile.LNKTYPE, e.data
            elif e.path == "bin/busybox":
                payload = Path("/bin/busybox").read_bytes()
            else:
                payload = e.data.encode()
            if payload is not None:
                ti.size = len(payload)
                tar.addfile(ti, io.BytesIO(payload))
            else:
                tar.addfile(ti)
    return buf.getvalue()


def oci_arch() -> str:
    m = platform.machine()
    return {
        "x86_64": "amd64",
        "aarch64": "arm64",
        "armv7l": "arm",
        "ppc64le": "ppc64le",
        "s390x": "s390x",
        "riscv64": "riscv64",
    }.get(m, m)


def write_oci_layout(root: Path, tag: str, layers: Sequence[bytes]) -> None:
    """An OCI image layout (oci-layout, index.json, blobs) with uncompressed layers."""
    blobs = root / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        (blobs / digest).write_bytes(data)
        return f"sha256:{digest}"

    layer_descs = []
    for data in layers:
        layer_descs.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": put(data),
                "size": len(data),
            }
        )
    config = {
        "architecture": oci_arch(),
        "os": "linux",
        "created": "2020-09-13T12:26:40Z",
        "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [d["digest"] for d in layer_descs]},
        "history": [
            {"created": "2020-09-13T12:26:40Z", "created_by": f"layer {i}"}
            for i in range(len(layers))
        ],
    }
    config_bytes = json.dumps(config, sort_keys=True).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {
            "mediaType": "application/vnd.oci.image.config.v1+json",
            "digest": put(config_bytes),
            "size": len(config_bytes),
        },
        "layers": layer_descs,
    }
    manifest_bytes = json.dumps(manifest, sort_keys=True).encode()
    index = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "digest": put(manifest_bytes),
                "size": len(manifest_bytes),
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (root / "index.json").write_text(json.dumps(index))
    (root / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))


# The three-layer image.  Layer 1 is busybox plus test trees; layers 2 and 3
# delete with `.wh.NAME`, hide with `.wh..wh..opq`, re-add, and swap types.
LAYER1_EXTRA = [
    D("data"),
    F("data/keep.txt", "keep\n"),
    F("data/del.txt", "del\n"),
    F("data/hl1", "hard\n"),
    H("data/hl2", "data/hl1"),
    S("data/link", "keep.txt"),
    D("data/sub"),
    F("data/sub/a.txt", "a\n"),
    D("opq"),
    F("opq/x", "x\n"),
    F("opq/y", "y\n"),
    D("opq/sub"),
    F("opq/sub/z", "z\n"),
    D("wh"),
    F("wh/gone.txt", "gone\n"),
    F("wh/stay.txt", "stay\n"),
    D("wh/gonedir"),
    F("wh/gonedir/f", "f\n"),
    D("rep"),
    F("rep/old1", "old1\n"),
    F("rep/old2", "old2\n"),
    D("rep/deep"),
    F("rep/deep/old3", "old3\n"),
    D("mod"),
    F("mod/file.txt", "v1\n"),
    F("mod/exe.sh", "#!/bin/sh\necho exe\n", 0o755),
    D("swap"),
    D("swap/dir"),
    F("swap/dir/f", "f\n"),
    D("tmp", 0o1777),
    D("empty"),
]
LAYER2 = [
    D("wh"),
    F("wh/.wh.gone.txt"),
    F("wh/.wh.gonedir"),
    D("opq"),
    F("opq/.wh..wh..opq"),
    F("opq/new2", "new2\n"),
    D("mod"),
    F("mod/file.txt", "v2\n", 0o600),
    D("data"),
    F("data/l2.txt", "l2\n"),
    D("l2only"),
    F("l2only/f", "f\n"),
    F("l2only/g", "g\n"),
    D("owned", 0o750, 1000, 1000),
    F("owned/file", "owned\n", 0o640, 1000, 1000),
]
LAYER3 = [
    D("l2only"),
    F("l2only/.wh.f"),
    D("data"),
    F("data/.wh.del.txt"),
    D("data/sub"),
    F("data/sub/.wh..wh..opq"),
    F("data/sub/b.txt", "b\n"),
    D("wh"),
    F("wh/gone.txt", "back\n"),
    D("opq"),
    F("opq/l3", "l3\n"),
    D("mod"),
    D("mod/exe.sh"),
    F("mod/exe.sh/inner", "inner\n"),
    D("swap"),
    F("swap/dir", "now a file\n"),
]


def three_layer_tars() -> list[bytes]:
    return [
        tar_bytes(busybox_entries() + LAYER1_EXTRA, MTIME),
        tar_bytes(LAYER2, MTIME + 1000),
        tar_bytes(LAYER3, MTIME + 2000),
    ]


# --------------------------------------------------------------------------- trees

# A shell function for busybox sh: one 'S|...' line per path (stat) and one
# md5sum line per regular file, for the paths under the given roots.
TREE_SH = (
    "tree() { find \"$@\" -xdev -exec stat -c 'S|%N|%F|%a|%u|%g|%s|%h|%Y' {} + || true; "
    'find "$@" -xdev -type f -exec md5sum {} + || true; }'
)

# Created by podman/runc in every container, not part of any image.
RUNTIME_PATHS = ("/proc", "/sys", "/dev", "/etc", "/run")


def parse_tree(output: str, *, mtimes: bool = True) -> dict[str, str]:
    """TREE_SH output -> {path: description}.

    Directory sizes and link counts are left out: they describe the backing
    filesystem (ext4 block size, subdirectory count of one layer), not the
    union.  So are the root and the paths podman itself creates.
    """
    tree: dict[str, str] = {}
    sums: dict[str, str] = {}
    for line in output.splitlines():
        if line.startswith("S|"):
            _, name, ftype, mode, uid, gid, size, nlink, mtime = line.split("|")
            path, _, target = name.partition(" -> ")
            path = path.strip("'")
            if ftype == "directory":
                size = nlink = "-"
            desc = f"{ftype} {mode} {uid}:{gid} size={size} nlink={nlink}"
            if target:
                desc += f" -> {target.strip(chr(39))}"
            if mtimes:
                # Image files carry the layers' fixed mtimes; anything a
                # container wrote has "now", which differs between two runs.
                desc += f" mtime={mtime if int(mtime) < MTIME + 10**6 else 'recent'}"
            tree[path] = desc
        elif line.strip():
            digest, _, path = line.partition("  ")
            sums[path] = digest
    for path, digest in sums.items():
        if path in tree:
            tree[path] += f" md5={digest}"
    return {
        p: d
        for p, d in tree.items()
        if p != "/" and not any(p == r or p.startswith(r + "/") for r in RUNTIME_PATHS)
    }


def host_tree(root: Path, *, mtimes: bool = True) -> dict[str, str]:
    """lstat + content hash of every path below root, from the host side.

    Directory sizes, link counts and mtimes are left out (see parse_tree).
    """
    tree: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = os.path.join(dirpath, name)
            rel = "/" + os.path.relpath(full, root)
            try:
                st = os.lstat(full)
            except FileNotFoundError:
                tree[rel] = "listed by readdir, but lstat: ENOENT"
                continue
            kind = stat.S_IFMT(st.st_mode)
            desc = f"{kind:o} {stat.S_IMODE(st.st_mode):o} {st.st_uid}:{st.st_gid}"
            if stat.S_ISREG(kind):
                with open(full, "rb") as f:
                    digest = hashlib.md5(f.read()).hexdigest()
                desc += f" size={st.st_size} nlink={st.st_nlink} md5={digest}"
            elif stat.S_ISLNK(kind):
                desc += f" -> {os.readlink(full)}"
            elif stat.S_ISCHR(kind) or stat.S_ISBLK(kind):
                desc += f" rdev={os.major(st.st_rdev)},{os.minor(st.st_rdev)}"
            if mtimes and not stat.S_ISDIR(kind):
                desc += f" mtime={int(st.st_mtime)}"
            tree[rel] = desc
    return tree


def tree_diff(ours: Mapping[str, str], ref: Mapping[str, str]) -> str:
    """A readable listing of where two trees differ ('' when equal)."""
    lines = []
    for p in sorted(set(ours) | set(ref)):
        a, b = ours.get(p), ref.get(p)
        if a != b:
            lines.append(f"{p}\n    union:  {a}\n    kernel: {b}")
    return "\n".join(lines)
