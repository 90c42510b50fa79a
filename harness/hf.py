"""Load a local Hugging Face Llama / Qwen2 / Mistral checkpoint folder into :class:`Decoder`.

Reads config.json and the safetensors weights directly (no transformers needed at run time), so a
real checkpoint can be upcycled offline. Every failure is one :class:`HFCheckpointError` line.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from harness.errors import ConfigError
from harness.model import Decoder, ModelConfig

SUPPORTED = ("llama", "qwen2", "mistral")


class HFCheckpointError(ConfigError):
    """The checkpoint folder cannot be loaded; the message says which file and why."""


def _rope_theta(hf: dict) -> float:
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default")) if scaling else "default"
    if kind not in ("default", None):
        raise HFCheckpointError(f"config.json: rope scaling type {kind!r} is not supported (only default RoPE)")
    return float(hf.get("rope_theta", params.get("rope_theta", 10000.0)))


def config_from_hf(hf: dict, max_seq_len: int | None = None) -> ModelConfig:
    """Map an HF config.json dict onto :class:`ModelConfig`, refusing what our decoder cannot compute."""
    arch = hf.get("model_type")
    if arch not in SUPPORTED:
        raise HFCheckpointError(f"config.json: model_type={arch!r} is not supported (one of {SUPPORTED})")
    if hf.get("hidden_act", "silu") != "silu":
        raise HFCheckpointError(f"config.json: hidden_act={hf.get('hidden_act')!r} is not supported (silu only)")
    seq = int(max_seq_len or min(int(hf.get("max_position_embeddings", 2048)), 8192))
    window = hf.get("sliding_window") if hf.get("use_sliding_window", arch == "mistral") else None
    if window is not None and int(window) < seq:
        raise HFCheckpointError(f"config.json: sliding_window={window} < max_seq_len={seq}; lower max_seq_len")
    n_heads = int(hf["num_attention_heads"])
    return ModelConfig(
        vocab_size=int(hf["vocab_size"]),
        d_model=int(hf["hidden_size"]),
        n_layers=int(hf["num_hidden_layers"]),
        n_heads=n_heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or n_heads),
        d_ff=int(hf["intermediate_size"]),
        head_dim=int(hf.get("head_dim") or hf["hidden_size"] // n_heads),
        activation="swiglu",
        max_seq_len=seq,
        rope_theta=_rope_theta(hf),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=arch == "qwen2" or bool(hf.get("attention_bias", False)),
        name=f"hf:{arch}",
    )


def read_config(path: str | Path) -> dict:
    cfg_path = Path(path).expanduser() / "config.json"
    if not cfg_path.exists():
        raise HFCheckpointError(f"{cfg_path}: config.json is missing (model.hf_path must be a checkpoint folder)")
    try:
        return json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HFCheckpointError(f"{cfg_path}: invalid JSON ({e})") from e


def model_config(hf_path: str, max_seq_len: int | None = None) -> ModelConfig:
    """The ModelConfig of a checkpoint folder (what ``model=hf model.hf_path=...`` instantiates)."""
    cfg = config_from_hf(read_config(hf_path), max_seq_len)
    cfg.hf_path = str(Path(hf_path).expanduser().resolve())
    return cfg


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    )
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = folder / name
        if not path.exists():
            raise HFCheckpointError(f"{path}: weights file is missing")
        try:
            tensors.update(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as e:
            raise HFCheckpointError(f"{path}: cannot read safetensors ({e}); the file may be truncated") from e
    return tensors


def state_dict_from_hf(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename HF Llama-family weights to ours; gate_proj and up_proj stack into fc1 = [gate; up]."""

    def take(key: str) -> torch.Tensor:
        if key not in tensors:
            raise HFCheckpointError(f"safetensors: tensor {key!r} is missing")
        return tensors[key]

    sd = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    sd["lm_head.weight"] = sd["embed.weight"] if cfg.tie_embeddings else take("lm_head.weight")
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"blocks.{i}."
        sd[dst + "attn_norm.weight"] = take(src + "input_layernorm.weight")
        sd[dst + "mlp_norm.weight"] = take(src + "post_attention_layernorm.weight")
        for p in "qkvo":
            sd[dst + f"attn.{p}_proj.weight"] = take(src + f"self_attn.{p}_proj.weight")
            if cfg.qkv_bias and p != "o":
                sd[dst + f"attn.{p}_proj.bias"] = take(src + f"self_attn.{p}_proj.bias")
        gate, up = take(src + "mlp.gate_proj.weight"), take(src + "mlp.up_proj.weight")
        sd[dst + "mlp.fc1.weight"] = torch.cat([gate, up])
        sd[dst + "mlp.fc2.weight"] = take(src + "mlp.down_proj.weight")
    return sd


def load_hf(path: str | Path, max_seq_len: int | None = None, dtype: torch.dtype = torch.float32) -> Decoder:
    """Build a :class:`Decoder` holding the weights of the HF checkpoint folder at ``path``."""
    folder = Path(path).expanduser()
    cfg = model_config(str(folder), max_seq_len)
    model = Decoder(cfg)
    sd = state_dict_from_hf(_read_safetensors(folder), cfg)
    expected = model.state_dict()
    for key, value in sd.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise HFCheckpointError(
                f"safetensors: {key} has shape {tuple(value.shape)}, config.json implies {tuple(expected[key].shape)}"
            )
    model.load_state_dict({k: v.to(torch.float32) for k, v in sd.items()}, strict=True)
    return model.to(dtype)
