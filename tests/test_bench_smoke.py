"""scripts/bench still runs: a tiny stack, one repeat, a few scenarios, all three systems.

The figures themselves are not checked (this machine is shared and small); what is checked
is that every system mounted and finished every step, that the steps saw the same tree
as the kernel did, that the FUSE requests were counted, and that the bench left no mount
behind. One real workload (apt-get install in a chroot on a Debian minbase, offline) runs
end to end; its Debian layers are built once (from the network) in REPO/.bench-cache/debian.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ["kernel", "fuse-overlayfs", "unionmount"]
APT_ROW = "apt-get install make (chroot, local .debs)"


def bench(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], str]:
    proc = subprocess.run(
        [str(REPO / "scripts" / "bench"), "--small", "--repeat", "1",
         "--cache", str(tmp_path / "cache"), *args],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=1800,  # the first run on a machine builds the Debian layers
    )
    return proc, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"


def left_behind(tmp_path: Path) -> None:
    """Everything mounted was unmounted and the run directory removed; the stack stays."""
    mounts = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounts
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(left) == 1 and left[0].startswith("stack-small-"), left


def test_bench_small_run_prints_a_table_for_three_systems(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc, report = bench(tmp_path, "--only", "walk", "--only", "create-delete", "--only",
                         "apt-install", "--count-requests", "--json", str(out_json))
    assert proc.returncode == 0, report

    lines = proc.stdout.splitlines()
    header = next((line for line in lines if line.startswith("workload")), "")
    assert header.split()[1:] == SYSTEMS, report
    for row in (
        "mount (3 layers)",
        "walk+lstat whole tree, cold",
        "walk+lstat, warm",
        "create 100 files of 4 KiB",
        "delete those 100 files",
        APT_ROW,
    ):
        assert any(line.startswith(row) for line in lines), f"no row {row!r}\n{report}"
    assert "results that differ" not in proc.stdout, report
    assert "FUSE requests (fuse:fuse_request_send" in proc.stdout, report

    data = json.loads(out_json.read_text())
    assert data["systems"] == SYSTEMS
    assert len(data["rows"]) == 7
    for row in data["rows"]:
        for system in SYSTEMS:
            result = row["results"][system]
            assert result["error"] is None, f"{row['row']}: {system}: {result['error']}"
            assert result["median"] is not None and result["median"] > 0, (row, system)
            # Requests are counted on the two FUSE systems, for every step; not on the kernel.
            if system == "kernel" or row["row"].startswith("mount"):
                assert "requests" not in result, (row["row"], system)
            else:
                assert len(result["requests"]) == 1, (row["row"], system)
                assert sum(result["requests"][0].values()) > 0, (row["row"], system)
    apt = next(row for row in data["rows"] if row["row"] == APT_ROW)
    # apt-get set up the same packages everywhere (make alone, on this minbase), offline.
    assert {apt["results"][s]["value"] for s in SYSTEMS} == {"1"}, apt
    for system in ("fuse-overlayfs", "unionmount"):
        counts = apt["results"][system]["requests"][0]
        assert counts.get("CREATE", 0) > 0 and counts.get("WRITE", 0) > 0, (system, counts)
    left_behind(tmp_path)


def test_bench_userns_runs_the_synthetic_workloads_in_a_user_namespace(tmp_path: Path) -> None:
    systems = SYSTEMS
    proc, report = bench(tmp_path, "--userns", "--only",
                         "walk", "--only", "listdir")
    assert proc.returncode == 0, report
    assert "in a user namespace" in proc.stdout and "userxattr" in proc.stdout, report
    lines = proc.stdout.splitlines()
    header = next((line for line in lines if line.startswith("workload")), "")
    assert header.split()[1:] == systems, report
    for row in ("mount (3 layers)", "walk+lstat whole tree, cold",
                "list merged dir (200 entries), cold"):
        line = next((line for line in lines if line.startswith(row)), "")
        assert line and "fail" not in line, f"{row!r}\n{report}"
    assert "failures" not in proc.stdout and "results that differ" not in proc.stdout, report
    left_behind(tmp_path)
