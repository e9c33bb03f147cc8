"""The unit tests' fixture: `stacks` (tests/unit/stacks.py), closed after each test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from unit.stacks import Stacks


@pytest.fixture
def stacks(tmp_path: Path) -> Iterator[Stacks]:
    made = Stacks(tmp_path)
    yield made
    made.close()
