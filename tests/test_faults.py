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

from helpers.e2e import FAST, ROOT, kill_when, results, run_cli, start_cli

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


@pytest.mark.slow
def test_a_run_stopped_at_several_steps_then_resumed_has_the_uninterrupted_curve_in_results_and_csv(env, tmp_path):
    run_cli(env, tmp_path, *CURVE, "name=straight")
    # step 3 comes before the first checkpoint (the one saved at the stop holds no validation of step 3: none is on
    # the grid); 7 and 11 resume from the checkpoints of steps that also validated (5, then 10)
    for stop in (3, 7, 11):
        run_cli(env, tmp_path, *CURVE, "name=crashed", f"train.stop_after_steps={stop}")
        assert results(latest(tmp_path, "crashed"))["status"] == "interrupted"
    run_cli(env, tmp_path, *CURVE, "name=crashed")
    a, b = results(latest(tmp_path, "straight")), results(latest(tmp_path, "crashed"))
    assert [p["step"] for p in a["val_curve"]] == [0, 5, 10, 13]
    assert b["val_curve"] == a["val_curve"]  # every point once, bitwise on CPU
    assert b["val_loss"] == b["val_curve"][-1]["val_loss"]
    (train_a, val_a), (train_b, val_b) = csv_rows(latest(tmp_path, "straight")), csv_rows(latest(tmp_path, "crashed"))
    assert len(list(latest(tmp_path, "crashed").glob("csv/version_*"))) == 4
    assert [s for s, _ in val_a] == [4, 9] and val_b == val_a  # the CSV's step is the global step before its update
    assert [s for s, _ in train_b] == list(range(13)) and train_b == train_a


@pytest.mark.slow
def test_a_pretraining_stopped_on_purpose_says_so_in_one_line_and_the_same_command_finishes_it(env, tmp_path):
    own = {**env, "UPCYCLE_CACHE": str(tmp_path / "cache")}  # a fresh dense base, pretrained here
    args = ["method=pretrain", "pretrain.tokens=8000", "pretrain.optim.warmup_steps=1", "name=base"]
    stopped = run_cli(own, tmp_path, *args, "train.stop_after_steps=2")
    said = stopped.stdout + stopped.stderr
    assert "Traceback" not in said and "HYDRA_FULL_ERROR" not in said, said[-3000:]
    line = [x for x in said.splitlines() if "dense pretraining stopped" in x]
    # the same command would stop at step 2 again: the line names the flag to drop
    assert len(line) == 1 and line[0].endswith("run it again without train.stop_after_steps=2 to resume it"), said

    assert not (latest(tmp_path, "base") / "results.json").exists()  # no record of a base that is not there yet
    finished = run_cli(own, tmp_path, *args)
    done = results(latest(tmp_path, "base"))
    assert done["status"] == "complete" and done["steps"] > 2 and done["val_curve"][-1]["step"] == done["steps"]
    # its step 0 is the random init (ln 512 = 6.24 for a uniform guess), above every point the pretraining reached
    assert done["init_val_loss"] > max(p["val_loss"] for p in done["val_curve"]) and done["init_val_loss"] > 5.5
    assert "random init" in finished.stdout and "dense parent" not in finished.stdout  # the base has no parent


@pytest.mark.slow
def test_a_cached_dense_continuation_killed_mid_training_resumes_to_the_whole_curve(env, tmp_path):
    own = {**env, "UPCYCLE_CACHE": str(tmp_path / "cache")}
    args = ["iso_flop_baseline=true", "train.val_every=5", "train.ckpt_every=5"]
    run_cli(own, tmp_path, *args, "name=straight")
    straight = results(latest(tmp_path, "straight"))["dense_iso"]
    entry = Path(straight["cache_dir"])
    entry.rename(entry.with_name(entry.name + ".straight"))  # the next run trains the continuation again
    kill_when(start_cli(own, tmp_path, *args, "name=killed", quiet=True), entry / "checkpoints" / "last.ckpt")
    assert not (entry / "results.json").exists()
    run_cli(own, tmp_path, *args, "name=killed")
    resumed = results(latest(tmp_path, "killed"))["dense_iso"]
    assert [p["step"] for p in straight["val_curve"]][:3] == [0, 5, 10]
    assert resumed["val_curve"] == straight["val_curve"] and resumed["val_loss"] == straight["val_loss"]


TINY = ["train.tokens=2000", "iso_flop_baseline=false"]
HOLD = "+callbacks.hold._target_=helpers.hold.Hold"


