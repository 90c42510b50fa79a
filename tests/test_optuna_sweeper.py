"""The Optuna Hydra sweeper: search space parsing, resume after SIGKILL, pruning from validation."""

import multiprocessing
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from hydra_plugins.upcycle_optuna_sweeper.optuna_sweeper import _open_storage, to_distribution

from helpers.e2e import FAST, ROOT, results, run_cli

SEARCH = [
    "-m",
    "hparams_search=lr",
    "hydra.sweeper.n_trials=3",
    "hydra.sweeper.heartbeat_interval=1",
    "hydra.sweeper.grace_period=2",
]


@pytest.mark.parametrize(
    "line, expected",
    [
        ("optim.lr=tag(log, interval(3e-4, 3e-2))", FloatDistribution(3e-4, 3e-2, log=True)),
        ("optim.lr=interval(0.1, 0.5)", FloatDistribution(0.1, 0.5)),
        ("optim.warmup_steps=range(0, 60, 20)", IntDistribution(0, 40, step=20)),
        ("moe.top_k=tag(int, interval(1, 4))", IntDistribution(1, 4)),
        ("routing=choice(softmax_topk, topk_softmax)", CategoricalDistribution(["softmax_topk", "topk_softmax"])),
        ("seed=0,1,2", CategoricalDistribution([0, 1, 2])),
    ],
)
def test_hydra_sweep_syntax_maps_to_optuna_distributions(line, expected):
    assert to_distribution(OverridesParser.create().parse_overrides([line])[0]) == expected


def _open_at(url: str, start: float) -> str:
    while time.time() < start:  # every process opens the storage at the same instant
        pass
    try:
        _open_storage(lambda: RDBStorage(url))
        return "ok"
    except Exception as e:
        return repr(e)[:200]


def test_processes_opening_a_new_study_database_at_once_all_get_it(tmp_path):
    """A sweep and whatever polls its study (a dashboard, a second worker) create a new SQLite study
    together: the losers of the table/version race must retry, not crash the sweep (CI saw one die)."""
    with multiprocessing.get_context("spawn").Pool(6) as pool:
        for rep in range(3):
            url, start = f"sqlite:///{tmp_path}/race{rep}.db", time.time() + 1.5
            assert pool.starmap(_open_at, [(url, start)] * 6) == ["ok"] * 6


def _study(logs):
    return optuna.load_study(study_name="optuna_lr", storage=f"sqlite:///{logs}/optuna/optuna_lr.db")


def _states(logs):
    try:
        trials = _study(logs).get_trials(deepcopy=False)
    except Exception:  # the database is not there yet
        return []
    return [t.state for t in trials]


@pytest.mark.slow
def test_killed_study_restarts_and_continues_the_same_study(env, tmp_path):
    run_cli(env, tmp_path, "train.tokens=1000")  # warm the shared dense-base cache outside the timed part
    cmd = [sys.executable, "run.py", *SEARCH, *FAST, "train.tokens=96000"]
    log = (tmp_path / "search.log").open("w")
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, "UPCYCLE_LOGS": str(tmp_path)},
        start_new_session=True,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 600
    while time.time() < deadline:  # kill mid-trial: one trial finished, the next one running
        states = _states(tmp_path)
        if TrialState.COMPLETE in states and states[-1] == TrialState.RUNNING:
            time.sleep(1.5)
            break
        assert proc.poll() is None, (
            "the search ended before it could be killed:\n" + (tmp_path / "search.log").read_text()[-3000:]
        )
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    killed = _study(tmp_path).trials[-1]
    assert killed.state == TrialState.RUNNING  # what a SIGKILL leaves behind
    time.sleep(2.5)  # let its heartbeat go stale (grace_period=2)

    run_cli(env, tmp_path, *SEARCH, "train.tokens=96000")
    assert len(optuna.get_all_study_summaries(f"sqlite:///{tmp_path}/optuna/optuna_lr.db")) == 1
    study = _study(tmp_path)
    states = [t.state for t in study.trials]
    assert states.count(TrialState.COMPLETE) == 3  # the budget counts the trials done before the kill
    failed = study.trials[killed.number]
    assert failed.state == TrialState.FAIL
    retry = next(t for t in study.trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed.number)
    assert retry.params == killed.params and retry.state == TrialState.COMPLETE


