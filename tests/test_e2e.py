"""End-to-end through the real entry point (run.py under Hydra, as a subprocess)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from harness import flops
from harness.model import ModelConfig
from harness.moe import MoEConfig

from helpers.e2e import ROOT, kill_after_first_checkpoint, results, run_cli


@pytest.mark.slow
def test_default_run_moe_vs_iso_flop_dense(env, tmp_path):
    run_cli(env, tmp_path)
    res = results(tmp_path / "runs" / "default" / "latest")
    assert res["status"] == "complete" and res["method"] == "upcycle"
    for key in (
        "val_loss",
        "best_val_loss",
        "dense_parent_val_loss",
        "init_val_loss",
        "tokens",
        "train_flops",
        "params_total",
        "params_active",
        "wall_time_s",
        "config",
    ):
        assert key in res, key
    assert res["params_total"] > res["params_active"]
    assert abs(res["init_val_loss"] / res["dense_parent_val_loss"] - 1) < 0.01  # scaled softmax_topk at step 0
    assert res["init_top_mass_uniform"] == 2 / 8 and abs(res["init_top_mass"] / (2 / 8) - 1) < 0.05  # near uniform
    iso = res["dense_iso"]
    step_flops = res["train_flops"] / (res["tokens"] / (16 * 64))
    assert abs(iso["train_flops"] - res["train_flops"]) <= step_flops  # iso-FLOP up to one step
    assert (tmp_path / "runs" / "default" / "latest" / "config_resolved.yaml").exists()
    assert (tmp_path / "runs" / "default" / "latest" / "csv").is_dir()
    # where the seconds went: every stage timed, and the fit's parts add up to its total, none counted twice
    t, f = res["timings_s"], res["fit_timings_s"]
    stages = ("startup", "data", "dense_base", "parent_eval", "upcycle", "init_eval", "fit", "dense_iso")
    assert set(stages) <= set(t) and all(t[k] >= 0 for k in stages)
    assert sum(t[k] for k in stages[1:]) <= res["wall_time_s"] + 0.01 and t["startup"] > 0
    parts = ("init", "setup", "first_step", "steps", "validation", "checkpoint")
    assert all(f[k] > 0 for k in ("first_step", "steps", "validation", "checkpoint"))
    assert abs(sum(f[k] for k in parts) - f["total"]) < 0.01 + 1e-3 * f["total"]
    assert f["total"] + f["final_eval"] <= t["fit"] + 0.01
    host = res["host"]  # what the job's CPU stages ran on: torch's pool never wider than the CPUs it may use
    assert 1 <= host["torch_threads"] <= host["usable_cpus"] <= host["cpu_count"]
    # second run: complete results for the same config are reused, not recomputed
    again = run_cli(env, tmp_path)
    assert "skipping" in again.stdout + again.stderr


@pytest.mark.slow
def test_multirun_routing_shares_dense_checkpoint(env, tmp_path):
    proc = run_cli(env, tmp_path, "-m", "routing=softmax_topk,topk_softmax", "logger=wandb", "iso_flop_baseline=false")
    assert "logger: wandb" in (ROOT / "conf" / "config.yaml").read_text()  # the plain command logs to W&B too
    sweep = tmp_path / "multirun" / "default"
    jobs = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(jobs) == 2
    for routing in ("softmax_topk", "topk_softmax"):
        job = next(j for j in jobs if f"routing={routing}" in j.name)  # folder named by the job's overrides
        res = results(job)
        assert res["status"] == "complete" and res["routing"] == routing
        assert res["config"]["moe"]["routing"] == routing
        assert list((job / "wandb").glob("offline-run-*")), "W&B offline run missing"
    # one dense checkpoint for both jobs, pretrained at most once (the cache may hold other tests' bases: with
    # pytest -n, which tests ran before this one in the session differs from run to run)
    (base,) = {results(j)["dense_base"] for j in jobs}
    assert (Path(env["UPCYCLE_CACHE"]) / "dense" / base / "model.pt").is_file()
    assert (proc.stdout + proc.stderr).count("dense base: pretraining") <= 1


@pytest.mark.slow
def test_dense_method_uses_iso_flop_budget(env, tmp_path):
    run_cli(env, tmp_path, "method=dense", "moe=E8G1T2")
    res = results(tmp_path / "runs" / "default" / "latest")
    model = ModelConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=256, max_seq_len=64)
    moe_fpt = flops.train_flops_per_token(model, 64, MoEConfig(num_experts=8, top_k=2), [0, 1])
    dense_fpt = flops.train_flops_per_token(model, 64)
    assert res["flops_per_token"] == dense_fpt
    budget = flops.iso_flop_tokens(12800, moe_fpt, dense_fpt)
    assert budget <= res["tokens"] < budget + 16 * 64


@pytest.mark.slow
def test_resume_continues_the_same_curve(env, tmp_path):
    run_cli(env, tmp_path, "name=straight", "iso_flop_baseline=false")
    stopped = run_cli(env, tmp_path, "name=crashed", "iso_flop_baseline=false", "train.stop_after_steps=5")
    # the same command would stop at step 5 again: the line names the flag to drop
    assert "run it again without train.stop_after_steps=5 to resume" in stopped.stdout + stopped.stderr
    crashed = tmp_path / "runs" / "crashed" / "latest"
    assert results(crashed)["status"] == "interrupted"
    assert (crashed / "checkpoints" / "last.ckpt").exists()
    run_cli(env, tmp_path, "name=crashed", "iso_flop_baseline=false")
    a, b = results(tmp_path / "runs" / "straight" / "latest"), results(crashed)
    assert b["status"] == "complete" and b["steps"] == a["steps"]
    assert b["val_loss"] == a["val_loss"]  # bitwise on CPU: same data, same optimiser state
    assert [p["step"] for p in b["val_curve"]] == [p["step"] for p in a["val_curve"]]
    assert a["val_curve"][0] == {"step": 0, "tokens": 0, "flops": 0, "val_loss": a["init_val_loss"]}


@pytest.mark.parametrize(
    "override,needle",
    [
        ("moe.top_k=16", "moe.top_k=16 > moe.num_experts=8"),
        ("moe.routing=sigmoid", "moe.routing='sigmoid'"),
        ("upcycle.drop_ratio=2.0", "upcycle.drop_ratio=2.0"),
        ("method=distill", "method='distill'"),
        ("moe=E64G8T8 model.d_ff=100", "model.d_ff=100 is not divisible by moe.granularity=8"),
        ("trainer=gpu", "trainer.accelerator=gpu (trainer=gpu, ddp or fsdp"),  # the tests' CLI sees no GPU
        ("trainer=fsdp trainer.accelerator=cpu", "trainer.accelerator=cpu: FSDP (trainer=fsdp) shards over CUDA"),
        ("train.tokens=abc", "train.tokens='abc' is not int"),
        ("data.seq_len=1.5", "data.seq_len=1.5 is not int"),
        ("model=hf", "model.hf_path must be set (model.hf_path=...)"),
        ("seed=-1", "seed=-1 must be an integer >= 0"),
        ("data.val_fraction=0.9", "data.val_fraction=0.9 must be in (0, 0.5)"),
        ("data.batch_size=1.5", "data.batch_size=1.5 is not int"),
        ("train.activation_checkpointing=bogus", "train.activation_checkpointing='bogus' is not one of false"),
        (
            "routing=softmax",
            "routing=softmax is not a routing preset (presets: sigmoid_topk, softmax_topk, topk_softmax)",
        ),
        ("moe.load_balancing=aux_free", "moe.load_balancing='aux_free' is not one of ('aux_loss', 'seq_aux_loss',"),
        ("-m moe=E8G1T2,E8G1T3", "moe=E8G1T3 is not a moe preset (presets: E16G2T2"),
        ("-m +sweep=rouitng", "+sweep=rouitng is not a sweep preset (presets: balancing, batch_size,"),
        # Hydra's own groups list what Hydra and its installed plugins register beside conf/hydra/
        ("-m hydra/launcher=parallell", "hydra/launcher=parallell is not a hydra/launcher preset (presets: basic,"),
        ("-m hydra/launcher=parallel hydra.launcher.n_jobs=0 seed=0,1", "hydra.launcher.n_jobs=0 must be a whole"),
        ("force=maybe", "force='maybe' must be true or false"),  # not read as true: it would move a finished run
        ("paths.cache_dir=README.md", "paths.cache_dir=README.md must be a folder, but it is a file"),
        ("paths.log_dir=README.md/x", "paths.log_dir=README.md/x must be a folder, but it is a file (README.md is"),
        ("upcycle.moe_layers=every_3", "upcycle.moe_layers='every_3' picks no layer of this 2-layer model"),
        ("train.peak_tflops=-5", "train.peak_tflops=-5 must be the device's peak TFLOP/s"),
        ("data.val_batches=4", "data.val_batches is gone: set data.val_tokens"),
        ("trian.tokens=10", "trian.tokens: the config has no key 'trian' (did you mean train.tokens?)"),
        ("-m train.tokns=1,2", "train.tokns: train (TrainConfig) has no key 'tokns' (did you mean train.tokens?)"),
        ("+train.lr=1", "+train.lr: train (TrainConfig) has no key 'lr' (did you mean optim.lr?)"),
    ],
)
def test_bad_config_fails_fast_with_one_line(env, tmp_path, override, needle):
    proc = run_cli(env, tmp_path, *override.split(), check=False)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert needle in last and last.startswith("config error:"), proc.stderr[-2000:]
    assert not (tmp_path / "runs" / "default").exists()  # a run that never started leaves no folder behind


@pytest.mark.slow
def test_upcycle_from_hf_checkpoint_folder(env, tmp_path):
    """model=hf model.hf_path=...: a saved transformers Llama with its tokenizer.json is the dense base; the eval
    stage scores the MoE, the HF parent and the iso-FLOP twin (no checkpoints: their weights.pt)."""
    transformers = pytest.importorskip("transformers")
    import torch

    from harness.data import read_documents, train_tokenizer
    from harness.hf import load_hf
    from harness.lit import evaluate

    folder = tmp_path / "llama"
    tok = train_tokenizer(read_documents("stdlib", None, 300_000), 384)
    cfg = transformers.LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    run_cli(
        env,
        tmp_path,
        "model=hf",
        f"model.hf_path={folder}",
        "iso_flop_baseline=true",
        "eval.tasks=[pydoc_cloze]",
        "eval.limit=4",
        "train.save_checkpoints=false",
    )
    res = results(tmp_path / "runs" / "default" / "latest")
    assert res["status"] == "complete" and res["dense_base"].startswith("hf:")
    # the eval stage builds the iso-FLOP twin in the HF base's shape (from its folder, not the model block's)
    assert set(res["downstream"]) == {"moe", "dense_parent", "dense_iso"}
    assert res["data"]["vocab_size"] == tok.get_vocab_size() and res["data"]["tokenizer"] == str(folder)
    assert res["config"]["model"]["hf_path"] == str(folder)
    # the dense parent's val loss is the HF model's own loss on our validation windows
    from harness.data import TokenDataModule

    dm = TokenDataModule(env["UPCYCLE_CACHE"], max_bytes=1_000_000, seq_len=64, tokenizer_path=str(folder))
    assert res["dense_parent_val_loss"] == pytest.approx(evaluate(load_hf(folder, 64), dm.val_dataloader()), rel=1e-5)
    assert res["val_loss"] < res["dense_parent_val_loss"]  # a random-weight parent: training must help


@pytest.mark.slow
def test_diverging_run_stops_cleanly_with_a_clear_error(env, tmp_path):
    proc = run_cli(
        env,
        tmp_path,
        "optim.lr=1e12",
        "optim.warmup_steps=0",
        "iso_flop_baseline=false",
        "name=nan",
        "train.max_grad_norm=null",
        check=False,
    )  # only the NaN/Inf guard
    assert proc.returncode != 0
    res = results(tmp_path / "runs" / "nan" / "latest")
    assert res["status"] == "failed" and "non-finite training loss" in res["error"]
    assert "FloatingPointError" in proc.stderr


@pytest.mark.slow
def test_exploding_gradient_norm_stops_cleanly(env, tmp_path):
    run_cli(env, tmp_path, "train.tokens=2000", "iso_flop_baseline=false", "name=warm")  # dense base cached first
    proc = run_cli(env, tmp_path, "train.max_grad_norm=1e-6", "iso_flop_baseline=false", "name=explode", check=False)
    assert proc.returncode != 0
    res = results(tmp_path / "runs" / "explode" / "latest")
    assert res["status"] == "failed" and "exceeds train.max_grad_norm=1e-06" in res["error"]


@pytest.mark.slow
def test_router_collapse_is_flagged_as_a_metric_and_a_warning(env, tmp_path):
    import csv

    proc = run_cli(
        env,
        tmp_path,
        "train.collapse_share=0.01",
        "train.collapse_steps=3",
        "trainer.log_every_n_steps=1",
        "train.tokens=8000",
        "iso_flop_baseline=false",
    )
    assert "router collapse: one expert has taken > 1% of the tokens for 3 steps" in proc.stderr
    rows = list(
        csv.DictReader(next((tmp_path / "runs" / "default" / "latest").glob("csv/version_*/metrics.csv")).open())
    )
    flags = [float(r["moe/router_collapse"]) for r in rows if r.get("moe/router_collapse")]
    assert flags[:2] == [0.0, 0.0] and flags[2:] and set(flags[2:]) == {1.0}


@pytest.mark.slow
def test_corrupt_dense_cache_is_detected_and_rebuilt(env, tmp_path):
    cache = tmp_path / "cache"
    own = {**env, "UPCYCLE_CACHE": str(cache)}
    run_cli(own, tmp_path, "iso_flop_baseline=false", "train.tokens=2000")
    model_pt = next(cache.glob("dense/*/model.pt"))
    data = model_pt.read_bytes()
    model_pt.write_bytes(data[: len(data) // 2])  # a half-written file
    proc = run_cli(own, tmp_path, "iso_flop_baseline=false", "train.tokens=2000", "force=true")
    assert "is a damaged cached dense base" in proc.stderr
    assert model_pt.stat().st_size == len(data)  # rebuilt, and the run completed
    assert results(tmp_path / "runs" / "default" / "latest")["status"] == "complete"
    shard = next(cache.glob("data/*/train.bin"))
    shard.write_bytes(shard.read_bytes()[:-2])
    proc = run_cli(own, tmp_path, "iso_flop_baseline=false", "train.tokens=2000", "force=true")
    assert "token cache" in proc.stderr and "rebuilding" in proc.stderr


@pytest.mark.slow
def test_failing_job_is_recorded_and_siblings_finish_and_reruns_skip(env, tmp_path):
    args = ["-m", "optim.lr=1e12,3e-3", "optim.warmup_steps=0", "iso_flop_baseline=false"]
    proc = run_cli(env, tmp_path, *args, check=False)
    assert proc.returncode != 0  # the sweep reports the failure...
    jobs = {p.parent.name: results(p.parent) for p in (tmp_path / "multirun" / "default").glob("*/results.json")}
    status = {name.split("optim.lr=")[1].split(",")[0]: r["status"] for name, r in jobs.items()}
    assert status == {"1000000000000.0": "failed", "0.003": "complete"}  # ...after every job has run
    again = run_cli(env, tmp_path, *args, check=False)
    assert (again.stdout + again.stderr).count("skipping") == 1  # the finished job is not recomputed


@pytest.mark.slow
def test_a_bad_config_in_a_sweep_is_named_before_any_job_and_fails_that_job_only(env, tmp_path):
    proc = run_cli(env, tmp_path, "-m", "moe.top_k=16,2", "iso_flop_baseline=false", "train.tokens=2000", check=False)
    assert proc.returncode != 0
    jobs = {p.parent.name: results(p.parent) for p in (tmp_path / "multirun" / "default").glob("*/results.json")}
    status = {name.split("moe.top_k=")[1].split(",")[0]: r for name, r in jobs.items()}
    assert status["2"]["status"] == "complete"  # ran after the bad job
    assert status["16"]["status"] == "failed" and "moe.top_k=16" in status["16"]["error"]
    # named before any job computed, in one line
    out = proc.stdout + proc.stderr
    line = "config error in job moe.top_k=16: moe.top_k=16 > moe.num_experts=8"
    assert out.count(line) == 1 and out.index(line) < out.index("Launching 2 jobs")
    assert "1 of 2 jobs has a bad config: it fails" in out
    # the failed job is reported by Hydra in one line after its overrides, not as a traceback
    assert "Traceback" not in out
    assert "config error: moe.top_k=16 > moe.num_experts=8" in out.split("Error executing job with overrides")[-1]
    # a sweep none of whose jobs can run stops there, in one line, and writes nothing
    none = run_cli(env, tmp_path / "none", "-m", "moe.top_k=16,32", check=False)
    assert none.returncode != 0 and "Traceback" not in none.stderr
    assert (
        none.stderr.strip().splitlines()[-1] == "config error: every job of the sweep has a bad config (2 named above)"
    )
    assert not (tmp_path / "none").exists()


@pytest.mark.slow
def test_unreachable_wandb_does_not_stop_training(env, tmp_path):
    bad = {
        **env,
        "WANDB_MODE": "online",
        "WANDB_OFFLINE": "false",
        "WANDB_BASE_URL": "http://127.0.0.1:9",
        "WANDB_API_KEY": "x" * 40,
        "WANDB_INIT_TIMEOUT": "10",
    }
    proc = run_cli(bad, tmp_path, "logger=wandb", "iso_flop_baseline=false", "train.tokens=2000")
    assert "logger 'wandb' could not start" in proc.stderr
    assert results(tmp_path / "runs" / "default" / "latest")["status"] == "complete"


@pytest.mark.slow
def test_sigkill_mid_training_then_rerun_gives_the_uninterrupted_result(env, tmp_path):
    args = ["iso_flop_baseline=false", "train.tokens=24000"]
    run_cli(env, tmp_path, *args, "name=straight")
    kill_after_first_checkpoint(env, tmp_path, *args, "name=killed")
    assert (
        not (tmp_path / "runs" / "killed" / "latest" / "results.json").exists()
        or results(tmp_path / "runs" / "killed" / "latest")["status"] != "complete"
    )
    run_cli(env, tmp_path, *args, "name=killed")
    killed, straight = (
        results(tmp_path / "runs" / "killed" / "latest"),
        results(tmp_path / "runs" / "straight" / "latest"),
    )
    assert killed["status"] == "complete" and killed["val_loss"] == straight["val_loss"]  # bitwise on CPU


@pytest.mark.slow
def test_the_parallel_launcher_runs_jobs_at_once_and_gives_the_basic_launchers_numbers(env, tmp_path):
    args = ["-m", "seed=0,1", "train.tokens=2000", "iso_flop_baseline=false"]
    run_cli(env, tmp_path / "basic", *args)
    # each parallel job waits at the start of its training until the other one has started too (tests/helpers/
    # rendezvous.py): jobs that ran one after the other fail there, whatever the machine's speed or load
    meet = tmp_path / "rendezvous"
    job_env = {
        **env,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), env.get("PYTHONPATH", "")]),
        "RENDEZVOUS_DIR": str(meet),
    }
    run_cli(
        job_env,
        tmp_path / "parallel",
        *args,
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "+callbacks.rendezvous._target_=helpers.rendezvous.Rendezvous",
        "+callbacks.rendezvous.jobs=2",
    )
    met = sorted(meet.glob("*.met"))
    assert len(met) == 2 and all(m.read_text() for m in met)  # each job saw the other's marker while alive

    def losses(root):
        runs = [results(p.parent) for p in (root / "multirun" / "default").glob("*/results.json")]
        return {r["config"]["seed"]: r["val_loss"] for r in runs}

    basic, parallel = losses(tmp_path / "basic"), losses(tmp_path / "parallel")
    assert sorted(basic) == sorted(parallel) == [0, 1]
    # the same runs up to float summation order (joblib's workers each get a share of the CPU threads)
    assert [parallel[s] for s in (0, 1)] == pytest.approx([basic[s] for s in (0, 1)], rel=1e-6)


def test_named_scales_and_sweeps_are_found_from_any_working_directory(env, tmp_path):
    for extra in ("+scale=cpu", "+sweep=routing"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "run.py"), extra, "--cfg", "job"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        cfg = yaml.safe_load(proc.stdout)
        assert "scale" not in cfg and "sweep" not in cfg  # composed as configs, not stray keys
    assert cfg["name"] == "sweep_routing"
