"""One model's training: the Lightning fit in this process (``fit_in_process``) or in one worker per device
(``harness.launch.fit_in_workers``), then its evaluation on the full validation set (``fit_and_evaluate``)."""

from __future__ import annotations

import copy
import csv
import dataclasses
import errno
import io
import logging
import os
import shutil
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.environments import LightningEnvironment
from omegaconf import DictConfig, OmegaConf, open_dict

from harness import flops, launch, profiling, timing, tracking, trunk
from harness.errors import ConfigError
from harness.experiment import CUDA_GRAPH_MODES, Experiment, compile_enabled
from harness.io import DiskFull, atomic_write_text, intact_zip, move_aside
from harness.lit import LitLM, evaluate
from harness.model import Decoder
from harness.pruning import pruning_callbacks
from harness.weights import save_weights

log = logging.getLogger("upcycle")


class ValCurve(Callback):
    """Keeps (step, tokens, flops, val/loss) across resumes (saved in the checkpoint)."""

    def __init__(self, tokens_per_step: int, flops_per_token: int):
        self.tokens_per_step, self.flops_per_token, self.points = tokens_per_step, flops_per_token, []

    def on_validation_end(self, trainer, pl_module):
        if trainer.sanity_checking or "val/loss" not in trainer.callback_metrics:
            return
        step = trainer.global_step
        tokens = step * self.tokens_per_step
        self.points.append(
            {
                "step": step,
                "tokens": tokens,
                "flops": tokens * self.flops_per_token,
                "val_loss": float(trainer.callback_metrics["val/loss"]),
            }
        )

    def state_dict(self):
        return {"points": self.points}

    def load_state_dict(self, state):
        self.points = list(state["points"])


class CheckpointAfterValidation(ModelCheckpoint):
    """``last.ckpt`` every ``every`` steps, saved after that step's validation when it has one: Lightning saves at
    the end of the training batch, before validating, so a run resumed from that checkpoint never ran the
    validation of its resume step and its curve lost that point."""

    def __init__(self, dirpath: Path, every: int, val_every: int):
        super().__init__(dirpath=dirpath, save_last=True, save_top_k=0, every_n_train_steps=every)
        self.every, self.val_every = every, val_every

    def on_train_batch_end(self, trainer, pl_module, *args, **kwargs):
        step = trainer.global_step
        if step > 0 and step % self.every == 0 and step % self.val_every == 0 and step < trainer.max_steps:
            self._defer_save_until_validation = True  # on_validation_end saves it
            return
        super().on_train_batch_end(trainer, pl_module, *args, **kwargs)

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        """A full disk names the checkpoint (Lightning writes a temp file elsewhere, then moves it here)."""
        try:
            with timing.charge_checkpoint(trainer):
                super()._save_checkpoint(trainer, filepath)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise DiskFull(filepath) from e
            raise


class TrimResumedLogs(Callback):
    """A resumed fit logs again every step after its checkpoint: the CSV rows that earlier (interrupted) fits
    wrote from that step on are dropped, so each step's metrics, validation included, appear once across
    ``csv/version_*`` (a fresh start, step 0, drops them all)."""

    def on_train_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        for lg in trainer.loggers:
            if type(lg).__name__ == "CSVLogger":
                trim_csv_versions(Path(lg.log_dir), trainer.global_step)


def trim_csv_versions(current: Path, step: int) -> None:
    """Keep only rows logged before optimizer step ``step`` (the CSV logger's ``step`` column is the global step
    before its update) in the CSV versions beside ``current``; a version left empty is removed."""
    for other in sorted(current.parent.glob("version_*")):
        path = other / "metrics.csv"
        if other == current or not path.is_file():
            continue
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            fields, rows = reader.fieldnames or [], list(reader)
        kept = [r for r in rows if r.get("step") not in (None, "") and int(float(r["step"])) < step]
        if not kept:
            shutil.rmtree(other, ignore_errors=True)
        elif len(kept) < len(rows):
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
            writer.writeheader()
            writer.writerows(kept)
            atomic_write_text(path, buf.getvalue())


def resume_hint(stop_after_steps: int | None) -> str:
    """What a stopped run's line tells its user to do: the same command would stop at the same step again."""
    if stop_after_steps:
        return f"run it again without train.stop_after_steps={stop_after_steps}"
    return "run the same command again"


