"""Shared experts upcycled from the dense MLP (exact at step 0, FLOPs, export to Qwen2-MoE) and the capacity factor
(which copies an expert keeps under each drop policy, against a reference written here as loops over experts)."""

import math

import pytest
import torch
import transformers

from harness import flops
from harness.errors import ConfigError
from harness.export import export_model, hf_class
from harness.model import Decoder
from harness.moe import MoE, MoEConfig, permute_capacity
from harness.upcycle import Recipe, upcycle

from helpers.e2e import run_cli
from helpers.models import tiny_config

SHAPES = [(2, 2, 1, 1), (8, 2, 2, 1), (3, 4, 3, 1), (6, 4, 3, 1), (4, 4, 2, 2)]  # (E, G, T, S), G - S divides E, T


@pytest.mark.parametrize("e,g,t,s", SHAPES, ids=[f"E{e}G{g}T{t}S{s}" for e, g, t, s in SHAPES])
def test_shared_experts_upcycle_computes_the_dense_parent_at_step_0(trained, text_tokens, e, g, t, s):
    """topk_softmax with virtual groups is exact whatever the router: the shared experts hold S shards unscaled and
    every routed group the other G - S, so shared + routed = the dense MLP (on a trained base, whose MLPs matter)."""
    moe = MoEConfig(num_experts=e, granularity=g, top_k=t, routing="topk_softmax", shared_experts=s)
    model = upcycle(trained, moe, Recipe(), calib=text_tokens).eval()
    with torch.no_grad():
        ours, parent = model(text_tokens).logits, trained(text_tokens).logits
        shared_off = _without_shared(model)(text_tokens).logits
    torch.testing.assert_close(ours, parent, rtol=0, atol=2e-5)
    assert (shared_off - parent).abs().max() > 100 * (ours - parent).abs().max()  # the shared part carries weight


@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_shared_experts_with_renormalised_sigmoid_routing_start_at_the_dense_parent(trained, text_tokens, gamma):
    """The modern recipes together (sigmoid scores renormalised and scaled, an expert bias, a shared expert) still
    start at the dense function: the routed weights sum to gamma, so s = (G - S) / gamma is exact."""
    moe = MoEConfig(
        num_experts=6,
        granularity=4,
        top_k=3,
        routing="sigmoid_topk",
        norm_topk_prob=True,
        topk_scaling_factor=gamma,
        load_balancing="expert_bias",
        shared_experts=1,
    )
    model = upcycle(trained, moe, Recipe(), calib=text_tokens).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(text_tokens).logits, trained(text_tokens).logits, rtol=0, atol=2e-5)


def _without_shared(model: Decoder) -> Decoder:
    for i in model.moe_layers:
        torch.nn.init.zeros_(model.blocks[i].mlp.shared.fc2.weight)
    return model


def test_shared_experts_hold_the_first_shards_unscaled_and_the_routed_experts_the_rest(trained_bases):
    trained = trained_bases["swiglu"]
    dense_mlp = trained.blocks[0].mlp
    f, fe = dense_mlp.d_ff, dense_mlp.d_ff // 4
    moe = MoEConfig(num_experts=6, granularity=4, top_k=3, routing="topk_softmax", shared_experts=1)
    layer = upcycle(trained, moe, Recipe(router_start="fixed")).blocks[0].mlp
    w1, w2 = dense_mlp.fc1.weight, dense_mlp.fc2.weight
    gate, up = w1[:f], w1[f:]
    torch.testing.assert_close(layer.shared.fc1.weight, torch.cat([gate[:fe], up[:fe]]), rtol=0, atol=0)
    torch.testing.assert_close(layer.shared.fc2.weight, w2[:, :fe], rtol=0, atol=0)
    # routed: groups of G - S = 3 experts, expert e holds dense shard 1 + e mod 3, its fc2 scaled by sqrt(3)
    for i in range(6):
        j = 1 + i % 3
        torch.testing.assert_close(layer.experts.w2[i], w2[:, j * fe : (j + 1) * fe] * 3**0.5, rtol=1e-6, atol=0)


# capacity ---------------------------------------------------------------------------------------------------


