"""Run identity: which folder a config's run lives in, and whether what a folder holds belongs to it.

A run's folder is ``<overrides>,cfg=<hash>`` (or ``cfg=<hash>``) where the hash covers the resolved
*experiment* config: everything that changes what is computed, not the cosmetic keys below. The
folder keeps that hash in ``identity.json`` (beside ``checkpoints/``); a run resumes or skips only
a folder whose stored hash equals its own, so it never loads a checkpoint written under another config.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness.errors import RunFolderError
from harness.io import atomic_write_bytes, atomic_write_json

log = logging.getLogger("upcycle")

# keys that change how a run is shown, named or stored, not what it computes
COSMETIC = (
    "hydra",
    "name",
    "print_config",
    "force",
    "paths",
    "logger",
    "eval",  # downstream scores of the trained models (harness/eval.py), cached by their weights
    "optuna",
    "callbacks.progress_bar",
    "train.stop_after_steps",
    "train.profile_steps",  # a profiler and CUDA's sync check watch the steps; they change nothing computed
    "train._target_",  # the class that checks the block, not part of the experiment
    "pretrain._target_",
    "trainer.enable_progress_bar",
    "trainer.enable_model_summary",
    "trainer.log_every_n_steps",
    "data.cache_dir",
    "data.num_workers",
)
IDENTITY = "identity.json"
# keys added after runs were recorded, at the value that computes what those runs computed: left out of the
# experiment config at that value, so the runs written before the key existed keep their folders, hashes and
# cached stages (another value is part of the config like any key)
NEUTRAL = {"pretrain.fraction": 1.0, "scratch_baseline": False, "optim.fused": "auto", "train.compile_mode": "default"}


def resolved(cfg: DictConfig) -> dict:
    """The config as plain data, resolved when it can be (a bad value may break an interpolation)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:
        return OmegaConf.to_container(cfg, resolve=False)


def experiment_config(cfg: DictConfig) -> dict:
    """The resolved config without its cosmetic keys (resolved as far as it resolves: a bad value may
    break an interpolation, and the run must still get a folder to fail in)."""
    raw = OmegaConf.to_container(cfg, resolve=False)
    raw.pop("hydra", None)
    if isinstance(raw.get("paths"), dict):
        raw["paths"]["output_dir"] = ""  # ${hydra:runtime.output_dir} is what this decides
    data = resolved(OmegaConf.create(raw))
    for key in COSMETIC:
        *parents, leaf = key.split(".")
        d = data
        for p in parents:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict):
            d.pop(leaf, None)
    for key, default in NEUTRAL.items():
        *parents, leaf = key.split(".")
        d = data
        for p in parents:
            d = d.get(p) if isinstance(d, dict) else None
        if isinstance(d, dict) and leaf in d and _same(d[leaf], default):
            del d[leaf]
    return data


def _same(value, default) -> bool:
    """``value`` is ``default`` (1 is 1.0, but true is not 1)."""
    return isinstance(value, bool) == isinstance(default, bool) and value == default


def config_hash(cfg: DictConfig) -> str:
    text = json.dumps(experiment_config(cfg), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:8]


MAX_DIRNAME = 200  # file systems allow 255 bytes a name; longer override lists are cut + hashed


def short_dirname(name: str) -> str:
    """A job folder name from its overrides: readable when short, else truncated + a stable hash
    (the same overrides always give the same folder, so re-runs find their results and checkpoints)."""
    if len(name) <= MAX_DIRNAME:
        return name
    digest = hashlib.sha1(name.encode()).hexdigest()[:10]
    return f"{name[: MAX_DIRNAME - 13]}.._{digest}"


# a value that is a float with more digits than a reader uses (an Optuna trial's 0.0012345678901234567)
_LONG_FLOAT = re.compile(r"(?<==)-?\d*\.\d{7,}(?:[eE][-+]?\d+)?(?=,|$)")


def readable_overrides(overrides: str) -> str:
    """The overrides as a folder-name label: long floats to 6 significant digits (the cfg hash beside the
    label tells configs apart, not the label), ``/`` out of paths so data.path=/a/b does not nest folders."""
    return _LONG_FLOAT.sub(lambda m: f"{float(m.group()):.6g}", overrides).replace("/", "_")


def run_dirname(overrides: str, *, _root_: DictConfig) -> str:
    """``${run_dirname:${hydra.job.override_dirname}}``: readable overrides + the experiment hash."""
    tag = f"cfg={config_hash(_root_)}"
    readable = short_dirname(readable_overrides(overrides))
    return f"{readable},{tag}" if overrides else tag


