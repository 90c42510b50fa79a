"""One command regenerates every table and plot from run outputs:

python -m analysis.report logs/multirun/<name> [more dirs] --out report/
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from analysis import plots, tables
from analysis.collect import collect
from analysis.stats import paired


def report(roots: list[str], out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = collect(*roots)
    if df.empty:
        raise SystemExit(f"no results.json under {roots}")
    by = tables.varying_axes(df) or ["moe"]
    table = tables.summarize(df, by)
    files = {
        "runs": out / "runs.csv",
        "md": out / "table.md",
        "tex": out / "table.tex",
        "loss": out / "val_loss_vs_flops.png",
        "load": out / "expert_load.png",
    }
    df.to_csv(files["runs"], index=False)
    files["md"].write_text(tables.to_markdown(table, by))
    files["tex"].write_text(tables.to_latex(table, by))
    plots.loss_vs_flops(df, by, files["loss"])
    if plots.expert_load(df, by, files["load"]) is None:
        files.pop("load").unlink(missing_ok=True)  # no stale plot from an earlier report into this folder
    down = downstream_table(df, by)
    if down:
        files["downstream"] = out / "downstream.md"
        files["downstream"].write_text(down)
    return files


def _mean(col: pd.Series) -> str:
    return "—" if col.isna().all() else f"{col.mean():.4f}"


def downstream_table(df: pd.DataFrame, by: list[str]) -> str:
    """Per variant and task (the eval stage's ``downstream``): the MoE's score, its iso-FLOP twin's and its parent's
    (means over seeds), beside the val losses, and the MoE - twin difference with its paired 95% CI over seeds."""
    rows = []
    for _, r in df[df.status == "complete"].iterrows():
        down = json.loads((Path(r.run_dir) / "results.json").read_text()).get("downstream") or {}
        own = down.get("moe") or down.get("dense") or {}
        for task, m in own.items():
            metric = "acc_norm" if "acc_norm" in m else "acc"
            twin, parent = (down.get(k, {}).get(task, {}).get(metric) for k in ("dense_iso", "dense_parent"))
            rows.append(
                {
                    **{a: r[a] for a in by},
                    "task": task,
                    "metric": metric,
                    "score": m.get(metric),
                    "twin": twin,
                    "parent": parent,
                    "val_loss": r.val_loss,
                    "twin_val_loss": r.dense_iso_val_loss,
                }
            )
    if not rows:
        return ""
    t = pd.DataFrame(rows)
    header = [
        *by,
        "task",
        "val loss",
        "iso-FLOP val loss",
        "score",
        "iso-FLOP dense",
        "dense parent",
        "MoE - dense (95% CI)",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for keys, g in t.groupby([*by, "task", "metric"], dropna=False, sort=True):
        diffs = (g.score - g.twin).dropna()
        cells = [tables._cell(k) for k in keys[: len(by)]] + [f"{keys[len(by)]} ({keys[-1]})"]
        cells += [_mean(g[c]) for c in ("val_loss", "twin_val_loss", "score", "twin", "parent")]
        cells.append(paired(diffs).describe() if len(diffs) else "—")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("roots", nargs="+", help="run or multirun folders holding results.json files")
    ap.add_argument("--out", default="report")
    args = ap.parse_args()
    files = report(args.roots, args.out)
    print((Path(args.out) / "table.md").read_text())
    if "downstream" in files:
        print(files["downstream"].read_text())
    print("wrote", ", ".join(str(p) for p in files.values()))
    if "load" not in files:
        print(
            "expert_load.png: not drawn (no run logged moe/expert_load_cv: dense runs only, or MoE runs shorter "
            "than trainer.log_every_n_steps)"
        )


if __name__ == "__main__":
    main()
