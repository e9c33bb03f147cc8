"""What scripts/bench measured, and how it prints it: the tables and the JSON file."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Iterator
from pathlib import Path

from bench_trace import Counts


@dataclasses.dataclass
class Result:
    samples: dict[str, dict[str, list[float]]]  # row -> system -> seconds (or the row's unit)
    errors: dict[str, dict[str, str]]  # row -> system -> first error
    checks: dict[str, dict[str, str]]  # row -> system -> value of the step, first run
    rss: dict[str, dict[str, int]]  # scenario -> system -> peak VmHWM in KiB
    units: dict[str, str] = dataclasses.field(default_factory=dict)  # row -> unit, if not "s"
    counts: dict[str, dict[str, list[Counts]]] = dataclasses.field(default_factory=dict)
    lost: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # trace events
    own: dict[str, dict[str, list[int]]] = dataclasses.field(default_factory=dict)  # per scenario


def fmt_time(s: float) -> str:
    if s >= 10:
        return f"{s:.1f} s"
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.3g} ms"
    return f"{s * 1e6:.3g} us"


def fmt_value(value: float, unit: str) -> str:
    return fmt_time(value) if unit == "s" else f"{value:.3g} {unit}"


def slowdown(value: float, ref: float, unit: str) -> float:
    """How many times slower than the kernel: time over the kernel's, or for a throughput the
    kernel's over this one. Above 1 is slower either way."""
    return value / ref if unit == "s" else ref / value


def medians(result: Result, row: str, systems: list[str]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for system in systems:
        samples = result.samples.get(row, {}).get(system)
        failed = system in result.errors.get(row, {})
        out[system] = None if failed or not samples else statistics.median(samples)
    return out


def table(result: Result, rows: list[str], systems: list[str]) -> str:
    width = max(len(r) for r in rows) + 2
    lines = ["".join([f"{'workload':<{width}}"] + [f"{s:>24}" for s in systems])]
    lines.append("-" * len(lines[0]))
    for row in rows:
        med = medians(result, row, systems)
        ref = med.get("kernel")
        unit = result.units.get(row, "s")
        cells = []
        for system in systems:
            value = med[system]
            if value is None:
                cells.append("fail" if system in result.errors.get(row, {}) else "-")
            elif system == "kernel" or not ref or not value:
                cells.append(fmt_value(value, unit))
            else:
                cells.append(f"{fmt_value(value, unit)} (x{slowdown(value, ref, unit):.3g})")
        lines.append(f"{row:<{width}}" + "".join(f"{c:>24}" for c in cells))
    return "\n".join(lines)


def rss_table(result: Result, systems: list[str]) -> str:
    fuse = [s for s in systems if s != "kernel"]
    if not fuse or not result.rss:
        return ""
    head = "daemon peak RSS (VmHWM)"
    width = max(len(head), *(len(k) for k in result.rss)) + 2
    lines = [f"{head:<{width}}" + "".join(f"{s:>18}" for s in fuse)]
    lines.append("-" * len(lines[0]))
    for key, per in result.rss.items():
        cells = [f"{per[s] / 1024:.1f} MiB" if s in per else "-" for s in fuse]
        lines.append(f"{key:<{width}}" + "".join(f"{c:>18}" for c in cells))
    return "\n".join(lines)


def mismatches(result: Result, rows: list[str]) -> Iterator[str]:
    """Steps whose value (file count, bytes read, ...) differs from the kernel's."""
    for row in rows:
        per = result.checks.get(row, {})
        ref = per.get("kernel")
        for system, value in per.items():
            if ref is not None and system != "kernel" and value != ref:
                yield f"{row}: {system} gave {value}, the kernel {ref}"


def write_json(path: Path, meta: dict[str, object], result: Result, rows: list[str],
               systems: list[str]) -> None:
    out = dict(meta)
    out["systems"] = systems
    out["rows"] = [
        {
            "row": row,
            "unit": result.units.get(row, "s"),
            "results": {
                s: {
                    "samples": result.samples.get(row, {}).get(s, []),
                    "median": medians(result, row, systems)[s],
                    "error": result.errors.get(row, {}).get(s),
                    "value": result.checks.get(row, {}).get(s),
                    **({"requests": result.counts[row][s],
                        "requests_lost": result.lost.get(row, {}).get(s, 0)}
                       if s in result.counts.get(row, {}) else {}),
                }
                for s in systems
            },
        }
        for row in rows
    ]
    out["peak_rss_kib"] = result.rss
    out["unionmount_own_request_totals"] = result.own
    path.write_text(json.dumps(out, indent=2) + "\n")
