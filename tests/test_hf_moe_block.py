"""transformers' MixtralSparseMoeBlock carrying our MoE layer's weights (harness.export.mixtral_moe_block) computes
our layer: the mapping that benchmarks/moe_layer.py relies on for its Hugging Face column, checked on CPU in fp32."""

import pytest
import torch

from harness.errors import ConfigError
from harness.export import mixtral_moe_block
from harness.moe import MoE, MoEConfig

D, F, TOKENS = 64, 256, 384


def _layer(e, g, t, routing="topk_softmax"):
    torch.manual_seed(0)
    # a router that discriminates (std 0.5), so that every expert's weights matter and no two logits tie
    cfg = MoEConfig(num_experts=e, granularity=g, top_k=t, routing=routing, router_init_std=0.5)
    return MoE(D, F, "swiglu", cfg)


def _tokens():
    return torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("e,g,t", [(8, 1, 2), (16, 2, 4), (64, 8, 8)], ids=["E8G1T2", "E16G2T4", "E64G8T8"])
def test_mixtral_block_with_our_weights_gives_our_output_and_gradients(e, g, t):
    ours = _layer(e, g, t)
    theirs = mixtral_moe_block(ours)
    assert theirs.experts.config._experts_implementation == "grouped_mm"
    assert theirs.experts.gate_up_proj.shape == (e, 2 * F // g, D)
    x = _tokens().requires_grad_()
    y_ours, _ = ours(x)
    y_theirs = theirs(x.view(1, TOKENS, D)).view(TOKENS, D)
    torch.testing.assert_close(y_theirs, y_ours, rtol=1e-5, atol=1e-6)
    # the same function of the same weights: the weights' gradients map back too
    probe = torch.randn(TOKENS, D, generator=torch.Generator().manual_seed(2))
    (grad_x_ours, *grads_ours) = torch.autograd.grad((y_ours * probe).sum(), [x, *ours.parameters()])
    (grad_x_theirs, *grads_theirs) = torch.autograd.grad((y_theirs * probe).sum(), [x, *theirs.parameters()])
    torch.testing.assert_close(grad_x_theirs, grad_x_ours, rtol=1e-5, atol=1e-6)
    ours_by_name = dict(zip([n for n, _ in ours.named_parameters()], grads_ours))
    theirs_by_name = dict(zip([n for n, _ in theirs.named_parameters()], grads_theirs))
    for ours_name, theirs_name in (
        ("router.weight", "gate.weight"),
        ("experts.w1", "experts.gate_up_proj"),
        ("experts.w2", "experts.down_proj"),
    ):
        torch.testing.assert_close(theirs_by_name[theirs_name], ours_by_name[ours_name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scramble",
    [
        lambda sd: sd["experts.gate_up_proj"].copy_(sd["experts.gate_up_proj"].roll(1, dims=0)),  # experts permuted
        lambda sd: sd["experts.gate_up_proj"].copy_(sd["experts.gate_up_proj"].roll(F, dims=1)),  # [up; gate]
        lambda sd: sd["experts.down_proj"].copy_(sd["experts.down_proj"].roll(1, dims=0)),
    ],
    ids=["experts_permuted", "gate_and_up_swapped", "down_proj_permuted"],
)
def test_the_comparison_sees_a_scrambled_mapping(scramble):
    ours = _layer(8, 1, 2)
    theirs = mixtral_moe_block(ours)
    with torch.no_grad():
        scramble(theirs.state_dict())
        x = _tokens()
        y_ours, _ = ours(x)
        y_theirs = theirs(x.view(1, TOKENS, D)).view(TOKENS, D)
    assert (y_theirs - y_ours).norm() > 0.1 * y_ours.norm()


def test_a_transposed_expert_weight_does_not_load():
    ours = _layer(8, 1, 2)
    theirs = mixtral_moe_block(ours)
    with pytest.raises(RuntimeError, match="size mismatch"):
        theirs.load_state_dict({**theirs.state_dict(), "experts.down_proj": ours.experts.w2.transpose(1, 2)})


def test_mixtral_block_refuses_a_layer_that_routes_softmax_topk():
    with pytest.raises(ConfigError, match="routing='softmax_topk'"):
        mixtral_moe_block(_layer(8, 1, 2, routing="softmax_topk"))
