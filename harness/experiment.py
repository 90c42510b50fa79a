"""What one run is: the objects its config describes, built and validated before any compute."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig
from omegaconf.errors import MissingMandatoryValue

from harness import launch
from harness.data import TokenDataModule
from harness.errors import ConfigError
from harness.eval import EvalConfig
from harness.lit import OptimConfig
from harness.model import ModelConfig
from harness.moe import MoEConfig
from harness.upcycle import Recipe, resolve_moe_layers

METHODS = ("upcycle", "dense", "pretrain")  # pretrain: only the (cached) dense base
CHECKPOINTING = (False, True, "full", "mlp", "selective")  # train.activation_checkpointing
# train.compile_mode: torch.compile's modes; the two that capture CUDA graphs are CUDA_GRAPH_MODES
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")


@dataclass
class TrainConfig:
    """The ``train`` block: the upcycled (or dense-continued) run's budget, evaluation, checkpoints and guards."""

    tokens: int = 96000  # MoE training tokens; the dense continuation gets the same FLOPs
    pretrain_fraction: float | None = None  # instead of tokens: this share of the full pretraining's FLOPs
    val_every: int = 25  # steps
    ckpt_every: int = 25  # steps; last.ckpt is what a re-run resumes from
    save_checkpoints: bool = True  # false: no checkpoints (throughput runs; nothing to resume from)
    share_trunk: bool = False  # with optim=wsd: runs that differ only in budget share one stable phase
    peak_tflops: float | None = None  # hardware peak for perf/mfu
    stop_after_steps: int | None = None  # stop early as a crash would (tests resume)
    compile: bool | str = "auto"  # torch.compile each block: auto = on for GPU trainers (1.75x on H100), off on CPU
    # torch.compile's mode for the blocks: default | reduce-overhead (CUDA graphs: one launch per compiled block
    # instead of its dozens of kernels, for steps whose host falls behind the GPU; one micro-batch a step) |
    # max-autotune(-no-cudagraphs)
    compile_mode: str = "default"
    # recompute in backward for memory: false | full (whole blocks, ~1/3 more compute) | mlp (the MLP/MoE layer
    # only) | selective (all but matmul and attention outputs); true means full
    activation_checkpointing: bool | str = False
    max_grad_norm: float | None = 1000.0  # a pre-clip gradient norm above this (or NaN/Inf) stops the run
    collapse_share: float = 0.9  # one expert taking more than this share of the tokens ...
    collapse_steps: int = 100  # ... for this many steps in a row: moe/router_collapse=1 and a warning
    # profile this many steady steps of the run's own stage (harness/profiling.py: profile/ in its folder); 0: off
    profile_steps: int = 0

    def __post_init__(self) -> None:
        for key in ("tokens", "ckpt_every", "val_every"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"train.{key}={getattr(self, key)!r} must be > 0")
        if isinstance(self.profile_steps, bool) or not isinstance(self.profile_steps, int) or self.profile_steps < 0:
            raise ConfigError(f"train.profile_steps={self.profile_steps!r} must be a whole number >= 0 (0: off)")
        mgn, share, peak = self.max_grad_norm, self.collapse_share, self.peak_tflops
        if peak is not None and (isinstance(peak, bool) or not isinstance(peak, (int, float)) or peak <= 0):
            raise ConfigError(f"train.peak_tflops={peak!r} must be the device's peak TFLOP/s, > 0 (or null: no MFU)")
        if mgn is not None and not (isinstance(mgn, (int, float)) and mgn > 0):
            raise ConfigError(f"train.max_grad_norm={mgn!r} must be > 0 (or null)")
        if not (isinstance(share, (int, float)) and 0 < share <= 1):
            raise ConfigError(f"train.collapse_share={share!r} must be in (0, 1]")
        if int(self.collapse_steps) < 1:
            raise ConfigError(f"train.collapse_steps={self.collapse_steps!r} must be >= 1")
        if self.activation_checkpointing not in CHECKPOINTING:
            raise ConfigError(
                f"train.activation_checkpointing={self.activation_checkpointing!r} is not one of false, true, "
                "full, mlp, selective"
            )
        if not (isinstance(self.compile, bool) or self.compile == "auto"):
            raise ConfigError(f"train.compile={self.compile!r} is not one of true, false, auto")
        if self.compile_mode not in COMPILE_MODES:
            raise ConfigError(f"train.compile_mode={self.compile_mode!r} is not one of {', '.join(COMPILE_MODES)}")

    def validate(self, optim: OptimConfig, hf_base: bool) -> None:
        """The checks that need the other blocks: the budget's unit and the schedule a shared trunk needs."""
        fraction = self.pretrain_fraction
        if fraction is not None and (
            isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or fraction <= 0
        ):
            raise ConfigError(f"train.pretrain_fraction={fraction!r} must be a number > 0 (or null)")
        if fraction is not None and hf_base:
            raise ConfigError(
                f"train.pretrain_fraction={fraction!r} needs a base this harness pretrained: an HF checkpoint's "
                "pretraining compute is unknown (use train.tokens)"
            )
        share = self.share_trunk
        if not isinstance(share, bool):
            raise ConfigError(f"train.share_trunk={share!r} must be true or false")
        if share and optim.schedule != "wsd":
            raise ConfigError(
                f"train.share_trunk=true needs optim=wsd (optim.schedule is {optim.schedule!r}): only WSD runs "
                "share a stable phase"
            )


