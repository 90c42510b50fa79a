"""Several processes per job (DDP over gloo on CPU) through the real entry point, the launcher's
commands, and the SLURM launcher config."""

import pytest
from omegaconf import OmegaConf

from harness import launch
from harness.errors import ConfigError

from helpers.e2e import ROOT, kill_after_first_checkpoint, results, run_cli

# 127 validation windows: no world size or batch divides them (padding and a short last batch must not weigh)
DENSE = ["method=dense", "train.tokens=12800", "train.val_every=5", "data.val_tokens=8128"]


@pytest.mark.slow
def test_ddp_matches_one_process_and_resumes_after_sigkill(env, tmp_path):
    run_cli(env, tmp_path, *DENSE, "name=one")
    run_cli(env, tmp_path, *DENSE, "name=two", "trainer=ddp_cpu")
    one, two = results(tmp_path / "runs" / "one" / "latest"), results(tmp_path / "runs" / "two" / "latest")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert one["tokens"] == two["tokens"] and one["steps"] == two["steps"]  # data.batch_size is the global batch
    # same samples per step, gradients averaged over ranks: equal up to float summation order
    assert abs(one["val_loss"] - two["val_loss"]) < 1e-5
    for a, b in zip(one["val_curve"], two["val_curve"]):
        assert a["step"] == b["step"] and abs(a["val_loss"] - b["val_loss"]) < 1e-5

    # SIGKILL the job (and its workers) after a checkpoint, run the same command again: same result
    kill_after_first_checkpoint(env, tmp_path, *DENSE, "name=killed", "trainer=ddp_cpu")
    killed_dir = tmp_path / "runs" / "killed" / "latest"
    assert not (killed_dir / "results.json").exists() or results(killed_dir)["status"] != "complete"
    run_cli(env, tmp_path, *DENSE, "name=killed", "trainer=ddp_cpu")
    killed = results(killed_dir)
    assert killed["status"] == "complete" and killed["val_loss"] == two["val_loss"]  # bitwise: same world size


@pytest.mark.slow
def test_ddp_multirun_gives_each_job_its_overrides(env, tmp_path):
    run_cli(
        env,
        tmp_path,
        "-m",
        "routing=softmax_topk,topk_softmax",
        "trainer=ddp_cpu",
        "iso_flop_baseline=false",
        "train.tokens=6400",
    )
    jobs = sorted(p.parent for p in (tmp_path / "multirun" / "default").glob("*/results.json"))
    assert len(jobs) == 2
    for routing in ("softmax_topk", "topk_softmax"):
        job = next(j for j in jobs if f"routing={routing}" in j.name)
        res = results(job)
        assert res["status"] == "complete" and res["routing"] == routing and res["world_size"] == 2
        # the workers trained from this job's own config, in this job's folder
        worker_cfg = OmegaConf.load(job / "launch" / "config.yaml")
        assert worker_cfg.moe.routing == routing and worker_cfg.paths.output_dir == str(job)
        assert (job / "checkpoints" / "last.ckpt").exists() and (job / "csv").is_dir()


def test_world_size_from_trainer_config():
    ws = lambda **kw: launch.world_size(OmegaConf.create(kw))  # noqa: E731
    assert ws(accelerator="cpu", devices=2) == 2
    assert ws(accelerator="cpu", devices="auto") == 1
    assert ws(accelerator="gpu", devices=[0, 3], num_nodes=2) == 4
    with pytest.raises(ConfigError, match="trainer.devices='two'"):
        ws(devices="two")
    with pytest.raises(ConfigError, match="num_nodes=0"):
        ws(devices=1, num_nodes=0)


def test_local_workers_get_ranks_and_one_rendezvous(tmp_path):
    commands, envs = launch.worker_command(tmp_path, OmegaConf.create({"accelerator": "cpu", "devices": 3}))
    assert len(commands) == 3 and commands[0][-3:] == ["-m", "harness.worker", str(tmp_path)]
    assert [e["LOCAL_RANK"] for e in envs] == ["0", "1", "2"]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"} and len({e["MASTER_PORT"] for e in envs}) == 1


