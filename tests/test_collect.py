"""Collecting runs for the report (analysis/collect.py): each config counts once, so seeds are not inflated."""

import json

from analysis.collect import collect
from analysis.tables import summarize, to_markdown, varying_axes


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
    _run(tmp_path / "B" / "multirun" / "sweep_routing" / "seed=0,cfg=aaaa", "aaaa", 0)  # a second sweep: same run
    _run(tmp_path / "runs" / "default" / "cfg=bbbb", "bbbb", 1)  # the single run of a sweep's job: same run
    _run(tmp_path / "runs" / "default" / "seed=2,cfg=cccc", "cccc", 2)
    df = collect(tmp_path)
    assert sorted(df.seed) == [0, 1, 2]  # three configs, three seeds: not five
    assert sorted(df.status) == ["complete"] * 3  # the complete one of the two spellings is kept


def _method_run(folder, method, routing, loss):
    folder.mkdir(parents=True)
    cfg = {"method": method, "seed": 0, "moe": {"num_experts": 8, "granularity": 1, "top_k": 2, "routing": routing}}
    res = {"status": "complete", "config": cfg, "config_hash": folder.name, "val_loss": loss, "method": method}
    (folder / "results.json").write_text(json.dumps(res))


def test_a_dense_run_has_no_routing_and_does_not_make_routing_an_axis(tmp_path):
    """``method=dense moe=E8G1T2`` keeps the moe block (the preset whose FLOPs it matches) but trains no router:
    its routing is blank, and an upcycle-vs-dense sweep of one routing gets no routing column."""
    _method_run(tmp_path / "m=upcycle", "upcycle", "softmax_topk", 2.0)
    _method_run(tmp_path / "m=dense", "dense", "softmax_topk", 2.1)
    df = collect(tmp_path)
    assert df.set_index("method").loc["dense", "moe"] == "E8G1T2"
    assert df.set_index("method").loc["dense", ["routing", "weight_scaling", "router_start"]].isna().all()
    assert varying_axes(df) == ["method"]

    _method_run(tmp_path / "m=upcycle,r=topk", "upcycle", "topk_softmax", 1.9)
    df = collect(tmp_path)
    by = varying_axes(df)
    assert by == ["method", "routing"]
    table = to_markdown(summarize(df, by), by)
    assert "| dense | — | 2.1000 |" in table and "| upcycle | topk_softmax | **1.9000** |" in table


def test_norm_topk_prob_is_blank_for_topk_softmax_which_renormalises_by_construction(tmp_path):
    """A score-function sweep's table reads renormalisation where it is a choice: ``topk_softmax`` always sums its
    T weights to 1 (moe.norm_topk_prob is ignored there), so its cell is blank, not a misleading False."""
    runs = (("softmax_topk", False, 2.0), ("sigmoid_topk", True, 2.1), ("topk_softmax", False, 1.9))
    for routing, norm, loss in runs:
        folder = tmp_path / f"{routing},{norm}"
        folder.mkdir()
        cfg = {"seed": 0, "moe": {"routing": routing, "norm_topk_prob": norm}}
        res = {"status": "complete", "config": cfg, "config_hash": folder.name, "val_loss": loss, "method": "upcycle"}
        (folder / "results.json").write_text(json.dumps(res))
    df = collect(tmp_path).set_index("routing")
    assert df.loc["softmax_topk", "norm_topk_prob"] is False and df.loc["sigmoid_topk", "norm_topk_prob"] is True
    assert df.loc["topk_softmax", ["norm_topk_prob"]].isna().all()
    by = varying_axes(df.reset_index())
    assert by == ["routing", "norm_topk_prob"]
    assert "| topk_softmax | — | **1.9000** |" in to_markdown(summarize(df.reset_index(), by), by)