def _capacity_layer(policy, cf, e=4, t=2, shared=0, g=1):
    torch.manual_seed(0)
    cfg = MoEConfig(
        num_experts=e, top_k=t, granularity=g, shared_experts=shared, router_init_std=0.5, capacity_factor=cf
    )
    cfg.drop_policy = policy
    return MoE(32, 64, "swiglu", cfg).eval()


def _reference(layer: MoE, x: torch.Tensor):
    """(output, kept copies as a set of (token, slot)) by loops: each expert lists the copies routed to it, sorts them
    by the policy's key and keeps the first C; the output sums the kept copies' weighted expert MLPs (+ shared)."""
    b, length, d = x.shape
    tokens = x.reshape(-1, d)
    cfg = layer.cfg
    logits = tokens @ layer.router.weight.t()
    probs = logits.softmax(-1)
    weights, experts = probs.topk(cfg.top_k, dim=-1)
    cap = math.ceil(cf_of(layer) * tokens.shape[0] * cfg.top_k / cfg.num_experts)
    kept = set()
    for ex in range(cfg.num_experts):
        copies = [(n, k) for n in range(tokens.shape[0]) for k in range(cfg.top_k) if experts[n, k] == ex]
        if cfg.drop_policy == "probs":
            copies.sort(key=lambda c: (-weights[c].item(), c))
        else:  # position in the sequence first, then the sequence: n = sequence * length + position
            copies.sort(key=lambda c: (c[0] % length, c[0] // length))
        kept.update(copies[:cap])
    out = torch.zeros_like(tokens)
    w1, w2 = layer.experts.w1, layer.experts.w2
    for n, k in kept:
        ex = experts[n, k]
        gate, up = (w1[ex] @ tokens[n]).chunk(2)
        out[n] += weights[n, k] * (w2[ex] @ (torch.nn.functional.silu(gate) * up))
    if layer.shared is not None:
        out += layer.shared(tokens)
    return out.view(b, length, d), kept, (weights, experts)


def cf_of(layer):
    return layer.cfg.capacity_factor


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("shared", [0, 1])
def test_capacity_keeps_the_copies_the_policy_names_and_drops_the_rest_to_zero(policy, shared):
    layer = _capacity_layer(policy, 0.5, shared=shared, g=2 if shared else 1, t=1 if shared else 2)
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y, aux = layer(x)
        ref, kept, (weights, experts) = _reference(layer, x)
        n, t = experts.shape
        order, _, counts, kept_counts = permute_capacity(experts, weights, 4, layer.cfg.capacity(n), policy, batch=3)
    assert 0 < len(kept) < n * t  # some copies dropped, some kept
    computed = {(int(i) // t, int(i) % t) for i in order[: int(kept_counts.sum())]}
    assert computed == kept
    assert counts.sum() == n * t  # the demand counts every routed copy (aux loss, load stats)
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    assert aux.dropped_share.item() == pytest.approx(1 - len(kept) / (n * t))


def test_the_two_drop_policies_keep_different_copies():
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        kept = {p: _reference(_capacity_layer(p, 0.5), x)[1] for p in ("probs", "position")}
    assert kept["probs"] != kept["position"]


def test_a_large_capacity_factor_drops_nothing_and_is_the_dropless_layer():
    x = torch.randn(3, 16, 32, generator=torch.Generator().manual_seed(1))
    capped, dropless = _capacity_layer("probs", 4.0), _capacity_layer("probs", None)
    with torch.no_grad():
        (y, aux), (y0, aux0) = capped(x), dropless(x)
    assert aux.dropped_share.item() == 0.0 and aux0.dropped_share is None
    torch.testing.assert_close(y, y0, rtol=0, atol=0)


def test_dropped_copies_get_no_gradient_and_kept_ones_do():
    layer = _capacity_layer("position", 0.5)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y, _ = layer(x)
    y.sum().backward()
    _, kept, _ = _reference(layer, x.detach())
    fully_dropped = [n for n in range(32) if not any((n, k) in kept for k in range(2))]
    assert fully_dropped  # a token every one of whose experts was full: the layer adds nothing to it
    grad = x.grad.reshape(-1, 32)
    assert grad[fully_dropped].abs().max() == 0.0  # no router gradient either: its copies' outputs are zero
    with_kept = [n for n in range(32) if n not in fully_dropped]
    assert (grad[with_kept].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_on_the_grouped_gemm_path_zeroes_the_rows_past_the_kept_ones_in_one_graph(policy):
    """torch's CPU grouped GEMM, like the CUDA one, writes nothing past the last group's end, in the output or in the
    input's gradient: the dropped copies' rows must come out 0 and send back 0, as the per-expert loop's do; and the
    layer traces as one graph (no host sync on the kept count)."""
    layers = {}
    for backend in ("loop", "grouped_mm"):
        layer = _capacity_layer(policy, 0.5)
        layer.experts.backend = backend
        layers[backend] = layer.to(torch.bfloat16)
    grads = {}
    for backend, layer in layers.items():
        torch.full((4096, 256), float("nan"), dtype=torch.bfloat16)  # freed memory for the kernel's empty rows
        x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1), dtype=torch.bfloat16, requires_grad=True)
        y, aux = layer(x)
        assert 0 < aux.dropped_share.item() < 1
        grads[backend] = (y, *torch.autograd.grad(y.float().square().sum(), [x, *layer.parameters()]))
    for a, b in zip(grads["loop"], grads["grouped_mm"]):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2)
    x = torch.randn(2, 16, 32, dtype=torch.bfloat16)
    assert torch._dynamo.explain(layers["grouped_mm"])(x).graph_break_count == 0
    assert torch._dynamo.explain(layers["loop"])(x).graph_break_count > 0  # the loop reads the kept count


def test_step_0_at_capacity_is_exact_without_drops_and_drops_move_the_function(trained, text_tokens):
    """cf = 4 keeps every copy: the dense parent exactly (topk_softmax). cf = 0.25 drops copies, whose tokens lose
    that expert's share of the MLP at step 0 (the residual carries them): the logits move."""
    base = dict(num_experts=4, granularity=1, top_k=2, routing="topk_softmax")
    x, y = text_tokens[:, :-1], text_tokens[:, 1:]
    with torch.no_grad():
        parent = trained(x, y)
        full = upcycle(trained, MoEConfig(**base, capacity_factor=4.0), Recipe(), calib=text_tokens).eval()(x, y)
        low = upcycle(trained, MoEConfig(**base, capacity_factor=0.25), Recipe(), calib=text_tokens).eval()(x, y)
    torch.testing.assert_close(full.logits, parent.logits, rtol=0, atol=2e-5)
    assert all(r.dropped_share == 0 for r in full.router)
    assert all(r.dropped_share > 0.5 for r in low.router)  # capacity 1/4 of the demand: at least 3/4 dropped
    # the function moves (the loss may move either way, and by little where the MLP matters little)
    assert (low.logits - parent.logits).abs().max() > 0.1


def test_kept_copies_never_exceed_the_flop_counts_copies():
    """The FLOP count's min(1, cf) * T copies per token bounds what the experts compute (up to ceil rounding)."""
    x = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(2))
    for cf in (0.25, 0.5, 1.0, 1.5):
        layer = _capacity_layer("probs", cf)
        with torch.no_grad():
            _, aux = layer(x)
        computed = (1 - aux.dropped_share.item()) * 2 * 64
        assert computed <= flops.routed_copies(layer.cfg) * 64 + layer.cfg.num_experts


# FLOPs ------------------------------------------------------------------------------------------------------


def test_flops_with_shared_experts_and_capacity_match_a_hand_count():
    # d=32, L=2, H=4, KV=2, hd=8, f=64, V=97, SwiGLU, S=16; E6G4T3S1: experts of width 16, one shared
    cfg = tiny_config("swiglu")
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32
    expert = 3 * 32 * 16
    scores = 2 * 2 * 4 * 8 * (16 + 1) / 2
    moe = MoEConfig(num_experts=6, granularity=4, top_k=3, shared_experts=1)
    layer = 32 * 6 + 3 * expert + 1 * expert  # router + 3 routed copies + the shared expert
    forward = 2 * (2 * (attn + layer) + 32 * 97) + 2 * scores
    c = flops.count(cfg, 16, moe, [0, 1])
    assert c.forward_per_token == forward
    model = upcycle(Decoder(cfg), moe, Recipe(router_start="fixed"))
    assert flops.count_model(model, 16) == c
    assert c.params_total == sum(p.numel() for p in model.parameters())
    assert c.params_active == c.params_total - 2 * 3 * expert  # 3 of the 6 routed experts idle per token
    # (S + T)/G = 1 dense MLP of active expert FLOPs, plus the router: the dense FLOPs + 2 routers
    dense = flops.count(cfg, 16)
    assert c.forward_per_token == dense.forward_per_token + 2 * 2 * 32 * 6
    # capacity 0.5: half the routed copies are computed, the shared expert and router in full
    half = flops.count(cfg, 16, MoEConfig(num_experts=6, granularity=4, top_k=3, shared_experts=1, capacity_factor=0.5))
    assert half.forward_per_token == dense.forward_per_token  # no MoE layers listed: dense
    half = flops.count(
        cfg, 16, MoEConfig(num_experts=6, granularity=4, top_k=3, shared_experts=1, capacity_factor=0.5), [0, 1]
    )
    assert half.forward_per_token == forward - 2 * 2 * 1.5 * expert
    iso = flops.iso_flop_tokens(1000, half.train_per_token, dense.train_per_token)
    assert iso < 1000  # fewer FLOPs than dense per token: a shorter dense twin
    over = MoEConfig(num_experts=6, granularity=4, top_k=3, shared_experts=1, capacity_factor=2.0)
    assert flops.count(cfg, 16, over, [0, 1]) == c  # cf >= 1 computes every copy of a balanced load


# export -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "routing,g,s,layers",
    [("topk_softmax", 2, 1, "all"), ("softmax_topk", 4, 2, [1]), ("topk_softmax", 3, 1, "all")],
    ids=["topk_softmax-G2S1", "softmax_topk-G4S2-layer1", "topk_softmax-G3S1"],
)
def test_shared_expert_moe_exports_to_qwen2moe_with_the_same_logits(tmp_path, routing, g, s, layers):
    torch.manual_seed(0)
    d_ff = 96 if g == 3 else 64
    dense = Decoder(tiny_config(d_ff=d_ff))
    for p in dense.parameters():
        torch.nn.init.normal_(p, std=0.1)
    moe = MoEConfig(num_experts=4, top_k=2, granularity=g, routing=routing, shared_experts=s)
    model = upcycle(dense, moe, Recipe(moe_layers=layers, router_start="fixed"))
    for name, p in model.named_parameters():
        if "router" in name or "shared" in name:  # a discriminating router; a shared expert unlike the dense shard
            torch.nn.init.normal_(p, std=0.5 if "router" in name else 0.1)
    model.eval()
    assert export_model(model, moe, tmp_path) == "Qwen2MoeForCausalLM"
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert hf.config.shared_expert_intermediate_size == s * d_ff // g
    assert hf.config.norm_topk_prob == (routing == "topk_softmax")
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    # the doubled down-projection is what makes it exact: undone, the logits move
    for block in hf.model.layers:
        if hasattr(block.mlp, "shared_expert"):
            block.mlp.shared_expert.down_proj.weight.data /= 2
    with torch.no_grad():
        assert (hf(x).logits - ours).abs().max() > 100 * (theirs - ours).abs().max() + 1e-4


