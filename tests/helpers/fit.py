"""A short Lightning fit on the CPU for the tests that drive LitLM directly: random token batches and a quiet
Trainer (no logger, checkpoints, bar or summary)."""

import lightning as L
import torch


def token_batches(n: int, seed: int = 1, vocab: int = 97, shape: tuple[int, int] = (4, 16)) -> list:
    """``n`` (input, next-token target) batches of random tokens, the same for a seed."""
    gen = torch.Generator().manual_seed(seed)
    return [(x, torch.roll(x, -1, 1)) for x in (torch.randint(0, vocab, shape, generator=gen) for _ in range(n))]


def quiet_trainer(max_steps: int, **kwargs) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )
