"""The upcycling scaling law: MoE loss as a function of the dense pretraining tokens D1 and the upcycling tokens D2,
fitted per recipe, with seed-bootstrap CIs, leave-one-budget-out error and the D2* where the MoE crosses dense.

    python -m analysis.law logs/multirun/sweep_sunk_cost --out results/law   # law.md, law.csv, crossover.png

Form (Liew et al., arXiv 2502.03009, sec. 3; restated in their arXiv 2510.06548):

    L(D1, D2) = E + A * D1^(-a1) * D2^(-a2 + a3 * ln D1)

E: irreducible loss; A: scale of the reducible loss; a1: how much a longer dense pretraining lowers the loss;
a2: the exponent of the upcycling tokens; a3: the interaction: a3 > 0 makes D2 pay off less the larger the sunk
cost D1. Tokens are in millions here (D = 1 is 1M tokens), which sets the units of A and a2. The dense continuation
from the same base gets the same form with its own parameters (D2 = its continuation tokens). The fit is least
squares on log-loss (ln L_pred - ln L_obs) with bounds, from a small grid of starts, keeping the best; the paper's
own fitting details (Huber vs squares, grid) could not be read here and are not reproduced.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from analysis.collect import get
from harness.moe import preset_name

PARAMS = ["E", "A", "a1", "a2", "a3"]
RECIPE = ["model", "moe", "routing", "weight_scaling", "router_start", "router_init", "drop_ratio", "lr"]
UNIT = 1e6  # tokens per unit of D
LO = np.array([0.0, -30.0, -1.0, 0.0, -0.5])  # E, ln A, a1, a2, a3
HI = np.array([np.inf, 30.0, 2.0, 2.0, 0.5])
POOR_RMS = 3.0  # residual RMS of cell means, in units of their seed noise, above which the fit is called poor
FLOOR = 2e-3  # log-loss floor of that threshold (0.2%), for noise-free or one-seed data
BOOT = 200


def law_runs(*roots: str | Path) -> pd.DataFrame:
    """One row per complete upcycle run with ``dense_base_tokens`` under ``roots``."""
    rows = []
    for root in roots:
        for path in sorted(Path(root).rglob("results.json")):
            res = json.loads(path.read_text())
            cfg = res.get("config", {})
            if res.get("status") != "complete" or res.get("method") != "upcycle" or not res.get("dense_base_tokens"):
                continue
            moe, iso, scratch = cfg.get("moe", {}), res.get("dense_iso") or {}, res.get("dense_scratch") or {}
            rows.append(
                {
                    "model": get(cfg, "model", "name", default="-"),
                    "moe": preset_name(moe["num_experts"], moe["granularity"], moe["top_k"]),
                    "routing": moe.get("routing"),
                    "weight_scaling": get(cfg, "upcycle", "weight_scaling", default="-"),
                    "router_start": get(cfg, "upcycle", "router_start", default="fixed"),
                    "router_init": get(cfg, "upcycle", "router_init", default="-"),
                    "drop_ratio": float(get(cfg, "upcycle", "drop_ratio", default=0.0)),
                    "lr": float(get(cfg, "optim", "lr", default=math.nan)),
                    "seed": cfg.get("seed"),
                    "d1": res["dense_base_tokens"] / UNIT,
                    "d2": res["tokens"] / UNIT,
                    "base_flops": res.get("dense_base_flops", math.nan),
                    "flops": res.get("train_flops", math.nan),
                    "val_loss": res["val_loss"],
                    "parent": res.get("dense_parent_val_loss", math.nan),
                    "iso_d2": iso.get("tokens", math.nan) / UNIT,
                    "iso_loss": iso.get("val_loss", math.nan),
                    "scratch_loss": scratch.get("val_loss", math.nan),
                    "scratch_flops": scratch.get("train_flops", math.nan),
                }
            )
    return pd.DataFrame(rows)


def predict(p: np.ndarray, d1, d2) -> np.ndarray:
    """ln L for parameters (E, ln A, a1, a2, a3)."""
    x1, x2 = np.log(d1), np.log(d2)
    return np.log(p[0] + np.exp(p[1] - p[2] * x1 - (p[3] - p[4] * x1) * x2))


def _lm(p, d1, d2, y, hi_e, iters=200):
    """Bounded Levenberg-Marquardt on r = ln L_pred - ln L_obs (steps projected onto the bounds)."""
    lo, hi = LO.copy(), HI.copy()
    hi[0] = hi_e
    p, lam = np.clip(p, lo, hi), 1e-3
    cost = np.sum((predict(p, d1, d2) - y) ** 2)
    for _ in range(iters):
        r = predict(p, d1, d2) - y
        jac = np.empty((len(y), 5))
        for i in range(5):
            h = 1e-6 * max(1.0, abs(p[i]))
            q = p.copy()
            q[i] += h
            jac[:, i] = (predict(q, d1, d2) - y - r) / h
        g, hess = jac.T @ r, jac.T @ jac
        step = np.linalg.solve(hess + lam * np.diag(np.diag(hess) + 1e-12), -g)
        q = np.clip(p + step, lo, hi)
        new = np.sum((predict(q, d1, d2) - y) ** 2)
        if new < cost:
            done = cost - new < 1e-14 * max(cost, 1e-30)
            p, cost, lam = q, new, lam / 3
            if done:
                break
        else:
            lam *= 4
            if lam > 1e10:
                break
    return p, cost


def fit(d1, d2, loss, starts=None) -> np.ndarray:
    """Best of a grid of starts (or of ``starts``)."""
    d1, d2, y = np.asarray(d1, float), np.asarray(d2, float), np.log(np.asarray(loss, float))
    hi_e = 0.999 * float(np.min(loss))
    if starts is None:
        starts = []
        for e in (0.0, 0.5 * hi_e, 0.9 * hi_e):
            for a1 in (0.0, 0.3):
                for a2 in (0.1, 0.5):
                    for a3 in (-0.02, 0.0, 0.02):
                        x1 = np.log(d1)
                        la = np.mean(np.log(np.maximum(np.exp(y) - e, 1e-9)) + a1 * x1 + (a2 - a3 * x1) * np.log(d2))
                        starts.append(np.array([e, la, a1, a2, a3]))
    best = min((_lm(s, d1, d2, y, hi_e) for s in starts), key=lambda t: t[1])
    return best[0]


def _quality(g, p, d2col, losscol) -> dict:
    """Residual RMS of cell means, the cells' seed noise (standard error of a mean, in log-loss) and the
    leave-one-budget-out RMS error."""
    cells = g.groupby(["d1", d2col]).agg(y=(losscol, lambda s: np.log(s).mean()), n=(losscol, "size"))
    noise = g.groupby(["d1", d2col])[losscol].apply(lambda s: np.log(s).std(ddof=1) if len(s) > 1 else np.nan)
    sem = float(np.nanmean(noise / np.sqrt(cells.n))) if noise.notna().any() else 0.0
    d1, d2 = cells.index.get_level_values(0), cells.index.get_level_values(1)
    rms = float(np.sqrt(np.mean((predict(p, d1, d2) - cells.y) ** 2)))
    errs = []
    for b in sorted(g[d2col].unique()):
        keep = g[g[d2col] != b]
        if keep.groupby(["d1", d2col]).ngroups < len(PARAMS):
            continue
        q = fit(keep.d1, keep[d2col], keep[losscol], starts=[p])
        held = cells[cells.index.get_level_values(1) == b]
        errs += list(predict(q, held.index.get_level_values(0), held.index.get_level_values(1)) - held.y)
    lobo = float(np.sqrt(np.mean(np.square(errs)))) if errs else math.nan
    limit = max(POOR_RMS * sem, FLOOR)
    return {
        "cells": len(cells),
        "rms": rms,
        "sem": sem,
        "lobo": lobo,
        "limit": limit,
        "poor": rms > limit or (lobo == lobo and lobo > 3 * limit),
    }


def _bootstrap(g, p_moe, p_dense, boot, rng) -> list[tuple[np.ndarray, np.ndarray]]:
    seeds = sorted(g.seed.unique())
    out = []
    if len(seeds) < 2:
        return out
    dense = g.dropna(subset=["iso_loss"])
    for _ in range(boot):
        pick = rng.choice(seeds, size=len(seeds), replace=True)
        m = pd.concat([g[g.seed == s] for s in pick])
        d = pd.concat([dense[dense.seed == s] for s in pick])
        out.append((fit(m.d1, m.d2, m.val_loss, [p_moe]), fit(d.d1, d.iso_d2, d.iso_loss, [p_dense])))
    return out


def best_dense(points, flops) -> np.ndarray:
    """Loss of the best dense model pretrained from scratch with no more than ``flops`` total FLOPs, from the
    recorded ``points`` (total FLOPs, loss): ln loss linear in ln FLOPs between neighbouring recorded points, and no
    lower than any recorded point at or below ``flops``; beyond the last point the lowest recorded one (a model of
    fewer FLOPs exists), below the first inf (no extrapolation: no such model is known)."""
    pts = pd.DataFrame(points, columns=["f", "y"]).dropna().groupby("f").y.mean()  # seeds of one point: their mean
    q = np.atleast_1d(np.asarray(flops, float))
    if pts.empty:
        return np.full(q.shape, np.inf)
    f, y = pts.index.to_numpy(float), pts.to_numpy(float)
    inside = (q >= f[0]) & (q <= f[-1])
    interp = np.where(inside, np.exp(np.interp(np.log(q), np.log(f), np.log(y))), np.inf)
    envelope = np.array([y[f <= x].min() if (f <= x).any() else np.inf for x in q])
    return np.minimum(interp, envelope)


def crossover(p_moe, p_dense, d1, lo, hi, ratio, floor=None):
    """D2* of one D1: the smallest D2 in [lo, hi] from which the MoE law stays below the dense law at the same
    FLOPs (D2 x ``ratio`` dense tokens) and below ``floor(D2)``, the best other dense loss of no more FLOPs;
    'below' if it already is at lo, None if it never is. The last sign change on a 400-point log grid, then
    bisected to 1e-6 relative."""

    def gap(d2):
        dense = np.exp(predict(p_dense, d1, ratio * d2))
        if floor is not None:
            dense = np.minimum(dense, floor(d2))
        return predict(p_moe, d1, d2) - np.log(dense)

    grid = np.geomspace(lo, hi, 400)
    g = gap(grid)
    if g[0] < 0 and (g < 0).all():
        return "below"
    up = np.nonzero(g >= 0)[0][-1]
    if up == len(grid) - 1:
        return None
    a, b = grid[up], grid[up + 1]
    while b / a - 1 > 1e-6:
        m = math.sqrt(a * b)
        a, b = (m, b) if gap(np.array([m]))[0] >= 0 else (a, m)
    return float(b)


def from_scratch(g: pd.DataFrame) -> np.ndarray:
    """(total FLOPs, loss) of every dense model pretrained from scratch in ``g``: the bases at each D1 and each
    cell's ``dense_scratch``, all points of the one WSD pretraining."""
    rows = [g[["base_flops", "parent"]].to_numpy(float), g[["scratch_flops", "scratch_loss"]].to_numpy(float)]
    pts = np.concatenate(rows)
    return pts[np.isfinite(pts).all(axis=1)]


