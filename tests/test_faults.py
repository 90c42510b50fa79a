"""Faults a shared cluster throws, as a user meets them: run.py as a subprocess on tiny configs (a kill mid-training,
two jobs on one folder, a read-only or full disk, an export of an unfinished run, a hand-edited record)."""

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.e2e import FAST, ROOT, results, run_cli

CURVE = ["iso_flop_baseline=false", "train.val_every=5", "train.ckpt_every=5", "trainer.log_every_n_steps=1"]


def csv_rows(run_dir: Path) -> tuple[list, list]:
    """(step, train/loss) and (step, val/loss) over every CSV version of a run, in the order written."""
    train, val = [], []
    for f in sorted(run_dir.glob("csv/version_*/metrics.csv")):
        for row in csv.DictReader(f.open()):
            if row.get("train/loss"):
                train.append((int(row["step"]), float(row["train/loss"])))
            if row.get("val/loss"):
                val.append((int(row["step"]), float(row["val/loss"])))
    return train, val


def latest(logs: Path, name: str) -> Path:
    return (logs / "runs" / name / "latest").resolve()


def start_cli(env, logs, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "run.py", *FAST, *args],
        cwd=ROOT,
        env={**env, "UPCYCLE_LOGS": str(logs)},
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_when(proc: subprocess.Popen, path: Path) -> None:
    """SIGKILL the run (and every process it started) once ``path`` is a whole checkpoint."""
    from harness.io import intact_zip

    deadline = time.time() + 300
    while not (path.exists() and intact_zip(path)) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert path.exists(), "the run ended before the checkpoint appeared"


@pytest.mark.slow
def test_a_run_stopped_at_several_steps_then_resumed_has_the_uninterrupted_curve_in_results_and_csv(env, tmp_path):
    run_cli(env, tmp_path, *CURVE, "name=straight")
    for stop in (7, 11):  # each stop resumes from the checkpoint of a step that also validated (5, then 10)
        run_cli(env, tmp_path, *CURVE, "name=crashed", f"train.stop_after_steps={stop}")
        assert results(latest(tmp_path, "crashed"))["status"] == "interrupted"
    run_cli(env, tmp_path, *CURVE, "name=crashed")
    a, b = results(latest(tmp_path, "straight")), results(latest(tmp_path, "crashed"))
    assert [p["step"] for p in a["val_curve"]] == [0, 5, 10, 13]
    assert b["val_curve"] == a["val_curve"]  # every point once, bitwise on CPU
    assert b["val_loss"] == b["val_curve"][-1]["val_loss"]
    (train_a, val_a), (train_b, val_b) = csv_rows(latest(tmp_path, "straight")), csv_rows(latest(tmp_path, "crashed"))
    assert len(list(latest(tmp_path, "crashed").glob("csv/version_*"))) == 3
    assert [s for s, _ in val_a] == [4, 9] and val_b == val_a  # the CSV's step is the global step before its update
    assert [s for s, _ in train_b] == list(range(13)) and train_b == train_a


@pytest.mark.slow
def test_a_cached_dense_continuation_killed_mid_training_resumes_to_the_whole_curve(env, tmp_path):
    own = {**env, "UPCYCLE_CACHE": str(tmp_path / "cache")}
    args = ["iso_flop_baseline=true", "train.val_every=5", "train.ckpt_every=5"]
    run_cli(own, tmp_path, *args, "name=straight")
    straight = results(latest(tmp_path, "straight"))["dense_iso"]
    entry = Path(straight["cache_dir"])
    entry.rename(entry.with_name(entry.name + ".straight"))  # the next run trains the continuation again
    kill_when(start_cli(own, tmp_path, *args, "name=killed"), entry / "checkpoints" / "last.ckpt")
    assert not (entry / "results.json").exists()
    run_cli(own, tmp_path, *args, "name=killed")
    resumed = results(latest(tmp_path, "killed"))["dense_iso"]
    assert [p["step"] for p in straight["val_curve"]][:3] == [0, 5, 10]
    assert resumed["val_curve"] == straight["val_curve"] and resumed["val_loss"] == straight["val_loss"]


TINY = ["train.tokens=2000", "iso_flop_baseline=false"]
HOLD = "+callbacks.hold._target_=helpers.hold.Hold"


