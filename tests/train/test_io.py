"""Atomic writes (bakeoff.common.io): content replaced whole, permissions as a plain open() would leave them."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from bakeoff.common.io import atomic_path, read_json, write_json, write_text


@pytest.fixture
def umask():
    """Set the process umask for a test; the old one is put back after."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask, expected", [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664)])
def test_a_new_file_gets_the_umask_not_mkstemps_0600(tmp_path, umask, mask, expected):
    umask(mask)
    write_json(tmp_path / "a" / "x.json", {"k": 1})
    assert mode(tmp_path / "a" / "x.json") == expected and read_json(tmp_path / "a" / "x.json") == {"k": 1}
    assert os.umask(mask) == mask  # the umask is left as it was


def test_a_replaced_file_keeps_its_permissions(tmp_path, umask):
    path = tmp_path / "x.txt"
    path.write_text("old")
    path.chmod(0o640)
    write_text(path, "new")
    assert mode(path) == 0o640 and path.read_text() == "new"


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "x.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["x.txt"]
