"""torch's on-disk AOT-autograd cache keeps graphs with custom autograd Functions and autocast regions once
``share_compiled_graphs`` allows it, and its key still covers the Function's backward: each run below is a
fresh process on one cache folder, as the jobs of a sweep are."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from harness.model import Decoder, ModelConfig

ROOT = Path(__file__).resolve().parents[1]

# a Function with a hand-written backward, called inside an autocast-off region (as the MoE router does)
FUNCTION = """
import torch

class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 1.5

    @staticmethod
    def backward(ctx, g):
        return g * {factor}
"""

PROBE = """
import json, sys
import torch
share = sys.argv[1] == "share"
if share:
    from harness.compile_cache import share_compiled_graphs
    share_compiled_graphs()
from harness.timing import compile_counts
import scaled

def f(x):
    with torch.autocast("cpu", enabled=False):
        y = scaled.Scale.apply(x.sin())
    return y.cos().sum()

x = torch.linspace(-1, 1, 12).view(4, 3).requires_grad_()
torch.compile(f)(x).backward()
print(json.dumps({"grad": x.grad.tolist(), **compile_counts()}))
"""


def _run(tmp: Path, factor: int, share: bool = True) -> dict:
    (tmp / "scaled.py").write_text(textwrap.dedent(FUNCTION.format(factor=factor)))
    env = {
        **os.environ,
        "PYTHONPATH": f"{tmp}{os.pathsep}{ROOT}",
        "TORCHINDUCTOR_CACHE_DIR": str(tmp / "cache"),
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    mode = "share" if share else "default"
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], env=env, cwd=tmp, capture_output=True, text=True, timeout=600
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _expected_grad(factor: int) -> torch.Tensor:
    x = torch.linspace(-1, 1, 12).view(4, 3)
    return -torch.sin(1.5 * x.sin()) * factor * x.cos()


def test_new_process_loads_the_graph_and_a_changed_backward_misses(tmp_path):
    default = _run(tmp_path, 2, share=False)
    assert default["autograd_cache_bypasses"] >= 1 and default["autograd_cache_hits"] == 0  # torch's default

    first = _run(tmp_path, 2)
    assert first["autograd_cache_misses"] == 1 and first["autograd_cache_bypasses"] == 0, first
    again = _run(tmp_path, 2)
    assert again["autograd_cache_hits"] == 1 and again["autograd_cache_misses"] == 0, again
    torch.testing.assert_close(torch.tensor(again["grad"]), _expected_grad(2))

    changed = _run(tmp_path, 3)  # same graph shape, another backward: a new key, the new gradient
    assert changed["autograd_cache_hits"] == 0 and changed["autograd_cache_misses"] == 1, changed
    torch.testing.assert_close(torch.tensor(changed["grad"]), _expected_grad(3))


def test_compile_blocks_shares_the_graphs():
    import torch._functorch.config
    import torch._inductor.config

    saved = (
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions,
        dict(torch._inductor.config.unsafe_marked_cacheable_functions),
    )
    try:
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions = False
        torch._inductor.config.unsafe_marked_cacheable_functions = {}
        Decoder(ModelConfig(vocab_size=64, d_model=32, n_layers=1, max_seq_len=16)).compile_blocks(backend="eager")
        assert torch._functorch.config.autograd_cache_allow_custom_autograd_functions
        assert "torch.amp.autocast_mode._enter_autocast" in torch._inductor.config.unsafe_marked_cacheable_functions
    finally:
        torch._functorch.config.autograd_cache_allow_custom_autograd_functions = saved[0]
        torch._inductor.config.unsafe_marked_cacheable_functions = saved[1]
