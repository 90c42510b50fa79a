"""An exported run computes its own validation loss in ``transformers``: the folder written by ``harness.export``,
loaded with ``AutoModelForCausalLM``, on the run's validation windows (its config's data block, the same cached
shards), against ``val_loss`` in the run's results.json. Both are fp32 means of per-batch token cross-entropy.

    python -m analysis.hf_check <run_dir> <hf_dir> [--tol 0.001] [--out check.json]

Prints both numbers as JSON and exits 1 when they differ by more than ``--tol`` (absolute, in nats). The default
allows for other kernels (ours may be torch.compile'd, transformers' eager; the experts summed in another order).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from harness.errors import ConfigError


def validation_loader(run_dir: Path):
    """The run's validation windows, as its own evaluation saw them (rebuilt from its resolved config)."""
    from omegaconf import OmegaConf

    from harness.data import TokenDataModule

    data = OmegaConf.to_container(OmegaConf.load(run_dir / "config_resolved.yaml").data)
    data.pop("_target_")
    return TokenDataModule(**data).val_dataloader()


def hf_val_loss(hf_dir: Path, loader, device: torch.device) -> float:
    from transformers import AutoModelForCausalLM

    from harness.lit import mean_loss

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).to(device).eval()

    def batch_loss(x, y):  # transformers' logits, our targets (shifted already): the same loss as Decoder's
        logits = model(x).logits.float()
        return F.cross_entropy(logits.view(-1, logits.shape[-1]), y.reshape(-1)).item()

    return mean_loss(batch_loss, loader, device)


def check(run_dir: str | Path, hf_dir: str | Path, tol: float = 1e-3) -> dict:
    run_dir, hf_dir = Path(run_dir), Path(hf_dir)
    res_path = run_dir / "results.json"
    if not res_path.exists() or not (hf_dir / "config.json").exists():
        raise ConfigError(f"need {res_path} and an exported folder {hf_dir} (python -m harness.export)")
    res = json.loads(res_path.read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ours, theirs = float(res["val_loss"]), hf_val_loss(hf_dir, validation_loader(run_dir), device)
    return {
        "run_dir": str(run_dir),
        "hf_dir": str(hf_dir),
        "hf_class": json.loads((hf_dir / "config.json").read_text())["architectures"][0],
        "results_val_loss": ours,
        "transformers_val_loss": theirs,
        "abs_diff": abs(ours - theirs),
        "tol": tol,
        "device": str(device),
        "ok": abs(ours - theirs) <= tol,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description="Does transformers compute the run's validation loss from its export?")
    ap.add_argument("run_dir")
    ap.add_argument("hf_dir")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest absolute difference accepted (nats)")
    ap.add_argument("--out", help="also write the result here (JSON)")
    args = ap.parse_args(argv)
    try:
        out = check(args.run_dir, args.hf_dir, args.tol)
    except ConfigError as e:
        raise SystemExit(f"hf_check error: {e}") from None
    text = json.dumps(out, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    sys.exit(0 if out["ok"] else 1)


if __name__ == "__main__":
    main()
