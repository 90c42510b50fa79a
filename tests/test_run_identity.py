"""Run identity and the everyday path, as a user runs it: run.py as a subprocess, tiny configs, one
session cache (the dense base is pretrained once for the whole file)."""

import json
import sysconfig
from pathlib import Path

import pytest

from helpers.e2e import ROOT, results, run_cli

TINY = ["train.tokens=2000", "iso_flop_baseline=false"]


def run_dirs(logs: Path, name: str = "default") -> list[Path]:
    """The run folders under ``runs/<name>`` (not ``latest``, not folders set aside by force=true)."""
    root = logs / "runs" / name
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink() and ".old-" not in p.name)


def only_dir(logs: Path, *words: str, without: str = "\0") -> Path:
    found = [d for d in run_dirs(logs) if all(w in d.name for w in words) and without not in d.name]
    assert len(found) == 1, [d.name for d in run_dirs(logs)]
    return found[0]


def snapshot(root: Path, skip=()) -> dict:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink() and not set(p.relative_to(root).parts) & set(skip)
    }


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


@pytest.mark.slow
def test_two_configs_in_a_row_each_equal_a_clean_run_and_bad_input_touches_neither(env, tmp_path):
    logs, clean = tmp_path / "logs", tmp_path / "clean"
    first = run_cli(env, logs, "train.tokens=2000")  # with its iso-FLOP dense continuation (cached)
    a = only_dir(logs)
    cont = Path(results(a)["dense_iso"]["cache_dir"]) / "results.json"
    cont.write_text(cont.read_text()[:50])  # a truncated cache entry: the next run that needs it heals it
    second = run_cli(env, logs, "train.tokens=2000", "routing=topk_softmax")  # same FLOPs: same continuation
    assert f"{cont} is corrupt" in second.stderr and list(cont.parent.glob("results.json.corrupt-*"))
    run_cli(env, clean, "train.tokens=2000", "routing=topk_softmax")
    b = only_dir(logs, "routing=topk_softmax")
    assert len(run_dirs(logs)) == 2
    assert results(a)["routing"] == "softmax_topk" and results(b)["routing"] == "topk_softmax"
    assert results(b)["dense_iso"]["val_loss"] == results(a)["dense_iso"]["val_loss"]  # recomputed, same
    twin = results(only_dir(clean))
    assert results(b)["val_loss"] == twin["val_loss"] and results(b)["config_hash"] == twin["config_hash"]
    assert results(a)["config_hash"] != results(b)["config_hash"]
    # the console: stages announced, no config tree, no library chatter, the results folder named
    out = first.stdout + first.stderr
    for line in (
        "dense base:",
        "upcycling to E8G1T2: routing softmax_topk",
        "training the MoE for 2 steps (2,048 tokens: train.tokens=2000 in whole steps of 1,024)",
        "iso-FLOP dense continuation:",
    ):
        assert line in out, line
    assert "CONFIG" not in out and "GPU available" not in out and "litlogger" not in out
    assert f"results: {a / 'results.json'}" in out

    before = snapshot(logs)
    proc = run_cli(env, logs, "train.tokens=2000", "moe.top_k=0", check=False)
    assert proc.returncode != 0 and last_line(proc) == "config error: moe.top_k=0 must be a positive integer"
    assert snapshot(logs) == before  # not one byte changed, no folder left behind
    # a folder holding another config's run (a hand-set hydra.run.dir) is refused, its run left as it is
    # (Hydra itself rewrites its .hydra/ and run.log there before the job starts)
    proc = run_cli(env, logs, "train.tokens=2000", "routing=topk_softmax", f"hydra.run.dir='{a}'", check=False)
    assert proc.returncode != 0 and "holds a run of another config" in last_line(proc)
    hydra_own = (".hydra", "run.log")
    assert snapshot(logs, skip=hydra_own) == {
        k: v for k, v in before.items() if not set(Path(k).parts) & set(hydra_own)
    }
    # the same config spelled another way (the default routing written out) finds its finished run
    again = run_cli(env, logs, "train.tokens=2000", "routing=softmax_topk")
    assert f"{a / 'results.json'} holds this config's complete run" in again.stdout + again.stderr
    assert (logs / "runs" / "default" / "latest").resolve() == a.resolve()
    assert not (only_dir(logs, "routing=softmax_topk") / "results.json").exists()


