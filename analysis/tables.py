"""Ablation tables from collected runs: mean ± std over seeds, best row marked, iso-FLOP dense beside each row."""

from __future__ import annotations

import pandas as pd

from analysis.collect import AXES


def varying_axes(df: pd.DataFrame) -> list[str]:
    """The ablation axes that take more than one value among the runs (seed excluded; a blank, e.g. a dense
    run's routing, is not a value)."""
    return [a for a in AXES if a != "seed" and a in df and df[a].dropna().astype(str).nunique() > 1]


def summarize(df: pd.DataFrame, by: list[str] | None = None) -> pd.DataFrame:
    """Per variant: val loss mean/std/n over seeds, the iso-FLOP dense continuation's, failed and pruned runs."""
    by = by if by is not None else varying_axes(df)
    ok = df[df.status == "complete"]
    if not by:
        by = ["moe"]
    g = ok.groupby(by, dropna=False)
    out = g.agg(
        val_loss=("val_loss", "mean"),
        val_loss_std=("val_loss", "std"),
        seeds=("val_loss", "size"),
        init_val_loss=("init_val_loss", "mean"),
        dense_iso_val_loss=("dense_iso_val_loss", "mean"),
        dense_iso_std=("dense_iso_val_loss", "std"),
        train_flops=("train_flops", "mean"),
        **({"tokens": ("tokens", "mean")} if "tokens" in ok else {}),
    ).reset_index()
    for col, rows in (("failed", df[~df.status.isin(["complete", "pruned"])]), ("pruned", df[df.status == "pruned"])):
        counts = rows.groupby(by, dropna=False).size().rename(col).reset_index()
        out = out.merge(counts, on=by, how="outer")
    out = out.fillna({"failed": 0, "pruned": 0, "seeds": 0}).astype({"failed": int, "pruned": int})
    out["seeds"] = out["seeds"].astype(int)
    return out.sort_values("val_loss", na_position="last").reset_index(drop=True)


def _pm(mean, std) -> str:
    if pd.isna(mean):
        return "—"
    return f"{mean:.4f}" if pd.isna(std) else f"{mean:.4f} ± {std:.4f}"


def _cell(value) -> str:
    """An axis value as a reader wants it: blank as —, a searched float (0.0022505863330860372) to 4 digits."""
    if pd.isna(value):
        return "—"
    return f"{value:.4g}" if isinstance(value, float) and len(str(value)) > 8 else str(value)


BUDGET_AXES = ("train_tokens", "pretrain_fraction")  # settings a run rounds up to whole optimizer steps


def _rows(table: pd.DataFrame, by: list[str], bold) -> tuple[list[str], list[list[str]]]:
    """Axis cells read per column (``iterrows`` would upcast an integer axis beside float columns: 2000.0); a
    budget axis is followed by the tokens the runs really trained (train.tokens=96000 trains 96,256 at 1,024 a
    step)."""
    pruned = bool(table.pruned.sum())  # an Optuna study's: stopped early by the pruner, not failed
    trained = "tokens" in table and any(a in by for a in BUDGET_AXES)
    header = by + (["tokens trained"] if trained else []) + ["val loss", "iso-FLOP dense", "step-0 loss", "seeds"]
    header += ["failed"] + (["pruned"] if pruned else [])
    best = table.val_loss.min()
    rows = []
    for i in range(len(table)):
        r = table.iloc[i]
        loss = _pm(r.val_loss, r.val_loss_std)
        rows.append(
            [_cell(table[a].iloc[i]) for a in by]
            + ([("—" if pd.isna(r.tokens) else f"{r.tokens:,.0f}")] if trained else [])
            + [
                bold(loss) if r.val_loss == best else loss,
                _pm(r.dense_iso_val_loss, r.dense_iso_std),
                _pm(r.init_val_loss, float("nan")),
                str(int(r.seeds)),
                str(int(r.failed)),
            ]
            + ([str(int(r.pruned))] if pruned else [])
        )
    return header, rows


def to_markdown(table: pd.DataFrame, by: list[str]) -> str:
    header, rows = _rows(table, by, lambda s: f"**{s}**")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows]) + "\n"


def to_latex(table: pd.DataFrame, by: list[str]) -> str:
    def esc(s: str) -> str:
        return s.replace("_", r"\_").replace("±", r"$\pm$")

    header, rows = _rows(table, by, lambda s: rf"\textbf{{{s}}}")
    body = "\n".join(" & ".join(esc(c) for c in r) + r" \\" for r in rows)
    return (
        rf"\begin{{tabular}}{{{'l' * len(by)}{'r' * (len(header) - len(by))}}}"
        + "\n\\toprule\n"
        + " & ".join(esc(h) for h in header)
        + r" \\"
        + "\n\\midrule\n"
        + body
        + "\n\\bottomrule\n\\end{tabular}\n"
    )
