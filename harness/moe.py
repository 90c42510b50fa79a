"""Token-choice MoE layer: router, routing modes, grouped experts, shared experts, capacity, aux losses.

Kept as small pieces like torchtitan's MoE: :func:`route` (one function per routing mode),
:func:`permute` / :func:`unpermute` (sort token copies by expert with no host sync), and
:class:`GroupedExperts` (a per-expert loop that runs anywhere, or one grouped GEMM per projection).

Shapes (the letters of the presets' names, E{E}G{G}T{T}):
    N   tokens in the layer's input (batch x sequence, flattened)
    d   model dim
    E   experts
    T   experts per token (top-T; torchtitan's K)
    G   granularity: each dense MLP is split into G experts of width F / G
    F   the dense MLP's hidden width (``d_ff``); an expert's is F_e = F / G
    N*T token copies, one per (token, chosen expert), sorted by expert between dispatch and combine
    S   shared experts (width F / G each) that every token passes through, beside the routed ones
    C   per-expert capacity ceil(cf * N * T / E) when ``capacity_factor`` is set (dropless when null)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from harness.errors import ConfigError
from harness.mlp import MLP, mlp_activation

ROUTINGS = ("softmax_topk", "topk_softmax", "sigmoid_topk")
LOAD_BALANCINGS = ("aux_loss", "seq_aux_loss", "global_aux_loss", "expert_bias", "none")
EXPERT_BACKENDS = ("auto", "loop", "grouped_mm")
ROUTER_PRECISIONS = ("mixed", "fp32")
DROP_POLICIES = ("probs", "position")


def preset_name(num_experts: int, granularity: int, top_k: int, shared_experts: int = 0) -> str:
    """The paper's name of an MoE shape, E{E}G{G}T{T} (e.g. E8G1T2), with S{S} appended for shared experts."""
    return f"E{num_experts}G{granularity}T{top_k}" + (f"S{shared_experts}" if shared_experts else "")


