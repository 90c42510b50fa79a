"""Exact FLOP and parameter counts for the dense decoder and its MoE variants.

Counted: every matmul (2 FLOPs per multiply-add; q/k/v/o, MLP or experts, router, LM head) and the
causal attention products QK^T and PV (query i attends to i+1 keys, so (S+1)/2 on average).
Training = 3 x forward (backward does two matmuls per forward matmul). Not counted: norms,
softmax, activations, RoPE, the embedding lookup (no matmul): together well under 1% here.

MoE layers: router + the computed routed copies + the S shared experts (width F/G each, every token).
With a capacity factor cf the routed copies counted are min(1, cf) * T per token: what the experts compute
when the load is balanced (cf >= 1: nothing dropped; cf < 1: every expert full at its capacity
cf*N*T/E, ceil rounding aside). An unbalanced router computes fewer; ``moe/dropped_share`` logs how many
fewer. The iso-FLOP dense twin gets this count, so it matches the computed copies, not the nominal T.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from harness.model import Decoder, ModelConfig
from harness.moe import MoE, MoEConfig

# the MFU denominators of the benchmarks: bf16 dense (no sparsity) FLOP/s of an H100 SXM
H100_BF16_PEAK_DATASHEET = 989e12
H100_BF16_PEAK_MEASURED = 808e12  # bf16 dense matmul measured on an H100 (benchmarks/RESULTS.md)


@dataclass(frozen=True)
class FlopCount:
    forward_per_token: int
    train_per_token: int
    params_total: int
    params_active: int


def _mlp_weights(cfg: ModelConfig, d_ff: int) -> int:
    return (3 if cfg.gated else 2) * cfg.d_model * d_ff


def count(cfg: ModelConfig, seq_len: int, moe: MoEConfig | None = None, moe_layers: Sequence[int] = ()) -> FlopCount:
    """FLOPs per token and parameter counts for ``cfg`` with MoE layers at ``moe_layers``."""
    d, hd = cfg.d_model, cfg.head_dim
    attn_w = d * hd * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)
    attn_b = hd * (cfg.n_heads + 2 * cfg.n_kv_heads) if cfg.qkv_bias else 0
    attn_scores = 2 * 2 * cfg.n_heads * hd * (seq_len + 1) / 2  # QK^T and PV, causal average
    dense_mlp = _mlp_weights(cfg, cfg.d_ff)
    moe_set = set(moe_layers) if moe is not None else set()

    matmul_active = cfg.vocab_size * d  # LM head
    params_total = params_active = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2) + d  # + final norm
    for i in range(cfg.n_layers):
        layer_params = attn_w + attn_b + 2 * d  # + two norms
        matmul_active += attn_w
        if i in moe_set:
            expert = _mlp_weights(cfg, cfg.d_ff // moe.granularity)
            router = d * moe.num_experts
            shared = moe.shared_experts * expert
            matmul_active += router + routed_copies(moe) * expert + shared
            params_total += layer_params + router + moe.num_experts * expert + shared
            params_active += layer_params + router + moe.top_k * expert + shared
        else:
            matmul_active += dense_mlp
            params_total += layer_params + dense_mlp
            params_active += layer_params + dense_mlp
    forward = 2 * matmul_active + cfg.n_layers * attn_scores
    return FlopCount(round(forward), round(3 * forward), params_total, params_active)


def routed_copies(moe: MoEConfig) -> float:
    """Routed expert copies computed per token: T dropless, min(1, cf) * T at capacity factor cf."""
    if moe.capacity_factor is None:
        return moe.top_k
    return min(1.0, float(moe.capacity_factor)) * moe.top_k


def count_model(model: Decoder, seq_len: int) -> FlopCount:
    """:func:`count` for a built model (dense, or upcycled: reads its MoE layers)."""
    layers = model.moe_layers
    moe = model.blocks[layers[0]].mlp.cfg if layers else None
    for i in layers:
        if not (isinstance(model.blocks[i].mlp, MoE) and model.blocks[i].mlp.cfg == moe):
            raise ValueError(f"block {i} is listed as an MoE layer but its MLP is not the MoE of block {layers[0]}")
    return count(model.cfg, seq_len, moe, layers)


def train_flops_per_token(
    cfg: ModelConfig, seq_len: int, moe: MoEConfig | None = None, moe_layers: Sequence[int] = ()
) -> int:
    return count(cfg, seq_len, moe, moe_layers).train_per_token


def iso_flop_tokens(moe_tokens: int, moe_flops_per_token: int, dense_flops_per_token: int) -> int:
    """Dense continuation token budget that spends the MoE run's training FLOPs (DESIGN invariant 6)."""
    return round(moe_tokens * moe_flops_per_token / dense_flops_per_token)


def mfu(tokens_per_s: float, train_flops_per_token: int, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak."""
    return tokens_per_s * train_flops_per_token / peak_flops
