"""The fp32 evaluation after a compiled fit (results.json's val_loss) runs eagerly: in eval mode at fp32 every
compiled block would trace a new graph, a recompile per evaluation that costs a short GPU job more than the pass."""

import torch
from torch._dynamo.utils import counters

from harness.lit import evaluate
from harness.model import Decoder
from harness.moe import MoEConfig
from harness.upcycle import Recipe, upcycle

from helpers.models import tiny_config


def _graphs() -> int:
    return counters["stats"]["unique_graphs"]


def test_evaluating_a_compiled_moe_traces_no_graph_and_gives_the_eager_loss():
    torch.manual_seed(0)
    moe = upcycle(Decoder(tiny_config()), MoEConfig(num_experts=8, granularity=1, top_k=2), Recipe())
    x, y = torch.randint(0, 97, (2, 3, 16)), torch.randint(0, 97, (2, 3, 16))
    loader = list(zip(x, y))
    eager = evaluate(moe, loader)
    moe.compile_blocks(backend="eager")  # dynamo traces the blocks as in training; no inductor, so it is quick
    torch._dynamo.reset()
    moe(x[0], y[0]).loss.backward()  # a training step's forward traces the training graphs
    traced = _graphs()
    assert traced > 0, "the compiled blocks traced nothing: the test would not see a recompile"
    assert evaluate(moe, loader) == eager
    assert _graphs() == traced, "evaluate traced new graphs for the compiled blocks (a recompile per evaluation)"
    assert moe.training, "evaluate leaves the model in the mode it found"