@dataclass
class PretrainConfig:
    """The ``pretrain`` block: the dense base's own budget, batch, seed and optimizer (it keys the base's cache)."""

    tokens: int = 600000
    # the base at this share of ``tokens`` (the sunk cost D1): the WSD stable trunk of the full pretraining,
    # shared by every fraction, branched off at its own length plus its own decay (harness/trunk.py)
    fraction: float = 1.0
    batch_size: int = 16  # global; its own, so a data.batch_size sweep upcycles one shared base
    seed: int = 1234
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20))

    def __post_init__(self) -> None:
        if int(self.tokens) <= 0:
            raise ConfigError(f"pretrain.tokens={self.tokens!r} must be > 0")
        f = self.fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0 < f <= 1:
            raise ConfigError(f"pretrain.fraction={f!r} must be a number in (0, 1]")
        schedule = getattr(self.optim, "schedule", None)
        if f != 1 and schedule != "wsd":
            raise ConfigError(
                f"pretrain.fraction={f!r} needs pretrain.optim.schedule=wsd (it is {schedule!r}): a base at a share "
                "of pretraining is the WSD stable trunk plus its own decay"
            )

    def validate(self, world: int, hf_base: bool = False) -> None:
        b = self.batch_size
        if not isinstance(b, int) or b < 1 or b % world:
            raise ConfigError(f"pretrain.batch_size={b!r} must be a positive int that splits over {world} devices")
        if self.fraction != 1 and hf_base:
            raise ConfigError(f"pretrain.fraction={self.fraction!r} needs a base this harness pretrains, not model=hf")
        if self.fraction != 1 and world > 1:
            raise ConfigError(f"pretrain.fraction={self.fraction!r} runs on one device for now (trainer.devices=1)")


@dataclass
class Experiment:
    """Everything a run needs, built and validated from the config before any compute."""

    method: str
    model: ModelConfig
    moe: MoEConfig
    recipe: Recipe
    optim: OptimConfig
    data: TokenDataModule
    moe_layers: list[int]
    train: TrainConfig
    pretrain: PretrainConfig
    evaluation: EvalConfig | None = None  # the eval block: downstream tasks after training

    def steps(self, tokens: float) -> int:
        """Optimizer steps that cover ``tokens`` (at least one)."""
        return max(1, math.ceil(tokens / (self.data.batch_size * self.data.seq_len)))


def build(node, **kw):
    """``hydra.utils.instantiate`` that names a bad value in one ConfigError line: ours raised by the class, a
    value of the wrong type for its field, or a mandatory value (``???``) left unset."""
    try:
        check_types(node)
        return instantiate(node, **kw)
    except MissingMandatoryValue as e:
        raise ConfigError(f"{e.full_key} must be set ({e.full_key}=...)") from None
    except InstantiationException as e:
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        if isinstance(cause, MissingMandatoryValue):
            raise ConfigError(f"{cause.full_key} must be set ({cause.full_key}=...)") from None
        raise


_SCALARS = (bool, int, float, str, type(None))


def check_types(node: DictConfig) -> None:
    """Each scalar argument of the node's ``_target_`` against its annotation (``train.tokens=abc`` is not an
    int), where the annotation is a plain scalar type or a union of them; integral floats pass for ints
    (``1e6`` reads as a float)."""
    try:
        target = get_object(node._target_)
        if not isinstance(target, type):
            return
        hints = typing.get_type_hints(target if dataclasses.is_dataclass(target) else target.__init__)
    except Exception:  # not a class, or annotations we cannot resolve: instantiate reports what it finds
        return
    prefix = node._get_full_key(None)
    for key, hint in hints.items():
        allowed = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        if key not in node or not all(t in _SCALARS for t in allowed):
            continue
        value = node[key]
        fits = (
            (value is None and type(None) in allowed)
            or (isinstance(value, bool) and bool in allowed)
            or (type(value) is int and (int in allowed or float in allowed))
            or (isinstance(value, float) and (float in allowed or (int in allowed and value.is_integer())))
            or (isinstance(value, str) and str in allowed)
        )
        if not fits:
            names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            child = node._get_node(key)
            origin = f" (it reads {child._value()})" if child._is_interpolation() else ""
            raise ConfigError(f"{prefix}.{key}={value!r} is not {names}{origin}")


