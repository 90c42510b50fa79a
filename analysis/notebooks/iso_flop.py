# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Upcycled MoE vs its iso-FLOP dense continuation
#
# Each upcycled run trains the MoE for a token budget; the harness also continues the dense parent
# for the *same training FLOPs* (from its exact FLOP count). This notebook reads the run folders,
# compares the two at equal compute and shows where along the FLOP axis the MoE overtakes the dense.
#
# Set `UPCYCLE_RUNS` to the run or multirun folder(s) (`:`-separated); default `logs/multirun`.
# Pair/sync: `jupytext --sync analysis/notebooks/iso_flop.py`; the tests execute it with nbclient.

# %%
import os
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from analysis.collect import collect, curves  # noqa: E402
from analysis.tables import varying_axes  # noqa: E402

roots = os.environ.get("UPCYCLE_RUNS", "logs/multirun").split(":")
df = collect(*roots)
if df.empty:
    raise SystemExit(
        f"no results.json under {roots} (relative paths are read from {os.getcwd()}): set UPCYCLE_RUNS, or run "
        "jupytext with --run-path . from the folder it names"
    )
print(f"{len(df)} runs under {roots}; status: {df.status.value_counts().to_dict()}")

# %% [markdown]
# ## Final val loss at equal training FLOPs
# `gap` = MoE − dense (negative: the upcycled model is better at the same compute);
# `flops_ratio` checks the budgets really match (1 up to one optimizer step; a note when a row is >= 5% off).

# %%
ok = df[(df.status == "complete") & df.dense_iso_val_loss.notna()].copy()
assert len(ok), "no complete upcycle runs with an iso-FLOP dense continuation"
ok["gap"] = ok.val_loss - ok.dense_iso_val_loss
ok["rel_gap_pct"] = 100 * ok.gap / ok.dense_iso_val_loss
ok["flops_ratio"] = ok.train_flops / ok.dense_iso_train_flops
by = varying_axes(ok) or ["moe"]
summary = ok.groupby(by).agg(
    moe=("val_loss", "mean"),
    dense_iso=("dense_iso_val_loss", "mean"),
    gap=("gap", "mean"),
    gap_std=("gap", "std"),
    rel_gap_pct=("rel_gap_pct", "mean"),
    flops_ratio=("flops_ratio", "mean"),
    seeds=("val_loss", "size"),
)
off = summary[(summary.flops_ratio - 1).abs() >= 0.05]
if len(off):  # whole optimizer steps: a budget of a few steps cannot match to within 5%
    print(f"{len(off)} rows whose MoE and dense budgets differ by >= 5% (budgets of a few steps round to whole steps)")
summary  # noqa: B018 (the cell shows the table)

# %% [markdown]
# ## Validation loss against training FLOPs

# %%
cv = curves(ok)
fig, ax = plt.subplots(figsize=(7, 4.5))
for key, group in ok.groupby(by):
    dirs = set(group.run_dir)
    run = cv[cv.run_dir.isin(dirs) & (cv.curve == "run")].groupby("flops").val_loss.mean()
    dense = cv[cv.run_dir.isin(dirs) & (cv.curve == "dense_iso")].groupby("flops").val_loss.mean()
    (line,) = ax.plot(run.index, run.values, marker="o", ms=3, label=f"MoE {key}")
    ax.plot(dense.index, dense.values, ls="--", color=line.get_color(), label=f"dense iso-FLOP {key}")
ax.set_xlabel("training FLOPs")
ax.set_ylabel("val loss")
ax.legend(fontsize=7)
out = Path(os.environ.get("UPCYCLE_NOTEBOOK_OUT", "report"))
out.mkdir(parents=True, exist_ok=True)
fig.savefig(out / "notebook_iso_flop.png", dpi=120, bbox_inches="tight")
summary.to_csv(out / "notebook_iso_flop.csv")
print("wrote", out / "notebook_iso_flop.png")
