"""DESIGN.md invariants 5-6: FLOPs match a hand count; iso-FLOP budget."""

from harness import flops
from harness.model import Decoder
from harness.moe import MoEConfig
from harness.upcycle import Recipe, upcycle

from helpers.models import tiny_config


def test_dense_flops_match_hand_count():
    # d=32, L=2, H=4, KV=2, hd=8, f=64, V=97, SwiGLU, S=16
    cfg = tiny_config("swiglu")
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32  # q, k, v, o
    mlp = 3 * 32 * 64
    head = 32 * 97
    scores = 2 * 2 * 4 * 8 * (16 + 1) / 2
    forward = 2 * (2 * (attn + mlp) + head) + 2 * scores
    c = flops.count(cfg, 16)
    assert c.forward_per_token == forward and c.train_per_token == 3 * forward
    model = Decoder(cfg)
    assert c.params_total == sum(p.numel() for p in model.parameters())


def test_moe_flops_and_params_match_hand_count():
    cfg = tiny_config("relu2")
    moe = MoEConfig(num_experts=8, top_k=2, granularity=2)
    c = flops.count(cfg, 16, moe, [0, 1])
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32
    expert = 2 * 32 * 32  # relu2: up+down, width 64/2
    forward = 2 * (2 * (attn + 32 * 8 + 2 * expert) + 32 * 97) + 2 * (2 * 2 * 4 * 8 * 17 / 2)
    assert c.forward_per_token == forward
    model = upcycle(Decoder(cfg), moe, Recipe())
    assert flops.count_model(model, 16) == c
    assert c.params_total == sum(p.numel() for p in model.parameters())
    assert c.params_active == c.params_total - 2 * 6 * expert


def test_e8g1t2_ratio_is_attention_plus_two_mlp():
    cfg = tiny_config("swiglu", d_model=256, d_ff=1024, n_heads=4, n_kv_heads=4, vocab_size=97)
    dense = flops.count(cfg, 16)
    moe = flops.count(cfg, 16, MoEConfig(num_experts=8, top_k=2), [0, 1])
    mlp = 2 * 3 * 3 * 256 * 1024 * 2  # train FLOPs of the two layers' MLPs
    router = 3 * 2 * 256 * 8 * 2
    assert moe.train_per_token == dense.train_per_token + mlp + router
    assert 1.5 < moe.train_per_token / dense.train_per_token < 2.0


def test_iso_flop_tokens():
    assert flops.iso_flop_tokens(1000, 300, 200) == 1500
    assert abs(flops.mfu(1e5, 6e9, 989e12) - 6e14 / 989e12) < 1e-12