class StopAfter(Callback):
    """Stops training at a given step, as a crash would (used to test resume).

    It lowers the loop's step limit rather than setting ``trainer.should_stop``: Lightning validates on a requested
    stop, and that validation, off the ``val_every`` grid, went into the checkpoint saved at the end (when none was
    saved yet) and so into the resumed run's curve and CSV, which a run never stopped does not have."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.step:
            trainer.fit_loop.epoch_loop.max_steps = trainer.global_step


class CudaGraphSteps(Callback):
    """Tells CUDA graph trees (``train.compile_mode=reduce-overhead`` or ``max-autotune``) that a new step begins
    (one micro-batch a step: experiment.py refuses accumulation with CUDA graphs), so that its graphs may reuse the
    memory of the last step's outputs, which its backward and optimizer step have consumed."""

    def on_train_batch_start(self, *args):
        torch.compiler.cudagraph_mark_step_begin()


def _loggers(cfg: DictConfig, out_dir: Path, csv_only: bool):
    loggers = []
    for key, lcfg in (cfg.get("logger") or {}).items():
        if csv_only and key != "csv":
            continue
        try:
            is_wandb = key == "wandb"
            logger = instantiate(lcfg) if is_wandb else instantiate(lcfg, save_dir=str(out_dir))
            if is_wandb:  # start W&B now (Lightning starts it lazily, mid-training) so a failure is caught here
                logger._wandb_init.pop("anonymous", None)  # Lightning passes it; W&B warns that it is obsolete
                tracking.setup(logger.experiment, cfg)
            loggers.append(logger)
        except Exception as e:  # a logging service must never stop training
            warnings.warn(f"logger {key!r} could not start ({type(e).__name__}: {e}); continuing with the others")
    return loggers


def _close_loggers(trainer: L.Trainer) -> None:
    """Finish W&B runs so the next job of a multirun (same process) starts its own."""
    for lg in trainer.loggers:
        if type(lg).__name__ == "WandbLogger" and getattr(lg, "_experiment", None) is not None:
            try:
                lg.experiment.finish()
            except Exception as e:  # never let logging sink the run
                warnings.warn(f"wandb finish failed: {e}")


def fit_and_evaluate(
    model: Decoder,
    exp: Experiment,
    cfg: DictConfig,
    out_dir: Path,
    steps: int,
    csv_only=False,
    evaluate_after: bool = True,
    trunk_dir: Path | None = None,
    scored: bool = False,
    own_stage: bool = False,
    keep_weights: bool = False,
    keep_trunk: bool = False,
) -> dict:
    """Train ``model`` in place for ``steps`` steps (resuming from ``out_dir/checkpoints/last.ckpt``, else
    from the WSD trunk in ``trunk_dir``), in this process or, when the trainer asks for several devices, in
    one worker per device; then evaluate it here on the full validation set. ``evaluate_after=False``
    (throughput benchmarks): no final evaluation, and multi-device workers do not hand the weights back.
    ``scored``: this is the stage an Optuna trial is scored on, so its validation losses go to the trial, which
    may prune it; the dense base and the dense baselines are caches that other trials share, never pruned.
    ``own_stage``: this is the stage the run's ``method`` names (the MoE for upcycle, the dense run for dense, the
    base for pretrain), the only one ``train.stop_after_steps`` stops and ``train.profile_steps`` profiles; the
    caches it shares with other runs (the base, the dense baselines) always train to the end, so a simulated crash
    never half-trains them.
    ``keep_weights``: a finished model with no ``last.ckpt`` leaves its weights in ``out_dir/weights.pt`` (the
    eval stage scores them; a third of a checkpoint with Adam's moments). ``keep_trunk``: the WSD trunk keeps
    every checkpoint, not only its latest (the pretraining trunk: bases at several shares branch off it)."""
    if not own_stage and (exp.train.stop_after_steps is not None or exp.train.profile_steps):
        exp = dataclasses.replace(exp, train=dataclasses.replace(exp.train, stop_after_steps=None, profile_steps=0))
        cfg = copy.deepcopy(cfg)
        with open_dict(cfg):
            cfg.train.stop_after_steps = None
            cfg.train.profile_steps = 0
    if trunk_dir is not None and launch.needs_launch(cfg.trainer):
        raise ConfigError("train.share_trunk=true runs on one device for now (trainer.devices=1)")
    if launch.needs_launch(cfg.trainer):
        res = launch.fit_in_workers(
            model,
            exp.optim,
            cfg,
            out_dir,
            steps,
            csv_only,
            _sweeper_pruner_node() if scored else None,
            hand_back=evaluate_after,
            scored=scored,
        )
    else:
        pruning = pruning_callbacks(cfg) if scored else []
        res, _ = fit_in_process(
            model,
            exp,
            cfg,
            out_dir,
            steps,
            csv_only,
            extra_callbacks=pruning,
            trunk_dir=trunk_dir,
            keep_trunk=keep_trunk,
        )
    done = res["status"] == "complete" and evaluate_after
    t0 = time.perf_counter()
    val = evaluate(model, exp.data.val_dataloader(), eval_device(cfg)) if done else float("nan")
    model.to("cpu")
    if done and keep_weights and not (out_dir / "checkpoints" / "last.ckpt").exists():
        save_weights(model, out_dir)
    if "fit_timings_s" in res:  # the final validation on the full set, and the weights kept for the eval stage
        res["fit_timings_s"]["final_eval"] = round(time.perf_counter() - t0, 3)
    tokens = steps * exp.data.batch_size * exp.data.seq_len
    # the final evaluation is the curve's last point (a validation Lightning also ran at that step is dropped)
    points = [p for p in res.pop("val_points") if not (done and p["step"] >= steps)] + (
        [{"step": steps, "tokens": tokens, "flops": tokens * res["flops_per_token"], "val_loss": val}] if done else []
    )
    return {
        **res,
        "val_loss": val,
        "val_curve": points,
        "best_val_loss": min((p["val_loss"] for p in points), default=float("nan")),
    }