def test_export_refuses_capacity_dropping_and_unknown_routings_in_one_line():
    model = upcycle(Decoder(tiny_config()), MoEConfig(num_experts=4, top_k=2), Recipe(router_start="fixed"))
    with pytest.raises(ConfigError, match=r"moe.capacity_factor=1.0: .*Qwen2MoeForCausalLM") as e:
        hf_class(model, MoEConfig(num_experts=4, top_k=2, capacity_factor=1.0))
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match=r"moe.routing='sigmoid_topk'.*Glm4MoeForCausalLM") as e:
        hf_class(model, MoEConfig(num_experts=4, top_k=2, routing="sigmoid_topk"))
    assert "\n" not in str(e.value)


# bad values -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,msg",
    [
        (dict(granularity=2, shared_experts=2), "moe.shared_experts=2 must be an integer in [0, moe.granularity - 1"),
        (dict(granularity=1, shared_experts=1), "moe.shared_experts=1 must be an integer in [0, moe.granularity - 1"),
        (dict(shared_experts=-1), "moe.shared_experts=-1 must be"),
        (dict(shared_experts=True), "moe.shared_experts=True must be"),
        (
            dict(num_experts=8, granularity=4, top_k=3, shared_experts=1),
            "moe.num_experts=8 is not divisible by moe.granularity - moe.shared_experts=3",
        ),
        (
            dict(num_experts=6, granularity=4, top_k=2, shared_experts=1),
            "moe.top_k=2 is not divisible by moe.granularity - moe.shared_experts=3",
        ),
        (dict(capacity_factor=0), "moe.capacity_factor=0 must be a number > 0, or null"),
        (dict(capacity_factor="1"), "moe.capacity_factor='1' must be a number > 0, or null"),
        (dict(capacity_factor=1.0, drop_policy="random"), "moe.drop_policy='random' is not one of"),
    ],
)
def test_bad_shared_and_capacity_values_fail_in_one_line(kw, msg):
    with pytest.raises(ConfigError) as e:
        MoEConfig(**{"num_experts": 8, "top_k": 2, **kw}).validate(64)
    assert str(e.value).startswith(msg) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("moe=E32G4T4 moe.shared_experts=4", "moe.shared_experts=4 must be an integer in [0, moe.granularity - 1 = 3]"),
        ("moe.drop_policy=random", "moe.drop_policy='random' is not one of ('probs', 'position')"),
    ],
)
def test_bad_shared_and_capacity_values_stop_run_py_in_one_line(env, tmp_path, override, needle):
    proc = run_cli(env, tmp_path, *override.split(), check=False)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode != 0 and last.startswith("config error:") and needle in last, proc.stderr[-2000:]
    assert not (tmp_path / "runs" / "default").exists()  # stopped before any compute


