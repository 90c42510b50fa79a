"""The experiment, top-down: ``main`` (one run in its own folder) -> ``run_experiment`` -> the stages.

Stages, each in its module: the dense base (``harness/pretrain.py``), the upcycled MoE or the dense continuation
trained here (``harness/fit.py``), the dense baselines (``harness/continuation.py``); the run's record is
``harness/results.py``. ``main(cfg)`` is what ``run.py`` calls; it returns the objective (final val loss) for
sweepers. Every object comes from the config (``harness/experiment.py``), validated before any compute.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from harness import cpus, flops, identity, launch, results, tracking
from harness.continuation import dense_continuation, dense_scratch, trunk_dir
from harness.data import RandomWindows
from harness.errors import RunFolderError, StageStopped
from harness.eval import score_run as score_downstream
from harness.experiment import Experiment, build_experiment
from harness.fit import eval_device, fit_and_evaluate, heal_checkpoint, resume_hint
from harness.io import ReadOnlyCache, disk_full, disk_full_line
from harness.lit import evaluate
from harness.pretrain import dense_base, full_pretrain_flops, parent_loss
from harness.timing import Timings
from harness.upcycle import top_mass, upcycle
from harness.weights import wants_weights

log = logging.getLogger("upcycle")
JOB_TYPES = {"upcycle": "upcycle", "dense": "dense_iso", "pretrain": "pretrain"}


def main(cfg: DictConfig) -> float:
    """Run one experiment in its own folder; write ``results.json`` atomically; return the final val loss."""
    if launch.idle_task():
        log.info(
            "SLURM task %s: the job's first task drives it (and starts this node's workers)", os.environ["SLURM_PROCID"]
        )
        return float("nan")
    from harness.console import quiet_libraries

    quiet_libraries()
    host = cpus.hold_threads()  # before any CPU work: torch's pool held to the CPUs this job may use
    out_dir = Path(cfg.paths.output_dir)
    clock = Timings()  # its "startup": the interpreter, the imports and the config, before this job began
    try:
        exp = build_experiment(cfg)  # raises ConfigError before any compute
        launch.check_devices(cfg.trainer)
        with clock.phase("data"):  # the corpus (a shared cache, built once) must hold this config's windows
            exp.data.prepare()
    except Exception as e:
        if _multirun():  # recorded in the job's own folder, so the sweep's report counts it
            results.record_unstarted(cfg, out_dir, e)
        else:  # a single run that never started leaves no folder behind
            identity.discard_unclaimed(out_dir)
        if isinstance(e, ReadOnlyCache):  # one line naming UPCYCLE_CACHE
            raise RunFolderError(str(e)) from None
        raise
    config_hash = identity.config_hash(cfg)
    out_dir.mkdir(parents=True, exist_ok=True)
    with identity.hold(out_dir):  # one writer per run folder: RunFolderError if another process trains it
        return _run(cfg, exp, out_dir, config_hash, clock, host)


def _unscored(cfg: DictConfig, res: dict) -> bool:
    """Whether some eval.tasks task has no score yet for some model of the finished run ``res``."""
    tasks = set((cfg.get("eval") or {}).get("tasks") or [])
    scored = (res.get("downstream") or {}).values()
    return bool(tasks) and (not scored or any(tasks - set(s) for s in scored))


def _run(cfg: DictConfig, exp: Experiment, out_dir: Path, config_hash: str, clock: Timings, host: dict) -> float:
    """``main`` once this process holds the run folder: claim it, skip a finished run, else train and record it."""
    results_path = out_dir / "results.json"
    if cfg.force:
        moved = identity.move_aside(out_dir)
        if moved:
            log.info("force=true: moved the previous run to %s; training from scratch", moved)
    identity.claim(out_dir, config_hash)  # RunFolderError if the folder holds another config's run
    if not _multirun():
        identity.point_latest(out_dir)
    if cfg.print_config:
        from harness.config_tree import print_config_tree

        print_config_tree(cfg)
    old = results.finished(out_dir, config_hash)
    if old is not None:
        log.info("%s is complete for this config: skipping (force=true re-runs)", results_path)
        if cfg.train.get("profile_steps"):  # the profiler watches training: a finished run trains nothing
            log.warning(
                "train.profile_steps=%s profiled nothing: the run is complete; add force=true", cfg.train.profile_steps
            )
        if _unscored(cfg, old):  # eval.tasks do not change the run: score the finished one now
            score_downstream(cfg, out_dir, old)
        return float(old["val_loss"])
    roots = [Path(cfg.paths.log_dir) / kind / str(cfg.name) for kind in ("runs", "multirun")]  # name=1: an int
    twin = None if cfg.force else results.finished_elsewhere(out_dir, config_hash, roots)
    if twin is not None:
        log.info(
            "%s holds this config's complete run (cfg=%s: its overrides differ only in spelling or in keys that change "
            "nothing computed, e.g. eval or logger): skipping (force=true trains it again here)",
            twin / "results.json",
            config_hash,
        )
        if _multirun():
            results.link(out_dir, twin)  # the sweep's report reads every job from its own folder
        else:
            identity.point_latest(twin)
        done = results.finished(twin, config_hash)
        if _unscored(cfg, done):  # scored into the record where the run lives
            score_downstream(cfg, twin, done)
        return float(done["val_loss"])
    OmegaConf.save(cfg, out_dir / "config_resolved.yaml", resolve=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    base = {"config": resolved, "config_hash": config_hash, "run_dir": str(out_dir), "host": host}
    cfg = tracking.stage(cfg, JOB_TYPES[exp.method], out_dir, f"{cfg.name}/{out_dir.name}")
    try:
        res = {**base, **run_experiment(cfg, exp, out_dir, clock)}
    except StageStopped as e:  # the dense base stopped on purpose: its checkpoint resumes it, no record yet
        log.info("%s", e)
        return float("nan")
    except Exception as e:
        full = disk_full(e)
        try:
            results.record_failure(out_dir, base, e)
        except OSError:
            if not full:
                raise
        if full:  # one line naming the path; the checkpoints kept resume the run once there is space
            raise RunFolderError(disk_full_line(e, out_dir)) from None
        if isinstance(e, ReadOnlyCache):
            raise RunFolderError(str(e)) from None
        raise
    except (KeyboardInterrupt, SystemExit):  # Ctrl-C: Lightning tears down and exits; say what is kept
        log.warning("interrupted: the same command resumes each stage from its last checkpoint (train.ckpt_every)")
        raise
    results.write(out_dir, res)
    res = score_downstream(cfg, out_dir, res)  # the eval stage: eval.tasks for the run, its parent and twin
    tracking.summary(cfg, res)
    if res["status"] == "complete":
        results.print_summary(res, out_dir)
    else:
        log.info(
            "%s: stopped at step %s (status %s); %s to resume",
            results_path,
            res.get("steps"),
            res["status"],
            resume_hint(exp.train.stop_after_steps),
        )
    return float(res["val_loss"])


def run_experiment(cfg: DictConfig, exp: Experiment, out_dir: Path, clock: Timings | None = None) -> dict:
    """The stages: dense base, then the upcycled MoE (or the dense continuation) trained, then its dense baselines.
    ``clock``: the job's, holding its startup and the corpus build that ``main`` timed before the run folder."""
    clock = Timings() if clock is None else clock
    t0 = clock.t0
    with clock.phase("data"):
        exp.data.prepare()
    with clock.phase("dense_base"):
        dense, base_meta = dense_base(exp, cfg)
    dense_flops = flops.count(exp.model, exp.data.seq_len)
    moe_flops = flops.count(exp.model, exp.data.seq_len, exp.moe, exp.moe_layers)
    moe_tokens = exp.steps(moe_budget(exp, moe_flops)) * exp.data.batch_size * exp.data.seq_len
    iso_tokens = flops.iso_flop_tokens(moe_tokens, moe_flops.train_per_token, dense_flops.train_per_token)
    val_loader = exp.data.val_dataloader()
    with clock.phase("parent_eval"):
        parent_val = parent_loss(dense, base_meta, exp, eval_device(cfg))
    res = {
        "method": exp.method,
        "moe": exp.moe.name,
        "routing": exp.moe.routing,
        "dense_parent_val_loss": parent_val,
        "data": exp.data.meta,
        "validation": {"windows": exp.data.val_windows, "tokens": exp.data.val_windows * exp.data.seq_len},
        "dense_base": base_meta["key"],
        **results.base_fields(base_meta, exp.pretrain.fraction),
    }
    if exp.method == "pretrain":  # the base's own record: its learning curve shows whether it plateaued
        counts = dense_flops
        res.update(status="complete", tokens=0, train_flops=0)  # an HF base: trained elsewhere
        res.update(
            {
                k: base_meta[k]
                for k in ("status", "steps", "tokens", "train_flops", "flops_per_token", "fit_wall_s", "val_curve")
                if k in base_meta
            },
            # trained here: its random init's loss (nan in a record from before it was kept); an HF base: itself
            init_val_loss=base_meta.get("init_val_loss", float("nan") if "steps" in base_meta else parent_val),
            val_loss=parent_val,
            params_total=counts.params_total,
            params_active=counts.params_active,
            wall_time_s=time.time() - t0,
        )
        res["best_val_loss"] = min([p["val_loss"] for p in res.get("val_curve", [])] + [parent_val])
        res["timings_s"] = {k: round(v, 3) for k, v in clock.items()}
        return res
    torch.manual_seed(int(cfg.seed))
    if exp.method == "upcycle":
        r = exp.recipe
        log.info(
            "upcycling to %s: routing %s, router init %s, drop ratio %s, weight scaling %s, router start %s, "
            "MoE layers %s",
            exp.moe.name,
            exp.moe.routing,
            r.router_init,
            r.drop_ratio,
            r.weight_scaling,
            r.router_start,
            exp.moe_layers,
        )
        with clock.phase("upcycle"):
            windows = RandomWindows(exp.data.shard("train"), exp.data.seq_len, 0, 4, exp.data.seed)
            calib = torch.stack([windows[i][0] for i in range(len(windows))])  # the first 4 sequences: router start
            model = upcycle(dense, exp.moe, exp.recipe, calib=calib)
            res["init_top_mass"], res["init_top_mass_uniform"] = top_mass(model, calib)
        with clock.phase("init_eval"):
            res["init_val_loss"] = evaluate(model, val_loader, eval_device(cfg))
        counts = moe_flops
        steps = exp.steps(moe_tokens)
        stage = "upcycle"
    else:  # dense continuation at the iso-FLOP budget of cfg.moe
        model = dense
        res["init_val_loss"] = parent_val
        counts = dense_flops
        steps = exp.steps(iso_tokens)
        res["iso_flop_of"] = exp.moe.name
        stage = "dense_iso"
    res.update(params_total=counts.params_total, params_active=counts.params_active)
    per_step = exp.data.batch_size * exp.data.seq_len
    fraction = exp.train.pretrain_fraction
    asked = exp.train.tokens if stage == "upcycle" and fraction is None else None
    if asked and steps * per_step != asked:
        why = f": train.tokens={asked:g} in whole steps of {per_step:,}"
    elif fraction is not None:  # a share of the base's pretraining compute: say it (2 is 200%, not 2%)
        why = f": train.pretrain_fraction={fraction:g}, {fraction:.0%} of the base's pretraining FLOPs"
    else:
        why = ""
    log.info(
        "training %s for %d steps (%s tokens%s) -> %s",
        "the MoE" if stage == "upcycle" else f"the iso-FLOP dense continuation of {exp.moe.name}",
        steps,
        f"{steps * per_step:,}",
        why,
        out_dir,
    )
    heal_checkpoint(out_dir)
    trunk = trunk_dir(cfg, corpus=exp.data.shard_dir.name, dense_base=base_meta["key"])
    with clock.phase("fit"):
        res.update(
            fit_and_evaluate(
                model,
                exp,
                cfg,
                out_dir,
                steps,
                trunk_dir=trunk,
                scored=True,
                own_stage=True,
                keep_weights=wants_weights(cfg),
            )
        )
    start = {"step": 0, "tokens": 0, "flops": 0, "val_loss": res["init_val_loss"]}
    res["val_curve"] = [start] + res["val_curve"]  # the step-0 gap is part of the curve
    if exp.method == "upcycle" and res["status"] == "complete":
        # iso-FLOP: the dense model gets the MoE's training FLOPs; token-matched: the MoE's tokens
        baselines = [
            ("dense_iso", iso_tokens, cfg.iso_flop_baseline),
            ("dense_tokens", moe_tokens, cfg.token_matched_baseline),
        ]
        for field, tokens, wanted in sorted(baselines, key=lambda b: b[1]):  # shorter first: a WSD trunk grows
            if wanted:
                with clock.phase(field):
                    cont = dense_continuation(dense, base_meta["key"], tokens, exp, cfg, job_type=field)
                res[field] = {k: cont[k] for k in ("val_loss", "best_val_loss", "tokens", "train_flops", "cache_dir")}
                res[field]["val_curve"] = [{**start, "val_loss": parent_val}] + cont["val_curve"]
        if "dense_iso" in res:
            res["dense_iso"]["flop_excess"] = _flop_excess(res["dense_iso"]["train_flops"], res["train_flops"])
        if cfg.get("scratch_baseline"):  # the dense model of the same total FLOPs, the pretraining's own trunk
            with clock.phase("dense_scratch"):
                scratch = dense_scratch(exp, cfg, base_meta, res["train_flops"])
            if scratch is not None:
                res["dense_scratch"] = scratch
    if exp.method == "dense":
        res["iso_flop_excess"] = _flop_excess(res["train_flops"], moe_tokens * moe_flops.train_per_token)
    if base_meta.get("train_flops"):  # the run's budget as a share of the full pretraining's compute
        res["pretrain_compute_share"] = res["train_flops"] / full_pretrain_flops(exp)
    res["wall_time_s"] = time.time() - t0
    res["timings_s"] = {k: round(v, 3) for k, v in clock.items()}
    fit = res.get("fit_timings_s", {})
    log.info(
        "time: %s (in the fit: %s)", clock.line(), ", ".join(f"{k.replace('_', ' ')} {v:.1f} s" for k, v in fit.items())
    )
    return res


def _flop_excess(dense_flops: float, moe_flops: float) -> float:
    """The iso-FLOP twin's training FLOPs over the MoE's, less 1: whole steps round the twin up, by up to one
    dense step (a budget of a few steps is far from iso-FLOP); warned about above 1%."""
    excess = dense_flops / moe_flops - 1 if moe_flops else float("inf")
    if excess > 0.01:
        log.warning(
            "the iso-FLOP dense twin trains %.1f%% more FLOPs than the MoE (whole steps round its budget up): "
            "raise train.tokens for a closer match",
            100 * excess,
        )
    return excess


def moe_budget(exp: Experiment, moe_flops) -> float:
    """The MoE's training tokens: ``train.tokens``, or ``train.pretrain_fraction`` of the FULL pretraining's FLOPs
    (``pretrain.tokens`` at the dense model's FLOPs per token) spent at the MoE's FLOPs per token: a budget ladder in
    the units users plan in, the same budget whatever share of that pretraining the base had (pretrain.fraction)."""
    share = exp.train.pretrain_fraction
    if share is None:
        return exp.train.tokens
    return float(share) * full_pretrain_flops(exp) / moe_flops.train_per_token


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
