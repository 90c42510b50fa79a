"""Part F of the study driver: the ladder on the machine corpus, seed after seed (what the GPU lease runs)."""

from __future__ import annotations

import json

import pytest

from helpers.e2e import run_study_driver


@pytest.mark.slow
def test_part_f_runs_the_ladder_seed_after_seed_on_the_machine_corpus_and_takes_its_census(env, tmp_path):
    logs = tmp_path / "logs"
    proc, log = run_study_driver(
        env,
        "F",
        logs,
        CORPUS_BYTES="1500000",
        LADDER_SEEDS="0 1",
        LADDER_VARIANTS="topk_softmax",
        LADDER_BUDGETS="0.05,0.15",
    )
    assert proc.returncode == 0 and "FAILED" not in log, log + proc.stderr[-2000:]
    order = [line.split("] ", 1)[1] for line in log.splitlines() if "] done " in line]
    assert order == ["done pretrain", "done ladder_s0", "done ladder_s1"]  # seed after seed: a cut leaves whole seeds
    census = json.loads((logs / "corpus_census.json").read_text())
    assert census["bytes_by_suffix"][".py"] > 0 and census["bytes"] == sum(census["bytes_by_suffix"].values())
    runs = [json.loads(p.read_text()) for p in (logs / "multirun" / "sweep_ladder").glob("*/results.json")]
    assert sorted((r["config"]["seed"], r["config"]["train"]["pretrain_fraction"]) for r in runs) == [
        (0, 0.05),
        (0, 0.15),
        (1, 0.05),
        (1, 0.15),
    ]
    for r in runs:
        assert r["status"] == "complete" and r["config"]["data"]["source"] == "machine"
        assert r["config"]["moe"]["routing"] == "topk_softmax" and {"dense_iso", "dense_tokens"} <= set(r)
