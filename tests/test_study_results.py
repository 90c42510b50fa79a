"""The committed study (results/) regenerates from its committed run outputs with one command."""

import pandas as pd

from analysis.study import FINDINGS, study, verdict

from helpers.e2e import ROOT


def test_study_tables_regenerate_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # run_dir columns are relative to the repository, as committed
    files = study(
        ["results/runs"], tmp_path, "results/partial", "results/ladder", granularity_root="results/granularity"
    )
    compared = 0
    for path in files.values():
        committed = ROOT / "results" / path.relative_to(tmp_path)
        assert committed.exists(), (
            f"{committed} is not committed (run: python -m analysis.study results/runs --partial results/partial "
            "--ladder results/ladder --granularity results/granularity --out results)"
        )
        if path.suffix in (".md", ".csv", ".tex"):
            assert path.read_text() == committed.read_text(), f"{committed} differs from what the runs give"
            compared += 1
        else:  # PNG bytes depend on the matplotlib build; the plot must exist and hold curves
            assert path.stat().st_size > 10_000
    assert compared >= 8
    rows = [line.split(" | ")[0][2:] for line in (tmp_path / "findings.md").read_text().splitlines()[2:]]
    assert set(rows) == {name for name, *_ in FINDINGS}  # every finding has a row (one per base), run or not


def test_verdict_rule():
    assert verdict(pd.Series([0.01, 0.011, 0.012])) == "agrees"
    assert verdict(pd.Series([-0.01, -0.011, -0.012])) == "disagrees"
    assert verdict(pd.Series([0.01, -0.011, 0.002])) == "within noise"
    assert verdict(pd.Series([0.01])) == "1 seed: no CI"
    assert verdict(pd.Series([], dtype=float)) == "not run"


def test_smollm2_tables_regenerate_and_pair_by_seed(tmp_path):
    from analysis.smollm2 import compare, table

    runs = ROOT / "results" / "smollm2" / "runs" / "S"
    committed = (ROOT / "results" / "smollm2" / "summary.md").read_text()
    assert committed == f"{table(runs)}\n\n{compare(runs)}\n", (
        "results/smollm2/summary.md differs from what the runs give (python -m analysis.smollm2 summary "
        "results/smollm2/runs/S > results/smollm2/summary.md)"
    )
    # a third seed made from seed 1's record: 0.01 below its iso-FLOP twin gives a verdict, a duplicate stops
    import json

    import pytest

    src = json.loads(next(runs.rglob("*routing=topk_softmax,seed=1,*tokens=4194304,*/results.json")).read_text())
    for seed in (0, 1, 2):
        res = {**src, "config": {**src["config"], "seed": seed}}
        res["val_loss"] = res["dense_iso"]["val_loss"] - 0.01 - 0.001 * seed
        (tmp_path / f"s{seed}").mkdir()
        (tmp_path / f"s{seed}" / "results.json").write_text(json.dumps(res))
    row = compare(tmp_path).splitlines()[2]
    assert row.startswith("| topk_softmax | 4,194,304 | 0,1,2 | -0.0110 [-0.0135, -0.0085] | MoE better |")
    # the leg's variants at the same seed and budget are recipes of their own, never duplicates of E8G1T2
    moe = src["config"]["moe"]
    variants = {
        "shared": {**src, "moe": "E16G2T3S1"},
        "bias": {
            **src,
            "routing": "sigmoid_topk",
            "config": {**src["config"], "moe": {**moe, "load_balancing": "expert_bias"}},
        },
    }
    for name, res in variants.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    rows = compare(tmp_path).splitlines()[2:]
    names = [r.split(" | ")[0].removeprefix("| ") for r in rows]
    assert names == ["sigmoid_topk expert_bias", "topk_softmax", "topk_softmax E16G2T3S1"]
    assert rows[1].startswith("| topk_softmax | 4,194,304 | 0,1,2 |")
    assert "| topk_softmax E16G2T3S1 | 1 |" in table(tmp_path)
    (tmp_path / "dup").mkdir()
    (tmp_path / "dup" / "results.json").write_text((tmp_path / "s2" / "results.json").read_text())
    with pytest.raises(SystemExit, match="two complete runs"):
        compare(tmp_path)
