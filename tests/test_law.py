"""The upcycling law (analysis/law.py): recovers its own parameters, flags data from another law, refuses thin
data, and the CLI writes every file or fails in one line."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest

from analysis.law import UNIT, law, law_runs

TRUE_MOE = (1.8, 3.0, 0.10, 0.30, 0.02)  # E, A, a1, a2, a3 (tokens in millions)
TRUE_DENSE = (1.9, 2.0, 0.12, 0.15, 0.01)


def _law(p, d1, d2):
    e, a, a1, a2, a3 = p
    return e + a * d1**-a1 * d2 ** (-a2 + a3 * math.log(d1))


def _write(root, moe, dense, d1s=(2, 4, 8, 16), d2s=(1, 2, 4, 8), seeds=(0, 1, 2), noise=1e-3):
    rng = np.random.default_rng(1)
    for d1 in d1s:
        for d2 in d2s:
            for s in seeds:
                iso = 1.5 * d2
                res = {
                    "status": "complete",
                    "method": "upcycle",
                    "dense_base_tokens": d1 * UNIT,
                    "dense_base_flops": 6e6 * d1 * UNIT,
                    "pretrain_fraction": d2 / d1,
                    "tokens": d2 * UNIT,
                    "train_flops": 9e6 * d2 * UNIT,
                    "val_loss": moe(d1, d2) * math.exp(noise * rng.standard_normal()),
                    "dense_parent_val_loss": dense(d1, 0.5) + 0.05,
                    "dense_iso": {
                        "val_loss": dense(d1, iso) * math.exp(noise * rng.standard_normal()),
                        "tokens": iso * UNIT,
                        "train_flops": 9e6 * d2 * UNIT,
                    },
                    "config": {
                        "seed": s,
                        "moe": {"num_experts": 8, "granularity": 1, "top_k": 2, "routing": "softmax_topk"},
                        "optim": {"lr": 3e-4},
                    },
                }
                d = root / f"d{d1}_t{d2}_s{s}"
                d.mkdir(parents=True)
                (d / "results.json").write_text(json.dumps(res))


def test_the_fit_recovers_the_parameters_of_synthetic_data_from_the_law(tmp_path):
    _write(tmp_path / "runs", lambda a, b: _law(TRUE_MOE, a, b), lambda a, b: _law(TRUE_DENSE, a, b))
    law([tmp_path / "runs"], tmp_path / "out", boot=20)
    rows = __import__("pandas").read_csv(tmp_path / "out" / "law.csv")
    moe = rows[rows.law == "moe"].set_index("parameter").value
    for name, true, tol in zip(["E", "A", "a1", "a2", "a3"], TRUE_MOE, (0.05, 0.3, 0.02, 0.03, 0.01)):
        assert moe[name] == pytest.approx(true, abs=tol), name
    assert not rows.poor.any()
    assert "POOR" not in (tmp_path / "out" / "law.md").read_text()


def test_data_from_another_law_is_flagged_as_a_poor_fit_and_draws_no_line(tmp_path):
    other = lambda a, b: 1.5 + 4.0 * (a + 3 * b) ** -0.8 + 0.3 * math.sin(math.log(a * b))  # noqa: E731
    _write(tmp_path / "runs", other, lambda a, b: _law(TRUE_DENSE, a, b))
    law([tmp_path / "runs"], tmp_path / "out", boot=5)
    text = (tmp_path / "out" / "law.md").read_text()
    assert "The fit is poor" in text and "**POOR**" in text


def test_too_few_cells_say_so_and_the_cli_writes_every_file(tmp_path):
    _write(
        tmp_path / "runs",
        lambda a, b: _law(TRUE_MOE, a, b),
        lambda a, b: _law(TRUE_DENSE, a, b),
        d1s=(2, 4),
        d2s=(1, 2),
    )
    out = tmp_path / "out"
    r = subprocess.run(
        [sys.executable, "-m", "analysis.law", str(tmp_path / "runs"), "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "cannot support a 5-parameter law" in (out / "law.md").read_text()
    assert all((out / f).exists() for f in ("law.md", "law.csv", "crossover.png"))
    assert len(law_runs(tmp_path / "runs")) == 12


def test_output_is_deterministic(tmp_path):
    _write(tmp_path / "runs", lambda a, b: _law(TRUE_MOE, a, b), lambda a, b: _law(TRUE_DENSE, a, b))
    law([tmp_path / "runs"], tmp_path / "a", boot=10)
    law([tmp_path / "runs"], tmp_path / "b", boot=10)
    for f in ("law.md", "law.csv"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()


def test_a_bad_path_is_a_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "analysis.law", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines() == [f"analysis.law: no such folder: {tmp_path / 'nope'}"]


def test_the_study_adds_the_law_when_given_a_sunk_cost_folder(tmp_path):
    from analysis.study import study

    _write(tmp_path / "runs", lambda a, b: _law(TRUE_MOE, a, b), lambda a, b: _law(TRUE_DENSE, a, b))
    files = study([str(tmp_path / "runs")], tmp_path / "out", sunk_cost=tmp_path / "runs")
    assert {"law_md", "law_csv", "crossover_png"} <= set(files)
    assert "D2* vs iso-FLOP twin" in files["law_md"].read_text()