def fit_recipe(g: pd.DataFrame, boot: int = BOOT) -> dict:
    """Both laws, their quality, CIs and the crossover table of one recipe."""
    n_cells = g.groupby(["d1", "d2"]).ngroups
    out = {"cells": n_cells, "seeds": g.seed.nunique(), "runs": len(g)}
    if n_cells < len(PARAMS) + 2:
        out["refusal"] = (
            f"{n_cells} (D1, D2) cells cannot support a {len(PARAMS)}-parameter law (needs {len(PARAMS) + 2})"
        )
        return out
    dense = g.dropna(subset=["iso_loss"])
    p_moe = fit(g.d1, g.d2, g.val_loss)
    p_dense = fit(dense.d1, dense.iso_d2, dense.iso_loss)
    out.update(
        p_moe=p_moe,
        p_dense=p_dense,
        q_moe=_quality(g, p_moe, "d2", "val_loss"),
        q_dense=_quality(dense, p_dense, "iso_d2", "iso_loss"),
    )
    boots = _bootstrap(g, p_moe, p_dense, boot, np.random.default_rng(0))
    out["ci"] = {
        law: np.percentile([b[i] for b in boots], [2.5, 97.5], axis=0) if boots else None
        for i, law in enumerate(("moe", "dense"))
    }
    ratio = float(np.median(g.iso_d2 / g.d2))
    lo, hi = float(g.d2.min()), float(g.d2.max())
    table = []
    points = from_scratch(g)
    for d1, c in g.groupby("d1"):
        base, per_token = float(c.base_flops.mean()), float((c.flops / c.d2).median())
        floor = lambda d2, base=base, per_token=per_token: best_dense(points, base + per_token * d2)  # noqa: E731
        row = {"d1": d1, "parent": float(c.parent.mean())}
        for name, fl in (("iso", None), ("best", floor)):
            row[name] = crossover(p_moe, p_dense, d1, lo, hi, ratio, fl)
            xs = [crossover(bm, bd, d1, lo, hi, ratio, fl) for bm, bd in boots]
            xs = [x for x in xs if isinstance(x, float)]
            row[name + "_ci"] = (
                tuple(np.percentile(xs, [2.5, 97.5])) if len(xs) >= 0.5 * max(len(boots), 1) and xs else None
            )
            other = c.iso_loss if name == "iso" else best_dense(points, c.base_flops + c.flops)
            row[name + "_wins"] = float((c.val_loss < other).mean())
        table.append(row)
    out.update(table=table, lo=lo, hi=hi, ratio=ratio)
    return out


