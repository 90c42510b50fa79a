"""The ladder's baselines: the best dense model within the MoE's FLOPs (analysis/ladder.py)."""

import json

import pytest

from analysis.ladder import ladder_runs, rungs


def _run(root, name, seed, share, flops, loss, iso, tokens, parent=2.0, base="b0"):
    """One ladder run's results.json: iso and tokens are (cache_dir, train_flops, val_loss) of its twins, each
    trained on 100 tokens in steps of one token (so one dense step is 1% of a twin's FLOPs)."""
    cfg = {
        "seed": seed,
        "data": {"batch_size": 1, "seq_len": 1},
        "optim": {"lr": 3e-4},
        "train": {"pretrain_fraction": share},
        "moe": {"num_experts": 8, "granularity": 1, "top_k": 2, "routing": "softmax_topk"},
        "upcycle": {"weight_scaling": "exact", "router_start": "data", "drop_ratio": 0.0},
    }
    twin = lambda t: {"cache_dir": t[0], "train_flops": t[1], "val_loss": t[2], "tokens": 100}  # noqa: E731
    res = {
        "dense_base": base,
        "status": "complete",
        "method": "upcycle",
        "config": cfg,
        "pretrain_compute_share": share,
        "tokens": 100,
        "init_val_loss": parent,
        "val_loss": loss,
        "dense_parent_val_loss": parent,
        "train_flops": flops,
        "dense_iso": twin(iso),
        "dense_tokens": twin(tokens),
    }
    (root / name).mkdir(parents=True)
    (root / name / "results.json").write_text(json.dumps(res))


def test_best_dense_is_the_lowest_dense_loss_of_the_seed_within_the_moe_flops(tmp_path):
    # seed 0: dense training gets worse past 30 FLOPs (repeated data); the parent is worse than everything
    _run(tmp_path, "a", 0, 0.3, 30, 1.90, iso=("i30", 30.1, 1.85), tokens=("t30", 18, 1.88))
    _run(tmp_path, "b", 0, 0.6, 60, 1.86, iso=("i60", 60.2, 1.87), tokens=("t60", 36, 1.89))
    # seed 1: every continuation is worse than the parent, and one of more FLOPs is better than all
    _run(tmp_path, "c", 1, 0.3, 30, 1.95, iso=("j30", 30.1, 1.99), tokens=("u30", 18, 1.97), parent=1.93)
    _run(tmp_path, "d", 1, 0.6, 60, 1.92, iso=("j60", 60.2, 1.80), tokens=("u60", 36, 1.96), parent=1.93)
    df = ladder_runs(tmp_path).set_index(["seed", "budget"])
    assert df.loc[(0, 0.3), "best_dense_val_loss"] == 1.85  # its own iso twin (a few FLOPs over: step rounding)
    assert df.loc[(0, 0.6), "best_dense_val_loss"] == 1.85  # the shorter dense run beats the iso twin
    assert df.loc[(1, 0.3), "best_dense_val_loss"] == 1.93  # the parent: no continuation helped yet
    assert df.loc[(1, 0.6), "best_dense_val_loss"] == 1.80
    r = rungs(ladder_runs(tmp_path)).set_index("budget")
    assert r.loc[0.6, "vs_best"] == pytest.approx((1.86 - 1.85 + 1.92 - 1.80) / 2)
    seed0 = df.loc[(0, 0.6)]  # beats its iso twin, not the best dense of no more FLOPs
    assert seed0.dense_iso_val_loss > seed0.val_loss > seed0.best_dense_val_loss


def test_a_dense_run_counts_within_the_moe_flops_up_to_one_of_its_own_steps(tmp_path):
    # the iso twin rounds its steps up: 0.6% over (less than its 1% step) still counts, where a fixed 0.5% slack
    # dropped it (one dense step is ~0.54% at the 5% rung); a tokens twin 1.2% over (more than a step) does not
    _run(tmp_path, "a", 0, 0.05, 1000, 1.90, iso=("i", 1006, 1.85), tokens=("t", 1012, 1.70), parent=1.95)
    (row,) = ladder_runs(tmp_path).itertuples()
    assert row.best_dense_val_loss == 1.85


def test_the_best_dense_pool_and_the_rungs_keep_bases_apart(tmp_path):
    # the same seed and recipe on two dense bases: b2's parent and continuations are far better than b1's
    _run(tmp_path, "a", 0, 0.3, 30, 1.90, iso=("i30", 30.1, 1.85), tokens=("t30", 18, 1.88), base="b1")
    _run(tmp_path, "b", 0, 0.3, 30, 1.55, iso=("k30", 30.1, 1.50), tokens=("v30", 18, 1.52), parent=1.6, base="b2")
    df = ladder_runs(tmp_path).set_index("base")
    assert df.loc["b1", "best_dense_val_loss"] == 1.85  # not b2's 1.50
    assert df.loc["b2", "best_dense_val_loss"] == 1.50
    r = rungs(ladder_runs(tmp_path)).set_index("base")
    assert list(r.seeds) == [1, 1]  # one seed on each base, not "2 seeds"
    assert r.loc["b1", "vs_iso"] == pytest.approx(0.05) and r.loc["b2", "vs_iso"] == pytest.approx(0.05)
    assert r.loc["b1", "vs_iso_verdict"] == "1 seed: no verdict"
    assert r.loc["b1", "variant"] != r.loc["b2", "variant"]


