"""The experiment: dense base (cached) -> upcycle -> train, beside its iso-FLOP dense continuation.

``main(cfg)`` is what ``run.py`` calls; it returns the objective (final val loss) for sweepers.
Every object comes from the config through ``hydra.utils.instantiate``; everything is validated
before the first tensor is touched.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
import traceback
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from filelock import FileLock
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from harness import flops, identity, launch, tracking
from harness.data import RandomWindows
from harness.errors import ConfigError
from harness.experiment import Spec, _hash, build_spec
from harness.fit import eval_device, fit
from harness.io import atomic_write_json, corrupt_files, file_digest, intact_zip, move_aside, read_json
from harness.lit import evaluate
from harness.model import Decoder
from harness.upcycle import top_mass, upcycle

log = logging.getLogger("upcycle")


def _steps(tokens: float, spec: Spec) -> int:
    return max(1, math.ceil(tokens / (spec.data.batch_size * spec.data.seq_len)))


def _heal_checkpoint(out: Path) -> None:
    """A truncated or damaged ``last.ckpt`` is moved aside (one warning) so the stage starts afresh
    instead of failing mid-restore on every rerun."""
    last = out / "checkpoints" / "last.ckpt"
    if last.exists() and not intact_zip(last):
        move_aside(last, "a damaged checkpoint (truncated or not a torch zip file)")
    elif last.exists():
        log.info("resuming from %s", last)


def dense_base(spec: Spec, cfg: DictConfig) -> tuple[Decoder, dict]:
    """The pretrained dense checkpoint: trained once per (model, data, pretrain) config, then reused."""
    if spec.model.hf_path:  # a real pretrained checkpoint: no stage-0 pretraining
        from harness.hf import load_hf, read_config

        log.info("dense base: the checkpoint %s (no pretraining)", spec.model.hf_path)
        model = load_hf(spec.model.hf_path, max_seq_len=spec.model.max_seq_len)
        tok_vocab = spec.data.meta["vocab_size"]
        if tok_vocab > model.cfg.vocab_size:
            raise ConfigError(f"model.hf_path: tokenizer vocab {tok_vocab} > model vocab_size {model.cfg.vocab_size}")
        key = "hf:" + _hash({"path": spec.model.hf_path, "config": read_config(spec.model.hf_path)})
        return model, {"key": key, "hf_path": spec.model.hf_path}
    # the base depends on the pretraining recipe only (its own batch size included), so every variant of a
    # sweep (batch size, LR, ...) upcycles the very same checkpoint
    key = _hash(
        {
            "model": asdict(spec.model),
            "data": spec.data.shard_dir.name,
            "seq": spec.data.seq_len,
            "pretrain": OmegaConf.to_container(cfg.pretrain, resolve=True),
        }
    )
    out = Path(cfg.paths.cache_dir) / "dense" / key
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".lock")):
        meta_path = out / "meta.json"
        meta = read_json(meta_path, required=("checksum", "key"))
        if meta is not None and corrupt_files(out, {"model.pt": meta["checksum"]}):
            if (out / "model.pt").exists():
                move_aside(out / "model.pt", "a damaged cached dense base (checksum differs from meta.json)")
            else:
                warnings.warn(f"cached dense base {out / 'model.pt'} is missing: pretraining it again")
            meta_path.unlink()
            meta = None
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        if meta is None:
            torch.manual_seed(int(cfg.pretrain.seed))
            model = Decoder(spec.model)
            pre_data = copy.copy(spec.data)
            pre_data.batch_size = int(cfg.pretrain.batch_size)
            pre_spec = Spec(
                spec.method,
                spec.model,
                spec.moe,
                spec.recipe,
                instantiate(cfg.pretrain.optim),
                pre_data,
                spec.moe_layers,
            )
            steps = _steps(cfg.pretrain.tokens, pre_spec)
            log.info(
                "dense base: pretraining %s for %d steps (%s tokens) -> %s",
                spec.model.name,
                steps,
                f"{steps * pre_data.batch_size * pre_data.seq_len:,}",
                out,
            )
            _heal_checkpoint(out)
            res = fit(model, pre_spec, tracking.stage(cfg, "pretrain", out, f"pretrain/{key}"), out, steps)
            if res["status"] != "complete":
                raise RuntimeError(
                    f"dense pretraining stopped at step {res['steps']} of {steps}; run the same "
                    "command again to resume it"
                )
            torch.save(model.state_dict(), out / "model.pt.tmp")
            (out / "model.pt.tmp").replace(out / "model.pt")
            checksum = file_digest(out / "model.pt")
            atomic_write_json(meta_path, {"key": key, "model": asdict(spec.model), "checksum": checksum, **res})
            meta = json.loads(meta_path.read_text())
        else:
            log.info("dense base: cached %s", out)
    model = Decoder(spec.model)
    model.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    return model, meta


CONTINUATION_KEYS = ("val_loss", "best_val_loss", "tokens", "train_flops", "val_curve")


def _trunk_dir(cfg: DictConfig, recipe: dict) -> Path | None:
    """Where runs of this recipe at every token budget keep their shared WSD stable phase (harness/trunk.py)."""
    if not cfg.train.get("share_trunk", False):
        return None
    return Path(cfg.paths.cache_dir) / "trunks" / _hash(recipe)


def experiment_recipe(cfg: DictConfig) -> dict:
    """The run's experiment config (``identity.experiment_config``) without its length and what only shows
    progress: runs that agree on it differ only in budget, so under WSD they share one stable trunk."""
    recipe = identity.experiment_config(cfg)
    for key in ("iso_flop_baseline", "token_matched_baseline"):
        recipe.pop(key, None)
    for key in ("tokens", "pretrain_fraction", "val_every", "ckpt_every", "save_checkpoints", "peak_tflops"):
        recipe["train"].pop(key, None)
    return recipe


def dense_continuation(
    dense: Decoder, base_key: str, tokens: int, spec: Spec, cfg: DictConfig, job_type: str = "dense_iso"
) -> dict:
    """Continue the dense model for ``tokens`` tokens (cached: MoE variants of equal FLOPs share it).
    ``job_type``: ``dense_iso`` (the MoE's training FLOPs) or ``dense_tokens`` (the MoE's tokens)."""
    recipe = {"base": base_key, "optim": asdict(spec.optim), "seed": cfg.seed, "batch": spec.data.batch_size}
    key = _hash({**recipe, "tokens": tokens})
    out = Path(cfg.paths.cache_dir) / "dense_continuation" / key
    out.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out / ".lock")):
        res_path = out / "results.json"
        cached = read_json(res_path, required=CONTINUATION_KEYS)
        what = {
            "dense_iso": "iso-FLOP dense continuation (the MoE's training FLOPs)",
            "dense_tokens": "token-matched dense continuation (the MoE's tokens)",
        }[job_type]
        if cached is not None:
            log.info("%s: cached %s", what, out)
            return {**cached, "cache_dir": str(out)}
        steps = _steps(tokens, spec)
        log.info(
            "%s: training %d steps (%s tokens) -> %s",
            what,
            steps,
            f"{steps * spec.data.batch_size * spec.data.seq_len:,}",
            out,
        )
        torch.manual_seed(int(cfg.seed))
        model = Decoder(spec.model)
        model.load_state_dict(dense.state_dict())
        _heal_checkpoint(out)
        res = fit(
            model,
            spec,
            tracking.stage(cfg, job_type, out, f"{job_type}/{key}"),
            out,
            steps,
            trunk_dir=_trunk_dir(cfg, {"dense_continuation": recipe}),
        )
        if res["status"] == "complete":
            atomic_write_json(res_path, res)
        return {**res, "cache_dir": str(out)}


def run(cfg: DictConfig, spec: Spec, out_dir: Path) -> dict:
    t0 = time.time()
    spec.data.prepare()
    dense, base_meta = dense_base(spec, cfg)
    dense_flops = flops.count(spec.model, spec.data.seq_len)
    moe_flops = flops.count(spec.model, spec.data.seq_len, spec.moe, spec.moe_layers)
    moe_tokens = (
        _steps(_moe_tokens(cfg, base_meta, dense_flops, moe_flops), spec) * spec.data.batch_size * spec.data.seq_len
    )
    iso_tokens = flops.iso_flop_tokens(moe_tokens, moe_flops.train_per_token, dense_flops.train_per_token)
    val_loader = spec.data.val_dataloader()
    parent_val = evaluate(dense, val_loader, eval_device(cfg))
    res = {
        "method": spec.method,
        "moe": spec.moe.name,
        "routing": spec.moe.routing,
        "dense_parent_val_loss": parent_val,
        "data": spec.data.meta,
        "dense_base": base_meta["key"],
    }
    if spec.method == "pretrain":  # the base's own record: its learning curve shows whether it plateaued
        counts = dense_flops
        res.update(status="complete", tokens=0, train_flops=0)  # an HF base: trained elsewhere
        res.update(
            {
                k: base_meta[k]
                for k in ("status", "steps", "tokens", "train_flops", "flops_per_token", "fit_wall_s", "val_curve")
                if k in base_meta
            },
            init_val_loss=parent_val,
            val_loss=parent_val,
            params_total=counts.params_total,
            params_active=counts.params_active,
            wall_time_s=time.time() - t0,
        )
        res["best_val_loss"] = min([p["val_loss"] for p in res.get("val_curve", [])] + [parent_val])
        return res
    torch.manual_seed(int(cfg.seed))
    if spec.method == "upcycle":
        r = spec.recipe
        log.info(
            "upcycling to %s: routing %s, router init %s, drop ratio %s, weight scaling %s, router start %s, "
            "MoE layers %s",
            spec.moe.name,
            spec.moe.routing,
            r.router_init,
            r.drop_ratio,
            r.weight_scaling,
            r.router_start,
            spec.moe_layers,
        )
        windows = RandomWindows(spec.data.shard("train"), spec.data.seq_len, 0, 4, spec.data.seed)
        calib = torch.stack(
            [windows[i][0] for i in range(len(windows))]
        )  # the first 4 training sequences: router start
        model = upcycle(dense, spec.moe, spec.recipe, calib=calib)
        res["init_top_mass"], res["init_top_mass_uniform"] = top_mass(model, calib)
        res["init_val_loss"] = evaluate(model, val_loader, eval_device(cfg))
        counts = moe_flops
        steps = _steps(moe_tokens, spec)
        stage = "upcycle"
    else:  # dense continuation at the iso-FLOP budget of cfg.moe
        model = dense
        res["init_val_loss"] = parent_val
        counts = dense_flops
        steps = _steps(iso_tokens, spec)
        res["iso_flop_of"] = spec.moe.name
        stage = "dense_iso"
    res.update(params_total=counts.params_total, params_active=counts.params_active)
    log.info(
        "training %s for %d steps (%s tokens) -> %s",
        "the MoE" if stage == "upcycle" else f"the iso-FLOP dense continuation of {spec.moe.name}",
        steps,
        f"{steps * spec.data.batch_size * spec.data.seq_len:,}",
        out_dir,
    )
    _heal_checkpoint(out_dir)
    res.update(fit(model, spec, cfg, out_dir, steps, trunk_dir=_trunk_dir(cfg, experiment_recipe(cfg))))
    start = {"step": 0, "tokens": 0, "flops": 0, "val_loss": res["init_val_loss"]}
    res["val_curve"] = [start] + res["val_curve"]  # the step-0 gap is part of the curve
    if spec.method == "upcycle" and res["status"] == "complete":
        # iso-FLOP: the dense model gets the MoE's training FLOPs; token-matched: the MoE's tokens
        baselines = [
            ("dense_iso", iso_tokens, cfg.iso_flop_baseline),
            ("dense_tokens", moe_tokens, cfg.get("token_matched_baseline", False)),
        ]
        for field, tokens, wanted in sorted(baselines, key=lambda b: b[1]):  # shorter first: a WSD trunk grows
            if wanted:
                cont = dense_continuation(dense, base_meta["key"], tokens, spec, cfg, job_type=field)
                res[field] = {k: cont[k] for k in ("val_loss", "best_val_loss", "tokens", "train_flops", "cache_dir")}
                res[field]["val_curve"] = [{**start, "val_loss": parent_val}] + cont["val_curve"]
    if base_meta.get("train_flops"):  # the run's budget as a share of its base's pretraining compute
        res["pretrain_compute_share"] = res["train_flops"] / base_meta["train_flops"]
    res["wall_time_s"] = time.time() - t0
    return res


def _moe_tokens(cfg: DictConfig, base_meta: dict, dense_flops, moe_flops) -> float:
    """The MoE's training tokens: ``train.tokens``, or ``train.pretrain_fraction`` of the dense base's
    pretraining FLOPs spent at the MoE's FLOPs per token (a budget ladder in the units users plan in)."""
    share = cfg.train.get("pretrain_fraction")
    if share is None:
        return cfg.train.tokens
    return float(share) * base_meta["train_flops"] / moe_flops.train_per_token


