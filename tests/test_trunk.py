"""WSD budget ladders: runs that differ only in train.tokens share one stable phase (harness/trunk.py)."""

from pathlib import Path

import pytest

from harness.lit import OptimConfig

from helpers.e2e import results, run_cli

WSD = ["optim=wsd", "train.share_trunk=true"]


def test_every_step_before_the_decay_has_the_same_lr_for_any_budget():
    opt = OptimConfig(lr=1.0, warmup_steps=5, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.1)
    short, long = 40, 400
    for step in range(opt.decay_start(short)):
        assert opt.lr_factor(step, short) == opt.lr_factor(step, long)
    assert opt.lr_factor(opt.decay_start(short), short) == 1.0  # the decay starts from the stable LR ...
    assert opt.lr_factor(short, short) == pytest.approx(0.1)  # ... and ends at the floor
    assert opt.decay_start(6) == 5  # never inside the warmup


@pytest.mark.slow
def test_a_budget_branched_off_the_trunk_equals_its_own_full_run(env, tmp_path):
    cache_trunks = Path(env["UPCYCLE_CACHE"]) / "trunks"
    before = set(cache_trunks.glob("*"))  # the session's cache: other tests' trunks (e.g. a pretraining's) stay out
    proc = run_cli(
        env, tmp_path, "-m", *WSD, "train.tokens=6400,12800", "iso_flop_baseline=false", "token_matched_baseline=true"
    )
    log = proc.stdout + proc.stderr
    assert log.count("branching off the WSD trunk") == 2 and "at step 5 of 13" in log  # MoE and dense, second budget
    jobs = sorted(
        Path(tmp_path / "multirun" / "default").glob("*/results.json"), key=lambda p: results(p.parent)["tokens"]
    )
    short, branched = (results(p.parent) for p in jobs)
    trunks = [c for d in set(cache_trunks.glob("*")) - before for c in d.glob("step_*.ckpt")]
    # the latest checkpoint of the MoE trunk and of the token-matched dense trunk (decay starts 5, then 10 steps)
    assert sorted(int(p.stem.split("_")[1]) for p in trunks) == [10, 10]
    assert branched["dense_tokens"]["tokens"] == branched["tokens"]
    assert short["val_curve"][-1]["step"] == 7 and branched["val_curve"][-1]["step"] == 13
    run_cli(env, tmp_path, "name=alone", "optim=wsd", "train.tokens=12800", "iso_flop_baseline=false")
    alone = results(tmp_path / "runs" / "alone" / "latest")
    assert alone["val_loss"] == branched["val_loss"]  # bitwise on CPU: the same steps on the same data
    assert [p["step"] for p in alone["val_curve"]] == [p["step"] for p in branched["val_curve"]]


def test_share_trunk_without_wsd_fails_fast_with_one_line(env, tmp_path):
    proc = run_cli(env, tmp_path, "train.share_trunk=true", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("config error:") and "optim=wsd" in last


PRETRAIN_WSD = ["method=pretrain", "pretrain.optim.schedule=wsd", "pretrain.optim.warmup_steps=5"]


@pytest.mark.slow
def test_a_base_at_half_the_pretraining_branched_off_its_trunk_equals_its_own_full_run(env, tmp_path):
    """pretrain.fraction: the bases at 25%, 50% and 100% of one WSD pretraining (59 steps) share its stable trunk;
    the 50% base, branched off the 25% base's checkpoint, is bitwise the 50% base trained alone in a fresh cache."""
    import torch

    shared = {**env, "UPCYCLE_CACHE": str(tmp_path / "shared")}
    logs = {}
    for f in (0.25, 0.5, 1.0):
        proc = run_cli(shared, tmp_path, *PRETRAIN_WSD, f"pretrain.fraction={f}", f"name=f{f}")
        logs[f] = proc.stdout + proc.stderr
    assert "branching off the WSD trunk" not in logs[0.25] and "15 steps" in logs[0.25]
    assert "at step 12 of 30" in logs[0.5]  # 25%: 15 steps, decay from step 12; 50%: 30 steps
    assert "at step 24 of 59" in logs[1.0]  # the full base trains only the rest of the stable phase and its decay
    trunks = [p.parent.name for p in (tmp_path / "shared" / "trunks").glob("*/step_*.ckpt")]
    assert len(trunks) == 3 and len(set(trunks)) == 1  # one trunk, every share's checkpoint kept
    branched = results(tmp_path / "runs" / "f0.5" / "latest")
    full = results(tmp_path / "runs" / "f1.0" / "latest")
    assert branched["tokens"] == 30 * 16 * 64 and full["tokens"] == 59 * 16 * 64
    assert branched["dense_base"] != full["dense_base"]
    alone_cache = tmp_path / "alone"
    alone_cache.mkdir()
    (alone_cache / "data").symlink_to(tmp_path / "shared" / "data")  # the tokenized corpus, nothing else
    proc = run_cli({**env, "UPCYCLE_CACHE": str(alone_cache)}, tmp_path, *PRETRAIN_WSD, "pretrain.fraction=0.5")
    assert "branching off the WSD trunk" not in proc.stdout + proc.stderr
    alone = results(tmp_path / "runs" / "default" / "latest")
    assert alone["dense_base"] == branched["dense_base"] and alone["val_curve"] == branched["val_curve"]
    weights = [
        torch.load(root / "dense" / branched["dense_base"] / "model.pt", weights_only=True)
        for root in (tmp_path / "shared", alone_cache)
    ]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # bitwise on CPU


def test_a_base_at_a_share_of_a_cosine_pretraining_fails_fast_with_one_line(env, tmp_path):
    proc = run_cli(env, tmp_path, "pretrain.fraction=0.5", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("config error:") and "pretrain.fraction" in last
    assert "pretrain.optim.schedule=wsd" in last
