"""Crash-safe writes (harness/io.py): the file appears whole or not at all, readable like any other file."""

import os
import stat

from harness.io import atomic_write_json, read_json


def test_an_atomic_write_leaves_one_whole_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "run" / "results.json"
    atomic_write_json(path, {"val_loss": 1.5})
    atomic_write_json(path, {"val_loss": 1.25})  # replaced in place
    assert read_json(path) == {"val_loss": 1.25}
    assert [p.name for p in path.parent.iterdir()] == ["results.json"]  # no temp file left
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask  # not mkstemp's 0600: others read the results
