"""Activation checkpointing modes (train.activation_checkpointing): each gives the same loss and gradients as
none, and recomputes what it says it does."""

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness.moe import MoE, MoEConfig
from harness.upcycle import Recipe, upcycle

from helpers.e2e import results, run_cli

MODES = [None, "full", "mlp", "selective"]


def model(kind: str, dense):
    m = dense if kind == "dense" else upcycle(dense, MoEConfig(num_experts=8, top_k=2), Recipe("virtual_group"))
    return m.train()


def step(m, tokens, mode):
    """Loss and every gradient of one step; how often each block's MLP (or MoE) and attention started (a
    pre-hook: recomputation stops once backward's tensors are back, before the module returns); aten op counts."""
    m.activation_checkpointing = mode
    m.zero_grad(set_to_none=True)
    calls = collections.Counter()
    hooks = [b.mlp.register_forward_pre_hook(lambda *a: calls.update(["mlp"])) for b in m.blocks]
    hooks += [b.attn.register_forward_pre_hook(lambda *a: calls.update(["attn"])) for b in m.blocks]
    with CountOps() as ops:
        out = m(tokens[:, :-1], tokens[:, 1:])
        loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
        loss.backward()
    for h in hooks:
        h.remove()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return loss.detach(), grads, calls, ops.counts


@pytest.mark.parametrize("kind", ["dense", "moe"])
@pytest.mark.parametrize("mode", MODES[1:])
def test_each_mode_gives_the_loss_and_gradients_of_no_checkpointing(dense, tokens, kind, mode):
    m = model(kind, dense)
    assert kind == "dense" or isinstance(m.blocks[0].mlp, MoE)
    loss, grads, *_ = step(m, tokens, None)
    loss_c, grads_c, *_ = step(m, tokens, mode)
    assert torch.equal(loss, loss_c) and grads.keys() == grads_c.keys()
    for name, g in grads.items():
        torch.testing.assert_close(grads_c[name], g, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_each_mode_recomputes_what_it_says(dense, tokens, kind):
    m = model(kind, dense)
    n = len(m.blocks)
    runs = {mode: step(m, tokens, mode) for mode in MODES}
    calls = {mode: r[2] for mode, r in runs.items()}
    assert calls[None] == {"mlp": n, "attn": n}
    assert calls["full"] == {"mlp": 2 * n, "attn": 2 * n}  # the whole block again in backward
    assert calls["mlp"] == {"mlp": 2 * n, "attn": n}  # only the MLP/MoE layer again
    ops = {mode: r[3] for mode, r in runs.items()}
    # selective keeps the matmul outputs (none run again) and recomputes the elementwise work between them
    assert ops["selective"]["mm"] == ops[None]["mm"] < ops["mlp"]["mm"] < ops["full"]["mm"]
    assert ops["selective"]["mul"] > ops[None]["mul"]


class CountOps(TorchDispatchMode):
    """How often each aten op ran (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))


def test_checkpointing_is_off_in_evaluation(dense, tokens):
    m = model("moe", dense)
    m.activation_checkpointing = "selective"
    with torch.no_grad():
        assert torch.equal(m.eval()(tokens).logits, m.train()(tokens).logits)  # same numbers, no recompute path


@pytest.mark.slow
def test_a_run_with_mlp_recompute_ends_where_a_plain_run_ends(env, tmp_path):
    args = ["train.tokens=4000", "iso_flop_baseline=false"]
    run_cli(env, tmp_path, *args)
    run_cli(env, tmp_path, *args, "train.activation_checkpointing=mlp")
    plain = results(_only(tmp_path, without="checkpointing"))
    mlp = results(_only(tmp_path, "train.activation_checkpointing=mlp"))
    assert mlp["status"] == "complete" and mlp["val_loss"] == pytest.approx(plain["val_loss"], abs=1e-6)


def _only(logs, word: str = "", without: str = "\0"):
    found = [
        d
        for d in (logs / "runs" / "default").iterdir()
        if d.is_dir() and not d.is_symlink() and word in d.name and without not in d.name
    ]
    assert len(found) == 1, found
    return found[0]