@pytest.mark.slow
def test_a_damaged_checkpoint_heals_cosmetic_keys_find_the_run_and_force_retrains_it(env, tmp_path):
    args = [*TINY, "train.ckpt_every=1"]
    run_cli(env, tmp_path, *args, "train.stop_after_steps=1")  # interrupted after step 1, as a crash would
    done = only_dir(tmp_path)
    ckpt = done / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(ckpt.read_bytes()[:4096])  # truncated
    proc = run_cli(env, tmp_path, *args)
    assert f"{ckpt} is a damaged checkpoint" in proc.stderr and list(ckpt.parent.glob("last.ckpt.corrupt-*"))
    old = results(done)
    assert old["status"] == "complete" and [p["step"] for p in old["val_curve"]] == [0, 2]
    again = run_cli(env, tmp_path, *args, "print_config=true", "logger=wandb", "data.num_workers=0")
    assert "skipping" in again.stdout + again.stderr and "CONFIG" in again.stdout  # shown, as asked
    assert run_dirs(tmp_path) == [done]
    forced = run_cli(env, tmp_path, *args, "force=true", "trainer.enable_progress_bar=true")
    out = forced.stdout + forced.stderr
    assert "force=true: moved the previous run" in out and "training the MoE for 2 steps" in out
    assert "resuming from" not in out
    assert "2/2" in out and "Epoch 0/-2" not in out  # the bar counts optimizer steps
    aside = [p for p in (tmp_path / "runs" / "default").iterdir() if ".old-" in p.name]
    assert len(aside) == 1 and results(aside[0]) == old
    new = results(done)
    assert new["status"] == "complete" and new["wall_time_s"] != old["wall_time_s"]
    assert new["val_loss"] == old["val_loss"]  # retrained from scratch: the same curve (bitwise on CPU)


def _stdlib_text(n_bytes: int) -> str:
    text = ""
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text += f.read_text(errors="ignore")
        if len(text) >= n_bytes:
            return text[:n_bytes]
    return text


@pytest.mark.slow
def test_one_text_file_is_a_corpus_and_bad_corpora_stop_with_one_line(env, tmp_path):
    corpus = tmp_path / "book.txt"
    corpus.write_text(_stdlib_text(200_000))
    # a 200 kB corpus holds ~4k validation tokens: fewer than the default data.val_tokens, which says so in one line
    proc = run_cli(env, tmp_path / "short", *TINY, f"data.path={corpus}", "pretrain.tokens=8000", check=False)
    assert last_line(proc).startswith("config error: data.val_tokens=8,192 is more than the validation split holds")
    run_cli(env, tmp_path, *TINY, f"data.path={corpus}", "pretrain.tokens=8000", "data.val_tokens=2048")
    res = results(only_dir(tmp_path, "data.path="))
    assert res["status"] == "complete" and res["data"]["documents"] == 1 and res["data"]["val_tokens"] > 64
    (tmp_path / "tiny.txt").write_text("hello\n" * 100)
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 200)
    for path, needle in ((tmp_path / "tiny.txt", "needs at least 10,000"), (tmp_path / "blob.txt", "is not text")):
        proc = run_cli(env, tmp_path, *TINY, f"data.path={path}", check=False)
        assert proc.returncode != 0 and last_line(proc).startswith("config error:") and needle in last_line(proc)
        assert "Traceback" not in proc.stderr


def test_a_folder_of_a_few_documents_gets_a_validation_split_and_a_damaged_cache_is_rebuilt(tmp_path):
    """Validation is a share of the token stream: 12 documents (fewer than 1 / val_fraction) still give one."""
    from harness.data import build_shards

    folder = tmp_path / "docs"
    folder.mkdir()
    text = _stdlib_text(120_000)
    for i in range(12):
        (folder / f"doc{i}.md").write_text(text[i * 10_000 : (i + 1) * 10_000])
    (folder / ".hidden.txt").write_bytes(b"\x00" * 100)  # hidden files are not part of the corpus
    out = build_shards("stdlib", str(folder), 10**9, 300, 0.05, str(tmp_path / "cache"))
    meta = json.loads((out / "meta.json").read_text())
    total = meta["train_tokens"] + meta["val_tokens"]
    assert meta["documents"] == 12 and meta["val_tokens"] == pytest.approx(0.05 * total, abs=25)
    (out / "meta.json").write_text((out / "meta.json").read_text()[:40])  # truncated
    with pytest.warns(UserWarning, match=r"meta.json is corrupt .* moved it to meta.json.corrupt-"):
        assert build_shards("stdlib", str(folder), 10**9, 300, 0.05, str(tmp_path / "cache")) == out
    assert json.loads((out / "meta.json").read_text()) == meta


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B ``.wandb`` file (a LevelDB-style log: 7-byte header, 32 KiB blocks,
    chunks of [crc32 (4), length (2), type (1)]; type 1 = whole record, 2/3/4 = first/middle/last part)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, out = path.read_bytes(), 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block tail padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf, pos = buf + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            out.append(record)
            buf = b""
    return out


