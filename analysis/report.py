"""One command regenerates every table and plot from run outputs:

python -m analysis.report logs/multirun/<name> [more dirs] --out report/
"""

from __future__ import annotations

import argparse
from pathlib import Path

from analysis import plots, tables
from analysis.collect import collect


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
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("roots", nargs="+", help="run or multirun folders holding results.json files")
    ap.add_argument("--out", default="report")
    args = ap.parse_args()
    files = report(args.roots, args.out)
    print((Path(args.out) / "table.md").read_text())
    print("wrote", ", ".join(str(p) for p in files.values()))
    if "load" not in files:
        print("expert_load.png: not drawn (no run logged moe/expert_load_cv: dense runs only)")


if __name__ == "__main__":
    main()
