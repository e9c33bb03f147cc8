"""The image subcommands: arguments, output and exit codes; the work is done in
`unionfs.images` (resolve, commit, squash), `unionfs.store` and `unionfs.storeinfo`.

    unionmount commit SRC --upper U oci:DIR:TAG [--comment TEXT] [--store DIR]
    unionmount squash SRC oci:DIR:TAG [--store DIR]
    unionmount squash LAYERS layer.tar|layer.tar.gz|-
    unionmount store ls [--json] [--store DIR]
    unionmount store du [--json] [--no-squash] [--store DIR]
    unionmount store gc [--dry-run] [--store DIR]
    unionmount store resolve REF [--store DIR]      the LAYERS argument for mounting REF

SRC is ``oci:DIR[:TAG]`` or ``docker-archive:FILE[:REF]``. Errors are one line on stderr
starting with ``unionmount: ``: exit 2 for a usage mistake or a reference that names
nothing, 1 for a corrupt image or a failed call.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import NoReturn

from unionfs import images, ociexport, storeinfo, tools
from unionfs.config import ConfigError, check_dir, is_reference, parse_layers
from unionfs.layers import open_stack
from unionfs.store import Store, default_path

COMMANDS = ("commit", "squash", "store")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as ConfigError (one line), not an exit."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{self.prog.split(maxsplit=1)[-1]}: {message}")


def main(argv: list[str]) -> int:
    """Run the subcommand ``argv[0]`` with the arguments ``argv[1:]``."""
    if not argv or argv[0] not in COMMANDS:
        print(f"unionmount: unknown command {argv[0] if argv else ''!r}", file=sys.stderr)
        return 2
    command = argv[0]
    commands: dict[str, Callable[[list[str]], int]] = {
        "commit": _commit, "squash": _squash, "store": _store}
    return tools.run(command, lambda: commands[command](argv[1:]))


def _store_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--store", metavar="DIR",
                        help=f"the layer store (default here: {default_path()})")


# --------------------------------------------------------------------------- new images


def _commit(argv: list[str]) -> int:
    parser = _Parser(prog="unionmount commit",
                     description="Write the image SRC with the upper's changes on top as "
                                 "a new image (an OCI layout entry), and print its "
                                 "manifest digest.")
    parser.add_argument("source", metavar="SRC", help="oci:DIR[:TAG] or docker-archive:FILE")
    parser.add_argument("--upper", required=True, help="the container's writable layer")
    parser.add_argument("dest", metavar="oci:DIR:TAG", help="where to write the new image")
    parser.add_argument("--comment", help="the history entry's comment")
    _store_option(parser)
    args = parser.parse_intermixed_args(argv)
    written = images.commit(args.source, args.upper, args.dest, args.store, args.comment)
    print(written.manifest.digest)
    return 0


def _squash(argv: list[str]) -> int:
    parser = _Parser(prog="unionmount squash",
                     description="Write the image SRC as an image of one layer (its merged "
                                 "view, without what higher layers hide), and print its "
                                 "manifest digest.")
    parser.add_argument("source", metavar="SRC",
                        help="oci:DIR[:TAG], docker-archive:FILE, or LAYERS (layer "
                             "directories, top-most first)")
    parser.add_argument("dest", metavar="DEST",
                        help="oci:DIR:TAG for an image; for LAYERS, a layer tar (FILE, "
                             "FILE.gz, or - for stdout)")
    _store_option(parser)
    args = parser.parse_intermixed_args(argv)
    if not is_reference(args.source):
        lowers = parse_layers(args.source)
        for layer in lowers:
            check_dir("layer", layer)
        with open_stack(lowers) as stack:
            return tools.write_layer(stack, args.dest, ociexport.export_merged)
    written = images.squash(args.source, args.dest, args.store)
    print(written.manifest.digest)
    return 0


# --------------------------------------------------------------------------- store


def _store(argv: list[str]) -> int:
    parser = _Parser(prog="unionmount store", description="The layer store.")
    sub = parser.add_subparsers(dest="action", required=True, parser_class=_Parser)
    ls = sub.add_parser("ls", help="the recorded images and the layers")
    ls.add_argument("--json", action="store_true", help="print JSON")
    du = sub.add_parser("du", help="bytes per layer and image, shared bytes, what a squash "
                                   "would save")
    du.add_argument("--json", action="store_true", help="print JSON")
    du.add_argument("--no-squash", action="store_true",
                    help="do not work out what squashing would save (a walk of each image)")
    gc = sub.add_parser("gc", help="remove the layers no recorded image uses")
    gc.add_argument("--dry-run", action="store_true", help="only say what would go")
    res = sub.add_parser("resolve", help="unpack REF's layers; print them as LAYERS")
    res.add_argument("reference", metavar="REF")
    res.add_argument("-v", "--verbose", action="store_true",
                     help="say on stderr which layers had to be unpacked")
    for p in (ls, du, gc, res):
        _store_option(p)
    args = parser.parse_args(argv)
    store = Store(args.store)
    if args.action == "resolve":
        print(images.layers_argument(images.resolve(args.reference, store)))
        for diff_id in store.unpacked if args.verbose else ():
            print(f"unionmount: unpacked {diff_id}", file=sys.stderr)
        return 0
    if args.action == "gc":
        return _gc(store, args.dry_run)
    if args.action == "ls":
        return _ls(store, args.json)
    return _du(store, args.json, not args.no_squash)


def _ls(store: Store, as_json: bool) -> int:
    records = store.records()
    layers = store.layers()
    users: dict[str, list[str]] = {}
    for record in records:
        for diff_id in dict.fromkeys(record.diff_ids):
            users.setdefault(str(diff_id), []).append(record.reference)
    if as_json:
        print(json.dumps({
            "store": store.root,
            "images": [{"reference": r.reference, "config": r.config_digest,
                        "layers": [str(d) for d in r.diff_ids]} for r in records],
            "layers": [{"diff_id": str(layer.diff_id), "path": layer.path,
                        "blob": layer.blob, "entries": layer.entries,
                        "images": users.get(str(layer.diff_id), [])} for layer in layers],
        }, indent=2))
        return 0
    for record in records:
        print(f"image {record.reference}  config {record.config_digest}  "
              f"{len(record.diff_ids)} layers")
    for layer in layers:
        used = users.get(str(layer.diff_id), [])
        print(f"layer {layer.diff_id}  {layer.entries} entries  "
              f"used by: {', '.join(used) if used else 'nothing'}")
    return 0


def _du(store: Store, as_json: bool, squash: bool) -> int:
    use = storeinfo.usage(store, squash)
    if as_json:
        print(json.dumps({
            "store": store.root, "disk": use.disk, "shared": use.shared,
            "layers": [{"diff_id": str(u.layer.diff_id), "files": u.files, "bytes": u.bytes,
                        "disk": u.disk, "images": list(u.images), "in_use": u.in_use}
                       for u in use.layers],
            "images": [{"reference": i.record.reference, "layers": len(i.record.diff_ids),
                        "disk": i.disk, "shared": i.shared,
                        "squash_saves": i.squash_saves if squash else None,
                        "missing": [str(d) for d in i.missing]} for i in use.images],
        }, indent=2))
        return 0
    print(f"{'LAYER':<71} {'FILES':>7} {'BYTES':>12} {'DISK':>12} IMAGES")
    for u in use.layers:
        note = "  (mounted)" if u.in_use else ""
        print(f"{u.layer.diff_id!s:<71} {u.files:>7} {u.bytes:>12} {u.disk:>12} "
              f"{len(u.images)}{note}")
    print(f"total: {len(use.layers)} layers, {use.disk} bytes on disk, {use.shared} of "
          "them in layers several images share (stored once)")
    for i in use.images:
        saves = f", squashing would save {i.squash_saves} bytes" if squash else ""
        missing = f", {len(i.missing)} layers not in the store" if i.missing else ""
        print(f"image {i.record.reference}: {len(i.record.diff_ids)} layers, {i.disk} bytes "
              f"on disk, {i.shared} shared{saves}{missing}")
    return 0


def _gc(store: Store, dry_run: bool) -> int:
    done = storeinfo.collect(store, dry_run)
    verb = "would remove" if dry_run else "removed"
    for reference in done.forgotten:
        print(f"{'would forget' if dry_run else 'forgot'} {reference} (it names another "
              "image now, or nothing)")
    for layer in done.in_use:
        print(f"kept {layer.diff_id} (no image uses it, but a mount has it open)")
    for layer in done.removed:
        print(f"{verb} {layer.diff_id}")
    print(f"{verb} {len(done.removed)} layers, {done.freed} bytes; "
          f"{done.temps} leftover temporary directories removed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
