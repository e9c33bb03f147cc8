"""idmap.py: id ranges both ways, squashing, and the ids inside POSIX ACL xattrs.
(Parsing through the CLI's -o options is tests/test_options.py.)"""

from __future__ import annotations

import struct

import pytest

from unionfs.idmap import (
    IDENTITY,
    OVERFLOW_ID,
    IdMap,
    IdMapError,
    IdRange,
    parse_ranges,
    translate_acl,
)

UNDEFINED = 0xFFFFFFFF


def _acl(*entries: tuple[int, int, int]) -> bytes:
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


def test_identity() -> None:
    assert IDENTITY.identity and IDENTITY.to_mount(1234) == 1234 and IDENTITY.to_disk(5) == 5
    assert not IdMap((IdRange(0, 1, 1),)).identity and not IdMap((), 0).identity


def test_ranges_both_ways() -> None:
    ids = IdMap((IdRange(0, 100_000, 1000), IdRange(5000, 1, 10)))
    assert [ids.to_mount(i) for i in (0, 999, 1000, 5000, 5009, 5010)] == [
        100_000, 100_999, OVERFLOW_ID, 1, 10, OVERFLOW_ID]
    assert [ids.to_disk(i) for i in (100_000, 100_999, 1, 10, 42_424)] == [
        0, 999, 5000, 5009, 42_424]  # outside every range: stored as itself


def test_squash_shows_one_owner_and_stores_what_is_asked() -> None:
    ids = IdMap((), squash=7)
    assert ids.to_mount(0) == ids.to_mount(1234) == 7
    assert ids.to_disk(1234) == 1234


@pytest.mark.parametrize("text", ["", "0:1", "a:b:c", "0:1:0", "-1:0:1", "0:1:2:3"])
def test_parse_ranges_refuses(text: str) -> None:
    with pytest.raises(IdMapError):
        parse_ranges(text)


def test_parse_ranges() -> None:
    assert parse_ranges("0:1000:1,1:100000:65536") == (
        IdRange(0, 1000, 1), IdRange(1, 100000, 65536))


def test_translate_acl_maps_named_entries_only() -> None:
    value = _acl((0x01, 7, UNDEFINED), (0x02, 5, 10), (0x04, 5, UNDEFINED), (0x08, 4, 20),
                 (0x10, 7, UNDEFINED), (0x20, 0, UNDEFINED))
    mapped = translate_acl(value, lambda u: u + 1000, lambda g: g + 2000)
    assert mapped == _acl((0x01, 7, UNDEFINED), (0x02, 5, 1010), (0x04, 5, UNDEFINED),
                          (0x08, 4, 2020), (0x10, 7, UNDEFINED), (0x20, 0, UNDEFINED))


@pytest.mark.parametrize("value", [b"", b"\x02\x00\x00", struct.pack("<I", 1) + b"\0" * 8,
                                   _acl((0x02, 5, 10)) + b"\0"])
def test_translate_acl_leaves_what_it_cannot_parse(value: bytes) -> None:
    assert translate_acl(value, lambda u: 0, lambda g: 0) == value