@pytest.mark.slow
def test_trials_are_pruned_from_the_validation_loop(env, tmp_path):
    """With a cold cache: the first trial pretrains the dense base, which is a cache every trial shares, so it
    is never pruned (it was: the trials reported the base's pretraining losses and never upcycled)."""
    cold = {**env, "UPCYCLE_CACHE": str(tmp_path / "cache")}
    run_cli(
        cold,
        tmp_path,
        *SEARCH,
        "train.tokens=48000",  # prune as soon as val/loss > 0: every trial
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials",
        "~hydra.sweeper.pruner.n_warmup_steps",
        "+hydra.sweeper.pruner.upper=0.0",
    )
    study = _study(tmp_path)
    assert [t.state for t in study.trials] == [TrialState.PRUNED] * 3
    assert all(list(t.intermediate_values) == [10] for t in study.trials)  # reported at step 10 (val_every)
    assert list((tmp_path / "cache" / "dense").glob("*/meta.json"))  # the base finished
    jobs = [p.parent for p in (tmp_path / "multirun" / "optuna_lr").glob("*/results.json")]
    assert len(jobs) == 3 and all(results(j)["status"] == "pruned" for j in jobs)
    assert all(results(j)["error"].startswith("TrialPruned: pruned at step 10") for j in jobs)
    assert not any("traceback" in results(j) for j in jobs)  # an outcome of the search, not a crash
    # each job ran its trial's exact value; its folder shows it to 6 digits (the cfg hash tells runs apart)
    assert sorted(results(j)["config"]["optim"]["lr"] for j in jobs) == sorted(
        t.params["optim.lr"] for t in study.trials
    )
    for j in jobs:
        lr = next(part for part in j.name.split(",") if part.startswith("optim.lr="))[len("optim.lr=") :]
        assert float(lr) == float(f"{results(j)['config']['optim']['lr']:.6g}") and len(lr) <= 12, j.name
        assert "training the MoE" in (j / "run.log").read_text()  # the trial upcycled: the pruned stage is the MoE's


@pytest.mark.slow
def test_the_dense_baselines_after_a_trial_are_not_pruned(env, tmp_path):
    """A trial is scored on its MoE run (47 steps here); the iso-FLOP dense continuation after it runs longer
    and must neither report to the trial nor be pruned by it (a pruner that starts at step 48 would)."""
    run_cli(
        env,
        tmp_path,
        *SEARCH,
        "hydra.sweeper.n_trials=1",
        "train.tokens=48000",
        "iso_flop_baseline=true",
        "hydra.sweeper.pruner._target_=optuna.pruners.ThresholdPruner",
        "~hydra.sweeper.pruner.n_startup_trials",
        "hydra.sweeper.pruner.n_warmup_steps=48",
        "+hydra.sweeper.pruner.upper=0.0",
    )
    (trial,) = _study(tmp_path).trials
    (job,) = [p.parent for p in (tmp_path / "multirun" / "optuna_lr").glob("*/results.json")]
    res = results(job)
    assert trial.state == TrialState.COMPLETE and res["status"] == "complete", res.get("error")
    assert res["steps"] == 47 and list(trial.intermediate_values) == [10, 20, 30, 40]
    assert res["dense_iso"]["tokens"] > res["tokens"]  # the continuation ran past step 48, unpruned
    assert trial.value == pytest.approx(res["val_loss"])


def test_long_override_lists_give_short_stable_job_folders():
    from harness.identity import MAX_DIRNAME, short_dirname

    short = "routing=topk_softmax,seed=1"
    assert short_dirname(short) == short
    long = ",".join(f"key{i}=value{i}" for i in range(40))
    name = short_dirname(long)
    assert len(name) <= MAX_DIRNAME and name == short_dirname(long) and name != short_dirname(long + "x")


@pytest.mark.slow
def test_a_study_name_reused_under_another_config_stops_before_any_trial(env, tmp_path):
    one = [*SEARCH, "hydra.sweeper.n_trials=1", "iso_flop_baseline=false"]
    run_cli(env, tmp_path, *one, "train.tokens=1000")
    proc = run_cli(env, tmp_path, *one, "train.tokens=2000", check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("config error: optuna study 'optuna_lr'"), proc.stderr[-2000:]
    assert "holds trials of another config" in last and "Traceback" not in proc.stderr
    assert len(_study(tmp_path).trials) == 1  # nothing was asked or run under the other config
    again = run_cli(env, tmp_path, *one, "train.tokens=1000")  # the study's own config still continues it
    assert "1/1 trials used" in again.stdout + again.stderr
