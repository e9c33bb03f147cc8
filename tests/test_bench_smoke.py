"""scripts/bench still runs: a tiny stack, one repeat, two scenarios, all three systems.

The figures themselves are not checked (this machine is shared and small); what is checked
is that every system mounted and finished every step, that the steps saw the same tree
as the kernel did, and that the bench left no mount behind.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SYSTEMS = ["kernel", "fuse-overlayfs", "unionmount"]


def test_bench_small_run_prints_a_table_for_three_systems(tmp_path: Path) -> None:
    out_json = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            str(REPO / "scripts" / "bench"),
            "--small",
            "--repeat",
            "1",
            "--only",
            "walk",
            "--only",
            "create-delete",
            "--cache",
            str(tmp_path / "cache"),
            "--json",
            str(out_json),
        ],
        check=False,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
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
    ):
        assert any(line.startswith(row) for line in lines), f"no row {row!r}\n{report}"
    assert "results that differ" not in proc.stdout, report

    data = json.loads(out_json.read_text())
    assert data["systems"] == SYSTEMS
    assert len(data["rows"]) == 6
    for row in data["rows"]:
        for system in SYSTEMS:
            result = row["results"][system]
            assert result["error"] is None, f"{row['row']}: {system}: {result['error']}"
            assert result["median"] is not None and result["median"] > 0, (row, system)

    # Everything mounted was unmounted and the run directory removed; the stack stays cached.
    mounts = Path("/proc/mounts").read_text()
    assert str(tmp_path) not in mounts
    left = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(left) == 1 and left[0].startswith("stack-small-"), left
