"""Sigmoid routing, renormalisation and scaling factor, and the load balancings (sequence, global batch, the
aux-loss-free expert bias), each against a reference written out here (Megatron-Core / DeepSeek-V3 formulas)."""

import copy
import math

import pytest
import torch

from harness.errors import ConfigError
from harness.lit import LitLM, OptimConfig
from harness.moe import MoE, MoEConfig, record_loads, route
from harness.upcycle import Recipe, activation_scale, upcycle

from helpers.fit import quiet_trainer, token_batches


def _reference_sigmoid(logits, top_k, norm, gamma, bias=None):
    """Per token, with math.exp and a sort: [(expert, weight)]: the T experts of largest sigmoid + bias, weighted
    by their unbiased sigmoid, renormalised over the T when ``norm``, times ``gamma``."""
    out = []
    for row in logits.tolist():
        sig = [1 / (1 + math.exp(-v)) for v in row]
        b = [0.0] * len(row) if bias is None else bias.tolist()
        top = sorted(range(len(row)), key=lambda e: -(sig[e] + b[e]))[:top_k]
        z = sum(sig[e] for e in top) if norm else 1.0
        out.append([(e, gamma * sig[e] / z) for e in top])
    return out


@pytest.mark.parametrize("norm,gamma", [(False, 1.0), (True, 1.0), (True, 2.5), (False, 2.5)])
@pytest.mark.parametrize("biased", [False, True])
def test_sigmoid_topk_matches_reference(norm, gamma, biased):
    logits = torch.randn(40, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    bias = torch.linspace(-0.3, 0.3, 8, dtype=torch.float64) if biased else None
    w, idx, probs = route(logits, 2, "sigmoid_topk", norm, gamma, bias)
    for n, chosen in enumerate(_reference_sigmoid(logits, 2, norm, gamma, bias)):
        got = dict(zip(idx[n].tolist(), w[n].tolist()))
        assert set(got) == {e for e, _ in chosen}
        assert all(abs(got[e] - weight) < 1e-12 for e, weight in chosen)
    sig = [[1 / (1 + math.exp(-v)) for v in row] for row in logits.tolist()]  # aux-loss probs: sigmoid / its sum
    torch.testing.assert_close(probs, torch.tensor([[s / sum(r) for s in r] for r in sig], dtype=torch.float64))


def test_expert_bias_changes_the_choice_but_not_the_weights():
    logits = torch.randn(200, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    bias = torch.zeros(8, dtype=torch.float64)
    bias[3] = 10.0  # expert 3 wins every token's choice (logits spread ~3)
    for routing in ("softmax_topk", "topk_softmax", "sigmoid_topk"):
        w0, i0, p0 = route(logits, 2, routing)
        w1, i1, p1 = route(logits, 2, routing, bias=bias)
        assert (i1 == 3).any(-1).all() and not (i0 == 3).any(-1).all()
        torch.testing.assert_close(p1, p0)  # the balance loss reads unbiased probs
        same = (i0 == i1).all(-1)  # tokens whose choice the bias did not change keep their weights
        assert same.any() and torch.equal(w1[same], w0[same])
        if routing == "sigmoid_topk":  # the weights are the chosen experts' unbiased scores
            torch.testing.assert_close(w1, logits.sigmoid().gather(-1, i1))


def test_activation_scale_of_each_routing_and_normalisation():
    assert activation_scale("sigmoid_topk", 8, 1, 2) == 1.0  # 2 chosen x sigmoid(0) = 1
    assert activation_scale("sigmoid_topk", 64, 8, 8) == 2.0  # one group of 8 shards, each weight 1/2
    assert activation_scale("sigmoid_topk", 8, 1, 2, norm_topk_prob=True) == 1.0
    assert activation_scale("sigmoid_topk", 64, 8, 8, True, 2.5) == pytest.approx(8 / 2.5)
    assert activation_scale("softmax_topk", 8, 1, 2, True) == 1.0  # renormalised softmax_topk = topk_softmax
    assert activation_scale("softmax_topk", 8, 1, 2, False, 2.0) == 2.0


SHAPES = [(8, 1, 2), (16, 2, 4), (16, 8, 8)]


@pytest.mark.parametrize("e,g,t", SHAPES)
@pytest.mark.parametrize("gamma", [1.0, 2.5])
def test_renormalised_sigmoid_is_exact_whatever_the_router(trained, text_tokens, e, g, t, gamma):
    # On the trained base zeroing every fc2 moves the logits by a relative 0.75 / 1.65 (test_upcycle); a router
    # of std 0.5 (logits spread ~1-5) still gives the dense logits to 1e-5: the weights sum to gamma per token.
    cfg = MoEConfig(num_experts=e, granularity=g, top_k=t, routing="sigmoid_topk", norm_topk_prob=True)
    cfg.topk_scaling_factor, cfg.router_init_std = gamma, 0.5
    moe = upcycle(trained, cfg, Recipe(router_start="fixed"))
    out, ref = moe(text_tokens).logits, trained(text_tokens).logits
    print(f"renormalised sigmoid E{e}G{g}T{t} x{gamma}: max |d logits| {(out - ref).abs().max().item():.2e}")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("e,g,t", SHAPES)
def test_plain_sigmoid_gap_vanishes_as_router_std_to_zero(trained, text_tokens, e, g, t):
    """Without renormalisation each weight is sigmoid(l) ~ 1/2 + l/4: the scale 2G/T makes the router start
    std -> 0 exact, and the gap shrinks with the std."""
    ref = trained(text_tokens).logits
    gaps = []
    for std in (0.2, 0.02, 0.002, 0.0):
        cfg = MoEConfig(num_experts=e, granularity=g, top_k=t, routing="sigmoid_topk", router_init_std=std)
        moe = upcycle(trained, cfg, Recipe(router_start="fixed"))
        gaps.append((moe(text_tokens).logits - ref).abs().max().item())
    assert gaps[0] > gaps[1] > gaps[2] and gaps[3] < 1e-5, gaps


def test_plain_sigmoid_default_start_is_the_dense_loss(trained, text_tokens):
    # router_start=data (logits std 0.01): the loss moves by < 1e-4 relative (measured), zeroing every fc2 moves
    # it by 8.7% / 49%: the 1e-3 bound is >= 87x tighter than deleting the MLPs.
    targets = torch.roll(text_tokens, -1, 1)
    ref = trained(text_tokens, targets).loss
    for e, g, t in SHAPES:
        cfg = MoEConfig(num_experts=e, granularity=g, top_k=t, routing="sigmoid_topk")
        moe = upcycle(trained, cfg, Recipe(), calib=text_tokens)
        out = moe(text_tokens, targets)
        gap = (out.logits - trained(text_tokens).logits).abs().max().item()
        print(f"plain sigmoid E{e}G{g}T{t}: loss gap {out.loss.item() / ref.item() - 1:+.2e}, max |d logits| {gap:.2e}")
        assert abs(out.loss / ref - 1) < 1e-3


def _layer(**kw):
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=8, top_k=2, routing="sigmoid_topk", router_init_std=0.5, expert_backend="loop", **kw)
    return MoE(16, 32, "swiglu", cfg)


def _switch(probs_rows, chosen_rows, e, t):
    """E * sum_e f_e P_e over a list of tokens, with plain Python lists (f_e = share of the N*T copies)."""
    n = len(probs_rows)
    f = [sum(c == k for row in chosen_rows for c in row) / (n * t) for k in range(e)]
    p = [sum(r[k] for r in probs_rows) / n for k in range(e)]
    return e * sum(a * b for a, b in zip(f, p))


def test_seq_aux_loss_is_the_mean_of_per_sequence_losses():
    m = _layer(load_balancing="seq_aux_loss")
    x = torch.randn(3, 10, 16, generator=torch.Generator().manual_seed(2))
    _, aux = m(x)
    want = []
    for b in range(3):
        logits = (x[b] @ m.router.weight.t()).double()
        _, idx, probs = route(logits, 2, "sigmoid_topk")
        want.append(_switch(probs.tolist(), idx.tolist(), 8, 2))
    assert abs(aux.load_balance.item() - sum(want) / 3) < 1e-6
    _, whole = _layer(load_balancing="aux_loss")(x)  # the micro-batch loss differs: sequences are not pooled
    assert abs(whole.load_balance.item() - aux.load_balance.item()) > 1e-4
    torch.testing.assert_close(aux.loss, 0.01 * aux.load_balance)


def test_global_aux_loss_reads_the_load_of_the_steps_micro_batches():
    """f_e over every micro-batch of the optimizer step so far (the current one included), P_e the current one's."""
    m = _layer(load_balancing="global_aux_loss").train()
    gen = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(24, 16, generator=gen) * 2, torch.randn(24, 16, generator=gen)
    _, a1 = m(x1)
    record_loads([m], [a1.tokens_per_expert])
    _, a2 = m(x2)
    idx = [route((x @ m.router.weight.t()).double(), 2, "sigmoid_topk")[1].tolist() for x in (x1, x2)]
    probs2 = route((x2 @ m.router.weight.t()).double(), 2, "sigmoid_topk")[2].tolist()
    copies = idx[0] + idx[1]
    f = [sum(c == k for row in copies for c in row) / (48 * 2) for k in range(8)]
    p = [sum(r[k] for r in probs2) / 24 for k in range(8)]
    assert abs(a2.load_balance.item() - 8 * sum(a * b for a, b in zip(f, p))) < 1e-6
    assert abs(a2.load_balance.item() - _switch(probs2, idx[1], 8, 2)) > 1e-4  # not the micro-batch's
    m.end_step()  # a new step starts from its own load: the micro-batch loss again
    _, a3 = m(x2)
    assert abs(a3.load_balance.item() - _switch(probs2, idx[1], 8, 2)) < 1e-6


def test_expert_bias_moves_against_an_imbalanced_load_and_evens_it():
    m = _layer(load_balancing="expert_bias", bias_update_rate=0.05).train()
    u = torch.nn.functional.normalize(torch.ones(16), dim=0)
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(4)) + 2 * u
    with torch.no_grad():
        m.router.weight[0] = 2 * u  # expert 0 is every token's first choice: half the copies
    shares = []
    for step in range(30):
        _, aux = m(x)
        load = aux.tokens_per_expert
        shares.append((load.max() / load.sum()).item())
        before = m.expert_bias.clone()
        record_loads([m], [load])
        m.end_step()
        want = before + 0.05 * torch.sign(load.mean() - load)  # over-loaded down, under-loaded up
        torch.testing.assert_close(m.expert_bias, want)
        if step == 0:
            assert m.expert_bias[load.argmax()] < 0 and m.expert_bias[load.argmin()] > 0
    assert shares[0] > 0.4 and max(shares[-5:]) < 0.5 * shares[0], shares  # 0.125 is even
    assert aux.loss.item() == 0.0  # aux-loss-free: no balance term (z-loss off)


