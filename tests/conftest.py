"""Fixtures every test module can use, and the skip of GPU tests where there is no CUDA device."""

import lzma
import os
from pathlib import Path

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


def _text_tokens() -> torch.Tensor:
    """A fixed snapshot of the repository's own Python source (harness/*.py at commit e7b0de1, joined in name order:
    tests/data/tiny_corpus.txt.xz) as printable-ASCII tokens (byte - 32, so ids 0..94 of the tiny vocab of 97): a
    local corpus with real structure, no download, and the same tokens whatever the harness's code is today (the
    live source made every edit of harness/ move the trained base, and with it the measured margins)."""
    text = lzma.decompress((Path(__file__).parent / "data" / "tiny_corpus.txt.xz").read_bytes()).decode("utf-8")
    ids = [b - 32 for b in text.encode("ascii", "replace") if 32 <= b < 127]
    return torch.tensor(ids, dtype=torch.long)


@pytest.fixture(scope="session")
def trained_bases() -> dict[str, Decoder]:
    """The tiny base of each activation after a short pretraining on :func:`_text_tokens` (60 AdamW steps at
    lr 1e-2, ~20 s on 2 shared cores): its loss is far below ln(97), so its MLPs matter and an upcycling that drops
    or mis-scales them moves the loss (an untrained model's loss is ~ln(vocab) whatever its MLPs do)."""
    ids = _text_tokens()
    out = {}
    for activation in ("swiglu", "relu2"):
        torch.manual_seed(0)
        model = Decoder(tiny_config(activation))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(60):
            start = torch.randint(0, len(ids) - 17, (16,), generator=gen)
            batch = torch.stack([ids[s : s + 17] for s in start.tolist()])
            loss = model(batch[:, :-1], batch[:, 1:]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        out[activation] = model.eval()
    return out


@pytest.fixture
def trained(trained_bases, activation):
    return trained_bases[activation]


@pytest.fixture
def text_tokens():
    """Two held-out-position windows of the corpus (not the training draws' exact windows)."""
    ids = _text_tokens()
    return torch.stack([ids[1000:1016], ids[5000:5016]])
