"""A broken layer path: podman fails and shows the mount program's one-line error."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from it_storage import BUSYBOX_IMAGE, Stores
from it_support import F, Result, busybox_entries, mounts_under, tar_bytes, write_bogus_wrapper


def _program_message(res: Result, program: Path) -> str:
    """The mount program's stderr as podman quotes it: 'using mount program P: ...: exit status N'."""
    m = re.search(
        rf"using mount program {re.escape(str(program))}: (.*?): exit status \d+",
        res.stderr,
        re.DOTALL,
    )
    assert m, f"podman does not quote the mount program's error:\n{res.describe()}"
    return m.group(1)


def _check_message(stores: Stores, res: Result, program: Path, bad_path: str) -> None:
    message = _program_message(res, program)
    prefix = stores.program.error_prefix
    ours = [ln for ln in message.splitlines() if ln.startswith(prefix)]
    assert ours, f"no line starting with {prefix!r} in the mount program's message:\n{message}"
    if stores.program.is_unionfs:
        assert message.strip() == ours[0], f"the error should be ONE line:\n{message}"
        assert bad_path in ours[0], f"the error should name {bad_path}:\n{ours[0]}"


@pytest.mark.parametrize("kind", ["missing", "not-a-directory"])
def test_bogus_lowerdir_fails_podman_run(
    stores: Stores, images: dict[str, str], name: str, kind: str
) -> None:
    bogus = stores.root / f"bogus-{kind}"
    if kind == "not-a-directory":
        bogus.write_text("not a layer\n")
    wrapper = write_bogus_wrapper(
        stores.root / "bin" / f"bogus-{kind}", stores.program.path, str(bogus)
    )
    conf = stores.union.write_storage_conf(stores.root / f"storage-bogus-{kind}.conf", wrapper)
    res = stores.union.podman(
        "run",
        "--rm",
        "--pull=never",
        "--name",
        name,
        BUSYBOX_IMAGE,
        "echo",
        "should-not-run",
        check=False,
        storage_conf=conf,
    )
    # podman run answers a failure to start with 126, or with 127 when the
    # message contains "no such file" or "not found" (libpod/define ExitCode),
    # as fuse-overlayfs's "No such file or directory" does.
    expected = (126,) if stores.program.is_unionfs else (126, 127)
    assert res.returncode in expected, res.describe()
    assert "should-not-run" not in res.stdout
    _check_message(stores, res, wrapper, str(bogus))
    assert not [m for m in stores.union.merged_mounts() if m.endswith("/merged")]
    listed = stores.union.podman("ps", "--all", "--format", "{{.Names}}").stdout.split()
    assert name not in listed


def test_renamed_layer_fails_podman_start(
    stores: Stores, images: dict[str, str], name: str
) -> None:
    """The layer's diff dir vanishes after the container was created: start fails, as on the kernel."""
    image = f"localhost/{name}:latest"
    tar = stores.root / f"{name}.tar"  # a layer of its own, shared with no other image
    tar.write_bytes(tar_bytes(busybox_entries() + [F("marker", name)]))
    results = {}
    for st in stores.both():
        st.podman("import", str(tar), image)
        st.podman("create", "--pull=never", "--name", name, image, "echo", "should-not-run")
        try:
            lower = (
                st.podman("inspect", "--format", "{{.GraphDriver.Data.LowerDir}}", name)
                .stdout.strip()
                .split(":")[0]
            )
            assert lower.startswith(str(st.graphroot)), lower
            os.rename(lower, lower + ".moved")
            try:
                results[st.name] = st.podman("start", "--attach", name, check=False)
            finally:
                os.rename(lower + ".moved", lower)
            assert not [m for m in mounts_under(st.graphroot) if m.endswith("/merged")]
            # With the layer back the same container runs.
            assert st.podman("start", "--attach", name).stdout.strip() == "should-not-run"
        finally:
            st.podman("rm", "--force", name, check=False)
            st.podman("rmi", "--force", image, check=False)
    ours, ref = results["union"], results["kernel"]
    assert ref.returncode != 0, ref.describe()
    assert ours.returncode == ref.returncode, f"{ours.describe()}\nkernel:\n{ref.describe()}"
    assert "should-not-run" not in ours.stdout
    _check_message(stores, ours, stores.program.path, "/l/")
