"""The budget ladder: each upcycled variant against its dense twins at several shares of the base's pretraining
compute, and where (if anywhere) it crosses the iso-FLOP dense continuation.

    python -m analysis.study results/runs --ladder results/ladder --out results   # writes ladder.md/.csv/.png

A variant is one upcycling recipe (preset, routing, weight scaling, router start, Drop-Upcycling ratio); a rung
is one budget (``train.pretrain_fraction``). At each rung the MoE is paired by seed with the dense continuation
that got the same training FLOPs (iso-FLOP) and with the one that saw the same tokens; the verdict uses the rule
of :func:`analysis.stats.verdict` on those paired differences. A third baseline is the best dense model the
same base and seed hold within the MoE's training FLOPs (the parent itself, or any dense continuation of no more
FLOPs): when repeated data or a re-warmed learning rate makes longer dense training worse, beating the iso-FLOP
twin is not enough to say that upcycling paid off. Rungs are grouped by the whole recipe, the corpus and the dense
base (``dense_base``, the base's cache key): seeds on different bases are never pooled, and each base gets a section
of its own with "corpus reads": the base's pretraining tokens plus the iso-FLOP twin's, over the corpus's training
tokens (above 1, the twin re-reads what pretraining saw).
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

# a rung's recipe: every knob the ladder varies, the LR, and the dense base it upcycles
VARIANT = ["moe", "routing", "weight_scaling", "router_start", "router_init", "drop_ratio", "lr", "corpus", "base"]


def _step_flops(twin: dict, cfg: dict) -> float:
    """Training FLOPs of one step of a dense continuation: its FLOPs per token times the tokens of a step.
    The iso-FLOP twin trains ceil(iso tokens / step tokens) steps (harness/flops.py: iso_flop_tokens,
    harness/experiment.py: steps), so it holds up to one such step more than its MoE: a dense run counts as
    "no more FLOPs" when it exceeds the MoE's by less than one of its own steps."""
    step_tokens = _get(cfg, "data", "batch_size", default=0) * _get(cfg, "data", "seq_len", default=0)
    return twin["train_flops"] / twin["tokens"] * step_tokens if twin.get("tokens") else 0.0


def _reads(res: dict, cfg: dict) -> float:
    """(base pretraining tokens + the iso-FLOP twin's tokens) / the corpus's training tokens."""
    corpus = (res.get("data") or {}).get("train_tokens")
    twin = (res.get("dense_iso") or {}).get("tokens")
    pretrain = _get(cfg, "pretrain", "tokens")
    return (pretrain + twin) / corpus if corpus and twin and pretrain else math.nan


def _verdict(diffs: pd.Series) -> str:
    """verdict's rule (positive = the MoE lower); with fewer seeds no verdict (the CI is in the table beside it)."""
    n = len(diffs)
    return verdict(-diffs) if n >= MIN_SEEDS or n == 0 else f"{n} seed{'s' if n > 1 else ''}: no verdict"


