"""Part G's analysis (analysis/granularity.py) on the committed records: the differences are taken inside a
replicate (lease, seed) and pooled over replicates; a cut-off replicate is listed, never pooled; a preset twice in
one replicate stops."""

import json
import shutil

import pytest

from analysis.granularity import _replicates, comparisons, granularity_markdown, granularity_runs

from helpers.e2e import ROOT

LEASE = ROOT / "results" / "granularity" / "G_s1"


def _replicate(tmp_path, lease: str, seed: int, shift: dict[str, float]):
    """A copy of the seed-1 records (config and results only) as ``lease``/seed ``seed``, each preset's final loss
    moved by ``shift[preset]`` and E8G1T1's twin by ``shift['twin']``."""
    for res_path in LEASE.rglob("results.json"):
        res = json.loads(res_path.read_text())
        if res.get("method") != "upcycle":
            continue
        run = tmp_path / lease / f"{res['moe']}_s{seed}"
        run.mkdir(parents=True)
        shutil.copy(res_path.parent / "config_resolved.yaml", run)
        res["config"] = {**res["config"], "seed": seed}
        res["val_loss"] += shift[res["moe"]]
        if "dense_iso" in res:
            res["dense_iso"] = {**res["dense_iso"], "val_loss": res["dense_iso"]["val_loss"] + shift["twin"]}
        (run / "results.json").write_text(json.dumps(res))


def test_the_committed_replicates_give_their_differences():
    df = granularity_runs(ROOT / "results" / "granularity")
    rows = comparisons(_replicates(df)[0])
    complete = sorted(set(df.lease) - {"G_s0"})  # G_s0's lease was cut off before E8G1T1's record
    assert len(complete) >= 2 and rows.n.tolist() == [len(complete)] * 3

    def loss(lease, moe):
        return df[(df.lease == lease) & (df.moe == moe)].val_loss.item()

    by_lease = [loss(lease, "E8G1T1") - loss(lease, "E32G4T4") for lease in complete]
    assert rows["mean"][0] == pytest.approx(sum(by_lease) / len(by_lease))  # positive: the finer preset lower
    assert rows.ci_lo[0] < rows["mean"][0] < rows.ci_hi[0]
    md = granularity_markdown(df)
    assert "| G_s1 | 1 | 0.6 |" in md and "| E8G1T1 − E32G4T4 |" in md
    assert "G_s0, seed 0: cut off (E8G1T1 without a final record); at step 2,099:" in md  # listed, not pooled


def test_three_replicates_give_a_verdict_and_a_duplicate_stops(tmp_path):
    for i, (lease, seed) in enumerate([("a", 0), ("a", 1), ("b", 0)]):  # two leases, seed 0 on both
        d = 0.001 * i
        _replicate(tmp_path, lease, seed, {"E8G1T1": 0.0, "E32G4T4": -0.02 - d, "E64G8T8": 0.01 + d, "twin": 0.05})
    rows = comparisons(_replicates(granularity_runs(tmp_path))[0]).set_index("comparison")
    assert rows.loc["E32G4T4 below E8G1T1", "verdict"] == "agrees" and rows.loc["E32G4T4 below E8G1T1", "n"] == 3
    assert rows.loc["E64G8T8 below E8G1T1", "verdict"] == "disagrees"
    twin = rows.loc["E8G1T1 below its iso-FLOP dense twin"]
    assert twin.n == 3 and twin.ci_lo > 0  # the twin moved 0.05 up: the MoE now lower on every replicate
    dup = tmp_path / "a" / "E32G4T4_s0_again"
    shutil.copytree(tmp_path / "a" / "E32G4T4_s0", dup)
    with pytest.raises(ValueError, match="holds E32G4T4 twice"):
        granularity_markdown(granularity_runs(tmp_path))
