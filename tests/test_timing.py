"""A job's ``startup`` seconds (harness/timing.py): the entry point's own start, never a shell's earlier work."""

import ast
import json
import subprocess
import sys

from helpers.e2e import ROOT

PROBE = (
    "import time; STARTED = time.perf_counter(); from harness.timing import Timings, process_age; "
    "import json; print(json.dumps([Timings().get('startup'), process_age()]))"
)


def _probe(code: str) -> tuple[float, float]:
    """Run ``code`` as a shell runs a job after other commands: ``bash -c 'sleep 2; exec python ...'``."""
    out = subprocess.run(
        ["bash", "-c", f'sleep 2; exec "{sys.executable}" -c "$0"', code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


def test_startup_counts_from_the_entry_points_mark_not_the_shells_birth():
    """The process's age under an exec'ing shell includes its ``sleep 2``; the startup from ``STARTED`` does not."""
    startup, age = _probe(PROBE)
    assert startup > 0 and age - startup >= 2.0, (startup, age)
    # a process without the mark (a launcher's worker) falls back to its own age
    startup, age = _probe(PROBE.replace("STARTED", "_unused"))
    assert abs(age - startup) < 1.0 and startup >= 2.0, (startup, age)


def test_run_py_marks_its_start_before_any_other_import():
    """run.py's first statement after its docstring sets STARTED, so the imports count as startup."""
    body = ast.parse((ROOT / "run.py").read_text()).body
    first = [n for n in body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
    assert isinstance(first[0], ast.Import) and [a.name for a in first[0].names] == ["time"]
    assert isinstance(first[1], ast.Assign) and first[1].targets[0].id == "STARTED"
