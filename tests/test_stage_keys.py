"""Cache keys of the shared stages (dense base, dense continuation, WSD trunks) cover their inputs: every leaf of
the resolved config is either an input of the stages that list it (flipping it changes their keys) or on a
documented list of keys no stage depends on; an HF base is keyed by its folder's content and its corpus."""

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from harness import identity

from helpers.e2e import ROOT

STAGES = ("dense_base", "dense_continuation", "dense_trunk", "trunk", "pretrain_trunk")
# written out here, not read from harness/identity.py: the keys a referee expects each stage to depend on
MUST = {
    "data.path": STAGES,
    "data.source": STAGES,
    "data.max_bytes": STAGES,
    "data.vocab_size": STAGES,
    "data.seq_len": STAGES,
    "data.val_fraction": STAGES,
    "data.val_tokens": ("dense_base", "dense_continuation"),
    "data.batch_size": ("dense_continuation", "dense_trunk", "trunk"),
    "data.seed": ("dense_continuation", "dense_trunk", "trunk"),
    "model.d_model": STAGES,
    "model.activation": STAGES,
    "pretrain.tokens": STAGES,
    # a base at another share of pretraining is another base, but the same stable trunk of the pretraining
    "pretrain.fraction": ("dense_base", "dense_continuation", "dense_trunk", "trunk"),
    "pretrain.seed": STAGES,
    "pretrain.optim.lr": STAGES,
    "optim.lr": ("dense_continuation", "dense_trunk", "trunk"),
    "optim.schedule": ("dense_continuation", "dense_trunk", "trunk"),
    "seed": ("dense_continuation", "dense_trunk", "trunk"),
    "train.val_every": ("dense_continuation",),
    "trainer.precision": STAGES,
    "moe.num_experts": ("trunk",),
    "upcycle.drop_ratio": ("trunk",),
}
# keys that must leave a stage's key as it is: what the stage is shared across
MUST_NOT = {"pretrain.fraction": ("pretrain_trunk",), "scratch_baseline": ("trunk", "dense_trunk", "dense_base")}


def _compose(overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=["logger=csv", *overrides])


def _leaves(cfg):
    """Every leaf, the keys left out of the experiment config at their neutral value included."""
    neutral = {k: OmegaConf.select(cfg, k) for k in identity.NEUTRAL}
    assert all(identity._same(neutral[k], v) for k, v in identity.NEUTRAL.items()), neutral  # conf/ holds them
    return {**neutral, **identity._flatten(identity.experiment_config(cfg))}


