"""DESIGN.md invariant 4 and the routing modes, checked against references written differently."""

import math

import pytest
import torch

from harness.moe import MoE, MoEConfig, route


def _reference_route(logits: torch.Tensor, top_k: int, routing: str) -> list[list[tuple[int, float]]]:
    """Per token, written out with math.exp and a sort: [(expert, weight)] for the T chosen experts.
    softmax_topk: the full softmax's probabilities of the T largest, not renormalised; topk_softmax: a
    softmax over the T largest logits only; sigmoid_topk: the T largest sigmoids, not renormalised."""
    out = []
    for row in logits.tolist():
        top = sorted(range(len(row)), key=lambda e: -row[e])[:top_k]
        if routing == "softmax_topk":
            z = sum(math.exp(v) for v in row)
            out.append([(e, math.exp(row[e]) / z) for e in top])
        elif routing == "sigmoid_topk":
            out.append([(e, 1 / (1 + math.exp(-row[e]))) for e in top])
        else:
            z = sum(math.exp(row[e]) for e in top)
            out.append([(e, math.exp(row[e]) / z) for e in top])
    return out


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax"])
def test_routing_modes_match_reference(routing):
    logits = torch.randn(50, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    w, idx, probs = route(logits, 2, routing)
    for n, chosen in enumerate(_reference_route(logits, 2, routing)):
        got = dict(zip(idx[n].tolist(), w[n].tolist()))
        assert set(got) == {e for e, _ in chosen}
        for e, weight in chosen:
            assert abs(got[e] - weight) < 1e-12
        row = logits[n].tolist()
        z = sum(math.exp(v) for v in row)
        assert all(abs(probs[n, e].item() - math.exp(row[e]) / z) < 1e-12 for e in range(8))


def layer(backend="loop", **kw):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, expert_backend=backend, **kw)
    return MoE(32, 64, "swiglu", cfg)


@pytest.mark.parametrize("routing", ["softmax_topk", "topk_softmax", "sigmoid_topk"])
@pytest.mark.parametrize("activation", ["swiglu", "relu2"])
def test_dropless_loop_matches_dense_reference(routing, activation):
    """Every token gets exactly T experts; the output equals a per-token reference loop."""
    torch.manual_seed(0)
    m = MoE(32, 64, activation, MoEConfig(num_experts=8, top_k=2, routing=routing, router_init_std=0.5))
    x = torch.randn(3, 7, 32)
    y, aux = m(x)
    assert aux.tokens_per_expert.sum().item() == 3 * 7 * 2
    x2 = x.reshape(-1, 32)
    chosen = _reference_route((x2 @ m.router.weight.t()).double(), 2, routing)
    ref = torch.zeros_like(x2)
    for n in range(x2.shape[0]):
        assert len({e for e, _ in chosen[n]}) == 2
        for e, weight in chosen[n]:
            h = x2[n] @ m.experts.w1[e].t()
            h = torch.nn.functional.silu(h[:64]) * h[64:] if activation == "swiglu" else torch.relu(h) ** 2
            ref[n] += weight * (h @ m.experts.w2[e].t())
    torch.testing.assert_close(y.reshape(-1, 32), ref, rtol=1e-5, atol=1e-5)


def test_grouped_mm_path_matches_loop_on_cpu():
    if not hasattr(torch, "_grouped_mm"):
        pytest.skip("torch._grouped_mm missing")
    a, b = layer("loop", router_init_std=0.5), layer("grouped_mm", router_init_std=0.5)
    b.load_state_dict(a.state_dict())
    x = torch.randn(64, 32, requires_grad=True)
    ya, _ = a(x)
    try:
        yb, _ = b(x)
    except RuntimeError as e:
        pytest.skip(f"grouped_mm not available on CPU in this torch: {e}")
    torch.testing.assert_close(ya, yb, rtol=1e-5, atol=1e-5)
    ga = torch.autograd.grad(ya.square().sum(), [x, a.experts.w1])
    gb = torch.autograd.grad(yb.square().sum(), [x, b.experts.w1])
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-5)


def test_aux_losses_and_stats():
    m = layer(aux_loss_coef=0.01, z_loss_coef=1e-3)
    y, aux = m(torch.randn(128, 32))
    torch.testing.assert_close(aux.loss, 0.01 * aux.load_balance + 1e-3 * aux.z_loss)
    # Switch/GShard/Megatron: E * sum_e f_e P_e, f_e = (tokens routed to e) / (N*T), P_e = mean router prob.
    x = torch.randn(128, 32, generator=torch.Generator().manual_seed(2))
    _, aux = m(x)
    logits = (x @ m.router.weight.t()).double()
    chosen = _reference_route(logits, 2, "softmax_topk")
    count = [sum(e == c for row in chosen for c, _ in row) for e in range(8)]
    p = logits.softmax(-1)
    f = [c / (128 * 2) for c in count]
    P = [p[:, e].mean().item() for e in range(8)]
    assert abs(aux.load_balance.item() - 8 * sum(fe * pe for fe, pe in zip(f, P))) < 1e-5
    assert aux.tokens_per_expert.tolist() == count
    mean = sum(count) / 8
    cv = (sum((c - mean) ** 2 for c in count) / 8) ** 0.5 / mean
    assert abs(aux.load_cv.item() - cv) < 1e-5
    ent = -(p * p.log()).sum(-1).mean().item()
    assert abs(aux.entropy.item() - ent) < 1e-5
    # a collapsed router gives the maximal load-balance loss E*1*1/... > balanced value
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[0] += 10.0
    x = torch.randn(128, 32).abs()
    _, collapsed = m(x)
    assert collapsed.load_balance > 1.5 and collapsed.load_cv > 1.0


