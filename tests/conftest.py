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


def threads_per_worker() -> int | None:
    """Under ``pytest -n N``: the CPU threads each worker (and each run it starts) may use, unless the user set
    OMP_NUM_THREADS. N workers that each start torch's one-thread-per-core pools oversubscribe the cores N times."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers <= 1 or "OMP_NUM_THREADS" in os.environ:
        return None
    return max(1, (os.cpu_count() or 1) // workers)


@pytest.fixture(scope="session")
def env(tmp_path_factory):
    """The environment of ``run.py`` started as a subprocess: this session's own cache (each xdist worker has its
    own), W&B offline, and no GPU: these runs test CPU numbers and console output, on a GPU box as in CI (and
    parallel workers do not all start on the one GPU)."""
    cache = tmp_path_factory.mktemp("cache")
    threads = threads_per_worker()
    return {
        **os.environ,
        "UPCYCLE_CACHE": str(cache),
        "CUDA_VISIBLE_DEVICES": "",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
        **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
    }


def pytest_configure(config):
    threads = threads_per_worker()
    if threads:
        torch.set_num_threads(threads)


def pytest_runtest_setup(item):
    """``@pytest.mark.gpu`` tests are skipped, never faked, without a CUDA device."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
