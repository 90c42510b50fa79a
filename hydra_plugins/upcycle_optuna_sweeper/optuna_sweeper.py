"""A Hydra Sweeper that asks Optuna for trials, launches them as Hydra jobs and tells the results.

Resumable: the study lives in an RDB storage (SQLite by default). A worker records a heartbeat
for each trial it runs; when a worker is killed, the next worker to start marks its trials failed
(once they are ``grace_period`` seconds silent) and re-enqueues their parameters, so the same job
folder is reused and the run resumes from its last checkpoint.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from hydra.core.plugins import Plugins
from hydra.core.utils import JobStatus
from hydra.plugins.sweeper import Sweeper
from hydra.utils import instantiate
from omegaconf import OmegaConf
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
from optuna.trial import TrialState

from hydra_plugins.upcycle_optuna_sweeper.config import OptunaSweeperConf  # noqa: F401 (registers the config)

log = logging.getLogger(__name__)
TRIAL_KEY = "optuna.trial_number"  # the override each job gets; harness.train reports to this trial


def to_distribution(override: Override) -> BaseDistribution:
    """Hydra sweep syntax -> Optuna distribution: ``tag(log, ...)`` makes an interval log-uniform,
    ``tag(int, ...)`` integer."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return CategoricalDistribution([v for v in override.sweep_iterator(transformer=Transformer.encode)])
    if isinstance(value, RangeSweep):
        start, stop, step = value.start, value.stop, value.step
        if all(isinstance(v, int) for v in (start, stop, step)):
            return IntDistribution(start, start + step * ((stop - start - 1) // step), step=step)
        n = math.ceil((stop - start) / step)
        return FloatDistribution(start, start + step * (n - 1), step=step)
    if isinstance(value, IntervalSweep):
        log_scale = "log" in value.tags
        if "int" in value.tags:  # Hydra parses interval bounds as floats; tag(int, ...) asks for ints
            return IntDistribution(int(value.start), int(value.end), log=log_scale)
        return FloatDistribution(float(value.start), float(value.end), log=log_scale)
    raise ValueError(f"hydra.sweeper.params: {override.input_line!r} is not choice/range/interval")


def _build(node):
    """Hydra instantiates the sweeper recursively, so sampler/pruner usually arrive built already."""
    if node is None or isinstance(node, (optuna.samplers.BaseSampler, optuna.pruners.BasePruner)):
        return node
    return instantiate(node)


def _format(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def _open_storage(make, attempts: int = 5):
    """Open the study's RDB storage, retrying briefly: when several processes (parallel sweep workers,
    a dashboard, a test polling it) open a new SQLite study at once, all of them try to create its
    tables and stamp its schema version, and the losers get an OperationalError ("table ... already
    exists" / "database is locked") or an IntegrityError (the version row is already there)."""
    from sqlalchemy.exc import IntegrityError, OperationalError

    for i in range(attempts):
        try:
            return make()
        except (OperationalError, IntegrityError):
            if i == attempts - 1:
                raise
            time.sleep(0.5 * (i + 1))


class OptunaSweeper(Sweeper):
    def __init__(
        self,
        storage,
        study_name,
        direction,
        n_trials,
        n_jobs,
        sampler,
        pruner,
        params,
        heartbeat_interval,
        grace_period,
        max_retry,
    ):
        super().__init__()
        self.storage_url, self.study_name, self.direction = storage, study_name, direction
        self.n_trials, self.n_jobs = int(n_trials), int(n_jobs)
        self.sampler_cfg, self.pruner_cfg = sampler, pruner
        self.params = dict(params or {})
        self.heartbeat_interval = int(heartbeat_interval)
        self.grace_period = int(grace_period) if grace_period else 2 * self.heartbeat_interval
        self.max_retry = int(max_retry)
        if self.n_trials < 1 or self.n_jobs < 1:
            raise ValueError(f"hydra.sweeper.n_trials={n_trials} / n_jobs={n_jobs} must be >= 1")

    def setup(self, *, hydra_context, task_function, config) -> None:
        self.config, self.hydra_context = config, hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config
        )

    # -- search space -----------------------------------------------------------------------------
    def _split(self, arguments: list[str]) -> tuple[dict[str, BaseDistribution], list[str]]:
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        lines = [f"{k}={v}" for k, v in self.params.items() if v is not None] + list(arguments)
        space, fixed = {}, []
        for ov in parser.parse_overrides(lines):
            if ov.is_sweep_override():
                space[ov.get_key_element()] = to_distribution(ov)
            else:
                fixed.append(ov.input_line)
        if not space:
            raise ValueError("optuna sweeper: no search space (set hydra.sweeper.params or pass a sweep override)")
        return space, fixed

    def _study(self) -> optuna.Study:
        url = self.storage_url
        if url and url.startswith("sqlite:///"):
            Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
        storage = None
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)  # heartbeat/retry
        # we record heartbeats ourselves (``_heartbeat``), outside Study.optimize, which the warning assumes
        warnings.filterwarnings("ignore", message=".*Heartbeat of storage is supposed to be used.*")
        if url:
            retry = RetryHeartbeatStaleTrialCallback(max_retry=self.max_retry)
            storage = _open_storage(
                lambda: RDBStorage(
                    url,
                    heartbeat_interval=self.heartbeat_interval,
                    grace_period=self.grace_period,
                    heartbeat_stale_trial_callback=retry,
                )
            )
        study = optuna.create_study(
            storage=storage,
            study_name=self.study_name,
            direction=self.direction,
            sampler=_build(self.sampler_cfg),
            pruner=_build(self.pruner_cfg),
            load_if_exists=True,
        )
        self._check_owner(study)
        if storage is not None:
            fail_stale_trials(study)  # trials of a killed worker: FAIL, params re-enqueued
        return study

    def _check_owner(self, study: optuna.Study) -> None:
        """A study holds the trials of one experiment config (its fixed part: scale, model, budget, seed...);
        the same name under another config would mix their losses, so it stops here with one line."""
        from harness.identity import config_hash

        key, stored = config_hash(self.config), study.user_attrs.get("config_hash")
        if stored is None:
            study.set_user_attr("config_hash", key)
        elif stored != key:
            raise SystemExit(
                f"config error: optuna study {study.study_name!r} in {self.storage_url} holds trials of another "
                f"config (cfg={stored}; this one is cfg={key}): give this search its own name=..., or delete "
                "that storage to start over"
            )

    @staticmethod
    def _used(study: optuna.Study) -> int:
        """Trials that count against n_trials: finished or running, minus failures that were retried."""
        trials = study.get_trials(deepcopy=False)
        retried = {RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials} - {None}
        return sum(
            1
            for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
            or (t.state == TrialState.FAIL and t.number not in retried)
        )

    @contextmanager
    def _heartbeat(self, study: optuna.Study, trials: list[optuna.Trial]):
        storage = study._storage
        backend = getattr(storage, "_backend", storage)
        if not isinstance(backend, RDBStorage):
            yield
            return
        stop = threading.Event()

        def beat():
            while not stop.is_set():
                for t in trials:
                    backend.record_heartbeat(t._trial_id)
                stop.wait(self.heartbeat_interval)

        thread = threading.Thread(target=beat, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    # -- the loop ---------------------------------------------------------------------------------
    def sweep(self, arguments: list[str]) -> list:
        space, fixed = self._split(arguments)
        study = self._study()
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        log.info(
            "optuna study %r (%s): %d/%d trials used",
            study.study_name,
            self.storage_url or "in memory",
            self._used(study),
            self.n_trials,
        )
        returns, job_idx = [], 0
        while (left := self.n_trials - self._used(study)) > 0:
            trials = [study.ask(space) for _ in range(min(self.n_jobs, left))]
            batch = [
                fixed + [f"{k}={_format(v)}" for k, v in t.params.items()] + [f"++{TRIAL_KEY}={t.number}"]
                for t in trials
            ]
            self.validate_batch_is_legal(batch)
            with self._heartbeat(study, trials):
                results = self.launcher.launch(batch, initial_job_idx=job_idx)
            for trial, ret in zip(trials, results):
                self._tell(study, trial, ret)
            job_idx += len(batch)
            returns.append(results)
        self._summarise(study, sweep_dir)
        return returns

    def _tell(self, study: optuna.Study, trial: optuna.Trial, ret) -> None:
        value = ret._return_value
        if ret.status == JobStatus.COMPLETED and isinstance(value, (int, float)) and math.isfinite(value):
            study.tell(trial, float(value))
        elif isinstance(value, optuna.TrialPruned):
            study.tell(trial, state=TrialState.PRUNED)
            log.info("trial %d pruned: %s", trial.number, value)
        else:  # a failed job never stops the search; its results.json says why
            study.tell(trial, state=TrialState.FAIL)
            log.warning("trial %d failed (%r); the search goes on", trial.number, value)

    def _summarise(self, study: optuna.Study, sweep_dir: Path) -> None:
        done = [t for t in study.trials if t.state == TrialState.COMPLETE]
        out = {
            "study_name": study.study_name,
            "storage": self.storage_url,
            "direction": self.direction,
            "n_trials": len(study.trials),
            "states": {s.name: sum(t.state == s for t in study.trials) for s in TrialState},
        }
        if done:
            out.update(best_value=study.best_value, best_params=study.best_params, best_trial=study.best_trial.number)
            log.info("best value %.4f with %s", study.best_value, study.best_params)
        OmegaConf.save(OmegaConf.create(out), sweep_dir / "optimization_results.yaml")
