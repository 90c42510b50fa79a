"""What a training step logs costs the GPU nothing: Lightning turns a Python number given to ``self.log`` into a
tensor on the module's device, a blocking copy that waits for the GPU's queue (a stream sync per number, per
step). So every value LitLM logs is a tensor already: the device's own, or a CPU tensor for what the host knows
(tokens, FLOPs, tokens/s, MFU, learning rate). The numbers themselves stay those of the run. And no value of a
training step goes to the progress bar through Lightning, which reads every such value to a Python number after
every batch (``.item()``: a host sync a step, the bar shown or not); the bar reads the loss when it redraws."""

import pytest
import torch

from harness.lit import LitLM, OptimConfig
from harness.model import Decoder
from harness.moe import MoEConfig
from harness.upcycle import Recipe, upcycle

from helpers.fit import quiet_trainer, token_batches
from helpers.models import tiny_config


class Recording(LitLM):
    """LitLM that keeps every (name, value) it hands to Lightning's logging."""

    def log(self, name, value, *args, **kwargs):
        self.logged.append((name, value))
        return super().log(name, value, *args, **kwargs)


def _fit(model: Decoder, steps: int = 3):
    torch.manual_seed(0)
    lit = Recording(
        model,
        OptimConfig(warmup_steps=1),
        total_steps=steps,
        train_flops_per_token=7,
        peak_flops=1e12,
        tokens_per_step=64,
    )
    lit.logged = []
    batches = token_batches(steps)
    trainer = quiet_trainer(steps, val_check_interval=steps, num_sanity_val_steps=0)
    loader = torch.utils.data.DataLoader(batches, batch_size=None)
    trainer.fit(lit, train_dataloaders=loader, val_dataloaders=loader)
    return lit, trainer


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_every_logged_value_is_a_tensor_and_the_host_numbers_are_right(kind):
    torch.manual_seed(0)
    model = Decoder(tiny_config())
    if kind == "moe":
        model = upcycle(model, MoEConfig(num_experts=4, top_k=2), Recipe())
    lit, trainer = _fit(model)
    names = {name for name, _ in lit.logged}
    assert {"train/tokens", "flops/train_total", "perf/tokens_per_s", "perf/mfu", "lr", "val/loss"} <= names
    numbers = sorted({name for name, value in lit.logged if not isinstance(value, torch.Tensor)})
    assert not numbers, f"logged as Python numbers (a device copy and stream sync each on a GPU): {numbers}"
    metrics = trainer.callback_metrics
    assert metrics["train/tokens"].item() == 3 * 64  # the last step's tokens seen
    lrs = [v.item() for n, v in lit.logged if n == "lr"]  # each step's rate, before its update
    assert lrs == pytest.approx([lit.optim.lr * lit.optim.lr_factor(s, 3) for s in range(3)], rel=1e-6)
    tps = [v.item() for n, v in lit.logged if n == "perf/tokens_per_s"]
    mfu = [v.item() for n, v in lit.logged if n == "perf/mfu"]
    assert all(t > 0 for t in tps) and mfu == pytest.approx([t * 7 / 1e12 for t in tps], rel=1e-6)


def test_no_training_value_goes_through_lightnings_progress_bar_metrics_and_the_bar_still_shows_the_loss():
    torch.manual_seed(0)
    lit, trainer = _fit(upcycle(Decoder(tiny_config()), MoEConfig(num_experts=4, top_k=2), Recipe()))
    per_batch = sorted(k for k in trainer.progress_bar_metrics if not k.startswith("val/"))
    assert not per_batch, f"read to a Python number after every batch (a host sync a step): {per_batch}"
    from harness.console import StepProgressBar

    shown = StepProgressBar().get_metrics(trainer, lit)
    assert list(shown)[:2] == ["loss", "val/loss"] and float(shown["loss"]) == pytest.approx(lit.last_loss.item(), 1e-2)


def test_the_bar_redraws_on_its_interval_only_not_after_every_validation(capsys):
    """Into a log file the bar is redrawn every 30 s: a line a redraw. Lightning redraws the train bar after every
    validation; here a new val/loss waits for the bar's next redraw (the first and the last step draw regardless)."""
    import lightning as L

    from harness.console import StepProgressBar

    torch.manual_seed(0)
    steps = 12
    lit = LitLM(
        Decoder(tiny_config()),
        OptimConfig(warmup_steps=1),
        total_steps=steps,
        train_flops_per_token=7,
        peak_flops=1e12,
        tokens_per_step=64,
    )
    bar = StepProgressBar()
    bar.interval = 1e9  # no redraw for time's sake in this fit
    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[bar],
        val_check_interval=2,
        num_sanity_val_steps=0,
    )
    loader = torch.utils.data.DataLoader(token_batches(steps), batch_size=None)
    trainer.fit(lit, train_dataloaders=loader, val_dataloaders=loader)
    captured = capsys.readouterr()
    draws = [d for d in (captured.out + captured.err).replace("\n", "\r").split("\r") if d.startswith("train")]
    between = [d for d in draws if not (" 0/12 " in d or " 12/12 " in d)]
    assert not between, between  # none at the 6 validations (steps 2, 4, ..., 12)
    assert "val/loss" in draws[-1], draws  # the last validation's loss, shown at the last step
