"""HF import: tiny random LlamaForCausalLM / Qwen2ForCausalLM saved locally, logits match ours."""

import json

import pytest
import torch

from harness.hf import HFCheckpointError, load_hf

transformers = pytest.importorskip("transformers")


def _save(tmp_path, arch, tie):
    kw = dict(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    cls, cfg = {
        "llama": (transformers.LlamaForCausalLM, transformers.LlamaConfig(**kw, rope_theta=5e4)),
        "qwen2": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config(**kw)),
        "mistral": (transformers.MistralForCausalLM, transformers.MistralConfig(**kw, sliding_window=None)),
    }[arch]
    torch.manual_seed(0)
    model = cls(cfg).eval()
    if arch == "qwen2":  # give the q/k/v biases real values
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(tmp_path)
    return model


@pytest.mark.parametrize("arch,tie", [("llama", False), ("llama", True), ("qwen2", True), ("mistral", False)])
def test_logits_match_transformers(tmp_path, arch, tie):
    ref = _save(tmp_path, arch, tie)
    ours = load_hf(tmp_path).eval()
    idx = torch.randint(0, 128, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx).logits, ref(idx).logits, rtol=1e-4, atol=1e-4)


def test_clear_errors(tmp_path):
    with pytest.raises(HFCheckpointError, match="config.json is missing"):
        load_hf(tmp_path)
    _save(tmp_path, "llama", False)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(HFCheckpointError, match="model_type='gpt2' is not supported"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(HFCheckpointError, match="has shape"):
        load_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(HFCheckpointError, match="truncated"):
        load_hf(tmp_path)