def held_env(env, hold: Path) -> dict:
    hold.mkdir(parents=True, exist_ok=True)  # the loser can stop before the winner reaches its hold and makes it
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
    try:
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
    finally:  # a failed assert must not leave a held run behind
        (tmp_path / "hold").mkdir(exist_ok=True)
        (tmp_path / "hold" / "release").write_text("")
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()


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
        f"export error: {run_dir} is not finished (status interrupted at step 1): export only finished runs "
        "(--allow-partial exports anyway)"
    ]
    assert not (tmp_path / "hf").exists()
    partial = export(run_dir, tmp_path / "partial", "--allow-partial")
    assert partial.returncode == 0, partial.stderr[-2000:]
    config = __import__("json").loads((tmp_path / "partial" / "config.json").read_text())
    assert config["upcycle_partial_export"].endswith("is not finished (status interrupted at step 1)")
    run_cli(env, tmp_path, *args)
    before = sorted((tmp_path / "runs" / "exp").iterdir())
    bad = run_cli(env, tmp_path, *args, "data.seq_len=100000", check=False)
    line = bad.stderr.strip().splitlines()[-1]
    assert bad.returncode != 0 and line.startswith("config error:") and "data.seq_len=100000" in line, line
    assert sorted((tmp_path / "runs" / "exp").iterdir()) == before and latest(tmp_path, "exp") == run_dir
    done = export(latest(tmp_path, "exp"), tmp_path / "hf")
    assert done.returncode == 0, done.stderr[-2000:]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and len(set(modes.values())) == 1, modes


def namespaced() -> bool:
    """Unprivileged mount namespaces (``unshare -Urm``): a real read-only bind mount and a real small tmpfs."""
    try:
        return subprocess.run(["unshare", "-Urm", "true"], capture_output=True).returncode == 0
    except OSError:
        return False


needs_mounts = pytest.mark.skipif(not namespaced(), reason="needs unprivileged mount namespaces (unshare -Urm)")


def in_namespace(env, logs: Path, records: Path, *steps) -> subprocess.CompletedProcess:
    """Each step in one mount namespace: a shell line (str) or a run.py invocation (list of args), whose exit code
    the namespace's stdout prints (``rc<code>``) and whose output goes to ``records/<i>.err`` (outside any mount
    made there)."""
    import shlex

    lines = []
    for i, step in enumerate(steps):
        if isinstance(step, str):
            lines.append(step)
            continue
        cmd = " ".join(shlex.quote(a) for a in [sys.executable, "run.py", *FAST, *step])
        lines.append(f"{cmd} > {shlex.quote(str(records / f'{i}.err'))} 2>&1; echo rc$?")
    records.mkdir(parents=True, exist_ok=True)
    return subprocess.run(
        ["unshare", "-Urm", "sh", "-c", "\n".join(lines)],
        cwd=ROOT,
        env={**env, "UPCYCLE_LOGS": str(logs)},
        capture_output=True,
        text=True,
        timeout=900,
    )


@needs_mounts
@pytest.mark.slow
def test_a_read_only_cache_serves_its_hits_and_a_miss_says_so_in_one_line(env, tmp_path):
    env = {**env, "UPCYCLE_CACHE": str(tmp_path / "cache")}  # its own: another test may have built the missed base
    args = ["train.tokens=2000", "iso_flop_baseline=true", "name=ro"]
    run_cli(env, tmp_path, *args)  # every stage cached
    folder, cache = latest(tmp_path, "ro"), env["UPCYCLE_CACHE"]
    ro = f"mount --bind {cache} {cache} && mount -o remount,bind,ro {cache} || exit 9"
    proc = in_namespace(env, tmp_path, tmp_path / "err", ro, [*args, "force=true"], [*args, "pretrain.tokens=4000"])
    assert proc.stdout.split() == ["rc0", "rc1"], proc.stdout + proc.stderr
    assert (
        results(folder)["status"] == "complete"
        and "force=true: moved the previous run" in (tmp_path / "err" / "1.err").read_text()
    )
    assert "dense base: cached" in (tmp_path / "err" / "1.err").read_text()
    miss = (tmp_path / "err" / "2.err").read_text().strip().splitlines()[-1]
    assert miss.startswith("error: the dense base is not in the cache and the cache is read-only here")
    assert f"(UPCYCLE_CACHE={cache})" in miss


