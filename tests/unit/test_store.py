"""The store's temporary directories: the sweep removes what a crash left, never one
that is being made or used."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from unionfs import store as store_mod
from unionfs.store import Store


def test_sweep_removes_only_unlocked_leftovers(tmp_path: Path) -> None:
    st = Store(str(tmp_path / "s"))
    left = tmp_path / "s" / "tmp" / "unpack-crashed"
    left.mkdir()
    with st.temp_dir() as busy:
        assert Store(str(tmp_path / "s")).clean_temps() == 1
        assert Path(busy).is_dir() and not left.exists()
    assert not Path(busy).exists()


def test_sweep_never_takes_a_directory_being_made(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Another process sweeps between the maker's mkdtemp and its lock (the race two
    concurrent unpacks hit): the new directory survives."""
    st, other = Store(str(tmp_path / "s")), Store(str(tmp_path / "s"))
    made = tempfile.mkdtemp
    swept: list[int] = []

    def mkdtemp_then_sweep(**kw: str) -> str:
        path = made(**kw)
        swept.append(other.clean_temps())
        return path

    monkeypatch.setattr(store_mod.tempfile, "mkdtemp", mkdtemp_then_sweep)
    with st.temp_dir() as tmp:
        assert swept == [0] and Path(tmp).is_dir()
        (Path(tmp) / "f").write_text("x")