def ladder_runs(root: str | Path) -> pd.DataFrame:
    """One row per complete ladder run under ``root`` (runs with ``train.pretrain_fraction`` set), with
    ``best_dense_val_loss``: the lowest dense loss of the same seed within the run's training FLOPs."""
    rows, dense = [], {}
    for path in sorted(Path(root).rglob("results.json")):
        res = json.loads(path.read_text())
        cfg = res.get("config", {})
        share = _get(cfg, "train", "pretrain_fraction")
        if res.get("status") != "complete" or res.get("method") != "upcycle" or share is None:
            continue
        moe = cfg["moe"]
        base = res.get("dense_base") or "-"
        rows.append(
            {
                "moe": preset_name(moe["num_experts"], moe["granularity"], moe["top_k"]),
                "routing": moe["routing"],
                "weight_scaling": _get(cfg, "upcycle", "weight_scaling"),
                "router_start": _get(cfg, "upcycle", "router_start", default="fixed"),
                "router_init": _get(cfg, "upcycle", "router_init", default="-"),
                "drop_ratio": float(_get(cfg, "upcycle", "drop_ratio", default=0.0)),
                "lr": float(_get(cfg, "optim", "lr", default=math.nan)),
                "corpus": _get(cfg, "data", "path") or _get(cfg, "data", "source", default="-"),
                "base": base,
                "budget": float(share),
                "compute_share": res.get("pretrain_compute_share"),
                "seed": cfg["seed"],
                "tokens": res["tokens"],
                "init_val_loss": res["init_val_loss"],
                "val_loss": res["val_loss"],
                "dense_parent_val_loss": res["dense_parent_val_loss"],
                "dense_iso_val_loss": (res.get("dense_iso") or {}).get("val_loss"),
                "dense_tokens_val_loss": (res.get("dense_tokens") or {}).get("val_loss"),
                "corpus_reads": _reads(res, cfg),
                "train_flops": res["train_flops"],
                "run_dir": str(path.parent),
            }
        )
        seed = cfg["seed"]
        dense[(base, seed, "parent")] = (0, 0.0, res["dense_parent_val_loss"])
        for twin in ("dense_iso", "dense_tokens"):
            if res.get(twin):
                t = res[twin]
                dense[(base, seed, t["cache_dir"])] = (t["train_flops"], _step_flops(t, cfg), t["val_loss"])
    for row in rows:
        within = [
            loss
            for (base, seed, _), (flops, step, loss) in dense.items()
            # no step size recorded: an exact comparison (FLOPs are integers)
            if (base, seed) == (row["base"], row["seed"]) and flops < row["train_flops"] + max(step, 1.0)
        ]
        row["best_dense_val_loss"] = min(within)
    return pd.DataFrame(rows)


def label(row) -> str:
    """A variant in the words of the README's knobs."""
    start = "" if row.routing == "topk_softmax" else f", {row.weight_scaling} scaling, {row.router_start} router"
    drop = f", Drop-Upcycling r={row.drop_ratio:g}" if row.drop_ratio else ""
    init = "" if row.router_init in ("-", "random", None) else f", {row.router_init} router init"
    base = "" if row.base == "-" else f", base {str(row.base)[:8]}"
    return f"{row.moe} {row.routing}{start}{init}{drop}, lr {row.lr:g}{base}"


def rungs(df: pd.DataFrame) -> pd.DataFrame:
    """Per (recipe and base, budget): means over seeds and the paired MoE - dense differences with their 95%
    CIs and verdicts."""
    out = []
    for key, g in df.groupby(VARIANT + ["budget"], sort=True, dropna=False):
        if g.seed.duplicated().any():  # two runs of one seed would count as two seeds
            twice = g[g.seed.duplicated(keep=False)].run_dir.tolist()
            raise ValueError(f"one rung holds a seed twice (drop one): {twice}")
        iso = (g.val_loss - g.dense_iso_val_loss).dropna()
        tok = (g.val_loss - g.dense_tokens_val_loss).dropna()
        best = g.val_loss - g.best_dense_val_loss
        ci = {
            f"vs_{k}_ci_{e}": getattr(paired(d), e)
            for k, d in (("iso", iso), ("tokens", tok), ("best", best))
            for e in ("lo", "hi")
        }
        out.append(
            {
                **dict(zip(VARIANT + ["budget"], key)),
                "variant": label(g.iloc[0]),
                "seeds": len(g),
                "tokens": int(g.tokens.iloc[0]),
                "init_val_loss": g.init_val_loss.mean(),
                "val_loss": g.val_loss.mean(),
                "val_loss_std": g.val_loss.std(ddof=1) if len(g) > 1 else math.nan,
                "dense_iso_val_loss": g.dense_iso_val_loss.mean(),
                "dense_tokens_val_loss": g.dense_tokens_val_loss.mean(),
                "vs_iso": iso.mean(),
                "vs_iso_pct": 100 * (iso / g.dense_iso_val_loss).mean(),
                "vs_tokens": tok.mean(),
                "best_dense_val_loss": g.best_dense_val_loss.mean(),
                "vs_best": best.mean(),
                "vs_best_pct": 100 * (best / g.best_dense_val_loss).mean(),
                "corpus_reads": g.corpus_reads.mean(),
                "vs_iso_verdict": _verdict(iso),
                "vs_tokens_verdict": _verdict(tok),
                "vs_best_verdict": _verdict(best),
                **ci,
            }
        )
    return pd.DataFrame(out)


