"""Mutation check: plant one known bug at a time in a temporary copy of the repository and require that the
named tests fail there. ``python -m tests.mutations`` prints mutation -> caught/missed and exits non-zero when
one is missed or its patch no longer applies to the source (so the list cannot rot silently).

Each entry is (name, file, old string, new string, tests). ``new=None`` marks a placeholder still to be written:
it is reported as TODO and counts as a failure of the check."""

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTATIONS: list[tuple[str, str, str, str | None, list[str]]] = [
    (
        "fc2 zeroed in upcycling",
        "harness/upcycle.py",
        "            part.mul_(c)\n",
        "            part.mul_(c)\n    w2.zero_()\n",
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
        "aux loss f_e over N tokens, not N*T assignments",
        "harness/moe.py",
        "frac = counts.float() / counts.sum().clamp_min(1)",
        "frac = counts.float() / probs.shape[0]",
        ["tests/test_moe.py"],
    ),
    (
        "Drop-Upcycling r ignored",
        "harness/upcycle.py",
        "    k = round(ratio * fe)\n",
        "    k = 0\n",
        ["tests/test_upcycle.py"],
    ),
    (
        "drop draws scaled by the weight factors",
        "harness/upcycle.py",
        "    for i in range(e):  # after scaling",
        "    for i in range(0):  # after scaling",
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
        "cache key missing the corpus",  # the stage keys are being rewritten: update old/new after that merge
        "harness/pretrain.py",
        '"data": exp.data.shard_dir.name',
        '"data": "corpus"',
        ["tests/test_run_identity.py"],
    ),
    ("verdict from 2 seeds", "analysis/study.py", "", None, []),  # placeholder: to be filled by the verdict owner
]


def run_one(name: str, file: str, old: str, new: str | None, tests: list[str]) -> str:
    if new is None:
        return "TODO"
    with tempfile.TemporaryDirectory() as tmp:
        copy = Path(tmp) / "repo"
        shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", "__pycache__", "results", ".pytest_cache"))
        path = copy / file
        text = path.read_text()
        if text.count(old) != 1:
            return "DOES NOT APPLY"
        path.write_text(text.replace(old, new))
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
            cwd=copy,
            env={**__import__("os").environ, "PYTHONPATH": str(copy)},
            capture_output=True,
            text=True,
        )
        return "caught" if proc.returncode != 0 else "MISSED"


def main() -> int:
    only = sys.argv[1:]
    rows = [(m[0], run_one(*m)) for m in MUTATIONS if not only or any(o in m[0] for o in only)]
    width = max(len(n) for n, _ in rows)
    for name, result in rows:
        print(f"{name:<{width}}  {result}")
    return 0 if all(r == "caught" for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
