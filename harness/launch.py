"""Multi-device training for one job: the job's process starts one worker process per device.

Why not Lightning's own launcher: it re-runs ``sys.argv`` in each child. Under a Hydra multirun
that re-runs the whole sweep in every child, and since a job trains up to three models (dense
base, MoE, iso-FLOP dense), only its first Trainer would launch children at all. Here the job's
process keeps the stage logic (caches, file locks, evaluation) and, for each model it trains, saves the
model and the job's resolved config under ``<run>/launch/``, then starts
``python -m harness.worker <dir>`` once per device with ``LOCAL_RANK``/``WORLD_SIZE``/
``MASTER_*`` set, as ``torchrun`` would. Lightning sees processes created externally and only
joins them; rank 0 writes the fit summary and the trained weights back for the job to load.

On a multi-node SLURM allocation the workers are started with ``srun`` across the nodes instead
(one task per device); see :func:`worker_command`.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from harness.cpus import usable_cpus
from harness.errors import ConfigError

WORKER_ENV = "UPCYCLE_WORKER"  # set in workers: how they were started ("local" or "srun")
WORKER_MODULE = "harness.worker"  # started by name, never imported here: the worker imports the fit logic


def world_size(trainer_cfg: DictConfig) -> int:
    """Processes a trainer config asks for: devices per node x nodes (``auto``/-1 = all visible GPUs)."""
    devices, nodes = trainer_cfg.get("devices", 1), trainer_cfg.get("num_nodes", 1)
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if devices in ("auto", -1, "-1"):
        n = torch.cuda.device_count() if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available() else 1
    elif isinstance(devices, (list, tuple, ListConfig)):
        n = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.isdigit()):
        n = int(devices)
    else:
        raise ConfigError(f"trainer.devices={devices!r} is not an int, a list of ids or 'auto'")
    if n < 1:
        raise ConfigError(f"trainer.devices={devices!r} must be >= 1")
    if not isinstance(nodes, int) or nodes < 1:
        raise ConfigError(f"trainer.num_nodes={nodes!r} must be a whole number >= 1")
    return max(n, 1) * nodes


def check_strategy(trainer_cfg: DictConfig) -> None:
    """FSDP on CPUs fails in one line before any compute, wherever the job is built: Lightning's FSDP shards
    over CUDA devices only, and its own error would come from inside each worker after the corpus and base."""
    strategy = trainer_cfg.get("strategy")
    target = strategy.get("_target_", "") if isinstance(strategy, (dict, DictConfig)) else str(strategy or "")
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if target.rsplit(".", 1)[-1].lower() == "fsdp" and accelerator not in ("gpu", "cuda", "auto"):
        raise ConfigError(
            f"trainer.accelerator={accelerator}: FSDP (trainer=fsdp) shards over CUDA GPUs only; "
            "on CPUs use trainer=ddp_cpu"
        )


def check_devices(trainer_cfg: DictConfig) -> None:
    """A GPU trainer where no GPU is visible fails in one line before any compute. Checked in the job itself,
    not in a sweep's preflight: a SLURM sweep is submitted from a login node that has no GPU."""
    accelerator = str(trainer_cfg.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda"):
        return
    have = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if have == 0:
        raise ConfigError(
            f"trainer.accelerator={accelerator} (trainer=gpu, ddp or fsdp, or a +scale that picks one) but no CUDA "
            "GPU is visible here: use trainer=cpu"
        )
    devices = trainer_cfg.get("devices", 1)
    if isinstance(devices, int) and devices > have:
        raise ConfigError(f"trainer.devices={devices} but {have} CUDA GPU(s) are visible here")


def in_worker() -> bool:
    return WORKER_ENV in os.environ


def idle_task() -> bool:
    """True in the other tasks of a multi-node SLURM job: node 0's task drives the job and starts
    every node's workers through ``srun``; the others have nothing to do."""
    return not in_worker() and int(os.environ.get("SLURM_PROCID", "0")) > 0


def needs_launch(trainer_cfg: DictConfig) -> bool:
    """True in the job's process when the trainer wants several processes."""
    if in_worker() or world_size(trainer_cfg) == 1:
        return False
    if "LOCAL_RANK" in os.environ or "TORCHELASTIC_RUN_ID" in os.environ:
        raise ConfigError(
            "run.py starts its own per-device workers: launch it as one process per job "
            "(not under torchrun or `srun --ntasks-per-node>1`)"
        )
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _slurm_nodes() -> int:
    return int(os.environ.get("SLURM_JOB_NUM_NODES", os.environ.get("SLURM_NNODES", "1")))


def worker_command(folder: Path, trainer_cfg: DictConfig) -> tuple[list[list[str]], list[dict]]:
    """The worker commands and their extra environments.

    One node: one local process per device. Several nodes (``trainer.num_nodes > 1`` inside a SLURM
    allocation): a single ``srun`` that starts ``devices`` tasks per node; Lightning's SLURM
    environment reads the ranks from SLURM's variables.
    """
    world, nodes = world_size(trainer_cfg), int(trainer_cfg.get("num_nodes", 1))
    worker = [sys.executable, "-m", WORKER_MODULE, str(folder)]
    if nodes > 1:
        if "SLURM_JOB_ID" not in os.environ:
            raise ConfigError(f"trainer.num_nodes={nodes} needs a SLURM allocation (hydra/launcher=slurm)")
        if _slurm_nodes() < nodes:
            raise ConfigError(f"trainer.num_nodes={nodes} but the SLURM job has {_slurm_nodes()} node(s)")
        srun = [
            "srun",
            "--overlap",
            f"--nodes={nodes}",
            f"--ntasks-per-node={world // nodes}",
            "--kill-on-bad-exit=1",
            "--export=ALL",
        ]
        return [srun + worker], [{WORKER_ENV: "srun"}]
    port = str(_free_port())
    threads = os.environ.get("OMP_NUM_THREADS") or str(max(1, usable_cpus() // world))
    envs = [
        {
            WORKER_ENV: "local",
            "LOCAL_RANK": str(r),
            "NODE_RANK": "0",
            "WORLD_SIZE": str(world),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": port,
            "OMP_NUM_THREADS": threads,
        }
        for r in range(world)
    ]
    return [worker] * world, envs


def fit_in_workers(
    model: torch.nn.Module,
    optim,
    cfg: DictConfig,
    out_dir: Path,
    steps: int,
    csv_only: bool,
    pruner: dict | None,
    hand_back: bool = True,
    scored: bool = False,
) -> dict:
    """Train ``model`` in place on ``world_size(cfg.trainer)`` processes; returns the fit summary.

    ``hand_back=False`` leaves ``model`` untrained here (the checkpoints hold the result): for
    throughput benchmarks of models whose full-state gather to rank 0 would take minutes. ``scored``: the
    workers report to the job's Optuna trial (``fit.fit_and_evaluate``)."""
    folder = out_dir / "launch"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in list(folder.glob("error_rank*.txt")) + [folder / "result.json", folder / "final.pt"]:
        stale.unlink(missing_ok=True)
    torch.save({"model": model, "optim": optim}, folder / "job.pt")
    OmegaConf.save(cfg, folder / "config.yaml", resolve=True)
    (folder / "args.json").write_text(
        json.dumps(
            {
                "out_dir": str(out_dir),
                "steps": steps,
                "csv_only": csv_only,
                "pruner": pruner,
                "hand_back": hand_back,
                "scored": scored,
            }
        )
    )
    commands, envs = worker_command(folder, cfg.trainer)
    procs = []
    try:
        for rank, (cmd, extra) in enumerate(zip(commands, envs)):
            # rank 0 keeps the console (progress bar); the others write to launch/rank<r>.log
            out = None if rank == 0 else open(folder / f"rank{rank}.log", "w")
            procs.append(
                subprocess.Popen(cmd, env={**os.environ, **extra}, stdout=out, stderr=out, preexec_fn=_die_with_parent)
            )
        codes = _wait_all(procs)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        _raise_worker_error(folder, codes, commands)
    if hand_back:
        model.load_state_dict(torch.load(folder / "final.pt", map_location="cpu", weights_only=True))
    for bulky in ("job.pt", "final.pt"):  # full model copies: the checkpoints are what resume uses
        (folder / bulky).unlink(missing_ok=True)
    return json.loads((folder / "result.json").read_text())


def _die_with_parent() -> None:
    """Linux: a worker gets SIGKILL when the job process dies, however it dies (no orphans on the GPUs)."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _wait_all(procs: list[subprocess.Popen]) -> list[int]:
    """Wait for every worker; if one fails, kill the rest (they would hang in a collective)."""
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return codes
        if any(c not in (None, 0) for c in codes):
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGKILL)
            return [p.wait() for p in procs]
        time.sleep(0.2)


def _raise_worker_error(folder: Path, codes: list[int], commands) -> None:
    errors = sorted(folder.glob("error_rank*.txt"))
    if errors:
        kind, message = json.loads(errors[0].read_text())["error"]
        if kind == "TrialPruned":
            import optuna

            raise optuna.TrialPruned(message)
        if kind == "FloatingPointError":
            raise FloatingPointError(message)
        raise RuntimeError(f"training worker failed ({kind}: {message}); see {errors[0]}")
    raise RuntimeError(
        f"training workers exited with codes {codes} ({shlex.join(commands[0])}); logs: {folder}/rank*.log"
    )