@pytest.mark.gpu
def test_grouped_mm_matches_loop_on_cuda_bf16():
    a = layer("loop", router_init_std=0.5).cuda().bfloat16()
    b = layer("grouped_mm", router_init_std=0.5).cuda().bfloat16()
    b.load_state_dict(a.state_dict())
    x = torch.randn(4096, 32, device="cuda", dtype=torch.bfloat16)
    ya, yb = a(x)[0].float(), b(x)[0].float()
    assert ((ya - yb).norm() / ya.norm()).item() < 1e-2


@pytest.mark.parametrize("compiled", [False, True])
def test_combine_has_the_gradient_of_gather_then_weighted_sum(compiled):
    """unpermute (hand-written backward) == autograd through ``(out[inverse] * w).sum over T``, for the
    eager branch and the branch torch.compile traces (aot_eager: the same graph, no C++ compiler)."""
    from harness.moe import _Combine, permute, unpermute

    torch.manual_seed(0)
    n, t, d = 7, 3, 4
    order, inverse, counts = permute(torch.randint(0, 5, (n, t)), 5)
    assert torch.equal(order[inverse], torch.arange(n * t)) and counts.sum() == n * t
    out = torch.randn(n * t, d, requires_grad=True)
    w = torch.rand(n, t, requires_grad=True)
    grad_y = torch.randn(n, d)
    ref = (out[inverse].view(n, t, d) * w.unsqueeze(-1)).sum(1)
    ref_grads = torch.autograd.grad(ref, [out, w], grad_y)
    fn = lambda o, ww: unpermute(o, order, inverse, ww)  # noqa: E731
    if compiled:  # fp32 here: torch 2.11 returned zero gradients for fp32 before _sum_copies' fix
        fn = torch.compile(fn, backend="aot_eager", fullgraph=True)
    y = fn(out, w)
    torch.testing.assert_close(y, ref)
    for got, want in zip(torch.autograd.grad(y, [out, w], grad_y), ref_grads):
        torch.testing.assert_close(got, want)
    if not compiled:
        args = (out.detach().double().requires_grad_(), w.detach().double().requires_grad_())
        assert torch.autograd.gradcheck(lambda a, b: _Combine.apply(a, b, order, inverse), args)


def test_dispatch_has_the_exact_gradient_of_expand_then_sort():
    """dispatch(x) == x repeated T times then sorted, value and gradient (the sum over T copies)."""
    from harness.moe import dispatch, permute

    torch.manual_seed(0)
    experts = torch.randint(0, 5, (7, 3))
    order, inverse, _ = permute(experts, 5)
    x = torch.randn(7, 4, dtype=torch.double, requires_grad=True)
    ref = x.unsqueeze(1).expand(-1, 3, -1).reshape(-1, 4)[order]
    assert torch.equal(dispatch(x, order, inverse, 3), ref)
    assert torch.autograd.gradcheck(lambda a: dispatch(a, order, inverse, 3), (x,))


def test_experts_run_in_the_autocast_dtype():
    """Under autocast the residual stream is fp32: the experts must still get compute-dtype tokens
    (else the fast grouped-GEMM path, which needs bf16, silently fell back to the per-expert loop)."""
    m = layer(router_init_std=0.5)
    seen = []
    m.experts.register_forward_pre_hook(lambda mod, args: seen.append(args[0].dtype))
    x = torch.randn(16, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, aux = m(x)
    assert seen == [torch.bfloat16] and y.dtype == torch.bfloat16
    assert aux.load_balance.dtype == torch.float32
    y32, _ = m(x)
    assert seen[-1] == torch.float32 and ((y.float() - y32).norm() / y32.norm()).item() < 3e-2


def test_router_precision_is_validated():
    from harness.errors import ConfigError

    with pytest.raises(ConfigError, match="router_precision='bf16'"):
        MoEConfig(router_precision="bf16").validate()


@pytest.mark.gpu
def test_compiled_moe_layer_matches_eager_on_cuda():
    """The compiled layer (its hand-written backwards take their torch.compile branches) gives the
    eager layer's output and gradients, for a few experts (fused router gradient), for more, and in fp32."""
    torch.manual_seed(0)
    for e, g, t, dtype in [(8, 1, 2, torch.bfloat16), (32, 4, 4, torch.bfloat16), (8, 1, 2, torch.float32)]:
        moe = MoE(256, 512, "swiglu", MoEConfig(num_experts=e, granularity=g, top_k=t, router_init_std=0.5))
        moe = moe.to("cuda", dtype)
        x = torch.randn(4096, 256, device="cuda", dtype=dtype, requires_grad=True)
        results = []
        for run in (moe, torch.compile(moe)):
            y, aux = run(x)
            loss = y.float().square().mean() + aux.loss
            results.append((y, *torch.autograd.grad(loss, [x, moe.experts.w1, moe.experts.w2, moe.router.weight])))
        for a, b in zip(*results):
            assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2


@pytest.mark.gpu
def test_mixed_router_matches_fp32_router_on_cuda():
    """bf16 operands with fp32 logits: logits and both gradients within bf16 rounding of fp32."""
    from harness.moe import router_logits

    torch.manual_seed(0)
    x = torch.randn(4096, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(8, 256, device="cuda") * 0.1).requires_grad_()
    grads = []
    for precision in ("mixed", "fp32"):
        logits = router_logits(x, w, precision)
        assert logits.dtype == torch.float32
        grads.append((logits, *torch.autograd.grad(logits.square().sum(), [x, w])))
    for a, b in zip(*grads):
        assert a.dtype == b.dtype
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 1e-2
    compiled = torch.compile(lambda a, b: router_logits(a, b, "mixed"))
    torch.testing.assert_close(compiled(x, w), grads[0][0], rtol=1e-3, atol=1e-3)