def test_rungs_part_by_router_init_and_lr(tmp_path):
    for name, edit in (("a", {}), ("b", {"lr": 1e-3}), ("c", {"router_init": "virtual_group"})):
        _run(tmp_path, name, 0, 0.3, 30, 1.90, iso=("i30", 30.1, 1.85), tokens=("t30", 18, 1.88))
        path = tmp_path / name / "results.json"
        res = json.loads(path.read_text())
        res["config"]["optim"]["lr"] = edit.get("lr", 3e-4)
        res["config"]["upcycle"]["router_init"] = edit.get("router_init", "random")
        path.write_text(json.dumps(res))
    r = rungs(ladder_runs(tmp_path))
    assert len(r) == 3 and list(r.seeds) == [1, 1, 1]


def test_the_committed_ladder_on_the_machine_corpus_reads_it_about_once_at_three_seeds(tmp_path):
    """results/ladder/F, F1 and F2 as committed (seed 0: H200, 2026-12-04; seeds 1 and 2, each on its retrained base:
    H100, 2026-12-07): each base key a section with its corpus reads; seeds on retrained bases of one key pool, each MoE
    paired with its own base's twins; at 3 seeds the rows carry verdicts; no run is left cut off."""
    from analysis.ladder import ladder

    from helpers.e2e import ROOT

    text = ladder(ROOT / "results" / "ladder", tmp_path)["ladder_md"].read_text()
    head = [line for line in text.splitlines() if line.startswith("### data.source=")]
    assert head == [
        "### data.source=machine, base 0a7f8421: the iso-FLOP twin's data reads the corpus up to 1.14 times",
        "### data.source=python, base 8a30e43a: the iso-FLOP twin's data reads the corpus up to 2.99 times",
    ]
    machine = [line for line in text.splitlines() if "0a7f8421 |" in line and line.startswith("| E8G1T2")]
    assert len(machine) == 16 and all("| 3 |" in line and "no verdict" not in line for line in machine)
    row = next(line for line in machine if line.startswith("| E8G1T2 topk_softmax") and "| 60% |" in line)
    assert "+0.0092 [+0.0063, +0.0121] | +0.66% | **disagrees** |" in row  # MoE - iso over seeds 0, 1 and 2
    assert "| machine, 0a7f8421 | 60% | 3 | 1.4096 | 1.4214 | -0.0118 [-0.0144, -0.0091] |" in text  # topk - softmax
    assert "runs cut off" not in text


def test_a_rung_that_holds_one_seed_twice_stops_naming_both_runs(tmp_path):
    """A seed re-run on a retrained base of the same recipe (same base key) beside its first run must not pool."""
    _run(tmp_path, "a", 0, 0.05, 100, 1.90, ("iso", 100, 1.91), ("tok", 60, 1.95))
    _run(tmp_path, "a_again", 0, 0.05, 100, 1.89, ("iso", 100, 1.91), ("tok", 60, 1.95))
    with pytest.raises(ValueError, match=r"one rung holds a seed twice .*a_again"):
        rungs(ladder_runs(tmp_path))


def test_recipes_pair_by_seed_at_one_rung_and_the_lower_one_is_called_better(tmp_path):
    """topk_softmax 0.01 below softmax_topk at 3 seeds (noise 0.001): "a better"; the sign is a's loss minus b's."""
    from analysis.ladder import pairs

    for seed, noise in enumerate((0.0, 0.001, -0.001)):
        for routing, loss in (("softmax_topk", 1.90), ("topk_softmax", 1.89 + noise)):
            name = f"{routing}_s{seed}"
            _run(tmp_path, name, seed, 0.05, 100, loss, ("iso", 100, 1.91), ("tok", 60, 1.95))
            res = json.loads((tmp_path / name / "results.json").read_text())
            res["config"]["moe"]["routing"] = routing
            (tmp_path / name / "results.json").write_text(json.dumps(res))
    pr = pairs(ladder_runs(tmp_path)).set_index("comparison")
    row = pr.loc["topk_softmax − softmax_topk (exact start)"]
    assert row.seeds == 3 and row["diff"] == pytest.approx(-0.01) and row.ci_hi < 0 and row.verdict == "a better"
    assert len(pr) == 1  # no other comparison has both sides here
