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


@pytest.mark.slow
def test_part_g_runs_the_granularity_trio_at_one_budget_with_e8g1t1s_dense_twin(env, tmp_path):
    logs = tmp_path / "logs"
    proc, log = run_study_driver(env, "G", logs, CORPUS_BYTES="1500000", GRAN_SEEDS="0", GRAN_BUDGET="0.05")
    assert proc.returncode == 0 and "FAILED" not in log, log + proc.stderr[-2000:]
    assert "done granularity_g1_s0" in log and "done granularity_s0" in log and log.rstrip().endswith("finished")
    runs = [json.loads(p.read_text()) for p in (logs / "multirun" / "sweep_ladder").glob("*/results.json")]
    assert sorted(r["moe"] for r in runs) == ["E32G4T4", "E64G8T8", "E8G1T1"]
    for r in runs:
        cfg = r["config"]
        assert r["status"] == "complete" and cfg["data"]["source"] == "machine"
        assert cfg["train"]["pretrain_fraction"] == 0.05 and cfg["upcycle"]["router_init"] == "virtual_group"
    twins = sorted((r["moe"], bool(r.get("dense_iso"))) for r in runs)
    assert twins == [
        ("E32G4T4", False),
        ("E64G8T8", False),
        ("E8G1T1", True),
    ]  # E8G1T1 beside its iso-FLOP twin, the others paired with it
