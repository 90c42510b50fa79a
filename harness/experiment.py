"""What one run is: the objects its config describes, built and validated before any compute."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig

from harness import launch
from harness.data import TokenDataModule
from harness.errors import ConfigError
from harness.lit import OptimConfig
from harness.model import ModelConfig
from harness.moe import MoEConfig
from harness.upcycle import Recipe, resolve_moe_layers

METHODS = ("upcycle", "dense", "pretrain")  # pretrain: only the (cached) dense base


@dataclass
class Spec:
    """Everything a run needs, built and validated from the config before any compute."""

    method: str
    model: ModelConfig
    moe: MoEConfig
    recipe: Recipe
    optim: OptimConfig
    data: TokenDataModule
    moe_layers: list[int]


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def make(node, **kw):
    """``hydra.utils.instantiate`` that lets our ConfigError through unwrapped (one clear line)."""
    try:
        return instantiate(node, **kw)
    except InstantiationException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise


def build_spec(cfg: DictConfig) -> Spec:
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not one of {METHODS}")
    for key in ("tokens", "ckpt_every", "val_every"):
        if int(cfg.train[key]) <= 0:
            raise ConfigError(f"train.{key}={cfg.train[key]!r} must be > 0")
    mgn, share = cfg.train.get("max_grad_norm"), cfg.train.get("collapse_share", 1.0)
    if mgn is not None and not (isinstance(mgn, (int, float)) and mgn > 0):
        raise ConfigError(f"train.max_grad_norm={mgn!r} must be > 0 (or null)")
    if not (isinstance(share, (int, float)) and 0 < share <= 1) or int(cfg.train.get("collapse_steps", 100)) < 1:
        raise ConfigError(f"train.collapse_share={share!r} / train.collapse_steps must be in (0, 1] / >= 1")
    if int(cfg.pretrain.tokens) <= 0:
        raise ConfigError(f"pretrain.tokens={cfg.pretrain.tokens!r} must be > 0")
    model = make(cfg.model)
    moe = make(cfg.moe)
    moe.validate(model.d_ff)
    recipe = make(cfg.upcycle)
    recipe.validate()
    optim = make(cfg.optim)
    optim.validate()
    fraction = cfg.train.get("pretrain_fraction")
    if fraction is not None and (not isinstance(fraction, (int, float)) or fraction <= 0 or cfg.model.get("hf_path")):
        raise ConfigError(
            f"train.pretrain_fraction={fraction!r} must be a number > 0 (or null), and needs a base this "
            "harness pretrained (an HF checkpoint's pretraining compute is unknown)"
        )
    share = cfg.train.get("share_trunk", False)
    if not isinstance(share, bool) or (share and optim.schedule != "wsd"):
        raise ConfigError(
            f"train.share_trunk={share!r} needs a bool, and true needs optim=wsd "
            f"(optim.schedule is {optim.schedule!r}): only WSD runs share a stable phase"
        )
    data = make(cfg.data)
    data.check_source()  # a user corpus: exists, is text, is large enough
    if data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len={data.seq_len} > model.max_seq_len={model.max_seq_len}")
    layers = resolve_moe_layers(recipe.moe_layers, model.n_layers)
    _compile_enabled(cfg)  # validates train.compile
    world = launch.world_size(cfg.trainer)
    data.split_batch(world)  # the global batch must split over the devices
    pre_batch = cfg.pretrain.get("batch_size")
    if not isinstance(pre_batch, int) or pre_batch < 1 or pre_batch % world:
        raise ConfigError(f"pretrain.batch_size={pre_batch!r} must be a positive int that splits over {world} devices")
    return Spec(cfg.method, model, moe, recipe, optim, data, layers)


def _compile_enabled(cfg: DictConfig) -> bool:
    """train.compile: true | false | auto (on for GPU trainers, where it measured 1.75x; off on CPU)."""
    value = cfg.train.get("compile", "auto")
    if value == "auto":
        return cfg.trainer.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available()
    if not isinstance(value, bool):
        raise ConfigError(f"train.compile={value!r} is not one of true, false, auto")
    return value
