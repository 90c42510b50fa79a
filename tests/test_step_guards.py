"""The training step's numerical guards with fused AdamW: a bad step's update is skipped on the device (the
optimizer's found_inf) and the host reads its guards one step later, so a GPU step never waits for the host.
Fused AdamW runs on CPU too, so the deferred path is tested here on real training, against the synchronous one."""

import copy

import pytest
import torch

from harness.errors import ConfigError
from harness.lit import LitLM, OptimConfig
from harness.model import Decoder

from helpers.fit import quiet_trainer, token_batches
from helpers.models import tiny_config


class Faulty(LitLM):
    """LitLM whose loss turns to NaN at one step: the fault a diverging run meets."""

    def __init__(self, *args, nan_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_at, self.snapshots = nan_at, {}

    def on_train_batch_start(self, batch, batch_idx):
        self.snapshots[self.global_step] = copy.deepcopy(self.model.state_dict())
        if self.global_step == self.nan_at:  # the embedding's output, so the loss itself is NaN
            self._hook = self.model.embed.register_forward_hook(lambda mod, inp, out: out * float("nan"))

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if getattr(self, "_hook", None) is not None:
            self._hook.remove()
            self._hook = None


def _fit(fused: bool, steps: int = 6, nan_at: int = -1, max_grad_norm=None):
    torch.manual_seed(0)
    lit = Faulty(
        Decoder(tiny_config("swiglu")),
        OptimConfig(warmup_steps=0, fused=fused),
        total_steps=steps,
        train_flops_per_token=1,
        max_grad_norm=max_grad_norm,
        nan_at=nan_at,
    )
    batches = token_batches(steps)
    trainer = quiet_trainer(steps)
    error = None
    try:
        trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    except FloatingPointError as e:
        error = str(e)
    return lit, error


def test_fused_guards_train_as_the_synchronous_ones_when_nothing_goes_wrong():
    fused, err_f = _fit(True)
    plain, err_p = _fit(False)
    assert err_f is None and err_p is None
    assert fused.trainer.optimizers[0].defaults["fused"] and not plain.trainer.optimizers[0].defaults["fused"]
    for (name, a), b in zip(fused.model.state_dict().items(), plain.model.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert not torch.equal(fused.model.embed.weight, fused.snapshots[0]["embed.weight"])  # it trained


@pytest.mark.parametrize("nan_at", [2, 5])  # 5: the last step, read once the fit ends
def test_a_non_finite_step_never_reaches_the_weights_and_is_named(nan_at):
    lit, error = _fit(True, nan_at=nan_at)
    assert error is not None and f"non-finite training loss at step {nan_at}: its update skipped" in error
    # the weights are those the bad step started from: its update was skipped (at most one more step ran)
    final = lit.model.state_dict()
    for name, before in lit.snapshots[nan_at].items():
        assert torch.isfinite(final[name]).all(), name
        torch.testing.assert_close(final[name], before, rtol=0, atol=0, msg=name)
    assert lit.global_step <= nan_at + 1


def test_the_synchronous_guard_stops_before_the_update():
    lit, error = _fit(False, nan_at=2)
    assert error is not None and "non-finite training loss at step 2: stopping before the update" in error
    assert lit.global_step == 2


def test_a_gradient_norm_over_the_limit_is_skipped_on_the_device_and_named():
    lit, error = _fit(True, max_grad_norm=1e-9)
    assert error is not None and "at step 0 is not finite or exceeds train.max_grad_norm=1e-09" in error
    for name, before in lit.snapshots[0].items():
        torch.testing.assert_close(lit.model.state_dict()[name], before, rtol=0, atol=0, msg=name)


def test_a_bad_fused_value_stops_in_one_line():
    with pytest.raises(ConfigError, match="optim.fused='yes' must be auto, true or false"):
        OptimConfig(fused="yes").validate()
