"""One MoE layer fwd+bwd (router, permutation, grouped experts, un-permutation, aux loss) against a
dense MLP of the same active FLOPs, in bf16 on CUDA. Also checks grouped_mm == per-expert loop, and
times Hugging Face transformers' own MoE block (``MixtralSparseMoeBlock`` with its grouped_mm experts)
holding the same weights, after checking that it computes our output.

    python benchmarks/moe_layer.py            # d=2048, f=8192, 16k tokens; prints a table
    python benchmarks/moe_layer.py --recipes  # the modern recipes at E8G1T2's active FLOPs, against the same MLP
"""

from __future__ import annotations

import argparse
import json

import torch

from harness.export import mixtral_moe_block
from harness.mlp import MLP
from harness.moe import MoE, MoEConfig, route, router_logits


def fresh_grads(*modules) -> None:
    """As the training step does (zero_grad(set_to_none=True)): each measured backward writes new
    gradients instead of adding into the last ones (an extra read-modify-write of every weight
    gradient, 4x larger for the MoE than for its same-FLOP dense MLP; ~6% of the v4 E8G1T2 step)."""
    for m in modules:
        for p in m.parameters():
            p.grad = None


def bench(fn, iters=20, warmup=5):
    """Median seconds per call, with the host waiting for the GPU after each call (so each call
    also pays the host's launch latency before its first kernel, ~1 ms for a compiled layer)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    return sorted(times)[len(times) // 2]


def bench_steady(fn, iters=20, warmup=5):
    """Mean seconds per call over calls issued back to back, as a training step issues its layers:
    the host runs ahead, so this is the GPU's time for the layer."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / 1e3 / iters