def _n(x) -> str:
    return "-" if x is None or x != x else f"{x:.4g}"


def _d2(x) -> str:
    return (
        {None: "no crossover in range", "below": "below from the smallest D2"}.get(x, None)
        if not isinstance(x, float)
        else f"{x:.4g}M"
    )


def label(key: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in key.items())


def _plottable(r, name, row):
    ci = row[name + "_ci"]
    if r.get("refusal") or r["q_moe"]["poor"] or r["q_dense"]["poor"] or not isinstance(row[name], float):
        return False
    return ci is None or ci[1] / ci[0] <= r["hi"] / r["lo"]


def line(r: dict, name: str) -> list[dict]:
    """What crossover.png draws for one recipe and comparison (``name``: 'iso' or 'best'): per D1 with a plottable
    D2*, {'d1', 'd2', 'ci'}; ``ci`` (the band) None where the bootstrap gave none."""
    if r.get("refusal"):
        return []
    return [{"d1": p["d1"], "d2": p[name], "ci": p[name + "_ci"]} for p in r["table"] if _plottable(r, name, p)]


def markdown(results: list[tuple[dict, dict]]) -> str:
    lines = [
        "# When to upcycle: the fitted law",
        "",
        "L(D1, D2) = E + A · D1^(−a1) · D2^(−a2 + a3·ln D1), tokens in millions (arXiv 2502.03009, sec. 3); "
        "least squares on log-loss; 95% CIs: seeds resampled with replacement, both laws refit. "
        "Best dense ≤ FLOPs: the lower of the dense continuation's law at the MoE's FLOPs and the dense models "
        "pretrained from scratch (each D1's base, each cell's dense_scratch), interpolated log-linearly in total "
        "FLOPs between recorded points and never above a recorded point of no more FLOPs; no extrapolation (below "
        "the smallest recorded total none counts, beyond the largest the lowest recorded one).",
        "",
    ]
    for key, r in results:
        lines += [f"## {label(key)}", "", f"{r['runs']} runs, {r['cells']} (D1, D2) cells, {r['seeds']} seeds.", ""]
        if r.get("refusal"):
            lines += [f"No fit: {r['refusal']}; no line is drawn.", ""]
            continue
        lines += ["| law | parameter | value | 95% CI |", "|---|---|---|---|"]
        for law in ("moe", "dense"):
            p, ci = r[f"p_{law}"], r["ci"][law]
            for i, name in enumerate(PARAMS):
                val = (lambda v: math.exp(v)) if name == "A" else (lambda v: v)
                c = "-" if ci is None else f"[{_n(val(ci[0][i]))}, {_n(val(ci[1][i]))}]"
                lines.append(f"| {law} | {name} | {_n(val(p[i]))} | {c} |")
        lines += [
            "",
            "| law | cells | residual RMS (log-loss) | seed noise (s.e.) | LOBO RMS | limit | fit |",
            "|---|---|---|---|---|---|---|",
        ]
        for law in ("moe", "dense"):
            q = r[f"q_{law}"]
            lines.append(
                f"| {law} | {q['cells']} | {_n(q['rms'])} | {_n(q['sem'])} | {_n(q['lobo'])} | "
                f"{_n(q['limit'])} | {'**POOR**' if q['poor'] else 'ok'} |"
            )
        lines.append("")
        if r["q_moe"]["poor"] or r["q_dense"]["poor"]:
            lines += [
                "The fit is poor (residual or leave-one-budget-out error above the limit): this data does not "
                "follow the law, so no crossover is predicted and no line is drawn.",
                "",
            ]
        lines += [
            "| D1 (M tokens) | parent loss | D2* vs iso-FLOP twin [95% CI] | D2* vs best dense ≤ FLOPs [95% CI] |",
            "|---|---|---|---|",
        ]
        for row in r["table"]:
            cells = []
            for name in ("iso", "best"):
                ci = row[name + "_ci"]
                cells.append(_d2(row[name]) + ("" if ci is None else f" [{ci[0]:.4g}M, {ci[1]:.4g}M]"))
            lines.append(f"| {row['d1']:.4g} | {row['parent']:.4f} | {cells[0]} | {cells[1]} |")
        unplotted = [
            f"D1={row['d1']:.4g}M ({n})"
            for row in r["table"]
            for n in ("iso", "best")
            if isinstance(row[n], float) and not _plottable(r, n, row)
        ]
        if unplotted and not (r["q_moe"]["poor"] or r["q_dense"]["poor"]):
            lines += ["", f"Not drawn, CI wider than the observed D2 range: {', '.join(unplotted)}."]
        lines.append("")
    return "\n".join(lines)


