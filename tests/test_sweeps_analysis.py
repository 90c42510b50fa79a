"""Named sweeps compose; a tiny sweep runs end to end and its table and plots regenerate from the outputs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from analysis.collect import collect
from analysis.report import report

from helpers.e2e import ROOT

SWEEPS = sorted(p.stem for p in (ROOT / "sweeps" / "sweep").glob("*.yaml"))


def test_every_named_sweep_composes_with_its_grid():
    assert {"routing", "granularity", "weight_scaling", "init", "lr", "batch_size", "iso_flop", "seeds"} <= set(SWEEPS)
    for name in SWEEPS:
        proc = subprocess.run(
            [sys.executable, "run.py", f"+sweep={name}", "+scale=cpu", "--cfg", "hydra"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "params:" in proc.stdout and "seed:" in proc.stdout, name


# sweeps on one dense base; sunk_cost (three bases, its table is analysis.law's) runs in tests/test_sunk_cost.py
JOBS = {
    "balancing": 5,
    "batch_size": 3,
    "capacity": 5,
    "granularity": 4,
    "init": 3,
    "iso_flop": 3,
    "lr": 3,
    "score_function": 3,
    "seeds": 2,
    "shared_experts": 3,
    "weight_scaling": 4,
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(JOBS))
def test_named_sweep_runs_on_cpu_and_its_table_regenerates(env, tmp_path, name):
    """Every ablation end to end with its tiny CPU preset (one seed; `seeds` with two)."""
    seeds = "seed=0,1" if name == "seeds" else "seed=0"
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            f"+sweep={name}",
            "+scale=cpu",
            seeds,
            "logger=csv",
            "print_config=false",
            "trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "UPCYCLE_LOGS": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "multirun" / f"sweep_{name}"
    df = collect(sweep)
    assert len(df) == JOBS[name] and (df.status == "complete").all()
    bases = {json.loads(p.read_text())["dense_base"] for p in sweep.glob("*/results.json")}
    assert len(bases) == 1  # every variant upcycles (or continues) the same dense checkpoint
    files = report([str(sweep)], tmp_path / "report")
    table = files["md"].read_text()
    n_variants = 1 if name == "seeds" else JOBS[name]
    assert table.count("\n|") - 1 == n_variants and "**" in table  # one row per variant (+ header rule)
    assert files["loss"].stat().st_size > 10_000


@pytest.mark.slow
def test_routing_sweep_runs_and_report_regenerates(env, tmp_path, monkeypatch):
    proc = subprocess.run(
        [
            sys.executable,
            "run.py",
            "-m",
            "+sweep=routing",
            "+scale=cpu",
            "seed=0,1",
            "logger=csv",
            "print_config=false",
            "trainer.enable_progress_bar=false",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "UPCYCLE_LOGS": str(tmp_path)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "multirun" / "sweep_routing"
    df = collect(sweep)
    assert len(df) == 4 and set(df.routing) == {"softmax_topk", "topk_softmax"} and (df.status == "complete").all()
    files = report([str(sweep)], tmp_path / "report")
    md = files["md"].read_text()
    assert "softmax_topk" in md and "topk_softmax" in md and "**" in md  # best row marked
    assert md.count("±") >= 2  # mean ± std over 2 seeds
    assert r"\begin{tabular}" in files["tex"].read_text()
    for key in ("loss", "load"):
        assert files[key].stat().st_size > 10_000  # a real PNG with curves
    again = report([str(sweep)], tmp_path / "report2")
    assert again["md"].read_text() == md  # regenerates identically from the same outputs
    _execute_notebook(sweep, tmp_path / "nb", monkeypatch)


def _execute_notebook(runs: Path, out: Path, monkeypatch) -> None:
    """Run the jupytext notebook top to bottom in a real kernel (nbclient) on a sweep's outputs."""
    import jupytext
    import pandas as pd
    from nbclient import NotebookClient

    monkeypatch.setenv("UPCYCLE_RUNS", str(runs))
    monkeypatch.setenv("UPCYCLE_NOTEBOOK_OUT", str(out))
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    nb = jupytext.read(ROOT / "analysis" / "notebooks" / "iso_flop.py")
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    table = pd.read_csv(out / "notebook_iso_flop.csv")
    assert set(table.routing) == {"softmax_topk", "topk_softmax"} and (table.seeds == 2).all()
    assert (out / "notebook_iso_flop.png").stat().st_size > 10_000


def test_table_counts_stay_integers_when_every_axis_is_numeric():
    """An LR sweep's rows are all numbers; pandas then hands each row back as floats ('3.0 seeds')."""
    import pandas as pd

    from analysis.tables import summarize, to_markdown

    df = pd.DataFrame(
        {
            "lr": [3e-4] * 3 + [1e-3] * 3,
            "seed": [0, 1, 2] * 2,
            "status": ["complete"] * 5 + ["failed"],
            "val_loss": [1.82, 1.83, 1.81, 1.9, 1.91, float("nan")],
            "init_val_loss": [2.0] * 6,
            "dense_iso_val_loss": [float("nan")] * 6,
            "train_flops": [1e15] * 6,
        }
    )
    md = to_markdown(summarize(df, ["lr"]), ["lr"])
    assert "| 0.0003 | **1.8200 ± 0.0100** | — | 2.0000 | 3 | 0 |" in md
    assert "| 0.001 | 1.9050 ± 0.0071 | — | 2.0000 | 2 | 1 |" in md


def test_each_ladder_variant_sets_its_recipe_and_nothing_else():
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from harness.identity import experiment_config
    from harness.resolvers import register

    register()
    want = {
        "exact_start": {},
        "topk_softmax": {("moe", "routing"): "topk_softmax"},
        "megatron_start": {
            ("upcycle", "weight_scaling"): "paper",
            ("upcycle", "router_start"): "fixed",
            ("upcycle", "router_logit_std"): None,  # a fixed router std (moe.router_init_std) instead
        },
        "drop_upcycling": {("upcycle", "router_init"): "random", ("upcycle", "drop_ratio"): 0.5},
    }
    assert sorted(p.stem for p in (ROOT / "sweeps" / "variant").glob("*.yaml")) == sorted(want)

    def flat(cfg) -> dict:
        return dict(_flatten(OmegaConf.to_container(OmegaConf.create(experiment_config(cfg)))))

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        base = flat(compose("config", overrides=["+sweep=ladder"]))
        for name, changes in want.items():
            got = flat(compose("config", overrides=["+sweep=ladder", f"+variant={name}"]))
            diff = {k: got.get(k) for k in got.keys() | base.keys() if got.get(k) != base.get(k)}
            assert diff == changes, name


def _flatten(d: dict, prefix: tuple = ()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield from _flatten(v, prefix + (k,))
        else:
            yield prefix + (k,), v
