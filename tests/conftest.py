"""Fixtures every test module can use, and the skip of GPU tests where there is no CUDA device."""

import os

import pytest
import torch

from harness.model import Decoder

from helpers.models import tiny_config


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


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    return {
        **os.environ,
        "UPCYCLE_CACHE": str(cache),
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }


def pytest_runtest_setup(item):
    """``@pytest.mark.gpu`` tests are skipped, never faked, without a CUDA device."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