def csv_rows(results) -> pd.DataFrame:
    rows = []
    for key, r in results:
        if r.get("refusal"):
            continue
        for law in ("moe", "dense"):
            q, ci = r[f"q_{law}"], r["ci"][law]
            for i, name in enumerate(PARAMS):
                val = (lambda v: math.exp(v)) if name == "A" else (lambda v: v)
                rows.append(
                    {
                        **key,
                        "law": law,
                        "parameter": name,
                        "value": float(_n(val(r[f"p_{law}"][i]))),
                        "ci_lo": float(_n(val(ci[0][i]))) if ci is not None else math.nan,
                        "ci_hi": float(_n(val(ci[1][i]))) if ci is not None else math.nan,
                        "residual_rms": float(_n(q["rms"])),
                        "lobo_rms": float(_n(q["lobo"])),
                        "poor": q["poor"],
                    }
                )
    return pd.DataFrame(rows)


def plot(results, df, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    for ax, (name, title) in zip(axes, (("iso", "its iso-FLOP dense twin"), ("best", "the best dense ≤ FLOPs"))):
        for i, (key, r) in enumerate(results):
            g = df[np.all([df[k] == v for k, v in key.items()], axis=0)]
            cells = g.groupby(["d1", "d2"]).agg(moe=("val_loss", "mean"), iso=("iso_loss", "mean")).reset_index()
            ax.scatter(cells.d1, cells.d2, s=14, color=f"C{i}", alpha=0.4)
            if r.get("refusal"):
                continue
            pts = line(r, name)
            if pts:
                ax.plot([p["d1"] for p in pts], [p["d2"] for p in pts], "-o", color=f"C{i}", label=label(key)[:60])
                band = [p for p in pts if p["ci"]]
                if band:
                    ax.fill_between(
                        [p["d1"] for p in band],
                        [p["ci"][0] for p in band],
                        [p["ci"][1] for p in band],
                        color=f"C{i}",
                        alpha=0.2,
                    )
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("D1: dense pretraining tokens (M)")
        ax.set_title(f"D2* where the MoE crosses {title}", fontsize=10)
    axes[0].set_ylabel("D2: upcycling tokens (M); dots: measured cells")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


def law(roots, out, boot: int = BOOT) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    df = law_runs(*roots)
    results = [(dict(zip(RECIPE, k)), fit_recipe(g, boot)) for k, g in df.groupby(RECIPE, sort=True, dropna=False)]
    files = {"law_md": out / "law.md", "law_csv": out / "law.csv", "crossover_png": out / "crossover.png"}
    files["law_md"].write_text(markdown(results))
    csv_rows(results).to_csv(files["law_csv"], index=False)
    plot(results, df, files["crossover_png"])
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="+", help="sunk-cost sweep folders, e.g. logs/multirun/sweep_sunk_cost")
    ap.add_argument("--out", default="results/law")
    ap.add_argument("--boot", type=int, default=BOOT, help="bootstrap resamples")
    args = ap.parse_args()
    for root in args.roots:
        if not Path(root).is_dir():
            raise SystemExit(f"analysis.law: no such folder: {root}")
    if law_runs(*args.roots).empty:
        raise SystemExit(f"analysis.law: no complete upcycle run with dense_base_tokens under {' '.join(args.roots)}")
    files = law(args.roots, args.out, args.boot)
    print(files["law_md"].read_text())
    print("wrote", ", ".join(str(p) for p in files.values()))


if __name__ == "__main__":
    main()
