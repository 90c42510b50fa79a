"""One rank of a multi-device fit, started by ``harness.launch`` as ``python -m harness.worker <dir>``."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

import torch
from omegaconf import OmegaConf

from harness.experiment import build_experiment
from harness.fit import fit_in_process
from harness.pruning import pruning_callbacks


def worker_main(folder: Path) -> None:
    """One rank: rebuild the job from ``folder`` and run the same ``fit_in_process`` as a single-device job."""
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0"))))
    try:
        cfg = OmegaConf.load(folder / "config.yaml")
        args = json.loads((folder / "args.json").read_text())
        job = torch.load(folder / "job.pt", weights_only=False)
        exp = build_experiment(cfg)
        exp.optim = job["optim"]
        model = job["model"]
        res, trainer = fit_in_process(
            model,
            exp,
            cfg,
            Path(args["out_dir"]),
            args["steps"],
            args["csv_only"],
            extra_callbacks=pruning_callbacks(cfg, args["pruner"]) if args.get("scored") else [],
        )
        hand_back = args.get("hand_back", True)
        # a collective under FSDP: every rank calls it
        state = trainer.strategy.lightning_module_state_dict() if hand_back else {}
        if trainer.is_global_zero:
            state = {k.removeprefix("model."): v.detach().cpu() for k, v in state.items()}
            if hand_back:
                torch.save(state, folder / "final.pt.tmp")
                (folder / "final.pt.tmp").replace(folder / "final.pt")
            (folder / "result.json").write_text(json.dumps(res))
    except BaseException as e:
        (folder / f"error_rank{rank}.txt").write_text(
            json.dumps({"error": [type(e).__name__, str(e)], "traceback": traceback.format_exc()})
        )
        raise


if __name__ == "__main__":
    worker_main(Path(sys.argv[1]))