def interleaved(fns: dict, rounds: int = 3) -> dict:
    """Median over ``rounds`` of each timing, the candidates taking turns within each round, so that
    clock and temperature drift (±5% between minutes on the lent H100) hit them alike."""
    got = {name: ([], []) for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            got[name][0].append(bench(fn))
            got[name][1].append(bench_steady(fn))
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    return {name: (med(s), med(b)) for name, (s, b) in got.items()}


def profile(fn, title: str, rows: int = 15) -> None:
    """Where the time goes: the CUDA kernels of a few steps, by total time."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
    print(f"--- {title}: top CUDA kernels (3 steps)")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70))


def sync_check(d: int, f: int, tokens: int) -> None:
    """Does the compiled E8G1T2 step make the host wait on the GPU? Prints every synchronizing call
    (torch's sync debug mode) and the host-side CUDA API calls of three steps, by CPU time."""
    import warnings

    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    moe = torch.compile(MoE(d, f, "swiglu", MoEConfig(num_experts=8, top_k=2, aux_loss_coef=0.01)).cuda().bfloat16())
    x = torch.randn(tokens, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)

    def step():
        y, aux = moe(x)
        (y.float().square().mean() + aux.loss).backward()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        step()
        torch.cuda.set_sync_debug_mode("default")
    print(f"synchronizing calls in one step: {len(caught)}")
    for w in caught[:10]:
        print(f"  {w.filename}:{w.lineno}: {str(w.message)[:120]}")
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


# The recipes of modern MoE practice at E8G1T2's active FLOPs (2 of the dense width f per token): what each
# costs in the layer against the same dense MLP. The shared-expert shape E16G2T3S1 routes 3 of 16 half-width
# experts beside one always-on half-width expert (2f active). expert_bias's bias update runs after the optimizer
# step, outside the layer's forward-backward, so its row is the biased top-k and sigmoid scores alone.
RECIPES = {
    "E8G1T2 softmax_topk aux_loss": dict(num_experts=8, top_k=2),
    "E8G1T2 topk_softmax": dict(num_experts=8, top_k=2, routing="topk_softmax"),
    "E8G1T2 sigmoid_topk expert_bias": dict(
        num_experts=8, top_k=2, routing="sigmoid_topk", load_balancing="expert_bias", norm_topk_prob=True
    ),
    "E8G1T2 capacity 1.25": dict(num_experts=8, top_k=2, capacity_factor=1.25),
    "E8G1T2 capacity 1.0": dict(num_experts=8, top_k=2, capacity_factor=1.0),
    "E16G2T3S1 shared expert": dict(num_experts=16, granularity=2, top_k=3, shared_experts=1),
}


def recipes(d: int, f: int, tokens: int, rounds: int, device: str) -> list[dict]:
    """Each recipe's compiled step (fp32 weights, bf16 autocast, as training runs it) against the dense MLP of
    the same active FLOPs, timed in turns with it (``interleaved``). On a CPU each step runs once, untimed."""
    cuda = device == "cuda"
    x = torch.randn(tokens, d, device=device, requires_grad=True)
    dense = MLP(d, 2 * f, "swiglu").to(device)
    layers = {"dense MLP, width 2f": dense}
    for name, kw in RECIPES.items():
        torch.manual_seed(0)
        cfg = MoEConfig(router_init_std=0.02, aux_loss_coef=0.01, **kw)
        layers[name] = MoE(d, f, "swiglu", cfg).to(device)

    def step(layer):
        fresh_grads(layer)
        x.grad = None
        with torch.autocast(device, dtype=torch.bfloat16):
            out = layer(x)
        y, aux = out if isinstance(out, tuple) else (out, None)
        loss = y.float().square().mean() + (aux.loss if aux is not None else 0.0)
        loss.backward()

    compiled = {name: torch.compile(layer) for name, layer in layers.items()}
    if not cuda:
        for c in compiled.values():
            step(c)
        return [dict(recipe=name, timed=False) for name in compiled]
    timed = interleaved({name: (lambda c=c: step(c)) for name, c in compiled.items()}, rounds)
    flops = 6 * 3 * d * 2 * f * tokens  # fwd+bwd of the active expert matmuls (router excluded)
    base = timed["dense MLP, width 2f"][1]
    return [
        dict(recipe=name, ms_steady=st * 1e3, tflops_steady=flops / st / 1e12, dense_over_layer_steady=base / st)
        for name, (_, st) in timed.items()
    ]


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def hf_check(moe: MoE, hf, x: torch.Tensor) -> tuple[float, float]:
    """(rel err of our output against the HF block's, on the tokens both route to the same experts; the
    fraction of tokens routed differently). No aux loss: HF's block has none. HF's router rounds its logits
    to bf16 before the softmax where ours keeps them fp32, so where the T-th and (T+1)-th logits nearly
    tie, it can pick another expert: such a token differs by a whole expert's output, a rounding and
    not a mapping error, so it is counted instead of compared."""
    with torch.no_grad():
        y, _ = moe(x)
        y_hf = hf(x.unsqueeze(0)).squeeze(0)
        logits = router_logits(x, moe.router.weight, moe.cfg.router_precision)
        ids = route(logits, moe.cfg.top_k, moe.cfg.routing)[1]
        same = (ids.sort(-1).values == hf.gate(x)[2].sort(-1).values).all(-1)
    return rel(y_hf[same], y[same]), 1 - same.float().mean().item()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--f", type=int, default=8192)
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--json", default=None)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds for the compiled dense/MoE pair")
    ap.add_argument("--profile", action="store_true", help="print the top CUDA kernels of the compiled MoE step")
    ap.add_argument("--sync-check", action="store_true", help="only: list host syncs of the compiled E8G1T2 step")
    ap.add_argument("--recipes", action="store_true", help="only: the modern recipes against the same dense MLP")
    ap.add_argument("--device", default="cuda", help="--recipes only: cpu runs each step once, untimed")
    args = ap.parse_args()
    if args.sync_check:
        return sync_check(args.d, args.f, args.tokens)
    if args.recipes:
        torch._dynamo.config.recompile_limit = 64
        rows = recipes(args.d, args.f, args.tokens, args.rounds, args.device)
        print(f"d={args.d} f={args.f} tokens={args.tokens}, compiled, fp32 weights under bf16 autocast, steady")
        print(f"{'layer':34} {'ms':>7} {'TF/s':>6} {'dense/layer':>11}")
        for r in rows:
            if r.get("timed", True):
                ms, tf, ratio = r["ms_steady"], r["tflops_steady"], r["dense_over_layer_steady"]
                print(f"{r['recipe']:34} {ms:7.2f} {tf:6.0f} {ratio:11.3f}")
            else:
                print(f"{r['recipe']:34} ran once on {args.device} (timing needs CUDA)")
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(rows, fh, indent=1)
        return
    dev, dt = "cuda", torch.bfloat16
    torch._dynamo.config.recompile_limit = 64  # one layer is recompiled per shape, dtype and router mode
    rows = []
    for e, g, t in [(8, 1, 2), (64, 8, 8)]:
        torch.manual_seed(0)
        # Mixtral's routing, which HF's block computes (the routing mode costs one top-k either way)
        cfg = MoEConfig(
            num_experts=e, granularity=g, top_k=t, routing="topk_softmax", router_init_std=0.02, aux_loss_coef=0.01
        )
        moe = MoE(args.d, args.f, "swiglu", cfg).to(dev, dt)
        moe.experts.backend = "grouped_mm"
        hf = mixtral_moe_block(moe, "grouped_mm")  # a copy of moe's weights, bf16 on CUDA
        x = torch.randn(args.tokens, args.d, device=dev, dtype=dt, requires_grad=True)
        # correctness: grouped vs loop, forward and grads
        y_g, aux = moe(x)
        gx_g, gw_g = torch.autograd.grad((y_g.float().square().mean() + aux.loss), [x, moe.experts.w1])
        moe.experts.backend = "loop"
        y_l, aux_l = moe(x)
        gx_l, gw_l = torch.autograd.grad((y_l.float().square().mean() + aux_l.loss), [x, moe.experts.w1])
        err = max(rel(y_g, y_l), rel(gx_g, gx_l), rel(gw_g, gw_l))
        moe.experts.backend = "grouped_mm"
        err_hf, hf_rerouted = hf_check(moe, hf, x.detach())
        active_ff = args.f * t // g
        dense = MLP(args.d, active_ff, "swiglu").to(dev, dt)
        flops = 6 * 3 * args.d * active_ff * args.tokens  # fwd+bwd of the expert matmuls (router excluded)

        def step(layer, backend=None, batched=False):
            fresh_grads(layer)
            x.grad = None
            if backend:
                moe.experts.backend = backend
            out = layer(x.unsqueeze(0) if batched else x)  # HF's block takes [batch, seq, d]
            loss = (
                out[0].float().square().mean() + out[1].loss if isinstance(out, tuple) else out.float().square().mean()
            )
            loss.backward()

        t_dense = bench(lambda: step(dense))
        t_grouped = bench(lambda: step(moe, "grouped_mm"))
        t_loop = bench(lambda: step(moe, "loop"))
        moe.experts.backend = "grouped_mm"
        # ours against HF's block: ours also computes and backpropagates its aux loss (HF's leaves that to the model)
        dense_c, moe_c, hf_c = torch.compile(dense), torch.compile(moe), torch.compile(hf)
        timed = interleaved(
            {"dense": lambda: step(dense_c), "moe": lambda: step(moe_c), "hf": lambda: step(hf_c, batched=True)},
            args.rounds,
        )
        (t_dense_c, t_dense_steady), (t_grouped_c, t_grouped_steady) = timed["dense"], timed["moe"]
        t_hf_c, t_hf_steady = timed["hf"]
        if args.profile:
            profile(lambda: step(moe_c), f"E{e}G{g}T{t} compiled")
        # the v3 router (both operands cast to fp32) for comparison, compiled
        moe.cfg.router_precision = "fp32"
        moe_c32 = torch.compile(moe)
        t_fp32_router_c = bench(lambda: step(moe_c32))
        moe.cfg.router_precision = "mixed"
        # as training runs it: fp32 master weights and fp32 residual stream under bf16 autocast, compiled
        dense32, moe32 = dense.float(), moe.float()
        x32 = x.detach().float().requires_grad_()

        def step_autocast(layer):
            fresh_grads(layer)
            x32.grad = None
            with torch.autocast("cuda", dtype=dt):
                out = layer(x32)
            loss = (
                out[0].float().square().mean() + out[1].loss if isinstance(out, tuple) else out.float().square().mean()
            )
            loss.backward()

        dense_amp, moe_amp = torch.compile(dense32), torch.compile(moe32)
        timed = interleaved(
            {"dense": lambda: step_autocast(dense_amp), "moe": lambda: step_autocast(moe_amp)}, args.rounds
        )
        (t_dense_amp, t_dense_amp_steady), (t_moe_amp, t_moe_amp_steady) = timed["dense"], timed["moe"]
        rows.append(
            dict(
                shape=f"E{e}G{g}T{t}",
                rel_err_grouped_vs_loop=err,
                rel_err_vs_hf=err_hf,
                hf_rerouted_fraction=hf_rerouted,
                dense_tflops=flops / t_dense / 1e12,
                grouped_tflops=flops / t_grouped / 1e12,
                loop_tflops=flops / t_loop / 1e12,
                ratio_grouped_over_dense=t_dense / t_grouped,
                ms_dense=t_dense * 1e3,
                ms_grouped=t_grouped * 1e3,
                ms_loop=t_loop * 1e3,
                dense_compiled_tflops=flops / t_dense_c / 1e12,
                grouped_compiled_tflops=flops / t_grouped_c / 1e12,
                ratio_compiled=t_dense_c / t_grouped_c,
                ms_dense_compiled=t_dense_c * 1e3,
                ms_grouped_compiled=t_grouped_c * 1e3,
                ms_dense_steady=t_dense_steady * 1e3,
                ms_grouped_steady=t_grouped_steady * 1e3,
                ratio_steady=t_dense_steady / t_grouped_steady,
                hf_compiled_tflops=flops / t_hf_c / 1e12,
                ms_hf_compiled=t_hf_c * 1e3,
                ms_hf_steady=t_hf_steady * 1e3,
                ratio_ours_over_hf_compiled=t_hf_c / t_grouped_c,
                ratio_ours_over_hf_steady=t_hf_steady / t_grouped_steady,
                ratio_best=min(t_dense, t_dense_c) / min(t_grouped, t_grouped_c),
                grouped_compiled_fp32_router_tflops=flops / t_fp32_router_c / 1e12,
                dense_autocast_tflops=flops / t_dense_amp / 1e12,
                moe_autocast_tflops=flops / t_moe_amp / 1e12,
                ratio_autocast=t_dense_amp / t_moe_amp,
                ratio_autocast_steady=t_dense_amp_steady / t_moe_amp_steady,
            )
        )
    print(torch.cuda.get_device_name(), "torch", torch.__version__, f"d={args.d} f={args.f} tokens={args.tokens}")
    print(
        f"{'shape':10} {'rel_err':>9} {'dense':>6} {'grouped':>8} {'loop':>6} {'ratio':>6} "
        f"{'dense_c':>8} {'grouped_c':>9} {'ratio_c':>7} {'best/best':>9} {'fp32rt_c':>8} "
        f"{'dense_amp':>9} {'moe_amp':>7} {'ratio_amp':>9} {'hf_c':>5} | "
        f"{'ms_dense_st':>11} {'ms_moe_st':>9} {'ratio_steady':>12} {'ratio_amp_st':>12} {'ms_hf_st':>8} "
        f"{'ours/hf_st':>10} | {'err_vs_hf':>9} {'rerouted':>8}"
    )
    print(
        "  (TF/s; _c = torch.compile; fp32rt = the v3 fp32 router; _amp = fp32 weights under bf16 autocast, compiled;"
        " hf = transformers' MixtralSparseMoeBlock, grouped_mm experts, same weights; _st = compiled, steps issued"
        " back to back, ms; ours/hf > 1: ours faster; err_vs_hf on the tokens both route alike, rerouted: the"
        " fraction HF's bf16 router logits send elsewhere)"
    )
    for r in rows:
        print(
            f"{r['shape']:10} {r['rel_err_grouped_vs_loop']:9.2e} {r['dense_tflops']:6.0f} "
            f"{r['grouped_tflops']:8.0f} {r['loop_tflops']:6.0f} {r['ratio_grouped_over_dense']:6.2f} "
            f"{r['dense_compiled_tflops']:8.0f} {r['grouped_compiled_tflops']:9.0f} {r['ratio_compiled']:7.2f} "
            f"{r['ratio_best']:9.2f} {r['grouped_compiled_fp32_router_tflops']:8.0f} {r['dense_autocast_tflops']:9.0f} "
            f"{r['moe_autocast_tflops']:7.0f} {r['ratio_autocast']:9.2f} {r['hf_compiled_tflops']:5.0f} | "
            f"{r['ms_dense_steady']:11.2f} {r['ms_grouped_steady']:9.2f} {r['ratio_steady']:12.3f} "
            f"{r['ratio_autocast_steady']:12.3f} {r['ms_hf_steady']:8.2f} {r['ratio_ours_over_hf_steady']:10.3f} | "
            f"{r['rel_err_vs_hf']:9.2e} {r['hf_rerouted_fraction']:8.2%}"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
