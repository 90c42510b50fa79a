"""Shared WSD trunks: runs of one recipe at several token budgets share their stable phase.

Under a warmup-stable-decay schedule every step before the decay has the same learning rate whatever the
budget (``OptimConfig.decay_start``), and the training data of step i does not depend on the budget
(``RandomWindows``). So the run at budget B equals "train the stable trunk to its decay start k(B), then
decay": the trunk is trained once, checkpointed at each k, and every budget branches off it. A ladder of
budgets B1 < ... < Bn then costs the trunk to k(Bn) plus n decays, instead of B1 + ... + Bn for one cosine
run per budget (the checkpoints-and-decay method of MiniCPM, arXiv 2404.06395, and of Hägele et al.,
arXiv 2405.18392). Unlike separate cosine runs, every budget sees the same stable-phase weights.

Trunk checkpoints live in ``<cache_dir>/trunks/<key>/step_<k>.ckpt``, where the key is everything that
defines the training except its length; they are written atomically, so a crash never leaves one that a
later run trusts.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from lightning.pytorch.callbacks import Callback

log = logging.getLogger("upcycle")
_NAME = re.compile(r"step_(\d+)\.ckpt$")


def trunk_checkpoints(trunk_dir: Path) -> dict[int, Path]:
    """The trunk's complete checkpoints by step."""
    found = {}
    for path in trunk_dir.glob("step_*.ckpt"):
        m = _NAME.search(path.name)
        if m:
            found[int(m.group(1))] = path
    return found


def branch_point(trunk_dir: Path, decay_start: int) -> tuple[int, Path] | None:
    """The trunk checkpoint to start a run whose decay begins at ``decay_start``: the latest one at or
    before it (the run then trains the rest of the stable phase itself and saves it for the next budget)."""
    usable = {s: p for s, p in trunk_checkpoints(trunk_dir).items() if s <= decay_start}
    if not usable:
        return None
    step = max(usable)
    return step, usable[step]


class SaveTrunk(Callback):
    """Saves the trunk checkpoint at the decay start, before the first decayed step changes the weights."""

    def __init__(self, trunk_dir: Path, step: int):
        self.trunk_dir, self.step, self.done = Path(trunk_dir), int(step), False

    def on_train_batch_end(self, trainer, *args) -> None:
        if self.done or trainer.global_step != self.step:
            return
        self.done = True
        path = self.trunk_dir / f"step_{self.step:08d}.ckpt"
        if path.exists():
            return
        self.trunk_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, path)
            log.info("saved WSD trunk checkpoint at step %d -> %s", self.step, path)
