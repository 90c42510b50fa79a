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

from helpers.e2e import FAST, ROOT

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
    # the scratch baseline is the very base pretrain.fraction names: the same cache entry and numbers
    steps = scratch["tokens"] // (16 * 64)
    run_cli(env, tmp_path, *CELL, "method=pretrain", f"pretrain.fraction={steps / 59!r}", "name=scratch")
    alone = results(tmp_path / "runs" / "scratch" / "latest")
    assert alone["dense_base"] == scratch["dense_base"] and alone["val_loss"] == scratch["val_loss"]