def test_mixtral_block_refuses_shared_experts_and_capacity():
    from harness.export import mixtral_moe_block

    for kw in (dict(granularity=2, shared_experts=1), dict(capacity_factor=1.0)):
        layer = MoE(32, 64, "swiglu", MoEConfig(num_experts=4, top_k=2, routing="topk_softmax", **kw))
        with pytest.raises(ConfigError, match="Mixtral's block has no shared expert and drops no tokens"):
            mixtral_moe_block(layer)


# CUDA -------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("policy", ["probs", "position"])
def test_capacity_on_the_grouped_gemm_path_matches_the_loop_and_compiles(policy):
    """bf16 on CUDA: the kept copies through one grouped GEMM per projection give the per-expert loop's output,
    and the compiled layer (one graph) the eager one's output and gradients."""
    torch.manual_seed(0)
    cfg = dict(num_experts=24, granularity=4, top_k=3, shared_experts=1, router_init_std=0.5, capacity_factor=0.75)
    layers = {}
    for backend in ("loop", "grouped_mm"):
        torch.manual_seed(0)
        layers[backend] = MoE(256, 512, "swiglu", MoEConfig(**cfg, drop_policy=policy, expert_backend=backend))
        layers[backend] = layers[backend].to("cuda", torch.bfloat16)
    x = torch.randn(8, 512, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    (ya, aux_a), (yb, aux_b) = layers["loop"](x), layers["grouped_mm"](x)
    assert 0 < aux_a.dropped_share.item() < 1 and aux_a.dropped_share.item() == aux_b.dropped_share.item()
    assert ((ya.float() - yb.float()).norm() / ya.float().norm()).item() < 1e-2
    eager, compiled = layers["grouped_mm"], torch.compile(layers["grouped_mm"])
    results = []
    for run in (eager, compiled):
        y, aux = run(x)
        results.append((y, *torch.autograd.grad(y.float().square().mean() + aux.loss, [x, *eager.parameters()])))
    for a, b in zip(*results):
        assert ((a.float() - b.float()).norm() / a.float().norm().clamp_min(1e-12)).item() < 2e-2