def crossover(r: pd.DataFrame, against: str = "iso", twin: str = "its iso-FLOP dense twin") -> dict[str, str]:
    """Per variant, one sentence: the smallest budget from which the MoE stays below ``twin`` (columns
    ``vs_<against>``, ``vs_<against>_pct``, ``vs_<against>_verdict``)."""
    said = {}
    for variant, g in r.sort_values("budget").groupby("variant", sort=False):
        wins = list(g[f"vs_{against}_verdict"] == "agrees")
        below = list(g[f"vs_{against}"] < 0)
        gap = g[f"vs_{against}_pct"].tolist()
        first = next((i for i in range(len(g)) if all(wins[i:])), None)
        if first is not None:
            said[variant] = f"below {twin} (95% CI below 0) from {g.budget.iloc[first]:.0%} of pretraining compute on"
        elif below[-1]:
            n = g.seeds.iloc[-1]
            seeds = f"{n} seed{'s' if n > 1 else ''}, no verdict" if n < 3 else "on the mean, CI holds 0"
            said[variant] = f"below {twin} at {g.budget.iloc[-1]:.0%} ({gap[-1]:+.2f}%, {seeds})"
        else:
            trend = "narrowing" if abs(gap[-1]) < abs(gap[0]) else "not narrowing"
            said[variant] = (
                f"above {twin} at every budget up to {g.budget.iloc[-1]:.0%} "
                f"({gap[0]:+.2f}% → {gap[-1]:+.2f}%, {trend})"
            )
    return said


# recipes against each other at one rung, paired by seed on one base: (name, recipe a, recipe b); a row matches a
# recipe when every listed column has that value
_COPY = {"moe": "E8G1T2", "weight_scaling": "exact", "router_start": "data", "drop_ratio": 0.0}
PAIRS = [
    (
        "topk_softmax − softmax_topk (exact start)",
        {**_COPY, "routing": "topk_softmax"},
        {**_COPY, "routing": "softmax_topk"},
    ),
    (
        "Megatron's start − the exact start (softmax_topk)",
        {**_COPY, "routing": "softmax_topk", "weight_scaling": "paper", "router_start": "fixed"},
        {**_COPY, "routing": "softmax_topk"},
    ),
    (
        "Drop-Upcycling r=0.5 − copy (softmax_topk, exact start)",
        {**_COPY, "routing": "softmax_topk", "drop_ratio": 0.5},
        {**_COPY, "routing": "softmax_topk"},
    ),
    (
        "E32G4T4 − E8G1T1 (equal active FLOPs)",
        {"moe": "E32G4T4", "drop_ratio": 0.0},
        {"moe": "E8G1T1", "drop_ratio": 0.0},
    ),
    (
        "E64G8T8 − E8G1T1 (equal active FLOPs)",
        {"moe": "E64G8T8", "drop_ratio": 0.0},
        {"moe": "E8G1T1", "drop_ratio": 0.0},
    ),
]


def _matching(df: pd.DataFrame, recipe: dict) -> pd.DataFrame:
    keep = pd.Series(True, index=df.index)
    for column, value in recipe.items():
        keep &= df[column] == value
    return df[keep]


