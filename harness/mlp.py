"""The dense MLP and its activation: the piece both the dense decoder and the MoE experts are made of."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def mlp_activation(h: torch.Tensor, gated: bool) -> torch.Tensor:
    """SwiGLU on [gate | up] halves, or squared ReLU (Nemotron) on the single projection."""
    if gated:
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up
    return F.relu(h).square()


class MLP(nn.Module):
    """Dense MLP. ``fc1`` holds [gate; up] rows for SwiGLU (2f x d) or the single up (f x d)."""

    def __init__(self, d_model: int, d_ff: int, activation: str):
        super().__init__()
        self.gated = activation == "swiglu"
        self.activation = activation
        self.d_ff = d_ff
        self.fc1 = nn.Linear(d_model, (2 if self.gated else 1) * d_ff, bias=False)
        self.fc2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(mlp_activation(self.fc1(x), self.gated))
