"""W&B around the stages: each stage (pretrain, upcycle, dense_iso) is one W&B run in the job's group,
with the full resolved config, training FLOPs as x-axis, and an id stored in the stage's folder so a
resumed stage continues its run. (Which loggers a Trainer gets is ``harness.fit._loggers``.)"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from harness.identity import resolved

# metrics plotted against training FLOPs in W&B, so MoE and dense runs share one x-axis
FLOPS_AXIS_METRICS = ("train/*", "val/*", "moe/*", "perf/*", "lr")


def setup(run, cfg: DictConfig) -> None:
    """The run's full resolved config, and training FLOPs as the x-axis of its curves."""
    if not hasattr(run, "define_metric"):  # a non-zero rank's dummy
        return
    run.config.update(resolved(cfg), allow_val_change=True)
    run.define_metric("flops/train_total")
    for pattern in FLOPS_AXIS_METRICS:  # every logged row carries flops/train_total (LitLM logs it beside val/loss)
        run.define_metric(pattern, step_metric="flops/train_total")


def stage(cfg: DictConfig, job_type: str, state_dir: Path, name: str) -> DictConfig:
    """``cfg`` with its W&B logger set for one stage: job_type, name, and the id stored in the stage's
    folder (created on first use), so a resumed stage continues its W&B run instead of starting one."""
    if "wandb" not in (cfg.get("logger") or {}):
        return cfg
    id_file = state_dir / "wandb_id"
    if not id_file.is_file() or not id_file.read_text().strip():
        import secrets

        state_dir.mkdir(parents=True, exist_ok=True)
        id_file.write_text(secrets.token_hex(4))
    cfg = copy.deepcopy(cfg)
    with open_dict(cfg):
        cfg.logger.wandb.job_type, cfg.logger.wandb.name = job_type, name
        cfg.logger.wandb.id = id_file.read_text().strip()
    return cfg


def summary(cfg: DictConfig, res: dict) -> None:
    """Reopen the job's W&B run (training closed it) for what is known only at the end: the final
    evaluations in its summary and the iso-FLOP dense curve on the same FLOPs axis."""
    if "wandb" not in (cfg.get("logger") or {}) or not cfg.logger.wandb.get("id"):
        return
    w = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    if not list(Path(w["save_dir"]).glob(f"wandb/*run-*-{w['id']}")):  # W&B never started for this run
        return
    try:
        import wandb

        run = wandb.init(
            project=w["project"],
            id=w["id"],
            resume="allow",
            dir=w["save_dir"],
            mode=w.get("mode"),
            group=w.get("group"),
            job_type=w.get("job_type"),
            name=w.get("name"),
            tags=w.get("tags"),
            reinit="create_new",
        )
        iso = res.get("dense_iso") or {}
        if iso.get("val_curve"):
            run.define_metric("dense_iso/flops")
            run.define_metric("dense_iso/val_loss", step_metric="dense_iso/flops")
            for p in iso["val_curve"]:
                run.log({"dense_iso/flops": p["flops"], "dense_iso/val_loss": p["val_loss"]})
        run.summary.update(
            {
                k: res[k]
                for k in (
                    "status",
                    "val_loss",
                    "best_val_loss",
                    "init_val_loss",
                    "dense_parent_val_loss",
                    "train_flops",
                    "tokens",
                )
                if k in res
            }
        )
        for field in ("dense_iso", "dense_scratch"):  # the iso-FLOP twin, the dense model from scratch
            if res.get(field):
                d = res[field]
                run.summary.update(
                    {f"{field}/val_loss": d.get("val_loss"), f"{field}/train_flops": d.get("train_flops")}
                )
        run.summary.update(  # eval stage: downstream/<model>/<task>/<metric> beside the val losses
            {
                f"downstream/{m}/{t}/{k}": v
                for m, tasks in (res.get("downstream") or {}).items()
                for t, metrics in tasks.items()
                for k, v in metrics.items()
            }
        )
        run.finish()
    except Exception as e:  # never let logging sink a finished run
        warnings.warn(f"W&B summary not written ({type(e).__name__}: {e})")
