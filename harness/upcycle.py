"""Dense -> MoE upcycling recipes: copy, virtual groups, Drop-Upcycling, weight scaling.

Sources: Sparse Upcycling (arXiv 2212.05055) for copy; arXiv 2410.07524 sec. 3 for virtual groups
and weight scaling (as NVIDIA Megatron-LM ``upcycling_utils.py`` implements them); Drop-Upcycling
(arXiv 2502.19261) for partial re-initialisation.

The default start is exact: ``exact`` weight scaling (the scale put only where the activation is
homogeneous) and a router whose initial logits have a small, stated spread measured on a calibration
batch (``router_start=data``). Megatron's recipe (``paper`` scaling, router std 0.02) started
SmolLM2-135M at +26% (E8G1T2) to +141% (E64G8T8) loss on English prose; this one within 0.1%
(results/step0.md).
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Sequence

import torch

from harness.errors import ConfigError
from harness.mlp import MLP
from harness.model import Decoder
from harness.moe import MoE, MoEConfig

ROUTER_INITS = ("random", "virtual_group")
WEIGHT_SCALINGS = ("none", "paper", "output", "exact")
ROUTER_STARTS = ("data", "fixed")
DROP_SEED_OFFSET = 1_000_003  # the drop draws' generator: upcycle.seed + this, apart from the router's


@dataclass
class Recipe:
    """How the experts and router are initialised from the dense MLP.

    router_init: ``virtual_group`` (one shared row per group of G experts; at G = 1 the same draws as
    ``random``) or ``random`` (independent rows: with G > 1 they split groups, so step 0 is not the
    dense function). drop_ratio: fraction r of each expert's hidden units re-initialised (0 = copy).
    weight_scaling: ``exact`` (see :func:`weight_factors`), ``paper`` (Megatron's spread over fc1/fc2),
    ``output`` (fc2 only) or ``none``.
    router_start: ``data`` (each layer's router std = router_logit_std / RMS norm of that layer's MLP
    input on the calibration batch, so the initial logits have std router_logit_std whatever the
    hidden-state norms) or ``fixed`` (std ``moe.router_init_std``, Megatron's 0.02: on SmolLM2-135M,
    with hidden norms 2-10, that gave logits std ~0.07 and a top-T mass ~1.1x T/E).
    moe_layers: ``all``, ``every_K`` (layers K-1, 2K-1, ...), or a list of layer indices.
    """

    router_init: str = "virtual_group"
    drop_ratio: float = 0.0
    weight_scaling: str = "exact"
    moe_layers: str | Sequence[int] = "all"
    seed: int = 0
    router_start: str = "data"
    router_logit_std: float = 0.01

    def validate(self) -> None:
        if self.router_init not in ROUTER_INITS:
            raise ConfigError(f"upcycle.router_init={self.router_init!r} is not one of {ROUTER_INITS}")
        if self.weight_scaling not in WEIGHT_SCALINGS:
            raise ConfigError(f"upcycle.weight_scaling={self.weight_scaling!r} is not one of {WEIGHT_SCALINGS}")
        if not 0.0 <= float(self.drop_ratio) <= 1.0:
            raise ConfigError(f"upcycle.drop_ratio={self.drop_ratio!r} must be in [0, 1]")
        if self.router_start not in ROUTER_STARTS:
            raise ConfigError(f"upcycle.router_start={self.router_start!r} is not one of {ROUTER_STARTS}")
        if not float(self.router_logit_std) > 0:  # zero weights tie every logit: all tokens go to experts 0..T-1
            raise ConfigError(f"upcycle.router_logit_std={self.router_logit_std!r} must be > 0")


def resolve_moe_layers(spec: str | Sequence[int], n_layers: int) -> list[int]:
    """Turn ``all`` / ``every_K`` / [indices] into a sorted list of layer indices."""
    if isinstance(spec, str):
        if spec == "all":
            return list(range(n_layers))
        if spec.startswith("every_") and spec[6:].isdigit() and int(spec[6:]) > 0:
            k = int(spec[6:])
            if k > n_layers:  # it would pick no layer: the "MoE" would be its dense parent
                raise ConfigError(f"upcycle.moe_layers={spec!r} picks no layer of this {n_layers}-layer model")
            return [i for i in range(n_layers) if i % k == k - 1]
        raise ConfigError(f"upcycle.moe_layers={spec!r} must be 'all', 'every_K' or a list of layer indices")
    layers = sorted({int(i) for i in spec})
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad or not layers:
        raise ConfigError(f"upcycle.moe_layers={list(spec)!r} must name layers in [0, {n_layers - 1}]")
    return layers


def activation_scale(
    routing: str,
    num_experts: int,
    granularity: int,
    top_k: int,
    norm_topk_prob: bool = False,
    topk_scaling_factor: float = 1.0,
) -> float:
    """Factor s by which the MoE output falls short of the dense output at init (arXiv 2410.07524).

    The T chosen experts are T/G whole virtual groups, each summing to the dense MLP, so s = 1 / (the chosen
    weights' sum per group). topk_softmax, or any routing with ``norm_topk_prob``: the weights sum to the
    scaling factor gamma whatever the router, so s = G/gamma (exact for every router). softmax_topk: every prob
    ~ 1/E, so s = E*G/(T*gamma) (Megatron writes it (E/G)*G*G/T). sigmoid_topk: every score ~ sigmoid(0) = 1/2
    (the router start's logits have std ~0.01), so s = 2G/(T*gamma); its gap to the dense function is
    sigmoid(l)/sigmoid(0) - 1 ~ l/2 per weight, half softmax_topk's (1/E)(1 + l - mean l) relative spread.
    """
    gamma = float(topk_scaling_factor)
    if routing == "topk_softmax" or norm_topk_prob:
        return granularity / gamma
    if routing == "sigmoid_topk":
        return 2 * granularity / (top_k * gamma)
    return num_experts * granularity / (top_k * gamma)


def weight_factors(scaling: str, s: float, activation: str) -> tuple[float, float, float]:
    """(gate, up, fc2) factors multiplying every expert's gate rows, up rows (all of fc1 when not
    gated: gate == up) and fc2, so that the expert's output is s times the dense shard's.

    paper: s^(1/3) on fc1 and fc2 for gated MLPs and squared ReLU, s^(1/2) otherwise (Megatron;
    exact for relu2 only, since relu(cz)^2 = c^2 relu(z)^2; silu is not homogeneous, which cost
    SmolLM2-135M ~22 loss points at step 0). exact: the scale only where the function is linear or
    homogeneous: gated MLPs sqrt(s) on the up rows and fc2 (silu(g) * sqrt(s) u, gate untouched),
    squared ReLU s^(1/3) on fc1 and fc2, any other activation s on fc2. output: s on fc2 alone.
    Every choice but paper is exact for every activation whenever the routing weights are uniform.
    """
    if scaling == "none" or s == 1.0:
        return 1.0, 1.0, 1.0
    if scaling == "output":
        return 1.0, 1.0, s
    if scaling == "exact":
        if activation == "swiglu":
            return 1.0, s**0.5, s**0.5
        if activation == "relu2":
            return s ** (1 / 3), s ** (1 / 3), s ** (1 / 3)
        return 1.0, 1.0, s
    c = s ** (1 / 3) if activation in ("swiglu", "relu2") else s**0.5
    return c, c, c


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
    """Drop-Upcycling (Nakamura et al. 2025): re-draw round(r*f_e) random hidden units of one expert,
    in place, from N(mean, std) of the corresponding dense matrix (gate, up and down separately; one
    index set for all three, as the paper samples along the intermediate dimension). Runs after weight
    scaling, so the re-drawn units follow the dense statistics exactly: scaling exists to make the
    copied units sum back to the dense function, and a re-drawn unit is no part of it (the paper
    draws from the original weights' statistics and applies no scaling)."""
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


def _copy_shared(layer: MoE, shards: list[tuple[torch.Tensor, torch.Tensor]], gated: bool) -> None:
    """The shared experts' one MLP (width S*F/G) from the dense MLP's first S shards, unscaled: [gate; up]
    rows are the shards' gate rows then their up rows, fc2 their columns side by side."""
    if not shards:
        return
    fe = shards[0][1].shape[1]
    halves = ([s[0][:fe] for s in shards], [s[0][fe:] for s in shards]) if gated else ([s[0] for s in shards],)
    with torch.no_grad():
        layer.shared.fc1.weight.copy_(torch.cat([torch.cat(h) for h in halves]))
        layer.shared.fc2.weight.copy_(torch.cat([s[1] for s in shards], dim=1))


def moe_from_mlp(
    mlp: MLP,
    cfg: MoEConfig,
    recipe: Recipe,
    router_gen: torch.Generator,
    drop_gen: torch.Generator,
    router_std: float | None = None,
) -> MoE:
    """Build one MoE layer from a dense MLP. Expert e holds shard e mod G (groups of G experts).
    The router is drawn from N(0, router_std^2) (``moe.router_init_std`` when None) with ``router_gen``;
    the Drop-Upcycling draws use ``drop_gen``, so copy and drop at one seed share the router.

    Shared experts (S > 0): the dense MLP's first S shards become the shared experts, copied unscaled and
    never re-drawn, and the routed experts are virtual groups of the other G - S shards (expert e holds shard
    S + e mod (G - S)), scaled for groups of G - S, so that they reproduce the rest of the dense MLP:
    dense(x) = shared(x) + rest(x) exactly, since a SwiGLU/relu2 MLP is a sum over its hidden units."""
    d_model = mlp.fc1.weight.shape[1]
    with torch.device("meta"):  # every weight is written below: skip MoE's own random init
        layer = MoE(d_model, mlp.d_ff, mlp.activation, cfg)
    layer = layer.to_empty(device="cpu")
    layer.reset_balancing()
    e, g = cfg.num_experts, cfg.routed_group  # g: the routed virtual-group size, G - S
    shards = _shards(mlp, cfg.granularity)
    _copy_shared(layer, shards[: cfg.shared_experts], mlp.gated)
    shards = shards[cfg.shared_experts :]  # the routed experts' shards
    w1, w2 = layer.experts.w1.detach(), layer.experts.w2.detach()  # filled in place: a 135M model's E64G8T8
    for i in range(e):  # experts are 2.5 GB in fp32
        w1[i].copy_(shards[i % g][0])
        w2[i].copy_(shards[i % g][1])
    s = activation_scale(cfg.routing, e, g, cfg.top_k, cfg.norm_topk_prob, cfg.topk_scaling_factor)
    c_gate, c_up, c2 = weight_factors(recipe.weight_scaling, s, mlp.activation)
    fe = w1.shape[1] // 2 if mlp.gated else 0  # fc1 holds [gate rows; up rows] per expert when gated
    for part, c in ((w1[:, :fe], c_gate), (w1[:, fe:], c_up), (w2, c2)):
        if c != 1.0:
            part.mul_(c)
    for i in range(e):  # after scaling: re-drawn units follow the dense statistics, unscaled
        _drop_reinit(w1[i], w2[i], mlp, float(recipe.drop_ratio), drop_gen)
    dtype = mlp.fc1.weight.dtype
    with torch.no_grad():
        if dtype != w1.dtype:  # the dense model's precision, stored in fp32
            w1.copy_(w1.to(dtype))
            w2.copy_(w2.to(dtype))
        rows = e // g if recipe.router_init == "virtual_group" else e
        router = torch.randn(rows, d_model, generator=router_gen) * (
            cfg.router_init_std if router_std is None else router_std
        )
        if recipe.router_init == "virtual_group":
            router = router.repeat_interleave(g, dim=0)  # a group's G experts share one logit
        layer.router.weight.copy_(router.to(layer.router.weight.dtype))
    return layer.to(mlp.fc1.weight.device)


def mlp_input_rms(dense: Decoder, layers: Sequence[int], calib: torch.Tensor) -> dict[int, float]:
    """sqrt(mean ||x||^2) of each listed layer's MLP input x over the calibration tokens ``calib`` [B, L]
    (forward hooks on the dense MLPs; one no-grad forward in eval mode)."""
    sums: dict[int, list[float]] = {i: [0.0, 0.0] for i in layers}

    def hook(i):
        def fn(_module, args):
            x = args[0].detach().float()
            sums[i][0] += x.square().sum().item()
            sums[i][1] += x.numel() / x.shape[-1]

        return fn

    handles = [dense.blocks[i].mlp.register_forward_pre_hook(hook(i)) for i in layers]
    was_training = dense.training
    try:
        with torch.no_grad():
            dense.eval()(calib.to(next(dense.parameters()).device))
    finally:
        dense.train(was_training)
        for h in handles:
            h.remove()
    return {i: (total / max(n, 1)) ** 0.5 for i, (total, n) in sums.items()}


def upcycle(dense: Decoder, cfg: MoEConfig, recipe: Recipe, calib: torch.Tensor | None = None) -> Decoder:
    """Return a new model: ``dense`` with the chosen MLPs replaced by upcycled MoE layers.

    ``calib``: token ids [B, L] (a few training sequences) for ``router_start=data``: a router row w
    with N(0, sigma^2) entries gives token x the logit spread sigma*||x||, so sigma = router_logit_std /
    RMS ||x|| sets the spread from the data. A trained model's post-RMSNorm norms vary by layer (2-10
    on SmolLM2-135M), so no single fixed std makes every layer's softmax near uniform. Without
    ``calib`` the router falls back to ``moe.router_init_std`` (with a warning)."""
    recipe.validate()
    cfg.validate(dense.cfg.d_ff)
    layers = resolve_moe_layers(recipe.moe_layers, dense.cfg.n_layers)
    if recipe.router_init == "random" and cfg.routed_group > 1:
        warnings.warn(
            f"upcycle.router_init=random with moe.granularity={cfg.granularity}: independent router rows "
            "split the virtual groups, so step 0 is not the dense function (init=virtual_group keeps them)"
        )
    for i in layers:
        if not isinstance(dense.blocks[i].mlp, MLP):
            raise ConfigError(f"upcycle.moe_layers: layer {i} is already an MoE layer")
    stds: dict[int, float | None] = {i: None for i in layers}
    if recipe.router_start == "data":
        if calib is None:
            warnings.warn(
                "upcycle.router_start=data without a calibration batch: router std is "
                f"moe.router_init_std={cfg.router_init_std}"
            )
        else:
            stds = {i: float(recipe.router_logit_std) / r for i, r in mlp_input_rms(dense, layers, calib).items()}
    model = copy.deepcopy(dense)
    router_gen = torch.Generator().manual_seed(int(recipe.seed))  # the same draws as before drops existed
    drop_gen = torch.Generator().manual_seed(int(recipe.seed) + DROP_SEED_OFFSET)
    for i in layers:
        model.blocks[i].mlp = moe_from_mlp(dense.blocks[i].mlp, cfg, recipe, router_gen, drop_gen, stds[i])
    return model


def top_mass(model: Decoder, calib: torch.Tensor) -> tuple[float, float]:
    """(mean top-T router probability mass, T/E) of ``model``'s MoE layers on tokens ``calib``: how far
    from uniform the routing starts (softmax over all E, fp32 logits; the mean over tokens and layers)."""
    from harness.moe import MoE, router_logits

    masses: list[float] = []

    def fn(module, args):
        x = args[0].detach().reshape(-1, args[0].shape[-1])
        probs = router_logits(x, module.router.weight, "fp32").softmax(-1)
        masses.append(probs.topk(module.cfg.top_k, dim=-1).values.sum(-1).mean().item())

    moes = [m for m in model.modules() if isinstance(m, MoE)]
    if not moes:
        return float("nan"), float("nan")
    handles = [m.register_forward_pre_hook(fn) for m in moes]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(calib.to(next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return sum(masses) / len(masses), moes[0].cfg.top_k / moes[0].cfg.num_experts
