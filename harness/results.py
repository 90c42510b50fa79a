"""The run's record: ``results.json`` (written atomically: complete, failed or pruned), the skip of a finished
run, and the summary table printed at the end."""

from __future__ import annotations

import logging
import math
import os
import traceback
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from harness import identity
from harness.io import atomic_write_json, move_aside, read_json

log = logging.getLogger("upcycle")


def record_unstarted(cfg: DictConfig, out_dir: Path, error: Exception) -> None:
    """A job of a sweep whose config is bad: a ``failed`` record in its own folder, so the report counts it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if identity.stored_hash(out_dir) is None:
        atomic_write_json(
            out_dir / "results.json",
            {
                "config": identity.resolved(cfg),
                "run_dir": str(out_dir),
                "status": "failed",
                "error": f"{type(error).__name__}: {error}",
            },
        )


def finished(out_dir: Path, config_hash: str) -> dict | None:
    """The folder's results when it holds this config's complete run (then the run is skipped). A record that
    does not hang together (see ``damage``) is moved aside and the run computed again, never trusted."""
    old = read_json(out_dir / "results.json")
    if old is None or old.get("status") != "complete" or old.get("config_hash") != config_hash:
        return None
    why = damage(old)
    if why is not None:
        move_aside(out_dir / "results.json", f"inconsistent ({why})")
        return None
    return old


def damage(res: dict) -> str | None:
    """Why a complete record cannot be true: its val_loss is not its curve's last point, or its config_hash is not
    the hash of the config it stores (a hand edit, a copy from another run)."""
    curve = res.get("val_curve") or []
    if res.get("method") != "pretrain" and not curve:
        return "no val_curve"
    if (
        curve
        and res.get("method") != "pretrain"
        and not math.isclose(float(res.get("val_loss", "nan")), float(curve[-1]["val_loss"]), rel_tol=1e-6)
    ):
        return f"val_loss {res.get('val_loss')} is not its val_curve's last point {curve[-1]['val_loss']}"
    try:
        stored = identity.config_hash(OmegaConf.create(res["config"]))
    except Exception:
        return "its config cannot be read"
    if stored != res.get("config_hash"):
        return f"config_hash {res.get('config_hash')} is not its config's hash {stored}"
    return None


def finished_elsewhere(out_dir: Path, config_hash: str, roots=()) -> Path | None:
    """A folder beside ``out_dir`` or under ``roots`` (``runs/<name>`` for a sweep's job) holding this config's
    complete run under another spelling of its overrides (``routing=softmax_topk`` is the default written out):
    the same ``cfg=<hash>``, so the same experiment."""
    folders = [f for root in (out_dir.parent, *roots) for f in sorted(Path(root).glob(f"*cfg={config_hash}"))]
    for other in folders:
        if other != out_dir and other.is_dir() and not other.is_symlink() and finished(other, config_hash):
            return other
    return None


def link(out_dir: Path, twin: Path) -> None:
    """A sweep job skipped for its config's complete run elsewhere points its ``results.json`` there (a relative
    symlink), so a report over the sweep's folder has every job's row; the record stays one file."""
    own = out_dir / "results.json"
    if not own.exists() and not own.is_symlink():
        own.symlink_to(os.path.relpath(twin / "results.json", out_dir))


def base_fields(base_meta: dict, fraction: float) -> dict:
    """The dense base's pretraining as the upcycling law reads it (analysis/law.py): its tokens (D1), its training
    FLOPs and ``pretrain_fraction``, its share of the full pretraining (``pretrain.fraction``: the D1 share, not
    the MoE's budget ``train.pretrain_fraction``). None for an HF base: it was trained elsewhere."""
    if not base_meta.get("tokens"):
        return {}
    return {
        "dense_base_tokens": base_meta["tokens"],
        "dense_base_flops": base_meta["train_flops"],
        "pretrain_fraction": float(fraction),
    }


def write(out_dir: Path, res: dict) -> None:
    atomic_write_json(out_dir / "results.json", res)


def record_failure(out_dir: Path, base: dict, error: BaseException) -> None:
    """A failed run's record names the error with its traceback; a pruned trial's only the step and loss it was
    pruned at (an outcome of the search, not an error in the code)."""
    pruned = type(error).__name__ == "TrialPruned"
    record = {**base, "status": "pruned" if pruned else "failed", "error": f"{type(error).__name__}: {error}"}
    if not pruned:
        record["traceback"] = traceback.format_exc()
    atomic_write_json(out_dir / "results.json", record)


def print_summary(res: dict, out_dir: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    what = res["method"] if res["method"] != "upcycle" else f"upcycle {res.get('moe', '')} {res.get('routing', '')}"
    t = Table(title=f"{what} [{res['status']}]")
    for c in ("model", "tokens", "train FLOPs", "val loss"):
        t.add_column(c)
    pretrain = res["method"] == "pretrain"  # the base itself: no parent, and its step 0 is the random init
    if not pretrain:
        t.add_row("dense parent", "-", "-", f"{res['dense_parent_val_loss']:.4f}")
    init = res["init_val_loss"]  # nan: a base pretrained before its random init's loss was kept
    t.add_row(
        f"{res['method']} ({'random init' if pretrain else 'step 0'})", "0", "0", "-" if init != init else f"{init:.4f}"
    )
    t.add_row(res["method"], f"{res['tokens']:,}", f"{res['train_flops']:.3e}", f"{res['val_loss']:.4f}")
    if "dense_iso" in res:
        d = res["dense_iso"]
        t.add_row("dense iso-FLOP", f"{d['tokens']:,}", f"{d['train_flops']:.3e}", f"{d['val_loss']:.4f}")
    if "dense_tokens" in res:
        d = res["dense_tokens"]
        t.add_row("dense, same tokens", f"{d['tokens']:,}", f"{d['train_flops']:.3e}", f"{d['val_loss']:.4f}")
    if "dense_scratch" in res:
        d = res["dense_scratch"]
        t.add_row(
            "dense from scratch, same total", f"{d['tokens']:,}", f"{d['train_flops']:.3e}", f"{d['val_loss']:.4f}"
        )
    parts = [f"{res['method']} {res['val_loss']:.4f}", f"step 0 {res['init_val_loss']:.4f}"]
    parts += [] if pretrain else [f"dense parent {res['dense_parent_val_loss']:.4f}"]
    parts += [f"{k} {res[k]['val_loss']:.4f}" for k in ("dense_iso", "dense_tokens", "dense_scratch") if k in res]
    log.info("val loss: %s -> %s", ", ".join(parts), out_dir / "results.json")  # run.log keeps the table's numbers
    console = Console()
    console.print(t)
    console.print(f"results: {out_dir / 'results.json'}", soft_wrap=True)
    runs = sorted(out_dir.glob("wandb/offline-run-*"))
    if runs:
        console.print(f"W&B (offline): wandb sync {out_dir / 'wandb'}/offline-run-*", soft_wrap=True)
