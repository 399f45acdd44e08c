"""Atomic writes: the result appears whole or not at all, with the usual file mode."""

import json
import os
import stat
from pathlib import Path

import pytest

from adalog.io import atomic_write, atomic_write_json


def test_atomic_json_content_and_mode(tmp_path: Path):
    old = os.umask(0o022)
    try:
        path = atomic_write_json(tmp_path / "sub" / "r.json", {"b": 1, "a": [1.5]})
    finally:
        os.umask(old)
    assert json.loads(path.read_text()) == {"a": [1.5], "b": 1}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_failed_write_leaves_old_file_and_no_temporaries(tmp_path: Path):
    path = atomic_write_json(tmp_path / "r.json", {"v": 1})

    def crash(tmp: Path) -> None:
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(path, crash)
    assert json.loads(path.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
