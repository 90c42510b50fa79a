"""The SmolLM2-135M leg's record (results/smollm2/run_leg.sh): one row per MoE run with its step-0, final and
best validation losses beside its dense twins, and the run to export.

    python -m analysis.smollm2 table <logs>    # markdown table of every complete MoE run under <logs>
    python -m analysis.smollm2 compare <logs>  # each recipe and budget against its dense twins, paired by seed
    python -m analysis.smollm2 summary <logs>  # both (results/smollm2/summary.md)
    python -m analysis.smollm2 best <logs>     # the run folder of the best MoE that kept a checkpoint
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from analysis.stats import MIN_SEEDS, paired, verdict

# analysis.stats.verdict speaks of a paper's direction; here the direction is "the MoE beats its dense twin"
_WORDS = {"agrees": "MoE better", "disagrees": "dense better"}


def recipe(run: dict) -> str:
    """A run's recipe as the tables name it: its routing, then its MoE shape where it is not the leg's E8G1T2 and
    its load balancing where it is not the auxiliary loss (``topk_softmax E16G2T3S1``, ``sigmoid_topk
    expert_bias``)."""
    moe = run["config"].get("moe", {})
    words = [run.get("routing", moe.get("routing", ""))]
    if run.get("moe", "E8G1T2") != "E8G1T2":
        words.append(run["moe"])
    if moe.get("load_balancing", "aux_loss") != "aux_loss":
        words.append(moe["load_balancing"])
    return " ".join(words)


def moe_runs(logs: str | Path) -> list[dict]:
    """Complete upcycled runs under ``logs``, smallest budget first, then by recipe and seed."""
    runs = []
    for path in Path(logs).rglob("results.json"):
        res = json.loads(path.read_text())
        if res.get("status") == "complete" and res.get("method") == "upcycle":
            runs.append({**res, "run_dir": str(path.parent)})
    return sorted(runs, key=lambda r: (r["tokens"], recipe(r), r["config"].get("seed", 0)))


def best_exportable(logs: str | Path) -> str:
    """The lowest final validation loss among the MoE runs that kept ``checkpoints/last.ckpt`` (run_leg.sh keeps
    it for the larger budget of SMOLLM2_KEEP's routings only: 8.3 GB each)."""
    runs = [r for r in moe_runs(logs) if (Path(r["run_dir"]) / "checkpoints" / "last.ckpt").exists()]
    if not runs:
        raise SystemExit(f"no complete MoE run with checkpoints/last.ckpt under {logs}")
    return min(runs, key=lambda r: r["val_loss"])["run_dir"]


def table(logs: str | Path) -> str:
    rows = [
        "| recipe | seed | MoE tokens | dense parent | MoE step 0 | MoE final (best) | dense iso-FLOP "
        "| dense same tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in moe_runs(logs):
        iso, tok = r.get("dense_iso", {}), r.get("dense_tokens", {})
        rows.append(
            f"| {recipe(r)} | {r['config'].get('seed')} | {r['tokens']:,} | {r['dense_parent_val_loss']:.4f} "
            f"| {r['init_val_loss']:.4f} "
            f"| {r['val_loss']:.4f} ({r['best_val_loss']:.4f}) | {iso.get('val_loss', float('nan')):.4f} "
            f"| {tok.get('val_loss', float('nan')):.4f} |"
        )
    return "\n".join(rows)


def compare(logs: str | Path) -> str:
    """One row per recipe and budget: the MoE's final validation loss minus each dense twin's, paired by seed
    (the twins of a seed share its data order), as the mean difference with its 95% CI and the verdict rule of
    analysis.stats (a verdict needs MIN_SEEDS seeds and a CI that excludes 0)."""
    groups: dict[tuple[int, str], dict[int, dict]] = {}
    for r in moe_runs(logs):
        seeds = groups.setdefault((r["tokens"], recipe(r)), {})
        seed = r["config"].get("seed", 0)
        if seed in seeds:
            raise SystemExit(
                f"two complete runs of {recipe(r)} at {r['tokens']:,} tokens, seed {seed}: "
                f"{seeds[seed]['run_dir']} and {r['run_dir']}"
            )
        seeds[seed] = r
    rows = [
        "| recipe | MoE tokens | seeds | MoE - dense iso-FLOP | verdict | MoE - dense same tokens | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for (tokens, name), seeds in sorted(groups.items()):
        cells = []
        for twin in ("dense_iso", "dense_tokens"):
            diffs = [r["val_loss"] - r[twin]["val_loss"] for r in seeds.values() if "val_loss" in r.get(twin, {})]
            s = paired(diffs)
            word = verdict([-d for d in diffs]) if s.n >= MIN_SEEDS else f"none ({s.n} of {MIN_SEEDS} seeds)"
            cells += [f"{s.mean:+.4f} {s.ci()}", _WORDS.get(word, word)]
        rows.append(f"| {name} | {tokens:,} | {','.join(map(str, sorted(seeds)))} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("table", "compare", "summary", "best"))
    ap.add_argument("logs")
    args = ap.parse_args(argv)
    summary = lambda logs: f"{table(logs)}\n\n{compare(logs)}"  # noqa: E731
    print({"table": table, "compare": compare, "summary": summary, "best": best_exportable}[args.what](args.logs))


if __name__ == "__main__":
    main()
