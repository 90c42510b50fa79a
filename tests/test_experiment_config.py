"""The ``train`` and ``pretrain`` blocks are typed dataclasses: one set of defaults, checked in one place."""

import re
from dataclasses import fields

import pytest
from hydra import compose, initialize_config_dir

from harness.errors import ConfigError
from harness.experiment import SWITCHES, PretrainConfig, TrainConfig, build, build_experiment

from helpers.e2e import ROOT


def composed(*overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_the_yaml_blocks_hold_the_dataclass_defaults():
    """conf/config.yaml lists every key (so each can be overridden) with the dataclass's own default."""
    cfg = composed()
    assert cfg.train._target_ == "harness.experiment.TrainConfig"
    assert cfg.pretrain._target_ == "harness.experiment.PretrainConfig"
    assert build(cfg.train) == TrainConfig(), "conf/config.yaml's train block differs from TrainConfig's defaults"
    assert build(cfg.pretrain) == PretrainConfig(), "conf/config.yaml's pretrain block differs from PretrainConfig's"
    assert {f.name for f in fields(TrainConfig)} == set(cfg.train) - {"_target_"}


def test_the_blocks_build_into_their_classes():
    cfg = composed("train.collapse_share=0.5", "pretrain.tokens=1000")
    train, pretrain = build(cfg.train), build(cfg.pretrain)
    assert isinstance(train, TrainConfig) and train.collapse_share == 0.5
    assert isinstance(pretrain, PretrainConfig) and pretrain.tokens == 1000 and pretrain.optim.lr == 3e-3


@pytest.mark.parametrize(
    "override, needle",
    [
        ("train.tokens=0", "train.tokens=0 must be > 0"),
        ("train.collapse_share=1.5", "train.collapse_share=1.5"),
        ("train.max_grad_norm=-1", "train.max_grad_norm=-1"),
        ("train.peak_tflops=-5", "train.peak_tflops=-5"),
        ("train.compile=maybe", "train.compile='maybe' is not one of true, false, auto"),
        ("train.compile_mode=fast", "train.compile_mode='fast' is not one of default, reduce-overhead"),
        ("pretrain.tokens=0", "pretrain.tokens=0 must be > 0"),
        ("train.collapse_steps=0", "train.collapse_steps=0 must be >= 1"),
        ("data.seq_len=-3", "data.seq_len=-3 must be >= 2"),
        ("data.batch_size=0", "data.batch_size=0 must be >= 1"),
    ],
)
def test_a_bad_value_names_its_key(override, needle):
    block = override.split(".")[0]
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(".", r"\.")) as e:
        build(composed(override)[block])
    assert len(re.findall(r"\w=", str(e.value))) == 1, str(e.value)  # the bad key alone, not a neighbour


def test_cuda_graphs_refuse_gradient_accumulation_in_every_stage_that_trains():
    """CUDA graph trees overwrite the first micro-batch's gradients (pytorch/pytorch#169545): a CUDA-graph mode
    with accumulation stops in one line naming the stage's batch; one micro-batch a step, or the default mode,
    builds."""
    graphs = "train.compile_mode=reduce-overhead"
    assert build_experiment(composed(graphs, "data.batch_size=8", "pretrain.batch_size=8")).train.compile_mode
    assert build_experiment(composed("data.batch_size=8", "data.micro_batch_size=4")).data.micro_batch_size == 4
    cases = [
        ((graphs, "data.batch_size=8", "data.micro_batch_size=4", "pretrain.batch_size=4"), "data.batch_size=8"),
        (("train.compile_mode=max-autotune", "data.batch_size=4", "data.micro_batch_size=4"), "pretrain.batch_size=16"),
    ]
    for overrides, stage in cases:
        with pytest.raises(ConfigError) as e:
            build_experiment(composed(*overrides))
        line = str(e.value)
        assert "\n" not in line and stage in line and "pytorch/pytorch#169545" in line, line
        assert "into 2 micro-batches" in line if stage.startswith("data") else "into 4 micro-batches" in line, line


@pytest.mark.parametrize("key", SWITCHES)
def test_a_switch_takes_only_true_or_false(key):
    """force=maybe once read as true and moved a finished run aside; every top-level switch is a bool."""
    assert build_experiment(composed(f"{key}=true")).method == "upcycle"
    with pytest.raises(ConfigError, match=f"^{key}='maybe' must be true or false$"):
        build_experiment(composed(f"{key}=maybe"))
