"""Tiny model configs for fast core tests."""

from harness.model import ModelConfig


def tiny_config(activation: str = "swiglu", **kw) -> ModelConfig:
    base = dict(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, activation=activation, max_seq_len=16
    )
    base.update(kw)
    return ModelConfig(**base)