def test_searched_knobs_are_axes_and_searched_floats_read_short(tmp_path):
    """An Optuna study varies lr, warmup and the aux-loss coefficient: each is a column, its floats 4 digits."""
    trials = [(0.0022505863330860372, 40, 0.07780155576901421), (0.001, 20, 0.01), (0.03, 0, 0.1)]
    for i, (lr, warmup, aux) in enumerate(trials):
        folder = tmp_path / f"trial{i}"
        folder.mkdir()
        cfg = {"seed": 0, "optim": {"lr": lr, "warmup_steps": warmup}, "moe": {"aux_loss_coef": aux}}
        status = "pruned" if i == 2 else "complete"
        res = {"status": status, "config": cfg, "config_hash": str(i), "val_loss": 2.0 + i, "method": "upcycle"}
        (folder / "results.json").write_text(json.dumps(res))
    df = collect(tmp_path)
    by = varying_axes(df)
    assert by == ["lr", "warmup_steps", "aux_loss_coef"]
    table = to_markdown(summarize(df, by), by)
    assert "| 0.002251 | 40 | 0.0778 | **2.0000** |" in table and "| 0.001 | 20 | 0.01 | 3.0000 |" in table
    assert "| seeds | failed | pruned |" in table and table.endswith("| 0.03 | 0 | 0.1 | — | — | — | 0 | 0 | 1 |\n")


def test_bases_at_different_shares_of_the_pretraining_are_not_pooled(tmp_path):
    """A sunk-cost grid's runs differ only by pretrain.fraction (D1): they are separate rows of a report, not seeds
    of one; runs whose bases are whole pretrainings (no pretrain block, or fraction 1) get no D1 column."""
    for name, fraction, loss in (("whole", None, 2.0), ("one", 1.0, 2.0), ("half", 0.5, 2.3)):
        folder = tmp_path / name
        folder.mkdir()
        cfg = {"seed": 0, "moe": {"num_experts": 8, "granularity": 1, "top_k": 2, "routing": "softmax_topk"}}
        if fraction is not None:
            cfg["pretrain"] = {"fraction": fraction}
        res = {"status": "complete", "config": cfg, "config_hash": name, "val_loss": loss, "method": "upcycle"}
        (folder / "results.json").write_text(json.dumps(res))
    assert "pretrain_fraction_d1" not in collect(tmp_path / "whole", tmp_path / "one")
    df = collect(tmp_path)
    by = varying_axes(df)
    assert by == ["pretrain_fraction_d1"]
    table = summarize(df, by)
    assert len(table) == 2 and sorted(table.seeds) == [1, 2]  # fraction 1 and unset: one base; 0.5 its own row


def test_a_budget_axis_reads_as_an_integer_beside_the_tokens_really_trained(tmp_path):
    """train.tokens=2000 trains 2,048 (whole steps of 1,024): the table shows both, and the setting as 2000, not
    the 2000.0 a row of numbers comes back as."""
    for tokens, trained, loss in ((2000, 2048, 3.65), (4000, 4096, 3.66)):
        folder = tmp_path / f"train.tokens={tokens},cfg={tokens}"
        folder.mkdir()
        cfg = {"seed": 0, "train": {"tokens": tokens}, "moe": {"routing": "softmax_topk"}}
        res = {"status": "complete", "config": cfg, "config_hash": str(tokens), "val_loss": loss, "tokens": trained}
        (folder / "results.json").write_text(json.dumps({**res, "method": "upcycle", "init_val_loss": 3.7}))
    df = collect(tmp_path)
    by = varying_axes(df)
    assert by == ["train_tokens"]
    md = to_markdown(summarize(df, by), by)
    assert "| train_tokens | tokens trained | val loss |" in md
    assert "| 2000 | 2,048 | **3.6500** |" in md and "| 4000 | 4,096 | 3.6600 |" in md


def test_a_skipped_jobs_link_reads_the_logs_of_the_run_it_points_to(tmp_path):
    """A sweep job skipped for its config's run elsewhere holds only a results.json link (harness.results.link):
    its metrics, and so the expert-load plot, are that run's."""
    from analysis.collect import metrics
    from analysis.plots import expert_load
    from harness.results import link

    real = tmp_path / "runs" / "default" / "cfg=aaaa"
    _run(real, "aaaa", 0)
    (real / "csv" / "version_0").mkdir(parents=True)
    (real / "csv" / "version_0" / "metrics.csv").write_text("step,moe/expert_load_cv\n4,0.30\n9,0.25\n")
    stub = tmp_path / "multirun" / "sweep" / "routing=softmax_topk,cfg=aaaa"
    stub.mkdir(parents=True)
    link(stub, real)
    assert (stub / "results.json").is_symlink()
    assert list(metrics(stub)["moe/expert_load_cv"]) == [0.30, 0.25]
    df = collect(tmp_path / "multirun")
    assert df.run_dir.tolist() == [str(stub / "results.json").rsplit("/", 1)[0]]
    assert expert_load(df, ["moe"], tmp_path / "load.png") is not None
