"""The dense baselines: the dense base continued for the MoE's training FLOPs (iso-FLOP) or its tokens, cached
so MoE variants of equal budget share one; the dense model pretrained from scratch for the same total FLOPs; and
where a recipe's shared WSD trunk lives (harness/trunk.py)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from omegaconf import DictConfig

from harness import identity, tracking
from harness.experiment import Experiment
from harness.fit import fit_and_evaluate, heal_checkpoint
from harness.io import atomic_write_json, entry_lock, read_json, read_only_miss
from harness.model import Decoder
from harness.pretrain import dense_base, fraction_steps, full_pretrain_flops, full_steps
from harness.weights import wants_weights

log = logging.getLogger("upcycle")


CONTINUATION_KEYS = ("val_loss", "best_val_loss", "tokens", "train_flops", "val_curve")


def trunk_dir(cfg: DictConfig, stage: str = "trunk", **inputs) -> Path | None:
    """Where runs at every token budget keep their shared WSD stable phase (harness/trunk.py): ``stage`` is
    ``trunk`` (the upcycled run: its whole config less budget and progress) or ``dense_trunk``; the key is
    ``identity.stage_key``."""
    if not cfg.train.share_trunk:
        return None
    return Path(cfg.paths.cache_dir) / "trunks" / identity.stage_key(cfg, stage, **inputs)


def continuation_key(cfg: DictConfig, exp: Experiment, base_key: str, corpus: str | None, tokens: int):
    """(cache key, steps) of a dense continuation for a ``tokens`` budget: keyed by what trains, whole steps, so
    budgets that round to the same steps (two MoEs whose iso-FLOP budgets differ by less than a step) share it."""
    steps = exp.steps(tokens)
    trained = steps * exp.data.batch_size * exp.data.seq_len
    return identity.stage_key(cfg, "dense_continuation", dense_base=base_key, corpus=corpus, tokens=trained), steps


def dense_continuation(
    dense: Decoder, base_key: str, tokens: int, exp: Experiment, cfg: DictConfig, job_type: str = "dense_iso"
) -> dict:
    """Continue the dense model for ``tokens`` tokens (cached: MoE variants of equal FLOPs share it).
    ``job_type``: ``dense_iso`` (the MoE's training FLOPs) or ``dense_tokens`` (the MoE's tokens)."""
    corpus = exp.data.shard_dir.name if exp.data.shard_dir is not None else None
    key, steps = continuation_key(cfg, exp, base_key, corpus, tokens)
    out = Path(cfg.paths.cache_dir) / "dense_continuation" / key
    with entry_lock(out) as writable:  # a read-only cache: hits read without a lock
        res_path = out / "results.json"
        cached = read_json(res_path, required=CONTINUATION_KEYS)
        what, budget = {
            "dense_iso": ("iso-FLOP dense continuation", "the MoE's training FLOPs"),
            "dense_tokens": ("token-matched dense continuation", "the MoE's tokens"),
        }[job_type]
        if cached is not None:
            log.info("%s: cached %s", what, out)
            return {**cached, "cache_dir": str(out)}
        if not writable:
            raise read_only_miss(out, f"the {what}")
        log.info(
            "%s: training %d steps (%s tokens, %s) -> %s",
            what,
            steps,
            f"{steps * exp.data.batch_size * exp.data.seq_len:,}",
            budget,
            out,
        )
        torch.manual_seed(int(cfg.seed))
        model = Decoder(exp.model)
        model.load_state_dict(dense.state_dict())
        heal_checkpoint(out)
        res = fit_and_evaluate(
            model,
            exp,
            tracking.stage(cfg, job_type, out, f"{job_type}/{key}"),
            out,
            steps,
            trunk_dir=trunk_dir(cfg, "dense_trunk", dense_base=base_key, corpus=corpus),
            keep_weights=wants_weights(cfg),
        )
        if res["status"] == "complete":
            atomic_write_json(res_path, res)
        return {**res, "cache_dir": str(out)}


def dense_scratch(exp: Experiment, cfg: DictConfig, base_meta: dict, moe_train_flops: float) -> dict | None:
    """The dense model trained from scratch with the MoE cell's total FLOPs (its base's pretraining plus the MoE's
    training): the base at share f' = total / the full pretraining's FLOPs, in whole steps. That is the WSD
    pretraining's own stable trunk to f' plus a decay (harness/pretrain.py), so only what the trunk does not hold
    yet and the decay are new work. None, with one logged line, when f' > 1 (the pretraining stops short of it)."""
    total = base_meta["train_flops"] + moe_train_flops
    share = total / full_pretrain_flops(exp)
    if share > 1:
        log.info(
            "from-scratch dense baseline: skipped: the base's pretraining plus the MoE's training is %.0f%% of the "
            "full pretraining (pretrain.tokens), beyond its end",
            100 * share,
        )
        return None
    steps = fraction_steps(exp, share)
    log.info(
        "from-scratch dense baseline: the base at %d of %d pretraining steps (%.1f%%)",
        steps,
        full_steps(exp),
        100 * share,
    )
    _, meta = dense_base(exp, cfg, fraction=steps / full_steps(exp))
    out = {k: meta[k] for k in ("val_loss", "best_val_loss", "tokens", "train_flops", "val_curve")}
    return {**out, "fraction": meta.get("fraction", 1.0), "flop_share": share, "dense_base": meta["key"]}
