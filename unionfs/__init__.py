"""unionfs: a userspace union filesystem (see README.md)."""

from __future__ import annotations

import sys

__version__ = "0.1.0"


#: Modules that load OpenSSL (libcrypto, libssl: some 5 MiB of every daemon's resident
#: memory) at import: trio imports ssl and hmac for TLS and DTLS, which unionfs never uses,
#: and the image modules hashlib, which a mount of layer directories never calls.
DEFERRED = ("ssl", "hmac", "hashlib")


def _defer(name: str) -> None:
    """Let `import NAME` cost nothing until the module is used: unless it is loaded already,
    NAME is a stand-in that imports the real module, and takes its place, on the first
    attribute anyone reads from it."""
    if name in sys.modules:
        return
    # No search for the module now (importlib.util alone costs the warm server's client,
    # which imports this package and must start fast, 7 ms): one that is missing fails
    # to import on first use instead.
    stand_in = type(sys)(name, f"Stands in for {name} until it is used (unionfs).")

    def __getattr__(attr: str) -> object:
        import importlib  # here: the client of the warm server imports this package

        if sys.modules.get(name) is stand_in:
            del sys.modules[name]
        real = importlib.import_module(name)
        stand_in.__dict__.update(real.__dict__)
        return getattr(real, attr)

    stand_in.__getattr__ = __getattr__  # type: ignore[method-assign]
    sys.modules[name] = stand_in


for _name in DEFERRED:
    _defer(_name)
