"""layers.py: opening a stack, top-down resolution, holders, merged listings, the dir-fd
cache. The rules are kernel overlayfs's (see the module docstring); find_data has its
own tests in tests/test_metacopy_lower.py.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import stat
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from mounts import DIR, OPAQUE, WHITEOUT, Symlink, build

from unionfs import layers
from unionfs.layers import DirFdCache, Held, Layer, Stack, open_stack
from unit.stacks import open_fds


@pytest.fixture
def stack_of(tmp_path: Path) -> Iterator[object]:
    """Factory: ``stack_of(spec0, spec1, ...)`` opens lowers built from the specs (top
    first); every stack made is closed at teardown."""
    made: list[Stack] = []

    def factory(*specs: dict[str, object]) -> Stack:
        paths = [build(tmp_path / f"l{len(made)}-{i}", spec) for i, spec in enumerate(specs)]
        stack = open_stack([str(p) for p in paths])
        made.append(stack)
        return stack

    yield factory
    for stack in made:
        stack.close()


def _root_fd(layer: Layer) -> int:
    return layer.fd


def _find(stack: Stack, name: bytes) -> layers.Found | None:
    return layers.find_entry(stack.layers, _root_fd, name)


def _indices(found_layers: Sequence[Layer]) -> list[int]:
    return [layer.index for layer in found_layers]


# --------------------------------------------------------------------------- the stack


def test_open_stack_order_and_properties(tmp_path: Path) -> None:
    a, b, up = (build(tmp_path / n, {}) for n in ("a", "b", "up"))
    with open_stack([str(a), str(b)], str(up)) as stack:
        assert [(layer.index, layer.path, layer.writable) for layer in stack.layers] == [
            (0, str(up), True), (1, str(a), False), (2, str(b), False)]
        assert stack.upper is stack.layers[0]
        assert stack.lowers == stack.layers[1:]
        assert [layer.label for layer in stack.layers] == ["upper", str(a), str(b)]
        for layer in stack.layers:
            assert os.path.samestat(os.fstat(layer.fd), os.stat(layer.path))
        fds = [layer.fd for layer in stack.layers]
    # Leaving the block closed every fd, and the stack is empty.
    for fd in fds:
        with pytest.raises(OSError) as raised:
            os.fstat(fd)
        assert raised.value.errno == errno.EBADF
    assert stack.layers == () and stack.upper is None


def test_open_stack_without_upper(tmp_path: Path) -> None:
    a = build(tmp_path / "a", {})
    with open_stack([str(a)]) as stack:
        assert stack.upper is None
        assert stack.lowers == stack.layers


def test_open_stack_takes_relative_paths_and_a_symlinked_layer(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build(tmp_path / "real", {"f": "x"})
    os.symlink("real", tmp_path / "alias")  # the user's own path may be a symlink
    monkeypatch.chdir(tmp_path)
    with open_stack(["alias"]) as stack:
        assert stack.layers[0].path == str(tmp_path / "alias")
        assert layers.lstat_at(stack.layers[0].fd, b"f") is not None


@pytest.mark.parametrize("bad", ["missing", "file"])
def test_open_stack_closes_what_it_opened_when_a_layer_fails(tmp_path: Path, bad: str) -> None:
    good = [str(build(tmp_path / n, {})) for n in ("a", "b")]
    (tmp_path / "file").write_bytes(b"")
    before = open_fds()
    with pytest.raises((FileNotFoundError, NotADirectoryError)):
        open_stack([*good, str(tmp_path / bad)], str(build(tmp_path / "up", {})))
    assert open_fds() == before


def test_layer_is_frozen(tmp_path: Path) -> None:
    with (open_stack([str(build(tmp_path / "a", {}))]) as stack,
          pytest.raises(dataclasses.FrozenInstanceError)):
        stack.layers[0].writable = True  # type: ignore[misc]


# --------------------------------------------------------------------------- lstat, open


def test_lstat_at_absent_is_none(tmp_path: Path) -> None:
    build(tmp_path / "a", {"f": "x"})
    fd = os.open(tmp_path / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        assert layers.lstat_at(fd, b"missing") is None
        assert layers.lstat_at(fd, b"f/below") is None  # ENOTDIR: absent too
        assert layers.lstat_at(fd, b"f") is not None
    finally:
        os.close(fd)


def test_open_dir_at_refuses_a_symlink(tmp_path: Path) -> None:
    build(tmp_path / "a", {"d": DIR, "s": Symlink("d"), "out": Symlink("/etc")})
    fd = os.open(tmp_path / "a", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.close(layers.open_dir_at(fd, b"d"))
        for name in (b"s", b"out"):
            with pytest.raises(OSError) as raised:
                layers.open_dir_at(fd, name)
            assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)
    finally:
        os.close(fd)


def test_open_parent(stack_of) -> None:
    stack = stack_of({"a/b/f": "x", "a/s": Symlink("b"), "a/file": "x"})
    layer = stack.layers[0]
    fd = layers.open_parent(layer, (b"a", b"b", b"f"))
    try:
        assert os.listdir(fd) == ["f"]
    finally:
        os.close(fd)
    fd = layers.open_parent(layer, (b"top",))  # the layer root itself, as a new fd
    assert fd != layer.fd
    os.close(fd)
    before = open_fds()
    for path in [(b"a", b"missing", b"f"), (b"a", b"s", b"f"), (b"a", b"file", b"f")]:
        with pytest.raises(FileNotFoundError):
            layers.open_parent(layer, path)
    assert open_fds() == before


# --------------------------------------------------------------------------- find_entry


def test_the_top_most_entry_wins(stack_of) -> None:
    stack = stack_of({"f": "top"}, {"f": "below", "g": "only below"})
    found = _find(stack, b"f")
    assert found is not None and found.layer.index == 0 and found.dir_layers == ()
    found = _find(stack, b"g")
    assert found is not None and found.layer.index == 1
    assert _find(stack, b"missing") is None


@pytest.mark.parametrize("marker", [{"f": WHITEOUT}, {".wh.f": ""}])
def test_a_whiteout_of_either_kind_hides_below(stack_of, marker: dict[str, object]) -> None:
    stack = stack_of({}, marker, {"f": "hidden"})
    assert _find(stack, b"f") is None


def test_a_whiteout_below_hides_nothing_above(stack_of) -> None:
    stack = stack_of({"f": "shown"}, {"f": WHITEOUT, ".wh.g": ""}, {"g": "hidden"})
    found = _find(stack, b"f")
    assert found is not None and found.layer.index == 0
    assert _find(stack, b"g") is None


def test_an_oci_whiteout_does_not_hide_its_own_layer(stack_of) -> None:
    stack = stack_of({"f": "own", ".wh.f": ""}, {"f": "below"})
    found = _find(stack, b"f")
    assert found is not None and found.layer.index == 0


def test_a_non_directory_hides_a_directory_below(stack_of) -> None:
    stack = stack_of({"d": "a file"}, {"d/x": "x"})
    found = _find(stack, b"d")
    assert found is not None and stat.S_ISREG(found.st.st_mode) and found.dir_layers == ()


def test_directories_merge(stack_of) -> None:
    stack = stack_of({"d/a": "a"}, {"d/b": "b"}, {"d/c": "c"})
    found = _find(stack, b"d")
    assert found is not None and found.layer.index == 0
    assert _indices(found.dir_layers) == [0, 1, 2]


@pytest.mark.parametrize(("specs", "merged"), [
    # opaque by xattr in the middle: the layer below is not merged
    (({"d": DIR}, {"d": OPAQUE}, {"d": DIR}), [0, 1]),
    # opaque by the OCI marker in the top layer
    (({"d/.wh..wh..opq": ""}, {"d": DIR}), [0]),
    # opaque in the bottom layer: nothing below to stop
    (({"d": DIR}, {"d": OPAQUE}), [0, 1]),
    # a file below a directory stops the merge
    (({"d": DIR}, {"d": "file"}, {"d": DIR}), [0]),
    # so does a whiteout of either kind
    (({"d": DIR}, {"d": WHITEOUT}, {"d": DIR}), [0]),
    (({"d": DIR}, {".wh.d": ""}, {"d": DIR}), [0]),
    # a symlink where a directory is expected: no merge
    (({"d": DIR}, {"d": Symlink("/")}, {"d": DIR}), [0]),
])
def test_what_stops_a_merge(stack_of, specs: tuple[dict[str, object], ...],
                            merged: list[int]) -> None:
    found = _find(stack_of(*specs), b"d")
    assert found is not None and _indices(found.dir_layers) == merged


def test_a_symlink_is_never_followed(stack_of, tmp_path: Path) -> None:
    """A symlink where a directory is expected is a non-directory entry: it hides the
    directory below and is never resolved (here it points at a real directory)."""
    build(tmp_path / "elsewhere", {"secret": "x"})
    stack = stack_of({"d": Symlink(str(tmp_path / "elsewhere"))}, {"d/x": "x"})
    found = _find(stack, b"d")
    assert found is not None and stat.S_ISLNK(found.st.st_mode) and found.dir_layers == ()


def test_an_io_error_is_raised_not_absent(stack_of) -> None:
    stack = stack_of({"f": "x"})
    fd = os.open("/", os.O_RDONLY | os.O_DIRECTORY)
    os.close(fd)  # a dead fd: EBADF
    with pytest.raises(OSError) as raised:
        layers.find_entry(stack.layers, lambda layer: fd, b"f")
    assert raised.value.errno == errno.EBADF


def test_root_layers(stack_of, tmp_path: Path) -> None:
    assert _indices(layers.root_layers(stack_of({}, {}, {}).layers)) == [0, 1, 2]
    stack = stack_of({}, {}, {})
    os.setxattr(stack.layers[1].path, "trusted.overlay.opaque", b"y")
    assert _indices(layers.root_layers(stack.layers)) == [0, 1]
    stack = stack_of({".wh..wh..opq": ""}, {})
    assert _indices(layers.root_layers(stack.layers)) == [0]
    stack = stack_of({}, {".wh..wh..opq": ""})  # the bottom layer: nothing to stop
    assert _indices(layers.root_layers(stack.layers)) == [0, 1]


# --------------------------------------------------------------------------- holders


def test_holders_say_what_each_layer_holds(stack_of) -> None:
    stack = stack_of({"n": "file"}, {"n": WHITEOUT}, {"n": OPAQUE}, {}, {"n": DIR},
                     {".wh.n": ""}, {"n": Symlink("/")})
    held = layers.holders(stack.layers, _root_fd, b"n")
    assert [(h.layer.index, h.kind) for h in held] == [
        (0, Held.FILE), (1, Held.WHITEOUT), (2, Held.OPAQUE), (4, Held.DIR),
        (5, Held.WHITEOUT), (6, Held.FILE)]
    assert layers.holders(stack.layers, _root_fd, b"nothing") == []
    assert {kind.value for kind in Held} == {"file", "dir", "opaque", "whiteout"}


# --------------------------------------------------------------------------- listings


def test_merged_listing(stack_of) -> None:
    stack = stack_of(
        {"a": "top", "gone": WHITEOUT, ".wh.oci-gone": "", "own": "x", ".wh.own": "",
         "d": DIR, ".wh..wh..opq": "", ".wh..wh.plnk": DIR},
        {"a": "below", "b": "b", "gone": "hidden", "oci-gone": "hidden", "own": "below",
         "sub": DIR, "d": "a file below"},
    )
    listing = layers.merged_listing(stack.layers, _root_fd)
    assert sorted(listing) == [b"a", b"b", b"d", b"own", b"sub"]
    assert {name: (e.layer.index, e.is_dir) for name, e in listing.items()} == {
        b"a": (0, False), b"b": (1, False), b"d": (0, True), b"own": (0, False),
        b"sub": (1, True)}
    assert all(entry.name == name for name, entry in listing.items())


def test_merged_listing_agrees_with_find_entry(stack_of) -> None:
    """A name a listing does not show is never found by lookup either (the module's
    promise; marker names are the callers' to hide: tests/unit/test_merged.py)."""
    stack = stack_of({"a": WHITEOUT, "b": "x", ".wh.c": ""}, {"a": "x", "c": "x", "d": DIR},
                     {"b": DIR, "e": "x"})
    listing = layers.merged_listing(stack.layers, _root_fd)
    for name in (b"a", b"b", b"c", b"d", b"e"):
        found = _find(stack, name)
        assert (found is not None) == (name in listing), name
        if found is not None:
            assert found.layer is listing[name].layer


# --------------------------------------------------------------------------- fd cache


def _fds(count: int) -> list[int]:
    return [os.open("/", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for _ in range(count)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_dir_fd_cache_evicts_the_least_recently_used() -> None:
    cache = DirFdCache(capacity=2)
    a, b, c = _fds(3)
    cache.put((1, 0), a)
    cache.put((2, 0), b)
    assert cache.get((1, 0)) == a  # now the most recent
    cache.put((3, 0), c)
    assert cache.get((2, 0)) is None and not _is_open(b)
    assert cache.get((1, 0)) == a and cache.get((3, 0)) == c
    cache.drop_inode(1, [0])
    cache.drop_inode(3, [0])
    assert not _is_open(a) and not _is_open(c)


def test_dir_fd_cache_replacing_a_key_closes_the_old_fd() -> None:
    cache = DirFdCache()
    a, b = _fds(2)
    cache.put((1, 0), a)
    cache.put((1, 0), a)  # the same fd again: kept open
    assert _is_open(a)
    cache.put((1, 0), b)
    assert not _is_open(a) and cache.get((1, 0)) == b
    cache.drop_inode(1, [0])
    assert not _is_open(b)


def test_dir_fd_cache_drop_inode_closes_only_its_layers() -> None:
    cache = DirFdCache()
    fds = _fds(4)
    cache.put((7, 0), fds[0])
    cache.put((7, 1), fds[1])
    cache.put((7, 2), fds[2])
    cache.put((8, 0), fds[3])
    cache.drop_inode(7, [0, 1])
    assert [_is_open(fd) for fd in fds] == [False, False, True, True]
    assert cache.get((7, 0)) is None and cache.get((7, 2)) == fds[2]
    cache.drop_inode(7, [0, 1, 2, 5])  # what is not there is no error
    cache.drop_inode(8, [0])
    assert not any(_is_open(fd) for fd in fds)


def test_dir_fd_cache_keys_by_path() -> None:
    cache = DirFdCache(capacity=1)
    a, b = _fds(2)
    cache.put((0, (b"x", b"y")), a)
    assert cache.get((0, (b"x", b"y"))) == a
    cache.put((1, 0), b)  # evicts the path key
    assert not _is_open(a)
    cache.drop_inode(1, [0])
