"""Stage 0, the dense base: pretrained once per its stage key (``identity.STAGE_INPUTS``) and cached, or read
from an HF checkpoint folder. Under a WSD pretraining the bases at several shares of it (``pretrain.fraction``:
the sunk cost D1 of an upcycling law) are one stable trunk, each branched off at its length with its own decay,
as the budgets of a ladder are (harness/trunk.py)."""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from harness import flops, identity, launch, tracking
from harness.errors import ConfigError, StageStopped
from harness.experiment import Experiment
from harness.fit import eval_device, fit_and_evaluate, heal_checkpoint, resume_hint
from harness.io import atomic_write_json, corrupt_files, entry_lock, file_digest, move_aside, read_json, read_only_miss
from harness.lit import evaluate
from harness.model import Decoder

log = logging.getLogger("upcycle")


def full_steps(exp: Experiment) -> int:
    """Optimizer steps of the full pretraining: ``pretrain.tokens`` at ``pretrain.batch_size`` (at least one)."""
    return max(1, math.ceil(exp.pretrain.tokens / (exp.pretrain.batch_size * exp.data.seq_len)))


def full_pretrain_flops(exp: Experiment) -> int:
    """The training FLOPs of the full pretraining (``pretrain.fraction`` = 1), whatever share the base has: the
    unit of ``train.pretrain_fraction`` and of the from-scratch baseline's share."""
    tokens = full_steps(exp) * exp.pretrain.batch_size * exp.data.seq_len
    return tokens * flops.count(exp.model, exp.data.seq_len).train_per_token


def fraction_steps(exp: Experiment, fraction: float) -> int:
    """The steps of the base at ``fraction`` of the full pretraining: max(1, round(fraction x full steps))."""
    return max(1, round(float(fraction) * full_steps(exp)))


def at_fraction(cfg: DictConfig, fraction: float) -> DictConfig:
    """``cfg`` with ``pretrain.fraction`` set: the config that keys the base at that share."""
    out = copy.deepcopy(cfg)
    with open_dict(out):
        out.pretrain.fraction = float(fraction)
    return out


def pretrain_trunk_dir(exp: Experiment, cfg: DictConfig, corpus: str | None) -> Path | None:
    """Where the bases at every ``pretrain.fraction`` keep their shared WSD stable phase: keyed by the base's
    inputs less the fraction (``identity.STAGE_DROPS["pretrain_trunk"]``). None unless the pretraining is WSD on
    one device (a full-length base on several devices trains on its own, as before)."""
    if exp.pretrain.optim.schedule != "wsd" or launch.needs_launch(cfg.trainer):
        return None
    return Path(cfg.paths.cache_dir) / "trunks" / identity.stage_key(cfg, "pretrain_trunk", corpus=corpus)


