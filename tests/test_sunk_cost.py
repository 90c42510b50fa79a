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
