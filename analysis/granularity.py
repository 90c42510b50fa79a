"""Part G: expert granularity at equal active FLOPs at the ladder's largest budget, paired by replicate.

    python -m analysis.study results/runs ... --granularity results/granularity --out results   # granularity.md/.csv

Each folder under the root is one lease: the base pretrained on that machine and one or more seeds, each seed
upcycling that base to E8G1T1, E32G4T4 and E64G8T8 (virtual-group router init, exact start). A replicate is one
(lease, seed): the three MoEs of a replicate share their base and seed, so the differences are taken inside it
(finer minus E8G1T1; E8G1T1 minus its iso-FLOP dense twin) and then pooled over replicates with the rule of
:func:`analysis.stats.verdict`. Replicates on different leases sit on bases pretrained on different machines
(same corpus, config and cache key; bf16 and atomics make them differ by a few thousandths), so their spread
holds the base's run-to-run noise as well as the seed's: the CI is for the whole recipe, base included.

A replicate missing a run (a lease cut off before it finished) is left out of the pooled rows and listed with its
validation losses at the last step all its runs reached, from their curves.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd

from analysis.collect import get as _get
from analysis.collect import metrics
from analysis.stats import MIN_SEEDS, paired, verdict
from harness.moe import preset_name

COARSE = "E8G1T1"  # granularity 1: one expert the dense MLP's size, top-1
FINER = ("E32G4T4", "E64G8T8")  # the same active FLOPs in 4x and 8x smaller experts


def granularity_runs(root: str | Path) -> pd.DataFrame:
    """One row per upcycled run under ``root`` (complete or not): its lease (the first folder under root), seed,
    preset, budget, final losses (NaN when cut off) and its iso-FLOP twin's."""
    root = Path(root)
    rows = []
    for cfg_path in sorted(root.rglob("config_resolved.yaml")):
        run_dir = cfg_path.parent
        res_path = run_dir / "results.json"
        res = json.loads(res_path.read_text()) if res_path.exists() else {}
        if res and res.get("method") != "upcycle":
            continue
        cfg = res.get("config") or _yaml(cfg_path)
        if cfg.get("method") != "upcycle":
            continue
        moe = cfg["moe"]
        complete = res.get("status") == "complete"
        rows.append(
            {
                "lease": run_dir.relative_to(root).parts[0],
                "seed": int(cfg["seed"]),
                "moe": preset_name(moe["num_experts"], moe["granularity"], moe["top_k"]),
                "budget": _get(cfg, "train", "pretrain_fraction"),
                "complete": complete,
                "steps": res.get("steps") if complete else math.nan,
                "dense_parent_val_loss": res.get("dense_parent_val_loss", math.nan),
                "val_loss": res["val_loss"] if complete else math.nan,
                "dense_iso_val_loss": (res.get("dense_iso") or {}).get("val_loss", math.nan) if complete else math.nan,
                "run_dir": str(run_dir),
            }
        )
    return pd.DataFrame(rows)


def _yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=False)