def test_multi_node_workers_start_through_srun(tmp_path, monkeypatch):
    trainer = OmegaConf.create({"accelerator": "gpu", "devices": 4, "num_nodes": 2})
    with pytest.raises(ConfigError, match="needs a SLURM allocation"):
        launch.worker_command(tmp_path, trainer)
    monkeypatch.setenv("SLURM_JOB_ID", "42")
    monkeypatch.setenv("SLURM_JOB_NUM_NODES", "2")
    (cmd,), (extra,) = launch.worker_command(tmp_path, trainer)
    assert cmd[:5] == ["srun", "--overlap", "--nodes=2", "--ntasks-per-node=4", "--kill-on-bad-exit=1"]
    assert cmd[-2:] == ["harness.worker", str(tmp_path)] and extra == {launch.WORKER_ENV: "srun"}


def test_global_batch_must_split_over_devices(env, tmp_path):
    proc = run_cli(env, tmp_path, "trainer=ddp_cpu", "data.batch_size=15", check=False)
    assert proc.returncode != 0
    assert "data.batch_size=15 (global) does not split over 2 devices" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_slurm_launcher_config_and_job_script(tmp_path, monkeypatch):
    """`hydra/launcher=slurm` resolves, and the sbatch script the real launcher would submit asks for
    what the trainer needs: one task per node (the job starts its own per-GPU workers), the GPUs,
    the time limit, the pre-timeout signal and our setup lines."""
    import submitit
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate

    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "hydra/launcher=slurm",
                "trainer=ddp",
                "trainer.num_nodes=2",
                "hydra.launcher.timeout_min=240",
                "hydra.launcher.partition=gpu",
                f"hydra.sweep.dir={tmp_path}",
            ],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher._target_.endswith("SlurmLauncher")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.config, launcher.task_function = cfg, None
    captured = {}

    def capture(executor, fn, *args):  # stands in for the submission itself (no sbatch here)
        captured["executor"] = executor
        return []

    monkeypatch.setattr(submitit.AutoExecutor, "map_array", capture)
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 1))  # no srun on this machine
    launcher.launch([["routing=softmax_topk"], ["routing=topk_softmax"]], initial_job_idx=0)
    script = captured["executor"]._executor._make_submission_file_text("python -u -m submitit.core._submit", "1")
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --time=240",
        "#SBATCH --partition=gpu",
        "#SBATCH --signal=USR2@120",
        "export NCCL_NVLS_ENABLE=0",
        "submitit.core._submit",
    ):
        assert line in script, line
    assert f"{tmp_path}/.submitit/" in script


def test_only_the_first_slurm_task_of_a_job_drives_it(monkeypatch):
    monkeypatch.delenv(launch.WORKER_ENV, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "1")
    assert launch.idle_task()
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert not launch.idle_task()
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv(launch.WORKER_ENV, "srun")  # a training worker is never idle
    assert not launch.idle_task()


@pytest.mark.slow
def test_workers_die_with_their_job_process(env, tmp_path):
    """SIGKILL the job process alone (not its process group): its workers must not live on as orphans."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from helpers.e2e import FAST

    folder = tmp_path / "runs" / "orphans"  # workers name the real run folder (latest is a link to it)
    cmd = [sys.executable, "run.py", *FAST, "method=dense", "train.tokens=400000", "name=orphans", "trainer=ddp_cpu"]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**env, "UPCYCLE_LOGS": str(tmp_path)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )

    def workers() -> list[int]:
        found = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                if str(folder).encode() in cmdline.read_bytes():
                    found.append(int(cmdline.parent.name))
            except OSError:
                pass
        return found

    # a hang guard, not a speed test: before its workers the job may tokenize the corpus and pretrain the dense
    # base (a cold cache), on cores that pytest -n shares with other tests
    deadline = time.time() + 600
    while len(workers()) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    assert len(workers()) == 2, "the job did not start its two workers"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 20
    while workers() and time.time() < deadline:
        time.sleep(0.2)
    assert not workers()


def test_ddp_strategy_knobs():
    from lightning.pytorch.strategies import DDPStrategy

    from harness.errors import ConfigError
    from harness.strategies import ddp

    s = ddp(comm_hook="bf16", bucket_cap_mb=100)
    assert isinstance(s, DDPStrategy) and s._ddp_kwargs["gradient_as_bucket_view"] is True
    assert s._ddp_kwargs["bucket_cap_mb"] == 100 and s._ddp_comm_hook.__name__ == "bf16_compress_hook"
    with pytest.raises(ConfigError, match="comm_hook='int8'"):
        ddp(comm_hook="int8")
