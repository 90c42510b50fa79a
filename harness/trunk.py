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
later run trusts. Only the latest is kept (an E8G1T2 checkpoint of the 50M base with its optimizer state is
3.2 GB): run the budgets in ascending order; a smaller budget after a larger one trains its stable phase
again from the start. A run branches off a hard link of its checkpoint, so pruning never pulls it away.
The dense pretraining's trunk (the bases at several ``pretrain.fraction``) keeps every checkpoint instead: a
dense model's is small, and a sunk-cost grid asks for its shares out of order (each cell's from-scratch
baseline is a longer base than the next cell's).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from filelock import FileLock
from lightning.pytorch.callbacks import Callback

from harness.timing import charge_checkpoint

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


def branch_point(trunk_dir: Path, decay_start: int, link: Path) -> int | None:
    """Hard-link to ``link`` the trunk checkpoint that starts a run whose decay begins at ``decay_start``: the
    latest one at or before it (the run trains the rest of the stable phase itself and saves it for the next
    budget). Returns its step, or None when the trunk has none."""
    if not trunk_dir.is_dir():
        return None
    with FileLock(str(trunk_dir / ".lock")):
        usable = {s: p for s, p in trunk_checkpoints(trunk_dir).items() if s <= decay_start}
        if not usable:
            return None
        step = max(usable)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        try:
            os.link(usable[step], link)
        except OSError:  # another file system: read it in place (pruning could then race a parallel run)
            link.symlink_to(usable[step].resolve())
        return step


class SaveTrunk(Callback):
    """Saves the trunk checkpoint at the decay start, before the first decayed step changes the weights, and after
    that step's validation when it has one (else a branch off it would miss that point of its curve)."""

    def __init__(self, trunk_dir: Path, step: int, val_every: int = 0, keep_all: bool = False):
        self.trunk_dir, self.step, self.done, self.keep_all = Path(trunk_dir), int(step), False, keep_all
        self.validates = val_every > 0 and self.step % val_every == 0

    def on_train_batch_end(self, trainer, *args) -> None:
        if not self.validates or trainer.global_step >= trainer.max_steps:
            self._save(trainer)

    def on_validation_end(self, trainer, *args) -> None:
        if self.validates:
            self._save(trainer)

    def _save(self, trainer) -> None:
        if self.done or trainer.global_step != self.step:
            return
        self.done = True
        path = self.trunk_dir / f"step_{self.step:08d}.ckpt"
        if path.exists():
            return
        self.trunk_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with charge_checkpoint(trainer):
            trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            with FileLock(str(self.trunk_dir / ".lock")):
                os.replace(tmp, path)
                for step, older in trunk_checkpoints(self.trunk_dir).items():
                    if step < self.step and not self.keep_all:
                        older.unlink()
            log.info("saved WSD trunk checkpoint at step %d -> %s", self.step, path)
