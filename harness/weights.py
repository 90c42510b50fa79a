"""Where a finished stage's trained weights live: its ``last.ckpt`` (with the optimizer, to resume), or, for a
stage that saved no checkpoints but whose weights the eval stage scores, a bare state dict in ``weights.pt``."""

from __future__ import annotations

from pathlib import Path

import torch

WEIGHTS = "weights.pt"  # a finished model's state dict where it kept no last.ckpt (train.save_checkpoints=false)


def wants_weights(cfg) -> bool:
    """Whether a finished stage must keep its weights: the eval stage scores it and no last.ckpt will hold them."""
    return bool((cfg.get("eval") or {}).get("tasks")) and not bool(cfg.train.save_checkpoints)


def save_weights(model: torch.nn.Module, out_dir: Path) -> None:
    tmp = out_dir / (WEIGHTS + ".tmp")
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, tmp)
    tmp.replace(out_dir / WEIGHTS)


def trained_state(out_dir: Path) -> dict | None:
    """The trained weights of a finished stage folder (names as ``Decoder.state_dict``): its ``last.ckpt``, else
    its ``weights.pt``; None when it kept neither."""
    ckpt, weights = out_dir / "checkpoints" / "last.ckpt", out_dir / WEIGHTS
    if ckpt.exists():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
        return {k.removeprefix("model."): v for k, v in state.items()}
    if weights.exists():
        return torch.load(weights, map_location="cpu", weights_only=True)
    return None
