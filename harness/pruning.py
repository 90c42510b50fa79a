"""Optuna pruning from the Lightning validation loop, for jobs launched by the Optuna sweeper.

The sweeper gives each job ``optuna.trial_number``; the job re-opens that trial from the shared
storage and reports ``val/loss`` at every validation. optuna-integration's callback reports per
*epoch*; our runs are one long epoch validated every ``train.val_every`` steps, so this subclass
reports per *global step* instead (rank 0 decides; the decision is broadcast to every rank).
"""

from __future__ import annotations

import optuna
from omegaconf import DictConfig
from optuna_integration import PyTorchLightningPruningCallback


class StepPruningCallback(PyTorchLightningPruningCallback):
    def on_validation_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
            return
        step, value = trainer.global_step, float(trainer.callback_metrics[self.monitor])
        prune = False
        if trainer.is_global_zero:
            self._trial.report(value, step=step)
            prune = self._trial.should_prune()
        prune = trainer.strategy.broadcast(prune)
        if prune:
            raise optuna.TrialPruned(f"pruned at step {step} ({self.monitor}={value:.4f})")


def _sweeper_pruner(node: dict | None = None) -> optuna.pruners.BasePruner | None:
    """The pruner the sweeper was configured with (a study's pruner is not kept in its storage);
    ``node`` is its config when running outside Hydra (a multi-device worker)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.utils import instantiate

    if node is None and HydraConfig.initialized():
        node = HydraConfig.get().sweeper.get("pruner")
    return instantiate(node) if node else None


def trial_for_job(cfg: DictConfig, pruner: dict | None = None) -> optuna.Trial | None:
    """The running trial this job evaluates, or None outside an Optuna sweep."""
    ocfg = cfg.get("optuna")
    if not ocfg or ocfg.get("trial_number") is None or not ocfg.get("storage"):
        return None
    study = optuna.load_study(study_name=ocfg.study_name, storage=ocfg.storage, pruner=_sweeper_pruner(pruner))
    trial_id = study._storage.get_trial_id_from_study_id_trial_number(study._study_id, int(ocfg.trial_number))
    return optuna.Trial(study, trial_id)


def pruning_callbacks(cfg: DictConfig, pruner: dict | None = None) -> list:
    trial = trial_for_job(cfg, pruner)
    return [] if trial is None else [StepPruningCallback(trial, monitor="val/loss")]
