"""The offline subcommands: arguments, output and exit codes; the work is done in
`unionfs.report` (inspect), `unionfs.diff`, `unionfs.ociexport` and `unionfs.ociimport`.

    unionmount inspect LAYERS [--upper U] [PATH] [--json]
    unionmount diff LAYERS --upper U
    unionmount export LAYERS --upper U -o layer.tar|layer.tar.gz|-
    unionmount import layer.tar|- DIR [--format oci|overlay]

LAYERS is LAYER1:LAYER2:... (top-most first), as for mounting. Errors are one line on
stderr starting with ``unionmount: ``; the exit code is then non-zero.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from typing import BinaryIO, NoReturn, Protocol

from unionfs import diff, ociexport, ociimport, report
from unionfs.config import ConfigError, LayerError, check_dir, parse_layers
from unionfs.layers import Layer, Stack, open_stack
from unionfs.merged import EntryType

#: Below this much file data, export shows no progress bar.
PROGRESS_MIN_BYTES = 64 << 20


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as ConfigError (one line), not an exit."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog.split()[-1]}: {message}")


def main(argv: list[str]) -> int:
    """Run the subcommand ``argv[0]`` with the arguments ``argv[1:]``."""
    command, args = argv[0], argv[1:]
    commands: dict[str, Callable[[list[str]], int]] = {
        "inspect": _inspect, "diff": _diff, "export": _export, "import": _import,
    }
    if command not in commands:
        print(f"unionmount: unknown command {command!r}", file=sys.stderr)
        return 2
    return run(command, lambda: commands[command](args))


def run(command: str, call: Callable[[], int]) -> int:
    """Run one offline command: its errors become one line on stderr and an exit code
    (the boundary of every command that does not mount)."""
    try:
        return call()
    except ConfigError as exc:
        print(f"unionmount: {exc}", file=sys.stderr)
        return exc.exitcode
    except LayerError as exc:
        print(f"unionmount: {command}: {exc}", file=sys.stderr)
        return exc.exitcode
    except BrokenPipeError:
        # The reader went away (``| head``): not an error worth a message.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as exc:
        print(f"unionmount: {command}: {_describe(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except SystemExit as exc:  # --help
        return exc.code if isinstance(exc.code, int) else 0


def _describe(exc: OSError) -> str:
    text = exc.strerror or str(exc)
    if exc.filename is not None:
        name = exc.filename
        text += f": {os.fsdecode(name) if isinstance(name, bytes) else name}"
    return text


# --------------------------------------------------------------------------- arguments


def _layers_argument(parser: argparse.ArgumentParser, upper_required: bool) -> None:
    parser.add_argument("layers", metavar="LAYERS",
                        help="LAYER1:LAYER2:... the lower layers, top-most first")
    parser.add_argument("--upper", required=upper_required, help="the writable layer")


def _open(args: argparse.Namespace) -> Stack:
    lowers = parse_layers(args.layers)
    if not lowers:
        raise ConfigError("no lower layer given")
    for layer in lowers:
        check_dir("layer", layer)
    if args.upper is not None:
        check_dir("upper", args.upper)
    return open_stack(lowers, args.upper)


def _out() -> BinaryIO:
    return sys.stdout.buffer


# --------------------------------------------------------------------------- inspect


def _inspect(argv: list[str]) -> int:
    parser = _Parser(prog="unionmount inspect",
                     description="Show the merged tree under PATH, where each entry comes "
                                 "from and what it hides, and what each layer adds, changes, "
                                 "deletes and wastes.")
    _layers_argument(parser, upper_required=False)
    parser.add_argument("path", nargs="?", default="/", metavar="PATH",
                        help="a path inside the union (default: /)")
    parser.add_argument("--json", action="store_true", help="print JSON")
    args = parser.parse_intermixed_args(argv)
    with _open(args) as stack:
        result = report.inspect(stack, os.fsencode(args.path))
    out = _out()
    if args.json:
        out.write(json.dumps(_report_json(result), indent=2).encode() + b"\n")
    else:
        out.writelines(_report_lines(result))
    out.flush()
    return 0


def _label(layer: Layer) -> bytes:
    return os.fsencode(layer.label)


def _report_lines(result: report.Report) -> Iterator[bytes]:
    for entry in result.entries:
        size = b"-" if entry.kind is EntryType.DIR else b"%d" % entry.size
        notes = b"  opaque" if entry.opaque else b""
        if entry.data_layer is not None:
            notes += b"  data: " + _label(entry.data_layer)
        if entry.merges:
            notes += b"  merges: " + b" ".join(_label(layer) for layer in entry.merges)
        if entry.shadows:
            notes += b"  shadows: " + b" ".join(
                h.kind.value.encode() + b"@" + _label(h.layer) for h in entry.shadows)
        yield b"%-8s %12s  %s  %s%s\n" % (entry.kind.value.encode(), size,
                                         _label(entry.layer),
                                         entry.path, notes)
    if result.entries:
        yield b"\n"
    for t in result.totals:
        yield (b"%s: added %s, changed %s, deleted %s; %d bytes wasted\n"
               % (_label(t.layer), _count(t.added), _count(t.changed), _count(t.deleted),
                  t.wasted))


def _count(count: report.Count) -> bytes:
    files = b"file" if count.files == 1 else b"files"
    return b"%d %s (%d bytes)" % (count.files, files, count.bytes)


def _report_json(result: report.Report) -> dict[str, object]:
    def counts(count: report.Count) -> dict[str, int]:
        return {"files": count.files, "bytes": count.bytes}

    return {
        "path": os.fsdecode(result.path),
        "layers": [{
            "index": t.layer.index,
            "layer": t.layer.label,
            "path": t.layer.path,
            "added": counts(t.added),
            "changed": counts(t.changed),
            "deleted": counts(t.deleted),
            "wasted_bytes": t.wasted,
        } for t in result.totals],
        "entries": [{
            "path": os.fsdecode(e.path),
            "type": e.kind.value,
            "size": e.size,
            "layer": e.layer.label,
            "opaque": e.opaque,
            "data_layer": None if e.data_layer is None else e.data_layer.label,
            "merges": [layer.label for layer in e.merges],
            "shadows": [{"layer": h.layer.label, "kind": h.kind.value} for h in e.shadows],
        } for e in result.entries],
    }


# --------------------------------------------------------------------------- diff


def _diff(argv: list[str]) -> int:
    parser = _Parser(prog="unionmount diff",
                     description="List the upper's changes as A (added), C (changed) and "
                                 "D (deleted) lines, as podman diff prints them.")
    _layers_argument(parser, upper_required=True)
    parser.add_argument("--all", action="store_true",
                        help="also list the paths podman diff leaves out (/dev, /proc, "
                             "/sys, /run, /etc/hosts, /etc/hostname, /etc/resolv.conf, ...)")
    args = parser.parse_args(argv)
    with _open(args) as stack:
        changes = diff.diff(stack, () if args.all else diff.PODMAN_HIDDEN)
    out = _out()
    out.writelines(change.line() + b"\n" for change in changes)
    out.flush()
    return 0


# --------------------------------------------------------------------------- export


def _export(argv: list[str]) -> int:
    parser = _Parser(prog="unionmount export",
                     description="Write the upper as an OCI layer tar and print its diff_id "
                                 "(the sha256 of the uncompressed tar).")
    _layers_argument(parser, upper_required=True)
    parser.add_argument("-o", "--output", required=True, metavar="FILE",
                        help="layer.tar, layer.tar.gz (gzip) or - (a tar on stdout)")
    args = parser.parse_args(argv)
    with _open(args) as stack:
        return write_layer(stack, args.output, ociexport.export_layer)


def write_layer(stack: Stack, output: str, export: Export) -> int:
    """Write a layer of *stack* with *export* to *output* (``-``: stdout), and print its
    diff_id (on stderr when the layer went to stdout). Returns the exit code."""
    if output == "-":
        result = export(stack, _out(), progress=_progress_bar())
        where = sys.stderr
    else:
        result = _export_to_file(stack, output, export)
        where = sys.stdout
    for path in result.skipped:
        print(f"unionmount: warning: {os.fsdecode(path)}: a socket, not exported",
              file=sys.stderr)
    print(result.diff_id, file=where)
    return 0


class Export(Protocol):
    """`ociexport.export_layer` or `ociexport.export_merged`."""

    def __call__(self, stack: Stack, sink: BinaryIO, *, compress: bool = False,
                 progress: ociexport.Progress | None = None) -> ociexport.Exported: ...


def _export_to_file(stack: Stack, output: str, export: Export) -> ociexport.Exported:
    """Export into a temporary file beside *output*, renamed over it once complete."""
    directory = os.path.dirname(os.path.abspath(output))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".unionmount-export-")
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        with open(fd, "wb") as sink:
            compress = output.endswith((".gz", ".tgz"))
            result = export(stack, sink, compress=compress, progress=_progress_bar())
            os.fsync(sink.fileno())
        os.replace(tmp, output)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return result


def _progress_bar() -> ociexport.Progress | None:
    if not sys.stderr.isatty():
        return None
    return _Bar()


class _Bar:
    """A one-line progress bar on stderr, for layers with much file data."""

    WIDTH = 30

    def __init__(self) -> None:
        self.last = 0.0
        self.shown = False

    def __call__(self, done: int, total: int) -> None:
        if total < PROGRESS_MIN_BYTES:
            return
        now = time.monotonic()
        if done < total and now - self.last < 0.1:
            return
        self.last = now
        fill = self.WIDTH * done // total
        sys.stderr.write(f"\rexporting [{'#' * fill}{'.' * (self.WIDTH - fill)}] "
                         f"{100 * done // total:3d}% {done >> 20}/{total >> 20} MiB")
        if done >= total:
            sys.stderr.write("\n")
        sys.stderr.flush()


# --------------------------------------------------------------------------- import


@contextlib.contextmanager
def _archive(path: str) -> Iterator[BinaryIO]:
    """The archive to read (stdin for ``-``); one that cannot be opened is bad input."""
    if path == "-":
        yield sys.stdin.buffer
        return
    try:
        src = open(path, "rb")  # noqa: SIM115 - closed below; the error is ours to word
    except OSError as exc:
        raise ConfigError(f"archive {path}: {exc.strerror}") from None
    with src:
        yield src


def _import(argv: list[str]) -> int:
    parser = _Parser(prog="unionmount import",
                     description="Unpack an OCI layer tar (plain or compressed) into a new "
                                 "or empty layer directory.")
    parser.add_argument("archive", metavar="LAYER.TAR", help="the layer (- for stdin)")
    parser.add_argument("dest", metavar="DIR", help="the layer directory to create or fill")
    parser.add_argument("--format", choices=[f.value for f in ociimport.Format],
                        default=ociimport.Format.OCI.value,
                        help="oci (default): keep the OCI whiteout markers; overlay: the kernel's "
                             "whiteouts and opaque xattrs (needs root)")
    args = parser.parse_args(argv)
    fmt = ociimport.Format(args.format)
    with _archive(args.archive) as src:
        result = ociimport.import_layer(src, args.dest, fmt)
    for warning in result.warnings:
        print(f"unionmount: warning: {warning}", file=sys.stderr)
    return 0
