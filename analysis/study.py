"""The study's findings table (results/README.md) and every sweep's table and plots, from committed runs:

    python -m analysis.study results/runs --partial results/partial --out results

Each finding of arXiv 2410.07524 / 2502.19261 is a comparison of two variants *on the same dense base*
(one study part, results/runs/<part>), paired by seed; the row gives both means, the seed spread, the mean
paired difference with its 95% CI and a verdict from a fixed rule (analysis/stats.py), so regenerating gives the
same words as well as the same numbers. A finding run on several bases gets one row per base: seeds of
different bases are different experiments, never pooled into one count.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pandas as pd

from analysis.collect import collect, metrics
from analysis.granularity import granularity
from analysis.ladder import ladder
from analysis.law import law
from analysis.report import report
from analysis.stats import paired, verdict

# selection of the variant rows, by collect()'s columns; base recipe: E8G1T2, softmax_topk, paper scaling, lr 1e-3
BASE = {"method": "upcycle", "drop_ratio": 0.0, "weight_scaling": "paper", "lr": 1e-3, "routing": "softmax_topk"}
FINE = {**BASE, "router_init": "virtual_group"}

# (finding, what the paper reports, favoured variant, other variant); a variant is (label, selection)
FINDINGS = [
    (
        "softmax->topK beats topK->softmax",
        "softmax_topk lower loss (2410.07524)",
        ("softmax_topk", {**BASE, "moe": "E8G1T2"}),
        ("topk_softmax", {**BASE, "moe": "E8G1T2", "routing": "topk_softmax"}),
    ),
    (
        "upcycling beats iso-FLOP dense continuation (E8G1T2)",
        "MoE lower loss at equal training FLOPs",
        ("MoE E8G1T2", {**BASE, "moe": "E8G1T2"}),
        ("dense iso-FLOP", "dense_iso"),
    ),
    (
        "upcycling beats iso-FLOP dense continuation (E64G8T8)",
        "MoE lower loss at equal training FLOPs",
        ("MoE E64G8T8", {**FINE, "moe": "E64G8T8"}),
        ("dense iso-FLOP", "dense_iso"),
    ),
    (
        "higher granularity helps (G=8 vs G=1, equal active FLOPs)",
        "E64G8T8 lower loss than E8G1T1",
        ("E64G8T8", {**FINE, "moe": "E64G8T8"}),
        ("E8G1T1", {**FINE, "moe": "E8G1T1"}),
    ),
    (
        "higher granularity helps (G=4 vs G=1, equal active FLOPs)",
        "E32G4T4 lower loss than E8G1T1",
        ("E32G4T4", {**FINE, "moe": "E32G4T4"}),
        ("E8G1T1", {**FINE, "moe": "E8G1T1"}),
    ),
    (
        "weight scaling lowers loss ~1.5% (E64G8T8)",
        "~1.5% lower loss with scaling",
        ("scaling=paper", {**FINE, "moe": "E64G8T8"}),
        ("scaling=none", {**FINE, "moe": "E64G8T8", "weight_scaling": "none"}),
    ),
    (
        "upcycling beats iso-FLOP dense continuation (E8G1T2, peak LR 3e-4)",
        "MoE lower loss at equal training FLOPs",
        ("MoE E8G1T2 lr 3e-4", {**BASE, "moe": "E8G1T2", "lr": 3e-4}),
        ("dense iso-FLOP", "dense_iso"),
    ),
    (
        "virtual-group router init beats copy init (E32G4T4)",
        "virtual groups lower loss for G > 1 (2410.07524)",
        ("virtual_group", {**FINE, "moe": "E32G4T4"}),
        ("copy", {**BASE, "moe": "E32G4T4", "router_init": "random"}),
    ),
    (
        "Drop-Upcycling (r=0.5) helps with longer training (E32G4T4)",
        "lower loss than copy, growing with tokens",
        ("drop r=0.5", {**BASE, "moe": "E32G4T4", "drop_ratio": 0.5, "router_init": "random"}),
        ("copy", {**BASE, "moe": "E32G4T4", "router_init": "random"}),
    ),
]


def _select(df: pd.DataFrame, sel: dict) -> pd.DataFrame:
    """The complete runs matching ``sel``: at most one per (part, seed), else pairing by seed would make
    cartesian pairs out of the duplicates."""
    rows = df[(df.status == "complete")]
    for key, value in sel.items():
        col = rows[key]
        rows = rows[(col - value).abs() < 1e-12] if isinstance(value, float) else rows[col == value]
    dup = rows[rows.duplicated(["part", "seed"], keep=False)]
    if len(dup):
        raise ValueError(
            f"{len(dup)} runs match {sel} at one (part, seed): " + ", ".join(sorted(dup.run_dir)) + " (keep one)"
        )
    return rows


def _side(df: pd.DataFrame, sel, favoured: pd.DataFrame) -> pd.Series:
    """Final val loss by (part, seed)."""
    if sel == "dense_iso":  # the iso-FLOP dense continuation of the favoured run, same seed and base
        return favoured.set_index(["part", "seed"]).dense_iso_val_loss.dropna()
    return _select(df, sel).set_index(["part", "seed"]).val_loss


def _row(name, claim, fav_label, oth_label, fav: pd.Series, oth: pd.Series, base: str) -> dict:
    diffs = (oth - fav).sort_index()
    n, s = len(diffs), paired(diffs)
    return {
        "finding": name,
        "paper": claim,
        "favoured": fav_label,
        "other": oth_label,
        "part": base,
        "seeds": n,
        "favoured_loss": fav.mean() if n else math.nan,
        "favoured_std": fav.std(ddof=1) if n > 1 else math.nan,
        "other_loss": oth.mean() if n else math.nan,
        "other_std": oth.std(ddof=1) if n > 1 else math.nan,
        "delta_pct": 100 * (diffs / oth).mean() if n else math.nan,
        "diff_mean": s.mean,
        "diff_ci_lo": s.lo,
        "diff_ci_hi": s.hi,
        "p_value": s.p,
        "diff_min": diffs.min() if n else math.nan,
        "diff_max": diffs.max() if n else math.nan,
        "verdict": verdict(diffs),
    }


def findings(df: pd.DataFrame) -> pd.DataFrame:
    """One row per finding and base (part): pairs are by seed within one base; a finding run on several bases
    gets a row per base, its ``part`` naming the others (``B (of A,B)``)."""
    out = []
    for name, claim, (fav_label, fav_sel), (oth_label, oth_sel) in FINDINGS:
        fav_rows = _select(df, fav_sel)
        fav = fav_rows.set_index(["part", "seed"]).val_loss
        oth = _side(df, oth_sel, fav_rows)
        both = fav.index.intersection(oth.index)
        parts = sorted({p for p, _ in both})
        if not parts:
            out.append(_row(name, claim, fav_label, oth_label, fav[both], oth[both], "-"))
        for part in parts:
            idx = [k for k in both if k[0] == part]
            base = part if len(parts) == 1 else f"{part} (of {','.join(parts)})"
            out.append(_row(name, claim, fav_label, oth_label, fav[idx], oth[idx], base))
    return pd.DataFrame(out)


def _fmt(x: float, std: float = float("nan")) -> str:
    if x != x:
        return "-"
    return f"{x:.4f}" + ("" if std != std else f" ± {std:.4f}")


def _ci(lo: float, hi: float) -> str:
    return "[-]" if lo != lo else f"[{lo:+.4f}, {hi:+.4f}]"


def findings_markdown(f: pd.DataFrame) -> str:
    head = (
        "| finding | paper | ours: favoured | ours: other | Δ (other−fav)/other | paired diff (other−fav): mean "
        "[95% CI] | p | seeds | base | verdict |\n"
        "|---|---|---|---|---|---|---|---|---|---|\n"
    )
    rows = [
        f"| {r.finding} | {r.paper} | {r.favoured}: {_fmt(r.favoured_loss, r.favoured_std)} | "
        f"{r.other}: {_fmt(r.other_loss, r.other_std)} | "
        f"{'-' if r.delta_pct != r.delta_pct else f'{r.delta_pct:+.2f}%'} | "
        f"{'-' if r.diff_mean != r.diff_mean else f'{r.diff_mean:+.4f} {_ci(r.diff_ci_lo, r.diff_ci_hi)}'} | "
        f"{'-' if r.p_value != r.p_value else f'{r.p_value:.2g}'} | {r.seeds} | {r.part} | "
        f"**{r.verdict}** |"
        for r in f.itertuples()
    ]
    return head + "\n".join(rows) + "\n"


def pretrain_results(part: Path) -> Path:
    """A part's dense-base record: ``runs/study_pretrain/results.json`` (the committed runs) or, since run folders
    are named by their config, ``runs/study_pretrain/<overrides>,cfg=<hash>/results.json`` (the newest)."""
    old = part / "runs" / "study_pretrain" / "results.json"
    new = sorted((part / "runs" / "study_pretrain").glob("*cfg=*/results.json"), key=lambda p: p.stat().st_mtime)
    return new[-1] if new and not old.exists() else old


def pretrain_markdown(df: pd.DataFrame, roots: list[Path]) -> str:
    """The dense base of each part: final val loss and how much the last 10% of pretraining still gained."""
    lines = [
        "| base | tokens | params | val loss | val loss 10% of tokens earlier | gain over last 10% |",
        "|---|---|---|---|---|---|",
    ]
    for part, res_path in sorted(
        (d.name, pretrain_results(d))
        for root in roots
        for d in root.iterdir()
        if d.is_dir() and pretrain_results(d).exists()
    ):
        res = json.loads(res_path.read_text())
        curve = res["val_curve"]
        cut = [p for p in curve if p["tokens"] <= 0.9 * res["tokens"]][-1]
        gain = 100 * (cut["val_loss"] - res["val_loss"]) / cut["val_loss"]
        lines.append(
            f"| {part} | {res['tokens']:,} | {res['params_total']:,} | {res['val_loss']:.4f} | "
            f"{cut['val_loss']:.4f} | {gain:.2f}% |"
        )
    return "\n".join(lines) + "\n"


def partial_markdown(root: Path) -> str:
    """Runs a lease cut off before they finished (no results.json): their validation curves as far as they
    went, read from each run's metrics.csv, and the drop - copy gap per seed at each evaluation."""
    import yaml

    lines = []
    for part in sorted(d for d in root.iterdir() if d.is_dir()):
        base = json.loads(pretrain_results(part).read_text())
        curves = {}
        for run in sorted((part / "multirun").glob("*/*/")):
            cfg = yaml.safe_load((run / "config_resolved.yaml").read_text())
            per_step = cfg["data"]["batch_size"] * cfg["data"]["seq_len"]
            planned = math.ceil(cfg["train"]["tokens"] / per_step)
            vals = metrics(run).dropna(subset=["val/loss"])
            curves[(cfg["upcycle"]["drop_ratio"], cfg["seed"])] = (
                planned,
                dict(zip(vals.step, vals["val/loss"])),
                cfg["train"]["tokens"],
                cfg["optim"]["lr"],
                per_step,
            )
        steps = sorted({s for _, c, *_ in curves.values() for s in c})
        planned, _, tokens, lr, per_step = next(iter(curves.values()))
        lines += [
            f"### {part.name}: E8G1T2, {tokens / 1e6:g}M-token schedule ({planned} steps), peak LR {lr:g}, "
            f"base val loss {base['val_loss']:.4f}",
            "",
            "| run | " + " | ".join(f"step {s + 1} ({(s + 1) * per_step / 1e6:.1f}M tok)" for s in steps) + " |",
            "|---|" + "---|" * len(steps),
        ]
        for (drop, seed), (_, c, *_) in sorted(curves.items()):
            label = f"{'drop r=' + format(drop, 'g') if drop else 'copy'} seed {seed}"
            lines.append(f"| {label} | " + " | ".join(f"{c[s]:.4f}" if s in c else "-" for s in steps) + " |")
        seeds = sorted({seed for _, seed in curves})
        gaps = [[curves[(d, seed)][1].get(s) for seed in seeds for d in (0.5, 0.0)] for s in steps]
        lines.append(
            "| drop − copy (per seed) | "
            + " | ".join(
                ", ".join(f"{g[i] - g[i + 1]:+.4f}" for i in range(0, len(g), 2) if None not in g[i : i + 2]) or "-"
                for g in gaps
            )
            + " |"
        )
        lines.append("")
    return "\n".join(lines)


