"""The ``unionmount`` program: a mount goes to the warm server (`zygote`) when there is
one, else (and for everything that is not a plain background mount) to `cli.main`.

This module imports next to nothing, so asking the server costs little more than
starting Python.
"""

from __future__ import annotations

import os
import sys

#: Options that make a command line something other than a background mount.
_NOT_A_MOUNT = {"-f", "--foreground", "-h", "--help", "--version"}
#: The other commands (cli.SUBCOMMANDS and cli.IMAGE_COMMANDS, spelt again: importing cli
#: is what we avoid).
_COMMANDS = {"inspect", "diff", "export", "import", "commit", "squash", "store"}


def main() -> int:
    argv = sys.argv[1:]
    if (os.environ.get("UNIONFS_ZYGOTE", "1") != "0" and argv and argv[0] not in _COMMANDS
            and not _NOT_A_MOUNT & set(argv)):
        from unionfs import zygote

        path = zygote.socket_path()
        answer = zygote.request(argv, path)
        if answer is not None:
            status, printed = answer
            sys.stderr.buffer.write(printed)
            return status
        zygote.start(path)
    from unionfs import cli

    return cli.main(argv)