@needs_mounts
@pytest.mark.slow
def test_a_full_disk_ends_in_one_line_claims_nothing_and_the_next_run_heals(env, tmp_path):
    """The run folder on a 3 MB tmpfs (its 10 MB checkpoint cannot fit), then the same command once the tmpfs
    has grown to 200 MB; what the folder holds is copied out before the namespace (and its tmpfs) goes."""
    args = ["train.tokens=8000", "train.ckpt_every=1", "iso_flop_baseline=false", "name=full"]
    run_cli(env, tmp_path / "warm", *args)  # the cache (another file system) holds every shared stage
    logs, out = tmp_path / "logs", tmp_path / "out"
    logs.mkdir()
    folder = f"{logs}/runs/full/latest"
    proc = in_namespace(
        env,
        logs,
        tmp_path / "err",
        f"mount -t tmpfs -o size=3m tmpfs {logs} || exit 9",
        args,
        f"mkdir -p {out}; cp -r {logs}/runs/full {out}/first; mount -o remount,size=200m {logs}",
        args,
        f"cp -r {folder}/. {out}/",
    )
    assert proc.stdout.split() == ["rc1", "rc0"], proc.stdout + proc.stderr
    line = (tmp_path / "err" / "1.err").read_text().strip().splitlines()[-1]
    assert line.startswith(f"error: disk full: could not write {logs}/runs/full/") and "last.ckpt" in line, line
    assert "bytes free on its file system" in line and "run the same command again" in line
    (first,) = [p for p in (out / "first").iterdir() if p.is_dir() and not p.is_symlink()]
    assert (first / "identity.json").exists()  # the folder was claimed, and nothing in it claims completion
    assert not (first / "results.json").exists() or results(first)["status"] == "failed"
    healed = (tmp_path / "err" / "3.err").read_text()
    assert "is a damaged checkpoint" in healed or "resuming from" in healed or "training the MoE" in healed
    assert results(out)["status"] == "complete"


@pytest.mark.slow
def test_a_hand_edited_record_is_recomputed_the_flop_excess_is_recorded_and_a_sweep_skips_a_finished_run(env, tmp_path):
    import json

    args = ["train.tokens=2000", "iso_flop_baseline=true", "name=rec"]
    first = run_cli(env, tmp_path, *args)
    folder = latest(tmp_path, "rec")
    good = results(folder)
    iso = good["dense_iso"]
    assert iso["flop_excess"] == iso["train_flops"] / good["train_flops"] - 1 and iso["flop_excess"] > 0.01
    assert f"trains {100 * iso['flop_excess']:.1f}% more FLOPs than the MoE" in first.stdout + first.stderr
    (folder / "results.json").write_text(json.dumps({**good, "val_loss": 0.0}))  # its curve still ends elsewhere
    again = run_cli(env, tmp_path, *args)
    out = again.stdout + again.stderr
    assert "results.json is inconsistent (val_loss 0.0 is not its val_curve's last point" in out
    assert "skipping" not in out and len(list(folder.glob("results.json.corrupt-*"))) == 1
    assert results(folder)["val_loss"] == good["val_loss"] and results(folder)["val_curve"] == good["val_curve"]
    sweep = run_cli(env, tmp_path, "-m", *args, "seed=0")  # the same config as a one-job sweep
    out = sweep.stdout + sweep.stderr
    assert f"{folder / 'results.json'} holds this config's complete run" in out and "training the MoE" not in out
    # the skipped job's folder points at the record, so a report over the sweep's folder has its row
    from analysis.collect import collect

    job = next(p for p in (tmp_path / "multirun" / "rec").iterdir() if p.is_dir() and "cfg=" in p.name)
    assert (job / "results.json").is_symlink() and results(job) == results(folder)
    assert list(collect(str(tmp_path / "multirun" / "rec")).val_loss) == [good["val_loss"]]


@pytest.mark.parametrize(
    "argv,line",
    [
        (["", "out"], "export error: run_dir is empty: give a run folder and an output folder"),
        (["{tmp}/run", " "], "export error: out_dir is empty: give a run folder and an output folder"),
        (["{tmp}/nowhere", "out"], "export error: {tmp}/nowhere is not a run folder (no such directory)"),
    ],
)
def test_export_names_an_empty_or_missing_folder_in_one_line(tmp_path, argv, line):
    from harness.export import main

    (tmp_path / "run").mkdir()
    with pytest.raises(SystemExit) as stop:
        main([a.format(tmp=tmp_path) for a in argv])
    assert str(stop.value) == line.format(tmp=tmp_path)