def study(
    roots: list[str],
    out: str | Path,
    partial: str | Path | None = None,
    ladder_root: str | Path | None = None,
    sunk_cost: str | Path | None = None,
    granularity_root: str | Path | None = None,
) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = collect(*roots)
    df = df[df.method != "pretrain"].copy()
    df["part"] = [
        Path(d).relative_to(next(Path(r) for r in roots if d.startswith(str(Path(r))))).parts[0] for d in df.run_dir
    ]
    f = findings(df)
    files = {
        "findings_md": out / "findings.md",
        "findings_csv": out / "findings.csv",
        "pretrain_md": out / "pretrain.md",
    }
    f.to_csv(files["findings_csv"], index=False, float_format="%.6f")
    files["findings_md"].write_text(findings_markdown(f))
    files["pretrain_md"].write_text(pretrain_markdown(df, [Path(r) for r in roots]))
    if partial is not None:
        files["partial_md"] = out / "partial.md"
        files["partial_md"].write_text(partial_markdown(Path(partial)))
    if ladder_root is not None:
        files.update(ladder(ladder_root, out))
    if granularity_root is not None:  # part G: granularity.md, granularity.csv
        files.update(granularity(granularity_root, out))
    if sunk_cost is not None:  # the fitted upcycling law: law.md, law.csv, crossover.png
        files.update(law([sunk_cost], out))
    for sweep in sorted({Path(d).parent for d in df.run_dir if Path(d).parent.parent.name == "multirun"}):
        part = sweep.parent.parent.name
        for key, path in report([str(sweep)], out / "tables" / f"{part}_{sweep.name}").items():
            files[f"{part}_{sweep.name}_{key}"] = path
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("roots", nargs="+", help="study folders (results/runs)")
    ap.add_argument("--partial", default=None, help="runs cut off before the end (results/partial): curves only")
    ap.add_argument("--ladder", default=None, help="budget-ladder runs (results/ladder): crossover table and plot")
    ap.add_argument("--sunk-cost", default=None, help="sunk-cost grid runs: the fitted upcycling law and its crossover")
    ap.add_argument("--granularity", default=None, help="part G's leases: granularity at equal active FLOPs, paired")
    ap.add_argument("--out", default="results")
    args = ap.parse_args()
    files = study(args.roots, args.out, args.partial, args.ladder, args.sunk_cost, args.granularity)
    print(files["findings_md"].read_text())
    print("wrote", len(files), "files under", args.out)


if __name__ == "__main__":
    main()