def test_expert_bias_is_a_buffer_kept_in_fp32_and_in_the_state_dict():
    m = _layer(load_balancing="expert_bias")
    assert "expert_bias" in m.state_dict() and "step_load" not in m.state_dict()
    assert "expert_bias" not in dict(m.named_parameters())
    with torch.no_grad():
        m.expert_bias += 1e-3
    m = m.bfloat16()
    assert m.expert_bias.dtype == torch.float32 and m.expert_bias[0].item() == pytest.approx(1e-3)


def _tiny_upcycled(balancing):
    from harness.model import Decoder

    from helpers.models import tiny_config

    torch.manual_seed(0)
    dense = Decoder(tiny_config("swiglu"))
    cfg = MoEConfig(num_experts=4, top_k=2, routing="sigmoid_topk", load_balancing=balancing, bias_update_rate=0.01)
    return upcycle(dense, cfg, Recipe(router_start="fixed"))


def test_lightning_updates_the_bias_from_the_global_batch_and_checkpoints_it(tmp_path, text_tokens):
    """One optimizer step over 2 accumulated micro-batches: each layer's bias moves by rate * sign(mean - load)
    of both micro-batches' load (both run with the initial weights); the bias is not an optimizer parameter,
    and it is saved in the Lightning checkpoint and restored from it."""
    model = _tiny_upcycled("expert_bias")
    before = copy.deepcopy(model).train()
    batches = token_batches(2, seed=5)
    loads = [sum(before(x, y).router[i].tokens_per_expert for x, y in batches) for i in (0, 1)]
    lit = LitLM(model, OptimConfig(warmup_steps=0), total_steps=1, train_flops_per_token=1)
    opt = lit.configure_optimizers()["optimizer"]
    biases = [b.mlp.expert_bias for b in model.blocks]
    assert not any(p is b for g in opt.param_groups for p in g["params"] for b in biases)
    trainer = quiet_trainer(1, accumulate_grad_batches=2)
    trainer.fit(lit, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    for i, load in enumerate(loads):
        bias = model.blocks[i].mlp.expert_bias
        torch.testing.assert_close(bias, 0.01 * torch.sign(load.mean() - load))
        assert bias.abs().sum() > 0 and model.blocks[i].mlp.step_load.sum() == 0
    ckpt = tmp_path / "step.ckpt"
    trainer.save_checkpoint(ckpt)
    state = torch.load(ckpt, weights_only=False)["state_dict"]
    fresh = LitLM(_tiny_upcycled("expert_bias"), OptimConfig(), total_steps=1, train_flops_per_token=1)
    assert fresh.model.blocks[0].mlp.expert_bias.abs().sum() == 0
    fresh.load_state_dict(state)
    for i in (0, 1):
        torch.testing.assert_close(fresh.model.blocks[i].mlp.expert_bias, model.blocks[i].mlp.expert_bias)


@pytest.mark.parametrize(
    "kw,needle",
    [
        ({"routing": "sigmoid"}, "moe.routing='sigmoid' is not one of"),
        ({"load_balancing": "aux_free"}, "moe.load_balancing='aux_free' is not one of"),
        ({"topk_scaling_factor": 0.0}, "moe.topk_scaling_factor=0.0 must be a number > 0"),
        ({"topk_scaling_factor": "big"}, "moe.topk_scaling_factor='big' must be a number > 0"),
        ({"bias_update_rate": -1e-3}, "moe.bias_update_rate=-0.001 must be a number >= 0"),
        ({"norm_topk_prob": "yes"}, "moe.norm_topk_prob='yes' must be true or false"),
    ],
)
def test_bad_modern_values_fail_in_one_line(kw, needle):
    with pytest.raises(ConfigError) as err:
        MoEConfig(**kw).validate()
    assert needle in str(err.value) and "\n" not in str(err.value)