def stored_hash(folder: Path) -> str | None:
    try:
        return json.loads((folder / IDENTITY).read_text())["config_hash"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def claim(folder: Path, config_hash_: str) -> None:
    """Make ``folder`` this config's run folder, or stop with one line if it holds another config's state."""
    stored = stored_hash(folder)
    ckpts = sorted((folder / "checkpoints").glob("*.ckpt")) if (folder / "checkpoints").is_dir() else []
    if stored is None and (ckpts or (folder / "results.json").exists()):
        raise RunFolderError(
            f"{folder} holds a run but no {IDENTITY} naming its config (an older layout?); it is left "
            "as it is: pick another hydra.run.dir, or force=true to move it aside"
        )
    if stored is not None and stored != config_hash_:
        raise RunFolderError(
            f"{folder} holds a run of another config (hash {stored}, this one is {config_hash_}); "
            "it is left as it is: pick another hydra.run.dir, or force=true to move it aside"
        )
    if stored is None:
        atomic_write_json(folder / IDENTITY, {"config_hash": config_hash_, "created": time.strftime("%FT%T%z")})


LOCK, OWNER = ".lock", ".owner.json"  # the run folder's writer lock and who holds it
KEEP = (".hydra", "run.log", LOCK, OWNER)  # written by Hydra, or held, for this very invocation


def _holder(folder: Path, wait_s: float = 10.0) -> str:
    """Who holds ``folder``'s lock, from its owner record. The holder writes the record just after it takes the
    lock, and a dead run's record may still be there: wait (briefly) for one naming a live process on this host."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            who = json.loads((folder / OWNER).read_text())
            by = f"pid {who['pid']} on {who['host']}, started {who['started']}"
            if who["host"] != socket.gethostname() or _alive(int(who["pid"])):
                return by
        except (OSError, ValueError, KeyError, TypeError):
            by = "another process"
        if time.monotonic() > deadline:
            return by
        time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def hold(folder: Path):
    """One writer per run folder: an exclusive lock on ``folder/.lock`` for the run's life. A second process
    with the same config stops at once with RunFolderError naming the holder (it never waits: on a cluster a
    double submission would sit on its GPUs for the whole run). The lock is an ``flock``, which the kernel drops
    when its process dies however it ends (``kill -9`` included): a dead process's lock is never stale."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(folder / LOCK))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        by = _holder(folder)
        raise RunFolderError(
            f"{folder} is being trained by {by}: this run stops here and leaves it alone; run the same command "
            "once that one ends to reuse its result (or resume it)"
        ) from None
    owner = folder / OWNER
    before = owner.read_bytes() if owner.is_file() else None
    try:
        who = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%FT%T%z")}
        atomic_write_json(owner, who)  # read by a second process's one line
        yield
    except RunFolderError:  # refused (another config's folder): leave it byte for byte as it was
        if before is None:
            owner.unlink(missing_ok=True)
        else:
            atomic_write_bytes(owner, before)
        raise
    finally:
        lock.release()


def move_aside(folder: Path) -> Path | None:
    """Move a previous run's files out of ``folder`` into ``<folder>.old-<timestamp>`` (force=true)."""
    old = [p for p in folder.iterdir() if p.name not in KEEP] if folder.is_dir() else []
    if not old:
        return None
    dest = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    dest.mkdir(parents=True, exist_ok=True)
    for p in old:
        shutil.move(str(p), str(dest / p.name))
    return dest


def discard_unclaimed(folder: Path) -> None:
    """Remove a folder Hydra created for a run that never started (a config error): nothing is left behind."""
    if folder.is_dir() and not (folder / IDENTITY).exists() and all(p.name in KEEP for p in folder.iterdir()):
        shutil.rmtree(folder, ignore_errors=True)
        try:
            folder.parent.rmdir()  # runs/<name>/ when it held nothing else
        except OSError:
            pass


def point_latest(folder: Path) -> None:
    """``runs/<name>/latest`` -> the folder of the last single run started under that name."""
    link = folder.parent / "latest"
    tmp = folder.parent / f".latest.{time.time_ns()}"
    try:
        tmp.symlink_to(folder.name)
        tmp.replace(link)
    except OSError:
        tmp.unlink(missing_ok=True)


# ---- cache keys of the shared stages ------------------------------------------------------------------------
# A cached stage (the dense base, a dense continuation, a WSD trunk) is reused by every run whose config agrees
# on what the stage's result depends on. Each stage names those inputs below as subtrees of the experiment
# config (``experiment_config``: the resolved config less COSMETIC); every other key is one of:
#   LAYOUT: how the same steps are spread over devices and memory (the same samples and updates; floating-point
#           reduction order aside), so a cached stage is shared across them;
#   GUARDS: checks that stop or flag a run; a stage that passes them has the same numbers;
#   RUN_ONLY: what only the upcycled run computes (its MoE, its recipe) or which stages a run asks for.
# A key in a stage's list whose value is a model folder is keyed by the folder's content, not its path.
# tests/test_stage_keys.py flips every leaf of the default configs: each lands in one of these lists, and a
# flip changes the key of every stage that lists it.
STAGE_KEY_VERSION = 2  # part of every stage key: entries written under older keys are never reused
STAGE_INPUTS = {
    # pretrained from scratch (an HF base is its checkpoint's content): its corpus, tokenizer and windows, the
    # validation set its record scores, the architecture, its own recipe and seed (``pretrain``), precision
    "dense_base": ("data", "model", "pretrain", "trainer.precision", "trainer.accelerator", "trainer.deterministic"),
    # the base continued for a budget: the base, the data (batch size and seed included), optimizer and schedule,
    # the train block less its length (the budget is the stage's token count itself), precision
    "dense_continuation": (
        "dense_base",
        "data",
        "model",
        "optim",
        "seed",
        "train",
        "trainer.precision",
        "trainer.accelerator",
        "trainer.deterministic",
    ),
}
STAGE_INPUTS["dense_trunk"] = STAGE_INPUTS["dense_continuation"]  # its WSD stable phase, shared by every budget
# the dense base's WSD stable phase, shared by the bases at every share of pretraining (pretrain.fraction)
STAGE_INPUTS["pretrain_trunk"] = STAGE_INPUTS["dense_base"]
# the upcycled run's WSD trunk: the whole experiment config less its length and what validation and progress show
# (its checkpoints also keep the device layout: a sharded checkpoint resumes only under its own strategy)
TRUNK_DROPS = (
    "iso_flop_baseline",
    "token_matched_baseline",
    "scratch_baseline",
    "train.tokens",
    "train.pretrain_fraction",
    "train.val_every",
    "data.val_tokens",
)
# keys of a stage's subtrees it does not depend on
STAGE_DROPS = {
    "dense_base": ("data.batch_size", "data.seed"),  # it trains at pretrain.batch_size on pretrain.seed's order
    "dense_continuation": ("train.tokens", "train.pretrain_fraction"),  # they set the budget, keyed itself
    "dense_trunk": TRUNK_DROPS,
    "pretrain_trunk": ("data.batch_size", "data.seed", "pretrain.fraction"),  # the fraction is its length
}
PROGRESS = ("train.ckpt_every", "train.save_checkpoints", "train.peak_tflops")  # checkpoints and MFU display
LAYOUT = (
    "trainer._target_",
    "trainer.devices",
    "trainer.num_nodes",
    "trainer.strategy",
    "data.micro_batch_size",
    "train.compile",
    "train.compile_mode",
    "train.activation_checkpointing",
)
GUARDS = ("train.max_grad_norm", "train.collapse_share", "train.collapse_steps")
RUN_ONLY = (
    "method",
    "moe",
    "upcycle",
    "iso_flop_baseline",
    "token_matched_baseline",
    "scratch_baseline",
    "callbacks",
)
_MODEL_PATHS = ("model.hf_path", "data.tokenizer_path")  # folders: keyed by content
_DIGESTS: dict[tuple, str] = {}


def _matches(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def folder_digest(path: str) -> str:
    """sha256 over a model folder's (or file's) names and bytes, cached per process by (path, size, mtime)."""
    p = Path(path).expanduser()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p] if p.exists() else []
    stamp = (str(p.resolve()), tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files))
    if stamp not in _DIGESTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.relative_to(p) if p.is_dir() else f.name}\0".encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
        _DIGESTS[stamp] = h.hexdigest() if files else "missing"
    return _DIGESTS[stamp]


def _keyed_leaves(cfg: DictConfig, include=None, drops=(), layout: bool = False) -> dict:
    leaves = _flatten(experiment_config(cfg))
    out = {}
    for key, value in leaves.items():
        if include is not None and not _matches(key, include):
            continue
        if _matches(key, (*drops, *PROGRESS, *GUARDS)) or (not layout and _matches(key, LAYOUT)):
            continue
        if key in _MODEL_PATHS and value:
            value = "content:" + folder_digest(str(value))
        out[key] = value
    return out


def stage_key(cfg: DictConfig, stage: str, **inputs) -> str:
    """The cache key of ``stage``: a hash of the config keys it depends on (STAGE_INPUTS) and of ``inputs``
    computed at run time (the shard key of the corpus, the base's key, the token budget)."""
    trunk = stage in ("trunk", "dense_trunk", "pretrain_trunk")  # checkpoints: their device layout too
    leaves = _keyed_leaves(cfg, STAGE_INPUTS.get(stage), STAGE_DROPS.get(stage, TRUNK_DROPS), layout=trunk)
    obj = {"version": STAGE_KEY_VERSION, "stage": stage, "config": leaves, **inputs}
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]
