"""The fp32 evaluation after a compiled fit (results.json's val_loss) runs eagerly: in eval mode at fp32 every
compiled block would trace a new graph, a recompile per evaluation that costs a short GPU job more than the pass."""

import torch
from torch._dynamo.utils import counters

from harness.lit import evaluate
from harness.model import Decoder
from harness.moe import MoEConfig
from harness.upcycle import Recipe, upcycle

from helpers.fit import quiet_trainer, token_batches
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


def test_validating_a_compiled_moe_in_the_fit_traces_no_graph():
    import lightning as L

    from harness.lit import LitLM, OptimConfig

    torch.manual_seed(0)
    moe = upcycle(Decoder(tiny_config()), MoEConfig(num_experts=8, granularity=1, top_k=2), Recipe())
    moe.compile_blocks(backend="eager")
    torch._dynamo.reset()
    batches = token_batches(4)
    lit = LitLM(moe, OptimConfig(warmup_steps=1), total_steps=4, train_flops_per_token=1, tokens_per_step=64)
    trainer = quiet_trainer(4, val_check_interval=2, num_sanity_val_steps=0)
    traced = []

    class Count(L.Callback):
        def on_validation_start(self, *_):
            traced.append(_graphs())

        def on_validation_end(self, *_):
            traced.append(_graphs())

    trainer.callbacks.append(Count())
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(lit, train_dataloaders=loader, val_dataloaders=loader)
    assert len(traced) == 4 and traced[0] > 0, traced  # two validations, after the training graphs were traced
    assert traced[1] == traced[0] and traced[3] == traced[2], f"a validation traced graphs: {traced}"
    assert torch.isfinite(trainer.callback_metrics["val/loss"])
