"""The committed study (results/) regenerates from its committed run outputs with one command."""

import pandas as pd

from analysis.study import FINDINGS, study, verdict

from helpers.e2e import ROOT


def test_study_tables_regenerate_byte_for_byte(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # run_dir columns are relative to the repository, as committed
    files = study(["results/runs"], tmp_path, "results/partial", "results/ladder")
    compared = 0
    for path in files.values():
        committed = ROOT / "results" / path.relative_to(tmp_path)
        assert committed.exists(), (
            f"{committed} is not committed (run: python -m analysis.study results/runs --partial results/partial "
            "--ladder results/ladder --out results)"
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
