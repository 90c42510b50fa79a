"""Multi-GPU throughput and memory through the harness's own training path (``harness.fit.fit_and_evaluate``,
so the same launcher, Lightning strategy, data sharding and optimizer as ``python run.py``): one
upcycled model trained on 1 GPU, with DDP and with FSDP, at the same global batch.

Weights are random (a dense parent of the preset's shape, upcycled): speed and memory do not
depend on the values. Prints tokens/s (median over steps after the warm-up), MFU from the exact
FLOP count, the speed-up over the first trainer listed, and peak GPU memory.

    python benchmarks/distributed.py --model medium350m --moe E8G1T2 --trainers gpu ddp fsdp --devices 2
    python benchmarks/distributed.py --model large1b --moe E8G1T2 --num-experts 12 --trainers fsdp --ckpt
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from analysis import collect
from harness import flops
from harness.experiment import build_experiment
from harness.fit import fit_and_evaluate
from harness.model import Decoder
from harness.resolvers import register
from harness.upcycle import upcycle

ROOT = Path(__file__).resolve().parents[1]


def metrics(run_dir: Path, warmup: int) -> tuple[float, float]:
    """Median tokens/s after ``warmup`` steps and the peak memory, from the run's CSV log."""
    m = collect.metrics(run_dir)
    tps = m.loc[m["step"] >= warmup, "perf/tokens_per_s"].dropna().tolist()
    mem = m["perf/max_mem_gib"].dropna().tolist() if "perf/max_mem_gib" in m else []
    return statistics.median(tps), max(mem, default=float("nan"))


def run_one(args, spec_str: str, out: Path) -> dict:
    trainer, *extra = spec_str.split(",")  # "ddp,trainer.strategy.comm_hook=bf16": a trainer plus overrides
    overrides = [
        *extra,
        f"model={args.model}",
        f"moe={args.moe}",
        f"trainer={trainer}",
        f"data.seq_len={args.seq}",
        f"data.batch_size={args.batch}",
        "logger=csv",
        f"paths.output_dir={out}",
        "train.save_checkpoints=false",
        f"train.val_every={10 * args.steps}",
        "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false",
        f"train.peak_tflops={args.peak}",
        "data.val_batches=1",
        f"train.activation_checkpointing={args.ckpt}",
        f"upcycle.moe_layers={args.moe_layers}",
        f"train.compile={args.compile}",
    ]
    if args.micro:
        overrides.append(f"data.micro_batch_size={args.micro}")
    if args.num_experts:
        overrides.append(f"moe.num_experts={args.num_experts}")
    if trainer not in ("gpu", "cpu"):
        overrides.append(f"trainer.devices={args.devices}")
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    exp = build_experiment(cfg)
    exp.data.prepare()
    torch.manual_seed(0)
    model = upcycle(Decoder(exp.model), exp.moe, exp.recipe)
    params = sum(p.numel() for p in model.parameters())
    t0 = time.perf_counter()
    res = fit_and_evaluate(model, exp, cfg, out, args.steps, evaluate_after=args.evaluate)
    tps, mem = metrics(out, args.warmup)
    mfu = tps * res["flops_per_token"] / (args.peak * 1e12 * res["world_size"])
    return {
        "trainer": spec_str,
        "world": res["world_size"],
        "model": args.model,
        "moe": exp.moe.name,
        "params_b": params / 1e9,
        "batch": args.batch,
        "seq": args.seq,
        "ckpt": args.ckpt,
        "tokens_per_s": tps,
        "mfu": mfu,
        "peak_mem_gib": mem,
        "val_loss": res["val_loss"],
        "wall_s": time.perf_counter() - t0,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium350m")
    ap.add_argument("--moe", default="E8G1T2")
    ap.add_argument("--num-experts", type=int, default=None, help="override the preset's expert count")
    ap.add_argument("--moe-layers", default="all")
    ap.add_argument(
        "--trainers",
        nargs="+",
        default=["gpu", "ddp"],
        help="trainer configs, each optionally with overrides: ddp,trainer.strategy.comm_hook=bf16",
    )
    ap.add_argument("--devices", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences per optimizer step)")
    ap.add_argument("--micro", type=int, default=None, help="per-device micro-batch (gradient accumulation)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--ckpt", action="store_true", help="activation checkpointing")
    ap.add_argument("--compile", default="auto", choices=["auto", "true", "false"])
    ap.add_argument(
        "--peak", type=float, default=flops.H100_BF16_PEAK_DATASHEET / 1e12, help="peak bf16 TFLOP/s per GPU for MFU"
    )
    ap.add_argument("--out", default="bench_out/distributed")
    ap.add_argument("--evaluate", action="store_true", help="hand the weights back and report the val loss")
    ap.add_argument("--json", default=None, help="append one JSON line per trainer")
    args = ap.parse_args()
    register()
    rows = []
    for trainer in args.trainers:
        out = Path(args.out) / f"{args.model}_{args.moe}_{trainer.replace(',', '_').replace('=', '-')}"
        try:
            rows.append(run_one(args, trainer, out))
        except Exception as e:  # an OOM is a result here (DDP that cannot fit), not a crash of the benchmark
            rows.append(
                {"trainer": trainer, "model": args.model, "moe": args.moe, "error": f"{type(e).__name__}: {e}"[:300]}
            )
        if args.json:
            with open(args.json, "a") as f:
                f.write(json.dumps(rows[-1]) + "\n")
        print(json.dumps(rows[-1]), flush=True)
    base = next((r["tokens_per_s"] for r in rows if "tokens_per_s" in r), None)
    print(f"{'trainer':40} {'GPUs':>4} {'params':>7} {'tok/s':>9} {'speedup':>7} {'MFU989':>6} {'GiB':>6} {'val':>7}")
    for r in rows:
        if "error" in r:
            print(f"{r['trainer']:40} failed: {r['error'][:120]}")
            continue
        print(
            f"{r['trainer']:40} {r['world']:4d} {r['params_b']:6.2f}B {r['tokens_per_s']:9.0f} "
            f"{r['tokens_per_s'] / base:7.2f} {r['mfu']:6.1%} {r['peak_mem_gib']:6.1f} {r['val_loss']:7.3f}"
        )  # nan without --evaluate


if __name__ == "__main__":
    main()
