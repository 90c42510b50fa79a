"""Dense Llama-style decoder (RMSNorm, RoPE, GQA through SDPA, SwiGLU or squared-ReLU MLP).

Plain PyTorch: no Hydra, no Lightning. A block's ``mlp`` is either a dense :class:`MLP` or a
:class:`harness.moe.MoE`; upcycling swaps one for the other (``harness.upcycle``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from harness.compile_cache import share_compiled_graphs
from harness.errors import ConfigError
from harness.mlp import MLP
from harness.moe import MoE

ACTIVATIONS = ("swiglu", "relu2")


@dataclass
class ModelConfig:
    """Shape of the dense decoder. ``d_ff`` is the dense MLP hidden width f."""

    vocab_size: int = 4096
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    d_ff: int = 256
    head_dim: int | None = None
    activation: str = "swiglu"
    max_seq_len: int = 128
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    qkv_bias: bool = False
    init_std: float = 0.02
    name: str = field(default="custom", compare=False)
    hf_path: str | None = None  # set when the weights come from a Hugging Face checkpoint folder

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.d_model // self.n_heads
        self.validate()

    def validate(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ConfigError(f"model.activation={self.activation!r} is not one of {ACTIVATIONS}")
        for key in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len"):
            if int(getattr(self, key)) <= 0:
                raise ConfigError(f"model.{key}={getattr(self, key)!r} must be a positive integer")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model.n_heads={self.n_heads} must be a multiple of model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model.head_dim={self.head_dim} must be even for RoPE")

    @property
    def gated(self) -> bool:
        return self.activation == "swiglu"


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        out = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (out * self.weight.float()).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables in the 'rotate half' layout used by HF Llama checkpoints."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    freqs = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x.float() * cos + rotated.float() * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp: nn.Module = MLP(cfg.d_model, cfg.d_ff, cfg.activation)

    def forward(self, x, cos, sin, recompute: str | None = None):
        """``recompute`` (activation checkpointing inside the block, so that torch.compile of the block traces
        it): ``mlp`` keeps attention's activations and recomputes the MLP or MoE layer in backward (its hidden
        activations are the block's largest); ``selective`` keeps every matmul and attention output and
        recomputes the cheap elementwise work between them (norms, RoPE, activations, routing glue)."""
        if recompute == "selective":
            return checkpoint(self._body, x, cos, sin, False, use_reentrant=False, context_fn=_selective_context)
        return self._body(x, cos, sin, recompute == "mlp")

    def _body(self, x, cos, sin, recompute_mlp: bool):
        x = x + self.attn(self.attn_norm(x), cos, sin)
        h = checkpoint(self._mlp, x, use_reentrant=False) if recompute_mlp else self._mlp(x)
        aux = None
        if isinstance(h, tuple):  # MoE returns (output, RouterAux)
            h, aux = h
        return x + h, aux

    def _mlp(self, x):
        return self.mlp(self.mlp_norm(x))


def _saved_ops() -> set:
    """The ops whose outputs selective checkpointing keeps: matmuls and attention (costly to recompute)."""
    aten = torch.ops.aten
    names = (
        "mm",
        "addmm",
        "bmm",
        "_grouped_mm",
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    )
    return {getattr(aten, n).default for n in names if hasattr(aten, n)}


_SAVED_OPS = _saved_ops()


def _selective_policy(ctx, op, *args, **kwargs):
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


@dataclass
class DecoderOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    router: list = field(default_factory=list)  # RouterAux per MoE layer, in layer order


class Decoder(nn.Module):
    """Decoder-only LM. ``forward(idx, targets)`` returns logits, LM loss and summed MoE aux loss."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        # activation checkpointing: None | "full" (whole blocks) | "mlp" | "selective" (see Block.forward)
        self.activation_checkpointing: str | bool | None = None
        self.reset_parameters()

    def compile_blocks(self, **kwargs) -> None:
        """``torch.compile`` each block in place (fuses norms, RoPE, activations, routing glue).

        Blocks share one compiled graph (parameters are graph inputs), so compile time does not
        grow with depth; state_dict keys are unchanged. The graphs go to torch's on-disk caches, MoE
        graphs included (:mod:`harness.compile_cache`), for the next process to load.
        """
        share_compiled_graphs()
        for block in self.blocks:
            block.compile(**kwargs)

    def reset_parameters(self) -> None:
        """GPT-2 style init: N(0, std), output projections scaled by 1/sqrt(2 n_layers)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if p.dim() < 2:
                nn.init.zeros_(p) if name.endswith("bias") else nn.init.ones_(p)
            elif name.endswith(("o_proj.weight", "fc2.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layers))
            else:
                nn.init.normal_(p, 0.0, std)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.blocks) if isinstance(b.mlp, MoE)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> DecoderOutput:
        t = idx.shape[1]
        if t > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {t} > model.max_seq_len={self.cfg.max_seq_len}")
        cos, sin = self.rope_cos[:t], self.rope_sin[:t]
        x = self.embed(idx)
        router, aux_loss = [], None
        mode = self.activation_checkpointing if self.training and torch.is_grad_enabled() else None
        mode = "full" if mode is True else mode or None
        for block in self.blocks:
            if mode == "full":  # the whole block recomputed in backward: least memory, ~1/3 more compute
                x, aux = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, aux = block(x, cos, sin, mode)
            if aux is not None:
                router.append(aux)
                aux_loss = aux.loss if aux_loss is None else aux_loss + aux.loss
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
        return DecoderOutput(logits=logits, loss=loss, aux_loss=aux_loss, router=router)