# the config's top-level switches (conf/config.yaml); scratch_baseline is checked with what it needs
SWITCHES = ("iso_flop_baseline", "token_matched_baseline", "force", "print_config")


def build_experiment(cfg: DictConfig) -> Experiment:
    if cfg.method not in METHODS:
        raise ConfigError(f"method={cfg.method!r} is not one of {METHODS}")
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be an integer >= 0")
    for key in SWITCHES:  # a typo such as force=maybe must not read as true (and move a finished run aside)
        if not isinstance(cfg.get(key, False), bool):
            raise ConfigError(f"{key}={cfg.get(key)!r} must be true or false")
    data = build(cfg.data)  # before the model: its max_seq_len and vocab_size read data.*
    train = build(cfg.train)
    pretrain = build(cfg.pretrain)
    model = build(cfg.model)
    moe = build(cfg.moe)
    moe.validate(model.d_ff)
    recipe = build(cfg.upcycle)
    recipe.validate()
    optim = build(cfg.optim)
    optim.validate()
    train.validate(optim, hf_base=bool(cfg.model.get("hf_path")))
    data.check_source()  # a user corpus: exists, is text, is large enough
    if data.seq_len > model.max_seq_len:
        raise ConfigError(f"data.seq_len={data.seq_len} > model.max_seq_len={model.max_seq_len}")
    layers = resolve_moe_layers(recipe.moe_layers, model.n_layers)
    world = launch.world_size(cfg.trainer)
    launch.check_strategy(cfg.trainer)
    data.split_batch(world)  # the global batch must split over the devices
    pretrain.validate(world, hf_base=bool(cfg.model.get("hf_path")))
    _check_cuda_graphs(train, data, pretrain, world, hf_base=bool(cfg.model.get("hf_path")))
    _check_scratch(cfg, pretrain, world)
    evaluation = build(cfg.eval) if "eval" in cfg else None
    if evaluation is not None:
        evaluation.check()  # a standard task missing from the offline HF cache stops here, before training
    return Experiment(cfg.method, model, moe, recipe, optim, data, layers, train, pretrain, evaluation)


def _check_cuda_graphs(train: TrainConfig, data, pretrain: PretrainConfig, world: int, hf_base: bool) -> None:
    """CUDA graph trees and gradient accumulation do not mix in PyTorch (pytorch/pytorch#169545, open): the first
    micro-batch's gradients live in the graphs' memory pool, and the next micro-batch's replay overwrites them
    (on the H100, 2026-12-07: "accessing tensor output of CUDAGraphs that has been overwritten", with or without
    recompute; others report silently wrong gradients). So a CUDA-graph mode needs one micro-batch a step in
    every stage that trains: the run's own and the dense base's pretraining (none for an HF base)."""
    if train.compile_mode not in CUDA_GRAPH_MODES:
        return
    stages = [("data.batch_size", data.batch_size)] + (
        [] if hf_base else [("pretrain.batch_size", pretrain.batch_size)]
    )
    for key, batch in stages:
        micro = min(data.micro_batch_size or batch // world, batch // world)
        if batch // world > micro:
            raise ConfigError(
                f"train.compile_mode={train.compile_mode} (CUDA graphs) cannot accumulate gradients (PyTorch's "
                f"CUDA graph trees overwrite them, pytorch/pytorch#169545): data.micro_batch_size={micro} splits "
                f"{key}={batch} into {batch // world // micro} micro-batches a step; set data.micro_batch_size to the "
                "per-device batch or use train.compile_mode=default"
            )


def _check_scratch(cfg: DictConfig, pretrain: PretrainConfig, world: int) -> None:
    """``scratch_baseline``: the base at a longer share of the run's own WSD pretraining (harness/continuation.py)."""
    wanted = cfg.get("scratch_baseline", False)
    if not isinstance(wanted, bool):
        raise ConfigError(f"scratch_baseline={wanted!r} must be true or false")
    if not wanted or cfg.method != "upcycle":
        return
    if cfg.model.get("hf_path"):
        raise ConfigError("scratch_baseline=true needs a base this harness pretrains, not model=hf")
    if pretrain.optim.schedule != "wsd":
        raise ConfigError(
            f"scratch_baseline=true needs pretrain.optim.schedule=wsd (it is {pretrain.optim.schedule!r}): the "
            "from-scratch dense model is the pretraining's own stable trunk plus a decay"
        )
    if world > 1:
        raise ConfigError("scratch_baseline=true runs on one device for now (trainer.devices=1)")


def compile_enabled(train: TrainConfig, trainer_cfg: DictConfig) -> bool:
    """train.compile: true | false | auto (on for GPU trainers, where it measured 1.75x; off on CPU)."""
    if train.compile == "auto":
        return trainer_cfg.get("accelerator") in ("gpu", "cuda") and torch.cuda.is_available()
    return train.compile