def pairs(df: pd.DataFrame) -> pd.DataFrame:
    """Per comparison of ``PAIRS``, corpus, base and budget with runs of both recipes: the paired difference in
    validation loss (a − b) over the seeds both hold, its 95% CI and p, and the verdict (a lower: "a better")."""
    out = []
    for name, a, b in PAIRS:
        for (corpus, base, budget), g in df.groupby(["corpus", "base", "budget"], sort=True):
            ra, rb = _matching(g, a), _matching(g, b)
            for side in (ra, rb):  # one recipe per side: a recipe that also varies another knob is not paired here
                if side[VARIANT].drop_duplicates().shape[0] > 1 or side.seed.duplicated().any():
                    raise ValueError(f"{name}: more than one run per seed at {corpus}, {base}, {budget:.0%}")
            both = ra.merge(rb, on="seed", suffixes=("_a", "_b"))
            if both.empty:
                continue
            d = both.val_loss_a - both.val_loss_b
            st = paired(d)
            n = st.n
            out.append(
                {
                    "comparison": name,
                    "corpus": corpus,
                    "base": base,
                    "budget": budget,
                    "seeds": n,
                    "a": both.val_loss_a.mean(),
                    "b": both.val_loss_b.mean(),
                    "diff": st.mean,
                    "diff_pct": 100 * (d / both.val_loss_b).mean(),
                    "ci_lo": st.lo,
                    "ci_hi": st.hi,
                    "p": st.p,
                    "verdict": {"agrees": "a better", "disagrees": "b better"}.get(v := _verdict(d), v),
                }
            )
    return pd.DataFrame(out)


