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
    """The environment of ``run.py`` started as a subprocess: this session's own cache (each xdist worker has its
    own), W&B offline, and no GPU: these runs test CPU numbers and console output, on a GPU box as in CI (and
    parallel workers do not all start on the one GPU)."""
    cache = tmp_path_factory.mktemp("cache")
    return {
        **os.environ,
        "UPCYCLE_CACHE": str(cache),
        "CUDA_VISIBLE_DEVICES": "",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "PYTHONUNBUFFERED": "1",
    }


def pytest_configure(config):
    """Under ``pytest -n N`` each worker, and every process its tests start, gets its share of the cores (unless
    OMP_NUM_THREADS is set): N workers each running torch's one-thread-per-core pools would oversubscribe them N
    times over, and the tests that wait for a run (deadlines, timeouts) would wait on the contention."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1 and "OMP_NUM_THREADS" not in os.environ:
        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def pytest_runtest_setup(item):
    """``@pytest.mark.gpu`` tests are skipped, never faked, without a CUDA device."""
    if item.get_closest_marker("gpu") and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
