"""Stage 0, the dense base: pretrained once per its stage key (``identity.STAGE_INPUTS``) and cached, or read
from an HF checkpoint folder."""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import DictConfig

from harness import identity, tracking
from harness.errors import ConfigError
from harness.experiment import Experiment
from harness.fit import fit_and_evaluate, heal_checkpoint
from harness.io import atomic_write_json, corrupt_files, entry_lock, file_digest, move_aside, read_json, read_only_miss
from harness.model import Decoder

log = logging.getLogger("upcycle")


def dense_base(exp: Experiment, cfg: DictConfig) -> tuple[Decoder, dict]:
    """The pretrained dense checkpoint: trained once per ``identity.STAGE_INPUTS["dense_base"]`` (corpus, model,
    pretrain block, precision), then reused; an HF base is keyed by its folder's content."""
    corpus = exp.data.shard_dir.name if exp.data.shard_dir is not None else None
    key = identity.stage_key(cfg, "dense_base", corpus=corpus)
    if exp.model.hf_path:  # a real pretrained checkpoint: no stage-0 pretraining
        from harness.hf import load_hf

        log.info("dense base: the checkpoint %s (no pretraining)", exp.model.hf_path)
        model = load_hf(exp.model.hf_path, max_seq_len=exp.model.max_seq_len)
        tok_vocab = exp.data.meta["vocab_size"]
        if tok_vocab > model.cfg.vocab_size:
            raise ConfigError(f"model.hf_path: tokenizer vocab {tok_vocab} > model vocab_size {model.cfg.vocab_size}")
        return model, {"key": "hf:" + key, "hf_path": exp.model.hf_path}
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
        if meta is None:
            torch.manual_seed(int(exp.pretrain.seed))
            model = Decoder(exp.model)
            pre_data = copy.copy(exp.data)
            pre_data.batch_size = int(exp.pretrain.batch_size)
            pre_data.seed = int(exp.pretrain.seed)  # its data order: pretrain.seed, as its key says
            pre_exp = dataclasses.replace(exp, optim=exp.pretrain.optim, data=pre_data)
            steps = pre_exp.steps(exp.pretrain.tokens)
            log.info(
                "dense base: pretraining %s for %d steps (%s tokens) -> %s",
                exp.model.name,
                steps,
                f"{steps * pre_data.batch_size * pre_data.seq_len:,}",
                out,
            )
            heal_checkpoint(out)
            stage = tracking.stage(cfg, "pretrain", out, f"pretrain/{key}")
            res = fit_and_evaluate(model, pre_exp, stage, out, steps, own_stage=exp.method == "pretrain")
            if res["status"] != "complete":
                raise RuntimeError(
                    f"dense pretraining stopped at step {res['steps']} of {steps}; run the same "
                    "command again to resume it"
                )
            torch.save(model.state_dict(), out / "model.pt.tmp")
            (out / "model.pt.tmp").replace(out / "model.pt")
            checksum = file_digest(out / "model.pt")
            atomic_write_json(meta_path, {"key": key, "model": asdict(exp.model), "checksum": checksum, **res})
            meta = json.loads(meta_path.read_text())
        else:
            log.info("dense base: cached %s", out)
    model = Decoder(exp.model)
    model.load_state_dict(torch.load(out / "model.pt", map_location="cpu", weights_only=True))
    return model, meta
