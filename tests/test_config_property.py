"""Property: every config either builds and trains one step, or fails with a ConfigError naming the key."""

import math
import re

import pytest
import torch
from hydra import compose, initialize_config_dir
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from harness.errors import ConfigError
from harness.experiment import build_experiment
from harness.model import Decoder
from harness.upcycle import upcycle

from helpers.e2e import ROOT

KNOBS = {  # override key -> values, valid and not
    "moe.num_experts": st.integers(0, 16),
    "moe.top_k": st.integers(0, 6),
    "moe.granularity": st.integers(0, 5),
    "routing": st.sampled_from(["softmax_topk", "topk_softmax"]),
    "moe.routing": st.sampled_from(["softmax_topk", "topk_softmax", "softmax"]),
    "moe.aux_loss_coef": st.sampled_from([0.0, 1e-2, -1.0]),
    "upcycle.router_init": st.sampled_from(["random", "virtual_group", "orthogonal"]),
    "upcycle.drop_ratio": st.sampled_from([0.0, 0.5, 1.0, 1.5, -0.1]),
    "upcycle.weight_scaling": st.sampled_from(["none", "paper", "output", "sqrt"]),
    "upcycle.moe_layers": st.sampled_from(["all", "every_2", "[0]", "[7]", "some"]),
    "model.activation": st.sampled_from(["swiglu", "relu2", "gelu"]),
    "model.d_ff": st.sampled_from([96, 100, 0]),
    "optim.lr": st.sampled_from([3e-3, 0.0, -1e-3]),
    "optim.schedule": st.sampled_from(["cosine", "wsd", "constant", "step"]),
    "data.seq_len": st.sampled_from([16, 1]),
    "method": st.sampled_from(["upcycle", "dense", "moe"]),
    "train.tokens": st.sampled_from([1000, 0]),
}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(st.sampled_from(sorted(KNOBS)), st.none(), min_size=1, max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({k: KNOBS[k] for k in keys})
    )
)
def test_config_builds_and_steps_or_names_the_bad_key(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"{k}={v}" for k, v in overrides.items()] + ["logger=csv"])
    try:
        exp = build_experiment(cfg)
    except ConfigError as e:
        named = {"routing": "moe.routing"}
        assert any(named.get(k, k) in str(e) for k in overrides), (overrides, str(e))
        assert "\n" not in str(e)  # one line
        return
    torch.manual_seed(0)
    model = Decoder(exp.model)
    if exp.method == "upcycle":
        model = upcycle(model, exp.moe, exp.recipe)
    x = torch.randint(0, exp.model.vocab_size, (2, exp.data.seq_len + 1))
    out = model(x[:, :-1], x[:, 1:])
    loss = out.loss + (out.aux_loss if out.aux_loss is not None else 0.0)
    loss.backward()
    assert math.isfinite(loss.item())


def test_the_preflight_key_check_passes_every_documented_override_and_sweep_parameter():
    """``harness.preflight`` stops a key no config has (``trian.tokens=10``, ``train.tokns=1``) before Hydra; it
    must never stop one that exists: every override in the READMEs' ``python run.py`` lines and every sweep's
    parameters."""
    import re

    import yaml

    from harness.config_keys import check_key

    args = []
    for readme in (ROOT / "README.md", ROOT / "results" / "README.md"):
        for line in re.findall(r"python run\.py([^`\n#]*)", readme.read_text()):
            args += [a for a in line.split() if "=" in a and not a.startswith(("~", "-", "$"))]
    for f in (ROOT / "sweeps").rglob("*.yaml"):
        params = ((yaml.safe_load(f.read_text()) or {}).get("hydra") or {}).get("sweeper", {}).get("params") or {}
        args += [f"{k}={v}" for k, v in params.items() if not k.startswith("~")]
    assert len(args) > 40
    for arg in args:
        check_key(arg)  # raises SystemExit on a key it thinks is misspelled
    with pytest.raises(
        SystemExit, match=r"trian.tokens: the config has no key 'trian' \(did you mean train.tokens\?\)"
    ):
        check_key("trian.tokens=10")


def _leaves(node, prefix=""):
    from omegaconf import DictConfig

    for key in node:
        if str(key).startswith("_") or prefix + str(key) == "hydra":
            continue
        value = node._get_node(key)
        if isinstance(value, DictConfig) and len(value):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


@pytest.mark.parametrize(
    "selection",
    [
        [],
        ["model=hf", "model.hf_path=/nowhere", "routing=topk_softmax", "init=drop_upcycling", "optim=wsd"],
        ["+scale=study", "+sweep=ladder", "+variant=megatron_start", "moe=E16G2T3S1", "logger=csv", "eval=local"],
        ["trainer=ddp", "routing=sigmoid_topk", "router_start=fixed", "scaling=paper", "optim=constant"],
    ],
)
def test_every_key_of_a_composed_config_passes_and_a_misspelling_of_it_stops(selection):
    """The key check against the config Hydra really composes: each of its keys (at every depth) passes, and
    the same key with its last name misspelled (a letter dropped) stops with one line naming a key that exists."""
    from harness.config_keys import check_key

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=selection)
    keys = set(_leaves(cfg))
    assert {"train.tokens", "pretrain.optim.lr", "moe.num_experts", "data.val_tokens"} <= keys
    caught = 0
    for key in sorted(keys):
        check_key(f"{key}=1")
        head, _, name = key.rpartition(".")
        typo = f"{head}.{name[:-1]}" if head else name[:-1]
        if len(name) < 4 or typo in keys or typo.rsplit(".", 1)[-1] in ("name", "path"):
            continue
        with pytest.raises(SystemExit) as e:
            check_key(f"{typo}=1")
        line = str(e.value)
        assert "\n" not in line and line.startswith(f"config error: {typo}:"), line
        meant = re.search(r"did you mean (\S+)\?", line)
        assert meant and meant.group(1) in keys | {key}, line
        caught += 1
    assert caught > 30


@pytest.mark.parametrize(
    ("arg", "needle"),
    [
        ("train.lr=-1", "train.lr: train (TrainConfig) has no key 'lr' (did you mean optim.lr?)"),
        ("+train.lr=1", "+train.lr: train (TrainConfig) has no key 'lr' (did you mean optim.lr?)"),
        ("pretrain.optimm.lr=1", "pretrain (PretrainConfig) has no key 'optimm' (did you mean pretrain.optim.lr?)"),
        ("moe.num_expert=4", "(did you mean moe.num_experts?)"),
    ],
)
def test_a_misspelled_nested_key_names_the_key_it_meant(arg, needle):
    from harness.config_keys import check_key

    with pytest.raises(SystemExit) as e:
        check_key(arg)
    assert needle in str(e.value)


def test_a_dataclass_field_the_yaml_leaves_out_is_added_with_plus():
    """A ModelConfig field no model preset lists (rope_theta) passes with + (Hydra's struct needs it), and
    without the + it is named with the + spelling; a key no class takes is named with +, too."""
    from harness.config_keys import check_key, key_tree

    model = key_tree().children["model"]
    assert "rope_theta" in model.fields and "rope_theta" not in model.children
    check_key("+model.rope_theta=5e5")
    check_key("+pretrain.optim.weight_decay=0.0")
    with pytest.raises(SystemExit, match=r"rope_theta: .* left at its default\): set it with \+model.rope_theta="):
        check_key("model.rope_theta=5e5")
    with pytest.raises(SystemExit, match=r"did you mean model.rope_theta\?"):
        check_key("+model.rope_thet=5e5")