@dataclass
class MoEConfig:
    """An MoE layer: E experts of width f/G, top-T per token (E{E}G{G}T{T})."""

    num_experts: int = 8
    top_k: int = 2
    granularity: int = 1
    routing: str = "softmax_topk"
    router_init_std: float = 0.02
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 0.0
    expert_backend: str = "auto"
    router_precision: str = "mixed"
    # shared experts and capacity: S always-on experts of width F/G (upcycled from S of the dense MLP's G shards,
    # so the routed experts' virtual groups hold the other G - S); capacity_factor null = dropless
    shared_experts: int = 0
    capacity_factor: float | None = None
    drop_policy: str = "probs"  # probs: a full expert drops its lowest-weight copies; position: its latest tokens
    # routing weights and load balancing of modern MoEs (Megatron-Core, DeepSeek-V3 arXiv 2412.19437, torchtitan)
    norm_topk_prob: bool = False  # renormalise the T chosen weights to sum 1 (torchtitan route_norm)
    topk_scaling_factor: float = 1.0  # the chosen weights times this (Megatron moe_router_topk_scaling_factor)
    load_balancing: str = "aux_loss"  # see LOAD_BALANCINGS and MoE._balance
    bias_update_rate: float = 1e-3  # expert_bias: bias += rate * sign(mean load - load) after each optimizer step

    @property
    def name(self) -> str:
        return preset_name(self.num_experts, self.granularity, self.top_k, self.shared_experts)

    @property
    def routed_group(self) -> int:
        """G - S: the routed experts' virtual-group size (the dense shards that the shared experts leave)."""
        return self.granularity - self.shared_experts

    def validate(self, d_ff: int | None = None) -> None:
        e, t, g = self.num_experts, self.top_k, self.granularity
        if self.routing not in ROUTINGS:
            raise ConfigError(f"moe.routing={self.routing!r} is not one of {ROUTINGS}")
        if self.expert_backend not in EXPERT_BACKENDS:
            raise ConfigError(f"moe.expert_backend={self.expert_backend!r} is not one of {EXPERT_BACKENDS}")
        if self.router_precision not in ROUTER_PRECISIONS:
            raise ConfigError(f"moe.router_precision={self.router_precision!r} is not one of {ROUTER_PRECISIONS}")
        for key, v in (("num_experts", e), ("top_k", t), ("granularity", g)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"moe.{key}={v!r} must be a positive integer")
        if t > e:
            raise ConfigError(f"moe.top_k={t} > moe.num_experts={e}: cannot pick more experts than exist")
        self._validate_shared_capacity()
        group = "moe.granularity" if not self.shared_experts else "moe.granularity - moe.shared_experts"
        gr = self.routed_group
        if e % gr:
            raise ConfigError(f"moe.num_experts={e} is not divisible by {group}={gr}")
        if t % gr:
            raise ConfigError(f"moe.top_k={t} is not divisible by {group}={gr} (top-T must pick whole groups)")
        if d_ff is not None and d_ff % g:
            raise ConfigError(f"model.d_ff={d_ff} is not divisible by moe.granularity={g}")
        for key in ("router_init_std", "aux_loss_coef", "z_loss_coef"):
            if getattr(self, key) < 0:
                raise ConfigError(f"moe.{key}={getattr(self, key)!r} must be >= 0")
        self._validate_modern()

    def _validate_modern(self) -> None:
        if self.load_balancing not in LOAD_BALANCINGS:
            raise ConfigError(f"moe.load_balancing={self.load_balancing!r} is not one of {LOAD_BALANCINGS}")
        if not isinstance(self.norm_topk_prob, bool):
            raise ConfigError(f"moe.norm_topk_prob={self.norm_topk_prob!r} must be true or false")
        for key, low in (("topk_scaling_factor", "> 0"), ("bias_update_rate", ">= 0")):
            v = getattr(self, key)
            number = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not number or not (v > 0 if low == "> 0" else v >= 0):
                raise ConfigError(f"moe.{key}={v!r} must be a number {low}")

    def _validate_shared_capacity(self) -> None:
        s, g, cf = self.shared_experts, self.granularity, self.capacity_factor
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < g:
            raise ConfigError(
                f"moe.shared_experts={s!r} must be an integer in [0, moe.granularity - 1 = {g - 1}]: the shared "
                "experts take S of the dense MLP's G shards and the routed experts need at least one"
            )
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not cf > 0):
            raise ConfigError(f"moe.capacity_factor={cf!r} must be a number > 0, or null (dropless)")
        if self.drop_policy not in DROP_POLICIES:
            raise ConfigError(f"moe.drop_policy={self.drop_policy!r} is not one of {DROP_POLICIES}")

    def capacity(self, num_tokens: int) -> int | None:
        """Per-expert capacity of a micro-batch of N tokens, ceil(cf * N * T / E) (Megatron-Core's
        ``get_capacity``); None when dropless."""
        if self.capacity_factor is None:
            return None
        return math.ceil(num_tokens * self.top_k / self.num_experts * self.capacity_factor)


@dataclass
class RouterAux:
    """What one MoE layer reports besides its output: the weighted aux loss and detached stats."""

    loss: torch.Tensor  # aux_loss_coef * load_balance + z_loss_coef * z_loss
    load_balance: torch.Tensor
    z_loss: torch.Tensor
    tokens_per_expert: torch.Tensor  # [E], float, detached
    entropy: torch.Tensor  # mean router entropy (nats), detached
    dropped_share: torch.Tensor | None = None  # share of the N*T copies over capacity (None when dropless)

    @property
    def load_cv(self) -> torch.Tensor:
        """Coefficient of variation of tokens per expert (0 = perfectly balanced)."""
        n = self.tokens_per_expert
        return n.std(unbiased=False) / n.mean().clamp_min(1e-9)


