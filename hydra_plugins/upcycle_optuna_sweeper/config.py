"""Registers ``hydra/sweeper=optuna`` (this package's sweeper) with Hydra's ConfigStore."""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class OptunaSweeperConf:
    """One Optuna study behind a Hydra multirun.

    ``params`` maps a config key to Hydra sweep syntax: ``choice(a,b)``, ``range(lo,hi,step)``,
    ``interval(lo,hi)``, ``tag(log, interval(lo,hi))``, ``tag(int, interval(lo,hi))``. ``n_trials`` is the
    study's total budget of finished trials: a restarted (or second, parallel) worker runs only what is left.
    """

    _target_: str = "hydra_plugins.upcycle_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    storage: Optional[str] = None  # e.g. sqlite:///logs/optuna/study.db (persistent, shareable)
    study_name: Optional[str] = None
    direction: str = "minimize"
    n_trials: int = 20
    n_jobs: int = 1  # trials asked per launcher batch (parallel with a parallel launcher)
    sampler: Any = None  # a node with _target_, e.g. optuna.samplers.TPESampler
    pruner: Any = None  # a node with _target_, e.g. optuna.pruners.MedianPruner
    params: dict = field(default_factory=dict)
    heartbeat_interval: int = 60  # seconds; a RUNNING trial silent for grace_period is failed...
    grace_period: Optional[int] = None  # ...and retried with the same params (default 2x interval)
    max_retry: int = 3


ConfigStore.instance().store(group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="upcycle")
