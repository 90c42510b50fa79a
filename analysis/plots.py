"""PNG plots: val loss vs training FLOPs (variants vs iso-FLOP dense), expert-load CV over training."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.collect import curves, metrics  # noqa: E402


def _label(row, by) -> str:
    return ", ".join(f"{a}={row[a]}" for a in by) or str(row.get("moe"))


def _save(fig, ax, xlabel: str, ylabel: str, out: Path) -> Path:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def loss_vs_flops(df: pd.DataFrame, by: list[str], out: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    cv = curves(df)
    dense_done = set()
    for _, row in df[df.status == "complete"].iterrows():
        c = cv[cv.run_dir == row.run_dir]
        run = c[c.curve == "run"]
        ax.plot(run.flops, run.val_loss, marker="o", ms=3, label=_label(row, by) + f" (seed {row.seed})")
        iso = c[c.curve == "dense_iso"]
        key = tuple(iso.val_loss)
        if len(iso) and key not in dense_done:
            dense_done.add(key)
            label = "dense continuation (iso-FLOP)" if len(dense_done) == 1 else None
            ax.plot(iso.flops, iso.val_loss, ls="--", color="k", alpha=0.6, label=label)
    return _save(fig, ax, "training FLOPs after the dense checkpoint", "validation loss", out)


def expert_load(df: pd.DataFrame, by: list[str], out: Path) -> Path | None:
    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for _, row in df[df.status == "complete"].iterrows():
        m = metrics(row.run_dir)
        if "moe/expert_load_cv" in m:
            m = m.dropna(subset=["moe/expert_load_cv"])
            ax.plot(m.step, m["moe/expert_load_cv"], label=_label(row, by) + f" (seed {row.seed})")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    return _save(fig, ax, "step", "expert load CV (mean over MoE layers)", out)
