"""The sunk-cost grid (issue 31): bases at several shares of one WSD pretraining (pretrain.fraction), MoE budgets
that stay shares of the FULL pretraining, the from-scratch dense baseline, and the grid end to end into
analysis.law."""

import pytest
from hydra import compose, initialize_config_dir

from harness import flops
from harness.experiment import build_experiment
from harness.model import Decoder
from harness.pretrain import fraction_steps, full_pretrain_flops, full_steps
from harness.train import moe_budget

from helpers.e2e import FAST, ROOT, run_study_driver

WSD_BASE = ["pretrain.optim.schedule=wsd", "train.pretrain_fraction=0.3"]


def _exp(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[o for o in FAST if not o.startswith("trainer.")] + list(overrides))
    return build_experiment(cfg)


def test_the_moe_budget_is_a_share_of_the_full_pretraining_whatever_the_bases_share():
    full, half = _exp(*WSD_BASE), _exp(*WSD_BASE, "pretrain.fraction=0.5")
    moe = flops.count(full.model, full.data.seq_len, full.moe, full.moe_layers)
    assert full_steps(full) == 59 and fraction_steps(half, 0.5) == 30 and fraction_steps(half, 1e-6) == 1
    # what the full base records as its train_flops (harness/fit.py counts the built model), at 59 whole steps
    recorded = 59 * 16 * 64 * flops.count_model(Decoder(full.model), full.data.seq_len).train_per_token
    assert full_pretrain_flops(full) == full_pretrain_flops(half) == recorded
    assert moe_budget(half, moe) == moe_budget(full, moe) == pytest.approx(0.3 * recorded / moe.train_per_token)
    assert moe_budget(_exp("train.tokens=5000"), moe) == 5000


def test_a_fraction_out_of_range_is_one_config_error():
    from harness.errors import ConfigError

    for bad in ("0", "1.5", "-0.2", "true"):
        with pytest.raises(ConfigError, match="pretrain.fraction"):
            _exp(*WSD_BASE, f"pretrain.fraction={bad}")


def test_the_scratch_baseline_needs_a_wsd_pretraining_and_is_one_config_error_otherwise():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="scratch_baseline=true needs pretrain.optim.schedule=wsd"):
        _exp("scratch_baseline=true")
    _exp("scratch_baseline=true", "pretrain.optim.schedule=wsd")
    _exp("scratch_baseline=true", "method=dense")  # only an upcycled run has the baseline


CELL = [
    "optim=wsd",
    "train.share_trunk=true",
    "pretrain.optim.schedule=wsd",
    "pretrain.optim.warmup_steps=5",
    "scratch_baseline=true",
]


@pytest.mark.slow
def test_a_cell_records_its_base_and_the_from_scratch_dense_model_of_the_same_total_flops(env, tmp_path):
    from helpers.e2e import results, run_cli

    env = {**env, "UPCYCLE_CACHE": str(tmp_path / "cache")}  # its own: the branch it looks for may be cached already
    proc = run_cli(env, tmp_path, *CELL, "pretrain.fraction=0.5", "train.pretrain_fraction=0.15", "name=cell")
    res = results(tmp_path / "runs" / "cell" / "latest")
    assert res["pretrain_fraction"] == 0.5 and res["dense_base_tokens"] == 30 * 16 * 64
    scratch = res["dense_scratch"]
    per_token = res["dense_base_flops"] / res["dense_base_tokens"]
    total = res["dense_base_flops"] + res["train_flops"]
    assert abs(scratch["train_flops"] - total) <= 0.5 * 16 * 64 * per_token  # whole steps: within half a step
    assert scratch["flop_share"] == pytest.approx(total / (59 * 16 * 64 * per_token))
    assert scratch["fraction"] == scratch["tokens"] / (59 * 16 * 64) and scratch["val_curve"]
    assert "branching off the WSD trunk" in proc.stdout + proc.stderr  # the scratch base: off the 50% base's trunk
    assert "train.pretrain_fraction=0.15, 15% of the base's pretraining FLOPs" in proc.stdout + proc.stderr
    # the scratch baseline is the very base pretrain.fraction names: the same cache entry and numbers
    steps = scratch["tokens"] // (16 * 64)
    run_cli(env, tmp_path, *CELL, "method=pretrain", f"pretrain.fraction={steps / 59!r}", "name=scratch")
    alone = results(tmp_path / "runs" / "scratch" / "latest")
    assert alone["dense_base"] == scratch["dense_base"] and alone["val_loss"] == scratch["val_loss"]