def dense_base(exp: Experiment, cfg: DictConfig, fraction: float | None = None) -> tuple[Decoder, dict]:
    """The pretrained dense checkpoint: trained once per ``identity.STAGE_INPUTS["dense_base"]`` (corpus, model,
    pretrain block, precision), then reused; an HF base is keyed by its folder's content. ``fraction`` (default
    ``pretrain.fraction``): the base at that share of the full pretraining, ``fraction_steps`` steps long, keyed by
    those steps (as the share steps / full steps; the full base is fraction 1, the key of every base before
    fractions)."""
    corpus = exp.data.shard_dir.name if exp.data.shard_dir is not None else None
    if exp.model.hf_path:  # a real pretrained checkpoint: no stage-0 pretraining
        from harness.hf import load_hf

        key = identity.stage_key(cfg, "dense_base", corpus=corpus)
        log.info("dense base: the checkpoint %s (no pretraining)", exp.model.hf_path)
        model = load_hf(exp.model.hf_path, max_seq_len=exp.model.max_seq_len)
        tok_vocab = exp.data.meta["vocab_size"]
        if tok_vocab > model.cfg.vocab_size:
            raise ConfigError(f"model.hf_path: tokenizer vocab {tok_vocab} > model vocab_size {model.cfg.vocab_size}")
        return model, {"key": "hf:" + key, "hf_path": exp.model.hf_path}
    own = fraction is None  # the run's own base (not the from-scratch baseline's)
    steps = fraction_steps(exp, exp.pretrain.fraction if own else fraction)
    fraction = 1.0 if steps == full_steps(exp) else steps / full_steps(exp)  # keyed by what trains: shares of
    if fraction != exp.pretrain.fraction:  # equal steps are one base
        cfg = at_fraction(cfg, fraction)
    key = identity.stage_key(cfg, "dense_base", corpus=corpus)
    # the base depends on the pretraining recipe only (its own batch size and seed), so every variant of a
    # sweep (batch size, LR, seed ...) upcycles the very same checkpoint
    out = Path(cfg.paths.cache_dir) / "dense" / key
    with entry_lock(out) as writable:  # a read-only cache: hits read without a lock
        meta_path = out / "meta.json"
        meta = read_json(meta_path, required=("checksum", "key"))
        damaged = meta is not None and corrupt_files(out, {"model.pt": meta["checksum"]})
        if not writable and (meta is None or damaged):
            raise read_only_miss(out, "the dense base")
        if damaged:
            if (out / "model.pt").exists():
                move_aside(out / "model.pt", "a damaged cached dense base (checksum differs from meta.json)")
            else:
                warnings.warn(f"cached dense base {out / 'model.pt'} is missing: pretraining it again")
            meta_path.unlink()
            meta = None
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            shutil.rmtree(out / "parent_val", ignore_errors=True)  # the scores of the weights it replaces
        if meta is None:
            torch.manual_seed(int(exp.pretrain.seed))
            model = Decoder(exp.model)
            pre_data = copy.copy(exp.data)
            pre_data.batch_size = int(exp.pretrain.batch_size)
            pre_data.seed = int(exp.pretrain.seed)  # its data order: pretrain.seed, as its key says
            pre_exp = dataclasses.replace(exp, optim=exp.pretrain.optim, data=pre_data)
            share = "" if fraction == 1 else f", {fraction:.1%} of the full {full_steps(exp)}"
            log.info(
                "dense base: pretraining %s for %d steps (%s tokens%s) -> %s",
                exp.model.name,
                steps,
                f"{steps * pre_data.batch_size * pre_data.seq_len:,}",
                share,
                out,
            )
            heal_checkpoint(out)
            with torch.random.fork_rng(devices=[]):  # the random init's loss: the curve's step 0, its RNG untouched
                init_loss = evaluate(model, pre_data.val_dataloader(), eval_device(cfg))
            stage = tracking.stage(cfg, "pretrain", out, f"pretrain/{key}")
            res = fit_and_evaluate(
                model,
                pre_exp,
                stage,
                out,
                steps,
                own_stage=exp.method == "pretrain" and own,
                trunk_dir=pretrain_trunk_dir(exp, cfg, corpus),
                keep_trunk=True,
            )
            if res["status"] != "complete":
                raise StageStopped(
                    f"dense pretraining stopped at step {res['steps']} of {steps}; "
                    f"{resume_hint(exp.train.stop_after_steps)} to resume it"
                )
            torch.save(model.state_dict(), out / "model.pt.tmp")
            (out / "model.pt.tmp").replace(out / "model.pt")
            checksum = file_digest(out / "model.pt")
            record = {"key": key, "model": asdict(exp.model), "checksum": checksum, "fraction": fraction, **res}
            record["init_val_loss"] = init_loss
            atomic_write_json(meta_path, record)
            meta = json.loads(meta_path.read_text())
        else:
            log.info("dense base: cached %s", out)
            if own and exp.method == "pretrain" and exp.train.stop_after_steps:  # it stops training: none here
                log.warning("train.stop_after_steps=%s stopped nothing: the base is cached", exp.train.stop_after_steps)
    model = Decoder(exp.model)
    model.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    return model, {**meta, "dir": str(out)}


def parent_loss(model: Decoder, meta: dict, exp: Experiment, device: torch.device) -> float:
    """The dense parent's validation loss, kept beside its base: every job of a sweep scores the same checkpoint on
    the same windows (5-8 s a job of the study's ladder, four jobs sharing the GPU). Keyed by the weights (checksum,
    and the file's size and time: a base trained again is a new file), the validation windows, the loader's batch
    (its float summation order) and the device; an HF base (no cache folder) is scored every time."""
    loader = exp.data.val_dataloader()
    if "dir" not in meta:
        return evaluate(model, loader, device)
    weights = Path(meta["dir"]) / "model.pt"
    stat = weights.stat()
    inputs = {
        "weights": [meta["checksum"], stat.st_size, stat.st_mtime_ns],
        "val": [exp.data.meta.get("checksums", {}).get("val.bin"), exp.data.seq_len, exp.data.val_windows],
        "batch": exp.data.loader_batch,
        "device": [device.type, torch.cuda.get_device_name(device) if device.type == "cuda" else "", torch.__version__],
    }
    key = hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(meta["dir"]) / "parent_val" / f"{key}.json"
    kept = read_json(path, required=("val_loss", "inputs"))
    if kept is not None and kept["inputs"] == json.loads(json.dumps(inputs)):
        log.info(
            "dense parent: val loss %.4f, as scored on these windows and this device before (%s)",
            kept["val_loss"],
            path,
        )
        return float(kept["val_loss"])
    loss = evaluate(model, loader, device)
    try:
        atomic_write_json(path, {"val_loss": loss, "inputs": inputs})
    except OSError:  # a read-only cache: score it every time
        pass
    return loss
