"""fusecaps: each pyfuse3 feature is recognised by the API its patch adds."""

from __future__ import annotations

import types

import pyfuse3

from unionfs import fusecaps


def _module(file_info: type, operations: type) -> types.ModuleType:
    module = types.ModuleType("fake_pyfuse3")
    module.FileInfo = file_info  # type: ignore[attr-defined]
    module.Operations = operations  # type: ignore[attr-defined]
    return module


def test_a_stock_pyfuse3_has_none() -> None:
    caps = fusecaps.probe(_module(type("FileInfo", (), {"keep_cache": False}),
                                  type("Operations", (), {"enable_acl": False})))
    assert caps == fusecaps.FuseCaps(opendir_file_info=False, dont_mask=False)


def test_each_patch_is_found_by_its_api() -> None:
    caps = fusecaps.probe(_module(type("FileInfo", (), {"cache_readdir": False}),
                                  type("Operations", (), {"enable_dont_mask": False})))
    assert caps == fusecaps.FuseCaps(opendir_file_info=True, dont_mask=True)


def test_opendir_reply_and_describe() -> None:
    reply = fusecaps.opendir_reply(7)
    if fusecaps.CAPS.opendir_file_info:
        assert isinstance(reply, pyfuse3.FileInfo)
        assert (reply.fh, reply.cache_readdir, reply.keep_cache) == (7, True, True)
    else:
        assert reply == 7
    line = fusecaps.describe()
    assert line.startswith(f"pyfuse3 {pyfuse3.__version__} (")
    assert ("opendir_file_info" in line) == fusecaps.CAPS.opendir_file_info
    assert ("dont_mask" in line) == fusecaps.CAPS.dont_mask