def held_env(env, hold: Path) -> dict:
    return {
        **env,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
        "HOLD_DIR": str(hold),
    }


def wait_for(predicate, what: str) -> None:
    deadline = time.time() + 300  # a failure guard, not a measurement
    while not predicate():
        assert time.time() < deadline, what
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_started_together_on_one_config_train_it_once_and_the_other_stops_in_one_line(env, tmp_path):
    job = held_env(env, tmp_path / "hold")
    procs = [start_cli(job, tmp_path, *TINY, HOLD, "name=twice") for _ in range(2)]
    wait_for(lambda: any(p.poll() is not None for p in procs), "neither process stopped")
    loser = next(p for p in procs if p.poll() is not None)
    winner = next(p for p in procs if p is not loser)
    _, err = loser.communicate()
    folder = latest(tmp_path, "twice")
    assert loser.returncode != 0 and err.strip().splitlines()[-1] == (
        f"error: {folder} is being trained by pid {winner.pid} on {os.uname().nodename}, started "
        f"{__import__('json').loads((folder / '.owner.json').read_text())['started']}: this run stops here and "
        "leaves it alone; run the same command once that one ends to reuse its result (or resume it)"
    )
    assert winner.poll() is None and not (folder / "results.json").exists()  # the loser wrote no record
    (tmp_path / "hold" / "release").write_text("")
    winner.communicate()
    assert winner.returncode == 0 and results(folder)["status"] == "complete"
    assert len(list(folder.glob("csv/version_*"))) == 1 and len(list((tmp_path / "hold").glob("*.started"))) == 1
    again = run_cli(job, tmp_path, *TINY, HOLD, "name=twice")
    assert "is complete for this config: skipping" in again.stdout + again.stderr


@pytest.mark.slow
def test_a_killed_holder_leaves_no_stale_lock_the_next_run_takes_the_folder_over(env, tmp_path):
    job = held_env(env, tmp_path / "hold")
    proc = start_cli(job, tmp_path, *TINY, HOLD, "name=stale")
    wait_for(lambda: list((tmp_path / "hold").glob("*.started")), "the run never started training")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    folder = latest(tmp_path, "stale")
    assert (folder / ".lock").exists() and str(proc.pid) in (folder / ".owner.json").read_text()
    (tmp_path / "hold" / "release").write_text("")
    run_cli(job, tmp_path, *TINY, HOLD, "name=stale")
    assert results(folder)["status"] == "complete"


def export(run_dir: Path, out: Path, *flags):
    return subprocess.run(
        [sys.executable, "-m", "harness.export", str(run_dir), str(out), *flags],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )


@pytest.mark.slow
def test_export_refuses_an_unfinished_run_in_one_line_and_latest_skips_a_run_that_failed_its_config(env, tmp_path):
    pytest.importorskip("transformers")
    args = ["method=dense", *TINY, "train.ckpt_every=1", "name=exp"]
    run_cli(env, tmp_path, *args, "train.stop_after_steps=1")
    run_dir = latest(tmp_path, "exp")
    proc = export(run_dir, tmp_path / "hf")
    assert proc.returncode != 0 and proc.stderr.strip().splitlines() == [
        f"export error: {run_dir} is a interrupted run at step 1, not a complete one: export only finished runs "
        "(--allow-partial exports anyway)"
    ]
    assert not (tmp_path / "hf").exists()
    partial = export(run_dir, tmp_path / "partial", "--allow-partial")
    assert partial.returncode == 0, partial.stderr[-2000:]
    config = __import__("json").loads((tmp_path / "partial" / "config.json").read_text())
    assert config["upcycle_partial_export"].endswith("is a interrupted run at step 1, not a complete one")
    run_cli(env, tmp_path, *args)
    before = sorted((tmp_path / "runs" / "exp").iterdir())
    bad = run_cli(env, tmp_path, *args, "data.seq_len=100000", check=False)
    line = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode != 0 and line.startswith("config error:") and "data.seq_len" in line
    assert sorted((tmp_path / "runs" / "exp").iterdir()) == before and latest(tmp_path, "exp") == run_dir
    done = export(latest(tmp_path, "exp"), tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes
