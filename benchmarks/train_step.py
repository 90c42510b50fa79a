"""Full training step (forward, LM + aux loss, backward, grad clip, fused AdamW) on one GPU:
tokens/s, MFU from the harness's exact FLOP count, peak memory. Dense parent vs upcycled MoE.

The step does what ``harness.lit.LitLM`` does per batch (same model, loss, clipping, optimizer),
without Lightning's loop around it.

    python benchmarks/train_step.py --model medium350m --moe E8G1T2 --compile
    python benchmarks/train_step.py --model large1b --moe none --compile --ckpt
    python benchmarks/train_step.py --model large1b --moe E8G1T2 --compile --ckpt selective --accum 4 --profile 2

``--accum N`` runs N micro-batches of ``--batch`` per optimizer step (a real 1B run's global batch): the clip and
the AdamW update over every parameter then run once per N forward-backward passes. Each step also records how
much of its GPU time the clip + update take (``optimizer_share``), timed with CUDA events so that the host does
not wait between steps. ``--profile N`` runs N more steps under torch.profiler and adds where their device time
went (``device_ms_by_kind``: the expert GEMMs, the other GEMMs, attention, the optimizer, compiled kernels, ...).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from harness import flops
from harness.experiment import COMPILE_MODES, CUDA_GRAPH_MODES
from harness.model import Decoder, ModelConfig
from harness.moe import MoEConfig
from harness.upcycle import Recipe, resolve_moe_layers, upcycle

CONF = Path(__file__).resolve().parents[1] / "conf"


def preset(group: str, name: str, **override) -> dict:
    node = OmegaConf.load(CONF / group / f"{name}.yaml")
    node = {k: v for k, v in OmegaConf.to_container(node).items() if k not in ("_target_", "defaults")}
    return {**node, **override}


def build(args) -> tuple[Decoder, flops.FlopCount]:
    mcfg = ModelConfig(**preset("model", args.model, vocab_size=args.vocab, max_seq_len=args.seq))
    torch.manual_seed(0)
    model = Decoder(mcfg)
    if args.moe == "none":
        return model, flops.count(mcfg, args.seq)
    moe = MoEConfig(**preset("moe", args.moe))
    moe.routing = args.routing
    recipe = Recipe(moe_layers=args.moe_layers)
    model = upcycle(model, moe, recipe)
    return model, flops.count(mcfg, args.seq, moe, resolve_moe_layers(args.moe_layers, mcfg.n_layers))


def profiled(step, steps: int, cuda: bool) -> dict[str, float]:
    """``steps`` steps under torch.profiler: each step's kernel time by what launched it (harness.profiling.KINDS),
    and the GPU's busy time (the union of its kernels) beside the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    from harness.profiling import busy_us, device_ms_by_kind, on_device

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        if cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    busy = busy_us([(e.time_range.start, e.time_range.end) for e in prof.events() if on_device(e)])
    return {"step_ms": round(wall * 1e3 / steps, 3), "busy": round(busy / 1e3 / steps, 3)} | device_ms_by_kind(
        prof, steps
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="medium350m")
    ap.add_argument("--moe", default="E8G1T2", help="an MoE preset from conf/moe, or 'none' for the dense parent")
    ap.add_argument("--moe-layers", default="all")
    ap.add_argument("--routing", default="softmax_topk")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (sequences per forward-backward)")
    ap.add_argument("--accum", type=int, default=1, help="micro-batches per optimizer step")
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument(
        "--compile-mode",
        default="default",
        choices=COMPILE_MODES,
        help="torch.compile's mode for the blocks (reduce-overhead: CUDA graphs, as train.compile_mode)",
    )
    ap.add_argument(
        "--ckpt",
        nargs="?",
        const="full",
        default=None,
        choices=["full", "mlp", "selective"],
        help="activation checkpointing (--ckpt alone: full; mlp: the MLP/MoE layer only; selective: all but matmuls)",
    )
    ap.add_argument("--json", default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument(
        "--profile", type=int, default=0, help="N more steps under torch.profiler: device ms a step by what ran"
    )
    args = ap.parse_args()
    if args.accum < 1:
        ap.error(f"--accum={args.accum} must be >= 1")
    if args.compile and args.compile_mode in CUDA_GRAPH_MODES and args.accum > 1:
        ap.error(f"--compile-mode={args.compile_mode} (CUDA graphs) cannot accumulate gradients (pytorch#169545)")

    model, count = build(args)
    model = model.to(args.device)
    cuda = args.device.startswith("cuda")
    model.activation_checkpointing = args.ckpt
    graphs = args.compile and args.compile_mode in CUDA_GRAPH_MODES
    if args.compile:
        model.compile_blocks(**({} if args.compile_mode == "default" else {"mode": args.compile_mode}))
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
        lr=1e-4,
        betas=(0.9, 0.95),
        fused=cuda,
    )
    # one batch per micro-batch slot, so that no two micro-batches of a step are the same tensor
    xs = [torch.randint(0, args.vocab, (args.batch, args.seq + 1), device=args.device) for _ in range(args.accum)]
    opt_events: list = []  # (start, end) CUDA events around clip + update, read once after the timed steps

    def step():
        for x in xs:
            if graphs:  # the last step's graph outputs are consumed: CUDA graph trees may reuse them
                torch.compiler.cudagraph_mark_step_begin()
            with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16):
                out = model(x[:, :-1], x[:, 1:])
            loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
            (loss / args.accum).backward()
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            b.record()
            opt_events.append((a, b))

    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    warm_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    opt_events.clear()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    tps = args.accum * args.batch * args.seq / dt
    opt_s = sum(a.elapsed_time(b) for a, b in opt_events) / 1e3 / args.steps if cuda else None
    fpt = count.train_per_token
    row = dict(
        model=args.model,
        moe=args.moe,
        moe_layers=args.moe_layers,
        compile=args.compile,
        compile_mode=args.compile_mode if args.compile else None,
        ckpt=args.ckpt,
        seq=args.seq,
        batch=args.batch,
        accum=args.accum,
        params_total=count.params_total,
        params_active=count.params_active,
        step_ms=dt * 1e3,
        optimizer_ms=opt_s * 1e3 if cuda else None,
        optimizer_share=opt_s / dt if cuda else None,
        tokens_per_s=tps,
        achieved_tflops=tps * fpt / 1e12,
        mfu_808=flops.mfu(tps, fpt, flops.H100_BF16_PEAK_MEASURED),
        mfu_989=flops.mfu(tps, fpt, flops.H100_BF16_PEAK_DATASHEET),
        peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        warmup_s=warm_s,
        device=torch.cuda.get_device_name() if cuda else args.device,
        torch=torch.__version__,
    )
    if args.profile:  # after the timed steps, so that the profiler's cost is in none of the figures above
        row["device_ms_by_kind"] = profiled(step, args.profile, cuda)
    print(json.dumps(row))
    if args.json:
        with open(args.json, "a") as fh:
            fh.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