def _replicates(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(complete replicates, one row each with every preset's loss; the replicates missing a final loss)."""
    if df.empty:
        return pd.DataFrame(), pd.DataFrame()
    for key, g in df.groupby(["lease", "seed", "moe", "budget"], dropna=False):
        if len(g) > 1:
            raise ValueError(f"one replicate holds {key[2]} twice (drop one): {g.run_dir.tolist()}")
    wide = df.pivot_table(index=["lease", "seed", "budget"], columns="moe", values="val_loss", dropna=False)
    presets = [COARSE, *FINER]
    wide = wide.reindex(columns=presets)
    first = df.groupby(["lease", "seed", "budget"]).first()
    coarse = df[df.moe == COARSE].set_index(["lease", "seed", "budget"])
    wide["dense_parent"] = first.dense_parent_val_loss
    wide["dense_iso"] = coarse.dense_iso_val_loss.reindex(wide.index)
    done = wide[presets].notna().all(axis=1)
    return wide[done].reset_index(), wide[~done].reset_index()


def _row(what: str, diff: str, diffs: pd.Series, paper: str) -> dict:
    s = paired(diffs)
    n = len(diffs)
    said = verdict(diffs) if n >= MIN_SEEDS or n == 0 else f"{n} replicate{'s' if n > 1 else ''}: no verdict"
    return {
        "comparison": what,
        "difference": diff,
        "paper": paper,
        "n": n,
        "mean": s.mean,
        "ci_lo": s.lo,
        "ci_hi": s.hi,
        "verdict": said,
    }


def comparisons(done: pd.DataFrame) -> pd.DataFrame:
    """The paired rows: each finer preset against E8G1T1 (positive: the finer one lower, as 2410.07524 reports),
    and E8G1T1 against its iso-FLOP dense twin (positive: the MoE lower)."""
    rows = []
    for finer in FINER:
        diffs = (done[COARSE] - done[finer]) if not done.empty else pd.Series([], dtype=float)
        paper = f"{finer} lower (finer experts help)"
        rows.append(_row(f"{finer} below {COARSE}", f"{COARSE} − {finer}", diffs.dropna(), paper))
    twin = (done.dense_iso - done[COARSE]).dropna() if not done.empty else pd.Series([], dtype=float)
    paper = "the MoE lower at equal training FLOPs"
    rows.append(_row(f"{COARSE} below its iso-FLOP dense twin", f"twin − {COARSE}", twin, paper))
    return pd.DataFrame(rows)


def _cut_off(df: pd.DataFrame, partial: pd.DataFrame) -> list[str]:
    """Each incomplete replicate's losses at the last validation step all its runs reached."""
    lines = []
    for _, rep in partial.iterrows():
        runs = df[(df.lease == rep.lease) & (df.seed == rep.seed) & (df.budget == rep.budget)]
        curves = {r.moe: metrics(r.run_dir) for r in runs.itertuples()}
        curves = {m: c.dropna(subset=["val/loss"]) for m, c in curves.items() if "val/loss" in c}
        if not curves:
            continue
        step = min(int(c.step.max()) for c in curves.values())
        at = {m: float(c[c.step == step]["val/loss"].iloc[0]) for m, c in curves.items() if (c.step == step).any()}
        cells = ", ".join(f"{m} {at[m]:.4f}" for m in [COARSE, *FINER] if m in at)
        missing = ", ".join(r.moe for r in runs.itertuples() if not r.complete)
        lines.append(
            f"- {rep.lease}, seed {rep.seed}: cut off ({missing} without a final record); at step {step:,}: {cells}"
        )
    return lines


def _fmt(x: float) -> str:
    return "-" if x != x else f"{x:.4f}"


def granularity_markdown(df: pd.DataFrame) -> str:
    done, partial = _replicates(df)
    lines = [
        "| lease | seed | budget | dense parent | E8G1T1 | its iso-FLOP twin | E32G4T4 | E64G8T8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in done.itertuples():
        cells = [r.dense_parent, getattr(r, COARSE), r.dense_iso, *(getattr(r, f) for f in FINER)]
        lines.append(f"| {r.lease} | {r.seed} | {r.budget:g} | " + " | ".join(_fmt(c) for c in cells) + " |")
    lines += [
        "",
        "| comparison | paper | replicates | paired difference | mean [95% CI] (positive: as the paper) | verdict |",
        "|---|---|---|---|---|---|",
    ]
    for r in comparisons(done).itertuples():
        ci = "" if r.ci_lo != r.ci_lo else f" [{r.ci_lo:+.4f}, {r.ci_hi:+.4f}]"
        mean = "-" if r.mean != r.mean else f"{r.mean:+.4f}"
        lines.append(f"| {r.comparison} | {r.paper} | {r.n} | {r.difference} | {mean}{ci} | {r.verdict} |")
    cut = _cut_off(df, partial)
    if cut:
        lines += ["", "Left out of the paired rows:", *cut]
    return "\n".join(lines) + "\n"


def granularity(root: str | Path, out: str | Path) -> dict[str, Path]:
    """granularity.md (per-replicate losses, the paired rows, the cut-off replicates) and granularity.csv."""
    out = Path(out)
    df = granularity_runs(root)
    done, _ = _replicates(df)
    files = {"granularity_md": out / "granularity.md", "granularity_csv": out / "granularity.csv"}
    files["granularity_md"].write_text(granularity_markdown(df))
    comparisons(done).to_csv(files["granularity_csv"], index=False, float_format="%.6f")
    return files
