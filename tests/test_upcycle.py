"""DESIGN.md invariants 1-3: the upcycled model computes the dense function where the recipe promises it."""

import pytest
import torch

from harness.errors import ConfigError
from harness.moe import MoEConfig, router_logits
from harness.upcycle import (
    Recipe,
    activation_scale,
    mlp_input_rms,
    resolve_moe_layers,
    top_mass,
    upcycle,
    weight_factors,
)

SHAPES = [(8, 1, 2), (8, 1, 1), (8, 2, 4), (16, 8, 8), (4, 4, 4)]  # E8G1T2 .. scaled-down E64G8T8


def moe_cfg(e, g, t, routing, **kw):
    return MoEConfig(num_experts=e, granularity=g, top_k=t, routing=routing, **kw)


@pytest.mark.parametrize("e,g,t", SHAPES)
@pytest.mark.parametrize("scaling", ["output", "paper", "exact"])
def test_topk_softmax_virtual_group_is_exact(trained, text_tokens, activation, e, g, t, scaling):
    # On the trained base, zeroing every fc2 moves the logits by a relative 0.75 (swiglu) / 1.65 (relu2),
    # measured; exact cases hold to 1e-5. SwiGLU paper scaling at G > 1 is inexact by design: 0.033 at E8G2T4,
    # 0.092 at E16G8T8 (measured), so its bound 0.15 is only 5x below deleting the MLPs.
    dense, tokens = trained, text_tokens
    moe = upcycle(dense, moe_cfg(e, g, t, "topk_softmax"), Recipe("virtual_group", weight_scaling=scaling))
    ref, out = dense(tokens).logits, moe(tokens).logits
    if scaling == "paper" and activation == "swiglu" and g > 1:
        gap = ((out - ref).norm() / ref.norm()).item()
        print(f"SwiGLU paper-scaling step-0 gap E{e}G{g}T{t}: {gap:.2e}")  # measured, not exact
        assert 0 < gap < 0.15
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_virtual_group_router_picks_whole_groups(dense, tokens):
    moe = upcycle(dense, moe_cfg(16, 8, 8, "topk_softmax"), Recipe("virtual_group"))
    layer = moe.blocks[0].mlp
    x = torch.randn(64, 32)
    _, experts = (x @ layer.router.weight.t()).topk(8, dim=-1)
    groups = (experts // 8).sort(dim=-1).values
    assert (groups == groups[:, :1]).all()


def test_without_scaling_topk_softmax_fine_grained_is_off_by_g(dense, tokens):
    """Weight scaling matters: without it, G>1 virtual groups output dense/G in every MoE layer."""
    moe = upcycle(dense, moe_cfg(8, 2, 4, "topk_softmax"), Recipe("virtual_group", weight_scaling="none"))
    assert not torch.allclose(moe(tokens).logits, dense(tokens).logits, atol=1e-4)


@pytest.mark.parametrize("e,g,t", [(8, 1, 2), (16, 8, 8)])
@pytest.mark.parametrize("scaling", ["output", "exact"])
def test_softmax_topk_gap_vanishes_as_router_std_to_zero(dense, tokens, e, g, t, scaling):
    ref = dense(tokens).logits
    gaps = []
    for std in (0.2, 0.02, 0.002, 0.0):
        cfg = moe_cfg(e, g, t, "softmax_topk", router_init_std=std)
        moe = upcycle(dense, cfg, Recipe("virtual_group", weight_scaling=scaling, router_start="fixed"))
        gaps.append((moe(tokens).logits - ref).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[3] < 1e-5, gaps


def test_softmax_topk_default_std_loss_within_half_a_percent(trained, text_tokens):
    # Trained base: paper scaling at std 0.02 moves the loss by 0.075% (swiglu) / 0.11% (relu2); zeroing every
    # fc2 moves it by 8.7% / 49% (measured), so the 0.5% bound is >= 17x tighter than deleting the MLPs.
    dense, tokens = trained, text_tokens
    targets = torch.roll(tokens, -1, 1)
    ref = dense(tokens, targets).loss
    moe = upcycle(dense, moe_cfg(8, 1, 2, "softmax_topk"), Recipe(weight_scaling="paper"))
    assert abs(moe(tokens, targets).loss / ref - 1) < 0.005


def test_exact_scaling_puts_the_scale_where_the_activation_is_homogeneous():
    s = 64.0
    assert weight_factors("exact", s, "swiglu") == (1.0, 8.0, 8.0)  # silu(g) * 8u, then 8 on fc2
    assert weight_factors("exact", s, "relu2") == pytest.approx((4.0, 4.0, 4.0))
    assert weight_factors("exact", s, "gelu") == (1.0, 1.0, 64.0)
    assert weight_factors("paper", s, "swiglu") == pytest.approx((4.0, 4.0, 4.0))  # Megatron: s^(1/3) everywhere
    assert weight_factors("output", s, "swiglu") == (1.0, 1.0, 64.0)
    assert weight_factors("exact", 1.0, "swiglu") == (1.0, 1.0, 1.0)


@pytest.mark.parametrize("scaling", ["paper", "exact"])
def test_expert_weights_are_the_dense_shards_times_the_factors(scaling):
    """paper keeps Megatron's weights (s^(1/3) on gate, up and fc2); exact scales up and fc2 only."""
    from harness.model import Decoder

    from helpers.models import tiny_config

    torch.manual_seed(0)
    dense = Decoder(tiny_config("swiglu"))
    moe = upcycle(dense, moe_cfg(16, 2, 4, "softmax_topk"), Recipe(weight_scaling=scaling, router_start="fixed"))
    c_gate, c_up, c2 = weight_factors(scaling, 16 * 2 / 4, "swiglu")
    mlp, layer = dense.blocks[0].mlp, moe.blocks[0].mlp
    f, fe = mlp.d_ff, mlp.d_ff // 2
    for e in range(16):
        rows = slice((e % 2) * fe, (e % 2 + 1) * fe)  # expert e holds shard e mod G
        w1, w2 = layer.experts.w1[e], layer.experts.w2[e]
        torch.testing.assert_close(w1[:fe], mlp.fc1.weight[:f][rows] * c_gate)
        torch.testing.assert_close(w1[fe:], mlp.fc1.weight[f:][rows] * c_up)
        torch.testing.assert_close(w2, mlp.fc2.weight[:, rows] * c2)


@pytest.mark.parametrize("e,g,t", [(8, 1, 2), (16, 8, 8)])
def test_data_router_start_gives_the_stated_logit_spread(dense, tokens, e, g, t):
    """router_start=data: each layer's logits have std ~ router_logit_std on the calibration tokens, whatever
    that layer's hidden norms, so softmax_topk's top-T mass is within ~2% of T/E."""
    recipe = Recipe(weight_scaling="exact", router_logit_std=0.01)
    moe = upcycle(dense, moe_cfg(e, g, t, "softmax_topk"), recipe, calib=tokens)
    inputs = {}
    hooks = [
        b.mlp.register_forward_pre_hook(lambda m, a, i=i: inputs.__setitem__(i, a[0])) for i, b in enumerate(moe.blocks)
    ]
    with torch.no_grad():
        moe(tokens)
    for h in hooks:
        h.remove()
    rms = mlp_input_rms(dense, [0, 1], tokens)
    for i, x in inputs.items():
        assert abs(x.reshape(-1, x.shape[-1]).square().sum(-1).mean().sqrt() / rms[i] - 1) < 1e-3  # exact start
        logits = router_logits(x.reshape(-1, x.shape[-1]), moe.blocks[i].mlp.router.weight, "fp32")
        assert 0.005 < logits.std(-1).mean().item() < 0.015
        assert logits.std(-1).min().item() > 0  # no ties between groups
    mass, uniform = top_mass(moe, tokens)
    assert uniform == t / e and abs(mass / uniform - 1) < 0.02


def test_exact_start_with_data_router_is_the_dense_loss(trained, text_tokens):
    # Trained base: the exact start moves the loss by 8e-6 (swiglu) / 1.1e-4 (relu2) at E8G1T2; zeroing every
    # fc2 moves it by 8.7% / 49% (measured): the 1e-3 bound is >= 87x tighter than deleting the MLPs.
    dense, tokens = trained, text_tokens
    targets = torch.roll(tokens, -1, 1)
    ref = dense(tokens, targets).loss
    for e, g, t in [(8, 1, 2), (16, 8, 8)]:
        moe = upcycle(dense, moe_cfg(e, g, t, "softmax_topk"), Recipe(), calib=tokens)
        assert abs(moe(tokens, targets).loss / ref - 1) < 1e-3


def test_router_start_without_calibration_falls_back_to_the_fixed_std(dense):
    with pytest.warns(UserWarning, match="without a calibration batch"):
        upcycle(dense, moe_cfg(8, 1, 2, "softmax_topk"), Recipe(router_start="data"))


def test_independent_router_rows_with_groups_warn(dense):
    with pytest.warns(UserWarning, match="split the virtual groups"):
        upcycle(dense, moe_cfg(8, 2, 4, "softmax_topk"), Recipe("random", router_start="fixed"))


def test_activation_scale_matches_paper():
    assert activation_scale("softmax_topk", 8, 1, 2) == 4
    assert activation_scale("softmax_topk", 64, 8, 8) == 64
    assert activation_scale("topk_softmax", 64, 8, 8) == 8
    assert activation_scale("topk_softmax", 8, 1, 2) == 1


def test_drop_ratio_zero_copies_every_unit(dense):
    """r = 0 is naive upcycling: every expert is the dense MLP, times the scaling factors."""
    cfg = moe_cfg(8, 1, 2, "softmax_topk")
    moe = upcycle(dense, cfg, Recipe(drop_ratio=0.0, weight_scaling="output", seed=3))
    c2 = weight_factors("output", activation_scale("softmax_topk", 8, 1, 2), dense.cfg.activation)[2]
    mlp, layer = dense.blocks[0].mlp, moe.blocks[0].mlp
    for e in range(8):
        assert torch.equal(layer.experts.w1[e], mlp.fc1.weight)
        torch.testing.assert_close(layer.experts.w2[e], mlp.fc2.weight * c2, rtol=0, atol=0)


def _real_size_dense():
    """One SmolLM2-135M-sized MLP (d_model 576, d_ff 1536): enough draws to test statistics tightly."""
    from harness.model import Decoder

    from helpers.models import tiny_config

    torch.manual_seed(0)
    return Decoder(tiny_config("swiglu", d_model=576, d_ff=1536, n_layers=1)).eval()


@pytest.mark.parametrize("scaling", ["output", "paper", "exact"])
def test_drop_upcycling_draws_follow_the_dense_statistics_and_keeps_scaled_copies(scaling):
    """The re-drawn units follow N(mean, std) of the dense matrix whatever the weight scaling (the
    scaling applies to the copied units only); the kept units are the dense units times the factors."""
    dense = _real_size_dense()
    cfg = moe_cfg(8, 1, 2, "softmax_topk")
    moe = upcycle(dense, cfg, Recipe(drop_ratio=0.5, weight_scaling=scaling, seed=0))
    c_gate, c_up, c2 = weight_factors(scaling, activation_scale("softmax_topk", 8, 1, 2), "swiglu")
    assert c2 != 1.0  # the factors differ from 1, so a draw scaled by them would be caught
    mlp, layer = dense.blocks[0].mlp, moe.blocks[0].mlp
    f = mlp.d_ff
    gate, up, down = mlp.fc1.weight[:f], mlp.fc1.weight[f:], mlp.fc2.weight
    for e in range(2):
        w1, w2 = layer.experts.w1[e], layer.experts.w2[e]
        kept = (w1[:f] == gate * c_gate).all(1) & (w1[f:] == up * c_up).all(1) & (w2 == down * c2).all(0)
        assert kept.sum().item() == f - round(0.5 * f)
        for new, src in ((w1[:f][~kept], gate), (w1[f:][~kept], up), (w2[:, ~kept], down)):
            n = new.numel()  # ~442k draws: mean within 5 standard errors, std within 5 of its own
            assert abs(new.mean() - src.mean()) < 5 * src.std() / n**0.5
            assert abs(new.std() / src.std() - 1) < 5 / (2 * n) ** 0.5


def test_copy_and_drop_at_one_seed_share_the_router(dense):
    """The router has its own generator: the drop draws do not shift it, so copy vs drop isolates r."""
    cfg = moe_cfg(8, 1, 2, "softmax_topk")
    a = upcycle(dense, cfg, Recipe(drop_ratio=0.0, router_start="fixed", seed=5))
    b = upcycle(dense, cfg, Recipe(drop_ratio=0.5, router_start="fixed", seed=5))
    c = upcycle(dense, cfg, Recipe(drop_ratio=0.5, router_start="fixed", seed=6))
    for i in a.moe_layers:
        ra, rb, rc = (m.blocks[i].mlp.router.weight for m in (a, b, c))
        assert torch.equal(ra, rb) and not torch.equal(ra, rc)
    assert not torch.equal(a.blocks[0].mlp.experts.w2, b.blocks[0].mlp.experts.w2)


@pytest.mark.parametrize("ratio", [0.1, 0.5, 1.0])
def test_drop_upcycling_reinitialises_exactly_r_units(ratio):
    from harness.model import Decoder

    from helpers.models import tiny_config

    torch.manual_seed(0)
    dense = Decoder(tiny_config("swiglu", d_model=64, d_ff=512))
    moe = upcycle(dense, moe_cfg(4, 1, 2, "softmax_topk"), Recipe(drop_ratio=ratio, weight_scaling="none"))
    mlp, layer = dense.blocks[0].mlp, moe.blocks[0].mlp
    f = mlp.d_ff
    gate, up, down = mlp.fc1.weight[:f], mlp.fc1.weight[f:], mlp.fc2.weight
    for e in range(4):
        w1, w2 = layer.experts.w1[e], layer.experts.w2[e]
        changed = ((w1[:f] != gate).any(1)) | ((w1[f:] != up).any(1)) | ((w2 != down).any(0))
        assert changed.sum().item() == round(ratio * f)
        assert (((w1[:f] != gate).any(1)) == changed).all() and ((w2 != down).any(0) == changed).all()
        new = w2[:, changed]
        assert abs(new.mean() - down.mean()) < 0.1 * down.std()
        assert abs(new.std() / down.std() - 1) < 0.1


def test_drop_upcycling_is_seeded(dense):
    cfg = moe_cfg(8, 1, 2, "softmax_topk")
    a = upcycle(dense, cfg, Recipe(drop_ratio=0.5, seed=1))
    b = upcycle(dense, cfg, Recipe(drop_ratio=0.5, seed=1))
    c = upcycle(dense, cfg, Recipe(drop_ratio=0.5, seed=2))

    def w(m):
        return m.blocks[0].mlp.experts.w1

    assert torch.equal(w(a), w(b)) and not torch.equal(w(a), w(c))


def test_moe_layers_selection(dense):
    moe = upcycle(dense, moe_cfg(4, 1, 2, "softmax_topk"), Recipe(moe_layers="every_2"))
    assert moe.moe_layers == [1]
    assert resolve_moe_layers([0], 2) == [0]
    assert resolve_moe_layers("all", 3) == [0, 1, 2]


@pytest.mark.parametrize(
    "kw,recipe,needle",
    [
        (dict(num_experts=4, top_k=8), {}, "moe.top_k=8 > moe.num_experts=4"),
        (dict(num_experts=6, granularity=4, top_k=4), {}, "moe.num_experts=6 is not divisible by moe.granularity=4"),
        (dict(num_experts=8, granularity=4, top_k=2), {}, "moe.top_k=2 is not divisible"),
        (dict(num_experts=24, granularity=3, top_k=3), {}, "model.d_ff=64 is not divisible by moe.granularity=3"),
        (dict(), dict(drop_ratio=1.5), "upcycle.drop_ratio=1.5"),
        (dict(routing="sigmoid"), {}, "moe.routing='sigmoid'"),
        (dict(), dict(moe_layers=[7]), "upcycle.moe_layers=[7]"),
        (dict(), dict(moe_layers="every_3"), "upcycle.moe_layers='every_3' picks no layer of this 2-layer model"),
        (dict(), dict(router_logit_std=0.0), "upcycle.router_logit_std=0.0 must be > 0"),
        (dict(), dict(router_start="zero"), "upcycle.router_start='zero'"),
        (dict(), dict(weight_scaling="sqrt"), "upcycle.weight_scaling='sqrt'"),
    ],
)
def test_bad_combinations_raise_one_clear_error(dense, kw, recipe, needle):
    with pytest.raises(ConfigError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        upcycle(dense, MoEConfig(**kw), Recipe(**recipe))
