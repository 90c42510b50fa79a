"""A quiet console: each library line once or not at all, and a progress bar counting optimizer steps."""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings

from lightning.pytorch.callbacks import Callback, TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm

# Lightning lines that say nothing about this run (device inventory, tips, "max_steps reached")
QUIET_LOGGERS = (
    "lightning.pytorch.utilities.rank_zero",
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.accelerators.cuda",
    "lightning.pytorch.callbacks.model_summary",
    "lightning.pytorch.trainer.connectors.checkpoint_connector",  # "`weights_only` was not set" on every resume
)
QUIET_WARNINGS = (
    ".*LeafSpec.*",
    ".*smaller than the logging interval.*",
    ".*does not have many workers.*",
    ".*anonymous setting has no effect.*",
    ".*Checkpoint directory .* exists and is not empty.*",
    # our train sampler starts at the restored global step (harness/data.py), so a mid-epoch resume continues
    # the same batches (tests/test_e2e.py checks it bit for bit); Lightning cannot know that
    ".*ended before the epoch ended and your dataloader is not resumable.*",
    ".*The dirpath has changed from.*",  # a WSD branch restores the trunk's ModelCheckpoint state
)


def quiet_libraries() -> None:
    """Lightning adds its own stderr handlers beside Hydra's (every INFO line twice): drop them and let
    its records reach Hydra's handler, minus the irrelevant ones. W&B prints its own banner unless silent."""
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    for pattern in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    warnings.formatwarning = _one_line  # a warning reads as one line, not with the source line that raised it
    os.environ.setdefault("WANDB_SILENT", "true")


def _one_line(message, category, filename, lineno, line=None) -> str:
    return f"{category.__name__}: {message}\n"


class StepProgressBar(TQDMProgressBar):
    """``train 40/94 [loss, val/loss]``: optimizer steps done of the fit's max_steps. Lightning's own bar
    counts batches of an epoch and prints ``Epoch 0/-2`` for a step-bounded run."""

    def __init__(self):
        super().__init__()
        self.interval = 0.5 if sys.stderr.isatty() else 30.0  # seconds between redraws; a log file wants few
        self._shown_at = 0.0

    def on_train_epoch_start(self, trainer, *_):
        bar = self.train_progress_bar
        bar.reset(total=trainer.max_steps)
        bar.n = bar.last_print_n = trainer.global_step  # a resumed fit starts where it stopped
        bar.set_description("train")
        bar.refresh()

    def on_train_batch_end(self, trainer, pl_module, *_):
        """Redrawn at most every ``interval`` seconds (and at the last step): reading the metrics waits for the
        GPU, which a small model's step must not do every time, and a log file gets a line per redraw."""
        bar = self.train_progress_bar
        if trainer.global_step == bar.n or bar.disable:
            return
        bar.n = trainer.global_step
        now = time.monotonic()
        if now - self._shown_at >= self.interval or bar.n >= (bar.total or float("inf")):
            self._shown_at = now
            bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)
            bar.refresh()

    def on_validation_end(self, trainer, pl_module):
        """The new val/loss waits for the train bar's next redraw: Lightning's redraws it after every validation,
        a line each in a log file."""
        if self._train_progress_bar is None or trainer.state.fn != "fit":
            return super().on_validation_end(trainer, pl_module)
        self.val_progress_bar.close()
        self.reset_dataloader_idx_tracker()
        self.train_progress_bar.set_postfix(self.get_metrics(trainer, pl_module), refresh=False)

    def init_validation_tqdm(self):
        """Validation is a pause in the train bar, which then shows val/loss: a bar made disabled draws nothing
        (one disabled after it is made has already drawn its first line)."""
        return Tqdm(disable=True)

    def get_metrics(self, trainer, pl_module):
        """The last training loss (read from the device now, once a redraw) and what Lightning holds (val/loss)."""
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        loss = getattr(pl_module, "last_loss", None)
        return {"loss": f"{float(loss):.3g}"} | metrics if loss is not None else metrics


def progress_bar(enabled: bool = True) -> Callback:
    """The step bar when the trainer shows one (Lightning refuses a bar callback when it is disabled)."""
    return StepProgressBar() if enabled else Callback()
