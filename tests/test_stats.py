"""Paired statistics of the verdicts (analysis/stats.py) against published values, and the findings table
built from real results.json folders: no verdict below 3 seeds, one run per (base, seed), bases never pooled."""

import json
import math

import pandas as pd
import pytest

from analysis.collect import collect
from analysis.stats import betainc, paired, t_quantile, t_sf2, verdict
from analysis.study import findings, study

# two-sided 95% critical values of Student's t (any statistics table, e.g. NIST/SEMATECH e-Handbook 1.3.6.7.2)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 9: 2.262, 10: 2.228, 20: 2.086, 30: 2.042}


@pytest.mark.parametrize("df", sorted(T975))
def test_t_quantiles_match_the_table(df):
    assert t_quantile(0.975, df) == pytest.approx(T975[df], abs=5e-4)


def test_t_distribution_has_closed_forms_at_one_and_two_degrees_of_freedom():
    # df=1 is Cauchy: P(|T| > t) = 1 - 2 atan(t) / pi; df=2: t_p = (2p - 1) sqrt(2 / (4p(1 - p)))
    for t in (0.3, 1.0, 4.0, 40.0):
        assert t_sf2(t, 1) == pytest.approx(1 - 2 * math.atan(t) / math.pi, rel=1e-10)
    for p in (0.9, 0.975, 0.995):
        assert t_quantile(p, 2) == pytest.approx((2 * p - 1) * math.sqrt(2 / (4 * p * (1 - p))), rel=1e-10)
    assert t_quantile(0.975, 100_000) == pytest.approx(1.959964, abs=1e-4)  # the normal limit
    assert betainc(2.0, 3.0, 0.4) == pytest.approx(0.5248, abs=1e-12)  # I_x(2,3) = 6x^2 - 8x^3 + 3x^4


def test_the_ci_is_the_mean_plus_minus_t_times_the_standard_error():
    s = paired([1.0, 2.0, 3.0])  # mean 2, se 1/sqrt(3), df 2
    half = 4.302652729749 / math.sqrt(3)
    assert (s.n, s.mean) == (3, 2.0)
    assert (s.lo, s.hi) == (pytest.approx(2 - half, rel=1e-9), pytest.approx(2 + half, rel=1e-9))
    assert s.p == pytest.approx(0.0741799, abs=1e-6)  # t = 2 sqrt(3) at 2 df
    assert s.describe() == "n=3: +2.0000 [-0.4841, +4.4841]"


def test_two_seeds_get_no_verdict_however_far_apart():
    # two seeds 21 standard errors from 0: a 2-SE rule said "agrees"; t at 1 df needs 12.7
    assert verdict([0.010, 0.011]) == "2 seeds: CI [+0.0041, +0.0169]"
    assert verdict([0.010, 0.011, 0.012]) == "agrees"
    assert verdict([0.01, 0.012, 0.002]) == "within noise"  # 2.6 SE: the t CI (df 2) holds 0
    assert verdict([-0.01, -0.011, -0.012]) == "disagrees"
    assert verdict([0.01]) == "1 seed: no CI"


def _run(root, part, name, seed, loss, routing="softmax_topk", config_hash=None):
    """One complete E8G1T2 run as the harness writes it: results/runs/<part>/runs/<name>/results.json."""
    cfg = {
        "method": "upcycle",
        "seed": seed,
        "moe": {"num_experts": 8, "granularity": 1, "top_k": 2, "routing": routing},
        "upcycle": {"drop_ratio": 0.0, "weight_scaling": "paper", "router_init": "random"},
        "optim": {"lr": 1e-3},
    }
    folder = root / part / "runs" / name
    folder.mkdir(parents=True)
    res = {"status": "complete", "method": "upcycle", "config": cfg, "val_loss": loss}
    res["config_hash"] = config_hash or f"{part}{name}"
    (folder / "results.json").write_text(json.dumps(res))


def _routing_rows(tmp_path):
    study([str(tmp_path)], tmp_path / "out")
    f = pd.read_csv(tmp_path / "out" / "findings.csv")
    return f[f.finding == "softmax->topK beats topK->softmax"]


def test_a_two_seed_finding_shows_its_ci_and_no_verdict(tmp_path):
    for seed, gap in ((0, 0.010), (1, 0.011)):
        _run(tmp_path, "A", f"fav{seed}", seed, 1.8)
        _run(tmp_path, "A", f"oth{seed}", seed, 1.8 + gap, routing="topk_softmax")
    (row,) = _routing_rows(tmp_path).itertuples()
    assert (row.seeds, row.verdict) == (2, "2 seeds: CI [+0.0041, +0.0169]")
    assert (row.diff_ci_lo, row.diff_ci_hi) == (pytest.approx(0.0041469, abs=1e-6), pytest.approx(0.016853, abs=1e-6))
    assert "| 2 | A | **2 seeds: CI [+0.0041, +0.0169]** |" in (tmp_path / "out" / "findings.md").read_text()


def test_a_finding_on_two_bases_pairs_within_each_and_pools_no_seeds(tmp_path):
    # base A: 2 seeds, base B: 3 seeds, each a clear gap; pooled, 5 seeds would "agree"
    for part, seeds in (("A", (0, 1)), ("B", (0, 1, 2))):
        for seed in seeds:
            _run(tmp_path, part, f"fav{seed}", seed, 1.8 + 0.1 * (part == "B"))
            _run(tmp_path, part, f"oth{seed}", seed, 1.8 + 0.1 * (part == "B") + 0.01 + 0.001 * seed, "topk_softmax")
    rows = _routing_rows(tmp_path).set_index("part")
    assert list(rows.index) == ["A (of A,B)", "B (of A,B)"]
    assert list(rows.seeds) == [2, 3]
    assert rows.loc["A (of A,B)", "verdict"].startswith("2 seeds: CI")
    assert rows.loc["B (of A,B)", "verdict"] == "agrees"
    assert rows.loc["B (of A,B)", "diff_mean"] == pytest.approx(0.011)


def test_two_runs_of_one_variant_at_one_base_and_seed_stop_the_table(tmp_path):
    _run(tmp_path, "A", "fav0", 0, 1.80)
    _run(tmp_path, "A", "fav0_again", 0, 1.81)  # another config (hash) that selects the same
    _run(tmp_path, "A", "oth0", 0, 1.82, routing="topk_softmax")
    df = collect(tmp_path)
    df["part"] = [p.split("/")[-3] for p in df.run_dir]
    with pytest.raises(ValueError, match="2 runs match .* at one \\(part, seed\\).*fav0_again"):
        findings(df)