def fit_in_process(
    model: Decoder,
    exp: Experiment,
    cfg: DictConfig,
    out_dir: Path,
    steps: int,
    csv_only=False,
    extra_callbacks=(),
    trunk_dir: Path | None = None,
    keep_trunk: bool = False,
) -> tuple[dict, L.Trainer]:
    """The Lightning fit itself (one process, or one rank of a multi-process job)."""
    clock = timing.FitClock()
    seq = exp.data.seq_len
    fpt = flops.count_model(model, seq).train_per_token
    train = exp.train
    model.activation_checkpointing = train.activation_checkpointing
    compile_on = compile_enabled(train, cfg.trainer)
    if compile_on:
        model.compile_blocks(**({} if train.compile_mode == "default" else {"mode": train.compile_mode}))
    peak = float(train.peak_tflops) * 1e12 if train.peak_tflops else None
    tokens_per_step = exp.data.batch_size * seq
    lit = LitLM(
        model,
        exp.optim,
        steps,
        fpt,
        peak,
        tokens_per_step,
        max_grad_norm=train.max_grad_norm,
        collapse_share=float(train.collapse_share),
        collapse_steps=int(train.collapse_steps),
    )
    world = launch.world_size(cfg.trainer)
    exp.data.total_steps, exp.data.world_size = steps, world
    exp.data.pin_memory = eval_device(cfg).type == "cuda"
    if exp.optim.warmup_steps >= steps and not launch.in_worker():
        log.warning(
            "warmup of %d steps >= this stage's %d steps: its LR never reaches its peak %g (optim.warmup_steps, "
            "or pretrain.optim.warmup_steps for the dense base)",
            exp.optim.warmup_steps,
            steps,
            exp.optim.lr,
        )
    _, accumulate = exp.data.split_batch(world)
    ckpt_dir = out_dir / "checkpoints"
    curve = ValCurve(tokens_per_step, fpt)
    save = bool(train.save_checkpoints)
    every = int(train.ckpt_every)
    callbacks = [clock, curve, TrimResumedLogs()] + (
        [CheckpointAfterValidation(ckpt_dir, every, int(train.val_every))] if save else []
    )
    callbacks += [instantiate(c) for c in (cfg.get("callbacks") or {}).values()] + list(extra_callbacks)
    if compile_on and train.compile_mode in CUDA_GRAPH_MODES:
        callbacks.append(CudaGraphSteps())
    stop = train.stop_after_steps
    if stop:
        callbacks.append(StopAfter(int(stop)))
    profiler = None
    if train.profile_steps:  # rank 0 profiles a window of steady steps: profile/ beside the checkpoints
        first, end = profiling.window(steps, train.profile_steps, int(train.val_every))
        if end - first < train.profile_steps:
            log.warning(
                "train.profile_steps=%d: %d steps profiled, from step %d (a window holds no validation, every %d "
                "steps, and ends with the fit's %d steps)",
                train.profile_steps,
                end - first,
                first,
                int(train.val_every),
                steps,
            )
        profiler = profiling.StepProfiler(out_dir, first, end)
        callbacks.append(profiler)
    last = ckpt_dir / "last.ckpt"
    start = last if last.exists() else None
    if trunk_dir is not None:  # WSD ladder: branch off the shared stable phase, and extend it for the next budget
        decay_start = exp.optim.decay_start(steps)
        callbacks.append(trunk.SaveTrunk(trunk_dir, decay_start, int(train.val_every), keep_all=keep_trunk))
        link = ckpt_dir / "trunk.ckpt"
        branch = trunk.branch_point(trunk_dir, decay_start, link) if start is None else None
        if branch is not None:
            log.info(
                "branching off the WSD trunk %s at step %d of %d (decay starts at %d)",
                trunk_dir,
                branch,
                steps,
                decay_start,
            )
            start = link
    plugins = [LightningEnvironment()] if os.environ.get(launch.WORKER_ENV) == "local" else None
    trainer: L.Trainer = instantiate(
        cfg.trainer,
        max_steps=steps,
        logger=_loggers(cfg, out_dir, csv_only) or False,
        callbacks=callbacks,
        default_root_dir=str(out_dir),
        val_check_interval=int(train.val_every) * accumulate,
        check_val_every_n_epoch=None,
        num_sanity_val_steps=0,
        accumulate_grad_batches=accumulate,
        plugins=plugins,
        enable_checkpointing=save,
        use_distributed_sampler=False,  # the datamodule shards by rank itself, in order
    )
    t0 = time.perf_counter()
    compiled = timing.compile_counts()
    clock.start()
    try:
        trainer.fit(lit, datamodule=exp.data, ckpt_path=str(start) if start else None)
    finally:
        _close_loggers(trainer)
        if trunk_dir is not None:
            (ckpt_dir / "trunk.ckpt").unlink(missing_ok=True)
    wall = time.perf_counter() - t0
    tokens = steps * tokens_per_step
    report = profiler.report if profiler is not None else None
    if report is not None:
        log.info("profile (%s): %s", out_dir / "profile", profiling.render(report).splitlines()[0])
    return {
        "status": "complete" if trainer.global_step >= steps else "interrupted",
        "steps": trainer.global_step,
        "tokens": tokens,
        "flops_per_token": fpt,
        "train_flops": tokens * fpt,
        "fit_wall_s": wall,
        "fit_timings_s": clock.finish(),
        "fit_compile": timing.since(compiled),
        "val_points": curve.points,
        "world_size": trainer.world_size,
        "accumulate_grad_batches": accumulate,
        **({"profile": report} if report is not None else {}),
    }, trainer


def _sweeper_pruner_node() -> dict | None:
    """The Optuna sweeper's pruner config, handed to workers (they run outside Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return None
    node = HydraConfig.get().sweeper.get("pruner")
    return OmegaConf.to_container(node, resolve=True) if node else None


def eval_device(cfg: DictConfig) -> torch.device:
    """Where results.json's losses are computed: the trainer's GPU when it has one (Lightning hands the
    model back on the CPU after fit, where a 50M model's full validation took minutes)."""
    on_gpu = cfg.trainer.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available()
    return torch.device("cuda" if on_gpu else "cpu")


def heal_checkpoint(out: Path) -> None:
    """A truncated or damaged ``last.ckpt`` is moved aside (one warning) so the stage starts afresh
    instead of failing mid-restore on every rerun."""
    last = out / "checkpoints" / "last.ckpt"
    if last.exists() and not intact_zip(last):
        move_aside(last, "a damaged checkpoint (truncated or not a torch zip file)")
    elif last.exists():
        log.info("resuming from %s", last)
