"""What a harness job loses against the bare training step, and what several jobs on one GPU gain.

For each preset: tokens/s of ``benchmarks/train_step.py`` (the bare step: same model, loss, clipping and
optimizer, no Lightning), of one ``run.py`` job alone (steady: the median of its logged ``perf/tokens_per_s``
past the first fifth of the run; end to end: its tokens over the process's whole life, setup included), and of
``--jobs`` such jobs started together on the same GPU (aggregate tokens over the span from the first start to
the last end). The dense base is pretrained once, briefly, before anything is timed: speed does not depend on
how well it is trained.

    python benchmarks/harness_overhead.py --moe none,E8G1T2,E64G8T8 --jobs 6 --out bench_out     # one H100
    python benchmarks/harness_overhead.py --model tiny --trainer cpu --seq 64 --batch 8 --steps 6 \\
        --moe none,E8G1T2 --jobs 2 --corpus-bytes 1000000 --val-tokens 4096 --no-compile           # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from analysis import collect

ROOT = Path(__file__).resolve().parents[1]


def bare(args, moe: str) -> float:
    """tokens/s of the bare step at the harness job's shape."""
    cmd = [sys.executable, "benchmarks/train_step.py", "--model", args.model, "--moe", moe]
    cmd += ["--seq", str(args.seq), "--batch", str(args.batch), "--vocab", str(args.vocab), "--steps", "20"]
    cmd += ["--compile", "--compile-mode", args.compile_mode] if args.compile else []
    cmd += ["--device", "cuda" if args.trainer == "gpu" else "cpu"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["tokens_per_s"]


def overrides(args, moe: str, seed: int, name: str, profile: bool = False) -> list[str]:
    job = ["method=dense", "moe=E8G1T2"] if moe == "none" else ["method=upcycle", f"moe={moe}"]
    return [
        "+scale=study",
        f"model={args.model}",
        f"trainer={args.trainer}",
        f"train.compile={str(args.compile).lower()}",
        f"train.compile_mode={args.compile_mode}",
        f"data.seq_len={args.seq}",
        f"data.batch_size={args.batch}",
        f"data.vocab_size={args.vocab}",
        f"data.max_bytes={args.corpus_bytes}",
        f"pretrain.tokens={args.pretrain_tokens}",
        f"pretrain.batch_size={args.batch}",
        f"train.tokens={args.steps * args.batch * args.seq}",
        f"train.val_every={args.val_every}",
        "iso_flop_baseline=false",
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"seed={seed}",
        f"name={name}",
        *([f"data.val_tokens={args.val_tokens}"] if args.val_tokens else []),
        *([f"train.profile_steps={args.profile_steps}"] if profile and args.profile_steps else []),
        *job,
    ]


def job_env(args) -> dict:
    """The jobs' logs and caches under ``--out``; ``--job-threads``: each job's OMP_NUM_THREADS (torch's CPU pool),
    to tell the CPU stages of jobs that share the machine slowed by oversubscription from their own cost."""
    env = {**os.environ, "UPCYCLE_LOGS": str(args.out / "logs"), "UPCYCLE_CACHE": str(args.out / "cache")}
    return env | ({"OMP_NUM_THREADS": str(args.job_threads)} if args.job_threads else {})


def start(args, moe: str, seed: int, name: str, profile: bool = False) -> subprocess.Popen:
    env = job_env(args)
    log = open(args.out / f"{name}_s{seed}.log", "w")
    cmd = [sys.executable, "run.py", *overrides(args, moe, seed, f"{name}_s{seed}", profile)]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def cprofile(args, moe: str) -> None:
    """One more lone job under cProfile, untimed (it slows every Python call): where its seconds before the first
    step and between steps go, by function, cumulative (``cprofile_<preset>.txt``, the top 60)."""
    import pstats

    name = f"bench_{moe}_cprofile"
    env = job_env(args)
    stats = args.out / f"{name}.pstats"
    cmd = [sys.executable, "-m", "cProfile", "-o", str(stats), "run.py", *overrides(args, moe, 1, name)]
    with open(args.out / f"{name}.log", "w") as log:
        subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    with open(args.out / f"cprofile_{moe}.txt", "w") as fh:
        pstats.Stats(str(stats), stream=fh).sort_stats("cumulative").print_stats(60)


def sweep(args, moe: str, jobs: int, name: str) -> subprocess.Popen:
    """The study driver's way: one ``run.py -m`` sweep of ``jobs`` seeds through the joblib launcher, its
    ``--launcher-workers`` worker processes each running job after job."""
    env = job_env(args)
    log = open(args.out / f"{name}.log", "w")
    own = [o for o in overrides(args, moe, 0, name) if not o.startswith("seed=")]
    seeds = ",".join(str(s) for s in range(1, jobs + 1))
    launcher = ["hydra/launcher=parallel", f"hydra.launcher.n_jobs={args.launcher_workers}"]
    cmd = [sys.executable, "run.py", "-m", *own, *launcher, f"seed={seeds}"]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def run_folders(args, name: str, jobs: int) -> list[Path]:
    """The jobs' run folders: ``runs/<name>_s<seed>/latest`` for separate processes, the sweep's job folders
    (``multirun/<name>/*``, by seed) for a launcher sweep."""
    if not (args.launcher_workers and jobs > 1):
        return [(args.out / "logs" / "runs" / f"{name}_s{seed}" / "latest").resolve() for seed in range(1, jobs + 1)]
    found = sorted(p.parent for p in (args.out / "logs" / "multirun" / name).glob("*/results.json"))
    if len(found) != jobs:
        raise SystemExit(f"the sweep {name} left {len(found)} results of {jobs}; see {args.out}/{name}.log")
    return found


def job_figures(args, run: Path, name: str) -> dict:
    """Steady tokens/s (median past the first fifth), tokens, and the run's own wall times."""
    res = json.loads((run / "results.json").read_text())
    m = collect.metrics(run)
    tps = m["perf/tokens_per_s"].dropna().tolist()
    steady = statistics.median(tps[len(tps) // 5 :]) if tps else float("nan")
    # where the job's seconds went (harness/timing.py): its stages, and inside its fit the setup, compile, steps
    seconds = {**res.get("timings_s", {}), **{f"fit_{k}": v for k, v in res.get("fit_timings_s", {}).items()}}
    seconds |= {f"compile_{k}": v for k, v in res.get("fit_compile", {}).items()}  # what its MoE fit traced
    seconds |= {f"host_{k}": v for k, v in res.get("host", {}).items()}  # the CPUs its CPU stages ran on
    if "profile" in res:  # the job's profiled window (train.profile_steps), kept beside the figures
        shutil.copytree(run / "profile", args.out / f"profile_{name}", dirs_exist_ok=True)
    return {
        "profile": res.get("profile"),
        "steady": steady,
        "tokens": res["tokens"],
        "fit_wall_s": res["fit_wall_s"],
        "wall_s": res["wall_time_s"],
        "seconds": seconds,
    }


def harness(args, moe: str, jobs: int) -> dict:
    """``jobs`` run.py jobs started together (seeds 1..jobs): per-job and aggregate figures. A job alone profiles
    ``--profile-steps`` of its steps (a quarter of the way in; the steady median past the first fifth hardly moves)."""
    name = f"bench_{moe}_x{jobs}"
    t0 = time.time()
    if args.launcher_workers and jobs > 1:
        procs = [sweep(args, moe, jobs, name)]
    else:
        procs = [start(args, moe, seed, name, profile=jobs == 1) for seed in range(1, jobs + 1)]
    codes = [p.wait() for p in procs]
    span = time.time() - t0
    if any(codes):
        raise SystemExit(f"a harness job failed (exit codes {codes}); see {args.out}/{name}*.log")
    figs = [job_figures(args, run, name) for run in run_folders(args, name, jobs)]
    return {
        "steady": statistics.median(f["steady"] for f in figs),
        "aggregate": sum(f["tokens"] for f in figs) / span,
        "setup_s": statistics.median(f["wall_s"] - f["fit_wall_s"] for f in figs),
        "seconds": figs[0]["seconds"],
        "profile": figs[0]["profile"],
        # each job's own: a warm worker's later jobs show what they no longer pay (startup, compile)
        "jobs": [{"steady": f["steady"], "wall_s": f["wall_s"], **f["seconds"]} for f in figs],
    }


def _profiled(report: dict | None) -> dict:
    """The lone job's profiled window in three columns: its step, the GPU's busy share of it, the host's waits."""
    if not report:
        return {}
    waits = sum(report["host_waits_by_site"].values()) / max(1, report["steps"])
    return {"prof_step_ms": report["step_ms"], "prof_gpu_busy": report["gpu_busy_share"], "prof_waits_per_step": waits}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="base50m")
    ap.add_argument("--moe", default="none,E8G1T2,E64G8T8", help="comma-separated presets; none = dense")
    ap.add_argument("--trainer", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--vocab", type=int, default=16384)
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps per harness job")
    ap.add_argument("--val-every", type=int, default=100, help="the study's cadence")
    # not the study's 524288: the corpus is the installed packages' source (data.source=python), so it changes with
    # what a machine has installed; on the H200 with the eval wheels its split held 517,720 validation tokens
    ap.add_argument("--val-tokens", type=int, default=262144, help="data.val_tokens (0: the study's)")
    ap.add_argument("--jobs", type=int, default=6, help="jobs at once on the one GPU for the aggregate")
    ap.add_argument(
        "--launcher-workers",
        type=int,
        default=0,
        help="> 0: the --jobs run as one run.py -m sweep through the joblib launcher with this many workers "
        "(the study driver's way); 0: --jobs separate run.py processes",
    )
    ap.add_argument("--pretrain-tokens", type=int, default=2_000_000)
    ap.add_argument("--corpus-bytes", type=int, default=40_000_000)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--compile-mode", default="default", help="train.compile_mode of the jobs and the bare step")
    ap.add_argument("--cprofile", default="", help="comma-separated presets: one more job each under cProfile")
    ap.add_argument("--profile-steps", type=int, default=8, help="steps of the lone job under the profiler (0: none)")
    ap.add_argument("--job-threads", type=int, default=0, help="OMP_NUM_THREADS of every job (0: their own choice)")
    ap.add_argument("--out", type=Path, default=Path("bench_out"))
    args = ap.parse_args()
    if args.job_threads < 0:
        ap.error(f"--job-threads={args.job_threads}: threads must be >= 1 (0: the jobs' own choice)")
    if args.jobs < 2:  # a second lone job of the same config is skipped as complete: its "aggregate" means nothing
        ap.error(f"--jobs={args.jobs}: jobs at once must be >= 2 (one job alone is measured anyway)")
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    presets = args.moe.split(",")
    base = subprocess.run(  # the corpus and the dense base, once, untimed
        [sys.executable, "run.py", *overrides(args, "none", 0, "bench_base"), "method=pretrain"],
        cwd=ROOT,
        env={**os.environ, "UPCYCLE_LOGS": str(args.out / "logs"), "UPCYCLE_CACHE": str(args.out / "cache")},
        capture_output=True,
        text=True,
    )
    if base.returncode:  # the job's own last line says why (a config error names its key)
        raise SystemExit(f"the dense base's job failed: {(base.stderr.strip().splitlines() or ['?'])[-1]}")
    rows, seconds, jobs = [], [], []
    for moe in presets:
        b = bare(args, moe)
        one = harness(args, moe, 1)
        many = harness(args, moe, args.jobs)
        rows.append(
            {
                "preset": "dense" if moe == "none" else moe,
                "bare_tok_s": b,
                "job_steady_tok_s": one["steady"],
                "job_vs_bare": one["steady"] / b,
                "job_end_to_end_tok_s": one["aggregate"],
                "job_setup_s": one["setup_s"],
                f"x{args.jobs}_aggregate_tok_s": many["aggregate"],
                f"x{args.jobs}_vs_one_job": many["aggregate"] / one["aggregate"],
                f"x{args.jobs}_vs_bare": many["aggregate"] / b,
                f"x{args.jobs}_steady_per_job": many["steady"],
                **_profiled(one["profile"]),
            }
        )
        print(json.dumps(rows[-1]), flush=True)
        seconds.append({"preset": rows[-1]["preset"], **one["seconds"]})
        jobs += [{"preset": rows[-1]["preset"], "job": i, **j} for i, j in enumerate(many["jobs"])]
        write(args, rows, seconds, jobs)  # after every preset: a call cut off at its limit keeps what it finished
    for moe in filter(None, args.cprofile.split(",")):
        cprofile(args, moe)


def write(args, rows: list[dict], seconds: list[dict], jobs: list[dict]) -> None:
    table = pd.DataFrame(rows)
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3g}"))
    table.to_csv(args.out / "harness_overhead.csv", index=False)
    spent = pd.DataFrame(seconds)  # one job alone: where its seconds went, in the order it spends them
    order = ["preset", "startup", "data", "dense_base", "parent_eval", "upcycle", "init_eval", "fit"]
    order += [f"fit_{k}" for k in ("init", "setup", "first_step", "steps", "validation", "checkpoint", "final_eval")]
    spent = spent[[c for c in order if c in spent] + [c for c in spent if c not in order]]
    print("\nseconds of one job alone, by stage (fit_*: inside its MoE fit)")
    print(spent.to_string(index=False, float_format=lambda x: f"{x:.2f}"), flush=True)
    spent.to_csv(args.out / "harness_overhead_seconds.csv", index=False)
    # the jobs run at once, each its own seconds (for a launcher sweep: by folder, not by worker)
    pd.DataFrame(jobs).to_csv(args.out / "harness_overhead_jobs.csv", index=False)


if __name__ == "__main__":
    main()
