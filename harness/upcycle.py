"""Dense -> MoE upcycling recipes: copy, virtual groups, Drop-Upcycling, weight scaling.

Sources: Sparse Upcycling (arXiv 2212.05055) for copy; arXiv 2410.07524 sec. 3 for virtual groups
and weight scaling (as NVIDIA Megatron-LM ``upcycling_utils.py`` implements them); Drop-Upcycling
(arXiv 2502.19261) for partial re-initialisation.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import torch

from harness.errors import ConfigError
from harness.model import MLP, Decoder
from harness.moe import MoE, MoEConfig

ROUTER_INITS = ("random", "virtual_group")
WEIGHT_SCALINGS = ("none", "paper", "output")


@dataclass
class Recipe:
    """How the experts and router are initialised from the dense MLP.

    router_init: ``random`` (independent rows) or ``virtual_group`` (one shared row per group of G
    experts). drop_ratio: fraction r of each expert's hidden units re-initialised (0 = copy).
    weight_scaling: ``none``, ``paper`` (Megatron's spread over fc1/fc2) or ``output`` (fc2 only).
    moe_layers: ``all``, ``every_K`` (layers K-1, 2K-1, ...), or a list of layer indices.
    """

    router_init: str = "random"
    drop_ratio: float = 0.0
    weight_scaling: str = "paper"
    moe_layers: str | Sequence[int] = "all"
    seed: int = 0

    def validate(self) -> None:
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"upcycle.router_init={self.router_init!r} is not one of {ROUTER_INITS}")
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise ConfigError(f"upcycle.weight_scaling={self.weight_scaling!r} is not one of {WEIGHT_SCALINGS}")
        if not 0.0 <= float(self.drop_ratio) <= 1.0:
            raise ConfigError(f"upcycle.drop_ratio={self.drop_ratio!r} must be in [0, 1]")


def resolve_moe_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Turn ``all`` / ``every_K`` / [indices] into a sorted list of layer indices."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(n_layers))
        if spec.startswith("every_") and spec[6:].isdigit() and int(spec[6:]) > 0:
            k = int(spec[6:])
            return [i for i in range(n_layers) if i % k == k - 1]
        raise ConfigError(f"upcycle.moe_layers={spec!r} must be 'all', 'every_K' or a list of layer indices")
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise ConfigError(f"upcycle.moe_layers={list(spec)!r} must name layers in [0, {n_layers - 1}]")
    return layers


def activation_scale(routing: str, num_experts: int, granularity: int, top_k: int) -> float:
    """Factor s by which the MoE output falls short of the dense output at init (arXiv 2410.07524).

    topk_softmax: the chosen groups' weights sum to 1/G, so s = G. softmax_topk: every prob ~ 1/E and
    T/G groups are chosen, so s = E*G/T (Megatron writes it (E/G)*G*G/T).
    """
    if routing == "topk_softmax":
        return float(granularity)
    return num_experts * granularity / top_k


def weight_factors(scaling: str, s: float, activation: str) -> tuple[float, float]:
    """(c1, c2) multiplying fc1 and fc2 of every expert.

    paper: c = s^(1/3) on both for gated MLPs and squared ReLU (Megatron; exact for relu2 since
    relu(cz)^2 = c^2 relu(z)^2); output: c2 = s alone, exact for every activation.
    """
    if scaling == "none" or s == 1.0:
        return 1.0, 1.0
    if scaling == "output":
        return 1.0, s
    exponent = 1.0 / 3.0 if activation in ("swiglu", "relu2") else 0.5
    return s**exponent, s**exponent


def _shards(mlp: MLP, granularity: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Split the dense MLP's hidden units into G contiguous shards: (fc1 rows, fc2 columns)."""
    w1, w2 = mlp.fc1.weight.detach().float(), mlp.fc2.weight.detach().float()
    f = mlp.d_ff
    fe = f // granularity
    out = []
    for j in range(granularity):
        rows = slice(j * fe, (j + 1) * fe)
        fc1 = torch.cat([w1[:f][rows], w1[f:][rows]]) if mlp.gated else w1[rows]
        out.append((fc1, w2[:, rows]))
    return out


def _drop_reinit(w1: torch.Tensor, w2: torch.Tensor, dense: MLP, ratio: float, gen: torch.Generator) -> None:
    """Drop-Upcycling: re-draw round(r*f_e) random hidden units of one expert, in place, from
    N(mean, std) of the corresponding dense matrix (gate, up and down separately)."""
    fe = w2.shape[1]
    k = round(ratio * fe)
    if k == 0:
        return
    idx = torch.randperm(fe, generator=gen)[:k]
    f = dense.d_ff
    dense_w1, dense_w2 = dense.fc1.weight.detach().float(), dense.fc2.weight.detach().float()
    parts = [(0, dense_w1[:f]), (fe, dense_w1[f:])] if dense.gated else [(0, dense_w1)]
    for offset, src in parts:
        draw = torch.randn(k, w1.shape[1], generator=gen) * src.std() + src.mean()
        w1[offset + idx] = draw
    w2[:, idx] = torch.randn(w2.shape[0], k, generator=gen) * dense_w2.std() + dense_w2.mean()


def moe_from_mlp(mlp: MLP, cfg: MoEConfig, recipe: Recipe, gen: torch.Generator) -> MoE:
    """Build one MoE layer from a dense MLP. Expert e holds shard e mod G (groups of G experts)."""
    d_model = mlp.fc1.weight.shape[1]
    layer = MoE(d_model, mlp.d_ff, mlp.activation, cfg)
    e, g = cfg.num_experts, cfg.granularity
    shards = _shards(mlp, g)
    w1 = torch.stack([shards[i % g][0] for i in range(e)]).clone()
    w2 = torch.stack([shards[i % g][1] for i in range(e)]).clone()
    for i in range(e):
        _drop_reinit(w1[i], w2[i], mlp, float(recipe.drop_ratio), gen)
    s = activation_scale(cfg.routing, e, g, cfg.top_k)
    c1, c2 = weight_factors(recipe.weight_scaling, s, mlp.activation)
    dtype = mlp.fc1.weight.dtype
    with torch.no_grad():
        layer.experts.w1.copy_((w1 * c1).to(dtype))
        layer.experts.w2.copy_((w2 * c2).to(dtype))
        rows = e // g if recipe.router_init == "virtual_group" else e
        router = torch.randn(rows, d_model, generator=gen) * cfg.router_init_std
        if recipe.router_init == "virtual_group":
            router = router.repeat_interleave(g, dim=0)  # a group's G experts share one logit
        layer.router.weight.copy_(router.to(layer.router.weight.dtype))
    return layer.to(mlp.fc1.weight.device)


def upcycle(dense: Decoder, cfg: MoEConfig, recipe: Recipe) -> Decoder:
    """Return a new model: ``dense`` with the chosen MLPs replaced by upcycled MoE layers."""
    recipe.validate()
    cfg.validate(dense.cfg.d_ff)
    layers = resolve_moe_layers(recipe.moe_layers, dense.cfg.n_layers)
    model = copy.deepcopy(dense)
    gen = torch.Generator().manual_seed(int(recipe.seed))
    for i in layers:
        mlp = dense.blocks[i].mlp
        if not isinstance(mlp, MLP):
            raise ConfigError(f"upcycle.moe_layers: layer {i} is already an MoE layer")
        model.blocks[i].mlp = moe_from_mlp(mlp, cfg, recipe, gen)
    return model