def route(
    logits: torch.Tensor,
    top_k: int,
    routing: str,
    norm_topk_prob: bool = False,
    scaling_factor: float = 1.0,
    bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return (weights [N,T], expert ids [N,T], probs over all experts [N,E]) from fp32 logits.

    softmax_topk: softmax over all E, keep the T largest, no renormalisation (arXiv 2410.07524 sec. 3.3).
    topk_softmax: keep the T largest logits, softmax over those T (Mixtral).
    sigmoid_topk: a sigmoid per expert, keep the T largest (DeepSeek-V3, arXiv 2412.19437 eq. 15-16).
    ``bias`` [E] (aux-loss-free balancing) is added to the scores top-T picks from, for the choice only: the
    weights are the unbiased scores (Megatron-Core ``topk_routing_with_score_function``). Then the weights are
    optionally renormalised over the T chosen and multiplied by ``scaling_factor``. ``probs`` are what the
    balance loss and the entropy read: the softmax, or for sigmoid the scores normalised over E (Megatron).
    """
    if routing not in ROUTINGS:
        raise ConfigError(f"moe.routing={routing!r} is not one of {ROUTINGS}")
    probs = logits.softmax(dim=-1) if routing != "sigmoid_topk" else None
    if routing == "softmax_topk" and bias is None:
        weights, experts = probs.topk(top_k, dim=-1)
    elif routing == "topk_softmax":
        if bias is None:
            top_logits, experts = logits.topk(top_k, dim=-1)
        else:
            experts = (logits + bias).topk(top_k, dim=-1).indices
            top_logits = logits.gather(-1, experts)
        weights = top_logits.softmax(dim=-1)
    else:  # a score per expert: the softmax's probs or the sigmoid's; top-T of the (biased) scores
        scores = probs if probs is not None else logits.sigmoid()
        experts = (scores if bias is None else scores + bias).topk(top_k, dim=-1).indices
        weights = scores.gather(-1, experts)
        if probs is None:
            probs = scores / (scores.sum(-1, keepdim=True) + 1e-20)
    if norm_topk_prob and routing != "topk_softmax":  # topk_softmax's weights sum to 1 already
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    if scaling_factor != 1.0:
        weights = weights * scaling_factor
    return weights, experts, probs


class _MixedLinear(torch.autograd.Function):
    """``x @ w.T`` with bf16/fp16 operands and an fp32 result (cuBLAS accumulates in fp32 either way).

    Only the router weight is rounded to the compute dtype, as autocast does for every other linear;
    the logits stay fp32 for the softmax and top-k. It saves the fp32 copy of the activations (and its
    fp32 gradient) that an fp32 router needs: ~7% of an E8G1T2 layer's time on H100.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w)
        return torch.mm(x, w.t(), out_dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w = ctx.saved_tensors
        g = grad.to(x.dtype)
        if torch.compiler.is_compiling() and w.shape[0] <= 16:
            # few experts: E multiply-adds per element, which torch.compile fuses with the dispatch
            # gradient that x also receives; as a GEMM (K=E) it took a copy of that gradient and an
            # accumulating GEMM (~0.1 ms per E8G1T2 layer at 16k tokens on H100)
            grad_x = sum(grad[:, e, None] * w[e].float() for e in range(w.shape[0])).to(x.dtype)
        else:
            grad_x = torch.mm(g, w)
        return grad_x, torch.mm(g.t(), x, out_dtype=torch.float32)


def router_logits(x: torch.Tensor, weight: torch.Tensor, precision: str = "mixed") -> torch.Tensor:
    """fp32 router logits [N, E] for tokens ``x`` [N, d].

    ``mixed``: on CUDA with bf16/fp16 activations, the activations as they are times the weight in
    their dtype, fp32 out (what Megatron's and torchtitan's routers do, with fp32 logits); elsewhere
    it is the fp32 product. ``fp32``: both operands cast to fp32 (exact fp32 routing, slower).
    The weight's gradient is fp32 in both.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        if precision == "mixed" and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16):
            return _MixedLinear.apply(x, weight.to(x.dtype))
        return F.linear(x.float(), weight.float())


def permute(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sort the N*T token copies by expert. Returns (order, inverse, tokens_per_expert), no host sync.

    ``rows[order]`` sorts token copies by expert; ``sorted_rows[inverse]`` puts them back.
    """
    flat = experts.reshape(-1)
    # narrow sort keys: the radix sort makes one pass per key byte (int64 ids cost 8 passes; on H100
    # uint8 keys sorted 131k ids in 54 us instead of 138 us)
    keys = flat.to(torch.uint8 if num_experts <= 256 else torch.int16 if num_experts <= 2**15 else torch.int32)
    order = torch.argsort(keys, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    return order, inverse, counts


def permute_capacity(
    experts: torch.Tensor, weights: torch.Tensor, num_experts: int, capacity: int, policy: str, batch: int = 1
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`permute` with a per-expert capacity C. Returns (order, inverse, tokens_per_expert, kept_per_expert).

    Each expert keeps min(count, C) of its copies (Megatron-Core ``apply_router_token_dropping``): ``probs``
    the largest routing weights (ties to the earlier copy), ``position`` the earliest tokens, by sequence
    position first and then by sequence in the micro-batch (Megatron's [seq, batch] token order, so a full
    expert drops the latest positions of every sequence, not the last sequences). ``order`` lists each expert's
    kept copies, expert by expert, then every dropped copy; ``tokens_per_expert`` counts every routed copy
    (the demand the aux loss and load stats read), ``kept_per_expert`` the computed ones. No host sync.
    """
    n, t = experts.shape
    flat = experts.reshape(-1)
    dev = flat.device
    if policy == "probs":
        pre = torch.argsort(-weights.detach().reshape(-1).float(), stable=True)
    elif policy == "position":  # the N = batch x seq tokens ranked by (position, sequence)
        tok = torch.arange(n, device=dev).view(batch, n // batch).t().reshape(-1)
        pre = (tok[:, None] * t + torch.arange(t, device=dev)).reshape(-1)
    else:
        raise ConfigError(f"moe.drop_policy={policy!r} is not one of {DROP_POLICIES}")
    key_dtype = torch.uint8 if num_experts < 256 else torch.int32
    by_expert = pre[torch.argsort(flat[pre].to(key_dtype), stable=True)]  # each expert's copies, best first
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat, torch.ones_like(flat))
    starts = counts.cumsum(0) - counts
    keep_sorted = torch.arange(n * t, device=dev) - starts[flat[by_expert]] < capacity
    keep = torch.empty_like(keep_sorted).scatter_(0, by_expert, keep_sorted)
    order = torch.argsort(torch.where(keep, flat, num_experts).to(key_dtype), stable=True)  # dropped ones last
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=dev))
    return order, inverse, counts, counts.clamp_max(capacity)


def _sum_copies(rows: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Sum [N, T, d] over T (optionally weighted by [N, T]) in fp32 (or wider), written as T explicit
    terms: torch.compile turns this into one pointwise kernel with T loads per element, where a
    ``sum(1)`` over the strided T axis became a reduction kernel running at under half the memory
    bandwidth (profiled on an E64G8T8 layer, H100). Eager PyTorch would run those T terms as ~3T kernels with fp32
    temporaries, so outside torch.compile it is one fused multiply and sum (fp32 accumulation).

    Casts are made only where the dtype changes: with fp32 rows, torch.compile (2.11) traces no-op casts
    into a graph whose backward returns zero gradients."""
    if not torch.compiler.is_compiling():
        if weights is None:
            return rows.sum(1)
        return torch.bmm(weights.to(rows.dtype).unsqueeze(1), rows).squeeze(1)
    acc_dtype = torch.promote_types(rows.dtype, torch.float32)
    acc = None
    for k in range(rows.shape[1]):
        term = rows[:, k] if rows.dtype == acc_dtype else rows[:, k].to(acc_dtype)
        if weights is not None:
            term = term * weights[:, k, None]
        acc = term if acc is None else acc + term
    return acc if acc.dtype == rows.dtype else acc.to(rows.dtype)


class _Dispatch(torch.autograd.Function):
    """The T copies of each token, sorted by expert, read straight from the tokens (``x[order // T]``),
    without materialising the [N*T, d] expanded copy first. Backward: un-sort by the inverse
    permutation and sum each token's T copies."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
        ctx.save_for_backward(inverse)
        ctx.top_k = top_k
        return x.index_select(0, order // top_k if top_k > 1 else order)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (inverse,) = ctx.saved_tensors
        g = grad.index_select(0, inverse)
        if ctx.top_k > 1:
            g = _sum_copies(g.view(-1, ctx.top_k, grad.shape[-1]))
        return g, None, None, None


def dispatch(x: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, top_k: int) -> torch.Tensor:
    """Token copies sorted by expert: row i is token ``order[i] // top_k``."""
    return _Dispatch.apply(x, order, inverse, top_k)


class _Combine(torch.autograd.Function):
    """``y[n] = sum_k weights[n, k] * out_sorted[inverse[n*T + k]]`` with fp32 accumulation.

    The backward is written out because autograd's version of it costs two extra passes over the
    [N*T, d] copies: it built the copies' gradient in token order and then permuted it into expert
    order (~10% of an E64G8T8 layer's time on H100). Here the gradient of sorted copy i,
    ``grad_y[order[i] // T] * weight``, is gathered straight into expert order, and the weights'
    gradient is each copy's output dotted with its token's ``grad_y``: one pass each."""

    @staticmethod
    def forward(
        ctx, out_sorted: torch.Tensor, weights: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor
    ) -> torch.Tensor:
        n, t = weights.shape
        ctx.save_for_backward(out_sorted, weights, order, inverse)
        return _sum_copies(out_sorted.index_select(0, inverse).view(n, t, -1), weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_sorted, weights, order, inverse = ctx.saved_tensors
        n, t = weights.shape
        # both gradients, always: training needs both
        g = grad.index_select(0, order // t if t > 1 else order)
        w = weights.reshape(-1).index_select(0, order).unsqueeze(1)
        rows = out_sorted.index_select(0, inverse).view(n, t, -1)
        if torch.compiler.is_compiling():  # fp32 products, each fused into one kernel
            grad_out = (g.to(w.dtype) * w).to(out_sorted.dtype)
            grad_weights = (rows.to(weights.dtype) * grad.to(weights.dtype).unsqueeze(1)).sum(-1)
        else:  # eager: no fp32 [N*T, d] temporaries, as the bmm this replaces
            grad_out = g * w.to(g.dtype)
            grad_weights = torch.bmm(rows, grad.to(rows.dtype).unsqueeze(2)).squeeze(2).to(weights.dtype)
        return grad_out, grad_weights, None, None


def unpermute(
    out_sorted: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Put expert outputs back in token order and sum each token's T outputs with their fp32 weights."""
    return _Combine.apply(out_sorted, weights.float(), order, inverse)


def _grouped_mm(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    fn = getattr(F, "grouped_mm", None) or torch._grouped_mm
    return fn(a, b, offs=offs)


class GroupedExperts(nn.Module):
    """E MLP experts stored stacked: ``w1`` [E, (2)f_e, d] ([gate; up] rows for SwiGLU), ``w2`` [E, d, f_e].

    The layout is each expert's nn.Linear weight stacked, the same as HF's MoE classes in memory.
    """

    def __init__(self, num_experts: int, d_model: int, d_expert: int, activation: str, backend: str = "auto"):
        super().__init__()
        self.gated = activation == "swiglu"
        self.num_experts, self.d_model, self.d_expert = num_experts, d_model, d_expert
        self.backend = backend
        self.w1 = nn.Parameter(torch.empty(num_experts, (2 if self.gated else 1) * d_expert, d_model))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_model, d_expert))
        nn.init.normal_(self.w1, std=0.02)
        nn.init.normal_(self.w2, std=0.02)

    def resolved_backend(self, x: torch.Tensor) -> str:
        if self.backend != "auto":
            return self.backend
        return "grouped_mm" if x.is_cuda and x.dtype == torch.bfloat16 else "loop"

    def forward(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """``x_sorted``: token copies sorted by expert; ``counts``: how many go to each expert."""
        w1, w2 = self.w1.to(x_sorted.dtype), self.w2.to(x_sorted.dtype)
        if self.resolved_backend(x_sorted) == "grouped_mm":
            offs = counts.cumsum(0).to(torch.int32)
            h = mlp_activation(_grouped_mm(x_sorted, w1.transpose(-2, -1), offs), self.gated)
            return _grouped_mm(h, w2.transpose(-2, -1), offs)
        outs = []  # portable path: one matmul pair per expert (host sync on counts)
        for e, chunk in enumerate(torch.split(x_sorted, counts.tolist())):  # torch.split: AOT-cacheable
            outs.append(mlp_activation(chunk @ w1[e].t(), self.gated) @ w2[e].t())
        return torch.cat(outs)


class MoE(nn.Module):
    """Router + top-T dispatch to :class:`GroupedExperts` (dropless, or capped at ``capacity_factor``), plus
    the shared experts every token passes through. Returns (output, RouterAux)."""

    def __init__(self, d_model: int, d_ff: int, activation: str, cfg: MoEConfig):
        super().__init__()
        cfg.validate(d_ff)
        self.cfg = cfg
        self.activation = activation
        self.router = nn.Linear(d_model, cfg.num_experts, bias=False)
        nn.init.normal_(self.router.weight, std=cfg.router_init_std)
        self.experts = GroupedExperts(cfg.num_experts, d_model, d_ff // cfg.granularity, activation, cfg.expert_backend)
        # the S shared experts as one MLP of width S*F/G: a sum of S experts is one MLP holding their hidden units
        self.shared = (
            MLP(d_model, cfg.shared_experts * (d_ff // cfg.granularity), activation) if cfg.shared_experts else None
        )
        self._init_balancing()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterAux]:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xc = x2
        if torch.is_autocast_enabled(x.device.type):
            # The residual stream is fp32 under autocast; the experts run in the autocast dtype, as a
            # dense MLP's nn.Linear would. Casting once here (not per expert) halves the bytes that
            # dispatch moves and lets the grouped-GEMM path run (it needs bf16 operands).
            xc = x2.to(torch.get_autocast_dtype(x.device.type))
        precision = self.cfg.router_precision
        logits = router_logits(x2 if precision == "fp32" else xc, self.router.weight, precision)
        c = self.cfg
        weights, experts, probs = route(
            logits, c.top_k, c.routing, c.norm_topk_prob, float(c.topk_scaling_factor), self.selection_bias
        )
        capacity = c.capacity(x2.shape[0])
        if capacity is None:
            order, inverse, counts = permute(experts, c.num_experts)
            kept = None
        else:
            batch = shape[0] if len(shape) == 3 else 1
            order, inverse, counts, kept = permute_capacity(
                experts, weights, c.num_experts, capacity, c.drop_policy, batch
            )
        x_sorted = dispatch(xc, order, inverse, c.top_k)
        out_sorted = self.experts(x_sorted, counts) if kept is None else self._kept_experts(x_sorted, kept)
        y = unpermute(out_sorted, order, inverse, weights)
        if self.shared is not None:
            y = y + self.shared(xc).to(y.dtype)
        aux = self._aux(logits, probs, counts, experts, shape)
        if kept is not None:
            aux.dropped_share = 1.0 - kept.sum().float().detach() / experts.numel()
        return y.view(shape), aux

    def _kept_experts(self, x_sorted: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The experts on the kept copies only (sorted first), zeros for the dropped ones: a dropped copy adds
        nothing to its token, whose residual carries it.

        Grouped GEMM: the groups end at the kept count, so the dropped rows lie past the last offset, where the
        kernel writes nothing in the output or in the input's gradient (uninitialized memory: pytorch#154557,
        torchtitan#1237). A select (not a product: NaN-safe) zeroes both; the shapes stay static, with no host
        sync, so torch.compile keeps the layer in one graph."""
        if self.experts.resolved_backend(x_sorted) != "grouped_mm":
            return self._kept_loop(x_sorted, kept)
        live = (torch.arange(x_sorted.shape[0], device=x_sorted.device) < kept.sum())[:, None]
        out = self.experts(torch.where(live, x_sorted, 0), kept)
        return torch.where(live, out, 0)

    @torch.compiler.disable
    def _kept_loop(self, x_sorted: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
        """The per-expert loop on the kept rows, which one host sync sizes (eager under torch.compile)."""
        n = int(kept.sum())
        out = self.experts(x_sorted[:n], kept)
        return torch.cat([out, out.new_zeros(x_sorted.shape[0] - n, out.shape[1])])

    def _aux(
        self, logits: torch.Tensor, probs: torch.Tensor, counts: torch.Tensor, experts: torch.Tensor, shape
    ) -> RouterAux:
        """The balance loss ``moe.load_balancing`` names (:meth:`_balance`) and the router z-loss
        mean(logsumexp^2) (ST-MoE)."""
        load_balance = self._balance(probs, counts, experts, shape)
        z_loss = torch.logsumexp(logits, dim=-1).square().mean()
        coef = self.cfg.aux_loss_coef if self.cfg.load_balancing in AUX_LOSSES else 0.0
        loss = coef * load_balance + self.cfg.z_loss_coef * z_loss
        if coef == 0.0:
            load_balance = load_balance.detach()  # still reported (moe/aux_loss), no gradient
        with torch.no_grad():
            entropy = -(probs * probs.clamp_min(1e-20).log()).sum(-1).mean()
        return RouterAux(loss, load_balance, z_loss, counts.detach().float(), entropy)

    # load balancing: the balance losses, the aux-loss-free expert bias and the load they read

    def _init_balancing(self) -> None:
        """``step_load`` [E]: token copies per expert since the last optimizer step, summed over ranks (what
        global_aux_loss and expert_bias read); ``expert_bias`` [E] (expert_bias only): a buffer, so it is in
        the checkpoint and not in the optimizer. Both fp32 whatever the model's dtype (1e-3 steps vanish in bf16)."""
        e = self.cfg.num_experts
        self.register_buffer("step_load", torch.zeros(e), persistent=False)
        if self.cfg.load_balancing == "expert_bias":
            self.register_buffer("expert_bias", torch.zeros(e))

    @property
    def selection_bias(self) -> torch.Tensor | None:
        return self.expert_bias if self.cfg.load_balancing == "expert_bias" else None

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.bfloat16()`` ...: the balancing buffers follow the device, never the dtype."""
        kept = {n: getattr(self, n) for n in ("step_load", "expert_bias") if getattr(self, n, None) is not None}
        super()._apply(fn, recurse)
        for name, old in kept.items():
            new = getattr(self, name)
            if new.dtype != torch.float32:
                setattr(self, name, old.to(new.device))
        return self

    @torch.no_grad()
    def reset_balancing(self) -> None:
        """Zero bias and load (a layer built on the meta device holds whatever its memory held)."""
        self.step_load.zero_()
        if self.selection_bias is not None:
            self.expert_bias.zero_()

    def _balance(self, probs: torch.Tensor, counts: torch.Tensor, experts: torch.Tensor, shape) -> torch.Tensor:
        """Switch/GShard load balance E * sum_e f_e P_e (f_e: share of the token copies routed to e, P_e: mean
        router prob), over the statistics ``moe.load_balancing`` names: the micro-batch (aux_loss, and the
        reported value of expert_bias / none), each sequence (seq_aux_loss, averaged over sequences) or f_e over
        the global batch so far (global_aux_loss: this optimizer step's micro-batches on every rank, arXiv
        2501.11873; P_e stays local, so DDP's gradient average makes it global). As Megatron-Core's router."""
        e = self.cfg.num_experts
        if self.cfg.load_balancing == "seq_aux_loss":
            return seq_load_balance(probs, experts, shape[0] if len(shape) == 3 else 1, e)
        frac = counts.float() / counts.sum().clamp_min(1)
        if self.cfg.load_balancing == "global_aux_loss" and self.training:
            load = self.step_load + all_reduce_sum(counts.float())
            frac = load / load.sum().clamp_min(1)
        return e * (frac * probs.mean(0)).sum()

    @torch.no_grad()
    def record_load(self, counts: torch.Tensor) -> None:
        """Add one micro-batch's copies per expert (summed over ranks) to ``step_load``."""
        self.step_load += counts.float()

    @torch.no_grad()
    def end_step(self) -> torch.Tensor:
        """After an optimizer step: expert_bias += bias_update_rate * sign(mean load - load) (DeepSeek-V3 sec.
        2.1.2; Megatron ``get_updated_expert_bias``), from the step's load summed over ranks, so every rank
        moves its bias alike; then the load restarts. Returns the step's load cv (over the global batch)."""
        load = self.step_load
        cv = load.std(unbiased=False) / load.mean().clamp_min(1e-9)
        if self.selection_bias is not None and load.sum() > 0:
            self.expert_bias += float(self.cfg.bias_update_rate) * torch.sign(load.mean() - load)
        load.zero_()
        return cv


AUX_LOSSES = ("aux_loss", "seq_aux_loss", "global_aux_loss")  # the balancings that add coef * balance to the loss


def seq_load_balance(probs: torch.Tensor, experts: torch.Tensor, batch: int, num_experts: int) -> torch.Tensor:
    """Sequence-wise balance loss: E * sum_e f_e P_e within each of ``batch`` sequences, averaged over them
    (DeepSeek-V3 eq. 17-20; Megatron ``seq_aux_loss``). probs [N, E], experts [N, T], N = batch x L."""
    p = probs.view(batch, -1, num_experts).mean(1)
    ids = experts.reshape(batch, -1)
    f = torch.zeros(batch, num_experts, device=probs.device).scatter_add_(
        1, ids, torch.ones_like(ids, dtype=torch.float)
    )
    return num_experts * (f / ids.shape[1] * p).sum(1).mean()


@torch.compiler.disable
def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over the ranks of the default process group (``t`` itself on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    t = t.clone()
    dist.all_reduce(t)
    return t


def moe_modules(model: nn.Module) -> list[MoE]:
    """The MoE layers of ``model``, in layer order (the order of a forward's RouterAux list)."""
    return [m for m in model.modules() if isinstance(m, MoE)]


def tracks_load(model: nn.Module) -> bool:
    """Whether the model's balancing reads the global batch's load (global_aux_loss or expert_bias)."""
    return any(m.cfg.load_balancing in ("global_aux_loss", "expert_bias") for m in moe_modules(model))


@torch.no_grad()
def record_loads(layers: list[MoE], counts: list[torch.Tensor]) -> None:
    """After a micro-batch's backward: each layer's copies per expert, summed over ranks in one all_reduce,
    into its ``step_load`` (after backward, so an activation-checkpointing recompute sees the same load)."""
    if layers:
        total = all_reduce_sum(torch.stack([c.float() for c in counts]))
        for layer, row in zip(layers, total):
            layer.record_load(row)
