"""Walk run / multirun folders for results.json (and CSV metrics) -> one tidy pandas DataFrame."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from harness.moe import MoEConfig, preset_name

# config keys that identify a variant: the ablation axes of arXiv 2410.07524 and Drop-Upcycling
AXES = {
    "method": ("method",),
    "moe": ("moe", "num_experts"),
    "granularity": ("moe", "granularity"),
    "top_k": ("moe", "top_k"),
    "routing": ("moe", "routing"),
    "norm_topk_prob": ("moe", "norm_topk_prob"),
    "topk_scaling_factor": ("moe", "topk_scaling_factor"),
    "load_balancing": ("moe", "load_balancing"),
    "bias_update_rate": ("moe", "bias_update_rate"),
    "shared_experts": ("moe", "shared_experts"),
    "capacity_factor": ("moe", "capacity_factor"),
    "drop_policy": ("moe", "drop_policy"),
    "router_init": ("upcycle", "router_init"),
    "drop_ratio": ("upcycle", "drop_ratio"),
    "weight_scaling": ("upcycle", "weight_scaling"),
    "router_start": ("upcycle", "router_start"),
    "lr": ("optim", "lr"),
    "warmup_steps": ("optim", "warmup_steps"),
    "aux_loss_coef": ("moe", "aux_loss_coef"),
    "z_loss_coef": ("moe", "z_loss_coef"),
    "schedule": ("optim", "schedule"),
    "batch_size": ("data", "batch_size"),
    "model": ("model", "name"),
    "train_tokens": ("train", "tokens"),
    "pretrain_fraction": ("train", "pretrain_fraction"),  # a budget ladder's rung (train.tokens is then unused)
    "pretrain_fraction_d1": ("pretrain", "fraction"),  # D1: the base at this share of its pretraining (sunk cost)
    "seed": ("seed",),
}
# axes that only an upcycled run has: a dense continuation keeps ``moe`` (the preset whose FLOPs it matches),
# a pretraining run has none of them
RECIPE = (
    "routing",
    "norm_topk_prob",
    "topk_scaling_factor",
    "load_balancing",
    "bias_update_rate",
    "drop_policy",
    "router_init",
    "drop_ratio",
    "weight_scaling",
    "router_start",
    "aux_loss_coef",
    "z_loss_coef",
)


def get(cfg: dict, *keys, default=None):
    """cfg[k1][k2]..., or ``default`` where a key is missing (runs written before a key existed)."""
    for key in keys:
        if not isinstance(cfg, dict) or key not in cfg:
            return default
        cfg = cfg[key]
    return cfg


def _default(keys: tuple[str, ...]):
    """A moe key that a run written before it existed lacks ran at its default (e.g. load_balancing=aux_loss), so
    old and new runs of one recipe group together; other missing keys stay None."""
    if len(keys) == 2 and keys[0] == "moe" and keys[1] in MoEConfig.__dataclass_fields__:
        return MoEConfig.__dataclass_fields__[keys[1]].default
    if keys == ("pretrain", "fraction"):  # before the key: the base was the whole pretraining
        return 1.0
    return None


def load_run(path: Path) -> dict:
    res = json.loads(path.read_text())
    cfg = res.get("config", {})
    row = {name: get(cfg, *keys, default=_default(keys)) for name, keys in AXES.items()}
    if row["moe"] is not None:
        row["moe"] = preset_name(row["moe"], row["granularity"], row["top_k"], row["shared_experts"] or 0)
    if row["routing"] == "topk_softmax":  # its T weights sum to 1 by construction: the knob changes nothing
        row["norm_topk_prob"] = None
    if row["method"] in ("dense", "pretrain"):  # its config still holds these blocks; they changed nothing
        row.update(dict.fromkeys(RECIPE))
        if row["method"] == "pretrain":
            row.update(moe=None, granularity=None, top_k=None)
    iso = res.get("dense_iso") or {}
    row.update(
        status=res.get("status"),
        error=res.get("error"),
        run_dir=str(path.parent),
        val_loss=res.get("val_loss"),
        best_val_loss=res.get("best_val_loss"),
        init_val_loss=res.get("init_val_loss"),
        dense_parent_val_loss=res.get("dense_parent_val_loss"),
        dense_iso_val_loss=iso.get("val_loss"),
        dense_iso_train_flops=iso.get("train_flops"),
        tokens=res.get("tokens"),
        train_flops=res.get("train_flops"),
        params_total=res.get("params_total"),
        params_active=res.get("params_active"),
        wall_time_s=res.get("wall_time_s"),
    )
    return row


def _set_aside(path: Path) -> bool:
    """A run moved aside by force=true (``<dir>.old-<time>``) or a damaged file (``.corrupt-<time>``)."""
    return any(".old-" in part or ".corrupt-" in part for part in path.parts)


def collect(*roots: str | Path) -> pd.DataFrame:
    """One row per run under ``roots`` (failed runs included, with their status and error). A run counts once:
    a ``latest`` link is not a second run, nor is the same config (same hash: the seed is part of it) run again
    under another spelling of its overrides, in another sweep or under another ``name`` (it would count as one
    more seed, with a spread of zero). Bases at shares of a pretraining (``pretrain.fraction``, a sunk-cost grid's
    D1) get a column ``pretrain_fraction_d1``, an axis, so a report never pools runs off different bases; where every
    base is a whole pretraining the column is left out, as identity.py leaves neutral keys out of hashes."""
    runs: dict = {}
    for root in roots:
        for p in sorted(Path(root).rglob("results.json")):
            if "dense_continuation" in p.parts or _set_aside(p):
                continue
            folder = p.resolve().parent
            config_hash = json.loads(p.read_text()).get("config_hash")
            key = config_hash or folder
            row = load_run(p)
            if key not in runs or (runs[key]["status"] != "complete" and row["status"] == "complete"):
                runs[key] = row
    df = pd.DataFrame(list(runs.values()))
    if "pretrain_fraction_d1" in df and (df.pretrain_fraction_d1.astype(float) == 1.0).all():
        df = df.drop(columns="pretrain_fraction_d1")  # the neutral value (whole-pretraining bases): no column
    return df


def curves(df: pd.DataFrame) -> pd.DataFrame:
    """Validation curves (step, tokens, FLOPs, val loss) of every run, and of its iso-FLOP dense continuation."""
    out = []
    for _, row in df.iterrows():
        res = json.loads((Path(row.run_dir) / "results.json").read_text())
        for kind, points in (
            ("run", res.get("val_curve", [])),
            ("dense_iso", (res.get("dense_iso") or {}).get("val_curve", [])),
        ):
            out += [{"run_dir": row.run_dir, "curve": kind, **p} for p in points]
    return pd.DataFrame(out)


def metrics(run_dir: str | Path) -> pd.DataFrame:
    """The CSV logger's metrics of one run (all versions, i.e. across resumes, or a lone ``metrics.csv`` copied
    beside its config), one row per step."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_symlink():  # a job skipped for its config's run elsewhere: that run's logs
        run_dir = (run_dir / "results.json").resolve().parent
    files = sorted(run_dir.glob("csv/version_*/metrics.csv")) or sorted(run_dir.glob("metrics.csv"))
    if not files:
        return pd.DataFrame()
    df = pd.concat([pd.read_csv(f) for f in files], ignore_index=True)
    return df.groupby("step", as_index=False).first() if "step" in df else df
