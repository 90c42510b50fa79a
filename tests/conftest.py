import pytest
import torch

from harness.model import Decoder, ModelConfig


def tiny_config(activation: str = "swiglu", **kw) -> ModelConfig:
    base = dict(
        vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, activation=activation, max_seq_len=16
    )
    base.update(kw)
    return ModelConfig(**base)


@pytest.fixture(params=["swiglu", "relu2"])
def activation(request):
    return request.param


@pytest.fixture
def dense(activation):
    torch.manual_seed(0)
    return Decoder(tiny_config(activation)).eval()


@pytest.fixture
def tokens():
    return torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(1))