def _wandb_runs(folder: Path) -> dict[str, dict]:
    """W&B offline runs under ``folder/wandb`` by run id: job type, config keys, summary keys, file count."""
    runs = {}
    for d in sorted((folder / "wandb").glob("offline-run-*")):
        records = _wandb_records(next(d.glob("*.wandb")))
        # the id from the run record: a reopening within the same second gets a folder "...-<id>-1"
        run_id = next(r.run.run_id for r in records if r.WhichOneof("record_type") == "run")
        info = runs.setdefault(run_id, {"files": 0, "config": set(), "summary": set()})
        info["files"] += 1
        for r in records:
            kind = r.WhichOneof("record_type")
            if kind == "run":
                info["job_type"], info["group"] = r.run.job_type, r.run.run_group
            elif kind == "config":
                info["config"] |= {u.key for u in r.config.update}
            elif kind == "summary":
                info["summary"] |= {u.key or "/".join(u.nested_key) for u in r.summary.update}
    return runs


@pytest.mark.slow
def test_wandb_offline_runs_hold_the_config_every_stage_and_continue_after_a_resume(env, tmp_path):
    args = [
        *TINY,
        "iso_flop_baseline=true",
        "logger=wandb",
        "pretrain.tokens=4000",  # a fresh dense base
        "train.val_every=2",
        "train.ckpt_every=1",
    ]
    run_cli(env, tmp_path, *args, "train.stop_after_steps=1")  # stops the MoE (the run's own stage) at step 1
    folder = only_dir(tmp_path, "pretrain.tokens=4000")
    assert results(folder)["status"] == "interrupted"
    run_cli(env, tmp_path, *args)
    folder = only_dir(tmp_path, "pretrain.tokens=4000")
    runs = _wandb_runs(folder)
    by_type = {r["job_type"]: r for r in runs.values()}
    assert sorted(by_type) == ["dense_iso", "pretrain", "upcycle"] and len(runs) == 3
    assert by_type["pretrain"]["files"] == 1  # the crash stopped the MoE, never the shared dense base
    assert by_type["upcycle"]["files"] == 4  # one W&B run: training and its summary, before and after the resume
    moe = runs[(folder / "wandb_id").read_text()]
    assert moe is by_type["upcycle"] and moe["group"] == "default"
    assert {"model", "moe", "upcycle", "optim", "data", "train", "seed"} <= moe["config"]  # the resolved config
    assert {"val_loss", "init_val_loss", "dense_parent_val_loss", "dense_iso/val_loss"} <= moe["summary"]
    assert {"val/loss", "flops/train_total"} <= by_type["dense_iso"]["summary"]  # curves on the FLOPs axis


def test_the_folder_hash_ignores_cosmetic_keys_and_sees_every_experiment_key():
    from hydra import compose, initialize_config_dir

    from harness.identity import config_hash
    from harness.resolvers import register

    register()
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):

        def h(*overrides):
            return config_hash(compose("config", overrides=list(overrides)))

        base = h()
        assert base == h(
            "print_config=true",
            "force=true",
            "logger=csv",
            "name=other",
            "train.stop_after_steps=3",
            "trainer.enable_progress_bar=false",
            "paths.log_dir=/elsewhere",
            "paths.cache_dir=/c",
        )
        for key in (
            "routing=topk_softmax",
            "moe.top_k=1",
            "seed=1",
            "data.path=/x",
            "optim.lr=1e-4",
            "method=dense",
            "pretrain.tokens=1000",
            "trainer=ddp_cpu",
        ):
            assert h(key) != base, key
