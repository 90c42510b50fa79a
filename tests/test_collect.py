"""Collecting runs for the report (analysis/collect.py): each run counts once, so seeds are not inflated."""

import json

from analysis.collect import collect


def _run(folder, config_hash, seed, status="complete", loss=2.0):
    folder.mkdir(parents=True)
    cfg = {"seed": seed, "moe": {"routing": "softmax_topk"}}
    res = {"status": status, "config": cfg, "config_hash": config_hash, "val_loss": loss, "method": "upcycle"}
    (folder / "results.json").write_text(json.dumps(res))


def test_a_config_counts_once_per_sweep_whatever_its_spelling_and_links(tmp_path):
    sweep = tmp_path / "A" / "multirun" / "sweep_routing"
    _run(sweep / "routing=softmax_topk,seed=0,cfg=aaaa", "aaaa", 0, status="failed")
    _run(sweep / "seed=0,cfg=aaaa", "aaaa", 0)  # the same config again under another spelling: complete this time
    _run(sweep / "seed=1,cfg=bbbb", "bbbb", 1)
    (sweep.parent / "latest").symlink_to(sweep)  # a link to the sweep is not more runs
    _run(tmp_path / "B" / "multirun" / "sweep_routing" / "seed=0,cfg=aaaa", "aaaa", 0)  # another part: its own run
    df = collect(tmp_path)
    assert len(df) == 3
    assert sorted(df.status) == ["complete"] * 3  # the complete one of the two spellings is kept
