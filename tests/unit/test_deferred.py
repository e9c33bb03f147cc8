"""unionfs defers the modules that load OpenSSL (unionfs.DEFERRED) until they are used.

Each case runs in a fresh interpreter: this one has imported them already."""

from __future__ import annotations

import subprocess
import sys


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_a_daemons_imports_load_no_openssl() -> None:
    out = _python(
        "import unionfs, sys, trio, pyfuse3\n"
        "import unionfs.cli, unionfs.mount, unionfs.ops, unionfs.oci\n"
        "print(sorted(m for m in ('_ssl', '_hashlib') if m in sys.modules))\n"
        "print(any('libcrypto' in l for l in open('/proc/self/maps')))\n")
    assert out.splitlines() == ["[]", "False"], out


def test_a_deferred_module_works_when_used() -> None:
    """Through the stand-in (an attribute, `from ... import`), then as the real module."""
    out = _python(
        "import unionfs, sys\n"
        "import hashlib, ssl, hmac\n"
        "from hashlib import sha256\n"
        "print(hashlib.sha256(b'x').hexdigest()[:8], sha256(b'x').hexdigest()[:8])\n"
        "print(hmac.new(b'k', b'm', 'sha256').hexdigest()[:8])\n"
        "ctx = ssl.create_default_context()\n"
        "print(type(ctx).__name__, isinstance(ctx, ssl.SSLContext))\n"
        "print(sys.modules['ssl'].__file__.endswith('ssl.py'), '_ssl' in sys.modules)\n")
    assert out.splitlines() == ["2d711642 2d711642", "b60090e3", "SSLContext True",
                                "True True"], out


def test_nothing_is_deferred_that_was_loaded_already() -> None:
    out = _python("import ssl\nimport unionfs, sys\nprint(sys.modules['ssl'] is ssl)\n")
    assert out == "True"