@pytest.mark.slow
def test_the_sunk_cost_grid_runs_end_to_end_and_analysis_law_writes_every_file(env, tmp_path):
    """+sweep=sunk_cost at the CPU scale, 3 D1 x 3 budgets (9 cells, enough for the 5-parameter law), one seed;
    then ``python -m analysis.law`` on its folder (a poor fit at this scale is fine: the files must be written)."""
    import json
    import subprocess
    import sys

    from analysis.law import law_runs

    args = ["-m", "+sweep=sunk_cost", "+scale=cpu", "seed=0", "train.pretrain_fraction=0.05,0.15,0.3"]
    proc = subprocess.run(
        [sys.executable, "run.py", *args, "pretrain.optim.warmup_steps=5", *FAST[-3:]],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "UPCYCLE_LOGS": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "multirun" / "sweep_sunk_cost"
    runs = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(runs) == 9 and all(r["status"] == "complete" for r in runs)
    by_d1 = {}
    for r in runs:
        by_d1.setdefault(r["pretrain_fraction"], []).append(r)
    assert sorted(by_d1) == [0.25, 0.5, 1.0]
    assert {r["dense_base_tokens"] for r in runs} == {15 * 1024, 30 * 1024, 59 * 1024}
    # D2 is a share of the full pretraining: the same MoE tokens at every D1
    budgets = {d1: sorted(r["tokens"] for r in rs) for d1, rs in by_d1.items()}
    assert budgets[0.25] == budgets[0.5] == budgets[1.0] and len(set(budgets[1.0])) == 3
    assert all("dense_iso" in r for r in runs)
    assert all("dense_scratch" in r for r in by_d1[0.25] + by_d1[0.5])  # 25-80% of the pretraining: on its trunk
    assert not any("dense_scratch" in r for r in by_d1[1.0])  # beyond its end: skipped, in one line each
    assert (proc.stdout + proc.stderr).count("from-scratch dense baseline: skipped") == 3
    assert len(law_runs(sweep)) == 9
    out = tmp_path / "law"
    law = subprocess.run(
        [sys.executable, "-m", "analysis.law", str(sweep), "--out", str(out), "--boot", "10"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert law.returncode == 0, law.stderr[-3000:]
    for name in ("law.md", "law.csv", "crossover.png"):
        assert (out / name).stat().st_size > 0, name
    assert "9 runs, 9 (D1, D2) cells, 1 seeds." in (out / "law.md").read_text()


@pytest.mark.slow
def test_the_study_drivers_part_l_runs_the_grid_and_the_law(env, tmp_path):
    """``bash results/run_study.sh L`` (what the GPU study runs, through results/lease.sh) at the CPU scale on a
    2-cell grid (D1 = 50%, 100% x the 5% budget, seed 0): the WSD bases first, one stream per (D1, seed), then
    ``analysis.law`` into $UPCYCLE_LOGS/law (two cells: the law says it cannot fit, and still writes every file)."""
    import json

    logs = tmp_path / "logs"
    proc, log = run_study_driver(
        env, "L", logs, CORPUS_BYTES="1500000", SUNK_D1="0.5 1.0", SUNK_SEEDS="0", SUNK_BUDGETS="0.05"
    )
    assert proc.returncode == 0 and "FAILED" not in log, log + proc.stderr[-2000:]
    for tag in ("pretrain", "sunk_f0.5_s0", "sunk_f1.0_s0", "law"):
        assert f"done {tag}" in log, tag
    assert log.rstrip().endswith("part L finished")
    runs = [json.loads(p.read_text()) for p in (logs / "multirun" / "sweep_sunk_cost").glob("*/results.json")]
    cells = [r for r in runs if r.get("method") == "upcycle"]
    assert sorted(r["pretrain_fraction"] for r in cells) == [0.5, 1.0] and all(r["status"] == "complete" for r in runs)
    assert all(r["config"]["moe"]["routing"] == "topk_softmax" for r in cells)  # the ladder's best recipe
    assert all(r["config"]["data"]["source"] == "machine" for r in runs)  # part F's corpus, read about once
    assert sum("dense_scratch" in r for r in cells) == 1  # 50% + 5% is on the trunk; 100% + 5% is past its end
    law = logs / "law"
    assert (law / "law.md").exists() and (law / "law.csv").exists() and (law / "crossover.png").exists()
    assert "cannot support a 5-parameter law" in (law / "law.md").read_text()