def pairs_markdown(pr: pd.DataFrame) -> str:
    lines = [
        "### Recipes against each other at one rung (paired by seed on one base)",
        "",
        "| comparison (a − b) | data.source, base | budget | seeds | a | b | a − b: mean [95% CI] | a − b | p | "
        "verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in pr.itertuples():
        ci = "[-]" if row.ci_lo != row.ci_lo else f"[{row.ci_lo:+.4f}, {row.ci_hi:+.4f}]"
        p = "-" if row.p != row.p else f"{row.p:.2g}"
        lines.append(
            f"| {row.comparison} | {row.corpus}, {str(row.base)[:8]} | {row.budget:.0%} | {row.seeds} | {row.a:.4f} | "
            f"{row.b:.4f} | {row.diff:+.4f} {ci} | {row.diff_pct:+.2f}% | {p} | **{row.verdict}** |"
        )
    lines += ["", "A verdict needs 3 seeds and a 95% CI that excludes 0 (a better: a's loss is lower).", ""]
    return "\n".join(lines)


def ladder_markdown(r: pd.DataFrame) -> str:
    """One section per corpus and dense base: its rungs, then where each variant crosses its dense twins."""
    sections = []
    for (corpus, base), g in r.groupby(["corpus", "base"], sort=True):
        reads = g.corpus_reads.max()
        sections.append(
            f"### data.source={corpus}, base {str(base)[:8]}: the iso-FLOP twin's data reads the corpus up to "
            f"{reads:.2f} times\n\n{_section(g)}"
        )
    return "\n".join(sections)


def _section(r: pd.DataFrame) -> str:
    def num(x, std=math.nan):
        return "-" if x != x else f"{x:.4f}" + ("" if std != std else f" ± {std:.4f}")

    def diff(row, k):
        mean, lo, hi = getattr(row, f"vs_{k}"), getattr(row, f"vs_{k}_ci_lo"), getattr(row, f"vs_{k}_ci_hi")
        return "-" if mean != mean else f"{mean:+.4f} " + ("[-]" if lo != lo else f"[{lo:+.4f}, {hi:+.4f}]")

    lines = [
        "| variant | budget (of pretraining FLOPs) | MoE tokens | corpus reads | seeds | step 0 | MoE | "
        "dense iso-FLOP | dense same tokens | best dense ≤ FLOPs | MoE − iso: mean [95% CI] | MoE − iso | vs iso | "
        "MoE − same tokens: mean [95% CI] | vs same tokens | MoE − best: mean [95% CI] | MoE − best | vs best |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in r.itertuples():
        reads = "-" if row.corpus_reads != row.corpus_reads else f"{row.corpus_reads:.2f}"
        lines.append(
            f"| {row.variant} | {row.budget:.0%} | {row.tokens:,} | {reads} | {row.seeds} | "
            f"{num(row.init_val_loss)} | {num(row.val_loss, row.val_loss_std)} | {num(row.dense_iso_val_loss)} | "
            f"{num(row.dense_tokens_val_loss)} | {num(row.best_dense_val_loss)} | {diff(row, 'iso')} | "
            f"{row.vs_iso_pct:+.2f}% | **{row.vs_iso_verdict}** | {diff(row, 'tokens')} | {row.vs_tokens_verdict} | "
            f"{diff(row, 'best')} | {row.vs_best_pct:+.2f}% | {row.vs_best_verdict} |"
        )
    lines += [
        "",
        "Seeds pair within one dense base (the variant names it). Best dense ≤ FLOPs: the lowest loss among the same "
        "base and seed's dense parent and dense continuations that used no more training FLOPs than the MoE (less "
        "than one dense step over it: the iso-FLOP twin rounds its steps up). Corpus reads: (pretraining tokens + "
        "the iso-FLOP twin's tokens) / the corpus's training tokens.",
        "",
        "Where each variant crosses its iso-FLOP dense twin:",
        "",
    ]
    lines += [f"- {variant}: {text}." for variant, text in crossover(r).items()]
    lines += ["", "Where each variant crosses the best dense model of no more FLOPs:", ""]
    best = crossover(r, "best", "the best dense model of no more FLOPs")
    lines += [f"- {variant}: {text}." for variant, text in best.items()]
    return "\n".join(lines) + "\n"


def crossover_plot(df: pd.DataFrame, r: pd.DataFrame, path: Path) -> Path:
    """(MoE - dense) / dense against the budget: a row per corpus and dense base (seeds on different bases never
    pool), left against the iso-FLOP twin, right against the best dense model of no more FLOPs. A variant keeps its
    colour in every panel: its mean over seeds (line) with the paired 95% CI (bars, the loss CI over the dense mean,
    2 or more seeds) and each seed (dots)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def short(variant: str, base) -> str:
        return variant.removesuffix(f", base {str(base)[:8]}")

    names = sorted({short(row.variant, row.base) for row in r.itertuples()})
    colors = {name: f"C{i}" for i, name in enumerate(names)}
    sections = list(r.groupby(["corpus", "base"], sort=True))
    fig, axes = plt.subplots(len(sections), 2, figsize=(12, 3.6 * len(sections) + 1.2), sharey="row", squeeze=False)
    panels = (
        ("iso", "dense_iso_val_loss", "its iso-FLOP dense twin"),
        ("best", "best_dense_val_loss", "the best dense ≤ its FLOPs"),
    )
    for row_axes, ((corpus, base), section) in zip(axes, sections):
        seeds = int(section.seeds.max())
        for ax, (against, column, name) in zip(row_axes, panels):
            for variant, g in section.sort_values("budget").groupby("variant", sort=False):
                color = colors[short(variant, base)]
                mean, dense = g[f"vs_{against}_pct"], g[column]
                lo = 100 * g[f"vs_{against}_ci_lo"] / dense
                hi = 100 * g[f"vs_{against}_ci_hi"] / dense
                err = [(mean - lo).fillna(0).clip(lower=0), (hi - mean).fillna(0).clip(lower=0)]
                ax.errorbar(g.budget, mean, yerr=err, fmt="-o", color=color, capsize=3, ms=4)
                runs = df[[label(row) == variant for row in df.itertuples()]]
                ax.scatter(
                    runs.budget, 100 * (runs.val_loss - runs[column]) / runs[column], color=color, s=10, alpha=0.45
                )
            ax.axhline(0, color="k", lw=0.8)
            ax.set_xscale("log")
            budgets = sorted(section.budget.unique())
            ax.set_xticks(budgets, [f"{100 * b:g}%" for b in budgets])
            ax.minorticks_off()
            ax.set_title(
                f"data.source={corpus}, base {str(base)[:8]} (up to {section.corpus_reads.max():.2f} corpus reads, "
                f"{seeds} seed{'s' if seeds > 1 else ''})\nMoE against {name}",
                fontsize=8,
            )
        row_axes[0].set_ylabel("(MoE − dense) / dense, %\n(below 0: the MoE wins)", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("upcycling budget, share of the dense base's pretraining FLOPs")
    handles = [plt.Line2D([], [], color=colors[n], marker="o", label=n) for n in names]
    fig.legend(handles=handles, loc="lower center", ncol=2, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0, 0.04 + 0.02 * math.ceil(len(names) / 2), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cut_off_markdown(root: str | Path) -> str:
    """Ladder runs a lease stopped before their results.json: the last validation each reached (CSV metrics),
    beside the dense base's own validation loss. Curves, not rungs: no decay finished, no dense twin ran."""
    import yaml

    lines = []
    bases = {}  # <part>/runs/study_pretrain/<run>/results.json, once per part (its "latest" link names it again)
    for path in sorted(Path(root).rglob("runs/study_pretrain/*/results.json")):
        bases.setdefault(path.parents[3], path)
    for part, base in bases.items():
        runs = sorted(d for d in part.glob("multirun/*/*/") if not (d / "results.json").exists())
        if not runs:
            continue
        lines += [
            f"### {part.name}: runs cut off (dense base val loss {json.loads(base.read_text())['val_loss']:.4f})",
            "",
            "| variant | seed | budget | last step logged | last validation: step, val loss |",
            "|---|---|---|---|---|",
        ]
        for d in runs:
            cfg = yaml.safe_load((d / "config_resolved.yaml").read_text())
            m = metrics(d)
            val = m.dropna(subset=["val/loss"]) if "val/loss" in m else m.iloc[:0]  # cut before its first validation
            row = pd.Series(
                {
                    "moe": preset_name(cfg["moe"]["num_experts"], cfg["moe"]["granularity"], cfg["moe"]["top_k"]),
                    "routing": cfg["moe"]["routing"],
                    "weight_scaling": cfg["upcycle"]["weight_scaling"],
                    "router_start": cfg["upcycle"].get("router_start", "fixed"),
                    "router_init": cfg["upcycle"].get("router_init", "-"),
                    "drop_ratio": float(cfg["upcycle"]["drop_ratio"]),
                    "lr": float(cfg["optim"]["lr"]),
                    "base": "-",
                }
            )
            last = f"{int(val.step.iloc[-1]) + 1}, {val['val/loss'].iloc[-1]:.4f}" if len(val) else "-"
            lines.append(
                f"| {label(row)} | {cfg['seed']} | {cfg['train']['pretrain_fraction']:.0%} | "
                f"{int(m.step.max()) + 1 if 'step' in m and len(m) else '-'} | {last} |"
            )
        lines.append("")
    return "\n".join(lines)


def ladder(root: str | Path, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = ladder_runs(root)
    files = {"ladder_md": out / "ladder.md"}
    text = ""
    if len(df):
        r, pr = rungs(df), pairs(df)
        text = ladder_markdown(r) + ("\n" + pairs_markdown(pr) if len(pr) else "")
        files["ladder_csv"] = out / "ladder.csv"
        r.to_csv(files["ladder_csv"], index=False, float_format="%.6f")
        if len(pr):
            files["ladder_pairs_csv"] = out / "ladder_pairs.csv"
            pr.to_csv(files["ladder_pairs_csv"], index=False, float_format="%.6f")
        files["ladder_png"] = crossover_plot(df, r, out / "ladder_crossover.png")
    else:
        text = "No rung of the ladder has finished yet.\n"
    cut = cut_off_markdown(root)
    files["ladder_md"].write_text(text + ("\n" + cut if cut else ""))
    return files


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="Budget-ladder table and crossover plot from a ladder sweep's outputs.")
    ap.add_argument("root", help="a ladder sweep's folder, e.g. logs/multirun/sweep_ladder")
    ap.add_argument("--out", default="report")
    args = ap.parse_args()
    if ladder_runs(args.root).empty and not cut_off_markdown(args.root):
        raise SystemExit(
            f"no ladder run under {args.root} (runs with train.pretrain_fraction set: python run.py -m +sweep=ladder)"
        )
    files = ladder(args.root, args.out)
    print(files["ladder_md"].read_text())
    print("wrote", ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