def _flip(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 1.5 + 0.01
    if value is None:
        return 7
    return f"{value}_flipped"


def _keys(cfg):
    """Chained as the run chains them: the continuations and trunks take the base's key as an input."""
    base = identity.stage_key(cfg, "dense_base", corpus="c")
    keys = {"dense_base": base, **{s: identity.stage_key(cfg, s, corpus="c", dense_base=base) for s in STAGES[1:4]}}
    return {**keys, "pretrain_trunk": identity.stage_key(cfg, "pretrain_trunk", corpus="c")}


def _listed(key, stage):
    if stage in ("trunk", "dense_trunk"):
        if stage == "dense_trunk" and not identity._matches(key, identity.STAGE_INPUTS[stage]):
            return False
        return not identity._matches(key, (*identity.TRUNK_DROPS, *identity.PROGRESS, *identity.GUARDS))
    return identity._matches(key, identity.STAGE_INPUTS[stage]) and not identity._matches(
        key, (*identity.STAGE_DROPS.get(stage, ()), *identity.PROGRESS, *identity.GUARDS, *identity.LAYOUT)
    )


def _decided(key):
    named = (*identity.PROGRESS, *identity.GUARDS, *identity.LAYOUT, *identity.RUN_ONLY, *identity.TRUNK_DROPS)
    return identity._matches(key, named) or any(_listed(key, s) for s in STAGES if s != "trunk")


CONFIGS = {
    "default": [],
    "upcycle_wsd_trunk": ["optim=wsd", "train.share_trunk=true"],
    "dense_ddp": ["method=dense", "trainer=ddp_cpu"],
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_leaf_keys_the_stages_it_can_change(name):
    cfg = _compose(CONFIGS[name])
    base = _keys(cfg)
    leaves = _leaves(cfg)
    undecided = [k for k in leaves if not _decided(k)]
    assert not undecided, f"config keys in no stage list and on no documented list: {undecided}"
    for key, value in leaves.items():
        flipped = cfg.copy()
        OmegaConf.update(flipped, key, _flip(value), force_add=True)
        got = _keys(flipped)
        for stage in STAGES:
            must = stage in MUST.get(key, ()) or _listed(key, stage)
            if must:
                assert got[stage] != base[stage], f"{key} changes the {stage} stage but not its key"
            if stage in MUST_NOT.get(key, ()):
                assert got[stage] == base[stage], f"{key} must not change the {stage} stage's key"
    named = set(MUST) | set(MUST_NOT)
    assert named <= set(leaves), sorted(named - set(leaves))  # the referee's tables name real keys


def test_keys_added_at_their_neutral_value_leave_older_runs_and_bases_their_hashes_and_keys():
    """A config written before pretrain.fraction and scratch_baseline existed is the same run, base and trunks."""
    cfg = _compose(["optim=wsd", "train.share_trunk=true"])
    old = cfg.copy()
    with open_dict(old):
        del old.pretrain["fraction"]
        del old["scratch_baseline"]
    assert identity.config_hash(old) == identity.config_hash(cfg)
    assert _keys(old) == _keys(cfg)
    half = cfg.copy()
    OmegaConf.update(half, "pretrain.fraction", 0.5)
    assert identity.config_hash(half) != identity.config_hash(cfg)
    assert _keys(half)["dense_base"] != _keys(cfg)["dense_base"]
    assert _keys(half)["pretrain_trunk"] == _keys(cfg)["pretrain_trunk"]  # one stable run for every share


def test_old_keys_are_not_reused():
    cfg = _compose([])
    assert identity.STAGE_KEY_VERSION >= 2
    keys = _keys(cfg)
    assert len(set(keys.values())) == len(keys)  # one stage never takes another's entry


def _hf_folder(path, seed=0):
    transformers = pytest.importorskip("transformers")
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(seed)
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw, num_key_value_heads=2)).save_pretrained(path)
    return path


def test_an_hf_base_is_keyed_by_its_corpus_and_its_content(tmp_path):
    a = _hf_folder(tmp_path / "a")
    hf = ["model=hf", f"model.hf_path={a}"]

    def cont(overrides):
        cfg = _compose(hf + overrides)
        base = identity.stage_key(cfg, "dense_base", corpus="c")
        return identity.stage_key(cfg, "dense_continuation", dense_base=base, corpus="c", tokens=1000)

    ref = cont([])
    assert cont(["data.path=other.txt"]) != ref
    assert cont(["data.seq_len=32"]) != ref
    assert cont(["data.val_tokens=4096"]) != ref
    assert cont(["trainer.precision=bf16-mixed"]) != ref
    # the same bytes in another folder are the same base; other weights at the same path are not
    b = _hf_folder(tmp_path / "b")
    same_elsewhere = identity.stage_key(_compose(["model=hf", f"model.hf_path={b}"]), "dense_base", corpus="c")
    assert same_elsewhere == identity.stage_key(_compose(hf), "dense_base", corpus="c")
    _hf_folder(a, seed=1)
    assert cont([]) != ref


def test_dense_budgets_that_train_the_same_steps_share_one_continuation():
    """Two MoEs whose iso-FLOP budgets differ by less than a dense step train the same continuation: one entry."""
    from harness.continuation import continuation_key
    from harness.experiment import build_experiment

    cfg = _compose([])
    exp = build_experiment(cfg)
    step = exp.data.batch_size * exp.data.seq_len
    key, steps = continuation_key(cfg, exp, "base", "c", 4 * step + 1)
    assert steps == 5
    assert continuation_key(cfg, exp, "base", "c", 5 * step) == (key, 5)
    assert continuation_key(cfg, exp, "base", "c", 5 * step + 1)[0] != key
