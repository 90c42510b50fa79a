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


def test_a_fits_compile_counts_are_what_it_traced_and_broke():
    import torch

    from harness.timing import compile_counts, since

    def step(x):
        y = x * 2
        torch._dynamo.graph_break()  # two graphs and one break a call
        return y + 1

    compiled = torch.compile(step, backend="eager")
    torch._dynamo.reset()
    before = compile_counts()
    compiled(torch.ones(3))
    first = since(before)
    assert first["frames"] >= 1 and first["graphs"] == 2 and first["graph_breaks"] == 1, first
    again = compile_counts()
    compiled(torch.ones(3))  # the same shapes: nothing traced again
    assert since(again)["frames"] == 0 and since(again)["graphs"] == 0


def test_a_corpus_built_by_the_job_is_its_data_phase_not_its_startup(env, tmp_path):
    """On a fresh cache the job tokenizes its corpus before its run folder exists; those seconds are the ``data``
    phase (they were charged to ``startup``, which is the interpreter, the imports and the config)."""
    from helpers.e2e import results, run_cli

    fresh = {**env, "UPCYCLE_CACHE": str(tmp_path / "cache")}
    run_cli(fresh, tmp_path, "method=pretrain", "pretrain.tokens=6400")
    res = results(tmp_path / "runs" / "default" / "latest")
    (shards,) = (tmp_path / "cache" / "data").glob("*/build.json")
    built = json.loads(shards.read_text())["seconds"]  # the shard builder's own clock: tokenizer, encoding, writes
    assert built > 0 and res["timings_s"]["data"] >= built
