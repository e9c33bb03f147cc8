"""Counting the FUSE requests a workload sends, by type: scripts/bench --count-requests.

The kernel's tracepoint fuse:fuse_request_send fires once for every request queued to a FUSE
daemon, with the connection (the mount's minor device number) and the opcode. It counts the
same thing for fuse-overlayfs and unionmount, without changing either daemon: fuse-overlayfs
has no request counter (SIGUSR1 prints only its node and inode counts). FORGET and
BATCH_FORGET go through another queue and are not counted.

The events go to a private tracefs instance (its own ring buffer, so nobody else's tracing is
touched), tracefs mounted in the run directory for the run. The buffer (64 MiB per CPU) holds
about 1.8 million events per CPU; a step that sends more loses the oldest, and the table says
how many.

unionmount's own counter (the `requests: total=N ...` line it logs at unmount) is read from
its logs as a cross-check when it is there.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
from pathlib import Path

from bench_core import MountError

EVENT = "events/fuse/fuse_request_send"
BUFFER_KIB = 65536  # per CPU
_LINE = re.compile(rb"fuse_request_send: connection (\d+) req \d+ opcode \d+ \((\w+)\)")
_OWN = re.compile(r"requests: total=(\d+)")

Counts = dict[str, int]  # opcode name (LOOKUP, GETATTR, ...) -> requests


def connection_of(dev: str) -> int:
    """The tracepoint's connection field for a mount's MAJOR:MINOR (a kernel dev_t)."""
    major, minor = (int(x) for x in dev.split(":"))
    return (major << 20) | minor


class RequestTracer:
    """A tracefs instance recording fuse_request_send; start() and stop() around each step."""

    def __init__(self, run_dir: Path) -> None:
        self.mnt = run_dir / "tracefs"
        self.mnt.mkdir()
        done = subprocess.run(["mount", "-t", "tracefs", "nodev", str(self.mnt)], check=False,
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if done.returncode != 0:
            self.mnt.rmdir()
            raise MountError(f"--count-requests: cannot mount tracefs: {done.stderr.strip()}")
        self.inst: Path | None = None
        try:
            if not (self.mnt / EVENT).is_dir():
                raise MountError("--count-requests: this kernel has no fuse:fuse_request_send "
                                 "tracepoint")
            self.inst = self.mnt / "instances" / f"unionfs-bench-{os.getpid()}"
            self.inst.mkdir()
            self._write("buffer_size_kb", str(BUFFER_KIB))
        except BaseException:
            self.close()
            raise

    def _write(self, name: str, value: str) -> None:
        assert self.inst is not None
        with open(self.inst / name, "w") as f:
            f.write(value)

    def start(self) -> None:
        self._write("trace", "")  # empties the buffer and its overrun counts
        self._write(f"{EVENT}/enable", "1")

    def stop(self) -> tuple[dict[int, collections.Counter[str]], int]:
        """Requests per connection and opcode since start(), and how many events were lost."""
        assert self.inst is not None
        self._write(f"{EVENT}/enable", "0")
        per: dict[int, collections.Counter[str]] = {}
        with open(self.inst / "trace", "rb") as f:
            for line in f:
                m = _LINE.search(line)
                if m:
                    op = m.group(2).decode().removeprefix("FUSE_")
                    per.setdefault(int(m.group(1)), collections.Counter())[op] += 1
        lost = 0
        for stats in (self.inst / "per_cpu").glob("cpu*/stats"):
            for line in stats.read_text().splitlines():
                if line.startswith("overrun:"):
                    lost += int(line.split()[1])
        return per, lost

    def close(self) -> None:
        if self.inst is not None and self.inst.exists():
            try:
                self._write(f"{EVENT}/enable", "0")
            finally:
                self.inst.rmdir()
            self.inst = None
        subprocess.run(["umount", str(self.mnt)], check=False, capture_output=True,
                       stdin=subprocess.DEVNULL)
        if self.mnt.exists():
            self.mnt.rmdir()


def own_count(logs: list[Path]) -> int | None:
    """The sum of unionmount's own `requests: total=N` lines in these logs (None: none)."""
    found = None
    for path in logs:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            continue
        for m in _OWN.finditer(text):
            found = (found or 0) + int(m.group(1))
    return found


def recorded_devs(record: Path, offset: int) -> tuple[set[str], int]:
    """MAJOR:MINOR lines the mount-program wrappers appended to record since offset."""
    try:
        with open(record) as f:
            f.seek(offset)
            text = f.read()
            return {w for w in text.split() if re.fullmatch(r"\d+:\d+", w)}, f.tell()
    except FileNotFoundError:
        return set(), offset


def counts_table(rows: list[str], systems: list[str],
                 counts: dict[str, dict[str, list[Counts]]],
                 lost: dict[str, dict[str, int]], own: dict[str, dict[str, list[int]]]) -> str:
    """Per row: the total, then each opcode that is at least 1% of a system's total."""
    fuse = [s for s in systems if s != "kernel"]
    rows = [r for r in rows if any(counts.get(r, {}).get(s) for s in fuse)]
    if not fuse or not rows:
        return ""
    head = "FUSE requests (fuse:fuse_request_send, no FORGET)"
    width = max(len(head), *(len(r) for r in rows)) + 2
    lines = [f"{head:<{width}}" + "".join(f"{s:>16}" for s in fuse)]
    lines.append("-" * len(lines[0]))
    for row in rows:
        picked = {s: _median_run(counts.get(row, {}).get(s, [])) for s in fuse}
        totals = {s: sum(c.values()) if c is not None else None for s, c in picked.items()}
        cells = [f"{totals[s]:,}" if totals[s] is not None else "-" for s in fuse]
        lines.append(f"{row:<{width}}" + "".join(f"{c:>16}" for c in cells))
        ops: collections.Counter[str] = collections.Counter()
        for s, c in picked.items():
            for op, n in (c or {}).items():
                if n * 100 >= (totals[s] or 0):
                    ops[op] = max(ops[op], n)
        for op, _ in ops.most_common():
            cells = [f"{(picked[s] or {}).get(op, 0):,}" if picked[s] is not None else "-"
                     for s in fuse]
            lines.append(f"{'  ' + op:<{width}}" + "".join(f"{c:>16}" for c in cells))
        for s in fuse:
            if lost.get(row, {}).get(s):
                lines.append(f"  ({s}: {lost[row][s]:,} events lost: the counts are short)")
    notes = [f"{key}: {n:,}" for key, per in own.items()
             for s, ns in per.items() if s == "unionmount" and (n := _median_int(ns))]
    if notes:
        lines.append("\nunionmount's own count (its `requests:` log line: whole mounts, with "
                     "setup and unmount), median run:\n  " + "\n  ".join(notes))
    return "\n".join(lines)


def _median_run(runs: list[Counts]) -> Counts | None:
    """The run with the median total (its counts add up, unlike medians per opcode)."""
    if not runs:
        return None
    return sorted(runs, key=lambda c: sum(c.values()))[(len(runs) - 1) // 2]


def _median_int(values: list[int]) -> int | None:
    return sorted(values)[(len(values) - 1) // 2] if values else None
