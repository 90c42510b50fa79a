"""Mutation check: plant one known bug at a time in a temporary copy of the repository and require that the
named tests fail there. ``python -m tests.mutations`` prints mutation -> caught/missed and exits non-zero when
one is missed or its patch no longer applies to the source (so the list cannot rot silently).

Each entry is (name, file, old string, new string, tests). The run takes minutes (one pytest run per mutation), so
it is not part of the suite; ``tests/test_mutations.py`` checks there that every patch still applies.

    python -m tests.mutations              # every mutation
    python -m tests.mutations "Drop"       # those whose name contains a filter"""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTATIONS: list[tuple[str, str, str, str, list[str]]] = [
    (
        "fc2 zeroed in upcycling",
        "harness/upcycle.py",
        "            part.mul_(c)\n",
        "            part.mul_(c)\n    w2.zero_()\n",
        ["tests/test_upcycle.py"],
    ),
    (
        "weight scaling skipped",
        "harness/upcycle.py",
        "        if c != 1.0:\n            part.mul_(c)\n",
        "        pass\n",
        ["tests/test_upcycle.py"],
    ),
    (
        "fc2 of an expert paired with another expert's shard",
        "harness/upcycle.py",
        "        w2[i].copy_(shards[i % g][1])\n",
        "        w2[i].copy_(shards[(i + 1) % g][1])\n",
        ["tests/test_upcycle.py"],
    ),
    (
        "virtual-group shards in the wrong order (fc2 columns mirrored)",
        "harness/upcycle.py",
        "        out.append((fc1, w2[:, rows]))\n",
        "        out.append((fc1, w2[:, slice((granularity - 1 - j) * fe, (granularity - j) * fe)]))\n",
        ["tests/test_upcycle.py"],
    ),
    (
        "renormalised softmax_topk",
        "harness/moe.py",
        "        weights, experts = probs.topk(top_k, dim=-1)\n",
        "        weights, experts = probs.topk(top_k, dim=-1)\n"
        "        weights = weights / weights.sum(-1, keepdim=True)\n",
        ["tests/test_moe.py"],
    ),
    (
        "aux loss without its 1/T (f_e over N tokens, not N*T assignments)",
        "harness/moe.py",
        "frac = counts.float() / counts.sum().clamp_min(1)",
        "frac = counts.float() / probs.shape[0]",
        ["tests/test_moe.py"],
    ),
    (
        "capacity's dropped rows left as the grouped GEMM's unwritten memory",
        "harness/moe.py",
        "        return torch.where(live, out, 0)\n",
        "        return out\n",
        ["tests/test_shared_capacity.py"],
    ),
    (
        "Drop-Upcycling r ignored",
        "harness/upcycle.py",
        "    k = round(ratio * fe)\n",
        "    k = 0\n",
        ["tests/test_upcycle.py"],
    ),
    (
        "Drop-Upcycling draws scaled by the weight factors (drawn before scaling)",
        "harness/upcycle.py",
        "    for part, c in ((w1[:, :fe], c_gate), (w1[:, fe:], c_up), (w2, c2)):\n"
        "        if c != 1.0:\n"
        "            part.mul_(c)\n"
        "    for i in range(e):  # after scaling: re-drawn units follow the dense statistics, unscaled\n"
        "        _drop_reinit(w1[i], w2[i], mlp, float(recipe.drop_ratio), drop_gen)\n",
        "    for i in range(e):\n"
        "        _drop_reinit(w1[i], w2[i], mlp, float(recipe.drop_ratio), drop_gen)\n"
        "    for part, c in ((w1[:, :fe], c_gate), (w1[:, fe:], c_up), (w2, c2)):\n"
        "        if c != 1.0:\n"
        "            part.mul_(c)\n",
        ["tests/test_upcycle.py"],
    ),
    (
        "router drawn from the drop generator",
        "harness/upcycle.py",
        "generator=router_gen)",
        "generator=drop_gen)",
        ["tests/test_upcycle.py"],
    ),
    (
        "iso-FLOP dense budget one step over",
        "harness/train.py",
        "        steps = exp.steps(iso_tokens)\n",
        "        steps = exp.steps(iso_tokens) + 1\n",
        ["tests/test_e2e.py::test_dense_method_uses_iso_flop_budget"],
    ),
    (
        "dense base cache key without the data block (corpus, seq_len, validation set)",
        "harness/identity.py",
        '"dense_base": ("data", "model", "pretrain",',
        '"dense_base": ("model", "pretrain",',
        ["tests/test_stage_keys.py"],
    ),
    (
        "verdict from 2 seeds",
        "analysis/stats.py",
        "MIN_SEEDS = 3  # paired seeds a verdict needs",
        "MIN_SEEDS = 2  # paired seeds a verdict needs",
        ["tests/test_stats.py"],
    ),
    (
        "granularity differences across replicates (each preset's losses sorted apart, not paired)",
        "analysis/granularity.py",
        "        diffs = (done[COARSE] - done[finer]) if not done.empty else pd.Series([], dtype=float)\n",
        "        diffs = (done[COARSE] - done[finer].sort_values(ignore_index=True).set_axis(done.index))"
        " if not done.empty else pd.Series([], dtype=float)\n",
        ["tests/test_granularity_analysis.py"],
    ),
    (
        "CUDA graphs checked on the run's batch only (the base's pretraining accumulates)",
        "harness/experiment.py",
        '        [] if hf_base else [("pretrain.batch_size", pretrain.batch_size)]\n',
        "        []\n",
        ["tests/test_experiment_config.py"],
    ),
    (
        "the container's CPU quota ignored (torch's pool sized by the affinity mask alone)",
        "harness/cpus.py",
        "    return max(1, min(seen, math.floor(quota) if quota is not None else seen))\n",
        "    return max(1, seen)\n",
        ["tests/test_cpus.py"],
    ),
]


def tracked_copy(dest: Path) -> None:
    """The repository's tracked files (what a clean clone holds), without caches, venvs or run folders."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    for name in filter(None, names.stdout.split("\0")):
        src = ROOT / name
        if src.is_file() and not name.startswith("results/"):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)


def applies(file: str, old: str) -> bool:
    """Whether the planted patch still finds its one place in the source."""
    return (ROOT / file).read_text().count(old) == 1


def run_one(name: str, file: str, old: str, new: str, tests: list[str]) -> str:
    if not applies(file, old):
        return "DOES NOT APPLY"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        tracked_copy(copy)
        path = copy / file
        path.write_text(path.read_text().replace(old, new))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=copy,
            env={**os.environ, "PYTHONPATH": str(copy)},
            capture_output=True,
            text=True,
        )
        return "caught" if proc.returncode != 0 else "MISSED"


def main() -> int:
    only = sys.argv[1:]
    chosen = [m for m in MUTATIONS if not only or any(o in m[0] for o in only)]
    width = max(len(m[0]) for m in chosen)
    rows = []
    for m in chosen:
        rows.append((m[0], run_one(*m)))
        print(f"{m[0]:<{width}}  {rows[-1][1]}", flush=True)
    return 0 if all(r == "caught" for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
