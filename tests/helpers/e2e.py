"""Running the real entry point (``run.py`` under Hydra) as a subprocess, and reading what it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = [
    "pretrain.tokens=60000",
    "train.tokens=12800",
    "train.val_every=10",
    "train.ckpt_every=5",
    "data.max_bytes=1000000",
    "data.vocab_size=512",
    "trainer.enable_progress_bar=false",
    "print_config=false",
    "logger=csv",
]


def run_cli(env, logs, *args, check=True):
    flags = [a for a in args if a.startswith("-")]
    overrides = [a for a in args if not a.startswith("-")]
    proc = subprocess.run(
        [sys.executable, "run.py", *flags, *FAST, *overrides],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**env, "UPCYCLE_LOGS": str(logs)},
        timeout=900,
    )
    if check and proc.returncode != 0:
        raise AssertionError(proc.stderr[-4000:])
    return proc


# the study driver at the CPU scale: the GPU's micro-batches off, frequent validation, CSV logs
STUDY_CPU = "data.micro_batch_size=null train.val_every=5 pretrain.optim.warmup_steps=5 logger=csv"


def run_study_driver(env, part: str, logs: Path, **variables: str) -> tuple[subprocess.CompletedProcess, str]:
    """``bash results/run_study.sh PART`` (what a GPU lease runs) at the CPU scale into ``logs``, with the
    driver's own variables (SUNK_D1=..., LADDER_SEEDS=...); returns the process and its driver.log."""
    proc = subprocess.run(
        ["bash", "results/run_study.sh", part],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        env={**env, "UPCYCLE_LOGS": str(logs), "STUDY_SCALE": "cpu", "STUDY_OVERRIDES": STUDY_CPU, **variables},
    )
    return proc, (logs / "driver.log").read_text()


def results(path: Path) -> dict:
    return json.loads((path / "results.json").read_text())


def start_cli(env, logs, *args, quiet: bool = False) -> subprocess.Popen:
    """run.py in its own process group (a kill reaches every process it starts), output piped (or dropped: a
    pipe nobody reads while the run goes on can fill and stall it)."""
    return subprocess.Popen(
        [sys.executable, "run.py", *FAST, *args],
        cwd=ROOT,
        env={**env, "UPCYCLE_LOGS": str(logs)},
        start_new_session=True,
        stdout=subprocess.DEVNULL if quiet else subprocess.PIPE,
        stderr=subprocess.DEVNULL if quiet else subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, path: Path) -> None:
    """SIGKILL the run (and every process it started) once ``path`` is a whole checkpoint: not a fixed time
    later, which a fast CPU can spend finishing the run."""
    import signal
    import time

    from harness.io import intact_zip

    deadline = time.time() + 300
    while not (path.exists() and intact_zip(path)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert path.exists(), "the run ended before the checkpoint appeared"


def kill_after_first_checkpoint(env, logs, *overrides) -> None:
    """Start run.py and SIGKILL it as soon as its first checkpoint is whole."""
    name = next(o.split("=", 1)[1] for o in overrides if o.startswith("name="))
    kill_when(
        start_cli(env, logs, *overrides, quiet=True), logs / "runs" / name / "latest" / "checkpoints" / "last.ckpt"
    )