def _print_summary(res: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{res['method']} {res.get('moe', '')} {res.get('routing', '')} [{res['status']}]")
    for c in ("model", "tokens", "train FLOPs", "val loss"):
        t.add_column(c)
    t.add_row("dense parent", "-", "-", f"{res['dense_parent_val_loss']:.4f}")
    t.add_row(f"{res['method']} (step 0)", "0", "0", f"{res['init_val_loss']:.4f}")
    t.add_row(res["method"], f"{res['tokens']:,}", f"{res['train_flops']:.3e}", f"{res['val_loss']:.4f}")
    if "dense_iso" in res:
        d = res["dense_iso"]
        t.add_row("dense iso-FLOP", f"{d['tokens']:,}", f"{d['train_flops']:.3e}", f"{d['val_loss']:.4f}")
    if "dense_tokens" in res:
        d = res["dense_tokens"]
        t.add_row("dense, same tokens", f"{d['tokens']:,}", f"{d['train_flops']:.3e}", f"{d['val_loss']:.4f}")
    console = Console()
    console.print(t)
    console.print(f"results: {out_dir / 'results.json'}", soft_wrap=True)
    runs = sorted(out_dir.glob("wandb/offline-run-*"))
    if runs:
        console.print(f"W&B (offline): wandb sync {out_dir / 'wandb'}/offline-run-*", soft_wrap=True)


def _multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


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
    out_dir = Path(cfg.paths.output_dir)
    try:
        spec = build_spec(cfg)  # raises ConfigError before any compute
    except Exception as e:
        if _multirun():  # recorded in the job's own folder, so the sweep's report counts it
            out_dir.mkdir(parents=True, exist_ok=True)
            if identity.stored_hash(out_dir) is None:
                atomic_write_json(
                    out_dir / "results.json",
                    {
                        "config": identity.resolved(cfg),
                        "run_dir": str(out_dir),
                        "status": "failed",
                        "error": f"{type(e).__name__}: {e}",
                    },
                )
        else:  # a single run that never started leaves no folder behind
            identity.discard_unclaimed(out_dir)
        raise
    config_hash = identity.config_hash(cfg)
    results_path = out_dir / "results.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.get("force"):
        moved = identity.move_aside(out_dir)
        if moved:
            log.info("force=true: moved the previous run to %s; training from scratch", moved)
    identity.claim(out_dir, config_hash)  # RunFolderError if the folder holds another config's run
    if not _multirun():
        identity.point_latest(out_dir)
    old = read_json(results_path)
    if old is not None and old.get("status") == "complete" and old.get("config_hash") == config_hash:
        log.info("%s is complete for this config: skipping (force=true re-runs)", results_path)
        return float(old["val_loss"])
    if cfg.get("print_config", False):
        from harness.config_tree import print_config_tree

        print_config_tree(cfg)
    OmegaConf.save(cfg, out_dir / "config_resolved.yaml", resolve=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    base = {"config": resolved, "config_hash": config_hash, "run_dir": str(out_dir)}
    cfg = tracking.stage(cfg, JOB_TYPES[spec.method], out_dir, f"{cfg.name}/{out_dir.name}")
    try:
        res = {**base, **run(cfg, spec, out_dir)}
    except Exception as e:
        status = "pruned" if type(e).__name__ == "TrialPruned" else "failed"
        atomic_write_json(
            results_path,
            {**base, "status": status, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()},
        )
        raise
    atomic_write_json(results_path, res)
    tracking.summary(cfg, res)
    if res["status"] == "complete":
        _print_summary(res, out_dir)
    else:
        log.info(
            "%s: stopped at step %s (status %s); run the same command again to resume",
            results_path,
            res.get("steps"),
            res["status"],
        )
    return float(res["val_loss"])
